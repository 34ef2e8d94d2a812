"""
Placement with reservations (DESIGN.md, "The routing policy", point 3):
which account a session should be on, in the upstream's own unit.

Pure: no reactor, no I/O; C{now} comes from the caller's injected clock.

Costs are fractions of a quota window, read from the 5h/7d utilization
headers.  A L{Ledger} per account charges each observed rise to the
requests that finished on that account since the previous reading, split
by their usage, and so learns the account's I{scale}: the utilization one
unit of observed usage adds there (priors from the tier until it has
served: Pro 1, Max 5x 5, Max 20x 20).  A session's cycle cost (the usage of
one compaction cycle) is kept in usage units, so it converts to any
account by that account's scale.

Every live session (its last request within its cache TTL) I{reserves} the
remaining cost of its current cycle on the account it is on.  At a cheap
moment (the first request after its compaction, or after idling past its
TTL) a session stays where it is when that account's headroom to the hard
threshold, minus the others' reservations, covers its next full cycle with
a margin; else it moves to the best account that does; if none does, it
stays and uses the quota there.  At the ceiling it moves to an account that
holds a full cycle, else to the one with the most headroom.  A session still
in its first cycle with a tiny context moves (I{spread early}) when its
account cannot hold it beside the sessions placed there before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from nextclaude.pool import Account, AccountPool
from nextclaude.sessions import Session
from nextclaude.usage import Usage

# The account-wide windows placement budgets; per-model windows only take
# an account out (pool.serviceable) for their family.
WINDOWS = ("5h", "7d")

# Tier priors of an account's size (DESIGN.md, "State per account").
TIER_SIZES = (("20x", 20.0), ("5x", 5.0), ("max", 5.0), ("team", 5.0), ("enterprise", 5.0), ("pro", 1.0))
# Prior uncached tokens one size-1 (Pro) account's 5-hour window holds,
# until any account has shown a rise; the weekly window as this many
# 5-hour ones.
PRIOR_WINDOW_TOKENS = 1_000_000.0
PRIOR_WEEK_IN_WINDOWS = 10.0
# Prior quota weight of a cache read against an uncached token (a read is
# priced at a tenth; whether quota counts it is not documented, PROTOCOL.md).
PRIOR_READ_WEIGHT = 0.05
# How much the priors weigh against readings: about one reading a tenth of
# a window along.  A few readings outweigh them; one rounded to 0.05 does not.
PRIOR_STRENGTH = 0.01
# Prior cost of a compaction cycle (uncached tokens, cache reads) until some
# session has completed one: Claude Code's cycle at a 200k context.
PRIOR_CYCLE = (120_000.0, 1_500_000.0)
KEPT_CYCLES = 5
# "Covers its next full cycle with a margin": a share of the cycle, plus
# slack for readings rounded to 0.01-0.05 and lagging a few requests.
MARGIN = 0.1
SLACK = 0.02
# A session past its expected cycle still reserves this share of one.
MIN_REMAINING = 0.1
# A session in its first cycle is still tiny (cheap to move) below this
# share of a cycle: its context is little more than the shared prefix.
TINY = 0.1

# A cost: (uncached tokens, cache reads).  Uncached is input + cache
# creation + output; the upstream's weights are learned, not assumed.
Cost = tuple[float, float]


def tier_size(tier: str | None) -> float:
    """An account's size in Pro accounts, from its tier name (1 when unknown)."""
    text = (tier or "").lower()
    for marker, size in TIER_SIZES:
        if marker in text:
            return size
    return 1.0


def usage_cost(usage: Usage) -> Cost:
    """One response's observed usage as a cost."""
    uncached = usage.input_tokens + usage.cache_creation_input_tokens + usage.output_tokens
    return float(uncached), float(usage.cache_read_input_tokens)


