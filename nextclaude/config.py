"""The config file: parsing, validation, first run, and one-operation edits.

The file is hand-edited as well as written by commands, so every error names
the file, the field (``accounts[2].expiresAt``) and what was expected, and
never a secret's value. Writes go through ``JsonStore.update``: each edit is
one operation applied to the file as it is now, so the running proxy and a
concurrent ``nextclaude import`` never undo each other.

Plain blocking code, called from the edges; no reactor here.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nextclaude import paths
from nextclaude.store import JsonStore, StoreError

T = TypeVar("T")

DEFAULT_UPSTREAM = "https://api.anthropic.com"
ACCOUNT_TYPES = ("oauth", "apikey")
DEFAULT_PRIORITY = {"oauth": 0, "apikey": 1}

NO_ACCOUNTS_MESSAGE = """\
No accounts are configured in {path}.
Add one with:
  nextclaude login          a Claude subscription (Pro/Max/Team), via the browser
  nextclaude login --api    an Anthropic API key
  nextclaude import         the account Claude Code is already logged in with
or add it to the "accounts" list in {path} yourself.
To try NextClaude without any account, run: nextclaude demo"""


class ConfigError(paths.FileProblem):
    """The config file is missing, unreadable or invalid; says which field and why."""


# Prefixes that are public knowledge (they only say what kind of key it is),
# so showing them helps tell keys apart without revealing anything.
_PUBLIC_PREFIXES = ("sk-ant-oat01-", "sk-ant-ort01-", "sk-ant-api03-", "sk-ant-", "nc-")


def mask_secret(value: str | None) -> str | None:
    """``"sk-ant-oat01-…(redacted)"`` for a token; never any of its secret part."""
    if value is None:
        return None
    for prefix in _PUBLIC_PREFIXES:
        if value.startswith(prefix) and len(value) > len(prefix):
            return f"{prefix}…(redacted)"
    return "…(redacted)"


def _repr_fields(obj: object, names: tuple[str, ...], secret: frozenset[str]) -> str:
    shown = []
    for name in names:
        value = getattr(obj, name)
        if name in secret and value:
            value = mask_secret(value)
        shown.append(f"{name}={value!r}")
    return f"{type(obj).__name__}({', '.join(shown)})"


@dataclass(frozen=True, repr=False)
class ProxySettings:
    port: int = 3456
    host: str = "127.0.0.1"
    api_key: str = ""
    trust_loopback: bool = False
    max_body_bytes: int = 33554432
    upstream_timeout: float = 600.0
    stream_idle_timeout: float = 300.0
    shutdown_grace: float = 30.0

    def __repr__(self) -> str:
        # The client key is a secret too: anyone with it can spend the accounts.
        return _repr_fields(self, tuple(self.__dataclass_fields__), frozenset({"api_key"}))


@dataclass(frozen=True)
class OAuthSettings:
    client_id: str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    authorize_url: str = "https://claude.ai/oauth/authorize"
    token_url: str = "https://platform.claude.com/v1/oauth/token"
    profile_url: str = "https://api.anthropic.com/api/oauth/profile"
    usage_url: str = "https://api.anthropic.com/api/oauth/usage"


@dataclass(frozen=True)
class HistorySettings:
    # Days of usage history kept in history.sqlite3 (nextclaude.history).
    retention_days: float = 90.0


# The console's colour themes (nextclaude.console.palette.THEMES; kept
# here too so reading a config never imports urwid).
THEMES = ("auto", "light", "dark", "mono")


@dataclass(frozen=True)
class ConsoleSettings:
    # auto reads on light and dark terminals; NO_COLOR means mono unless
    # --theme is given (nextclaude.console.palette.choose_theme).
    theme: str = "auto"


# Notification events (nextclaude.notify), one vocabulary for the config
# and the payloads.  "switched" is left out by default: it is routine.
NOTIFY_EVENTS = ("account-error", "exhausted", "all-exhausted", "recovered", "switched")
DEFAULT_NOTIFY_EVENTS = ("account-error", "exhausted", "all-exhausted", "recovered")


@dataclass(frozen=True, repr=False)
class NotifySettings:
    # The URL is a secret (chat webhooks carry their token in it): shown
    # only as its scheme and host (nextclaude.notify.safe_url).
    webhook_url: str | None = None
    # None means DEFAULT_NOTIFY_EVENTS.
    events: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return _repr_fields(self, tuple(self.__dataclass_fields__), frozenset({"webhook_url"}))

    @property
    def chosen(self) -> tuple[str, ...]:
        return DEFAULT_NOTIFY_EVENTS if self.events is None else self.events


@dataclass(frozen=True, repr=False)
class AccountConfig:
    name: str
    type: str  # "oauth" | "apikey"
    access_token: str | None = None
    refresh_token: str | None = None
    expires_at: int | None = None  # Unix epoch milliseconds, as Claude Code stores it
    api_key: str | None = None
    account_uuid: str | None = None
    email: str | None = None
    tier: str | None = None
    scopes: tuple[str, ...] = ()
    import_from: str | None = None
    priority: int = 0
    # False takes the account out of rotation (nextclaude disable): it
    # serves nothing, while its tokens are still refreshed.
    enabled: bool = True

    _SECRETS = frozenset({"access_token", "refresh_token", "api_key"})

    def __repr__(self) -> str:
        # Reprs end up in logs and tracebacks; tokens must not.
        return _repr_fields(self, tuple(self.__dataclass_fields__), self._SECRETS)

    @property
    def credential(self) -> str | None:
        """What goes upstream: the access token of an oauth account, the key of an apikey one."""
        return self.access_token if self.type == "oauth" else self.api_key


@dataclass(frozen=True)
class Config:
    path: Path
    proxy: ProxySettings = ProxySettings()
    log_dir: Path | None = None
    upstream: str = DEFAULT_UPSTREAM
    switch_threshold: float = 0.98
    hard_threshold: float = 0.995
    retry_after_cap: int = 55
    probe_interval: float = 15.0
    oauth: OAuthSettings = OAuthSettings()
    usage_poll_minutes: float = 30.0
    console: ConsoleSettings = ConsoleSettings()
    history: HistorySettings = HistorySettings()
    notify: NotifySettings = NotifySettings()
    # API list prices overriding the built-in table (nextclaude.usage_report):
    # (model-id prefix, input $/MTok, output $/MTok), as the file lists them.
    prices: tuple[tuple[str, float, float], ...] = ()
    accounts: tuple[AccountConfig, ...] = field(default=())

    def with_overrides(
        self,
        *,
        port: int | None = None,
        host: str | None = None,
        upstream: str | None = None,
        log_dir: str | Path | None = None,
    ) -> Config:
        """This config with command-line flags applied; ``None`` means "flag not given".

        Raises ``ValueError`` for a bad value (the file is not to blame).
        """
        proxy = self.proxy
        if port is not None:
            # 0 ("any free port") is for tests and one-off runs; the file,
            # read by clients to find the proxy, must name a real port.
            proxy = replace(proxy, port=_check(lambda v: _integer(v, 0, 65535), port, "port"))
        if host is not None:
            proxy = replace(proxy, host=_check(_non_empty_string, host, "host"))
        changes: dict[str, Any] = {"proxy": proxy}
        if upstream is not None:
            changes["upstream"] = _check(_http_url, upstream, "upstream")
        if log_dir is not None:
            # Relative to where the command was run, as users expect of a flag.
            changes["log_dir"] = Path(log_dir).expanduser().absolute()
        return replace(self, **changes)

    def account(self, name: str) -> AccountConfig | None:
        for account in self.accounts:
            if account.name == name:
                return account
        return None


# --- validation --------------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong; the message completes "<field> must ..."."""


