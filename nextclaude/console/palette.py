"""
Named display attributes of the console, one palette for every widget.

Widgets and the pure formatting in L{nextclaude.console.views} name these
attributes and never colours, so the look can change here alone.
"""

from __future__ import annotations

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

# (name, foreground, background, mono, foreground_high, background_high):
# the 16-colour pair first, then what a 256-colour terminal shows.
PALETTE: list[tuple[str, str, str, str, str, str]] = [
    (TITLE, "white,bold", "dark blue", "bold", "#fff,bold", "#006"),
    (HEADER, "white", "dark blue", "", "#fff", "#006"),
    (HEADER_DIM, "light gray", "dark blue", "", "#aaa", "#006"),
    (DIM, "dark gray", "default", "", "g50", "default"),
    (TEXT, "default", "default", "", "default", "default"),
    (NAME, "white", "default", "", "#fff", "default"),
    (NAME_PRIMARY, "white,bold", "default", "bold", "#fff,bold", "default"),
    (TIER, "light cyan", "default", "", "#6cf", "default"),
    (OK, "light green", "default", "", "#6d6", "default"),
    (WARN, "yellow", "default", "", "#fd0", "default"),
    (BAD, "light red", "default", "bold", "#f66", "default"),
    (MANUAL, "yellow,bold", "default", "bold", "#fd0,bold", "default"),
    (MARKER, "light blue,bold", "default", "bold", "#8af,bold", "default"),
    (SUCCESSOR, "light cyan", "default", "", "#6cf", "default"),
    (BAR_OK, "light green", "default", "", "#6d6", "default"),
    (BAR_WARN, "yellow", "default", "", "#fd0", "default"),
    (BAR_BAD, "light red", "default", "standout", "#f66", "default"),
    (BAR_FREE, "dark gray", "default", "", "g35", "default"),
    (COLD, "light magenta,bold", "default", "bold", "#f8f,bold", "default"),
    (REASON, "dark gray", "default", "", "g58", "default"),
    (REASON_MOVE, "yellow", "default", "", "#fd0", "default"),
    (REASON_RETRY, "light magenta", "default", "", "#f8f", "default"),
    (REASON_BAD, "light red", "default", "", "#f66", "default"),
    (EVENT, "light cyan", "default", "", "#6cf", "default"),
    (EVENT_GOOD, "light green", "default", "", "#6d6", "default"),
    (EVENT_BAD, "light red", "default", "", "#f66", "default"),
    (LOG_HEADER, "black", "light gray", "standout", "#000", "g78"),
    (FOOTER, "light gray", "dark blue", "", "#ccc", "#006"),
    (FOOTER_KEY, "yellow,bold", "dark blue", "bold", "#fd0,bold", "#006"),
    (MESSAGE, "white", "dark blue", "", "#fff", "#006"),
    (MESSAGE_ERROR, "white,bold", "dark red", "standout", "#fff,bold", "#a00"),
    (DIALOG, "black", "light gray", "", "#000", "g85"),
    (DIALOG_TITLE, "dark blue,bold", "light gray", "bold", "#006,bold", "g85"),
    (DIALOG_FOCUS, "white,bold", "dark blue", "standout", "#fff,bold", "#006"),
    (FIELD, "black", "light gray", "", "#000", "g93"),
    (FIELD_FOCUS, "white", "dark cyan", "standout", "#fff", "#088"),
]

NAMES = frozenset(entry[0] for entry in PALETTE)
