"""Locked, atomic JSON files.

Several processes write the same files: the running proxy (token refreshes,
quota state) and one-shot commands such as ``nextclaude import``. Whole-object
overwrites from a stale copy would silently drop the other writer's change,
so every write is one *operation* applied, under an exclusive lock, to the
content as it is on disk right now.

Plain blocking code, called from the edges; no reactor here.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nextclaude.paths import FileProblem, ensure_private_dir

T = TypeVar("T")

# Patched by tests, so a lock wait with a timeout needs no real sleeping.
_monotonic = time.monotonic
_sleep = time.sleep
LOCK_POLL = 0.05


def temp_name(target_name: str) -> str:
    """The name ``atomic_write`` gives the temporary file it renames over ``target_name``."""
    return f".{target_name}.{secrets.token_hex(6)}.tmp"


def is_temp_of(entry_name: str, target_name: str) -> bool:
    """Whether ``entry_name`` is exactly what ``temp_name(target_name)`` makes, and nothing else."""
    return re.fullmatch(rf"\.{re.escape(target_name)}\.[0-9a-f]{{12}}\.tmp", entry_name) is not None


def remove_stale_temps(path: Path, older_than: float = 0.0, now: float | None = None) -> list[Path]:
    """Delete the temporary files an interrupted ``atomic_write`` of ``path`` left behind.

    A kill between creating the temp file and renaming it leaves a private
    copy of the file (tokens included) nobody will ever read. Only names of
    our exact pattern for this one file are touched, only regular files, and
    only those last modified ``older_than`` seconds or more before ``now``:
    a caller that cannot exclude a concurrent writer (no shared lock) passes
    a margin longer than any write takes. Returns what was removed; a file
    that cannot be examined or removed is skipped.
    """
    target = Path(os.path.realpath(path))
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    if now is None:
        now = time.time()
    removed: list[Path] = []
    for name in names:
        if not is_temp_of(name, target.name):
            continue
        candidate = target.parent / name
        try:
            info = os.lstat(candidate)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < older_than:
                continue
            os.unlink(candidate)
        except OSError:
            continue
        removed.append(candidate)
    return removed


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix.

    On any failure the temporary file is removed and the previous file is
    untouched.
    """
    # Write through a symlink to its target (dotfile managers link config
    # files); renaming over the link itself would silently detach it.
    target = Path(os.path.realpath(path))
    temp = target.parent / temp_name(target.name)
    # Created 0600 (the umask can only take bits away) so the tokens in it are
    # never readable by others, not even between open() and chmod().
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            # fchmod makes the final mode exact whatever the umask was.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    try:
        _fsync_directory(target.parent)
    except OSError:
        # The new file is already in place and visible. Reporting failure now
        # would make callers believe the change did not happen (and perhaps
        # apply it twice); only durability across a power cut is in doubt.
        pass


class StoreError(FileProblem):
    """A file that exists but cannot be used; it is never overwritten."""


class LockTimeout(StoreError):
    """The lock stayed with another process for longer than the caller could wait."""


def _acquire(fd: int, lock_path: Path, timeout: float | None) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    # Polling: flock has no timed wait, and a stop must never hang on a
    # lock another process keeps.
    deadline = _monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        remaining = deadline - _monotonic()
        if remaining <= 0:
            raise LockTimeout(lock_path, f"is held by another process (gave up after {timeout:g} s)")
        _sleep(min(LOCK_POLL, remaining))


@dataclass
class _Holding:
    fd: int
    depth: int = 0
    # Data files (one lock may guard several) with an operation running.
    operating: set[str] = field(default_factory=set)


# flock belongs to an open file description, so a second open() of the lock
# file in the same thread would wait on itself forever. Locks this thread
# already holds are remembered here, keyed by process too because a forked
# child inherits this dict (and the parent's thread id) but not the lock's
# ownership. Each key is only ever touched by its own thread.
_held: dict[tuple[int, int, str], _Holding] = {}


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys silently; in a hand-edited file
    # that usually means an account or setting the user thinks is active is not.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


