"""The running proxy's side of the accounts: token refresh, usage polling, reloads.

- **Refresh.** Every OAuth account is refreshed ``refresh_margin`` (5 min)
  before its token expires, idle or not, and on demand after a 401
  (``refresh``, the Scheduler's hook; ``can_refresh``, the Router's). One
  refresh per account is in flight at a time; callers share it. The rotated
  pair is saved to config.json (one locked operation) *before* the pool's
  account uses it, because the old refresh token is dead the moment the
  server answers. Imported accounts share their grant with Claude Code
  (PROTOCOL.md, "Shared grants"): their source is re-read first and newer
  tokens there adopted, and a rotated pair is written back to it after.
- **Usage polling.** OAuth accounts without recent traffic (whose quota
  headers would be fresher) have their windows read from the usage endpoint
  at start-up and every ``usagePollMinutes``, jittered, backing off on errors.
- **Reload.** SIGHUP and a change of the config file's mtime/size/inode
  reload the accounts into the pool; in-flight requests keep their Account
  objects. A file that does not load is reported and ignored.
- **Forward only.** A refresh token the proxy spent is remembered (its
  SHA-256, in state.json) and never taken back: a reload, or a re-read of
  Claude Code's store, that brings one keeps the live pair and writes it
  back. A pair that cannot be saved is kept in a recovery file, retried with
  back-off and on every reload, shown as a problem until it lands, and
  adopted by the next start if it never did (nextclaude.tokenstate).

Everything runs on the injected reactor. Tokens are never logged.
"""

from __future__ import annotations

import dataclasses
import os
import random as _random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nextclaude import credentials, events, tokenstate
from nextclaude.config import (
    ABSENT,
    SAVED,
    SUPERSEDED,
    AccountConfig,
    Config,
    ConfigError,
    config_store,
    load_config,
    save_tokens,
)
from nextclaude.events import EventHub
from nextclaude.oauth import OAuthClient, OAuthError, TokenSet
from nextclaude.paths import FileProblem
from nextclaude.pool import Account, AccountPool
from nextclaude.problems import CONFIG_REFUSED, TOKEN_IN_MEMORY, TOKEN_UNSAVED, USAGE_UNREACHABLE, Problems
from nextclaude.quota import QuotaReport
from nextclaude.router import Router

REFRESH_MARGIN = 300.0
# A 401 this soon after a successful refresh came from a request sent with
# the old token: retrying with the new one is enough.
RECENT_REFRESH = 30.0
BACKOFF_START = 2.0
BACKOFF_CAP = 300.0
RATE_LIMIT_CAP = 3600.0
WATCH_INTERVAL = 2.0
POLL_JITTER = 0.2
# Usage polls of different accounts go out at least this far apart: the
# endpoint limits how often it may be called, and a burst (every account
# at start-up) draws 429s for all but the first.
POLL_SPACING = 5.0
# A failed or rejected poll is retried after a minute, doubling up to ten
# (never later than the regular interval): an account whose quota is
# unknown ranks as unused, so waiting the whole interval misleads routing.
POLL_RETRY_START = 60.0
POLL_RETRY_CAP = 600.0
# A retry-after is honoured as given up to this; longer is a broken server.
POLL_RETRY_AFTER_CAP = 6 * 3600.0
# A pair that could not be saved is tried again after 5 s, doubling to 5 min.
SAVE_RETRY_START = 5.0
SAVE_RETRY_CAP = 300.0
# The most a stop waits for another process's lock to save unsaved pairs.
STOP_SAVE_TIMEOUT = 3.0
#: A pair the last attempt could not write (the outcomes are config's SAVED, ABSENT, SUPERSEDED).
UNSAVED = "unsaved"
IN_MEMORY_MESSAGE = "{name}: new token held only in memory; after a stop {name} needs `nextclaude login`"


@dataclass(frozen=True)
class AccountsSettings:
    usage_poll_minutes: float = 30.0
    refresh_margin: float = REFRESH_MARGIN
    # Seconds between looks at the config file; None turns the watcher off.
    watch_interval: float | None = WATCH_INTERVAL
    # Reload on SIGHUP (only under a reactor that runs, in the main thread).
    sighup: bool = True
    poll_usage: bool = True

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> AccountsSettings:
        return cls(**{"usage_poll_minutes": config.usage_poll_minutes, **overrides})

    @classmethod
    def quiet(cls, config: Config) -> AccountsSettings:
        """
        For a proxy embedded in something else (the demo, benchmarks,
        tests): no usage polling, no SIGHUP handler, no file watcher.
        """
        return cls.from_config(config, sighup=False, poll_usage=False, watch_interval=None)


@dataclass
class _Refresher:
    inflight: Deferred[None] | None = None
    timer: IDelayedCall | None = None
    failures: int = 0
    not_before: float = 0.0
    # A failed attempt waits for not_before rather than for the next expiry.
    retry_pending: bool = False
    refreshed_at: float | None = None
    # The refresh token the server declared dead; a new one revives the account.
    dead_token: str | None = None


@dataclass
class _Poller:
    timer: IDelayedCall | None = None
    inflight: Deferred[None] | None = None
    failures: int = 0
    # When this account's last usage request went out (for the spacing).
    sent_at: float | None = None


