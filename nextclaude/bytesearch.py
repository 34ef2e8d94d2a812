"""
Whether a request body holds a marker, by glibc's C{memmem} where glibc is
the C library.

The proxy looks for Claude Code's compaction and continuation phrases in
every Messages request, whose body runs to 1-2 MB near a full context
window (PROTOCOL.md).  CPython's C{bytes.find} decides how far to skip by
testing one character against a filter of the needle's characters; in
English prose and code almost every character passes, so it steps a byte
at a time (about 0.3 ms per MB here).  glibc's C{memmem} (2.29 and later)
skips by pairs of bytes, which are far rarer: 2-5 times faster on prose,
code, base64 and CJK bodies of 2 MB measured on the benchmark machine
(issue 12), and never slower there.  Where glibc is not the C library
(macOS, musl, Windows), or for anything but C{bytes}, C{in} answers.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from nextclaude.allocator import glibc

__all__ = ["contains", "searcher"]


def _python_contains(haystack: bytes, needle: bytes) -> bool:
    return needle in haystack


def searcher(libc: Any | None) -> Callable[[bytes, bytes], bool]:
    """
    A function C{(haystack, needle) -> bool} that says whether C{needle}
    occurs in C{haystack}, as C{needle in haystack} does: by C{libc}'s
    C{memmem} when it has one, else by Python's own search.
    """
    found = getattr(libc, "memmem", None) if libc is not None else None
    if found is None:
        return _python_contains
    memmem = ctypes.CFUNCTYPE(
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t
    )(ctypes.cast(found, ctypes.c_void_p).value)

    def contains(haystack: bytes, needle: bytes) -> bool:
        # c_char_p passes a bytes object's own buffer (no copy); the
        # lengths are explicit, so NUL bytes in a body are searched too.
        if type(haystack) is not bytes or type(needle) is not bytes:
            return needle in haystack
        return memmem(haystack, len(haystack), needle, len(needle)) is not None

    return contains


contains = searcher(glibc())
