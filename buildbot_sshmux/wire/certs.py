"""OpenSSH certificates (PROTOCOL.certkeys): read, check and make them.

Conch cannot parse ``*-cert-v01@openssh.com`` blobs; ``cryptography`` can
(`load_ssh_public_identity`, `SSHCertificateBuilder`), and checks the CA's
signature.  `parse_certificate` turns a blob into a `Certificate` whose
signature has been verified and whose fields are ready for logs and
decisions; the decisions themselves (which CA, which principals, which
address) belong to each end: ``master/certauth.py`` for the worker hosts'
user certificates, ``worker/hostca.py`` for the master's host certificate.

Names: a certificate's *key type* is the one its blob starts with
(``ssh-ed25519-cert-v01@openssh.com``); the *algorithm* a peer names in a
publickey request or a KEXINIT may differ for RSA
(``rsa-sha2-512-cert-v01@openssh.com``); the signature inside is made by the
certified key's plain private key and is named by the plain algorithm
(``rsa-sha2-512``, ``ssh-ed25519``).

Needs cryptography 41.0.2 or newer (setup.cfg): 41.0.0 and 41.0.1 write and
read a critical option's value without its inner string, so their
``source-address`` is not the one ``ssh-keygen`` writes and reads.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Sequence
from pathlib import Path

from attrs import frozen
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import ssh
from twisted.conch.ssh import keys
from twisted.conch.ssh.common import getNS

from buildbot_sshmux.wire.keys import fingerprint
from buildbot_sshmux.wire.peerlog import quote

CERT_SUFFIX = b"-cert-v01@openssh.com"

# Certificate key types we read, and the fields of the certified key in each blob.
_KEY_FIELDS = {
    b"ssh-ed25519-cert-v01@openssh.com": 1,  # string pk
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,  # string curve, string Q
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": 2,
    b"ssh-rsa-cert-v01@openssh.com": 2,  # mpint e, mpint n
}
CERT_KEY_TYPES = frozenset(_KEY_FIELDS)

# Algorithms per certificate key type, preferred first; never SHA-1 (ssh-rsa-cert-v01).
_ALGORITHMS = {
    b"ssh-ed25519-cert-v01@openssh.com": (b"ssh-ed25519-cert-v01@openssh.com",),
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": (b"ecdsa-sha2-nistp256-cert-v01@openssh.com",),
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": (b"ecdsa-sha2-nistp384-cert-v01@openssh.com",),
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": (b"ecdsa-sha2-nistp521-cert-v01@openssh.com",),
    b"ssh-rsa-cert-v01@openssh.com": (
        b"rsa-sha2-512-cert-v01@openssh.com",
        b"rsa-sha2-256-cert-v01@openssh.com",
    ),
}
CERT_ALGORITHMS: tuple[bytes, ...] = tuple(a for algs in _ALGORITHMS.values() for a in algs)
"""Every certificate algorithm we accept, preferred first (ed25519, ECDSA, RSA with SHA-2)."""

SHA1_CERT_ALGORITHM = b"ssh-rsa-cert-v01@openssh.com"
CA_SIGNATURE_ALGORITHMS = frozenset(
    {
        b"ssh-ed25519",
        b"ecdsa-sha2-nistp256",
        b"ecdsa-sha2-nistp384",
        b"ecdsa-sha2-nistp521",
        b"rsa-sha2-256",
        b"rsa-sha2-512",
    }
)  # as OpenSSH's CASignatureAlgorithms since 8.2: no ssh-rsa (SHA-1)

USER, HOST = "user", "host"
FOREVER = 2**64 - 1
SOURCE_ADDRESS = "source-address"


class CertificateError(ValueError):
    """A blob or file that is not a usable OpenSSH certificate (the text says why)."""


def is_certificate(blob_or_algorithm: bytes) -> bool:
    """Whether a key blob (or an algorithm or key type name) is an OpenSSH certificate's."""
    name = blob_or_algorithm
    if name[:1] == b"\x00":  # a blob: its first field is its type
        try:
            name = getNS(blob_or_algorithm)[0]
        except Exception:
            return False
    return name.endswith(CERT_SUFFIX)


def algorithms_for(key_type: bytes) -> tuple[bytes, ...]:
    """The algorithms a certificate of ``key_type`` may be used with (SHA-2 only for RSA)."""
    return _ALGORITHMS.get(key_type, ())


