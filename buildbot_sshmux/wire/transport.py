"""What the master's and the launcher's SSH transports share: fast
algorithms first, AEAD packet framing, strict key exchange, and dropping a
peer whose message cannot be parsed."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from twisted.conch.ssh import transport
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.connection import MSG_CHANNEL_DATA
from twisted.logger import Logger, LogLevel

from buildbot_sshmux.wire.aead import (
    AEAD_CIPHERS,
    Bytes,
    PacketCipher,
    RandomPadding,
    packet_cipher,
    padding_length,
)
from buildbot_sshmux.wire.liveness import RekeyingTransport
from buildbot_sshmux.wire.peerlog import quote

log = Logger()

# Fast, widely supported algorithms first: AES-GCM seals a packet in one call
# (AES-NI); with AES-CTR, hmac-sha2-512 costs ~2.5x sha2-256.
PREFERRED_CIPHERS = [
    b"aes128-gcm@openssh.com",
    b"aes256-gcm@openssh.com",
    b"chacha20-poly1305@openssh.com",
    b"aes128-ctr",
    b"aes256-ctr",
    b"aes192-ctr",
]
PREFERRED_MACS = [b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha1"]
MAX_PACKET_LENGTH = 1048576  # Conch's limit on an incoming packet
SEND_LIMIT = 512 * 1024  # bytes one send() call may take (Twisted's FileDescriptor.SEND_LIMIT)
IMPLICIT_MAC = b"<implicit>"  # the MAC "name" of an AEAD direction, as OpenSSH reports it
KEX_STRICT_CLIENT = b"kex-strict-c-v00@openssh.com"
KEX_STRICT_SERVER = b"kex-strict-s-v00@openssh.com"


SHUTDOWN_REASON = b"the master is shutting down"  # a master's DISCONNECT when it stops

# Twisted's and Conch's lines for routine steps of every connection, channel
# and retry: debug, not info, so a site with hundreds of hosts logs only events.
ROUTINE_FORMATS = frozenset(
    {
        "opening channel {id} with {localWindowSize} {localMaxPacket}",
        "connection lost",
        "sending close {id}",
        "disabling non-fixed-group key exchange algorithms because we cannot find moduli file",
        "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
        "Disconnecting with error, code {code}\nreason: {description}",
    }
)


class BoundedLogger(Logger):
    """The log of our Conch (and Twisted) subclasses: Conch's debug lines
    (several a packet, some with whole payloads) only with ``show_debug``,
    its routine info lines as debug, and every field bounded, since Conch
    logs what peers send (descriptions, request names)."""

    show_debug = False  # ssh-worker --debug, SSHMuxService(debug=True)
    field_limit = 200

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level == LogLevel.info and format in ROUTINE_FORMATS:
            level = LogLevel.debug
        if level == LogLevel.debug and not BoundedLogger.show_debug:
            return
        for name, value in kwargs.items():
            if isinstance(value, (bytes, str)) and len(value) > self.field_limit:
                kwargs[name] = quote(value, self.field_limit)
        super().emit(level, format, **kwargs)


def prefer(preferred: Sequence[bytes], supported: Sequence[bytes]) -> list[bytes]:
    """Order ``supported`` with ``preferred`` first, keeping only supported names."""
    first = [name for name in preferred if name in supported]
    return first + [name for name in supported if name not in first]


SUPPORTED_CIPHERS = prefer(PREFERRED_CIPHERS, [*AEAD_CIPHERS, *transport.SSHTransportBase.supportedCiphers])
SUPPORTED_MACS = prefer(PREFERRED_MACS, transport.SSHTransportBase.supportedMACs)


def send_without_delay(tcp: Any) -> None:
    """Set TCP_NODELAY on an SSH connection's socket.

    PB is request and reply: without it, the last small packet of a message
    can wait for the peer's delayed ACK (40 ms), as measured on FileUploads.
    Packets are written a reactor turn at a time, so little goes out small.
    """
    set_no_delay = getattr(tcp, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


class Ciphers(transport.SSHCiphers):
    """Conch's `SSHCiphers`, plus AEAD ciphers, direction by direction.

    A direction whose cipher is AEAD gets a `PacketCipher` (``out_aead`` or
    ``in_aead``) and no separate MAC; Conch's cipher and MAC serve the other.
    """

    out_aead: PacketCipher | None = None
    in_aead: PacketCipher | None = None

    @classmethod
    def adopt(cls, negotiated: transport.SSHCiphers) -> Ciphers:
        c = negotiated
        return cls(c.outCipType, c.inCipType, c.outMACType, c.inMACType)

    def setKeys(self, outIV: bytes, outKey: bytes, inIV: bytes, inKey: bytes, outInteg: bytes, inInteg: bytes) -> None:  # fmt: skip
        out_name, in_name = self.outCipType, self.inCipType
        if out_name in AEAD_CIPHERS:
            self.outCipType = self.outMACType = b"none"
        if in_name in AEAD_CIPHERS:
            self.inCipType = self.inMACType = b"none"
        super().setKeys(outIV, outKey, inIV, inKey, outInteg, inInteg)
        self.outCipType, self.inCipType = out_name, in_name
        if out_name in AEAD_CIPHERS:
            self.out_aead = packet_cipher(out_name, outKey, outIV)
            self.outMACType = IMPLICIT_MAC
            self.encBlockSize = self.out_aead.block_size
        if in_name in AEAD_CIPHERS:
            self.in_aead = packet_cipher(in_name, inKey, inIV)
            self.inMACType = IMPLICIT_MAC
            self.decBlockSize = self.in_aead.block_size


class AEADFraming:
    """Mixin for Conch transports: the binary packet framing of AEAD ciphers.

    Conch frames packets for a block cipher followed by a MAC over the
    plaintext; with an AEAD cipher one call seals or opens a packet, and
    the length is read from the header first.  Other ciphers go through
    Conch unchanged.

    Bulk data costs one copy before sealing a packet (`send_parts` frames
    the message's parts with one join) and one after opening it: a read's
    packets are opened where they lie, and a ``CHANNEL_DATA`` message goes
    to a service that ``takes_data_views`` as a view of the opened packet.
    """

    currentEncryptions: Any
    buf: bytes
    _padding: RandomPadding | None = None
    _incoming_length: int | None = None  # of the packet at the start of buf, once read

    def incoming_packet_limit(self) -> int:
        """The longest packet accepted now (a server lowers it before login)."""
        return MAX_PACKET_LENGTH

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        t: Any = self
        t.nextEncryptions = Ciphers.adopt(t.nextEncryptions)
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]

    # Output

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        if getattr(self.currentEncryptions, "out_aead", None) is None:
            return super().sendPacket(messageType, payload)  # type: ignore[misc]
        t: Any = self
        if t._keyExchangeState != t._KEY_EXCHANGE_NONE and not t._allowedKeyExchangeMessageType(messageType):
            t._blockedByKeyExchange.append((messageType, payload))
            return None
        if t.outgoingCompression:
            message = t.outgoingCompression.compress(bytes((messageType,)) + payload)
            message += t.outgoingCompression.flush(2)
            self._seal(b"", (message,), len(message))
        else:
            self._seal(bytes((messageType,)), (payload,), len(payload))
        return None

    def can_send_parts(self) -> bool:
        """Whether `send_parts` may frame a message now (else: `sendPacket`)."""
        t: Any = self
        return (
            getattr(self.currentEncryptions, "out_aead", None) is not None
            and t._keyExchangeState == t._KEY_EXCHANGE_NONE
            and not t.outgoingCompression
        )

    def send_parts(self, messageType: int, parts: Sequence[Bytes], size: int) -> None:
        """Send a message whose payload is ``parts`` joined (``size`` bytes),
        without joining them first; only when `can_send_parts`."""
        self._seal(bytes((messageType,)), parts, size)

    def _seal(self, message_type: bytes, parts: Sequence[Bytes], size: int) -> None:
        """Frame, seal and write one packet: padding length, ``message_type``
        (one byte, or none if the parts include it), the parts (``size``
        bytes), padding."""
        t: Any = self
        sealer = self.currentEncryptions.out_aead
        pad = padding_length(1 + len(message_type) + size, sealer.block_size)
        if self._padding is None:
            self._padding = RandomPadding()
        body = b"".join((bytes((pad,)), message_type, *parts, self._padding.take(pad)))
        t.transport.writeSequence(sealer.seal(t.outgoingPacketSequence, len(body).to_bytes(4, "big"), body))
        t.outgoingPacketSequence += 1

    # Input

    def dataReceived(self, data: bytes) -> None:
        t: Any = self
        if not t.gotVersion or getattr(self.currentEncryptions, "in_aead", None) is None:
            super().dataReceived(data)  # type: ignore[misc]  # Conch's: the version line, packets before AEAD
            return
        buf = self.buf + data if self.buf else data
        pos = self._open_packets(buf)
        if pos < 0:
            self.buf = b""  # dropped: the rest is not read
            return
        self.buf = buf[pos:] if pos else buf
        if self.buf and getattr(self.currentEncryptions, "in_aead", None) is None:
            super().dataReceived(b"")  # type: ignore[misc]  # a re-exchange chose a cipher Conch frames

    def _open_packets(self, buf: bytes) -> int:
        """Open and dispatch the whole AEAD packets at the start of ``buf``;
        where the rest begins, or -1 if the peer was dropped."""
        t: Any = self
        view = memoryview(buf)
        pos, size = 0, len(buf)
        try:
            while size - pos >= 4 and not t.transport.disconnecting:
                opener = self.currentEncryptions.in_aead
                if opener is None:
                    break
                seq = t.incomingPacketSequence
                length = self._incoming_length
                if length is None:
                    length = opener.packet_length(seq, view[pos : pos + 4])
                    if not self._length_allowed(opener, length):
                        return -1
                end = pos + 4 + length + opener.tag_size
                if size < end:
                    self._incoming_length = length
                    break
                self._incoming_length = None
                try:
                    body = opener.open(seq, view[pos : pos + 4], view[pos + 4 : end])
                except InvalidTag:
                    t.sendDisconnect(transport.DISCONNECT_MAC_ERROR, b"bad MAC")
                    return -1
                pos = end
                number, payload = self._message(body)
                if payload is None:
                    return -1
                t.incomingPacketSequence = seq + 1
                self.dispatchMessage(number, payload)  # type: ignore[attr-defined]
            return pos
        finally:
            view.release()

    def _length_allowed(self, opener: PacketCipher, length: int) -> bool:
        if length > self.incoming_packet_limit() or length < opener.block_size or length % opener.block_size:
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % length)  # type: ignore[attr-defined]
            return False
        return True

    def _message(self, body: bytes) -> tuple[int, Bytes | None]:
        """(message number, payload) of an opened packet; payload None if it is malformed."""
        t: Any = self
        pad = body[0]
        if pad < 4 or pad + 2 > len(body):
            t.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"bad padding length %d" % pad)
            return 0, None
        if t.incomingCompression:
            try:
                message = t.incomingCompression.decompress(body[1:-pad])
            except Exception:
                t.sendDisconnect(transport.DISCONNECT_COMPRESSION_ERROR, b"compression error")
                return 0, None
            return message[0], message[1:]
        number = body[1]
        if number == MSG_CHANNEL_DATA and getattr(t.service, "takes_data_views", False):
            return number, memoryview(body)[2 : len(body) - pad]
        return number, body[2 : len(body) - pad]

    def getPacket(self) -> bytes | None:
        """Conch's packet reader, which its dataReceived loop calls until the
        first AEAD key takes over in the middle of a read: then the rest of
        the read is opened and dispatched here, and the loop ends."""
        if getattr(self.currentEncryptions, "in_aead", None) is None:
            return self._conch_packet()
        pos = self._open_packets(self.buf)
        self.buf = b"" if pos < 0 else self.buf[pos:]
        if self.buf and getattr(self.currentEncryptions, "in_aead", None) is None:
            return self._conch_packet()  # a re-exchange chose a cipher Conch frames
        return None

    def _conch_packet(self) -> bytes | None:
        """Conch's getPacket (block ciphers, or none), with our packet length limit."""
        t: Any = self
        limit = self.incoming_packet_limit()
        packet: bytes | None = super().getPacket()  # type: ignore[misc]
        first = getattr(self, "first", None)  # Conch keeps the decrypted first block of a partial packet
        declared = struct.unpack("!L", first[:4])[0] if packet is None and first else len(packet or b"")
        if declared > limit:
            t.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % declared)
            return None
        return packet


