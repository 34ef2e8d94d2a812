"""
Tests for nextclaude.router: the routing policy of DESIGN.md ("The routing
policy", points 1-11) driven the way the proxy drives it.

Each test builds a pool, a L{Router} on a fake clock and an L{EventHub} whose
events are collected, then plays Claude-Code-shaped requests (bodies read by
L{inspect_request}) through L{RouterCase.serve}: open an exchange, route,
answer each attempt from a per-account script of upstream replies with real
rate-limit header shapes (PROTOCOL.md), wait what a verdict asks on the
clock, finish and close.  A test reads as a scenario: who asked, which
accounts were tried and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nextclaude import events
from nextclaude.events import Event, EventHub
from nextclaude.pool import Account, AccountPool, Thresholds
from nextclaude.quota import parse_rate_limit_headers
from nextclaude.router import (
    AFFINITY,
    ARMING,
    CEILING,
    EXHAUSTED,
    FORWARD_ONLY_WAIVED,
    FULL,
    LANDED_AFTER_COMPACTION,
    MANUAL,
    NAIVE,
    NO_CREDENTIALS,
    PRIMARY,
    PROBE,
    QUOTA_429,
    RETRY_401,
    RETRY_403,
    RETRY_THROTTLE,
    RETRY_TRANSIENT,
    TTL_EXPIRED,
    Decision,
    Exchange,
    Router,
    Verdict,
)
from nextclaude.sessions import RequestFacts, inspect_request
from nextclaude.usage import Usage
from tests.test_pool import FIVE_HOUR_RESET, HOUR, NOW, OPUS, SEVEN_DAY_RESET, SONNET, U, config

HAIKU = "claude-haiku-4-5-20251001"
MESSAGES = b"/v1/messages?beta=true"
COUNT_TOKENS = b"/v1/messages/count_tokens?beta=true"

# Claude Code session ids (one per conversation; shared by its subagents
# and side requests).
X = "5f0c7a52-8d1e-4b7a-9f3e-2c6d1a0b9e47"
Y = "0b6f3e1d-22aa-4c4e-8d51-7e9a3c2f1b60"
Z = "c3a9e0f4-71b2-4d6e-a8f3-5b0c9d2e1f74"
W = "8e1d4c7b-0a3f-4b59-9c62-d7e0f1a2b3c4"
NEW = "4a7b2c9d-6e1f-4a08-b3c5-9d8e7f6a5b41"
OTHER = "e9f8d7c6-b5a4-4392-8170-6f5e4d3c2b1a"

SUMMARY_REQUEST = (
    "Your task is to create a detailed summary of the conversation so far, paying close "
    "attention to the user's explicit requests and your previous actions. Wrap your analysis "
    "in <analysis> tags, then give the summary in <summary> tags."
)
CONTINUATION = (
    "This session is being continued from a previous conversation that ran out of context. "
    "The conversation is summarized below:\n<summary>Fixing the flaky scheduler test.</summary>"
)

# A turn with a warm cache: mostly reads, a little written and generated.
TURN_USAGE = Usage(input_tokens=60, output_tokens=700, cache_read_input_tokens=48_000, cache_creation_input_tokens=1_200)


def headers(
    five: float | None = None,
    seven: float | None = None,
    *,
    status: str = "allowed",
    five_status: str | None = None,
    seven_status: str | None = None,
    five_reset: float = FIVE_HOUR_RESET,
    seven_reset: float = SEVEN_DAY_RESET,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """
    A subscription response's rate-limit headers (PROTOCOL.md): aggregate
    status and reset, per-window fields, and the overage headers of an
    organisation without extra usage.
    """
    out = {
        U + "status": status,
        U + "reset": str(int(five_reset)),
        U + "representative-claim": "five_hour",
        U + "overage-status": "rejected",
        U + "overage-disabled-reason": "org_level_disabled",
        U + "fallback": "available",
        U + "fallback-percentage": "0.5",
        "content-type": "text/event-stream; charset=utf-8",
        "request-id": "req_011CRouterTest",
    }
    if five is not None or five_status is not None:
        out[U + "5h-status"] = five_status or ("allowed_warning" if (five or 0) >= 0.9 else "allowed")
        out[U + "5h-reset"] = str(int(five_reset))
        if five is not None:
            out[U + "5h-utilization"] = repr(five)
    if seven is not None or seven_status is not None:
        out[U + "7d-status"] = seven_status or "allowed"
        out[U + "7d-reset"] = str(int(seven_reset))
        if seven is not None:
            out[U + "7d-utilization"] = repr(seven)
    out.update(extra or {})
    return out


def window(name: str, utilization: float, status: str = "allowed") -> dict[str, str]:
    """The headers of one more weekly window (7d_oi, or a per-model one like 7d_opus)."""
    return {
        f"{U}{name}-status": status,
        f"{U}{name}-utilization": repr(utilization),
        f"{U}{name}-reset": str(int(SEVEN_DAY_RESET)),
    }


def spent(five_reset: float = FIVE_HOUR_RESET, seven: float = 0.4) -> dict[str, str]:
    """
    A quota 429's headers: the 5-hour window rejected at 100%.
    """
    return headers(1.0, seven, status="rejected", five_status="rejected", five_reset=five_reset)


# A 429 without any rate-limit header: a transient limit on that request.
BARE_429 = {"content-type": "application/json", "request-id": "req_011CBare429", "x-should-retry": "true"}

# An API key's 429 (PROTOCOL.md): per-kind limits with RFC 3339 resets and
# retry-after in seconds.
API_KEY_429 = {
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "0",
    "anthropic-ratelimit-requests-reset": "2025-06-15T15:07:00Z",
    "anthropic-ratelimit-tokens-limit": "40000",
    "anthropic-ratelimit-tokens-remaining": "0",
    "anthropic-ratelimit-tokens-reset": "2025-06-15T15:07:30Z",
    "retry-after": "20",
    "content-type": "application/json",
    "request-id": "req_011CApiKey429",
}


# -- Claude Code 2.1.x shaped request bodies -----------------------------------


def _cache(ttl: str) -> dict[str, str]:
    return {"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}


def body(
    session: str,
    messages: list[dict[str, Any]],
    *,
    model: str = SONNET,
    ttl: str = "1h",
    max_tokens: int = 32000,
    system: str = "You are Claude Code, Anthropic's official CLI for Claude.",
    tools: tuple[str, ...] = ("Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write"),
) -> bytes:
    """
    A Messages API body in Claude Code's key order: model, messages, system,
    tools, metadata (user_id as a JSON string), max_tokens, stream.
    """
    return json.dumps(
        {
            "model": model,
            "messages": messages,
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cc_entrypoint=cli"},
                {"type": "text", "text": system, "cache_control": _cache(ttl)},
            ],
            "tools": [{"name": name, "input_schema": {"type": "object"}} for name in tools],
            "metadata": {
                "user_id": json.dumps(
                    {"device_id": "9c2d" * 16, "account_uuid": "1e5b8a90-3f4c-4d2e-b6a7-8c9d0e1f2a3b", "session_id": session}
                )
            },
            "max_tokens": max_tokens,
            "stream": True,
        }
    ).encode("utf-8")


def _user(text: str, ttl: str | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": text}
    if ttl is not None:
        block["cache_control"] = _cache(ttl)
    return {"role": "user", "content": [block]}


HISTORY = [
    _user("The scheduler test fails on CI; find out why."),
    {"role": "assistant", "content": [{"type": "text", "text": "Reading tests/test_scheduler.py first."}]},
]


def turn(session: str, *, ttl: str = "1h", model: str = SONNET) -> RequestFacts:
    """An ordinary main-thread request of a session."""
    messages = HISTORY + [_user("Run the test again.", ttl)]
    return inspect_request(MESSAGES, session.encode(), body(session, messages, ttl=ttl, model=model))


def compaction(session: str, *, ttl: str = "1h") -> RequestFacts:
    """Claude Code's auto-compaction request: the history plus the summary instruction."""
    messages = HISTORY + [_user(SUMMARY_REQUEST, ttl)]
    return inspect_request(MESSAGES, session.encode(), body(session, messages, ttl=ttl))


def landing(session: str, *, ttl: str = "1h") -> RequestFacts:
    """The first request after a compaction: it opens with the continuation summary."""
    messages = [_user(CONTINUATION), _user("Please continue.", ttl)]
    return inspect_request(MESSAGES, session.encode(), body(session, messages, ttl=ttl))


def side(session: str, *, continuation: bool = False) -> RequestFacts:
    """A side request (the quota check: max_tokens 1) sharing the session header."""
    first = CONTINUATION if continuation else "quota"
    return inspect_request(MESSAGES, session.encode(), body(session, [_user(first)], model=HAIKU, max_tokens=1))


def count_tokens(session: str) -> RequestFacts:
    """A count_tokens request of the session."""
    return inspect_request(COUNT_TOKENS, session.encode(), body(session, [_user(CONTINUATION)]))


def subagent(session: str) -> RequestFacts:
    """A subagent's request: same session header, its own prompt, no markers."""
    messages = [_user("Find every caller of Scheduler.dispatch.", "1h")]
    return inspect_request(
        MESSAGES,
        session.encode(),
        body(session, messages, system="You are an agent for Claude Code.", tools=("Bash", "Grep", "Read")),
    )


def agent(session: str, agent_id: str = "ac4d2479465dd9c5c") -> RequestFacts:
    """A subagent's request as Claude Code 2.1 sends it: the session's header and its own agent id."""
    return replace(subagent(session), agent_id=agent_id)


# -- the driver ------------------------------------------------------------------


@dataclass
class Reply:
    """
    One scripted upstream answer; C{headers} None means the account's
    current quota headers (L{RouterCase.quota}).
    """

    status: int = 200
    headers: dict[str, str] | None = None
    usage: Usage | None = field(default_factory=lambda: TURN_USAGE)


@dataclass
class Outcome:
    """What one client request went through."""

    exchange: Exchange
    decisions: list[Decision]
    verdicts: list[Verdict]
    status: int | None

    @property
    def route(self) -> list[tuple[str | None, str]]:
        return [(d.account.name if d.account else None, d.reason) for d in self.decisions]

    @property
    def last(self) -> Decision:
        return self.decisions[-1]

    @property
    def account(self) -> str | None:
        return self.last.account.name if self.last.account else None

    @property
    def reason(self) -> str:
        return self.last.reason


