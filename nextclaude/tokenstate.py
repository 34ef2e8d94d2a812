"""Token state only moves forward: spent refresh tokens and recovery copies.

A refresh token is single use: once the server has rotated it, a copy of
the old one anywhere (an editor's buffer, a backup of config.json, Claude
Code's credential file) is a trap, because adopting it kills the account
with ``invalid_grant``. So the proxy remembers the SHA-256 digests of the
refresh tokens it spent, in state.json (never the tokens themselves), and
every path that could bring a token in (a reload, ``nextclaude import``,
the re-read of Claude Code's store) refuses one whose digest is there.

A rotated pair that cannot be written to config.json (disk full, a broken
file) is kept in a *recovery file*, ``recovery-<account>.json`` beside the
config (0600), until it lands; the next start adopts it.

Plain blocking code, called from the edges; no reactor here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nextclaude import paths, store
from nextclaude.config import SAVED, config_store, save_tokens
from nextclaude.store import JsonStore

#: The state.json key: account name -> digests of its spent refresh tokens, oldest first.
SPENT_KEY = "spentRefreshTokens"
#: Per account. A token rotates every few hours, so 16 covers days of
#: rotations: far longer than an editor's buffer or a restored copy lingers.
SPENT_PER_ACCOUNT = 16
RECOVERY_PREFIX = "recovery-"
RECOVERY_SUFFIX = ".json"
# File names are limited to 255 bytes; long account names fall back to a hash.
_MAX_NAME_BYTES = 200


def token_digest(token: str) -> str:
    """What is remembered of a spent token: enough to recognise it, useless to anyone who reads it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _digest_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [d for d in value if isinstance(d, str) and len(d) == 64]


class SpentTokens:
    """The digests of spent refresh tokens, per account, the newest ``limit`` of each."""

    def __init__(self, limit: int = SPENT_PER_ACCOUNT) -> None:
        self.limit = limit
        self._by_account: dict[str, list[str]] = {}
        self._owner: dict[str, str] = {}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None, limit: int = SPENT_PER_ACCOUNT) -> SpentTokens:
        """The ledger saved in a state.json object; anything malformed there is ignored."""
        spent = cls(limit)
        section = state.get(SPENT_KEY) if isinstance(state, Mapping) else None
        if isinstance(section, dict):
            for account, digests in section.items():
                if isinstance(account, str):
                    spent.add_digests(account, _digest_list(digests))
        return spent

    def add(self, account: str, token: str) -> None:
        self.add_digests(account, [token_digest(token)])

    def add_digests(self, account: str, digests: Iterable[str]) -> None:
        kept = self._by_account.setdefault(account, [])
        for digest in digests:
            if digest in kept:
                kept.remove(digest)
            kept.append(digest)
        for dropped in kept[: -self.limit]:
            if self._owner.get(dropped) == account:
                del self._owner[dropped]
        del kept[: -self.limit]
        for digest in kept:
            self._owner[digest] = account

    def is_spent(self, token: str | None) -> bool:
        return token is not None and token_digest(token) in self._owner

    def owner(self, token: str) -> str | None:
        """The account that spent ``token``, if it is spent."""
        return self._owner.get(token_digest(token))

    def digests(self, account: str) -> list[str]:
        return list(self._by_account.get(account, ()))

    def merge_into(self, state: dict[str, Any]) -> None:
        """Add this ledger to a state.json object (a ``JsonStore.update`` operation), keeping the bound."""
        section = state.get(SPENT_KEY)
        if not isinstance(section, dict):
            section = state[SPENT_KEY] = {}
        for account, digests in self._by_account.items():
            merged = [d for d in _digest_list(section.get(account)) if d not in digests] + digests
            section[account] = merged[-self.limit:]


def state_store(config_path: Path) -> JsonStore:
    return JsonStore(paths.state_file(config_path), paths.lock_file(config_path))


def read_spent(config_path: Path) -> SpentTokens:
    """The ledger in state.json beside ``config_path`` plus what recovery files say they replaced.

    Raises ``StoreError`` for a state file that cannot be read; callers
    decide whether an empty ledger will do.
    """
    spent = SpentTokens.from_state(state_store(config_path).read())
    for recovery in read_recoveries(config_path):
        spent.add_digests(recovery.account, recovery.spent)
    return spent


def save_spent(config_path: Path, spent: SpentTokens) -> None:
    """Merge ``spent`` into state.json (one locked operation); ``StoreError``/``OSError`` on failure."""
    state_store(config_path).update(lambda data: spent.merge_into(data), create=dict)


