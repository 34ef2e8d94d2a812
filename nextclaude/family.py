"""
The workload family: many Claude-Code-shaped workloads, each priced for
every routing policy on the pure replay (issue 11, item 5).

    python -m nextclaude.replay --family [--random N] [--jobs N] [--only NAME]

A L{Shape} is a workload (L{WorkloadSpec}) and an upstream
(L{UpstreamSpec}) whose 5-hour quota is sized from the task itself: the
shape says how many base (Pro-sized) windows the whole task needs, measured
on one unlimited account with the shape's own quota formula, so a shape
keeps its meaning whatever its token sizes.  For each shape the table gives
the excess cache creation of every policy over one unlimited account, the
I{floor} (the least excess any policy can reach: (accounts opened − 1) ×
the shared prefix, a re-entry after a window reset counting as an opening),
the quota stranded in started windows nobody uses, client 429s, and turns
done of turns asked.  A shape I{fits} when the sequential baseline finishes
it with no client 429.

Pure apart from the process pool: time is virtual, every shape is seeded.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from nextclaude.placement import COMPACTION_RESERVE, MODEL_WINDOWS
from nextclaude.pool import Thresholds
from nextclaude.router import ARMING, FULL, NAIVE, SEQUENTIAL
from nextclaude.simulate import FIVE_HOURS, SEVEN_DAYS, SimAnswer
from nextclaude.workload import MAIN_KINDS, PlannedRequest, RunResult, UpstreamSpec, Workload, WorkloadSpec, drive

FAMILY_POLICIES = (FULL, ARMING, NAIVE, SEQUENTIAL)
POLICY_COLUMNS = {FULL: "NextClaude", ARMING: "arming", NAIVE: "naive", SEQUENTIAL: "sequential"}
# A session that fails this many times in a row is given up (about 4.5 h of
# 55 s retry-afters): shapes that do not fit end instead of retrying for days.
MAX_FAILURES = 300
# The acceptance bound of issue 11 (item 7) on the fixed shapes.
FLOOR_FACTOR = 1.25


@dataclass(frozen=True)
class Shape:
    """
    One workload of the family.  C{need} is the task's quota need in base
    5-hour windows (an account of size 1); the upstream's
    C{five_hour_tokens} is set from it.
    """

    name: str
    spec: WorkloadSpec
    upstream: UpstreamSpec
    need: float
    fixed: bool = True

    def describe(self) -> str:
        return f"{self.name}: {self.spec.describe()}; {self.upstream.describe()}; need {self.need:g} base windows"


def _shape(name: str, need: float, upstream: dict | None = None, **spec: object) -> Shape:
    base = {"sessions": 3, "turns": 100, "seed": 11}
    base.update(spec)
    return Shape(name, WorkloadSpec(**base), UpstreamSpec(**(upstream or {})), need)  # type: ignore[arg-type]


# Where Claude Code compacts by default: the model's window less its ~13k
# reserve (PROTOCOL.md).  Users may make it compact sooner (a setting, or
# /compact), so the family also compacts at 60k-150k; a policy tuned only
# to early compactions would misjudge the default.
DEFAULT_COMPACTION = MODEL_WINDOWS[0] - COMPACTION_RESERVE

# Quota formulas of item 5: cache reads free or 0.1-weighted, the newest
# message billed as input or as cache creation, output x1 or x5.
WEIGHTED = {"cache_read_weight": 0.1, "output_weight": 5.0, "creation_weight": 1.25}


def fixed_shapes() -> list[Shape]:
    """The named shapes; none of them is the one the policy was first tuned on."""
    return [
        _shape("one long session", 2.0, turns=300, sessions=1),
        _shape("two, small cycles", 1.5, sessions=2, turns=120, tokens_per_turn=1_500, compact_above=60_000),
        _shape("three sessions", 2.0),
        _shape("five sessions", 2.8, {"accounts": 4}, sessions=5, turns=80),
        _shape("eight sessions", 1.5, sessions=8, turns=40),
        _shape("staggered starts", 2.0, stagger=1_200.0),
        _shape("no side traffic", 2.0, side_requests=False, subagents=False),
        _shape("6k turns, compaction 150k", 2.0, turns=80, tokens_per_turn=6_000, compact_above=150_000),
        _shape("compaction at the default", 2.0, turns=120, compact_above=DEFAULT_COMPACTION),
        _shape("1h TTL", 2.0, ttl="1h", seed=12),
        _shape("idle gaps, 5m TTL", 2.0, idle_rate=0.05, idle_gap=420.0, seed=13),
        _shape("idle gaps, 1h TTL", 2.0, {"cache_ttl_default": 3600.0}, ttl="1h", idle_rate=0.04, idle_gap=3_900.0),
        _shape("Pro + Max 5x", 3.5, {"accounts": 2, "sizes": (1.0, 5.0)}, sessions=4, turns=90),
        _shape("Pro, Pro, Max 5x", 4.5, {"accounts": 3, "sizes": (1.0, 1.0, 5.0)}),
        _shape("five accounts", 2.5, {"accounts": 5}, sessions=5, turns=60, seed=14),
        _shape("weighted quota", 2.0, WEIGHTED, seed=15),
        _shape("newest as input, reads 0.1", 2.0, {"honour_breakpoints": False, "cache_read_weight": 0.1}),
        _shape("readings in 0.05 steps", 2.0, {"utilization_step": 0.05}, seed=16),
        _shape("across a window reset", 3.2, turns=260, think_time=60.0, seed=17),
        _shape(
            "1M context on Pro accounts", 1.5,
            {"accounts": 4, "utilization_step": 0.01},
            sessions=2, turns=60, tokens_per_turn=20_000, compact_above=950_000, summary_tokens=8_000,
        ),
    ]


def random_shapes(count: int, seed: int = 2026) -> list[Shape]:
    """
    Seeded random shapes over the whole space of item 5, for checking on
    workloads nobody tuned on.
    """
    rng = random.Random(seed)
    shapes = []
    for index in range(count):
        accounts = rng.randint(2, 5)
        sizes = tuple(rng.choice((1.0, 1.0, 5.0, 20.0)) for _ in range(accounts)) if rng.random() < 0.4 else None
        tokens_per_turn = rng.choice((1_500, 3_000, 4_500, 6_000))
        compact_above = rng.choice((60_000, 100_000, 150_000, DEFAULT_COMPACTION))
        ttl = rng.choice(("5m", "1h"))
        spec = WorkloadSpec(
            sessions=rng.choice((1, 2, 3, 4, 5, 6, 8)),
            turns=rng.randint(30, 110),
            tokens_per_turn=tokens_per_turn,
            compact_above=compact_above,
            ttl=ttl,
            seed=1000 + index,
            side_requests=rng.random() < 0.8,
            subagents=rng.random() < 0.8,
            stagger=rng.choice((0.0, 0.0, 300.0, 1_500.0)),
            idle_rate=rng.choice((0.0, 0.0, 0.04)),
            idle_gap=(420.0 if ttl == "5m" else 3_900.0),
            think_time=rng.choice((10.0, 20.0, 40.0)),
        )
        upstream = UpstreamSpec(
            accounts=accounts,
            sizes=sizes,
            cache_ttl_default=3600.0 if ttl == "1h" and rng.random() < 0.5 else 300.0,
            cache_read_weight=rng.choice((0.0, 0.1)),
            honour_breakpoints=rng.random() < 0.7,
            output_weight=rng.choice((1.0, 5.0)),
            creation_weight=rng.choice((1.0, 1.25)),
            utilization_step=rng.choice((0.0, 0.01, 0.05)),
        )
        mean_size = (sum(sizes) / accounts) if sizes else 1.0
        need = round(rng.uniform(1.5, max(1.5, min(3.5, accounts - 0.8))) * mean_size, 2)
        shapes.append(Shape(f"random {index + 1}", spec, upstream, need, fixed=False))
    return shapes


# -- the unlimited run: the reference bill and the burn timeline ----------------


@dataclass(frozen=True)
class Reference:
    """The shape on one account that never runs out: its bill and its quota burn over time."""

    result: RunResult
    burns: tuple[tuple[float, float], ...]
    prefix_tokens: int
    subagent_prefix_tokens: int
    # When each main and each subagent request was sent, and whether its
    # prefix (the shared one, the subagents' own) was read from the cache.
    prefix_reads: tuple[tuple[float, bool], ...] = ()
    subagent_prefix_reads: tuple[tuple[float, bool], ...] = ()

    @property
    def total_burn(self) -> float:
        return sum(burn for _, burn in self.burns)


def reference(shape: Shape) -> Reference:
    workload = Workload(shape.spec)
    sim = shape.upstream.unlimited().build()
    account = sim.accounts[0]
    credentials = account.credential_headers()
    burns: list[tuple[float, float]] = []
    reads: dict[str, list[tuple[float, bool]]] = {"main": [], "subagent": []}
    prefixes = {"main": workload.prefix_tokens, "subagent": workload.subagent_prefix_tokens}

    def send(request: PlannedRequest, now: float) -> SimAnswer:
        before = account.used_7d
        answer = sim.answer({**request.headers, **credentials}, request.data, now, path=request.path)
        if account.used_7d > before:
            burns.append((now, account.used_7d - before))
        kind = "subagent" if request.kind == "subagent" else "main" if request.kind in MAIN_KINDS else None
        if kind is not None and answer.usage is not None:
            read = answer.usage.get("cache_read_input_tokens", 0)
            reads[kind].append((now, read >= prefixes[kind]))
        return answer

    result = drive(workload, send)
    return Reference(
        result, tuple(burns), workload.prefix_tokens, workload.subagent_prefix_tokens,
        tuple(reads["main"]), tuple(reads["subagent"]),
    )


def sized(shape: Shape, ref: Reference) -> UpstreamSpec:
    """The shape's upstream with its base 5-hour window sized from the task's need."""
    return replace(shape.upstream, five_hour_tokens=max(1, round(ref.total_burn / shape.need)))


def floor(shape: Shape, upstream: UpstreamSpec, ref: Reference, hard: float = Thresholds().hard) -> int:
    """
    The least excess any policy can reach (issue 11): the minimum over
    account orders of what the accounts opened after the first cost, using
    them one after another as the task's burn arrives (an account's windows
    start at its first use and reset 5 h / 7 d later; a re-entry after a
    reset is an opening).  Moving right after a compaction re-bills no more
    than the shared prefix on the account opened, plus the subagents' own
    prefix when subagents run, so no policy can do better; and only what
    the single account would have read from its cache is a re-bill: an
    opening while the prefix had gone cold there anyway (every session idle
    past the TTL, subagents minutes apart) costs nothing extra.  A re-bill
    burns quota on the account opened like any cache creation (at the
    upstream's creation weight, less the cache-read weight the single
    account paid for reading it): a task with no room to spare for it
    opens one account more, whatever the policy.
    """
    sim = upstream.build()
    caps = [(hard * a.five_hour_tokens, hard * a.seven_day_tokens) for a in sim.accounts]
    parts = [(ref.prefix_tokens, ref.prefix_reads)]
    if shape.spec.subagents:
        parts.append((ref.subagent_prefix_tokens, ref.subagent_prefix_reads))
    weight = upstream.creation_weight - upstream.cache_read_weight

    def re_bill(at: float) -> int:
        return sum(tokens * _warm_after(reads, at) for tokens, reads in parts)

    best: float | None = None
    for order in itertools.permutations(range(len(caps))):
        times = _openings(ref.burns, caps, order, lambda at: weight * re_bill(at))[1:]
        cost = sum(re_bill(at) for at in times)
        best = cost if best is None else min(best, cost)
    return int(best or 0)


def _warm_after(reads: Sequence[tuple[float, bool]], at: float) -> bool:
    """Whether the first such request at or after C{at} read its prefix from the cache (True when none follows)."""
    index = bisect.bisect_left(reads, (at, False))
    return reads[index][1] if index < len(reads) else False


def _openings(
    burns: Iterable[tuple[float, float]],
    caps: Sequence[tuple[float, float]],
    order: Sequence[int],
    opening_burn: Callable[[float], float] = lambda at: 0.0,
) -> list[float]:
    """
    When each account is opened (the first at the first burn), using them
    in C{order}, each while below its caps; an account opened after the
    first also burns C{opening_burn(time)} (its re-bill) as it opens.
    """
    n = len(caps)
    used = [[0.0, 0.0] for _ in range(n)]
    starts: list[list[float | None]] = [[None, None] for _ in range(n)]
    lengths = (FIVE_HOURS, SEVEN_DAYS)
    current: int | None = None
    openings: list[float] = []
    for now, burn in burns:
        for account in range(n):
            for w in (0, 1):
                start = starts[account][w]
                if start is not None and now >= start + lengths[w]:
                    starts[account][w], used[account][w] = None, 0.0

        def room(account: int) -> bool:
            return all(used[account][w] < caps[account][w] for w in (0, 1))

        if current is None or not room(current):
            position = order.index(current) if current is not None else -1
            candidates = [order[(position + k) % n] for k in range(1, n + 1)]
            chosen = next((a for a in candidates if room(a)), None)
            if chosen is None:
                continue
            current = chosen
            openings.append(now)
            if len(openings) > 1:
                for w in (0, 1):
                    if starts[current][w] is None:
                        starts[current][w] = now
                    used[current][w] += opening_burn(now)
        for w in (0, 1):
            if starts[current][w] is None:
                starts[current][w] = now
            used[current][w] += burn
    return openings


# -- running the family -------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One policy on one shape."""

    policy: str
    excess: int
    stranded: int
    client_429s: int
    turns_done: int
    turns_planned: int
    switches: int


