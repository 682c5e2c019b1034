"""AES-GCM packet ciphers (`buildbot_sshmux.aead`) and their framing in the
transports (`buildbot_sshmux.sshtransport`), in memory.

Interop with stock OpenSSH, both directions, is in
tests/integration/test_openssh.py.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh import transport as ssh_transport
from twisted.trial.unittest import TestCase

from buildbot_sshmux.aead import PacketCipher, padding_length
from buildbot_sshmux.client import MuxClientTransport
from buildbot_sshmux.sshtransport import IMPLICIT_MAC, Ciphers

from .sshharness import LogCapture, SSHPair
from .test_liveness import NO_KEEPALIVE, EchoSession, payloads, tune

GCM128 = b"aes128-gcm@openssh.com"
GCM256 = b"aes256-gcm@openssh.com"

# NIST SP 800-38D (the GCM spec's test vectors), test case 4: AES-128,
# 96-bit IV, 20 bytes of associated data.
NIST_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
NIST_IV = bytes.fromhex("cafebabefacedbaddecaf888")
NIST_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
NIST_PLAIN = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
NIST_SEALED = bytes.fromhex(
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"
    "5bc94fbc3221a5db94fae95ae7121a47"  # the tag
)


class PacketCipherTests(TestCase):
    def test_nist_vector_first_packet(self) -> None:
        # The first packet's nonce is the derived IV itself; the key is cut to
        # the cipher's size (Conch derives longer keys).
        sealer = PacketCipher(GCM128, NIST_KEY + b"\xff" * 16, NIST_IV + b"\xee" * 4)
        self.assertEqual(sealer.seal(NIST_AAD, NIST_PLAIN), NIST_SEALED)
        opener = PacketCipher(GCM128, NIST_KEY, NIST_IV)
        self.assertEqual(opener.open(NIST_AAD, NIST_SEALED), NIST_PLAIN)

    def test_the_invocation_counter_increments_per_packet_and_wraps(self) -> None:
        iv = bytes.fromhex("00010203") + b"\xff" * 7 + b"\xfe"
        sealer = PacketCipher(GCM256, bytes(range(32)), iv)
        reference = AESGCM(bytes(range(32)))
        nonces = [
            iv,
            bytes.fromhex("00010203") + b"\xff" * 8,
            bytes.fromhex("00010203") + b"\x00" * 8,  # wrapped; the fixed field is untouched
            bytes.fromhex("00010203") + b"\x00" * 7 + b"\x01",
        ]
        for nonce in nonces:
            header, body = b"\x00\x00\x00\x10", bytes(16)
            self.assertEqual(sealer.seal(header, body), reference.encrypt(nonce, body, header))

    def test_a_changed_length_byte_or_body_fails_the_tag(self) -> None:
        header, body = b"\x00\x00\x00\x20", bytes(range(32))
        for tamper in ("header", "body", "tag"):
            sealer = PacketCipher(GCM128, bytes(16), bytes(12))
            opener = PacketCipher(GCM128, bytes(16), bytes(12))
            sealed = bytearray(sealer.seal(header, body))
            h = bytearray(header)
            if tamper == "header":
                h[3] ^= 0x10
            elif tamper == "body":
                sealed[5] ^= 1
            else:
                sealed[-1] ^= 1
            with self.assertRaises(InvalidTag, msg=tamper):
                opener.open(bytes(h), bytes(sealed))

    def test_padding_fills_whole_blocks_with_at_least_four_bytes(self) -> None:
        for n in range(1, 100):
            pad = padding_length(n, 16)
            self.assertGreaterEqual(pad, 4, n)
            self.assertLess(pad, 20, n)
            self.assertEqual((n + pad) % 16, 0, n)


class CiphersTests(TestCase):
    def test_each_direction_is_set_up_on_its_own(self) -> None:
        """AES-GCM out and AES-CTR+HMAC in on one side; the mirror on the other."""
        keys = {"iv_a": bytes(range(16)), "key_a": bytes(range(32)), "iv_b": bytes(16), "key_b": bytes(32)}
        a = Ciphers(GCM128, b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-256")
        a.setKeys(keys["iv_a"], keys["key_a"], keys["iv_b"], keys["key_b"], b"ia" * 16, b"ib" * 16)
        b = Ciphers(b"aes128-ctr", GCM128, b"hmac-sha2-256", b"hmac-sha2-256")
        b.setKeys(keys["iv_b"], keys["key_b"], keys["iv_a"], keys["key_a"], b"ib" * 16, b"ia" * 16)

        self.assertIsNone(a.in_aead)
        self.assertIsNone(b.out_aead)
        assert a.out_aead is not None and b.in_aead is not None
        self.assertEqual((a.outCipType, a.outMACType), (GCM128, IMPLICIT_MAC))
        self.assertEqual((b.inCipType, b.inMACType), (GCM128, IMPLICIT_MAC))
        self.assertEqual((a.inCipType, a.inMACType), (b"aes128-ctr", b"hmac-sha2-256"))
        header, body = b"\x00\x00\x00\x10", b"sixteen bytes..."
        self.assertEqual(b.in_aead.open(header, a.out_aead.seal(header, body)), body)
        packet = b"\x00\x00\x00\x0c\x04" + b"x" * 11
        sealed = b.encrypt(packet)
        self.assertEqual(a.decrypt(sealed), packet)
        self.assertTrue(a.verify(7, packet, b.makeMAC(7, packet)))


def negotiated(t: ssh_transport.SSHTransportBase) -> tuple[bytes, bytes, bytes, bytes]:
    c = t.currentEncryptions
    return c.outCipType, c.outMACType, c.inCipType, c.inMACType


class FramingTests(TestCase):
    """A real SSHMuxFactory and MasterLink in memory, sealing with AES-GCM."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def start(self, ciphers: list[bytes] | None = None) -> SSHPair:
        if ciphers is not None:
            self.patch(MuxClientTransport, "supportedCiphers", ciphers)
        self.pair = tune(SSHPair(self), liveness=NO_KEEPALIVE, client_liveness=NO_KEEPALIVE)
        self.pair.start()
        return self.pair

    def test_aes128_gcm_is_negotiated_first_and_carries_pb(self) -> None:
        pair = self.start()
        for t in (pair.server, pair.client_transport()):
            self.assertEqual(negotiated(t), (GCM128, IMPLICIT_MAC, GCM128, IMPLICIT_MAC))
            self.assertTrue(t.isEncrypted("both") and t.isVerified("both"))
        session = EchoSession(self, pair)
        values = payloads(8, 70_000)  # several full packets each
        results = [session.echo(v) for v in values]
        pair.flush()
        self.assertEqual([self.successResultOf(d) for d in results], values)

    def test_aes256_gcm_and_aes_ctr_when_the_peer_asks(self) -> None:
        for cipher, mac in ((GCM256, IMPLICIT_MAC), (b"aes128-ctr", b"hmac-sha2-256")):
            pair = self.start([cipher])
            self.assertEqual(negotiated(pair.server), (cipher, mac, cipher, mac))
            session = EchoSession(self, pair)
            d = session.echo("x" * 50_000)
            pair.flush()
            self.assertEqual(self.successResultOf(d), "x" * 50_000)
            pair.close()

    def test_a_packet_split_anywhere_is_reassembled(self) -> None:
        pair = self.start()
        session = EchoSession(self, pair)
        wire = pair.wire
        wire.hold_to_server = True
        d = session.echo("y" * 40_000)
        wire.pump()
        data, wire._to_server = b"".join(wire._to_server), []
        for i in range(0, len(data), 7):  # 7-byte reads
            pair.server.dataReceived(data[i : i + 7])
        wire.hold_to_server = False
        pair.flush()
        self.assertEqual(self.successResultOf(d), "y" * 40_000)

    def tampered(self, change: int) -> None:
        """Flip one byte ``change`` bytes into the next packet to the master."""
        pair = self.start()
        session = EchoSession(self, pair)
        wire = pair.wire
        wire.hold_to_server = True
        d = session.echo("z" * 100)
        wire.pump()
        data = bytearray(b"".join(wire._to_server))
        wire._to_server = []
        data[change] ^= 0x01
        pair.server.dataReceived(bytes(data))
        wire.hold_to_server = False
        pair.flush()
        self.assertIsNone(pair.link._transport, "the master kept a tampered connection")
        self.failureResultOf(d)  # the session saw its connection go

    def test_a_tampered_body_drops_the_peer_with_a_mac_error(self) -> None:
        self.tampered(10)
        self.assertTrue(self.logs.matching("bad MAC"), self.logs.texts())

    def test_a_bad_length_drops_the_peer(self) -> None:
        self.tampered(0)  # the first length byte: a packet over 1 MiB
        self.assertTrue(self.logs.matching("bad packet length"), self.logs.texts())

    def test_a_length_that_is_not_whole_blocks_drops_the_peer(self) -> None:
        pair = self.start()
        server = pair.server
        sent: list[tuple[int, bytes]] = []
        self.patch(server, "sendDisconnect", lambda code, text: sent.append((code, text)))
        server.dataReceived(struct.pack(">L", 17) + bytes(40))
        self.assertEqual(sent, [(ssh_transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length 17")])
