"""
Tests for nextclaude.history: the SQLite usage history written by one
thread from the event stream, with real database files (permissions,
migrations, a full or locked database, a kill mid-write and a restart), and
the live totals the status snapshot shows.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude import events
from nextclaude.events import EventHub
from nextclaude.history import (
    HISTORY_PROBLEM,
    MIGRATIONS,
    SCHEMA_VERSION,
    HistoryDatabase,
    HistoryError,
    HistoryService,
    HistorySummary,
    Totals,
    client_product,
    migrate,
    open_readonly,
)
from nextclaude.problems import Problems

TOP = Path(__file__).resolve().parent.parent
NOW = 1_790_000_000.0


def finished(account: str = "a", session: str = "s:1", read: int = 0, created: int = 20_000, **extra: Any) -> dict[str, Any]:
    """The data of a request-finished event as the proxy emits it."""
    data: dict[str, Any] = {
        "id": 1,
        "method": "POST",
        "path": "/v1/messages",
        "account": account,
        "status": 200,
        "reason": "affinity",
        "ok": True,
        "duration": 1.5,
        "usage": {
            "input_tokens": 10,
            "output_tokens": 300,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
            "cache_creation_5m": created,
            "cache_creation_1h": 0,
        },
        "session": session,
        "model": "claude-sonnet-4-5-20250929",
        "client": "claude-cli",
        "side": False,
        "compaction": False,
        "continuation": False,
        "ttl": 300.0,
        "moved": False,
        "utilization": 0.1,
        "reset": NOW + 18_000,
    }
    data.update(extra)
    return data


def rows(path: Path) -> list[sqlite3.Row]:
    connection = open_readonly(path)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute("SELECT * FROM requests ORDER BY id").fetchall()
    finally:
        connection.close()


class ClientTests(SynchronousTestCase):
    def test_product_tokens(self) -> None:
        """
        The client is the user agent's product token for known products
        (Claude Code, the SDKs, curl), else "other"; no agent is "other".
        """
        cases = {
            "claude-cli/2.1.14 (external, cli)": "claude-cli",
            b"claude-cli/1.0.0": "claude-cli",
            "Anthropic/Python 0.40.0": "anthropic-python",
            "Anthropic/JS 0.30.1": "anthropic-js",
            "curl/8.5.0": "curl",
            "Mozilla/5.0 (X11)": "other",
            "": "other",
            None: "other",
        }
        for agent, expected in cases.items():
            self.assertEqual(client_product(agent), expected, agent)


class SchemaTests(SynchronousTestCase):
    def test_fresh_database_is_migrated_and_private(self) -> None:
        """
        A new database gets the current schema version, WAL mode, and mode
        0600 for the file and its -wal and -shm.
        """
        path = Path(self.mktemp()) / "history.sqlite3"
        database = HistoryDatabase(path)
        database.insert([])
        connection = database.connection()
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        for suffix in ("", "-wal", "-shm"):
            self.assertEqual(os.stat(f"{path}{suffix}").st_mode & 0o777, 0o600, suffix)
        database.close()

    def test_migration_adds_to_existing_rows(self) -> None:
        """
        A later migration runs once on a database at the earlier version,
        keeping its rows; running again changes nothing.
        """
        path = Path(self.mktemp()) / "history.sqlite3"
        database = HistoryDatabase(path)
        database.insert([(NOW, "s:1", "claude-cli", "a", "m", 200, "affinity", 1.0, 1, 2, 0, 3, 4, 300.0, 1, 0, 0, 0)])
        database.close()
        later = [*MIGRATIONS, "ALTER TABLE requests ADD COLUMN note TEXT"]
        upgraded = HistoryDatabase(path, migrations=later)
        connection = upgraded.connection()
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], len(later))
        self.assertEqual(connection.execute("SELECT input_tokens, note FROM requests").fetchall(), [(1, None)])
        self.assertEqual(migrate(connection, later), len(later))
        upgraded.close()

    def test_newer_schema_is_refused(self) -> None:
        """
        A database from a newer NextClaude is neither written nor read:
        both sides say so instead of guessing its layout.
        """
        path = Path(self.mktemp()) / "history.sqlite3"
        path.parent.mkdir()
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        connection.close()
        self.assertRaises(HistoryError, HistoryDatabase(path).connection)
        self.assertRaises(HistoryError, open_readonly, path)

    def test_reading_changes_no_file(self) -> None:
        """
        The read-only opening of a cleanly closed database creates no -wal
        or -shm and changes nothing.
        """
        path = Path(self.mktemp()) / "history.sqlite3"
        database = HistoryDatabase(path)
        database.insert([(NOW, None, "other", None, None, 429, "exhausted", 0.1, 0, 0, 0, 0, 0, None, 0, 0, 0, 0)])
        database.close()
        before = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()}
        self.assertEqual(len(rows(path)), 1)
        after = {p.name: p.stat().st_mtime_ns for p in path.parent.iterdir()}
        self.assertEqual(after, before)


class SummaryTests(SynchronousTestCase):
    def test_today_week_and_hours(self) -> None:
        """
        The live totals split by local day (today, the last seven days) and
        give each account 24 hourly usage figures (in + ✎ + out), the
        current hour last; older slots fall out of the week.
        """
        summary = HistorySummary(localtime=time.gmtime)
        now = 20_718 * 86400.0 + 8.5 * 3600  # 08:30 UTC
        summary.add("a", now - 60, Totals(1, 10, 100, 1000, 5, 1, 40, 400))
        summary.add("a", now - 3 * 3600, Totals(1, 0, 50, 0, 0))
        summary.add("b", now - 2 * 86400, Totals(1, 0, 7, 0, 0, 0, 3, 9))
        summary.add("b", now - 9 * 86400, Totals(1, 0, 1000, 0, 0))
        snapshot = summary.snapshot(now)
        self.assertEqual(snapshot["today"]["requests"], 2)
        self.assertEqual(snapshot["today"]["rebilled"], 40)
        self.assertEqual(snapshot["today"]["saved"], 360)
        self.assertEqual(snapshot["week"]["requests"], 3)
        self.assertEqual(snapshot["week"]["naiveEstimate"], 409)
        accounts = {a["name"]: a for a in snapshot["accounts"]}
        self.assertEqual(accounts["a"]["hourly"][-1], 115)
        self.assertEqual(accounts["a"]["hourly"][-4], 50)
        self.assertEqual(sum(accounts["b"]["hourly"]), 0)
        self.assertEqual(accounts["b"]["week"]["requests"], 1)


class Blocking(HistoryDatabase):
    """A database whose opening waits for an event the test sets."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(path)
        self.gate = gate

    def connection(self) -> sqlite3.Connection:
        self.gate.wait(30)
        return super().connection()


