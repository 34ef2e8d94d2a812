"""
Tests for nextclaude.accounts: the running proxy's token refresh (timers,
one refresh in flight, persist before use, shared grants, back-off,
invalid_grant), usage polling, and reloading the config file (watcher,
SIGHUP, broken files, races with other writers).

The OAuth side is the fake server in tests.fake_oauth behind StubTreq; time
is a task.Clock; the config file is a real file in a temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from nextclaude import events
from nextclaude.accounts import BACKOFF_CAP, AccountsService, AccountsSettings
from nextclaude.config import add_account, config_store, load_config, remove_account, update_account
from nextclaude.credentials import CredentialsError, read_credentials
from nextclaude.events import Event, EventHub
from nextclaude.oauth import OAuthClient
from nextclaude.pool import Account, AccountPool, Thresholds
from nextclaude.problems import Problems
from nextclaude.quota import WindowQuota
from nextclaude.router import Router
from nextclaude.scheduler import Scheduler
from tests.fake_oauth import USAGE_PATH, FakeOAuthServer
from tests.test_router import X, turn

NOW = 1_900_000_000.0
HOUR = 3600.0
MARGIN = 300.0


class Harness(SynchronousTestCase):
    """A config file, a pool and router built from it, the fake OAuth server and the service, on one Clock."""

    poll_usage = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.fake = FakeOAuthServer(clock=self.clock.seconds)
        self.fake.add_account("bob@example.com")
        self.stub = StubTreq(self.fake)
        self.client = OAuthClient(self.clock, self.fake.settings(), http=self.stub)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.path = self.dir / "config.json"
        self.path.write_text(json.dumps({"proxy": {"apiKey": "nc-test"}, "usagePollMinutes": 30, "accounts": []}))
        self.random = 0.5  # jitter factor exactly 1
        self.events: list[Event] = []
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.service: AccountsService | None = None

    # -- building -----------------------------------------------------------------

    def oauth_account(self, name: str, email: str = "alice@example.com", expires_in: float = HOUR, **extra: Any) -> dict[str, Any]:
        access, refresh, _ = self.fake.issue(email, expires_in=int(expires_in))
        account = {
            "name": name,
            "type": "oauth",
            "accessToken": access,
            "refreshToken": refresh,
            "expiresAt": int((self.clock.seconds() + expires_in) * 1000),
            **extra,
        }
        add_account(self.path, account)
        return account

    def source_file(self, account: dict[str, Any], **overrides: Any) -> Path:
        """Claude Code's credential file holding ``account``'s pair (plus keys it must keep)."""
        path = self.dir / "claude" / ".credentials.json"
        path.parent.mkdir(exist_ok=True)
        oauth = {
            "accessToken": account["accessToken"],
            "refreshToken": account["refreshToken"],
            "expiresAt": account["expiresAt"],
            "scopes": ["user:inference"],
            "subscriptionType": "max",
        }
        oauth.update(overrides)
        path.write_text(json.dumps({"claudeAiOauth": oauth, "mcpOAuth": {"keep": "me"}}))
        return path

    def start(self, pool: AccountPool | None = None, **settings: Any) -> AccountsService:
        config = load_config(self.path, create=False)
        self.pool = pool if pool is not None else AccountPool(config.accounts, Thresholds())
        self.hub = EventHub()
        self.hub.subscribe(self.events.append)
        self.router = Router(self.pool, self.clock.seconds, self.hub)
        self.problems = Problems(self.hub, self.clock.seconds)
        options = {"sighup": False, "poll_usage": self.poll_usage, **settings}
        self.service = AccountsService(
            self.clock,
            self.path,
            self.pool,
            self.router,
            self.hub,
            self.client,
            AccountsSettings.from_config(config, **options),
            random=lambda: self.random,
            problems=self.problems,
        )
        self.router.can_refresh = self.service.can_refresh
        self.service.startService()
        self.addCleanup(self.stop)
        return self.service

    def stop(self) -> None:
        if self.service is not None and self.service.running:
            self.fake.hold_tokens = False
            self.fake.release()
            self.stub.flush()
            self.service.stopService()

    # -- looking -----------------------------------------------------------------

    def file_account(self, name: str) -> dict[str, Any] | None:
        for account in json.loads(self.path.read_text())["accounts"]:
            if account["name"] == name:
                return account
        return None

    def account(self, name: str) -> Account:
        account = self.pool.get(name)
        assert account is not None, name
        return account

    def refreshes(self) -> list[Any]:
        return self.fake.token_requests("refresh_token")

    def refresh(self, name: str) -> Deferred[None]:
        assert self.service is not None
        return Deferred.fromCoroutine(self.service.refresh(self.account(name)))

    def release(self) -> None:
        self.fake.release()
        self.stub.flush()

    def log_text(self) -> str:
        return "\n".join(formatEvent(event) or "" for event in self.logged)


class RefreshTimerTests(Harness):
    def test_refreshed_five_minutes_before_expiry(self) -> None:
        """An idle account's token is refreshed 5 minutes before it expires, saved to the file, used by the pool,
        and the next refresh is armed for the new token's expiry."""
        original = self.oauth_account("a", priority=3)
        self.start()
        self.clock.advance(HOUR - MARGIN - 1)
        self.assertEqual(self.refreshes(), [])
        self.clock.advance(1)
        [request] = self.refreshes()
        self.assertEqual(request.body["refresh_token"], original["refreshToken"])
        saved = self.file_account("a")
        assert saved is not None
        self.assertNotEqual(saved["accessToken"], original["accessToken"])
        self.assertEqual(self.account("a").config.access_token, saved["accessToken"])
        self.assertEqual(self.account("a").config.refresh_token, saved["refreshToken"])
        self.assertEqual(saved["expiresAt"], int((self.clock.seconds() + self.fake.expires_in) * 1000))
        self.assertEqual(saved["priority"], 3)  # fields the refresh does not own are kept
        self.clock.advance(self.fake.expires_in - MARGIN - 1)
        self.assertEqual(len(self.refreshes()), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.refreshes()), 2)

    def test_expired_token_refreshed_at_start(self) -> None:
        """A token already inside the margin (or expired) is refreshed as soon as the service starts."""
        self.oauth_account("a", expires_in=60)
        self.start()
        self.clock.advance(0)
        self.assertEqual(len(self.refreshes()), 1)

    def test_unknown_expiry_and_api_keys_not_timed(self) -> None:
        """Accounts without an expiry, without a refresh token, or with an API key get no refresh timer."""
        add_account(self.path, {"name": "k", "type": "apikey", "apiKey": "sk-ant-api03-x"})
        account = self.oauth_account("a")
        update_account(self.path, "a", {"expiresAt": None})
        add_account(self.path, {"name": "n", "type": "oauth", "accessToken": account["accessToken"]})
        self.start()
        self.clock.advance(30 * 24 * HOUR)
        self.assertEqual(self.refreshes(), [])
        assert self.service is not None
        self.assertFalse(self.service.can_refresh(self.account("k")))
        self.assertFalse(self.service.can_refresh(self.account("n")))
        self.assertTrue(self.service.can_refresh(self.account("a")))

    def test_stop_cancels_timers_and_closes(self) -> None:
        """stopService cancels every timer."""
        self.oauth_account("a")
        service = self.start(poll_usage=True)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_waits_for_refresh_in_flight(self) -> None:
        """Stopping while a refresh is in flight waits for it, so a rotated pair is still saved."""
        self.oauth_account("a", expires_in=60)
        service = self.start()
        self.fake.hold_tokens = True
        self.clock.advance(0)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.release()
        self.successResultOf(stopped)
        self.assertEqual(self.file_account("a")["accessToken"], self.account("a").config.access_token)  # type: ignore[index]
        self.assertIn(self.account("a").config.refresh_token, self.fake.live_refresh)


