"""An SSH server and client of this package, joined in memory (no sockets).

`SSHPair` builds the real `SSHMuxFactory` and a real `MasterLink` whose
endpoint hands the link's transport to a server transport through
``twisted.test.iosim.FakeTransport`` objects.  `Wire` moves the bytes between
them, and can hold back either direction to play a peer that stalls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.cred import checkers, portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.spread import pb
from twisted.test.iosim import FakeTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.server import MuxServerConnection, MuxServerTransport, SSHMuxFactory
from buildbot_sshmux.wire.channel import FlowLimits
from buildbot_sshmux.wire.keys import generate_ed25519
from buildbot_sshmux.worker.link import HostKeyPins, MasterLink, MuxClientConnection, MuxClientTransport

PB_PORT = 9989
MASTER_ADDRESS = IPv4Address("TCP", "192.0.2.10", 2222)
WORKER_HOST_ADDRESS = IPv4Address("TCP", "198.51.100.7", 40123)

# Made once: key generation is cheap, but fixed keys keep failures readable.
MASTER_KEY = generate_ed25519()
HOST_KEY = generate_ed25519()
OTHER_KEY = generate_ed25519()


class Wire:
    """Moves bytes between two FakeTransports; either direction can be held."""

    def __init__(self, client_io: FakeTransport, server_io: FakeTransport, clock: Clock) -> None:
        self.client_io = client_io
        self.server_io = server_io
        self.clock = clock
        self.hold_to_server = False
        self.hold_to_client = False
        self._to_server: list[bytes] = []
        self._to_client: list[bytes] = []

    def pump(self) -> bool:
        """Move what is waiting once; True if anything moved."""
        self.clock.advance(0)
        out = self.client_io.getOutBuffer()
        if out:
            self._to_server.append(out)
        out = self.server_io.getOutBuffer()
        if out:
            self._to_client.append(out)
        self._drop_to_closed()
        moved = False
        if self._to_server and not self.hold_to_server:
            data, self._to_server = b"".join(self._to_server), []
            self.server_io.bufferReceived(data)
            moved = True
        if self._to_client and not self.hold_to_client:
            data, self._to_client = b"".join(self._to_client), []
            self.client_io.bufferReceived(data)
            moved = True
        return moved or self._disconnect()

    def _drop_to_closed(self) -> None:
        """What reaches a side that closed (nothing here: see ClosingWire)."""

    def _disconnect(self) -> bool:
        # Like iosim.IOPump: a side that asked to disconnect is disconnected
        # once its output has been delivered.
        if self.server_io.disconnecting and not self.server_io.disconnected:
            self.server_io.disconnected = True
            self.client_io.disconnecting = True
            self.client_io.reportDisconnect()
            return True
        if self.client_io.disconnecting and not self.client_io.disconnected:
            self.client_io.disconnected = True
            self.server_io.disconnecting = True
            self.server_io.reportDisconnect()
            return True
        return False

    def flush(self) -> None:
        for _ in range(10_000):
            if not self.pump():
                return
        raise AssertionError("the wire never went quiet")


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Each connect() builds a server transport and joins it with a `Wire`."""

    def __init__(self, server_factory: SSHMuxFactory, clock: Clock) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.wires: list[Wire] = []
        self.servers: list[MuxServerTransport] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        client = factory.buildProtocol(MASTER_ADDRESS)
        server = self.server_factory.buildProtocol(WORKER_HOST_ADDRESS)
        client_io = FakeTransport(
            client, isServer=False, hostAddress=WORKER_HOST_ADDRESS, peerAddress=MASTER_ADDRESS
        )
        server_io = FakeTransport(
            server, isServer=True, hostAddress=MASTER_ADDRESS, peerAddress=WORKER_HOST_ADDRESS
        )
        server.makeConnection(server_io)
        client.makeConnection(client_io)
        self.wires.append(Wire(client_io, server_io, self.clock))
        self.servers.append(server)
        return defer.succeed(client)


