"""
Tests for the twistd plugin: discovery, option validation, and a real
`twistd -n nextclaude` process serving a request from the simulator.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from nextclaude import tap
from nextclaude.simulate import SimulatedAnthropic, listen_simulator, simulated_accounts, stop_simulator
from tests.support import PROXY_KEY, ProcessWatcher, auth, client, spawn, start_proxy, write_config

REPO_ROOT = Path(__file__).resolve().parent.parent

MESSAGE = json.dumps(
    {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello through twistd"}],
    }
).encode()


def write_valid_config(test: Any) -> Path:
    """
    A config with two accounts and an upstream nobody listens on (these
    tests never send a request), by absolute path: twistd runs elsewhere.
    """
    return write_config(test, 1).absolute()


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self) -> None:
        """
        Twisted's plugin system finds exactly one service maker with the
        tapname "nextclaude", whose options are nextclaude.tap.Options and
        whose makeService is nextclaude.tap.makeService.
        """
        found = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "nextclaude"]
        self.assertEqual(len(found), 1)
        maker = found[0]
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
        self.assertTrue(maker.description)


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Every case names a config file of its own, so a value that is
        # wrongly accepted can never reach the user's config.
        self.config_path = write_valid_config(self)

    def parse(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--config", str(self.config_path), *args])
        return options

    def test_bad_values_are_usage_errors_naming_the_option(self) -> None:
        """
        Each bad value of --port, --host or --upstream is refused with a
        UsageError whose message names the option and quotes the value.
        """
        cases = [
            (["--port", "abc"], "--port", "abc"),
            (["--port", "70000"], "--port", "70000"),
            (["--port", "-1"], "--port", "-1"),
            (["--port", ""], "--port", "''"),
            (["--host", ""], "--host", "''"),
            (["--host", "127.0.0.1 evil"], "--host", "127.0.0.1 evil"),
            (["--upstream", "ftp://x"], "--upstream", "ftp://x"),
            (["--upstream", "notaurl"], "--upstream", "notaurl"),
            (["--upstream", "https://"], "--upstream", "https://"),
        ]
        for args, option, shown in cases:
            with self.subTest(args=args):
                error = self.assertRaises(usage.UsageError, self.parse, *args)
                self.assertIn(option, str(error))
                self.assertIn(shown, str(error))

    def test_good_values_override_the_file(self) -> None:
        """
        Valid flags are applied on top of the file: port 0, another
        interface, and an upstream URL without its trailing slash.
        """
        options = self.parse("--port", "0", "--host", "::1", "--upstream", "https://example.test:8443/")
        config = options.config
        self.assertEqual((config.proxy.port, config.proxy.host), (0, "::1"))
        self.assertEqual(config.upstream, "https://example.test:8443")
        self.assertEqual(config.path, self.config_path.absolute())
        self.assertEqual([account.name for account in config.accounts], ["alice", "bob"])

    def refused(self, *args: str) -> str:
        """
        Parse C{args}, which must end the process with status 1 (twistd
        would otherwise print its whole usage, or fork first); what it
        wrote on stderr.
        """
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as raised:
            self.parse(*args)
        self.assertEqual(raised.exception.code, 1)
        self.assertTrue(err.getvalue().startswith("nextclaude: "), err.getvalue())
        self.assertNotIn("Traceback", err.getvalue())
        return err.getvalue()

    def test_no_accounts_says_how_to_add_one(self) -> None:
        """
        A config file without accounts ends the process with status 1 and
        the message naming the file and saying how to add an account
        (nextclaude login / import).
        """
        self.config_path.write_text(
            json.dumps({"proxy": {"port": 3456, "host": "127.0.0.1", "apiKey": PROXY_KEY}, "accounts": []})
        )
        message = self.refused("--port", "0")
        self.assertIn(str(self.config_path), message)
        self.assertIn("nextclaude login", message)
        self.assertIn("nextclaude import", message)

    def test_broken_config_is_named_and_left_alone(self) -> None:
        """
        A config file that is not valid JSON ends the process with status 1
        and one line naming the file; the file's bytes are exactly as they
        were.
        """
        broken = b'{"proxy": {"port": 3456,\n  "accounts": [ oops'
        self.config_path.write_bytes(broken)
        message = self.refused("--port", "0")
        self.assertIn(str(self.config_path), message)
        self.assertEqual(len(message.strip().splitlines()), 1)
        self.assertEqual(self.config_path.read_bytes(), broken)
        self.assertFalse((self.config_path.parent / "state.json").exists())

    def test_checks_before_the_fork(self) -> None:
        """
        Option parsing (before twistd forks) refuses, in the same one line
        as `nextclaude server` and with status 1: a port in use, a host
        that is not this machine's, a request log directory that cannot be
        made.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        message = self.refused("--port", str(port))
        self.assertIn(f"cannot listen on 127.0.0.1:{port}: the port is already in use", message)
        self.assertEqual(len(message.strip().splitlines()), 1)
        message = self.refused("--port", "0", "--host", "192.0.2.1")
        self.assertIn("192.0.2.1 is not an address of this machine", message)
        blocker = Path(self.mktemp()).absolute()
        blocker.write_text("")
        message = self.refused("--port", "0", "--log-to", str(blocker / "logs"))
        self.assertIn("--log-to", message)
        self.assertIn("Not a directory", message)



