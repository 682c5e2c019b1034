"""A worker session's bad input fails that session only, over the in-memory SSH pair.

A protocol error on one channel (garbage Banana, at either end) closes that
channel with one log line; the host's other sessions and its SSH connection
go on.  A PB login offering no usable worker name is refused like any other.
"""

from __future__ import annotations

from typing import Any

from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.spread import banana, pb
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.pbinput import PBChannel
from buildbot_sshmux.worker.link import ChannelEndpoint

from .sshharness import PB_PORT, WORKER_HOST_ADDRESS, LogCapture, SSHPair

WHERE = f"{WORKER_HOST_ADDRESS.host}:{WORKER_HOST_ADDRESS.port}"


def b128(n: int) -> bytes:
    """Banana's prefix digits for ``n``."""
    out: list[bytes] = []
    banana.int2b128(n, out.append)
    return b"".join(out)


class PBSession:
    """One worker session over ``pair``: a PB client on a channel, and the master's end."""

    def __init__(self, test: TestCase, pair: SSHPair, name: str = "libxml2-debian-sid") -> None:
        self.test = test
        self.pair = pair
        self.name = name
        self.factory = pb.PBClientFactory()
        connected = ChannelEndpoint(pair.link, PB_PORT, name).connect(self.factory)
        pair.flush()
        self.broker: pb.Broker = test.successResultOf(connected)
        self.channel: Any = self.broker.transport  # the worker host's end
        server_channels = pair.server_connection.channels
        self.server_channel: PBChannel = server_channels[max(server_channels)]
        self.server_broker: pb.Broker = self.server_channel.protocol  # type: ignore[assignment]
        self.delivered: list[int] = []  # sizes of the master broker's dataReceived calls
        self.lost_while_delivering: list[bool] = []  # at each connectionLost of the master's broker
        received, lost = self.server_broker.dataReceived, self.server_broker.connectionLost

        def data_received(data: bytes) -> None:
            self.delivered.append(len(data))
            received(data)

        def connection_lost(reason: Any) -> None:
            self.lost_while_delivering.append(self.server_channel._delivering)
            lost(reason)

        self.server_broker.dataReceived = data_received  # type: ignore[method-assign]
        self.server_broker.connectionLost = connection_lost  # type: ignore[method-assign]

    def login(self, password: bytes = b"pw", mind: Any = None) -> Any:
        d = self.factory.login(credentials.UsernamePassword(self.name.encode(), password), mind)
        self.pair.flush()
        self.perspective = self.test.successResultOf(d)
        return self.perspective

    def echo(self, value: Any) -> Any:
        d = self.perspective.callRemote("echo", value)
        self.pair.flush()
        return self.test.successResultOf(d)

    def send_raw(self, data: bytes, chunk: int = 32 * 1024) -> int:
        """Write ``data`` on the worker's channel past its broker, until the channel
        closes; return how many bytes were written."""
        sent = 0
        while sent < len(data) and not self.channel.disconnected:
            self.channel.write(data[sent : sent + chunk])
            sent += len(data[sent : sent + chunk])
            self.pair.flush()
        return sent

    @property
    def closed(self) -> bool:
        """Both ends of the channel are closed."""
        return bool(self.channel.disconnected and self.server_channel.disconnected)


