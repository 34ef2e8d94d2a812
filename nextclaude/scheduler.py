"""
The timing side of routing: runs each request's attempts (waiting where a
verdict asks, probing when every account is out), and wakes up when a quota
window resets so status shows fresh windows without waiting for traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from nextclaude.pool import Account
from nextclaude.router import Decision, Exchange, Router
from nextclaude.upstream import UpstreamUnavailable, quota_report

# A probe for a streaming request that has no response headers after this
# long is taken as "not recovered" (the real request may be waiting on a
# long queue upstream; the client should not wait with it).
PROBE_HEADER_TIMEOUT = 12.0

Send = Callable[[Account, Decision, "float | None"], Awaitable[IResponse]]
Discard = Callable[[IResponse], Awaitable[None]]
Refresh = Callable[[Account], Awaitable[None]]


@dataclass(frozen=True)
class Dispatched:
    """
    How a request's attempts ended: a response to relay, an upstream that
    could not be reached (C{error}), or no account at all (the decision's
    account is None: answer with the synthetic 429).
    """

    decision: Decision
    response: IResponse | None = None
    error: UpstreamUnavailable | None = None


async def _no_refresh(account: Account) -> None:
    return None


class Scheduler(Service):
    name = "scheduler"
    _log = Logger()

    def __init__(self, reactor: IReactorTime, router: Router, refresh: Refresh = _no_refresh) -> None:
        self._reactor = reactor
        self._router = router
        self._refresh = refresh
        self._expiry: IDelayedCall | None = None
        self._status: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self.arm_expiry()

    def stopService(self) -> None:
        super().stopService()
        for call in (self._expiry, self._status):
            if call is not None and call.active():
                call.cancel()
        self._expiry = self._status = None

    # -- expiry timers ---------------------------------------------------------

    def arm_expiry(self) -> None:
        """
        Schedule one wake-up for the soonest window reset, exhaustion or
        throttle end, replacing any earlier one.
        """
        if not self.running:
            return
        when = self._router.next_expiry()
        if self._expiry is not None and self._expiry.active():
            if when is not None and self._expiry.getTime() == when:
                return
            self._expiry.cancel()
        self._expiry = None
        if when is not None:
            delay = max(0.0, when - self._reactor.seconds())
            self._expiry = self._reactor.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        try:
            self._router.expire()
        except Exception:
            self._log.failure("expiring quota windows failed")
        self.arm_expiry()

    # -- one request's attempts --------------------------------------------------

    async def dispatch(
        self,
        exchange: Exchange,
        send: Send,
        discard: Discard,
        client_gone: Callable[[], bool],
        streaming: Callable[[], bool],
    ) -> Dispatched:
        """
        Route and send until an answer is worth relaying, every account has
        been tried, or the client went away.
        """
        router = self._router
        try:
            while True:
                decision = router.route(exchange)
                account = decision.account
                if account is None:
                    return Dispatched(decision)
                # Whether the request streams is looked up only for a probe:
                # it is a scan of the whole body.
                timeout = PROBE_HEADER_TIMEOUT if decision.probe and streaming() else None
                try:
                    response = await send(account, decision, timeout)
                except UpstreamUnavailable as error:
                    if client_gone():
                        return Dispatched(decision, error=error)
                    if decision.probe:
                        # Not recovered as far as this sweep can tell.
                        exchange.tried.add(account.name)
                        continue
                    # A connection failure is worth one more try; a timeout
                    # already waited as long as the client should.
                    if error.code == 502 and router.on_unreachable(exchange, account):
                        continue
                    return Dispatched(decision, error=error)
                verdict = router.on_response(
                    exchange, account, response.code, quota_report(response, self._reactor.seconds())
                )
                self.arm_expiry()
                if verdict.serve or client_gone():
                    return Dispatched(decision, response)
                await discard(response)
                if verdict.refresh:
                    await self._refresh(account)
                if verdict.delay > 0:
                    await deferLater(self._reactor, verdict.delay)
                if client_gone():
                    return Dispatched(decision)
        finally:
            router.close(exchange)
            self._arm_status()

    def _arm_status(self) -> None:
        # The router lets status lag the traffic by its status_interval; one
        # timer catches up once the traffic pauses.
        due = self._router.status_due()
        if due is None or not self.running or (self._status is not None and self._status.active()):
            return
        self._status = self._reactor.callLater(max(0.0, due - self._reactor.seconds()), self._settle)

    def _settle(self) -> None:
        self._status = None
        try:
            self._router.settle()
        except Exception:
            self._log.failure("bringing the routing status up to date failed")
