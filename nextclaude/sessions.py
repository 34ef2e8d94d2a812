"""
Session identity and compaction detection for Claude Code traffic.

Pure: no reactor, no I/O; the clock is passed in as C{now} floats.

L{inspect_request} runs on every proxied request, whose body can be tens of
megabytes, so it works with byte searches over the raw body and decodes the
JSON at most once, only when a rule needs it: a marker search hit that must
be confirmed, or a request without any session id whose key has to be
hashed from its stable prefix.  L{SessionTable} keeps per-session state (the
pinned account, cache TTL, compaction cycle) and reports the session's
I{cheap moments}: the points where moving it to another account costs little
or nothing in prompt-cache rebuilds.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nextclaude.bytesearch import contains

__all__ = [
    "CONTINUATION_MARKER",
    "LANDING_LAPSE",
    "MAX_SESSIONS",
    "Moment",
    "RequestFacts",
    "SIZE_DROP_MIN_PEAK",
    "SUMMARY_MARKER",
    "Session",
    "SessionTable",
    "TTL_1H",
    "TTL_5M",
    "inspect_request",
]

# The core of Claude Code's compaction instruction ("Your task is to create a
# detailed summary of the conversation so far, ...").  Only the core phrase,
# so wording changes around it do not break detection.
SUMMARY_MARKER = b"create a detailed summary of the conversation"
# How the first message of a compacted conversation begins.
CONTINUATION_MARKER = "This session is being continued from a previous conversation"

LANDING_LAPSE = 600.0
SIZE_DROP_MIN_PEAK = 50_000
TTL_5M, TTL_1H = 300.0, 3600.0
MAX_SESSIONS = 10_000

# Keys for the session-id sources share one prefix: Claude Code sends the
# same uuid in the header and in metadata.user_id, and a request that lost
# its header must still land in the same session.
_ID_PREFIX = "s:"
_HASH_PREFIX = "p:"
_MAX_ID_LENGTH = 200
_SOURCES = frozenset({"header", "metadata", "prefix"})

_MESSAGES = b"/v1/messages"
_COUNT_TOKENS = b"/v1/messages/count_tokens"

_SUMMARY_TEXT = SUMMARY_MARKER.decode("ascii")
_CONTINUATION_BYTES = CONTINUATION_MARKER.encode("ascii")
_BILLING_PREFIX = "x-anthropic-billing-header"

# Claude Code serialises "model" first; looking further would scan message
# text of other clients for nothing.
_MODEL_WINDOW = 4096
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
# Matched at each "cache_control" occurrence (a handful per request), so the
# whole body is walked once by bytes.find.  An unescaped quoted key cannot
# come from message text: quotes inside JSON strings are escaped.
_CACHE_CONTROL = b'"cache_control"'
_TTL_1H = re.compile(rb'"cache_control"\s*:\s*\{[^{}]{0,200}?"ttl"\s*:\s*"1h"')
_MAX_TOKENS_KEY = b'"max_tokens"'
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d{1,12})(?![\d.eE])')
# Claude Code writes max_tokens after metadata, near the end; its side
# requests (max_tokens 1) are tiny.  Looking further back would scan the
# whole history of a large request whose max_tokens sits elsewhere.
_MAX_TOKENS_WINDOW = 64 * 1024
_USER_ID_KEY = b'"user_id"'
_USER_ID = re.compile(rb'"user_id"\s*:\s*"((?:[^"\\]|\\.){1,1000})"')
# The cheap path only trusts a user_id that opens the metadata object, the
# way Claude Code writes it; anything else is confirmed from the parsed body.
_METADATA_OPEN = re.compile(rb'"metadata"\s*:\s*\{\s*\Z')
_LEGACY_SESSION = re.compile(r"_session_([0-9A-Za-z-]{1,200})\Z")

# Module-level so tests can count decodes.
_loads = json.loads


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """
    What one request says about its session, found cheaply.

    C{session_key} is C{"s:<id>"} for a Claude Code session id (from the
    C{X-Claude-Code-Session-Id} header or from C{metadata.user_id}; the same
    id gives the same key whichever carried it), C{"p:<32 hex>"} for a hash
    of the stable prompt prefix, or L{None} for requests that are not
    Messages API calls or whose body could not be read.  C{key_source} says
    which: C{"header"}, C{"metadata"} or C{"prefix"}.

    C{uses_cache} says whether the body carries any C{cache_control}: a
    request without one says nothing about the session's cache TTL.

    C{side_kind} names what a small request beside the conversation is, for
    the logs: C{"count"} (count_tokens), C{"quota"} (the C{max_tokens: 1}
    quota check) or C{"title"} (a Haiku request without C{cache_control},
    the way Claude Code asks for a session title); L{None} otherwise.  Only
    the first two are C{is_side_request}: a title's usage still counts
    toward its session.
    """

    session_key: str | None
    key_source: str | None
    model: str | None
    body_size: int
    cache_ttl: float
    is_compaction: bool
    starts_with_continuation: bool
    is_side_request: bool
    uses_cache: bool = True
    side_kind: str | None = None
    # Claude Code's x-claude-code-agent-id: set on a subagent's requests
    # (beside the session's id), never on the main thread's.
    agent_id: str | None = None


_UNPARSED: Any = object()


def _parse(body: bytes) -> dict[str, Any] | None:
    try:
        data = _loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and UnicodeDecodeError.
        return None
    return data if isinstance(data, dict) else None


def _sane_id(value: object) -> str | None:
    if (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
    ):
        return value
    return None


def _header_id(header: bytes | None) -> str | None:
    if not header:
        return None
    try:
        value = header.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    return _sane_id(value)


def _session_from_user_id(user_id: object) -> str | None:
    """
    The session id inside a C{metadata.user_id} value: a JSON string holding
    an object with C{session_id} (2.1.x), or the legacy
    C{user_<hex>_account_<uuid>_session_<uuid>} form.
    """
    if not isinstance(user_id, str):
        return None
    text = user_id.strip()
    if text.startswith("{"):
        try:
            inner = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if isinstance(inner, dict):
            return _sane_id(inner.get("session_id"))
        return None
    match = _LEGACY_SESSION.search(text)
    return match.group(1) if match else None


def _metadata_id_cheap(body: bytes) -> str | None:
    # metadata comes after the (huge) messages in Claude Code's key order,
    # so search from the end.
    at = body.rfind(_USER_ID_KEY)
    if at < 0 or not _METADATA_OPEN.search(body, max(0, at - 64), at):
        return None
    match = _USER_ID.match(body, at)
    if match is None:
        return None
    try:
        user_id = json.loads(b'"' + match.group(1) + b'"')
    except ValueError:
        return None
    return _session_from_user_id(user_id)


def _metadata_id(data: dict[str, Any]) -> str | None:
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        return _session_from_user_id(metadata.get("user_id"))
    return None


def _prefix_key(data: dict[str, Any]) -> str:
    """
    A hash of what stays fixed for a whole conversation: model, system text
    and tool names.  Never messages: Claude Code rewrites the first message
    after a compaction.  The billing block carries a per-request value.
    """
    model = data.get("model")
    system = data.get("system")
    texts: list[str] = []
    if isinstance(system, str):
        texts.append(system)
    elif isinstance(system, list):
        for block in system:
            if isinstance(block, dict):
                text = block.get("text")
                if isinstance(text, str) and not text.lstrip().startswith(_BILLING_PREFIX):
                    texts.append(text)
    names: list[str] = []
    tools = data.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                names.append(tool["name"])
    stable = json.dumps([model if isinstance(model, str) else None, texts, names])
    return _HASH_PREFIX + hashlib.sha256(stable.encode("ascii")).hexdigest()[:32]


def _texts(content: object) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                text = block.get("text")
                if isinstance(text, str):
                    yield text


def _last_user_asks_summary(data: dict[str, Any]) -> bool:
    messages = data.get("messages")
    if not isinstance(messages, list):
        return False
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return any(_SUMMARY_TEXT in text for text in _texts(message.get("content")))
    return False


def _first_user_continues(data: dict[str, Any]) -> bool:
    """
    Whether the conversation's first user message opens with the
    continuation marker.  Any of its text blocks may: Claude Code merges
    context it prepends (C{<system-reminder>} blocks) into the same message,
    ahead of the summary.
    """
    messages = data.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            return any(
                text.lstrip().startswith(CONTINUATION_MARKER)
                for text in _texts(message.get("content"))
            )
    return False


def _not_messages(size: int) -> RequestFacts:
    return RequestFacts(None, None, None, size, TTL_5M, False, False, False, False)


def inspect_request(
    path: bytes,
    session_header: bytes | None,
    body: bytes,
    landing_pending: Callable[[str], bool] | None = None,
    agent_header: bytes | None = None,
) -> RequestFacts:
    """
    Read the session facts of one request (the caller passes only POSTs).

    C{landing_pending(key)}, when given, says whether the session waits for
    its post-compaction request; when it does not, the continuation marker
    is not looked for (every request of a compacted session carries it, and
    confirming it costs a JSON parse).  C{agent_header} is the request's
    C{x-claude-code-agent-id}, which Claude Code 2.1.197 sends on a
    subagent's requests only (seen on the wire; not in PROTOCOL.md yet);
    kept when it is a sane id.

    Never raises: on a malformed body the facts are what the byte scans
    found, e.g. the session from the header.
    """
    size = len(body)
    route = path.split(b"?", 1)[0]
    if route == _MESSAGES:
        count_tokens = False
    elif route == _COUNT_TOKENS:
        count_tokens = True
    else:
        return _not_messages(size)

    parsed: dict[str, Any] | None = _UNPARSED

    def data() -> dict[str, Any] | None:
        nonlocal parsed
        if parsed is _UNPARSED:
            parsed = _parse(body)
        return parsed

    key: str | None = None
    source: str | None = None
    session_id = _header_id(session_header)
    if session_id is not None:
        key, source = _ID_PREFIX + session_id, "header"
    else:
        session_id = _metadata_id_cheap(body)
        if session_id is not None:
            key, source = _ID_PREFIX + session_id, "metadata"

    ttl = TTL_5M
    uses_cache = False
    # From the end: Claude Code's 1-hour breakpoints sit on the system and
    # the last messages, so the search stops after the tools, not the history.
    at = body.rfind(_CACHE_CONTROL)
    while at >= 0:
        uses_cache = True
        if _TTL_1H.match(body, at):
            ttl = TTL_1H
            break
        at = body.rfind(_CACHE_CONTROL, 0, at)

    is_compaction = False
    if contains(body, SUMMARY_MARKER):
        parsed_body = data()
        is_compaction = parsed_body is not None and _last_user_asks_summary(parsed_body)

    continues = False
    wanted = landing_pending is None or key is None or landing_pending(key)
    if wanted and contains(body, _CONTINUATION_BYTES):
        parsed_body = data()
        continues = parsed_body is not None and _first_user_continues(parsed_body)

    if key is None:
        parsed_body = data()
        if parsed_body is not None:
            session_id = _metadata_id(parsed_body)
            if session_id is not None:
                key, source = _ID_PREFIX + session_id, "metadata"
            else:
                key, source = _prefix_key(parsed_body), "prefix"

    model: str | None = None
    side = count_tokens
    if parsed is not _UNPARSED and parsed is not None:
        value = parsed.get("model")
        if isinstance(value, str) and len(value) <= 200:
            model = value
        max_tokens = parsed.get("max_tokens")
        side = side or (type(max_tokens) is int and max_tokens == 1)
    else:
        match = _MODEL.search(body, 0, _MODEL_WINDOW)
        if match is not None:
            try:
                model = match.group(1).decode("utf-8")
            except UnicodeDecodeError:
                model = None
        if not side:
            at = body.rfind(_MAX_TOKENS_KEY, max(0, size - _MAX_TOKENS_WINDOW))
            if at >= 0:
                match = _MAX_TOKENS.match(body, at)
                side = match is not None and int(match.group(1)) == 1

    side_kind: str | None = None
    if count_tokens:
        side_kind = "count"
    elif side:
        side_kind = "quota"
    elif not uses_cache and model is not None and "haiku" in model.lower():
        side_kind = "title"

    return RequestFacts(
        session_key=key,
        key_source=source,
        model=model,
        body_size=size,
        cache_ttl=ttl,
        is_compaction=is_compaction,
        starts_with_continuation=continues,
        is_side_request=side,
        uses_cache=uses_cache,
        side_kind=side_kind,
        agent_id=_header_id(agent_header),
    )


@dataclass
class Session:
    """
    What the proxy remembers about one Claude Code session.

    C{last_seen} and C{ttl} come from its main requests (side requests do not
    keep a cache warm); C{last_request} is any request, and orders eviction.
    """

    key: str
    key_source: str
    account: str | None = None
    left: dict[str, float] = field(default_factory=dict)
    ttl: float = TTL_5M
    last_seen: float = 0.0
    compaction_pending_since: float | None = None
    peak_body: int = 0
    # Its usage in the current compaction cycle and in its recent completed
    # ones: uncached tokens (input, cache creation, output) and, apart,
    # cache reads, whose quota weight placement learns.
    cycle_tokens: int = 0
    cycle_costs: list[int] = field(default_factory=list)
    cycle_reads: int = 0
    cycle_read_costs: list[int] = field(default_factory=list)
    compactions: int = 0
    last_request: float = 0.0
    # When it was placed on its account: among sessions that started
    # together, the earlier placed keep their place (placement.py).
    placed: float = 0.0
    # Its main context in the current cycle, from the responses' usage
    # (input + cache creation + cache reads): where the cycle began, its
    # largest so far, how many requests grew it, by how much in all and at
    # what uncached usage, and the uncached usage of the cycle's first
    # request.  With the context it
    # compacted at, they project the cycle's length and cost (placement.py).
    cycle_base: int = 0
    cycle_base_tokens: int = 0
    context: int = 0
    cycle_steps: int = 0
    cycle_growth: int = 0
    cycle_step_tokens: int = 0
    # The prompt of its last compaction request: the context it compacts at.
    compacted_at: int = 0

    def idle_expired(self, now: float) -> bool:
        """Its prompt cache has gone cold on every account."""
        return now - self.last_seen > self.ttl

    def expected_cycle_cost(self) -> int | None:
        """Mean usage units of its recent completed compaction cycles."""
        if not self.cycle_costs:
            return None
        return round(sum(self.cycle_costs) / len(self.cycle_costs))

    def record_usage(self, uncached_tokens: int, cache_reads: int = 0) -> None:
        """Add a response's uncached tokens (input + cache creation + output) and cache reads to the current cycle."""
        if type(uncached_tokens) is int and uncached_tokens > 0:
            self.cycle_tokens += uncached_tokens
        if type(cache_reads) is int and cache_reads > 0:
            self.cycle_reads += cache_reads

    def record_context(self, prompt: int, uncached_tokens: int, compaction: bool = False) -> None:
        """
        A main request's prompt size (input + cache creation + cache reads)
        and uncached usage: the context it carried.  A compaction request's
        prompt is the context the session compacts at.  A smaller prompt (a
        subagent's, a title's) leaves the main context alone.
        """
        if type(prompt) is not int or prompt <= 0:
            return
        if compaction:
            self.compacted_at = prompt
            return
        if self.context == 0:
            self.cycle_base = self.context = prompt
            self.cycle_base_tokens = max(0, uncached_tokens) if type(uncached_tokens) is int else 0
        elif prompt > self.context:
            self.cycle_steps += 1
            self.cycle_growth += prompt - self.context
            self.cycle_step_tokens += max(0, uncached_tokens) if type(uncached_tokens) is int else 0
            self.context = prompt

    def _close_cycle(self) -> None:
        if self.context:
            # Until the compaction request's own usage says it exactly (a
            # session keyed by its prefix has no compaction request).
            self.compacted_at = self.context
        self.cycle_base = self.cycle_base_tokens = self.context = 0
        self.cycle_steps = self.cycle_growth = self.cycle_step_tokens = 0
        self.cycle_costs.append(self.cycle_tokens)
        del self.cycle_costs[:-_KEPT_CYCLES]
        self.cycle_tokens = 0
        self.cycle_read_costs.append(self.cycle_reads)
        del self.cycle_read_costs[:-_KEPT_CYCLES]
        self.cycle_reads = 0
        self.compactions += 1


