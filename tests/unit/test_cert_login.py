"""Worker hosts logging in with OpenSSH user certificates, in memory (`SSHPair`).

The real master (`SSHMuxFactory`, `MuxUserAuthServer`) and the real launcher
link (`MasterLink`, which offers ``IDENTITY-cert.pub`` first): every rule of
``master/certauth.py`` with certificates made by ``ssh-keygen -s`` and by our
own signer, each refusal with its log line (host, key id, serial, CA), the
revocation list and authorized_hosts edits applied to live connections.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.common import NS
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master import certauth
from buildbot_sshmux.master.authorized_hosts import HostEntry, parse_line
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import fingerprint, generate_ed25519, public_line

from . import certkit
from .sshharness import (
    HOST_KEY,
    OTHER_KEY,
    LogCapture,
    SSHPair,
    connect_from,
    mux_clocked_services,
    raw_connect,
)
from .test_live_authorization import login
from .tmpdirs import scratch_dir

CA = generate_ed25519()
OTHER_CA = generate_ed25519()
RSA_KEY = keys.Key(rsa.generate_private_key(65537, 2048))


def ca_line(ca: keys.Key = CA, options: str = 'workers="*-{host}"') -> HostEntry:
    entry = parse_line(f"cert-authority,{options} {public_line(ca)} hosts-ca", "authorized_hosts:3")
    assert entry is not None
    return entry


class Harness:
    """What each test class shares: a pair whose launcher offers a certificate file."""

    logs: LogCapture
    directory: Path

    def setUp(self) -> None:
        self.logs = LogCapture(self)  # type: ignore[arg-type]
        self.directory = scratch_dir(self)  # type: ignore[arg-type]

    def pair(
        self,
        cert: certs.Certificate | None,
        entries: list[HostEntry] | None = None,
        *,
        peer: Any = None,
        identity: keys.Key = HOST_KEY,
        revocations: certauth.Revocations | None = None,
    ) -> SSHPair:
        pair = SSHPair(self, entries=[ca_line()] if entries is None else entries, identity=identity)  # type: ignore[arg-type]
        pair.factory.services = mux_clocked_services(pair.clock)
        if peer is not None:
            connect_from(pair, peer)
        pair.clock.advance(time.time())
        path = self.directory / "id_ed25519-cert.pub"
        if cert is not None:
            path.write_text(cert.line("debian-sid") + "\n")
        pair.link.certificate = path
        if revocations is not None:
            pair.factory.authority.revocations = revocations
        return pair

    def connected(self, pair: SSHPair) -> HostEntry:
        pair.start()
        assert pair.link.connection is not None, self.logs.texts()
        entry: HostEntry = pair.server.avatar.entry
        return entry

    def refused(self, pair: SSHPair, *fragments: str) -> str:
        """The pair does not log in; the master's one refusal line holds ``fragments``; return it."""
        pair.start()
        assert pair.link.connection is None, "logged in"
        lines = self.logs.matching("refused certificate", *fragments)
        assert len(lines) == 1, (fragments, self.logs.texts())
        return lines[0]


