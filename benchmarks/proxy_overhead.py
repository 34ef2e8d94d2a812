"""
Proxy overhead: the same streaming load sent straight to the simulated
upstream and through the proxy, in alternating rounds (direct, proxied,
direct, proxied, ...) so that drift on the machine affects both alike.

    PYTHONPATH=. python benchmarks/proxy_overhead.py [--case 1..7|issue12|all]
        [--before REV|none] [--after REV] [--sizes N,N,...] [--quick]
        [--requests N] [--pairs N] [--rate R] [--profile] [--full-simulator]

Three processes take part: this one (the load generator: Twisted's Agent,
one persistent connection per client, each response read as a stream),
the simulator (nextclaude.simulate.SimulatedAnthropic, started by this file
with ``--serve-simulator``) and the proxy (``python -m nextclaude --config
FILE server --port 0 --no-console``), so the proxy's CPU time and memory can
be read from /proc apart from everything else.  Config, state and logs live
in a temporary directory; every process and the directory are removed at the
end, on Ctrl-C too.

Cases:

1. 20 concurrent clients, 200 KB Claude-Code-shaped bodies, 50 SSE deltas
   with no pause between them: rounds back to back (closed loop), then
   rounds paced at 100 requests/s in all (``--rate``), where the latency
   the proxy adds is not hidden behind queueing for the CPU.
2. 50 concurrent clients, 4 KB bodies, 200 deltas.
3. 500 concurrent slow streams: one delta every 100 ms for 10 s.

Cases 4-7 (issue 12, ``--case issue12``, the default) run an older commit's
proxy ("before", ``--before REV``, exported with git archive) beside the
working tree's ("after"; ``--after REV`` for a commit) in alternating
rounds, fresh proxies per case: 4. bodies of 10 KB, 200 KB, 1 MB and 2 MB
(CPU per request, growth per MB, RSS idle / peak / after the load); 5. 200
concurrent streams with 1 MB bodies; 6. 2000 concurrent slow streams (4 KB
bodies, one event per 100 ms for 10 s; peak RSS); 7. one client, 1 MB
bodies: the time to first byte added over direct.  "After the load" is the
resident memory once every client connection has closed and the proxy has
been idle 5 s, its pooled upstream connections still open.  Each target of
issue 12 is printed as PASS or MISS.

Per round: requests/s, time to the first body byte and to the end (p50,
p99), the CPU used by the client, the simulator, the proxy and the rest of
the machine (/proc/stat) as a share of one core, and the proxy's resident
memory.  Per case: the rounds of each kind pooled, the time the proxy adds,
its CPU milliseconds per request (utime + stime of /proc/PID/stat over the
proxied rounds, divided by the requests it served), its resident memory
(VmRSS of /proc/PID/status sampled every 100 ms: peak and end; VmHWM), and
the targets of issue 7 marked PASS or MISS.

``--profile`` runs the proxy under cProfile (case 1, or the case --case
names) and prints the top functions by cumulative and by own time once the
proxy has exited on SIGTERM.

By default the simulator decodes each distinct body, analyses its prompt and
encodes its reply's events once (the benchmark repeats a few bodies), so
the upstream stays cheap next to what is measured; ``--full-simulator``
turns that off.  A PYTHONPATH given to this script goes first in the
children's path, so a modified copy of the package can be measured.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import io
import json
import math
import os
import pstats
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from nextclaude.upstream import BytesProducer
from nextclaude.workload import claude_code_headers as workload_headers

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
# The checkout's package, unless PYTHONPATH names another copy.
sys.path.append(str(ROOT))

PROXY_KEY = "nc-bench-proxy-key-0123456789"
USER_TOKEN = "sk-ant-oat01-the-users-own-token"
ACCOUNTS = 3
HUGE_QUOTA = 10**15
MODEL = "claude-sonnet-4-5-20250929"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.1

# Targets of issue 7, on the 2-core benchmark machine.
TARGET_ADDED_TTFB_MS = 2.0
TARGET_CPU_MS = 1.8
TARGET_RSS_MB = 100.0


@dataclass(frozen=True)
class Case:
    number: int
    concurrency: int
    body_bytes: int
    deltas: int
    interval_ms: int
    requests: int  # per closed-loop round
    sessions: int = 4
    pairs: int = 2
    # A second phase of rounds paced at this many requests/s in all (the
    # same clients, each waiting for its slot): latency without queueing.
    paced_rate: float | None = None
    paced_requests: int = 0

    def describe(self) -> str:
        pace = "no pause between deltas" if not self.interval_ms else f"one every {self.interval_ms} ms"
        text = (
            f"{self.concurrency} concurrent clients, {self.body_bytes:,}-byte bodies "
            f"({self.sessions} sessions), {self.deltas} SSE deltas ({pace}); "
            f"{self.pairs} pair(s) of rounds of {self.requests} requests back to back"
        )
        if self.paced_rate:
            text += f", then {self.pairs} pair(s) of {self.paced_requests} requests paced at {self.paced_rate:g}/s"
        return text


CASES = {
    1: Case(1, concurrency=20, body_bytes=200_000, deltas=50, interval_ms=0, requests=2000,
            paced_rate=100.0, paced_requests=1000),
    2: Case(2, concurrency=50, body_bytes=4_000, deltas=200, interval_ms=0, requests=2000),
    3: Case(3, concurrency=500, body_bytes=4_000, deltas=100, interval_ms=100, requests=500, pairs=1),
}


# --------------------------------------------------------------------------
# Request bodies and headers


_WORDS = (
    "the function returns a value when the handler reads the request and the "
    "response carries every token of the module import from class self error "
    "result stream buffer socket parser event session account quota window"
).split()


def _filler(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size <= chars:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def claude_code_body(size: int, session_id: str, seed: int) -> bytes:
    """
    A Messages request in Claude Code's shape and key order (model,
    messages, system, tools, metadata, max_tokens, stream), padded to
    exactly C{size} bytes: a billing block and a cached system prompt, a
    handful of tools, then alternating tool-use turns with the 1-hour
    breakpoint on the newest user message.
    """
    rng = random.Random(seed)
    control = {"type": "ephemeral", "ttl": "1h"}
    system = [
        {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.0; cc_entrypoint=cli; cch={seed:05d};"},
        {
            "type": "text",
            "text": "You are Claude Code, Anthropic's official CLI for Claude.\n\n" + _filler(rng, size // 5),
            "cache_control": control,
        },
    ]
    tools = [
        {
            "name": name,
            "description": f"{name}: " + _filler(rng, max(40, size // 40)),
            "input_schema": {
                "type": "object",
                "properties": {"argument": {"type": "string", "description": "What to work on"}},
                "required": ["argument"],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        }
        for name in ("Bash", "Read", "Edit", "Write", "Grep", "Glob", "TodoWrite", "WebFetch")[: 8 if size >= 20_000 else 3]
    ]
    user_id = json.dumps({"device_id": f"{seed:064x}", "account_uuid": "", "session_id": session_id})
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Please work through this task: " + _filler(rng, 200)}]}
    ]
    turn = max(300, size // 50)

    def body() -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": messages,
            "system": system,
            "tools": tools,
            "metadata": {"user_id": user_id},
            "max_tokens": 32000,
            "stream": True,
        }

    def turn_pair(number: int, text_chars: int, result_chars: int, marked: bool) -> list[dict[str, Any]]:
        tool_id = f"toolu_{number:04d}{seed:08d}"
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id, "content": _filler(rng, result_chars)}
        if marked:
            result["cache_control"] = control
        return [
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": _filler(rng, text_chars)},
                    {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"argument": "src/module.py"}},
                ],
            },
            {"role": "user", "content": [result]},
        ]

    # Whole turns while they fit, then the newest turn (with Claude Code's
    # breakpoint) padded to the exact size.
    while True:
        messages += turn_pair(len(messages), turn // 4, turn, False)
        messages += turn_pair(len(messages), 40, 0, True)
        fits = len(_dump(body())) <= size
        del messages[-2:]
        if not fits:
            del messages[-2:]
            break
    messages += turn_pair(len(messages), 40, 0, True)
    missing = size - len(_dump(body()))
    if missing > 0:
        messages[-1]["content"][0]["content"] = _filler(rng, missing)
    raw = _dump(body())
    if len(raw) > size:
        raise ValueError(f"cannot shape a body of {size} bytes (minimum {len(raw)})")
    return raw


def claude_code_headers(session_id: str, case: Case, credential: str, proxied: bool) -> dict[bytes, list[bytes]]:
    headers = {
        **workload_headers(session_id),
        "x-stainless-arch": "x64",
        "x-stainless-os": "Linux",
        "x-stainless-package-version": "0.60.0",
        "x-stainless-runtime": "node",
        "x-stainless-runtime-version": "v22.12.0",
        "x-sim-deltas": str(case.deltas),
        "x-sim-delta-interval-ms": str(case.interval_ms),
        "authorization": f"Bearer {credential}",
    }
    if proxied:
        # Claude Code in subscription mode: its own token, the proxy key aside.
        headers["x-nextclaude-key"] = PROXY_KEY
    return {name.encode(): [value.encode()] for name, value in headers.items()}


# --------------------------------------------------------------------------
# The simulator process


def serve_simulator(port: int, accounts: int, memoise: bool) -> None:
    from twisted.internet import reactor

    from nextclaude import simulate

    sim = simulate.SimulatedAnthropic(
        reactor, simulate.simulated_accounts(accounts, five_hour_tokens=HUGE_QUOTA, seven_day_tokens=HUGE_QUOTA)
    )
    if memoise:
        _memoise(sim, simulate)
        # Twisted's default backlog of 50 would drop the SYNs of a burst of
        # new connections (case 3), costing them a 1 s retransmit.
        listening = reactor.listenTCP(port, in_memory_site(sim), backlog=1024, interface="127.0.0.1")
    else:
        listening = simulate.listen_simulator(reactor, sim, port)
    print(f"simulator listening on http://127.0.0.1:{listening.getHost().port}", flush=True)
    # A diagnostic: is the simulator, not the proxy, what limits a round?
    profile_to = os.environ.get("NEXTCLAUDE_BENCH_PROFILE_SIMULATOR")
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(reactor.run)
        profiler.dump_stats(profile_to)
    else:
        reactor.run()


def in_memory_site(resource: Any) -> Any:
    """
    The simulator's site, keeping request bodies in memory: Twisted spools
    bodies over 100 KB to a temporary file, a cost of the upstream that has
    nothing to do with the proxy.
    """
    from twisted.web.server import Request, Site

    class InMemoryRequest(Request):
        def gotLength(self, length: int | None) -> None:
            self.content = io.BytesIO()

    class QuietSite(Site):
        noisy = False
        requestFactory = InMemoryRequest

        def log(self, request: Any) -> None:
            pass

    return QuietSite(resource)


def _memoise(sim: Any, simulate: Any) -> None:
    """
    Decode each distinct body once, analyse its prompt once and encode its
    reply's events once: the benchmark repeats a few bodies, and the
    upstream's own work is not what is measured.  Admission, quota, cache,
    message ids and the wire shape (one chunk per event) are unchanged.
    """
    parsed: dict[bytes, Any] = {}
    shapes: dict[int, Any] = {}
    original = sim._routes[(b"POST", b"/v1/messages")]
    analyse = simulate.analyse_prompt

    def messages(headers: Any, raw: Any, now: float, overrides: Any, request_id: str) -> Any:
        if isinstance(raw, bytes):
            body = parsed.get(raw)
            if body is None:
                try:
                    body = json.loads(raw)
                except ValueError:
                    return original(headers, raw, now, overrides, request_id)
                if isinstance(body, dict) and len(parsed) < 64:
                    parsed[raw] = body
            raw = body
        return original(headers, raw, now, overrides, request_id)

    def analyse_prompt(body: dict[str, Any], default_ttl: float = simulate.TTL_5M) -> Any:
        key = id(body)
        if key in shapes and shapes[key][0] is body:
            return shapes[key][1]
        shape = analyse(body, default_ttl)
        if any(body is cached for cached in parsed.values()):
            shapes[key] = (body, shape)
        return shape

    # The events of a reply differ between requests only in the message id.
    events: dict[Any, list[tuple[float, bytes]]] = {}
    encode_events = simulate.stream_events
    placeholder = "msg_sim" + "0" * 24

    def stream_events(reply: Any, overrides: Any) -> list[tuple[float, bytes]]:
        key = (reply.model, reply.chunks, reply.usage, reply.stop_reason, overrides)
        steps = events.get(key)
        if steps is None:
            steps = encode_events(dataclasses.replace(reply, message_id=placeholder), overrides)
            if len(events) < 256:
                events[key] = steps
        pause, first = steps[0]
        return [(pause, first.replace(placeholder.encode(), reply.message_id.encode())), *steps[1:]]

    sim._routes[(b"POST", b"/v1/messages")] = messages
    simulate.analyse_prompt = analyse_prompt
    simulate.stream_events = stream_events


# --------------------------------------------------------------------------
# Child processes and /proc


def _die_with_parent() -> None:
    # The children must not outlive a benchmark killed with SIGKILL.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Children:
    """
    The simulator and proxy processes of one case and the temp dir they
    live in; everything is removed by L{close}, which is safe to call twice.
    """

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="nextclaude-overhead-"))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.proxy_pid: int | None = None
        self.sim_pid: int | None = None
        self.profile_file: Path | None = None

    def spawn(
        self, name: str, argv: list[str], pattern: str, timeout: float = 30.0, path_first: Path | None = None
    ) -> tuple[int, int]:
        """
        Start C{argv} with its output in a file; wait for a line holding
        C{pattern} and return (pid, the port after it).  C{path_first} goes
        ahead of everything in the child's path (an exported older tree).
        """
        out = self.directory / f"{name}.out"
        environment = dict(os.environ)
        # The checkout this file is in, after any PYTHONPATH given (so a
        # modified copy of the package can be measured against this one).
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(path_first) if path_first else None, environment.get("PYTHONPATH"), str(ROOT)])
        )
        with open(out, "wb") as sink:
            process = subprocess.Popen(
                argv,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                cwd=self.directory,
                # Ctrl-C goes to the benchmark alone, which then stops these.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.processes.append(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{out.read_text(errors='replace')}")
            for line in out.read_text(errors="replace").splitlines():
                if pattern in line:
                    return process.pid, int(re.search(r":(\d+)", line.split(pattern, 1)[1]).group(1))
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start within {timeout} s:\n{out.read_text(errors='replace')}")

    def start(self, full_simulator: bool, profile: bool) -> tuple[int, int]:
        sim_port = self.start_simulator(full_simulator)
        self.proxy_pid, proxy_port = self.start_proxy("proxy", sim_port, profile=profile)
        return sim_port, proxy_port

    def start_simulator(self, full_simulator: bool) -> int:
        argv = [sys.executable, str(HERE), "--serve-simulator", "--accounts", str(ACCOUNTS)]
        if full_simulator:
            argv.append("--full-simulator")
        self.sim_pid, sim_port = self.spawn("simulator", argv, "simulator listening on ")
        return sim_port

    def start_proxy(
        self, name: str, sim_port: int, profile: bool = False, path_first: Path | None = None
    ) -> tuple[int, int]:
        """
        A proxy in front of the simulator, with its config and state in a
        directory of its own; C{path_first} runs the package found there.
        """
        home = self.directory / name
        home.mkdir()
        config = home / "config.json"
        config.write_text(
            json.dumps(
                {
                    "proxy": {"apiKey": PROXY_KEY},
                    "upstream": f"http://127.0.0.1:{sim_port}",
                    # The accounts service reads usage at start-up: keep that
                    # (and any refresh) on loopback, never the real endpoints.
                    "oauth": {
                        "authorizeUrl": f"http://127.0.0.1:{sim_port}/oauth/authorize",
                        "tokenUrl": f"http://127.0.0.1:{sim_port}/v1/oauth/token",
                        "profileUrl": f"http://127.0.0.1:{sim_port}/api/oauth/profile",
                        "usageUrl": f"http://127.0.0.1:{sim_port}/api/oauth/usage",
                    },
                    "accounts": [{"name": a.name, "type": "oauth", "accessToken": a.credential} for a in sim_accounts()],
                }
            )
        )
        config.chmod(0o600)
        argv = [sys.executable]
        if profile:
            self.profile_file = self.directory / "proxy.prof"
            argv += ["-m", "cProfile", "-o", str(self.profile_file)]
        argv += ["-m", "nextclaude", "--config", str(config), "server", "--port", "0", "--no-console"]
        return self.spawn(name, argv, "listening on http://", path_first=path_first)

    def stop(self, pid: int) -> None:
        """Stop one child (a proxy whose case is over) and wait for it."""
        for process in self.processes:
            if process.pid == pid and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def stop_proxy(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the proxy and wait for it (so cProfile writes its file)."""
        for process in self.processes:
            if process.pid == self.proxy_pid and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    return process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    return None
        return None

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []
        shutil.rmtree(self.directory, ignore_errors=True)


