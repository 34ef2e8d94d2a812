"""
Account switches without editing JSON: the C{enabled} field, `nextclaude
disable`/`enable`/`priority` (one locked config operation each, picked up
by the running proxy), routing that treats a disabled account as not
serviceable, and the console's C{d} and C{p} keys.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude.config import ConfigError, load_config, set_enabled, set_priority
from nextclaude.control import connect
from nextclaude import paths
from nextclaude.pool import Status
from tests.support import FakeUpstream, Seen, auth, client, json_reply, listen, spawn_nextclaude, start_proxy, write_config
from tests.test_console import BOB, ConsoleHarness
from tests.test_router import X, Y, Reply, RouterCase, spent, turn

BODY = json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()


def ok(seen: Seen) -> bytes:
    return json_reply(
        seen.request,
        200,
        {"id": "m", "type": "message", "content": [], "usage": {"input_tokens": 1, "output_tokens": 1}},
    )


class ConfigTests(SynchronousTestCase):
    def config_file(self, accounts: list[dict[str, Any]]) -> Path:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "config.json"
        path.write_text(json.dumps({"proxy": {"apiKey": "nc-0123456789abcdef"}, "accounts": accounts}))
        return path

    def test_enabled_defaults_to_true_and_is_checked(self) -> None:
        """
        An account without C{enabled} is enabled; C{enabled: false} is
        read; a non-boolean is an error naming the field.
        """
        path = self.config_file(
            [
                {"name": "a", "type": "oauth", "accessToken": "sk-ant-oat01-a"},
                {"name": "b", "type": "oauth", "accessToken": "sk-ant-oat01-b", "enabled": False},
            ]
        )
        config = load_config(path)
        self.assertEqual([a.enabled for a in config.accounts], [True, False])
        path.write_text(
            json.dumps({"accounts": [{"name": "a", "type": "oauth", "accessToken": "t", "enabled": "no"}]})
        )
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertIn("accounts[0].enabled must be true or false", str(error))

    def test_set_enabled_and_priority_are_one_operation_each(self) -> None:
        """
        set_enabled and set_priority change only that field of that account
        in the file as it is on disk (a field edited by hand meanwhile is
        kept, another account's broken field does not stop it); an unknown
        name changes nothing and says so.
        """
        path = self.config_file(
            [
                {"name": "a", "type": "oauth", "accessToken": "sk-ant-oat01-a", "email": "a@example.com"},
                {"name": "b", "type": "oauth", "accessToken": "sk-ant-oat01-b", "expiresAt": "broken"},
            ]
        )
        self.assertTrue(set_enabled(path, "a", False))
        data = json.loads(path.read_text())
        data["accounts"][0]["tier"] = "Max"  # a hand edit in between
        path.write_text(json.dumps(data))
        self.assertTrue(set_priority(path, "a", 4))
        account = json.loads(path.read_text())["accounts"][0]
        self.assertEqual(
            account,
            {
                "name": "a",
                "type": "oauth",
                "accessToken": "sk-ant-oat01-a",
                "email": "a@example.com",
                "enabled": False,
                "tier": "Max",
                "priority": 4,
            },
        )
        self.assertFalse(set_enabled(path, "nobody", True))
        self.assertRaises(ValueError, set_priority, path, "a", "4")


class DisabledRoutingTests(RouterCase):
    def disable(self, name: str) -> None:
        account = self.account(name)
        account.config = replace(account.config, enabled=False)

    def test_disabled_account_serves_nothing(self) -> None:
        """
        A disabled account shows status disabled, takes no new session,
        and a session on it moves on its next request.
        """
        self.build("a", "b")
        self.assertEqual(self.where(turn(X)), ("a", "placed"))
        self.disable("a")
        self.assertEqual(self.status("a"), Status.DISABLED.value)
        self.assertEqual(self.where(turn(Y))[0], "b")
        self.assertEqual(self.where(turn(X))[0], "b")

    def test_disabled_account_is_never_probed(self) -> None:
        """
        With every enabled account out of quota, the probe sweep skips the
        disabled one, and the client's 429 names it as disabled with the
        command that puts it back (not Claude Code's usage-limit notice).
        """
        self.build("a", "b")
        self.disable("b")
        self.learn("a", spent())
        outcome = self.serve(turn(X), {"a": [Reply(status=429, headers=spent())]})
        tried = [d.account.name for d in outcome.decisions if d.account is not None]
        self.assertNotIn("b", tried)
        final = outcome.decisions[-1]
        self.assertIsNone(final.account)
        self.assertIn("Disabled: b (`nextclaude enable NAME`", final.message)
        self.assertIsNone(final.claim)

    def test_everything_disabled_is_a_429_naming_them(self) -> None:
        """
        With every account disabled the client gets the synthetic 429
        naming them, not the dead-credentials 401; as no account comes back
        by itself, the message does not tell it to retry in a while.
        """
        self.build("a", "b")
        self.disable("a")
        self.disable("b")
        outcome = self.serve(turn(X))
        final = outcome.decisions[-1]
        self.assertEqual((final.account, final.status), (None, 429))
        self.assertIn("Disabled: a, b", final.message)
        self.assertTrue(final.message.startswith("NextClaude: no account can serve this request. "), final.message)
        self.assertNotIn("retry in", final.message)


class RunningProxyTests(TestCase):
    async def run_command(self, config: Path, *args: str) -> tuple[int, str, str]:
        watcher = spawn_nextclaude(self, "--config", str(config), *args)
        reason = await watcher.ended
        return reason.exitCode, watcher.out.decode(), watcher.err.decode()

    async def test_disable_enable_round_trip(self) -> None:
        """
        `nextclaude disable alice` against a running proxy: the proxy shows
        alice disabled at once and serves on bob; `nextclaude enable alice`
        brings her back; `priority` changes the order the proxy shows; an
        unknown name exits 1 and names the accounts.
        """
        upstream = FakeUpstream(ok)
        config = write_config(self, listen(self, upstream))
        service, url = start_proxy(self, config)
        http = client(self)

        code, out, err = await self.run_command(config, "disable", "alice")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("alice is disabled", out)
        self.assertIn("The running proxy has it now.", out)
        status = service.status()
        self.assertEqual([a["status"] for a in status["accounts"]], ["disabled", "active"])
        response = await http.post(url + "/v1/messages", data=BODY, headers=auth())
        await response.content()
        self.assertEqual(service.pool.get("bob").usage.requests, 1)
        self.assertEqual(service.pool.get("alice").usage.requests, 0)

        code, out, err = await self.run_command(config, "enable", "alice")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(service.status()["accounts"][0]["status"], "active")

        code, out, err = await self.run_command(config, "priority", "bob", "-1")
        self.assertEqual(code, 0, err)
        self.assertEqual([a["priority"] for a in service.status()["accounts"]], [0, -1])

        code, out, err = await self.run_command(config, "disable", "carol")
        self.assertEqual(code, 1)
        self.assertIn("no account named 'carol'", err)
        self.assertIn("alice, bob", err)

    async def test_control_channel_set_account(self) -> None:
        """
        The console's calls (AMP SetAccount) disable and re-prioritise an
        account in the file and the running proxy; an unknown name is
        UnknownAccount.
        """
        from nextclaude.control import UnknownAccount

        config = write_config(self, listen(self, FakeUpstream(ok)))
        service, url = start_proxy(self, config)
        control = await connect(reactor, paths.socket_path(config))
        self.addCleanup(control.close)
        await control.set_enabled("bob", False)
        self.assertEqual(service.status()["accounts"][1]["status"], "disabled")
        self.assertIs(json.loads(config.read_text())["accounts"][1]["enabled"], False)
        await control.set_priority("bob", 7)
        self.assertEqual(service.pool.get("bob").priority, 7)
        failure = await self.assertFailure(control.set_enabled("nobody", True), UnknownAccount)
        self.assertIn("nobody", str(failure))


class ConsoleKeyTests(ConsoleHarness):
    def make(self) -> None:
        self.make_app()
        client = self.client
        client.set_enabled = lambda name, enabled: client._record("set_enabled", name, enabled)  # type: ignore[attr-defined]
        client.set_priority = lambda name, priority: client._record("set_priority", name, priority)  # type: ignore[attr-defined]

    def test_d_disables_then_enables(self) -> None:
        """
        d opens the account menu; Enter on an active account disables it;
        on an account the snapshot shows disabled, enables it.
        """
        self.make()
        self.press("d")
        self.assertIn("Disable or enable an account", self.text())
        self.press("j", "enter")
        self.assertEqual(self.client.calls[-1], ("set_enabled", BOB, False))
        for account in self.client.state["accounts"]:
            if account["name"] == BOB:
                account["status"] = "disabled"
        self.app.fetch()
        self.press("d", "j", "enter")
        self.assertEqual(self.client.calls[-1], ("set_enabled", BOB, True))

    def test_p_sets_a_priority(self) -> None:
        """
        p opens the account menu, then a menu of priorities focused on the
        current one; choosing 2 sets it; Esc changes nothing.
        """
        self.make()
        self.press("p", "j", "enter")
        self.assertIn(f"Priority of {BOB}", self.text())
        self.press("j", "j", "enter")
        self.assertEqual(self.client.calls[-1], ("set_priority", BOB, 2))
        calls = len(self.client.calls)
        self.press("p", "enter", "esc")
        self.assertEqual(len(self.client.calls), calls)
