"""Key files and fingerprints, in OpenSSH's formats."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.conch.ssh import keys
from twisted.trial.unittest import SkipTest, TestCase

from buildbot_sshmux.errors import KeyFileError
from buildbot_sshmux.wire.keys import (
    fingerprint,
    generate_ed25519,
    load_private_key,
    public_line,
    write_private_key,
)

from .tmpdirs import scratch_dir

SSH_KEYGEN = shutil.which("ssh-keygen")


class FingerprintTests(TestCase):
    def test_sha256_of_the_blob_unpadded_base64(self) -> None:
        key = generate_ed25519()
        digest = hashlib.sha256(key.public().blob()).digest()
        expected = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
        self.assertEqual(fingerprint(key), expected)
        self.assertNotIn("=", fingerprint(key))

    def test_public_and_private_halves_share_a_fingerprint(self) -> None:
        key = generate_ed25519()
        self.assertEqual(fingerprint(key), fingerprint(key.public()))
        self.assertNotEqual(fingerprint(key), fingerprint(generate_ed25519()))

    def test_matches_ssh_keygen(self) -> None:
        if SSH_KEYGEN is None:
            raise SkipTest("ssh-keygen is not installed")
        for key in (generate_ed25519(), keys.Key(rsa.generate_private_key(65537, 2048))):
            path = scratch_dir(self) / "key.pub"
            path.write_text(public_line(key, "probe") + "\n")
            out = subprocess.run(
                [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(path)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            self.assertEqual(out.split()[1], fingerprint(key))


class PublicLineTests(TestCase):
    def test_round_trips_and_carries_the_comment(self) -> None:
        key = generate_ed25519()
        line = public_line(key, "host@example")
        self.assertTrue(line.startswith("ssh-ed25519 "))
        self.assertTrue(line.endswith(" host@example"))
        self.assertEqual(keys.Key.fromString(line.encode()), key.public())
        self.assertEqual(len(public_line(key).split()), 2)


class WriteAndLoadTests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.path = self.dir / "id_ed25519"
        self.key = generate_ed25519()

    def test_write_makes_a_0600_private_key_and_a_pub_file(self) -> None:
        write_private_key(self.path, self.key, "my-host")
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertTrue(self.path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"))
        pub = (self.dir / "id_ed25519.pub").read_text()
        self.assertEqual(pub, public_line(self.key, "my-host") + "\n")
        self.assertEqual(load_private_key(self.path), self.key)

    def test_mode_is_0600_whatever_the_umask(self) -> None:
        old = os.umask(0)
        try:
            write_private_key(self.path, self.key)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_write_refuses_to_overwrite(self) -> None:
        self.path.write_bytes(b"precious")
        self.assertRaises(FileExistsError, write_private_key, self.path, self.key)
        self.assertEqual(self.path.read_bytes(), b"precious")

    def test_load_refuses_a_file_others_can_read(self) -> None:
        write_private_key(self.path, self.key)
        self.path.chmod(0o644)
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path)
        self.assertIn(f"chmod 600 {self.path}", str(caught.exception))
        self.assertIn("0644", str(caught.exception))

    def test_load_refuses_group_readable(self) -> None:
        write_private_key(self.path, self.key)
        self.path.chmod(0o640)
        self.assertRaises(KeyFileError, load_private_key, self.path)

    def write_encrypted(self, passphrase: bytes) -> None:
        # cryptography's bcrypt KDF default (16 rounds) keeps this fast.
        data = self.key._keyObject.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.BestAvailableEncryption(passphrase),
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.close(fd)

    def test_encrypted_key_without_passphrase(self) -> None:
        self.write_encrypted(b"sesame")
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path)
        self.assertIn("encrypted", str(caught.exception))
        self.assertIn(str(self.path), str(caught.exception))

    def test_encrypted_key_with_a_wrong_passphrase(self) -> None:
        self.write_encrypted(b"sesame")
        self.assertRaises(KeyFileError, load_private_key, self.path, b"wrong")

    def test_written_encrypted_key_loads_with_its_passphrase(self) -> None:
        write_private_key(self.path, self.key, passphrase=b"sesame")
        self.assertNotIn(b"sesame", self.path.read_bytes())
        self.assertRaises(KeyFileError, load_private_key, self.path)
        self.assertEqual(load_private_key(self.path, b"sesame"), self.key)

    def test_missing_file_says_how_to_make_one(self) -> None:
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path)
        self.assertIn("ssh-worker keygen", str(caught.exception))

    def test_garbage_is_not_a_key(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"not a key at all\n")
        os.close(fd)
        self.assertRaises(KeyFileError, load_private_key, self.path)

    def test_public_key_where_a_private_one_is_needed(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, public_line(self.key).encode() + b"\n")
        os.close(fd)
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path)
        self.assertIn("public key", str(caught.exception))

    def test_ssh_keygen_reads_what_we_write(self) -> None:
        if SSH_KEYGEN is None:
            raise SkipTest("ssh-keygen is not installed")
        write_private_key(self.path, self.key)
        out = subprocess.run(
            [SSH_KEYGEN, "-y", "-f", str(self.path)], check=True, capture_output=True, text=True
        ).stdout
        self.assertEqual(out.split()[:2], public_line(self.key).split())
