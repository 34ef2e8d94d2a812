"""
End-to-end tests of what the client hears when accounts cannot serve
(issue 10, items 6 and 7; DESIGN.md routing point 10): dead credentials are
a 401 naming each account's cause and fix, never a quota 429 to wait out,
and a 429 is handled by what it says.  Real proxy, real fake upstream and
token endpoint on loopback port 0, a real HTTP client; waits run on a clock
the test moves once it sees the proxy waiting.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from nextclaude.simulate import VirtualTimeReactor
from tests.fake_oauth import AUTHORIZE_PATH, PROFILE_PATH, TOKEN_PATH, USAGE_PATH, FakeOAuthServer, serve
from tests.support import FakeUpstream, Seen, auth, client, json_reply, listen, start_proxy, write_config

NOW = 1_750_000_000.0
U = "anthropic-ratelimit-unified-"
SESSION = "5f0c7a52-8d1e-4b7a-9f3e-2c6d1a0b9e47"
BODY = json.dumps(
    {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64}
).encode()

ALICE = {"name": "alice", "type": "oauth", "accessToken": "sk-ant-oat01-alice"}
BOB = {"name": "bob", "type": "oauth", "accessToken": "sk-ant-oat01-bob"}
CAROL = {"name": "carol", "type": "oauth", "accessToken": "sk-ant-oat01-carol"}
WORK_KEY = {"name": "work-key", "type": "apikey", "apiKey": "sk-ant-api03-revoked"}

ALLOWED = {
    U + "status": "allowed",
    U + "5h-status": "allowed",
    U + "5h-utilization": "0.3",
    U + "5h-reset": str(int(NOW + 4 * 3600)),
    U + "7d-status": "allowed",
    U + "7d-utilization": "0.2",
    U + "7d-reset": str(int(NOW + 3 * 86400)),
}


def who(seen: Seen) -> str:
    """The account a request upstream was sent with."""
    for account in (ALICE, BOB, CAROL):
        if seen.headers.get(b"authorization") == [b"Bearer " + account["accessToken"].encode()]:
            return account["name"]
    if seen.headers.get(b"x-api-key") == [WORK_KEY["apiKey"].encode()]:
        return "work-key"
    return "?"


def ok(seen: Seen) -> bytes:
    return json_reply(
        seen.request,
        200,
        {"id": "msg_1", "type": "message", "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}},
        ALLOWED,
    )


def error(seen: Seen, code: int, kind: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    return json_reply(seen.request, code, {"type": "error", "error": {"type": kind, "message": message}}, headers)


def unauthorized(seen: Seen) -> bytes:
    return error(seen, 401, "authentication_error", "invalid x-api-key")


class WatchedClock(Clock):
    """
    A clock that tells the test when the proxy starts a wait of a given
    length, so the test moves time only once someone waits on it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watches: list[tuple[float, Deferred[IDelayedCall]]] = []

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall:
        call = super().callLater(delay, f, *args, **kw)
        for watch in list(self._watches):
            if watch[0] == delay:
                self._watches.remove(watch)
                watch[1].callback(call)
        return call

    def wait_of(self, delay: float) -> Deferred[IDelayedCall]:
        waiter: Deferred[IDelayedCall] = Deferred()
        self._watches.append((delay, waiter))
        return waiter


def virtual(test: TestCase) -> tuple[WatchedClock, VirtualTimeReactor]:
    clock = WatchedClock()
    clock.advance(NOW)
    return clock, VirtualTimeReactor(reactor, clock)


def post(test: TestCase, url: str) -> Deferred[Any]:
    """One request of the session through the proxy, sent at once."""
    return client(test).post(url + "/v1/messages", data=BODY, headers=auth({"x-claude-code-session-id": SESSION}))


