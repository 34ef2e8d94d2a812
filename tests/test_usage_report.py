"""
Tests for `nextclaude usage` (nextclaude.usage_report): prices by model-id
prefix with the cache multipliers, the periods, the grouping, and the
command against a real database with no proxy running.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nextclaude.cli import build_parser
from nextclaude.history import HistoryDatabase, history_path
from nextclaude.usage_report import (
    PRICE_TABLE_DATE,
    parse_when,
    price_of,
    price_table,
    report,
    request_value,
    run_usage,
)

# 2026-09-21 12:00 UTC
NOON = 20_717 * 86400.0 + 12 * 3600


def row(when: float, account: str = "a", model: str | None = "claude-sonnet-4-5-20250929", **extra: Any) -> tuple[Any, ...]:
    values = {
        "session": "s:1", "client": "claude-cli", "status": 200, "reason": "affinity", "duration": 1.0,
        "input": 1_000, "created": 10_000, "created_1h": 0, "read": 100_000, "output": 2_000, "ttl": 300.0,
        "main": 1, "moved": 0, "rebilled": 0, "naive": 0,
    }
    values.update(extra)
    return (
        when, values["session"], values["client"], account, model, values["status"], values["reason"],
        values["duration"], values["input"], values["created"], values["created_1h"], values["read"],
        values["output"], values["ttl"], values["main"], values["moved"], values["rebilled"], values["naive"],
    )


class PriceTests(SynchronousTestCase):
    def test_longest_prefix_wins(self) -> None:
        """
        Opus 4.5 is not priced as Opus 4, dated ids match their family,
        an unknown model has no price, and the config's prices override
        and extend the table.
        """
        table = price_table()
        self.assertEqual(price_of("claude-opus-4-5-20251101", table), (5.0, 25.0))
        self.assertEqual(price_of("claude-opus-4-1-20250805", table), (15.0, 75.0))
        self.assertEqual(price_of("claude-opus-4-20250514", table), (15.0, 75.0))
        self.assertEqual(price_of("claude-sonnet-4-5-20250929", table), (3.0, 15.0))
        self.assertEqual(price_of("claude-haiku-4-5-20251001", table), (1.0, 5.0))
        self.assertEqual(price_of("claude-3-5-haiku-20241022", table), (0.8, 4.0))
        self.assertIsNone(price_of("gpt-4o", table))
        custom = price_table([("gpt-4o", 2.5, 10.0), ("claude-sonnet-4-5", 1.0, 1.0)])
        self.assertEqual(price_of("gpt-4o-mini", custom), (2.5, 10.0))
        self.assertEqual(price_of("claude-sonnet-4-5-20250929", custom), (1.0, 1.0))

    def test_cache_multipliers(self) -> None:
        """
        Cache writes cost 1.25x input (5 minutes) or 2x (1 hour, from the
        response's split, else from the TTL asked for), reads 0.1x.
        """
        table = price_table([("m", 1.0, 10.0)])
        million = 1_000_000
        self.assertAlmostEqual(request_value("m", million, 0, 0, 0, million, None, table), 11.0)
        self.assertAlmostEqual(request_value("m", 0, million, 0, 0, 0, 300.0, table), 1.25)
        self.assertAlmostEqual(request_value("m", 0, million, million, 0, 0, 300.0, table), 2.0)
        self.assertAlmostEqual(request_value("m", 0, million, 0, 0, 0, 3600.0, table), 2.0)
        self.assertAlmostEqual(request_value("m", 0, 0, 0, million, 0, None, table), 0.1)
        self.assertIsNone(request_value("other", 1, 1, 0, 1, 1, None, table))


class PeriodTests(SynchronousTestCase):
    def test_dates_and_days(self) -> None:
        """
        C{7d} starts at local midnight six days before today, a date at its
        own midnight; anything else is refused.
        """
        today = time.mktime(time.strptime("2026-09-21", "%Y-%m-%d"))
        now = today + 12 * 3600
        self.assertEqual(parse_when("1d", now), today)
        self.assertEqual(parse_when("7d", now), time.mktime(time.strptime("2026-09-15", "%Y-%m-%d")))
        self.assertEqual(parse_when("2026-09-01", now), time.mktime(time.strptime("2026-09-01", "%Y-%m-%d")))
        for bad in ("0d", "yesterday", "2026-13-01", "7"):
            self.assertRaises(ValueError, parse_when, bad, now)


    def test_too_many_days(self) -> None:
        """
        More days than allowed is refused as out of range, naming the
        range, not as if it were not a number of days; the most allowed
        works.
        """
        now = time.mktime(time.strptime("2026-09-21", "%Y-%m-%d")) + 12 * 3600
        error = self.assertRaises(ValueError, parse_when, "100000d", now)
        self.assertIn("out of range", str(error))
        self.assertIn("1d to 9999d", str(error))
        self.assertNotIn("number of days as 7d", str(error))
        self.assertLess(parse_when("9999d", now), now)


class ReportTests(SynchronousTestCase):
    def test_grouping(self) -> None:
        """
        Rows group by day (in order), account, model family (the id
        without its date) or client, with a total; unknown models count
        as unpriced; a request no account took (the proxy's own 429) is
        the account "(none)".
        """
        columns = ("time", "session", "client", "account", "model", "status", "reason", "duration",
                   "input_tokens", "cache_creation_tokens", "cache_creation_1h_tokens", "cache_read_tokens",
                   "output_tokens", "cache_ttl", "main", "moved", "rebilled", "naive_rebilled")
        data = [
            dict(zip(columns, row(NOON, "a"))),
            dict(zip(columns, row(NOON + 86400, "b", moved=1, rebilled=50_000, naive=200_000))),
            dict(zip(columns, row(NOON + 86400, "b", model="mystery-model", client="curl"))),
        ]
        table = price_table()
        days, total = report(data, "day", table, time.gmtime)
        self.assertEqual([g.key for g in days], ["2026-09-21", "2026-09-22"])
        self.assertEqual((total.requests, total.moves, total.rebilled, total.naive, total.saved), (3, 1, 50_000, 200_000, 150_000))
        self.assertEqual(total.unpriced_models, {"mystery-model"})
        models, _ = report(data, "model", table, time.gmtime)
        self.assertEqual([g.key for g in models], ["claude-sonnet-4-5", "mystery-model"])
        self.assertIsNone(models[1].to_json()["apiValueUsd"])
        clients, _ = report(data, "client", table, time.gmtime)
        self.assertEqual({g.key for g in clients}, {"claude-cli", "curl"})
        accounts, _ = report(data, "account", table, time.gmtime)
        self.assertEqual([g.key for g in accounts], ["b", "a"])
        refused = dict(zip(columns, row(NOON, None, status=429, reason="exhausted", input=0, created=0, read=0, output=0)))
        accounts, _ = report([*data, refused], "account", table, time.gmtime)
        self.assertEqual({g.key for g in accounts}, {"b", "a", "(none)"})


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = Path(self.mktemp()).absolute() / "config.json"
        self.config.parent.mkdir()
        database = HistoryDatabase(history_path(self.config))
        database.insert([row(NOON), row(NOON + 60, "b", moved=1, rebilled=20_000, naive=140_000)])
        database.insert([row(NOON - 30 * 86400)])
        database.close()

    def usage(self, *argv: str) -> tuple[int, str]:
        args = build_parser().parse_args(["--config", str(self.config), "usage", *argv])
        out = io.StringIO()
        code = run_usage(args, now=NOON + 3600, localtime=time.gmtime, out=out)
        return code, out.getvalue()

    def test_table_with_the_proxy_stopped(self) -> None:
        """
        The default is the last seven days by day: one line per day and a
        total, the naive figures marked as estimates, the price table's
        date printed; nothing is written beside the database.
        """
        before = sorted(p.name for p in self.config.parent.iterdir())
        code, text = self.usage()
        self.assertEqual(code, 0)
        self.assertIn("2026-09-21", text)
        self.assertNotIn("2026-08-22", text)
        self.assertIn("naive≈", text)
        self.assertIn("an estimate", text)
        self.assertIn(PRICE_TABLE_DATE, text)
        self.assertIn("140k", text)
        self.assertEqual(sorted(p.name for p in self.config.parent.iterdir()), before)

    def test_json_and_csv(self) -> None:
        """
        --json gives the rows, the total and the price table's date;
        --since reaches back to older rows; --csv one row per group.
        """
        code, text = self.usage("--json", "--since", "60d", "--by", "account")
        self.assertEqual(code, 0)
        data = json.loads(text)
        self.assertEqual(data["total"]["requests"], 3)
        self.assertEqual(data["total"]["savedEstimate"], 120_000)
        self.assertTrue(data["naiveIsEstimate"])
        self.assertEqual(data["prices"]["date"], PRICE_TABLE_DATE)
        self.assertGreater(data["total"]["apiValueUsd"], 0)
        code, text = self.usage("--csv", "--until", "2026-09-21")
        lines = text.splitlines()
        self.assertEqual(lines[0].split(",")[0], "day")
        self.assertEqual(lines[-1].split(",")[:2], ["total", "2"])

    def test_no_history_and_bad_dates(self) -> None:
        """
        Without a database the command says where it would be and fails;
        a malformed date is a usage error.
        """
        self.config = self.config.parent / "other" / "config.json"
        self.assertEqual(self.usage()[0], 1)
        self.assertEqual(self.usage("--since", "last week")[0], 2)