@dataclass
class WindowLedger:
    """
    What one window of one account has shown.  Each attribution adds a
    point (uncached, reads, rise) counted from the window's first reading;
    a least-squares fit through them, pulled towards the priors, gives the
    window's scale and the weight of a cache read.
    """

    # Sums over points: uu, ur, rr, ux, rx (x the rise).
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)
    points: int = 0
    last: float | None = None
    reset: float | None = None
    anchor: float = 0.0
    uncached: float = 0.0
    reads: float = 0.0
    # Usage finished since the last rise, per session key, waiting for the
    # reading that shows it.
    pending: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"sums": list(self.sums), "points": self.points}

    @classmethod
    def from_json(cls, data: object) -> WindowLedger:
        ledger = cls()
        if isinstance(data, dict):
            sums = data.get("sums")
            if isinstance(sums, list) and len(sums) == 5 and all(_finite(v) is not None for v in sums):
                ledger.sums = [float(v) for v in sums]
            points = data.get("points")
            ledger.points = points if type(points) is int and points >= 0 else 0
        return ledger

    def fit(self, scale_prior: float, weight_prior: float) -> tuple[float, float]:
        """(scale, read weight): utilization per uncached token, and a read's weight against one."""
        uu, ur, rr, ux, rx = self.sums
        # In units of the prior's utilization, so the prior's strength means
        # the same on every account.
        k = scale_prior
        uu, ur, rr, ux, rx = uu * k * k, ur * k * k, rr * k * k, ux * k, rx * k
        lam = PRIOR_STRENGTH
        a11, a12, a22 = uu + lam, ur, rr + lam
        b1, b2 = ux + lam, rx + lam * weight_prior
        det = a11 * a22 - a12 * a12
        alpha, beta = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
        if alpha <= 0.05:
            alpha = 0.05
        if beta < 0:
            # Reads cost nothing: refit the scale alone.
            beta, alpha = 0.0, max(0.05, b1 / a11)
        weight = min(1.0, beta / alpha)
        return alpha * k, weight


@dataclass
class Ledger:
    """One account's windows, and the utilization charged to each session there."""

    windows: dict[str, WindowLedger] = field(default_factory=lambda: {w: WindowLedger() for w in WINDOWS})
    charged: dict[str, float] = field(default_factory=dict)

    def reading(self, window: str, utilization: float, reset: float | None) -> bool:
        """
        A utilization header.  A rise is charged to the usage pending since
        the last rise, split by usage; a reading that did not rise (rounded,
        or lagging) leaves the usage pending for the next one.  Returns
        whether anything was learned.
        """
        ledger = self.windows[window]
        if ledger.last is None or reset != ledger.reset or utilization < ledger.last:
            # A new window (or the first reading): nothing to attribute.
            ledger.last, ledger.reset, ledger.anchor = utilization, reset, utilization
            ledger.uncached = ledger.reads = 0.0
            ledger.pending.clear()
            return False
        rise = utilization - ledger.last
        pending = [sum(cost[0] for cost in ledger.pending.values()), sum(cost[1] for cost in ledger.pending.values())]
        if rise <= 0 or pending[0] + pending[1] <= 0:
            # Unchanged, or the rise of a request not finished yet: it shows
            # in the next attribution, through `last`.
            return False
        ledger.last = utilization
        ledger.uncached += pending[0]
        ledger.reads += pending[1]
        u, r, x = ledger.uncached, ledger.reads, utilization - ledger.anchor
        sums = ledger.sums
        sums[0] += u * u
        sums[1] += u * r
        sums[2] += r * r
        sums[3] += u * x
        sums[4] += r * x
        ledger.points += 1
        if window == "5h":
            total = pending[0] + PRIOR_READ_WEIGHT * pending[1]
            for key, (uncached, reads) in ledger.pending.items():
                share = (uncached + PRIOR_READ_WEIGHT * reads) / total if total > 0 else 0.0
                self.charged[key] = self.charged.get(key, 0.0) + rise * share
        ledger.pending.clear()
        return True

    def finished(self, key: str, cost: Cost) -> None:
        for ledger in self.windows.values():
            pending = ledger.pending.setdefault(key, [0.0, 0.0])
            pending[0] += cost[0]
            pending[1] += cost[1]


@dataclass(frozen=True)
class Choice:
    """Where a session goes and the routing reason of DESIGN.md point 11."""

    account: Account
    reason: str


# Reasons placement gives (the router has the rest of the vocabulary).
PLACED = "placed"
SPREAD_EARLY = "spread-early"
MOVED_AFTER_COMPACTION = "moved-after-compaction"
MOVED_AFTER_IDLE = "moved-after-idle"
CEILING = "ceiling"
AFFINITY = "affinity"


