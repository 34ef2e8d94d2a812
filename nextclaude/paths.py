"""Where NextClaude keeps its files.

Everything lives beside the config file, so pointing ``--config`` somewhere
else gives a fully separate instance (its own state, lock and socket).
Plain blocking filesystem code: no reactor here.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import appdirs

APP_NAME = "nextclaude"
CONFIG_ENV = "NEXTCLAUDE_CONFIG"
SOCKET_ENV = "NEXTCLAUDE_SOCKET"

# sun_path is 108 bytes on Linux and 104 on macOS (both including the NUL);
# staying under 100 leaves room on every platform we run on.
MAX_SOCKET_PATH_BYTES = 100


class FileProblem(Exception):
    """
    A file or directory that cannot be used, and why: every such error names
    the path first, so the user knows which file to fix.
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class UnsafeDirectoryError(FileProblem):
    """A directory we would put the control socket in is not private to us."""


def _env_path(environ: Mapping[str, str], name: str) -> Path | None:
    # An empty value is what `NAME= nextclaude ...` produces when someone
    # means "unset"; treating it as the current directory would be a trap.
    value = environ.get(name)
    if not value:
        return None
    return Path(value).expanduser()


def config_file(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The config file: ``--config``, else ``$NEXTCLAUDE_CONFIG``, else appdirs'.

    The result is absolute because twistd may chdir before the file is
    re-read, and the socket path derived from it is shared between processes
    started from different directories.
    """
    if environ is None:
        environ = os.environ
    if explicit:
        chosen = Path(explicit).expanduser()
    else:
        chosen = _env_path(environ, CONFIG_ENV) or (
            Path(appdirs.user_config_dir(APP_NAME)) / "config.json"
        )
    return chosen.absolute()


def state_file(config: Path) -> Path:
    return config.parent / "state.json"


def lock_file(config: Path) -> Path:
    return config.parent / "nextclaude.lock"


def _fits(path: Path) -> bool:
    return len(os.fsencode(str(path))) < MAX_SOCKET_PATH_BYTES


def _socket_name(config: Path) -> str:
    # Hash the resolved directory so every spelling of the same config
    # (relative, via a symlink, with "..") finds the same socket.
    directory = os.fsencode(str(config.parent.resolve()))
    return f"{APP_NAME}-{hashlib.sha256(directory).hexdigest()[:16]}.sock"


def _private_tmp_dir(root: Path, uid: int) -> Path:
    """``<root>/nextclaude-<uid>``, created 0700, refused if anyone else could use it.

    /tmp is shared: another user could pre-create the directory (or a
    symlink) to intercept our socket, so we only accept one that is a real
    directory, owned by us and closed to everyone else.
    """
    directory = root / f"{APP_NAME}-{uid}"
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    else:
        # mkdir's mode is filtered by the umask; a umask of 077 is fine but
        # e.g. 0777 would leave a directory we cannot even enter.
        os.chmod(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectoryError(directory, "is not a directory (refusing to put the control socket there)")
    if info.st_uid != uid:
        raise UnsafeDirectoryError(
            directory, f"is owned by uid {info.st_uid}, not {uid} (refusing to put the control socket there)"
        )
    if info.st_mode & 0o077:
        raise UnsafeDirectoryError(
            directory,
            f"is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}; "
            "refusing to put the control socket there; chmod 700 it)",
        )
    return directory


def socket_path(
    config: Path,
    environ: Mapping[str, str] | None = None,
    uid: int | None = None,
    *,
    tmp_root: Path = Path("/tmp"),
) -> Path:
    """The control socket: ``$NEXTCLAUDE_SOCKET``, else ``control.sock`` beside the config.

    When that is too long for a UNIX socket address, the socket goes in
    ``$XDG_RUNTIME_DIR`` or a private ``/tmp/nextclaude-<uid>/`` under a
    name derived from the config directory. ``/tmp`` rather than
    ``tempfile.gettempdir()`` because macOS's per-user ``$TMPDIR`` is itself
    long enough to overflow the limit. ``tmp_root`` exists for tests.
    """
    if environ is None:
        environ = os.environ
    override = _env_path(environ, SOCKET_ENV)
    if override is not None:
        return override.absolute()
    beside = config.parent.absolute() / "control.sock"
    if _fits(beside):
        return beside
    name = _socket_name(config)
    runtime = _env_path(environ, "XDG_RUNTIME_DIR")
    if runtime is not None and _fits(runtime / name):
        return runtime / name
    return _private_tmp_dir(tmp_root, os.getuid() if uid is None else uid) / name


def ensure_private_dir(path: Path) -> None:
    """``mkdir -p`` where every directory it creates is 0700; existing ones are left alone.

    The config directory holds OAuth tokens, so it must never be readable
    by others, whatever the umask; but a directory the user already has
    (their home, a shared project dir) is theirs to set up.
    """
    missing: list[Path] = []
    current = path.absolute()
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            # Another process (a racing first run) made it; fine if it is a
            # directory, and then it is that process's to set up.
            if not directory.is_dir():
                raise
            continue
        os.chmod(directory, 0o700)