class StrictKeyExchange:
    """Mixin for Conch transports: OpenSSH's strict key exchange.

    OpenSSH's PROTOCOL, section 1.10, against prefix truncation (Terrapin,
    CVE-2023-48795), which chacha20-poly1305 would otherwise allow: each side
    advertises a marker in its first KEXINIT; if both do, the peer's KEXINIT
    must be its first packet, nothing but key exchange messages may arrive
    until the first NEWKEYS, and every NEWKEYS resets the sequence number of
    its direction.
    """

    advertise_strict_kex = True
    strict_kex = False
    _initial_kex_done = False
    _only_kex_messages = False  # strict, and the first NEWKEYS not yet received

    def sendKexInit(self) -> None:
        t: Any = self
        if t.sessionID is None and self.advertise_strict_kex:  # the initial exchange
            marker = KEX_STRICT_CLIENT if t.isClient else KEX_STRICT_SERVER
            # The instance's own list: Conch's factory drops the group-exchange
            # methods from it when it has no moduli.
            own = list(t.supportedKeyExchanges)
            t.supportedKeyExchanges = [*own, marker]
            try:
                super().sendKexInit()  # type: ignore[misc]
            finally:
                t.supportedKeyExchanges = own  # negotiation uses the list without the marker
        else:
            super().sendKexInit()  # type: ignore[misc]

    def ssh_KEXINIT(self, packet: bytes) -> Any:
        t: Any = self
        if t.sessionID is None and not self._initial_kex_done:
            peer_marker = KEX_STRICT_SERVER if t.isClient else KEX_STRICT_CLIENT
            if self.advertise_strict_kex and peer_marker in getNS(packet[16:])[0].split(b","):
                self.strict_kex = self._only_kex_messages = True
                if t.incomingPacketSequence != 1:
                    self._violation(b"KEXINIT was not the first packet")
                    return None
        return super().ssh_KEXINIT(packet)  # type: ignore[misc]

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if not self._initial_kex_done and not _key_exchange_message(messageNum):
            # Strict: nothing else at all.  Otherwise only the transport's own
            # messages (RFC 4253, 7.1): Conch would run ssh-userauth in the clear.
            if self._only_kex_messages:
                self._violation(b"message %d during the initial key exchange" % messageNum)
                return
            if messageNum not in _TRANSPORT_MESSAGES:
                self.sendDisconnect(  # type: ignore[attr-defined]
                    transport.DISCONNECT_PROTOCOL_ERROR,
                    b"SSH message %d before the key exchange" % messageNum,
                )
                return
        super().dispatchMessage(messageNum, payload)  # type: ignore[misc]

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        t: Any = self
        if self.strict_kex:
            t.incomingPacketSequence = 0  # the packet after this one is number 0
            self._only_kex_messages = False
        self._initial_kex_done = True
        super().ssh_NEWKEYS(packet)  # type: ignore[misc]

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]
        if self.strict_kex:  # Conch's _keySetup ends by sending our NEWKEYS
            self.outgoingPacketSequence = 0

    def _violation(self, what: bytes) -> None:
        self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"strict KEX violation: " + what)  # type: ignore[attr-defined]


