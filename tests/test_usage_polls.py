"""
Usage polling of idle OAuth accounts against a usage endpoint that allows
one call a second (issue 10, item 11): the first polls are spread, a 429's
retry-after (seconds or HTTP-date) is honoured, and a rejected or failed
poll is retried within minutes with capped exponential back-off, not after
the whole poll interval.

The OAuth side is tests.fake_oauth behind StubTreq, wrapped in a rate
limiter; time is a task.Clock; randomness is injected.
"""

from __future__ import annotations

import json
from email.utils import formatdate
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from nextclaude.accounts import POLL_SPACING, AccountsService, AccountsSettings
from nextclaude.config import add_account, load_config
from nextclaude.events import EventHub
from nextclaude.oauth import OAuthClient
from nextclaude.pool import AccountPool, Thresholds
from nextclaude.router import Router
from tests.fake_oauth import USAGE_PATH, FakeOAuthServer

# Before the fake usage endpoint's window resets (2030-01-01), so that
# what it reports is live, whatever expires stale windows.
NOW = 1_880_000_000.0
DAY = 86400.0
NAMES = ("a", "b", "c", "d")


class OneCallASecond(Resource):
    """
    The fake OAuth server behind a limiter on the usage endpoint: at most
    one call per C{period} seconds (of the test's clock) gets through; the
    rest get a 429 whose retry-after is what C{retry_after()} returns
    (nothing when it returns None).  Every usage call is recorded as
    (time, status).
    """

    isLeaf = True

    def __init__(self, fake: FakeOAuthServer, clock: Clock, period: float = 1.0) -> None:
        super().__init__()
        self.fake = fake
        self.clock = clock
        self.period = period
        self.last_allowed: float | None = None
        self.calls: list[tuple[float, int]] = []
        self.retry_after: Any = lambda: "1"

    def render(self, request: Request) -> bytes | int:
        if request.path.decode() != USAGE_PATH:
            return self.fake.render(request)
        now = self.clock.seconds()
        if self.last_allowed is not None and now - self.last_allowed < self.period:
            self.calls.append((now, 429))
            request.setResponseCode(429)
            retry_after = self.retry_after()
            if retry_after is not None:
                request.setHeader(b"retry-after", retry_after.encode())
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}).encode()
        self.last_allowed = now
        answer = self.fake.render(request)
        self.calls.append((now, request.code))
        return answer


