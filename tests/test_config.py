"""Tests for L{nextclaude.config}."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nextclaude import config as config_module
from nextclaude.config import (
    DEFAULT_UPSTREAM,
    NO_ACCOUNTS_MESSAGE,
    AccountConfig,
    Config,
    ConfigError,
    OAuthSettings,
    ProxySettings,
    account_to_json,
    add_account,
    config_store,
    load_config,
    new_config_data,
    parse_config,
    remove_account,
    update_account,
    save_tokens,
    SAVED,
    SUPERSEDED,
    ABSENT,
)
from nextclaude.store import JsonStore

PATH = Path("/home/someone/.config/nextclaude/config.json")

# Every secret used below; none may ever show up in an error or a repr.
ACCESS = "sk-ant-oat01-ACCESSSECRET"
REFRESH = "sk-ant-ort01-REFRESHSECRET"
API_KEY = "sk-ant-api03-APIKEYSECRET"
CLIENT_KEY = "nc-CLIENTKEYSECRET"
SECRET_PARTS = ("ACCESSSECRET", "REFRESHSECRET", "APIKEYSECRET", "CLIENTKEYSECRET", "URLSECRET")


def oauth_account(**fields: Any) -> dict[str, Any]:
    account = {
        "name": "work",
        "type": "oauth",
        "accessToken": ACCESS,
        "refreshToken": REFRESH,
        "expiresAt": 1767225600000,
    }
    account.update(fields)
    return account


def apikey_account(**fields: Any) -> dict[str, Any]:
    account = {"name": "api", "type": "apikey", "apiKey": API_KEY}
    account.update(fields)
    return account


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class DefaultsTests(SynchronousTestCase):
    def test_every_default(self) -> None:
        """An empty object gives the documented default for every field."""
        config = parse_config({}, PATH)
        expected = [
            ("path", config.path, PATH),
            ("proxy.port", config.proxy.port, 3456),
            ("proxy.host", config.proxy.host, "127.0.0.1"),
            ("proxy.apiKey", config.proxy.api_key, ""),
            ("proxy.trustLoopback", config.proxy.trust_loopback, False),
            ("proxy.maxBodyBytes", config.proxy.max_body_bytes, 33554432),
            ("proxy.upstreamTimeout", config.proxy.upstream_timeout, 600.0),
            ("proxy.streamIdleTimeout", config.proxy.stream_idle_timeout, 300.0),
            ("proxy.shutdownGrace", config.proxy.shutdown_grace, 30.0),
            ("logDir", config.log_dir, None),
            ("upstream", config.upstream, "https://api.anthropic.com"),
            ("switchThreshold", config.switch_threshold, 0.98),
            ("hardThreshold", config.hard_threshold, 0.995),
            ("retryAfterCap", config.retry_after_cap, 55),
            ("probeInterval", config.probe_interval, 15.0),
            ("oauth.clientId", config.oauth.client_id, "9d1c250a-e61b-44d9-88ed-5944d1962f5e"),
            ("oauth.authorizeUrl", config.oauth.authorize_url, "https://claude.ai/oauth/authorize"),
            ("oauth.tokenUrl", config.oauth.token_url, "https://platform.claude.com/v1/oauth/token"),
            ("oauth.profileUrl", config.oauth.profile_url, "https://api.anthropic.com/api/oauth/profile"),
            ("oauth.usageUrl", config.oauth.usage_url, "https://api.anthropic.com/api/oauth/usage"),
            ("usagePollMinutes", config.usage_poll_minutes, 30.0),
            ("accounts", config.accounts, ()),
        ]
        for name, actual, wanted in expected:
            self.assertEqual(actual, wanted, name)
        self.assertEqual(config, Config(path=PATH, proxy=ProxySettings()))
        self.assertEqual(DEFAULT_UPSTREAM, "https://api.anthropic.com")

    def test_null_means_default(self) -> None:
        """A field set to null takes its default, as if it were absent."""
        config = parse_config(
            {"proxy": {"port": None}, "oauth": None, "logDir": None, "accounts": None}, PATH
        )
        self.assertEqual(config, Config(path=PATH, proxy=ProxySettings()))

    def test_account_defaults(self) -> None:
        """Optional account fields default to None/empty; priority is 0 for oauth and 1 for apikey."""
        config = parse_config(
            {"accounts": [{"name": "s", "type": "oauth", "accessToken": ACCESS}, apikey_account()]},
            PATH,
        )
        self.assertEqual(
            config.accounts[0], AccountConfig(name="s", type="oauth", access_token=ACCESS, priority=0)
        )
        self.assertEqual(
            config.accounts[1], AccountConfig(name="api", type="apikey", api_key=API_KEY, priority=1)
        )


class ParseTests(SynchronousTestCase):
    def test_every_field(self) -> None:
        """Every documented field is read from its camelCase JSON name."""
        data = {
            "proxy": {
                "port": 8080,
                "host": "0.0.0.0",
                "apiKey": CLIENT_KEY,
                "trustLoopback": True,
                "maxBodyBytes": 1024,
                "upstreamTimeout": 60,
                "streamIdleTimeout": 12.5,
                "shutdownGrace": 0,
            },
            "logDir": "/var/log/nc",
            "upstream": "http://localhost:9000/base/",
            "switchThreshold": 0.9,
            "hardThreshold": 0.9,
            "retryAfterCap": 3600,
            "probeInterval": 2,
            "oauth": {
                "clientId": "client",
                "authorizeUrl": "http://auth.test/a",
                "tokenUrl": "http://auth.test/t",
                "profileUrl": "http://auth.test/p",
                "usageUrl": "http://auth.test/u",
            },
            "usagePollMinutes": 0.5,
            "accounts": [
                oauth_account(
                    accountUuid="uuid-1",
                    email="a@example.com",
                    tier="Max",
                    scopes="user:inference user:profile",
                    importFrom="~/.claude/.credentials.json",
                    priority=-3,
                ),
                apikey_account(scopes=["a", "b"]),
            ],
            "someFutureSetting": {"anything": True},
        }
        config = parse_config(data, PATH)
        self.assertEqual(
            config.proxy,
            ProxySettings(8080, "0.0.0.0", CLIENT_KEY, True, 1024, 60.0, 12.5, 0.0),
        )
        self.assertEqual(config.log_dir, Path("/var/log/nc"))
        self.assertEqual(config.upstream, "http://localhost:9000/base")
        self.assertEqual((config.switch_threshold, config.hard_threshold), (0.9, 0.9))
        self.assertEqual((config.retry_after_cap, config.probe_interval), (3600, 2.0))
        self.assertEqual(
            config.oauth,
            OAuthSettings(
                "client", "http://auth.test/a", "http://auth.test/t", "http://auth.test/p", "http://auth.test/u"
            ),
        )
        self.assertEqual(config.usage_poll_minutes, 0.5)
        self.assertEqual(
            config.accounts[0],
            AccountConfig(
                name="work",
                type="oauth",
                access_token=ACCESS,
                refresh_token=REFRESH,
                expires_at=1767225600000,
                account_uuid="uuid-1",
                email="a@example.com",
                tier="Max",
                scopes=("user:inference", "user:profile"),
                import_from="~/.claude/.credentials.json",
                priority=-3,
            ),
        )
        self.assertEqual(config.accounts[1].scopes, ("a", "b"))

    def test_log_dir_relative_to_config(self) -> None:
        """A relative logDir is relative to the config file's directory; ~ is the home directory."""
        self.assertEqual(parse_config({"logDir": "logs"}, PATH).log_dir, PATH.parent / "logs")
        self.assertEqual(parse_config({"logDir": "~/l"}, PATH).log_dir, Path.home() / "l")

    def test_credential(self) -> None:
        """credential is the access token of an oauth account and the key of an apikey one."""
        config = parse_config({"accounts": [oauth_account(apiKey=API_KEY), apikey_account()]}, PATH)
        self.assertEqual([a.credential for a in config.accounts], [ACCESS, API_KEY])

    def test_account_lookup(self) -> None:
        """Config.account finds an account by name, or gives None."""
        config = parse_config({"accounts": [oauth_account(), apikey_account()]}, PATH)
        self.assertEqual(config.account("api"), config.accounts[1])
        self.assertIsNone(config.account("nobody"))

    def test_top_level_not_object(self) -> None:
        """Data that is not a JSON object is a ConfigError naming the file."""
        error = self.assertRaises(ConfigError, parse_config, [1], PATH)
        self.assertEqual(str(error), f"{PATH}: top level must be a JSON object, not an array")