def sim_accounts() -> list[Any]:
    from nextclaude.simulate import simulated_accounts

    return simulated_accounts(ACCOUNTS, five_hour_tokens=HUGE_QUOTA, seven_day_tokens=HUGE_QUOTA)


def cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces: fields count from after its ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle (steal included), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is in user)
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                found[name] = int(value.split()[0])
    return found


# --------------------------------------------------------------------------
# The load generator


@dataclass
class Sample:
    start: float
    first: float | None = None
    end: float | None = None
    status: int | None = None
    ok: bool = False
    error: str | None = None
    late: bool = False  # a paced request sent more than 5 ms after its slot


@dataclass
class Round:
    target: str  # "direct" | "proxied"
    number: int
    rate: float | None  # requests/s of a paced round; None: closed loop
    samples: list[Sample]
    wall: float
    cpu: dict[str, float]  # process -> CPU seconds used in the round
    rss_peak_kb: int = 0
    rss_end_kb: int = 0
    hwm_kb: int = 0

    @property
    def kind(self) -> str:
        return self.target if self.rate is None else f"{self.target}@{self.rate:g}/s"

    @property
    def completed(self) -> int:
        return sum(1 for s in self.samples if s.ok)

    def throughput(self) -> float:
        return self.completed / self.wall if self.wall > 0 else 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def ttfbs(samples: list[Sample]) -> list[float]:
    return [(s.first - s.start) * 1000 for s in samples if s.ok and s.first is not None]


