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
from twisted.conch.error import ConchError, IgnoreAuthentication, ValidPublicKey
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import factory, forwarding, keys, transport, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import (
    MSG_CHANNEL_DATA,
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    OPEN_RESOURCE_SHORTAGE,
    OPEN_UNKNOWN_CHANNEL_TYPE,
)
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from buildbot_sshmux.master import certauth, hostcerts
from buildbot_sshmux.master.authorization import WorkerLogin
from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.limits import (
    MAX_KEY_BLOB,
    MAX_NAME,
    MAX_SIGNATURE,
    MAX_USER_NAME,
    PREAUTH_MAX_PACKET,
    ServerLimits,
    StartupGate,
)
from buildbot_sshmux.master.pbinput import PBChannel, PBInputLimits
from buildbot_sshmux.master.stats import ServerStats
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.channel import ChannelAddress, FlowControlledConnection, FlowLimits, ProtocolChannel
from buildbot_sshmux.wire.keys import fingerprint
from buildbot_sshmux.wire.liveness import DRAINING_REQUEST, KEEPALIVE_REQUEST, Keepalive, Liveness
from buildbot_sshmux.wire.peerlog import PeerLogs, quote
from buildbot_sshmux.wire.transport import (
    MAX_PACKET_LENGTH,
    SHUTDOWN_REASON,
    BoundedLogger,
    MuxTransport,
    send_without_delay,
)

log = Logger()

_serials = itertools.count()

# User-key signature algorithms the master accepts (no SHA-1 ssh-rsa).
USER_SIGNATURE_ALGORITHMS = (
    b"ssh-ed25519",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
    b"rsa-sha2-512",
    b"rsa-sha2-256",
)

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


REFUSED_WORKERS_SHOWN_FOR = 3600.0
"""Seconds a refused worker name stays in a host's sessions (unless it attaches)."""

PBLookup = Callable[[], "tuple[int, portal.Portal, bool]"]
"""Return (PB port number, the dispatcher's portal, unsafeTracebacks), or raise PBUnavailable."""


@implementer(ICredentialsChecker)
class AuthorizedHostsChecker:
    """Public-key authentication against the current authorized_hosts entries."""

    credentialInterfaces = (credentials.ISSHPrivateKey,)

    def __init__(
        self,
        entries: Callable[[], Iterable[HostEntry]],
        peer: str | None = None,
        on_refused: Callable[[str, str | None], object] | None = None,
        authority: certauth.CertificateAuthority | None = None,
    ) -> None:
        self._entries = entries
        self._peer = peer
        self._on_refused = on_refused  # (reason, host name or None): ServerStats.refused
        self._authority = authority

    def _refused(self, reason: str, entry: HostEntry | None) -> defer.Deferred[Any]:
        if self._on_refused is not None:
            self._on_refused(reason, entry.name if entry is not None else None)
        return defer.fail(error.UnauthorizedLogin())

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        if certs.is_certificate(creds.blob):  # master/certauth.py decides
            if self._authority is None:
                return defer.fail(error.UnauthorizedLogin())
            return self._authority.check(creds, self._peer)
        where = f" from {self._peer}" if self._peer else ""
        entry = next(
            (e for e in self._entries() if e.key.blob() == creds.blob and not e.cert_authority), None
        )
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
            return self._refused("unknown_key", None)
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
            return self._refused("address_not_allowed", entry)
        algorithm = creds.algName
        if algorithm not in signature_algorithms(entry.key):
            # ssh-rsa signs with SHA-1: OpenSSH refuses it by default since 8.8.
            log.warn(
                "refused host {host} ({fingerprint}){where}: signature algorithm {algorithm!r} {why}",
                host=entry.name,
                fingerprint=entry.fingerprint,
                where=where,
                algorithm=quote(algorithm),
                why="(SHA-1) is not accepted; use rsa-sha2-256 or rsa-sha2-512"
                if algorithm == b"ssh-rsa"
                else f"does not sign with a {entry.key.sshType().decode()} key",
            )
            return self._refused("signature_algorithm", entry)
        if creds.signature is None:
            return defer.fail(ValidPublicKey())
        try:
            # The signature blob names its algorithm too: it must be the one asked for.
            valid = getNS(creds.signature)[0] == algorithm and entry.key.verify(
                creds.signature, creds.sigData
            )
        except Exception:
            valid = False
        if not valid:
            log.warn(
                "bad signature for host {host} ({fingerprint}){where}",
                host=entry.name,
                fingerprint=entry.fingerprint,
                where=where,
            )
            return self._refused("bad_signature", entry)
        return defer.succeed(entry)


