"""
Everyday use (issue 15, items 5, 6, 9, 10, 11, 12): every command with a
broken or missing config, prompts without a terminal and interrupted with
Ctrl-C, account type changes, and the wording of a few messages.  Each
user error is one line naming the file or the flag, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude.cli import main
from tests.fake_oauth import FakeOAuthServer, serve
from tests.support import REPO_ROOT, ProcessWatcher, spawn_nextclaude, write_config

# Every command that reads the config file, with arguments that get it
# as far as reading it.
READING_COMMANDS: list[list[str]] = [
    ["accounts"],
    ["env"],
    ["run", "--no-check"],
    ["run"],
    ["remove", "alice", "--yes"],
    ["disable", "alice"],
    ["enable", "alice"],
    ["priority", "alice", "3"],
    ["server", "--no-console"],
    ["login", "--api", "--key-stdin"],
    ["import", "--json", '{"accessToken": "sk-ant-oat01-x"}'],
]

# The commands that must never create a config: they say it is missing.
READ_ONLY_COMMANDS: list[list[str]] = [
    ["accounts"],
    ["env"],
    ["run"],
    ["run", "--no-check"],
    ["remove", "someone", "--yes"],
    ["status"],
    ["status", "--json"],
    ["stop"],
    ["console"],
]


class InProcess(SynchronousTestCase):
    def run_main(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.patch(sys, "stdin", io.StringIO(stdin))
        return main(list(argv)), out.getvalue(), err.getvalue()

    def assert_one_line(self, err: str, *expected: str) -> None:
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("nextclaude: "), err)
        for text in expected:
            self.assertIn(text, err)


class BrokenConfigTests(InProcess):
    def test_every_command_names_the_file_and_field(self) -> None:
        """
        A config whose proxy.port is a string: every command that reads the
        config, the editing ones (remove, disable, enable, priority)
        included, exits 1 with one line naming the file and the field, and
        the file is left as it was.
        """
        path = write_config(self, 9, proxy={"port": "http"})
        before = path.read_bytes()
        for argv in READING_COMMANDS:
            code, out, err = self.run_main("--config", str(path), *argv)
            self.assertEqual(code, 1, (argv, err))
            self.assert_one_line(err, str(path), "proxy.port")
            self.assertEqual(path.read_bytes(), before)

    def test_every_command_names_a_file_that_is_not_json(self) -> None:
        """
        A config that is not JSON at all: every command that reads it,
        remove included, exits 1 with one line naming the file and where
        the JSON breaks.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "config.json"
        path.write_bytes(b'{"accounts": [}')
        for argv in READING_COMMANDS:
            code, out, err = self.run_main("--config", str(path), *argv)
            self.assertEqual(code, 1, (argv, err))
            self.assert_one_line(err, str(path), "invalid JSON at line 1")
        self.assertEqual(path.read_bytes(), b'{"accounts": [}')

    def test_remove_works_on_a_broken_account(self) -> None:
        """
        `remove NAME` removes an account that a hand edit broke (no
        accessToken, a bad expiresAt) without validating the rest, and
        leaves the other accounts exactly as they were.
        """
        path = write_config(
            self,
            9,
            accounts=[
                {"name": "good", "type": "oauth", "accessToken": "sk-ant-oat01-good"},
                {"name": "broken", "type": "oauth", "expiresAt": "soon"},
            ],
        )
        code, out, err = self.run_main("--config", str(path), "remove", "broken", "--yes")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Removed broken", out)
        accounts = json.loads(path.read_text())["accounts"]
        self.assertEqual(accounts, [{"name": "good", "type": "oauth", "accessToken": "sk-ant-oat01-good"}])

    def test_editing_commands_refuse_what_server_refuses(self) -> None:
        """
        A bad switchThreshold, console.theme or proxy, or another account
        broken by a hand edit: `disable`, `enable`, `priority` and `remove`
        of a good account exit 1 with the very line `server` gives (a
        broken account named by its place in the file) and leave the file
        as it was, instead of saying the change takes effect when a proxy
        starts.
        """
        good = {"name": "alice", "type": "oauth", "accessToken": "sk-ant-oat01-alice"}
        broken = {"name": "broken", "type": "oauth", "expiresAt": "soon"}
        for extra, field in (
            ({"switchThreshold": "x"}, "switchThreshold"),
            ({"console": {"theme": "neon"}}, "console.theme"),
            ({"proxy": "x"}, "proxy must be an object"),
            ({"accounts": [good, broken]}, "accounts[1].expiresAt"),
        ):
            path = write_config(self, 9, accounts=[good])
            path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
            before = path.read_bytes()
            _, _, refused = self.run_main("--config", str(path), "server", "--no-console")
            self.assert_one_line(refused, str(path), field)
            for argv in (["disable", "alice"], ["enable", "alice"], ["priority", "alice", "3"], ["remove", "alice", "--yes"]):
                code, out, err = self.run_main("--config", str(path), *argv)
                self.assertEqual((code, out, err), (1, "", refused), argv)
                self.assertEqual(path.read_bytes(), before, argv)

    def test_editing_commands_name_a_broken_accounts_array(self) -> None:
        """
        When "accounts" itself is broken (not an array, or an entry that is
        not an object), `disable`, `enable`, `priority` and `remove` say so
        in one line, instead of "no account named ... (accounts: none)".
        """
        for accounts, problem in (
            (["alice"], "accounts[0] must be an object, not 'alice'"),
            ({"name": "alice"}, "accounts must be an array of account objects, not an object"),
        ):
            path = write_config(self, 9, accounts=accounts)
            before = path.read_bytes()
            for argv in (["disable", "alice"], ["enable", "alice"], ["priority", "alice", "3"], ["remove", "alice", "--yes"]):
                code, out, err = self.run_main("--config", str(path), *argv)
                self.assertEqual(code, 1, argv)
                self.assert_one_line(err, f"{path}: {problem}")
                self.assertEqual(path.read_bytes(), before, argv)

    def test_remove_unknown_on_a_broken_file_lists_the_names(self) -> None:
        """
        `remove` of a name that is not there, in a file whose accounts do
        not validate, names the accounts the file has.
        """
        path = write_config(self, 9, accounts=[{"name": "broken", "type": "nonsense"}])
        code, _, err = self.run_main("--config", str(path), "remove", "other", "--yes")
        self.assertEqual(code, 1)
        self.assert_one_line(err, "no account named 'other'", "accounts: broken")


