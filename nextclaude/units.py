"""
`nextclaude service print|install`: a systemd user unit or a launchd agent
that runs this install's `nextclaude server --no-console`.

The templates are package data (nextclaude/data/); what is filled in is
the absolute command of the running install, the config file when it is
not the default one, and a stop timeout longer than the proxy's own stop
bound.  Plain blocking code.
"""

from __future__ import annotations

import os
import plistlib
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from nextclaude import paths

SYSTEMD = "systemd"
LAUNCHD = "launchd"
KINDS = (SYSTEMD, LAUNCHD)
LAUNCHD_LABEL = "local.nextclaude"

# What a stop may take beyond proxy.shutdownGrace: the OAuth request
# timeout the proxy waits for refreshes in flight, its margin, and room.
_STOP_SLACK = 30.0


def default_kind(platform: str | None = None) -> str:
    return LAUNCHD if (platform or sys.platform) == "darwin" else SYSTEMD


def template(kind: str) -> str:
    """The packaged template for C{kind}, as text."""
    name = "nextclaude.service" if kind == SYSTEMD else "nextclaude.plist"
    return (resources.files("nextclaude") / "data" / name).read_text(encoding="utf-8")


def server_command(config: Path | None, executable: str | None = None) -> list[str]:
    """
    The command the service runs: the `nextclaude` script beside this
    install's interpreter (a virtualenv's or pipx's bin directory), else
    the interpreter with C{-m nextclaude}; absolute either way, since a
    service manager's PATH does not hold a virtualenv.
    """
    python = Path(executable or sys.executable).absolute()
    script = python.parent / "nextclaude"
    command = [str(script)] if script.is_file() and os.access(script, os.X_OK) else [str(python), "-m", "nextclaude"]
    if config is not None:
        command += ["--config", str(config)]
    return command + ["server", "--no-console"]


_SAFE_WORD = re.compile(r"[\w@%+=:,./-]+", re.ASCII)


def systemd_quote(word: str) -> str:
    """
    One ExecStart word: systemd expands C{%} specifiers and C{$} variables
    and splits on spaces, so those are escaped and the word double-quoted
    when needed (systemd and C{shlex.split} read such quotes alike).
    """
    word = word.replace("%", "%%").replace("$", "$$")
    if _SAFE_WORD.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Unit:
    kind: str
    text: str
    path: Path


def stop_timeout(shutdown_grace: float) -> int:
    return int(max(shutdown_grace, 30.0) + _STOP_SLACK)


def render(
    kind: str,
    command: list[str],
    shutdown_grace: float = 30.0,
    environ: Mapping[str, str] | None = None,
) -> Unit:
    """
    The unit (or agent) for C{kind} running C{command}, and where
    C{install} puts it.
    """
    environ = os.environ if environ is None else environ
    home = Path(environ.get("HOME") or Path.home())
    if kind == SYSTEMD:
        text = template(SYSTEMD)
        text = text.replace("@EXEC_START@", " ".join(systemd_quote(word) for word in command))
        text = text.replace("@STOP_TIMEOUT@", str(stop_timeout(shutdown_grace)))
        config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        return Unit(kind, text, config_home / "systemd" / "user" / "nextclaude.service")
    if kind == LAUNCHD:
        agent = plistlib.loads(template(LAUNCHD).encode("utf-8"))
        agent["ProgramArguments"] = list(command)
        log = str(home / "Library" / "Logs" / "nextclaude.log")
        agent["StandardOutPath"] = agent["StandardErrorPath"] = log
        agent["ExitTimeOut"] = stop_timeout(shutdown_grace)
        text = plistlib.dumps(agent).decode("utf-8")
        return Unit(kind, text, home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist")
    raise ValueError(f"the kind of service is {' or '.join(KINDS)}, not {kind!r}")


def next_steps(unit: Unit) -> str:
    """What to run after C{install}, to start the service now and at login."""
    if unit.kind == SYSTEMD:
        return (
            "Start it now and at every login with:\n"
            "  systemctl --user daemon-reload\n"
            "  systemctl --user enable --now nextclaude\n"
            "To keep it running while you are logged out (and start it at boot):\n"
            "  loginctl enable-linger\n"
            "Its log: journalctl --user -u nextclaude"
        )
    return (
        "Start it now and at every login with:\n"
        f"  launchctl bootstrap gui/$(id -u) {shlex.quote(str(unit.path))}\n"
        f"Its log: {shlex.quote(str(Path(plistlib.loads(unit.text.encode())['StandardOutPath'])))}"
    )


def install(unit: Unit) -> str:
    """
    Write C{unit} where its service manager looks (0644, atomically); what
    happened: "Wrote", "Replaced" or "Unchanged".
    """
    try:
        current = unit.path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    except OSError as error:
        raise paths.FileProblem(unit.path, f"cannot be read: {error.strerror or error}") from None
    if current == unit.text:
        return "Unchanged"
    try:
        unit.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = unit.path.with_name(f".{unit.path.name}.tmp")
        temporary.write_text(unit.text, encoding="utf-8")
        temporary.chmod(0o644)
        os.replace(temporary, unit.path)
    except OSError as error:
        raise paths.FileProblem(unit.path, f"cannot be written: {error.strerror or error}") from None
    return "Wrote" if current is None else "Replaced"
