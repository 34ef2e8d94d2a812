"""
The fast replay: a Claude-Code-shaped workload through the real router on a
virtual clock, answered by the simulator's pure answer function.  It prices
a routing policy in re-billed cache tokens in about a second, and is the
model the end-to-end benchmark (through the real proxy service) is checked
against.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from twisted.internet.task import Clock

from nextclaude.config import AccountConfig
from nextclaude.events import EventHub
from nextclaude.pool import Account, AccountPool, Thresholds
from nextclaude.quota import parse_rate_limit_headers
from nextclaude.router import ARMING, FULL, NAIVE, POLICIES, SEQUENTIAL, Router
from nextclaude.sessions import RequestFacts, inspect_request
from nextclaude.simulate import SimAnswer, SimulatedAnthropic
from nextclaude.usage import Usage
from nextclaude.workload import (
    STANDARD,
    STANDARD_UPSTREAM,
    PlannedRequest,
    RunResult,
    UpstreamSpec,
    Workload,
    WorkloadSpec,
    drive,
)

POLICY_NAMES = {FULL: "NextClaude", ARMING: "plain arming", NAIVE: "naive baseline", SEQUENTIAL: "sequential"}


@dataclass(frozen=True)
class PolicyReport:
    """
    One policy's bill on one workload.
    """

    policy: str
    result: RunResult
    excess: int
    stranded: int
    switches: int

    def row(self) -> str:
        return (
            f"{POLICY_NAMES.get(self.policy, self.policy):<22} turns {self.result.turns_done:>4}/{self.result.turns_planned:<4}"
            f" 429s {self.result.client_429s:>3}  cache_creation {self.result.cache_creation_tokens:>10,}"
            f"  excess {self.excess:>9,}  stranded {self.stranded:>9,}  session moves {self.switches:>3}"
        )


def account_configs(sim: SimulatedAnthropic, upstream: UpstreamSpec = STANDARD_UPSTREAM) -> list[AccountConfig]:
    """The simulator's accounts as the config names them, with the tier a mixed pool shows."""
    return [
        AccountConfig(name=account.name, type="oauth", access_token=account.credential, tier=upstream.tier(index))
        for index, account in enumerate(sim.accounts)
    ]


def stranded_quota(sim: SimulatedAnthropic, router: Router, now: float) -> int:
    """
    Quota left in running 5h windows of accounts no session is on any more:
    headroom that goes to waste when the window resets.
    """
    in_use = {session.account for session in router.sessions.sessions()}
    stranded = 0
    for account in sim.accounts:
        account.roll_windows(now)
        if account.window_5h_start is None or account.name in in_use:
            continue
        stranded += max(0, int(account.five_hour_tokens - account.used_5h))
    return stranded


class _SwitchCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, event: Any) -> None:
        if event.kind == "switched":
            self.count += 1


def _synthetic_429(retry_after: int | None) -> SimAnswer:
    return SimAnswer(
        status=429,
        headers={"retry-after": str(retry_after or 1)},
        usage=None,
        message=None,
        error=("rate_limit_error", "every account is out"),
    )


# (facts, account, usage, answer, time): one answer relayed to the client.
Served = Callable[[RequestFacts, Account, "Usage | None", SimAnswer, float], None]


