"""SSH certificates end to end: a real master, ``ssh-worker`` processes, stock OpenSSH.

* Our master and our launchers, both ways: worker hosts log in with user
  certificates (one from ``ssh-keygen -s``, one from ``buildbot-sshmux ca
  sign``) under a single ``cert-authority`` line, and trust the master's host
  certificate through ``host_ca`` or ``@cert-authority``; builds run; ``ca
  revoke`` disconnects one host within seconds.
* The master's key rotated under the CA: the master restarts with a new key
  and a new certificate; the launcher, its config untouched, comes back.
* The stock ``ssh`` client with a user certificate, logging in to our master;
  and verifying our master's host certificate with ``@cert-authority``.
* Our launcher through a stock ``sshd`` that trusts its user certificate
  (``TrustedUserCAKeys``) and shows a host certificate (``HostCertificate``).
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.wire.keys import (
    fingerprint,
    generate,
    generate_ed25519,
    load_private_key,
    public_line,
    write_private_key,
)
from tests.integration import test_keys as K
from tests.integration import test_openssh as O

SSH_KEYGEN = O.SSH_KEYGEN
PROJECTS = K.PROJECTS


def keygen_sign(ca: Path, pub: Path, key_id: str, principals: str, *extra: str) -> Path:
    """``ssh-keygen -s CA -I ID -n PRINCIPALS [EXTRA] KEY.pub``; the ``KEY-cert.pub`` it wrote."""
    subprocess.run(
        [str(SSH_KEYGEN), "-q", "-s", str(ca), "-I", key_id, "-n", principals, *extra, str(pub)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return pub.with_name(pub.name.removesuffix(".pub") + "-cert.pub")


class WithOurMaster(K.KeysTestCase):
    """Certificates between our master and our launchers."""

    timeout = 180

    def setUp(self) -> None:
        if SSH_KEYGEN is None:
            raise unittest.SkipTest("needs ssh-keygen (apt-get install openssh-client)")
        super().setUp()

    async def make_ca(self) -> Path:
        ca = self.root / "ca"
        await self.run_admin("ca", "init", str(ca))
        return ca

    async def sign_master_key(self, ca: Path) -> None:
        """The master's host certificate, by ``buildbot-sshmux ca sign``, for the name launchers dial."""
        await self.run_admin(
            "ca", "sign", "--ca", str(ca), "--host-certificate", "--principals", "127.0.0.1,localhost",
            f"{self.site.host_key_path}.pub",
        )  # fmt: skip

    async def start_master_with(self, hosts: list[str], service: dict[str, Any], **kwargs: Any) -> Any:
        """A master whose SSHMuxService gets these further arguments; stopped at clean-up if running."""
        config = T.master_config(PROJECTS, hosts, self.site, service=service, **kwargs)
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.stop_master_once(master)))
        self.master = master
        return master

    async def stop_master_once(self, master: Any) -> None:
        """Stop a master once (the rotation test stops one itself; clean-up then skips it)."""
        if getattr(master, "_certs_stopped", False):
            return
        master._certs_stopped = True
        await T.stop_master(master)
        # Buildbot's Worker.detached restarts its 1-hour "missing" timer after
        # stopService has cancelled it (as the fault harness says): the master is gone.
        for worker in list(master.workers.workers.values()):
            worker.stopMissingTimer()

    def launch_with(self, host: str, workers: list[str], pin_line: str) -> T.LauncherProcess:
        """A launcher whose only trust in the master is ``pin_line`` (host_ca, or known_hosts)."""
        path = self.site.launcher_config(host, T.ssh_port(self.master), T.pb_port(self.master), workers)
        text = path.read_text().replace(f'host_key = "{self.site.host_key_line}"', pin_line)
        self.assertIn(pin_line, text)
        path.write_text(text)
        return self.start_launcher(path)

    def test_user_and_host_certificates_both_ways(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._both_ways())

    async def _both_ways(self) -> None:
        self.make_site(["a", "b"], authorized={})
        basedir = self.site.master_basedir
        ca = await self.make_ca()
        ca_fp, ca_line = fingerprint(load_private_key(ca)), public_line(load_private_key(ca))
        await self.run_admin(
            "authorize", str(basedir), "--cert-authority", "--workers", "proj-*-{host}", f"{ca}.pub"
        )
        await self.sign_master_key(ca)
        # Host a: a user certificate by ssh-keygen; host b: by buildbot-sshmux ca sign.
        a_pub, b_pub = Path(f"{self.site.identities['a']}.pub"), Path(f"{self.site.identities['b']}.pub")
        a_cert = keygen_sign(ca, a_pub, "a-2026", "a", "-z", "1001", "-V", "-5m:+1h")
        await self.run_admin("ca", "sign", "--ca", str(ca), "--principals", "b", "--id", "b-2026", str(b_pub))
        revoked = basedir / "sshmux" / "revoked_certificates"
        revoked.write_text("# certificates revoked with buildbot-sshmux ca revoke\n")
        master = await self.start_master_with(["a", "b"], {"revoked_certificates": str(revoked)})
        port = T.ssh_port(master)
        a_names, b_names = K.names_for(PROJECTS, "a"), K.names_for(PROJECTS, "b")
        launcher_a = self.launch_with("a", a_names, f'host_ca = "{ca_line}"')
        (self.root / "b" / "known_hosts").write_text(f"@cert-authority [127.0.0.1]:{port} {ca_line} our CA\n")
        launcher_b = self.launch_with("b", b_names, 'known_hosts = "known_hosts"')
        attach_s = await self.wait_attached(a_names + b_names, timeout=60)

        for host, key_id in (("a", "a-2026"), ("b", "b-2026")):
            self.assertTrue(
                self.log.matching(f"host {host} (", f"logs in with certificate '{key_id}'", ca_fp),
                self.diagnostics(),
            )
        transports = self.ssh_transports()
        for host in ("a", "b"):
            self.assertEqual(transports[host].keyAlg, b"ssh-ed25519-cert-v01@openssh.com")
            self.assertIsNotNone(transports[host].avatar.entry.certificate)
        for launcher in (launcher_a, launcher_b):
            self.assertRegex(
                launcher.output(), r"connected to master 127\.0\.0\.1:\d+ as SHA256:\S+ with certificate"
            )
        await self.assertBuildsGreen([(p, h) for p in PROJECTS for h in ("a", "b")])

        # Revoke host a's certificate: its connection goes, host b stays.
        started = reactor.seconds()
        await self.run_admin("ca", "revoke", str(basedir), "--certificate", str(a_cert))
        self.assertIn("serial: 1001", revoked.read_text())
        await self.wait_detached(a_names, timeout=15)
        revoke_s = reactor.seconds() - started
        self.assertTrue(self.log.matching("host a (", "is no longer authorized: its serial 1001 is revoked"))
        await self.wait_for(
            lambda: "(and its certificate)" in launcher_a.output(),
            30,
            "host a's launcher to be refused again",
        )
        self.assertTrue(self.log.matching("refused certificate 'a-2026' serial 1001", "is revoked"))
        self.assertEqual(set(b_names) - T.attached_workers(master), set())
        self.assertAlive(launcher_a)
        self.assertAlive(launcher_b)
        K.figures("certificates both ways", attach_s=attach_s, revoke_to_detach_s=revoke_s)

    def test_master_key_rotated_under_the_ca(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._rotation())

    async def _rotation(self) -> None:
        self.make_site(["a"])
        ca = await self.make_ca()
        ca_line = public_line(load_private_key(ca))
        key_path = self.site.host_key_path
        await self.sign_master_key(ca)
        ports = {
            "ssh_port": f"tcp:{O.free_port()}:interface=127.0.0.1",
            "pb_port": f"tcp:{O.free_port()}:interface=127.0.0.1",
        }
        first = await self.start_master_with(["a"], {}, **ports)
        names = K.names_for(PROJECTS, "a")
        launcher = self.launch_with("a", names, f'host_ca = "{ca_line}"')
        config_before = launcher.config.read_bytes()
        await self.wait_attached(names)
        old_fp = fingerprint(load_private_key(key_path))

        # Rotation: a new key and its certificate replace the old ones; the master restarts.
        await self.stop_master_once(first)
        for path in (key_path, Path(f"{key_path}.pub"), Path(f"{key_path}-cert.pub")):
            path.unlink()
        write_private_key(key_path, generate_ed25519(), "master, rotated")
        await self.sign_master_key(ca)
        new_fp = fingerprint(load_private_key(key_path))
        self.assertNotEqual(new_fp, old_fp)
        second = await self.start_master_with(["a"], {}, **ports)
        back_s = await self.wait_attached(names, timeout=60)
        self.assertEqual(launcher.config.read_bytes(), config_before, "the launcher's config must not change")
        self.assertEqual([fingerprint(k) for k in T.sshmux_service(second).factory.host_keys], [new_fp])
        self.assertEqual(self.ssh_transports()["a"].keyAlg, b"ssh-ed25519-cert-v01@openssh.com")
        self.assertNotIn("is refused", launcher.output())
        self.assertEqual(launcher.output().count("connected to master"), 2, self.diagnostics())
        await self.assertBuildsGreen([(p, "a") for p in PROJECTS])
        K.figures("rotation under the CA", back_after_restart_s=back_s, old=old_fp, new=new_fp)


