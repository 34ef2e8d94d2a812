"""Tests for nextclaude.simulate, the simulated Anthropic upstream."""

from __future__ import annotations

import json
from collections import Counter
from io import BytesIO
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from nextclaude.simulate import (
    FIVE_HOURS,
    OAUTH_BETA,
    SEVEN_DAYS,
    Overrides,
    SimAccount,
    SimulatedAnthropic,
    analyse_prompt,
    listen_simulator,
    sim_credential,
    simulated_accounts,
    stop_simulator,
)

BASE = "http://sim.invalid"
UNIFIED = "anthropic-ratelimit-unified-"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def conversation(turns: int, *, ttl: str | None = "1h", stream: bool = True,
                 max_tokens: int = 1000, model: str = "claude-sonnet-4-5-20250929") -> dict[str, Any]:
    """A Claude-Code-shaped body: ``turns`` user messages with replies between
    them, breakpoints on the system prompt and the newest message."""
    control: dict[str, str] = {"type": "ephemeral"}
    if ttl:
        control["ttl"] = ttl
    messages: list[dict[str, Any]] = []
    for i in range(turns):
        if i:
            messages.append(assistant(f"Answer number {i}. " * 20))
        messages.append(user(f"Question number {i + 1}, with some detail. " * 20))
    messages[-1]["content"][-1]["cache_control"] = control
    return {
        "model": model,
        "messages": messages,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0; cch=00000;"},
            {"type": "text", "text": "You are a careful coding assistant. " * 100,
             "cache_control": control},
        ],
        "tools": [{"name": "Read", "description": "Read a file. " * 30,
                   "input_schema": {"type": "object"}}],
        "metadata": {"user_id": "sim"},
        "max_tokens": max_tokens,
        "stream": stream,
    }


