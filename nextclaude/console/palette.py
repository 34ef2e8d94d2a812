"""
Named display attributes of the console, one palette for every widget.

Widgets and the pure formatting in L{nextclaude.console.views} name these
attributes and never colours, so the look can change here alone.
"""

from __future__ import annotations

from typing import Mapping

# Attribute names (the formatting functions use the constants, not strings).
TITLE = "title"
HEADER = "header"
HEADER_DIM = "header dim"
DIM = "dim"
TEXT = "text"
NAME = "name"
NAME_PRIMARY = "name primary"
TIER = "tier"
OK = "ok"
WARN = "warn"
BAD = "bad"
MANUAL = "manual"
MARKER = "marker"
SUCCESSOR = "successor"
BAR_OK = "bar ok"
BAR_WARN = "bar warn"
BAR_BAD = "bar bad"
BAR_FREE = "bar free"
COLD = "cold"
REASON = "reason"
REASON_MOVE = "reason move"
REASON_RETRY = "reason retry"
REASON_BAD = "reason bad"
EVENT = "event"
EVENT_GOOD = "event good"
EVENT_BAD = "event bad"
LOG_HEADER = "log header"
FOOTER = "footer"
FOOTER_KEY = "footer key"
MESSAGE = "message"
MESSAGE_ERROR = "message error"
DIALOG = "dialog"
DIALOG_TITLE = "dialog title"
DIALOG_FOCUS = "dialog focus"
FIELD = "field"
FIELD_FOCUS = "field focus"

# Themes (`--theme`, config field `console.theme`).  The default reads on a
# light and a dark terminal alike: text keeps the terminal's own colour and
# only accents are coloured, in mid-tones that read on both; bars of colour
# (title, footer, dialogs) bring their own background.
AUTO = "auto"
LIGHT = "light"
DARK = "dark"
MONO = "mono"
THEMES = (AUTO, LIGHT, DARK, MONO)

Entry = tuple[str, str, str, str, str, str]

# (name, foreground, background, mono, foreground_high, background_high):
# the 16-colour pair first, then what a 256-colour terminal shows.  The
# bars with their own background are the same in every colour theme.
_BARS: list[Entry] = [
    (TITLE, "white,bold", "dark blue", "bold,standout", "#fff,bold", "#006"),
    (HEADER, "white", "dark blue", "standout", "#fff", "#006"),
    (HEADER_DIM, "light gray", "dark blue", "standout", "#aaa", "#006"),
    (LOG_HEADER, "black", "light gray", "standout", "#000", "g78"),
    (FOOTER, "light gray", "dark blue", "standout", "#ccc", "#006"),
    (FOOTER_KEY, "yellow,bold", "dark blue", "bold,standout", "#fd0,bold", "#006"),
    (MESSAGE, "white", "dark blue", "standout", "#fff", "#006"),
    (MESSAGE_ERROR, "white,bold", "dark red", "standout", "#fff,bold", "#a00"),
    (DIALOG, "black", "light gray", "", "#000", "g85"),
    (DIALOG_TITLE, "dark blue,bold", "light gray", "bold", "#006,bold", "g85"),
    (DIALOG_FOCUS, "white,bold", "dark blue", "standout", "#fff,bold", "#006"),
    (FIELD, "black", "light gray", "", "#000", "g93"),
    (FIELD_FOCUS, "white", "dark cyan", "standout", "#fff", "#088"),
]

