"""Tests for nextclaude.sessions: session keys, compaction detection and the session table."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nextclaude import sessions
from nextclaude.sessions import (
    CONTINUATION_MARKER,
    LANDING_LAPSE,
    SIZE_DROP_MIN_PEAK,
    SUMMARY_MARKER,
    TTL_1H,
    TTL_5M,
    Moment,
    RequestFacts,
    Session,
    SessionTable,
    inspect_request,
)

# --- Claude Code 2.1.x shaped requests ------------------------------------

SESSION = "5f0c7a52-8d1e-4b7a-9f3e-2c6d1a0b9e47"
OTHER_SESSION = "0b6f3e1d-22aa-4c4e-8d51-7e9a3c2f1b60"
DEVICE = "9c2d" * 16
ACCOUNT_UUID = "1e5b8a90-3f4c-4d2e-b6a7-8c9d0e1f2a3b"

OPUS = "claude-opus-4-5-20251101"
SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-haiku-4-5-20251001"

MESSAGES = b"/v1/messages?beta=true"
COUNT_TOKENS = b"/v1/messages/count_tokens?beta=true"

MAIN_PROMPT = (
    "You are Claude Code, Anthropic's official CLI for Claude.\n"
    + "You are an interactive CLI tool that helps users with software engineering tasks. " * 150
)
SUBAGENT_PROMPT = (
    "You are an agent for Claude Code, Anthropic's official CLI for Claude. "
    "Given the user's message, you should use the tools available to complete the task. " * 40
)
TITLE_PROMPT = "Summarize this coding conversation in under 50 characters. Return only the title."
MAIN_TOOLS = ("Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "TodoWrite", "WebFetch")
SUBAGENT_TOOLS = ("Bash", "Glob", "Grep", "Read")

REMINDER = (
    "<system-reminder>\nAs you answer the user's questions, you can use the following context:\n"
    "# currentDate\nToday's date is 2025-11-25.\n</system-reminder>\n"
)
SUMMARY_REQUEST = (
    "Your task is to create a detailed summary of the conversation so far, paying close attention "
    "to the user's explicit requests and your previous actions.\nBefore providing your final summary, "
    "wrap your analysis in <analysis> tags.\n...\nPlease provide your summary in <summary> tags."
)
CONTINUATION = (
    CONTINUATION_MARKER
    + " that ran out of context. The conversation is summarized below:\nAnalysis:\n"
    "The user asked to fix the failing test...\n<summary>1. Primary Request and Intent: ...</summary>"
)


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def user(*content: Any) -> dict[str, Any]:
    """A user message: one string stays a string, anything else becomes blocks."""
    if len(content) == 1 and isinstance(content[0], str):
        return {"role": "user", "content": content[0]}
    return {"role": "user", "content": [text(c) if isinstance(c, str) else c for c in content]}


def assistant(*content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": [text(c) if isinstance(c, str) else c for c in content]}


def tool_use(ident: str, name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": ident, "name": name, "input": arguments}


def tool_result(ident: str, content: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": ident, "content": content}


def history(turns: int = 3, pad: int = 0) -> list[dict[str, Any]]:
    """A working conversation: a prompt, then tool calls and their results."""
    messages = [user(REMINDER, "The test suite fails in test_parser; please fix it.")]
    for i in range(turns):
        messages.append(
            assistant(f"Let me look at step {i}.", tool_use(f"toolu_{i:03d}", "Bash", command=f"pytest -k {i}"))
        )
        messages.append(user(tool_result(f"toolu_{i:03d}", f"output {i}\n" + "x" * pad)))
    messages.append(assistant("Found it; fixing now."))
    messages.append(user("Thanks, go ahead."))
    return messages


def cc_body(
    messages: list[dict[str, Any]],
    *,
    model: str = OPUS,
    system: str | None = MAIN_PROMPT,
    tools: tuple[str, ...] = MAIN_TOOLS,
    session: str | None = SESSION,
    user_id: str = "json",
    max_tokens: int | None = 32000,
    ttl: str | None | bool = "1h",
    cc_version: str = "2.1.7.a1b",
    compact_json: bool = True,
) -> bytes:
    """
    A request body in Claude Code's key order (model, messages, system,
    tools, metadata, max_tokens, thinking, stream), with the per-request
    billing block first in the system list and cache breakpoints on the
    system prompt and the last message.  C{ttl} False means no cache_control
    at all, None the default 5-minute one.  C{user_id} is "json" (2.1.x),
    "legacy", or "none" for no metadata.
    """
    messages = json.loads(json.dumps(messages))
    cache: dict[str, Any] | None = None
    if ttl is not False:
        cache = {"type": "ephemeral"} if ttl is None else {"type": "ephemeral", "ttl": ttl}
    if cache is not None and messages and isinstance(messages[-1]["content"], list):
        messages[-1]["content"][-1]["cache_control"] = cache
    body: dict[str, Any] = {"model": model, "messages": messages}
    if system is not None:
        blocks = [text(f"x-anthropic-billing-header: cc_version={cc_version}; cc_entrypoint=cli;")]
        prompt = text(system)
        if cache is not None:
            prompt["cache_control"] = cache
        blocks.append(prompt)
        body["system"] = blocks
    if tools:
        body["tools"] = [
            {
                "name": name,
                "description": f"The {name} tool.",
                "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
            }
            for name in tools
        ]
    if session is not None and user_id != "none":
        if user_id == "json":
            value = json.dumps(
                {"device_id": DEVICE, "account_uuid": ACCOUNT_UUID, "session_id": session},
                separators=(",", ":"),
            )
        else:
            value = f"user_{DEVICE}_account_{ACCOUNT_UUID}_session_{session}"
        body["metadata"] = {"user_id": value}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
        body["thinking"] = {"type": "enabled", "budget_tokens": 31999}
        body["stream"] = True
    separators = (",", ":") if compact_json else (", ", ": ")
    return json.dumps(body, separators=separators).encode("utf-8")


def inspect(body: bytes, path: bytes = MESSAGES, header: str | None = SESSION) -> RequestFacts:
    return inspect_request(path, None if header is None else header.encode("ascii"), body)


def main_request(messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> RequestFacts:
    return inspect(cc_body(history() if messages is None else messages, **kwargs))


def subagent_request(**kwargs: Any) -> RequestFacts:
    messages = [user("Find where parse_header is defined and list its callers.")]
    return inspect(cc_body(messages, model=SONNET, system=SUBAGENT_PROMPT, tools=SUBAGENT_TOOLS, **kwargs))


def quota_request() -> RequestFacts:
    return inspect(cc_body([user("quota")], model=HAIKU, system=None, tools=(), max_tokens=1, ttl=False))


def title_request() -> RequestFacts:
    """Title generation: a Haiku request without cache_control, not flagged as a side request."""
    messages = [user("The test suite fails in test_parser; please fix it.")]
    return inspect(cc_body(messages, model=HAIKU, system=TITLE_PROMPT, tools=(), max_tokens=512, ttl=False))


def count_tokens_request(messages: list[dict[str, Any]] | None = None) -> RequestFacts:
    body = cc_body(history() if messages is None else messages, user_id="none", max_tokens=None)
    return inspect(body, path=COUNT_TOKENS)


def compaction_messages(previous: bool = False) -> list[dict[str, Any]]:
    """
    A compaction request's messages: the whole history (with tool blocks, a
    role "system" entry and an earlier message quoting the phrase) plus the
    summary instruction as the last user message.  C{previous} makes the
    history itself start from an earlier compaction.
    """
    first = user(REMINDER, CONTINUATION) if previous else user(REMINDER, "Please fix test_parser.")
    return [
        first,
        assistant("Looking.", tool_use("toolu_a", "Read", file_path="/src/parser.py")),
        user(tool_result("toolu_a", "def parse(): ...")),
        {"role": "system", "content": "Conversation compacted earlier."},
        user("Why does the prompt say 'create a detailed summary of the conversation'?"),
        assistant("That is the compaction instruction.", tool_use("toolu_b", "Bash", command="ls")),
        user(tool_result("toolu_b", "parser.py tests/"), text(SUMMARY_REQUEST)),
    ]


def landing_messages(turns: int = 0) -> list[dict[str, Any]]:
    """A compacted conversation: the continuation summary first, then any later turns."""
    messages = [user(REMINDER, CONTINUATION)]
    for i in range(turns):
        messages.append(assistant(f"Continuing {i}.", tool_use(f"toolu_c{i}", "Edit", file_path="/src/parser.py")))
        messages.append(user(tool_result(f"toolu_c{i}", "ok")))
    return messages


def prefix_facts(size: int, *, compaction: bool = False, continuation: bool = False) -> RequestFacts:
    return RequestFacts("p:" + "0" * 32, "prefix", SONNET, size, TTL_5M, compaction, continuation, False)


# --- inspect_request --------------------------------------------------------


class PathTests(SynchronousTestCase):
    def test_messages_paths(self) -> None:
        """/v1/messages and /v1/messages/count_tokens, with or without a query string, get a session key."""
        body = cc_body(history())
        for path in (b"/v1/messages", MESSAGES, b"/v1/messages/count_tokens", COUNT_TOKENS):
            self.assertEqual(inspect(body, path=path).session_key, "s:" + SESSION, path)

    def test_other_paths(self) -> None:
        """Other paths get no session, no model and no flags, but still the body size."""
        body = cc_body(compaction_messages())
        for path in (b"/v1/models", b"/", b"/v1/messagesx", b"/v1/messages/", b"/v1/complete", b""):
            facts = inspect(body, path=path)
            self.assertEqual(
                facts, RequestFacts(None, None, None, len(body), TTL_5M, False, False, False, False), path
            )


class SessionKeyTests(SynchronousTestCase):
    def test_header_wins(self) -> None:
        """The session header takes precedence over metadata naming another session."""
        facts = inspect(cc_body(history(), session=OTHER_SESSION), header=SESSION)
        self.assertEqual((facts.session_key, facts.key_source), ("s:" + SESSION, "header"))

    def test_header_is_stripped(self) -> None:
        """Whitespace around the header value is not part of the key."""
        facts = inspect_request(MESSAGES, b"  " + SESSION.encode() + b"\t", cc_body(history(), user_id="none"))
        self.assertEqual(facts.session_key, "s:" + SESSION)

    def test_metadata_json_string(self) -> None:
        """Without the header, the session id comes from metadata.user_id's JSON string."""
        facts = inspect(cc_body(history()), header=None)
        self.assertEqual((facts.session_key, facts.key_source), ("s:" + SESSION, "metadata"))

    def test_metadata_legacy(self) -> None:
        """The legacy user_<hex>_account_<uuid>_session_<uuid> form gives the same key."""
        facts = inspect(cc_body(history(), user_id="legacy"), header=None)
        self.assertEqual((facts.session_key, facts.key_source), ("s:" + SESSION, "metadata"))

    def test_metadata_legacy_without_account(self) -> None:
        """A legacy user_id with an empty account part still yields the session id."""
        body = json.dumps(
            {"model": OPUS, "messages": [user("hi")], "metadata": {"user_id": f"user_{DEVICE}_account__session_{SESSION}"}}
        ).encode()
        self.assertEqual(inspect(body, header=None).session_key, "s:" + SESSION)

    def test_header_and_metadata_keys_equal(self) -> None:
        """The same uuid from the header and from metadata gives equal keys; the source tells them apart."""
        by_header = inspect(cc_body(history(), user_id="none"), header=SESSION)
        by_json = inspect(cc_body(history()), header=None)
        by_legacy = inspect(cc_body(history(), user_id="legacy"), header=None)
        self.assertEqual(by_header.session_key, by_json.session_key)
        self.assertEqual(by_header.session_key, by_legacy.session_key)
        self.assertEqual(
            [by_header.key_source, by_json.key_source, by_legacy.key_source], ["header", "metadata", "metadata"]
        )

    def test_metadata_other_layouts(self) -> None:
        """Metadata serialised with spaces, or with user_id not first, is still read."""
        spaced = cc_body(history(), compact_json=False)
        self.assertEqual(inspect(spaced, header=None).session_key, "s:" + SESSION)
        data = json.loads(cc_body(history()))
        data["metadata"] = {"tag": "x", "user_id": data["metadata"]["user_id"]}
        self.assertEqual(inspect(json.dumps(data).encode(), header=None).session_key, "s:" + SESSION)

    def test_metadata_decoy_in_tool_input(self) -> None:
        """A user_id key inside a tool call's input is not mistaken for the session's metadata."""
        messages = history()
        messages.append(assistant(tool_use("toolu_z", "Bash", user_id="user_1_account_2_session_decoy")))
        messages.append(user(tool_result("toolu_z", "done")))
        data = json.loads(cc_body(messages))
        # Another client's key order: metadata before messages.
        reordered = {"metadata": data.pop("metadata"), **data}
        self.assertEqual(inspect(json.dumps(reordered).encode(), header=None).session_key, "s:" + SESSION)

    def test_bad_headers_fall_back(self) -> None:
        """An empty, blank, overlong, non-printable or non-ASCII header falls back to metadata."""
        body = cc_body(history(), session=OTHER_SESSION)
        for header in (b"", b"   ", b"a" * 201, b"abc\x00def", b"abc\x1bdef", "s\u00e9ssion".encode("utf-8")):
            facts = inspect_request(MESSAGES, header, body)
            self.assertEqual((facts.session_key, facts.key_source), ("s:" + OTHER_SESSION, "metadata"), header)
        facts = inspect_request(MESSAGES, b"a" * 200, body)
        self.assertEqual(facts.session_key, "s:" + "a" * 200)

    def test_agent_id_marks_a_subagent_request(self) -> None:
        """
        Claude Code's x-claude-code-agent-id (on a subagent's requests, as
        Claude Code 2.1.197 sends them) is kept as the request's agent id
        when it is a sane id; an absent, blank, overlong, non-printable or
        non-ASCII one is none.  The session key is the session's either way.
        """
        body = cc_body(history())
        facts = inspect_request(MESSAGES, SESSION.encode(), body, agent_header=b"ac4d2479465dd9c5c")
        self.assertEqual((facts.agent_id, facts.session_key), ("ac4d2479465dd9c5c", "s:" + SESSION))
        self.assertIsNone(inspect_request(MESSAGES, SESSION.encode(), body).agent_id)
        for header in (b"", b"   ", b"a" * 201, b"abc\x00def", b"abc\x1bdef", "\u00e9".encode("utf-8")):
            facts = inspect_request(MESSAGES, SESSION.encode(), body, agent_header=header)
            self.assertEqual((facts.agent_id, facts.session_key), (None, "s:" + SESSION), header)

    def test_bad_metadata_falls_back_to_prefix(self) -> None:
        """A user_id without a usable session id leads to the prefix hash."""
        for user_id in ("", "not a session", '{"device_id":"d"}', '{"session_id":""}', '{"session_id":5}', "{broken"):
            data = json.loads(cc_body(history(), user_id="none"))
            data["metadata"] = {"user_id": user_id}
            facts = inspect(json.dumps(data).encode(), header=None)
            self.assertEqual(facts.key_source, "prefix", user_id)

    def test_prefix_hash_shape(self) -> None:
        """Without any session id the key is "p:" and 32 hex digits."""
        facts = inspect(cc_body(history(), user_id="none"), header=None)
        self.assertEqual(facts.key_source, "prefix")
        self.assertRegex(facts.session_key, r"\Ap:[0-9a-f]{32}\Z")

    def test_prefix_hash_ignores_billing_block_and_messages(self) -> None:
        """The billing block's per-request value and the messages (first one included) do not change the key."""
        keys = {
            inspect(cc_body(history(), user_id="none"), header=None).session_key,
            inspect(cc_body(history(turns=7), user_id="none", cc_version="2.1.8.ff0"), header=None).session_key,
            inspect(cc_body(landing_messages(2), user_id="none", cc_version="2.1.8.00d"), header=None).session_key,
            inspect(cc_body(history(), user_id="none", ttl=None), header=None).session_key,
        }
        self.assertEqual(len(keys), 1)

    def test_prefix_hash_changes_with_prefix(self) -> None:
        """Model, system text, tool names and tool order each change the key."""
        base = inspect(cc_body(history(), user_id="none"), header=None).session_key
        variants = [
            cc_body(history(), user_id="none", model=SONNET),
            cc_body(history(), user_id="none", system=MAIN_PROMPT + " Be brief."),
            cc_body(history(), user_id="none", tools=MAIN_TOOLS + ("NotebookEdit",)),
            cc_body(history(), user_id="none", tools=tuple(reversed(MAIN_TOOLS))),
            cc_body(history(), user_id="none", tools=()),
        ]
        keys = [inspect(body, header=None).session_key for body in variants]
        self.assertNotIn(base, keys)
        self.assertEqual(len(set(keys)), len(keys))

    def test_prefix_hash_string_system(self) -> None:
        """A plain-string system prompt is hashed too, and differently from another string."""
        one = json.dumps({"model": SONNET, "system": "You are helpful.", "messages": [user("a")]}).encode()
        two = json.dumps({"model": SONNET, "system": "You are terse.", "messages": [user("a")]}).encode()
        self.assertNotEqual(inspect(one, header=None).session_key, inspect(two, header=None).session_key)
        self.assertTrue(inspect(one, header=None).session_key.startswith("p:"))


