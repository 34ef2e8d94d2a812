"""
The operator's endpoints: C{/nextclaude/health} (no key, no Host check)
and C{/nextclaude/metrics} (Prometheus text from the proxy's own registry,
parsed here with prometheus_client's own parser).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude import __version__
from nextclaude.config import AccountConfig
from nextclaude.events import EventHub
from nextclaude.metrics import MetricsService, Sources
from nextclaude.pool import AccountPool, Thresholds
from nextclaude.problems import Problems
from nextclaude.quota import WindowQuota
from nextclaude.router import Router
from nextclaude.usage import Usage
from tests.support import PROXY_KEY, FakeUpstream, Seen, auth, client, json_reply, listen, start_proxy, write_config

UNIFIED = {
    "anthropic-ratelimit-unified-status": "allowed",
    "anthropic-ratelimit-unified-5h-status": "allowed",
    "anthropic-ratelimit-unified-5h-utilization": "0.42",
    "anthropic-ratelimit-unified-5h-reset": "4102444800",
    "anthropic-ratelimit-unified-7d-status": "allowed",
    "anthropic-ratelimit-unified-7d-utilization": "0.10",
    "anthropic-ratelimit-unified-7d-reset": "4102444900",
}
BODY = json.dumps(
    {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
).encode()


def ok_message(seen: Seen) -> bytes:
    return json_reply(
        seen.request,
        200,
        {
            "id": "msg_1",
            "type": "message",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hi"}],
            "usage": {
                "input_tokens": 12,
                "output_tokens": 3,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 40,
            },
        },
        UNIFIED,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a Prometheus page, by (name, sorted labels), read
    with the library's own parser (which rejects a malformed page).
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class _Raw(Protocol):
    """Sends raw bytes, collects the answer until the server closes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.received)


async def raw_request(port: int, data: bytes) -> bytes:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    protocol = _Raw(data)
    await connectProtocol(endpoint, protocol)
    return await protocol.done


