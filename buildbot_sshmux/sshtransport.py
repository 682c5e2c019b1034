"""What the master's and the launcher's SSH transports share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from twisted.conch.ssh import transport
from twisted.logger import Logger

from buildbot_sshmux.aead import AEAD_CIPHERS, PacketCipher, padding_length

log = Logger()

# Fast, widely supported algorithms first: AES-GCM seals a packet in one call;
# with AES-CTR, hmac-sha2-512 costs ~2.5x sha2-256.
PREFERRED_CIPHERS = [
    b"aes128-gcm@openssh.com",
    b"aes256-gcm@openssh.com",
    b"aes128-ctr",
    b"aes256-ctr",
    b"aes192-ctr",
]
PREFERRED_MACS = [b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha1"]
MAX_PACKET_LENGTH = 1048576  # Conch's limit on an incoming packet
IMPLICIT_MAC = b"<implicit>"  # the MAC "name" of an AEAD direction, as OpenSSH reports it


def prefer(preferred: Sequence[bytes], supported: Sequence[bytes]) -> list[bytes]:
    """Order ``supported`` with ``preferred`` first, keeping only supported names."""
    first = [name for name in preferred if name in supported]
    return first + [name for name in supported if name not in first]


SUPPORTED_CIPHERS = prefer(PREFERRED_CIPHERS, [*AEAD_CIPHERS, *transport.SSHTransportBase.supportedCiphers])
SUPPORTED_MACS = prefer(PREFERRED_MACS, transport.SSHTransportBase.supportedMACs)


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
            self.out_aead = PacketCipher(out_name, outKey, outIV)
            self.outMACType = IMPLICIT_MAC
        if in_name in AEAD_CIPHERS:
            self.in_aead = PacketCipher(in_name, inKey, inIV)
            self.inMACType = IMPLICIT_MAC


class AEADFraming:
    """Mixin for Conch transports: the binary packet framing of AEAD ciphers.

    Conch frames packets for a block cipher followed by a MAC over the
    plaintext; with an AEAD cipher the length stays in clear and one call
    seals or opens the rest.  Other ciphers go through Conch unchanged.
    """

    currentEncryptions: Any
    buf: bytes

    def _keySetup(self, sharedSecret: bytes, exchangeHash: bytes) -> None:
        self.nextEncryptions = Ciphers.adopt(self.nextEncryptions)
        super()._keySetup(sharedSecret, exchangeHash)  # type: ignore[misc]

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        sealer = getattr(self.currentEncryptions, "out_aead", None)
        if sealer is None:
            return super().sendPacket(messageType, payload)  # type: ignore[misc]
        t: Any = self
        if t._keyExchangeState != t._KEY_EXCHANGE_NONE and not t._allowedKeyExchangeMessageType(messageType):
            t._blockedByKeyExchange.append((messageType, payload))
            return None
        message = bytes((messageType,)) + payload
        if t.outgoingCompression:
            message = t.outgoingCompression.compress(message) + t.outgoingCompression.flush(2)
        pad = padding_length(1 + len(message), sealer.block_size)
        body = b"".join((bytes((pad,)), message, os.urandom(pad)))
        header = len(body).to_bytes(4, "big")
        t.transport.writeSequence((header, sealer.seal(header, body)))
        t.outgoingPacketSequence += 1
        return None

    def getPacket(self) -> bytes | None:
        opener = getattr(self.currentEncryptions, "in_aead", None)
        if opener is None:
            return super().getPacket()  # type: ignore[misc,no-any-return]
        t: Any = self
        buf = self.buf
        if len(buf) < 4:
            return None
        length = opener.packet_length(buf)
        if length > MAX_PACKET_LENGTH or length < opener.block_size or length % opener.block_size:
            t.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % length)
            return None
        end = 4 + length + opener.tag_size
        if len(buf) < end:
            return None
        view = memoryview(buf)
        try:
            body = opener.open(view[:4], view[4:end])
        except InvalidTag:
            t.sendDisconnect(transport.DISCONNECT_MAC_ERROR, b"bad MAC")
            return None
        self.buf = buf[end:]
        pad = body[0]
        if pad < 4 or pad + 2 > len(body):
            t.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"bad padding length %d" % pad)
            return None
        payload = body[1:-pad]
        if t.incomingCompression:
            try:
                payload = t.incomingCompression.decompress(payload)
            except Exception:
                t.sendDisconnect(transport.DISCONNECT_COMPRESSION_ERROR, b"compression error")
                return None
        t.incomingPacketSequence += 1
        return payload


class DropMalformed:
    """Mixin for Conch transports: a message that cannot be parsed drops the peer.

    Conch parses with struct and indexing, so a malformed message raises; it
    must not reach the reactor.
    """

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
                error=f"{type(e).__name__}: {e}",
            )
            self.sendDisconnect(  # type: ignore[attr-defined]
                transport.DISCONNECT_PROTOCOL_ERROR, b"malformed message"
            )
