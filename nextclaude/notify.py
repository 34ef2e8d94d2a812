"""
Notifications: a small JSON event POSTed to the operator's webhook
(C{notify.webhookUrl}) when an account breaks, runs out, or comes back.

Events (C{notify.events}; default all but C{switched}):

  - C{account-error}: an account's credential is dead (with the fix).
  - C{exhausted}: an account reached its ceiling (with its reset).
  - C{all-exhausted}: nothing can serve any more (every account out of
    quota, throttled, dead or disabled); sent once until something can
    serve again.
  - C{recovered}: an exhausted or throttled account can serve again.
  - C{switched}: conversations moved between accounts; routine, so
    coalesced into one event per minute.

Delivery never touches a request: the event-stream listener only queues,
and the POST runs on a later turn of the reactor, with a timeout per
attempt and a few retries; at most L{MAX_PENDING} deliveries are under way,
further events are dropped and counted.  No credential is ever in a
payload: payloads are built from a few named fields, and every secret the
proxy knows (account tokens and keys, the proxy key) is cut out of the
body before it is sent.  The URL is a secret too (chat webhooks carry
their token in it): logs, the status snapshot and the problems list show
only its scheme and host (L{safe_url}).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from nextclaude import __version__, events
from nextclaude.config import NotifySettings
from nextclaude.events import Event, EventHub
from nextclaude.pool import ACCOUNT_WIDE

ACCOUNT_ERROR = "account-error"
EXHAUSTED = "exhausted"
ALL_EXHAUSTED = "all-exhausted"
RECOVERED = "recovered"
SWITCHED = "switched"

#: Seconds one POST (connect, send, response, body) may take.
TIMEOUT = 10.0
#: Seconds to wait before each retry: three attempts in all.
RETRY_DELAYS = (5.0, 30.0)
#: Switches are gathered this long into one event.
COALESCE = 60.0
#: Deliveries under way (or waiting to retry) at most; more are dropped.
MAX_PENDING = 16
#: The problems-list kind for a webhook that cannot be reached.
NOTIFY_PROBLEM = "notify"

# Routing reasons after which nothing could serve the request.
_NOTHING_SERVED = frozenset({"exhausted", "no-credentials"})
# Token shapes cut out of any text, whatever the proxy knows of them.
_TOKEN_RE = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")


def safe_url(url: str | None) -> str | None:
    """
    What may be shown of a webhook URL: its scheme, host and port, never
    its path, query or user info (where chat webhooks keep their tokens).
    """
    if not url:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = parts.port
    except ValueError:
        return "(malformed URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def describe_failure(failure: Failure) -> str:
    """
    A failed delivery in words that cannot carry the URL: the exception's
    kind, not its text.
    """
    if failure.check(DeferredTimeout, CancelledError):
        return "no answer in time"
    if failure.check(net_error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(net_error.DNSLookupError):
        return "host not found"
    if failure.check(net_error.TimeoutError):
        return "connection timed out"
    if failure.check(net_error.ConnectError):
        return "cannot connect"
    if failure.check(_HTTPStatus):
        return str(failure.value)
    return f"failed ({failure.type.__name__})"


class _HTTPStatus(Exception):
    """The receiver answered with a status that is not a success."""

    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP {code}")
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.code >= 500 or self.code in (408, 429)


def _timed_out(result: object, timeout: float) -> Failure:
    # Whatever the cancelled request failed with (ResponseNeverReceived,
    # a connect error), it is the timeout that ended it.
    return Failure(DeferredTimeout(f"no answer within {timeout:g} s"))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


class NotifyService(Service):
    """
    Listens to the event stream between C{startService} and
    C{stopService} and POSTs the chosen events to the webhook.  C{client}
    is a treq C{HTTPClient} (a test's C{StubTreq}); without one, the
    service makes its own on start, with a connection pool it closes on stop.
    """

    name = "notify"
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        hub: EventHub,
        settings: NotifySettings,
        router: Any,  # nextclaude.router.Router: the pool, statuses
        *,
        client: Any = None,
        secrets: Callable[[], Iterable[str | None]] = lambda: (),
        problems: Any = None,  # nextclaude.problems.Problems
        timeout: float = TIMEOUT,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        coalesce: float = COALESCE,
        max_pending: int = MAX_PENDING,
        clock: Any = None,
    ) -> None:
        self._reactor = reactor
        # Timeouts, retries and coalescing run on this clock (a test's
        # task.Clock); connections on the reactor.
        self._clock = clock if clock is not None else reactor
        self._hub = hub
        self.settings = settings
        self._router = router
        self._client = client
        self._own_pool: Any = None
        self._secrets = secrets
        self._problems = problems
        self.timeout = timeout
        self.retry_delays = retry_delays
        self.coalesce = coalesce
        self.max_pending = max_pending
        self.chosen = frozenset(settings.chosen)
        self.target = safe_url(settings.webhook_url)
        #: (event, outcome) -> count; outcomes: sent, failed, dropped.
        self.counts: dict[tuple[str, str], int] = {}
        self.last_error: str | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._pending: set[Deferred[None]] = set()
        self._switches: list[tuple[str | None, str | None, str | None]] = []
        self._switch_timer: IDelayedCall | None = None
        self._check_timer: IDelayedCall | None = None
        # Whether nothing could serve when last looked at.
        self._all_out = False

    # -- life cycle ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if not self.settings.webhook_url:
            return
        if self._client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            # Its own pool, not the upstream's: a hanging receiver must
            # never hold a connection the proxy needs.  Not persistent:
            # events are rare.
            self._own_pool = HTTPConnectionPool(self._reactor, persistent=False)
            self._client = HTTPClient(Agent(self._reactor, connectTimeout=self.timeout, pool=self._own_pool))
        self._unsubscribe = self._hub.subscribe(self._on_event)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for timer in (self._switch_timer, self._check_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._switch_timer = self._check_timer = None
        self._switches = []
        # A stop must not wait for a receiver that hangs.
        for delivery in list(self._pending):
            delivery.cancel()
        pool, self._own_pool = self._own_pool, None
        if pool is not None:
            self._client = None
            return pool.closeCachedConnections()
        return None

    # -- what the status snapshot shows --------------------------------------------------

    def snapshot(self) -> dict[str, Any] | None:
        """
        The status snapshot's C{notify} field; None without a webhook.
        """
        if not self.settings.webhook_url:
            return None
        return {
            "webhook": self.target,
            "events": sorted(self.chosen),
            "sent": sum(n for (_, outcome), n in self.counts.items() if outcome == "sent"),
            "failed": sum(n for (_, outcome), n in self.counts.items() if outcome == "failed"),
            "dropped": sum(n for (_, outcome), n in self.counts.items() if outcome == "dropped"),
            "pending": len(self._pending),
            "lastError": self.last_error,
        }

    # -- the listener: nothing here may wait -------------------------------------------------

    def _on_event(self, event: Event) -> None:
        kind, data = event.kind, event.data
        if kind == events.REQUEST_FINISHED:
            if data.get("reason") in _NOTHING_SERVED or (self._all_out and data.get("ok") and data.get("account")):
                self._schedule_check()
            return
        if kind == events.ACCOUNT_ERROR:
            account = data.get("account")
            self.send(
                ACCOUNT_ERROR,
                event.time,
                f"NextClaude: account {account} cannot serve: {data.get('message') or 'credential rejected'}",
                account=account,
                message=str(data.get("message") or ""),
            )
            self._schedule_check()
        elif kind == events.EXHAUSTED:
            account, reset = data.get("account"), data.get("reset")
            self.send(
                EXHAUSTED,
                event.time,
                f"NextClaude: account {account} is out of quota until {_when(reset)}",
                account=account,
                reset=reset,
            )
            self._schedule_check()
        elif kind == events.THROTTLED:
            self._schedule_check()
        elif kind == events.RECOVERED:
            account = data.get("account")
            self.send(RECOVERED, event.time, f"NextClaude: account {account} can serve again", account=account)
            self._schedule_check()
        elif kind == events.SWITCHED and SWITCHED in self.chosen:
            self._switches.append((data.get("previous"), data.get("account"), data.get("reason")))
            if self._switch_timer is None:
                self._switch_timer = self._clock.callLater(self.coalesce, self._flush_switches)

    def _schedule_check(self) -> None:
        # Looked at on the next turn: the emitter may be mid-update.
        if self._check_timer is None and self.running:
            self._check_timer = self._clock.callLater(0, self._check_all)

    def _check_all(self) -> None:
        self._check_timer = None
        router = self._router
        pool = router.pool
        now = self._clock.seconds()
        serving = any(pool.serviceable(account, now, ACCOUNT_WIDE) for account in pool)
        if serving:
            self._all_out = False
            return
        if self._all_out:
            return
        self._all_out = True
        accounts = [{"account": account.name, "status": router.status_of(account).value} for account in pool]
        resets = [r for account in pool if (r := account.soonest_reset(now)) is not None]
        soonest = min(resets, default=None)
        listed = ", ".join(f"{a['account']} ({a['status']})" for a in accounts) or "no accounts"
        self.send(
            ALL_EXHAUSTED,
            now,
            f"NextClaude: no account can serve: {listed}; the soonest reset is at {_when(soonest)}",
            accounts=accounts,
            reset=soonest,
        )

    def _flush_switches(self) -> None:
        self._switch_timer = None
        switches, self._switches = self._switches, []
        if not switches:
            return
        moves: dict[tuple[str | None, str | None], int] = {}
        reasons: dict[str, int] = {}
        for previous, account, reason in switches:
            moves[(previous, account)] = moves.get((previous, account), 0) + 1
            if reason:
                reasons[reason] = reasons.get(reason, 0) + 1
        described = ", ".join(f"{a} → {b} ×{n}" for (a, b), n in moves.items())
        self.send(
            SWITCHED,
            self._clock.seconds(),
            f"NextClaude: {len(switches)} conversation move(s) in the last {self.coalesce:g} s: {described}",
            count=len(switches),
            moves=[{"from": a, "to": b, "count": n} for (a, b), n in moves.items()],
            reasons=reasons,
            period=self.coalesce,
        )

    # -- delivery -----------------------------------------------------------------------------

    def _count(self, event: str, outcome: str) -> None:
        self.counts[(event, outcome)] = self.counts.get((event, outcome), 0) + 1

    def payload(self, event: str, when: float, text: str, **fields: Any) -> bytes:
        """
        The JSON body of one event, with every known secret cut out.
        C{text} is a one-line summary (chat webhooks show a C{text} field).
        """
        body = {"source": "nextclaude", "version": __version__, "event": event, "time": when, "text": text}
        body.update(fields)
        encoded = json.dumps(body, ensure_ascii=False)
        for secret in self._secrets():
            # Short values would cut innocent words; real secrets are long.
            if secret and len(secret) >= 8:
                encoded = encoded.replace(secret, "(redacted)")
        encoded = _TOKEN_RE.sub("sk-ant-…(redacted)", encoded)
        return encoded.encode("utf-8")

    def send(self, event: str, when: float, text: str, **fields: Any) -> bool:
        """
        Queue one event for delivery if it is chosen; False if it was not
        (not chosen, no webhook, stopped, or too many under way).
        """
        if event not in self.chosen or self._client is None or not self.running:
            return False
        if len(self._pending) >= self.max_pending:
            self._count(event, "dropped")
            self._log.warn(
                "notification {event} to {target} dropped: {count} deliveries are under way",
                event=event,
                target=self.target,
                count=len(self._pending),
            )
            return False
        body = self.payload(event, when, text, **fields)
        delivery = Deferred.fromCoroutine(self._deliver(event, body))
        self._pending.add(delivery)

        def done(result: object) -> None:
            self._pending.discard(delivery)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self._log.failure("notification {event} failed unexpectedly", result, event=event)

        delivery.addBoth(done)
        return True

    async def _deliver(self, event: str, body: bytes) -> None:
        # Started on a later turn: the emitter (a request being routed)
        # never waits for a connection attempt.
        await deferLater(self._clock, 0, lambda: None)
        attempts = len(self.retry_delays) + 1
        for attempt in range(attempts):
            try:
                attempted = Deferred.fromCoroutine(self._post(body))
                await attempted.addTimeout(self.timeout, self._clock, onTimeoutCancel=_timed_out)
            except CancelledError:
                raise  # the service is stopping
            except Exception:
                if not self.running:
                    raise CancelledError() from None  # stopped mid-attempt
                failure = Failure()
                problem = describe_failure(failure)
                retry = not (failure.check(_HTTPStatus) and not failure.value.retryable)
                if retry and attempt + 1 < attempts:
                    delay = self.retry_delays[attempt]
                    self._log.info(
                        "notification {event} to {target}: {problem}; retrying in {delay:g}s",
                        event=event,
                        target=self.target,
                        problem=problem,
                        delay=delay,
                    )
                    await deferLater(self._clock, delay, lambda: None)
                    continue
                self._count(event, "failed")
                self.last_error = f"{event} to {self.target}: {problem}"
                self._log.warn(
                    "notification {event} to {target} failed after {attempts} attempt(s): {problem}",
                    event=event,
                    target=self.target,
                    attempts=attempt + 1,
                    problem=problem,
                )
                if self._problems is not None:
                    self._problems.raise_problem(
                        None,
                        NOTIFY_PROBLEM,
                        f"the notification webhook {self.target} cannot be reached ({problem}); "
                        "events are not being delivered",
                    )
                return
            self._count(event, "sent")
            self.last_error = None
            if self._problems is not None:
                self._problems.clear(None, NOTIFY_PROBLEM)
            self._log.info("notification {event} delivered to {target}", event=event, target=self.target)
            return

    async def _post(self, body: bytes) -> None:
        from treq.content import collect

        response = await self._client.post(
            self.settings.webhook_url,
            data=body,
            headers={
                "content-type": ["application/json"],
                "user-agent": [f"NextClaude/{__version__}"],
            },
        )
        # Read to the end (bounded by the timeout), so the connection is done.
        await collect(response, lambda _: None)
        if not 200 <= response.code < 300:
            raise _HTTPStatus(response.code)