_KEPT_CYCLES = 5


class Moment(enum.Enum):
    """Which point of its life a session's request marks."""

    NONE = "none"
    # The compaction request or its retry: stays on the warm account.
    COMPACTION = "compaction"
    # The first request after the compaction: small, so cheap to move.
    LANDING = "landing"
    # Prefix-hash fallback for a compaction: the body shrank sharply.
    SIZE_DROP = "size-drop"
    # First request after idling past its cache TTL: cold everywhere.
    IDLE = "idle"


def _number(value: object) -> float | None:
    if type(value) in (int, float) and math.isfinite(value):
        return float(value)
    return None


class SessionTable:
    """
    Sessions by key, least recently requested first, bounded in number and
    in idle time.  Eviction is amortised into L{observe}.
    """

    def __init__(self, max_sessions: int = MAX_SESSIONS, idle_eviction: float = 2 * TTL_1H) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.idle_eviction = idle_eviction
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: str) -> Session | None:
        return self._sessions.get(key)

    def sessions(self) -> Iterable[Session]:
        return list(self._sessions.values())

    def observe(self, facts: RequestFacts, now: float) -> tuple[Session | None, Moment]:
        """
        Record one request of a session and say which moment it marks.

        Side requests and a subagent's requests only look the session up:
        they never compact, land, shrink or idle a session, and do not
        refresh its cache clock (a subagent's conversation is cached apart
        from the main thread's).
        """
        key = facts.session_key
        if key is None:
            return None, Moment.NONE
        sessions = self._sessions
        session = sessions.get(key)
        existed = session is not None
        if session is None:
            session = Session(key, facts.key_source or "prefix", last_seen=now)
            sessions[key] = session
        else:
            sessions.move_to_end(key)
        session.last_request = now
        self._evict(now)
        if facts.is_side_request or facts.agent_id is not None:
            return session, Moment.NONE

        idle = existed and session.idle_expired(now)
        moment = Moment.NONE
        pending = session.compaction_pending_since
        if pending is not None and now - pending > LANDING_LAPSE:
            pending = session.compaction_pending_since = None
        if facts.is_compaction:
            if pending is None:
                session._close_cycle()
            # else: a retry of the same compaction, same cycle.
            session.compaction_pending_since = now
            moment = Moment.COMPACTION
        elif pending is not None and facts.starts_with_continuation:
            session.compaction_pending_since = None
            moment = Moment.LANDING

        if session.key_source == "prefix":
            size = facts.body_size
            peak = session.peak_body
            if peak >= SIZE_DROP_MIN_PEAK and size < peak / 2 and not facts.is_compaction:
                session.peak_body = size
                if moment is Moment.NONE:
                    moment = Moment.SIZE_DROP
                    if session.compaction_pending_since is None:
                        session._close_cycle()
                    else:
                        # The compaction already closed this cycle; the
                        # shrunken request is its landing.
                        session.compaction_pending_since = None
            elif moment is Moment.LANDING:
                session.peak_body = size
            elif size > peak:
                session.peak_body = size

        session.last_seen = now
        if facts.uses_cache:
            session.ttl = facts.cache_ttl
        return session, (Moment.IDLE if idle else moment)

    def _evict(self, now: float) -> None:
        sessions = self._sessions
        while sessions:
            oldest = next(iter(sessions.values()))
            if len(sessions) > self.max_sessions or now - oldest.last_request > self.idle_eviction:
                sessions.popitem(last=False)
            else:
                break

    def forget_account(self, name: str) -> None:
        """An account was removed: unpin its sessions and forget it was left."""
        for session in self._sessions.values():
            if session.account == name:
                session.account = None
            session.left.pop(name, None)

    def to_state(self, now: float) -> list[dict[str, Any]]:
        """
        JSON-able state worth keeping across a restart: sessions whose cache
        may still be warm (seen within their TTL).
        """
        return [
            {
                "key": s.key,
                "keySource": s.key_source,
                "account": s.account,
                "left": dict(s.left),
                "ttl": s.ttl,
                "lastSeen": s.last_seen,
                "placed": s.placed,
                "cycleTokens": s.cycle_tokens,
                "cycleCosts": list(s.cycle_costs),
                "cycleReads": s.cycle_reads,
                "cycleReadCosts": list(s.cycle_read_costs),
                "compactions": s.compactions,
                "cycleBase": s.cycle_base,
                "cycleBaseTokens": s.cycle_base_tokens,
                "context": s.context,
                "cycleSteps": s.cycle_steps,
                "cycleGrowth": s.cycle_growth,
                "cycleStepTokens": s.cycle_step_tokens,
                "compactedAt": s.compacted_at,
            }
            for s in self._sessions.values()
            if now - s.last_seen <= s.ttl
        ]

    def restore(self, data: object, now: float) -> None:
        """
        Load L{to_state} output.  Malformed entries are skipped, entries
        older than their TTL dropped, and sessions already known kept.
        """
        if not isinstance(data, list):
            return
        restored: list[Session] = []
        for entry in data:
            session = self._session_from_state(entry)
            if session is not None and not session.idle_expired(now):
                restored.append(session)
        restored.sort(key=lambda s: s.last_seen)
        for session in restored:
            if session.key not in self._sessions:
                self._sessions[session.key] = session
        # Keep LRU order by recency even when restored entries are older than
        # sessions already present.
        for key in sorted(self._sessions, key=lambda k: self._sessions[k].last_request):
            self._sessions.move_to_end(key)
        self._evict(now)

    @staticmethod
    def _session_from_state(entry: object) -> Session | None:
        if not isinstance(entry, dict):
            return None
        key = entry.get("key")
        source = entry.get("keySource")
        account = entry.get("account")
        ttl = _number(entry.get("ttl"))
        last_seen = _number(entry.get("lastSeen"))
        left_raw = entry.get("left", {})
        if (
            not isinstance(key, str)
            or not key
            or source not in _SOURCES
            or not (account is None or isinstance(account, str))
            or ttl is None
            or ttl <= 0
            or last_seen is None
            or not isinstance(left_raw, dict)
        ):
            return None
        left: dict[str, float] = {}
        for name, when in left_raw.items():
            seconds = _number(when)
            if isinstance(name, str) and seconds is not None:
                left[name] = seconds
        def count(name: str) -> int:
            value = entry.get(name)
            return value if type(value) is int and value >= 0 else 0

        def counts(name: str) -> list[int]:
            values = entry.get(name)
            return [c for c in values if type(c) is int and c >= 0][-_KEPT_CYCLES:] if isinstance(values, list) else []

        return Session(
            key,
            source,
            account=account,
            left=left,
            ttl=ttl,
            last_seen=last_seen,
            last_request=last_seen,
            placed=_number(entry.get("placed")) or 0.0,
            cycle_tokens=count("cycleTokens"),
            cycle_costs=counts("cycleCosts"),
            cycle_reads=count("cycleReads"),
            cycle_read_costs=counts("cycleReadCosts"),
            compactions=count("compactions"),
            cycle_base=count("cycleBase"),
            cycle_base_tokens=count("cycleBaseTokens"),
            context=count("context"),
            cycle_steps=count("cycleSteps"),
            cycle_growth=count("cycleGrowth"),
            cycle_step_tokens=count("cycleStepTokens"),
            compacted_at=count("compactedAt"),
        )
