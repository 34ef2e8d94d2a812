"""
`nextclaude usage`: the usage history (nextclaude.history) per day, account,
model family or client — tokens by kind, cache hit rate, moves, what the
moves re-billed beside the naive-rotation estimate, and what the traffic
would have cost at Anthropic's API list prices.

Reads the database read-only: it works with the proxy stopped or running
and never changes a file.  The grouping and pricing are pure functions.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from nextclaude.humanize import tokens

# The parser is built for every command: the database side is imported
# only when this one runs.
DAY = 86400.0

# API list prices, US dollars per million tokens (input, output), keyed by
# model-id prefix; the longest matching prefix wins, so "claude-opus-4-5"
# is not priced as "claude-opus-4".  From Anthropic's pricing page
# (platform.claude.com/docs/en/about-claude/pricing), as checked on the
# date below; the `prices` config field overrides or extends the table.
PRICE_TABLE_DATE = "2026-11-30"
PRICE_TABLE_SOURCE = "Anthropic API list prices (platform.claude.com/docs/en/about-claude/pricing)"
PRICES: tuple[tuple[str, float, float], ...] = (
    ("claude-opus-5", 5.0, 25.0),
    ("claude-opus-4-8", 5.0, 25.0),
    ("claude-opus-4-7", 5.0, 25.0),
    ("claude-opus-4-6", 5.0, 25.0),
    ("claude-opus-4-5", 5.0, 25.0),
    ("claude-opus-4-1", 15.0, 75.0),
    ("claude-opus-4-0", 15.0, 75.0),
    ("claude-opus-4-2025", 15.0, 75.0),
    ("claude-sonnet-4-6", 3.0, 15.0),
    ("claude-sonnet-4-5", 3.0, 15.0),
    ("claude-sonnet-4-0", 3.0, 15.0),
    ("claude-sonnet-4-2025", 3.0, 15.0),
    ("claude-3-7-sonnet", 3.0, 15.0),
    ("claude-haiku-4-5", 1.0, 5.0),
    ("claude-3-5-haiku", 0.80, 4.0),
    ("claude-3-opus", 15.0, 75.0),
    ("claude-3-haiku", 0.25, 1.25),
)
# Prompt-cache prices relative to input (PROTOCOL.md, "Prompt caching").
WRITE_5M = 1.25
WRITE_1H = 2.0
READ = 0.1

BY_CHOICES = ("day", "account", "model", "client")
NO_ACCOUNT = "(none)"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DAYS = re.compile(r"^(\d+)d$")
# 27 years: more is beyond any history kept, and huge counts would
# overflow time.localtime().
MAX_DAYS = 9999
_DATED = re.compile(r"-\d{8}$")


def price_table(overrides: Iterable[tuple[str, float, float]] = ()) -> dict[str, tuple[float, float]]:
    table = {prefix: (inp, out) for prefix, inp, out in PRICES}
    table.update({prefix: (inp, out) for prefix, inp, out in overrides})
    return table


def price_of(model: str | None, table: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """
    (input, output) dollars per million tokens for C{model}: the entry with
    the longest prefix of the model id, or None (shown as n/a).
    """
    if not model:
        return None
    best: str | None = None
    for prefix in table:
        if model.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return table[best] if best is not None else None


def request_value(
    model: str | None,
    input_tokens: int,
    cache_creation: int,
    cache_creation_1h: int,
    cache_read: int,
    output_tokens: int,
    ttl: float | None,
    table: Mapping[str, tuple[float, float]],
) -> float | None:
    """
    What one request costs at API list prices, in dollars, or None for a
    model the table does not know.  Cache writes are split by TTL as the
    response reported it; without the split, the TTL the request asked for.
    """
    price = price_of(model, table)
    if price is None:
        return None
    per_input, per_output = price[0] / 1e6, price[1] / 1e6
    hour = min(cache_creation_1h, cache_creation)
    if hour == 0 and ttl is not None and ttl >= 3600:
        hour = cache_creation
    minutes = cache_creation - hour
    return per_input * (input_tokens + WRITE_5M * minutes + WRITE_1H * hour + READ * cache_read) + per_output * output_tokens


def model_family(model: str | None) -> str:
    """The model id without its date suffix (claude-sonnet-4-5-20250929 -> claude-sonnet-4-5)."""
    if not model:
        return "-"
    return _DATED.sub("", model)


def parse_when(text: str, now: float, localtime: Callable[[float], time.struct_time] = time.localtime) -> float:
    """
    C{YYYY-MM-DD} (local midnight starting that day) or C{Nd} (local
    midnight starting the day N−1 days before today, so C{7d} is the last
    seven days with today), as epoch seconds.  ValueError otherwise.
    """
    text = text.strip()
    match = _DAYS.match(text)
    if match:
        days = int(match.group(1))
        if days < 1:
            raise ValueError(f"{text!r}: give at least 1d")
        if days > MAX_DAYS:
            raise ValueError(f"{text!r} is out of range: give from 1d to {MAX_DAYS}d, or a date as YYYY-MM-DD")
        return day_start(now - (days - 1) * DAY, localtime)
    if _DATE.match(text):
        try:
            parsed = time.strptime(text, "%Y-%m-%d")
        except ValueError:
            raise ValueError(f"{text!r} is not a date") from None
        return time.mktime((parsed.tm_year, parsed.tm_mon, parsed.tm_mday, 0, 0, 0, 0, 0, -1))
    raise ValueError(f"{text!r}: give a date as YYYY-MM-DD or a number of days as 7d")


def day_start(when: float, localtime: Callable[[float], time.struct_time] = time.localtime) -> float:
    local = localtime(when)
    return time.mktime((local.tm_year, local.tm_mon, local.tm_mday, 0, 0, 0, 0, 0, -1))


@dataclass
class Group:
    """One line of the report."""

    key: str
    requests: int = 0
    input_tokens: int = 0
    cache_creation: int = 0
    cache_read: int = 0
    output_tokens: int = 0
    moves: int = 0
    rebilled: int = 0
    naive: int = 0
    value: float = 0.0
    unpriced: int = 0  # requests with tokens whose model has no price
    unpriced_models: set[str] = field(default_factory=set)

    def add(self, row: Mapping[str, Any], table: Mapping[str, tuple[float, float]]) -> None:
        self.requests += 1
        self.input_tokens += row["input_tokens"]
        self.cache_creation += row["cache_creation_tokens"]
        self.cache_read += row["cache_read_tokens"]
        self.output_tokens += row["output_tokens"]
        self.moves += row["moved"]
        self.rebilled += row["rebilled"]
        self.naive += row["naive_rebilled"]
        value = request_value(
            row["model"],
            row["input_tokens"],
            row["cache_creation_tokens"],
            row["cache_creation_1h_tokens"],
            row["cache_read_tokens"],
            row["output_tokens"],
            row["cache_ttl"],
            table,
        )
        if value is not None:
            self.value += value
        elif row["input_tokens"] or row["output_tokens"] or row["cache_creation_tokens"] or row["cache_read_tokens"]:
            self.unpriced += 1
            self.unpriced_models.add(row["model"] or "-")

    @property
    def hit(self) -> float | None:
        total = self.cache_read + self.input_tokens + self.cache_creation
        return self.cache_read / total if total else None

    @property
    def saved(self) -> int:
        return self.naive - self.rebilled

    @property
    def value_known(self) -> bool:
        # n/a when nothing in the group could be priced.
        return self.unpriced == 0 or self.value > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "requests": self.requests,
            "inputTokens": self.input_tokens,
            "cacheCreationTokens": self.cache_creation,
            "cacheReadTokens": self.cache_read,
            "outputTokens": self.output_tokens,
            "cacheHitRate": round(self.hit, 4) if self.hit is not None else None,
            "moves": self.moves,
            "rebilled": self.rebilled,
            "naiveEstimate": self.naive,
            "savedEstimate": self.saved,
            "apiValueUsd": round(self.value, 4) if self.value_known else None,
            "unpricedRequests": self.unpriced,
            "unpricedModels": sorted(self.unpriced_models),
        }


def group_key(by: str, row: Mapping[str, Any], localtime: Callable[[float], time.struct_time]) -> str:
    if by == "day":
        return time.strftime("%Y-%m-%d", localtime(row["time"]))
    if by == "account":
        # Requests no account took: the proxy answered them itself (its
        # 429 when every account was out, its 401 when none could serve).
        return row["account"] or NO_ACCOUNT
    if by == "model":
        return model_family(row["model"])
    return row["client"] or "other"


def report(
    rows: Iterable[Mapping[str, Any]],
    by: str,
    table: Mapping[str, tuple[float, float]],
    localtime: Callable[[float], time.struct_time] = time.localtime,
) -> tuple[list[Group], Group]:
    """
    The rows grouped (days in order, the rest by most requests), and the total.
    """
    groups: dict[str, Group] = {}
    total = Group("total")
    for row in rows:
        key = group_key(by, row, localtime)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(key)
        group.add(row, table)
        total.add(row, table)
    ordered = sorted(groups.values(), key=(lambda g: g.key) if by == "day" else (lambda g: (-g.requests, g.key)))
    return ordered, total


def _money(group: Group) -> str:
    return f"${group.value:,.2f}" if group.value_known else "n/a"


def _hit(group: Group) -> str:
    return f"{round(group.hit * 100)}%" if group.hit is not None else "–"


HEADINGS = ("reqs", "input", "✎ write", "read", "output", "hit", "moves", "re-billed", "naive≈", "saved≈", "API value")


def render_table(groups: Sequence[Group], total: Group, by: str) -> list[str]:
    def cells(group: Group) -> list[str]:
        return [
            group.key,
            str(group.requests),
            tokens(group.input_tokens),
            tokens(group.cache_creation),
            tokens(group.cache_read),
            tokens(group.output_tokens),
            _hit(group),
            str(group.moves),
            tokens(group.rebilled),
            tokens(group.naive),
            ("−" + tokens(-group.saved)) if group.saved < 0 else tokens(group.saved),
            _money(group),
        ]

    table = [[by, *HEADINGS]] + [cells(g) for g in groups] + [cells(total)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for index, row in enumerate(table):
        if index == len(table) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return lines


def render_text(
    groups: Sequence[Group], total: Group, by: str, since: float, until: float, localtime: Callable[[float], time.struct_time]
) -> str:
    first = time.strftime("%Y-%m-%d", localtime(since))
    last = time.strftime("%Y-%m-%d", localtime(until - 1))
    lines = [f"Usage {first} to {last} by {by} (local time)"]
    if not groups:
        lines.append("No requests recorded in this period.")
    else:
        lines += render_table(groups, total, by)
    lines.append("")
    lines.append(
        "re-billed: cache tokens NextClaude's moves wrote again; naive≈: what naive rotation would have "
        "re-billed on the same traffic (an estimate); saved≈ = naive≈ − re-billed (an estimate)."
    )
    lines.append(f"API value: {PRICE_TABLE_SOURCE} as of {PRICE_TABLE_DATE}; cache writes 1.25x (5 min) or 2x (1 h), reads 0.1x of input.")
    unpriced = sorted(total.unpriced_models)
    if unpriced:
        lines.append(f"No price for {', '.join(unpriced)} (n/a): add them to the prices field of the config.")
    return "\n".join(lines)


def render_json(groups: Sequence[Group], total: Group, by: str, since: float, until: float) -> str:
    return json.dumps(
        {
            "since": since,
            "until": until,
            "by": by,
            "rows": [g.to_json() for g in groups],
            "total": total.to_json(),
            "naiveIsEstimate": True,
            "prices": {"source": PRICE_TABLE_SOURCE, "date": PRICE_TABLE_DATE},
        },
        indent=2,
    )


def render_csv(groups: Sequence[Group], total: Group, by: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = list(total.to_json())
    writer.writerow([by if key == "key" else key for key in keys if key != "unpricedModels"])
    for group in [*groups, total]:
        data = group.to_json()
        writer.writerow(["" if data[key] is None else data[key] for key in keys if key != "unpricedModels"])
    return out.getvalue()


def _config_prices(config_path: Path) -> tuple[tuple[str, float, float], ...]:
    """The `prices` field of the config, if the file is there and valid."""
    from nextclaude.config import ConfigError, config_store, parse_config
    from nextclaude.store import StoreError

    try:
        data = config_store(config_path).read()
        if data is None:
            return ()
        return parse_config(data, config_path).prices
    except (ConfigError, StoreError) as error:
        print(f"nextclaude: warning: {error}; using the built-in prices", file=sys.stderr)
        return ()


def run_usage(
    args: argparse.Namespace,
    now: float | None = None,
    localtime: Callable[[float], time.struct_time] = time.localtime,
    out: Any = None,
) -> int:
    from nextclaude import paths
    from nextclaude.history import HistoryError, history_path, iter_rows, open_readonly

    out = out if out is not None else sys.stdout
    now = time.time() if now is None else now
    try:
        since = parse_when(args.since, now, localtime) if args.since else parse_when("7d", now, localtime)
        # --until names the last day shown: the period ends when the next
        # day starts (an hour over a day lands in it whatever DST does).
        until = day_start(parse_when(args.until, now, localtime) + DAY + 3600, localtime) if args.until else now + 1
    except ValueError as error:
        print(f"nextclaude: {error}", file=sys.stderr)
        return 2
    if until <= since:
        print("nextclaude: --until is before --since", file=sys.stderr)
        return 2
    config_path = paths.config_file(args.config)
    path = history_path(config_path)
    try:
        connection = open_readonly(path)
    except FileNotFoundError:
        print(
            f"nextclaude: no usage history at {path} yet: the proxy writes it as it serves requests",
            file=sys.stderr,
        )
        return 1
    except (HistoryError, sqlite3.Error) as error:
        print(f"nextclaude: cannot read the usage history {path}: {error}", file=sys.stderr)
        return 1
    try:
        table = price_table(_config_prices(config_path))
        groups, total = report(iter_rows(connection, since, until), args.by, table, localtime)
    except sqlite3.Error as error:
        print(f"nextclaude: cannot read the usage history {path}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if args.json:
        print(render_json(groups, total, args.by, since, until), file=out)
    elif args.csv:
        out.write(render_csv(groups, total, args.by))
    else:
        print(render_text(groups, total, args.by, since, until, localtime), file=out)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="WHEN", help="first day: YYYY-MM-DD, or 7d for the last seven days (default: 7d)")
    parser.add_argument("--until", metavar="WHEN", help="last day shown: YYYY-MM-DD or Nd (default: today)")
    parser.add_argument("--by", choices=BY_CHOICES, default="day", help="one line per day (default), account, model or client")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON instead of a table")
    form.add_argument("--csv", action="store_true", help="print CSV instead of a table")