class OnDemandTests(Harness):
    def test_ten_concurrent_refreshes_one_request(self) -> None:
        """Ten concurrent refresh() calls cause one token request and all wait for it; a 401 from a request
        sent with the old token moments later causes none."""
        self.oauth_account("a", expires_in=8 * HOUR)
        self.start()
        self.fake.hold_tokens = True
        waiting = [self.refresh("a") for _ in range(10)]
        self.assertEqual(len(self.refreshes()), 1)
        for d in waiting:
            self.assertNoResult(d)
        self.release()
        for d in waiting:
            self.assertIsNone(self.successResultOf(d))
        self.clock.advance(10)
        self.successResultOf(self.refresh("a"))
        self.assertEqual(len(self.refreshes()), 1)
        self.clock.advance(30)
        self.fake.hold_tokens = False
        self.successResultOf(self.refresh("a"))
        self.assertEqual(len(self.refreshes()), 2)

    def test_cancelled_waiter_does_not_cancel_refresh(self) -> None:
        """A caller that gives up waiting does not cancel the shared refresh."""
        self.oauth_account("a", expires_in=8 * HOUR)
        self.start()
        self.fake.hold_tokens = True
        first, second = self.refresh("a"), self.refresh("a")
        first.cancel()
        self.failureResultOf(first)
        self.release()
        self.successResultOf(second)
        self.assertEqual(self.file_account("a")["accessToken"], self.account("a").config.access_token)  # type: ignore[index]

    def test_rotation_persisted_before_use(self) -> None:
        """The new pair is in config.json before the pool's account holds it, and before the new access token
        is first presented to any endpoint."""
        self.oauth_account("a", expires_in=8 * HOUR)
        config = load_config(self.path, create=False)
        observations: list[tuple[str, bool]] = []
        path = self.path

        class Watched(Account):
            def __setattr__(self, name: str, value: Any) -> None:
                if name == "config" and "config" in self.__dict__:
                    on_disk = [a for a in json.loads(path.read_text())["accounts"] if a["name"] == value.name]
                    observations.append((value.access_token, bool(on_disk) and on_disk[0]["accessToken"] == value.access_token))
                super().__setattr__(name, value)

        pool = AccountPool([], Thresholds())
        pool.accounts = {"a": Watched(config=config.accounts[0], order=0)}

        def token_used(token: str, where: str) -> None:
            saved = self.file_account("a")
            observations.append((token, saved is not None and saved["accessToken"] == token))

        self.fake.on_token_use = token_used
        service = self.start(pool=pool, poll_usage=True)
        self.clock.advance(0)  # start-up poll with the old token
        self.successResultOf(self.refresh("a"))
        self.clock.advance(31 * 60 * 1.2)  # the next poll, with the new token
        new_token = self.account("a").config.access_token
        self.assertIn((new_token, True), observations)
        self.assertGreaterEqual(len([token for token, _ in observations if token == new_token]), 2)
        self.assertTrue(all(seen for _, seen in observations))
        self.assertTrue(service.running)

    def test_refresh_during_backoff_returns_at_once(self) -> None:
        """While backing off after a failure, refresh() returns without another token request."""
        self.oauth_account("a", expires_in=8 * HOUR)
        self.start()
        self.fake.fail_tokens(503)
        self.successResultOf(self.refresh("a"))
        self.successResultOf(self.refresh("a"))
        self.assertEqual(len(self.refreshes()), 1)

    def test_unknown_account(self) -> None:
        """refresh() of an account no longer in the pool does nothing."""
        self.oauth_account("a")
        self.start()
        stale = Account(config=self.account("a").config, order=0)
        self.successResultOf(Deferred.fromCoroutine(self.service.refresh(stale)))  # type: ignore[union-attr]
        self.assertEqual(self.refreshes(), [])

    def test_401_refreshes_then_retries_with_new_token(self) -> None:
        """A 401 on an OAuth account makes the Scheduler refresh it once; the retry carries the new token."""
        self.oauth_account("a", expires_in=8 * HOUR)
        service = self.start()
        scheduler = Scheduler(self.clock, self.router, service.refresh)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        sent: list[tuple[int, str | None]] = []

        class Response:
            def __init__(self, code: int) -> None:
                self.code = code
                self.headers = Headers()

        async def send(account: Account, decision: Any, timeout: float | None) -> Response:
            code = 401 if not sent else 200
            sent.append((code, account.config.access_token))
            return Response(code)

        async def discard(response: Any) -> None:
            pass

        old = self.account("a").config.access_token
        exchange = self.router.open(turn(X))
        outcome = self.successResultOf(Deferred.fromCoroutine(scheduler.dispatch(exchange, send, discard, lambda: False, True)))
        self.assertEqual(outcome.response.code, 200)
        self.assertEqual(len(self.refreshes()), 1)
        self.assertEqual(sent[0], (401, old))
        self.assertEqual(sent[1], (200, self.file_account("a")["accessToken"]))  # type: ignore[index]
        self.assertNotEqual(sent[1][1], old)


