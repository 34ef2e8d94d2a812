"""Claude Code's own credential store: read it for ``nextclaude import``, write rotated tokens back.

An imported account shares its refresh token with the user's Claude Code
(PROTOCOL.md, "Shared grants"), so after the proxy rotates the pair it writes
it back here, keeping every other key the store holds.

A *source* is a file path, or ``"keychain:Claude Code-credentials"`` for the
macOS Keychain item (read and written with the ``security`` tool). The
platform and the command runner are parameters so tests can fake macOS.

Plain blocking code, called from the edges; no reactor here. Errors name the
file (or Keychain item) and the field, and never a token.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nextclaude.config import mask_secret
from nextclaude.store import atomic_write, remove_stale_temps

KEYCHAIN_SERVICE = "Claude Code-credentials"
KEYCHAIN_PREFIX = "keychain:"
KEYCHAIN_SOURCE = KEYCHAIN_PREFIX + KEYCHAIN_SERVICE
NESTED_KEYS = ("claudeAiOauth", "claude_ai_oauth")
SECURITY_TIMEOUT = 15.0
# Claude Code and other proxies write this directory without our lock, and a
# write-back of ours may be running in another process: only temp files this
# old are certainly orphans.
STALE_TEMP_AGE = 600.0

# (camelCase, snake_case) spellings of each field.
_FIELDS = {
    "access_token": ("accessToken", "access_token"),
    "refresh_token": ("refreshToken", "refresh_token"),
    "expires_at": ("expiresAt", "expires_at"),
    "scopes": ("scopes", "scopes"),
    "subscription_type": ("subscriptionType", "subscription_type"),
    "rate_limit_tier": ("rateLimitTier", "rate_limit_tier"),
}


class CredentialsError(Exception):
    """The credential store cannot be read or written; says where and why, never a token."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(where, problem)
        self.where = where
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass(frozen=True, repr=False)
class ImportedCredentials:
    access_token: str
    refresh_token: str | None
    expires_at_ms: int | None
    scopes: tuple[str, ...] = ()
    subscription_type: str | None = None
    rate_limit_tier: str | None = None

    def __repr__(self) -> str:
        return (
            f"ImportedCredentials(access_token={mask_secret(self.access_token)!r}, "
            f"refresh_token={mask_secret(self.refresh_token)!r}, expires_at_ms={self.expires_at_ms!r}, "
            f"scopes={self.scopes!r}, subscription_type={self.subscription_type!r}, "
            f"rate_limit_tier={self.rate_limit_tier!r})"
        )

    @property
    def tier(self) -> str | None:
        """A tier name from Claude Code's ``subscriptionType`` ("max" → "Max"), if it has one."""
        kind = (self.subscription_type or "").lower()
        for marker, tier in (("enterprise", "Enterprise"), ("team", "Team"), ("max", "Max"), ("pro", "Pro")):
            if marker in kind:
                return tier
        return None


