"""
The local control channel: AMP over a 0600 UNIX socket between the running
proxy and its consoles (`nextclaude console`, `nextclaude status`).

The commands, their arguments and their declared errors are all in this
module.  The server side is L{ControlService}; the Twisted client is
L{connect} / L{ControlClient}; L{read_snapshot} is a blocking client for
commands that run without a reactor.

Two rules shape the server:

  - no value may exceed AMP's 64 KiB limit, however many accounts and
    events there are: structured values travel as L{JsonChunks}, split
    across C{NAME.0}, C{NAME.1}, ... and joined again on the other side;
  - a console that disconnects, stops reading or raises never disturbs the
    proxy: events are pushed fire-and-forget with at most
    C{max_outstanding} unanswered pushes per connection, the rest dropped
    and counted (the count rides on the next push that goes out).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from nextclaude import paths, tokenstate
from nextclaude.config import add_account, load_config, remove_account, set_enabled, set_priority
from nextclaude.events import Event, EventHub

# A little under AMP's 65,535-byte value limit.
CHUNK_BYTES = 60 * 1024

# Unanswered PushEvent calls a connection may have before events are dropped.
MAX_OUTSTANDING = 100

# How long start-up waits for whoever holds an existing socket to answer.
PROBE_TIMEOUT = 2.0

# How long the clients wait to connect (and the blocking one for an answer).
CLIENT_TIMEOUT = 5.0

# The kind of the event L{ControlClient} delivers ahead of a pushed event
# when the server had to drop some before it.
EVENTS_DROPPED = "events-dropped"

T = TypeVar("T")


# -- errors --------------------------------------------------------------------


class ControlError(Exception):
    """
    Something about the control channel, with a message meant for the user.
    """


class AlreadyRunning(ControlError):
    """
    Another proxy holds the control socket of this config.
    """

    def __init__(self, path: Path | str, message: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(
            message
            or f"another NextClaude proxy is already running for this config (control socket {path})"
        )


class NotRunning(ControlError):
    """
    No proxy answers on the control socket of this config.
    """

    def __init__(self, path: Path | str, missing: bool = True) -> None:
        self.path = Path(path)
        where = f"no control socket at {path}" if missing else f"nothing listening on the control socket {path}"
        super().__init__(
            f"no NextClaude proxy is running for this config ({where}); start one with `nextclaude server`"
        )


class NoAnswer(ControlError):
    """
    Something accepted the connection but gave no AMP answer in time.
    """

    def __init__(self, path: Path | str, timeout: float) -> None:
        self.path = Path(path)
        super().__init__(
            f"the process listening on the control socket {path} did not answer within {timeout:g}s "
            "(is a NextClaude proxy suspended or hung?)"
        )


class Disconnected(ControlError):
    """
    The proxy went away while a command was in flight (or before it was sent).
    """

    def __init__(self, path: Path | str, message: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(message or f"the NextClaude proxy went away (control socket {path})")


class HungUp(Disconnected):
    """
    The process on the control socket accepted the connection, then closed
    or reset it before answering.
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__(
            path,
            f"the process on the control socket {path} closed the connection before answering "
            "(is the NextClaude proxy stopping or restarting?)",
        )


class NotAccepting(ControlError):
    """
    The control socket's accept queue is full: whoever listens there does
    not take new connections.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(
            f"the process on the control socket {path} is not accepting connections (its queue is full: "
            "is the NextClaude proxy overloaded, suspended or hung?)"
        )


class BadAnswer(ControlError):
    """
    Something answered on the control socket, but not a NextClaude proxy's
    answer to the command.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(
            f"the process on the control socket {path} did not answer like a NextClaude proxy "
            "(another program, or a proxy of another version?)"
        )


class SocketError(ControlError):
    """
    Any other failure of the control socket, named with the system's words.
    """

    def __init__(self, path: Path | str, error: OSError) -> None:
        self.path = Path(path)
        self.error = error
        # strerror alone: str(OSError) may repeat the path or be empty.
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f"could not talk to the NextClaude proxy on the control socket {path}: {reason}")


class StopOverran(ControlError):
    """
    The proxy was asked to stop but its control socket was still open
    after the longest its stop can take.
    """

    def __init__(self, path: Path | str, waited: float) -> None:
        self.path = Path(path)
        super().__init__(
            f"the NextClaude proxy on {path} was asked to stop but had not stopped after {waited:g}s; "
            "see its log for what it waits on"
        )


class SocketPathProblem(paths.FileProblem, ControlError):
    """
    The control socket path holds something we must not replace (or may
    not connect to).
    """


# Declared AMP errors: they cross the wire as their message.


class UnknownAccount(ControlError):
    """
    No account by that name.
    """


class InvalidAccount(ControlError):
    """
    An account to add is incomplete or malformed.
    """


