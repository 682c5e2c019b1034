"""The worker host's side of the SSH connection: one shared dial per master.

`MasterLink` keeps one authenticated SSH connection to a master, redialling
with backoff and jitter when it drops.  `ChannelEndpoint` is a client endpoint
that opens a ``direct-tcpip`` channel to the master's PB port on that shared
connection, so every worker session waits on the same dial: no storm of
connections when a master comes back.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.application import service
from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.ssh import forwarding, keys, transport, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from buildbot_sshmux.errors import ChannelRefused, HostCertificateRefused, HostKeyMismatch
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.channel import ChannelAddress, FlowControlledConnection, FlowLimits, ProtocolChannel
from buildbot_sshmux.wire.keys import fingerprint, parse_public_line
from buildbot_sshmux.wire.liveness import DRAINING_REQUEST, KEEPALIVE_REQUEST, Keepalive, Liveness
from buildbot_sshmux.wire.peerlog import quote
from buildbot_sshmux.wire.stats import Histogram
from buildbot_sshmux.wire.transport import (
    SHUTDOWN_REASON,
    BoundedLogger,
    MuxTransport,
    prefer,
    send_without_delay,
)
from buildbot_sshmux.worker import hostca

log = Logger()

# buildbot-worker streams logs without flow control: a channel whose queue
# passes its limit is closed only once the master has taken nothing for a minute.
WORKER_FLOW_LIMITS = FlowLimits(stall_timeout=60.0)


def backoff(
    initial: float = 1.0, factor: float = 2.0, maximum: float = 60.0, rng: random.Random | None = None
) -> Callable[[int], float]:
    """Exponential backoff with +-50% jitter, so hosts do not redial in step."""
    rand = rng or random.Random()

    def delay(attempt: int) -> float:
        # The exponent is capped: after days of failures factor**attempt would overflow.
        base = min(maximum, initial * factor ** min(max(0, attempt - 1), 64))
        return min(base * 1.5, max(base * 0.5, base * rand.uniform(0.5, 1.5)))

    return delay


def _algorithms(key_type: bytes) -> list[bytes]:
    """Host key algorithm names that sign with a key (or a certificate) of this type."""
    if key_type == b"ssh-rsa":
        return [b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"]
    if certs.is_certificate(key_type):
        return list(certs.algorithms_for(key_type))
    return [key_type]


def _fingerprints(pins: Sequence[str]) -> tuple[list[str], list[bytes]]:
    """Each pin, an OpenSSH public key line or a ``SHA256:`` fingerprint, as (fingerprints, key types)."""
    prints, types = [], []
    for pin in pins:
        pin = pin.strip()
        if pin.startswith("SHA256:"):
            prints.append(pin)
        else:
            key, _comment = parse_public_line(pin)
            prints.append(fingerprint(key))
            types.append(key.sshType())
    return prints, types


@frozen
class HostKeyPins:
    """The master host keys a launcher accepts: pinned keys, fingerprints, known_hosts,
    and host certificates of pinned CAs (``host_ca``, ``@cert-authority``: worker/hostca.py)."""

    fingerprints: tuple[str, ...] = ()
    known_hosts: Path | None = None
    key_types: tuple[bytes, ...] = ()
    ca_fingerprints: tuple[str, ...] = ()  # host_ca: CAs whose host certificates stand for this master

    @classmethod
    def from_config(
        cls, pins: Sequence[str], known_hosts: Path | None = None, host_cas: Sequence[str] = ()
    ) -> HostKeyPins:
        """Each pin (and CA pin) is an OpenSSH public key line or a ``SHA256:`` fingerprint."""
        prints, types = _fingerprints(pins)
        return cls(tuple(prints), known_hosts, tuple(types), tuple(_fingerprints(host_cas)[0]))

    def _markers(self) -> list[hostca.Marker]:
        return hostca.read_markers(self.known_hosts) if self.known_hosts is not None else []

    def authorities(self, host: str, port: int) -> list[str]:
        """Fingerprints of the CAs trusted to certify this master's host key."""
        name = hostca.known_hosts_name(host, port)
        return [*self.ca_fingerprints, *hostca.authorities(self._markers(), name)]

    def check_certificate(self, host: str, port: int, cert: certs.Certificate, now: float) -> str | None:
        """Why the master's host certificate is not accepted, or None if it is."""
        trusted = self.authorities(host, port)
        if cert.ca_fingerprint not in trusted:
            expected = " or ".join(trusted) or "none: no host_ca or @cert-authority applies to it"
            return f"its CA {cert.ca_fingerprint} is not a trusted one ({expected})"
        problem = hostca.check_host_certificate(cert, host, now)
        if problem is not None:
            return problem
        markers, name = self._markers(), hostca.known_hosts_name(host, port)
        if hostca.revoked_by(markers, name, cert.key):
            return f"its key {cert.fingerprint} is marked @revoked in {self.known_hosts}"
        if hostca.revoked_by(markers, name, cert.ca_key):
            return f"its CA {cert.ca_fingerprint} is marked @revoked in {self.known_hosts}"
        return None

    def revoked(self, host: str, port: int, key: keys.Key) -> bool:
        """Whether known_hosts marks ``key`` ``@revoked`` for this master."""
        return hostca.revoked_by(self._markers(), hostca.known_hosts_name(host, port), key)

    def _known_entries(self, host: str, port: int) -> list[Any]:
        if self.known_hosts is None:
            return []
        known = KnownHostsFile.fromPath(FilePath(str(self.known_hosts)))
        # OpenSSH names a host on a port other than 22 "[host]:port" only.
        name = host if port == 22 else f"[{host}]:{port}"
        return [e for e in known.iterentries() if e.matchesHost(name.encode())]

    def preferred_algorithms(self, host: str, port: int) -> list[bytes]:
        """Host key algorithms of the pinned keys, to be negotiated first.

        A master rotating its key offers old and new (of different types); a
        launcher must ask for the type it has pinned, as OpenSSH does.
        """
        types = list(self.key_types)
        types += [getattr(e, "keyType", b"") for e in self._known_entries(host, port)]
        pinned = [alg for t in dict.fromkeys(types) if t for alg in _algorithms(t)]
        # A trusted CA: the master's certificate first, as ssh does with @cert-authority.
        return [*certs.CERT_ALGORITHMS, *pinned] if self.authorities(host, port) else pinned

    def accepts(self, host: str, port: int, key: keys.Key) -> bool:
        if self.revoked(host, port, key):
            return False
        if fingerprint(key) in self.fingerprints:
            return True
        return any(entry.matchesKey(key) for entry in self._known_entries(host, port))

    def describe(self) -> list[str]:
        expected = list(self.fingerprints)
        if self.known_hosts is not None:
            expected.append(f"a key listed in {self.known_hosts}")
        expected += [f"a host certificate of CA {ca}" for ca in self.ca_fingerprints]
        return expected


