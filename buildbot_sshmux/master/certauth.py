"""Worker hosts that log in with an OpenSSH user certificate.

A ``cert-authority`` line of authorized_hosts trusts the certificates its key
signed (``ssh-keygen -s CA -I ID -n PRINCIPALS host.pub``, or
``buildbot-sshmux ca sign``).  A certificate is accepted when, as with sshd:

- it is a *user* certificate (made without ``-h``): the worker host is the
  SSH client here, and sshd too takes user certificates for client logins;
  a host certificate is refused;
- a cert-authority line trusts the CA that signed it, and the CA's signature
  is valid (RSA CAs sign with SHA-2: ``ssh-rsa`` is refused, as OpenSSH 8.2+);
- now is within its validity window (checked at login, as sshd does: a
  connection outlives its certificate; revoke it to cut it);
- the revocation list does not name it (its serial, key id, its key or its CA);
- its critical options are known: ``source-address`` (the connection must
  come from one of its addresses), and nothing else;
- its principals name exactly one host, allowed by the CA line's
  ``principals=``.

Principals.  A principal ``NAME`` (letters, digits, ``.``, ``_``, ``-``)
names the host: it is the host's name in logs, ``{host}`` in the CA line's
``workers=``.  A principal ``workers:GLOB`` narrows the worker names: the
host may attach a name only if one of the CA line's ``workers=`` patterns
and one of the certificate's ``workers:`` patterns match it (a certificate
cannot widen what its CA line allows).  Any other ``KIND:...`` principal is
refused, so that a certificate made for some other purpose does not pass.

The revocation list is a text file in the syntax of ``ssh-keygen -k``'s KRL
specification, so that the same file can also make a binary KRL for sshd::

    # buildbot-sshmux ca revoke appends lines like these
    serial: 17
    serial: 100-199
    id: debian-sid-2026
    hash: SHA256:3KZvYcGg6JyJpzgeNEFxdxyzij4Ao/PRfiZzL9aH1sg
    key: ssh-ed25519 AAAAC3Nz...

``serial:`` and ``id:`` revoke certificates of every CA in authorized_hosts
(``ssh-keygen -k -s CA.pub`` scopes them to one CA); ``hash:`` and ``key:``
revoke every certificate of that key, or of that CA.  A list that cannot be
read, or has a line that cannot be parsed, refuses every certificate: a list
that is half understood cannot be trusted to name what was revoked.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from attrs import frozen
from twisted.conch.error import IgnoreAuthentication, ValidPublicKey
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.cred import credentials, error
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from buildbot_sshmux.master.authorized_hosts import HOST_TOKEN, HostEntry, address_matches
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.certs import Certificate, CertificateError
from buildbot_sshmux.wire.keys import fingerprint, parse_public_line
from buildbot_sshmux.wire.peerlog import quote

log = Logger()

HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
WORKERS_PREFIX = "workers:"
KNOWN_CRITICAL_OPTIONS = frozenset({certs.SOURCE_ADDRESS})


class CertificateRefused(Exception):
    """A certificate that may not log in; ``why`` says which rule it breaks."""

    def __init__(self, why: str, host: str = "?") -> None:
        super().__init__(why)
        self.why = why
        self.host = host


# The revocation list


class RevocationListError(ValueError):
    """A revocation list that cannot be used (the text names the file and line)."""


@frozen
class Revocations:
    """What the revocation list names; ``broken`` (why it cannot be used) refuses every certificate."""

    source: str = "<none>"
    serials: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    key_ids: frozenset[str] = frozenset()
    fingerprints: frozenset[str] = frozenset()  # SHA256:... of certified keys and CA keys
    broken: str | None = None

    def revokes(self, cert: Certificate) -> str | None:
        """Why ``cert`` is revoked (which line of the list names it), or None."""
        if any(low <= cert.serial <= high for low, high in self.serials):
            return f"its serial {cert.serial} is revoked in {self.source}"
        if cert.key_id in self.key_ids:
            return f"its key id '{quote(cert.key_id, 100)}' is revoked in {self.source}"
        if cert.fingerprint in self.fingerprints:
            return f"its key {cert.fingerprint} is revoked in {self.source}"
        if cert.ca_fingerprint in self.fingerprints:
            return f"its CA {cert.ca_fingerprint} is revoked in {self.source}"
        return None


NO_REVOCATIONS = Revocations()


def _serial(text: str) -> int:
    value = int(text, 0) if text.lower().startswith("0x") else int(text, 10)
    if not 0 < value < 2**64:
        raise ValueError("serials are 1 to 2^64-1")
    return value


def parse_revocations(data: bytes, source: str) -> Revocations:
    """Parse a revocation list (RevocationListError at its first bad line)."""
    serials: list[tuple[int, int]] = []
    ids: set[str] = set()
    prints: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{source}:{number}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise RevocationListError(f"{where}: not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        kind, sep, value = line.partition(":")
        kind, value = kind.strip().lower(), value.strip()
        if not sep or not value:
            raise RevocationListError(
                f"{where}: expected 'serial: N', 'id: KEYID', 'hash: SHA256:...' or 'key: KEY'"
            )
        try:
            if kind == "serial":
                low, dash, high = value.partition("-")
                first = _serial(low.strip())
                last = _serial(high.strip()) if dash else first
                if last < first:
                    raise ValueError(f"range {value} ends before it starts")
                serials.append((first, last))
            elif kind == "id":
                ids.add(value)
            elif kind == "hash":
                if not value.startswith("SHA256:"):
                    raise ValueError("only SHA256: fingerprints (as ssh-keygen -l prints them)")
                prints.add(value.rstrip("="))
            elif kind in ("key", "sha256", "sha1"):
                if certs.is_certificate(value.split()[0].encode("ascii")):
                    prints.add(certs.parse_certificate_line(value).fingerprint)  # revoked as its plain key
                else:
                    prints.add(fingerprint(parse_public_line(value)[0]))
            else:
                raise ValueError(f"unknown kind {kind!r} (serial, id, hash, key)")
        except (ValueError, CertificateError, IndexError) as e:
            raise RevocationListError(f"{where}: {e or 'cannot be parsed'}") from None
    return Revocations(source, tuple(serials), frozenset(ids), frozenset(prints))


def revocation_line(
    *, serial: int | None = None, key_id: str | None = None, key: keys.Key | None = None
) -> str:
    """One revocation line (what ``buildbot-sshmux ca revoke`` appends), checked by parsing it."""
    if serial is not None:
        line = f"serial: {serial}"
    elif key_id is not None:
        if "\n" in key_id or not key_id.strip() or key_id != key_id.strip():
            raise RevocationListError(f"key id {key_id!r} cannot be written on one line")
        line = f"id: {key_id}"
    elif key is not None:
        line = f"hash: {fingerprint(key)}"
    else:
        raise RevocationListError("nothing to revoke")
    parse_revocations(line.encode("utf-8"), "<new line>")
    return line


# Deciding


def source_address_allows(value: bytes, peer: str) -> bool:
    """A ``source-address`` critical option (CIDR or plain addresses, comma-separated) against ``peer``.

    As OpenSSH: no wildcards, no negation, and a malformed list allows nothing.
    """
    if peer.startswith("::ffff:"):
        peer = peer[len("::ffff:") :]
    try:
        address = ipaddress.ip_address(peer)
        networks = [ipaddress.ip_network(p.strip(), strict=False) for p in value.decode("ascii").split(",")]
    except (ValueError, UnicodeDecodeError):
        return False
    return any(address in network for network in networks)


def _principals(cert: Certificate) -> tuple[str, tuple[str, ...]]:
    """The host a certificate names, and its ``workers:`` patterns (CertificateRefused if not one host)."""
    hosts, workers, other = [], [], []
    for principal in cert.principals:
        if principal.startswith(WORKERS_PREFIX):
            pattern = principal[len(WORKERS_PREFIX) :].strip()
            if not pattern:
                raise CertificateRefused(f"its principal {quote(principal)!r} has no pattern")
            workers.append(pattern)
        elif ":" in principal:
            other.append(principal)
        else:
            hosts.append(principal)
    host = quote(hosts[0]) if len(hosts) == 1 else "?"
    if other:
        raise CertificateRefused(
            f"its principal {quote(other[0])!r} is of an unknown kind (only NAME and workers:GLOB)", host
        )
    if not hosts:
        raise CertificateRefused("its principals name no host (add one: -n HOSTNAME)")
    if len(hosts) > 1:
        shown = ", ".join(quote(h, 40) for h in hosts[:4])
        raise CertificateRefused(f"its principals name {len(hosts)} hosts ({shown}); one per certificate")
    if not HOST_NAME.match(hosts[0]):
        raise CertificateRefused(
            f"its host principal {quote(hosts[0])!r} is not a host name (letters, digits, '.', '_', '-')",
            host,
        )
    return hosts[0], tuple(workers)


def authorize(
    cert: Certificate,
    entries: Iterable[HostEntry],
    peer: str | None,
    revocations: Revocations,
    now: float | None,
) -> HostEntry:
    """The host entry a certificate logs in as (CertificateRefused saying why not).

    ``now`` None: the validity window is not checked (a live connection,
    re-checked after an edit of authorized_hosts or of the revocation list).
    """
    failure: CertificateRefused | None = None  # told after the CA and validity: those come first
    host = "?"
    narrowing: tuple[str, ...] = ()
    try:
        host, narrowing = _principals(cert)
    except CertificateRefused as e:
        host, failure = e.host, e
    if cert.kind != certs.USER:
        raise CertificateRefused(
            "it is a host certificate; a worker host logs in with a user certificate (sign without -h)", host
        )
    authority = next(
        (e for e in entries if e.cert_authority and e.key.blob() == cert.ca_key.blob()),
        None,
    )
    if authority is None:
        raise CertificateRefused(f"no cert-authority line trusts its CA {cert.ca_fingerprint}", host)
    if now is not None:
        problem = cert.validity_problem(now)
        if problem is not None:
            raise CertificateRefused(f"it {problem}", host)
    if revocations.broken is not None:
        if now is not None:  # a live connection is not cut for a list that is being edited
            raise CertificateRefused(f"the revocation list cannot be used ({revocations.broken})", host)
    else:
        revoked = revocations.revokes(cert)
        if revoked is not None:
            raise CertificateRefused(revoked, host)
    for name, value in cert.critical_options:
        if name not in KNOWN_CRITICAL_OPTIONS:
            raise CertificateRefused(f"it has the critical option {name!r}, which is not supported", host)
        if peer is None or not source_address_allows(value, peer):
            raise CertificateRefused(
                f"the connection is not from its source-address {quote(value, 100)!r}", host
            )
    if failure is not None:
        raise failure
    if not any(fnmatch.fnmatchcase(host, p) for p in authority.principals):
        raise CertificateRefused(
            f"its CA's line ({authority.source}) allows only the hosts principals={','.join(authority.principals)}",
            host,
        )
    if authority.from_patterns and (peer is None or not address_matches(peer, authority.from_patterns)):
        raise CertificateRefused(f"not in its CA line's from= list ({authority.source})", host)
    return attrs.evolve(
        authority,
        name=host,
        key=cert.key,
        workers=tuple(p.replace(HOST_TOKEN, host) for p in authority.workers),
        cert_authority=False,
        principals=("*",),
        certificate=cert,
        cert_workers=narrowing,
    )


def _refused(cert: Any, host: str, where: str, why: str) -> defer.Deferred[Any]:
    """Log why ``cert`` may not log in as ``host``; the login's failure."""
    log.warn(
        "refused {certificate} for host {host} ({fingerprint}){where}: {why}",
        certificate=cert.describe(),
        host=host,
        fingerprint=cert.fingerprint,
        where=where,
        why=why,
    )
    return defer.fail(error.UnauthorizedLogin())


