"""
The routing policy: which account serves a request, and what a response
teaches us about the account that served it.

Pure: the clock is injected and nothing here does I/O.  The proxy asks
L{Router.route} for a decision, reports the upstream's answer through
L{Router.on_response} (which says whether to retry elsewhere) and the end of
the exchange through L{Router.on_finished}.

This is the basic policy (one primary, move on at the ceiling or a quota
429); the full cache-aware policy grows behind the same interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nextclaude import events
from nextclaude.events import EventHub
from nextclaude.pool import Account, AccountPool, Status, model_family
from nextclaude.quota import REJECTED, QuotaReport
from nextclaude.usage import Usage

# Routing reasons (DESIGN.md point 11), shown in logs and the console.
PRIMARY = "primary"
CEILING = "ceiling"
QUOTA_429 = "quota-429"
RETRY_401 = "retry-401"
EXHAUSTED = "exhausted"

# The longest prompt-cache TTL (subscription mode asks for 1 h): a restart
# within it may find the saved primary's cache still warm.
LONGEST_CACHE_TTL = 3600.0

# When a quota 429 names no reset, assume the account is out for this long.
UNKNOWN_RESET_BACKOFF = 60.0


@dataclass(frozen=True)
class RouteContext:
    """
    What the router needs to know about one request.
    """

    session: str | None = None
    model: str | None = None

    @property
    def family(self) -> str | None:
        return model_family(self.model)


@dataclass(frozen=True)
class Decision:
    """
    The account to use and why; no account means every account is out, and
    the client gets a 429 with C{retry_after} seconds and the soonest reset.
    """

    account: Account | None
    reason: str
    retry_after: int | None = None
    reset: float | None = None


class Router:
    def __init__(
        self,
        pool: AccountPool,
        clock: Callable[[], float],
        hub: EventHub,
        retry_after_cap: int = 55,
    ) -> None:
        self.pool = pool
        self._clock = clock
        self._hub = hub
        self.retry_after_cap = retry_after_cap
        self.primary: str | None = None
        # Sessions seen recently, for the status count; affinity comes with
        # the full policy.
        self.sessions: dict[str, float] = {}

    # -- decisions ---------------------------------------------------------

    def route(self, context: RouteContext, tried: frozenset[str] = frozenset()) -> Decision:
        now = self._clock()
        if context.session is not None:
            self.sessions[context.session] = now
        family = context.family
        primary = self.pool.get(self.primary)
        if (
            primary is not None
            and primary.name not in tried
            and self.pool.serviceable(primary, now, family)
        ):
            return Decision(primary, PRIMARY)

        ranked = self.pool.ranked(now, family, exclude=lambda a: a.name in tried)
        if not ranked:
            return self._all_exhausted(now)
        chosen = ranked[0]
        if primary is None:
            reason = PRIMARY
        elif primary.name in tried:
            reason = QUOTA_429
        else:
            reason = CEILING
        self._set_primary(chosen, reason, now)
        return Decision(chosen, reason)

    def _set_primary(self, account: Account, reason: str, now: float) -> None:
        previous = self.primary
        if previous == account.name:
            return
        self.primary = account.name
        if previous is not None:
            self._hub.emit(
                events.SWITCHED,
                now,
                account=account.name,
                previous=previous,
                reason=reason,
            )

    def _all_exhausted(self, now: float) -> Decision:
        resets = [
            reset
            for account in self.pool
            if account.error is None
            for reset in [account.soonest_reset(now)]
            if reset is not None
        ]
        reset = min(resets, default=None)
        if reset is None:
            retry_after = self.retry_after_cap
        else:
            # Rounded up: a client told to come back before the reset only
            # draws another 429.
            retry_after = math.ceil(min(max(reset - now, 1), self.retry_after_cap))
        return Decision(None, EXHAUSTED, retry_after=retry_after, reset=reset)

    # -- what responses teach us ----------------------------------------------

    def on_response(
        self,
        account: Account,
        status: int,
        report: QuotaReport,
        context: RouteContext,
    ) -> bool:
        """
        Learn from the upstream's response headers.  Returns True when the
        request should be retried on another account instead of relaying
        this response.
        """
        now = self._clock()
        was_serviceable = self.pool.serviceable(account, now, context.family)
        account.observe_quota(report, now)
        if status != 429 and report.status == REJECTED and not report.rejected_windows():
            # Only per-window verdicts are kept on the account, so an
            # aggregate-only "rejected" (overage in use on a 200) must take
            # the account out here or it would never reach the ceiling.
            self._exhaust(account, report, now)
        retry = False
        if status == 429:
            retry = self._on_429(account, report, now)
        elif status == 401 and account.kind == "apikey":
            self._mark_error(account, "the API key was rejected (401); replace it in the config file", now)
            retry = True
        elif status == 401:
            # The accounts issue adds the forced refresh here; until then an
            # OAuth 401 takes the account out instead of failing every request.
            self._mark_error(
                account,
                "the OAuth token was rejected (401); run `nextclaude login` or `nextclaude import` again",
                now,
            )
            retry = True
        if was_serviceable and self.pool.at_ceiling(account, now, context.family):
            self._hub.emit(
                events.EXHAUSTED, now, account=account.name, reset=account.soonest_reset(now)
            )
        return retry

    def _on_429(self, account: Account, report: QuotaReport, now: float) -> bool:
        if report.is_rejected() or self.pool.at_ceiling(account, now):
            self._exhaust(account, report, now)
            return True
        if account.kind == "apikey":
            wait = report.retry_after if report.retry_after is not None else 2.0
            account.throttled_until = now + wait
            self._hub.emit(events.THROTTLED, now, account=account.name, until=now + wait)
            return True
        # A bare 429 on a subscription account is transient: relayed as is
        # (Claude Code shows it); bounded waits come with the scheduler.
        return False

    def _exhaust(self, account: Account, report: QuotaReport, now: float) -> None:
        reset = report.soonest_reset()
        if reset is None or reset <= now:
            reset = now + UNKNOWN_RESET_BACKOFF
        account.exhausted_until = reset

    def _mark_error(self, account: Account, message: str, now: float) -> None:
        account.error = message
        self._hub.emit(events.ACCOUNT_ERROR, now, account=account.name, message=message)

    def on_finished(
        self, account: Account, usage: Usage | None, ok: bool, context: RouteContext
    ) -> None:
        now = self._clock()
        account.last_used = now
        account.usage.record(usage, ok)

    # -- views ---------------------------------------------------------------

    def status_of(self, account: Account) -> Status:
        return self.pool.status(account, self._clock())

    def flags_of(self, account: Account) -> list[str]:
        return ["primary"] if account.name == self.primary else []

    def tracked_sessions(self) -> int:
        now = self._clock()
        for key, seen in list(self.sessions.items()):
            if now - seen > 2 * LONGEST_CACHE_TTL:
                del self.sessions[key]
        return len(self.sessions)

    # -- persistence -----------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "savedAt": self._clock(),
            "accounts": {account.name: account.to_state() for account in self.pool},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """
        Take back a previous run's quota and usage, and its primary when the
        restart came within the cache TTL and that account can still serve.
        """
        now = self._clock()
        accounts = state.get("accounts")
        if isinstance(accounts, dict):
            for name, data in accounts.items():
                account = self.pool.get(name)
                if account is not None and isinstance(data, dict):
                    account.restore_state(data)
        primary = self.pool.get(state.get("primary") if isinstance(state.get("primary"), str) else None)
        saved_at = state.get("savedAt")
        if (
            primary is not None
            and isinstance(saved_at, (int, float))
            and 0 <= now - saved_at < LONGEST_CACHE_TTL
            and self.pool.serviceable(primary, now)
        ):
            self.primary = primary.name
