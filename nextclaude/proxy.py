"""
The reverse proxy: a Twisted web resource that relays every request to the
upstream on the account the router picks, streaming the response back chunk
by chunk with backpressure.
"""

from __future__ import annotations

import hmac
import io
import json
import re
from ipaddress import ip_address
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from nextclaude import __version__, events
from nextclaude.allocator import Allocator, Reclaimer
from nextclaude.config import Config
from nextclaude.events import EventHub
from nextclaude.history import client_product
from nextclaude.pool import Account
from nextclaude.requestlog import RequestLog, masked_headers
from nextclaude.router import Decision, Router
from nextclaude.scheduler import Scheduler
from nextclaude.sessions import RequestFacts, inspect_request
from nextclaude.upstream import UpstreamService, UpstreamUnavailable, is_origin_form
from nextclaude.usage import StreamParser, Usage, usage_from_json_body

STATUS_PATH = b"/nextclaude/status"
HEALTH_PATH = b"/nextclaude/health"
METRICS_PATH = b"/nextclaude/metrics"
HEALTH_BODY = json.dumps({"ok": True, "version": __version__}).encode("utf-8")

# RFC 9110 hop-by-hop headers, plus what the proxy itself must own: the
# length and encoding of the body it re-frames, and the Host of the upstream.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
# The local user's credentials: never sent on, whatever the account.
_CLIENT_CREDENTIALS = frozenset({b"x-api-key", b"authorization", b"x-nextclaude-key"})
# The upstream client negotiates gzip itself and decodes it, so the
# client's wish is moot.
_REQUEST_ONLY = frozenset({b"accept-encoding"})
_RESPONSE_DROP = _HOP_BY_HOP | {b"content-encoding"}

OAUTH_BETA = b"oauth-2025-04-20"

# Whether the client asked for a stream: decides the probe's header timeout.
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')

# Non-streaming bodies larger than this are relayed but not parsed for usage.
_JSON_USAGE_LIMIT = 8 * 1024 * 1024


def error_body(kind: str, message: str) -> bytes:
    """
    An error in the Anthropic API's shape, so clients show it properly.
    """
    return json.dumps(
        {"type": "error", "error": {"type": kind, "message": message}}
    ).encode("utf-8")


# Reason phrases Twisted's table lacks (it would send "Unknown Status").
_PHRASES = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 529: b"Overloaded"}


def respond_error(request: Request, code: int, kind: str, message: str) -> bytes:
    request.setResponseCode(code, _PHRASES.get(code))
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return error_body(kind, message)


# How long a rejected connection keeps reading (and dropping) what the
# client still sends, so that closing it is not a reset that would destroy
# the answer before the client reads it.
LINGER_SECONDS = 5.0

# A request's head must be complete this long after the connection opened
# or the previous response ended; its body gets at least as long, more for
# a large body at the slowest rate a real client plausibly sends at.
HEADERS_TIMEOUT = 60.0
BODY_MIN_RATE = 64 * 1024

# Twisted's read size, and the one used while a large body arrives.
READ_SIZE = 64 * 1024
LARGE_READ_SIZE = 1024 * 1024

# RFC 9110 token: methods and header names.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# One space on each side of a printable-ASCII target, and a version Twisted
# serves.  Twisted's own parser lets DEL and bytes 0x80-0xb0 through.
_REQUEST_LINE = re.compile(_TOKEN + rb" ([\x21-\x7e]+) HTTP/1\.[01]")
# A name, a colon right after it, and a value without control characters
# (tab and obs-text allowed).  A line starting with whitespace (obs-fold)
# or with whitespace before the colon does not match.
_HEADER_LINE = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")


# A read longer than this that ends a request's head is parsed in two parts.
_HEAD_SPLIT_ABOVE = 4096