def plain_algorithm(algorithm: bytes) -> bytes:
    """The signature algorithm behind a certificate algorithm: ``rsa-sha2-512-cert-v01@...`` -> ``rsa-sha2-512``."""
    return algorithm[: -len(CERT_SUFFIX)] if algorithm.endswith(CERT_SUFFIX) else algorithm


def when(timestamp: int) -> str:
    """A validity bound as UTC text (``forever`` for the largest)."""
    if timestamp >= FOREVER:
        return "forever"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return str(timestamp)


def _walk_to_signature(blob: bytes, key_type: bytes) -> bytes:
    """The signature field of a certificate blob (its last field), walking PROTOCOL.certkeys' layout."""
    rest = blob
    for _ in range(2 + _KEY_FIELDS[key_type]):  # type, nonce, the key's fields
        _, rest = getNS(rest)
    rest = rest[8 + 4 :]  # uint64 serial, uint32 type
    for _ in range(2):  # key id, principals
        _, rest = getNS(rest)
    rest = rest[8 + 8 :]  # valid after, valid before
    for _ in range(4):  # critical options, extensions, reserved, signature key
        _, rest = getNS(rest)
    signature, rest = getNS(rest)
    if rest:
        raise ValueError("trailing data")
    return signature


@frozen(repr=False)
class Certificate:
    """An OpenSSH certificate whose CA signature is valid."""

    blob: bytes
    key_type: bytes  # e.g. b"ssh-ed25519-cert-v01@openssh.com"
    key: keys.Key  # the certified (plain) public key
    kind: str  # USER or HOST
    serial: int
    key_id: str  # as the CA wrote it (decoded): quote it before logging it
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: tuple[tuple[str, bytes], ...]
    extensions: tuple[str, ...]
    ca_key: keys.Key
    signature_algorithm: bytes  # the CA's

    @property
    def fingerprint(self) -> str:
        """The certified key's fingerprint (what ``ssh-keygen -l`` prints for the certificate)."""
        return fingerprint(self.key)

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.ca_key)

    @property
    def algorithms(self) -> tuple[bytes, ...]:
        return algorithms_for(self.key_type)

    def __repr__(self) -> str:
        return f"<{self.kind} {self.describe()}, key {self.fingerprint}>"

    def describe(self) -> str:
        """Which certificate, for a log line: key id, serial and CA (the key id bounded, escaped)."""
        return f"certificate '{quote(self.key_id, 100)}' serial {self.serial} of CA {self.ca_fingerprint}"

    def validity_problem(self, now: float) -> str | None:
        """Why the certificate is not valid at ``now`` (expired, not yet valid), or None."""
        if now < self.valid_after:
            return f"is not valid before {when(self.valid_after)} (now {when(int(now))})"
        if now >= self.valid_before:
            return f"expired at {when(self.valid_before)} (now {when(int(now))})"
        return None

    def line(self, comment: str = "") -> str:
        """The certificate as an OpenSSH public key line (what a ``-cert.pub`` file holds)."""
        text = f"{self.key_type.decode('ascii')} {base64.b64encode(self.blob).decode('ascii')}"
        return f"{text} {comment}".rstrip()


def _text(value: bytes) -> str:
    return quote(value, 200)


def parse_certificate(blob: bytes) -> Certificate:
    """Parse an OpenSSH certificate blob and verify its CA signature (CertificateError if not usable)."""
    try:
        key_type = getNS(blob)[0]
    except Exception:
        raise CertificateError("not an SSH key blob") from None
    if key_type not in CERT_KEY_TYPES:
        raise CertificateError(f"unsupported certificate type {_text(key_type)!r}")
    line = key_type + b" " + base64.b64encode(blob)
    try:
        cert = ssh.load_ssh_public_identity(line)
        signature = _walk_to_signature(blob, key_type)
        signature_algorithm = getNS(signature)[0]
    except UnsupportedAlgorithm as e:
        raise CertificateError(f"unsupported certificate ({e})") from None
    except Exception as e:  # ValueError, struct.error, IndexError on a corrupt blob
        raise CertificateError(f"not a valid OpenSSH certificate ({e or type(e).__name__})") from None
    if not isinstance(cert, ssh.SSHCertificate):  # pragma: no cover (the type says -cert-v01)
        raise CertificateError("not a certificate")
    if signature_algorithm not in CA_SIGNATURE_ALGORITHMS:
        raise CertificateError(
            f"the CA signed it with {_text(signature_algorithm)!r}, which is not accepted"
            " (ssh-rsa is SHA-1: sign with an ed25519 or ECDSA CA, or rsa-sha2-512)"
        )
    try:
        cert.verify_cert_signature()
    except Exception:  # InvalidSignature; ValueError (and others) for a malformed signature
        raise CertificateError("its CA signature is not valid") from None
    try:
        key = keys.Key(cert.public_key())
        ca_key = keys.Key(cert.signature_key())
    except Exception as e:  # pragma: no cover (cryptography parsed both)
        raise CertificateError(f"unusable key in the certificate ({e})") from None
    kind = USER if cert.type == ssh.SSHCertificateType.USER else HOST
    return Certificate(
        blob=bytes(blob),
        key_type=key_type,
        key=key,
        kind=kind,
        serial=cert.serial,
        key_id=cert.key_id.decode("utf-8", "replace"),
        principals=tuple(p.decode("utf-8", "replace") for p in cert.valid_principals),
        valid_after=cert.valid_after,
        valid_before=cert.valid_before,
        critical_options=tuple((_text(k), bytes(v)) for k, v in sorted(cert.critical_options.items())),
        extensions=tuple(_text(k) for k in sorted(cert.extensions)),
        ca_key=ca_key,
        signature_algorithm=signature_algorithm,
    )


