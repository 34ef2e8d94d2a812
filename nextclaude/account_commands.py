"""
`nextclaude login` and `nextclaude import`: adding accounts from the
command line.  The browser login runs a reactor for its callback server and
the token exchange; everything else is plain blocking code.
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import webbrowser
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import react
from twisted.protocols.basic import LineReceiver

from nextclaude import paths, tokenstate
from nextclaude.config import Config, ConfigError, add_account, read_config, update_account
from nextclaude.credentials import (
    CredentialsError,
    ImportedCredentials,
    from_json_text,
    read_credentials,
    read_default,
)
from nextclaude.oauth import OAuthClient, OAuthError, Profile, TokenSet, login

API_KEY_PREFIX = "sk-ant-"


def run_async(main: Callable[[Any], Awaitable[int]]) -> int:
    """
    Run C{main(reactor)} under a reactor of its own and return its exit
    status.  Ctrl-C before C{main} is done is a C{KeyboardInterrupt}, as
    at a blocking prompt, so the command ends the same way (one line,
    status 130).
    """
    from twisted.internet import reactor as global_reactor

    status: int | None = None
    interrupted = False

    def stop_early(number: int, frame: Any) -> None:
        # Until the reactor runs and installs its own SIGINT handler,
        # Python's would raise KeyboardInterrupt wherever the reactor is
        # (even inside its handler installation, which it then survives,
        # waiting on): stop it instead, as its own handler does.
        nonlocal interrupted
        interrupted = True
        global_reactor.callFromThread(global_reactor.stop)

    async def wrapper(reactor: Any) -> None:
        nonlocal status
        status = await main(reactor)

    previous = signal.signal(signal.SIGINT, stop_early)
    try:
        react(lambda reactor: Deferred.fromCoroutine(wrapper(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None):
            return int(exit.code)
    finally:
        if previous is not None:  # None: a handler not set from Python, left alone
            signal.signal(signal.SIGINT, previous)
    # The reactor's SIGINT handler stops it, which leaves main unfinished
    # and react() exiting 0: without this, status 1 and not a word.
    if status is None and (interrupted or getattr(global_reactor, "_exitSignal", None) == signal.SIGINT):
        raise KeyboardInterrupt()
    return 1 if status is None else status


PICKED_UP = "A running proxy picks it up within seconds."


def _fail(message: str) -> int:
    print(f"nextclaude: {message}", file=sys.stderr)
    return 1


class Refused(Exception):
    """
    An account write the user has to confirm another way (a change of
    account type without --replace); the message says what to do.
    """


_KIND_NAMES = {"oauth": "a subscription (OAuth) account", "apikey": "an API-key account"}


def _config_for_adding(path: Path) -> Config:
    """
    The config that login and import add to.  A missing file is read as
    the defaults and created only by the write that adds the account, so
    a login or import that fails leaves nothing behind.
    """
    try:
        return read_config(path)
    except ConfigError:
        if path.exists() or path.is_symlink():
            raise
        return Config(path=path)


def _check_kind(config: Config, name: str, kind: str, replace: bool) -> bool:
    """
    Whether writing a C{kind} account as C{name} replaces one of another
    type (allowed only with --replace; else L{Refused}).
    """
    existing = config.account(name)
    if existing is None or existing.type == kind:
        return False
    if not replace:
        raise Refused(
            f"{name!r} in {config.path} is {_KIND_NAMES.get(existing.type, existing.type)}, not "
            f"{_KIND_NAMES[kind]}; nothing was changed. Choose another --name, or pass --replace to "
            f"replace {name!r} (its credentials and settings) with the new account"
        )
    return True


def _existing_name(config: Config, uuid: str | None, name: str | None) -> str | None:
    """
    The account a re-login or re-import updates: matched by account uuid,
    then by name.
    """
    if uuid:
        for account in config.accounts:
            if account.account_uuid == uuid:
                return account.name
    if name and config.account(name) is not None:
        return name
    return None


def _free_name(config: Config, stem: str) -> str:
    if config.account(stem) is None:
        return stem
    number = 2
    while config.account(f"{stem}-{number}") is not None:
        number += 1
    return f"{stem}-{number}"


def _profile_fields(profile: Profile | None, fallback_tier: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if profile is not None:
        fields.update(email=profile.email, accountUuid=profile.uuid, tier=profile.tier or fallback_tier)
    elif fallback_tier:
        fields["tier"] = fallback_tier
    return {key: value for key, value in fields.items() if value}


def _save(path: Path, config: Config, name: str, fields: dict[str, Any], replace: bool = False) -> str:
    """
    Update the matching account in place (keeping what the user edited,
    such as its priority), or add a new one.  Returns what happened.  An
    account of another type by that name is replaced only with
    C{replace} (L{Refused} otherwise): updating it would leave an API-key
    account carrying an orphan token.
    """
    if _check_kind(config, name, "oauth", replace):
        add_account(path, {"name": name, "type": "oauth", **fields})
        return "Replaced"
    if config.account(name) is not None and update_account(path, name, fields):
        return "Updated"
    add_account(path, {"name": name, "type": "oauth", **fields})
    return "Added"


# -- login ----------------------------------------------------------------------


NO_TERMINAL_FOR_KEY = (
    "login --api asks for the key at a hidden prompt, which needs a terminal; without one, "
    "pipe the key in with `nextclaude login --api --key-stdin`"
)
NO_TERMINAL_FOR_LOGIN = (
    "login needs a terminal (it shows a URL to open and may ask for the code the browser shows); "
    "without one, use `nextclaude login --manual` and write the code#state to its standard input, "
    "`nextclaude import` for the account Claude Code is logged in with, or "
    "`nextclaude login --api --key-stdin` for an API key"
)


def _read_key(key_stdin: bool, read_secret: Callable[[str], str]) -> str | None:
    """
    The API key: the first line of standard input with --key-stdin (no
    prompt, no echo to worry about), else typed at a hidden prompt, which
    needs a terminal.  None (after saying why) when there is none.
    """
    if key_stdin:
        line = sys.stdin.readline()
        if not line.strip():
            _fail("no key on standard input (--key-stdin reads it from the first line); nothing was added")
            return None
        return line
    if not sys.stdin.isatty():
        # getpass would fall back to echoing stdin with warnings, or wait
        # on /dev/tty for a key that the pipe was meant to carry.
        _fail(NO_TERMINAL_FOR_KEY)
        return None
    try:
        return read_secret("Anthropic API key (input hidden): ")
    except EOFError:
        print(file=sys.stderr)
        _fail("no key was entered; nothing was added")
        return None


def _login_api_key(
    path: Path,
    config: Config,
    name: str | None,
    read_secret: Callable[[str], str],
    key_stdin: bool = False,
    replace: bool = False,
) -> int:
    if name is not None:
        # Before asking for anything: the answer could not be used.
        _check_kind(config, name, "apikey", replace)
    key = _read_key(key_stdin, read_secret)
    if key is None:
        return 1
    key = key.strip()
    if not key.startswith(API_KEY_PREFIX) or len(key) < 20 or any(c.isspace() for c in key):
        return _fail("that does not look like an Anthropic API key (they start with sk-ant-); nothing was added")
    name = name or _free_name(config, f"api-key-{key[-4:]}")
    current = _config_for_adding(path)
    replacing = _check_kind(current, name, "apikey", replace)
    done = "Replaced" if replacing else "Updated" if current.account(name) is not None else "Added"
    add_account(path, {"name": name, "type": "apikey", "apiKey": key})
    print(f"{done} {name} (API key, used after subscription accounts). {PICKED_UP}")
    return 0


class _Lines(LineReceiver):
    """
    What the user types, a line at a time, for the login's paste prompt.
    The end of input fails the line asked for (and every later one), so a
    manual login without a code ends at once instead of at its timeout.
    """

    delimiter = b"\n"

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._waiting: list[Deferred[str]] = []
        self._ended = False

    def get(self) -> Deferred[str]:
        if self._lines:
            return succeed(self._lines.pop(0))
        waiter: Deferred[str] = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        if self._ended:
            waiter.errback(EOFError("end of input"))
            return waiter
        self._waiting.append(waiter)
        return waiter

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if self._waiting:
            self._waiting.pop(0).callback(text)
        else:
            self._lines.append(text)

    def connectionLost(self, reason: Any = None) -> None:
        self._ended = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(EOFError("end of input"))


def _open_browser(url: str) -> bool:
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return webbrowser.open(url)


async def _browser_login(reactor: Any, config: Config, manual: bool, no_browser: bool) -> tuple[TokenSet, Profile | None]:
    from twisted.internet.stdio import StandardIO

    lines = _Lines()
    stdio = StandardIO(lines, reactor=reactor)
    client = OAuthClient(reactor, config.oauth)
    try:
        tokens = await login(
            reactor,
            client,
            config.oauth,
            manual=manual,
            announce=lambda text: print(text, flush=True),
            lines=lines.get,
            open_browser=None if no_browser else _open_browser,
        )
        try:
            profile = await client.profile(tokens.access_token)
        except OAuthError as error:
            print(f"nextclaude: warning: could not read the account's profile ({error})", file=sys.stderr)
            profile = None
        return tokens, profile
    finally:
        stdio.loseConnection()
        await client.close()


def run_login(args: argparse.Namespace, read_secret: Callable[[str], str] = getpass.getpass) -> int:
    path = paths.config_file(args.config)
    try:
        config = _config_for_adding(path)
        if args.api or args.key_stdin:
            return _login_api_key(path, config, args.name, read_secret, args.key_stdin, args.replace)
        if args.name is not None:
            # Before the browser: a login whose result cannot be saved wastes a grant.
            _check_kind(config, args.name, "oauth", args.replace)
    except (ConfigError, Refused) as error:
        return _fail(str(error))
    if not args.manual and not sys.stdin.isatty():
        # The paste prompt could never be answered, and nobody may be
        # there to open the URL: fail now rather than at the login timeout.
        return _fail(NO_TERMINAL_FOR_LOGIN)

    async def main(reactor: Any) -> int:
        try:
            tokens, profile = await _browser_login(reactor, config, args.manual, args.no_browser)
        except OAuthError as error:
            return _fail(f"login failed: {error}")
        current = _config_for_adding(path)
        name = _existing_name(current, profile.uuid if profile else None, args.name)
        name = name or args.name or (profile.email if profile and profile.email else _free_name(current, "claude"))
        fields = {**tokens.account_fields(), **_profile_fields(profile, None)}
        try:
            done = _save(path, current, name, fields, args.replace)
        except Refused as error:
            return _fail(str(error))
        tier = fields.get("tier") or "subscription"
        print(f"{done} {name} ({tier}). {PICKED_UP}")
        return 0

    return run_async(main)


# -- import ---------------------------------------------------------------------


def expired_without_refresh(expires_at_ms: int | None, refresh_token: str | None, now: float) -> str | None:
    """
    How long ago an access token that nothing can renew expired (as
    "3d4h"), or None when it is still valid, renewable or of unknown age.
    """
    from nextclaude.humanize import duration

    if refresh_token or expires_at_ms is None:
        return None
    left = expires_at_ms / 1000 - now
    return duration(-left) if left <= 0 else None


def _read_import(args: argparse.Namespace) -> tuple[str | None, ImportedCredentials]:
    if args.json is not None:
        return None, from_json_text(args.json)
    if args.from_path is not None:
        source = str(Path(args.from_path).expanduser().absolute())
        return source, read_credentials(source)
    return read_default()


async def _fetch_profile(reactor: Any, config: Config, token: str) -> Profile | None:
    client = OAuthClient(reactor, config.oauth)
    try:
        return await client.profile(token)
    except OAuthError as error:
        # Works offline: the tokens are what matters; the name can wait.
        print(f"nextclaude: warning: could not read the account's profile ({error})", file=sys.stderr)
        return None
    finally:
        await client.close()


def run_import(args: argparse.Namespace) -> int:
    path = paths.config_file(args.config)
    try:
        # The credentials first: an import that cannot read them leaves no
        # fresh config behind.
        source, credentials = _read_import(args)
        config = _config_for_adding(path)
        if args.name is not None:
            _check_kind(config, args.name, "oauth", args.replace)
    except (ConfigError, CredentialsError, Refused) as error:
        return _fail(str(error))
    refused = tokenstate.import_refusal(path, source, credentials.refresh_token)
    if refused is not None:
        return _fail(refused)

    async def main(reactor: Any) -> int:
        profile = await _fetch_profile(reactor, config, credentials.access_token)
        current = _config_for_adding(path)
        name = _existing_name(current, profile.uuid if profile else None, args.name)
        if name is None and source is not None:
            # A re-import from the same file updates what it imported before.
            name = next((a.name for a in current.accounts if a.import_from == source and not args.name), None)
        name = name or args.name or (profile.email if profile and profile.email else _free_name(current, "claude-code"))
        tokens = TokenSet(
            credentials.access_token, credentials.refresh_token, credentials.expires_at_ms, credentials.scopes
        )
        fields: dict[str, Any] = {**tokens.account_fields(), **_profile_fields(profile, credentials.tier)}
        if source is not None:
            fields["importFrom"] = source
        try:
            done = _save(path, current, name, fields, args.replace)
        except Refused as error:
            return _fail(str(error))
        shared = (
            f" It shares its login with Claude Code ({source}): refreshed tokens are written back there."
            if source
            else ""
        )
        print(f"{done} {name} ({fields.get('tier') or 'subscription'}).{shared} {PICKED_UP}")
        dead = expired_without_refresh(credentials.expires_at_ms, credentials.refresh_token, reactor.seconds())
        if dead is not None:
            print(
                f"nextclaude: warning: its access token expired {dead} ago and it has no refresh token, so "
                f"{name} cannot serve until you log in again: `nextclaude login --name {name}`",
                file=sys.stderr,
            )
        return 0

    return run_async(main)