# (data, the problem as reported). Secrets are planted everywhere so every case
# also checks they are never echoed.
INVALID: list[tuple[dict[str, Any], str]] = [
    ({"proxy": []}, "proxy must be an object, not an array"),
    ({"proxy": {"port": "abc"}}, "proxy.port must be an integer between 1 and 65535, not 'abc'"),
    ({"proxy": {"port": 0}}, "proxy.port must be an integer between 1 and 65535, not 0"),
    ({"proxy": {"port": 65536}}, "proxy.port must be an integer between 1 and 65535, not 65536"),
    ({"proxy": {"port": True}}, "proxy.port must be an integer between 1 and 65535, not true"),
    ({"proxy": {"port": 80.5}}, "proxy.port must be an integer between 1 and 65535, not 80.5"),
    ({"proxy": {"host": ""}}, "proxy.host must be a non-empty string, not ''"),
    ({"proxy": {"apiKey": 12345}}, "proxy.apiKey must be a string, not a number"),
    ({"proxy": {"apiKey": "nc-CLIENTKEYSECRET two"}}, "proxy.apiKey must contain only printable ASCII"),
    ({"proxy": {"trustLoopback": "true"}}, "proxy.trustLoopback must be true or false (a JSON boolean, without quotes), not 'true'"),
    ({"proxy": {"maxBodyBytes": 0}}, "proxy.maxBodyBytes must be an integer of at least 1, not 0"),
    ({"proxy": {"upstreamTimeout": 0}}, "proxy.upstreamTimeout must be a number greater than 0, not 0"),
    ({"proxy": {"streamIdleTimeout": "5"}}, "proxy.streamIdleTimeout must be a number greater than 0, not '5'"),
    ({"proxy": {"shutdownGrace": -1}}, "proxy.shutdownGrace must be a number of at least 0, not -1"),
    ({"logDir": 5}, "logDir must be a non-empty string, not 5"),
    ({"upstream": "ftp://example.com"}, "upstream must be an http:// or https:// URL with a host"),
    ({"upstream": "api.anthropic.com"}, "upstream must be an http:// or https:// URL with a host"),
    ({"upstream": "https://user:URLSECRET@h/?q=1"}, "upstream must be a URL without a ?query or #fragment"),
    ({"upstream": "https://h:URLSECRET/"}, "upstream must be an http:// or https:// URL (this one is malformed)"),
    ({"upstream": 443}, "upstream must be an http:// or https:// URL, not a number"),
    ({"switchThreshold": 0}, "switchThreshold must be a utilization between 0 (exclusive) and 1, not 0"),
    ({"hardThreshold": 1.5}, "hardThreshold must be a utilization between 0 (exclusive) and 1, not 1.5"),
    ({"hardThreshold": 0.5}, "hardThreshold (0.5) must be at least switchThreshold (0.98)"),
    ({"retryAfterCap": 0}, "retryAfterCap must be an integer between 1 and 3600, not 0"),
    ({"retryAfterCap": 3601}, "retryAfterCap must be an integer between 1 and 3600, not 3601"),
    ({"probeInterval": 0}, "probeInterval must be a number greater than 0, not 0"),
    ({"oauth": "x"}, "oauth must be an object, not 'x'"),
    ({"oauth": {"clientId": ""}}, "oauth.clientId must be a non-empty string, not ''"),
    ({"oauth": {"authorizeUrl": "claude.ai"}}, "oauth.authorizeUrl must be an http:// or https:// URL"),
    ({"oauth": {"tokenUrl": "x"}}, "oauth.tokenUrl must be an http:// or https:// URL"),
    ({"oauth": {"profileUrl": "x"}}, "oauth.profileUrl must be an http:// or https:// URL"),
    ({"oauth": {"usageUrl": "x"}}, "oauth.usageUrl must be an http:// or https:// URL"),
    ({"usagePollMinutes": -5}, "usagePollMinutes must be a number greater than 0, not -5"),
    ({"accounts": {"work": oauth_account()}}, "accounts must be an array of account objects, not an object"),
]

