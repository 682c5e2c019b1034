"""``buildbot-sshmux ca init|sign|revoke``, ``authorize --cert-authority``, and the launcher's
certificate settings, run in process; ``ssh-keygen -L`` and ``-k`` read what they write."""

from __future__ import annotations

import subprocess
from pathlib import Path
from unittest import mock

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from buildbot_sshmux.cli import admin, ca, ssh_worker
from buildbot_sshmux.errors import ConfigError, SSHMuxError
from buildbot_sshmux.master import certauth
from buildbot_sshmux.master.authorized_hosts import load
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import (
    fingerprint,
    generate_ed25519,
    load_private_key,
    public_line,
    write_private_key,
)
from buildbot_sshmux.worker import config as launcher_config
from buildbot_sshmux.worker import launcher

from . import certkit
from .test_keytools_cli import mode, run
from .tmpdirs import scratch_dir


def keygen_list(path: Path) -> str:
    """``ssh-keygen -L -f PATH``'s output (the test is skipped without ssh-keygen)."""
    if certkit.SSH_KEYGEN is None:
        raise SkipTest(certkit.NO_KEYGEN)
    done = subprocess.run(
        [certkit.SSH_KEYGEN, "-L", "-f", str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class CATests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.ca = self.dir / "hosts-ca"
        code, self.init_out, err = run(admin.main, ["ca", "init", str(self.ca)])
        self.assertEqual(code, 0, err)
        self.host_key = generate_ed25519()
        self.identity = self.dir / "id_ed25519"
        write_private_key(self.identity, self.host_key, "debian-sid")

    def sign(self, *argv: str) -> tuple[int, str, str]:
        return run(admin.main, ["ca", "sign", "--ca", str(self.ca), *argv])

    def test_init_writes_a_private_key_and_prints_how_to_trust_it(self) -> None:
        key = load_private_key(self.ca)
        self.assertEqual(mode(self.ca), 0o600)
        self.assertIn(f"CA fingerprint {fingerprint(key)}", self.init_out)
        self.assertIn(f"--cert-authority --workers '*-{{host}}' {self.ca}.pub", self.init_out)
        self.assertIn(f'host_ca = "{public_line(key)}"', self.init_out)
        self.assertIn(f"@cert-authority * {public_line(key)}", self.init_out)
        code, _out, err = run(admin.main, ["ca", "init", str(self.ca)])
        self.assertEqual(code, 2)
        self.assertIn("exists", err)

    def test_sign_a_worker_host_key(self) -> None:
        code, out, err = self.sign(
            "--principals", "debian-sid,workers:*-debian-sid", "--validity", "+30d", f"{self.identity}.pub"
        )
        self.assertEqual(code, 0, err)
        path = self.dir / "id_ed25519-cert.pub"
        cert = certs.load_certificate(path)
        self.assertEqual(cert.kind, certs.USER)
        self.assertEqual(cert.principals, ("debian-sid", "workers:*-debian-sid"))
        self.assertEqual(cert.key_id, "debian-sid")
        self.assertTrue(certs.certifies(cert, self.host_key))
        self.assertAlmostEqual(cert.valid_before - cert.valid_after, 30 * 86400 + ca.BACKDATE, delta=2)
        self.assertIn(f"wrote {path}: user certificate 'debian-sid' serial {cert.serial}", out)
        self.assertNotEqual(cert.serial, 0)
        listed = keygen_list(path)
        self.assertIn("ssh-ed25519-cert-v01@openssh.com user certificate", listed)
        self.assertIn(f"Serial: {cert.serial}", listed)
        self.assertIn("workers:*-debian-sid", listed)
        self.assertIn("permit-port-forwarding", listed)
        self.assertIn(f"Signing CA: ED25519 {cert.ca_fingerprint}", listed)

    def test_sign_a_master_host_key(self) -> None:
        master = self.dir / "ssh_host_ed25519_key"
        write_private_key(master, generate_ed25519(), "master")
        code, out, err = self.sign(
            "--host-certificate", "--principals", "m1.example.org,m1", "--id", "m1-2026", "--serial", "9",
            "--validity", "20260101:20270101", f"{master}.pub",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        cert = certs.load_certificate(self.dir / "ssh_host_ed25519_key-cert.pub")
        self.assertEqual((cert.kind, cert.serial, cert.key_id), (certs.HOST, 9, "m1-2026"))
        self.assertEqual((certs.when(cert.valid_after), certs.when(cert.valid_before)),
                         ("2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"))  # fmt: skip
        self.assertIn(
            "the master offers ssh_host_ed25519_key-cert.pub from beside its host key within seconds", out
        )
        self.assertIn("host certificate", keygen_list(self.dir / "ssh_host_ed25519_key-cert.pub"))

    def test_sign_with_source_address(self) -> None:
        code, _out, err = self.sign(
            "--principals", "debian-sid", "--source-address", "10.0.0.0/8,192.0.2.7", f"{self.identity}.pub"
        )
        self.assertEqual(code, 0, err)
        cert = certs.load_certificate(self.dir / "id_ed25519-cert.pub")
        self.assertEqual(cert.critical_options, (("source-address", b"10.0.0.0/8,192.0.2.7"),))

    def test_sign_refuses(self) -> None:
        pub = f"{self.identity}.pub"
        for argv, why in (
            (["--principals", "a,b", pub], "exactly one host"),
            (["--principals", "*", pub], "exactly one host"),
            (["--principals", "debian-sid", "--validity", "+1x", pub], "is not a time"),
            (["--principals", "debian-sid", "--validity", "+1d:-1d", pub], "ends before it starts"),
            (["--principals", "debian-sid", "--source-address", "nowhere", pub], "not an address"),
            (
                ["--host-certificate", "--principals", "m", "--source-address", "10.0.0.1", pub],
                "worker hosts'",
            ),
            (["--principals", "debian-sid", str(self.identity)], "is a private key"),
        ):
            code, _out, err = self.sign(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(why, err)
        self.assertEqual(self.sign("--principals", "debian-sid", pub)[0], 0)
        code, _out, err = self.sign("--principals", "debian-sid", pub)
        self.assertIn("exists; give --force", err)
        self.assertEqual(self.sign("--principals", "debian-sid", "--force", pub)[0], 0)

    def test_encrypted_ca_key_asks_for_its_passphrase(self) -> None:
        locked = self.dir / "locked-ca"
        write_private_key(locked, generate_ed25519(), "locked", passphrase=b"s3cret")
        with mock.patch("getpass.getpass", return_value="s3cret"):
            code, _out, err = run(
                admin.main,
                ["ca", "sign", "--ca", str(locked), "--principals", "debian-sid", f"{self.identity}.pub"],
            )
        self.assertEqual(code, 0, err)

    def revoke(self, *argv: str) -> tuple[int, str, str]:
        return run(admin.main, ["ca", "revoke", "--file", str(self.dir / "revoked"), *argv])

    def test_revoke_writes_ssh_keygen_krl_specification_lines(self) -> None:
        self.sign("--principals", "debian-sid", "--serial", "42", f"{self.identity}.pub")
        cert_path = self.dir / "id_ed25519-cert.pub"
        code, out, err = self.revoke("--certificate", str(cert_path))
        self.assertEqual(code, 0, err)
        self.assertIn("revoked 'serial: 42'", out)
        self.assertEqual(self.revoke("--key-id", "old-laptop")[0], 0)
        self.assertEqual(self.revoke("--key", f"{self.ca}.pub")[0], 0)
        text = (self.dir / "revoked").read_text()
        revocations = certauth.parse_revocations(text.encode(), "revoked")
        self.assertEqual(revocations.serials, ((42, 42),))
        self.assertEqual(revocations.key_ids, frozenset({"old-laptop"}))
        self.assertEqual(revocations.fingerprints, frozenset({fingerprint(load_private_key(self.ca))}))
        self.assertEqual(mode(self.dir / "revoked"), 0o600)
        # ssh-keygen makes a KRL of the same file, which revokes the certificate.
        if certkit.SSH_KEYGEN is None:
            raise SkipTest(certkit.NO_KEYGEN)
        krl = self.dir / "krl"
        subprocess.run(
            [certkit.SSH_KEYGEN, "-k", "-f", str(krl), "-s", f"{self.ca}.pub", str(self.dir / "revoked")],
            check=True,
            capture_output=True,
            timeout=30,
        )
        query = subprocess.run(
            [certkit.SSH_KEYGEN, "-Q", "-f", str(krl), str(cert_path)], capture_output=True, text=True
        )
        self.assertIn("REVOKED", query.stdout)

    def test_revoking_a_certificate_of_serial_zero_revokes_its_key_id(self) -> None:
        cert = certkit.sign(load_private_key(self.ca), self.host_key, serial=0, key_id="sid-zero")
        path = self.dir / "zero-cert.pub"
        path.write_text(cert.line() + "\n")
        code, out, err = self.revoke("--certificate", str(path))
        self.assertEqual(code, 0, err)
        self.assertIn("revoked 'id: sid-zero'", out)

    def test_revoke_refuses(self) -> None:
        self.assertIn("say what to revoke", self.revoke()[2])
        self.assertIn("say what to revoke", self.revoke("--serial", "1", "--key-id", "x")[2])
        self.assertIn("1 to 2^64-1", self.revoke("--serial", "0")[2])
        (self.dir / "revoked").write_text("serail: 3\n")
        code, _out, err = self.revoke("--serial", "3")
        self.assertEqual(code, 2)
        self.assertIn("fix the list first", err)
        code, _out, err = run(admin.main, ["ca", "revoke", "--serial", "3"])
        self.assertIn("BASEDIR", err)

    def test_revoke_in_a_master_basedir(self) -> None:
        (self.dir / "sshmux").mkdir()
        code, _out, err = run(admin.main, ["ca", "revoke", str(self.dir), "--serial", "5"])
        self.assertEqual(code, 0, err)
        self.assertIn("serial: 5", (self.dir / "sshmux" / "revoked_certificates").read_text())


class ValidityTests(TestCase):
    def test_forms(self) -> None:
        now = 1_800_000_000
        self.assertEqual(ca.parse_validity("+52w", now), (now - 300, now + 52 * 7 * 86400))
        self.assertEqual(ca.parse_validity("-1d:+1h30m", now), (now - 86400, now + 5400))
        self.assertEqual(ca.parse_validity("always:forever", now), (0, certs.FOREVER))
        self.assertEqual(ca.parse_validity("20260101:20260102123000Z", now), (1767225600, 1767357000))
        for bad in ("", "soon", "+5y", "forever:always", "202601:20270101"):
            with self.assertRaises(SSHMuxError):
                ca.parse_validity(bad, now)


class AuthorizeCertAuthorityTests(TestCase):
    def setUp(self) -> None:
        self.basedir = scratch_dir(self)
        (self.basedir / "sshmux").mkdir()
        self.ca_key = generate_ed25519()
        self.pub = self.basedir / "ca.pub"
        self.pub.write_text(public_line(self.ca_key, "hosts-ca") + "\n")

    def test_authorize_a_ca_and_list_it(self) -> None:
        code, out, err = run(
            admin.main,
            ["authorize", str(self.basedir), "--cert-authority", "--workers", "*-{host}",
             "--principals", "debian-*,fedora-*", str(self.pub)],
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn(f"authorized CA hosts-ca ({fingerprint(self.ca_key)})", out)
        path = self.basedir / "sshmux" / "authorized_hosts"
        line = path.read_text().strip()
        self.assertTrue(
            line.startswith('cert-authority,workers="*-{host}",principals="debian-*,fedora-*" ssh-ed25519 ')
        )
        [entry], errors = load(path)
        self.assertEqual(errors, [])
        self.assertTrue(entry.cert_authority)
        self.assertEqual(entry.principals, ("debian-*", "fedora-*"))
        self.assertFalse(entry.may_attach("x-debian-sid"))  # a CA line never logs in by itself
        code, out, _err = run(admin.main, ["list", str(self.basedir)])
        self.assertIn(f"CA hosts-ca  {fingerprint(self.ca_key)}  *-{{host}}", out)
        # revoke --host NAME never removes a CA line; --fingerprint does.
        code, _out, err = run(admin.main, ["revoke", str(self.basedir), "--host", "hosts-ca"])
        self.assertEqual(code, 2, err)
        code, _out, err = run(
            admin.main, ["revoke", str(self.basedir), "--fingerprint", fingerprint(self.ca_key)]
        )
        self.assertEqual(code, 0, err)

    def test_authorize_refuses(self) -> None:
        for argv, why in (
            (["--cert-authority", "--host", "h", "--workers", "*"], "give --host NAME for a host's key, or"),
            (["--workers", "*"], "give --host NAME for a host's key, or"),
            (["--host", "h", "--principals", "a", "--workers", "*"], "--principals is for --cert-authority"),
            (["--host", "h", "--workers", "*-{host}"], "only {host}, on a cert-authority line"),
        ):
            code, _out, err = run(admin.main, ["authorize", str(self.basedir), *argv, str(self.pub)])
            self.assertEqual(code, 2, argv)
            self.assertIn(why, err)


class LauncherSettingsTests(TestCase):
    """host_ca and identity_certificate in the launcher's TOML; keygen and a stale certificate."""

    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.key = generate_ed25519()
        write_private_key(self.dir / "id_ed25519", self.key, "debian-sid")
        self.ca_key = generate_ed25519()

    def config(self, extra: str) -> Path:
        path = self.dir / "ssh-worker.toml"
        path.write_text(
            f'[master]\naddress = "m1.example.org"\nidentity = "id_ed25519"\n{extra}\n'
            '[[worker]]\nname = "w"\npassword = "p"\n'
        )
        return path

    def test_host_ca_alone_is_a_pin(self) -> None:
        config = launcher_config.load(self.config(f'host_ca = "{public_line(self.ca_key)}"'))
        [master] = config.masters
        self.assertEqual(master.host_cas, (public_line(self.ca_key),))
        link = launcher._link(master, reactor, config.path)
        self.assertEqual(link.pins.ca_fingerprints, (fingerprint(self.ca_key),))
        self.assertEqual(link.certificate, self.dir / "id_ed25519-cert.pub")
        self.assertFalse(link.certificate_required)

    def test_host_ca_in_a_cluster(self) -> None:
        path = self.dir / "cluster.toml"
        path.write_text(
            f'[cluster]\nmasters = ["m1", {{ address = "m2", host_ca = "{fingerprint(self.key)}" }}]\n'
            f'identity = "id_ed25519"\nhost_ca = "{public_line(self.ca_key)}"\n[[worker]]\nname = "w"\npassword = "p"\n'
        )
        m1, m2 = launcher_config.load(path).masters
        self.assertEqual(m1.host_cas, (public_line(self.ca_key),))
        self.assertEqual(m2.host_cas, (fingerprint(self.key),))

    def test_no_pin_at_all_is_refused(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            launcher_config.load(self.config(""))
        self.assertIn("no host_key, host_ca or known_hosts", str(caught.exception))

    def test_certificate_beside_the_identity_is_checked_at_start(self) -> None:
        ca_key = load_private_key(self.dir / "id_ed25519")  # any key signs
        for cert, why in (
            (certkit.sign(ca_key, generate_ed25519()), "not this host's key"),
            (certkit.sign(ca_key, self.key, kind=certs.HOST), "is a host certificate"),
        ):
            (self.dir / "id_ed25519-cert.pub").write_text(cert.line() + "\n")
            config = launcher_config.load(self.config(f'host_ca = "{public_line(self.ca_key)}"'))
            with self.assertRaises(ConfigError) as caught:
                launcher._link(config.masters[0], reactor, config.path)
            self.assertIn(why, str(caught.exception))
        (self.dir / "id_ed25519-cert.pub").write_text("garbage\n")
        with self.assertRaises(ConfigError):
            launcher._link(config.masters[0], reactor, config.path)

    def test_identity_certificate_names_its_file(self) -> None:
        cert = certkit.sign(self.ca_key, self.key)
        (self.dir / "elsewhere.pub").write_text(cert.line() + "\n")
        config = launcher_config.load(
            self.config(f'host_ca = "{public_line(self.ca_key)}"\nidentity_certificate = "elsewhere.pub"')
        )
        link = launcher._link(config.masters[0], reactor, config.path)
        self.assertEqual((link.certificate, link.certificate_required), (self.dir / "elsewhere.pub", True))
        (self.dir / "elsewhere.pub").unlink()
        with self.assertRaises(ConfigError) as caught:
            launcher._link(config.masters[0], reactor, config.path)
        self.assertIn("does not exist", str(caught.exception))

    def test_keygen_refuses_a_stale_certificate_and_says_where_one_goes(self) -> None:
        path = self.dir / "new_key"
        (self.dir / "new_key-cert.pub").write_text("old\n")
        code, _out, err = run(ssh_worker.main, ["keygen", str(path)])
        self.assertEqual(code, 2)
        self.assertIn("new_key-cert.pub exists and certifies another key", err)
        (self.dir / "new_key-cert.pub").unlink()
        code, out, err = run(ssh_worker.main, ["keygen", str(path)])
        self.assertEqual(code, 0, err)
        self.assertIn(f"put the certificate in {path}-cert.pub", out)
