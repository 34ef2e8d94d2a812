"""OAuth for subscription accounts: PKCE login, token refresh, profile, usage.

The Twisted edge of the accounts layer (PROTOCOL.md, "OAuth"). Every HTTP call
goes through an ``HTTPClient`` the caller passes in or one built on a
connection pool this module's ``OAuthClient`` owns and closes; nothing here
calls ``treq.*`` at module level. Errors are ``OAuthError`` with a ``kind``
callers branch on and a message that is safe to show and log: it never
carries a token, a code or a verifier.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from nextclaude.config import OAuthSettings, mask_secret
from nextclaude.quota import WindowQuota
from nextclaude.quota import _retry_after as parse_retry_after

__all__ = [
    "LOOPBACK_CALLBACK",
    "MANUAL_REDIRECT",
    "OAUTH_BETA",
    "SCOPES",
    "SUCCESS_URL",
    "OAuthClient",
    "OAuthError",
    "Profile",
    "TokenSet",
    "authorize_url",
    "login",
    "new_pkce",
    "new_state",
    "parse_usage",
]

LOOPBACK_CALLBACK = "http://localhost:{port}/callback"
SUCCESS_URL = "https://platform.claude.com/oauth/code/success?app=claude-code"
MANUAL_REDIRECT = "https://platform.claude.com/oauth/code/callback"
SCOPES = (
    "org:create_api_key",
    "user:profile",
    "user:inference",
    "user:sessions:claude_code",
    "user:mcp_servers",
    "user:file_upload",
)
OAUTH_BETA = "oauth-2025-04-20"

# Seconds one OAuth HTTP call (headers and body) may take.
REQUEST_TIMEOUT = 30.0
LOGIN_TIMEOUT = 120.0
# Bodies of the token, profile and usage endpoints are small JSON objects.
MAX_BODY_BYTES = 1 << 20

USAGE_WINDOWS = {
    "five_hour": "5h",
    "seven_day": "7d",
    "seven_day_opus": "7d_opus",
    "seven_day_sonnet": "7d_sonnet",
}

ERROR_KINDS = frozenset(
    {
        "invalid_grant",  # the code or refresh token is dead: log in / import again
        "rate_limited",  # 429; see retry_after
        "server",  # 5xx
        "network",  # no answer: connection refused, DNS, reset
        "bad_response",  # an answer we cannot use (not JSON, missing fields, other 4xx)
        "unauthorized",  # 401/403 from the profile or usage endpoint: the access token is refused
        "state_mismatch",  # a callback or pasted code for another login
        "denied",  # the user (or the server) declined the authorization
        "timeout",  # no answer in time, or no login within the login timeout
    }
)

_log = Logger()

# Anything shaped like an Anthropic token, in text that came from elsewhere.
_TOKENISH = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")


def _scrub(text: str, limit: int = 200) -> str:
    """Server-provided text made safe to show: no token-shaped words, bounded length."""
    text = _TOKENISH.sub(lambda m: mask_secret(m.group(0)) or "", text)
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class OAuthError(Exception):
    """An OAuth step failed. ``kind`` is one of ``ERROR_KINDS``; ``str()`` is safe to show."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown OAuth error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"OAuthError({self.kind!r}, {self.message!r})"


# --- PKCE and the authorize URL --------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_pkce() -> tuple[str, str]:
    """A fresh ``(verifier, challenge)``: 32 random bytes base64url, and its S256 challenge."""
    verifier = _b64url(secrets.token_bytes(32))
    return verifier, pkce_challenge(verifier)