class DeadCredentialTests(TestCase):
    """Item 6: every credential dead is a 401, not a quota 429."""

    async def test_dead_api_key_gets_401_not_quota_429(self) -> None:
        """
        One API key the upstream rejects with 401: the client gets a 401
        authentication_error naming the key, its cause and its fix, with no
        retry-after and no usage-limit headers; the next request is told
        the same at once, without reaching the upstream.
        """
        upstream = FakeUpstream(unauthorized)
        service, url = start_proxy(self, write_config(self, listen(self, upstream), accounts=[WORK_KEY]))
        expected = (
            "NextClaude: no account can serve: every account's credential is dead. "
            "work-key (API key): the API key was rejected (401 authentication_error); "
            "fix: put a working key in work-key's apiKey in the NextClaude config file. "
            "A running proxy picks up the fix within seconds."
        )
        for _ in range(2):
            response = await post(self, url)
            self.assertEqual(response.code, 401)
            self.assertEqual(
                await response.json(), {"type": "error", "error": {"type": "authentication_error", "message": expected}}
            )
            self.assertIsNone(response.headers.getRawHeaders(b"retry-after"))
            self.assertIsNone(response.headers.getRawHeaders(U.encode() + b"status"))
        self.assertEqual(len(upstream.seen), 1)
        self.assertEqual(service.status()["accounts"][0]["status"], "error")

    async def test_oauth_invalid_grant_gets_401_naming_login(self) -> None:
        """
        An OAuth account whose token is rejected and whose refresh gets
        invalid_grant: one request upstream, one refresh, and the client
        gets a 401 naming the account, the invalid_grant cause and
        `nextclaude login --name alice`.
        """
        fake = FakeOAuthServer()
        port, base = serve(fake, reactor)
        self.addCleanup(port.stopListening)
        oauth = {
            "authorizeUrl": base + AUTHORIZE_PATH,
            "tokenUrl": base + TOKEN_PATH,
            "profileUrl": base + PROFILE_PATH,
            "usageUrl": base + USAGE_PATH,
        }
        alice = {**ALICE, "refreshToken": "sk-ant-ort01-spent-elsewhere"}
        upstream = FakeUpstream(unauthorized)
        config = write_config(self, listen(self, upstream), accounts=[alice], oauth=oauth)
        service, url = start_proxy(self, config)
        response = await post(self, url)
        self.assertEqual(response.code, 401)
        body = await response.json()
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertEqual(
            body["error"]["message"],
            "NextClaude: no account can serve: every account's credential is dead. "
            "alice (subscription): the OAuth grant is no longer valid (the token endpoint refused the grant "
            "(invalid_grant: Refresh token not found or invalid)); fix: run `nextclaude login --name alice`. "
            "A running proxy picks up the fix within seconds.",
        )
        self.assertEqual(len(upstream.seen), 1)
        self.assertEqual(len(fake.token_requests("refresh_token")), 1)

    async def test_out_of_quota_and_dead_gets_quota_429_naming_the_dead(self) -> None:
        """
        One account out of quota, the other's key dead: the quota 429 with
        retry-after from the soonest reset (capped at retryAfterCap), the
        rejected unified status and reset, and a message that names the
        dead key with its fix.
        """
        reset = int(NOW + 2 * 3600)

        def handler(seen: Seen) -> bytes:
            if who(seen) == "alice":
                spent = {U + "status": "rejected", U + "5h-status": "rejected", U + "5h-utilization": "1.0"}
                spent[U + "5h-reset"] = spent[U + "reset"] = str(reset)
                return error(seen, 429, "rate_limit_error", "limit", spent)
            return unauthorized(seen)

        upstream = FakeUpstream(handler)
        clock, virtual_reactor = virtual(self)
        config = write_config(self, listen(self, upstream), accounts=[ALICE, WORK_KEY])
        service, url = start_proxy(self, config, virtual_reactor)
        response = await post(self, url)
        self.assertEqual(response.code, 429)
        self.assertEqual([who(seen) for seen in upstream.seen], ["alice", "work-key"])
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"55"])
        self.assertEqual(response.headers.getRawHeaders(U.encode() + b"status"), [b"rejected"])
        self.assertEqual(response.headers.getRawHeaders(U.encode() + b"reset"), [str(reset).encode()])
        # No claim: Claude Code would show its own usage-limit notice in
        # place of this message, and the dead key would go unmentioned.
        self.assertIsNone(response.headers.getRawHeaders(U.encode() + b"representative-claim"))
        self.assertEqual(response.phrase, b"Too Many Requests")
        body = await response.json()
        self.assertEqual(body["error"]["type"], "rate_limit_error")
        self.assertEqual(
            body["error"]["message"],
            "NextClaude: no account can serve right now; retry in 55 s. Out of quota: alice (back in 2h). "
            "Dead credentials: work-key (API key): the API key was rejected (401 authentication_error); "
            "fix: put a working key in work-key's apiKey in the NextClaude config file.",
        )


    async def test_all_out_of_quota_names_the_blocking_window(self) -> None:
        """
        Every account out of quota and none dead: the synthetic 429 carries
        a representative claim, so Claude Code shows its usage-limit notice
        with the reset: the window of the account back soonest, C{seven_day}
        when a weekly window keeps it out, else C{five_hour}.
        """
        cases = [
            ({"alice": "5h", "bob": "7d"}, b"five_hour"),
            ({"alice": "7d", "bob": "7d"}, b"seven_day"),
            ({"alice": "7d", "bob": "5h"}, b"five_hour"),
        ]
        for spent_windows, claim in cases:
            resets = {"5h": int(NOW + 2 * 3600), "7d": int(NOW + 3 * 86400)}

            def handler(seen: Seen) -> bytes:
                window = spent_windows[who(seen)]
                spent = {U + "status": "rejected", U + f"{window}-status": "rejected", U + f"{window}-utilization": "1.0"}
                spent[U + f"{window}-reset"] = spent[U + "reset"] = str(resets[window])
                return error(seen, 429, "rate_limit_error", "limit", spent)

            upstream = FakeUpstream(handler)
            clock, virtual_reactor = virtual(self)
            config = write_config(self, listen(self, upstream), accounts=[ALICE, BOB])
            service, url = start_proxy(self, config, virtual_reactor)
            response = await post(self, url)
            self.assertEqual(response.code, 429)
            self.assertEqual(response.headers.getRawHeaders(U.encode() + b"representative-claim"), [claim], spent_windows)
            self.assertEqual(response.headers.getRawHeaders(U.encode() + b"status"), [b"rejected"])
            await response.content()
            await service.stopService()


