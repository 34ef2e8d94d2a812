"""Rate-limit response headers -> QuotaReport, and back.

Pure: no reactor, no clock (pass ``now`` where a wall time is needed).
Every header is parsed defensively: a malformed value is ignored, never fatal,
because a proxy that dies on one odd header loses every stream it carries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

__all__ = [
    "ApiLimit",
    "QuotaReport",
    "WindowQuota",
    "parse_rate_limit_headers",
    "quota_headers",
]

UNIFIED = "anthropic-ratelimit-unified-"
API = "anthropic-ratelimit-"
OVERAGE = "overage"
REJECTED = "rejected"
_ALLOWED = frozenset({"allowed", "allowed_warning"})

# Window names seen so far use [a-z0-9_] only ("7d_oi"); refusing hyphens
# keeps "<name>-<field>" unambiguous against multi-word field names.
_WINDOW_KEY = re.compile(
    r"([a-z0-9_]+)-(status|utilization|reset|surpassed-threshold|disabled-reason)",
    re.ASCII,
)
_API_KEY = re.compile(r"([a-z0-9_-]+)-(limit|remaining|reset)", re.ASCII)
# Stricter than float(): no "nan"/"inf", no sign, no "1_000", ASCII digits only.
_DECIMAL = re.compile(r"\+?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_INTEGER = re.compile(r"\+?\d{1,30}", re.ASCII)


@dataclass(frozen=True, slots=True)
class WindowQuota:
    utilization: float | None = None
    reset: float | None = None
    status: str | None = None
    surpassed_threshold: float | None = None


@dataclass(frozen=True, slots=True)
class ApiLimit:
    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None


@dataclass(frozen=True, slots=True)
class QuotaReport:
    status: str | None = None
    reset: float | None = None
    representative_claim: str | None = None
    windows: Mapping[str, WindowQuota] = field(default_factory=dict)
    overage_disabled_reason: str | None = None
    fallback: str | None = None
    fallback_percentage: float | None = None
    api_limits: Mapping[str, ApiLimit] = field(default_factory=dict)
    retry_after: float | None = None
    should_retry: bool | None = None

    @property
    def has_unified(self) -> bool:
        return bool(self.windows) or any(
            v is not None
            for v in (
                self.status,
                self.reset,
                self.representative_claim,
                self.overage_disabled_reason,
                self.fallback,
                self.fallback_percentage,
            )
        )

    @property
    def is_empty(self) -> bool:
        return not (
            self.has_unified
            or self.api_limits
            or self.retry_after is not None
            or self.should_retry is not None
        )

    def rejected_windows(self) -> list[str]:
        # The overage window is the extra-usage budget, not a subscription
        # window: its rejection alone says nothing about the account's quota.
        return sorted(
            name
            for name, w in self.windows.items()
            if name != OVERAGE and w.status == REJECTED
        )

    def is_rejected(self) -> bool:
        # Real exhausted-window 429s may carry only per-window headers, and a
        # rejected aggregate with overage allowed still means the window is
        # spent (the request is merely billed as extra usage).
        return self.status == REJECTED or bool(self.rejected_windows())

    def overage_in_use(self) -> bool:
        overage = self.windows.get(OVERAGE)
        return (
            overage is not None
            and overage.status in _ALLOWED
            and self.is_rejected()
        )

    def soonest_reset(self) -> float | None:
        rejected = [self.windows[n].reset for n in self.rejected_windows()]
        for candidates in (
            rejected,
            [self.reset],
            [w.reset for w in self.windows.values()],
            [a.reset for a in self.api_limits.values()],
        ):
            known = [r for r in candidates if r is not None]
            if known:
                return min(known)
        return None


def _number(value: str) -> float | None:
    value = value.strip()
    if not _DECIMAL.fullmatch(value):
        return None
    result = float(value)
    # Huge exponents overflow to inf without raising.
    return result if math.isfinite(result) else None


def _integer(value: str) -> int | None:
    value = value.strip()
    return int(value) if _INTEGER.fullmatch(value) else None


def _text(value: str) -> str | None:
    return value.strip() or None


def _status(value: str) -> str | None:
    return value.strip().lower() or None


def _rfc3339(value: str) -> float | None:
    value = value.strip()
    number = _number(value)
    if number is not None:
        # Not RFC 3339, but an epoch here is unambiguous and cheap to accept.
        return number
    try:
        # fromisoformat refuses the lowercase "t"/"z" RFC 3339 allows.
        moment = datetime.fromisoformat(value.upper())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        result = moment.timestamp()
    except (ValueError, OverflowError):
        return None
    return result if result >= 0 else None


def _retry_after(value: str, now: float | None) -> float | None:
    seconds = _number(value)
    if seconds is not None or now is None:
        return seconds
    try:
        moment = parsedate_to_datetime(value.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = moment.timestamp() - now
    # email.utils reports garbage through several exception types.
    except (ValueError, TypeError, OverflowError, IndexError, AttributeError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


_AGGREGATE = {
    "status": ("status", _status),
    "reset": ("reset", _number),
    "representative-claim": ("representative_claim", _text),
    "fallback": ("fallback", _text),
    "fallback-percentage": ("fallback_percentage", _number),
    "overage-disabled-reason": ("overage_disabled_reason", _text),
}
_WINDOW_FIELDS = {
    "status": ("status", _status),
    "utilization": ("utilization", _number),
    "reset": ("reset", _number),
    "surpassed-threshold": ("surpassed_threshold", _number),
}
_API_FIELDS = {
    "limit": ("limit", _integer),
    "remaining": ("remaining", _integer),
    "reset": ("reset", _rfc3339),
}


def parse_rate_limit_headers(
    headers: Mapping[str, str], now: float | None = None
) -> QuotaReport:
    """Read every rate-limit header we know; ignore anything else or malformed.

    ``headers`` maps lowercase names to the (last) value; ``now`` is epoch
    seconds, needed only to turn an HTTP-date ``retry-after`` into a delay.
    """
    report: dict[str, object] = {}
    windows: dict[str, dict[str, object]] = {}
    api_limits: dict[str, dict[str, object]] = {}
    for raw_name, raw_value in headers.items():
        if not isinstance(raw_name, str) or not isinstance(raw_value, str):
            continue
        name = raw_name.strip().lower()
        if name == "retry-after":
            _put(report, "retry_after", _retry_after(raw_value, now))
        elif name == "x-should-retry":
            flag = raw_value.strip().lower()
            if flag in ("true", "false"):
                report["should_retry"] = flag == "true"
        elif name.startswith(UNIFIED):
            rest = name[len(UNIFIED) :]
            if rest in _AGGREGATE:
                attr, convert = _AGGREGATE[rest]
                _put(report, attr, convert(raw_value))
            elif match := _WINDOW_KEY.fullmatch(rest):
                window, key = match.groups()
                if key in _WINDOW_FIELDS:
                    attr, convert = _WINDOW_FIELDS[key]
                    _put(windows.setdefault(window, {}), attr, convert(raw_value))
        elif name.startswith(API):
            if match := _API_KEY.fullmatch(name[len(API) :]):
                kind, key = match.groups()
                attr, convert = _API_FIELDS[key]
                _put(api_limits.setdefault(kind, {}), attr, convert(raw_value))
    return QuotaReport(
        **report,  # type: ignore[arg-type]
        windows={n: WindowQuota(**f) for n, f in windows.items() if f},  # type: ignore[arg-type]
        api_limits={n: ApiLimit(**f) for n, f in api_limits.items() if f},  # type: ignore[arg-type]
    )


def _put(target: dict[str, object], key: str, value: object) -> None:
    if value is not None:
        target[key] = value


def _format_number(value: float) -> str:
    # Integral values (epoch resets) read better without ".0"; repr() of any
    # other finite float parses back to exactly the same float.
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _format_rfc3339(value: float) -> str | None:
    try:
        moment = datetime.fromtimestamp(value, timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None
    return moment.isoformat().replace("+00:00", "Z")


def quota_headers(report: QuotaReport) -> dict[str, str]:
    """The headers that ``parse_rate_limit_headers`` reads back as ``report``.

    Used for the proxy's synthetic 429 and by the simulator; ``retry_after``
    is written as delta-seconds.
    """
    out: dict[str, str] = {}

    def put(name: str, value: object) -> None:
        if value is None:
            return
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, int):
            out[name] = str(value)
        elif isinstance(value, float):
            if math.isfinite(value):
                out[name] = _format_number(float(value))
        else:
            out[name] = str(value)

    for key, (attr, _) in _AGGREGATE.items():
        put(UNIFIED + key, getattr(report, attr))
    for window, quota in report.windows.items():
        for key, (attr, _) in _WINDOW_FIELDS.items():
            put(f"{UNIFIED}{window}-{key}", getattr(quota, attr))
    for kind, limit in report.api_limits.items():
        put(f"{API}{kind}-limit", limit.limit)
        put(f"{API}{kind}-remaining", limit.remaining)
        if limit.reset is not None:
            put(f"{API}{kind}-reset", _format_rfc3339(limit.reset))
    put("retry-after", report.retry_after)
    put("x-should-retry", report.should_retry)
    return out