class ConfigUnusable(ControlError):
    """
    The config file could not be read or written.
    """


class CommandFailed(ControlError):
    """
    The proxy hit an unexpected error carrying out a command (details in its log).
    """


_ALWAYS: dict[type[Exception], bytes] = {CommandFailed: b"COMMAND_FAILED"}
_ACCOUNT_ERRORS: dict[type[Exception], bytes] = {
    UnknownAccount: b"UNKNOWN_ACCOUNT",
    InvalidAccount: b"INVALID_ACCOUNT",
    ConfigUnusable: b"CONFIG_UNUSABLE",
    **_ALWAYS,
}


# -- arguments -----------------------------------------------------------------


def _python_name(name: bytes) -> str:
    # What amp.Command uses as the keyword for a wire name.
    return name.decode("ascii").replace("-", "_")


class Chunked(amp.Argument):
    """
    A value of any size, encoded to bytes and split across C{NAME.0},
    C{NAME.1}, ... so that no single AMP value exceeds L{CHUNK_BYTES}.
    Subclasses say how values become bytes.
    """

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError()

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError()

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        value = self.retrieve(objects, _python_name(name), proto)
        if self.optional and value is None:
            return
        data = self.encode(value)
        # An empty value still needs its ".0" key, or it would read as absent.
        pieces = [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)] or [b""]
        for index, piece in enumerate(pieces):
            strings[b"%s.%d" % (name, index)] = piece

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        pieces: list[bytes] = []
        while (key := b"%s.%d" % (name, len(pieces))) in strings:
            pieces.append(strings[key])
        python_name = _python_name(name)
        if not pieces:
            if self.optional:
                objects[python_name] = None
                return
            raise amp.InvalidSignature(f"missing {python_name}")
        objects[python_name] = self.decode(b"".join(pieces))


class JsonChunks(Chunked):
    """
    Any JSON value.  Values JSON cannot represent are sent as their str().
    """

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))


class TextChunks(Chunked):
    """
    A str of any length (pasted credentials, say).
    """

    def encode(self, value: str) -> bytes:
        return value.encode("utf-8")

    def decode(self, data: bytes) -> str:
        return data.decode("utf-8")


# -- commands ------------------------------------------------------------------


class Snapshot(amp.Command):
    """
    The whole state as the status endpoint shows it (nextclaude.status's
    schema): version, uptime, listen address, primary, sessions, totals and
    every account with its windows, flags and usage.
    """

    arguments = []  # type: ignore[var-annotated]
    response = [(b"snapshot", JsonChunks())]
    errors = dict(_ALWAYS)


class Subscribe(amp.Command):
    """
    Start receiving events.  The answer carries the replay: the hub's
    recent events (oldest first, at most the hub's C{keep}); from then on
    the server sends every new event as a L{PushEvent}.  Subscribing again
    on the same connection replays again but never doubles the stream.
    """

    arguments = []  # type: ignore[var-annotated]
    response = [(b"replay", JsonChunks())]
    errors = dict(_ALWAYS)


class PushEvent(amp.Command):
    """
    Server to client: one event (L{Event.to_json}: kind, time and the event's
    data).  C{dropped} counts the events the server dropped for this
    connection since the previous push because too many pushes were
    unanswered.  The client answers as soon as it has taken the event.
    """

    arguments = [(b"event", JsonChunks()), (b"dropped", amp.Integer(optional=True))]
    response = []  # type: ignore[var-annotated]


class Pin(amp.Command):
    """
    Pin an account manually (every session moves there on its next
    request), or clear the pin when C{account} is absent.
    """

    arguments = [(b"account", amp.Unicode(optional=True))]
    response = []  # type: ignore[var-annotated]
    errors = {UnknownAccount: b"UNKNOWN_ACCOUNT", **_ALWAYS}


class AddAccount(amp.Command):
    """
    Add an account and start using it.  C{kind} "apikey" needs C{name} and
    C{api_key}; C{kind} "import" needs C{credentials_json} (Claude Code's
    credentials file) and takes an optional C{name}.  Answers the name the
    account got.
    """

    arguments = [
        (b"kind", amp.Unicode()),
        (b"name", amp.Unicode(optional=True)),
        (b"api_key", amp.Unicode(optional=True)),
        (b"credentials_json", TextChunks(optional=True)),
    ]
    response = [(b"name", amp.Unicode())]
    errors = dict(_ACCOUNT_ERRORS)


class RemoveAccount(amp.Command):
    """
    Remove an account from the config file and stop using it.
    """

    arguments = [(b"name", amp.Unicode())]
    response = []  # type: ignore[var-annotated]
    errors = dict(_ACCOUNT_ERRORS)


