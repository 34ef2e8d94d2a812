"""
A local fake of Anthropic's OAuth side: the authorize step (as a method the
test calls in place of a browser), the token endpoint (PKCE exchange and
rotating single-use refresh tokens), the profile and the usage endpoints.

One twisted.web resource: wrap it in C{StubTreq} for in-memory tests, or
serve it on 127.0.0.1 port 0 with L{serve} for tests that need real HTTP.
Tests script failures (C{fail_tokens}, C{fail_usage}), hold token answers
until L{FakeOAuthServer.release}, and read what was asked in C{requests}.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from nextclaude.config import OAuthSettings
from nextclaude.oauth import MANUAL_REDIRECT, OAUTH_BETA, SCOPES

CLIENT_ID = OAuthSettings().client_id
TOKEN_PATH = "/v1/oauth/token"
PROFILE_PATH = "/api/oauth/profile"
USAGE_PATH = "/api/oauth/usage"
AUTHORIZE_PATH = "/oauth/authorize"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    time: float


@dataclass
class FakeAccount:
    email: str
    uuid: str
    display_name: str = "Test User"
    has_claude_max: bool = True
    has_claude_pro: bool = False
    organization_type: str = "claude_max"
    rate_limit_tier: str = "default_claude_max_20x"
    organization: str = "Test Org"


@dataclass
class _Code:
    challenge: str
    redirect_uri: str
    state: str
    email: str


@dataclass
class Scripted:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class FakeOAuthServer(Resource):
    isLeaf = True

    def __init__(self, clock: Callable[[], float] = time.time, expires_in: int = 8 * 3600) -> None:
        super().__init__()
        self.clock = clock
        self.expires_in = expires_in
        self.accounts: dict[str, FakeAccount] = {}
        self._codes: dict[str, _Code] = {}
        self.live_refresh: dict[str, str] = {}  # refresh token -> email
        self.used_refresh: set[str] = set()
        self.access: dict[str, tuple[str, float]] = {}  # access token -> (email, expires at)
        self.requests: list[Recorded] = []
        self.token_script: list[Scripted] = []
        self.usage_script: list[Scripted] = []
        self.usage: dict[str, Any] = {
            "five_hour": {"utilization": 42.0, "resets_at": "2030-01-01T05:00:00+00:00"},
            "seven_day": {"utilization": 7.5, "resets_at": "2030-01-07T00:00:00Z"},
            "seven_day_opus": None,
        }
        self.hold_tokens = False
        # Token requests that get no answer at all and change nothing (a dead network path).
        self.stall_tokens = False
        self.held: list[Callable[[], None]] = []
        # Called with (access token, path) whenever a request presents a token.
        self.on_token_use: Callable[[str, str], None] | None = None
        self.token_uses: list[tuple[str, str]] = []
        self._serial = itertools.count(1)
        self.add_account("alice@example.com")

    # -- set-up -----------------------------------------------------------------------

    def add_account(self, email: str, **kwargs: Any) -> FakeAccount:
        account = FakeAccount(email=email, uuid=kwargs.pop("uuid", f"uuid-{email}"), **kwargs)
        self.accounts[email] = account
        return account

    def settings(self, base: str = "http://oauth.test") -> OAuthSettings:
        base = base.rstrip("/")
        return OAuthSettings(
            client_id=CLIENT_ID,
            authorize_url=base + AUTHORIZE_PATH,
            token_url=base + TOKEN_PATH,
            profile_url=base + PROFILE_PATH,
            usage_url=base + USAGE_PATH,
        )

    def issue(self, email: str = "alice@example.com", expires_in: int | None = None) -> tuple[str, str, int]:
        """A fresh (access, refresh, expiresAt ms) grant, as if from a login."""
        n = next(self._serial)
        access = f"sk-ant-oat01-fake{n}-{secrets.token_hex(8)}"
        refresh = f"sk-ant-ort01-fake{n}-{secrets.token_hex(8)}"
        expires_at = self.clock() + (self.expires_in if expires_in is None else expires_in)
        self.access[access] = (email, expires_at)
        self.live_refresh[refresh] = email
        return access, refresh, int(expires_at * 1000)

    def approve(self, authorize_url: str, email: str = "alice@example.com") -> str:
        """What the browser does after the user approves: the redirect it follows."""
        parts = urlsplit(authorize_url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert query.get("client_id") == CLIENT_ID, query
        assert query.get("response_type") == "code", query
        assert query.get("code") == "true", query
        assert query.get("code_challenge_method") == "S256", query
        assert query.get("scope") == " ".join(SCOPES), query
        code = f"code-{secrets.token_hex(6)}"
        self._codes[code] = _Code(query["code_challenge"], query["redirect_uri"], query["state"], email)
        return f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}"

    def approve_manual(self, authorize_url: str, email: str = "alice@example.com") -> str:
        """The ``code#state`` the platform's code page shows."""
        redirect = self.approve(authorize_url, email)
        assert redirect.startswith(MANUAL_REDIRECT), redirect
        query = {k: v[0] for k, v in parse_qs(urlsplit(redirect).query).items()}
        return f"{query['code']}#{query['state']}"

    def fail_tokens(self, status: int, body: Any = None, headers: dict[str, str] | None = None, count: int = 1) -> None:
        for _ in range(count):
            self.token_script.append(Scripted(status, body, headers or {}))

    def fail_usage(self, status: int, body: Any = None, headers: dict[str, str] | None = None, count: int = 1) -> None:
        for _ in range(count):
            self.usage_script.append(Scripted(status, body, headers or {}))

    def release(self) -> None:
        """Send every held token answer."""
        held, self.held = self.held, []
        for send in held:
            send()

    def token_requests(self, grant_type: str | None = None) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if r.path == TOKEN_PATH and (grant_type is None or (isinstance(r.body, dict) and r.body.get("grant_type") == grant_type))
        ]

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    # -- HTTP -------------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.requests.append(Recorded(request.method.decode(), path, headers, body, self.clock()))
        if path == TOKEN_PATH and request.method == b"POST":
            return self._token(request, body)
        if path in (PROFILE_PATH, USAGE_PATH) and request.method == b"GET":
            return self._resource(request, path, headers)
        return self._json(request, 404, {"type": "error", "error": {"type": "not_found_error", "message": "no such path"}})

    def _json(self, request: Request, status: int, body: Any, headers: dict[str, str] | None = None) -> bytes:
        request.setResponseCode(status)
        for name, value in (headers or {}).items():
            request.setHeader(name.encode(), value.encode())
        if isinstance(body, (bytes, str)):
            return body.encode() if isinstance(body, str) else body
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _invalid_grant(self, request: Request, why: str) -> bytes:
        return self._json(request, 400, {"error": "invalid_grant", "error_description": why})

    def _token(self, request: Request, body: Any) -> bytes | int:
        if self.stall_tokens:
            return NOT_DONE_YET
        if self.token_script:
            scripted = self.token_script.pop(0)
            answer = self._json(request, scripted.status, scripted.body, scripted.headers)
        else:
            answer = self._grant(request, body)
        if not self.hold_tokens:
            return answer

        def send() -> None:
            if not request._disconnected:
                request.write(answer)
                request.finish()

        self.held.append(send)
        return NOT_DONE_YET

    def _grant(self, request: Request, body: Any) -> bytes:
        if not isinstance(body, dict):
            return self._json(request, 400, {"error": "invalid_request", "error_description": "JSON body required"})
        if body.get("client_id") != CLIENT_ID:
            return self._json(request, 401, {"error": "invalid_client", "error_description": "unknown client"})
        kind = body.get("grant_type")
        if kind == "authorization_code":
            code = self._codes.pop(body.get("code"), None)
            if code is None:
                return self._invalid_grant(request, "Invalid authorization code")
            if body.get("redirect_uri") != code.redirect_uri:
                return self._invalid_grant(request, "redirect_uri does not match the authorization request")
            if s256(str(body.get("code_verifier"))) != code.challenge:
                return self._invalid_grant(request, "code_verifier does not match the challenge")
            if body.get("state") != code.state:
                return self._invalid_grant(request, "state does not match")
            email = code.email
        elif kind == "refresh_token":
            token = body.get("refresh_token")
            email = self.live_refresh.pop(token, None)  # single use: rotation kills it
            if email is None:
                return self._invalid_grant(request, "Refresh token not found or invalid")
            self.used_refresh.add(token)
        else:
            return self._json(request, 400, {"error": "unsupported_grant_type"})
        access, refresh, _ = self.issue(email)
        account = self.accounts.get(email)
        return self._json(
            request,
            200,
            {
                "token_type": "Bearer",
                "access_token": access,
                "refresh_token": refresh,
                "expires_in": self.expires_in,
                "scope": " ".join(SCOPES[1:]),
                "account": {"uuid": account.uuid if account else None, "email_address": email},
            },
        )

    def _resource(self, request: Request, path: str, headers: dict[str, str]) -> bytes:
        auth = headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token:
            self.token_uses.append((token, path))
            if self.on_token_use is not None:
                self.on_token_use(token, path)
        known = self.access.get(token)
        if known is None or known[1] <= self.clock():
            return self._json(
                request, 401, {"type": "error", "error": {"type": "authentication_error", "message": "Invalid bearer token"}}
            )
        email = known[0]
        if path == USAGE_PATH:
            if OAUTH_BETA not in headers.get("anthropic-beta", ""):
                return self._json(request, 400, {"type": "error", "error": {"type": "invalid_request_error", "message": "beta required"}})
            if self.usage_script:
                scripted = self.usage_script.pop(0)
                return self._json(request, scripted.status, scripted.body, scripted.headers)
            return self._json(request, 200, self.usage)
        account = self.accounts[email]
        return self._json(
            request,
            200,
            {
                "account": {
                    "uuid": account.uuid,
                    "email": account.email,
                    "display_name": account.display_name,
                    "has_claude_max": account.has_claude_max,
                    "has_claude_pro": account.has_claude_pro,
                },
                "organization": {
                    "name": account.organization,
                    "organization_type": account.organization_type,
                    "rate_limit_tier": account.rate_limit_tier,
                },
            },
        )


def serve(fake: FakeOAuthServer, reactor: Any) -> tuple[IListeningPort, str]:
    """Listen on 127.0.0.1, a free port; returns the port (stop it!) and the base URL."""
    site = Site(fake)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"