def _rsa_algorithm(server_sig_algs: bytes | None, suffix: bytes = b"") -> bytes:
    """The RSA signature algorithm to log in with: SHA-2 as the master advertises (RFC 8332,
    server-sig-algs); rsa-sha2-512 when it says nothing (our master and sshd refuse SHA-1)."""
    offered = (server_sig_algs or b"rsa-sha2-512").split(b",")
    name = next((a for a in (b"rsa-sha2-512", b"rsa-sha2-256") if a in offered), b"ssh-rsa")
    return name + suffix


class MuxUserAuthClient(userauth.SSHUserAuthClient):
    """Public-key authentication with this host's key: its certificate first, if it has one.

    Conch's client offers a key as its plain type and blob (``getPublicKey``),
    and signs under the key's type; a certificate needs its own blob and
    algorithm name, and a signature made by the plain key under the plain
    algorithm, so the two publickey steps are ours (``auth_publickey``,
    ``ssh_USERAUTH_PK_OK_publickey``).  RSA keys sign with SHA-2 as the
    master's server-sig-algs allows.
    """

    _log = BoundedLogger()
    preferredOrder = [b"publickey"]

    def __init__(self, link: MasterLink, instance: Any) -> None:
        super().__init__(link.username.encode("utf-8"), instance)
        self.link = link
        self._offers: list[tuple[bytes, bytes, certs.Certificate | None]] | None = None
        self._current: tuple[bytes, bytes, certs.Certificate | None] | None = None
        self._certified = False  # a certificate was offered

    def _make_offers(self) -> list[tuple[bytes, bytes, certs.Certificate | None]]:
        """(algorithm, blob, certificate) to offer, in order: the certificate, then the plain key."""
        identity = self.link.identity
        sig_algs = getattr(self.transport, "peerExtensions", {}).get(b"server-sig-algs")
        offers: list[tuple[bytes, bytes, certs.Certificate | None]] = []
        cert = self.link.load_certificate()
        if cert is not None:
            if cert.key_type == b"ssh-rsa-cert-v01@openssh.com":
                algorithm = _rsa_algorithm(sig_algs, certs.CERT_SUFFIX)
            else:
                algorithm = cert.key_type
            offers.append((algorithm, cert.blob, cert))
        plain = _rsa_algorithm(sig_algs) if identity.sshType() == b"ssh-rsa" else identity.sshType()
        offers.append((plain, identity.public().blob(), None))
        return offers

    def auth_publickey(self) -> defer.Deferred[bool]:
        if self._offers is None:
            self._offers = self._make_offers()
        elif self._current is not None and self._current[2] is not None:
            log.warn(
                "{master} refused this host's {certificate}; trying its plain key {fingerprint}",
                master=self.link.address,
                certificate=self._current[2].describe(),
                fingerprint=fingerprint(self.link.identity),
            )
        if not self._offers:
            certified = " (and its certificate)" if self._certified else ""
            log.error(
                "{master} refused this host's key {fingerprint}{certified}: ask the master's administrator"
                " to add this host's public key (the .pub file) to authorized_hosts",
                master=self.link.address,
                fingerprint=fingerprint(self.link.identity),
                certified=certified,
            )
            self.link.refused = True
            self.link.note_error(f"refused this host's key {fingerprint(self.link.identity)}{certified}")
            return defer.succeed(False)
        self._current = self._offers.pop(0)
        algorithm, blob, cert = self._current
        self._certified = self._certified or cert is not None
        self.askForAuth(b"publickey", b"\x00" + NS(algorithm) + NS(blob))
        return defer.succeed(True)

    def ssh_USERAUTH_PK_OK_publickey(self, packet: bytes) -> None:
        """The master would take the key offered: sign the request (RFC 4252 section 7)."""
        assert self._current is not None
        algorithm, blob, cert = self._current
        session: Any = self.transport.sessionID  # type: ignore[union-attr]
        signed = (
            NS(session)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + NS(self.user)
            + NS(self.instance.name)
            + NS(b"publickey")
            + b"\x01"
            + NS(algorithm)
            + NS(blob)
        )
        signature = self.link.identity.sign(signed, signatureType=certs.plain_algorithm(algorithm))
        self.link.logged_in_with = cert
        self.askForAuth(b"publickey", b"\x01" + NS(algorithm) + NS(blob) + NS(signature))


