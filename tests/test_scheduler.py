"""
Tests for nextclaude.scheduler: Scheduler.dispatch runs a request's attempts
on a fake clock (waiting where a verdict asks, retrying a failed connection,
probing with a short header timeout) and the expiry timer wakes the router
at each quota reset.

The upstream is a fake C{send} that answers from a script: a fake
C{IResponse} (code and real L{Headers}), an exception, or a Deferred the
test fires itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from nextclaude import events
from nextclaude.events import Event, EventHub
from nextclaude.pool import Account, AccountPool, Thresholds
from nextclaude.quota import parse_rate_limit_headers
from nextclaude.router import (
    PRIMARY,
    PROBE,
    RETRY_401,
    RETRY_CONNECT,
    RETRY_THROTTLE,
    RETRY_TRANSIENT,
    Decision,
    Router,
)
from nextclaude.scheduler import PROBE_HEADER_TIMEOUT, Dispatched, Scheduler
from nextclaude.upstream import UpstreamUnavailable
from tests.test_pool import HOUR, NOW, SEVEN_DAY_RESET, config
from tests.test_router import BARE_429, X, Y, headers, spent, turn


@dataclass
class FakeResponse:
    """Just what the scheduler reads of an IResponse."""

    code: int
    headers: Headers


def response(code: int = 200, quota: dict[str, str] | None = None) -> FakeResponse:
    raw = Headers()
    for name, value in (quota or {}).items():
        raw.addRawHeader(name.encode("ascii"), value.encode("ascii"))
    return FakeResponse(code, raw)


HOLD = object()


class Upstream:
    """
    A fake C{send}: each call takes the next scripted answer for its
    account (a response, an exception, or L{HOLD} for a Deferred the test
    fires), a plain 200 once the script runs out.
    """

    def __init__(self, script: dict[str, list[Any]] | None = None) -> None:
        self.script = {name: list(answers) for name, answers in (script or {}).items()}
        self.calls: list[tuple[str, str, float | None]] = []
        self.held: list[Deferred[FakeResponse]] = []
        self.discarded: list[FakeResponse] = []

    def send(self, account: Account, decision: Decision, timeout: float | None) -> Deferred[FakeResponse]:
        self.calls.append((account.name, decision.reason, timeout))
        answers = self.script.get(account.name)
        answer = answers.pop(0) if answers else response()
        if answer is HOLD:
            held: Deferred[FakeResponse] = Deferred()
            self.held.append(held)
            return held
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)

    async def discard(self, answer: FakeResponse) -> None:
        self.discarded.append(answer)


class SchedulerCase(SynchronousTestCase):
    """A router over OAuth accounts and a running scheduler, both on one Clock."""

    def build(self, *names: str, start: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.pool = AccountPool([config(name) for name in names], Thresholds())
        self.hub = EventHub()
        self.events: list[Event] = []
        self.hub.subscribe(self.events.append)
        self.router = Router(self.pool, self.clock.seconds, self.hub)
        self.refreshed: list[str] = []

        async def refresh(account: Account) -> None:
            self.refreshed.append(account.name)

        self.scheduler = Scheduler(self.clock, self.router, refresh)
        if start:
            self.scheduler.startService()
            self.addCleanup(self.scheduler.stopService)

    def account(self, name: str) -> Account:
        account = self.pool.get(name)
        assert account is not None
        return account

    def learn(self, name: str, quota: dict[str, str]) -> None:
        self.account(name).observe_quota(parse_rate_limit_headers(quota), self.clock.seconds())

    def dispatch(
        self, upstream: Upstream, session: str = X, streaming: bool = True, gone: list[bool] | None = None
    ) -> Deferred[Dispatched]:
        exchange = self.router.open(turn(session))
        gone = gone if gone is not None else []
        return Deferred.fromCoroutine(
            self.scheduler.dispatch(exchange, upstream.send, upstream.discard, lambda: bool(gone), lambda: streaming)
        )

    def emitted(self, kind: str) -> list[dict[str, Any]]:
        return [event.data for event in self.events if event.kind == kind]


class DispatchTests(SchedulerCase):
    """Scheduler.dispatch: one request's attempts."""

    def test_served_at_once(self) -> None:
        """A 200 from the primary is relayed after one send with no timeout override."""
        self.build("a", "b")
        upstream = Upstream()
        outcome = self.successResultOf(self.dispatch(upstream))
        self.assertEqual(outcome.response.code, 200)
        self.assertEqual(outcome.decision.account.name, "a")
        self.assertEqual(upstream.calls, [("a", PRIMARY, None)])

    def test_throttle_429_waits_on_the_clock(self) -> None:
        """
        A 429 with a retry-after and no rejection is discarded and retried
        on the same account only after min(retry-after, 10 s) has passed on
        the clock; after two such retries the account is throttled and the
        request goes on to the next account at once.
        """
        self.build("a", "b")
        throttle = [response(429, {"retry-after": "5"})] + [response(429, {"retry-after": "30"})] * 2
        upstream = Upstream({"a": throttle})
        outcome = self.dispatch(upstream)
        self.assertNoResult(outcome)
        self.assertEqual(len(upstream.calls), 1)
        self.clock.advance(4.9)
        self.assertEqual(len(upstream.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual(upstream.calls[1], ("a", RETRY_THROTTLE, None))
        self.clock.advance(9.9)
        self.assertEqual(len(upstream.calls), 2)
        self.clock.advance(0.1)
        self.assertEqual(upstream.calls[2:], [("a", RETRY_THROTTLE, None), ("b", RETRY_THROTTLE, None)])
        result = self.successResultOf(outcome)
        self.assertEqual((result.decision.account.name, result.response.code), ("b", 200))
        self.assertEqual([r.code for r in upstream.discarded], [429, 429, 429])
        self.assertEqual(self.emitted(events.THROTTLED), [{"account": "a", "until": NOW + 15 + 30}])

    def test_request_scoped_429_is_relayed_after_two_retries(self) -> None:
        """
        A 429 with neither retry-after nor a rejection is retried on the
        same account 2 s apart, twice; the third is relayed (not discarded)
        and no other account is asked.
        """
        self.build("a", "b")
        upstream = Upstream({"a": [response(429, BARE_429)] * 3})
        outcome = self.dispatch(upstream)
        self.clock.advance(2)
        self.assertEqual(len(upstream.calls), 2)
        self.clock.advance(2)
        result = self.successResultOf(outcome)
        self.assertEqual(upstream.calls, [("a", PRIMARY, None), ("a", RETRY_TRANSIENT, None), ("a", RETRY_TRANSIENT, None)])
        self.assertEqual((result.decision.account.name, result.response.code), ("a", 429))
        self.assertEqual(len(upstream.discarded), 2)
        self.assertEqual(self.router.status_of(self.account("a")).value, "active")

    def test_refresh_finding_the_grant_dead_moves_on(self) -> None:
        """
        When the refresh after a 401 finds the grant dead (the accounts
        layer sets the account's error), the dead account is not asked
        again: the next account serves, or, with none left, the dispatch
        ends with the 401 decision naming the fix.
        """
        for names, served_by in ((("a", "b"), "b"), (("a",), None)):
            self.build(*names)
            self.router.can_refresh = lambda account: True

            async def refresh(account: Account) -> None:
                account.error = "the OAuth grant is no longer valid (invalid_grant); run `nextclaude login` again"

            self.scheduler._refresh = refresh
            upstream = Upstream({"a": [response(401)]})
            result = self.successResultOf(self.dispatch(upstream))
            self.assertEqual([call[0] for call in upstream.calls], ["a"] + ([served_by] if served_by else []))
            if served_by is None:
                self.assertEqual(result.decision.status, 401)
                self.assertIn("`nextclaude login --name a`", result.decision.message)
            else:
                self.assertEqual(result.decision.account.name, served_by)

    def test_client_gone_during_wait(self) -> None:
        """
        A client that went away while the scheduler waited gets no further
        attempt.
        """
        self.build("a", "b")
        upstream = Upstream({"a": [response(429, BARE_429)]})
        gone: list[bool] = []
        outcome = self.dispatch(upstream, gone=gone)
        gone.append(True)
        self.clock.advance(2)
        result = self.successResultOf(outcome)
        self.assertIsNone(result.response)
        self.assertEqual(len(upstream.calls), 1)

    def test_connection_failure_retried_once_on_same_account(self) -> None:
        """
        A connection failure (502) is retried once on the same account with
        retry-connect; a second one ends the request with that error.
        """
        self.build("a", "b")
        upstream = Upstream({"a": [UpstreamUnavailable(502, "connection refused")]})
        result = self.successResultOf(self.dispatch(upstream))
        self.assertEqual(upstream.calls, [("a", PRIMARY, None), ("a", RETRY_CONNECT, None)])
        self.assertEqual(result.response.code, 200)

        upstream = Upstream({"a": [UpstreamUnavailable(502, "refused"), UpstreamUnavailable(502, "refused")]})
        result = self.successResultOf(self.dispatch(upstream, session=Y))
        self.assertEqual(len(upstream.calls), 2)
        self.assertIsNone(result.response)
        self.assertEqual(result.error.code, 502)

    def test_timeout_is_not_retried(self) -> None:
        """A 504 (no answer in time) already waited long enough: no retry."""
        self.build("a", "b")
        upstream = Upstream({"a": [UpstreamUnavailable(504, "timed out")]})
        result = self.successResultOf(self.dispatch(upstream))
        self.assertEqual(upstream.calls, [("a", PRIMARY, None)])
        self.assertEqual(result.error.code, 504)

    def test_401_refreshes_then_retries(self) -> None:
        """
        A refresh verdict runs the refresh for that account before the retry
        on it.
        """
        self.build("a", "b")
        self.router.can_refresh = lambda account: True
        upstream = Upstream({"a": [response(401)]})
        result = self.successResultOf(self.dispatch(upstream))
        self.assertEqual(self.refreshed, ["a"])
        self.assertEqual(upstream.calls, [("a", PRIMARY, None), ("a", RETRY_401, None)])
        self.assertEqual(result.response.code, 200)

    def test_all_exhausted_answers_without_account(self) -> None:
        """
        With nothing to probe the dispatch ends with the synthetic-429
        decision and sends nothing.
        """
        self.build("a")
        self.learn("a", headers(0.2, 1.0, status="rejected", seven_status="rejected"))
        upstream = Upstream()
        result = self.successResultOf(self.dispatch(upstream))
        self.assertIsNone(result.decision.account)
        self.assertEqual(upstream.calls, [])


class ProbeTests(SchedulerCase):
    """Probe sweeps through dispatch."""

    def exhausted(self) -> None:
        self.build("a", "b")
        self.learn("a", spent(five_reset=NOW + HOUR))
        self.learn("b", spent(five_reset=NOW + 2 * HOUR))

    def test_probe_header_timeout_for_streaming(self) -> None:
        """
        A probe of a streaming request waits 12 s for response headers; a
        non-streaming probe uses the normal upstream timeout (None).
        """
        self.exhausted()
        upstream = Upstream({"a": [response(429, spent(five_reset=NOW + HOUR))]})
        self.successResultOf(self.dispatch(upstream, streaming=True))
        self.assertEqual(upstream.calls, [("a", PROBE, PROBE_HEADER_TIMEOUT), ("b", PROBE, PROBE_HEADER_TIMEOUT)])
        self.assertEqual(PROBE_HEADER_TIMEOUT, 12.0)

        self.exhausted()
        upstream = Upstream({"a": [response(429, spent(five_reset=NOW + HOUR))]})
        self.successResultOf(self.dispatch(upstream, streaming=False))
        self.assertEqual(upstream.calls, [("a", PROBE, None), ("b", PROBE, None)])

    def test_probe_connection_failure_moves_on(self) -> None:
        """A probe that cannot connect (or times out) counts as not recovered: the next candidate is probed."""
        self.exhausted()
        upstream = Upstream({"a": [UpstreamUnavailable(504, "no headers in 12 s")]})
        result = self.successResultOf(self.dispatch(upstream))
        self.assertEqual([c[0] for c in upstream.calls], ["a", "b"])
        self.assertEqual(result.decision.account.name, "b")

    def test_sweep_released_when_send_raises(self) -> None:
        """
        router.close always runs: a probe whose send raises an unexpected
        error fails the dispatch but releases the sweep, so a request after
        probeInterval sweeps again.
        """
        self.exhausted()
        upstream = Upstream({"a": [RuntimeError("boom")]})
        self.failureResultOf(self.dispatch(upstream), RuntimeError)
        self.clock.advance(15)
        upstream = Upstream(
            {"a": [response(429, spent(five_reset=NOW + HOUR))], "b": [response(429, spent(five_reset=NOW + 2 * HOUR))]}
        )
        result = self.successResultOf(self.dispatch(upstream, session=Y))
        self.assertEqual([c[:2] for c in upstream.calls], [("a", PROBE), ("b", PROBE)])
        self.assertIsNone(result.decision.account)

    def test_requests_during_sweep_are_rejected(self) -> None:
        """
        While a probe is in flight another request gets no account at once,
        and the sweep is released when the probe's answer comes.
        """
        self.exhausted()
        upstream = Upstream({"a": [HOLD]})
        probing = self.dispatch(upstream)
        other = self.successResultOf(self.dispatch(Upstream(), session=Y))
        self.assertIsNone(other.decision.account)
        self.assertEqual(other.decision.retry_after, 55)
        upstream.held[0].callback(response(200, headers(0.1, 0.4, five_reset=NOW + 5 * HOUR)))
        result = self.successResultOf(probing)
        self.assertEqual(result.decision.account.name, "a")
        self.assertEqual(self.emitted(events.RECOVERED), [{"account": "a"}])


class ExpiryTimerTests(SchedulerCase):
    """The expiry timer: one wake-up at the next reset, exhaustion or throttle end."""

    def test_timer_fires_at_reset_and_rearms(self) -> None:
        """
        After a response whose 5h window is rejected until T, the timer
        fires at T: the account is no longer exhausted, a recovered event
        is emitted, and the timer re-arms for the 7d reset.
        """
        self.build("a", "b")
        reset = NOW + 100
        upstream = Upstream({"a": [response(200, spent(five_reset=reset))]})
        self.successResultOf(self.dispatch(upstream))
        self.assertEqual(self.router.status_of(self.account("a")).value, "exhausted")
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [reset])
        self.clock.advance(99)
        self.assertEqual(self.emitted(events.RECOVERED), [])
        self.clock.advance(1)
        self.assertEqual(self.router.status_of(self.account("a")).value, "active")
        self.assertEqual(self.emitted(events.RECOVERED), [{"account": "a"}])
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [SEVEN_DAY_RESET])

    def test_throttle_end_wakes_timer(self) -> None:
        """A throttle from a transient 429 schedules a wake-up at its end."""
        self.build("a", "b")
        upstream = Upstream({"a": [response(429, {**BARE_429, "retry-after": "1"})] * 3})
        self.dispatch(upstream)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.router.status_of(self.account("a")).value, "throttled")
        self.assertIn(self.clock.seconds() + 1, [call.getTime() for call in self.clock.getDelayedCalls()])
        self.clock.advance(1)
        self.assertEqual(self.router.status_of(self.account("a")).value, "active")
        self.assertEqual(self.emitted(events.RECOVERED), [{"account": "a"}])

    def test_start_and_stop(self) -> None:
        """
        startService schedules the wake-up for state known at start (a
        restored reset); stopService cancels it; a stopped scheduler arms
        nothing.
        """
        self.build("a", start=False)
        self.learn("a", spent(five_reset=NOW + 600))
        self.scheduler.arm_expiry()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.scheduler.startService()
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [NOW + 600])
        self.scheduler.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(600)
        self.assertEqual(self.emitted(events.RECOVERED), [])

    def test_failing_expire_is_logged_and_rearmed(self) -> None:
        """
        An error inside router.expire is logged, not raised into the
        reactor, and the timer still re-arms.
        """
        self.build("a")
        self.learn("a", spent(five_reset=NOW + 600))
        self.scheduler.arm_expiry()

        def broken() -> None:
            raise ValueError("broken")

        self.router.expire = broken  # type: ignore[method-assign]
        self.clock.advance(600)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [SEVEN_DAY_RESET])


