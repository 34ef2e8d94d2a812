"""
The `nextclaude` command line: argument handling in process, and the
`server` command as a real child process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from twisted.web.resource import Resource

from nextclaude.cli import main
from tests.support import REPO_ROOT, FakeUpstream, PROXY_KEY, auth, client, json_reply, listen, spawn_nextclaude, write_config


class ArgumentTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        return main(list(argv)), err.getvalue()

    def config_file(self, content: bytes) -> Path:
        """A config.json holding C{content}, alone in a fresh directory."""
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "config.json"
        path.write_bytes(content)
        return path

    def test_first_run_creates_config_and_explains_no_accounts(self) -> None:
        """
        With no config file, `server` creates one (mode 0600, a random nc-
        key, no accounts), then exits 1 with a message saying how to add an
        account.
        """
        directory = Path(self.mktemp())
        path = directory / "config.json"
        code, err = self.run_main("--config", str(path), "server", "--no-console")
        self.assertEqual(code, 1)
        self.assertIn("nextclaude login", err)
        self.assertIn("nextclaude import", err)
        self.assertIn(str(path), err)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        data = json.loads(path.read_text())
        self.assertTrue(data["proxy"]["apiKey"].startswith("nc-"))
        self.assertEqual(data["accounts"], [])

    def test_broken_config_is_named_and_kept(self) -> None:
        """
        A config file that is not valid JSON gives exit status 1 and an
        error naming the file; the file is left exactly as it was.
        """
        path = self.config_file(b'{"accounts": [}')
        code, err = self.run_main("--config", str(path), "server")
        self.assertEqual(code, 1)
        self.assertIn(str(path), err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(path.read_bytes(), b'{"accounts": [}')

    def test_bad_port_flag(self) -> None:
        """
        A --port that is not a port number is refused with a message naming
        the option, exit status 1.
        """
        code, err = self.run_main("--config", str(Path(self.mktemp()) / "c.json"), "server", "--port", "http")
        self.assertEqual(code, 1)
        self.assertIn("--port", err)

    def test_status_without_a_proxy(self) -> None:
        """
        `status` with no proxy running for the config says so and how to
        start one, exit status 1.
        """
        config = write_config(self, 9)
        code, err = self.run_main("--config", str(config), "status")
        self.assertEqual(code, 1)
        self.assertIn("nextclaude server", err)

    def test_status_without_a_proxy_on_a_broken_config(self) -> None:
        """
        `status` for a config no proxy serves and that is broken says both:
        that no proxy runs, and what is wrong with the file.
        """
        config = self.config_file(b'{"accounts": [')
        code, err = self.run_main("--config", str(config), "status")
        self.assertEqual(code, 1)
        self.assertNotIn("Traceback", err)
        self.assertEqual(config.read_bytes(), b'{"accounts": [')
        first, second = err.strip().splitlines()
        self.assertIn("nextclaude server", first)
        self.assertIn("the config itself is broken", second)
        self.assertIn("invalid JSON at line 1", second)

    def test_status_says_when_the_proxy_serves_a_sibling_config(self) -> None:
        """
        The control socket belongs to the config's directory: `status` with
        another file of that directory shows the running proxy's status and
        says which file it serves.
        """
        from nextclaude import control

        config = write_config(self, 9)
        sibling = config.parent / "other.json"
        sibling.write_text("{}")
        self.patch(control, "read_snapshot", lambda path: {"config": str(config), "primary": None})
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        code, err = self.run_main("--config", str(sibling), "status", "--json")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out.getvalue())["config"], str(config))
        self.assertIn(f"the proxy running here serves {config}, not {sibling}", err)
        code, err = self.run_main("--config", str(config), "status", "--json")
        self.assertEqual((code, err), (0, ""))

    def test_status_without_a_proxy_never_writes_the_config(self) -> None:
        """
        `status` looks at a valid config no proxy serves without writing it:
        no client key is added and no lock file is left.
        """
        config = self.config_file(b'{"accounts": []}')
        directory = config.parent
        code, err = self.run_main("--config", str(config), "status")
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertEqual(config.read_bytes(), b'{"accounts": []}')
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["config.json"])

    def test_broken_pipe_without_a_descriptor(self) -> None:
        """
        A broken pipe while stdout is no file (a test's StringIO) still
        ends with status 1 and no traceback.
        """
        from types import SimpleNamespace

        import nextclaude.cli as cli

        def broken(args: object) -> int:
            raise BrokenPipeError()

        self.patch(cli, "parse_arguments", lambda parser, argv: SimpleNamespace(handler=broken))
        self.patch(sys, "stdout", io.StringIO())
        code, err = self.run_main("status")
        self.assertEqual((code, err), (1, ""))

    def test_output_to_a_closed_pipe(self) -> None:
        """
        A command whose reader has gone (`nextclaude accounts | true`) exits
        with status 1 and no traceback.
        """
        import subprocess

        config = write_config(self, 9)
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            finished = subprocess.run(
                [sys.executable, "-m", "nextclaude", "--config", str(config), "accounts"],
                stdout=write_end,
                stderr=subprocess.PIPE,
                timeout=60,
                env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            )
        finally:
            os.close(write_end)
        self.assertEqual(finished.returncode, 1)
        self.assertEqual(finished.stderr, b"")

    def test_command_is_required_after_global_options(self) -> None:
        """
        Global options without a command are a usage error (exit status 2);
        only a bare `nextclaude` prints the help (tests.test_everyday).
        """
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit) as raised:
            main(["--config", "x.json"])
        self.assertEqual(raised.exception.code, 2)

    def test_listen_problems_name_the_real_cause(self) -> None:
        """
        The line for an address the proxy cannot listen on comes from the
        system's error: in use (naming proxy.port), not an address of this
        machine (naming proxy.host), permission denied, an unknown host
        name, anything else in the system's words.
        """
        import errno
        import socket

        from twisted.internet.error import CannotListenError

        from nextclaude.tap import listen_problem

        config = Path("/c/config.json")

        def line(error: BaseException) -> str:
            return listen_problem("10.9.9.9", 3456, CannotListenError("10.9.9.9", 3456, error), config)

        in_use = line(OSError(errno.EADDRINUSE, "Address already in use"))
        self.assertIn("already in use", in_use)
        self.assertIn("proxy.port field of /c/config.json", in_use)
        absent = line(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
        self.assertIn("10.9.9.9 is not an address of this machine", absent)
        self.assertIn("proxy.host", absent)
        self.assertNotIn("in use", absent)
        denied = line(OSError(errno.EACCES, "Permission denied"))
        self.assertIn("permission denied", denied)
        unknown = line(socket.gaierror(-2, "Name or service not known"))
        self.assertIn("not a host name or address", unknown)
        other = line(OSError(errno.EINVAL, "Invalid argument"))
        self.assertIn("cannot listen on 10.9.9.9:3456: Invalid argument", other)
        for text in (in_use, absent, denied, unknown, other):
            self.assertEqual(len(text.splitlines()), 1)

    def test_host_not_of_this_machine(self) -> None:
        """
        `server --host` with an address no interface has (TEST-NET-1) exits
        1 with one line saying so, not that the port is in use.
        """
        config = write_config(self, 9)
        code, err = self.run_main("--config", str(config), "server", "--no-console", "--host", "192.0.2.1")
        self.assertEqual(code, 1)
        self.assertIn("192.0.2.1 is not an address of this machine", err)
        self.assertNotIn("in use", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)


class ServerProcessTests(TestCase):
    async def test_server_serves_and_exits_cleanly_on_sigterm(self) -> None:
        """
        `nextclaude server --port 0` prints where it listens, answers the
        status endpoint, and on SIGTERM stops with exit status 0 after
        saving state.json (mode 0600) beside the config.
        """
        config = write_config(self, 9)
        watcher = spawn_nextclaude(self, "--config", str(config), "server", "--port", "0", "--no-console")
        match = await watcher.line_matching(rb"listening on (http://127\.0\.0\.1:\d+)")
        url = match.group(1).decode()
        response = await client(self).get(url + "/nextclaude/status", headers={"x-api-key": PROXY_KEY})
        status = await response.json()
        self.assertEqual([a["name"] for a in status["accounts"]], ["alice", "bob"])
        self.assertEqual(status["listen"]["port"], int(url.rsplit(":", 1)[1]))
        # The commands that talk to the running proxy over its socket: the
        # blocking client is fine here, the proxy is another process.
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(main(["--config", str(config), "status"]), 0)
        self.assertIn("NextClaude 0.1.0 · 2 account(s) · 0 session(s)", out.getvalue())
        self.assertIn("alice (subscription, active)", out.getvalue())
        out.seek(0)
        out.truncate(0)
        self.assertEqual(main(["--config", str(config), "status", "--json"]), 0)
        self.assertEqual(json.loads(out.getvalue())["listen"], status["listen"])
        out.seek(0)
        out.truncate(0)
        self.assertEqual(main(["--config", str(config), "env"]), 0)
        self.assertIn(f"ANTHROPIC_BASE_URL={url}\n", out.getvalue())
        watcher.transport.signalProcess(signal.SIGTERM)
        self.assertEqual((await watcher.ended).exitCode, 0)
        state = config.parent / "state.json"
        self.assertEqual(state.stat().st_mode & 0o777, 0o600)
        self.assertIn("alice", json.loads(state.read_text())["accounts"])
        self.assertNotIn(b"sk-ant-oat01", watcher.out + watcher.err)

    async def test_server_output_is_activity_columns(self) -> None:
        """
        `nextclaude server --no-console` writes a header line and one row per
        request in the console's activity columns, with the model family and
        side requests tagged (count_tokens as side:count), and none of
        Twisted's factory chatter or object reprs.
        """
        usage = {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 0}
        upstream = FakeUpstream(lambda seen: json_reply(seen.request, 200, {"type": "message", "content": [], "usage": usage}))
        config = write_config(self, listen(self, upstream))
        watcher = spawn_nextclaude(self, "--config", str(config), "server", "--port", "0", "--no-console")
        url = (await watcher.line_matching(rb"listening on (http://127\.0\.0\.1:\d+)")).group(1).decode()
        body = json.dumps({"model": "claude-sonnet-4-5-20250929", "max_tokens": 100, "messages": []}).encode()
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            response = await client(self).post(url + path, data=body, headers=auth())
            self.assertEqual(response.code, 200)
            await response.content()
        await watcher.line_matching(rb"side:count")
        watcher.transport.signalProcess(signal.SIGTERM)
        self.assertEqual((await watcher.ended).exitCode, 0, watcher.output)
        out = watcher.out.decode()
        self.assertRegex(out, r"(?m)^time +st +dur account +model +hit +miss +✎ +↓out hit% reason$")
        self.assertEqual(out.count("time "), 1, out)
        self.assertRegex(out, r"(?m)^\d\d:\d\d:\d\d 200 +\S+s (alice|bob) +sonnet +3k +12 +0 +7 +100% placed$")
        self.assertRegex(out, r"(?m)^\d\d:\d\d:\d\d 200 +\S+s (alice|bob) +sonnet .* side:count$")
        self.assertNotIn("Starting factory", watcher.output)
        self.assertNotIn("Stopping factory", watcher.output)
        self.assertNotIn(" object at 0x", watcher.output)

    async def test_port_in_use_is_one_clear_paragraph(self) -> None:
        """
        When the port is taken, `server` exits 1 with one paragraph naming
        the port and the proxy.port field, and no traceback.
        """
        taken = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        config = write_config(self, 9)
        watcher = spawn_nextclaude(self, "--config", str(config), "server", "--port", str(port), "--no-console")
        self.assertEqual((await watcher.ended).exitCode, 1)
        err = watcher.err.decode()
        self.assertIn(f"127.0.0.1:{port}", err)
        self.assertIn("proxy.port", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(err.strip().count("\n"), 0)


def _accounts_config(test: SynchronousTestCase | TestCase) -> Path:
    return write_config(
        test,
        9,
        accounts=[
            {
                "name": "alice@example.com",
                "type": "oauth",
                "accessToken": "sk-ant-oat01-secret-alice",
                "refreshToken": "sk-ant-ort01-secret-alice",
                "expiresAt": 4102444800000,
                "tier": "Max",
                "accountUuid": "0000-uuid-alice",
                "scopes": ["user:inference", "user:profile"],
                "importFrom": "/home/alice/.claude/.credentials.json",
            },
            {"name": "backup", "type": "apikey", "apiKey": "sk-ant-api03-secret-backup"},
        ],
    )


class AccountCommandTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return main(list(argv)), out.getvalue(), err.getvalue()

    def test_accounts_lists_without_secrets(self) -> None:
        """
        `accounts` shows name, type, tier, priority, token validity and
        source; `-v` adds uuid and scopes; no token ever appears.
        """
        config = _accounts_config(self)
        code, out, _ = self.run_main("--config", str(config), "accounts", "-v")
        self.assertEqual(code, 0)
        self.assertIn("alice@example.com", out)
        self.assertIn("Max", out)
        self.assertIn("valid for", out)
        self.assertIn("imported from /home/alice/.claude/.credentials.json", out)
        self.assertIn("API key", out)
        self.assertIn("0000-uuid-alice", out)
        self.assertIn("user:inference user:profile", out)
        self.assertNotIn("secret", out)
        self.assertNotIn("0000-uuid-alice", self.run_main("--config", str(config), "accounts")[1])

    def test_accounts_shows_disabled_ones(self) -> None:
        """
        After `disable`, `accounts` (and `accounts -v`) marks that
        account's row disabled, and the others enabled.
        """
        config = _accounts_config(self)
        self.assertEqual(self.run_main("--config", str(config), "disable", "backup")[0], 0)
        for argv in (["accounts"], ["accounts", "-v"]):
            code, out, _ = self.run_main("--config", str(config), *argv)
            self.assertEqual(code, 0)
            header, *rows = out.splitlines()
            self.assertIn("STATE", header.split())
            row = {line.split()[0]: line.split() for line in rows if not line.startswith(" ")}
            self.assertIn("disabled", row["backup"])
            self.assertIn("enabled", row["alice@example.com"])
            self.assertNotIn("disabled", row["alice@example.com"])

    def test_remove_with_yes(self) -> None:
        """
        `remove NAME --yes` removes exactly that account from the file.
        """
        config = _accounts_config(self)
        code, out, _ = self.run_main("--config", str(config), "remove", "backup", "--yes")
        self.assertEqual(code, 0)
        self.assertEqual([a["name"] for a in json.loads(config.read_text())["accounts"]], ["alice@example.com"])

    def test_remove_unknown_or_unconfirmed(self) -> None:
        """
        Removing an unknown name fails naming the accounts there are; off a
        terminal without --yes nothing is removed.
        """
        config = _accounts_config(self)
        before = config.read_bytes()
        code, _, err = self.run_main("--config", str(config), "remove", "carol")
        self.assertEqual(code, 1)
        self.assertIn("alice@example.com, backup", err)
        self.patch(sys, "stdin", io.StringIO(""))
        code, _, err = self.run_main("--config", str(config), "remove", "backup")
        self.assertEqual(code, 1)
        self.assertIn("--yes", err)
        self.assertEqual(config.read_bytes(), before)

    def test_env_keeps_subscription_mode(self) -> None:
        """
        `env` prints the base URL and the proxy key as a custom header, so
        Claude Code keeps its subscription mode; `--api-key-mode` prints
        ANTHROPIC_API_KEY instead, with a warning of what it costs.
        """
        config = _accounts_config(self)
        code, out, err = self.run_main("--config", str(config), "env")
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            [
                "export ANTHROPIC_BASE_URL=http://127.0.0.1:3456",
                f"export ANTHROPIC_CUSTOM_HEADERS='x-nextclaude-key: {PROXY_KEY}'",
            ],
        )
        # No proxy runs for this config: said once, on stderr only.
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("no NextClaude proxy is running", err)
        code, out, err = self.run_main("--config", str(config), "env", "--api-key-mode")
        self.assertIn(f"export ANTHROPIC_API_KEY={PROXY_KEY}", out)
        self.assertNotIn("CUSTOM_HEADERS", out)
        self.assertIn("subscription mode", err)


class RunCommandTests(TestCase):
    async def test_run_passes_environment_and_exit_status(self) -> None:
        """
        `run -- ARGS` starts `claude` from PATH with the proxy's environment
        (and without ANTHROPIC_API_KEY), passes ARGS, and exits with its
        status.
        """
        config = _accounts_config(self)
        bin_dir = Path(self.mktemp()).absolute()
        bin_dir.mkdir()
        record = bin_dir / "record.txt"
        fake = bin_dir / "claude"
        fake.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$*" "$ANTHROPIC_BASE_URL" "$ANTHROPIC_CUSTOM_HEADERS" "${{ANTHROPIC_API_KEY-unset}}" > {record}\n'
            "exit 3\n"
        )
        fake.chmod(0o755)
        watcher = spawn_nextclaude(
            self,
            "--config",
            str(config),
            "run",
            "--no-check",
            "--",
            "-p",
            "hello",
            extra_env={"PATH": f"{bin_dir}:/usr/bin:/bin", "ANTHROPIC_API_KEY": "sk-should-be-dropped"},
        )
        self.assertEqual((await watcher.ended).exitCode, 3)
        self.assertEqual(
            record.read_text().splitlines(),
            ["-p hello", "http://127.0.0.1:3456", f"x-nextclaude-key: {PROXY_KEY}", "unset"],
        )

    async def test_run_refuses_without_a_proxy(self) -> None:
        """
        With no proxy running for the config, `run` does not start claude:
        one line naming `nextclaude server` and --no-check, exit status 1.
        """
        config = _accounts_config(self)
        bin_dir = Path(self.mktemp()).absolute()
        bin_dir.mkdir()
        record = bin_dir / "ran"
        fake = bin_dir / "claude"
        fake.write_text(f"#!/bin/sh\ntouch {record}\n")
        fake.chmod(0o755)
        watcher = spawn_nextclaude(self, "--config", str(config), "run", extra_env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        self.assertEqual((await watcher.ended).exitCode, 1)
        err = watcher.err.decode()
        self.assertIn("no NextClaude proxy is running", err)
        self.assertIn("nextclaude server", err)
        self.assertIn("--no-check", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertFalse(record.exists())

    async def test_run_with_a_proxy_running(self) -> None:
        """
        With the proxy running (its control socket answering), `run` starts
        claude pointed at the proxy's real address.
        """
        from tests.support import start_proxy

        config = write_config(self, 9)
        service, url = start_proxy(self, config)
        bin_dir = Path(self.mktemp()).absolute()
        bin_dir.mkdir()
        record = bin_dir / "record.txt"
        fake = bin_dir / "claude"
        fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$ANTHROPIC_BASE_URL" > {record}\n')
        fake.chmod(0o755)
        watcher = spawn_nextclaude(self, "--config", str(config), "run", extra_env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
        self.assertEqual((await watcher.ended).exitCode, 0, watcher.output)
        self.assertEqual(record.read_text().splitlines(), [url])

    async def test_run_without_claude_says_so(self) -> None:
        """
        Without `claude` on PATH, `run` says how to install it and exits 127.
        """
        config = _accounts_config(self)
        empty = Path(self.mktemp()).absolute()
        empty.mkdir()
        watcher = spawn_nextclaude(self, "--config", str(config), "run", extra_env={"PATH": str(empty)})
        self.assertEqual((await watcher.ended).exitCode, 127)
        self.assertIn(b"not on PATH", watcher.err)


class ControlFailureTests(SynchronousTestCase):
    """
    Commands that use the blocking control client, against a control
    socket whose process misbehaves: one line on stderr saying what
    happened, never a traceback.
    """

    def setUp(self) -> None:
        from tests.test_control import short_socket_path

        self.socket = short_socket_path(self)
        self.patch(os, "environ", {**os.environ, "NEXTCLAUDE_SOCKET": str(self.socket)})
        self.config = write_config(self, 9)

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return main(["--config", str(self.config), *argv]), out.getvalue(), err.getvalue()

    def assert_one_line(self, err: str, *expected: str) -> None:
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("nextclaude: "), err)
        for text in expected:
            self.assertIn(text, err)

    def peers(self) -> list[tuple[str, Any, str]]:
        from tests.test_control import answer_garbage, hang_up_after_request, hang_up_at_once

        return [
            ("hang up at once", hang_up_at_once, "closed the connection before answering"),
            ("hang up after the command", hang_up_after_request, "closed the connection before answering"),
            ("garbage", answer_garbage, "did not answer like a NextClaude proxy"),
        ]

    def test_status(self) -> None:
        """
        `status` and `status --json` against a process that hangs up at
        once, hangs up after reading the command, or answers garbage: exit
        status 1 and one line naming the socket and what happened.
        """
        from tests.test_control import ControlPeer

        for argv in (["status"], ["status", "--json"]):
            for what, behaviour, expected in self.peers():
                self.socket.unlink(missing_ok=True)
                ControlPeer(self, self.socket, behaviour)
                code, out, err = self.run_main(*argv)
                self.assertEqual(code, 1, (argv, what))
                self.assertEqual(out, "", (argv, what))
                self.assert_one_line(err, str(self.socket), expected)

    def test_status_queue_full(self) -> None:
        """
        `status` against a listener that never accepts (its queue full, so
        connect() fails with EAGAIN at once): exit status 1, one line.
        """
        from tests.test_control import full_queue

        full_queue(self, self.socket)
        code, _, err = self.run_main("status")
        self.assertEqual(code, 1)
        self.assert_one_line(err, str(self.socket), "not accepting connections")

    def test_env_falls_back_with_one_warning(self) -> None:
        """
        `env` (and `run`, which shares its lookup) against a socket that
        fails: the file's address is printed, exit status 0, and one
        warning line says the running proxy could not be asked.
        """
        from tests.test_control import ControlPeer

        for what, behaviour, expected in self.peers():
            self.socket.unlink(missing_ok=True)
            ControlPeer(self, self.socket, behaviour)
            code, out, err = self.run_main("env")
            self.assertEqual(code, 0, what)
            self.assertIn("export ANTHROPIC_BASE_URL=http://127.0.0.1:3456", out)
            self.assert_one_line(err, "warning", expected, str(self.config))

    def test_env_without_a_proxy_warns(self) -> None:
        """
        `env` with no proxy at all (no socket) still prints the exports
        from the file, exit status 0 (shell rc files rely on it), and one
        warning line on stderr naming the config and how to start a proxy.
        """
        code, out, err = self.run_main("env")
        self.assertEqual(code, 0)
        self.assertIn("export ANTHROPIC_BASE_URL=http://127.0.0.1:3456", out)
        self.assert_one_line(err, "warning", "no NextClaude proxy is running", str(self.config), "nextclaude server")

    def test_unhandled_control_error_is_one_line(self) -> None:
        """
        A control-channel error that a command does not catch itself still
        ends as one line and exit status 1 from main().
        """
        from nextclaude import cli
        from nextclaude.control import HungUp

        def broken(args: Any) -> int:
            raise HungUp(self.socket)

        self.patch(cli, "_accounts", broken)
        code, _, err = self.run_main("accounts")
        self.assertEqual(code, 1)
        self.assert_one_line(err, "closed the connection before answering")


class StopCommandTests(TestCase):
    def test_nothing_to_stop(self) -> None:
        """
        `stop` with no proxy running for the config says so in one line
        and exits 1.
        """
        config = write_config(self, 9)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.patch(sys, "stdout", io.StringIO())
        self.assertEqual(main(["--config", str(config), "stop"]), 1)
        self.assertIn("no NextClaude proxy is running", err.getvalue())
        self.assertIn("nothing to stop", err.getvalue())
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)

    async def test_stop_waits_for_the_drain_and_says_so(self) -> None:
        """
        `stop` against a proxy with a stream in flight says it lets one
        request finish (with the grace), waits while the stream is held
        (the proxy no longer accepts), and once the stream completes
        reports the stop and exits 0; the client got the whole stream.
        """
        from tests.support import FakeUpstream, holding_stream, listen, message_end, open_stream, start_proxy

        upstream = FakeUpstream(holding_stream)
        config = write_config(self, listen(self, upstream))
        service, url = start_proxy(self, config)
        collector, seen = await open_stream(self, url, upstream)
        watcher = spawn_nextclaude(self, "--config", str(config), "stop")
        await watcher.line_matching(rb"letting 1 request\(s\) in flight finish, up to 30s")
        # The control socket stays open until the drain is over, so the
        # command cannot have ended while the stream is held.
        self.assertFalse(watcher.ended.called)
        self.assertIsNone(service.listener.port)
        seen.request.write(message_end())
        seen.request.finish()
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 0, watcher.output)
        self.assertIn("Stopped", watcher.out.decode())
        await collector.done
        self.assertIn(b"message_stop", collector.body)

    async def test_stop_with_its_output_closed(self) -> None:
        """
        `nextclaude stop | true`: with nobody reading its output the stop
        still goes through and is waited for; the command ends without a
        traceback (status 1, having said nothing).
        """
        from tests.support import spawn, start_proxy

        config = write_config(self, 9)
        service, _ = start_proxy(self, config)
        read_end, write_end = os.pipe()
        os.close(read_end)
        watcher = spawn(
            self,
            [sys.executable, "-m", "nextclaude", "--config", str(config), "stop"],
            child_fds={0: "w", 1: write_end, 2: "r"},
        )
        os.close(write_end)
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 1, watcher.output)
        self.assertEqual(watcher.err, b"")
        self.assertIsNone(service.listener.port)

    async def test_stop_ends_a_server_process(self) -> None:
        """
        `stop` ends a `nextclaude server` process: the server exits 0 after
        saving its state, and `stop` exits 0.
        """
        config = write_config(self, 9)
        server = spawn_nextclaude(self, "--config", str(config), "server", "--port", "0", "--no-console")
        await server.line_matching(rb"listening on http://127\.0\.0\.1:\d+")
        stopper = spawn_nextclaude(self, "--config", str(config), "stop")
        self.assertEqual((await stopper.ended).exitCode, 0, stopper.output)
        self.assertEqual((await server.ended).exitCode, 0, server.output)
        self.assertIn("alice", json.loads((config.parent / "state.json").read_text())["accounts"])
