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
  hash. Every boundary but the last message's is cacheable (as if each
  request put its breakpoint on the message before the newest, which is what
  a growing conversation needs): the longest boundary already cached on *this*
  account and not expired is ``cache_read_input_tokens``; the rest up to the
  last cacheable boundary is ``cache_creation_input_tokens``, written with the
  TTL the request asks for (``"ttl": "1h"`` anywhere → 1 h, else the default
  5 min); the newest message is ``input_tokens``. Hits refresh the TTL. The
  real API only caches at explicit ``cache_control`` breakpoints and above a
  minimum length; Claude Code always sets breakpoints, so the simulator skips
  those rules.
* **Quota.** A request burns ``input + cache_creation + output +
  cache_read_weight × cache_read`` "quota tokens" (``cache_read_weight``
  defaults to 0.1: PROTOCOL.md warns not to assume reads are free). The whole
  burn is charged when the request is admitted, planned output included, so
  the rate-limit headers of a response already include that response. A 5 h
  and a 7 d window each start at the first admitted request after they were
  empty or expired, and reset 5 h / 7 d later. A request finding either
  window at or over capacity gets a 429 and burns nothing.
* **Time** comes only from the injected reactor, so tests drive everything
  with ``task.Clock``.

Per-request override headers let a test or benchmark shape one response:
``x-sim-deltas``, ``x-sim-delta-interval-ms``, ``x-sim-output-tokens``,
``x-sim-status`` (answer that error status instead), ``x-sim-retry-after``
(with ``x-sim-status``) and ``x-sim-stream-error`` (send ``event: error`` of
that type half-way through the stream, then end it without ``message_stop``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

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
                       prefix: str = "sim") -> list[SimAccount]:
    """``n`` accounts named ``sim-1`` … with deterministic credentials.

    The 7 d capacity defaults to ten 5 h windows, the ratio of SimAccount's
    defaults.
    """
    if seven_day_tokens is None:
        seven_day_tokens = 10 * five_hour_tokens
    return [
        SimAccount(name=f"{prefix}-{i}", credential=sim_credential(f"{prefix}-{i}", kind),
                   kind=kind, five_hour_tokens=five_hour_tokens,
                   seven_day_tokens=seven_day_tokens)
        for i in range(1, n + 1)
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
        headers[f"{p}{w.key}-utilization"] = f"{w.utilization:.4f}"
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
    """

    prefix_hashes: tuple[bytes, ...]
    prefix_tokens: tuple[int, ...]  # cumulative estimate at each boundary
    ttl: float

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


def analyse_prompt(body: dict[str, Any], default_ttl: float = TTL_5M) -> PromptShape:
    """Segment a Messages request body into cacheable prefixes.

    The hash chain starts from the model: caches are per model upstream.
    """
    head: dict[str, Any] = {}
    if "system" in body:
        head["system"] = _stable_system(body["system"])
    if "tools" in body:
        head["tools"] = body["tools"]
    head_text = _canonical(_without_cache_control(head)) if head else ""
    digest = hashlib.sha256(f"{body.get('model', '')}\0{head_text}".encode()).digest()
    tokens = len(head_text) // 4
    hashes, totals = [digest], [tokens]
    for message in body.get("messages", []):
        text = _canonical(_without_cache_control(message))
        digest = hashlib.sha256(digest + text.encode()).digest()
        tokens += len(text) // 4
        hashes.append(digest)
        totals.append(tokens)
    ttl = TTL_1H if _asks_for_1h(body) else default_ttl
    return PromptShape(tuple(hashes), tuple(totals), ttl)


def consult_cache(account: SimAccount, shape: PromptShape, now: float) -> tuple[int, int]:
    """Look the prompt up in the account's cache and write it back.

    Returns ``(cache_read, cache_creation)`` tokens. Every boundary but the
    newest message's is cacheable.
    """
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
    """Per-request shaping from the ``x-sim-*`` headers."""

    deltas: int
    delta_interval: float
    output_tokens: int | None = None
    status: int | None = None
    retry_after: int | None = None
    stream_error: str | None = None


def _int_header(request: Request, name: str, minimum: int, maximum: int) -> int | None:
    raw = request.getHeader(name.encode())
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


def parse_overrides(request: Request, deltas: int, delta_interval: float) -> Overrides:
    header_deltas = _int_header(request, "x-sim-deltas", 0, 100_000)
    interval_ms = _int_header(request, "x-sim-delta-interval-ms", 0, 600_000)
    stream_error = request.getHeader(b"x-sim-stream-error")
    return Overrides(
        deltas=deltas if header_deltas is None else header_deltas,
        delta_interval=delta_interval if interval_ms is None else interval_ms / 1000.0,
        output_tokens=_int_header(request, "x-sim-output-tokens", 1, 10_000_000),
        status=_int_header(request, "x-sim-status", 400, 599),
        retry_after=_int_header(request, "x-sim-retry-after", 0, 86_400),
        stream_error=stream_error.decode("ascii", "replace") if stream_error else None,
    )


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
    error_at = len(reply.chunks) // 2 if overrides.stream_error else None
    for i, chunk in enumerate(reply.chunks):
        if i == error_at:
            break
        steps.append((overrides.delta_interval, sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": chunk}})))
    if overrides.stream_error:
        # A mid-stream failure: the real API ends the stream after the error.
        steps.append((overrides.delta_interval, sse("error", {"type": "error", "error": {
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


class SimulatedAnthropic(Resource):
    """The simulated upstream: ``/v1/messages``, ``count_tokens``, ``/v1/models``."""

    isLeaf = True

    def __init__(self, reactor: IReactorTime, accounts: Iterable[SimAccount], *,
                 delta_interval: float = 0.0, deltas: int = 8,
                 cache_ttl_default: float = TTL_5M, cache_read_weight: float = 0.1,
                 output_tokens_per_delta: int = 5) -> None:
        super().__init__()
        self.reactor = reactor
        self.delta_interval = delta_interval
        self.deltas = deltas
        self.cache_ttl_default = cache_ttl_default
        self.cache_read_weight = cache_read_weight
        self.output_tokens_per_delta = output_tokens_per_delta
        self._by_name: dict[str, SimAccount] = {}
        self._by_credential: dict[str, SimAccount] = {}
        for account in accounts:
            self.add_account(account)
        self._serial = 0
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], bytes | int]] = {
            (b"POST", b"/v1/messages"): self._messages,
            (b"POST", b"/v1/messages/count_tokens"): self._count_tokens,
            (b"GET", b"/v1/models"): self._models,
        }
        # Counters for tests, the demo and benchmarks.
        self.requests = 0  # every HTTP request
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

    # -- dispatch

    def render(self, request: Request) -> bytes | int:
        self.requests += 1
        self._serial += 1
        request.setHeader(b"request-id", self._id("req_sim"))
        handler = self._routes.get((request.method, request.path))
        try:
            if handler is None:
                raise _ApiError(404, f"Not found: {request.method.decode('latin-1')} {request.path.decode('latin-1')}")
            return handler(request)
        except _ApiError as error:
            return self._error(request, error)

    def _id(self, prefix: str) -> str:
        return prefix + hashlib.sha256(f"{prefix}{self._serial}".encode()).hexdigest()[:24]

    def _error(self, request: Request, error: _ApiError) -> bytes:
        request.setResponseCode(error.status, _REASON_PHRASES.get(error.status))
        for name, value in error.headers.items():
            request.setHeader(name, value)
        request_id = request.responseHeaders.getRawHeaders(b"request-id", [b""])[0]
        body = {"type": "error", "error": {"type": error.kind, "message": error.message},
                "request_id": request_id.decode()}
        return self._json(request, error.status, body)

    def _json(self, request: Request, status: int, body: dict[str, Any]) -> bytes:
        self.responses[status] += 1
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _authenticate(self, request: Request) -> SimAccount:
        api_key = request.getHeader(b"x-api-key")
        if api_key is not None:
            account = self._by_credential.get(api_key.decode("latin-1"))
            if account is None or account.kind != "apikey":
                raise _ApiError(401, "invalid x-api-key")
            return account
        authorization = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _ApiError(401, "x-api-key or authorization header is required")
        account = self._by_credential.get(token.strip())
        if account is None or account.kind != "oauth":
            raise _ApiError(401, "Invalid bearer token")
        betas = (request.getHeader(b"anthropic-beta") or b"").decode("latin-1")
        if OAUTH_BETA not in {b.strip() for b in betas.split(",")}:
            raise _ApiError(401, f"OAuth authentication is currently not supported without the {OAUTH_BETA} beta.")
        return account

    # -- endpoints

    def _messages(self, request: Request) -> bytes | int:
        account = self._authenticate(request)
        account.requests += 1
        overrides = parse_overrides(request, self.deltas, self.delta_interval)
        if overrides.status is not None:
            self.injected += 1
            raise self._injected(overrides)
        body = _json_body(request, need_max_tokens=True)
        now = self.reactor.seconds()
        account.roll_windows(now)
        refusal = quota_refusal(account, now)
        if refusal is not None:
            account.rejected += 1
            self.rejected += 1
            raise refusal
        reply = self._serve(account, body, overrides, now)
        for name, value in quota_headers(account, now).items():
            request.setHeader(name, value)
        if body.get("stream"):
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            steps = stream_events(reply, overrides)
        else:
            request.setHeader(b"content-type", b"application/json")
            # A non-streaming answer takes as long as the stream would have.
            wait = overrides.delta_interval * len(reply.chunks)
            steps = [(wait, json.dumps(reply.message()).encode())]
        self.responses[200] += 1
        _PacedWriter(self.reactor, request, steps, self._count_cancel).run()
        return NOT_DONE_YET

    def _injected(self, overrides: Overrides) -> _ApiError:
        status = overrides.status
        headers = {}
        if status == 429:
            # A bare 429, no quota verdict: a transient limit (PROTOCOL.md).
            headers["x-should-retry"] = "true"
        if overrides.retry_after is not None:
            headers["retry-after"] = str(overrides.retry_after)
        message = "Overloaded" if status == 529 else f"Simulated error {status}"
        return _ApiError(status, message, headers)

    def _serve(self, account: SimAccount, body: dict[str, Any], overrides: Overrides,
               now: float) -> Reply:
        """Admit a request: consult the cache, burn quota, count, build the reply."""
        shape = analyse_prompt(body, self.cache_ttl_default)
        read, created = consult_cache(account, shape, now)
        fresh = shape.total_tokens - read - created
        planned = overrides.output_tokens
        if planned is None:
            planned = max(1, overrides.deltas * self.output_tokens_per_delta)
        output = min(planned, body["max_tokens"])
        usage = SimUsage(fresh, created, read, output, shape.ttl)
        account.burn(fresh + created + output + self.cache_read_weight * read, now)
        self._count_usage(account, usage)
        return Reply(
            message_id=self._id("msg_sim"), model=body["model"],
            chunks=_reply_chunks(shape.prefix_hashes[-1], overrides.deltas),
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

    def _count_tokens(self, request: Request) -> bytes:
        self._authenticate(request)
        body = _json_body(request, need_max_tokens=False)
        shape = analyse_prompt(body, self.cache_ttl_default)
        return self._json(request, 200, {"input_tokens": shape.total_tokens})

    def _models(self, request: Request) -> bytes:
        self._authenticate(request)
        data = [{"type": "model", "id": model_id, "display_name": name,
                 "created_at": "2025-01-01T00:00:00Z"} for model_id, name in SIM_MODELS]
        return self._json(request, 200, {"data": data, "has_more": False,
                                         "first_id": data[0]["id"], "last_id": data[-1]["id"]})


def _json_body(request: Request, *, need_max_tokens: bool) -> dict[str, Any]:
    """The request body as a validated Messages request, or a 400."""
    raw = request.content.read() if request.content is not None else b""
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