class ProxyChannel(HTTPChannel):
    """
    An HTTP channel whose own refusals (oversized body or headers, a
    malformed request line or header line, a target that is not a path,
    a request sent too slowly) are proper HTTP/1.1 answers in the API
    error shape, after which nothing more is parsed.

    Request lines and header lines are checked here, stricter than
    Twisted's parser, so that nothing malformed reaches the application.
    """

    _rejected = False
    _linger_call = None
    # What the next line is: a request line, or a header line.
    _awaiting_request_line = True
    # The head or body deadline of the request being received, if any.
    _deadline: IDelayedCall | None = None
    # Whether a byte of the next request has arrived since the last
    # response ended: a deadline passing on an idle keep-alive connection
    # is the idle timeout's business, not a 408.
    _request_started = False

    def reject(self, code: int, phrase: bytes, kind: str, message: str) -> None:
        """
        Answer at once and close, whatever state the request is in; nothing
        the client sent after the fault is parsed, let alone relayed.
        """
        if self._rejected:
            return
        self._rejected = True
        self._set_deadline(None)
        body = error_body(kind, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (code, phrase, len(body), body)
        )
        self.setTimeout(None)
        try:
            # Half-close: the client reads the answer and then our EOF.
            self.transport.loseWriteConnection()
        except (AttributeError, NotImplementedError):
            self.transport.loseConnection()
        self._linger_call = self.callLater(LINGER_SECONDS, self.transport.abortConnection)

    def connectionMade(self) -> None:
        super().connectionMade()
        site = getattr(self, "site", None)
        if isinstance(site, ProxySite):
            site.connection_opened()
        self._set_deadline(HEADERS_TIMEOUT)

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        self._request_started = True
        if self.line_mode and len(data) > _HEAD_SPLIT_ABOVE:
            # The line parser splits its whole buffer at each header line,
            # copying all that follows every time: with a read of 64 KiB
            # that is megabytes copied for one request's head.  Hand it the
            # head alone, then the rest (a stream cut anywhere parses the same).
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                head, data = data[: end + 4], data[end + 4 :]
                super().dataReceived(head)
                if self._rejected or not data:
                    return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # The line parser keeps going through the rest of a buffer after a
        # refusal (a half-close does not mark the transport disconnecting).
        if self._rejected:
            return
        if self._awaiting_request_line:
            if line:
                checked = self._check_request_line(line)
                if checked is None:
                    return
                line = checked
                self._awaiting_request_line = False
        elif not line:
            self._awaiting_request_line = True
        elif _HEADER_LINE.fullmatch(line) is None:
            self.reject(400, b"Bad Request", "invalid_request_error", "Malformed HTTP header line.")
            return
        super().lineReceived(line)

    def _check_request_line(self, line: bytes) -> bytes | None:
        """
        The request line with its target in origin form, or None after
        refusing it.
        """
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            self.reject(400, b"Bad Request", "invalid_request_error", "Malformed HTTP request line.")
            return None
        target = match.group(1)
        origin = local_origin_form(target, self.transport.getHost())
        if origin is None:
            self.reject(
                400,
                b"Bad Request",
                "invalid_request_error",
                "The request target must be a path starting with a single '/' (like /v1/messages).",
            )
            return None
        return line[: match.start(1)] + origin + line[match.end(1) :]

    def rawDataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if self._rejected:
            return
        self._set_deadline(None)
        super().allHeadersReceived()
        if self._rejected or self.length == 0:
            return
        # A chunked body has no length up front: it may take as long as
        # the largest body the proxy accepts.
        size = self.site.max_body_bytes if self.length is None else self.length
        self._set_deadline(max(HEADERS_TIMEOUT, size / BODY_MIN_RATE))
        if self.length is not None and self.length > READ_SIZE:
            # Each read costs a trip through the reactor and the HTTP
            # parser: a large body comes in fewer, larger reads.
            self._set_read_size(min(self.length, LARGE_READ_SIZE))

    def allContentReceived(self) -> None:
        if self._rejected:
            return
        self._set_deadline(None)
        self._set_read_size(READ_SIZE)
        super().allContentReceived()

    def _set_read_size(self, size: int) -> None:
        transport = self.transport
        if transport is not None and getattr(transport, "bufferSize", None) is not None:
            transport.bufferSize = size

    def requestDone(self, request: Request) -> None:
        if self.persistent:
            # Armed before the parent replays pipelined data, which may
            # start (or complete) the next request's head at once.
            self._request_started = any(self._dataBuffer)
            self._set_deadline(HEADERS_TIMEOUT)
        super().requestDone(request)

    def _set_deadline(self, seconds: float | None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if seconds is not None:
            self._deadline = self.callLater(seconds, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._request_started:
            self.reject(
                408,
                b"Request Timeout",
                "invalid_request_error",
                "The request was not received in time; the connection is closed.",
            )

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reject(431, b"Request Header Fields Too Large", "invalid_request_error", "Request headers are too large.")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.reject(431, b"Request Header Fields Too Large", "invalid_request_error", "Request headers are too large.")
        else:
            self.reject(400, b"Bad Request", "invalid_request_error", "Malformed HTTP request.")

    def connectionLost(self, reason: Failure) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._set_deadline(None)
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if isinstance(site, ProxySite):
            site.connection_closed()


class ProxyRequest(Request):
    """
    A request that keeps its body in memory (ready for retries on another
    account) and refuses one over the cap before reading it.

    The body arrives as the socket's reads, kept as they are and joined
    once when it is complete: a buffer grown read by read costs a copy per
    growth and holds twice the body when its value is taken.  The joined
    body is C{content} (a BytesIO over the very bytes, no copy) until the
    proxy takes it with L{take_body}.
    """

    _rejected = False
    _received = 0
    _chunks: list[bytes] | None = None

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        self._chunks = []
        if length is not None and length > self.channel.site.max_body_bytes:
            self._reject_oversize()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body_bytes:
            # A chunked body has no length up front: cap it as it arrives.
            self._reject_oversize()
            return
        if self._chunks is None:
            self._chunks = []
        self._chunks.append(data)

    def take_body(self) -> bytes:
        """
        The request body, once: C{content} is emptied, so that this
        request (which Twisted keeps until the response is finished) no
        longer holds it; whoever took it decides how long it lives.
        """
        body = self.content.getvalue()
        self.content = io.BytesIO()
        return body

    def _reject_oversize(self) -> None:
        """
        Answer 413 straight on the channel.

        This runs before the channel has told the request its method and
        version (Request.write would send an HTTP/0.9 response), so the
        channel writes the answer itself.
        """
        self._rejected = True
        self.content = io.BytesIO()
        self._chunks = None
        limit = self.channel.site.max_body_bytes
        self.channel.reject(
            413,
            b"Request Entity Too Large",
            "request_too_large",
            f"Request body is larger than the proxy's limit of {limit} bytes (proxy.maxBodyBytes).",
        )

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        chunks, self._chunks = self._chunks, None
        if chunks:
            # BytesIO shares an initial bytes object until it is written to.
            self.content = io.BytesIO(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            del chunks[:]
        super().requestReceived(command, path, version)


class ProxySite(Site):
    requestFactory = ProxyRequest

    # The factory's protocol is a function called with the factory; Site
    # then fills in the channel's site and request factory as usual.
    def protocol(self) -> Any:
        return _GenericHTTPChannelProtocol(ProxyChannel())

    def __init__(self, resource: Resource, max_body_bytes: int, **kw: Any) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kw)
        self.max_body_bytes = max_body_bytes
        self.open_connections = 0

    def connection_opened(self) -> None:
        self.open_connections += 1

    def connection_closed(self) -> None:
        self.open_connections -= 1
        reclaimer = getattr(self.resource, "reclaimer", None)
        if self.open_connections == 0 and reclaimer is not None:
            # The end of a load: every client has gone.
            reclaimer.disconnected()

    def log(self, request: Request) -> None:
        # The request log of this project is its event stream; Twisted's
        # access log line would repeat it.
        pass


def take_body(request: Request) -> bytes:
    """
    The request body, no longer held by the request (Twisted keeps a
    request's C{content} until its response is finished).
    """
    if isinstance(request, ProxyRequest):
        return request.take_body()
    content = request.content
    if content is None:
        body = b""
    elif isinstance(content, io.BytesIO):
        body = content.getvalue()
    else:
        # A plain Site spools a large body to a temporary file.
        content.seek(0)
        body = content.read()
    request.content = io.BytesIO()
    return body


def request_facts(request: Request, body: bytes, router: Router) -> RequestFacts:
    session = request.requestHeaders.getRawHeaders(b"x-claude-code-session-id")
    agent = request.requestHeaders.getRawHeaders(b"x-claude-code-agent-id")
    # Only a POST to the Messages API belongs to a conversation.
    path = request.path if request.method == b"POST" else b""
    return inspect_request(
        path, session[-1] if session else None, body, router.landing_pending, agent[-1] if agent else None
    )


def upstream_headers(client: Headers, account: Account) -> Headers:
    """
    The client's headers minus hop-by-hop ones and its credentials, plus the
    account's credentials.
    """
    connection_tokens = {
        token.strip().lower()
        for value in client.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }
    out = Headers()
    for name, values in client.getAllRawHeaders():
        lowered = name.lower()
        if (
            lowered in _HOP_BY_HOP
            or lowered in _CLIENT_CREDENTIALS
            or lowered in _REQUEST_ONLY
            or lowered in connection_tokens
        ):
            continue
        out.setRawHeaders(name, values)
    credential = (account.config.credential or "").encode("latin-1")
    if account.kind == "apikey":
        out.setRawHeaders(b"x-api-key", [credential])
    else:
        out.setRawHeaders(b"authorization", [b"Bearer " + credential])
        out.setRawHeaders(b"anthropic-beta", [_merge_beta(out.getRawHeaders(b"anthropic-beta", []))])
    return out


def _merge_beta(values: list[bytes]) -> bytes:
    flags = [flag.strip() for value in values for flag in value.split(b",") if flag.strip()]
    if OAUTH_BETA not in flags:
        flags.append(OAUTH_BETA)
    return b",".join(flags)


def client_key_matches(request: Request, key: str) -> bool:
    """
    Whether any credential the client presents is the proxy key.

    Subscription-mode Claude Code sends its own Bearer token *and* the
    x-nextclaude-key header, so every candidate is tried, each compared in
    constant time.
    """
    if not key:
        return False
    expected = key.encode("utf-8")
    headers = request.requestHeaders
    candidates = list(headers.getRawHeaders(b"x-api-key", []))
    candidates += headers.getRawHeaders(b"x-nextclaude-key", [])
    for value in headers.getRawHeaders(b"authorization", []):
        scheme, _, token = value.partition(b" ")
        if scheme.lower() == b"bearer":
            candidates.append(token.strip())
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(candidate, expected)
    return matched


def is_loopback(request: Request) -> bool:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    if host is None:
        # A UNIX socket peer is local by construction.
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


_AUTHORITY = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9.\-]+))(?::([0-9]{1,5}))?")


