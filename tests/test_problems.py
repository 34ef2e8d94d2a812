"""
Tests for nextclaude.problems: the registry of unresolved problems, its
events, and how status and the console show it.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude import events
from nextclaude.console import views
from nextclaude.events import Event, EventHub
from nextclaude.problems import (
    ACCOUNT_ERROR,
    REQUEST_LOG,
    TOKEN_IN_MEMORY,
    TOKEN_UNSAVED,
    UPSTREAM_UNREACHABLE,
    Problems,
)
from nextclaude.statusview import problem_lines, render_status
from tests.support import FakeUpstream, auth, client, json_reply, listen, start_proxy, write_config

NOW = 1_750_000_000.0


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.hub = EventHub()
        self.seen: list[Event] = []
        self.hub.subscribe(self.seen.append)
        self.problems = Problems(self.hub, self.clock.seconds)

    def kinds(self) -> list[tuple[str, Any]]:
        return [(e.kind, e.data.get("problem")) for e in self.seen if e.kind.startswith("problem")]

    def test_raise_and_clear_emit_events(self) -> None:
        """
        Raising a problem puts it in the snapshot and emits problem-raised
        with the problem's kind in its C{problem} field (the event's own
        kind stays the event type); clearing removes it and emits
        problem-cleared once.
        """
        self.problems.raise_problem("alice", TOKEN_UNSAVED, "alice: new token not saved yet")
        self.assertEqual(
            self.problems.snapshot(),
            [{"account": "alice", "kind": TOKEN_UNSAVED, "message": "alice: new token not saved yet", "since": NOW}],
        )
        self.problems.clear("alice", TOKEN_UNSAVED)
        self.problems.clear("alice", TOKEN_UNSAVED)
        self.assertEqual(self.problems.snapshot(), [])
        self.assertEqual(
            self.kinds(), [(events.PROBLEM_RAISED, TOKEN_UNSAVED), (events.PROBLEM_CLEARED, TOKEN_UNSAVED)]
        )
        self.assertEqual(self.seen[0].to_json()["kind"], events.PROBLEM_RAISED)

    def test_raising_again_keeps_since(self) -> None:
        """
        The same problem raised again with the same message is no news (no
        event); with a new message it is announced again but keeps when it
        began.
        """
        self.problems.raise_problem(None, REQUEST_LOG, "disk full")
        self.clock.advance(30)
        self.problems.raise_problem(None, REQUEST_LOG, "disk full")
        self.problems.raise_problem(None, REQUEST_LOG, "permission denied")
        (only,) = self.problems.snapshot()
        self.assertEqual((only["message"], only["since"]), ("permission denied", NOW))
        self.assertEqual(len(self.kinds()), 2)

    def test_account_error_events_and_sync(self) -> None:
        """
        An account-error event raises an account-error problem; syncing
        with the accounts' error fields clears it once the account works
        again, and drops every problem of an account that is gone.
        """
        self.hub.emit(events.ACCOUNT_ERROR, NOW, account="bob", message="the API key was rejected (401)")
        self.problems.raise_problem("carol", TOKEN_IN_MEMORY, "carol: new token held only in memory")
        self.assertTrue(self.problems.active("bob", ACCOUNT_ERROR))
        self.problems.sync_accounts({"bob": None, "alice": "the OAuth grant is no longer valid"})
        self.assertFalse(self.problems.active("bob", ACCOUNT_ERROR))
        self.assertTrue(self.problems.active("alice", ACCOUNT_ERROR))
        self.assertFalse(self.problems.active("carol", TOKEN_IN_MEMORY))

    def test_upstream_unreachable_follows_the_requests(self) -> None:
        """
        A request sent to an account that never got an answer (the proxy's
        own 502 or 504, not ok) raises one proxy-wide upstream-unreachable
        problem saying which; the next request that got any answer clears
        it.  A stream cut after its answer began, or a request no account
        could take, says nothing about reaching the upstream.
        """
        finished = lambda **data: self.hub.emit(events.REQUEST_FINISHED, NOW, **data)  # noqa: E731
        finished(account="alice", status=200, ok=False)
        finished(account=None, status=429, ok=True)
        self.assertEqual(self.problems.snapshot(), [])
        finished(account="alice", status=502, ok=False)
        finished(account="bob", status=504, ok=False)
        (only,) = self.problems.snapshot()
        self.assertEqual((only["account"], only["kind"]), (None, UPSTREAM_UNREACHABLE))
        self.assertIn("did not answer in time (proxy.upstreamTimeout)", only["message"])
        finished(account=None, status=429, ok=True)
        self.assertTrue(self.problems.active(None, UPSTREAM_UNREACHABLE))
        # The upstream's own 502 is an answer.
        finished(account="alice", status=502, ok=True)
        self.assertEqual(self.problems.snapshot(), [])

    def test_order_is_oldest_first(self) -> None:
        """
        The snapshot lists problems oldest first, whatever order they were
        raised in per account.
        """
        self.problems.raise_problem("zed", TOKEN_UNSAVED, "zed: later")
        self.clock.advance(-10)
        self.problems.raise_problem("amy", TOKEN_UNSAVED, "amy: earlier")
        self.assertEqual([p["account"] for p in self.problems.snapshot()], ["amy", "zed"])


def snapshot_with(problems: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "startedAt": NOW - 60,
        "primary": "alice",
        "accounts": [
            {"name": "alice", "tier": "Max", "status": "error", "error": "the API key was rejected (401)"},
        ],
        "problems": problems,
    }


PROBLEMS = [
    {"account": "alice", "kind": ACCOUNT_ERROR, "message": "the API key was rejected (401)", "since": NOW},
    {"account": "bob", "kind": TOKEN_IN_MEMORY, "message": "bob: new token held only in memory; after a stop bob needs `nextclaude login`", "since": NOW},
    {"account": None, "kind": REQUEST_LOG, "message": "the request log cannot be written: disk full", "since": NOW},
    {"account": "carol", "kind": TOKEN_UNSAVED, "message": "new token kept in recovery-carol.json", "since": NOW},
]


class ShownTests(SynchronousTestCase):
    def test_status_text_lists_problems(self) -> None:
        """
        `nextclaude status` shows a Problems block under the Active line,
        one line each, naming the account when the message does not; an
        account error is shown once, in the account's own block.
        """
        text = render_status(snapshot_with(PROBLEMS), NOW)
        lines = text.splitlines()
        start = lines.index("Problems:")
        self.assertEqual(
            lines[start + 1 : start + 4],
            [
                "  ! bob: new token held only in memory; after a stop bob needs `nextclaude login`",
                "  ! the request log cannot be written: disk full",
                "  ! carol: new token kept in recovery-carol.json",
            ],
        )
        self.assertEqual(text.count("the API key was rejected (401)"), 1)

    def test_status_without_problems(self) -> None:
        """
        No problems (or an older proxy without the field): no Problems block.
        """
        self.assertNotIn("Problems:", render_status(snapshot_with([]), NOW))
        old = snapshot_with([])
        del old["problems"]
        self.assertNotIn("Problems:", render_status(old, NOW))
        self.assertEqual(problem_lines({"problems": ["junk", None]}), [])

    def test_console_header_shows_problems_wrapped(self) -> None:
        """
        The console header gains rows for each problem, wrapped to the
        width (issue 15: messages wrap instead of being cut); when they
        outgrow their budget of rows, the last row counts the rest.
        """
        rows = views.problem_rows(snapshot_with(PROBLEMS), 40, budget=12)
        texts = [views.line_text(row) for row in rows]
        self.assertEqual(len(texts), 7)
        self.assertTrue(texts[0].startswith("! bob: new token held only"))
        self.assertIn("login`", texts[2])
        self.assertTrue(all(views.width_of(t) <= 40 for t in texts))
        many = PROBLEMS + [
            {"account": name, "kind": TOKEN_UNSAVED, "message": f"{name}: unsaved", "since": NOW}
            for name in ("dan", "eve")
        ]
        texts = [views.line_text(row) for row in views.problem_rows(snapshot_with(many), 80, budget=3)]
        self.assertEqual(len(texts), 3)
        self.assertIn("3 more problems", texts[-1])

    def test_console_log_rows(self) -> None:
        """
        Problem events get activity rows (raised in the bad colour,
        resolved in the good one); an account error's problem event adds
        no second row beside the account-error event's.
        """
        raised = {"kind": events.PROBLEM_RAISED, "time": NOW, "account": "bob", "problem": TOKEN_UNSAVED, "message": "bob: unsaved"}
        cleared = {"kind": events.PROBLEM_CLEARED, "time": NOW, "account": "bob", "problem": TOKEN_UNSAVED}
        self.assertEqual(views.event_text(raised, NOW), (views.p.EVENT_BAD, "! bob: unsaved"))
        self.assertEqual(views.event_text(cleared, NOW), (views.p.EVENT_GOOD, f"✓ resolved {TOKEN_UNSAVED} (bob)"))
        mirrored = dict(raised, problem=ACCOUNT_ERROR)
        self.assertIsNone(views.event_text(mirrored, NOW))


class StatusEndpointTests(TestCase):
    async def fetch_status(self) -> dict[str, Any]:
        response = await client(self).get(self.base + "/nextclaude/status", headers=auth())
        self.assertEqual(response.code, 200)
        return json.loads(await response.content())

    def test_status_endpoint_carries_problems(self) -> Deferred[None]:
        """
        The running proxy's status JSON (what `status --json` prints) has
        a C{problems} list: a problem raised in the registry and an
        account's credential error appear there, and the error's problem
        goes once the account works again.
        """
        path = write_config(self, upstream_port=9)
        self.service, self.base = start_proxy(self, path)

        async def check() -> None:
            self.assertEqual((await self.fetch_status())["problems"], [])
            self.service.problems.raise_problem(None, REQUEST_LOG, "the request log cannot be written")
            self.service.pool.get("bob").error = "the OAuth grant is no longer valid"
            shown = (await self.fetch_status())["problems"]
            self.assertEqual(
                {(p["account"], p["kind"]) for p in shown}, {(None, REQUEST_LOG), ("bob", ACCOUNT_ERROR)}
            )
            self.assertEqual(set(shown[0]), {"account", "kind", "message", "since"})
            self.service.pool.get("bob").error = None
            shown = (await self.fetch_status())["problems"]
            self.assertEqual([p["kind"] for p in shown], [REQUEST_LOG])

        return Deferred.fromCoroutine(check())

    async def test_unreachable_upstream_is_a_problem(self) -> None:
        """
        A proxy whose upstream refuses connections does not look healthy:
        after a request that got the proxy's 502, the status lists an
        upstream-unreachable problem that says what clients get.
        """
        port = listen(self, FakeUpstream(lambda request, body: json_reply(request, 200, {})))
        path = write_config(self, port)
        # Free the port again so that nothing listens there.
        await self._cleanups.pop()[0]()
        self.service, self.base = start_proxy(self, path)
        response = await client(self).post(
            self.base + "/v1/messages", b'{"model":"claude-sonnet-4-5","messages":[]}', headers=auth()
        )
        self.assertEqual(response.code, 502)
        await response.content()
        (problem,) = (await self.fetch_status())["problems"]
        self.assertEqual((problem["account"], problem["kind"]), (None, UPSTREAM_UNREACHABLE))
        self.assertIn("requests get 502", problem["message"])


class PrimaryTextTests(SynchronousTestCase):
    def test_primary_that_cannot_serve_says_so(self) -> None:
        """
        The Active line and the console header name the primary with its
        status when it cannot serve (error, exhausted, throttled,
        disabled), never as if it were active; a serving primary is named
        plainly, and no primary reads "none yet".
        """
        for status in ("error", "exhausted", "throttled", "disabled"):
            snap = snapshot_with([])
            snap["accounts"][0]["status"] = status
            self.assertIn(f"Active: alice ({status}) ·", render_status(snap, NOW))
            header = "".join(views.line_text(part) for part in views.header_parts(snap, NOW))
            self.assertIn(f"primary alice ({status})", header)
        for status in ("active", "armed", "draining"):
            snap = snapshot_with([])
            snap["accounts"][0]["status"] = status
            self.assertIn("Active: alice ·", render_status(snap, NOW))
        snap = snapshot_with([])
        snap["primary"] = None
        self.assertIn("Active: none yet ·", render_status(snap, NOW))
