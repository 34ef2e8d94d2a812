"""
Tests for L{nextclaude.upstream}'s chunked decoding: a response body is
handed on once per read of the upstream connection.
"""

from __future__ import annotations

import gc
import os
import weakref
from itertools import pairwise

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import StringTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request, ResponseDone
from twisted.web.http import _MalformedChunkedDataError
from twisted.web.http_headers import Headers

from nextclaude.upstream import ChunkedPerRead, _ClientProtocol


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)


class _Record:
    """
    What a decoder handed on, in order: C{("data", bytes)} and
    C{("finish", rest)}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def data(self, data: bytes) -> None:
        self.calls.append(("data", data))

    def finish(self, rest: bytes) -> None:
        self.calls.append(("finish", rest))

    def decoder(self) -> ChunkedPerRead:
        return ChunkedPerRead(self.data, self.finish)


class ChunkedPerReadTests(SynchronousTestCase):
    def test_chunks_of_one_read_are_handed_on_together(self) -> None:
        """
        Three chunks (three events of a stream) in one read reach the
        response as one piece, before the read returns.
        """
        record = _Record()
        record.decoder().dataReceived(chunked(b"event: a\n\n", b"event: b\n\n", b"event: c\n\n"))
        self.assertEqual(record.calls, [("data", b"event: a\n\nevent: b\n\nevent: c\n\n")])

    def test_body_before_the_end(self) -> None:
        """
        When the last chunk and the terminal chunk share a read, the body is
        handed on before the end is reported, and bytes after the terminal
        chunk are the end's rest.
        """
        record = _Record()
        decoder = record.decoder()
        decoder.dataReceived(chunked(b"first") + b"2\r\n")
        decoder.dataReceived(b"ab\r\n" + chunked(b"cd") + b"0\r\n\r\nHTTP/1.1")
        self.assertEqual(
            record.calls,
            [("data", b"first"), ("data", b"abcd"), ("finish", b"HTTP/1.1")],
        )
        decoder.noMoreData()

    def test_malformed_rest_of_a_read(self) -> None:
        """
        A malformed chunk length raises Twisted's error; the chunk before
        it, in the same read, has been handed on.
        """
        record = _Record()
        self.assertRaises(
            _MalformedChunkedDataError, record.decoder().dataReceived, chunked(b"hello") + b"zz\r\n"
        )
        self.assertEqual(record.calls, [("data", b"hello")])

    def test_cut_body_is_data_loss(self) -> None:
        """
        A connection lost inside a chunk is still data loss.
        """
        from twisted.web._newclient import _DataLoss

        record = _Record()
        decoder = record.decoder()
        decoder.dataReceived(b"a\r\nhalf")
        self.assertEqual(record.calls, [("data", b"half")])
        self.assertRaises(_DataLoss, decoder.noMoreData)

    def test_freed_without_a_collection(self) -> None:
        """
        The decoder holds no reference cycle: with the garbage collector
        off, it is freed as soon as it is dropped (it keeps the response).
        """
        gc.disable()
        self.addCleanup(gc.enable)
        decoder = _Record().decoder()
        freed = weakref.ref(decoder)
        del decoder
        self.assertIsNone(freed())

    @settings(max_examples=25, deadline=None, derandomize=os.environ.get("CI") == "true")
    @given(
        pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    )
    def test_any_cut_of_a_body(self, pieces: list[bytes], cuts: list[int]) -> None:
        """
        However a chunked body is cut into reads, the pieces handed on join
        to the whole body, none is empty, there is at most one per read,
        and the end comes last, once.
        """
        wire = chunked(*pieces) + b"0\r\n\r\n"
        points = sorted({min(cut, len(wire)) for cut in cuts} | {0, len(wire)})
        reads = [wire[a:b] for a, b in pairwise(points)]
        record = _Record()
        decoder = record.decoder()
        for read in reads:
            decoder.dataReceived(read)
        data = [value for kind, value in record.calls if kind == "data"]
        self.assertEqual(b"".join(data), b"".join(pieces))
        self.assertNotIn(b"", data)
        self.assertLessEqual(len(data), len(reads))
        self.assertEqual(record.calls[-1], ("finish", b""))
        self.assertEqual([kind for kind, _ in record.calls].count("finish"), 1)


class _Body(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason


class ClientProtocolTests(SynchronousTestCase):
    def test_response_body_per_read(self) -> None:
        """
        The proxy's upstream connection decodes a chunked response with
        L{ChunkedPerRead}: an event stream's burst of events in one read
        reaches the response's protocol in one call, and the response ends
        cleanly.
        """
        protocol = _ClientProtocol(lambda _: None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        answered = protocol.request(Request(b"GET", b"/v1/models", Headers({b"host": [b"upstream"]}), None))
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        response = self.successResultOf(answered)
        body = _Body()
        response.deliverBody(body)
        protocol.dataReceived(chunked(b"event: ping\n\n", b"event: message_stop\n\n") + b"0\r\n\r\n")
        self.assertEqual(body.reads, [b"event: ping\n\nevent: message_stop\n\n"])
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
