"""The SSH server a Buildbot master embeds: authenticate hosts, bridge PB channels.

Wire code is Conch's; the policy lives in `HostAvatar`: a host's connection may
open only ``direct-tcpip`` channels aimed at the master's PB port on a loopback
name, and each such channel is answered in process by a PB broker built on the
master's own portal.  Nothing here ever opens an outbound socket; every other
channel type, target, global request and channel request is refused and
logged with the host, its key fingerprint and its address.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError, ValidPublicKey
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import factory, forwarding, keys, transport, userauth
from twisted.conch.ssh.connection import (
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    OPEN_RESOURCE_SHORTAGE,
    OPEN_UNKNOWN_CHANNEL_TYPE,
)
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from buildbot_sshmux.authorization import HostPortal
from buildbot_sshmux.authorized_hosts import HostEntry
from buildbot_sshmux.bridge import ChannelAddress, FlowControlledConnection, FlowLimits, ProtocolChannel
from buildbot_sshmux.keys import fingerprint
from buildbot_sshmux.limits import ServerLimits, StartupGate
from buildbot_sshmux.liveness import KEEPALIVE_REQUEST, Keepalive, Liveness, RekeyingTransport
from buildbot_sshmux.sshtransport import (
    SUPPORTED_CIPHERS,
    SUPPORTED_MACS,
    AEADFraming,
    DropMalformed,
    StrictKeyExchange,
    send_without_delay,
)

log = Logger()

_serials = itertools.count()

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """Whether a direct-tcpip target names this machine's loopback."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PBUnavailable(Exception):
    """The master has no PB port to bridge to right now (the text says why)."""


PBLookup = Callable[[], "tuple[int, portal.Portal, bool]"]
"""Return (PB port number, the dispatcher's portal, unsafeTracebacks), or raise PBUnavailable."""


@implementer(ICredentialsChecker)
class AuthorizedHostsChecker:
    """Public-key authentication against the current authorized_hosts entries."""

    credentialInterfaces = (credentials.ISSHPrivateKey,)

    def __init__(self, entries: Callable[[], Iterable[HostEntry]], peer: str | None = None) -> None:
        self._entries = entries
        self._peer = peer

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        where = f" from {self._peer}" if self._peer else ""
        entry = next((e for e in self._entries() if e.key.blob() == creds.blob), None)
        if entry is None:
            try:
                offered = fingerprint(keys.Key.fromString(creds.blob))
            except Exception:
                offered = "an unparsable key"
            log.info(
                "refused key {fingerprint}{where}: not in authorized_hosts",
                fingerprint=offered,
                where=where,
            )
            return defer.fail(error.UnauthorizedLogin())
        if self._peer is not None and not entry.allows_address(self._peer):
            # Logged whether or not the request is signed: a refused query is
            # never followed by a signed request, and OpenSSH signs straight
            # away for a private key file with no .pub beside it.
            log.warn(
                "refused host {host} ({fingerprint}){where}: not in its from= list",
                host=entry.name,
                fingerprint=entry.fingerprint,
                where=where,
            )
            return defer.fail(error.UnauthorizedLogin())
        if creds.signature is None:
            return defer.fail(ValidPublicKey())
        try:
            valid = entry.key.verify(creds.signature, creds.sigData)
        except Exception:
            valid = False
        if not valid:
            log.warn(
                "bad signature for host {host} ({fingerprint})",
                host=entry.name,
                fingerprint=entry.fingerprint,
            )
            return defer.fail(error.UnauthorizedLogin())
        return defer.succeed(entry)


