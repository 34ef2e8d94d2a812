"""
Tests for nextclaude.console: the dashboard rendered from a status snapshot
and events at 80x24 and 160x48 (header, account cards, activity log), keys
driving a fake control client, countdowns and redraw batching on a
L{Clock}, the terminal given back, and logs kept off the screen.

Widgets are tested as DESIGN.md asks: keypresses, then
C{render((cols, rows)).decoded_text}.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any, Callable, Mapping

import urwid
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from nextclaude import __version__, events
from nextclaude.activity import LogRouter
from nextclaude.console import keymap, views
from nextclaude.console import palette as p
from nextclaude.console.app import (
    ConsoleApp,
    Outcome,
    Redrawer,
    default_api_key_name,
    run_console,
)
from nextclaude.console.widgets import Dashboard, classify_secret, screen_lines
from nextclaude.events import EventHub
from nextclaude.pool import Status
from nextclaude.quota import parse_rate_limit_headers
from nextclaude.router import Router
from nextclaude.status import snapshot as status_snapshot
from nextclaude.usage import Usage
from tests.test_pool import make_pool, subscription_headers

NOW = 1_750_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR
SMALL = (80, 24)
LARGE = (160, 48)

ALICE = "alice@example.com"
BOB = "bob@example.com"
CAROL = "carol@example.com"


def account(
    name: str,
    *,
    tier: str = "Pro",
    status: str = "active",
    flags: tuple[str, ...] = (),
    five: float | None = 0.43,
    five_reset: float = NOW + 4 * HOUR + 16 * 60 + 30,
    seven: float | None = 0.30,
    seven_reset: float = NOW + 5 * DAY + 3 * HOUR + 30,
    error: str | None = None,
    throttled_until: float | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """
    One account as L{nextclaude.status.account_snapshot} shapes it.
    """
    windows = {}
    if five is not None:
        windows["5h"] = {"utilization": five, "reset": five_reset, "status": "allowed"}
    if seven is not None:
        windows["7d"] = {"utilization": seven, "reset": seven_reset, "status": "allowed"}
    return {
        "name": name,
        "type": "oauth",
        "tier": tier,
        "priority": 0,
        "status": status,
        "flags": list(flags),
        "error": error,
        "throttledUntil": throttled_until,
        "exhaustedUntil": None,
        "windows": windows,
        "usage": usage
        or {
            "requests": 84,
            "failures": 0,
            "coldRebuilds": 1,
            "inputTokens": 42_000,
            "outputTokens": 46_000,
            "cacheReadTokens": 2_200_000,
            "cacheCreationTokens": 120_000,
        },
    }


def make_snapshot(accounts: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """
    A whole snapshot as L{nextclaude.status.snapshot} shapes it: the
    example of PRODUCT.md ("The dashboard (console) and nextclaude status")
    plus a third account.
    """
    if accounts is None:
        accounts = [
            account(ALICE, status="draining", flags=("successor",)),
            account(
                BOB,
                tier="Max",
                flags=("primary", "manual"),
                five=0.05,
                five_reset=NOW + 5 * HOUR,
                seven=None,
                usage={
                    "requests": 7,
                    "failures": 0,
                    "coldRebuilds": 1,
                    "inputTokens": 2_000,
                    "outputTokens": 12_000,
                    "cacheReadTokens": 520_000,
                    "cacheCreationTokens": 150_000,
                },
            ),
            account(CAROL, tier="Max", five=0.99, status="exhausted", seven=0.6),
        ]
    snapshot = {
        "version": __version__,
        "time": NOW,
        "startedAt": NOW - 3 * HOUR - 12 * 60,
        "uptime": 3 * HOUR + 12 * 60,
        "listen": {"host": "127.0.0.1", "port": 3456},
        "primary": BOB,
        "sessions": 9,
        "switchThreshold": 0.98,
        "hardThreshold": 0.995,
        "totals": {
            "requests": 91,
            "failures": 0,
            "coldRebuilds": 2,
            "inputTokens": 44_000,
            "outputTokens": 58_000,
            "cacheReadTokens": 2_720_000,
            "cacheCreationTokens": 270_000,
        },
        "accounts": accounts,
    }
    snapshot.update(extra)
    return snapshot


def finished(
    when: float,
    account: str | None = ALICE,
    *,
    status: int = 200,
    duration: float = 2.34,
    reason: str = "affinity",
    read: int = 45_000,
    created: int = 800,
    fresh: int = 120,
    out: int = 1_100,
    usage: bool = True,
    model: str | None = "claude-sonnet-4-5-20250929",
    side_kind: str | None = None,
) -> dict[str, Any]:
    """
    A request-finished event as the control channel delivers it
    (L{nextclaude.events.Event.to_json} of what proxy.py emits).
    """
    return {
        "model": model,
        "side_kind": side_kind,
        "kind": events.REQUEST_FINISHED,
        "time": when,
        "id": 1,
        "method": "POST",
        "path": "/v1/messages?beta=true",
        "account": account,
        "status": status,
        "reason": reason,
        "ok": True,
        "duration": duration,
        "usage": {
            "input_tokens": fresh,
            "output_tokens": out,
            "cache_read_input_tokens": read,
            "cache_creation_input_tokens": created,
        }
        if usage
        else None,
    }


def hhmmss(when: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(when))


class FakeClient:
    """
    The control client's shape (L{nextclaude.console.app.ConsoleClient}):
    records calls, answers snapshots stamped with the test clock's time.
    """

    def __init__(self, clock: Clock, snapshot: dict[str, Any]) -> None:
        self.clock = clock
        self.state = snapshot
        self.on_disconnect: Deferred[None] = Deferred()
        self.calls: list[tuple[Any, ...]] = []
        self.listener: Callable[[dict[str, Any]], None] | None = None
        self.snapshots = 0
        self.pending_snapshot: Deferred[dict[str, Any]] | None = None
        self.answer: Callable[[], Deferred[Any]] = lambda: succeed(None)

    def snapshot(self) -> Deferred[dict[str, Any]]:
        self.snapshots += 1
        if self.pending_snapshot is not None:
            return self.pending_snapshot
        return succeed(dict(self.state, time=NOW + self.clock.seconds()))

    def subscribe(self, on_event: Callable[[dict[str, Any]], None]) -> Deferred[None]:
        self.listener = on_event
        return succeed(None)

    def emit(self, event: dict[str, Any]) -> None:
        assert self.listener is not None
        self.listener(event)

    def _record(self, *call: Any) -> Deferred[Any]:
        self.calls.append(call)
        return self.answer()

    def pin(self, name: str | None) -> Deferred[Any]:
        return self._record("pin", name)

    def add_api_key(self, name: str, key: str) -> Deferred[Any]:
        return self._record("add_api_key", name, key)

    def import_credentials(self, json_text: str, name: str | None = None) -> Deferred[Any]:
        return self._record("import_credentials", json_text, name)

    def remove(self, name: str) -> Deferred[Any]:
        return self._record("remove", name)

    def reload(self) -> Deferred[Any]:
        return self._record("reload")

    def close(self) -> None:
        self.calls.append(("close",))


class ConsoleHarness(SynchronousTestCase):
    """
    A console app on a L{Clock} (its time 0 is the proxy's C{NOW}) with a
    fake client, times shown in UTC.
    """

    owns_proxy = False

    def make_app(self, snapshot: dict[str, Any] | None = None, **kw: Any) -> ConsoleApp:
        self.clock = Clock()
        self.client = FakeClient(self.clock, snapshot or make_snapshot())
        self.draws: list[float] = []
        self.stops: list[Deferred[None]] = []

        def stop_proxy() -> Deferred[None]:
            stopped: Deferred[None] = Deferred()
            self.stops.append(stopped)
            return stopped

        kw.setdefault("owns_proxy", self.owns_proxy)
        self.app = ConsoleApp(
            self.clock,
            self.client,
            stop_proxy=stop_proxy,
            draw=lambda: self.draws.append(self.clock.seconds()),
            localtime=time.gmtime,
            **kw,
        )
        self.app.start()
        self.addCleanup(self.app.stop)
        return self.app

    def screen(self, size: tuple[int, int] = SMALL) -> list[str]:
        canvas = self.app.root.render(size, focus=True)
        lines = list(canvas.decoded_text)
        self.assertEqual(len(lines), size[1])
        return lines

    def text(self, size: tuple[int, int] = SMALL) -> str:
        return "\n".join(self.screen(size))

    def press(self, *keys: str, size: tuple[int, int] = SMALL) -> None:
        for key in keys:
            self.app.root.keypress(size, key)

    def line_with(self, needle: str, size: tuple[int, int] = SMALL) -> str:
        for line in self.screen(size):
            if needle in line:
                return line
        self.fail(f"no line with {needle!r} in:\n" + self.text(size))


class HeaderTests(ConsoleHarness):
    def test_header_figures_80x24(self) -> None:
        """
        At 80x24 the header shows version, account count, tracked sessions,
        overall cache hit %, tokens in/out, request count, uptime and the
        listening address, wrapped between figures onto two lines.
        """
        self.make_app()
        screen = self.screen(SMALL)
        header = screen[0] + "\n" + screen[1]
        for figure in [
            f"NextClaude {__version__}",
            "3 accounts",
            "9 sessions",
            "cache hit 90%",
            "↑44k ↓58k",
            "91 reqs",
            "up 3h12m",
            "127.0.0.1:3456",
        ]:
            self.assertIn(figure, header)
        self.assertFalse(screen[0].rstrip().endswith("·"))

    def test_header_one_line_160x48(self) -> None:
        """
        A wide terminal shows the whole header on its first line, primary
        included.
        """
        self.make_app()
        first = self.screen(LARGE)[0]
        for figure in ["3 accounts", "cache hit 90%", "up 3h12m", "127.0.0.1:3456", f"primary {BOB}"]:
            self.assertIn(figure, first)

    def test_waiting_for_snapshot(self) -> None:
        """
        Until the first snapshot arrives the header says so and the log
        already works.
        """
        self.clock = Clock()
        self.client = FakeClient(self.clock, make_snapshot())
        self.client.pending_snapshot = Deferred()
        self.app = ConsoleApp(self.clock, self.client, owns_proxy=False, localtime=time.gmtime)
        self.app.start()
        self.addCleanup(self.app.stop)
        self.client.emit(finished(NOW - 5))
        screen = self.screen(SMALL)
        self.assertIn("waiting for the proxy's status", screen[0])
        self.assertIn(hhmmss(NOW - 5), self.text())


class CardTests(ConsoleHarness):
    def test_cards_80x24(self) -> None:
        """
        At 80x24 three accounts get three-line cards: name, tier, status,
        ★ manual on the pinned one, > on the primary and → on the successor;
        both bars with % used and reset countdown; cache hit %, ✎ rebuilt
        with its cold count, ↑in ↓out and requests.
        """
        self.make_app()
        screen = self.screen(SMALL)
        alice = next(i for i, line in enumerate(screen) if ALICE in line)
        self.assertTrue(screen[alice].startswith("→ " + ALICE))
        self.assertIn("Pro  draining  successor", screen[alice])
        bars = screen[alice + 1]
        self.assertRegex(bars, r"5h █+░+  43% \(4h16m\)")
        self.assertRegex(bars, r"7d █+░+  30% \(5d3h\)")
        self.assertIn("hit 93% ✎120k (1 cold) · ↑42k ↓46k · 84 req", screen[alice + 2])

        bob = self.line_with("> ")
        self.assertTrue(bob.startswith("> " + BOB))
        self.assertIn("Max  active  ★ manual  primary", bob)
        self.assertRegex(self.line_with("(5h)"), r"5h █░+   5% \(5h\) .*7d ·+   --")

        carol = self.line_with(CAROL)
        self.assertIn("exhausted 4h16m", carol)
        self.assertRegex(self.line_with("99%"), r"5h █+  99% \(4h16m\)   7d █+░+  60% \(5d3h\)")

    def test_cards_leave_the_log_room_at_80x24(self) -> None:
        """
        At 80x24 the cards take at most half of the screen and the activity
        log keeps the rest: with five accounts cards compact to two lines,
        with twenty to one line each and a "+N more" line.
        """
        names = [f"user{i}@example.com" for i in range(5)]
        self.make_app(make_snapshot([account(name) for name in names]))
        screen = self.screen(SMALL)
        first = next(i for i, line in enumerate(screen) if names[0] in line)
        second = next(i for i, line in enumerate(screen) if names[1] in line)
        self.assertEqual(second - first, 2)
        self.assertRegex(screen[first + 1], r"5h █+░+  43% \(4h16m\)  7d")
        log_title = next(i for i, line in enumerate(screen) if line.startswith("time "))
        self.assertLessEqual(log_title - first, 24 // 2)
        self.assertGreaterEqual(24 - 1 - log_title, 6)

        many = [f"user{i:02}@example.com" for i in range(20)]
        self.make_app(make_snapshot([account(name) for name in many]))
        screen = self.screen(SMALL)
        shown = [name for name in many if any(name in line for line in screen)]
        self.assertGreater(len(shown), 3)
        self.assertLess(len(shown), 20)
        self.assertIn(f"+{20 - len(shown)} more accounts", self.text())
        self.assertRegex(self.line_with(many[0]), r"active  5h 43%  7d 30%  hit 93%")

    def test_cards_side_by_side_160x48(self) -> None:
        """
        At 160x48 cards stand two abreast with full detail: one line per
        window with "% used · resets in", the cache line with what was read
        and rebuilt, and the tokens line.
        """
        self.make_app()
        screen = self.screen(LARGE)
        titles = self.line_with(ALICE, LARGE)
        self.assertIn(BOB, titles)
        self.assertLess(titles.index(ALICE), titles.index(BOB))
        row = screen.index(titles)
        self.assertRegex(screen[row + 1], r"5h █+░+  43% used · resets in 4h16m .*5h █+░+   5% used · resets in 5h")
        self.assertRegex(screen[row + 2], r"7d █+░+  30% used · resets in 5d3h .*7d ·+   -- no data")
        self.assertIn("cache: 93% hit · 2.2M read · ✎120k rebuilt (1 cold)", screen[row + 3])
        self.assertIn("cache: 77% hit · 520k read · ✎150k rebuilt (1 cold)", screen[row + 3])
        self.assertIn("tokens: ↑42k in · ↓46k out · 84 requests", screen[row + 4])
        self.assertIn("tokens: ↑2k in · ↓12k out · 7 requests", screen[row + 4])
        self.assertIn(CAROL, "\n".join(screen[row + 5 :]))

    def test_error_and_throttled_cards(self) -> None:
        """
        An account in error shows its message; a throttled one counts down
        to the end of its throttle.
        """
        self.make_app(
            make_snapshot(
                [
                    account(ALICE, status="error", error="401 from upstream: log in again"),
                    account(BOB, status="throttled", throttled_until=NOW + 90),
                ]
            )
        )
        self.assertIn("error: 401 from upstream: log in again", self.text(SMALL))
        self.assertIn("error: 401 from upstream: log in again", self.text(LARGE))
        self.assertIn("throttled 1m", self.line_with(f"{BOB}  Pro"))

    def test_real_snapshot(self) -> None:
        """
        A snapshot built by nextclaude.status from a real router and pool
        (quota from real rate-limit headers, usage recorded) renders: the
        schema the console reads is the one the proxy sends.
        """
        pool = make_pool(ALICE, BOB)
        alice = pool.get(ALICE)
        assert alice is not None
        alice.observe_quota(
            parse_rate_limit_headers(
                subscription_headers(0.43, 0.30, five_reset=NOW + 2 * HOUR, seven_reset=NOW + 3 * DAY), NOW
            ),
            NOW,
        )
        alice.usage.record(Usage(input_tokens=100, output_tokens=50, cache_read_input_tokens=900), True)
        router = Router(pool, lambda: NOW, EventHub())
        router.pin(ALICE)
        self.assertIs(router.status_of(alice), Status.ACTIVE)
        snapshot = status_snapshot(router, NOW, NOW - 60, "127.0.0.1", 3456)
        self.make_app(json.loads(json.dumps(snapshot)))
        text = self.text(SMALL)
        self.assertIn("★ manual", self.line_with(f"> {ALICE}"))
        self.assertRegex(text, r"5h █+░+  43% \(2h\)")
        self.assertRegex(text, r"7d █+░+  30% \(3d\)")
        self.assertIn("hit 90%", self.line_with("✎0 (0 cold)"))
        self.assertIn("2 accounts", text)


class ActivityTests(ConsoleHarness):
    def test_request_rows_aligned_80x24(self) -> None:
        """
        Every finished request is one row: time, status, duration, account,
        model family, hit, miss, ✎, ↓out, hit-rate %, routing reason, each
        column starting where its title starts; a side request (here
        count_tokens and a Haiku title) shows side:KIND where the reason goes,
        which explains its small figures.
        """
        self.make_app()
        self.client.emit(finished(NOW - 40))
        self.client.emit(
            finished(NOW - 30, BOB, duration=14.2, reason="moved-after-compaction", read=0, created=52_000, fresh=300, out=900, model="claude-opus-4-1")
        )
        self.client.emit(finished(NOW - 20, read=0, created=0, fresh=0, out=0, side_kind="count"))
        self.client.emit(finished(NOW - 15, read=0, created=0, fresh=180, out=12, model="claude-haiku-4-5-20251001", side_kind="title"))
        self.client.emit(finished(NOW - 10, None, status=429, duration=0.01, reason="exhausted", usage=False, model=None))
        screen = self.screen(SMALL)
        title = self.line_with("reason")
        self.assertRegex(title, r"^time +st +dur account +model +hit +miss +✎ +↓out hit% reason")
        rows = [line for line in screen if line[:8] in {hhmmss(NOW - t) for t in (40, 30, 20, 15, 10)}]
        self.assertEqual(len(rows), 5)
        first, second, count, named, last = rows
        self.assertEqual(first[:12], f"{hhmmss(NOW - 40)} 200")
        self.assertRegex(first, r"200  2\.3s alice….com sonnet +45k +920 +800 +1\.1k +98% affinity")
        self.assertRegex(second, r"200   14s bob@e….com opus +0 +52\.3k +52k +900 +0% moved:com")
        self.assertRegex(count, r"200  2\.3s alice….com sonnet +0 +0 +0 +0 +-- side:count")
        self.assertRegex(named, r"200  2\.3s alice….com haiku +0 +180 +0 +12 +0% side:title")
        self.assertRegex(last, r"429  0\.0s - +- +- +- +- +- +- exhausted")
        for row in rows:
            self.assertLessEqual(views.width_of(row.rstrip()), 80)
        for column in ("model", "hit%", "reason"):
            end = title.index(column) + len(column) if column == "hit%" else title.index(column)
            for row in (first, second, count, named):
                if column == "hit%":
                    # "--" when nothing was read or processed.
                    self.assertIn(row[end - 1], "%-")
                else:
                    self.assertNotEqual(row[end], " ")
                    self.assertEqual(row[end - 1], " ")

    def test_request_rows_160x48(self) -> None:
        """
        A wide terminal adds the ↑in column and the request path, and shows
        full account names, the model family and reasons; a side request's
        side:KIND tag sits in the reason column.
        """
        self.make_app()
        self.client.emit(finished(NOW - 20, BOB, reason="moved-after-compaction", read=0, created=52_000, fresh=300))
        self.client.emit(finished(NOW - 10, BOB, read=0, created=0, fresh=9, out=1, model="claude-haiku-4-5", side_kind="quota"))
        title = self.line_with("reason", LARGE)
        self.assertRegex(title, r"account +model +↑in +hit +miss +✎ +↓out hit% reason +path")
        row = self.line_with(hhmmss(NOW - 20), LARGE)
        self.assertRegex(row, r"bob@example\.com +sonnet +300 +0 +52\.3k +52k +1\.1k +0% moved-after-compaction +POST /v1/messages")
        self.assertEqual(row.index("moved"), title.index("reason"))
        self.assertEqual(row.index("sonnet"), title.index("model"))
        side = self.line_with(hhmmss(NOW - 10), LARGE)
        self.assertRegex(side, r"bob@example\.com +haiku +9 +0 +9 +0 +1 +0% side:quota +POST /v1/messages")
        self.assertEqual(side.index("side:quota"), title.index("reason"))
        self.assertEqual(side.index("haiku"), title.index("model"))

    def test_row_colours(self) -> None:
        """
        Rows are colour-coded: 2xx green, 429 yellow, other errors red; a
        cold rebuild's ✎ stands out; the hit rate is green when high and
        red when low; moves and retries colour the reason.
        """
        columns = views.LogColumns.for_width(80, [ALICE])

        def attr_of(row: views.Line, text: str) -> str | None:
            for attr, segment in row:
                if text in segment:
                    return attr
            self.fail(f"{text!r} not in {row!r}")

        warm = views.request_row(finished(NOW), columns, time.gmtime)
        self.assertEqual(attr_of(warm, "200"), p.OK)
        self.assertEqual(attr_of(warm, "98%"), p.OK)
        self.assertEqual(attr_of(warm, "affinity"), p.REASON)
        cold = views.request_row(finished(NOW, read=0, created=52_000, reason="ceiling"), columns, time.gmtime)
        self.assertEqual(attr_of(cold, "52k"), p.COLD)
        self.assertEqual(attr_of(cold, "0%"), p.BAD)
        self.assertEqual(attr_of(cold, "ceiling"), p.REASON_MOVE)
        small = views.request_row(finished(NOW, read=0, created=900, reason="quota-429"), columns, time.gmtime)
        self.assertEqual(attr_of(small, "900"), p.TEXT)
        self.assertEqual(attr_of(small, "quota-429"), p.REASON_RETRY)
        self.assertEqual(attr_of(views.request_row(finished(NOW, status=429), columns), "429"), p.WARN)
        self.assertEqual(attr_of(views.request_row(finished(NOW, status=403), columns), "403"), p.BAD)

    def test_routing_event_rows(self) -> None:
        """
        Routing events get their own rows: armed (draining, under
        placement, where the event says so), switched, compaction
        detected, probe, pin and unpin, throttled, recovered, exhausted and
        account errors; request started/routed add no row.
        """
        self.make_app()
        session = "s:0b6e4a52-6f0e-4e38-9d7a-0c1b7f3f6a21"
        for event in [
            {"kind": events.REQUEST_STARTED, "time": NOW - 60, "id": 1, "session": session},
            {"kind": events.REQUEST_ROUTED, "time": NOW - 60, "id": 1, "account": ALICE, "reason": "primary"},
            {"kind": events.ARMED, "time": NOW - 50, "account": ALICE, "successor": BOB},
            {"kind": events.ARMED, "time": NOW - 48, "account": BOB, "successor": CAROL, "status": "draining"},
            {"kind": events.COMPACTION, "time": NOW - 45, "account": ALICE, "session": session},
            {
                "kind": events.SWITCHED,
                "time": NOW - 40,
                "account": BOB,
                "previous": ALICE,
                "reason": "moved-after-compaction",
                "session": session,
            },
            {"kind": events.PROBE, "time": NOW - 35, "account": CAROL},
            {"kind": events.PIN_CHANGED, "time": NOW - 30, "account": BOB},
            {"kind": events.PIN_CHANGED, "time": NOW - 25, "account": None},
            {"kind": events.THROTTLED, "time": NOW - 20, "account": ALICE, "until": NOW + 10},
            {"kind": events.RECOVERED, "time": NOW - 15, "account": CAROL},
            {"kind": events.EXHAUSTED, "time": NOW - 10, "account": BOB, "reset": NOW + 2 * HOUR - 10},
            {"kind": events.ACCOUNT_ERROR, "time": NOW - 5, "account": ALICE, "message": "token revoked"},
        ]:
            self.client.emit(event)
        text = self.text(LARGE)
        for expected in [
            f"{hhmmss(NOW - 50)} ◆ armed {ALICE}, successor {BOB}",
            f"{hhmmss(NOW - 48)} ◆ draining {BOB} → {CAROL}",
            f"{hhmmss(NOW - 45)} ◇ compaction detected s:0b6e4a52-… on {ALICE}",
            f"{hhmmss(NOW - 40)} ⇄ switched s:0b6e4a52-… {ALICE} → {BOB} (moved-after-compaction)",
            f"{hhmmss(NOW - 35)} ? probe {CAROL}",
            f"{hhmmss(NOW - 30)} ★ pinned {BOB}",
            f"{hhmmss(NOW - 25)} ☆ pin cleared",
            f"{hhmmss(NOW - 20)} ~ throttled {ALICE} for 30s",
            f"{hhmmss(NOW - 15)} ✓ recovered {CAROL}",
            f"{hhmmss(NOW - 10)} ✗ exhausted {BOB}, resets in 2h",
            f"{hhmmss(NOW - 5)} ! error {ALICE}: token revoked",
        ]:
            self.assertIn(expected, text)
        self.assertNotIn(hhmmss(NOW - 60), text)

    def test_log_keeps_the_newest(self) -> None:
        """
        With more rows than room the log shows the newest at the bottom,
        oldest first, directly under its column titles.
        """
        self.make_app()
        for second in range(100):
            self.client.emit(finished(NOW - 100 + second))
        screen = self.screen(SMALL)
        title = next(i for i, line in enumerate(screen) if line.startswith("time "))
        rows = screen[title + 1 : -1]
        self.assertEqual(rows[-1][:8], hhmmss(NOW - 1))
        self.assertEqual([row[:8] for row in rows], [hhmmss(NOW - len(rows) + i) for i in range(len(rows))])


class KeyTests(ConsoleHarness):
    def test_s_opens_the_account_menu(self) -> None:
        """
        s opens a menu of the accounts with ★ on the pinned one and the
        footer switches to the menu's keys.
        """
        self.make_app()
        self.press("s")
        text = self.text()
        self.assertIn("Pin an account", text)
        self.assertIn(f"▸   {ALICE}", text)
        self.assertIn(f"★ {BOB}", text)
        self.assertIn("Choose ★", text)
        self.assertIn(f"{BOB} again to unpin it", text)
        self.assertIn("Esc cancel", self.screen()[-1])

    def test_j_k_enter_pins(self) -> None:
        """
        j and k (and the arrows) move through the menu; Enter pins the
        chosen account through the client and closes the menu.
        """
        self.make_app()
        self.press("s", "j", "j", "k", "down", "enter")
        self.assertEqual(self.client.calls, [("pin", CAROL)])
        self.assertNotIn("Pin an account", self.text())
        self.assertIn(f"pinned {CAROL}", self.screen()[-1])

        self.press("s", "down", "up", "enter")
        self.assertEqual(self.client.calls[-1], ("pin", ALICE))

    def test_s_on_the_pinned_account_unpins(self) -> None:
        """
        Choosing the account that is already pinned clears the pin.
        """
        self.make_app()
        self.press("s", "j", "enter")
        self.assertEqual(self.client.calls, [("pin", None)])
        self.assertIn(f"unpinned {BOB}", self.screen()[-1])

    def test_esc_cancels(self) -> None:
        """
        Esc closes a menu without calling the client, and keys meant for the
        dashboard do nothing while a menu is open.
        """
        self.make_app()
        self.press("s", "R", "q", "esc")
        self.assertNotIn("Pin an account", self.text())
        self.assertEqual(self.client.calls, [])
        self.assertFalse(self.app.done.called)
        self.assertIn("s pin", self.screen()[-1])

    def test_remove_asks_first(self) -> None:
        """
        r opens the account menu, then a confirmation whose default is the
        safe answer: Enter right after the question keeps the account, n or
        Esc too; only y, or moving up to "Remove X" and Enter, removes it.
        """
        self.make_app()
        self.press("r", "j", "enter")
        self.assertIn(f"Remove {BOB}? Its credentials are deleted", self.text())
        self.assertEqual(self.client.calls, [])
        self.press("n")
        self.assertEqual(self.client.calls, [])
        self.assertNotIn("Remove account", self.text())

        self.press("r", "j", "enter", "esc")
        self.assertEqual(self.client.calls, [])

        self.press("r", "j", "j", "enter", "enter")
        self.assertEqual(self.client.calls, [])
        self.assertNotIn("Remove account", self.text())

        self.press("r", "j", "j", "enter", "k", "enter")
        self.assertEqual(self.client.calls, [("remove", CAROL)])
        self.assertIn(f"removed {CAROL}", self.screen()[-1])

        self.press("r", "enter", "y")
        self.assertEqual(self.client.calls[-1], ("remove", ALICE))

    def test_reload(self) -> None:
        """
        R asks the proxy to reload its configuration and says when done.
        """
        self.make_app()
        self.press("R")
        self.assertEqual(self.client.calls, [("reload",)])
        self.assertIn("configuration reloaded", self.screen()[-1])

    def test_failures_show_in_the_footer(self) -> None:
        """
        A client call that fails shows its error in the footer (nothing is
        printed), and the message goes away after a few seconds.
        """
        self.make_app()
        self.client.answer = lambda: fail(KeyError("no account named 'x'"))
        self.press("R")
        self.assertIn("reloading failed: \"no account named 'x'\"", self.screen()[-1])
        self.clock.advance(10)
        self.assertNotIn("failed", self.screen()[-1])

    def test_q_detaches(self) -> None:
        """
        q on a console attached to a proxy running elsewhere detaches at
        once: the proxy is not stopped.
        """
        self.make_app()
        self.press("q")
        self.assertEqual(self.successResultOf(self.app.done), Outcome.DETACHED)
        self.assertEqual(self.stops, [])

    def test_q_asks_before_stopping_an_owned_proxy(self) -> None:
        """
        q on the console of `nextclaude server` asks first, with "Cancel"
        chosen: Esc or Enter keep everything running; q again (or y) stops
        the proxy, and the console ends once the proxy has stopped.
        """
        self.make_app(owns_proxy=True)
        self.assertIn("quit+stop proxy", self.screen()[-1])
        self.press("q")
        self.assertIn("Stop the proxy and quit", self.text())
        self.assertIn("▸ Cancel", self.text())
        self.press("esc")
        self.assertNoResult(self.app.done)
        self.assertEqual(self.stops, [])
        self.press("q", "enter")
        self.assertNoResult(self.app.done)
        self.assertNotIn("Stop the proxy and quit", self.text())
        self.clock.advance(0)
        self.assertEqual(self.stops, [])

        self.press("q", "q")
        self.clock.advance(0)
        self.assertEqual(len(self.stops), 1)
        self.assertIn("stopping the proxy", self.screen()[-1])
        self.press("q", "s")
        self.assertNotIn("Pin an account", self.text())
        self.client.on_disconnect.callback(None)
        self.assertNoResult(self.app.done)
        self.stops[0].callback(None)
        self.assertEqual(self.successResultOf(self.app.done), Outcome.STOPPED)

    def test_add_api_key(self) -> None:
        """
        a opens the form; a typed API key and name are added through the
        client; without a name the key's last four characters name it.
        """
        self.make_app()
        self.press("a")
        self.assertIn("Add an account", self.text())
        self.press(*"sk-ant-api03-abcd1234")
        self.assertIn("recognised: API key (21 characters, ends …1234)", self.text())
        self.assertNotIn("abcd1234", self.text())
        self.press("tab", *"work", "enter")
        self.assertEqual(self.client.calls, [("add_api_key", "work", "sk-ant-api03-abcd1234")])
        self.assertNotIn("Add an account", self.text())

        self.press("a", *"sk-ant-api03-zzzz9876", "enter")
        self.assertEqual(self.client.calls[-1], ("add_api_key", "api-key-9876", "sk-ant-api03-zzzz9876"))
        self.assertEqual(default_api_key_name("sk-xyz1"), "api-key-xyz1")

    def test_add_pasted_credentials(self) -> None:
        """
        Claude Code's credentials JSON pasted in one go (bracketed paste,
        newlines inside) is imported, not submitted at its first newline.
        """
        self.make_app()
        credentials = '{"claudeAiOauth":\n{"accessToken":"sk-ant-oat01-x","refreshToken":"r"}}'
        keys = ["enter" if char == "\n" else char for char in credentials]
        self.press("a", "begin paste", *keys, "end paste")
        self.assertEqual(self.client.calls, [])
        self.assertIn("recognised: Claude Code credentials JSON", self.text())
        self.press("enter")
        self.assertEqual(len(self.client.calls), 1)
        kind, text, name = self.client.calls[0]
        self.assertEqual((kind, name), ("import_credentials", None))
        self.assertEqual(json.loads(text), json.loads(credentials))

    def test_add_refuses_nonsense(self) -> None:
        """
        Enter on an empty or malformed entry keeps the form open with the
        problem shown; Esc leaves without adding.
        """
        self.make_app()
        self.press("a", "enter")
        self.assertIn("paste an API key", self.text())
        self.press(*"{not json", "enter")
        self.assertIn("not valid JSON yet", self.text())
        self.press("esc")
        self.assertNotIn("Add an account", self.text())
        self.assertEqual(self.client.calls, [])
        self.assertEqual(classify_secret("two words")[0], None)

    def test_proxy_going_away(self) -> None:
        """
        When the proxy goes away the console ends with DISCONNECTED.
        """
        self.make_app()
        self.client.on_disconnect.callback(None)
        self.assertEqual(self.successResultOf(self.app.done), Outcome.DISCONNECTED)


class TimerTests(ConsoleHarness):
    def test_countdown_ticks(self) -> None:
        """
        Reset countdowns follow the clock between snapshots: a minute later
        the card says a minute less.
        """
        self.make_app()
        self.assertIn("(4h16m)", self.line_with(ALICE + "  ", SMALL) + self.text())
        self.clock.advance(60)
        text = self.text()
        self.assertIn("43% (4h15m)", text)
        self.assertNotIn("(4h16m)", text)
        self.assertIn("up 3h13m", text)

    def test_countdown_ticks_without_snapshots(self) -> None:
        """
        Countdowns move on from the clock alone when no new snapshot comes,
        and a tick never asks for a second snapshot while one is on its way.
        """
        self.make_app()
        asked = self.client.snapshots
        self.client.pending_snapshot = Deferred()
        self.clock.pump([1.0] * 60)
        self.assertEqual(self.client.snapshots, asked + 1)
        self.assertIn("43% (4h15m)", self.text())

    def test_ticks_redraw_once_a_second(self) -> None:
        """
        Each second's tick leads to one redraw, so countdowns move on screen.
        """
        self.make_app()
        self.clock.advance(0.3)
        before = len(self.draws)
        # Five ticks (1 s to 5 s) and their redraws a quarter second later.
        self.clock.pump([0.05] * 106)
        self.assertEqual(len(self.draws) - before, 5)

    def test_routing_events_refresh_the_snapshot(self) -> None:
        """
        A routing event (here a pin change) fetches a fresh snapshot at once,
        so the cards show it; request events wait for the next tick.
        """
        self.make_app()
        asked = self.client.snapshots
        self.client.emit(finished(NOW))
        self.assertEqual(self.client.snapshots, asked)
        self.client.state = make_snapshot([account(ALICE, flags=("primary", "manual")), account(BOB, tier="Max")])
        self.client.emit({"kind": events.PIN_CHANGED, "time": NOW, "account": ALICE})
        self.assertEqual(self.client.snapshots, asked + 1)
        self.assertIn("★ manual", self.line_with(f"> {ALICE}"))

    def test_redraws_are_batched(self) -> None:
        """
        A burst of events within a quarter of a second causes one redraw, a
        quarter of a second after the first; a later event another one.
        """
        self.make_app()
        self.clock.advance(0.5)
        self.draws.clear()
        start = self.clock.seconds()
        for index in range(100):
            self.client.emit(finished(NOW + start, reason=f"r{index}"))
            self.clock.advance(0.002)
        self.assertEqual(self.draws, [])
        self.clock.advance(0.25 - 0.2)
        self.assertEqual(len(self.draws), 1)
        self.assertAlmostEqual(self.draws[0], start + 0.25)
        self.clock.advance(0.1)
        self.client.emit(finished(NOW + self.clock.seconds()))
        self.clock.advance(0.25)
        self.assertEqual(len(self.draws), 2)

    def test_redrawer_survives_a_failing_draw(self) -> None:
        """
        A draw that raises is logged, and the next mark draws again.
        """
        clock = Clock()
        calls: list[int] = []

        def draw() -> None:
            calls.append(1)
            raise RuntimeError("boom")

        redraw = Redrawer(clock, draw)
        redraw.mark()
        clock.advance(0.25)
        redraw.mark()
        clock.advance(0.25)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class LayoutTests(SynchronousTestCase):
    def test_every_size_fills_the_screen(self) -> None:
        """
        From tiny to huge terminals the dashboard is exactly as tall as the
        screen and no line is wider.
        """
        model = views.Model(clock=lambda: 0.0, localtime=time.gmtime)
        model.take_snapshot(make_snapshot())
        for index in range(40):
            model.add_event(finished(NOW - index))
        model.keys = list(keymap.DASHBOARD_HELP)
        for cols, rows in [(20, 3), (40, 10), (80, 24), (100, 30), (160, 48), (250, 70)]:
            lines = screen_lines(model, cols, rows)
            self.assertEqual(len(lines), rows, (cols, rows))
            for line in lines:
                self.assertLessEqual(views.line_width(line), cols, (cols, rows, views.line_text(line)))

    def test_bars(self) -> None:
        """
        A bar is as wide as asked, filled in proportion (never empty when
        its figure is 1% or more, never filled when it is 0%), coloured by closeness to the switch threshold, dotted when the
        quota is unknown.
        """
        self.assertEqual(views.line_text(views.bar(0.5, 10)), "█" * 5 + "░" * 5)
        self.assertEqual(views.line_text(views.bar(0.01, 10)), "█" + "░" * 9)
        # "0%" beside the bar: no filled cell either.
        self.assertEqual(views.line_text(views.bar(0.004, 10)), "░" * 10)
        self.assertEqual(views.line_text(views.bar(0.0, 10)), "░" * 10)
        self.assertEqual(views.line_text(views.bar(None, 4)), "····")
        self.assertEqual(views.bar(0.5, 10)[0][0], p.BAR_OK)
        self.assertEqual(views.bar(0.9, 10)[0][0], p.BAR_WARN)
        self.assertEqual(views.bar(0.98, 10)[0][0], p.BAR_BAD)
        self.assertEqual(views.line_text(views.bar(1.5, 4)), "████")

    def test_names_keep_both_ends(self) -> None:
        """
        Too-long account names lose their middle.
        """
        self.assertEqual(views.fit_name("alice@example.com", 14), "alice@e…le.com")
        self.assertEqual(views.fit_name("bob", 6), "bob   ")

    def test_palette_names_every_attribute(self) -> None:
        """
        Every attribute the formatting uses is in the palette.
        """
        model = views.Model(clock=lambda: 0.0, localtime=time.gmtime)
        model.take_snapshot(make_snapshot())
        model.add_event(finished(NOW))
        model.message = (p.MESSAGE_ERROR, "x")
        used = {
            attr
            for cols, rows in [(80, 24), (160, 48)]
            for line in screen_lines(model, cols, rows)
            for attr, _ in line
            if attr is not None
        }
        self.assertTrue(used)
        self.assertLessEqual(used, p.NAMES)


class FakeScreen(urwid.display.common.BaseScreen):
    """
    A terminal stand-in: draws are recorded, input is fed by the test.
    """

    def __init__(self, size: tuple[int, int] = SMALL) -> None:
        super().__init__()
        self.size = size
        self.frames: list[list[str]] = []
        self.callback: Callable[[list[str], list[int]], Any] | None = None

    def get_cols_rows(self) -> tuple[int, int]:
        return self.size

    def draw_screen(self, size: tuple[int, int], canvas: urwid.Canvas) -> None:
        self.frames.append(list(canvas.decoded_text))

    def hook_event_loop(self, event_loop: Any, callback: Callable[[list[str], list[int]], Any]) -> None:
        self.callback = callback

    def unhook_event_loop(self, event_loop: Any) -> None:
        self.callback = None

    def type(self, *keys: str) -> None:
        assert self.callback is not None
        self.callback(list(keys), [])


class TriggerReactor(MemoryReactorClock):
    """
    MemoryReactorClock with system event triggers that can be removed and
    fired.
    """

    def __init__(self) -> None:
        super().__init__()
        self._triggers: dict[int, tuple[str, str, Callable[[], Any]]] = {}

    def addSystemEventTrigger(  # type: ignore[override]
        self, phase: str, event: str, call: Callable[..., Any], *args: Any, **kw: Any
    ) -> int:
        handle = len(self._triggers) + 1
        self._triggers[handle] = (phase, event, lambda: call(*args, **kw))
        return handle

    def removeSystemEventTrigger(self, handle: int) -> None:
        del self._triggers[handle]

    def fire(self, phase: str, event: str) -> None:
        for when, what, call in list(self._triggers.values()):
            if (when, what) == (phase, event):
                call()


class RunConsoleTests(SynchronousTestCase):
    def start(self, owns_proxy: bool = False, stop_proxy: Any = None) -> Deferred[Outcome]:
        self.reactor = TriggerReactor()
        self.client = FakeClient(self.reactor, make_snapshot())
        self.screen = FakeScreen()
        done = Deferred.fromCoroutine(
            run_console(self.reactor, self.client, owns_proxy=owns_proxy, stop_proxy=stop_proxy, screen=self.screen)
        )
        self.reactor.advance(0.3)
        return done

    def test_quit_gives_the_terminal_back(self) -> None:
        """
        run_console draws the dashboard on the screen through urwid's
        Twisted event loop; q detaches, stops the screen and removes the
        shutdown trigger.
        """
        done = self.start()
        self.assertTrue(self.screen.started)
        self.assertIn("3 accounts", "\n".join(self.screen.frames[-1]))
        self.screen.type("s")
        self.reactor.advance(0.3)
        self.assertIn("Pin an account", "\n".join(self.screen.frames[-1]))
        self.screen.type("esc", "q")
        self.assertEqual(self.successResultOf(done), Outcome.DETACHED)
        self.assertFalse(self.screen.started)
        self.assertEqual(self.reactor._triggers, {})
        self.assertEqual([call for call in self.reactor.getDelayedCalls() if call.active() and call.getTime() > 1], [])

    def test_owned_proxy_is_stopped(self) -> None:
        """
        On the console of `nextclaude server`, q then y calls stop_proxy (an
        async function is fine), and the console ends after it.
        """
        stopped: list[bool] = []

        async def stop_proxy() -> None:
            stopped.append(True)

        done = self.start(owns_proxy=True, stop_proxy=stop_proxy)
        self.screen.type("q")
        self.assertNoResult(done)
        self.screen.type("y")
        self.reactor.advance(0)
        self.assertEqual(stopped, [True])
        self.assertEqual(self.successResultOf(done), Outcome.STOPPED)
        self.assertFalse(self.screen.started)

    def test_reactor_shutdown_restores_the_terminal(self) -> None:
        """
        When the reactor shuts down under the console (SIGINT, SIGTERM) the
        screen is stopped before the shutdown goes on.
        """
        done = self.start()
        self.reactor.fire("before", "shutdown")
        self.assertFalse(self.screen.started)
        self.assertEqual(self.successResultOf(done), Outcome.INTERRUPTED)

    def test_disconnect_ends_the_console(self) -> None:
        """
        The proxy going away ends the console with DISCONNECTED and the
        terminal restored.
        """
        done = self.start()
        self.client.on_disconnect.callback(None)
        self.assertEqual(self.successResultOf(done), Outcome.DISCONNECTED)
        self.assertFalse(self.screen.started)


class LogRouterTests(SynchronousTestCase):
    def test_diverted_to_a_file(self) -> None:
        """
        While diverted, Twisted log events and standard-library log records
        go to the file and nothing reaches the usual target; afterwards both
        are as before.
        """
        seen: list[Mapping[str, Any]] = []
        router = LogRouter(seen.append)
        publisher = LogPublisher(router)
        log = Logger(observer=publisher, namespace="test")
        path = self.mktemp()
        root = logging.getLogger()
        handlers = root.handlers[:]
        with router.diverted(path):
            log.info("hidden {n}", n=1)
            logging.getLogger("urwid").error("loop trouble")
        log.info("shown")
        self.assertEqual([event["log_format"] for event in seen], ["shown"])
        self.assertEqual(root.handlers, handlers)
        with open(path, encoding="utf-8") as written:
            text = written.read()
        self.assertIn("hidden 1", text)
        self.assertIn("loop trouble", text)

    def test_diverted_nowhere(self) -> None:
        """
        Without a path the logs are dropped while diverted (nothing falls
        through to stderr).
        """
        seen: list[Mapping[str, Any]] = []
        router = LogRouter(seen.append)
        stderr = io.StringIO()
        root = logging.getLogger()
        fallback = logging.lastResort
        logging.lastResort = logging.StreamHandler(stderr)
        self.addCleanup(setattr, logging, "lastResort", fallback)
        with router.diverted(None):
            router({"log_format": "dropped"})
            logging.getLogger("nextclaude.test").warning("dropped too")
        self.assertEqual(seen, [])
        self.assertEqual(stderr.getvalue(), "")
        self.assertIsNot(root.handlers, None)


# -- themes (issue 15, item 13) --------------------------------------------------


def _rgb(index: int) -> tuple[int, int, int]:
    """
    The colour xterm shows for a 256-colour index.
    """
    if index < 16:
        base = [
            (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
            (192, 192, 192), (128, 128, 128), (255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255),
            (255, 0, 255), (0, 255, 255), (255, 255, 255),
        ]  # fmt: skip
        return base[index]
    if index < 232:
        levels = [0, 95, 135, 175, 215, 255]
        index -= 16
        return (levels[index // 36], levels[index // 6 % 6], levels[index % 6])
    grey = 8 + 10 * (index - 232)
    return (grey, grey, grey)


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """
    WCAG's contrast ratio of two colours (1 to 21).
    """

    def luminance(colour: tuple[int, int, int]) -> float:
        def channel(value: int) -> float:
            v = value / 255
            return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

        r, g, b = map(channel, colour)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    high, low = sorted([luminance(a), luminance(b)], reverse=True)
    return (high + 0.05) / (low + 0.05)


WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


class ThemeTests(SynchronousTestCase):
    """
    Each theme rendered by urwid's real terminal screen (256 colours) at
    80x24, with the escape sequences it writes read back.
    """

    def draw(self, theme: str, dialog: bool = False) -> str:
        import re

        model = views.Model(clock=lambda: 0.0, localtime=time.gmtime)
        model.take_snapshot(make_snapshot())
        for index in range(12):
            model.add_event(finished(NOW + index, reason="moved-after-compaction" if index % 3 else "affinity"))
        model.message = (p.MESSAGE, "pinned bob")
        out = io.StringIO()
        screen = urwid.display.raw.Screen(input=io.StringIO(), output=out)
        screen.set_terminal_properties(colors=256)
        screen.register_palette(p.palette(theme))
        screen._started = True  # draw without taking a real terminal
        screen.draw_screen(SMALL, Dashboard(model).render(SMALL))
        self.assertIn("bob@example.com", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()))
        return out.getvalue()

    def foregrounds_on_default(self, output: str) -> set[int]:
        """
        The 256-colour foregrounds of text drawn on the terminal's own
        background (SGR 49).
        """
        import re

        found = set()
        for code in re.findall(r"\x1b\[([0-9;]*)m", output):
            colour = re.search(r"38;5;(\d+)", code)
            if colour and code.endswith(";49"):
                found.add(int(colour.group(1)))
        return found

    def test_every_theme_has_every_attribute(self) -> None:
        """
        auto, light, dark and mono each define every attribute the console
        uses, and the config's theme names are the palette's.
        """
        from nextclaude.config import THEMES

        self.assertEqual(THEMES, p.THEMES)
        for theme in p.THEMES:
            self.assertEqual({entry[0] for entry in p.palette(theme)}, p.NAMES, theme)
        self.assertRaises(ValueError, p.palette, "pink")

    def test_default_reads_on_light_and_dark(self) -> None:
        """
        The default theme draws text on the terminal's background either
        in the terminal's own colour or in a mid-tone that keeps a contrast
        of at least 2.5:1 against both white and black: nothing in white or
        yellow that vanishes on a light terminal.
        """
        colours = self.foregrounds_on_default(self.draw(p.AUTO))
        self.assertTrue(colours)
        for index in colours:
            self.assertGreaterEqual(_contrast(_rgb(index), WHITE), 2.5, index)
            self.assertGreaterEqual(_contrast(_rgb(index), BLACK), 2.5, index)

    def test_light_theme_reads_on_white(self) -> None:
        """
        The light theme's text on the terminal's background keeps at least
        2.5:1 against white (names are black, accents dark).
        """
        colours = self.foregrounds_on_default(self.draw(p.LIGHT))
        self.assertTrue(colours)
        for index in colours:
            self.assertGreaterEqual(_contrast(_rgb(index), WHITE), 2.5, index)

    def test_dark_theme_reads_on_black(self) -> None:
        """
        The dark theme's text on the terminal's background keeps at least
        2.5:1 against black.
        """
        colours = self.foregrounds_on_default(self.draw(p.DARK))
        self.assertTrue(colours)
        for index in colours:
            self.assertGreaterEqual(_contrast(_rgb(index), BLACK), 2.5, index)

    def test_mono_has_no_colour(self) -> None:
        """
        The mono theme writes no colour at all (only the terminal's own
        colours, bold and reverse video), so the title bar and footer
        still stand out.
        """
        import re

        output = self.draw(p.MONO)
        for code in re.findall(r"\x1b\[([0-9;]*)m", output):
            parts = code.split(";")
            self.assertNotIn("38", parts, code)
            self.assertNotIn("48", parts, code)
            self.assertFalse([part for part in parts if part[:1] in "34" and len(part) == 2 and part not in ("39", "49")], code)
        self.assertIn("7", {part for code in re.findall(r"\x1b\[([0-9;]*)m", output) for part in code.split(";")})

    def test_choosing_a_theme(self) -> None:
        """
        --theme wins; without it NO_COLOR (any non-empty value) means mono;
        else the config's console.theme; else auto.
        """
        self.assertEqual(p.choose_theme("dark", "light", {"NO_COLOR": "1"}), "dark")
        self.assertEqual(p.choose_theme(None, "light", {"NO_COLOR": "1"}), "mono")
        self.assertEqual(p.choose_theme(None, "light", {"NO_COLOR": ""}), "light")
        self.assertEqual(p.choose_theme(None, None, {}), "auto")

    def test_theme_flag_and_config_field(self) -> None:
        """
        server, console and demo take --theme light|dark|mono|auto; the
        config file's console.theme is read and checked by name.
        """
        from pathlib import Path

        from nextclaude.cli import build_parser
        from nextclaude.config import ConfigError, parse_config

        parser = build_parser()
        for command in ("server", "console", "demo"):
            self.assertEqual(parser.parse_args([command, "--theme", "light"]).theme, "light")
            self.assertIsNone(parser.parse_args([command]).theme)
        path = Path("/nonexistent/config.json")
        self.assertEqual(parse_config({"console": {"theme": "mono"}}, path).console.theme, "mono")
        self.assertEqual(parse_config({}, path).console.theme, "auto")
        with self.assertRaises(ConfigError) as caught:
            parse_config({"console": {"theme": "pink"}}, path)
        self.assertIn("console.theme must be one of", str(caught.exception))

    def test_run_console_uses_the_theme(self) -> None:
        """
        run_console registers the chosen theme's palette on its screen.
        """
        reactor = TriggerReactor()
        client = FakeClient(reactor, make_snapshot())
        screen = FakeScreen()
        registered: list[Any] = []
        original = screen.register_palette

        def register(palette: Any) -> None:
            registered.append(list(palette))
            original(palette)

        screen.register_palette = register  # type: ignore[method-assign]
        done = Deferred.fromCoroutine(run_console(reactor, client, owns_proxy=False, screen=screen, theme=p.LIGHT))
        reactor.advance(0.3)
        screen.type("q")
        self.successResultOf(done)
        self.assertEqual(registered, [p.palette(p.LIGHT)])


class WrappingTests(ConsoleHarness):
    """
    Issue 15, item 14: messages wrap at 80 columns instead of being cut,
    so the fix at their end stays readable.
    """

    FIX = "run `nextclaude login --name alice@example.com` (or `nextclaude import --name alice@example.com`) again"

    def test_problems_wrap(self) -> None:
        """
        A problem longer than the screen is wrapped under a "! " with a
        hanging indent, its last words on screen; when problems outgrow a
        quarter of the screen, the rest are counted.
        """
        long = "/home/me/.config/nextclaude/config.json: accounts[0].expiresAt must be epoch milliseconds, not 5; " \
            "the change was not loaded and the 3 running account(s) stay as they were until the file is fixed"
        problems = [{"account": None, "kind": "config-refused", "message": long, "since": NOW}]
        self.make_app(make_snapshot(problems=problems))
        text = self.text()
        self.assertIn("! /home/me/.config/nextclaude/config.json: accounts[0].expiresAt must be", text)
        self.assertIn("until the file is fixed", text)
        self.assertNotIn("…", "\n".join(line for line in self.screen() if "config.json" in line))

        many = [dict(problems[0], account=f"a{i}", kind="usage-unreachable") for i in range(5)]
        self.make_app(make_snapshot(problems=many))
        lines = self.screen()
        self.assertIn("more problems: see `nextclaude status`", "\n".join(lines))
        problem_rows = [line for line in lines if line.startswith("! ") or "milliseconds" in line or "stay as they" in line]
        self.assertLessEqual(len(problem_rows), 24 // 4)

    def test_card_error_wraps(self) -> None:
        """
        An account's error shows in full on its card, wrapped, ending with
        the command that fixes it.
        """
        accounts = [
            account(ALICE, status="error", error=f"its access token expired and there is no refresh token to renew it; {self.FIX}"),
            account(BOB, flags=("primary",)),
        ]
        self.make_app(make_snapshot(accounts, primary=BOB))
        text = " ".join(line.strip() for line in self.screen())
        self.assertIn("error: its access token expired and there is no refresh token to renew it;", text)
        self.assertIn("`nextclaude import --name alice@example.com`) again", text)

    def test_footer_message_wraps(self) -> None:
        """
        A footer message wider than the screen wraps over more footer
        lines instead of being cut.
        """
        self.make_app()
        self.app.say("adding the API key failed: " + self.FIX + " and then press R to reload", error=True)
        lines = self.screen()
        self.assertIn("adding the API key failed", lines[-2] + lines[-3])
        self.assertIn("press R to reload", lines[-1])

    def test_wrap_text(self) -> None:
        """
        wrap_text breaks between words, indents continuation lines, and
        splits a word longer than a line.
        """
        self.assertEqual(views.wrap_text("aa bb cc", 5, "! ", "  "), ["! aa", "  bb", "  cc"])
        self.assertEqual(views.wrap_text("abcdefgh", 5), ["abcde", "fgh"])
        self.assertEqual(views.wrap_text("", 5, "! "), ["! "])


class LabelTests(ConsoleHarness):
    """
    Issue 15, item 15: labels say what is true, and why.
    """

    def spilled(self) -> dict[str, Any]:
        """
        A real router whose pin (alice) is past the switch threshold, so
        new traffic goes to bob until alice's 5h window resets.
        """
        pool = make_pool(ALICE, BOB)
        alice = pool.get(ALICE)
        assert alice is not None
        alice.observe_quota(
            parse_rate_limit_headers(subscription_headers(0.985, 0.30, five_reset=NOW + 2 * HOUR, seven_reset=NOW + 3 * DAY), NOW),
            NOW,
        )
        router = Router(pool, lambda: NOW, EventHub())
        router.pin(ALICE)
        self.assertEqual(router.primary, BOB)
        return json.loads(json.dumps(status_snapshot(router, NOW, NOW - 60, "127.0.0.1", 3456)))

    def test_spilled_pin_says_where_traffic_goes(self) -> None:
        """
        A pin that takes no new traffic is not shown as "manual primary":
        its card says "★ manual · full, traffic on bob until HH:MM" (the
        reset that brings it back), bob carries the primary mark, and the
        JSON gains a spill object (fields only added).
        """
        snapshot = self.spilled()
        spill = snapshot["accounts"][0]["spill"]
        self.assertEqual(spill, {"why": "full", "trafficOn": BOB, "until": NOW + 2 * HOUR})
        self.assertEqual(snapshot["manual"], ALICE)
        self.make_app(snapshot)
        until = time.strftime("%H:%M", time.gmtime(NOW + 2 * HOUR))
        text = self.text(SMALL)
        self.assertIn(f"{ALICE}  subscription  active  ★ manual", text)
        self.assertIn(f"↳ full, traffic on {BOB} until {until}", text)
        self.assertNotIn("primary", self.line_with(ALICE))
        self.assertIn("primary", self.line_with(f"> {BOB}"))

    def test_status_text_says_it_too(self) -> None:
        """
        `nextclaude status` shows the same spill sentence after ★ manual.
        """
        from nextclaude.statusview import render_status

        text = render_status(self.spilled(), NOW)
        self.assertRegex(text, rf"  {ALICE} \(subscription, active\) ★ manual · full, traffic on {BOB} until \d\d:\d\d")
        self.assertIn(f"> {BOB} (subscription, active)", text)

    def test_primary_and_successor_on_one_account(self) -> None:
        """
        An account that is the primary and the successor at once is shown
        as the primary only (console and status), while the draining
        account says where its sessions go.
        """
        from nextclaude.statusview import render_status

        accounts = [
            dict(account(ALICE, status="draining"), movesTo=BOB),
            account(BOB, flags=("primary", "successor")),
        ]
        snapshot = make_snapshot(accounts, primary=BOB)
        self.make_app(snapshot)
        bob = self.line_with(f"> {BOB}", LARGE)
        self.assertIn("primary", bob)
        self.assertNotIn("successor", bob)
        self.assertIn(f"draining → {BOB}", self.line_with(ALICE, LARGE))
        text = render_status(snapshot, NOW)
        self.assertIn(f"> {BOB} (Pro, active)", text)
        self.assertIn(f"  {ALICE} (Pro, draining → {BOB})", text)


class LegendAndDemoTests(ConsoleHarness):
    """
    Issue 15, items 19 and 20: the legend in every console, and the
    demo's story (title, intro inside the screen, traffic ended).
    """

    def test_question_mark_opens_the_legend(self) -> None:
        """
        ? opens a legend with a sentence for hit, miss, ✎, cold, every
        status, every flag and every routing reason of the vocabulary (and
        the short form a narrow log shows it by); j scrolls it, any other
        key closes it.
        """
        self.make_app()
        self.assertIn("? legend", self.screen()[-1])
        self.press("?")
        text = self.text()
        self.assertIn("Legend", text)
        self.assertIn("hit: tokens read from the prompt cache", text)
        terms = " ".join(term for section in (views.LEGEND_FIGURES, views.LEGEND_STATUSES, views.LEGEND_FLAGS, views.LEGEND_REASONS) for term, _ in section)
        for word in ["hit", "miss", "✎", "cold", "active", "armed", "draining", "throttled", "exhausted", "error", "disabled", "primary", "successor", "manual"]:
            self.assertIn(word, terms)
        reasons = [
            "affinity", "placed", "spread-early", "moved-after-compaction", "moved-after-idle", "ceiling",
            "quota-429", "retry-401", "retry-403", "retry-throttle", "retry-transient", "retry-connect",
            "forward-only-waived", "manual", "probe", "exhausted", "no-credentials",
        ]  # fmt: skip
        self.assertEqual([term for term, _ in views.LEGEND_REASONS], reasons)
        # The legend is taller than 24 rows: scrolling shows the reasons,
        # and the short forms a narrow log uses.
        self.press(*["j"] * 60)
        self.assertIn("no-credentials", self.text())
        legend = " ".join(views.line_text(line) for line in views.legend_paragraphs())
        for short in ("moved:compact", "moved:idle", "fwd-only-waived", "retry-transnt", "no-creds"):
            self.assertIn(f"({short} where the log is narrow.)", legend)
        self.press("x")
        self.assertNotIn("Legend", self.text())
        self.assertFalse(self.app.done.called)

    def test_reason_colours_follow_the_vocabulary(self) -> None:
        """
        The log colours routine reasons dim, moves as moves, retries as
        retries, and exhausted/no-credentials as bad news.
        """
        self.assertEqual(views.reason_attr("placed"), p.REASON)
        self.assertEqual(views.reason_attr("moved-after-idle"), p.REASON_MOVE)
        self.assertEqual(views.reason_attr("spread-early"), p.REASON_MOVE)
        self.assertEqual(views.reason_attr("retry-throttle"), p.REASON_RETRY)
        self.assertEqual(views.reason_attr("no-credentials"), p.REASON_BAD)
        self.assertEqual(views.reason_text("moved-after-compaction", 14), "moved:compact ")

    def test_demo_title_intro_and_end(self) -> None:
        """
        The demo's console says it is a demo on simulated accounts in its
        title bar and opens with its introduction inside the screen (any
        key closes it); when the traffic ends the footer says so and how to
        see the summary, and q quits without the stop question.
        """
        done: Deferred[None] = Deferred()
        self.make_app(
            owns_proxy=True,
            title="NextClaude demo · simulated accounts",
            intro=["Three simulated accounts with small quotas."],
            traffic_done=done,
        )
        self.assertTrue(self.screen()[0].startswith("NextClaude demo · simulated accounts"))
        self.assertIn("Three simulated accounts with small quotas.", self.text())
        self.press("x")
        self.assertNotIn("Three simulated", self.text())
        self.assertIn("quit+stop proxy", self.screen()[-1])
        done.callback(None)
        self.clock.advance(10)
        self.assertIn("traffic has ended: press q to quit and see the summary", self.screen()[-1])
        self.press("q")
        self.assertNotIn("Stop the proxy and quit", self.text())
        self.clock.advance(0)
        self.assertEqual(len(self.stops), 1)
        self.stops[0].callback(None)
        self.assertEqual(self.successResultOf(self.app.done), Outcome.STOPPED)


class OutsideScreenLogTests(SynchronousTestCase):
    def test_only_warnings_and_errors_reach_the_terminal(self) -> None:
        """
        Before the console's screen opens and after it closes, its terminal
        gets the server's terminal lines: Twisted's chatter ("Starting
        factory", "Main loop terminated.") is dropped; warnings and errors
        still reach the terminal.
        """
        from nextclaude.activity import terminal_observer

        stream = io.StringIO()
        log = Logger(observer=terminal_observer(stream), namespace="test")
        log.info("Starting factory {factory}", factory="OneShotFactory")
        log.warn("the proxy went away")
        log.error("state file unreadable")
        text = stream.getvalue()
        self.assertNotIn("Starting factory", text)
        self.assertIn("the proxy went away", text)
        self.assertIn("state file unreadable", text)

    def test_activity_rows_as_they_are(self) -> None:
        """
        An activity row reaches the terminal as its own line, without a
        second time stamp, braces and all; an empty row writes nothing.
        """
        from nextclaude.activity import ROW_KEY, ROW_TEXT, terminal_observer

        stream = io.StringIO()
        log = Logger(observer=terminal_observer(stream), namespace="nextclaude.test")
        row = "12:00:01 200  1.2s alice  opus {odd} 10k"
        log.info("{line}", **{ROW_TEXT: row, ROW_KEY: True})
        log.info("{line}", **{ROW_TEXT: "", ROW_KEY: True})
        self.assertEqual(stream.getvalue(), row + "\n")


class CardWidthTests(SynchronousTestCase):
    def test_both_windows_fit_an_80_column_card(self) -> None:
        """
        At 80 columns the normal card's window line keeps both resets
        whole, with the widest figures either can show (100% used, resets
        in 23h59m and in 6d23h): nothing is cut to an ellipsis.
        """
        now = 1_750_000_000.0
        account = {
            "name": "sim-1",
            "tier": "Max",
            "status": "active",
            "windows": {
                "5h": {"utilization": 1.0, "reset": now + 23 * 3600 + 59 * 60},
                "7d": {"utilization": 1.0, "reset": now + 6 * 86400 + 23 * 3600},
            },
        }
        for width in (80, 100, 60):
            lines = [views.line_text(line) for line in views.card_lines(account, now, views.NORMAL, width)]
            windows = next(line for line in lines if "5h" in line and "7d" in line)
            self.assertLessEqual(views.width_of(windows), width)
            if width >= 80:
                self.assertNotIn("…", windows)
                self.assertIn("(23h59m)", windows)
                self.assertIn("(6d23h)", windows)
