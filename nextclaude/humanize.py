"""
Short human forms of durations and token counts, shared by the command
line, `nextclaude status` and the console.
"""

from __future__ import annotations


def duration(seconds: float) -> str:
    """
    Two units at most, largest first: C{"5d3h"}, C{"4h16m"}, C{"12m"},
    C{"40s"}.
    """
    seconds = max(0, int(round(seconds)))
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
