"""Tests for nextclaude.usage: Usage, the SSE StreamParser and JSON bodies."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nextclaude.usage import MAX_EVENT_BYTES, StreamParser, Usage, usage_from_json_body


def sse(event: str | None, payload: object, eol: str = "\n") -> bytes:
    lines = [] if event is None else [f"event: {event}"]
    lines.append("data: " + json.dumps(payload))
    return (eol.join(lines) + eol + eol).encode()


START_USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 2048,
    "cache_read_input_tokens": 30000,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2048},
    "output_tokens": 1,
    "service_tier": "standard",
}
FINAL_USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 2048,
    "cache_read_input_tokens": 30000,
    "output_tokens": 87,
}
EXPECTED = Usage(
    input_tokens=12,
    output_tokens=87,
    cache_creation_input_tokens=2048,
    cache_read_input_tokens=30000,
    cache_creation_5m=0,
    cache_creation_1h=2048,
)


def stream(eol: str = "\n", named: bool = True) -> bytes:
    """A stream shaped like a real Anthropic one: 11 events."""

    def ev(event: str, payload: object) -> bytes:
        return sse(event if named else None, payload, eol)

    return b"".join(
        [
            ev("message_start", {
                "type": "message_start",
                "message": {
                    "id": "msg_01XYZ", "type": "message", "role": "assistant",
                    "model": "claude-sonnet-4-5-20250929", "content": [],
                    "stop_reason": None, "stop_sequence": None, "usage": START_USAGE,
                },
            }),
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
            ev("ping", {"type": "ping"}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": "Hello"}}),
            # Text that quotes the markers the parser looks for must not fool it.
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta",
                                                 "text": '"type":"error" \n\n event: error'}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": " world é"}}),
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev("some_future_event", {"type": "some_future_event", "usage": {"output_tokens": 999}}),
            ev("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": FINAL_USAGE}),
            ev("ping", {"type": "ping"}),
            ev("message_stop", {"type": "message_stop"}),
        ]
    )


STREAM = stream()
STREAM_EVENTS = 11


def parse(chunks: list[bytes], finish: bool = True) -> StreamParser:
    parser = StreamParser()
    for chunk in chunks:
        parser.feed(chunk)
    if finish:
        parser.finish()
    return parser


def summary(parser: StreamParser) -> tuple[object, ...]:
    return (
        parser.usage,
        parser.model,
        parser.message_id,
        parser.stop_reason,
        parser.saw_message_stop,
        parser.error,
        parser.events,
    )


FULL = (EXPECTED, "claude-sonnet-4-5-20250929", "msg_01XYZ", "end_turn", True, None, STREAM_EVENTS)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


class UsageTests(SynchronousTestCase):
    def test_update_from(self) -> None:
        """update_from overwrites valid counts and ignores missing, negative, bool and non-int values."""
        cases = [
            ("empty", {}, Usage()),
            ("start", START_USAGE, Usage(12, 1, 2048, 30000, 0, 2048)),
            ("garbage", {"input_tokens": "12", "output_tokens": -1, "cache_read_input_tokens": True,
                         "cache_creation_input_tokens": 3.0, "cache_creation": [1, 2]}, Usage()),
            ("split garbage", {"cache_creation": {"ephemeral_5m_input_tokens": None,
                                                  "ephemeral_1h_input_tokens": 7}}, Usage(cache_creation_1h=7)),
            ("not a mapping", ["input_tokens"], Usage()),
        ]
        for label, payload, expected in cases:
            usage = Usage()
            usage.update_from(payload)  # type: ignore[arg-type]
            self.assertEqual(usage, expected, label)

    def test_update_from_later_values_override(self) -> None:
        """A message_delta usage replaces the message_start counts it repeats and keeps the rest."""
        usage = Usage()
        usage.update_from(START_USAGE)
        usage.update_from({"output_tokens": 50})
        self.assertEqual(usage, Usage(12, 50, 2048, 30000, 0, 2048))
        usage.update_from(FINAL_USAGE)
        self.assertEqual(usage, EXPECTED)

    def test_add(self) -> None:
        """add accumulates every field."""
        total = Usage(1, 2, 3, 4, 5, 6)
        total.add(Usage(10, 20, 30, 40, 50, 60))
        self.assertEqual(total, Usage(11, 22, 33, 44, 55, 66))

    def test_hit_miss_cold(self) -> None:
        """hit is cache reads, miss is uncached input plus cache writes; cold means writes dominate past 1000."""
        cases = [
            (Usage(), 0, 0, False),
            (Usage(input_tokens=5, cache_creation_input_tokens=2000, cache_read_input_tokens=100), 100, 2005, True),
            (Usage(cache_creation_input_tokens=1000, cache_read_input_tokens=0), 0, 1000, False),
            (Usage(cache_creation_input_tokens=5000, cache_read_input_tokens=5000), 5000, 5000, False),
            (Usage(input_tokens=9000, cache_read_input_tokens=10), 10, 9000, False),
        ]
        for usage, hit, miss, cold in cases:
            self.assertEqual((usage.hit, usage.miss, usage.is_cold_rebuild()), (hit, miss, cold), repr(usage))

    def test_json_round_trip(self) -> None:
        """to_json names every field and from_json reads it back, ignoring bad values."""
        self.assertEqual(
            EXPECTED.to_json(),
            {"input_tokens": 12, "output_tokens": 87, "cache_creation_input_tokens": 2048,
             "cache_read_input_tokens": 30000, "cache_creation_5m": 0, "cache_creation_1h": 2048},
        )
        self.assertEqual(Usage.from_json(EXPECTED.to_json()), EXPECTED)
        cases = [
            ({}, Usage()),
            ({"input_tokens": "x", "output_tokens": 4, "extra": 1}, Usage(output_tokens=4)),
            ({"cache_creation_1h": False, "cache_creation_5m": -2}, Usage()),
            (None, Usage()),
        ]
        for data, expected in cases:
            self.assertEqual(Usage.from_json(data), expected, repr(data))  # type: ignore[arg-type]


class StreamParserTests(SynchronousTestCase):
    def test_realistic_streams(self) -> None:
        """A real-shaped stream yields its usage, model, id, stop reason and event count however it is framed or chunked."""
        byte_by_byte = [STREAM[i : i + 1] for i in range(len(STREAM))]
        cases = [
            ("one chunk", [STREAM]),
            ("byte by byte", byte_by_byte),
            ("with empty chunks", [b"", STREAM[:100], b"", STREAM[100:], b""]),
            ("event per chunk", [e + b"\n\n" for e in STREAM.split(b"\n\n")[:-1]]),
            ("CRLF", [stream("\r\n")]),
            ("CRLF byte by byte", [bytes([b]) for b in stream("\r\n")]),
            ("CR", [stream("\r")]),
            ("CR byte by byte", [bytes([b]) for b in stream("\r")]),
            ("no event lines", [stream(named=False)]),
            ("no event lines, CRLF, byte by byte", [bytes([b]) for b in stream("\r\n", named=False)]),
        ]
        for label, chunks in cases:
            self.assertEqual(summary(parse(chunks)), FULL, label)

    def test_framing_details(self) -> None:
        """SSE field rules: optional space, joined data lines, comments, unknown fields, mixed line ends."""
        start = {"type": "message_start", "message": {"model": "m", "id": "i", "usage": {"input_tokens": 7}}}
        body = json.dumps(start)
        half = len(body) // 2
        cases = [
            ("no space after colon", f"event:message_start\ndata:{body}\n\n"),
            ("two spaces keeps one", f"event: message_start\ndata:  {body}\n\n"),
            ("data split over lines", f"event: message_start\ndata: {body[:half]}\ndata: {body[half:]}\n\n"),
            ("comments and other fields", f": keep-alive\nid: 1\nretry: 10\nevent: message_start\n:x\ndata: {body}\n\n"),
            ("event line after data", f"data: {body}\nevent: message_start\n\n"),
            ("mixed line ends", f"event: message_start\r\ndata: {body}\r\n\n"),
            ("lf then cr", f"event: message_start\ndata: {body}\n\r"),
            ("leading blank lines", f"\n\n\r\n\nevent: message_start\ndata: {body}\n\n\n\n"),
            ("explicit message type sniffed", f"event: message\ndata: {body}\n\n"),
        ]
        for label, text in cases:
            parser = parse([text.encode()])
            self.assertEqual(
                (parser.usage.input_tokens, parser.model, parser.message_id, parser.events),
                (7, "m", "i", 1),
                label,
            )

    def test_events_not_dispatched(self) -> None:
        """Comment-only blocks and events without data are not counted."""
        parser = parse([b": ping\n\nevent: ping\n\n:\n\nid: 3\n\n"])
        self.assertEqual(parser.events, 0)

    def test_error_after_200(self) -> None:
        """An error event mid-stream is recorded as (type, message) and the usage so far kept."""
        head = STREAM.split(b"event: content_block_stop")[0]
        cases = [
            ("overloaded", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
             ("overloaded_error", "Overloaded")),
            ("rate limit", {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
             ("rate_limit_error", "slow down")),
            ("api error without message", {"type": "error", "error": {"type": "api_error"}}, ("api_error", "")),
            ("error object garbage", {"type": "error", "error": "boom"}, None),
        ]
        for label, payload, expected in cases:
            for named in (True, False):
                parser = parse([head, sse("error" if named else None, payload)])
                self.assertEqual(parser.error, expected, label)
                self.assertEqual(parser.usage.cache_read_input_tokens, 30000, label)
                self.assertFalse(parser.saw_message_stop, label)
                self.assertIsNone(parser.stop_reason, label)

    def test_cut_stream(self) -> None:
        """A stream cut before message_stop reports what it saw and no stop."""
        cut = STREAM.split(b"event: message_delta")[0]
        parser = parse([cut])
        self.assertFalse(parser.saw_message_stop)
        self.assertEqual(parser.usage.output_tokens, 1)
        self.assertEqual(parser.events, 8)

    def test_finish_trailing_event(self) -> None:
        """finish processes a last event lacking its blank line, but not a truncated one."""
        stop = b'event: message_stop\ndata: {"type":"message_stop"}'
        cases = [
            ("no newline", stop, True, 1),
            ("one newline", stop + b"\n", True, 1),
            ("CR", stop + b"\r", True, 1),
            ("truncated JSON", stop[:-3], False, 1),
            ("no data yet", b"event: message_stop\n", False, 0),
        ]
        for label, tail, stopped, events in cases:
            parser = StreamParser()
            parser.feed(tail)
            self.assertEqual((parser.saw_message_stop, parser.events), (False, 0), label)
            parser.finish()
            self.assertEqual((parser.saw_message_stop, parser.events), (stopped, events), label)

    def test_malformed_events_ignored(self) -> None:
        """Invalid JSON, invalid UTF-8, wrong shapes and odd numbers in usage events are skipped."""
        cases = [
            b"event: message_start\ndata: {not json\n\n",
            b"event: message_start\ndata: \xff\xfe{\"message\":{}}\n\n",
            b'event: message_start\ndata: {"message": "text"}\n\n',
            b'event: message_start\ndata: [1, 2]\n\n',
            b'event: message_start\ndata: {"message":{"model":5,"id":null,"usage":[3]}}\n\n',
            b'event: message_delta\ndata: {"delta":"x","usage":{"output_tokens":-4}}\n\n',
            b'event: message_delta\ndata: {"delta":{"stop_reason":7},"usage":{"output_tokens":1e3}}\n\n',
            b"event: message_delta\ndata: " + b"[" * 100000 + b"\n\n",
            b'event: error\ndata: {"type":"error"}\n\n',
            b'event: message_stop\ndata: nope\n\n',
            b"event: \xff\xfe\ndata: \xff\n\n",
        ]
        for data in cases:
            parser = parse([data])
            self.assertEqual(
                summary(parser), (Usage(), None, None, None, False, None, 1), repr(data[:60])
            )

    def test_oversized_event_resync(self) -> None:
        """An event over the size cap is dropped without buffering it, and parsing resumes after its blank line."""
        huge = b"event: content_block_delta\ndata: " + b"x" * (MAX_EVENT_BYTES + 10)
        cases = [
            ("in one chunk", [huge + b"\n\n" + STREAM]),
            ("in 64 KiB chunks", split_at(huge + b"\n\n" + STREAM, list(range(0, len(huge) + len(STREAM), 65536)))),
            ("terminator split", [huge + b"\n", b"\n" + STREAM]),
            ("CRLF terminator split", [huge + b"\r", b"\n\r", b"\n" + STREAM]),
        ]
        for label, chunks in cases:
            parser = StreamParser()
            peak = 0
            for chunk in chunks:
                parser.feed(chunk)
                peak = max(peak, len(parser._buffer))
            parser.finish()
            self.assertEqual(summary(parser), FULL, label)
            self.assertTrue(peak <= MAX_EVENT_BYTES, f"{label}: buffered {peak}")

    def test_size_cap_boundary(self) -> None:
        """Events just under the cap are kept and those at or over it dropped, whatever the chunking."""
        for size in (MAX_EVENT_BYTES - 2, MAX_EVENT_BYTES - 1, MAX_EVENT_BYTES, MAX_EVENT_BYTES + 1):
            head = b"event: content_block_delta\ndata: "
            event = head + b"x" * (size - len(head))
            data = event + b"\n\n" + STREAM
            expected = STREAM_EVENTS + (size < MAX_EVENT_BYTES)
            for cuts in ([], [size - 1], [size], [size + 1], [size + 2], [1000, size - 5, size + 1]):
                parser = parse(split_at(data, cuts))
                self.assertEqual(parser.events, expected, f"size {size}, cuts {cuts}")

    def test_oversized_event_at_end(self) -> None:
        """An oversized event left unterminated at the end of the stream is not processed by finish."""
        parser = parse([STREAM, b"event: message_delta\ndata: {" + b" " * MAX_EVENT_BYTES])
        self.assertEqual(summary(parser), FULL)

    def test_content_deltas_not_decoded(self) -> None:
        """content_block_delta data is never JSON-decoded, named or not."""
        import nextclaude.usage as module

        decoded: list[bytes] = []
        original = module._loads

        def spy(data: bytes) -> object:
            decoded.append(data)
            return original(data)

        self.patch(module, "_loads", spy)
        for chunks in ([STREAM], [stream(named=False)]):
            decoded.clear()
            parse(chunks)
            kinds = sorted(json.loads(d)["type"] for d in decoded)
            self.assertEqual(kinds, ["message_delta", "message_start", "message_stop"])

    @settings(max_examples=200)
    @given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40), st.sampled_from(["\n", "\r\n", "\r"]))
    def test_any_chunking(self, cuts: list[int], eol: str) -> None:
        """However the stream is split into chunks, the result is the same as in one chunk."""
        data = stream(eol)
        self.assertEqual(summary(parse(split_at(data, cuts))), FULL)

    @settings(max_examples=300)
    @given(st.lists(st.binary(max_size=64) | st.sampled_from([b"\n", b"\r", b"\r\n", b"data: {", b"event: error\n"])),
           st.booleans())
    def test_random_bytes_never_raise(self, chunks: list[bytes], finish: bool) -> None:
        """Random bytes, fed in any pieces, never raise; chunking does not change the result."""
        whole = parse([b"".join(chunks)], finish)
        pieces = parse(chunks, finish)
        self.assertEqual(summary(pieces), summary(whole))


class JsonBodyTests(SynchronousTestCase):
    def test_bodies(self) -> None:
        """Non-streaming bodies yield (usage, model, error); garbage yields Nones."""
        message = {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "usage": {**START_USAGE, "output_tokens": 87},
        }
        error = {"type": "error", "error": {"type": "rate_limit_error", "message": "Too many"}, "request_id": "req_1"}
        cases = [
            ("message", json.dumps(message).encode(), (EXPECTED, "claude-haiku-4-5", None)),
            ("count_tokens", b'{"input_tokens": 42}', (None, None, None)),
            ("error", json.dumps(error).encode(), (None, None, ("rate_limit_error", "Too many"))),
            ("error without details", b'{"type": "error", "error": null}', (None, None, None)),
            ("usage garbage", b'{"usage": "lots", "model": ["x"]}', (None, None, None)),
            ("usage empty", b'{"usage": {}}', (Usage(), None, None)),
            ("empty", b"", (None, None, None)),
            ("not json", b"<html>502</html>", (None, None, None)),
            ("invalid utf-8", b'{"model": "\xff"}', (None, None, None)),
            ("list", b"[1]", (None, None, None)),
            ("deep", b"[" * 100000, (None, None, None)),
        ]
        for label, body, expected in cases:
            self.assertEqual(usage_from_json_body(body), expected, label)

    @given(st.binary() | st.builds(lambda o: json.dumps(o).encode(), st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.sampled_from(
            ["usage", "model", "type", "error", "message", "input_tokens", "cache_creation"]) | st.text(), children),
    )))
    def test_never_raises(self, body: bytes) -> None:
        """Any body, random bytes or random JSON, gives a 3-tuple without raising."""
        usage, model, error = usage_from_json_body(body)
        self.assertTrue(usage is None or isinstance(usage, Usage))
        self.assertTrue(model is None or isinstance(model, str))
        self.assertTrue(error is None or isinstance(error, tuple))
