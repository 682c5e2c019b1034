"""SSHMuxService.checkConfig with certificates: host certificates beside the keys or named,
and the revocation list, each fault one config error (an expired certificate a warning)."""

from __future__ import annotations

import warnings

from buildbot.warnings import ConfigWarning
from twisted.trial import unittest

from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import generate_ed25519, load_private_key, public_line, write_private_key

from . import certkit
from .test_service_config import config_errors
from .tmpdirs import scratch_dir

CA = generate_ed25519()


class CertificateConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.host_key = self.dir / "ssh_host_ed25519_key"
        write_private_key(self.host_key, generate_ed25519())
        self.key = load_private_key(self.host_key)
        self.hosts = self.dir / "authorized_hosts"
        self.hosts.write_text(f'cert-authority,workers="*-{{host}}" {public_line(CA)} ca\n')
        self.revoked = self.dir / "revoked_certificates"
        self.revoked.write_text("serial: 3\n")

    def errors(self, **kwargs: object) -> list[str]:
        kwargs.setdefault("host_keys", [str(self.host_key)])
        kwargs.setdefault("authorized_hosts", str(self.hosts))
        return config_errors(**kwargs)

    def beside(self, cert: certs.Certificate) -> None:
        (self.dir / "ssh_host_ed25519_key-cert.pub").write_text(cert.line() + "\n")

    def test_good_certificates_and_list(self) -> None:
        self.beside(certkit.sign(CA, self.key, ("m1.example.org",), kind=certs.HOST))
        self.assertEqual(self.errors(revoked_certificates=str(self.revoked)), [])

    def test_user_certificate_beside_a_host_key(self) -> None:
        self.beside(certkit.sign(CA, self.key, ("m1.example.org",)))
        [error] = self.errors()
        self.assertIn("is a user certificate: sign the host key with -h", error)

    def test_named_certificate_of_another_key(self) -> None:
        other = self.dir / "other-cert.pub"
        other.write_text(certkit.sign(CA, generate_ed25519(), ("m1",), kind=certs.HOST).line() + "\n")
        [error] = self.errors(host_certificates=[str(other)])
        self.assertIn("which is none of host_keys", error)

    def test_missing_or_bad_revocation_list(self) -> None:
        [error] = self.errors(revoked_certificates=str(self.dir / "nowhere"))
        self.assertIn("cannot be read", error)
        self.revoked.write_text("serial: 3\nserail: 4\n")
        [error] = self.errors(revoked_certificates=str(self.revoked))
        self.assertIn(f"{self.revoked}:2: unknown kind 'serail'", error)

    def test_expired_host_certificate_is_a_warning(self) -> None:
        t = certkit.now()
        self.beside(
            certkit.sign(CA, self.key, ("m1",), kind=certs.HOST, valid_after=t - 99, valid_before=t - 9)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.assertEqual(self.errors(), [])
        [warning] = [w for w in caught if issubclass(w.category, ConfigWarning)]
        self.assertIn("expired at", str(warning.message))
