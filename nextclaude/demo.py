"""
`nextclaude demo`: the real proxy service against the simulated upstream,
with simulated accounts whose quotas run out within a minute or two and
Claude-Code-shaped traffic (several sessions, growing context,
auto-compactions), all on free loopback ports in a temporary directory.
The user's own config, state and port are never touched.
"""

from __future__ import annotations

import argparse
import io
from contextlib import suppress
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater, react
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from nextclaude import __version__, events
from nextclaude.accounts import AccountsSettings
from nextclaude.config import load_config, new_config_data, parse_config
from nextclaude.console.palette import choose_theme
from nextclaude.events import Event
from nextclaude.humanize import tokens
from nextclaude.service import ProxyService
from nextclaude.simulate import SimAnswer, SimulatedAnthropic, listen_simulator, stop_simulator
from nextclaude.store import atomic_write
from nextclaude.usage import StreamParser
from nextclaude.workload import Driver, PlannedRequest, UpstreamSpec, Workload, WorkloadSpec


@dataclass(frozen=True)
class DemoSettings:
    accounts: int = 3
    sessions: int = 3
    duration: float = 90.0
    # Sized so that the traffic fills about two accounts within the
    # duration: the demo shows arming, landings and a switch without
    # running everything dry.
    five_hour_tokens: int = 60_000
    think_time: float = 1.5
    delta_interval: float = 0.02
    seed: int = 7

    def workload(self) -> WorkloadSpec:
        # Claude Code's shape at a tenth of the size, so compactions come
        # every few turns instead of every few hours.
        return WorkloadSpec(
            sessions=self.sessions,
            turns=10_000,
            prefix_tokens=3_000,
            tokens_per_turn=700,
            compact_above=9_000,
            summary_tokens=600,
            output_tokens=120,
            think_time=self.think_time,
            ttl="1h",
            seed=self.seed,
        )

    def upstream(self) -> UpstreamSpec:
        return UpstreamSpec(accounts=self.accounts, five_hour_tokens=self.five_hour_tokens)

    def driver_options(self, start: float) -> dict[str, Any]:
        return {
            "start": start,
            "horizon": self.duration,
            "base_latency": 0.1,
            "seconds_per_output_token": 0.002,
        }


@dataclass
class DemoSummary:
    requests: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    switches: list[tuple[str, str, str]] = field(default_factory=list)
    compactions: int = 0
    cache_read: int = 0
    cache_creation: int = 0


class _Printer:
    """
    Turns the proxy's events into the demo's log lines and tallies them.
    """

    def __init__(self, out: TextIO, summary: DemoSummary, started: float) -> None:
        self._out = out
        self._summary = summary
        self._started = started

    def _line(self, event: Event, text: str) -> None:
        print(f"{event.time - self._started:6.1f}s  {text}", file=self._out, flush=True)

    def __call__(self, event: Event) -> None:
        data = event.data
        summary = self._summary
        if event.kind == events.REQUEST_FINISHED:
            usage = data.get("usage") or {}
            summary.requests += 1
            status = data.get("status")
            if status == 200:
                summary.ok += 1
            elif status == 429:
                summary.rejected += 1
            else:
                summary.failed += 1
            read = usage.get("cache_read_input_tokens", 0)
            written = usage.get("cache_creation_input_tokens", 0)
            fresh = usage.get("input_tokens", 0)
            summary.cache_read += read
            summary.cache_creation += written
            total = read + written + fresh
            hit = f"{read / total:4.0%}" if total else "   -"
            self._line(
                event,
                f"{status}  {data.get('account') or '-':<6} hit {tokens(read):>6}  ✎ {tokens(written):>6}"
                f"  ↓{usage.get('output_tokens', 0):>4}  {hit}  {data.get('reason')}",
            )
        elif event.kind == events.SWITCHED:
            summary.switches.append((data["previous"], data["account"], data["reason"]))
            self._line(event, f"** session moved {data['previous']} -> {data['account']} ({data['reason']})")
        elif event.kind == events.ARMED:
            if data.get("status") == "draining":
                self._line(event, f"** {data['account']} draining: a session will move to {data['successor']} at its cheap moment")
            elif data.get("successor"):
                self._line(event, f"** {data['account']} armed: {data['successor']} takes new sessions")
            else:
                self._line(event, f"** {data['account']} armed, and no other account has room")
        elif event.kind == events.COMPACTION:
            summary.compactions += 1
            self._line(event, f"** compaction detected on {data.get('account')}")
        elif event.kind == events.EXHAUSTED:
            self._line(event, f"** {data['account']} is out of quota")
        elif event.kind == events.PROBE:
            self._line(event, f"** probing {data['account']}")