def parse_sse(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split an SSE body into (event name, decoded data) pairs."""
    events = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class SimHarness:
    """Builds a simulator on a Clock and talks to it in memory with StubTreq."""

    def make(self, n: int = 2, five_hour_tokens: int = 1_000_000, **kwargs: Any) -> None:
        self.clock = Clock()
        self.accounts = simulated_accounts(n, five_hour_tokens)
        self.sim = SimulatedAnthropic(self.clock, self.accounts, **kwargs)
        self.stub = StubTreq(self.sim)

    def oauth(self, account: SimAccount, beta: str = f"claude-code-20250219,{OAUTH_BETA}") -> dict[str, str]:
        return {"authorization": f"Bearer {account.credential}", "anthropic-beta": beta,
                "anthropic-version": "2023-06-01"}

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[IResponse, bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.stub.request(method, BASE + path, data=data, headers=headers or {})
        self.stub.flush()
        response = self.successResultOf(d)  # type: ignore[attr-defined]
        content = self.stub.content(response)
        self.stub.flush()
        return response, self.successResultOf(content)  # type: ignore[attr-defined]

    def post(self, body: Any, account: SimAccount | None = None,
             extra: dict[str, str] | None = None, path: str = "/v1/messages?beta=true") -> tuple[IResponse, bytes]:
        headers = self.oauth(account or self.accounts[0])
        headers.update(extra or {})
        return self.call("POST", path, body, headers)

    def usage(self, body: Any, account: SimAccount | None = None,
              extra: dict[str, str] | None = None) -> dict[str, Any]:
        """The usage of a non-streaming answer to ``body``."""
        response, content = self.post(dict(body, stream=False), account, extra)
        assert response.code == 200, content  # noqa: S101 - helper precondition
        return json.loads(content)["usage"]

    def assert_api_error(self, response: IResponse, content: bytes, status: int, kind: str) -> dict[str, Any]:
        test: SynchronousTestCase = self  # type: ignore[assignment]
        test.assertEqual(response.code, status)
        error = json.loads(content)
        test.assertEqual(error["type"], "error")
        test.assertEqual(error["error"]["type"], kind)
        test.assertTrue(error["request_id"].startswith("req_sim"))
        test.assertEqual(header(response, "request-id"), error["request_id"])
        return error


class AuthTests(SimHarness, SynchronousTestCase):
    def setUp(self) -> None:
        self.make()

    def test_oauth_bearer_with_beta_accepted(self) -> None:
        """A known OAuth token with the oauth beta is served, query string and all."""
        response, _ = self.post(conversation(1, stream=False))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.accounts[0].requests, 1)
        self.assertEqual(self.accounts[1].requests, 0)

    def test_oauth_without_beta_rejected(self) -> None:
        """An OAuth token without oauth-2025-04-20 gets a 401 that names the beta."""
        headers = self.oauth(self.accounts[0], beta="claude-code-20250219")
        response, content = self.call("POST", "/v1/messages", conversation(1), headers)
        error = self.assert_api_error(response, content, 401, "authentication_error")
        self.assertIn(OAUTH_BETA, error["error"]["message"])

    def test_unknown_token_rejected(self) -> None:
        """An unknown bearer token gets a 401 in the API error shape with a request id."""
        response, content = self.call("POST", "/v1/messages", conversation(1), {
            "authorization": "Bearer sk-ant-oat01-nope", "anthropic-beta": OAUTH_BETA})
        self.assert_api_error(response, content, 401, "authentication_error")
        self.assertEqual(self.sim.responses[401], 1)

    def test_missing_credentials_rejected(self) -> None:
        """A request without any credential header gets a 401."""
        response, content = self.call("POST", "/v1/messages", conversation(1), {})
        self.assert_api_error(response, content, 401, "authentication_error")

    def test_api_key_accepted_only_as_x_api_key(self) -> None:
        """An API-key account is served via x-api-key; its key as a bearer token, or an
        OAuth token as x-api-key, is refused."""
        key = SimAccount("key-1", sim_credential("key-1", "apikey"), kind="apikey")
        self.sim.add_account(key)
        response, _ = self.call("POST", "/v1/messages", conversation(1, stream=False),
                                {"x-api-key": key.credential})
        self.assertEqual(response.code, 200)
        response, content = self.call("POST", "/v1/messages", conversation(1), {
            "authorization": f"Bearer {key.credential}", "anthropic-beta": OAUTH_BETA})
        self.assert_api_error(response, content, 401, "authentication_error")
        response, content = self.call("POST", "/v1/messages", conversation(1),
                                      {"x-api-key": self.accounts[0].credential})
        self.assert_api_error(response, content, 401, "authentication_error")

    def test_simulated_accounts_deterministic(self) -> None:
        """simulated_accounts names accounts sim-1… with distinct OAuth-looking
        credentials that are the same on every call."""
        again = simulated_accounts(2, 1_000_000)
        self.assertEqual([a.name for a in self.accounts], ["sim-1", "sim-2"])
        self.assertEqual([a.credential for a in again], [a.credential for a in self.accounts])
        self.assertNotEqual(self.accounts[0].credential, self.accounts[1].credential)
        self.assertTrue(self.accounts[0].credential.startswith("sk-ant-oat01-sim"))
        self.assertEqual(again[0].seven_day_tokens, 10_000_000)


class RequestValidationTests(SimHarness, SynchronousTestCase):
    def setUp(self) -> None:
        self.make()

    def test_malformed_json(self) -> None:
        """A body that is not JSON gets a 400 invalid_request_error."""
        response, content = self.call("POST", "/v1/messages", headers=self.oauth(self.accounts[0]),
                                      raw=b'{"model": ')
        self.assert_api_error(response, content, 400, "invalid_request_error")

    def test_missing_fields(self) -> None:
        """A Messages body without max_tokens or messages gets a 400."""
        body = conversation(1)
        del body["max_tokens"]
        response, content = self.post(body)
        self.assert_api_error(response, content, 400, "invalid_request_error")
        response, content = self.post(dict(conversation(1), messages=[]))
        self.assert_api_error(response, content, 400, "invalid_request_error")

    def test_unknown_path_404(self) -> None:
        """Unknown paths and methods get a 404 not_found_error."""
        response, content = self.call("GET", "/v1/complete", headers=self.oauth(self.accounts[0]))
        self.assert_api_error(response, content, 404, "not_found_error")
        response, content = self.call("GET", "/v1/messages", headers=self.oauth(self.accounts[0]))
        self.assert_api_error(response, content, 404, "not_found_error")

    def test_bad_override_header(self) -> None:
        """A malformed x-sim-* header is refused loudly with a 400."""
        response, content = self.post(conversation(1), extra={"x-sim-deltas": "many"})
        self.assert_api_error(response, content, 400, "invalid_request_error")

    def test_count_tokens(self) -> None:
        """count_tokens answers the prompt's size and burns no quota."""
        body = conversation(3)
        response, content = self.post(body, path="/v1/messages/count_tokens?beta=true")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(content), {"input_tokens": analyse_prompt(body).total_tokens})
        self.assertEqual(self.accounts[0].used_5h, 0)
        self.assertIsNone(self.accounts[0].window_5h_start)
        usage = self.usage(body)
        self.assertEqual(usage["input_tokens"] + usage["cache_creation_input_tokens"]
                         + usage["cache_read_input_tokens"], json.loads(content)["input_tokens"])

    def test_models(self) -> None:
        """GET /v1/models lists a few models."""
        response, content = self.call("GET", "/v1/models", headers=self.oauth(self.accounts[0]))
        self.assertEqual(response.code, 200)
        models = json.loads(content)
        self.assertFalse(models["has_more"])
        self.assertTrue(all(m["type"] == "model" and m["id"].startswith("claude-") for m in models["data"]))