def clocked_services(clock: Clock) -> dict[bytes, Any]:
    """The server's services, with userauth's login timeout on ``clock``."""
    auth = type("ClockedUserAuthServer", (userauth.SSHUserAuthServer,), {"clock": clock})
    return {b"ssh-userauth": auth, b"ssh-connection": MuxServerConnection}


class Echo(pb.Avatar):
    """What a worker name logs in to: echoes, and records its calls."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.calls: list[Any] = []

    def perspective_echo(self, value: Any) -> Any:
        self.calls.append(value)
        return value


@implementer(portal.IRealm)
class EchoRealm:
    def __init__(self) -> None:
        self.avatars: list[Echo] = []

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        assert pb.IPerspective in interfaces
        avatar = Echo(avatarId)
        self.avatars.append(avatar)
        return pb.IPerspective, avatar, lambda: None


class RecordingChecker(checkers.InMemoryUsernamePasswordDatabaseDontUse):
    """The master's password checker, remembering who it was asked about."""

    def __init__(self, **users: bytes) -> None:
        super().__init__(**users)
        self.asked: list[bytes] = []

    def requestAvatarId(self, credentials: Any) -> Any:
        self.asked.append(credentials.username)
        return super().requestAvatarId(credentials)


def pb_portal(**users: bytes) -> tuple[portal.Portal, RecordingChecker, EchoRealm]:
    checker = RecordingChecker(**users)
    realm = EchoRealm()
    return portal.Portal(realm, [checker]), checker, realm


class LogCapture:
    """Every log event emitted while attached, with formatted text."""

    def __init__(self, testcase: TestCase) -> None:
        self.events: list[LogEvent] = []
        observer = implementer(ILogObserver)(lambda e: self.events.append(e))  # type: ignore[misc]
        globalLogPublisher.addObserver(observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, observer)

    def texts(self) -> list[str]:
        return [formatEvent(e) or "" for e in self.events]

    def matching(self, *fragments: str) -> list[str]:
        return [t for t in self.texts() if all(f in t for f in fragments)]


class SSHPair:
    """A real SSHMuxFactory and a real MasterLink, joined in memory."""

    def __init__(
        self,
        testcase: TestCase,
        *,
        entries: Iterable[HostEntry] | None = None,
        pb_lookup: Callable[[], tuple[int, portal.Portal, bool]] | None = None,
        identity: keys.Key = HOST_KEY,
        pins: HostKeyPins | None = None,
        server_limits: FlowLimits = FlowLimits(),
        client_limits: FlowLimits = FlowLimits(),
        server_factory: type[SSHMuxFactory] = SSHMuxFactory,
    ) -> None:
        self.clock = Clock()
        self.entry = HostEntry(name="debian-sid", key=HOST_KEY.public(), workers=("*-debian-sid",))
        self.entries = list(entries) if entries is not None else [self.entry]
        self.portal, self.checker, self.realm = pb_portal(
            **{"libxml2-debian-sid": b"pw", "glib-fedora": b"pw"}
        )
        self.pb_lookup_calls = 0

        def default_lookup() -> tuple[int, portal.Portal, bool]:
            self.pb_lookup_calls += 1
            return PB_PORT, self.portal, False

        self.factory = server_factory(
            [MASTER_KEY], lambda: self.entries, pb_lookup or default_lookup, self.clock, server_limits
        )
        self.factory.services = clocked_services(self.clock)
        self.factory.doStart()
        testcase.addCleanup(self.factory.doStop)
        self.endpoint = MemoryEndpoint(self.factory, self.clock)
        if pins is None:
            pins = HostKeyPins.from_config([MASTER_KEY.public().toString("OPENSSH").decode()])
        self.link = MasterLink(
            self.clock,
            "master.example.org",
            2222,
            identity,
            pins,
            limits=client_limits,
            retry_delay=lambda attempt: 5.0,
            endpoint=self.endpoint,
        )
        testcase.addCleanup(self.close)

    @property
    def wire(self) -> Wire:
        return self.endpoint.wires[-1]

    @property
    def server(self) -> MuxServerTransport:
        return self.endpoint.servers[-1]

    @property
    def server_connection(self) -> MuxServerConnection:
        return self.server.service  # type: ignore[return-value]

    def client_transport(self) -> MuxClientTransport:
        return self.link._transport  # type: ignore[return-value]

    def start(self) -> None:
        self.link.startService()
        self.wire.flush()

    def connection(self) -> MuxClientConnection:
        """The authenticated client connection (fails the test if there is none)."""
        d = self.link.when_ready()
        assert d.called, "the link is not connected"
        result: list[MuxClientConnection] = []
        d.addCallback(result.append)
        return result[0]

    def flush(self) -> None:
        self.wire.flush()

    def close(self) -> None:
        if self.link.running:
            d = self.link.stopService()
            if self.endpoint.wires:
                self.wire.hold_to_client = self.wire.hold_to_server = False
                self.wire.flush()
            d.addErrback(lambda _: None)
        # Anything left on the clock (redials, retries) is dropped.
        for call in self.clock.getDelayedCalls():
            call.cancel()