class MuxClientConnection(FlowControlledConnection):
    """The ``ssh-connection`` service of a `MasterLink`."""

    _log = BoundedLogger()

    def __init__(self, link: MasterLink) -> None:
        self.limits = link.limits
        super().__init__()
        self.link = link

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.keepalive = Keepalive(
            self,
            self.link.reactor,
            self.link.liveness,
            lambda: f"master {self.link.address} (as {fingerprint(self.link.identity)})",
            self.link.round_trips.observe,
        )
        self.keepalive.start()
        self.link.connection_ready(self)

    def serviceStopped(self) -> None:
        self.keepalive.stop()
        self.link.connection_lost(self)
        super().serviceStopped()

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        if requestType == KEEPALIVE_REQUEST:
            return 1
        if requestType == DRAINING_REQUEST:
            self.link.master_draining()
            return 1
        log.warn(
            "refused global request {request!r} from master {master}",
            request=requestType.decode("ascii", "replace"),
            master=self.link.address,
        )
        return 0


# The exchanges Conch's client runs in _ssh_KEX_ECDH_REPLY, and their hashes (RFC 5656, RFC 8731).
ECDH_EXCHANGES = {
    b"curve25519-sha256": hashlib.sha256,
    b"curve25519-sha256@libssh.org": hashlib.sha256,
    b"ecdh-sha2-nistp256": hashlib.sha256,
    b"ecdh-sha2-nistp384": hashlib.sha384,
    b"ecdh-sha2-nistp521": hashlib.sha512,
}