class Reload(amp.Command):
    """
    Re-read the accounts from the config file.  Answers the names added and
    removed; accounts that stay keep what the proxy learned about them.
    """

    arguments = []  # type: ignore[var-annotated]
    response = [(b"added", JsonChunks()), (b"removed", JsonChunks())]
    errors = dict(_ACCOUNT_ERRORS)


class SetAccount(amp.Command):
    """
    Take an account out of rotation or put it back (C{enabled}), or give
    it a C{priority}: each one locked operation on the config file, then a
    reload.  Either argument may be absent.
    """

    arguments = [
        (b"name", amp.Unicode()),
        (b"enabled", amp.Boolean(optional=True)),
        (b"priority", amp.Integer(optional=True)),
    ]
    response = []  # type: ignore[var-annotated]
    errors = dict(_ACCOUNT_ERRORS)


class Stop(amp.Command):
    """
    Stop the proxy gracefully, as its first SIGTERM would: accept nothing
    new, let the requests in flight finish (up to C{proxy.shutdownGrace}),
    save the state, and end the process.  Answers at once with what the
    stop waits for (C{in_flight} requests, up to C{grace} seconds; the
    whole stop ends within C{bound} seconds) and the proxy's C{pid}; the
    connection then stays open until the proxy closes its control socket,
    after the drain, which is how a client knows the stop is done.
    """

    arguments = []  # type: ignore[var-annotated]
    response = [
        (b"in_flight", amp.Integer()),
        (b"grace", amp.Float()),
        (b"bound", amp.Float()),
        (b"pid", amp.Integer()),
    ]
    errors = dict(_ALWAYS)


# -- what the server needs from the proxy ---------------------------------------


class Accounts(Protocol):
    """
    The accounts layer the control channel drives.  Any method may return
    its result directly or as an awaitable (a Deferred or a coroutine).

    Failures: L{UnknownAccount} or C{KeyError} for a name that does not
    exist; L{InvalidAccount} or C{ValueError} for bad input;
    L{paths.FileProblem} (ConfigError, StoreError) when the file cannot be
    used.  Anything else is logged and reported as L{CommandFailed}.
    """

    def add_api_key(self, name: str, key: str) -> str | Awaitable[str]:
        """Add (or replace) an API-key account; return its name."""

    def import_json(self, text: str, name: str | None) -> str | Awaitable[str]:
        """Add (or update) an account from Claude Code's credentials JSON; return its name."""

    def remove(self, name: str) -> None | Awaitable[None]:
        """Remove the account; unknown names raise."""

    def reload(self) -> tuple[list[str], list[str]] | Awaitable[tuple[list[str], list[str]]]:
        """Re-read the config file's accounts; return the names (added, removed)."""

    def set_enabled(self, name: str, enabled: bool) -> None | Awaitable[None]:
        """Disable or enable the account; unknown names raise."""

    def set_priority(self, name: str, priority: int) -> None | Awaitable[None]:
        """Give the account a priority; unknown names raise."""


class ControlledProxy(Protocol):
    """
    What L{ControlService} needs of the running proxy (ProxyService has it).
    """

    hub: EventHub
    router: Any  # nextclaude.router.Router: pin(name | None) raises KeyError
    accounts: Accounts

    def status(self) -> dict[str, Any]: ...

    def request_stop(self) -> dict[str, Any]:
        """
        Begin a graceful stop once the current call has returned (so the
        answer still goes out); return L{Stop}'s answer: in_flight, grace,
        bound, pid.
        """


Reloader = Callable[[], "tuple[list[str], list[str]]"]


def config_reloader(config_path: Path, router: Any) -> Reloader:
    """
    A reload callable: read the accounts from the config file into the
    router's pool (accounts that stay keep their quota and usage) and make
    the router forget removed ones.  Only accounts are re-read; the other
    settings need a restart.
    """

    def reload() -> tuple[list[str], list[str]]:
        config = load_config(config_path, create=False)
        added, removed = router.pool.update_accounts(config.accounts)
        for name in removed:
            router.forget(name)
        return added, removed

    return reload


_TIERS = {"pro": "Pro", "max": "Max", "team": "Team", "enterprise": "Enterprise"}


