"""
Tests for nextclaude.control: the AMP commands over an in-memory connection
(iosim), chunking of large values, the event stream with its bounds on slow
consoles, the fallback accounts layer, and the ControlService on a real
UNIX socket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Coroutine

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude import events
from nextclaude.config import AccountConfig, load_config
from nextclaude.events import EventHub
from nextclaude.paths import FileProblem
from nextclaude.pool import AccountPool, Thresholds
from nextclaude.quota import WindowQuota
from nextclaude.router import Router
from nextclaude.status import snapshot
from nextclaude.control import (
    CHUNK_BYTES,
    EVENTS_DROPPED,
    AddAccount,
    AlreadyRunning,
    CommandFailed,
    ConfigAccounts,
    ConfigUnusable,
    ControlClient,
    ControlFactory,
    ControlService,
    Disconnected,
    InvalidAccount,
    JsonChunks,
    NotRunning,
    PushEvent,
    SocketPathProblem,
    Subscribe,
    TextChunks,
    UnknownAccount,
    _ClientProtocol,
    config_reloader,
    connect,
    read_snapshot,
)

NOW = 1_750_000_000.0
SOCKET = "/run/test/control.sock"


class CountingHub(EventHub):
    """
    An EventHub that knows how many listeners are subscribed right now.
    """

    def __init__(self, keep: int = 200) -> None:
        super().__init__(keep)
        self.listening = 0

    def subscribe(self, listener: Callable[[events.Event], None]) -> Callable[[], None]:
        unsubscribe = super().subscribe(listener)
        self.listening += 1
        done: list[bool] = []

        def counted() -> None:
            if not done:
                done.append(True)
                self.listening -= 1
            unsubscribe()

        return counted


class FakeAccounts:
    """
    An accounts layer that records calls; C{fail} makes the next call raise.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: Exception | None = None
        self.answer: Any = None

    def _result(self, default: Any) -> Any:
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        return default if self.answer is None else self.answer

    def add_api_key(self, name: str, key: str) -> Any:
        self.calls.append(("add_api_key", name, key))
        return self._result(name)

    def import_json(self, text: str, name: str | None) -> Any:
        self.calls.append(("import_json", text, name))
        return self._result(name or "imported@example.com")

    def remove(self, name: str) -> Any:
        self.calls.append(("remove", name))
        if name == "nobody":
            raise KeyError(name)
        return self._result(None)

    def reload(self) -> Any:
        self.calls.append(("reload",))
        return self._result((["carol"], ["alice"]))


def account_configs(*names: str) -> list[AccountConfig]:
    return [AccountConfig(name=name, type="oauth", access_token=f"sk-ant-oat01-{index}") for index, name in enumerate(names)]


class FakeProxy:
    """
    What ControlService needs of a proxy: a real hub and a real router over
    a real pool, a scriptable accounts layer, and nextclaude.status's
    snapshot.
    """

    def __init__(self, names: tuple[str, ...] = ("alice", "bob"), keep: int = 200) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.hub = CountingHub(keep)
        self.pool = AccountPool(account_configs(*names), Thresholds())
        self.router = Router(self.pool, self.clock.seconds, self.hub)
        self.accounts: Any = FakeAccounts()
        self.started = NOW - 100

    def status(self) -> dict[str, Any]:
        return snapshot(self.router, self.clock.seconds(), self.started, "127.0.0.1", 3456)


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


