"""A simulated Anthropic Messages API for demos, end-to-end tests and benchmarks.

``nextclaude demo`` points the real proxy at this resource on loopback; tests
and benchmarks do the same. It speaks the wire shapes of PROTOCOL.md (SSE
event order, the usage object with its cache fields, unified and API-key
rate-limit headers, the API error shape) over a model that is deliberately
simple and deterministic:

* **Tokens.** A prompt is cut into segments: system+tools, then each message.
  A segment's size is ``len(canonical JSON) // 4``. ``count_tokens`` and the
  three input fields of ``usage`` always add up to the same total.
* **Prompt cache, per account.** Each segment boundary has a chained prefix
  hash. By default every boundary but the last message's is cacheable (as if
  each request put its breakpoint on the message before the newest): the
  longest boundary already cached on *this* account and not expired is
  ``cache_read_input_tokens``; the rest up to the last cacheable boundary is
  ``cache_creation_input_tokens``, written with the TTL the request asks for
  (``"ttl": "1h"`` anywhere → 1 h, else the default 5 min); the newest
  message is ``input_tokens``. With ``honour_breakpoints=True`` the prompt is
  cacheable up to its last ``cache_control`` breakpoint instead, as upstream:
  Claude Code marks its newest message, so its whole prompt is cache_read or
  cache_creation and ``input_tokens`` is 0, and a request without any
  breakpoint caches nothing. Hits refresh the TTL. The real API also needs a
  minimum length and looks back at most 20 blocks from a breakpoint; the
  simulator skips those rules.
* **Quota.** A request burns ``input + creation_weight × cache_creation +
  output_weight × output + cache_read_weight × cache_read`` "quota tokens":
  uncached tokens and output (``cache_read_weight`` defaults to 0.1:
  PROTOCOL.md warns not to assume reads are free; 0.0 models free reads;
  the other weights default to 1). The whole
  burn is charged when the request is admitted, planned output included, so
  the rate-limit headers of a response already include that response. A 5 h
  and a 7 d window each start at the first admitted request after they were
  empty or expired, and reset 5 h / 7 d later. A request finding either
  window at or over capacity gets a 429 and burns nothing.
* **Time** comes only from the injected reactor (or the ``now`` given to
  :meth:`SimulatedAnthropic.answer`), so tests drive everything with
  ``task.Clock``.

:meth:`SimulatedAnthropic.answer` computes an answer (a :class:`SimAnswer`)
from credential headers and a body without any HTTP objects; the HTTP path
goes through the same code and only adds the wire shape and the pacing, so a
replay on a virtual clock and an end-to-end run see the same simulator.

Per-request override headers let a test or benchmark shape one response:
``x-sim-deltas``, ``x-sim-delta-interval-ms``, ``x-sim-output-tokens``,
``x-sim-status`` (answer that error status instead), ``x-sim-retry-after``
(with ``x-sim-status``) and ``x-sim-stream-error`` (send ``event: error`` of
that type half-way through the stream, then end it without ``message_stop``).
``answer`` honours the same headers, or an :class:`Overrides` passed to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import directlyProvides, providedBy

OAUTH_BETA = "oauth-2025-04-20"
FIVE_HOURS = 5 * 3600.0
SEVEN_DAYS = 7 * 24 * 3600.0
TTL_5M = 300.0
TTL_1H = 3600.0
WARNING_UTILIZATION = 0.8
# Claude Code puts a per-request billing block first in `system`; the real
# cache evidently ignores it (or Claude Code would never hit), so do we.
BILLING_BLOCK_PREFIX = "x-anthropic-billing-header"

SIM_MODELS = (
    ("claude-opus-4-1-20250805", "Claude Opus 4.1"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
# Twisted has no reason phrase for 529; without one it sends "Unknown Status".
_REASON_PHRASES = {529: b"Overloaded"}

_WORDS = (
    "Simulated", "reply", "from", "the", "NextClaude", "test", "upstream:",
    "every", "token", "here", "is", "deterministic", "and", "cheap.",
)


class _ApiError(Exception):
    """An answer in the API error shape; handlers raise it, render writes it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.kind = kind or _ERROR_TYPES.get(status, "api_error")
        self.account: str | None = None  # the authenticated account, once known


# --------------------------------------------------------------------------
# Accounts and their quota windows


@dataclass(frozen=True)
class WindowView:
    """One quota window of an account as seen at one moment."""

    key: str  # "5h" / "7d", as in the header names
    claim: str  # "five_hour" / "seven_day", as in representative-claim
    used: float
    capacity: int
    reset: float  # epoch seconds; now + length when the window has not started

    @property
    def utilization(self) -> float:
        return self.used / max(self.capacity, 1)

    @property
    def remaining(self) -> float:
        return max(0.0, self.capacity - self.used)

    @property
    def status(self) -> str:
        if self.utilization >= 1.0:
            return "rejected"
        if self.utilization >= WARNING_UTILIZATION:
            return "allowed_warning"
        return "allowed"


