"""
Tests for nextclaude.statusview: `nextclaude status` text from the status
snapshot, in PRODUCT.md's format.
"""

from __future__ import annotations

import copy
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nextclaude import __version__
from nextclaude.config import AccountConfig
from nextclaude.events import EventHub
from nextclaude.pool import AccountPool, Thresholds
from nextclaude.quota import WindowQuota
from nextclaude.router import Router
from nextclaude.sessions import RequestFacts
from nextclaude.status import snapshot
from nextclaude.statusview import hit_percent, render_status
from nextclaude.usage import Usage

NOW = 1_750_000_000.0
MINUTE = 60.0
HOUR = 3600.0
DAY = 24 * HOUR

# PRODUCT.md's example, verbatim apart from the version.
PRODUCT_EXAMPLE = f"""\
NextClaude {__version__} · 2 account(s) · 9 session(s) · up 3h12m
Active: bob@example.com · switch at 98% · cache hit 90% overall · ↑44k ↓58k · 91 reqs
  alice@example.com (Pro, active)
  5h: 43% used (resets in 4h16m)
  7d: 30% used (resets in 5d3h)
  cache: 93% hit · 2.2M read · ✎120k rebuilt (1 cold)
  tokens: ↑42k in · ↓46k out · 84 requests
> bob@example.com (Max, active) ★ manual
  5h: 5% used (resets in 5h)
  cache: 77% hit · 520k read · ✎150k rebuilt (1 cold)
  tokens: ↑2k in · ↓12k out · 7 requests"""


def usage(requests: int, cold: int, input_: int, output: int, read: int, creation: int) -> dict[str, int]:
    return {
        "requests": requests,
        "failures": 0,
        "coldRebuilds": cold,
        "inputTokens": input_,
        "outputTokens": output,
        "cacheReadTokens": read,
        "cacheCreationTokens": creation,
    }


def example_snapshot() -> dict[str, Any]:
    """
    A snapshot, in nextclaude.status's schema, of the state PRODUCT.md's
    example shows.
    """
    alice = usage(84, 1, 42_000, 46_000, 2_200_000, 120_000)
    bob = usage(7, 1, 2_000, 12_000, 520_000, 150_000)
    return {
        "version": __version__,
        "time": NOW,
        "startedAt": NOW - (3 * HOUR + 12 * MINUTE),
        "uptime": 3 * HOUR + 12 * MINUTE,
        "listen": {"host": "127.0.0.1", "port": 3456},
        "primary": "bob@example.com",
        "sessions": 9,
        "switchThreshold": 0.98,
        "hardThreshold": 0.995,
        "totals": {key: alice[key] + bob[key] for key in alice},
        "accounts": [
            {
                "name": "alice@example.com",
                "type": "oauth",
                "tier": "Pro",
                "priority": 0,
                "status": "active",
                "flags": [],
                "error": None,
                "throttledUntil": None,
                "exhaustedUntil": None,
                "windows": {
                    "7d": {"utilization": 0.30, "reset": NOW + 5 * DAY + 3 * HOUR, "status": "allowed"},
                    "5h": {"utilization": 0.43, "reset": NOW + 4 * HOUR + 16 * MINUTE, "status": "allowed"},
                },
                "usage": alice,
            },
            {
                "name": "bob@example.com",
                "type": "oauth",
                "tier": "Max",
                "priority": 0,
                "status": "active",
                "flags": ["primary", "manual"],
                "error": None,
                "throttledUntil": None,
                "exhaustedUntil": None,
                "windows": {"5h": {"utilization": 0.05, "reset": NOW + 5 * HOUR, "status": "allowed"}},
                "usage": bob,
            },
        ],
    }