class RouterCase(SynchronousTestCase):
    """
    A router over a pool of named accounts, a L{Clock} set to C{NOW}, and
    every event collected in C{self.events}.
    """

    # The policy a test case runs unless build() is told otherwise.
    policy = FULL

    def build(
        self,
        *specs: str | tuple[str, str] | tuple[str, str, int],
        policy: str | None = None,
        retry_after_cap: int = 55,
        probe_interval: float = 15.0,
    ) -> Router:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.configs = [config(spec) if isinstance(spec, str) else config(*spec) for spec in specs]
        self.pool = AccountPool(self.configs, Thresholds(switch=0.98, hard=0.995))
        self.hub = EventHub()
        self.events: list[Event] = []
        self.hub.subscribe(self.events.append)
        self.router = Router(
            self.pool,
            self.clock.seconds,
            self.hub,
            retry_after_cap=retry_after_cap,
            probe_interval=probe_interval,
            policy=policy or self.policy,
        )
        self.quota: dict[str, dict[str, str]] = {}
        return self.router

    def account(self, name: str) -> Account:
        account = self.pool.get(name)
        assert account is not None
        return account

    def learn(self, name: str, quota: dict[str, str]) -> None:
        """
        Set what an account's responses say about its quota from now on,
        and what the router already knows (as if a response had said it).
        """
        self.quota[name] = quota
        self.account(name).observe_quota(parse_rate_limit_headers(quota, self.clock.seconds()), self.clock.seconds())

    def serve(self, facts: RequestFacts, script: dict[str, list[Reply]] | None = None) -> Outcome:
        """
        Run one client request's attempts the way the scheduler does,
        answering each from C{script} (then 200 with the account's quota).
        """
        router = self.router
        script = {name: list(replies) for name, replies in (script or {}).items()}
        exchange = router.open(facts)
        decisions: list[Decision] = []
        verdicts: list[Verdict] = []
        status: int | None = None
        try:
            for _ in range(12):
                decision = router.route(exchange)
                decisions.append(decision)
                account = decision.account
                if account is None:
                    status = 429
                    break
                replies = script.get(account.name)
                reply = replies.pop(0) if replies else Reply()
                quota = reply.headers if reply.headers is not None else self.quota.get(account.name, {})
                verdict = router.on_response(
                    exchange, account, reply.status, parse_rate_limit_headers(quota, self.clock.seconds())
                )
                verdicts.append(verdict)
                if verdict.serve:
                    status = reply.status
                    router.on_finished(exchange, account, reply.usage, reply.status < 500)
                    break
                if verdict.delay:
                    self.clock.advance(verdict.delay)
            else:
                self.fail(f"no end after 12 attempts: {decisions}")
        finally:
            router.close(exchange)
        return Outcome(exchange, decisions, verdicts, status)

    def where(self, facts: RequestFacts, script: dict[str, list[Reply]] | None = None) -> tuple[str | None, str]:
        """The account that served a request and why."""
        outcome = self.serve(facts, script)
        return outcome.account, outcome.reason

    def status(self, name: str) -> str:
        return self.router.status_of(self.account(name)).value

    def flags(self, name: str) -> list[str]:
        return self.router.flags_of(self.account(name))

    def emitted(self, kind: str) -> list[dict[str, Any]]:
        return [event.data for event in self.events if event.kind == kind]

    def session_account(self, key: str) -> str | None:
        session = self.router.sessions.get("s:" + key)
        return session.account if session is not None else None


# -- 1. ranking --------------------------------------------------------------------


class RankingTests(RouterCase):
    """
    DESIGN.md point 1: the first primary (and every successor) is the best
    by (priority, over switchThreshold, 5h rounded to 0.5%, 7d rounded to
    0.5%, config order) among serviceable accounts.
    """

    # Written for the arming baseline's primary; placement's own are in test_placement.
    policy = ARMING

    def first_primary(self, specs: list[Any], quotas: dict[str, dict[str, str]]) -> str | None:
        self.build(*specs)
        for name, quota in quotas.items():
            self.learn(name, quota)
        return self.serve(turn(X)).account

    def test_ranking_table(self) -> None:
        """
        New sessions go to the best-ranked account: lower priority first,
        then any window at/over the switch threshold last, then 5h and 7d
        utilization in 0.5% steps (near-equal values tie and config order
        decides), unknown quota counting as 0%, API keys after every
        subscription account, and exhausted, throttled or erroring accounts
        never.
        """
        cases: list[tuple[str, list[Any], dict[str, dict[str, str]], str]] = [
            ("config order when nothing is known", ["a", "b", "c"], {}, "a"),
            ("unknown quota counts as 0%", ["a", "b"], {"a": headers(0.05, 0.05)}, "b"),
            ("priority beats quota", [("a", "oauth", 1), "b"], {"b": headers(0.9, 0.9)}, "b"),
            ("API keys last", [("key", "apikey"), "a"], {"a": headers(0.9, 0.9)}, "a"),
            ("least 5h used", ["a", "b"], {"a": headers(0.40, 0.1), "b": headers(0.20, 0.6)}, "b"),
            ("7d breaks a 5h tie", ["a", "b"], {"a": headers(0.30, 0.5), "b": headers(0.30, 0.2)}, "b"),
            ("0.5% rounding ties, order decides", ["a", "b"], {"a": headers(0.302, 0.2), "b": headers(0.299, 0.2)}, "a"),
            ("a full 0.5% step counts", ["a", "b"], {"a": headers(0.304, 0.2), "b": headers(0.298, 0.2)}, "b"),
            ("7d over switch goes last", ["a", "b"], {"a": headers(0.10, 0.985), "b": headers(0.90, 0.5)}, "b"),
            ("7d_oi is account-wide", ["a", "b"], {"a": headers(0.1, 0.1, extra=window("7d_oi", 0.99)), "b": headers(0.5, 0.5)}, "b"),
            ("exhausted never", ["a", "b"], {"a": spent(), "b": headers(0.97, 0.97)}, "b"),
        ]
        for label, specs, quotas, expected in cases:
            self.assertEqual(self.first_primary(specs, quotas), expected, label)

    def test_throttled_and_error_accounts_are_not_ranked(self) -> None:
        """
        A throttled account and one with a credential error are left out of
        the ranking even when they have the most quota.
        """
        self.build("a", "b", "c")
        self.learn("c", headers(0.6, 0.6))
        self.account("a").throttled_until = NOW + 30
        self.account("b").error = "the OAuth token was rejected (401)"
        self.assertEqual(self.where(turn(X)), ("c", PRIMARY))

    def test_per_model_window_counts_for_its_family_only(self) -> None:
        """
        A per-model weekly window (7d_opus) counts only for requests of that
        family: opus requests leave an account whose opus window is spent
        and rank others by their opus windows too, while sonnet and haiku
        requests stay on it and nothing arms; a request whose family can't
        be told counts every window.
        """
        self.build("a", "b", "c")
        self.learn("a", headers(0.2, 0.2, extra=window("7d_opus", 1.0, "rejected")))
        self.learn("b", headers(0.3, 0.1, extra=window("7d_opus", 0.985)))
        self.learn("c", headers(0.5, 0.5))
        self.assertEqual(self.where(turn(X, model=SONNET)), ("a", PRIMARY))
        self.assertEqual(self.where(turn(Y, model=HAIKU)), ("a", PRIMARY))
        # b's opus window is over the switch threshold: for opus it ranks last.
        self.assertEqual(self.where(turn(Z, model=OPUS)), ("c", PRIMARY))
        self.assertEqual(self.where(turn(W, model="some-unnamed-model")), ("c", PRIMARY))
        self.assertEqual(self.router.primary, "a")
        self.assertEqual(self.emitted(events.ARMED), [])
        self.assertNotIn(self.status("a"), ("armed", "draining"))


# -- 2. primary and affinity ----------------------------------------------------------


class PrimaryTests(RouterCase):
    """
    DESIGN.md point 2 and PRODUCT.md "stay on one account": new sessions go
    to the warm primary, and a session stays where its cache is.
    """

    # Written for the arming baseline's primary; placement's own are in test_placement.
    policy = ARMING

    def test_new_sessions_go_to_the_primary(self) -> None:
        """
        Every new session starts on the primary, not on the account with
        the most quota left; later requests say affinity.
        """
        self.build("a", "b")
        self.learn("a", headers(0.7, 0.5))
        self.assertEqual(self.where(turn(X)), ("b", PRIMARY))
        self.learn("b", headers(0.8, 0.6))
        self.assertEqual(self.where(turn(Y)), ("b", PRIMARY))
        self.assertEqual(self.where(turn(X)), ("b", AFFINITY))
        self.assertEqual(self.flags("b"), ["primary"])
        self.assertEqual(self.flags("a"), [])
        self.assertEqual(self.router.tracked_sessions(), 2)

    def test_affinity_keeps_a_session_on_its_account(self) -> None:
        """
        A session stays on the account it started on while that account
        can serve, even after the primary has moved on: every kind of
        request of it (turns, subagents, side requests) says affinity.
        """
        self.build("a", "b")
        self.learn("b", headers(0.5, 0.3))
        self.serve(turn(X))
        self.learn("a", headers(0.981, 0.3))
        self.serve(turn(X))
        self.assertEqual(self.router.primary, "b")
        for facts in (turn(X), subagent(X), side(X), count_tokens(X), turn(X)):
            self.assertEqual(self.where(facts), ("a", AFFINITY))
        self.assertEqual(self.emitted(events.SWITCHED), [])

    def test_request_without_session_goes_to_primary(self) -> None:
        """
        A request with no session key (not a Messages call) is served by
        the primary and tracks no session; retried elsewhere, its decision
        says why.
        """
        self.build("a", "b")
        facts = inspect_request(b"/v1/models", None, b"")
        self.assertIsNone(facts.session_key)
        self.assertEqual(self.where(facts), ("a", PRIMARY))
        self.assertEqual(self.router.tracked_sessions(), 0)
        outcome = self.serve(facts, {"a": [Reply(429, spent())]})
        self.assertEqual(outcome.route, [("a", PRIMARY), ("b", QUOTA_429)])