@dataclass
class SimAccount:
    """One simulated account: credential, quota windows, prompt cache, counters."""

    name: str
    credential: str  # bearer token (kind "oauth") or x-api-key (kind "apikey")
    kind: str = "oauth"
    five_hour_tokens: int = 2_000_000
    seven_day_tokens: int = 20_000_000
    used_5h: float = 0.0
    used_7d: float = 0.0
    window_5h_start: float | None = None
    window_7d_start: float | None = None
    requests: int = 0  # authenticated /v1/messages requests, whatever the answer
    rejected: int = 0  # quota 429s
    # API-key accounts only: requests allowed per 5 h window (requests-* headers).
    request_limit: int = 4000
    window_requests: int = 0
    input_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    # prefix hash -> expiry (reactor seconds)
    cache: dict[bytes, float] = field(default_factory=dict, repr=False, compare=False)
    _cache_prune_at: int = field(default=4096, init=False, repr=False, compare=False)

    # Rounds the utilization headers down to this step (0.01, 0.05): real
    # headers carry two decimals, so a policy must not need finer readings.
    utilization_step: float = 0.0

    def credential_headers(self) -> dict[str, str]:
        """The credential header this account is sent with (lowercase name).

        An OAuth account also needs ``oauth-2025-04-20`` in ``anthropic-beta``.
        """
        if self.kind == "oauth":
            return {"authorization": f"Bearer {self.credential}"}
        return {"x-api-key": self.credential}

    def roll_windows(self, now: float) -> None:
        """Empty any window whose period has ended."""
        if self.window_5h_start is not None and now >= self.window_5h_start + FIVE_HOURS:
            self.window_5h_start = None
            self.used_5h = 0.0
            self.window_requests = 0
        if self.window_7d_start is not None and now >= self.window_7d_start + SEVEN_DAYS:
            self.window_7d_start = None
            self.used_7d = 0.0

    def windows(self, now: float) -> tuple[WindowView, WindowView]:
        """The 5 h and 7 d windows (call roll_windows first)."""
        return (
            _view("5h", "five_hour", self.used_5h, self.five_hour_tokens,
                  self.window_5h_start, FIVE_HOURS, now),
            _view("7d", "seven_day", self.used_7d, self.seven_day_tokens,
                  self.window_7d_start, SEVEN_DAYS, now),
        )

    def burn(self, tokens: float, now: float) -> None:
        """Charge an admitted request, starting any window not yet running."""
        if self.window_5h_start is None:
            self.window_5h_start = now
        if self.window_7d_start is None:
            self.window_7d_start = now
        self.used_5h += tokens
        self.used_7d += tokens
        self.window_requests += 1


def _view(key: str, claim: str, used: float, capacity: int, start: float | None,
          length: float, now: float) -> WindowView:
    reset = (start if start is not None else now) + length
    return WindowView(key, claim, used, capacity, reset)


def sim_credential(name: str, kind: str = "oauth") -> str:
    """A random-looking but deterministic credential for a simulated account."""
    digest = hashlib.sha256(f"nextclaude-sim:{kind}:{name}".encode()).digest()
    body = base64.urlsafe_b64encode(digest + hashlib.sha256(digest).digest()).decode()
    prefix = "sk-ant-oat01-sim" if kind == "oauth" else "sk-ant-api03-sim"
    return prefix + body.rstrip("=")


def simulated_accounts(n: int, five_hour_tokens: int = 2_000_000,
                       seven_day_tokens: int | None = None, *, kind: str = "oauth",
                       prefix: str = "sim", sizes: Iterable[float] | None = None,
                       utilization_step: float = 0.0) -> list[SimAccount]:
    """``n`` accounts named ``sim-1`` … with deterministic credentials.

    The 7 d capacity defaults to ten 5 h windows, the ratio of SimAccount's
    defaults.  ``sizes`` (one per account) multiplies both windows, for
    pools of mixed tiers (Pro 1, Max 5x 5, Max 20x 20).
    """
    if seven_day_tokens is None:
        seven_day_tokens = 10 * five_hour_tokens
    factors = list(sizes) if sizes is not None else [1.0] * n
    if len(factors) != n:
        raise ValueError("one size per account")
    return [
        SimAccount(name=f"{prefix}-{i}", credential=sim_credential(f"{prefix}-{i}", kind),
                   kind=kind, five_hour_tokens=round(five_hour_tokens * size),
                   seven_day_tokens=round(seven_day_tokens * size),
                   utilization_step=utilization_step)
        for i, size in zip(range(1, n + 1), factors)
    ]


# --------------------------------------------------------------------------
# Rate-limit headers