class Refusals(Harness):
    """Every rule, with certificates from `make` (ssh-keygen's or ours)."""

    def make(
        self,
        ca: keys.Key = CA,
        principals: tuple[str, ...] = ("debian-sid",),
        *,
        when: str = "now",
        host: bool = False,
        serial: int = 17,
        key_id: str = "debian-sid-1",
        source: str | None = None,
        key: keys.Key = HOST_KEY,
    ) -> certs.Certificate:
        raise NotImplementedError

    def test_valid_certificate_logs_in_as_its_host(self) -> None:
        cert = self.make()
        entry = self.connected(self.pair(cert))
        self.assertEqual(entry.name, "debian-sid")
        self.assertEqual(entry.workers, ("*-debian-sid",))
        self.assertEqual(entry.certificate, cert)
        [line] = self.logs.matching("logs in with certificate")
        for part in (
            "host debian-sid",
            fingerprint(HOST_KEY),
            "'debian-sid-1' serial 17",
            cert.ca_fingerprint,
        ):
            self.assertIn(part, line)
        [line] = self.logs.matching("connected to master", "with certificate 'debian-sid-1' serial 17")

    def assertNames(self, line: str, cert: certs.Certificate, host: str = "debian-sid") -> None:
        """A refusal says which host, key id, serial and CA."""
        for part in (f"host {host}", f"'{cert.key_id}'", f"serial {cert.serial}", cert.ca_fingerprint):
            self.assertIn(part, line)

    def test_expired(self) -> None:
        cert = self.make(when="past")
        self.assertNames(self.refused(self.pair(cert), "expired at"), cert)

    def test_not_yet_valid(self) -> None:
        cert = self.make(when="future")
        self.assertNames(self.refused(self.pair(cert), "is not valid before"), cert)

    def test_wrong_ca(self) -> None:
        cert = self.make(ca=OTHER_CA)
        line = self.refused(self.pair(cert), "no cert-authority line trusts its CA")
        self.assertNames(line, cert)
        self.assertIn(fingerprint(OTHER_CA), line)

    def test_revoked_by_serial(self) -> None:
        cert = self.make(serial=4242)
        revoked = certauth.parse_revocations(b"serial: 4000-4999\n", "revoked")
        self.assertNames(self.refused(self.pair(cert, revocations=revoked), "serial 4242 is revoked"), cert)

    def test_revoked_by_key_id(self) -> None:
        cert = self.make(key_id="sid-2026")
        revoked = certauth.parse_revocations(b"# old\nid: sid-2026\n", "revoked")
        self.assertNames(self.refused(self.pair(cert, revocations=revoked), "key id 'sid-2026'"), cert)

    def test_revoked_by_key(self) -> None:
        cert = self.make()
        revoked = certauth.parse_revocations(f"key: {public_line(HOST_KEY)}\n".encode(), "revoked")
        self.assertNames(self.refused(self.pair(cert, revocations=revoked), "its key", "is revoked"), cert)

    def test_revoked_ca(self) -> None:
        cert = self.make()
        revoked = certauth.parse_revocations(f"hash: {fingerprint(CA)}\n".encode(), "revoked")
        self.assertNames(self.refused(self.pair(cert, revocations=revoked), "its CA", "is revoked"), cert)

    def test_unusable_revocation_list_refuses_every_certificate(self) -> None:
        cert = self.make()
        broken = certauth.Revocations("revoked", broken="revoked:2: unknown kind 'serail'")
        self.refused(self.pair(cert, revocations=broken), "the revocation list cannot be used")

    def test_principal_not_allowed_by_the_ca_line(self) -> None:
        cert = self.make()
        entries = [ca_line(options='workers="*-{host}",principals="fedora-*,ubuntu-*"')]
        line = self.refused(self.pair(cert, entries), "allows only the hosts principals=fedora-*,ubuntu-*")
        self.assertNames(line, cert)

    def test_principals_name_no_host(self) -> None:
        self.refused(self.pair(self.make(principals=("workers:*-debian-sid",))), "name no host")

    def test_principals_name_two_hosts(self) -> None:
        self.refused(self.pair(self.make(principals=("debian-sid", "fedora"))), "name 2 hosts")

    def test_principal_of_an_unknown_kind(self) -> None:
        line = self.refused(self.pair(self.make(principals=("debian-sid", "group:admins"))), "unknown kind")
        self.assertNames(line, self.make(principals=("debian-sid", "group:admins")))

    def test_principal_that_is_not_a_host_name(self) -> None:
        self.refused(self.pair(self.make(principals=("*",))), "is not a host name")

    def test_source_address_mismatch(self) -> None:
        cert = self.make(source="10.0.0.0/8,192.0.2.7")
        line = self.refused(self.pair(cert), "not from its source-address '10.0.0.0/8,192.0.2.7'")
        self.assertNames(line, cert)
        self.assertIn("from 198.51.100.7", line)

    def test_source_address_match(self) -> None:
        cert = self.make(source="10.0.0.0/8,198.51.100.0/24")
        self.assertEqual(self.connected(self.pair(cert)).name, "debian-sid")

    def test_source_address_of_another_peer(self) -> None:
        cert = self.make(source="198.51.100.7/32")
        self.refused(self.pair(cert, peer=IPv4Address("TCP", "198.51.100.8", 40000)), "source-address")

    def test_host_certificate_cannot_log_in(self) -> None:
        cert = self.make(host=True)
        self.assertNames(self.refused(self.pair(cert), "it is a host certificate"), cert)

    def test_ca_line_from_applies(self) -> None:
        cert = self.make()
        entries = [ca_line(options='workers="*-{host}",from="10.0.0.0/8"')]
        self.refused(self.pair(cert, entries), "from= list")

    def test_workers_principal_narrows_the_ca_lines_workers(self) -> None:
        cert = self.make(principals=("debian-sid", "workers:libxml2-*"))
        pair = self.pair(cert, [ca_line(options='workers="*-{host},glib-fedora"')])
        entry = self.connected(pair)
        self.assertEqual(entry.cert_workers, ("libxml2-*",))
        self.assertTrue(entry.may_attach("libxml2-debian-sid"))
        self.assertFalse(entry.may_attach("glib-debian-sid"))  # the CA line allows it, the certificate not
        self.assertFalse(entry.may_attach("libxml2-fedora"))  # the certificate allows it, the CA line not
        self.assertFalse(entry.may_attach("glib-fedora"))
        _factory, d = login(pair.link, pair.flush, "libxml2-debian-sid")
        self.successResultOf(d)
        _factory, d = login(pair.link, pair.flush, "glib-fedora")
        self.failureResultOf(d)
        self.assertTrue(
            self.logs.matching(
                "may not attach worker 'glib-fedora'", "*-debian-sid,glib-fedora and libxml2-*"
            )
        )

    def test_refused_certificate_then_the_plain_key(self) -> None:
        plain = HostEntry(name="debian-sid", key=HOST_KEY.public(), workers=("*-debian-sid",))
        cert = self.make(ca=OTHER_CA)
        entry = self.connected(self.pair(cert, [ca_line(), plain]))
        self.assertIsNone(entry.certificate)
        self.assertTrue(self.logs.matching("refused this host's certificate", "trying its plain key"))

    def test_certificate_and_key_both_refused(self) -> None:
        pair = self.pair(self.make(when="past"))
        pair.start()
        self.assertIsNone(pair.link.connection)
        self.assertTrue(pair.link.refused)
        self.assertTrue(self.logs.matching("refused this host's key", "(and its certificate)"))