def write_demo_config(directory: Path, upstream: str, sim: SimulatedAnthropic) -> Path:
    """
    A config file for the simulated accounts in a private directory, with
    a fresh key; the user's own config is never read or written.
    """
    data = new_config_data()
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


async def _send(http: HTTPClient, url: str, key: str, request: PlannedRequest) -> SimAnswer:
    headers = dict(request.headers)
    # Claude Code in subscription mode: its own Bearer token, and the proxy
    # key in the custom header `nextclaude env` suggests.
    headers["authorization"] = "Bearer sk-ant-oat01-the-users-own-token"
    headers["x-nextclaude-key"] = key
    response = await http.post(url + request.path.decode(), data=request.body, headers=headers)
    body = await response.content()
    if response.code != 200:
        retry = response.headers.getRawHeaders(b"retry-after")
        return SimAnswer(
            status=response.code,
            headers={"retry-after": retry[-1].decode()} if retry else {},
            error=("error", "see the proxy's log"),
        )
    parser = StreamParser()
    parser.feed(body)
    parser.finish()
    return SimAnswer(status=200, headers={}, usage=parser.usage.to_json(), chunks=("(simulated reply)",))


async def run_demo(
    reactor: Any,
    settings: DemoSettings,
    out: TextIO,
    advance: Callable[[float], None] | None = None,
    console: bool = False,
    theme: str = "auto",
    interrupt: Deferred[object] | None = None,
) -> DemoSummary:
    """
    Run the whole demo once and return its figures.  Time passes for real,
    unless C{advance} is given: then the demo moves the reactor's (virtual)
    clock itself instead of waiting.  With C{console}, the live console
    shows the run instead of the event log, until the user quits it.
    """
    directory = Path(tempfile.mkdtemp(prefix="nextclaude-demo-"))
    directory.chmod(0o700)
    sim = settings.upstream().build(reactor)
    sim.delta_interval = settings.delta_interval
    sim_port = listen_simulator(reactor, sim)
    service: ProxyService | None = None
    pool = HTTPConnectionPool(reactor, persistent=True)
    summary = DemoSummary()
    try:
        config_path = write_demo_config(directory, f"http://127.0.0.1:{sim_port.getHost().port}", sim)
        config = load_config(config_path).with_overrides(port=0)
        service = ProxyService(reactor, config, account_settings=AccountsSettings.quiet(config))
        started = reactor.seconds()
        # Nothing may write to the terminal while the console owns it.
        service.hub.subscribe(_Printer(io.StringIO() if console else out, summary, started))
        service.startService()
        host, port = service.address()
        url = f"http://{host}:{port}"
        intro = intro_paragraphs(settings, url, console)
        if not console:
            # With the console the introduction opens inside the screen.
            print("\n".join(intro) + "\n", file=out, flush=True)
        driver = Driver(Workload(settings.workload()), **settings.driver_options(started))
        traffic = Deferred.fromCoroutine(
            _traffic(reactor, driver, HTTPClient(Agent(reactor, pool=pool)), url, config.proxy.api_key, advance)
        )
        interrupted: list[bool] = []

        def stop(_: object) -> None:
            # Ctrl-C or a hangup: the traffic stops, the summary of what ran
            # is printed, and the caller exits with the signal's status.
            interrupted.append(True)
            if not traffic.called:
                traffic.cancel()

        if interrupt is not None:
            interrupt.addCallback(stop)
        try:
            if console:
                await _watch(reactor, service, traffic, theme, intro)
            else:
                await traffic
        except Exception:
            # Cancelling surfaces as whatever the traffic was awaiting (a
            # CancelledError, or a request that never got its response).
            if not interrupted:
                raise
        # The usage history's figures are the writer's: wait for its last batch.
        await service.history.flushed()
        with suppress(OSError):
            # A hung-up terminal cannot be written to; cleaning up matters more.
            _print_summary(out, summary, service, settings, driver.result.turns_done, bool(interrupted))
        return summary
    finally:
        await pool.closeCachedConnections()
        if service is not None:
            await service.stopService()
        await stop_simulator(sim_port)
        shutil.rmtree(directory, ignore_errors=True)