# (the third account's content, the problem as reported).
INVALID_ACCOUNTS: list[tuple[Any, str]] = [
    ("work", "accounts[2] must be an object, not 'work'"),
    ({"type": "oauth", "accessToken": ACCESS}, "accounts[2].name is required"),
    (oauth_account(name=""), "accounts[2].name must be a non-empty string, not ''"),
    (oauth_account(name="a"), "accounts[2].name 'a' is already used by accounts[0]; names must be unique"),
    (oauth_account(type=None), 'accounts[2].type must be "oauth" or "apikey", not null'),
    (oauth_account(type="bearer"), "accounts[2].type must be \"oauth\" or \"apikey\", not 'bearer'"),
    (oauth_account(accessToken=None), "accounts[2].accessToken is required for an account of type 'oauth'"),
    (apikey_account(name="c", apiKey=None, accessToken=ACCESS), "accounts[2].apiKey is required for an account of type 'apikey'"),
    (oauth_account(accessToken=12), "accounts[2].accessToken must be a string, not a number"),
    (oauth_account(accessToken=""), "accounts[2].accessToken must not be empty"),
    (oauth_account(refreshToken=[REFRESH]), "accounts[2].refreshToken must be a string, not an array"),
    (oauth_account(refreshToken=REFRESH + "\n"), "accounts[2].refreshToken must contain only printable ASCII"),
    (apikey_account(name="c", apiKey={"k": API_KEY}), "accounts[2].apiKey must be a string, not an object"),
    (oauth_account(expiresAt="1767225600000"), "accounts[2].expiresAt must be an integer of at least 0, not '1767225600000'"),
    (oauth_account(expiresAt=1.7e12), "accounts[2].expiresAt must be an integer of at least 0, not 1700000000000.0"),
    (oauth_account(expiresAt=1767225600), "accounts[2].expiresAt must be Unix epoch milliseconds; 1767225600 looks like seconds"),
    (oauth_account(accountUuid=7), "accounts[2].accountUuid must be a string, not 7"),
    (oauth_account(email=False), "accounts[2].email must be a string, not false"),
    (oauth_account(tier=["Max"]), "accounts[2].tier must be a string, not an array"),
    (oauth_account(importFrom=1), "accounts[2].importFrom must be a string, not 1"),
    (oauth_account(scopes=["a", 1]), "accounts[2].scopes must be a list of strings or a space-separated string, not an array"),
    (oauth_account(scopes=3), "accounts[2].scopes must be a list of strings or a space-separated string, not 3"),
    (oauth_account(priority="1"), "accounts[2].priority must be an integer, not '1'"),
    (oauth_account(priority=True), "accounts[2].priority must be an integer, not true"),
]