class TokenPair(Protocol):
    """What ``write_back`` writes: an ``oauth.TokenSet`` or ``ImportedCredentials``."""

    @property
    def access_token(self) -> str: ...
    @property
    def refresh_token(self) -> str | None: ...
    @property
    def expires_at_ms(self) -> int | None: ...
    @property
    def scopes(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


Runner = Callable[[Sequence[str], "bytes | None"], Completed]


def run_command(argv: Sequence[str], stdin: bytes | None) -> Completed:
    """Run a command, its input on stdin; a missing program is exit status 127."""
    try:
        done = subprocess.run(
            list(argv), input=stdin if stdin is not None else b"", capture_output=True, timeout=SECURITY_TIMEOUT, check=False
        )
    except FileNotFoundError:
        return Completed(127, b"", b"command not found")
    except subprocess.TimeoutExpired:
        return Completed(124, b"", b"timed out")
    return Completed(done.returncode, done.stdout, done.stderr)


# --- where ---------------------------------------------------------------------


def default_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$CLAUDE_CONFIG_DIR/.credentials.json``, else ``~/.claude/.credentials.json``."""
    if environ is None:
        environ = os.environ
    directory = environ.get("CLAUDE_CONFIG_DIR")
    if directory:
        return (Path(directory).expanduser() / ".credentials.json").absolute()
    return Path("~/.claude/.credentials.json").expanduser().absolute()


def is_keychain(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(KEYCHAIN_PREFIX)


def default_sources(environ: Mapping[str, str] | None = None, platform: str | None = None) -> list[str]:
    """Where Claude Code keeps its login, in the order to try: the Keychain first on macOS."""
    platform = sys.platform if platform is None else platform
    file = str(default_path(environ))
    return [KEYCHAIN_SOURCE, file] if platform == "darwin" else [file]


def read_default(
    environ: Mapping[str, str] | None = None,
    *,
    platform: str | None = None,
    runner: Runner = run_command,
) -> tuple[str, ImportedCredentials]:
    """The first default source that holds credentials, and what it holds."""
    problems: list[CredentialsError] = []
    for source in default_sources(environ, platform):
        try:
            return source, read_credentials(source, platform=platform, runner=runner)
        except CredentialsError as e:
            problems.append(e)
    # Only here, where no source was named, is "pass --from" the way out;
    # `import --from PATH` on a missing PATH just says it does not exist.
    hint = " (log in to Claude Code first, or pass --from / --json)"
    if len(problems) == 1:
        raise CredentialsError(problems[0].where, problems[0].problem + hint)
    raise CredentialsError(
        " and ".join(p.where for p in problems), "; ".join(p.problem for p in problems) + hint
    )


# --- reading -------------------------------------------------------------------


def _field(data: Mapping[str, Any], name: str) -> tuple[str, Any]:
    camel, snake = _FIELDS[name]
    if data.get(camel) is not None:
        return camel, data[camel]
    return snake, data.get(snake)


def _token(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and all("\x21" <= c <= "\x7e" for c in value)


def parse_credentials(data: Any, where: str) -> ImportedCredentials:
    """Credentials from Claude Code's nested ``{"claudeAiOauth": {...}}`` or a flat object."""
    if not isinstance(data, dict):
        raise CredentialsError(where, "must hold a JSON object")
    prefix = ""
    body: Mapping[str, Any] = data
    for key in NESTED_KEYS:
        if key in data:
            if not isinstance(data[key], dict):
                raise CredentialsError(where, f"{key} must be an object")
            body, prefix = data[key], f"{key}."
            break
    key, access = _field(body, "access_token")
    if access is None:
        hint = "" if prefix else ' (expected {"claudeAiOauth": {"accessToken": …}} or a flat {"accessToken": …})'
        raise CredentialsError(where, f"{prefix}accessToken is missing{hint}; is Claude Code logged in?")
    if not _token(access):
        raise CredentialsError(where, f"{prefix}{key} must be a token string without spaces (value not shown)")
    key, refresh = _field(body, "refresh_token")
    if refresh is not None and not _token(refresh):
        raise CredentialsError(where, f"{prefix}{key} must be a token string without spaces (value not shown)")
    key, expires = _field(body, "expires_at")
    expires_ms: int | None = None
    if expires is not None:
        if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires) or expires <= 0:
            raise CredentialsError(where, f"{prefix}{key} must be a Unix time in milliseconds")
        # Seconds are a plausible hand-written mistake; 10**11 ms is 1973.
        expires_ms = int(expires * 1000) if expires < 10**11 else int(expires)
    key, raw_scopes = _field(body, "scopes")
    if raw_scopes is None:
        scopes: tuple[str, ...] = ()
    elif isinstance(raw_scopes, str):
        scopes = tuple(raw_scopes.split())
    elif isinstance(raw_scopes, list) and all(isinstance(s, str) for s in raw_scopes):
        scopes = tuple(s for s in raw_scopes if s.strip())
    else:
        raise CredentialsError(where, f"{prefix}{key} must be a list of strings")
    _, subscription = _field(body, "subscription_type")
    _, rate_tier = _field(body, "rate_limit_tier")
    return ImportedCredentials(
        access_token=access,
        refresh_token=refresh,
        expires_at_ms=expires_ms,
        scopes=scopes,
        subscription_type=subscription if isinstance(subscription, str) else None,
        rate_limit_tier=rate_tier if isinstance(rate_tier, str) else None,
    )


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # Position only: the text is full of tokens.
        raise CredentialsError(where, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def from_json_text(text: str, where: str = "--json") -> ImportedCredentials:
    """Credentials pasted on the command line (``nextclaude import --json``)."""
    if not text.strip():
        raise CredentialsError(where, "is empty (it must hold Claude Code's credentials JSON)")
    return parse_credentials(_loads(text, where), where)


def _read_file(path: Path) -> Any:
    where = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(where, "does not exist") from None
    except OSError as e:
        raise CredentialsError(where, f"cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CredentialsError(where, "is not UTF-8 text") from None
    if not text.strip():
        raise CredentialsError(where, "is empty")
    return _loads(text, where)


def _keychain_service(source: str) -> str:
    return source[len(KEYCHAIN_PREFIX):] or KEYCHAIN_SERVICE


def _check_macos(source: str, platform: str | None) -> None:
    if (sys.platform if platform is None else platform) != "darwin":
        raise CredentialsError(source, "the Keychain is only available on macOS; pass a credentials file instead")


def _read_keychain(source: str, platform: str | None, runner: Runner) -> Any:
    _check_macos(source, platform)
    service = _keychain_service(source)
    done = runner(["security", "find-generic-password", "-s", service, "-w"], None)
    if done.returncode == 44:
        raise CredentialsError(source, "no such Keychain item (log in to Claude Code first)")
    if done.returncode == 127:
        raise CredentialsError(source, "the `security` tool was not found")
    if done.returncode != 0:
        raise CredentialsError(source, f"`security find-generic-password` failed with exit status {done.returncode}")
    try:
        text = done.stdout.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialsError(source, "the Keychain item is not UTF-8 text") from None
    if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", text or "x") and not text.startswith("{"):
        # Items written with -X come back hex-encoded from some macOS versions.
        text = bytes.fromhex(text).decode("utf-8", "replace")
    return _loads(text, source)


def read_credentials(
    source: str | Path, *, platform: str | None = None, runner: Runner = run_command
) -> ImportedCredentials:
    """Claude Code's credentials from ``source`` (a path, or ``keychain:<service>``)."""
    if is_keychain(source):
        return parse_credentials(_read_keychain(str(source), platform, runner), str(source))
    path = Path(source).expanduser()
    return parse_credentials(_read_file(path), str(path))


# --- writing back ----------------------------------------------------------------


def _merge(data: Any, tokens: TokenPair, where: str) -> dict[str, Any]:
    """``data`` with the pair replaced in whichever form and spelling it already uses."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CredentialsError(where, "must hold a JSON object; not overwriting it")
    target: dict[str, Any] | None = None
    for key in NESTED_KEYS:
        if isinstance(data.get(key), dict):
            target = data[key]
            break
    if target is None:
        flat = any(spelling in data for name in ("access_token", "refresh_token") for spelling in _FIELDS[name])
        if flat:
            target = data
        else:
            target = data["claudeAiOauth"] = {}
    values = {
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expires_at": tokens.expires_at_ms,
        "scopes": list(tokens.scopes) if tokens.scopes else None,
    }
    for name, value in values.items():
        if value is None:
            continue  # unknown here: keep what the store has
        camel, snake = _FIELDS[name]
        key = snake if snake in target and camel not in target else camel
        target[key] = value
    return data


def _write_file(path: Path, tokens: TokenPair) -> None:
    where = str(path)
    try:
        existing = _read_file(path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except CredentialsError:
        if path.exists():
            raise
        existing, mode = None, 0o600
    data = _merge(existing, tokens, where)
    # An earlier write-back killed mid-write left a private copy of an old
    # pair beside the file; only our own exact temp names, never Claude Code's.
    remove_stale_temps(path, older_than=STALE_TEMP_AGE)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Claude Code writes it compact; one line keeps diffs of other keys small too.
        atomic_write(path, json.dumps(data, ensure_ascii=False).encode("utf-8"), mode)
    except OSError as e:
        raise CredentialsError(where, f"cannot be written: {e.strerror or e}") from None


_ACCOUNT_ATTRIBUTE = re.compile(rb'"acct"<blob>="([^"\\\n]*)"')


def _write_keychain(source: str, tokens: TokenPair, platform: str | None, runner: Runner) -> None:
    _check_macos(source, platform)
    service = _keychain_service(source)
    try:
        existing = _read_keychain(source, platform, runner)
    except CredentialsError as e:
        if "no such Keychain item" not in e.problem:
            raise
        existing = None
    data = _merge(existing, tokens, source)
    # Keep the item's account attribute, so -U updates it instead of adding a twin.
    found = runner(["security", "find-generic-password", "-s", service], None)
    match = _ACCOUNT_ATTRIBUTE.search(found.stdout) if found.returncode == 0 else None
    account = match.group(1).decode("utf-8", "replace") if match else getpass.getuser()
    if '"' in account or "\\" in account or '"' in service:
        raise CredentialsError(source, "the Keychain item's account or service name has characters we cannot pass safely")
    payload = json.dumps(data, ensure_ascii=False).encode("utf-8").hex()
    # Through `security -i` on stdin: on the command line the tokens would be
    # visible to every user's `ps` while the command runs.
    command = f'add-generic-password -U -a "{account}" -s "{service}" -X "{payload}"\n'
    done = runner(["security", "-i"], command.encode("utf-8"))
    # Interactive mode may exit 0 after a failed command; its complaint is on stderr.
    if done.returncode != 0 or b"error" in done.stderr.lower():
        raise CredentialsError(source, f"`security add-generic-password` failed (exit status {done.returncode})")


def write_back(
    source: str | Path,
    tokens: TokenPair,
    *,
    platform: str | None = None,
    runner: Runner = run_command,
) -> None:
    """Replace the pair in ``source`` atomically, keeping every other key it holds.

    A file keeps its mode (0600 if it is new); the Keychain item keeps its account.
    """
    if is_keychain(source):
        _write_keychain(str(source), tokens, platform, runner)
    else:
        _write_file(Path(source).expanduser(), tokens)