class HostAvatar(ConchUser):
    """A worker host logged in with its key; decides what its channels may be."""

    def __init__(self, entry: HostEntry, server: SSHMuxFactory) -> None:
        super().__init__()
        self.entry = entry
        self.server = server
        self.conn: Any = None

    def describe(self) -> str:
        peer = self.peer_address()
        where = f" from {peer.host}:{peer.port}" if peer is not None else ""
        return f"host {self.entry.name} ({self.entry.fingerprint}){where}"

    def peer_address(self) -> Any:
        tcp = getattr(getattr(self.conn, "transport", None), "transport", None)
        return tcp.getPeer() if tcp is not None else None

    def refuse(self, what: str, code: int) -> ConchError:
        # ``what`` may quote the peer (a target host): keep it one ASCII line,
        # for the log and for Conch, which sends the reason as ASCII.
        what = what.encode("unicode_escape").decode("ascii")
        log.warn("refused {what} for {who}", what=what, who=self.describe())
        return ConchError(f"buildbot-sshmux refuses {what}", code)

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> ProtocolChannel:
        kind = channelType.decode("ascii", "replace")
        if channelType != b"direct-tcpip":
            raise self.refuse(
                f"a {kind!r} channel (only direct-tcpip to the PB port)", OPEN_UNKNOWN_CHANNEL_TYPE
            )
        try:
            (host, port), _origin = forwarding.unpackOpen_direct_tcpip(data)
        except Exception:
            raise self.refuse("a malformed direct-tcpip request", OPEN_CONNECT_FAILED) from None
        try:
            pb_port, pb_portal, unsafe_tracebacks = self.server.pb_lookup()
        except PBUnavailable as e:
            raise self.refuse(f"a channel to {host}:{port} ({e})", OPEN_CONNECT_FAILED) from None
        if port != pb_port or not is_loopback(host):
            raise self.refuse(
                f"a channel to {host}:{port} (only localhost:{pb_port}, the PB port, is allowed)",
                OPEN_ADMINISTRATIVELY_PROHIBITED,
            )
        open_channels = len(self.pb_channels())
        limit = self.entry.max_channels
        if limit is not None and open_channels >= limit:
            raise self.refuse(f"a channel beyond its max-channels={limit}", OPEN_RESOURCE_SHORTAGE)
        if open_channels >= self.server.limits.max_channels:
            raise self.refuse(
                f"a channel beyond max_channels={self.server.limits.max_channels} per connection",
                OPEN_RESOURCE_SHORTAGE,
            )
        peer = self.peer_address()
        address = ChannelAddress(
            "TCP", getattr(peer, "host", "?"), getattr(peer, "port", 0), ssh_host=self.entry.name
        )
        host_portal = HostPortal(pb_portal, self.entry, f"{address.host}:{address.port}")
        pb_factory = pb.PBServerFactory(host_portal, unsafeTracebacks=unsafe_tracebacks)
        protocol = pb_factory.buildProtocol(address)
        local = ChannelAddress("TCP", "127.0.0.1", pb_port, ssh_host=self.entry.name)
        channel = ProtocolChannel(
            protocol,
            peer=address,
            host=local,
            limits=self.server.flow,
            call_soon=lambda f: self.server.reactor.callLater(0, f),
            clock=self.server.reactor.seconds,
            label=f"host {self.entry.name}",
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            avatar=self,
        )
        channel.host_portal = host_portal
        log.debug("PB channel opened for {who}", who=self.describe())
        return channel

    def pb_channels(self) -> list[ProtocolChannel]:
        channels = getattr(self.conn, "channels", {}).values()
        return [c for c in channels if isinstance(c, ProtocolChannel)]

    def update_entry(self, entry: HostEntry) -> None:
        """Apply a reloaded entry: close the sessions it no longer allows."""
        self.entry = entry
        for channel in self.pb_channels():
            host_portal = getattr(channel, "host_portal", None)
            if host_portal is None:
                continue
            host_portal.entry = entry
            worker = host_portal.worker_name
            if worker is not None and not entry.may_attach(worker):
                log.warn(
                    "{who} may no longer attach worker {worker!r} (workers={allowed}); closing its session",
                    who=self.describe(),
                    worker=worker,
                    allowed=",".join(entry.workers),
                )
                channel.loseConnection()

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        if requestType == KEEPALIVE_REQUEST:
            return 1
        self.refuse(f"global request {requestType.decode('ascii', 'replace')!r}", 0)
        return 0

    def logout(self) -> None:
        log.info("{who} disconnected", who=self.describe())


