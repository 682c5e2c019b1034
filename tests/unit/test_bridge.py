"""Flow control of `ProtocolChannel` over a real (in-memory) SSH connection.

The worker host's end is a `_ClientChannel` opened by `ChannelEndpoint`; the
master's end is a plain `ProtocolChannel` built by a test avatar, so both
protocols are recorders the tests drive by hand.  A peer stalls either by
pausing its reading (the channel then withholds window) or by the wire not
delivering its input.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.conch.interfaces import IConchUser
from twisted.internet import error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from buildbot_sshmux.master.server import HostAvatar, HostRealm, SSHMuxFactory
from buildbot_sshmux.wire.channel import ChannelAddress, FlowLimits, ProtocolChannel
from buildbot_sshmux.worker.link import ChannelEndpoint

from .sshharness import PB_PORT, LogCapture, SSHPair

# Small numbers keep the tests fast; the ratios are those of the defaults.
SMALL = FlowLimits(
    window_size=4096,
    max_packet=1024,
    high_water=2048,
    max_buffer=16384,
    connection_high_water=1 << 20,
    connection_max_buffer=1 << 22,
    link_slack=0,
)


class Recorder(Protocol):
    """A protocol that keeps what it receives and how its connection ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


@implementer(IPushProducer)
class Producer:
    """A streaming producer recording pause/resume calls."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @property
    def paused(self) -> bool:
        return bool(self.events) and self.events[-1] == "pause"

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class PullProducer:
    def __init__(self) -> None:
        self.pulls = 0

    def resumeProducing(self) -> None:
        self.pulls += 1

    def stopProducing(self) -> None:
        pass


class ProbeAvatar(HostAvatar):
    """Answers every channel with a `ProtocolChannel` around a `Recorder`."""

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> ProtocolChannel:
        channel = ProtocolChannel(
            Recorder(),
            peer=ChannelAddress("TCP", "198.51.100.7", 40123, ssh_host=self.entry.name),
            host=ChannelAddress("TCP", "127.0.0.1", PB_PORT),
            limits=self.server.flow,
            call_soon=lambda f: self.server.reactor.callLater(0, f),
            label="probe",
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            avatar=self,
        )
        self.server.opened.append(channel)  # type: ignore[attr-defined]
        return channel


class ProbeRealm(HostRealm):
    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        avatar = ProbeAvatar(avatarId, self.server)
        return IConchUser, avatar, avatar.logout


class ProbeFactory(SSHMuxFactory):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[ProtocolChannel] = []
        self.portal.realm = ProbeRealm(self)


class BridgeTestCase(TestCase):
    client_limits = SMALL
    server_limits = SMALL

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.pair = SSHPair(
            self,
            server_limits=self.server_limits,
            client_limits=self.client_limits,
            server_factory=ProbeFactory,
        )
        self.pair.start()

    def open_channel(self) -> tuple[Recorder, ProtocolChannel, Recorder, ProtocolChannel]:
        """Open one channel: (worker protocol, its channel, master protocol, its channel)."""
        d = ChannelEndpoint(self.pair.link, PB_PORT, "probe").connect(Factory.forProtocol(Recorder))
        self.pair.flush()
        client: Recorder = self.successResultOf(d)
        server_channel = self.pair.factory.opened[-1]
        return client, client.transport, server_channel.protocol, server_channel  # type: ignore[return-value]

    def write_chunks(self, channel: ProtocolChannel, count: int, size: int = 1000) -> bytes:
        sent = bytearray()
        for i in range(count):
            chunk = bytes([65 + i % 26]) * size
            channel.write(chunk)
            sent += chunk
            self.pair.flush()
        return bytes(sent)


class BackpressureTests(BridgeTestCase):
    def test_producer_paused_past_high_water_and_resumed_when_the_window_opens(self) -> None:
        client, channel, server, server_channel = self.open_channel()
        producer = Producer()
        channel.registerProducer(producer, True)
        server_channel.pauseProducing()  # the master stops reading

        sent = self.write_chunks(channel, 6)  # 4096 fit in the window, 1904 wait

        self.assertEqual(channel.pending, 6000 - SMALL.window_size)
        self.assertEqual(producer.events, [])
        sent += self.write_chunks(channel, 1)  # 2904 wait: past high_water
        self.assertEqual(channel.pending, 7000 - SMALL.window_size)
        self.assertEqual(producer.events, ["pause"])
        self.assertEqual(len(server.received), SMALL.window_size)

        server_channel.resumeProducing()  # the master reads again: window opens
        self.pair.flush()

        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(channel.pending, 0)
        self.assertEqual(bytes(server.received), sent)

    def test_producer_paused_while_the_wire_does_not_deliver(self) -> None:
        client, channel, server, _server_channel = self.open_channel()
        producer = Producer()
        channel.registerProducer(producer, True)
        self.pair.wire.hold_to_server = True

        sent = self.write_chunks(channel, 7)

        self.assertEqual(producer.events, ["pause"])
        self.assertEqual(len(server.received), 0)
        self.assertLessEqual(channel.pending, SMALL.max_buffer)

        self.pair.wire.hold_to_server = False
        self.pair.flush()

        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(bytes(server.received), sent)

    def test_producer_registered_on_a_throttled_channel_starts_paused(self) -> None:
        _client, channel, _server, server_channel = self.open_channel()
        server_channel.pauseProducing()
        self.write_chunks(channel, 7)
        producer = Producer()
        channel.registerProducer(producer, True)
        self.assertEqual(producer.events, ["pause"])

    def test_a_second_producer_is_refused(self) -> None:
        _client, channel, _server, _server_channel = self.open_channel()
        channel.registerProducer(Producer(), True)
        self.assertRaises(RuntimeError, channel.registerProducer, Producer(), True)
        channel.unregisterProducer()
        channel.registerProducer(Producer(), True)

    def test_window_is_withheld_from_the_peer_while_throttled(self) -> None:
        client, channel, server, server_channel = self.open_channel()
        server_channel.pauseProducing()
        self.write_chunks(channel, 7)  # the worker's channel is now throttled
        self.assertTrue(channel.window_held())

        server_channel.write(b"m" * 3000)  # the master answers
        self.pair.flush()

        self.assertEqual(len(client.received), 3000, "data still arrives")
        self.assertEqual(server_channel.remoteWindowLeft, SMALL.window_size - 3000, "no window granted")

        server_channel.resumeProducing()
        self.pair.flush()

        self.assertFalse(channel.window_held())
        self.assertEqual(server_channel.remoteWindowLeft, SMALL.window_size)

    def test_paused_reader_withholds_window(self) -> None:
        client, channel, server, server_channel = self.open_channel()
        channel.pauseProducing()  # the worker's protocol stops reading

        server_channel.write(b"m" * 5000)
        self.pair.flush()

        self.assertEqual(len(client.received), SMALL.window_size)
        self.assertEqual(server_channel.pending, 5000 - SMALL.window_size)

        channel.resumeProducing()
        self.pair.flush()

        self.assertEqual(len(client.received), 5000)
        self.assertEqual(server_channel.pending, 0)

    def test_pending_never_exceeds_max_buffer_the_channel_aborts(self) -> None:
        client, channel, server, server_channel = self.open_channel()
        server_channel.pauseProducing()
        written = 0
        while not channel.disconnected and written < 10 * SMALL.max_buffer:
            channel.write(b"x" * 1000)  # a protocol ignoring pauseProducing
            written += 1000
            self.assertLessEqual(channel.pending, SMALL.max_buffer)
            self.pair.flush()

        self.assertTrue(channel.disconnected)
        self.assertLessEqual(written, SMALL.window_size + SMALL.max_buffer + 1000)
        self.assertEqual(len(client.lost), 1)
        self.assertTrue(client.lost[0].check(error.ConnectionAborted))
        self.assertEqual(self.pair.connection().budget.pending, 0)
        self.assertTrue(self.logs.matching("probe", "not reading"))
        # The master's end is closed too, and told once.
        self.assertEqual(len(server.lost), 1)
        self.assertEqual(self.pair.server_connection.channels, {})

    def test_window_adjustments_flow_and_log_nothing(self) -> None:
        """Buildbot's master.log takes debug events: Conch's line per window
        adjustment would be thousands a second in a bulk transfer."""
        _client, channel, server, _server_channel = self.open_channel()
        sent = self.write_chunks(channel, 5 * SMALL.window_size // 1000)
        self.assertEqual(bytes(server.received), sent)  # five windows: adjusted four times at least
        self.assertEqual(self.logs.matching("adding"), [])
        self.assertEqual([t for t in self.logs.texts() if "window" in t.lower()], [])

    def test_writes_after_abort_are_dropped(self) -> None:
        client, channel, _server, _server_channel = self.open_channel()
        channel.abortConnection()
        channel.write(b"late")
        self.assertEqual(channel.pending, 0)
        self.pair.flush()
        self.assertEqual(len(client.lost), 1)

    def test_pull_producer_is_pulled_on_the_reactor(self) -> None:
        _client, channel, _server, _server_channel = self.open_channel()
        producer = PullProducer()
        channel.registerProducer(producer, False)
        self.assertEqual(producer.pulls, 0)
        self.pair.clock.advance(0)
        self.assertEqual(producer.pulls, 1)

    def test_link_pause_holds_every_channel(self) -> None:
        _client, channel, server, _server_channel = self.open_channel()
        conn = self.pair.connection()
        conn.pauseProducing()  # the TCP socket's buffer is full

        channel.write(b"held")
        self.pair.flush()
        self.assertEqual(channel.pending, 4)
        self.assertEqual(bytes(server.received), b"")

        conn.resumeProducing()
        self.pair.flush()
        self.assertEqual(channel.pending, 0)
        self.assertEqual(bytes(server.received), b"held")


class LinkSlackTests(BridgeTestCase):
    client_limits = attrs.evolve(SMALL, link_slack=2048)

    def test_channels_send_the_slack_once_the_link_pauses_then_hold(self) -> None:
        _client, channel, server, _server_channel = self.open_channel()
        conn = self.pair.connection()
        conn.pauseProducing()
        conn.pauseProducing()  # a second pause gives no more slack
        channel.write(b"s" * 3000)
        self.pair.flush()
        self.assertEqual(channel.pending, 3000 - 2048)
        self.assertEqual(len(server.received), 2048)
        conn.resumeProducing()
        self.pair.flush()
        self.assertEqual((channel.pending, len(server.received)), (0, 3000))


class SlowMasterTests(BridgeTestCase):
    """The worker side's stall_timeout: a queue past max_buffer closes the
    channel only once the master has taken nothing for that long."""

    client_limits = attrs.evolve(SMALL, stall_timeout=30.0)

    def test_a_master_that_reads_slowly_keeps_the_channel(self) -> None:
        client, channel, server, server_channel = self.open_channel()
        server_channel.pauseProducing()
        sent = bytearray()
        for i in range(8 * SMALL.max_buffer // 1000):  # a log stream ignoring pauseProducing
            chunk = bytes([65 + i % 26]) * 1000
            channel.write(chunk)
            sent += chunk
            self.pair.clock.advance(1)
            if i % 20 == 19:  # the master takes about a window's worth now and then
                server_channel.resumeProducing()
                for _ in range(3):
                    self.pair.wire.pump()
                server_channel.pauseProducing()
        self.assertGreater(channel.pending, SMALL.max_buffer)
        self.assertFalse(channel.disconnected)
        server_channel.resumeProducing()
        self.pair.flush()
        self.assertEqual(bytes(server.received), bytes(sent))
        self.assertEqual(client.lost, [])

    def test_a_master_that_takes_nothing_for_stall_timeout_closes_it(self) -> None:
        client, channel, _server, server_channel = self.open_channel()
        server_channel.pauseProducing()
        for _ in range(2 * SMALL.max_buffer // 1000):
            channel.write(b"x" * 1000)
            self.pair.flush()
        self.assertGreater(channel.pending, SMALL.max_buffer)
        self.assertFalse(channel.disconnected, "closed before the peer stalled for stall_timeout")
        self.pair.clock.advance(31)
        channel.write(b"x" * 1000)
        self.assertTrue(channel.disconnected)
        self.assertTrue(client.lost[0].check(error.ConnectionAborted))
        self.assertTrue(self.logs.matching("probe", "not reading", "nothing taken for 31 s"))


class EagerWindowTests(BridgeTestCase):
    """Window goes back to the peer once a quarter of it is used, not every
    half window: over a long link a channel moves about a window a round trip."""

    client_limits = server_limits = attrs.evolve(SMALL, window_size=64 * 1024, max_buffer=1 << 20)

    def test_window_is_given_back_once_a_quarter_is_used(self) -> None:
        _client, channel, server, server_channel = self.open_channel()
        window = self.server_limits.window_size
        channel.write(b"a" * (window // 4 - 1))  # not yet
        self.pair.flush()
        self.assertEqual(server_channel.localWindowLeft, window - window // 4 + 1)
        channel.write(b"b")  # a quarter: all of it back
        self.pair.flush()
        self.assertEqual(server_channel.localWindowLeft, window)
        self.assertEqual(channel.remoteWindowLeft, window)
        self.assertEqual(len(server.received), window // 4)

    def test_a_paused_protocol_gets_no_window_back(self) -> None:
        _client, channel, _server, server_channel = self.open_channel()
        server_channel.pauseProducing()
        channel.write(b"c" * 20000)
        self.pair.flush()
        self.assertEqual(server_channel.localWindowLeft, self.server_limits.window_size - 20000)
        server_channel.resumeProducing()
        self.pair.flush()
        self.assertEqual(server_channel.localWindowLeft, self.server_limits.window_size)


class ConnectionBudgetTests(BridgeTestCase):
    client_limits = FlowLimits(
        window_size=4096,
        max_packet=1024,
        high_water=1 << 20,  # channels alone never throttle here
        max_buffer=1 << 22,
        connection_high_water=3000,
        connection_max_buffer=12000,
    )

    def test_connection_budget_throttles_every_writing_channel(self) -> None:
        _a, chan_a, server_a, server_chan_a = self.open_channel()
        _b, chan_b, server_b, server_chan_b = self.open_channel()
        prod_a, prod_b = Producer(), Producer()
        chan_a.registerProducer(prod_a, True)
        chan_b.registerProducer(prod_b, True)
        server_chan_a.pauseProducing()

        self.write_chunks(chan_a, 7)  # 4096 sent, 2904 wait: below A's own high_water
        self.assertEqual(prod_a.events, [])
        self.write_chunks(chan_a, 1)  # 3904 wait on the connection: past its budget
        self.assertEqual(prod_a.events, ["pause"])

        chan_b.write(b"b")  # B's window is open, but the connection is over budget
        self.pair.flush()
        self.assertEqual(prod_b.events, ["pause"])
        self.assertEqual(bytes(server_b.received), b"b")

        server_chan_a.resumeProducing()
        self.pair.flush()

        self.assertEqual(self.pair.connection().budget.pending, 0)
        self.assertEqual(prod_a.events, ["pause", "resume"])
        self.assertEqual(prod_b.events, ["pause", "resume"])
        self.assertEqual(len(server_a.received), 8000)

    def test_connection_max_buffer_aborts_the_overflowing_channel(self) -> None:
        a, chan_a, _server_a, server_chan_a = self.open_channel()
        b, chan_b, _server_b, _server_chan_b = self.open_channel()
        server_chan_a.pauseProducing()
        while not chan_a.disconnected and chan_a.pending < 100_000:
            chan_a.write(b"x" * 1000)
            self.pair.flush()
        self.assertTrue(chan_a.disconnected)
        self.assertTrue(a.lost[0].check(error.ConnectionAborted))
        self.assertFalse(chan_b.disconnected)
        self.assertEqual(b.lost, [])
        self.assertEqual(self.pair.connection().budget.pending, 0)


class ConnectionLostOnceTests(BridgeTestCase):
    def test_channel_closed_by_the_peer(self) -> None:
        client, channel, server, server_channel = self.open_channel()
        server_channel.loseConnection()
        self.pair.flush()
        self.assertEqual(len(client.lost), 1)
        self.assertTrue(client.lost[0].check(error.ConnectionDone))
        self.assertEqual(len(server.lost), 1)
        self.assertTrue(server.lost[0].check(error.ConnectionDone))
        self.assertEqual(self.pair.connection().channels, {})

    def test_channel_closed_locally(self) -> None:
        client, channel, server, _server_channel = self.open_channel()
        channel.loseConnection()
        channel.loseConnection()
        self.pair.flush()
        self.assertEqual(len(client.lost), 1)
        self.assertTrue(client.lost[0].check(error.ConnectionDone))
        self.assertEqual(len(server.lost), 1)
        self.assertEqual(self.pair.server_connection.channels, {})

    def test_local_close_sends_queued_bytes_first(self) -> None:
        client, channel, server, server_channel = self.open_channel()
        server_channel.pauseProducing()
        sent = self.write_chunks(channel, 5)
        channel.loseConnection()
        self.pair.flush()
        self.assertEqual(client.lost, [], "closing waits for the queued bytes")

        server_channel.resumeProducing()
        self.pair.flush()

        self.assertEqual(bytes(server.received), sent)
        self.assertEqual(len(client.lost), 1)
        self.assertTrue(client.lost[0].check(error.ConnectionDone))

    def test_eof_from_the_peer_closes_the_channel(self) -> None:
        client, _channel, server, server_channel = self.open_channel()
        self.pair.server_connection.sendEOF(server_channel)
        self.pair.flush()
        self.assertEqual(len(client.lost), 1)
        self.assertEqual(len(server.lost), 1)

    def test_ssh_connection_dropping(self) -> None:
        client, channel, server, _server_channel = self.open_channel()
        client2, _channel2, server2, _server_channel2 = self.open_channel()
        self.pair.wire.client_io.loseConnection()  # the TCP connection goes
        self.pair.flush()
        for proto in (client, server, client2, server2):
            self.assertEqual(len(proto.lost), 1)
            self.assertTrue(proto.lost[0].check(error.ConnectionLost))
        # Late calls on the dead channel change nothing.
        channel.loseConnection()
        channel.write(b"late")
        self.assertEqual(len(client.lost), 1)
        self.assertIsNone(self.pair.link.connection)

    def test_abort_then_peer_close_is_reported_once(self) -> None:
        client, channel, server, _server_channel = self.open_channel()
        channel.abortConnection()
        self.assertEqual(len(client.lost), 1)
        self.pair.flush()
        self.assertEqual(len(client.lost), 1)
        self.assertEqual(len(server.lost), 1)


class TransportSurfaceTests(BridgeTestCase):
    def test_get_peer_and_host_have_host_and_port(self) -> None:
        _client, channel, _server, server_channel = self.open_channel()
        peer = server_channel.getPeer()
        self.assertEqual((peer.host, peer.port), ("198.51.100.7", 40123))
        host = server_channel.getHost()
        self.assertEqual((host.host, host.port), ("127.0.0.1", PB_PORT))
        client_peer = channel.getPeer()
        self.assertEqual((client_peer.host, client_peer.port), ("localhost", PB_PORT))

    def test_set_tcp_keepalive_reaches_the_socket(self) -> None:
        _client, channel, _server, _server_channel = self.open_channel()
        calls: list[int] = []
        self.pair.wire.client_io.setTcpKeepAlive = calls.append  # type: ignore[method-assign]
        channel.setTcpKeepAlive(1)
        self.assertEqual(calls, [1])

    def test_set_tcp_keepalive_without_a_socket_does_not_raise(self) -> None:
        _client, channel, _server, _server_channel = self.open_channel()
        ssh_transport = self.pair.client_transport()
        real = ssh_transport.transport
        ssh_transport.transport = object()
        try:
            channel.setTcpKeepAlive(1)
            self.assertEqual(channel.getTcpKeepAlive(), 0)
        finally:
            ssh_transport.transport = real

    def test_channel_requests_are_refused(self) -> None:
        _client, channel, _server, _server_channel = self.open_channel()
        self.assertEqual(channel.requestReceived(b"exec", b""), 0)
        self.assertTrue(self.logs.matching("refused channel request", "exec"))

    def test_extended_data_is_ignored(self) -> None:
        client, channel, _server, _server_channel = self.open_channel()
        channel.extReceived(1, b"stderr bytes")
        self.assertEqual(bytes(client.received), b"")
