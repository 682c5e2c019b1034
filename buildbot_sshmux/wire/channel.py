"""An SSH channel that is a transport for a protocol, with bounded buffers.

Both sides use it: on the master a channel carries one worker's PB broker, on
the worker host it carries the worker's PB client.  The protocol sees an
ordinary transport (``ITransport``, ``IConsumer``, ``IPushProducer``), so PB runs
unchanged inside.

Conch's ``SSHChannel.write`` buffers without bound when the peer's window is
full.  This one counts what waits, per channel and per connection:

- above ``high_water`` bytes (or the connection's budget), the channel pauses
  the producer registered on it and stops granting window to the peer, so a
  request/response protocol cannot make it buffer more;
- when the buffer drains to half that, both resume;
- past ``max_buffer`` (or the connection's ``max_buffer``) the peer is not
  reading at all: the channel is aborted and says so (with a
  ``stall_timeout``, only once the peer has also taken nothing for that long).

The connection registers itself as producer on its TCP transport (unless its
SSH transport ``produces_for_tcp`` itself and passes pauses on, as the
server's does), so a full socket buffer holds back every channel (after
``link_slack`` more bytes) instead of growing in the kernel's place.

An exception from the protocol's ``dataReceived`` (garbage from the peer)
closes that channel alone, with one log line, as it would close a TCP
connection; the SSH connection and its other channels go on.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.conch.ssh import connection
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet import error, interfaces
from twisted.internet.interfaces import IAddress, IProtocol, IPullProducer, IPushProducer
from twisted.logger import Logger
from twisted.python import context
from twisted.python.failure import Failure
from twisted.python.log import ILogContext
from zope.interface import implementer

from buildbot_sshmux.wire.peerlog import quote

log = Logger()

KiB = 1024
MiB = 1024 * KiB
SMALL_WRITE = 8 * KiB  # writes below this share a buffer; larger ones are queued as they are


@frozen
class FlowLimits:
    """Window and buffer sizes of channels and connections, in bytes."""

    # One window a round trip is what one channel can move: 4 MiB is 190 MB/s
    # over a 20 ms link (measured through a delay relay: `tox -e bench`, wan).
    window_size: int = 4 * MiB
    # Measured: 64 KiB packets cut per-packet Python work in half against
    # 32 KiB; 128 KiB ones cross glibc's mmap threshold, and every packet's
    # buffers then cost fresh pages (5x the CPU in some runs).
    max_packet: int = 64 * KiB
    high_water: int = 256 * KiB
    max_buffer: int = 8 * MiB
    connection_high_water: int = 16 * MiB
    connection_max_buffer: int = 64 * MiB
    # Twisted pauses its producer once 64 KiB wait for the socket: after one
    # full packet.  Channels send this much more before they hold, so a few
    # packets leave a reactor turn (measured: 12% more bulk, a tenth less CPU
    # per GB on each side; a megabyte made some runs slower than none).
    link_slack: int = 192 * KiB
    # Past a max_buffer, 0 aborts the channel at once (the master: a worker
    # host must not make it hold more); more waits until the peer has taken
    # nothing for that many seconds (the worker side: buildbot-worker streams
    # logs without flow control, and a master that reads slowly is reading).
    stall_timeout: float = 0.0


class InputRefused(Exception):
    """The peer sent more than a channel takes; the text says what, for the log."""


@implementer(IAddress)
@frozen
class ChannelAddress:
    """One end of a channel: the SSH peer's address and the SSH host's name.

    Buildbot logs ``getPeer()`` and reads ``.host`` and ``.port``.
    """

    type: str
    host: str
    port: int
    ssh_host: str = ""


class ConnectionBudget:
    """Bytes waiting in every channel of one SSH connection."""

    def __init__(self, limits: FlowLimits) -> None:
        self.limits = limits
        self.pending = 0
        self.link_paused = False  # the TCP transport paused us: its buffer is full
        self.slack = 0  # what channels may still send while link_paused
        self.rekeying = False  # a key exchange holds packets back
        self._throttled: dict[ProtocolChannel, None] = {}

    @property
    def blocked(self) -> bool:
        """Whether channels must hold their data for now."""
        return (self.link_paused and self.slack <= 0) or self.rekeying

    def pause_link(self, slack: int) -> None:
        """The TCP transport's buffer is full: channels may send ``slack`` more."""
        if not self.link_paused:
            self.link_paused = True
            self.slack = slack

    def sent(self, n: int) -> None:
        """``n`` bytes of channel data went to the TCP transport."""
        if self.link_paused:
            self.slack -= n

    @property
    def exhausted(self) -> bool:
        return self.pending >= self.limits.connection_high_water

    @property
    def overflowing(self) -> bool:
        return self.pending > self.limits.connection_max_buffer

    def charge(self, n: int) -> None:
        self.pending += n

    def refund(self, n: int) -> None:
        low_water = self.limits.connection_high_water // 2
        was_above = self.pending > low_water
        self.pending -= n
        # Channels throttled by the budget wake when it drains below low water,
        # longest throttled first, until their writes fill it again (so waking
        # costs what is woken, not every channel); a channel throttled by its
        # own queue wakes from its own sends.
        if was_above and self.pending <= low_water:
            for channel in list(self._throttled):
                if self.pending > low_water:
                    break
                channel.update_throttle()

    def watch(self, channel: ProtocolChannel) -> None:
        self._throttled[channel] = None

    def unwatch(self, channel: ProtocolChannel) -> None:
        self._throttled.pop(channel, None)