class ProductExampleTests(SynchronousTestCase):
    def test_example_snapshot(self) -> None:
        """
        A snapshot of PRODUCT.md's example state renders exactly as
        PRODUCT.md shows it: header with sessions and uptime, the Active
        line with switch threshold, overall hit % and totals, C{>} on the
        primary, C{★ manual} on the pin, the 5h window before the 7d one
        whatever the snapshot's order, and only the windows it has.
        """
        self.assertEqual(render_status(example_snapshot(), NOW), PRODUCT_EXAMPLE)

    def test_from_real_router(self) -> None:
        """
        The snapshot nextclaude.status builds from a real router (tiers from
        the config, quota windows, usage totals, nine tracked sessions, bob
        pinned and so primary) renders as PRODUCT.md's example.
        """
        started = NOW - (3 * HOUR + 12 * MINUTE)
        pool = AccountPool(
            [
                AccountConfig(name="alice@example.com", type="oauth", access_token="sk-ant-oat01-a", tier="Pro"),
                AccountConfig(name="bob@example.com", type="oauth", access_token="sk-ant-oat01-b", tier="Max"),
            ],
            Thresholds(switch=0.98, hard=0.995),
        )
        router = Router(pool, lambda: NOW, EventHub())
        alice, bob = pool.get("alice@example.com"), pool.get("bob@example.com")
        assert alice is not None and bob is not None
        alice.windows = {
            "5h": WindowQuota(utilization=0.43, reset=NOW + 4 * HOUR + 16 * MINUTE, status="allowed"),
            "7d": WindowQuota(utilization=0.30, reset=NOW + 5 * DAY + 3 * HOUR, status="allowed"),
        }
        bob.windows = {"5h": WindowQuota(utilization=0.05, reset=NOW + 5 * HOUR, status="allowed")}
        for account, totals, requests in [
            (alice, (42_000, 46_000, 2_200_000, 120_000), 84),
            (bob, (2_000, 12_000, 520_000, 150_000), 7),
        ]:
            input_, output, read, creation = totals
            # One cold rebuild (creation above read and 1,000 tokens), the rest warm.
            account.usage.record(Usage(cache_creation_input_tokens=5_000), ok=True)
            account.usage.record(
                Usage(
                    input_tokens=input_,
                    output_tokens=output,
                    cache_read_input_tokens=read,
                    cache_creation_input_tokens=creation - 5_000,
                ),
                ok=True,
            )
            for _ in range(requests - 2):
                account.usage.record(Usage(), ok=True)
        for index in range(9):
            router.sessions.observe(
                RequestFacts(
                    session_key=f"s:{index}",
                    key_source="header",
                    model="claude-sonnet-4-5",
                    body_size=1000,
                    cache_ttl=300.0,
                    is_compaction=False,
                    starts_with_continuation=False,
                    is_side_request=False,
                ),
                NOW,
            )
        router.pin("bob@example.com")
        data = snapshot(router, NOW, started, "127.0.0.1", 3456)
        self.assertEqual(data["primary"], "bob@example.com")
        self.assertEqual(render_status(data, NOW), PRODUCT_EXAMPLE)