def twistd_command() -> list[str]:
    """
    The twistd of the running Python: the script beside the interpreter,
    else the same entry point through -c.
    """
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def spawn_twistd(test: TestCase, *plugin_args: str) -> tuple[ProcessWatcher, Any]:
    """
    Run `twistd -n nextclaude PLUGIN_ARGS` with this checkout first on the
    path (for nextclaude and its plugin).
    """
    watcher = spawn(test, [*twistd_command(), "-n", "--pidfile=", "--logfile=-", "nextclaude", *plugin_args])
    return watcher, watcher.transport


class TwistdTests(TestCase):
    async def test_serves_a_request_and_saves_state_on_sigterm(self) -> None:
        """
        `twistd -n nextclaude --port 0 --upstream URL` logs the port it
        bound, relays an authenticated request to the upstream given on the
        command line on the configured account,
        shuts down cleanly on SIGTERM, and leaves state.json beside the
        config with that request counted; its log shows no credential.
        """
        sim = SimulatedAnthropic(reactor, simulated_accounts(1))
        sim_port = listen_simulator(reactor, sim)
        self.addCleanup(stop_simulator, sim_port)
        account = sim.accounts[0]
        # The file names an upstream nobody listens on: only --upstream
        # leads to the simulator.
        config_path = write_config(
            self,
            1,
            accounts=[{"name": account.name, "type": "oauth", "accessToken": account.credential}],
        ).absolute()
        state_path = config_path.parent / "state.json"
        self.assertFalse(state_path.exists())
        watcher, process = spawn_twistd(
            self,
            "--config", str(config_path),
            "--port", "0",
            "--upstream", f"http://127.0.0.1:{sim_port.getHost().port}",
        )
        match = await watcher.line_matching(rb"ProxySite starting on (\d+)")
        url = f"http://127.0.0.1:{int(match.group(1))}"

        response = await client(self).post(url + "/v1/messages", data=MESSAGE, headers=auth())
        self.assertEqual(response.code, 200)
        body = await response.json()
        self.assertEqual(body["type"], "message")
        self.assertTrue(body["content"][0]["text"].strip())
        self.assertEqual(body["usage"]["output_tokens"], sim.deltas * sim.output_tokens_per_delta)
        self.assertEqual((sim.served, account.requests), (1, 1))

        process.signalProcess("TERM")
        reason = await watcher.ended
        # After a clean shutdown twistd re-raises the signal it stopped on,
        # so the parent sees a death by SIGTERM, as without twistd.
        self.assertIsInstance(reason, ProcessTerminated, watcher.output)
        self.assertEqual(reason.signal, signal.SIGTERM, watcher.output)
        self.assertIn("Server Shut Down.", watcher.output)
        self.assertNotIn("Traceback", watcher.output)

        state = json.loads(state_path.read_text())
        self.assertEqual(state["primary"], account.name)
        self.assertEqual(state["accounts"][account.name]["usage"]["requests"], 1)
        self.assertNotIn(account.credential, watcher.output)
        self.assertNotIn(PROXY_KEY, watcher.output)

    async def test_port_in_use_exits_nonzero_naming_the_port(self) -> None:
        """
        When the port is already taken, twistd exits non-zero and its output
        names the interface and port it could not listen on.
        """
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        watcher, _ = spawn_twistd(self, "--config", str(write_valid_config(self)), "--port", str(port))
        reason = await watcher.ended
        self.assertIsInstance(reason, ProcessTerminated, watcher.output)
        self.assertNotEqual(reason.exitCode, 0, watcher.output)
        self.assertIn(f"127.0.0.1:{port}", watcher.output)
        self.assertIn("already in use", watcher.output)
        self.assertNotIn("Traceback", watcher.output)

    async def test_config_without_accounts_exits_with_advice(self) -> None:
        """
        twistd with a config file that has no accounts exits non-zero,
        printing the message that says how to add one, and binds nothing.
        """
        config_path = write_config(self, 1, accounts=[]).absolute()
        watcher, _ = spawn_twistd(self, "--config", str(config_path), "--port", "0")
        reason = await watcher.ended
        self.assertIsInstance(reason, ProcessTerminated, watcher.output)
        self.assertNotEqual(reason.exitCode, 0, watcher.output)
        self.assertIn("nextclaude login", watcher.output)
        self.assertIn(str(config_path), watcher.output)
        self.assertNotIn("starting on", watcher.output)


