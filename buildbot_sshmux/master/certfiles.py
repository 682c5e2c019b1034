"""The certificate files an `SSHMuxService` reads, and re-reads while it runs.

- ``revoked_certificates``: the revocation list (master/certauth.py).  An
  edit applies within ``reload_interval``, as one of authorized_hosts: a
  revoked host is disconnected, and can no longer log in.
- the host certificates (master/hostcerts.py): ``KEY-cert.pub`` beside each
  host key, and ``host_certificates=``.  A renewed certificate is offered to
  the next connections; the connections in place keep theirs.

As for authorized_hosts, the content is compared, not the mtime (shared
storage caches attributes), and a file that cannot be used keeps what was
loaded before (with one log line per content), except that a revocation list
that cannot be used refuses every certificate login until it is fixed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.conch.ssh import keys
from twisted.logger import Logger

from buildbot_sshmux.master import certauth, hostcerts
from buildbot_sshmux.master.certauth import RevocationListError, Revocations
from buildbot_sshmux.wire.certs import Certificate

log = Logger()


def load_revocations(path: Path) -> Revocations:
    """Read the revocation list (RevocationListError if it cannot be used)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RevocationListError(
            f"revoked_certificates {path} cannot be read ({e.strerror}); create it empty"
            " (or with buildbot-sshmux ca revoke)"
        ) from None
    return certauth.parse_revocations(data, str(path))


class CertificateFiles:
    """What the service's certificate arguments name, loaded and watched."""

    def __init__(
        self,
        basedir: str,
        host_key_paths: Sequence[str],
        host_keys: Sequence[keys.Key],
        host_certificates: Sequence[str] = (),
        revoked_certificates: str | None = None,
    ) -> None:
        self.host_keys = list(host_keys)
        self.cert_paths = hostcerts.candidate_paths(basedir, host_key_paths, host_certificates)
        self.revoked_path = (
            Path(basedir, os.path.expanduser(revoked_certificates)) if revoked_certificates else None
        )
        self.certificates: list[Certificate] = []
        self.revocations = certauth.NO_REVOCATIONS
        self._stamps: dict[str, bytes | None] = {}
        self._host_key_paths = list(host_key_paths)
        self._basedir = basedir
        self._explicit = list(host_certificates)

    def load(self, now: float) -> tuple[list[str], list[str]]:
        """Load everything once (configuration time): (errors, warnings)."""
        errors: list[str] = []
        certificates, cert_errors, warnings = hostcerts.load(self.cert_paths, self.host_keys, now)
        errors += cert_errors
        self.certificates = certificates
        self._stamps["certificates"] = self._cert_stamp()
        if self.revoked_path is not None:
            try:
                self.revocations = load_revocations(self.revoked_path)
            except RevocationListError as e:
                errors.append(str(e))
            self._stamps["revoked"] = self._file_stamp(self.revoked_path)
        return errors, warnings

    def apply(self, factory: Any) -> None:
        """Give the factory what was loaded."""
        hostcerts.install(factory, self.certificates)
        factory.authority.revocations = self.revocations

    def _cert_stamp(self) -> bytes:
        # A KEY-cert.pub that appears later is picked up too.
        paths = hostcerts.candidate_paths(self._basedir, self._host_key_paths, self._explicit)
        digest = hashlib.sha256()
        for path in paths:
            digest.update(str(path).encode() + b"\0" + (self._file_stamp(path) or b"-"))
        return digest.digest()

    @staticmethod
    def _file_stamp(path: Path) -> bytes | None:
        try:
            return hashlib.sha256(path.read_bytes()).digest()
        except OSError:
            return None

    def check(self, factory: Any, now: float) -> None:
        """Re-read what changed and apply it (the service's watch loop, every reload_interval)."""
        if self.revoked_path is not None:
            stamp = self._file_stamp(self.revoked_path)
            if stamp != self._stamps.get("revoked"):
                self._stamps["revoked"] = stamp
                try:
                    self.revocations = load_revocations(self.revoked_path)
                except RevocationListError as e:
                    self.revocations = Revocations(str(self.revoked_path), broken=str(e))
                    log.error("{error}: every certificate login is refused until it is fixed", error=str(e))
                else:
                    log.info(
                        "revoked_certificates {path} reloaded: {n} entries",
                        path=self.revoked_path,
                        n=len(self.revocations.serials)
                        + len(self.revocations.key_ids)
                        + len(self.revocations.fingerprints),
                    )
                factory.authority.revocations = self.revocations
                factory.apply_entries()
        stamp = self._cert_stamp()
        if stamp != self._stamps.get("certificates"):
            self._stamps["certificates"] = stamp
            self.cert_paths = hostcerts.candidate_paths(self._basedir, self._host_key_paths, self._explicit)
            certificates, errors, warnings = hostcerts.load(self.cert_paths, self.host_keys, now)
            for message in errors:
                log.error("{error}; offering the host certificates loaded before", error=message)
            if errors:
                return
            for message in warnings:
                log.warn("{warning}", warning=message)
            self.certificates = certificates
            hostcerts.install(factory, certificates)
            log.info(
                "host certificates reloaded: {certs}",
                certs=", ".join(c.describe() for c in certificates) or "none",
            )