class StuckClient(amp.AMP):
    """
    A console that takes pushed events but never answers them until told.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[dict[str, Any], int | None]] = []
        self.pending: list[Deferred[dict[str, Any]]] = []

    @PushEvent.responder
    def push_event(self, event: dict[str, Any], dropped: int | None) -> Deferred[dict[str, Any]]:
        self.events.append((event, dropped))
        answer: Deferred[dict[str, Any]] = Deferred()
        self.pending.append(answer)
        return answer

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for answer in pending:
            answer.callback({})


class Harness(SynchronousTestCase):
    """
    A ControlFactory over a FakeProxy, connected in memory to a client.
    """

    def connect(
        self, proxy: FakeProxy | None = None, client_class: Callable[[], amp.AMP] = _ClientProtocol, max_outstanding: int = 100
    ) -> None:
        self.proxy = proxy if proxy is not None else FakeProxy()
        self.factory = ControlFactory(self.proxy, max_outstanding)
        self.client_protocol, self.server, self.pump = iosim.connectedServerAndClient(
            self.factory.buildProtocol, client_class
        )
        if isinstance(self.client_protocol, _ClientProtocol):
            self.client = ControlClient(self.client_protocol, SOCKET)

    def call(self, pending: Deferred[Any] | Coroutine[Any, Any, Any]) -> Deferred[Any]:
        result = pending if isinstance(pending, Deferred) else Deferred.fromCoroutine(pending)
        self.pump.flush()
        return result

    def subscribe(self) -> list[dict[str, Any]]:
        received: list[dict[str, Any]] = []
        self.successResultOf(self.call(self.client.subscribe(received.append)))
        return received

    def emit(self, kind: str = events.PROBE, **data: Any) -> None:
        self.proxy.hub.emit(kind, self.proxy.clock.seconds(), **data)


class CommandTests(Harness):
    def setUp(self) -> None:
        self.connect()

    def test_snapshot(self) -> None:
        """
        Snapshot answers the proxy's status snapshot, the same JSON as the
        status endpoint.
        """
        result = self.successResultOf(self.call(self.client.snapshot()))
        self.assertEqual(result, as_json(self.proxy.status()))
        self.assertEqual([account["name"] for account in result["accounts"]], ["alice", "bob"])

    def test_pin(self) -> None:
        """
        Pin makes the router's manual pin that account, and the router's
        pin-changed event follows.
        """
        self.successResultOf(self.call(self.client.pin("bob")))
        self.assertEqual(self.proxy.router.manual, "bob")
        self.assertEqual(self.proxy.hub.recent[-1].kind, events.PIN_CHANGED)
        self.assertEqual(self.proxy.hub.recent[-1].data, {"account": "bob"})

    def test_unpin(self) -> None:
        """
        Pin without an account clears the pin.
        """
        self.proxy.router.pin("bob")
        self.successResultOf(self.call(self.client.pin(None)))
        self.assertIsNone(self.proxy.router.manual)

    def test_pin_unknown(self) -> None:
        """
        Pinning a name that is no account fails with UnknownAccount naming
        it, leaves the pin alone, and the connection stays usable.
        """
        self.proxy.router.pin("alice")
        failure = self.failureResultOf(self.call(self.client.pin("mallory")), UnknownAccount)
        self.assertIn("mallory", str(failure.value))
        self.assertEqual(self.proxy.router.manual, "alice")
        self.successResultOf(self.call(self.client.snapshot()))

    def test_add_api_key(self) -> None:
        """
        AddAccount of kind apikey hands name and key to the accounts layer
        and answers the name the account got.
        """
        name = self.successResultOf(self.call(self.client.add_api_key("carol", "sk-ant-api03-xyz")))
        self.assertEqual(name, "carol")
        self.assertEqual(self.proxy.accounts.calls, [("add_api_key", "carol", "sk-ant-api03-xyz")])

    def test_import_credentials(self) -> None:
        """
        AddAccount of kind import hands the credentials text (and the
        optional name, here none) to the accounts layer; the answer is the
        name the layer chose.
        """
        text = json.dumps({"claudeAiOauth": {"accessToken": "sk-ant-oat01-x"}})
        name = self.successResultOf(self.call(self.client.import_credentials(text)))
        self.assertEqual(name, "imported@example.com")
        self.assertEqual(self.proxy.accounts.calls, [("import_json", text, None)])

    def test_add_account_bad_requests(self) -> None:
        """
        An unknown kind, an API-key account without a key and an import
        without credentials fail with InvalidAccount before reaching the
        accounts layer.
        """
        for arguments in [
            {"kind": "oauth", "name": "x"},
            {"kind": "apikey", "name": "x"},
            {"kind": "apikey", "api_key": "sk-ant-api03-x"},
            {"kind": "import", "name": "x"},
        ]:
            # Awaited at once: AMP drops the connection over an error
            # nobody is waiting for.
            async def add(arguments: dict[str, str] = arguments) -> Any:
                return await self.client_protocol.callRemote(AddAccount, **arguments)

            self.failureResultOf(self.call(add()), InvalidAccount)
        self.assertEqual(self.proxy.accounts.calls, [])

    def test_accounts_layer_errors(self) -> None:
        """
        The accounts layer's ValueError becomes InvalidAccount, a file
        problem ConfigUnusable (with the file's message), and anything
        unexpected CommandFailed, logged in the proxy; the connection
        survives all of them.
        """
        accounts = self.proxy.accounts
        accounts.fail = ValueError("that is not an API key")
        failure = self.failureResultOf(self.call(self.client.add_api_key("x", "nope")), InvalidAccount)
        self.assertEqual(str(failure.value), "that is not an API key")
        accounts.fail = FileProblem(Path("/cfg/config.json"), "is not valid JSON")
        failure = self.failureResultOf(self.call(self.client.reload()), ConfigUnusable)
        self.assertEqual(str(failure.value), "/cfg/config.json: is not valid JSON")
        accounts.fail = RuntimeError("boom")
        self.failureResultOf(self.call(self.client.remove("alice")), CommandFailed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(self.call(self.client.snapshot()))

    def test_remove(self) -> None:
        """
        RemoveAccount reaches the accounts layer; a name it does not know
        (KeyError) fails with UnknownAccount.
        """
        self.successResultOf(self.call(self.client.remove("alice")))
        self.assertEqual(self.proxy.accounts.calls, [("remove", "alice")])
        failure = self.failureResultOf(self.call(self.client.remove("nobody")), UnknownAccount)
        self.assertIn("nobody", str(failure.value))

    def test_reload(self) -> None:
        """
        Reload answers the names the accounts layer added and removed.
        """
        result = self.successResultOf(self.call(self.client.reload()))
        self.assertEqual(result, (["carol"], ["alice"]))

    def test_asynchronous_accounts_layer(self) -> None:
        """
        An accounts layer may answer with a Deferred: the command answers
        when it fires, and the connection serves other commands meanwhile.
        """
        later: Deferred[str] = Deferred()
        self.proxy.accounts.answer = later
        added = self.call(self.client.import_credentials("{}", "dave"))
        self.assertNoResult(added)
        self.successResultOf(self.call(self.client.snapshot()))
        later.callback("dave@example.com")
        self.pump.flush()
        self.assertEqual(self.successResultOf(added), "dave@example.com")


class ChunkingTests(Harness):
    def box_round_trip(self, argument: amp.Argument, value: Any) -> tuple[dict[bytes, bytes], Any]:
        strings: dict[bytes, bytes] = {}
        argument.toBox(b"value", strings, {"value": value}, None)
        objects: dict[str, Any] = {}
        argument.fromBox(b"value", amp.AmpBox(strings), objects, None)
        return strings, objects["value"]

    def test_split_and_joined(self) -> None:
        """
        A JSON value of a megabyte goes out as value.0, value.1, ... each at
        most CHUNK_BYTES (under AMP's 65,535) and comes back equal, including
        multi-byte characters cut at a chunk boundary; the box serializes.
        """
        value = {"text": "é✎" * 200_000}
        strings, back = self.box_round_trip(JsonChunks(), value)
        self.assertEqual(back, value)
        self.assertGreater(len(strings), 10)
        self.assertEqual(sorted(strings), sorted(b"value.%d" % index for index in range(len(strings))))
        self.assertTrue(all(len(piece) <= CHUNK_BYTES < 65535 for piece in strings.values()))
        amp.AmpBox(strings).serialize()

    def test_small_empty_and_absent(self) -> None:
        """
        A small value is one key; an empty text is kept (not read as
        absent); an optional value that is None sends no key and reads back
        as None.
        """
        strings, back = self.box_round_trip(JsonChunks(), [1, 2])
        self.assertEqual((list(strings), back), ([b"value.0"], [1, 2]))
        strings, back = self.box_round_trip(TextChunks(), "")
        self.assertEqual((strings, back), ({b"value.0": b""}, ""))
        strings, back = self.box_round_trip(TextChunks(optional=True), None)
        self.assertEqual((strings, back), ({}, None))

    def test_snapshot_of_500_accounts(self) -> None:
        """
        The snapshot of a proxy with 500 accounts, far over 64 KiB as JSON,
        crosses the connection intact.
        """
        names = tuple(f"account-{index:03d}-with-a-rather-long-name@example.com" for index in range(500))
        proxy = FakeProxy(names)
        for account in proxy.pool:
            account.windows = {
                "5h": WindowQuota(utilization=0.5, reset=NOW + 3600, status="allowed"),
                "7d": WindowQuota(utilization=0.25, reset=NOW + 86400, status="allowed"),
            }
        self.connect(proxy)
        expected = as_json(proxy.status())
        self.assertGreater(len(json.dumps(expected)), 3 * 65535)
        result = self.successResultOf(self.call(self.client.snapshot()))
        self.assertEqual(result, expected)
        self.assertEqual(len(result["accounts"]), 500)

    def test_huge_event_pushed(self) -> None:
        """
        An event with a payload of several megabytes is pushed to a
        subscriber intact.
        """
        self.connect()
        received = self.subscribe()
        payload = "x" * (3 * 1024 * 1024)
        self.emit(events.ACCOUNT_ERROR, account="alice", message=payload)
        self.pump.flush()
        self.assertEqual(received[-1]["message"], payload)

    def test_huge_replay(self) -> None:
        """
        A replay of the hub's 200 recent events of 20 KB each (4 MB) arrives
        whole, oldest first.
        """
        self.connect()
        for index in range(250):
            self.emit(events.PROBE, account="alice", index=index, filler="y" * 20_000)
        received = self.subscribe()
        self.assertEqual([event["index"] for event in received], list(range(50, 250)))

    def test_huge_credentials_sent(self) -> None:
        """
        Credentials text far over 64 KiB goes from the client to the
        proxy's accounts layer intact.
        """
        self.connect()
        text = json.dumps({"claudeAiOauth": {"accessToken": "t" * 300_000}})
        self.successResultOf(self.call(self.client.import_credentials(text, "big")))
        self.assertEqual(self.proxy.accounts.calls, [("import_json", text, "big")])


class SubscribeTests(Harness):
    def setUp(self) -> None:
        self.connect()

    def test_replay_then_live(self) -> None:
        """
        A subscriber first gets the hub's recent events in order, then each
        new event as it is emitted.
        """
        self.emit(events.ARMED, account="alice", successor="bob")
        self.emit(events.SWITCHED, account="bob", previous="alice", reason="ceiling")
        received = self.subscribe()
        self.assertEqual([event["kind"] for event in received], [events.ARMED, events.SWITCHED])
        self.emit(events.THROTTLED, account="bob", until=NOW + 30)
        self.pump.flush()
        self.assertEqual(
            received[-1], {"kind": events.THROTTLED, "time": NOW, "account": "bob", "until": NOW + 30}
        )

    def test_request_events(self) -> None:
        """
        Request events arrive flattened as Event.to_json makes them: the
        finished one with its usage and routing reason.
        """
        received = self.subscribe()
        usage = {"input_tokens": 3, "output_tokens": 40, "cache_read_input_tokens": 9000, "cache_creation_input_tokens": 0}
        self.emit(events.REQUEST_STARTED, id=1, method="POST", path="/v1/messages", session="s:1", bytes=123)
        self.emit(events.REQUEST_ROUTED, id=1, account="alice", reason="affinity", session="s:1")
        self.emit(
            events.REQUEST_FINISHED, id=1, method="POST", path="/v1/messages", account="alice",
            status=200, reason="affinity", ok=True, duration=1.5, usage=usage,
        )
        self.pump.flush()
        self.assertEqual(
            [event["kind"] for event in received],
            [events.REQUEST_STARTED, events.REQUEST_ROUTED, events.REQUEST_FINISHED],
        )
        self.assertEqual(received[2]["usage"], usage)
        self.assertEqual(received[2]["reason"], "affinity")

    def test_router_events_reach_subscriber(self) -> None:
        """
        A pin through the control channel reaches every subscriber as the
        router's pin-changed event.
        """
        received = self.subscribe()
        self.successResultOf(self.call(self.client.pin("bob")))
        self.assertIn({"kind": events.PIN_CHANGED, "time": NOW, "account": "bob"}, received)

    def test_subscribe_twice(self) -> None:
        """
        Subscribing again on the same connection replays again but does not
        deliver live events twice.
        """
        first = self.subscribe()
        self.emit(account="alice")
        self.pump.flush()
        second = self.subscribe()
        self.assertEqual(len(second), 1)
        self.emit(account="bob")
        self.pump.flush()
        self.assertEqual([event["account"] for event in second], ["alice", "bob"])
        self.assertEqual(self.proxy.hub.listening, 1)
        self.assertEqual(len(first), 1)

    def test_unserializable_data(self) -> None:
        """
        Event data JSON cannot carry is sent as its str() instead of
        breaking the stream.
        """
        received = self.subscribe()
        self.emit(account="alice", when=Path("/x"))
        self.pump.flush()
        self.assertEqual(received[-1]["when"], "/x")


class SlowConsumerTests(Harness):
    def test_unanswered_pushes_bounded(self) -> None:
        """
        A console that never answers has at most 100 pushes outstanding;
        further events are dropped and counted while the hub and its other
        listeners go on; once the console answers, the next push carries
        the drop count, which then starts again from zero.
        """
        self.connect(client_class=StuckClient)
        others: list[events.Event] = []
        self.proxy.hub.subscribe(others.append)
        self.client_protocol.callRemote(Subscribe)
        self.pump.flush()
        for index in range(150):
            self.emit(index=index)
        self.pump.flush()
        self.assertEqual(len(others), 150)
        self.assertEqual(self.server.outstanding, 100)
        self.assertEqual(self.server.dropped_total, 50)
        self.assertEqual([event["index"] for event, _ in self.client_protocol.events], list(range(100)))
        self.client_protocol.answer_all()
        self.pump.flush()
        self.assertEqual(self.server.outstanding, 0)
        self.emit(index=150)
        self.emit(index=151)
        self.pump.flush()
        self.assertEqual(self.client_protocol.events[-2:], [({"kind": "probe", "time": NOW, "index": 150}, 50), ({"kind": "probe", "time": NOW, "index": 151}, 0)])

    def test_console_not_reading(self) -> None:
        """
        A console that does not read at all (nothing crosses the
        connection) costs the proxy at most 100 buffered pushes; when it
        reads again it gets those, then an events-dropped event counting
        the rest before the next live event.
        """
        self.connect()
        received = self.subscribe()
        for index in range(500):
            self.emit(index=index)
        self.assertEqual(self.server.outstanding, 100)
        self.assertEqual(self.server.dropped_pending, 400)
        self.pump.flush()
        self.assertEqual(len(received), 100)
        self.emit(index=500)
        self.pump.flush()
        self.assertEqual(received[100:], [{"kind": EVENTS_DROPPED, "time": NOW, "count": 400}, {"kind": "probe", "time": NOW, "index": 500}])

    def test_console_handler_raises(self) -> None:
        """
        A console whose event handler raises still answers every push (the
        error is logged on its side), so the proxy's outstanding count
        returns to zero and later events keep coming.
        """
        self.connect()
        seen: list[dict[str, Any]] = []

        def handler(event: dict[str, Any]) -> None:
            seen.append(event)
            raise ValueError("console bug")

        self.successResultOf(self.call(self.client.subscribe(handler)))
        self.emit(index=1)
        self.emit(index=2)
        self.pump.flush()
        self.assertEqual([event["index"] for event in seen], [1, 2])
        self.assertEqual(self.server.outstanding, 0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_push_failure_stays_in_control(self) -> None:
        """
        An exception while pushing to one console is logged by the control
        channel and never reaches the hub's emitter or its other listeners.
        """
        self.connect()
        self.subscribe()
        others: list[events.Event] = []
        self.proxy.hub.subscribe(others.append)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("transport exploded")

        self.server.callRemote = broken  # type: ignore[method-assign]
        self.emit(index=1)
        self.assertEqual(len(others), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.server.outstanding, 0)


class DisconnectTests(Harness):
    def test_disconnect_removes_subscription(self) -> None:
        """
        A console that goes away is unsubscribed from the hub and forgotten
        by the factory; later events go nowhere and raise nothing.
        """
        self.connect()
        self.subscribe()
        self.assertEqual((self.proxy.hub.listening, self.factory.subscribers()), (1, 1))
        self.client_protocol.transport.loseConnection()
        self.pump.flush()
        self.assertEqual((self.proxy.hub.listening, self.factory.subscribers()), (0, 0))
        self.assertEqual(self.factory.connections, set())
        self.emit(index=1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_disconnect_with_pushes_outstanding(self) -> None:
        """
        A console that vanishes with pushes unanswered leaves no errors and
        no subscription behind.
        """
        self.connect(client_class=StuckClient)
        self.client_protocol.callRemote(Subscribe)
        self.pump.flush()
        for index in range(5):
            self.emit(index=index)
        self.pump.flush()
        self.assertEqual(self.server.outstanding, 5)
        self.client_protocol.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.server.outstanding, 0)
        self.assertEqual(self.proxy.hub.listening, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_sees_proxy_go(self) -> None:
        """
        When the proxy hangs up, on_disconnect fires for every caller (also
        one asking afterwards), a command in flight fails with Disconnected,
        and so does any later command.
        """
        self.connect()
        gone = self.client.on_disconnect
        self.assertNoResult(gone)
        in_flight = self.client.snapshot()
        self.server.transport.loseConnection()
        self.pump.flush()
        self.assertIsNone(self.successResultOf(gone))
        self.assertIsNone(self.successResultOf(self.client.on_disconnect))
        failure = self.failureResultOf(in_flight, Disconnected)
        self.assertIn(SOCKET, str(failure.value))
        self.failureResultOf(self.call(self.client.pin(None)), Disconnected)

    def test_close(self) -> None:
        """
        ControlClient.close hangs up: its Deferred fires and the proxy drops
        the connection.
        """
        self.connect()
        closed = self.client.close()
        self.pump.flush()
        self.successResultOf(closed)
        self.assertEqual(self.factory.connections, set())


def write_config(directory: Path, accounts: list[dict[str, Any]]) -> Path:
    path = directory / "config.json"
    path.write_text(
        json.dumps({"proxy": {"port": 3456, "apiKey": "nc-test-key-0123456789"}, "accounts": accounts})
    )
    path.chmod(0o600)
    return path


class ConfigAccountsTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.path = write_config(
            directory,
            [
                {"name": "alice", "type": "oauth", "accessToken": "sk-ant-oat01-a"},
                {"name": "bob", "type": "oauth", "accessToken": "sk-ant-oat01-b"},
            ],
        )
        self.hub = EventHub()
        self.pool = AccountPool(load_config(self.path).accounts, Thresholds())
        self.router = Router(self.pool, lambda: NOW, self.hub)
        self.accounts = ConfigAccounts(self.path, config_reloader(self.path, self.router))

    def test_add_api_key(self) -> None:
        """
        An API key is written to the config file as an apikey account of
        tier API and priority 1 (last resort), and the running pool gets it.
        """
        self.assertEqual(self.accounts.add_api_key("carol", "sk-ant-api03-c"), "carol")
        saved = load_config(self.path).account("carol")
        assert saved is not None
        self.assertEqual((saved.type, saved.api_key, saved.tier, saved.priority), ("apikey", "sk-ant-api03-c", "API", 1))
        self.assertIsNotNone(self.pool.get("carol"))

    def test_import_json(self) -> None:
        """
        Claude Code's credentials JSON becomes an oauth account with its
        tokens, expiry, scopes and tier, in the file and in the pool.
        """
        text = json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": "sk-ant-oat01-d",
                    "refreshToken": "sk-ant-ort01-d",
                    "expiresAt": 1_750_003_600_000,
                    "scopes": ["user:inference"],
                    "subscriptionType": "max",
                }
            }
        )
        self.assertEqual(self.accounts.import_json(text, "dave"), "dave")
        saved = load_config(self.path).account("dave")
        assert saved is not None
        self.assertEqual(
            (saved.type, saved.access_token, saved.refresh_token, saved.expires_at, saved.scopes, saved.tier),
            ("oauth", "sk-ant-oat01-d", "sk-ant-ort01-d", 1_750_003_600_000, ("user:inference",), "Max"),
        )
        self.assertIsNotNone(self.pool.get("dave"))

    def test_bad_input(self) -> None:
        """
        Missing names, keys with spaces, text that is not JSON or not Claude
        Code's credentials are InvalidAccount, and the file is not touched.
        """
        before = self.path.read_bytes()
        for call in [
            lambda: self.accounts.add_api_key("", "sk-ant-api03-c"),
            lambda: self.accounts.add_api_key("carol", "sk ant"),
            lambda: self.accounts.import_json("not json", "x"),
            lambda: self.accounts.import_json('{"other": 1}', "x"),
            lambda: self.accounts.import_json('{"claudeAiOauth": {"accessToken": "t"}}', None),
        ]:
            self.assertRaises(InvalidAccount, call)
        self.assertEqual(self.path.read_bytes(), before)

    def test_remove_pinned(self) -> None:
        """
        Removing the pinned account takes it out of the file and the pool
        and clears the pin; an unknown name is UnknownAccount.
        """
        self.router.pin("alice")
        self.accounts.remove("alice")
        self.assertIsNone(load_config(self.path).account("alice"))
        self.assertIsNone(self.pool.get("alice"))
        self.assertIsNone(self.router.manual)
        self.assertRaises(UnknownAccount, self.accounts.remove, "alice")

    def test_reload(self) -> None:
        """
        Reload applies an edited file: names added and removed, and the
        accounts that stay keep what the pool learned about them.
        """
        bob = self.pool.get("bob")
        assert bob is not None
        bob.usage.requests = 7
        data = json.loads(self.path.read_text())
        data["accounts"] = [data["accounts"][1], {"name": "erin", "type": "apikey", "apiKey": "sk-ant-api03-e"}]
        self.path.write_text(json.dumps(data))
        self.assertEqual(self.accounts.reload(), (["erin"], ["alice"]))
        self.assertIs(self.pool.get("bob"), bob)
        self.assertEqual(bob.usage.requests, 7)


class SocketTests(TestCase):
    """
    ControlService on a real UNIX socket, with the real reactor.
    """

    def setUp(self) -> None:
        # Short: UNIX socket paths must stay under ~100 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="nc-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = self.directory / "control.sock"
        self.proxy = FakeProxy()

    def start(self, path: Path | None = None, **kwargs: Any) -> ControlService:
        service = ControlService(reactor, path or self.path, self.proxy, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def client(self, path: Path | None = None) -> ControlClient:
        client = await connect(reactor, path or self.path)
        self.addCleanup(client.close)
        return client

    def stale_socket(self) -> None:
        leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        leftover.bind(str(self.path))
        leftover.close()

    async def test_serve(self) -> None:
        """
        The service listens on a socket of mode 0600 that answers snapshot,
        pin and subscribe; stopping it removes the socket file and the
        client sees the proxy go.
        """
        service = self.start()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        client = await connect(reactor, self.path)
        self.assertEqual(await client.snapshot(), as_json(self.proxy.status()))
        received: list[dict[str, Any]] = []
        await client.subscribe(received.append)
        await client.pin("bob")
        self.assertEqual(self.proxy.router.manual, "bob")
        await client.snapshot()  # the push was sent before this answer
        self.assertEqual(received[-1]["kind"], events.PIN_CHANGED)
        gone = client.on_disconnect
        await service.stopService()
        await gone
        self.assertFalse(self.path.exists())

    async def test_private_directory(self) -> None:
        """
        A socket directory that does not exist yet is created private
        (0700).
        """
        path = self.directory / "run" / "control.sock"
        self.start(path)
        self.assertEqual(stat.S_IMODE(os.stat(path.parent).st_mode), 0o700)
        client = await self.client(path)
        await client.snapshot()

    async def test_second_proxy_refused(self) -> None:
        """
        A second service on the same socket finds the first answering and
        refuses with AlreadyRunning naming the socket; the first keeps its
        socket and keeps serving.  (The check blocks, so it runs in a
        thread here while the reactor lets the first one answer.)
        """
        self.start()
        second = ControlService(reactor, self.path, FakeProxy())
        error = await self.assertFailure(deferToThread(second.privilegedStartService), AlreadyRunning)
        self.assertEqual(
            str(error),
            f"another NextClaude proxy is already running for this config (control socket {self.path})",
        )
        self.assertIsNone(second.port)
        client = await self.client()
        await client.snapshot()

    async def test_stale_socket_replaced(self) -> None:
        """
        A socket file left behind with nobody listening is removed and
        replaced by the service's own.
        """
        self.stale_socket()
        self.start()
        client = await self.client()
        self.assertEqual((await client.snapshot())["primary"], self.proxy.router.primary)

    def test_silent_listener_refused(self) -> None:
        """
        Something that accepts connections on the socket but never answers
        (a suspended or hung proxy) is not taken over: AlreadyRunning says
        so, and the socket file stays.
        """
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(silent.close)
        silent.bind(str(self.path))
        silent.listen(1)
        service = ControlService(reactor, self.path, self.proxy, probe_timeout=0.2)
        error = self.assertRaises(AlreadyRunning, service.startService)
        self.assertIn("did not answer within 0.2s", str(error))
        self.assertTrue(self.path.exists())

    def test_not_a_socket_left_alone(self) -> None:
        """
        A regular file where the socket should be is never deleted: the
        service refuses with a message naming the path.
        """
        self.path.write_text("precious")
        service = ControlService(reactor, self.path, self.proxy)
        error = self.assertRaises(SocketPathProblem, service.startService)
        self.assertTrue(str(error).startswith(f"{self.path}: exists and is not a socket"))
        self.assertEqual(self.path.read_text(), "precious")

    async def test_connect_missing(self) -> None:
        """
        Connecting where there is no socket raises NotRunning with a message
        naming the path and how to start a proxy.
        """
        error = await self.assertFailure(Deferred.fromCoroutine(connect(reactor, self.path)), NotRunning)
        self.assertEqual(
            str(error),
            f"no NextClaude proxy is running for this config (no control socket at {self.path}); "
            "start one with `nextclaude server`",
        )

    async def test_connect_refused(self) -> None:
        """
        Connecting to a leftover socket nobody listens on raises NotRunning
        too, saying nothing is listening.
        """
        self.stale_socket()
        error = await self.assertFailure(Deferred.fromCoroutine(connect(reactor, self.path)), NotRunning)
        self.assertIn(f"nothing listening on the control socket {self.path}", str(error))

    async def test_read_snapshot_blocking(self) -> None:
        """
        read_snapshot, the blocking client for reactor-less commands, gets
        the same snapshot (here in a thread, while the reactor serves).
        """
        self.start()
        result = await deferToThread(read_snapshot, self.path)
        self.assertEqual(result, as_json(self.proxy.status()))

    def test_read_snapshot_not_running(self) -> None:
        """
        read_snapshot raises NotRunning when there is no socket.
        """
        self.assertRaises(NotRunning, read_snapshot, self.path)

    def test_stop_never_started(self) -> None:
        """
        Stopping a service that never started (the proxy failed to start
        elsewhere) is harmless.
        """
        service = ControlService(reactor, self.path, self.proxy)
        self.successResultOf(service.stopService())

    async def test_add_account_end_to_end(self) -> None:
        """
        Adding an API-key account through the socket with the fallback
        accounts layer writes the config file and puts the account in the
        running router's pool.
        """
        config = write_config(self.directory, [{"name": "alice", "type": "oauth", "accessToken": "sk-ant-oat01-a"}])
        self.proxy.pool.update_accounts(load_config(config).accounts)
        self.proxy.accounts = ConfigAccounts(config, config_reloader(config, self.proxy.router))
        self.start()
        client = await self.client()
        self.assertEqual(await client.add_api_key("carol", "sk-ant-api03-c"), "carol")
        self.assertIsNotNone(self.proxy.pool.get("carol"))
        self.assertEqual(await client.reload(), ([], []))
        with self.assertRaises(UnknownAccount):
            await client.remove("nobody")


# -- the blocking client's failures ---------------------------------------------------


class _RaisingSocket:
    """
    Stands in for socket.socket: the step named in C{failures} raises the
    error given (or, for C{recv}, returns the bytes given).
    """

    def __init__(self, failures: dict[str, Any], *args: Any) -> None:
        self._failures = failures

    def __enter__(self) -> "_RaisingSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass

    def _step(self, name: str) -> Any:
        outcome = self._failures.get(name)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def connect(self, address: str) -> None:
        self._step("connect")

    def sendall(self, data: bytes) -> None:
        self._step("sendall")

    def recv(self, size: int) -> bytes:
        outcome = self._step("recv")
        return b"" if outcome is None else outcome


def _oserror(number: int) -> OSError:
    return OSError(number, os.strerror(number))


class BlockingClientErrorTests(SynchronousTestCase):
    """
    Every socket failure of the blocking client, at every step, becomes a
    ControlError whose message is one line naming the socket.
    """

    path = Path("/tmp/nc-test/control.sock")

    def ask(self, **failures: Any) -> BaseException:
        self.patch(socket, "socket", lambda *args: _RaisingSocket(failures, *args))
        try:
            read_snapshot(self.path, timeout=0.5)
        except BaseException as error:  # noqa: B902 - whatever it is, it is checked below
            return error
        self.fail("read_snapshot did not raise")

    def test_every_oserror_becomes_a_control_error(self) -> None:
        """
        Table: the step that fails and how → the ControlError class.  No
        OSError escapes, and each message is one line naming the socket.
        """
        import errno

        from nextclaude.control import BadAnswer, ControlError, HungUp, NoAnswer, NotAccepting, SocketError

        table: list[tuple[dict[str, Any], type[Exception]]] = [
            ({"connect": FileNotFoundError(errno.ENOENT, "No such file")}, NotRunning),
            ({"connect": ConnectionRefusedError(errno.ECONNREFUSED, "refused")}, NotRunning),
            ({"connect": PermissionError(errno.EACCES, "denied")}, SocketPathProblem),
            ({"connect": BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")}, NotAccepting),
            ({"connect": socket.timeout("timed out")}, NoAnswer),
            ({"connect": _oserror(errno.ENOTSOCK)}, SocketError),
            ({"connect": OSError("AF_UNIX path too long")}, SocketError),
            ({"connect": ConnectionResetError(errno.ECONNRESET, "reset")}, HungUp),
            ({"sendall": BrokenPipeError(errno.EPIPE, "Broken pipe")}, HungUp),
            ({"sendall": ConnectionResetError(errno.ECONNRESET, "reset")}, HungUp),
            ({"sendall": socket.timeout("timed out")}, NoAnswer),
            ({"sendall": BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")}, SocketError),
            ({"sendall": _oserror(errno.EIO)}, SocketError),
            ({"recv": ConnectionResetError(errno.ECONNRESET, "reset")}, HungUp),
            ({"recv": ConnectionAbortedError(errno.ECONNABORTED, "aborted")}, HungUp),
            ({"recv": socket.timeout("timed out")}, NoAnswer),
            ({"recv": _oserror(errno.EIO)}, SocketError),
            ({"recv": b""}, HungUp),
            ({"recv": b"HTTP/1.1 400 Bad Request\r\n\r\n"}, BadAnswer),
            ({"recv": amp.AmpBox({b"_answer": b"1"}).serialize()}, BadAnswer),
            ({"recv": amp.AmpBox({b"_answer": b"1", b"snapshot.0": b"{not json"}).serialize()}, BadAnswer),
            ({"recv": amp.AmpBox({b"_ask": b"9", b"_command": b"Snapshot"}).serialize()}, BadAnswer),
        ]
        for failures, expected in table:
            error = self.ask(**failures)
            self.assertIsInstance(error, ControlError, failures)
            self.assertIsInstance(error, expected, failures)
            message = str(error)
            self.assertNotIn("\n", message, failures)
            self.assertIn(str(self.path), message, failures)

    def test_socket_that_cannot_be_made(self) -> None:
        """
        Even creating the socket failing (out of descriptors) is a
        SocketError with the system's words.
        """
        import errno

        from nextclaude.control import SocketError

        def no_descriptors(*args: Any) -> Any:
            raise _oserror(errno.EMFILE)

        self.patch(socket, "socket", no_descriptors)
        error = self.assertRaises(SocketError, read_snapshot, self.path)
        self.assertIn("Too many open files", str(error))


class ControlPeer:
    """
    A plain UNIX socket server for the blocking client to meet, in a thread
    of its own (the client blocks the test's thread).  C{behaviour} gets the
    accepted connection; the server then closes it.
    """

    def __init__(self, test: SynchronousTestCase, path: Path, behaviour: Callable[[socket.socket], None]) -> None:
        import threading

        self.listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listening.bind(str(path))
        self.listening.listen(1)
        self._behaviour = behaviour
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        test.addCleanup(self.close)

    def _serve(self) -> None:
        try:
            connection, _ = self.listening.accept()
        except OSError:
            return  # closed by the cleanup: the client never came
        with connection:
            try:
                self._behaviour(connection)
            except OSError:
                pass

    def close(self) -> None:
        # shutdown() wakes an accept() that is still waiting; then join.
        try:
            self.listening.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join()
        self.listening.close()


def hang_up_at_once(connection: socket.socket) -> None:
    """Accept and close without reading a byte."""


def hang_up_after_request(connection: socket.socket) -> None:
    """Read the command, then close without answering."""
    connection.recv(4096)


def answer_garbage(connection: socket.socket) -> None:
    """Read the command, answer with bytes that are no AMP box, wait for the client to go."""
    connection.recv(4096)
    connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    while connection.recv(4096):
        pass


def full_queue(test: SynchronousTestCase, path: Path) -> None:
    """
    A listener that never accepts, its accept queue full: listen(0) holds
    one pending connection on Linux, so every further connect() fails with
    EAGAIN (the BlockingIOError a busy or hung proxy gives).
    """
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    test.addCleanup(listening.close)
    listening.bind(str(path))
    listening.listen(0)
    while True:
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        test.addCleanup(waiting.close)
        waiting.setblocking(False)
        try:
            waiting.connect(str(path))
        except BlockingIOError:
            return


def short_socket_path(test: SynchronousTestCase) -> Path:
    # UNIX socket paths must stay under ~100 bytes: not under _trial_temp.
    directory = Path(tempfile.mkdtemp(prefix="nc-", dir="/tmp"))
    test.addCleanup(shutil.rmtree, directory, True)
    return directory / "control.sock"


class BlockingClientSocketTests(SynchronousTestCase):
    """
    The blocking client against real UNIX sockets that misbehave.
    """

    def setUp(self) -> None:
        self.path = short_socket_path(self)

    def test_hang_up_at_once(self) -> None:
        """
        A process that accepts and closes at once: HungUp, whichever step
        (send or receive) saw it.
        """
        from nextclaude.control import HungUp

        ControlPeer(self, self.path, hang_up_at_once)
        error = self.assertRaises(HungUp, read_snapshot, self.path)
        self.assertIn("closed the connection before answering", str(error))

    def test_hang_up_after_request(self) -> None:
        """
        A process that reads the command and closes without answering:
        HungUp, not a wait for the timeout.
        """
        from nextclaude.control import HungUp

        ControlPeer(self, self.path, hang_up_after_request)
        self.assertRaises(HungUp, read_snapshot, self.path)

    def test_garbage(self) -> None:
        """
        A process that answers with something that is not AMP: BadAnswer.
        """
        from nextclaude.control import BadAnswer

        ControlPeer(self, self.path, answer_garbage)
        error = self.assertRaises(BadAnswer, read_snapshot, self.path)
        self.assertIn("did not answer like a NextClaude proxy", str(error))

    def test_queue_full(self) -> None:
        """
        A listener whose accept queue is full (it never accepts): connect()
        fails with EAGAIN at once, reported as NotAccepting.
        """
        from nextclaude.control import NotAccepting

        full_queue(self, self.path)
        error = self.assertRaises(NotAccepting, read_snapshot, self.path)
        self.assertIn("not accepting connections", str(error))

    def test_start_up_check_refuses_a_foreign_listener(self) -> None:
        """
        The proxy's start-up check does not take over a socket whose
        listener hangs up, answers garbage or has a full queue: each is
        AlreadyRunning with one line saying what it saw, and the socket
        file stays.
        """
        from nextclaude.control import claim_socket_path

        for behaviour, seen in ((hang_up_at_once, "closed the connection"), (answer_garbage, "did not answer like")):
            path = short_socket_path(self)
            ControlPeer(self, path, behaviour)
            error = self.assertRaises(AlreadyRunning, claim_socket_path, path)
            self.assertIn(seen, str(error))
            self.assertNotIn("\n", str(error))
            self.assertTrue(path.exists())
        full_queue(self, self.path)
        error = self.assertRaises(AlreadyRunning, claim_socket_path, self.path)
        self.assertIn("not accepting connections", str(error))