class ConfigAccounts:
    """
    The fallback L{Accounts}: writes go through nextclaude.config (lock,
    re-read, one operation, atomic replace), then C{reload} applies the file
    to the running proxy.  It cannot look an imported account's email up,
    so an import needs a name.
    """

    def __init__(self, config_path: Path, reload: Reloader) -> None:
        self._path = config_path
        self._reload = reload

    def add_api_key(self, name: str, key: str) -> str:
        name, key = (name or "").strip(), (key or "").strip()
        if not name:
            raise InvalidAccount("an API-key account needs a name")
        if not key or any(char.isspace() for char in key):
            raise InvalidAccount("the API key must be one word with no spaces (sk-ant-api03-…)")
        add_account(self._path, {"name": name, "type": "apikey", "apiKey": key, "tier": "API", "priority": 1})
        self._reload()
        return name

    def import_json(self, text: str, name: str | None) -> str:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise InvalidAccount(f"the credentials are not JSON ({error})") from None
        oauth = data.get("claudeAiOauth") if isinstance(data, dict) else None
        if not isinstance(oauth, dict) or not isinstance(oauth.get("accessToken"), str):
            raise InvalidAccount("the credentials JSON has no claudeAiOauth.accessToken (is it Claude Code's .credentials.json?)")
        name = (name or "").strip()
        if not name:
            raise InvalidAccount("give the imported account a name")
        refresh_token = oauth.get("refreshToken")
        refused = tokenstate.import_refusal(
            self._path, "the pasted credentials", refresh_token if isinstance(refresh_token, str) else None
        )
        if refused is not None:
            raise InvalidAccount(refused)
        account: dict[str, Any] = {"name": name, "type": "oauth", "accessToken": oauth["accessToken"]}
        if isinstance(oauth.get("refreshToken"), str):
            account["refreshToken"] = oauth["refreshToken"]
        if isinstance(oauth.get("expiresAt"), int) and not isinstance(oauth.get("expiresAt"), bool):
            account["expiresAt"] = oauth["expiresAt"]
        if isinstance(oauth.get("scopes"), list) and all(isinstance(s, str) for s in oauth["scopes"]):
            account["scopes"] = oauth["scopes"]
        tier = _TIERS.get(str(oauth.get("subscriptionType") or "").lower())
        if tier:
            account["tier"] = tier
        add_account(self._path, account)
        self._reload()
        return name

    def remove(self, name: str) -> None:
        if not remove_account(self._path, name):
            raise UnknownAccount(f"no account named {name!r} in {self._path}")
        self._reload()

    def reload(self) -> tuple[list[str], list[str]]:
        return self._reload()

    def set_enabled(self, name: str, enabled: bool) -> None:
        if not set_enabled(self._path, name, enabled):
            raise UnknownAccount(f"no account named {name!r} in {self._path}")
        self._reload()

    def set_priority(self, name: str, priority: int) -> None:
        if not set_priority(self._path, name, priority):
            raise UnknownAccount(f"no account named {name!r} in {self._path}")
        self._reload()


async def _settle(value: Awaitable[T] | T) -> T:
    if isinstance(value, Deferred) or inspect.isawaitable(value):
        return await value  # type: ignore[misc]
    return value  # type: ignore[return-value]


# -- the server ----------------------------------------------------------------


