import sys

from nextclaude.cli import main

sys.exit(main())
