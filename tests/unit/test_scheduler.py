"""Round-robin scheduling of channel data on one connection."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from buildbot_sshmux.wire.channel import FlowControlledConnection, FlowLimits, ProtocolChannel

ADDRESS = IPv4Address("TCP", "127.0.0.1", 9989)
# link_slack=0: a paused link holds every channel at once (the queues these tests build)
LIMITS = FlowLimits(max_packet=1000, high_water=10**6, max_buffer=10**7, link_slack=0)


class PacketLog:
    """An SSH transport stand-in that records which channel each data packet is for."""

    def __init__(self) -> None:
        self.channels: list[int] = []
        self.sizes: list[int] = []
        self.data: list[bytes] = []

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if messageType == 94:  # MSG_CHANNEL_DATA
            (remote,) = struct.unpack(">L", payload[:4])
            (length,) = struct.unpack(">L", payload[4:8])
            self.channels.append(remote)
            self.sizes.append(length)
            self.data.append(payload[8:])


def make_connection() -> tuple[FlowControlledConnection, PacketLog]:
    conn = FlowControlledConnection()
    conn.limits = LIMITS
    log = PacketLog()
    conn.transport = log  # type: ignore[assignment]
    return conn, log


def open_channel(conn: FlowControlledConnection, number: int, window: int = 10**6) -> ProtocolChannel:
    channel = ProtocolChannel(
        Protocol(),
        peer=ADDRESS,
        host=ADDRESS,
        limits=LIMITS,
        remoteWindow=window,
        remoteMaxPacket=1000,
        conn=conn,
    )
    channel.id = number
    conn.channels[number] = channel
    conn.channelsToRemoteChannel[channel] = number
    conn.localToRemoteChannel[number] = number
    channel.channelOpen(b"")
    return channel


class RoundRobinTests(TestCase):
    def test_small_message_waits_one_packet_per_busy_channel(self) -> None:
        conn, log = make_connection()
        bulk = [open_channel(conn, n) for n in range(3)]
        quiet = open_channel(conn, 3)
        conn.pauseProducing()  # the socket is full: everything queues
        for channel in bulk:
            channel.write(b"x" * 20_000)
        quiet.write(b"ping")
        conn.resumeProducing()
        self.assertEqual(log.channels.index(3), 3, log.channels[:8])
        self.assertEqual(log.channels[:6], [0, 1, 2, 3, 0, 1])

    def test_every_byte_is_sent_once_in_order_per_channel(self) -> None:
        conn, log = make_connection()
        channels = [open_channel(conn, n) for n in range(4)]
        conn.pauseProducing()
        for n, channel in enumerate(channels):
            channel.write(b"y" * (2500 * (n + 1)))
        conn.resumeProducing()
        for n in range(4):
            sent = sum(size for ch, size in zip(log.channels, log.sizes) if ch == n)
            self.assertEqual(sent, 2500 * (n + 1))
        self.assertEqual(conn.budget.pending, 0)

    def test_paused_link_sends_nothing_and_resume_continues(self) -> None:
        conn, log = make_connection()
        channel = open_channel(conn, 0)
        conn.pauseProducing()
        channel.write(b"z" * 5000)
        self.assertEqual(log.channels, [])
        self.assertEqual(channel.pending, 5000)
        conn.resumeProducing()
        self.assertEqual(sum(log.sizes), 5000)

    def test_channel_without_window_leaves_the_turns_and_returns_with_window(self) -> None:
        conn, log = make_connection()
        starved = open_channel(conn, 0, window=1500)
        other = open_channel(conn, 1)
        starved.write(b"a" * 4000)
        other.write(b"b" * 2000)
        self.assertEqual(sum(s for c, s in zip(log.channels, log.sizes) if c == 0), 1500)
        self.assertEqual(sum(s for c, s in zip(log.channels, log.sizes) if c == 1), 2000)
        starved.addWindowBytes(10_000)
        self.assertEqual(sum(s for c, s in zip(log.channels, log.sizes) if c == 0), 4000)

    def test_a_write_during_a_send_is_picked_up(self) -> None:
        conn, log = make_connection()
        echo: Any = open_channel(conn, 0)
        follower = open_channel(conn, 1)
        original = echo.send_slice

        def send_and_write() -> None:
            original()
            if not follower.pending and not log.channels.count(1):
                follower.write(b"late")

        echo.send_slice = send_and_write
        echo.write(b"q" * 3000)
        self.assertIn(1, log.channels)
        self.assertEqual(sum(log.sizes), 3004)


class PacketFillingTests(TestCase):
    def test_queued_writes_leave_in_packets_as_full_as_the_peer_allows(self) -> None:
        """Small writes (shared buffers) and large ones (queued as they are)
        are cut and joined into full packets, in order."""
        conn, log = make_connection()
        channel = open_channel(conn, 0)
        conn.pauseProducing()
        writes = [bytes([65 + i % 26]) * 70 for i in range(30)]
        writes += [b"L" * 9000, b"M" * 9500, b"tail"]
        for data in writes:
            channel.write(data)
        conn.resumeProducing()
        total = sum(map(len, writes))
        self.assertEqual(log.sizes, [1000] * (total // 1000) + [total % 1000])
        self.assertEqual(b"".join(log.data), b"".join(writes))
        self.assertEqual(channel.pending, 0)
        self.assertEqual(conn.budget.pending, 0)

    def test_a_packet_never_exceeds_the_window(self) -> None:
        conn, log = make_connection()
        channel = open_channel(conn, 0, window=2500)
        channel.write(b"w" * 9000)
        self.assertEqual(log.sizes, [1000, 1000, 500])
        channel.addWindowBytes(700)
        self.assertEqual(log.sizes[-1], 700)
        self.assertEqual(channel.pending, 9000 - 3200)