class _QuietAMP(amp.AMP):
    """
    AMP without its info line per connection: every `nextclaude status`
    would otherwise add two lines to the proxy's log.
    """

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ControlServerProtocol(_QuietAMP):
    """
    One console's connection.  Answers the commands against the proxy and,
    once subscribed, pushes events with bounded outstanding pushes.
    """

    _log = Logger()

    def __init__(self, proxy: ControlledProxy, max_outstanding: int = MAX_OUTSTANDING) -> None:
        super().__init__()
        self._proxy = proxy
        self._max_outstanding = max_outstanding
        self._unsubscribe: Callable[[], None] | None = None
        self.outstanding = 0
        # Dropped since the last push that went out, and since the start.
        self.dropped_pending = 0
        self.dropped_total = 0
        self.on_lost: Callable[[ControlServerProtocol], None] | None = None

    @property
    def subscribed(self) -> bool:
        return self._unsubscribe is not None

    # -- commands --

    @Snapshot.responder
    def snapshot(self) -> dict[str, Any]:
        try:
            return {"snapshot": self._proxy.status()}
        except Exception:
            self._log.failure("building the status snapshot failed")
            raise CommandFailed("the proxy could not build its status; see its log")

    @Subscribe.responder
    def subscribe(self) -> dict[str, Any]:
        hub = self._proxy.hub
        # Taken and subscribed in one go: nothing can be emitted in between,
        # so the replay and the pushes neither overlap nor leave a gap.
        replay = [event.to_json() for event in list(hub.recent)]
        if self._unsubscribe is None:
            self._unsubscribe = hub.subscribe(self._on_event)
        return {"replay": replay}

    @Pin.responder
    def pin(self, account: str | None) -> dict[str, Any]:
        try:
            self._proxy.router.pin(account)
        except KeyError:
            raise UnknownAccount(f"no account named {account!r}") from None
        except Exception:
            self._log.failure("pinning {account} failed", account=account)
            raise CommandFailed("the proxy could not change the pin; see its log")
        return {}

    @Stop.responder
    def stop(self) -> dict[str, Any]:
        try:
            return dict(self._proxy.request_stop())
        except Exception:
            self._log.failure("stopping on request failed")
            raise CommandFailed("the proxy could not begin to stop; see its log")

    @AddAccount.responder
    async def add_account(
        self, kind: str, name: str | None, api_key: str | None, credentials_json: str | None
    ) -> dict[str, Any]:
        accounts = self._proxy.accounts
        if kind == "apikey":
            if not name or not api_key:
                raise InvalidAccount("an API-key account needs a name and a key")
            call: Callable[[], Any] = lambda: accounts.add_api_key(name, api_key)
        elif kind == "import":
            if not credentials_json:
                raise InvalidAccount("importing an account needs Claude Code's credentials JSON")
            call = lambda: accounts.import_json(credentials_json, name)
        else:
            raise InvalidAccount(f'the kind of account to add is "apikey" or "import", not {kind!r}')
        added = await self._account_call("adding an account", call)
        return {"name": added}

    @RemoveAccount.responder
    async def remove_account(self, name: str) -> dict[str, Any]:
        await self._account_call(f"removing {name!r}", lambda: self._proxy.accounts.remove(name))
        return {}

    @Reload.responder
    async def reload(self) -> dict[str, Any]:
        added, removed = await self._account_call("reloading the config", self._proxy.accounts.reload)
        return {"added": list(added), "removed": list(removed)}

    @SetAccount.responder
    async def set_account(self, name: str, enabled: bool | None, priority: int | None) -> dict[str, Any]:
        accounts = self._proxy.accounts
        if enabled is not None:
            await self._account_call(
                f"{'enabling' if enabled else 'disabling'} {name!r}", lambda: accounts.set_enabled(name, enabled)
            )
        if priority is not None:
            await self._account_call(f"setting {name!r}'s priority", lambda: accounts.set_priority(name, priority))
        return {}

    async def _account_call(self, doing: str, call: Callable[[], Any]) -> Any:
        try:
            return await _settle(call())
        except (UnknownAccount, InvalidAccount, ConfigUnusable):
            raise
        except KeyError as error:
            name = error.args[0] if error.args else "?"
            raise UnknownAccount(f"no account named {name!r}") from None
        except ValueError as error:
            raise InvalidAccount(str(error)) from None
        except paths.FileProblem as error:
            raise ConfigUnusable(str(error)) from None
        except Exception:
            self._log.failure("{doing} failed", doing=doing)
            raise CommandFailed(f"{doing} failed; see the proxy's log") from None

    # -- pushing --

    def _on_event(self, event: Event) -> None:
        # Called by the hub: nothing may escape, and nothing may wait.
        try:
            if self.outstanding >= self._max_outstanding:
                self.dropped_pending += 1
                self.dropped_total += 1
                return
            pushed = self.callRemote(PushEvent, event=event.to_json(), dropped=self.dropped_pending)
        except Exception:
            self._log.failure("pushing a {kind} event to a console failed", kind=event.kind)
            return
        self.dropped_pending = 0
        self.outstanding += 1
        pushed.addBoth(self._answered)

    def _answered(self, result: object) -> None:
        self.outstanding -= 1
        if isinstance(result, Failure) and not result.check(ConnectionClosed):
            self._log.failure("a console refused a pushed event", result)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost(self)


class ControlFactory(Factory):
    """
    Builds L{ControlServerProtocol}s and keeps track of the live ones.
    """

    noisy = False

    def __init__(self, proxy: ControlledProxy, max_outstanding: int = MAX_OUTSTANDING) -> None:
        self.proxy = proxy
        self.max_outstanding = max_outstanding
        self.connections: set[ControlServerProtocol] = set()

    def buildProtocol(self, addr: Any = None) -> ControlServerProtocol:
        protocol = ControlServerProtocol(self.proxy, self.max_outstanding)
        protocol.factory = self
        protocol.on_lost = self.connections.discard
        self.connections.add(protocol)
        return protocol

    def subscribers(self) -> int:
        return sum(1 for protocol in self.connections if protocol.subscribed)


class ControlService(Service):
    """
    Serves the control commands on a UNIX socket with mode 0600.

    Binding happens in privilegedStartService (like the web listener), after
    checking that no other proxy holds the socket: a live one that answers
    is L{AlreadyRunning}; a leftover socket nobody listens on is removed.
    """

    name = "control"
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        socket_path: Path | str,
        proxy: ControlledProxy,
        max_outstanding: int = MAX_OUTSTANDING,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.socket_path = Path(socket_path)
        self.factory = ControlFactory(proxy, max_outstanding)
        self._probe_timeout = probe_timeout
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        if self.port is None:
            self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self._bind()
        super().startService()

    def _bind(self) -> None:
        path = self.socket_path
        paths.ensure_private_dir(path.parent)
        claim_socket_path(path, self._probe_timeout)
        self.port = self._reactor.listenUNIX(str(path), self.factory, mode=0o600)
        # Twisted chmods before listen(); check anyway, the socket is the
        # key to every account.
        if stat.S_IMODE(os.stat(path).st_mode) != 0o600:
            os.chmod(path, 0o600)

    def stopService(self) -> Deferred[None]:
        """
        Stop listening (which removes the socket file) and hang up on every
        console.  Safe to call when the service never started.
        """
        if self.running:
            super().stopService()
        for protocol in list(self.factory.connections):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        if stopped is None:
            return succeed(None)
        return stopped