class StatusIntervalTests(RouterCase):
    """
    Under placement the status (primary, draining, successor) may lag the
    traffic by the router's status_interval; settle() catches up.
    """

    def test_status_lags_by_the_interval_and_settle_catches_up(self) -> None:
        """
        Within the interval of the last refresh a response leaves the
        status as it was and says when it is due; settle() brings it up to
        date, and once the interval has passed a response does so itself.
        """
        self.build("a", "b")
        self.router.status_interval = 60.0
        self.serve(turn(X))
        self.assertEqual(self.router.primary, "a")
        self.assertIsNone(self.router.status_due())
        self.learn("a", headers(0.981, 0.3))
        self.serve(turn(X))
        self.assertEqual(self.router.primary, "a")
        self.assertEqual(self.router.status_due(), NOW + 60.0)
        self.router.settle()
        self.assertEqual(self.router.primary, "b")
        self.assertIsNone(self.router.status_due())

        self.learn("b", headers(0.981, 0.3))
        self.learn("a", headers(0.2, 0.3))
        self.clock.advance(60.0)
        self.serve(turn(X))
        self.assertEqual(self.router.primary, "a")
        self.assertIsNone(self.router.status_due())

    def test_without_an_interval_every_response_refreshes(self) -> None:
        """The default interval of 0 keeps the status current after every response."""
        self.build("a", "b")
        self.serve(turn(X))
        self.learn("a", headers(0.981, 0.3))
        self.serve(turn(X))
        self.assertEqual(self.router.primary, "b")
        self.assertIsNone(self.router.status_due())


class SubagentHomeTests(RouterCase):
    """
    Subagent requests (x-claude-code-agent-id) of every session go where
    the last one was served while the subagents' prefix is warm there; the
    sessions stay where they are.
    """

    def sessions_apart(self) -> None:
        """Session X on account a, session Y on b (a went past the switch threshold in between)."""
        self.build("a", "b")
        self.serve(turn(X))
        self.learn("a", headers(0.981, 0.3))
        self.serve(turn(Y))
        self.learn("a", headers(0.2, 0.3))

    def test_subagents_share_one_account_while_warm(self) -> None:
        """
        With sessions on two accounts, a subagent request of either goes to
        the account that served the last subagent request, within the cache
        TTL, and its session does not move; past the TTL it goes with its
        session again.
        """
        self.sessions_apart()
        self.assertEqual((self.session_account(X), self.session_account(Y)), ("a", "b"))
        self.assertEqual(self.where(agent(Y)), ("b", AFFINITY))
        self.assertEqual(self.where(agent(X, "0123456789abcdef0")), ("b", AFFINITY))
        self.assertEqual((self.session_account(X), self.session_account(Y)), ("a", "b"))
        self.assertEqual(self.emitted(events.SWITCHED), [])
        self.learn("b", headers(0.6, 0.3))
        self.clock.advance(3601)
        self.serve(turn(X))
        self.assertEqual(self.session_account(X), "a")
        self.assertEqual(self.where(agent(X)), ("a", AFFINITY))

    def test_the_home_must_serve_and_a_pin_wins(self) -> None:
        """
        A home at its ceiling is passed over (the subagent goes with its
        session), and under a manual pin subagents follow the pin like
        every request.
        """
        self.sessions_apart()
        self.assertEqual(self.where(agent(Y)), ("b", AFFINITY))
        self.learn("b", headers(0.999, 0.3, status="rejected"))
        self.assertEqual(self.where(agent(X))[0], "a")
        self.learn("b", headers(0.2, 0.3))
        self.router.pin("a")
        self.assertEqual(self.where(agent(Y))[0], "a")


# -- 3. arming --------------------------------------------------------------------------


class ArmingTests(RouterCase):
    """
    DESIGN.md point 3: at switchThreshold the primary arms; one successor
    becomes primary at once and the old primary drains.
    """

    # The arming baseline (a benchmark policy now); placement has its own tests.
    policy = ARMING

    def test_arming_picks_one_successor(self) -> None:
        """
        The primary answering at 98% arms: the best-ranked other account
        becomes the successor and the primary for new sessions at once; the
        old one is draining; one armed event names both.
        """
        self.build("a", "b", "c")
        self.learn("b", headers(0.4, 0.2))
        self.serve(turn(X))
        self.quota["a"] = headers(0.98, 0.5)
        self.serve(turn(X))
        self.assertEqual(self.emitted(events.ARMED), [{"account": "a", "successor": "c"}])
        self.assertEqual(self.router.primary, "c")
        self.assertEqual(self.status("a"), "draining")
        self.assertEqual(self.flags("a"), [])
        self.assertEqual(self.status("c"), "active")
        self.assertEqual(self.flags("c"), ["primary", "successor"])
        self.assertEqual(self.where(turn(NEW)), ("c", PRIMARY))

    def test_successor_out_with_only_the_draining_account_left(self) -> None:
        """
        When the successor runs out and the only account that can still
        serve is the draining one (past the switch threshold, below the
        ceiling), that account becomes the primary again: the primary flag
        never stays on an account that cannot serve.
        """
        self.build("a", "b")
        self.serve(turn(X))
        self.quota["a"] = headers(0.985, 0.5)
        self.serve(turn(X))
        self.assertEqual(self.router.primary, "b")
        self.assertEqual(self.where(turn(NEW)), ("b", PRIMARY))
        self.quota["b"] = spent()
        self.assertEqual(self.where(turn(NEW), {"b": [Reply(429, spent())]}), ("a", QUOTA_429))
        self.assertEqual(self.router.primary, "a")
        self.assertEqual(self.status("b"), "exhausted")
        self.assertEqual(self.flags("b"), [])

    def test_armed_without_successor(self) -> None:
        """
        With no other serviceable account the primary stays armed without a
        successor and keeps every session until the ceiling.
        """
        self.build("a", "b")
        self.learn("b", spent())
        self.serve(turn(X))
        self.quota["a"] = headers(0.985, 0.5)
        self.serve(turn(X))
        self.assertEqual(self.status("a"), "armed")
        self.assertEqual(self.flags("a"), ["primary"])
        self.assertEqual(self.where(landing(X)), ("a", AFFINITY))
        self.assertEqual(self.where(turn(NEW)), ("a", PRIMARY))

    def test_three_sessions_migrate_to_one_successor(self) -> None:
        """
        Three sessions on the armed account land, one by one at their own
        compactions, all on the one successor, even when another account
        ranks better by then: traffic moves forward together, not scattered.
        """
        self.build("a", "b", "c")
        for key in (X, Y, Z):
            self.serve(turn(key))
        self.quota["a"] = headers(0.98, 0.5)
        self.serve(turn(X))
        self.assertEqual(self.router.successor, "b")
        for key in (X, Y, Z):
            self.assertEqual(self.where(compaction(key)), ("a", AFFINITY))
            self.assertEqual(self.where(landing(key)), ("b", LANDED_AFTER_COMPACTION))
            # b fills while c stays unused: c now ranks better than b.
            self.learn("b", headers(0.4, 0.3))
        self.assertEqual(
            [(e["session"], e["previous"], e["account"], e["reason"]) for e in self.emitted(events.SWITCHED)],
            [("s:" + key, "a", "b", LANDED_AFTER_COMPACTION) for key in (X, Y, Z)],
        )
        self.assertEqual(self.account("c").usage.requests, 0)


# -- 4. landing ------------------------------------------------------------------------------


class LandingTests(RouterCase):
    """
    DESIGN.md point 4 and "Compaction detection": a session leaves a
    draining account at its cheap moment, never at its compaction.
    """

    # The arming baseline (a benchmark policy now); placement has its own tests.
    policy = ARMING

    def armed(self, *names: str) -> None:
        """a is draining towards b with sessions X and Y on it."""
        self.build(*names)
        self.serve(turn(X))
        self.serve(turn(Y, ttl="5m"))
        self.quota["a"] = headers(0.98, 0.5, five_reset=NOW + 600)
        self.serve(turn(X))
        self.assertEqual(self.status("a"), "draining")

    def test_lands_after_compaction_not_on_it(self) -> None:
        """
        The compaction request and its retry stay on the warm draining
        account (a compaction-detected event each); the first
        post-compaction request lands on the successor with
        landed-after-compaction, a switched event saying so.
        """
        self.armed("a", "b")
        self.assertEqual(self.where(compaction(X)), ("a", AFFINITY))
        self.assertEqual(self.where(compaction(X)), ("a", AFFINITY))
        self.assertEqual(self.emitted(events.COMPACTION), [{"session": "s:" + X, "account": "a"}] * 2)
        self.assertEqual(self.where(landing(X)), ("b", LANDED_AFTER_COMPACTION))
        self.assertEqual(
            self.emitted(events.SWITCHED),
            [{"account": "b", "previous": "a", "reason": LANDED_AFTER_COMPACTION, "session": "s:" + X}],
        )
        self.assertEqual(self.where(turn(X)), ("b", AFFINITY))

    def test_compaction_retried_after_transient_429_stays(self) -> None:
        """
        A compaction request retried within the same exchange (after a
        transient 429) is retried on the same warm account.
        """
        self.armed("a", "b")
        outcome = self.serve(compaction(X), {"a": [Reply(429, BARE_429)]})
        self.assertEqual(outcome.route, [("a", AFFINITY), ("a", RETRY_TRANSIENT)])
        self.assertEqual(self.where(landing(X)), ("b", LANDED_AFTER_COMPACTION))

    def test_side_and_subagent_requests_never_land(self) -> None:
        """
        After a compaction, the session's subagent requests (no markers),
        its side requests (max_tokens 1, even one opening with the
        continuation text) and count_tokens stay on the draining account;
        the pending landing waits for the main thread's continuation.
        """
        self.armed("a", "b")
        self.serve(compaction(X))
        for facts in (subagent(X), side(X), side(X, continuation=True), count_tokens(X), subagent(X)):
            self.assertEqual(self.where(facts), ("a", AFFINITY))
        self.assertEqual(self.where(landing(X)), ("b", LANDED_AFTER_COMPACTION))

    def test_continuation_without_compaction_is_not_a_landing(self) -> None:
        """
        A request that merely opens with the continuation text (say, after
        --continue) is no cheap moment unless its session compacted first.
        """
        self.armed("a", "b")
        self.assertEqual(self.where(landing(X)), ("a", AFFINITY))

    def test_idle_past_ttl_moves_at_next_request(self) -> None:
        """
        A session idle longer than the cache TTL read from its requests is
        cold everywhere and moves at its next request with ttl-expired: 5
        minutes for a session without the 1h TTL, an hour for one with it.
        """
        self.armed("a", "b")
        self.clock.advance(301)
        self.assertEqual(self.where(turn(Y, ttl="5m")), ("b", TTL_EXPIRED))
        self.assertEqual(self.where(turn(X)), ("a", AFFINITY))
        self.clock.advance(3601)
        self.assertEqual(self.where(turn(X)), ("b", TTL_EXPIRED))

    def test_successor_fills_mid_migration(self) -> None:
        """
        When the successor itself arms before everyone landed, a new
        successor is ranked; sessions not yet landed go straight to it, and
        the ones on the first successor follow at their own cheap moment.
        """
        self.armed("a", "b", "c")
        self.serve(compaction(X))
        self.assertEqual(self.where(landing(X)), ("b", LANDED_AFTER_COMPACTION))
        self.quota["b"] = headers(0.98, 0.4)
        self.serve(turn(X))
        self.assertEqual(self.emitted(events.ARMED), [{"account": "a", "successor": "b"}, {"account": "b", "successor": "c"}])
        self.assertEqual((self.status("a"), self.status("b")), ("draining", "draining"))
        self.assertEqual(self.flags("c"), ["primary", "successor"])
        self.serve(compaction(Y, ttl="5m"))
        self.assertEqual(self.where(landing(Y, ttl="5m")), ("c", LANDED_AFTER_COMPACTION))
        self.serve(compaction(X))
        self.assertEqual(self.where(landing(X)), ("c", LANDED_AFTER_COMPACTION))

    def test_draining_stops_when_old_window_resets(self) -> None:
        """
        When the draining account's window resets below the threshold,
        draining stops: its sessions stay (even at their cheap moment), the
        successor stays primary and loses its successor flag.
        """
        self.armed("a", "b")
        self.clock.advance(601)
        self.quota["a"] = headers(0.02, 0.5, five_reset=NOW + 601 + 5 * HOUR)
        self.router.expire()
        self.assertEqual(self.status("a"), "active")
        self.assertEqual(self.flags("b"), ["primary"])
        self.assertIsNone(self.router.successor)
        self.serve(compaction(X))
        self.assertEqual(self.where(landing(X)), ("a", AFFINITY))
        self.assertEqual(self.where(turn(NEW)), ("b", PRIMARY))