class PollHarness(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.fake = FakeOAuthServer(clock=self.clock.seconds)
        self.endpoint = OneCallASecond(self.fake, self.clock)
        self.client = OAuthClient(self.clock, self.fake.settings(), http=StubTreq(self.endpoint))
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.path = self.dir / "config.json"
        self.path.write_text(json.dumps({"proxy": {"apiKey": "nc-test"}, "usagePollMinutes": 30, "accounts": []}))
        self.random = 0.5  # jitter factor exactly 1
        self.service: AccountsService | None = None

    def add(self, name: str) -> None:
        # Tokens valid for days: no refresh gets in the way of the polls.
        access, refresh, expires_at = self.fake.issue(expires_in=int(7 * DAY))
        add_account(
            self.path,
            {"name": name, "type": "oauth", "accessToken": access, "refreshToken": refresh, "expiresAt": expires_at},
        )

    def start(self, *names: str) -> AccountsService:
        for name in names:
            self.add(name)
        config = load_config(self.path, create=False)
        self.pool = AccountPool(config.accounts, Thresholds())
        hub = EventHub()
        self.service = AccountsService(
            self.clock,
            self.path,
            self.pool,
            Router(self.pool, self.clock.seconds, hub),
            hub,
            self.client,
            AccountsSettings.from_config(config, sighup=False, watch_interval=None, poll_usage=True),
            random=lambda: self.random,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service

    def known(self) -> list[str]:
        """The accounts whose 5-hour window the usage endpoint told us."""
        return [account.name for account in self.pool if "5h" in account.windows]

    def run_for(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)


class SpreadTests(PollHarness):
    def test_first_polls_spread(self) -> None:
        """
        Four idle OAuth accounts at start-up, an endpoint allowing one call
        a second: the polls go out POLL_SPACING apart, none is refused, and
        every account's quota is known within four spacings.
        """
        self.start(*NAMES)
        self.clock.advance(0)
        self.run_for(4 * POLL_SPACING)
        self.assertEqual(sorted(self.known()), list(NAMES))
        self.assertEqual([status for _, status in self.endpoint.calls], [200] * 4)
        times = [when - NOW for when, _ in self.endpoint.calls]
        self.assertEqual(times, [0.0, 5.0, 10.0, 15.0])

    def test_spread_holds_under_any_jitter(self) -> None:
        """
        Whatever the injected random gives (its extremes included), the
        first polls stay at least POLL_SPACING apart and all succeed.
        """
        for value in (0.0, 0.2, 0.5, 0.999):
            self.setUp()
            self.random = value
            self.start(*NAMES)
            self.clock.advance(0)
            self.run_for(6 * POLL_SPACING)
            times = sorted(when for when, _ in self.endpoint.calls)
            self.assertEqual(len(times), 4, value)
            self.assertTrue(all(b - a >= POLL_SPACING for a, b in zip(times, times[1:])), (value, times))
            self.assertEqual({status for _, status in self.endpoint.calls}, {200}, value)

    def test_reload_spreads_added_accounts(self) -> None:
        """
        Accounts added together by a reload are polled spaced out too, also
        from a poll that has just gone out.
        """
        service = self.start("a")
        self.clock.advance(0)
        for name in ("b", "c", "d"):
            self.add(name)
        service.reload()
        self.run_for(4 * POLL_SPACING)
        self.assertEqual(sorted(self.known()), list(NAMES))
        times = [when for when, _ in self.endpoint.calls]
        self.assertTrue(all(b - a >= POLL_SPACING for a, b in zip(times, times[1:])), times)
        self.assertEqual({status for _, status in self.endpoint.calls}, {200})


class RetryTests(PollHarness):
    def test_rejected_polls_retried_within_minutes(self) -> None:
        """
        With an endpoint that allows one call per 8 seconds, polls spaced 5
        s apart are partly refused (429, retry-after: 1); each refused one
        is tried again within minutes, not 30 minutes later, and every
        account's quota is known within five minutes.
        """
        self.endpoint.period = 8.0
        self.start(*NAMES)
        self.clock.advance(0)
        self.run_for(20)
        self.assertIn(429, [status for _, status in self.endpoint.calls])
        self.assertLess(len(self.known()), 4)
        self.run_for(5 * 60)
        self.assertEqual(sorted(self.known()), list(NAMES))

    def test_retry_after_seconds_honoured(self) -> None:
        """
        A 429 whose retry-after (seconds) is longer than the back-off is
        retried exactly then, not earlier and not at the poll interval.
        """
        self.endpoint.last_allowed = NOW  # the limiter is busy at start-up
        self.endpoint.period = 1.0
        self.endpoint.retry_after = lambda: "300"
        self.start("a")
        self.clock.advance(0)
        self.assertEqual(self.endpoint.calls, [(NOW, 429)])
        self.clock.advance(300 - 0.5)
        self.assertEqual(len(self.endpoint.calls), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.endpoint.calls[-1], (NOW + 300, 200))
        self.assertEqual(self.known(), ["a"])

    def test_retry_after_http_date_honoured(self) -> None:
        """
        A 429 whose retry-after is an HTTP-date is retried at that moment
        of the proxy's clock.
        """
        self.endpoint.last_allowed = NOW
        self.endpoint.retry_after = lambda: formatdate(self.clock.seconds() + 240, usegmt=True)
        self.start("a")
        self.clock.advance(0)
        self.clock.advance(240 - 0.5)
        self.assertEqual(len(self.endpoint.calls), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.endpoint.calls[-1], (NOW + 240, 200))

    def test_short_retry_after_gets_the_back_off(self) -> None:
        """
        A 429 with a retry-after shorter than the back-off (or none at all)
        waits the back-off: a minute after the first refusal.
        """
        for retry_after in ("1", None):
            self.setUp()
            self.endpoint.last_allowed = NOW
            self.endpoint.retry_after = lambda: retry_after
            self.start("a")
            self.clock.advance(0)
            self.clock.advance(60 - 0.5)
            self.assertEqual(len(self.endpoint.calls), 1, retry_after)
            self.clock.advance(0.5)
            self.assertEqual(self.endpoint.calls[-1], (NOW + 60, 200), retry_after)

    def test_back_off_doubles_and_is_capped(self) -> None:
        """
        A usage endpoint failing again and again (5xx) is retried after 1,
        2, 4, 8 minutes, then every POLL_RETRY_CAP (10 minutes); after a
        success, polls return to the regular interval.
        """
        self.fake.fail_usage(503, count=7)
        self.start("a")
        self.clock.advance(0)
        self.run_for(5000, step=10)
        times = [request.time for request in self.fake.requests_to(USAGE_PATH)]
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        self.assertEqual(gaps, [60.0, 120.0, 240.0, 480.0, 600.0, 600.0, 600.0, 30 * 60.0])
        self.assertEqual(self.known(), ["a"])

    def test_huge_retry_after_is_capped(self) -> None:
        """
        A retry-after far in the future (a broken server, or a date years
        ahead) is honoured only up to six hours.
        """
        self.endpoint.last_allowed = NOW
        self.endpoint.retry_after = lambda: str(int(400 * DAY))
        self.start("a")
        self.clock.advance(0)
        self.clock.advance(6 * 3600 - 1)
        self.assertEqual(len(self.endpoint.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.endpoint.calls), 2)