def replay(
    policy: str,
    spec: WorkloadSpec = STANDARD,
    upstream: UpstreamSpec = STANDARD_UPSTREAM,
    thresholds: Thresholds = Thresholds(),
    baseline: RunResult | None = None,
    hub: EventHub | None = None,
    served: Served | None = None,
    **driver_options: Any,
) -> PolicyReport:
    """
    Run the workload through a real L{Router} with C{policy} and price it
    (C{driver_options} go to L{nextclaude.workload.Driver}).  The router
    emits on C{hub} when given (a caller subscribed to it sees every
    event, e.g. each session move), else on a private one.  C{served} is
    called with each answer relayed to the client, as the proxy's
    request-finished event would describe it.
    """
    clock = Clock()
    sim = upstream.build(clock)
    if hub is None:
        hub = EventHub()
    switches = _SwitchCounter()
    hub.subscribe(switches)
    pool = AccountPool(account_configs(sim, upstream), thresholds)
    router = Router(pool, clock.seconds, hub, policy=policy)

    def send(request: PlannedRequest, now: float) -> SimAnswer:
        if now > clock.seconds():
            clock.advance(now - clock.seconds())
        # What the scheduler's expiry timers would have done meanwhile.
        router.expire()
        session_header = request.headers.get("x-claude-code-session-id")
        agent_header = request.headers.get("x-claude-code-agent-id")
        facts = inspect_request(
            request.path,
            session_header.encode() if session_header else None,
            request.body,
            agent_header=agent_header.encode() if agent_header else None,
        )
        exchange = router.open(facts)
        try:
            while True:
                decision = router.route(exchange)
                account = decision.account
                if account is None:
                    return _synthetic_429(decision.retry_after)
                answer = sim.answer(
                    {**request.headers, **sim.account(account.name).credential_headers()},
                    request.data,
                    clock.seconds(),
                    path=request.path,
                )
                report = parse_rate_limit_headers(answer.headers, clock.seconds())
                verdict = router.on_response(exchange, account, answer.status, report)
                if verdict.serve:
                    usage = Usage.from_json(answer.usage) if answer.usage else None
                    router.on_finished(exchange, account, usage, answer.ok)
                    if served is not None:
                        served(facts, account, usage, answer, clock.seconds())
                    return answer
                if verdict.delay:
                    clock.advance(verdict.delay)
        finally:
            router.close(exchange)

    result = drive(Workload(spec), send, **driver_options)
    if baseline is None:
        baseline = Workload(spec).baseline_tokens(upstream, **driver_options)
    return PolicyReport(
        policy=policy,
        result=result,
        excess=result.cache_creation_tokens - baseline.cache_creation_tokens,
        stranded=stranded_quota(sim, router, clock.seconds()),
        switches=switches.count,
    )


def describe_parameters(spec: WorkloadSpec, upstream: UpstreamSpec, thresholds: Thresholds) -> str:
    return (
        f"workload: {spec.describe()}\n"
        f"upstream: {upstream.describe()}\n"
        f"thresholds: switch {thresholds.switch}, hard {thresholds.hard}"
    )


def parse_arguments(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sessions", type=int, default=STANDARD.sessions)
    parser.add_argument("--turns", type=int, default=STANDARD.turns)
    parser.add_argument("--seed", type=int, default=STANDARD.seed)
    parser.add_argument("--quota", type=int, default=STANDARD_UPSTREAM.five_hour_tokens, help="5h quota tokens per account")
    parser.add_argument("--accounts", type=int, default=STANDARD_UPSTREAM.accounts)
    parser.add_argument("--policy", choices=POLICIES, action="append", help="policies to run (default: all)")
    parser.add_argument("--family", action="store_true", help="run the workload family (issue 11) and print its table")
    parser.add_argument("--random", type=int, default=8, help="with --family: how many seeded random shapes")
    parser.add_argument("--random-seed", type=int, default=2026, help="with --family: the random shapes' seed")
    parser.add_argument("--jobs", type=int, default=2, help="with --family: worker processes")
    parser.add_argument("--only", help="with --family: only shapes whose name contains this")
    return parser.parse_args(argv)


def specs_from(arguments: argparse.Namespace) -> tuple[WorkloadSpec, UpstreamSpec]:
    spec = replace(STANDARD, sessions=arguments.sessions, turns=arguments.turns, seed=arguments.seed)
    upstream = replace(STANDARD_UPSTREAM, five_hour_tokens=arguments.quota, accounts=arguments.accounts)
    return spec, upstream


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv, "Replay a Claude-Code-shaped workload through the router on a virtual clock.")
    if arguments.family:
        from nextclaude.family import main as family

        return family(arguments.random, arguments.jobs, arguments.only, arguments.random_seed)
    spec, upstream = specs_from(arguments)
    thresholds = Thresholds()
    print(describe_parameters(spec, upstream, thresholds))
    baseline = Workload(spec).baseline_tokens(upstream)
    print(f"one unlimited account: cache_creation {baseline.cache_creation_tokens:,} (the floor)\n")
    for policy in arguments.policy or list(POLICIES):
        print(replay(policy, spec, upstream, thresholds, baseline).row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
