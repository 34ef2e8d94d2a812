"""
Claude-Code-shaped traffic for replays, benchmarks and tests.

Pure and deterministic: a L{WorkloadSpec} and its seed fix every byte of
every request.  A L{Workload} holds one L{ConversationSim} per session, the
state machine of one Claude Code session: its history, its size as the
simulator counts tokens (L{nextclaude.simulate.segment_tokens}), and its
auto-compactions.  Drivers ask a session for its next L{PlannedRequest},
send it however they like (through the real proxy on loopback, or through
the router straight into L{SimulatedAnthropic.answer} on a virtual clock)
and report the outcome with L{Workload.complete}.  L{drive} is such a driver
for the synchronous case; L{Workload.baseline_tokens} uses it to run the
same workload on one unlimited account, the reference for "excess
cache_creation".

What the requests look like (PROTOCOL.md, "Claude Code behaviour that
matters"):

  - Every session sends the same large system prompt and tool list, byte for
    byte (only the per-request billing block differs), so an account that
    served one session is warm for the next session's first request.
  - Headers: C{x-claude-code-session-id}, C{anthropic-beta} (subscription
    mode, so with C{oauth-2025-04-20}), C{anthropic-version},
    C{user-agent: claude-cli/2.1.x}, and C{x-sim-output-tokens} telling the
    simulator how many output tokens to report.  No credential: the driver
    adds the proxy key or an account's credential.
  - Body keys in Claude Code's order (C{model, messages, system, tools,
    metadata, max_tokens, stream}); C{metadata.user_id} is the 2.1.x JSON
    string holding the session id; breakpoints on the big system block and
    on the last block of the newest message.
  - Each main turn adds C{tokens_per_turn} tokens of history (the assistant's
    reply, C{output_tokens} of it, then the next tool results).  When the
    context passes C{compact_above} the next request is the compaction
    request (the whole history plus Claude Code's summary instruction), and
    the one after it starts over from a single user message opening with the
    continuation marker and holding a C{summary_tokens} summary.
  - A few percent of side requests (a C{max_tokens: 1} quota check, a title
    on Haiku, C{count_tokens}) and subagent requests (their own system prompt
    and tools), all with the session's header, none touching the main
    history.

Side and subagent traffic draw on their own random streams, so turning them
off leaves the main conversations byte-identical.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import json
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from nextclaude.simulate import SimAnswer, SimulatedAnthropic, segment_chars, segment_tokens, simulated_accounts

__all__ = [
    "CLI_VERSION",
    "COMPACTION_INSTRUCTION",
    "CONTINUATION_OPENING",
    "ConversationSim",
    "MAIN_KINDS",
    "PlannedRequest",
    "RunResult",
    "STANDARD",
    "STANDARD_UPSTREAM",
    "UpstreamSpec",
    "Workload",
    "WorkloadSpec",
    "drive",
]

CLI_VERSION = "2.1.14"
USER_AGENT = f"claude-cli/{CLI_VERSION} (external, cli)"
MAIN_MODEL = "claude-sonnet-4-5-20250929"
SMALL_MODEL = "claude-haiku-4-5-20251001"
MESSAGES_PATH = b"/v1/messages?beta=true"
COUNT_TOKENS_PATH = b"/v1/messages/count_tokens?beta=true"
BETAS = ",".join((
    "claude-code-20250219",
    "oauth-2025-04-20",
    "interleaved-thinking-2025-05-14",
    "fine-grained-tool-streaming-2025-05-14",
))
MAIN_MAX_TOKENS = 32_000
COMPACTION_MAX_TOKENS = 20_000
TITLE_MAX_TOKENS = 512
TITLE_OUTPUT_TOKENS = 12

# Kinds whose failure the driver retries: they carry the conversation.
MAIN_KINDS = frozenset({"main", "compaction", "post-compaction"})
SIDE_RATE = 0.03  # per main turn, a count_tokens call
SUBAGENT_RATE = 0.03  # per main turn, a subagent request

# Claude Code's wording, paraphrased around the markers the proxy keys on
# (sessions.SUMMARY_MARKER, sessions.CONTINUATION_MARKER); written out here
# rather than imported so the tests check the detector against an
# independent text.
COMPACTION_INSTRUCTION = (
    "Your task is to create a detailed summary of the conversation so far, paying close "
    "attention to the user's explicit requests and your previous actions.\n"
    "This summary should be thorough in capturing technical details, code patterns, and "
    "architectural decisions that would be essential for continuing development work "
    "without losing context.\n\n"
    "Before providing your final summary, wrap your analysis in <analysis> tags to "
    "organize your thoughts and ensure you've covered all necessary points.\n\n"
    "Your summary should include the following sections:\n"
    "1. Primary Request and Intent\n2. Key Technical Concepts\n3. Files and Code Sections\n"
    "4. Errors and fixes\n5. Problem Solving\n6. All user messages\n7. Pending Tasks\n"
    "8. Current Work\n9. Optional Next Step\n\n"
    "Wrap the summary itself in <summary></summary> tags."
)
CONTINUATION_OPENING = (
    "This session is being continued from a previous conversation that ran out of "
    "context. The conversation is summarized below:\n"
)

_TOOLS = (
    ("Task", "prompt"), ("Bash", "command"), ("Glob", "pattern"), ("Grep", "pattern"),
    ("LS", "path"), ("ExitPlanMode", "plan"), ("Read", "file_path"), ("Edit", "file_path"),
    ("MultiEdit", "file_path"), ("Write", "file_path"), ("NotebookEdit", "notebook_path"),
    ("WebFetch", "url"), ("TodoWrite", "todos"), ("WebSearch", "query"),
    ("BashOutput", "bash_id"), ("KillShell", "shell_id"), ("SlashCommand", "command"),
)
_SUBAGENT_TOOLS = ("Bash", "Glob", "Grep", "LS", "Read", "WebFetch", "WebSearch")
_TURN_TOOLS = ("Bash", "Glob", "Grep", "Read", "Edit", "Write")
# Of the shared prefix, the tool definitions' share (Claude Code's tools
# outweigh its system text).
_TOOLS_SHARE = 0.6

# Filler vocabulary: no quotes, backslashes or control characters, so one
# character of filler is one character of JSON.
_VOCABULARY = (
    "def class return import from self value result error handler request response "
    "session account cache token quota window reset config path module test assert "
    "buffer stream event parser router policy primary successor draining landed "
    "compaction summary prefix header body status retry timeout deferred reactor clock "
    "service factory protocol transport channel resource render write finish pool "
    "usage input output creation read tier limit weekly hourly forecast headroom "
    "stranded index offset length count total sorted filter lambda yield async await "
    "None True False int str dict list tuple bytes float print raise except finally "
    "with open json dumps loads encode decode strip split join format replace lower"
).split()


def _filler(rng: random.Random, chars: int) -> str:
    """Exactly ``chars`` characters of seeded words."""
    if chars <= 0:
        return ""
    words = rng.choices(_VOCABULARY, k=chars // 5 + 2)
    text = " ".join(words)
    while len(text) < chars:
        text += " " + " ".join(rng.choices(_VOCABULARY, k=chars // 5 + 2))
    return text[:chars]


def _fill(segment: dict[str, Any], block: dict[str, Any], key: str, tokens: int,
          rng: random.Random) -> None:
    """
    Append filler to ``block[key]`` (a string inside ``segment``) until the
    segment counts ``tokens`` tokens as the simulator counts them.  A
    segment already bigger stays as it is.
    """
    missing = 4 * tokens - segment_chars(segment)
    if missing > 0:
        block[key] += _filler(rng, missing)


# The history's messages and the tools are the same objects request after
# request; encoding each once keeps long replays linear.  Keyed by id() with
# the object held, so an id is not reused while its entry exists.
_ENCODED: dict[int, tuple[Any, bytes]] = {}
_ENCODED_LIMIT = 50_000


def _encoded(value: Any) -> bytes:
    entry = _ENCODED.get(id(value))
    if entry is not None and entry[0] is value:
        return entry[1]
    encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    if len(_ENCODED) >= _ENCODED_LIMIT:
        _ENCODED.clear()
    _ENCODED[id(value)] = (value, encoded)
    return encoded


def _encode_body(body: dict[str, Any]) -> bytes:
    """
    Exactly C{json.dumps(body, ensure_ascii=False, separators=(",", ":"))},
    with the messages, system blocks and tools encoded once each.
    """
    parts = []
    for key, value in body.items():
        if key in ("messages", "system") and isinstance(value, list):
            encoded = b"[" + b",".join(_encoded(item) for item in value) + b"]"
        elif key == "tools":
            encoded = _encoded(value)
        else:
            encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        parts.append(json.dumps(key).encode() + b":" + encoded)
    return b"{" + b",".join(parts) + b"}"


def _short_hash(*parts: object, length: int = 16) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:length]


def _tool_id(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "toolu_01" + "".join(rng.choices(alphabet, k=22))


def claude_code_headers(session_id: str) -> dict[str, str]:
    """
    The headers Claude Code sends with a Messages request (no credential).
    """
    return {
        "accept": "application/json",
        "accept-encoding": "gzip, deflate, br, zstd",
        "anthropic-beta": BETAS,
        "anthropic-dangerous-direct-browser-access": "true",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "x-app": "cli",
        "x-claude-code-session-id": session_id,
        "x-stainless-lang": "js",
        "x-stainless-retry-count": "0",
        "x-stainless-timeout": "600",
    }


@dataclass(frozen=True)
class WorkloadSpec:
    """
    The shape of a workload.  Token figures are as the simulator counts
    them; the defaults are the issue's standard workload.
    """

    sessions: int = 3
    turns: int = 100
    prefix_tokens: int = 14_000  # shared system+tools prefix (same bytes for every session)
    tokens_per_turn: int = 3_000  # new context per turn (assistant output + next tool results)
    compact_above: int = 100_000  # auto-compaction when the context exceeds this many tokens
    summary_tokens: int = 3_000
    output_tokens: int = 300
    think_time: float = 20.0  # seconds between a session's turns, jittered by the seed
    ttl: str = "5m"  # cache_control ttl requested: "5m" (default cache) or "1h"
    seed: int = 1
    side_requests: bool = True  # quota check, title on Haiku, count_tokens
    subagents: bool = True  # subagent requests (own system prompt and tools)
    stagger: float = 0.0  # session i starts i × stagger seconds after session 0
    idle_rate: float = 0.0  # per main turn, the chance the user walks away first
    idle_gap: float = 0.0  # seconds such a pause lasts (past the cache TTL to go cold)

    def __post_init__(self) -> None:
        if self.ttl not in ("5m", "1h"):
            raise ValueError(f"ttl must be '5m' or '1h', not {self.ttl!r}")
        if self.sessions < 0 or self.turns < 0:
            raise ValueError("sessions and turns must not be negative")
        if min(self.prefix_tokens, self.tokens_per_turn, self.summary_tokens, self.output_tokens) < 1:
            raise ValueError("token sizes must be positive")
        if self.output_tokens >= self.tokens_per_turn:
            raise ValueError("tokens_per_turn must exceed output_tokens (it includes them)")
        if self.think_time < 0 or self.stagger < 0 or self.idle_gap < 0:
            raise ValueError("think_time, stagger and idle_gap must not be negative")
        if not 0.0 <= self.idle_rate <= 1.0:
            raise ValueError("idle_rate must be a probability")
        # A fresh post-compaction context must fit under the threshold, or
        # every turn would compact again.
        if self.prefix_tokens + self.summary_tokens + self.tokens_per_turn >= self.compact_above:
            raise ValueError("compact_above must exceed prefix + summary + one turn")

    def describe(self) -> str:
        """One line of parameters, for a benchmark's output."""
        return (
            f"{self.sessions} sessions x {self.turns} turns, prefix {self.prefix_tokens} tokens, "
            f"+{self.tokens_per_turn}/turn, compaction above {self.compact_above} into "
            f"{self.summary_tokens}, output {self.output_tokens}/turn, think {self.think_time:g}s, "
            f"ttl {self.ttl}, seed {self.seed}, side requests {'on' if self.side_requests else 'off'}, "
            f"subagents {'on' if self.subagents else 'off'}"
            + (f", stagger {self.stagger:g}s" if self.stagger else "")
            + (f", idle {self.idle_gap:g}s at {self.idle_rate:g}/turn" if self.idle_rate else "")
        )


