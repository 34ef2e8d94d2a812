"""
Assembles the running proxy from a loaded configuration: the upstream
client, the persisted state, and the listening web server, as one
MultiService shared by twistd, `nextclaude server` and the demo.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nextclaude import activity, events, paths
from nextclaude.config import Config
from nextclaude.accounts import AccountsService, AccountsSettings
from nextclaude.allocator import Allocator
from nextclaude.control import ConfigAccounts, ControlService
from nextclaude.events import Event, EventHub
from nextclaude.history import HistoryService, history_path
from nextclaude.metrics import MetricsService, Sources
from nextclaude.notify import NotifyService
from nextclaude.oauth import OAuthClient
from nextclaude.problems import Problems
from nextclaude.pool import AccountPool, Thresholds
from nextclaude.proxy import ProxyResource, ProxySite
from nextclaude.requestlog import RequestLog
from nextclaude.router import FULL, Router
from nextclaude.scheduler import Scheduler
from nextclaude.status import snapshot
from nextclaude.store import JsonStore
from nextclaude.tokenstate import SPENT_KEY
from nextclaude.upstream import UpstreamService

STATE_SAVE_INTERVAL = 30.0
# How long the routing status (primary, draining account, where its sessions
# go) may lag the traffic under placement, in seconds: status requests and
# the console's snapshots are always brought up to date first.
STATUS_INTERVAL = 1.0
# A stop ends at most this long after the longer of proxy.shutdownGrace and
# the OAuth request timeout, whatever still hangs: a stuck worker must never
# keep the process alive.  (`nextclaude server` adds a last-resort exit one
# second later, for what the reactor itself waits on at shutdown.)
STOP_MARGIN = 4.0


class StateService(Service):
    """
    Restores quota, usage and the primary on start; saves them periodically
    and on stop.  Each save is one operation on the freshly read file.
    """

    name = "state"
    _log = Logger()

    def __init__(
        self, reactor: IReactorTime, store: JsonStore, router: Router, interval: float = STATE_SAVE_INTERVAL
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._router = router
        self._interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        try:
            saved = self._store.read()
        except Exception as error:
            # A broken state file costs only what it remembered; the config
            # is intact and the next save rewrites the state.
            self._log.warn("ignoring unreadable state file: {error}", error=error)
            saved = None
        if saved:
            self._router.restore(saved)
        self._loop = LoopingCall(self.save)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    def save(self) -> None:
        state = self._router.to_state()

        def replace(data: dict[str, Any]) -> None:
            # The spent-token ledger is the accounts service's, written on
            # its own schedule (before a rotated pair lands): never dropped here.
            kept = {key: data[key] for key in (SPENT_KEY,) if key in data}
            data.clear()
            data.update(state)
            data.update(kept)

        try:
            self._store.update(replace, create=dict)
        except Exception:
            self._log.failure("saving the state file failed")

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.save()


class ListenService(Service):
    """
    The web server on the configured interface and port.  Binding happens in
    privilegedStartService, so a port already in use surfaces there as
    CannotListenError, naming the port.
    """

    name = "listen"

    def __init__(self, reactor: IReactorTCP, site: ProxySite, port: int, host: str) -> None:
        self._reactor = reactor
        self._site = site
        self._port_number = port
        self._host = host
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        # Binding first, before any other service has started, means a port
        # in use fails the start with nothing to undo (no state saver
        # running, no state file rewritten by a proxy that never served).
        if self.port is None:
            # A deep accept queue: a burst of new connections (Claude Code
            # opening several at once) must not lose SYNs to a 1 s retry.
            self.port = self._reactor.listenTCP(self._port_number, self._site, backlog=511, interface=self._host)
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    _log = Logger()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        address = port.getHost()
        stopped = port.stopListening()
        if stopped is None:
            return None

        # Said in our words once the port is closed: Twisted's own
        # "(TCP Port N Closed)" stays out of the terminal.
        def closed(result: object) -> object:
            self._log.info("stopped listening on {host}:{port}", host=address.host, port=address.port)
            return result

        return stopped.addCallback(closed)


class ProxyService(MultiService):
    """
    The whole proxy.  Children start in order: the control socket (which
    refuses a second proxy on the same config), upstream client, state,
    accounts (token refresh, usage polling, reloads), scheduler (whose
    timers need the restored quota), request log, then the listening port,
    so no request arrives before the state is restored.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: Config,
        hub: EventHub | None = None,
        policy: str = FULL,
        log_bodies: bool = False,
        control: bool = True,
        account_settings: AccountsSettings | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.hub = hub if hub is not None else EventHub()
        self.problems = Problems(self.hub, reactor.seconds)
        self.pool = AccountPool(
            config.accounts,
            Thresholds(switch=config.switch_threshold, hard=config.hard_threshold),
        )
        self.router = Router(
            self.pool,
            reactor.seconds,
            self.hub,
            retry_after_cap=config.retry_after_cap,
            probe_interval=config.probe_interval,
            policy=policy,
            status_interval=STATUS_INTERVAL,
        )
        self.started_at = reactor.seconds()
        self._stop_waiters: list[Deferred[None]] = []
        # The control socket first: a second proxy on the same config is
        # refused before it binds a port or touches the state file.
        self.control: ControlService | None = None
        if control:
            self.control = ControlService(reactor, paths.socket_path(config.path), self)
            self.control.setServiceParent(self)
        self.upstream = UpstreamService(reactor, config.upstream)
        self.upstream.setServiceParent(self)
        state_path = paths.state_file(config.path)
        self.state = StateService(
            reactor, JsonStore(state_path, paths.lock_file(config.path)), self.router
        )
        self.state.setServiceParent(self)
        # Tokens, usage polling and reloads; after the state, so restored
        # quota is in place before the first poll.
        self.oauth = OAuthClient(reactor, config.oauth)
        self.account_service = AccountsService(
            reactor,
            config.path,
            self.pool,
            self.router,
            self.hub,
            self.oauth,
            account_settings if account_settings is not None else AccountsSettings.from_config(config),
            problems=self.problems,
        )
        self.account_service.setServiceParent(self)
        self.router.can_refresh = self.account_service.can_refresh
        # What the console's add/remove/reload keys do.
        self.accounts = ConfigAccounts(config.path, self.account_service.reload)
        self.scheduler = Scheduler(reactor, self.router, self.account_service.refresh)
        self.scheduler.setServiceParent(self)
        self.account_service.quota_changed = self.scheduler.arm_expiry
        self.request_log: RequestLog | None = None
        if config.log_dir is not None:
            self.request_log = RequestLog(
                reactor, config.log_dir, self.hub, keep_bodies=log_bodies, problems=self.problems
            )
            self.request_log.setServiceParent(self)
        # Every finished request into history.sqlite3 beside the config, on
        # a thread of its own; stopped after the drain, so the drained
        # requests are recorded too.
        self.history = HistoryService(
            reactor,
            history_path(config.path),
            self.hub,
            retention_days=config.history.retention_days,
            switch=config.switch_threshold,
            problems=self.problems,
        )
        self.history.setServiceParent(self)
        # The operator's webhook (notify.webhookUrl); idle without one.
        self.notifier = NotifyService(
            reactor, self.hub, config.notify, self.router, secrets=self._secrets, problems=self.problems
        )
        self.notifier.setServiceParent(self)
        self.allocator = Allocator()
        self.resource = resource = ProxyResource(
            reactor,
            config,
            self.router,
            self.scheduler,
            self.upstream,
            self.hub,
            self.status,
            recorder=self.request_log,
            allocator=self.allocator,
        )
        # GET /nextclaude/metrics: a registry of this proxy's own.
        self.metrics = MetricsService(
            self.hub,
            Sources(
                router=self.router,
                clock=reactor.seconds,
                started=self.started_at,
                in_flight=resource.in_flight,
                problems=self.problems,
                history=self.history,
                notifier=self.notifier,
            ),
        )
        self.metrics.setServiceParent(self)
        resource.metrics = self.metrics.render
        self.site = ProxySite(resource, config.proxy.max_body_bytes, reactor=reactor)
        self.listener = ListenService(reactor, self.site, config.proxy.port, config.proxy.host)
        self.listener.setServiceParent(self)
        self._rows = activity.Rows()
        self.hub.subscribe(self._log_event)

    _stopping: Deferred[None] | None = None
    # What the stop in progress still waits for, and how many times over
    # (for the give-up message).
    _stop_pending: dict[str, int]
    #: What a stop asked for over the control socket (`nextclaude stop`)
    #: runs.  The entry points (`nextclaude server`, twistd) set it to stop
    #: the reactor, which stops this service on its way out and ends the
    #: process; by default (embedded, tests) this service alone stops.
    on_stop_request: Any = None

    def request_stop(self) -> dict[str, Any]:
        """
        Begin a graceful stop on the next turn of the reactor (the caller's
        answer goes out first); what it will wait for.
        """
        import os

        self.reactor.callLater(0, self.on_stop_request or self.stopService)
        return {
            "in_flight": self.resource.in_flight(),
            "grace": float(self.config.proxy.shutdown_grace),
            "bound": float(self.stop_bound()),
            "pid": os.getpid(),
        }

    def startService(self) -> None:
        # Before the first body arrives: bodies from the heap, which the
        # resource's reclaimer trims when a load drains.
        self.allocator.keep_bodies_in_heap()
        super().startService()

    def stopService(self) -> Deferred[None]:
        # The console's quit and the reactor's shutdown may both ask; the
        # second asker waits for the first stop instead of starting one.
        if self._stopping is None:
            self._stopping = self._bounded_stop()
            return self._stopping.addBoth(self._stopped)
        waiter: Deferred[None] = Deferred()
        if self._stopping.called:
            waiter.callback(None)
        else:
            self._stop_waiters.append(waiter)
        return waiter

    def _stopped(self, result: object) -> object:
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return result

    def stop_bound(self) -> float:
        """
        The longest a stop takes: the drain and the wait for token
        refreshes in flight run side by side, then a margin for the rest.
        """
        return max(self.config.proxy.shutdown_grace, self.oauth.timeout) + STOP_MARGIN

    def _bounded_stop(self) -> Deferred[None]:
        """
        L{_stop}, given up on after L{stop_bound} seconds.  Never fails:
        failures are logged, and the caller (the reactor's shutdown) must
        be able to go on to exit.
        """
        result: Deferred[None] = Deferred()
        bound = self.stop_bound()
        self._stop_pending = {}

        def give_up() -> None:
            if not result.called:
                self._log.error(
                    "stopping took longer than {bound:g}s; exiting without waiting for {what}",
                    bound=bound,
                    what=", ".join(self._stop_pending) or "nothing",
                )
                result.callback(None)

        timer = self.reactor.callLater(bound, give_up)

        def finished(outcome: object) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(outcome, Failure):
                self._log.failure("stopping the proxy failed", outcome)
            if not result.called:
                result.callback(None)

        Deferred.fromCoroutine(self._stop()).addBoth(finished)
        return result

    def _stop_child(self, child: IService) -> Deferred[None]:
        """
        Stop one child service; fires (with None) when it has stopped or
        failed to, the failure logged: one child's failure must neither
        stop the others from stopping nor the stop from completing.
        """
        name = child.name or type(child).__name__
        self._stop_pending[name] = self._stop_pending.get(name, 0) + 1
        stopped: Deferred[Any] = maybeDeferred(child.stopService)

        def done(outcome: object) -> None:
            self._stop_pending[name] -= 1
            if not self._stop_pending[name]:
                del self._stop_pending[name]
            if isinstance(outcome, Failure):
                self._log.failure("stopping {service} failed", outcome, service=name)

        return stopped.addBoth(done)

    async def _stop(self) -> None:
        """
        Stop gracefully: accept nothing new; give the requests in flight up
        to C{proxy.shutdownGrace} seconds to finish, then cut the rest,
        while the accounts service waits for token refreshes in flight
        (their rotated pairs must reach the file; the OAuth timeout bounds
        them); then stop everything else (the request log writes the
        drained requests' lines, the state is saved).
        """
        Service.stopService(self)
        await self._stop_child(self.listener)
        stopped: list[IService] = [self.listener, self.account_service]
        waits = [self._stop_child(self.account_service)]
        if await self._drain():
            # A request in flight may have started a refresh after that
            # stop (a 401 during the drain): its pair must be saved too, so
            # the accounts service's stop runs again for what is in flight now.
            waits.append(self._stop_child(self.account_service))
        waits += [self._stop_child(child) for child in reversed(list(self)) if child not in stopped]
        await DeferredList(waits)

    async def _drain(self) -> bool:
        """
        Wait up to the grace for the requests in flight, then cut the rest;
        whether there were any.
        """
        count = self.resource.in_flight()
        if not count:
            return False
        grace = self.config.proxy.shutdown_grace
        self._log.info("waiting up to {grace:g}s for {count} request(s) in flight", grace=grace, count=count)
        self._stop_pending["requests in flight"] = 1
        idle = self.resource.when_idle()
        timer = self.reactor.callLater(grace, idle.cancel)
        try:
            await idle
        except CancelledError:
            self._log.warn("shutdown grace over: cutting {count} request(s)", count=self.resource.in_flight())
            try:
                self.resource.abort_all()
            except Exception:
                self._log.failure("cutting the requests in flight failed")
        finally:
            self._stop_pending.pop("requests in flight", None)
            if timer.active():
                timer.cancel()
        return True

    def address(self) -> tuple[str | None, int | None]:
        if self.listener.port is None:
            return None, None
        host = self.listener.port.getHost()
        return host.host, host.port

    def status(self) -> dict[str, Any]:
        host, port = self.address()
        self.problems.sync_accounts({account.name: account.error for account in self.pool})
        now = self.reactor.seconds()
        result = snapshot(
            self.router, now, self.started_at, host, port, self.problems.snapshot(), history=self.history.snapshot(now)
        )
        # The webhook as scheme and host only, and its delivery counts;
        # null without one.
        result["notify"] = self.notifier.snapshot()
        # The config file this proxy serves: the control socket belongs to
        # its directory, so `status --config` with a sibling file reaches it.
        result["config"] = str(self.config.path)
        return result

    def _secrets(self) -> list[str | None]:
        """
        Every secret this proxy holds, for the notifier to cut out of what
        it sends.
        """
        found: list[str | None] = [self.config.proxy.api_key]
        for account in self.pool:
            found += [account.config.access_token, account.config.refresh_token, account.config.api_key]
        return found

    def _log_event(self, event: Event) -> None:
        # Routing events are worth a plain log line; per-request ones are
        # summarised once, when the request finishes, in the console's
        # activity columns (a header first).
        if event.kind == events.REQUEST_FINISHED:
            row = {**event.data, "time": event.time}
            for line in self._rows.lines(row, (account.name for account in self.pool)):
                self._log.info("{line}", **{activity.ROW_TEXT: line, activity.ROW_KEY: True})
        elif event.kind not in (events.REQUEST_STARTED, events.REQUEST_ROUTED):
            details = " ".join(f"{key}={value}" for key, value in sorted(event.data.items()))
            self._log.info("{kind} {details}", kind=event.kind, details=details)
