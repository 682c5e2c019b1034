"""Forward mode: unmodified ``buildbot-worker`` processes through the launcher.

A forward is a local TCP listener (127.0.0.1 unless the config names another
address); every connection it accepts becomes one channel on the host's
shared SSH connection to the master's PB port, byte for byte, so a stock
worker whose ``buildbot.tac`` names ``localhost:PORT`` runs unchanged.  The
master applies the host's ``workers=`` to it as to a launcher session.
Twisted's own port forwarder does the relaying, with flow control both ways.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols import portforward

log = Logger()


class _ToMaster(portforward.ProxyClientFactory):
    noisy = False  # no "Starting factory" line for every connection


class ForwardedConnection(portforward.Proxy):
    """One accepted connection, relayed over a channel to the master."""

    factory: Any  # Forward
    transport: Any

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # until the channel is open
        self.factory.active += 1
        to_master = _ToMaster()
        to_master.setServer(self)
        peer: Any = self.transport.getPeer()
        d = self.factory.endpoint.connect(to_master)

        def refused(failure: Any) -> None:
            log.warn(
                "forward {listen}: the connection from {peer} got no channel ({why}); closed",
                listen=self.factory.description,
                peer=f"{peer.host}:{peer.port}",
                why=failure.getErrorMessage(),
            )
            self.transport.loseConnection()

        d.addErrback(refused)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.active -= 1
        super().connectionLost(reason)


class Forward(protocol.Factory):
    """A listener whose connections go over ``endpoint`` (a channel to the master)."""

    protocol = ForwardedConnection  # type: ignore[assignment]
    noisy = False

    def __init__(self, endpoint: IStreamClientEndpoint, description: str) -> None:
        self.endpoint = endpoint
        self.description = description
        self.active = 0  # connections open now


class ForwardService(service.Service):
    """Listens on ``listen`` (a Twisted strports description) while running."""

    def __init__(self, reactor: Any, listen: str, forward: Forward) -> None:
        self.reactor = reactor
        self.listen = listen
        self.forward = forward
        self.port: IListeningPort | None = None

    @defer.inlineCallbacks
    def startService(self) -> Any:
        super().startService()
        try:
            self.port = yield endpoints.serverFromString(self.reactor, self.listen).listen(self.forward)
        except CannotListenError as e:
            log.error(
                "forward {listen}: cannot listen ({error}); change listen in the config and reload",
                listen=self.forward.description,
                error=e.socketError,
            )
            return
        log.info(
            "forward {listen}: listening for buildbot-worker connections", listen=self.forward.description
        )

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else None
