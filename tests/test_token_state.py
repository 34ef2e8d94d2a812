"""
Token state only moves forward (issue 10, item 3): the proxy never goes
back to a refresh token it spent, and a rotated pair that could not be
saved is kept (recovery file, problem shown), retried, and adopted by the
next start.

Faults are injected at the store layer: ``store.atomic_write`` is wrapped
so chosen files fail with ENOSPC or EACCES (no mounts). The OAuth side is
the fake server behind StubTreq, time a task.Clock (tests.test_accounts'
Harness).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import io
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from nextclaude import account_commands, store, tokenstate
from nextclaude.accounts import IN_MEMORY_MESSAGE, SAVE_RETRY_START, STOP_SAVE_TIMEOUT
from nextclaude.config import update_account
from nextclaude.control import ConfigAccounts, InvalidAccount
from nextclaude.problems import TOKEN_IN_MEMORY, TOKEN_UNSAVED
from nextclaude.service import StateService
from nextclaude.tokenstate import SPENT_KEY, SpentTokens, token_digest
from tests.test_accounts import HOUR, MARGIN, Harness


class Disk:
    """
    The store layer's writer with faults: a write of a file whose name is
    in C{failing} (or any file, under C{"*"}) raises OSError with that errno.
    Every attempt's file name is recorded in C{attempts}.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self._real = store.atomic_write
        self.failing: dict[str, int] = {}
        self.attempts: list[str] = []
        test.patch(store, "atomic_write", self.write)

    def write(self, path: Path, data: bytes, mode: int = 0o600) -> None:
        name = Path(path).name
        self.attempts.append(name)
        code = self.failing.get(name, self.failing.get("*"))
        if code is not None:
            raise OSError(code, os.strerror(code), str(path))
        self._real(path, data, mode)

    def count(self, name: str) -> int:
        return self.attempts.count(name)


class TokenStateHarness(Harness):
    def setUp(self) -> None:
        super().setUp()
        self.disk = Disk(self)

    def state(self) -> dict[str, Any]:
        path = self.dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def recovery(self, name: str = "a") -> Path:
        return tokenstate.recovery_path(self.path, name)

    def problem_kinds(self, name: str = "a") -> list[str]:
        return [p["kind"] for p in self.problems.snapshot() if p["account"] == name]

    def problem(self, name: str, kind: str) -> str:
        [message] = [p["message"] for p in self.problems.snapshot() if p["account"] == name and p["kind"] == kind]
        return message

    def assert_live(self, name: str = "a") -> None:
        """The account holds a pair the server still honours, and config.json holds the same."""
        config = self.account(name).config
        self.assertIsNone(self.account(name).error)
        self.assertIn(config.refresh_token, self.fake.live_refresh)
        saved = self.file_account(name)
        assert saved is not None
        self.assertEqual((saved["accessToken"], saved["refreshToken"]), (config.access_token, config.refresh_token))

    def rotate(self, name: str = "a") -> None:
        """One more on-demand rotation (after the 30 s in which a 401 is blamed on the old token)."""
        self.clock.advance(31)
        self.successResultOf(self.refresh(name))