class MuxClientTransport(MuxTransport, transport.SSHClientTransport):
    """Conch's client transport with host key pinning (host certificates too), rekeying,
    AEAD ciphers first and strict key exchange."""

    _secured = False
    host_certificate: certs.Certificate | None = None  # the master's, once verified

    def __init__(self, link: MasterLink) -> None:
        self.link = link
        self.liveness = link.liveness
        # Pinned types first; with fingerprints only, ed25519 (what `init` makes),
        # and the types a previous dial was offered in vain last.
        pinned = link.pins.preferred_algorithms(link.host, link.port) + [b"ssh-ed25519"]
        supported = list(transport.SSHClientTransport.supportedPublicKeys)
        if link.pins.authorities(link.host, link.port):
            # A host certificate may come: its exchange is verified in
            # _ssh_KEX_ECDH_REPLY, hence (EC)DH on curves only.
            supported = [*certs.CERT_ALGORITHMS, *supported]
            self.supportedKeyExchanges = [
                k for k in transport.SSHClientTransport.supportedKeyExchanges if k in ECDH_EXCHANGES
            ]
        order = prefer(pinned, supported)
        tried = [alg for t in link.mismatched_types for alg in _algorithms(t)]
        self.supportedPublicKeys = [a for a in order if a not in tried] + [a for a in order if a in tried]

    def describe_peer(self) -> str:
        return f"master {self.link.address}"

    def verifyHostKey(self, hostKey: bytes, fp: bytes) -> defer.Deferred[bool]:
        if certs.is_certificate(hostKey):
            return self._verify_host_certificate(hostKey)
        key = keys.Key.fromString(hostKey)
        if self.link.pins.accepts(self.link.host, self.link.port, key):
            return defer.succeed(True)
        mismatch = HostKeyMismatch(self.link.address, self.link.pins.describe(), fingerprint(key))
        log.error("{error}", error=str(mismatch))
        self.link.refused = True
        self.link.note_error(str(mismatch))
        # A fingerprint does not say the key's type: if the master has keys of
        # other types (a rotation), the next dial asks for those first.
        self.link.mismatched_types.add(key.sshType())
        return defer.fail(mismatch)

    def _verify_host_certificate(self, blob: bytes) -> defer.Deferred[bool]:
        link = self.link
        try:
            cert = certs.parse_certificate(blob)
        except certs.CertificateError as e:
            refusal = HostCertificateRefused(link.address, "unreadable", str(e))
        else:
            why = link.pins.check_certificate(link.host, link.port, cert, link.reactor.seconds())
            if why is None:
                self.host_certificate = cert
                return defer.succeed(True)
            refusal = HostCertificateRefused(link.address, f"{cert.describe()}, key {cert.fingerprint}", why)
            link.mismatched_types.add(cert.key_type)  # the next dial asks for plain keys first
        log.error("{error}", error=str(refusal))
        link.refused = True
        link.note_error(str(refusal))
        return defer.fail(refusal)

    def _ssh_KEX_ECDH_REPLY(self, packet: bytes) -> Any:
        """Conch's client, for a host key that is a certificate (which Conch cannot parse).

        The exchange hash covers the certificate blob, as the master sent it;
        the signature is the plain key's, under the plain algorithm's name
        (``rsa-sha2-512`` for ``rsa-sha2-512-cert-v01@openssh.com``).
        """
        host_blob, their_public, signature, _rest = getNS(packet, 3)
        if not certs.is_certificate(host_blob):
            return super()._ssh_KEX_ECDH_REPLY(packet)  # type: ignore[misc]

        def verified(_: Any) -> None:
            cert = self.host_certificate
            assert cert is not None  # verifyHostKey set it
            shared = self._generateECSharedSecret(self.ecPriv, their_public)
            h = ECDH_EXCHANGES[self.kexAlg]()
            for part in (self.ourVersionString, self.otherVersionString, self.ourKexInitPayload,
                         self.otherKexInitPayload, host_blob, self._encodeECPublicKey(self.ecPub),
                         their_public):  # fmt: skip
                h.update(NS(part))
            h.update(shared)
            exchange_hash = h.digest()
            try:
                named = getNS(signature)[0] == certs.plain_algorithm(self.keyAlg)
                valid = named and cert.key.verify(signature, exchange_hash)
            except Exception:
                valid = False
            if not valid:
                self.sendDisconnect(transport.DISCONNECT_KEY_EXCHANGE_FAILED, b"bad signature")
                return
            self._keySetup(shared, exchange_hash)

        d = self.verifyHostKey(host_blob, b"")
        d.addCallback(verified)
        d.addErrback(
            lambda _: self.sendDisconnect(transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE, b"bad host key")
        )
        return d

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        text = quote(description, 200)
        self.link.note_error(f"disconnected by the master (code {reasonCode}): {text}")
        if description == SHUTDOWN_REASON:
            self.link.master_stopping = True
            log.info("master {master} is shutting down", master=self.link.address)
        elif reasonCode == transport.DISCONNECT_TOO_MANY_CONNECTIONS:
            log.warn(
                "master {master} refused this connection: {why}; is another launcher running with this"
                " host's key? retrying with backoff",
                master=self.link.address,
                why=text,
            )
        else:
            log.warn(
                "master {master} disconnected with code {code}: {why}",
                master=self.link.address,
                code=reasonCode,
                why=text,
            )

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        # One line of ours, where Conch's says "Disconnecting with error" (debug).
        # Its ECDH path would also send the master the repr of the verification
        # Failure; verifyHostKey has said why in one line already.
        if reason == transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE:
            desc = b"bad host key"
        elif not self._disconnect_logged:
            self._disconnect_logged = True
            log.warn("{master}: {why}; disconnected", master=self.describe_peer(), why=quote(desc, 200))
        super().sendDisconnect(reason, desc)

    def connectionMade(self) -> None:
        send_without_delay(self.transport)
        super().connectionMade()
        self.start_rekey_timer(self.link.reactor)

    def connectionSecure(self) -> None:
        # Conch calls this on every NEWKEYS, re-keys included: log in once only.
        if self._secured:
            return
        self._secured = True
        self.requestService(MuxUserAuthClient(self.link, MuxClientConnection(self.link)))

    def connectionLost(self, reason: Any = None) -> None:
        self.stop_rekey_timer()
        super().connectionLost(reason)
        self.link.transport_lost(self, reason)