async def _traffic(
    reactor: Any,
    driver: Driver,
    http: HTTPClient,
    url: str,
    key: str,
    advance: Callable[[float], None] | None,
) -> None:
    while (event := driver.next_event()) is not None:
        now, session, request = event
        if now > reactor.seconds():
            if advance is not None:
                advance(now - reactor.seconds())
            else:
                await deferLater(reactor, now - reactor.seconds())
        driver.deliver(now, session, request, await _send(http, url, key, request))


def intro_paragraphs(settings: DemoSettings, url: str, console: bool = True) -> list[str]:
    """
    What the demo shows, for someone new to prompt caching: printed before
    the event log (C{console} false), or opened inside the console's screen.
    """
    return [
        f"NextClaude {__version__} demo: {settings.accounts} simulated accounts with "
        f"{settings.five_hour_tokens:,} quota tokens each and {settings.sessions} Claude-Code-shaped "
        f"sessions for {settings.duration:g}s, on a simulated Anthropic API (proxy on {url}). "
        "No real account is used.",
        "Each request re-sends the whole conversation. The API caches it per account: a request on "
        "the account that saw the conversation before reads it from cache (hit, cheap); on another "
        "account it is written again (✎, a rebuild that burns quota).",
        "Watch new sessions stay on the warm account, sessions move when their account fills up "
        "right after a compaction (when the conversation is small, so moving is cheap), and the "
        "summary at the end prices what this run's moves re-billed against naive rotation.",
        "Press ? for a legend of every figure and word on screen, q to quit."
        if console
        else "Ctrl-C stops the traffic early; the summary is printed either way.",
    ]


def verdict(rebilled: int, naive: int) -> str:
    """
    The end of the demo's headline: what the run saved against naive
    rotation's estimate (tokens).  A short run may end before naive
    rotation would have had to move at all: then it says what the run
    cost more, never that a negative amount was saved.
    """
    saved = naive - rebilled
    return f"so about {saved:,} were saved" if saved >= 0 else f"so this run re-billed about {-saved:,} more"


async def _watch(
    reactor: Any,
    service: ProxyService,
    traffic: Deferred[None],
    theme: str = "auto",
    intro: list[str] | None = None,
) -> None:
    """
    The console on the demo's own proxy.  Quitting it (after it asks) ends
    the demo, traffic or not; once the traffic has ended, q quits at once.
    """
    from nextclaude import control, paths
    from nextclaude.console.app import run_console

    def stop_traffic() -> None:
        if not traffic.called:
            traffic.cancel()

    ended: Deferred[None] = Deferred()

    def traffic_ended(result: object) -> object:
        if not ended.called:
            ended.callback(None)
        return result

    traffic.addBoth(traffic_ended)
    client = await control.connect(reactor, paths.socket_path(service.config.path))
    try:
        await run_console(
            reactor,
            client,
            owns_proxy=True,
            stop_proxy=stop_traffic,
            theme=theme,
            app_options={
                "title": f"NextClaude {__version__} demo · simulated accounts",
                "intro": intro,
                "traffic_done": ended,
            },
        )
    finally:
        client.close()
        stop_traffic()
    await traffic.addErrback(lambda failure: failure.trap(CancelledError))


