"""Property-based tests: the master is never an open proxy and never crashes on a peer's input.

(a) raw garbage before (and instead of) the handshake; (b) arbitrary, well
framed SSH messages after a full handshake and login; (c) channel opens,
global requests, channel requests and authentication methods other than the
PB bridge and public keys are refused.  Any exception out of the server's
``dataReceived`` would reach the reactor, so the wire lets it through and the
test fails; any attempt at an outbound connection is recorded and fails the
test too.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.conch.error import ConchError
from twisted.conch.ssh import userauth
from twisted.conch.ssh.common import NS
from twisted.internet import endpoints, error
from twisted.internet import reactor as global_reactor
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.limits import ServerLimits
from buildbot_sshmux.wire.aead import AEAD_CIPHERS
from buildbot_sshmux.wire.channel import ProtocolChannel
from buildbot_sshmux.wire.keys import fingerprint
from buildbot_sshmux.wire.liveness import KEEPALIVE_REQUEST, Liveness
from buildbot_sshmux.wire.transport import AEADFraming, StrictKeyExchange

from .sshharness import (
    HOST_KEY,
    OTHER_KEY,
    PB_PORT,
    WORKER_HOST_ADDRESS,
    ExtraLink,
    LogCapture,
    RawSSHClient,
    SSHPair,
    raw_connect,
    raw_login,
    tune,
)

QUIET = Liveness(keepalive_interval=0, rekey_interval=0)
FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

MSG_GLOBAL_REQUEST = 80
MSG_CHANNEL_OPEN = 90
MSG_CHANNEL_OPEN_CONFIRMATION = 91
MSG_CHANNEL_OPEN_FAILURE = 92
MSG_CHANNEL_REQUEST = 98
MSG_CHANNEL_FAILURE = 100
MSG_REQUEST_SUCCESS = 81
MSG_REQUEST_FAILURE = 82


class OutboundGuard:
    """Records every attempt to open an outbound connection, by any API."""

    def __init__(self, testcase: TestCase) -> None:
        self.attempts: list[str] = []

        def recorder(name: str) -> Any:
            def record(*args: Any, **kwargs: Any) -> Any:
                self.attempts.append(f"{name}{args!r}")
                raise AssertionError(f"outbound connection attempted: {name}")

            return record

        for name in ("connectTCP", "connectUNIX", "connectSSL", "connectUDP", "listenTCP", "listenUNIX"):
            if hasattr(global_reactor, name):
                testcase.patch(global_reactor, name, recorder(f"reactor.{name}"))
        for cls in (
            endpoints.TCP4ClientEndpoint,
            endpoints.TCP6ClientEndpoint,
            endpoints.HostnameEndpoint,
            endpoints.UNIXClientEndpoint,
            endpoints.SSL4ClientEndpoint,
        ):
            testcase.patch(cls, "connect", recorder(f"{cls.__name__}.connect"))
        testcase.patch(endpoints, "clientFromString", recorder("clientFromString"))
        testcase.patch(socket.socket, "connect", recorder("socket.connect"))
        testcase.patch(socket.socket, "connect_ex", recorder("socket.connect_ex"))
        testcase.patch(socket, "create_connection", recorder("socket.create_connection"))


def frame(payload: bytes, block: int = 8) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253, 6) around ``payload``."""
    pad = block - (5 + len(payload)) % block
    if pad < 4:
        pad += block
    return struct.pack(">LB", len(payload) + pad + 1, pad) + payload + b"\0" * pad


VERSION = b"SSH-2.0-fuzz_1.0\r\n"
no_newline = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
message = st.tuples(st.integers(0, 255), st.binary(max_size=300)).map(lambda m: bytes((m[0],)) + m[1])
plausible_kexinit = st.builds(
    lambda cookie, names, tail: bytes((20,)) + cookie + b"".join(NS(n) for n in names) + tail,
    st.binary(min_size=16, max_size=16),
    st.lists(
        st.sampled_from(
            [b"curve25519-sha256", b"ssh-ed25519", b"aes128-ctr", b"hmac-sha2-256", b"none", b"", b"x"]
        ),
        min_size=0,
        max_size=12,
    ),
    st.binary(max_size=8),
)
garbage = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda v, rest: b"SSH-2.0-" + v + b"\r\n" + rest, no_newline, st.binary(max_size=1024)),
    st.builds(lambda lines, rest: lines + rest, st.binary(max_size=300), st.binary(max_size=300)),
    st.builds(
        lambda msgs: VERSION + b"".join(frame(m) for m in msgs),
        st.lists(st.one_of(message, plausible_kexinit), max_size=6),
    ),
    st.builds(  # a bad packet length or padding
        lambda n, p, body: VERSION + struct.pack(">LB", n, p) + body,
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        st.binary(max_size=300),
    ),
    st.builds(lambda v: b"SSH-" + v + b"-x\r\n", st.sampled_from([b"1.5", b"1.99", b"3.0", b"", b"2.0\x00"])),
)


