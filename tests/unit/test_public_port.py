"""The public SSH port under attack, in memory: what a peer can make the master hold, log and accept.

Each test plays one attack from issue 9 with a raw SSH client (`RawSSHClient`,
which sends whatever packet a test scripts) against the real server, and
checks the bound: the bytes the master holds for the peer, the log lines it
writes, and that it drops the peer.  A `StalledWire` plays a peer that stops
reading as a real socket would: once 64 KiB wait for it, the server's
transport is paused, as Twisted pauses a producer when a socket's buffer is
full.
"""

from __future__ import annotations

import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh import transport as ssh_transport
from twisted.conch.ssh.common import NS
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.limits import MAX_NAME, PREAUTH_MAX_PACKET, ServerLimits
from buildbot_sshmux.master.server import (
    MuxServerConnection,
    MuxServerTransport,
    MuxUserAuthServer,
    SSHMuxFactory,
)
from buildbot_sshmux.wire.keys import fingerprint, generate_ed25519
from buildbot_sshmux.wire.liveness import Liveness
from buildbot_sshmux.worker.link import MuxClientTransport

from .sshharness import (
    HOST_KEY,
    PB_PORT,
    WORKER_HOST_ADDRESS,
    ClosingWire,
    LogCapture,
    SSHPair,
    raw_connect,
    raw_login,
    tune,
)

QUIET = Liveness(keepalive_interval=0, rekey_interval=0)
PEER = f"{WORKER_HOST_ADDRESS.host}:{WORKER_HOST_ADDRESS.port}"
KiB, MiB = 1024, 1024 * 1024
MSG_GLOBAL_REQUEST, MSG_CHANNEL_OPEN, MSG_CHANNEL_OPEN_FAILURE = 80, 90, 92
LOG_LINE_LIMIT = 400  # characters: no line about a peer may be longer


def pair_with(testcase: TestCase, **limits: Any) -> SSHPair:
    return tune(SSHPair(testcase), limits=ServerLimits(**limits), liveness=QUIET, mux_auth=True)


class StalledWire(ClosingWire):
    """A `ClosingWire` whose client stops reading once ``stall()`` is called:
    what the server writes stays in its transport, and past 64 KiB the
    server is paused, as a full socket buffer pauses a Twisted producer."""

    socket_buffer = 64 * KiB
    stalled = False

    def stall(self) -> None:
        self.stalled = True

    def pump(self) -> bool:
        if not self.stalled:
            return super().pump()
        self.clock.advance(0)
        out = self.client_io.getOutBuffer()
        for i in range(0, len(out or b""), self.socket_buffer):  # a socket reads 64 KiB at a time
            if not self.server_io.disconnecting:
                self.server_io.bufferReceived(out[i : i + self.socket_buffer])
        waiting = sum(map(len, self.server_io.stream))
        producer = self.server_io.producer
        if waiting > self.socket_buffer and producer is not None and not getattr(self, "_paused", False):
            self._paused = True
            producer.pauseProducing()
        return bool(out) or self._disconnect()


def stalled_connect(pair: SSHPair, **kwargs: Any) -> tuple[Any, Any, StalledWire]:
    client, server, wire = raw_connect(pair.factory, pair.clock, **kwargs)
    wire.__class__ = StalledWire
    return client, server, wire


def stalled_login(pair: SSHPair) -> tuple[Any, Any, StalledWire]:
    client, server, wire = raw_login(pair.factory, pair.clock)
    wire.__class__ = StalledWire
    return client, server, wire


def held_by_server(server: Any, wire: Any) -> int:
    """What the master holds for this peer: unparsed input, Conch's key exchange queue, unsent output."""
    return len(server.buf) + server._kex_queued + sum(map(len, wire.server_io.stream))


