"""
Tests for nextclaude.family: the floor of issue 11 (item 5) on hand-made
burn timelines, and the acceptance verdicts.  The family run itself is a
benchmark (python -m nextclaude.replay --family), not part of the suite.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from nextclaude.family import FIVE_HOURS, Cell, Reference, Row, Shape, _openings, floor
from nextclaude.router import FULL, SEQUENTIAL
from nextclaude.workload import RunResult, UpstreamSpec, WorkloadSpec

PREFIX, SUBAGENT = 14_000, 7_000


def reference(burns: list[tuple[float, float]], warm: bool = True, subagent_warm: bool = True) -> Reference:
    """A task's burn timeline; every main (subagent) request read its prefix from the cache when warm."""
    times = [at for at, _ in burns]
    return Reference(
        RunResult(), tuple(burns), PREFIX, SUBAGENT,
        tuple((at, warm) for at in times), tuple((at, subagent_warm) for at in times),
    )


def shape(subagents: bool = True) -> Shape:
    return Shape("test", WorkloadSpec(subagents=subagents), UpstreamSpec(), 1.0)


class FloorTests(SynchronousTestCase):
    def test_one_account_enough_costs_nothing(self) -> None:
        """A task that one account holds opens one account: the floor is 0."""
        upstream = UpstreamSpec(accounts=2, five_hour_tokens=1_000)
        self.assertEqual(floor(shape(), upstream, reference([(0.0, 300.0), (10.0, 300.0)])), 0)

    def test_each_further_account_costs_its_prefixes(self) -> None:
        """
        Each account opened after the first costs the shared prefix, and
        the subagents' prefix when the shape has subagents.
        """
        upstream = UpstreamSpec(accounts=3, five_hour_tokens=100_000)
        burns = [(float(t), 40_000.0) for t in range(5)]
        self.assertEqual(_openings(burns, [(99_500.0, 995_000.0)] * 3, (0, 1, 2)), [0.0, 3.0])
        self.assertEqual(floor(shape(), upstream, reference(burns)), PREFIX + SUBAGENT)
        self.assertEqual(floor(shape(subagents=False), upstream, reference(burns)), PREFIX)

    def test_the_re_bill_burns_quota_on_the_account_opened(self) -> None:
        """
        The prefixes re-billed on an account opened burn its quota like any
        cache creation: a task that fills two accounts but for that opens
        a third, and the floor counts both re-bills.
        """
        upstream = UpstreamSpec(accounts=3, five_hour_tokens=100_000)
        burns = [(float(t), 30_000.0) for t in range(8)]
        # Without the re-bill: 4 bursts per account, the second account holds the rest.
        self.assertEqual(_openings(burns, [(99_500.0, 995_000.0)] * 3, (0, 1, 2)), [0.0, 4.0])
        self.assertEqual(
            _openings(burns, [(99_500.0, 995_000.0)] * 3, (0, 1, 2), lambda at: PREFIX + SUBAGENT), [0.0, 4.0, 7.0]
        )
        self.assertEqual(floor(shape(), upstream, reference(burns)), 2 * (PREFIX + SUBAGENT))
        # Where creation weighs no more than a cache read, the re-bill burns nothing.
        free = UpstreamSpec(accounts=3, five_hour_tokens=100_000, cache_read_weight=1.0)
        self.assertEqual(floor(shape(), free, reference(burns)), PREFIX + SUBAGENT)

    def test_re_entry_after_a_reset_is_an_opening(self) -> None:
        """Coming back to an account after its 5-hour window reset opens it again."""
        caps = [(995.0, 9_950.0)] * 2
        # Both full by t=4 (that burn finds no room); the first resets first.
        burns = [(float(t), 600.0) for t in range(5)] + [(FIVE_HOURS + 1.0, 600.0)]
        self.assertEqual(_openings(burns, caps, (0, 1)), [0.0, 2.0, FIVE_HOURS + 1.0])

    def test_best_order_uses_the_big_account_first(self) -> None:
        """The floor is the minimum over account orders: a big account first may need no other."""
        upstream = UpstreamSpec(accounts=2, five_hour_tokens=1_000, sizes=(1.0, 5.0))
        burns = [(float(t), 500.0) for t in range(8)]
        self.assertEqual(floor(shape(), upstream, reference(burns)), 0)

    def test_a_cold_prefix_is_no_re_bill(self) -> None:
        """
        An opening while the single account's prefix had gone cold anyway
        (the next request there re-created it too) costs nothing extra.
        """
        upstream = UpstreamSpec(accounts=3, five_hour_tokens=100_000)
        burns = [(float(t), 40_000.0) for t in range(5)]
        self.assertEqual(floor(shape(), upstream, reference(burns, subagent_warm=False)), PREFIX)
        self.assertEqual(floor(shape(), upstream, reference(burns, warm=False, subagent_warm=False)), 0)


class VerdictTests(SynchronousTestCase):
    def row(self, excess: int, floor_: int, fixed: bool = True, client_429s: int = 0, done: int = 10) -> Row:
        cells = {
            FULL: Cell(FULL, excess, 0, client_429s, done, 10, 0),
            SEQUENTIAL: Cell(SEQUENTIAL, 0, 0, 0, 10, 10, 0),
        }
        base = shape()
        return Row(Shape(base.name, base.spec, base.upstream, base.need, fixed), floor_, PREFIX, cells)

    def test_bound_is_a_quarter_over_the_floor_or_one_prefix(self) -> None:
        """A fixed shape passes within 1.25 x its floor; a floor of 0 allows one prefix."""
        self.assertEqual(self.row(26_250, 21_000).verdict(), "ok")
        self.assertEqual(self.row(26_251, 21_000).verdict(), "OVER")
        self.assertEqual(self.row(PREFIX, 0).verdict(), "ok")
        self.assertEqual(self.row(PREFIX + 1, 0).verdict(), "OVER")
        self.assertEqual(self.row(99_000, 0, fixed=False).verdict(), "ok")

    def test_a_429_or_an_unfinished_turn_fails(self) -> None:
        """On a shape that fits, a client 429 or a turn not done is a failure whatever the excess."""
        self.assertEqual(self.row(0, 0, client_429s=1).verdict(), "FAIL")
        self.assertEqual(self.row(0, 0, done=9).verdict(), "FAIL")