class FieldTests(SynchronousTestCase):
    def test_model(self) -> None:
        """The model is read from the start of the body without decoding it."""
        self.assertEqual(main_request().model, OPUS)
        self.assertEqual(subagent_request().model, SONNET)
        self.assertEqual(quota_request().model, HAIKU)

    def test_model_late_in_body(self) -> None:
        """A model serialised after 4 KB is taken from the decoded body when the body is decoded anyway."""
        data = json.loads(cc_body(history(pad=5000), user_id="none"))
        data["model"] = data.pop("model")
        late = json.dumps(data).encode()
        self.assertEqual(inspect(late, header=None).model, OPUS)
        # With a header nothing needs the decoded body, and the cheap scan stops at 4 KB.
        self.assertIsNone(inspect(late).model)

    def test_body_size(self) -> None:
        """body_size is the byte length of the body."""
        body = cc_body(history())
        self.assertEqual(inspect(body).body_size, len(body))

    def test_cache_ttl(self) -> None:
        """A 1h cache_control anywhere gives 3600 s; other cache_control 300 s; none at all is flagged."""
        one_hour = main_request(ttl="1h")
        self.assertEqual((one_hour.cache_ttl, one_hour.uses_cache), (TTL_1H, True))
        default = main_request(ttl=None)
        self.assertEqual((default.cache_ttl, default.uses_cache), (TTL_5M, True))
        explicit = main_request(ttl="5m")
        self.assertEqual((explicit.cache_ttl, explicit.uses_cache), (TTL_5M, True))
        uncached = main_request(ttl=False)
        self.assertEqual((uncached.cache_ttl, uncached.uses_cache), (TTL_5M, False))
        spaced = inspect(cc_body(history(), compact_json=False))
        self.assertEqual(spaced.cache_ttl, TTL_1H)

    def test_cache_ttl_only_on_message(self) -> None:
        """A 1h breakpoint on a late block is found after earlier 5-minute ones."""
        data = json.loads(cc_body(history(), ttl=None))
        data["tools"][-1]["cache_control"] = {"ttl": "1h", "type": "ephemeral"}
        self.assertEqual(inspect(json.dumps(data).encode()).cache_ttl, TTL_1H)

    def test_quoted_ttl_is_not_a_breakpoint(self) -> None:
        """cache_control text quoted inside a message is not a cache breakpoint."""
        quoted = 'Use "cache_control": {"type": "ephemeral", "ttl": "1h"} in the request.'
        facts = main_request([user(quoted)], ttl=False)
        self.assertEqual((facts.cache_ttl, facts.uses_cache), (TTL_5M, False))

    def test_side_kinds(self) -> None:
        """
        The logs' side kind: count_tokens is "count", a max_tokens 1 check
        "quota", a Haiku title "title"; a main request has none.
        """
        self.assertEqual(count_tokens_request().side_kind, "count")
        self.assertEqual(quota_request().side_kind, "quota")
        self.assertEqual(title_request().side_kind, "title")
        self.assertIsNone(main_request().side_kind)

    def test_side_requests(self) -> None:
        """max_tokens 1 and count_tokens are side requests; ordinary and title requests are not."""
        self.assertTrue(quota_request().is_side_request)
        self.assertTrue(count_tokens_request().is_side_request)
        self.assertFalse(main_request().is_side_request)
        self.assertFalse(main_request(max_tokens=10).is_side_request)
        self.assertFalse(main_request(max_tokens=100).is_side_request)
        self.assertFalse(title_request().is_side_request)
        self.assertFalse(subagent_request().is_side_request)
        self.assertTrue(inspect(cc_body(history(), user_id="none", max_tokens=1), header=None).is_side_request)

    def test_ordinary_requests_not_compaction(self) -> None:
        """Main, subagent, title, quota and count_tokens requests are neither compactions nor continuations."""
        for facts in (
            main_request(),
            subagent_request(),
            title_request(),
            quota_request(),
            count_tokens_request(),
        ):
            self.assertEqual(facts.session_key, "s:" + SESSION)
            self.assertFalse(facts.is_compaction)
            self.assertFalse(facts.starts_with_continuation)