_TRANSPORT_MESSAGES = (transport.MSG_IGNORE, transport.MSG_UNIMPLEMENTED, transport.MSG_DEBUG)


def _key_exchange_message(number: int) -> bool:
    return number in (transport.MSG_DISCONNECT, transport.MSG_KEXINIT, transport.MSG_NEWKEYS) or (
        30 <= number <= 49
    )


class DropMalformed:
    """Mixin for Conch transports: a message that cannot be parsed drops the peer.

    Conch parses with struct and indexing, so a malformed message raises; it
    must not reach the reactor.
    """

    _disconnect_logged = False  # the reason was logged already (once is enough)

    def describe_peer(self) -> str:
        raise NotImplementedError

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if getattr(self.transport, "disconnecting", False):  # type: ignore[attr-defined]
            return  # once dropping it, read nothing more (as a socket would)
        try:
            super().dispatchMessage(messageNum, payload)  # type: ignore[misc]
        except Exception as e:
            log.warn(
                "{peer}: malformed SSH message {number} ({error}); disconnected",
                peer=self.describe_peer(),
                number=messageNum,
                error=quote(f"{type(e).__name__}: {e}", 200),
            )
            self._disconnect_logged = True
            self.sendDisconnect(  # type: ignore[attr-defined]
                transport.DISCONNECT_PROTOCOL_ERROR, b"malformed message"
            )


