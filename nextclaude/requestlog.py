"""
Request logs: one JSON line per request in a daily file under the log
directory, rotated by size, and optionally every request's and response's
body in files of their own.  Built from the event stream; all file work
happens on a writer thread, so a slow disk never blocks the reactor.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from nextclaude import events
from nextclaude.config import mask_secret
from nextclaude.events import Event, EventHub
from nextclaude.paths import ensure_private_dir

# Headers that carry a credential: their values are masked, always.
SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "x-nextclaude-key", "proxy-authorization", "cookie", "set-cookie"}
)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_STOP = object()


def masked_headers(pairs: list[tuple[bytes, list[bytes]]], secrets: tuple[str, ...] = ()) -> dict[str, str]:
    """
    Headers as a JSON-able dict with every credential masked: the known
    credential headers, and any value that contains one of C{secrets}.
    """
    shown: dict[str, str] = {}
    for raw_name, values in pairs:
        name = raw_name.decode("latin-1").lower()
        value = ", ".join(v.decode("latin-1") for v in values)
        if name in SECRET_HEADERS:
            if name == "authorization" and " " in value:
                scheme, _, token = value.partition(" ")
                value = f"{scheme} {mask_secret(token.strip())}"
            else:
                value = mask_secret(value) or ""
        elif any(secret and secret in value for secret in secrets):
            value = "…(redacted)"
        shown[name] = value
    return shown


class _Writer:
    """
    The writer thread's side: appends to files it keeps open, each created
    0600; the request log rolls to a new numbered file past C{max_bytes}.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self._directory = directory
        self._max_bytes = max_bytes
        self._files: dict[Path, BinaryIO] = {}
        self._day: str | None = None
        self._part = 0

    def _open(self, path: Path) -> BinaryIO:
        handle = self._files.get(path)
        if handle is None:
            ensure_private_dir(path.parent)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            handle = self._files[path] = os.fdopen(descriptor, "ab")
        return handle

    def _log_path(self, day: str) -> Path:
        if day != self._day:
            self._day, self._part = day, 0
            self.close()
        while True:
            suffix = f".{self._part}" if self._part else ""
            path = self._directory / f"requests-{day}{suffix}.jsonl"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return path
            if size < self._max_bytes:
                return path
            handle = self._files.pop(path, None)
            if handle is not None:
                handle.close()
            self._part += 1

    def line(self, day: str, text: bytes) -> None:
        handle = self._open(self._log_path(day))
        handle.write(text)
        handle.flush()

    def body(self, path: Path, data: bytes) -> None:
        self._open(path).write(data)

    def end_body(self, path: Path) -> None:
        handle = self._files.pop(path, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


class RequestLog(Service):
    """
    Subscribes to the event stream and writes the request log.  The
    proxy calls L{request_body}, L{response_chunk} and L{response_end} when
    bodies are kept.
    """

    name = "requestlog"
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        directory: Path,
        hub: EventHub,
        keep_bodies: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._reactor = reactor
        self.directory = directory
        self.keep_bodies = keep_bodies
        self._hub = hub
        self._max_bytes = max_bytes
        self._wall_clock = wall_clock
        self._pending: dict[int, dict[str, Any]] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        # Request ids restart with the proxy: the start time keeps body files
        # of two runs apart.
        self._run_tag = time.strftime("%Y%m%d-%H%M%S", time.localtime(wall_clock()))

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        ensure_private_dir(self.directory)
        self._thread = threading.Thread(target=self._run, name="nextclaude-requestlog", daemon=True)
        self._thread.start()
        self._unsubscribe = self._hub.subscribe(self._on_event)
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        # The writer drains the queue, then says so from its own thread.
        self._stopped = Deferred()
        self._queue.put(_STOP)
        return self._stopped

    def _run(self) -> None:
        writer = _Writer(self.directory, self._max_bytes)
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                operation, *arguments = item
                try:
                    operation(writer, *arguments)
                except OSError as error:
                    # Losing a log line must never take the proxy down.
                    self._log.warn("request log write failed: {error}", error=error)
        finally:
            writer.close()
            if self._stopped is not None:
                self._reactor.callFromThread(self._stopped.callback, None)

    # -- the event stream ----------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        data = event.data
        request_id = data.get("id")
        if request_id is None:
            return
        if event.kind == events.REQUEST_STARTED:
            self._pending[request_id] = {
                "time": self._wall_clock(),
                "method": data.get("method"),
                "path": data.get("path"),
                "headers": data.get("headers"),
                "session": data.get("session"),
                "bytes": data.get("bytes"),
                "attempts": [],
            }
        elif event.kind == events.REQUEST_ROUTED:
            entry = self._pending.get(request_id)
            if entry is not None:
                entry["attempts"].append({"account": data.get("account"), "reason": data.get("reason")})
        elif event.kind == events.REQUEST_FINISHED:
            entry = self._pending.pop(request_id, None) or {"time": self._wall_clock()}
            entry.update(
                account=data.get("account"),
                reason=data.get("reason"),
                status=data.get("status"),
                ok=data.get("ok"),
                duration=round(data.get("duration", 0.0), 4),
                usage=data.get("usage"),
            )
            day = time.strftime("%Y-%m-%d", time.localtime(entry["time"]))
            line = json.dumps(entry, separators=(",", ":"), default=str).encode("utf-8") + b"\n"
            self._queue.put((_Writer.line, day, line))

    # -- bodies ------------------------------------------------------------------

    def _body_path(self, request_id: int, part: str) -> Path:
        return self.directory / "bodies" / f"{self._run_tag}-{request_id:08d}.{part}"

    def request_body(self, request_id: int, body: bytes) -> None:
        path = self._body_path(request_id, "request")
        self._queue.put((_Writer.body, path, body))
        self._queue.put((_Writer.end_body, path))

    def response_chunk(self, request_id: int, data: bytes) -> None:
        self._queue.put((_Writer.body, self._body_path(request_id, "response"), data))

    def response_end(self, request_id: int) -> None:
        self._queue.put((_Writer.end_body, self._body_path(request_id, "response")))