def split_authority(value: bytes) -> tuple[str, int | None] | None:
    """
    The host (lowercase, without brackets or one trailing dot) and port of
    a Host header or an absolute-form authority, or None when it is not a
    plain C{host[:port]} (user info, several colons, odd bytes).
    """
    try:
        text = value.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    match = _AUTHORITY.fullmatch(text)
    if match is None:
        return None
    bracketed, name, port = match.groups()
    if bracketed is not None:
        try:
            # Only an IPv6 literal may sit between brackets.
            if ip_address(bracketed).version != 6:
                return None
        except ValueError:
            return None
        host = bracketed
    else:
        host = name[:-1] if name.endswith(".") else name
    if not host or (port is not None and int(port) > 65535):
        return None
    return host, int(port) if port is not None else None


def is_loopback_name(host: str) -> bool:
    """
    Whether C{host} (from L{split_authority}) is C{localhost} or a loopback
    address literal: exact, so C{localhost.evil} and C{127.0.0.1.nip.io}
    are not.
    """
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def host_names_loopback(values: list[bytes] | None) -> bool:
    """
    Whether the raw Host header values are exactly one naming this
    machine's loopback (any port).  A page that rebinds its own DNS name
    to 127.0.0.1 still sends its own name here.
    """
    if values is None or len(values) != 1:
        return False
    parts = split_authority(values[0])
    return parts is not None and is_loopback_name(parts[0])


