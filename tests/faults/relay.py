"""A TCP relay that plays a broken network between a launcher and a master.

``tests/integration/relay.py`` cuts links (both sides closed at once) and can
refuse new ones.  The fault suite also needs links that go silent without a
FIN, which that relay cannot play, so this one adds:

- ``blackhole()`` / ``restore()``: nothing crosses the link either way and no
  close crosses it either.  What each side sends meanwhile waits in the relay
  and is delivered on ``restore()``, as TCP would retransmit it once the path
  is back; a side that closed during the blackhole (a keepalive gave up) leaves
  its peer a dead half, aborted on ``restore()`` as the peer's next packet
  would be answered by a RST.  A connection accepted during the blackhole
  reaches the master only on ``restore()`` (its SYN was "delayed").
- ``half_open``: when the launcher's side closes (a SIGKILL, a host that lost
  power), the master's side stays open and silent, and what the master sends
  is dropped: the master sees nothing until its keepalive or a newer
  connection from the same host says otherwise.
- ``cut()``: abort both sides of every relayed connection at once.

Every open and close is recorded with the reactor's time in ``events``, so a
test can say when each side noticed a fault.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer, endpoints, protocol

LAUNCHER, MASTER = "launcher", "master"


class _Side(protocol.Protocol):
    def __init__(self, pair: _Pair, name: str) -> None:
        self.pair = pair
        self.name = name
        self.gone = False

    def connectionMade(self) -> None:
        self.pair.side_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.pair.data_from(self, data)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.gone = True
        self.pair.side_lost(self)


class _Pair:
    """One relayed connection: the launcher's side and the master's side."""

    def __init__(self, relay: FaultRelay, ident: int) -> None:
        self.relay = relay
        self.id = ident
        self.launcher: _Side | None = None
        self.master: _Side | None = None
        self.dialled = False
        self.queued: dict[str, list[bytes]] = {LAUNCHER: [], MASTER: []}  # bytes waiting to go TO that side
        self.closed = False

    def other(self, side: _Side) -> _Side | None:
        return self.master if side.name == LAUNCHER else self.launcher

    def side_made(self, side: _Side) -> None:
        self.relay.record(f"{side.name} side open", self.id)
        if side.name == LAUNCHER:
            self.launcher = side
            if not self.relay.blackholed:
                self.dial()
        else:
            if self.closed or self.launcher is None or self.launcher.gone:
                side.transport.abortConnection()
                return
            self.master = side
            self.flush()

    def dial(self) -> None:
        if self.dialled:
            return
        self.dialled = True
        factory = protocol.Factory.forProtocol(lambda: _Side(self, MASTER))
        endpoint = endpoints.TCP4ClientEndpoint(self.relay.reactor, *self.relay.target, timeout=10)
        d = endpoint.connect(factory)
        d.addErrback(lambda _f: self.abort())

    def data_from(self, side: _Side, data: bytes) -> None:
        to = self.other(side)
        to_name = MASTER if side.name == LAUNCHER else LAUNCHER
        if self.relay.blackholed or to is None and not self.closed and side.name == LAUNCHER:
            self.queued[to_name].append(data)
            self.relay.held_bytes += len(data)
        elif to is not None and not to.gone:
            to.transport.write(data)
        else:
            self.relay.dropped_bytes += len(data)  # the other side is gone: nobody to hear it

    def flush(self) -> None:
        if self.relay.blackholed:
            return
        for name, side in ((MASTER, self.master), (LAUNCHER, self.launcher)):
            if side is not None and not side.gone and self.queued[name]:
                side.transport.write(b"".join(self.queued[name]))
            self.queued[name] = []

    def side_lost(self, side: _Side) -> None:
        self.relay.record(f"{side.name} side closed", self.id)
        if self.relay.blackholed:
            return  # the close does not cross a blackhole
        if side.name == LAUNCHER and self.relay.half_open:
            return  # the master's side stays open, unaware
        self.close()

    def close(self) -> None:
        """Close (with FIN) what is still open, once its queue is written."""
        if self.closed:
            return
        self.closed = True
        self.relay.pairs.discard(self)
        self.flush()
        for side in (self.launcher, self.master):
            if side is not None and not side.gone:
                side.transport.loseConnection()

    def abort(self) -> None:
        """Close both sides now, without flushing (a RST)."""
        self.closed = True
        self.relay.pairs.discard(self)
        for side in (self.launcher, self.master):
            if side is not None and not side.gone:
                side.transport.abortConnection()

    def restore(self) -> None:
        if (
            self.launcher is None
            or self.launcher.gone
            or (self.dialled and (self.master is None or self.master.gone))
        ):
            if self.master is not None or self.launcher is not None:
                self.abort()  # one side closed during the blackhole: the other half is dead
            return
        if not self.dialled:
            self.dial()  # accepted during the blackhole: its "SYN" gets through now
        else:
            self.flush()


class FaultRelay:
    """Listens on 127.0.0.1 (port 0) and relays every connection to ``target``."""

    def __init__(self, reactor: Any, target_host: str, target_port: int) -> None:
        self.reactor = reactor
        self.target = (target_host, target_port)
        self.pairs: set[_Pair] = set()
        self.blackholed = False
        self.half_open = False
        self.accepted = 0
        self.held_bytes = 0
        self.dropped_bytes = 0
        self.events: list[tuple[float, str, int]] = []
        self._ids = itertools.count(1)
        self._port: Any = None

    def record(self, what: str, ident: int) -> None:
        self.events.append((float(self.reactor.seconds()), what, ident))

    def first(self, what: str, after: float = 0.0) -> float | None:
        """The time of the first event ``what`` at or after ``after``."""
        return next((t for t, w, _i in self.events if w == what and t >= after), None)

    @property
    def port(self) -> int:
        assert self._port is not None, "the relay is not listening"
        return int(self._port.getHost().port)

    @property
    def active(self) -> int:
        return len(self.pairs)

    def retarget(self, port: int) -> None:
        self.target = (self.target[0], port)

    async def start(self) -> int:
        def build() -> _Side:
            pair = _Pair(self, next(self._ids))
            self.pairs.add(pair)
            self.accepted += 1
            return _Side(pair, LAUNCHER)

        endpoint = endpoints.TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(protocol.Factory.forProtocol(build))
        return self.port

    async def stop(self) -> None:
        self.blackholed = False
        self.half_open = False
        self.cut()
        if self._port is not None:
            port, self._port = self._port, None
            await defer.maybeDeferred(port.stopListening)

    def cut(self) -> int:
        """Abort every relayed connection, both sides; return how many."""
        victims = list(self.pairs)
        for pair in victims:
            pair.abort()
        return len(victims)

    def blackhole(self) -> None:
        self.blackholed = True

    def restore(self) -> None:
        self.blackholed = False
        for pair in list(self.pairs):
            pair.restore()