# --- Helpers for the authorization tests (from=, max-channels, live reload) ---


def mux_clocked_services(clock: Clock) -> dict[bytes, Any]:
    """The server's real services, on ``clock``: `MuxUserAuthServer` knows the
    peer's address, so ``from=`` is checked at login (`clocked_services` uses
    Conch's plain userauth, which does not)."""
    from buildbot_sshmux.master.server import MuxUserAuthServer

    auth = type("ClockedMuxUserAuthServer", (MuxUserAuthServer,), {"clock": clock})
    return {b"ssh-userauth": auth, b"ssh-connection": MuxServerConnection}


@implementer(IStreamClientEndpoint)
class AddressedEndpoint(MemoryEndpoint):
    """A `MemoryEndpoint` whose connections come from ``peer`` (any IAddress)."""

    def __init__(self, server_factory: SSHMuxFactory, clock: Clock, peer: Any) -> None:
        super().__init__(server_factory, clock)
        self.peer = peer

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        client = factory.buildProtocol(MASTER_ADDRESS)
        server = self.server_factory.buildProtocol(self.peer)
        client_io = FakeTransport(client, isServer=False, hostAddress=self.peer, peerAddress=MASTER_ADDRESS)
        server_io = FakeTransport(server, isServer=True, hostAddress=MASTER_ADDRESS, peerAddress=self.peer)
        server.makeConnection(server_io)
        client.makeConnection(client_io)
        self.wires.append(Wire(client_io, server_io, self.clock))
        self.servers.append(server)
        return defer.succeed(client)


def connect_from(pair: SSHPair, peer: Any) -> None:
    """Make ``pair``'s link dial from ``peer`` instead of WORKER_HOST_ADDRESS (before start())."""
    pair.endpoint = AddressedEndpoint(pair.factory, pair.clock, peer)
    pair.link.endpoint = pair.endpoint


class ExtraLink:
    """Another worker host's MasterLink to the same server as ``pair``, with its own wire."""

    def __init__(
        self, testcase: TestCase, pair: SSHPair, identity: keys.Key, peer: Any = WORKER_HOST_ADDRESS
    ) -> None:
        self.pair = pair
        self.endpoint = AddressedEndpoint(pair.factory, pair.clock, peer)
        self.link = MasterLink(
            pair.clock,
            "master.example.org",
            2222,
            identity,
            HostKeyPins.from_config([MASTER_KEY.public().toString("OPENSSH").decode()]),
            retry_delay=lambda attempt: 5.0,
            endpoint=self.endpoint,
        )
        testcase.addCleanup(self.close)

    @property
    def wire(self) -> Wire:
        return self.endpoint.wires[-1]

    @property
    def server(self) -> MuxServerTransport:
        return self.endpoint.servers[-1]

    def start(self) -> None:
        self.link.startService()
        self.wire.flush()

    def close(self) -> None:
        if self.link.running:
            d = self.link.stopService()
            if self.endpoint.wires:
                self.wire.flush()
            d.addErrback(lambda _: None)


