"""The embedded SSH server against the real client, over an in-memory wire.

Every test runs a full SSH handshake (key exchange, host key check, public-key
user authentication) between `SSHMuxFactory` and `MasterLink`; nothing opens a
socket.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.error import ConchError
from twisted.conch.ssh import common, forwarding
from twisted.conch.ssh.connection import (
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    OPEN_CONNECT_FAILED,
    OPEN_UNKNOWN_CHANNEL_TYPE,
)
from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.spread import pb
from twisted.trial.unittest import TestCase

from buildbot_sshmux.errors import ChannelRefused, HostKeyMismatch
from buildbot_sshmux.master.authorization import WorkerLogin
from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.server import PBUnavailable, is_loopback
from buildbot_sshmux.wire.channel import ProtocolChannel
from buildbot_sshmux.wire.keys import fingerprint
from buildbot_sshmux.wire.transport import prefer
from buildbot_sshmux.worker.link import ChannelEndpoint, HostKeyPins, MuxClientTransport

from .sshharness import (
    HOST_KEY,
    MASTER_KEY,
    OTHER_KEY,
    PB_PORT,
    WORKER_HOST_ADDRESS,
    LogCapture,
    ProbeChannel,
    SSHPair,
    pb_portal,
)


class CountingFactory(protocol.Factory):
    """A client-side factory that counts the protocols it builds."""

    def __init__(self) -> None:
        self.built = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.built += 1
        return protocol.Protocol()


def direct_tcpip(host: str, port: int) -> bytes:
    return forwarding.packOpen_direct_tcpip((host, port), ("127.0.0.1", 50000))


class HandshakeTests(TestCase):
    def test_pinned_host_key_connects_and_when_ready_fires(self) -> None:
        pair = SSHPair(self)
        waiting = pair.link.when_ready()
        self.assertNoResult(waiting)

        pair.start()

        conn = self.successResultOf(waiting)
        self.assertIs(conn, pair.link.connection)
        self.assertFalse(pair.link.refused)
        avatar = pair.server.avatar
        self.assertEqual(avatar.entry.name, "debian-sid")
        self.assertIn(f"from {WORKER_HOST_ADDRESS.host}:{WORKER_HOST_ADDRESS.port}", avatar.describe())

    def test_fingerprint_pin_connects(self) -> None:
        pair = SSHPair(self, pins=HostKeyPins.from_config([fingerprint(MASTER_KEY)]))
        pair.start()
        self.assertIsNotNone(pair.link.connection)

    def test_server_counts_its_connections(self) -> None:
        pair = SSHPair(self)
        pair.start()
        self.assertEqual(pair.factory.connections, {pair.server})
        pair.factory.disconnect_all()
        pair.flush()
        self.assertEqual(pair.factory.connections, set())
        self.assertIsNone(pair.link.connection)

    def test_unpinned_host_key_is_refused(self) -> None:
        logs = LogCapture(self)
        pair = SSHPair(self, pins=HostKeyPins.from_config([fingerprint(OTHER_KEY)]))
        waiting = pair.link.when_ready()

        pair.start()

        self.assertNoResult(waiting)
        self.assertTrue(pair.link.refused)
        self.assertIsNone(pair.link.connection)
        self.assertFalse(hasattr(pair.server, "avatar"), "the client must not log in")
        self.assertTrue(
            logs.matching("master.example.org:2222", fingerprint(MASTER_KEY), fingerprint(OTHER_KEY)),
            logs.texts(),
        )
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)

    def test_host_key_mismatch_names_expected_and_offered_fingerprints(self) -> None:
        pair = SSHPair(self, pins=HostKeyPins.from_config([fingerprint(OTHER_KEY)]))
        client = MuxClientTransport(pair.link)

        failure = self.failureResultOf(
            client.verifyHostKey(MASTER_KEY.public().blob(), b"ignored"), HostKeyMismatch
        )

        mismatch = failure.value
        self.assertEqual(mismatch.offered, fingerprint(MASTER_KEY))
        self.assertEqual(mismatch.expected, [fingerprint(OTHER_KEY)])
        self.assertIn(fingerprint(MASTER_KEY), str(mismatch))
        self.assertIn(fingerprint(OTHER_KEY), str(mismatch))
        self.assertTrue(fingerprint(MASTER_KEY).startswith("SHA256:"))

    def test_pinned_key_passes_verify_host_key(self) -> None:
        pair = SSHPair(self)
        client = MuxClientTransport(pair.link)
        self.assertTrue(self.successResultOf(client.verifyHostKey(MASTER_KEY.public().blob(), b"ignored")))

    def test_unknown_client_key_is_refused(self) -> None:
        logs = LogCapture(self)
        pair = SSHPair(self, identity=OTHER_KEY)
        waiting = pair.link.when_ready()

        pair.start()

        self.assertNoResult(waiting)
        self.assertTrue(pair.link.refused)
        self.assertFalse(hasattr(pair.server, "avatar"))
        self.assertTrue(
            logs.matching("refused key", fingerprint(OTHER_KEY), "not in authorized_hosts"),
            logs.texts(),
        )
        self.assertTrue(logs.matching("refused this host's key", fingerprint(OTHER_KEY)))
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)

    def test_refused_link_redials_with_backoff(self) -> None:
        pair = SSHPair(self, identity=OTHER_KEY)
        pair.start()
        self.assertEqual(pair.link.dials, 1)
        pair.clock.advance(4.9)
        self.assertEqual(pair.link.dials, 1)
        pair.clock.advance(0.1)
        self.assertEqual(pair.link.dials, 2)


class ChannelPolicyTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.pair = SSHPair(self)
        self.pair.start()
        self.conn = self.pair.connection()

    def open(self, name: bytes, extra: bytes = b"") -> ProbeChannel:
        channel = ProbeChannel(name, conn=self.conn)
        self.conn.openChannel(channel, extra)
        self.pair.flush()
        # Conch logs every refused open as a failure; they are expected here.
        self.flushLoggedErrors(ConchError)
        return channel

    def assertRefused(self, channel: ProbeChannel, code: int, *logged: str) -> None:
        self.assertFalse(channel.opened)
        self.assertEqual([r.data for r in channel.refusals], [code])
        self.assertEqual(self.pair.server_connection.channels, {})
        self.assertTrue(
            self.logs.matching("refused", "debian-sid", fingerprint(HOST_KEY), *logged),
            self.logs.texts(),
        )

    def test_session_channel_is_refused(self) -> None:
        channel = self.open(b"session")
        self.assertRefused(channel, OPEN_UNKNOWN_CHANNEL_TYPE, "'session'")

    def test_direct_tcpip_to_another_host_is_refused(self) -> None:
        channel = self.open(b"direct-tcpip", direct_tcpip("10.1.2.3", PB_PORT))
        self.assertRefused(channel, OPEN_ADMINISTRATIVELY_PROHIBITED, f"10.1.2.3:{PB_PORT}")

    def test_direct_tcpip_to_a_host_name_is_refused(self) -> None:
        channel = self.open(b"direct-tcpip", direct_tcpip("intranet.example.org", PB_PORT))
        self.assertRefused(channel, OPEN_ADMINISTRATIVELY_PROHIBITED, "intranet.example.org")

    def test_direct_tcpip_to_localhost_wrong_port_is_refused(self) -> None:
        channel = self.open(b"direct-tcpip", direct_tcpip("localhost", 22))
        self.assertRefused(channel, OPEN_ADMINISTRATIVELY_PROHIBITED, "localhost:22")

    def test_malformed_direct_tcpip_is_refused(self) -> None:
        channel = self.open(b"direct-tcpip", b"\x00\x00")
        self.assertRefused(channel, OPEN_CONNECT_FAILED, "malformed")

    def test_refusal_logs_the_peer_address(self) -> None:
        self.open(b"x11")
        self.assertTrue(
            self.logs.matching("refused", f"{WORKER_HOST_ADDRESS.host}:{WORKER_HOST_ADDRESS.port}")
        )

    def test_direct_tcpip_to_localhost_pb_port_is_accepted(self) -> None:
        channel = self.open(b"direct-tcpip", direct_tcpip("localhost", PB_PORT))
        self.assertTrue(channel.opened)
        self.assertEqual(channel.refusals, [])
        [server_channel] = self.pair.server_connection.channels.values()
        self.assertIsInstance(server_channel, ProtocolChannel)
        self.assertIsInstance(server_channel.protocol, pb.Broker)

    def test_direct_tcpip_to_loopback_ip_is_accepted(self) -> None:
        channel = self.open(b"direct-tcpip", direct_tcpip("127.0.0.1", PB_PORT))
        self.assertTrue(channel.opened)

    def test_tcpip_forward_global_request_is_refused(self) -> None:
        d = self.conn.sendGlobalRequest(
            b"tcpip-forward", common.NS(b"0.0.0.0") + struct.pack(">L", 8080), wantReply=1
        )
        self.pair.flush()
        # Conch errbacks a global request only on SSH_MSG_REQUEST_FAILURE.
        failure = self.failureResultOf(d, ConchError)
        self.assertEqual(failure.value.value, "global request failed")
        self.assertTrue(
            self.logs.matching("refused", "'tcpip-forward'", "debian-sid", fingerprint(HOST_KEY)),
            self.logs.texts(),
        )

    def test_keepalive_global_request_is_answered_quietly(self) -> None:
        d = self.conn.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        self.pair.flush()
        self.successResultOf(d)
        self.assertEqual(self.logs.matching("refused"), [])


class PBChannelTests(TestCase):
    def setUp(self) -> None:
        self.pair = SSHPair(self)
        self.pair.start()

    def login(self, name: str, password: bytes = b"pw") -> tuple[pb.PBClientFactory, defer.Deferred[Any]]:
        factory = pb.PBClientFactory()
        connected = ChannelEndpoint(self.pair.link, PB_PORT, name).connect(factory)
        self.pair.flush()
        self.successResultOf(connected)
        d = factory.login(credentials.UsernamePassword(name.encode(), password))
        self.pair.flush()
        return factory, d

    def test_pb_bytes_flow_both_ways(self) -> None:
        _factory, d = self.login("libxml2-debian-sid")
        perspective = self.successResultOf(d)
        echoed = perspective.callRemote("echo", "hello through the channel")
        self.pair.flush()
        self.assertEqual(self.successResultOf(echoed), "hello through the channel")
        [avatar] = self.pair.realm.avatars
        self.assertEqual(avatar.name, b"libxml2-debian-sid")
        self.assertEqual(avatar.calls, ["hello through the channel"])

    def test_server_side_broker_sees_the_worker_hosts_address(self) -> None:
        self.login("libxml2-debian-sid")
        [server_channel] = self.pair.server_connection.channels.values()
        peer = server_channel.protocol.transport.getPeer()
        self.assertEqual((peer.host, peer.port), (WORKER_HOST_ADDRESS.host, WORKER_HOST_ADDRESS.port))
        self.assertEqual(peer.ssh_host, "debian-sid")
        self.assertEqual(server_channel.getHost().port, PB_PORT)

    def test_worker_name_outside_hosts_globs_is_refused_before_the_checker(self) -> None:
        logs = LogCapture(self)
        _factory, d = self.login("glib-fedora")
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(UnauthorizedLogin), failure)
        # PB logs every failed login it sends back; expected here.
        self.flushLoggedErrors(UnauthorizedLogin)
        self.assertEqual(self.pair.checker.asked, [])
        self.assertTrue(logs.matching("debian-sid", "may not attach worker 'glib-fedora'"))

    def test_allowed_worker_name_reaches_the_checker(self) -> None:
        _factory, d = self.login("libxml2-debian-sid", b"wrong password")
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(UnauthorizedLogin), failure)
        # PB logs every failed login it sends back; expected here.
        self.flushLoggedErrors(UnauthorizedLogin)
        self.assertEqual(self.pair.checker.asked, [b"libxml2-debian-sid"])

    def test_channel_closes_when_the_worker_disconnects(self) -> None:
        factory, d = self.login("libxml2-debian-sid")
        self.successResultOf(d)
        factory.disconnect()
        self.pair.flush()
        self.assertEqual(self.pair.server_connection.channels, {})
        self.assertEqual(self.pair.connection().channels, {})


class PBUnavailableTests(TestCase):
    def test_unavailable_pb_gives_an_open_failure_not_a_half_open_channel(self) -> None:
        logs = LogCapture(self)

        def lookup() -> Any:
            raise PBUnavailable("the master has no PB port yet")

        pair = SSHPair(self, pb_lookup=lookup)
        pair.start()
        factory = CountingFactory()

        d = ChannelEndpoint(pair.link, PB_PORT, "libxml2-debian-sid").connect(factory)
        pair.flush()
        self.flushLoggedErrors(ConchError)

        failure = self.failureResultOf(d, ChannelRefused)
        self.assertIn("no PB port yet", str(failure.value))
        self.assertNotIn("b'", str(failure.value), "the master's reason is text, not a bytes repr")
        self.assertEqual(factory.built, 0)
        self.assertEqual(factory.numPorts, 0, "doStart/doStop must balance")
        self.assertEqual(pair.server_connection.channels, {})
        self.assertEqual(pair.connection().channels, {})
        self.assertTrue(logs.matching("refused", "debian-sid", "no PB port yet"))

    def test_unavailable_pb_reports_connect_failed(self) -> None:
        def lookup() -> Any:
            raise PBUnavailable("stopping")

        pair = SSHPair(self, pb_lookup=lookup)
        pair.start()
        conn = pair.connection()
        channel = ProbeChannel(b"direct-tcpip", conn=conn)
        conn.openChannel(channel, direct_tcpip("localhost", PB_PORT))
        pair.flush()
        self.flushLoggedErrors(ConchError)
        self.assertEqual([r.data for r in channel.refusals], [OPEN_CONNECT_FAILED])


class WorkerLoginTests(TestCase):
    def setUp(self) -> None:
        self.wrapped, self.checker, self.realm = pb_portal(**{"gtk-debian-sid": b"pw", "gtk-fedora": b"pw"})
        entry = HostEntry(name="debian-sid", key=HOST_KEY.public(), workers=("*-debian-sid", "tools"))
        self.worker_login = WorkerLogin(self.wrapped, entry)
        self.portal = self.worker_login.portal

    def login(self, name: bytes, password: bytes = b"pw") -> defer.Deferred[Any]:
        return self.portal.login(credentials.UsernamePassword(name, password), None, pb.IPerspective)

    def test_name_outside_globs_fails_before_the_checker_is_called(self) -> None:
        self.failureResultOf(self.login(b"gtk-fedora"), UnauthorizedLogin)
        self.assertEqual(self.checker.asked, [])
        self.assertEqual(self.realm.avatars, [])

    def test_name_matching_a_glob_is_passed_to_the_wrapped_portal(self) -> None:
        iface, avatar, _logout = self.successResultOf(self.login(b"gtk-debian-sid"))
        self.assertIs(iface, pb.IPerspective)
        self.assertEqual(avatar.name, b"gtk-debian-sid")
        self.assertEqual(self.checker.asked, [b"gtk-debian-sid"])

    def test_wrong_password_for_an_allowed_name_still_fails(self) -> None:
        self.failureResultOf(self.login(b"gtk-debian-sid", b"nope"), UnauthorizedLogin)
        self.assertEqual(self.checker.asked, [b"gtk-debian-sid"])

    def test_credentials_interfaces_are_the_wrapped_portals_and_anonymous(self) -> None:
        self.assertEqual(
            set(self.portal.listCredentialsInterfaces()),
            {*self.wrapped.listCredentialsInterfaces(), credentials.IAnonymous},
        )


class HelperTests(TestCase):
    def test_is_loopback(self) -> None:
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.3.2.1", "::1", "ip6-localhost"]:
            self.assertTrue(is_loopback(host), host)
        for host in ["10.0.0.1", "0.0.0.0", "::", "localhost.example.org", "example.org", ""]:
            self.assertFalse(is_loopback(host), host)

    def test_prefer_puts_preferred_first_and_keeps_only_supported(self) -> None:
        self.assertEqual(prefer([b"c", b"x", b"a"], [b"a", b"b", b"c"]), [b"c", b"a", b"b"])