def pkce_challenge(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_state() -> str:
    return _b64url(secrets.token_bytes(32))


def authorize_url(settings: OAuthSettings, redirect_uri: str, challenge: str, state: str) -> str:
    query = urlencode(
        {
            "code": "true",
            "client_id": settings.client_id,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": " ".join(SCOPES),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
        }
    )
    return f"{settings.authorize_url}?{query}"


# --- values ----------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class TokenSet:
    access_token: str
    refresh_token: str | None
    expires_at_ms: int | None  # Unix epoch milliseconds, as the config stores it
    scopes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"TokenSet(access_token={mask_secret(self.access_token)!r}, "
            f"refresh_token={mask_secret(self.refresh_token)!r}, "
            f"expires_at_ms={self.expires_at_ms!r}, scopes={self.scopes!r})"
        )

    def account_fields(self) -> dict[str, Any]:
        """The config file's keys for this pair (``None`` removes a key, for ``update_account``)."""
        fields: dict[str, Any] = {
            "accessToken": self.access_token,
            "refreshToken": self.refresh_token,
            "expiresAt": self.expires_at_ms,
        }
        if self.scopes:
            # A response without scopes says nothing about them: keep what is there.
            fields["scopes"] = list(self.scopes)
        return fields


@dataclass(frozen=True)
class Profile:
    uuid: str | None
    email: str | None
    display_name: str | None
    tier: str | None  # "Max" / "Pro" / "Team" / "Enterprise", None when it cannot be told
    organization: str | None


def tier_of(account: Mapping[str, Any], organization: Mapping[str, Any]) -> str | None:
    """The subscription tier from the profile's flags, organization type and rate-limit tier."""
    org_type = str(organization.get("organization_type") or "").lower()
    # Team and Enterprise seats are organization-wide: the per-user flags may
    # be false for them, so the organization type decides first.
    if "enterprise" in org_type:
        return "Enterprise"
    if "team" in org_type:
        return "Team"
    if account.get("has_claude_max") is True or "max" in org_type:
        return "Max"
    if account.get("has_claude_pro") is True or "pro" in org_type:
        return "Pro"
    rate_tier = str(organization.get("rate_limit_tier") or "").lower()
    for marker, tier in (("enterprise", "Enterprise"), ("team", "Team"), ("max", "Max"), ("pro", "Pro")):
        if marker in rate_tier:
            return tier
    return None


def _string_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_profile(data: Any) -> Profile:
    if not isinstance(data, dict):
        raise OAuthError("bad_response", "the profile endpoint did not answer with a JSON object")
    raw_account, raw_organization = data.get("account"), data.get("organization")
    account: dict[str, Any] = raw_account if isinstance(raw_account, dict) else {}
    organization: dict[str, Any] = raw_organization if isinstance(raw_organization, dict) else {}
    return Profile(
        uuid=_string_or_none(account.get("uuid")),
        email=_string_or_none(account.get("email")) or _string_or_none(account.get("email_address")),
        display_name=_string_or_none(account.get("display_name")) or _string_or_none(account.get("full_name")),
        tier=tier_of(account, organization),
        organization=_string_or_none(organization.get("name")),
    )


def _iso_seconds(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text.upper() if text.lower().endswith("z") else text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.timestamp()
    except (OverflowError, OSError):
        return None


def parse_usage(data: Any) -> dict[str, WindowQuota]:
    """The usage endpoint's object as quota windows (percent → fraction, ISO → epoch seconds).

    An entry counts as a window only when it is an object with a numeric
    ``utilization`` and a ``resets_at`` key (``null`` while the window has not
    started); anything else (``extra_usage``, nulls, garbage) is skipped.
    """
    if not isinstance(data, dict):
        raise OAuthError("bad_response", "the usage endpoint did not answer with a JSON object")
    windows: dict[str, WindowQuota] = {}
    for key, entry in data.items():
        if not isinstance(key, str) or not isinstance(entry, dict) or "resets_at" not in entry:
            continue
        percent = entry.get("utilization")
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent) or percent < 0:
            continue
        reset = _iso_seconds(entry.get("resets_at"))
        if reset is None and entry.get("resets_at") is not None:
            continue
        windows[USAGE_WINDOWS.get(key, key)] = WindowQuota(utilization=percent / 100.0, reset=reset)
    return windows


# --- the client ------------------------------------------------------------------