class FaultsTestCase(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.pair = SSHPair(self)
        self.pair.checker.addUser(b"glib-debian-sid", b"pw")
        self.pair.start()
        self.conn = self.pair.connection()

    def two_sessions(self) -> tuple[PBSession, PBSession]:
        a, b = PBSession(self, self.pair), PBSession(self, self.pair, "glib-debian-sid")
        a.login()
        b.login()
        self.assertEqual(a.echo("before"), "before")
        return a, b

    def assertOnlyClosed(self, victim: PBSession, other: PBSession) -> None:
        self.assertTrue(victim.closed)
        self.assertEqual(other.echo("still here"), "still here")
        self.assertIs(self.pair.link.connection, self.conn, "the SSH connection was dropped")
        self.assertIn(self.pair.server, self.pair.factory.connections)
        self.assertEqual(set(self.pair.server_connection.channels.values()), {other.server_channel})
        self.assertEqual(self.logs.matching("malformed"), [])


class MasterSideTests(FaultsTestCase):
    def refused(self, garbage: bytes) -> tuple[PBSession, str]:
        a, b = self.two_sessions()
        a.send_raw(garbage)
        self.assertOnlyClosed(a, b)
        [line] = self.logs.matching("channel closed")
        fingerprint = self.pair.entry.fingerprint
        channel = f"channel {a.server_channel.id}"
        for fragment in ("host debian-sid", fingerprint, WHERE, channel, "worker 'libxml2-debian-sid'"):
            self.assertIn(fragment, line)
        self.assertEqual(a.lost_while_delivering, [False], "connectionLost once, not re-entrantly")
        return a, line

    def test_a_huge_prefix_closes_only_its_channel(self) -> None:
        _a, line = self.refused(b"\x01" * 100 + banana.LIST)
        self.assertIn("protocol error: BananaError", line)

    def test_a_string_longer_than_banana_allows_closes_only_its_channel(self) -> None:
        _a, line = self.refused(b128(banana.SIZE_LIMIT + 1) + banana.STRING + b"x" * 1000)
        self.assertIn("String too long", line)

    def test_a_broker_error_quoting_the_peer_is_one_short_line(self) -> None:
        # The broker's ProtocolError quotes the peer's version: 5000 bytes and control characters.
        hostile = b"\n[forged] line\x1b[31m" + b"v" * 5000
        a, line = self.refused(
            b128(2) + banana.LIST + b"\x13" + banana.VOCAB + b128(len(hostile)) + banana.STRING + hostile
        )
        self.assertIn("Version Incompatibility", line)
        self.assertNotIn("\n", line)
        self.assertNotIn("\x1b", line)
        self.assertLess(len(line), 600)

    def test_an_unknown_type_byte_after_login_of_the_other_session(self) -> None:
        a, b = self.two_sessions()
        b.send_raw(b"\xff")
        self.assertOnlyClosed(b, a)
        self.assertTrue(self.logs.matching("worker 'glib-debian-sid'", "Invalid Type Byte", "channel closed"))


class LogLabelTests(FaultsTestCase):
    def test_a_protocol_logs_under_its_channel_label(self) -> None:
        # Buildbot logs with twisted.python.log.msg from inside dataReceived:
        # its lines name the session, as TCP's name the connection.
        from twisted.python import log as legacy_log

        a, b = self.two_sessions()
        events: list[dict[str, Any]] = []
        legacy_log.addObserver(events.append)
        self.addCleanup(legacy_log.removeObserver, events.append)
        received = a.server_broker.dataReceived

        def logging_received(data: bytes) -> None:
            legacy_log.msg("broker input")
            received(data)

        a.server_broker.dataReceived = logging_received  # type: ignore[method-assign]
        self.assertEqual(a.echo("hello"), "hello")
        systems = {e["system"] for e in events if e.get("message") == ("broker input",)}
        self.assertEqual(systems, {a.server_channel.label})
        self.assertIn("host debian-sid", a.server_channel.label)


class LauncherSideTests(FaultsTestCase):
    def test_garbage_from_the_master_closes_only_that_session(self) -> None:
        a, b = self.two_sessions()
        a.server_channel.write(b"\x00" * 100)  # no Banana type byte: "more than 64 bytes of prefix"
        self.pair.flush()
        self.assertOnlyClosed(a, b)
        [line] = self.logs.matching("channel closed")
        self.assertIn(f"libxml2-debian-sid (channel {a.channel.id}): protocol error: BananaError", line)
        self.assertEqual(len(self.conn.channels), 1)


class OddCredentialsTests(FaultsTestCase):
    """A PB login that offers no usable worker name: refused, one line, no traceback."""

    def refused_login(self, creds: Any) -> str:
        """Log in with ``creds``: refused; return the one line that says so."""
        session = PBSession(self, self.pair)
        d = session.factory.login(creds)
        self.pair.flush()
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(UnauthorizedLogin), failure)
        # PB logs every failed login it answers (with a traceback of UnauthorizedLogin);
        # any other logged error (TypeError, AttributeError) fails the test.
        self.flushLoggedErrors(UnauthorizedLogin)
        self.assertEqual(self.pair.checker.asked, [])
        [line] = self.logs.matching("offered no usable worker name")
        for fragment in ("host debian-sid", self.pair.entry.fingerprint, WHERE, "login refused"):
            self.assertIn(fragment, line)
        self.assertFalse(session.closed, "a refused login leaves the worker to close its channel")
        return line

    def test_anonymous_login(self) -> None:
        self.assertIn("(an anonymous login)", self.refused_login(credentials.Anonymous()))

    def test_an_int_name(self) -> None:
        self.assertIn("(1)", self.refused_login(credentials.UsernamePassword(1, b"pw")))

    def test_a_list_name(self) -> None:
        self.assertIn("([1])", self.refused_login(credentials.UsernamePassword([1], b"pw")))

    def test_no_name(self) -> None:
        self.assertIn("(None)", self.refused_login(credentials.UsernamePassword(None, b"pw")))

    def test_a_name_that_is_not_utf8(self) -> None:
        line = self.refused_login(credentials.UsernamePassword(b"\xff-debian-sid", b"pw"))
        self.assertIn(r"(b'\xff-debian-sid')", line)

    def test_a_long_name_is_cut_in_the_log(self) -> None:
        line = self.refused_login(credentials.UsernamePassword([b"x" * 1000] * 5, b"pw"))
        self.assertIn("([b'xxxxxxxx", line)
        self.assertLess(len(line), 250)


class RefusedLoginTests(FaultsTestCase):
    """A refused PB login: no traceback in the master's log, an UnauthorizedLogin at the worker."""

    def refused(self, name: str, password: bytes) -> Any:
        session = PBSession(self, self.pair, name)
        d = session.factory.login(credentials.UsernamePassword(name.encode(), password), None)
        self.pair.flush()
        return self.failureResultOf(d)

    def test_a_wrong_password(self) -> None:
        failure = self.refused("libxml2-debian-sid", b"wrong")
        self.assertTrue(failure.check(UnauthorizedLogin), failure)
        self.assertEqual(self.flushLoggedErrors(), [], "PB logged the refusal with a traceback")
        self.assertEqual(self.logs.matching("Peer will receive following PB traceback"), [])

    def test_a_name_this_host_may_not_use(self) -> None:
        failure = self.refused("glib-fedora", b"pw")
        self.assertTrue(failure.check(UnauthorizedLogin), failure)
        self.assertEqual(self.flushLoggedErrors(), [])
        [line] = self.logs.matching("may not attach worker 'glib-fedora'")
        self.assertIn("host debian-sid", line)