@dataclass(frozen=True)
class Row:
    shape: Shape
    floor: int
    prefix: int
    cells: dict[str, Cell]

    @property
    def fits(self) -> bool:
        return self.cells[SEQUENTIAL].client_429s == 0 if SEQUENTIAL in self.cells else True

    @property
    def bound(self) -> int:
        """The excess allowed on a fixed shape: 1.25 x the floor, one prefix when the floor is 0."""
        return math.floor(FLOOR_FACTOR * self.floor) if self.floor else self.prefix

    def verdict(self) -> str:
        cell = self.cells.get(FULL)
        if cell is None or not self.fits:
            return "-"
        served = cell.client_429s == 0 and cell.turns_done == cell.turns_planned
        if not served:
            return "FAIL"
        if self.shape.fixed and cell.excess > self.bound:
            return "OVER"
        return "ok"


def _reference_job(shape: Shape) -> tuple[Reference, UpstreamSpec, int]:
    ref = reference(shape)
    upstream = sized(shape, ref)
    return ref, upstream, floor(shape, upstream, ref)


def _policy_job(args: tuple[Shape, UpstreamSpec, RunResult, str]) -> Cell:
    from nextclaude.replay import replay

    shape, upstream, baseline, policy = args
    report = replay(policy, shape.spec, upstream, baseline=baseline, max_failures=MAX_FAILURES)
    result = report.result
    return Cell(policy, report.excess, report.stranded, result.client_429s, result.turns_done, result.turns_planned, report.switches)