class LogBounds:
    """The log lines written during a test, and checks on their size."""

    def __init__(self, testcase: TestCase) -> None:
        self.capture = LogCapture(testcase)
        self.testcase = testcase

    def texts(self) -> list[str]:
        """What the master logged (not the raw client's own Conch lines)."""
        server_side = (MuxServerTransport, MuxUserAuthServer, MuxServerConnection, SSHMuxFactory)
        return [
            formatEvent(e) or ""
            for e in self.capture.events
            if e.get("log_namespace", "").startswith("buildbot_sshmux")
            or isinstance(e.get("log_source"), server_side)
        ]

    def assertBounded(self, max_lines: int) -> None:
        texts = self.texts()
        self.testcase.assertLessEqual(len(texts), max_lines, "\n".join(t[:200] for t in texts[-20:]))
        for text in texts:
            self.testcase.assertLessEqual(len(text), LOG_LINE_LIMIT, text[:500])
            self.testcase.assertNotIn("Unable to format event", text)


class BeforeLoginTests(TestCase):
    """An attacker without any private key."""

    def setUp(self) -> None:
        self.logs = LogBounds(self)
        self.pair = pair_with(self)

    def test_queries_with_a_huge_algorithm_name_are_refused_unread(self) -> None:
        # Today: each PK_OK echoed a 1 MB name, queries did not count, and the
        # replies queued while the peer did not read: 99 -> 908 MiB in 3.5 s.
        client, server, wire = stalled_connect(self.pair)
        wire.flush()
        wire.stall()
        blob = HOST_KEY.public().blob()
        for _ in range(50):
            client.auth.request(b"publickey", b"\x00" + NS(b"x" * MiB) + NS(blob))
            wire.flush()
        self.assertTrue(client.lost or server.transport.disconnecting)
        self.assertLessEqual(held_by_server(server, wire), PREAUTH_MAX_PACKET + 64 * KiB)
        self.assertEqual(client.auth.replies(userauth.MSG_USERAUTH_PK_OK), [])
        self.logs.assertBounded(5)
        [line] = [t for t in self.logs.texts() if "bad packet length" in t]
        self.assertIn(PEER, line)

    def test_a_long_name_within_the_packet_limit_is_not_echoed(self) -> None:
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        client.auth.request(b"publickey", b"\x00" + NS(b"x" * (MAX_NAME + 1)) + NS(HOST_KEY.public().blob()))
        wire.flush()
        self.assertTrue(client.lost)
        self.assertEqual(client.auth.replies(userauth.MSG_USERAUTH_PK_OK), [])
        [line] = [t for t in self.logs.texts() if "oversized" in t]
        self.assertIn(PEER, line)

    def test_queries_with_an_authorized_key_count(self) -> None:
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        for _ in range(100):
            client.auth.publickey_query(HOST_KEY)
            wire.flush()
        self.assertTrue(client.lost)
        self.assertEqual(len(client.auth.replies(userauth.MSG_USERAUTH_PK_OK)), ServerLimits().max_auth_tries)
        self.logs.assertBounded(5)

    def test_no_userauth_before_the_key_exchange(self) -> None:
        # Conch ran ssh-userauth for a non-strict client that never exchanged
        # keys, and queued every reply behind its own KEXINIT: 99 -> 920 MiB.
        server = self.pair.factory.buildProtocol(WORKER_HOST_ADDRESS)
        tcp = StringTransport(peerAddress=WORKER_HOST_ADDRESS)
        server.makeConnection(tcp)
        request = bytes((ssh_transport.MSG_SERVICE_REQUEST,)) + NS(b"ssh-userauth")
        server.dataReceived(b"SSH-2.0-attacker\r\n" + frame(request) * 100)
        self.assertTrue(tcp.disconnecting)
        self.assertIsNone(server.service)
        self.assertLessEqual(server.backlog, 1 * KiB)
        [line] = [t for t in self.logs.texts() if "before the key exchange" in t]
        self.assertIn("SSH message 5", line)
        self.assertIn(PEER, line)
        server.connectionLost(Failure(Exception("done")))

    def test_the_launcher_takes_no_service_before_the_key_exchange_either(self) -> None:
        # The same rule on the worker's end: a (non-strict) server that answers
        # a service before any key exchange is dropped, with one line naming it.
        client = MuxClientTransport(self.pair.link)
        tcp = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 2222))
        client.makeConnection(tcp)
        accept = bytes((ssh_transport.MSG_SERVICE_ACCEPT,)) + NS(b"ssh-userauth")
        client.dataReceived(b"SSH-2.0-attacker\r\n" + frame(accept) * 10)
        self.assertTrue(tcp.disconnecting)
        self.assertIsNone(client.service)
        [line] = [t for t in self.logs.texts() if "before the key exchange" in t]
        self.assertIn("SSH message 6", line)
        self.assertIn(self.pair.link.address, line)
        client.connectionLost(Failure(Exception("done")))

    def test_unknown_messages_with_big_payloads_do_not_flood_the_log(self) -> None:
        # Today each was logged at info level with the payload's repr: 60 MB
        # sent gave 115 MB of log.
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        for number in [70, 71, 72, 73, 74, 75, 76, 200, 201, 202] * 3:
            client.sendPacket(number, b"{x}" * 10_000)
            wire.flush()
        self.assertTrue(client.lost, "unexpected messages before login count as attempts")
        self.logs.assertBounded(12)

    def test_none_requests_with_long_user_names(self) -> None:
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        client.auth.request(b"none", user=b"u" * 20_000)
        wire.flush()
        self.assertTrue(client.lost)
        self.logs.assertBounded(5)

    def test_braces_in_a_key_type_are_logged_as_text(self) -> None:
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        client.auth.request(b"publickey", b"\x00" + NS(b"{0}{x}") + NS(NS(b"{0}{x}") + b"junk"))
        wire.flush()
        self.logs.assertBounded(3)
        [line] = [t for t in self.logs.texts() if "cannot be parsed" in t]
        self.assertIn("{0}{x}", line)

    def test_one_source_cannot_take_every_startup(self) -> None:
        # Today 300 idle connections from one address locked every host out.
        # Past 3 pending, max_startups drops every newcomer (rate 100%)...
        pair = pair_with(self, max_startups_per_source=3, max_startups=(3, 100, 100))
        idle = [raw_connect(pair.factory, pair.clock) for _ in range(5)]
        self.assertEqual(sum(1 for _c, s, _w in idle if s in pair.factory.connections), 3)
        [line, *_] = [t for t in self.logs.texts() if "max_startups_per_source" in t]
        self.assertIn(WORKER_HOST_ADDRESS.host, line)
        # ...but the first connection of another source is let in until it is full.
        elsewhere = IPv4Address("TCP", "198.51.100.99", 40000)
        other = raw_connect(pair.factory, pair.clock, peer=elsewhere)
        self.assertIn(other[1], pair.factory.connections)
        again = raw_connect(pair.factory, pair.clock, peer=IPv4Address("TCP", "198.51.100.99", 40001))
        self.assertNotIn(again[1], pair.factory.connections)

    def test_unauthenticated_connections_share_a_memory_budget(self) -> None:
        pair = pair_with(self, max_unauthenticated_memory=64 * KiB, max_startups=(50, 30, 100))
        held = []
        for n in range(8):
            peer = IPv4Address("TCP", f"198.51.100.{n + 1}", 40000)
            client, server, wire = raw_connect(pair.factory, pair.clock, peer=peer)
            wire.flush()
            # Most of a packet, never finished: the master must hold it.
            wire.server_io.bufferReceived(struct.pack(">L", PREAUTH_MAX_PACKET - 4) + b"\0" * (20 * KiB))
            held.append(server)
        dropped = [s for s in held if s.transport.disconnecting]
        self.assertGreaterEqual(len(dropped), 1)
        total = sum(s.held for s in pair.factory.connections if not s.authenticated)
        self.assertLessEqual(total, 64 * KiB + 24 * KiB)
        self.assertTrue(any("max_unauthenticated_memory" in t for t in self.logs.texts()))


class SignatureTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def login_with(self, key: Any, algorithm: bytes, sign: Any) -> tuple[Any, Any]:
        entry = HostEntry(name="rsa-host", key=key.public(), workers=("*",))
        pair = tune(SSHPair(self, entries=[entry]), liveness=QUIET, mux_auth=True)
        client, server, wire = raw_connect(pair.factory, pair.clock)
        wire.flush()
        user, service = b"buildbot-worker", b"ssh-connection"
        blob = key.public().blob()
        body = NS(user) + NS(service) + NS(b"publickey") + b"\x01" + NS(algorithm) + NS(blob)
        data = NS(client.sessionID) + bytes((userauth.MSG_USERAUTH_REQUEST,)) + body
        client.sendPacket(userauth.MSG_USERAUTH_REQUEST, body + NS(sign(data)))
        wire.flush()
        return client, server

    def test_sha1_rsa_signatures_are_refused(self) -> None:
        key = RSA_KEY
        client, server = self.login_with(
            key, b"ssh-rsa", lambda data: key.sign(data, signatureType=b"ssh-rsa")
        )
        self.assertFalse(server.authenticated)
        [line] = self.logs.matching("refused host rsa-host", "ssh-rsa", "SHA-1")
        self.assertIn(fingerprint(key), line)
        # SHA-2 with the same key logs in.
        client, server = self.login_with(
            key, b"rsa-sha2-512", lambda data: key.sign(data, signatureType=b"rsa-sha2-512")
        )
        self.assertTrue(server.authenticated)

    def test_the_algorithm_must_be_the_keys(self) -> None:
        key = RSA_KEY
        client, server = self.login_with(
            key, b"ssh-ed25519", lambda data: key.sign(data, signatureType=b"rsa-sha2-256")
        )
        self.assertFalse(server.authenticated)
        self.assertTrue(self.logs.matching("refused host rsa-host", "does not sign with a ssh-rsa key"))

    def test_the_signature_must_be_of_the_algorithm_asked_for(self) -> None:
        key = RSA_KEY
        client, server = self.login_with(
            key, b"rsa-sha2-512", lambda data: key.sign(data, signatureType=b"rsa-sha2-256")
        )
        self.assertFalse(server.authenticated)
        [line] = self.logs.matching("bad signature for host rsa-host")
        self.assertIn(f"from {WORKER_HOST_ADDRESS.host}", line)