class ValidationTests(SynchronousTestCase):
    def assertInvalid(self, data: dict[str, Any], problem: str) -> None:
        error = self.assertRaises(ConfigError, parse_config, data, PATH)
        self.assertEqual(error.path, PATH)
        self.assertTrue(error.problem.startswith(problem), f"{error.problem!r} for {problem!r}")
        self.assertEqual(str(error), f"{PATH}: {error.problem}")
        for secret in SECRET_PARTS:
            self.assertNotIn(secret, str(error), problem)

    def test_fields(self) -> None:
        """Each bad setting is reported with the file, the field's JSON path and what was expected."""
        for data, problem in INVALID:
            full: dict[str, Any] = {"proxy": {"apiKey": CLIENT_KEY}, "accounts": [oauth_account()]}
            for key, value in data.items():
                if isinstance(value, dict) and isinstance(full.get(key), dict):
                    full[key] = {**full[key], **value}
                else:
                    full[key] = value
            self.assertInvalid(full, problem)

    def test_accounts(self) -> None:
        """Each bad account field is reported by index and field, never with a secret."""
        for account, problem in INVALID_ACCOUNTS:
            data = {"accounts": [oauth_account(name="a"), apikey_account(name="b"), account]}
            self.assertInvalid(data, problem)

    def test_hard_equal_to_switch(self) -> None:
        """hardThreshold may equal switchThreshold, and 1 is a valid utilization."""
        config = parse_config({"switchThreshold": 1, "hardThreshold": 1}, PATH)
        self.assertEqual((config.switch_threshold, config.hard_threshold), (1.0, 1.0))


