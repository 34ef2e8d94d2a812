"""
Placement with reservations (DESIGN.md, "The routing policy", point 3):
which account a session should be on, in the upstream's own unit.

Pure: no reactor, no I/O; C{now} comes from the caller's injected clock.

Costs are fractions of a quota window, read from the 5h/7d utilization
headers.  A L{Ledger} per account charges each observed rise to the
requests that finished on that account since the previous reading, split
by their usage, and so learns the account's I{scale}: the utilization one
unit of observed usage adds there (priors from the tier until it has
served: Pro 1, Max 5x 5, Max 20x 20).  Whether a reading already counts
the request it came with is unknown, so the fit is kept under both
hypotheses and the better one used.

Early in a window, and with readings rounded to 0.05, uncached usage and
cache reads rise together and the fit cannot tell them apart: costs then
take the read weight at the upper end of what the readings allow (the fit
plus one standard error, at most a read's price).  Underrating reads lets
sessions crowd an account until all of them meet its ceiling with a full
context; overrating them costs an early move while the context is small.

A session's cycle cost (the usage of one compaction cycle) is kept in
usage units, so it converts to any account by that account's scale: the
mean of its completed cycles, else projected from its own context growth
per step to where it will compact (where it or the pool's sessions
compacted, else the model's window minus Claude Code's ~13k reserve,
PROTOCOL.md).

Every live session (its last request within its cache TTL) I{reserves} the
remaining cost of its current cycle on the account it is on.  At a cheap
moment (the first request after its compaction, or after idling past its
TTL) a session stays where it is when that account's headroom to the hard
threshold, minus the others' reservations, covers its next full cycle with
a margin; else it moves to the best account that does; if none does, it
stays and uses the quota there.  After idling past its TTL its own cache is
cold everywhere, so it goes to the best account that holds its cycle (warm
with the shared prefix first).  At the ceiling it moves to an account that
holds a full cycle, else to the one with the most headroom.  A session still
in its first cycle with a tiny context moves (I{spread early}) when its
account cannot hold it beside the sessions placed there before it: to an
account that holds its cycle, else (cycles bigger than any account holds
with the margin) to one with a good deal more room that still holds what
is left of this cycle.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

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
PRIOR_STRENGTH = 1e-3
# A cautious read weight is at most a read's price against base input
# (0.1x, PROTOCOL.md "Prompt caching"), and this many standard errors of
# the fit above it.
CAUTIOUS_READ_WEIGHT = 0.1
CAUTION = 1.0
# Steps the utilization headers may be rounded to, coarsest first: a
# window's readings are taken as rounded to the coarsest step they are all
# multiples of (a reading between steps makes it finer).  Rounding to a
# step adds noise of step / sqrt(12); unrounded readings are taken to
# carry at least EXACT_NOISE.
READING_STEPS = (0.05, 0.01)
EXACT_NOISE = 1e-3
# Claude Code compacts when the context nears the model's window, minus
# about 13k tokens (PROTOCOL.md): until a session of the pool has been seen
# compacting, the context it compacts at is taken from the smallest of these
# windows its context has not outgrown.
MODEL_WINDOWS = (200_000, 1_000_000)
COMPACTION_RESERVE = 13_000
# Context a main turn adds until a session has shown its own growth: tool
# results plus a reply, a few thousand tokens.
PRIOR_GROWTH = 3_000.0
# Growth is a session's own once it has grown its context this many times.
MIN_STEPS = 2
KEPT_COMPACTIONS = 20
# The ledger's point sums: uu, ur, rr, ux, rx, xx, count; kept under two
# hypotheses about what a reading counts (WindowLedger).
SUMS = 7
BEFORE_OWN, SHOWS_OWN = 0, 1
# "Covers its next full cycle with a margin": a share of the cycle, plus
# slack for readings rounded to 0.01-0.05 and lagging a few requests.
MARGIN = 0.1
SLACK = 0.02
# A session past its expected cycle still reserves this share of one.
MIN_REMAINING = 0.1
# A session in its first cycle is still tiny (cheap to move) while it has
# done less than this share of the cycle: its context is little more than
# the shared prefix.
TINY = 0.1
# At a cheap moment where no account holds a session's whole cycle it moves
# only to an account with room for this much more of the cycle than here.
SPREAD_GAIN = 0.25

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

    Whether a reading already counts the request it came with is not
    documented (headers come before their own response's output; an
    upstream may count the input first): the points are kept under both
    readings of it, and the fit that explains the rises better is used.
    Cumulative points make a lag of a few requests (sessions streaming at
    once, readings rounded to 0.01-0.05) matter less and less.
    """

    # Per hypothesis (BEFORE_OWN, SHOWS_OWN): sums over its points of uu,
    # ur, rr, ux, rx, xx and the point count (x the rise).
    sums: list[list[float]] = field(default_factory=lambda: [[0.0] * SUMS, [0.0] * SUMS])
    points: int = 0
    last: float | None = None
    reset: float | None = None
    anchor: float = 0.0
    totals: list[list[float]] = field(default_factory=lambda: [[0.0, 0.0], [0.0, 0.0]])
    # Usage finished and not shown yet, per session key (a reading that
    # does not count its own request), and in all (one that does).
    pending: dict[str, list[float]] = field(default_factory=dict)
    pending_own: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # The step the readings are rounded to (0: not rounded).
    step: float = READING_STEPS[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "sums": list(self.sums[BEFORE_OWN]),
            "sumsOwn": list(self.sums[SHOWS_OWN]),
            "points": self.points,
            "step": self.step,
        }

    @classmethod
    def from_json(cls, data: object) -> WindowLedger:
        ledger = cls()
        if isinstance(data, dict):
            for key, hypothesis in (("sums", BEFORE_OWN), ("sumsOwn", SHOWS_OWN)):
                sums = data.get(key)
                if isinstance(sums, list) and len(sums) == SUMS and all(_finite(v) is not None for v in sums):
                    ledger.sums[hypothesis] = [float(v) for v in sums]
            points = data.get("points")
            ledger.points = points if type(points) is int and points >= 0 else 0
            step = _finite(data.get("step"))
            if step in READING_STEPS or step == 0:
                ledger.step = step
        return ledger

    def rounding(self, utilization: float) -> None:
        """Make the step finer when a reading is not a multiple of it."""
        while self.step > 0 and abs(utilization / self.step - round(utilization / self.step)) > 1e-6:
            self.step = next((step for step in READING_STEPS if step < self.step), 0.0)

    def hold(self, key: str, cost: Sequence[float]) -> None:
        """Usage no reading has shown yet."""
        if cost[0] + cost[1] <= 0:
            return
        pending = self.pending.setdefault(key, [0.0, 0.0])
        pending[0] += cost[0]
        pending[1] += cost[1]
        self.pending_own[0] += cost[0]
        self.pending_own[1] += cost[1]

    def _add(self, hypothesis: int, pending: Sequence[float], x: float) -> bool:
        if pending[0] + pending[1] <= 0:
            return False
        total = self.totals[hypothesis]
        total[0] += pending[0]
        total[1] += pending[1]
        u, r = total
        for index, value in enumerate((u * u, u * r, r * r, u * x, r * x, x * x, 1.0)):
            self.sums[hypothesis][index] += value
        return True

    def _solve(self, hypothesis: int, k: float, weight_prior: float) -> tuple[float, float, float, float]:
        """
        (scale, read coefficient, residual, the read coefficient's standard
        error) of one hypothesis, in units of the prior scale C{k}.
        """
        uu, ur, rr, ux, rx, xx, count = self.sums[hypothesis]
        # In units of the prior's utilization, so the prior's strength means
        # the same on every account.
        uu, ur, rr, ux, rx = uu * k * k, ur * k * k, rr * k * k, ux * k, rx * k
        lam = PRIOR_STRENGTH
        a11, a12, a22 = uu + lam, ur, rr + lam
        b1, b2 = ux + lam, rx + lam * weight_prior
        det = a11 * a22 - a12 * a12
        alpha, beta = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
        if beta < 0:
            # Reads cost nothing: refit the scale alone.
            alpha, beta = b1 / a11, 0.0
        alpha = max(alpha, 0.05)
        residual = xx - 2 * (alpha * ux + beta * rx) + alpha * alpha * uu + 2 * alpha * beta * ur + beta * beta * rr
        # The readings' noise: what the residuals show, but never less than
        # their rounding; the read coefficient's standard error follows from
        # the (regularised) normal equations.
        noise = max(residual / max(count - 2.0, 1.0), self.step**2 / 12, EXACT_NOISE**2)
        return alpha, beta, residual, math.sqrt(noise * a11 / det)

    def fit(self, scale_prior: float, weight_prior: float, cautious: bool = False) -> tuple[float, float]:
        """
        (scale, read weight): utilization per uncached token, and a read's
        weight against one.  C{cautious}: the read weight at the upper end
        of what the readings allow, CAUTION standard errors above the fit
        but at most CAUTIOUS_READ_WEIGHT (see the module docstring); with
        no reading at all, that ceiling.
        """
        k = scale_prior
        fits = [self._solve(h, k, weight_prior) for h in (BEFORE_OWN, SHOWS_OWN) if self.sums[h][6] > 0]
        if not fits:
            return k, max(weight_prior, CAUTIOUS_READ_WEIGHT) if cautious else weight_prior
        alpha, beta, _, error = min(fits, key=lambda fit: fit[2])
        weight = min(1.0, beta / alpha)
        if cautious:
            weight = max(weight, min(CAUTIOUS_READ_WEIGHT, (beta + CAUTION * error) / alpha))
        return alpha * k, weight