# Text on the terminal's own background, per theme: (name, 16-colour
# foreground, mono, 256-colour foreground).
_DARK_TEXT: list[tuple[str, str, str, str]] = [
    (DIM, "dark gray", "", "g50"),
    (TEXT, "default", "", "default"),
    (NAME, "white", "", "#fff"),
    (NAME_PRIMARY, "white,bold", "bold", "#fff,bold"),
    (TIER, "light cyan", "", "#6cf"),
    (OK, "light green", "", "#6d6"),
    (WARN, "yellow", "", "#fd0"),
    (BAD, "light red", "bold", "#f66"),
    (MANUAL, "yellow,bold", "bold", "#fd0,bold"),
    (MARKER, "light blue,bold", "bold", "#8af,bold"),
    (SUCCESSOR, "light cyan", "", "#6cf"),
    (BAR_OK, "light green", "", "#6d6"),
    (BAR_WARN, "yellow", "", "#fd0"),
    (BAR_BAD, "light red", "standout", "#f66"),
    (BAR_FREE, "dark gray", "", "g35"),
    (COLD, "light magenta,bold", "bold", "#f8f,bold"),
    (REASON, "dark gray", "", "g58"),
    (REASON_MOVE, "yellow", "", "#fd0"),
    (REASON_RETRY, "light magenta", "", "#f8f"),
    (REASON_BAD, "light red", "", "#f66"),
    (EVENT, "light cyan", "", "#6cf"),
    (EVENT_GOOD, "light green", "", "#6d6"),
    (EVENT_BAD, "light red", "", "#f66"),
]
# A light background: the dark-theme accents darkened (white and yellow
# vanish on white).
_LIGHT_TEXT: list[tuple[str, str, str, str]] = [
    (DIM, "dark gray", "", "g40"),
    (TEXT, "default", "", "default"),
    (NAME, "black", "", "#000"),
    (NAME_PRIMARY, "black,bold", "bold", "#000,bold"),
    (TIER, "dark blue", "", "#06a"),
    (OK, "dark green", "", "#080"),
    (WARN, "brown", "", "#a60"),
    (BAD, "dark red", "bold", "#c00"),
    (MANUAL, "brown,bold", "bold", "#a60,bold"),
    (MARKER, "dark blue,bold", "bold", "#00a,bold"),
    (SUCCESSOR, "dark cyan", "", "#088"),
    (BAR_OK, "dark green", "", "#080"),
    (BAR_WARN, "brown", "", "#a60"),
    (BAR_BAD, "dark red", "standout", "#c00"),
    (BAR_FREE, "dark gray", "", "g62"),
    (COLD, "dark magenta,bold", "bold", "#a0a,bold"),
    (REASON, "dark gray", "", "g45"),
    (REASON_MOVE, "brown", "", "#a60"),
    (REASON_RETRY, "dark magenta", "", "#a0a"),
    (REASON_BAD, "dark red", "", "#c00"),
    (EVENT, "dark blue", "", "#06a"),
    (EVENT_GOOD, "dark green", "", "#080"),
    (EVENT_BAD, "dark red", "", "#c00"),
]
# Either background: names and figures in the terminal's own colour
# (bold where they must stand out), accents in mid-tones.
_AUTO_TEXT: list[tuple[str, str, str, str]] = [
    (DIM, "dark gray", "", "g50"),
    (TEXT, "default", "", "default"),
    (NAME, "default", "", "default"),
    (NAME_PRIMARY, "default,bold", "bold", "default,bold"),
    (TIER, "dark cyan", "", "#08a"),
    (OK, "dark green", "", "#3a3"),
    (WARN, "brown", "", "#d80"),
    (BAD, "dark red,bold", "bold", "#e33,bold"),
    (MANUAL, "brown,bold", "bold", "#d80,bold"),
    (MARKER, "dark blue,bold", "bold", "#48f,bold"),
    (SUCCESSOR, "dark cyan", "", "#08a"),
    (BAR_OK, "dark green", "", "#3a3"),
    (BAR_WARN, "brown", "", "#d80"),
    (BAR_BAD, "dark red", "standout", "#e33"),
    (BAR_FREE, "dark gray", "", "g50"),
    (COLD, "dark magenta,bold", "bold", "#c4c,bold"),
    (REASON, "dark gray", "", "g50"),
    (REASON_MOVE, "brown", "", "#d80"),
    (REASON_RETRY, "dark magenta", "", "#c4c"),
    (REASON_BAD, "dark red", "", "#e33"),
    (EVENT, "dark cyan", "", "#08a"),
    (EVENT_GOOD, "dark green", "", "#3a3"),
    (EVENT_BAD, "dark red", "", "#e33"),
]
_TEXT = {AUTO: _AUTO_TEXT, LIGHT: _LIGHT_TEXT, DARK: _DARK_TEXT}


def _on_default(entries: list[tuple[str, str, str, str]]) -> list[Entry]:
    return [(name, fg, "default", mono, high, "default") for name, fg, mono, high in entries]


def _mono_entry(entry: Entry) -> Entry:
    # No colour at all: what the mono column says (bold, standout), in the
    # terminal's own colours, on every kind of terminal.
    name, _, _, mono, _, _ = entry
    attrs = mono or "default"
    return (name, attrs, "default", mono, attrs, "default")


def palette(theme: str = AUTO) -> list[Entry]:
    """
    The urwid palette of C{theme} (one of L{THEMES}).
    """
    if theme == MONO:
        return [_mono_entry(entry) for entry in palette(DARK)]
    if theme not in _TEXT:
        raise ValueError(f"unknown theme {theme!r}: choose one of {', '.join(THEMES)}")
    return _BARS + _on_default(_TEXT[theme])


def choose_theme(flag: str | None, configured: str | None, environ: Mapping[str, str]) -> str:
    """
    The theme to use: C{--theme} when given, else C{NO_COLOR} (any
    non-empty value, per no-color.org) means mono, else the config file's
    C{console.theme}, else the default.
    """
    if flag:
        return flag
    if environ.get("NO_COLOR"):
        return MONO
    return configured or AUTO


PALETTE = palette(AUTO)

NAMES = frozenset(entry[0] for entry in PALETTE)
