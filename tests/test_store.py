"""Tests for L{nextclaude.store}."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nextclaude import store
from nextclaude.store import JsonStore, StoreError, atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Boom(Exception):
    """Raised by the failure injections below."""


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        # umask 0: any restrictive mode we observe is the code's doing.
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "data.json"
        self.lock = self.dir / "data.lock"

    def store(self) -> JsonStore:
        return JsonStore(self.path, self.lock)

    def leftovers(self) -> list[str]:
        """Files in the directory other than the data and lock files."""
        return sorted(p.name for p in self.dir.iterdir() if p not in (self.path, self.lock))


class AtomicWriteTests(StoreTestCase):
    def test_creates_with_mode(self) -> None:
        """A new file gets exactly the requested mode (0600 by default), whatever the umask."""
        atomic_write(self.path, b"one")
        self.assertEqual((self.path.read_bytes(), _mode(self.path)), (b"one", 0o600))
        other = self.dir / "other"
        atomic_write(other, b"two", mode=0o640)
        self.assertEqual(_mode(other), 0o640)

    def test_replaces_and_tightens(self) -> None:
        """Replacing a world-readable file leaves the new content at 0600 and no temp file."""
        self.path.write_bytes(b"old")
        os.chmod(self.path, 0o644)
        atomic_write(self.path, b"new" * 100000)
        self.assertEqual(self.path.read_bytes(), b"new" * 100000)
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(self.leftovers(), [])

    def test_temp_file_private_before_any_byte(self) -> None:
        """The temporary file is already 0600 when the first byte of the secret is written."""
        modes: list[int] = []
        real_write = os.write

        def spying_write(fd: int, data: Any) -> int:
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
            return real_write(fd, data)

        self.patch(os, "write", spying_write)
        atomic_write(self.path, b"secret")
        self.assertTrue(modes)
        self.assertEqual(set(modes), {0o600})

    def test_failure_keeps_old_file(self) -> None:
        """If writing, fsync or the rename fails, the old file is intact and the temp file is gone."""
        for name in ("write", "fsync", "replace"):
            self.path.write_bytes(b"old")

            def fail(*args: Any, **kwargs: Any) -> Any:
                raise Boom(name)

            real = getattr(os, name)
            self.patch(os, name, fail)
            try:
                self.assertRaises(Boom, atomic_write, self.path, b"new")
            finally:
                setattr(os, name, real)
            self.assertEqual(self.path.read_bytes(), b"old", name)
            self.assertEqual(self.leftovers(), [], name)

    def test_directory_fsync_failure_is_not_reported(self) -> None:
        """Once the new file is in place, a failing directory fsync does not claim the write failed."""
        calls: list[int] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(22, "Invalid argument")
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        atomic_write(self.path, b"new")
        self.assertEqual(len(calls), 2)
        self.assertEqual(self.path.read_bytes(), b"new")

    def test_writes_through_symlink(self) -> None:
        """A symlinked file (a dotfile manager's) has its target updated and stays a symlink."""
        target = self.dir / "real.json"
        target.write_bytes(b"old")
        os.symlink(target.name, self.path)  # relative, as dotfile managers often make them
        atomic_write(self.path, b"new")
        self.assertTrue(self.path.is_symlink())
        self.assertEqual(target.read_bytes(), b"new")


class ReadTests(StoreTestCase):
    def test_missing(self) -> None:
        """A file that does not exist reads as None."""
        self.assertIsNone(self.store().read())

    def test_object(self) -> None:
        """A JSON object reads as a dict; a UTF-8 byte-order mark is tolerated."""
        self.path.write_bytes(b'{"a": [1, "\xc3\xa9"]}')
        self.assertEqual(self.store().read(), {"a": [1, "é"]})
        self.path.write_bytes(b'\xef\xbb\xbf{"b": 2}')
        self.assertEqual(self.store().read(), {"b": 2})

    def test_broken(self) -> None:
        """Each kind of broken file is a StoreError naming the file and the problem."""
        cases = [
            # (content, words the problem must contain)
            (b'{\n  "a": 1,\n  "b" 2\n}', "invalid JSON at line 3, column 7"),
            (b"[1, 2]", "top level must be a JSON object, not an array"),
            (b'"text"', "top level must be a JSON object, not a string"),
            (b"", "is empty"),
            (b"  \n", "is empty"),
            (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
            (b'{"a": NaN}', "NaN is not valid JSON"),
            (b'{"a": "\xff"}', "not UTF-8"),
        ]
        for content, expected in cases:
            self.path.write_bytes(content)
            error = self.assertRaises(StoreError, self.store().read)
            self.assertEqual(error.path, self.path)
            self.assertIn(expected, error.problem, content)
            self.assertEqual(str(error), f"{self.path}: {error.problem}")

    def test_unreadable(self) -> None:
        """A path that cannot be read (here a directory) is a StoreError, not None."""
        self.path.mkdir()
        error = self.assertRaises(StoreError, self.store().read)
        self.assertIn("cannot be read", error.problem)

    def test_secret_not_in_error(self) -> None:
        """A JSON error reports a position, never the document's text."""
        self.path.write_bytes(b'{"accessToken": "sk-ant-oat01-SECRET" oops}')
        error = self.assertRaises(StoreError, self.store().read)
        self.assertNotIn("SECRET", str(error))


class UpdateTests(StoreTestCase):
    def test_create(self) -> None:
        """A missing file starts as create() and the operation's value is returned."""

        def operation(data: dict[str, Any]) -> str:
            data["added"] = True
            return "result"

        self.assertEqual(self.store().update(operation, create=lambda: {"initial": 1}), "result")
        self.assertEqual(json.loads(self.path.read_bytes()), {"initial": 1, "added": True})

    def test_create_makes_private_directory(self) -> None:
        """Creating a file in a missing directory makes that directory 0700."""
        nested = JsonStore(self.dir / "new" / "data.json", self.dir / "new" / "data.lock")
        nested.update(lambda data: None, create=dict)
        self.assertEqual(_mode(self.dir / "new"), 0o700)
        self.assertEqual(json.loads((self.dir / "new" / "data.json").read_bytes()), {})

    def test_missing_without_create(self) -> None:
        """Without create() a missing file is a StoreError and the operation never runs."""
        calls: list[dict[str, Any]] = []
        error = self.assertRaises(StoreError, self.store().update, calls.append)
        self.assertEqual((error.problem, calls), ("does not exist", []))
        self.assertFalse(self.path.exists())

    def test_modes(self) -> None:
        """Data and lock files are 0600 after creation and after an update, even from a 0644 file."""
        self.store().update(lambda data: data.update(a=1), create=dict)
        self.assertEqual((_mode(self.path), _mode(self.lock)), (0o600, 0o600))
        os.chmod(self.path, 0o644)
        self.store().update(lambda data: data.update(a=2))
        self.assertEqual(_mode(self.path), 0o600)

    def test_operation_raises(self) -> None:
        """If the operation raises, the file is untouched and the lock is released."""
        self.path.write_bytes(b'{"a": 1}')

        def operation(data: dict[str, Any]) -> None:
            data["a"] = 2
            raise Boom()

        self.assertRaises(Boom, self.store().update, operation)
        self.assertEqual(self.path.read_bytes(), b'{"a": 1}')
        self.assertLockFree()

    def test_unserialisable_result(self) -> None:
        """An operation leaving something JSON cannot hold writes nothing."""
        self.path.write_bytes(b'{"a": 1}')
        for bad in (object(), float("nan")):
            self.assertRaises(
                (TypeError, ValueError), self.store().update, lambda data: data.update(a=bad)
            )
            self.assertEqual(self.path.read_bytes(), b'{"a": 1}')
        self.assertEqual(self.leftovers(), [])

    def test_broken_file_never_overwritten(self) -> None:
        """A broken file raises StoreError before the operation runs and keeps its bytes."""
        for content in (b"{oops", b"[]", b""):
            self.path.write_bytes(content)
            calls: list[dict[str, Any]] = []
            self.assertRaises(StoreError, self.store().update, calls.append, create=dict)
            self.assertEqual((self.path.read_bytes(), calls), (content, []))

    def test_no_change_no_write(self) -> None:
        """An operation that changes nothing leaves the file itself (inode and bytes) alone."""
        self.path.write_bytes(b'{"a":1}')
        before = os.stat(self.path).st_ino
        self.store().update(lambda data: data.get("a"))
        self.assertEqual(os.stat(self.path).st_ino, before)
        self.assertEqual(self.path.read_bytes(), b'{"a":1}')

    def test_crash_during_write(self) -> None:
        """A failing rename inside update leaves the old file and no temp file."""
        self.path.write_bytes(b'{"a": 1}')

        def fail(*args: Any) -> None:
            raise Boom()

        self.patch(os, "replace", fail)
        self.assertRaises(Boom, self.store().update, lambda data: data.update(a=2))
        self.assertEqual(self.path.read_bytes(), b'{"a": 1}')
        self.assertEqual(self.leftovers(), [])
        self.assertLockFree()

    def test_two_stores_never_lose_keys(self) -> None:
        """Interleaved updates through two store objects each see the other's writes."""
        first, second = self.store(), self.store()
        first.update(lambda data: data.update(a=1), create=dict)
        second.update(lambda data: data.update(b=2), create=dict)
        first.update(lambda data: data.update(c=3))
        second.update(lambda data: data.pop("a"))
        self.assertEqual(first.read(), {"b": 2, "c": 3})

    def test_update_inside_update_refused(self) -> None:
        """An update started inside another update's operation is refused, not silently lost."""
        self.path.write_bytes(b"{}")
        first, second = self.store(), self.store()

        def outer(data: dict[str, Any]) -> None:
            data["outer"] = True
            second.update(lambda inner: inner.update(inner=True))

        self.assertRaises(RuntimeError, first.update, outer)
        self.assertEqual(self.path.read_bytes(), b"{}")

    def test_other_file_inside_update(self) -> None:
        """An update of a different file that shares the lock may run inside an operation."""
        other = JsonStore(self.dir / "other.json", self.lock)

        def outer(data: dict[str, Any]) -> None:
            data["outer"] = True
            other.update(lambda inner: inner.update(inner=True), create=dict)

        self.store().update(outer, create=dict)
        self.assertEqual((self.store().read(), other.read()), ({"outer": True}, {"inner": True}))

    def test_update_inside_locked(self) -> None:
        """update() works while the same thread holds locked(), and the lock is released after."""
        with self.store().locked():
            self.store().update(lambda data: data.update(a=1), create=dict)
            self.store().update(lambda data: data.update(b=2))
        self.assertEqual(self.store().read(), {"a": 1, "b": 2})
        self.assertLockFree()

    def assertLockFree(self) -> None:
        """No one holds the lock: a non-blocking flock on a fresh descriptor succeeds."""
        fd = os.open(self.lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class ProcessExclusionTests(StoreTestCase):
    """The lock is a real flock that excludes other processes."""

    def fork(self, child: Any) -> tuple[int, int]:
        """Run child(write_fd) in a forked process; returns (pid, read end of its pipe)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                child(write_end)
                code = 0
            finally:
                # Never return into trial's loop in the child.
                os._exit(code)
        os.close(write_end)
        self.addCleanup(os.close, read_end)
        return pid, read_end

    def wait(self, pid: int) -> None:
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)

    def test_concurrent_process_waits_and_sees_write(self) -> None:
        """While one process's operation runs, another cannot lock; once it is done, the
        other process's update applies on top of the first one's result."""
        store_path, lock_path = self.path, self.lock
        self.path.write_bytes(b'{"before": true}')

        def child(out: int) -> None:
            fd = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(out, b"got the lock\n")
            except BlockingIOError:
                os.write(out, b"locked out\n")
            finally:
                os.close(fd)
            # Blocks until the parent's update has finished writing.
            JsonStore(store_path, lock_path).update(lambda data: data.update(child=True))

        reports: list[bytes] = []
        pids: list[int] = []

        def operation(data: dict[str, Any]) -> None:
            pid, read_end = self.fork(child)
            pids.append(pid)
            # The child reports only after trying the lock, so this read
            # orders the test without any sleeping.
            reports.append(os.read(read_end, 100))
            data["parent"] = True

        self.store().update(operation)
        self.wait(pids[0])
        self.assertEqual(reports, [b"locked out\n"])
        self.assertEqual(self.store().read(), {"before": True, "parent": True, "child": True})

    def test_locked_excludes_other_process(self) -> None:
        """locked() holds the same lock update() takes, as seen from another process."""
        lock_path = self.lock

        def child(out: int) -> None:
            fd = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.write(out, b"free")
            except BlockingIOError:
                os.write(out, b"held")
            finally:
                os.close(fd)

        results = []
        for holding in (True, False):
            if holding:
                with self.store().locked():
                    pid, read_end = self.fork(child)
                    results.append(os.read(read_end, 10))
            else:
                pid, read_end = self.fork(child)
                results.append(os.read(read_end, 10))
            self.wait(pid)
        self.assertEqual(results, [b"held", b"free"])

    def test_forked_child_does_not_inherit_reentrancy(self) -> None:
        """A child forked while the parent holds the lock must wait for it like anyone else."""
        store_path, lock_path = self.path, self.lock
        self.path.write_bytes(b"{}")

        def child(out: int) -> None:
            os.write(out, b"started")
            JsonStore(store_path, lock_path).update(lambda data: data.update(child=len(data)))

        with self.store().locked():
            pid, read_end = self.fork(child)
            os.read(read_end, 10)
            # If the child wrongly believed it held the lock it could have
            # written by now; this write would then be clobbered or clobber it.
            self.store().update(lambda data: data.update(parent=True))
        self.wait(pid)
        self.assertEqual(self.store().read(), {"parent": True, "child": 1})


class ReentrancyBookkeepingTests(StoreTestCase):
    def test_nothing_left_held(self) -> None:
        """After locks are released, nothing remains in the held-locks table."""
        before = dict(store._held)
        with self.store().locked():
            with self.store().locked():
                pass
        self.store().update(lambda data: None, create=dict)
        self.assertEqual(store._held, before)


class StaleTempTests(StoreTestCase):
    """Temp files of atomic_write's naming that a killed writer left behind (issue 10, item 13)."""

    def make(self, name: str, age: float = 0.0) -> Path:
        path = self.dir / name
        path.write_text('{"refreshToken": "sk-ant-ort01-secret"}')
        when = os.stat(path).st_mtime - age
        os.utime(path, (when, when))
        return path

    def test_only_our_exact_names(self) -> None:
        """Only `.<file>.<12 hex>.tmp` of this one file is removed; other files' temps, near misses, the file
        itself, recovery files and their temps, directories and symlinks stay."""
        self.path.write_text("{}")
        ours = [self.make(".data.json.0123456789ab.tmp"), self.make(".data.json.ffffffffffff.tmp")]
        kept = [
            ".data.json.0123456789AB.tmp",  # not what token_hex makes
            ".data.json.0123456789a.tmp",
            ".data.json.tmp",
            "data.json.0123456789ab.tmp",
            ".data.json.0123456789ab.tmp.bak",
            ".other.json.0123456789ab.tmp",
            ".recovery-a.json.0123456789ab.tmp",
            "recovery-a.json",
            "data.json.bak",
        ]
        for name in kept:
            self.make(name)
        (self.dir / ".data.json.aaaaaaaaaaaa.tmp").mkdir()
        (self.dir / ".data.json.bbbbbbbbbbbb.tmp").symlink_to(self.path)
        removed = store.remove_stale_temps(self.path)
        self.assertEqual(sorted(p.name for p in removed), sorted(p.name for p in ours))
        self.assertEqual(
            self.leftovers(), sorted(kept + [".data.json.aaaaaaaaaaaa.tmp", ".data.json.bbbbbbbbbbbb.tmp"])
        )
        self.assertEqual(self.path.read_text(), "{}")

    def test_age_threshold(self) -> None:
        """With a minimum age, only temp files last modified at least that long ago are removed."""
        old = self.make(".data.json.000000000001.tmp", age=601)
        self.make(".data.json.000000000002.tmp", age=540)
        self.make(".data.json.000000000003.tmp", age=0)
        self.assertEqual([p.name for p in store.remove_stale_temps(self.path, older_than=600)], [old.name])
        self.assertEqual(self.leftovers(), [".data.json.000000000002.tmp", ".data.json.000000000003.tmp"])

    def test_through_symlink(self) -> None:
        """For a symlinked file the temps beside its target (where atomic_write puts them) are removed."""
        real = self.dir / "real"
        real.mkdir()
        (real / "data.json").write_text("{}")
        self.path.symlink_to((real / "data.json").absolute())
        temp = real / ".data.json.0123456789ab.tmp"
        temp.write_text("{}")
        self.assertEqual(store.remove_stale_temps(self.path), [Path(os.path.realpath(temp))])
        self.assertFalse(temp.exists())

    def test_update_removes_them_under_the_lock(self) -> None:
        """Every locked write removes its file's orphaned temps, however young (under the lock no writer of
        this file can be mid-write); other files' temps are left for their own writes."""
        self.path.write_text("{}")
        self.make(".data.json.0123456789ab.tmp")
        other = self.make(".state.json.0123456789ab.tmp")
        self.store().update(lambda data: data.update(x=1))
        self.assertEqual(self.leftovers(), [other.name])
        self.assertEqual([p.name for p in JsonStore(self.dir / "state.json", self.lock).remove_stale_temps()], [other.name])
        self.assertEqual(self.leftovers(), [])

    def test_missing_directory(self) -> None:
        """A directory that does not exist has nothing to remove."""
        self.assertEqual(store.remove_stale_temps(self.dir / "nowhere" / "data.json"), [])


class LockTimeoutTests(StoreTestCase):
    def hold(self) -> None:
        # Another open file description on the lock: to flock, another process.
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)

    def fake_time(self) -> list[float]:
        now = [100.0]
        self.patch(store, "_monotonic", lambda: now[0])
        self.patch(store, "_sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
        return now

    def test_gives_up_after_timeout(self) -> None:
        """With a timeout, a lock another holder keeps raises LockTimeout (a StoreError naming the lock file)
        once that much time has passed, and the lock is not left half-taken."""
        self.hold()
        for timeout in (0.0, 0.2, 3.0):
            now = self.fake_time()
            start = now[0]
            with self.assertRaises(store.LockTimeout) as caught:
                with self.store().locked(timeout=timeout):
                    self.fail("got the lock")
            self.assertIsInstance(caught.exception, StoreError)
            self.assertEqual(caught.exception.path, self.lock)
            self.assertGreaterEqual(now[0] - start, timeout)
            self.assertLess(now[0] - start, timeout + store.LOCK_POLL + 1e-9)
        self.assertEqual(store._held, {})

    def test_free_lock_taken_at_once(self) -> None:
        """A free lock is taken without waiting, and re-entrantly inside."""
        now = self.fake_time()
        with self.store().locked(timeout=1.0):
            self.store().update(lambda data: data.update(x=1), create=dict)
        self.assertEqual(now[0], 100.0)
        self.assertEqual(json.loads(self.path.read_text()), {"x": 1})

    def test_waits_for_release(self) -> None:
        """A lock released while waiting is taken before the timeout."""
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        now = [0.0]
        self.patch(store, "_monotonic", lambda: now[0])

        def sleep(seconds: float) -> None:
            now[0] += seconds
            if now[0] >= 1.0:
                fcntl.flock(fd, fcntl.LOCK_UN)

        self.patch(store, "_sleep", sleep)
        with self.store().locked(timeout=5.0):
            pass
        self.assertGreaterEqual(now[0], 1.0)
        self.assertLess(now[0], 2.0)