def _describe(value: Any, secret: bool = False) -> str:
    """How a bad value is shown in an error: its JSON type, or itself when harmless."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if secret:
        return "a string" if isinstance(value, str) else "a number"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return repr(value)


def _check(checker: Callable[[Any], T], value: Any, name: str) -> T:
    try:
        return checker(value)
    except _Invalid as e:
        raise ValueError(f"{name} {e}") from None


def _integer(value: Any, low: int | None = None, high: int | None = None) -> int:
    # bool is an int subclass in Python but never a sensible number here.
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if low is not None and high is not None:
        wanted = f"an integer between {low} and {high}"
    elif low is not None:
        wanted = f"an integer of at least {low}"
    else:
        wanted = "an integer"
    raise _Invalid(f"must be {wanted}, not {_describe(value)}")


def _port(value: Any) -> int:
    return _integer(value, 1, 65535)


def _number(value: Any, *, positive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 if positive else value >= 0):
        return float(value)
    wanted = "a number greater than 0" if positive else "a number of at least 0"
    raise _Invalid(f"must be {wanted}, not {_describe(value)}")


def _fraction(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and 0 < value <= 1:
        return float(value)
    raise _Invalid(f"must be a utilization between 0 (exclusive) and 1, not {_describe(value)}")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"must be true or false (a JSON boolean, without quotes), not {_describe(value)}")


def _string(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid(f"must be a string, not {_describe(value)}")


def _non_empty_string(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise _Invalid(f"must be a non-empty string, not {_describe(value)}")


def _secret(value: Any) -> str:
    # Secrets travel in HTTP headers: whitespace or control characters would
    # be mangled or rejected there, so catch them here, without echoing them.
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_describe(value, secret=True)}")
    if not value:
        raise _Invalid("must not be empty")
    if not all("\x21" <= c <= "\x7e" for c in value):
        raise _Invalid("must contain only printable ASCII characters without spaces (value not shown)")
    return value


def _split_http_url(value: Any, hidden: str, example: str = "") -> Any:
    """
    The parts of an http(s) URL with a host and a valid port, else
    L{_Invalid}.  The value is never echoed: a URL can carry
    user:password@ (and a webhook URL is a secret as a whole).
    """
    if not isinstance(value, str):
        raise _Invalid(f"must be an http:// or https:// URL, not {_describe(value, secret=True)}")
    try:
        parts = urlsplit(value.strip())
        parts.port  # raises ValueError for a malformed port
    except ValueError:
        raise _Invalid(f"must be an http:// or https:// URL (this one is malformed{hidden})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"must be an http:// or https:// URL with a host{example}")
    return parts


def _http_url(value: Any) -> str:
    parts = _split_http_url(value, "", ", like https://api.anthropic.com")
    if parts.query or parts.fragment:
        raise _Invalid("must be a URL without a ?query or #fragment")
    return value.strip().rstrip("/")


def _expires_at(value: Any) -> int:
    millis = _integer(value, 0)
    # Both are plausible mistakes when copying from other tools; 10**11 ms is
    # 1973 and 10**11 s is the year 5138, so the ranges cannot be confused.
    if millis < 10**11:
        raise _Invalid(f"must be Unix epoch milliseconds; {millis} looks like seconds (multiply by 1000)")
    return millis


def _scopes(value: Any) -> tuple[str, ...]:
    # Claude Code stores a list; the OAuth token response has a space-separated string.
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(scope, str) for scope in value):
        return tuple(scope for scope in value if scope.strip())
    raise _Invalid(f"must be a list of strings or a space-separated string, not {_describe(value)}")


def _prices(value: Any) -> tuple[tuple[str, float, float], ...]:
    # {"claude-opus-4-5": {"input": 5, "output": 25}, ...}: US dollars per
    # million tokens, keyed by model-id prefix.
    if value == {}:
        raise _Invalid("must name at least one model-id prefix (leave prices out for the built-in table)")
    if not isinstance(value, dict):
        raise _Invalid(
            "must be an object naming model-id prefixes, like "
            '{"claude-opus-4-5": {"input": 5, "output": 25}} (US dollars per million tokens), '
            f"not {_describe(value)}"
        )
    prices = []
    for prefix, entry in value.items():
        if not prefix.strip():
            raise _Invalid("must not name an empty model-id prefix")
        if not isinstance(entry, dict):
            raise _Invalid(f"[{prefix!r}] must be an object with input and output, not {_describe(entry)}")
        try:
            prices.append((prefix, _number(entry.get("input"), positive=False), _number(entry.get("output"), positive=False)))
        except _Invalid as e:
            raise _Invalid(f"[{prefix!r}] input and output {e}") from None
    return tuple(prices)


def _webhook_url(value: Any) -> str:
    # Like _http_url, but a query is allowed (some chat webhooks carry
    # their token there); never echoed, the URL is a secret.
    _split_http_url(value, "; not shown", " (not shown)")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value.strip()):
        raise _Invalid("must be a URL of printable ASCII characters without spaces (not shown)")
    return value.strip()


def _notify_events(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Invalid(f"must be a list of event names, not {_describe(value)}")
    unknown = [item for item in value if item not in NOTIFY_EVENTS]
    if unknown:
        raise _Invalid(
            f"names unknown event(s) {', '.join(repr(item) for item in unknown)}; "
            f"known: {', '.join(NOTIFY_EVENTS)}"
        )
    return tuple(dict.fromkeys(value))


def _theme(value: Any) -> str:
    if value not in THEMES:
        raise _Invalid(f"must be one of {', '.join(repr(t) for t in THEMES)}, not {_describe(value)}")
    return value


class _Reader:
    """Takes typed fields out of one JSON object, naming them by their path in the file."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        self.data = data
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def get(self, key: str, checker: Callable[[Any], T], default: T) -> T:
        # null means "not set": people write it to blank out a field.
        value = self.data.get(key)
        if value is None:
            return default
        try:
            return checker(value)
        except _Invalid as e:
            raise _Invalid(f"{self.name(key)} {e}") from None

    def section(self, key: str) -> _Reader:
        value = self.data.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _Invalid(f"{self.name(key)} must be an object, not {_describe(value)}")
        return _Reader(value, f"{self.name(key)}.")