class CertificateAuthority:
    """The certificates side of the master's public-key check: `check` for a login,
    `recheck` for a connection already in when authorized_hosts or the list change."""

    def __init__(self, entries: Callable[[], Iterable[HostEntry]], clock: Any) -> None:
        self.entries = entries
        self.clock = clock
        self.revocations = NO_REVOCATIONS

    def check(self, creds: Any, peer: str | None) -> defer.Deferred[Any]:
        """``requestAvatarId`` for a certificate: the derived `HostEntry`, or UnauthorizedLogin."""
        where = f" from {peer}" if peer else ""
        try:
            cert = certs.parse_certificate(creds.blob)
        except CertificateError as e:
            log.info("refused a certificate{where}: {why}", where=where, why=str(e))
            return defer.fail(error.UnauthorizedLogin())
        try:
            entry = authorize(cert, self.entries(), peer, self.revocations, self.clock.seconds())
        except CertificateRefused as e:
            return _refused(cert, e.host, where, e.why)
        algorithm = creds.algName
        if algorithm not in cert.algorithms:
            why = (
                "(SHA-1) is not accepted; use rsa-sha2-256 or rsa-sha2-512"
                if algorithm == certs.SHA1_CERT_ALGORITHM
                else f"is not one of a {cert.key_type.decode()}"
            )
            return _refused(cert, entry.name, where, f"algorithm {quote(algorithm)!r} {why}")
        if creds.signature is None:
            return defer.fail(ValidPublicKey())
        try:
            # Made by the plain key, and named by the plain algorithm.
            valid = getNS(creds.signature)[0] == certs.plain_algorithm(algorithm) and cert.key.verify(
                creds.signature, creds.sigData
            )
        except Exception:
            valid = False
        if not valid:
            log.warn(
                "bad signature for host {host} ({fingerprint}, {certificate}){where}",
                host=entry.name,
                fingerprint=cert.fingerprint,
                certificate=cert.describe(),
                where=where,
            )
            return defer.fail(error.UnauthorizedLogin())
        log.info(
            "host {host} ({fingerprint}){where} logs in with {certificate}, valid until {until};"
            " workers {workers}",
            host=entry.name,
            fingerprint=cert.fingerprint,
            where=where,
            certificate=cert.describe(),
            until=certs.when(cert.valid_before),
            workers=entry.workers_text,
        )
        return defer.succeed(entry)

    def recheck(self, entry: HostEntry, peer: str | None) -> tuple[HostEntry | None, str]:
        """A certified host's entry under the current lines and list: (the entry, "") or (None, why)."""
        assert entry.certificate is not None
        try:
            return authorize(entry.certificate, self.entries(), peer, self.revocations, None), ""
        except CertificateRefused as e:
            return None, e.why


