"""
Hostile and broken clients: request targets that try to choose the upstream
host, malformed request and header lines, keyless requests from web pages
(trustLoopback), Claude Code's HEAD preconnect, and clients that send their
request too slowly.

Channel-level tests drive a L{ProxySite} channel over an in-memory
transport and a L{Clock}; end-to-end tests use the real proxy on loopback
port 0, one write per request, as real clients send them.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from nextclaude import events
from nextclaude.proxy import (
    HEADERS_TIMEOUT,
    ProxySite,
    host_names_loopback,
    local_origin_form,
)
from nextclaude.upstream import UpstreamService, is_origin_form, upstream_url
from tests.support import PROXY_KEY, FakeUpstream, Seen, json_reply, listen, start_proxy, write_config

KEY = PROXY_KEY.encode()
BODY = b'{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[]}'


def ok(seen: Seen) -> bytes:
    return json_reply(seen.request, 200, {"type": "message", "content": []})


def post(target: bytes, headers: bytes = b"x-api-key: " + KEY + b"\r\n", host: bytes = b"127.0.0.1") -> bytes:
    """
    One complete POST with a small JSON body; C{Connection: close}, so the
    proxy ends the connection after its answer.
    """
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + headers
        + b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )


def status_lines(received: bytes) -> list[bytes]:
    """
    Every HTTP status line in what the client received (a second answer
    on the same connection would show up here).
    """
    return [line for line in received.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def status_codes(received: bytes) -> list[int]:
    return [int(line.split(b" ")[1]) for line in status_lines(received)]


def error_of(received: bytes) -> dict[str, Any]:
    """
    The JSON body of the single answer in C{received}.
    """
    return json.loads(received.partition(b"\r\n\r\n")[2])


class _RawClient(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


async def exchange(port: int, payload: bytes) -> bytes:
    """
    Send C{payload} to the proxy in one write; everything it answers until
    it closes the connection.
    """
    protocol = _RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    protocol.transport.write(payload)
    await protocol.closed
    return protocol.received


def proxy_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class _Trap(Protocol):
    def connectionMade(self) -> None:
        self.factory.contacts.append(self.transport.getPeer())
        # Closing at once turns a wrong contact into a quick upstream
        # failure, so the test reports it instead of waiting for a timeout.
        self.transport.loseConnection()


class TrapFactory(Factory):
    """
    A plain TCP listener that must never be contacted: every connection is
    recorded and closed.
    """

    protocol = _Trap

    def __init__(self) -> None:
        self.contacts: list[object] = []


def listen_trap(test: TestCase) -> tuple[TrapFactory, int]:
    factory = TrapFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return factory, port.getHost().port


class LogWatch:
    """
    Every log event while a test runs, to check no failure and no Twisted
    warning was logged.
    """

    def __init__(self, test: TestCase | SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def failures(self) -> list[dict[str, Any]]:
        return [event for event in self.events if "log_failure" in event]

    def texts(self) -> str:
        return "\n".join(str(event.get("log_format", "")) for event in self.events)


# --- item 1: the request target never picks the upstream host --------------


class TargetFormTests(SynchronousTestCase):
    ACCEPTED = [
        b"/",
        b"/v1/messages",
        b"/v1/messages?beta=true",
        b"/v1/messages/count_tokens?beta=true",
        b"/v1/models?limit=10&after_id=x%2Fy",
        b"/api/hello",
        b"/v1/..a/b.",
        b"/v1/messages?next=//elsewhere/../x",
    ]
    REFUSED = [
        b"7/v1/messages",
        b":41007/v1/messages",
        b".attacker.example/v1/messages",
        b"@evil.example/v1/messages",
        b"//evil.example/v1/messages",
        b"/\\evil.example/v1/messages",
        b"/v1\\..\\..\\admin",
        b"v1/messages",
        b"",
        b"*",
        b"http://evil.example/v1/messages",
        b"/v1/messages#fragment",
        b"/v1/mes sages",
        b"/v1/mes\tsages",
        b"/v1/mes\x7fsages",
        b"/v1/mes\xc3\xa9sages",
        b"/v1/mes\x00sages",
        b"/v1/../api/oauth/profile",
        b"/v1/%2e%2E/api/oauth/profile",
        b"/.",
    ]

    def test_origin_form_table(self) -> None:
        """
        Only a printable-ASCII target starting with exactly one '/' (no
        backslash, no fragment, no dot segment) can be appended to the
        upstream URL; everything that could name a host, a port or user
        info, or climb out of a base path, is refused.
        """
        for target in self.ACCEPTED:
            self.assertTrue(is_origin_form(target), target)
        for target in self.REFUSED:
            self.assertFalse(is_origin_form(target), target)

    def test_upstream_url_appends_raw_target_to_base(self) -> None:
        """
        The upstream URL is the configured base (scheme, host, port and any
        base path, trailing slash or not) with the target's bytes appended
        unchanged, query included.
        """
        cases = [
            ("https://api.anthropic.com", b"/v1/messages?beta=true", b"https://api.anthropic.com/v1/messages?beta=true"),
            ("https://gw.example/anthropic", b"/v1/messages", b"https://gw.example/anthropic/v1/messages"),
            ("https://gw.example/anthropic/", b"/v1/models?x=%2F", b"https://gw.example/anthropic/v1/models?x=%2F"),
            ("http://127.0.0.1:4100", b"/", b"http://127.0.0.1:4100/"),
        ]
        for base, target, url in cases:
            self.assertEqual(upstream_url(base, target), url)

    def test_upstream_service_refuses_non_origin_targets(self) -> None:
        """
        Defense in depth: the upstream client itself refuses a target that
        is not a single-slash path, before it would even check that it is
        running, let alone connect.
        """
        service = UpstreamService(Clock(), "http://127.0.0.1:4100")
        for target in self.REFUSED:
            self.assertRaises(ValueError, service.request, b"POST", target, Headers(), b"")

    def test_absolute_form_only_for_this_proxy(self) -> None:
        """
        An absolute-form target is accepted only when its authority names
        this proxy (a loopback name or the address the connection came in
        on, with the port it came in on; 80 when absent), and then stands
        for its path; any other authority, scheme, user info or unsafe path
        is refused.
        """
        local = IPv4Address("TCP", "127.0.0.1", 3456)
        accepted = {
            b"http://127.0.0.1:3456/v1/messages?beta=true": b"/v1/messages?beta=true",
            b"http://localhost:3456/v1/messages": b"/v1/messages",
            b"HTTP://LOCALHOST.:3456/v1/models": b"/v1/models",
            b"http://[::1]:3456/v1/messages": b"/v1/messages",
            b"http://127.0.0.1:3456": b"/",
            b"http://127.0.0.1:3456?x=1": b"/?x=1",
        }
        for target, origin in accepted.items():
            self.assertEqual(local_origin_form(target, local), origin, target)
        refused = [
            b"http://evil.example:3456/v1/messages",
            b"http://127.0.0.1:3457/v1/messages",
            b"http://127.0.0.1/v1/messages",
            b"https://127.0.0.1:3456/v1/messages",
            b"http://user@127.0.0.1:3456/v1/messages",
            b"http://127.0.0.1:3456@evil.example/v1/messages",
            b"http://localhost.evil:3456/v1/messages",
            b"http://127.0.0.1:3456//evil.example/v1/messages",
            b"http://127.0.0.1:3456/v1/../x",
            b"ftp://127.0.0.1:3456/v1/messages",
        ]
        for target in refused:
            self.assertIsNone(local_origin_form(target, local), target)
        lan = IPv4Address("TCP", "192.168.1.5", 80)
        self.assertEqual(local_origin_form(b"http://192.168.1.5/v1", lan), b"/v1")
        self.assertIsNone(local_origin_form(b"http://192.168.1.6/v1", lan))
        v6 = IPv6Address("TCP", "::1", 3456)
        self.assertEqual(local_origin_form(b"http://[::1]:3456/v1", v6), b"/v1")


class TargetEndToEndTests(TestCase):
    async def _refused(self, upstream: str, target: bytes, trap: TrapFactory) -> None:
        logs = LogWatch(self)
        config = write_config(self, 0, upstream=upstream)
        service, url = start_proxy(self, config)
        received = await exchange(proxy_port(url), post(target))
        self.assertEqual(trap.contacts, [], target)
        self.assertEqual(status_lines(received), [b"HTTP/1.1 400 Bad Request"], (target, received))
        self.assertEqual(error_of(received)["error"]["type"], "invalid_request_error")
        self.assertEqual(service.pool.get("alice").usage.requests, 0)
        self.assertEqual(logs.failures(), [])

    async def test_targets_that_name_a_host_or_port_are_refused(self) -> None:
        """
        Targets that, appended to the base URL as text, would change its
        port (C{7/…}, C{:PORT/…}), its host (C{.evil/…}, C{@host/…}) or
        would be read as a network path (C{//host/…}, C{/\\host/…}) get a
        400 invalid_request_error and the listener they point at is never
        contacted.
        """
        trap, port = listen_trap(self)
        cases = [
            # base port + one more digit = the trap's port
            (f"http://127.0.0.1:{port // 10}", b"%d/v1/messages" % (port % 10)),
            ("http://127.0.0.1", b":%d/v1/messages" % port),
            ("http://127.0.0", b".1:%d/v1/messages" % port),
            ("http://nextclaude.invalid", b"@127.0.0.1:%d/v1/messages" % port),
            (f"http://127.0.0.1:{port}", b"//127.0.0.1:%d/v1/messages" % port),
            (f"http://127.0.0.1:{port}", b"/\\127.0.0.1:%d/v1/messages" % port),
        ]
        for upstream, target in cases:
            await self._refused(upstream, target, trap)

    async def test_relative_foreign_absolute_and_climbing_targets_are_refused(self) -> None:
        """
        A target without a leading '/', an absolute URL naming another
        host or port, and a path climbing out of a gateway's base path are
        refused with a 400 before any upstream connection.
        """
        trap, port = listen_trap(self)
        base = f"http://127.0.0.1:{port}/anthropic"
        for target in (
            b"v1/messages",
            b"http://127.0.0.1:%d/v1/messages" % port,
            b"http://evil.example/v1/messages",
            b"http://localhost:%d/v1/messages" % port,
            b"/../v1/messages",
            b"/%2e%2e/oauth/token",
        ):
            await self._refused(base, target, trap)

    async def test_base_url_path_is_kept(self) -> None:
        """
        An upstream configured with a base path (a gateway) receives the
        base path followed by the client's raw path and query.
        """
        upstream = FakeUpstream(ok)
        upstream_port = listen(self, upstream)
        config = write_config(self, 0, upstream=f"http://127.0.0.1:{upstream_port}/anthropic")
        service, url = start_proxy(self, config)
        received = await exchange(proxy_port(url), post(b"/v1/messages?beta=true&x=a%2Fb"))
        self.assertEqual(status_lines(received), [b"HTTP/1.1 200 OK"])
        self.assertEqual(upstream.seen[0].uri, b"/anthropic/v1/messages?beta=true&x=a%2Fb")

    async def test_absolute_form_naming_the_proxy_is_served(self) -> None:
        """
        An absolute-form target naming this proxy (its address or
        localhost, with its port) is relayed with its path and query only.
        """
        upstream = FakeUpstream(ok)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        port = proxy_port(url)
        for authority in (b"127.0.0.1:%d" % port, b"localhost:%d" % port):
            received = await exchange(port, post(b"http://" + authority + b"/v1/messages?beta=true"))
            self.assertEqual(status_lines(received), [b"HTTP/1.1 200 OK"], received)
        self.assertEqual([seen.uri for seen in upstream.seen], [b"/v1/messages?beta=true"] * 2)


# --- item 2: malformed request and header lines -----------------------------

HEADERS = b"Host: 127.0.0.1\r\nx-api-key: " + KEY + b"\r\nContent-Length: 2\r\n\r\n{}"

BAD_REQUEST_LINES = [
    b"POST /v1/messages HTTP/1.1 extra",
    b"POST  /v1/messages HTTP/1.1",
    b"POST /v1/messages  HTTP/1.1",
    b" POST /v1/messages HTTP/1.1",
    b"POST /v1/mes\x01sages HTTP/1.1",
    b"POST /v1/mes\x7fsages HTTP/1.1",
    b"POST /v1/messages\xa0 HTTP/1.1",
    b"POST /v1/m\xc3\xa9ssages HTTP/1.1",
    b"POST /v1/messages\tHTTP/1.1",
    b"GARBAGE",
    b"POST /v1/messages HTTP/2.0",
    b"POST /v1/messages http/1.1",
    b"POST /v1/messages HTTP/1.1x",
    b"P(ST /v1/messages HTTP/1.1",
    b"POST 7/v1/messages HTTP/1.1",
]

BAD_HEADER_LINES = [
    b"X-No-Colon",
    b"X-Nul: a\x00b",
    b"X-Control: a\x01b",
    b"X-Escape: a\x1b[2Jb",
    b"X-Del: a\x7fb",
    b"X-Folded: a\r\n  continued",
    b"X-Folded: a\r\n\tcontinued",
    b"X-Space-Before-Colon : 1",
    b"X-Tab-Before-Colon\t: 1",
    b"X(Bad): 1",
    b"X Bad: 1",
    b"X-\xc3\xa9: 1",
    b": no-name",
    b"X-Bare-CR: a\rb",
    # Framing headers that make the body's length ambiguous.
    b"Content-Length: 2x",
    b"Content-Length: 3",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
]


def malformed_payloads() -> list[bytes]:
    """
    Each fault in one write with a complete request around it; a bad
    header line comes first, so valid headers and a body follow it.
    """
    payloads = [line + b"\r\n" + HEADERS for line in BAD_REQUEST_LINES]
    payloads += [b"POST /v1/messages HTTP/1.1\r\n" + line + b"\r\n" + HEADERS for line in BAD_HEADER_LINES]
    return payloads


class HalfCloseTransport(StringTransport):
    """
    An in-memory transport that, like TCP, keeps delivering what was
    already received after a half-close: C{loseWriteConnection} does not
    mark it disconnecting.
    """

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Recording(Resource):
    """
    An application that records what reaches it; C{hold} keeps each
    response open until the test finishes it.
    """

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.rendered: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        self.rendered.append(request)
        if self.hold:
            return NOT_DONE_YET
        return b"ok"


def connect_channel(
    resource: Resource, clock: Clock, max_body_bytes: int = 1_000_000
) -> tuple[Any, HalfCloseTransport]:
    site = ProxySite(resource, max_body_bytes, reactor=clock)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = HalfCloseTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 3456), peerAddress=IPv4Address("TCP", "127.0.0.1", 50000)
    )
    protocol.makeConnection(transport)
    return protocol, transport


class MalformedChannelTests(SynchronousTestCase):
    def test_each_malformed_request_gets_exactly_one_400(self) -> None:
        """
        A malformed request line (extra field, double space, control, DEL
        or non-ASCII byte in the target, no fields, bad version or method,
        a relative target) or header line (no colon, NUL or other control
        byte, obs-fold, whitespace before the colon, invalid name), sent in
        one write, gets exactly one HTTP/1.1 400 in the API error shape and
        a closed connection; the application never sees the request and
        nothing raises.
        """
        for payload in malformed_payloads():
            resource = Recording()
            protocol, transport = connect_channel(resource, Clock())
            protocol.dataReceived(payload)
            received = transport.value()
            self.assertEqual(status_lines(received), [b"HTTP/1.1 400 Bad Request"], payload)
            self.assertEqual(error_of(received)["error"]["type"], "invalid_request_error", payload)
            self.assertTrue(transport.write_closed or transport.disconnecting, payload)
            self.assertEqual(resource.rendered, [], payload)
            # Whatever else the client sends is ignored, not parsed.
            protocol.dataReceived(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(status_lines(transport.value()), [b"HTTP/1.1 400 Bad Request"], payload)
            protocol.connectionLost(Exception("closed"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_oversized_heads_still_get_431(self) -> None:
        """
        Size limits keep their own answer: one over-long header line, or
        headers over the total limit, get exactly one 431 in the API error
        shape, and the application sees nothing.
        """
        for headers in (b"X-Long: " + b"a" * 20000 + b"\r\n", (b"X-Many: " + b"a" * 1000 + b"\r\n") * 20):
            resource = Recording()
            protocol, transport = connect_channel(resource, Clock())
            protocol.dataReceived(b"POST /v1/messages HTTP/1.1\r\n" + headers + HEADERS)
            received = transport.value()
            self.assertEqual(status_codes(received), [431])
            self.assertEqual(error_of(received)["error"]["type"], "invalid_request_error")
            self.assertEqual(resource.rendered, [])

    def test_well_formed_requests_still_pass(self) -> None:
        """
        The strict parser lets ordinary requests through: tabs and
        obs-text in values, empty values, token punctuation in names, and
        an absolute-form target naming the proxy.
        """
        resource = Recording()
        protocol, transport = connect_channel(resource, Clock())
        protocol.dataReceived(
            b"POST http://127.0.0.1:3456/v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:3456\r\n"
            b"X-Stainless-Arch: x64\r\nX-Tab:\ta\tb\r\nX-Latin: caf\xe9\r\nX-Empty:\r\n"
            b"X!#$%&'*+-.^_`|~: 1\r\nContent-Length: 2\r\n\r\n{}"
        )
        self.assertEqual(status_lines(transport.value()), [b"HTTP/1.1 200 OK"])
        request = resource.rendered[0]
        self.assertEqual(request.uri, b"/v1/messages?beta=true")
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-latin"), [b"caf\xe9"])

    def test_head_and_large_body_in_one_read(self) -> None:
        """
        A head and a large body arriving in one read (a big request's first
        read) parse as if they came apart: every header and the body
        intact, and a pipelined request after it served too.  A malformed
        header line in such a read still gets exactly one 400, and the
        body after it is never parsed.
        """
        body = b'{"pad":"' + b"\r\n\r\nPOST / HTTP/1.1" * 5000 + b'"}'
        head = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-One: 1\r\nContent-Length: %d\r\n\r\n" % len(body)
        bodies: list[bytes] = []

        class Bodies(Recording):
            def render(self, request: Request) -> bytes | int:
                bodies.append(request.take_body())
                return super().render(request)

        resource = Bodies()
        protocol, transport = connect_channel(resource, Clock())
        protocol.dataReceived(head + body + b"GET /next HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # Each answer's body ("ok") runs into the next status line.
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK\r\n"), 2)
        self.assertEqual([r.uri for r in resource.rendered], [b"/v1/messages", b"/next"])
        self.assertEqual(resource.rendered[0].requestHeaders.getRawHeaders(b"x-one"), [b"1"])
        self.assertEqual(bodies, [body, b""])

        resource = Bodies()
        protocol, transport = connect_channel(resource, Clock())
        protocol.dataReceived(head.replace(b"X-One: 1", b"X One: 1") + body)
        self.assertEqual(status_lines(transport.value()), [b"HTTP/1.1 400 Bad Request"])
        self.assertEqual(resource.rendered, [])

    @settings(max_examples=60)
    @given(st.lists(st.integers(min_value=0, max_value=1_000_000), max_size=8))
    def test_any_cut_of_the_stream_parses_the_same(self, cuts: list[int]) -> None:
        """
        Two pipelined requests (a POST with a 70 KB body holding header-like
        lines, then a GET) arriving cut at arbitrary points, in reads of
        any size, give the same two requests with the same headers and
        body as one read does.
        """
        body = b'{"pad":"' + b"X-Fake: 1\r\n\r\n" * 5000 + b'"}'
        stream = (
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-One: 1\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
            + b"GET /next HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Two: 2\r\n\r\n"
        )
        seen: list[tuple[bytes, list[bytes] | None, bytes]] = []

        class Bodies(Recording):
            def render(self, request: Request) -> bytes | int:
                header = request.requestHeaders.getRawHeaders(b"x-one") or request.requestHeaders.getRawHeaders(b"x-two")
                seen.append((request.uri, header, request.take_body()))
                return super().render(request)

        protocol, transport = connect_channel(Bodies(), Clock())
        points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
        for start, end in zip(points, points[1:]):
            protocol.dataReceived(stream[start:end])
        self.assertEqual(
            seen, [(b"/v1/messages", [b"1"], body), (b"/next", [b"2"], b"")]
        )
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK\r\n"), 2)


class MalformedEndToEndTests(TestCase):
    async def test_malformed_requests_reach_nothing(self) -> None:
        """
        Over a real connection, each malformed request line or header line
        gets one 400 in the API error shape, the connection closes, the
        upstream sees nothing and no failure is logged.
        """
        logs = LogWatch(self)
        upstream = FakeUpstream(ok)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        for payload in malformed_payloads():
            received = await exchange(proxy_port(url), payload)
            self.assertEqual(status_lines(received), [b"HTTP/1.1 400 Bad Request"], payload)
            self.assertEqual(error_of(received)["error"]["type"], "invalid_request_error")
        self.assertEqual(upstream.seen, [])
        self.assertEqual(logs.failures(), [])


# --- item 8: trustLoopback only for local, non-browser requests ------------


class LoopbackHostTests(SynchronousTestCase):
    def test_host_header_table(self) -> None:
        """
        Exactly one Host naming loopback (localhost, 127.0.0.0/8 or [::1],
        any port; case-insensitive; one trailing dot) passes; other names,
        look-alikes, several Host values and none do not.
        """
        for host in (
            b"localhost",
            b"LOCALHOST.",
            b"localhost:3456",
            b"127.0.0.1",
            b"127.0.0.1:3456",
            b"127.8.9.10:1",
            b"[::1]",
            b"[::1]:3456",
            b"[0:0:0:0:0:0:0:1]:80",
        ):
            self.assertTrue(host_names_loopback([host]), host)
        for values in (
            [b"evil.example"],
            [b"localhost.evil"],
            [b"localhost.evil.example:3456"],
            [b"127.0.0.1.nip.io"],
            [b"localhost.."],
            [b"evil@localhost"],
            [b"::1"],
            [b"[127.0.0.1]"],
            [b"127.1"],
            [b"0x7f.0.0.1"],
            [b"2130706433"],
            [b"10.0.0.1"],
            [b"localhost:99999"],
            [b"localhost, evil.example"],
            [b""],
            [b"127.0.0.1", b"evil.example"],
            [b"localhost", b"localhost"],
            [],
            None,
        ):
            self.assertFalse(host_names_loopback(values), values)


class TrustLoopbackTests(TestCase):
    async def _setup(self) -> tuple[FakeUpstream, int]:
        upstream = FakeUpstream(ok)
        config = write_config(self, listen(self, upstream), proxy={"trustLoopback": True})
        service, url = start_proxy(self, config)
        return upstream, proxy_port(url)

    async def test_browser_and_rebinding_requests_need_the_key(self) -> None:
        """
        With trustLoopback, a keyless request from a web page is refused
        with 401 and never relayed: any Origin (a foreign site, "null" with
        a form-friendly text/plain body, even a loopback page), a foreign
        Host (DNS rebinding) on the relay and on the status endpoint, two
        Host headers, a look-alike name, or no Host at all.
        """
        upstream, port = await self._setup()
        text_plain = b"Content-Type: text/plain\r\n"
        cases = [
            post(b"/v1/messages", b"Origin: https://evil.example\r\n"),
            post(b"/v1/messages", b"Origin: null\r\n" + text_plain),
            post(b"/v1/messages", b"Origin: http://127.0.0.1:%d\r\n" % port),
            post(b"/v1/messages", b"", host=b"evil.example"),
            post(b"/v1/messages", b"", host=b"evil.example:%d" % port),
            post(b"/v1/messages", b"", host=b"localhost.evil"),
            post(b"/v1/messages", b"Host: evil.example\r\n", host=b"127.0.0.1"),
            b"GET /nextclaude/status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            b"GET /nextclaude/status HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n"
            b"Connection: close\r\n\r\n",
            b"GET /nextclaude/status HTTP/1.0\r\n\r\n",
        ]
        for payload in cases:
            received = await exchange(port, payload)
            self.assertEqual(status_codes(received), [401], payload)
            self.assertEqual(error_of(received)["error"]["type"], "authentication_error")
        self.assertEqual(upstream.seen, [])

    async def test_local_programs_need_no_key(self) -> None:
        """
        With trustLoopback, a keyless request without Origin and with one
        loopback Host is relayed, whatever the loopback spelling and port.
        """
        upstream, port = await self._setup()
        hosts = [b"127.0.0.1:3456", b"127.0.0.1:%d" % port, b"[::1]", b"LOCALHOST.", b"localhost", b"127.5.6.7:1"]
        for host in hosts:
            received = await exchange(port, post(b"/v1/messages", b"", host=host))
            self.assertEqual(status_lines(received), [b"HTTP/1.1 200 OK"], host)
        self.assertEqual(len(upstream.seen), len(hosts))

    async def test_the_key_skips_host_check_but_origin_needs_it(self) -> None:
        """
        A request presenting the key is not Host-checked (port forwards,
        host.docker.internal, LAN binds) and may carry Origin, with or
        without trustLoopback; without trustLoopback a keyless loopback
        request is refused as before.
        """
        upstream, port = await self._setup()
        key = b"x-api-key: " + KEY + b"\r\n"
        for payload in (
            post(b"/v1/messages", key, host=b"host.docker.internal:3456"),
            post(b"/v1/messages", key + b"Origin: https://evil.example\r\n", host=b"evil.example"),
        ):
            received = await exchange(port, payload)
            self.assertEqual(status_lines(received), [b"HTTP/1.1 200 OK"], payload)
        self.assertEqual(len(upstream.seen), 2)
        strict = FakeUpstream(ok)
        service, url = start_proxy(self, write_config(self, listen(self, strict)))
        received = await exchange(proxy_port(url), post(b"/v1/messages", b"", host=b"localhost"))
        self.assertEqual(status_lines(received), [b"HTTP/1.1 401 Unauthorized"])
        self.assertEqual(strict.seen, [])


# --- item 9: HEAD answered locally ------------------------------------------


class HeadTests(TestCase):
    async def test_every_head_is_answered_locally(self) -> None:
        """
        HEAD on any path (Claude Code's HEAD /api/hello preconnect, HEAD /,
        an API path, the status path), without the key, with trustLoopback
        on or off, gets a 2xx with no body; no account, event or upstream
        is touched and Twisted logs no "message body" warning.
        """
        logs = LogWatch(self)
        for trust in (False, True):
            upstream = FakeUpstream(ok)
            config = write_config(self, listen(self, upstream), proxy={"trustLoopback": trust})
            service, url = start_proxy(self, config)
            for path in (b"/api/hello", b"/", b"/v1/messages?beta=true", b"/nextclaude/status"):
                received = await exchange(
                    proxy_port(url), b"HEAD " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                head, _, body = received.partition(b"\r\n\r\n")
                self.assertEqual(status_lines(received), [b"HTTP/1.1 200 OK"], path)
                self.assertEqual(body, b"", path)
            self.assertEqual(upstream.seen, [])
            for name in ("alice", "bob"):
                self.assertEqual(service.pool.get(name).usage.requests, 0)
            kinds = {event.kind for event in service.hub.recent}
            self.assertFalse(kinds & {events.REQUEST_STARTED, events.REQUEST_ROUTED, events.REQUEST_FINISHED})
        self.assertNotIn("message body", logs.texts())
        self.assertEqual(logs.failures(), [])


# --- item 10: slow requests --------------------------------------------------


class SlowRequestTests(SynchronousTestCase):
    def _is_408(self, transport: HalfCloseTransport) -> bool:
        received = transport.value()
        if status_lines(received) != [b"HTTP/1.1 408 Request Timeout"]:
            return False
        self.assertEqual(error_of(received)["error"]["type"], "invalid_request_error")
        self.assertTrue(transport.write_closed)
        return True

    def _trickle(self, protocol: Any, clock: Clock, data: bytes, seconds: int) -> None:
        """
        One byte a second for C{seconds} seconds (fewer if C{data} ends).
        """
        for byte in data[:seconds]:
            protocol.dataReceived(bytes([byte]))
            clock.advance(1)

    def test_trickled_head_gets_408_at_60_s(self) -> None:
        """
        A request line or header block trickled a byte a second (each byte
        would reset an idle timeout) gets a 408 in the API error shape 60 s
        after the connection opened, not before, and the application never
        sees it.
        """
        head = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200
        for start in (0, 30):
            clock = Clock()
            resource = Recording()
            protocol, transport = connect_channel(resource, clock)
            clock.advance(start)
            self._trickle(protocol, clock, head, int(HEADERS_TIMEOUT) - start - 1)
            self.assertEqual(transport.value(), b"")
            protocol.dataReceived(b"a")
            clock.advance(1)
            self.assertTrue(self._is_408(transport))
            self.assertEqual(resource.rendered, [])

    def test_head_completed_in_time_is_served(self) -> None:
        """
        A head that completes just before 60 s is served, and the deadline
        does not fire afterwards.
        """
        clock = Clock()
        resource = Recording()
        protocol, transport = connect_channel(resource, clock)
        clock.advance(59)
        protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        clock.advance(120)
        self.assertEqual(status_lines(transport.value()), [b"HTTP/1.1 200 OK"])
        self.assertEqual(len(resource.rendered), 1)

    def test_slow_body_gets_408(self) -> None:
        """
        A body gets max(60 s, its length at 64 KiB/s) from the end of the
        head: a small body trickled past 60 s and a 10 MiB body (160 s)
        still incomplete at 160 s get a 408; neither is cut earlier.
        """
        for length, budget in ((100, 60), (10 * 1024 * 1024, 160)):
            clock = Clock()
            resource = Recording()
            protocol, transport = connect_channel(resource, clock, max_body_bytes=20 * 1024 * 1024)
            protocol.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)
            for _ in range(budget - 1):
                protocol.dataReceived(b"x")
                clock.advance(1)
            self.assertEqual(transport.value(), b"", length)
            clock.advance(1)
            self.assertTrue(self._is_408(transport), length)
            self.assertEqual(resource.rendered, [])

    def test_slow_chunked_body_is_bounded_by_the_cap(self) -> None:
        """
        A chunked body, whose length is unknown, gets the time the largest
        accepted body (proxy.maxBodyBytes) would take at 64 KiB/s, at
        least 60 s.
        """
        clock = Clock()
        resource = Recording()
        protocol, transport = connect_channel(resource, clock, max_body_bytes=8 * 1024 * 1024)
        protocol.dataReceived(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(127):
            protocol.dataReceived(b"1\r\nx\r\n")
            clock.advance(1)
        self.assertEqual(transport.value(), b"")
        clock.advance(1)
        self.assertTrue(self._is_408(transport))

    def test_next_head_deadline_counts_from_the_previous_response(self) -> None:
        """
        On a kept-alive connection the next head's 60 s start when the
        previous response ends (here after a 100 s response), so a
        trickled second request gets its 408 at 160 s.
        """
        clock = Clock()
        resource = Recording(hold=True)
        protocol, transport = connect_channel(resource, clock)
        protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(100)
        request = resource.rendered[0]
        request.write(b"ok")
        request.finish()
        first = transport.value()
        transport.clear()
        self._trickle(protocol, clock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 100, 59)
        self.assertEqual(transport.value(), b"")
        clock.advance(1)
        self.assertTrue(self._is_408(transport))
        self.assertEqual(status_lines(first), [b"HTTP/1.1 200 OK"])
        self.assertEqual(len(resource.rendered), 1)

    def test_idle_keep_alive_is_closed_without_an_answer(self) -> None:
        """
        A connection on which no byte of a request arrives (fresh, or idle
        after a response) is closed at 60 s without a 408: an unasked
        answer could be taken for the reply to the client's next request.
        """
        clock = Clock()
        resource = Recording()
        protocol, transport = connect_channel(resource, clock)
        clock.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

        clock = Clock()
        protocol, transport = connect_channel(resource, clock)
        protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        transport.clear()
        clock.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