def flush_all(*wires: Wire) -> None:
    """Pump several wires (sharing a clock) until none of them moves."""
    for _ in range(10_000):
        if not any([wire.pump() for wire in wires]):
            return
    raise AssertionError("the wires never went quiet")


# --- Helpers for the liveness, limits and fuzz tests (test_liveness, test_limits, test_fuzz) ---


def tune(
    pair: SSHPair,
    *,
    liveness: Any = None,
    client_liveness: Any = None,
    limits: Any = None,
    mux_auth: bool = False,
    seed: int = 0,
    closing_wires: bool = True,
) -> SSHPair:
    """Give ``pair``'s server `ServerLimits` / `Liveness` and its link a `Liveness`
    (before start()); ``mux_auth`` runs the real `MuxUserAuthServer` (max_auth_tries);
    ``closing_wires``: the pair's wires are `ClosingWire`s (nothing is delivered
    to a side that closed its transport, as with real sockets)."""
    import random

    from buildbot_sshmux.master.limits import StartupGate

    if liveness is not None:
        pair.factory.liveness = liveness
    if limits is not None:
        pair.factory.limits = limits
        pair.factory.startup_gate = StartupGate(*limits.max_startups, rng=random.Random(seed))
    if client_liveness is not None:
        pair.link.liveness = client_liveness
    if mux_auth:
        pair.factory.services = mux_clocked_services(pair.clock)
    if closing_wires:
        connect = pair.endpoint.connect

        def connect_closing(factory: Any) -> defer.Deferred[Any]:
            d = connect(factory)
            pair.endpoint.wires[-1].__class__ = ClosingWire
            return d

        pair.endpoint.connect = connect_closing  # type: ignore[method-assign]
    return pair


class ClosingWire(Wire):
    """A `Wire` that, like a real TCP transport, stops delivering to a side once
    it called loseConnection/abortConnection (a real socket stops reading)."""

    def _drop_to_closed(self) -> None:
        if self.server_io.disconnecting:
            self._to_server = []
        if self.client_io.disconnecting:
            self._to_client = []

    def _disconnect(self) -> bool:
        for closing, other in ((self.server_io, self.client_io), (self.client_io, self.server_io)):
            if closing.disconnecting and not closing.disconnected:
                closing.disconnected = True
                closing.reportDisconnect()
                if not other.disconnected:
                    other.disconnecting = other.disconnected = True
                    other.reportDisconnect()
                return True
        return False