# --- recovery files ---------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Recovery:
    """A pair that had not reached config.json when it was written down here."""

    account: str
    fields: dict[str, Any]  # file-form: accessToken, refreshToken, expiresAt, scopes
    spent: tuple[str, ...]  # digests of the refresh tokens this pair replaced
    path: Path

    def __repr__(self) -> str:
        # The fields are tokens: never in a log or a traceback.
        return f"Recovery(account={self.account!r}, path={str(self.path)!r})"

    @property
    def refresh_token(self) -> str | None:
        token = self.fields.get("refreshToken")
        return token if isinstance(token, str) else None


def recovery_path(config_path: Path, account: str) -> Path:
    """``recovery-<account>.json`` beside the config; any account name gives one safe file name."""
    # quote() leaves no "/" (so no other directory) and keeps e-mail names readable.
    name = quote(account, safe="@+._-")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        name = hashlib.sha256(account.encode("utf-8")).hexdigest()
    return config_path.parent / f"{RECOVERY_PREFIX}{name}{RECOVERY_SUFFIX}"


def write_recovery(config_path: Path, account: str, fields: Mapping[str, Any], spent: Iterable[str]) -> Path:
    """Write the recovery copy of ``account``'s pair atomically, 0600; ``OSError`` if it cannot be."""
    path = recovery_path(config_path, account)
    data = {"account": account, **fields, "spent": list(spent)}
    paths.ensure_private_dir(path.parent)
    # Through the module, so a test's fault injection in store covers it too.
    store.atomic_write(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), 0o600)
    return path


def remove_recovery(config_path: Path, account: str) -> None:
    """Delete ``account``'s recovery file if there is one; ``OSError`` if it cannot be."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(recovery_path(config_path, account))


_PAIR_KEYS = ("accessToken", "refreshToken", "expiresAt", "scopes")


def _parse_recovery(path: Path) -> Recovery | None:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    account = data.get("account")
    access = data.get("accessToken")
    refresh = data.get("refreshToken")
    if not isinstance(account, str) or not isinstance(access, str) or not isinstance(refresh, str):
        return None
    # The file must name itself: a copy renamed by hand is not trusted.
    if recovery_path(path.parent / "config.json", account).name != path.name:
        return None
    fields = {key: data[key] for key in _PAIR_KEYS if data.get(key) is not None}
    return Recovery(account, fields, tuple(_digest_list(data.get("spent"))), path)


def read_recoveries(config_path: Path) -> list[Recovery]:
    """Every well-formed recovery file beside ``config_path``; unreadable ones are left alone."""
    try:
        names = sorted(os.listdir(config_path.parent))
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(RECOVERY_PREFIX) and name.endswith(RECOVERY_SUFFIX):
            recovery = _parse_recovery(config_path.parent / name)
            if recovery is not None:
                found.append(recovery)
    return found


def restore_recovered(config_path: Path, account: str, spent: SpentTokens) -> bool:
    """Put ``account``'s recovery pair into the config if the config's pair is behind it.

    For a command that finds a spent token while no proxy may be running
    to do it: one locked operation, and the recovery file goes once the
    pair has landed. True if the config now holds the recovered pair.
    ``ConfigError``/``OSError`` if it cannot be written.
    """
    recovery = next((r for r in read_recoveries(config_path) if r.account == account), None)
    if recovery is None or spent.is_spent(recovery.refresh_token):
        return False
    live = recovery.refresh_token
    with config_store(config_path).locked():
        outcome = save_tokens(
            config_path, account, recovery.fields, lambda current: current in (None, live) or spent.is_spent(current)
        )
        if outcome == SAVED:
            remove_recovery(config_path, account)
    return outcome == SAVED


def import_refusal(config_path: Path, source: str | None, refresh_token: str | None) -> str | None:
    """
    Why an import must be refused, or None: its refresh token is one the
    proxy already spent, so importing it would replace a live pair with a
    dead one.  The account that spent it keeps its pair; if only its
    recovery file holds that pair, it is written back to the config now.
    Used by `nextclaude import` and the console's add-account import.
    """
    if not refresh_token:
        return None
    try:
        spent = read_spent(config_path)
    except paths.FileProblem:
        # An unreadable state file: the running proxy still refuses the
        # token when it reloads the config.
        return None
    owner = spent.owner(refresh_token)
    if owner is None:
        return None
    try:
        restored = restore_recovered(config_path, owner, spent)
    except (paths.FileProblem, OSError):
        restored = False
    kept = " (written back from its recovery file)" if restored else ""
    return (
        f"{source or 'the credentials given'} hold a refresh token NextClaude already used for {owner}; "
        f"it has been rotated since, so it no longer works. {owner} keeps its current tokens{kept}; "
        "nothing was imported. Log in to Claude Code again, or run `nextclaude login`, for a new grant."
    )
