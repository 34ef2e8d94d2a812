"""
Request logs: one JSON line per request, credentials masked, bodies kept on
request, files rotated by size, all written off the reactor thread.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude.accounts import AccountsSettings
from nextclaude.config import load_config
from nextclaude.events import EventHub
from nextclaude.requestlog import RequestLog, masked_headers
from nextclaude.service import ProxyService
from tests.support import PROXY_KEY, FakeUpstream, Seen, auth, client, listen, message_end, message_start, write_config


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
        self.assertEqual((entry["account"], entry["reason"]), ("alice", "primary"))
        self.assertEqual(entry["session"], "s:abc-123")
        self.assertEqual(entry["attempts"], [{"account": "alice", "reason": "primary"}])
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