class MasterLink(service.Service):
    """One SSH connection to one master, shared by every worker session.

    `when_ready` gives the connection once authenticated; while it is down,
    one dial at a time is made, with backoff and jitter.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        identity: keys.Key,
        pins: HostKeyPins,
        *,
        username: str = "buildbot-worker",
        limits: FlowLimits = WORKER_FLOW_LIMITS,
        liveness: Liveness = Liveness(),
        retry_delay: Callable[[int], float] | None = None,
        connect_timeout: float = 30.0,
        endpoint: IStreamClientEndpoint | None = None,
        certificate: Path | None = None,
        certificate_required: bool = False,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.identity = identity
        # This host's certificate, read afresh at each login (a renewal needs no restart):
        # IDENTITY-cert.pub beside the key, as ssh, or identity_certificate.
        self.certificate = certificate
        self.certificate_required = certificate_required
        self.logged_in_with: certs.Certificate | None = None  # the certificate of the last login
        self.pins = pins
        self.username = username
        self.limits = limits
        self.liveness = liveness
        self.retry_delay = retry_delay or backoff()
        self.connect_timeout = connect_timeout
        self.endpoint = endpoint or endpoints.HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        self.connection: MuxClientConnection | None = None
        self.refused = False
        self.master_stopping = False  # the master said it is shutting down
        self.draining = False  # the master said it will stop: take no session there
        self.mismatched_types: set[bytes] = set()
        self.dials = 0
        self._attempt = 0
        self._waiters: list[defer.Deferred[MuxClientConnection]] = []
        self._transport: MuxClientTransport | None = None
        self._dialing: defer.Deferred[Any] | None = None
        self._retry_call: Any = None
        self._on_transport_lost: Callable[[], Any] | None = None
        self.tried = False  # its first dial has ended (connected, refused, failed) or was slow
        self.last_error: tuple[str, float] | None = None  # what went wrong last, and when
        self.connected_since: float | None = None
        self._up_since: float | None = None
        self._grace_call: Any = None
        self.observers: list[Callable[[MasterLink], None]] = []  # told when it comes up or fails
        self.round_trips = Histogram()  # keepalive round trips, seconds (metrics)
        self._closed_counts = {"received": 0, "sent": 0, "rekeys": 0}  # of its connections that ended

    def counts(self) -> dict[str, int]:
        """Bytes received and sent on the wire, and rekeys completed, by every connection so far."""
        counts = dict(self._closed_counts)
        live = self._transport
        if live is not None:
            counts["received"] += live.bytes_received
            counts["sent"] += live.bytes_sent
            counts["rekeys"] += live.rekeys_completed
        return counts

    first_dial_grace = 5.0
    """Seconds a cluster's sessions wait for this master's first dial before taking another."""

    def _changed(self) -> None:
        self.tried = True
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        for observer in self.observers[:]:
            observer(self)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    certificate_warning_days = 14.0
    """A certificate that expires sooner is logged as a warning at each login."""

    def load_certificate(self) -> certs.Certificate | None:
        """This host's certificate to offer, or None (a missing or unusable one is logged)."""
        self.logged_in_with = None
        if self.certificate is None or (not self.certificate_required and not self.certificate.exists()):
            return None
        try:
            cert = certs.load_certificate(self.certificate)
        except certs.CertificateError as e:
            log.warn("{error}; offering the plain key only", error=str(e))
            return None
        if not certs.certifies(cert, self.identity):
            log.warn(
                "certificate {path} certifies {other}, not this host's key {fingerprint}; offering the plain"
                " key only",
                path=self.certificate,
                other=cert.fingerprint,
                fingerprint=fingerprint(self.identity),
            )
            return None
        problem = cert.validity_problem(self.reactor.seconds())
        if problem is not None:
            log.warn(
                "this host's {certificate} {problem}: the master will refuse it; renew it (buildbot-sshmux ca"
                " sign, or ssh-keygen -s) and put it in {path}",
                certificate=cert.describe(),
                problem=problem,
                path=self.certificate,
            )
        return cert

    def startService(self) -> None:
        super().startService()
        self._grace_call = self.reactor.callLater(self.first_dial_grace, self._changed)
        self._dial()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._dialing is not None:
            self._dialing.cancel()
        for waiter in self._waiters[:]:
            waiter.cancel()
        if self._transport is not None:
            done: defer.Deferred[None] = defer.Deferred()

            def lost() -> None:
                if not done.called:
                    done.callback(None)

            self._on_transport_lost = lost
            tcp: Any = self._transport.transport
            tcp.loseConnection()
            return done
        return defer.succeed(None)

    def when_ready(self) -> defer.Deferred[MuxClientConnection]:
        """A Deferred firing with the authenticated connection (now or once up)."""
        if self.connection is not None:
            return defer.succeed(self.connection)
        d: defer.Deferred[MuxClientConnection] = defer.Deferred(
            lambda d: self._waiters.remove(d) if d in self._waiters else None
        )
        self._waiters.append(d)
        return d

    def _dial(self) -> None:
        if not self.running or self._dialing is not None or self._transport is not None:
            return
        self.dials += 1
        self.refused = False
        factory = protocol.Factory.forProtocol(lambda: MuxClientTransport(self))
        factory.noisy = False  # no "Starting factory" line for every dial
        self._dialing = self.endpoint.connect(factory)

        def connected(proto: MuxClientTransport) -> None:
            self._dialing = None
            self._transport = proto

        def failed(reason: Failure) -> None:
            self._dialing = None
            if reason.check(defer.CancelledError):
                return
            log.warn(
                "cannot reach master {master}: {error}",
                master=self.address,
                error=reason.getErrorMessage(),
            )
            self.note_error(f"cannot reach it: {reason.getErrorMessage()}")
            self._schedule_redial()
            self._changed()

        self._dialing.addCallbacks(connected, failed)

    def _schedule_redial(self) -> None:
        if not self.running:
            return
        self._attempt += 1
        delay = self.retry_delay(self._attempt)
        log.info(
            "redialling master {master} in {delay:.1f}s (attempt {attempt})",
            master=self.address,
            delay=delay,
            attempt=self._attempt,
        )
        self._retry_call = self.reactor.callLater(delay, self._redial)

    def _redial(self) -> None:
        self._retry_call = None
        self._dial()

    def note_error(self, text: str) -> None:
        self.last_error = (text, self.reactor.seconds())

    def master_draining(self) -> None:
        """The master said it will stop soon (DRAINING_REQUEST)."""
        if not self.draining:
            self.draining = True
            log.info("master {master} is about to stop: its sessions move as their builds end",
                     master=self.address)  # fmt: skip
            self._changed()

    def connection_ready(self, connection: MuxClientConnection) -> None:
        self.draining = False
        self.connection = connection
        self.connected_since = self._up_since = self.reactor.seconds()
        self._attempt = 0
        self.mismatched_types.clear()
        cert = self.logged_in_with
        log.info(
            "connected to master {master} as {fingerprint}{certificate}",
            master=self.address,
            fingerprint=fingerprint(self.identity),
            certificate=f" with {cert.describe()}, valid until {certs.when(cert.valid_before)}"
            if cert
            else "",
        )
        if cert is not None:
            left = cert.valid_before - self.reactor.seconds()
            if left < self.certificate_warning_days * 86400:
                left = max(0.0, left)
                log.warn(
                    "this host's {certificate} expires in {left} ({until}): renew it and put it in {path}",
                    certificate=cert.describe(),
                    left=f"{left / 86400:.1f} days" if left >= 2 * 86400 else f"{left / 3600:.1f} hours",
                    until=certs.when(cert.valid_before),
                    path=self.certificate,
                )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(connection)
        self._changed()

    def connection_lost(self, connection: MuxClientConnection) -> None:
        if self.connection is connection:
            self.connection = None

    def transport_lost(self, proto: MuxClientTransport, reason: Any) -> None:
        if self._transport is not proto:
            return
        self._closed_counts["received"] += proto.bytes_received
        self._closed_counts["sent"] += proto.bytes_sent
        self._closed_counts["rekeys"] += proto.rekeys_completed
        self._transport = None
        self.connection = None
        self.connected_since = None
        if self._on_transport_lost is not None:
            self._on_transport_lost()
            return
        self.draining = False
        if self.master_stopping:  # it said so: not a fault
            log.info("disconnected from master {master}", master=self.address)
        else:
            log.warn("lost connection to master {master}", master=self.address)
            if self.last_error is None or self.last_error[1] < (self._up_since or 0.0):
                self.note_error("lost the connection")
        self.master_stopping = False
        self._schedule_redial()
        self._changed()


