"""
Memory the proxy gives back (issue 12): request bodies released once no
retry can need them, the upstream body producer forgetting what it wrote,
the glibc trim guarded so other platforms skip it, and body scans bounded.

Speed is measured by benchmarks/proxy_overhead.py, never asserted here.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import NOT_DONE_YET

from nextclaude import proxy, sessions
from nextclaude.allocator import (
    HEAP_BLOCKS_BELOW,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    TRIM_PAST,
    Allocator,
    Reclaimer,
    glibc,
)
from nextclaude.config import ProxySettings
from nextclaude.upstream import BytesProducer
from tests.support import (
    ChunkCollector,
    FakeUpstream,
    Seen,
    auth,
    client,
    json_reply,
    listen,
    message_end,
    message_start,
    start_proxy,
    text_delta,
    write_config,
)


def large_body(size: int = 300_000) -> bytes:
    """
    A streaming Messages request of about C{size} bytes: several socket
    reads, so the proxy joins it from chunks.
    """
    return json.dumps(
        {
            "model": "claude-sonnet-4-5",
            "messages": [{"role": "user", "content": "word " * (size // 5)}],
            "max_tokens": 64,
            "stream": True,
        }
    ).encode()


def _record_taken(test: Any) -> list[bytes]:
    """
    Patch the proxy so that every body it takes from a request is also
    kept here: the test then holds the very object the relay used.
    """
    taken: list[bytes] = []
    original = proxy.take_body

    def recording(request: Any) -> bytes:
        body = original(request)
        taken.append(body)
        return body

    test.patch(proxy, "take_body", recording)
    return taken


class _CountingConsumer:
    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)


class BodyReleaseTests(TestCase):
    async def test_body_is_released_once_the_first_byte_reached_the_client(self) -> None:
        """
        While the stream is still open (the upstream holds back its end),
        nothing in the proxy references the request body any more once the
        response's first byte reached the client: not the request (whose
        content Twisted keeps until finish), the relay's frame or closures,
        nor the upstream body producer that Twisted's HTTP client keeps
        with the response.  Checked with the body's reference count,
        without a garbage collection.
        """
        taken = _record_taken(self)
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
        sent = large_body()
        response = await client(self).post(url + "/v1/messages", data=sent, headers=auth(), unbuffered=True)
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.first

        body = taken.pop()
        self.assertEqual(body, sent)
        self.assertEqual(upstream.seen[0].body, sent)
        # `body` here and getrefcount's own argument: no one else.
        self.assertEqual(sys.getrefcount(body), 2, [type(r) for r in gc.get_referrers(body)])

        release.callback(None)
        await collector.done
        self.assertIn(b"message_stop", collector.body)

    async def test_retry_before_the_first_byte_sends_the_whole_body_again(self) -> None:
        """
        Until a response is worth relaying, the body is kept: a large body
        whose first attempt meets a quota 429 reaches the second account
        whole, byte for byte, and the client gets the second answer.
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
            seen.request.setHeader(b"content-type", b"text/event-stream")
            return message_start() + text_delta("hi") + message_end()

        upstream = FakeUpstream(handler)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        sent = large_body()
        response = await client(self).post(url + "/v1/messages", data=sent, headers=auth())
        self.assertEqual(response.code, 200)
        self.assertIn(b"message_stop", await response.content())
        self.assertEqual([s.body for s in upstream.seen], [sent, sent])
        self.assertEqual(
            [s.headers[b"authorization"][0] for s in upstream.seen],
            [b"Bearer sk-ant-oat01-alice", b"Bearer sk-ant-oat01-bob"],
        )


class ResponseCycleTests(TestCase):
    async def test_finished_response_is_freed_without_a_collection(self) -> None:
        """
        With the garbage collector off, a finished upstream response (and
        so its parser, headers and request) is freed by reference counting
        once its connection went back to the pool: Twisted's parser keeps
        its body decoder, whose callbacks lead back to the parser, and that
        cycle is broken.  Both a chunked and a Content-Length body.
        """
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        from nextclaude.upstream import UpstreamService

        def handler(seen: Seen) -> Any:
            if seen.request.path == b"/sized":
                return b"all at once"
            seen.request.write(b"in ")
            seen.request.write(b"chunks")
            seen.request.finish()
            return NOT_DONE_YET

        service = UpstreamService(reactor, f"http://127.0.0.1:{listen(self, FakeUpstream(handler))}")
        service.startService()
        self.addCleanup(service.stopService)
        gc.disable()
        self.addCleanup(gc.enable)
        for path, expected in ((b"/chunked", b"in chunks"), (b"/sized", b"all at once")):
            response = await service.request(b"POST", path, Headers({}), b"{}")
            self.assertEqual(await readBody(response), expected)
            freed = weakref.ref(response)
            del response
            # The pool takes the connection back after the body's end is
            # delivered, in the same call: let that call return.
            await deferLater(reactor, 0, lambda: None)
            self.assertIsNone(freed(), path)


