"""AEAD packet ciphers for SSH, as OpenSSH defines them.

- ``aes128-gcm@openssh.com``, ``aes256-gcm@openssh.com`` (RFC 5647 as
  OpenSSH's PROTOCOL, section 1.6, amends it): the 4-byte packet length
  travels in clear, authenticated as associated data; the 12-byte nonce is
  the derived IV, whose last 8 bytes count packets.
- ``chacha20-poly1305@openssh.com`` (OpenSSH's PROTOCOL.chacha20poly1305):
  the length is encrypted under a second key; Poly1305, keyed from the
  first keystream block, authenticates the encrypted length and body; the
  nonce is the packet sequence number.

Either way the rest of the packet (padding length, payload, padding: whole
blocks) is encrypted and followed by a 16-byte tag, and the MAC negotiated
alongside is ignored.  One cipher call seals or opens a packet, in place of
AES-CTR plus an HMAC pass (a quarter of the CPU of a bulk transfer).
"""

from __future__ import annotations

import os
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

CHACHA20_POLY1305 = b"chacha20-poly1305@openssh.com"
# SSH name -> AES key size in bytes.
GCM_KEY_SIZES = {b"aes128-gcm@openssh.com": 16, b"aes256-gcm@openssh.com": 32}
AEAD_CIPHERS = [*GCM_KEY_SIZES, CHACHA20_POLY1305]

Bytes = bytes | memoryview


class PacketCipher(Protocol):
    """One direction of an AEAD packet stream.

    The wire form of a packet is a 4-byte header (its length, clear or not),
    the encrypted body, and the tag.  ``seq`` is the packet's sequence number.
    """

    block_size: int
    tag_size: int

    def packet_length(self, seq: int, header: Bytes) -> int:
        """The length announced by the 4-byte header on the wire."""

    def seal(self, seq: int, length: bytes, body: bytes) -> list[bytes]:
        """Encrypt a packet (its 4-byte length, and its body); return its
        wire form in pieces: header, encrypted body, tag."""

    def open(self, seq: int, header: Bytes, sealed: Bytes) -> bytes:
        """Verify and decrypt; raises `cryptography.exceptions.InvalidTag`."""


class AESGCMCipher:
    """``aes128-gcm@openssh.com`` or ``aes256-gcm@openssh.com``, one direction."""

    block_size = 16
    tag_size = 16

    def __init__(self, name: bytes, key: bytes, iv: bytes) -> None:
        self._aesgcm = AESGCM(key[: GCM_KEY_SIZES[name]])
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:12], "big")

    def _next_nonce(self) -> bytes:
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & 0xFFFFFFFFFFFFFFFF
        return nonce

    def packet_length(self, seq: int, header: Bytes) -> int:
        return int.from_bytes(header[:4], "big")

    def seal(self, seq: int, length: bytes, body: bytes) -> list[bytes]:
        return [length, self._aesgcm.encrypt(self._next_nonce(), body, length)]

    def open(self, seq: int, header: Bytes, sealed: Bytes) -> bytes:
        return self._aesgcm.decrypt(self._next_nonce(), sealed, header)


class ChaCha20Poly1305Cipher:
    """``chacha20-poly1305@openssh.com``, one direction.

    OpenSSH's ChaCha20 has a 64-bit block counter and a 64-bit nonce; with
    OpenSSL's 16-byte IV (32-bit little-endian counter, 96-bit nonce) the
    same state is the counter as 8 little-endian bytes, then the sequence
    number as 8 big-endian bytes.
    """

    block_size = 8
    tag_size = 16

    def __init__(self, key: bytes) -> None:
        self._main_key = key[:32]  # K_2: the body, and the Poly1305 key
        self._length_key = key[32:64]  # K_1: the packet length only

    @staticmethod
    def _iv(seq: int, block: int) -> bytes:
        return block.to_bytes(8, "little") + (seq & 0xFFFFFFFF).to_bytes(8, "big")

    def _length_cipher(self, seq: int) -> Cipher[None]:
        return Cipher(algorithms.ChaCha20(self._length_key, self._iv(seq, 0)), None)

    def _body_stream(self, seq: int) -> tuple[bytes, object]:
        """The Poly1305 key (block 0) and a keystream positioned at block 1."""
        stream = Cipher(algorithms.ChaCha20(self._main_key, self._iv(seq, 0)), None).encryptor()
        return stream.update(bytes(64))[:32], stream

    def packet_length(self, seq: int, header: Bytes) -> int:
        return int.from_bytes(self._length_cipher(seq).decryptor().update(header[:4]), "big")

    def seal(self, seq: int, length: bytes, body: bytes) -> list[bytes]:
        header = self._length_cipher(seq).encryptor().update(length)
        poly_key, stream = self._body_stream(seq)
        encrypted = stream.update(body)  # type: ignore[attr-defined]
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(encrypted)
        return [header, encrypted, mac.finalize()]

    def open(self, seq: int, header: Bytes, sealed: Bytes) -> bytes:
        body, tag = sealed[: -self.tag_size], sealed[-self.tag_size :]
        poly_key, stream = self._body_stream(seq)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(body)
        try:
            mac.verify(bytes(tag))
        except InvalidSignature:
            raise InvalidTag() from None
        return stream.update(body)  # type: ignore[attr-defined,no-any-return]


def packet_cipher(name: bytes, key: bytes, iv: bytes) -> PacketCipher:
    """The cipher for one direction, from the keys the key exchange derived."""
    if name == CHACHA20_POLY1305:
        return ChaCha20Poly1305Cipher(key)
    return AESGCMCipher(name, key, iv)


def padding_length(body_length: int, block_size: int) -> int:
    """SSH padding for an AEAD packet: 4 or more bytes making the encrypted
    part (padding length byte, payload, padding) a multiple of the block."""
    pad = block_size - (body_length % block_size)
    return pad + block_size if pad < 4 else pad


class RandomPadding:
    """Random padding bytes, read from the OS 64 KiB at a time (not a system
    call a packet)."""

    def __init__(self, pool_size: int = 64 * 1024) -> None:
        self._pool_size = pool_size
        self._pool = b""
        self._offset = 0

    def take(self, n: int) -> bytes:
        if self._offset + n > len(self._pool):
            self._pool, self._offset = os.urandom(self._pool_size), 0
        start = self._offset
        self._offset += n
        return self._pool[start : self._offset]