class MessageShapeTests(SimHarness, SynchronousTestCase):
    def setUp(self) -> None:
        self.make()

    def test_stream_event_order(self) -> None:
        """A stream sends message_start, content_block_start, a ping, one delta per
        x-sim-deltas, content_block_stop, message_delta, message_stop."""
        response, content = self.post(conversation(1), extra={"x-sim-deltas": "3"})
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, "content-type"), "text/event-stream")
        self.assertTrue(content.startswith(b"event: message_start\ndata: {"))
        names = [name for name, _ in parse_sse(content)]
        self.assertEqual(names, [
            "message_start", "content_block_start", "ping",
            "content_block_delta", "content_block_delta", "content_block_delta",
            "content_block_stop", "message_delta", "message_stop"])
        for name, data in parse_sse(content):
            self.assertEqual(data["type"], name)

    def test_stream_usage_consistent(self) -> None:
        """message_start carries the input and cache fields with output_tokens 1;
        message_delta repeats them with the cumulative output."""
        _, content = self.post(conversation(2), extra={"x-sim-output-tokens": "77"})
        events = dict(parse_sse(content))
        start = events["message_start"]["message"]
        self.assertEqual(start["role"], "assistant")
        self.assertTrue(start["id"].startswith("msg_sim"))
        self.assertIsNone(start["stop_reason"])
        usage, final = start["usage"], events["message_delta"]["usage"]
        self.assertEqual(usage["output_tokens"], 1)
        self.assertEqual(final["output_tokens"], 77)
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
            self.assertEqual(usage[key], final[key])
        self.assertEqual(usage["cache_creation"], {
            "ephemeral_5m_input_tokens": 0,
            "ephemeral_1h_input_tokens": usage["cache_creation_input_tokens"]})
        self.assertEqual(events["message_delta"]["delta"]["stop_reason"], "end_turn")

    def test_non_streaming_message(self) -> None:
        """Without stream the answer is one JSON message with usage at top level and
        the text the stream would have carried."""
        response, content = self.post(conversation(1, stream=False))
        self.assertEqual(header(response, "content-type"), "application/json")
        message = json.loads(content)
        self.assertEqual(message["type"], "message")
        self.assertEqual(message["stop_reason"], "end_turn")
        self.assertEqual(message["usage"]["output_tokens"], 8 * 5)
        _, streamed = self.post(conversation(1), self.accounts[1])
        deltas = [d["delta"]["text"] for n, d in parse_sse(streamed) if n == "content_block_delta"]
        self.assertEqual(message["content"], [{"type": "text", "text": "".join(deltas)}])

    def test_max_tokens_bounds_output(self) -> None:
        """Output never exceeds max_tokens, and then the stop reason is max_tokens."""
        message = json.loads(self.post(conversation(1, stream=False, max_tokens=1))[1])
        self.assertEqual(message["usage"]["output_tokens"], 1)
        self.assertEqual(message["stop_reason"], "max_tokens")

    def test_override_status(self) -> None:
        """x-sim-status answers that status in the error shape, without quota headers
        or quota burn; 529 is an overloaded_error."""
        response, content = self.post(conversation(1), extra={"x-sim-status": "529"})
        self.assert_api_error(response, content, 529, "overloaded_error")
        self.assertIsNone(header(response, UNIFIED + "status"))
        response, content = self.post(conversation(1), extra={
            "x-sim-status": "429", "x-sim-retry-after": "3"})
        self.assert_api_error(response, content, 429, "rate_limit_error")
        self.assertEqual(header(response, "retry-after"), "3")
        self.assertIsNone(header(response, UNIFIED + "status"))
        self.assertEqual(self.accounts[0].used_5h, 0)
        self.assertEqual((self.sim.injected, self.sim.rejected), (2, 0))

    def test_stream_error_override(self) -> None:
        """x-sim-stream-error sends an error event half-way and ends the stream
        without message_stop."""
        _, content = self.post(conversation(1), extra={
            "x-sim-stream-error": "overloaded_error", "x-sim-deltas": "4"})
        events = parse_sse(content)
        self.assertEqual([n for n, _ in events][-3:], ["content_block_delta", "content_block_delta", "error"])
        self.assertEqual(events[-1][1]["error"]["type"], "overloaded_error")

    def test_deterministic_text(self) -> None:
        """The same prompt gets the same text, on any account."""
        first = json.loads(self.post(conversation(2, stream=False))[1])
        second = json.loads(self.post(conversation(2, stream=False), self.accounts[1])[1])
        self.assertEqual(first["content"], second["content"])


