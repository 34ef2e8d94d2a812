"""
End-to-end tests of the proxy: real servers on loopback port 0, a scripted
fake upstream, and a real HTTP client.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed
from twisted.web.server import NOT_DONE_YET

from nextclaude.simulate import VirtualTimeReactor
from tests.support import (
    PROXY_KEY,
    ChunkCollector,
    FakeUpstream,
    Seen,
    auth,
    client,
    holding_stream,
    json_reply,
    listen,
    message_end,
    message_start,
    open_stream,
    start_proxy,
    text_delta,
    write_config,
)

UNIFIED_OK = {
    "anthropic-ratelimit-unified-status": "allowed",
    "anthropic-ratelimit-unified-5h-status": "allowed",
    "anthropic-ratelimit-unified-5h-utilization": "0.42",
    "anthropic-ratelimit-unified-5h-reset": "4102444800",
    "anthropic-ratelimit-unified-7d-status": "allowed",
    "anthropic-ratelimit-unified-7d-utilization": "0.10",
    "anthropic-ratelimit-unified-7d-reset": "4102444800",
}

MESSAGE_BODY = json.dumps(
    {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 64,
        "stream": True,
    }
).encode()


def ok_message(seen: Seen) -> bytes:
    return json_reply(
        seen.request,
        200,
        {
            "id": "msg_1",
            "type": "message",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hi"}],
            "usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0},
        },
        UNIFIED_OK,
    )


class StreamingTests(TestCase):
    async def test_first_event_arrives_before_upstream_finishes(self) -> None:
        """
        The client receives the first SSE event while the upstream still
        holds back the rest; the test releases the rest only after the first
        event arrived, and the client then gets the whole stream.
        """
        release: Deferred[None] = Deferred()

        def handler(seen: Seen) -> int:
            request = seen.request
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(message_start())

            def rest(_: object) -> None:
                request.write(text_delta("hello") + message_end())
                request.finish()

            release.addCallback(rest)
            return NOT_DONE_YET

        upstream = FakeUpstream(handler)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        response = await client(self).post(
            url + "/v1/messages?beta=true", data=MESSAGE_BODY, headers=auth(), unbuffered=True
        )
        self.assertEqual(response.code, 200)
        collector = ChunkCollector()
        response.deliverBody(collector)
        first = await collector.first
        self.assertIn(b"message_start", first)
        self.assertNotIn(b"message_stop", first)
        release.callback(None)
        await collector.done
        self.assertIn(b"message_stop", collector.body)
        self.assertEqual(upstream.seen[0].uri, b"/v1/messages?beta=true")

    async def test_usage_and_quota_reach_status(self) -> None:
        """
        After a streamed request, the status endpoint shows the account's
        usage totals (from the SSE stream) and quota windows (from the
        response headers), and names it as the primary.
        """

        def handler(seen: Seen) -> bytes:
            request = seen.request
            request.setHeader(b"content-type", b"text/event-stream")
            for name, value in UNIFIED_OK.items():
                request.setHeader(name.encode(), value.encode())
            return message_start(input_tokens=5, cache_read=1000, cache_creation=2000) + message_end(42)

        service, url = start_proxy(self, write_config(self, listen(self, FakeUpstream(handler))))
        http = client(self)
        response = await http.post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        await response.content()
        status = await (await http.get(url + "/nextclaude/status", headers=auth())).json()
        self.assertEqual(status["primary"], "alice")
        alice = status["accounts"][0]
        self.assertEqual(alice["name"], "alice")
        self.assertEqual(alice["flags"], ["primary"])
        self.assertEqual(
            alice["usage"],
            {
                "requests": 1,
                "failures": 0,
                "coldRebuilds": 1,
                "inputTokens": 5,
                "outputTokens": 42,
                "cacheReadTokens": 1000,
                "cacheCreationTokens": 2000,
            },
        )
        self.assertEqual(alice["windows"]["5h"]["utilization"], 0.42)
        self.assertEqual(alice["windows"]["5h"]["reset"], 4102444800)
        self.assertNotIn("sk-ant", json.dumps(status))

    async def test_non_streaming_usage_is_counted(self) -> None:
        """
        A non-streaming JSON response is relayed unchanged and its top-level
        usage is counted.
        """
        service, url = start_proxy(self, write_config(self, listen(self, FakeUpstream(ok_message))))
        response = await client(self).post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        self.assertEqual((await response.json())["content"][0]["text"], "hi")
        usage = service.pool.get("alice").usage
        self.assertEqual((usage.requests, usage.tokens.input_tokens, usage.tokens.cache_read_input_tokens), (1, 12, 100))


class CredentialTests(TestCase):
    async def test_client_credentials_never_reach_upstream(self) -> None:
        """
        The client's x-api-key, Authorization and x-nextclaude-key are
        stripped; the OAuth account's Bearer token is sent with the oauth
        beta merged into the client's anthropic-beta list; hop-by-hop
        headers and accept-encoding are not forwarded.
        """
        upstream = FakeUpstream(ok_message)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        headers = auth(
            {
                "authorization": "Bearer sk-ant-oat01-the-local-users-own-token",
                "x-nextclaude-key": PROXY_KEY,
                "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
                "accept-encoding": "br",
                "x-claude-code-session-id": "3f1e0c1a-0000-4000-8000-000000000001",
                "keep-alive": "timeout=5",
            }
        )
        response = await client(self).post(url + "/v1/messages", data=MESSAGE_BODY, headers=headers)
        await response.content()
        seen = upstream.seen[0].headers
        forwarded = json.dumps({k.decode(): [v.decode() for v in vs] for k, vs in seen.items()})
        self.assertNotIn(PROXY_KEY, forwarded)
        self.assertNotIn("the-local-users-own-token", forwarded)
        self.assertNotIn(b"x-api-key", seen)
        self.assertNotIn(b"x-nextclaude-key", seen)
        self.assertNotIn(b"keep-alive", seen)
        self.assertEqual(seen[b"authorization"], [b"Bearer sk-ant-oat01-alice"])
        self.assertEqual(
            seen[b"anthropic-beta"],
            [b"claude-code-20250219,interleaved-thinking-2025-05-14,oauth-2025-04-20"],
        )
        self.assertNotIn(b"br", b",".join(seen.get(b"accept-encoding", [])))
        self.assertEqual(seen[b"x-claude-code-session-id"], [b"3f1e0c1a-0000-4000-8000-000000000001"])

    async def test_api_key_account_uses_x_api_key(self) -> None:
        """
        An API-key account is presented with x-api-key and no Authorization
        header.
        """
        upstream = FakeUpstream(ok_message)
        config = write_config(
            self, listen(self, upstream), accounts=[{"name": "key", "type": "apikey", "apiKey": "sk-ant-api03-xyz"}]
        )
        service, url = start_proxy(self, config)
        response = await client(self).post(
            url + "/v1/messages", data=MESSAGE_BODY, headers=auth({"authorization": "Bearer local"})
        )
        await response.content()
        seen = upstream.seen[0].headers
        self.assertEqual(seen[b"x-api-key"], [b"sk-ant-api03-xyz"])
        self.assertNotIn(b"authorization", seen)

    async def test_missing_or_wrong_key_is_401(self) -> None:
        """
        A request without the proxy key, or with a wrong one, gets a 401 in
        the API error shape and never reaches the upstream.
        """
        upstream = FakeUpstream(ok_message)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        http = client(self)
        for headers in ({}, {"x-api-key": "nc-wrong"}, {"authorization": "Bearer nope"}):
            response = await http.post(url + "/v1/messages", data=MESSAGE_BODY, headers=headers)
            self.assertEqual(response.code, 401)
            body = await response.json()
            self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertEqual(upstream.seen, [])

    async def test_bearer_and_custom_header_forms_are_accepted(self) -> None:
        """
        The key is accepted as Authorization: Bearer, and as
        x-nextclaude-key beside an unrelated Bearer token (Claude Code in
        subscription mode).
        """
        upstream = FakeUpstream(ok_message)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        http = client(self)
        for headers in (
            {"authorization": f"Bearer {PROXY_KEY}"},
            {"authorization": "Bearer sk-ant-oat01-mine", "x-nextclaude-key": PROXY_KEY},
        ):
            response = await http.post(url + "/v1/messages", data=MESSAGE_BODY, headers=headers)
            await response.content()
            self.assertEqual(response.code, 200)

    async def test_trust_loopback_admits_keyless_local_clients(self) -> None:
        """
        With proxy.trustLoopback, a loopback client needs no key.
        """
        upstream = FakeUpstream(ok_message)
        config = write_config(self, listen(self, upstream), proxy={"trustLoopback": True})
        service, url = start_proxy(self, config)
        response = await client(self).post(url + "/v1/messages", data=MESSAGE_BODY)
        await response.content()
        self.assertEqual(response.code, 200)

    async def test_head_root_is_answered_locally(self) -> None:
        """
        Claude Code's HEAD / preconnect is answered by the proxy itself,
        without a key and without touching an account.
        """
        upstream = FakeUpstream(ok_message)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        response = await client(self).head(url + "/")
        self.assertEqual(response.code, 200)
        self.assertEqual(upstream.seen, [])


class RoutingTests(TestCase):
    async def test_quota_429_is_retried_on_another_account(self) -> None:
        """
        A 429 with a rejected unified status marks the account exhausted and
        the same request is retried on the next account; the client sees
        only the successful answer, and later requests go straight there.
        """

        def handler(seen: Seen) -> bytes:
            if seen.headers[b"authorization"] == [b"Bearer sk-ant-oat01-alice"]:
                return json_reply(
                    seen.request,
                    429,
                    {"type": "error", "error": {"type": "rate_limit_error", "message": "limit"}},
                    {
                        "anthropic-ratelimit-unified-status": "rejected",
                        "anthropic-ratelimit-unified-5h-status": "rejected",
                        "anthropic-ratelimit-unified-5h-utilization": "1.0",
                        "anthropic-ratelimit-unified-5h-reset": "4102444800",
                    },
                )
            return ok_message(seen)

        upstream = FakeUpstream(handler)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        http = client(self)
        response = await http.post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual([s.body for s in upstream.seen], [MESSAGE_BODY, MESSAGE_BODY])
        response = await http.post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        await response.content()
        self.assertEqual(
            [s.headers[b"authorization"][0] for s in upstream.seen],
            [b"Bearer sk-ant-oat01-alice", b"Bearer sk-ant-oat01-bob", b"Bearer sk-ant-oat01-bob"],
        )
        self.assertEqual(service.router.primary, "bob")
        status = service.status()
        self.assertEqual(status["accounts"][0]["status"], "exhausted")

    async def test_all_exhausted_gives_prompt_429(self) -> None:
        """
        When every account answers with a quota 429, each is tried once and
        the client gets a 429 rate_limit_error whose retry-after is capped
        at retryAfterCap, with a rejected unified status and the reset.
        """

        def handler(seen: Seen) -> bytes:
            return json_reply(
                seen.request,
                429,
                {"type": "error", "error": {"type": "rate_limit_error", "message": "limit"}},
                {"anthropic-ratelimit-unified-status": "rejected", "anthropic-ratelimit-unified-reset": "4102444800"},
            )

        upstream = FakeUpstream(handler)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        response = await client(self).post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        self.assertEqual(response.code, 429)
        self.assertEqual(len(upstream.seen), 2)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"55"])
        self.assertEqual(response.headers.getRawHeaders(b"anthropic-ratelimit-unified-status"), [b"rejected"])
        self.assertEqual(response.headers.getRawHeaders(b"anthropic-ratelimit-unified-reset"), [b"4102444800"])
        self.assertEqual((await response.json())["error"]["type"], "rate_limit_error")


class FailureTests(TestCase):
    async def test_client_disconnect_closes_upstream(self) -> None:
        """
        When the client goes away mid-stream, the proxy drops its upstream
        connection: the upstream request sees its connection lost.
        """
        upstream = FakeUpstream(holding_stream)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        collector, seen = await open_stream(self, url, upstream)
        collector.transport.stopProducing()
        result = await seen.gone.addErrback(lambda failure: failure.value)
        self.assertIsNotNone(result)
        await collector.done

    async def test_upstream_dying_mid_stream_is_not_completed(self) -> None:
        """
        When the upstream connection dies mid-stream, the client's response
        ends in an error (the chunked body is cut), never with a made-up
        message_stop, and the request counts as failed.
        """
        upstream = FakeUpstream(holding_stream)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        collector, seen = await open_stream(self, url, upstream)
        seen.request.channel.transport.abortConnection()
        reason = await collector.done
        await seen.gone.addErrback(lambda failure: None)
        self.assertNotIn(b"message_stop", collector.body)
        self.assertIsInstance(reason, ResponseFailed)
        self.assertEqual(service.pool.get("alice").usage.failures, 1)

    async def test_unreachable_upstream_is_502(self) -> None:
        """
        An upstream that refuses connections gives a 502 in the API error
        shape.
        """
        port = listen(self, FakeUpstream(ok_message))
        config = write_config(self, port)
        # Free the port again so that nothing listens there.
        await self._cleanups.pop()[0]()
        service, url = start_proxy(self, config)
        response = await client(self).post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        self.assertEqual(response.code, 502)
        self.assertEqual((await response.json())["error"]["type"], "api_error")

    async def test_upstream_timeout_is_504(self) -> None:
        """
        An upstream that accepts the request but never answers is given up
        after proxy.upstreamTimeout (the test advances the proxy's clock),
        and the client gets a 504 in the API error shape.
        """
        clock = Clock()
        upstream = FakeUpstream(lambda seen: NOT_DONE_YET)
        config = write_config(self, listen(self, upstream), proxy={"upstreamTimeout": 30})
        service, url = start_proxy(self, config, VirtualTimeReactor(reactor, clock))
        arrived = upstream.next_request()
        pending = client(self).post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        seen = await arrived
        answered: list[object] = []
        pending.addBoth(lambda result: answered.append(result) or result)
        clock.advance(29)
        self.assertEqual(answered, [])
        clock.advance(1)
        response = await pending
        self.assertEqual(response.code, 504)
        self.assertEqual((await response.json())["error"]["type"], "api_error")
        await seen.gone.addErrback(lambda failure: None)

    async def test_silent_stream_is_ended_after_idle_timeout(self) -> None:
        """
        A stream whose upstream sends nothing for proxy.streamIdleTimeout is
        ended: the upstream connection is dropped and the client's stream is
        cut; data that keeps arriving keeps the stream alive.
        """
        clock = Clock()
        upstream = FakeUpstream(holding_stream)
        config = write_config(self, listen(self, upstream), proxy={"streamIdleTimeout": 60})
        service, url = start_proxy(self, config, VirtualTimeReactor(reactor, clock))
        collector, seen = await open_stream(self, url, upstream)
        clock.advance(59)
        seen.request.write(text_delta("still here"))
        second: Deferred[None] = Deferred()
        collector.dataReceived = lambda data, original=collector.dataReceived: (original(data), second.callback(None))  # type: ignore[method-assign]
        await second
        clock.advance(59)
        self.assertFalse(collector.done.called)
        clock.advance(1)
        await seen.gone.addErrback(lambda failure: None)
        reason = await collector.done
        self.assertIsInstance(reason, ResponseFailed)


class _RawClient(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


class BodyCapTests(TestCase):
    async def _raw(self, url: str, payload: bytes) -> bytes:
        port = int(url.rsplit(":", 1)[1])
        protocol = _RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
        protocol.transport.write(payload)
        await protocol.closed
        return protocol.received

    async def test_oversized_content_length_gets_413_before_body(self) -> None:
        """
        A Content-Length over proxy.maxBodyBytes gets a proper HTTP/1.1 413
        in the API error shape at once, although the client has sent none
        of the body, and the upstream never sees the request.
        """
        upstream = FakeUpstream(ok_message)
        config = write_config(self, listen(self, upstream), proxy={"maxBodyBytes": 1000})
        service, url = start_proxy(self, config)
        received = await self._raw(
            url,
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n{" % PROXY_KEY.encode(),
        )
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual(json.loads(body)["error"]["type"], "request_too_large")
        self.assertEqual(upstream.seen, [])

    async def test_oversized_chunked_body_gets_413(self) -> None:
        """
        A chunked body is capped as it arrives: past proxy.maxBodyBytes the
        client gets a 413 and nothing is forwarded.
        """
        upstream = FakeUpstream(ok_message)
        config = write_config(self, listen(self, upstream), proxy={"maxBodyBytes": 1000})
        service, url = start_proxy(self, config)
        chunk = b"x" * 800
        received = await self._raw(
            url,
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
            % PROXY_KEY.encode()
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2,
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received[:80])
        self.assertEqual(upstream.seen, [])

    async def test_body_under_the_cap_is_forwarded_whole(self) -> None:
        """
        A body just under the cap, larger than Twisted's in-memory default,
        reaches the upstream byte for byte.
        """
        upstream = FakeUpstream(ok_message)
        config = write_config(self, listen(self, upstream), proxy={"maxBodyBytes": 300_000})
        service, url = start_proxy(self, config)
        body = json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "y" * 250_000}]}).encode()
        response = await client(self).post(url + "/v1/messages", data=body, headers=auth())
        await response.content()
        self.assertEqual(upstream.seen[0].body, body)


class LogHygieneTests(TestCase):
    async def test_no_credential_is_ever_logged(self) -> None:
        """
        Across a served request, a quota 429 retried elsewhere and an
        unreachable upstream, no log event carries an account token or
        the proxy key.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        logged: list[str] = []

        def observe(event: dict) -> None:
            logged.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def handler(seen: Seen) -> bytes:
            if seen.headers[b"authorization"] == [b"Bearer sk-ant-oat01-alice"]:
                return json_reply(seen.request, 429, {}, {"anthropic-ratelimit-unified-status": "rejected"})
            return ok_message(seen)

        service, url = start_proxy(self, write_config(self, listen(self, FakeUpstream(handler))))
        response = await client(self).post(url + "/v1/messages", data=MESSAGE_BODY, headers=auth())
        await response.content()
        text = "\n".join(logged)
        self.assertIn("bob", text)
        for secret in ("sk-ant-oat01-alice", "sk-ant-oat01-bob", PROXY_KEY):
            self.assertNotIn(secret, text)


class EncodingTests(TestCase):
    async def test_gzip_from_upstream_reaches_client_as_identity(self) -> None:
        """
        The proxy asks upstream for gzip itself and decodes it: the client
        gets an identity body with no content-encoding or stale
        content-length, whatever accept-encoding it sent.
        """
        from twisted.web.resource import EncodingResourceWrapper
        from twisted.web.server import GzipEncoderFactory

        payload = {"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "z" * 5000}]}
        upstream = FakeUpstream(lambda seen: json_reply(seen.request, 200, payload))
        wrapped = EncodingResourceWrapper(upstream, [GzipEncoderFactory()])
        wrapped.isLeaf = True
        service, url = start_proxy(self, write_config(self, listen(self, wrapped)))
        # A bare Agent: treq's client would decode gzip itself and hide a
        # proxy that forwarded it.
        from twisted.web.client import Agent, HTTPConnectionPool, readBody
        from twisted.web.http_headers import Headers

        from nextclaude.upstream import BytesProducer

        pool = HTTPConnectionPool(reactor, persistent=False)
        headers = Headers({k: [v] for k, v in auth({"accept-encoding": "br"}).items()})
        response = await Agent(reactor, pool=pool).request(
            b"POST", (url + "/v1/messages").encode(), headers, BytesProducer(MESSAGE_BODY)
        )
        body = await readBody(response)
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"))
        self.assertEqual(json.loads(body), payload)
        self.assertIn(b"gzip", b",".join(upstream.seen[0].headers[b"accept-encoding"]))


class EndpointTests(SynchronousTestCase):
    """The upstream's endpoint: made once per scheme, host and port; no name resolution for an address."""

    def endpoint(self, url: bytes) -> object:
        from twisted.web.client import URI

        from nextclaude.upstream import _Endpoints

        endpoints = _Endpoints(MemoryReactorClock())
        endpoint = endpoints.endpointForURI(URI.fromBytes(url))
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(url)), endpoint)
        return endpoint

    def test_addresses_connect_without_resolution(self) -> None:
        """
        An IPv4 or IPv6 address gets a plain TCP endpoint (HostnameEndpoint
        would run getaddrinfo in a thread for every new connection); a
        name gets HostnameEndpoint; https wraps either in TLS.
        """
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            _WrapperEndpoint,
        )

        self.assertIsInstance(self.endpoint(b"http://127.0.0.1:8080/v1/messages"), TCP4ClientEndpoint)
        self.assertIsInstance(self.endpoint(b"http://[::1]:8080/v1/messages"), TCP6ClientEndpoint)
        self.assertIsInstance(self.endpoint(b"http://localhost:8080/v1/messages"), HostnameEndpoint)
        self.assertIsInstance(self.endpoint(b"https://api.anthropic.com/v1/messages"), _WrapperEndpoint)


