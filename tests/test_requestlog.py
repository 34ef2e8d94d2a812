"""
Request logs: one JSON line per request, credentials masked, bodies kept on
request, files rotated by size, all written off the reactor thread.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from nextclaude.accounts import AccountsSettings
from nextclaude.config import load_config
from nextclaude.events import Event, EventHub
from nextclaude.problems import REQUEST_LOG, Problems
from nextclaude.requestlog import RequestLog, masked_headers
from nextclaude.service import ProxyService
from tests.support import (
    PROXY_KEY,
    FakeUpstream,
    Seen,
    auth,
    client,
    json_reply,
    listen,
    message_end,
    message_start,
    write_config,
)


class MaskingTests(SynchronousTestCase):
    def test_credentials_are_masked(self) -> None:
        """
        Credential headers keep only their public prefix; any other header
        whose value contains the proxy key is redacted; the rest is kept.
        """
        shown = masked_headers(
            [
                (b"Authorization", [b"Bearer sk-ant-oat01-very-secret"]),
                (b"X-Api-Key", [PROXY_KEY.encode()]),
                (b"X-Nextclaude-Key", [PROXY_KEY.encode()]),
                (b"X-Custom", [f"key={PROXY_KEY}".encode()]),
                (b"Anthropic-Version", [b"2023-06-01"]),
            ],
            (PROXY_KEY,),
        )
        text = json.dumps(shown)
        self.assertNotIn("very-secret", text)
        self.assertNotIn(PROXY_KEY, text)
        self.assertEqual(shown["authorization"], "Bearer sk-ant-oat01-…(redacted)")
        self.assertEqual(shown["x-custom"], "…(redacted)")
        self.assertEqual(shown["anthropic-version"], "2023-06-01")


class RotationTests(TestCase):
    async def test_rotates_by_size(self) -> None:
        """
        Past the size limit, lines go to the next numbered file of the day;
        every line lands in one of them, each file mode 0600.
        """
        directory = Path(self.mktemp())
        hub = EventHub()
        log = RequestLog(reactor, directory, hub, max_bytes=300, wall_clock=lambda: 1_800_000_000.0)
        log.startService()
        for number in range(1, 11):
            hub.emit("request-started", 0.0, id=number, method="POST", path="/v1/messages", session=None, bytes=1)
            hub.emit("request-finished", 1.0, id=number, account="a", reason="primary", status=200, ok=True, duration=1.0, usage=None)
        await log.stopService()
        files = sorted(directory.glob("requests-*.jsonl"))
        self.assertGreater(len(files), 1)
        ids = [json.loads(line)["status"] for f in files for line in f.read_text().splitlines()]
        self.assertEqual(len(ids), 10)
        for path in files:
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)


class ProxyLogTests(TestCase):
    async def test_request_line_and_bodies(self) -> None:
        """
        With a log directory and bodies kept, a streamed request leaves one
        JSON line (time, method, path, masked headers, session, routing
        decision and reason, account, status, duration, usage) and the
        request and response bodies byte for byte; no credential appears in
        any of the files.
        """
        stream = message_start(input_tokens=5, cache_read=100) + message_end(9)

        def handler(seen: Seen) -> bytes:
            seen.request.setHeader(b"content-type", b"text/event-stream")
            return stream

        log_dir = Path(self.mktemp()).absolute()
        config_path = write_config(self, listen(self, FakeUpstream(handler)), logDir=str(log_dir))
        config = load_config(config_path).with_overrides(port=0)
        service = ProxyService(reactor, config, log_bodies=True, account_settings=AccountsSettings.quiet(config))
        service.startService()
        host, port = service.address()
        body = json.dumps({"model": "claude-sonnet-4-5", "stream": True, "messages": []}).encode()
        response = await client(self).post(
            f"http://{host}:{port}/v1/messages?beta=true",
            data=body,
            headers=auth({"authorization": "Bearer sk-ant-oat01-users-own", "x-claude-code-session-id": "abc-123"}),
        )
        self.assertEqual(await response.content(), stream)
        await service.stopService()
        [log_file] = log_dir.glob("requests-*.jsonl")
        [entry] = [json.loads(line) for line in log_file.read_text().splitlines()]
        self.assertEqual((entry["method"], entry["path"], entry["status"]), ("POST", "/v1/messages", 200))
        self.assertEqual((entry["account"], entry["reason"]), ("alice", "placed"))
        self.assertEqual(entry["session"], "s:abc-123")
        self.assertEqual(entry["attempts"], [{"account": "alice", "reason": "placed"}])
        self.assertEqual(entry["usage"]["cache_read_input_tokens"], 100)
        self.assertEqual(entry["headers"]["x-api-key"], "nc-…(redacted)")
        self.assertIn("duration", entry)
        [request_file] = (log_dir / "bodies").glob("*.request")
        [response_file] = (log_dir / "bodies").glob("*.response")
        self.assertEqual(request_file.read_bytes(), body)
        self.assertEqual(response_file.read_bytes(), stream)
        everything = b"".join(p.read_bytes() for p in log_dir.rglob("*") if p.is_file())
        for secret in (PROXY_KEY.encode(), b"users-own", b"sk-ant-oat01-alice"):
            self.assertNotIn(secret, everything)


class ModelAndSideTests(TestCase):
    async def test_request_line_has_model_and_side(self) -> None:
        """
        Each request's line names its model id and, for a side request,
        what it is: "count" for count_tokens, "quota" for a max_tokens 1
        check, "title" for a Haiku request without cache_control; null for
        the conversation's own requests.
        """
        usage = {"input_tokens": 3, "output_tokens": 1}

        def handler(seen: Seen) -> bytes:
            return json_reply(seen.request, 200, {"type": "message", "content": [], "usage": usage})

        log_dir = Path(self.mktemp()).absolute()
        config_path = write_config(self, listen(self, FakeUpstream(handler)), logDir=str(log_dir))
        config = load_config(config_path).with_overrides(port=0)
        service = ProxyService(reactor, config, account_settings=AccountsSettings.quiet(config))
        service.startService()
        host, port = service.address()
        cached = [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]
        sonnet = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": cached}]}
        haiku = {"model": "claude-haiku-4-5", "max_tokens": 512, "messages": [{"role": "user", "content": "hi"}]}
        for path, data in [
            ("/v1/messages", sonnet),
            ("/v1/messages/count_tokens", sonnet),
            ("/v1/messages", {**sonnet, "max_tokens": 1}),
            ("/v1/messages", haiku),
        ]:
            response = await client(self).post(f"http://{host}:{port}{path}", data=json.dumps(data).encode(), headers=auth())
            await response.content()
        await service.stopService()
        [log_file] = log_dir.glob("requests-*.jsonl")
        entries = [json.loads(line) for line in log_file.read_text().splitlines()]
        self.assertEqual(
            [(entry["model"], entry["side"]) for entry in entries],
            [
                ("claude-sonnet-4-5", None),
                ("claude-sonnet-4-5", "count"),
                ("claude-sonnet-4-5", "quota"),
                ("claude-haiku-4-5", "title"),
            ],
        )


class FailingWriter:
    """
    A writer on a full disk: the operations named in C{failing} raise
    OSError(ENOSPC), at most C{times} times each (None: for ever); every
    call is recorded.
    """

    def __init__(self, failing: tuple[str, ...], times: int | None = None, error: BaseException | None = None) -> None:
        self.failing = failing
        self.left = {name: times for name in failing}
        self.error = error
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name not in self.failing:
            return
        left = self.left[name]
        if left is not None:
            if left <= 0:
                return
            self.left[name] = left - 1
        raise self.error if self.error is not None else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def line(self, day: str, text: bytes) -> None:
        self._call("line")

    def body(self, path: Path, data: bytes) -> None:
        self._call("body")

    def end_body(self, path: Path) -> None:
        self._call("end_body")

    def close(self) -> None:
        self._call("close")


def emit_requests(hub: EventHub, count: int, log: RequestLog | None = None) -> None:
    for number in range(1, count + 1):
        hub.emit("request-started", 0.0, id=number, method="POST", path="/v1/messages", session=None, bytes=1)
        if log is not None:
            log.request_body(number, b"{}")
            log.response_chunk(number, b"data: {}\n\n")
            log.response_end(number)
        hub.emit("request-finished", 1.0, id=number, account="a", reason="primary", status=200, ok=True, duration=1.0, usage=None)


class WriteFailureTests(TestCase):
    """
    A request log that cannot be written (item 5 of issue 10): the stop
    still completes, and the failure is one problem and one log line, not
    one per request.
    """

    def setUp(self) -> None:
        self.hub = EventHub()
        self.events: list[Event] = []
        self.hub.subscribe(self.events.append)
        self.problems = Problems(self.hub, lambda: 1_800_000_000.0)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def start(self, writer: Any) -> RequestLog:
        log = RequestLog(
            reactor,
            Path(self.mktemp()),
            self.hub,
            keep_bodies=True,
            problems=self.problems,
            make_writer=lambda directory, max_bytes: writer,
        )
        log.startService()
        return log

    def lines(self, text: str) -> list[str]:
        return [formatEvent(event) or "" for event in self.logged if text in (formatEvent(event) or "")]

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events if event.kind.startswith("problem-")]

    async def test_everything_fails_stop_completes(self) -> None:
        """
        A writer whose every write, flush and close raise ENOSPC: the stop
        completes, a REQUEST_LOG problem stands naming the directory and
        the reason, and the log has one line about it for five requests.
        """
        writer = FailingWriter(("line", "body", "end_body", "close"))
        log = self.start(writer)
        emit_requests(self.hub, 5, log)
        await log.stopService()
        self.assertEqual(writer.calls[-1], "close")
        [problem] = self.problems.snapshot()
        self.assertEqual((problem["account"], problem["kind"]), (None, REQUEST_LOG))
        self.assertIn(str(log.directory), problem["message"])
        self.assertIn("No space left on device", problem["message"])
        self.assertEqual(len(self.lines("cannot be written")), 1)
        self.assertEqual(self.kinds(), ["problem-raised"])

    async def test_close_alone_fails_stop_completes(self) -> None:
        """
        Writes that work but a close that raises at the stop (a buffer that
        cannot be flushed): the stop still completes, and the failure is
        reported.
        """
        writer = FailingWriter(("close",))
        log = self.start(writer)
        emit_requests(self.hub, 2)
        await log.stopService()
        self.assertEqual([p["kind"] for p in self.problems.snapshot()], [REQUEST_LOG])

    async def test_writer_bug_stop_completes(self) -> None:
        """
        A writer that raises something other than OSError (a bug): the
        thread logs it and carries on, and the stop completes.
        """
        writer = FailingWriter(("line", "close"), error=RuntimeError("bug"))
        log = self.start(writer)
        emit_requests(self.hub, 3)
        await log.stopService()
        self.assertEqual(writer.calls, ["line", "line", "line", "close"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)

    async def test_writer_that_cannot_be_made(self) -> None:
        """
        A writer whose construction fails ends the thread at once: the stop
        does not wait for it.
        """
        def broken(directory: Path, max_bytes: int) -> Any:
            raise RuntimeError("no writer")

        log = RequestLog(reactor, Path(self.mktemp()), self.hub, make_writer=broken)
        log.startService()
        emit_requests(self.hub, 1)
        await log.stopService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_recovery_clears_the_problem(self) -> None:
        """
        Once lines can be written again (space freed), the problem is
        cleared, with one line saying so; it is raised once for the spell.
        """
        writer = FailingWriter(("line",), times=3)
        log = self.start(writer)
        emit_requests(self.hub, 5)
        await log.stopService()
        self.assertEqual(self.kinds(), ["problem-raised", "problem-cleared"])
        self.assertEqual(self.problems.snapshot(), [])
        self.assertEqual(len(self.lines("cannot be written")), 1)
        self.assertEqual(len(self.lines("is written again")), 1)

    async def test_failing_bodies_do_not_flap(self) -> None:
        """
        Bodies that cannot be written while lines can: the problem stands
        (raised once), not raised and cleared for every request.
        """
        writer = FailingWriter(("body", "end_body"))
        log = self.start(writer)
        emit_requests(self.hub, 4, log)
        await log.stopService()
        self.assertEqual(self.kinds(), ["problem-raised"])

    async def test_real_full_device(self) -> None:
        """
        With the real file writer, today's log file a link to /dev/full
        (every flush and close fail with ENOSPC, as on a full disk): the
        stop completes, the problem stands, one log line for five requests.
        """
        if not os.path.exists("/dev/full"):
            raise SkipTest("no /dev/full here")
        directory = Path(self.mktemp())
        directory.mkdir()
        moment = 1_800_000_000.0
        day = time.strftime("%Y-%m-%d", time.localtime(moment))
        (directory / f"requests-{day}.jsonl").symlink_to("/dev/full")
        log = RequestLog(reactor, directory, self.hub, problems=self.problems, wall_clock=lambda: moment)
        log.startService()
        emit_requests(self.hub, 5)
        await log.stopService()
        self.assertEqual([p["kind"] for p in self.problems.snapshot()], [REQUEST_LOG])
        self.assertEqual(len(self.lines("cannot be written")), 1)


class ProxyProblemTests(TestCase):
    async def test_proxy_reports_unwritable_log(self) -> None:
        """
        A proxy whose request log cannot be written serves the request,
        shows a request-log problem in its status, and stops.
        """
        if not os.path.exists("/dev/full"):
            raise SkipTest("no /dev/full here")

        def handler(seen: Seen) -> bytes:
            return json_reply(seen.request, 200, {"type": "message", "content": []})

        log_dir = Path(self.mktemp()).absolute()
        log_dir.mkdir()
        # Today and tomorrow: the test may straddle midnight.
        for moment in (time.time(), time.time() + 86400):
            (log_dir / f"requests-{time.strftime('%Y-%m-%d', time.localtime(moment))}.jsonl").symlink_to("/dev/full")
        config_path = write_config(self, listen(self, FakeUpstream(handler)), logDir=str(log_dir))
        config = load_config(config_path).with_overrides(port=0)
        service = ProxyService(reactor, config, account_settings=AccountsSettings.quiet(config))
        service.startService()
        host, port = service.address()
        response = await client(self).post(f"http://{host}:{port}/v1/messages", data=b"{}", headers=auth())
        self.assertEqual(response.code, 200)
        await response.content()
        await service.stopService()
        [problem] = [p for p in service.status()["problems"] if p["kind"] == REQUEST_LOG]
        self.assertIn("No space left on device", problem["message"])
