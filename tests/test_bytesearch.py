"""
Tests for L{nextclaude.bytesearch}: glibc's memmem answers exactly what
Python's C{in} would, and its absence falls back to C{in}.
"""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import TestCase

from nextclaude.allocator import glibc
from nextclaude.bytesearch import contains, searcher
from nextclaude.sessions import CONTINUATION_MARKER, SUMMARY_MARKER

_CI = os.environ.get("CI") == "true"
# Few distinct bytes, NUL among them, so needles are found often, near
# misses are common and a NUL never ends the search early.
_BYTES = st.binary(max_size=300).map(lambda b: bytes(x % 4 for x in b))


class SearcherTests(TestCase):
    def test_no_libc_is_python_search(self) -> None:
        """
        Without a C library, or with one that has no memmem (musl's
        loader answers, Windows does not), the search is Python's own and
        still right.
        """

        class NoMemmem:
            pass

        for libc in (None, NoMemmem()):
            search = searcher(libc)
            self.assertTrue(search(b"a summary here", b"summary"))
            self.assertFalse(search(b"a summar here", b"summary"))

    def test_glibc_is_used_here(self) -> None:
        """
        On glibc the module's search is memmem, not the fallback: a
        function of its own, not Python's C{in}.
        """
        if glibc() is None:
            raise self.skipTest("glibc is not the C library here")
        self.assertIsNot(contains, searcher(None))

    def test_markers_in_a_large_body(self) -> None:
        """
        The compaction and continuation markers are found anywhere in a
        2 MB body, after NUL bytes too, and not found when one byte differs.
        """
        filler = b"x" * 1_000_000 + b"\0" + b"y" * 1_000_000
        for marker in (SUMMARY_MARKER, CONTINUATION_MARKER.encode("ascii")):
            for body in (marker + filler, filler + marker, filler[:7] + marker + filler):
                self.assertTrue(contains(body, marker))
            broken = marker[:-1] + bytes([marker[-1] ^ 1])
            self.assertFalse(contains(filler + broken + filler, marker))

    def test_other_buffers(self) -> None:
        """
        A bytearray haystack or needle gets the answer C{in} gives, rather
        than a ctypes error.
        """
        self.assertTrue(contains(bytearray(b"abc summary"), b"summary"))
        self.assertFalse(contains(bytearray(b"abc summary"), b"other"))
        self.assertTrue(contains(b"abc summary", bytearray(b"summary")))

    @settings(max_examples=25, deadline=None, derandomize=_CI)
    @given(prefix=_BYTES, needle=_BYTES, suffix=_BYTES, place=st.booleans())
    def test_same_answer_as_python(self, prefix: bytes, needle: bytes, suffix: bytes, place: bool) -> None:
        """
        For any haystack and needle over a small alphabet with NUL bytes,
        empty ones included, the search answers as C{needle in haystack}.
        """
        haystack = prefix + needle + suffix if place else prefix + suffix
        self.assertEqual(contains(haystack, needle), needle in haystack)
        self.assertEqual(contains(haystack, b""), True)
        self.assertEqual(contains(b"", needle), needle == b"")
