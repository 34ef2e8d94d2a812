"""
The status snapshot: one JSON schema for the status endpoint, `nextclaude
status --json`, and the console.  Later versions add fields, never rename.
"""

from __future__ import annotations

from typing import Any

from nextclaude import __version__
from nextclaude.humanize import tier_label
from nextclaude.pool import Account
from nextclaude.router import Router


def account_snapshot(router: Router, account: Account, now: float) -> dict[str, Any]:
    windows = {
        name: {
            "utilization": window.utilization,
            "reset": window.reset,
            "status": window.status,
        }
        for name, window in account.live_windows(now).items()
    }
    return {
        "name": account.name,
        "type": account.kind,
        # One vocabulary for an unknown tier (nextclaude.humanize.tier_label).
        "tier": tier_label(account.config.tier, account.kind),
        "priority": account.priority,
        "status": router.status_of(account).value,
        "flags": router.flags_of(account),
        "error": account.error,
        "throttledUntil": account.throttled_until
        if account.throttled_until is not None and account.throttled_until > now
        else None,
        "exhaustedUntil": account.exhausted_until
        if account.exhausted_until is not None and account.exhausted_until > now
        else None,
        "windows": windows,
        "usage": account.usage.to_json(),
        # Added in issue 15 (labels that say what is true): where this
        # draining account's sessions go, and a pin whose traffic spilled.
        "movesTo": router.successor
        if account.name in router.draining and router.successor not in (None, account.name)
        else None,
        "spill": _spill(router, account, now),
    }


def _spill(router: Router, account: Account, now: float) -> dict[str, Any] | None:
    """
    For the manual pin while new traffic goes elsewhere: why (C{full},
    or its status: throttled, error, …), where traffic goes instead, and
    until when (the reset that brings it back), else None.
    """
    if account.name != router.manual or router.primary in (None, account.name):
        return None
    status = router.status_of(account).value
    switch = router.pool.thresholds.switch
    full = [
        window
        for name, window in account.live_windows(now).items()
        if name != "overage"
        and ((window.utilization is not None and window.utilization >= switch) or window.status == "rejected")
    ]
    until: float | None = None
    if full or status in ("armed", "exhausted"):
        why = "full"
        resets = [window.reset for window in full if window.reset is not None]
        if account.exhausted_until is not None and account.exhausted_until > now:
            resets.append(account.exhausted_until)
        # Back when every full window has reset.
        until = max(resets) if resets else None
    else:
        why = status
        if status == "throttled":
            until = account.throttled_until
    return {"why": why, "trafficOn": router.primary, "until": until}


def snapshot(
    router: Router,
    now: float,
    started: float,
    host: str | None,
    port: int | None,
    problems: list[dict[str, Any]] | None = None,
    history: dict[str, Any] | None = None,
) -> dict[str, Any]:
    router.settle()
    accounts = [account_snapshot(router, account, now) for account in router.pool]
    totals: dict[str, int] = {}
    for account in accounts:
        for key, value in account["usage"].items():
            totals[key] = totals.get(key, 0) + value
    return {
        "version": __version__,
        "time": now,
        "startedAt": started,
        "uptime": max(0.0, now - started),
        "listen": {"host": host, "port": port},
        "primary": router.primary,
        # Where the next move goes, and the manual pin (null when none).
        "successor": router.successor,
        "manual": router.manual,
        "sessions": router.tracked_sessions(),
        "switchThreshold": router.pool.thresholds.switch,
        "hardThreshold": router.pool.thresholds.hard,
        "totals": totals,
        "accounts": accounts,
        # Each {account (or null), kind, message, since}: see nextclaude.problems.
        "problems": list(problems or []),
        # Usage history totals (nextclaude.history.HistoryService.snapshot):
        # today's and the week's tokens, moves, re-billed, the naive
        # estimate and what was saved; null without a history.
        "history": history,
    }