def totals(samples: list[Sample]) -> list[float]:
    return [(s.end - s.start) * 1000 for s in samples if s.ok and s.end is not None]


class Load:
    """
    The clients: one persistent connection pool with a connection per
    client, bodies written in one go, responses read as a stream.
    """

    def __init__(self, reactor: Any, case: Case, sim_port: int, proxy_ports: int | dict[str, int]) -> None:
        self.reactor = reactor
        self.case = case
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = case.concurrency
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=30)
        credential = sim_accounts()[0].credential
        if isinstance(proxy_ports, int):
            proxy_ports = {"proxied": proxy_ports}
        self.targets = {"direct": (f"http://127.0.0.1:{sim_port}/v1/messages".encode(), credential, False)}
        for name, port in proxy_ports.items():
            self.targets[name] = (f"http://127.0.0.1:{port}/v1/messages".encode(), USER_TOKEN, True)
        self.sessions = []
        for index in range(case.sessions):
            session_id = f"{index:08x}-1bad-4c0d-9e55-{case.number:04d}{index:08x}"
            self.sessions.append(
                (session_id, claude_code_body(case.body_bytes, session_id, seed=case.number * 100 + index))
            )
        # For warm-ups that only open connections and load the code.
        self.small = claude_code_body(4_000, self.sessions[0][0], seed=case.number * 100 + 99)
        self.timeout = 60.0 + case.deltas * case.interval_ms / 1000 * 3

    async def one(
        self, target: str, client: int, interval_ms: int | None = None, small: bool = False
    ) -> Sample:
        url, credential, proxied = self.targets[target]
        session_id, body = self.sessions[client % len(self.sessions)]
        if small:
            body = self.small
        raw = claude_code_headers(session_id, self.case, credential, proxied)
        if interval_ms is not None:
            raw[b"x-sim-delta-interval-ms"] = [str(interval_ms).encode()]
        if small:
            raw[b"x-sim-deltas"] = [b"5"]
        headers = Headers(raw)
        sample = Sample(start=time.perf_counter())
        try:
            pending = self.agent.request(b"POST", url, headers, BytesProducer(body))
            pending.addTimeout(self.timeout, self.reactor)
            response = await pending
            sample.status = response.code
            finished: Deferred[None] = Deferred()
            response.deliverBody(_Reader(sample, finished))
            finished.addTimeout(self.timeout, self.reactor)
            await finished
        except Exception as error:  # noqa: BLE001 - every failure is a sample
            sample.error = f"{type(error).__name__}: {error}"[:200]
            sample.ok = False
        return sample

    async def run_round(
        self,
        target: str,
        number: int,
        rate: float | None,
        requests: int,
        pids: dict[str, int],
        proxy_pid: int | None,
        spacing: float = 0.0,
    ) -> Round:
        """
        C{requests} requests from C{case.concurrency} clients: back to back
        (closed loop), or paced at C{rate} requests/s in all, the n-th
        request due n/rate seconds after the start.  With C{spacing}, the
        clients start that many seconds apart.  C{proxy_pid} is the process
        whose resident memory is sampled (None: none).
        """
        case = self.case
        samples: list[Sample] = []
        issued = [0]
        memory = {"peak": 0}

        def watch() -> None:
            if proxy_pid is None:
                return
            try:
                memory["peak"] = max(memory["peak"], memory_kb(proxy_pid).get("VmRSS", 0))
            except OSError:
                pass

        async def client(index: int) -> None:
            if spacing:
                await deferLater(self.reactor, index * spacing)
            while issued[0] < requests:
                slot = issued[0]
                issued[0] += 1
                late = False
                if rate is not None:
                    wait = started + slot / rate - time.perf_counter()
                    if wait > 0:
                        await deferLater(self.reactor, wait)
                    late = wait < -0.005
                sample = await self.one(target, index)
                sample.late = late
                samples.append(sample)

        watcher = LoopingCall(watch)
        watcher.clock = self.reactor
        watcher.start(SAMPLE_INTERVAL, now=True)
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        busy = machine_busy_seconds()
        started = time.perf_counter()
        await gatherResults([Deferred.fromCoroutine(client(i)) for i in range(case.concurrency)])
        wall = time.perf_counter() - started
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        # What the rest of the machine (other programs) used meanwhile.
        used["other"] = max(0.0, machine_busy_seconds() - busy - sum(used.values()))
        watcher.stop()
        watch()
        end = memory_kb(proxy_pid) if proxy_pid is not None else {}
        return Round(
            target,
            number,
            rate,
            samples,
            wall,
            used,
            rss_peak_kb=memory["peak"],
            rss_end_kb=end.get("VmRSS", 0),
            hwm_kb=end.get("VmHWM", 0),
        )

    async def warm_up(self) -> None:
        # Fill both connection pools and let both servers settle (first
        # imports, caches) before anything is measured; without pauses, so
        # the slow case warms up quickly.
        # Every client gets its connection here, so the rounds do not
        # measure connection set-up.
        count = self.case.concurrency
        for target in ("direct", "proxied"):
            for _ in range(2):
                results = await gatherResults(
                    [Deferred.fromCoroutine(self.one(target, i, interval_ms=0)) for i in range(count)]
                )
                bad = [s for s in results if not s.ok]
                if bad:
                    raise RuntimeError(f"warm-up {target} requests failed: {bad[0].error}")

    async def open_connections(self, targets: list[str], spacing: float = 0.001) -> None:
        """
        One small request per client to each target, the clients starting
        C{spacing} seconds apart (a listen backlog is finite) and every
        request lasting until the last has started (an idle pooled
        connection would be reused): every client has its own connection
        and every process its code loaded.
        """
        span_ms = self.case.concurrency * spacing * 1000
        interval = max(1, math.ceil(span_ms / 4))

        async def client(index: int, target: str) -> Sample:
            await deferLater(self.reactor, index * spacing)
            return await self.one(target, index, interval_ms=interval, small=True)

        for target in targets:
            results = await gatherResults(
                [Deferred.fromCoroutine(client(i, target)) for i in range(self.case.concurrency)]
            )
            bad = [s for s in results if not s.ok]
            if bad:
                raise RuntimeError(f"warm-up {target} requests failed: {bad[0].error}")

    async def close_connections(self) -> None:
        """Close every client connection (the proxies keep their upstream ones)."""
        await self.pool.closeCachedConnections()


