"""
Tests for nextclaude.router: the basic routing policy (DESIGN.md, "The
routing policy", points 1, 2, 6, 9 and 10) driven by real rate-limit header
shapes (PROTOCOL.md) and a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nextclaude import events
from nextclaude.events import Event, EventHub
from nextclaude.pool import Account, Status
from nextclaude.quota import QuotaReport, parse_rate_limit_headers
from nextclaude.router import Decision, RouteContext, Router
from nextclaude.usage import Usage
from tests.test_pool import (
    FIVE_HOUR_RESET,
    HOUR,
    NOW,
    OPUS,
    SEVEN_DAY_RESET,
    SONNET,
    U,
    make_pool,
    subscription_headers,
)

CONTEXT = RouteContext(session="0b6e4a52-6f0e-4e38-9d7a-0c1b7f3f6a21", model=SONNET)

# What an API-key account sees on a 429 (PROTOCOL.md): per-kind limits with
# RFC 3339 resets, and retry-after in seconds.
API_KEY_429 = {
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "0",
    "anthropic-ratelimit-requests-reset": "2025-06-15T15:07:00Z",
    "anthropic-ratelimit-tokens-limit": "40000",
    "anthropic-ratelimit-tokens-remaining": "0",
    "anthropic-ratelimit-tokens-reset": "2025-06-15T15:07:30Z",
    "content-type": "application/json",
    "request-id": "req_011CApiKey429",
}


class RouterHarness(SynchronousTestCase):
    """
    A router over a pool from C{make_pool} specs, a L{Clock} set to C{NOW},
    and every emitted event collected in C{self.events}.
    """

    def make_router(self, *specs: Any, retry_after_cap: int = 55) -> Router:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.pool = make_pool(*specs)
        self.hub = EventHub()
        self.events: list[Event] = []
        self.hub.subscribe(self.events.append)
        self.router = Router(self.pool, self.clock.seconds, self.hub, retry_after_cap)
        return self.router

    def account(self, name: str) -> Account:
        account = self.pool.get(name)
        assert account is not None
        return account

    def respond(
        self,
        name: str,
        status: int,
        headers: dict[str, str],
        context: RouteContext = CONTEXT,
    ) -> bool:
        report = parse_rate_limit_headers(headers, self.clock.seconds())
        return self.router.on_response(self.account(name), status, report, context)

    def route(self, context: RouteContext = CONTEXT, tried: frozenset[str] = frozenset()) -> Decision:
        return self.router.route(context, tried)

    def routed(self, context: RouteContext = CONTEXT, tried: frozenset[str] = frozenset()) -> tuple[str | None, str]:
        decision = self.route(context, tried)
        return (decision.account.name if decision.account else None, decision.reason)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [event.data for event in self.events if event.kind == kind]


class PrimaryTests(RouterHarness):
    def test_first_route_picks_best_ranked(self) -> None:
        """
        The first request goes to the best-ranked account, which becomes the
        primary with reason "primary"; choosing the first primary is not a
        switch.
        """
        self.make_router("a", "b", "c", ("k", "apikey"))
        self.respond("a", 200, subscription_headers(0.6, 0.1))
        self.respond("b", 200, subscription_headers(0.2, 0.3))
        self.respond("c", 200, subscription_headers(0.2, 0.1))
        self.assertEqual(self.routed(), ("c", "primary"))
        self.assertEqual(self.router.primary, "c")
        self.assertEqual(self.router.flags_of(self.account("c")), ["primary"])
        self.assertEqual(self.router.flags_of(self.account("a")), [])
        self.assertEqual(self.of_kind(events.SWITCHED), [])

    def test_api_key_is_last_resort(self) -> None:
        """
        An API key (default priority 1) is not chosen while a subscription
        account can serve, even a well-used one.
        """
        self.make_router(("k", "apikey"), "a")
        self.respond("a", 200, subscription_headers(0.97, 0.9))
        self.assertEqual(self.routed(), ("a", "primary"))

    def test_affinity_to_the_primary(self) -> None:
        """
        The primary keeps every request, of any session or model, while it
        can serve, even when another account has become better ranked.
        """
        self.make_router("a", "b")
        self.assertEqual(self.routed(), ("a", "primary"))
        for step, five in enumerate([0.3, 0.6, 0.9, 0.97]):
            self.clock.advance(60)
            self.respond("a", 200, subscription_headers(five, 0.5))
            context = RouteContext(session=f"session-{step}", model=[OPUS, SONNET, None][step % 3])
            self.assertEqual(self.routed(context), ("a", "primary"), five)
        self.assertEqual(self.pool.ranked(self.clock.seconds())[0].name, "b")
        self.assertEqual(self.of_kind(events.SWITCHED), [])

    def test_stays_on_new_primary_after_old_recovers(self) -> None:
        """
        After a switch the new primary keeps the traffic even once the old
        primary's window has reset and it ranks better again.
        """
        self.make_router("a", "b")
        self.route()
        self.respond("a", 200, subscription_headers(0.996, 0.2))
        self.assertEqual(self.routed(), ("b", "ceiling"))
        self.respond("b", 200, subscription_headers(0.5, 0.5))
        self.clock.advance(FIVE_HOUR_RESET - NOW)
        self.assertTrue(self.pool.serviceable(self.account("a"), self.clock.seconds()))
        self.assertEqual(self.routed(), ("b", "primary"))


class CeilingTests(RouterHarness):
    CASES = {
        "5h at hard threshold": subscription_headers(0.995, 0.4, five_status="allowed_warning"),
        "5h over 100%": subscription_headers(1.01, 0.4, five_status="allowed_warning"),
        "7d at hard threshold": subscription_headers(0.2, 0.999, seven_status="allowed_warning"),
        "7d_oi at hard threshold": subscription_headers(
            0.2,
            0.4,
            extra={
                U + "7d_oi-status": "allowed_warning",
                U + "7d_oi-utilization": "0.995",
                U + "7d_oi-reset": str(int(SEVEN_DAY_RESET)),
            },
        ),
        "rejected, aggregate and per-window": subscription_headers(
            0.97, 0.4, status="rejected", five_status="rejected"
        ),
        # A response may carry only the per-window verdict.
        "rejected, per-window only": {
            U + "5h-status": "rejected",
            U + "5h-reset": str(int(FIVE_HOUR_RESET)),
            U + "5h-utilization": "0.97",
        },
        "rejected, 7d per-window only": {
            U + "7d-status": "rejected",
            U + "7d-reset": str(int(SEVEN_DAY_RESET)),
        },
        # Overage in use: the request went through on a 200, billed as extra
        # usage, and only the aggregate status says the windows are spent.
        "rejected, aggregate only (overage in use)": {
            U + "status": "rejected",
            U + "reset": str(int(FIVE_HOUR_RESET)),
            U + "representative-claim": "five_hour",
            U + "overage-status": "allowed",
            U + "overage-reset": str(int(SEVEN_DAY_RESET)),
        },
    }

    def test_ceiling_moves_next_request(self) -> None:
        """
        When a 200's headers put the primary at the hard threshold or say
        "rejected" (aggregate only, per-window only, or both), the response
        is still relayed, an "exhausted" event is emitted, and the next
        request goes to the next-ranked account with reason "ceiling",
        emitting one "switched" event; later requests stay there.
        """
        for name, headers in self.CASES.items():
            self.make_router("a", "b", "c")
            self.respond("c", 200, subscription_headers(0.5, 0.5))
            self.assertEqual(self.routed(), ("a", "primary"), name)
            self.assertFalse(self.respond("a", 200, headers), name)
            self.assertEqual(self.router.status_of(self.account("a")), Status.EXHAUSTED, name)
            self.assertEqual([e["account"] for e in self.of_kind(events.EXHAUSTED)], ["a"], name)
            self.assertEqual(self.routed(), ("b", "ceiling"), name)
            self.assertEqual(
                self.of_kind(events.SWITCHED),
                [{"account": "b", "previous": "a", "reason": "ceiling"}],
                name,
            )
            self.assertEqual(self.routed(), ("b", "primary"), name)
            self.assertEqual(len(self.of_kind(events.SWITCHED)), 1, name)

    def test_aggregate_rejected_on_200_lasts_until_reset(self) -> None:
        """
        An aggregate-only "rejected" on a 200 (overage in use) takes the
        account out until the report's reset, after which it serves again.
        """
        self.make_router("a", "b")
        self.route()
        self.respond("a", 200, self.CASES["rejected, aggregate only (overage in use)"])
        self.assertEqual(self.account("a").exhausted_until, FIVE_HOUR_RESET)
        self.assertFalse(self.pool.serviceable(self.account("a"), FIVE_HOUR_RESET - 1))
        self.assertTrue(self.pool.serviceable(self.account("a"), FIVE_HOUR_RESET))

    def test_aggregate_rejected_with_per_model_window_stays_scoped(self) -> None:
        """
        When a 200's aggregate "rejected" is explained by a rejected
        per-model window, only that family is taken out: the account keeps
        serving Sonnet requests while Opus requests move on.
        """
        self.make_router("a", "b")
        self.route()
        self.respond(
            "a",
            200,
            subscription_headers(
                0.3,
                0.4,
                status="rejected",
                extra={
                    U + "representative-claim": "seven_day_opus",
                    U + "7d_opus-status": "rejected",
                    U + "7d_opus-reset": str(int(SEVEN_DAY_RESET)),
                },
            ),
            RouteContext("s", OPUS),
        )
        self.assertIsNone(self.account("a").exhausted_until)
        self.assertEqual(self.routed(RouteContext("s", SONNET)), ("a", "primary"))
        self.assertEqual(self.routed(RouteContext("s", OPUS)), ("b", "ceiling"))

    def test_below_hard_threshold_stays(self) -> None:
        """
        Just below the hard threshold, with statuses allowed or
        allowed_warning and a rejected overage window, the primary keeps
        serving.
        """
        self.make_router("a", "b")
        self.route()
        self.respond("a", 200, subscription_headers(0.994, 0.99, five_status="allowed_warning"))
        self.assertEqual(self.routed(), ("a", "primary"))
        self.assertEqual(self.of_kind(events.EXHAUSTED), [])

    def test_exhausted_event_only_on_transition(self) -> None:
        """
        The "exhausted" event is emitted when an account reaches the ceiling,
        not again for each later response that finds it there.
        """
        self.make_router("a", "b")
        self.route()
        self.respond("a", 200, subscription_headers(0.996, 0.2))
        self.respond("a", 200, subscription_headers(0.998, 0.2))
        self.assertEqual(len(self.of_kind(events.EXHAUSTED)), 1)

    def test_per_model_window_moves_only_its_family(self) -> None:
        """
        A rejected per-model weekly window (7d_opus) leaves the primary
        serving other families; an Opus request moves with reason "ceiling".
        """
        self.make_router("a", "b")
        self.route()
        self.respond(
            "a",
            200,
            subscription_headers(
                0.3,
                0.4,
                extra={
                    U + "7d_opus-status": "rejected",
                    U + "7d_opus-utilization": "1.0",
                    U + "7d_opus-reset": str(int(SEVEN_DAY_RESET)),
                },
            ),
        )
        self.assertEqual(self.routed(RouteContext("s", SONNET)), ("a", "primary"))
        self.assertEqual(self.routed(RouteContext("s", "claude-3-5-haiku-20241022")), ("a", "primary"))
        self.assertEqual(self.routed(RouteContext("s", OPUS)), ("b", "ceiling"))


class Quota429Tests(RouterHarness):
    def test_quota_429_retries_elsewhere(self) -> None:
        """
        A 429 carrying a quota verdict returns True (retry on another
        account), marks the account exhausted until the report's reset (or
        60 s when it names none in the future), and the retry goes to the
        next account with reason "quota-429" and a "switched" event.  The
        account serves again once that reset has passed.
        """
        cases = [
            (
                "5h rejected",
                subscription_headers(1.0, 0.4, status="rejected", five_status="rejected"),
                FIVE_HOUR_RESET,
            ),
            (
                "7d rejected, per-window only",
                {
                    U + "7d-status": "rejected",
                    U + "7d-reset": str(int(SEVEN_DAY_RESET)),
                    U + "7d-utilization": "1.0",
                    U + "5h-status": "allowed",
                    U + "5h-reset": str(int(FIVE_HOUR_RESET)),
                    U + "5h-utilization": "0.2",
                },
                SEVEN_DAY_RESET,
            ),
            (
                "aggregate only",
                {
                    U + "status": "rejected",
                    U + "reset": str(int(NOW + 1234)),
                    U + "representative-claim": "five_hour",
                    "retry-after": "1234",
                },
                NOW + 1234,
            ),
            ("rejected without a reset", {U + "status": "rejected"}, NOW + 60),
            (
                "rejected with a past reset",
                {U + "status": "rejected", U + "reset": str(int(NOW - 10))},
                NOW + 60,
            ),
        ]
        for name, headers, until in cases:
            self.make_router("a", "b", "c")
            self.assertEqual(self.routed(), ("a", "primary"), name)
            self.assertTrue(self.respond("a", 429, headers), name)
            self.assertEqual(self.account("a").exhausted_until, until, name)
            self.assertEqual(self.router.status_of(self.account("a")), Status.EXHAUSTED, name)
            self.assertEqual(self.routed(tried=frozenset({"a"})), ("b", "quota-429"), name)
            self.assertEqual(
                self.of_kind(events.SWITCHED),
                [{"account": "b", "previous": "a", "reason": "quota-429"}],
                name,
            )
            self.assertEqual([e["account"] for e in self.of_kind(events.EXHAUSTED)], ["a"], name)
            self.assertFalse(self.pool.serviceable(self.account("a"), until - 1), name)
            self.assertTrue(self.pool.serviceable(self.account("a"), until), name)

    def test_429_at_known_ceiling_is_a_quota_429(self) -> None:
        """
        A 429 without headers on an account already known to be at the hard
        threshold is taken as a quota verdict, not a transient limit.
        """
        self.make_router("a", "b")
        self.route()
        self.respond("a", 200, subscription_headers(0.999, 0.2))
        self.assertTrue(self.respond("a", 429, {"x-should-retry": "true"}))
        self.assertEqual(self.account("a").exhausted_until, NOW + 60)

    def test_route_never_returns_tried(self) -> None:
        """
        route(tried=...) never returns an account already tried for this
        request, and with every serviceable account tried it answers that
        all are exhausted.
        """
        cases = [
            (frozenset(), "a"),
            (frozenset({"a"}), "b"),
            (frozenset({"a", "b"}), "c"),
            (frozenset({"b"}), "a"),
            (frozenset({"b", "c"}), "a"),
            (frozenset({"a", "c"}), "b"),
            (frozenset({"a", "b", "c"}), None),
        ]
        for tried, expected in cases:
            self.make_router("a", "b", "c")
            self.route()
            decision = self.route(tried=tried)
            self.assertEqual(decision.account.name if decision.account else None, expected, tried)
            if expected is None:
                self.assertEqual(decision.reason, "exhausted")

    def test_each_account_tried_once_per_request(self) -> None:
        """
        A request whose every attempt draws a quota 429 visits each account
        exactly once, then gets the all-exhausted decision.
        """
        self.make_router("a", "b", "c")
        tried: set[str] = set()
        visited = []
        while True:
            decision = self.route(tried=frozenset(tried))
            if decision.account is None:
                break
            visited.append(decision.account.name)
            retry = self.respond(
                decision.account.name,
                429,
                subscription_headers(1.0, 0.3, status="rejected", five_status="rejected"),
            )
            self.assertTrue(retry)
            tried.add(decision.account.name)
        self.assertEqual(visited, ["a", "b", "c"])
        self.assertEqual(decision.reason, "exhausted")

    def test_bare_429_on_oauth_is_transient(self) -> None:
        """
        A 429 on a subscription account without a quota verdict (no
        headers, x-should-retry, or allowed statuses below the ceiling) is
        relayed: on_response returns False and the account keeps serving.
        """
        cases = [
            {},
            {"x-should-retry": "true"},
            {"x-should-retry": "true", "retry-after": "3"},
            subscription_headers(0.5, 0.3),
            subscription_headers(0.97, 0.3, five_status="allowed_warning"),
        ]
        for headers in cases:
            self.make_router("a", "b")
            self.route()
            self.assertFalse(self.respond("a", 429, headers), headers)
            self.assertIsNone(self.account("a").exhausted_until, headers)
            self.assertIsNone(self.account("a").throttled_until, headers)
            self.assertEqual(self.router.status_of(self.account("a")), Status.ACTIVE, headers)
            self.assertEqual(self.routed(), ("a", "primary"), headers)
            self.assertEqual(self.of_kind(events.EXHAUSTED) + self.of_kind(events.THROTTLED), [], headers)


class ApiKeyTests(RouterHarness):
    def test_api_key_429_throttles(self) -> None:
        """
        A 429 on an API key throttles it until its retry-after (2 s when
        absent) and returns True; the retry goes to the other key, and the
        throttled key serves again once the wait is over.
        """
        cases = [
            (dict(API_KEY_429, **{"retry-after": "30"}), 30.0),
            (dict(API_KEY_429, **{"retry-after": "7.5"}), 7.5),
            (API_KEY_429, 2.0),
            ({}, 2.0),
        ]
        for headers, wait in cases:
            self.make_router(("k1", "apikey"), ("k2", "apikey"))
            self.assertEqual(self.routed(), ("k1", "primary"))
            self.assertTrue(self.respond("k1", 429, headers), headers)
            key = self.account("k1")
            self.assertEqual(key.throttled_until, NOW + wait, headers)
            self.assertIsNone(key.exhausted_until, headers)
            self.assertEqual(self.router.status_of(key), Status.THROTTLED, headers)
            self.assertEqual(
                self.of_kind(events.THROTTLED), [{"account": "k1", "until": NOW + wait}], headers
            )
            self.assertEqual(self.routed(tried=frozenset({"k1"})), ("k2", "quota-429"), headers)
            self.clock.advance(wait)
            self.assertEqual(self.router.status_of(key), Status.ACTIVE, headers)

    def test_api_key_401_is_an_error(self) -> None:
        """
        A 401 on an API key marks the account in error (status "error", an
        "account-error" event naming no secret), returns True, and no later
        request is routed to it.
        """
        self.make_router("sub", ("k1", "apikey"), ("k2", "apikey"))
        self.account("sub").error = "token revoked"
        self.assertEqual(self.routed(), ("k1", "primary"))
        self.assertTrue(self.respond("k1", 401, {"request-id": "req_011C401"}))
        key = self.account("k1")
        self.assertIsNotNone(key.error)
        self.assertEqual(self.router.status_of(key), Status.ERROR)
        (error,) = self.of_kind(events.ACCOUNT_ERROR)
        self.assertEqual(error["account"], "k1")
        self.assertNotIn("sk-ant-api03-k1", error["message"])
        self.assertEqual(self.routed(tried=frozenset({"k1"})), ("k2", "quota-429"))
        self.clock.advance(HOUR)
        self.assertEqual(self.routed(), ("k2", "primary"))


class AllExhaustedTests(RouterHarness):
    def exhaust(self, name: str, reset: float) -> None:
        headers = subscription_headers(
            1.0, 0.5, status="rejected", five_status="rejected", five_reset=reset
        )
        self.assertTrue(self.respond(name, 429, headers))

    def test_retry_after_from_soonest_reset(self) -> None:
        """
        With every account at the ceiling the decision has no account,
        reason "exhausted", the soonest known reset, and retry_after = the
        seconds to it, rounded up so the client does not come back before
        it, clamped to [1, retry_after_cap].
        """
        cases = [
            # (resets after NOW, clock offset, cap, retry_after)
            ((10, 300), 0, 55, 10),
            ((300, 10), 0, 55, 10),
            ((11, 300), 0.6, 55, 11),  # 10.4 s left
            ((1, 300), 0.5, 55, 1),  # 0.5 s left: at least 1
            ((2, 300), 1.9, 55, 1),
            ((3600, 7200), 0, 55, 55),
            ((100, 200), 0, 30, 30),
            ((55, 200), 0, 55, 55),
        ]
        for resets, offset, cap, expected in cases:
            self.make_router("a", "b", retry_after_cap=cap)
            for name, after in zip(("a", "b"), resets):
                self.exhaust(name, NOW + after)
            self.clock.advance(offset)
            decision = self.route()
            label = (resets, offset, cap)
            self.assertIsNone(decision.account, label)
            self.assertEqual(decision.reason, "exhausted", label)
            self.assertEqual(decision.reset, NOW + min(resets), label)
            self.assertEqual(decision.retry_after, expected, label)
            self.assertIsInstance(decision.retry_after, int)

    def test_retry_after_cap_when_no_reset_known(self) -> None:
        """
        When no reset is known (accounts at the hard threshold without reset
        headers, or all in error) retry_after is retry_after_cap and there
        is no reset.
        """
        self.make_router("a", "b", retry_after_cap=42)
        for name in ("a", "b"):
            self.respond(name, 200, {U + "5h-status": "allowed_warning", U + "5h-utilization": "1.0"})
        self.assertEqual(self.route(), Decision(None, "exhausted", retry_after=42, reset=None))

        self.make_router("a", ("k", "apikey"))
        self.account("a").error = "refresh token revoked"
        self.account("k").error = "401"
        self.assertEqual(self.route(), Decision(None, "exhausted", retry_after=55, reset=None))

    def test_error_accounts_resets_ignored(self) -> None:
        """
        An account in error never comes back by itself, so its resets do
        not count toward the soonest reset.
        """
        self.make_router("a", "b")
        self.respond("a", 200, subscription_headers(0.2, 0.2, five_reset=NOW + 5))
        self.account("a").error = "401"
        self.exhaust("b", NOW + 40)
        decision = self.route()
        self.assertEqual((decision.account, decision.retry_after, decision.reset), (None, 40, NOW + 40))

    def test_throttle_counts_as_a_reset(self) -> None:
        """
        A throttled API key's retry-after deadline is a known reset.
        """
        self.make_router(("k", "apikey"))
        self.route()
        self.respond("k", 429, dict(API_KEY_429, **{"retry-after": "12"}))
        decision = self.route()
        self.assertEqual((decision.account, decision.reason, decision.retry_after), (None, "exhausted", 12))


class UsageTests(RouterHarness):
    def test_on_finished_accumulates(self) -> None:
        """
        on_finished adds each exchange to the account's totals (requests,
        failures, tokens), counts cold rebuilds (cache creation above both
        the cache read and 1000 tokens) and records when it was last used.
        """
        self.make_router("a", "b")
        a = self.account("a")
        exchanges = [
            (Usage(input_tokens=12, output_tokens=87, cache_read_input_tokens=30000, cache_creation_input_tokens=2048), True),
            (Usage(input_tokens=3, output_tokens=400, cache_creation_input_tokens=45000, cache_creation_1h=45000), True),
            (Usage(input_tokens=1, output_tokens=1, cache_creation_input_tokens=999), True),
            (None, False),
        ]
        for usage, ok in exchanges:
            self.clock.advance(5)
            self.router.on_finished(a, usage, ok, CONTEXT)
        self.assertEqual(
            a.usage.to_json(),
            {
                "requests": 4,
                "failures": 1,
                "coldRebuilds": 1,
                "inputTokens": 16,
                "outputTokens": 488,
                "cacheReadTokens": 30000,
                "cacheCreationTokens": 2048 + 45000 + 999,
            },
        )
        self.assertEqual(a.last_used, NOW + 20)
        self.assertEqual(self.account("b").usage.requests, 0)
        self.assertIsNone(self.account("b").last_used)


class SessionTests(RouterHarness):
    def test_tracked_sessions_evicts_idle(self) -> None:
        """
        Routed sessions are counted until idle more than 2 hours; a request
        refreshes its session, and requests without a session are not
        counted.
        """
        self.make_router("a")
        self.route(RouteContext("s1", SONNET))
        self.route(RouteContext(None, SONNET))
        self.clock.advance(HOUR)
        self.route(RouteContext("s2", OPUS))
        self.route(RouteContext("s3", OPUS))
        self.assertEqual(self.router.tracked_sessions(), 3)
        self.clock.advance(HOUR)  # s1 idle exactly 2 h
        self.assertEqual(self.router.tracked_sessions(), 3)
        self.clock.advance(1)
        self.assertEqual(self.router.tracked_sessions(), 2)
        self.route(RouteContext("s2", OPUS))
        self.clock.advance(HOUR)
        self.assertEqual(self.router.tracked_sessions(), 1)
        self.assertEqual(list(self.router.sessions), ["s2"])


class PersistenceTests(RouterHarness):
    def build_state(self) -> dict[str, Any]:
        """
        A saved state after some traffic: "a" was exhausted by a quota 429,
        "b" became the primary and served a few requests.
        """
        self.make_router("a", "b", ("k", "apikey"))
        self.route()
        self.respond("a", 429, subscription_headers(1.0, 0.6, status="rejected", five_status="rejected"))
        self.route(tried=frozenset({"a"}))
        self.respond(
            "b",
            200,
            subscription_headers(
                0.31,
                0.2,
                extra={U + "7d_oi-utilization": "0.05", U + "7d_oi-reset": str(int(SEVEN_DAY_RESET))},
            ),
        )
        self.router.on_finished(
            self.account("b"),
            Usage(input_tokens=3, output_tokens=50, cache_creation_input_tokens=40000),
            True,
            CONTEXT,
        )
        self.router.on_finished(self.account("b"), Usage(output_tokens=9, cache_read_input_tokens=40000), True, CONTEXT)
        self.assertEqual(self.router.primary, "b")
        # What the store writes and reads back.
        return json.loads(json.dumps(self.router.to_state()))

    def restart(self, elapsed: float) -> None:
        """
        A fresh router over the same accounts, C{elapsed} seconds later.
        """
        self.make_router("a", "b", ("k", "apikey"))
        self.clock.advance(elapsed)

    def test_round_trip(self) -> None:
        """
        to_state then restore brings back every account's quota windows,
        deadlines and usage totals and the primary; the restored router
        routes to the saved primary without a switch.
        """
        state = self.build_state()
        self.assertEqual(state["savedAt"], NOW)
        self.restart(120)
        self.router.restore(state)
        again = self.router.to_state()
        self.assertEqual(again["accounts"], state["accounts"])
        self.assertEqual(again["primary"], "b")
        self.assertEqual(self.account("a").exhausted_until, FIVE_HOUR_RESET)
        self.assertEqual(self.account("b").utilization("5h", NOW + 120), 0.31)
        self.assertEqual(self.account("b").usage.cold_rebuilds, 1)
        self.assertEqual(self.account("b").usage.tokens.output_tokens, 59)
        self.assertEqual(self.routed(), ("b", "primary"))
        self.assertEqual(self.of_kind(events.SWITCHED), [])

    def test_primary_kept_only_within_cache_ttl(self) -> None:
        """
        The saved primary is kept only when the restart comes within 3600 s
        of savedAt (not from a savedAt in the future); quota and usage come
        back either way.
        """
        cases = [(0, "b"), (1, "b"), (3599, "b"), (3601, None), (7 * HOUR, None), (-10, None)]
        for elapsed, expected in cases:
            state = self.build_state()
            self.restart(elapsed)
            self.router.restore(state)
            self.assertEqual(self.router.primary, expected, elapsed)
            self.assertEqual(self.account("b").usage.requests, 2, elapsed)

    def test_primary_dropped_when_not_serviceable(self) -> None:
        """
        A saved primary that cannot serve after the restart (at the ceiling
        in its saved quota, or exhausted) is not kept; the first request
        then picks the best-ranked account as a new primary, not a switch.
        """
        for window in ("5h", "7d"):
            state = self.build_state()
            state["accounts"]["b"]["windows"][window] = {
                "utilization": 1.0,
                "reset": SEVEN_DAY_RESET,
                "status": "rejected",
            }
            self.restart(60)
            self.router.restore(state)
            self.assertIsNone(self.router.primary, window)
            self.assertEqual(self.routed(), ("k", "primary"), window)
            self.assertEqual(self.of_kind(events.SWITCHED), [], window)

        state = self.build_state()
        state["accounts"]["b"]["exhaustedUntil"] = NOW + 600
        self.restart(60)
        self.router.restore(state)
        self.assertIsNone(self.router.primary)

    def test_restore_ignores_malformed_state(self) -> None:
        """
        restore skips whatever is malformed without raising: missing or
        wrongly typed sections, unknown accounts, a primary that is not a
        configured name, and a savedAt that is not a number.
        """
        cases = [
            {},
            {"accounts": None},
            {"accounts": []},
            {"accounts": "a"},
            {"accounts": {"a": 5, "b": None, "ghost": {"windows": {}}}},
            {"accounts": {"a": {"windows": {"5h": {"utilization": "x", "reset": "y"}}, "usage": 3}}},
            {"accounts": {"a": {"windows": None, "exhaustedUntil": "later"}}},
            {"primary": ["a"], "savedAt": NOW},
            {"primary": {"name": "a"}, "savedAt": NOW},
            {"primary": "ghost", "savedAt": NOW},
            {"primary": "a", "savedAt": "2025-06-15T15:00:00Z"},
            {"primary": "a", "savedAt": None},
            {"primary": "a"},
            {"primary": "a", "savedAt": float("nan")},
            {"primary": None, "savedAt": NOW},
            {"primary": "a", "savedAt": True},
        ]
        for state in cases:
            self.make_router("a", "b")
            self.router.restore(state)
            self.assertIsNone(self.router.primary, state)
            self.assertIsNone(self.account("a").exhausted_until, state)
            self.assertEqual(self.routed(), ("a", "primary"), state)

    def test_saved_at_is_the_clock(self) -> None:
        """
        to_state stamps savedAt from the injected clock.
        """
        self.make_router("a")
        self.clock.advance(12.5)
        self.assertEqual(self.router.to_state()["savedAt"], NOW + 12.5)


class ViewTests(RouterHarness):
    def test_status_of_follows_the_clock(self) -> None:
        """
        status_of reads the injected clock: an exhausted account becomes
        active again when its reset passes.
        """
        self.make_router("a", "b")
        self.respond("a", 429, subscription_headers(1.0, 0.2, status="rejected", five_status="rejected"))
        self.assertEqual(self.router.status_of(self.account("a")), Status.EXHAUSTED)
        self.assertEqual(self.router.status_of(self.account("b")), Status.ACTIVE)
        self.clock.advance(FIVE_HOUR_RESET - NOW)
        self.assertEqual(self.router.status_of(self.account("a")), Status.ACTIVE)

    def test_report_type(self) -> None:
        """
        The reports fed to the router are the parser's QuotaReport values.
        """
        self.assertIsInstance(parse_rate_limit_headers(subscription_headers(0.1, 0.1)), QuotaReport)