def run_family(shapes: Sequence[Shape], policies: Sequence[str] = FAMILY_POLICIES, jobs: int = 2) -> list[Row]:
    with ProcessPoolExecutor(max_workers=jobs) as executor:
        prepared = list(executor.map(_reference_job, shapes))
        work = [
            (shape, upstream, ref.result, policy)
            for shape, (ref, upstream, _) in zip(shapes, prepared)
            for policy in policies
        ]
        # Longest first, so two workers finish together.
        order = sorted(range(len(work)), key=lambda i: -work[i][0].spec.sessions * work[i][0].spec.turns)
        results = dict(zip(order, executor.map(_policy_job, [work[i] for i in order])))
    rows = []
    for index, (shape, (ref, _upstream, shape_floor)) in enumerate(zip(shapes, prepared)):
        cells = {policy: results[index * len(policies) + k] for k, policy in enumerate(policies)}
        rows.append(Row(shape, shape_floor, ref.prefix_tokens, cells))
    return rows


def _k(tokens: int) -> str:
    return f"{tokens / 1000:.0f}k" if abs(tokens) >= 1000 else str(tokens)


def table(rows: Sequence[Row], policies: Sequence[str] = FAMILY_POLICIES) -> str:
    """The family as one text table: excess per policy, floor, stranded, 429s, turns."""
    names = [POLICY_COLUMNS[p] for p in policies]
    head = (
        f"{'shape':<28} {'s/a':>4} {'floor':>6} "
        + " ".join(f"{name:>10}" for name in names)
        + f" {'stranded':>9} {'429s ' + '/'.join(n[:3] for n in names):>22} {'turns ' + '/'.join(n[:3] for n in names):>34} {'fits':>4}  NC"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = [row.cells[p] for p in policies]
        shape = row.shape
        lines.append(
            f"{shape.name[:28]:<28} {shape.spec.sessions}/{shape.upstream.accounts:<2} {_k(row.floor):>6} "
            + " ".join(f"{_k(c.excess):>10}" for c in cells)
            + f" {_k(row.cells[policies[0]].stranded):>9}"
            + f" {'/'.join(str(c.client_429s) for c in cells):>22}"
            + f" {'/'.join(str(c.turns_done) for c in cells) + ' of ' + str(cells[0].turns_planned):>34}"
            + f" {'yes' if row.fits else 'no':>4}  {row.verdict()}"
        )
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    fixed = [row for row in rows if row.shape.fixed]
    fitting = [row for row in rows if row.fits]
    failed = [row.shape.name for row in fitting if row.verdict() == "FAIL"]
    over = [row.shape.name for row in fixed if row.verdict() == "OVER"]
    totals = {
        policy: sum(row.cells[policy].excess for row in rows if policy in row.cells) for policy in FAMILY_POLICIES
    }
    return (
        f"shapes {len(rows)} ({len(fixed)} fixed), fitting {len(fitting)}; "
        f"NextClaude: client 429s or unfinished turns on fitting shapes: {failed or 'none'}; "
        f"fixed shapes over {FLOOR_FACTOR} x floor: {over or 'none'}\n"
        "total excess: " + ", ".join(f"{POLICY_COLUMNS[p]} {_k(totals[p])}" for p in FAMILY_POLICIES)
    )


def main(random_count: int = 8, jobs: int = 2, only: str | None = None, seed: int = 2026) -> int:
    shapes = fixed_shapes() + random_shapes(random_count, seed)
    if only:
        shapes = [shape for shape in shapes if only.lower() in shape.name.lower()]
    started = time.perf_counter()
    rows = run_family(shapes, jobs=jobs)
    print(table(rows))
    print()
    print(summary(rows))
    print(f"({len(shapes)} shapes, {time.perf_counter() - started:.0f} s on {jobs} processes)")
    return 0
