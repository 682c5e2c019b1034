"""Keeping an SSH connection honest: keepalives both ways, and rekeying.

One connection carries every session of a host, so a half-open connection
strands them all.  Each side sends ``keepalive@openssh.com`` global requests
(as OpenSSH's ServerAlive*/ClientAlive* do); any answer, success or failure,
proves the peer alive, and after ``keepalive_count_max`` unanswered ones the
connection is dropped so the sessions move on.

Conch never starts a key re-exchange.  `RekeyingTransport` starts one after
``rekey_bytes`` (either direction) or ``rekey_interval`` seconds, and holds
the channels back while it runs so Conch's queue of packets blocked by the
exchange stays small.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.conch.error import ConchError
from twisted.conch.ssh.transport import MSG_KEXINIT
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

KEEPALIVE_REQUEST = b"keepalive@openssh.com"
DRAINING_REQUEST = b"draining@buildbot-sshmux"
"""A master's notice (no reply wanted) that it is about to stop: a launcher
moves its sessions away as their builds end.  Other peers ignore it."""
GiB = 1024**3


@frozen
class Liveness:
    """Keepalive and rekey settings of a connection."""

    keepalive_interval: float = 30.0
    keepalive_count_max: int = 3
    rekey_bytes: int = 1 * GiB
    rekey_interval: float = 3600.0


class Keepalive:
    """Sends keepalives on an SSH connection and drops it when they go unanswered."""

    def __init__(
        self,
        connection: Any,
        clock: Any,
        settings: Liveness,
        describe: Callable[[], str],
        on_round_trip: Callable[[float], object] | None = None,
    ) -> None:
        self.connection = connection
        self.clock = clock
        self.settings = settings
        self.describe = describe
        self.on_round_trip = on_round_trip  # told each round trip, in seconds (a histogram)
        self.unanswered = 0
        self.round_trips: deque[float] = deque(maxlen=64)  # seconds, the latest last
        self._call: Any = None

    @property
    def last_round_trip(self) -> float | None:
        return self.round_trips[-1] if self.round_trips else None

    @property
    def median_round_trip(self) -> float | None:
        return statistics.median(self.round_trips) if self.round_trips else None

    def start(self) -> None:
        if self.settings.keepalive_interval > 0:
            self._call = self.clock.callLater(self.settings.keepalive_interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _tick(self) -> None:
        self._call = None
        limit = self.settings.keepalive_count_max
        if limit and self.unanswered >= limit:  # 0: never drop, as OpenSSH's CountMax 0
            silent = self.unanswered * self.settings.keepalive_interval
            log.warn(
                "{who}: no answer to {n} keepalives in {seconds:.0f}s; dropping the connection",
                who=self.describe(),
                n=self.unanswered,
                seconds=silent,
            )
            tcp = getattr(self.connection.transport, "transport", None)
            if tcp is not None:
                tcp.abortConnection()
            return
        self.unanswered += 1
        d = self.connection.sendGlobalRequest(KEEPALIVE_REQUEST, b"", wantReply=1)
        d.addBoth(self._answered, self.clock.seconds())
        self._call = self.clock.callLater(self.settings.keepalive_interval, self._tick)

    def _answered(self, result: Any, sent: float) -> None:
        # A failure reply (ConchError) is an answer too; a lost connection is not.
        if not isinstance(result, Failure) or result.check(ConchError):
            self.unanswered = 0
            seconds = self.clock.seconds() - sent
            self.round_trips.append(seconds)
            if self.on_round_trip is not None:
                self.on_round_trip(seconds)


class RekeyingTransport:
    """Mixin for Conch's SSH transports: start a key re-exchange by volume or age.

    The transport's ``connection`` (a `FlowControlledConnection`, once the
    ``ssh-connection`` service runs) is paused during any key exchange.
    """

    liveness = Liveness()
    _clock: Any = None
    _bytes_since_kex = 0
    _rekey_call: Any = None
    rekeys = 0  # re-exchanges this end started
    key_exchanges = 0  # completed, the first one included, whichever end started them
    last_key_exchange: float | None = None  # when the latest one completed (the clock's seconds)

    @property
    def rekeys_completed(self) -> int:
        """Key re-exchanges completed after the first exchange, whichever end started them."""
        return max(0, self.key_exchanges - 1)

    def start_rekey_timer(self, clock: Any) -> None:
        self._clock = clock
        self._schedule_rekey()

    def _schedule_rekey(self) -> None:
        if self._rekey_call is not None and self._rekey_call.active():
            self._rekey_call.cancel()
        if self._clock is not None and self.liveness.rekey_interval > 0:
            self._rekey_call = self._clock.callLater(self.liveness.rekey_interval, self.rekey)

    def stop_rekey_timer(self) -> None:
        if self._rekey_call is not None and self._rekey_call.active():
            self._rekey_call.cancel()
        self._rekey_call = None

    def rekey(self) -> None:
        """Start a key re-exchange now, unless one is running."""
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE or not self.isEncrypted("both"):  # type: ignore[attr-defined]
            return
        self.rekeys += 1
        log.info("starting key re-exchange {n}", n=self.rekeys)
        self.sendKexInit()  # type: ignore[attr-defined]

    def _count(self, n: int) -> None:
        self._bytes_since_kex += n
        if self.liveness.rekey_bytes and self._bytes_since_kex >= self.liveness.rekey_bytes:
            self._bytes_since_kex = 0
            self.rekey()

    def _hold_channels(self, held: bool) -> None:
        conn = getattr(self, "service", None)
        budget = getattr(conn, "budget", None)
        if budget is not None:
            budget.rekeying = held
            if not held:
                conn.flush_channels()  # type: ignore[union-attr]

    # Conch hooks

    def sendKexInit(self) -> None:
        super().sendKexInit()  # type: ignore[misc]
        self._hold_channels(True)

    def ssh_KEXINIT(self, packet: bytes) -> Any:
        result = super().ssh_KEXINIT(packet)  # type: ignore[misc]
        self._hold_channels(True)
        return result

    def _newKeys(self) -> None:
        self._bytes_since_kex = 0  # before the queued packets are sent (and counted)
        self.key_exchanges += 1
        if self._clock is not None:
            self.last_key_exchange = self._clock.seconds()
        super()._newKeys()  # type: ignore[misc]
        self._schedule_rekey()
        # Sending the queued packets may have started the next exchange.
        self._hold_channels(self._keyExchangeState != self._KEY_EXCHANGE_NONE)  # type: ignore[attr-defined]

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        super().sendPacket(messageType, payload)  # type: ignore[misc]
        # Not a KEXINIT: sendKexInit marks the exchange started only after
        # sending it, so a rekey() from here would send a second KEXINIT.
        if messageType != MSG_KEXINIT:
            self._count(len(payload))

    def send_parts(self, messageType: int, parts: Any, size: int) -> None:
        super().send_parts(messageType, parts, size)  # type: ignore[misc]
        self._count(size)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)  # type: ignore[misc]
        self._count(len(data))