class BackoffTests(Harness):
    def test_server_errors_back_off_exponentially(self) -> None:
        """5xx answers are retried after 2, 4, 8 s (jitter from the injected random), then the refresh succeeds."""
        self.oauth_account("a", expires_in=60)
        self.start()
        self.fake.fail_tokens(503, count=3)
        self.clock.advance(0)
        times = lambda: [r.time - NOW for r in self.refreshes()]  # noqa: E731
        self.assertEqual(times(), [0])
        for delay, expected in ((1.9, [0]), (0.1, [0, 2]), (4, [0, 2, 6]), (8, [0, 2, 6, 14])):
            self.clock.advance(delay)
            self.assertEqual(times(), expected)
        self.assertEqual(self.file_account("a")["accessToken"], self.account("a").config.access_token)  # type: ignore[index]
        self.assertIsNone(self.account("a").error)

    def test_backoff_capped_and_jittered(self) -> None:
        """The delay doubles up to a 5-minute cap, scaled by ±20% jitter."""
        self.oauth_account("a", expires_in=60)
        self.random = 1.0  # +20%
        self.start()
        self.fake.fail_tokens(500, count=20)
        self.clock.advance(0)
        expected = [2.4, 4.8, 9.6, 19.2, 38.4, 76.8, 153.6, 307.2, BACKOFF_CAP * 1.2, BACKOFF_CAP * 1.2]
        for attempts, delay in enumerate(expected, start=2):
            self.clock.advance(delay - 0.001)
            self.assertEqual(len(self.refreshes()), attempts - 1, delay)
            self.clock.advance(0.002)
            self.assertEqual(len(self.refreshes()), attempts, delay)

    def test_network_errors_back_off(self) -> None:
        """A token endpoint that cannot be reached is retried with back-off too."""
        self.oauth_account("a", expires_in=60)
        self.start()
        self.fake.stall_tokens = True
        self.clock.advance(0)
        self.clock.advance(30)  # the client's timeout
        self.assertEqual(len(self.refreshes()), 1)
        self.fake.stall_tokens = False
        self.clock.advance(2)
        self.assertEqual(len(self.refreshes()), 2)
        self.assertIsNone(self.account("a").error)

    def test_429_waits_for_retry_after(self) -> None:
        """A 429 from the token endpoint is retried no sooner than its retry-after (plus up to 20% jitter)."""
        self.oauth_account("a", expires_in=60)
        self.start()
        self.fake.fail_tokens(429, {"error": "rate_limit"}, {"retry-after": "120"})
        self.clock.advance(0)
        self.clock.advance(131)
        self.assertEqual(len(self.refreshes()), 1)
        self.clock.advance(1)  # 120 * (1 + 0.2 * 0.5)
        self.assertEqual(len(self.refreshes()), 2)


