"""
End to end through the console: the real L{ConsoleApp}, driven with
keypresses, talks to the real L{ControlClient}, connected in memory (iosim)
to the real control server protocol of a L{ControlService}, which drives a
real L{Router} over a real L{AccountPool} built from a config file; the
accounts layer is the real L{ConfigAccounts}.

What is checked is what the user relies on: pinning an account from the
console makes the router send the conversations there, choosing the pinned
account again unpins it, and removing an account from the console takes it
out of the config file and out of the running pool.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from nextclaude import events
from nextclaude.config import load_config
from nextclaude.console.app import ConsoleApp
from nextclaude.control import ConfigAccounts, ControlClient, ControlService, _ClientProtocol, config_reloader
from nextclaude.events import EventHub
from nextclaude.pool import AccountPool, Thresholds
from nextclaude.router import MANUAL, PRIMARY, Router
from nextclaude.sessions import RequestFacts
from nextclaude.status import snapshot
from tests.support import write_config

NOW = 1_750_000_000.0
SIZE = (80, 24)
SOCKET = "/run/test/control.sock"
SONNET = "claude-sonnet-4-5"
ONE_HOUR = 3600.0

EXISTING = "s:0b6e4a52-6f0e-4e38-9d7a-0c1b7f3f6a21"
BRAND_NEW = "s:7d1f9c30-2a4b-4c5d-8e6f-9a0b1c2d3e4f"


def turn(session: str) -> RequestFacts:
    """
    One ordinary turn of a Claude Code session (its id from the header).
    """
    return RequestFacts(
        session_key=session,
        key_source="header",
        model=SONNET,
        body_size=40_000,
        cache_ttl=ONE_HOUR,
        is_compaction=False,
        starts_with_continuation=False,
        is_side_request=False,
    )


class ConfiguredProxy:
    """
    What L{ControlService} needs of a proxy, all real: an event hub, a
    router over a pool read from the config file, the config-file accounts
    layer that reloads into that router, and nextclaude.status's snapshot.
    """

    def __init__(self, clock: Clock, config_path: Path) -> None:
        self.clock = clock
        self.hub = EventHub()
        config = load_config(config_path)
        self.pool = AccountPool(config.accounts, Thresholds(switch=config.switch_threshold, hard=config.hard_threshold))
        self.router = Router(self.pool, clock.seconds, self.hub)
        self.accounts = ConfigAccounts(config_path, config_reloader(config_path, self.router))
        self.started = clock.seconds() - 60

    def status(self) -> dict[str, Any]:
        return snapshot(self.router, self.clock.seconds(), self.started, "127.0.0.1", 3456)


class ConsoleOverControlTests(SynchronousTestCase):
    """
    A console on a L{Clock} attached to a proxy of three accounts (alice,
    bob, carol, in that order) through the control channel.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.config_path = write_config(
            self,
            9,
            [
                {"name": "alice", "type": "oauth", "accessToken": "sk-ant-oat01-alice"},
                {"name": "bob", "type": "oauth", "accessToken": "sk-ant-oat01-bob"},
                {"name": "carol", "type": "oauth", "accessToken": "sk-ant-oat01-carol"},
            ],
        )
        self.proxy = ConfiguredProxy(self.clock, self.config_path)
        self.router = self.proxy.router
        # Never started: only its factory's server protocol is used, over iosim.
        service = ControlService(self.clock, SOCKET, self.proxy)
        self.client_protocol, self.server, self.pump = iosim.connectedServerAndClient(
            service.factory.buildProtocol, _ClientProtocol
        )
        self.client = ControlClient(self.client_protocol, SOCKET)
        self.app = ConsoleApp(self.clock, self.client, owns_proxy=False, localtime=time.gmtime)
        self.app.start()
        self.addCleanup(self.app.stop)
        self.pump.flush()

    # -- helpers ---------------------------------------------------------------

    def press(self, *keys: str) -> None:
        """
        Press keys on the console, then let the control channel carry
        whatever they caused (commands, answers, pushed events, snapshots).
        """
        for key in keys:
            self.app.root.keypress(SIZE, key)
            self.pump.flush()

    def text(self) -> str:
        canvas = self.app.root.render(SIZE, focus=True)
        lines = list(canvas.decoded_text)
        self.assertEqual(len(lines), SIZE[1])
        return "\n".join(lines)

    def card(self, name: str) -> str:
        """
        The title line of the account's card: a two-character marker (>
        primary, → successor), the name, then tier, status and flags.
        """
        text = self.text()
        for line in text.splitlines():
            if line[2:].startswith(name + "  "):
                return line
        self.fail(f"no card for {name!r} in:\n{text}")

    def request(self, facts: RequestFacts) -> tuple[str | None, str]:
        """
        One client request as the proxy routes it: open, route, close.
        """
        exchange = self.router.open(facts)
        decision = self.router.route(exchange)
        self.router.close(exchange)
        self.pump.flush()
        return (decision.account.name if decision.account is not None else None), decision.reason

    def snapshot_names(self) -> list[str]:
        assert self.app.model.snapshot is not None
        return [str(account["name"]) for account in self.app.model.snapshot["accounts"]]

    # -- tests -------------------------------------------------------------------

    def test_pin_from_console_moves_sessions_and_unpins(self) -> None:
        """
        With a session on alice (the primary), pressing s, moving to bob
        with j and pressing Enter pins bob in the router itself; the
        session's next request goes to bob for the reason "manual", a
        brand-new session starts on bob, the console's card for bob shows
        ★ manual once the snapshot has been fetched again (and the log the
        pin and the switch, pushed over the channel), and s with bob chosen
        again clears the pin in the router and on the screen.
        """
        self.assertEqual(self.request(turn(EXISTING)), ("alice", PRIMARY))
        self.assertEqual(self.router.primary, "alice")
        self.assertIsNone(self.router.manual)
        self.assertEqual(self.snapshot_names(), ["alice", "bob", "carol"])
        self.assertNotIn("★", self.text())

        self.press("s")
        menu = self.text()
        self.assertIn("Pin an account", menu)
        self.assertIn("▸   alice", menu)
        self.press("j")
        self.assertIn("▸   bob", self.text())
        self.press("enter")

        self.assertEqual(self.router.manual, "bob")
        self.assertEqual(self.router.primary, "bob")
        self.assertEqual(self.proxy.hub.recent[-1].kind, events.PIN_CHANGED)
        self.assertEqual(self.proxy.hub.recent[-1].data, {"account": "bob"})

        self.assertEqual(self.request(turn(EXISTING)), ("bob", MANUAL))
        session = self.router.sessions.get(EXISTING)
        assert session is not None
        self.assertEqual(session.account, "bob")
        switched = self.proxy.hub.recent[-1]
        self.assertEqual(switched.kind, events.SWITCHED)
        self.assertEqual(
            switched.data, {"account": "bob", "previous": "alice", "reason": MANUAL, "session": EXISTING}
        )
        # Affinity from now on: the move happens once.
        self.assertEqual(self.request(turn(EXISTING)), ("bob", "affinity"))

        self.assertEqual(self.request(turn(BRAND_NEW)), ("bob", MANUAL))
        fresh = self.router.sessions.get(BRAND_NEW)
        assert fresh is not None
        self.assertEqual(fresh.account, "bob")

        # The snapshot the console holds was fetched after the pin.
        self.assertEqual(self.app.model.pinned, "bob")
        text = self.text()
        self.assertTrue(self.card("bob").startswith("> bob"))
        self.assertIn("★ manual", self.card("bob"))
        self.assertNotIn("★", self.card("alice"))
        self.assertNotIn("★", self.card("carol"))
        self.assertEqual(text.count("★ manual"), 1)
        self.assertIn("pinned bob", text.splitlines()[-1])
        self.assertIn("★ pinned bob", text)
        self.assertIn("⇄ switched s:0b6e4a52-… alice → bob (manual)", text)

        self.press("s")
        menu = self.text()
        self.assertIn("  ★ bob", menu)
        self.assertIn("again to unpin it.", menu)
        self.press("j", "enter")

        self.assertIsNone(self.router.manual)
        self.assertEqual(self.proxy.hub.recent[-1].kind, events.PIN_CHANGED)
        self.assertEqual(self.proxy.hub.recent[-1].data, {"account": None})
        self.assertIsNone(self.app.model.pinned)
        text = self.text()
        self.assertNotIn("★ manual", text)
        self.assertIn("unpinned bob", text.splitlines()[-1])
        self.assertIn("☆ pin cleared", text)
        # Unpinned, sessions stay where they are.
        self.assertEqual(self.request(turn(EXISTING)), ("bob", "affinity"))

    def test_remove_from_console_edits_config_and_pool(self) -> None:
        """
        r, moving to carol, Enter and confirming with y removes carol
        from the config file behind the accounts layer; the reload that
        follows drops her from the running pool, the router no longer knows
        her, and the console's next snapshot (and screen) no longer shows
        her, while alice and bob stay.
        """
        self.assertEqual(self.request(turn(EXISTING)), ("alice", PRIMARY))
        self.assertIn("carol", self.text())

        self.press("r", "j", "j", "enter")
        self.assertIn("Remove carol? Its credentials are deleted", self.text())
        # Nothing happens before the confirmation.
        self.assertIsNotNone(load_config(self.config_path).account("carol"))
        self.assertIsNotNone(self.proxy.pool.get("carol"))

        self.press("y")

        config = load_config(self.config_path)
        self.assertIsNone(config.account("carol"))
        self.assertEqual([account.name for account in config.accounts], ["alice", "bob"])
        self.assertIsNone(self.proxy.pool.get("carol"))
        self.assertEqual([account.name for account in self.proxy.pool], ["alice", "bob"])
        self.assertRaises(KeyError, self.router.pin, "carol")

        self.assertEqual(self.snapshot_names(), ["alice", "bob"])
        text = self.text()
        self.assertNotIn("carol", text.replace("removed carol", ""))
        self.assertIn("removed carol", text.splitlines()[-1])
        self.assertIn("alice", text)
        self.assertIn("bob", text)
        # The session on alice keeps its account.
        self.assertEqual(self.request(turn(EXISTING)), ("alice", "affinity"))
