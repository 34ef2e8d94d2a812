"""
Tests for L{nextclaude.upstream}'s upstream connection: a response body is
handed on once per read, and a large request body is sent from the body
itself, after the request's head.
"""

from __future__ import annotations

import gc
import os
import weakref
from itertools import pairwise

from hypothesis import given, settings, strategies as st
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request, ResponseDone
from twisted.web.http import _MalformedChunkedDataError
from twisted.web.http_headers import Headers

from nextclaude.upstream import BytesProducer, ChunkedPerRead, _ClientProtocol


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


class _Socket(FileDescriptor):
    """
    A transport whose socket takes what it is given (up to C{takes} bytes
    of each send, when set) and records each send.
    """

    def __init__(self, takes: int | None = None) -> None:
        super().__init__(MemoryReactor())
        self.connected = 1
        self.takes = takes
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int:
        taken = len(data) if self.takes is None else min(self.takes, len(data))
        if taken:
            self.sent.append(data if taken == len(data) else bytes(data[:taken]))
        return taken

    def getHost(self) -> None:
        return None

    def getPeer(self) -> None:
        return None


def post(protocol: _ClientProtocol, body: bytes) -> None:
    protocol.request(
        Request(b"POST", b"/v1/messages", Headers({b"host": [b"upstream"]}), BytesProducer(body))
    )


class HeadFirstTests(SynchronousTestCase):
    def test_large_body_sent_from_itself(self) -> None:
        """
        A body over 64 KiB goes to the socket after the request's head,
        and the socket is handed the body object itself, not a copy joined
        behind the head.
        """
        socket = _Socket()
        protocol = _ClientProtocol(lambda _: None)
        protocol.makeConnection(socket)
        body = b"x" * 100_000 + b"end"
        post(protocol, body)
        socket.doWrite()
        self.assertEqual(len(socket.sent), 2)
        self.assertTrue(socket.sent[0].startswith(b"POST /v1/messages HTTP/1.1\r\n"))
        self.assertTrue(socket.sent[0].endswith(b"\r\n\r\n"))
        self.assertIn(b"Content-Length: 100003\r\n", socket.sent[0])
        self.assertIs(socket.sent[1], body)

    def test_small_body_joined_with_the_head(self) -> None:
        """
        A small body is cheaper to copy than to send apart: head and body
        go in one send.
        """
        socket = _Socket()
        protocol = _ClientProtocol(lambda _: None)
        protocol.makeConnection(socket)
        post(protocol, b'{"model":"m"}')
        socket.doWrite()
        self.assertEqual(len(socket.sent), 1)
        self.assertTrue(socket.sent[0].endswith(b'\r\n\r\n{"model":"m"}'))

    def test_head_the_socket_does_not_take(self) -> None:
        """
        When the socket takes only part of the head, the rest and the body
        follow in order on later sends: nothing is lost or reordered.
        """
        socket = _Socket(takes=10)
        protocol = _ClientProtocol(lambda _: None)
        protocol.makeConnection(socket)
        body = bytes(range(256)) * 400
        post(protocol, body)
        socket.takes = None
        socket.doWrite()
        sent = b"".join(socket.sent)
        self.assertEqual(len(socket.sent[0]), 10)
        self.assertTrue(sent.endswith(b"\r\n\r\n" + body))
        self.assertEqual(sent.count(body), 1)

    def test_not_a_socket(self) -> None:
        """
        Over a transport that is not a plain socket (TLS, or a test's
        string transport) the body is written behind the head as Twisted
        does, and the producer keeps no reference to the transport.
        """
        transport = StringTransport()
        protocol = _ClientProtocol(lambda _: None)
        protocol.makeConnection(transport)
        body = b"y" * 100_000
        producer = BytesProducer(body)
        protocol.request(Request(b"POST", b"/v1/messages", Headers({b"host": [b"upstream"]}), producer))
        self.assertTrue(transport.value().endswith(b"\r\n\r\n" + body))
        self.assertIsNone(producer.send_head)
