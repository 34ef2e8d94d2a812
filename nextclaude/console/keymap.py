"""
The console's keys: one table per context, key name (as urwid spells it) →
action name.  Widgets look keys up here and never compare key strings
themselves, so a key changes in one place and the footer follows.
"""

from __future__ import annotations

from typing import Mapping

# Dashboard actions (PRODUCT.md, "Commands": console keys).
PIN = "pin"
ADD = "add"
REMOVE = "remove"
TOGGLE = "toggle"
PRIORITY = "priority"
RELOAD = "reload"
QUIT = "quit"
HISTORY = "history"
LEGEND = "legend"

# Menu, dialog and form actions.
UP = "up"
DOWN = "down"
FIRST = "first"
LAST = "last"
CONFIRM = "confirm"
CANCEL = "cancel"
YES = "yes"
NEXT = "next"
PREVIOUS = "previous"

DASHBOARD: Mapping[str, str] = {
    "s": PIN,
    "a": ADD,
    "r": REMOVE,
    # d and p are left out of the footer (DASHBOARD_HELP), which is full
    # at 80 columns; the man page and README list them.
    "d": TOGGLE,
    "p": PRIORITY,
    "R": RELOAD,
    "h": HISTORY,
    "?": LEGEND,
    "q": QUIT,
}

MENU: Mapping[str, str] = {
    "j": DOWN,
    "k": UP,
    "down": DOWN,
    "up": UP,
    "tab": DOWN,
    "shift tab": UP,
    "home": FIRST,
    "end": LAST,
    "enter": CONFIRM,
    "esc": CANCEL,
}

# A yes/no question is a two-entry menu that also takes y/n (the quit
# question adds `q`, so "q q" quits as in many terminal programs).
CONFIRM_DIALOG: Mapping[str, str] = {
    **MENU,
    "left": UP,
    "right": DOWN,
    "y": YES,
    "Y": YES,
    "n": CANCEL,
    "N": CANCEL,
}

# Text fields take printable keys themselves, so only these mean something
# to the form around them.
FORM: Mapping[str, str] = {
    "enter": CONFIRM,
    "esc": CANCEL,
    "tab": NEXT,
    "down": NEXT,
    "shift tab": PREVIOUS,
    "up": PREVIOUS,
}

# The history view (console/history.py): any of these goes back.
HISTORY_VIEW: Mapping[str, str] = {"h": CANCEL, "esc": CANCEL, "q": CANCEL, "enter": CANCEL}

# A page of text (the legend, the demo's introduction): these scroll it,
# anything else closes it.
TEXT_PAGE: Mapping[str, str] = {"j": DOWN, "k": UP, "down": DOWN, "up": UP, "page down": LAST, "page up": FIRST}

# What the footer shows, in order: (key as shown, what it does).
DASHBOARD_HELP: list[tuple[str, str]] = [
    ("s", "pin"),
    ("a", "add"),
    ("r", "remove"),
    ("R", "reload"),
    ("h", "history"),
    ("?", "legend"),
    ("q", "quit"),
]
MENU_HELP: list[tuple[str, str]] = [("j/k ↑/↓", "move"), ("Enter", "choose"), ("Esc", "cancel")]
CONFIRM_HELP: list[tuple[str, str]] = [("y", "yes"), ("n/Esc", "no"), ("↑/↓ Enter", "choose")]
TEXT_HELP: list[tuple[str, str]] = [("j/k ↑/↓", "scroll"), ("any other key", "close")]
FORM_HELP: list[tuple[str, str]] = [("Tab", "next field"), ("Enter", "add"), ("Esc", "cancel")]


def action(table: Mapping[str, str], key: object) -> str | None:
    """
    The action C{key} means in C{table}, or None (mouse events and unknown
    keys mean nothing).
    """
    if not isinstance(key, str):
        return None
    return table.get(key)