class HTTP(Protocol):
    """What ``OAuthClient`` needs of an HTTP client: ``treq.client.HTTPClient`` or ``StubTreq``."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[IResponse]: ...


def _no_cookies() -> CookieJar:
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _retry_after(headers: Headers, now: float) -> float | None:
    """
    Seconds to wait from a C{retry-after} header: delay-seconds or an
    HTTP-date (RFC 9110 section 10.2.3; a date in the past means now), or
    None when there is none or it cannot be read.
    """
    value = headers.getRawHeaders(b"retry-after", [None])[-1]
    if value is None:
        return None
    # The same reading as the API's own retry-after headers get.
    return parse_retry_after(value.decode("latin-1"), now)


class OAuthClient:
    """The token, profile and usage endpoints. ``close()`` releases what it owns."""

    def __init__(
        self,
        reactor: IReactorTime,
        settings: OAuthSettings,
        http: HTTP | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.settings = settings
        self.timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            agent = Agent(reactor, pool=self._pool, connectTimeout=timeout)
            http = HTTPClient(agent, cookiejar=_no_cookies())  # type: ignore[arg-type,assignment]
        self._http: HTTP = http  # type: ignore[assignment]

    def close(self) -> Deferred[None]:
        """Close the connection pool this client built (nothing to do for a passed-in client)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return Deferred.fromCoroutine(_nothing())
        return pool.closeCachedConnections()

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    async def _call(self, what: str, method: str, url: str, headers: dict[str, str], body: Any = None) -> tuple[int, Headers, Any]:
        """One request with the timeout applied to headers and body together; the JSON answer."""

        async def call() -> tuple[int, Headers, bytes]:
            sent = {"accept": "application/json", **headers}
            data = None
            if body is not None:
                sent["content-type"] = "application/json"
                data = json.dumps(body).encode("utf-8")
            response = await self._http.request(
                method,
                url,
                headers={k.encode(): [v.encode()] for k, v in sent.items()},
                data=data,
                allow_redirects=False,
            )
            raw = await treq.content(response)
            return response.code, response.headers, raw

        attempt = Deferred.fromCoroutine(call())
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()

        timer = self._reactor.callLater(self.timeout, expire)
        try:
            code, response_headers, raw = await attempt
        except Exception as e:
            # Cancelling an in-flight request surfaces as whatever the agent
            # makes of it (ResponseNeverReceived, CancelledError, …): the
            # timer's flag, not the exception type, says it was the timeout.
            if expired:
                raise OAuthError("timeout", f"the {what} did not answer within {self.timeout:g} s") from None
            if not isinstance(e, _NETWORK_ERRORS):
                raise  # the caller gave up (CancelledError), or a bug
            reason = _connection_problem(e)
            raise OAuthError("network", f"could not reach the {what} ({reason})") from None
        finally:
            if timer.active():
                timer.cancel()
        if len(raw) > MAX_BODY_BYTES:
            raise OAuthError("bad_response", f"the {what} sent an oversized answer")
        try:
            parsed = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, ValueError):
            parsed = None
            if 200 <= code < 300:
                raise OAuthError("bad_response", f"the {what} answered HTTP {code} with something other than JSON") from None
        return code, response_headers, parsed

    def _raise_for(self, what: str, code: int, headers: Headers, body: Any, resource: bool = False) -> None:
        if 200 <= code < 300:
            return
        error = ""
        description = ""
        if isinstance(body, dict):
            raw_error = body.get("error")
            if isinstance(raw_error, dict):  # the API's {"type":"error","error":{type,message}}
                error = str(raw_error.get("type") or "")
                description = str(raw_error.get("message") or "")
            else:
                error = str(raw_error or "")
                description = str(body.get("error_description") or "")
        detail = _scrub(": ".join(p for p in (error, description) if p))
        suffix = f" ({detail})" if detail else ""
        if code == 429:
            retry = _retry_after(headers, self._reactor.seconds())
            raise OAuthError(
                "rate_limited", f"the {what} is rate limiting us (HTTP 429){suffix}", retry_after=retry, status=code
            )
        if code >= 500:
            raise OAuthError("server", f"the {what} failed (HTTP {code}){suffix}", status=code)
        if error == "invalid_grant":
            raise OAuthError("invalid_grant", f"the {what} refused the grant{suffix}", status=code)
        if resource and code in (401, 403):
            raise OAuthError("unauthorized", f"the {what} refused the access token (HTTP {code}){suffix}", status=code)
        raise OAuthError("bad_response", f"the {what} answered HTTP {code}{suffix}", status=code)

    def _token_set(self, body: Any, fallback_refresh: str | None = None) -> TokenSet:
        if not isinstance(body, dict):
            raise OAuthError("bad_response", "the token endpoint did not answer with a JSON object")
        access = body.get("access_token")
        if not isinstance(access, str) or not access:
            raise OAuthError("bad_response", "the token endpoint's answer has no access_token")
        refresh = body.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            # Servers that do not rotate leave it out: the old one stays good.
            refresh = fallback_refresh
        expires_in = body.get("expires_in")
        expires_at = None
        if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and math.isfinite(expires_in) and expires_in > 0:
            expires_at = self._now_ms() + int(expires_in * 1000)
        scope = body.get("scope")
        if isinstance(scope, list):
            scopes = tuple(s for s in scope if isinstance(s, str) and s)
        elif isinstance(scope, str):
            scopes = tuple(scope.split())
        else:
            scopes = ()
        return TokenSet(access, refresh, expires_at, scopes)

    async def exchange(self, code: str, state: str, verifier: str, redirect_uri: str) -> TokenSet:
        """Trade an authorization code for tokens; ``redirect_uri`` must be the one that produced it."""
        status, headers, body = await self._call(
            "token endpoint",
            "POST",
            self.settings.token_url,
            {},
            {
                "grant_type": "authorization_code",
                "code": code,
                "state": state,
                "client_id": self.settings.client_id,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
        )
        self._raise_for("token endpoint", status, headers, body)
        return self._token_set(body)

    async def refresh(self, refresh_token: str) -> TokenSet:
        """A new pair for ``refresh_token`` (which is single use: it dies when this succeeds)."""
        status, headers, body = await self._call(
            "token endpoint",
            "POST",
            self.settings.token_url,
            {},
            {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": self.settings.client_id},
        )
        self._raise_for("token endpoint", status, headers, body)
        return self._token_set(body, fallback_refresh=refresh_token)

    async def profile(self, access_token: str) -> Profile:
        status, headers, body = await self._call(
            "profile endpoint", "GET", self.settings.profile_url, {"authorization": f"Bearer {access_token}"}
        )
        self._raise_for("profile endpoint", status, headers, body, resource=True)
        return parse_profile(body)

    async def usage(self, access_token: str) -> dict[str, WindowQuota]:
        """The account's quota windows, read without spending any quota."""
        status, headers, body = await self._call(
            "usage endpoint",
            "GET",
            self.settings.usage_url,
            {"authorization": f"Bearer {access_token}", "anthropic-beta": OAUTH_BETA},
        )
        self._raise_for("usage endpoint", status, headers, body, resource=True)
        return parse_usage(body)


async def _nothing() -> None:
    return None


_NETWORK_ERRORS = (ConnectError, DNSLookupError, ConnectTimeoutError, ConnectionLost, ResponseFailed, OSError)


def _connection_problem(error: BaseException) -> str:
    if isinstance(error, ResponseFailed):
        reasons = [_connection_problem(f.value) for f in error.reasons if isinstance(f, Failure)]
        return "; ".join(reasons) or "the connection failed"
    if isinstance(error, DNSLookupError):
        return "the host name could not be resolved"
    if isinstance(error, ConnectTimeoutError):
        return "connecting timed out"
    if isinstance(error, ConnectError):
        return "connection refused or failed"
    return type(error).__name__


# --- login -------------------------------------------------------------------------

Lines = Callable[[], "Deferred[str]"]


def split_code(text: str) -> tuple[str, str | None]:
    """``code#state`` → ``(code, state)``; a bare code → ``(code, None)``."""
    code, sep, state = text.partition("#")
    return code.strip(), (state.strip() if sep else None)


def parse_pasted(text: str) -> tuple[str, str | None] | None:
    """What a user pasted: a callback URL, ``code#state``, or a bare code; None if unusable."""
    text = text.strip().strip("'\"").strip()
    if not text:
        return None
    if text.lower().startswith(("http://", "https://")):
        parts = urlsplit(text)
        query = parse_qs(parts.query)
        codes = query.get("code")
        if not codes or not codes[0]:
            return None
        states = query.get("state")
        code, embedded = split_code(codes[0])
        return code, states[0] if states else embedded
    code, state = split_code(text)
    if not code or any(c.isspace() for c in code):
        return None
    return code, state


_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>NextClaude login</title></head>"
    "<body style='font-family: sans-serif; max-width: 40em; margin: 4em auto'>"
    "<h1>{title}</h1><p>{text}</p></body></html>"
)


def _page(request: Request, code: int, title: str, text: str) -> bytes:
    from html import escape

    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return _PAGE.format(title=escape(title), text=escape(text)).encode("utf-8")


class _CallbackResource(Resource):
    """``/callback`` of the loopback server: hands the code to the login, answers the browser after."""

    isLeaf = True

    def __init__(self, attempt: _Login) -> None:
        super().__init__()
        self._attempt = attempt

    def render_GET(self, request: Request) -> bytes | int:
        if request.path != b"/callback":
            return _page(request, 404, "Not found", "This server only answers the login callback.")
        args = {
            k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items() if v
        }
        if args.get("error"):
            reason = _scrub(args.get("error_description") or args["error"])
            self._attempt.fail(OAuthError("denied", f"the authorization was declined ({reason})"))
            return _page(request, 400, "Login declined", f"The authorization was declined: {reason}.")
        code, state = args.get("code"), args.get("state")
        if not code:
            return _page(request, 400, "No code", "This callback carries no authorization code.")
        if state != self._attempt.state:
            self._attempt.fail(OAuthError("state_mismatch", "the browser came back with a different login's state; start the login again"))
            return _page(request, 400, "Login rejected", "This callback belongs to a different login attempt. Start the login again.")
        def answer(outcome: object) -> None:
            # Runs before the login returns and closes this connection.
            if request.finished or request._disconnected:
                return
            request.setHeader(b"connection", b"close")
            if isinstance(outcome, TokenSet):
                request.setResponseCode(302)
                request.setHeader(b"location", SUCCESS_URL.encode("ascii"))
                request.setHeader(b"cache-control", b"no-store")
            else:
                message = str(outcome.value) if isinstance(outcome, Failure) else "the login failed"
                request.write(_page(request, 400, "Login failed", f"{message}. Return to the terminal."))
            request.finish()

        if not self._attempt.submit(code, state, self._attempt.redirect_uri, answer):
            return _page(request, 409, "Already handled", "This login was already completed; you can close this tab.")
        return NOT_DONE_YET


class _Login:
    """One login attempt: the first usable code wins; everything else is cleaned up after."""

    def __init__(self, reactor: Any, client: OAuthClient, verifier: str, state: str) -> None:
        self.reactor = reactor
        self.client = client
        self.verifier = verifier
        self.state = state
        self.redirect_uri = ""
        self.done: Deferred[TokenSet] = Deferred()
        self._exchange: Deferred[TokenSet] | None = None

    def submit(
        self,
        code: str,
        state: str | None,
        redirect_uri: str,
        on_result: Callable[[object], None] | None = None,
    ) -> bool:
        """Exchange ``code`` unless another one already was; False then.

        ``on_result`` sees the exchange's outcome (a ``TokenSet`` or a
        ``Failure``) before the login itself does.
        """
        if self._exchange is not None or self.done.called:
            return False
        self._exchange = Deferred.fromCoroutine(
            self.client.exchange(code, state or self.state, self.verifier, redirect_uri)
        )

        def settle(result: object) -> None:
            if on_result is not None:
                try:
                    on_result(result)
                except Exception:
                    _log.failure("answering the login callback failed")
            if not self.done.called:
                if isinstance(result, Failure):
                    self.done.errback(result)
                else:
                    self.done.callback(result)  # type: ignore[arg-type]

        self._exchange.addBoth(settle)
        return True

    @property
    def busy(self) -> bool:
        return self._exchange is not None or self.done.called

    def fail(self, error: OAuthError) -> None:
        if self._exchange is None and not self.done.called:
            self.done.errback(error)


async def login(
    reactor: Any,
    client: OAuthClient,
    settings: OAuthSettings,
    *,
    manual: bool,
    announce: Callable[[str], None],
    lines: Lines,
    open_browser: Callable[[str], bool] | None,
    timeout: float = LOGIN_TIMEOUT,
) -> TokenSet:
    """Log in through the browser (PKCE) and return the new grant's tokens.

    ``lines()`` returns a Deferred of the next line the user typed (a CLI
    passes ``DeferredQueue.get``, fed from ``twisted.internet.stdio``); it may
    fail (end of input), after which only the browser callback can finish
    the login. The pending ``lines()`` Deferred is cancelled when the login
    ends. Default flow: a loopback server on 127.0.0.1 (free port) plus the
    terminal; ``manual``: the platform's code page and a pasted ``code#state``.
    ``open_browser`` None means the user asked for no browser (``--no-browser``):
    then nothing claims that one could not be opened.
    Raises ``OAuthError`` (``timeout`` after ``timeout`` seconds).
    """
    verifier, challenge = new_pkce()
    attempt = _Login(reactor, client, verifier, new_state())
    port = None
    site: _TrackingSite | None = None
    if manual:
        attempt.redirect_uri = MANUAL_REDIRECT
    else:
        site = _TrackingSite(_CallbackResource(attempt), reactor=reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        attempt.redirect_uri = LOOPBACK_CALLBACK.format(port=port.getHost().port)
    url = authorize_url(settings, attempt.redirect_uri, challenge, attempt.state)

    announce(f"Open this URL in a browser to log in:\n\n  {url}\n")
    try:
        opened = bool(open_browser(url)) if open_browser is not None else False
    except Exception:
        opened = False
    if manual:
        announce("After approving, copy the code the page shows (it looks like code#state) and paste it here:")
    elif open_browser is None:
        announce(
            "Open it in a browser; this waits for the browser to come back. If it cannot reach this "
            "machine (e.g. over SSH), paste the address it ends up on, or the code, here:"
        )
    elif opened:
        announce(
            "Waiting for the browser to come back. If it cannot reach this machine (e.g. over SSH), "
            "paste the address it ends up on, or the code, here:"
        )
    else:
        announce(
            "No browser could be opened here: open the URL elsewhere, then paste the address "
            "the browser ends up on (or the code it shows) here:"
        )

    pending: list[Deferred[str]] = []

    def read_next() -> None:
        if attempt.done.called:
            return
        try:
            line = lines()
        except Exception:
            return
        pending.append(line)
        line.addCallbacks(got_line, lost_input)

    def got_line(text: str) -> None:
        pending.clear()
        if attempt.done.called:
            return
        pasted = parse_pasted(text)
        if pasted is None:
            if text.strip():
                announce("That is not a callback address or a code; paste it again:")
            read_next()
            return
        code, state = pasted
        if state is not None and state != attempt.state:
            attempt.fail(OAuthError("state_mismatch", "the pasted code belongs to a different login attempt; start the login again"))
            return
        if attempt.busy:
            return
        announce("Exchanging the code…")
        attempt.submit(code, state, attempt.redirect_uri)

    def lost_input(failure: Failure) -> None:
        pending.clear()
        if failure.check(CancelledError) or attempt.done.called:
            return
        if manual:
            attempt.fail(OAuthError("denied", "input ended before a code was pasted"))

    read_next()
    timer = reactor.callLater(
        timeout,
        lambda: attempt.fail(OAuthError("timeout", f"no login within {timeout:g} seconds; run the login again")),
    )
    try:
        return await attempt.done
    finally:
        if timer.active():
            timer.cancel()
        for line in list(pending):
            line.cancel()
        if port is not None:
            await maybeDeferred(port.stopListening)
        if site is not None:
            site.close_connections()


class _TrackingSite(Site):
    """A Site that can close its connections: stopListening leaves open ones alone."""

    noisy = False

    def __init__(self, resource: Resource, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self._protocols: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self._protocols.add(protocol)
            lost = protocol.connectionLost

            def connection_lost(reason: Failure) -> None:
                self._protocols.discard(protocol)
                lost(reason)

            protocol.connectionLost = connection_lost
        return protocol

    def close_connections(self) -> None:
        for protocol in list(self._protocols):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()

    def log(self, request: Any) -> None:
        # The access log would carry the code in the query string.
        pass
