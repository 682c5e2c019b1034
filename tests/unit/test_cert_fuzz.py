"""Property-based tests: certificate blobs a peer makes up never crash the parser or the master.

A peer may send any blob as a "certificate" (16 KiB at most: the master bounds
it before parsing).  `parse_certificate` must answer a `Certificate` or a
`CertificateError`, never another exception; the master must answer a
FAILURE, never a PK_OK for a blob whose CA signature is broken, and never let
anything reach the reactor.
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.conch.ssh import userauth
from twisted.conch.ssh.common import NS
from twisted.trial.unittest import TestCase

from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import generate, generate_ed25519

from . import certkit
from .sshharness import HOST_KEY, SSHPair, mux_clocked_services, raw_connect
from .test_cert_login import ca_line

CA = generate_ed25519()
VALID = {
    "ed25519": certkit.sign(
        CA, HOST_KEY, ("debian-sid", "workers:*-debian-sid"), source_addresses=["10.0.0.0/8"]
    ),
    "ecdsa": certkit.sign(generate("ecdsa"), generate("ecdsa"), ("debian-sid",)),
}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid certificate blob with some bytes flipped, cut, or spliced."""
    blob = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))].blob)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[at : at + draw(st.integers(1, 64))]
        else:
            blob[at:at] = draw(st.binary(min_size=1, max_size=64))
        if not blob:
            blob = bytearray(b"\x00")
    return bytes(blob)


class ParserFuzz(TestCase):
    @FUZZ
    @given(mutated())
    def test_mutated_blobs_parse_or_are_refused(self, blob: bytes) -> None:
        try:
            cert = certs.parse_certificate(blob)
        except certs.CertificateError:
            return
        # Only a change the signature does not cover (none here) could pass.
        self.assertIn(cert.blob, {c.blob for c in VALID.values()})

    @FUZZ
    @given(st.binary(max_size=512))
    def test_arbitrary_bytes_after_a_certificate_type(self, tail: bytes) -> None:
        with self.assertRaises(certs.CertificateError):
            certs.parse_certificate(NS(b"ssh-ed25519-cert-v01@openssh.com") + tail)


class MasterFuzz(TestCase):
    def setUp(self) -> None:
        self.pair = SSHPair(self, entries=[ca_line(CA)])
        self.pair.factory.services = mux_clocked_services(self.pair.clock)
        self.pair.clock.advance(time.time())

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(mutated())
    def test_the_master_refuses_mutated_certificates(self, blob: bytes) -> None:
        client, _server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        client.auth.request(b"publickey", b"\x00" + NS(b"ssh-ed25519-cert-v01@openssh.com") + NS(blob))
        wire.flush()
        self.assertEqual(client.auth.replies(userauth.MSG_USERAUTH_PK_OK), [])
        self.assertEqual(len(client.auth.replies(userauth.MSG_USERAUTH_FAILURE)), 1)
        client.transport.loseConnection()  # else max_startups_per_source drops the next ones
        wire.flush()
