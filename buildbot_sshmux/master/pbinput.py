"""Bounded PB input: what a worker session may make the master parse and hold.

Twisted's Banana (PB's wire format) keeps a message in memory until its last
byte, and costs CPU per token and per byte of each ``dataReceived`` call.
`PBChannel` hands the master's broker the peer's data through `BananaInput`:

- until the master has accepted the worker's password, at most
  ``login_bytes`` in all and ``login_items`` items (scalars and lists) in
  one top-level message;
- after that, at most ``max_message`` bytes and ``max_items`` items in one
  top-level message;
- in slices of `SLICE` bytes, except that the rest of a string Banana has
  begun goes in one piece (Banana copies its buffer once per token, so a
  64 KiB call of 1-byte tokens copies 2 GB, and once per call, so slicing a
  large string would copy it once per slice).

Past a limit the channel is closed with one log line; the host's other
sessions and its SSH connection go on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from attrs import frozen
from twisted.spread import banana

from buildbot_sshmux.wire.channel import InputRefused, ProtocolChannel

KiB = 1024
MiB = 1024 * KiB

# Measured with timeit on Banana alone: 1 MiB of 1-byte tokens in 64 KiB packets
# took 1.15 s whole, 1.14 s in 64 KiB slices, 0.84 s in 4 KiB ones, 0.77 s in
# 1 KiB ones (0.93 s through BananaInput, which also counts items); Banana's own
# work per token (about 0.7 us) is the rest.  A 64 KiB packet holding a 60 KiB
# string: 7.3 us whole, 39 us in plain 4 KiB slices, 131 us in 1 KiB ones, 10 us
# through BananaInput (the string's rest in one piece); 256 KiB FileUpload
# blocks: 2.1 GB/s whole and through BananaInput, 0.75 GB/s in plain 4 KiB slices.
SLICE = 4 * KiB

# A STRING token's head (prefix digits, the type byte) at the start of Banana's buffer.
_STRING_HEAD = re.compile(rb"([\x00-\x7f]{0,64})\x82")


@frozen
class PBInputLimits:
    """What one worker session may send the master, in bytes and items."""

    # Until the password is accepted.  A login (dialect, version, `login`,
    # `respond` with the mind Referenceable) measured 97 bytes from a real
    # buildbot-worker named proj-hostA, 111 from PBClientFactory for an
    # 18-character name, 193 for 100 characters: 5 messages of at most 13 items.
    login_bytes: int = 16 * KiB
    # Items (scalars and lists) of one message until then: an empty list is one
    # byte and about 70 bytes of objects (16 KiB of them held 1.1 MiB).
    login_items: int = 256
    # After it.  The largest message of a real build (a 16 MB stdout, a 6 MB
    # FileUpload, a DirectoryUpload) was 262,174 bytes, one 256 KiB FileUpload
    # block; Banana refuses strings over 640 KiB.
    max_message: int = 4 * MiB
    # That build's largest message held 483 items: this is one per 8 bytes of
    # max_message.  A message of empty lists up to it cost the master 37 MiB and
    # 0.7 s of CPU (4 MiB of them, unbounded: 278 MiB and 5 s).
    max_items: int = 512 * 1024
    # What all the channels of one connection that have not logged in may
    # have sent together: 200 sessions logging in at once send about 20 KB.
    connection_login_bytes: int = 1 * MiB


class BananaInput:
    """Feeds a Banana protocol (a PB broker) within `PBInputLimits`.

    ``authenticated`` says whether the peer's password was accepted.  Message sizes
    are counted to within one slice: a message that began inside a slice is
    counted from that slice's start.
    """

    def __init__(
        self, protocol: banana.Banana, limits: PBInputLimits, authenticated: Callable[[], bool]
    ) -> None:
        self.protocol = protocol
        self.limits = limits
        self.authenticated = authenticated
        self.login_bytes = 0  # taken before the password was accepted
        self.message_bytes = 0  # of the top-level message in progress
        self.message_items = 0
        self._item_limit = (limits.login_items, "login_items")  # and its name, for the log
        self._completed = False  # a top-level message completed in the current slice
        self._got_item = protocol.gotItem
        protocol.gotItem = self._count_item  # type: ignore[method-assign]

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The slices of ``data`` to hand the protocol, in turn; raises
        `InputRefused` before a slice past a limit, or after one that passed it."""
        pos = 0
        while pos < len(data):
            piece = data[pos : pos + max(SLICE, self._string_rest())]
            pos += len(piece)
            if self.authenticated():
                self._item_limit = (self.limits.max_items, "max_items")
            else:
                self._item_limit = (self.limits.login_items, "login_items")
                self.login_bytes += len(piece)
                if self.login_bytes > self.limits.login_bytes:
                    raise InputRefused(
                        f"sent {self.login_bytes} bytes before logging in"
                        f" (login_bytes={self.limits.login_bytes})"
                    )
            self._completed = False
            yield piece
            if self.protocol.listStack or self.protocol.buffer:
                self.message_bytes = len(piece) if self._completed else self.message_bytes + len(piece)
                if self.message_bytes > self.limits.max_message:
                    raise InputRefused(
                        f"sent a message of more than {self.limits.max_message} bytes (max_message)"
                    )
            else:
                self.message_bytes = 0

    def _string_rest(self) -> int:
        """Bytes still to come of a string whose start Banana holds (0 if none)."""
        buffered = self.protocol.buffer
        head = _STRING_HEAD.match(buffered) if buffered else None
        if head is None:
            return 0
        return head.end() + banana.b1282int(head.group(1)) - len(buffered)

    def _count_item(self, item: Any) -> None:
        if self.protocol.listStack:
            self.message_items += 1
            limit, name = self._item_limit
            if self.message_items > limit:
                raise InputRefused(f"sent a message of more than {limit} items ({name})")
        else:
            self.message_items = 0
            self._completed = True
        self._got_item(item)