# -- 6. ceiling -------------------------------------------------------------------------------


class CeilingTests(RouterCase):
    """
    DESIGN.md point 6: at the hard threshold, on a rejected status or a
    quota 429 the account is exhausted and sessions move at once.
    """

    def test_ceiling_table(self) -> None:
        """
        The hard threshold, a rejected aggregate status (overage in use on a
        200), and a rejected window each exhaust the account (one exhausted
        event); the session's next request moves with reason ceiling.
        """
        overage = {U + "overage-status": "allowed"}
        cases = {
            "hard threshold": headers(0.995, 0.5),
            "over 100%": headers(1.01, 0.5, five_status="allowed_warning"),
            "rejected aggregate, overage in use": headers(0.97, 0.5, status="rejected", extra=overage),
            "rejected 5h window": headers(0.9, 0.5, five_status="rejected"),
            "rejected 7d window": headers(0.5, 0.99, status="rejected", seven_status="rejected"),
        }
        for label, quota in cases.items():
            self.build("a", "b")
            self.serve(turn(X))
            self.quota["a"] = quota
            self.assertEqual(self.serve(turn(X)).status, 200, label)
            self.assertEqual(self.status("a"), "exhausted", label)
            self.assertEqual([e["account"] for e in self.emitted(events.EXHAUSTED)], ["a"], label)
            self.assertEqual(self.where(turn(X)), ("b", CEILING), label)
            self.assertEqual(self.where(turn(NEW)), ("b", PRIMARY), label)

    def test_quota_429_retried_at_once_elsewhere(self) -> None:
        """
        A quota 429 (rejected headers) exhausts the account and the request
        is retried at once (no delay) on the successor with quota-429; the
        session stays there.
        """
        self.build("a", "b", "c")
        self.serve(turn(X))
        outcome = self.serve(turn(X), {"a": [Reply(429, spent())]})
        self.assertEqual(outcome.route, [("a", AFFINITY), ("b", QUOTA_429)])
        self.assertEqual(outcome.verdicts[0], Verdict(serve=False))
        self.assertEqual(outcome.status, 200)
        self.assertEqual(self.status("a"), "exhausted")
        self.assertEqual(self.account("a").exhausted_until, FIVE_HOUR_RESET)
        self.assertEqual(self.where(turn(X)), ("b", AFFINITY))

    def test_each_account_at_most_once_per_request(self) -> None:
        """
        When every account answers a quota 429 the request tries each one
        once and then gets the synthetic 429.
        """
        self.build("a", "b", "c")
        outcome = self.serve(turn(X), {name: [Reply(429, spent())] for name in "abc"})
        self.assertEqual([name for name, _ in outcome.route], ["a", "b", "c", None])
        self.assertEqual(outcome.reason, EXHAUSTED)
        self.assertEqual(outcome.status, 429)

    def test_per_window_only_429(self) -> None:
        """
        A 429 carrying only the per-window rejection (no aggregate status)
        is a quota 429 too, not a transient one.
        """
        self.build("a", "b")
        quota = {U + "5h-status": "rejected", U + "5h-utilization": "1.0", U + "5h-reset": str(int(NOW + 900))}
        outcome = self.serve(turn(X), {"a": [Reply(429, quota)]})
        self.assertEqual(outcome.route, [("a", PRIMARY), ("b", QUOTA_429)])
        self.assertEqual(self.account("a").exhausted_until, NOW + 900)


# -- 7. forward only -------------------------------------------------------------------------


class ForwardOnlyTests(RouterCase):
    """
    DESIGN.md point 7: a session never drifts back to an account it left
    within its cache TTL, unless nothing else can serve.
    """

    def moved(self, *names: str) -> None:
        """X left a for b (a manual pin, then unpinned) and b is now spent."""
        self.build(*names)
        self.serve(turn(X))
        self.router.pin("b")
        self.assertEqual(self.where(turn(X)), ("b", MANUAL))
        self.router.pin(None)
        self.clock.advance(1800)
        self.assertEqual(self.where(turn(X)), ("b", AFFINITY))

    def test_left_account_is_excluded(self) -> None:
        """
        b's quota 429 sends the session forward to c, not back to a (the
        new primary, but left within the TTL).
        """
        self.moved("a", "b", "c")
        outcome = self.serve(turn(X), {"b": [Reply(429, spent())]})
        self.assertEqual(self.router.primary, "a")
        self.assertEqual(outcome.route, [("b", AFFINITY), ("c", QUOTA_429)])

    def test_waived_when_nothing_else_can_serve(self) -> None:
        """
        With no other account serviceable, the exclusion gives way and the
        reason says forward-only-waived.
        """
        self.moved("a", "b", "c")
        self.learn("c", spent())
        outcome = self.serve(turn(X), {"b": [Reply(429, spent())]})
        self.assertEqual(outcome.route, [("b", AFFINITY), ("a", FORWARD_ONLY_WAIVED)])

    def test_exclusion_lapses_after_ttl(self) -> None:
        """
        Once the session's TTL has passed since it left, the left account is
        as good as any other.
        """
        self.moved("a", "b", "c")
        self.clock.advance(1801)
        outcome = self.serve(turn(X), {"b": [Reply(429, spent())]})
        self.assertEqual(outcome.route, [("b", AFFINITY), ("a", QUOTA_429)])


# -- 8. manual pin ---------------------------------------------------------------------------


class ManualPinTests(RouterCase):
    """
    DESIGN.md point 8 and PRODUCT.md point 4: the manual pin.
    """

    # Written for the arming baseline's primary; placement's own are in test_placement.
    policy = ARMING

    def test_pin_moves_every_session_and_new_ones(self) -> None:
        """
        Pinning moves each session on its next request (reason manual, a
        switched event), starts new sessions there, and flags the pin.
        """
        self.build("a", "b")
        self.serve(turn(X))
        self.serve(turn(Y))
        self.router.pin("b")
        self.assertEqual(self.emitted(events.PIN_CHANGED), [{"account": "b"}])
        self.assertEqual(self.flags("b"), ["primary", "manual"])
        self.assertEqual(self.where(turn(X)), ("b", MANUAL))
        self.assertEqual(self.where(turn(NEW)), ("b", MANUAL))
        self.assertEqual(self.where(subagent(Y)), ("b", MANUAL))
        self.assertEqual(self.where(turn(X)), ("b", AFFINITY))
        self.assertEqual([e["reason"] for e in self.emitted(events.SWITCHED)], [MANUAL, MANUAL])

    def test_pin_arms_spills_and_comes_back(self) -> None:
        """
        The pin arms like any primary and spills to a successor; when its
        window resets it is primary again, and sessions return at their next
        cheap moment (not at ordinary requests).
        """
        self.build("a", "b", "c")
        self.learn("a", headers(0.5, 0.2))
        self.learn("b", headers(0.6, 0.2))
        self.learn("c", headers(0.7, 0.2))
        self.assertEqual(self.where(turn(X)), ("a", PRIMARY))
        self.router.pin("b")
        self.assertEqual(self.where(turn(X)), ("b", MANUAL))
        self.learn("c", headers(0.1, 0.1))
        reset = NOW + 1.5 * HOUR
        self.quota["b"] = headers(0.98, 0.3, five_reset=reset)
        self.serve(turn(X))
        self.assertEqual(self.emitted(events.ARMED), [{"account": "b", "successor": "c"}])
        self.assertEqual(self.status("b"), "draining")
        self.assertEqual(self.flags("b"), ["manual"])
        self.assertEqual(self.where(turn(NEW)), ("c", PRIMARY))
        self.serve(compaction(X))
        self.assertEqual(self.where(landing(X)), ("c", LANDED_AFTER_COMPACTION))
        self.clock.advance(HOUR)
        self.assertEqual(self.where(turn(X)), ("c", AFFINITY))
        self.clock.advance(reset - self.clock.seconds() + 1)
        self.quota["b"] = headers(0.01, 0.3, five_reset=reset + 5 * HOUR)
        self.router.expire()
        self.assertEqual(self.router.primary, "b")
        self.assertEqual(self.flags("b"), ["primary", "manual"])
        self.assertEqual(self.where(turn(X)), ("c", AFFINITY))
        self.assertEqual(self.where(compaction(X)), ("c", AFFINITY))
        self.assertEqual(self.where(landing(X)), ("b", LANDED_AFTER_COMPACTION))
        self.assertEqual(self.where(turn(OTHER)), ("b", MANUAL))

    def test_pin_move_waits_while_pin_cannot_serve(self) -> None:
        """
        A session's move to the pin waits while the pinned account cannot
        serve (throttled): it stays where it is meanwhile, and moves (reason
        manual) on its first request once the pin can take it.
        """
        self.build("a", "b")
        self.serve(turn(X))
        self.router.pin("b")
        self.router.pool.get("b").throttled_until = self.clock.seconds() + 60
        self.assertEqual(self.where(turn(X)), ("a", AFFINITY))
        self.clock.advance(61)
        self.assertEqual(self.where(turn(X)), ("b", MANUAL))

    def test_pin_none_clears(self) -> None:
        """
        pin(None) clears the pin (an event with no account): sessions not yet
        moved stay, and new sessions go to the primary.
        """
        self.build("a", "b")
        self.serve(turn(X))
        self.router.pin("b")
        self.router.pin(None)
        self.assertEqual(self.emitted(events.PIN_CHANGED), [{"account": "b"}, {"account": None}])
        self.assertIsNone(self.router.manual)
        self.assertEqual(self.flags("b"), ["primary"])
        self.assertEqual(self.where(turn(X)), ("a", AFFINITY))
        self.assertEqual(self.where(turn(NEW)), ("b", PRIMARY))

    def test_pin_unknown_account(self) -> None:
        """Pinning an account the pool does not have raises KeyError."""
        self.build("a")
        self.assertRaises(KeyError, self.router.pin, "nobody")
        self.assertIsNone(self.router.manual)

    def test_forget_clears_pin_and_session_pins(self) -> None:
        """
        Removing the pinned account clears the pin and the primary; its
        sessions start over on the new primary.
        """
        self.build("a", "b")
        self.router.pin("b")
        self.assertEqual(self.where(turn(X)), ("b", MANUAL))
        del self.pool.accounts["b"]
        self.router.forget("b")
        self.assertIsNone(self.router.manual)
        self.assertEqual(self.emitted(events.PIN_CHANGED)[-1], {"account": None})
        self.assertIsNone(self.session_account(X))
        self.assertEqual(self.where(turn(X)), ("a", PRIMARY))