class TwistdPreForkTests(TestCase):
    """
    Under twistd, every start-up problem that can be seen before the fork
    is one line and status 1, in daemon mode too.
    """

    def daemon(self, *plugin_args: str) -> ProcessWatcher:
        # Daemon mode: were the checks after the fork, the parent would
        # exit 0 and the error would be lost (or a truncated repr).
        run = Path(self.mktemp()).absolute()
        run.mkdir()
        return spawn(
            self,
            [
                *twistd_command(),
                f"--pidfile={run / 'twistd.pid'}",
                f"--logfile={run / 'twistd.log'}",
                "nextclaude",
                *plugin_args,
            ],
        )

    async def assert_refused(self, watcher: ProcessWatcher, *expected: str) -> None:
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 1, watcher.output)
        err = watcher.err.decode()
        self.assertEqual(watcher.out, b"")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("nextclaude: "), err)
        self.assertNotIn("Usage:", err)
        for text in expected:
            self.assertIn(text, err)

    async def test_port_in_use(self) -> None:
        """
        A port in use: one line naming the address and the real cause.
        """
        taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        watcher = self.daemon("--config", str(write_valid_config(self)), "--port", str(port))
        await self.assert_refused(watcher, f"127.0.0.1:{port}", "already in use")

    async def test_broken_config(self) -> None:
        """
        A config that is not JSON: one line naming the file, not twistd's
        usage text.
        """
        config = write_valid_config(self)
        config.write_bytes(b"{nope")
        watcher = self.daemon("--config", str(config))
        await self.assert_refused(watcher, str(config), "invalid JSON")

    async def test_second_proxy_on_the_same_config(self) -> None:
        """
        With a proxy already running on the config, a second one under
        twistd refuses in one line saying so, and the first keeps its
        control socket.
        """
        from nextclaude import paths

        config = write_valid_config(self)
        start_proxy(self, config)
        watcher = self.daemon("--config", str(config), "--port", "0")
        await self.assert_refused(watcher, "already running for this config")
        self.assertTrue(paths.socket_path(config).exists())

    async def test_nextclaude_stop_ends_twistd(self) -> None:
        """
        `nextclaude stop` ends a `twistd -n nextclaude` proxy gracefully:
        stop exits 0 and twistd shuts down cleanly.
        """
        from tests.support import spawn_nextclaude

        config = write_valid_config(self)
        watcher, _ = spawn_twistd(self, "--config", str(config), "--port", "0")
        await watcher.line_matching(rb"ProxySite starting on (\d+)")
        stopper = spawn_nextclaude(self, "--config", str(config), "stop")
        self.assertEqual((await stopper.ended).exitCode, 0, stopper.output)
        reason = await watcher.ended
        self.assertEqual(reason.exitCode, 0, watcher.output)
        self.assertIn("Server Shut Down.", watcher.output)
