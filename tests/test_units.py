"""
`nextclaude service print|install`: the systemd user unit and the launchd
agent, parsed the way their service managers read them, with the command
they run fed back to the real argument parser.
"""

from __future__ import annotations

import configparser
import io
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from nextclaude import units
from nextclaude.cli import build_parser, main, parse_arguments
from tests.support import write_config

TOP = Path(__file__).resolve().parent.parent


def parse_unit(text: str) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(comment_prefixes=("#", ";"), strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    return unit


class UnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.patch(os, "environ", {**os.environ, "HOME": str(self.home), "XDG_CONFIG_HOME": ""})
        self.config = write_config(self, 9)

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return main(["--config", str(self.config), *argv]), out.getvalue(), err.getvalue()

    def assert_runs_the_server(self, argv: list[str]) -> None:
        """
        C{argv} is this install's nextclaude (absolute), and what follows
        parses, with the real parser, as `--config FILE server --no-console`.
        """
        self.assertTrue(Path(argv[0]).is_absolute(), argv)
        rest = argv[3:] if argv[1:3] == ["-m", "nextclaude"] else argv[1:]
        args = parse_arguments(build_parser(), rest)
        self.assertEqual(args.command, "server")
        self.assertTrue(args.no_console)
        self.assertEqual(args.config, str(self.config))

    def test_systemd_unit(self) -> None:
        """
        `service print --kind systemd` prints a unit that parses as an INI
        file: ExecStart runs this install's `nextclaude --config FILE
        server --no-console` (checked with the real parser), restarted on
        failure, with a stop timeout past the proxy's own bound, wanted by
        the user's default target; no pid file anywhere.
        """
        code, out, err = self.run_main("service", "print", "--kind", "systemd")
        self.assertEqual((code, err), (0, ""))
        unit = parse_unit(out)
        service = unit["Service"]
        self.assert_runs_the_server(shlex.split(service["ExecStart"]))
        self.assertEqual(service["Restart"], "on-failure")
        self.assertGreater(int(service["TimeoutStopSec"]), 30 + 5)
        self.assertEqual(unit["Install"]["WantedBy"], "default.target")
        self.assertIn("man:nextclaude(1)", unit["Unit"]["Documentation"])
        self.assertNotIn("PIDFile", out)
        self.assertNotIn("--pidfile", out)
        self.assertNotIn("@", service["ExecStart"])

    def test_systemd_quoting(self) -> None:
        """
        A command with spaces, quotes, % and $ survives systemd's quoting:
        shlex reads it back word for word once systemd's %% and $$ are
        undone.
        """
        words = ["/opt/my tools/nextclaude", "--config", '/home/a "b"/50%$x.json', "server"]
        line = " ".join(units.systemd_quote(word) for word in words)
        self.assertEqual([w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line)], words)

    def test_launchd_agent(self) -> None:
        """
        `service print --kind launchd` prints a plist (plistlib reads it)
        whose ProgramArguments run the server like the unit, kept alive
        only after a failure, with its log under ~/Library/Logs.
        """
        code, out, err = self.run_main("service", "print", "--kind", "launchd")
        self.assertEqual((code, err), (0, ""))
        agent = plistlib.loads(out.encode())
        self.assertEqual(agent["Label"], units.LAUNCHD_LABEL)
        self.assert_runs_the_server(agent["ProgramArguments"])
        self.assertEqual(agent["KeepAlive"], {"SuccessfulExit": False})
        self.assertTrue(agent["RunAtLoad"])
        self.assertEqual(agent["StandardOutPath"], str(self.home / "Library" / "Logs" / "nextclaude.log"))
        self.assertGreater(agent["ExitTimeOut"], 35)

    def test_install_writes_where_the_manager_looks(self) -> None:
        """
        `service install` writes the unit under ~/.config/systemd/user (the
        agent under ~/Library/LaunchAgents), says how to enable it (with
        loginctl enable-linger), and a second install says it is up to date.
        """
        code, out, err = self.run_main("service", "install", "--kind", "systemd")
        self.assertEqual((code, err), (0, ""))
        path = self.home / ".config" / "systemd" / "user" / "nextclaude.service"
        self.assertIn(f"Wrote {path}", out)
        self.assertIn("systemctl --user enable --now nextclaude", out)
        self.assertIn("loginctl enable-linger", out)
        self.assertEqual(path.stat().st_mode & 0o777, 0o644)
        parse_unit(path.read_text())
        code, out, _ = self.run_main("service", "install", "--kind", "systemd")
        self.assertIn("already up to date", out)
        code, out, err = self.run_main("service", "install", "--kind", "launchd")
        agent = self.home / "Library" / "LaunchAgents" / "local.nextclaude.plist"
        self.assertIn("launchctl bootstrap", out)
        plistlib.loads(agent.read_bytes())

    def test_systemd_analyze_verify(self) -> None:
        """
        Where `systemd-analyze verify` works, it finds nothing to say about
        the unit.  Skipped where it is missing or cannot run (containers
        without a system manager); never required.
        """
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise SkipTest("systemd-analyze is not installed")
        self.run_main("service", "install", "--kind", "systemd")
        path = self.home / ".config" / "systemd" / "user" / "nextclaude.service"
        result = subprocess.run([tool, "verify", "--man=no", str(path)], capture_output=True, text=True)
        output = result.stdout + result.stderr
        if "Failed to initialize manager" in output or "Failed to lookup" in output:
            raise SkipTest(f"systemd-analyze cannot run here: {output.strip()}")
        self.assertEqual([line for line in output.splitlines() if "nextclaude" in line], [])

    def test_templates_are_package_data(self) -> None:
        """
        setup.cfg ships both templates as package data and MANIFEST.in puts
        them in the source distribution, so an installed copy finds them.
        """
        setup = configparser.ConfigParser()
        setup.read(TOP / "setup.cfg")
        shipped = setup.get("options.package_data", "nextclaude").split()
        for name in ("nextclaude.service", "nextclaude.plist"):
            self.assertIn(f"data/{name}", shipped)
            self.assertTrue((TOP / "nextclaude" / "data" / name).is_file())
        self.assertIn("recursive-include nextclaude/data", (TOP / "MANIFEST.in").read_text())
