"""
Problems the user must see until they are resolved: a rotated token that
could not be saved, a request log that cannot be written, a dead
credential, an upstream that cannot be reached.  One registry per proxy; every change is announced on the
event stream (C{problem-raised} / C{problem-cleared}, the problem's kind
in their C{problem} field) and the current list
is part of the status snapshot (C{problems}), so C{nextclaude status}, its
C{--json} and the console all show the same thing.

Pure: the clock is a parameter, and nothing here touches the reactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nextclaude import events
from nextclaude.events import EventHub

# Kinds, one vocabulary for status, the console and the logs.
#: An account's credential is dead (401, invalid_grant, 403 where a sibling
#: succeeded): the account serves nothing until the user fixes it.
ACCOUNT_ERROR = "account-error"
#: A rotated token pair could not be written to the config file; a recovery
#: copy holds it and the proxy keeps retrying.
TOKEN_UNSAVED = "token-unsaved"
#: Not even the recovery copy could be written: the pair lives only in
#: memory, and a stop loses the account.
TOKEN_IN_MEMORY = "token-in-memory"
#: The request log (``--log-to``) cannot be written.
REQUEST_LOG = "request-log"
#: The OAuth usage endpoint cannot be read for an account (network, timeout,
#: server error): its quota figures are as old as its last request.
USAGE_UNREACHABLE = "usage-unreachable"
#: An automatic reload (file watcher, SIGHUP) found the config file broken
#: and kept the running accounts; cleared by the next reload that works.
CONFIG_REFUSED = "config-refused"
#: The upstream API could not be reached (connection refused or failed,
#: or no answer within proxy.upstreamTimeout): clients get 502 or 504
#: whatever account they would use.  Cleared by the next answer from it.
UPSTREAM_UNREACHABLE = "upstream-unreachable"
# The status of a request that never reached the upstream, and what it says.
_UNREACHABLE = {
    502: "The upstream API could not be reached: requests get 502 until it answers (check the network, "
    "or `upstream` in the config).",
    504: "The upstream API did not answer in time (proxy.upstreamTimeout): requests get 504 until it answers.",
}


@dataclass(frozen=True)
class Problem:
    """
    One unresolved problem.  C{account} is None for the proxy as a whole;
    C{since} is when it was first raised (epoch seconds).
    """

    account: str | None
    kind: str
    message: str
    since: float

    def to_json(self) -> dict[str, Any]:
        return {"account": self.account, "kind": self.kind, "message": self.message, "since": self.since}


class Problems:
    """
    The registry: at most one problem per (account, kind).  Raising one
    again updates its message and keeps its C{since}; clearing one that is
    not there does nothing, so callers need not track what they raised.
    """

    def __init__(self, hub: EventHub, clock: Callable[[], float]) -> None:
        self._hub = hub
        self._clock = clock
        self._items: dict[tuple[str | None, str], Problem] = {}
        # An account error is already announced by whoever found it; the
        # registry mirrors it so there is one list to show.
        hub.subscribe(self._on_event)

    def raise_problem(self, account: str | None, kind: str, message: str) -> None:
        key = (account, kind)
        old = self._items.get(key)
        if old is not None and old.message == message:
            return
        now = self._clock()
        problem = Problem(account, kind, message, old.since if old is not None else now)
        self._items[key] = problem
        # "problem", not "kind": an event's own kind is the event type.
        self._hub.emit(events.PROBLEM_RAISED, now, account=account, problem=kind, message=message, since=problem.since)

    def clear(self, account: str | None, kind: str) -> None:
        problem = self._items.pop((account, kind), None)
        if problem is not None:
            self._hub.emit(events.PROBLEM_CLEARED, self._clock(), account=account, problem=kind)

    def clear_account(self, account: str) -> None:
        """
        The account was removed: none of its problems stand any more.
        """
        for key in [key for key in self._items if key[0] == account]:
            self.clear(*key)

    def active(self, account: str | None, kind: str) -> bool:
        return (account, kind) in self._items

    def snapshot(self) -> list[dict[str, Any]]:
        """
        The problems as JSON objects (C{account}, C{kind}, C{message},
        C{since}), oldest first.
        """
        return [p.to_json() for p in sorted(self._items.values(), key=lambda p: (p.since, p.account or "", p.kind))]

    def sync_accounts(self, errors: Mapping[str, str | None]) -> None:
        """
        Match the account-error problems to the accounts' own error fields
        (account name to message, or None when it works): an error cleared
        by a refresh or a reload clears its problem, a removed account
        takes its problems with it.
        """
        for account, message in errors.items():
            if message:
                self.raise_problem(account, ACCOUNT_ERROR, message)
            else:
                self.clear(account, ACCOUNT_ERROR)
        for key in [key for key in self._items if key[0] is not None and key[0] not in errors]:
            self.clear(*key)

    def _on_event(self, event: events.Event) -> None:
        account = event.data.get("account")
        if event.kind == events.ACCOUNT_ERROR and isinstance(account, str):
            self.raise_problem(account, ACCOUNT_ERROR, str(event.data.get("message") or "credential rejected"))
        elif event.kind == events.REQUEST_FINISHED and isinstance(account, str):
            # A request sent to an account either never got an answer (the
            # proxy's own 502/504, not ok) or got one: the upstream answers.
            status = event.data.get("status")
            if event.data.get("ok") is False and status in _UNREACHABLE:
                self.raise_problem(None, UPSTREAM_UNREACHABLE, _UNREACHABLE[status])
            else:
                self.clear(None, UPSTREAM_UNREACHABLE)
