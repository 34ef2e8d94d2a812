"""
The Prometheus page, C{GET /nextclaude/metrics}: what an operator's
monitoring scrapes.

One custom collector per proxy, registered in a C{CollectorRegistry} of its
own, reads the pool, the router, the problems list and the usage history at
scrape time.  Nothing here is a module-level metric object: the library's
default registry is process-wide, and trial builds many proxies in one
process (so would anyone embedding the proxy twice).  The only state kept
between scrapes is the count of finished requests by account, status and
reason, which nothing else keeps; it lives in the service and is fed by
the event stream.

Names follow Prometheus conventions: C{_total} counters, C{_seconds} and
C{_timestamp_seconds} times, utilizations as fractions 0-1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.application.service import Service
from twisted.logger import Logger

from nextclaude import __version__, events
from nextclaude.events import Event, EventHub
from nextclaude.pool import Status

# Every status is listed for every account (1 for the current one, 0 for
# the rest), so an alert on "exhausted == 1" needs no absent() dance.
STATUSES = tuple(status.value for status in Status)
# The token kinds of a usage object, as the label names them.
TOKEN_KINDS = ("input", "output", "cache_read", "cache_creation")
# Label value for a request no account served (a synthetic 429, a 401
# before routing): Prometheus labels cannot be null.
NO_ACCOUNT = ""


@dataclass
class Sources:
    """
    Where the collector reads from; each a live object of the running proxy
    (only C{router} is required, so tests can build a collector on a bare
    pool).
    """

    router: Any  # nextclaude.router.Router
    clock: Callable[[], float]
    started: float = 0.0
    in_flight: Callable[[], int] = lambda: 0
    problems: Any = None  # nextclaude.problems.Problems
    history: Any = None  # nextclaude.history.HistoryService
    notifier: Any = None  # nextclaude.notify.NotifyService


class RequestCounts:
    """
    Finished requests by (account, status, reason), counted from the event
    stream: the one figure no other part of the proxy keeps.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}

    def on_event(self, event: Event) -> None:
        if event.kind != events.REQUEST_FINISHED:
            return
        data = event.data
        key = (
            str(data.get("account") or NO_ACCOUNT),
            str(data.get("status") if data.get("status") is not None else ""),
            str(data.get("reason") or ""),
        )
        self.counts[key] = self.counts.get(key, 0) + 1


