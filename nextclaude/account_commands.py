"""
`nextclaude login` and `nextclaude import`: adding accounts from the
command line.  The browser login runs a reactor for its callback server and
the token exchange; everything else is plain blocking code.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import webbrowser
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import react
from twisted.protocols.basic import LineReceiver

from nextclaude import paths, tokenstate
from nextclaude.config import Config, ConfigError, add_account, load_config, update_account
from nextclaude.credentials import (
    CredentialsError,
    ImportedCredentials,
    from_json_text,
    read_credentials,
    read_default,
)
from nextclaude.oauth import OAuthClient, OAuthError, Profile, TokenSet, login
from nextclaude.paths import FileProblem

API_KEY_PREFIX = "sk-ant-"


def run_async(main: Callable[[Any], Awaitable[int]]) -> int:
    """
    Run C{main(reactor)} under a reactor of its own and return its exit
    status.
    """
    status: list[int] = [1]

    async def wrapper(reactor: Any) -> None:
        status[0] = await main(reactor)

    try:
        react(lambda reactor: Deferred.fromCoroutine(wrapper(reactor)))
    except SystemExit as exit:
        if exit.code not in (0, None):
            return int(exit.code)
    return status[0]
PICKED_UP = "A running proxy picks it up within seconds."


def _fail(message: str) -> int:
    print(f"nextclaude: {message}", file=sys.stderr)
    return 1


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


def _save(path: Path, config: Config, name: str, fields: dict[str, Any]) -> str:
    """
    Update the matching account in place (keeping what the user edited,
    such as its priority), or add a new one.  Returns what happened.
    """
    if config.account(name) is not None and update_account(path, name, fields):
        return "Updated"
    add_account(path, {"name": name, "type": "oauth", **fields})
    return "Added"


# -- login ----------------------------------------------------------------------


def _login_api_key(path: Path, config: Config, name: str | None, read_secret: Callable[[str], str]) -> int:
    key = read_secret("Anthropic API key (input hidden): ").strip()
    if not key.startswith(API_KEY_PREFIX) or len(key) < 20 or any(c.isspace() for c in key):
        return _fail("that does not look like an Anthropic API key (they start with sk-ant-); nothing was added")
    name = name or _free_name(config, f"api-key-{key[-4:]}")
    add_account(path, {"name": name, "type": "apikey", "apiKey": key})
    print(f"Added {name} (API key, used after subscription accounts). {PICKED_UP}")
    return 0


class _Lines(LineReceiver):
    """
    Feeds what the user types into a queue the login reads from.
    """

    delimiter = b"\n"

    def __init__(self, queue: DeferredQueue[str]) -> None:
        self._queue = queue

    def lineReceived(self, line: bytes) -> None:
        self._queue.put(line.decode("utf-8", "replace").strip())


def _open_browser(url: str) -> bool:
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return webbrowser.open(url)


async def _browser_login(reactor: Any, config: Config, manual: bool, no_browser: bool) -> tuple[TokenSet, Profile | None]:
    from twisted.internet.stdio import StandardIO

    queue: DeferredQueue[str] = DeferredQueue()
    stdio = StandardIO(_Lines(queue), reactor=reactor)
    client = OAuthClient(reactor, config.oauth)
    try:
        tokens = await login(
            reactor,
            client,
            config.oauth,
            manual=manual,
            announce=lambda text: print(text, flush=True),
            lines=queue.get,
            open_browser=(lambda url: False) if no_browser else _open_browser,
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
        config = load_config(path)
    except ConfigError as error:
        return _fail(str(error))
    if args.api:
        return _login_api_key(path, config, args.name, read_secret)

    async def main(reactor: Any) -> int:
        try:
            tokens, profile = await _browser_login(reactor, config, args.manual, args.no_browser)
        except OAuthError as error:
            return _fail(f"login failed: {error}")
        current = load_config(path)
        name = _existing_name(current, profile.uuid if profile else None, args.name)
        name = name or args.name or (profile.email if profile and profile.email else _free_name(current, "claude"))
        fields = {**tokens.account_fields(), **_profile_fields(profile, None)}
        done = _save(path, current, name, fields)
        tier = fields.get("tier") or "subscription"
        print(f"{done} {name} ({tier}). {PICKED_UP}")
        return 0

    return run_async(main)


# -- import ---------------------------------------------------------------------


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
        config = load_config(path)
        source, credentials = _read_import(args)
    except (ConfigError, CredentialsError) as error:
        return _fail(str(error))
    refused = tokenstate.import_refusal(path, source, credentials.refresh_token)
    if refused is not None:
        return _fail(refused)

    async def main(reactor: Any) -> int:
        profile = await _fetch_profile(reactor, config, credentials.access_token)
        current = load_config(path)
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
        done = _save(path, current, name, fields)
        shared = (
            f" It shares its login with Claude Code ({source}): refreshed tokens are written back there."
            if source
            else ""
        )
        print(f"{done} {name} ({fields.get('tier') or 'subscription'}).{shared} {PICKED_UP}")
        return 0

    return run_async(main)
