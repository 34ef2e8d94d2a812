"""
The upstream client: one persistent connection pool and an agent that asks
for gzip and decodes it, keeps no cookies and follows no redirects, owned
by a service.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.abstract import FileDescriptor, isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    ContentDecoderAgent,
    GzipDecoder,
    HTTP11ClientProtocol,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http import _ChunkedTransferDecoder
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from nextclaude.quota import QuotaReport, parse_rate_limit_headers

# A request target that can only ever name a path under the configured base
# URL: one '/' first (a second would start an authority for any URL parser
# that sees it alone), then printable ASCII without '#' (never part of a
# request target; the upstream client would silently drop what follows) and
# without a backslash (some servers read it as '/').
_ORIGIN_FORM = re.compile(rb"/(?!/)[\x21\x22\x24-\x5b\x5d-\x7e]*")


def is_origin_form(target: bytes) -> bool:
    """
    Whether C{target} is a path (and query) safe to append to the upstream
    base URL: it cannot change the host, and it has no C{.} or C{..}
    segment (plain or percent-encoded) that an upstream could resolve out
    of a gateway's base path.
    """
    if _ORIGIN_FORM.fullmatch(target) is None:
        return False
    path = target.partition(b"?")[0].lower().replace(b"%2e", b".")
    return not any(segment in (b".", b"..") for segment in path.split(b"/"))


def upstream_url(base_url: str, target: bytes) -> bytes:
    """
    The configured base URL (scheme, host, port and any base path) with the
    client's raw target appended as bytes: the target is never parsed as a
    URL, so it can never choose where an account's credentials go.

    @raise ValueError: C{target} is not a single-slash origin-form target.
    """
    if not is_origin_form(target):
        raise ValueError("refusing a request target that is not a path starting with one '/'")
    return base_url.rstrip("/").encode("ascii") + target


class UpstreamUnavailable(Exception):
    """
    No response from upstream: C{code} is what the client gets (502 when it
    could not be reached, 504 when it did not answer in time).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def rate_limit_headers(headers: Headers) -> dict[str, str]:
    """
    The response headers the quota parser reads, as a lowercase dict.
    """
    found: dict[str, str] = {}
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if (
            lowered.startswith(b"anthropic-ratelimit-")
            or lowered == b"retry-after"
            or lowered == b"x-should-retry"
        ):
            found[lowered.decode("latin-1")] = values[-1].decode("latin-1")
    return found


def quota_report(response: IResponse, now: float) -> QuotaReport:
    return parse_rate_limit_headers(rate_limit_headers(response.headers), now)


# Enough idle connections per host for a busy pool of Claude Code sessions
# (the default of 2 would make most requests pay a new TLS handshake).
MAX_PERSISTENT_PER_HOST = 128

CONNECT_TIMEOUT = 30.0


class ChunkedPerRead(_ChunkedTransferDecoder):
    """
    Twisted's decoder of a chunked response body (RFC 9112, section 7.1)
    that hands on what one read of the connection held at once, rather
    than chunk by chunk.

    An event stream is one chunk per event, and several events often
    arrive in one read (a burst of deltas, or the end of a message:
    C{content_block_stop}, C{message_delta} and C{message_stop}); each
    chunk would otherwise cost a trip through the response, the relay, the
    usage parser and a chunked write to the client (about 8 microseconds
    per event on the benchmark machine, issue 12).  Nothing waits for
    more: what a read decoded is delivered before that read returns, and
    before the end of the body is reported.  Decoding, and its errors,
    are Twisted's.
    """

    def __init__(self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None]) -> None:
        # The collecting lives apart from the decoder: a callback bound to
        # the decoder itself would make a reference cycle that keeps the
        # response until a full garbage collection (see _ClientProtocol).
        self._read = _ReadCollector(dataCallback, finishCallback)
        super().__init__(self._read.pieces.append, self._read.finished)

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        finally:
            # Also when the rest of the read was malformed: what came
            # before the error still reaches the response, as it would
            # chunk by chunk.
            self._read.flush()


class _ReadCollector:
    """
    The chunks of one read, waiting for the read to end (L{ChunkedPerRead}).
    """

    __slots__ = ("pieces", "_deliver", "_finish")

    def __init__(self, deliver: Callable[[bytes], None], finish: Callable[[bytes], None]) -> None:
        self.pieces: list[bytes] = []
        self._deliver = deliver
        self._finish = finish

    def flush(self) -> None:
        pieces = self.pieces
        if pieces:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            self._deliver(data)

    def finished(self, rest: bytes) -> None:
        self.flush()
        self._finish(rest)


_TRANSFER_DECODERS = {b"chunked": ChunkedPerRead}


