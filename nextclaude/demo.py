"""
`nextclaude demo`: the real proxy service against the simulated upstream,
with simulated accounts and a few scripted conversations, all on free
loopback ports in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool

from nextclaude import __version__, events
from nextclaude.config import load_config, new_config_data, parse_config
from nextclaude.events import Event
from nextclaude.service import ProxyService
from nextclaude.simulate import SimulatedAnthropic, listen_simulator, simulated_accounts, stop_simulator
from nextclaude.store import atomic_write

MODEL = "claude-sonnet-4-5-20250929"

# A system prompt about the size of Claude Code's (a few thousand tokens),
# shared by every conversation, as Claude Code's is.
SYSTEM_PROMPT = (
    "You are a careful software engineer working in a terminal. "
    + " ".join(f"Rule {n}: read the code before changing it, and test what you change." for n in range(1, 180))
)


@dataclass(frozen=True)
class DemoSettings:
    accounts: int = 3
    sessions: int = 3
    turns: int = 12
    # Sized so that the scripted traffic fills about two accounts: the
    # demo shows a switch without running everything dry.
    five_hour_tokens: int = 40_000
    delta_interval: float = 0.02


@dataclass
class DemoSummary:
    requests: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    switches: list[tuple[str, str, str]] = field(default_factory=list)
    cache_read: int = 0
    cache_creation: int = 0


def _user_turn(session: int, turn: int) -> str:
    return f"[session {session}, turn {turn}] " + " ".join(
        f"Please look at module {turn}.{n} and explain what it does." for n in range(40)
    )


class _Printer:
    """
    Turns the proxy's events into the demo's log lines.
    """

    def __init__(self, out: TextIO, summary: DemoSummary, started: float) -> None:
        self._out = out
        self._summary = summary
        self._started = started

    def __call__(self, event: Event) -> None:
        at = f"{event.time - self._started:6.2f}s"
        data = event.data
        if event.kind == events.REQUEST_FINISHED:
            usage = data.get("usage") or {}
            self._summary.requests += 1
            status = data.get("status")
            if status == 200:
                self._summary.ok += 1
            elif status == 429:
                self._summary.rejected += 1
            else:
                self._summary.failed += 1
            self._summary.cache_read += usage.get("cache_read_input_tokens", 0)
            self._summary.cache_creation += usage.get("cache_creation_input_tokens", 0)
            print(
                f"{at}  {status}  {data.get('account') or '-':<6} {data.get('reason'):<10}"
                f" hit {usage.get('cache_read_input_tokens', 0):>6}"
                f"  miss {usage.get('input_tokens', 0) + usage.get('cache_creation_input_tokens', 0):>6}"
                f"  out {usage.get('output_tokens', 0):>4}",
                file=self._out,
            )
        elif event.kind == events.SWITCHED:
            self._summary.switches.append((data["previous"], data["account"], data["reason"]))
            print(
                f"{at}  ** switched {data['previous']} -> {data['account']} ({data['reason']})",
                file=self._out,
            )
        elif event.kind == events.EXHAUSTED:
            print(f"{at}  ** {data['account']} is out of quota", file=self._out)


def write_demo_config(directory: Path, upstream: str, sim: SimulatedAnthropic) -> Path:
    """
    A config file for the simulated accounts in a private directory, with
    a fresh key; the user's own config is never read or written.
    """
    data = new_config_data()
    data["proxy"]["port"] = 3456
    data["upstream"] = upstream
    data["accounts"] = [
        {"name": account.name, "type": "oauth", "accessToken": account.credential, "tier": "Max"}
        for account in sim.accounts
    ]
    path = directory / "config.json"
    # Parsing first: a demo that wrote a file it cannot read should say so.
    parse_config(data, path)
    atomic_write(path, json.dumps(data, indent=2).encode())
    return path


async def _conversation(
    http: HTTPClient, url: str, key: str, number: int, turns: int
) -> None:
    session_id = f"demo-session-{number}-{secrets.token_hex(4)}"
    messages: list[dict[str, Any]] = []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": _user_turn(number, turn)})
        body = {
            "model": MODEL,
            "max_tokens": 1024,
            "stream": True,
            "system": [
                {"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
            ],
            "messages": messages,
        }
        response = await http.post(
            url + "/v1/messages?beta=true",
            data=json.dumps(body).encode(),
            headers={
                "x-api-key": key,
                "content-type": "application/json",
                "anthropic-version": "2023-06-01",
                "x-claude-code-session-id": session_id,
            },
        )
        content = await response.content()
        if response.code != 200:
            # Every account is out: a real client would wait retry-after;
            # the demo's conversation simply ends here.
            return
        messages.append({"role": "assistant", "content": _reply_text(content)})


def _reply_text(stream: bytes) -> str:
    texts: list[str] = []
    for block in stream.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and b'"text_delta"' in line:
                texts.append(json.loads(line[6:])["delta"]["text"])
    return "".join(texts) or "(no text)"


async def run_demo(reactor: Any, settings: DemoSettings, out: TextIO) -> DemoSummary:
    """
    Run the whole demo once and return its figures.
    """
    directory = Path(tempfile.mkdtemp(prefix="nextclaude-demo-"))
    directory.chmod(0o700)
    sim = SimulatedAnthropic(
        reactor,
        simulated_accounts(settings.accounts, five_hour_tokens=settings.five_hour_tokens),
        delta_interval=settings.delta_interval,
    )
    sim_port = listen_simulator(reactor, sim)
    service: ProxyService | None = None
    pool = HTTPConnectionPool(reactor, persistent=True)
    summary = DemoSummary()
    try:
        config_path = write_demo_config(directory, f"http://127.0.0.1:{sim_port.getHost().port}", sim)
        config = load_config(config_path).with_overrides(port=0)
        service = ProxyService(reactor, config)
        service.hub.subscribe(_Printer(out, summary, reactor.seconds()))
        service.startService()
        host, port = service.address()
        url = f"http://{host}:{port}"
        print(
            f"NextClaude {__version__} demo: {settings.accounts} simulated accounts "
            f"({settings.five_hour_tokens:,} quota tokens each per 5 h), "
            f"{settings.sessions} conversations of {settings.turns} turns, proxy on {url}\n",
            file=out,
        )
        http = HTTPClient(Agent(reactor, pool=pool))
        await gatherResults(
            [
                Deferred.fromCoroutine(_conversation(http, url, config.proxy.api_key, n, settings.turns))
                for n in range(1, settings.sessions + 1)
            ],
            consumeErrors=True,
        )
        _print_summary(out, summary, service, sim)
        return summary
    finally:
        await pool.closeCachedConnections()
        if service is not None:
            await service.stopService()
        await stop_simulator(sim_port)
        shutil.rmtree(directory, ignore_errors=True)


def _print_summary(out: TextIO, summary: DemoSummary, service: ProxyService, sim: SimulatedAnthropic) -> None:
    print(
        f"\nSummary: {summary.requests} requests ({summary.ok} ok, {summary.rejected} rate-limited, "
        f"{summary.failed} failed), {len(summary.switches)} switch(es); "
        f"cache read {summary.cache_read:,} tokens, written {summary.cache_creation:,} tokens",
        file=out,
    )
    now = service.reactor.seconds()
    for account in service.pool:
        used = account.utilization("5h", now)
        marker = ">" if account.name == service.router.primary else " "
        print(
            f"{marker} {account.name}: {account.usage.requests} requests, 5h {used:.0%} used, "
            f"status {service.router.status_of(account).value}",
            file=out,
        )


def main(args: argparse.Namespace) -> int:
    settings = DemoSettings(accounts=args.accounts, sessions=args.sessions, turns=args.turns)
    for name in ("accounts", "sessions", "turns"):
        if getattr(settings, name) < 1:
            print(f"nextclaude demo: --{name} must be at least 1", file=sys.stderr)
            return 2

    async def demo(reactor: Any) -> None:
        await run_demo(reactor, settings, sys.stdout)

    react(lambda reactor: Deferred.fromCoroutine(demo(reactor)))
    return 0