class EditorCopyTests(TokenStateHarness):
    """(a) An editor that opened config.json before a rotation saves after it."""

    def test_stale_copies_refused_and_live_pair_written_back(self) -> None:
        """Copies one and three rotations old, saved with other edits: the reload keeps each account's live pair,
        keeps the edits (priority, a new account), writes the live pairs back in one locked write, and the
        accounts keep refreshing."""
        self.oauth_account("one", expires_in=8 * HOUR)
        self.oauth_account("three", expires_in=8 * HOUR)
        self.start()
        opened = json.loads(self.path.read_text())  # the editor's buffer
        self.rotate("one")
        for _ in range(3):
            self.rotate("three")
        live = {name: self.account(name).config for name in ("one", "three")}
        for account in opened["accounts"]:
            account["priority"] = 7
        access, refresh, expires = self.fake.issue("bob@example.com")
        opened["accounts"].append({"name": "new", "type": "oauth", "accessToken": access, "refreshToken": refresh})
        self.path.write_text(json.dumps(opened))
        self.clock.advance(2)
        for name in ("one", "three"):
            self.assert_live(name)
            self.assertEqual(self.account(name).config.refresh_token, live[name].refresh_token)
            self.assertEqual(self.account(name).config.priority, 7)
            self.assertEqual(self.file_account(name)["priority"], 7)  # type: ignore[index]
        self.assertEqual(self.file_account("new")["refreshToken"], refresh)  # type: ignore[index]
        self.assertIn("holds an old refresh token of one", self.log_text())
        self.rotate("three")
        self.assert_live("three")
        self.assertEqual(self.fake.requests_to("/v1/oauth/token")[-1].body["refresh_token"], live["three"].refresh_token)

    def test_reload_without_a_live_pair_refuses(self) -> None:
        """A spent token under a name the proxy holds no live pair for is not refreshed with: the account is
        an error saying to log in again, and no token request is spent on it."""
        ours = self.oauth_account("a", expires_in=8 * HOUR)
        service = self.start()
        self.rotate("a")
        copy = dict(ours, name="copy")
        data = json.loads(self.path.read_text())
        data["accounts"].append(copy)
        self.path.write_text(json.dumps(data))
        service.reload()
        error = self.account("copy").error
        assert error is not None
        self.assertIn("already used", error)
        self.assertIn("nextclaude login", error)
        self.assertFalse(service.can_refresh(self.account("copy")))
        requests = len(self.refreshes())
        self.clock.advance(8 * HOUR)
        self.assertNotIn(ours["refreshToken"], [r.body["refresh_token"] for r in self.refreshes()[requests:]])

    def test_ledger_written_before_the_pair(self) -> None:
        """A rotation records the spent token's digest in state.json before (never after) config.json gets the
        new pair, and neither file holds the spent token's text."""
        ours = self.oauth_account("a", expires_in=60)
        self.start()
        before = len(self.disk.attempts)
        self.clock.advance(0)
        names = [n for n in self.disk.attempts[before:] if n in ("state.json", "config.json")]
        self.assertEqual(names[:2], ["state.json", "config.json"])
        self.assertEqual(self.state()[SPENT_KEY], {"a": [token_digest(ours["refreshToken"])]})
        for path in (self.dir / "state.json", self.path):
            self.assertNotIn(ours["refreshToken"], path.read_text())

    def test_state_saves_keep_the_ledger(self) -> None:
        """The periodic state save replaces the router's state but keeps the spent-token ledger."""
        ours = self.oauth_account("a", expires_in=60)
        self.start()
        self.clock.advance(0)
        state = StateService(self.clock, tokenstate.state_store(self.path), self.router)
        state.save()
        saved = self.state()
        self.assertIn("accounts", saved)
        self.assertEqual(saved[SPENT_KEY]["a"], [token_digest(ours["refreshToken"])])


class BrokenFileTests(TokenStateHarness):
    """(b) The file is broken while a rotation happens, then the user restores the old text."""

    def broken_during_rotation(self, breaker: Any) -> None:
        self.oauth_account("a", expires_in=60)
        self.start()
        good = self.path.read_text()
        self.fake.hold_tokens = True
        self.clock.advance(0)
        breaker(good)
        self.release()
        live = self.account("a").config
        self.assertIn(live.refresh_token, self.fake.live_refresh)
        self.assertIn("could not save the new token of a", self.log_text())
        self.assertEqual(self.problem_kinds(), [TOKEN_UNSAVED])
        self.assertIn(str(self.recovery()), self.problem("a", TOKEN_UNSAVED))
        kept = json.loads(self.recovery().read_text())
        self.assertEqual((kept["accessToken"], kept["refreshToken"]), (live.access_token, live.refresh_token))
        self.assertEqual(stat.S_IMODE(os.stat(self.recovery()).st_mode), 0o600)
        # The user restores the text from before the rotation.
        self.path.write_text(good)
        self.clock.advance(2)
        self.assertEqual(self.account("a").config.refresh_token, live.refresh_token)
        self.assert_live()
        self.assertFalse(self.recovery().exists())
        self.assertEqual(self.problem_kinds(), [])

    def test_invalid_json(self) -> None:
        """Invalid JSON during the rotation; old text restored: the live pair is kept and saved."""
        self.broken_during_rotation(lambda good: self.path.write_text(good[:-3]))

    def test_empty_file(self) -> None:
        """An emptied file during the rotation; old text restored: the live pair is kept and saved."""
        self.broken_during_rotation(lambda good: self.path.write_text(""))

    def test_invalid_account(self) -> None:
        """The account itself made invalid during the rotation; old text restored: the live pair is kept and saved."""

        def breaker(good: str) -> None:
            data = json.loads(good)
            data["accounts"][0]["priority"] = "high"
            self.path.write_text(json.dumps(data))

        self.broken_during_rotation(breaker)