@dataclass
class Ledger:
    """One account's windows, and the utilization charged to each session there."""

    windows: dict[str, WindowLedger] = field(default_factory=lambda: {w: WindowLedger() for w in WINDOWS})
    charged: dict[str, float] = field(default_factory=dict)

    def reading(
        self, window: str, utilization: float, reset: float | None, key: str = "", current: Cost | None = None
    ) -> bool:
        """
        A utilization header, from the response of a request by session
        C{key} that cost C{current}.  A rise is charged to the usage pending
        since the last rise, split by usage; a reading that did not rise
        (rounded, or lagging) leaves the usage pending for the next one.
        Returns whether anything was learned.
        """
        ledger = self.windows[window]
        ledger.rounding(utilization)
        own = list(current) if current is not None else [0.0, 0.0]
        if ledger.last is None or reset != ledger.reset or utilization < ledger.last:
            # A new window (or the first reading): nothing to attribute.  Its
            # own request is in it, or still to show.
            ledger.last, ledger.reset, ledger.anchor = utilization, reset, utilization
            ledger.totals = [[0.0, 0.0], [0.0, 0.0]]
            ledger.pending = {key: own} if own[0] + own[1] > 0 else {}
            ledger.pending_own = [0.0, 0.0]
            return False
        rise = utilization - ledger.last
        if rise <= 0:
            # Unchanged: its own request shows in a later rise.
            ledger.hold(key, own)
            return False
        pending = [sum(cost[0] for cost in ledger.pending.values()), sum(cost[1] for cost in ledger.pending.values())]
        x = utilization - ledger.anchor
        before = ledger._add(BEFORE_OWN, pending, x)
        shown = ledger._add(SHOWS_OWN, [ledger.pending_own[0] + own[0], ledger.pending_own[1] + own[1]], x)
        if not (before or shown):
            return False
        ledger.last = utilization
        ledger.points += 1
        if window == "5h" and before:
            total = pending[0] + PRIOR_READ_WEIGHT * pending[1]
            for name, (uncached, reads) in ledger.pending.items():
                share = (uncached + PRIOR_READ_WEIGHT * reads) / total if total > 0 else 0.0
                self.charged[name] = self.charged.get(name, 0.0) + rise * share
        ledger.pending = {key: own} if own[0] + own[1] > 0 else {}
        ledger.pending_own = [0.0, 0.0]
        return True

    def finished(self, key: str, cost: Cost) -> None:
        """Usage no reading has shown yet."""
        for ledger in self.windows.values():
            ledger.hold(key, cost)


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
        # The contexts recent sessions compacted at: where a session that
        # has not compacted yet will.
        self.compaction_contexts: list[int] = []
        # Fitted (scale, read weight) per (account, window); ("", window) is
        # the pool's.  Cleared whenever a reading teaches something.
        self._fits_cache: dict[tuple[str, str], tuple[float, float]] = {}
        # Within one batch (see L{batch}) nothing changes, so what every
        # session reserves and the pool's growth rate are worked out once:
        # refreshing the status asks for each live session's reservation
        # once per session it weighs, which is quadratic without this.
        self._memo: dict[Any, Any] | None = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """
        Decisions made inside share the sessions' reservations and growth
        rates, worked out once; the caller must not change sessions or
        learn from readings until the block ends.
        """
        if self._memo is not None:
            yield
            return
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    # -- learning -------------------------------------------------------------------

    def ledger(self, name: str) -> Ledger:
        ledger = self.ledgers.get(name)
        if ledger is None:
            ledger = self.ledgers[name] = Ledger()
        return ledger

    def observe(self, account: Account, now: float, key: str = "", usage: Usage | None = None) -> None:
        """
        Take the account's latest utilization readings (after its quota
        headers were folded in), from the response of session C{key}'s
        request that used C{usage}.
        """
        if account.kind == "apikey":
            return
        cost = usage_cost(usage) if usage is not None else None
        live = account.live_windows(now)
        ledger = self.ledger(account.name)
        learned = False
        for window in WINDOWS:
            quota = live.get(window)
            if quota is not None and quota.utilization is not None:
                learned = ledger.reading(window, quota.utilization, quota.reset, key, cost) or learned
            elif cost is not None:
                ledger.windows[window].hold(key, cost)
        if learned:
            self._fits_cache.clear()

    def finished(
        self, account: Account, session: Session | None, usage: Usage, main: bool = True, compaction: bool = False
    ) -> None:
        """
        A response finished: its usage counts in its session's cycle; a main
        request's prompt is the session's context (a compaction request's,
        the context it compacts at).
        """
        cost = usage_cost(usage)
        if session is not None:
            session.record_usage(int(cost[0]), int(cost[1]))
            if main:
                prompt = usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
                session.record_context(prompt, int(cost[0]) - usage.output_tokens, compaction)
                if compaction and prompt > 0:
                    self.compaction_contexts.append(prompt)
                    del self.compaction_contexts[:-KEPT_COMPACTIONS]

    # -- costs ------------------------------------------------------------------------

    def _fit(self, account: Account, window: str) -> tuple[float, float]:
        """
        (scale, cautious read weight) of one window of one account, from its
        readings and the priors: what costs are converted by.
        """
        cached = self._fits_cache.get((account.name, window))
        if cached is not None:
            return cached
        size = tier_size(account.config.tier)
        base, weight = self._pool_prior(window)
        ledger = self.ledgers.get(account.name)
        data = ledger.windows[window] if ledger is not None else WindowLedger()
        fit = data.fit(base / size, weight, cautious=True)
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

    # -- the compaction cycle ------------------------------------------------------------

    def compacts_at(self, session: Session) -> float:
        """
        The context the session will compact at: where it last did, else
        where the pool's sessions did, else its model's window minus
        Claude Code's reserve (the smallest window its context has not
        outgrown: a context past 187k means a 1M-context model).
        """
        context = session.context
        if session.compacted_at > context:
            return float(session.compacted_at)
        if self.compaction_contexts:
            seen = sum(self.compaction_contexts) / len(self.compaction_contexts)
            if seen > context:
                return seen
        for window in MODEL_WINDOWS:
            if context < window - COMPACTION_RESERVE:
                return float(window - COMPACTION_RESERVE)
        return float(context)

    def growth(self, session: Session) -> tuple[float, float]:
        """
        (context added, uncached usage) per main step: the session's own
        once it has grown a few times, else the mean of the sessions that
        have, else the prior.
        """
        def own(s: Session) -> tuple[float, float] | None:
            if s.cycle_steps < MIN_STEPS or s.cycle_growth <= 0:
                return None
            # The steps' own usage: a subagent's or a title's is too bursty
            # to spread over a few steps (the margin covers it).
            return s.cycle_growth / s.cycle_steps, s.cycle_step_tokens / s.cycle_steps

        mine = own(session)
        if mine is not None:
            return mine
        memo = self._memo
        if memo is not None and "pooled growth" in memo:
            return memo["pooled growth"]  # type: ignore[no-any-return]
        # The session itself has no rate of its own, so "the others" are
        # every session that has one: the same mean for every caller.
        others = [rates for s in self._sessions() if s.key != session.key and (rates := own(s)) is not None]
        pooled = (
            (sum(r[0] for r in others) / len(others), sum(r[1] for r in others) / len(others))
            if others
            else (PRIOR_GROWTH, PRIOR_GROWTH)
        )
        if memo is not None:
            memo["pooled growth"] = pooled
        return pooled

    def _project(self, session: Session, start: float, end: float) -> Cost:
        """The cost of growing the context from C{start} to C{end} and compacting there."""
        step, uncached = self.growth(session)
        steps = max(0.0, end - start) / max(step, 1.0)
        # Each step reads the context so far; the compaction request reads all of it.
        return steps * uncached, steps * (start + end) / 2 + end

    def cycle_cost(self, session: Session) -> Cost:
        """
        The expected cost of the session's next full cycle: the mean of its
        completed ones, else projected from where its cycle began to where
        it will compact, at its observed growth.
        """
        if session.cycle_costs:
            reads = session.cycle_read_costs or [0]
            return sum(session.cycle_costs) / len(session.cycle_costs), sum(reads) / len(reads)
        start = float(session.cycle_base)
        uncached, reads = self._project(session, start, self.compacts_at(session))
        return uncached + session.cycle_base_tokens, reads

    def remaining(self, session: Session) -> Cost:
        """
        What the session's current cycle has still to cost (its
        reservation): projected from its context to where it will compact,
        at least a share of a cycle.
        """
        memo = self._memo
        if memo is not None:
            key = ("remaining", session.key)
            if key not in memo:
                memo[key] = self._remaining(session)
            return memo[key]  # type: ignore[no-any-return]
        return self._remaining(session)

    def _remaining(self, session: Session) -> Cost:
        cycle = self.cycle_cost(session)
        if session.context:
            left = self._project(session, float(session.context), self.compacts_at(session))
        else:
            # No context seen (a state saved before contexts were kept).
            left = (cycle[0] - session.cycle_tokens, cycle[1] - session.cycle_reads)
        return max(left[0], MIN_REMAINING * cycle[0]), max(left[1], MIN_REMAINING * cycle[1])

    def tiny(self, session: Session) -> bool:
        """Still early in its first cycle: its context is little more than where it began, cheap to move."""
        if session.compactions:
            return False
        start = float(session.cycle_base)
        return session.context - start <= TINY * max(0.0, self.compacts_at(session) - start)

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

    def room_share(
        self, account: Account, now: float, session: Session, reserved: Cost | None = None, cost: Cost | None = None
    ) -> float:
        """
        How many of the session's cycles (or of C{cost}) the account has
        room for (its tightest window) beside C{reserved}, by default the
        others' reservations.
        """
        if reserved is None:
            reserved = self.reserved(account, now, apart=session)
        room = self.room(account, now, reserved)
        if cost is None:
            cost = self.cycle_cost(session)
        return min(room[w] / max(self.utilization(account, w, cost), 1e-12) for w in WINDOWS)

    # -- ranking and decisions -------------------------------------------------------

    def rank_key(self, account: Account, session: Session, now: float, fits: bool) -> tuple:
        """
        DESIGN.md point 1: priority; fits the session's next cycle; warm
        with the shared prefix; 5h window already started; most quota left
        in the tightest window (counted in the session's cycles, so that
        accounts of different sizes compare by what they hold, not by their
        utilization fraction); config order.
        """
        last = account.last_used
        warm = last is not None and now - last < session.ttl
        started = account.utilization("5h", now) > 0 or (last is not None and now - last < 5 * 3600)
        room = self.room_share(account, now, session, reserved=(0.0, 0.0)) if account.kind != "apikey" else 0.0
        return (
            account.priority,
            not fits,
            not warm,
            not started,
            # Tenths of a cycle: noise between nearly equal accounts leaves
            # it to config order.
            -round(room * 10),
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
        self,
        session: Session,
        current: Account,
        now: float,
        family: str | None,
        exclude: Callable[[Account], bool],
        idle: bool = False,
    ) -> Account:
        """
        Keep it where it is if that holds its next cycle; else the best that
        does; else (none holds it) the one with room for a good deal more
        of it (L{roomier}); else stay.  After idling past its TTL its own
        cache is cold everywhere and the account it is on has no claim on
        it: the best account that holds its cycle (warm with the prefix
        first), else the roomier one, else stay.
        """
        if not idle and self.fits(current, session, now):
            return current
        return (
            self.best(session, now, family, exclude)
            or self.roomier(session, current, now, family, exclude)
            or current
        )

    def roomier(
        self,
        session: Session,
        current: Account,
        now: float,
        family: str | None,
        exclude: Callable[[Account], bool],
        here_reserved: Cost | None = None,
    ) -> Account | None:
        """
        When no account holds the session's whole next cycle (small
        accounts, or a long cycle): the one with room for the most of it,
        when that is SPREAD_GAIN of a cycle more than it has here
        (the others' reservations count against both; here, only
        C{here_reserved} when given).  Moving while it is cheap beats
        meeting the ceiling here at full context; subscription accounts of
        the same or a better priority only.
        """
        here = self.room_share(current, now, session, reserved=here_reserved)
        roomier = [
            (share, a)
            for a in self._candidates(now, family, lambda a: exclude(a) or a.name == current.name)
            if a.kind != "apikey" and a.priority <= current.priority
            for share in [self.room_share(a, now, session)]
            if share >= here + SPREAD_GAIN
        ]
        return max(roomier, key=lambda pair: (pair[0], -pair[1].order))[1] if roomier else None

    def spread_early(
        self, session: Session, current: Account, now: float, family: str | None, exclude: Callable[[Account], bool]
    ) -> Account | None:
        """
        A tiny session on an account that cannot hold its first cycle
        beside the sessions placed there before it: the best account that
        does, while moving it costs little more than the prefix.  When no
        account holds a whole cycle with the margin (big cycles, small
        accounts), the one with room for a good deal more of it than it
        has here beside those sessions (L{roomier}), if that one still
        holds what is left of this cycle: a move that only delays meeting
        a ceiling is not worth making on early estimates.  Decided once
        its own growth is seen (a few turns), not on the prior's.
        """
        if not self.tiny(session) or current.kind == "apikey" or session.cycle_steps < MIN_STEPS:
            # Decided on the session's own growth, not on the prior's.
            return None
        remaining = self.remaining(session)
        senior = self.reserved(current, now, apart=session, senior_to=session)
        if self.holds(current, remaining, now, senior):
            return None
        best = self.best(session, now, family, lambda a: exclude(a) or a.name == current.name)
        if best is None:
            best = self.roomier(session, current, now, family, exclude, here_reserved=senior)
            if best is not None and self.room_share(best, now, session, cost=remaining) < 1.0:
                return None
        return best

    # -- persistence ---------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "ledgers": {
                name: {w: ledger.windows[w].to_json() for w in WINDOWS}
                for name, ledger in self.ledgers.items()
                if self.pool.get(name) is not None
            },
            "compactionContexts": list(self.compaction_contexts),
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
        contexts = state.get("compactionContexts")
        if isinstance(contexts, list):
            self.compaction_contexts = [c for c in contexts if type(c) is int and c > 0][-KEPT_COMPACTIONS:]

    def forget(self, name: str) -> None:
        self.ledgers.pop(name, None)


def _finite(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