class ReadOnlyTests(InProcess):
    def test_a_mistyped_config_is_never_created(self) -> None:
        """
        Every read-only command given --config in a directory that does not
        exist exits 1 with one line saying the file does not exist and how
        one is made; no directory, file or key is created.
        """
        top = Path(self.mktemp()).absolute()
        path = top / "no" / "such" / "c.json"
        for argv in READ_ONLY_COMMANDS:
            code, out, err = self.run_main("--config", str(path), *argv)
            self.assertEqual(code, 1, (argv, err))
            self.assert_one_line(err, str(path), "does not exist", "nextclaude login")
            self.assertFalse(top.exists(), argv)

    def test_service_print_does_not_create_one_either(self) -> None:
        """
        `service print` with a missing config prints the unit, warns in one
        line, and creates nothing.
        """
        top = Path(self.mktemp()).absolute()
        path = top / "c.json"
        code, out, err = self.run_main("--config", str(path), "service", "print", "--kind", "systemd")
        self.assertEqual(code, 0)
        self.assertIn("ExecStart=", out)
        self.assert_one_line(err, "warning", str(path), "does not exist")
        self.assertFalse(top.exists())

    def test_env_does_not_write_a_key_into_a_file_without_one(self) -> None:
        """
        `env` on a file without proxy.apiKey says the proxy generates it on
        its first start, and leaves the file unchanged.
        """
        path = write_config(self, 9, proxy={"apiKey": None})
        before = path.read_bytes()
        code, out, err = self.run_main("--config", str(path), "env")
        self.assertEqual((code, out), (1, ""))
        self.assert_one_line(err, str(path), "proxy.apiKey", "nextclaude server")
        self.assertEqual(path.read_bytes(), before)

    def test_failed_import_creates_no_config(self) -> None:
        """
        `import` whose credentials cannot be read exits 1 and leaves no
        config behind (only a successful login or import creates one).
        """
        top = Path(self.mktemp()).absolute()
        path = top / "c.json"
        code, _, err = self.run_main("--config", str(path), "import", "--from", str(top / "missing.json"))
        self.assertEqual(code, 1)
        self.assertFalse(top.exists())