@implementer(portal.IRealm)
class HostRealm:
    """Makes a `HostAvatar` for each authenticated host."""

    def __init__(self, server: SSHMuxFactory) -> None:
        self.server = server

    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH (IConchUser) avatars")
        avatar = HostAvatar(avatarId, self.server)
        return IConchUser, avatar, avatar.logout


class _RefusalsLogged(Logger):
    """Conch logs a refused channel open with a traceback; `HostAvatar.refuse`
    has already said it in one line, so such failures are dropped here."""

    def failure(  # type: ignore[override]
        self, format: str, failure: Failure | None = None, level: LogLevel = LogLevel.critical, **kw: Any
    ) -> None:
        failure = failure if failure is not None else Failure()
        if failure.check(ConchError):
            return
        super().failure(format, failure, level, **kw)


class MuxUserAuthServer(userauth.SSHUserAuthServer):
    """Public-key auth against the current entries, knowing the peer's address."""

    transport: MuxServerTransport

    def serviceStarted(self) -> None:
        super().serviceStarted()
        factory = self.transport.factory
        peer = self.transport.transport.getPeer()
        checker = AuthorizedHostsChecker(factory.entries, getattr(peer, "host", None))
        self.portal = portal.Portal(factory.realm, [checker])
        self.attemptsBeforeDisconnect = factory.limits.max_auth_tries - 1

    def _ebBadAuth(self, reason: Any) -> None:
        super()._ebBadAuth(reason)
        if self.loginAttempts > self.attemptsBeforeDisconnect:
            log.warn(
                "{peer}: {n} failed authentication attempts (max_auth_tries); disconnected",
                peer=self.transport.describe_peer(),
                n=self.loginAttempts,
            )


class MuxServerConnection(FlowControlledConnection):
    """The server's ``ssh-connection`` service, with flow-controlled channels."""

    _log = _RefusalsLogged()
    transport: MuxServerTransport

    def serviceStarted(self) -> None:
        factory = self.transport.factory
        self.limits = factory.flow
        super().serviceStarted()
        avatar = self.transport.avatar
        log.info("{who} connected", who=avatar.describe())
        self.keepalive = Keepalive(self, factory.reactor, factory.liveness, avatar.describe)
        self.keepalive.start()
        factory.enforce_connections_per_host(self.transport)

    def serviceStopped(self) -> None:
        self.keepalive.stop()
        super().serviceStopped()

    # The master never opens a channel, so an answer to one is bogus; Conch
    # would apply it to the open channel of that number and corrupt it.  The
    # transport drops the peer (see MuxServerTransport.dispatchMessage).

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        raise ConchError("CHANNEL_OPEN_CONFIRMATION for a channel the master never opened")

    def ssh_CHANNEL_OPEN_FAILURE(self, packet: bytes) -> None:
        raise ConchError("CHANNEL_OPEN_FAILURE for a channel the master never opened")


class MuxServerTransport(
    DropMalformed, RekeyingTransport, StrictKeyExchange, AEADFraming, transport.SSHServerTransport
):
    """Conch's server transport with sshd's limits, rekeying, AEAD ciphers first and strict key exchange."""

    supportedCiphers = SUPPORTED_CIPHERS
    supportedMACs = SUPPORTED_MACS
    factory: SSHMuxFactory
    avatar: HostAvatar
    transport: Any  # the TCP transport
    _grace_call: Any = None

    @property
    def authenticated(self) -> bool:
        return getattr(self, "avatar", None) is not None

    def describe_peer(self) -> str:
        avatar = getattr(self, "avatar", None)
        if avatar is not None:
            return str(avatar.describe())
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def connectionMade(self) -> None:
        factory = self.factory
        pending = sum(1 for c in factory.connections if not c.authenticated)
        if not factory.startup_gate.admit(pending):
            log.warn(
                "dropped connection from {peer}: {n} connections are not logged in yet"
                " (max_startups={limit})",
                peer=self.describe_peer(),
                n=pending,
                limit=":".join(map(str, factory.limits.max_startups)),
            )
            self.transport.abortConnection()
            return
        factory.connections.add(self)
        send_without_delay(self.transport)
        self.serial = next(_serials)  # connections is a set: this orders them by age
        self.liveness = factory.liveness
        super().connectionMade()
        self.start_rekey_timer(factory.reactor)
        grace = factory.limits.login_grace_time
        if grace > 0:
            self._grace_call = factory.reactor.callLater(grace, self._grace_expired, grace)

    def _grace_expired(self, grace: float) -> None:
        self._grace_call = None
        if not self.authenticated:
            log.warn(
                "{peer} did not log in within {grace:.0f}s (login_grace_time); disconnected",
                peer=self.describe_peer(),
                grace=grace,
            )
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.discard(self)
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self.stop_rekey_timer()
        super().connectionLost(reason)


