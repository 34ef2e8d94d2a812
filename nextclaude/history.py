"""
Usage history: every finished request in an SQLite database,
C{history.sqlite3} beside the config, and the running totals the status
snapshot and the console show (today's and the week's tokens, moves,
re-billed tokens, the naive estimate and what was saved).

One writer thread with its own connection owns the database (several
connections in threads would fight over SQLite's lock): WAL mode, a busy
timeout, each batch of requests inserted in one transaction together with
the savings state (L{nextclaude.savings}), so a kill mid-write loses at most
the batch in flight and never tears one.  The reactor's share per request is
one tuple put on a bounded queue; when the queue is full the request is
dropped and counted.  A database that cannot be written (a full disk, a lock
held by another program) becomes a C{problems} entry; requests never fail
or wait because of it.  The writer's end is always signalled, whatever
happened to it, and a stop waits for it at most L{STOP_TIMEOUT} seconds.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from nextclaude import events
from nextclaude.events import Event, EventHub
from nextclaude.paths import ensure_private_dir
from nextclaude.problems import Problems
from nextclaude.savings import DEFAULT_SWITCH, Measured, Observed, Savings

HISTORY_FILE = "history.sqlite3"
DEFAULT_RETENTION_DAYS = 90
# The problems-list kind for a history that cannot be written.
HISTORY_PROBLEM = "history"
# Requests waiting for the writer; past this they are dropped and counted.
QUEUE_LIMIT = 10_000
# Requests per transaction at most: a burst is written in a few commits,
# and one commit never holds the lock for long.
BATCH_LIMIT = 500
# How long the writer gathers requests before it writes them, in seconds: a
# commit and two wake-ups of the reactor per request cost the proxy more CPU
# than relaying a small request (benchmarks/proxy_overhead.py).  A flush or
# a stop writes at once.
WRITE_DELAY = 1.0
BUSY_TIMEOUT = 5.0
# The longest a stop waits for the writer's last batch (a locked database
# can hold it for the busy timeout); after that the batch is lost, the stop
# goes on.
STOP_TIMEOUT = BUSY_TIMEOUT + 1.0
# Old rows are pruned at start and then at most this often.
PRUNE_INTERVAL = 6 * 3600.0
# The live totals keep 15-minute slots: every time zone's day starts on one.
SLOT = 900
DAY = 86400.0
WEEK_DAYS = 7

# The user-agent's product token, for the products worth telling apart;
# anything else is "other" (a free-form string would be unbounded, and may
# say more about the machine than a usage table needs).
_CLIENTS = {
    "claude-cli": "claude-cli",
    "claude-code": "claude-cli",
    "anthropic/python": "anthropic-python",
    "anthropic-python": "anthropic-python",
    "anthropic/js": "anthropic-js",
    "anthropic-typescript": "anthropic-js",
    "anthropic/go": "anthropic-go",
    "anthropic/java": "anthropic-java",
    "anthropic/ruby": "anthropic-ruby",
    "curl": "curl",
}
CLIENT_OTHER = "other"


def client_product(user_agent: bytes | str | None) -> str:
    """
    The product token of a C{User-Agent} (C{claude-cli/2.1.14 (external,
    cli)} -> C{claude-cli}; the Python SDK's C{Anthropic/Python 0.40.0} ->
    C{anthropic-python}), or C{other}.
    """
    if user_agent is None:
        return CLIENT_OTHER
    if isinstance(user_agent, bytes):
        user_agent = user_agent.decode("latin-1")
    text = user_agent.strip().lower()
    token = text.split(" ", 1)[0]
    name = token.split("/", 1)[0]
    # The SDKs spell it "Anthropic/Python 0.40.0": the product is two words.
    if name == "anthropic" and "/" in token:
        name = "anthropic/" + token.split("/", 1)[1]
    return _CLIENTS.get(name, CLIENT_OTHER)


# -- the database ------------------------------------------------------------------

# Each entry moves the schema one version up; PRAGMA user_version says how
# many have run.  Never edit an entry that shipped: add one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        session TEXT,
        client TEXT NOT NULL,
        account TEXT,
        model TEXT,
        status INTEGER,
        reason TEXT,
        duration REAL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_1h_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_ttl REAL,
        main INTEGER NOT NULL DEFAULT 0,
        moved INTEGER NOT NULL DEFAULT 0,
        rebilled INTEGER NOT NULL DEFAULT 0,
        naive_rebilled INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX requests_time ON requests (time);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

COLUMNS = (
    "time",
    "session",
    "client",
    "account",
    "model",
    "status",
    "reason",
    "duration",
    "input_tokens",
    "cache_creation_tokens",
    "cache_creation_1h_tokens",
    "cache_read_tokens",
    "output_tokens",
    "cache_ttl",
    "main",
    "moved",
    "rebilled",
    "naive_rebilled",
)
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_STATE_KEY = "savings"


class HistoryError(Exception):
    """The database cannot be used (newer schema, not a database, …)."""


def history_path(config_path: Path) -> Path:
    return config_path.parent / HISTORY_FILE


def _private(path: Path) -> None:
    # SQLite gives -wal and -shm the database's mode; this makes sure of it
    # for files another version or tool created.
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(f"{path}{suffix}", 0o600)
        except FileNotFoundError:
            pass


def migrate(connection: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> int:
    """
    Bring the schema up to date, one migration per transaction; the version
    it is at.  A database from a newer NextClaude is refused, never
    downgraded.
    """
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise HistoryError(
            f"the usage history was written by a newer NextClaude (schema {version}, this one knows {len(migrations)})"
        )
    for number in range(version, len(migrations)):
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in migrations[number].split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number + 1}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    return len(migrations)


class HistoryDatabase:
    """
    The writer's side of the database: blocking calls, one thread.  Opens
    (creating the file 0600 and migrating it) on first use and again after
    L{close}, so a failure is retried with the next batch.
    """

    def __init__(
        self,
        path: Path,
        busy_timeout: float = BUSY_TIMEOUT,
        migrations: Sequence[str] = MIGRATIONS,
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.migrations = migrations
        self._connection: sqlite3.Connection | None = None

    def connection(self) -> sqlite3.Connection:
        if self._connection is None:
            ensure_private_dir(self.path.parent)
            # Created 0600 before SQLite opens it: its -wal and -shm follow.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            connection = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                connection.execute("PRAGMA journal_mode = WAL")
                # WAL with NORMAL: a power cut may lose the last commits but
                # never corrupts; a killed process loses nothing committed.
                connection.execute("PRAGMA synchronous = NORMAL")
                migrate(connection, self.migrations)
            except BaseException:
                connection.close()
                raise
            _private(self.path)
            self._connection = connection
        return self._connection

    def load_state(self) -> dict[str, Any]:
        row = self.connection().execute("SELECT value FROM meta WHERE key = ?", (_STATE_KEY,)).fetchone()
        if row is None:
            return {}
        try:
            state = json.loads(row[0])
        except ValueError:
            return {}
        return state if isinstance(state, dict) else {}

    def insert(self, rows: Sequence[Sequence[Any]], state: Mapping[str, Any] | None = None) -> None:
        """
        The rows and the savings state in one transaction: both or neither.
        """
        connection = self.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(_INSERT, rows)
            if state is not None:
                connection.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (_STATE_KEY, json.dumps(state, separators=(",", ":"))),
                )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def prune(self, before: float) -> int:
        connection = self.connection()
        cursor = connection.execute("DELETE FROM requests WHERE time < ?", (before,))
        return cursor.rowcount

    def slots(self, since: float) -> list[tuple[Any, ...]]:
        return slot_rows(self.connection(), since)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except sqlite3.Error:
                pass


def slot_rows(connection: sqlite3.Connection, since: float) -> list[tuple[Any, ...]]:
    """
    Per account and 15-minute slot since C{since}: requests, the token
    kinds, moves, re-billed and the naive estimate.
    """
    return connection.execute(
        f"""
        SELECT account, CAST(time / {SLOT} AS INTEGER) * {SLOT}, COUNT(*),
               SUM(input_tokens), SUM(cache_creation_tokens), SUM(cache_read_tokens),
               SUM(output_tokens), SUM(moved), SUM(rebilled), SUM(naive_rebilled)
        FROM requests WHERE time >= ? GROUP BY 1, 2
        """,
        (since,),
    ).fetchall()


def open_readonly(path: Path) -> sqlite3.Connection:
    """
    The database for reading only (C{nextclaude usage}): works with the
    proxy stopped or running, and never creates or changes a file.
    """
    if not path.exists():
        raise FileNotFoundError(path)
    # With no -wal file no proxy is writing (a clean close removes it):
    # read the file as it stands, without the -wal and -shm a WAL reader
    # would create.  With one, read through it as a WAL reader must.
    immutable = "&immutable=1" if not Path(f"{path}-wal").exists() else ""
    connection = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro{immutable}", uri=True, timeout=BUSY_TIMEOUT)
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        connection.close()
        raise HistoryError(
            f"{path} was written by a newer NextClaude (schema {version}, this one knows {SCHEMA_VERSION})"
        )
    if version < 1:
        connection.close()
        raise HistoryError(f"{path} holds no usage history yet")
    return connection


# -- one request --------------------------------------------------------------------


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) else None


def observed(wall: float, data: Mapping[str, Any]) -> Observed:
    """
    What the savings figures need of a C{request-finished} event's data.
    """
    usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else {}
    ttl = _number(data.get("ttl"))
    return Observed(
        time=wall,
        session=_text(data.get("session")),
        account=_text(data.get("account")),
        ok=data.get("status") == 200 and data.get("ok") is not False and bool(usage),
        side=bool(data.get("side")),
        compaction=bool(data.get("compaction")),
        continuation=bool(data.get("continuation")),
        ttl=ttl if ttl is not None and ttl > 0 else 300.0,
        input_tokens=_count(usage.get("input_tokens")),
        cache_creation=_count(usage.get("cache_creation_input_tokens")),
        cache_read=_count(usage.get("cache_read_input_tokens")),
        output_tokens=_count(usage.get("output_tokens")),
        utilization=_number(data.get("utilization")),
        reset=_number(data.get("reset")),
    )


def row_of(wall: float, data: Mapping[str, Any], measured: Measured, naive: int) -> tuple[Any, ...]:
    """
    The database row of one finished request (in L{COLUMNS}' order).
    """
    usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else {}
    status = data.get("status")
    duration = _number(data.get("duration"))
    return (
        wall,
        _text(data.get("session")),
        _text(data.get("client")) or CLIENT_OTHER,
        _text(data.get("account")),
        _text(data.get("model")),
        status if isinstance(status, int) else None,
        _text(data.get("reason")),
        round(duration, 4) if duration is not None else None,
        _count(usage.get("input_tokens")),
        _count(usage.get("cache_creation_input_tokens")),
        _count(usage.get("cache_creation_1h")),
        _count(usage.get("cache_read_input_tokens")),
        _count(usage.get("output_tokens")),
        _number(data.get("ttl")),
        int(measured.main),
        int(bool(data.get("moved"))),
        measured.rebilled,
        naive,
    )


# -- the live totals (reactor side) ----------------------------------------------------


@dataclass
class Totals:
    """
    Sums over some requests.  C{naive} is the naive-rotation estimate.
    """

    requests: int = 0
    input_tokens: int = 0
    cache_creation: int = 0
    cache_read: int = 0
    output_tokens: int = 0
    moves: int = 0
    rebilled: int = 0
    naive: int = 0

    def add(self, other: Totals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def usage(self) -> int:
        """What the sparkline shows: the tokens that burn quota (in + ✎ + out)."""
        return self.input_tokens + self.cache_creation + self.output_tokens

    def to_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "inputTokens": self.input_tokens,
            "cacheCreationTokens": self.cache_creation,
            "cacheReadTokens": self.cache_read,
            "outputTokens": self.output_tokens,
            "moves": self.moves,
            "rebilled": self.rebilled,
            "naiveEstimate": self.naive,
            "saved": self.naive - self.rebilled,
        }

    @classmethod
    def of_row(cls, row: Sequence[Any]) -> Totals:
        """From one L{row_of} tuple."""
        return cls(1, row[8], row[9], row[11], row[12], row[15], row[16], row[17])


LocalTime = Callable[[float], time.struct_time]


@dataclass
class HistorySummary:
    """
    The live totals: per account and 15-minute slot, for the last week and
    a day (older slots are dropped as new ones come).  Pure: times are
    parameters, local days come from C{localtime}.
    """

    localtime: LocalTime = time.localtime
    slots: dict[tuple[str, int], Totals] = field(default_factory=dict)

    def add(self, account: str | None, when: float, totals: Totals) -> None:
        key = (account or "-", int(when // SLOT) * SLOT)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Totals()
            self._prune(when)
        slot.add(totals)

    def _prune(self, now: float) -> None:
        oldest = now - (WEEK_DAYS + 1) * DAY
        for key in [key for key in self.slots if key[1] < oldest]:
            del self.slots[key]

    def _day(self, when: float) -> tuple[int, int, int]:
        local = self.localtime(when)
        return local.tm_year, local.tm_mon, local.tm_mday

    def _week_days(self, now: float) -> set[tuple[int, int, int]]:
        # Seven local days back: stepping by 24 h may skip or repeat a day
        # at a DST change, so step by 12 h and collect.
        days = set()
        for half in range(WEEK_DAYS * 2 + 1):
            days.add(self._day(now - half * DAY / 2))
        today = self._day(now)
        ordered = sorted(days)
        return set(ordered[ordered.index(today) - (WEEK_DAYS - 1) :][:WEEK_DAYS]) if today in ordered else {today}

    def snapshot(self, now: float, hours: int = 24) -> dict[str, Any]:
        """
        The totals as the status snapshot's C{history} field: today's and
        the week's (local days), per account the week's and C{hours}
        hourly usage figures ending with the current hour.
        """
        today_key = self._day(now)
        week_keys = self._week_days(now)
        today, week = Totals(), Totals()
        accounts: dict[str, Totals] = {}
        hour_now = int(now // 3600) * 3600
        first_hour = hour_now - (hours - 1) * 3600
        hourly: dict[str, list[int]] = {}
        for (account, start), totals in self.slots.items():
            day = self._day(start)
            if day == today_key:
                today.add(totals)
            if day in week_keys:
                week.add(totals)
                accounts.setdefault(account, Totals()).add(totals)
            if first_hour <= start < hour_now + 3600:
                row = hourly.setdefault(account, [0] * hours)
                row[(start - first_hour) // 3600] += totals.usage
        names = sorted(set(accounts) | set(hourly))
        return {
            "today": today.to_json(),
            "week": week.to_json(),
            "hourStart": first_hour,
            "accounts": [
                {
                    "name": name,
                    "week": accounts.get(name, Totals()).to_json(),
                    "hourly": hourly.get(name, [0] * hours),
                }
                for name in names
            ],
        }


# -- the service -------------------------------------------------------------------------

_STOP = object()


class _Flush:
    """A marker: fires its Deferred (in the reactor) once the writer got to it."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred()


class HistoryService(Service):
    """
    Subscribes to the event stream and records every finished request.
    """

    name = "history"
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: Path,
        hub: EventHub,
        *,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        switch: float = DEFAULT_SWITCH,
        problems: Problems | None = None,
        wall_clock: Callable[[], float] = time.time,
        localtime: LocalTime = time.localtime,
        queue_limit: int = QUEUE_LIMIT,
        stop_timeout: float = STOP_TIMEOUT,
        make_database: Callable[[Path], HistoryDatabase] = HistoryDatabase,
        clock: Any = None,
        write_delay: float = WRITE_DELAY,
    ) -> None:
        self._reactor = reactor
        # The stop's bound runs on this clock (a test's task.Clock); the
        # writer reports to the reactor's thread.
        self._clock = clock if clock is not None else reactor
        self.path = path
        self._hub = hub
        self.retention_days = retention_days
        self._switch = switch
        self._problems = problems
        self._wall_clock = wall_clock
        self._stop_timeout = stop_timeout
        self._make_database = make_database
        self._write_delay = write_delay
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_limit)
        self._stop_flag = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._writer_done = False
        self._unsubscribe: Callable[[], None] | None = None
        self.summary = HistorySummary(localtime=localtime)
        # What this run recorded, never pruned: counters for the metrics
        # page (nextclaude.metrics) must only grow.
        self.recorded = Totals()
        # Requests the queue had no room for, and requests a failed write
        # lost: both are counted, never waited for.
        self.dropped = 0
        self.lost = 0
        # Set by the writer (in the reactor) once the database answered.
        self.available = False

    # -- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if not hasattr(self._reactor, "callFromThread"):
            # A reactor without threads (a test's memory reactor) cannot
            # hear from the writer: nothing is recorded.
            self._log.warn("the usage history needs a reactor with threads; not recording")
            return
        self._writer_done = False
        self._stop_flag.clear()
        self._thread = threading.Thread(target=self._run, name="nextclaude-history", daemon=True)
        self._thread.start()
        self._unsubscribe = self._hub.subscribe(self._on_event)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        thread, self._thread = self._thread, None
        if thread is None or self._writer_done or not thread.is_alive():
            return None
        stopped: Deferred[None] = Deferred()
        self._stopped = stopped
        # The flag first: a full queue has no room for the marker, and the
        # writer, draining it, looks at the flag before it waits again.
        self._stop_flag.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        timer = self._clock.callLater(self._stop_timeout, self._give_up)
        stopped.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return stopped

    def _give_up(self) -> None:
        stopped = self._stopped
        if stopped is not None and not stopped.called:
            self._log.warn(
                "the usage history writer did not finish within {seconds:g}s; its last requests are not recorded",
                seconds=self._stop_timeout,
            )
            stopped.callback(None)

    def flushed(self) -> Deferred[None]:
        """
        Fires once every request recorded so far went through the writer
        (written, or lost to a failure).  Waits for room in the queue.
        """
        marker = _Flush()
        if self._thread is None or self._writer_done:
            marker.done.callback(None)
        else:
            self._queue.put(marker)
        return marker.done

    # -- the reactor's share: one put ------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.kind != events.REQUEST_FINISHED:
            return
        try:
            self._queue.put_nowait((self._wall_clock(), event.data))
        except queue.Full:
            self.dropped += 1

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        call = self._reactor.callFromThread
        try:
            writer = _WriterState(self, self._make_database(self.path))
            writer.ready()
            while True:
                batch = self._gather()
                records = [item for item in batch if isinstance(item, tuple)]
                if records:
                    writer.write(records)
                for item in batch:
                    if isinstance(item, _Flush):
                        call(item.done.callback, None)
                if any(item is _STOP for item in batch) or (self._stop_flag.is_set() and self._queue.empty()):
                    break
            writer.database.close()
        except Exception:
            call(self._log.failure, "the usage history writer stopped", Failure())
        finally:
            # Always, or a stop would wait for its bound every time.
            call(self._writer_ended)

    def _gather(self) -> list[Any]:
        """
        The next batch: what arrives within the write delay of its first
        item, up to BATCH_LIMIT, and at once when a flush or stop comes.
        """
        batch = [self._queue.get()]
        deadline = time.monotonic() + self._write_delay
        while len(batch) < BATCH_LIMIT and isinstance(batch[-1], tuple):
            # Stopping: what is queued goes in full batches, without waiting.
            left = 0.0 if self._stop_flag.is_set() else deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    # -- back in the reactor ------------------------------------------------------------------

    def _seeded(self, slots: list[tuple[Any, ...]]) -> None:
        # Added, not replaced: the writer seeds before its first write, so
        # what the summary holds already (requests a failing database
        # lost) is not in the seed.
        self.available = True
        for account, start, requests, inputs, created, read, out, moves, rebilled, naive in slots:
            totals = Totals(
                requests, inputs or 0, created or 0, read or 0, out or 0, moves or 0, rebilled or 0, naive or 0
            )
            self.summary.add(account, float(start), totals)

    def _recorded(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            totals = Totals.of_row(row)
            self.summary.add(row[3], row[0], totals)
            self.recorded.add(totals)

    def _count_lost(self, count: int) -> None:
        self.lost += count

    def _writer_ended(self) -> None:
        self._writer_done = True
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)

    def _write_failed(self, error: BaseException) -> None:
        self.available = False
        text = str(error) or type(error).__name__
        if "locked" in text:
            text += " (another program holds it)"
        message = f"the usage history {self.path} cannot be written ({text}); requests are served but not recorded"
        self._log.error("{problem}", problem=message)
        if self._problems is not None:
            self._problems.raise_problem(None, HISTORY_PROBLEM, message)

    def _write_recovered(self) -> None:
        self.available = True
        self._log.info("the usage history {path} is written again", path=str(self.path))
        if self._problems is not None:
            self._problems.clear(None, HISTORY_PROBLEM)

    # -- what status shows ------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """
        The status snapshot's C{history} field (fields only ever added).
        """
        result = self.summary.snapshot(now)
        result.update(
            path=str(self.path),
            available=self.available,
            dropped=self.dropped,
            lost=self.lost,
            # The naive figure is an estimate, wherever it is shown.
            naiveIsEstimate=True,
        )
        return result


class _WriterState:
    """
    What the writer thread keeps between batches: the database, the savings
    state (loaded from it once), whether the week's totals were sent, and
    whether the database is failing (one problem per failing spell).
    """

    def __init__(self, service: HistoryService, database: HistoryDatabase) -> None:
        self.service = service
        self.database = database
        self.savings: Savings | None = None
        self.seeded = False
        self.failing = False
        self.last_prune = float("-inf")
        self.call = service._reactor.callFromThread

    def failed(self, error: BaseException) -> None:
        self.database.close()
        if not self.failing:
            self.failing = True
            self.call(self.service._write_failed, error)

    def ready(self) -> bool:
        """
        Open (and migrate) the database, load the savings state, send the
        week's totals, prune old rows when due; after a failure this is
        tried again with the next batch.
        """
        service = self.service
        try:
            self.database.connection()
            if self.savings is None:
                self.savings = Savings(service._switch, self.database.load_state())
            now = service._wall_clock()
            if not self.seeded:
                self.call(service._seeded, self.database.slots(now - (WEEK_DAYS + 1) * DAY))
                self.seeded = True
            if now - self.last_prune >= PRUNE_INTERVAL:
                self.database.prune(now - service.retention_days * DAY)
                self.last_prune = now
        except (sqlite3.Error, HistoryError, OSError) as error:
            self.failed(error)
            return False
        if self.failing:
            self.failing = False
            self.call(service._write_recovered)
        return True

    def write(self, records: list[tuple[float, Mapping[str, Any]]]) -> None:
        service = self.service
        is_ready = self.ready()
        if self.savings is None:
            # The database never answered: the figures start afresh, and
            # still count in the live totals.
            self.savings = Savings(service._switch)
        rows = []
        for wall, data in records:
            measured, naive = self.savings.observe(observed(wall, data))
            rows.append(row_of(wall, data, measured, naive))
        written = False
        if is_ready:
            try:
                self.database.insert(rows, self.savings.to_json())
                written = True
            except (sqlite3.Error, HistoryError, OSError) as error:
                self.failed(error)
        if not written:
            self.call(service._count_lost, len(rows))
        # The live totals count the traffic whether or not it reached disk.
        self.call(service._recorded, rows)


def iter_rows(connection: sqlite3.Connection, since: float, until: float) -> Iterable[sqlite3.Row]:
    connection.row_factory = sqlite3.Row
    return connection.execute(
        f"SELECT {', '.join(COLUMNS)} FROM requests WHERE time >= ? AND time < ? ORDER BY time", (since, until)
    )
