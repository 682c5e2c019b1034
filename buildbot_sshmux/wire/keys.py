"""Reading, writing and naming SSH keys in OpenSSH formats."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.conch.ssh import keys

from buildbot_sshmux.errors import KeyFileError


def fingerprint(key: keys.Key) -> str:
    """Return the key's fingerprint as OpenSSH prints it: ``SHA256:<base64>``."""
    b64 = key.fingerprint(format=keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + b64.rstrip("=")


def public_line(key: keys.Key, comment: str = "") -> str:
    """Return the one-line OpenSSH public form of a key, with an optional comment."""
    line = key.public().toString("OPENSSH").decode("ascii")
    return f"{line} {comment}".rstrip()


def parse_public_line(line: str) -> tuple[keys.Key, str]:
    """An OpenSSH public key line ``TYPE BASE64 [COMMENT]`` as (key, comment);
    ValueError if it is not one (a private key included)."""
    fields = line.strip().split(None, 2)
    try:
        key = keys.Key.fromString(" ".join(fields[:2]).encode("ascii"))
    except Exception:
        raise ValueError("not an OpenSSH public key line (expected: ssh-ed25519 AAAA... comment)") from None
    if not key.isPublic():
        raise ValueError("a private key, not a public key line")
    return key, fields[2].strip() if len(fields) > 2 else ""


def check_private_permissions(path: Path) -> None:
    """Refuse a private key file that group or others may read, as OpenSSH does."""
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {path} is accessible by others (mode {stat.S_IMODE(mode):04o});"
            f" run: chmod 600 {path}"
        )


def _encrypted(data: bytes) -> bool:
    """Whether a private key file's data is encrypted: Conch says so when asked without a passphrase."""
    try:
        keys.Key.fromString(data)
    except keys.EncryptedKeyError:
        return True
    except Exception:
        return False
    return False


def load_private_key(
    path: str | os.PathLike[str], passphrase: bytes | None = None, make_with: str | None = None
) -> keys.Key:
    """Load an OpenSSH/PEM private key, refusing files that are too open.

    ``make_with``: the command that makes a missing one (a worker host's key
    by default)."""
    path = Path(path)
    try:
        check_private_permissions(path)
        data = path.read_bytes()
    except FileNotFoundError:
        make_with = make_with or f"ssh-worker keygen {path}"
        raise KeyFileError(f"private key {path} does not exist; create one with: {make_with}") from None
    except OSError as e:
        raise KeyFileError(f"private key {path} cannot be read ({e.strerror})") from None
    try:
        key = keys.Key.fromString(data, passphrase=passphrase)
    except keys.EncryptedKeyError:
        raise KeyFileError(
            f"private key {path} is encrypted; give the launcher its passphrase in the"
            f" SSH_WORKER_PASSPHRASE variable or in a file named by identity_passphrase_file in [master]"
        ) from None
    except Exception as e:  # Conch raises BadKeyError, ValueError, or struct.error on a truncated file
        if passphrase is not None and _encrypted(data):
            raise KeyFileError(f"wrong passphrase for private key {path}") from None
        raise KeyFileError(f"private key {path} is not a valid OpenSSH key ({e})") from None
    if key.isPublic():
        raise KeyFileError(f"{path} holds a public key; a private key is needed here")
    return key


def generate_ed25519() -> keys.Key:
    """Make a fresh ed25519 key pair."""
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def generate(kind: str = "ed25519") -> keys.Key:
    """Make a fresh key pair: ed25519, ecdsa (P-256) or rsa (3072 bits)."""
    if kind == "ed25519":
        return generate_ed25519()
    if kind == "ecdsa":
        return keys.Key(ec.generate_private_key(ec.SECP256R1()))
    if kind == "rsa":
        return keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=3072))
    raise ValueError(f"unknown key type {kind!r} (ed25519, ecdsa, rsa)")


def write_private_key(
    path: str | os.PathLike[str], key: keys.Key, comment: str = "", passphrase: bytes | None = None
) -> None:
    """Write ``path`` (OpenSSH format, mode 0600) and ``path.pub``; never overwrite."""
    path = Path(path)
    data = key.toString("OPENSSH", subtype="v1", comment=comment, passphrase=passphrase)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    Path(f"{path}.pub").write_text(public_line(key, comment) + "\n")