class AfterLoginTests(TestCase):
    """An authorized host, before any PB password."""

    def setUp(self) -> None:
        self.logs = LogBounds(self)
        self.pair = pair_with(self)

    def open_to(self, client: Any, target: bytes, sender: int) -> None:
        data = NS(target) + struct.pack(">L", PB_PORT) + NS(b"127.0.0.1") + struct.pack(">L", 0)
        client.sendPacket(
            MSG_CHANNEL_OPEN, NS(b"direct-tcpip") + struct.pack(">3L", sender, 2**20, 2**15) + data
        )

    def test_refused_opens_to_a_peer_that_does_not_read(self) -> None:
        # Today: refusals echoing a 30 KB target piled up, 99 -> 704 MiB in 10 s.
        client, server, wire = stalled_login(self.pair)
        wire.stall()
        for n in range(10_000):
            self.open_to(client, b"h" * 30_000, n)
            wire.flush()
            if server.transport.disconnecting:
                break
        self.assertTrue(server.transport.disconnecting, "the master kept a peer that takes nothing")
        limit = ServerLimits().max_backlog
        self.assertLessEqual(server.backlog, limit + 1 * KiB)
        self.assertLessEqual(held_by_server(server, wire), limit + 128 * KiB)
        [line] = [t for t in self.logs.texts() if "is not taking what it is sent" in t]
        self.assertIn("host debian-sid", line)
        self.assertIn(fingerprint(HOST_KEY), line)
        self.logs.assertBounded(20)

    def opened(self, client: Any, wire: Any, sender: int = 0) -> int:
        """Open a channel to the PB port; the master's number for it."""
        self.open_to(client, b"localhost", sender)
        wire.flush()
        [confirm] = [
            p for n, p in client.conn.received if n == 91 and struct.unpack(">L", p[:4])[0] == sender
        ]
        return int(struct.unpack(">L", confirm[4:8])[0])

    def test_data_past_the_packet_size_closes_that_channel(self) -> None:
        client, server, wire = raw_login(self.pair.factory, self.pair.clock)
        channel = self.opened(client, wire)
        client.sendPacket(94, struct.pack(">L", channel) + NS(b"x" * (64 * KiB + 1)))
        wire.flush()
        self.assertIn(97, [n for n, _ in client.conn.received])  # CHANNEL_CLOSE
        self.assertFalse(server.transport.disconnecting)
        [line] = [t for t in self.logs.texts() if "exceed its window or packet size" in t]
        self.assertIn("host debian-sid", line)
        self.assertIn(f"channel {channel}", line)

    def test_data_shorter_than_it_says_drops_the_peer(self) -> None:
        client, server, wire = raw_login(self.pair.factory, self.pair.clock)
        channel = self.opened(client, wire)
        client.sendPacket(94, struct.pack(">LL", channel, 100) + b"short")
        wire.flush()
        self.assertTrue(server.transport.disconnecting)
        self.assertTrue([t for t in self.logs.texts() if "malformed SSH message 94" in t])

    def test_refusals_do_not_echo_a_long_target(self) -> None:
        client, server, wire = raw_login(self.pair.factory, self.pair.clock)
        self.open_to(client, b"h" * 30_000, 0)
        wire.flush()
        [failure] = [p for n, p in client.conn.received if n == MSG_CHANNEL_OPEN_FAILURE]
        self.assertLess(len(failure), 400)

    def test_a_key_exchange_never_finished(self) -> None:
        # Today Conch queued every reply until NEWKEYS: 99 -> 704 MiB in 8 s.
        client, server, wire = raw_login(self.pair.factory, self.pair.clock)
        client.ssh_KEXINIT = lambda packet: None  # it never answers the master's KEXINIT
        client.sendKexInit()
        wire.flush()
        self.assertNotEqual(server._keyExchangeState, server._KEY_EXCHANGE_NONE)
        for _ in range(20_000):
            # Sent past the client's own key exchange queue, as an attacker would.
            state, client._keyExchangeState = client._keyExchangeState, client._KEY_EXCHANGE_NONE
            client.sendPacket(MSG_GLOBAL_REQUEST, NS(b"x" * 100) + b"\x01")
            client._keyExchangeState = state
            wire.flush()
            if server.transport.disconnecting:
                break
        self.assertTrue(server.transport.disconnecting)
        self.assertLessEqual(server.backlog, ServerLimits().max_backlog + 1 * KiB)
        [line] = [t for t in self.logs.texts() if "during a key exchange" in t]
        self.assertIn("host debian-sid", line)

    def test_unknown_messages_are_rate_limited_in_the_log(self) -> None:
        client, server, wire = raw_login(self.pair.factory, self.pair.clock)
        before = len(self.logs.texts())
        for _ in range(500):
            client.sendPacket(130, b"{x}" * 1000)
        wire.flush()
        self.assertFalse(server.transport.disconnecting)
        lines = self.logs.texts()[before:]
        self.assertEqual(len([t for t in lines if "unknown SSH message 130" in t]), 10)
        self.pair.clock.advance(61)
        client.sendPacket(130, b"")
        wire.flush()
        [summary] = [t for t in self.logs.texts() if "more lines about this peer suppressed" in t]
        self.assertIn("490 more lines", summary)
        self.logs.assertBounded(30)