class _ClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client protocol, less a reference cycle per request.

    A finished response's parser keeps its body decoder, and the decoder's
    callbacks lead back to the parser: the parser, decoder, response, both
    header sets and the request (about 60 objects, 10 KB at Claude Code's
    header count) then wait for a full garbage collection, which comes
    about once per 1,800 requests (issue 12).  Dropping the decoder once
    the connection has let go of the parser frees them by reference
    counting as soon as the response is over.  C{_disconnectParser} is
    Twisted's own (private) step; should a later Twisted rename it, this
    override is simply never called and the cycle waits for the collector
    as before (C{tests.test_memory.ResponseCycleTests} would say so).
    """

    def request(self, request: Any) -> Deferred[IResponse]:
        producer = getattr(request, "bodyProducer", None)
        if isinstance(producer, BytesProducer) and isinstance(self.transport, FileDescriptor):
            producer.send_head = self.transport.doWrite
        finished = super().request(request)
        # The response parser is made during the call, and reads the
        # transfer encoding only once the response's headers arrive, later.
        # Its table of decoders is a (private) class attribute of Twisted's
        # parser: should it ever be renamed, chunks are simply handed on
        # one by one again.
        parser = getattr(self, "_parser", None)
        if parser is not None:
            parser._transferDecoders = _TRANSFER_DECODERS
        return finished

    def _disconnectParser(self, reason: Any) -> None:
        parser = getattr(self, "_parser", None)
        super()._disconnectParser(reason)
        if parser is not None:
            parser.bodyDecoder = None


class _QuietFactory(_HTTP11ClientFactory):
    # One "Starting factory" log line per upstream connection is noise.
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


@implementer(IBodyProducer)
class BytesProducer:
    """
    Writes a body that is already in memory in one go, with its length known
    up front (treq's default producer would trickle it through a
    cooperator), and forgets it once written: Twisted's HTTP client keeps
    the producer as long as the response (and, through a reference cycle
    of its parser, until a full garbage collection).

    A TCP transport joins everything written to it since its last send
    into one string before sending: the request's head and a 2 MB body
    would be copied into a new 2 MB string (about 0.1-0.3 ms per MB on the
    benchmark machine, issue 12).  So when C{send_head} is set (to a plain
    TCP transport's C{doWrite}, by L{_ClientProtocol}) a large body is
    written only after the head has been handed to the socket, and the
    transport sends from the body itself.  A head the socket does not
    take at once stays buffered and the two are joined as before.
    """

    # Below this, a copy costs less than the extra send of the head alone.
    SEND_HEAD_FIRST_ABOVE = 64 * 1024

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body
        self.length = len(body) if body else 0
        self.send_head: Callable[[], object] | None = None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        body, self._body = self._body, None
        send_head, self.send_head = self.send_head, None
        if body:
            if send_head is not None and len(body) > self.SEND_HEAD_FIRST_ABOVE:
                # What it returns (a lost connection, say) reaches the
                # reactor too: the transport stays registered for writing
                # until its buffer is empty, and the next write fails the same.
                send_head()
            consumer.write(body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self._body = None


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    One endpoint per upstream host, made once: Twisted's Agent would build
    a new endpoint (and, for https, a new TLS context) for every request.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._tls = BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            host = uri.host.decode("idna").strip("[]")
            if isIPAddress(host):
                # An address needs no name resolution: HostnameEndpoint
                # would still send each new connection through getaddrinfo
                # in a thread, and build its racing machinery around it.
                endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT)
            elif isIPv6Address(host):
                endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT)
            else:
                endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=CONNECT_TIMEOUT)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            self._cache[key] = endpoint
        return endpoint


class UpstreamService(Service):
    """
    Owns the connection pool: created in startService, closed in
    stopService.

    Requests go through Twisted's Agent with the layers of treq's client
    that the proxy needs and none of the rest: treq's
    C{HTTPClient.request} re-parses every URL with hyperlink (IDNA checks
    of the host included) and runs a cookie layer, about 0.2-0.4 ms per
    request measured on the benchmark machine (issue 12), for nothing the
    proxy uses.  Kept: gzip asked for and decoded (treq's own layer,
    C{ContentDecoderAgent} with C{GzipDecoder}); no cookies, as before
    (nothing stores or adds one, so one account's can never reach
    another's); no redirects followed (Agent never follows one); the pool.
    """

    name = "upstream"

    def __init__(self, reactor: IReactorTime, base_url: str) -> None:
        self._reactor = reactor
        self.base_url = base_url.rstrip("/")
        self._pool: HTTPConnectionPool | None = None
        self._agent: ContentDecoderAgent | None = None

    def startService(self) -> None:
        super().startService()
        self._pool = _QuietPool(self._reactor, persistent=True)
        self._pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        agent = Agent.usingEndpointFactory(self._reactor, _Endpoints(self._reactor), pool=self._pool)
        self._agent = ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)])

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        pool, self._pool, self._agent = self._pool, None, None
        if pool is not None:
            return pool.closeCachedConnections()
        return None

    def request(
        self, method: bytes, path: bytes, headers: Headers, body: bytes
    ) -> Deferred[IResponse]:
        """
        Send one request; the Deferred fires with the response as soon as
        its headers arrive (the body streams through C{deliverBody}).
        Cancel it to give up waiting and drop the connection.
        """
        # Checked before anything else: defense in depth behind the
        # channel, which already refuses such targets with a 400.
        url = upstream_url(self.base_url, path)
        if self._agent is None:
            raise RuntimeError("the upstream service is not running")
        producer = BytesProducer(body) if body or method not in (b"GET", b"HEAD") else None
        # treq upper-cased the method; kept.
        return self._agent.request(method.upper(), url, headers, producer)