class _ClientChannel(ProtocolChannel):
    """A direct-tcpip channel whose protocol is built once the master accepts it."""

    name = b"direct-tcpip"

    def __init__(self, factory: IProtocolFactory, opened: defer.Deferred[Any], **kwargs: Any) -> None:
        super().__init__(None, **kwargs)  # type: ignore[arg-type]
        self.factory = factory
        self.opened = opened

    def channelOpen(self, specificData: bytes) -> None:
        if self.opened.called:  # cancelled while opening
            self.factory.doStop()
            self.disconnected = True
            self.loseConnection()
            return
        protocol = self.factory.buildProtocol(self.peer)
        if protocol is None:
            self.factory.doStop()
            self.disconnected = True
            self.loseConnection()
            self.opened.errback(ChannelRefused("the protocol factory built no protocol"))
            return
        self.protocol = protocol
        super().channelOpen(specificData)
        self.opened.callback(self.protocol)

    def openFailed(self, reason: Any) -> None:
        self.factory.doStop()
        if not self.opened.called:
            desc = getattr(reason, "value", None) or reason
            if isinstance(desc, bytes):  # Conch gives the peer's description as bytes
                desc = desc.decode("utf-8", "replace")
            self.opened.errback(ChannelRefused(f"the master refused the channel: {desc}"))

    def _notify_lost(self, reason: Failure) -> None:
        was_connected = not self.disconnected
        super()._notify_lost(reason)
        if was_connected:
            self.factory.doStop()


