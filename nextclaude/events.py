"""
The one event stream: the router and the proxy emit typed events; the status
endpoint, the control channel, the console and the logs consume them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

# Event kinds, one vocabulary for every consumer.
REQUEST_STARTED = "request-started"
REQUEST_ROUTED = "request-routed"
REQUEST_FINISHED = "request-finished"
ARMED = "armed"
SWITCHED = "switched"
COMPACTION = "compaction-detected"
PROBE = "probe"
THROTTLED = "throttled"
RECOVERED = "recovered"
PIN_CHANGED = "pin-changed"
EXHAUSTED = "exhausted"
ACCOUNT_ERROR = "account-error"
# The problems list changed (nextclaude.problems).
PROBLEM_RAISED = "problem-raised"
PROBLEM_CLEARED = "problem-cleared"

Listener = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    kind: str
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": self.time, **self.data}


class EventHub:
    """
    Fan events out to listeners and keep the most recent ones for late
    subscribers.  A failing listener is logged and never disturbs the
    emitter or the other listeners.
    """

    _log = Logger()

    def __init__(self, keep: int = 200) -> None:
        self._listeners: list[Listener] = []
        self.recent: deque[Event] = deque(maxlen=keep)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, kind: str, time: float, **data: Any) -> Event:
        event = Event(kind, time, data)
        self.recent.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self._log.failure("event listener failed on {kind}", kind=kind)
        return event