class StatusTimerTests(SchedulerCase):
    """The status timer: a lagging routing status is brought up to date once the traffic pauses."""

    def test_lagging_status_is_settled_when_due(self) -> None:
        """
        A response within the router's status interval leaves the status
        lagging; one timer, at the moment it is due, brings it up to date
        (the primary moves off an account past the switch threshold).
        """
        self.build("a", "b")
        self.router.status_interval = 1.0
        self.successResultOf(self.dispatch(Upstream()))
        self.assertEqual(self.router.primary, "a")
        self.successResultOf(self.dispatch(Upstream({"a": [response(200, headers(0.981, 0.3))]})))
        self.successResultOf(self.dispatch(Upstream({"a": [response(200, headers(0.981, 0.3))]})))
        self.assertEqual(self.router.primary, "a")
        self.assertEqual(self.router.status_due(), NOW + 1.0)
        self.assertEqual(sum(1 for call in self.clock.getDelayedCalls() if call.getTime() == NOW + 1.0), 1)
        self.clock.advance(1.0)
        self.assertEqual(self.router.primary, "b")
        self.assertIsNone(self.router.status_due())

    def test_stop_cancels_the_status_timer(self) -> None:
        """stopService leaves no status timer behind."""
        self.build("a", "b", start=False)
        self.scheduler.startService()
        self.router.status_interval = 1.0
        self.successResultOf(self.dispatch(Upstream()))
        self.successResultOf(self.dispatch(Upstream()))
        self.assertTrue(self.clock.getDelayedCalls())
        self.scheduler.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