# -- 9. all exhausted --------------------------------------------------------------------------


class ProbeTests(RouterCase):
    """
    DESIGN.md point 9 and PRODUCT.md point 5: one probe sweep at a time,
    else a prompt synthetic 429.
    """

    def test_sweep_order_and_first_recovered_serves(self) -> None:
        """
        The sweep probes with the real request, soonest reset first,
        skipping an account out of weekly quota and one with dead
        credentials; the first non-429 answer serves and its account is
        recovered.
        """
        self.build("a", "b", "c", "d", "e")
        self.learn("a", spent(five_reset=NOW + 3 * HOUR))
        self.learn("b", spent(five_reset=NOW + HOUR))
        self.learn("c", headers(0.3, 1.0, status="rejected", seven_status="rejected", five_reset=NOW + 600))
        self.learn("d", spent(five_reset=NOW + 300))
        self.account("d").error = "the OAuth token was rejected (401)"
        self.learn("e", spent(five_reset=NOW + 2 * HOUR))
        self.quota["e"] = headers(0.05, 0.4, five_reset=NOW + 5 * HOUR)
        outcome = self.serve(turn(X), {"b": [Reply(429, spent(five_reset=NOW + HOUR))]})
        self.assertEqual(outcome.route, [("b", PROBE), ("e", PROBE)])
        self.assertTrue(all(d.probe for d in outcome.decisions))
        self.assertEqual(outcome.status, 200)
        self.assertEqual([e["account"] for e in self.emitted(events.PROBE)], ["b", "e"])
        self.assertEqual(self.emitted(events.RECOVERED), [{"account": "e"}])
        self.assertEqual(self.status("e"), "active")
        self.assertEqual(self.where(turn(Y)), ("e", PRIMARY))

    def test_sweep_serves_first_non_429(self) -> None:
        """A probe answered 529 is served: only a 429 sends the sweep on."""
        self.build("a", "b")
        self.learn("a", spent(five_reset=NOW + HOUR))
        self.learn("b", spent(five_reset=NOW + 2 * HOUR))
        outcome = self.serve(turn(X), {"a": [Reply(529, {}, None)]})
        self.assertEqual(outcome.route, [("a", PROBE)])
        self.assertEqual(outcome.status, 529)

    def test_throttled_during_and_after_sweep(self) -> None:
        """
        Requests during a sweep, and within probeInterval after it, get no
        account at once: retry-after is the time to the soonest reset; after
        the interval the next request sweeps again.
        """
        self.build("a", "b")
        self.learn("a", spent(five_reset=NOW + 40))
        self.learn("b", spent(five_reset=NOW + 2 * HOUR))
        sweeping = self.router.open(turn(X))
        self.assertEqual(self.router.route(sweeping).account, self.account("a"))
        during = self.serve(turn(Y))
        self.assertEqual(during.route, [(None, EXHAUSTED)])
        self.assertEqual((during.last.retry_after, during.last.reset), (40, NOW + 40))
        self.router.close(sweeping)
        self.clock.advance(14)
        self.assertEqual(self.serve(turn(Y)).last.retry_after, 26)
        self.clock.advance(1)
        self.assertEqual(self.serve(turn(Y), {n: [Reply(429, spent())] for n in "ab"}).route[0], ("a", PROBE))

    def test_retry_after_is_clamped(self) -> None:
        """
        The synthetic 429's retry-after is the seconds to the soonest known
        reset (rounded up), clamped to [1, retryAfterCap], and the cap when
        no reset is known.
        """
        no_reset = {U + "status": "rejected", U + "5h-status": "rejected", U + "5h-utilization": "1.0"}
        # (reset, seconds passed since it was learnt, cap, retry-after)
        cases = [
            (NOW + 1, 0.6, 55, 1),
            (NOW + 8, 0.8, 55, 8),
            (NOW + 3 * HOUR, 0, 55, 55),
            (NOW + 3 * HOUR, 0, 30, 30),
            (None, 0, 55, 55),
        ]
        for reset, passed, cap, expected in cases:
            self.build("a", retry_after_cap=cap)
            self.learn("a", spent(five_reset=reset) if reset is not None else no_reset)
            self.clock.advance(passed)
            sweeping = self.router.open(turn(X))
            self.router.route(sweeping)
            decision = self.serve(turn(Y)).last
            self.assertEqual((decision.account, decision.retry_after), (None, expected), (reset, cap))
            self.router.close(sweeping)

    def test_reset_is_when_an_account_is_back(self) -> None:
        """
        The synthetic 429 names when an account can serve again: an account
        out of weekly quota is not back at its 5-hour reset, so the sooner
        5-hour reset of another account is what the client is told.
        """
        self.build("a", "b")
        self.learn("a", headers(0.3, 1.0, status="rejected", seven_status="rejected", five_reset=NOW + 10))
        self.learn("b", spent(five_reset=NOW + HOUR))
        sweeping = self.router.open(turn(X))
        self.assertEqual(self.router.route(sweeping).account, self.account("b"))
        decision = self.serve(turn(Y)).last
        self.assertEqual((decision.account, decision.retry_after, decision.reset), (None, 55, NOW + HOUR))
        self.router.close(sweeping)

    def test_no_candidates_rejects_at_once(self) -> None:
        """
        With every account dead or out of weekly quota there is nothing to
        probe: the client gets the synthetic 429 at once.
        """
        self.build("a", "b")
        self.account("a").error = "the API key was rejected (401)"
        self.learn("b", headers(0.2, 1.0, status="rejected", seven_status="rejected"))
        outcome = self.serve(turn(X))
        self.assertEqual(outcome.route, [(None, EXHAUSTED)])
        self.assertEqual(self.emitted(events.PROBE), [])


# -- 10. errors --------------------------------------------------------------------------------


class ErrorTests(RouterCase):
    """
    DESIGN.md point 10: 401, 403, transient 429 and 5xx.
    """

    def test_401_on_api_key(self) -> None:
        """
        A 401 on an API key marks it error (an account-error event) and the
        request goes on to the next account with retry-401.
        """
        self.build(("key", "apikey", 0), ("spare", "apikey", 1))
        self.serve(turn(X))
        outcome = self.serve(turn(X), {"key": [Reply(401, {})]})
        self.assertEqual(outcome.route, [("key", AFFINITY), ("spare", RETRY_401)])
        self.assertEqual(self.status("key"), "error")
        self.assertIn("API key", self.account("key").error or "")
        self.assertEqual([e["account"] for e in self.emitted(events.ACCOUNT_ERROR)], ["key"])

    def test_401_on_oauth_refreshes_once(self) -> None:
        """
        A 401 on an OAuth account that can refresh asks for one refresh and
        a retry on the same account; a second 401 marks it error and moves
        on; without a refresh possibility it is an error at once.
        """
        self.build("a", "b")
        self.router.can_refresh = lambda account: True
        outcome = self.serve(turn(X), {"a": [Reply(401, {})]})
        self.assertEqual(outcome.route, [("a", PRIMARY), ("a", RETRY_401)])
        self.assertEqual(outcome.verdicts[0], Verdict(serve=False, refresh=True))
        self.assertEqual(self.status("a"), "active")
        outcome = self.serve(turn(X), {"a": [Reply(401, {}), Reply(401, {})]})
        self.assertEqual(outcome.route, [("a", AFFINITY), ("a", RETRY_401), ("b", RETRY_401)])
        self.assertEqual(self.status("a"), "error")
        self.build("a", "b")
        outcome = self.serve(turn(X), {"a": [Reply(401, {})]})
        self.assertEqual(outcome.route, [("a", PRIMARY), ("b", RETRY_401)])

    def test_403_blames_first_when_other_succeeds(self) -> None:
        """
        A 403 is retried on one other account; when that succeeds the first
        account is marked error.
        """
        self.build("a", "b")
        self.serve(turn(X))
        outcome = self.serve(turn(X), {"a": [Reply(403, {})]})
        self.assertEqual(outcome.route, [("a", AFFINITY), ("b", RETRY_403)])
        self.assertEqual(outcome.status, 200)
        self.assertEqual(self.status("a"), "error")
        self.assertEqual(self.status("b"), "active")

    def test_403_twice_is_served_unblamed(self) -> None:
        """
        A 403 from the second account too is returned to the client and no
        account is blamed; a 403 with no other account is returned at once.
        """
        self.build("a", "b", "c")
        outcome = self.serve(turn(X), {"a": [Reply(403, {})], "b": [Reply(403, {})]})
        self.assertEqual(outcome.route, [("a", PRIMARY), ("b", RETRY_403)])
        self.assertEqual(outcome.status, 403)
        self.assertEqual([self.status(n) for n in "abc"], ["active"] * 3)
        self.assertEqual(self.emitted(events.ACCOUNT_ERROR), [])
        self.build("a")
        outcome = self.serve(turn(X), {"a": [Reply(403, {})]})
        self.assertEqual((outcome.route, outcome.status), ([("a", PRIMARY)], 403))
        self.assertEqual(self.status("a"), "active")

    def test_transient_429_recovers_on_retry(self) -> None:
        """
        One transient 429 then a 200 on the warm account: served there,
        nothing throttled.
        """
        self.build("a", "b")
        outcome = self.serve(turn(X), {"a": [Reply(429, BARE_429)]})
        self.assertEqual(outcome.route, [("a", PRIMARY), ("a", RETRY_TRANSIENT)])
        self.assertEqual(self.clock.seconds(), NOW + 2)
        self.assertEqual(self.status("a"), "active")

    def test_5xx_and_529_are_served_and_counted(self) -> None:
        """
        529 and 5xx answers pass through (Claude Code retries them), count
        as failures, and neither move the session nor mark the account.
        """
        self.build("a", "b")
        for code in (529, 500, 503):
            outcome = self.serve(turn(X), {"a": [Reply(code, {}, None)]})
            self.assertEqual((outcome.account, outcome.status), ("a", code))
        usage = self.account("a").usage
        self.assertEqual((usage.requests, usage.failures), (3, 3))
        self.assertEqual(self.status("a"), "active")
        self.assertEqual(self.where(turn(X)), ("a", AFFINITY))

    def test_connection_failure_retries_once(self) -> None:
        """
        on_unreachable allows one retry on the same account (retry-connect),
        then refuses.
        """
        self.build("a", "b")
        exchange = self.router.open(turn(X))
        first = self.router.route(exchange)
        self.assertTrue(self.router.on_unreachable(exchange, first.account))
        again = self.router.route(exchange)
        self.assertEqual((again.account.name, again.reason), ("a", "retry-connect"))
        self.assertFalse(self.router.on_unreachable(exchange, again.account))
        self.router.close(exchange)