class UsageTests(InProcess):
    def test_bare_command_prints_help(self) -> None:
        """
        `nextclaude` without a command prints the help (every command
        listed) on stdout and exits 0, instead of an argparse error.
        """
        code, out, err = self.run_main()
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("usage: nextclaude"), out)
        for command in ("server", "login", "import", "stop", "service", "status"):
            self.assertIn(command, out)

    def test_extra_words_show_the_subcommands_usage(self) -> None:
        """
        `remove a b` is a usage error (status 2) shown with `remove`'s own
        usage, not the top-level one; an unknown option before the command
        still gets the top-level usage.
        """
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as raised:
            main(["remove", "a", "b"])
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("usage: nextclaude remove", err.getvalue())
        self.assertIn("unrecognized arguments: b", err.getvalue())
        err.truncate(0)
        err.seek(0)
        with self.assertRaises(SystemExit) as raised:
            main(["--bogus", "accounts"])
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("usage: nextclaude [-h]", err.getvalue())

    def test_import_from_a_missing_file_does_not_suggest_from(self) -> None:
        """
        `import --from /missing` says the file does not exist, without
        suggesting the --from that was given.
        """
        path = write_config(self, 9)
        missing = Path(self.mktemp()).absolute() / "credentials.json"
        code, _, err = self.run_main("--config", str(path), "import", "--from", str(missing))
        self.assertEqual(code, 1)
        self.assert_one_line(err, str(missing), "does not exist")
        self.assertNotIn("--from", err)

    def test_log_to_that_cannot_be_created(self) -> None:
        """
        `server --log-to` under a regular file (and a logDir in the file
        that cannot be created) exits 1 with one line naming the flag or
        the file and field, and the system's reason.
        """
        path = write_config(self, 9)
        blocker = Path(self.mktemp()).absolute()
        blocker.write_text("a file, not a directory")
        code, _, err = self.run_main("--config", str(path), "server", "--no-console", "--log-to", str(blocker / "logs"))
        self.assertEqual(code, 1)
        self.assert_one_line(err, "--log-to", str(blocker / "logs"), "Not a directory")
        data = json.loads(path.read_text())
        data["logDir"] = str(blocker / "logs")
        path.write_text(json.dumps(data))
        code, _, err = self.run_main("--config", str(path), "server", "--no-console")
        self.assertEqual(code, 1)
        self.assert_one_line(err, f"{path}: logDir", "Not a directory")

    def test_ctrl_c_in_a_command_is_one_line_and_130(self) -> None:
        """
        A KeyboardInterrupt inside a command (Ctrl-C at a prompt) ends it
        with one line and status 130.
        """
        from nextclaude import cli

        def interrupted(args: Any) -> int:
            raise KeyboardInterrupt()

        self.patch(cli, "_accounts", interrupted)
        code, _, err = self.run_main("accounts")
        self.assertEqual(code, 130)
        self.assert_one_line(err, "interrupted")


class NoBrowserWordingTests(SynchronousTestCase):
    def test_no_browser_does_not_claim_a_failure(self) -> None:
        """
        With --no-browser (open_browser None) the login asks the user to
        open the URL and never says that no browser could be opened.
        """
        from nextclaude.config import OAuthSettings
        from nextclaude.oauth import OAuthClient, login

        clock = _ListeningClock()
        announced: list[str] = []
        attempt = Deferred.fromCoroutine(
            login(
                clock,
                OAuthClient(clock, OAuthSettings()),
                OAuthSettings(),
                manual=False,
                announce=announced.append,
                lines=lambda: Deferred(),
                open_browser=None,
            )
        )
        text = " ".join(announced)
        self.assertIn("Open this URL", text)
        self.assertNotIn("No browser could be opened", text)
        clock.advance(10_000)
        self.failureResultOf(attempt)


class _FakePort:
    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 40000)

    def stopListening(self) -> None:
        return None


class _ListeningClock(Clock):
    """
    A task.Clock that also "listens": the login's callback server binds
    nothing in this test.
    """

    def listenTCP(self, *args: Any, **kwargs: Any) -> _FakePort:
        return _FakePort()


# The read(2) system call's number, by machine: /proc/PID/syscall names the
# call a blocked process sits in.
_READ_SYSCALL = {"x86_64": 0, "aarch64": 63}


async def interrupt_when_reading(watcher: ProcessWatcher) -> None:
    """
    Send SIGINT once the process sits in read(2) on its terminal.

    A prompt is written just before the read starts: a SIGINT that lands
    in between is only noted by Python, and the read that follows blocks
    until input comes (a real race, though no typist hits it).  Where
    /proc cannot tell, the signal goes at once.
    """
    pid = watcher.transport.pid
    number = _READ_SYSCALL.get(os.uname().machine)
    while number is not None and pid is not None and not watcher.ended.called:
        try:
            call = Path(f"/proc/{pid}/syscall").read_text().split()
        except OSError:
            break
        if call and call[0] == str(number):
            break
        await deferLater(reactor, 0.02)
    watcher.transport.signalProcess("INT")


