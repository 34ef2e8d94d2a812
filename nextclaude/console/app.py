"""
The console application: it keeps the model fed from the proxy over the
control client (snapshots polled, events pushed), turns keys into client
calls, ticks the countdowns and batches redraws; L{run_console} puts it on
the terminal with urwid's Twisted event loop.

Everything reactor-bound takes the reactor as a parameter, so tests drive it
with a L{twisted.internet.task.Clock} and a fake client.
"""

from __future__ import annotations

import enum
import inspect
import time
from contextlib import nullcontext, suppress
from typing import Any, Awaitable, Callable, Coroutine, Mapping, Protocol, cast

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from nextclaude import events
from nextclaude.activity import LogRouter
from nextclaude.console import keymap
from nextclaude.console import palette as p
from nextclaude.console.views import LocalTime, Model
from nextclaude.console.views import legend_paragraphs
from nextclaude.console.widgets import AddForm, Dashboard, Menu, Root, TextPage, confirm_dialog

# How often countdowns tick and the snapshot is fetched again, and the
# shortest time between two redraws (at most four a second).
TICK = 1.0
REDRAW_INTERVAL = 0.25
# How long a message stays in the footer.
MESSAGE_SECONDS = 6.0

_REQUEST_KINDS = frozenset({events.REQUEST_STARTED, events.REQUEST_ROUTED, events.REQUEST_FINISHED})


class ConsoleClient(Protocol):
    """
    What the console needs from the control client (L{nextclaude.control}):
    structural, so tests pass a fake and this package never imports the
    AMP code.
    """

    @property
    def on_disconnect(self) -> Deferred[Any]: ...

    def snapshot(self) -> Deferred[dict[str, Any]]: ...

    def subscribe(self, on_event: Callable[[dict[str, Any]], None]) -> Any: ...

    def pin(self, name: str | None) -> Deferred[Any]: ...

    def add_api_key(self, name: str, key: str) -> Deferred[Any]: ...

    def import_credentials(self, json_text: str, name: str | None = None) -> Deferred[Any]: ...

    def remove(self, name: str) -> Deferred[Any]: ...

    def reload(self) -> Deferred[Any]: ...

    def set_enabled(self, name: str, enabled: bool) -> Deferred[Any]: ...

    def set_priority(self, name: str, priority: int) -> Deferred[Any]: ...

    def close(self) -> Any: ...


