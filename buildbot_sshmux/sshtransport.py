"""What the master's and the launcher's SSH transports share."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.conch.ssh import transport
from twisted.logger import Logger

log = Logger()

# Fast, widely supported algorithms first (hmac-sha2-512 costs ~2.5x sha2-256).
PREFERRED_CIPHERS = [b"aes128-ctr", b"aes256-ctr", b"aes192-ctr"]
PREFERRED_MACS = [b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha1"]


def prefer(preferred: Sequence[bytes], supported: Sequence[bytes]) -> list[bytes]:
    """Order ``supported`` with ``preferred`` first, keeping only supported names."""
    first = [name for name in preferred if name in supported]
    return first + [name for name in supported if name not in first]


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