class InvalidGrantTests(Harness):
    def test_dead_grant_marks_error(self) -> None:
        """invalid_grant for an account made by login marks it error, saying to log in again, emits account-error,
        and stops refreshing it until the file brings a new refresh token."""
        account = self.oauth_account("a", expires_in=60)
        self.fake.live_refresh.pop(account["refreshToken"])
        service = self.start()
        self.clock.advance(0)
        error = self.account("a").error
        assert error is not None
        self.assertIn("nextclaude login", error)
        [event] = [e for e in self.events if e.kind == events.ACCOUNT_ERROR]
        self.assertEqual(event.data["account"], "a")
        self.assertFalse(service.can_refresh(self.account("a")))
        self.clock.advance(HOUR)
        self.assertEqual(len(self.refreshes()), 1)
        # Logged in again: the reload brings a live grant and the account back.
        access, refresh, expires = self.fake.issue(expires_in=60)
        update_account(self.path, "a", {"accessToken": access, "refreshToken": refresh, "expiresAt": expires})
        service.reload()
        self.assertIsNone(self.account("a").error)
        self.clock.advance(0)
        self.assertEqual(len(self.refreshes()), 2)
        self.assertIsNone(self.account("a").error)

    def test_imported_adopts_pair_rotated_elsewhere(self) -> None:
        """invalid_grant for an imported account re-reads its source; a pair Claude Code rotated there is adopted,
        saved to the config, and the account stays healthy."""
        ours = self.oauth_account("a", expires_in=8 * HOUR)
        # Claude Code refreshed first: our refresh token died, the live pair is in its file
        # (expiring a little earlier than ours, so it is not adopted before trying).
        self.fake.live_refresh.pop(ours["refreshToken"])
        access, refresh, expires = self.fake.issue(expires_in=7 * 3600)
        source = self.source_file(ours, accessToken=access, refreshToken=refresh, expiresAt=expires)
        update_account(self.path, "a", {"importFrom": str(source)})
        self.start()
        self.successResultOf(self.refresh("a"))  # after a 401
        self.assertEqual(len(self.refreshes()), 1)
        self.assertIsNone(self.account("a").error)
        self.assertEqual(self.account("a").config.refresh_token, refresh)
        self.assertEqual(self.file_account("a")["refreshToken"], refresh)  # type: ignore[index]
        self.assertEqual([e for e in self.events if e.kind == events.ACCOUNT_ERROR], [])

    def test_imported_adopted_pair_near_expiry_is_refreshed(self) -> None:
        """An adopted pair about to expire is refreshed at once with its own refresh token, and the result
        written to the config and back to the source."""
        ours = self.oauth_account("a", expires_in=60)
        self.fake.live_refresh.pop(ours["refreshToken"])
        access, refresh, _ = self.fake.issue(expires_in=30)
        source = self.source_file(ours, accessToken=access, refreshToken=refresh, expiresAt=ours["expiresAt"] - 1000)
        update_account(self.path, "a", {"importFrom": str(source)})
        self.start()
        self.clock.advance(0)
        self.assertEqual([r.body["refresh_token"] for r in self.refreshes()], [ours["refreshToken"], refresh])
        new = self.account("a").config
        self.assertIsNone(self.account("a").error)
        self.assertEqual(read_credentials(str(source)).refresh_token, new.refresh_token)
        self.assertEqual(self.file_account("a")["refreshToken"], new.refresh_token)  # type: ignore[index]

    def test_imported_source_unchanged_marks_error(self) -> None:
        """invalid_grant for an imported account whose source holds the same dead token marks it error,
        saying to import again."""
        ours = self.oauth_account("a", expires_in=60)
        source = self.source_file(ours)
        update_account(self.path, "a", {"importFrom": str(source)})
        self.fake.live_refresh.pop(ours["refreshToken"])
        self.start()
        self.clock.advance(0)
        error = self.account("a").error
        assert error is not None
        self.assertIn("nextclaude import", error)
        self.assertIn("nextclaude login", error)
        self.assertEqual(len(self.refreshes()), 1)


class SharedGrantTests(Harness):
    def test_source_reread_and_written_back(self) -> None:
        """An imported account's refresh uses the source's pair, then writes the new pair back to the source
        file keeping its other keys; the config gets the same pair first."""
        ours = self.oauth_account("a", expires_in=60)
        source = self.source_file(ours)
        update_account(self.path, "a", {"importFrom": str(source)})
        reads: list[str] = []
        self.start()
        original_read = self.service._read_source  # type: ignore[union-attr]

        def counting_read(where: str) -> Any:
            reads.append(where)
            return original_read(where)

        self.service._read_source = counting_read  # type: ignore[union-attr]
        self.clock.advance(0)
        self.assertEqual(reads, [str(source)])
        [request] = self.refreshes()
        self.assertEqual(request.body["refresh_token"], ours["refreshToken"])
        data = json.loads(source.read_text())
        new = self.account("a").config
        self.assertEqual(data["claudeAiOauth"]["accessToken"], new.access_token)
        self.assertEqual(data["claudeAiOauth"]["refreshToken"], new.refresh_token)
        self.assertEqual(data["claudeAiOauth"]["expiresAt"], new.expires_at)
        self.assertEqual(data["claudeAiOauth"]["subscriptionType"], "max")
        self.assertEqual(data["mcpOAuth"], {"keep": "me"})
        self.assertEqual(self.file_account("a")["refreshToken"], new.refresh_token)  # type: ignore[index]
        self.assertEqual(self.file_account("a")["importFrom"], str(source))  # type: ignore[index]

    def test_newer_source_adopted_without_refreshing(self) -> None:
        """When the source holds a different pair that expires later and is still good, it is adopted instead
        of spending a refresh."""
        ours = self.oauth_account("a", expires_in=60)
        access, refresh, expires = self.fake.issue(expires_in=8 * 3600)
        source = self.source_file(ours, accessToken=access, refreshToken=refresh, expiresAt=expires)
        update_account(self.path, "a", {"importFrom": str(source)})
        self.start()
        self.clock.advance(0)
        self.assertEqual(self.refreshes(), [])
        self.assertEqual(self.account("a").config.access_token, access)
        self.assertEqual(self.file_account("a")["accessToken"], access)  # type: ignore[index]
        # The next refresh is armed for the adopted token's expiry.
        self.clock.advance(8 * 3600 - MARGIN)
        self.assertEqual([r.body["refresh_token"] for r in self.refreshes()], [refresh])

    def test_unreadable_source_still_refreshes(self) -> None:
        """A source that cannot be read is logged and the refresh goes ahead with the pair we have."""
        ours = self.oauth_account("a", expires_in=60)
        missing = self.dir / "gone" / ".credentials.json"
        update_account(self.path, "a", {"importFrom": str(missing)})
        self.start()
        self.clock.advance(0)
        self.assertEqual(len(self.refreshes()), 1)
        self.assertIn("could not re-read", self.log_text())
        # Written back even so: Claude Code's next read finds the live pair.
        self.assertEqual(read_credentials(str(missing)).refresh_token, self.account("a").config.refresh_token)
        self.assertNotEqual(self.account("a").config.refresh_token, ours["refreshToken"])

    def test_write_back_failure_logged(self) -> None:
        """A source that cannot be written is a warning; the account keeps its new pair."""
        ours = self.oauth_account("a", expires_in=60)
        source = self.source_file(ours)
        update_account(self.path, "a", {"importFrom": str(source)})
        self.start()

        def broken(where: str, pair: Any) -> None:
            raise CredentialsError(where, "is read-only")

        self.service._write_source = broken  # type: ignore[union-attr]
        self.clock.advance(0)
        self.assertIn("could not write the new token of a back to", self.log_text())
        self.assertIsNone(self.account("a").error)
        self.assertEqual(self.file_account("a")["accessToken"], self.account("a").config.access_token)  # type: ignore[index]


