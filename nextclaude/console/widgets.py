"""
The console's urwid widgets: the dashboard (laid out afresh for each size
from L{nextclaude.console.views}), menus and yes/no dialogs, the add-account
form, and the root that puts a dialog over the dashboard.

Widgets hold no policy: a menu calls back with the chosen value, the root
hands dashboard keys to a callback; L{nextclaude.console.app} decides.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Hashable, Mapping, Sequence, cast

import urwid

from nextclaude.console import keymap
from nextclaude.console import palette as p
from nextclaude.console.views import (
    FULL,
    LEVELS,
    NORMAL,
    Line,
    Model,
    card_lines,
    clip_line,
    header_lines,
    line_width,
    width_of,
    wrapped,
)

Size = tuple[()] | tuple[int] | tuple[int, int]

# The log keeps at least this many rows (column titles included) however
# many accounts there are; cards never take more than half the screen, and
# the roomiest cards no more than 2/5 of it (80x24 gets three-line cards).
LOG_MINIMUM = 6
CARD_SHARE = 1 / 2
FULL_CARD_SHARE = 2 / 5
# Cards side by side need at least this many columns each.
CARD_MIN_WIDTH = 76
CARD_GAP = 2


# -- layout (pure: lines for a size) -----------------------------------------


def pad_line(line: Line, width: int, attr: str | None = None) -> Line:
    line = clip_line(line, width)
    gap = width - line_width(line)
    return line + [(attr, " " * gap)] if gap > 0 else line


def side_by_side(cards: Sequence[list[Line]], card_width: int) -> list[Line]:
    """
    Cards next to each other: line i of each card, padded to C{card_width},
    joined by a gap.
    """
    height = max((len(card) for card in cards), default=0)
    out: list[Line] = []
    for index in range(height):
        row: Line = []
        for position, card in enumerate(cards):
            if position:
                row.append((None, " " * CARD_GAP))
            row += pad_line(card[index] if index < len(card) else [], card_width)
        out.append(row)
    return out


def card_block(model: Model, cols: int, budget: int, full_budget: int | None = None) -> list[Line]:
    """
    Every account card at the most detailed level that fits in C{budget}
    rows (several cards per row on a wide terminal); when even one line per
    card is too much, as many as fit and a "+N more" line.
    """
    accounts = model.accounts
    if not accounts or budget <= 0:
        return []
    per_row = max(1, min(len(accounts), cols // CARD_MIN_WIDTH))
    card_width = (cols - CARD_GAP * (per_row - 1)) // per_row
    now = model.now()
    # The detailed levels try a blank line between rows of cards first.
    tries = [(level, gap) for level in LEVELS for gap in ((True, False) if level in (FULL, NORMAL) else (False,))]
    for level, gap in tries:
        cards = [card_lines(account, now, level, card_width, model.switch, model.localtime) for account in accounts]
        lines: list[Line] = []
        for start in range(0, len(cards), per_row):
            if lines and gap:
                lines.append([])
            lines += side_by_side(cards[start : start + per_row], card_width)
        if len(lines) <= (budget if level != FULL or full_budget is None else min(budget, full_budget)):
            return lines
    shown = lines[: max(0, budget - 1)]
    hidden = len(lines) - len(shown)
    more = max(1, hidden * per_row)
    return shown + [[(p.DIM, f"  +{more} more account{'s' if more != 1 else ''}: make the terminal taller")]]


def footer_line(model: Model, cols: int) -> Line:
    """
    The keys on the left, the latest message on the right (taking the whole
    line when both do not fit).
    """
    keys: Line = []
    for key, label in model.keys:
        keys += [(p.FOOTER_KEY, f" {key}"), (p.FOOTER, f" {label} ")]
    message = model.message or model.notice
    if message is None:
        return pad_line(keys, cols, p.FOOTER)
    attr, text = message
    room = cols - line_width(keys) - 2
    if width_of(text) > room:
        # The message matters more than the keys for the seconds it shows.
        return pad_line([(attr, f" {text}")], cols, attr)
    gap = cols - line_width(keys) - width_of(text) - 1
    return keys + [(p.FOOTER, " " * max(1, gap)), (attr, text), (p.FOOTER, " ")]


# A message longer than the footer wraps over at most this many lines.
MESSAGE_ROWS = 3


def footer_lines(model: Model, cols: int) -> list[Line]:
    """
    The footer: one line of keys and the latest message, or, when the
    message does not fit beside the keys, the message wrapped over up to
    L{MESSAGE_ROWS} lines (it matters more than the keys for the seconds
    it shows, and its end is often what to do).
    """
    message = model.message or model.notice
    if message is None or width_of(message[1]) <= cols - 2:
        return [footer_line(model, cols)]
    attr, text = message
    lines = wrapped(text, cols, attr, " ", " ")
    if len(lines) > MESSAGE_ROWS:
        lines = lines[: MESSAGE_ROWS - 1] + [clip_line([(attr, " " + " ".join(l[0][1] for l in lines[MESSAGE_ROWS - 1 :]))], cols)]
    return [pad_line(line, cols, attr) for line in lines]


def screen_lines(model: Model, cols: int, rows: int) -> list[Line]:
    """
    The whole dashboard as exactly C{rows} lines of at most C{cols}
    columns: header (with the problems), cards, activity log (it gets what
    is left), footer.
    """
    if rows <= 0 or cols <= 0:
        return []
    now = model.now()
    header = header_lines(model.snapshot, now, cols, max(1, rows // 4), model.title)
    footer_rows = footer_lines(model, cols)
    body = rows - len(header) - len(footer_rows)
    if body < 0:
        return (header + footer_rows)[-rows:]
    budget = min(int(rows * CARD_SHARE), body - LOG_MINIMUM)
    cards = card_block(model, cols, max(0, budget), int(rows * FULL_CARD_SHARE))
    log_rows = body - len(cards)
    log = model.log_lines(cols, log_rows)
    log += [[] for _ in range(log_rows - len(log))]
    return header + cards + log + footer_rows


# -- widgets ----------------------------------------------------------------------


class Dashboard(urwid.Widget):
    """
    The dashboard as a box widget.  It renders from the model every time
    (no canvas caching) since the model changes without telling urwid; the
    app decides when to draw, batched.
    """

    _sizing = frozenset([urwid.Sizing.BOX])
    _selectable = True
    no_cache = ["render"]

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model

    def render(self, size: Size, focus: bool = False) -> urwid.Canvas:
        cols, rows = cast(tuple[int, int], size)
        lines = screen_lines(self.model, cols, rows)
        texts = [urwid.Text(line or "", wrap="clip") for line in lines]
        canvases = [(text.render((cols,)), None, False) for text in texts]
        if not canvases:
            return urwid.SolidCanvas(" ", cols, rows)
        return urwid.CanvasCombine(canvases)

    def keypress(self, size: Size, key: str) -> str | None:
        return key


def _entry_line(label: Line | str, focused: bool) -> urwid.Widget:
    markup = label if isinstance(label, str) else list(label)
    prefix = "▸ " if focused else "  "
    text = urwid.Text([prefix, markup] if markup else prefix, wrap="clip")
    return urwid.AttrMap(text, p.DIALOG_FOCUS if focused else p.DIALOG)


class Menu(urwid.WidgetWrap):
    """
    A modal list: C{j}/C{k}/arrows move, Enter chooses (C{on_choose} gets
    the entry's value), Esc cancels.  Every other key is swallowed so
    nothing reaches the dashboard behind it.
    """

    def __init__(
        self,
        title: str,
        entries: Sequence[tuple[Line | str, Hashable]],
        on_choose: Callable[[Any], None],
        on_cancel: Callable[[], None],
        *,
        note: str | None = None,
        keys: Mapping[str, str] = keymap.MENU,
        help: Sequence[tuple[str, str]] = keymap.MENU_HELP,
        focus: int = 0,
        width: int = 64,
    ) -> None:
        self.title = title
        self.entries = list(entries)
        self.on_choose = on_choose
        self.on_cancel = on_cancel
        self.note = note
        self.keys = keys
        self.help = list(help)
        self.position = max(0, min(focus, len(self.entries) - 1))
        self.width = width
        super().__init__(self._build())

    def _build(self) -> urwid.Widget:
        rows: list[urwid.Widget] = []
        if self.note:
            rows.append(urwid.AttrMap(urwid.Text(self.note), p.DIALOG))
            rows.append(urwid.AttrMap(urwid.Divider(), p.DIALOG))
        rows += [_entry_line(label, index == self.position) for index, (label, _) in enumerate(self.entries)]
        box = urwid.LineBox(urwid.Pile(rows), title=self.title, title_attr=p.DIALOG_TITLE)
        return urwid.AttrMap(box, p.DIALOG)

    def selectable(self) -> bool:
        return True

    @property
    def chosen(self) -> Any:
        return self.entries[self.position][1] if self.entries else None

    def move(self, to: int) -> None:
        if self.entries:
            self.position = max(0, min(to, len(self.entries) - 1))
            self._w = self._build()

    def keypress(self, size: Any, key: str) -> str | None:
        action = keymap.action(self.keys, key)
        if action == keymap.DOWN:
            self.move(self.position + 1)
        elif action == keymap.UP:
            self.move(self.position - 1)
        elif action == keymap.FIRST:
            self.move(0)
        elif action == keymap.LAST:
            self.move(len(self.entries) - 1)
        elif action == keymap.CONFIRM and self.entries:
            self.on_choose(self.chosen)
        elif action == keymap.YES and self.entries:
            self.on_choose(self.entries[0][1])
        elif action == keymap.CANCEL:
            self.on_cancel()
        return None


def confirm_dialog(
    title: str,
    question: str,
    yes: str,
    on_yes: Callable[[], None],
    on_no: Callable[[], None],
    *,
    extra_yes: Sequence[str] = (),
) -> Menu:
    """
    A yes/no question as a two-entry menu with the safe answer chosen:
    Enter right after the question cancels (a stray Enter must never stop
    a proxy or delete credentials); C{y}, or moving to the yes entry and
    Enter, answers yes; C{n} and Esc no; C{extra_yes} keys answer yes too
    (C{q} for "quit?").
    """
    keys = dict(keymap.CONFIRM_DIALOG)
    for key in extra_yes:
        keys[key] = keymap.YES

    def choose(value: bool) -> None:
        (on_yes if value else on_no)()

    menu = Menu(
        title,
        [([(p.BAD, yes)], True), ("Cancel", False)],
        choose,
        on_no,
        note=question,
        keys=keys,
        help=keymap.CONFIRM_HELP,
        focus=1,
    )
    return menu


def classify_secret(text: str) -> tuple[str | None, str]:
    """
    What the add form's secret field holds: C{("json", description)} for
    Claude Code credentials JSON, C{("apikey", description)} for an API key,
    C{(None, problem)} when it is neither.
    """
    text = text.strip()
    if not text:
        return None, "paste an API key (sk-ant-…) or Claude Code's credentials JSON"
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            return None, f"not valid JSON yet ({len(text)} characters)"
        if not isinstance(value, dict):
            return None, "the JSON must be an object"
        return "json", f"Claude Code credentials JSON ({len(text)} characters)"
    if any(char.isspace() for char in text):
        return None, "an API key has no spaces"
    return "apikey", f"API key ({len(text)} characters, ends …{text[-4:]})"


class PasteEdit(urwid.Edit):
    """
    A one-line field that takes a pasted block whole: inside a bracketed
    paste, Enter is part of the text (JSON spans lines), not "submit".
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pasting = False

    def keypress(self, size: Any, key: str) -> str | None:
        if key == "begin paste":
            self.pasting = True
            return None
        if key == "end paste":
            self.pasting = False
            return None
        if self.pasting and key == "enter":
            self.insert_text(" ")
            return None
        return super().keypress(size, key)


class AddForm(urwid.WidgetWrap):
    """
    Add an account: paste an API key or Claude Code's credentials JSON
    (masked), optionally name it; Enter adds, Tab moves, Esc cancels.
    C{on_submit(kind, secret, name)} gets C{"apikey"} or C{"json"}.
    """

    width = 72

    def __init__(self, on_submit: Callable[[str, str, str | None], None], on_cancel: Callable[[], None]) -> None:
        self.on_submit = on_submit
        self.on_cancel = on_cancel
        self.secret = PasteEdit("Key or JSON: ", mask="•", wrap="clip")
        self.name = urwid.Edit("Name (optional): ", wrap="clip")
        self.hint = urwid.Text("", wrap="clip")
        self.fields = [self.secret, self.name]
        self.pile = urwid.Pile(
            [
                urwid.AttrMap(
                    urwid.Text("Paste an API key or the contents of ~/.claude/.credentials.json."),
                    p.DIALOG,
                ),
                urwid.AttrMap(urwid.Divider(), p.DIALOG),
                urwid.AttrMap(self.secret, p.FIELD, p.FIELD_FOCUS),
                urwid.AttrMap(self.name, p.FIELD, p.FIELD_FOCUS),
                urwid.AttrMap(self.hint, p.DIALOG),
            ]
        )
        self.pile.focus_position = 2
        self._update_hint()
        box = urwid.LineBox(self.pile, title="Add an account", title_attr=p.DIALOG_TITLE)
        super().__init__(urwid.AttrMap(box, p.DIALOG))

    @property
    def help(self) -> list[tuple[str, str]]:
        return keymap.FORM_HELP

    def selectable(self) -> bool:
        return True

    def _update_hint(self, problem: str | None = None) -> None:
        kind, description = classify_secret(self.secret.edit_text)
        if problem:
            self.hint.set_text([(p.BAD, problem)])
        elif kind is None:
            self.hint.set_text([(p.DIALOG, description)])
        else:
            self.hint.set_text([(p.DIALOG, f"recognised: {description}")])

    def focus_field(self, index: int) -> None:
        self.pile.focus_position = 2 + index % len(self.fields)

    @property
    def focused_field(self) -> int:
        return self.pile.focus_position - 2

    def submit(self) -> None:
        kind, description = classify_secret(self.secret.edit_text)
        if kind is None:
            self._update_hint(description)
            return
        name = self.name.edit_text.strip() or None
        self.on_submit(kind, self.secret.edit_text.strip(), name)

    def keypress(self, size: Any, key: str) -> str | None:
        if self.secret.pasting and self.focused_field == 0:
            self.secret.keypress((size[0],) if size else (self.width,), key)
            self._update_hint()
            return None
        action = keymap.action(keymap.FORM, key)
        if key in ("begin paste", "end paste"):
            action = None
        if action == keymap.CANCEL:
            self.on_cancel()
        elif action == keymap.CONFIRM:
            self.submit()
        elif action == keymap.NEXT:
            self.focus_field(self.focused_field + 1)
        elif action == keymap.PREVIOUS:
            self.focus_field(self.focused_field - 1)
        else:
            field = self.fields[self.focused_field]
            field.keypress((max(1, (size[0] if size else self.width) - 2),), key)
            self._update_hint()
        return None


class TextPage(urwid.WidgetWrap):
    """
    A page of paragraphs over the dashboard (the legend, the demo's
    introduction): j/k and the arrows scroll when it is taller than the
    screen, any other key closes it (C{on_close}).
    """

    width = 76
    height: Any = ("relative", 90)

    def __init__(self, title: str, paragraphs: Sequence[Line | str], on_close: Callable[[], None]) -> None:
        self.on_close = on_close
        rows: list[urwid.Widget] = []
        for index, paragraph in enumerate(paragraphs):
            if index:
                rows.append(urwid.Divider())
            rows.append(urwid.Text(paragraph if isinstance(paragraph, str) else list(paragraph)))
        self.body = urwid.ListBox(urwid.SimpleFocusListWalker(rows))
        box = urwid.LineBox(self.body, title=title, title_attr=p.DIALOG_TITLE)
        super().__init__(urwid.AttrMap(box, p.DIALOG))

    @property
    def help(self) -> list[tuple[str, str]]:
        return keymap.TEXT_HELP

    def selectable(self) -> bool:
        return True

    def keypress(self, size: Any, key: str) -> str | None:
        action = keymap.action(keymap.TEXT_PAGE, key)
        scroll = {keymap.DOWN: "down", keymap.UP: "up", keymap.LAST: "page down", keymap.FIRST: "page up"}.get(action or "")
        if scroll is None:
            self.on_close()
            return None
        if len(size) == 2:
            # The line box takes a row and a column each side.
            self.body.keypress((max(1, size[0] - 2), max(1, size[1] - 2)), scroll)
        return None


def _overlay_size(dialog: urwid.Widget, cols: int) -> tuple[int, Any]:
    wanted = getattr(dialog, "width", 64)
    return max(10, min(wanted, cols - 2)), getattr(dialog, "height", "pack")


class Root(urwid.WidgetPlaceholder):
    """
    The top widget: the dashboard, or a dialog over it.  With a dialog open
    every key goes to the dialog; otherwise C{on_key} gets it and says
    whether it meant something.
    """

    def __init__(self, dashboard: Dashboard, on_key: Callable[[str], bool]) -> None:
        super().__init__(dashboard)
        self.dashboard = dashboard
        self.on_key = on_key
        self.dialog: urwid.Widget | None = None

    def selectable(self) -> bool:
        return True

    def open(self, dialog: urwid.Widget) -> None:
        self.dialog = dialog
        self.original_widget = urwid.Overlay(dialog, self.dashboard, "center", 40, "middle", "pack")

    def close(self) -> None:
        self.dialog = None
        self.original_widget = self.dashboard

    def render(self, size: Size, focus: bool = False) -> urwid.Canvas:
        if self.dialog is not None:
            cols = cast(tuple[int, int], size)[0]
            width, height = _overlay_size(self.dialog, cols)
            overlay = self.original_widget
            overlay.set_overlay_parameters("center", width, "middle", height)
        return super().render(size, focus)

    def keypress(self, size: Size, key: str) -> str | None:
        if self.dialog is not None:
            cols, rows = cast(tuple[int, int], size)
            width, height = _overlay_size(self.dialog, cols)
            if height == "pack":
                self.dialog.keypress((width,), key)
            else:
                self.dialog.keypress((width, max(3, rows * height[1] // 100)), key)
            return None
        # Keys the console does not use go back to urwid (ctrl l redraws).
        return None if self.on_key(key) else key
