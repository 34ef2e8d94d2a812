"""
`nextclaude status` as plain text: the status snapshot (nextclaude.status's
schema) rendered in PRODUCT.md's format.  Pure: the clock is a parameter.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from nextclaude.humanize import duration, tokens
from nextclaude.problems import ACCOUNT_ERROR

# The windows people know by name come first; any other the headers name
# (per-model weekly windows, say) follows in name order.
_WINDOW_ORDER = {"5h": 0, "7d": 1}


def hit_percent(usage: Mapping[str, Any]) -> int | None:
    """
    Cache hit %: cache read ÷ (cache read + input + cache creation), or
    None before any input was seen.
    """
    read = _count(usage, "cacheReadTokens")
    total = read + _count(usage, "inputTokens") + _count(usage, "cacheCreationTokens")
    if total <= 0:
        return None
    return round(100 * read / total)


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _percent(fraction: float) -> str:
    # 0.98 -> "98%", 0.975 -> "97.5%".
    return f"{round(fraction * 100, 1):g}%"


def _hit_text(usage: Mapping[str, Any]) -> str:
    hit = hit_percent(usage)
    return "–" if hit is None else f"{hit}%"


def spill_text(account: Mapping[str, Any], localtime: Callable[[float], time.struct_time] = time.localtime) -> str | None:
    """
    Why the manual pin takes no new traffic and where it goes instead:
    C{"full, traffic on sim-3 until 14:05"}, or None when the pin serves.
    """
    spill = account.get("spill")
    if not isinstance(spill, Mapping) or not spill.get("trafficOn"):
        return None
    text = f"{spill.get('why') or 'not serving'}, traffic on {spill['trafficOn']}"
    until = spill.get("until")
    if isinstance(until, (int, float)):
        text += f" until {time.strftime('%H:%M', localtime(until))}"
    return text


def _status_word(account: Mapping[str, Any], now: float) -> str:
    status = account.get("status") or "unknown"
    flags = account.get("flags") or []
    words = [status]
    if status == "draining" and account.get("movesTo"):
        words = [f"draining → {account['movesTo']}"]
    # The primary takes moves too when it is also the successor: saying
    # both would read as a contradiction, and ">" already marks it.
    if "successor" in flags and "primary" not in flags:
        # An active successor is simply "the successor"; any other status stays visible.
        words = ["successor"] if status == "active" else [status, "successor"]
    until = account.get("exhaustedUntil") if status == "exhausted" else None
    if status == "throttled":
        until = account.get("throttledUntil")
    if isinstance(until, (int, float)) and until > now:
        words.append(f"back in {duration(until - now)}")
    return ", ".join(words)


def _window_line(name: str, window: Mapping[str, Any], now: float) -> str:
    utilization = window.get("utilization")
    used = f"{round(utilization * 100)}%" if isinstance(utilization, (int, float)) else "?%"
    line = f"  {name}: {used} used"
    reset = window.get("reset")
    if isinstance(reset, (int, float)):
        line += f" (resets in {duration(reset - now)})"
    if window.get("status") == "rejected":
        line += " · rejected"
    return line


def _account_lines(
    account: Mapping[str, Any],
    primary: str | None,
    now: float,
    localtime: Callable[[float], time.struct_time] = time.localtime,
) -> list[str]:
    name = account.get("name", "?")
    flags = account.get("flags") or []
    marker = "> " if name == primary else "  "
    header = f"{marker}{name} ({account.get('tier') or '?'}, {_status_word(account, now)})"
    if "manual" in flags:
        header += " ★ manual"
        spill = spill_text(account, localtime)
        if spill:
            header += f" · {spill}"
    lines = [header]
    if account.get("error"):
        lines.append(f"  error: {account['error']}")
    windows = account.get("windows") or {}
    for window_name in sorted(windows, key=lambda w: (_WINDOW_ORDER.get(w, 2), w)):
        window = windows[window_name]
        # Overage is not a quota window: its "rejected" only says extra
        # usage is off, which is the normal case for most accounts.
        if window_name == "overage" or not isinstance(window, Mapping):
            continue
        lines.append(_window_line(window_name, window, now))
    usage = account.get("usage") or {}
    lines.append(
        f"  cache: {_hit_text(usage)} hit · {tokens(_count(usage, 'cacheReadTokens'))} read · "
        f"✎{tokens(_count(usage, 'cacheCreationTokens'))} rebuilt ({_count(usage, 'coldRebuilds')} cold)"
    )
    count = _count(usage, "requests")
    requests = f"{count} request{'' if count == 1 else 's'}"
    failures = _count(usage, "failures")
    if failures:
        requests += f" ({failures} failed)"
    lines.append(
        f"  tokens: ↑{tokens(_count(usage, 'inputTokens'))} in · ↓{tokens(_count(usage, 'outputTokens'))} out · "
        + requests
    )
    return lines


# Statuses in which the primary serves nothing: the Active line must not
# read as if it did.
_NOT_SERVING = frozenset({"error", "exhausted", "throttled", "disabled"})


def primary_text(snapshot: Mapping[str, Any]) -> str:
    """
    The primary's name for the C{Active:} line, with its status when it
    cannot serve right now (C{alice (error)}), or C{none yet}.
    """
    primary = snapshot.get("primary")
    if not primary:
        return "none yet"
    for account in snapshot.get("accounts") or []:
        if isinstance(account, Mapping) and account.get("name") == primary:
            status = account.get("status")
            if status in _NOT_SERVING:
                return f"{primary} ({status})"
    return str(primary)


def problem_lines(snapshot: Mapping[str, Any]) -> list[str]:
    """
    The snapshot's problems as one line each, oldest first.  An account
    error is left out: the account's own block already says it.
    """
    lines = []
    for problem in snapshot.get("problems") or []:
        if not isinstance(problem, Mapping) or problem.get("kind") == ACCOUNT_ERROR:
            continue
        message = str(problem.get("message") or problem.get("kind") or "unknown problem")
        account = problem.get("account")
        if isinstance(account, str) and not message.startswith(account):
            message = f"{account}: {message}"
        lines.append(message)
    return lines


def _signed(value: int) -> str:
    return f"−{tokens(-value)}" if value < 0 else tokens(value)


def history_lines(snapshot: Mapping[str, Any]) -> list[str]:
    """
    The usage history's totals (today, the last seven days): moves, what
    they re-billed, the naive-rotation estimate and what was saved
    against it (both estimates, marked ≈).  Nothing without a history.
    """
    history = snapshot.get("history")
    if not isinstance(history, Mapping):
        return []
    lines = []
    for label, key in (("today", "today"), ("7 days", "week")):
        totals = history.get(key)
        if not isinstance(totals, Mapping):
            continue
        rebilled, naive = _count(totals, "rebilled"), _count(totals, "naiveEstimate")
        lines.append(
            f"  {label}: {_count(totals, 'requests')} reqs · {_count(totals, 'moves')} moves · "
            f"re-billed {tokens(rebilled)} · naive≈ {tokens(naive)} · saved≈ {_signed(naive - rebilled)}"
        )
    if not lines:
        return []
    missed = _count(history, "dropped") + _count(history, "lost")
    if missed:
        lines.append(f"  {missed} request(s) not recorded")
    return ["History (≈ estimates against naive rotation):", *lines]


def render_status(snapshot: Mapping[str, Any], now: float) -> str:
    """
    The snapshot as PRODUCT.md's `nextclaude status` text: a header, the
    C{Active:} line with the totals, the unresolved problems, then one
    block per account (C{>} marks
    the primary, C{★ manual} the pin).  Countdowns count from C{now}.
    """
    accounts = snapshot.get("accounts") or []
    started = snapshot.get("startedAt")
    uptime = now - started if isinstance(started, (int, float)) else snapshot.get("uptime") or 0
    primary = snapshot.get("primary")
    totals = snapshot.get("totals") or {}
    lines = [
        f"NextClaude {snapshot.get('version', '?')} · {len(accounts)} account(s) · "
        f"{snapshot.get('sessions', 0)} session(s) · up {duration(uptime)}"
    ]
    active = [primary_text(snapshot)]
    threshold = snapshot.get("switchThreshold")
    if isinstance(threshold, (int, float)):
        active.append(f"switch at {_percent(threshold)}")
    active.append(f"cache hit {_hit_text(totals)} overall")
    active.append(f"↑{tokens(_count(totals, 'inputTokens'))} ↓{tokens(_count(totals, 'outputTokens'))}")
    active.append(f"{_count(totals, 'requests')} reqs")
    lines.append("Active: " + " · ".join(active))
    shown = problem_lines(snapshot)
    if shown:
        lines.append("Problems:")
        lines.extend(f"  ! {text}" for text in shown)
    lines.extend(history_lines(snapshot))
    for account in accounts:
        lines.extend(_account_lines(account, primary, now))
    return "\n".join(lines)