class GarbageBeforeHandshakeTests(TestCase):
    def setUp(self) -> None:
        self.guard = OutboundGuard(self)
        self.pair = tune(SSHPair(self), liveness=QUIET, mux_auth=True)
        self.factory = self.pair.factory

    @FUZZ
    @given(data=garbage, chunk=st.integers(1, 512))
    def test_garbage_never_raises_nor_connects(self, data: bytes, chunk: int) -> None:
        server = self.factory.buildProtocol(WORKER_HOST_ADDRESS)
        tcp = StringTransport(peerAddress=WORKER_HOST_ADDRESS)
        server.makeConnection(tcp)
        try:
            for i in range(0, len(data), chunk):
                if tcp.disconnecting:  # a real transport stops reading then
                    break
                server.dataReceived(data[i : i + chunk])
            self.assertFalse(getattr(server, "avatar", None), "logged in on garbage")
        finally:
            server.connectionLost(Failure(error.ConnectionDone()))
        self.assertNotIn(server, self.factory.connections)
        self.assertEqual(self.guard.attempts, [])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.factory.connections, set())

    @FUZZ
    @given(data=garbage)
    def test_garbage_after_a_handshake_from_a_real_client(self, data: bytes) -> None:
        # A real client handshakes, then its stream turns to garbage (as if a
        # middlebox corrupted it): the server drops it and nothing escapes.
        _client, server, wire = raw_connect(self.factory, self.pair.clock)
        wire.flush()
        self.send_garbage(server, wire, data)

    def send_garbage(self, server: Any, wire: Any, data: bytes) -> None:
        """``data`` after the handshake, then a close: the server dropped the peer, cleanly."""
        wire.client_io.write(data)
        wire.flush()
        wire.client_io.loseConnection()
        wire.flush()
        self.assertFalse(getattr(server, "avatar", None))
        self.assertNotIn(server, self.factory.connections)
        self.assertEqual(self.guard.attempts, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(data=garbage, cipher=st.sampled_from(AEAD_CIPHERS))
    def test_garbage_after_an_aead_handshake(self, data: bytes, cipher: bytes) -> None:
        # The same over each AEAD cipher (strict key exchange too): the length
        # is read first (chacha20 encrypts it), then the tag checked.
        _client, server, wire = raw_connect(self.factory, self.pair.clock, client=aead_client(cipher))
        wire.flush()
        self.assertEqual(server.currentEncryptions.inCipType, cipher)
        self.assertTrue(server.strict_kex)
        self.send_garbage(server, wire, data)


def aead_client(cipher: bytes) -> Any:
    """A `RawSSHClient` with our AEAD framing and strict key exchange, asking for ``cipher``."""

    class AEADRawClient(StrictKeyExchange, AEADFraming, RawSSHClient):  # type: ignore[misc, valid-type]
        supportedCiphers = [cipher]

    return AEADRawClient()


def channel_open(kind: bytes, data: bytes, sender: int = 0) -> bytes:
    return NS(kind) + struct.pack(">3L", sender, 65536, 32768) + data


def direct_tcpip(host: bytes, port: int) -> bytes:
    return NS(host) + struct.pack(">L", port) + NS(b"127.0.0.1") + struct.pack(">L", 50000)


PB_OPEN = channel_open(b"direct-tcpip", direct_tcpip(b"localhost", PB_PORT))
u32 = st.integers(0, 2**32 - 1)
small_channel = st.integers(0, 3)
request_names = st.one_of(
    st.sampled_from(
        [
            b"shell",
            b"exec",
            b"pty-req",
            b"subsystem",
            b"env",
            b"x11-req",
            b"signal",
            b"window-change",
            b"tcpip-forward",
            b"cancel-tcpip-forward",
            b"streamlocal-forward@openssh.com",
            b"no-more-sessions@openssh.com",
            b"hostkeys-prove-00@openssh.com",
            KEEPALIVE_REQUEST,
        ]
    ),
    st.binary(max_size=20),
)
channel_types = st.one_of(
    st.sampled_from(
        [
            b"session",
            b"x11",
            b"forwarded-tcpip",
            b"direct-tcpip",
            b"direct-streamlocal@openssh.com",
            b"auth-agent@openssh.com",
            b"tun@openssh.com",
        ]
    ),
    st.binary(max_size=20),
)
hosts = st.one_of(
    st.sampled_from(
        [
            b"localhost",
            b"LOCALHOST",
            b"127.0.0.1",
            b"127.9.8.7",
            b"::1",
            b"0:0:0:0:0:0:0:1",
            b"0.0.0.0",
            b"::",
            b"10.0.0.1",
            b"192.0.2.10",
            b"example.org",
            b"localhost.example.org",
            b"ip6-localhost",
            b"localhost.localdomain",
            b"127.0.0.1\x00",
            b" 127.0.0.1",
            b"::ffff:127.0.0.1",
            b"2130706433",
            b"0x7f.1",
            b"127.1",
            b"\xff\xfe",
            b"",
        ]
    ),
    st.binary(max_size=30),
    st.text(max_size=20).map(lambda t: t.encode("utf-8")),
)
ports = st.one_of(st.sampled_from([PB_PORT, 22, 0, 80, 2222, 65535, PB_PORT + 2**16]), u32)

# Messages of the connection protocol (80-100), each with a random or a
# plausible payload; channel numbers are mostly small so they hit real ones.
connection_message = st.one_of(
    st.tuples(st.integers(80, 100), st.binary(max_size=64)),
    st.tuples(
        st.integers(80, 100),
        st.builds(lambda c, rest: struct.pack(">L", c) + rest, small_channel, st.binary(max_size=64)),
    ),
    st.tuples(
        st.just(MSG_GLOBAL_REQUEST),
        st.builds(
            lambda n, w, d: NS(n) + bytes((w,)) + d, request_names, st.integers(0, 1), st.binary(max_size=16)
        ),
    ),
    st.tuples(
        st.just(MSG_CHANNEL_OPEN),
        st.builds(
            lambda k, s, w, m, h, p: NS(k) + struct.pack(">3L", s, w, m) + direct_tcpip(h, p),
            channel_types,
            u32,
            u32,
            u32,
            hosts,
            ports,
        ),
    ),
    st.tuples(
        st.just(MSG_CHANNEL_REQUEST),
        st.builds(
            lambda c, n, w, d: struct.pack(">L", c) + NS(n) + bytes((w,)) + d,
            small_channel,
            request_names,
            st.integers(0, 1),
            st.binary(max_size=16),
        ),
    ),
    st.tuples(
        st.sampled_from([93, 94, 95]),
        st.builds(lambda c, n, d: struct.pack(">LL", c, n) + d, small_channel, u32, st.binary(max_size=32)),
    ),
    st.tuples(st.sampled_from([96, 97]), st.builds(lambda c: struct.pack(">L", c), small_channel)),
    st.tuples(
        st.sampled_from([91, 92]),
        st.builds(
            lambda a, b, rest: struct.pack(">LL", a, b) + rest,
            small_channel,
            small_channel,
            st.binary(max_size=16),
        ),
    ),
)


FEDORA = HostEntry(name="fedora-40", key=OTHER_KEY.public(), workers=("*-fedora",))


class AfterLoginTests(TestCase):
    """A logged-in host sends whatever it likes; the master stays up for everyone."""

    def setUp(self) -> None:
        self.guard = OutboundGuard(self)
        entry = HostEntry(name="debian-sid", key=HOST_KEY.public(), workers=("*-debian-sid",))
        self.pair = tune(SSHPair(self, entries=[entry, FEDORA]), liveness=QUIET, mux_auth=True)
        # Another host, logged in before and checked after every example.
        self.other = ExtraLink(self, self.pair, OTHER_KEY, peer=WORKER_HOST_ADDRESS)
        self.other.start()
        self.other_server = self.other.server
        self.assertIsNotNone(self.other.link.connection)

    def assertOtherHostServed(self) -> None:
        conn = self.other.link.connection
        self.assertIsNotNone(conn, "another host lost its connection")
        self.assertIn(self.other_server, self.pair.factory.connections)
        opened: list[Any] = []
        d = conn.sendGlobalRequest(KEEPALIVE_REQUEST, b"", wantReply=1)
        d.addBoth(opened.append)
        self.other.wire.flush()
        self.assertEqual(opened, [b""], "the master stopped answering another host")

    def assertNothingEscaped(self) -> None:
        self.assertEqual(self.guard.attempts, [])
        unexpected = [f for f in self.flushLoggedErrors() if not f.check(ConchError)]
        self.assertEqual(unexpected, [])

    @FUZZ
    @given(messages=st.lists(connection_message, min_size=1, max_size=12), with_pb=st.booleans())
    def test_arbitrary_connection_messages(self, messages: list[tuple[int, bytes]], with_pb: bool) -> None:
        client, server, wire = raw_login(self.pair.factory, self.pair.clock, HOST_KEY)
        try:
            self.fuzz(client, wire, messages, with_pb)
        finally:
            wire.client_io.loseConnection()
            wire.flush()
        self.assertEqual(self.pair.factory.connections, {self.other_server})
        self.assertNothingEscaped()

    def fuzz(self, client: Any, wire: Any, messages: list[tuple[int, bytes]], with_pb: bool) -> None:
        if with_pb:  # a real PB channel (server side 0), for the messages to hit
            client.sendPacket(MSG_CHANNEL_OPEN, PB_OPEN)
            wire.flush()
            self.assertIn(MSG_CHANNEL_OPEN_CONFIRMATION, [n for n, _p in client.conn.received])
        for number, payload in messages:
            if wire.client_io.disconnecting or wire.server_io.disconnecting:
                break
            client.sendPacket(number, payload)
        wire.flush()

        self.assertNothingEscaped()
        self.assertOtherHostServed()
        if not wire.server_io.disconnecting:
            # Still connected: it still serves a legitimate PB channel.
            before = len(client.conn.received)
            client.sendPacket(
                MSG_CHANNEL_OPEN,
                channel_open(b"direct-tcpip", direct_tcpip(b"127.0.0.1", PB_PORT), sender=99),
            )
            wire.flush()
            replies = [n for n, _p in client.conn.received[before:]]
            self.assertTrue(MSG_CHANNEL_OPEN_CONFIRMATION in replies or wire.server_io.disconnecting, replies)


def allowed(kind: bytes, host: bytes, port: int) -> bool:
    """The policy, stated independently: direct-tcpip to a loopback name or address at the PB port."""
    if kind != b"direct-tcpip" or port != PB_PORT:
        return False
    try:
        name = host.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if name.lower() in {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RefusalTests(TestCase):
    def setUp(self) -> None:
        self.guard = OutboundGuard(self)
        self.pair = tune(
            SSHPair(self), liveness=QUIET, limits=ServerLimits(max_auth_tries=100), mux_auth=True
        )
        self.client, self.server, self.wire = raw_login(self.pair.factory, self.pair.clock, HOST_KEY)
        self.sender = 0

    def send(self, number: int, payload: bytes) -> list[tuple[int, bytes]]:
        before = len(self.client.conn.received)
        self.client.sendPacket(number, payload)
        self.wire.flush()
        self.flushLoggedErrors(ConchError)
        return self.client.conn.received[before:]

    @FUZZ
    @given(kind=channel_types, host=hosts, port=ports)
    def test_only_direct_tcpip_to_the_pb_port_on_loopback_opens(
        self, kind: bytes, host: bytes, port: int
    ) -> None:
        self.sender += 1
        # An opened PB channel may carry PB's first bytes (94) after the confirmation.
        [(reply, payload), *_pb] = self.send(
            MSG_CHANNEL_OPEN, channel_open(kind, direct_tcpip(host, port), self.sender)
        )
        if allowed(kind, host, port):
            self.assertEqual(reply, MSG_CHANNEL_OPEN_CONFIRMATION)
            local = struct.unpack(">L", payload[4:8])[0]
            self.assertIsInstance(self.server.service.channels[local], ProtocolChannel)
            self.send(97, struct.pack(">L", local))  # close it again
        else:
            self.assertEqual(reply, MSG_CHANNEL_OPEN_FAILURE, (kind, host, port))
            self.assertEqual(struct.unpack(">L", payload[:4])[0], self.sender)
        self.assertFalse(self.wire.server_io.disconnecting)
        self.assertEqual(self.guard.attempts, [])

    @FUZZ
    @given(name=request_names, data=st.binary(max_size=32))
    def test_global_requests_other_than_keepalive_are_refused(self, name: bytes, data: bytes) -> None:
        [(reply, _payload)] = self.send(MSG_GLOBAL_REQUEST, NS(name) + b"\x01" + data)
        expected = MSG_REQUEST_SUCCESS if name == KEEPALIVE_REQUEST else MSG_REQUEST_FAILURE
        self.assertEqual(reply, expected)
        self.assertEqual(self.guard.attempts, [])

    @FUZZ
    @given(name=request_names, data=st.binary(max_size=32))
    def test_channel_requests_on_a_pb_channel_are_refused(self, name: bytes, data: bytes) -> None:
        self.sender += 1
        [(reply, payload), *_pb] = self.send(
            MSG_CHANNEL_OPEN, channel_open(b"direct-tcpip", direct_tcpip(b"localhost", PB_PORT), self.sender)
        )
        self.assertEqual(reply, MSG_CHANNEL_OPEN_CONFIRMATION)
        local = struct.unpack(">L", payload[4:8])[0]
        replies = self.send(MSG_CHANNEL_REQUEST, struct.pack(">L", local) + NS(name) + b"\x01" + data)
        self.assertEqual([n for n, _p in replies], [MSG_CHANNEL_FAILURE])
        self.send(97, struct.pack(">L", local))


class AuthMethodTests(TestCase):
    """Only publickey is advertised, and no other method logs anyone in."""

    def setUp(self) -> None:
        self.pair = tune(SSHPair(self), liveness=QUIET, mux_auth=True)

    @FUZZ
    @given(
        attempts=st.lists(
            st.one_of(
                st.tuples(st.just(b"password"), st.builds(lambda p: b"\x00" + NS(p), st.binary(max_size=20))),
                st.tuples(
                    st.just(b"password"),
                    st.builds(
                        lambda o, n: b"\x01" + NS(o) + NS(n), st.binary(max_size=10), st.binary(max_size=10)
                    ),
                ),
                st.tuples(
                    st.just(b"keyboard-interactive"),
                    st.builds(
                        lambda l, s: NS(l) + NS(s),
                        st.binary(max_size=5),
                        st.sampled_from([b"", b"pam", b"bsdauth"]),
                    ),
                ),
                st.tuples(
                    st.sampled_from([b"hostbased", b"none", b"gssapi-with-mic", b"publickey"]),
                    st.binary(max_size=40),
                ),
                st.tuples(st.binary(max_size=20), st.binary(max_size=40)),
            ),
            min_size=1,
            max_size=4,
        ),
        user=st.sampled_from([b"buildbot-worker", b"root", b""]),
    )
    def test_other_methods_are_refused(self, attempts: list[tuple[bytes, bytes]], user: bytes) -> None:
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        for method, data in attempts:
            client.auth.request(method, data, user=user)
            wire.flush()
        received = [n for n, _p in client.auth.received]
        self.assertNotIn(userauth.MSG_USERAUTH_SUCCESS, received)
        self.assertFalse(server.authenticated)
        self.assertNotIn(userauth.MSG_USERAUTH_INFO_REQUEST, received, "keyboard-interactive was started")
        for payload in client.auth.replies(userauth.MSG_USERAUTH_FAILURE):
            self.assertEqual(
                payload, NS(b"publickey") + b"\x00", "a method other than publickey was advertised"
            )
        self.assertEqual(self.flushLoggedErrors(), [])
        wire.client_io.loseConnection()
        wire.flush()

    def test_password_for_a_real_user_is_refused_and_advertises_publickey(self) -> None:
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        client.auth.request(b"password", b"\x00" + NS(b"pw"))
        client.auth.request(b"keyboard-interactive", NS(b"") + NS(b""))
        client.auth.request(b"none")
        wire.flush()
        self.assertEqual(
            client.auth.received,
            [(userauth.MSG_USERAUTH_FAILURE, NS(b"publickey") + b"\x00")] * 3,
        )
        self.assertFalse(server.authenticated)


class RegressionTests(TestCase):
    """The faults the properties above found, as plain examples."""

    def setUp(self) -> None:
        self.guard = OutboundGuard(self)
        self.logs = LogCapture(self)
        entry = HostEntry(name="debian-sid", key=HOST_KEY.public(), workers=("*-debian-sid",))
        self.pair = tune(SSHPair(self, entries=[entry, FEDORA]), liveness=QUIET, mux_auth=True)
        self.other = ExtraLink(self, self.pair, OTHER_KEY, peer=WORKER_HOST_ADDRESS)
        self.other.start()
        self.client, self.server, self.wire = raw_login(self.pair.factory, self.pair.clock, HOST_KEY)

    def send(self, number: int, payload: bytes) -> list[int]:
        before = len(self.client.conn.received)
        self.client.sendPacket(number, payload)
        self.wire.flush()
        self.flushLoggedErrors(ConchError)
        return [n for n, _p in self.client.conn.received[before:]]

    def assertDropped(self, number: int) -> None:
        self.assertTrue(self.client.lost)
        self.assertNotIn(self.server, self.pair.factory.connections)
        [line] = self.logs.matching("malformed SSH message")
        self.assertIn(f"message {number}", line)
        self.assertIn("host debian-sid", line)
        self.assertIn(fingerprint(HOST_KEY), line)
        self.assertIsNotNone(self.other.link.connection, "another host was affected")

    def test_a_refused_target_that_is_not_ascii_gets_a_refusal(self) -> None:
        # Conch sends the refusal's text as ASCII: a target naming "nÏ" used
        # to raise UnicodeEncodeError out of dataReceived.
        for host in ["nÏ".encode(), b"evil\nrefused nothing for host other", b"\xff\xfe"]:
            replies = self.send(MSG_CHANNEL_OPEN, channel_open(b"direct-tcpip", direct_tcpip(host, PB_PORT)))
            self.assertEqual(replies, [MSG_CHANNEL_OPEN_FAILURE], host)
        self.assertFalse(self.client.lost)
        lines = self.logs.matching("refused a", "for host debian-sid")
        self.assertEqual(len(lines), 3)
        for line in lines:
            self.assertNotIn("\n", line)
            line.encode("ascii")

    def test_a_truncated_message_drops_only_that_peer(self) -> None:
        self.assertEqual(self.send(94, b"\x00\x00"), [])  # CHANNEL_DATA, too short to parse
        self.assertDropped(94)

    def test_a_message_for_an_unknown_channel_drops_only_that_peer(self) -> None:
        self.send(93, struct.pack(">LL", 7, 1000))  # WINDOW_ADJUST for no channel
        self.assertDropped(93)

    def answer_to_an_open_never_sent(self, number: int, payload: bytes) -> None:
        # Conch would apply it to the open PB channel of that number (a second
        # channelOpen, or a channel half removed that made connectionLost
        # raise KeyError); the peer is dropped and the PB session ends cleanly.
        self.assertIn(MSG_CHANNEL_OPEN_CONFIRMATION, self.send(MSG_CHANNEL_OPEN, PB_OPEN))
        [channel] = self.server.service.channels.values()
        lost: list[Any] = []
        channel.protocol.connectionLost = lost.append
        self.send(number, payload)
        self.assertDropped(number)
        self.assertEqual(len(lost), 1, "the PB session was not told its channel is gone")

    def test_an_open_failure_the_master_never_asked_for(self) -> None:
        self.answer_to_an_open_never_sent(
            MSG_CHANNEL_OPEN_FAILURE, struct.pack(">LL", 0, 0) + NS(b"") + NS(b"")
        )

    def test_an_open_confirmation_the_master_never_asked_for(self) -> None:
        self.answer_to_an_open_never_sent(
            MSG_CHANNEL_OPEN_CONFIRMATION, struct.pack(">4L", 0, 5, 65536, 32768)
        )

    def test_an_unsolicited_global_reply_drops_only_that_peer(self) -> None:
        self.send(MSG_REQUEST_SUCCESS, b"")
        self.assertDropped(MSG_REQUEST_SUCCESS)