class KeyExchangeOfferTests(TestCase):
    def test_no_group_exchange_without_moduli(self) -> None:
        # Advertised (and fatal when picked) until now: the server has no moduli.
        pair = tune(SSHPair(self), liveness=QUIET)
        server = pair.factory.buildProtocol(WORKER_HOST_ADDRESS)
        server.makeConnection(StringTransport(peerAddress=WORKER_HOST_ADDRESS))
        kexinit = server.ourKexInitPayload
        offered = kexinit[17 : 21 + struct.unpack(">L", kexinit[17:21])[0]]
        self.assertNotIn(b"group-exchange", offered)
        self.assertIn(b"kex-strict-s-v00@openssh.com", offered)
        self.assertNotIn(b"group-exchange", b",".join(server.supportedKeyExchanges))
        server.connectionLost(Failure(Exception("done")))

    def test_a_key_on_two_lines_is_its_first_lines_after_a_reload(self) -> None:
        first = HostEntry(name="first", key=HOST_KEY.public(), workers=("*-debian-sid",))
        second = HostEntry(name="second", key=HOST_KEY.public(), workers=("nothing",))
        pair = tune(SSHPair(self, entries=[first, second]), liveness=QUIET, mux_auth=True)
        pair.start()
        self.assertEqual(pair.server.avatar.entry.name, "first")
        pair.entries = [first, second, HostEntry(name="fedora", key=generate_ed25519().public())]
        pair.factory.apply_entries()
        self.assertEqual(pair.server.avatar.entry.name, "first")