class Placement:
    """
    The learned costs (scales, cycle costs) and the placement decisions.
    The router keeps attempts, verdicts, sweeps, the manual pin and the
    forward-only rule; it passes what a decision must leave out as
    C{exclude}.
    """

    def __init__(self, pool: AccountPool, sessions: Callable[[], Iterable[Session]]) -> None:
        self.pool = pool
        self._sessions = sessions
        self.ledgers: dict[str, Ledger] = {}
        # Completed cycle costs of any session: the prior for a session
        # that has not completed one.
        self.cycles: list[Cost] = []
        self._closed: dict[str, int] = {}
        # Fitted (scale, read weight) per (account, window); ("", window) is
        # the pool's.  Cleared whenever a reading teaches something.
        self._fits_cache: dict[tuple[str, str], tuple[float, float]] = {}

    # -- learning -------------------------------------------------------------------

    def ledger(self, name: str) -> Ledger:
        ledger = self.ledgers.get(name)
        if ledger is None:
            ledger = self.ledgers[name] = Ledger()
        return ledger

    def observe(self, account: Account, now: float) -> None:
        """Take the account's latest utilization readings (after its quota headers were folded in)."""
        if account.kind == "apikey":
            return
        live = account.live_windows(now)
        ledger = self.ledger(account.name)
        learned = False
        for window in WINDOWS:
            quota = live.get(window)
            if quota is not None and quota.utilization is not None:
                learned = ledger.reading(window, quota.utilization, quota.reset) or learned
        if learned:
            self._fits_cache.clear()

    def finished(self, account: Account, session: Session | None, usage: Usage) -> None:
        """A response finished: its usage waits for the reading that shows it, and counts in its session's cycle."""
        cost = usage_cost(usage)
        if session is not None:
            session.record_usage(int(cost[0]), int(cost[1]))
        if account.kind != "apikey" and cost[0] + cost[1] > 0:
            self.ledger(account.name).finished(session.key if session is not None else "", cost)

    def cycle_closed(self, session: Session) -> None:
        """
        The session compacted: its last cycle's cost informs every session's
        prior (once per cycle: a retried compaction closes nothing new).
        """
        if session.cycle_costs and self._closed.get(session.key) != session.compactions:
            self._closed[session.key] = session.compactions
            reads = session.cycle_read_costs[-1] if session.cycle_read_costs else 0
            self.cycles.append((float(session.cycle_costs[-1]), float(reads)))
            del self.cycles[:-4 * KEPT_CYCLES]
            if len(self._closed) > 4 * KEPT_CYCLES:
                self._closed = {session.key: session.compactions}

    # -- costs ------------------------------------------------------------------------

    def _fit(self, account: Account, window: str) -> tuple[float, float]:
        """(scale, read weight) of one window of one account, from its readings and the priors."""
        cached = self._fits_cache.get((account.name, window))
        if cached is not None:
            return cached
        size = tier_size(account.config.tier)
        base, weight = self._pool_prior(window)
        ledger = self.ledgers.get(account.name)
        data = ledger.windows[window] if ledger is not None else WindowLedger()
        fit = data.fit(base / size, weight)
        self._fits_cache[(account.name, window)] = fit
        return fit

    def _pool_prior(self, window: str) -> tuple[float, float]:
        """
        The scale of a size-1 account and a read's weight, from every account
        that has shown rises (sizes from the tier priors), else the priors:
        how an account that has not served yet is costed.
        """
        cached = self._fits_cache.get(("", window))
        if cached is not None:
            return cached
        prior = 1.0 / PRIOR_WINDOW_TOKENS / (PRIOR_WEEK_IN_WINDOWS if window == "7d" else 1.0)
        scaled = weights = evidence = 0.0
        for account in self.pool:
            ledger = self.ledgers.get(account.name)
            if ledger is None or account.kind == "apikey" or not ledger.windows[window].points:
                continue
            data = ledger.windows[window]
            size = tier_size(account.config.tier)
            scale, weight = data.fit(prior / size, PRIOR_READ_WEIGHT)
            amount = float(data.points)
            scaled += scale * size * amount
            weights += weight * amount
            evidence += amount
        result = (scaled / evidence, weights / evidence) if evidence else (prior, PRIOR_READ_WEIGHT)
        self._fits_cache[("", window)] = result
        return result

    def evidence(self) -> bool:
        """Whether any account's 5-hour readings have risen over usage yet."""
        return any(ledger.windows["5h"].points for ledger in self.ledgers.values())

    def scale(self, account: Account, window: str) -> float:
        """Utilization one uncached token adds to this window of this account."""
        return self._fit(account, window)[0]

    def utilization(self, account: Account, window: str, cost: Cost) -> float:
        """What C{cost} adds to this window of this account."""
        scale, weight = self._fit(account, window)
        return scale * (cost[0] + weight * cost[1])

    def cycle_cost(self, session: Session) -> Cost:
        """The expected cost of the session's next full cycle."""
        if session.cycle_costs:
            reads = session.cycle_read_costs or [0]
            return sum(session.cycle_costs) / len(session.cycle_costs), sum(reads) / len(reads)
        if self.cycles:
            prior = (
                sum(c[0] for c in self.cycles) / len(self.cycles),
                sum(c[1] for c in self.cycles) / len(self.cycles),
            )
        else:
            prior = PRIOR_CYCLE
        return max(prior[0], float(session.cycle_tokens)), max(prior[1], float(session.cycle_reads))

    def remaining(self, session: Session) -> Cost:
        """What the session's current cycle has still to cost: its reservation."""
        cycle = self.cycle_cost(session)
        return (
            max(cycle[0] - session.cycle_tokens, MIN_REMAINING * cycle[0]),
            max(cycle[1] - session.cycle_reads, MIN_REMAINING * cycle[1]),
        )

    def tiny(self, session: Session) -> bool:
        """Still in its first cycle with little more than the prefix: cheap to move."""
        return session.compactions == 0 and session.cycle_tokens <= TINY * self.cycle_cost(session)[0]

    def live(self, now: float) -> list[Session]:
        """Sessions whose last request is within their cache TTL: they hold reservations."""
        return [s for s in self._sessions() if s.account is not None and not s.idle_expired(now)]

    def reserved(self, account: Account, now: float, apart: Session | None = None, senior_to: Session | None = None) -> Cost:
        """What the live sessions on the account (but C{apart}; only those placed before C{senior_to}) still reserve."""
        uncached = reads = 0.0
        for s in self.live(now):
            if s.account != account.name or (apart is not None and s.key == apart.key):
                continue
            if senior_to is not None and (s.placed, s.key) >= (senior_to.placed, senior_to.key):
                continue
            left = self.remaining(s)
            uncached += left[0]
            reads += left[1]
        return uncached, reads

    def room(self, account: Account, now: float, reserved: Cost) -> dict[str, float]:
        """Per window, utilization left to the hard threshold beside C{reserved}."""
        hard = self.pool.thresholds.hard
        return {
            window: hard - account.utilization(window, now) - self.utilization(account, window, reserved)
            for window in WINDOWS
        }

    def holds(self, account: Account, cost: Cost, now: float, reserved: Cost) -> bool:
        """Whether the account holds C{cost} more beside C{reserved}, with the margin."""
        if account.kind == "apikey":
            return True
        if account.peak_utilization(now) >= self.pool.thresholds.switch:
            return False
        if not self.evidence():
            # No account has shown a single rise: the priors alone would
            # decide, and they may be off by a tier.  Until then every
            # account below the switch threshold holds a cycle.
            return True
        room = self.room(account, now, reserved)
        return all(
            room[window] >= (1 + MARGIN) * self.utilization(account, window, cost) + SLACK for window in WINDOWS
        )

    def fits(self, account: Account, session: Session, now: float) -> bool:
        """Whether the account holds the session's next full cycle beside the others' reservations."""
        return self.holds(account, self.cycle_cost(session), now, self.reserved(account, now, apart=session))

    def room_share(self, account: Account, now: float, session: Session) -> float:
        """How many of the session's cycles the account has room for beside the others (its tightest window)."""
        room = self.room(account, now, self.reserved(account, now, apart=session))
        cycle = self.cycle_cost(session)
        return min(room[w] / max(self.utilization(account, w, cycle), 1e-12) for w in WINDOWS)

    # -- ranking and decisions -------------------------------------------------------

    def rank_key(self, account: Account, session: Session, now: float, fits: bool) -> tuple:
        """
        DESIGN.md point 1: priority; fits the session's next cycle; warm
        with the shared prefix; 5h window already started; most 5h left;
        most 7d left; config order.
        """
        last = account.last_used
        warm = last is not None and now - last < session.ttl
        started = account.utilization("5h", now) > 0 or (last is not None and now - last < 5 * 3600)
        return (
            account.priority,
            not fits,
            not warm,
            not started,
            round(account.utilization("5h", now) * 200),
            round(account.utilization("7d", now) * 200),
            account.order,
        )

    def _candidates(self, now: float, family: str | None, exclude: Callable[[Account], bool]) -> list[Account]:
        return [a for a in self.pool if not exclude(a) and self.pool.serviceable(a, now, family)]

    def best(
        self,
        session: Session,
        now: float,
        family: str | None,
        exclude: Callable[[Account], bool],
        must_fit: bool = True,
    ) -> Account | None:
        """The best-ranked account for the session; with C{must_fit}, only one that holds its cycle."""
        scored = [(self.fits(a, session, now), a) for a in self._candidates(now, family, exclude)]
        if must_fit:
            scored = [(fits, a) for fits, a in scored if fits]
        if not scored:
            return None
        return min(scored, key=lambda pair: self.rank_key(pair[1], session, now, pair[0]))[1]

    def place(self, session: Session, now: float, family: str | None, exclude: Callable[[Account], bool]) -> Account | None:
        """A new session: the best account that holds its first cycle, else the best that can serve."""
        return self.best(session, now, family, exclude) or self.best(session, now, family, exclude, must_fit=False)

    def at_ceiling(self, session: Session, now: float, family: str | None, exclude: Callable[[Account], bool]) -> Account | None:
        """
        Its account cannot serve: one that holds a full cycle, else the one
        with the most room (it moves again at that one's ceiling).
        """
        fitting = self.best(session, now, family, exclude)
        if fitting is not None:
            return fitting
        candidates = self._candidates(now, family, exclude)
        if not candidates:
            return None
        return max(
            candidates,
            key=lambda a: (-a.priority, a.kind != "apikey", self.room_share(a, now, session), -a.order),
        )

    def at_cheap_moment(
        self, session: Session, current: Account, now: float, family: str | None, exclude: Callable[[Account], bool]
    ) -> Account:
        """Keep it where it is if that holds its next cycle; else the best that does; else stay."""
        if self.fits(current, session, now):
            return current
        return self.best(session, now, family, exclude) or current

    def spread_early(
        self, session: Session, current: Account, now: float, family: str | None, exclude: Callable[[Account], bool]
    ) -> Account | None:
        """
        A tiny session on an account that cannot hold its first cycle
        beside the sessions placed there before it: the best account that
        does, while moving it costs little more than the prefix.
        """
        if not self.tiny(session) or current.kind == "apikey":
            return None
        senior = self.reserved(current, now, apart=session, senior_to=session)
        if self.holds(current, self.remaining(session), now, senior):
            return None
        return self.best(session, now, family, lambda a: exclude(a) or a.name == current.name)

    # -- persistence ---------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "ledgers": {
                name: {w: ledger.windows[w].to_json() for w in WINDOWS}
                for name, ledger in self.ledgers.items()
                if self.pool.get(name) is not None
            },
            "cycles": [list(c) for c in self.cycles],
        }

    def restore(self, state: object) -> None:
        if not isinstance(state, Mapping):
            return
        ledgers = state.get("ledgers")
        if isinstance(ledgers, dict):
            for name, windows in ledgers.items():
                if isinstance(name, str) and isinstance(windows, dict):
                    self.ledgers[name] = Ledger({w: WindowLedger.from_json(windows.get(w)) for w in WINDOWS})
        self._fits_cache.clear()
        cycles = state.get("cycles")
        if isinstance(cycles, list):
            self.cycles = [
                (float(c[0]), float(c[1]))
                for c in cycles
                if isinstance(c, list) and len(c) == 2 and all(_finite(v) is not None and v >= 0 for v in c)
            ][-4 * KEPT_CYCLES:]
        self._fits_cache.clear()

    def forget(self, name: str) -> None:
        self.ledgers.pop(name, None)


def _finite(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
