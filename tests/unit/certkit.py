"""Certificates for the tests: made by ``ssh-keygen -s`` (when it is installed) and by ours.

`KeygenCA` drives the real ``ssh-keygen``: a CA key file, a public key file
per subject, ``-s`` with the options given, and the ``-cert.pub`` it writes,
parsed back.  `sign` is our own `buildbot_sshmux.wire.certs.sign` with the
test's defaults.  Times are real (``time.time()``): in-memory tests set their
clock to it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from twisted.conch.ssh import keys
from twisted.trial.unittest import SkipTest

from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import public_line, write_private_key

SSH_KEYGEN = shutil.which("ssh-keygen")
NO_KEYGEN = "needs ssh-keygen (apt-get install openssh-client)"
DAY = 86400


def now() -> int:
    return int(time.time())


def sign(
    ca: keys.Key,
    key: keys.Key,
    principals: Sequence[str] = ("debian-sid",),
    *,
    kind: str = certs.USER,
    key_id: str = "debian-sid-1",
    valid_after: int | None = None,
    valid_before: int | None = None,
    serial: int = 17,
    source_addresses: Sequence[str] = (),
) -> certs.Certificate:
    """Our own signature: valid from a day ago to a day from now unless told otherwise."""
    t = now()
    return certs.sign(
        ca,
        key,
        kind=kind,
        key_id=key_id,
        principals=list(principals),
        valid_after=t - DAY if valid_after is None else valid_after,
        valid_before=t + DAY if valid_before is None else valid_before,
        serial=serial,
        source_addresses=source_addresses,
    )


class KeygenCA:
    """A CA whose certificates the real ssh-keygen makes."""

    def __init__(self, directory: Path, key: keys.Key, name: str = "ca") -> None:
        if SSH_KEYGEN is None:
            raise SkipTest(NO_KEYGEN)
        self.directory = directory
        self.key = key
        self.path = directory / name
        write_private_key(self.path, key, name)
        self._count = 0

    def sign(
        self,
        subject: keys.Key,
        principals: Sequence[str] = ("debian-sid",),
        *,
        host: bool = False,
        key_id: str = "debian-sid-1",
        validity: str = "-1d:+1d",
        serial: int | None = 17,
        options: Sequence[str] = (),
    ) -> certs.Certificate:
        """``ssh-keygen -s CA -I ID [-h] [-n P,...] [-z SERIAL] -V VALIDITY [-O OPT]... KEY.pub``."""
        self._count += 1
        pub = self.directory / f"subject{self._count}.pub"
        pub.write_text(public_line(subject, "subject") + "\n")
        argv = [str(SSH_KEYGEN), "-q", "-s", str(self.path), "-I", key_id, "-V", validity]
        if host:
            argv.append("-h")
        if principals:
            argv += ["-n", ",".join(principals)]
        if serial is not None:
            argv += ["-z", str(serial)]
        for option in options:
            argv += ["-O", option]
        subprocess.run([*argv, str(pub)], check=True, capture_output=True, timeout=30)
        return certs.load_certificate(self.directory / f"subject{self._count}-cert.pub")
