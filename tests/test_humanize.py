from twisted.trial.unittest import SynchronousTestCase

from nextclaude.humanize import duration, tier_label, tokens


class HumanizeTests(SynchronousTestCase):
    def test_durations(self) -> None:
        """
        Durations show at most two units, largest first (years past 365
        days, years alone past a century), and never go negative.
        """
        for seconds, text in [
            (-5, "0s"),
            (0, "0s"),
            (40, "40s"),
            (60, "1m"),
            (12 * 60 + 5, "12m"),
            (3 * 3600, "3h"),
            (4 * 3600 + 16 * 60, "4h16m"),
            (5 * 86400 + 3 * 3600 + 59, "5d3h"),
            (2 * 86400, "2d"),
            (364 * 86400, "364d"),
            (365 * 86400, "1y"),
            (26694 * 86400 + 3 * 3600, "73y49d"),
            (150 * 365 * 86400 + 20 * 86400, "150y"),
        ]:
            self.assertEqual(duration(seconds), text, seconds)

    def test_tokens(self) -> None:
        """
        Token counts are shortened to k and M with at most one decimal.
        """
        for count, text in [
            (0, "0"),
            (950, "950"),
            (1000, "1k"),
            (44_300, "44.3k"),
            (120_000, "120k"),
            (2_200_000, "2.2M"),
            (3_000_000, "3M"),
        ]:
            self.assertEqual(tokens(count), text, count)

    def test_tier_labels(self) -> None:
        """
        One word for a tier nobody named: "subscription" for an OAuth
        account, "API" for a key; a known tier is shown as it is.
        """
        self.assertEqual(tier_label(None, "oauth"), "subscription")
        self.assertEqual(tier_label("", "oauth"), "subscription")
        self.assertEqual(tier_label(None, "apikey"), "API")
        self.assertEqual(tier_label("Max", "oauth"), "Max")
