"""
What moves cost, and what naive rotation would have cost on the same
traffic: the figures behind "re-billed", "naive (estimate)" and "saved".

Everything here works from what the proxy sees of each finished request
(its session, account, usage, and the account's utilization after it): the
proxy has no tokenizer, so sizes are the upstream's own token counts.

  - L{MoveMeter}: a session's I{main thread} (the conversation itself, not
    its side requests or subagents) and what each move of it re-billed.
    prompt = input + cache creation + cache read; new = prompt(this request)
    − prompt(its previous main request); re-billed = max(0, cache creation
    − new).  After a compaction the prompt shrinks: then only the shared
    prefix could have been read from cache, so new = prompt − prefix.  A
    move after the session idled past its cache TTL re-bills nothing: the
    cache was cold on every account.
  - L{NaiveEstimator}: replays the same requests through the naive policy
    (every request on one primary; when its 5-hour utilization reaches the
    switch threshold, everything moves to the account with the most 5-hour
    quota left), each account's capacity taken from its observed
    utilization per unit of usage.  What its moves would have re-billed is
    an I{estimate}, and is labelled so wherever it is shown.

Pure: no reactor, no clock of its own (every record carries its time); the
history writer thread owns one instance of each.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

# The naive policy's thresholds (the router's defaults) and the 5-hour
# window every subscription account has.
DEFAULT_SWITCH = 0.98
WINDOW_5H = 5 * 3600.0
# A session not seen for this long is forgotten: past the longest cache
# TTL (1 h) nothing about it can be re-billed any more.
FORGET_AFTER = 2 * 3600.0
# At most this many sessions are followed (the oldest are forgotten first).
MAX_SESSIONS = 2000
# Prefix sizes remembered for the median.
_PREFIX_SAMPLES = 64


@dataclass(frozen=True)
class Observed:
    """
    One finished request as the savings figures need it.  C{utilization}
    and C{reset} are the serving account's 5-hour window after the
    response (None when unknown, as for API keys).
    """

    time: float
    session: str | None
    account: str | None
    ok: bool
    side: bool = False
    compaction: bool = False
    continuation: bool = False
    ttl: float = 300.0
    input_tokens: int = 0
    cache_creation: int = 0
    cache_read: int = 0
    output_tokens: int = 0
    utilization: float | None = None
    reset: float | None = None

    @property
    def prompt(self) -> int:
        return self.input_tokens + self.cache_creation + self.cache_read

    @property
    def units(self) -> int:
        # What burns quota, as far as anyone can tell from usage: cache
        # reads are left out (their weight is undocumented; the learned
        # scale absorbs whatever they cost on average).
        return self.input_tokens + self.cache_creation + self.output_tokens


@dataclass(frozen=True)
class Measured:
    """
    What L{MoveMeter} says of one request: whether it was on its session's
    main thread, whether the main thread changed account with it, what that
    re-billed, and how much of its prompt it could have read from cache had
    it stayed (C{cached}, for the naive replay).
    """

    main: bool = False
    moved: bool = False
    rebilled: int = 0
    cached: int = 0
    first: bool = False


class PrefixEstimate:
    """
    The shared system+tools prefix, as seen: what a session's first
    request or its first request after a compaction read from cache (the
    only part such a request can read).  The median of recent sightings.
    """

    def __init__(self, samples: list[int] | None = None) -> None:
        self.samples: list[int] = list(samples or [])[-_PREFIX_SAMPLES:]

    def observe(self, read: int) -> None:
        if read > 0:
            self.samples.append(read)
            del self.samples[:-_PREFIX_SAMPLES]

    @property
    def tokens(self) -> int:
        return int(statistics.median(self.samples)) if self.samples else 0


@dataclass
class _Thread:
    account: str | None
    prompt: int
    time: float
    ttl: float
    compaction: bool = False


class MoveMeter:
    """
    Follows each session's main thread.  A request is on it when it is not
    a side request and its prompt continues the thread: at least as large
    as the previous main request's, or the landing after a compaction (it
    opens with the continuation marker, or is the first smaller request
    after a compaction request).  Subagents and titles send prompts of
    their own, smaller than the conversation's, and so fall outside.
    """

    def __init__(self, prefix: PrefixEstimate | None = None) -> None:
        self.prefix = prefix if prefix is not None else PrefixEstimate()
        self._threads: OrderedDict[str, _Thread] = OrderedDict()

    def observe(self, request: Observed) -> Measured:
        key = request.session
        if key is None or not request.ok or request.side or request.account is None:
            return Measured()
        prompt = request.prompt
        thread = self._threads.get(key)
        if thread is None:
            self.prefix.observe(request.cache_read)
            self._remember(key, _Thread(request.account, prompt, request.time, request.ttl, request.compaction))
            return Measured(main=True, first=True)
        landing = prompt < thread.prompt and (request.continuation or thread.compaction)
        if prompt < thread.prompt and not landing:
            return Measured()
        if landing:
            self.prefix.observe(request.cache_read)
            # Had it stayed, only the shared prefix was there to read.
            cached = min(self.prefix.tokens, prompt)
        else:
            cached = thread.prompt
        new = prompt - cached
        moved = request.account != thread.account
        rebilled = 0
        if moved and request.time - thread.time <= thread.ttl:
            rebilled = max(0, request.cache_creation - new)
        warm = request.time - thread.time <= thread.ttl
        self._remember(key, _Thread(request.account, prompt, request.time, request.ttl, request.compaction))
        return Measured(main=True, moved=moved, rebilled=rebilled, cached=cached if warm else 0)

    def _remember(self, key: str, thread: _Thread) -> None:
        threads = self._threads
        threads[key] = thread
        threads.move_to_end(key)
        while threads:
            oldest_key, oldest = next(iter(threads.items()))
            if len(threads) > MAX_SESSIONS or thread.time - oldest.time > FORGET_AFTER:
                del threads[oldest_key]
            else:
                break

    # -- persistence (the history database keeps it across restarts) -------------

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": list(self.prefix.samples),
            "threads": [
                [key, t.account, t.prompt, t.time, t.ttl, t.compaction] for key, t in self._threads.items()
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> MoveMeter:
        meter = cls(PrefixEstimate([int(x) for x in (data or {}).get("prefix", []) if isinstance(x, int)]))
        for row in (data or {}).get("threads", []):
            try:
                key, account, prompt, when, ttl, compaction = row
                meter._threads[str(key)] = _Thread(account, int(prompt), float(when), float(ttl), bool(compaction))
            except (TypeError, ValueError):
                continue
        return meter


@dataclass
class _Account:
    """An account as the naive replay sees it."""

    utilization: float = 0.0  # in the naive world
    window_end: float | None = None
    # The real account's readings, to learn utilization per unit of usage.
    last_reading: float | None = None
    last_reset: float | None = None
    rise: float = 0.0
    units: float = 0.0

    @property
    def scale(self) -> float | None:
        return self.rise / self.units if self.units > 0 and self.rise > 0 else None


@dataclass
class _NaiveSession:
    account: str
    time: float


@dataclass
class NaiveEstimator:
    """
    The naive policy replayed on the recorded traffic.  Call L{observe}
    with each request (in order) and what L{MoveMeter} measured of it; it
    returns the tokens naive rotation would have re-billed on that request.
    """

    switch: float = DEFAULT_SWITCH
    window: float = WINDOW_5H
    accounts: dict[str, _Account] = field(default_factory=dict)
    primary: str | None = None
    sessions: OrderedDict[str, _NaiveSession] = field(default_factory=OrderedDict)
    warm_until: dict[str, float] = field(default_factory=dict)
    prefix: PrefixEstimate = field(default_factory=PrefixEstimate)
    # Subagents and other side threads repeat prompts of their own: what
    # they read when warm, and where the naive world has them warm.
    others: PrefixEstimate = field(default_factory=PrefixEstimate)
    others_warm_until: dict[str, float] = field(default_factory=dict)

    def _mean_scale(self) -> float | None:
        scales = [a.scale for a in self.accounts.values() if a.scale is not None]
        return sum(scales) / len(scales) if scales else None

    def _learn(self, request: Observed) -> None:
        name = request.account
        if name is None:
            return
        account = self.accounts.get(name)
        reading = request.utilization
        if account is None:
            account = self.accounts[name] = _Account()
            if reading is not None:
                # What the account had used before this traffic counts in
                # both worlds; this request's share is the naive world's own.
                scale = self._mean_scale()
                account.utilization = max(0.0, reading - (request.units * scale if scale else 0.0))
        if reading is None:
            return
        same_window = account.last_reset is None or request.reset is None or abs(request.reset - account.last_reset) < 60
        if account.last_reading is not None and same_window and reading >= account.last_reading:
            account.rise += reading - account.last_reading
            account.units += request.units
        account.last_reading, account.last_reset = reading, request.reset

    def _roll(self, now: float) -> None:
        for account in self.accounts.values():
            if account.window_end is not None and now >= account.window_end:
                account.utilization = 0.0
                account.window_end = None

    def observe(self, request: Observed, measured: Measured) -> int:
        if not request.ok or request.account is None:
            return 0
        self._learn(request)
        now = request.time
        self._roll(now)
        if self.primary is None or self.primary not in self.accounts:
            self.primary = request.account
        target = self.primary
        rebilled = 0
        # What the naive world would have read from cache: the prefix of a
        # new session (when the account is warm with it), the whole earlier
        # prompt of a session that stays, only the prefix after a move.
        read = request.cache_read
        if measured.main and request.session is not None:
            warm = self.warm_until.get(target, float("-inf")) >= now
            shared = min(self.prefix.tokens, request.prompt) if warm else 0
            previous = self.sessions.get(request.session)
            if measured.first or previous is None:
                read = shared
            elif previous.account != target and now - previous.time <= request.ttl:
                read = min(shared, measured.cached)
                rebilled = measured.cached - read
            else:
                read = measured.cached
            self.sessions[request.session] = _NaiveSession(target, now)
            self.sessions.move_to_end(request.session)
            self.warm_until[target] = now + request.ttl
            self._forget(now)
        elif not request.side:
            # A request off the main thread: cold where the traffic was
            # spread, but the naive world keeps every thread on one
            # account, where its prompt repeats and so is read.
            self.others.observe(request.cache_read)
            if self.others_warm_until.get(target, float("-inf")) >= now:
                read = max(read, min(self.others.tokens, request.prompt))
            self.others_warm_until[target] = now + request.ttl
        account = self.accounts[target]
        scale = account.scale or self._mean_scale()
        if scale is not None:
            cost = max(0, request.prompt - read) + request.output_tokens
            if account.window_end is None:
                account.window_end = now + self.window
            account.utilization += cost * scale
            if account.utilization >= self.switch:
                self._rotate(target)
        return rebilled

    def _rotate(self, leaving: str) -> None:
        # Naive: the account with the most 5-hour quota left, wherever the
        # sessions' caches are.
        others = [(a.utilization, name) for name, a in self.accounts.items() if name != leaving]
        if others:
            utilization, name = min(others)
            if utilization < self.accounts[leaving].utilization:
                self.primary = name

    def _forget(self, now: float) -> None:
        sessions = self.sessions
        while sessions:
            key, oldest = next(iter(sessions.items()))
            if len(sessions) > MAX_SESSIONS or now - oldest.time > FORGET_AFTER:
                del sessions[key]
            else:
                break

    # -- persistence ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "primary": self.primary,
            "accounts": {
                name: [a.utilization, a.window_end, a.last_reading, a.last_reset, a.rise, a.units]
                for name, a in self.accounts.items()
            },
            "sessions": [[key, s.account, s.time] for key, s in self.sessions.items()],
            "warm": dict(self.warm_until),
            "others": list(self.others.samples),
            "othersWarm": dict(self.others_warm_until),
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any] | None, prefix: PrefixEstimate, switch: float = DEFAULT_SWITCH
    ) -> NaiveEstimator:
        estimator = cls(switch=switch, prefix=prefix)
        data = data or {}
        for name, values in (data.get("accounts") or {}).items():
            try:
                utilization, window_end, reading, reset, rise, units = values
                estimator.accounts[str(name)] = _Account(
                    float(utilization), window_end, reading, reset, float(rise), float(units)
                )
            except (TypeError, ValueError):
                continue
        primary = data.get("primary")
        estimator.primary = primary if isinstance(primary, str) and primary in estimator.accounts else None
        for row in data.get("sessions") or []:
            try:
                key, account, when = row
                estimator.sessions[str(key)] = _NaiveSession(str(account), float(when))
            except (TypeError, ValueError):
                continue
        for name, until in (data.get("warm") or {}).items():
            if isinstance(until, (int, float)):
                estimator.warm_until[str(name)] = float(until)
        estimator.others = PrefixEstimate([int(x) for x in data.get("others") or [] if isinstance(x, int)])
        for name, until in (data.get("othersWarm") or {}).items():
            if isinstance(until, (int, float)):
                estimator.others_warm_until[str(name)] = float(until)
        return estimator


class Savings:
    """
    The meter and the naive replay together, as the history writer runs
    them: one call per finished request, in order.
    """

    def __init__(self, switch: float = DEFAULT_SWITCH, state: Mapping[str, Any] | None = None) -> None:
        state = state or {}
        self.meter = MoveMeter.from_json(state.get("meter"))
        self.naive = NaiveEstimator.from_json(state.get("naive"), self.meter.prefix, switch)

    def observe(self, request: Observed) -> tuple[Measured, int]:
        measured = self.meter.observe(request)
        naive = self.naive.observe(request, measured)
        return measured, naive

    def to_json(self) -> dict[str, Any]:
        return {"meter": self.meter.to_json(), "naive": self.naive.to_json()}
