"""
The `nextclaude` command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from nextclaude import __version__


def _server(args: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.usage import UsageError

    from nextclaude import tap
    from nextclaude.service import ProxyService

    try:
        port = tap.check_port(args.port) if args.port is not None else None
        host = tap.check_host(args.host) if args.host is not None else None
        upstream = tap.check_upstream(args.upstream) if args.upstream is not None else None
        config = tap.load_proxy_config(args.config, port=port, host=host, upstream=upstream)
    except UsageError as error:
        print(f"nextclaude: {error}", file=sys.stderr)
        return 1

    # --no-console keeps these plain log lines; without it the console
    # (once it exists) takes over a terminal.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = ProxyService(reactor, config)
    try:
        service.privilegedStartService()
    except CannotListenError:
        proxy = config.proxy
        print(
            f"nextclaude: cannot listen on {proxy.host}:{proxy.port}: the port is already in "
            f"use, probably by another NextClaude or another program. Stop that program, "
            f"or choose another port with --port PORT or the proxy.port field of "
            f"{config.path}.",
            file=sys.stderr,
        )
        return 1
    service.startService()
    host, bound = service.address()
    print(f"NextClaude {__version__} listening on http://{host}:{bound} with {len(config.accounts)} account(s)", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


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
    server.add_argument("--no-console", action="store_true", help="plain log lines instead of the live console")
    server.set_defaults(handler=_server)

    demo = commands.add_parser(
        "demo", help="run the whole system against a built-in simulated upstream (no account needed)"
    )
    demo.add_argument("--accounts", type=int, default=3, help="simulated accounts (default: 3)")
    demo.add_argument("--sessions", type=int, default=3, help="concurrent simulated conversations (default: 3)")
    demo.add_argument("--turns", type=int, default=12, help="turns per conversation (default: 12)")
    demo.add_argument("--no-console", action="store_true", help="print the event log instead of the console")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)