class DiskFaultTests(TokenStateHarness):
    """(c) A rotated pair that cannot be saved is kept, retried, and lands."""

    def unsaved_then_retried(self, code: int) -> None:
        self.oauth_account("a", expires_in=60)
        self.disk.failing["config.json"] = code
        self.start()
        before = self.disk.count("config.json")
        self.clock.advance(0)
        live = self.account("a").config
        self.assertIn(live.refresh_token, self.fake.live_refresh)
        self.assertEqual(self.problem_kinds(), [TOKEN_UNSAVED])
        self.assertIn(os.strerror(code), self.problem("a", TOKEN_UNSAVED))
        self.assertEqual(json.loads(self.recovery().read_text())["refreshToken"], live.refresh_token)
        # Retried after 5, 10, 20 s...
        attempts = [self.disk.count("config.json") - before]
        for delay in (SAVE_RETRY_START, 2 * SAVE_RETRY_START, 4 * SAVE_RETRY_START):
            self.clock.advance(delay - 0.1)
            attempts.append(self.disk.count("config.json") - before)
            self.clock.advance(0.1)
            attempts.append(self.disk.count("config.json") - before)
        self.assertEqual(attempts, [1, 1, 2, 2, 3, 3, 4])
        del self.disk.failing["config.json"]
        self.clock.advance(8 * SAVE_RETRY_START)
        self.assert_live()
        self.assertFalse(self.recovery().exists())
        self.assertEqual(self.problem_kinds(), [])
        self.assertIn("saved the new token of a", self.log_text())
        # Nothing left to retry.
        attempts_now = self.disk.count("config.json")
        self.clock.advance(600)
        self.assertEqual(self.disk.count("config.json"), attempts_now)

    def test_disk_full(self) -> None:
        """ENOSPC on config.json: the pair goes to the recovery file, is retried with back-off, and lands."""
        self.unsaved_then_retried(errno.ENOSPC)

    def test_permission_denied(self) -> None:
        """EACCES on config.json: the pair goes to the recovery file, is retried with back-off, and lands."""
        self.unsaved_then_retried(errno.EACCES)

    def test_saved_with_the_next_config_write(self) -> None:
        """An unsaved pair lands with the next write of the config (another account's rotation), before its
        retry timer fires."""
        self.oauth_account("a", expires_in=60)
        self.oauth_account("b", "bob@example.com", expires_in=8 * HOUR)
        self.disk.failing["config.json"] = errno.ENOSPC
        self.start()
        self.clock.advance(0)
        self.assertEqual(self.problem_kinds(), [TOKEN_UNSAVED])
        del self.disk.failing["config.json"]
        writes = self.disk.count("config.json")
        self.successResultOf(self.refresh("b"))
        self.assertEqual(self.disk.count("config.json"), writes + 2)  # a's pair, then b's, at the same moment
        self.assert_live("a")
        self.assert_live("b")
        self.assertFalse(self.recovery().exists())
        self.assertEqual(self.problem_kinds(), [])

    def test_held_only_in_memory(self) -> None:
        """When not even the recovery file can be written, the problem says the token is only in memory and a
        stop needs a login; once the recovery file can be written the problem becomes token-unsaved; once the
        config can, both are gone. state.json's ledger is retried too."""
        ours = self.oauth_account("a", expires_in=60)
        self.disk.failing["*"] = errno.ENOSPC
        self.start()
        self.clock.advance(0)
        self.assertEqual(self.problem_kinds(), [TOKEN_IN_MEMORY])
        self.assertEqual(
            self.problem("a", TOKEN_IN_MEMORY), "a: new token held only in memory; after a stop a needs `nextclaude login`"
        )
        self.assertEqual(IN_MEMORY_MESSAGE.format(name="a"), self.problem("a", TOKEN_IN_MEMORY))
        self.assertFalse(self.recovery().exists())
        self.disk.failing = {"config.json": errno.ENOSPC}
        self.clock.advance(SAVE_RETRY_START)
        self.assertEqual(self.problem_kinds(), [TOKEN_UNSAVED])
        self.assertTrue(self.recovery().exists())
        self.assertEqual(self.state()[SPENT_KEY]["a"], [token_digest(ours["refreshToken"])])
        self.disk.failing = {}
        self.clock.advance(2 * SAVE_RETRY_START)
        self.assert_live()
        self.assertEqual(self.problem_kinds(), [])
        self.assertFalse(self.recovery().exists())

    def test_removed_while_unsaved(self) -> None:
        """An account removed from the file while its pair is unsaved is not added back; its recovery file and
        problem go."""
        self.oauth_account("a", expires_in=60)
        self.oauth_account("b", "bob@example.com", expires_in=8 * HOUR)
        self.disk.failing["config.json"] = errno.ENOSPC
        self.start()
        self.clock.advance(0)
        data = json.loads(self.path.read_text())
        data["accounts"] = [a for a in data["accounts"] if a["name"] != "a"]
        self.path.write_text(json.dumps(data))
        del self.disk.failing["config.json"]
        self.clock.advance(2)
        self.assertIsNone(self.file_account("a"))
        self.assertIsNone(self.pool.get("a"))
        self.assertFalse(self.recovery().exists())
        self.assertEqual(self.problem_kinds(), [])

    def test_new_login_while_unsaved_wins(self) -> None:
        """A new grant written to the file (nextclaude login) while a pair is unsaved is not overwritten."""
        self.oauth_account("a", expires_in=60)
        self.disk.failing["config.json"] = errno.ENOSPC
        self.start()
        self.clock.advance(0)
        del self.disk.failing["config.json"]
        access, refresh, expires = self.fake.issue()
        update_account(self.path, "a", {"accessToken": access, "refreshToken": refresh, "expiresAt": expires})
        self.clock.advance(SAVE_RETRY_START)
        self.assertEqual(self.file_account("a")["refreshToken"], refresh)  # type: ignore[index]
        self.assertEqual(self.account("a").config.refresh_token, refresh)
        self.assertFalse(self.recovery().exists())
        self.assertEqual(self.problem_kinds(), [])