class BytesProducerTests(SynchronousTestCase):
    def test_producer_forgets_the_body_once_written(self) -> None:
        """
        The producer writes the whole body in one go and drops its
        reference: Twisted's HTTP client keeps the producer as long as the
        response (and in a reference cycle after that), the body need not
        live as long.
        """
        body = b"x" * 100_000 + str(id(self)).encode()
        before = sys.getrefcount(body)
        producer = BytesProducer(body)
        self.assertEqual(producer.length, len(body))
        self.assertEqual(sys.getrefcount(body), before + 1)
        consumer = _CountingConsumer()
        self.assertIsNone(self.successResultOf(producer.startProducing(consumer)))
        self.assertEqual(consumer.size, len(body))
        self.assertEqual(sys.getrefcount(body), before)

    def test_stopped_producer_forgets_the_body(self) -> None:
        """
        A producer stopped before it wrote (the request was cancelled)
        drops the body too.
        """
        body = b"y" * 10_000 + str(id(self)).encode()
        before = sys.getrefcount(body)
        producer = BytesProducer(body)
        producer.stopProducing()
        self.assertEqual(sys.getrefcount(body), before)


class _FakeLibc:
    def __init__(self) -> None:
        self.trims = 0
        self.options: dict[int, int] = {}

    def gnu_get_libc_version(self) -> bytes:
        return b"2.39"

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1

    def mallopt(self, parameter: int, value: int) -> int:
        self.options[parameter] = value
        return 1


class AllocatorGuardTests(SynchronousTestCase):
    def test_not_linux_is_skipped(self) -> None:
        """
        On macOS or Windows no C library is even loaded.
        """

        def load(name: str) -> Any:
            raise AssertionError("nothing is loaded off Linux")

        self.assertIsNone(glibc(platform="darwin", load=load))
        self.assertIsNone(glibc(platform="win32", load=load))

    def test_missing_or_foreign_libc_is_skipped(self) -> None:
        """
        A C library that cannot be loaded, or one that is not glibc (musl
        has neither gnu_get_libc_version nor malloc_trim), means no trim.
        """

        def fails(name: str) -> Any:
            raise OSError("no such library")

        class Musl:
            pass

        self.assertIsNone(glibc(platform="linux", load=fails))
        self.assertIsNone(glibc(platform="linux", load=lambda name: Musl()))

    def test_without_glibc_trim_does_nothing(self) -> None:
        """
        Without glibc the allocator says so and trimming is a no-op that
        neither fails nor claims to have freed anything.
        """
        allocator = Allocator(find=lambda: None)
        self.assertFalse(allocator.available)
        self.assertFalse(allocator.trim())
        self.assertFalse(allocator.keep_bodies_in_heap())
        reclaimer = Reclaimer(allocator, Clock())
        reclaimer.relayed()
        reclaimer.drained()
        reclaimer.disconnected()
        self.assertEqual(reclaimer.trims, 0)

    def test_this_platform(self) -> None:
        """
        Here, the real lookup either finds glibc and trims without error,
        or finds none and skips.
        """
        allocator = Allocator()
        if glibc() is None:
            self.assertFalse(allocator.available)
        else:
            self.assertTrue(allocator.available)
        self.assertIn(allocator.trim(), (True, False))
        self.assertIn(allocator.keep_bodies_in_heap(), (True, False))

    def test_bodies_kept_in_heap(self) -> None:
        """
        At start-up glibc is told to serve every block below 32 MiB (the
        default body cap) from the heap and to leave the heap's top to the
        reclaimer's trims (up to 64 MiB free there); a glibc build without
        mallopt is left alone.
        """
        libc = _FakeLibc()
        self.assertTrue(Allocator(libc=libc).keep_bodies_in_heap())
        self.assertEqual(libc.options, {M_MMAP_THRESHOLD: HEAP_BLOCKS_BELOW, M_TRIM_THRESHOLD: TRIM_PAST})
        self.assertEqual((HEAP_BLOCKS_BELOW, TRIM_PAST), (32 * 1024 * 1024, 64 * 1024 * 1024))
        self.assertEqual(ProxySettings().max_body_bytes, HEAP_BLOCKS_BELOW)

        class Old(_FakeLibc):
            mallopt = None  # type: ignore[assignment]

        self.assertFalse(Allocator(libc=Old()).keep_bodies_in_heap())


class ReclaimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.libc = _FakeLibc()
        self.clock = Clock()
        self.reclaimer = Reclaimer(Allocator(libc=self.libc), self.clock, interval=1.0)

    def test_drain_trims_at_most_once_per_interval(self) -> None:
        """
        A drain after relayed requests trims; further drains within the
        interval do not, the first one after it does.
        """
        self.reclaimer.relayed()
        self.reclaimer.drained()
        self.assertEqual(self.libc.trims, 1)
        self.clock.advance(0.5)
        self.reclaimer.relayed()
        self.reclaimer.drained()
        self.assertEqual(self.libc.trims, 1)
        self.clock.advance(0.5)
        self.reclaimer.drained()
        self.assertEqual(self.libc.trims, 2)

    def test_nothing_relayed_nothing_trimmed(self) -> None:
        """
        Drains and disconnects with no request relayed since the last trim
        cost nothing.
        """
        self.reclaimer.drained()
        self.reclaimer.disconnected()
        self.assertEqual(self.libc.trims, 0)

    def test_last_connection_closing_trims_what_the_interval_held_back(self) -> None:
        """
        The end of a load (every client connection closed) trims even
        within the interval, once.
        """
        self.reclaimer.relayed()
        self.reclaimer.drained()
        self.reclaimer.relayed()
        self.reclaimer.drained()
        self.assertEqual(self.libc.trims, 1)
        self.reclaimer.disconnected()
        self.assertEqual(self.libc.trims, 2)
        self.reclaimer.disconnected()
        self.assertEqual(self.libc.trims, 2)


class MaxTokensScanTests(SynchronousTestCase):
    def test_side_request_found_near_the_end(self) -> None:
        """
        max_tokens 1 near the end (Claude Code's key order) marks a side
        request, small or large.
        """
        small = json.dumps({"model": "m", "messages": [{"role": "user", "content": "quota"}], "max_tokens": 1}).encode()
        large = json.dumps({"model": "m", "messages": [{"role": "user", "content": "w " * 200_000}], "max_tokens": 1}).encode()
        for body in (small, large):
            facts = sessions.inspect_request(b"/v1/messages", b"session-1", body)
            self.assertTrue(facts.is_side_request)

    def test_scan_is_bounded_for_large_bodies(self) -> None:
        """
        In a large body the scan for max_tokens looks only at the tail:
        a max_tokens far from the end is not searched for through the
        whole history (it costs a scan per megabyte on every request).
        """
        body = json.dumps({"max_tokens": 1, "model": "m", "messages": [{"role": "user", "content": "w " * 200_000}]}).encode()
        facts = sessions.inspect_request(b"/v1/messages", b"session-1", body)
        self.assertFalse(facts.is_side_request)

    def test_parsed_body_decides_wherever_max_tokens_is(self) -> None:
        """
        When the body is parsed anyway (here: no session id anywhere, so
        the prefix hash needs it), the parsed max_tokens decides.
        """
        body = json.dumps({"max_tokens": 1, "model": "m", "messages": [{"role": "user", "content": "w " * 200_000}]}).encode()
        facts = sessions.inspect_request(b"/v1/messages", None, body)
        self.assertTrue(facts.is_side_request)


class ImportTests(SynchronousTestCase):
    def test_server_without_console_does_not_load_urwid(self) -> None:
        """
        The modules a proxy runs on (the twistd plugin's tap, the service,
        the CLI's server path and its plain-text activity log) never import
        urwid, which alone holds about 7 MB of resident memory; only the
        console does.
        """
        import subprocess

        from tests.support import REPO_ROOT

        code = (
            "import sys\n"
            "import nextclaude.tap, nextclaude.service, nextclaude.cli, nextclaude.activity\n"
            "from nextclaude.activity import LogRouter, Rows\n"
            "Rows().lines({'time': 0.0, 'status': 200}, ['sim-1'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'urwid'))\n"
            "import nextclaude.console.app\n"
            "print('urwid' in sys.modules)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=str(REPO_ROOT),
            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
            timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.splitlines(), ["[]", "True"])