class Failing(HistoryDatabase):
    """A database whose writes fail while C{error} is set."""

    error: BaseException | None = None

    def insert(self, rows: Any, state: Any = None) -> None:
        if self.error is not None:
            raise self.error
        super().insert(rows, state)


class ServiceTests(TestCase):
    def make(self, path: Path | None = None, **options: Any) -> tuple[HistoryService, EventHub, Problems]:
        hub = EventHub()
        problems = Problems(hub, lambda: NOW)
        path = path or Path(self.mktemp()) / "history.sqlite3"
        clock = iter(range(10**6))
        service = HistoryService(
            reactor,
            path,
            hub,
            problems=problems,
            wall_clock=options.pop("wall_clock", lambda: NOW + next(clock)),
            localtime=time.gmtime,
            **options,
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, hub, problems

    async def test_requests_are_recorded(self) -> None:
        """
        Finished requests (and only those) become rows with their session,
        client, account, model, status, reason, duration and tokens; a move
        of the main thread is marked and its re-billed tokens counted, and
        the live totals match.
        """
        service, hub, _ = self.make()
        hub.emit(events.REQUEST_STARTED, 0.0, id=1)
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(read=0, created=20_000))
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(read=20_000, created=3_000))
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(account="b", read=0, created=26_000, moved=True))
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(account=None, status=429, reason="exhausted", usage=None))
        await service.flushed()
        recorded = rows(service.path)
        self.assertEqual(len(recorded), 4)
        first = recorded[0]
        self.assertEqual(
            (first["session"], first["client"], first["account"], first["model"], first["status"], first["reason"]),
            ("s:1", "claude-cli", "a", "claude-sonnet-4-5-20250929", 200, "affinity"),
        )
        self.assertEqual((first["input_tokens"], first["cache_creation_tokens"], first["output_tokens"]), (10, 20_000, 300))
        self.assertEqual([r["moved"] for r in recorded], [0, 0, 1, 0])
        self.assertEqual([r["rebilled"] for r in recorded], [0, 0, 23_000, 0])
        self.assertEqual(recorded[3]["account"], None)
        today = service.snapshot(NOW + 10)["today"]
        self.assertEqual((today["requests"], today["moves"], today["rebilled"]), (4, 1, 23_000))
        await service.stopService()

    async def test_requests_are_written_in_batches(self) -> None:
        """
        Requests that finish within the write delay go to the database in
        one transaction, and a flush writes them at once rather than after
        the delay (60 s here: the test would time out).
        """
        inserts: list[int] = []

        class Counting(HistoryDatabase):
            def insert(self, rows: Any, state: Any = None) -> None:
                inserts.append(len(rows))
                super().insert(rows, state)

        service, hub, _ = self.make(make_database=Counting, write_delay=60.0)
        for _ in range(3):
            hub.emit(events.REQUEST_FINISHED, 0.0, **finished())
        await service.flushed()
        self.assertEqual(inserts, [3])
        self.assertEqual(len(rows(service.path)), 3)
        self.assertEqual(service.snapshot(NOW + 10)["today"]["requests"], 3)
        # A stop, too, writes what waits without the delay.
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished())
        await service.stopService()
        self.assertEqual(inserts, [3, 1])

    def test_a_stop_writes_the_backlog_in_full_batches(self) -> None:
        """
        Once stopping, what is queued is taken without waiting and still in
        batches of up to BATCH_LIMIT, not one commit per request.
        """
        from nextclaude.history import BATCH_LIMIT

        service = HistoryService(reactor, Path(self.mktemp()) / "history.sqlite3", EventHub(), write_delay=60.0)
        for index in range(BATCH_LIMIT + 20):
            service._queue.put_nowait((NOW + index, {}))
        service._stop_flag.set()
        sizes = [len(service._gather()), len(service._gather())]
        self.assertEqual(sizes, [BATCH_LIMIT, 20])

    async def test_restart_keeps_totals_and_savings_state(self) -> None:
        """
        After a restart the week's totals come back from the database, and
        the savings state too: a session's move right after it is measured
        against its prompt from before the restart.
        """
        service, hub, _ = self.make()
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(read=0, created=20_000))
        await service.flushed()
        await service.stopService()
        again, hub, _ = self.make(service.path, wall_clock=lambda: NOW + 100)
        await again.flushed()
        self.assertEqual(again.snapshot(NOW + 100)["today"]["requests"], 1)
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(account="b", read=0, created=23_000, moved=True))
        await again.flushed()
        self.assertEqual(rows(again.path)[-1]["rebilled"], 20_000)
        self.assertEqual(again.snapshot(NOW + 100)["today"]["rebilled"], 20_000)
        await again.stopService()

    async def test_retention(self) -> None:
        """
        Rows older than history.retentionDays are deleted when the writer
        starts.
        """
        service, hub, _ = self.make(wall_clock=lambda: NOW - 40 * 86400)
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished())
        await service.flushed()
        await service.stopService()
        again, _, _ = self.make(service.path, wall_clock=lambda: NOW, retention_days=30)
        await again.flushed()
        self.assertEqual(rows(again.path), [])
        await again.stopService()

    async def test_full_disk_is_a_problem_until_it_passes(self) -> None:
        """
        A write that fails (SQLite's "database or disk is full") raises one
        history problem and loses that batch, counted; requests are not
        held up.  The next write that works clears the problem.
        """
        databases: list[Failing] = []

        def make_database(path: Path) -> Failing:
            databases.append(Failing(path))
            return databases[-1]

        service, hub, problems = self.make(make_database=make_database)
        await service.flushed()
        databases[0].error = sqlite3.OperationalError("database or disk is full")
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished())
        await service.flushed()
        self.assertTrue(problems.active(None, HISTORY_PROBLEM))
        self.assertIn("disk is full", problems.snapshot()[0]["message"])
        self.assertEqual(service.lost, 1)
        # Still counted live: the traffic happened.
        self.assertEqual(service.snapshot(NOW)["today"]["requests"], 1)
        databases[0].error = None
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(read=20_000, created=3_000))
        await service.flushed()
        self.assertFalse(problems.active(None, HISTORY_PROBLEM))
        self.assertEqual(len(rows(service.path)), 1)
        await service.stopService()

    async def test_locked_database_is_a_problem(self) -> None:
        """
        Another program holding the database's write lock past the busy
        timeout makes a history problem naming the lock; once released,
        the next write goes through and clears it.
        """
        path = Path(self.mktemp()) / "history.sqlite3"
        HistoryDatabase(path).connection().close()
        service, hub, problems = self.make(path, make_database=lambda p: HistoryDatabase(p, busy_timeout=0.01))
        await service.flushed()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished())
        await service.flushed()
        self.assertTrue(problems.active(None, HISTORY_PROBLEM))
        self.assertIn("locked", problems.snapshot()[0]["message"])
        other.execute("ROLLBACK")
        other.close()
        hub.emit(events.REQUEST_FINISHED, 0.0, **finished(read=20_000, created=3_000))
        await service.flushed()
        self.assertFalse(problems.active(None, HISTORY_PROBLEM))
        await service.stopService()

    async def test_full_queue_drops_and_counts(self) -> None:
        """
        While the writer is stuck, requests past the queue's limit are
        dropped and counted, never waited for; the stop gives up on the
        writer after its bound (on the test's clock) and still completes.
        """
        gate = threading.Event()
        self.addCleanup(gate.set)
        clock = Clock()
        service, hub, _ = self.make(
            make_database=lambda path: Blocking(path, gate), queue_limit=3, clock=clock, stop_timeout=6.0
        )
        for _ in range(10):
            hub.emit(events.REQUEST_FINISHED, 0.0, **finished())
        self.assertEqual(service.dropped, 7)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        clock.advance(6.0)
        self.successResultOf(stopped)
        gate.set()

    async def test_writer_end_is_signalled_after_a_bug(self) -> None:
        """
        A writer that dies of a bug still signals its end: the stop
        completes at once, without waiting for its bound.
        """

        def broken(path: Path) -> HistoryDatabase:
            raise RuntimeError("a bug")

        clock = Clock()
        service, _, _ = self.make(make_database=broken, clock=clock)
        # The writer's end arrives through the reactor's queue of calls
        # from threads; each turn lets one batch of them run.
        while not service._writer_done:
            await _turn()
        self.assertIsNone(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
        self.flushLoggedErrors(RuntimeError)


def _turn() -> Deferred[None]:
    waiter: Deferred[None] = Deferred()
    reactor.callLater(0, waiter.callback, None)
    return waiter


WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {top!r})
from nextclaude.history import HistoryDatabase
database = HistoryDatabase(Path({path!r}))
batch = 0
while True:
    rows = [(1.0e9 + batch, "s:1", "claude-cli", "a", "m", 200, "affinity", 1.0, 1, 2, 0, 3, 4, 300.0, 1, 0, 0, 0)] * 200
    database.insert(rows, {{"batch": batch}})
    batch += 1
    print("committed", batch, flush=True)
