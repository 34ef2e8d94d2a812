"""
Tests for nextclaude.credentials: finding, reading and writing back Claude
Code's credential store (files, and the macOS Keychain through a faked
`security`).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from nextclaude import credentials
from nextclaude.credentials import (
    KEYCHAIN_SOURCE,
    Completed,
    CredentialsError,
    ImportedCredentials,
    default_path,
    default_sources,
    from_json_text,
    read_credentials,
    read_default,
    write_back,
)
from nextclaude.oauth import TokenSet

ACCESS = "sk-ant-oat01-ACCESSSECRET"
REFRESH = "sk-ant-ort01-REFRESHSECRET"

NESTED = {
    "claudeAiOauth": {
        "accessToken": ACCESS,
        "refreshToken": REFRESH,
        "expiresAt": 1_900_000_000_000,
        "scopes": ["user:inference", "user:profile"],
        "subscriptionType": "max",
        "rateLimitTier": "default_claude_max_20x",
    },
    "mcpOAuth": {"server": {"accessToken": "other"}},
}


class FakeSecurity:
    """A stand-in for macOS's `security`: one generic-password item."""

    def __init__(self, item: str | None, account: str = "alice") -> None:
        self.item = item
        self.account = account
        self.calls: list[tuple[list[str], bytes | None]] = []

    def __call__(self, argv: Sequence[str], stdin: bytes | None) -> Completed:
        argv = list(argv)
        self.calls.append((argv, stdin))
        if argv[:2] == ["security", "find-generic-password"]:
            if self.item is None:
                return Completed(44, b"", b"The specified item could not be found in the keychain.")
            if "-w" in argv:
                return Completed(0, self.item.encode() + b"\n", b"")
            return Completed(0, f'keychain: "login"\nattributes:\n    "acct"<blob>="{self.account}"\n'.encode(), b"")
        if argv == ["security", "-i"]:
            assert stdin is not None
            words = stdin.decode().split()
            assert words[0] == "add-generic-password" and "-U" in words, words
            self.account = words[words.index("-a") + 1].strip('"')
            assert words[words.index("-s") + 1].strip('"') in ('Claude', "Claude Code-credentials"), words
            self.item = bytes.fromhex(words[words.index("-X") + 1].strip('"')).decode()
            return Completed(0, b"security> ", b"")
        return Completed(1, b"", b"unexpected")