def signature_algorithms(key: keys.Key) -> tuple[bytes, ...]:
    """The user-key signature algorithms accepted with ``key``: SHA-2 only for RSA."""
    if key.sshType() == b"ssh-rsa":
        return (b"rsa-sha2-512", b"rsa-sha2-256")
    return (key.sshType(),)


class HostAvatar(ConchUser):
    """A worker host logged in with its key; decides what its channels may be."""

    max_refused_workers = 64

    def __init__(self, entry: HostEntry, server: SSHMuxFactory) -> None:
        super().__init__()
        self.entry = entry
        self.server = server
        self.conn: Any = None
        # Worker names whose PB login was refused on this connection: name ->
        # (reason, when), the latest last, at most max_refused_workers.
        self.refused_workers: dict[str, tuple[str, float]] = {}

    def describe(self) -> str:
        peer = self.peer_address()
        where = f" from {peer.host}:{peer.port}" if peer is not None else ""
        return f"host {self.entry.name} ({self.entry.fingerprint}){where}"

    def peer_address(self) -> Any:
        tcp = getattr(getattr(self.conn, "transport", None), "transport", None)
        return tcp.getPeer() if tcp is not None else None

    def refuse(self, what: str, code: int, reason: str) -> ConchError:
        """Log and count (``reason``, of `stats.REASONS`) a refused channel or request."""
        self.server.stats.refused(reason, self.entry.name)
        # ``what`` may quote the peer (a target host): keep it one short ASCII
        # line, for the log and for the reply (nothing the peer made large is echoed).
        what = quote(what, 200)
        peer_log = getattr(getattr(self.conn, "transport", None), "peer_log", None)
        (peer_log or log).warn("refused {what} for {who}", what=what, who=self.describe())
        return ConchError(f"buildbot-sshmux refuses {what}", code)

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> ProtocolChannel:
        kind = channelType.decode("ascii", "replace")
        if channelType != b"direct-tcpip":
            raise self.refuse(
                f"a {kind!r} channel (only direct-tcpip to the PB port)",
                OPEN_UNKNOWN_CHANNEL_TYPE,
                "channel_type",
            )
        try:
            (host, port), _origin = forwarding.unpackOpen_direct_tcpip(data)
        except Exception:
            raise self.refuse(
                "a malformed direct-tcpip request", OPEN_CONNECT_FAILED, "malformed_request"
            ) from None
        try:
            pb_port, pb_portal, unsafe_tracebacks = self.server.pb_lookup()
        except PBUnavailable as e:
            raise self.refuse(
                f"a channel to {host}:{port} ({e})", OPEN_CONNECT_FAILED, "pb_unavailable"
            ) from None
        if port != pb_port or not is_loopback(host):
            raise self.refuse(
                f"a channel to {host}:{port} (only localhost:{pb_port}, the PB port, is allowed)",
                OPEN_ADMINISTRATIVELY_PROHIBITED,
                "target",
            )
        open_channels = len(self.pb_channels())
        limit = self.entry.max_channels
        if limit is not None and open_channels >= limit:
            raise self.refuse(
                f"a channel beyond its max-channels={limit}", OPEN_RESOURCE_SHORTAGE, "host_max_channels"
            )
        if open_channels >= self.server.limits.max_channels:
            raise self.refuse(
                f"a channel beyond max_channels={self.server.limits.max_channels} per connection",
                OPEN_RESOURCE_SHORTAGE,
                "max_channels",
            )
        peer = self.peer_address()
        address = ChannelAddress(
            "TCP", getattr(peer, "host", "?"), getattr(peer, "port", 0), ssh_host=self.entry.name
        )
        login = WorkerLogin(
            pb_portal, self.entry, f"{address.host}:{address.port}", on_refused=self.login_refused
        )
        login.on_attached = self.server.on_worker_attached
        pb_factory = pb.PBServerFactory(login.portal, unsafeTracebacks=unsafe_tracebacks)
        protocol = pb_factory.buildProtocol(address)
        local = ChannelAddress("TCP", "127.0.0.1", pb_port, ssh_host=self.entry.name)
        channel = PBChannel(
            protocol,
            login=login,
            input_limits=self.server.pb_input,
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
        log.debug("PB channel opened for {who}", who=self.describe())
        return channel

    def login_refused(self, worker: str | None, reason: str) -> None:
        """A PB login on one of this host's channels was refused (``reason``, of `stats.REASONS`)."""
        self.server.stats.refused(reason, self.entry.name)
        if worker is not None:
            self.refused_workers.pop(worker, None)
            self.refused_workers[worker] = (reason, self.server.reactor.seconds())
            while len(self.refused_workers) > self.max_refused_workers:
                del self.refused_workers[next(iter(self.refused_workers))]

    def sessions(self) -> list[dict[str, Any]]:
        """Each PB channel's session, then the worker names refused lately and not attached now.

        ``{"worker": name or None, "state": "attached" | "logging in" | "refused",
        "reason": a refusal reason or None, "ago_s": seconds since the refusal or None}``.
        """
        now = self.server.reactor.seconds()
        result = self.open_sessions()
        named = {s["worker"] for s in result}
        for worker, (reason, when) in self.refused_workers.items():
            if worker not in named and now - when <= REFUSED_WORKERS_SHOWN_FOR:
                result.append(
                    {"worker": worker, "state": "refused", "reason": reason, "ago_s": round(now - when, 1)}
                )
        order = {"attached": 0, "logging in": 1, "refused": 2}
        return sorted(result, key=lambda s: (order[s["state"]], s["worker"] or ""))

    def open_sessions(self) -> list[dict[str, Any]]:
        """The session of each open PB channel (as in `sessions`)."""
        now = self.server.reactor.seconds()
        result = []
        for channel in self.pb_channels():
            login = getattr(channel, "login", None)
            if login is None:
                continue
            if login.worker_name is not None:
                state, worker, reason = "attached", login.worker_name, None
            elif login.refused is not None:
                state, (worker, reason) = "refused", login.refused
            else:
                state, worker, reason = "logging in", None, None
            refused_at = self.refused_workers.get(worker or "", (None, None))[1] if reason else None
            result.append(
                {
                    "worker": worker,
                    "state": state,
                    "reason": reason,
                    "ago_s": None if refused_at is None else round(now - refused_at, 1),
                }
            )
        return result

    def pb_channels(self) -> list[ProtocolChannel]:
        channels = getattr(self.conn, "channels", {}).values()
        return [c for c in channels if isinstance(c, ProtocolChannel)]

    def update_entry(self, entry: HostEntry) -> None:
        """Apply a reloaded entry: close the sessions it no longer allows."""
        self.entry = entry
        for channel in self.pb_channels():
            login = getattr(channel, "login", None)
            if login is None:
                continue
            login.entry = entry
            worker = login.worker_name
            if worker is not None and not entry.may_attach(worker):
                log.warn(
                    "{who} may no longer attach worker {worker!r} (workers={allowed}); closing its session",
                    who=self.describe(),
                    worker=worker,
                    allowed=entry.workers_text,
                )
                channel.loseConnection()

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        if requestType == KEEPALIVE_REQUEST:
            return 1
        self.refuse(f"global request {requestType.decode('ascii', 'replace')!r}", 0, "global_request")
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


class _RefusalsLogged(BoundedLogger):
    """Conch logs a refused channel open with a traceback; `HostAvatar.refuse`
    has already said it in one line, so such failures are dropped here."""

    def failure(  # type: ignore[override]
        self, format: str, failure: Failure | None = None, level: LogLevel = LogLevel.critical, **kw: Any
    ) -> None:
        failure = failure if failure is not None else Failure()
        if failure.check(ConchError):
            return
        super().failure(format, failure, level, **kw)


class DuplicateConnection(Exception):
    """A host key logged in again while its live connection answers keepalives."""

    def __init__(self, live: MuxServerTransport, limit: int, now: float) -> None:
        self.live = live
        peer = live.transport.getPeer()
        age = now - live.connected_at
        super().__init__(
            f"too many connections: host {live.avatar.entry.name} is connected from"
            f" {getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')} for {age:.0f}s and answers"
            f" keepalives (max_connections_per_host={limit})"
        )


class MuxUserAuthServer(userauth.SSHUserAuthServer):
    """Public-key authentication against the current entries, sshd-strict.

    Every request counts towards ``max_auth_tries`` (the first ``none`` only
    excepted, as OpenSSH), queries included; names, keys and signatures have
    fixed maximum sizes; nothing the peer sent is logged at length.  A host
    key that is connected already is arbitrated (`SSHMuxFactory.arbitrate`)
    before the login succeeds.
    """

    _log = BoundedLogger()
    transport: MuxServerTransport

    def serviceStarted(self) -> None:
        super().serviceStarted()
        factory = self.transport.factory
        checker = AuthorizedHostsChecker(
            factory.entries, self.transport.source, factory.stats.refused, factory.authority
        )
        self.portal = portal.Portal(factory.realm, [checker])
        self.supportedAuthentications = [b"publickey"]
        self.max_tries = factory.limits.max_auth_tries
        self._none_seen = False
        self._stopped = False

    def serviceStopped(self) -> None:
        self._stopped = True
        super().serviceStopped()

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        if messageNum == userauth.MSG_USERAUTH_REQUEST:
            self.ssh_USERAUTH_REQUEST(packet)
            return
        # Anything else before login is a failed attempt.
        self.transport.peer_log.info(
            "{peer}: unexpected SSH message {number} ({size} bytes) before login",
            peer=self.transport.describe_peer(),
            number=messageNum,
            size=len(packet),
        )
        self.transport.sendUnimplemented()
        self._count_attempt()

    def _count_attempt(self) -> bool:
        """Count one attempt; past max_auth_tries cut the peer off (False)."""
        if self.loginAttempts >= self.max_tries:
            self._cut()
            return False
        self.loginAttempts += 1
        return True

    def _cut(self) -> None:
        self.transport.sendDisconnect(
            transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
            b"too many authentication failures",
            why=f"{self.loginAttempts} failed authentication attempts (max_auth_tries)",
        )

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:  # type: ignore[override]
        user, next_service, method, rest = getNS(packet, 3)
        if len(user) > MAX_USER_NAME or len(next_service) > MAX_NAME or len(method) > MAX_NAME:
            self.transport.drop(
                f"an authentication request with a user name of {len(user)} bytes or a method or"
                f" service name of more than {MAX_NAME}",
                b"oversized authentication request",
            )
            return None
        if method == b"none" and not self._none_seen:
            self._none_seen = True  # a client's first request asks which methods exist
        elif not self._count_attempt():
            return None
        self.user, self.nextService, self.method = user, next_service, method
        if method == b"publickey":
            d = self.auth_publickey(rest)
        else:
            if method != b"none":
                self.transport.factory.stats.refused("auth_method")
                self.transport.peer_log.info(
                    "{peer}: refused {method!r} authentication (only publickey)",
                    peer=self.transport.describe_peer(),
                    method=quote(method),
                )
            d = defer.fail(error.UnauthorizedLogin())
        d.addCallback(self._arbitrate)
        d.addCallback(self._cbFinishedAuth)
        d.addErrback(self._ebBadAuth)
        return d

    def auth_publickey(self, packet: bytes) -> defer.Deferred[Any]:
        has_signature = packet[:1] != b"\x00"
        algorithm, blob, rest = getNS(packet[1:], 2)
        signature = getNS(rest)[0] if has_signature else b""
        trailing = not has_signature and rest
        if (
            len(algorithm) > MAX_NAME
            or len(blob) > MAX_KEY_BLOB
            or len(signature) > MAX_SIGNATURE
            or trailing
        ):
            self.transport.drop(
                "a publickey request with an oversized algorithm, key or signature",
                b"oversized authentication request",
            )
            return defer.fail(IgnoreAuthentication())
        if certs.is_certificate(blob):  # which Conch's auth_publickey cannot parse
            return certauth.certificate_publickey(self, packet)
        try:
            keys.Key.fromString(blob)
        except Exception:
            self.transport.factory.stats.refused("unparsable_key")
            self.transport.peer_log.info(
                "{peer}: refused a key of type {algorithm!r} that cannot be parsed",
                peer=self.transport.describe_peer(),
                algorithm=quote(algorithm),
            )
            return defer.fail(error.UnauthorizedLogin())
        return super().auth_publickey(packet)  # type: ignore[no-any-return]

    def _arbitrate(self, result: Any) -> Any:
        _interface, avatar, _logout = result
        d = self.transport.factory.arbitrate(self.transport, avatar.entry)
        return d.addCallback(lambda _: result)

    def _cbFinishedAuth(self, result: Any) -> None:
        if self._stopped:  # the peer left while its login was arbitrated
            return
        super()._cbFinishedAuth(result)

    def _ebBadAuth(self, reason: Any) -> None:
        if self._stopped or reason.check(IgnoreAuthentication):
            return
        if reason.check(DuplicateConnection):
            self.transport.factory.stats.refused("duplicate_connection", reason.value.live.avatar.entry.name)
            self.transport.sendDisconnect(
                transport.DISCONNECT_TOO_MANY_CONNECTIONS,
                str(reason.value).encode("ascii", "replace"),
                why=f"refused a second connection of host {reason.value.live.avatar.entry.name}"
                f" ({reason.value.live.avatar.entry.fingerprint}): {reason.value}",
            )
            return
        if not reason.check(UnauthorizedLogin, ConchError):
            log.failure("checking the authentication of {peer}", reason, peer=self.transport.describe_peer())
        if self.loginAttempts >= self.max_tries:
            self._cut()
            return
        self.transport.sendPacket(
            userauth.MSG_USERAUTH_FAILURE, NS(b",".join(self.supportedAuthentications)) + b"\x00"
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
        self.transport.logged_in_at = factory.reactor.seconds()
        log.info("{who} connected", who=avatar.describe())
        self.keepalive = Keepalive(
            self, factory.reactor, factory.liveness, avatar.describe, factory.stats.round_trips.observe
        )
        self.keepalive.start()
        if factory.draining:
            self.announce_draining()

    def announce_draining(self) -> None:
        """Tell the host this master is about to stop (a launcher moves its sessions)."""
        self.sendGlobalRequest(DRAINING_REQUEST, b"", wantReply=0)

    def serviceStopped(self) -> None:
        self.keepalive.stop()
        super().serviceStopped()

    def unknown_message(self, messageNum: int, packet: bytes) -> None:
        self.transport.peer_log.info(
            "{who}: unknown SSH message {number} ({size} bytes) ignored",
            who=self.transport.describe_peer(),
            number=messageNum,
            size=len(packet),
        )
        self.transport.sendUnimplemented()

    def too_much_data(self, channel: Any, n: int) -> None:
        self.transport.peer_log.warn(
            "{who}: {n} bytes of data on channel {id} exceed its window or packet size; channel closed",
            who=self.transport.describe_peer(),
            n=n,
            id=channel.id,
        )

    # The master never opens a channel, so an answer to one is bogus; Conch
    # would apply it to the open channel of that number and corrupt it.  The
    # transport drops the peer (see MuxServerTransport.dispatchMessage).

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet: bytes) -> None:
        raise ConchError("CHANNEL_OPEN_CONFIRMATION for a channel the master never opened")

    def ssh_CHANNEL_OPEN_FAILURE(self, packet: bytes) -> None:
        raise ConchError("CHANNEL_OPEN_FAILURE for a channel the master never opened")


@implementer(IPushProducer)
class MuxServerTransport(MuxTransport, transport.SSHServerTransport):
    """Conch's server transport with sshd's limits, rekeying, AEAD ciphers first and strict key exchange.

    It is the producer of its TCP socket, so it knows when the peer is not
    reading: SSH messages written meanwhile, and those Conch queues during a
    key exchange, count as its backlog (``max_backlog``).  Before login it
    also stops reading a peer that does not read, and its packets may be
    ``PREAUTH_MAX_PACKET`` long at most.
    """

    factory: SSHMuxFactory
    avatar: HostAvatar
    transport: Any  # the TCP transport
    produces_for_tcp = True  # so its connection service does not register as producer too
    _grace_call: Any = None
    source = "?"
    connected_at = 0.0
    logged_in_at: float | None = None
    replaced = False  # a newer connection of its host key is taking over
    _link_paused = False
    _reading_paused = False
    _kex_queued = 0  # bytes Conch holds until the key exchange ends
    _written_while_paused = 0  # bytes written since the socket last had room

    @property
    def authenticated(self) -> bool:
        return getattr(self, "avatar", None) is not None

    @property
    def backlog(self) -> int:
        """Bytes of SSH messages held for a peer that is not taking them."""
        return self._kex_queued + self._written_while_paused

    @property
    def held(self) -> int:
        """What this connection makes the master hold outside channels: input not yet parsed, backlog."""
        return len(self.buf) + self.backlog

    def describe_peer(self) -> str:
        avatar = getattr(self, "avatar", None)
        if avatar is not None:
            return str(avatar.describe())
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def status(self) -> dict[str, Any]:
        """This logged-in connection, for `SSHMuxService.status` (see its docstring)."""
        now = self.factory.reactor.seconds()
        entry = self.avatar.entry
        peer = self.transport.getPeer()
        ciphers = self.currentEncryptions  # a documented @ivar of Conch's transport (SSHCiphers)
        keepalive = getattr(self.service, "keepalive", None)
        since = self.logged_in_at if self.logged_in_at is not None else self.connected_at
        last_rekey = self.last_key_exchange if self.rekeys_completed else None

        def name(value: Any) -> str | None:
            return None if value is None else quote(value, 64)

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 1)

        return {
            "name": entry.name,
            "fingerprint": entry.fingerprint,
            "address": f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            "connected_since": since,
            "connected_for_s": round(now - since, 1),
            "client_version": name(getattr(self, "otherVersionString", None)),
            "kex": name(getattr(self, "kexAlg", None)),
            "host_key_algorithm": name(getattr(self, "keyAlg", None)),
            "cipher": {"in": name(ciphers.inCipType), "out": name(ciphers.outCipType)},
            "mac": {"in": name(ciphers.inMACType), "out": name(ciphers.outMACType)},
            "sessions": self.avatar.sessions(),
            "bytes": {"received": self.bytes_received, "sent": self.bytes_sent},
            "backlog_bytes": self.backlog,
            "keepalive_rtt_ms": {
                "last": ms(keepalive.last_round_trip) if keepalive is not None else None,
                "median": ms(keepalive.median_round_trip) if keepalive is not None else None,
            },
            "rekeys": self.rekeys_completed,
            "last_rekey_ago_s": None if last_rekey is None else round(now - last_rekey, 1),
            "refusals_last_hour": self.factory.stats.recent_refusals(entry.name),
            "replaced": self.replaced,
        }

    def describe_peer_with(self, entry: HostEntry) -> str:
        """The peer, named by the host entry it is logging in as."""
        return f"host {entry.name} ({entry.fingerprint}) from {self.describe_peer()}"

    def drop(self, why: str, reason: bytes, code: int = transport.DISCONNECT_PROTOCOL_ERROR) -> None:
        """Disconnect the peer, with one (rate-limited) log line saying why."""
        self.sendDisconnect(code, reason, why=why)

    def incoming_packet_limit(self) -> int:
        return MAX_PACKET_LENGTH if self.authenticated else PREAUTH_MAX_PACKET

    def connectionMade(self) -> None:
        factory = self.factory
        self.source = str(getattr(self.transport.getPeer(), "host", "?"))
        self.peer_log = factory.peer_logs(self.source)  # what it was refused
        self.drop_log = factory.drop_logs(self.source)  # why it was dropped: not crowded out by the above
        pending = [c for c in factory.connections if not c.authenticated]
        same_source = sum(1 for c in pending if c.source == self.source)
        if same_source >= factory.limits.max_startups_per_source:
            self.drop_log.warn(
                "dropped connection from {peer}: {n} connections from this address are not logged in yet"
                " (max_startups_per_source)",
                peer=self.describe_peer(),
                n=same_source,
            )
            self.transport.abortConnection()
            return
        # A source with nothing pending is let in until max_startups is full:
        # one address's idle connections must not make the others' a lottery.
        first_from_source = same_source == 0 and len(pending) < factory.startup_gate.full
        if not first_from_source and not factory.startup_gate.admit(len(pending)):
            self.drop_log.warn(
                "dropped connection from {peer}: {n} connections are not logged in yet"
                " (max_startups={limit})",
                peer=self.describe_peer(),
                n=len(pending),
                limit=":".join(map(str, factory.limits.max_startups)),
            )
            self.transport.abortConnection()
            return
        factory.connections.add(self)
        self.connected_at = factory.reactor.seconds()
        send_without_delay(self.transport)
        self.transport.registerProducer(self, True)
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
            self._disconnect_logged = True
            self.drop_log.warn(
                "{peer} did not log in within {grace:.0f}s (login_grace_time); disconnected",
                peer=self.describe_peer(),
                grace=grace,
            )
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.discard(self)
        self.factory.stats.connection_closed(self)
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self.stop_rekey_timer()
        super().connectionLost(reason)
        self.peer_log.close(self.describe_peer())
        self.drop_log.close(self.describe_peer())

    # Input

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting:
            return  # once dropping it, read nothing more (as a socket would)
        super().dataReceived(data)
        if not self.authenticated and not self.transport.disconnecting:
            total = sum(c.held for c in self.factory.connections if not c.authenticated)
            if total > self.factory.limits.max_unauthenticated_memory:
                self.drop(
                    f"connections not logged in hold {total} bytes"
                    f" (max_unauthenticated_memory={self.factory.limits.max_unauthenticated_memory})",
                    b"too much data before login",
                    transport.DISCONNECT_TOO_MANY_CONNECTIONS,
                )

    def ssh_SERVICE_REQUEST(self, packet: bytes) -> None:
        name = getNS(packet)[0]
        if name not in self.factory.services or (name != b"ssh-userauth" and not self.authenticated):
            self.drop(
                f"refused service {quote(name)!r}",
                b"no such service",
                transport.DISCONNECT_SERVICE_NOT_AVAILABLE,
            )
            return
        super().ssh_SERVICE_REQUEST(packet)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.peer_log.info(
            "{peer} disconnected with code {code}: {description}",
            peer=self.describe_peer(),
            code=reasonCode,
            description=quote(description),
        )

    def sendExtInfo(self, extensions: Any) -> None:
        # Conch names our host key algorithms as server-sig-algs; clients read
        # it as the user-key signatures we accept (no SHA-1 ssh-rsa).
        super().sendExtInfo([(b"server-sig-algs", b",".join(USER_SIGNATURE_ALGORITHMS))])

    # Output: the backlog

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        queued = (
            self._keyExchangeState != self._KEY_EXCHANGE_NONE
            and not self._allowedKeyExchangeMessageType(messageType)
        )
        if queued or (self._link_paused and messageType != MSG_CHANNEL_DATA):
            size = len(payload) + 64  # a packet's framing, and Python's list entry
            if queued:
                self._kex_queued += size
            else:
                self._written_while_paused += size
            if self.backlog > self.factory.limits.max_backlog and not self.transport.disconnecting:
                self._disconnect_logged = True
                self.drop_log.warn(
                    "{peer} is not taking what it is sent ({n} bytes of SSH messages held{during},"
                    " max_backlog={limit}); disconnected",
                    peer=self.describe_peer(),
                    n=self.backlog,
                    during=" during a key exchange" if queued else "",
                    limit=self.factory.limits.max_backlog,
                )
                self.transport.abortConnection()
                return
        super().sendPacket(messageType, payload)

    def sendDisconnect(self, reason: int, desc: bytes, why: str | None = None) -> None:
        """Conch's, with one rate-limited line (``why``, or the description) instead of its own."""
        if not self._disconnect_logged:
            self._disconnect_logged = True
            self.drop_log.warn(
                "{peer}: {why}; disconnected", peer=self.describe_peer(), why=why or quote(desc, 200)
            )
        super().sendDisconnect(reason, desc[:200])

    def _newKeys(self) -> None:
        self._kex_queued = 0  # Conch sends (or, if the socket is full, writes) them now
        super()._newKeys()

    # IPushProducer, for the TCP transport

    def pauseProducing(self) -> None:
        self._link_paused = True
        if not self.authenticated and not self._reading_paused:
            self._reading_paused = True  # a peer that does not read is not read, before login
            self.transport.pauseProducing()
        service = self.service
        if isinstance(service, FlowControlledConnection):
            service.pauseProducing()

    def resumeProducing(self) -> None:
        self._link_paused = False
        self._written_while_paused = 0
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        service = self.service
        if isinstance(service, FlowControlledConnection):
            service.resumeProducing()

    def stopProducing(self) -> None:
        self.pauseProducing()