class StopTests(TokenStateHarness):
    def test_stop_saves_once(self) -> None:
        """A stop makes one save attempt per unsaved pair: with the disk back, the pair lands then."""
        self.oauth_account("a", expires_in=60)
        self.disk.failing["config.json"] = errno.ENOSPC
        service = self.start()
        self.clock.advance(0)
        del self.disk.failing["config.json"]
        self.successResultOf(service.stopService())
        self.assert_live()
        self.assertFalse(self.recovery().exists())

    def test_stop_with_disk_still_full(self) -> None:
        """A stop whose save fails ends anyway, saying the recovery file holds the pair; the file stays."""
        self.oauth_account("a", expires_in=60)
        self.disk.failing["config.json"] = errno.ENOSPC
        service = self.start()
        self.clock.advance(0)
        attempts = self.disk.count("config.json")
        self.successResultOf(service.stopService())
        self.assertEqual(self.disk.count("config.json"), attempts + 1)
        self.assertIn("the next start adopts it", self.log_text())
        self.assertTrue(self.recovery().exists())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_never_hangs_on_the_lock(self) -> None:
        """When another process keeps the lock, the stop gives up after a bounded wait and still ends,
        reporting the token that is held only in memory."""
        self.oauth_account("a", expires_in=60)
        self.disk.failing["*"] = errno.ENOSPC
        service = self.start()
        self.clock.advance(0)
        now = [0.0]
        self.patch(store, "_monotonic", lambda: now[0])
        self.patch(store, "_sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
        fd = os.open(self.dir / "nextclaude.lock", os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: as another process
        self.successResultOf(service.stopService())
        self.assertGreaterEqual(now[0], STOP_SAVE_TIMEOUT)
        self.assertLess(now[0], STOP_SAVE_TIMEOUT + 1)
        self.assertIn("a: new token held only in memory; after a stop a needs `nextclaude login`", self.log_text())


class RestartTests(TokenStateHarness):
    def test_restart_adopts_the_unsaved_pair(self) -> None:
        """A pair that never reached config.json (disk full until the stop) is adopted from the recovery file
        by the next start, saved, and the recovery file removed; the account refreshes fine after."""
        self.oauth_account("a", expires_in=60)
        self.disk.failing["config.json"] = errno.ENOSPC
        first = self.start()
        self.clock.advance(0)
        live = self.account("a").config
        self.successResultOf(first.stopService())
        del self.disk.failing["config.json"]
        self.start()
        self.assertEqual(self.account("a").config.refresh_token, live.refresh_token)
        self.assert_live()
        self.assertFalse(self.recovery().exists())
        self.assertEqual(self.problem_kinds(), [])
        self.clock.advance(self.fake.expires_in)
        self.assert_live()

    def crashed(self, config_token: str | None, recovered: tuple[str, str, int], spent: list[str], in_state: bool) -> None:
        """What a proxy killed with an unsaved pair leaves: the config, maybe a ledger, a recovery file."""
        update_account(self.path, "a", {"refreshToken": config_token})
        if in_state:
            (self.dir / "state.json").write_text(json.dumps({SPENT_KEY: {"a": [token_digest(t) for t in spent]}}))
        access, refresh, expires = recovered
        tokenstate.write_recovery(
            self.path,
            "a",
            {"accessToken": access, "refreshToken": refresh, "expiresAt": expires},
            [token_digest(t) for t in spent],
        )

    def test_recovery_adopted_when_config_is_behind(self) -> None:
        """The recovery pair is adopted when the config's refresh token is spent (per state.json, or per the
        recovery file alone when the ledger write failed too) or missing."""
        for case in ("spent-in-state", "spent-in-recovery-only", "missing"):
            ours = self.oauth_account("a", expires_in=8 * HOUR)
            self.fake.live_refresh.pop(ours["refreshToken"])
            recovered = self.fake.issue()
            config_token = None if case == "missing" else ours["refreshToken"]
            self.crashed(config_token, recovered, [ours["refreshToken"]], in_state=case == "spent-in-state")
            service = self.start()
            self.assertEqual(self.account("a").config.refresh_token, recovered[1], case)
            self.assert_live()
            self.assertFalse(self.recovery().exists(), case)
            self.assertEqual(self.state()[SPENT_KEY]["a"], [token_digest(ours["refreshToken"])], case)
            self.successResultOf(service.stopService())
            (self.dir / "state.json").unlink()

    def test_stale_recovery_removed(self) -> None:
        """A recovery file is removed without being adopted when its pair already landed, when the config holds
        a grant the proxy never spent (a new login), when a later rotation spent its token, and when its
        account is gone."""
        ours = self.oauth_account("a", expires_in=8 * HOUR)
        landed = (ours["accessToken"], ours["refreshToken"], ours["expiresAt"])
        self.crashed(ours["refreshToken"], landed, [], in_state=False)
        newer = self.fake.issue()
        tokenstate.write_recovery(self.path, "gone", {"accessToken": newer[0], "refreshToken": newer[1]}, [])
        service = self.start()
        self.assertFalse(self.recovery().exists())
        self.assertFalse(self.recovery("gone").exists())
        self.assertIsNone(self.file_account("gone"))
        self.successResultOf(service.stopService())

        login = self.fake.issue()
        self.crashed(ours["refreshToken"], login, [], in_state=False)  # recovery older than the config's grant
        update_account(self.path, "a", {"refreshToken": ours["refreshToken"]})
        service = self.start()
        self.assertEqual(self.account("a").config.refresh_token, ours["refreshToken"])
        self.assertFalse(self.recovery().exists())
        self.successResultOf(service.stopService())

        old = self.fake.issue()
        self.crashed(ours["refreshToken"], old, [], in_state=False)
        (self.dir / "state.json").write_text(json.dumps({SPENT_KEY: {"a": [token_digest(old[1])]}}))
        self.start()
        self.assertEqual(self.account("a").config.refresh_token, ours["refreshToken"])
        self.assertFalse(self.recovery().exists())

    def test_spent_config_without_recovery_refused_at_start(self) -> None:
        """A config whose refresh token the ledger says is spent, with no recovery file, starts the account in
        error instead of spending a token request on a dead token."""
        ours = self.oauth_account("a", expires_in=60)
        (self.dir / "state.json").write_text(json.dumps({SPENT_KEY: {"a": [token_digest(ours["refreshToken"])]}}))
        self.start()
        self.clock.advance(HOUR)
        self.assertEqual(self.refreshes(), [])
        error = self.account("a").error
        assert error is not None
        self.assertIn("already used", error)


class SourceRereadTests(TokenStateHarness):
    """The re-read of Claude Code's credential source refuses a spent token."""

    def imported(self) -> tuple[dict[str, Any], Path]:
        ours = self.oauth_account("a", expires_in=60)
        source = self.source_file(ours)
        update_account(self.path, "a", {"importFrom": str(source)})
        return ours, source

    def test_spent_pair_in_source_not_adopted(self) -> None:
        """A source restored to a spent pair (even one claiming a later expiry) is not adopted before a refresh:
        the live pair is written back there, the refresh uses it, and the account stays healthy."""
        ours, source = self.imported()
        self.start()
        self.clock.advance(0)
        live = self.account("a").config
        source.write_text(
            json.dumps({"claudeAiOauth": dict(json.loads(source.read_text())["claudeAiOauth"], **{
                "accessToken": ours["accessToken"],
                "refreshToken": ours["refreshToken"],
                "expiresAt": live.expires_at + 3600_000,  # type: ignore[operator]
            }), "mcpOAuth": {"keep": "me"}})
        )
        self.clock.advance(self.fake.expires_in - MARGIN)
        self.assertEqual([r.body["refresh_token"] for r in self.refreshes()], [ours["refreshToken"], live.refresh_token])
        self.assert_live()
        self.assertIn("holds a refresh token of a the proxy already used", self.log_text())
        self.assertEqual(json.loads(source.read_text())["claudeAiOauth"]["refreshToken"], self.account("a").config.refresh_token)

    def test_spent_pair_in_source_after_invalid_grant(self) -> None:
        """After invalid_grant, a source holding a spent token is not adopted (no request with it), and our dead
        pair is not written over it."""
        ours, source = self.imported()
        service = self.start()
        self.clock.advance(0)
        live = self.account("a").config
        self.fake.live_refresh.pop(live.refresh_token)  # type: ignore[arg-type]
        restored = json.dumps({"claudeAiOauth": {"accessToken": ours["accessToken"], "refreshToken": ours["refreshToken"], "expiresAt": ours["expiresAt"]}})
        read = service._read_source
        reads: list[str] = []

        def read_source(where: str) -> Any:
            # Restored between the read before the refresh and the one after invalid_grant.
            reads.append(where)
            if len(reads) == 2:
                source.write_text(restored)
            return read(where)

        service._read_source = read_source  # type: ignore[method-assign]
        self.clock.advance(self.fake.expires_in - MARGIN)
        self.assertEqual([r.body["refresh_token"] for r in self.refreshes()], [ours["refreshToken"], live.refresh_token])
        self.assertIsNotNone(self.account("a").error)
        self.assertEqual(len(reads), 2)
        self.assertEqual(source.read_text(), restored)


class ImportTests(TokenStateHarness):
    """`nextclaude import` refuses a spent token."""

    def run_import(self, **options: Any) -> tuple[int, str]:
        self.patch(account_commands, "run_async", lambda main: self.fail("the import went ahead"))
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        args = argparse.Namespace(**{"config": str(self.path), "json": None, "from_path": None, "name": None, **options})
        return account_commands.run_import(args), err.getvalue()

    def spent_pair(self) -> tuple[dict[str, Any], Any]:
        ours = self.oauth_account("a", expires_in=60)
        service = self.start()
        self.clock.advance(0)
        update_account(self.path, "a", {"priority": 4})
        self.successResultOf(service.stopService())
        return ours, self.account("a").config

    def test_spent_token_refused(self) -> None:
        """Importing a spent token, from --json or from a file, exits 1 naming the account that spent it, and
        leaves the config (live pair, the user's edits) as it was; no token is printed."""
        ours, live = self.spent_pair()
        before = self.path.read_text()
        creds = json.dumps({"claudeAiOauth": {"accessToken": ours["accessToken"], "refreshToken": ours["refreshToken"]}})
        source = self.dir / "old-credentials.json"
        source.write_text(creds)
        for options in ({"json": creds}, {"from_path": str(source)}):
            code, output = self.run_import(**options)
            self.assertEqual(code, 1, options)
            self.assertIn("already used for a", output)
            self.assertNotIn(ours["refreshToken"], output)
            self.assertEqual(self.path.read_text(), before)
        self.assertEqual(self.file_account("a")["refreshToken"], live.refresh_token)  # type: ignore[index]
        self.assertEqual(self.file_account("a")["priority"], 4)  # type: ignore[index]

    def test_console_import_refuses_a_spent_token(self) -> None:
        """The console's add-account import (ConfigAccounts.import_json) refuses a spent token the same way,
        under any account name, and leaves the config as it was; a fresh token is imported."""
        ours, live = self.spent_pair()
        before = self.path.read_text()
        accounts = ConfigAccounts(self.path, lambda: ([], []))
        creds = json.dumps({"claudeAiOauth": {"accessToken": ours["accessToken"], "refreshToken": ours["refreshToken"]}})
        for name in ("a", "someone-new"):
            with self.assertRaises(InvalidAccount) as raised:
                accounts.import_json(creds, name)
            self.assertIn("already used for a", str(raised.exception))
            self.assertNotIn(ours["refreshToken"], str(raised.exception))
            self.assertEqual(self.path.read_text(), before)
        fresh = json.dumps({"claudeAiOauth": {"accessToken": "sk-ant-oat01-fresh", "refreshToken": "sk-ant-ort01-fresh"}})
        self.assertEqual(accounts.import_json(fresh, "b"), "b")
        self.assertEqual(self.file_account("b")["refreshToken"], "sk-ant-ort01-fresh")  # type: ignore[index]

    def test_spent_token_import_restores_the_recovered_pair(self) -> None:
        """When the config still holds the spent pair and a recovery file the live one, the refused import
        writes the live pair into the config (keeping other edits) and removes the recovery file."""
        ours = self.oauth_account("a", expires_in=60)
        self.disk.failing["config.json"] = errno.ENOSPC
        service = self.start()
        self.clock.advance(0)
        live = self.account("a").config
        self.successResultOf(service.stopService())
        self.disk.failing = {}
        update_account(self.path, "a", {"priority": 4})
        code, output = self.run_import(json=json.dumps({"accessToken": ours["accessToken"], "refreshToken": ours["refreshToken"]}))
        self.assertEqual(code, 1)
        self.assertIn("written back from its recovery file", output)
        saved = self.file_account("a")
        assert saved is not None
        self.assertEqual((saved["refreshToken"], saved["priority"]), (live.refresh_token, 4))
        self.assertFalse(self.recovery().exists())


class LedgerTests(SynchronousTestCase):
    def test_bound_per_account(self) -> None:
        """The ledger keeps the newest 16 digests per account, oldest first; older ones are forgotten, other
        accounts are untouched, and re-adding a digest moves it to the end."""
        spent = SpentTokens()
        tokens = [f"sk-ant-ort01-t{i}" for i in range(20)]
        for token in tokens:
            spent.add("a", token)
        spent.add("b", "sk-ant-ort01-b")
        self.assertEqual(spent.digests("a"), [token_digest(t) for t in tokens[4:]])
        self.assertFalse(spent.is_spent(tokens[3]))
        self.assertTrue(spent.is_spent(tokens[4]))
        self.assertEqual(spent.owner(tokens[19]), "a")
        self.assertEqual(spent.owner("sk-ant-ort01-b"), "b")
        spent.add("a", tokens[4])
        self.assertEqual(spent.digests("a")[-1], token_digest(tokens[4]))
        self.assertEqual(len(spent.digests("a")), 16)

    def test_merge_into_state(self) -> None:
        """Merging into a state object keeps digests already there (and other accounts'), adds ours, keeps the
        bound, and writes no token text."""
        spent = SpentTokens(limit=3)
        for token in ("t1", "t2"):
            spent.add("a", token)
        state: dict[str, Any] = {"accounts": {}, SPENT_KEY: {"a": [token_digest("t0")], "z": [token_digest("z")]}}
        spent.merge_into(state)
        self.assertEqual(state[SPENT_KEY]["a"], [token_digest(t) for t in ("t0", "t1", "t2")])
        self.assertEqual(state[SPENT_KEY]["z"], [token_digest("z")])
        spent.add("a", "t3")
        spent.merge_into(state)
        self.assertEqual(state[SPENT_KEY]["a"], [token_digest(t) for t in ("t1", "t2", "t3")])
        self.assertNotIn("t3", json.dumps(state).replace(token_digest("t3"), ""))

    def test_from_state_ignores_malformed(self) -> None:
        """A state file with a malformed ledger yields what can be used, never an error."""
        for state in (None, {}, {SPENT_KEY: []}, {SPENT_KEY: {"a": "x"}}, {SPENT_KEY: {"a": [1, "short", token_digest("t")]}}):
            spent = SpentTokens.from_state(state)  # type: ignore[arg-type]
            self.assertEqual(spent.is_spent("t"), state == {SPENT_KEY: {"a": [1, "short", token_digest("t")]}})

    def test_recovery_file_names(self) -> None:
        """Any account name gives a recovery file directly beside the config, and never another directory."""
        config = Path("/x/config.json")
        for name in ("a", "alice@example.com", "../../etc/passwd", "a/b", "x" * 400, "é ü"):
            path = tokenstate.recovery_path(config, name)
            self.assertEqual(path.parent, config.parent, name)
            self.assertTrue(path.name.startswith("recovery-") and path.name.endswith(".json"), name)
            self.assertLess(len(path.name.encode()), 255)


class LedgerFileTests(TokenStateHarness):
    def test_rotations_bounded_in_state_file(self) -> None:
        """Twenty rotations leave the digests of the newest 16 spent tokens in state.json, oldest first, and no
        token text; a copy 16 rotations old is still refused by a reload."""
        ours = self.oauth_account("a", expires_in=8 * HOUR)
        service = self.start()
        spent = [ours["refreshToken"]]
        for _ in range(20):
            self.rotate("a")
            spent.append(self.account("a").config.refresh_token)  # type: ignore[arg-type]
        live = spent.pop()
        text = (self.dir / "state.json").read_text()
        self.assertEqual(json.loads(text)[SPENT_KEY]["a"], [token_digest(t) for t in spent[-16:]])
        for token in spent:
            self.assertNotIn(token, text)
        update_account(self.path, "a", {"refreshToken": spent[-16]})
        service.reload()
        self.assertEqual(self.account("a").config.refresh_token, live)
        self.assertEqual(self.file_account("a")["refreshToken"], live)  # type: ignore[index]


class TempFileTests(TokenStateHarness):
    def test_start_removes_orphaned_temps(self) -> None:
        """At start the service removes, under the config directory's lock, the temp files killed writes of
        config.json and state.json left (young or old), and never a recovery file or a recovery file's temp."""
        self.oauth_account("a", expires_in=8 * HOUR)
        pair = json.dumps({"refreshToken": "sk-ant-ort01-orphan"})
        orphans = [self.dir / ".config.json.0123456789ab.tmp", self.dir / ".state.json.ba9876543210.tmp"]
        kept = [self.dir / ".recovery-a.json.0123456789ab.tmp", self.dir / ".config.json.tmp"]
        for path in orphans + kept:
            path.write_text(pair)
        old = os.stat(orphans[0]).st_mtime - 3600
        os.utime(orphans[0], (old, old))
        lock_held: list[bool] = []
        real = store.remove_stale_temps

        def watched(path: Path, *args: Any, **kwargs: Any) -> Any:
            lock_held.append(any(key[2] == os.path.realpath(self.dir / "nextclaude.lock") for key in store._held))
            return real(path, *args, **kwargs)

        self.patch(store, "remove_stale_temps", watched)
        self.start()
        for path in orphans:
            self.assertFalse(path.exists(), path)
        for path in kept:
            self.assertTrue(path.exists(), path)
        self.assertEqual(lock_held, [True, True])
        self.assertIn("temporary file(s) an interrupted write", self.log_text())