class PBChannel(ProtocolChannel):
    """The master's end of a worker session: a PB broker whose input is bounded."""

    def __init__(
        self,
        protocol: banana.Banana,
        *,
        login: Any,
        input_limits: PBInputLimits = PBInputLimits(),
        **kwargs: Any,
    ) -> None:
        super().__init__(protocol, **kwargs)
        self.login = login  # authorization.WorkerLogin
        self._login_charged = 0  # of the connection's pb_login_bytes
        self.input = BananaInput(protocol, input_limits, lambda: login.authenticated)

    def deliver(self, data: bytes) -> None:
        for piece in self.input.pieces(data):
            if self.disconnected:
                return
            if self.login.authenticated:
                self._release_login_bytes()
            else:
                self._count_login_bytes(len(piece))
            self.protocol.dataReceived(piece)

    def _count_login_bytes(self, n: int) -> None:
        """Charge ``n`` bytes to what the connection's channels not logged in have sent."""
        conn: Any = self.conn
        self._login_charged += n
        total = conn.pb_login_bytes = getattr(conn, "pb_login_bytes", 0) + n
        limit = self.input.limits.connection_login_bytes
        if total > limit:
            raise InputRefused(
                f"the channels of this connection that have not logged in sent {total} bytes"
                f" (connection_login_bytes={limit})"
            )

    def _release_login_bytes(self) -> None:
        conn: Any = self.conn
        if self._login_charged and conn is not None:
            conn.pb_login_bytes -= self._login_charged
        self._login_charged = 0

    def closed(self) -> None:
        self._release_login_bytes()
        super().closed()

    def describe(self) -> str:
        login = self.login
        worker = f" worker {login.worker_name!r}" if login.worker_name is not None else ""
        return (
            f"host {login.entry.name} ({login.entry.fingerprint}) from {login.peer} channel {self.id}{worker}"
        )
