"""
glibc's allocator, told to give memory back after a load.

Request bodies of 1-2 MB are the proxy's largest allocations.  glibc serves
a block above its mmap threshold (128 KiB) with mmap, but raises the
threshold to the size of each such block freed (up to 32 MiB): after the
first large body, later ones come from the heap, which cannot shrink past
small objects still alive above them, so the resident size stays near the
high-water mark of a load long after it is over.  Reusing heap memory is
cheaper than fresh pages from mmap for every body (a fixed threshold
costs about 0.7 ms per megabyte in page faults, measured), so the heap
keeps serving bodies and L{Reclaimer} hands its free pages back with
C{malloc_trim} when a load has drained.

Everything here is a no-op where glibc is not the C library (macOS, musl,
Windows): there is nothing to trim, and nothing fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["Allocator", "Reclaimer", "glibc"]

# A trim walks the whole heap and the pages it frees fault back in on the
# next large body: at most one per this many seconds while requests drain,
# however often they do.
TRIM_INTERVAL = 1.0


def glibc(
    platform: str = sys.platform, load: Callable[[str], Any] = ctypes.CDLL
) -> Any | None:
    """
    The C library if it is glibc (it has C{gnu_get_libc_version} and
    C{malloc_trim}), else None.
    """
    if not platform.startswith("linux"):
        return None
    try:
        libc = load(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    for name in ("gnu_get_libc_version", "malloc_trim"):
        if getattr(libc, name, None) is None:
            return None
    return libc


class Allocator:
    """
    The process's C allocator: L{trim} returns free heap pages to the
    system, and does nothing without glibc.
    """

    def __init__(self, libc: Any | None = None, find: Callable[[], Any | None] = glibc) -> None:
        self._libc = libc if libc is not None else find()

    @property
    def available(self) -> bool:
        return self._libc is not None

    def trim(self) -> bool:
        """
        Return the heap's free pages to the system; whether any were.
        """
        if self._libc is None:
            return False
        return bool(self._libc.malloc_trim(0))


class Reclaimer:
    """
    When to trim: once requests have been relayed since the last trim,
    at a drain (nothing in flight) at most every C{interval} seconds, and
    whenever the last client connection closes.  Synchronous: no timer is
    left behind.
    """

    def __init__(self, allocator: Allocator, clock: IReactorTime, interval: float = TRIM_INTERVAL) -> None:
        self._allocator = allocator
        self._clock = clock
        self._interval = interval
        self._owed = False
        self._last: float | None = None
        self.trims = 0

    def relayed(self) -> None:
        """A request was relayed: its memory may now be free."""
        self._owed = True

    def drained(self) -> None:
        """No request is in flight."""
        now = self._clock.seconds()
        if self._owed and (self._last is None or now - self._last >= self._interval):
            self._trim(now)

    def disconnected(self) -> None:
        """No client connection is open."""
        if self._owed:
            self._trim(self._clock.seconds())

    def _trim(self, now: float) -> None:
        self._owed = False
        self._last = now
        if self._allocator.available:
            self.trims += 1
            self._allocator.trim()
