"""
End-to-end test of the demo: the real proxy service against the simulated
upstream on loopback, driven by the demo's scripted conversations.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude.demo import DemoSettings, DemoSummary, run_demo, verdict
from nextclaude.simulate import VirtualTimeReactor

# Two sessions for 40 (virtual) seconds burn about 50,000 quota tokens: the
# first account runs out mid-demo, the second serves the rest.
SETTINGS = DemoSettings(accounts=2, sessions=2, duration=40.0, five_hour_tokens=30_000, delta_interval=0.0)


class DemoTests(TestCase):
    def setUp(self) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        # Where the user's files would be: the demo must touch none of them.
        self.home = root / "home"
        self.xdg_config = root / "xdg-config"
        for directory in (self.home, self.xdg_config):
            directory.mkdir()
        self.user_config = root / "user" / "config.json"
        environ = dict(
            os.environ,
            NEXTCLAUDE_CONFIG=str(self.user_config),
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.xdg_config),
        )
        self.patch(os, "environ", environ)
        # The demo's own temporary directory goes under the test's, so the
        # test can see it made one and removed it.
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.made: list[str] = []
        real_mkdtemp = tempfile.mkdtemp

        def mkdtemp(*args: Any, **kw: Any) -> str:
            kw.setdefault("dir", str(self.tmp))
            path = real_mkdtemp(*args, **kw)
            self.made.append(path)
            return path

        self.patch(tempfile, "mkdtemp", mkdtemp)

    async def play_demo(self) -> tuple[DemoSummary, str]:
        out = io.StringIO()
        # Real sockets, virtual time: the demo moves the clock itself.
        clock = Clock()
        clock.advance(1_800_000_000)
        summary = await run_demo(VirtualTimeReactor(reactor, clock), SETTINGS, out=out, advance=clock.advance)
        return summary, out.getvalue()

    async def test_demo_switches_accounts_without_failures(self) -> None:
        """
        With a 5 h quota too small for the scripted traffic, the demo's
        requests all complete without a failure, the proxy switches from the
        first simulated account to the second at least once, compactions
        are detected, the prompt cache is read, and the printed summary line
        gives the same figures as the returned DemoSummary.  The headline
        comes from the run itself: the usage history's re-billed tokens and
        its naive estimate on the same requests (no separate replay).
        """
        summary, text = await self.play_demo()
        self.assertGreater(summary.requests, 0)
        self.assertEqual(summary.failed, 0)
        self.assertGreater(summary.ok, 0)
        self.assertEqual(summary.requests, summary.ok + summary.rejected + summary.failed)
        self.assertGreaterEqual(len(summary.switches), 1)
        self.assertEqual(summary.switches[0][:2], ("sim-1", "sim-2"))
        self.assertGreater(summary.cache_read, 0)
        self.assertGreater(summary.compactions, 0)
        self.assertIn("** session moved sim-1 -> sim-2", text)
        self.assertIn("naive rotation", text)
        self.assertNotIn("replayed", text)
        headline = re.search(r"^This run: its moves re-billed ([\d,]+) cache tokens; naive rotation on the same "
                             r"requests would have re-billed about ([\d,]+) \(estimate\), "
                             r"so (?:about ([\d,]+) were saved|this run re-billed about ([\d,]+) more)\.$",
                             text, re.MULTILINE)  # fmt: skip
        self.assertIsNotNone(headline, text)
        assert headline is not None
        rebilled, naive = (int(g.replace(",", "")) for g in headline.groups()[:2])
        saved, more = headline.groups()[2:]
        if saved is not None:
            self.assertEqual(int(saved.replace(",", "")), naive - rebilled)
        else:
            self.assertEqual(int(more.replace(",", "")), rebilled - naive)
            self.assertGreater(rebilled, naive)
        # Without the console, the introduction says how to stop, not which keys to press.
        self.assertIn("Ctrl-C stops the traffic early", text)
        self.assertNotIn("q to quit", text)
        line = re.search(r"^Summary: .*$", text, re.MULTILINE)
        self.assertIsNotNone(line)
        assert line is not None
        self.assertIn(f"{len(summary.switches)} session move(s); cache read {summary.cache_read:,} tokens", line.group(0))
        self.assertTrue(
            line.group(0).startswith(
                f"Summary: {summary.requests} requests ({summary.ok} ok, {summary.rejected} rate-limited, "
                f"0 failed), "
            ),
            line.group(0),
        )

    async def test_demo_leaves_no_files_and_ignores_user_config(self) -> None:
        """
        The demo works in a temporary directory of its own and removes it
        when done; it neither reads nor writes the user's config
        ($NEXTCLAUDE_CONFIG, or the default under $HOME / $XDG_CONFIG_HOME).
        """
        await self.play_demo()
        self.assertEqual(len(self.made), 1)
        self.assertFalse(os.path.exists(self.made[0]))
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertFalse(self.user_config.exists())
        self.assertFalse(self.user_config.parent.exists())
        self.assertEqual(os.listdir(self.home), [])
        self.assertEqual(os.listdir(self.xdg_config), [])

    async def test_user_config_is_not_read(self) -> None:
        """
        A user config that exists (with a port, key and account of its own)
        has no effect on the demo and is left byte for byte as it was.
        """
        self.user_config.parent.mkdir()
        original = (
            b'{"proxy": {"port": 1, "host": "127.0.0.1", "apiKey": "nc-users-own-key"},'
            b' "upstream": "http://127.0.0.1:1",'
            b' "accounts": [{"name": "mine", "type": "oauth", "accessToken": "sk-ant-oat01-mine"}]}'
        )
        self.user_config.write_bytes(original)
        summary, text = await self.play_demo()
        self.assertEqual(summary.failed, 0)
        self.assertNotIn("mine", text)
        self.assertEqual(self.user_config.read_bytes(), original)
        self.assertEqual(sorted(os.listdir(self.user_config.parent)), ["config.json"])


class InterruptTests(TestCase):
    async def test_ctrl_c_prints_the_partial_summary(self) -> None:
        """
        Ctrl-C (SIGINT) during `nextclaude demo --no-console` prints the
        summary of what ran so far and exits with status 130 (interrupted
        by SIGINT), no traceback, its temporary directory removed.
        """
        import signal

        from tests.support import spawn_nextclaude

        tmp = Path(self.mktemp()).absolute()
        tmp.mkdir()
        watcher = spawn_nextclaude(self, "demo", "--no-console", "--duration", "60", extra_env={"TMPDIR": str(tmp)})
        await watcher.line_matching(rb"\n +[0-9.]+s  200 ")
        watcher.transport.signalProcess(signal.SIGINT)
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 130, watcher.output)
        self.assertNotIn("Traceback", watcher.output)
        self.assertIn("Interrupted: the summary so far.", watcher.output)
        self.assertIn("This run: its moves re-billed", watcher.output)
        self.assertEqual(os.listdir(tmp), [])

    async def test_sighup_removes_the_temporary_directory(self) -> None:
        """
        A hangup (SIGHUP: the terminal closed) stops the demo like Ctrl-C:
        its temporary directory, with a private config and keys, is
        removed, and it exits with status 129.
        """
        import signal

        from tests.support import spawn_nextclaude

        tmp = Path(self.mktemp()).absolute()
        tmp.mkdir()
        watcher = spawn_nextclaude(self, "demo", "--no-console", "--duration", "60", extra_env={"TMPDIR": str(tmp)})
        await watcher.line_matching(rb"\n +[0-9.]+s  200 ")
        self.assertEqual(len(os.listdir(tmp)), 1)
        watcher.transport.signalProcess(signal.SIGHUP)
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 129, watcher.output)
        self.assertNotIn("Traceback", watcher.output)
        self.assertEqual(os.listdir(tmp), [])


class VerdictTests(SynchronousTestCase):
    def test_never_a_negative_saving(self) -> None:
        """
        The headline says how much was saved when naive rotation would have
        re-billed more, and how much more this run re-billed otherwise;
        never "-3,000 were saved".
        """
        self.assertEqual(verdict(1_000, 25_000), "so about 24,000 were saved")
        self.assertEqual(verdict(0, 0), "so about 0 were saved")
        self.assertEqual(verdict(3_000, 0), "so this run re-billed about 3,000 more")