STANDARD = WorkloadSpec()


@dataclass(frozen=True)
class UpstreamSpec:
    """
    The simulated upstream a workload runs against; the defaults are the
    standard workload's: 3 accounts with 800k tokens of 5h quota each, 5
    minute default TTL, cache reads free, breakpoints honoured as upstream.
    """

    accounts: int = 3
    five_hour_tokens: int = 800_000
    seven_day_tokens: int | None = None  # default: ten 5h windows
    cache_ttl_default: float = 300.0
    cache_read_weight: float = 0.0
    honour_breakpoints: bool = True
    # One multiplier per account (Pro 1, Max 5x 5, Max 20x 20) of both
    # windows; None: every account the same size.
    sizes: tuple[float, ...] | None = None
    output_weight: float = 1.0
    creation_weight: float = 1.0
    utilization_step: float = 0.0  # rounding of the utilization headers

    def __post_init__(self) -> None:
        if self.sizes is not None and len(self.sizes) != self.accounts:
            raise ValueError("one size per account")

    def build(self, reactor: IReactorTime | None = None) -> SimulatedAnthropic:
        """A simulator with these accounts (named sim-1 …) on ``reactor``
        (default: a fresh ``task.Clock``; drivers pass ``now`` to ``answer``)."""
        return SimulatedAnthropic(
            reactor if reactor is not None else cast(IReactorTime, Clock()),
            simulated_accounts(self.accounts, self.five_hour_tokens, self.seven_day_tokens,
                               sizes=self.sizes, utilization_step=self.utilization_step),
            cache_ttl_default=self.cache_ttl_default,
            cache_read_weight=self.cache_read_weight,
            honour_breakpoints=self.honour_breakpoints,
            output_weight=self.output_weight,
            creation_weight=self.creation_weight,
        )

    def tier(self, index: int) -> str | None:
        """The tier name account C{index} would show (None when sizes are not given)."""
        if self.sizes is None:
            return None
        size = self.sizes[index]
        return "Pro" if size < 2.5 else "Max 5x" if size < 12 else "Max 20x"

    def unlimited(self) -> UpstreamSpec:
        """The same upstream with one account that never runs out."""
        return replace(self, accounts=1, five_hour_tokens=10**15, seven_day_tokens=10**16, sizes=None)

    def describe(self) -> str:
        sizes = f" sized {'/'.join(f'{size:g}' for size in self.sizes)}" if self.sizes else ""
        return (
            f"{self.accounts} accounts x {self.five_hour_tokens} tokens of 5h quota{sizes}, default ttl "
            f"{self.cache_ttl_default:g}s, cache-read weight {self.cache_read_weight:g}, "
            f"output weight {self.output_weight:g}, creation weight {self.creation_weight:g}, "
            f"newest message as {'cache creation' if self.honour_breakpoints else 'input'}"
            + (f", utilization in steps of {self.utilization_step:g}" if self.utilization_step else "")
        )