class CountingTransport:
    """An SSH transport's TCP transport, counting the bytes written to it (``written``).

    Everything else is the TCP transport's own (attributes, methods,
    producer registration).  Conch writes each packet with ``write``, our
    AEAD framing with ``writeSequence``.
    """

    def __init__(self, tcp: Any) -> None:
        self.tcp = tcp
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.tcp.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.written += sum(map(len, data))
        self.tcp.writeSequence(data)

    @property
    def disconnecting(self) -> bool:
        # Read for every packet and every read: a property, not the
        # __getattr__ fallback (a failed lookup first, then the forward).
        return bool(self.tcp.disconnecting)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tcp, name)


class MuxTransport(DropMalformed, RekeyingTransport, StrictKeyExchange, AEADFraming):
    """The stack both ends run on Conch's transport, assembled once: drop a
    peer whose message cannot be parsed, rekey by volume and age, strict key
    exchange, AEAD framing, fast algorithms first, bounded logs.  Mix it in
    before ``SSHServerTransport`` or ``SSHClientTransport``.

    It counts the bytes it reads (``bytes_received``) and writes
    (``bytes_sent``), on the wire: framing, padding and MACs included.
    """

    _log = BoundedLogger()
    supportedCiphers = SUPPORTED_CIPHERS
    supportedMACs = SUPPORTED_MACS
    bytes_received = 0

    def makeConnection(self, transport: Any) -> None:
        # One send() call takes what a reactor turn wrote (Twisted's default
        # is 128 KiB): the channels' link_slack lets a few packets out at once.
        transport.SEND_LIMIT = SEND_LIMIT
        super().makeConnection(CountingTransport(transport))  # type: ignore[misc]

    @property
    def bytes_sent(self) -> int:
        return int(getattr(getattr(self, "transport", None), "written", 0))

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        super().dataReceived(data)