class PathTests(SynchronousTestCase):
    def test_default_path(self) -> None:
        """The store is $CLAUDE_CONFIG_DIR/.credentials.json, else ~/.claude/.credentials.json."""
        self.assertEqual(default_path({"CLAUDE_CONFIG_DIR": "/x/y"}), Path("/x/y/.credentials.json"))
        self.assertEqual(default_path({}), Path("~/.claude/.credentials.json").expanduser())
        self.assertEqual(default_path({"CLAUDE_CONFIG_DIR": ""}), Path("~/.claude/.credentials.json").expanduser())

    def test_default_sources(self) -> None:
        """macOS tries the Keychain first, then the file; other platforms only the file."""
        self.assertEqual(default_sources({"CLAUDE_CONFIG_DIR": "/c"}, "linux"), ["/c/.credentials.json"])
        self.assertEqual(default_sources({"CLAUDE_CONFIG_DIR": "/c"}, "darwin"), [KEYCHAIN_SOURCE, "/c/.credentials.json"])


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.path = self.dir / ".credentials.json"

    def write(self, data: object) -> None:
        self.path.write_text(json.dumps(data))

    def test_nested(self) -> None:
        """Claude Code's nested claudeAiOauth form is read with every field."""
        self.write(NESTED)
        creds = read_credentials(str(self.path))
        self.assertEqual(
            (creds.access_token, creds.refresh_token, creds.expires_at_ms, creds.scopes, creds.subscription_type, creds.rate_limit_tier),
            (ACCESS, REFRESH, 1_900_000_000_000, ("user:inference", "user:profile"), "max", "default_claude_max_20x"),
        )
        self.assertEqual(creds.tier, "Max")

    def test_flat_and_snake_case(self) -> None:
        """A flat object and snake_case keys are accepted; scopes may be a space-separated string."""
        flat = from_json_text(json.dumps({"accessToken": ACCESS, "refreshToken": REFRESH, "expiresAt": 1_900_000_000_000}))
        self.assertEqual((flat.access_token, flat.refresh_token), (ACCESS, REFRESH))
        snake = from_json_text(
            json.dumps({"claude_ai_oauth": {"access_token": ACCESS, "refresh_token": REFRESH, "expires_at": 1_900_000_000, "scopes": "a b"}})
        )
        self.assertEqual((snake.access_token, snake.expires_at_ms, snake.scopes), (ACCESS, 1_900_000_000_000, ("a", "b")))

    def test_optional_fields(self) -> None:
        """Only the access token is required."""
        creds = from_json_text(json.dumps({"claudeAiOauth": {"accessToken": ACCESS}}))
        self.assertEqual((creds.refresh_token, creds.expires_at_ms, creds.scopes, creds.tier), (None, None, (), None))

    def test_errors_name_the_field_not_the_token(self) -> None:
        """Errors name the file and field and never show a token."""
        cases = [
            ({"claudeAiOauth": {"refreshToken": REFRESH}}, "claudeAiOauth.accessToken is missing"),
            ({"claudeAiOauth": {"accessToken": ACCESS + " x"}}, "claudeAiOauth.accessToken must be a token"),
            ({"claudeAiOauth": {"accessToken": ACCESS, "refreshToken": 5}}, "claudeAiOauth.refreshToken must be"),
            ({"claudeAiOauth": {"accessToken": ACCESS, "expiresAt": "soon"}}, "claudeAiOauth.expiresAt must be"),
            ({"claudeAiOauth": {"accessToken": ACCESS, "scopes": [1]}}, "claudeAiOauth.scopes must be"),
            ({"claudeAiOauth": "x"}, "claudeAiOauth must be an object"),
            ({"other": 1}, "accessToken is missing"),
            ([1], "must hold a JSON object"),
        ]
        for data, expected in cases:
            self.write(data)
            error = self.assertRaises(CredentialsError, read_credentials, str(self.path))
            self.assertIn(expected, str(error))
            self.assertTrue(str(error).startswith(str(self.path)), str(error))
            self.assertNotIn("SECRET", str(error))

    def test_invalid_json(self) -> None:
        """Invalid JSON is reported by position only, not by content."""
        self.path.write_text('{"accessToken": "sk-ant-oat01-SECRET", oops}')
        error = self.assertRaises(CredentialsError, read_credentials, str(self.path))
        self.assertIn("invalid JSON at line 1", str(error))
        self.assertNotIn("SECRET", str(error))
        error = self.assertRaises(CredentialsError, from_json_text, "{bad")
        self.assertTrue(str(error).startswith("--json: invalid JSON"))
        self.assertIn("is empty", str(self.assertRaises(CredentialsError, from_json_text, "  ")))

    def test_missing_file(self) -> None:
        """
        A missing file named by the user (`import --from PATH`) says it
        does not exist, without suggesting the --from that was given; when
        no default source exists, the error says how to fix it.
        """
        error = self.assertRaises(CredentialsError, read_credentials, str(self.path))
        self.assertIn("does not exist", str(error))
        self.assertNotIn("--from", str(error))
        error = self.assertRaises(
            CredentialsError, read_default, {"CLAUDE_CONFIG_DIR": str(self.path.parent)}, platform="linux"
        )
        self.assertIn("does not exist", str(error))
        self.assertIn("log in to Claude Code first, or pass --from / --json", str(error))

    def test_repr_hides_tokens(self) -> None:
        """ImportedCredentials' repr shows no token."""
        self.assertNotIn("SECRET", repr(ImportedCredentials(ACCESS, REFRESH, None)))

    def test_read_default(self) -> None:
        """read_default finds the file under CLAUDE_CONFIG_DIR and says which source it used."""
        self.write(NESTED)
        source, creds = read_default({"CLAUDE_CONFIG_DIR": str(self.dir)}, platform="linux")
        self.assertEqual(source, str(self.path))
        self.assertEqual(creds.access_token, ACCESS)


class WriteBackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.path = self.dir / ".credentials.json"
        self.tokens = TokenSet("sk-ant-oat01-NEW", "sk-ant-ort01-NEW", 1_950_000_000_000, ("user:inference",))

    def test_nested_keeps_other_keys(self) -> None:
        """Writing back replaces the pair inside claudeAiOauth and keeps every other key, and the file's mode."""
        self.path.write_text(json.dumps(NESTED))
        os.chmod(self.path, 0o640)
        write_back(str(self.path), self.tokens)
        data = json.loads(self.path.read_text())
        expected = json.loads(json.dumps(NESTED))
        expected["claudeAiOauth"].update(
            accessToken="sk-ant-oat01-NEW", refreshToken="sk-ant-ort01-NEW", expiresAt=1_950_000_000_000, scopes=["user:inference"]
        )
        self.assertEqual(data, expected)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        self.assertEqual([p.name for p in self.dir.iterdir()], [".credentials.json"])

    def test_flat_and_snake_spelling_kept(self) -> None:
        """A flat snake_case file is updated in its own form and spelling."""
        self.path.write_text(json.dumps({"access_token": "old", "refresh_token": "old", "extra": 1}))
        write_back(str(self.path), TokenSet("sk-ant-oat01-NEW", "sk-ant-ort01-NEW", None, ()))
        self.assertEqual(
            json.loads(self.path.read_text()), {"access_token": "sk-ant-oat01-NEW", "refresh_token": "sk-ant-ort01-NEW", "extra": 1}
        )

    def test_new_file_is_private(self) -> None:
        """A missing store is created in the nested form with mode 0600."""
        target = self.dir / "sub" / ".credentials.json"
        write_back(str(target), self.tokens)
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)
        self.assertEqual(read_credentials(str(target)).refresh_token, "sk-ant-ort01-NEW")

    def test_broken_file_left_alone(self) -> None:
        """A store that is not valid JSON is not overwritten."""
        self.path.write_text("{not json")
        self.assertRaises(CredentialsError, write_back, str(self.path), self.tokens)
        self.assertEqual(self.path.read_text(), "{not json")

    def test_symlink_followed(self) -> None:
        """A symlinked store is written through to its target, the link kept."""
        real = self.dir / "real.json"
        real.write_text(json.dumps(NESTED))
        self.path.symlink_to(real)
        write_back(str(self.path), self.tokens)
        self.assertTrue(self.path.is_symlink())
        self.assertEqual(read_credentials(str(real)).access_token, "sk-ant-oat01-NEW")