# -- 10. what a 429 says -------------------------------------------------------------------------

# A 429's other headers besides the ones a case adds.
JSON_429 = {"content-type": "application/json", "request-id": "req_011CRouter429"}


class TooManyRequestsTests(RouterCase):
    """
    DESIGN.md point 10 (issue 10, item 7): a 429 is a quota verdict, an
    account throttle or a limit on one request, by what it says, and each
    is handled its own way.
    """

    def established(self, *names: str) -> None:
        """Session X served once on a (warm), the other accounts idle."""
        self.build(*names)
        self.assertEqual(self.where(turn(X)), ("a", PRIMARY))
        self.events.clear()

    def test_quota_verdicts_exhaust_and_move_at_once(self) -> None:
        """
        A rejected status (aggregate or per-window, with or without a
        retry-after) or an account at the ceiling exhausts the account at
        once: no wait, the request is served on the next account with
        quota-429 and the session stays there.
        """
        cases = {
            "rejected aggregate and 5h": spent(),
            "per-window only": {**JSON_429, U + "5h-status": "rejected", U + "5h-utilization": "1.0"},
            "7d rejected": headers(0.3, 1.0, status="rejected", seven_status="rejected"),
            "rejected with retry-after": {**spent(), "retry-after": "60"},
            "at the ceiling, allowed": headers(0.996, 0.4),
            "at the ceiling with retry-after": {**headers(1.0, 0.4, five_status="allowed_warning"), "retry-after": "30"},
        }
        for label, quota in cases.items():
            self.established("a", "b", "c")
            outcome = self.serve(turn(X), {"a": [Reply(429, quota, None)]})
            self.assertEqual(outcome.route, [("a", AFFINITY), ("b", QUOTA_429)], label)
            self.assertEqual(outcome.verdicts[0], Verdict(serve=False), label)
            self.assertEqual(outcome.status, 200, label)
            self.assertEqual(self.status("a"), "exhausted", label)
            self.assertEqual([e["account"] for e in self.emitted(events.EXHAUSTED)], ["a"], label)
            self.assertEqual(self.emitted(events.THROTTLED), [], label)
            self.assertEqual(self.where(turn(X)), ("b", AFFINITY), label)

    def test_account_throttle_waits_twice_then_a_sibling_serves(self) -> None:
        """
        A retry-after without a rejection (the per-minute limit among them)
        waits min(retry-after, 10 s) and retries the warm account twice;
        then the account is throttled until the last retry-after and an
        idle sibling serves the request, where the session then stays.
        """
        # (extra headers of a's three 429s, expected waits, throttle seconds)
        cases = [
            ({"retry-after": "5"}, [5.0, 5.0], 5.0),
            ({"retry-after": "30"}, [10.0, 10.0], 30.0),
            ({**headers(0.3, 0.2), "retry-after": "60"}, [10.0, 10.0], 60.0),
            ({**headers(0.97, 0.9, five_status="allowed_warning"), "retry-after": "12"}, [10.0, 10.0], 12.0),
            ({"retry-after": "0"}, [0.0, 0.0], 1.0),
        ]
        for extra, waits, throttle in cases:
            self.established("a", "b", "c")
            outcome = self.serve(turn(X), {"a": [Reply(429, {**JSON_429, **extra}, None)] * 3})
            self.assertEqual(
                outcome.route,
                [("a", AFFINITY), ("a", RETRY_THROTTLE), ("a", RETRY_THROTTLE), ("b", RETRY_THROTTLE)],
                extra,
            )
            self.assertEqual([v.delay for v in outcome.verdicts], waits + [0.0, 0.0], extra)
            self.assertEqual(outcome.status, 200, extra)
            now = self.clock.seconds()
            self.assertEqual(now, NOW + sum(waits), extra)
            self.assertEqual(self.emitted(events.THROTTLED), [{"account": "a", "until": now + throttle}], extra)
            self.assertEqual(self.emitted(events.EXHAUSTED), [], extra)
            self.assertEqual([self.status(n) for n in "abc"], ["throttled", "active", "active"], extra)
            self.assertEqual(
                self.emitted(events.SWITCHED),
                [{"account": "b", "previous": "a", "reason": RETRY_THROTTLE, "session": "s:" + X}],
                extra,
            )
            self.assertEqual(self.where(turn(X)), ("b", AFFINITY), extra)

    def test_throttled_session_moves_only_if_served_there(self) -> None:
        """
        After a's throttle waits, the sibling's answer decides: a limit on
        the request (relayed at once: the waits are spent), an overload, or
        a quota 429 that leaves nothing to serve (the synthetic 429, back at
        a's throttle end) leave the session on a, which it goes back to once
        the throttle ends.
        """
        throttle = {**JSON_429, "retry-after": "60"}
        cases = {
            "request-scoped 429": (Reply(429, BARE_429, None), 429, [("a", RETRY_THROTTLE), ("b", RETRY_THROTTLE)]),
            "529": (Reply(529, {}, None), 529, [("a", RETRY_THROTTLE), ("b", RETRY_THROTTLE)]),
            "quota 429": (Reply(429, spent(), None), 429, [("a", RETRY_THROTTLE), ("b", RETRY_THROTTLE), (None, EXHAUSTED)]),
        }
        for label, (sibling, status, tail) in cases.items():
            self.established("a", "b")
            outcome = self.serve(turn(X), {"a": [Reply(429, throttle, None)] * 3, "b": [sibling]})
            self.assertEqual(outcome.route[2:], tail, label)
            self.assertEqual(outcome.status, status, label)
            self.assertEqual(self.emitted(events.SWITCHED), [], label)
            self.assertEqual(self.session_account(X), "a", label)
            if outcome.account is None:
                self.assertEqual((outcome.last.retry_after, outcome.last.reset), (55, self.clock.seconds() + 60), label)
            self.clock.advance(60)
            self.router.expire()
            self.assertEqual(self.where(turn(X)), ("a", AFFINITY), label)

    def test_request_scoped_429_is_relayed_untouched(self) -> None:
        """
        A 429 with neither retry-after nor a rejection is about the request:
        the same account is retried twice (2 s apart), then that 429 is
        served as it is, on the account that gave it.  No account is
        throttled, exhausted, moved from or blamed, no synthetic 429 is
        made, and the session's next request goes to the same account (the
        peer's report: a, a, a, and never b, c).
        """
        cases = {
            "bare, x-should-retry": BARE_429,
            "no headers at all": {},
            "rate_limit_error body only": JSON_429,
            "unified allowed, no retry-after": headers(0.5, 0.3),
            "allowed_warning, no retry-after": headers(0.92, 0.5),
        }
        for label, quota in cases.items():
            self.established("a", "b", "c")
            outcome = self.serve(turn(X), {"a": [Reply(429, quota, None)] * 3})
            self.assertEqual(
                outcome.route, [("a", AFFINITY), ("a", RETRY_TRANSIENT), ("a", RETRY_TRANSIENT)], label
            )
            self.assertEqual(outcome.verdicts, [Verdict(serve=False, delay=2.0)] * 2 + [Verdict(serve=True)], label)
            self.assertEqual((outcome.account, outcome.status), ("a", 429), label)
            for kind in (events.THROTTLED, events.EXHAUSTED, events.SWITCHED, events.ACCOUNT_ERROR):
                self.assertEqual(self.emitted(kind), [], (label, kind))
            self.assertEqual([self.status(n) for n in "abc"], ["active"] * 3, label)
            self.assertEqual((self.account("a").throttled_until, self.account("a").exhausted_until), (None, None), label)
            self.assertEqual(self.where(turn(X)), ("a", AFFINITY), label)
            self.assertEqual(self.where(turn(NEW)), ("a", PRIMARY), label)

    def test_request_scoped_429_on_api_keys(self) -> None:
        """
        On an API key too, a 429 without retry-after is the request's: two
        retries on the same key, then relayed, the key untouched.
        """
        for quota in (BARE_429, {k: v for k, v in API_KEY_429.items() if k != "retry-after"}):
            self.build(("k1", "apikey"), ("k2", "apikey"))
            outcome = self.serve(turn(X), {"k1": [Reply(429, quota, None)] * 3})
            self.assertEqual([name for name, _ in outcome.route], ["k1"] * 3)
            self.assertEqual((outcome.account, outcome.status), ("k1", 429))
            self.assertEqual(self.status("k1"), "active")

    def test_throttle_on_api_key_moves_at_once(self) -> None:
        """
        On an API key a retry-after 429 throttles the key until then and
        the request moves on at once, without waiting.
        """
        for quota, seconds in ((API_KEY_429, 20.0), ({**JSON_429, "retry-after": "3"}, 3.0)):
            self.build(("k1", "apikey"), ("k2", "apikey"))
            outcome = self.serve(turn(X), {"k1": [Reply(429, quota, None)]})
            self.assertEqual(outcome.route, [("k1", PRIMARY), ("k2", RETRY_THROTTLE)])
            self.assertEqual(outcome.verdicts[0].delay, 0.0)
            self.assertEqual(self.account("k1").throttled_until, NOW + seconds)
            self.assertEqual(self.status("k1"), "throttled")

    def test_every_account_throttled_gives_429_to_the_throttle_end(self) -> None:
        """
        When the warm account's waits are spent and the sibling is throttled
        too, nothing can serve for now: the synthetic 429 says to come back
        when the first throttle ends and, as nothing is out of quota, does
        not claim a usage limit.
        """
        self.established("a", "b")
        throttle = {**headers(0.3, 0.2), "retry-after": "30"}
        outcome = self.serve(turn(X), {"a": [Reply(429, throttle, None)] * 3, "b": [Reply(429, throttle, None)]})
        self.assertEqual([name for name, _ in outcome.route], ["a", "a", "a", "b", None])
        decision = outcome.last
        self.assertEqual((decision.status, decision.reason, decision.retry_after), (429, EXHAUSTED, 30))
        self.assertFalse(decision.out_of_quota)
        self.assertEqual(
            decision.message,
            "NextClaude: no account can serve right now; retry in 30 s. Rate-limited: a (back in 30s), b (back in 30s).",
        )
        self.assertEqual(self.session_account(X), "a")

    def test_probe_classifies_429s_too(self) -> None:
        """
        A probe waits for nothing.  A throttled candidate answering with a
        retry-after is throttled again and the sweep moves on; a candidate
        still known out of quota answering a bare 429 is not back; the
        synthetic 429 then names both.  A throttled candidate answering a
        limit on the request has that answer relayed, its state untouched.
        """
        self.build("a", "b")
        self.learn("a", spent(five_reset=NOW + HOUR))
        self.account("b").throttled_until = NOW + 5
        script = {"b": [Reply(429, {**JSON_429, "retry-after": "40"}, None)], "a": [Reply(429, BARE_429, None)]}
        outcome = self.serve(turn(X), script)
        self.assertEqual(outcome.route, [("b", PROBE), ("a", PROBE), (None, EXHAUSTED)])
        self.assertEqual([v.delay for v in outcome.verdicts], [0.0, 0.0])
        self.assertEqual(self.account("b").throttled_until, NOW + 40)
        self.assertEqual(
            outcome.last.message,
            "NextClaude: no account can serve right now; retry in 40 s. "
            "Out of quota: a (back in 1h). Rate-limited: b (back in 40s).",
        )

        self.build("b")
        self.account("b").throttled_until = NOW + 5
        outcome = self.serve(turn(X), {"b": [Reply(429, BARE_429, None)]})
        self.assertEqual(outcome.route, [("b", PROBE)])
        self.assertEqual((outcome.account, outcome.status), ("b", 429))
        self.assertEqual(self.account("b").throttled_until, NOW + 5)
        self.assertEqual(self.emitted(events.RECOVERED), [])