@implementer(IProtocol)
class _Reader:
    """Times the first body byte and the end; checks the stream ended whole."""

    def __init__(self, sample: Sample, finished: Any) -> None:
        self._sample = sample
        self._finished = finished
        self._tail = b""
        self.transport = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        if self._sample.first is None:
            self._sample.first = time.perf_counter()
        self._tail = (self._tail + data)[-200:]

    def connectionLost(self, reason: Any) -> None:
        sample = self._sample
        sample.end = time.perf_counter()
        clean = reason.check(ResponseDone) is not None
        sample.ok = sample.status == 200 and clean and b"event: message_stop" in self._tail
        if not sample.ok:
            sample.error = f"status {sample.status}, {'clean end' if clean else reason.getErrorMessage()}"
            if clean:
                sample.error += ", no message_stop"
        self._finished.callback(None)


# --------------------------------------------------------------------------
# Reporting


def _ms(value: float) -> str:
    return "     n/a" if math.isnan(value) else f"{value:8.2f}"


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


PROCESSES = ("client", "sim", "proxy", "other")
ROUND_HEADER = (
    "  round kind              req/s ttfb p50 ttfb p99 totl p50 totl p99   ok/sent"
    "   %core: client   sim proxy other  proxy RSS peak/end MB"
)


def round_line(r: Round) -> str:
    t, e = ttfbs(r.samples), totals(r.samples)
    cpu = " ".join(f"{100 * r.cpu.get(name, 0.0) / r.wall:5.0f}" for name in PROCESSES)
    late = sum(s.late for s in r.samples)
    return (
        f"  {r.number:5d} {r.kind:16s} {r.throughput():7.1f} {_ms(percentile(t, 50))} {_ms(percentile(t, 99))}"
        f" {_ms(percentile(e, 50))} {_ms(percentile(e, 99))} {r.completed:5d}/{len(r.samples):<5d}"
        f"          {cpu}  {r.rss_peak_kb / 1024:7.1f}/{r.rss_end_kb / 1024:.1f}"
        + (f"  ({late} sent late)" if late else "")
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Pooled:
    """The rounds of one kind taken together."""

    rounds: list[Round]
    ttfb: list[float] = field(init=False)
    total: list[float] = field(init=False)
    rate: float = field(init=False)
    cpu: dict[str, float] = field(init=False)  # share of a core
    sent: int = field(init=False)
    ok: int = field(init=False)
    errors: list[str] = field(init=False)

    def __post_init__(self) -> None:
        samples = [s for r in self.rounds for s in r.samples]
        wall = sum(r.wall for r in self.rounds)
        self.ttfb, self.total = ttfbs(samples), totals(samples)
        self.rate = sum(r.completed for r in self.rounds) / wall if wall else 0.0
        self.cpu = {name: sum(r.cpu.get(name, 0.0) for r in self.rounds) / wall if wall else 0.0 for name in PROCESSES}
        self.sent = len(samples)
        self.ok = sum(r.completed for r in self.rounds)
        self.errors = sorted({s.error or "" for s in samples if not s.ok})

    def line(self, kind: str) -> str:
        return (
            f"    {kind:16s} {self.rate:7.1f} req/s  ttfb p50 {percentile(self.ttfb, 50):7.2f}"
            f" p99 {percentile(self.ttfb, 99):7.2f} ms  total p50 {percentile(self.total, 50):7.2f}"
            f" p99 {percentile(self.total, 99):7.2f} ms  {self.ok}/{self.sent} complete"
        )


def phase_report(rounds: list[Round], cores: int, label: str) -> tuple[list[str], dict[str, float]]:
    """Lines for one phase (closed loop or paced) and its key figures."""
    lines = [f"  {label}, pooled over the rounds of each kind:"]
    direct = Pooled([r for r in rounds if r.target == "direct"])
    proxied = Pooled([r for r in rounds if r.target == "proxied"])
    for pooled in (direct, proxied):
        lines.append(pooled.line(pooled.rounds[0].kind))
        for error in pooled.errors[:3]:
            lines.append(f"      failure: {error}")
    added = percentile(proxied.ttfb, 50) - percentile(direct.ttfb, 50)
    lines.append(
        f"    {'added':16s} ttfb p50 {added:+.2f} ms, p99 {percentile(proxied.ttfb, 99) - percentile(direct.ttfb, 99):+.2f} ms;"
        f" total p50 {percentile(proxied.total, 50) - percentile(direct.total, 50):+.2f} ms,"
        f" p99 {percentile(proxied.total, 99) - percentile(direct.total, 99):+.2f} ms;"
        f" throughput {100 * (proxied.rate / direct.rate - 1) if direct.rate else float('nan'):+.1f}%"
    )
    served = sum(len(r.samples) for r in proxied.rounds)
    proxy_cpu = sum(r.cpu.get("proxy", 0.0) for r in proxied.rounds)
    cpu_ms = 1000 * proxy_cpu / served if served else float("nan")
    peak = max((r.rss_peak_kb for r in proxied.rounds), default=0)
    end = proxied.rounds[-1].rss_end_kb if proxied.rounds else 0
    hwm = max((r.hwm_kb for r in proxied.rounds), default=0)
    lines.append(
        f"    proxy: {cpu_ms:.3f} ms CPU per request ({proxy_cpu:.2f} s over {served} requests);"
        f" resident peak {_mb(peak)}, end {_mb(end)} (VmHWM {_mb(hwm)})"
    )
    sim_share = direct.cpu["sim"]
    if sim_share >= 0.9:
        lines.append(
            f"    NOTE: the simulator is the bottleneck of the direct rounds ({100 * sim_share:.0f}% of a core):"
            " their throughput is the simulator's limit and their latency includes queueing at it."
        )
    else:
        lines.append(f"    simulator not the bottleneck of the direct rounds ({100 * sim_share:.0f}% of a core).")
    if direct.cpu["client"] >= 0.9:
        lines.append(
            f"    NOTE: the load generator is saturated in the direct rounds ({100 * direct.cpu['client']:.0f}% of a core)."
        )
    if proxied.cpu["proxy"] >= 0.9:
        lines.append(
            f"    the proxy is the bottleneck of the proxied rounds ({100 * proxied.cpu['proxy']:.0f}% of a core):"
            " its CPU per request sets their throughput, and its queue their latency."
        )
    for pooled in (direct, proxied):
        demand = sum(pooled.cpu.values())
        if demand >= 0.9 * cores:
            lines.append(
                f"    NOTE: in the {pooled.rounds[0].kind} rounds the machine was CPU-bound ({demand:.2f} of"
                f" {cores} cores busy, {pooled.cpu['other']:.2f} of them other programs)."
            )
    if any(r.target == "proxied" and r.cpu.get("other", 0) / r.wall > 0.25 for r in rounds):
        lines.append("    NOTE: other programs used over a quarter of a core during some rounds: expect noise.")
    figures = {"added_ttfb": added, "cpu_ms": cpu_ms, "peak_mb": peak / 1024}
    return lines, figures


def report(case: Case, rounds: list[Round], cores: int) -> list[str]:
    lines: list[str] = []
    closed = [r for r in rounds if r.rate is None]
    paced = [r for r in rounds if r.rate is not None]
    phase, figures = phase_report(closed, cores, "back to back (closed loop)")
    lines += phase
    paced_figures: dict[str, float] = {}
    if paced:
        phase, paced_figures = phase_report(paced, cores, f"paced at {paced[0].rate:g} requests/s")
        lines += phase
    if case.number == 1:
        lines.append(
            f"  target: added TTFB p50 < {TARGET_ADDED_TTFB_MS} ms, back to back: {figures['added_ttfb']:+.2f} ms"
            f" {verdict(figures['added_ttfb'] < TARGET_ADDED_TTFB_MS)}"
        )
        if paced_figures:
            lines.append(
                f"  target: added TTFB p50 < {TARGET_ADDED_TTFB_MS} ms, paced: {paced_figures['added_ttfb']:+.2f} ms"
                f" {verdict(paced_figures['added_ttfb'] < TARGET_ADDED_TTFB_MS)}"
            )
            lines.append(
                "  (back to back, each client waits behind the others' requests: the added TTFB is about"
                f" {case.concurrency} x the CPU a request costs the slowest process; paced, it is the"
                " proxy's own time on a request's path)"
            )
        lines.append(
            f"  target: proxy CPU < {TARGET_CPU_MS} ms/request, back to back: {figures['cpu_ms']:.3f} ms"
            f" {verdict(figures['cpu_ms'] < TARGET_CPU_MS)}"
        )
    if case.number == 3:
        proxied = [r for r in closed if r.target == "proxied"]
        complete = all(r.completed == len(r.samples) == case.requests for r in proxied)
        counts = ", ".join(f"{r.completed}/{case.requests}" for r in proxied)
        lines.append(f"  target: all {case.requests} slow streams complete through the proxy: {counts} {verdict(complete)}")
        lines.append(
            f"  target: proxy resident < {TARGET_RSS_MB:.0f} MB: peak {figures['peak_mb']:.1f} MB"
            f" {verdict(figures['peak_mb'] < TARGET_RSS_MB)}"
        )
    return lines


def print_profile(path: Path, top: int = 25) -> None:
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        stats = pstats.Stats(str(path), stream=out)
        stats.strip_dirs().sort_stats(order).print_stats(top)
        print(f"\n--- proxy profile: top {top} by {order} ---")
        text = out.getvalue()
        # Skip pstats' preamble down to the column header.
        start = text.find("   ncalls")
        print((text[start:] if start >= 0 else text).rstrip())


# --------------------------------------------------------------------------
# Running


async def run_case(reactor: Any, case: Case, args: argparse.Namespace, profile: bool) -> bool:
    children = Children()
    _cleanups.append(children.close)
    try:
        print(f"\nCase {case.number}: {case.describe()}", flush=True)
        sim_port, proxy_port = children.start(args.full_simulator, profile)
        assert children.proxy_pid is not None and children.sim_pid is not None
        pids = {"client": os.getpid(), "sim": children.sim_pid, "proxy": children.proxy_pid}
        load = Load(reactor, case, sim_port, proxy_port)
        print(
            f"  simulator pid {children.sim_pid} on :{sim_port}"
            f" ({'full' if args.full_simulator else 'memoised parsing'}), proxy pid {children.proxy_pid}"
            f" on :{proxy_port}{' under cProfile' if profile else ''}; body {len(load.sessions[0][1]):,} bytes",
            flush=True,
        )
        await load.warm_up()
        print(f"  proxy resident after warm-up: {_mb(memory_kb(children.proxy_pid).get('VmRSS', 0))}")
        print(ROUND_HEADER, flush=True)
        rounds: list[Round] = []
        phases: list[tuple[float | None, int]] = [(None, case.requests)]
        if case.paced_rate:
            phases.append((case.paced_rate, case.paced_requests))
        for rate, requests in phases:
            for pair in range(1, case.pairs + 1):
                for target in ("direct", "proxied"):
                    result = await load.run_round(target, pair, rate, requests, pids, children.proxy_pid)
                    rounds.append(result)
                    print(round_line(result), flush=True)
        for line in report(case, rounds, os.cpu_count() or 1):
            print(line)
        await load.pool.closeCachedConnections()
        if profile:
            status = children.stop_proxy()
            print(f"  proxy exited with {status} on SIGTERM")
            if children.profile_file is not None and children.profile_file.exists():
                print("  (the proxy's CPU figures above are inflated by cProfile)")
                print_profile(children.profile_file)
                if args.profile_out:
                    shutil.copy(children.profile_file, args.profile_out)
                    print(f"\n  profile kept in {args.profile_out}")
            else:
                print("  NOTE: no profile was written (the proxy did not exit cleanly)")
        return all(r.completed == len(r.samples) for r in rounds)
    finally:
        children.close()


# --------------------------------------------------------------------------
# Issue 12: memory after a load, CPU per megabyte of body, many streams and
# the time to first byte, for an older commit's proxy beside the working
# tree's, in one run.

SIZES = (10_000, 200_000, 1_000_000, 2_000_000)
# Requests per round at each body size: a few seconds of proxy CPU.
SIZE_REQUESTS = {10_000: 600, 200_000: 400, 1_000_000: 150, 2_000_000: 100}
# The parent of issue 12's first commit: what "before" means by default
# (2864881, where the first "before" figures were taken, lacks placement).
BEFORE_COMMIT = "1dd5e2f"
# "After a load": every client connection closed, this long idle, the
# proxies' pooled upstream connections still open.
AFTER_LOAD_IDLE = 5.0
IDLE_SETTLE = 2.0

TARGET_AFTER_LOAD_MB = 10.0
TARGET_CPU_RATIO = 0.6
TARGET_GROWTH_MS_PER_MB = 4.0
TARGET_SLOW_RSS_MB = 130.0
TARGET_TTFB_1MB_MS = 5.0


@dataclass(frozen=True)
class Version:
    label: str  # "before" or "after"
    describe: str
    path_first: Path | None  # an exported tree to run instead of the checkout


def _git(*argv: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *argv], check=True, capture_output=True, text=True).stdout.strip()


