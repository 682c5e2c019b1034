"""The master's host certificates, and the launcher that trusts their CA, in memory.

The master offers ``*-cert-v01@openssh.com`` host key algorithms for each
certificate it holds and signs the exchange with the plain key; the launcher
(``host_ca``, or ``@cert-authority`` in known_hosts) checks the CA, the
principals against the address it dials, the validity and ``@revoked``.
Certificates from ``ssh-keygen -s -h`` and from our own signer; then a key
rotated under the CA, and the files the service watches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.conch.ssh import keys
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master import certauth, certfiles, hostcerts
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import fingerprint, generate, generate_ed25519, public_line, write_private_key
from buildbot_sshmux.worker import hostca
from buildbot_sshmux.worker.link import ECDH_EXCHANGES, HostKeyPins, MuxClientTransport

from . import certkit
from .sshharness import MASTER_KEY, LogCapture, SSHPair
from .tmpdirs import scratch_dir

CA = generate_ed25519()
OTHER_CA = generate_ed25519()
MASTER = "master.example.org"  # the address SSHPair's link dials, port 2222


def ca_pins(ca: keys.Key = CA, **kwargs: Any) -> HostKeyPins:
    return HostKeyPins.from_config([], host_cas=[public_line(ca)], **kwargs)


class Harness:
    logs: LogCapture
    directory: Path

    def setUp(self) -> None:
        self.logs = LogCapture(self)  # type: ignore[arg-type]
        self.directory = scratch_dir(self)  # type: ignore[arg-type]

    def pair(
        self, cert: certs.Certificate | None, pins: HostKeyPins, master_key: keys.Key = MASTER_KEY
    ) -> SSHPair:
        pair = SSHPair(self, pins=pins)  # type: ignore[arg-type]
        pair.factory.host_keys = [master_key]
        hostcerts.install(pair.factory, [cert] if cert is not None else [])
        pair.clock.advance(time.time())
        return pair

    def accepted(self, pair: SSHPair) -> Any:
        pair.start()
        assert pair.link.connection is not None, self.logs.texts()
        return pair.client_transport()

    def refused(self, pair: SSHPair, *fragments: str) -> str:
        pair.start()
        assert pair.link.connection is None
        assert pair.link.refused
        lines = self.logs.matching(f"host certificate of {MASTER}:2222", "is refused", *fragments)
        assert len(lines) == 1, (fragments, self.logs.texts())
        return lines[0]


class Checks(Harness):
    def make(
        self,
        ca: keys.Key = CA,
        principals: tuple[str, ...] = (MASTER,),
        *,
        when: str = "now",
        host: bool = True,
        key: keys.Key = MASTER_KEY,
        serial: int = 7,
    ) -> certs.Certificate:
        raise NotImplementedError

    def test_host_ca_pin_accepts_a_certified_key(self) -> None:
        cert = self.make()
        client = self.accepted(self.pair(cert, ca_pins()))
        self.assertEqual(client.keyAlg, b"ssh-ed25519-cert-v01@openssh.com")
        self.assertIn(client.kexAlg, ECDH_EXCHANGES)
        self.assertEqual(client.host_certificate, cert)

    def test_host_ca_pin_by_fingerprint(self) -> None:
        self.accepted(self.pair(self.make(), HostKeyPins.from_config([], host_cas=[fingerprint(CA)])))

    def known_hosts(self, *lines: str) -> Path:
        path = self.directory / "known_hosts"
        path.write_text("\n".join(lines) + "\n")
        return path

    def test_cert_authority_line_in_known_hosts(self) -> None:
        path = self.known_hosts(f"@cert-authority [{MASTER}]:2222 {public_line(CA)} masters")
        self.accepted(self.pair(self.make(), HostKeyPins.from_config([], path)))

    def test_cert_authority_line_with_a_wildcard(self) -> None:
        path = self.known_hosts(f"@cert-authority [*.example.org]:2222,!evil.example.org {public_line(CA)}")
        self.accepted(self.pair(self.make(), HostKeyPins.from_config([], path)))

    def test_cert_authority_line_of_another_host_does_not_apply(self) -> None:
        # As ssh: a host on port 2222 is "[HOST]:2222"; "*.example.org" does not name it.
        path = self.known_hosts(f"@cert-authority *.example.org {public_line(CA)}")
        pair = self.pair(self.make(), HostKeyPins.from_config([], path))
        pair.start()
        self.assertIsNone(pair.link.connection)

    def test_hashed_cert_authority_line(self) -> None:
        salt = b"0123456789abcdefghij"
        digest = hmac.new(salt, f"[{MASTER}]:2222".encode(), hashlib.sha1).digest()
        hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
        path = self.known_hosts(f"@cert-authority {hashed} {public_line(CA)}")
        self.accepted(self.pair(self.make(), HostKeyPins.from_config([], path)))

    def test_wrong_ca(self) -> None:
        cert = self.make(ca=OTHER_CA)
        line = self.refused(self.pair(cert, ca_pins()), "its CA", "is not a trusted one")
        for part in (fingerprint(OTHER_CA), fingerprint(CA), fingerprint(MASTER_KEY), "serial 7"):
            self.assertIn(part, line)

    def test_expired(self) -> None:
        self.refused(self.pair(self.make(when="past"), ca_pins()), "expired at")

    def test_not_yet_valid(self) -> None:
        self.refused(self.pair(self.make(when="future"), ca_pins()), "is not valid before")

    def test_principals_do_not_name_the_master(self) -> None:
        cert = self.make(principals=("m2.example.org", "m3.example.org"))
        self.refused(self.pair(cert, ca_pins()), f"do not name {MASTER}, the address this launcher dials")

    def test_principals_are_compared_without_case(self) -> None:
        self.accepted(self.pair(self.make(principals=("Master.Example.ORG",)), ca_pins()))

    def test_user_certificate_is_not_a_host_certificate(self) -> None:
        self.refused(self.pair(self.make(host=False), ca_pins()), "it is a user certificate")

    def test_revoked_host_key(self) -> None:
        path = self.known_hosts(
            f"@cert-authority * {public_line(CA)}", f"@revoked * {public_line(MASTER_KEY)} lost laptop"
        )
        self.refused(self.pair(self.make(), HostKeyPins.from_config([], path)), "marked @revoked")

    def test_revoked_ca(self) -> None:
        path = self.known_hosts(f"@revoked * {public_line(CA)}")
        pins = HostKeyPins.from_config([], path, host_cas=[public_line(CA)])
        self.refused(self.pair(self.make(), pins), "its CA", "marked @revoked")


class KeygenHostCertificates(Checks, TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.cas: dict[bytes, certkit.KeygenCA] = {}

    def make(
        self,
        ca: keys.Key = CA,
        principals: tuple[str, ...] = (MASTER,),
        *,
        when: str = "now",
        host: bool = True,
        key: keys.Key = MASTER_KEY,
        serial: int = 7,
    ) -> certs.Certificate:
        signer = self.cas.get(ca.blob())
        if signer is None:
            signer = self.cas[ca.blob()] = certkit.KeygenCA(self.directory, ca, f"ca{len(self.cas)}")
        validity = {"now": "-1d:+1d", "past": "-2d:-1d", "future": "+1d:+2d"}[when]
        return signer.sign(key, principals, host=host, key_id="m1", validity=validity, serial=serial)


class OurHostCertificates(Checks, TestCase):
    def make(
        self,
        ca: keys.Key = CA,
        principals: tuple[str, ...] = (MASTER,),
        *,
        when: str = "now",
        host: bool = True,
        key: keys.Key = MASTER_KEY,
        serial: int = 7,
    ) -> certs.Certificate:
        t = certkit.now()
        after, before = {
            "now": (t - 60, t + 3600),
            "past": (t - 7200, t - 3600),
            "future": (t + 3600, t + 7200),
        }[when]
        kind = certs.HOST if host else certs.USER
        return certkit.sign(
            ca, key, principals, kind=kind, key_id="m1", valid_after=after, valid_before=before, serial=serial
        )

    def test_rsa_host_key_signs_as_rsa_sha2_512_cert(self) -> None:
        rsa_key = keys.Key(rsa.generate_private_key(65537, 2048))
        client = self.accepted(self.pair(self.make(key=rsa_key), ca_pins(), master_key=rsa_key))
        self.assertEqual(client.keyAlg, b"rsa-sha2-512-cert-v01@openssh.com")

    def test_ecdsa_host_key_and_ca(self) -> None:
        ecdsa_key, ecdsa_ca = generate("ecdsa"), generate("ecdsa")
        client = self.accepted(self.pair(self.make(ca=ecdsa_ca, key=ecdsa_key), ca_pins(ecdsa_ca), ecdsa_key))
        self.assertEqual(client.keyAlg, b"ecdsa-sha2-nistp256-cert-v01@openssh.com")

    def test_master_offers_its_plain_key_to_a_launcher_that_pins_it(self) -> None:
        pins = HostKeyPins.from_config([public_line(MASTER_KEY)])
        client = self.accepted(self.pair(self.make(), pins))
        self.assertEqual(client.keyAlg, b"ssh-ed25519")
        self.assertIsNone(client.host_certificate)

    def test_ca_pinned_launcher_and_a_master_without_certificate(self) -> None:
        pair = self.pair(None, ca_pins())
        pair.start()
        self.assertIsNone(pair.link.connection)
        self.assertTrue(
            self.logs.matching(
                fingerprint(MASTER_KEY), f"expected a host certificate of CA {fingerprint(CA)}"
            )
        )

    def test_a_refused_certificate_makes_the_next_dial_ask_for_plain_keys_first(self) -> None:
        pair = self.pair(self.make(when="past"), ca_pins())
        pair.start()
        self.assertIn(b"ssh-ed25519-cert-v01@openssh.com", pair.link.mismatched_types)
        later = MuxClientTransport(pair.link)
        self.assertEqual(later.supportedPublicKeys[-1], b"ssh-ed25519-cert-v01@openssh.com")

    def test_master_key_rotated_under_the_ca_needs_no_launcher_change(self) -> None:
        pins = ca_pins()
        first = self.accepted(self.pair(self.make(), pins))
        new_key = generate_ed25519()
        second = self.accepted(self.pair(self.make(key=new_key, serial=8), pins, master_key=new_key))
        self.assertEqual(first.host_certificate.key, MASTER_KEY.public())
        self.assertEqual(second.host_certificate.key, new_key.public())

    def test_kex_algorithms_when_a_ca_is_pinned(self) -> None:
        pair = self.pair(self.make(), ca_pins())
        pair.start()
        transport = pair.client_transport()
        self.assertTrue(set(transport.supportedKeyExchanges) <= set(ECDH_EXCHANGES))
        self.assertEqual(transport.supportedPublicKeys[0], b"ssh-ed25519-cert-v01@openssh.com")


class HostnameMatching(TestCase):
    def test_patterns(self) -> None:
        self.assertTrue(hostca.host_matches("[m1.example.org]:2222", "[*.example.org]:2222"))
        self.assertTrue(hostca.host_matches("m1.example.org", "*.example.org,other"))
        self.assertFalse(hostca.host_matches("[m1.example.org]:2222", "*.example.org"))
        self.assertTrue(hostca.host_matches("[m1.example.org]:2222", "*"))
        self.assertFalse(hostca.host_matches("m1.example.org", "*,!m1.example.org"))
        self.assertTrue(hostca.host_matches("m1", "m?"))
        self.assertFalse(hostca.host_matches("m12", "m?"))
        self.assertTrue(hostca.host_matches("M1.Example.org", "m1.example.ORG"))

    def test_unparsable_marker_lines_are_skipped(self) -> None:
        path = scratch_dir(self) / "known_hosts"
        path.write_text(
            f"@cert-authority * ssh-ed25519 notbase64\n@revoked\n@cert-authority * {public_line(CA)}\n"
        )
        self.assertEqual([m.key for m in hostca.read_markers(path)], [CA.public()])


class MasterSideFiles(TestCase):
    """What SSHMuxService loads: KEY-cert.pub beside each host key, host_certificates=, the revocation list."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.directory = scratch_dir(self)
        self.key_path = self.directory / "ssh_host_ed25519_key"
        write_private_key(self.key_path, MASTER_KEY, "master")

    def write(self, cert: certs.Certificate, name: str = "ssh_host_ed25519_key-cert.pub") -> Path:
        path = self.directory / name
        path.write_text(cert.line() + "\n")
        return path

    def files(self, **kwargs: Any) -> certfiles.CertificateFiles:
        return certfiles.CertificateFiles(str(self.directory), [self.key_path.name], [MASTER_KEY], **kwargs)

    def test_certificate_beside_the_key_is_picked_up(self) -> None:
        cert = certkit.sign(CA, MASTER_KEY, (MASTER,), kind=certs.HOST)
        self.write(cert)
        files = self.files()
        self.assertEqual(files.load(time.time()), ([], []))
        self.assertEqual(files.certificates, [cert])

    def test_explicit_certificate(self) -> None:
        cert = certkit.sign(CA, MASTER_KEY, (MASTER,), kind=certs.HOST)
        self.write(cert, "elsewhere.pub")
        files = self.files(host_certificates=["elsewhere.pub"])
        self.assertEqual(files.load(time.time()), ([], []))
        self.assertEqual(files.certificates, [cert])

    def test_errors_and_warnings(self) -> None:
        t = certkit.now()
        cases = {
            "user.pub": (certkit.sign(CA, MASTER_KEY, (MASTER,)), "is a user certificate"),
            "other.pub": (
                certkit.sign(CA, generate_ed25519(), (MASTER,), kind=certs.HOST),
                "which is none of",
            ),
        }
        for name, (cert, _why) in cases.items():
            self.write(cert, name)
        files = self.files(host_certificates=[*cases, "missing.pub"])
        errors, _warnings = files.load(time.time())
        self.assertEqual(len(errors), 3, errors)
        for (_cert, why), error in zip(cases.values(), errors):
            self.assertIn(why, error)
        self.assertIn("does not exist", errors[2])
        old = certkit.sign(
            CA, MASTER_KEY, (MASTER,), kind=certs.HOST, valid_after=t - 7200, valid_before=t - 3600
        )
        self.write(old)
        errors, warnings = self.files().load(time.time())
        self.assertEqual(errors, [])
        self.assertIn("expired at", warnings[0])

    def test_two_certificates_for_one_key(self) -> None:
        self.write(certkit.sign(CA, MASTER_KEY, (MASTER,), kind=certs.HOST, serial=1))
        self.write(certkit.sign(CA, MASTER_KEY, (MASTER,), kind=certs.HOST, serial=2), "second.pub")
        errors, _ = self.files(host_certificates=["second.pub"]).load(time.time())
        self.assertIn("a second certificate for the host key", errors[0])

    def test_renewed_certificate_is_offered_to_new_connections(self) -> None:
        pair = SSHPair(self, pins=ca_pins())
        pair.clock.advance(time.time())
        files = self.files()
        files.load(time.time())
        files.apply(pair.factory)
        self.assertNotIn(b"ssh-ed25519-cert-v01@openssh.com", pair.factory.publicKeys)
        cert = certkit.sign(CA, MASTER_KEY, (MASTER,), kind=certs.HOST)
        self.write(cert)
        files.check(pair.factory, time.time())
        self.assertEqual(pair.factory.publicKeys[b"ssh-ed25519-cert-v01@openssh.com"].certificate, cert)
        self.assertTrue(self.logs.matching("host certificates reloaded", cert.describe()))
        pair.start()
        self.assertEqual(pair.client_transport().host_certificate, cert)
        # A broken renewal keeps the certificate loaded before.
        self.write(certkit.sign(CA, MASTER_KEY, (MASTER,)))
        files.check(pair.factory, time.time())
        self.assertEqual(pair.factory.publicKeys[b"ssh-ed25519-cert-v01@openssh.com"].certificate, cert)
        self.assertTrue(
            self.logs.matching("is a user certificate", "offering the host certificates loaded before")
        )

    def test_revocation_list_is_watched(self) -> None:
        revoked = self.directory / "revoked_certificates"
        revoked.write_text("# nothing yet\n")
        pair = SSHPair(self)
        files = self.files(revoked_certificates=revoked.name)
        self.assertEqual(files.load(time.time()), ([], []))
        files.apply(pair.factory)
        revoked.write_text("serial: 5\nid: old-one\n")
        files.check(pair.factory, time.time())
        self.assertEqual(pair.factory.authority.revocations.serials, ((5, 5),))
        self.assertTrue(self.logs.matching("revoked_certificates", "reloaded: 2 entries"))
        revoked.write_text("serial: five\n")
        files.check(pair.factory, time.time())
        self.assertIsNotNone(pair.factory.authority.revocations.broken)
        self.assertTrue(self.logs.matching("revoked_certificates:1", "every certificate login is refused"))
        revoked.unlink()
        files.check(pair.factory, time.time())
        self.assertIn("cannot be read", pair.factory.authority.revocations.broken or "")

    def test_missing_revocation_list_is_a_configuration_error(self) -> None:
        errors, _ = self.files(revoked_certificates="nowhere").load(time.time())
        self.assertIn("cannot be read", errors[0])


