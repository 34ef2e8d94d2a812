"""
Tests for nextclaude.oauth: PKCE, the authorize URL, the token, profile and
usage calls against the fake OAuth server, and the login flows (loopback
callback over real HTTP, pasted URL / code, manual code#state, timeout).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

import treq
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from nextclaude import oauth
from nextclaude.oauth import (
    LOOPBACK_CALLBACK,
    MANUAL_REDIRECT,
    SUCCESS_URL,
    OAuthClient,
    OAuthError,
    Profile,
    TokenSet,
    authorize_url,
    new_pkce,
    new_state,
    parse_pasted,
    parse_usage,
    tier_of,
)
from nextclaude.quota import WindowQuota
from tests.fake_oauth import PROFILE_PATH, USAGE_PATH, FakeOAuthServer, serve

NOW = 1_900_000_000.0


def stub_client(fake: FakeOAuthServer, clock: Clock) -> tuple[OAuthClient, StubTreq]:
    stub = StubTreq(fake)
    return OAuthClient(clock, fake.settings(), http=stub), stub


class PKCETests(SynchronousTestCase):
    def test_verifier_and_challenge(self) -> None:
        """The verifier is 32 random bytes in unpadded base64url and the challenge is its S256."""
        verifier, challenge = new_pkce()
        self.assertEqual(len(base64.urlsafe_b64decode(verifier + "=")), 32)
        self.assertNotIn("=", verifier + challenge)
        expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        self.assertEqual(challenge, expected)

    def test_random(self) -> None:
        """Verifiers and states never repeat."""
        self.assertEqual(len({new_pkce()[0] for _ in range(50)}), 50)
        self.assertEqual(len({new_state() for _ in range(50)}), 50)

    def test_authorize_url(self) -> None:
        """The authorize URL carries code=true, the client id, the redirect, the scopes, the S256 challenge and the state."""
        settings = FakeOAuthServer().settings("https://claude.example")
        url = authorize_url(settings, "http://localhost:5555/callback", "CHAL", "STATE")
        parts = urlsplit(url)
        self.assertEqual(f"{parts.scheme}://{parts.netloc}{parts.path}", "https://claude.example/oauth/authorize")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.assertEqual(
            query,
            {
                "code": "true",
                "client_id": settings.client_id,
                "response_type": "code",
                "redirect_uri": "http://localhost:5555/callback",
                "scope": "org:create_api_key user:profile user:inference user:sessions:claude_code "
                "user:mcp_servers user:file_upload",
                "code_challenge": "CHAL",
                "code_challenge_method": "S256",
                "state": "STATE",
            },
        )

    def test_constants(self) -> None:
        """The redirect and success addresses are PROTOCOL.md's."""
        self.assertEqual(LOOPBACK_CALLBACK.format(port=1234), "http://localhost:1234/callback")
        self.assertEqual(SUCCESS_URL, "https://platform.claude.com/oauth/code/success?app=claude-code")
        self.assertEqual(MANUAL_REDIRECT, "https://platform.claude.com/oauth/code/callback")

    def test_token_set_repr_hides_tokens(self) -> None:
        """A TokenSet's repr shows neither token."""
        tokens = TokenSet("sk-ant-oat01-secretA", "sk-ant-ort01-secretR", 1, ("user:inference",))
        self.assertNotIn("secretA", repr(tokens))
        self.assertNotIn("secretR", repr(tokens))

    def test_account_fields(self) -> None:
        """A pair becomes the config's camelCase keys; no scopes means the file's stay."""
        tokens = TokenSet("a", "r", 1_900_000_000_000, ())
        self.assertEqual(tokens.account_fields(), {"accessToken": "a", "refreshToken": "r", "expiresAt": 1_900_000_000_000})
        self.assertEqual(TokenSet("a", "r", None, ("x",)).account_fields()["scopes"], ["x"])