@implementer(IStreamClientEndpoint)
class ChannelEndpoint:
    """Connects a protocol through a channel to ``target`` on a `MasterLink`."""

    def __init__(
        self, link: MasterLink, target_port: int, label: str, target_host: str = "localhost"
    ) -> None:
        self.link = link
        self.target = (target_host, target_port)
        self.label = label

    @property
    def master_address(self) -> str:
        return self.link.address

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        ready = self.link.when_ready()
        opening: list[defer.Deferred[Any]] = []

        def cancel(d: defer.Deferred[Any]) -> None:
            ready.cancel()
            for inner in opening:
                if not inner.called:
                    inner.cancel()

        result: defer.Deferred[Any] = defer.Deferred(cancel)

        def open_channel(conn: MuxClientConnection) -> defer.Deferred[Any]:
            opened: defer.Deferred[Any] = defer.Deferred()
            opening.append(opened)
            address = ChannelAddress("TCP", self.target[0], self.target[1], ssh_host=self.link.address)
            channel = _ClientChannel(
                protocolFactory,
                opened,
                peer=address,
                host=ChannelAddress("TCP", "127.0.0.1", 0, ssh_host=self.link.address),
                limits=self.link.limits,
                call_soon=lambda f: self.link.reactor.callLater(0, f),
                clock=self.link.reactor.seconds,
                label=self.label,
                conn=conn,
            )
            protocolFactory.doStart()
            conn.openChannel(channel, forwarding.packOpen_direct_tcpip(self.target, ("127.0.0.1", 0)))
            return opened

        ready.addCallback(open_channel)
        ready.chainDeferred(result)
        return result
