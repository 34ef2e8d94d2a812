"""
The routing policy: which account serves a request, and what a response
teaches us about the account that served it (DESIGN.md, "The routing
policy").

Pure: the clock is injected and nothing here does I/O.  For each client
request the caller opens an L{Exchange}, asks L{Router.route} for a
decision, reports each upstream answer to L{Router.on_response} (whose
L{Verdict} says whether to serve it or try again), reports the end with
L{Router.on_finished}, and always calls L{Router.close}.  The scheduler does
the waiting the verdicts ask for.

Where a session goes is placement's decision (L{nextclaude.placement}: costs
in utilization learned from the headers, reservations, moves at cheap
moments and at the ceiling); the router keeps attempts, verdicts, probe
sweeps, the manual pin and the forward-only rule.  Under placement the
I{primary} is where a new session would go, an account is I{draining} while
some session on it will leave at its cheap moment, the I{successor} is where
the next such move goes, and I{armed} is an account at C{switchThreshold}
(it takes no new sessions).  The other policies are benchmark baselines:
plain arming (the earlier arm-and-land rules), naive and sequential.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from nextclaude import events
from nextclaude.events import EventHub
from nextclaude.humanize import duration
from nextclaude.pool import ACCOUNT_WIDE, Account, AccountPool, Status, model_family, window_applies
from nextclaude.quota import REJECTED, QuotaReport
from nextclaude.sessions import Moment, RequestFacts, Session, SessionTable
from nextclaude.placement import (
    AFFINITY,
    CEILING,
    MOVED_AFTER_COMPACTION,
    MOVED_AFTER_IDLE,
    PLACED,
    SPREAD_EARLY,
    Placement,
)
from nextclaude.usage import Usage

# Routing reasons (DESIGN.md point 11): one vocabulary for the console,
# logs, history and metrics.  Placement's own (affinity, placed,
# spread-early, moved-after-compaction, moved-after-idle, ceiling) come
# from placement.py.
MANUAL = "manual"
# Earlier names of the same reasons (the arming baseline uses them).
PRIMARY = PLACED
LANDED_AFTER_COMPACTION = MOVED_AFTER_COMPACTION
TTL_EXPIRED = MOVED_AFTER_IDLE
QUOTA_429 = "quota-429"
RETRY_401 = "retry-401"
RETRY_403 = "retry-403"
RETRY_TRANSIENT = "retry-transient"
RETRY_THROTTLE = "retry-throttle"
RETRY_CONNECT = "retry-connect"
FORWARD_ONLY_WAIVED = "forward-only-waived"
PROBE = "probe"
EXHAUSTED = "exhausted"
# Nothing can serve and no account will come back by waiting: every
# credential is dead.
NO_CREDENTIALS = "no-credentials"

# Policies: the real one, the same without the forecast, and the naive
# baseline the benchmark compares against.
FULL = "full"
ARMING = "arming"
NAIVE = "naive"
# Accounts one after another, each used up to its ceiling: the baseline
# for capacity over tasks longer than a window (DESIGN.md point 5).
SEQUENTIAL = "sequential"
POLICIES = (FULL, ARMING, NAIVE, SEQUENTIAL)

# The longest prompt-cache TTL (subscription mode asks for 1 h): a restart
# within it may find the saved primary's cache still warm.
LONGEST_CACHE_TTL = 3600.0

# When a quota 429 names no reset, assume the account is out for this long.
UNKNOWN_RESET_BACKOFF = 60.0

# What a 429 says (DESIGN.md point 10), see L{classify_429}.
QUOTA_OUT = "quota"
ACCOUNT_THROTTLE = "throttle"
REQUEST_SCOPED = "request"

# A 429 that is not a quota verdict is retried on the same account at most
# twice per request: waiting a little is cheaper than rebuilding the
# conversation's cache elsewhere.  A throttle waits min(retry-after, 10 s);
# a request-scoped 429 names no wait, so a short one.
SAME_ACCOUNT_429_RETRIES = 2
THROTTLE_WAIT_CAP = 10.0
TRANSIENT_WAIT = 2.0

_CHEAP_MOMENTS = {
    Moment.LANDING: LANDED_AFTER_COMPACTION,
    Moment.SIZE_DROP: LANDED_AFTER_COMPACTION,
    Moment.IDLE: TTL_EXPIRED,
}


@dataclass
class Exchange:
    """
    One client request as the router follows it across its attempts.
    """

    facts: RequestFacts
    session: Session | None = None
    moment: Moment = Moment.NONE
    tried: set[str] = field(default_factory=set)
    # Set by a verdict: the next attempt goes to this account, for this reason.
    retry_on: str | None = None
    next_reason: str | None = None
    # Same-account retries after 429s that were no quota verdict.
    retries_429: int = 0
    # A failover's move of the session, made only once that account serves
    # (account name, reason): a request that ends without an answer from it
    # leaves the session on its warm account.
    pending_move: tuple[str, str] | None = None
    refreshed: bool = False
    forbidden_by: str | None = None
    connect_retried: bool = False
    probe_queue: list[str] | None = None

    @property
    def family(self) -> str | None:
        return model_family(self.facts.model)


@dataclass(frozen=True)
class Decision:
    """
    The account to use and why.  No account means nothing can serve: the
    client gets C{status} with C{message}.  A 429 (some account comes back
    by waiting) carries C{retry_after} seconds and the soonest C{reset}, and
    C{out_of_quota} when an account is out of quota (not merely throttled),
    so the client may show its usage-limit notice; a 401 means every
    credential is dead and waiting will not help.
    """

    account: Account | None
    reason: str
    retry_after: int | None = None
    reset: float | None = None
    probe: bool = False
    status: int = 429
    message: str = ""
    out_of_quota: bool = False
    # Set only when the whole story is quota (no dead credential, no
    # refusal): the window to name in the client's usage-limit notice, in
    # the upstream's representative-claim words (PROTOCOL.md).
    claim: str | None = None


@dataclass(frozen=True)
class Verdict:
    """
    What to do with an upstream answer: serve it, or try again (after
    C{delay} seconds; after refreshing the account's token when C{refresh}).
    """

    serve: bool
    delay: float = 0.0
    refresh: bool = False


SERVE = Verdict(serve=True)
RETRY = Verdict(serve=False)


def classify_429(report: QuotaReport, at_ceiling: bool) -> str:
    """
    What a 429 says (DESIGN.md point 10): a quota verdict (a rejected
    status, aggregate or per-window, or an account at the ceiling); an
    account throttle (C{retry-after} without a rejection, such as a
    per-minute limit); or, saying neither, a limit on this one request (a
    model the account may not use, say) that is no verdict on the account.
    """
    if report.is_rejected() or at_ceiling:
        return QUOTA_OUT
    if report.retry_after is not None:
        return ACCOUNT_THROTTLE
    return REQUEST_SCOPED


def credential_fix(account: Account) -> str:
    """
    What the user runs or edits to give a dead account working credentials;
    a running proxy picks the change up by itself.
    """
    name = account.name
    if account.kind == "apikey":
        return f"put a working key in {name}'s apiKey in the NextClaude config file"
    if account.config.import_from:
        return (
            f"log in to Claude Code again and run `nextclaude import --name {name}`, "
            f"or run `nextclaude login --name {name}`"
        )
    return f"run `nextclaude login --name {name}`"


def _cause(error: str) -> str:
    # Account errors read "what happened; what to do" wherever they are set;
    # the client's message gives its own fix, which names the account.
    return error.rsplit("; ", 1)[0]


def _dead_entry(account: Account) -> str:
    kind = "API key" if account.kind == "apikey" else "subscription"
    return f"{account.name} ({kind}): {_cause(account.error or '')}; fix: {credential_fix(account)}"


class Router:
    def __init__(
        self,
        pool: AccountPool,
        clock: Callable[[], float],
        hub: EventHub,
        retry_after_cap: int = 55,
        probe_interval: float = 15.0,
        policy: str = FULL,
        sessions: SessionTable | None = None,
        status_interval: float = 0.0,
    ) -> None:
        """
        C{status_interval} (seconds): under placement, how long the status
        (primary, draining, successor) may lag the traffic; 0 brings it up
        to date after every response.  A lagging status is brought up to
        date by L{settle}.
        """
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}")
        self.pool = pool
        self._clock = clock
        self._hub = hub
        self.retry_after_cap = retry_after_cap
        self.probe_interval = probe_interval
        self.policy = policy
        self.sessions = sessions if sessions is not None else SessionTable()
        self.primary: str | None = None
        self.manual: str | None = None
        self.successor: str | None = None
        self.draining: set[str] = set()
        # The learned costs and the placement decisions of the full policy.
        self.placement = Placement(pool, self.sessions.sessions)
        # A request was routed since status was last brought up to date.
        self._status_stale = False
        self.status_interval = status_interval
        self._refreshed_at = -math.inf
        # Sessions that move to the manual pin on their next request.
        self._to_manual: set[str] = set()
        self._sweeping = False
        self._last_sweep: float | None = None
        # Where the last subagent request was served, and when (epoch s).
        self._subagents: tuple[str, float] | None = None
        # Primaries that armed with no successor, announced once.
        self._armed_alone: set[str] = set()
        # Set by the accounts layer: OAuth accounts get one forced refresh
        # after a 401 before they are blamed.
        self.can_refresh: Callable[[Account], bool] = lambda account: False

    # -- the account-level state ------------------------------------------------

    def _below_switch(self, account: Account, now: float) -> bool:
        return account.peak_utilization(now, ACCOUNT_WIDE) < self.pool.thresholds.switch

    def _usable(
        self, account: Account | None, now: float, family: str | None, tried: set[str] | frozenset[str] = frozenset()
    ) -> bool:
        return (
            account is not None
            and account.name not in tried
            and self.pool.serviceable(account, now, family)
        )

    def _best(self, now: float, family: str | None, exclude: Callable[[Account], bool]) -> Account | None:
        ranked = self.pool.ranked(now, family, exclude=exclude)
        return ranked[0] if ranked else None

    def _refresh(self, now: float) -> None:
        """
        Bring primary, successor and draining up to date with what we know
        of the accounts' quota (DESIGN.md points 2, 3, 4 and 8).
        """
        pool = self.pool
        if self.policy == SEQUENTIAL:
            self._turn(now, ACCOUNT_WIDE, frozenset())
            return
        if self.policy == FULL:
            self._refresh_placed(now)
            return
        for name in list(self.draining):
            account = pool.get(name)
            if account is None or (
                pool.serviceable(account, now, ACCOUNT_WIDE) and self._below_switch(account, now)
            ):
                # Its windows reset: draining stops, its sessions stay.
                self.draining.discard(name)
        if not self.draining:
            self.successor = None

        manual = pool.get(self.manual)
        if (
            manual is not None
            and pool.serviceable(manual, now, ACCOUNT_WIDE)
            and self._below_switch(manual, now)
        ):
            if self.primary != manual.name:
                self.draining.discard(manual.name)
                self._set_primary(manual)
            return

        primary = pool.get(self.primary)
        if primary is None:
            best = self._best(now, ACCOUNT_WIDE, lambda account: False)
            if best is not None:
                self._set_primary(best)
            return
        if self.policy == NAIVE:
            if not pool.serviceable(primary, now, ACCOUNT_WIDE) or not self._below_switch(primary, now):
                best = self._most_5h_left(now, exclude=primary.name)
                if best is not None:
                    self._set_primary(best)
            return
        if pool.serviceable(primary, now, ACCOUNT_WIDE) and self._below_switch(primary, now):
            return
        successor = self._pick_successor(primary, now)
        if successor is None:
            if not pool.serviceable(primary, now, ACCOUNT_WIDE):
                # Out, and no account below the threshold to take over: the
                # best one that can still serve leads, even past the switch
                # threshold, rather than an account that cannot serve.
                fallback = self._best(now, ACCOUNT_WIDE, lambda account: account.name == primary.name)
                if fallback is not None:
                    self.draining.discard(fallback.name)
                    self.successor = None
                    self._set_primary(fallback)
                return
            # Armed with nowhere to go: its sessions stay until the ceiling.
            if primary.name not in self._armed_alone:
                self._armed_alone.add(primary.name)
                self._hub.emit(events.ARMED, now, account=primary.name, successor=None)
            return
        self._armed_alone.discard(primary.name)
        self.draining.add(primary.name)
        self.successor = successor.name
        self._hub.emit(events.ARMED, now, account=primary.name, successor=successor.name)
        self._set_primary(successor)

    def _pick_successor(self, leaving: Account, now: float) -> Account | None:
        """
        The account that takes over from C{leaving}: the best-ranked
        serviceable account below the switch threshold.
        """
        pool = self.pool

        def good(account: Account | None) -> bool:
            return (
                account is not None
                and account.name != leaving.name
                and account.name not in self.draining
                and pool.serviceable(account, now, ACCOUNT_WIDE)
                and self._below_switch(account, now)
            )

        for account in pool.ranked(now, ACCOUNT_WIDE):
            if good(account):
                return account
        return None

    def _most_5h_left(self, now: float, exclude: str | None = None) -> Account | None:
        candidates = [
            account
            for account in self.pool
            if account.name != exclude and self.pool.serviceable(account, now, ACCOUNT_WIDE)
        ]
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda a: (a.priority, not self._below_switch(a, now), a.utilization("5h", now), a.order),
        )

    def _set_primary(self, account: Account) -> None:
        # Not an event of its own: arming says it, and "switched" is kept
        # for sessions actually moving, which is what costs cache.
        self.primary = account.name

    # -- one request ---------------------------------------------------------------

    def landing_pending(self, key: str) -> bool:
        """
        Whether the session waits for its post-compaction request (so the
        request inspector knows the continuation marker matters).
        """
        session = self.sessions.get(key)
        return session is not None and session.compaction_pending_since is not None

    def open(self, facts: RequestFacts) -> Exchange:
        """
        Start following a client request: its session and the moment it
        marks are looked up once, however many attempts it takes.
        """
        now = self._clock()
        session, moment = self.sessions.observe(facts, now)
        if moment is Moment.COMPACTION and session is not None:
            self._hub.emit(events.COMPACTION, now, session=session.key, account=session.account)
        return Exchange(facts=facts, session=session, moment=moment)

    def route(self, exchange: Exchange) -> Decision:
        now = self._clock()
        if self.policy != FULL:
            self._refresh(now)
        else:
            # Under placement the refresh only updates what status shows
            # (primary, draining, successor); the decision below reads only
            # the primary, for a request with no session, and checks that
            # it can serve.  The response or close() refreshes, at most once
            # per status_interval; doing it here too doubled its cost.
            self._status_stale = True
        family = exchange.family
        if exchange.probe_queue is not None:
            return self._next_probe(exchange, now)
        if exchange.retry_on is not None:
            name, exchange.retry_on = exchange.retry_on, None
            account = self.pool.get(name)
            if account is not None and account.error is None:
                return self._decide(exchange, account, exchange.next_reason or AFFINITY, now)
            if account is not None:
                # The refresh before this retry found the credential dead
                # (invalid_grant): another 401 would only hide that cause.
                exchange.tried.add(name)
        if self.policy == NAIVE:
            return self._route_naive(exchange, now, family)
        if self.policy == SEQUENTIAL:
            return self._route_sequential(exchange, now, family)
        if self.policy == FULL and exchange.facts.agent_id is not None and not exchange.tried:
            home = self._subagent_home(exchange, now, family)
            if home is not None:
                return Decision(home, AFFINITY)
        if self.policy == FULL and exchange.session is not None:
            return self._route_placed(exchange, exchange.session, now, family)
        session = exchange.session
        if session is None:
            account = self._for_new_session(exchange, now, family)
            if account is None:
                return self._all_exhausted(exchange, now)
            # A retry says why it left the first account, as for sessions.
            reason = exchange.next_reason or (MANUAL if account.name == self.manual else PRIMARY)
            return self._decide(exchange, account, reason, now)
        account, reason = self._choose(exchange, session, now, family)
        if account is None:
            return self._all_exhausted(exchange, now)
        return self._decide(exchange, account, reason, now)

    def _subagent_home(self, exchange: Exchange, now: float, family: str | None) -> Account | None:
        """
        Where a subagent's request goes while the subagents' prefix is warm:
        the account that served the last subagent request, of any session,
        within the request's cache TTL, if it can serve.  Claude Code's
        subagents share one system prompt and tool set across sessions, so
        keeping them on one account keeps that prefix cached when the
        sessions themselves are spread over several (issue 11); the session
        stays where it is.  None under a manual pin, which every request
        follows.
        """
        if self._subagents is None or self.manual is not None:
            return None
        name, at = self._subagents
        account = self.pool.get(name)
        if now - at >= exchange.facts.cache_ttl or not self._usable(account, now, family, exchange.tried):
            return None
        return account

    def _decide(
        self, exchange: Exchange, account: Account, reason: str, now: float, probe: bool = False
    ) -> Decision:
        session = exchange.session
        exchange.pending_move = None
        if session is not None and session.account != account.name:
            if session.account is not None and (exchange.tried or probe):
                # A failover or a probe: the session follows only if this
                # account serves the request (see _served).
                exchange.pending_move = (account.name, reason)
            else:
                self._move_session(session, account.name, reason, now)
        return Decision(account, reason, probe=probe)

    def _move_session(self, session: Session, name: str, reason: str, now: float) -> None:
        if session.account is not None:
            session.left[session.account] = now
            self._hub.emit(
                events.SWITCHED,
                now,
                account=name,
                previous=session.account,
                reason=reason,
                session=session.key,
            )
        session.account = name
        session.left.pop(name, None)

    def _for_new_session(self, exchange: Exchange, now: float, family: str | None) -> Account | None:
        tried = exchange.tried
        for name in (self.manual, self.primary):
            account = self.pool.get(name)
            if self._usable(account, now, family, tried) and (
                name != self.manual or self._below_switch(account, now)
            ):
                return account
        return self._best(now, family, lambda a: a.name in tried)

    def _excluded(self, session: Session, account: Account, now: float) -> bool:
        """
        Forward only: an account the session left stays out of bounds
        until the session's cache TTL has passed since it left.
        """
        left = session.left.get(account.name)
        return left is not None and now - left < session.ttl

    def _move(self, exchange: Exchange, session: Session, now: float, family: str | None, reason: str) -> tuple[Account | None, str]:
        """
        Where a session must go now (its account cannot serve it): the
        primary, else the best-ranked account it has not just left, else
        (forward only waived) any account that can serve.
        """
        tried = exchange.tried
        primary = self.pool.get(self.primary)
        if self._usable(primary, now, family, tried) and not self._excluded(session, primary, now):
            return primary, reason
        best = self._best(now, family, lambda a: a.name in tried or self._excluded(session, a, now))
        if best is not None:
            return best, reason
        best = self._best(now, family, lambda a: a.name in tried)
        return best, FORWARD_ONLY_WAIVED

    def _choose(self, exchange: Exchange, session: Session, now: float, family: str | None) -> tuple[Account | None, str]:
        pool = self.pool
        current = pool.get(session.account)
        if current is None:
            account = self._for_new_session(exchange, now, family)
            return account, MANUAL if account is not None and account.name == self.manual else PRIMARY
        if not self._usable(current, now, family, exchange.tried):
            return self._move(exchange, session, now, family, exchange.next_reason or CEILING)

        if session.key in self._to_manual:
            manual = pool.get(self.manual)
            if self._usable(manual, now, family, exchange.tried) and self._below_switch(manual, now):
                self._to_manual.discard(session.key)
                return manual, MANUAL
            # The pin cannot take it right now (throttled, say): the move
            # waits for a request when it can.

        cheap = _CHEAP_MOMENTS.get(exchange.moment)
        if cheap is None:
            return current, AFFINITY
        primary = pool.get(self.primary)
        returning = self.manual is not None and self.primary == self.manual
        if primary is not None and primary.name != current.name and (
            current.name in self.draining or returning or exchange.moment is Moment.IDLE
        ):
            if self._usable(primary, now, family, exchange.tried) and not self._excluded(session, primary, now):
                return primary, cheap
        return current, AFFINITY

    # -- the full policy: placement with reservations (placement.py) ---------------

    def _route_placed(self, exchange: Exchange, session: Session, now: float, family: str | None) -> Decision:
        account, reason = self._place(exchange, session, now, family)
        if account is None:
            return self._all_exhausted(exchange, now)
        if account.name != session.account:
            session.placed = now
        return self._decide(exchange, account, reason, now)

    def _place(self, exchange: Exchange, session: Session, now: float, family: str | None) -> tuple[Account | None, str]:
        pool, placement, tried = self.pool, self.placement, exchange.tried
        manual = pool.get(self.manual)
        pin_leads = self._usable(manual, now, family, tried) and self._below_switch(manual, now)

        def out(account: Account) -> bool:
            return account.name in tried

        def left(account: Account) -> bool:
            return account.name in tried or self._excluded(session, account, now)

        current = pool.get(session.account)
        if current is None:
            if pin_leads:
                return manual, MANUAL
            return placement.place(session, now, family, out), exchange.next_reason or PLACED
        if not self._usable(current, now, family, tried):
            target = placement.at_ceiling(session, now, family, left)
            if target is not None:
                return target, exchange.next_reason or CEILING
            return placement.at_ceiling(session, now, family, out), FORWARD_ONLY_WAIVED
        if session.key in self._to_manual:
            if pin_leads:
                self._to_manual.discard(session.key)
                return manual, MANUAL
            # The pin cannot take it right now (throttled, say): the move
            # waits for a request when it can.
        if pin_leads and current.name == manual.name:
            # The user's choice overrides placement while the pin leads.
            return current, AFFINITY
        moment = exchange.moment
        if moment in _CHEAP_MOMENTS:
            reason = MOVED_AFTER_IDLE if moment is Moment.IDLE else MOVED_AFTER_COMPACTION
            if pin_leads and not left(manual):
                # Back to the pin once it leads again (its window reset).
                return manual, reason
            target = placement.at_cheap_moment(session, current, now, family, left, idle=moment is Moment.IDLE)
            return target, (reason if target.name != current.name else AFFINITY)
        target = placement.spread_early(session, current, now, family, left)
        if target is not None:
            return target, SPREAD_EARLY
        return current, AFFINITY

    def _refresh_placed(self, now: float) -> None:
        """
        What the console shows under placement: the primary is where a new
        session would go; an account is draining while some session on it
        would leave at its cheap moment, and the successor is where the
        first of them would go.
        """
        # It weighs every live session against the others' reservations:
        # one batch works each out once.
        self._status_stale = False
        self._refreshed_at = now
        with self.placement.batch():
            self._refresh_placed_now(now)

    def _refresh_placed_now(self, now: float) -> None:
        pool, placement = self.pool, self.placement
        manual = pool.get(self.manual)
        if manual is not None and pool.serviceable(manual, now, ACCOUNT_WIDE) and self._below_switch(manual, now):
            self.primary = manual.name
        else:
            newcomer = Session("", "header", last_seen=now)
            best = placement.place(newcomer, now, ACCOUNT_WIDE, lambda account: False)
            if best is not None:
                self.primary = best.name
            elif pool.get(self.primary) is None:
                self.primary = None
        draining: set[str] = set()
        successor: str | None = None
        for session in placement.live(now):
            account = pool.get(session.account)
            if account is None or account.name in draining:
                continue
            if not pool.serviceable(account, now, ACCOUNT_WIDE):
                # Out: its sessions move on their next request, to here.
                target = placement.at_ceiling(session, now, ACCOUNT_WIDE, lambda a, name=account.name: a.name == name)
                successor = successor or (target.name if target is not None else None)
                continue
            if placement.fits(account, session, now):
                continue
            target = placement.best(
                session, now, ACCOUNT_WIDE, lambda a, name=account.name: a.name == name
            ) or placement.roomier(session, account, now, ACCOUNT_WIDE, lambda a: False)
            if target is None:
                continue
            draining.add(account.name)
            if account.name not in self.draining:
                # Under placement the account is draining, not armed: say so.
                self._hub.emit(events.ARMED, now, account=account.name, successor=target.name, status="draining")
            successor = successor or target.name
        self.draining = draining
        self.successor = successor

    def _route_naive(self, exchange: Exchange, now: float, family: str | None) -> Decision:
        primary = self.pool.get(self.primary)
        if not self._usable(primary, now, family, exchange.tried):
            primary = self._most_5h_left(now)
            if primary is not None and primary.name in exchange.tried:
                primary = self._best(now, family, lambda a: a.name in exchange.tried)
            if primary is None:
                return self._all_exhausted(exchange, now)
            self._set_primary(primary)
        return self._decide(exchange, primary, PRIMARY, now)

    def _route_sequential(self, exchange: Exchange, now: float, family: str | None) -> Decision:
        session = exchange.session
        current = self.pool.get(session.account) if session is not None else None
        if self._usable(current, now, family, exchange.tried):
            return self._decide(exchange, current, AFFINITY, now)
        account = self._turn(now, family, exchange.tried)
        if account is None:
            return self._all_exhausted(exchange, now)
        reason = exchange.next_reason or (CEILING if current is not None else PRIMARY)
        return self._decide(exchange, account, reason, now)

    def _turn(self, now: float, family: str | None, tried: set[str] | frozenset[str]) -> Account | None:
        """
        The account whose turn it is: the current primary while it can
        serve, else the next one after it in (priority, config) order.
        """
        accounts = sorted(self.pool, key=lambda a: (a.priority, a.order))
        names = [account.name for account in accounts]
        start = names.index(self.primary) if self.primary in names else 0
        for account in accounts[start:] + accounts[:start]:
            if self._usable(account, now, family, tried):
                self.primary = account.name
                return account
        return None

    # -- every account is out ------------------------------------------------------

    def _all_exhausted(self, exchange: Exchange, now: float) -> Decision:
        """
        No account can serve: start a probe sweep if none ran within
        C{probe_interval}, else answer with the synthetic 429.
        """
        if not self._sweeping and (
            self._last_sweep is None or now - self._last_sweep >= self.probe_interval
        ):
            candidates = self._probe_candidates(exchange, now)
            if candidates:
                self._sweeping = True
                self._last_sweep = now
                exchange.probe_queue = candidates
                return self._next_probe(exchange, now)
        return self._rejection(exchange, now)

    def _probe_candidates(self, exchange: Exchange, now: float) -> list[str]:
        """
        Accounts worth one speculative request, soonest reset first: not
        dead, not out of weekly quota.
        """
        candidates = []
        for account in self.pool:
            # A disabled account serves nothing, not even a probe.
            if account.error is not None or not account.config.enabled or account.name in exchange.tried:
                continue
            weekly = account.live_windows(now).get("7d")
            if weekly is not None and (
                weekly.status == REJECTED
                or (weekly.utilization or 0.0) >= self.pool.thresholds.hard
            ):
                continue
            candidates.append(account)
        candidates.sort(key=lambda a: (a.soonest_reset(now) or math.inf, a.order))
        return [account.name for account in candidates]

    def _next_probe(self, exchange: Exchange, now: float) -> Decision:
        queue = exchange.probe_queue or []
        while queue:
            account = self.pool.get(queue.pop(0))
            if account is not None and account.name not in exchange.tried:
                self._hub.emit(events.PROBE, now, account=account.name)
                return self._decide(exchange, account, PROBE, now, probe=True)
        self._end_sweep(exchange)
        return self._rejection(exchange, now)

    def _end_sweep(self, exchange: Exchange) -> None:
        if exchange.probe_queue is not None:
            exchange.probe_queue = None
            self._sweeping = False

    def _back_at(self, account: Account, now: float, family: str | None) -> float | None:
        """
        When the account can serve C{family} again: the last end of what
        keeps it out (windows at the ceiling, a quota 429, a throttle).  Its
        soonest reset alone would point an account out of weekly quota at
        its 5-hour reset, and the client would come back to another 429.
        """
        blocks: list[float] = []
        for name, window in account.live_windows(now).items():
            if name == "overage" or not window_applies(name, family):
                continue
            if window.status == REJECTED or (window.utilization or 0.0) >= self.pool.thresholds.hard:
                if window.reset is None:
                    return None
                blocks.append(window.reset)
        for until in (account.exhausted_until, account.throttled_until):
            if until is not None and until > now:
                blocks.append(until)
        return max(blocks) if blocks else account.soonest_reset(now)

    def _blocking_claim(self, account: Account, now: float, family: str | None) -> str:
        """
        The representative claim of the window that keeps C{account} out
        longest: C{seven_day} for any weekly window, else C{five_hour}.
        """
        latest: tuple[float, str] | None = None
        for name, window in account.live_windows(now).items():
            if name == "overage" or not window_applies(name, family):
                continue
            if window.status == REJECTED or (window.utilization or 0.0) >= self.pool.thresholds.hard:
                reset = window.reset if window.reset is not None else math.inf
                if latest is None or reset > latest[0]:
                    latest = (reset, name)
        return "seven_day" if latest is not None and latest[1].startswith("7d") else "five_hour"

    def _rejection(self, exchange: Exchange, now: float) -> Decision:
        """
        What the client hears when no account can serve.  With every
        credential dead, a 401 naming each account, its cause and its fix:
        waiting would not help, and a 429 would send the user waiting for a
        reset that never comes.  Otherwise the synthetic 429 (DESIGN.md point
        9): retry-after to the soonest account back, and a message saying
        why each account is out, the dead ones too.
        """
        family = exchange.family
        dead: list[Account] = []
        out_of_quota: list[Account] = []
        throttled: list[Account] = []
        refused: list[Account] = []
        disabled: list[Account] = []
        for account in self.pool:
            if not account.config.enabled:
                disabled.append(account)
            elif account.error is not None:
                dead.append(account)
            elif self.pool.at_ceiling(account, now, family):
                out_of_quota.append(account)
            elif account.throttled_until is not None and account.throttled_until > now:
                throttled.append(account)
            else:
                # Serviceable, yet this request already had its answer
                # there (a 403 first, say): it says nothing about waiting.
                refused.append(account)
        waiting = out_of_quota + throttled
        if not waiting and not refused and not disabled:
            return Decision(None, NO_CREDENTIALS, status=401, message=self._dead_message(dead))
        backs = {account.name: self._back_at(account, now, family) for account in waiting}
        reset = min((back for back in backs.values() if back is not None), default=None)
        if reset is None:
            retry_after = self.retry_after_cap
        else:
            # Rounded up: a client told to come back before the reset only
            # draws another 429.
            retry_after = math.ceil(min(max(reset - now, 1), self.retry_after_cap))

        def when(accounts: list[Account]) -> str:
            return ", ".join(
                f"{account.name} (back in {duration(back - now)})"
                if (back := backs[account.name]) is not None
                else f"{account.name} (reset time unknown)"
                for account in accounts
            )

        # Only an account out of quota or throttled comes back by itself:
        # without one, "retry in N s" would promise what waiting cannot give.
        parts = [
            f"NextClaude: no account can serve right now; retry in {retry_after} s."
            if waiting
            else "NextClaude: no account can serve this request."
        ]
        if out_of_quota:
            parts.append(f"Out of quota: {when(out_of_quota)}.")
        if throttled:
            parts.append(f"Rate-limited: {when(throttled)}.")
        if refused:
            parts.append(f"Refused this request: {', '.join(account.name for account in refused)}.")
        if dead:
            parts.append("Dead credentials: " + " ".join(f"{_dead_entry(account)}." for account in dead))
        if disabled:
            names = ", ".join(account.name for account in disabled)
            parts.append(f"Disabled: {names} (`nextclaude enable NAME` puts one back).")
        return Decision(
            None,
            EXHAUSTED,
            retry_after=retry_after,
            reset=reset,
            message=" ".join(parts),
            out_of_quota=bool(out_of_quota),
            # With a dead credential or a refusal in the story, the client
            # must show this message, not its own usage-limit notice.
            claim=self._blocking_claim(min(out_of_quota, key=lambda a: backs[a.name] or math.inf), now, family)
            if out_of_quota and not throttled and not dead and not refused and not disabled
            else None,
        )

    @staticmethod
    def _dead_message(dead: list[Account]) -> str:
        if not dead:
            return (
                "NextClaude: no account can serve: no account is configured; "
                "add one with `nextclaude login` or `nextclaude import`."
            )
        entries = " ".join(f"{_dead_entry(account)}." for account in dead)
        return (
            f"NextClaude: no account can serve: every account's credential is dead. {entries} "
            "A running proxy picks up the fix within seconds."
        )

    # -- what responses teach us ---------------------------------------------------

    def on_response(
        self, exchange: Exchange, account: Account, status: int, report: QuotaReport
    ) -> Verdict:
        """
        Learn from the upstream's response headers and say whether to serve
        this answer or try again (DESIGN.md points 6, 9 and 10).
        """
        now = self._clock()
        was_serviceable = self.pool.serviceable(account, now, exchange.family)
        account.observe_quota(report, now)
        if status != 429 and report.status == REJECTED and not report.rejected_windows():
            # Only per-window verdicts are kept on the account, so an
            # aggregate-only "rejected" (overage in use on a 200) must take
            # the account out here or it would never reach the ceiling.
            self._exhaust(account, report, now)
        verdict = self._verdict(exchange, account, status, report, now)
        if was_serviceable and self.pool.at_ceiling(account, now, exchange.family):
            self._hub.emit(events.EXHAUSTED, now, account=account.name, reset=account.soonest_reset(now))
        if verdict.serve:
            self._served(exchange, account, status, now)
        self._refresh_after_traffic(now)
        return verdict

    def _verdict(self, exchange: Exchange, account: Account, status: int, report: QuotaReport, now: float) -> Verdict:
        if status == 429:
            return self._on_429(exchange, account, report, now)
        if exchange.probe_queue is not None:
            # The sweep is over: this answer is served.  Only a success says
            # the quota came back; a 5xx says nothing about it.
            self._end_sweep(exchange)
            if status < 500:
                account.exhausted_until = None
                self._hub.emit(events.RECOVERED, now, account=account.name)
        if status == 401:
            if account.kind != "apikey" and not exchange.refreshed and self.can_refresh(account):
                exchange.refreshed = True
                exchange.retry_on = account.name
                exchange.next_reason = RETRY_401
                return Verdict(serve=False, refresh=True)
            if account.error is None:
                what = "API key" if account.kind == "apikey" else "OAuth token"
                after = " even after a refresh" if exchange.refreshed else ""
                self._mark_error(
                    account, f"the {what} was rejected (401 authentication_error){after}; {credential_fix(account)}", now
                )
            return self._elsewhere(exchange, account, RETRY_401, now)
        if status == 403:
            if exchange.forbidden_by is None and self._another_can_serve(exchange, account, now):
                exchange.forbidden_by = account.name
                return self._elsewhere(exchange, account, RETRY_403, now)
            # Forbidden on a second account too: the request, not the
            # accounts, is at fault.
            return SERVE
        return SERVE

    def _served(self, exchange: Exchange, account: Account, status: int, now: float) -> None:
        pending, exchange.pending_move = exchange.pending_move, None
        if status >= 400:
            # Not served there, only relayed: the session stays put.
            return
        if exchange.facts.agent_id is not None:
            self._subagents = (account.name, now)
        if pending is not None and pending[0] == account.name and exchange.session is not None:
            self._move_session(exchange.session, account.name, pending[1], now)
        if exchange.forbidden_by is not None:
            first = self.pool.get(exchange.forbidden_by)
            if first is not None:
                self._mark_error(
                    first,
                    "the account was refused (403 permission_error) where another account succeeded: "
                    f"check its plan and permissions; {credential_fix(first)}",
                    now,
                )

    def _another_can_serve(self, exchange: Exchange, account: Account, now: float) -> bool:
        return any(
            other.name != account.name and self._usable(other, now, exchange.family, exchange.tried)
            for other in self.pool
        )

    def _elsewhere(self, exchange: Exchange, account: Account, reason: str, now: float) -> Verdict:
        exchange.tried.add(account.name)
        exchange.next_reason = reason
        return RETRY

    def _on_429(self, exchange: Exchange, account: Account, report: QuotaReport, now: float) -> Verdict:
        """
        A 429, by what it says (DESIGN.md point 10, L{classify_429}).
        """
        probing = exchange.probe_queue is not None
        kind = classify_429(report, self.pool.at_ceiling(account, now, exchange.family))
        if kind == QUOTA_OUT:
            self._exhaust(account, report, now)
            return self._elsewhere(exchange, account, QUOTA_429, now)
        # A probe only asks whether an account is back: it waits for nothing.
        may_wait = not probing and exchange.retries_429 < SAME_ACCOUNT_429_RETRIES
        if kind == ACCOUNT_THROTTLE:
            wait = report.retry_after or 0.0
            # An API key has no warm subscription cache worth waiting for.
            if may_wait and account.kind != "apikey":
                return self._again(exchange, account, RETRY_THROTTLE, min(wait, THROTTLE_WAIT_CAP))
            self._throttle(account, now + max(wait, 1.0), now)
            return self._elsewhere(exchange, account, RETRY_THROTTLE, now)
        if may_wait:
            return self._again(exchange, account, RETRY_TRANSIENT, TRANSIENT_WAIT)
        # Request-scoped: every account would refuse this request alike, and
        # the account itself is fine.  The client gets the upstream's answer
        # as it is; nothing about the account or the session changes.
        self._end_sweep(exchange)
        return SERVE

    def _again(self, exchange: Exchange, account: Account, reason: str, delay: float) -> Verdict:
        exchange.retries_429 += 1
        exchange.retry_on = account.name
        exchange.next_reason = reason
        return Verdict(serve=False, delay=delay)

    def _throttle(self, account: Account, until: float, now: float) -> None:
        if account.throttled_until is None or account.throttled_until < until:
            account.throttled_until = until
        self._hub.emit(events.THROTTLED, now, account=account.name, until=account.throttled_until)

    def on_unreachable(self, exchange: Exchange, account: Account) -> bool:
        """
        The connection failed before any byte reached the client: retry
        once on the same account.
        """
        if exchange.connect_retried:
            return False
        exchange.connect_retried = True
        exchange.retry_on = account.name
        exchange.next_reason = RETRY_CONNECT
        return True

    def _exhaust(self, account: Account, report: QuotaReport, now: float) -> None:
        reset = report.soonest_reset()
        if reset is None or reset <= now:
            reset = now + UNKNOWN_RESET_BACKOFF
        account.exhausted_until = reset

    def _mark_error(self, account: Account, message: str, now: float) -> None:
        account.error = message
        self._hub.emit(events.ACCOUNT_ERROR, now, account=account.name, message=message)

    def on_finished(self, exchange: Exchange, account: Account, usage: Usage | None, ok: bool) -> None:
        now = self._clock()
        account.last_used = now
        account.usage.record(usage, ok)
        # The reading this response carried, with the usage it reports
        # (which the reading may or may not count yet).
        session = exchange.session
        self.placement.observe(account, now, session.key if session is not None else "", usage)
        if usage is not None:
            self.placement.finished(
                account,
                exchange.session,
                usage,
                main=not exchange.facts.is_side_request,
                compaction=exchange.moment is Moment.COMPACTION,
            )

    def close(self, exchange: Exchange) -> None:
        """
        The request is over, however it ended: release a probe sweep it
        was running, and bring the status up to date if no response did
        (at most once per status_interval, as after a response).
        """
        self._end_sweep(exchange)
        if self._status_stale:
            self._refresh_after_traffic(self._clock())

    def _refresh_after_traffic(self, now: float) -> None:
        # Under placement the refresh only feeds status, and weighing every
        # live session on every response was a tenth of the proxy's CPU per
        # request (benchmarks/proxy_overhead.py): it runs at most once per
        # status_interval, and settle() catches up.
        if self.policy == FULL and now - self._refreshed_at < self.status_interval:
            self._status_stale = True
            return
        self._refresh(now)

    def status_due(self) -> float | None:
        """
        When a lagging status should be brought up to date (epoch seconds on
        the router's clock), or None when it is up to date.
        """
        return self._refreshed_at + self.status_interval if self._status_stale else None

    def settle(self) -> None:
        """Bring a lagging status (primary, draining, successor) up to date now."""
        if self._status_stale:
            self._refresh(self._clock())

    # -- time passing, pins ---------------------------------------------------------

    def next_expiry(self) -> float | None:
        now = self._clock()
        return min(
            (t for account in self.pool for t in [account.next_expiry(now)] if t is not None),
            default=None,
        )

    def expire(self) -> None:
        """
        Forget quota windows, exhaustion and throttles whose time has
        passed, so status shows fresh windows without waiting for traffic.
        """
        now = self._clock()
        for account in self.pool:
            # What the stored state said before any of it lapsed: judged at
            # `now`, a window or throttle ending at `now` already reads as
            # gone, so nothing would ever be announced recovered.
            before = self.pool.status(account, -math.inf)
            if account.expire(now) and before in (Status.EXHAUSTED, Status.THROTTLED):
                if self.pool.status(account, now) is Status.ACTIVE:
                    self._hub.emit(events.RECOVERED, now, account=account.name)
        self._refresh(now)

    def pin(self, name: str | None) -> None:
        """
        Make C{name} the manual pin (every session moves there on its next
        request), or clear the pin with None.
        """
        now = self._clock()
        if name is not None and self.pool.get(name) is None:
            raise KeyError(name)
        self.manual = name
        self._to_manual = (
            {s.key for s in self.sessions.sessions() if s.account != name} if name is not None else set()
        )
        self._hub.emit(events.PIN_CHANGED, now, account=name)
        self._refresh(now)

    def forget(self, name: str) -> None:
        """
        An account was removed: nothing may point at it any more.
        """
        if self.manual == name:
            self.pin(None)
        for attribute in ("primary", "successor"):
            if getattr(self, attribute) == name:
                setattr(self, attribute, None)
        self.draining.discard(name)
        self.sessions.forget_account(name)
        self.placement.forget(name)

    # -- views -------------------------------------------------------------------

    def status_of(self, account: Account) -> Status:
        now = self._clock()
        status = self.pool.status(account, now)
        if status is not Status.ACTIVE:
            return status
        if account.name in self.draining:
            return Status.DRAINING
        if account.name == self.primary and not self._below_switch(account, now):
            return Status.ARMED
        return Status.ACTIVE

    def flags_of(self, account: Account) -> list[str]:
        flags = []
        if account.name == self.primary:
            flags.append("primary")
        if account.name == self.successor:
            flags.append("successor")
        if account.name == self.manual:
            flags.append("manual")
        return flags

    def tracked_sessions(self) -> int:
        return len(self.sessions)

    # -- persistence -----------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        # Primary, draining and successor may lag by status_interval here:
        # restore() works them out afresh anyway.
        now = self._clock()
        return {
            "primary": self.primary,
            "manual": self.manual,
            "successor": self.successor,
            "draining": sorted(self.draining),
            "savedAt": now,
            "accounts": {account.name: account.to_state() for account in self.pool},
            "sessions": self.sessions.to_state(now),
            "placement": self.placement.to_state(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """
        Take back a previous run's quota, usage, pins and armed state; keep
        its primary when the restart came within the cache TTL and that
        account can still serve.
        """
        now = self._clock()
        accounts = state.get("accounts")
        if isinstance(accounts, dict):
            for name, data in accounts.items():
                account = self.pool.get(name)
                if account is not None and isinstance(data, dict):
                    account.restore_state(data)

        def known(value: object) -> Account | None:
            return self.pool.get(value) if isinstance(value, str) else None

        manual = known(state.get("manual"))
        self.manual = manual.name if manual is not None else None
        draining = state.get("draining")
        if isinstance(draining, list):
            self.draining = {a.name for a in map(known, draining) if a is not None}
        successor = known(state.get("successor"))
        self.successor = successor.name if successor is not None and self.draining else None
        self.sessions.restore(state.get("sessions"), now)
        self.placement.restore(state.get("placement"))
        for session in self.sessions.sessions():
            if session.account is not None and self.pool.get(session.account) is None:
                session.account = None
        primary = known(state.get("primary"))
        saved_at = state.get("savedAt")
        if (
            primary is not None
            and isinstance(saved_at, (int, float))
            and 0 <= now - saved_at < LONGEST_CACHE_TTL
            and self.pool.serviceable(primary, now)
        ):
            self.primary = primary.name
        self._refresh(now)