def probe(connection: MuxServerTransport, clock: IReactorTime, timeout: float) -> defer.Deferred[bool]:
    """Whether ``connection`` answers a keepalive within ``timeout`` seconds."""
    service = connection.service
    if not isinstance(service, MuxServerConnection) or connection.transport.disconnecting:
        return defer.succeed(False)
    result: defer.Deferred[bool] = defer.Deferred()

    def answered(reply: Any) -> None:
        # A REQUEST_FAILURE is an answer; "Connection stopped." (Conch's errback
        # when the connection goes) is not.
        alive = not isinstance(reply, Failure) or (
            isinstance(reply.value, ConchError) and reply.value.args[:1] == ("global request failed",)
        )
        if not result.called:
            timer.cancel()
            result.callback(alive)

    def expired() -> None:
        if not result.called:
            result.callback(False)

    timer = clock.callLater(timeout, expired)
    service.sendGlobalRequest(KEEPALIVE_REQUEST, b"", wantReply=1).addBoth(answered)
    return result


class SSHMuxFactory(factory.SSHFactory):
    """The SSH server: host keys, public-key auth per host, PB channels only."""

    protocol = MuxServerTransport
    services = {
        b"ssh-userauth": MuxUserAuthServer,
        b"ssh-connection": MuxServerConnection,
    }
    _log = BoundedLogger()

    def __init__(
        self,
        host_keys: Sequence[keys.Key],
        entries: Callable[[], Iterable[HostEntry]],
        pb_lookup: PBLookup,
        reactor: IReactorTime,
        flow: FlowLimits = FlowLimits(),
        limits: ServerLimits = ServerLimits(),
        liveness: Liveness = Liveness(),
        pb_input: PBInputLimits = PBInputLimits(),
        stats: ServerStats | None = None,
        host_certificates: Sequence[certs.Certificate] = (),
    ) -> None:
        self.host_keys = list(host_keys)
        self.stats = stats if stats is not None else ServerStats(reactor)
        self.host_certificates = list(host_certificates)  # each certifies one of host_keys
        self.pb_input = pb_input
        self.pb_lookup = pb_lookup
        self.reactor = reactor
        self.flow = flow
        self.limits = limits
        self.liveness = liveness
        self.startup_gate = StartupGate(*limits.max_startups)
        self.entries = entries
        self.connections: set[MuxServerTransport] = set()
        self.draining = False  # the master is stopping once its builds end
        self.on_worker_attached: Callable[[str, HostEntry, str], object] | None = None
        self.peer_logs = PeerLogs(log, reactor)
        self.drop_logs = PeerLogs(log, reactor)
        self.realm = HostRealm(self)
        self.authority = certauth.CertificateAuthority(entries, reactor)
        self.portal = portal.Portal(self.realm, [AuthorizedHostsChecker(entries, authority=self.authority)])

    def getPublicKeys(self) -> dict[bytes, Any]:
        plain = {key.sshType(): key.public() for key in self.host_keys}
        return {**hostcerts.by_algorithm(self.host_keys, self.host_certificates), **plain}

    def getPrivateKeys(self) -> dict[bytes, Any]:
        plain = {key.sshType(): key for key in self.host_keys}
        return {**hostcerts.by_algorithm(self.host_keys, self.host_certificates), **plain}

    def getPrimes(self) -> None:
        return None

    def announce_draining(self) -> None:
        """The master is stopping once its builds end: tell every host (and every host that logs in from now)."""
        if self.draining:
            return
        self.draining = True
        services = [c.service for c in self.connections if isinstance(c.service, MuxServerConnection)]
        log.info(
            "the master is stopping once its builds end: telling {n} worker hosts to move their sessions",
            n=len(services),
        )
        for connection in services:
            connection.announce_draining()

    def disconnect_all(self) -> None:
        """The master stops: tell every host so (its launcher logs it as planned), in one line."""
        if self.connections:
            log.info("disconnecting {n} worker hosts: the master is stopping", n=len(self.connections))
        for conn in list(self.connections):
            conn._disconnect_logged = True
            conn.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, SHUTDOWN_REASON)

    def connections_of(self, entry: HostEntry, besides: MuxServerTransport) -> list[MuxServerTransport]:
        """The logged-in connections of ``entry``'s key, oldest first, not counting those being replaced."""
        blob = entry.key.blob()
        same = (c for c in self.connections
                if c is not besides and c.authenticated and not c.replaced and c.avatar.entry.key.blob() == blob)  # fmt: skip
        return sorted(same, key=lambda c: c.serial)

    def arbitrate(self, newcomer: MuxServerTransport, entry: HostEntry) -> defer.Deferred[None]:
        """Let ``newcomer`` log in as ``entry`` within max_connections_per_host.

        As Buildbot arbitrates a duplicate worker: the oldest connections
        beyond the limit are sent a keepalive; those that answer within
        ``duplicate_probe_timeout`` stay and the newcomer is refused
        (`DuplicateConnection`); those that do not are half open, and are
        closed for the newcomer.
        """
        limit = self.limits.max_connections_per_host
        excess = len(self.connections_of(entry, newcomer)) + 1 - limit
        if excess <= 0:
            return defer.succeed(None)
        oldest = self.connections_of(entry, newcomer)[:excess]
        timeout = self.limits.duplicate_probe_timeout
        d = defer.gatherResults([probe(c, self.reactor, timeout) for c in oldest])

        def decide(answers: list[bool]) -> None:
            for old, answered in zip(oldest, answers):
                if not answered and not old.replaced and not old.transport.disconnecting:
                    old.replaced = True
                    self.stats.replaced()
                    old.sendDisconnect(
                        transport.DISCONNECT_BY_APPLICATION,
                        b"replaced by a newer connection of this host key",
                        why=f"{newcomer.describe_peer_with(entry)} connected again and its connection"
                        f" from {old.describe_peer()} did not answer a keepalive within {timeout:.0f}s:"
                        f" replacing it (max_connections_per_host={limit})",
                    )
            live = self.connections_of(entry, newcomer)
            if len(live) + 1 > limit:
                raise DuplicateConnection(live[0], limit, self.reactor.seconds())

        return d.addCallback(decide)

    def apply_entries(self) -> None:
        """Re-check every logged-in host against the current entries.

        A host whose key was removed, or whose address ``from=`` no longer
        allows, is disconnected; a host whose ``workers=`` narrowed loses
        the sessions it may no longer run.  Other hosts are untouched.  A key
        on several lines is its first line's, as at login.
        """
        by_key: dict[bytes, HostEntry] = {}
        for listed in self.entries():
            if not listed.cert_authority:
                by_key.setdefault(listed.key.blob(), listed)
        for conn in list(self.connections):
            avatar = getattr(conn, "avatar", None)
            if not isinstance(avatar, HostAvatar):
                continue
            peer = avatar.peer_address()
            why = ""
            if avatar.entry.certificate is not None:  # re-derived from its CA's line and the revocations
                entry, why = self.authority.recheck(avatar.entry, getattr(peer, "host", None))
            else:
                entry = by_key.get(avatar.entry.key.blob())
            if entry is None or (peer is not None and not entry.allows_address(peer.host)):
                conn.sendDisconnect(
                    transport.DISCONNECT_BY_APPLICATION,
                    b"this host's key is no longer authorized",
                    why=f"{avatar.describe()} is no longer authorized{': ' + why if why else ''}",
                )
            elif entry != avatar.entry:
                avatar.update_entry(entry)