class ProxyCollector(Collector):
    """
    Builds every metric family from the proxy's live objects at each scrape.
    """

    def __init__(self, sources: Sources, requests: RequestCounts) -> None:
        self._sources = sources
        self._requests = requests

    def describe(self) -> Iterable[Metric]:
        # Nothing to describe up front: registering must not scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        sources = self._sources
        router = sources.router
        router.settle()
        pool = router.pool
        now = sources.clock()

        build = InfoMetricFamily("nextclaude_build", "The running NextClaude's version.")
        build.add_metric([], {"version": __version__})
        yield build
        yield GaugeMetricFamily(
            "nextclaude_start_time_seconds", "When this proxy started (Unix time).", value=sources.started
        )

        requests = CounterMetricFamily(
            "nextclaude_requests",
            "Finished requests since the proxy started, by serving account (empty: none), "
            "HTTP status and routing reason.",
            labels=["account", "status", "reason"],
        )
        for (account, status, reason), count in sorted(self._requests.counts.items()):
            requests.add_metric([account, status, reason], count)
        yield requests

        tokens = CounterMetricFamily(
            "nextclaude_tokens",
            "Tokens served per account and kind, as the upstream reported them (kept across restarts).",
            labels=["account", "kind"],
        )
        rebuilds = CounterMetricFamily(
            "nextclaude_cold_rebuilds", "Requests whose cache creation exceeded their cache reads and 1,000 tokens.",
            labels=["account"],
        )
        status = GaugeMetricFamily(
            "nextclaude_account_status", "1 for the account's current status, 0 for the others.",
            labels=["account", "status"],
        )
        enabled = GaugeMetricFamily(
            "nextclaude_account_enabled", "1 unless the account was disabled (nextclaude disable).", labels=["account"]
        )
        priority = GaugeMetricFamily(
            "nextclaude_account_priority", "The account's priority (lower is used first).", labels=["account"]
        )
        utilization = GaugeMetricFamily(
            "nextclaude_window_utilization",
            "Utilization of each live quota window (0-1; may exceed 1), from the upstream's headers.",
            labels=["account", "window"],
        )
        resets = GaugeMetricFamily(
            "nextclaude_window_reset_timestamp_seconds",
            "When each live quota window resets (Unix time).",
            labels=["account", "window"],
        )
        for account in pool:
            name = account.name
            used = account.usage.tokens
            for kind, value in zip(
                TOKEN_KINDS,
                (
                    used.input_tokens,
                    used.output_tokens,
                    used.cache_read_input_tokens,
                    used.cache_creation_input_tokens,
                ),
            ):
                tokens.add_metric([name, kind], value)
            rebuilds.add_metric([name], account.usage.cold_rebuilds)
            current = router.status_of(account).value
            for value in STATUSES:
                status.add_metric([name, value], 1.0 if value == current else 0.0)
            enabled.add_metric([name], 1.0 if account.config.enabled else 0.0)
            priority.add_metric([name], account.priority)
            for window, quota in sorted(account.live_windows(now).items()):
                if quota.utilization is not None:
                    utilization.add_metric([name, window], quota.utilization)
                if quota.reset is not None:
                    resets.add_metric([name, window], quota.reset)
        yield from (tokens, rebuilds, status, enabled, priority, utilization, resets)

        yield GaugeMetricFamily(
            "nextclaude_sessions_tracked", "Conversations the proxy keeps on an account (affinity).",
            value=router.tracked_sessions(),
        )
        yield GaugeMetricFamily(
            "nextclaude_streams_in_flight", "Requests being relayed right now (streams included).",
            value=sources.in_flight(),
        )

        yield from self._problems()
        yield from self._history(now)
        yield from self._notifications()

    def _problems(self) -> Iterator[Metric]:
        problems = self._sources.problems
        listed = problems.snapshot() if problems is not None else []
        yield GaugeMetricFamily(
            "nextclaude_problems", "Unresolved problems (nextclaude status lists them).", value=len(listed)
        )
        each = GaugeMetricFamily(
            "nextclaude_problem", "1 per unresolved problem, by kind and account (empty: the proxy).",
            labels=["kind", "account"],
        )
        for problem in listed:
            each.add_metric([str(problem["kind"]), str(problem["account"] or "")], 1.0)
        yield each

    def _history(self, now: float) -> Iterator[Metric]:
        history = self._sources.history
        if history is None:
            return
        recorded = history.recorded
        yield CounterMetricFamily(
            "nextclaude_rebilled_tokens",
            "Cache tokens re-billed because a conversation moved, recorded since the proxy started.",
            value=recorded.rebilled,
        )
        yield CounterMetricFamily(
            "nextclaude_naive_rebilled_tokens",
            "Estimate: what naive rotation would have re-billed on the same requests, since the proxy started.",
            value=recorded.naive,
        )
        yield CounterMetricFamily(
            "nextclaude_moves", "Conversation moves recorded since the proxy started.", value=recorded.moves
        )
        yield GaugeMetricFamily(
            "nextclaude_saved_tokens",
            "Naive estimate minus re-billed, since the proxy started (an estimate; may be negative).",
            value=recorded.naive - recorded.rebilled,
        )
        # The history's own periods (local days), as status shows them.
        summary = history.summary.snapshot(now)
        rebilled = GaugeMetricFamily(
            "nextclaude_history_rebilled_tokens", "Re-billed tokens in the history, by period (local days).",
            labels=["period"],
        )
        saved = GaugeMetricFamily(
            "nextclaude_history_saved_tokens", "Saved tokens (estimate) in the history, by period (local days).",
            labels=["period"],
        )
        for period in ("today", "week"):
            rebilled.add_metric([period], summary[period]["rebilled"])
            saved.add_metric([period], summary[period]["saved"])
        yield rebilled
        yield saved
        yield CounterMetricFamily(
            "nextclaude_history_dropped",
            "Finished requests the history could not record (queue full or write failed).",
            value=history.dropped + history.lost,
        )

    def _notifications(self) -> Iterator[Metric]:
        notifier = self._sources.notifier
        if notifier is None:
            return
        sent = CounterMetricFamily(
            "nextclaude_notifications", "Webhook notifications by event and outcome (sent, failed, dropped).",
            labels=["event", "outcome"],
        )
        for (event, outcome), count in sorted(notifier.counts.items()):
            sent.add_metric([event, outcome], count)
        yield sent


class MetricsService(Service):
    """
    Owns the registry and the request counts; listens to the event stream
    between C{startService} and C{stopService}.
    """

    name = "metrics"
    _log = Logger()

    def __init__(self, hub: EventHub, sources: Sources) -> None:
        self._hub = hub
        self.requests = RequestCounts()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(sources, self.requests))
        self._unsubscribe: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self._hub.subscribe(self.requests.on_event)

    def stopService(self) -> None:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def render(self) -> tuple[bytes, str]:
        """
        The page and its content type (Prometheus text format 0.0.4).
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