"""


class _Lines(ProcessProtocol):
    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.output = b""
        self.enough: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if self.output.count(b"committed") >= self.wanted and not self.enough.called:
            self.enough.callback(None)

    def processEnded(self, reason: Any) -> None:
        if not self.enough.called:
            self.enough.errback(reason)
        self.ended.callback(None)


class KillTests(TestCase):
    async def test_kill_mid_write_then_restart(self) -> None:
        """
        A writer killed with SIGKILL while committing batch after batch
        leaves a database that passes SQLite's integrity check, holds whole
        batches only (each batch and its state in one transaction), and
        takes new writes after a restart.
        """
        path = Path(self.mktemp()).absolute() / "history.sqlite3"
        path.parent.mkdir()
        script = WRITER.format(top=str(TOP), path=str(path))
        lines = _Lines(wanted=5)
        process = reactor.spawnProcess(lines, sys.executable, [sys.executable, "-c", script], env=os.environ.copy())
        await lines.enough
        process.signalProcess(signal.SIGKILL)
        await lines.ended
        committed = lines.output.count(b"committed")
        database = HistoryDatabase(path)
        connection = database.connection()
        self.assertEqual(connection.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        count = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        self.assertEqual(count % 200, 0)
        self.assertGreaterEqual(count // 200, committed)
        # The state row is the one of the last whole batch.
        self.assertEqual(database.load_state(), {"batch": count // 200 - 1})
        database.insert([(2.0e9, None, "other", None, None, 200, None, 0.1, 0, 0, 0, 0, 0, None, 0, 0, 0, 0)])
        self.assertEqual(connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0], count + 1)
        database.close()