class SecretHidingTests(SynchronousTestCase):
    def test_reprs_hide_secrets(self) -> None:
        """repr and str of accounts, proxy settings and whole configs never show a token or key."""
        config = parse_config(
            {"proxy": {"apiKey": CLIENT_KEY}, "accounts": [oauth_account(), apikey_account()]}, PATH
        )
        texts = [repr(config), str(config), repr(config.proxy), str(config.proxy)]
        for account in config.accounts:
            texts += [repr(account), str(account)]
        for text in texts:
            for secret in SECRET_PARTS:
                self.assertNotIn(secret, text)
        self.assertIn("access_token='sk-ant-oat01-…(redacted)'", repr(config.accounts[0]))
        self.assertIn("refresh_token='sk-ant-ort01-…(redacted)'", repr(config.accounts[0]))
        self.assertIn("api_key='sk-ant-api03-…(redacted)'", repr(config.accounts[1]))
        self.assertIn("api_key='nc-…(redacted)'", repr(config.proxy))
        self.assertIn("name='work'", repr(config.accounts[0]))

    def test_mask_unknown_format(self) -> None:
        """A secret without a well-known prefix shows nothing of itself; unset stays None."""
        account = AccountConfig(name="x", type="oauth", access_token="abcd-efgh-ijkl")
        self.assertIn("access_token='…(redacted)'", repr(account))
        self.assertIn("refresh_token=None", repr(account))
        self.assertNotIn("abcd", repr(account))


class AccountJsonTests(SynchronousTestCase):
    def test_omits_unset(self) -> None:
        """account_to_json writes camelCase keys and leaves out unset fields."""
        account = AccountConfig(name="api", type="apikey", api_key=API_KEY, priority=1)
        self.assertEqual(
            account_to_json(account),
            {"name": "api", "type": "apikey", "apiKey": API_KEY, "priority": 1},
        )

    # database=None: no .hypothesis directory left in the checkout.
    @settings(database=None)
    @given(
        name=st.text(min_size=1).filter(str.strip),
        kind=st.sampled_from(["oauth", "apikey"]),
        secret=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
        optional_secret=st.none()
        | st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1),
        expires_at=st.none() | st.integers(min_value=10**11, max_value=10**15),
        text=st.none() | st.text(),
        scopes=st.lists(st.text(min_size=1).filter(str.strip)).map(tuple),
        priority=st.integers(min_value=-(2**40), max_value=2**40),
    )
    def test_round_trip(
        self,
        name: str,
        kind: str,
        secret: str,
        optional_secret: str | None,
        expires_at: int | None,
        text: str | None,
        scopes: tuple[str, ...],
        priority: int,
    ) -> None:
        """Parsing account_to_json's output gives back the same account."""
        account = AccountConfig(
            name=name,
            type=kind,
            access_token=secret if kind == "oauth" else optional_secret,
            refresh_token=optional_secret,
            expires_at=expires_at,
            api_key=secret if kind == "apikey" else optional_secret,
            account_uuid=text,
            email=text,
            tier=text,
            scopes=scopes,
            import_from=text,
            priority=priority,
        )
        parsed = parse_config({"accounts": [account_to_json(account)]}, PATH)
        self.assertEqual(parsed.accounts, (account,))


