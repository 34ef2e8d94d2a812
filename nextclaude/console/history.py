"""
The console's history view (key C{h}): per account a 24-hour sparkline of
usage per hour and the week's totals, with today's and the week's re-billed
tokens beside the naive-rotation estimate.  Built from the status
snapshot's C{history} field (nextclaude.history); the lines are plain data,
the widget only lays them out.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import urwid

from nextclaude.console import keymap
from nextclaude.console import palette as p
from nextclaude.console.views import Line, Model, clip_line, fit_name, number
from nextclaude.humanize import tokens

SPARKS = "▁▂▃▄▅▆▇█"
HOURS = 24
WIDTH = 78
HELP: list[tuple[str, str]] = [("h/Esc", "back to the dashboard")]


def sparkline(values: Sequence[int], top: int) -> str:
    """
    One character per value, scaled to C{top} (the same for every account,
    so their lines compare); an hour without usage is a dot.
    """
    out = []
    for value in values:
        if value <= 0 or top <= 0:
            out.append("·")
        else:
            out.append(SPARKS[min(len(SPARKS) - 1, max(0, round(value / top * (len(SPARKS) - 1))))])
    return "".join(out)


def signed(value: int) -> str:
    return f"−{tokens(-value)}" if value < 0 else tokens(value)


def savings_segments(totals: Mapping[str, Any] | None, label: str) -> Line:
    """
    C{today: re-billed 12k · naive≈ 150k · saved≈ 138k}: the naive figure
    and what follows from it are estimates, so they carry ≈.
    """
    rebilled = number(totals, "rebilled")
    naive = number(totals, "naiveEstimate")
    saved = naive - rebilled
    return [
        (p.DIM, f"{label}: "),
        (p.TEXT, f"re-billed {tokens(rebilled)}"),
        (p.DIM, f" · naive≈ {tokens(naive)} · "),
        (p.OK if saved >= 0 else p.BAD, f"saved≈ {signed(saved)}"),
    ]


def history_lines(snapshot: Mapping[str, Any] | None, width: int = WIDTH) -> list[Line]:
    """
    The view's lines: today's and the week's figures, then per account its
    name with the week's totals and a sparkline of the last 24 hours.
    """
    history = snapshot.get("history") if isinstance(snapshot, Mapping) else None
    if not isinstance(history, Mapping):
        return [[(p.DIM, "No usage history: this proxy does not record one.")]]
    lines: list[Line] = []
    today, week = history.get("today"), history.get("week")
    lines.append(savings_segments(today, "today") + [(p.DIM, f" · {number(today, 'requests')} reqs")])
    lines.append(savings_segments(week, "7 days") + [(p.DIM, f" · {number(week, 'moves')} moves")])
    accounts = [a for a in history.get("accounts") or [] if isinstance(a, Mapping)]
    hourly = {
        str(a.get("name")): [v if isinstance(v, int) and v > 0 else 0 for v in (a.get("hourly") or [])][-HOURS:]
        for a in accounts
    }
    top = max((max(values, default=0) for values in hourly.values()), default=0)
    lines.append([])
    name_width = max(8, min(20, width - HOURS - 36))
    lines.append(
        [(p.LOG_HEADER, f"{'account':<{name_width}}  {'usage per hour, last 24 h':<{HOURS}}  week: in+✎+out · re-billed")]
    )
    if not accounts:
        lines.append([(p.DIM, "No requests recorded in the last week.")])
    for account in accounts:
        name = str(account.get("name"))
        values = hourly.get(name) or []
        values = [0] * (HOURS - len(values)) + values
        week_totals = account.get("week") if isinstance(account.get("week"), Mapping) else {}
        used = number(week_totals, "inputTokens") + number(week_totals, "cacheCreationTokens") + number(
            week_totals, "outputTokens"
        )
        lines.append(
            [
                (p.NAME, fit_name(name, name_width)),
                (None, "  "),
                (p.BAR_OK, sparkline(values, top)),
                (None, "  "),
                (p.TEXT, f"{tokens(used)}"),
                # Worded, not ✎: elsewhere ✎ counts every cache write.
                (p.DIM, f" · {number(week_totals, 'requests')} req · re-billed "),
                (p.TEXT, tokens(number(week_totals, "rebilled"))),
            ]
        )
    lines.append([])
    scale = f"top of scale {tokens(top)}/h" if top else "no usage in the last 24 h"
    lines.append([(p.DIM, f"{'':<{name_width}}  -24h{'now':>{HOURS - 4}}  {scale}")])
    lines.append([(p.DIM, "naive≈: what naive rotation would have re-billed here (an estimate)")])
    dropped = number(history, "dropped") + number(history, "lost")
    if dropped:
        lines.append([(p.WARN, f"{dropped} request(s) not recorded (queue full or database failing)")])
    return [clip_line(line, width) for line in lines]


class HistoryView(urwid.WidgetWrap):
    """
    The history as a box over the dashboard; C{h}, Esc or C{q} close it.
    Rebuilt from the model on every render, so it follows the snapshots.
    """

    help = HELP

    def __init__(self, model: Model, on_close: Callable[[], None], width: int = WIDTH) -> None:
        self.model = model
        self.on_close = on_close
        self.width = width
        super().__init__(self._build())

    def _build(self) -> urwid.Widget:
        rows = [urwid.Text(line or "", wrap="clip") for line in history_lines(self.model.snapshot, self.width - 2)]
        box = urwid.LineBox(urwid.Pile(rows), title="Usage history", title_attr=p.DIALOG_TITLE)
        return urwid.AttrMap(box, p.DIALOG)

    def render(self, size: Any, focus: bool = False) -> urwid.Canvas:
        self._w = self._build()
        return super().render(size, focus)

    def rows(self, size: Any, focus: bool = False) -> int:
        self._w = self._build()
        return super().rows(size, focus)

    def selectable(self) -> bool:
        return True

    def keypress(self, size: Any, key: str) -> str | None:
        if keymap.action(keymap.HISTORY_VIEW, key) == keymap.CANCEL:
            self.on_close()
        return None