def spawn_in_pty(test: Any, *args: str, extra_env: dict[str, str] | None = None) -> ProcessWatcher:
    """
    Run `python -m nextclaude ARGS` on a pseudo-terminal of its own (its
    stdin is a terminal), as a user at a shell would.
    """
    cwd = Path(test.mktemp())
    cwd.mkdir()
    watcher = ProcessWatcher()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", **(extra_env or {}))
    argv = [sys.executable, "-m", "nextclaude", *args]
    process = reactor.spawnProcess(watcher, argv[0], argv, env=env, path=str(cwd), usePTY=True)

    def stop() -> Any:
        if watcher.ended.called:
            return None
        process.signalProcess("KILL")
        return watcher.ended

    test.addCleanup(stop)
    return watcher


class PromptTests(TestCase):
    def setUp(self) -> None:
        self.fake = FakeOAuthServer()
        port, base = serve(self.fake, reactor)
        self.addCleanup(port.stopListening)
        settings = self.fake.settings(base)
        self.config = write_config(
            self,
            9,
            accounts=[
                {"name": "work", "type": "apikey", "apiKey": "sk-ant-api03-" + "w" * 40},
                {"name": "sub", "type": "oauth", "accessToken": "sk-ant-oat01-sub"},
            ],
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

    async def nextclaude(self, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        watcher = spawn_nextclaude(self, "--config", str(self.config), *args)
        watcher.transport.write(stdin)
        watcher.transport.closeStdin()
        reason = await watcher.ended
        return reason.exitCode, watcher.out.decode(), watcher.err.decode()

    async def test_prompts_without_a_terminal_fail_at_once(self) -> None:
        """
        Without a terminal on stdin, `login --api` names --key-stdin and
        `login` names --manual, each in one line, status 1, with no getpass
        warning and nothing written; `login --manual` whose input ends
        before a code ends at once too.
        """
        before = self.config.read_bytes()
        code, out, err = await self.nextclaude("login", "--api", stdin=b"sk-ant-api03-" + b"k" * 40 + b"\n")
        self.assertEqual(code, 1)
        self.assertIn("--key-stdin", err)
        self.assertNotIn("Warning", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        code, out, err = await self.nextclaude("login")
        self.assertEqual(code, 1)
        self.assertIn("--manual", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        code, out, err = await self.nextclaude("login", "--manual", "--no-browser")
        self.assertEqual(code, 1)
        self.assertIn("input ended before a code was pasted", err)
        self.assertEqual(self.config.read_bytes(), before)

    async def test_key_stdin(self) -> None:
        """
        `login --api --key-stdin` reads the key from the first line of
        stdin, adds the account without echoing the key; empty input adds
        nothing.
        """
        code, out, err = await self.nextclaude("login", "--api", "--key-stdin", "--name", "spare")
        self.assertEqual(code, 1)
        self.assertIn("no key on standard input", err)
        key = "sk-ant-api03-" + "s" * 40
        code, out, err = await self.nextclaude(
            "login", "--api", "--key-stdin", "--name", "spare", stdin=key.encode() + b"\n"
        )
        self.assertEqual(code, 0, err)
        self.assertNotIn(key, out + err)
        self.assertEqual(self.accounts()[-1], {"name": "spare", "type": "apikey", "apiKey": key})

    async def test_ctrl_c_at_the_remove_prompt(self) -> None:
        """
        Ctrl-C at `remove`'s question exits 130 with one line and no
        traceback; nothing is removed.
        """
        before = self.config.read_bytes()
        watcher = spawn_in_pty(self, "--config", str(self.config), "remove", "work")
        await watcher.line_matching(rb"\[y/N\]")
        await interrupt_when_reading(watcher)
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 130, watcher.output)
        self.assertNotIn("Traceback", watcher.output)
        self.assertIn("nextclaude: interrupted", watcher.output)
        self.assertEqual(self.config.read_bytes(), before)

    async def test_ctrl_c_at_the_key_prompt(self) -> None:
        """
        Ctrl-C at `login --api`'s hidden prompt exits 130 with one line and
        no traceback; nothing is added.
        """
        before = self.config.read_bytes()
        watcher = spawn_in_pty(self, "--config", str(self.config), "login", "--api")
        await watcher.line_matching(rb"input hidden")
        await interrupt_when_reading(watcher)
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 130, watcher.output)
        self.assertNotIn("Traceback", watcher.output)
        self.assertIn("nextclaude: interrupted", watcher.output)
        self.assertEqual(self.config.read_bytes(), before)

    async def test_ctrl_c_while_the_login_waits(self) -> None:
        """
        Ctrl-C while `login --no-browser` waits for the browser or a pasted
        code exits 130 with one line and no traceback, as at the other
        prompts; nothing is added.
        """
        before = self.config.read_bytes()
        watcher = spawn_in_pty(self, "--config", str(self.config), "login", "--no-browser")
        await watcher.line_matching(rb"paste the address")
        # The wait is the reactor's, not a read(2): its SIGINT handler is
        # in place from the start, so the signal can go at once.
        watcher.transport.signalProcess("INT")
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 130, watcher.output)
        self.assertNotIn("Traceback", watcher.output)
        self.assertIn("nextclaude: interrupted", watcher.output)
        self.assertEqual(self.config.read_bytes(), before)

    async def test_login_on_a_terminal_via_loopback_callback(self) -> None:
        """
        On a terminal, `login --no-browser` asks the user to open the URL
        (it does not claim a browser failed) and the loopback callback
        completes it.
        """
        from twisted.web.client import Agent, HTTPConnectionPool

        self.config.write_text(json.dumps({**json.loads(self.config.read_text()), "accounts": []}))
        watcher = spawn_in_pty(self, "--config", str(self.config), "login", "--no-browser")
        url = (await watcher.line_matching(rb"(http://127\.0\.0\.1:\d+/oauth/authorize\?\S+)")).group(1).decode()
        await watcher.line_matching(rb"paste the address")
        self.assertNotIn("No browser could be opened", watcher.output)
        callback = self.fake.approve(url).replace("localhost", "127.0.0.1")
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await Agent(reactor, pool=pool).request(b"GET", callback.encode())
        self.assertEqual(response.code, 302)
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 0, watcher.output)
        self.assertEqual([a["name"] for a in self.accounts()], ["alice@example.com"])

    async def test_type_change_refused_unless_replace(self) -> None:
        """
        `import --name work` where work is an API-key account is refused in
        one line (naming --replace) and changes nothing; with --replace the
        account becomes the imported subscription account, without its API
        key.  `login --api --name sub` on an OAuth account is refused too,
        before asking for a key.
        """
        before = self.config.read_bytes()
        access, refresh, expires = self.fake.issue()
        creds = json.dumps({"accessToken": access, "refreshToken": refresh, "expiresAt": expires})
        code, out, err = await self.nextclaude("import", "--json", creds, "--name", "work")
        self.assertEqual(code, 1, out + err)
        self.assertIn("--replace", err)
        self.assertIn("API-key account", err)
        self.assertEqual(self.config.read_bytes(), before)
        code, out, err = await self.nextclaude("login", "--api", "--key-stdin", "--name", "sub", stdin=b"sk-ant-api03-" + b"z" * 40)
        self.assertEqual(code, 1, out + err)
        self.assertIn("--replace", err)
        self.assertEqual(self.config.read_bytes(), before)
        code, out, err = await self.nextclaude("import", "--json", creds, "--name", "work", "--replace")
        self.assertEqual(code, 0, out + err)
        self.assertIn("Replaced work", out)
        work = self.accounts()[0]
        self.assertEqual((work["name"], work["type"], work["accessToken"]), ("work", "oauth", access))
        self.assertNotIn("apiKey", work)

    async def test_import_of_an_expired_token_without_refresh_warns(self) -> None:
        """
        Importing an access token that expired, with no refresh token,
        adds the account, warns that it cannot serve until a new login
        (naming the command), and `accounts` shows it needs one.
        """
        expired = int((time.time() - 3 * 86400) * 1000)
        creds = json.dumps({"accessToken": "sk-ant-oat01-old", "expiresAt": expired})
        code, out, err = await self.nextclaude("import", "--json", creds, "--name", "old")
        self.assertEqual(code, 0, out + err)
        self.assertIn("expired 3d", err)
        self.assertIn("nextclaude login --name old", err)
        code, out, err = await self.nextclaude("accounts")
        self.assertIn("no refresh token: log in again", out)
