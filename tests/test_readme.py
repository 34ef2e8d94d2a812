"""
README.rst renders cleanly and keeps its promises about the Quick start.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

README = Path(__file__).resolve().parent.parent / "README.rst"


class ReadmeTests(SynchronousTestCase):
    def test_renders_without_warnings(self) -> None:
        """
        docutils renders README.rst without a single warning (report level
        1, halting on any).
        """
        from docutils.core import publish_string

        errors = io.StringIO()
        publish_string(
            README.read_text(encoding="utf-8"),
            writer_name="html",
            settings_overrides={"report_level": 1, "halt_level": 5, "warning_stream": errors},
        )
        self.assertEqual(errors.getvalue(), "")

    def test_quick_start_has_exactly_two_setup_lines(self) -> None:
        """
        The Quick start holds exactly two command lines, each creating the
        virtualenv and doing a normal (non-editable) install: one runs the
        demo, one runs the tests with trial.
        """
        text = README.read_text(encoding="utf-8")
        quick = text.split("Quick start\n===========\n", 1)[1].split("\n=", 1)[0]
        lines = [line.strip() for line in quick.splitlines() if line.startswith("    ")]
        self.assertEqual(len(lines), 2, lines)
        demo, tests = lines
        for line in lines:
            self.assertTrue(line.startswith("python3 -m venv .venv && .venv/bin/pip install "), line)
            self.assertNotIn(" -e ", line)
        self.assertTrue(demo.endswith("nextclaude demo"))
        self.assertRegex(tests, re.escape("'.[test]'") + r" && .*twisted\.trial tests$")