def export_tree(rev: str, directory: Path) -> tuple[str, Path]:
    """
    The package as of C{rev}, exported with git archive into C{directory}
    (the checkout is never touched): (the commit, the tree).
    """
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = directory / f"tree-{commit[:12]}"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "nextclaude"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return commit, tree


def versions_to_measure(before: str | None, directory: Path, after: str | None = None) -> list[Version]:
    """
    "after": the working tree, or the commit C{after}; "before", unless
    C{before} is None: the package as of that commit.
    """
    found: list[Version] = []
    if before is not None:
        commit, tree = export_tree(before, directory)
        subject = _git("log", "-1", "--format=%s", commit)
        found.append(Version("before", f"commit {commit[:12]} ({subject[:60]})", tree))
    if after is not None:
        commit, tree = export_tree(after, directory)
        subject = _git("log", "-1", "--format=%s", commit)
        found.append(Version("after", f"commit {commit[:12]} ({subject[:60]})", tree))
    else:
        dirty = " with uncommitted changes" if _git("status", "--porcelain", "--", "nextclaude") else ""
        found.append(Version("after", f"working tree at {_git('rev-parse', '--short=12', 'HEAD')}{dirty}", None))
    return found


def rss_mb(pid: int) -> float:
    return memory_kb(pid).get("VmRSS", 0) / 1024