def frame(payload: bytes, block: int = 8) -> bytes:
    """An unencrypted SSH binary packet around ``payload``."""
    pad = block - (5 + len(payload)) % block
    if pad < 4:
        pad += block
    return struct.pack(">LB", len(payload) + pad + 1, pad) + payload + b"\0" * pad


RSA_KEY = keys.Key(rsa.generate_private_key(65537, 2048))


class ConnectionLoginBytesTests(TestCase):
    def test_channels_not_logged_in_share_one_budget(self) -> None:
        # Each channel may send pb_login_bytes before its login; together, the
        # channels of one connection may send connection_login_bytes.
        from twisted.spread import banana

        from buildbot_sshmux.master.pbinput import PBInputLimits

        logs = LogCapture(self)
        pair = pair_with(self)
        pair.factory.pb_input = PBInputLimits(connection_login_bytes=12 * KiB)
        client, server, wire = raw_login(pair.factory, pair.clock)
        head: list[bytes] = []
        banana.int2b128(100_000, head.append)
        start = b"".join(head) + banana.STRING  # a string Banana must wait for
        for n in range(3):
            data = NS(b"localhost") + struct.pack(">L", PB_PORT) + NS(b"127.0.0.1") + struct.pack(">L", 0)
            client.sendPacket(
                MSG_CHANNEL_OPEN, NS(b"direct-tcpip") + struct.pack(">3L", n, 2**20, 2**15) + data
            )
            wire.flush()
            [confirm] = [p for m, p in client.conn.received if m == 91 and struct.unpack(">L", p[:4])[0] == n]
            server_id = struct.unpack(">L", confirm[4:8])[0]
            client.sendPacket(94, struct.pack(">L", server_id) + NS(start + b"x" * 5000))
            wire.flush()
        closes = [p for m, p in client.conn.received if m == 97]  # CHANNEL_CLOSE
        self.assertEqual(len(closes), 1, "the channel that passed the budget, only")
        self.assertFalse(server.transport.disconnecting)
        [line] = logs.matching("connection_login_bytes=12288")
        self.assertIn("host debian-sid", line)
        self.assertIn("channel 2", line)