class HealthTests(TestCase):
    async def test_health_without_key_or_loopback_host(self) -> None:
        """
        GET /nextclaude/health answers 200 without the key, with a Host a
        container would send (host.docker.internal) and an Origin, and its
        body carries only ok and the version; no upstream is reached.
        """
        upstream = FakeUpstream(ok_message)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        port = service.address()[1]
        answer = await raw_request(
            port,
            b"GET /nextclaude/health HTTP/1.1\r\nHost: host.docker.internal:%d\r\n"
            b"Origin: http://evil.example\r\nConnection: close\r\n\r\n" % port,
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(json.loads(body), {"ok": True, "version": __version__})
        self.assertEqual(upstream.seen, [])

    async def test_head_health_and_other_methods(self) -> None:
        """
        HEAD /nextclaude/health is 200 without a body; a POST to it needs
        the key like everything else, and then is a 405, never relayed.
        """
        upstream = FakeUpstream(ok_message)
        service, url = start_proxy(self, write_config(self, listen(self, upstream)))
        http = client(self)
        head = await http.head(url + "/nextclaude/health")
        self.assertEqual(head.code, 200)
        self.assertEqual(await head.content(), b"")
        post = await http.post(url + "/nextclaude/health", data=b"{}")
        self.assertEqual(post.code, 401)
        await post.content()
        post = await http.post(url + "/nextclaude/health", data=b"{}", headers=auth())
        self.assertEqual(post.code, 405)
        await post.content()
        self.assertEqual(upstream.seen, [])


class MetricsEndpointTests(TestCase):
    async def test_metrics_after_traffic(self) -> None:
        """
        After a served request, /nextclaude/metrics (with the key) counts it
        by account, status and reason, its tokens by kind, the account's
        window utilization and reset, its status, the tracked sessions and
        the streams in flight; without the key it is a 401.
        """
        service, url = start_proxy(self, write_config(self, listen(self, FakeUpstream(ok_message))))
        http = client(self)
        response = await http.post(
            url + "/v1/messages", data=BODY, headers=auth({"x-claude-code-session-id": "s-1"})
        )
        await response.content()
        denied = await http.get(url + "/nextclaude/metrics")
        self.assertEqual(denied.code, 401)
        await denied.content()
        response = await http.get(url + "/nextclaude/metrics", headers={"x-nextclaude-key": PROXY_KEY})
        self.assertEqual(response.code, 200)
        self.assertIn(b"text/plain", response.headers.getRawHeaders(b"content-type")[0])
        text = (await response.content()).decode()
        found = samples(text)
        alice = (("account", "alice"),)
        self.assertEqual(
            found[("nextclaude_requests_total", (("account", "alice"), ("reason", "placed"), ("status", "200")))], 1
        )
        for kind, value in (("input", 12), ("output", 3), ("cache_read", 100), ("cache_creation", 40)):
            self.assertEqual(found[("nextclaude_tokens_total", (("account", "alice"), ("kind", kind)))], value)
        self.assertEqual(found[("nextclaude_window_utilization", alice + (("window", "5h"),))], 0.42)
        self.assertEqual(found[("nextclaude_window_reset_timestamp_seconds", alice + (("window", "7d"),))], 4102444900)
        self.assertEqual(found[("nextclaude_account_status", alice + (("status", "active"),))], 1)
        self.assertEqual(found[("nextclaude_account_status", alice + (("status", "disabled"),))], 0)
        self.assertEqual(found[("nextclaude_sessions_tracked", ())], 1)
        self.assertEqual(found[("nextclaude_streams_in_flight", ())], 0)
        self.assertEqual(found[("nextclaude_problems", ())], 0)
        self.assertEqual(found[("nextclaude_build_info", (("version", __version__),))], 1)
        self.assertIn(("nextclaude_rebilled_tokens_total", ()), found)
        self.assertNotIn("sk-ant", text)
        self.assertNotIn(PROXY_KEY, text)

    async def test_two_proxies_in_one_process(self) -> None:
        """
        Two proxies in one process each serve their own figures: no metric
        lives in a process-wide registry.
        """
        first, first_url = start_proxy(self, write_config(self, listen(self, FakeUpstream(ok_message))))
        second, second_url = start_proxy(self, write_config(self, listen(self, FakeUpstream(ok_message))))
        http = client(self)
        await (await http.post(first_url + "/v1/messages", data=BODY, headers=auth())).content()
        pages = []
        for url in (first_url, second_url):
            pages.append(samples(await (await http.get(url + "/nextclaude/metrics", headers=auth())).text()))
        key = ("nextclaude_tokens_total", (("account", "alice"), ("kind", "input")))
        self.assertEqual((pages[0][key], pages[1][key]), (12, 0))
        self.assertIsNot(first.metrics.registry, second.metrics.registry)


class CollectorTests(SynchronousTestCase):
    def build(self) -> tuple[MetricsService, Router, Problems, EventHub, list[float]]:
        now = [1000.0]
        hub = EventHub()
        pool = AccountPool(
            [
                AccountConfig(name="a", type="oauth", access_token="sk-ant-oat01-a"),
                AccountConfig(name="b", type="oauth", access_token="sk-ant-oat01-b", enabled=False, priority=3),
            ],
            Thresholds(),
        )
        router = Router(pool, lambda: now[0], hub)
        problems = Problems(hub, lambda: now[0])
        service = MetricsService(hub, Sources(router=router, clock=lambda: now[0], started=900.0, problems=problems))
        service.startService()
        self.addCleanup(service.stopService)
        return service, router, problems, hub, now

    def test_scrape_reads_live_state(self) -> None:
        """
        Each scrape reads the pool as it is then: a disabled account shows
        enabled 0 and status disabled, its priority; a window that has
        reset is gone; problems are counted by kind and account.
        """
        service, router, problems, hub, now = self.build()
        router.pool.get("a").windows = {"5h": WindowQuota(utilization=0.5, reset=2000.0, status="allowed")}
        router.pool.get("a").usage.record(Usage(input_tokens=7, output_tokens=2), ok=True)
        problems.raise_problem("a", "account-error", "dead")
        page = samples(service.render()[0].decode())
        self.assertEqual(page[("nextclaude_account_enabled", (("account", "b"),))], 0)
        self.assertEqual(page[("nextclaude_account_status", (("account", "b"), ("status", "disabled")))], 1)
        self.assertEqual(page[("nextclaude_account_priority", (("account", "b"),))], 3)
        self.assertEqual(page[("nextclaude_window_utilization", (("account", "a"), ("window", "5h")))], 0.5)
        self.assertEqual(page[("nextclaude_tokens_total", (("account", "a"), ("kind", "input")))], 7)
        self.assertEqual(page[("nextclaude_problems", ())], 1)
        self.assertEqual(page[("nextclaude_problem", (("account", "a"), ("kind", "account-error")))], 1)
        self.assertEqual(page[("nextclaude_start_time_seconds", ())], 900.0)
        now[0] = 2001.0
        page = samples(service.render()[0].decode())
        self.assertNotIn(("nextclaude_window_utilization", (("account", "a"), ("window", "5h"))), page)

    def test_requests_counted_from_events_until_stopped(self) -> None:
        """
        Finished requests are counted by account, status and reason (a
        request no account served under account ""), only while the
        service runs.
        """
        service, router, problems, hub, now = self.build()
        hub.emit("request-finished", now[0], account="a", status=200, reason="affinity", ok=True)
        hub.emit("request-finished", now[0], account="a", status=200, reason="affinity", ok=True)
        hub.emit("request-finished", now[0], account=None, status=429, reason="exhausted", ok=False)
        page = samples(service.render()[0].decode())
        self.assertEqual(
            page[("nextclaude_requests_total", (("account", "a"), ("reason", "affinity"), ("status", "200")))], 2
        )
        self.assertEqual(
            page[("nextclaude_requests_total", (("account", ""), ("reason", "exhausted"), ("status", "429")))], 1
        )
        service.stopService()
        hub.emit("request-finished", now[0], account="a", status=200, reason="affinity", ok=True)
        page = samples(service.render()[0].decode())
        self.assertEqual(
            page[("nextclaude_requests_total", (("account", "a"), ("reason", "affinity"), ("status", "200")))], 2
        )
