"""Tests for nextclaude.workload, the Claude-Code-shaped traffic generator."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nextclaude.sessions import Moment, SessionTable, inspect_request
from nextclaude.simulate import SimAnswer, analyse_prompt, segment_tokens
from nextclaude.workload import (
    MAIN_KINDS,
    STANDARD,
    STANDARD_UPSTREAM,
    PlannedRequest,
    UpstreamSpec,
    Workload,
    WorkloadSpec,
    drive,
)

# Small enough to run in milliseconds, big enough for several compaction
# cycles and some side and subagent traffic per session.
SMALL = WorkloadSpec(sessions=3, turns=40, prefix_tokens=2_000, tokens_per_turn=600,
                     compact_above=9_000, summary_tokens=500, output_tokens=80, seed=7)


def plan_all(workload: Workload) -> list[PlannedRequest]:
    """Every request of every session in order, each answered ok at once."""
    planned = []
    for session in range(workload.spec.sessions):
        while (request := workload.next_request(session)) is not None:
            planned.append(request)
            workload.complete(session, request, True)
    return planned


def by_session(requests: list[PlannedRequest], session: int, kinds: frozenset[str] | None = None) -> list[PlannedRequest]:
    return [r for r in requests if r.session == session and (kinds is None or r.kind in kinds)]


def unmarked(value: Any) -> Any:
    """``value`` without its cache_control markers."""
    if isinstance(value, dict):
        return {k: unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [unmarked(v) for v in value]
    return value


def sim_send(sim: Any) -> Any:
    """A drive() send that answers on the simulator's first account."""
    credentials = sim.accounts[0].credential_headers()

    def send(request: PlannedRequest, now: float) -> SimAnswer:
        return sim.answer({**request.headers, **credentials}, request.data, now, path=request.path)

    return send


class SpecTests(SynchronousTestCase):
    def test_standard_is_the_issue_workload(self) -> None:
        """STANDARD and STANDARD_UPSTREAM are the issue's standard workload: 3 sessions
        x 100 turns, 14k prefix, +3k per turn, compaction above 100k into 3k, 300
        output tokens, 5 minute TTL; 3 accounts of 800k 5h quota, cache reads free."""
        self.assertEqual(
            (STANDARD.sessions, STANDARD.turns, STANDARD.prefix_tokens, STANDARD.tokens_per_turn,
             STANDARD.compact_above, STANDARD.summary_tokens, STANDARD.output_tokens, STANDARD.ttl),
            (3, 100, 14_000, 3_000, 100_000, 3_000, 300, "5m"))
        self.assertEqual((STANDARD_UPSTREAM.accounts, STANDARD_UPSTREAM.five_hour_tokens,
                          STANDARD_UPSTREAM.cache_ttl_default, STANDARD_UPSTREAM.cache_read_weight),
                         (3, 800_000, 300.0, 0.0))
        self.assertIn("3 sessions x 100 turns", STANDARD.describe())
        self.assertIn("800000", STANDARD_UPSTREAM.describe())

    def test_invalid_specs_refused(self) -> None:
        """A spec with an unknown TTL, output larger than a turn, or a threshold a fresh
        post-compaction context would already pass is refused."""
        for bad in (dict(ttl="10m"), dict(output_tokens=3_000),
                    dict(compact_above=14_000 + 3_000 + 3_000), dict(turns=-1)):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, WorkloadSpec, **bad)

    def test_upstream_build(self) -> None:
        """UpstreamSpec builds the simulator it describes; unlimited() is one account
        with the same cache settings that never runs out."""
        sim = STANDARD_UPSTREAM.build()
        self.assertEqual([a.name for a in sim.accounts], ["sim-1", "sim-2", "sim-3"])
        self.assertEqual(sim.accounts[0].five_hour_tokens, 800_000)
        self.assertEqual((sim.cache_read_weight, sim.honour_breakpoints, sim.cache_ttl_default),
                         (0.0, True, 300.0))
        unlimited = STANDARD_UPSTREAM.unlimited().build()
        self.assertEqual(len(unlimited.accounts), 1)
        self.assertGreater(unlimited.accounts[0].five_hour_tokens, 10**12)