class UsagePollTests(Harness):
    poll_usage = True

    def usage_requests(self) -> list[Any]:
        return self.fake.requests_to(USAGE_PATH)

    def test_polled_at_start_and_mapped(self) -> None:
        """Idle OAuth accounts' usage is read at start-up: percent becomes a fraction, ISO times epoch seconds."""
        self.oauth_account("a", expires_in=8 * HOUR)
        add_account(self.path, {"name": "k", "type": "apikey", "apiKey": "sk-ant-api03-x"})
        changed: list[bool] = []
        service = self.start()
        service.quota_changed = lambda: changed.append(True)
        self.clock.advance(0)
        self.assertEqual(len(self.usage_requests()), 1)
        self.assertEqual(self.account("a").windows["5h"], WindowQuota(utilization=0.42, reset=1893474000.0))
        self.assertEqual(self.account("a").windows["7d"], WindowQuota(utilization=0.075, reset=1893974400.0))
        self.assertEqual(self.account("k").windows, {})
        self.assertEqual(changed, [True])

    def test_polled_every_interval_with_jitter(self) -> None:
        """Polls repeat every usagePollMinutes scaled by the injected jitter."""
        self.oauth_account("a", expires_in=8 * HOUR)
        self.random = 1.0
        self.start()
        self.clock.advance(0)
        self.clock.advance(30 * 60 * 1.2 - 1)
        self.assertEqual(len(self.usage_requests()), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.usage_requests()), 2)

    def test_fresh_header_data_wins(self) -> None:
        """An account that served a request within the poll interval is not polled; its header data stays."""
        self.oauth_account("a", expires_in=8 * HOUR)
        config = load_config(self.path, create=False)
        pool = AccountPool(config.accounts, Thresholds())
        account = pool.get("a")
        assert account is not None
        account.last_used = NOW - 60
        account.windows = {"5h": WindowQuota(utilization=0.9, reset=NOW + HOUR, status="allowed")}
        self.start(pool=pool)
        self.clock.advance(0)
        self.assertEqual(self.usage_requests(), [])
        self.assertEqual(account.windows["5h"].utilization, 0.9)
        # No traffic for a whole interval: the next look polls.
        self.clock.advance(30 * 60)
        self.assertEqual(len(self.usage_requests()), 1)
        self.assertEqual(account.windows["5h"].utilization, 0.42)

    def test_traffic_during_poll_wins(self) -> None:
        """A poll whose answer arrives after a request updated the account is not folded in."""
        self.oauth_account("a", expires_in=8 * HOUR)
        self.start()
        original = self.fake._resource

        def slow(request: Any, path: str, headers: dict[str, str]) -> Any:
            self.account("a").last_used = self.clock.seconds()
            return original(request, path, headers)

        self.fake._resource = slow  # type: ignore[method-assign]
        self.clock.advance(0)
        self.assertEqual(len(self.usage_requests()), 1)
        self.assertEqual(self.account("a").windows, {})

    def test_429_backs_off(self) -> None:
        """A 429 from the usage endpoint with a short retry-after is retried after a minute, then two (not after
        the whole poll interval); tests.test_usage_polls covers retry-after, spacing and the cap."""
        self.oauth_account("a", expires_in=24 * HOUR)
        self.start()
        self.fake.fail_usage(429, {"type": "error"}, {"retry-after": "5"}, count=2)
        self.clock.advance(0)
        self.clock.advance(60 - 1)
        self.assertEqual(len(self.usage_requests()), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.usage_requests()), 2)
        self.clock.advance(120 - 1)
        self.assertEqual(len(self.usage_requests()), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.usage_requests()), 3)
        self.assertEqual(self.account("a").windows["5h"].utilization, 0.42)

    def test_server_error_retried_sooner(self) -> None:
        """A 5xx from the usage endpoint is retried after a minute, then two."""
        self.oauth_account("a", expires_in=24 * HOUR)
        self.start()
        self.fake.fail_usage(502, count=2)
        self.clock.advance(0)
        self.clock.advance(60)
        self.assertEqual(len(self.usage_requests()), 2)
        self.clock.advance(120)
        self.assertEqual(len(self.usage_requests()), 3)

    def test_401_triggers_refresh(self) -> None:
        """A usage 401 (a token revoked early) refreshes the account; the next poll uses the new token."""
        account = self.oauth_account("a", expires_in=8 * HOUR)
        self.fake.access.pop(account["accessToken"])
        self.start()
        self.clock.advance(0)
        self.assertEqual(len(self.refreshes()), 1)
        self.clock.advance(60)
        last = self.usage_requests()[-1]
        self.assertEqual(last.headers["authorization"], f"Bearer {self.account('a').config.access_token}")
        self.assertIn("5h", self.account("a").windows)

    def test_expired_or_error_accounts_not_polled(self) -> None:
        """Accounts in error, or whose token has expired, are not polled."""
        self.oauth_account("a", expires_in=-10)
        self.oauth_account("b", expires_in=8 * HOUR)
        config = load_config(self.path, create=False)
        pool = AccountPool(config.accounts, Thresholds())
        pool.get("b").error = "broken"  # type: ignore[union-attr]
        self.fake.hold_tokens = True  # keep a's refresh from bringing a new token
        self.start(pool=pool)
        self.clock.advance(0)
        self.assertEqual(self.usage_requests(), [])