class CompactionDetectionTests(SynchronousTestCase):
    def test_compaction_request(self) -> None:
        """The summary instruction in the last user message, after tool blocks and a quoting message, is a compaction."""
        facts = main_request(compaction_messages())
        self.assertTrue(facts.is_compaction)
        self.assertFalse(facts.starts_with_continuation)
        self.assertFalse(facts.is_side_request)

    def test_compaction_string_content(self) -> None:
        """The instruction as a plain-string last user message counts."""
        messages = history() + [user(SUMMARY_REQUEST)]
        self.assertTrue(main_request(messages).is_compaction)

    def test_compaction_followed_by_system_entry(self) -> None:
        """A role "system" entry after the instruction does not hide it: the last *user* message decides."""
        messages = compaction_messages() + [{"role": "system", "content": "note"}]
        self.assertTrue(main_request(messages).is_compaction)

    def test_second_compaction(self) -> None:
        """A compaction of an already compacted conversation is a compaction that also starts with the marker."""
        facts = main_request(compaction_messages(previous=True))
        self.assertTrue(facts.is_compaction)
        self.assertTrue(facts.starts_with_continuation)

    def test_marker_only_in_earlier_message(self) -> None:
        """The phrase in an earlier message only (quoted, or an old instruction) is not a compaction."""
        messages = compaction_messages()[:-1] + [user(tool_result("toolu_b", "ok"), text("Carry on."))]
        self.assertIn(SUMMARY_MARKER, cc_body(messages))
        self.assertFalse(main_request(messages).is_compaction)
        old = history() + [user(SUMMARY_REQUEST), assistant("<summary>...</summary>"), user("next")]
        self.assertFalse(main_request(old).is_compaction)

    def test_marker_in_tool_result(self) -> None:
        """The phrase inside a tool result of the last user message is file content, not the instruction."""
        messages = history() + [
            assistant(tool_use("toolu_f", "Read", file_path="prompts.py")),
            user(tool_result("toolu_f", SUMMARY_REQUEST)),
        ]
        self.assertFalse(main_request(messages).is_compaction)

    def test_marker_in_system_prompt(self) -> None:
        """The phrase in the system prompt is not a compaction."""
        facts = main_request(system=MAIN_PROMPT + SUMMARY_REQUEST)
        self.assertFalse(facts.is_compaction)

    def test_continuation_forms(self) -> None:
        """The first message starts with the marker as a string, after a system-reminder block, or after whitespace."""
        for first in (
            user(CONTINUATION),
            user(REMINDER, CONTINUATION),
            user("\n  " + CONTINUATION),
            user(text(CONTINUATION)),
        ):
            facts = main_request([first, assistant("ok"), user("go on")])
            self.assertTrue(facts.starts_with_continuation, first)
            self.assertFalse(facts.is_compaction)

    def test_continuation_elsewhere(self) -> None:
        """The marker later in the first message, or in a later message, is not a continuation."""
        for messages in (
            [user("Quote: " + CONTINUATION)],
            history() + [user(CONTINUATION)],
            [user(tool_result("toolu_x", CONTINUATION))],
        ):
            self.assertFalse(main_request(messages).starts_with_continuation, messages)

    def test_decodes_at_most_once(self) -> None:
        """Ordinary requests are never decoded; one with both markers, or without a session id, is decoded once."""
        calls: list[int] = []
        real = sessions._loads

        def counting(data: Any) -> Any:
            calls.append(len(data))
            return real(data)

        self.patch(sessions, "_loads", counting)
        for facts in (main_request(), subagent_request(), quota_request(), title_request()):
            self.assertIsNotNone(facts.session_key)
        inspect(cc_body(history()), header=None)
        self.assertEqual(calls, [])
        main_request(compaction_messages(previous=True))
        self.assertEqual(len(calls), 1)
        inspect(cc_body(compaction_messages(previous=True), user_id="none"), header=None)
        self.assertEqual(len(calls), 2)

    def test_large_body(self) -> None:
        """A multi-megabyte compaction request is detected (one decode) and an ordinary one needs none."""
        big = history(turns=40, pad=50_000)
        self.assertGreater(len(cc_body(big)), 2_000_000)
        self.assertTrue(main_request(big + [user(SUMMARY_REQUEST)]).is_compaction)
        self.assertFalse(main_request(big).is_compaction)