class ParsingTests(SynchronousTestCase):
    def test_usage_mapping(self) -> None:
        """Usage windows get the header names, percent becomes a fraction and ISO times epoch seconds."""
        windows = parse_usage(
            {
                "five_hour": {"utilization": 43.0, "resets_at": "2030-01-01T05:00:00+00:00"},
                "seven_day": {"utilization": 7, "resets_at": "2030-01-07T00:00:00.500Z"},
                "seven_day_opus": {"utilization": 100, "resets_at": "2030-01-07T00:00:00"},
                "seven_day_sonnet": {"utilization": 1.5, "resets_at": None},
                "seven_day_oauth_apps": {"utilization": 12, "resets_at": "2030-01-02T00:00:00+02:00"},
            }
        )
        self.assertEqual(
            windows,
            {
                "5h": WindowQuota(utilization=0.43, reset=1893474000.0),
                "7d": WindowQuota(utilization=0.07, reset=1893974400.5),
                "7d_opus": WindowQuota(utilization=1.0, reset=1893974400.0),
                "7d_sonnet": WindowQuota(utilization=0.015, reset=None),
                "seven_day_oauth_apps": WindowQuota(utilization=0.12, reset=1893535200.0),
            },
        )

    def test_usage_malformed_entries_skipped(self) -> None:
        """Nulls, non-objects, non-numeric or negative utilization, bad dates and entries without resets_at are skipped."""
        windows = parse_usage(
            {
                "five_hour": None,
                "seven_day": {"utilization": "lots", "resets_at": "2030-01-01T00:00:00Z"},
                "seven_day_opus": {"utilization": 10, "resets_at": "next tuesday"},
                "seven_day_sonnet": {"utilization": -1, "resets_at": None},
                "extra_usage": {"is_enabled": True, "utilization": 80.0},
                "weird": [1, 2],
                "flag": True,
                "ok": {"utilization": 50, "resets_at": None},
            }
        )
        self.assertEqual(windows, {"ok": WindowQuota(utilization=0.5, reset=None)})

    def test_usage_not_an_object(self) -> None:
        """A usage answer that is not an object is a bad_response."""
        error = self.assertRaises(OAuthError, parse_usage, [1])
        self.assertEqual(error.kind, "bad_response")

    def test_tiers(self) -> None:
        """Tier comes from the organization type first, then the account flags, then the rate-limit tier."""
        cases = [
            ({"has_claude_max": True}, {}, "Max"),
            ({"has_claude_pro": True}, {}, "Pro"),
            ({"has_claude_max": True, "has_claude_pro": True}, {}, "Max"),
            ({}, {"organization_type": "claude_team"}, "Team"),
            ({"has_claude_max": False}, {"organization_type": "claude_enterprise"}, "Enterprise"),
            ({}, {"organization_type": "claude_max"}, "Max"),
            ({}, {"rate_limit_tier": "default_claude_max_5x"}, "Max"),
            ({}, {"rate_limit_tier": "default_claude_pro"}, "Pro"),
            ({}, {}, None),
        ]
        for account, organization, tier in cases:
            self.assertEqual(tier_of(account, organization), tier, (account, organization))

    def test_pasted(self) -> None:
        """A pasted callback URL, code#state or bare code is split into code and state; junk is None."""
        self.assertEqual(parse_pasted("http://localhost:5/callback?code=abc&state=xyz\n"), ("abc", "xyz"))
        self.assertEqual(parse_pasted(f"{MANUAL_REDIRECT}?code=abc&state=xyz"), ("abc", "xyz"))
        self.assertEqual(parse_pasted("  abc#xyz "), ("abc", "xyz"))
        self.assertEqual(parse_pasted("'abc'"), ("abc", None))
        self.assertIsNone(parse_pasted("   "))
        self.assertIsNone(parse_pasted("two words"))
        self.assertIsNone(parse_pasted("http://localhost:5/callback?state=xyz"))


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.fake = FakeOAuthServer(clock=self.clock.seconds)
        self.client, self.stub = stub_client(self.fake, self.clock)

    def call(self, coroutine: Any) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def error(self, coroutine: Any) -> OAuthError:
        failure = self.failureResultOf(Deferred.fromCoroutine(coroutine), OAuthError)
        return failure.value

    def test_exchange(self) -> None:
        """The exchange posts the authorization_code grant with code, state, client id, redirect and verifier as JSON."""
        verifier, challenge = new_pkce()
        redirect = self.fake.approve(authorize_url(self.fake.settings(), MANUAL_REDIRECT, challenge, "st"))
        code = parse_qs(urlsplit(redirect).query)["code"][0]
        tokens = self.call(self.client.exchange(code, "st", verifier, MANUAL_REDIRECT))
        [request] = self.fake.token_requests()
        self.assertEqual(
            request.body,
            {
                "grant_type": "authorization_code",
                "code": code,
                "state": "st",
                "client_id": self.fake.settings().client_id,
                "redirect_uri": MANUAL_REDIRECT,
                "code_verifier": verifier,
            },
        )
        self.assertEqual(request.headers["content-type"], "application/json")
        self.assertTrue(tokens.access_token.startswith("sk-ant-oat01-"))
        self.assertEqual(tokens.expires_at_ms, int((NOW + self.fake.expires_in) * 1000))
        self.assertIn("user:inference", tokens.scopes)

    def test_exchange_wrong_verifier(self) -> None:
        """A code exchanged with the wrong verifier is refused as invalid_grant."""
        _, challenge = new_pkce()
        redirect = self.fake.approve(authorize_url(self.fake.settings(), MANUAL_REDIRECT, challenge, "st"))
        code = parse_qs(urlsplit(redirect).query)["code"][0]
        self.assertEqual(self.error(self.client.exchange(code, "st", new_pkce()[0], MANUAL_REDIRECT)).kind, "invalid_grant")

    def test_refresh_rotates(self) -> None:
        """A refresh posts the refresh_token grant and returns a new pair; the old refresh token is then dead."""
        _, refresh, _ = self.fake.issue()
        tokens = self.call(self.client.refresh(refresh))
        [request] = self.fake.token_requests()
        self.assertEqual(
            request.body, {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": self.fake.settings().client_id}
        )
        self.assertNotEqual(tokens.refresh_token, refresh)
        error = self.error(self.client.refresh(refresh))
        self.assertEqual(error.kind, "invalid_grant")
        self.assertNotIn(refresh, str(error))

    def test_refresh_without_new_refresh_token_keeps_old(self) -> None:
        """A refresh answer without refresh_token (a non-rotating server) keeps the old refresh token."""
        self.fake.fail_tokens(200, {"access_token": "sk-ant-oat01-new", "expires_in": 60})
        tokens = self.call(self.client.refresh("sk-ant-ort01-old"))
        self.assertEqual((tokens.access_token, tokens.refresh_token), ("sk-ant-oat01-new", "sk-ant-ort01-old"))
        self.assertEqual(tokens.expires_at_ms, int((NOW + 60) * 1000))

    def test_error_kinds(self) -> None:
        """429 is rate_limited with its retry-after, 5xx server, other 4xx or non-JSON bad_response."""
        self.fake.fail_tokens(429, {"error": "rate_limited"}, {"retry-after": "30"})
        error = self.error(self.client.refresh("x"))
        self.assertEqual((error.kind, error.retry_after, error.status), ("rate_limited", 30.0, 429))
        self.fake.fail_tokens(503, "<html>down</html>")
        self.assertEqual(self.error(self.client.refresh("x")).kind, "server")
        self.fake.fail_tokens(400, {"error": "invalid_request"})
        self.assertEqual(self.error(self.client.refresh("x")).kind, "bad_response")
        self.fake.fail_tokens(200, "not json")
        self.assertEqual(self.error(self.client.refresh("x")).kind, "bad_response")
        self.fake.fail_tokens(200, {"no": "token"})
        self.assertEqual(self.error(self.client.refresh("x")).kind, "bad_response")

    def test_error_message_never_echoes_tokens(self) -> None:
        """A server description quoting a token is shown with the token masked."""
        self.fake.fail_tokens(400, {"error": "invalid_grant", "error_description": "token sk-ant-ort01-SECRETVALUE revoked"})
        error = self.error(self.client.refresh("sk-ant-ort01-SECRETVALUE"))
        self.assertEqual(error.kind, "invalid_grant")
        self.assertNotIn("SECRETVALUE", str(error))
        self.assertNotIn("SECRETVALUE", repr(error))

    def test_network_error(self) -> None:
        """A connection failure is a network error."""

        class Refusing:
            def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        client = OAuthClient(self.clock, self.fake.settings(), http=Refusing())
        error = self.error(client.refresh("x"))
        self.assertEqual(error.kind, "network")

    def test_timeout(self) -> None:
        """A token endpoint that does not answer within the timeout is a timeout error."""
        self.fake.hold_tokens = True
        d = Deferred.fromCoroutine(self.client.refresh("x"))
        self.assertNoResult(d)
        self.clock.advance(oauth.REQUEST_TIMEOUT)
        self.assertEqual(self.failureResultOf(d, OAuthError).value.kind, "timeout")

    def test_profile(self) -> None:
        """The profile gives uuid, email, display name, tier and organization, with the Bearer token."""
        self.fake.add_account("bob@example.com", uuid="u-bob", has_claude_max=False, has_claude_pro=True, organization_type="claude_pro")
        access, _, _ = self.fake.issue("bob@example.com")
        profile = self.call(self.client.profile(access))
        self.assertEqual(profile, Profile("u-bob", "bob@example.com", "Test User", "Pro", "Test Org"))
        self.assertEqual(self.fake.requests_to(PROFILE_PATH)[0].headers["authorization"], f"Bearer {access}")

    def test_profile_unauthorized(self) -> None:
        """A refused access token is an unauthorized error."""
        self.assertEqual(self.error(self.client.profile("sk-ant-oat01-bad")).kind, "unauthorized")

    def test_usage(self) -> None:
        """Usage is read with the Bearer token and the oauth beta header, and mapped to windows."""
        access, _, _ = self.fake.issue()
        windows = self.call(self.client.usage(access))
        [request] = self.fake.requests_to(USAGE_PATH)
        self.assertEqual(request.headers["anthropic-beta"], "oauth-2025-04-20")
        self.assertEqual(request.headers["authorization"], f"Bearer {access}")
        self.assertEqual(windows["5h"], WindowQuota(utilization=0.42, reset=1893474000.0))
        self.assertEqual(windows["7d"].utilization, 0.075)
        self.assertNotIn("7d_opus", windows)

    def test_usage_429(self) -> None:
        """A 429 from the usage endpoint is rate_limited with its retry-after."""
        access, _, _ = self.fake.issue()
        self.fake.fail_usage(429, {"type": "error"}, {"retry-after": "600"})
        error = self.error(self.client.usage(access))
        self.assertEqual((error.kind, error.retry_after), ("rate_limited", 600.0))

    def test_usage_429_retry_after_forms(self) -> None:
        """
        The usage endpoint's retry-after is read as RFC 9110 allows: delay
        seconds, or an HTTP-date in any of its three forms (counted from the
        client's clock; a date already past means at once); a value that is
        neither, or none at all, is None.
        """
        access, _, _ = self.fake.issue()
        # NOW is 2030-03-17T17:46:40Z.
        table = [
            ("120", 120.0),
            (" 7 ", 7.0),
            ("0", 0.0),
            ("Sun, 17 Mar 2030 17:48:40 GMT", 120.0),  # IMF-fixdate
            ("Sunday, 17-Mar-30 17:51:40 GMT", 300.0),  # obsolete RFC 850
            ("Sun Mar 17 17:47:10 2030", 30.0),  # obsolete asctime
            ("Sun, 17 Mar 2030 17:00:00 GMT", 0.0),  # in the past
            ("-5", None),
            ("soon", None),
            ("", None),
        ]
        for header, expected in table:
            self.fake.fail_usage(429, {"type": "error"}, {"retry-after": header})
            error = self.error(self.client.usage(access))
            self.assertEqual((error.kind, error.retry_after), ("rate_limited", expected), header)
        self.fake.fail_usage(429, {"type": "error"})
        self.assertIsNone(self.error(self.client.usage(access)).retry_after)

    def test_close_passed_client(self) -> None:
        """Closing a client built on a passed-in HTTP client does nothing and succeeds."""
        self.successResultOf(self.client.close())


class PasteLoginTests(SynchronousTestCase):
    """The login flows driven from the terminal side, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.fake = FakeOAuthServer(clock=self.reactor.seconds)
        self.client, _ = stub_client(self.fake, self.reactor)
        self.lines: DeferredQueue[str] = DeferredQueue()
        self.announced: list[str] = []
        self.opened: list[str] = []

    def start(self, manual: bool = False, browser: bool = True) -> Deferred[TokenSet]:
        def open_browser(url: str) -> bool:
            self.opened.append(url)
            return browser

        return Deferred.fromCoroutine(
            oauth.login(
                self.reactor,
                self.client,
                self.fake.settings(),
                manual=manual,
                announce=self.announced.append,
                lines=self.lines.get,
                open_browser=open_browser,
            )
        )

    def url(self) -> str:
        [url] = self.opened
        self.assertIn(url, "\n".join(self.announced))
        return url

    def test_paste_callback_url(self) -> None:
        """Pasting the full callback URL finishes the login, exchanged with the loopback redirect_uri."""
        d = self.start()
        redirect = self.fake.approve(self.url())
        self.assertTrue(redirect.startswith("http://localhost:"))
        self.lines.put(redirect)
        tokens = self.successResultOf(d)
        [request] = self.fake.token_requests()
        self.assertEqual(request.body["redirect_uri"], redirect.split("?")[0])
        self.assertEqual(tokens.access_token in self.fake.access, True)

    def test_paste_bare_code(self) -> None:
        """A bare pasted code is exchanged with the loopback redirect_uri and the login's own state."""
        d = self.start()
        redirect = self.fake.approve(self.url())
        code = parse_qs(urlsplit(redirect).query)["code"][0]
        self.lines.put("")  # an empty line is ignored
        self.lines.put(code)
        self.successResultOf(d)
        [request] = self.fake.token_requests()
        self.assertTrue(request.body["redirect_uri"].startswith("http://localhost:"))
        self.assertEqual(request.body["state"], parse_qs(urlsplit(redirect).query)["state"][0])

    def test_paste_code_with_state(self) -> None:
        """code#state pasted in the default flow is exchanged with the loopback redirect_uri."""
        d = self.start()
        query = parse_qs(urlsplit(self.fake.approve(self.url())).query)
        self.lines.put(f"{query['code'][0]}#{query['state'][0]}")
        self.successResultOf(d)

    def test_paste_wrong_state(self) -> None:
        """A pasted code#state with another login's state fails with state_mismatch and no exchange."""
        d = self.start()
        query = parse_qs(urlsplit(self.fake.approve(self.url())).query)
        self.lines.put(f"{query['code'][0]}#not-this-login")
        self.assertEqual(self.failureResultOf(d, OAuthError).value.kind, "state_mismatch")
        self.assertEqual(self.fake.token_requests(), [])

    def test_junk_then_code(self) -> None:
        """A line that is neither URL nor code asks again; the next good line finishes the login."""
        d = self.start()
        redirect = self.fake.approve(self.url())
        self.lines.put("two words")
        self.assertNoResult(d)
        self.assertIn("paste it again", self.announced[-1])
        self.lines.put(redirect)
        self.successResultOf(d)

    def test_manual(self) -> None:
        """--manual uses the platform redirect and a pasted code#state, exchanged with that redirect_uri."""
        d = self.start(manual=True)
        url = self.url()
        self.assertEqual(parse_qs(urlsplit(url).query)["redirect_uri"], [MANUAL_REDIRECT])
        self.assertEqual(self.reactor.tcpServers, [])
        self.lines.put(self.fake.approve_manual(url))
        self.successResultOf(d)
        [request] = self.fake.token_requests()
        self.assertEqual(request.body["redirect_uri"], MANUAL_REDIRECT)

    def test_exchange_failure(self) -> None:
        """A refused exchange fails the login with the token endpoint's error."""
        d = self.start()
        redirect = self.fake.approve(self.url())
        self.fake.fail_tokens(400, {"error": "invalid_grant", "error_description": "code expired"})
        self.lines.put(redirect)
        error = self.failureResultOf(d, OAuthError).value
        self.assertEqual(error.kind, "invalid_grant")
        self.assertIn("code expired", str(error))

    def test_timeout(self) -> None:
        """No code within two minutes fails with timeout, and the pending terminal read is cancelled."""
        d = self.start()
        self.reactor.advance(119)
        self.assertNoResult(d)
        self.reactor.advance(1)
        self.assertEqual(self.failureResultOf(d, OAuthError).value.kind, "timeout")
        self.assertEqual(self.lines.waiting, [])

    def test_no_browser(self) -> None:
        """Without a browser the URL is still announced, with how to paste the result."""
        d = self.start(browser=False)
        self.assertIn("No browser", "\n".join(self.announced))
        self.lines.put(self.fake.approve(self.url()))
        self.successResultOf(d)

    def test_browser_raising(self) -> None:
        """A browser opener that raises is treated as no browser."""

        def broken(url: str) -> bool:
            raise RuntimeError("no display")

        d = Deferred.fromCoroutine(
            oauth.login(
                self.reactor,
                self.client,
                self.fake.settings(),
                manual=True,
                announce=self.announced.append,
                lines=self.lines.get,
                open_browser=broken,
            )
        )
        self.assertIn("claude", "\n".join(self.announced).lower())
        self.reactor.advance(120)
        self.failureResultOf(d, OAuthError)

    def test_manual_input_ends(self) -> None:
        """In the manual flow, input ending before a code fails the login at once."""
        lines: list[Deferred[str]] = []

        def read() -> Deferred[str]:
            d: Deferred[str] = Deferred()
            lines.append(d)
            return d

        d = Deferred.fromCoroutine(
            oauth.login(
                self.reactor, self.client, self.fake.settings(), manual=True,
                announce=self.announced.append, lines=read, open_browser=lambda url: True,
            )
        )
        lines[0].errback(EOFError())
        self.assertEqual(self.failureResultOf(d, OAuthError).value.kind, "denied")


class CallbackLoginTests(TestCase):
    """The default flow with a real loopback server and a real HTTP GET as the browser."""

    def setUp(self) -> None:
        self.fake = FakeOAuthServer()
        port, base = serve(self.fake, reactor)
        self.addCleanup(port.stopListening)
        self.client = OAuthClient(reactor, self.fake.settings(base))
        self.addCleanup(self.client.close)
        # The "browser": its own pool, no redirects followed, nothing kept open.
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.browser = HTTPClient(Agent(reactor, pool=pool))
        self.lines: DeferredQueue[str] = DeferredQueue()
        self.urls: list[str] = []
        self.opened: Deferred[str] = Deferred()

    def start(self) -> Deferred[TokenSet]:
        def open_browser(url: str) -> bool:
            self.opened.callback(url)
            return True

        return Deferred.fromCoroutine(
            oauth.login(
                reactor,
                self.client,
                self.client.settings,
                manual=False,
                announce=lambda text: None,
                lines=self.lines.get,
                open_browser=open_browser,
            )
        )

    async def browse(self, url: str) -> tuple[int, str | None, bytes]:
        response = await self.browser.get(url.replace("localhost", "127.0.0.1"), allow_redirects=False)
        body = await treq.content(response)
        location = response.headers.getRawHeaders(b"location", [None])[0]
        return response.code, location.decode() if location else None, body

    async def _callback(self) -> None:
        login = self.start()
        url = await self.opened
        redirect = self.fake.approve(url)
        code, location, _ = await self.browse(redirect)
        self.assertEqual((code, location), (302, SUCCESS_URL))
        tokens = await login
        self.assertIn(tokens.access_token, self.fake.access)
        [request] = self.fake.token_requests()
        self.assertEqual(request.body["redirect_uri"], redirect.split("?")[0])
        self.assertTrue(request.body["redirect_uri"].startswith("http://localhost:"))
        # The loopback server is gone once the login is over.
        failure = await Deferred.fromCoroutine(self.browse(redirect)).addCallbacks(lambda r: None, lambda f: f.value)
        self.assertIsNotNone(failure)

    def test_callback(self) -> None:
        """The browser's GET of the callback is answered 302 to the success page after the exchange
        (made with the loopback redirect_uri), and the server then stops listening."""
        return Deferred.fromCoroutine(self._callback())

    async def _mismatch(self) -> None:
        login = self.start()
        url = await self.opened
        redirect = self.fake.approve(url)
        forged = redirect.split("&state=")[0] + "&state=forged"
        code, location, body = await self.browse(forged)
        self.assertEqual((code, location), (400, None))
        self.assertIn(b"different login", body)
        error = await login.addCallbacks(lambda r: None, lambda f: f.value)
        self.assertIsInstance(error, OAuthError)
        self.assertEqual(error.kind, "state_mismatch")
        self.assertEqual(self.fake.token_requests(), [])

    def test_state_mismatch(self) -> None:
        """A callback with the wrong state gets a 400 page, the login fails with state_mismatch, nothing is exchanged."""
        return Deferred.fromCoroutine(self._mismatch())

    async def _other_paths(self) -> None:
        login = self.start()
        url = await self.opened
        port_url = parse_qs(urlsplit(url).query)["redirect_uri"][0]
        code, _, _ = await self.browse(port_url.replace("/callback", "/favicon.ico"))
        self.assertEqual(code, 404)
        code, _, _ = await self.browse(port_url)
        self.assertEqual(code, 400)
        self.lines.put(self.fake.approve(url))
        await login

    def test_other_requests_ignored(self) -> None:
        """Other paths get 404 and a callback without a code gets 400, without ending the login;
        a pasted URL still finishes it while the loopback server runs."""
        return Deferred.fromCoroutine(self._other_paths())

    async def _declined(self) -> None:
        login = self.start()
        url = await self.opened
        redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
        code, _, body = await self.browse(redirect_uri + "?error=access_denied&state=x")
        self.assertEqual(code, 400)
        error = await login.addCallbacks(lambda r: None, lambda f: f.value)
        self.assertEqual(error.kind, "denied")

    def test_declined(self) -> None:
        """A callback carrying error=access_denied ends the login as denied."""
        return Deferred.fromCoroutine(self._declined())

    async def _exchange_fails(self) -> None:
        login = self.start()
        url = await self.opened
        redirect = self.fake.approve(url)
        self.fake.fail_tokens(400, {"error": "invalid_grant", "error_description": "Invalid authorization code"})
        code, location, body = await self.browse(redirect)
        self.assertEqual((code, location), (400, None))
        self.assertIn(b"Invalid authorization code", body)
        error = await login.addCallbacks(lambda r: None, lambda f: f.value)
        self.assertEqual(error.kind, "invalid_grant")

    def test_exchange_failure_shown_in_browser(self) -> None:
        """When the exchange fails, the browser gets a 400 page saying why instead of the success redirect,
        and the login fails with the token endpoint's error."""
        return Deferred.fromCoroutine(self._exchange_fails())