class SSHMuxFactory(factory.SSHFactory):
    """The SSH server: host keys, public-key auth per host, PB channels only."""

    protocol = MuxServerTransport
    services = {
        b"ssh-userauth": MuxUserAuthServer,
        b"ssh-connection": MuxServerConnection,
    }

    def __init__(
        self,
        host_keys: Sequence[keys.Key],
        entries: Callable[[], Iterable[HostEntry]],
        pb_lookup: PBLookup,
        reactor: IReactorTime,
        flow: FlowLimits = FlowLimits(),
        limits: ServerLimits = ServerLimits(),
        liveness: Liveness = Liveness(),
    ) -> None:
        self.host_keys = list(host_keys)
        self.pb_lookup = pb_lookup
        self.reactor = reactor
        self.flow = flow
        self.limits = limits
        self.liveness = liveness
        self.startup_gate = StartupGate(*limits.max_startups)
        self.entries = entries
        self.connections: set[MuxServerTransport] = set()
        self.realm = HostRealm(self)
        self.portal = portal.Portal(self.realm, [AuthorizedHostsChecker(entries)])

    def getPublicKeys(self) -> dict[bytes, keys.Key]:
        return {key.sshType(): key.public() for key in self.host_keys}

    def getPrivateKeys(self) -> dict[bytes, keys.Key]:
        return {key.sshType(): key for key in self.host_keys}

    def getPrimes(self) -> None:
        return None

    def disconnect_all(self) -> None:
        for conn in list(self.connections):
            conn.loseConnection()

    def enforce_connections_per_host(self, newest: MuxServerTransport) -> None:
        """Close a host key's oldest connections beyond max_connections_per_host."""
        blob = newest.avatar.entry.key.blob()
        same = sorted(
            (c for c in self.connections
             if c is not newest and c.authenticated and c.avatar.entry.key.blob() == blob),
            key=lambda c: c.serial,
        )  # fmt: skip
        excess = len(same) + 1 - self.limits.max_connections_per_host
        for old in same[: max(0, excess)]:
            log.warn(
                "{who} connected again; closing its older connection from {old}"
                " (max_connections_per_host={limit})",
                who=newest.avatar.describe(),
                old=old.describe_peer(),
                limit=self.limits.max_connections_per_host,
            )
            old.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"replaced by a newer connection")

    def apply_entries(self) -> None:
        """Re-check every logged-in host against the current entries.

        A host whose key was removed, or whose address ``from=`` no longer
        allows, is disconnected; a host whose ``workers=`` narrowed loses
        the sessions it may no longer run.  Other hosts are untouched.
        """
        by_key = {entry.key.blob(): entry for entry in self.entries()}
        for conn in list(self.connections):
            avatar = getattr(conn, "avatar", None)
            if not isinstance(avatar, HostAvatar):
                continue
            entry = by_key.get(avatar.entry.key.blob())
            peer = avatar.peer_address()
            if entry is None or (peer is not None and not entry.allows_address(peer.host)):
                log.warn("{who} is no longer authorized; disconnecting it", who=avatar.describe())
                conn.sendDisconnect(
                    transport.DISCONNECT_BY_APPLICATION, b"this host's key is no longer authorized"
                )
            elif entry != avatar.entry:
                avatar.update_entry(entry)