def _account_entries(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``accounts`` array (empty when left out), each entry an object; else ``_Invalid``.

    Only the shape: ``remove`` reads names from it without validating the
    accounts themselves.
    """
    entries = data.get("accounts")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise _Invalid(f"accounts must be an array of account objects, not {_describe(entries)}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _Invalid(f"accounts[{index}] must be an object, not {_describe(entry)}")
    return entries


def _parse_account(data: Any, where: str) -> AccountConfig:
    if not isinstance(data, dict):
        raise _Invalid(f"{where} must be an object, not {_describe(data)}")
    fields = _Reader(data, f"{where}.")
    if data.get("name") is None:
        raise _Invalid(f"{where}.name is required (a non-empty string naming the account)")
    name = fields.get("name", _non_empty_string, "")
    kind = data.get("type")
    if kind not in ACCOUNT_TYPES:
        raise _Invalid(f'{where}.type must be "oauth" or "apikey", not {_describe(kind)}')
    account = AccountConfig(
        name=name,
        type=kind,
        access_token=fields.get("accessToken", _secret, None),
        refresh_token=fields.get("refreshToken", _secret, None),
        expires_at=fields.get("expiresAt", _expires_at, None),
        api_key=fields.get("apiKey", _secret, None),
        account_uuid=fields.get("accountUuid", _string, None),
        email=fields.get("email", _string, None),
        tier=fields.get("tier", _string, None),
        scopes=fields.get("scopes", _scopes, ()),
        import_from=fields.get("importFrom", _string, None),
        priority=fields.get("priority", _integer, DEFAULT_PRIORITY[kind]),
        enabled=fields.get("enabled", _boolean, True),
    )
    if account.credential is None:
        needed = "accessToken" if kind == "oauth" else "apiKey"
        raise _Invalid(f"{where}.{needed} is required for an account of type {kind!r}")
    return account


def _parse(data: Mapping[str, Any], path: Path, without: str | None = None) -> Config:
    top = _Reader(data, "")
    proxy = top.section("proxy")
    defaults = ProxySettings()
    settings = ProxySettings(
        port=proxy.get("port", _port, defaults.port),
        host=proxy.get("host", _non_empty_string, defaults.host),
        # "" is what a first run replaces with a generated key, so it is allowed here.
        api_key=proxy.get("apiKey", lambda v: _secret(v) if v != "" else v, defaults.api_key),
        trust_loopback=proxy.get("trustLoopback", _boolean, defaults.trust_loopback),
        max_body_bytes=proxy.get("maxBodyBytes", lambda v: _integer(v, 1), defaults.max_body_bytes),
        upstream_timeout=proxy.get("upstreamTimeout", _number, defaults.upstream_timeout),
        stream_idle_timeout=proxy.get("streamIdleTimeout", _number, defaults.stream_idle_timeout),
        # 0 is meaningful: stop without waiting for streams.
        shutdown_grace=proxy.get(
            "shutdownGrace", lambda v: _number(v, positive=False), defaults.shutdown_grace
        ),
    )
    oauth = top.section("oauth")
    oauth_defaults = OAuthSettings()
    oauth_settings = OAuthSettings(
        client_id=oauth.get("clientId", _non_empty_string, oauth_defaults.client_id),
        authorize_url=oauth.get("authorizeUrl", _http_url, oauth_defaults.authorize_url),
        token_url=oauth.get("tokenUrl", _http_url, oauth_defaults.token_url),
        profile_url=oauth.get("profileUrl", _http_url, oauth_defaults.profile_url),
        usage_url=oauth.get("usageUrl", _http_url, oauth_defaults.usage_url),
    )
    history = top.section("history")
    console = top.section("console")
    notify = top.section("notify")
    log_dir = top.get("logDir", _non_empty_string, None)
    switch = top.get("switchThreshold", _fraction, Config.switch_threshold)
    hard = top.get("hardThreshold", _fraction, Config.hard_threshold)
    if hard < switch:
        raise _Invalid(f"hardThreshold ({hard}) must be at least switchThreshold ({switch})")

    accounts: list[AccountConfig] = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(_account_entries(data)):
        if without is not None and raw.get("name") == without:
            continue  # skipped in place, so the others keep the index the file gives them
        account = _parse_account(raw, f"accounts[{index}]")
        if account.name in first_index:
            raise _Invalid(
                f"accounts[{index}].name {account.name!r} is already used by "
                f"accounts[{first_index[account.name]}]; names must be unique"
            )
        first_index[account.name] = index
        accounts.append(account)

    return Config(
        path=path,
        proxy=settings,
        # A relative logDir means relative to the config file, not to wherever
        # twistd or a command happened to be started.
        log_dir=(path.parent / Path(log_dir).expanduser()) if log_dir else None,
        upstream=top.get("upstream", _http_url, DEFAULT_UPSTREAM),
        switch_threshold=switch,
        hard_threshold=hard,
        retry_after_cap=top.get("retryAfterCap", lambda v: _integer(v, 1, 3600), Config.retry_after_cap),
        probe_interval=top.get("probeInterval", _number, Config.probe_interval),
        oauth=oauth_settings,
        usage_poll_minutes=top.get("usagePollMinutes", _number, Config.usage_poll_minutes),
        console=ConsoleSettings(theme=console.get("theme", _theme, ConsoleSettings.theme)),
        history=HistorySettings(
            retention_days=history.get("retentionDays", _number, HistorySettings.retention_days),
        ),
        prices=top.get("prices", _prices, ()),
        notify=NotifySettings(
            webhook_url=notify.get("webhookUrl", _webhook_url, None),
            events=notify.get("events", _notify_events, None),
        ),
        accounts=tuple(accounts),
    )


def parse_config(data: dict[str, Any], path: Path, *, without: str | None = None) -> Config:
    """Validate the file's object into a ``Config``; ``ConfigError`` for the first bad field.

    Unknown keys are ignored so older versions can read newer files.
    ``without`` leaves out the account of that name, unchecked (what the
    file would be once it is removed).
    """
    if not isinstance(data, dict):
        raise ConfigError(path, f"top level must be a JSON object, not {_describe(data)}")
    try:
        return _parse(data, path, without)
    except _Invalid as e:
        raise ConfigError(path, str(e)) from None


def account_to_json(account: AccountConfig) -> dict[str, Any]:
    """The file form of an account: camelCase keys, unset fields left out."""
    result: dict[str, Any] = {"name": account.name, "type": account.type}
    optional = {
        "accessToken": account.access_token,
        "refreshToken": account.refresh_token,
        "expiresAt": account.expires_at,
        "apiKey": account.api_key,
        "accountUuid": account.account_uuid,
        "email": account.email,
        "tier": account.tier,
        "scopes": list(account.scopes) if account.scopes else None,
        "importFrom": account.import_from,
    }
    result.update((key, value) for key, value in optional.items() if value is not None)
    result["priority"] = account.priority
    if not account.enabled:
        result["enabled"] = False
    return result


# --- the file ---------------------------------------------------------------


def new_config_data() -> dict[str, Any]:
    """What a first run writes: the defaults people most often change, and a fresh client key."""
    return {
        "proxy": {"port": 3456, "host": "127.0.0.1", "apiKey": new_api_key()},
        "upstream": DEFAULT_UPSTREAM,
        "accounts": [],
    }


def new_api_key() -> str:
    return "nc-" + secrets.token_urlsafe(24)


def config_store(path: Path) -> JsonStore:
    return JsonStore(path, paths.lock_file(path))


def _update(path: Path, operation: Callable[[dict[str, Any]], T], create: bool = True) -> T:
    if create:
        paths.ensure_private_dir(path.parent)
    try:
        return config_store(path).update(operation, new_config_data if create else None)
    except StoreError as e:
        raise ConfigError(e.path, e.problem) from None


def _has_api_key(data: dict[str, Any]) -> bool:
    proxy = data.get("proxy")
    return isinstance(proxy, dict) and bool(proxy.get("apiKey"))


#: Completes "PATH: " when a command that only reads the config finds none.
MISSING_CONFIG = (
    "does not exist. `nextclaude login` or `nextclaude import` creates it with your first "
    "account; if you meant another file, check --config and $NEXTCLAUDE_CONFIG"
)


def read_config(path: Path) -> Config:
    """Read and validate the config without ever writing it.

    For the commands that only look (``accounts``, ``env``, ``run``,
    ``service``): a mistyped ``--config`` must not leave a directory and a
    fresh config with a new key behind, so a missing file is a
    ``ConfigError`` saying so, and a file without a client key is read as
    it is (``proxy.apiKey`` empty).
    """
    try:
        data = config_store(path).read()
    except StoreError as e:
        raise ConfigError(e.path, e.problem) from None
    if data is None:
        raise ConfigError(path, MISSING_CONFIG)
    return parse_config(data, path)


def _read_raw(path: Path) -> dict[str, Any]:
    """The file's top-level object, unvalidated; ``ConfigError`` if missing, not JSON or not an object."""
    try:
        data = config_store(path).read()
    except StoreError as e:
        raise ConfigError(e.path, e.problem) from None
    if data is None:
        raise ConfigError(path, MISSING_CONFIG)
    if not isinstance(data, dict):
        parse_config(data, path)  # raises, with the message every command gives
    return data


def raw_account_names(path: Path) -> list[str]:
    """The names in the file's ``accounts`` array, without validating the accounts.

    ``remove`` works from these, so that an account broken by a hand edit
    (exactly when a user wants it gone) can still be removed. A file that is
    missing or not JSON at all, or whose ``accounts`` is not an array of
    objects (there are no names to go by), is a ``ConfigError``.
    """
    data = _read_raw(path)
    try:
        entries = _account_entries(data)
    except _Invalid as e:
        raise ConfigError(path, str(e)) from None
    return [a["name"] for a in entries if isinstance(a.get("name"), str)]


def check_removal(path: Path, name: str) -> None:
    """``ConfigError`` unless the file would load without account ``name``.

    ``remove`` may get rid of a broken account, but a file broken anywhere
    else stays one the proxy refuses to load, so removing would not take
    effect: the same error as ``server``'s is better than a false "done".
    """
    parse_config(_read_raw(path), path, without=name)


def load_config(path: Path, create: bool = True) -> Config:
    """Read the config, creating it on first run and giving it a client key if it has none.

    A file that does not validate is reported and left exactly as it is.
    """
    try:
        data = config_store(path).read()
    except StoreError as e:
        raise ConfigError(e.path, e.problem) from None
    if data is None and not create:
        raise ConfigError(path, "does not exist (run nextclaude once without --config, or create it)")
    if data is not None:
        config = parse_config(data, path)
        if config.proxy.api_key:
            return config

    def ensure_api_key(current: dict[str, Any]) -> dict[str, Any]:
        # Validate what is on disk now (it may have changed since the read
        # above); raising here means nothing is written.
        parse_config(current, path)
        if not _has_api_key(current):
            if not isinstance(current.get("proxy"), dict):
                current["proxy"] = {}
            current["proxy"]["apiKey"] = new_api_key()
        return current

    # Through update() even for a missing file, so two first runs racing end
    # up with one file and one key.
    return parse_config(_update(path, ensure_api_key, create=create), path)


def add_account(path: Path, account: dict[str, Any]) -> None:
    """Add ``account`` (file form), replacing any account with the same name."""

    def operation(data: dict[str, Any]) -> None:
        accounts = data.get("accounts")
        if accounts is None:
            accounts = data["accounts"] = []
        if not isinstance(accounts, list):
            raise ConfigError(path, "accounts must be an array of account objects")
        for index, existing in enumerate(accounts):
            if isinstance(existing, dict) and existing.get("name") == account.get("name"):
                accounts[index] = dict(account)  # keep its place: order breaks ties
                break
        else:
            accounts.append(dict(account))
        # Refuse to write a file the proxy would then refuse to load.
        parse_config(data, path)

    _update(path, operation)


def _merge_account(path: Path, existing: dict[str, Any], index: int, changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            existing.pop(key, None)
        else:
            existing[key] = value
    # Only this account is checked: a refresh token the server has just
    # rotated must be saved even if the user broke another field meanwhile,
    # or the account is lost.
    try:
        _parse_account(existing, f"accounts[{index}]")
    except _Invalid as e:
        raise ConfigError(path, str(e)) from None


def _find_account(data: Mapping[str, Any], name: str) -> tuple[int, dict[str, Any]] | None:
    accounts = data.get("accounts")
    if not isinstance(accounts, list):
        return None
    for index, existing in enumerate(accounts):
        if isinstance(existing, dict) and existing.get("name") == name:
            return index, existing
    return None


def update_account(path: Path, name: str, changes: Mapping[str, Any]) -> bool:
    """Merge ``changes`` (file-form keys; ``None`` removes one) into account ``name``.

    For refreshed tokens: fields the caller does not mention, such as a
    priority the user edited meanwhile, are kept. False if there is no such account.
    """

    def operation(data: dict[str, Any]) -> bool:
        found = _find_account(data, name)
        if found is None:
            return False
        _merge_account(path, found[1], found[0], changes)
        return True

    return _update(path, operation, create=False)


#: What ``save_tokens`` did: wrote the pair, found no such account, or left
#: a pair it was told not to replace.
SAVED, ABSENT, SUPERSEDED = "saved", "absent", "superseded"


def save_tokens(
    path: Path, name: str, changes: Mapping[str, Any], replaceable: Callable[[str | None], bool]
) -> str:
    """Write a token pair into account ``name`` if the file's pair may be replaced.

    ``replaceable`` gets the refresh token the file holds *now* (under the
    lock) and says whether it is one the pair descends from or a spent one;
    a different, live token means the user put a new grant there meanwhile
    (``nextclaude login``), which must not be clobbered. Other fields of the
    account are kept. Returns ``SAVED``, ``ABSENT`` or ``SUPERSEDED``.
    """

    def operation(data: dict[str, Any]) -> str:
        found = _find_account(data, name)
        if found is None:
            return ABSENT
        index, existing = found
        current = existing.get("refreshToken")
        if not replaceable(current if isinstance(current, str) else None):
            return SUPERSEDED
        _merge_account(path, existing, index, changes)
        return SAVED

    return _update(path, operation, create=False)


def set_enabled(path: Path, name: str, enabled: bool) -> bool:
    """Take account ``name`` out of rotation (False) or put it back (True).

    One locked operation on the file as it is now; the running proxy picks
    it up on its next reload. False if there is no such account.
    """
    return update_account(path, name, {"enabled": enabled})


def set_priority(path: Path, name: str, priority: int) -> bool:
    """Give account ``name`` a priority (lower is used first); as ``set_enabled``."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, not {priority!r}")
    return update_account(path, name, {"priority": priority})


def remove_account(path: Path, name: str) -> bool:
    """Remove account ``name``; False if there was none.

    The rest of the file is not validated, so a broken account can be removed.
    """

    def operation(data: dict[str, Any]) -> bool:
        accounts = data.get("accounts")
        if not isinstance(accounts, list):
            return False
        kept = [a for a in accounts if not (isinstance(a, dict) and a.get("name") == name)]
        data["accounts"] = kept
        return len(kept) != len(accounts)

    try:
        return _update(path, operation, create=False)
    except ConfigError as e:
        if e.problem == "does not exist":
            return False
        raise