class KeychainTests(SynchronousTestCase):
    def test_read(self) -> None:
        """On macOS the Keychain item is read with `security find-generic-password -s … -w`."""
        security = FakeSecurity(json.dumps(NESTED))
        creds = read_credentials(KEYCHAIN_SOURCE, platform="darwin", runner=security)
        self.assertEqual(creds.access_token, ACCESS)
        self.assertEqual(security.calls[0][0], ["security", "find-generic-password", "-s", "Claude Code-credentials", "-w"])

    def test_missing_item(self) -> None:
        """A missing Keychain item says to log in to Claude Code."""
        error = self.assertRaises(CredentialsError, read_credentials, KEYCHAIN_SOURCE, platform="darwin", runner=FakeSecurity(None))
        self.assertIn("no such Keychain item", str(error))

    def test_not_macos(self) -> None:
        """The Keychain source on another platform is a clear error."""
        error = self.assertRaises(CredentialsError, read_credentials, KEYCHAIN_SOURCE, platform="linux", runner=FakeSecurity("{}"))
        self.assertIn("only available on macOS", str(error))

    def test_write_back(self) -> None:
        """Writing back updates the item for its account, keeps other keys, and passes tokens on stdin, not argv."""
        security = FakeSecurity(json.dumps(NESTED), account="alice")
        write_back(KEYCHAIN_SOURCE, TokenSet("sk-ant-oat01-NEW", "sk-ant-ort01-NEW", 1_950_000_000_000, ()), platform="darwin", runner=security)
        data = json.loads(security.item or "")
        self.assertEqual(data["claudeAiOauth"]["refreshToken"], "sk-ant-ort01-NEW")
        self.assertEqual(data["claudeAiOauth"]["subscriptionType"], "max")
        self.assertEqual(data["mcpOAuth"], NESTED["mcpOAuth"])
        self.assertEqual(security.account, "alice")
        for argv, _ in security.calls:
            self.assertFalse(any("NEW" in word for word in argv), argv)

    def test_read_default_prefers_keychain(self) -> None:
        """On macOS read_default uses the Keychain item when it exists, else the file."""
        security = FakeSecurity(json.dumps(NESTED))
        source, _ = read_default({"CLAUDE_CONFIG_DIR": "/nonexistent"}, platform="darwin", runner=security)
        self.assertEqual(source, KEYCHAIN_SOURCE)
        error = self.assertRaises(CredentialsError, read_default, {"CLAUDE_CONFIG_DIR": "/nonexistent"}, platform="darwin", runner=FakeSecurity(None))
        self.assertIn("Keychain", str(error))
        self.assertIn("/nonexistent/.credentials.json", str(error))

    def test_run_command_missing_program(self) -> None:
        """The default runner reports a missing program as exit status 127."""
        self.assertEqual(credentials.run_command(["/nonexistent/security"], None).returncode, 127)


class StaleTempTests(SynchronousTestCase):
    """A write-back killed mid-write leaves a temp file holding tokens beside Claude Code's file (item 13)."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.path = self.dir / ".credentials.json"
        self.path.write_text(json.dumps(NESTED))

    def make(self, name: str, age: float) -> Path:
        path = self.dir / name
        path.write_text(json.dumps(NESTED))
        when = os.stat(path).st_mtime - age
        os.utime(path, (when, when))
        return path

    def test_old_temps_of_our_naming_removed(self) -> None:
        """Our temp names older than 10 minutes are removed on write-back; younger ones (a write-back running
        in another process) and every other name (Claude Code's own temps, backups) stay."""
        self.make("..credentials.json.0123456789ab.tmp", age=11 * 60)
        self.make("..credentials.json.ba9876543210.tmp", age=60 * 60)
        young = self.make("..credentials.json.00000000000f.tmp", age=9 * 60)
        others = [
            self.make(name, age=60 * 60)
            for name in (".credentials.json.tmp", ".credentials.json.1234.tmp", ".credentials.json.bak", "notes.tmp")
        ]
        write_back(str(self.path), TokenSet("sk-ant-oat01-NEW", "sk-ant-ort01-NEW", None, ()))
        self.assertEqual(read_credentials(str(self.path)).refresh_token, "sk-ant-ort01-NEW")
        self.assertEqual(
            sorted(p.name for p in self.dir.iterdir()), sorted([".credentials.json", young.name] + [p.name for p in others])
        )
