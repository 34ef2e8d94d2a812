"""
The twistd plugin's options and service: `twistd -n nextclaude`.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.python import usage

from nextclaude import paths
from nextclaude.config import NO_ACCOUNTS_MESSAGE, Config, ConfigError, load_config


def check_port(value: str | int) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--port must be a number from 0 to 65535, not {value!r}.")
    if not 0 <= port <= 65535:
        raise usage.UsageError(f"--port must be a number from 0 to 65535, not {port}.")
    return port


def check_host(value: str) -> str:
    if not value or any(char.isspace() for char in value):
        raise usage.UsageError(f"--host must be an interface address such as 127.0.0.1, not {value!r}.")
    return value


def check_upstream(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise usage.UsageError(
            f"--upstream must be an http:// or https:// URL such as https://api.anthropic.com, not {value!r}."
        )
    return value.rstrip("/")


def load_proxy_config(
    config_path: str | None,
    port: int | None = None,
    host: str | None = None,
    upstream: str | None = None,
    log_to: str | None = None,
) -> Config:
    """
    The configuration the proxy runs with: the file (created on first run)
    with command-line flags on top.  Every problem is a UsageError whose
    message says what to fix.
    """
    path = paths.config_file(config_path)
    try:
        config = load_config(path)
    except ConfigError as error:
        raise usage.UsageError(str(error))
    try:
        config = config.with_overrides(port=port, host=host, upstream=upstream, log_dir=log_to)
    except ValueError as error:
        raise usage.UsageError(str(error))
    if not config.accounts:
        raise usage.UsageError(NO_ACCOUNTS_MESSAGE.format(path=path))
    if config.log_dir is not None:
        check_log_dir(config.log_dir, "--log-to" if log_to is not None else f"{path}: logDir")
    return config


def check_log_dir(directory: Path, named: str) -> None:
    """
    Make sure the request log's directory exists (created 0700, as the
    log would) and can be written, or raise a UsageError naming where it
    was given (C{named}: the flag, or the file and field) and the system's
    reason; the log itself would otherwise fail with a traceback later.
    """
    try:
        paths.ensure_private_dir(directory)
        if not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as error:
        reason = error.strerror or str(error)
        raise usage.UsageError(f"{named} {directory}: cannot be used for the request log: {reason}.") from None


def listen_problem(host: str, port: int, error: BaseException, config_path: Path) -> str:
    """
    Why the proxy cannot listen on C{host}:C{port}, in one line, from the
    system's own error (C{CannotListenError.socketError} or an OSError):
    in use, not an address of this machine, permission denied, unknown
    host; each with what to change.
    """
    cause = getattr(error, "socketError", error)
    where = f"cannot listen on {host}:{port}"
    other_port = f"choose another port with --port PORT or the proxy.port field of {config_path}"
    other_host = f"choose another with --host HOST or the proxy.host field of {config_path}"
    if isinstance(cause, socket.gaierror):
        return f"{where}: {host!r} is not a host name or address this machine can resolve ({cause.strerror}); {other_host}."
    number = getattr(cause, "errno", None)
    if number == errno.EADDRINUSE:
        return (
            f"{where}: the port is already in use, probably by another NextClaude or another program. "
            f"Stop that program, or {other_port}."
        )
    if number == errno.EADDRNOTAVAIL:
        return (
            f"{where}: {host} is not an address of this machine (127.0.0.1 serves this machine only); "
            f"{other_host}."
        )
    if number == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); {other_port}."
    reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return f"{where}: {reason}."


def probe_listen(host: str, port: int) -> OSError | None:
    """
    Bind C{host}:C{port} as the proxy will (same family choice and
    SO_REUSEADDR as Twisted's TCP port) and let it go: the system's error,
    or None.  An early check only; the real bind can still lose a race.
    """
    from twisted.internet.abstract import isIPv6Address

    family = socket.AF_INET6 if isIPv6Address(host) else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        return error
    try:
        if os.name == "posix":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        probe.listen(1)
    except OSError as error:
        return error
    finally:
        probe.close()
    return None


class StartupRefused(Exception):
    """
    The proxy cannot start, for a reason one line tells the user.
    """


def preflight(config: Config) -> None:
    """
    What can be checked before the proxy starts (under twistd: before it
    forks, while its output still reaches the user): the listening
    address and the control socket (no other proxy on this config).
    Raises L{StartupRefused}.
    """
    from nextclaude.control import ControlError, claim_socket_path

    failure = probe_listen(config.proxy.host, config.proxy.port)
    if failure is not None:
        raise StartupRefused(listen_problem(config.proxy.host, config.proxy.port, failure, config.path))
    try:
        claim_socket_path(paths.socket_path(config.path))
    except (ControlError, paths.FileProblem) as error:
        raise StartupRefused(str(error)) from None


def refuse(message: str) -> None:
    """
    End the process at once with C{message} as one line and status 1.
    For twistd, whose own reporting of a UsageError is its whole usage text
    (blaming whatever option came last) and of a later failure a traceback.
    """
    sys.stderr.write(f"nextclaude: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


class Options(usage.Options):
    synopsis = "[--config FILE] [--port PORT] [--host HOST] [--upstream URL] [--log-to DIR [--log-bodies]]"
    longdesc = (
        "Run the NextClaude proxy: one local endpoint for Claude Code that pools "
        "several Claude accounts and moves traffic between them as quota runs out."
    )

    optParameters = [
        ["config", "c", None, "Configuration file (default: $NEXTCLAUDE_CONFIG or the user config dir)."],
        ["port", "p", None, "Port to listen on (overrides proxy.port; 0 picks a free one).", check_port],
        ["host", None, None, "Interface to listen on (overrides proxy.host).", check_host],
        ["upstream", None, None, "Upstream API base URL (overrides upstream).", check_upstream],
        ["log-to", None, None, "Append one JSON line per request to a daily file in DIR (overrides logDir)."],
    ]
    optFlags = [
        ["log-bodies", None, "With a request log, also keep every request's and response's body."],
    ]

    def postOptions(self) -> None:
        # Every check that can fail runs here, before twistd forks: a
        # daemon's own errors never reach the terminal it was started from.
        # (DESIGN's "acquire in startService" still holds: these only look.)
        try:
            self.config = load_proxy_config(
                self["config"],
                port=self["port"],
                host=self["host"],
                upstream=self["upstream"],
                log_to=self["log-to"],
            )
            if self["log-bodies"] and self.config.log_dir is None:
                raise usage.UsageError("--log-bodies needs a request log: give --log-to DIR or set logDir.")
            preflight(self.config)
        except (usage.UsageError, StartupRefused) as error:
            refuse(str(error))


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    from nextclaude.service import ProxyService

    config: Any = getattr(options, "config", None)
    if config is None:
        config = load_proxy_config(
            options["config"],
            port=options["port"],
            host=options["host"],
            upstream=options["upstream"],
            log_to=options["log-to"],
        )
    service = ProxyService(reactor, config, log_bodies=bool(options["log-bodies"]))
    # `nextclaude stop` ends the daemon as SIGTERM would: twistd stops the
    # application (this service, gracefully) as the reactor shuts down.
    service.on_stop_request = reactor.stop
    return service