class DeterminismTests(SynchronousTestCase):
    def test_same_seed_same_bytes(self) -> None:
        """Two workloads of one spec plan the same requests, byte for byte, with the
        same delays."""
        first, second = plan_all(Workload(SMALL)), plan_all(Workload(SMALL))
        key = lambda r: (r.session, r.turn, r.kind, r.path, r.headers, r.body, r.delay)  # noqa: E731
        self.assertEqual([key(r) for r in first], [key(r) for r in second])
        # Messages bodies never repeat (count_tokens ones carry no session data).
        messages = [r.body for r in first if r.path == b"/v1/messages?beta=true"]
        self.assertEqual(len(set(messages)), len(messages))

    def test_other_seed_differs(self) -> None:
        """Another seed gives other session ids, another prefix and other text."""
        first = plan_all(Workload(SMALL))
        other = plan_all(Workload(WorkloadSpec(**{**SMALL.__dict__, "seed": 8})))
        self.assertNotEqual(first[0].session_id, other[0].session_id)
        self.assertFalse({r.body for r in first} & {r.body for r in other})

    def test_side_traffic_leaves_main_requests_alone(self) -> None:
        """Turning side requests and subagents off removes them and leaves every main,
        compaction and post-compaction request byte-identical."""
        full = plan_all(Workload(SMALL))
        bare = plan_all(Workload(WorkloadSpec(**{**SMALL.__dict__, "side_requests": False,
                                                  "subagents": False})))
        self.assertEqual({r.kind for r in bare}, set(MAIN_KINDS))
        self.assertIn("side", {r.kind for r in full})
        self.assertIn("subagent", {r.kind for r in full})
        self.assertEqual([r.body for r in full if r.kind in MAIN_KINDS], [r.body for r in bare])

    def test_retry_gives_same_request(self) -> None:
        """A failed main request stays pending: asking again gives the same request and
        the session does not advance; a failed side request is used up; completing
        a request that is not the pending one is an error."""
        workload = Workload(SMALL)
        quota = workload.next_request(0)
        assert quota is not None
        self.assertEqual(quota.kind, "side")
        workload.complete(0, quota, False)
        main = workload.next_request(0)
        assert main is not None
        self.assertEqual((main.kind, main.turn), ("main", 0))
        workload.complete(0, main, False)
        self.assertIs(workload.next_request(0), main)
        self.assertEqual(workload.sessions()[0].turn, 0)
        self.assertRaises(ValueError, workload.complete, 0, quota, True)
        workload.complete(0, main, True)
        self.assertEqual(workload.sessions()[0].turn, 1)

    def test_sessions_end_after_their_turns(self) -> None:
        """Each session does exactly `turns` main/post-compaction turns, then has
        nothing more to send."""
        workload = Workload(SMALL)
        planned = plan_all(workload)
        for session in range(SMALL.sessions):
            turns = by_session(planned, session, frozenset({"main", "post-compaction"}))
            self.assertEqual([r.turn for r in turns], list(range(SMALL.turns)))
            self.assertIsNone(workload.next_request(session))
        self.assertTrue(workload.done)


class ShapeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.planned = plan_all(Workload(SMALL))

    def first_main(self, session: int) -> PlannedRequest:
        return by_session(self.planned, session, frozenset({"main"}))[0]

    def test_shared_prefix_identical_across_sessions(self) -> None:
        """Every session sends the same system text and tools, byte for byte, sized to
        prefix_tokens as the simulator counts; only the billing block varies; the
        sessions' own messages differ, so their prefixes diverge after the head."""
        bodies = [self.first_main(s).data for s in range(SMALL.sessions)]
        shapes = [analyse_prompt(b) for b in bodies]
        for body in bodies[1:]:
            self.assertEqual(json.dumps(body["tools"]), json.dumps(bodies[0]["tools"]))
            self.assertEqual(json.dumps(body["system"][1:]), json.dumps(bodies[0]["system"][1:]))
        self.assertEqual(len({json.dumps(b["system"][0]) for b in bodies}), SMALL.sessions)
        self.assertEqual({s.prefix_hashes[0] for s in shapes}, {shapes[0].prefix_hashes[0]})
        self.assertEqual(len({s.prefix_hashes[1] for s in shapes}), SMALL.sessions)
        self.assertEqual(shapes[0].prefix_tokens[0], SMALL.prefix_tokens)
        self.assertEqual(Workload(STANDARD).prefix_tokens, 14_000)
        self.assertEqual([t["name"] for t in bodies[0]["tools"]][:3], ["Task", "Bash", "Glob"])

    def test_claude_code_request_shape(self) -> None:
        """A main request has Claude Code's headers (session id, betas, version,
        claude-cli user agent, output-token override), its body key order, a
        billing block first, breakpoints on the system block and the newest
        message's last block, and the session id inside metadata.user_id."""
        request = self.first_main(0)
        headers = request.headers
        self.assertEqual(request.path, b"/v1/messages?beta=true")
        self.assertRegex(headers["user-agent"], r"^claude-cli/2\.1\.\d+ \(external, cli\)$")
        self.assertEqual(headers["anthropic-version"], "2023-06-01")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertIn("claude-code-20250219", headers["anthropic-beta"].split(","))
        self.assertEqual(headers["x-sim-output-tokens"], str(SMALL.output_tokens))
        self.assertNotIn("authorization", headers)
        self.assertNotIn("x-api-key", headers)
        body = json.loads(request.body)
        self.assertEqual(list(body), ["model", "messages", "system", "tools", "metadata",
                                      "max_tokens", "stream"])
        self.assertTrue(body["model"].startswith("claude-sonnet-"))
        self.assertIs(body["stream"], True)
        billing = body["system"][0]
        self.assertRegex(billing["text"], r"^x-anthropic-billing-header: cc_version=2\.1\.\d+; "
                                          r"cc_entrypoint=cli; cch=[0-9a-f]+;$")
        self.assertNotIn("cache_control", billing)
        self.assertEqual(body["system"][1]["cache_control"], {"type": "ephemeral"})
        self.assertEqual(body["messages"][-1]["content"][-1]["cache_control"], {"type": "ephemeral"})
        user_id = json.loads(body["metadata"]["user_id"])
        self.assertEqual(set(user_id), {"device_id", "account_uuid", "session_id"})
        self.assertEqual(user_id["session_id"], headers["x-claude-code-session-id"])
        self.assertRegex(user_id["session_id"], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        # Breakpoints move: only the newest message carries one.
        later = by_session(self.planned, 0, frozenset({"main"}))[3].data
        marked = [i for i, m in enumerate(later["messages"]) if "cache_control" in json.dumps(m)]
        self.assertEqual(marked, [len(later["messages"]) - 1])

    def test_one_hour_ttl(self) -> None:
        """With ttl "1h" every breakpoint asks for the 1 hour cache."""
        request = plan_all(Workload(WorkloadSpec(**{**SMALL.__dict__, "ttl": "1h", "turns": 2})))[1]
        body = request.data
        self.assertEqual(body["system"][1]["cache_control"], {"type": "ephemeral", "ttl": "1h"})
        self.assertEqual(body["messages"][-1]["content"][-1]["cache_control"]["ttl"], "1h")
        self.assertEqual(analyse_prompt(body).ttl, 3600.0)

    def test_every_session_header_is_its_own(self) -> None:
        """All requests of a session, side and subagent ones included, carry that
        session's id, and sessions have distinct ids."""
        ids = [{r.session_id for r in by_session(self.planned, s)} for s in range(SMALL.sessions)]
        self.assertTrue(all(len(i) == 1 for i in ids))
        self.assertEqual(len(set.union(*ids)), SMALL.sessions)

    def test_side_and_subagent_requests(self) -> None:
        """Side requests are a max_tokens 1 quota check, a Haiku title and
        count_tokens calls; subagents use their own system prompt and fewer tools;
        none of them changes the main history."""
        sides = [r for r in self.planned if r.kind == "side"]
        subagents = [r for r in self.planned if r.kind == "subagent"]
        self.assertTrue(sides and subagents)
        self.assertEqual(sum(r.data.get("max_tokens") == 1 for r in sides), SMALL.sessions)
        titles = [r for r in sides if r.data.get("model", "").startswith("claude-haiku-")
                  and r.data.get("max_tokens", 0) > 1]
        self.assertEqual(len(titles), SMALL.sessions)
        counts = [r for r in sides if r.path == b"/v1/messages/count_tokens?beta=true"]
        self.assertTrue(counts)
        self.assertTrue(all("x-sim-output-tokens" not in r.headers for r in counts))
        main_prefix = json.dumps(self.first_main(0).data["system"][1:])
        for request in subagents:
            self.assertNotEqual(json.dumps(request.data["system"][1:]), main_prefix)
            self.assertLess(len(request.data["tools"]), len(self.first_main(0).data["tools"]))
        # The main request after a subagent continues the history from before it.
        for request in subagents:
            following = [r for r in by_session(self.planned, request.session, frozenset({"main"}))
                         if r.turn == request.turn]
            previous = [r for r in by_session(self.planned, request.session, frozenset({"main"}))
                        if r.turn == request.turn - 1]
            if following and previous:
                self.assertEqual(following[0].prompt_tokens - previous[0].prompt_tokens,
                                 SMALL.tokens_per_turn)


class TokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.planned = plan_all(Workload(SMALL))

    def test_prompt_tokens_as_the_simulator_counts(self) -> None:
        """Every planned request's prompt_tokens is the simulator's own count of its body."""
        for request in self.planned:
            self.assertEqual(request.prompt_tokens, analyse_prompt(json.loads(request.body)).total_tokens)

    def test_each_turn_adds_tokens_per_turn(self) -> None:
        """Within a compaction cycle each main request is exactly tokens_per_turn
        bigger than the one before, as the simulator counts (the standard workload
        too); the first is the prefix plus one turn less the reply."""
        for spec in (SMALL, WorkloadSpec(sessions=1, turns=6, seed=2)):
            planned = plan_all(Workload(spec))
            for session in range(spec.sessions):
                mains = by_session(planned, session, MAIN_KINDS)
                self.assertEqual(mains[0].prompt_tokens,
                                 spec.prefix_tokens + spec.tokens_per_turn - spec.output_tokens)
                for before, after in zip(mains, mains[1:]):
                    if before.kind != "compaction" and after.kind == "main":
                        self.assertEqual(after.prompt_tokens - before.prompt_tokens, spec.tokens_per_turn)

    def test_compaction_when_context_passes_threshold(self) -> None:
        """A session compacts right after the turn whose context (prompt plus reply)
        first exceeds compact_above, and only then; the compaction request is that
        whole history plus the instruction."""
        for session in range(SMALL.sessions):
            mains = by_session(self.planned, session, MAIN_KINDS)
            self.assertGreaterEqual(sum(r.kind == "compaction" for r in mains), 3)
            for before, after in zip(mains, mains[1:]):
                if before.kind == "compaction":
                    self.assertEqual(after.kind, "post-compaction")
                    continue
                context = before.prompt_tokens + SMALL.output_tokens
                if after.kind == "compaction":
                    self.assertGreater(context, SMALL.compact_above)
                    instruction = segment_tokens(after.data["messages"][-1])
                    self.assertEqual(after.prompt_tokens, context + instruction)
                    sent = before.data["messages"]
                    self.assertEqual(unmarked(after.data["messages"][:len(sent)]), unmarked(sent))
                    self.assertEqual([m["role"] for m in after.data["messages"][len(sent):]],
                                     ["assistant", "user"])
                else:
                    self.assertLessEqual(context, SMALL.compact_above)

    def test_compaction_and_post_compaction_content(self) -> None:
        """The compaction request ends with Claude Code's summary instruction (asking for
        <analysis> and <summary>) and expects summary_tokens of output; the next
        request is one user message opening with the continuation marker and holding
        the summary, summary_tokens plus a turn's user content in size."""
        compaction = next(r for r in self.planned if r.kind == "compaction")
        landing = next(r for r in self.planned if r.kind == "post-compaction" and r.session == compaction.session)
        last = compaction.data["messages"][-1]
        self.assertEqual(last["role"], "user")
        text = last["content"][-1]["text"]
        self.assertIn("create a detailed summary of the conversation", text)
        self.assertIn("<analysis>", text)
        self.assertIn("<summary>", text)
        self.assertEqual(compaction.expected_output_tokens, SMALL.summary_tokens)
        self.assertEqual(compaction.headers["x-sim-output-tokens"], str(SMALL.summary_tokens))
        self.assertGreaterEqual(compaction.data["max_tokens"], SMALL.summary_tokens)
        messages = landing.data["messages"]
        self.assertEqual(len(messages), 1)
        self.assertEqual(messages[0]["role"], "user")
        self.assertTrue(messages[0]["content"][0]["text"].startswith(
            "This session is being continued from a previous conversation that ran out of context. "
            "The conversation is summarized below:"))
        summary_only = {"role": "user", "content": messages[0]["content"][:1]}
        self.assertAlmostEqual(segment_tokens(summary_only), SMALL.summary_tokens, delta=2)
        self.assertEqual(segment_tokens(messages[0]),
                         SMALL.summary_tokens + SMALL.tokens_per_turn - SMALL.output_tokens)
        self.assertEqual(landing.prompt_tokens,
                         SMALL.prefix_tokens + SMALL.summary_tokens + SMALL.tokens_per_turn - SMALL.output_tokens)


class DetectionTests(SynchronousTestCase):
    def test_moments_seen_by_the_session_table(self) -> None:
        """Sent in driver order through inspect_request and SessionTable.observe, each
        compaction request is Moment.COMPACTION, each post-compaction request
        Moment.LANDING, and every main, side and subagent request Moment.NONE; all
        are keyed on the session header; quota checks and count_tokens are side
        requests."""
        table = SessionTable()
        sim = STANDARD_UPSTREAM.unlimited().build()
        answer = sim_send(sim)
        seen: Counter[tuple[str, Moment]] = Counter()

        def send(request: PlannedRequest, now: float) -> SimAnswer:
            facts = inspect_request(request.path, request.session_id.encode(), request.body)
            session, moment = table.observe(facts, now)
            seen[(request.kind, moment)] += 1
            self.assertEqual((facts.session_key, facts.key_source), ("s:" + request.session_id, "header"))
            quota_or_count = request.data.get("max_tokens") == 1 or b"count_tokens" in request.path
            self.assertEqual(facts.is_side_request, quota_or_count)
            self.assertEqual(facts.is_compaction, request.kind == "compaction")
            return answer(request, now)

        result = drive(Workload(SMALL), send)
        self.assertEqual(result.turns_done, SMALL.sessions * SMALL.turns)
        kinds = {kind for kind, _ in seen}
        self.assertEqual(kinds, {"main", "compaction", "post-compaction", "side", "subagent"})
        for (kind, moment), count in seen.items():
            expected = {"compaction": Moment.COMPACTION, "post-compaction": Moment.LANDING}.get(kind, Moment.NONE)
            self.assertEqual(moment, expected, (kind, count))
        self.assertEqual(seen[("compaction", Moment.COMPACTION)], seen[("post-compaction", Moment.LANDING)])

    def test_metadata_keys_the_same_session(self) -> None:
        """Without the header, metadata.user_id gives the same session key."""
        request = plan_all(Workload(SMALL))[1]
        with_header = inspect_request(request.path, request.session_id.encode(), request.body)
        without = inspect_request(request.path, None, request.body)
        self.assertEqual(without.session_key, with_header.session_key)
        self.assertEqual(without.key_source, "metadata")


class SimulatorTests(SynchronousTestCase):
    """The workload against the simulator's pure answer()."""

    def session_answers(self, sim: Any, spec: WorkloadSpec = SMALL, session: int = 0,
                        kinds: frozenset[str] = MAIN_KINDS) -> list[tuple[PlannedRequest, SimAnswer]]:
        workload = Workload(spec)
        send = sim_send(sim)
        out, now = [], 0.0
        while (request := workload.next_request(session)) is not None:
            now += 10.0
            answer = send(request, now)
            self.assertEqual(answer.status, 200, answer.error)
            if request.kind in kinds:
                out.append((request, answer))
            workload.complete(session, request, True, answer.text)
        return out

    def test_growing_conversation_reads_history_creates_new_part(self) -> None:
        """With breakpoints honoured, each turn reads the whole previous prompt from
        the cache and creates exactly the new part (tokens_per_turn); input is 0; the
        first request creates everything; after a compaction the landing reads the
        shared prefix and creates the summary and the new turn."""
        sim = UpstreamSpec(accounts=1, five_hour_tokens=10**9).build()
        answers = self.session_answers(sim)
        first_request, first = answers[0]
        self.assertEqual(first.usage["cache_read_input_tokens"], 0)
        self.assertEqual(first.usage["cache_creation_input_tokens"], first_request.prompt_tokens)
        for (before, _), (request, answer) in zip(answers, answers[1:]):
            usage = answer.usage
            self.assertEqual(usage["input_tokens"], 0)
            self.assertEqual(usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"],
                             request.prompt_tokens)
            if request.kind == "main":
                self.assertEqual(usage["cache_read_input_tokens"], before.prompt_tokens)
                self.assertEqual(usage["cache_creation_input_tokens"], SMALL.tokens_per_turn)
            elif request.kind == "compaction":
                self.assertEqual(usage["cache_read_input_tokens"], before.prompt_tokens)
                self.assertEqual(usage["output_tokens"], SMALL.summary_tokens)
            else:
                self.assertEqual(usage["cache_read_input_tokens"], SMALL.prefix_tokens)
                self.assertEqual(usage["cache_creation_input_tokens"],
                                 SMALL.summary_tokens + SMALL.tokens_per_turn - SMALL.output_tokens)
            if request.kind != "compaction":
                self.assertEqual(usage["output_tokens"], SMALL.output_tokens)

    def test_default_cache_mode_reads_before_newest(self) -> None:
        """Without honoured breakpoints (the simulator's default) the newest message is
        input: a main turn after a main turn reads all but the previous newest
        message and creates that message and the reply (tokens_per_turn)."""
        sim = UpstreamSpec(accounts=1, five_hour_tokens=10**9, honour_breakpoints=False).build()
        answers = self.session_answers(sim)
        checked = 0
        for (before, _), (request, answer) in zip(answers, answers[1:]):
            newest = segment_tokens(request.data["messages"][-1])
            self.assertEqual(answer.usage["input_tokens"], newest)
            if before.kind == request.kind == "main":
                checked += 1
                previous_newest = segment_tokens(before.data["messages"][-1])
                self.assertEqual(answer.usage["cache_read_input_tokens"], before.prompt_tokens - previous_newest)
                self.assertEqual(answer.usage["cache_creation_input_tokens"], SMALL.tokens_per_turn)
        self.assertGreater(checked, SMALL.turns // 2)

    def test_shared_prefix_warms_new_sessions(self) -> None:
        """A new session's first request reads the shared prefix on an account another
        session used, and creates it on a fresh account."""
        sim = UpstreamSpec(accounts=2, five_hour_tokens=10**9).build()
        workload = Workload(WorkloadSpec(**{**SMALL.__dict__, "side_requests": False}))
        first, second = sim.accounts

        def ask(session: int, account: Any) -> SimAnswer:
            request = workload.next_request(session)
            assert request is not None
            answer = sim.answer({**request.headers, **account.credential_headers()}, request.body, 1.0)
            workload.complete(session, request, True)
            return answer

        ask(0, first)
        warm, cold = ask(1, first), ask(2, second)
        self.assertEqual(warm.usage["cache_read_input_tokens"], SMALL.prefix_tokens)
        self.assertEqual(cold.usage["cache_read_input_tokens"], 0)
        self.assertEqual(cold.usage["cache_creation_input_tokens"],
                         SMALL.prefix_tokens + SMALL.tokens_per_turn - SMALL.output_tokens)

    def test_quota_burns_uncached_plus_output(self) -> None:
        """With cache reads free the 5h window burns exactly input + cache_creation +
        output over a run, and the utilization header says so; at weight 0.1 reads
        add a tenth."""
        for weight in (0.0, 0.1):
            sim = UpstreamSpec(accounts=1, five_hour_tokens=10**9, cache_read_weight=weight).build()
            answers = self.session_answers(sim, kinds=frozenset({"main", "compaction", "post-compaction",
                                                                 "side", "subagent"}))
            usages = [a.usage for _, a in answers if a.usage is not None]
            uncached = sum(u["input_tokens"] + u["cache_creation_input_tokens"] + u["output_tokens"]
                           for u in usages)
            reads = sum(u["cache_read_input_tokens"] for u in usages)
            self.assertGreater(reads, 0)
            self.assertAlmostEqual(sim.accounts[0].used_5h, uncached + weight * reads, places=3)
            utilization = float(answers[-1][1].headers["anthropic-ratelimit-unified-5h-utilization"])
            self.assertAlmostEqual(utilization, (uncached + weight * reads) / 10**9, places=4)


class DriveTests(SynchronousTestCase):
    def test_drive_runs_everything_deterministically(self) -> None:
        """drive() completes every turn on an unlimited account, sums usage from the
        answers, and gives the same result twice."""
        results = []
        for _ in range(2):
            sim = STANDARD_UPSTREAM.unlimited().build()
            results.append(drive(Workload(SMALL), sim_send(sim)))
        result = results[0]
        self.assertEqual(result, results[1])
        self.assertEqual(result.turns_done, result.turns_planned)
        self.assertEqual((result.client_429s, result.abandoned), (0, 0))
        self.assertEqual(result.compactions, result.kinds["compaction"])
        self.assertEqual(result.cache_creation_tokens, sim.cache_creation_tokens)
        self.assertEqual(result.output_tokens, sim.output_tokens)
        self.assertGreater(result.finished, SMALL.turns * SMALL.think_time * 0.5)
        self.assertIn("turns done 120/120", result.describe())

    def test_429_retried_after_retry_after(self) -> None:
        """A 429 on a main request is counted and the same request is sent again after
        its retry-after; a session failing max_failures times is abandoned."""
        sim = STANDARD_UPSTREAM.unlimited().build()
        answer = sim_send(sim)
        sent: list[tuple[float, PlannedRequest]] = []
        refuse = {"left": 2}

        def send(request: PlannedRequest, now: float) -> SimAnswer:
            sent.append((now, request))
            if request.kind == "main" and refuse["left"]:
                refuse["left"] -= 1
                return SimAnswer(429, {"retry-after": "30"}, error=("rate_limit_error", "no"))
            return answer(request, now)

        spec = WorkloadSpec(**{**SMALL.__dict__, "sessions": 1, "turns": 3})
        result = drive(Workload(spec), send)
        self.assertEqual((result.client_429s, result.turns_done, result.abandoned), (2, 3, 0))
        mains = [(t, r) for t, r in sent if r.kind == "main"]
        self.assertIs(mains[0][1], mains[1][1])
        self.assertIs(mains[1][1], mains[2][1])
        self.assertAlmostEqual(mains[1][0] - mains[0][0], 30.0)
        self.assertAlmostEqual(mains[2][0] - mains[1][0], 30.0)

        refuse["left"] = 10**6
        result = drive(Workload(spec), send, max_failures=5)
        self.assertEqual((result.turns_done, result.abandoned, result.client_429s), (0, 1, 5))

    def test_horizon_stops_sending(self) -> None:
        """Nothing is sent after the horizon; unfinished sessions count as abandoned."""
        sim = STANDARD_UPSTREAM.unlimited().build()
        result = drive(Workload(SMALL), sim_send(sim), horizon=120.0)
        self.assertLess(result.turns_done, result.turns_planned)
        self.assertEqual(result.abandoned, SMALL.sessions)

    def test_baseline_tokens(self) -> None:
        """baseline_tokens runs a fresh copy of the workload on one unlimited account:
        every turn done, no 429, and the workload it was asked on is untouched."""
        workload = Workload(SMALL)
        baseline = workload.baseline_tokens()
        self.assertEqual(baseline.turns_done, SMALL.sessions * SMALL.turns)
        self.assertEqual(baseline.client_429s, 0)
        self.assertGreater(baseline.cache_creation_tokens, 0)
        self.assertEqual(workload.sessions()[0].turn, 0)
        again = Workload(SMALL).baseline_tokens()
        self.assertEqual(again.cache_creation_tokens, baseline.cache_creation_tokens)