class OverrideTests(SynchronousTestCase):
    def test_flags_beat_file(self) -> None:
        """Each given flag replaces the file's value; flags not given leave it alone."""
        base = parse_config(
            {"proxy": {"port": 1000, "host": "::1", "apiKey": CLIENT_KEY}, "upstream": "http://u.test"},
            PATH,
        )
        cases: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
            ({}, (1000, "::1", "http://u.test", None)),
            ({"port": 2000}, (2000, "::1", "http://u.test", None)),
            ({"port": 0}, (0, "::1", "http://u.test", None)),
            ({"host": "0.0.0.0"}, (1000, "0.0.0.0", "http://u.test", None)),
            ({"upstream": "https://v.test/"}, (1000, "::1", "https://v.test", None)),
            ({"log_dir": "/l"}, (1000, "::1", "http://u.test", Path("/l"))),
        ]
        for flags, expected in cases:
            result = base.with_overrides(**flags)
            actual = (result.proxy.port, result.proxy.host, result.upstream, result.log_dir)
            self.assertEqual(actual, expected, flags)
            self.assertEqual(result.proxy.api_key, CLIENT_KEY)

    def test_bad_flags(self) -> None:
        """A bad flag value is a ValueError naming the setting, not a ConfigError blaming the file."""
        base = parse_config({}, PATH)
        bad: list[tuple[dict[str, Any], str]] = [
            ({"port": -1}, "port must be an integer between 0 and 65535, not -1"),
            ({"port": "80"}, "port must be an integer between 0 and 65535, not '80'"),
            ({"host": ""}, "host must be a non-empty string"),
            ({"upstream": "nope"}, "upstream must be an http:// or https:// URL"),
        ]
        for flags, message in bad:
            error = self.assertRaises(ValueError, base.with_overrides, **flags)
            self.assertNotIsInstance(error, ConfigError)
            self.assertTrue(str(error).startswith(message), str(error))


class MessageTests(SynchronousTestCase):
    def test_no_accounts_message(self) -> None:
        """The no-accounts message names the file and every way to add an account or try the demo."""
        text = NO_ACCOUNTS_MESSAGE.format(path=PATH)
        for needed in (
            str(PATH),
            "nextclaude login ",
            "nextclaude login --api",
            "nextclaude import",
            "nextclaude demo",
        ):
            self.assertIn(needed, text)
        self.assertGreater(text.count("\n"), 2)

    def test_new_config_data(self) -> None:
        """First-run content has the default port and host, a fresh nc- key each time, and no accounts."""
        first, second = new_config_data(), new_config_data()
        self.assertEqual(first["proxy"]["port"], 3456)
        self.assertEqual(first["proxy"]["host"], "127.0.0.1")
        self.assertTrue(first["proxy"]["apiKey"].startswith("nc-"))
        self.assertGreaterEqual(len(first["proxy"]["apiKey"]), 30)
        self.assertNotEqual(first["proxy"]["apiKey"], second["proxy"]["apiKey"])
        self.assertEqual((first["upstream"], first["accounts"]), (DEFAULT_UPSTREAM, []))
        self.assertEqual(parse_config(first, PATH).proxy.api_key, first["proxy"]["apiKey"])


class FileTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        self.dir = Path(self.mktemp()).absolute()
        self.path = self.dir / "nested" / "config.json"

    def write(self, data: Any) -> bytes:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        raw = json.dumps(data).encode() if not isinstance(data, bytes) else data
        self.path.write_bytes(raw)
        return raw

    def on_disk(self) -> dict[str, Any]:
        return json.loads(self.path.read_bytes())