def _print_summary(
    out: TextIO,
    summary: DemoSummary,
    service: ProxyService,
    settings: DemoSettings,
    turns: int,
    interrupted: bool = False,
) -> None:
    now = service.reactor.seconds()
    # The headline: what this run's moves re-billed, from the usage
    # history's savings accounting of the requests the user watched, beside
    # its estimate of naive rotation on the same requests.
    today = service.history.snapshot(now)["today"]
    rebilled, naive = today["rebilled"], today["naiveEstimate"]
    print(
        ("\nInterrupted: the summary so far." if interrupted else "")
        + f"\nThis run: its moves re-billed {rebilled:,} cache tokens; naive rotation on the same requests "
        f"would have re-billed about {naive:,} (estimate), {verdict(rebilled, naive)}.",
        file=out,
    )
    print(
        f"Summary: {summary.requests} requests ({summary.ok} ok, {summary.rejected} rate-limited, "
        f"{summary.failed} failed), {turns} turns, {summary.compactions} compactions, "
        f"{len(summary.switches)} session move(s); cache read {summary.cache_read:,} tokens, "
        f"written {summary.cache_creation:,} tokens",
        file=out,
    )
    service.router.settle()
    for account in service.pool:
        marker = ">" if account.name == service.router.primary else " "
        print(
            f"{marker} {account.name}: {account.usage.requests} requests, "
            f"5h {account.utilization('5h', now):.0%} used, {service.router.status_of(account).value}",
            file=out,
        )
    print("`nextclaude usage` shows the same accounting for your own proxy.", file=out)


def main(args: argparse.Namespace) -> int:
    settings = DemoSettings(accounts=args.accounts, sessions=args.sessions, duration=args.duration)
    console = not args.no_console and sys.stdin.isatty() and sys.stdout.isatty()
    # The demo reads no configuration file: the flag, else NO_COLOR.
    theme = choose_theme(getattr(args, "theme", None), None, os.environ)
    for name in ("accounts", "sessions"):
        if getattr(settings, name) < 1:
            print(f"nextclaude demo: --{name} must be at least 1", file=sys.stderr)
            return 2
    if settings.duration <= 0:
        print("nextclaude demo: --duration must be positive", file=sys.stderr)
        return 2

    def start(reactor: Any) -> Deferred[None]:
        if console:
            from twisted.logger import globalLogBeginner

            from nextclaude.activity import LogRouter

            # Log lines have nowhere to go while the console owns the
            # terminal; the demo's own figures come after it.
            globalLogBeginner.beginLoggingTo([LogRouter(None)], redirectStandardIO=False)
        interrupt: Deferred[object] = Deferred()
        signals: list[int] = []
        running = Deferred.fromCoroutine(
            run_demo(reactor, settings, sys.stdout, console=console, theme=theme, interrupt=interrupt)
        )
        cleaned_up: Deferred[None] = Deferred()

        def interrupted() -> Deferred[None]:
            # Ctrl-C (or a hangup): the run stops its traffic and prints
            # what it has; the reactor waits for that and the cleanup
            # (ports, temporary directory) before it stops.
            if not interrupt.called:
                interrupt.callback(None)
            return cleaned_up

        trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted)

        def hung_up(signum: int, frame: object) -> None:
            # The terminal went away: stop like Ctrl-C, so the temporary
            # directory (a private config and keys) is removed.
            signals.append(signum)
            reactor.callFromThread(reactor.stop)

        def install() -> None:
            with suppress(ValueError, OSError):
                signal.signal(signal.SIGHUP, hung_up)

        reactor.callWhenRunning(install)

        def settle(result: object) -> object:
            if not cleaned_up.called:
                cleaned_up.callback(None)
            with suppress(ValueError):
                reactor.removeSystemEventTrigger(trigger)
            if interrupt.called and not isinstance(result, Failure):
                # The status says a signal ended it: 130 for Ctrl-C, 129
                # for a hangup.
                raise SystemExit(128 + (signals[-1] if signals else signal.SIGINT))
            return result

        return running.addBoth(settle)

    react(start)
    return 0