# -- 10. nothing can serve: dead credentials -------------------------------------------------------

INVALID_GRANT = (
    "the OAuth grant is no longer valid (the token endpoint refused the grant "
    "(invalid_grant: Refresh token not found or invalid)); run `nextclaude login` (or `nextclaude import`) again"
)
INVALID_GRANT_IMPORTED = (
    "the OAuth grant is no longer valid (the token endpoint refused the grant (invalid_grant)); "
    "log in to Claude Code and run `nextclaude import` again, or run `nextclaude login` to give the proxy a grant of its own"
)


class NothingCanServeTests(RouterCase):
    """
    DESIGN.md point 10 (issue 10, item 6): when nothing can serve, the
    client is told the truth: dead credentials are a 401 naming each
    account's cause and fix, never a quota 429 to wait out.
    """

    def test_single_dead_api_key_is_401(self) -> None:
        """
        One API key the upstream rejects with 401: the request ends with a
        401 decision (no-credentials) whose message names the key, the
        cause and the fix; no retry-after, no reset, no probe.
        """
        self.build(("work-key", "apikey"))
        outcome = self.serve(turn(X), {"work-key": [Reply(401, {}, None)]})
        self.assertEqual(outcome.route, [("work-key", PRIMARY), (None, NO_CREDENTIALS)])
        decision = outcome.last
        self.assertEqual((decision.status, decision.retry_after, decision.reset), (401, None, None))
        self.assertEqual(
            decision.message,
            "NextClaude: no account can serve: every account's credential is dead. "
            "work-key (API key): the API key was rejected (401 authentication_error); "
            "fix: put a working key in work-key's apiKey in the NextClaude config file. "
            "A running proxy picks up the fix within seconds.",
        )
        self.assertEqual(self.emitted(events.PROBE), [])
        self.assertEqual(self.serve(turn(X)).route, [(None, NO_CREDENTIALS)])

    def test_every_kind_of_dead_credential_is_401(self) -> None:
        """
        API keys rejected with 401, OAuth grants refused (invalid_grant, set
        by the accounts layer; for an imported account too), an OAuth token
        rejected after a refresh and an account refused with 403 where
        another succeeded: all dead means a 401 that names every account
        with its own cause and fix.
        """
        self.build("alice", "bob", "carol", ("dave", "oauth", 1), ("erin", "apikey"))
        alice, bob = self.account("alice"), self.account("bob")
        alice.error = INVALID_GRANT
        bob.config = replace(bob.config, import_from="~/.claude/.credentials.json")
        bob.error = INVALID_GRANT_IMPORTED
        self.router.can_refresh = lambda account: account.name == "carol"
        self.serve(turn(X), {"carol": [Reply(401, {}, None), Reply(401, {}, None)], "dave": [Reply(403, {}, None)]})
        outcome = self.serve(turn(Y), {"dave": [Reply(401, {}, None)], "erin": [Reply(401, {}, None)]})
        self.assertEqual(outcome.route[-1], (None, NO_CREDENTIALS))
        self.assertEqual(outcome.last.status, 401)
        self.assertEqual(
            outcome.last.message,
            "NextClaude: no account can serve: every account's credential is dead. "
            "alice (subscription): the OAuth grant is no longer valid (the token endpoint refused the grant "
            "(invalid_grant: Refresh token not found or invalid)); fix: run `nextclaude login --name alice`. "
            "bob (subscription): the OAuth grant is no longer valid (the token endpoint refused the grant "
            "(invalid_grant)); fix: log in to Claude Code again and run `nextclaude import --name bob`, "
            "or run `nextclaude login --name bob`. "
            "carol (subscription): the OAuth token was rejected (401 authentication_error) even after a refresh; "
            "fix: run `nextclaude login --name carol`. "
            "dave (subscription): the account was refused (403 permission_error) where another account "
            "succeeded: check its plan and permissions; fix: run `nextclaude login --name dave`. "
            "erin (API key): the API key was rejected (401 authentication_error); "
            "fix: put a working key in erin's apiKey in the NextClaude config file. "
            "A running proxy picks up the fix within seconds.",
        )

    def test_out_of_quota_and_dead_is_the_quota_429_naming_the_dead(self) -> None:
        """
        Some accounts out of quota, the rest dead: the quota 429, its
        retry-after from the soonest reset (capped), marked out of quota,
        and its message naming the dead accounts with their fixes.
        """
        cases = [
            # (reset of a's 5h window, cap, retry-after, "back in")
            (NOW + HOUR, 55, 55, "1h"),
            (NOW + 42, 55, 42, "42s"),
            (NOW + 3 * HOUR + 600, 30, 30, "3h10m"),
        ]
        for reset, cap, retry_after, back in cases:
            self.build("a", ("work-key", "apikey"), retry_after_cap=cap)
            self.learn("a", spent(five_reset=reset))
            outcome = self.serve(turn(X), {"work-key": [Reply(401, {}, None)], "a": [Reply(429, spent(five_reset=reset), None)]})
            self.assertEqual(outcome.route, [("work-key", PRIMARY), ("a", PROBE), (None, EXHAUSTED)])
            decision = outcome.last
            self.assertEqual(
                (decision.status, decision.retry_after, decision.reset, decision.out_of_quota),
                (429, retry_after, reset, True),
            )
            self.assertEqual(
                decision.message,
                f"NextClaude: no account can serve right now; retry in {retry_after} s. "
                f"Out of quota: a (back in {back}). "
                "Dead credentials: work-key (API key): the API key was rejected (401 authentication_error); "
                "fix: put a working key in work-key's apiKey in the NextClaude config file.",
            )

    def test_throttled_and_dead_is_a_429_to_the_throttle_end(self) -> None:
        """
        A throttled account counts as out for now: with the rest dead the
        client gets a 429 whose retry-after is the throttle's end, not a
        usage-limit claim, and the dead account is named.
        """
        self.build("a", "b")
        self.account("b").error = INVALID_GRANT
        self.account("a").throttled_until = NOW + 40
        self.router._last_sweep = NOW  # a sweep just ran: no probe now
        outcome = self.serve(turn(X))
        decision = outcome.last
        self.assertEqual(outcome.route, [(None, EXHAUSTED)])
        self.assertEqual((decision.status, decision.retry_after, decision.out_of_quota), (429, 40, False))
        self.assertEqual(
            decision.message,
            "NextClaude: no account can serve right now; retry in 40 s. Rate-limited: a (back in 40s). "
            "Dead credentials: b (subscription): the OAuth grant is no longer valid (the token endpoint refused "
            "the grant (invalid_grant: Refresh token not found or invalid)); fix: run `nextclaude login --name b`.",
        )

    def test_all_out_of_quota_names_each_back_time(self) -> None:
        """
        Every account out of quota and none dead: the quota 429 as before,
        its message naming when each account is back (weekly-out accounts
        at their weekly reset).
        """
        self.build("a", "b")
        self.learn("a", spent(five_reset=NOW + HOUR))
        self.learn("b", headers(0.3, 1.0, status="rejected", seven_status="rejected", seven_reset=NOW + 2 * 86400))
        self.router._last_sweep = NOW
        decision = self.serve(turn(X)).last
        self.assertEqual((decision.status, decision.retry_after, decision.out_of_quota), (429, 55, True))
        self.assertEqual(
            decision.message,
            "NextClaude: no account can serve right now; retry in 55 s. Out of quota: a (back in 1h), b (back in 2d).",
        )

    def test_refresh_that_finds_the_grant_dead_moves_on(self) -> None:
        """
        A 401 asks for a refresh; when the refresh finds the grant dead
        (the accounts layer sets the error), the retry skips the dead
        account instead of drawing a second 401, and its invalid_grant
        cause is kept for the client's message.
        """
        for names, expected in ((("a", "b"), ("b", RETRY_401)), (("a",), (None, NO_CREDENTIALS))):
            self.build(*names)
            self.router.can_refresh = lambda account: True
            exchange = self.router.open(turn(X))
            first = self.router.route(exchange)
            verdict = self.router.on_response(exchange, first.account, 401, parse_rate_limit_headers({}))
            self.assertEqual(verdict, Verdict(serve=False, refresh=True))
            first.account.error = INVALID_GRANT
            second = self.router.route(exchange)
            self.router.close(exchange)
            self.assertEqual((second.account.name if second.account else None, second.reason), expected)
            self.assertEqual(self.account("a").error, INVALID_GRANT)
            if second.account is None:
                self.assertIn("invalid_grant", second.message)
                self.assertIn("`nextclaude login --name a`", second.message)

    def test_no_account_configured(self) -> None:
        """With no account at all the client is told to add one."""
        self.build()
        decision = self.serve(turn(X)).last
        self.assertEqual((decision.status, decision.reason), (401, NO_CREDENTIALS))
        self.assertEqual(
            decision.message,
            "NextClaude: no account can serve: no account is configured; "
            "add one with `nextclaude login` or `nextclaude import`.",
        )