class LoadTests(FileTestCase):
    def test_first_run(self) -> None:
        """A missing file is created 0600 in a new 0700 directory, with an nc- key and no accounts."""
        config = load_config(self.path)
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(_mode(self.path.parent), 0o700)
        self.assertTrue(config.proxy.api_key.startswith("nc-"))
        self.assertEqual(config.accounts, ())
        self.assertEqual(self.on_disk()["proxy"]["apiKey"], config.proxy.api_key)

    def test_second_run_reads(self) -> None:
        """Loading an existing file gives the same key and does not rewrite the file."""
        first = load_config(self.path)
        inode = os.stat(self.path).st_ino
        self.assertEqual(load_config(self.path), first)
        self.assertEqual(os.stat(self.path).st_ino, inode)

    def test_racing_first_runs(self) -> None:
        """A first run that finds the file created meanwhile keeps the other run's key."""
        other = load_config(self.path)

        class SawNothing(JsonStore):
            reads = 0

            def read(self) -> dict[str, Any] | None:
                SawNothing.reads += 1
                return None if SawNothing.reads == 1 else super().read()

        self.patch(config_module, "config_store", lambda path: SawNothing(path, self.dir / "l"))
        self.assertEqual(load_config(self.path).proxy.api_key, other.proxy.api_key)

    def test_missing_without_create(self) -> None:
        """With create=False a missing file is a ConfigError and nothing is created."""
        error = self.assertRaises(ConfigError, load_config, self.path, create=False)
        self.assertTrue(error.problem.startswith("does not exist"))
        self.assertFalse(self.path.parent.exists())

    def test_key_added(self) -> None:
        """A file without a client key gets one; everything else in it is kept."""
        for proxy in ({}, None, {"apiKey": ""}, {"apiKey": None, "port": 9}):
            data = {"proxy": proxy, "accounts": [oauth_account()], "future": [1, 2]}
            self.write(data)
            config = load_config(self.path, create=False)
            self.assertTrue(config.proxy.api_key.startswith("nc-"))
            written = self.on_disk()
            self.assertEqual(written["proxy"]["apiKey"], config.proxy.api_key)
            self.assertEqual(written["future"], [1, 2])
            self.assertEqual(written["accounts"], [oauth_account()])
            self.assertEqual(_mode(self.path), 0o600)

    def test_broken_file_untouched(self) -> None:
        """A broken file (bad JSON, not an object, wrong types, with or without a key) is a
        ConfigError naming the file, and its bytes are unchanged."""
        cases = [
            (b'{"proxy": {"port": 1,}}', "invalid JSON at line 1, column 22"),
            (b"[]", "top level must be a JSON object"),
            ({"proxy": {"port": "abc"}}, "proxy.port must be an integer"),
            ({"proxy": {"apiKey": CLIENT_KEY, "port": "abc"}}, "proxy.port must be an integer"),
            ({"accounts": [oauth_account(expiresAt="soon")]}, "accounts[0].expiresAt must be"),
            ({"proxy": "x"}, "proxy must be an object"),
        ]
        for content, problem in cases:
            raw = self.write(content)
            error = self.assertRaises(ConfigError, load_config, self.path)
            self.assertEqual(error.path, self.path)
            self.assertIn(problem, str(error))
            self.assertTrue(str(error).startswith(f"{self.path}: "))
            self.assertEqual(self.path.read_bytes(), raw)


