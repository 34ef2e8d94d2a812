"""
Faults end to end on loopback: upstream errors reach the client unchanged,
bad input gets a clear 4xx or a clean pass-through (never a crash or a
hang), and a client that stops reading pauses the upstream.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from nextclaude.simulate import SimulatedAnthropic, listen_simulator, simulated_accounts, stop_simulator
from tests.support import PROXY_KEY, FakeUpstream, Seen, auth, client, listen, message_start, start_proxy, write_config
from tests.test_proxy import _RawClient

BODY = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


class SimulatorFaultTests(TestCase):
    async def setUp(self) -> None:
        self.sim = SimulatedAnthropic(reactor, simulated_accounts(2))
        port = listen_simulator(reactor, self.sim)
        self.addCleanup(stop_simulator, port)
        accounts = [{"name": a.name, "type": "oauth", "accessToken": a.credential} for a in self.sim.accounts]
        self.service, self.url = start_proxy(self, write_config(self, port.getHost().port, accounts=accounts))
        self.http = client(self)

    async def post(self, body: bytes, **headers: str) -> tuple[int, bytes, object]:
        response = await self.http.post(self.url + "/v1/messages?beta=true", data=body, headers=auth(headers))
        return response.code, await response.content(), response

    async def test_in_stream_error_reaches_client_unchanged(self) -> None:
        """
        An `event: error` after a 200 is relayed as it came, and the stream
        is not completed with a made-up message_stop.
        """
        code, body, _ = await self.post(json.dumps({**BODY, "stream": True}).encode(), **{"x-sim-stream-error": "overloaded_error"})
        self.assertEqual(code, 200)
        self.assertIn(b"event: error", body)
        self.assertIn(b"overloaded_error", body)
        self.assertNotIn(b"message_stop", body)

    async def test_529_passes_through(self) -> None:
        """
        A 529 overloaded_error reaches the client with its status and body,
        is not retried elsewhere, and does not mark the account.
        """
        code, body, _ = await self.post(json.dumps(BODY).encode(), **{"x-sim-status": "529"})
        self.assertEqual(code, 529)
        self.assertEqual(json.loads(body)["error"]["type"], "overloaded_error")
        self.assertEqual(self.sim.account("sim-2").requests, 0)
        self.assertEqual(self.service.status()["accounts"][0]["status"], "active")

    async def test_bad_bodies_get_clean_answers(self) -> None:
        """
        Malformed JSON, an empty body, a wrong content type and non-UTF-8
        bytes are passed through to the upstream, whose 400 in the API
        error shape reaches the client; the proxy stays healthy.
        """
        for body, headers in [
            (b'{"model": "claude', {}),
            (b"", {}),
            (b"model=claude", {"content-type": "application/x-www-form-urlencoded"}),
            (b'{"model": "\xff\xfe"}', {}),
        ]:
            code, answer, _ = await self.post(body, **headers)
            self.assertEqual(code, 400, body)
            self.assertEqual(json.loads(answer)["error"]["type"], "invalid_request_error", body)
        code, _, _ = await self.post(json.dumps(BODY).encode())
        self.assertEqual(code, 200)

    async def test_huge_header_is_a_clear_4xx(self) -> None:
        """
        A 200 KB header gets a 4xx and a closed connection, never a hang;
        the proxy keeps serving.
        """
        port = int(self.url.rsplit(":", 1)[1])
        protocol = _RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
        protocol.transport.write(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\nx-big: %s\r\nContent-Length: 2\r\n\r\n{}"
            % (PROXY_KEY.encode(), b"a" * 200_000)
        )
        await protocol.closed
        self.assertRegex(protocol.received.split(b"\r\n", 1)[0], rb"^HTTP/1.1 4\d\d ")
        code, _, _ = await self.post(json.dumps(BODY).encode())
        self.assertEqual(code, 200)


@implementer(IPushProducer)
class _Firehose:
    """
    An upstream body that writes as fast as it is allowed to, and notes
    when TCP backpressure pauses it.
    """

    def __init__(self, request: object) -> None:
        self.request = request
        self.paused: Deferred[None] = Deferred()
        self.running = True
        self.sent = 0

    def pump(self) -> None:
        chunk = b"event: ping\ndata: " + b"x" * 65_000 + b"\n\n"
        while self.running and self.sent < 64 * 1024 * 1024:
            self.request.write(chunk)
            self.sent += len(chunk)

    def pauseProducing(self) -> None:
        self.running = False
        if not self.paused.called:
            self.paused.callback(None)

    def resumeProducing(self) -> None:
        self.running = True
        reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.running = False


class BackpressureTests(TestCase):
    async def test_client_that_reads_nothing_pauses_upstream(self) -> None:
        """
        A client that stops reading makes the proxy stop reading from the
        upstream: the upstream's writes are paused by TCP backpressure long
        before the stream is over, so the proxy holds only a bounded amount
        in memory.
        """
        hoses: list[_Firehose] = []

        def handler(seen: Seen) -> int:
            seen.request.setHeader(b"content-type", b"text/event-stream")
            seen.request.write(message_start())
            hose = _Firehose(seen.request)
            hoses.append(hose)
            seen.request.registerProducer(hose, True)
            reactor.callLater(0, hose.pump)
            return NOT_DONE_YET

        upstream = FakeUpstream(handler)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        arrived = upstream.next_request()
        response = await client(self).post(
            url + "/v1/messages", data=json.dumps({**BODY, "stream": True}).encode(), headers=auth(), unbuffered=True
        )
        # Read nothing at all from here on.
        response.original._transport.pauseProducing()
        seen = await arrived
        await hoses[0].paused
        self.assertLess(hoses[0].sent, 64 * 1024 * 1024)
        hoses[0].stopProducing()
        seen.request.unregisterProducer()
        seen.request.channel.transport.abortConnection()
        await seen.gone.addErrback(lambda failure: None)
        response.original._transport.stopProducing()