class MalformedBodyTests(SynchronousTestCase):
    def test_malformed_bodies(self) -> None:
        """Invalid JSON, non-objects, non-UTF-8 and empty bodies never raise; the header still keys the session."""
        compaction = cc_body(compaction_messages(previous=True))
        for body in (
            b"",
            b"{",
            b"[]",
            b"[1, 2]",
            b"null",
            b'"just a string"',
            b"\xff\xfe\x00garbage",
            b'{"model": "\xff\xfe", "messages": "x"}',
            compaction[: len(compaction) // 2],
            b'{"messages": 5, "system": 7, "tools": "x", "metadata": []}',
            b'{"messages": [5, null, {"role": "user", "content": 7}], "max_tokens": true}',
            b"[" * 100_000,
        ):
            facts = inspect(body)
            self.assertEqual((facts.session_key, facts.key_source), ("s:" + SESSION, "header"), body[:40])
            self.assertEqual(facts.body_size, len(body))
            self.assertFalse(facts.is_compaction)
            self.assertFalse(inspect(body, header=None).is_compaction)

    def test_truncated_body_without_header(self) -> None:
        """A truncated body without a header gives no session, but the cheap scans' findings."""
        body = cc_body(history(), user_id="none")[:-200]
        facts = inspect(body, header=None)
        self.assertIsNone(facts.session_key)
        self.assertEqual(facts.model, OPUS)
        self.assertEqual(facts.cache_ttl, TTL_1H)

    @settings(max_examples=300, database=None)
    @given(
        body=st.binary(max_size=512),
        path=st.sampled_from([MESSAGES, COUNT_TOKENS, b"/v1/models", b"/v1/messages", b"?"]),
        header=st.none() | st.binary(max_size=64),
    )
    def test_random_bytes(self, body: bytes, path: bytes, header: bytes | None) -> None:
        """Random bodies, paths and headers never raise and report the body size."""
        facts = inspect_request(path, header, body)
        self.assertEqual(facts.body_size, len(body))

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["model", "messages", "system", "tools", "metadata", "role", "content", "text",
                             "type", "user_id", "max_tokens", "name", "cache_control", "ttl"]),
            children,
            max_size=5,
        ),
        max_leaves=30,
    )

    @settings(max_examples=300, database=None)
    @given(value=json_values, extra=st.sampled_from([b"", SUMMARY_MARKER, CONTINUATION_MARKER.encode()]))
    def test_random_json(self, value: Any, extra: bytes) -> None:
        """Arbitrary JSON shapes, with the markers thrown in, never raise."""
        body = json.dumps(value).encode() + extra
        inspect_request(MESSAGES, None, body)
        if isinstance(value, dict):
            value = dict(value, note=extra.decode())
            inspect_request(MESSAGES, None, json.dumps(value).encode())

    @settings(max_examples=100, database=None)
    @given(cut=st.integers(min_value=0, max_value=10_000), junk=st.binary(max_size=8))
    def test_damaged_compaction(self, cut: int, junk: bytes) -> None:
        """A compaction request cut short or with junk spliced in never raises."""
        body = cc_body(compaction_messages(previous=True), user_id="legacy")
        cut = cut % (len(body) + 1)
        inspect_request(MESSAGES, None, body[:cut] + junk + body[cut + len(junk):])
        inspect_request(MESSAGES, None, body[:cut])