class RequestFactsTests(SynchronousTestCase):
    """What the proxy reads from a client request's headers for routing."""

    def test_agent_header_is_read(self) -> None:
        """
        A Messages POST's x-claude-code-agent-id reaches the facts (a
        subagent's request); without it there is no agent id.
        """
        from types import SimpleNamespace

        from twisted.web.test.requesthelper import DummyRequest

        from nextclaude.proxy import request_facts

        router = SimpleNamespace(landing_pending=lambda key: False)
        for agent, expected in ((b"ac4d2479465dd9c5c", "ac4d2479465dd9c5c"), (None, None)):
            request = DummyRequest([b"v1", b"messages"])
            request.method = b"POST"
            request.path = b"/v1/messages"
            request.requestHeaders.setRawHeaders(b"x-claude-code-session-id", [b"11cfa701-0e23-422f-93b1-0dbba80e2624"])
            if agent is not None:
                request.requestHeaders.setRawHeaders(b"x-claude-code-agent-id", [agent])
            facts = request_facts(request, b'{"model":"claude-sonnet-4-5","messages":[]}', router)  # type: ignore[arg-type]
            self.assertEqual(facts.agent_id, expected)
            self.assertEqual(facts.session_key, "s:11cfa701-0e23-422f-93b1-0dbba80e2624")
