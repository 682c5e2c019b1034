"""A TCP relay between a launcher and a master that the test controls.

The launcher dials the relay; each accepted connection is paired with a fresh
connection to the target and bytes are copied both ways.  The test can:

- ``cut()``: close every relayed connection, both sides, at once (a broken link);
- ``block()`` / ``unblock()``: while blocked, new connections are accepted and
  dropped at once (the master is unreachable), so redials fail;
- ``stall()``: the relayed connections open now silently stop carrying data
  both ways, nothing is closed (a half-open link: a NAT or firewall that
  forgot the flow); connections made afterwards work.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, protocol


class _Outbound(protocol.Protocol):
    """The relay's connection to the target."""

    def __init__(self, inbound: _Inbound) -> None:
        self.inbound = inbound

    def connectionMade(self) -> None:
        self.inbound.paired(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.inbound.stalled:
            self.inbound.transport.write(data)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.inbound.outbound_lost()


class _Inbound(protocol.Protocol):
    """A connection accepted from the launcher."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.outbound: _Outbound | None = None
        self.closed = False
        self.stalled = False

    def connectionMade(self) -> None:
        self.relay.accepted += 1
        if self.relay.blocked:
            self.relay.dropped += 1
            self.transport.abortConnection()
            return
        self.relay.inbound.add(self)
        self.transport.pauseProducing()  # read nothing until the target answers
        factory = protocol.Factory.forProtocol(lambda: _Outbound(self))
        endpoint = endpoints.TCP4ClientEndpoint(self.relay.reactor, *self.relay.target, timeout=10)
        self._connecting = endpoint.connect(factory)
        self._connecting.addErrback(lambda _f: self.close())

    def paired(self, outbound: _Outbound) -> None:
        if self.closed:
            outbound.transport.abortConnection()
            return
        self.outbound = outbound
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is not None and not self.stalled:
            self.outbound.transport.write(data)

    def close(self) -> None:
        """Close both sides at once (no flushing: a cut link)."""
        if self.closed:
            return
        self.closed = True
        self.relay.inbound.discard(self)
        self.transport.abortConnection()
        if self.outbound is not None:
            self.outbound.transport.abortConnection()

    def outbound_lost(self) -> None:
        self.close()

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.closed = True
        self.relay.inbound.discard(self)
        if self.outbound is not None:
            self.outbound.transport.abortConnection()


class Relay:
    """Listens on 127.0.0.1 (port 0), relays every connection to ``target``."""

    def __init__(self, reactor: Any, target_host: str, target_port: int) -> None:
        self.reactor = reactor
        self.target = (target_host, target_port)
        self.inbound: set[_Inbound] = set()
        self.blocked = False
        self.accepted = 0
        self.dropped = 0
        self.cuts = 0
        self._port: Any = None

    @property
    def port(self) -> int:
        assert self._port is not None, "the relay is not listening"
        return int(self._port.getHost().port)

    @property
    def active(self) -> int:
        """Relayed connections open now."""
        return len(self.inbound)

    async def start(self) -> int:
        endpoint = endpoints.TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(protocol.Factory.forProtocol(lambda: _Inbound(self)))
        return self.port

    async def stop(self) -> None:
        self.cut()
        if self._port is not None:
            port, self._port = self._port, None
            await defer.maybeDeferred(port.stopListening)

    def cut(self) -> int:
        """Close every relayed connection, both sides; return how many were cut."""
        victims = list(self.inbound)
        for conn in victims:
            conn.close()
        self.cuts += len(victims)
        return len(victims)

    def block(self) -> None:
        self.blocked = True

    def unblock(self) -> None:
        self.blocked = False

    def stall(self) -> int:
        """Drop every byte of the connections open now, both ways, closing nothing;
        return how many were stalled.  Reading goes on, so a close is still seen."""
        victims = [conn for conn in self.inbound if not conn.stalled]
        for conn in victims:
            conn.stalled = True
        return len(victims)
