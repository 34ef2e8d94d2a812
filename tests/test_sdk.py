"""
End-to-end tests with the official C{anthropic} SDK as the client: the SDK
talks to the real proxy on loopback, which relays to the simulated Anthropic
API on loopback.  The SDK is blocking, so each call runs in a thread.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import anthropic
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from zope.interface import directlyProvides, providedBy

from nextclaude import events
from nextclaude.events import Event
from nextclaude.service import ProxyService
from nextclaude.simulate import (
    SimulatedAnthropic,
    analyse_prompt,
    listen_simulator,
    simulated_accounts,
    stop_simulator,
)
from tests.support import PROXY_KEY, auth, client, start_proxy, write_config

T = TypeVar("T")

MODEL = "claude-sonnet-4-5-20250929"

# Big enough that the cached prefix is a clear, non-zero number of tokens.
SYSTEM = [
    {
        "type": "text",
        "text": "You are a careful engineer. " + " ".join(f"Rule {n}: test what you change." for n in range(60)),
        "cache_control": {"type": "ephemeral", "ttl": "1h"},
    }
]

SESSION = {"x-claude-code-session-id": "5b0c7a52-0000-4000-8000-00000000sdk1"}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


class _ConnectionTracker(WrappingFactory):
    """
    Remembers the server side of every connection to a listening port, so a
    test can close the ones a keep-alive client (the SDK) left open and
    wait until they are gone.
    """

    noisy = False

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def close_connections(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()
        return waiter


class TrackingReactor:
    """
    The real reactor, except that every port the proxy listens on tracks
    its connections (see L{_ConnectionTracker}).
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self._trackers: list[_ConnectionTracker] = []
        directlyProvides(self, *list(providedBy(real)))

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> IListeningPort:
        tracker = _ConnectionTracker(factory)
        self._trackers.append(tracker)
        return self._real.listenTCP(port, tracker, backlog, interface)

    def close_connections(self) -> Deferred[Any]:
        return gatherResults([tracker.close_connections() for tracker in self._trackers])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class SDKThroughProxyTests(TestCase):
    """
    Two simulated subscription accounts behind the proxy; the SDK presents
    only the proxy key.
    """

    def setUp(self) -> None:
        self.sim = SimulatedAnthropic(reactor, simulated_accounts(2, five_hour_tokens=1_000_000))
        sim_port = listen_simulator(reactor, self.sim)
        # Cleanups run last-first: proxy, then its leftover connections,
        # then the simulator.
        self.addCleanup(stop_simulator, sim_port)
        tracking = TrackingReactor(reactor)
        self.addCleanup(tracking.close_connections)
        config_path = write_config(
            self,
            sim_port.getHost().port,
            accounts=[
                {"name": account.name, "type": "oauth", "accessToken": account.credential}
                for account in self.sim.accounts
            ],
        )
        self.config_path = config_path
        self.service: ProxyService
        self.service, self.url = start_proxy(self, config_path, tracking)
        self.events: list[Event] = []
        self.service.hub.subscribe(self.events.append)

    def sdk(self, work: Callable[[anthropic.Anthropic], T], api_key: str = PROXY_KEY) -> Deferred[T]:
        """
        Run C{work(client)} in a thread with an SDK client pointed at the
        proxy; the client is closed before the Deferred fires.
        """

        def run() -> T:
            # The timeout only keeps a hung proxy from hanging the test run.
            sdk_client = anthropic.Anthropic(base_url=self.url, api_key=api_key, max_retries=0, timeout=60.0)
            try:
                return work(sdk_client)
            finally:
                sdk_client.close()

        return deferToThread(run)

    async def status(self) -> dict[str, Any]:
        response = await client(self).get(self.url + "/nextclaude/status", headers=auth())
        self.assertEqual(response.code, 200)
        return await response.json()

    def switches(self) -> list[tuple[str, str, str]]:
        return [
            (event.data["previous"], event.data["account"], event.data["reason"])
            for event in self.events
            if event.kind == events.SWITCHED
        ]

    async def test_create_returns_text_and_usage(self) -> None:
        """
        A non-streaming messages.create through the proxy returns the
        simulator's text and its usage, cache fields included, and the
        request was served by the first account.
        """
        message = await self.sdk(
            lambda c: c.messages.create(
                model=MODEL, max_tokens=256, system=SYSTEM, messages=[user("hello")], extra_headers=SESSION
            )
        )
        self.assertEqual(message.type, "message")
        self.assertEqual(message.stop_reason, "end_turn")
        self.assertTrue(message.content[0].text.strip())
        self.assertEqual(message.usage.output_tokens, self.sim.deltas * self.sim.output_tokens_per_delta)
        self.assertGreater(message.usage.input_tokens, 0)
        self.assertGreater(message.usage.cache_creation_input_tokens, 0)
        self.assertEqual(message.usage.cache_read_input_tokens, 0)
        first = self.sim.account("sim-1")
        self.assertEqual((first.requests, self.sim.account("sim-2").requests), (1, 0))
        self.assertEqual(first.cache_creation_tokens, message.usage.cache_creation_input_tokens)

    async def test_stream_yields_deltas_and_final_usage(self) -> None:
        """
        messages.stream through the proxy yields every text delta the
        simulator sent, and the final message carries the text and the
        usage with its cache fields (1 h cache writes, as requested).
        """

        def stream(c: anthropic.Anthropic) -> tuple[list[str], Any]:
            with c.messages.stream(
                model=MODEL, max_tokens=256, system=SYSTEM, messages=[user("stream please")], extra_headers=SESSION
            ) as events_:
                pieces = list(events_.text_stream)
                return pieces, events_.get_final_message()

        pieces, final = await self.sdk(stream)
        self.assertEqual(len(pieces), self.sim.deltas)
        self.assertEqual("".join(pieces), final.content[0].text)
        self.assertEqual(final.stop_reason, "end_turn")
        usage = final.usage
        self.assertEqual(usage.output_tokens, self.sim.deltas * self.sim.output_tokens_per_delta)
        self.assertGreater(usage.input_tokens, 0)
        self.assertGreater(usage.cache_creation_input_tokens, 0)
        self.assertEqual(usage.cache_read_input_tokens, 0)
        self.assertEqual(usage.cache_creation.ephemeral_1h_input_tokens, usage.cache_creation_input_tokens)
        self.assertEqual(self.sim.account("sim-1").cache_creation_tokens, usage.cache_creation_input_tokens)

    async def test_status_shows_requests_and_tokens(self) -> None:
        """
        After one non-streaming and one streaming request, the status
        endpoint shows two requests on the account that served them, token
        totals equal to what the SDK reported, the account's 5 h
        utilization from the rate-limit headers, and no credential.  The
        primary (where a new session would go) is flagged as such.
        """

        def two_requests(c: anthropic.Anthropic) -> list[Any]:
            one = c.messages.create(model=MODEL, max_tokens=256, system=SYSTEM, messages=[user("one")])
            with c.messages.stream(model=MODEL, max_tokens=256, system=SYSTEM, messages=[user("two")]) as s:
                s.until_done()
                two = s.get_final_message()
            return [one.usage, two.usage]

        usages = await self.sdk(two_requests)
        status = await self.status()
        expected = {
            "requests": 2,
            "failures": 0,
            "inputTokens": sum(u.input_tokens for u in usages),
            "outputTokens": sum(u.output_tokens for u in usages),
            "cacheReadTokens": sum(u.cache_read_input_tokens for u in usages),
            "cacheCreationTokens": sum(u.cache_creation_input_tokens for u in usages),
        }
        first, second = status["accounts"]
        self.assertEqual((first["name"], first["status"]), ("sim-1", "active"))
        flagged = [account["name"] for account in status["accounts"] if "primary" in account["flags"]]
        self.assertEqual(flagged, [status["primary"]])
        self.assertEqual({key: first["usage"][key] for key in expected}, expected)
        self.assertEqual(second["usage"]["requests"], 0)
        self.assertEqual({key: status["totals"][key] for key in expected}, expected)
        sim_first = self.sim.account("sim-1")
        self.assertAlmostEqual(
            first["windows"]["5h"]["utilization"], sim_first.used_5h / sim_first.five_hour_tokens, places=4
        )
        text = json.dumps(status)
        for account in self.sim.accounts:
            self.assertNotIn(account.credential, text)
        self.assertNotIn(PROXY_KEY, text)

    async def test_growing_conversation_reads_cache(self) -> None:
        """
        Each turn of a growing conversation reads from the prompt cache what
        the turns before it wrote, because every turn is served by the same
        account: turn 2 reads turn 1's write, turn 3 reads both.
        """

        def conversation(c: anthropic.Anthropic) -> list[Any]:
            messages: list[dict[str, Any]] = []
            usages = []
            for turn in range(1, 4):
                messages.append(user(f"turn {turn}: " + "explain this module. " * 20))
                reply = c.messages.create(
                    model=MODEL, max_tokens=256, system=SYSTEM, messages=messages, extra_headers=SESSION
                )
                messages.append({"role": "assistant", "content": reply.content[0].text})
                usages.append(reply.usage)
            return usages

        one, two, three = await self.sdk(conversation)
        self.assertEqual(one.cache_read_input_tokens, 0)
        self.assertGreater(one.cache_creation_input_tokens, 0)
        self.assertGreater(two.cache_read_input_tokens, 0)
        self.assertEqual(two.cache_read_input_tokens, one.cache_creation_input_tokens)
        self.assertEqual(
            three.cache_read_input_tokens, two.cache_read_input_tokens + two.cache_creation_input_tokens
        )
        self.assertEqual(self.sim.account("sim-1").requests, 3)
        self.assertEqual(self.sim.account("sim-2").requests, 0)
        self.assertEqual(self.switches(), [])

    async def test_exhausted_first_account_is_retried_on_second(self) -> None:
        """
        When the first account's tiny 5 h quota is already used up, its
        quota 429 never reaches the SDK: the proxy retries the request on
        the second account, which becomes the primary (reason quota-429),
        and status shows the first one exhausted.
        """
        first = self.sim.account("sim-1")
        first.five_hour_tokens = 10
        # Used up by traffic the proxy never saw (another machine, say).
        first.burn(10, reactor.seconds())
        message = await self.sdk(
            lambda c: c.messages.create(model=MODEL, max_tokens=256, messages=[user("hello")], extra_headers=SESSION)
        )
        self.assertTrue(message.content[0].text.strip())
        self.assertEqual(first.rejected, 1)
        self.assertEqual(self.sim.account("sim-2").requests, 1)
        self.assertEqual(self.switches(), [("sim-1", "sim-2", "quota-429")])
        status = await self.status()
        self.assertEqual(status["primary"], "sim-2")
        by_name = {account["name"]: account for account in status["accounts"]}
        self.assertEqual(by_name["sim-1"]["status"], "exhausted")
        self.assertEqual(by_name["sim-1"]["flags"], [])
        # sim-2 took over from sim-1; no session is left to move, so no
        # account is the successor (where the next move goes).
        self.assertEqual(by_name["sim-2"]["flags"], ["primary"])
        self.assertEqual(by_name["sim-2"]["usage"]["requests"], 1)

    async def test_account_at_ceiling_is_not_asked_again(self) -> None:
        """
        When a response's rate-limit headers show the first account's tiny
        5 h window is full, the next request goes straight to the second
        account (reason ceiling): the first account never answers a 429.
        """
        first = self.sim.account("sim-1")
        first.five_hour_tokens = 10

        def two_requests(c: anthropic.Anthropic) -> list[Any]:
            return [
                c.messages.create(model=MODEL, max_tokens=256, messages=[user(text)], extra_headers=SESSION)
                for text in ("fills the first account", "goes to the second")
            ]

        replies = await self.sdk(two_requests)
        self.assertEqual(len(replies), 2)
        self.assertEqual((first.requests, first.rejected), (1, 0))
        self.assertEqual(self.sim.account("sim-2").requests, 1)
        self.assertEqual(self.switches(), [("sim-1", "sim-2", "ceiling")])
        self.assertEqual([e.data["account"] for e in self.events if e.kind == events.EXHAUSTED], ["sim-1"])
        self.assertEqual((await self.status())["primary"], "sim-2")

    async def test_count_tokens_passes_through(self) -> None:
        """
        messages.count_tokens is relayed to the upstream (with the
        account's credentials) and its answer comes back unchanged; it
        burns no quota.
        """
        messages = [user("how many tokens is this?")]
        counted = await self.sdk(
            lambda c: c.messages.count_tokens(model=MODEL, system=SYSTEM, messages=messages)
        )
        expected = analyse_prompt({"model": MODEL, "system": SYSTEM, "messages": messages}).total_tokens
        self.assertEqual(counted.input_tokens, expected)
        self.assertEqual(self.sim.requests, 1)
        self.assertEqual(self.sim.responses[200], 1)
        self.assertEqual(self.sim.account("sim-1").used_5h, 0)
        totals = (await self.status())["totals"]
        self.assertEqual((totals["inputTokens"], totals["outputTokens"]), (0, 0))

    async def test_wrong_proxy_key_is_refused(self) -> None:
        """
        An SDK client presenting a key other than the proxy's gets the
        SDK's AuthenticationError, and nothing reaches the upstream.
        """

        def call(c: anthropic.Anthropic) -> anthropic.AuthenticationError:
            try:
                c.messages.create(model=MODEL, max_tokens=16, messages=[user("hi")])
            except anthropic.AuthenticationError as error:
                return error
            raise AssertionError("the proxy accepted a wrong key")

        error = await self.sdk(call, api_key="nc-not-the-proxy-key")
        self.assertEqual(error.status_code, 401)
        self.assertEqual(error.body["error"]["type"], "authentication_error")
        self.assertEqual(self.sim.requests, 0)
