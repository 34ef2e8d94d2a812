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
from typing import Any, BinaryIO, Callable, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from nextclaude import events
from nextclaude.config import mask_secret
from nextclaude.events import Event, EventHub
from nextclaude.paths import ensure_private_dir
from nextclaude.problems import REQUEST_LOG, Problems

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


class Writer(Protocol):
    """
    The writer thread's file side.  Any method may raise OSError (a full
    disk, say); the thread reports it and carries on.
    """

    def line(self, day: str, text: bytes) -> None: ...

    def body(self, path: Path, data: bytes) -> None: ...

    def end_body(self, path: Path) -> None: ...

    def close(self) -> None: ...


class _Writer:
    """
    The writer thread's side: appends to files it keeps open, each created
    0600; the request log rolls to a new numbered file past C{max_bytes}.
    A file that fails a write is dropped, so a later write opens it afresh
    (the disk may have room again by then).
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

    def _drop(self, path: Path) -> None:
        handle = self._files.pop(path, None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass  # its unwritten bytes are lost either way; the descriptor is closed

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
            self._drop(path)
            self._part += 1

    def line(self, day: str, text: bytes) -> None:
        path = self._log_path(day)
        try:
            handle = self._open(path)
            handle.write(text)
            handle.flush()
        except OSError:
            self._drop(path)
            raise

    def body(self, path: Path, data: bytes) -> None:
        try:
            self._open(path).write(data)
        except OSError:
            self._drop(path)
            raise

    def end_body(self, path: Path) -> None:
        handle = self._files.pop(path, None)
        if handle is not None:
            handle.close()

    def close(self) -> None:
        """
        Close every file, even when one fails to (its buffer could not be
        flushed); the first failure is raised after all are closed.
        """
        files, self._files = self._files, {}
        failure: OSError | None = None
        for handle in files.values():
            try:
                handle.close()
            except OSError as error:
                failure = failure or error
        if failure is not None:
            raise failure


# What each queued operation is: the request log proper, or kept bodies.
_KIND = {"line": "lines", "body": "bodies", "end_body": "bodies"}


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
        problems: Problems | None = None,
        make_writer: Callable[[Path, int], Writer] = _Writer,
    ) -> None:
        self._reactor = reactor
        self.directory = directory
        self.keep_bodies = keep_bodies
        self._hub = hub
        self._max_bytes = max_bytes
        self._wall_clock = wall_clock
        self._problems = problems
        self._make_writer = make_writer
        self._pending: dict[int, dict[str, Any]] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        # Set (in the reactor thread) once the writer thread has ended, for
        # whatever reason: a stop after that has nothing to wait for.
        self._writer_done = False
        self._unsubscribe: Callable[[], None] | None = None
        # Request ids restart with the proxy: the start time keeps body files
        # of two runs apart.
        self._run_tag = time.strftime("%Y%m%d-%H%M%S", time.localtime(wall_clock()))

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        ensure_private_dir(self.directory)
        self._writer_done = False
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
        if thread is None or self._writer_done:
            return None
        # The writer drains the queue, then says so from its own thread,
        # whatever happened to its files.
        self._stopped = Deferred()
        self._queue.put(_STOP)
        return self._stopped

    def _run(self) -> None:
        # Kinds of writes ("lines", "bodies") whose last attempt failed: the
        # problem stands until each works again, so it does not flap when
        # bodies fail and lines do not.
        failing: set[str] = set()

        def outcome(kind: str, error: OSError | None) -> None:
            was_failing = bool(failing)
            if error is not None:
                failing.add(kind)
                if not was_failing:
                    self._reactor.callFromThread(self._write_failed, error)
            elif kind in failing:
                failing.discard(kind)
                if not failing:
                    self._reactor.callFromThread(self._write_recovered)

        try:
            writer = self._make_writer(self.directory, self._max_bytes)
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                operation, *arguments = item
                try:
                    getattr(writer, operation)(*arguments)
                except OSError as error:
                    # Losing a log line must never take the proxy down.
                    outcome(_KIND[operation], error)
                except Exception:
                    # A bug must not end the thread either: the queue would
                    # grow for ever and a stop would wait for ever.
                    self._reactor.callFromThread(self._log.failure, "the request log writer failed", Failure())
                else:
                    outcome(_KIND[operation], None)
            try:
                writer.close()
            except OSError as error:
                outcome("lines", error)
        except Exception:
            self._reactor.callFromThread(self._log.failure, "the request log writer stopped", Failure())
        finally:
            # Always, or the proxy's stop (and the process) would hang.
            self._reactor.callFromThread(self._writer_ended)

    def _writer_ended(self) -> None:
        self._writer_done = True
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)

    def _write_failed(self, error: OSError) -> None:
        # Once per failing spell, not per request: a full disk would
        # otherwise add a line to the proxy's log for every request.
        message = (
            f"the request log in {self.directory} cannot be written ({error.strerror or error}); "
            "requests are served but not logged"
        )
        self._log.error("{problem}", problem=message)
        if self._problems is not None:
            self._problems.raise_problem(None, REQUEST_LOG, message)

    def _write_recovered(self) -> None:
        self._log.info("the request log in {directory} is written again", directory=str(self.directory))
        if self._problems is not None:
            self._problems.clear(None, REQUEST_LOG)

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
                model=data.get("model"),
                side=data.get("side_kind"),
                reason=data.get("reason"),
                status=data.get("status"),
                ok=data.get("ok"),
                duration=round(data.get("duration", 0.0), 4),
                usage=data.get("usage"),
            )
            day = time.strftime("%Y-%m-%d", time.localtime(entry["time"]))
            line = json.dumps(entry, separators=(",", ":"), default=str).encode("utf-8") + b"\n"
            self._queue.put(("line", day, line))

    # -- bodies ------------------------------------------------------------------

    def _body_path(self, request_id: int, part: str) -> Path:
        return self.directory / "bodies" / f"{self._run_tag}-{request_id:08d}.{part}"

    def request_body(self, request_id: int, body: bytes) -> None:
        path = self._body_path(request_id, "request")
        self._queue.put(("body", path, body))
        self._queue.put(("end_body", path))

    def response_chunk(self, request_id: int, data: bytes) -> None:
        self._queue.put(("body", self._body_path(request_id, "response"), data))

    def response_end(self, request_id: int) -> None:
        self._queue.put(("end_body", self._body_path(request_id, "response")))
