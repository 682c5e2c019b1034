"""A launcher pinned by fingerprint finds the right key type during a master key rotation."""

from __future__ import annotations

from twisted.conch.ssh import transport
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from buildbot_sshmux.errors import HostKeyMismatch
from buildbot_sshmux.wire.keys import fingerprint, generate
from buildbot_sshmux.worker.link import HostKeyPins, MasterLink, MuxClientTransport

from .test_ssh_keygen_interop import NoEndpoint

OLD, NEW = generate("ed25519"), generate("ecdsa")


class FingerprintPinTests(TestCase):
    def setUp(self) -> None:
        pins = HostKeyPins.from_config([fingerprint(NEW)])  # the type is not known
        self.link = MasterLink(Clock(), "m", 2222, generate("ed25519"), pins, endpoint=NoEndpoint())

    def test_first_dial_asks_for_ed25519(self) -> None:
        self.assertEqual(MuxClientTransport(self.link).supportedPublicKeys[0], b"ssh-ed25519")

    def test_after_a_mismatch_the_next_dial_asks_for_another_type(self) -> None:
        first = MuxClientTransport(self.link)
        d = first.verifyHostKey(OLD.public().blob(), b"")
        self.failureResultOf(d, HostKeyMismatch)
        second = MuxClientTransport(self.link)
        self.assertNotEqual(second.supportedPublicKeys[0], b"ssh-ed25519")
        self.assertEqual(second.supportedPublicKeys[-1], b"ssh-ed25519")
        self.assertEqual(
            sorted(second.supportedPublicKeys), sorted(transport.SSHClientTransport.supportedPublicKeys)
        )
        self.successResultOf(second.verifyHostKey(NEW.public().blob(), b""))

    def test_a_successful_login_forgets_the_mismatches(self) -> None:
        self.link.mismatched_types.add(b"ssh-ed25519")
        self.link.connection_ready(object())  # type: ignore[arg-type]
        self.assertEqual(self.link.mismatched_types, set())