class StockSSHClient(O.Base):
    """The stock ssh client and our master's certificates."""

    def setUp(self) -> None:
        if O.NEEDS_SSH:
            raise unittest.SkipTest(O.NEEDS_SSH)
        super().setUp()
        self.known_hosts_text: str | None = None

    def known_hosts(self, ssh_port: int) -> Path:
        if self.known_hosts_text is None:
            return super().known_hosts(ssh_port)
        path = self.root / "known_hosts"
        path.write_text(self.known_hosts_text)
        return path

    def make_ca(self) -> Path:
        ca = self.root / "ca"
        write_private_key(ca, generate_ed25519(), "ca")
        return ca

    def test_stock_ssh_logs_in_with_user_certificates(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._user_certificates())

    async def _user_certificates(self) -> None:
        from buildbot_sshmux.cli import admin

        self.patch(reactor, "stop", lambda *a: None)
        master = await self.start_master()
        sshmux = T.sshmux_service(master)
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)
        ca = self.make_ca()
        ca_fp = fingerprint(load_private_key(ca))
        # authorized_hosts: the CA's line and nothing else.
        line = public_line(load_private_key(ca), "test-ca")
        self.site.authorized_hosts.write_text(f'cert-authority,workers="*-{{host}}" {line}\n')
        await O.T.wait_until(
            reactor, lambda: any(e.cert_authority for e in sshmux.entries), 10, "the CA line"
        )
        identity = self.site.identities[O.HOST]
        pub = Path(f"{identity}.pub")

        # ssh-keygen's certificate: a build through the forward.
        cert = keygen_sign(ca, pub, "hosta-keygen", O.HOST, "-z", "71", "-V", "-5m:+1h")
        ssh, (local,) = await self.forward_with(
            ssh_port, ["-o", f"CertificateFile={cert}"], [("localhost", pb_port)]
        )
        self.assertRegex(ssh.text, r"Server accepts key: \S+ ED25519-CERT")
        self.assertTrue(
            self.logged(f"host {O.HOST} (", "logs in with certificate 'hosta-keygen' serial 71", ca_fp),
            self.log_lines,
        )
        await self.attach_worker(master, local)
        self.assertEqual(await T.run_builds(master, [(O.PROJECT, O.HOST)]), [O.SUCCESS])
        await ssh.stop()
        await T.wait_until(reactor, lambda: sshmux.connection_count == 0, 15, "ssh to leave")

        # Our certificate of the same key.
        cert.unlink()
        code = admin.main(
            ["ca", "sign", "--ca", str(ca), "--principals", O.HOST, "--id", "hosta-ours", str(pub)]
        )
        self.assertEqual(code, 0)
        ssh, _locals = await self.forward_with(
            ssh_port, ["-o", f"CertificateFile={cert}"], [("localhost", pb_port)]
        )
        self.assertTrue(self.logged("logs in with certificate 'hosta-ours'"), self.log_lines)
        await ssh.stop()
        await T.wait_until(reactor, lambda: sshmux.connection_count == 0, 15, "ssh to leave")

        # An expired certificate: refused, and the master says why.
        cert.unlink()
        cert = keygen_sign(ca, pub, "hosta-old", O.HOST, "-z", "72", "-V", "-2d:-1d")
        refused = self.ssh(
            ssh_port, identity, "-o", f"CertificateFile={cert}", "-N",
            "-L", f"127.0.0.1:{O.free_port()}:localhost:{pb_port}",
        )  # fmt: skip
        self.assertEqual(await refused.exited(), 255, refused.text)
        self.assertIn("Permission denied (publickey)", refused.text)
        [line] = self.logged("refused certificate 'hosta-old' serial 72", f"for host {O.HOST}", "expired at")
        self.assertIn(ca_fp, line)

    def test_stock_ssh_verifies_the_masters_host_certificate(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._host_certificate())

    async def _host_certificate(self) -> None:
        self.patch(reactor, "stop", lambda *a: None)
        self.site = T.Site(self.root, [O.HOST])
        ca = self.make_ca()
        keygen_sign(
            ca, Path(f"{self.site.host_key_path}.pub"), "master-1", "127.0.0.1", "-h", "-V", "-5m:+1h"
        )
        config = T.master_config([O.PROJECT], [O.HOST], self.site)
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(T.stop_master(master)))
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)
        # known_hosts knows the CA only, no key of the master's.
        self.known_hosts_text = (
            f"@cert-authority [127.0.0.1]:{ssh_port} {public_line(load_private_key(ca))}\n"
        )
        ssh, (local,) = await self.forward(ssh_port, self.site.identities[O.HOST], [("localhost", pb_port)])
        self.assertIn("Server host certificate: ssh-ed25519-cert-v01@openssh.com", ssh.text)
        self.assertIn("is known and matches the ED25519-CERT host certificate", ssh.text)
        (transport,) = T.sshmux_service(master).factory.connections
        self.assertEqual(transport.keyAlg, b"ssh-ed25519-cert-v01@openssh.com")
        await self.attach_worker(master, local)
        self.assertEqual(await T.run_builds(master, [(O.PROJECT, O.HOST)]), [O.SUCCESS])
        await ssh.stop()

        # A CA that did not sign it: ssh refuses the master.
        self.known_hosts_text = f"@cert-authority [127.0.0.1]:{ssh_port} {public_line(generate_ed25519())}\n"
        other = self.ssh(ssh_port, self.site.identities[O.HOST], command=("true",))
        self.assertEqual(await other.exited(), 255, other.text)
        self.assertIn("Host key verification failed", other.text)