class ReloadTests(Harness):
    def test_watcher_adds_changes_and_removes(self) -> None:
        """A change to the file is picked up within 2 s: accounts added, their tokens changed, removed (and forgotten
        by the router); the pool keeps the same Account objects for the others."""
        self.oauth_account("a", expires_in=8 * HOUR)
        self.start()
        kept = self.account("a")
        self.oauth_account("b", expires_in=60)
        self.clock.advance(2)
        self.assertEqual(sorted(self.pool.accounts), ["a", "b"])
        self.assertIs(self.pool.get("a"), kept)
        self.clock.advance(0)
        self.assertEqual(len(self.refreshes()), 1)  # b's timer was armed
        self.router.pin("a")
        remove_account(self.path, "a")
        self.clock.advance(2)
        self.assertEqual(list(self.pool.accounts), ["b"])
        self.assertIsNone(self.router.manual)

    def test_reload_returns_names(self) -> None:
        """reload() re-reads the file and returns (added, removed)."""
        self.oauth_account("a")
        service = self.start(watch_interval=None)
        self.oauth_account("b")
        remove_account(self.path, "a")
        self.assertEqual(service.reload(), (["b"], ["a"]))

    def test_in_flight_request_keeps_account(self) -> None:
        """A removed account's object stays intact for a request still holding it."""
        self.oauth_account("a")
        service = self.start(watch_interval=None)
        held = self.account("a")
        remove_account(self.path, "a")
        service.reload()
        self.assertIsNone(self.pool.get("a"))
        self.assertIsNotNone(held.config.access_token)

    def test_broken_file_ignored(self) -> None:
        """A file that does not parse on reload is logged, naming the file and problem, and the running
        accounts stay; once fixed it is picked up."""
        self.oauth_account("a")
        self.start()
        good = self.path.read_text()
        self.path.write_text(good.replace('"accounts"', '"accounts" oops'))
        self.clock.advance(2)
        self.assertEqual(list(self.pool.accounts), ["a"])
        text = self.log_text()
        self.assertIn(str(self.path), text)
        self.assertIn("invalid JSON", text)
        self.clock.advance(10)
        self.assertEqual(text.count("not reloading"), self.log_text().count("not reloading"))
        data = json.loads(good)
        data["accounts"][0]["expiresAt"] = 5  # invalid field
        self.path.write_text(json.dumps(data))
        self.clock.advance(2)
        self.assertIn("accounts[0].expiresAt", self.log_text())
        self.assertEqual(list(self.pool.accounts), ["a"])
        data["accounts"] = []
        self.path.write_text(json.dumps(data))
        self.clock.advance(2)
        self.assertEqual(list(self.pool.accounts), [])