# --- SessionTable -----------------------------------------------------------


class SessionTests(SynchronousTestCase):
    def test_cycle_costs(self) -> None:
        """Usage adds to the cycle; expected cost is the mean of the last five completed cycles."""
        session = Session("s:x", "header")
        self.assertIsNone(session.expected_cycle_cost())
        session.record_usage(100)
        session.record_usage(-5)
        session.record_usage(True)
        self.assertEqual(session.cycle_tokens, 100)
        table = SessionTable()
        facts = main_request(compaction_messages())
        landing = main_request(landing_messages())
        now = 0.0
        for cost in (100, 200, 300, 400, 500, 600, 700):
            session, _ = table.observe(main_request(), now)
            session.cycle_tokens = 0
            session.record_usage(cost)
            table.observe(facts, now + 1)
            table.observe(landing, now + 2)
            now += 10
        self.assertEqual(session.compactions, 7)
        self.assertEqual(session.cycle_costs, [300, 400, 500, 600, 700])
        self.assertEqual(session.expected_cycle_cost(), 500)
        self.assertEqual(session.cycle_tokens, 0)

    def test_idle_expired(self) -> None:
        """A session is cold strictly after its TTL has passed since it was last seen."""
        session = Session("s:x", "header", ttl=TTL_5M, last_seen=1000.0)
        self.assertFalse(session.idle_expired(1300.0))
        self.assertTrue(session.idle_expired(1300.5))


class TableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = SessionTable()

    def observe(self, facts: RequestFacts, now: float) -> Moment:
        return self.table.observe(facts, now)[1]

    def test_no_key(self) -> None:
        """Requests without a session key create nothing."""
        facts = inspect(b"{}", path=b"/v1/models")
        self.assertEqual(self.table.observe(facts, 1.0), (None, Moment.NONE))
        self.assertEqual(len(self.table), 0)

    def test_new_session(self) -> None:
        """The first request creates the session (source recorded) and is no moment, however late."""
        session, moment = self.table.observe(main_request(), 1e9)
        self.assertEqual(moment, Moment.NONE)
        self.assertEqual((session.key, session.key_source, session.last_seen, session.ttl),
                         ("s:" + SESSION, "header", 1e9, TTL_1H))
        self.assertIs(self.table.get("s:" + SESSION), session)
        self.assertEqual(list(self.table.sessions()), [session])

    def test_one_session_for_all_threads(self) -> None:
        """Main thread, subagent, title, quota and count_tokens requests share one session and are never moments."""
        moments = [
            self.observe(facts, 100.0 + i)
            for i, facts in enumerate(
                [main_request(), subagent_request(), quota_request(), title_request(), count_tokens_request(),
                 main_request(history(turns=5)), subagent_request()]
            )
        ]
        self.assertEqual(set(moments), {Moment.NONE})
        self.assertEqual(len(self.table), 1)
        session = self.table.get("s:" + SESSION)
        self.assertEqual((session.compactions, session.compaction_pending_since), (0, None))

    def test_compaction_then_landing(self) -> None:
        """Compaction, its retry, then exactly one landing; later requests of the cycle are no moment."""
        self.observe(main_request(), 0.0)
        session = self.table.get("s:" + SESSION)
        session.record_usage(50_000)
        compaction = main_request(compaction_messages())
        self.assertEqual(self.observe(compaction, 10.0), Moment.COMPACTION)
        self.assertEqual((session.compactions, session.cycle_costs, session.cycle_tokens), (1, [50_000], 0))
        self.assertEqual(session.compaction_pending_since, 10.0)
        session.record_usage(7)
        self.assertEqual(self.observe(compaction, 25.0), Moment.COMPACTION)
        self.assertEqual((session.compactions, session.cycle_costs, session.cycle_tokens), (1, [50_000], 7))
        self.assertEqual(self.observe(main_request(landing_messages()), 40.0), Moment.LANDING)
        self.assertIsNone(session.compaction_pending_since)
        for i in range(1, 4):
            self.assertEqual(self.observe(main_request(landing_messages(i)), 40.0 + i), Moment.NONE)

    def test_side_and_subagent_do_not_consume_landing(self) -> None:
        """Subagent and side requests between compaction and landing (even ones carrying the marker) leave it pending."""
        self.observe(main_request(), 0.0)
        self.observe(main_request(compaction_messages()), 10.0)
        self.assertEqual(self.observe(subagent_request(), 20.0), Moment.NONE)
        self.assertEqual(self.observe(quota_request(), 21.0), Moment.NONE)
        self.assertEqual(self.observe(title_request(), 22.0), Moment.NONE)
        self.assertEqual(self.observe(count_tokens_request(landing_messages()), 23.0), Moment.NONE)
        self.assertEqual(self.observe(main_request(landing_messages()), 30.0), Moment.LANDING)

    def test_side_compaction_ignored(self) -> None:
        """A count_tokens of a compaction request opens no cycle."""
        self.observe(main_request(), 0.0)
        self.assertEqual(self.observe(count_tokens_request(compaction_messages()), 5.0), Moment.NONE)
        self.assertEqual(self.table.get("s:" + SESSION).compactions, 0)

    def test_landing_lapses(self) -> None:
        """A landing 600 s after the compaction still lands; after that it lapses silently."""
        compaction = main_request(compaction_messages())
        landing = main_request(landing_messages())
        self.observe(compaction, 0.0)
        self.assertEqual(self.observe(landing, LANDING_LAPSE), Moment.LANDING)
        other = SessionTable()
        other.observe(compaction, 0.0)
        self.assertEqual(other.observe(main_request(), 300.0)[1], Moment.NONE)
        session, moment = other.observe(landing, LANDING_LAPSE + 0.5)
        self.assertEqual(moment, Moment.NONE)
        self.assertIsNone(session.compaction_pending_since)

    def test_compaction_after_lapse_opens_cycle(self) -> None:
        """A compaction after the previous one lapsed is a new cycle, not a retry."""
        compaction = main_request(compaction_messages())
        self.observe(compaction, 0.0)
        self.observe(main_request(), 300.0)
        self.observe(compaction, 900.0)
        session = self.table.get("s:" + SESSION)
        self.assertEqual((session.compactions, session.compaction_pending_since), (2, 900.0))

    def test_second_compaction_is_not_landing(self) -> None:
        """A compaction whose history starts with the continuation marker is a compaction, not a landing."""
        self.observe(main_request(compaction_messages()), 0.0)
        self.observe(main_request(landing_messages()), 10.0)
        self.assertEqual(self.observe(main_request(compaction_messages(previous=True)), 100.0), Moment.COMPACTION)
        self.assertEqual(self.table.get("s:" + SESSION).compactions, 2)
        self.assertEqual(self.observe(main_request(landing_messages()), 110.0), Moment.LANDING)

    def test_idle_five_minutes(self) -> None:
        """A session asking for the default cache is idle after 300 s, once."""
        facts = main_request(ttl=None)
        self.observe(facts, 0.0)
        self.assertEqual(self.observe(facts, 300.0), Moment.NONE)
        self.assertEqual(self.observe(facts, 600.5), Moment.IDLE)
        self.assertEqual(self.observe(facts, 601.0), Moment.NONE)

    def test_idle_one_hour(self) -> None:
        """A session asking for 1 h caching is not idle after 5 minutes, only after an hour."""
        facts = main_request(ttl="1h")
        self.observe(facts, 0.0)
        self.assertEqual(self.observe(facts, 301.0), Moment.NONE)
        self.assertEqual(self.observe(facts, 301.0 + TTL_1H + 1), Moment.IDLE)

    def test_ttl_follows_latest_main_request(self) -> None:
        """The TTL is that of the latest request with cache_control; uncached and side requests leave it."""
        self.observe(main_request(ttl="1h"), 0.0)
        session = self.table.get("s:" + SESSION)
        self.observe(title_request(), 1.0)
        self.observe(quota_request(), 2.0)
        self.assertEqual(session.ttl, TTL_1H)
        self.assertEqual(self.observe(main_request(), 400.0), Moment.NONE)
        self.observe(main_request(ttl=None), 401.0)
        self.assertEqual(session.ttl, TTL_5M)

    def test_side_request_keeps_cache_clock(self) -> None:
        """Side requests do not count as activity that keeps the cache warm."""
        self.observe(main_request(ttl=None), 0.0)
        self.observe(quota_request(), 200.0)
        self.observe(count_tokens_request(), 250.0)
        self.assertEqual(self.table.get("s:" + SESSION).last_seen, 0.0)
        self.assertEqual(self.observe(main_request(ttl=None), 301.0), Moment.IDLE)

    def test_subagent_request_keeps_cache_clock_and_moments(self) -> None:
        """
        A subagent's request (its x-claude-code-agent-id) is cached apart
        from the main thread: it does not keep the session warm, nor use
        up its idle moment or its landing.
        """
        from dataclasses import replace

        self.observe(main_request(compaction_messages(), ttl=None), 0.0)
        agent = replace(subagent_request(), agent_id="ac4d2479465dd9c5c")
        self.assertEqual(self.observe(agent, 200.0), Moment.NONE)
        self.assertEqual(self.table.get("s:" + SESSION).last_seen, 0.0)
        self.assertEqual(self.observe(agent, 301.0), Moment.NONE)
        self.assertEqual(self.table.get("s:" + SESSION).compaction_pending_since, 0.0)
        self.assertEqual(self.observe(main_request(landing_messages(), ttl=None), 302.0), Moment.IDLE)

    def test_idle_wins_over_landing(self) -> None:
        """An idle landing request reports IDLE but still consumes the pending landing."""
        self.observe(main_request(compaction_messages(), ttl=None), 0.0)
        self.assertEqual(self.observe(main_request(landing_messages(), ttl=None), 400.0), Moment.IDLE)
        self.assertIsNone(self.table.get("s:" + SESSION).compaction_pending_since)
        self.assertEqual(self.observe(main_request(landing_messages(1), ttl=None), 401.0), Moment.NONE)

    def test_idle_compaction_still_counted(self) -> None:
        """A compaction request arriving after idling reports IDLE yet opens the cycle and arms the landing."""
        self.observe(main_request(ttl=None), 0.0)
        self.assertEqual(self.observe(main_request(compaction_messages(), ttl=None), 500.0), Moment.IDLE)
        session = self.table.get("s:" + SESSION)
        self.assertEqual((session.compactions, session.compaction_pending_since), (1, 500.0))
        self.assertEqual(self.observe(main_request(landing_messages(), ttl=None), 510.0), Moment.LANDING)

    def test_size_drop(self) -> None:
        """A prefix session whose body falls below half its 50 KB+ peak has a size drop; the peak resets."""
        self.observe(prefix_facts(10_000), 0.0)
        self.observe(prefix_facts(80_000), 1.0)
        session = self.table.get("p:" + "0" * 32)
        session.record_usage(900)
        self.assertEqual(session.peak_body, 80_000)
        self.assertEqual(self.observe(prefix_facts(41_000), 2.0), Moment.NONE)
        self.assertEqual(self.observe(prefix_facts(39_000), 3.0), Moment.SIZE_DROP)
        self.assertEqual((session.peak_body, session.compactions, session.cycle_costs), (39_000, 1, [900]))
        self.assertEqual(self.observe(prefix_facts(19_000), 4.0), Moment.NONE)
        self.assertEqual(session.peak_body, 39_000)

    def test_size_drop_needs_peak(self) -> None:
        """Below a 50 KB peak a drop is no moment."""
        self.observe(prefix_facts(SIZE_DROP_MIN_PEAK - 1), 0.0)
        self.assertEqual(self.observe(prefix_facts(100), 1.0), Moment.NONE)
        self.observe(prefix_facts(SIZE_DROP_MIN_PEAK), 2.0)
        self.assertEqual(self.observe(prefix_facts(100), 3.0), Moment.SIZE_DROP)

    def test_size_drop_only_for_prefix_sessions(self) -> None:
        """A header-keyed session never has a size drop, and keeps no peak."""
        self.observe(main_request(history(turns=10, pad=10_000)), 0.0)
        self.assertEqual(self.observe(main_request([user("hi")]), 1.0), Moment.NONE)
        self.assertEqual(self.table.get("s:" + SESSION).peak_body, 0)

    def test_size_drop_ignores_side_requests(self) -> None:
        """A tiny side request of a prefix session is not a size drop."""
        self.observe(prefix_facts(80_000), 0.0)
        side = RequestFacts("p:" + "0" * 32, "prefix", HAIKU, 300, TTL_5M, False, False, True)
        self.assertEqual(self.observe(side, 1.0), Moment.NONE)
        self.assertEqual(self.table.get("p:" + "0" * 32).peak_body, 80_000)

    def test_prefix_session_compaction_and_landing(self) -> None:
        """A prefix session with the markers lands once; the shrunken landing does not add a second cycle."""
        big = inspect(cc_body(history(turns=10, pad=10_000), user_id="none"), header=None)
        compaction = inspect(cc_body(history(turns=10, pad=10_000) + [user(SUMMARY_REQUEST)], user_id="none"),
                             header=None)
        landing = inspect(cc_body(landing_messages(), user_id="none"), header=None)
        self.assertEqual(len({big.session_key, compaction.session_key, landing.session_key}), 1)
        self.observe(big, 0.0)
        self.assertEqual(self.observe(compaction, 1.0), Moment.COMPACTION)
        self.assertEqual(self.observe(landing, 2.0), Moment.LANDING)
        session = self.table.get(big.session_key)
        self.assertEqual((session.compactions, session.peak_body), (1, landing.body_size))

    def test_size_drop_after_compaction_is_the_landing(self) -> None:
        """A size drop while a compaction is pending ends it without counting another cycle."""
        self.observe(prefix_facts(80_000), 0.0)
        self.assertEqual(self.observe(prefix_facts(90_000, compaction=True), 1.0), Moment.COMPACTION)
        self.assertEqual(self.observe(prefix_facts(5_000), 2.0), Moment.SIZE_DROP)
        session = self.table.get("p:" + "0" * 32)
        self.assertEqual((session.compactions, session.compaction_pending_since), (1, None))

    def test_lru_bound(self) -> None:
        """Over max_sessions, the least recently requested session is evicted."""
        table = SessionTable(max_sessions=3)
        for i, name in enumerate("abc"):
            table.observe(RequestFacts(f"s:{name}", "header", None, 1, TTL_5M, False, False, False), i)
        table.observe(RequestFacts("s:a", "header", None, 1, TTL_5M, False, False, True), 3.0)
        table.observe(RequestFacts("s:d", "header", None, 1, TTL_5M, False, False, False), 4.0)
        self.assertEqual(sorted(s.key for s in table.sessions()), ["s:a", "s:c", "s:d"])
        self.assertEqual(len(table), 3)
        self.assertIsNone(table.get("s:b"))

    def test_idle_eviction(self) -> None:
        """Sessions idle longer than idle_eviction are dropped as later requests arrive."""
        table = SessionTable(idle_eviction=100.0)
        for key, now in (("s:a", 0.0), ("s:b", 50.0), ("s:c", 120.0)):
            table.observe(RequestFacts(key, "header", None, 1, TTL_5M, False, False, False), now)
        self.assertEqual([s.key for s in table.sessions()], ["s:b", "s:c"])
        table.observe(RequestFacts("s:c", "header", None, 1, TTL_5M, False, False, False), 400.0)
        self.assertEqual([s.key for s in table.sessions()], ["s:c"])

    def test_max_sessions_validated(self) -> None:
        """A table must hold at least one session."""
        self.assertRaises(ValueError, SessionTable, max_sessions=0)

    def test_forget_account(self) -> None:
        """Removing an account unpins its sessions and forgets that any session left it."""
        one, _ = self.table.observe(main_request(), 0.0)
        two, _ = self.table.observe(inspect(cc_body(history()), header=OTHER_SESSION), 0.0)
        one.account, two.account = "work", "home"
        one.left = {"home": 5.0}
        two.left = {"work": 6.0, "spare": 7.0}
        self.table.forget_account("work")
        self.assertEqual((one.account, one.left), (None, {"home": 5.0}))
        self.assertEqual((two.account, two.left), ("home", {"spare": 7.0}))

    @settings(max_examples=60, database=None, deadline=None)
    @given(
        steps=st.lists(
            st.tuples(st.sampled_from(["main", "subagent", "quota", "title", "count"]),
                      st.floats(min_value=0.0, max_value=299.0)),
            max_size=30,
        )
    )
    def test_ordinary_traffic_has_no_moments(self, steps: list[tuple[str, float]]) -> None:
        """Any interleaving of main, subagent and side requests, never idle, yields no moment at all."""
        table = SessionTable()
        now = 0.0
        table.observe(_ORDINARY["main"], now)
        for kind, gap in steps:
            now += gap
            self.assertEqual(table.observe(_ORDINARY[kind], now)[1], Moment.NONE)
            # Keep the main cache clock fresh, as real main-thread traffic does.
            table.observe(_ORDINARY["main"], now)


