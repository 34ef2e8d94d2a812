"""
Accounts, their quota and usage, and the ranking that orders them.

Pure: nothing here touches the reactor.  Every method that depends on time
takes ``now`` (epoch seconds) from its caller, whose clock is injected.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from nextclaude.config import AccountConfig
from nextclaude.quota import QuotaReport, WindowQuota
from nextclaude.usage import Usage


class Status(enum.Enum):
    """
    The one status enum shared by routing, the status endpoint, events and
    the console.
    """

    ACTIVE = "active"
    ARMED = "armed"
    DRAINING = "draining"
    THROTTLED = "throttled"
    EXHAUSTED = "exhausted"
    ERROR = "error"
    # Taken out of rotation by the user (config field enabled: false).
    DISABLED = "disabled"


# Windows that only limit one model family.  Any other window (including
# "7d_oi", whose family the headers do not name) limits the whole account.
MODEL_FAMILY_WINDOWS = {
    "7d_opus": "opus",
    "7d_sonnet": "sonnet",
    "seven_day_opus": "opus",
    "seven_day_sonnet": "sonnet",
}


def model_family(model: str | None) -> str | None:
    """
    The family a model id belongs to ("opus", "sonnet", "haiku"), or None.
    """
    if not model:
        return None
    lowered = model.lower()
    for family in ("opus", "sonnet", "haiku"):
        if family in lowered:
            return family
    return None


# A family value meaning "the account as a whole": per-model windows are
# left out, so one model's weekly limit does not arm the whole account.
ACCOUNT_WIDE = ""


def window_applies(window: str, family: str | None) -> bool:
    """
    Whether a quota window limits a request for a model of C{family}.

    A per-model window counts only for requests naming that family; when the
    family cannot be told (None) it counts account-wide, the cautious
    choice.  L{ACCOUNT_WIDE} asks about the account-wide windows only.
    """
    scoped = MODEL_FAMILY_WINDOWS.get(window)
    if scoped is None or family is None:
        return True
    return scoped == family


@dataclass
class UsageTotals:
    """
    Cumulative usage of one account since the state file was started.
    """

    requests: int = 0
    failures: int = 0
    cold_rebuilds: int = 0
    tokens: Usage = field(default_factory=Usage)

    def record(self, usage: Usage | None, ok: bool) -> None:
        self.requests += 1
        if not ok:
            self.failures += 1
        if usage is not None:
            self.tokens.add(usage)
            if usage.is_cold_rebuild():
                self.cold_rebuilds += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "coldRebuilds": self.cold_rebuilds,
            "inputTokens": self.tokens.input_tokens,
            "outputTokens": self.tokens.output_tokens,
            "cacheReadTokens": self.tokens.cache_read_input_tokens,
            "cacheCreationTokens": self.tokens.cache_creation_input_tokens,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UsageTotals:
        def number(key: str) -> int:
            value = data.get(key)
            return value if type(value) is int and value >= 0 else 0

        return cls(
            requests=number("requests"),
            failures=number("failures"),
            cold_rebuilds=number("coldRebuilds"),
            tokens=Usage(
                input_tokens=number("inputTokens"),
                output_tokens=number("outputTokens"),
                cache_read_input_tokens=number("cacheReadTokens"),
                cache_creation_input_tokens=number("cacheCreationTokens"),
            ),
        )


def _is_live(window: WindowQuota, now: float) -> bool:
    # A window whose reset has passed says nothing any more (Account.live_windows).
    return window.reset is None or window.reset > now


@dataclass
class Account:
    """
    One pooled account: its configuration plus what the proxy learned about
    it at run time (quota windows, throttling, errors, usage).
    """

    config: AccountConfig
    order: int
    windows: dict[str, WindowQuota] = field(default_factory=dict)
    # Set by a quota 429 or a rejected status; cleared when it passes.
    exhausted_until: float | None = None
    throttled_until: float | None = None
    error: str | None = None
    usage: UsageTotals = field(default_factory=UsageTotals)
    last_used: float | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kind(self) -> str:
        return self.config.type

    @property
    def priority(self) -> int:
        return self.config.priority

    @property
    def tier(self) -> str:
        if self.config.tier:
            return self.config.tier
        return "API" if self.kind == "apikey" else "Pro/Max"

    def live_windows(self, now: float) -> dict[str, WindowQuota]:
        """
        The quota windows that have not reset yet.

        A window whose reset time has passed says nothing any more: the
        account has a fresh window, so it is dropped (unknown counts as 0%).
        """
        return {name: window for name, window in self.windows.items() if _is_live(window, now)}

    def utilization(self, window: str, now: float) -> float:
        live = self.live_windows(now).get(window)
        if live is None or live.utilization is None:
            return 0.0
        return live.utilization

    def peak_utilization(self, now: float, family: str | None = None) -> float:
        """
        The highest utilization among the live windows that apply.
        """
        # Asked for every account on every request: no dict of live windows.
        peak = 0.0
        for name, window in self.windows.items():
            if name == "overage" or not _is_live(window, now) or not window_applies(name, family):
                continue
            if window.utilization is not None and window.utilization > peak:
                peak = window.utilization
        return peak

    def rejected(self, now: float, family: str | None = None) -> bool:
        return any(
            window.status == "rejected" and _is_live(window, now) and window_applies(name, family)
            for name, window in self.windows.items()
            if name != "overage"
        )

    def soonest_reset(self, now: float) -> float | None:
        resets = [
            window.reset
            for window in self.live_windows(now).values()
            if window.reset is not None
        ]
        for until in (self.exhausted_until, self.throttled_until):
            if until is not None and until > now:
                resets.append(until)
        return min(resets, default=None)

    def observe_quota(self, report: QuotaReport, now: float) -> None:
        """
        Fold a response's rate-limit headers into what we know.
        """
        if report.windows:
            self.windows = {**self.windows, **report.windows}

    def expire(self, now: float) -> bool:
        """
        Forget windows, exhaustion and throttling whose time has passed.
        Returns whether anything was forgotten.
        """
        changed = False
        live = self.live_windows(now)
        if len(live) != len(self.windows):
            self.windows = live
            changed = True
        if self.exhausted_until is not None and self.exhausted_until <= now:
            self.exhausted_until = None
            changed = True
        if self.throttled_until is not None and self.throttled_until <= now:
            self.throttled_until = None
            changed = True
        return changed

    def next_expiry(self, now: float) -> float | None:
        """
        The next moment L{expire} would change something.
        """
        times = [w.reset for w in self.windows.values() if w.reset is not None and w.reset > now]
        for until in (self.exhausted_until, self.throttled_until):
            if until is not None and until > now:
                times.append(until)
        return min(times, default=None)

    def to_state(self) -> dict[str, Any]:
        return {
            "windows": {
                name: {
                    "utilization": window.utilization,
                    "reset": window.reset,
                    "status": window.status,
                }
                for name, window in self.windows.items()
            },
            "exhaustedUntil": self.exhausted_until,
            "throttledUntil": self.throttled_until,
            "usage": self.usage.to_json(),
            "lastUsed": self.last_used,
        }

    def restore_state(self, data: Mapping[str, Any]) -> None:
        """
        Take back what a previous run saved; anything malformed is skipped.
        """
        windows = data.get("windows")
        if isinstance(windows, dict):
            for name, raw in windows.items():
                if isinstance(name, str) and isinstance(raw, dict):
                    self.windows[name] = WindowQuota(
                        utilization=_number_or_none(raw.get("utilization")),
                        reset=_number_or_none(raw.get("reset")),
                        status=raw.get("status")
                        if isinstance(raw.get("status"), str)
                        else None,
                    )
        self.exhausted_until = _number_or_none(data.get("exhaustedUntil"))
        self.throttled_until = _number_or_none(data.get("throttledUntil"))
        self.last_used = _number_or_none(data.get("lastUsed"))
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.usage = UsageTotals.from_json(usage)


def _number_or_none(value: object) -> float | None:
    # JSON numbers like 1e400 parse as infinity; one would keep an account
    # exhausted forever or make the ranking key raise.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


@dataclass(frozen=True)
class Thresholds:
    switch: float = 0.98
    hard: float = 0.995


class AccountPool:
    """
    The accounts in config order, with the status and ranking rules that
    every routing decision uses.
    """

    def __init__(
        self, accounts: Iterable[AccountConfig], thresholds: Thresholds
    ) -> None:
        self.thresholds = thresholds
        self.accounts: dict[str, Account] = {}
        for order, config in enumerate(accounts):
            self.accounts[config.name] = Account(config=config, order=order)

    def __iter__(self):
        return iter(self.accounts.values())

    def __len__(self) -> int:
        return len(self.accounts)

    def get(self, name: str | None) -> Account | None:
        if name is None:
            return None
        return self.accounts.get(name)

    def update_accounts(self, configs: Iterable[AccountConfig]) -> tuple[list[str], list[str]]:
        """
        Take a new set of account configurations (a reload, a refreshed
        token): accounts keep what was learned about them, new ones start
        fresh, missing ones go.  Returns the names (added, removed).
        """
        previous = self.accounts
        updated: dict[str, Account] = {}
        for order, config in enumerate(configs):
            account = previous.get(config.name)
            if account is None:
                account = Account(config=config, order=order)
            else:
                if account.config.credential != config.credential:
                    # New credentials deserve a new chance.
                    account.error = None
                account.config = config
                account.order = order
            updated[config.name] = account
        self.accounts = updated
        added = [name for name in updated if name not in previous]
        removed = [name for name in previous if name not in updated]
        return added, removed

    def at_ceiling(self, account: Account, now: float, family: str | None = None) -> bool:
        """
        Whether the account must not take more traffic until a reset: at the
        hard threshold, rejected in a window that applies, or told so by a
        quota 429.
        """
        if account.exhausted_until is not None and account.exhausted_until > now:
            return True
        return (
            account.peak_utilization(now, family) >= self.thresholds.hard
            or account.rejected(now, family)
        )

    def serviceable(self, account: Account, now: float, family: str | None = None) -> bool:
        if not account.config.enabled or account.error is not None:
            return False
        if account.throttled_until is not None and account.throttled_until > now:
            return False
        return not self.at_ceiling(account, now, family)

    def status(self, account: Account, now: float) -> Status:
        """
        The account's base status.  The router refines C{active} into
        C{armed} and C{draining} from its own state.
        """
        if not account.config.enabled:
            # The user's choice comes first; an error stays in account.error.
            return Status.DISABLED
        if account.error is not None:
            return Status.ERROR
        # One model's weekly limit does not make the whole account exhausted.
        if self.at_ceiling(account, now, ACCOUNT_WIDE):
            return Status.EXHAUSTED
        if account.throttled_until is not None and account.throttled_until > now:
            return Status.THROTTLED
        return Status.ACTIVE

    def rank_key(self, account: Account, now: float, family: str | None = None) -> tuple:
        """
        DESIGN.md's one sort key, lowest first: priority; any window at or
        over the switch threshold; 5h then 7d utilization rounded to 0.5%;
        config order.
        """
        over = account.peak_utilization(now, family) >= self.thresholds.switch
        return (
            account.priority,
            over,
            _half_percent(account.utilization("5h", now)),
            _half_percent(account.utilization("7d", now)),
            account.order,
        )

    def ranked(
        self,
        now: float,
        family: str | None = None,
        exclude: Callable[[Account], bool] = lambda account: False,
    ) -> list[Account]:
        """
        Serviceable accounts, best first.
        """
        candidates = [
            account
            for account in self
            if not exclude(account) and self.serviceable(account, now, family)
        ]
        candidates.sort(key=lambda account: self.rank_key(account, now, family))
        return candidates


def _half_percent(utilization: float) -> int:
    """
    Utilization in steps of 0.5% so that noise between two nearly equal
    accounts does not decide the order; config order does.
    """
    return round(utilization * 200)