class CacheTests(SimHarness, SynchronousTestCase):
    def setUp(self) -> None:
        self.make()

    def test_growing_conversation_reads_cache(self) -> None:
        """Each turn of a growing conversation reads what the previous turn wrote on
        the same account and creates only the new part; the newest message is
        input. Moving breakpoints and the billing block do not break the prefix."""
        first = self.usage(conversation(1))
        shape = analyse_prompt(conversation(1))
        self.assertEqual(first["cache_read_input_tokens"], 0)
        self.assertEqual(first["cache_creation_input_tokens"], shape.prefix_tokens[0])
        self.assertEqual(first["input_tokens"], shape.total_tokens - shape.prefix_tokens[0])

        body = conversation(2)
        body["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.0; cch=11111;"
        second = self.usage(body)
        shape = analyse_prompt(body)
        self.assertEqual(second["cache_read_input_tokens"], shape.prefix_tokens[0])
        self.assertEqual(second["cache_creation_input_tokens"], shape.prefix_tokens[2] - shape.prefix_tokens[0])
        self.assertEqual(second["input_tokens"], shape.total_tokens - shape.prefix_tokens[2])

        third = self.usage(conversation(3))
        shape = analyse_prompt(conversation(3))
        self.assertEqual(third["cache_read_input_tokens"], shape.prefix_tokens[2])
        self.assertEqual(third["cache_creation_input_tokens"], shape.prefix_tokens[4] - shape.prefix_tokens[2])

    def test_other_account_creates(self) -> None:
        """The cache is per account: the same prompt on another account is created
        again, and counted as creation there."""
        self.usage(conversation(3))
        again = self.usage(conversation(3))
        moved = self.usage(conversation(3), self.accounts[1])
        self.assertEqual(again["cache_creation_input_tokens"], 0)
        self.assertEqual(moved["cache_read_input_tokens"], 0)
        self.assertEqual(moved["cache_creation_input_tokens"], again["cache_read_input_tokens"])
        self.assertEqual(self.accounts[1].cache_creation_tokens, moved["cache_creation_input_tokens"])
        self.assertEqual(self.sim.cache_creation_tokens,
                         self.accounts[0].cache_creation_tokens + self.accounts[1].cache_creation_tokens)

    def test_5m_ttl_expires(self) -> None:
        """Without a 1h TTL an entry lives 5 minutes: read at 299 s, gone 300 s after
        its last use, and creation is reported under ephemeral_5m."""
        body = conversation(3, ttl=None)
        created = self.usage(body)["cache_creation_input_tokens"]
        self.clock.advance(299)
        hit = self.usage(body)
        self.assertEqual(hit["cache_read_input_tokens"], created)
        self.clock.advance(300)
        miss = self.usage(body)
        self.assertEqual(miss["cache_read_input_tokens"], 0)
        self.assertEqual(miss["cache_creation"], {
            "ephemeral_5m_input_tokens": created, "ephemeral_1h_input_tokens": 0})

    def test_1h_ttl(self) -> None:
        """An entry written with ttl 1h survives 5 minutes and expires after an hour."""
        body = conversation(3)
        created = self.usage(body)["cache_creation_input_tokens"]
        self.clock.advance(301)
        self.assertEqual(self.usage(body)["cache_read_input_tokens"], created)
        self.clock.advance(3600)
        self.assertEqual(self.usage(body)["cache_read_input_tokens"], 0)

    def test_hit_refreshes_ttl(self) -> None:
        """A hit restarts the TTL: two uses 200 s apart keep a 5 min entry alive 450 s."""
        body = conversation(3, ttl=None)
        created = self.usage(body)["cache_creation_input_tokens"]
        self.clock.advance(200)
        self.usage(body)
        self.clock.advance(250)
        self.assertEqual(self.usage(body)["cache_read_input_tokens"], created)

    def test_cache_per_model(self) -> None:
        """The same prompt for another model does not read the cache."""
        self.usage(conversation(3))
        other = self.usage(conversation(3, model="claude-haiku-4-5-20251001"))
        self.assertEqual(other["cache_read_input_tokens"], 0)


class QuotaTests(SimHarness, SynchronousTestCase):
    def setUp(self) -> None:
        # One 3-turn request with the default output burns ~1k quota tokens.
        self.make(five_hour_tokens=5_000)
        self.body = conversation(3, stream=False)
        self.clock.advance(1_000)

    def burn_of(self, usage: dict[str, Any]) -> float:
        return (usage["input_tokens"] + usage["cache_creation_input_tokens"]
                + usage["output_tokens"] + 0.1 * usage["cache_read_input_tokens"])

    def test_headers_report_burn(self) -> None:
        """A 200 carries the unified headers; utilization counts uncached input,
        output and a tenth of cache reads; the windows start at first use."""
        response, content = self.post(self.body)
        first = json.loads(content)["usage"]
        self.assertEqual(header(response, UNIFIED + "5h-utilization"), f"{self.burn_of(first) / 5000:.4f}")
        self.assertEqual(header(response, UNIFIED + "7d-utilization"), f"{self.burn_of(first) / 50000:.4f}")
        self.assertEqual(header(response, UNIFIED + "5h-reset"), str(1000 + 18000))
        self.assertEqual(header(response, UNIFIED + "7d-reset"), str(1000 + 7 * 86400))
        self.assertEqual(header(response, UNIFIED + "reset"), str(1000 + 18000))
        self.assertEqual(header(response, UNIFIED + "status"), "allowed")
        self.assertEqual(header(response, UNIFIED + "representative-claim"), "five_hour")
        self.assertEqual(header(response, UNIFIED + "overage-status"), "rejected")
        self.assertEqual(header(response, UNIFIED + "overage-disabled-reason"), "org_level_disabled")
        self.clock.advance(10)
        second = self.usage(self.body)
        self.assertAlmostEqual(self.accounts[0].used_5h, self.burn_of(first) + self.burn_of(second))
        self.assertEqual(self.accounts[0].window_5h_start, 1000)

    def fill(self, account: SimAccount) -> IResponse:
        """Send requests until the account answers anything but 200; return that."""
        for _ in range(100):
            response, _ = self.post(dict(self.body, messages=self.body["messages"] + [
                assistant("more"), user(f"turn {account.requests}")]), account)
            if response.code != 200:
                return response
        self.fail("account never filled")

    def test_warning_then_rejected(self) -> None:
        """Past 80% the status is allowed_warning; once a window is at capacity the
        next request gets a 429 rate_limit_error with rejected headers, no stream,
        and burns nothing."""
        statuses = []
        while self.accounts[0].used_5h < 5000:
            response, _ = self.post(dict(self.body, stream=True))
            statuses.append(header(response, UNIFIED + "5h-status"))
        self.assertIn("allowed_warning", statuses)
        used = self.accounts[0].used_5h
        response, content = self.post(dict(self.body, stream=True))
        self.assert_api_error(response, content, 429, "rate_limit_error")
        self.assertEqual(header(response, "content-type"), "application/json")
        self.assertEqual(header(response, UNIFIED + "status"), "rejected")
        self.assertEqual(header(response, UNIFIED + "5h-status"), "rejected")
        self.assertEqual(header(response, UNIFIED + "representative-claim"), "five_hour")
        self.assertEqual(header(response, UNIFIED + "reset"), str(1000 + 18000))
        self.assertEqual(header(response, "retry-after"), str(18000))
        self.assertGreaterEqual(float(header(response, UNIFIED + "5h-utilization") or 0), 1.0)
        self.assertEqual(self.accounts[0].used_5h, used)
        self.assertEqual((self.accounts[0].rejected, self.sim.rejected), (1, 1))
        # Other accounts are unaffected.
        self.assertEqual(self.post(self.body, self.accounts[1])[0].code, 200)

    def test_window_resets_after_5h(self) -> None:
        """Five hours after the window started it resets: the account serves again,
        with a new window starting at that request."""
        self.fill(self.accounts[0])
        self.clock.advance(FIVE_HOURS - 1)
        self.assertEqual(self.post(self.body)[0].code, 429)
        self.clock.advance(1)
        response, _ = self.post(self.body)
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, UNIFIED + "5h-reset"), str(1000 + 2 * 18000))
        self.assertLess(float(header(response, UNIFIED + "5h-utilization") or 1), 0.5)

    def test_seven_day_window_rejects(self) -> None:
        """A full 7d window refuses even when the 5h window has reset, and names
        seven_day with the 7d reset."""
        account = SimAccount("small", "tok-small", five_hour_tokens=5_000, seven_day_tokens=7_000)
        self.sim.add_account(account)
        self.fill(account)
        self.clock.advance(FIVE_HOURS)
        response = self.fill(account)
        self.assertEqual(header(response, UNIFIED + "7d-status"), "rejected")
        self.assertEqual(header(response, UNIFIED + "5h-status"), "allowed")
        self.assertEqual(header(response, UNIFIED + "representative-claim"), "seven_day")
        self.assertEqual(header(response, UNIFIED + "reset"), str(1000 + int(SEVEN_DAYS)))

    def test_api_key_headers_and_retry_after(self) -> None:
        """API-key accounts get requests-/tokens- headers with RFC 3339 resets, and
        a 429 with retry-after when out of tokens."""
        key = SimAccount("key", "sk-ant-api03-simkey", kind="apikey", five_hour_tokens=2_000)
        self.sim.add_account(key)
        headers = {"x-api-key": key.credential}
        response, _ = self.call("POST", "/v1/messages", self.body, headers)
        self.assertEqual(response.code, 200)
        self.assertIsNone(header(response, UNIFIED + "status"))
        self.assertEqual(header(response, "anthropic-ratelimit-requests-remaining"), "3999")
        self.assertEqual(header(response, "anthropic-ratelimit-tokens-limit"), "2000")
        self.assertEqual(header(response, "anthropic-ratelimit-tokens-reset"), "1970-01-01T05:16:40Z")
        self.assertEqual(int(header(response, "anthropic-ratelimit-tokens-remaining") or 0),
                         int(2000 - key.used_5h))
        while key.used_5h < 2000:
            self.call("POST", "/v1/messages", self.body, headers)
        self.clock.advance(600)
        response, content = self.call("POST", "/v1/messages", self.body, headers)
        self.assert_api_error(response, content, 429, "rate_limit_error")
        self.assertEqual(header(response, "retry-after"), str(18000 - 600))
        self.assertEqual(header(response, "anthropic-ratelimit-tokens-remaining"), "0")