class VariationTests(SynchronousTestCase):
    def lines(self, data: dict[str, Any], now: float = NOW) -> list[str]:
        return render_status(data, now).splitlines()

    def test_no_windows(self) -> None:
        """
        An account with no quota windows known yet gets no window lines:
        its name line is followed directly by its cache line.
        """
        data = example_snapshot()
        data["accounts"][0]["windows"] = {}
        lines = self.lines(data)
        self.assertEqual(lines[2], "  alice@example.com (Pro, active)")
        self.assertTrue(lines[3].startswith("  cache: 93% hit"), lines[3])
        self.assertNotIn("7d:", render_status(data, NOW))

    def test_error_account(self) -> None:
        """
        An account in error shows the status word "error" and its message on
        the line after its name.
        """
        data = example_snapshot()
        alice = data["accounts"][0]
        alice["status"] = "error"
        alice["error"] = "401 from upstream: token revoked; log in again"
        lines = self.lines(data)
        self.assertEqual(lines[2], "  alice@example.com (Pro, error)")
        self.assertEqual(lines[3], "  error: 401 from upstream: token revoked; log in again")

    def test_draining_and_successor(self) -> None:
        """
        The draining status shows in the status word (with where its
        sessions go, when known); the successor flag replaces "active"
        there, and joins any other status; on the primary (">") it is not
        repeated, which would read as a contradiction.
        """
        data = example_snapshot()
        data["accounts"][0]["status"] = "draining"
        data["accounts"][1]["flags"] = ["primary", "successor"]
        lines = self.lines(data)
        self.assertEqual(lines[2], "  alice@example.com (Pro, draining)")
        self.assertEqual(lines[7], "> bob@example.com (Max, active)")
        data["accounts"][0]["movesTo"] = "bob@example.com"
        self.assertEqual(self.lines(data)[2], "  alice@example.com (Pro, draining → bob@example.com)")
        data["accounts"][1]["flags"] = ["successor"]
        self.assertEqual(self.lines(data)[7], "> bob@example.com (Max, successor)")
        data["accounts"][1]["status"] = "armed"
        self.assertEqual(self.lines(data)[7], "> bob@example.com (Max, armed, successor)")

    def test_throttled_and_exhausted_countdowns(self) -> None:
        """
        Throttled and exhausted accounts say when they come back, counted
        from C{now}; a time already past is not shown.
        """
        data = example_snapshot()
        data["accounts"][0]["status"] = "throttled"
        data["accounts"][0]["throttledUntil"] = NOW + 40
        data["accounts"][1]["status"] = "exhausted"
        data["accounts"][1]["exhaustedUntil"] = NOW + 2 * HOUR
        lines = self.lines(data)
        self.assertEqual(lines[2], "  alice@example.com (Pro, throttled, back in 40s)")
        self.assertEqual(lines[7], "> bob@example.com (Max, exhausted, back in 2h) ★ manual")
        self.assertEqual(self.lines(data, NOW + 3 * HOUR)[2], "  alice@example.com (Pro, throttled)")

    def test_countdowns_follow_now(self) -> None:
        """
        Reset countdowns and uptime are computed from C{now}, not from the
        snapshot's own time.
        """
        lines = self.lines(example_snapshot(), NOW + 16 * MINUTE)
        self.assertEqual(lines[0].rsplit(" · ", 1)[1], "up 3h28m")
        self.assertEqual(lines[3], "  5h: 43% used (resets in 4h)")

    def test_other_windows_rejected_and_unknown(self) -> None:
        """
        Windows other than 5h and 7d follow them in name order; a rejected
        window says so; an unknown utilization or reset is shown as such.
        """
        data = example_snapshot()
        data["accounts"][0]["windows"].update(
            {
                "7d_sonnet": {"utilization": 1.0, "reset": NOW + DAY, "status": "rejected"},
                "7d_opus": {"utilization": None, "reset": None, "status": None},
            }
        )
        lines = self.lines(data)
        self.assertEqual(
            lines[3:7],
            [
                "  5h: 43% used (resets in 4h16m)",
                "  7d: 30% used (resets in 5d3h)",
                "  7d_opus: ?% used",
                "  7d_sonnet: 100% used (resets in 1d) · rejected",
            ],
        )

    def test_fresh_proxy(self) -> None:
        """
        A proxy with no traffic and no primary yet: "none yet" on the
        Active line, "–" for the hit rates, zero counts.
        """
        data = example_snapshot()
        data["primary"] = None
        data["sessions"] = 0
        empty = usage(0, 0, 0, 0, 0, 0)
        data["totals"] = dict(empty)
        for account in data["accounts"]:
            account["usage"] = dict(empty)
            account["flags"] = []
            account["windows"] = {}
        lines = self.lines(data)
        self.assertEqual(lines[1], "Active: none yet · switch at 98% · cache hit – overall · ↑0 ↓0 · 0 reqs")
        self.assertEqual(lines[2], "  alice@example.com (Pro, active)")
        self.assertEqual(lines[3], "  cache: – hit · 0 read · ✎0 rebuilt (0 cold)")
        self.assertEqual(lines[4], "  tokens: ↑0 in · ↓0 out · 0 requests")

    def test_failures_and_fractional_threshold(self) -> None:
        """
        Failed requests are counted after the request count; a switch
        threshold that is not a whole percent keeps its decimal.
        """
        data = example_snapshot()
        data["switchThreshold"] = 0.975
        data["accounts"][0]["usage"]["failures"] = 2
        lines = self.lines(data)
        self.assertIn("switch at 97.5%", lines[1])
        self.assertEqual(lines[6], "  tokens: ↑42k in · ↓46k out · 84 requests (2 failed)")

    def test_no_accounts(self) -> None:
        """
        A snapshot without accounts renders the header and the Active line
        only.
        """
        data = example_snapshot()
        data["accounts"] = []
        self.assertEqual(len(self.lines(data)), 2)
        self.assertIn("· 0 account(s) ·", self.lines(data)[0])

    def test_does_not_modify_snapshot(self) -> None:
        """
        Rendering leaves the snapshot as it was (the console renders the
        same dict again and again).
        """
        data = example_snapshot()
        before = copy.deepcopy(data)
        render_status(data, NOW)
        self.assertEqual(data, before)

    def test_hit_percent(self) -> None:
        """
        Hit % is cache read ÷ (cache read + input + cache creation), rounded;
        None when nothing was read or processed.
        """
        self.assertEqual(
            hit_percent({"cacheReadTokens": 2_200_000, "inputTokens": 42_000, "cacheCreationTokens": 120_000}), 93
        )
        self.assertEqual(hit_percent({"cacheReadTokens": 0, "inputTokens": 10, "cacheCreationTokens": 0}), 0)
        self.assertIsNone(hit_percent({}))
