"""
Shared test fixtures: a scriptable fake upstream, a proxy started on
loopback port 0 from a real config file, and a client that keeps no
connections around after a test.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from nextclaude.accounts import AccountsSettings
from nextclaude.config import load_config
from nextclaude.service import ProxyService

PROXY_KEY = "nc-test-key-0123456789"


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(data).encode())


def message_start(input_tokens: int = 10, cache_read: int = 0, cache_creation: int = 0) -> bytes:
    return sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5",
                "content": [],
                "stop_reason": None,
                "usage": {
                    "input_tokens": input_tokens,
                    "cache_read_input_tokens": cache_read,
                    "cache_creation_input_tokens": cache_creation,
                    "output_tokens": 1,
                },
            },
        },
    )


def message_end(output_tokens: int = 7) -> bytes:
    return sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": output_tokens},
        },
    ) + sse("message_stop", {"type": "message_stop"})


def text_delta(text: str) -> bytes:
    return sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
    )


@dataclass
class Seen:
    """
    One request as the fake upstream received it.
    """

    method: bytes
    uri: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    request: Request
    gone: Deferred[None] = field(default_factory=Deferred)


Handler = Callable[[Seen], "bytes | int"]


class FakeUpstream(Resource):
    """
    An upstream whose every answer the test scripts: C{handler} gets each
    request and either returns a body or NOT_DONE_YET and writes later.
    Each arrival fires the next Deferred from L{next_request}.
    """

    isLeaf = True

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.seen: list[Seen] = []
        self._waiting: list[Deferred[Seen]] = []

    def next_request(self) -> Deferred[Seen]:
        waiter: Deferred[Seen] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def render(self, request: Request) -> bytes | int:
        seen = Seen(
            method=request.method,
            uri=request.uri,
            headers={name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()},
            body=request.content.read(),
            request=request,
        )
        request.notifyFinish().addBoth(lambda result: seen.gone.callback(result))
        self.seen.append(seen)
        result = self.handler(seen)
        if self._waiting:
            self._waiting.pop(0).callback(seen)
        return result


def json_reply(request: Request, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return json.dumps(payload).encode()


def listen(test: Any, resource: Resource) -> int:
    """
    Serve C{resource} on loopback port 0 for the length of the test.
    """
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return port.getHost().port


def write_config(test: Any, upstream_port: int, accounts: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
    # Absolute, so that child processes started elsewhere find it too.
    directory = Path(test.mktemp()).absolute()
    directory.mkdir(mode=0o700)
    path = directory / "config.json"
    if accounts is None:
        accounts = [
            {"name": "alice", "type": "oauth", "accessToken": "sk-ant-oat01-alice"},
            {"name": "bob", "type": "oauth", "accessToken": "sk-ant-oat01-bob"},
        ]
    data: dict[str, Any] = {
        "proxy": {"port": 3456, "host": "127.0.0.1", "apiKey": PROXY_KEY},
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "accounts": accounts,
        # Nothing may reach Anthropic from a test: the OAuth endpoints point
        # at a closed loopback port.
        "oauth": {f"{name}Url": f"http://127.0.0.1:9/{name}" for name in ("authorize", "token", "profile", "usage")},
    }
    for key, value in extra.items():
        if key == "proxy":
            data["proxy"].update(value)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def start_proxy(test: Any, config_path: Path, the_reactor: Any = reactor) -> tuple[ProxyService, str]:
    # The file must name a real port; the test listens on a free one.
    config = load_config(config_path).with_overrides(port=0)
    service = ProxyService(the_reactor, config, account_settings=AccountsSettings.quiet(config))
    service.startService()
    test.addCleanup(service.stopService)
    host, port = service.address()
    return service, f"http://{host}:{port}"


def client(test: Any) -> HTTPClient:
    """
    A treq client whose connections close after each response, so no test
    leaves a socket behind.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