class Reactor(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall: ...


class Outcome(enum.Enum):
    """
    Why the console ended.
    """

    DETACHED = "detached"  # q on a proxy running elsewhere: it keeps running
    STOPPED = "stopped"  # q on the proxy this process runs: it was stopped
    DISCONNECTED = "disconnected"  # the proxy went away under the console
    INTERRUPTED = "interrupted"  # the reactor shut down (SIGINT, SIGTERM)


class Redrawer:
    """
    Batch redraws: C{mark()} asks for one, and the draw happens at most
    C{interval} later, once for however many marks came in between — an
    event storm costs a handful of draws a second, not one per event.
    """

    _log = Logger()

    def __init__(self, reactor: Reactor, draw: Callable[[], None], interval: float = REDRAW_INTERVAL) -> None:
        self._reactor = reactor
        self.draw = draw
        self.interval = interval
        self._pending: IDelayedCall | None = None
        self.draws = 0

    def mark(self) -> None:
        if self._pending is None:
            self._pending = self._reactor.callLater(self.interval, self._flush)

    def _flush(self) -> None:
        self._pending = None
        self.draws += 1
        try:
            self.draw()
        except Exception:
            self._log.failure("console redraw failed")

    def cancel(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


def _describe(failure: Failure) -> str:
    value = failure.value
    text = str(value).strip()
    return text or type(value).__name__


def _as_deferred(result: Any) -> Any:
    # stop_proxy may be an async def (or return any awaitable).
    if inspect.isawaitable(result) and not isinstance(result, Deferred):
        return ensureDeferred(cast(Coroutine[Any, Any, Any], result))
    return result


def default_api_key_name(key: str) -> str:
    """
    The name an API key gets when the form leaves it empty: its last four
    characters tell keys apart without showing the secret.
    """
    return f"api-key-{key[-4:]}"


class ConsoleApp:
    """
    The console's behaviour, without a terminal: the root widget to show,
    the model it renders, and C{done}, firing with an L{Outcome} when the
    console should go away.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Reactor,
        client: ConsoleClient,
        *,
        owns_proxy: bool,
        stop_proxy: Callable[[], Any] | None = None,
        draw: Callable[[], None] = lambda: None,
        localtime: LocalTime = time.localtime,
        tick: float = TICK,
        redraw_interval: float = REDRAW_INTERVAL,
        title: str | None = None,
        intro: list[str] | None = None,
        traffic_done: Deferred[Any] | None = None,
    ) -> None:
        """
        C{title} replaces the title bar's first words; C{intro} paragraphs
        open over the dashboard at start; when C{traffic_done} fires (the
        demo's simulated traffic ended) the footer says so and C{q} quits
        without asking.
        """
        self.reactor = reactor
        self.client = client
        self.owns_proxy = owns_proxy
        self.stop_proxy = stop_proxy
        self.tick_interval = tick
        self.model = Model(clock=reactor.seconds, localtime=localtime)
        self.dashboard = Dashboard(self.model)
        self.root = Root(self.dashboard, self.on_key)
        self.redraw = Redrawer(reactor, draw, redraw_interval)
        self.done: Deferred[Outcome] = Deferred()
        self.stopping = False
        self._fetching = False
        self._ticker = LoopingCall(self.tick)
        self._ticker.clock = reactor  # type: ignore[assignment]
        self._message_call: IDelayedCall | None = None
        self._started = False
        self.traffic_ended = False
        self.model.title = title
        self._intro = intro
        if traffic_done is not None:
            traffic_done.addBoth(self._traffic_ended)
        self._show_keys()

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """
        Subscribe to events, fetch the first snapshot, start ticking, and
        watch for the proxy going away.
        """
        if self._started:
            return
        self._started = True
        if self._intro:
            self.open(TextPage("What you are looking at", self._intro, self.close))
        self.client.on_disconnect.addBoth(self._disconnected)
        if self.done.called:
            return
        try:
            subscribed = self.client.subscribe(self.on_event)
        except Exception:
            subscribed = Failure()
        if isinstance(subscribed, (Deferred, Failure)):
            maybeDeferred(lambda: subscribed).addErrback(self._failed, "subscribing to events")
        self.fetch()
        # A LoopingCall keeps the ticks on whole seconds from the start, however late one runs.
        self._ticker.start(self.tick_interval, now=False)

    def stop(self) -> None:
        """
        Stop every timer this app started (the client is the caller's).
        """
        if self._ticker.running:
            self._ticker.stop()
        if self._message_call is not None and self._message_call.active():
            self._message_call.cancel()
        self._message_call = None
        self.redraw.cancel()

    def finish(self, outcome: Outcome) -> None:
        if not self.done.called:
            self.stop()
            self.done.callback(outcome)

    def _traffic_ended(self, result: Any) -> Any:
        if not self.done.called:
            self.traffic_ended = True
            self.model.notice = (p.MESSAGE, "The simulated traffic has ended: press q to quit and see the summary.")
            self._show_keys()
            self.redraw.mark()
        return result

    def _disconnected(self, result: Any) -> Any:
        if not self.stopping:
            self.finish(Outcome.DISCONNECTED)
        return result

    # -- feeding the model -----------------------------------------------------------

    def on_event(self, event: Mapping[str, Any]) -> None:
        """
        One event from the proxy (replayed or live): into the log.  A
        routing event (armed, pin changed, …) changed an account, so the
        snapshot is fetched at once; request events wait for the next tick,
        which keeps a busy proxy from being asked for a snapshot per request.
        """
        if not isinstance(event, Mapping):
            return
        self.model.add_event(event)
        if event.get("kind") not in _REQUEST_KINDS:
            self.fetch()
        self.redraw.mark()

    def fetch(self) -> None:
        """
        Ask for a snapshot unless one is on its way.
        """
        if self._fetching or self.done.called:
            return
        self._fetching = True
        result: Any
        try:
            result = self.client.snapshot()
        except Exception:
            result = Failure()
        maybeDeferred(lambda: result).addCallbacks(self._got_snapshot, self._snapshot_failed)

    def _got_snapshot(self, snapshot: Any) -> None:
        self._fetching = False
        if isinstance(snapshot, Mapping):
            self.model.take_snapshot(snapshot)
            self.redraw.mark()

    def _snapshot_failed(self, failure: Failure) -> None:
        self._fetching = False
        if not self.done.called:
            self.say(f"status failed: {_describe(failure)}", error=True)

    def tick(self) -> None:
        """
        Once a second: countdowns move on, and a fresh snapshot is asked for.
        """
        self.fetch()
        self.redraw.mark()

    # -- footer ----------------------------------------------------------------------

    def _show_keys(self) -> None:
        dialog = self.root.dialog
        if dialog is not None:
            self.model.keys = list(getattr(dialog, "help", keymap.MENU_HELP))
        else:
            keys = list(keymap.DASHBOARD_HELP)
            if self.owns_proxy and not self.traffic_ended:
                keys = [(key, "quit+stop proxy" if label == "quit" else label) for key, label in keys]
            self.model.keys = keys

    def say(self, text: str, *, error: bool = False) -> None:
        """
        Show a message in the footer for a few seconds (errors too: the
        console never prints behind urwid's back).
        """
        self.model.message = (p.MESSAGE_ERROR if error else p.MESSAGE, text)
        if self._message_call is not None and self._message_call.active():
            self._message_call.cancel()
        self._message_call = self.reactor.callLater(MESSAGE_SECONDS, self._clear_message)
        self.redraw.mark()

    def _clear_message(self) -> None:
        self._message_call = None
        self.model.message = None
        self.redraw.mark()

    def _failed(self, failure: Failure, doing: str) -> None:
        self.say(f"{doing} failed: {_describe(failure)}", error=True)

    # -- dialogs -----------------------------------------------------------------------

    def open(self, dialog: Any) -> None:
        self.root.open(dialog)
        self._show_keys()
        self.redraw.mark()

    def close(self) -> None:
        self.root.close()
        self._show_keys()
        self.redraw.mark()

    # -- keys --------------------------------------------------------------------------

    def on_key(self, key: str) -> bool:
        """
        A key pressed on the dashboard; True when it means something here.
        """
        action = keymap.action(keymap.DASHBOARD, key)
        handler = {
            keymap.PIN: self.pin_menu,
            keymap.ADD: self.add_form,
            keymap.REMOVE: self.remove_menu,
            keymap.TOGGLE: self.toggle_menu,
            keymap.PRIORITY: self.priority_menu,
            keymap.RELOAD: self.reload,
            keymap.HISTORY: self.history,
            keymap.LEGEND: self.legend,
            keymap.QUIT: self.quit,
        }.get(action or "")
        if handler is None:
            return False
        if not self.stopping:
            handler()
        return True

    def _call(self, doing: str, call: Callable[[], Any], done: Callable[[Any], str | None]) -> Deferred[Any]:
        """
        Make one client call: its result becomes a footer message, a failure
        an error message; the snapshot is fetched again either way.
        """
        result = maybeDeferred(call)

        def succeeded(value: Any) -> None:
            text = done(value)
            if text:
                self.say(text)

        result.addCallbacks(succeeded, self._failed, errbackArgs=(doing,))
        result.addBoth(lambda _: self.fetch())
        return result

    def _account_entries(self) -> list[tuple[list[tuple[str | None, str]], str]]:
        pinned = self.model.pinned
        entries = []
        for account in self.model.accounts:
            name = str(account.get("name"))
            windows = account.get("windows") or {}
            five = (windows.get("5h") or {}).get("utilization")
            label: list[tuple[str | None, str]] = [
                (p.MANUAL if name == pinned else None, "★ " if name == pinned else "  "),
                (None, name),
                (None, f"  {account.get('tier') or '?'}  {account.get('status') or '?'}"),
            ]
            if isinstance(five, (int, float)):
                label.append((None, f"  5h {round(five * 100)}%"))
            entries.append((label, name))
        return entries

    def pin_menu(self) -> None:
        """
        C{s}: choose the account to pin; choosing the pinned one (★) clears
        the pin.
        """
        entries = self._account_entries()
        if not entries:
            self.say("no accounts to pin", error=True)
            return
        pinned = self.model.pinned
        note = "Pin: every conversation moves to the chosen account."
        if pinned:
            note += f" Choose ★ {pinned} again to unpin it."
        self.open(Menu("Pin an account", entries, self._pin_chosen, self.close, note=note))

    def _pin_chosen(self, name: str) -> None:
        self.close()
        if name == self.model.pinned:
            self._call("unpinning", lambda: self.client.pin(None), lambda _: f"unpinned {name}")
        else:
            self._call("pinning", lambda: self.client.pin(name), lambda _: f"pinned {name}")

    def remove_menu(self) -> None:
        """
        C{r}: choose an account, then confirm its removal.
        """
        entries = self._account_entries()
        if not entries:
            self.say("no accounts to remove", error=True)
            return
        self.open(Menu("Remove an account", entries, self._remove_chosen, self.close))

    def _remove_chosen(self, name: str) -> None:
        def yes() -> None:
            self.close()
            self._call("removing", lambda: self.client.remove(name), lambda _: f"removed {name}")

        question = f"Remove {name}? Its credentials are deleted from the configuration."
        self.open(confirm_dialog("Remove account", question, f"Remove {name}", yes, self.close))

    def toggle_menu(self) -> None:
        """
        C{d}: choose an account to disable (it serves nothing, keeps its
        tokens fresh) or, if it is disabled, to enable again.
        """
        entries = self._account_entries()
        if not entries:
            self.say("no accounts to disable or enable", error=True)
            return
        note = "A disabled account serves nothing until it is enabled again."
        self.open(Menu("Disable or enable an account", entries, self._toggle_chosen, self.close, note=note))

    def _toggle_chosen(self, name: str) -> None:
        self.close()
        status = next((a.get("status") for a in self.model.accounts if a.get("name") == name), None)
        enable = status == "disabled"
        self._call(
            "enabling" if enable else "disabling",
            lambda: self.client.set_enabled(name, enable),
            lambda _: f"{'enabled' if enable else 'disabled'} {name}",
        )

    def priority_menu(self) -> None:
        """
        C{p}: choose an account, then its priority (lower is used first).
        """
        entries = self._account_entries()
        if not entries:
            self.say("no accounts to order", error=True)
            return
        self.open(Menu("Set an account's priority", entries, self._priority_account_chosen, self.close))

    def _priority_account_chosen(self, name: str) -> None:
        self.close()
        current = next((a.get("priority") for a in self.model.accounts if a.get("name") == name), None)
        current = current if isinstance(current, int) else 0
        # The values people use are small; a current one outside them
        # stays choosable (`nextclaude priority` takes any integer).
        values = sorted(set(range(10)) | {current})
        entries: list[tuple[list[tuple[str | None, str]], int]] = [
            ([(None, ("● " if value == current else "  ") + str(value))], value) for value in values
        ]
        note = f"Lower is used first; {name} has {current}."
        self.open(
            Menu(
                f"Priority of {name}",
                entries,
                lambda value: self._priority_chosen(name, value),
                self.close,
                note=note,
                focus=values.index(current),
            )
        )

    def _priority_chosen(self, name: str, value: int) -> None:
        self.close()
        self._call(
            "setting the priority",
            lambda: self.client.set_priority(name, value),
            lambda _: f"{name} has priority {value}",
        )

    def add_form(self) -> None:
        """
        C{a}: the add-account form.
        """
        self.open(AddForm(self._add_submitted, self.close))

    def _add_submitted(self, kind: str, secret: str, name: str | None) -> None:
        self.close()
        if kind == "json":
            self._call(
                "importing credentials",
                lambda: self.client.import_credentials(secret, name=name),
                lambda value: f"imported {value if isinstance(value, str) else name or 'the credentials'}",
            )
        else:
            chosen = name or default_api_key_name(secret)
            self._call(
                "adding the API key",
                lambda: self.client.add_api_key(chosen, secret),
                lambda _: f"added {chosen}",
            )

    def reload(self) -> None:
        """
        C{R}: the proxy reads its configuration again.
        """
        self.say("reloading the configuration…")
        self._call("reloading", self.client.reload, lambda _: "configuration reloaded")

    def history(self) -> None:
        """
        C{h}: the usage history over the dashboard (C{h} or Esc again closes it).
        """
        from nextclaude.console.history import HistoryView

        self.open(HistoryView(self.model, self.close))

    def legend(self) -> None:
        """
        C{?}: what the figures, statuses, flags and routing reasons mean.
        """
        self.open(TextPage("Legend", legend_paragraphs(), self.close))

    def quit(self) -> None:
        """
        C{q}: detach; when this process runs the proxy, ask first, then stop
        it — unless the demo's traffic has ended, when there is nothing
        left to lose.
        """
        if self.traffic_ended:
            self._stop_and_quit()
            return
        if not self.owns_proxy:
            self.finish(Outcome.DETACHED)
            return
        question = "This console runs the proxy: quitting stops it, and Claude Code loses its endpoint."
        self.open(
            confirm_dialog("Quit", question, "Stop the proxy and quit", self._stop_and_quit, self.close, extra_yes=("q",))
        )

    def _stop_and_quit(self) -> None:
        self.close()
        self.stopping = True
        self.model.keys = []
        self.say("stopping the proxy…")
        self.reactor.callLater(0, self._run_stop)

    def _run_stop(self) -> None:
        if self.stop_proxy is None:
            self.finish(Outcome.STOPPED)
            return
        stopped = maybeDeferred(self.stop_proxy).addCallback(_as_deferred)
        stopped.addErrback(lambda failure: self._log.failure("stopping the proxy failed", failure))
        stopped.addBoth(lambda _: self.finish(Outcome.STOPPED))


# -- the terminal ----------------------------------------------------------------


async def run_console(
    reactor: Any,
    client: ConsoleClient,
    *,
    owns_proxy: bool,
    stop_proxy: Callable[[], Deferred[Any] | Awaitable[Any] | None] | None = None,
    screen: Any = None,
    log_router: LogRouter | None = None,
    log_path: str | None = None,
    theme: str = p.AUTO,
    app_options: Mapping[str, Any] | None = None,
) -> Outcome:
    """
    Show the console on the terminal until the user quits or the proxy goes
    away, and give the terminal back in every case (also when the reactor
    shuts down under it).

    C{reactor} must be running (call this from C{task.react} or
    C{Deferred.fromCoroutine} once it runs); urwid joins it through
    C{TwistedEventLoop(reactor, manage_reactor=False)}, so the caller keeps
    owning the reactor.  C{stop_proxy} is called (and awaited) when the user
    confirms C{q} on a console that owns the proxy.  With C{log_router},
    log output goes to C{log_path} (or nowhere) while the console runs.
    C{theme} names the palette (L{nextclaude.console.palette.THEMES});
    C{app_options} go to L{ConsoleApp} (the demo's story).
    """
    import urwid

    app = ConsoleApp(reactor, client, owns_proxy=owns_proxy, stop_proxy=stop_proxy, **(app_options or {}))
    if screen is None:
        screen = urwid.display.raw.Screen()
    loop = urwid.MainLoop(
        app.root,
        p.palette(theme),
        screen=screen,
        event_loop=urwid.TwistedEventLoop(reactor=reactor, manage_reactor=False),
        handle_mouse=False,
    )
    app.redraw.draw = loop.draw_screen
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            restored = True
            loop.stop()

    def shutting_down() -> None:
        app.finish(Outcome.INTERRUPTED)
        restore()

    with log_router.diverted(log_path) if log_router is not None else nullcontext():
        try:
            loop.start()
        except BaseException:
            # start() may fail after taking the terminal (hooks, screen).
            with suppress(Exception):
                loop.stop()
            raise
        trigger = reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
        try:
            app.start()
            return await app.done
        finally:
            app.stop()
            restore()
            # Already gone when the shutdown it waited for is under way.
            with suppress(ValueError, KeyError):
                reactor.removeSystemEventTrigger(trigger)
