"""
Graceful shutdown of `nextclaude server`: stop accepting, let streams in
flight finish within proxy.shutdownGrace, save state, exit 0; a second
signal exits at once.
"""

from __future__ import annotations

import json
import signal

from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from tests.support import (
    ChunkCollector,
    FakeUpstream,
    Seen,
    auth,
    client,
    holding_stream,
    listen,
    message_end,
    open_stream,
    spawn_nextclaude,
    text_delta,
    write_config,
)


class ShutdownTests(TestCase):
    async def start(self, grace: float) -> tuple[object, str, FakeUpstream, ChunkCollector, Seen]:
        """
        A server process with one stream in flight, held by the upstream.
        """

        upstream = FakeUpstream(holding_stream)
        config = write_config(self, listen(self, upstream), proxy={"shutdownGrace": grace})
        watcher = spawn_nextclaude(self, "--config", str(config), "server", "--port", "0", "--no-console")
        url = (await watcher.line_matching(rb"listening on (http://127\.0\.0\.1:\d+)")).group(1).decode()
        collector, seen = await open_stream(self, url, upstream)
        self.config = config
        return watcher, url, upstream, collector, seen

    async def test_stream_in_flight_finishes_then_exit_zero(self) -> None:
        """
        On SIGTERM the server stops accepting new connections, the stream in
        flight runs to its end (released by the test after the signal), the
        state is saved, and the process exits with status 0.
        """
        watcher, url, upstream, collector, seen = await self.start(grace=600)
        watcher.transport.signalProcess(signal.SIGTERM)
        await watcher.line_matching(rb"Stopping: letting 1 request")
        with self.assertRaises(ConnectionRefusedError):
            await client(self).get(url + "/nextclaude/status", headers=auth())
        seen.request.write(text_delta("still streaming") + message_end())
        seen.request.finish()
        await collector.done
        self.assertIn(b"message_stop", collector.body)
        self.assertEqual((await watcher.ended).exitCode, 0)
        state = json.loads((self.config.parent / "state.json").read_text())
        self.assertEqual(state["accounts"]["alice"]["usage"]["requests"], 1)

    async def test_grace_runs_out(self) -> None:
        """
        A stream still going when proxy.shutdownGrace runs out is cut (the
        client sees the connection end without a message_stop) and the
        server still exits 0 with its state saved.
        """
        watcher, url, upstream, collector, seen = await self.start(grace=0.2)
        watcher.transport.signalProcess(signal.SIGTERM)
        reason = await collector.done
        self.assertNotIn(b"message_stop", collector.body)
        self.assertEqual(type(reason).__name__, "ResponseFailed")
        self.assertEqual((await watcher.ended).exitCode, 0)
        self.assertTrue((self.config.parent / "state.json").exists())
        await seen.gone.addErrback(lambda failure: None)

    async def test_second_signal_exits_at_once(self) -> None:
        """
        A second signal during the grace period ends the process at once.
        """
        watcher, url, upstream, collector, seen = await self.start(grace=600)
        watcher.transport.signalProcess(signal.SIGTERM)
        await watcher.line_matching(rb"signal again to quit at once")
        watcher.transport.signalProcess(signal.SIGTERM)
        self.assertEqual((await watcher.ended).exitCode, 128 + signal.SIGTERM)
        await collector.done
        await seen.gone.addErrback(lambda failure: None)