class JsonStore:
    """One JSON-object file, written only by operations under a lock."""

    def __init__(self, path: Path, lock_path: Path) -> None:
        self.path = path
        self.lock_path = lock_path

    def __repr__(self) -> str:
        return f"JsonStore({str(self.path)!r})"

    def read(self) -> dict[str, Any] | None:
        """The file's object, ``None`` if there is no file, else ``StoreError``."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(self.path, f"cannot be read: {e.strerror or e}") from None
        try:
            # utf-8-sig: some editors put a BOM at the start, which json rejects.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise StoreError(self.path, f"is not UTF-8 text (bad byte at offset {e.start})") from None
        if not text.strip():
            raise StoreError(self.path, "is empty (it must hold a JSON object)")
        try:
            data = json.loads(
                text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
            )
        except json.JSONDecodeError as e:
            # Only the position and the parser's message: the document itself
            # may be full of tokens.
            raise StoreError(
                self.path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        except ValueError as e:
            raise StoreError(self.path, f"invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise StoreError(self.path, f"top level must be a JSON object, not {_json_type(data)}")
        return data

    def _key(self) -> tuple[int, int, str]:
        return (os.getpid(), threading.get_ident(), os.path.realpath(self.lock_path))

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the exclusive lock; re-entrant within one thread, so ``update`` works inside.

        With ``timeout`` (seconds), ``LockTimeout`` when another process
        keeps the lock that long; without, wait as long as it takes.
        """
        key = self._key()
        holding = _held.get(key)
        if holding is None:
            ensure_private_dir(self.lock_path.parent)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _acquire(fd, self.lock_path, timeout)
            except BaseException:
                os.close(fd)
                raise
            holding = _held[key] = _Holding(fd)
        holding.depth += 1
        try:
            yield
        finally:
            holding.depth -= 1
            if holding.depth == 0:
                del _held[key]
                # Unlock explicitly: a forked child may still share this open
                # file description, and close() alone would leave it locked.
                try:
                    fcntl.flock(holding.fd, fcntl.LOCK_UN)
                finally:
                    os.close(holding.fd)

    def update(
        self,
        operation: Callable[[dict[str, Any]], T],
        create: Callable[[], dict[str, Any]] | None = None,
    ) -> T:
        """Apply ``operation`` to the file's current content and write the result.

        ``operation`` mutates the dict in place and returns a value, which
        ``update`` returns. A missing file starts as ``create()`` (or is a
        ``StoreError`` without ``create``); a broken file is a ``StoreError``
        and is left alone. If ``operation`` raises, nothing is written. An
        operation that changes nothing writes nothing.
        """
        with self.locked():
            holding = _held[self._key()]
            target = os.path.realpath(self.path)
            if target in holding.operating:
                # The outer operation holds a copy read before this one would
                # write; writing both would lose this update. Fail loudly.
                raise RuntimeError(f"{self!r}.update() called from inside an update operation on the same file")
            data = self.read()
            if data is None:
                if create is None:
                    raise StoreError(self.path, "does not exist")
                data = create()
                before = None
            else:
                before = copy.deepcopy(data)
            holding.operating.add(target)
            try:
                result = operation(data)
            finally:
                holding.operating.discard(target)
            if not isinstance(data, dict):
                raise TypeError("update operations must leave a dict")
            if data != before:
                # allow_nan=False: NaN would make a file our own read() rejects.
                text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
                encoded = (text + "\n").encode("utf-8")
                if before is None:
                    ensure_private_dir(self.path.parent)
                # Every writer of this file holds the lock while its temp file
                # exists, so under the lock any temp file is a killed writer's.
                remove_stale_temps(self.path)
                atomic_write(self.path, encoded, 0o600)
            return result

    def remove_stale_temps(self) -> list[Path]:
        """Under the lock, delete temp files killed writers of this file left; returns them."""
        with self.locked():
            return remove_stale_temps(self.path)
