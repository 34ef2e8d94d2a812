"""
The twistd plugin's options and service: `twistd -n nextclaude`.
"""

from __future__ import annotations

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
    return config


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
        self.config = load_proxy_config(
            self["config"],
            port=self["port"],
            host=self["host"],
            upstream=self["upstream"],
            log_to=self["log-to"],
        )
        if self["log-bodies"] and self.config.log_dir is None:
            raise usage.UsageError("--log-bodies needs a request log: give --log-to DIR or set logDir.")


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
    return ProxyService(reactor, config, log_bodies=bool(options["log-bodies"]))
