"""
The activity log as plain text: the console's columns (time, status,
duration, account, model, hit, miss, ✎, ↓out, hit %, reason) for
C{nextclaude server --no-console} and twistd's log, and the observer that
writes the server's terminal lines in the project's own format; and the
router that sends Twisted's log to a file while a console owns the
terminal.

Nothing here imports urwid: a server without a console never loads it
(about 7 MB of resident memory, issue 12).
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, cast

from twisted.logger import FileLogObserver, ILogObserver, eventAsText, textFileLogObserver
from zope.interface import implementer

from nextclaude.console import views

#: Columns wide enough for the figures without the ↑in column or the path.
WIDTH = 100

#: The log key that marks a line as an activity row (or its header): the
#: terminal writes it as it is, since it carries its own time.
ROW_KEY = "nextclaude_row"

#: The log key holding an activity row's text (its format is only C{"{line}"}).
ROW_TEXT = "line"

# Twisted's own lines about its factories, ports and reactor: object reprs
# ("Starting factory <…Site object at 0x…>") and port numbers the
# "listening on" line already gives.  Most come through the legacy log.msg
# with their text already formatted, so the text is what is matched.
_CHATTER_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}", "Main loop terminated."})
_CHATTER_TEXT = re.compile(
    r"(?:Starting|Stopping) factory .*"
    r"|\S.* starting on \S+"
    r"|\((?:\w+ )?Port .* Closed\)"
    r"|Main loop terminated\.",
    re.DOTALL,
)


class Rows:
    """
    Activity rows as text, in columns fitted to the account names; the
    header comes before the first row and again whenever the columns change.
    """

    def __init__(self, width: int = WIDTH) -> None:
        self._width = width
        self._names: tuple[str, ...] | None = None
        self._columns: views.LogColumns | None = None

    def lines(self, event: Mapping[str, Any], names: Iterable[str]) -> list[str]:
        """
        The text lines for one finished request (the event's data and its
        C{time}): the header when it is due, then the row.
        """
        names = tuple(names)
        out: list[str] = []
        if self._columns is None or names != self._names:
            columns = views.LogColumns.for_width(self._width, names)
            if columns != self._columns:
                out.append(views.line_text(views.log_header(columns)).rstrip())
            self._names, self._columns = names, columns
        out.append(views.line_text(views.request_row(event, self._columns)).rstrip())
        return out


def is_chatter(event: Mapping[str, Any], text: str | None = None) -> bool:
    """
    Whether a log event is Twisted's factory, port or reactor start and
    stop chatter (C{text}: the event's text, when already formatted).
    """
    if event.get("log_format") in _CHATTER_FORMATS:
        return True
    if str(event.get("log_namespace", "")).startswith("nextclaude"):
        return False
    if text is None:
        text = eventAsText(dict(event), includeTimestamp=False, includeSystem=False)
    return _CHATTER_TEXT.fullmatch(text) is not None


def format_terminal(event: Mapping[str, Any], localtime: Callable[[float], Any] = time.localtime) -> str | None:
    """
    One log event as the server's terminal shows it: activity rows as they
    are, anything else after its time, Twisted's chatter not at all.
    """
    if event.get(ROW_KEY):
        # An activity row (one per request) is its own text: no format to run.
        line = event.get(ROW_TEXT)
        return line + "\n" if isinstance(line, str) and line else None
    text = eventAsText(dict(event), includeTimestamp=False, includeSystem=False)
    if not text or is_chatter(event, text):
        return None
    when = event.get("log_time")
    stamp = views.clock_text(when, localtime) if isinstance(when, (int, float)) else "--:--:--"
    level = event.get("log_level")
    name = getattr(level, "name", "info")
    # Info is the ordinary case; anything louder says so.
    return f"{stamp} {text}\n" if name in ("info", "debug") else f"{stamp} {name}: {text}\n"


def terminal_observer(stream: IO[str]) -> FileLogObserver:
    """
    A log observer writing L{format_terminal} lines to C{stream}.
    """
    return FileLogObserver(stream, lambda event: format_terminal(event) or "")


# -- where log lines go while a console owns the terminal ------------------------


@implementer(ILogObserver)
class LogRouter:
    """
    A log observer to begin Twisted logging with, whose target can change:
    plain lines to stdout normally, a file (or nowhere) while the console
    owns the terminal.

        router = LogRouter(textFileLogObserver(sys.stdout))
        globalLogBeginner.beginLoggingTo([router], redirectStandardIO=False)
        ...
        with router.diverted(path):   # or run_console(..., log_router=router)
            ...
    """

    def __init__(self, target: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        self.target = target

    def __call__(self, event: Mapping[str, Any]) -> None:
        target = self.target
        if target is not None:
            target(event)

    @contextmanager
    def diverted(self, path: str | None) -> Iterator[None]:
        """
        For the duration of the block, send Twisted's log events and the
        standard library's log records to C{path} (appended), or drop them
        when C{path} is None; then restore both.
        """
        # 0600 like every file beside the config.
        stream = open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8") if path else None
        previous = self.target
        self.target = cast(Callable[[Mapping[str, Any]], None], textFileLogObserver(stream)) if stream else None
        root = logging.getLogger()
        handlers = root.handlers[:]
        handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else logging.NullHandler()
        if stream is not None:
            handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s] %(levelname)s %(message)s"))
        root.handlers[:] = [handler]
        try:
            yield
        finally:
            root.handlers[:] = handlers
            self.target = previous
            if stream is not None:
                stream.close()