class TooManyRequestsTests(TestCase):
    """Item 7: a 429 is handled by what it says."""

    async def test_request_scoped_429_is_relayed_untouched(self) -> None:
        """
        The peer's report: a bare 429 for one request (no retry-after, no
        rejection).  The proxy tries alice three times, 2 s apart, never
        bob or carol, and relays alice's 429 byte for byte with its headers
        (no synthetic 429); every account stays active and the session's
        next request goes to alice.
        """
        refusal = {"type": "error", "error": {"type": "rate_limit_error", "message": "This request would exceed your rate limit."}}
        answers = {"alice": "429"}

        def handler(seen: Seen) -> bytes:
            if who(seen) == "alice" and answers["alice"] == "429":
                return json_reply(seen.request, 429, refusal, {"x-should-retry": "true", "request-id": "req_011CBare"})
            return ok(seen)

        upstream = FakeUpstream(handler)
        clock, virtual_reactor = virtual(self)
        config = write_config(self, listen(self, upstream), accounts=[ALICE, BOB, CAROL])
        service, url = start_proxy(self, config, virtual_reactor)
        pending = post(self, url)
        for _ in range(2):
            await clock.wait_of(2.0)
            clock.advance(2.0)
        response = await pending
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(await response.content()), refusal)
        self.assertEqual(response.headers.getRawHeaders(b"x-should-retry"), [b"true"])
        self.assertEqual(response.headers.getRawHeaders(b"request-id"), [b"req_011CBare"])
        self.assertIsNone(response.headers.getRawHeaders(b"retry-after"))
        self.assertIsNone(response.headers.getRawHeaders(U.encode() + b"status"))
        self.assertEqual([who(seen) for seen in upstream.seen], ["alice"] * 3)
        self.assertEqual([account["status"] for account in service.status()["accounts"]], ["active"] * 3)

        answers["alice"] = "ok"
        response = await post(self, url)
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(who(upstream.seen[-1]), "alice")

    async def test_per_minute_limit_fails_over_to_an_idle_sibling(self) -> None:
        """
        A per-minute limit (retry-after 60, status allowed): the proxy waits
        10 s twice on alice, then throttles her until her retry-after and
        bob serves the request; the session's next request stays on bob.
        """

        def handler(seen: Seen) -> bytes:
            if who(seen) == "alice":
                return error(seen, 429, "rate_limit_error", "per-minute limit", {**ALLOWED, "retry-after": "60"})
            return ok(seen)

        upstream = FakeUpstream(handler)
        clock, virtual_reactor = virtual(self)
        config = write_config(self, listen(self, upstream), accounts=[ALICE, BOB])
        service, url = start_proxy(self, config, virtual_reactor)
        pending = post(self, url)
        for _ in range(2):
            await clock.wait_of(10.0)
            clock.advance(10.0)
        response = await pending
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual([who(seen) for seen in upstream.seen], ["alice", "alice", "alice", "bob"])
        alice = service.status()["accounts"][0]
        self.assertEqual(alice["status"], "throttled")
        response = await post(self, url)
        await response.content()
        self.assertEqual(who(upstream.seen[-1]), "bob")