def _epoch(t: float) -> str:
    # Round up: a client waiting until this second never retries too early.
    return str(math.ceil(t))


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(math.ceil(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _blocking(windows: Iterable[WindowView]) -> WindowView | None:
    """The full window that keeps the account shut longest, if any."""
    full = [w for w in windows if w.status == "rejected"]
    return max(full, key=lambda w: w.reset) if full else None


def _rounded(utilization: float, step: float) -> float:
    if step <= 0:
        return utilization
    # The small epsilon keeps 0.3 / 0.01 from flooring to 29 steps.
    return math.floor(utilization / step + 1e-9) * step


def unified_headers(account: SimAccount, now: float) -> dict[str, str]:
    """The ``anthropic-ratelimit-unified-*`` headers of a subscription account."""
    five, seven = account.windows(now)
    # The representative window is the one that blocks, else the fuller one.
    representative = _blocking((five, seven)) or (seven if seven.utilization > five.utilization else five)
    order = ("allowed", "allowed_warning", "rejected")
    status = max(five.status, seven.status, key=order.index)
    p = "anthropic-ratelimit-unified-"
    headers = {p + "status": status}
    for w in (five, seven):
        headers[f"{p}{w.key}-status"] = w.status
        headers[f"{p}{w.key}-utilization"] = f"{_rounded(w.utilization, account.utilization_step):.4f}"
        headers[f"{p}{w.key}-reset"] = _epoch(w.reset)
    headers[p + "reset"] = _epoch(representative.reset)
    headers[p + "representative-claim"] = representative.claim
    headers[p + "overage-status"] = "rejected"
    headers[p + "overage-disabled-reason"] = "org_level_disabled"
    return headers


def api_key_headers(account: SimAccount, now: float) -> dict[str, str]:
    """The ``anthropic-ratelimit-{requests,tokens}-*`` headers of an API-key account.

    Simplification: real API-key limits are per minute; here the tokens-*
    headers describe whichever of the 5 h / 7 d windows has less left, and
    requests-* counts requests in the 5 h window.
    """
    five, seven = account.windows(now)
    tokens = seven if seven.remaining < five.remaining else five
    p = "anthropic-ratelimit-"
    return {
        p + "requests-limit": str(account.request_limit),
        p + "requests-remaining": str(max(0, account.request_limit - account.window_requests)),
        p + "requests-reset": _rfc3339(five.reset),
        p + "tokens-limit": str(tokens.capacity),
        p + "tokens-remaining": str(int(tokens.remaining)),
        p + "tokens-reset": _rfc3339(tokens.reset),
    }


def quota_headers(account: SimAccount, now: float) -> dict[str, str]:
    if account.kind == "oauth":
        return unified_headers(account, now)
    return api_key_headers(account, now)


def quota_refusal(account: SimAccount, now: float) -> _ApiError | None:
    """The 429 an account owes a new request right now, or None to admit it."""
    five, seven = account.windows(now)
    blocking = _blocking((five, seven))
    if account.kind != "oauth" and blocking is None and account.window_requests >= account.request_limit:
        blocking = five
    if blocking is None:
        return None
    headers = quota_headers(account, now)
    headers["retry-after"] = str(max(1, math.ceil(blocking.reset - now)))
    if account.kind == "oauth":
        message = f"This request would exceed your account's rate limit ({blocking.claim})."
    else:
        message = "This request would exceed your organization's rate limit."
    return _ApiError(429, message, headers)


# --------------------------------------------------------------------------
# Prompt shape, token estimate and the prompt cache


@dataclass(frozen=True)
class PromptShape:
    """Where a prompt can be cached, and how big it is up to each point.

    Index 0 is the boundary after system+tools, index i after message i.
    ``last_breakpoint`` is the last boundary at or before an explicit
    ``cache_control`` (0 when only system or tools carry one), None when the
    request sets no breakpoint at all.
    """

    prefix_hashes: tuple[bytes, ...]
    prefix_tokens: tuple[int, ...]  # cumulative estimate at each boundary
    ttl: float
    last_breakpoint: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prefix_tokens[-1]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _without_cache_control(value: Any) -> Any:
    # Claude Code moves its breakpoints to the newest messages every turn; if
    # the markers were part of the hash, no prefix would ever match again.
    if isinstance(value, dict):
        return {k: _without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_without_cache_control(v) for v in value]
    return value


def _asks_for_1h(value: Any) -> bool:
    if isinstance(value, dict):
        control = value.get("cache_control")
        if isinstance(control, dict) and control.get("ttl") == "1h":
            return True
        return any(_asks_for_1h(v) for v in value.values())
    if isinstance(value, list):
        return any(_asks_for_1h(v) for v in value)
    return False


def _stable_system(system: Any) -> Any:
    if not isinstance(system, list):
        return system
    return [
        block for block in system
        if not (isinstance(block, dict)
                and str(block.get("text", "")).startswith(BILLING_BLOCK_PREFIX))
    ]


def segment_chars(segment: Any) -> int:
    """Characters of one prompt segment (a message, or the ``{"system": …,
    "tools": …}`` head) as the simulator measures it: its canonical JSON with
    ``cache_control`` markers left out."""
    return len(_canonical(_without_cache_control(segment)))


def segment_tokens(segment: Any) -> int:
    """The simulator's token estimate of one prompt segment: ``segment_chars // 4``."""
    return segment_chars(segment) // 4


def analyse_prompt(body: dict[str, Any], default_ttl: float = TTL_5M) -> PromptShape:
    """Segment a Messages request body into cacheable prefixes.

    The hash chain starts from the model: caches are per model upstream.
    """
    # The canonical JSON of {"system": …, "tools": …} (keys sorted), built
    # from memoised parts: the tools and system blocks are the same objects
    # request after request.
    parts: list[bytes] = []
    marked_head = one_hour = False
    if "system" in body:
        system = _stable_system(body["system"])
        if isinstance(system, list):
            blocks = [_message_facts(block) for block in system]
            parts.append(b'"system":[' + b",".join(b[0] for b in blocks) + b"]")
            marked_head = any(b[1] for b in blocks)
            one_hour = any(b[2] for b in blocks)
        else:
            parts.append(b'"system":' + _message_facts(system)[0])
    if "tools" in body:
        encoded, marked, asks_1h = _message_facts(body["tools"])
        parts.append(b'"tools":' + encoded)
        marked_head, one_hour = marked_head or marked, one_hour or asks_1h
    head_bytes = b"{" + b",".join(parts) + b"}" if parts else b""
    digest = hashlib.sha256(body.get("model", "").encode() + b"\0" + head_bytes).digest()
    tokens = _chars(head_bytes) // 4
    hashes, totals = [digest], [tokens]
    last_breakpoint = 0 if marked_head else None
    for i, message in enumerate(body.get("messages", []), start=1):
        encoded, marked, asks_1h = _message_facts(message)
        digest = hashlib.sha256(digest + encoded).digest()
        tokens += _chars(encoded) // 4
        hashes.append(digest)
        totals.append(tokens)
        if marked:
            last_breakpoint = i
        one_hour = one_hour or asks_1h
    ttl = TTL_1H if one_hour else default_ttl
    return PromptShape(tuple(hashes), tuple(totals), ttl, last_breakpoint)


# Replays send the same message objects again every turn (the history only
# grows), and canonicalising them each time made the simulator quadratic.
# Keyed by id() with the object kept alive, so an id is never reused while
# its entry exists; bounded, so HTTP bodies (new objects each time) do not
# pile up.
_MESSAGE_MEMO: dict[int, tuple[Any, bytes, bool, bool]] = {}
_MESSAGE_MEMO_LIMIT = 50_000


def _chars(encoded: bytes) -> int:
    return len(encoded) if encoded.isascii() else len(encoded.decode())


def _message_facts(message: Any) -> tuple[bytes, bool, bool]:
    """A message's canonical bytes (markers left out), whether it carries a
    breakpoint, and whether one asks for the 1 h TTL."""
    entry = _MESSAGE_MEMO.get(id(message))
    if entry is not None and entry[0] is message:
        return entry[1], entry[2], entry[3]
    encoded = _canonical(_without_cache_control(message)).encode()
    facts = (encoded, _has_cache_control(message), _asks_for_1h(message))
    if len(_MESSAGE_MEMO) >= _MESSAGE_MEMO_LIMIT:
        _MESSAGE_MEMO.clear()
    _MESSAGE_MEMO[id(message)] = (message, *facts)
    return facts


def _has_cache_control(value: Any) -> bool:
    if isinstance(value, dict):
        return "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_cache_control(v) for v in value)
    return False


def consult_cache(account: SimAccount, shape: PromptShape, now: float,
                  honour_breakpoints: bool = False) -> tuple[int, int]:
    """Look the prompt up in the account's cache and write it back.

    Returns ``(cache_read, cache_creation)`` tokens. By default every boundary
    but the newest message's is cacheable. With ``honour_breakpoints``, as
    upstream, the prompt is cacheable up to its last ``cache_control``
    breakpoint (Claude Code's is on the newest message, so its whole prompt
    is) and a request without breakpoints reads and writes nothing. Either
    way the lookup takes the longest cached boundary, with no 20-block
    look-back limit.
    """
    if honour_breakpoints:
        if shape.last_breakpoint is None:
            return 0, 0
        cacheable = shape.last_breakpoint + 1
    else:
        cacheable = max(1, len(shape.prefix_hashes) - 1)
    read = 0
    for i in range(cacheable - 1, -1, -1):
        expiry = account.cache.get(shape.prefix_hashes[i])
        if expiry is not None and expiry > now:
            read = shape.prefix_tokens[i]
            break
    created = shape.prefix_tokens[cacheable - 1] - read
    # Writing every boundary refreshes the hit's TTL too; never shorten an
    # entry a 1 h request wrote because a 5 min request touched it.
    expiry = now + shape.ttl
    for digest in shape.prefix_hashes[:cacheable]:
        account.cache[digest] = max(account.cache.get(digest, 0.0), expiry)
    _prune(account, now)
    return read, created


def _prune(account: SimAccount, now: float) -> None:
    # Amortised: long benchmarks would otherwise keep every prefix forever.
    if len(account.cache) <= account._cache_prune_at:
        return
    account.cache = {h: e for h, e in account.cache.items() if e > now}
    account._cache_prune_at = max(4096, 2 * len(account.cache))


@dataclass(frozen=True)
class SimUsage:
    """The usage of one simulated response."""

    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    output_tokens: int
    ttl: float

    def cache_creation(self) -> dict[str, int]:
        one_hour = self.ttl >= TTL_1H
        return {
            "ephemeral_5m_input_tokens": 0 if one_hour else self.cache_creation_input_tokens,
            "ephemeral_1h_input_tokens": self.cache_creation_input_tokens if one_hour else 0,
        }

    def full(self, output_tokens: int | None = None) -> dict[str, Any]:
        """The ``usage`` of a message object (``message_start`` reports 1 output token)."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": self.cache_creation(),
            "output_tokens": self.output_tokens if output_tokens is None else output_tokens,
            "service_tier": "standard",
        }

    def delta(self) -> dict[str, int]:
        """The cumulative ``usage`` of ``message_delta``, input fields repeated."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens,
        }


# --------------------------------------------------------------------------
# Responses


@dataclass(frozen=True)
class Overrides:
    """Per-request shaping, from the ``x-sim-*`` headers or built directly.

    ``None`` means "the simulator's default" (see :meth:`resolved`).
    """

    deltas: int | None = None
    delta_interval: float | None = None
    output_tokens: int | None = None
    status: int | None = None
    retry_after: int | None = None
    stream_error: str | None = None

    def resolved(self, deltas: int, delta_interval: float) -> Overrides:
        """These overrides with the pacing defaults filled in."""
        return replace(
            self,
            deltas=deltas if self.deltas is None else self.deltas,
            delta_interval=delta_interval if self.delta_interval is None else self.delta_interval,
        )


def _int_header(headers: Mapping[str, str], name: str, minimum: int, maximum: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if not minimum <= value <= maximum:
        # Loud on purpose: a typo in a test header should not pass silently.
        raise _ApiError(400, f"{name} must be an integer in [{minimum}, {maximum}]")
    return value


def overrides_from_headers(headers: Mapping[str, str]) -> Overrides:
    """The ``x-sim-*`` overrides among request headers (lowercase names).

    Raises the simulator's 400 (an ``_ApiError``) on a malformed value.
    """
    interval_ms = _int_header(headers, "x-sim-delta-interval-ms", 0, 600_000)
    return Overrides(
        deltas=_int_header(headers, "x-sim-deltas", 0, 100_000),
        delta_interval=None if interval_ms is None else interval_ms / 1000.0,
        output_tokens=_int_header(headers, "x-sim-output-tokens", 1, 10_000_000),
        status=_int_header(headers, "x-sim-status", 400, 599),
        retry_after=_int_header(headers, "x-sim-retry-after", 0, 86_400),
        stream_error=headers.get("x-sim-stream-error") or None,
    )


def request_headers(request: Request) -> dict[str, str]:
    """A request's headers as lowercase names to (last) values, as ``answer`` takes them."""
    return {
        name.decode("latin-1").lower(): values[-1].decode("latin-1")
        for name, values in request.requestHeaders.getAllRawHeaders()
        if values
    }


def parse_overrides(request: Request, deltas: int, delta_interval: float) -> Overrides:
    """The ``x-sim-*`` overrides of an HTTP request, pacing defaults filled in."""
    return overrides_from_headers(request_headers(request)).resolved(deltas, delta_interval)


@dataclass(frozen=True)
class Reply:
    """Everything needed to write one successful message, streamed or not."""

    message_id: str
    model: str
    chunks: tuple[str, ...]
    usage: SimUsage
    stop_reason: str

    def message(self) -> dict[str, Any]:
        return {
            "id": self.message_id, "type": "message", "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": "".join(self.chunks)}],
            "stop_reason": self.stop_reason, "stop_sequence": None,
            "usage": self.usage.full(),
        }