class ProbeChannel(SSHChannel):
    """A raw client channel that records whether the server opened or refused it."""

    def __init__(self, name: bytes = b"direct-tcpip", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.opened = False
        self.refusals: list[Any] = []

    def channelOpen(self, specificData: bytes) -> None:
        self.opened = True

    def openFailed(self, reason: Any) -> None:
        self.refusals.append(reason)


class RecordingService:
    """Mixin: an SSH service that records every packet instead of acting on it."""

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        self.received.append((messageNum, packet))


def _scripted_auth_class() -> type:
    from twisted.conch.ssh import service
    from twisted.conch.ssh.common import NS

    class ScriptedAuth(RecordingService, service.SSHService):
        """A client ``ssh-userauth`` that sends the requests a test scripts and
        records the replies (FAILURE 51, SUCCESS 52, PK_OK 60...)."""

        name = b"ssh-userauth"

        def __init__(self) -> None:
            RecordingService.__init__(self)
            self.started = False

        def serviceStarted(self) -> None:
            self.started = True

        def request(
            self,
            method: bytes,
            data: bytes = b"",
            user: bytes = b"buildbot-worker",
            next: bytes = b"ssh-connection",
        ) -> None:
            self.transport.sendPacket(userauth.MSG_USERAUTH_REQUEST, NS(user) + NS(next) + NS(method) + data)

        def publickey_query(self, key: keys.Key) -> None:
            """Ask whether ``key`` would do, without a signature (OpenSSH does this first)."""
            self.request(b"publickey", b"\x00" + NS(key.sshType()) + NS(key.public().blob()))

        def publickey_signed(self, key: keys.Key, signer: keys.Key | None = None) -> None:
            """Log in with ``key``, the request signed by ``signer`` (default: ``key``)."""
            user, next = b"buildbot-worker", b"ssh-connection"
            body = (
                NS(user) + NS(next) + NS(b"publickey") + b"\x01" + NS(key.sshType()) + NS(key.public().blob())
            )
            sig_data = NS(self.transport.sessionID) + bytes((userauth.MSG_USERAUTH_REQUEST,)) + body
            signature = (signer or key).sign(sig_data)
            self.transport.sendPacket(userauth.MSG_USERAUTH_REQUEST, body + NS(signature))

        def replies(self, number: int) -> list[bytes]:
            return [p for n, p in self.received if n == number]

    return ScriptedAuth


ScriptedAuth = _scripted_auth_class()


def _raw_client_class() -> type:
    from twisted.conch.ssh import service, transport

    class RecordingConnection(RecordingService, service.SSHService):
        """The client's ``ssh-connection`` once logged in: records, never answers."""

        name = b"ssh-connection"

        def __init__(self) -> None:
            RecordingService.__init__(self)

    class RawSSHClient(transport.SSHClientTransport):
        """A bare Conch client: any host key will do; once secure it requests
        ``ssh-userauth`` (a `ScriptedAuth`), and after a SUCCESS it runs a
        `RecordingConnection`, so a test can send any packet it likes."""

        def __init__(self) -> None:
            self.auth = ScriptedAuth()
            self.conn = RecordingConnection()
            self.secured = False
            self.lost = False

        def verifyHostKey(self, hostKey: bytes, fp: bytes) -> defer.Deferred[bool]:
            return defer.succeed(True)

        def connectionSecure(self) -> None:
            if not self.secured:  # NEWKEYS of a re-key calls this again
                self.secured = True
                self.requestService(self.auth)

        def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
            if messageNum == userauth.MSG_USERAUTH_SUCCESS and self.service is self.auth:
                self.auth.received.append((messageNum, payload))
                self.setService(self.conn)
                return
            super().dispatchMessage(messageNum, payload)

        def connectionLost(self, reason: Any) -> None:
            self.lost = True
            super().connectionLost(reason)

    return RawSSHClient


RawSSHClient = _raw_client_class()


def raw_connect(
    factory: SSHMuxFactory, clock: Clock, peer: Any = WORKER_HOST_ADDRESS, client: Any = None
) -> tuple[Any, MuxServerTransport, ClosingWire]:
    """A `RawSSHClient` (or ``client``) joined to a new server transport of
    ``factory`` by a `ClosingWire`; nothing is pumped yet."""
    client = client if client is not None else RawSSHClient()
    server = factory.buildProtocol(peer)
    client_io = FakeTransport(client, isServer=False, hostAddress=peer, peerAddress=MASTER_ADDRESS)
    server_io = FakeTransport(server, isServer=True, hostAddress=MASTER_ADDRESS, peerAddress=peer)
    server.makeConnection(server_io)
    client.makeConnection(client_io)
    return client, server, ClosingWire(client_io, server_io, clock)


def raw_login(
    factory: SSHMuxFactory, clock: Clock, key: keys.Key = HOST_KEY, peer: Any = WORKER_HOST_ADDRESS
) -> tuple[Any, MuxServerTransport, ClosingWire]:
    """`raw_connect`, then log in with ``key``: the server runs its ssh-connection
    service for the raw client, which records what the server sends."""
    client, server, wire = raw_connect(factory, clock, peer)
    wire.flush()
    assert client.auth.started, "ssh-userauth did not start"
    client.auth.publickey_signed(key)
    wire.flush()
    assert client.service is client.conn, f"the login failed: {client.auth.received}"
    return client, server, wire
