"""
What the console shows, as plain data: header lines, account cards, activity
rows and quota bars are lists of C{(attribute, text)} segments (urwid text
markup) computed from the status snapshot (L{nextclaude.status}) and event
dicts (L{nextclaude.events}).  No widget, reactor or terminal here, so every
figure is easy to test; L{nextclaude.console.widgets} lays these lines out.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from wcwidth import width

from nextclaude import events as kinds
from nextclaude.console import palette as p
from nextclaude.humanize import duration, tokens
from nextclaude.pool import model_family
from nextclaude.problems import ACCOUNT_ERROR as ACCOUNT_ERROR_KIND
from nextclaude.statusview import primary_text, problem_lines, spill_text

Segment = tuple[str | None, str]
Line = list[Segment]
Snapshot = Mapping[str, Any]
LocalTime = Callable[[float], time.struct_time]

# Card detail levels, most detailed first (the layout picks the first whose
# cards fit the screen).
FULL = "full"
NORMAL = "normal"
COMPACT = "compact"
ONE_LINE = "line"
LEVELS = (FULL, NORMAL, COMPACT, ONE_LINE)

# A cold rebuild (PRODUCT.md): cache_creation above cache_read and 1,000.
COLD_MINIMUM = 1000

# A problem stays on screen until it is resolved, so a long list must not
# push the accounts away: past this many rows, one line counts the rest.
MAX_PROBLEM_ROWS = 6

# Routing reasons (DESIGN.md point 11, the vocabulary fixed by issue 11)
# by how remarkable they are; anything else (exhausted, no-credentials)
# is bad news.
_ROUTINE = {"affinity", "placed", "manual", "probe"}
_MOVES = {"spread-early", "moved-after-compaction", "moved-after-idle", "ceiling", "forward-only-waived"}
_RETRIES = {"quota-429", "retry-401", "retry-403", "retry-throttle", "retry-transient", "retry-connect"}
_SHORT_REASONS = {
    "moved-after-compaction": "moved:compact",
    "moved-after-idle": "moved:idle",
    "forward-only-waived": "fwd-only-waived",
    "retry-transient": "retry-transnt",
    "no-credentials": "no-creds",
}

# The legend (`?`): one sentence for each figure, status, flag and reason.
LEGEND_FIGURES = [
    ("model", "the request's model family (opus, sonnet, haiku); side requests say what they are as their reason."),
    ("hit", "tokens read from the prompt cache: cheap, and what a warm account gives."),
    ("miss", "tokens processed afresh (input + cache writes): these burn quota."),
    ("✎", "cache writes, a rebuild of the context; a big ✎ with a low hit % is the expensive event."),
    ("cold", "a request that wrote more to the cache than it read (and over 1,000 tokens): a full rebuild."),
    ("↑ ↓", "tokens sent uncached (input) and received (output), as the API counted them."),
    ("5h 7d", "how much of the account's 5-hour and weekly quota windows is used, and when each resets."),
    ("Pro Max", "the account's plan (its tier), which sets how large its windows are."),
    ("re-billed", "cache tokens written again today because a conversation moved to another account."),
    ("saved≈", "an estimate: what naive rotation would have re-billed on the same requests, less what was (negative when this run moved more)."),
    ("◇ ⇄", "in the log: a compaction detected; a conversation switched accounts."),
]
LEGEND_STATUSES = [
    ("active", "serving, with room left."),
    ("armed", "the primary at the switch threshold: it takes no new sessions."),
    ("draining", "some session on it will leave at its next cheap moment (→ says where)."),
    ("throttled", "the API asked to slow down; back after the countdown."),
    ("exhausted", "out of quota until the window resets (the countdown)."),
    ("error", "its credential cannot serve; the card says how to fix it."),
    ("disabled", "taken out of rotation by you."),
]
LEGEND_FLAGS = [
    ("> primary", "where a new session would go."),
    ("→ successor", "where the next move goes."),
    ("★ manual", "pinned with s: sessions move there, unless it is full (then it says where traffic goes, and until when)."),
]
LEGEND_REASONS = [
    ("affinity", "the session stayed on the account it is warm on."),
    ("placed", "a new session, placed on the best account."),
    ("spread-early", "a young session moved while its context is tiny, so sessions that start together do not crowd one account."),
    ("moved-after-compaction", "moved right after Claude Code compacted it: only a small summary is re-billed."),
    ("moved-after-idle", "moved after idling past its cache lifetime: it was cold everywhere anyway."),
    ("ceiling", "moved because its account hit the hard limit."),
    ("quota-429", "the API said the quota is used up: retried at once on another account."),
    ("retry-401", "the token was refused: refreshed (or another account) and retried."),
    ("retry-403", "permission refused: retried once on another account."),
    ("retry-throttle", "asked to wait: retried after the wait, then elsewhere."),
    ("retry-transient", "a 429 about this request only: retried on the same account."),
    ("retry-connect", "the connection failed before any byte: retried once."),
    ("forward-only-waived", "went back to an account it left, as no other could serve."),
    ("manual", "sent to the pinned account."),
    ("probe", "every account was out: a real request tried one that may have recovered."),
    ("exhausted", "every account is out: the client got a 429 with when to retry."),
    ("no-credentials", "no account has a working credential: the client got a 401 naming the fixes."),
]
LEGEND_SIDE = [
    ("side:count", "a count_tokens request beside the conversation: no tokens billed."),
    ("side:quota", "Claude Code's quota check (max_tokens 1): a tiny request, one token out."),
    ("side:title", "a session title asked of Haiku: small, and never cached."),
]


def legend_paragraphs() -> list[Line]:
    """
    The legend the C{?} key opens: what the figures, statuses, flags and
    routing reasons mean, one sentence each.
    """
    paragraphs: list[Line] = []
    sections = [
        ("Figures", LEGEND_FIGURES, p.COLD),
        ("Statuses", LEGEND_STATUSES, p.WARN),
        ("Flags", LEGEND_FLAGS, p.MARKER),
        ("Routing reasons (last column of the log)", LEGEND_REASONS, p.REASON_MOVE),
        ("Side requests (in place of the reason)", LEGEND_SIDE, p.DIM),
    ]
    for title, entries, attr in sections:
        paragraph: Line = [(p.DIALOG_TITLE, title)]
        for term, sentence in entries:
            short = _SHORT_REASONS.get(term) if entries is LEGEND_REASONS else None
            if short is not None:
                sentence += f" ({short} where the log is narrow.)"
            paragraph += [(None, "\n"), (p.DIALOG_TITLE, f"{term}"), (p.DIALOG, f": {sentence}")]
        paragraphs.append(paragraph)
    return paragraphs


# -- text helpers ---------------------------------------------------------------


def width_of(text: str) -> int:
    """
    Terminal columns of C{text}: wcwidth's measure, the one urwid (4 and
    later) draws with, called directly so that the plain-text activity log
    of a server without a console does not load urwid.
    """
    return width(text, control_codes="ignore")


def line_text(line: Iterable[Segment]) -> str:
    return "".join(text for _, text in line)


def line_width(line: Iterable[Segment]) -> int:
    return sum(width_of(text) for _, text in line)


def truncate(text: str, width: int) -> str:
    """
    C{text} cut to C{width} columns, ending in "…" when something was cut.
    """
    if width <= 0:
        return ""
    if width_of(text) <= width:
        return text
    out = ""
    for char in text:
        if width_of(out + char) > width - 1:
            break
        out += char
    return out + "…"


def fit(text: str, width: int, align: str = "<") -> str:
    """
    C{text} truncated or padded to exactly C{width} columns.
    """
    text = truncate(text, width)
    gap = " " * max(0, width - width_of(text))
    return text + gap if align == "<" else gap + text


def fit_name(name: str, width: int) -> str:
    """
    An account name in C{width} columns; one too long loses its middle
    ("alice@ex…le.com"), keeping what tells similar addresses apart.
    """
    if width_of(name) <= width:
        return fit(name, width)
    if width < 6:
        return fit(name, width)
    tail = (width - 1) // 2
    head = width - 1 - tail
    return fit(name[:head] + "…" + name[len(name) - tail :], width)


def wrap_text(text: str, width: int, first: str = "", rest: str = "") -> list[str]:
    """
    C{text} broken between words into lines of at most C{width} columns,
    the first starting with C{first}, the others with C{rest} (a hanging
    indent); a word longer than a line is split.  Messages wrap instead of
    being cut: the end of a message is often the fix.
    """
    lines: list[str] = []
    current = first
    fresh = True
    for word in text.split():
        gap = "" if fresh else " "
        if width_of(current + gap + word) <= width:
            current += gap + word
            fresh = False
            continue
        if not fresh:
            lines.append(current)
            current, fresh = rest, True
        while width_of(current + word) > width and width > width_of(current) + 1:
            room = width - width_of(current)
            cut = ""
            for char in word:
                if width_of(cut + char) > room:
                    break
                cut += char
            lines.append(current + cut)
            word = word[len(cut) :]
            current = rest
        current += word
        fresh = False
    if not fresh or not lines:
        lines.append(current)
    return lines


def wrapped(text: str, width: int, attr: str | None, first: str = "", rest: str = "") -> list[Line]:
    """
    L{wrap_text} as lines of one attribute.
    """
    return [[(attr, line)] for line in wrap_text(text, width, first, rest)]


def clip_line(line: Line, width: int) -> Line:
    """
    C{line} cut to C{width} columns (segments past it dropped, the last one
    shortened).
    """
    out: Line = []
    left = width
    for attr, text in line:
        if left <= 0:
            break
        size = width_of(text)
        if size <= left:
            out.append((attr, text))
            left -= size
        else:
            out.append((attr, truncate(text, left)))
            left = 0
    return out


def pack(parts: Sequence[Line], width: int, separator: str = " · ", attr: str | None = None) -> list[Line]:
    """
    Put C{parts} on as few lines of C{width} columns as they fit on,
    separated by C{separator}; a part never breaks in the middle.
    """
    lines: list[Line] = []
    current: Line = []
    for part in parts:
        if current and line_width(current) + width_of(separator) + line_width(part) > width:
            lines.append(current)
            current = []
        if current:
            current = current + [(attr, separator)]
        current = current + list(part)
    if current:
        lines.append(current)
    return [clip_line(line, width) for line in lines]


def clock_text(when: float | None, localtime: LocalTime = time.localtime) -> str:
    if when is None:
        return "--:--:--"
    return time.strftime("%H:%M:%S", localtime(when))


def percent(fraction: float | None) -> str:
    if fraction is None:
        return "--"
    return f"{round(fraction * 100):d}%"


def hit_fraction(read: int, fresh: int) -> float | None:
    """
    The share of input served from cache: hit ÷ (hit + miss), None when
    nothing was read.
    """
    total = read + fresh
    if total <= 0:
        return None
    return read / total


def request_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 100:
        return f"{seconds:.0f}s"
    return duration(seconds)


def number(mapping: Mapping[str, Any] | None, key: str) -> int:
    if not isinstance(mapping, Mapping):
        return 0
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# -- quota bars -----------------------------------------------------------------


def level_attr(fraction: float, switch: float) -> str:
    """
    How worrying a utilization is: at or past the switch threshold, within
    18 points of it, or comfortably below.
    """
    if fraction >= switch:
        return p.BAD
    if fraction >= switch - 0.18:
        return p.WARN
    return p.OK


def bar_attr(fraction: float, switch: float) -> str:
    return {p.BAD: p.BAR_BAD, p.WARN: p.BAR_WARN, p.OK: p.BAR_OK}[level_attr(fraction, switch)]


def bar(fraction: float | None, width: int, switch: float = 0.98) -> Line:
    """
    A quota bar C{width} columns wide: used part in a colour saying how
    close to the switch threshold it is, the rest dim.  Unknown quota is a
    dotted bar.
    """
    if width <= 0:
        return []
    if fraction is None:
        return [(p.BAR_FREE, "·" * width)]
    fraction = min(1.0, max(0.0, fraction))
    used = round(fraction * width)
    # Any use shows as one cell, but only when the figure beside the bar
    # is not "0%" too: a bar must not say more than its number.
    if used == 0 and round(fraction * 100) > 0:
        used = 1
    segments: Line = []
    if used:
        segments.append((bar_attr(fraction, switch), "█" * used))
    if width - used:
        segments.append((p.BAR_FREE, "░" * (width - used)))
    return segments


def window_line(
    label: str,
    window: Mapping[str, Any] | None,
    now: float,
    bar_width: int,
    switch: float,
    verbose: bool,
) -> Line:
    """
    One quota window: C{5h ███░░ 43% (4h16m)}, or the wordier form
    C{5h ███░░  43% used · resets in 4h16m}.
    """
    utilization = window.get("utilization") if window else None
    if not isinstance(utilization, (int, float)):
        utilization = None
    reset = window.get("reset") if window else None
    line: Line = [(p.DIM, f"{label} ")]
    line += bar(utilization, bar_width, switch)
    attr = level_attr(utilization, switch) if utilization is not None else p.DIM
    line.append((attr, f" {percent(utilization):>4}"))
    if window is None:
        line.append((p.DIM, " no data" if verbose else ""))
        return line
    if verbose:
        line.append((p.TEXT, " used"))
        if isinstance(reset, (int, float)):
            line.append((p.DIM, f" · resets in {duration(reset - now)}"))
    elif isinstance(reset, (int, float)):
        line.append((p.DIM, f" ({duration(reset - now)})"))
    return line


# -- header ---------------------------------------------------------------------


def totals_of(snapshot: Snapshot) -> dict[str, int]:
    totals = snapshot.get("totals")
    keys = ("requests", "inputTokens", "outputTokens", "cacheReadTokens", "cacheCreationTokens", "coldRebuilds")
    return {key: number(totals, key) for key in keys}


def header_parts(snapshot: Snapshot, now: float, title: str | None = None) -> list[Line]:
    accounts = snapshot.get("accounts") or []
    totals = totals_of(snapshot)
    started = snapshot.get("startedAt")
    uptime = now - started if isinstance(started, (int, float)) else snapshot.get("uptime", 0)
    listen = snapshot.get("listen") or {}
    hit = hit_fraction(totals["cacheReadTokens"], totals["inputTokens"] + totals["cacheCreationTokens"])
    sessions = snapshot.get("sessions", 0)
    parts: list[Line] = [
        [(p.TITLE, title or f"NextClaude {snapshot.get('version', '?')}")],
        [(p.HEADER, f"{len(accounts)} account{'s' if len(accounts) != 1 else ''}")],
        [(p.HEADER, f"{sessions} session{'s' if sessions != 1 else ''}")],
        [(p.HEADER, f"cache hit {percent(hit)}")],
        [(p.HEADER, f"↑{tokens(totals['inputTokens'])} ↓{tokens(totals['outputTokens'])}")],
        [(p.HEADER, f"{totals['requests']} req{'s' if totals['requests'] != 1 else ''}")],
        [(p.HEADER, f"up {duration(max(0.0, uptime or 0))}")],
    ]
    port = listen.get("port")
    if port is not None:
        host = listen.get("host") or "127.0.0.1"
        parts.append([(p.HEADER, f"{host}:{port}")])
    if snapshot.get("primary"):
        shown = primary_text(snapshot)
        attr = p.HEADER if shown == snapshot.get("primary") else p.BAD
        parts.append([(p.HEADER_DIM, "primary "), (attr, shown)])
    history = snapshot.get("history")
    today = history.get("today") if isinstance(history, Mapping) else None
    if isinstance(today, Mapping):
        # Today's figures from the usage history; the naive one is an
        # estimate, and so is what was saved against it.
        rebilled = number(today, "rebilled")
        saved = number(today, "naiveEstimate") - rebilled
        parts.append(
            [
                (p.HEADER_DIM, "today re-billed "),
                (p.HEADER, tokens(rebilled)),
                (p.HEADER_DIM, " · saved≈ "),
                (p.HEADER, f"−{tokens(-saved)}" if saved < 0 else tokens(saved)),
            ]
        )
    return parts


def header_lines(
    snapshot: Snapshot | None,
    now: float,
    width: int,
    problem_budget: int = MAX_PROBLEM_ROWS,
    title: str | None = None,
) -> list[Line]:
    """
    The header: version, accounts, sessions, overall cache hit %, tokens
    in/out, requests, uptime, listening address, primary — on one line when
    the terminal is wide enough, else wrapped between figures.
    """
    if snapshot is None:
        return [[(p.TITLE, title or "NextClaude"), (p.HEADER_DIM, " · waiting for the proxy's status…")]]
    lines = pack(header_parts(snapshot, now, title), width, attr=p.HEADER_DIM)
    lines = [line + [(p.HEADER, " " * max(0, width - line_width(line)))] for line in lines]
    return lines + problem_rows(snapshot, width, problem_budget)


def problem_rows(snapshot: Snapshot, width: int, budget: int = MAX_PROBLEM_ROWS) -> list[Line]:
    """
    The unresolved problems (an account error shows on its card instead),
    each wrapped over as many rows as it needs, in at most C{budget} rows;
    the problems that do not fit are counted on the last row.
    """
    texts = problem_lines(snapshot)
    rows: list[Line] = []
    for index, text in enumerate(texts):
        lines = wrapped(text, width, p.BAD, "! ", "  ")
        left = len(texts) - index
        if len(rows) + len(lines) > budget - (1 if left > 1 else 0):
            more = left
            rows = rows[: max(0, budget - 1)]
            rows.append(
                clip_line([(p.BAD, f"! {more} more problem{'s' if more != 1 else ''}: see `nextclaude status`")], width)
            )
            return rows
        rows += lines
    return rows


# -- account cards ---------------------------------------------------------------


_STATUS_ATTR = {
    "active": p.OK,
    "armed": p.WARN,
    "draining": p.WARN,
    "throttled": p.WARN,
    "exhausted": p.BAD,
    "error": p.BAD,
}


def status_words(account: Mapping[str, Any], now: float) -> Line:
    status = str(account.get("status") or "?")
    line: Line = [(_STATUS_ATTR.get(status, p.TEXT), status)]
    if status == "draining" and account.get("movesTo"):
        # Where its sessions go at their cheap moments.
        line.append((p.SUCCESSOR, f" → {account['movesTo']}"))
    until = account.get("throttledUntil") if status == "throttled" else None
    if status == "exhausted":
        until = account.get("exhaustedUntil") or soonest_reset(account, now)
    if isinstance(until, (int, float)) and until > now:
        line.append((p.DIM, f" {duration(until - now)}"))
    return line


def soonest_reset(account: Mapping[str, Any], now: float) -> float | None:
    resets: list[float] = []
    for window in (account.get("windows") or {}).values():
        reset = window.get("reset") if isinstance(window, Mapping) else None
        if isinstance(reset, (int, float)):
            resets.append(float(reset))
    future = [reset for reset in resets if reset > now]
    return min(future) if future else None


def card_title(
    account: Mapping[str, Any],
    now: float,
    name_width: int | None = None,
    words: bool = True,
    localtime: LocalTime = time.localtime,
) -> Line:
    """
    C{> alice@example.com  Pro  active  ★ manual  primary}: the primary is
    marked by C{>} (as in C{nextclaude status}), the successor by C{→}.
    An account that is both shows as the primary alone; a pin whose
    traffic spilled says why and where (C{★ manual · full, traffic on
    sim-3 until 14:05}).
    """
    flags = list(account.get("flags") or [])
    if "primary" in flags and "successor" in flags:
        flags.remove("successor")
    name = str(account.get("name", "?"))
    if name_width is not None:
        name = fit_name(name, name_width)
    if "primary" in flags:
        mark: Segment = (p.MARKER, "> ")
    elif "successor" in flags:
        mark = (p.SUCCESSOR, "→ ")
    else:
        mark = (None, "  ")
    line: Line = [mark, (p.NAME_PRIMARY if "primary" in flags else p.NAME, name)]
    line += [(None, "  "), (p.TIER, str(account.get("tier") or "?")), (None, "  ")]
    line += status_words(account, now)
    if "manual" in flags:
        line += [(None, "  "), (p.MANUAL, "★ manual" if words else "★")]
    if words:
        if "primary" in flags:
            line += [(None, "  "), (p.MARKER, "primary")]
        if "successor" in flags:
            line += [(None, "  "), (p.SUCCESSOR, "successor")]
    return line


def usage_of(account: Mapping[str, Any]) -> dict[str, int]:
    usage = account.get("usage")
    keys = ("requests", "failures", "coldRebuilds", "inputTokens", "outputTokens", "cacheReadTokens", "cacheCreationTokens")
    return {key: number(usage, key) for key in keys}


def cache_segments(usage: Mapping[str, int], verbose: bool) -> Line:
    hit = hit_fraction(usage["cacheReadTokens"], usage["inputTokens"] + usage["cacheCreationTokens"])
    attr = p.DIM if hit is None else p.OK if hit >= 0.8 else p.WARN if hit >= 0.5 else p.BAD
    rebuilt = tokens(usage["cacheCreationTokens"])
    cold = usage["coldRebuilds"]
    cold_attr = p.COLD if cold else p.DIM
    if verbose:
        return [
            (attr, f"{percent(hit)} hit"),
            (p.DIM, f" · {tokens(usage['cacheReadTokens'])} read · "),
            (cold_attr, f"✎{rebuilt} rebuilt ({cold} cold)"),
        ]
    return [(attr, f"hit {percent(hit)}"), (None, " "), (cold_attr, f"✎{rebuilt} ({cold} cold)")]


def token_segments(usage: Mapping[str, int], verbose: bool) -> Line:
    requests = usage["requests"]
    if verbose:
        return [
            (p.TEXT, f"↑{tokens(usage['inputTokens'])} in · ↓{tokens(usage['outputTokens'])} out · "),
            (p.TEXT, f"{requests} request{'s' if requests != 1 else ''}"),
        ]
    return [(p.TEXT, f"↑{tokens(usage['inputTokens'])} ↓{tokens(usage['outputTokens'])} · {requests} req")]


def _windows(account: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    windows = account.get("windows")
    if not isinstance(windows, Mapping):
        return {}
    return {name: window for name, window in windows.items() if isinstance(window, Mapping)}


def titled(account: Mapping[str, Any], now: float, width: int, localtime: LocalTime) -> list[Line]:
    """
    The card's title, and for a pin whose traffic spilled the reason and
    where the traffic goes: on the title line when it fits, else wrapped
    under it.
    """
    title = card_title(account, now, localtime=localtime)
    spill = spill_text(account, localtime)
    if not spill:
        return [title]
    inline = title + [(p.WARN, f" · {spill}")]
    if line_width(inline) <= width:
        return [inline]
    return [title] + wrapped(spill, width, p.WARN, "    ↳ ", "      ")


def _error_lines(account: Mapping[str, Any], width: int) -> list[Line]:
    """
    The account's error, wrapped under the card's title (its fix is at the
    end of the message, so it must not be cut).
    """
    error = account.get("error")
    if account.get("status") == "error" or error:
        return wrapped(f"error: {error or 'unknown'}", width, p.BAD, "  ", "    ")
    return []


def card_lines(
    account: Mapping[str, Any],
    now: float,
    level: str,
    width: int,
    switch: float = 0.98,
    localtime: LocalTime = time.localtime,
) -> list[Line]:
    """
    One account card at a detail level, each line at most C{width} wide:

      - C{full}: title, one line per quota window (5h and 7d always, other
        live windows when known) with "% used · resets in", cache line,
        tokens line, and the error when in error;
      - C{normal} (3 lines, +1 for an error): title, both bars on one line,
        cache and tokens on one line;
      - C{compact} (2 lines): title with the cache figures, bars with tokens;
      - C{line} (1 line): name, status and the two windows' percentages.
    """
    windows = _windows(account)
    usage = usage_of(account)
    lines: list[Line]
    if level == FULL:
        bar_width = max(10, min(40, width - 42))
        lines = titled(account, now, width, localtime) + _error_lines(account, width)
        # Other windows (per-model weekly ones) when they carry a figure;
        # "overage" and the like only have a status, which the status word says.
        names = ["5h", "7d"] + sorted(
            name
            for name, window in windows.items()
            if name not in ("5h", "7d") and isinstance(window.get("utilization"), (int, float))
        )
        for name in names:
            lines.append([(None, "  ")] + window_line(name, windows.get(name), now, bar_width, switch, True))
        lines.append([(None, "  "), (p.DIM, "cache: ")] + cache_segments(usage, True))
        lines.append([(None, "  "), (p.DIM, "tokens: ")] + token_segments(usage, True))
    elif level == NORMAL:
        # Two windows of "5h " + bar + " 100%" + " (23h59m)", an indent and a gap.
        bar_width = max(6, min(24, (width - 39) // 2))
        lines = [
            *titled(account, now, width, localtime),
            [(None, "  ")]
            + window_line("5h", windows.get("5h"), now, bar_width, switch, False)
            + [(None, "   ")]
            + window_line("7d", windows.get("7d"), now, bar_width, switch, False),
            [(None, "  ")] + cache_segments(usage, False) + [(p.DIM, " · ")] + token_segments(usage, False),
        ]
        lines[len(lines) - 2 : len(lines) - 2] = _error_lines(account, width)
    elif level == COMPACT:
        bar_width = max(4, min(16, (width - 54) // 2))
        title = card_title(account, now, words=False)
        error_lines = _error_lines(account, width)
        if not error_lines:
            title += [(None, "  ")] + cache_segments(usage, False)
        lines = [
            title,
            *error_lines,
            [(None, "  ")]
            + window_line("5h", windows.get("5h"), now, bar_width, switch, False)
            + [(None, "  ")]
            + window_line("7d", windows.get("7d"), now, bar_width, switch, False)
            + [(None, "  ")]
            + token_segments(usage, False),
        ]
    else:
        name_width = max(8, min(24, width - 44))
        line = card_title(account, now, name_width=name_width, words=False)
        for name in ("5h", "7d"):
            window = windows.get(name)
            utilization = window.get("utilization") if window else None
            if not isinstance(utilization, (int, float)):
                utilization = None
            attr = level_attr(utilization, switch) if utilization is not None else p.DIM
            line += [(p.DIM, f"  {name} "), (attr, percent(utilization))]
        hit = hit_fraction(usage["cacheReadTokens"], usage["inputTokens"] + usage["cacheCreationTokens"])
        line += [(p.DIM, "  hit "), (p.TEXT, percent(hit))]
        lines = [line]
    return [clip_line(line, width) for line in lines]


# -- activity log ---------------------------------------------------------------


@dataclass(frozen=True)
class LogColumns:
    """
    Column widths of the activity log for one terminal width.  Wide
    terminals get an ↑in column and the request path as well.
    """

    account: int
    reason: int
    show_input: bool = False
    path: int = 0

    TIME = 8
    STATUS = 3
    DURATION = 5
    MODEL = 6
    TOKENS = 6
    RATE = 4

    @classmethod
    def for_width(cls, width: int, names: Iterable[str] = ()) -> LogColumns:
        longest = max((width_of(name) for name in names), default=12)
        show_input = width >= 120
        fixed = cls.TIME + cls.STATUS + cls.DURATION + cls.MODEL + cls.TOKENS * (5 if show_input else 4) + cls.RATE
        gaps = 10 + (1 if show_input else 0)
        room = max(16, width - fixed - gaps)
        reason_want = 23 if width >= 120 else 14
        # Never narrower than its title.
        account = max(7, min(longest, 28, room - min(reason_want, room // 2)))
        reason = max(6, room - account)
        path = 0
        if width >= 140 and reason > reason_want + 12:
            path = reason - reason_want - 1
            reason = reason_want
        return cls(account=account, reason=reason, show_input=show_input, path=path)


def reason_attr(reason: str | None) -> str:
    if reason in _ROUTINE or reason is None:
        return p.REASON
    if reason in _MOVES:
        return p.REASON_MOVE
    if reason in _RETRIES:
        return p.REASON_RETRY
    return p.REASON_BAD


def model_text(model: Any) -> str:
    """
    A model id as its short family name ("opus", "sonnet", "haiku"); an
    unknown model as its id, "-" when there is none.
    """
    if not isinstance(model, str) or not model:
        return "-"
    return model_family(model) or model.removeprefix("claude-")


def side_tag(kind: Any) -> str | None:
    """
    The reason column of a side request ("side:count", "side:quota",
    "side:title"), which explains its small or zero figures; None for a
    request of the conversation itself.
    """
    return f"side:{kind}" if isinstance(kind, str) and kind else None


def reason_text(reason: str | None, width: int) -> str:
    text = reason or "-"
    if width_of(text) > width:
        text = _SHORT_REASONS.get(text, text)
    return fit(text, width)


def log_header(columns: LogColumns) -> Line:
    c = columns
    parts = [
        fit("time", c.TIME),
        fit("st", c.STATUS),
        fit("dur", c.DURATION, ">"),
        fit("account", c.account),
        fit("model", c.MODEL),
    ]
    if c.show_input:
        parts.append(fit("↑in", c.TOKENS, ">"))
    parts += [
        fit("hit", c.TOKENS, ">"),
        fit("miss", c.TOKENS, ">"),
        fit("✎", c.TOKENS, ">"),
        fit("↓out", c.TOKENS, ">"),
        fit("hit%", c.RATE, ">"),
        fit("reason", c.reason),
    ]
    if c.path:
        parts.append(fit("path", c.path))
    return [(p.LOG_HEADER, " ".join(parts))]


def status_attr(status: Any, ok: bool = True) -> str:
    if not isinstance(status, int):
        return p.DIM
    if 200 <= status < 300:
        return p.OK if ok else p.WARN
    if status == 429 or status >= 500:
        return p.WARN
    return p.BAD


def request_row(event: Mapping[str, Any], columns: LogColumns, localtime: LocalTime = time.localtime) -> Line:
    """
    One finished request: time, status, duration, account, model family,
    (↑in,) hit, miss, ✎, ↓out, hit-rate %, routing reason (, path) —
    aligned to C{columns}.  A side request shows its L{side_tag} where the
    routing reason goes (it follows its session's account).
    """
    c = columns
    usage = event.get("usage")
    status = event.get("status")
    ok = event.get("ok", True) is not False
    row: Line = [
        (p.DIM, clock_text(event.get("time"), localtime)),
        (None, " "),
        (status_attr(status, ok), fit(str(status) if status is not None else "-", c.STATUS)),
        (None, " "),
        (p.TEXT, fit(request_duration(event.get("duration")), c.DURATION, ">")),
        (None, " "),
        (p.NAME, fit_name(str(event.get("account") or "-"), c.account)),
        (None, " "),
        (p.TEXT, fit(model_text(event.get("model")), c.MODEL)),
        (None, " "),
    ]
    if isinstance(usage, Mapping):
        read = number(usage, "cache_read_input_tokens")
        created = number(usage, "cache_creation_input_tokens")
        fresh = number(usage, "input_tokens") + created
        out = number(usage, "output_tokens")
        hit = hit_fraction(read, fresh)
        cold = created > read and created > COLD_MINIMUM
        rate_attr = p.DIM if hit is None else p.OK if hit >= 0.8 else p.WARN if hit >= 0.5 else p.BAD
        if c.show_input:
            row += [(p.TEXT, fit(tokens(number(usage, "input_tokens")), c.TOKENS, ">")), (None, " ")]
        row += [
            (p.OK if read else p.DIM, fit(tokens(read), c.TOKENS, ">")),
            (None, " "),
            (p.TEXT, fit(tokens(fresh), c.TOKENS, ">")),
            (None, " "),
            (p.COLD if cold else p.DIM if not created else p.TEXT, fit(tokens(created), c.TOKENS, ">")),
            (None, " "),
            (p.TEXT, fit(tokens(out), c.TOKENS, ">")),
            (None, " "),
            (rate_attr, fit(percent(hit), c.RATE, ">")),
        ]
    else:
        blank = fit("-", c.TOKENS, ">")
        row += [(p.DIM, " ".join([blank] * (5 if c.show_input else 4) + [fit("-", c.RATE, ">")]))]
    reason = event.get("reason")
    tag = side_tag(event.get("side_kind"))
    if tag is not None:
        row += [(None, " "), (p.DIM, fit(tag, c.reason))]
    else:
        row += [(None, " "), (reason_attr(reason), reason_text(reason, c.reason))]
    if c.path:
        path = f"{event.get('method') or ''} {event.get('path') or ''}".strip()
        row += [(None, " "), (p.DIM, fit(path, c.path))]
    return row


def _short_session(session: Any) -> str:
    text = str(session or "?")
    return text if len(text) <= 12 else text[:11] + "…"


def event_text(event: Mapping[str, Any], now: float) -> tuple[str, str] | None:
    """
    A routing event as (attribute, text), or None for kinds the log does not
    show (request started/routed: the finished row says it all).
    """
    kind = event.get("kind")
    account = event.get("account")
    if kind == kinds.ARMED:
        successor = event.get("successor")
        if event.get("status") == "draining":
            # Placement: a session on it will leave at its cheap moment.
            return p.EVENT, f"◆ draining {account} → {successor or 'no successor'}"
        tail = f", successor {successor}" if successor else ", no successor"
        return p.EVENT, f"◆ armed {account}{tail}"
    if kind == kinds.SWITCHED:
        reason = event.get("reason")
        return p.EVENT, (
            f"⇄ switched {_short_session(event.get('session'))} {event.get('previous')} → {account}"
            + (f" ({reason})" if reason else "")
        )
    if kind == kinds.COMPACTION:
        return p.EVENT, f"◇ compaction detected {_short_session(event.get('session'))} on {account}"
    if kind == kinds.PROBE:
        return p.EVENT, f"? probe {account}"
    if kind == kinds.PIN_CHANGED:
        if account:
            return p.EVENT, f"★ pinned {account}"
        return p.EVENT, "☆ pin cleared"
    if kind == kinds.THROTTLED:
        until = event.get("until")
        tail = f" for {duration(until - event.get('time', now))}" if isinstance(until, (int, float)) else ""
        return p.EVENT_BAD, f"~ throttled {account}{tail}"
    if kind == kinds.RECOVERED:
        return p.EVENT_GOOD, f"✓ recovered {account}"
    if kind == kinds.EXHAUSTED:
        reset = event.get("reset")
        tail = f", resets in {duration(reset - event.get('time', now))}" if isinstance(reset, (int, float)) else ""
        return p.EVENT_BAD, f"✗ exhausted {account}{tail}"
    if kind == kinds.ACCOUNT_ERROR:
        return p.EVENT_BAD, f"! error {account}: {event.get('message') or 'unknown'}"
    # An account error already has its own row, above.
    if kind == kinds.PROBLEM_RAISED and event.get("problem") != ACCOUNT_ERROR_KIND:
        return p.EVENT_BAD, f"! {event.get('message') or event.get('problem')}"
    if kind == kinds.PROBLEM_CLEARED and event.get("problem") != ACCOUNT_ERROR_KIND:
        return p.EVENT_GOOD, f"✓ resolved {event.get('problem')}" + (f" ({account})" if account else "")
    return None


def log_row(
    event: Mapping[str, Any],
    columns: LogColumns,
    now: float,
    localtime: LocalTime = time.localtime,
) -> Line | None:
    """
    The activity row for any event, or None when the kind is not shown.
    """
    if event.get("kind") == kinds.REQUEST_FINISHED:
        return request_row(event, columns, localtime)
    shown = event_text(event, now)
    if shown is None:
        return None
    attr, text = shown
    return [(p.DIM, clock_text(event.get("time"), localtime)), (None, " "), (attr, text)]


# -- the model the widgets render -----------------------------------------------


@dataclass
class Model:
    """
    What the console knows: the latest snapshot, the recent events, a
    transient message and the footer's keys.  C{clock} is the console's
    reactor time; the proxy's own time is that plus the offset measured
    when the last snapshot arrived, so countdowns tick between snapshots
    and a test clock drives them.
    """

    clock: Callable[[], float]
    localtime: LocalTime = time.localtime
    snapshot: Snapshot | None = None
    offset: float = 0.0
    events: deque[Mapping[str, Any]] = field(default_factory=lambda: deque(maxlen=500))
    message: Segment | None = None
    keys: list[tuple[str, str]] = field(default_factory=list)
    # The title bar's first words (the demo says what it is), and a
    # footer message that stays until replaced (the demo's "traffic ended").
    title: str | None = None
    notice: Segment | None = None

    def now(self) -> float:
        return self.clock() + self.offset

    def take_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        stamp = snapshot.get("time")
        if isinstance(stamp, (int, float)):
            self.offset = stamp - self.clock()

    def add_event(self, event: Mapping[str, Any]) -> None:
        self.events.append(event)

    @property
    def accounts(self) -> list[Mapping[str, Any]]:
        if self.snapshot is None:
            return []
        return [a for a in self.snapshot.get("accounts") or [] if isinstance(a, Mapping)]

    @property
    def switch(self) -> float:
        value = self.snapshot.get("switchThreshold") if self.snapshot else None
        return value if isinstance(value, (int, float)) else 0.98

    @property
    def pinned(self) -> str | None:
        for account in self.accounts:
            if "manual" in (account.get("flags") or []):
                return str(account.get("name"))
        return None

    def log_lines(self, width: int, count: int) -> list[Line]:
        """
        The newest C{count} activity rows (oldest first) for a terminal
        C{width} wide, preceded by the column titles.
        """
        if count <= 0:
            return []
        names = [str(a.get("name")) for a in self.accounts]
        columns = LogColumns.for_width(width, names)
        now = self.now()
        rows: list[Line] = []
        for event in reversed(self.events):
            if len(rows) >= count - 1:
                break
            row = log_row(event, columns, now, self.localtime)
            if row is not None:
                rows.append(clip_line(row, width))
        rows.reverse()
        return [clip_line(log_header(columns), width)] + rows
