"""
glibc's allocator, set up for request bodies and told to give memory back
after a load.

Request bodies of 1-2 MB are the proxy's largest allocations.  Left to
itself, glibc serves a block above its mmap threshold (128 KiB) with mmap
and raises the threshold to the size of each such block freed, while
free() trims the top of the heap whenever more than twice that is free
there.  Bodies of slightly different sizes (and the upstream request's
headers joined before them) then flip between fresh mmaps and a heap top
trimmed away after each request: about 700 page faults per 1 MB request,
~1.3 ms of system time (measured with benchmarks/proxy_overhead.py, case
7).  So L{Allocator.keep_bodies_in_heap} fixes both thresholds at start-up
(bodies always come from the heap, which keeps its free pages for the next
one), and L{Reclaimer} hands the free pages back with C{malloc_trim} when a
load has drained: the heap cannot shrink past small objects still alive
above a freed body, but a trim releases the pages below them too.

Everything here is a no-op where glibc is not the C library (macOS, musl,
Windows): there is nothing to set or trim, and nothing fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["Allocator", "Reclaimer", "glibc"]

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap: glibc's own ceiling for its moving
# threshold on 64-bit, and the proxy's default body cap (proxy.maxBodyBytes).
HEAP_BLOCKS_BELOW = 32 * 1024 * 1024
# free() trims the heap top only past this much free there; a load's end is
# left to the Reclaimer's malloc_trim.  Ten clients sending 2 MB bodies
# still fault 530 pages a request with 16 MiB here, 150 with 64 MiB.
TRIM_PAST = 64 * 1024 * 1024

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

    def keep_bodies_in_heap(self) -> bool:
        """
        Fix the mmap and trim thresholds (see the module docstring);
        whether glibc took both settings.  Process-wide, so called once
        by the service that starts the proxy.
        """
        mallopt = getattr(self._libc, "mallopt", None)
        if mallopt is None:
            return False
        mmap = mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_BELOW)
        trim = mallopt(M_TRIM_THRESHOLD, TRIM_PAST)
        return bool(mmap and trim)

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
