"""AEAD packet ciphers (`buildbot_sshmux.wire.aead`), their framing in the
transports and strict key exchange (`buildbot_sshmux.wire.transport`), in memory.

Interop with stock OpenSSH, both directions, is in
tests/integration/test_openssh.py.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.conch.ssh import transport as ssh_transport
from twisted.internet import defer
from twisted.test.iosim import FakeTransport
from twisted.trial.unittest import TestCase

from buildbot_sshmux.wire.aead import AESGCMCipher, ChaCha20Poly1305Cipher, RandomPadding, padding_length
from buildbot_sshmux.wire.transport import IMPLICIT_MAC, Ciphers
from buildbot_sshmux.worker.link import MuxClientTransport

from .sshharness import LogCapture, SSHPair
from .test_liveness import NO_KEEPALIVE, EchoSession, payloads, tune

GCM128 = b"aes128-gcm@openssh.com"
GCM256 = b"aes256-gcm@openssh.com"
CHACHA = b"chacha20-poly1305@openssh.com"

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


class AESGCMCipherTests(TestCase):
    def test_nist_vector_first_packet(self) -> None:
        # The first packet's nonce is the derived IV itself; the key is cut to
        # the cipher's size (Conch derives longer keys).
        sealer = AESGCMCipher(GCM128, NIST_KEY + b"\xff" * 16, NIST_IV + b"\xee" * 4)
        self.assertEqual(b"".join(sealer.seal(0, NIST_AAD, NIST_PLAIN)), NIST_AAD + NIST_SEALED)
        opener = AESGCMCipher(GCM128, NIST_KEY, NIST_IV)
        self.assertEqual(opener.open(0, NIST_AAD, NIST_SEALED), NIST_PLAIN)

    def test_the_invocation_counter_increments_per_packet_and_wraps(self) -> None:
        iv = bytes.fromhex("00010203") + b"\xff" * 7 + b"\xfe"
        sealer = AESGCMCipher(GCM256, bytes(range(32)), iv)
        reference = AESGCM(bytes(range(32)))
        nonces = [
            iv,
            bytes.fromhex("00010203") + b"\xff" * 8,
            bytes.fromhex("00010203") + b"\x00" * 8,  # wrapped; the fixed field is untouched
            bytes.fromhex("00010203") + b"\x00" * 7 + b"\x01",
        ]
        for nonce in nonces:
            header, body = b"\x00\x00\x00\x10", bytes(16)
            self.assertEqual(sealer.seal(7, header, body), [header, reference.encrypt(nonce, body, header)])

    def test_a_changed_length_byte_or_body_fails_the_tag(self) -> None:
        header, body = b"\x00\x00\x00\x20", bytes(range(32))
        for tamper in ("header", "body", "tag"):
            sealer = AESGCMCipher(GCM128, bytes(16), bytes(12))
            opener = AESGCMCipher(GCM128, bytes(16), bytes(12))
            sealed = bytearray(sealer.seal(0, header, body)[1])
            h = bytearray(header)
            if tamper == "header":
                h[3] ^= 0x10
            elif tamper == "body":
                sealed[5] ^= 1
            else:
                sealed[-1] ^= 1
            with self.assertRaises(InvalidTag, msg=tamper):
                opener.open(0, bytes(h), bytes(sealed))

    def test_padding_fills_whole_blocks_with_at_least_four_bytes(self) -> None:
        for n in range(1, 100):
            for block in (8, 16):
                pad = padding_length(n, block)
                self.assertGreaterEqual(pad, 4, n)
                self.assertLess(pad, 4 + block, n)
                self.assertEqual((n + pad) % block, 0, n)


# chacha20-poly1305@openssh.com vectors: (key K_2 || K_1, sequence number, the
# packet in clear, its wire form: encrypted length and body, then the tag).
# From ring's tests/aead_chacha20_poly1305_openssh_tests.txt (ISC licence).
CHACHA_VECTORS = [
    (
        "247a041f6780baf0de3741aa4436024b6a5169b0eab8a090a291f5900bf566a5"
        "4ac2c64c0f38cab14a143111bc39d1873013f52f2e92062e375c1a5378ad9b32",
        94,
        "000000100f000000000000000000000000000000",
        "c87186a24d89e672f37df98a95d0a0653e9f0fe4075bc727e855c8d487bb3060c42267cd",
    ),
    (
        "1512c3fce6b96693b7471f4d4fbf6e874099439da98b60eb5fb493315f9e0f2d"
        "a9391bdabb811dd736bfd7d20a233f78f473f8dc094b4d15f69561e4178dc8b1",
        221,
        "000000280b6162636465666768696a6b6c6d6e6f707172737475767778797a41420000000000000000000000",
        "98f720a10212103d0f87ef434cf92000a8449c00fdfe9f61006f13558b2f38b8"
        "e1956a8e613477edefc59784"
        "92c27399431a38e15dc6ed72d0c25732",
    ),
]


class ChaCha20Poly1305CipherTests(TestCase):
    def test_vectors(self) -> None:
        for key, seq, packet, wire in CHACHA_VECTORS:
            cipher = ChaCha20Poly1305Cipher(bytes.fromhex(key))
            packet_bytes, wire_bytes = bytes.fromhex(packet), bytes.fromhex(wire)
            self.assertEqual(b"".join(cipher.seal(seq, packet_bytes[:4], packet_bytes[4:])), wire_bytes)
            self.assertEqual(cipher.packet_length(seq, wire_bytes[:4]), len(packet_bytes) - 4)
            self.assertEqual(cipher.open(seq, wire_bytes[:4], wire_bytes[4:]), packet_bytes[4:])

    def test_the_sequence_number_is_the_nonce_and_every_byte_is_authenticated(self) -> None:
        key, seq, packet, wire = CHACHA_VECTORS[1]
        cipher = ChaCha20Poly1305Cipher(bytes.fromhex(key))
        wire_bytes = bytes.fromhex(wire)
        with self.assertRaises(InvalidTag):
            cipher.open(seq + 1, wire_bytes[:4], wire_bytes[4:])
        self.assertNotEqual(cipher.packet_length(seq + 1, wire_bytes[:4]), len(bytes.fromhex(packet)) - 4)
        for i in (0, 3, 4, len(wire_bytes) - 17, len(wire_bytes) - 1):
            tampered = bytearray(wire_bytes)
            tampered[i] ^= 0x80
            with self.assertRaises(InvalidTag, msg=f"byte {i}"):
                cipher.open(seq, bytes(tampered[:4]), bytes(tampered[4:]))
        # Sequence numbers are 32 bits on the wire, as OpenSSH's.
        self.assertEqual(
            cipher.seal(seq + 2**32, b"\x00\x00\x00\x08", bytes(8)),
            cipher.seal(seq, b"\x00\x00\x00\x08", bytes(8)),
        )


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
        wire_header, sealed = a.out_aead.seal(0, header, body)
        self.assertEqual(b.in_aead.open(0, wire_header, sealed), body)
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

    def test_aes256_gcm_chacha20_and_aes_ctr_when_the_peer_asks(self) -> None:
        for cipher, mac in (
            (GCM256, IMPLICIT_MAC),
            (CHACHA, IMPLICIT_MAC),
            (b"aes128-ctr", b"hmac-sha2-256"),
        ):
            pair = self.start([cipher])
            self.assertEqual(negotiated(pair.server), (cipher, mac, cipher, mac))
            session = EchoSession(self, pair)
            d = session.echo("x" * 50_000)
            pair.flush()
            self.assertEqual(self.successResultOf(d), "x" * 50_000)
            pair.close()

    def held_to_master(self, pair: SSHPair, value: str) -> tuple[defer.Deferred[Any], bytes]:
        """Echo ``value`` from a worker session, keeping the bytes it sends for
        the test to deliver; the wire then carries on as usual."""
        session = EchoSession(self, pair)
        wire = pair.wire
        wire.hold_to_server = True
        d = session.echo(value)
        wire.pump()
        data, wire._to_server = b"".join(wire._to_server), []
        wire.hold_to_server = False
        return d, data

    def test_a_packet_split_anywhere_is_reassembled(self) -> None:
        for cipher in (GCM128, CHACHA):
            self.split_reads(cipher)

    def split_reads(self, cipher: bytes) -> None:
        pair = self.start([cipher])
        d, data = self.held_to_master(pair, "y" * 40_000)
        for i in range(0, len(data), 7):  # 7-byte reads
            pair.server.dataReceived(data[i : i + 7])
        pair.flush()
        self.assertEqual(self.successResultOf(d), "y" * 40_000)
        pair.close()

    def test_every_packet_of_one_read_is_opened(self) -> None:
        pair = self.start()
        d, data = self.held_to_master(pair, "v" * 300_000)  # several packets, one read
        pair.server.dataReceived(data)
        self.assertEqual(pair.server.buf, b"", "a whole packet left unread")
        pair.flush()
        self.assertEqual(self.successResultOf(d), "v" * 300_000)

    def test_a_re_exchange_to_a_cipher_conch_frames_within_one_read(self) -> None:
        # The worker's NEWKEYS and its first AES-CTR packets reach the master
        # in one read: the AEAD reader hands the rest to Conch's.
        pair = self.start()
        client = pair.client_transport()
        client.supportedCiphers = [b"aes128-ctr"]
        session = EchoSession(self, pair)
        client.rekey()
        d = session.echo("u" * 90_000)  # queued during the exchange, sent after NEWKEYS
        pair.flush()
        self.assertEqual(self.successResultOf(d), "u" * 90_000)
        self.assertEqual(negotiated(pair.server)[2], b"aes128-ctr")

    def tampered(self, change: int, cipher: bytes = GCM128) -> None:
        """Flip one byte ``change`` bytes into the next packet to the master."""
        pair = self.start([cipher])
        d, sent = self.held_to_master(pair, "z" * 100)
        data = bytearray(sent)
        data[change] ^= 0x01
        pair.server.dataReceived(bytes(data))
        pair.flush()
        self.assertIsNone(pair.link._transport, "the master kept a tampered connection")
        self.failureResultOf(d)  # the session saw its connection go

    def test_a_tampered_body_drops_the_peer_with_a_mac_error(self) -> None:
        self.tampered(10)
        self.assertTrue(self.logs.matching("bad MAC"), self.logs.texts())

    def test_a_tampered_chacha20_packet_drops_the_peer_with_a_mac_error(self) -> None:
        self.tampered(10, CHACHA)
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


class RandomPaddingTests(TestCase):
    def test_each_take_is_fresh_bytes_of_the_size_asked(self) -> None:
        padding = RandomPadding(pool_size=64)
        taken = [padding.take(n) for n in (4, 19, 16, 30, 7, 64)]
        self.assertEqual([len(t) for t in taken], [4, 19, 16, 30, 7, 64])
        self.assertEqual(len(set(taken)), len(taken))
        # Nothing handed out twice: 64 bytes from pools of 64 are not all zero,
        # and consecutive takes do not overlap.
        self.assertNotEqual(taken[-1], bytes(64))
        self.assertNotIn(taken[0], taken[1])


class StrictKexTests(TestCase):
    """OpenSSH's strict key exchange (Terrapin countermeasure), in memory."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.sent: list[tuple[int, int]] = []  # (message number, sequence number) the worker sent
        original = MuxClientTransport.sendPacket

        def recording(t: MuxClientTransport, messageType: int, payload: bytes) -> None:
            self.sent.append((messageType, t.outgoingPacketSequence))
            original(t, messageType, payload)

        self.patch(MuxClientTransport, "sendPacket", recording)

    def start(self) -> SSHPair:
        self.pair = tune(SSHPair(self), liveness=NO_KEEPALIVE, client_liveness=NO_KEEPALIVE)
        self.pair.start()
        return self.pair

    def after_newkeys(self) -> list[int]:
        numbers = [number for number, _ in self.sent]
        return [seq for _, seq in self.sent[numbers.index(ssh_transport.MSG_NEWKEYS) + 1 :]]

    def test_both_ends_agree_and_number_packets_from_zero_after_newkeys(self) -> None:
        pair = self.start()
        server, client = pair.server, pair.client_transport()
        self.assertTrue(server.strict_kex and client.strict_kex)
        self.assertEqual([n for n, _ in self.sent[:2]], [ssh_transport.MSG_KEXINIT, 30])
        self.assertEqual(self.after_newkeys()[:3], [0, 1, 2])
        self.assertEqual(server.incomingPacketSequence, client.outgoingPacketSequence)
        self.assertEqual(client.incomingPacketSequence, server.outgoingPacketSequence)
        session = EchoSession(self, pair)  # and the connection works, over chacha20 too
        d = session.echo("after")
        pair.flush()
        self.assertEqual(self.successResultOf(d), "after")

    def test_a_peer_without_the_marker_gets_the_usual_numbering(self) -> None:
        self.patch(MuxClientTransport, "advertise_strict_kex", False)
        pair = self.start()
        self.assertFalse(pair.server.strict_kex or pair.client_transport().strict_kex)
        self.assertEqual(self.after_newkeys()[0], 3)  # KEXINIT, KEX_ECDH_INIT, NEWKEYS came first
        EchoSession(self, pair)

    def refused(self, hook: str) -> None:
        """The worker sends MSG_IGNORE from ``hook``: the master must hang up."""
        original = getattr(MuxClientTransport, hook)

        def with_ignore(t: MuxClientTransport, *args: object) -> object:
            if t.sessionID is None:
                if hook == "sendKexInit":
                    t.sendPacket(ssh_transport.MSG_IGNORE, b"\x00\x00\x00\x00")
                result = original(t, *args)
                if hook == "ssh_KEXINIT":
                    t.sendPacket(ssh_transport.MSG_IGNORE, b"\x00\x00\x00\x00")
                return result
            return original(t, *args)

        self.patch(MuxClientTransport, hook, with_ignore)
        pair = self.start()
        self.assertIsNone(pair.link._transport, "the master kept the connection")
        self.assertIsNone(getattr(pair.server, "avatar", None))

    def test_a_packet_before_kexinit_is_refused(self) -> None:
        self.refused("sendKexInit")
        self.assertTrue(self.logs.matching("strict KEX violation: KEXINIT was not the first packet"))

    def test_a_message_during_the_initial_exchange_is_refused(self) -> None:
        self.refused("ssh_KEXINIT")
        self.assertTrue(self.logs.matching("strict KEX violation: message 2 during the initial key exchange"))


class NoDelayTests(TestCase):
    def test_both_ends_set_tcp_nodelay(self) -> None:
        calls: list[tuple[object, bool]] = []
        self.patch(FakeTransport, "setTcpNoDelay", lambda t, enabled: calls.append((t, enabled)))
        pair = tune(SSHPair(self), liveness=NO_KEEPALIVE, client_liveness=NO_KEEPALIVE)
        pair.start()
        self.assertEqual(
            sorted(calls, key=lambda c: c[0] is pair.server.transport.tcp),
            # .tcp: the SSH transports write through a CountingTransport
            [(pair.client_transport().transport.tcp, True), (pair.server.transport.tcp, True)],
        )