@implementer(interfaces.ITransport, interfaces.IConsumer, IPushProducer)
class ProtocolChannel(SSHChannel):
    """An SSH channel that drives ``protocol`` as its transport."""

    def __init__(
        self,
        protocol: IProtocol,
        *,
        peer: IAddress,
        host: IAddress,
        limits: FlowLimits = FlowLimits(),
        call_soon: Callable[[Callable[[], Any]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(localWindow=limits.window_size, localMaxPacket=limits.max_packet, **kwargs)
        self.protocol = protocol
        self.peer = peer
        self.host = host
        self.limits = limits
        self.label = label
        self.disconnected = False
        self._call_soon = call_soon
        self._clock = clock
        self._last_progress = clock()  # when the peer last took data or granted window
        self._chunks: deque[memoryview | bytearray] = deque()
        self._pending = 0
        self._producer: IPushProducer | IPullProducer | None = None
        self._streaming = True
        self._pull_scheduled = False
        self._reading_paused = False
        self._throttled = False
        self._closing_cleanly = False
        self._peer_closed = False
        self._delivering = False
        self._lost_later: Failure | None = None

    @property
    def _budget(self) -> ConnectionBudget:
        return self.conn.budget  # type: ignore[union-attr, no-any-return]

    @property
    def pending(self) -> int:
        """Bytes written by the protocol that the peer has not yet taken."""
        return self._pending

    # SSH channel events

    def channelOpen(self, specificData: bytes) -> None:
        self.protocol.makeConnection(self)

    def logPrefix(self) -> str:
        return self.label or "ProtocolChannel"

    def describe(self) -> str:
        """Who this channel is, for the log: its label and channel number."""
        return f"{self.label or 'channel'} (channel {self.id})"

    def dataReceived(self, data: bytes) -> None:
        if not self.disconnected:
            self._delivering = True
            try:
                # Legacy log.msg() calls made by the protocol (Buildbot's) carry our
                # label: log.callWithContext's own merge costs 3x this, every packet.
                context.call({ILogContext: {"system": self.label}}, self.deliver, data)
            except Exception as e:
                # Over TCP a protocol's exception closes its own connection; here it
                # must not reach Conch, which would drop every channel of the host.
                self._input_failed(e)
            finally:
                self._delivering = False
                lost, self._lost_later = self._lost_later, None
                if lost is not None:
                    self.protocol.connectionLost(lost)
                else:
                    self._release_window()

    def deliver(self, data: bytes) -> None:
        """Hand the peer's ``data`` to the protocol (subclasses bound it)."""
        self.protocol.dataReceived(data)

    def _input_failed(self, e: Exception) -> None:
        """The protocol could not take the peer's input: close this channel only."""
        if isinstance(e, InputRefused):
            problem = str(e)
        else:  # the text may quote the peer: one short ASCII line, whatever it sent
            problem = "protocol error: " + quote(f"{type(e).__name__}: {e}", 200)
        log.warn("{channel}: {problem}; channel closed", channel=self.describe(), problem=problem)
        self.abortConnection()

    def extReceived(self, dataType: int, data: bytes) -> None:
        log.warn("{channel}: ignored {n} bytes of extended data", channel=self.describe(), n=len(data))

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        log.warn(
            "{channel}: refused channel request {request!r}",
            channel=self.describe(),
            request=quote(requestType),
        )
        return 0

    def eofReceived(self) -> None:
        self.loseConnection()

    def addWindowBytes(self, data: int) -> None:
        self._last_progress = self._clock()
        self.remoteWindowLeft += data
        if self._chunks:
            self.flush()

    def closeReceived(self) -> None:
        # The peer takes no more data: what is still queued is lost.
        self._peer_closed = True
        self._drop_pending()
        self.conn.sendClose(self)  # type: ignore[union-attr]

    def closed(self) -> None:
        self._drop_pending()
        self._budget.unwatch(self)
        if self._closing_cleanly or self._peer_closed:
            self._notify_lost(Failure(error.ConnectionDone("channel closed")))
        else:
            self._notify_lost(Failure(error.ConnectionLost("the SSH connection was lost")))

    def _notify_lost(self, reason: Failure) -> None:
        """Tell the protocol, once, that its transport is gone."""
        if self.disconnected:
            return
        self.disconnected = True
        self._producer = None
        if self._delivering:
            # As over TCP, never re-entrantly: a protocol whose write (in its
            # dataReceived) overflowed the channel hears it once that returns.
            self._lost_later = reason
            return
        self.protocol.connectionLost(reason)

    # ITransport

    def write(self, data: bytes) -> None:
        if self.disconnected or self.closing or not data:
            return
        tail = self._chunks[-1] if self._chunks else None
        if len(data) < SMALL_WRITE:
            # Small writes (PB sends one per message) share a buffer: thousands
            # of tiny chunks would cost several times their bytes in objects.
            if isinstance(tail, bytearray) and len(tail) < self.limits.max_packet:
                tail += data
            else:
                if isinstance(tail, bytearray):  # full: keep its bytes, not its spare room
                    self._chunks[-1] = memoryview(bytes(tail))
                self._chunks.append(bytearray(data))
        else:
            self._chunks.append(memoryview(bytes(data)))  # no copy of a bytes object
        self._pending += len(data)
        self._budget.charge(len(data))
        self.flush()
        if self.disconnected:
            return
        if (self._pending > self.limits.max_buffer or self._budget.overflowing) and self._peer_stalled():
            self._overflow()
        else:
            self.update_throttle()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.closing or self.disconnected:
            return
        self.closing = 1
        self._closing_cleanly = True
        if not self._pending:
            self.conn.sendClose(self)  # type: ignore[union-attr]

    def abortConnection(self) -> None:
        """Close now, dropping what is queued; the protocol hears it at once."""
        self._drop_pending()
        self.closing = 1
        self.conn.sendClose(self)  # type: ignore[union-attr]
        self._notify_lost(Failure(error.ConnectionAborted("channel aborted")))

    def getPeer(self) -> IAddress:
        return self.peer

    def getHost(self) -> IAddress:
        return self.host

    def setTcpKeepAlive(self, enabled: int) -> None:
        """Forwarded to the SSH connection's socket (Buildbot calls it)."""
        tcp: Any = getattr(self.conn.transport, "transport", None)  # type: ignore[union-attr]
        if hasattr(tcp, "setTcpKeepAlive"):
            tcp.setTcpKeepAlive(enabled)

    def getTcpKeepAlive(self) -> int:
        tcp: Any = getattr(self.conn.transport, "transport", None)  # type: ignore[union-attr]
        return int(tcp.getTcpKeepAlive()) if hasattr(tcp, "getTcpKeepAlive") else 0

    # IConsumer: the protocol's producer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"{self.label}: a producer is already registered")
        self._producer = producer
        self._streaming = bool(streaming)
        if self._streaming:
            if self._throttled:
                producer.pauseProducing()
        else:
            self._schedule_pull()

    def unregisterProducer(self) -> None:
        self._producer = None

    # IPushProducer: the protocol pauses what it reads

    def pauseProducing(self) -> None:
        self._reading_paused = True

    def resumeProducing(self) -> None:
        self._reading_paused = False
        self._release_window()

    def stopProducing(self) -> None:
        self.loseConnection()

    # flow control

    def window_held(self) -> bool:
        """Whether to withhold window from the peer (the connection asks)."""
        return self._reading_paused or self._throttled

    def flush(self) -> None:
        """Ask the connection to send what the peer's window and the link allow."""
        self.conn.schedule(self)  # type: ignore[union-attr]

    def sendable(self) -> bool:
        """Whether this channel has data and the peer's window has room."""
        return bool(self._chunks) and self.remoteWindowLeft > 0 and not self.localClosed

    def send_slice(self) -> None:
        """Send one packet, as full as the peer allows, from the front of the
        queue: the connection calls this round-robin."""
        limit = min(self.remoteWindowLeft, self.remoteMaxPacket)
        pieces: list[bytes | bytearray | memoryview] = []
        n = 0
        while self._chunks and n < limit:
            chunk = self._chunks[0]
            take = min(len(chunk), limit - n)
            pieces.append(chunk[:take])
            if take == len(chunk):
                self._chunks.popleft()
            elif isinstance(chunk, bytearray):
                del chunk[:take]  # O(1) at the front of a bytearray
            else:
                self._chunks[0] = chunk[take:]
            n += take
        self.remoteWindowLeft -= n
        self._pending -= n
        self._last_progress = self._clock()
        self.conn.send_data(self, pieces, n)  # type: ignore[union-attr]
        self._budget.refund(n)
        self._budget.sent(n)
        if self.closing and not self._pending and not self.localClosed:
            self.conn.sendClose(self)  # type: ignore[union-attr]
        self.update_throttle()

    def update_throttle(self) -> None:
        """Pause or resume the producer and the peer's window by what waits."""
        if self._pending > self.limits.high_water or self._budget.exhausted:
            if not self._throttled:
                self._throttled = True
                self._budget.watch(self)
                if self._producer is not None and self._streaming:
                    self._producer.pauseProducing()  # type: ignore[union-attr]
        elif self._throttled and (
            self._pending <= self.limits.high_water // 2
            and self._budget.pending <= self.limits.connection_high_water // 2
        ):
            self._throttled = False
            self._budget.unwatch(self)
            if self._producer is not None and self._streaming:
                self._producer.resumeProducing()
            self._release_window()
        if not self._streaming and self._producer is not None and not self._throttled:
            self._schedule_pull()

    def _schedule_pull(self) -> None:
        if self._pull_scheduled or self._call_soon is None:
            return
        self._pull_scheduled = True

        def pull() -> None:
            self._pull_scheduled = False
            if self._producer is not None and not self._streaming and not self._throttled:
                self._producer.resumeProducing()

        self._call_soon(pull)

    def _release_window(self) -> None:
        """Give the peer back the window its data used, once a quarter of it is
        used (1 MiB of the default 4: one adjustment per 16 full packets).

        Conch waits for half, which halves what one channel moves over a long
        link; OpenSSH's three packets cost both ends a packet each per 192 KiB
        (measured: a tenth of the bulk CPU per GB of each side, for 10% more
        over a 20 ms link with one channel).
        """
        if self.window_held() or self.localClosed or self.conn is None:
            return
        missing = self.localWindowSize - self.localWindowLeft
        if missing >= self.localWindowSize // 4:
            self.conn.adjustWindow(self, missing)

    def _drop_pending(self) -> None:
        if self._pending:
            self._budget.refund(self._pending)
        self._chunks.clear()
        self._pending = 0

    def _peer_stalled(self) -> bool:
        """Whether a queue past its limit means the peer is not reading."""
        timeout = self.limits.stall_timeout
        return timeout <= 0 or self._clock() - self._last_progress >= timeout

    def _overflow(self) -> None:
        idle = self._clock() - self._last_progress
        log.error(
            "{channel}: the peer is not reading ({pending} bytes queued on the channel,"
            " {total} on the connection; nothing taken for {idle:.0f} s); channel closed",
            channel=self.describe(),
            pending=self._pending,
            total=self._budget.pending,
            idle=idle,
        )
        self.abortConnection()


class FlowControlledConnection(connection.SSHConnection):
    """An SSH connection whose channels share a bounded budget and the link fairly.

    Channels with data take turns, one packet each, so a small message waits
    behind at most one packet per busy channel.  The connection is the
    streaming producer of its TCP transport: a full socket buffer stops the
    turns until it drains.  It also withholds window adjustments from
    channels that ask it to.
    """

    limits = FlowLimits()
    takes_data_views = True  # ssh_CHANNEL_DATA copies its data out of a memoryview

    def __init__(self) -> None:
        super().__init__()
        self.budget = ConnectionBudget(self.limits)
        self._handlers = {
            number: getattr(self, "ssh_" + name[4:], None) for number, name in self.protocolMessages.items()
        }
        self._turns: deque[ProtocolChannel] = deque()
        self._waiting: set[ProtocolChannel] = set()
        self._pumping = False

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.budget = ConnectionBudget(self.limits)  # subclasses may set limits late
        tcp = getattr(self.transport, "transport", None)
        if tcp is not None and not getattr(self.transport, "produces_for_tcp", False):
            tcp.registerProducer(self, True)

    def packetReceived(self, messageNum: int, packet: bytes) -> None:
        # Conch's formats its handler's name for every packet; this looks it up.
        handler = self._handlers.get(messageNum)
        if handler is None:
            self.unknown_message(messageNum, packet)
        else:
            handler(packet)

    def unknown_message(self, messageNum: int, packet: bytes) -> None:
        """A message this service has no handler for (Conch logs it, answers UNIMPLEMENTED)."""
        super().packetReceived(messageNum, packet)

    def ssh_CHANNEL_DATA(self, packet: bytes | memoryview) -> None:
        """Conch's, copying the data once (Conch slices the packet twice), and
        saying who sent more than a channel's window or packet size."""
        local, length = struct.unpack_from(">2L", packet)
        channel = self.channels[local]
        if length > channel.localWindowLeft or length > channel.localMaxPacket:
            self.too_much_data(channel, length)
            self.sendClose(channel)
            return
        data = bytes(packet[8 : 8 + length])
        if len(data) != length:
            raise ValueError(f"CHANNEL_DATA of {len(data)} bytes says {length}")
        channel.localWindowLeft -= length
        if channel.localWindowLeft < channel.localWindowSize // 2:
            self.adjustWindow(channel, channel.localWindowSize - channel.localWindowLeft)
        channel.dataReceived(data)

    def send_data(self, channel: SSHChannel, parts: list[bytes | bytearray | memoryview], size: int) -> None:
        """Conch's ``sendData`` of ``parts`` joined (``size`` bytes), framed with
        one copy (Conch's makes three before the transport's own)."""
        if channel.localClosed:
            return
        header = struct.pack(">2L", self.channelsToRemoteChannel[channel], size)
        transport: Any = self.transport
        can_send_parts = getattr(transport, "can_send_parts", None)  # our transports'
        if can_send_parts is not None and can_send_parts():
            transport.send_parts(connection.MSG_CHANNEL_DATA, [header, *parts], len(header) + size)
        else:
            transport.sendPacket(connection.MSG_CHANNEL_DATA, b"".join([header, *parts]))

    def too_much_data(self, channel: SSHChannel, n: int) -> None:
        who = channel.describe() if isinstance(channel, ProtocolChannel) else f"channel {channel.id}"
        log.warn(
            "{channel}: {n} bytes of data exceed its window or packet size; channel closed", channel=who, n=n
        )

    def adjustWindow(self, channel: SSHChannel, bytesToAdd: int) -> None:
        """Conch's, but withheld from channels that ask, and without Conch's
        debug line: Buildbot's master.log writes debug events, and a bulk
        transfer makes thousands of window adjustments a second."""
        if channel.localClosed or (isinstance(channel, ProtocolChannel) and channel.window_held()):
            return
        packet = struct.pack(">2L", self.channelsToRemoteChannel[channel], bytesToAdd)
        self.transport.sendPacket(connection.MSG_CHANNEL_WINDOW_ADJUST, packet)  # type: ignore[union-attr]
        channel.localWindowLeft += bytesToAdd

    def schedule(self, channel: ProtocolChannel) -> None:
        """Give ``channel`` turns until its data or its window runs out."""
        if channel not in self._waiting:
            self._waiting.add(channel)
            self._turns.append(channel)
        self.flush_channels()

    def flush_channels(self) -> None:
        """Send packets round-robin among channels, while the link takes them."""
        if self._pumping:
            return  # a send made a protocol write: the loop below picks it up
        self._pumping = True
        try:
            while self._turns and not self.budget.blocked:
                channel = self._turns.popleft()
                if channel.sendable():
                    channel.send_slice()
                if channel.sendable():
                    self._turns.append(channel)
                else:
                    self._waiting.discard(channel)
        finally:
            self._pumping = False

    # IPushProducer, for the TCP transport

    def pauseProducing(self) -> None:
        self.budget.pause_link(self.limits.link_slack)

    def resumeProducing(self) -> None:
        self.budget.link_paused = False
        self.flush_channels()

    def stopProducing(self) -> None:
        self.budget.pause_link(0)