def parse_certificate_line(text: str) -> Certificate:
    """An OpenSSH certificate line (``TYPE BASE64 [comment]``, what a ``-cert.pub`` holds)."""
    fields = text.strip().split()
    if len(fields) < 2:
        raise CertificateError("expected one line: ssh-ed25519-cert-v01@openssh.com AAAA... [comment]")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("the certificate is not valid base64") from None
    cert = parse_certificate(blob)
    if cert.key_type.decode("ascii") != fields[0]:
        raise CertificateError(f"the line says {fields[0]!r} but the certificate is {cert.key_type.decode()}")
    return cert


def load_certificate(path: str | Path) -> Certificate:
    """Read a ``-cert.pub`` file (CertificateError naming the file if it cannot be used)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CertificateError(f"certificate {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CertificateError(f"certificate {path} cannot be read ({getattr(e, 'strerror', e)})") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise CertificateError(f"certificate {path}: expected one certificate line, found {len(lines)}")
    try:
        return parse_certificate_line(lines[0])
    except CertificateError as e:
        raise CertificateError(f"certificate {path}: {e}") from None


def certificate_path(key_path: str | Path) -> Path:
    """Where OpenSSH looks for a key's certificate: ``KEY-cert.pub`` beside it."""
    return Path(f"{key_path}-cert.pub")


def certifies(cert: Certificate, key: keys.Key) -> bool:
    """Whether ``cert`` certifies ``key`` (its public half)."""
    return bool(cert.key.blob() == key.public().blob())


# Making certificates (``buildbot-sshmux ca sign``)

USER_EXTENSIONS = ("permit-port-forwarding",)
"""Extensions of the user certificates we make: our master reads none, and a
stock sshd needs this one to forward the PB port (``ssh -L``)."""


def sign(
    ca: keys.Key,
    public: keys.Key,
    *,
    kind: str,
    key_id: str,
    principals: Sequence[str],
    valid_after: int,
    valid_before: int,
    serial: int,
    source_addresses: Sequence[str] = (),
) -> Certificate:
    """Sign ``public`` with the CA's private key ``ca``: a user or host certificate."""
    ca_private = ca.toString("OPENSSH", subtype="v1")
    try:
        signer = ssh.load_ssh_private_key(ca_private, password=None)
        subject = ssh.load_ssh_public_key(public.public().toString("OPENSSH"))
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"cannot use this key ({e})") from None
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(subject)  # type: ignore[arg-type]
        .serial(serial)
        .type(ssh.SSHCertificateType.USER if kind == USER else ssh.SSHCertificateType.HOST)
        .key_id(key_id.encode("utf-8"))
        .valid_principals([p.encode("utf-8") for p in principals])
        .valid_after(valid_after)
        .valid_before(valid_before)
    )
    if source_addresses:
        builder = builder.add_critical_option(SOURCE_ADDRESS.encode(), ",".join(source_addresses).encode())
    if kind == USER:
        for name in USER_EXTENSIONS:
            builder = builder.add_extension(name.encode(), b"")
    try:
        made = builder.sign(signer)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise CertificateError(f"cannot sign ({e})") from None
    return parse_certificate(base64.b64decode(made.public_bytes().split()[1]))


def random_serial() -> int:
    """A serial number for a new certificate: random, 63 bits, never 0 (a KRL cannot revoke 0)."""
    import secrets

    return secrets.randbelow(2**63 - 1) + 1
