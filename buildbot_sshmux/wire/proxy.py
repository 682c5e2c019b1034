"""An HTTP CONNECT proxy as a Twisted client endpoint: the SSH connection tunnelled through it.

``http://[user:password@]host:port``: the endpoint connects to the proxy,
asks ``CONNECT master:port`` (with ``Proxy-Authorization: Basic`` when a user
is given), and once the proxy answers 2xx hands the connection to the real
protocol; any other answer fails the connect with `ProxyRefused`, naming the
proxy and its status line (never the password).  Reading the proxy's reply
is bounded (16 KiB) and timed (``timeout``).
"""

from __future__ import annotations

import base64
import os
import urllib.parse
from typing import Any

from attrs import frozen
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

from buildbot_sshmux.errors import SSHMuxError

MAX_REPLY = 16 * 1024


class ProxyRefused(SSHMuxError):
    """The proxy did not open the tunnel (or is not an HTTP proxy)."""


@frozen(repr=False)
class ProxyURL:
    host: str
    port: int
    user: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never the password
        return f"ProxyURL({self.display!r})"

    @property
    def display(self) -> str:
        return f"http://{self.user + ':***@' if self.user else ''}{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """``http://[user:password@]host[:port]`` (port 3128, squid's, by default); ValueError if not."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("proxy must be http://[user:password@]host:port (an HTTP CONNECT proxy)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("proxy must be http://[user:password@]host:port, with nothing after the port")
        try:
            port = parts.port or 3128
        except ValueError:
            raise ValueError("the proxy's port must be a number from 1 to 65535") from None
        user = urllib.parse.unquote(parts.username) if parts.username else None
        password = urllib.parse.unquote(parts.password) if parts.password else None
        return cls(parts.hostname, port, user, password)


def proxy_from_environment(host: str) -> str | None:
    """The proxy the standard variables give for ``host`` (https_proxy, then all_proxy;
    none when no_proxy names it), as curl reads them."""
    env = {k.lower(): v for k, v in os.environ.items() if k.lower().endswith("_proxy")}
    for pattern in (p.strip() for p in env.get("no_proxy", "").split(",")):
        if pattern == "*" or (
            pattern and (host == pattern.lstrip(".") or host.endswith("." + pattern.lstrip(".")))
        ):
            return None
    return env.get("https_proxy") or env.get("all_proxy") or None


class _Tunnel(protocol.Protocol):
    """Speaks CONNECT to the proxy, then becomes a pipe to the real protocol."""

    def __init__(self, factory: _TunnelFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.inner: Any = None

    def connectionMade(self) -> None:
        f = self.factory
        target = f"[{f.host}]:{f.port}" if ":" in f.host else f"{f.host}:{f.port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if f.proxy.user is not None:
            token = base64.b64encode(f"{f.proxy.user}:{f.proxy.password or ''}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())  # type: ignore[union-attr]
        self.timer = f.reactor.callLater(f.timeout, self._refuse, f"no answer within {f.timeout:.0f} s")

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_REPLY:
                self._refuse("its answer is not HTTP (no end of headers in 16 KiB)")
            return
        status_line = self.buffer.split(b"\r\n", 1)[0].decode("latin-1")
        rest = self.buffer[end + 4 :]
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            self._refuse(f"its answer is not HTTP ({status_line[:80]!r})")
            return
        if not parts[1].startswith("2"):
            hint = "; check the user and password in proxy =" if parts[1] in ("401", "407") else ""
            self._refuse(f"it answered {status_line[:120]!r}{hint}")
            return
        if self.timer.active():
            self.timer.cancel()
        self.inner = self.factory.wrapped.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        self.transport.protocol = self.inner  # type: ignore[union-attr]
        self.inner.makeConnection(self.transport)
        self.factory.connected.callback(self.inner)
        if rest:
            self.inner.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        f = self.factory
        if self.timer.active():
            self.timer.cancel()
        if not f.connected.called:
            f.connected.errback(
                ProxyRefused(f"proxy {f.proxy.display} did not open a tunnel to {f.host}:{f.port}: {why}")
            )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
            return
        if getattr(self, "timer", None) is not None and self.timer.active():
            self.timer.cancel()
        f = self.factory
        if not f.connected.called:
            f.connected.errback(
                ProxyRefused(
                    f"proxy {f.proxy.display} closed the connection before opening a tunnel to {f.host}:{f.port}"
                )
            )


class _TunnelFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, endpoint: HTTPConnectEndpoint, wrapped: IProtocolFactory) -> None:
        self.proxy = endpoint.proxy
        self.host, self.port = endpoint.host, endpoint.port
        self.reactor, self.timeout = endpoint.reactor, endpoint.timeout
        self.wrapped = wrapped
        self.connected: defer.Deferred[Any] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> _Tunnel:
        return _Tunnel(self)


@implementer(IStreamClientEndpoint)
class HTTPConnectEndpoint:
    """Connects to ``host:port`` through the HTTP CONNECT proxy ``proxy``."""

    def __init__(self, reactor: Any, proxy: ProxyURL, host: str, port: int, timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        factory = _TunnelFactory(self, protocolFactory)
        to_proxy = endpoints.HostnameEndpoint(
            self.reactor, self.proxy.host, self.proxy.port, timeout=self.timeout
        )
        d = to_proxy.connect(factory)

        def connected_to_proxy(_: Any) -> defer.Deferred[Any]:
            return factory.connected

        def unreachable(failure: Any) -> Any:
            if failure.check(ProxyRefused, defer.CancelledError):
                return failure
            raise ProxyRefused(f"cannot reach proxy {self.proxy.display}: {failure.getErrorMessage()}")

        return d.addCallback(connected_to_proxy).addErrback(unreachable)
