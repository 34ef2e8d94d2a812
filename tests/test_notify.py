"""
Notifications (nextclaude.notify): which events are sent and how they look,
coalesced switches, the all-exhausted edge, retries and timeouts on a
task.Clock with StubTreq, and real loopback receivers (one that answers,
one that hangs, one that is down), never showing the URL's secret parts.
"""

from __future__ import annotations

import json
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from nextclaude import events
from nextclaude.config import AccountConfig, NotifySettings
from nextclaude.events import EventHub
from nextclaude.notify import NotifyService, safe_url
from nextclaude.pool import AccountPool, Thresholds
from nextclaude.problems import Problems
from nextclaude.router import Router
from tests.support import listen

SECRET_URL = "https://hooks.example.com/services/T000/B000/XXXXsecretXXXX?token=abc123"


class Receiver(Resource):
    """
    A webhook: records each body; answers with the next scripted status
    (200 once the script is used up), or holds the request when told to.
    """

    isLeaf = True

    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.hang = hang
        self.held: list[Request] = []
        self.arrived: list[Deferred[None]] = []

    def next_arrival(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.arrived.append(waiter)
        return waiter

    def render_POST(self, request: Request) -> bytes | int:
        self.bodies.append(json.loads(request.content.read()))
        if self.arrived:
            self.arrived.pop(0).callback(None)
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        return b"ok"


def make_pool() -> AccountPool:
    return AccountPool(
        [
            AccountConfig(name="alice", type="oauth", access_token="sk-ant-oat01-alicesecret", refresh_token="sk-ant-ort01-alicerefresh"),
            AccountConfig(name="bob", type="apikey", api_key="sk-ant-api03-bobsecretkey"),
        ],
        Thresholds(),
    )


class StubbedTests(SynchronousTestCase):
    def build(self, receiver: Receiver, **settings: Any) -> NotifyService:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.hub = EventHub()
        self.pool = make_pool()
        self.router = Router(self.pool, self.clock.seconds, self.hub)
        self.problems = Problems(self.hub, self.clock.seconds)
        self.stub = StubTreq(receiver)
        settings.setdefault("webhook_url", SECRET_URL)
        self.service = NotifyService(
            self.clock,
            self.hub,
            NotifySettings(**settings),
            self.router,
            client=self.stub,
            secrets=lambda: ["nc-proxykey-0123456789"]
            + [a.config.access_token for a in self.pool]
            + [a.config.refresh_token for a in self.pool]
            + [a.config.api_key for a in self.pool],
            problems=self.problems,
            clock=self.clock,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service

    def settle(self) -> None:
        self.clock.advance(0)
        self.stub.flush()

    def test_account_error_payload_without_credentials(self) -> None:
        """
        An account-error event is POSTed as JSON with source, version,
        event, time, account, message and a text line; any credential the
        message happens to carry (an account's token, the proxy key, an
        sk-ant- token the proxy does not know) is cut out.
        """
        receiver = Receiver()
        self.build(receiver)
        self.hub.emit(
            events.ACCOUNT_ERROR,
            self.clock.seconds(),
            account="alice",
            message="token sk-ant-oat01-alicesecret rejected; key nc-proxykey-0123456789; other sk-ant-oat01-unknown99",
        )
        self.settle()
        (body,) = receiver.bodies
        self.assertEqual(body["event"], "account-error")
        self.assertEqual(body["account"], "alice")
        self.assertEqual(body["source"], "nextclaude")
        self.assertEqual(body["time"], self.clock.seconds())
        self.assertIn("alice cannot serve", body["text"])
        text = json.dumps(body)
        for secret in ("alicesecret", "nc-proxykey-0123456789", "unknown99"):
            self.assertNotIn(secret, text)
        self.assertEqual(self.service.counts, {("account-error", "sent"): 1})

    def test_chosen_events_only_and_switches_coalesced(self) -> None:
        """
        By default switched is not sent; chosen, three switches within a
        minute become one event after the minute, with the count and the
        moves; events left out of notify.events are not sent.
        """
        receiver = Receiver()
        self.build(receiver)
        self.hub.emit(events.SWITCHED, self.clock.seconds(), account="bob", previous="alice", reason="ceiling", session="s")
        self.clock.advance(60)
        self.settle()
        self.assertEqual(receiver.bodies, [])

        receiver = Receiver()
        self.service.stopService()
        self.build(receiver, events=("switched",))
        for session in ("s1", "s2", "s3"):
            self.hub.emit(events.SWITCHED, self.clock.seconds(), account="bob", previous="alice", reason="ceiling", session=session)
        self.hub.emit(events.EXHAUSTED, self.clock.seconds(), account="alice", reset=None)
        self.clock.advance(59)
        self.settle()
        self.assertEqual(receiver.bodies, [])
        self.clock.advance(1)
        self.settle()
        (body,) = receiver.bodies
        self.assertEqual(body["event"], "switched")
        self.assertEqual(body["count"], 3)
        self.assertEqual(body["moves"], [{"from": "alice", "to": "bob", "count": 3}])
        self.assertEqual(body["reasons"], {"ceiling": 3})

    def test_all_exhausted_once_until_something_serves(self) -> None:
        """
        all-exhausted is sent when nothing can serve any more (here: one
        account out of quota, the other dead), once; after an account
        serves again and everything runs out again it is sent again.
        """
        receiver = Receiver()
        self.build(receiver, events=("all-exhausted",))
        alice, bob = self.pool.get("alice"), self.pool.get("bob")
        now = self.clock.seconds()
        alice.exhausted_until = now + 3600
        self.hub.emit(events.EXHAUSTED, now, account="alice", reset=now + 3600)
        self.settle()
        self.assertEqual(receiver.bodies, [])  # bob can still serve
        bob.error = "the API key was rejected"
        self.hub.emit(events.ACCOUNT_ERROR, now, account="bob", message=bob.error)
        self.hub.emit(events.REQUEST_FINISHED, now, account=None, status=429, reason="exhausted", ok=False)
        self.settle()
        (body,) = receiver.bodies
        self.assertEqual(body["event"], "all-exhausted")
        self.assertEqual(body["accounts"], [{"account": "alice", "status": "exhausted"}, {"account": "bob", "status": "error"}])
        self.assertEqual(body["reset"], now + 3600)
        self.hub.emit(events.REQUEST_FINISHED, now, account=None, status=429, reason="exhausted", ok=False)
        self.settle()
        self.assertEqual(len(receiver.bodies), 1)
        bob.error = None
        self.hub.emit(events.REQUEST_FINISHED, now, account="bob", status=200, reason="placed", ok=True)
        self.settle()
        bob.error = "again"
        self.hub.emit(events.ACCOUNT_ERROR, now, account="bob", message="again")
        self.settle()
        self.assertEqual([b["event"] for b in receiver.bodies], ["all-exhausted", "all-exhausted"])

    def test_retries_server_errors_then_gives_up_on_client_errors(self) -> None:
        """
        A 500 is retried after 5 s and then 30 s (the third attempt is
        delivered); a 404 is not retried: it counts as failed, and the
        problem, the status and the last error name only the scheme and
        host of the URL.
        """
        receiver = Receiver(statuses=[500, 503])
        self.build(receiver)
        self.hub.emit(events.RECOVERED, self.clock.seconds(), account="alice")
        self.settle()
        self.assertEqual(len(receiver.bodies), 1)
        self.clock.advance(5)
        self.settle()
        self.assertEqual(len(receiver.bodies), 2)
        self.clock.advance(30)
        self.settle()
        self.assertEqual(len(receiver.bodies), 3)
        self.assertEqual(self.service.counts, {("recovered", "sent"): 1})

        receiver.statuses = [404]
        self.hub.emit(events.RECOVERED, self.clock.seconds(), account="bob")
        self.settle()
        self.clock.advance(60)
        self.settle()
        self.assertEqual(len(receiver.bodies), 4)
        self.assertEqual(self.service.counts[("recovered", "failed")], 1)
        snapshot = self.service.snapshot()
        self.assertEqual(snapshot["webhook"], "https://hooks.example.com")
        self.assertEqual(snapshot["lastError"], "recovered to https://hooks.example.com: HTTP 404")
        (problem,) = self.problems.snapshot()
        self.assertEqual(problem["kind"], "notify")
        shown = json.dumps([snapshot, problem])
        for secret in ("services", "XXXXsecretXXXX", "abc123", "token"):
            self.assertNotIn(secret, shown)
        # A later delivery clears the problem.
        self.hub.emit(events.RECOVERED, self.clock.seconds(), account="alice")
        self.settle()
        self.assertEqual(self.problems.snapshot(), [])

    def test_no_webhook_means_idle(self) -> None:
        """
        Without notify.webhookUrl the service sends nothing and the status
        field is null.
        """
        receiver = Receiver()
        self.build(receiver, webhook_url=None)
        self.hub.emit(events.RECOVERED, self.clock.seconds(), account="alice")
        self.settle()
        self.assertEqual(receiver.bodies, [])
        self.assertIsNone(self.service.snapshot())

    def test_safe_url(self) -> None:
        """
        safe_url keeps scheme, host and port; never user info, path or query.
        """
        self.assertEqual(safe_url(SECRET_URL), "https://hooks.example.com")
        self.assertEqual(safe_url("http://user:pw@[::1]:8080/x?y=1"), "http://[::1]:8080")
        self.assertIsNone(safe_url(None))


class _Watched:
    """
    A real treq client that fires the test's waiters as each POST ends
    (answered or failed), so the test advances its clock only then.
    """

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._client = HTTPClient(Agent(reactor, pool=pool))
        self.ended: list[Deferred[None]] = []

    def next_end(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.ended.append(waiter)
        return waiter

    def post(self, url: str, **kw: Any) -> Deferred[Any]:
        posted = self._client.post(url, **kw)
        # The service sees the outcome first (and schedules its retry), the
        # test's waiter after: the test then advances its clock past it.
        outcome: Deferred[Any] = Deferred(lambda _: posted.cancel())

        def ended(result: object) -> None:
            outcome.callback(result)
            if self.ended:
                self.ended.pop(0).callback(None)

        posted.addBoth(ended)
        return outcome


class LoopbackTests(TestCase):
    def build(self, url: str) -> tuple[NotifyService, _Watched, Clock, EventHub]:
        clock = Clock()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        watched = _Watched(pool)
        hub = EventHub()
        router = Router(make_pool(), clock.seconds, hub)
        service = NotifyService(
            reactor, hub, NotifySettings(webhook_url=url), router, client=watched, clock=clock
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service, watched, clock, hub

    async def test_receiver_gets_the_event(self) -> None:
        """
        A real receiver on loopback gets one JSON POST with the event.
        """
        receiver = Receiver()
        port = listen(self, receiver)
        service, watched, clock, hub = self.build(f"http://127.0.0.1:{port}/hook/secret-token")
        ended = watched.next_end()
        hub.emit(events.EXHAUSTED, clock.seconds(), account="alice", reset=1_700_003_600)
        clock.advance(0)
        await ended
        (body,) = receiver.bodies
        self.assertEqual(
            {key: body[key] for key in ("event", "account", "reset")},
            {"event": "exhausted", "account": "alice", "reset": 1_700_003_600},
        )
        self.assertIn("out of quota until 2023-11-14 23:13 UTC", body["text"])

    async def test_hanging_receiver_times_out_and_stop_does_not_wait(self) -> None:
        """
        A receiver that takes the POST and never answers: each attempt is
        given up after the timeout (on the test's clock), retried, then
        counted as failed with "no answer in time"; a stop during an attempt
        returns at once, cutting it.
        """
        receiver = Receiver(hang=True)
        port = listen(self, receiver)
        self.addCleanup(lambda: [r.finish() for r in receiver.held if not r.finished and not r._disconnected])
        service, watched, clock, hub = self.build(f"http://127.0.0.1:{port}/hook")
        for attempt, wait in enumerate((5.0, 30.0, None)):
            arrived = receiver.next_arrival()
            if attempt == 0:
                hub.emit(events.RECOVERED, clock.seconds(), account="alice")
                clock.advance(0)
            await arrived
            ended = watched.next_end()
            clock.advance(service.timeout)
            await ended
            if wait is not None:
                clock.advance(wait)
        self.assertEqual(service.counts, {("recovered", "failed"): 1})
        self.assertEqual(service.last_error, f"recovered to http://127.0.0.1:{port}: no answer in time")

        arrived = receiver.next_arrival()
        hub.emit(events.RECOVERED, clock.seconds(), account="bob")
        clock.advance(0)
        await arrived
        self.assertEqual(service.snapshot()["pending"], 1)
        # The attempt is cut: nothing is left to wait for.
        self.assertIsNone(service.stopService())
        self.assertEqual(service.snapshot()["pending"], 0)

    async def test_receiver_down(self) -> None:
        """
        A receiver that is down (its port closed): three attempts, each
        refused, then failed with "connection refused".
        """
        port = reactor.listenTCP(0, Site(Receiver()), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        service, watched, clock, hub = self.build(f"http://127.0.0.1:{number}/hook")
        for attempt, wait in enumerate((5.0, 30.0, None)):
            ended = watched.next_end()
            if attempt == 0:
                hub.emit(events.RECOVERED, clock.seconds(), account="alice")
                clock.advance(0)
            await ended
            if wait is not None:
                clock.advance(wait)
        self.assertEqual(service.counts, {("recovered", "failed"): 1})
        self.assertEqual(service.last_error, f"recovered to http://127.0.0.1:{number}: connection refused")
