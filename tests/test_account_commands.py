"""
`nextclaude login` and `nextclaude import` as a user runs them: real child
processes against a local fake OAuth server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fake_oauth import FakeOAuthServer, serve
from tests.support import spawn_nextclaude, write_config
from tests.test_everyday import spawn_in_pty


class AccountCommandTests(TestCase):
    def setUp(self) -> None:
        self.fake = FakeOAuthServer()
        port, base = serve(self.fake, reactor)
        self.addCleanup(port.stopListening)
        settings = self.fake.settings(base)
        self.config = write_config(
            self,
            9,
            accounts=[],
            oauth={
                "clientId": settings.client_id,
                "authorizeUrl": settings.authorize_url,
                "tokenUrl": settings.token_url,
                "profileUrl": settings.profile_url,
                "usageUrl": settings.usage_url,
            },
        )

    def accounts(self) -> list[dict[str, Any]]:
        return json.loads(self.config.read_text())["accounts"]

    async def nextclaude(self, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
        watcher = spawn_nextclaude(self, "--config", str(self.config), *args)
        if stdin is not None:
            watcher.transport.write(stdin)
            watcher.transport.closeStdin()
        reason = await watcher.ended
        return reason.exitCode, (watcher.out + watcher.err).decode()

    async def test_import_json_names_by_email_and_updates_on_reimport(self) -> None:
        """
        `import --json` adds the account named by its profile's e-mail, with
        tier and uuid; importing again updates the same account (matched by
        uuid) instead of adding a second one; no token is printed.
        """
        access, refresh, expires = self.fake.issue()
        creds = json.dumps({"claudeAiOauth": {"accessToken": access, "refreshToken": refresh, "expiresAt": expires}})
        code, output = await self.nextclaude("import", "--json", creds)
        self.assertEqual(code, 0, output)
        self.assertIn("Added alice@example.com", output)
        self.assertNotIn(access, output)
        [account] = self.accounts()
        self.assertEqual((account["name"], account["accessToken"]), ("alice@example.com", access))
        self.assertEqual(account["accountUuid"], "uuid-alice@example.com")
        access2, refresh2, expires2 = self.fake.issue()
        creds = json.dumps({"accessToken": access2, "refreshToken": refresh2, "expiresAt": expires2})
        code, output = await self.nextclaude("import", "--json", creds)
        self.assertEqual(code, 0, output)
        self.assertIn("Updated alice@example.com", output)
        [account] = self.accounts()
        self.assertEqual(account["accessToken"], access2)

    async def test_import_from_file_records_source_and_works_offline(self) -> None:
        """
        `import --from FILE` records the file as importFrom; when the
        profile cannot be read (the token is unknown to the server), it
        warns and still adds the account, under --name.
        """
        source = Path(self.mktemp()).absolute()
        source.write_text(
            json.dumps(
                {
                    "claudeAiOauth": {
                        "accessToken": "sk-ant-oat01-unknown-to-server",
                        "refreshToken": "sk-ant-ort01-x",
                        "expiresAt": 4102444800000,
                        "subscriptionType": "max",
                    }
                }
            )
        )
        code, output = await self.nextclaude("import", "--from", str(source), "--name", "laptop")
        self.assertEqual(code, 0, output)
        self.assertIn("warning", output)
        [account] = self.accounts()
        self.assertEqual((account["name"], account["importFrom"], account["tier"]), ("laptop", str(source), "Max"))

    async def test_import_of_a_broken_file_names_it(self) -> None:
        """
        A credential file that is not what Claude Code writes gives exit 1
        and an error naming the file; nothing is added.
        """
        source = Path(self.mktemp()).absolute()
        source.write_text("{not json")
        code, output = await self.nextclaude("import", "--from", str(source))
        self.assertEqual(code, 1)
        self.assertIn(str(source), output)
        self.assertEqual(self.accounts(), [])

    async def test_login_manual_paste(self) -> None:
        """
        `login --manual` prints the authorize URL, takes the pasted
        code#state, exchanges it and adds the account named by e-mail.
        """
        watcher = spawn_nextclaude(self, "--config", str(self.config), "login", "--manual", "--no-browser")
        url = (await watcher.line_matching(rb"(http://127\.0\.0\.1:\d+/oauth/authorize\?\S+)")).group(1).decode()
        watcher.transport.write(self.fake.approve_manual(url).encode() + b"\n")
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 0, watcher.output)
        [account] = self.accounts()
        self.assertEqual(account["name"], "alice@example.com")
        self.assertTrue(account["accessToken"].startswith("sk-ant-oat01-fake"))

    async def test_login_via_loopback_callback(self) -> None:
        """
        The default login (run on a terminal) listens on a loopback port:
        the browser's redirect there completes it and the browser is sent
        on to the success page.
        """
        # On a terminal of its own: without one, login refuses at once.
        watcher = spawn_in_pty(self, "--config", str(self.config), "login", "--no-browser")
        url = (await watcher.line_matching(rb"(http://127\.0\.0\.1:\d+/oauth/authorize\?\S+)")).group(1).decode()
        callback = self.fake.approve(url).replace("localhost", "127.0.0.1")
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await Agent(reactor, pool=pool).request(b"GET", callback.encode())
        self.assertEqual(response.code, 302)
        self.assertIn(b"success", response.headers.getRawHeaders(b"location")[0])
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 0, watcher.output)
        self.assertEqual([a["name"] for a in self.accounts()], ["alice@example.com"])

    async def test_login_api_key_shape_checked(self) -> None:
        """
        `login --api --key-stdin` refuses something that is not an
        Anthropic key and adds one that is, without echoing it.
        """
        code, output = await self.nextclaude("login", "--api", "--key-stdin", stdin=b"hello\n")
        self.assertEqual(code, 1)
        self.assertIn("sk-ant-", output)
        self.assertEqual(self.accounts(), [])
        key = "sk-ant-api03-" + "k" * 40
        code, output = await self.nextclaude(
            "login", "--api", "--key-stdin", "--name", "work-key", stdin=key.encode() + b"\n"
        )
        self.assertEqual(code, 0, output)
        self.assertNotIn(key, output)
        [account] = self.accounts()
        self.assertEqual((account["name"], account["type"], account["apiKey"]), ("work-key", "apikey", key))