def auth(extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"x-api-key": PROXY_KEY, "content-type": "application/json", "anthropic-version": "2023-06-01"}
    headers.update(extra or {})
    return headers


class ChunkCollector(Protocol):
    """
    Collects a streamed body, firing L{first} on the first chunk and
    L{done} when the body ends (with the reason).
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first: Deferred[bytes] = Deferred()
        self.done: Deferred[Any] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if not self.first.called:
            self.first.callback(data)

    def connectionLost(self, reason: Any) -> None:
        # The exception, not the Failure: awaiting done must not raise.
        self.done.callback(reason.value)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)



REPO_ROOT = Path(__file__).resolve().parent.parent


class ProcessWatcher(ProcessProtocol):
    """
    Collects a child's output.  L{line_matching} fires when its output
    matches a pattern, or fails if the process ends first; L{ended} fires
    with the reason the process ended (ProcessDone or ProcessTerminated).
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[Exception] = Deferred()
        self._watches: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    @property
    def output(self) -> str:
        return (self.out + self.err).decode("utf-8", "replace")

    def line_matching(self, pattern: bytes) -> Deferred[re.Match[bytes]]:
        waiter: Deferred[re.Match[bytes]] = Deferred()
        self._watches.append((re.compile(pattern), waiter))
        self._check()
        return waiter

    def _check(self) -> None:
        for watch in list(self._watches):
            match = watch[0].search(self.out + self.err)
            if match:
                self._watches.remove(watch)
                watch[1].callback(match)

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def processEnded(self, reason: Failure) -> None:
        watches, self._watches = self._watches, []
        for pattern, waiter in watches:
            waiter.errback(
                AssertionError(f"process ended before {pattern.pattern!r} appeared; output:\n{self.output}")
            )
        self.ended.callback(reason.value)


def spawn(
    test: Any, args: list[str], extra_env: dict[str, str] | None = None, child_fds: dict[int, Any] | None = None
) -> ProcessWatcher:
    """
    Run C{args} in a temporary directory with this checkout first on the
    path; the test's cleanup kills the process if it is still running.
    C{child_fds} as for C{spawnProcess} (default: stdin, stdout and stderr
    piped to the watcher).
    """
    cwd = Path(test.mktemp())
    cwd.mkdir()
    watcher = ProcessWatcher()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", **(extra_env or {}))
    process = reactor.spawnProcess(watcher, args[0], args, env=env, path=str(cwd), childFDs=child_fds)

    def stop() -> Deferred[Exception] | None:
        if watcher.ended.called:
            return None
        try:
            process.signalProcess("KILL")
        except ProcessExitedAlready:
            # Reaped, but its pipes may not be closed yet.
            pass
        return watcher.ended

    test.addCleanup(stop)
    return watcher


def spawn_nextclaude(test: Any, *args: str, extra_env: dict[str, str] | None = None) -> ProcessWatcher:
    """
    Run `python -m nextclaude ARGS` from the checkout.
    """
    return spawn(test, [sys.executable, "-m", "nextclaude", *args], extra_env)


def holding_stream(seen: Seen) -> int:
    """
    An upstream handler that starts a stream (message_start) and holds the
    rest until the test writes it.
    """
    seen.request.setHeader(b"content-type", b"text/event-stream")
    seen.request.write(message_start())
    return NOT_DONE_YET


STREAM_BODY = json.dumps({"model": "claude-sonnet-4-5", "stream": True, "messages": []}).encode()


async def open_stream(test: Any, url: str, upstream: FakeUpstream) -> tuple[ChunkCollector, Seen]:
    """
    Start a streamed request through the proxy at C{url}; returns once its
    first chunk reached the client and the upstream holds the request.
    """
    arrived = upstream.next_request()
    response = await client(test).post(url + "/v1/messages", data=STREAM_BODY, headers=auth(), unbuffered=True)
    collector = ChunkCollector()
    response.deliverBody(collector)
    await collector.first
    return collector, await arrived