# Upstream answers a property test draws from.
ANSWERS = {
    "ok": lambda: Reply(200, headers(0.5, 0.3)),
    "quota-429": lambda: Reply(429, spent()),
    "bare-429": lambda: Reply(429, BARE_429, None),
    "401": lambda: Reply(401, {}, None),
    "403": lambda: Reply(403, {}, None),
    "529": lambda: Reply(529, {}, None),
}
STATES = {
    "unknown": {},
    "fresh": headers(0.1, 0.1),
    "armed": headers(0.985, 0.5),
    "spent": spent(),
    "weekly out": headers(0.2, 1.0, status="rejected", seven_status="rejected"),
}


class AttemptPropertyTests(RouterCase):
    """
    Whatever the accounts' quota and the upstream's answers, a request's
    attempts end, and an account is tried in one run of attempts at most.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        states=st.lists(st.sampled_from(sorted(STATES)), min_size=3, max_size=3),
        answers=st.lists(st.lists(st.sampled_from(sorted(ANSWERS)), max_size=4), min_size=3, max_size=3),
        refresh=st.booleans(),
        established=st.booleans(),
    )
    def test_each_account_in_one_run_of_attempts(
        self, states: list[str], answers: list[list[str]], refresh: bool, established: bool
    ) -> None:
        """
        The attempts of one request visit each account in one consecutive
        run (same-account retries: at most one after a refresh and two
        after transient 429s), never come back to an account once they left
        it, and end served or with the synthetic 429.
        """
        self.build("a", "b", "c")
        self.router.can_refresh = lambda account: refresh
        if established:
            self.serve(turn(X))
        for name, state in zip("abc", states):
            self.learn(name, STATES[state])
        script = {name: [ANSWERS[kind]() for kind in kinds] for name, kinds in zip("abc", answers)}
        outcome = self.serve(turn(X), script)
        names = [name for name, _ in outcome.route]
        runs: list[str | None] = []
        for name in names:
            if not runs or runs[-1] != name:
                self.assertNotIn(name, runs, outcome.route)
                runs.append(name)
        for name in "abc":
            # The first try, one refresh retry, two same-account 429 retries.
            self.assertLessEqual(names.count(name), 4, outcome.route)
        if outcome.account is None and outcome.reason == NO_CREDENTIALS:
            # A 401 only when waiting cannot help: every credential is dead.
            self.assertEqual(outcome.last.status, 401)
            self.assertTrue(all(self.account(name).error for name in "abc"), outcome.route)
        elif outcome.account is None:
            self.assertEqual(outcome.reason, EXHAUSTED)
            self.assertGreaterEqual(outcome.last.retry_after, 1)
            self.assertLessEqual(outcome.last.retry_after, 55)
            self.assertFalse(all(self.account(name).error for name in "abc"), outcome.route)
        else:
            self.assertIsNotNone(outcome.status)


# -- restart and expiry ---------------------------------------------------------------------------


class RestartTests(RouterCase):
    """
    PRODUCT.md point 6: state saved and restored across a restart.
    """

    # Written for the arming baseline's primary; placement's own are in test_placement.
    policy = ARMING

    def restart(self, after: float, state: dict[str, Any] | None = None) -> None:
        saved = json.loads(json.dumps(state if state is not None else self.router.to_state()))
        old_clock = self.clock
        self.build(*self.configs_names)
        self.clock.advance(old_clock.seconds() - NOW + after)
        self.router.restore(saved)

    def build(self, *specs: Any, **kwargs: Any) -> Router:
        self.configs_names = specs
        return super().build(*specs, **kwargs)

    def test_restore_keeps_quota_usage_draining_and_sessions(self) -> None:
        """
        Quota windows, usage totals, the draining account and its
        successor, and the session pins survive a restart: a session keeps
        its account and still lands on the successor after compaction.
        """
        self.build("a", "b", "c")
        self.serve(turn(X))
        self.quota["a"] = headers(0.98, 0.5)
        self.serve(turn(X))
        self.serve(turn(Y))
        self.restart(600)
        self.assertEqual(self.account("a").utilization("5h", self.clock.seconds()), 0.98)
        self.assertEqual(self.account("a").usage.requests, 2)
        self.assertEqual(self.status("a"), "draining")
        self.assertEqual(self.flags("b"), ["primary", "successor"])
        self.assertEqual(self.where(turn(X)), ("a", AFFINITY))
        self.assertEqual(self.where(turn(Y)), ("b", AFFINITY))
        self.serve(compaction(X))
        self.assertEqual(self.where(landing(X)), ("b", LANDED_AFTER_COMPACTION))

    def pinned_then_unpinned(self) -> None:
        """b is primary (once pinned) though a ranks better."""
        self.build("a", "b")
        self.learn("a", headers(0.5, 0.2))
        self.learn("b", headers(0.6, 0.2))
        self.router.pin("b")
        self.router.pin(None)
        self.assertEqual(self.router.primary, "b")

    def test_primary_kept_within_cache_ttl(self) -> None:
        """A restart within an hour keeps the saved (warm) primary."""
        self.pinned_then_unpinned()
        self.restart(3599)
        self.assertEqual(self.router.primary, "b")
        self.assertEqual(self.where(turn(X)), ("b", PRIMARY))

    def test_primary_dropped_after_cache_ttl(self) -> None:
        """After an hour the saved primary is cold: the best-ranked account is."""
        self.pinned_then_unpinned()
        self.restart(3601)
        self.assertEqual(self.router.primary, "a")

    def test_primary_dropped_when_it_cannot_serve(self) -> None:
        """A saved primary that cannot serve any more is not kept."""
        self.pinned_then_unpinned()
        state = self.router.to_state()
        state["accounts"]["b"]["exhaustedUntil"] = NOW + HOUR
        self.restart(60, state)
        self.assertEqual(self.router.primary, "a")

    def test_manual_pin_survives(self) -> None:
        """The manual pin is restored: new sessions still start there."""
        self.build("a", "b")
        self.router.pin("b")
        self.restart(7200)
        self.assertEqual(self.router.manual, "b")
        self.assertEqual(self.flags("b"), ["primary", "manual"])
        self.assertEqual(self.where(turn(X)), ("b", MANUAL))

    def test_restore_skips_unknown_accounts(self) -> None:
        """
        State naming accounts the pool no longer has is ignored: no pin,
        no primary, no session pinned to a missing account.
        """
        self.build("a", "b")
        self.router.pin("b")
        self.assertEqual(self.where(turn(X)), ("b", MANUAL))
        state = self.router.to_state()
        self.build("a")
        self.router.restore(json.loads(json.dumps(state)))
        self.assertIsNone(self.router.manual)
        self.assertEqual(self.router.primary, "a")
        self.assertEqual(self.where(turn(X)), ("a", PRIMARY))


class ExpireTests(RouterCase):
    """
    Router.expire: windows, exhaustion and throttles whose time passed are
    forgotten, and the account is announced recovered.
    """

    def test_exhausted_window_resets(self) -> None:
        """
        At its window's reset an exhausted account is forgotten back to
        active with a recovered event; next_expiry named that moment.
        """
        self.build("a", "b")
        self.learn("a", spent(five_reset=NOW + 600))
        self.assertEqual(self.router.next_expiry(), NOW + 600)
        self.assertEqual(self.status("a"), "exhausted")
        self.clock.advance(600)
        self.router.expire()
        self.assertEqual(self.status("a"), "active")
        self.assertEqual(self.emitted(events.RECOVERED), [{"account": "a"}])
        self.assertEqual(self.router.next_expiry(), SEVEN_DAY_RESET)

    def test_throttle_ends(self) -> None:
        """A throttled API key is active again, and recovered, at its retry-after."""
        self.build(("k1", "apikey"), ("k2", "apikey"))
        self.serve(turn(X), {"k1": [Reply(429, API_KEY_429)]})
        self.assertEqual(self.router.next_expiry(), NOW + 20)
        self.clock.advance(20)
        self.router.expire()
        self.assertEqual(self.status("k1"), "active")
        self.assertEqual(self.emitted(events.RECOVERED), [{"account": "k1"}])

    def test_nothing_passed_nothing_said(self) -> None:
        """Before any deadline expire changes nothing and emits nothing."""
        self.build("a")
        self.learn("a", spent(five_reset=NOW + 600))
        self.clock.advance(599)
        self.router.expire()
        self.assertEqual(self.status("a"), "exhausted")
        self.assertEqual(self.emitted(events.RECOVERED), [])


# -- the naive baseline ---------------------------------------------------------------------


class NaivePolicyTests(RouterCase):
    """
    The NAIVE policy (the benchmark's baseline): one global account; at the
    threshold everyone switches to the account with the most 5h left.
    """

    def test_everyone_switches_at_threshold(self) -> None:
        """
        Every session follows the one global account; at the threshold the
        account with the most 5h left becomes it, and each session switches
        at its very next request (no waiting for compaction).
        """
        self.build("a", "b", "c", policy=NAIVE)
        self.learn("b", headers(0.5, 0.1))
        self.learn("c", headers(0.2, 0.9))
        self.serve(turn(X))
        self.serve(turn(Y))
        self.quota["a"] = headers(0.98, 0.3)
        self.serve(turn(X))
        self.assertEqual(self.router.primary, "c")
        self.assertEqual(self.where(turn(Y)), ("c", PRIMARY))
        self.assertEqual(self.where(turn(X)), ("c", PRIMARY))
        self.assertEqual(self.where(turn(NEW)), ("c", PRIMARY))
        self.assertEqual([e["reason"] for e in self.emitted(events.SWITCHED)], [PRIMARY, PRIMARY])
        self.assertEqual(self.emitted(events.ARMED), [])

    def test_unknown_policy(self) -> None:
        """An unknown policy name is refused."""
        self.assertRaises(ValueError, Router, AccountPool([], Thresholds()), Clock().seconds, EventHub(), policy="random")
