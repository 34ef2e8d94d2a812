"""
Tests for the usage history in the console (key h, the header's figures)
and in `nextclaude status` (the History block, the JSON field).
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nextclaude.console.history import history_lines, sparkline
from nextclaude.console.views import line_text
from nextclaude.statusview import render_status
from tests.test_console import ALICE, BOB, NOW, ConsoleHarness, make_snapshot


def history(today_rebilled: int = 12_000, today_naive: int = 150_000) -> dict[str, Any]:
    def totals(requests: int, rebilled: int, naive: int) -> dict[str, int]:
        return {
            "requests": requests,
            "inputTokens": 1_000,
            "cacheCreationTokens": 40_000,
            "cacheReadTokens": 900_000,
            "outputTokens": 9_000,
            "moves": 3,
            "rebilled": rebilled,
            "naiveEstimate": naive,
            "saved": naive - rebilled,
        }

    return {
        "today": totals(91, today_rebilled, today_naive),
        "week": totals(400, 30_000, 420_000),
        "hourStart": NOW - 23 * 3600,
        "accounts": [
            {"name": ALICE, "week": totals(300, 20_000, 0), "hourly": [0] * 20 + [100, 400, 800, 50]},
            {"name": BOB, "week": totals(100, 10_000, 0), "hourly": [800] + [0] * 23},
        ],
        "path": "/x/history.sqlite3",
        "available": True,
        "dropped": 0,
        "lost": 0,
        "naiveIsEstimate": True,
    }


class HistoryViewTests(ConsoleHarness):
    def test_h_opens_and_closes_the_history(self) -> None:
        """
        h shows, at 80x24, each account's 24-hour sparkline (the same scale
        for all) with its week's totals, and today's and the week's
        re-billed tokens beside the naive estimate (marked ≈); h again
        goes back to the dashboard.
        """
        self.make_app(make_snapshot(history=history()))
        self.press("h")
        text = self.text((80, 24))
        self.assertIn("Usage history", text)
        self.assertIn("today: re-billed 12k · naive≈ 150k · saved≈ 138k", text)
        self.assertIn("7 days: re-billed 30k", text)
        alice = self.line_with("····▂▅█▁", (80, 24))
        self.assertIn("re-billed 20k", alice)
        self.assertIn("█" + "·" * 23, self.line_with("re-billed 10k", (80, 24)))
        # ✎ means every cache write elsewhere on screen, not the re-billed share.
        self.assertNotIn("✎20k", alice)
        self.assertIn("h/Esc back", self.screen((80, 24))[-1])
        self.press("h")
        self.assertNotIn("Usage history", self.text((80, 24)))

    def test_header_shows_today(self) -> None:
        """
        The header shows today's re-billed tokens and what was saved
        against the naive estimate (negative when NextClaude re-billed
        more).
        """
        self.make_app(make_snapshot(history=history()))
        self.assertIn("today re-billed 12k · saved≈ 138k", self.text((160, 24)))
        self.make_app(make_snapshot(history=history(today_rebilled=5_000, today_naive=0)))
        self.assertIn("saved≈ −5k", self.text((160, 24)))

    def test_without_history(self) -> None:
        """
        A proxy without a history (an older one) shows no figures in the
        header and says so in the view.
        """
        self.make_app(make_snapshot())
        self.assertNotIn("re-billed", self.text((160, 24)))
        self.press("h")
        self.assertIn("No usage history", self.text((80, 24)))


class PureTests(SynchronousTestCase):
    def test_sparkline(self) -> None:
        """
        Eight levels up to the top of the scale; an empty hour is a dot.
        """
        self.assertEqual(sparkline([0, 1, 50, 100], 100), "·▁▅█")
        self.assertEqual(sparkline([0, 0], 0), "··")

    def test_lines_fit_their_width(self) -> None:
        """
        Every line of the view fits the width it is given.
        """
        for width in (40, 60, 78):
            for line in history_lines(make_snapshot(history=history()), width):
                self.assertLessEqual(len(line_text(line)), width)


class StatusTests(SynchronousTestCase):
    def test_status_prints_the_history_totals(self) -> None:
        """
        `nextclaude status` adds a History block with today's and the
        week's requests, moves, re-billed, the naive estimate and what was
        saved, the estimates marked ≈; no block without a history.
        """
        text = render_status(make_snapshot(history=history()), NOW)
        self.assertIn("History (≈ estimates against naive rotation):", text)
        self.assertIn("  today: 91 reqs · 3 moves · re-billed 12k · naive≈ 150k · saved≈ 138k", text)
        self.assertIn("  7 days: 400 reqs", text)
        self.assertNotIn("History", render_status(make_snapshot(), NOW))