class EditTests(FileTestCase):
    def other_writer(self, change: Any) -> None:
        """Another process's store object changes the file between our read and our write."""
        JsonStore(self.path, self.path.parent / "nextclaude.lock").update(change)

    def test_add_to_missing_file(self) -> None:
        """Adding an account on a first run creates the file with a key and the account."""
        add_account(self.path, oauth_account())
        config = load_config(self.path, create=False)
        self.assertEqual([a.name for a in config.accounts], ["work"])
        self.assertTrue(config.proxy.api_key.startswith("nc-"))
        self.assertEqual(_mode(self.path), 0o600)

    def test_add_keeps_other_writers_changes(self) -> None:
        """An add after another writer changed the file keeps that writer's account and settings."""
        load_config(self.path)

        def change(data: dict[str, Any]) -> None:
            data["accounts"].append(apikey_account())
            data["probeInterval"] = 5

        self.other_writer(change)
        add_account(self.path, oauth_account())
        config = load_config(self.path, create=False)
        self.assertEqual([a.name for a in config.accounts], ["api", "work"])
        self.assertEqual(config.probe_interval, 5.0)

    def test_add_replaces_same_name_in_place(self) -> None:
        """Adding an account whose name exists replaces it where it stood."""
        self.write({"accounts": [oauth_account(name="a"), oauth_account(name="b")]})
        add_account(self.path, apikey_account(name="a"))
        self.assertEqual(
            [(a["name"], a["type"]) for a in self.on_disk()["accounts"]],
            [("a", "apikey"), ("b", "oauth")],
        )

    def test_add_invalid_writes_nothing(self) -> None:
        """An invalid account is a ConfigError and the file keeps its bytes."""
        raw = self.write({"accounts": [oauth_account()]})
        for bad in (oauth_account(name="x", accessToken=None), {"type": "apikey", "apiKey": API_KEY}):
            error = self.assertRaises(ConfigError, add_account, self.path, bad)
            self.assertNotIn("APIKEYSECRET", str(error))
            self.assertEqual(self.path.read_bytes(), raw)

    def test_remove(self) -> None:
        """remove_account reports whether the account was there and keeps everything else,
        including what another writer added in between."""
        self.write({"accounts": [oauth_account(), apikey_account()]})
        before = config_store(self.path).read()
        assert before is not None
        self.assertEqual(before["accounts"][0]["name"], "work")
        self.other_writer(lambda data: data["accounts"].append(oauth_account(name="new")))
        self.assertTrue(remove_account(self.path, "work"))
        self.assertFalse(remove_account(self.path, "work"))
        self.assertEqual([a["name"] for a in self.on_disk()["accounts"]], ["api", "new"])

    def test_remove_broken_account(self) -> None:
        """An account so broken the file does not load can still be removed."""
        self.write({"accounts": [oauth_account(expiresAt="bad"), apikey_account()]})
        self.assertTrue(remove_account(self.path, "work"))
        self.assertEqual([a.name for a in load_config(self.path).accounts], ["api"])

    def test_remove_from_missing_file(self) -> None:
        """Removing from a file that does not exist removes nothing and creates nothing."""
        self.assertFalse(remove_account(self.path, "work"))
        self.assertFalse(self.path.exists())

    def test_update_account(self) -> None:
        """update_account merges new tokens into the account as it is now, keeping other edits."""
        self.write({"accounts": [oauth_account()]})
        self.other_writer(lambda data: data["accounts"][0].update(priority=7))
        changed = update_account(
            self.path, "work", {"accessToken": "sk-ant-oat01-NEW", "refreshToken": None}
        )
        self.assertTrue(changed)
        account = load_config(self.path).account("work")
        assert account is not None
        self.assertEqual(
            (account.access_token, account.refresh_token, account.priority),
            ("sk-ant-oat01-NEW", None, 7),
        )
        self.assertFalse(update_account(self.path, "nobody", {"accessToken": "x"}))

    def test_update_account_checks_only_that_account(self) -> None:
        """A rotated token is saved even if another account is broken; a bad change is refused."""
        self.write({"accounts": [oauth_account(), apikey_account(apiKey=5)]})
        self.assertTrue(update_account(self.path, "work", {"refreshToken": "sk-ant-ort01-NEW"}))
        self.assertEqual(self.on_disk()["accounts"][0]["refreshToken"], "sk-ant-ort01-NEW")
        raw = self.path.read_bytes()
        error = self.assertRaises(
            ConfigError, update_account, self.path, "work", {"expiresAt": 1767225600}
        )
        self.assertIn("accounts[0].expiresAt", str(error))
        self.assertEqual(self.path.read_bytes(), raw)

    def test_save_tokens_replaces_only_what_it_may(self) -> None:
        """save_tokens writes the pair, keeping other edits, when the file's refresh token is one the caller may
        replace (its own old one, a spent one, none); a different, live token (a new login meanwhile) is left
        alone; a missing account is reported, not added."""
        pair = {"accessToken": "sk-ant-oat01-NEW", "refreshToken": "sk-ant-ort01-NEW", "expiresAt": 1_950_000_000_000}
        replaceable = {None, "sk-ant-ort01-OLD", "sk-ant-ort01-SPENT"}
        cases = [("sk-ant-ort01-OLD", SAVED), ("sk-ant-ort01-SPENT", SAVED), (None, SAVED), ("sk-ant-ort01-LOGIN", SUPERSEDED)]
        for current, outcome in cases:
            account = oauth_account(priority=9)
            account.pop("refreshToken", None)
            if current is not None:
                account["refreshToken"] = current
            self.write({"accounts": [account]})
            seen: list[str | None] = []

            def may(token: str | None) -> bool:
                seen.append(token)
                return token in replaceable

            self.assertEqual(save_tokens(self.path, "work", pair, may), outcome, current)
            self.assertEqual(seen, [current])
            saved = self.on_disk()["accounts"][0]
            self.assertEqual(saved["priority"], 9)
            self.assertEqual(saved.get("refreshToken"), pair["refreshToken"] if outcome == SAVED else current)
        self.assertEqual(save_tokens(self.path, "nobody", pair, lambda token: True), ABSENT)
        self.assertEqual([a["name"] for a in self.on_disk()["accounts"]], ["work"])
