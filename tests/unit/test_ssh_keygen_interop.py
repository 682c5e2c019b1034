"""OpenSSH key formats both ways, checked against the real ``ssh-keygen``.

Keys we write are read by ``ssh-keygen -l``/``-y``; keys ``ssh-keygen`` makes
load with `load_private_key`; a known_hosts file hashed by ``ssh-keygen -H``
is understood by `HostKeyPins`.  These are the only unit tests that start a
process (no sockets).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from twisted.conch.ssh import keys, transport
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from buildbot_sshmux.errors import KeyFileError
from buildbot_sshmux.wire.keys import fingerprint, generate, load_private_key, public_line, write_private_key
from buildbot_sshmux.worker.link import HostKeyPins, MasterLink, MuxClientTransport

from .tmpdirs import scratch_dir

SSH_KEYGEN = (
    "/usr/bin/ssh-keygen" if os.access("/usr/bin/ssh-keygen", os.X_OK) else shutil.which("ssh-keygen")
)
SKIP_REASON = "ssh-keygen (OpenSSH) is not installed: interop with OpenSSH's key formats cannot be checked"
PASSPHRASE = "correct horse battery"  # ssh-keygen wants at least 5 characters
MASTER_ED25519, MASTER_RSA, OTHER_ED25519 = generate("ed25519"), generate("rsa"), generate("ed25519")


def ssh_keygen(*args: str) -> str:
    """Run ssh-keygen non-interactively; fail the test with its stderr if it fails."""
    assert SSH_KEYGEN is not None
    proc = subprocess.run(
        [SSH_KEYGEN, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError(f"ssh-keygen {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class NoEndpoint:
    """A client endpoint for a MasterLink that is never started."""

    def connect(self, factory: object) -> None:
        raise AssertionError("this link must not dial")


def keygen_fingerprint(path: Path) -> str:
    """The SHA256 fingerprint ssh-keygen prints for a key file."""
    return ssh_keygen("-l", "-E", "sha256", "-f", str(path)).split()[1]


class KeysWeWriteTests(TestCase):
    """write_private_key's files, read by ssh-keygen (with no .pub file beside them)."""

    if SSH_KEYGEN is None:
        skip = SKIP_REASON

    def write(self, kind: str, passphrase: str | None) -> tuple[keys.Key, Path]:
        key = generate(kind)
        path = scratch_dir(self) / f"id_{kind}"
        write_private_key(path, key, f"{kind}-host", passphrase.encode() if passphrase else None)
        Path(f"{path}.pub").unlink()  # ssh-keygen must read the private key file itself
        return key, path

    def check(self, kind: str) -> None:
        key, path = self.write(kind, None)
        self.assertEqual(keygen_fingerprint(path), fingerprint(key))
        public = ssh_keygen("-y", "-f", str(path))
        self.assertEqual(public.split()[:2], public_line(key).split())

    def test_ed25519(self) -> None:
        self.check("ed25519")

    def test_ecdsa(self) -> None:
        self.check("ecdsa")

    def test_rsa(self) -> None:
        self.check("rsa")

    def test_with_passphrase(self) -> None:
        # bcrypt's KDF makes each encrypted key cost ~0.5 s to write and as
        # much for ssh-keygen to read: ssh-keygen reads one key while the
        # next is written.
        assert SSH_KEYGEN is not None
        readers = []
        for kind in ("ed25519", "ecdsa", "rsa"):
            key, path = self.write(kind, PASSPHRASE)
            # The public half sits outside the encryption: no passphrase needed.
            self.assertEqual(keygen_fingerprint(path), fingerprint(key), kind)
            reader = subprocess.Popen(
                [SSH_KEYGEN, "-y", "-P", PASSPHRASE, "-f", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.addCleanup(lambda r=reader: r.poll() is None and r.kill())
            readers.append((kind, key, reader))
        for kind, key, reader in readers:
            out, err = reader.communicate(timeout=60)
            self.assertEqual(reader.returncode, 0, f"{kind}: {err}")
            self.assertEqual(out.split()[:2], public_line(key).split(), kind)

    def test_our_pub_file_has_ssh_keygens_fingerprint(self) -> None:
        key = generate("ed25519")
        path = scratch_dir(self) / "id_ed25519"
        write_private_key(path, key, "debian-sid")
        self.assertEqual(keygen_fingerprint(Path(f"{path}.pub")), fingerprint(key))


class KeysSshKeygenMakesTests(TestCase):
    """ssh-keygen's files, loaded by load_private_key."""

    if SSH_KEYGEN is None:
        skip = SKIP_REASON

    def make(self, kind: str, passphrase: str, *extra: str) -> Path:
        path = scratch_dir(self) / f"id_{kind}"
        ssh_keygen("-q", "-t", kind, "-N", passphrase, "-C", f"{kind}@keygen", "-f", str(path), *extra)
        return path

    def check(self, path: Path, passphrase: str | None) -> keys.Key:
        key = load_private_key(path, passphrase.encode() if passphrase else None)
        self.assertFalse(key.isPublic())
        self.assertEqual(fingerprint(key), keygen_fingerprint(path))
        pub = Path(f"{path}.pub").read_text().split()
        self.assertEqual(public_line(key).split(), pub[:2])
        # The private half is really the one the .pub belongs to.
        public = keys.Key.fromString(" ".join(pub[:2]).encode())
        self.assertTrue(public.verify(key.sign(b"challenge"), b"challenge"))
        return key

    def test_ed25519(self) -> None:
        self.check(self.make("ed25519", ""), None)

    def test_ecdsa(self) -> None:
        key = self.check(self.make("ecdsa", ""), None)
        self.assertEqual(key.sshType(), b"ecdsa-sha2-nistp256")

    def test_ecdsa_384_and_521(self) -> None:
        for bits, name in (("384", b"ecdsa-sha2-nistp384"), ("521", b"ecdsa-sha2-nistp521")):
            key = self.check(self.make("ecdsa", "", "-b", bits), None)
            self.assertEqual(key.sshType(), name)

    def test_rsa(self) -> None:
        key = self.check(self.make("rsa", "", "-b", "2048"), None)
        self.assertEqual(key.sshType(), b"ssh-rsa")

    def test_ed25519_with_passphrase(self) -> None:
        self.check(self.make("ed25519", PASSPHRASE), PASSPHRASE)

    def test_ecdsa_with_passphrase(self) -> None:
        self.check(self.make("ecdsa", PASSPHRASE), PASSPHRASE)

    def test_rsa_with_passphrase(self) -> None:
        self.check(self.make("rsa", PASSPHRASE, "-b", "2048"), PASSPHRASE)

    def test_encrypted_key_without_its_passphrase_is_refused(self) -> None:
        path = self.make("ed25519", PASSPHRASE)
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(path)
        self.assertIn("encrypted", str(caught.exception))
        self.assertRaises(KeyFileError, load_private_key, path, b"wrong passphrase")

    def test_legacy_pem_format(self) -> None:
        self.check(self.make("rsa", "", "-b", "2048", "-m", "PEM"), None)
        self.check(self.make("ecdsa", PASSPHRASE, "-m", "PEM"), PASSPHRASE)


class HashedKnownHostsTests(TestCase):
    """A known_hosts file hashed by ``ssh-keygen -H``."""

    if SSH_KEYGEN is None:
        skip = SKIP_REASON

    def setUp(self) -> None:
        self.master_key, self.rsa_key, self.other_key = MASTER_ED25519, MASTER_RSA, OTHER_ED25519
        self.path = scratch_dir(self) / "known_hosts"
        self.path.write_text(
            f"[master.example.org]:2222 {public_line(self.master_key)}\n"
            f"[rsa-master.example.org]:2222 {public_line(self.rsa_key)}\n"
            f"other.example.org {public_line(self.other_key)}\n"
        )
        ssh_keygen("-H", "-f", str(self.path))
        self.pins = HostKeyPins(known_hosts=self.path)

    def test_the_file_is_hashed(self) -> None:
        text = self.path.read_text()
        self.assertNotIn("example.org", text)
        self.assertEqual([line[:3] for line in text.splitlines()], ["|1|"] * 3)

    def test_accepted_for_the_right_host_and_port(self) -> None:
        self.assertTrue(self.pins.accepts("master.example.org", 2222, self.master_key.public()))
        self.assertTrue(self.pins.accepts("rsa-master.example.org", 2222, self.rsa_key.public()))
        self.assertTrue(self.pins.accepts("other.example.org", 22, self.other_key.public()))

    def test_refused_for_another_host(self) -> None:
        self.assertFalse(self.pins.accepts("evil.example.org", 2222, self.master_key.public()))
        self.assertFalse(self.pins.accepts("master.example.org.evil", 2222, self.master_key.public()))

    def test_refused_for_another_port(self) -> None:
        self.assertFalse(self.pins.accepts("master.example.org", 2223, self.master_key.public()))

    def test_refused_for_another_key(self) -> None:
        self.assertFalse(self.pins.accepts("master.example.org", 2222, self.other_key.public()))
        self.assertFalse(self.pins.accepts("master.example.org", 2222, self.rsa_key.public()))

    def test_preferred_algorithms_come_from_the_hosts_line(self) -> None:
        self.assertEqual(self.pins.preferred_algorithms("master.example.org", 2222), [b"ssh-ed25519"])
        self.assertEqual(
            self.pins.preferred_algorithms("rsa-master.example.org", 2222),
            [b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"],
        )
        self.assertEqual(self.pins.preferred_algorithms("evil.example.org", 2222), [])

    def test_describe_names_the_file(self) -> None:
        self.assertIn(str(self.path), " ".join(self.pins.describe()))


class PreferredAlgorithmsTests(TestCase):
    """Pinned keys decide which host key algorithm the launcher asks for first."""

    if SSH_KEYGEN is None:
        skip = SKIP_REASON

    def keygen_pub(self, kind: str, *extra: str) -> str:
        path = scratch_dir(self) / f"id_{kind}"
        ssh_keygen("-q", "-t", kind, "-N", "", "-C", "master host key", "-f", str(path), *extra)
        return Path(f"{path}.pub").read_text().strip()

    def test_rsa_pin_prefers_rsa_sha2_512(self) -> None:
        pins = HostKeyPins.from_config([self.keygen_pub("rsa", "-b", "2048")])
        self.assertEqual(pins.preferred_algorithms("m", 2222), [b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"])

    def test_ecdsa_and_ed25519_pins(self) -> None:
        ecdsa, ed25519 = self.keygen_pub("ecdsa"), self.keygen_pub("ed25519")
        self.assertEqual(
            HostKeyPins.from_config([ecdsa]).preferred_algorithms("m", 22), [b"ecdsa-sha2-nistp256"]
        )
        self.assertEqual(
            HostKeyPins.from_config([ed25519, ecdsa, ed25519]).preferred_algorithms("m", 22),
            [b"ssh-ed25519", b"ecdsa-sha2-nistp256"],
        )

    def test_fingerprint_pins_prefer_nothing(self) -> None:
        path = scratch_dir(self) / "id"
        ssh_keygen("-q", "-t", "ed25519", "-N", "", "-f", str(path))
        pins = HostKeyPins.from_config([keygen_fingerprint(path)])
        self.assertEqual(pins.preferred_algorithms("m", 22), [])
        self.assertTrue(pins.accepts("m", 22, load_private_key(path).public()))

    def test_the_client_transport_offers_the_pinned_algorithm_first(self) -> None:
        pins = HostKeyPins.from_config([self.keygen_pub("rsa", "-b", "2048")])
        link = MasterLink(Clock(), "m", 2222, MASTER_ED25519, pins, endpoint=NoEndpoint())
        client = MuxClientTransport(link)
        self.assertEqual(client.supportedPublicKeys[:3], [b"rsa-sha2-512", b"rsa-sha2-256", b"ssh-rsa"])
        self.assertEqual(
            sorted(client.supportedPublicKeys), sorted(transport.SSHClientTransport.supportedPublicKeys)
        )
