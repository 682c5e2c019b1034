"""A TCP relay that delays every byte by a fixed time each way: a long link.

Only latency is emulated (no bandwidth limit, no loss), and the relay reads
all it is given, so a TCP sender is never held back by it: what limits a
transport through it is its own flow control, e.g. an SSH channel's window
(one window a round trip).  This kernel has no netem, hence a relay.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, protocol


class _Half(protocol.Protocol):
    """One side of a relayed connection; what it reads reaches the other side later."""

    def __init__(self, relay: DelayRelay) -> None:
        self.relay = relay
        self.other: _Half | None = None
        self.pending: list[bytes] = []  # read before the other side connected
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.relay.reactor.callLater(self.relay.delay, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if self.other is None:
            self.pending.append(data)
        elif not self.other.closed:
            self.other.transport.write(data)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.closed = True
        other = self.other
        if other is not None and not other.closed:
            self.relay.reactor.callLater(self.relay.delay, other.transport.loseConnection)


class DelayRelay:
    """Listens on 127.0.0.1; relays each connection to ``target_port``, ``delay`` seconds each way."""

    def __init__(self, reactor: Any, target_port: int, delay: float) -> None:
        self.reactor = reactor
        self.target_port = target_port
        self.delay = delay
        self._port: Any = None

    async def start(self) -> int:
        self._port = self.reactor.listenTCP(
            0, protocol.Factory.forProtocol(self._accepted), interface="127.0.0.1"
        )
        return int(self._port.getHost().port)

    def _accepted(self) -> _Half:
        inbound = _Half(self)
        outbound = _Half(self)
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.target_port)
        connected = endpoint.connect(protocol.Factory.forProtocol(lambda: outbound))

        def paired(_: Any) -> None:
            inbound.other, outbound.other = outbound, inbound
            for half in (inbound, outbound):
                for data in half.pending:
                    half.other.transport.write(data)  # type: ignore[union-attr]
                half.pending.clear()

        connected.addCallbacks(paired, lambda _f: inbound.transport.loseConnection())
        return inbound

    async def stop(self) -> None:
        if self._port is not None:
            await defer.maybeDeferred(self._port.stopListening)
