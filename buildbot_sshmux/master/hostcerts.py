"""The master's host certificates: what launchers with a ``host_ca`` pin verify.

A host certificate (``ssh-keygen -s CA -h -n master.example.org
ssh_host_ed25519_key.pub``, or ``buildbot-sshmux ca sign --host``) lets every
launcher that trusts the CA accept the master's key, whatever the key: the
master's keys can then be rotated without touching a worker host.

As sshd's ``HostCertificate``: the master offers, next to each plain host key
algorithm, the certificate algorithm of each certificate it has
(``ssh-ed25519-cert-v01@openssh.com``; for RSA ``rsa-sha2-512-cert-v01`` and
``rsa-sha2-256-cert-v01``), and when a client picks one it sends the
certificate as its host key and signs the exchange hash with the plain key,
under the plain algorithm's name.

Conch's server knows nothing of certificates, but it takes its host keys from
the factory's ``publicKeys``/``privateKeys`` tables by algorithm name, and
from each key only ``blob()``, ``sign()`` and ``supportedSignatureAlgorithms()``:
a `CertifiedHostKey` entered under each certificate algorithm is all it needs
(docs/internals.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.conch.ssh import keys

from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.certs import Certificate, CertificateError
from buildbot_sshmux.wire.keys import fingerprint


class CertifiedHostKey:
    """A host key and its certificate under one certificate algorithm, as Conch's factory tables hold keys."""

    def __init__(self, key: keys.Key, certificate: Certificate, algorithm: bytes) -> None:
        self.key = key
        self.certificate = certificate
        self.algorithm = algorithm

    def blob(self) -> bytes:
        """What the master sends as its host key (and hashes into the exchange): the certificate."""
        return self.certificate.blob

    def public(self) -> CertifiedHostKey:
        return self

    def sshType(self) -> bytes:
        return self.certificate.key_type

    def supportedSignatureAlgorithms(self) -> list[bytes]:
        return [self.algorithm]

    def sign(self, data: bytes, signatureType: bytes | None = None) -> bytes:
        """Sign the exchange hash with the plain key, under the plain algorithm's name."""
        return self.key.sign(data, signatureType=certs.plain_algorithm(self.algorithm))  # type: ignore[no-any-return]


def by_algorithm(host_keys: Sequence[keys.Key], certificates: Sequence[Certificate]) -> dict[bytes, Any]:
    """Entries for Conch's host key tables: each certificate algorithm -> a `CertifiedHostKey`."""
    table: dict[bytes, Any] = {}
    for cert in certificates:
        key = next((k for k in host_keys if certs.certifies(cert, k)), None)
        if key is None:
            continue  # load() refuses such a certificate; never offer what cannot be signed for
        for algorithm in cert.algorithms:
            table.setdefault(algorithm, CertifiedHostKey(key, cert, algorithm))
    return table


def install(factory: Any, certificates: Sequence[Certificate]) -> None:
    """Give a running factory new certificates: new connections offer them (renewals need no restart)."""
    factory.host_certificates = list(certificates)
    if hasattr(factory, "publicKeys"):  # Conch fills these when the factory starts
        factory.publicKeys = factory.getPublicKeys()
        factory.privateKeys = factory.getPrivateKeys()


def candidate_paths(basedir: str, key_paths: Sequence[str], explicit: Sequence[str]) -> list[Path]:
    """The certificate files: ``KEY-cert.pub`` beside each host key that has one, then ``explicit``."""
    found = [certs.certificate_path(Path(basedir, os.path.expanduser(p))) for p in key_paths]
    paths = [p for p in found if p.exists()]
    paths += [Path(basedir, os.path.expanduser(p)) for p in explicit]
    return list(dict.fromkeys(paths))


def load(
    paths: Sequence[Path], host_keys: Sequence[keys.Key], now: float
) -> tuple[list[Certificate], list[str], list[str]]:
    """Read host certificates: (certificates, errors, warnings).

    An error (unreadable, not a host certificate, certifies none of the host
    keys, a second certificate for one key) is a configuration error; a
    warning (expired, not yet valid, no principal) is served but logged, so
    that both ends say why launchers refuse it.
    """
    loaded: list[Certificate] = []
    errors: list[str] = []
    warnings: list[str] = []
    for path in paths:
        try:
            cert = certs.load_certificate(path)
        except CertificateError as e:
            errors.append(f"host certificate: {e}")
            continue
        if cert.kind != certs.HOST:
            errors.append(
                f"host certificate {path} is a user certificate: sign the host key with -h"
                " (buildbot-sshmux ca sign --host)"
            )
            continue
        if not any(certs.certifies(cert, k) for k in host_keys):
            errors.append(
                f"host certificate {path} certifies {cert.fingerprint}, which is none of host_keys"
                f" ({', '.join(fingerprint(k) for k in host_keys)})"
            )
            continue
        if any(c.blob == cert.blob for c in loaded):
            continue
        twin = next((c for c in loaded if c.key.blob() == cert.key.blob()), None)
        if twin is not None:
            errors.append(
                f"host certificate {path}: a second certificate for the host key {cert.fingerprint}"
            )
            continue
        problem = cert.validity_problem(now)
        if problem is not None:
            warnings.append(f"host certificate {path} {problem}; launchers that trust its CA will refuse it")
        if not cert.principals:
            warnings.append(
                f"host certificate {path} names no principal; launchers refuse it (sign with -n HOSTNAME)"
            )
        loaded.append(cert)
    return loaded, errors, warnings