STANDARD_UPSTREAM = UpstreamSpec()


@dataclass
class PlannedRequest:
    """
    One request a session wants sent.  ``delay`` is the pause the session
    takes before sending it, counted from the end of its previous request
    (think time, or a moment for automatic requests).  ``prompt_tokens`` is
    the prompt's size as the simulator counts it.  ``data`` is ``body``
    decoded, for drivers that hand the simulator a dict; do not mutate it.
    """

    session: int
    turn: int
    kind: str  # "main" | "compaction" | "post-compaction" | "side" | "subagent"
    path: bytes
    headers: dict[str, str]
    body: bytes
    expected_output_tokens: int
    delay: float = 0.0
    prompt_tokens: int = 0
    data: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def session_id(self) -> str:
        return self.headers["x-claude-code-session-id"]


class _Prefix:
    """The parts every session shares: system text, tools, the subagent's."""

    def __init__(self, spec: WorkloadSpec) -> None:
        rng = random.Random(f"nextclaude-workload:{spec.seed}:prefix")
        self.control: dict[str, str] = {"type": "ephemeral"}
        if spec.ttl == "1h":
            self.control["ttl"] = "1h"
        self.device_id = hashlib.sha256(f"device:{spec.seed}".encode()).hexdigest()
        tool_chars = int(4 * spec.prefix_tokens * _TOOLS_SHARE) // len(_TOOLS)
        self.tools = [self._tool(name, argument, tool_chars, rng) for name, argument in _TOOLS]
        system_text = {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.\n\n",
                       "cache_control": self.control}
        head = {"system": [system_text], "tools": self.tools}
        _fill(head, system_text, "text", spec.prefix_tokens, rng)
        self.system_block = system_text
        self.tokens = segment_tokens(head)
        # The subagent's prefix: its own system text, a few of the tools.
        by_name = {tool["name"]: tool for tool in self.tools}
        self.subagent_tools = [by_name[name] for name in _SUBAGENT_TOOLS]
        sub_text = {"type": "text", "cache_control": self.control,
                    "text": "You are an agent for Claude Code, Anthropic's official CLI for Claude. "
                            "Given the user's message, use the tools available to complete the task.\n\n"}
        sub_head = {"system": [sub_text], "tools": self.subagent_tools}
        _fill(sub_head, sub_text, "text", max(1_000, spec.prefix_tokens // 2), rng)
        self.subagent_block = sub_text
        self.subagent_tokens = segment_tokens(sub_head)

    @staticmethod
    def _tool(name: str, argument: str, chars: int, rng: random.Random) -> dict[str, Any]:
        tool: dict[str, Any] = {
            "name": name,
            "description": f"{name}: ",
            "input_schema": {
                "type": "object",
                "properties": {argument: {"type": "string", "description": f"The {argument} to use"}},
                "required": [argument],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        }
        missing = chars - segment_chars(tool)
        if missing > 0:
            tool["description"] += _filler(rng, missing)
        return tool


class ConversationSim:
    """
    One session's state machine: history, token size, compaction.

    ``next_request`` plans the session's next request (the same one again
    until ``complete`` is told about it); ``complete(ok=True)`` advances the
    session.  A failed main, compaction or post-compaction request leaves
    the state unchanged, so asking again gives the same request to retry.
    A side or subagent request is used up either way (Claude Code does not
    retry those).
    """

    def __init__(self, spec: WorkloadSpec, index: int, prefix: _Prefix) -> None:
        self.spec = spec
        self.index = index
        self._prefix = prefix
        base = f"nextclaude-workload:{spec.seed}:{index}"
        self._rng = random.Random(base + ":main")
        self._extra_rng = random.Random(base + ":extra")
        self._time_rng = random.Random(base + ":time")
        # Its own stream: idle pauses leave every other draw where it was.
        self._idle_rng = random.Random(base + ":idle")
        self.session_id = str(uuid.UUID(bytes=hashlib.sha256(base.encode()).digest()[:16], version=4))
        self._user_id = json.dumps({"device_id": prefix.device_id, "account_uuid": "",
                                    "session_id": self.session_id}, separators=(",", ":"))
        self.history: list[dict[str, Any]] = []
        self.history_tokens = 0
        self.turn = 0  # main turns completed
        self.compactions = 0
        self._compacted = False  # the next main request is the post-compaction one
        self._extras: list[PlannedRequest] = []
        self._pending: PlannedRequest | None = None
        self._extra_serial = 0
        # Sessions start staggered over one think time.
        self._start_delay: float | None = self._time_rng.uniform(0.0, spec.think_time) + index * spec.stagger
        self._next_tool_id: str | None = None
        self._new_user: dict[str, Any] = {}  # the newest user message of the pending main request
        if spec.side_requests:
            self._extras.append(self._quota_check())

    # -- state

    @property
    def context_tokens(self) -> int:
        """The size of the conversation so far (prefix + history), as the simulator counts it."""
        return self._prefix.tokens + self.history_tokens

    @property
    def done(self) -> bool:
        return self._pending is None and not self._extras and self.turn >= self.spec.turns

    def next_request(self) -> PlannedRequest | None:
        """The request to send next; None once every turn is done."""
        if self._pending is not None:
            return self._pending
        if self._extras:
            request = self._extras.pop(0)
        elif self.turn >= self.spec.turns:
            return None
        elif not self._compacted and self.history and self.context_tokens > self.spec.compact_above:
            request = self._compaction()
        else:
            request = self._main()
        if self._start_delay is not None:
            request.delay, self._start_delay = self._start_delay, None
        self._pending = request
        return request

    def complete(self, request: PlannedRequest, ok: bool, output_text: str = "") -> None:
        """
        Record the outcome of the pending request.  ``output_text`` is
        accepted for drivers that have it; the history holds a reply of the
        planned size instead, since simulated text does not match its token
        count.
        """
        if request is not self._pending:
            raise ValueError("complete() must be given the request next_request() returned")
        if request.kind in MAIN_KINDS and not ok:
            return
        self._pending = None
        if not ok:
            return
        if request.kind == "compaction":
            self.history, self.history_tokens = [], 0
            self._compacted = True
            self.compactions += 1
        elif request.kind in ("main", "post-compaction"):
            self._compacted = False
            self.history = [*self.history, self._new_user]
            self.history_tokens = request.prompt_tokens - self._prefix.tokens
            reply = self._assistant_reply()
            self.history.append(reply)
            self.history_tokens += segment_tokens(reply)
            self.turn += 1
            if self.turn < self.spec.turns:
                self._roll_extras()

    # -- planning

    def _headers(self, output_tokens: int | None) -> dict[str, str]:
        headers = claude_code_headers(self.session_id)
        if output_tokens is not None:
            headers["x-sim-output-tokens"] = str(output_tokens)
        return headers

    def _billing(self, *tag: object) -> dict[str, Any]:
        # Varies per request like Claude Code's; tagged by what the request
        # is, so side traffic leaves the main requests' bytes alone.
        cch = _short_hash(self.spec.seed, self.index, *tag, length=5)
        return {"type": "text",
                "text": f"x-anthropic-billing-header: cc_version={CLI_VERSION}; cc_entrypoint=cli; cch={cch};"}

    def _plan(self, kind: str, turn: int, body: dict[str, Any], output: int, delay: float,
              prompt_tokens: int, path: bytes = MESSAGES_PATH) -> PlannedRequest:
        raw = _encode_body(body)
        return PlannedRequest(
            session=self.index, turn=turn, kind=kind, path=path,
            headers=self._headers(output if path == MESSAGES_PATH else None), body=raw,
            expected_output_tokens=output if path == MESSAGES_PATH else 0,
            delay=delay, prompt_tokens=prompt_tokens, data=body)

    def _main_body(self, kind: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
        return {
            "model": MAIN_MODEL,
            "messages": messages,
            "system": [self._billing(kind, self.turn, self.compactions), self._prefix.system_block],
            "tools": self._prefix.tools,
            "metadata": {"user_id": self._user_id},
            "max_tokens": max_tokens,
            "stream": True,
        }

    def _marked(self, message: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``message`` with Claude Code's breakpoint on its last block."""
        marked = copy.copy(message)
        content = list(message["content"])
        content[-1] = dict(content[-1], cache_control=self._prefix.control)
        marked["content"] = content
        return marked

    def _user_turn(self) -> dict[str, Any]:
        """The next turn's new user message: tool results, or the opening prompt."""
        tokens = self.spec.tokens_per_turn - self.spec.output_tokens
        if self._compacted:
            block: dict[str, Any] = {"type": "text", "text": CONTINUATION_OPENING}
            message: dict[str, Any] = {"role": "user", "content": [block]}
            _fill(message, block, "text", self.spec.summary_tokens, self._rng)
            prompt = {"type": "text", "text": "Carry on with the task where we left off. "}
            message["content"].append(prompt)
            _fill(message, prompt, "text", self.spec.summary_tokens + tokens, self._rng)
            return message
        if self._next_tool_id is None:
            # The opening prompt, after the context Claude Code prepends.
            reminder = {"type": "text", "text": "<system-reminder>\nAs you answer the user's questions, "
                        "you can use the context in CLAUDE.md.\n</system-reminder>"}
            block = {"type": "text", "text": "Please work through this task: "}
            message = {"role": "user", "content": [reminder, block]}
            _fill(message, block, "text", tokens, self._rng)
            return message
        block = {"type": "tool_result", "tool_use_id": self._next_tool_id, "content": ""}
        message = {"role": "user", "content": [block]}
        _fill(message, block, "content", tokens, self._rng)
        return message

    def _assistant_reply(self) -> dict[str, Any]:
        name = self._rng.choice(_TURN_TOOLS)
        argument = dict(_TOOLS)[name]
        self._next_tool_id = _tool_id(self._rng)
        text = {"type": "text", "text": ""}
        message = {"role": "assistant", "content": [
            text,
            {"type": "tool_use", "id": self._next_tool_id, "name": name,
             "input": {argument: f"src/module_{self._rng.randrange(1000)}.py"}},
        ]}
        _fill(message, text, "text", self.spec.output_tokens, self._rng)
        return message

    def _main(self) -> PlannedRequest:
        kind = "post-compaction" if self._compacted else "main"
        user = self._new_user = self._user_turn()
        messages = [*self.history, self._marked(user)]
        tokens = self.context_tokens + segment_tokens(user)
        delay = self._time_rng.uniform(0.5, 2.0) if self._compacted else self._think()
        body = self._main_body(kind, messages, MAIN_MAX_TOKENS)
        return self._plan(kind, self.turn, body, self.spec.output_tokens, delay, tokens)

    def _compaction(self) -> PlannedRequest:
        instruction = {"role": "user", "content": [{"type": "text", "text": COMPACTION_INSTRUCTION}]}
        messages = [*self.history, self._marked(instruction)]
        tokens = self.context_tokens + segment_tokens(instruction)
        body = self._main_body("compaction", messages, max(COMPACTION_MAX_TOKENS, self.spec.summary_tokens))
        return self._plan("compaction", self.turn, body, self.spec.summary_tokens,
                          self._time_rng.uniform(0.5, 2.0), tokens)

    def _think(self) -> float:
        think = self.spec.think_time * self._time_rng.uniform(0.5, 1.5)
        if self.spec.idle_rate and self._idle_rng.random() < self.spec.idle_rate:
            return think + self.spec.idle_gap
        return think

    # -- side and subagent requests

    def _roll_extras(self) -> None:
        rng = self._extra_rng
        # Drawn whether or not enabled, so each switch leaves the other's
        # requests where they were.
        title, count, subagent = self.turn == 1, rng.random() < SIDE_RATE, rng.random() < SUBAGENT_RATE
        if self.spec.side_requests and title:
            self._extras.append(self._title())
        if self.spec.side_requests and count:
            self._extras.append(self._count_tokens())
        if self.spec.subagents and subagent:
            self._extras.append(self._subagent())

    def _side_delay(self) -> float:
        return self._extra_rng.uniform(0.1, 1.0)

    def _extra_billing(self) -> dict[str, Any]:
        self._extra_serial += 1
        return self._billing("extra", self._extra_serial)

    def _quota_check(self) -> PlannedRequest:
        messages = [{"role": "user", "content": "quota"}]
        body = {"model": SMALL_MODEL, "messages": messages,
                "metadata": {"user_id": self._user_id}, "max_tokens": 1}
        return self._plan("side", 0, body, 1, self._side_delay(), segment_tokens(messages[0]))

    def _title(self) -> PlannedRequest:
        snippet = str(self.history[0]["content"][-1].get("text", ""))[:300]
        message = {"role": "user", "content": [{"type": "text", "text": snippet}]}
        system = [self._extra_billing(), {"type": "text", "text": (
            "Summarize this coding conversation in under 50 characters.\n"
            "Capture the main task, key files, problems addressed, and current status.")}]
        body = {"model": SMALL_MODEL, "messages": [message], "system": system,
                "metadata": {"user_id": self._user_id}, "max_tokens": TITLE_MAX_TOKENS,
                "stream": True}
        tokens = segment_tokens({"system": system[1:]}) + segment_tokens(message)
        return self._plan("side", self.turn, body, TITLE_OUTPUT_TOKENS, self._side_delay(), tokens)

    def _count_tokens(self) -> PlannedRequest:
        message = {"role": "user", "content": "foo"}
        tools = self._prefix.subagent_tools[:2]
        body = {"model": MAIN_MODEL, "messages": [message], "tools": tools}
        tokens = segment_tokens({"tools": tools}) + segment_tokens(message)
        return self._plan("side", self.turn, body, 0, self._side_delay(), tokens,
                          path=COUNT_TOKENS_PATH)

    def _subagent(self) -> PlannedRequest:
        rng = self._extra_rng
        block = {"type": "text", "text": "Search the codebase and report: "}
        task = {"role": "user", "content": [block]}
        _fill(task, block, "text", 1_000, rng)
        body = {
            "model": MAIN_MODEL,
            "messages": [self._marked(task)],
            "system": [self._extra_billing(), self._prefix.subagent_block],
            "tools": self._prefix.subagent_tools,
            "metadata": {"user_id": self._user_id},
            "max_tokens": MAIN_MAX_TOKENS,
            "stream": True,
        }
        tokens = self._prefix.subagent_tokens + segment_tokens(task)
        planned = self._plan("subagent", self.turn, body, self.spec.output_tokens,
                             rng.uniform(0.5, 2.0), tokens)
        # Claude Code names the subagent on each of its requests.
        planned.headers["x-claude-code-agent-id"] = _short_hash(self.spec.seed, self.index, self.turn, "agent", length=17)
        return planned


class Workload:
    """All the sessions of one L{WorkloadSpec}."""

    def __init__(self, spec: WorkloadSpec = STANDARD) -> None:
        self.spec = spec
        self._prefix = _Prefix(spec)
        self._sessions = [ConversationSim(spec, i, self._prefix) for i in range(spec.sessions)]

    @property
    def prefix_tokens(self) -> int:
        """The shared system+tools prefix as the simulator counts it."""
        return self._prefix.tokens

    @property
    def subagent_prefix_tokens(self) -> int:
        """The subagents' own system+tools prefix, as the simulator counts it."""
        return self._prefix.subagent_tokens

    def sessions(self) -> list[ConversationSim]:
        return list(self._sessions)

    def next_request(self, session: int) -> PlannedRequest | None:
        """That session's next request (the same one until completed); None when it is done."""
        return self._sessions[session].next_request()

    def complete(self, session: int, request: PlannedRequest, ok: bool, output_text: str = "") -> None:
        """Advance that session past ``request`` if ``ok``; see L{ConversationSim.complete}."""
        self._sessions[session].complete(request, ok, output_text)

    @property
    def done(self) -> bool:
        return all(s.done for s in self._sessions)

    def baseline_tokens(self, upstream: UpstreamSpec = STANDARD_UPSTREAM, **drive_options: Any) -> RunResult:
        """
        The same workload (a fresh copy: this one is left untouched) on one
        account that never runs out, with ``upstream``'s cache settings:
        the cache_creation no routing policy can go below.
        """
        sim = upstream.unlimited().build()
        account = sim.accounts[0]
        credentials = account.credential_headers()

        def send(request: PlannedRequest, now: float) -> SimAnswer:
            return sim.answer({**request.headers, **credentials}, request.data, now, path=request.path)

        return drive(Workload(self.spec), send, **drive_options)


@dataclass
class RunResult:
    """
    What a driver saw.  ``statuses`` counts every answer by status;
    ``kinds`` counts the answered (200) requests by kind; token totals are
    summed from the 200s' usage.
    """

    requests: int = 0
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    turns_done: int = 0
    turns_planned: int = 0
    compactions: int = 0
    client_429s: int = 0
    abandoned: int = 0  # sessions given up after too many failures, or cut by the horizon
    input_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    started: float = 0.0
    finished: float = 0.0

    @property
    def uncached_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_tokens

    def record(self, request: PlannedRequest, answer: SimAnswer) -> None:
        self.requests += 1
        self.statuses[answer.status] += 1
        if answer.status == 429:
            self.client_429s += 1
        if answer.status != 200:
            return
        self.ok += 1
        self.kinds[request.kind] += 1
        if request.kind in ("main", "post-compaction"):
            self.turns_done += 1
        elif request.kind == "compaction":
            self.compactions += 1
        usage = answer.usage or {}
        self.input_tokens += usage.get("input_tokens", 0)
        self.cache_creation_tokens += usage.get("cache_creation_input_tokens", 0)
        self.cache_read_tokens += usage.get("cache_read_input_tokens", 0)
        self.output_tokens += usage.get("output_tokens", 0)

    def describe(self) -> str:
        """A few lines of results, for a benchmark's output."""
        return (
            f"turns done {self.turns_done}/{self.turns_planned}, compactions {self.compactions}, "
            f"requests {self.requests} ({self.ok} ok, 429s {self.client_429s}, "
            f"other errors {self.requests - self.ok - self.client_429s}), abandoned sessions {self.abandoned}\n"
            f"cache_creation {self.cache_creation_tokens}, cache_read {self.cache_read_tokens}, "
            f"input {self.input_tokens}, output {self.output_tokens}, "
            f"virtual time {self.finished - self.started:.0f}s"
        )


class Driver:
    """
    Runs a workload on a virtual clock, one event at a time: L{next_event}
    says which session sends what and when; L{deliver} takes the answer.
    The caller does the sending, synchronously (L{drive}) or over real HTTP.

    A request takes ``base_latency + seconds_per_output_token × output`` to
    answer; the session's next request goes ``delay`` later.  A failed main,
    compaction or post-compaction request is retried after its
    ``retry-after`` (else ``retry_wait``); a session failing ``max_failures``
    times in a row is abandoned.  Nothing is sent later than ``start +
    horizon``.  Sessions interleave by virtual time (ties by session index),
    so the run is deterministic.
    """

    def __init__(self, workload: Workload, *, start: float = 0.0, horizon: float | None = None,
                 base_latency: float = 1.0, seconds_per_output_token: float = 0.02,
                 retry_wait: float = 2.0, max_failures: int = 1_000) -> None:
        self._workload = workload
        self._start = start
        self._horizon = horizon
        self._base_latency = base_latency
        self._per_token = seconds_per_output_token
        self._retry_wait = retry_wait
        self._max_failures = max_failures
        self.result = RunResult(started=start, finished=start)
        self.result.turns_planned = workload.spec.sessions * workload.spec.turns
        self._queue: list[tuple[float, int]] = []
        self._failures = Counter[int]()
        for session in range(workload.spec.sessions):
            self._schedule(session, start)

    def _schedule(self, session: int, at: float) -> None:
        request = self._workload.next_request(session)
        if request is not None:
            heapq.heappush(self._queue, (at + request.delay, session))

    def next_event(self) -> tuple[float, int, PlannedRequest] | None:
        """
        The next (virtual time, session, request) to send, or None when the
        workload is over.
        """
        while self._queue:
            now, session = heapq.heappop(self._queue)
            if self._horizon is not None and now > self._start + self._horizon:
                self.result.abandoned += 1
                continue
            request = self._workload.next_request(session)
            if request is not None:
                return now, session, request
        return None

    def deliver(self, now: float, session: int, request: PlannedRequest, answer: SimAnswer) -> None:
        result = self.result
        result.record(request, answer)
        if answer.ok:
            self._failures[session] = 0
            output = (answer.usage or {}).get("output_tokens", 0)
            finished = now + self._base_latency + self._per_token * output
            result.finished = max(result.finished, finished)
            self._workload.complete(session, request, True, answer.text)
            self._schedule(session, finished)
            return
        result.finished = max(result.finished, now)
        self._workload.complete(session, request, False)
        if request.kind not in MAIN_KINDS:
            self._schedule(session, now)
            return
        self._failures[session] += 1
        if self._failures[session] >= self._max_failures:
            result.abandoned += 1
            return
        wait = answer.retry_after
        heapq.heappush(self._queue, (now + (wait if wait is not None and wait > 0 else self._retry_wait), session))


def drive(workload: Workload, send: Callable[[PlannedRequest, float], SimAnswer], **options: Any) -> RunResult:
    """
    Run C{workload} to the end on a virtual clock (see L{Driver} for the
    options); C{send(request, now)} answers each request synchronously.
    """
    driver = Driver(workload, **options)
    while (event := driver.next_event()) is not None:
        now, session, request = event
        driver.deliver(now, session, request, send(request, now))
    return driver.result