def local_origin_form(target: bytes, local: IAddress) -> bytes | None:
    """
    The origin-form target (path and query) a request target stands for,
    or None when the proxy must refuse it.

    An origin-form target must pass L{is_origin_form}.  An absolute-form
    one (C{http://authority/path}) is accepted only when its authority
    names this proxy: the port it was reached on (80 when absent), and a
    loopback name or the very address the connection came in on.  The
    proxy is not a forward proxy, so any other authority is refused rather
    than quietly replaced by the upstream.
    """
    if not target.lower().startswith(b"http://"):
        return target if is_origin_form(target) else None
    rest = target[len(b"http://"):]
    end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    parts = split_authority(authority)
    local_port = getattr(local, "port", None)
    if parts is None or local_port is None:
        return None
    host, port = parts
    if (80 if port is None else port) != local_port:
        return None
    if not (is_loopback_name(host) or host == getattr(local, "host", None)):
        return None
    # RFC 9112 3.2.2: an empty path in absolute-form means "/".
    if not path.startswith(b"/"):
        path = b"/" + path
    return path if is_origin_form(path) else None


class StreamRelay(Protocol):
    """
    Receives the upstream body and writes each chunk to the client as it
    arrives.  The upstream transport is registered as the client request's
    producer, so a client that reads slowly pauses the upstream read.
    """

    def __init__(
        self,
        request: Request,
        reactor: IReactorTime,
        idle_timeout: float,
        parser: Callable[[bytes], None] | None,
    ) -> None:
        self._request = request
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._feed = parser
        self._last_data = reactor.seconds()
        self._idle_call = None
        self.timed_out = False
        # Fires with None for a clean end, else with why the stream broke.
        self.done: Deferred[BaseException | None] = Deferred()

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
        self._idle_call = self._reactor.callLater(self._idle_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        # Stamping a time is cheaper than resetting a timer on every chunk.
        self._last_data = self._reactor.seconds()
        if self._feed is not None:
            self._feed(data)
        self._request.write(data)

    def _check_idle(self) -> None:
        silent = self._reactor.seconds() - self._last_data
        if silent >= self._idle_timeout:
            self._idle_call = None
            self.timed_out = True
            self.abort()
        else:
            self._idle_call = self._reactor.callLater(
                self._idle_timeout - silent, self._check_idle
            )

    def abort(self) -> None:
        """
        Drop the upstream connection (the client went away or the stream
        went silent).
        """
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._request.channel is not None:
            self._request.unregisterProducer()
        clean = reason.check(ResponseDone, PotentialDataLoss) and not self.timed_out
        # Twisted's HTTP client keeps the response (which keeps this
        # protocol) in a reference cycle until a full garbage collection:
        # it need not keep the client's request and the parser too.
        self._request = self._feed = None  # type: ignore[assignment]
        self.done.callback(None if clean else reason.value)


_CONNECT_ERRORS = (ConnectError, DNSLookupError, ResponseNeverReceived, ResponseFailed, ConnectionClosed)


class _Discard(Protocol):
    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(None)


class ProxyResource(Resource):
    """
    Every request is relayed upstream except C{HEAD} (Claude Code's
    preconnect, answered locally for any path) and the status endpoint.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        router: Router,
        scheduler: Scheduler,
        upstream: UpstreamService,
        hub: EventHub,
        status: Callable[[], dict[str, Any]],
        recorder: RequestLog | None = None,
        allocator: Allocator | None = None,
    ) -> None:
        super().__init__()
        # Freed bodies go back to the system once a load has drained.
        self.reclaimer = Reclaimer(Allocator() if allocator is None else allocator, reactor)
        self._reactor = reactor
        self._config = config
        self._router = router
        self._scheduler = scheduler
        self._upstream = upstream
        self._hub = hub
        self._status = status
        self._recorder = recorder
        self._next_id = 0
        self._active: set[Request] = set()
        self._idle_waiters: list[Deferred[None]] = []

    #: Renders the Prometheus page (nextclaude.metrics); set by the service
    #: that owns the registry, None in a resource built without one.
    metrics: Callable[[], tuple[bytes, str]] | None = None

    def render(self, request: Request) -> bytes | int:
        if request.path == HEALTH_PATH and request.method in (b"GET", b"HEAD"):
            # For service monitors (a container's host.docker.internal
            # too): before the key and any Host check, so it says only
            # that the process answers, and its version.
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return HEALTH_BODY
        if request.method == b"HEAD":
            # Claude Code's preconnect (HEAD /api/hello, HEAD / in older
            # builds) comes without credentials: answered here, before
            # authentication, with no body and no account touched.
            request.setHeader(b"content-type", b"text/plain")
            return b""
        if not self._authorized(request):
            return respond_error(
                request,
                401,
                "authentication_error",
                "This NextClaude proxy needs its key: send it as x-api-key, "
                "Authorization: Bearer or x-nextclaude-key (see `nextclaude env`).",
            )
        if request.path == STATUS_PATH:
            if request.method != b"GET":
                return respond_error(request, 405, "invalid_request_error", "Use GET.")
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self._status()).encode("utf-8")
        if request.path in (METRICS_PATH, HEALTH_PATH):
            if request.method != b"GET":
                return respond_error(request, 405, "invalid_request_error", "Use GET.")
            if self.metrics is None:
                # Not relayed either: the upstream knows nothing of it.
                return respond_error(request, 404, "not_found_error", "This proxy has no metrics.")
            page, content_type = self.metrics()
            request.setHeader(b"content-type", content_type.encode("ascii"))
            return page
        self._active.add(request)
        relaying = Deferred.fromCoroutine(self._relay(request)).addErrback(self._crashed, request)
        relaying.addBoth(self._done, request)
        return NOT_DONE_YET

    def _done(self, result: object, request: Request) -> None:
        self._active.discard(request)
        self.reclaimer.relayed()
        if not self._active:
            self.reclaimer.drained()
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def in_flight(self) -> int:
        return len(self._active)

    def when_idle(self) -> Deferred[None]:
        """
        Fires once no request is being relayed.
        """
        waiter: Deferred[None] = Deferred()
        if self._active:
            self._idle_waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def abort_all(self) -> None:
        """
        Cut every request still being relayed (the shutdown grace ran
        out): their clients see the connection close, never a made-up end.
        """
        for request in list(self._active):
            if not request._disconnected:
                request.channel.transport.abortConnection()

    def _authorized(self, request: Request) -> bool:
        settings = self._config.proxy
        if client_key_matches(request, settings.api_key):
            return True
        # Without the key, only a local program gets in: any web page can
        # make a browser send to 127.0.0.1, but the browser adds Origin to
        # cross-site requests, and a page that rebinds its own DNS name to
        # 127.0.0.1 still sends that name as Host.
        headers = request.requestHeaders
        return (
            settings.trust_loopback
            and is_loopback(request)
            and not headers.hasHeader(b"origin")
            and host_names_loopback(headers.getRawHeaders(b"host"))
        )

    def _crashed(self, failure: Failure, request: Request) -> None:
        self._log.failure("relaying {path} failed", failure, path=request.path)
        if not request.startedWriting and not request._disconnected:
            request.write(respond_error(request, 500, "api_error", "Internal proxy error."))
        if not request.finished and not request._disconnected:
            request.finish()

    async def _relay(self, request: Request) -> None:
        self._next_id += 1
        request_id = self._next_id
        started = self._reactor.seconds()
        body: bytes | None = take_body(request)
        facts = request_facts(request, body, self._router)
        exchange = self._router.open(facts)
        # Where the session was: the usage history counts a move.
        was_on = exchange.session.account if exchange.session is not None else None
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        details: dict[str, Any] = {}
        recorder = self._recorder
        if recorder is not None:
            details["headers"] = masked_headers(
                list(request.requestHeaders.getAllRawHeaders()), (self._config.proxy.api_key,)
            )
            if recorder.keep_bodies:
                recorder.request_body(request_id, body)
        self._hub.emit(
            events.REQUEST_STARTED,
            started,
            id=request_id,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1", "replace"),
            session=facts.session_key,
            bytes=len(body),
            **details,
        )

        async def send(account: Account, decision: Decision, timeout: float | None) -> IResponse:
            self._hub.emit(
                events.REQUEST_ROUTED,
                self._reactor.seconds(),
                id=request_id,
                account=account.name,
                reason=decision.reason,
                session=facts.session_key,
            )
            assert body is not None
            return await self._fetch(request, account, body, timeout)

        outcome = await self._scheduler.dispatch(
            exchange,
            send,
            self._discard,
            lambda: bool(gone),
            streaming=lambda: body is not None and _STREAM_RE.search(body) is not None,
        )
        # No retry can follow: the body goes now, not when the stream ends
        # (this frame and the closures above live as long as the stream).
        body = None
        decision, response = outcome.decision, outcome.response
        account = decision.account
        moved = was_on is not None and exchange.session is not None and exchange.session.account != was_on
        if account is None:
            self._reject_exhausted(request, decision)
            self._finished_event(request, request_id, started, None, decision.status, decision.reason, None, facts=facts)
            return
        if gone or response is None:
            if response is not None:
                await self._discard(response)
            self._router.on_finished(exchange, account, None, False)
            if outcome.error is not None:
                self._finish_error(request, outcome.error.code, "api_error", outcome.error.message)
                self._finished_event(
                    request, request_id, started, account, outcome.error.code, decision.reason, None, ok=False,
                    facts=facts, moved=moved,
                )
            return
        usage, ok = await self._stream(request, response, request_id)
        self._router.on_finished(exchange, account, usage, ok and response.code < 500)
        self._finished_event(
            request, request_id, started, account, response.code, decision.reason, usage, ok=ok, facts=facts, moved=moved
        )

    async def _fetch(self, request: Request, account: Account, body: bytes, timeout: float | None) -> IResponse:
        """
        Send the request upstream on C{account} and wait for the response
        headers, at most C{timeout} (default C{proxy.upstreamTimeout}); give
        up at once if the client goes away.
        """
        pending = self._upstream.request(
            request.method,
            request.uri,
            upstream_headers(request.requestHeaders, account),
            body,
        )
        request.notifyFinish().addErrback(lambda _: pending.cancel())
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            pending.cancel()

        timer = self._reactor.callLater(
            self._config.proxy.upstream_timeout if timeout is None else timeout, give_up
        )
        try:
            return await pending
        except (CancelledError, *_CONNECT_ERRORS) as error:
            # Cancelling a request already on the wire surfaces as
            # ResponseNeverReceived, so the flag, not the type, tells a
            # timeout from a connection failure.
            if timed_out:
                raise UpstreamUnavailable(
                    504, "The upstream API did not answer in time (proxy.upstreamTimeout)."
                )
            self._log.warn("upstream unreachable: {error}", error=error)
            raise UpstreamUnavailable(502, "The upstream API could not be reached.")
        finally:
            if timer.active():
                timer.cancel()

    async def _discard(self, response: IResponse) -> None:
        sink = _Discard()
        response.deliverBody(sink)
        await sink.done

    async def _stream(self, request: Request, response: IResponse, request_id: int) -> tuple[Usage | None, bool]:
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _RESPONSE_DROP:
                request.responseHeaders.setRawHeaders(name, values)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[-1]
        stream_parser: StreamParser | None = None
        collected: list[bytes] = []
        feed: Callable[[bytes], None] | None = None
        if content_type.startswith(b"text/event-stream"):
            stream_parser = StreamParser()
            feed = stream_parser.feed
        elif content_type.startswith(b"application/json"):
            size = [0]

            def feed(data: bytes) -> None:
                size[0] += len(data)
                if size[0] <= _JSON_USAGE_LIMIT:
                    collected.append(data)

        recorder = self._recorder
        if recorder is not None and recorder.keep_bodies:
            parse = feed

            def feed(data: bytes) -> None:
                recorder.response_chunk(request_id, data)
                if parse is not None:
                    parse(data)

        relay = StreamRelay(request, self._reactor, self._config.proxy.stream_idle_timeout, feed)
        request.notifyFinish().addErrback(lambda _: relay.abort())
        response.deliverBody(relay)
        failure = await relay.done
        if recorder is not None and recorder.keep_bodies:
            recorder.response_end(request_id)
        if failure is not None:
            # Never complete a cut stream: the client must see it broke.
            why = "idle timeout (proxy.streamIdleTimeout)" if relay.timed_out else str(failure)
            self._log.warn("upstream stream ended early: {why}", why=why)
            if not request._disconnected:
                request.loseConnection()
            return self._usage(stream_parser, collected), False
        if not request._disconnected and not request.finished:
            request.finish()
        return self._usage(stream_parser, collected), not request._disconnected

    @staticmethod
    def _usage(stream_parser: StreamParser | None, collected: list[bytes]) -> Usage | None:
        if stream_parser is not None:
            stream_parser.finish()
            return stream_parser.usage if stream_parser.events else None
        if collected:
            usage, _model, _error = usage_from_json_body(b"".join(collected))
            return usage
        return None

    def _finish_error(self, request: Request, code: int, kind: str, message: str) -> None:
        if request._disconnected or request.finished:
            return
        request.write(respond_error(request, code, kind, message))
        request.finish()

    def _reject_exhausted(self, request: Request, decision: Decision) -> None:
        """
        No account can serve: a 401 when every credential is dead (waiting
        will not help), else the synthetic 429 (DESIGN.md point 9); the
        router's message says why each account is out and how to fix the
        dead ones.
        """
        if request._disconnected:
            return
        if decision.status == 401:
            self._finish_error(request, 401, "authentication_error", decision.message)
            return
        cap = self._config.retry_after_cap
        wait = min(decision.retry_after if decision.retry_after is not None else cap, cap)
        request.setHeader(b"retry-after", str(wait).encode("ascii"))
        if decision.out_of_quota:
            # Claude Code shows its usage-limit notice for these; accounts
            # that are only throttled would make it a false one.
            request.setHeader(b"anthropic-ratelimit-unified-status", b"rejected")
            if decision.claim is not None:
                # Claude Code (2.1.x, subscription mode) shows its own
                # "You've hit your session limit · resets …" notice only when
                # a 429 names a claim; without one it prints our message after
                # "Server is temporarily limiting requests (not your usage
                # limit)".  So a claim only when quota is the whole story: a
                # dead credential must be named to the user.
                request.setHeader(b"anthropic-ratelimit-unified-representative-claim", decision.claim.encode("ascii"))
            if decision.reset is not None:
                request.setHeader(b"anthropic-ratelimit-unified-reset", str(int(decision.reset)).encode("ascii"))
        self._finish_error(request, 429, "rate_limit_error", decision.message)

    def _finished_event(
        self,
        request: Request,
        request_id: int,
        started: float,
        account: Account | None,
        status: int,
        reason: str,
        usage: Usage | None,
        ok: bool = True,
        facts: RequestFacts | None = None,
        moved: bool = False,
    ) -> None:
        now = self._reactor.seconds()
        # What the usage history records beside the figures above: the
        # session's facts, the client, and the account's 5h window after it.
        window = account.windows.get("5h") if account is not None else None
        self._hub.emit(
            events.REQUEST_FINISHED,
            now,
            id=request_id,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1", "replace"),
            account=account.name if account is not None else None,
            status=status,
            reason=reason,
            ok=ok,
            duration=now - started,
            usage=usage.to_json() if usage is not None else None,
            session=facts.session_key if facts is not None else None,
            model=facts.model if facts is not None else None,
            client=client_product(request.requestHeaders.getRawHeaders(b"user-agent", [None])[-1]),
            side=facts.is_side_request if facts is not None else False,
            side_kind=facts.side_kind if facts is not None else None,
            compaction=facts.is_compaction if facts is not None else False,
            continuation=facts.starts_with_continuation if facts is not None else False,
            ttl=facts.cache_ttl if facts is not None else None,
            moved=moved,
            utilization=window.utilization if window is not None else None,
            reset=window.reset if window is not None else None,
        )
