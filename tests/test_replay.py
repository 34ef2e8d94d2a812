"""
The routing policy priced on the standard workload by the fast replay: the
issue's targets, kept as a regression test.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.trial.unittest import SynchronousTestCase

from nextclaude.replay import replay
from nextclaude.router import ARMING, FULL, NAIVE
from nextclaude.workload import STANDARD, STANDARD_UPSTREAM, Workload


class StandardWorkloadTests(SynchronousTestCase):
    def test_placement_meets_the_targets(self) -> None:
        """
        On the standard workload the real policy completes every turn with
        no 429 reaching the client, re-bills at most 77k tokens over one
        unlimited account and at most a quarter of the naive baseline's
        excess, and beats plain arming (placement with reservations pays for
        itself).
        """
        baseline = Workload(STANDARD).baseline_tokens(STANDARD_UPSTREAM)
        full, arming, naive = (
            replay(policy, STANDARD, STANDARD_UPSTREAM, baseline=baseline) for policy in (FULL, ARMING, NAIVE)
        )
        for report in (full, arming, naive):
            self.assertEqual(report.result.turns_done, STANDARD.sessions * STANDARD.turns, report.policy)
            self.assertEqual(report.result.client_429s, 0, report.policy)
        self.assertLessEqual(full.excess, 77_000)
        self.assertLessEqual(full.excess * 4, naive.excess)
        self.assertLess(full.excess, arming.excess)

    def test_no_switch_needed_costs_nothing(self) -> None:
        """
        When one account's quota is enough for the whole workload, the
        policy never moves a session and re-bills nothing.
        """
        upstream = replace(STANDARD_UPSTREAM, five_hour_tokens=10_000_000)
        spec = replace(STANDARD, turns=30)
        report = replay(FULL, spec, upstream)
        self.assertEqual(report.switches, 0)
        self.assertEqual(report.excess, 0)