def certificate_publickey(server: userauth.SSHUserAuthServer, packet: bytes) -> defer.Deferred[Any]:
    """Conch's ``SSHUserAuthServer.auth_publickey``, for a certificate (which Conch cannot parse).

    The same credentials go to the same portal; the signed data is RFC 4252's,
    with the certificate blob as the key and its algorithm name.
    """
    has_signature = packet[0]
    algorithm, blob, rest = getNS(packet[1:], 2)
    transport: Any = server.transport
    user: Any = server.user
    next_service: Any = server.nextService
    if has_signature:
        signed = (
            NS(transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + NS(user)
            + NS(next_service)
            + NS(b"publickey")
            + bytes((has_signature,))
            + NS(algorithm)
            + NS(blob)
        )
        creds = credentials.SSHPrivateKey(user, algorithm, blob, signed, getNS(rest)[0])
        return server.portal.login(creds, None, IConchUser)  # type: ignore[no-any-return]

    def would_do(reason: Failure) -> Failure:
        reason.trap(ValidPublicKey)
        transport.sendPacket(userauth.MSG_USERAUTH_PK_OK, packet[1:])
        return Failure(IgnoreAuthentication())

    creds = credentials.SSHPrivateKey(user, algorithm, blob, None, None)
    d: defer.Deferred[Any] = server.portal.login(creds, None, IConchUser)
    return d.addErrback(would_do)
