"""Token usage from Messages API responses: an incremental SSE parser and a
reader for non-streaming bodies.

Pure and on the hot path of every stream: the parser splits events with
byte searches and JSON-decodes only the few events that carry usage, the
stop reason or an error.  Nothing in here raises on bad input; a malformed
event is skipped so the relayed stream is never disturbed by our bookkeeping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

__all__ = ["MAX_EVENT_BYTES", "StreamParser", "Usage", "usage_from_json_body"]

# A real event is a few KiB at most; past this we assume a broken or hostile
# upstream and stop buffering rather than grow without bound.
MAX_EVENT_BYTES = 1 << 20

_INTERESTING = frozenset({b"message_start", b"message_delta", b"message_stop", b"error"})
# Events that carry nothing about usage, as Anthropic frames them: the
# hot path counts them without parsing.
_UNINTERESTING = (
    b"event: content_block_delta\ndata: ",
    b"event: ping\ndata: ",
    b"event: content_block_start\ndata: ",
    b"event: content_block_stop\ndata: ",
)
# Only consulted for events without an `event:` line.  A string value cannot
# contain an unescaped quote, so text deltas never match; a false positive in
# some nested object only costs a decode, since the decoded "type" decides.
_TYPE_SNIFF = re.compile(rb'"type"\s*:\s*"(?:message_start|message_delta|message_stop|error)"')


_WIRE = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_SPLIT = (
    ("ephemeral_5m_input_tokens", "cache_creation_5m"),
    ("ephemeral_1h_input_tokens", "cache_creation_1h"),
)


def _count(value: object) -> int | None:
    # bool is an int subclass; a JSON true is not a token count.
    if type(value) is int and value >= 0:
        return value
    return None


def _loads(data: bytes) -> object:
    try:
        return json.loads(data)
    # UnicodeDecodeError and JSONDecodeError are ValueErrors; deep nesting
    # raises RecursionError.
    except (ValueError, TypeError, RecursionError):
        return None


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0

    def update_from(self, usage: Mapping[str, object]) -> None:
        """Overwrite each field the API's ``usage`` object carries validly.

        Overwrite, not add: message_delta repeats cumulative counts.
        """
        if not isinstance(usage, Mapping):
            return
        for name in _WIRE:
            value = _count(usage.get(name))
            if value is not None:
                setattr(self, name, value)
        split = usage.get("cache_creation")
        if isinstance(split, Mapping):
            for wire, name in _SPLIT:
                value = _count(split.get(wire))
                if value is not None:
                    setattr(self, name, value)

    def add(self, other: Usage) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def hit(self) -> int:
        return self.cache_read_input_tokens

    @property
    def miss(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens

    def is_cold_rebuild(self) -> bool:
        # Writing much more than was read means the prefix was not cached here:
        # the signature of a session that just moved to a cold account.
        created = self.cache_creation_input_tokens
        return created > self.cache_read_input_tokens and created > 1000

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Usage:
        usage = cls()
        if isinstance(data, Mapping):
            for f in fields(cls):
                value = _count(data.get(f.name))
                if value is not None:
                    setattr(usage, f.name, value)
        return usage


class StreamParser:
    """Incremental SSE parser for a Messages API stream: feed it the raw bytes
    as they arrive, then call ``finish`` at the end of the stream."""

    __slots__ = (
        "usage",
        "model",
        "message_id",
        "stop_reason",
        "saw_message_stop",
        "error",
        "events",
        "_buffer",
        "_skip_lf",
        "_discarding",
    )

    def __init__(self) -> None:
        self.usage = Usage()
        self.model: str | None = None
        self.message_id: str | None = None
        self.stop_reason: str | None = None
        self.saw_message_stop = False
        self.error: tuple[str, str] | None = None
        self.events = 0
        # Holds only "\n" line ends: CR and CRLF are rewritten as chunks arrive.
        self._buffer = bytearray()
        # The previous chunk ended in "\r", so a leading "\n" here completes
        # that CRLF rather than ending another line.
        self._skip_lf = False
        # Inside an oversized event: drop bytes until the next blank line.
        self._discarding = False

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._skip_lf and data[:1] == b"\n":
            data = data[1:]
        self._skip_lf = False
        if b"\r" in data:
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer
        if not buffer and not self._discarding:
            # The usual case: the chunk starts at an event boundary.  Take
            # its whole events straight from it and keep only the rest.
            start = 0
            while (end := data.find(b"\n\n", start)) >= 0:
                if end - start < MAX_EVENT_BYTES:
                    self._dispatch(data[start:end])
                start = end + 2
            if start < len(data):
                buffer += data[start:] if start else data
                if len(buffer) > MAX_EVENT_BYTES:
                    self._discarding = True
                    del buffer[:-1]
            return
        # A blank line may straddle the old tail and the new chunk.
        scan = max(len(buffer) - 1, 0)
        buffer += data
        start = 0
        while (end := buffer.find(b"\n\n", scan)) >= 0:
            if self._discarding:
                self._discarding = False
            # Also drop an oversized event that arrived whole, so the outcome
            # does not depend on how the stream was chunked.
            elif end - start < MAX_EVENT_BYTES:
                self._dispatch(bytes(buffer[start:end]))
            start = scan = end + 2
        if start:
            del buffer[:start]
        if len(buffer) > MAX_EVENT_BYTES:
            self._discarding = True
            # Keep the last byte: it may be the first "\n" of the blank line.
            del buffer[:-1]

    def finish(self) -> None:
        """End of stream: process a final event that lacked its blank line."""
        if not self._discarding and self._buffer:
            self._dispatch(bytes(self._buffer).rstrip(b"\n"))
        self._buffer.clear()
        self._discarding = self._skip_lf = False

    def _dispatch(self, block: bytes) -> None:
        if block.startswith(_UNINTERESTING):
            # Most of a stream: text deltas and pings, in the exact framing
            # Anthropic sends.  Counted without splitting them into lines.
            self.events += 1
            return
        name = b""
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if not line or line[0] == 0x3A:  # ":" starts a comment
                continue
            key, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if key == b"data":
                data.append(value)
            elif key == b"event":
                name = value
        # Per the SSE spec an event without data is never dispatched.
        if not data:
            return
        self.events += 1
        raw = data[0] if len(data) == 1 else b"\n".join(data)
        # "message" is SSE's default type: fall back to the payload's "type".
        named = name not in (b"", b"message")
        if named and name not in _INTERESTING or not named and not _TYPE_SNIFF.search(raw):
            return
        payload = _loads(raw)
        if not isinstance(payload, dict):
            return
        kind = name.decode("ascii") if named else payload.get("type")
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                self.model = _string(message.get("model"), self.model)
                self.message_id = _string(message.get("id"), self.message_id)
                self.stop_reason = _string(message.get("stop_reason"), self.stop_reason)
                self.usage.update_from(_mapping(message.get("usage")))
        elif kind == "message_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                self.stop_reason = _string(delta.get("stop_reason"), self.stop_reason)
            self.usage.update_from(_mapping(payload.get("usage")))
        elif kind == "message_stop":
            self.saw_message_stop = True
        elif kind == "error":
            self.error = _error(payload) or self.error


def _string(value: object, default: str | None) -> str | None:
    return value if isinstance(value, str) else default


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}


def _error(payload: Mapping[str, object]) -> tuple[str, str] | None:
    error = payload.get("error")
    if not isinstance(error, dict):
        return None
    kind = error.get("type")
    message = error.get("message")
    return (
        kind if isinstance(kind, str) else "unknown_error",
        message if isinstance(message, str) else "",
    )


def usage_from_json_body(
    body: bytes,
) -> tuple[Usage | None, str | None, tuple[str, str] | None]:
    """(usage, model, error) of a non-streaming response body; never raises.

    ``usage`` is None when the body has no usage object; ``error`` is the
    (type, message) of an error body.
    """
    payload = _loads(body)
    if not isinstance(payload, dict):
        return None, None, None
    usage = None
    if isinstance(payload.get("usage"), dict):
        usage = Usage()
        usage.update_from(payload["usage"])
    error = _error(payload) if payload.get("type") == "error" or "error" in payload else None
    return usage, _string(payload.get("model"), None), error