class KeygenCertificates(Refusals, TestCase):
    """Certificates made by ``ssh-keygen -s``."""

    def setUp(self) -> None:
        super().setUp()
        self.cas: dict[bytes, certkit.KeygenCA] = {}

    def make(
        self,
        ca: keys.Key = CA,
        principals: tuple[str, ...] = ("debian-sid",),
        *,
        when: str = "now",
        host: bool = False,
        serial: int = 17,
        key_id: str = "debian-sid-1",
        source: str | None = None,
        key: keys.Key = HOST_KEY,
    ) -> certs.Certificate:
        signer = self.cas.get(ca.blob())
        if signer is None:
            signer = self.cas[ca.blob()] = certkit.KeygenCA(self.directory, ca, f"ca{len(self.cas)}")
        validity = {"now": "-1d:+1d", "past": "-2d:-1d", "future": "+1d:+2d"}[when]
        options = [f"source-address={source}"] if source else []
        return signer.sign(
            key, principals, host=host, key_id=key_id, validity=validity, serial=serial, options=options
        )

    def test_extensions_of_ssh_keygen_are_ignored(self) -> None:
        cert = self.make()
        self.assertIn("permit-pty", cert.extensions)
        self.assertEqual(self.connected(self.pair(cert)).name, "debian-sid")


class OurCertificates(Refusals, TestCase):
    """Certificates made by `buildbot_sshmux.wire.certs.sign` (``buildbot-sshmux ca sign``)."""

    def make(
        self,
        ca: keys.Key = CA,
        principals: tuple[str, ...] = ("debian-sid",),
        *,
        when: str = "now",
        host: bool = False,
        serial: int = 17,
        key_id: str = "debian-sid-1",
        source: str | None = None,
        key: keys.Key = HOST_KEY,
    ) -> certs.Certificate:
        t = certkit.now()
        after, before = {
            "now": (t - 60, t + 3600),
            "past": (t - 7200, t - 3600),
            "future": (t + 3600, t + 7200),
        }[when]
        return certkit.sign(
            ca,
            key,
            principals,
            kind=certs.HOST if host else certs.USER,
            key_id=key_id,
            valid_after=after,
            valid_before=before,
            serial=serial,
            source_addresses=source.split(",") if source else (),
        )

    def test_rsa_certificate_of_an_rsa_ca_uses_sha2(self) -> None:
        rsa_ca = keys.Key(rsa.generate_private_key(65537, 2048))
        cert = self.make(ca=rsa_ca, key=RSA_KEY)
        self.assertEqual(cert.signature_algorithm, b"rsa-sha2-512")
        entry = self.connected(self.pair(cert, [ca_line(rsa_ca)], identity=RSA_KEY))
        self.assertEqual(entry.certificate, cert)

    def test_rsa_key_without_a_certificate_logs_in_with_sha2(self) -> None:
        plain = HostEntry(name="rsa-host", key=RSA_KEY.public(), workers=("*",))
        entry = self.connected(self.pair(None, [plain], identity=RSA_KEY))
        self.assertEqual(entry.name, "rsa-host")

    def test_certificate_of_another_key_is_not_offered(self) -> None:
        plain = HostEntry(name="debian-sid", key=HOST_KEY.public(), workers=("*-debian-sid",))
        entry = self.connected(self.pair(self.make(key=OTHER_KEY), [ca_line(), plain]))
        self.assertIsNone(entry.certificate)
        self.assertTrue(
            self.logs.matching("certifies", fingerprint(OTHER_KEY), "offering the plain key only")
        )

    def test_expiring_certificate_is_a_warning_at_login(self) -> None:
        self.connected(self.pair(self.make()))  # valid for an hour
        self.assertTrue(self.logs.matching("expires in 1.0 hours", "renew it"))