def median(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass
class Measured:
    """One proxy version's figures in one case."""

    rounds: list[Round] = field(default_factory=list)
    idle_mb: float = float("nan")
    after_load_mb: float = float("nan")

    def cpu_ms(self) -> list[float]:
        return [1000 * r.cpu.get("proxy", 0.0) / len(r.samples) for r in self.rounds if r.samples]

    def peak_mb(self) -> float:
        return max((r.rss_peak_kb for r in self.rounds), default=0) / 1024

    def complete(self) -> tuple[int, int]:
        return sum(r.completed for r in self.rounds), sum(len(r.samples) for r in self.rounds)

    def grown_mb(self) -> float:
        return self.after_load_mb - self.idle_mb


async def measure_versions(
    reactor: Any,
    case: Case,
    versions: list[Version],
    children: Children,
    sim_port: int,
    direct: bool = False,
    spacing: float = 0.0,
) -> dict[str, Measured]:
    """
    Fresh proxies of every version, measured in alternating rounds (the
    order reversed every other pair): idle RSS (after one small request
    per client, every client connection closed, then a pause), the
    rounds, then RSS after the load (every client connection closed,
    AFTER_LOAD_IDLE seconds idle, upstream connections still pooled).
    """
    assert children.sim_pid is not None
    proxies = {
        v.label: children.start_proxy(f"case{case.number}-{case.body_bytes}-{v.label}", sim_port, path_first=v.path_first)
        for v in versions
    }
    try:
        load = Load(reactor, case, sim_port, {label: port for label, (_pid, port) in proxies.items()})
        labels = [v.label for v in versions]
        targets = (["direct"] if direct else []) + labels
        print("  " + ", ".join(f"{label} proxy pid {pid} on :{port}" for label, (pid, port) in proxies.items()), flush=True)
        await load.open_connections(targets)
        await load.close_connections()
        await deferLater(reactor, IDLE_SETTLE)
        measured = {label: Measured(idle_mb=rss_mb(pid)) for label, (pid, _port) in proxies.items()}
        if direct:
            measured["direct"] = Measured()
        print(
            "  idle RSS (after one small request per client, connections closed): "
            + ", ".join(f"{label} {measured[label].idle_mb:.1f} MB" for label in labels),
            flush=True,
        )
        print(ROUND_HEADER, flush=True)
        for pair in range(1, case.pairs + 1):
            order = targets if pair % 2 else targets[::-1]
            for target in order:
                pids = {"client": os.getpid(), "sim": children.sim_pid}
                watched = None
                if target != "direct":
                    pids["proxy"] = watched = proxies[target][0]
                result = await load.run_round(target, pair, None, case.requests, pids, watched, spacing)
                measured[target].rounds.append(result)
                print(round_line(result), flush=True)
        await load.close_connections()
        await deferLater(reactor, AFTER_LOAD_IDLE)
        for label, (pid, _port) in proxies.items():
            measured[label].after_load_mb = rss_mb(pid)
        return measured
    finally:
        for pid, _port in proxies.values():
            children.stop(pid)


def versions_lines(measured: dict[str, Measured], labels: list[str]) -> list[str]:
    lines = []
    for label in labels:
        m = measured[label]
        cpu = m.cpu_ms()
        done, sent = m.complete()
        lines.append(
            f"    {label:6s} CPU ms/request {median(cpu):7.3f} (rounds: {', '.join(f'{c:.2f}' for c in cpu)});"
            f" RSS idle {m.idle_mb:6.1f}, peak {m.peak_mb():6.1f}, after the load {m.after_load_mb:6.1f} MB"
            f" ({m.grown_mb():+.1f}); {done}/{sent} complete"
        )
    return lines


def _ratio(after: float, before: float) -> float:
    return after / before if before and not math.isnan(before) else float("nan")


def growth_per_mb(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of CPU ms per request against body MB (10^6 bytes)."""
    xs = [size / 1e6 for size, _ in points]
    ys = [value for _, value in points]
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


async def run_issue12(reactor: Any, numbers: list[int], args: argparse.Namespace) -> bool:
    children = Children()
    _cleanups.append(children.close)
    ok = True
    targets: list[str] = []
    try:
        versions = versions_to_measure(args.before, children.directory, args.after)
        labels = [v.label for v in versions]
        for v in versions:
            print(f"  {v.label}: {v.describe}")
        sim_port = children.start_simulator(args.full_simulator)
        print(f"  simulator pid {children.sim_pid} on :{sim_port}", flush=True)
        scale = 0.25 if args.quick else 1.0
        pairs = args.pairs or (1 if args.quick else 3)

        if 4 in numbers:
            per_size: dict[int, dict[str, Measured]] = {}
            for size in args.sizes:
                case = Case(
                    4, concurrency=10, body_bytes=size, deltas=50, interval_ms=0,
                    requests=max(20, int(SIZE_REQUESTS.get(size, 200) * scale)), pairs=pairs,
                )
                print(f"\nCase 4, {size:,}-byte bodies: {case.describe()}", flush=True)
                per_size[size] = measured = await measure_versions(reactor, case, versions, children, sim_port)
                for line in versions_lines(measured, labels):
                    print(line, flush=True)
            print("\nCase 4 summary: proxy CPU ms per request (median of rounds) and RSS after a load minus idle")
            print("    " + f"{'body':>10s}" + "".join(f" {label + ' CPU':>11s} {label + ' +RSS':>11s}" for label in labels)
                  + ("   after/before CPU" if len(labels) == 2 else ""))
            for size, measured in per_size.items():
                row = f"    {size:>10,d}" + "".join(
                    f" {median(measured[l].cpu_ms()):11.3f} {measured[l].grown_mb():+10.1f}M" for l in labels
                )
                if len(labels) == 2:
                    row += f"   {_ratio(median(measured['after'].cpu_ms()), median(measured['before'].cpu_ms())):.2f}x"
                print(row)
            slopes = {l: growth_per_mb([(size, median(m[l].cpu_ms())) for size, m in per_size.items()]) for l in labels}
            print("    growth per MB of body (least squares): " + ", ".join(f"{l} {slopes[l]:.2f} ms" for l in labels))
            for size, measured in per_size.items():
                grown = measured["after"].grown_mb()
                targets.append(
                    f"after-a-load RSS within {TARGET_AFTER_LOAD_MB:.0f} MB of idle, {size:,}-byte bodies:"
                    f" {grown:+.1f} MB {verdict(grown <= TARGET_AFTER_LOAD_MB)}"
                )
            if "before" in labels:
                for size, measured in per_size.items():
                    ratio = _ratio(median(measured["after"].cpu_ms()), median(measured["before"].cpu_ms()))
                    if size >= 1_000_000:
                        targets.append(
                            f"CPU per request <= {TARGET_CPU_RATIO}x before, {size:,}-byte bodies: {ratio:.2f}x"
                            f" {verdict(ratio <= TARGET_CPU_RATIO)}"
                        )
                    elif size <= 10_000:
                        targets.append(
                            f"CPU per request no worse than before, {size:,}-byte bodies: {ratio:.2f}x"
                            f" {verdict(ratio <= 1.0)}"
                        )
            targets.append(
                f"CPU growth per MB of body <= {TARGET_GROWTH_MS_PER_MB:.0f} ms: {slopes['after']:.2f} ms"
                f" {verdict(slopes['after'] <= TARGET_GROWTH_MS_PER_MB)}"
            )

        if 5 in numbers:
            case = Case(
                5, concurrency=200, body_bytes=1_000_000, deltas=50, interval_ms=20, requests=200,
                sessions=4, pairs=max(1, min(pairs, 2)),
            )
            print(f"\nCase 5, many streams: {case.describe()}", flush=True)
            measured = await measure_versions(reactor, case, versions, children, sim_port)
            for line in versions_lines(measured, labels):
                print(line, flush=True)
            grown = measured["after"].grown_mb()
            targets.append(
                f"after-a-load RSS within {TARGET_AFTER_LOAD_MB:.0f} MB of idle, after 200 concurrent 1 MB streams:"
                f" {grown:+.1f} MB {verdict(grown <= TARGET_AFTER_LOAD_MB)}"
            )

        if 6 in numbers:
            streams = args.streams or 2000
            case = Case(
                6, concurrency=streams, body_bytes=4_000, deltas=100, interval_ms=100, requests=streams, pairs=1,
            )
            print(f"\nCase 6, slow streams: {case.describe()}", flush=True)
            # Clients start a millisecond apart, as a real crowd would: a
            # burst of 2000 connects overflows listen backlogs, and the
            # retransmitted SYNs would measure the kernel, not the proxy.
            measured = await measure_versions(reactor, case, versions, children, sim_port, spacing=0.001)
            for line in versions_lines(measured, labels):
                print(line, flush=True)
            for label in labels:
                samples = [s for r in measured[label].rounds for s in r.samples]
                total = totals(samples)
                print(
                    f"    {label:6s} stream time p50 {percentile(total, 50) / 1000:.2f} s,"
                    f" p99 {percentile(total, 99) / 1000:.2f} s (10 s when nothing is late)"
                )
            done, sent = measured["after"].complete()
            peak = measured["after"].peak_mb()
            targets.append(
                f"{streams} concurrent slow streams complete: {done}/{sent} {verdict(done == sent == streams)}"
            )
            targets.append(
                f"{streams} concurrent slow streams, peak RSS <= {TARGET_SLOW_RSS_MB:.0f} MB: {peak:.1f} MB"
                f" {verdict(peak <= TARGET_SLOW_RSS_MB)}"
            )

        if 7 in numbers:
            case = Case(
                7, concurrency=1, body_bytes=1_000_000, deltas=10, interval_ms=0,
                requests=max(20, int(100 * scale)), sessions=4, pairs=pairs,
            )
            print(f"\nCase 7, time to first byte: {case.describe()}", flush=True)
            measured = await measure_versions(reactor, case, versions, children, sim_port, direct=True)
            direct_ttfb = percentile(ttfbs([s for r in measured["direct"].rounds for s in r.samples]), 50)
            print(f"    direct TTFB p50 {direct_ttfb:.2f} ms")
            added: dict[str, float] = {}
            for label in labels:
                ttfb = percentile(ttfbs([s for r in measured[label].rounds for s in r.samples]), 50)
                added[label] = ttfb - direct_ttfb
                print(f"    {label:6s} TTFB p50 {ttfb:.2f} ms: {added[label]:+.2f} ms over direct")
            targets.append(
                f"added TTFB p50 <= {TARGET_TTFB_1MB_MS:.0f} ms over direct, one client, 1 MB body:"
                f" {added['after']:+.2f} ms {verdict(added['after'] <= TARGET_TTFB_1MB_MS)}"
            )
        print(f"\nTargets of issue 12 ({versions[-1].describe}):")
        for line in targets:
            print(f"  {line}")
        ok = not any(line.endswith("MISS") for line in targets)
        return ok
    finally:
        children.close()


_cleanups: list[Any] = []


def _clean_all() -> None:
    while _cleanups:
        try:
            _cleanups.pop()()
        except Exception:
            pass


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--case",
        default="issue12",
        choices=["1", "2", "3", "4", "5", "6", "7", "issue12", "all"],
        help="which case to run: 1-3 (issue 7), 4-7 (issue 12, before/after), issue12 (4-7, the default), all",
    )
    parser.add_argument(
        "--before",
        default=BEFORE_COMMIT,
        metavar="REV",
        help=f"cases 4-7: the commit whose proxy is measured beside the working tree's (default {BEFORE_COMMIT},"
        " the commit before issue 12's changes); 'none' measures the working tree alone",
    )
    parser.add_argument(
        "--after",
        metavar="REV",
        help="cases 4-7: measure this commit's proxy as 'after' instead of the working tree's",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=list(SIZES),
        help="case 4: body sizes in bytes, comma-separated (default 10000,200000,1000000,2000000)",
    )
    parser.add_argument("--quick", action="store_true", help="cases 4-7: a quarter of the requests, one pair of rounds")
    parser.add_argument("--requests", type=int, help="requests per round for cases 1 and 2 (default 2000)")
    parser.add_argument("--pairs", type=int, help="direct+proxied round pairs per case (default 2; 1 for case 3)")
    parser.add_argument("--concurrency", type=int, help="clients for cases 1 and 2 (default 20 and 50)")
    parser.add_argument(
        "--rate", type=float, help="requests/s of the paced phase of cases 1 and 2 (case 1: 100; 0 skips it)"
    )
    parser.add_argument("--paced-requests", type=int, help="requests per paced round (default 1000)")
    parser.add_argument("--streams", type=int, help="concurrent slow streams of case 3 (default 500) or 6 (default 2000)")
    parser.add_argument(
        "--profile", action="store_true", help="run the proxy under cProfile: case 1, or the case --case names"
    )
    parser.add_argument(
        "--body-bytes", type=int, metavar="N", help="body size in bytes for cases 1 and 2 (to profile one size)"
    )
    parser.add_argument("--profile-out", metavar="FILE", help="with --profile, keep the cProfile data here")
    parser.add_argument(
        "--full-simulator", action="store_true", help="do not memoise the simulator's parsing of repeated bodies"
    )
    parser.add_argument("--serve-simulator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--accounts", type=int, default=ACCOUNTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    if args.serve_simulator:
        serve_simulator(args.port, args.accounts, memoise=not args.full_simulator)
        return 0
    # 2000 streams through the proxy are 4000 sockets in one process; the
    # children inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as error:
            print(f"NOTE: could not raise the soft file-descriptor limit from {soft} to {wanted}: {error}")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    print(f"file-descriptor limit: soft {soft}, hard {'unlimited' if hard == resource.RLIM_INFINITY else hard}")
    if soft < 5000:
        print(f"NOTE: a soft limit of {soft} is too low for case 6 (2000 streams need about 4,100 in the proxy)")
    if args.profile and args.case in ("all", "issue12"):
        numbers = [1]
    elif args.case == "all":
        numbers = [1, 2, 3, 4, 5, 6, 7]
    elif args.case == "issue12":
        numbers = [4, 5, 6, 7]
    else:
        numbers = [int(args.case)]
    if args.before is not None and args.before.lower() == "none":
        args.before = None
    issue12 = [n for n in numbers if n >= 4]
    numbers = [n for n in numbers if n < 4]
    cases = []
    for number in numbers:
        case = CASES[number]
        changes: dict[str, Any] = {}
        if args.requests and number != 3:
            changes["requests"] = args.requests
        if args.concurrency and number != 3:
            changes["concurrency"] = args.concurrency
        if args.body_bytes and number != 3:
            changes["body_bytes"] = args.body_bytes
        if number == 3:
            changes["concurrency"] = changes["requests"] = args.streams or 500
        if args.pairs:
            changes["pairs"] = args.pairs
        if args.rate is not None and number != 3:
            changes["paced_rate"] = args.rate or None
            changes["paced_requests"] = args.paced_requests or case.paced_requests or case.requests
        elif args.paced_requests and case.paced_rate:
            changes["paced_requests"] = args.paced_requests
        cases.append(Case(**{**case.__dict__, **changes}))

    atexit.register(_clean_all)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    print(
        f"NextClaude proxy overhead, {os.cpu_count()} cores, Python {sys.version.split()[0]},"
        f" CPU tick {1000 / CLK_TCK:.0f} ms; client, simulator and proxy are separate processes"
    )
    outcome = {"ok": True}

    async def run(reactor: Any) -> None:
        for case in cases:
            outcome["ok"] &= await run_case(reactor, case, args, args.profile)
        if issue12:
            print(
                "\nIssue 12: cases " + ", ".join(map(str, issue12)) + (
                    f", the proxy of {args.before} ('before') beside"
                    f" {'that of ' + args.after if args.after else 'the working tree' + chr(39) + 's'} ('after')"
                    if args.before else ", the working tree's proxy alone"
                ),
                flush=True,
            )
            outcome["ok"] &= await run_issue12(reactor, issue12, args)

    from twisted.internet.task import react

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None):
            return int(exit.code) if isinstance(exit.code, int) else 1
    finally:
        _clean_all()
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