class PacingTests(SimHarness, SynchronousTestCase):
    def setUp(self) -> None:
        self.make(delta_interval=0.5)

    def test_deltas_follow_the_clock(self) -> None:
        """With delta_interval the head of the stream is sent at once and each delta
        after one more interval; the stream ends after the last one."""
        chunks: list[bytes] = []
        d = self.stub.post(BASE + "/v1/messages", data=json.dumps(conversation(1)).encode(),
                           headers=self.oauth(self.accounts[0]) | {"x-sim-deltas": "2"})
        self.stub.flush()
        response = self.successResultOf(d)
        done = self.stub.collect(response, chunks.append)
        self.stub.flush()
        names = lambda: [n for n, _ in parse_sse(b"".join(chunks))]  # noqa: E731
        self.assertEqual(names(), ["message_start", "content_block_start", "ping"])
        self.clock.advance(0.5)
        self.stub.flush()
        self.assertEqual(names()[-1], "content_block_delta")
        self.assertNoResult(done)
        self.clock.advance(0.5)
        self.stub.flush()
        self.assertEqual(names()[-1], "message_stop")
        self.successResultOf(done)

    def test_interval_header_and_non_streaming_delay(self) -> None:
        """x-sim-delta-interval-ms paces one request; a non-streaming answer arrives
        after deltas × interval."""
        d = self.stub.post(BASE + "/v1/messages", data=json.dumps(conversation(1, stream=False)).encode(),
                           headers=self.oauth(self.accounts[0]) | {
                               "x-sim-deltas": "4", "x-sim-delta-interval-ms": "100"})
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(0.3)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_client_disconnect_cancels_stream(self) -> None:
        """When the client goes away mid-stream the pending delta is cancelled and
        nothing more is written."""
        request = DummyRequest([])
        request.method = b"POST"
        request.path = b"/v1/messages"
        request.content = BytesIO(json.dumps(conversation(1)).encode())
        for name, value in self.oauth(self.accounts[0]).items():
            request.requestHeaders.setRawHeaders(name, [value])
        self.assertIs(self.sim.render(request), NOT_DONE_YET)
        self.clock.advance(0.5)
        written = len(request.written)
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(len(request.written), written)
        self.assertEqual(request.finished, 0)
        self.assertEqual(self.sim.cancelled, 1)