class LiveConnections(Harness, TestCase):
    """Edits of the revocation list and of authorized_hosts, applied to a host logged in with a certificate."""

    def setUp(self) -> None:
        super().setUp()
        self.cert = certkit.sign(CA, HOST_KEY, serial=99)
        self.p = self.pair(self.cert)
        self.connected(self.p)

    def assertDisconnected(self, *fragments: str) -> None:
        self.p.flush()
        self.assertIsNone(self.p.link.connection)
        self.assertTrue(self.logs.matching("is no longer authorized", *fragments), self.logs.texts())

    def test_revoking_its_serial_disconnects_it(self) -> None:
        self.p.factory.authority.revocations = certauth.parse_revocations(b"serial: 99\n", "revoked")
        self.p.factory.apply_entries()
        self.assertDisconnected("host debian-sid", "serial 99 is revoked in revoked")

    def test_removing_its_ca_line_disconnects_it(self) -> None:
        self.p.entries[:] = []
        self.p.factory.apply_entries()
        self.assertDisconnected("no cert-authority line trusts its CA")

    def test_other_edits_keep_it(self) -> None:
        self.p.factory.authority.revocations = certauth.parse_revocations(b"serial: 98\n", "revoked")
        self.p.entries.append(HostEntry(name="fedora", key=OTHER_KEY.public()))
        self.p.factory.apply_entries()
        self.p.flush()
        self.assertIsNotNone(self.p.link.connection)

    def test_a_broken_list_keeps_it_but_refuses_new_logins(self) -> None:
        self.p.factory.authority.revocations = certauth.Revocations("revoked", broken="revoked:1: bad")
        self.p.factory.apply_entries()
        self.p.flush()
        self.assertIsNotNone(self.p.link.connection)

    def test_narrowed_ca_line_closes_sessions_it_no_longer_allows(self) -> None:
        _factory, d = login(self.p.link, self.p.flush, "libxml2-debian-sid")
        self.successResultOf(d)
        self.p.entries[:] = [ca_line(options='workers="glib-{host}"')]
        self.p.factory.apply_entries()
        self.p.flush()
        self.assertIsNotNone(self.p.link.connection)
        self.assertTrue(self.logs.matching("may no longer attach worker 'libxml2-debian-sid'"))

    def test_expiry_does_not_cut_a_live_connection(self) -> None:
        # As sshd: a certificate is checked at login; revoke it to cut the connection.
        self.p.clock.advance(3 * certkit.DAY)
        self.p.factory.apply_entries()
        self.p.flush()
        self.assertIsNotNone(self.p.link.connection)