class RaceTests(Harness):
    def fork(self, child: Any) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child()
                code = 0
            finally:
                os._exit(code)
        return pid

    def wait(self, pid: int) -> None:
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)

    def import_b(self) -> dict[str, Any]:
        access, refresh, expires = self.fake.issue("bob@example.com")
        return {"name": "b", "type": "oauth", "accessToken": access, "refreshToken": refresh, "expiresAt": expires, "importFrom": "/x"}

    def test_import_in_another_process_during_rotation(self) -> None:
        """An import written by another process while a refresh is in flight, and one waiting on the lock while
        the rotation is written, both survive alongside the rotated pair."""
        self.oauth_account("a", expires_in=60)
        self.start()
        self.fake.hold_tokens = True
        self.clock.advance(0)
        b = self.import_b()
        path = self.path
        self.wait(self.fork(lambda: add_account(path, b)))
        # Second writer: blocked on the lock while the rotation is written.
        c = dict(self.import_b(), name="c")
        with config_store(self.path).locked():
            pid = self.fork(lambda: add_account(path, c))
            self.release()
            rotated = self.account("a").config
            self.assertEqual(self.file_account("a")["accessToken"], rotated.access_token)  # type: ignore[index]
        self.wait(pid)
        saved = {a["name"]: a for a in json.loads(self.path.read_text())["accounts"]}
        self.assertEqual(sorted(saved), ["a", "b", "c"])
        self.assertEqual(saved["a"]["refreshToken"], rotated.refresh_token)
        self.assertEqual(saved["b"]["accessToken"], b["accessToken"])
        self.clock.advance(2)
        self.assertEqual(sorted(self.pool.accounts), ["a", "b", "c"])
        self.assertEqual(self.account("a").config.refresh_token, rotated.refresh_token)

    def test_import_in_process_during_rotation(self) -> None:
        """A re-import of another account through its own JsonStore while the refresh is in flight survives."""
        self.oauth_account("a", expires_in=60)
        self.start()
        self.fake.hold_tokens = True
        self.clock.advance(0)
        add_account(self.path, self.import_b())
        self.release()
        saved = {a["name"]: a for a in json.loads(self.path.read_text())["accounts"]}
        self.assertEqual(sorted(saved), ["a", "b"])
        self.assertEqual(saved["a"]["accessToken"], self.account("a").config.access_token)

    def test_remove_during_rotation_not_undone(self) -> None:
        """An account removed while its refresh is in flight stays removed: the rotation is not written back
        into the config, and the pool drops it."""
        ours = self.oauth_account("a", expires_in=60)
        self.oauth_account("other", expires_in=8 * HOUR)
        source = self.source_file(ours)
        update_account(self.path, "a", {"importFrom": str(source)})
        self.start()
        self.fake.hold_tokens = True
        self.clock.advance(0)
        self.assertTrue(remove_account(self.path, "a"))
        self.release()
        self.assertIsNone(self.file_account("a"))
        self.assertEqual(list(self.pool.accounts), ["other"])
        self.assertIn("not adding it back", self.log_text())
        # Claude Code's copy of the shared grant was rotated, so it still gets the live pair.
        self.assertIn(read_credentials(str(source)).refresh_token, self.fake.live_refresh)


