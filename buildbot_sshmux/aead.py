"""AEAD packet ciphers for SSH: ``aes128-gcm@openssh.com`` and ``aes256-gcm@openssh.com``.

RFC 5647 as OpenSSH implements it (its PROTOCOL file, section 1.6): the
4-byte packet length travels in clear and is authenticated as associated
data; the rest of the packet (padding length, payload, padding: a multiple
of 16 bytes) is encrypted, followed by a 16-byte tag; the MAC negotiated
alongside is ignored.  The 12-byte nonce is the first 12 bytes of the
derived IV, its last 8 bytes a big-endian counter that increments by one a
packet.  One AES-GCM call seals or opens a packet, in place of AES-CTR plus
a separate HMAC pass (a quarter of the CPU of a bulk transfer).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# SSH name -> AES key size in bytes.
GCM_KEY_SIZES = {b"aes128-gcm@openssh.com": 16, b"aes256-gcm@openssh.com": 32}
AEAD_CIPHERS = list(GCM_KEY_SIZES)


class PacketCipher:
    """One direction of an AES-GCM packet stream: seal (send) or open (receive).

    ``packet`` is a whole binary packet, 4-byte length first; the wire form is
    that length in clear, the ciphertext of the rest, and the tag.
    """

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

    def packet_length(self, header: bytes) -> int:
        """The packet length announced by the first 4 bytes on the wire."""
        return int.from_bytes(header[:4], "big")

    def seal(self, header: bytes, body: bytes) -> bytes:
        """Encrypt ``body`` (padding length, payload, padding) and append the tag."""
        return self._aesgcm.encrypt(self._next_nonce(), body, header)

    def open(self, header: bytes | memoryview, sealed: bytes | memoryview) -> bytes:
        """Verify and decrypt; raises `cryptography.exceptions.InvalidTag`."""
        return self._aesgcm.decrypt(self._next_nonce(), sealed, header)


def padding_length(body_length: int, block_size: int) -> int:
    """SSH padding for an AEAD packet: 4 or more bytes making the encrypted
    part (padding length byte, payload, padding) a multiple of the block."""
    pad = block_size - (body_length % block_size)
    return pad + block_size if pad < 4 else pad