class SDKEndToEndTests(TestCase):
    """The real anthropic SDK against the simulator on loopback validates the
    wire shapes."""

    def setUp(self) -> None:
        self.accounts = simulated_accounts(1, 1_000_000)
        self.sim = SimulatedAnthropic(reactor, self.accounts)
        port = listen_simulator(reactor, self.sim)
        self.addCleanup(stop_simulator, port)
        self.base_url = f"http://127.0.0.1:{port.getHost().port}"

    def in_client(self, work: Any, token: str | None = None) -> Any:
        """Run ``work(client)`` in a thread with an SDK client that is closed after."""
        import anthropic

        def run() -> Any:
            client = anthropic.Anthropic(
                base_url=self.base_url, auth_token=token or self.accounts[0].credential,
                default_headers={"anthropic-beta": OAUTH_BETA}, max_retries=0)
            try:
                return work(client)
            finally:
                client.close()

        return deferToThread(run)

    async def test_stop_closes_open_connections(self) -> None:
        """stop_simulator closes a keep-alive connection a client left open and
        fires once it is gone."""
        answered: Deferred[None] = Deferred()
        lost: Deferred[None] = Deferred()

        class KeepAlive(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET /v1/models HTTP/1.1\r\nHost: sim\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                if not answered.called:
                    answered.callback(None)

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                lost.callback(None)

        port = listen_simulator(reactor, self.sim)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, KeepAlive())
        await answered  # the server side now holds the open connection
        self.assertEqual(len(port.factory.protocols), 1)
        await stop_simulator(port)
        self.assertEqual(port.factory.protocols, {})
        await lost

    async def test_non_streaming(self) -> None:
        """The SDK parses a non-streaming message and its cache usage."""
        body = conversation(2, stream=False)
        params = {k: body[k] for k in ("model", "messages", "system", "tools", "max_tokens")}
        message = await self.in_client(lambda c: c.messages.create(**params))
        self.assertEqual(message.stop_reason, "end_turn")
        self.assertTrue(message.content[0].text)
        self.assertEqual(message.usage.output_tokens, 40)
        self.assertGreater(message.usage.cache_creation_input_tokens, 0)
        self.assertEqual(message.usage.cache_creation.ephemeral_1h_input_tokens,
                         message.usage.cache_creation_input_tokens)

    async def test_streaming(self) -> None:
        """The SDK's stream helper accumulates the text and the final usage, and the
        raw stream has the expected event order."""
        body = conversation(3)
        params = {k: body[k] for k in ("model", "messages", "system", "tools", "max_tokens")}

        def stream_twice(client: Any) -> tuple[Any, str, list[str]]:
            # Paced, so the deltas cross the socket in separate writes.
            paced = {"x-sim-delta-interval-ms": "5"}
            with client.messages.stream(extra_headers=paced, **params) as stream:
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            raw = [event.type for event in client.messages.create(stream=True, **params)]
            return final, text, raw

        final, text, raw = await self.in_client(stream_twice)
        self.assertEqual(final.content[0].text, text)
        self.assertEqual(final.usage.output_tokens, 40)
        self.assertEqual(final.usage.cache_read_input_tokens, 0)
        self.assertEqual(raw[0], "message_start")
        self.assertEqual(raw[-3:], ["content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(self.accounts[0].cache_read_tokens, analyse_prompt(body).prefix_tokens[4])

    async def test_errors(self) -> None:
        """The SDK maps the simulator's 401 and quota 429 to its typed errors, with
        the request id and the rejected header."""
        import anthropic

        body = conversation(1, stream=False)
        params = {k: body[k] for k in ("model", "messages", "max_tokens")}

        def expect(client: Any, error: type[Exception]) -> Any:
            try:
                client.messages.create(**params)
            except error as exc:
                return exc
            raise AssertionError(f"no {error.__name__}")

        exc = await self.in_client(lambda c: expect(c, anthropic.AuthenticationError), token="nope")
        self.assertTrue(exc.request_id.startswith("req_sim"))
        self.accounts[0].used_5h = float(self.accounts[0].five_hour_tokens)
        exc = await self.in_client(lambda c: expect(c, anthropic.RateLimitError))
        self.assertEqual(exc.response.headers[UNIFIED + "status"], "rejected")
        self.assertEqual(exc.body["error"]["type"], "rate_limit_error")


class AnswerTests(SimHarness, SynchronousTestCase):
    """The pure answer(): the same simulator without HTTP objects."""

    def setUp(self) -> None:
        self.make(five_hour_tokens=5_000)
        self.clock.advance(1_000)

    def creds(self, account: SimAccount | None = None) -> dict[str, str]:
        return self.oauth(account or self.accounts[0])

    def test_served_message(self) -> None:
        """A served request gives status 200, the request id and quota headers, the full
        usage, the non-streaming message with that usage, and the reply text; it burns
        quota and counts like an HTTP request."""
        body = conversation(2)
        answer = self.sim.answer(self.creds(), json.dumps(body).encode())
        self.assertEqual((answer.status, answer.ok, answer.error, answer.account), (200, True, None, "sim-1"))
        self.assertTrue(answer.request_id.startswith("req_sim"))
        self.assertEqual(answer.headers[UNIFIED + "status"], "allowed")
        self.assertEqual(answer.message["usage"], answer.usage)
        self.assertEqual(answer.message["content"], [{"type": "text", "text": answer.text}])
        self.assertEqual(len(answer.chunks), self.sim.deltas)
        shape = analyse_prompt(body)
        usage = answer.usage
        self.assertEqual(usage["input_tokens"] + usage["cache_creation_input_tokens"]
                         + usage["cache_read_input_tokens"], shape.total_tokens)
        self.assertEqual((self.sim.requests, self.sim.served, self.sim.responses[200]), (1, 1, 1))
        self.assertEqual(self.accounts[0].requests, 1)
        self.assertGreater(self.accounts[0].used_5h, 0)
        self.assertEqual(answer.json_body(), answer.message)

    def test_dict_body_and_explicit_now(self) -> None:
        """A dict body is answered like its JSON bytes; `now` replaces the reactor's
        clock for cache expiry and quota windows."""
        body = conversation(3, ttl=None)
        self.sim.answer(self.creds(), body, now=5_000.0)
        self.assertEqual(self.accounts[0].window_5h_start, 5_000.0)
        hit = self.sim.answer(self.creds(), json.dumps(body).encode(), now=5_299.0)
        self.assertGreater(hit.usage["cache_read_input_tokens"], 0)
        miss = self.sim.answer(self.creds(), body, now=5_299.0 + 300.0)
        self.assertEqual(miss.usage["cache_read_input_tokens"], 0)

    def test_output_token_controls(self) -> None:
        """x-sim-output-tokens among the headers sets the output; an explicit Overrides
        replaces the headers; max_tokens still bounds it; default_output_tokens sets
        it for every request without an override."""
        body = conversation(1, max_tokens=500)
        answer = self.sim.answer(self.creds() | {"x-sim-output-tokens": "300"}, body)
        self.assertEqual(answer.usage["output_tokens"], 300)
        answer = self.sim.answer(self.creds() | {"x-sim-output-tokens": "300"}, body,
                                 overrides=Overrides(output_tokens=42))
        self.assertEqual(answer.usage["output_tokens"], 42)
        answer = self.sim.answer(self.creds(), body, overrides=Overrides(output_tokens=3_000))
        self.assertEqual((answer.usage["output_tokens"], answer.message["stop_reason"]), (500, "max_tokens"))
        sim = SimulatedAnthropic(Clock(), simulated_accounts(1), default_output_tokens=77)
        answer = sim.answer(sim.accounts[0].credential_headers() | {"anthropic-beta": OAUTH_BETA}, body)
        self.assertEqual(answer.usage["output_tokens"], 77)

    def test_errors(self) -> None:
        """Missing or unknown credentials, a missing oauth beta, a bad override header,
        a malformed body and an injected status answer in the error shape, with no
        usage and no quota burn."""
        body = conversation(1)
        cases = [
            ({}, body, None, 401, "authentication_error"),
            ({"authorization": "Bearer nope", "anthropic-beta": OAUTH_BETA}, body, None, 401, "authentication_error"),
            (self.oauth(self.accounts[0], beta="claude-code-20250219"), body, None, 401, "authentication_error"),
            (self.creds() | {"x-sim-deltas": "many"}, body, None, 400, "invalid_request_error"),
            (self.creds(), b'{"model": ', None, 400, "invalid_request_error"),
            (self.creds(), dict(body, messages=[]), None, 400, "invalid_request_error"),
            (self.creds(), body, Overrides(status=529), 529, "overloaded_error"),
        ]
        for headers, raw, overrides, status, kind in cases:
            with self.subTest(status=status, headers=headers):
                answer = self.sim.answer(headers, raw, overrides=overrides)
                self.assertEqual((answer.status, answer.usage, answer.message), (status, None, None))
                self.assertEqual(answer.error[0], kind)
                error = answer.json_body()
                self.assertEqual(error["type"], "error")
                self.assertEqual(error["request_id"], answer.request_id)
        self.assertEqual(self.accounts[0].used_5h, 0)
        self.assertEqual(self.sim.injected, 1)

    def test_quota_429(self) -> None:
        """An account at capacity answers 429 with rejected headers and retry-after,
        names the account, and burns nothing."""
        self.accounts[0].used_5h = 5_000.0
        self.accounts[0].window_5h_start = 900.0
        answer = self.sim.answer(self.creds(), conversation(1))
        self.assertEqual((answer.status, answer.error[0], answer.account), (429, "rate_limit_error", "sim-1"))
        self.assertEqual(answer.headers[UNIFIED + "status"], "rejected")
        self.assertEqual(answer.retry_after, 900.0 + FIVE_HOURS - 1_000)
        self.assertEqual(self.accounts[0].used_5h, 5_000.0)
        self.assertEqual((self.sim.rejected, self.accounts[0].rejected), (1, 1))

    def test_count_tokens_path(self) -> None:
        """With the count_tokens path answer() counts the prompt and burns nothing."""
        body = conversation(3)
        answer = self.sim.answer(self.creds(), body, path="/v1/messages/count_tokens?beta=true")
        self.assertEqual(answer.message, {"input_tokens": analyse_prompt(body).total_tokens})
        self.assertIsNone(answer.usage)
        self.assertEqual(self.accounts[0].used_5h, 0)

    def test_honour_breakpoints(self) -> None:
        """With honour_breakpoints the prompt is cached up to its last breakpoint: a
        body marked on its newest message has no input tokens, a body without
        breakpoints caches nothing."""
        sim = SimulatedAnthropic(Clock(), simulated_accounts(1, 10**9), honour_breakpoints=True)
        creds = sim.accounts[0].credential_headers() | {"anthropic-beta": OAUTH_BETA}
        first = sim.answer(creds, conversation(2))
        self.assertEqual(first.usage["input_tokens"], 0)
        self.assertEqual(first.usage["cache_creation_input_tokens"], analyse_prompt(conversation(2)).total_tokens)
        second = sim.answer(creds, conversation(3))
        self.assertEqual(second.usage["cache_read_input_tokens"], analyse_prompt(conversation(2)).total_tokens)
        self.assertEqual(second.usage["input_tokens"], 0)
        bare = {"model": "claude-haiku-4-5-20251001", "max_tokens": 1,
                "messages": [{"role": "user", "content": "quota"}]}
        for _ in range(2):
            answer = sim.answer(creds, bare)
            self.assertEqual((answer.usage["cache_read_input_tokens"],
                              answer.usage["cache_creation_input_tokens"]), (0, 0))
            self.assertGreater(answer.usage["input_tokens"], 0)
        self.assertEqual(analyse_prompt(bare).last_breakpoint, None)
        system_only = dict(conversation(1))
        system_only["messages"] = [user("no marker here")]
        self.assertEqual(analyse_prompt(system_only).last_breakpoint, 0)

    def test_credential_headers(self) -> None:
        """An account's credential_headers are a bearer token for OAuth and x-api-key
        for API keys."""
        self.assertEqual(self.accounts[0].credential_headers(),
                         {"authorization": f"Bearer {self.accounts[0].credential}"})
        key = SimAccount("k", "sk-ant-api03-x", kind="apikey")
        self.assertEqual(key.credential_headers(), {"x-api-key": "sk-ant-api03-x"})

    def test_http_and_answer_agree(self) -> None:
        """The same requests over HTTP and through answer() on twin simulators get the
        same status, headers, usage, text and message: ids, cache hits and misses,
        quota filling up to a 429, errors and count_tokens included."""
        twin = SimulatedAnthropic(self.clock, simulated_accounts(2, 5_000))
        requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        for turns in (1, 2, 3, 3, 4):
            requests.append(("/v1/messages?beta=true", conversation(turns, stream=turns % 2 == 0), {}))
        requests.append(("/v1/messages/count_tokens?beta=true", conversation(2), {}))
        requests.append(("/v1/messages", conversation(1), {"x-sim-status": "500"}))
        requests.append(("/v1/messages", conversation(1), {"x-sim-output-tokens": "0"}))
        requests.append(("/v1/messages", conversation(2, stream=False), {"x-sim-output-tokens": "123"}))
        for i in range(12):  # until the 5k window is full
            requests.append(("/v1/messages", conversation(5 + i, stream=False), {}))
        statuses = Counter()
        for path, body, extra in requests:
            response, content = self.post(body, extra=extra, path=path)
            answer = twin.answer(self.oauth(twin.accounts[0]) | extra, json.dumps(body).encode(), path=path)
            statuses[answer.status] += 1
            self.assertEqual(response.code, answer.status)
            for name, value in answer.headers.items():
                self.assertEqual(header(response, name), value, name)
            if response.code == 200 and body.get("stream") and "count_tokens" not in path:
                events = dict(parse_sse(content))
                self.assertEqual(events["message_delta"]["usage"]["output_tokens"], answer.usage["output_tokens"])
                self.assertEqual(events["message_start"]["message"]["id"], answer.message["id"])
                deltas = [d["delta"]["text"] for n, d in parse_sse(content) if n == "content_block_delta"]
                self.assertEqual("".join(deltas), answer.text)
            else:
                self.assertEqual(json.loads(content), answer.json_body())
        self.assertEqual(set(statuses), {200, 400, 429, 500})
        for ours, theirs in zip(self.accounts, twin.accounts):
            self.assertEqual((ours.used_5h, ours.requests, ours.cache_read_tokens),
                             (theirs.used_5h, theirs.requests, theirs.cache_read_tokens))
        self.assertEqual((self.sim.requests, self.sim.responses), (twin.requests, twin.responses))