@dataclass
class _Unsaved:
    """A live pair config.json does not hold yet."""

    fields: dict[str, Any]  # file form, refreshToken always present
    # The refresh token the account held before this pair: the file may
    # still hold it, and it may be replaced even if it was never spent.
    previous: str | None
    recovery: bool = False  # a recovery file holds it
    failures: int = 0
    problem: str | None = None

    def replaceable(self, spent: tokenstate.SpentTokens) -> Callable[[str | None], bool]:
        live = self.fields.get("refreshToken")
        return lambda current: current is None or current in (live, self.previous) or spent.is_spent(current)


def _follow(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with None) when ``d`` does; cancelling it leaves ``d`` alone."""
    follower: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not follower.called:
            follower.callback(None)
        return result

    d.addBoth(fire)
    return follower


def _pair_fields(pair: credentials.TokenPair) -> dict[str, Any]:
    """The config keys a rotated or adopted pair changes (unknown values keep what is there)."""
    fields: dict[str, Any] = {"accessToken": pair.access_token, "expiresAt": pair.expires_at_ms}
    if pair.refresh_token:
        fields["refreshToken"] = pair.refresh_token
    if pair.scopes:
        fields["scopes"] = list(pair.scopes)
    return fields


def _config_pair(config: AccountConfig) -> TokenSet:
    return TokenSet(config.access_token or "", config.refresh_token, config.expires_at, config.scopes)


def _with_pair(config: AccountConfig, fields: dict[str, Any]) -> AccountConfig:
    """``config`` holding the pair in ``fields`` (file form); what the pair does not say is kept."""
    expires = fields.get("expiresAt")
    scopes = fields.get("scopes")
    return dataclasses.replace(
        config,
        access_token=fields.get("accessToken") or config.access_token,
        refresh_token=fields.get("refreshToken") or config.refresh_token,
        expires_at=expires if isinstance(expires, int) and not isinstance(expires, bool) else config.expires_at,
        scopes=tuple(s for s in scopes if isinstance(s, str)) if isinstance(scopes, list) and scopes else config.scopes,
    )


def _describe(error: Exception, path: Path) -> str:
    # Never the exception's full text: an OSError names the temporary file.
    if isinstance(error, FileProblem):
        return str(error)
    if isinstance(error, OSError):
        return f"{path}: {error.strerror or error}"
    return f"{path}: {error}"


# Usage-endpoint failures that mean it cannot be reached (not a refused
# token, which the refresh handles, nor a 429, which is only "later").
_UNREACHABLE_KINDS = frozenset({"network", "timeout", "server", "bad_response"})


class AccountsService(Service):
    name = "accounts"
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        config_path: Path,
        pool: AccountPool,
        router: Router,
        hub: EventHub,
        client: OAuthClient,
        settings: AccountsSettings | None = None,
        *,
        random: Callable[[], float] = _random.random,
        read_source: Callable[[str], credentials.ImportedCredentials] = credentials.read_credentials,
        write_source: Callable[[str, credentials.TokenPair], None] = credentials.write_back,
        problems: Problems | None = None,
    ) -> None:
        self._reactor = reactor
        self.config_path = Path(config_path)
        self._pool = pool
        self._router = router
        self._hub = hub
        self._client = client
        self.settings = settings if settings is not None else AccountsSettings()
        self._poll_minutes = self.settings.usage_poll_minutes
        self._random = random
        self._read_source = read_source
        self._write_source = write_source
        self._refreshers: dict[str, _Refresher] = {}
        self._pollers: dict[str, _Poller] = {}
        self._watcher: LoopingCall | None = None
        self._seen: tuple[int, int, int] | None = None
        self._previous_sighup: Any = None
        self._sighup_installed = False
        # Called after polled usage changed an account's windows; the service
        # wiring points it at Scheduler.arm_expiry so reset timers follow.
        self.quota_changed: Callable[[], None] = lambda: None
        # Unsaved tokens must be shown; a private registry keeps this
        # service usable on its own (tests, embedding).
        self._problems = problems if problems is not None else Problems(hub, reactor.seconds)
        self._config_store = config_store(self.config_path)
        self._spent = tokenstate.SpentTokens()
        # The ledger has digests state.json lacks (its last write failed).
        self._spent_dirty = False
        self._unsaved: dict[str, _Unsaved] = {}
        self._save_failures = 0
        self._save_timer: IDelayedCall | None = None

    # -- life cycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._recover()
        for account in self._pool:
            self._arm(account.name)
        self._schedule_first_polls()
        if self.settings.watch_interval is not None:
            self._seen = self._signature()
            self._watcher = LoopingCall(self._watch)
            self._watcher.clock = self._reactor
            self._watcher.start(self.settings.watch_interval, now=False).addErrback(
                lambda f: self._log.failure("the config file watcher stopped", f)
            )
        if self.settings.sighup and hasattr(signal, "SIGHUP") and hasattr(self._reactor, "callWhenRunning"):
            # A real reactor: signal handlers belong to the running loop's thread.
            if getattr(self._reactor, "running", False):
                self._install_sighup()
            else:
                self._reactor.callWhenRunning(self._install_sighup)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._watcher is not None and self._watcher.running:
            self._watcher.stop()
        self._watcher = None
        self._uninstall_sighup()
        self._cancel(self._save_timer)
        self._save_timer = None
        waits = []
        for refresher in self._refreshers.values():
            self._cancel(refresher.timer)
            refresher.timer = None
            if refresher.inflight is not None:
                # Not cancelled: a pair the server already rotated must reach
                # the file, or the account is lost. The client's timeout bounds this.
                waits.append(_follow(refresher.inflight))
        for poller in self._pollers.values():
            self._cancel(poller.timer)
            poller.timer = None
            if poller.inflight is not None:
                poller.inflight.cancel()
        done: Deferred[Any] = DeferredList(waits) if waits else succeed(None)
        done.addCallback(lambda _: self._final_save())
        done.addCallback(lambda _: self._client.close())
        done.addCallback(lambda _: None)
        return done

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()

    def _now(self) -> float:
        return self._reactor.seconds()

    # -- refresh --------------------------------------------------------------------

    def _refresher(self, name: str) -> _Refresher:
        return self._refreshers.setdefault(name, _Refresher())

    @staticmethod
    def _is_oauth(account: Account | None) -> bool:
        return account is not None and account.kind == "oauth"

    def can_refresh(self, account: Account) -> bool:
        """Router hook: whether a 401 on ``account`` is worth one forced refresh."""
        if not self._is_oauth(account) or not account.config.refresh_token or account.error is not None:
            return False
        refresher = self._refreshers.get(account.name)
        return refresher is None or refresher.dead_token != account.config.refresh_token

    async def refresh(self, account: Account) -> None:
        """Refresh ``account``'s token now (Scheduler hook, after a 401), or join the one in flight.

        Never raises: failures are logged, retried in the background or turn
        the account into an error. Returns at once while backing off, and when
        the token was refreshed moments ago (the 401 came from the old one).
        """
        name = account.name
        if self._pool.get(name) is not account or not self._is_oauth(account):
            return
        refresher = self._refresher(name)
        if refresher.inflight is None:
            if not self.can_refresh(account):
                return
            now = self._now()
            if refresher.not_before > now:
                return
            if refresher.refreshed_at is not None and now - refresher.refreshed_at < RECENT_REFRESH:
                return
            self._start(name)
        if refresher.inflight is not None:
            await _follow(refresher.inflight)

    def _arm(self, name: str) -> None:
        """(Re)schedule the account's next refresh: before expiry, or its retry after a failure."""
        refresher = self._refresher(name)
        self._cancel(refresher.timer)
        refresher.timer = None
        account = self._pool.get(name)
        if not self.running or not self._is_oauth(account) or account is None:
            return
        token = account.config.refresh_token
        if not token:
            # Nothing can renew it: once it expires the account is an error,
            # not an "active" account that would be routed to and 401.
            expires_at = account.config.expires_at
            if expires_at is not None and account.error is None:
                left = expires_at / 1000.0 - self._now()
                if left <= 0:
                    self._expired(name)  # at once: not one request may go to it
                else:
                    refresher.timer = self._reactor.callLater(left, self._expired, name)
            return
        if refresher.dead_token is not None:
            if refresher.dead_token == token:
                return
            refresher.dead_token = None  # re-imported or logged in again
        if refresher.retry_pending:
            when = refresher.not_before
        elif account.config.expires_at is None:
            return  # expiry unknown: refreshed on demand, after a 401
        else:
            when = max(account.config.expires_at / 1000.0 - self.settings.refresh_margin, refresher.not_before)
        refresher.timer = self._reactor.callLater(max(0.0, when - self._now()), self._fire, name)

    def _expired(self, name: str) -> None:
        """
        An access token with no refresh token reached its expiry: the
        account can serve nothing until the user logs in again.
        """
        self._refresher(name).timer = None
        account = self._pool.get(name)
        if (
            not self._is_oauth(account)
            or account is None
            or account.config.refresh_token
            or account.error is not None
            or account.config.expires_at is None
        ):
            return
        if account.config.expires_at / 1000.0 > self._now():
            self._arm(name)  # a reload brought a later expiry
            return
        message = (
            f"its access token expired and there is no refresh token to renew it; {self._login_fix(account)}"
        )
        account.error = message
        self._log.error("{account}: {message}", account=name, message=message)
        self._hub.emit(events.ACCOUNT_ERROR, self._now(), account=name, message=message)
        # The primary may have been this account: routing moves on now,
        # not at the next request.
        self._router.expire()

    @staticmethod
    def _login_fix(account: Account) -> str:
        name = account.name
        if account.config.import_from:
            return (
                f"log in to Claude Code and run `nextclaude import --name {name}` again, "
                f"or run `nextclaude login --name {name}` to give the proxy a grant of its own"
            )
        return f"run `nextclaude login --name {name}` (or `nextclaude import --name {name}`) again"

    def _fire(self, name: str) -> None:
        self._refresher(name).timer = None
        self._start(name)

    def _start(self, name: str) -> Deferred[None]:
        refresher = self._refresher(name)
        if refresher.inflight is not None:
            return refresher.inflight
        attempt = Deferred.fromCoroutine(self._run(name))

        def finished(result: object) -> None:
            if refresher.inflight is attempt:
                refresher.inflight = None
            if isinstance(result, Failure):
                self._log.failure("refreshing the token of {account} failed unexpectedly", result, account=name)

        if not attempt.called:
            refresher.inflight = attempt
        attempt.addBoth(finished)
        return attempt

    def _valid_for(self, pair: credentials.TokenPair) -> float:
        if pair.expires_at_ms is None:
            return 0.0
        return pair.expires_at_ms / 1000.0 - self._now()

    def _read(self, name: str, source: str) -> credentials.ImportedCredentials | None:
        try:
            return self._read_source(source)
        except credentials.CredentialsError as e:
            self._log.warn(
                "could not re-read the credentials {account} was imported from: {problem}", account=name, problem=str(e)
            )
        except Exception:
            self._log.failure("re-reading {source} failed", source=source)
        return None

    def _read_live(self, name: str, source: str, write_back: bool) -> credentials.ImportedCredentials | None:
        """The source's pair, or None when it cannot be read or holds a refresh token the proxy spent.

        A spent token there means Claude Code holds an old copy (restored,
        or our write-back failed); with ``write_back`` the account's live
        pair is written there so Claude Code works again.
        """
        theirs = self._read(name, source)
        if theirs is None or not self._spent.is_spent(theirs.refresh_token):
            return theirs
        self._log.warn(
            "{source} holds a refresh token of {account} the proxy already used; keeping the current pair",
            source=source,
            account=name,
        )
        account = self._pool.get(name)
        if write_back and account is not None and account.config.access_token:
            self._write_back(name, source, _config_pair(account.config))
        return None

    async def _run(self, name: str) -> None:
        account = self._pool.get(name)
        if not self._is_oauth(account) or account is None or not account.config.refresh_token:
            return
        config = account.config
        token: str = config.refresh_token  # type: ignore[assignment]
        source = config.import_from
        if source:
            # Shared grant: Claude Code may have rotated it since we last looked.
            theirs = self._read_live(name, source, write_back=True)
            if (
                theirs is not None
                and theirs.access_token != config.access_token
                and theirs.expires_at_ms is not None
                and (config.expires_at is None or theirs.expires_at_ms > config.expires_at)
            ):
                self._log.info("adopting newer tokens for {account} from {source}", account=name, source=source)
                if not self._store(name, theirs, None):
                    return
                if self._valid_for(theirs) > self.settings.refresh_margin:
                    self._succeeded(name)
                    return
                token = theirs.refresh_token or token
        reread = False
        while True:
            try:
                tokens = await self._client.refresh(token)
            except OAuthError as error:
                if error.kind == "invalid_grant" and source and not reread:
                    reread = True
                    # Our pair is dead too: nothing worth writing back.
                    theirs = self._read_live(name, source, write_back=False)
                    if theirs is not None and theirs.refresh_token and theirs.refresh_token != token:
                        # Someone else rotated the shared grant first: theirs is the live pair.
                        self._log.info(
                            "{account}'s refresh token was already used; adopting the pair in {source}",
                            account=name,
                            source=source,
                        )
                        if not self._store(name, theirs, None):
                            return
                        if self._valid_for(theirs) > self.settings.refresh_margin:
                            self._succeeded(name)
                            return
                        token = theirs.refresh_token
                        continue
                if error.kind == "invalid_grant":
                    self._dead(name, token, error)
                else:
                    self._failed(name, error)
                return
            break
        self._store(name, tokens, source, spent=token)
        self._succeeded(name)

    def _store(
        self, name: str, pair: credentials.TokenPair, write_back: str | None, spent: str | None = None
    ) -> bool:
        """Save ``pair`` to the config file, then let the account use it; False if it was removed.

        ``spent`` is the refresh token the server rotated to get ``pair``:
        it is dead from this moment, so its digest is recorded first.
        """
        account = self._pool.get(name)
        previous = account.config.refresh_token if account is not None else None
        if spent is not None and pair.refresh_token and pair.refresh_token != spent:
            self._spent.add(name, spent)
            self._spent_dirty = True
        fields = _pair_fields(pair)
        if "refreshToken" not in fields and previous:
            fields["refreshToken"] = previous  # not rotated: the old one stays live
        self._unsaved[name] = _Unsaved(fields, previous)
        outcome = self._save_all().get(name, UNSAVED)
        # UNSAVED: the old refresh token may already be dead, so the pair in
        # memory (and its recovery copy) is all that keeps the account alive.
        present = outcome in (SAVED, UNSAVED)
        if present:
            account = self._pool.get(name)
            if account is not None:
                account.config = _with_pair(account.config, fields)
                account.error = None
        if write_back:
            # Even for a removed account: the pair in the source is dead now,
            # and Claude Code lives on it.
            self._write_back(name, write_back, pair)
        if outcome == ABSENT:
            self._log.info(
                "{account} was removed from {path} while its token was refreshed; not adding it back",
                account=name,
                path=str(self.config_path),
            )
        elif outcome == SUPERSEDED:
            self._log.info(
                "{account} got other tokens in {path} while its token was refreshed; using those",
                account=name,
                path=str(self.config_path),
            )
        if not present:
            self._reload_logged()
        return present

    def _write_back(self, name: str, source: str, pair: credentials.TokenPair) -> None:
        try:
            self._write_source(source, pair)
        except credentials.CredentialsError as e:
            self._log.warn(
                "could not write the new token of {account} back to {source}: {problem}; "
                "Claude Code may ask you to log in again",
                account=name,
                source=source,
                problem=e.problem,
            )
        except Exception:
            self._log.failure("writing the new token back to {source} failed", source=source)

    # -- saving, forward only ---------------------------------------------------------

    def _save_all(self, lock_timeout: float | None = None) -> dict[str, str]:
        """One attempt at everything not on disk yet, under one hold of the lock: the spent
        ledger first (a pair must never land without the record of the token it replaced),
        then every unsaved pair. Returns each pair's outcome; failures are retried on a timer.
        """
        outcomes: dict[str, str] = {}
        if not self._unsaved and not self._spent_dirty:
            return outcomes
        try:
            with self._config_store.locked(timeout=lock_timeout):
                self._save_ledger()
                for name in list(self._unsaved):
                    outcomes[name] = self._save_pair(name)
        except (FileProblem, OSError) as error:
            # The lock itself: another process keeps it, or its directory is unusable.
            for name in list(self._unsaved):
                if name not in outcomes:
                    outcomes[name] = UNSAVED
                    self._keep_copy(name, error)
        if self._unsaved or self._spent_dirty:
            self._schedule_save()
        else:
            self._save_failures = 0
            self._cancel(self._save_timer)
            self._save_timer = None
        return outcomes

    def _save_ledger(self) -> None:
        if not self._spent_dirty:
            return
        try:
            tokenstate.save_spent(self.config_path, self._spent)
        except (FileProblem, OSError) as error:
            self._log.warn(
                "could not record spent refresh tokens in the state file: {problem}; retrying",
                problem=_describe(error, tokenstate.state_store(self.config_path).path),
            )
        else:
            self._spent_dirty = False

    def _save_pair(self, name: str) -> str:
        unsaved = self._unsaved[name]
        try:
            outcome = save_tokens(self.config_path, name, unsaved.fields, unsaved.replaceable(self._spent))
        except (FileProblem, OSError) as error:
            self._keep_copy(name, error)
            return UNSAVED
        del self._unsaved[name]
        if unsaved.failures:
            if outcome == SAVED:
                self._log.info("saved the new token of {account} to {path}", account=name, path=str(self.config_path))
            else:
                self._log.info(
                    "dropping the unsaved token of {account}: {path} no longer holds its old one",
                    account=name,
                    path=str(self.config_path),
                )
        self._resolved(name)
        return outcome

    def _resolved(self, name: str) -> None:
        """The pair landed (or is not wanted any more): its recovery copy and problems go."""
        try:
            tokenstate.remove_recovery(self.config_path, name)
        except OSError as error:
            self._log.warn(
                "could not remove {path}: {problem}; the next start removes it",
                path=str(tokenstate.recovery_path(self.config_path, name)),
                problem=error.strerror or str(error),
            )
        self._problems.clear(name, TOKEN_UNSAVED)
        self._problems.clear(name, TOKEN_IN_MEMORY)

    def _keep_copy(self, name: str, error: Exception) -> None:
        """The pair did not land: make sure a recovery file holds it, and say where it is."""
        unsaved = self._unsaved[name]
        unsaved.failures += 1
        problem = _describe(error, self.config_path)
        recovery = tokenstate.recovery_path(self.config_path, name)
        recovery_problem = None
        if not unsaved.recovery:
            try:
                tokenstate.write_recovery(self.config_path, name, unsaved.fields, self._spent.digests(name))
            except OSError as e:
                recovery_problem = e.strerror or str(e)
            else:
                unsaved.recovery = True
        retrying = "; retrying" if self.running else ""
        if unsaved.recovery:
            kept = f"a copy is in {recovery}{retrying}"
            self._problems.clear(name, TOKEN_IN_MEMORY)
            self._problems.raise_problem(
                name, TOKEN_UNSAVED, f"{name}: new token not saved ({problem}); a copy is in {recovery}, saving is retried"
            )
        else:
            kept = f"{recovery} could not be written either ({recovery_problem}); it is held only in memory{retrying}"
            self._problems.clear(name, TOKEN_UNSAVED)
            self._problems.raise_problem(name, TOKEN_IN_MEMORY, IN_MEMORY_MESSAGE.format(name=name))
        if problem != unsaved.problem:
            unsaved.problem = problem
            self._log.error(
                "could not save the new token of {account}: {problem}; {kept}", account=name, problem=problem, kept=kept
            )

    def _schedule_save(self) -> None:
        self._save_failures += 1
        self._cancel(self._save_timer)
        self._save_timer = None
        if not self.running:
            return
        delay = min(SAVE_RETRY_CAP, SAVE_RETRY_START * 2.0 ** (self._save_failures - 1))
        self._save_timer = self._reactor.callLater(delay, self._retry_save)

    def _retry_save(self) -> None:
        self._save_timer = None
        outcomes = self._save_all()
        if any(outcome in (ABSENT, SUPERSEDED) for outcome in outcomes.values()):
            # The file changed under the unsaved pair: the pool follows it.
            self._reload_logged()

    def _final_save(self) -> None:
        """At stop: one attempt per unsaved pair, never waiting long for the lock; say what is lost."""
        try:
            self._save_all(lock_timeout=STOP_SAVE_TIMEOUT)
        except Exception:
            self._log.failure("saving the unsaved tokens at stop failed")
        for name, unsaved in self._unsaved.items():
            if unsaved.recovery:
                self._log.error(
                    "{account}: new token not saved to {path}; {recovery} holds it and the next start adopts it",
                    account=name,
                    path=str(self.config_path),
                    recovery=str(tokenstate.recovery_path(self.config_path, name)),
                )
            else:
                self._log.error("{text}", text=IN_MEMORY_MESSAGE.format(name=name))

    def _is_old(self, name: str, token: str | None) -> bool:
        """Whether a refresh token read from a file is behind the account's live pair."""
        if token is not None and self._spent.is_spent(token):
            return True
        unsaved = self._unsaved.get(name)
        return unsaved is not None and token in (None, unsaved.previous)

    def _give_up(self, name: str, token: str) -> Account | None:
        """
        Stop refreshing C{name}: C{token} is dead, and nothing is tried
        again until the file brings another.  Returns the account, if any.
        """
        refresher = self._refresher(name)
        refresher.dead_token = token
        refresher.retry_pending = False
        self._cancel(refresher.timer)
        refresher.timer = None
        return self._pool.get(name)

    def _refuse(self, name: str, token: str) -> None:
        """The file gave ``name`` a spent refresh token and the proxy has no live pair to keep."""
        account = self._give_up(name, token)
        if account is None:
            return
        message = (
            f"its refresh token in {self.config_path} was already used by the proxy and no newer copy is known; "
            "run `nextclaude login` (or `nextclaude import`) again"
        )
        if account.error != message:
            account.error = message
            self._log.error("{account}: {message}", account=name, message=message)
            self._hub.emit(events.ACCOUNT_ERROR, self._now(), account=name, message=message)

    def _recover(self) -> None:
        """At start: remove temp files killed writes left, load the spent ledger, adopt
        recovery files whose pair never landed, and refuse spent tokens in the config."""
        state = tokenstate.state_store(self.config_path)
        for store in (self._config_store, state):
            try:
                removed = store.remove_stale_temps()
            except (FileProblem, OSError) as error:
                self._log.warn("could not look for stale temporary files: {problem}", problem=_describe(error, store.path))
                continue
            if removed:
                self._log.info(
                    "removed {count} temporary file(s) an interrupted write of {path} left behind",
                    count=len(removed),
                    path=str(store.path),
                )
        try:
            self._spent = tokenstate.SpentTokens.from_state(state.read())
        except FileProblem as error:
            self._log.warn("could not read the spent refresh tokens: {problem}", problem=str(error))
        recoveries = {r.account: r for r in tokenstate.read_recoveries(self.config_path)}
        for recovery in recoveries.values():
            self._spent.add_digests(recovery.account, recovery.spent)
            self._spent_dirty = True
        for account in self._pool:
            recovery = recoveries.pop(account.name, None)
            if recovery is not None and self._adopt(account, recovery):
                continue
            token = account.config.refresh_token
            if self._is_old(account.name, token) and token is not None:
                self._refuse(account.name, token)
        for recovery in recoveries.values():
            self._log.info(
                "removing {recovery}: {account} is no longer in {path}",
                recovery=str(recovery.path),
                account=recovery.account,
                path=str(self.config_path),
            )
            self._resolved(recovery.account)
        self._save_all()

    def _adopt(self, account: Account, recovery: tokenstate.Recovery) -> bool:
        """Take the pair a recovery file kept if the config's is behind it; otherwise delete the file."""
        name = account.name
        token = account.config.refresh_token
        theirs = recovery.refresh_token
        if theirs == token or self._spent.is_spent(theirs) or (token is not None and not self._spent.is_spent(token)):
            # Landed already, replaced by a later rotation, or the config holds
            # a grant the proxy never spent (a new login since).
            self._resolved(name)
            return False
        self._log.warn(
            "{account}: adopting the token {recovery} kept (it never reached {path})",
            account=name,
            recovery=str(recovery.path),
            path=str(self.config_path),
        )
        account.config = _with_pair(account.config, recovery.fields)
        self._unsaved[name] = _Unsaved(dict(recovery.fields), token, recovery=True)
        return True

    def _guard(self, config: Config) -> tuple[Config, list[tuple[str, str]]]:
        """The loaded accounts, each refresh token behind the live pair replaced by that pair.

        Returns the config to use and the (name, token) of accounts whose
        spent token has no live pair to replace it.
        """
        accounts: list[AccountConfig] = []
        stale: list[tuple[str, str]] = []
        for loaded in config.accounts:
            token = loaded.refresh_token
            if not self._is_old(loaded.name, token):
                accounts.append(loaded)
                continue
            running = self._pool.get(loaded.name)
            live = running.config if running is not None else None
            if live is None or not live.refresh_token or not live.access_token or self._spent.is_spent(live.refresh_token):
                accounts.append(loaded)
                if token is not None:
                    stale.append((loaded.name, token))
                continue
            # An editor that opened the file before a rotation saved it after,
            # or an old copy was restored: the user's other edits stay.
            self._log.warn(
                "{path} holds an old refresh token of {account} (the proxy already used it); "
                "keeping the current pair and writing it back",
                path=str(self.config_path),
                account=loaded.name,
            )
            fields = _pair_fields(_config_pair(live))
            accounts.append(_with_pair(loaded, fields))
            if loaded.name not in self._unsaved:
                self._unsaved[loaded.name] = _Unsaved(fields, None)
        return dataclasses.replace(config, accounts=tuple(accounts)), stale

    def _succeeded(self, name: str) -> None:
        refresher = self._refresher(name)
        refresher.failures = 0
        refresher.not_before = 0.0
        refresher.retry_pending = False
        refresher.refreshed_at = self._now()
        account = self._pool.get(name)
        if account is not None and account.config.expires_at is not None:
            self._log.info(
                "refreshed the token of {account}; valid for {minutes:.0f} min",
                account=name,
                minutes=(account.config.expires_at / 1000.0 - self._now()) / 60.0,
            )
        self._arm(name)

    def _failed(self, name: str, error: OAuthError) -> None:
        refresher = self._refresher(name)
        refresher.failures += 1
        jitter = 1.0 + POLL_JITTER * (2.0 * self._random() - 1.0)
        if error.kind == "rate_limited" and error.retry_after:
            # Never earlier than the server asked.
            delay = min(RATE_LIMIT_CAP, error.retry_after) * (1.0 + POLL_JITTER * self._random())
        else:
            delay = min(BACKOFF_CAP, BACKOFF_START * 2.0 ** (refresher.failures - 1)) * jitter
        refresher.not_before = self._now() + delay
        refresher.retry_pending = True
        self._log.warn(
            "refreshing the token of {account} failed: {error}; retrying in {delay:.0f} s",
            account=name,
            error=str(error),
            delay=delay,
        )
        self._arm(name)

    def _dead(self, name: str, token: str, error: OAuthError) -> None:
        account = self._give_up(name, token)
        if account is None:
            return
        message = f"the OAuth grant is no longer valid ({error}); {self._login_fix(account)}"
        account.error = message
        self._log.error("{account}: {message}", account=name, message=message)
        self._hub.emit(events.ACCOUNT_ERROR, self._now(), account=name, message=message)

    # -- usage polling ---------------------------------------------------------------

    def _poll_interval(self) -> float:
        return self._poll_minutes * 60.0

    def _jittered(self, seconds: float) -> float:
        return seconds * (1.0 + POLL_JITTER * (2.0 * self._random() - 1.0))

    def _schedule_first_polls(self) -> None:
        """
        Start-up: one poll per OAuth account, staggered POLL_SPACING apart
        (jittered), the first at once.
        """
        names = [account.name for account in self._pool if self._is_oauth(account)]
        for index, name in enumerate(names):
            self._schedule_poll(name, self._jittered(index * POLL_SPACING))

    def _spaced(self, name: str, when: float) -> float:
        """
        The earliest time from C{when} that is POLL_SPACING away from every
        other account's poll, due or just sent.  Every schedule goes
        through here, so start-up, reloads and retries never bunch up.
        """
        taken: list[float] = []
        for other, poller in self._pollers.items():
            if other == name:
                continue
            if poller.timer is not None and poller.timer.active():
                taken.append(poller.timer.getTime())
            if poller.sent_at is not None:
                taken.append(poller.sent_at)
        for moment in sorted(taken):
            # Ascending, and C{when} only moves later: a slot passed stays clear.
            if moment - POLL_SPACING < when < moment + POLL_SPACING:
                when = moment + POLL_SPACING
        return when

    def _schedule_poll(self, name: str, delay: float) -> None:
        poller = self._pollers.setdefault(name, _Poller())
        self._cancel(poller.timer)
        poller.timer = None
        if not self.running or not self.settings.poll_usage or not self._is_oauth(self._pool.get(name)):
            return
        now = self._now()
        when = self._spaced(name, now + max(0.0, delay))
        poller.timer = self._reactor.callLater(when - now, self._poll_now, name)

    def _poll_retry_delay(self, failures: int, error: OAuthError) -> float:
        """
        When to try again after the C{failures}-th failed poll in a row:
        back-off from POLL_RETRY_START, doubling, capped (jittered); never
        sooner than the retry-after of a 429.
        """
        backoff = min(POLL_RETRY_START * 2.0 ** min(failures - 1, 16), POLL_RETRY_CAP, self._poll_interval())
        delay = self._jittered(backoff)
        if error.kind == "rate_limited" and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, POLL_RETRY_AFTER_CAP))
        return delay

    def _poll_now(self, name: str) -> None:
        poller = self._pollers.setdefault(name, _Poller())
        poller.timer = None
        if poller.inflight is not None:
            return
        attempt = Deferred.fromCoroutine(self._poll(name))

        def finished(result: object) -> None:
            if poller.inflight is attempt:
                poller.inflight = None
            # Stopping cancels a poll in flight, which surfaces as whatever
            # stage it was in (CancelledError, ConnectingCancelledError…).
            if isinstance(result, Failure) and self.running and not result.check(CancelledError):
                self._log.failure("polling the usage of {account} failed unexpectedly", result, account=name)

        if not attempt.called:
            poller.inflight = attempt
        attempt.addBoth(finished)

    def _has_fresh_headers(self, account: Account, now: float) -> bool:
        # Every served request updates last_used and carried quota headers,
        # which are fresher than anything the usage endpoint can tell.
        return account.last_used is not None and now - account.last_used < self._poll_interval()

    def _wants_poll(self, account: Account, now: float) -> bool:
        config = account.config
        if account.error is not None or not config.access_token:
            return False
        if config.expires_at is not None and config.expires_at / 1000.0 <= now:
            return False  # the refresh will bring a token; polling now would only 401
        return not self._has_fresh_headers(account, now)

    async def _poll(self, name: str) -> None:
        account = self._pool.get(name)
        if not self._is_oauth(account) or account is None:
            return
        poller = self._pollers[name]
        interval = self._poll_interval()
        if not self._wants_poll(account, self._now()):
            # Fresher figures came with requests (or the account is dead,
            # which its own error says): the endpoint's trouble is moot.
            self._problems.clear(name, USAGE_UNREACHABLE)
            self._schedule_poll(name, self._jittered(interval))
            return
        poller.sent_at = self._now()
        try:
            windows = await self._client.usage(account.config.access_token or "")
        except OAuthError as error:
            if not self.running:
                return
            poller.failures += 1
            delay = self._poll_retry_delay(poller.failures, error)
            self._log.warn(
                "reading the usage of {account} failed: {error}; next try in {delay:.0f} s",
                account=name,
                error=str(error),
                delay=delay,
            )
            if error.kind in _UNREACHABLE_KINDS:
                self._problems.raise_problem(
                    name,
                    USAGE_UNREACHABLE,
                    f"the usage endpoint cannot be read ({error}); its quota figures come only from requests "
                    "until it answers again",
                )
            if error.kind == "unauthorized" and poller.failures == 1:
                await self.refresh(account)
            self._schedule_poll(name, delay)
            return
        poller.failures = 0
        self._problems.clear(name, USAGE_UNREACHABLE)
        now = self._now()
        current = self._pool.get(name)
        if current is not None and windows and not self._has_fresh_headers(current, now):
            current.observe_quota(QuotaReport(windows=windows), now)
            self._log.debug("read the usage of {account}", account=name)
            try:
                self.quota_changed()
            except Exception:
                self._log.failure("the quota_changed hook failed")
        self._schedule_poll(name, self._jittered(interval))

    # -- reload ----------------------------------------------------------------------

    def reload(self) -> tuple[list[str], list[str]]:
        """Re-read the config file's accounts into the pool; ``(added, removed)`` names.

        Raises ``ConfigError`` for a file that does not load; the running
        accounts stay as they were then.
        """
        config, stale = self._guard(load_config(self.config_path, create=False))
        before = {account.name: account.config for account in self._pool}
        added, removed = self._pool.update_accounts(config.accounts)
        for name, token in stale:
            self._refuse(name, token)
        self._poll_minutes = config.usage_poll_minutes
        for name in removed:
            self._router.forget(name)
            refresher = self._refreshers.pop(name, None)
            if refresher is not None:
                self._cancel(refresher.timer)
            poller = self._pollers.pop(name, None)
            if poller is not None:
                self._cancel(poller.timer)
                if poller.inflight is not None:
                    poller.inflight.cancel()
        # A disabled, re-enabled or re-prioritised account moves the
        # primary now, so status tells the truth before the next request.
        if any(
            (old := before.get(account.name)) is not None
            and (old.enabled, old.priority) != (account.config.enabled, account.config.priority)
            for account in self._pool
        ):
            self._router.expire()
        for account in self._pool:
            if account.name in added or before.get(account.name) != account.config:
                self._arm(account.name)
            if account.name in added:
                self._schedule_poll(account.name, 0.0)
        # The file changed: unsaved pairs (and those the guard put back) get a try.
        self._save_all()
        self._problems.clear(None, CONFIG_REFUSED)
        changed = [n for n in before if n not in removed and self._pool.get(n).config != before[n]]  # type: ignore[union-attr]
        if added or removed or changed:
            self._log.info(
                "reloaded accounts from {path}: added {added}, removed {removed}, changed {changed}",
                path=str(self.config_path),
                added=", ".join(added) or "none",
                removed=", ".join(removed) or "none",
                changed=", ".join(changed) or "none",
            )
        return added, removed

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except ConfigError as e:
            self._log.error(
                "not reloading the accounts: {path}: {problem}; the {count} running account(s) stay",
                path=str(e.path),
                problem=e.problem,
                count=len(self._pool),
            )
            # Shown until a reload works: an edit that never took effect
            # must not look as if it had.
            self._problems.raise_problem(
                None,
                CONFIG_REFUSED,
                f"{e.path}: {e.problem}; the change was not loaded and the {len(self._pool)} running "
                "account(s) stay as they were until the file is fixed",
            )
        except Exception:
            self._log.failure("reloading the accounts failed; the running accounts stay")

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.config_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _watch(self) -> None:
        signature = self._signature()
        if signature == self._seen:
            return
        self._seen = signature
        if signature is not None:
            self._reload_logged()

    def _install_sighup(self) -> None:
        if not self.running or self._sighup_installed:
            return
        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        except (ValueError, OSError):
            return  # not the main thread: no signals here
        self._sighup_installed = True

    def _uninstall_sighup(self) -> None:
        if self._sighup_installed:
            self._sighup_installed = False
            try:
                signal.signal(signal.SIGHUP, self._previous_sighup or signal.SIG_DFL)
            except (ValueError, OSError):
                pass

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # Signal handlers interrupt arbitrary code: do the work in the reactor loop.
        self._log.info("SIGHUP: reloading the accounts")
        self._reactor.callFromThread(self._reload_logged)
