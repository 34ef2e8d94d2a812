"""
The rebuild bill, end to end: the standard Claude-Code-shaped workload sent
over real loopback HTTP through the real proxy service to the simulated
upstream, for the real policy, plain arming without the forecast, and the
naive baseline.  Time is virtual (hours of traffic in seconds): the proxy
and the simulator share a clock the driver moves between requests.

    python benchmarks/rebuild_bill.py [--turns N] [--policy full] ...

Prints the parameters, then per policy: turns done, 429s the client saw,
total cache_creation, the excess over one unlimited account, stranded quota
and how many session moves it made.  It measures the checkout it sits in
(the repository root goes first on the import path), whatever is installed.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The checkout's nextclaude, never an installed copy: run as a script, the
# interpreter puts benchmarks/ first on the path, and an installed package
# (a normal `pip install .` in the virtualenv) would be measured instead.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, react
from twisted.web.client import Agent, HTTPConnectionPool

from nextclaude.accounts import AccountsSettings
from nextclaude.config import load_config
from nextclaude.events import EventHub
from nextclaude.pool import Thresholds
from nextclaude.replay import (
    POLICIES,
    PolicyReport,
    describe_parameters,
    parse_arguments,
    specs_from,
    stranded_quota,
)
from nextclaude.service import ProxyService
from nextclaude.simulate import SimAnswer, VirtualTimeReactor, listen_simulator, stop_simulator
from nextclaude.store import atomic_write
from nextclaude.usage import StreamParser, usage_from_json_body
from nextclaude.workload import Driver, UpstreamSpec, Workload, WorkloadSpec

PROXY_KEY = "nc-benchmark-key"


def _answer(status: int, headers: dict[str, str], body: bytes, streamed: bool) -> SimAnswer:
    """
    What the client saw, in the shape the workload driver takes.
    """
    if status != 200:
        return SimAnswer(status=status, headers=headers, error=("error", body[:200].decode("utf-8", "replace")))
    texts: list[str] = []
    if streamed:
        parser = StreamParser()
        parser.feed(body)
        parser.finish()
        usage = parser.usage.to_json()
        for line in body.split(b"\n"):
            if line.startswith(b"data: ") and b'"text_delta"' in line:
                texts.append(json.loads(line[6:])["delta"]["text"])
    else:
        parsed, _model, _error = usage_from_json_body(body)
        usage = parsed.to_json() if parsed is not None else {}
    return SimAnswer(status=status, headers=headers, usage=usage, chunks=tuple(texts))


async def run_policy(reactor: Any, policy: str, spec: WorkloadSpec, upstream: UpstreamSpec, floor: int) -> PolicyReport:
    clock = Clock()
    clock.advance(1_800_000_000)
    virtual = VirtualTimeReactor(reactor, clock)
    sim = upstream.build(virtual)
    sim_port = listen_simulator(virtual, sim)
    directory = Path(tempfile.mkdtemp(prefix="nextclaude-bench-"))
    config_path = directory / "config.json"
    atomic_write(
        config_path,
        json.dumps(
            {
                "proxy": {"port": 3456, "apiKey": PROXY_KEY},
                "upstream": f"http://127.0.0.1:{sim_port.getHost().port}",
                "accounts": [
                    {"name": a.name, "type": "oauth", "accessToken": a.credential} for a in sim.accounts
                ],
            }
        ).encode(),
    )
    hub = EventHub()
    moves = [0]
    hub.subscribe(lambda event: moves.__setitem__(0, moves[0] + (event.kind == "switched")))
    config = load_config(config_path).with_overrides(port=0)
    service = ProxyService(virtual, config, hub=hub, policy=policy, account_settings=AccountsSettings.quiet(config))
    service.startService()
    host, port = service.address()
    url = f"http://{host}:{port}"
    pool = HTTPConnectionPool(reactor, persistent=True)
    http = HTTPClient(Agent(reactor, pool=pool))
    driver = Driver(Workload(spec), start=clock.seconds())
    try:
        while (event := driver.next_event()) is not None:
            now, session, request = event
            if now > clock.seconds():
                clock.advance(now - clock.seconds())
            headers = dict(request.headers)
            # Claude Code in subscription mode: its own Bearer token, and the
            # proxy key in a custom header.
            headers["authorization"] = "Bearer sk-ant-oat01-the-users-own-token"
            headers["x-nextclaude-key"] = PROXY_KEY
            response = await http.post(url + request.path.decode(), data=request.body, headers=headers)
            body = await response.content()
            answer_headers = {
                name.decode().lower(): values[-1].decode() for name, values in response.headers.getAllRawHeaders()
            }
            driver.deliver(
                now,
                session,
                request,
                _answer(response.code, answer_headers, body, b'"stream":true' in request.body),
            )
        result = driver.result
        return PolicyReport(
            policy=policy,
            result=result,
            excess=result.cache_creation_tokens - floor,
            stranded=stranded_quota(sim, service.router, clock.seconds()),
            switches=moves[0],
        )
    finally:
        await pool.closeCachedConnections()
        await service.stopService()
        await stop_simulator(sim_port)
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


async def main(reactor: Any, argv: list[str]) -> None:
    arguments = parse_arguments(argv, __doc__.split("\n\n")[0])
    spec, upstream = specs_from(arguments)
    print(describe_parameters(spec, upstream, Thresholds()))
    print("end to end: real proxy service and simulator on loopback, virtual time")
    floor = Workload(spec).baseline_tokens(upstream).cache_creation_tokens
    print(f"one unlimited account: cache_creation {floor:,} (the floor)\n")
    for policy in arguments.policy or list(POLICIES):
        started = time.perf_counter()
        report = await run_policy(reactor, policy, spec, upstream, floor)
        print(f"{report.row()}  ({time.perf_counter() - started:.1f}s)", flush=True)


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