# -- the blocking client (start-up check, plain commands) --------------------------


class _Boxes:
    """
    Collects the boxes a BinaryBoxProtocol parses; stands in for its transport.
    """

    disconnecting = False

    def __init__(self) -> None:
        self.boxes: list[amp.AmpBox] = []
        self.broken = False

    def getPeer(self) -> str:
        return "control socket"

    getHost = getPeer

    def loseConnection(self) -> None:
        self.broken = True

    def startReceivingBoxes(self, sender: Any) -> None:
        pass

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self.boxes.append(box)

    def stopReceivingBoxes(self, reason: Any) -> None:
        pass


def _control_error(path: Path, error: OSError, timeout: float, connecting: bool) -> ControlError:
    """
    What an OSError of the blocking client means for the user.  Every one
    becomes a ControlError, so a command shows one line, never a traceback.
    """
    if isinstance(error, socket.timeout):
        return NoAnswer(path, timeout)
    if connecting:
        if isinstance(error, FileNotFoundError):
            return NotRunning(path, missing=True)
        if isinstance(error, ConnectionRefusedError):
            return NotRunning(path, missing=False)
        if isinstance(error, PermissionError):
            return SocketPathProblem(path, "cannot be connected to (permission denied; whose socket is it?)")
        if isinstance(error, BlockingIOError):
            # A UNIX socket's connect() says EAGAIN, at once, when the
            # listener's accept queue is full.
            return NotAccepting(path)
    if isinstance(error, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
        return HungUp(path)
    return SocketError(path, error)


def _ask_blocking(path: Path, command: type[amp.Command], timeout: float) -> dict[str, Any]:
    """
    Send one argument-less command and wait for its answer, without a
    reactor.  Raises the command's declared error or another L{ControlError}
    (L{NotRunning}, L{NoAnswer}, L{NotAccepting}, L{HungUp}, L{BadAnswer},
    L{SocketPathProblem}, L{SocketError}); never a bare OSError.
    """
    connecting = True
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            connecting = False
            box = _exchange(path, sock, command, timeout)
    except OSError as error:
        raise _control_error(path, error, timeout, connecting) from None
    if amp.ANSWER in box:
        try:
            return command.parseResponse(box, None)
        except Exception:
            # A box without the answer's fields, or fields that do not decode.
            raise BadAnswer(path) from None
    if amp.ERROR in box:
        error_type = getattr(command, "reverseErrors", {}).get(box.get(amp.ERROR_CODE), CommandFailed)
        raise error_type(box.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace"))
    raise BadAnswer(path)


def _exchange(path: Path, sock: socket.socket, command: type[amp.Command], timeout: float) -> amp.AmpBox:
    """
    Send C{command} on the connected C{sock} and read boxes until the first
    one arrives, within C{timeout} in all.
    """
    deadline = time.monotonic() + timeout
    sock.sendall(amp.AmpBox({b"_command": command.commandName, b"_ask": b"1"}).serialize())
    boxes = _Boxes()
    parser = amp.BinaryBoxProtocol(boxes)
    parser.makeConnection(boxes)
    while not boxes.boxes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoAnswer(path, timeout)
        sock.settimeout(remaining)
        data = sock.recv(256 * 1024)
        if not data:
            raise HungUp(path)
        parser.dataReceived(data)
        if boxes.broken and not boxes.boxes:
            # The parser gave up on bytes that are not AMP boxes.
            raise BadAnswer(path)
    return boxes.boxes[0]


def read_snapshot(socket_path: Path | str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """
    The running proxy's status snapshot, read with a plain blocking socket
    (for commands that run no reactor: `status`, `env`, `run`).

    @raise NotRunning: nobody listens on the socket.
    @raise NoAnswer: something listens but did not answer in time.
    @raise ControlError: any other failure (L{NotAccepting}, L{HungUp},
        L{BadAnswer}, L{SocketPathProblem}, L{SocketError}); every socket
        error becomes one of these.
    """
    return _ask_blocking(Path(socket_path), Snapshot, timeout)["snapshot"]


def reload_proxy(socket_path: Path | str, timeout: float = CLIENT_TIMEOUT) -> tuple[list[str], list[str]]:
    """
    Ask the running proxy to re-read its accounts now (blocking, for
    commands that just wrote the file); the names (added, removed).

    @raise NotRunning: no proxy listens there (it reads the file when it
        starts).
    @raise ControlError: as L{read_snapshot}, or the reload's own error
        (L{ConfigUnusable} for a file it refused).
    """
    answer = _ask_blocking(Path(socket_path), Reload, timeout)
    return answer["added"], answer["removed"]


def stop_proxy(
    socket_path: Path | str,
    on_answer: Callable[[dict[str, Any]], None],
    timeout: float = CLIENT_TIMEOUT,
    margin: float = 2.0,
) -> dict[str, Any]:
    """
    Ask the proxy on C{socket_path} to stop (L{Stop}), call C{on_answer}
    with its answer, then wait until the proxy closes the connection (its
    control socket closes after the drain), at most the answer's C{bound}
    plus C{margin} seconds.  Blocking; for `nextclaude stop`.

    @raise NotRunning: no proxy listens there.
    @raise StopOverran: it did not stop in time.
    @raise ControlError: as L{read_snapshot}.
    """
    path = Path(socket_path)
    connecting = True
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            connecting = False
            box = _exchange(path, sock, Stop, timeout)
            if amp.ERROR in box:
                raise CommandFailed(box.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace"))
            try:
                answer = Stop.parseResponse(box, None)
            except Exception:
                raise BadAnswer(path) from None
            try:
                on_answer(answer)
            except BrokenPipeError:
                # Nobody reads the command's output (`nextclaude stop | true`):
                # the stop goes on all the same, and is waited for.
                pass
            waited = float(answer["bound"]) + margin
            deadline = time.monotonic() + waited
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StopOverran(path, waited)
                sock.settimeout(remaining)
                try:
                    if not sock.recv(65536):
                        break
                except socket.timeout:
                    raise StopOverran(path, waited) from None
                except (ConnectionResetError, BrokenPipeError):
                    break
    except OSError as error:
        raise _control_error(path, error, timeout, connecting) from None
    return answer


def claim_socket_path(path: Path, timeout: float = PROBE_TIMEOUT) -> None:
    """
    Make C{path} free for a new control socket, or refuse.

    Blocking (it runs before the reactor does).  Nothing there: fine.  A
    socket nobody listens on (a proxy that died): removed.  A proxy that
    answers: L{AlreadyRunning}.  Something that accepts connections but
    does not answer, such as a suspended (Ctrl-Z) or hung proxy, is not
    ours to take over: L{AlreadyRunning} too, saying so.  Anything that is
    not a socket: L{SocketPathProblem}, and it is left alone.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathProblem(
            path, "exists and is not a socket; move it away or set NEXTCLAUDE_SOCKET to another path"
        )
    try:
        _ask_blocking(path, Snapshot, timeout)
    except NotRunning:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except NoAnswer:
        raise AlreadyRunning(
            path,
            f"a process is listening on the control socket {path} but did not answer within {timeout:g}s: "
            "is a NextClaude proxy for this config suspended (Ctrl-Z) or hung? Stop it, or remove the "
            "socket if you are sure nothing uses it",
        ) from None
    except CommandFailed:
        pass  # it answered, even if with an error: it is alive
    except SocketPathProblem:
        raise
    except ControlError as error:
        # Something is there (it accepted, or its queue is full) but it is
        # not a proxy we can talk to: not ours to take over.
        raise AlreadyRunning(
            path, f"{error}; not taking over its socket: stop it, or remove the socket if you are sure nothing uses it"
        ) from None
    raise AlreadyRunning(path)


# -- the Twisted client ----------------------------------------------------------


class _ClientProtocol(_QuietAMP):
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        # Pushes that arrive before the replay has been handed over wait here.
        self._held: list[tuple[dict[str, Any], int]] | None = None
        self.lost = False
        self._lost_waiters: list[Deferred[None]] = []

    @PushEvent.responder
    def push_event(self, event: dict[str, Any], dropped: int | None) -> dict[str, Any]:
        if self._held is not None:
            self._held.append((event, dropped or 0))
        else:
            self._deliver(event, dropped or 0)
        return {}

    def hold(self) -> None:
        self._held = []

    def release(self, replay: list[dict[str, Any]]) -> None:
        held, self._held = self._held or [], None
        for event in replay:
            self._deliver(event, 0)
        for event, dropped in held:
            self._deliver(event, dropped)

    def _deliver(self, event: dict[str, Any], dropped: int) -> None:
        if self.on_event is None:
            return
        try:
            if dropped:
                self.on_event({"kind": EVENTS_DROPPED, "time": event.get("time"), "count": dropped})
            self.on_event(event)
        except Exception:
            # The console's bug; the proxy must still get its answer.
            self._log.failure("the event handler failed on a {kind} event", kind=event.get("kind"))

    def when_lost(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self.lost:
            waiter.callback(None)
        else:
            self._lost_waiters.append(waiter)
        return waiter

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.lost = True
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class ControlClient:
    """
    A connection to the running proxy.  Every command returns a Deferred
    (so it can be awaited, or used with callbacks); a proxy that goes away
    fails it with L{Disconnected}.
    """

    def __init__(self, protocol: _ClientProtocol, socket_path: Path | str) -> None:
        self._protocol = protocol
        self.socket_path = Path(socket_path)

    async def _ask(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        if self._protocol.lost:
            raise Disconnected(self.socket_path)
        try:
            # Awaited at once: AMP drops the connection over an error answer
            # that nobody is waiting for.
            return await self._protocol.callRemote(command, **arguments)
        except ConnectionClosed:
            raise Disconnected(self.socket_path) from None

    async def _value(self, key: str, command: type[amp.Command], **arguments: Any) -> Any:
        return (await self._ask(command, **arguments))[key]

    async def _nothing(self, command: type[amp.Command], **arguments: Any) -> None:
        await self._ask(command, **arguments)

    def snapshot(self) -> Deferred[dict[str, Any]]:
        """The status snapshot (nextclaude.status's schema)."""
        return Deferred.fromCoroutine(self._value("snapshot", Snapshot))

    def subscribe(self, on_event: Callable[[dict[str, Any]], None]) -> Deferred[None]:
        """
        Call C{on_event} with each event as a dict (C{kind}, C{time}, and the
        event's data): first the proxy's recent events, then live ones.  When
        the proxy had to drop events because this client answered too
        slowly, an C{{"kind": "events-dropped", "time": T, "count": N}}
        event comes first.  Fires once the recent events were delivered.
        """
        return Deferred.fromCoroutine(self._subscribe(on_event))

    async def _subscribe(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        protocol = self._protocol
        protocol.on_event = on_event
        protocol.hold()
        try:
            answer = await self._ask(Subscribe)
        except BaseException:
            protocol.release([])
            raise
        protocol.release(answer["replay"])

    def pin(self, name: str | None) -> Deferred[None]:
        """Pin C{name}, or clear the pin with None.  L{UnknownAccount} if there is no such account."""
        return Deferred.fromCoroutine(self._nothing(Pin, account=name))

    def add_api_key(self, name: str, key: str) -> Deferred[str]:
        """Add an API-key account; the name it got.  L{InvalidAccount}, L{ConfigUnusable}."""
        return Deferred.fromCoroutine(self._value("name", AddAccount, kind="apikey", name=name, api_key=key))

    def import_credentials(self, json_text: str, name: str | None = None) -> Deferred[str]:
        """Import Claude Code's credentials JSON; the name the account got."""
        return Deferred.fromCoroutine(
            self._value("name", AddAccount, kind="import", name=name, credentials_json=json_text)
        )

    def remove(self, name: str) -> Deferred[None]:
        """Remove an account.  L{UnknownAccount} if there is no such account."""
        return Deferred.fromCoroutine(self._nothing(RemoveAccount, name=name))

    def reload(self) -> Deferred[tuple[list[str], list[str]]]:
        """Re-read the config file's accounts; the names (added, removed)."""
        return Deferred.fromCoroutine(self._reload())

    def set_enabled(self, name: str, enabled: bool) -> Deferred[None]:
        """Disable or enable an account.  L{UnknownAccount} if there is no such account."""
        return Deferred.fromCoroutine(self._nothing(SetAccount, name=name, enabled=enabled))

    def set_priority(self, name: str, priority: int) -> Deferred[None]:
        """Give an account a priority.  L{UnknownAccount} if there is no such account."""
        return Deferred.fromCoroutine(self._nothing(SetAccount, name=name, priority=priority))

    async def _reload(self) -> tuple[list[str], list[str]]:
        answer = await self._ask(Reload)
        return answer["added"], answer["removed"]

    @property
    def on_disconnect(self) -> Deferred[None]:
        """
        A Deferred that fires (with None) when the connection is gone,
        whoever closed it; at once if it already is.  Each access gives a
        new one, so any number of watchers can each add callbacks.
        """
        return self._protocol.when_lost()

    def close(self) -> Deferred[None]:
        """Hang up; the Deferred fires when the connection is closed."""
        lost = self._protocol.when_lost()
        if not self._protocol.lost and self._protocol.transport is not None:
            self._protocol.transport.loseConnection()
        return lost


async def connect(reactor: Any, socket_path: Path | str, timeout: float = CLIENT_TIMEOUT) -> ControlClient:
    """
    Connect to the proxy serving C{socket_path}.

    @raise NotRunning: there is no socket, or nobody listens on it.
    """
    path = str(socket_path)
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    try:
        protocol = await connectProtocol(endpoint, _ClientProtocol())
    except (ConnectError, ConnectTimeout):
        raise NotRunning(path, missing=not os.path.lexists(path)) from None
    return ControlClient(protocol, path)