class RevocationListSyntax(TestCase):
    def test_krl_specification_lines(self) -> None:
        key = generate_ed25519()
        text = (
            "# comment\n\nserial: 17\nserial: 0x20-0x2f\nid: debian-sid 2026\n"
            f"hash: {fingerprint(CA)}\nkey: {public_line(key)} comment\n"
        )
        revocations = certauth.parse_revocations(text.encode(), "r")
        self.assertEqual(revocations.serials, ((17, 17), (32, 47)))
        self.assertEqual(revocations.key_ids, frozenset({"debian-sid 2026"}))
        self.assertEqual(revocations.fingerprints, frozenset({fingerprint(CA), fingerprint(key)}))

    def test_bad_lines_name_their_line(self) -> None:
        for text, why in (
            ("serial: 0", "1 to 2^64-1"),
            ("serial: 9-3", "ends before it starts"),
            ("serail: 3", "unknown kind"),
            ("hash: MD5:aa", "only SHA256"),
            ("key: ssh-ed25519 AAAA", "r:2"),
            ("just words", "expected"),
        ):
            with self.assertRaises(certauth.RevocationListError) as caught:
                certauth.parse_revocations(f"serial: 1\n{text}\n".encode(), "r")
            self.assertIn("r:2", str(caught.exception))
            self.assertIn(why, str(caught.exception))
