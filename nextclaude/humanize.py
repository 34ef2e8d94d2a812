"""
Short human forms of durations and token counts, shared by the command
line, `nextclaude status` and the console.
"""

from __future__ import annotations


YEAR = 365 * 86400


def duration(seconds: float) -> str:
    """
    Two units at most, largest first: C{"73y30d"}, C{"5d3h"}, C{"4h16m"},
    C{"12m"}, C{"40s"}.
    """
    seconds = max(0, int(round(seconds)))
    years, rest = divmod(seconds, YEAR)
    if years:
        # A token "valid for 26694d3h" is valid for 73 years: past a year
        # the days say enough, and past a century nothing finer matters.
        days = rest // 86400
        return f"{years}y{days}d" if days and years < 100 else f"{years}y"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def tokens(count: float) -> str:
    """
    C{"950"}, C{"44k"}, C{"2.2M"}: what a glance needs.
    """
    count = float(count)
    if count < 1000:
        return f"{count:.0f}"
    if count < 100_000:
        return f"{count / 1000:.1f}k".replace(".0k", "k")
    if count < 1_000_000:
        return f"{count / 1000:.0f}k"
    return f"{count / 1_000_000:.1f}M".replace(".0M", "M")


# What an account's tier reads as when nobody said: one word everywhere
# (status, the console, `accounts`, login and import messages).
UNKNOWN_SUBSCRIPTION_TIER = "subscription"


def tier_label(tier: str | None, kind: str) -> str:
    """
    The tier as PRODUCT.md names them (Pro, Max, Team, Enterprise, API);
    an API key is "API", a subscription of unknown tier "subscription".
    """
    if tier:
        return tier
    return "API" if kind == "apikey" else UNKNOWN_SUBSCRIPTION_TIER
