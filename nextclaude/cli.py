"""
The `nextclaude` command.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from nextclaude import __version__

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from nextclaude.config import AccountConfig, Config


def _server(args: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogBeginner
    from twisted.python.usage import UsageError

    from nextclaude import tap
    from nextclaude.control import ControlError
    from nextclaude.paths import FileProblem
    from nextclaude.service import ProxyService

    try:
        port = tap.check_port(args.port) if args.port is not None else None
        host = tap.check_host(args.host) if args.host is not None else None
        upstream = tap.check_upstream(args.upstream) if args.upstream is not None else None
        config = tap.load_proxy_config(args.config, port=port, host=host, upstream=upstream, log_to=args.log_to)
        if args.log_bodies and config.log_dir is None:
            raise UsageError("--log-bodies needs a request log: give --log-to DIR or set logDir.")
        # The same early checks as under twistd, so both say the same line.
        tap.preflight(config)
    except (UsageError, tap.StartupRefused) as error:
        print(f"nextclaude: {error}", file=sys.stderr)
        return 1

    from nextclaude.activity import LogRouter, terminal_observer

    # Plain log lines in the project's own format (activity rows in the
    # console's columns, no Twisted factory chatter), unless the console
    # takes over the terminal: then they go to a file beside the config.
    log_router = LogRouter(terminal_observer(sys.stdout))
    globalLogBeginner.beginLoggingTo([log_router], redirectStandardIO=False)
    try:
        service = ProxyService(reactor, config, log_bodies=args.log_bodies)
        service.privilegedStartService()
    except (ControlError, FileProblem) as error:
        # The start-up check of the control socket: another proxy, or
        # something there that cannot be talked to.
        print(f"nextclaude: {error}", file=sys.stderr)
        return 1
    except CannotListenError as error:
        # A race lost since the early check: the same one line.
        if service.control is not None:
            service.control.stopService()
        proxy = config.proxy
        print(f"nextclaude: {tap.listen_problem(proxy.host, proxy.port, error, config.path)}", file=sys.stderr)
        return 1
    service.on_stop_request = lambda: _begin_stop(reactor, service)
    service.startService()
    host, bound = service.address()
    print(f"NextClaude {__version__} listening on http://{host}:{bound} with {len(config.accounts)} account(s)", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.addSystemEventTrigger("before", "shutdown", exit_watchdog, service.stop_bound() + 1.0)
    # The reactor installs its own handlers when it starts: ours must come
    # after them, or they would be replaced.
    reactor.callWhenRunning(_install_stop_signals, reactor, service)
    if not args.no_console and sys.stdin.isatty() and sys.stdout.isatty():
        reactor.callWhenRunning(_attach_console, reactor, service, log_router, console_theme(args, config))
    reactor.run()
    return 0


def exit_watchdog(
    seconds: float,
    start: "Callable[[float, Callable[[], None]], Any] | None" = None,
    exit: "Callable[[int], Any] | None" = None,
) -> None:
    """
    Last resort for a stop: if the process still runs C{seconds} from now,
    say so in one line and exit with status 1.  The proxy's own stop gives
    up on hung services before that; this covers what the reactor itself
    waits for at shutdown (it joins its thread pool, where a DNS lookup can
    hang) or code that blocks the reactor.  A daemon thread, so a process
    that exits in time is not held back by it.
    """
    import os
    import threading

    def expire() -> None:
        sys.stderr.write(f"nextclaude: stopping took longer than {seconds:g}s; exiting now\n")
        sys.stderr.flush()
        (exit or os._exit)(1)

    if start is not None:
        start(seconds, expire)
        return
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _attach_console(reactor: "Any", service: "Any", log_router: "Any", theme: str = "auto") -> None:
    """
    Run the console on this process's own proxy; quitting it (after it
    asks) stops the proxy and the process.
    """
    from twisted.internet.defer import Deferred
    from twisted.logger import Logger

    from nextclaude import control, paths
    from nextclaude.console.app import run_console

    async def attach() -> None:
        client = await control.connect(reactor, paths.socket_path(service.config.path))
        try:
            await run_console(
                reactor,
                client,
                owns_proxy=True,
                stop_proxy=service.stopService,
                log_router=log_router,
                theme=theme,
                log_path=str(console_log_path(service.config.path)),
            )
        finally:
            client.close()
        if reactor.running:
            reactor.stop()

    def failed(failure: "Any") -> None:
        if failure.check(control.ControlError):
            # The control channel's own trouble says what happened in one line.
            Logger().warn(
                "the console could not attach ({problem}); the proxy keeps running with plain logs",
                problem=str(failure.value),
            )
            return
        Logger().failure("the console failed; the proxy keeps running with plain logs", failure)

    Deferred.fromCoroutine(attach()).addErrback(failed)


def console_log_path(config_path: "Any") -> "Any":
    """
    Where log lines go while the console owns the terminal.
    """
    return config_path.parent / "nextclaude.log"


def _console(args: argparse.Namespace) -> int:
    from twisted.logger import globalLogBeginner

    from nextclaude import control, paths
    from nextclaude.account_commands import run_async
    from nextclaude.activity import LogRouter, terminal_observer
    from nextclaude.console.app import Outcome, run_console

    try:
        config_path = _existing_config_file(args)
        socket = paths.socket_path(config_path)
    except paths.FileProblem as error:
        print(f"nextclaude: {error}", file=sys.stderr)
        return 1
    if not sys.stdout.isatty():
        print("nextclaude: the console needs a terminal; use `nextclaude status` instead", file=sys.stderr)
        return 1
    from nextclaude.config import ConfigError, load_config

    try:
        theme = console_theme(args, load_config(config_path))
    except ConfigError:
        # The proxy runs on what it read; a file being edited must not keep
        # the console away (its theme falls back).
        theme = console_theme(args, None)
    # Outside the screen, the server's terminal lines: no Twisted chatter
    # (a connection factory starting, the main loop ending).
    log_router = LogRouter(terminal_observer(sys.stderr))
    globalLogBeginner.beginLoggingTo([log_router], redirectStandardIO=False)

    async def main(reactor: "Any") -> int:
        try:
            client = await control.connect(reactor, socket)
        except control.ControlError as error:
            print(f"nextclaude: {error}", file=sys.stderr)
            return 1
        try:
            outcome = await run_console(
                reactor,
                client,
                owns_proxy=False,
                log_router=log_router,
                log_path=str(console_log_path(config_path)),
                theme=theme,
            )
        finally:
            client.close()
        if outcome is Outcome.DISCONNECTED:
            print("nextclaude: the proxy went away", file=sys.stderr)
            return 1
        return 0

    return run_async(main)


def _login(args: argparse.Namespace) -> int:
    from nextclaude.account_commands import run_login

    return run_login(args)


def _import(args: argparse.Namespace) -> int:
    from nextclaude.account_commands import run_import

    return run_import(args)


def _install_stop_signals(reactor: "Any", service: "Any") -> None:
    """
    The first SIGINT or SIGTERM stops gracefully (in-flight requests get
    proxy.shutdownGrace to finish, state is saved); a second one exits at
    once.
    """
    import os
    import signal

    received: list[int] = []

    def on_signal(number: int, frame: object) -> None:
        received.append(number)
        if len(received) > 1:
            os._exit(128 + number)
        reactor.callFromThread(_begin_stop, reactor, service)

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, on_signal)


def _begin_stop(reactor: "Any", service: "Any") -> None:
    waiting = service.resource.in_flight()
    if waiting:
        print(
            f"Stopping: letting {waiting} request(s) finish (up to {service.config.proxy.shutdown_grace:g}s); "
            f"signal again to quit at once.",
            flush=True,
        )
    reactor.stop()


def _load(args: argparse.Namespace) -> "Config":
    """
    The config for a command that only reads it: never created or written
    (a mistyped --config must not leave a fresh file behind); a missing or
    broken one is a ConfigError, which main() prints as one line.
    """
    from nextclaude import paths
    from nextclaude.config import read_config

    return read_config(paths.config_file(args.config))


def _load_for_clients(args: argparse.Namespace) -> "Config":
    """
    The config for `env` and `run`, which hand its key to a client: a file
    without a key has never been started, so there is nothing to point at.
    """
    from nextclaude.config import ConfigError

    config = _load(args)
    if not config.proxy.api_key:
        raise ConfigError(
            config.path, "proxy.apiKey is not set yet; `nextclaude server` generates it on its first start"
        )
    return config


def _existing_config_file(args: argparse.Namespace) -> "Any":
    """
    The config file of a command that talks to the running proxy, which
    must exist: a mistyped --config should be named as such, not reported
    as "no proxy running".
    """
    from nextclaude import paths
    from nextclaude.config import MISSING_CONFIG, ConfigError

    path = paths.config_file(args.config)
    if not path.exists():
        raise ConfigError(path, MISSING_CONFIG)
    return path


def ask(question: str) -> str:
    """
    One answer typed at the terminal; end of input (Ctrl-D) is an empty
    answer, which every question here reads as "no".  Ctrl-C is left to
    main(), which ends the command with one line and status 130.
    """
    try:
        return input(question)
    except EOFError:
        print(file=sys.stderr)
        return ""


def _token_state(account: "AccountConfig", now: float) -> str:
    from nextclaude.humanize import duration

    if account.type == "apikey":
        return "API key"
    if account.expires_at is None:
        return "token, expiry unknown"
    left = account.expires_at / 1000 - now
    if left > 0:
        return f"valid for {duration(left)}"
    if account.refresh_token:
        return f"expired {duration(-left)} ago, refreshed on next use"
    return f"expired {duration(-left)} ago, no refresh token: log in again"


def _accounts(args: argparse.Namespace) -> int:
    import time

    config = _load(args)
    if not config.accounts:
        from nextclaude.config import NO_ACCOUNTS_MESSAGE

        print(NO_ACCOUNTS_MESSAGE.format(path=config.path))
        return 0
    from nextclaude.humanize import tier_label

    now = time.time()
    rows = [("NAME", "TYPE", "TIER", "PRIORITY", "STATE", "TOKEN", "SOURCE")]
    for account in config.accounts:
        source = f"imported from {account.import_from}" if account.import_from else "config file"
        rows.append(
            (
                account.name,
                account.type,
                tier_label(account.tier, account.type),
                str(account.priority),
                # A disabled account serves nothing: the listing must say
                # so, or it reads as ready (`nextclaude enable` undoes it).
                "enabled" if account.enabled else "disabled",
                _token_state(account, now),
                source,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if args.verbose and index > 0:
            account = config.accounts[index - 1]
            if account.email:
                print(f"    email: {account.email}")
            if account.account_uuid:
                print(f"    uuid: {account.account_uuid}")
            if account.scopes:
                print(f"    scopes: {' '.join(account.scopes)}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from nextclaude import paths
    from nextclaude.config import check_removal, raw_account_names, remove_account

    path = paths.config_file(args.config)
    # By name on the raw JSON: an account a hand edit broke must still be
    # removable.
    names = raw_account_names(path)
    if args.name not in names:
        listed = ", ".join(names) or "none"
        print(f"nextclaude: no account named {args.name!r} in {path} (accounts: {listed})", file=sys.stderr)
        return 1
    # The rest of the file must load, as `server` loads it (else main()
    # prints its one line): a proxy refusing the file would never drop
    # the account.  Before asking, so no answer is wasted.
    check_removal(path, args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            print("nextclaude: not removing without confirmation; pass --yes", file=sys.stderr)
            return 1
        answer = ask(f"Remove account {args.name!r} from {path}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing removed.")
            return 1
    if remove_account(path, args.name):
        print(f"Removed {args.name}. A running proxy drops it within seconds.")
        return 0
    print(f"nextclaude: {args.name!r} was already gone", file=sys.stderr)
    return 1


def _account_switch(args: argparse.Namespace) -> int:
    """
    `disable NAME`, `enable NAME`, `priority NAME N`: one locked operation
    on the config file each, then the running proxy is asked to reload at
    once (its file watcher would within seconds anyway).
    """
    from nextclaude.config import set_enabled, set_priority

    # The whole file, validated as `server` reads it (a broken one is
    # main()'s one line): a proxy refusing the file would never see the
    # change, so "takes effect when one starts" would be false.
    config = _load(args)
    path = config.path
    before = config.account(args.name)
    if before is None:
        listed = ", ".join(account.name for account in config.accounts) or "none"
        print(f"nextclaude: no account named {args.name!r} in {path} (accounts: {listed})", file=sys.stderr)
        return 1
    if args.command == "priority":
        changed = before.priority != args.number
        set_priority(path, args.name, args.number)
        done = f"{args.name} has priority {args.number} (lower is used first)"
    else:
        enabled = args.command == "enable"
        changed = before.enabled is not enabled
        set_enabled(path, args.name, enabled)
        done = (
            f"{args.name} is enabled"
            if enabled
            else f"{args.name} is disabled: it serves nothing until `nextclaude enable {args.name}`"
        )
    if not changed:
        done += " (it already was)"
    print(f"{done}. {_reload_running(path)}")
    return 0


def _reload_running(path: "Any") -> str:
    """
    Ask the proxy running on C{path} to reload now; what to tell the user.
    """
    from nextclaude import paths
    from nextclaude.control import ControlError, NotRunning, reload_proxy

    try:
        reload_proxy(paths.socket_path(path))
    except NotRunning:
        return "No proxy is running; it takes effect when one starts."
    except (ControlError, paths.FileProblem) as error:
        return f"The running proxy did not reload ({error}); it re-reads the file within seconds."
    return "The running proxy has it now."


def _running_snapshot(config: "Config", warn_if_absent: bool = False) -> dict | None:
    """
    The running proxy's status over its control socket, or None when no
    proxy answers for this config.  With C{warn_if_absent}, no proxy is
    worth one line on stderr; a socket that fails in any other way always
    is, since the address printed may then be the wrong one.
    """
    from nextclaude import paths
    from nextclaude.control import ControlError, NotRunning, read_snapshot

    try:
        return read_snapshot(paths.socket_path(config.path))
    except NotRunning:
        if warn_if_absent:
            print(NO_PROXY_WARNING.format(path=config.path), file=sys.stderr)
        return None
    except (ControlError, paths.FileProblem) as error:
        print(f"nextclaude: warning: {error}; using the address in {config.path}", file=sys.stderr)
        return None


def client_environment(config: "Config", api_key_mode: bool, warn_if_absent: bool = False) -> dict[str, str]:
    """
    What Claude Code needs to use the proxy: the running proxy's real
    address when one answers on the control socket, else the file's.  By
    default the key travels in a custom header, so Claude Code keeps its
    subscription mode (1-hour cache, its own login); API-key mode swaps
    that for ANTHROPIC_API_KEY.
    """
    host, port = config.proxy.host, config.proxy.port
    running = _running_snapshot(config, warn_if_absent)
    if running is not None:
        listen = running.get("listen") or {}
        if isinstance(listen.get("host"), str) and isinstance(listen.get("port"), int):
            host, port = listen["host"], listen["port"]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    environment = {"ANTHROPIC_BASE_URL": f"http://{host}:{port}"}
    if api_key_mode:
        environment["ANTHROPIC_API_KEY"] = config.proxy.api_key
    else:
        environment["ANTHROPIC_CUSTOM_HEADERS"] = f"x-nextclaude-key: {config.proxy.api_key}"
    return environment


API_KEY_MODE_WARNING = (
    "nextclaude: warning: with ANTHROPIC_API_KEY set, Claude Code leaves subscription mode: "
    "it stops asking for the 1-hour prompt cache, so idle conversations go cold after 5 "
    "minutes and cost more quota. Leave out --api-key-mode unless your client needs it."
)


NO_PROXY_WARNING = (
    "nextclaude: warning: no NextClaude proxy is running for {path}; these point at the address in "
    "that file. Start it with `nextclaude server` (or install it as a service: `nextclaude service install`)."
)


def _env(args: argparse.Namespace) -> int:
    import shlex

    config = _load_for_clients(args)
    # The exports are printed whatever happens (shell rc files eval them);
    # a proxy that is not there is worth one line on stderr.
    environment = client_environment(config, args.api_key_mode, warn_if_absent=True)
    if args.api_key_mode:
        print(API_KEY_MODE_WARNING, file=sys.stderr)
    for name, value in environment.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import os
    import shutil

    config = _load_for_clients(args)
    claude = shutil.which("claude")
    if claude is None:
        print(
            "nextclaude: `claude` is not on PATH. Install Claude Code "
            "(npm install -g @anthropic-ai/claude-code) or use `nextclaude env` "
            "to set up another client.",
            file=sys.stderr,
        )
        return 127
    arguments = list(args.arguments)
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    if not args.no_check:
        # Claude Code retries a dead address silently for minutes: better
        # to refuse here, in one line, than to start it at nothing.
        from nextclaude import paths
        from nextclaude.control import ControlError, NotRunning, read_snapshot

        try:
            read_snapshot(paths.socket_path(config.path))
        except NotRunning:
            print(
                f"nextclaude: no NextClaude proxy is running for {config.path}; start it with "
                "`nextclaude server` in another terminal (or `nextclaude service install`), "
                "or pass --no-check to start Claude Code anyway",
                file=sys.stderr,
            )
            return 1
        except ControlError as error:
            print(f"nextclaude: {error}; pass --no-check to start Claude Code anyway", file=sys.stderr)
            return 1
    environment = dict(os.environ)
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        # Either would switch Claude Code out of subscription mode.
        environment.pop(name, None)
    environment.update(client_environment(config, api_key_mode=False))
    # Replacing this process passes Claude Code's exit status (and signals)
    # straight through.
    os.execve(claude, [claude, *arguments], environment)
    return 0  # not reached


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    from pathlib import Path

    from nextclaude import paths
    from nextclaude.control import ControlError, NotRunning, read_snapshot
    from nextclaude.statusview import render_status

    config_path = _existing_config_file(args)
    try:
        snapshot = read_snapshot(paths.socket_path(config_path))
    except (ControlError, paths.FileProblem) as error:
        print(f"nextclaude: {error}", file=sys.stderr)
        if isinstance(error, NotRunning):
            _check_config(config_path)
        return 1
    served = snapshot.get("config")
    if isinstance(served, str) and not _same_file(Path(served), config_path):
        # One proxy per config directory: a sibling file's status is that proxy's.
        print(f"nextclaude: note: the proxy running here serves {served}, not {config_path}", file=sys.stderr)
    print(json.dumps(snapshot, indent=2) if args.json else render_status(snapshot, time.time()))
    return 0


def _same_file(one: "Path", other: "Path") -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return one.resolve() == other.resolve()


def _check_config(path: "Path") -> None:
    """Say what is wrong with a config file no proxy runs on, if anything (never writes it)."""
    from nextclaude.config import read_config
    from nextclaude.paths import FileProblem

    try:
        read_config(path)
    except FileProblem as error:
        print(f"nextclaude: the config itself is broken: {error}", file=sys.stderr)


def _stop(args: argparse.Namespace) -> int:
    from nextclaude import paths
    from nextclaude.control import NotRunning, stop_proxy

    config_path = _existing_config_file(args)

    def announce(answer: dict) -> None:
        waiting = answer["in_flight"]
        if waiting:
            print(
                f"Stopping the NextClaude proxy (pid {answer['pid']}): letting {waiting} request(s) in flight "
                f"finish, up to {answer['grace']:g}s (longer ones are cut)…",
                flush=True,
            )
        else:
            print(f"Stopping the NextClaude proxy (pid {answer['pid']}): no requests in flight…", flush=True)

    try:
        stop_proxy(paths.socket_path(config_path), announce)
    except NotRunning:
        print(f"nextclaude: no NextClaude proxy is running for {config_path}; nothing to stop", file=sys.stderr)
        return 1
    print("Stopped: the requests in flight are done and the state is saved.")
    return 0


def _service(args: argparse.Namespace) -> int:
    from nextclaude import paths, units
    from nextclaude.config import ConfigError, read_config

    config_path = paths.config_file(args.config)
    # Always named: a service manager's environment has neither
    # $NEXTCLAUDE_CONFIG nor the shell's $XDG_CONFIG_HOME.
    command = units.server_command(config_path)
    grace = 30.0
    warning = None
    try:
        config = read_config(config_path)
        grace = config.proxy.shutdown_grace
        if not config.accounts:
            warning = f"{config_path} has no accounts yet: the service cannot start until you add one"
    except ConfigError as error:
        warning = f"{error}; the service cannot start until that is fixed"
    unit = units.render(args.kind or units.default_kind(), command, grace)
    if args.action == "print":
        sys.stdout.write(unit.text)
    else:
        done = units.install(unit)
        print(f"{done} {unit.path}." if done != "Unchanged" else f"{unit.path} is already up to date.")
        print(units.next_steps(unit))
    if warning is not None:
        print(f"nextclaude: warning: {warning}", file=sys.stderr)
    return 0


def _usage(args: argparse.Namespace) -> int:
    from nextclaude.usage_report import run_usage

    return run_usage(args)


def _demo(args: argparse.Namespace) -> int:
    from nextclaude import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nextclaude",
        description="A cache-aware multi-account proxy for Claude Code.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $NEXTCLAUDE_CONFIG, else config.json in the user config directory)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    server = commands.add_parser("server", help="run the proxy in the foreground")
    server.add_argument("--port", "-p", help="port to listen on (overrides proxy.port; 0 picks a free one)")
    server.add_argument("--host", help="interface to listen on (overrides proxy.host)")
    server.add_argument("--upstream", metavar="URL", help="upstream API base URL (overrides upstream)")
    server.add_argument(
        "--log-to", metavar="DIR", help="append one JSON line per request to a daily file in DIR (overrides logDir)"
    )
    server.add_argument(
        "--log-bodies", action="store_true", help="with a request log, also keep every request's and response's body"
    )
    server.add_argument("--no-console", action="store_true", help="plain log lines instead of the live console")
    _add_theme_argument(server)
    server.set_defaults(handler=_server)

    login = commands.add_parser("login", help="add a Claude subscription account (browser, OAuth) or an API key")
    login.add_argument("--api", action="store_true", help="add an Anthropic API key instead (read without echo)")
    login.add_argument("--manual", action="store_true", help="paste a code#state from the browser instead of a local callback")
    login.add_argument("--no-browser", action="store_true", help="only print the URL; do not try to open a browser")
    login.add_argument(
        "--key-stdin", action="store_true", help="with --api: read the key from standard input, without a prompt"
    )
    login.add_argument("--name", help="the account's name (default: its e-mail address)")
    login.add_argument(
        "--replace", action="store_true", help="replace an account of the other type that has this --name"
    )
    login.set_defaults(handler=_login)

    import_ = commands.add_parser("import", help="import the account Claude Code is logged in with")
    source = import_.add_mutually_exclusive_group()
    source.add_argument(
        "--from",
        dest="from_path",
        metavar="PATH",
        help="Claude Code's credential file (default: $CLAUDE_CONFIG_DIR or ~/.claude/.credentials.json; the Keychain on macOS)",
    )
    source.add_argument("--json", metavar="JSON", help="the credentials as JSON text (flat or nested)")
    import_.add_argument("--name", help="the account's name (default: its e-mail address)")
    import_.add_argument(
        "--replace", action="store_true", help="replace an API-key account that has this --name"
    )
    import_.set_defaults(handler=_import)

    accounts = commands.add_parser("accounts", help="list the accounts with their tier and token status")
    accounts.add_argument("-v", "--verbose", action="store_true", help="also show e-mail, account uuid and scopes")
    accounts.set_defaults(handler=_accounts)

    remove = commands.add_parser("remove", help="remove an account")
    remove.add_argument("name", metavar="NAME", help="the account's name (see `nextclaude accounts`)")
    remove.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    remove.set_defaults(handler=_remove)

    for name, help_text in (
        ("disable", "take an account out of rotation: it serves nothing, its tokens stay refreshed"),
        ("enable", "put a disabled account back into rotation"),
    ):
        switch = commands.add_parser(name, help=help_text)
        switch.add_argument("name", metavar="NAME", help="the account's name (see `nextclaude accounts`)")
        switch.set_defaults(handler=_account_switch)

    priority = commands.add_parser("priority", help="set an account's priority (lower is used first)")
    priority.add_argument("name", metavar="NAME", help="the account's name (see `nextclaude accounts`)")
    priority.add_argument("number", metavar="N", type=int, help="the priority, an integer (0 for subscriptions by default)")
    priority.set_defaults(handler=_account_switch)

    env = commands.add_parser("env", help="print the environment a shell needs to use the proxy")
    env.add_argument(
        "--api-key-mode",
        action="store_true",
        help="present the key as ANTHROPIC_API_KEY (takes Claude Code out of subscription mode)",
    )
    env.set_defaults(handler=_env)

    run = commands.add_parser("run", help="launch Claude Code pointed at the proxy")
    run.add_argument(
        "--no-check", action="store_true", help="start Claude Code even when no proxy answers for this config"
    )
    run.add_argument("arguments", nargs=argparse.REMAINDER, metavar="-- ARGS", help="arguments for claude")
    run.set_defaults(handler=_run)

    console = commands.add_parser("console", help="attach the live console to a running proxy")
    _add_theme_argument(console)
    console.set_defaults(handler=_console)

    status = commands.add_parser("status", help="print the running proxy's quota and cache statistics")
    status.add_argument("--json", action="store_true", help="print the status endpoint's JSON instead")
    status.set_defaults(handler=_status)

    stop = commands.add_parser("stop", help="stop the running proxy gracefully (it lets requests in flight finish)")
    stop.set_defaults(handler=_stop)

    service = commands.add_parser(
        "service", help="print or install a systemd user unit (Linux) or launchd agent (macOS) for this install"
    )
    service.add_argument(
        "action", choices=("print", "install"), metavar="print|install", help="print it, or write it where it belongs"
    )
    service.add_argument(
        "--kind", choices=("systemd", "launchd"), help="the service manager (default: launchd on macOS, else systemd)"
    )
    service.set_defaults(handler=_service)

    usage = commands.add_parser(
        "usage", help="usage history: tokens, moves, re-billed vs naive, API-price value (read-only)"
    )
    from nextclaude.usage_report import add_arguments as add_usage_arguments

    add_usage_arguments(usage)
    usage.set_defaults(handler=_usage)

    demo = commands.add_parser(
        "demo", help="run the whole system against a built-in simulated upstream (no account needed)"
    )
    demo.add_argument("--accounts", type=int, default=3, help="simulated accounts (default: 3)")
    demo.add_argument("--sessions", type=int, default=3, help="simulated Claude Code sessions (default: 3)")
    demo.add_argument("--duration", type=float, default=90.0, help="seconds of simulated traffic (default: 90)")
    demo.add_argument("--no-console", action="store_true", help="print the event log instead of the console")
    _add_theme_argument(demo)
    demo.set_defaults(handler=_demo)
    return parser


def _add_theme_argument(parser: argparse.ArgumentParser) -> None:
    from nextclaude.config import THEMES

    parser.add_argument(
        "--theme",
        choices=THEMES,
        help="console colours: auto reads on light and dark terminals (default: console.theme; NO_COLOR means mono)",
    )


def console_theme(args: argparse.Namespace, config: "Config | None") -> str:
    """
    The console's theme: --theme, else mono under NO_COLOR, else the
    config's console.theme.
    """
    import os

    from nextclaude.console.palette import choose_theme

    return choose_theme(getattr(args, "theme", None), config.console.theme if config is not None else None, os.environ)


def _subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """
    C{parser.parse_args}, except that words a subcommand does not take are
    reported with that subcommand's usage (argparse leaves them to the
    top-level parser, whose usage does not help: `remove a b`).
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = getattr(args, "command", None)
        sub = _subcommand_parser(parser, command) if command else None
        # Words before the command belong to the top level (`nextclaude --bogus accounts`).
        before = list(argv)[: list(argv).index(command)] if command in argv else []
        if sub is None or any(word in before for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        # A bare `nextclaude` is someone finding their way: show the way.
        parser.print_help()
        return 0
    args = parse_arguments(parser, argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader went away (`nextclaude status | head`): nothing more to
        # say, and Python must not fail again flushing stdout at exit.
        try:
            descriptor = sys.stdout.fileno()
        except (AttributeError, ValueError, OSError):
            return 1
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, descriptor)
        os.close(devnull)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C at a prompt: one line, the shell's usual status for it.
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print("nextclaude: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # A user's error (a broken or missing file, a control channel that
        # failed) is one line naming the file or socket, never a traceback.
        from nextclaude.control import ControlError
        from nextclaude.credentials import CredentialsError
        from nextclaude.paths import FileProblem

        if not isinstance(error, (ControlError, FileProblem, CredentialsError)):
            raise
        print(f"nextclaude: {error}", file=sys.stderr)
        return 1