class SighupTests(TestCase):
    def test_sighup_reloads(self) -> None:
        """SIGHUP under a running reactor reloads the accounts; stopping restores the previous handler."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        path = directory / "config.json"
        path.write_text(json.dumps({"proxy": {"apiKey": "nc-x"}, "accounts": []}))
        pool = AccountPool([], Thresholds())
        hub = EventHub()
        router = Router(pool, reactor.seconds, hub)
        client = OAuthClient(reactor, FakeOAuthServer().settings(), http=StubTreq(FakeOAuthServer()))
        service = AccountsService(
            reactor, path, pool, router, hub, client, AccountsSettings(watch_interval=None, poll_usage=False)
        )
        before = signal.getsignal(signal.SIGHUP)
        reloaded: Deferred[tuple[list[str], list[str]]] = Deferred()
        original = service.reload

        def reload() -> tuple[list[str], list[str]]:
            result = original()
            reloaded.callback(result)
            return result

        service.reload = reload  # type: ignore[method-assign]

        def started() -> None:
            # Inside the running reactor, as under twistd or `nextclaude server`.
            service.startService()
            self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
            add_account(path, {"name": "k", "type": "apikey", "apiKey": "sk-ant-api03-x"})
            os.kill(os.getpid(), signal.SIGHUP)

        reactor.callLater(0, started)

        def check(result: tuple[list[str], list[str]]) -> Deferred[None]:
            self.assertEqual(result, (["k"], []))
            stopped = service.stopService()
            self.assertEqual(signal.getsignal(signal.SIGHUP), before)
            return stopped

        return reloaded.addCallback(check)


class LogHygieneTests(Harness):
    poll_usage = True

    def test_tokens_never_logged(self) -> None:
        """No token appears in any log event or hub event through refreshes, failures, write-back problems,
        invalid grants, usage polls and reloads."""
        ours = self.oauth_account("a", expires_in=60)
        dead = self.oauth_account("d", expires_in=60)
        self.fake.live_refresh.pop(dead["refreshToken"])
        source = self.source_file(ours)
        update_account(self.path, "a", {"importFrom": str(source)})
        self.fake.fail_tokens(503, {"error": "server", "error_description": f"bad token {ours['refreshToken']}"})
        self.start()

        def broken(where: str, pair: Any) -> None:
            raise CredentialsError(where, "is read-only")

        self.service._write_source = broken  # type: ignore[union-attr]
        self.fake.fail_usage(429, {"type": "error"}, {"retry-after": "1"})
        self.clock.advance(0)
        self.clock.advance(3)
        self.path.write_text("{broken")
        self.clock.advance(2)
        self.assertTrue(self.account("d").error)
        secrets = set(self.fake.access) | set(self.fake.live_refresh) | self.fake.used_refresh
        self.assertGreater(len(secrets), 4)
        texts = [formatEvent(event) or "" for event in self.logged] + [repr(event) for event in self.logged]
        texts += [json.dumps(event.to_json()) for event in self.events]
        texts += [repr(account.config) for account in self.pool]
        joined = "\n".join(texts)
        self.assertIn("refreshing the token of a failed", joined)
        for secret in secrets:
            self.assertNotIn(secret, joined)
            self.assertNotIn(secret.split("-")[-1], joined)


class CannotServeTests(Harness):
    """
    Issue 15, item 14: an account that cannot serve is an error with its
    fix, and background failures are problems until resolved.
    """

    poll_usage = True

    def test_expired_without_refresh_token_is_an_error(self) -> None:
        """
        An OAuth account whose access token expired and has no refresh
        token is an error at start-up (with the login command that fixes
        it), is not routed to, and the status snapshot's problems name it.
        """
        from nextclaude.pool import Status

        account = self.oauth_account("a", expires_in=-60)
        update_account(self.path, "a", {"refreshToken": None})
        self.oauth_account("b", expires_in=8 * HOUR)
        self.start()
        a = self.account("a")
        self.assertEqual(self.pool.status(a, self.clock.seconds()), Status.ERROR)
        self.assertIn("expired and there is no refresh token", a.error or "")
        self.assertIn("nextclaude login --name a", a.error or "")
        self.assertEqual(self.router.status_of(a), Status.ERROR)
        self.assertEqual([p["kind"] for p in self.problems.snapshot() if p["account"] == "a"], ["account-error"])
        decision = self.router.route(self.router.open(turn(X)))
        self.assertEqual(decision.account.name, "b")
        self.assertNotEqual(self.router.primary, "a")
        del account

    def test_becomes_an_error_when_it_expires(self) -> None:
        """
        A token with no refresh token that is still valid serves until its
        expiry, then turns into an error on the clock, not at the next 401.
        """
        self.oauth_account("a", expires_in=HOUR)
        update_account(self.path, "a", {"refreshToken": None})
        self.start()
        self.assertIsNone(self.account("a").error)
        self.clock.advance(HOUR - 1)
        self.assertIsNone(self.account("a").error)
        self.clock.advance(1)
        self.assertIn("expired and there is no refresh token", self.account("a").error or "")
        self.assertEqual([e.kind for e in self.events if e.kind == events.ACCOUNT_ERROR], [events.ACCOUNT_ERROR])

    def test_a_new_login_clears_it(self) -> None:
        """
        Logging in again (new tokens in the file, picked up by the reload)
        clears the error and its problem.
        """
        self.oauth_account("a", expires_in=-60)
        update_account(self.path, "a", {"refreshToken": None})
        self.start()
        self.assertIsNotNone(self.account("a").error)
        access, refresh, _ = self.fake.issue("alice@example.com")
        update_account(
            self.path,
            "a",
            {"accessToken": access, "refreshToken": refresh, "expiresAt": int((self.clock.seconds() + HOUR) * 1000)},
        )
        self.clock.advance(2)
        self.assertIsNone(self.account("a").error)
        self.problems.sync_accounts({account.name: account.error for account in self.pool})
        self.assertEqual(self.problems.snapshot(), [])

    def test_usage_endpoint_unreachable_is_a_problem_until_it_answers(self) -> None:
        """
        A usage poll that cannot reach the endpoint (a 502, twice) raises a
        usage-unreachable problem for the account, once; the next poll that
        works clears it.
        """
        from nextclaude.problems import USAGE_UNREACHABLE

        self.oauth_account("a", expires_in=24 * HOUR)
        self.start()
        self.fake.fail_usage(502, count=2)
        self.clock.advance(0)
        shown = self.problems.snapshot()
        self.assertEqual([(p["account"], p["kind"]) for p in shown], [("a", USAGE_UNREACHABLE)])
        self.assertIn("usage endpoint cannot be read", shown[0]["message"])
        self.clock.advance(60)
        self.assertEqual(len([e for e in self.events if e.kind == events.PROBLEM_RAISED]), 1)
        self.clock.advance(120)
        self.assertEqual(self.problems.snapshot(), [])
        self.assertEqual([e.data["problem"] for e in self.events if e.kind == events.PROBLEM_CLEARED], [USAGE_UNREACHABLE])

    def test_a_429_from_the_usage_endpoint_is_no_problem(self) -> None:
        """
        A 429 from the usage endpoint only means "later": no problem.
        """
        self.oauth_account("a", expires_in=24 * HOUR)
        self.start()
        self.fake.fail_usage(429, {"type": "error"}, {"retry-after": "5"})
        self.clock.advance(0)
        self.assertEqual(self.problems.snapshot(), [])

    def test_refused_automatic_reload_is_a_problem_until_fixed(self) -> None:
        """
        A config file broken by an edit is not loaded by the watcher: a
        config-refused problem names the file and the field and stays
        while the file is broken; a reload that works clears it.
        """
        from nextclaude.problems import CONFIG_REFUSED

        self.oauth_account("a", expires_in=8 * HOUR)
        self.start()
        data = json.loads(self.path.read_text())
        data["accounts"][0]["expiresAt"] = 5
        self.path.write_text(json.dumps(data))
        self.clock.advance(2)
        shown = self.problems.snapshot()
        self.assertEqual([(p["account"], p["kind"]) for p in shown], [(None, CONFIG_REFUSED)])
        self.assertIn(str(self.path), shown[0]["message"])
        self.assertIn("accounts[0].expiresAt", shown[0]["message"])
        self.assertIn("not loaded", shown[0]["message"])
        self.clock.advance(10)
        self.assertEqual(len(self.problems.snapshot()), 1)
        data["accounts"][0]["expiresAt"] = int((self.clock.seconds() + 8 * HOUR) * 1000)
        self.path.write_text(json.dumps(data))
        self.clock.advance(2)
        self.assertEqual(self.problems.snapshot(), [])