_ORDINARY = {
    "main": main_request(),
    "subagent": subagent_request(),
    "quota": quota_request(),
    "title": title_request(),
    "count": count_tokens_request(),
}


class ContextTests(SynchronousTestCase):
    def test_context_grows_by_main_steps(self) -> None:
        """
        A session's context is its largest main prompt of the cycle: the
        first sets where the cycle began, each larger one is a step (its
        growth and uncached usage counted), a smaller one (a subagent's)
        changes nothing, and a compaction request's prompt is where it
        compacts.
        """
        session = Session("s:x", "header")
        session.record_context(17_000, 17_000)
        session.record_context(20_000, 3_300)
        session.record_context(8_000, 8_000)
        session.record_context(23_500, 3_800)
        self.assertEqual((session.cycle_base, session.cycle_base_tokens, session.context), (17_000, 17_000, 23_500))
        self.assertEqual((session.cycle_steps, session.cycle_growth, session.cycle_step_tokens), (2, 6_500, 7_100))
        session.record_context(101_000, 600, compaction=True)
        self.assertEqual((session.compacted_at, session.context), (101_000, 23_500))

    def test_compaction_starts_a_new_cycle(self) -> None:
        """
        The compaction request closes the cycle: the context starts over at
        the next request, and a session keyed by its prefix (no compaction
        request seen) takes its peak as where it compacted.
        """
        table = SessionTable()
        session, _ = table.observe(main_request(), 0.0)
        session.record_context(50_000, 3_000)
        session.record_context(60_000, 3_000)
        session._close_cycle()
        self.assertEqual((session.context, session.cycle_steps, session.compacted_at), (0, 0, 60_000))
        session.record_context(18_000, 4_000)
        self.assertEqual((session.cycle_base, session.context), (18_000, 18_000))


class StateTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        to_state is JSON-able and restore brings back pins, exits, TTL,
        last-seen time, when it was placed, its cycle costs and its context
        (what placement projects and reserves for it).
        """
        table = SessionTable()
        session, _ = table.observe(main_request(), 100.0)
        session.account = "work"
        session.left = {"home": 90.0}
        session.placed = 95.0
        session.cycle_tokens, session.cycle_costs, session.compactions = 1_200, [40_000, 50_000], 2
        session.compacted_at = 90_000
        session.record_context(20_000, 5_000)
        session.record_context(23_000, 3_100)
        prefix, _ = table.observe(prefix_facts(1000), 150.0)
        prefix.account = "home"
        state = json.loads(json.dumps(table.to_state(200.0)))
        self.assertEqual(
            state[0],
            {"key": "s:" + SESSION, "keySource": "header", "account": "work", "left": {"home": 90.0},
             "ttl": TTL_1H, "lastSeen": 100.0, "placed": 95.0, "cycleTokens": 1_200,
             "cycleCosts": [40_000, 50_000], "cycleReads": 0, "cycleReadCosts": [], "compactions": 2,
             "cycleBase": 20_000, "cycleBaseTokens": 5_000, "context": 23_000, "cycleSteps": 1,
             "cycleGrowth": 3_000, "cycleStepTokens": 3_100, "compactedAt": 90_000},
        )
        restored = SessionTable()
        restored.restore(state, 300.0)
        self.assertEqual(len(restored), 2)
        copy = restored.get("s:" + SESSION)
        self.assertEqual((copy.key_source, copy.account, copy.left, copy.ttl, copy.last_seen),
                         ("header", "work", {"home": 90.0}, TTL_1H, 100.0))
        self.assertEqual((copy.placed, copy.cycle_tokens, copy.cycle_costs, copy.compactions),
                         (95.0, 1_200, [40_000, 50_000], 2))
        self.assertEqual((copy.cycle_base, copy.context, copy.cycle_steps, copy.cycle_growth, copy.compacted_at),
                         (20_000, 23_000, 1, 3_000, 90_000))
        self.assertEqual(restored.get(prefix.key).key_source, "prefix")
        self.assertEqual(restored.observe(main_request(), 400.0)[1], Moment.NONE)

    def test_stale_entries_dropped(self) -> None:
        """Sessions seen longer ago than their TTL are neither saved nor restored."""
        table = SessionTable()
        table.observe(main_request(ttl=None), 0.0)
        table.observe(inspect(cc_body(history()), header=OTHER_SESSION), 0.0)
        self.assertEqual([e["key"] for e in table.to_state(301.0)], ["s:" + OTHER_SESSION])
        state = table.to_state(0.0)
        restored = SessionTable()
        restored.restore(state, 301.0)
        self.assertEqual([s.key for s in restored.sessions()], ["s:" + OTHER_SESSION])
        restored.restore(state, TTL_1H + 1)
        self.assertEqual(len(restored), 1)

    def test_restored_session_goes_idle(self) -> None:
        """A restored session reports IDLE once its TTL has passed since it was last seen."""
        table = SessionTable()
        table.restore([{"key": "s:a", "keySource": "header", "account": "work", "left": {},
                        "ttl": TTL_5M, "lastSeen": 0.0}], 100.0)
        facts = RequestFacts("s:a", "header", None, 1, TTL_5M, False, False, False)
        self.assertEqual(table.observe(facts, 400.0)[1], Moment.IDLE)
        self.assertEqual(table.get("s:a").account, "work")

    def test_restore_tolerant(self) -> None:
        """Malformed state is skipped entry by entry; good entries and good exits survive."""
        good = {"key": "s:good", "keySource": "metadata", "account": None, "left": {"a": 1.0, "b": "x", "c": math.inf},
                "ttl": TTL_1H, "lastSeen": 10.0}
        bad = [
            1,
            None,
            "s:x",
            {},
            {"key": 5, "keySource": "header", "ttl": 300, "lastSeen": 0},
            {"key": "", "keySource": "header", "ttl": 300, "lastSeen": 0},
            {"key": "s:b", "keySource": "bogus", "ttl": 300, "lastSeen": 0},
            {"key": "s:c", "keySource": "header", "ttl": float("nan"), "lastSeen": 0},
            {"key": "s:d", "keySource": "header", "ttl": 300, "lastSeen": True},
            {"key": "s:e", "keySource": "header", "ttl": -1, "lastSeen": 0},
            {"key": "s:f", "keySource": "header", "ttl": 300, "lastSeen": 0, "account": 7},
            {"key": "s:g", "keySource": "header", "ttl": 300, "lastSeen": 0, "left": []},
        ]
        for data in (None, "nope", {"key": "s:x"}, 5):
            table = SessionTable()
            table.restore(data, 20.0)
            self.assertEqual(len(table), 0)
        table = SessionTable()
        table.restore(bad + [good], 20.0)
        self.assertEqual([s.key for s in table.sessions()], ["s:good"])
        self.assertEqual(table.get("s:good").left, {"a": 1.0})

    def test_restore_keeps_live_sessions(self) -> None:
        """Restoring does not overwrite a session the table already knows, and respects max_sessions."""
        table = SessionTable(max_sessions=2)
        live, _ = table.observe(RequestFacts("s:a", "header", None, 1, TTL_1H, False, False, False), 50.0)
        live.account = "live"
        state = [
            {"key": "s:a", "keySource": "header", "account": "old", "left": {}, "ttl": TTL_1H, "lastSeen": 10.0},
            {"key": "s:b", "keySource": "header", "account": "b", "left": {}, "ttl": TTL_1H, "lastSeen": 20.0},
            {"key": "s:c", "keySource": "header", "account": "c", "left": {}, "ttl": TTL_1H, "lastSeen": 30.0},
        ]
        table.restore(state, 60.0)
        self.assertEqual(table.get("s:a").account, "live")
        self.assertEqual(sorted(s.key for s in table.sessions()), ["s:a", "s:c"])