class StockSSHD(O.Base):
    """Our launcher through a stock sshd: its user certificate, sshd's host certificate."""

    timeout = 180
    start_sshd = O.StockSSHDTests.start_sshd

    def setUp(self) -> None:
        if O.NEEDS_SSHD:
            raise unittest.SkipTest(O.NEEDS_SSHD)
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():  # as test_openssh.StockSSHDTests
            try:
                Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as e:
                raise unittest.SkipTest(f"sshd as root needs /run/sshd, which cannot be made ({e})") from e
        super().setUp()

    def test_launcher_and_stock_sshd_certificates_both_ways(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._both_ways())

    async def _both_ways(self) -> None:
        master = await self.start_master(sshmux=False)
        pb_port = T.pb_port(master)
        user = pwd.getpwuid(os.geteuid()).pw_name
        ca = self.root / "ca"
        write_private_key(ca, generate_ed25519(), "ca")
        identity = self.site.identities[O.HOST]
        # sshd takes a user certificate whose principal is the account's name ...
        keygen_sign(ca, Path(f"{identity}.pub"), "hosta-for-sshd", user, "-V", "-5m:+1h")
        # ... and shows a host certificate of a key of its own (ECDSA, beside start_sshd's ed25519 key).
        cert_key = self.root / "sshd_cert_host_key"
        write_private_key(cert_key, generate("ecdsa"), "sshd")
        keygen_sign(ca, Path(f"{cert_key}.pub"), "sshd-1", "127.0.0.1", "-h", "-V", "-5m:+1h")
        options = [
            f"TrustedUserCAKeys {ca}.pub",
            "AuthorizedKeysFile none",
            f"HostKey {cert_key}",
            f"HostCertificate {cert_key}-cert.pub",
        ]
        sshd, sshd_port, _sshd_pub = await self.start_sshd(pb_port, user, options)

        config = self.site.launcher_config(O.HOST, sshd_port, pb_port, [O.WORKER])
        text = config.read_text().replace(
            f'host_key = "{self.site.host_key_line}"',
            f'host_ca = "{public_line(load_private_key(ca))}"\nusername = "{user}"',
        )
        config.write_text(text)
        launcher = T.LauncherProcess(config)
        launcher.start()
        self.addCleanup(launcher.stop)
        try:
            await T.wait_until(reactor, lambda: O.WORKER in T.attached_workers(master), 60, "the worker")
        except TimeoutError:
            self.fail(f"no attach\nlauncher:\n{launcher.output()}\nsshd:\n{sshd.text}")
        self.assertEqual(await T.run_builds(master, [(O.PROJECT, O.HOST)]), [O.SUCCESS])
        self.assertRegex(
            sshd.text,
            rf"Accepted publickey for {re.escape(user)} from 127\.0\.0\.1 port \d+ ssh2: ED25519-CERT",
        )
        self.assertIn("ID hosta-for-sshd", sshd.text)
        # sshd showed its host certificate: the launcher asked for certificates first.
        self.assertIn("kex: host key algorithm: ecdsa-sha2-nistp256-cert-v01@openssh.com", sshd.text)
        self.assertIn("with certificate 'hosta-for-sshd'", launcher.output())
        self.assertNotIn("is refused", launcher.output())
