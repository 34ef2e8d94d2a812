"""
README.rst renders cleanly, keeps its promises about the Quick start, and
every command line it shows parses; a runnable subset runs for real.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import spawn_nextclaude, start_proxy, write_config

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


# The first words of README command lines that are not nextclaude's own:
# anything else (a typo such as "nextcalude") fails the test.
OTHER_TOOLS = frozenset(
    {"python3", "pipx", "man", "systemctl", "loginctl", "journalctl", "launchctl", "twistd", "MANPATH"}
)


def command_lines() -> list[str]:
    """
    Every command line README shows: the lines of its literal blocks
    (indented after "::") and inline literals that start with
    `nextclaude `.
    """
    text = README.read_text(encoding="utf-8")
    blocks: list[list[str]] = []
    in_block = False
    for line in text.splitlines():
        if line.rstrip().endswith("::"):
            in_block = True
            blocks.append([])
            continue
        if in_block:
            if line.startswith("    ") and line.strip():
                blocks[-1].append(line.strip())
                continue
            if line.strip():
                in_block = False
    known = OTHER_TOOLS | {"nextclaude", "eval"}
    lines: list[str] = []
    for block in blocks:
        # A block of program output (the benchmark's figures) is not a
        # block of commands: in a block of commands, every line is one.
        if any(line.split()[0].split("=")[0] in known or "/bin/" in line.split()[0] for line in block):
            lines.extend(block)
    # Inline literals may wrap across lines in the source.
    flat = " ".join(text.split())
    lines.extend(re.findall(r"``(nextclaude [^`]+)``", flat))
    return lines


def nextclaude_invocations(line: str) -> list[list[str]]:
    """
    The nextclaude command lines within one shell line, as argv lists
    (without the program): `a && b`, `eval "$(nextclaude env)"`,
    `.venv/bin/nextclaude demo`, `... < key.txt`.
    """
    import shlex

    found: list[list[str]] = []
    for inner in re.findall(r"\$\(([^)]*)\)", line):
        found.extend(nextclaude_invocations(inner))
    line = re.sub(r"\$\([^)]*\)", "", line)
    for part in line.split("&&"):
        words = shlex.split(part.split(" < ")[0])
        if words and (words[0] == "nextclaude" or words[0].endswith("/bin/nextclaude")):
            found.append(words[1:])
    return found


class CommandLineTests(SynchronousTestCase):
    def test_every_command_line_parses(self) -> None:
        """
        Every nextclaude command line in README is accepted by the real
        argument parser (and `twistd nextclaude` lines by the plugin's
        options); every other command line starts with a known tool.
        """
        import contextlib
        import shlex

        from nextclaude.cli import build_parser, parse_arguments
        from nextclaude.tap import Options

        lines = command_lines()
        self.assertIn("nextclaude stop", lines)
        self.assertIn("nextclaude service install", lines)
        checked = 0
        for line in lines:
            invocations = nextclaude_invocations(line)
            for argv in invocations:
                with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
                    try:
                        parse_arguments(build_parser(), argv)
                    except SystemExit as exit:
                        # --help exits 0 having printed the help: that parses.
                        if exit.code != 0:
                            self.fail(f"README line {line!r} does not parse: {err.getvalue()}")
                checked += 1
            words = shlex.split(line.replace("$(", "").replace(")", ""))
            if words[0] in ("twistd",):
                plugin = words[words.index("nextclaude") + 1 :]
                options = Options()
                self.patch(options, "postOptions", lambda: None)
                options.parseOptions(plugin)
            elif not invocations:
                first = words[0].split("=")[0]
                self.assertIn(first, OTHER_TOOLS, f"README line {line!r}: unknown command")
        self.assertGreater(checked, 15)


class RunnableSubsetTests(TestCase):
    """
    The README lines a test can run for real (CI runs the test suite):
    --help, accounts, env, status against a started proxy, a short demo;
    each taken from README verbatim and run as a child process with the
    test's config in $NEXTCLAUDE_CONFIG.
    """

    def line(self, prefix: str) -> list[str]:
        for line in command_lines():
            for argv in nextclaude_invocations(line):
                if " ".join(argv).startswith(prefix):
                    return argv
        self.fail(f"README has no `nextclaude {prefix}` line")

    async def run_line(self, argv: list[str], config: Path) -> tuple[int, str, str]:
        watcher = spawn_nextclaude(self, *argv, extra_env={"NEXTCLAUDE_CONFIG": str(config)})
        reason = await watcher.ended
        return reason.exitCode, watcher.out.decode(), watcher.err.decode()

    async def test_runnable_lines(self) -> None:
        """
        `nextclaude --help` lists the commands; `nextclaude accounts` lists
        the config's accounts; with the proxy started, `nextclaude status`
        shows it and `eval "$(nextclaude env)"`'s command prints its real
        address without a warning; `nextclaude demo --no-console
        --duration 5` ends with its summary; all exit 0.
        """
        config = write_config(self, 9)
        code, out, err = await self.run_line(self.line("--help"), config)
        self.assertEqual(code, 0, err)
        self.assertIn("service", out)
        code, out, err = await self.run_line(self.line("accounts"), config)
        self.assertEqual(code, 0, err)
        self.assertIn("alice", out)
        service, url = start_proxy(self, config)
        code, out, err = await self.run_line(self.line("status"), config)
        self.assertEqual(code, 0, err)
        self.assertIn("2 account(s)", out)
        code, out, err = await self.run_line(self.line("env"), config)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"export ANTHROPIC_BASE_URL={url}", out)
        code, out, err = await self.run_line(self.line("demo --no-console"), config)
        self.assertEqual(code, 0, err)
        self.assertIn("This run: its moves re-billed", out)