class RawRequests(TestCase):
    """What a client other than ours may send: SHA-1, a mismatched algorithm, a signature of another key."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.pair = SSHPair(self, entries=[ca_line()])
        self.pair.factory.services = mux_clocked_services(self.pair.clock)
        self.pair.clock.advance(time.time())

    def request(
        self, cert: certs.Certificate, algorithm: bytes, signer: keys.Key, signature_type: bytes
    ) -> Any:
        client, _server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        user, service = b"buildbot-worker", b"ssh-connection"
        data = b"\x01" + NS(algorithm) + NS(cert.blob)
        body = NS(user) + NS(service) + NS(b"publickey") + data
        signed = NS(client.sessionID) + bytes((userauth.MSG_USERAUTH_REQUEST,)) + body
        client.auth.request(b"publickey", data + NS(signer.sign(signed, signatureType=signature_type)))
        wire.flush()
        return client

    def test_rsa_certificate_with_sha1_is_refused(self) -> None:
        cert = certkit.sign(CA, RSA_KEY)
        client = self.request(cert, b"ssh-rsa-cert-v01@openssh.com", RSA_KEY, b"ssh-rsa")
        self.assertIsNot(client.service, client.conn)
        self.assertTrue(self.logs.matching("refused certificate", "ssh-rsa-cert-v01@openssh.com", "SHA-1"))

    def test_rsa_certificate_with_sha2_is_accepted(self) -> None:
        cert = certkit.sign(CA, RSA_KEY)
        client = self.request(cert, b"rsa-sha2-256-cert-v01@openssh.com", RSA_KEY, b"rsa-sha2-256")
        self.assertIs(client.service, client.conn)

    def test_signature_named_otherwise_than_the_algorithm_is_refused(self) -> None:
        cert = certkit.sign(CA, RSA_KEY)
        client = self.request(cert, b"rsa-sha2-512-cert-v01@openssh.com", RSA_KEY, b"rsa-sha2-256")
        self.assertIsNot(client.service, client.conn)
        self.assertTrue(self.logs.matching("bad signature for host debian-sid"))

    def test_signature_by_another_key_is_refused(self) -> None:
        cert = certkit.sign(CA, HOST_KEY)
        client = self.request(cert, b"ssh-ed25519-cert-v01@openssh.com", OTHER_KEY, b"ssh-ed25519")
        self.assertIsNot(client.service, client.conn)
        self.assertTrue(self.logs.matching("bad signature for host debian-sid", cert.describe()))

    def test_algorithm_of_another_key_type_is_refused(self) -> None:
        cert = certkit.sign(CA, HOST_KEY)
        client = self.request(cert, b"ecdsa-sha2-nistp256-cert-v01@openssh.com", HOST_KEY, b"ssh-ed25519")
        self.assertIsNot(client.service, client.conn)
        self.assertTrue(self.logs.matching("refused certificate", "is not one of a ssh-ed25519-cert"))

    def test_tampered_certificate_is_refused(self) -> None:
        cert = certkit.sign(CA, HOST_KEY, key_id="aaaa")
        blob = cert.blob.replace(b"aaaa", b"aaab")
        with self.assertRaises(certs.CertificateError):
            certs.parse_certificate(blob)
        client, _server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        client.auth.request(b"publickey", b"\x00" + NS(b"ssh-ed25519-cert-v01@openssh.com") + NS(blob))
        wire.flush()
        self.assertEqual(client.auth.replies(userauth.MSG_USERAUTH_PK_OK), [])
        self.assertTrue(self.logs.matching("refused a certificate", "CA signature is not valid"))


class CertAuthorityLines(TestCase):
    """The cert-authority line of authorized_hosts."""

    def test_a_ca_line(self) -> None:
        entry = ca_line(
            options='workers="*-{host},docs-*",principals="debian-*",from="10.0.0.0/8",max-channels=9'
        )
        self.assertEqual(
            (entry.cert_authority, entry.name, entry.workers, entry.principals, entry.from_patterns),
            (True, "hosts-ca", ("*-{host}", "docs-*"), ("debian-*",), ("10.0.0.0/8",)),
        )
        self.assertEqual(entry.max_channels, 9)
        self.assertFalse(entry.may_attach("docs-1"))  # never by itself

    def test_refused_lines(self) -> None:
        from buildbot_sshmux.master.authorized_hosts import LineError

        key = public_line(CA)
        for line, why in (
            (f"cert-authority {key}", "needs workers="),
            (f'cert-authority,host="x",workers="*" {key}', "remove host="),
            (f'cert-authority=yes,workers="*" {key}', "takes no value"),
            (f'host="x",principals="a" {key}', "for cert-authority lines only"),
            (f'host="x",workers="*-{{host}}" {key}', "only {host}, on a cert-authority line"),
            (f'cert-authority,workers="*-{{name}}" {key}', "only {host}"),
            (f'cert-authority,workers="*",principals="" {key}', "allows no host"),
        ):
            with self.assertRaises(LineError) as caught:
                parse_line(line)
            self.assertIn(why, str(caught.exception), line)

    def test_a_plain_line_of_the_ca_key_is_a_duplicate(self) -> None:
        from buildbot_sshmux.master.authorized_hosts import parse_lines

        entries, errors = parse_lines(
            [f'cert-authority,workers="*" {public_line(CA)}', f'host="x" {public_line(CA)}'], "ah"
        )
        self.assertEqual(len(entries), 1)
        self.assertIn("ah:2: the key", errors[0])