def _reply_chunks(seed: bytes, deltas: int) -> tuple[str, ...]:
    # Seeded by the prompt, so the same conversation always gets the same text.
    start = seed[0]
    return tuple(_WORDS[(start + i) % len(_WORDS)] + " " for i in range(deltas))


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_events(reply: Reply, overrides: Overrides) -> list[tuple[float, bytes]]:
    """The SSE events of a reply, each with the pause to take before it."""
    start = {
        "id": reply.message_id, "type": "message", "role": "assistant",
        "model": reply.model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": reply.usage.full(output_tokens=1),
    }
    steps = [
        (0.0, sse("message_start", {"type": "message_start", "message": start})),
        (0.0, sse("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}})),
        (0.0, sse("ping", {"type": "ping"})),
    ]
    interval = overrides.delta_interval or 0.0
    error_at = len(reply.chunks) // 2 if overrides.stream_error else None
    for i, chunk in enumerate(reply.chunks):
        if i == error_at:
            break
        steps.append((interval, sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": chunk}})))
    if overrides.stream_error:
        # A mid-stream failure: the real API ends the stream after the error.
        steps.append((interval, sse("error", {"type": "error", "error": {
            "type": overrides.stream_error, "message": "Simulated mid-stream error"}})))
        return steps
    steps += [
        (0.0, sse("content_block_stop", {"type": "content_block_stop", "index": 0})),
        (0.0, sse("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                                    "usage": reply.usage.delta()})),
        (0.0, sse("message_stop", {"type": "message_stop"})),
    ]
    return steps


class _PacedWriter:
    """Writes chunks to a request, pausing on the reactor where a chunk asks to.

    Stops, cancelling its pending call, when the client goes away.
    """

    def __init__(self, reactor: IReactorTime, request: Request,
                 steps: list[tuple[float, bytes]], on_cancel: Callable[[], None]) -> None:
        self._reactor = reactor
        self._request = request
        self._steps = steps
        self._next = 0
        self._paused = False
        self._call: IDelayedCall | None = None
        self._gone = False
        self._on_cancel = on_cancel
        request.notifyFinish().addErrback(self._client_gone)

    def run(self) -> None:
        self._call = None
        if self._gone:
            return
        while self._next < len(self._steps):
            delay, data = self._steps[self._next]
            if delay > 0 and not self._paused:
                self._paused = True
                self._call = self._reactor.callLater(delay, self.run)
                return
            self._paused = False
            self._next += 1
            self._request.write(data)
        self._request.finish()

    def _client_gone(self, reason: Failure) -> None:
        self._gone = True
        if self._call is not None and self._call.active():
            self._call.cancel()
            self._call = None
            self._on_cancel()


# --------------------------------------------------------------------------
# The resource


@dataclass(frozen=True)
class SimAnswer:
    """The simulator's answer to one request, without any HTTP objects.

    ``headers`` has lowercase names: ``request-id``, the rate-limit headers of
    the account (on 200s and quota 429s), ``retry-after`` and
    ``x-should-retry`` where they apply. ``message`` is the JSON body of a 200
    (the non-streaming message of a Messages request; ``{"input_tokens": n}``
    for ``count_tokens``; the model list for ``/v1/models``); ``usage`` is the
    full usage object of a served message. ``error`` is ``(type, message)``
    for anything else. ``chunks`` is the text as the stream's deltas, and
    ``account`` the name of the account the credentials named, if any.
    """

    status: int
    headers: dict[str, str]
    usage: dict[str, Any] | None = None
    message: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    chunks: tuple[str, ...] = ()
    account: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def text(self) -> str:
        """The reply text of a served message ("" otherwise)."""
        return "".join(self.chunks)

    @property
    def request_id(self) -> str:
        return self.headers.get("request-id", "")

    @property
    def retry_after(self) -> float | None:
        """``retry-after`` in seconds, if the answer carries one."""
        raw = self.headers.get("retry-after")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    def json_body(self) -> dict[str, Any]:
        """The JSON the HTTP path sends (for a stream: the message it adds up to)."""
        if self.error is not None:
            kind, message = self.error
            return {"type": "error", "error": {"type": kind, "message": message},
                    "request_id": self.request_id}
        return self.message or {}


@dataclass(frozen=True)
class _Outcome:
    """An answer plus what only the HTTP rendering needs."""

    answer: SimAnswer
    reply: Reply | None = None  # a served message
    stream: bool = False
    overrides: Overrides | None = None


_Handler = Callable[[Mapping[str, str], "bytes | dict[str, Any]", float, "Overrides | None", str], _Outcome]


class SimulatedAnthropic(Resource):
    """The simulated upstream: ``/v1/messages``, ``count_tokens``, ``/v1/models``.

    :meth:`answer` computes an answer without HTTP; ``render`` (the HTTP path)
    goes through the same code and only adds the wire shape and the pacing.
    """

    isLeaf = True

    def __init__(self, reactor: IReactorTime, accounts: Iterable[SimAccount], *,
                 delta_interval: float = 0.0, deltas: int = 8,
                 cache_ttl_default: float = TTL_5M, cache_read_weight: float = 0.1,
                 output_tokens_per_delta: int = 5, default_output_tokens: int | None = None,
                 honour_breakpoints: bool = False, output_weight: float = 1.0,
                 creation_weight: float = 1.0) -> None:
        super().__init__()
        self.reactor = reactor
        self.delta_interval = delta_interval
        self.deltas = deltas
        self.cache_ttl_default = cache_ttl_default
        # Quota cost of a cache-read token; 0.0 models "cache reads are free".
        self.cache_read_weight = cache_read_weight
        # Quota weights of output and cache-creation tokens: upstream's
        # formula is unknown, so benchmarks try several.
        self.output_weight = output_weight
        self.creation_weight = creation_weight
        self.output_tokens_per_delta = output_tokens_per_delta
        # Output of a message without x-sim-output-tokens; None: deltas × per delta.
        self.default_output_tokens = default_output_tokens
        # See consult_cache: True caches up to the request's last breakpoint, as upstream.
        self.honour_breakpoints = honour_breakpoints
        self._by_name: dict[str, SimAccount] = {}
        self._by_credential: dict[str, SimAccount] = {}
        for account in accounts:
            self.add_account(account)
        self._serial = 0
        self._routes: dict[tuple[bytes, bytes], _Handler] = {
            (b"POST", b"/v1/messages"): self._messages,
            (b"POST", b"/v1/messages/count_tokens"): self._count_tokens,
            (b"GET", b"/v1/models"): self._models,
        }
        # Counters for tests, the demo and benchmarks.
        self.requests = 0  # every request, HTTP or answer()
        self.served = 0  # successful /v1/messages answers
        self.rejected = 0  # quota 429s
        self.injected = 0  # x-sim-status answers
        self.cancelled = 0  # paced responses the client left before the end
        self.responses: Counter[int] = Counter()
        self.input_tokens = 0
        self.cache_creation_tokens = 0
        self.cache_read_tokens = 0
        self.output_tokens = 0

    # -- accounts

    def add_account(self, account: SimAccount) -> None:
        if account.name in self._by_name or account.credential in self._by_credential:
            raise ValueError(f"duplicate simulated account {account.name!r}")
        if account.kind not in ("oauth", "apikey"):
            raise ValueError(f"unknown account kind {account.kind!r}")
        self._by_name[account.name] = account
        self._by_credential[account.credential] = account

    def account(self, name: str) -> SimAccount:
        return self._by_name[name]

    @property
    def accounts(self) -> list[SimAccount]:
        return list(self._by_name.values())

    # -- the pure answer

    def answer(self, credential_headers: Mapping[str, str], body: bytes | dict[str, Any],
               now: float | None = None, overrides: Overrides | None = None, *,
               path: bytes | str = b"/v1/messages") -> SimAnswer:
        """Answer one POST as the HTTP path would, without HTTP.

        ``credential_headers`` maps lowercase header names to values: the
        credential (``authorization`` or ``x-api-key``) and ``anthropic-beta``
        at least; any ``x-sim-*`` headers among them apply unless
        ``overrides`` is given, which then replaces them. ``now`` defaults to
        the reactor's clock. Admits, burns quota, consults and updates the
        cache and counts exactly as an HTTP request would. ``path`` may carry
        a query string; ``/v1/messages/count_tokens`` counts tokens.
        """
        route = path.encode("latin-1") if isinstance(path, str) else path
        return self._handle(b"POST", route, credential_headers, body, now, overrides).answer

    def _handle(self, method: bytes, path: bytes, headers: Mapping[str, str],
                body: bytes | dict[str, Any], now: float | None,
                overrides: Overrides | None) -> _Outcome:
        self.requests += 1
        self._serial += 1
        request_id = self._id("req_sim")
        route = path.split(b"?", 1)[0]
        handler = self._routes.get((method, route))
        at = self.reactor.seconds() if now is None else now
        try:
            if handler is None:
                raise _ApiError(404, f"Not found: {method.decode('latin-1')} {route.decode('latin-1')}")
            outcome = handler(headers, body, at, overrides, request_id)
        except _ApiError as error:
            outcome = _Outcome(SimAnswer(
                status=error.status, headers={"request-id": request_id, **error.headers},
                error=(error.kind, error.message), account=error.account))
        self.responses[outcome.answer.status] += 1
        return outcome

    def _id(self, prefix: str) -> str:
        return prefix + hashlib.sha256(f"{prefix}{self._serial}".encode()).hexdigest()[:24]

    def _authenticate(self, headers: Mapping[str, str]) -> SimAccount:
        api_key = headers.get("x-api-key")
        if api_key is not None:
            account = self._by_credential.get(api_key)
            if account is None or account.kind != "apikey":
                raise _ApiError(401, "invalid x-api-key")
            return account
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _ApiError(401, "x-api-key or authorization header is required")
        account = self._by_credential.get(token.strip())
        if account is None or account.kind != "oauth":
            raise _ApiError(401, "Invalid bearer token")
        betas = headers.get("anthropic-beta", "")
        if OAUTH_BETA not in {b.strip() for b in betas.split(",")}:
            raise _ApiError(401, f"OAuth authentication is currently not supported without the {OAUTH_BETA} beta.")
        return account

    # -- endpoints

    def _messages(self, headers: Mapping[str, str], raw: bytes | dict[str, Any], now: float,
                  overrides: Overrides | None, request_id: str) -> _Outcome:
        account = self._authenticate(headers)
        account.requests += 1
        try:
            if overrides is None:
                overrides = overrides_from_headers(headers)
            overrides = overrides.resolved(self.deltas, self.delta_interval)
            if overrides.status is not None:
                self.injected += 1
                raise self._injected(overrides)
            body = _json_body(raw, need_max_tokens=True)
            account.roll_windows(now)
            refusal = quota_refusal(account, now)
            if refusal is not None:
                account.rejected += 1
                self.rejected += 1
                raise refusal
        except _ApiError as error:
            error.account = account.name
            raise
        reply = self._serve(account, body, overrides, now, request_id)
        answer = SimAnswer(
            status=200, headers={"request-id": request_id, **quota_headers(account, now)},
            usage=reply.usage.full(), message=reply.message(), chunks=reply.chunks,
            account=account.name)
        return _Outcome(answer, reply, bool(body.get("stream")), overrides)

    def _injected(self, overrides: Overrides) -> _ApiError:
        status = overrides.status or 500
        headers = {}
        if status == 429:
            # A bare 429, no quota verdict: a transient limit (PROTOCOL.md).
            headers["x-should-retry"] = "true"
        if overrides.retry_after is not None:
            headers["retry-after"] = str(overrides.retry_after)
        message = "Overloaded" if status == 529 else f"Simulated error {status}"
        return _ApiError(status, message, headers)

    def _serve(self, account: SimAccount, body: dict[str, Any], overrides: Overrides,
               now: float, request_id: str = "") -> Reply:
        """Admit a request: consult the cache, burn quota, count, build the reply."""
        shape = analyse_prompt(body, self.cache_ttl_default)
        read, created = consult_cache(account, shape, now, self.honour_breakpoints)
        fresh = shape.total_tokens - read - created
        deltas = overrides.deltas if overrides.deltas is not None else self.deltas
        planned = overrides.output_tokens
        if planned is None:
            planned = self.default_output_tokens
        if planned is None:
            planned = max(1, deltas * self.output_tokens_per_delta)
        output = min(planned, body["max_tokens"])
        usage = SimUsage(fresh, created, read, output, shape.ttl)
        # The quota burn: uncached input (input + cache creation) and output,
        # plus cache reads at their weight.
        account.burn(fresh + self.creation_weight * created + self.output_weight * output
                     + self.cache_read_weight * read, now)
        self._count_usage(account, usage)
        return Reply(
            message_id=self._id("msg_sim"), model=body["model"],
            chunks=_reply_chunks(shape.prefix_hashes[-1], deltas),
            usage=usage, stop_reason="max_tokens" if output < planned else "end_turn",
        )

    def _count_usage(self, account: SimAccount, usage: SimUsage) -> None:
        self.served += 1
        for holder in (self, account):
            holder.input_tokens += usage.input_tokens
            holder.cache_creation_tokens += usage.cache_creation_input_tokens
            holder.cache_read_tokens += usage.cache_read_input_tokens
            holder.output_tokens += usage.output_tokens

    def _count_cancel(self) -> None:
        self.cancelled += 1

    def _count_tokens(self, headers: Mapping[str, str], raw: bytes | dict[str, Any], now: float,
                      overrides: Overrides | None, request_id: str) -> _Outcome:
        account = self._authenticate(headers)
        try:
            body = _json_body(raw, need_max_tokens=False)
        except _ApiError as error:
            error.account = account.name
            raise
        shape = analyse_prompt(body, self.cache_ttl_default)
        return _Outcome(SimAnswer(200, {"request-id": request_id},
                                  message={"input_tokens": shape.total_tokens},
                                  account=account.name))

    def _models(self, headers: Mapping[str, str], raw: bytes | dict[str, Any], now: float,
                overrides: Overrides | None, request_id: str) -> _Outcome:
        account = self._authenticate(headers)
        data = [{"type": "model", "id": model_id, "display_name": name,
                 "created_at": "2025-01-01T00:00:00Z"} for model_id, name in SIM_MODELS]
        return _Outcome(SimAnswer(200, {"request-id": request_id}, account=account.name, message={
            "data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}))

    # -- the HTTP path

    def render(self, request: Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        outcome = self._handle(request.method, request.path, request_headers(request), body, None, None)
        answer = outcome.answer
        request.setResponseCode(answer.status, _REASON_PHRASES.get(answer.status))
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        reply, overrides = outcome.reply, outcome.overrides
        if reply is None or overrides is None:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(answer.json_body()).encode()
        if outcome.stream:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            steps = stream_events(reply, overrides)
        else:
            request.setHeader(b"content-type", b"application/json")
            # A non-streaming answer takes as long as the stream would have.
            wait = (overrides.delta_interval or 0.0) * len(reply.chunks)
            steps = [(wait, json.dumps(answer.json_body()).encode())]
        _PacedWriter(self.reactor, request, steps, self._count_cancel).run()
        return NOT_DONE_YET


def _json_body(raw: bytes | dict[str, Any], *, need_max_tokens: bool) -> dict[str, Any]:
    """The request body as a validated Messages request, or a 400."""
    if isinstance(raw, dict):
        body: Any = raw
    else:
        try:
            body = json.loads(raw)
        except ValueError as exc:  # includes UnicodeDecodeError
            raise _ApiError(400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "Request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise _ApiError(400, "model: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "messages: at least one message is required")
    if need_max_tokens:
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _ApiError(400, "max_tokens: Field required (a positive integer)")
    return body


# --------------------------------------------------------------------------
# Serving on loopback


class _QuietSite(Site):
    """A Site without access log: the demo console owns the terminal and
    benchmarks should not pay for a log line per request."""

    noisy = False

    def log(self, request: Request) -> None:
        pass


class _ConnectionTracker(WrappingFactory):
    """Remembers open connections so they can be closed on shutdown.

    Keep-alive clients (the SDK, the proxy's pool) leave sockets open after
    their last request; a test's reactor must end clean.
    """

    noisy = False

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def close_connections(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()
        return d


def listen_simulator(reactor: IReactorTCP, sim: SimulatedAnthropic, port: int = 0,
                     interface: str = "127.0.0.1") -> IListeningPort:
    """Serve ``sim`` over plain HTTP; stop it with :func:`stop_simulator`."""
    site = _QuietSite(sim, reactor=reactor)
    return reactor.listenTCP(port, _ConnectionTracker(site), interface=interface)


def stop_simulator(port: IListeningPort) -> Deferred[None]:
    """Stop listening and close every open connection; fires when all are gone."""

    async def stop() -> None:
        await maybeDeferred(port.stopListening)
        tracker = getattr(port, "factory", None)
        if isinstance(tracker, _ConnectionTracker):
            await tracker.close_connections()

    return Deferred.fromCoroutine(stop())


class VirtualTimeReactor:
    """
    The real reactor for sockets, a L{Clock} for time: servers and clients
    talk over real loopback connections while quota windows, cache TTLs and
    timeouts follow a clock the caller moves (tests of timeouts, and the
    end-to-end benchmark that replays hours of traffic in seconds).
    """

    def __init__(self, real: Any, clock: Any) -> None:
        self._real = real
        self._clock = clock
        directlyProvides(self, *list(providedBy(real)))

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, *args: Any, **kw: Any) -> Any:
        return self._clock.callLater(*args, **kw)

    def getDelayedCalls(self) -> Any:
        return self._clock.getDelayedCalls()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
