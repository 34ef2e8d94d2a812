"""NextClaude: a cache-aware multi-account proxy for Claude Code."""

__version__ = "0.1.0"
