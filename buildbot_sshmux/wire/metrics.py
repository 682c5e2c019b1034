"""Prometheus metrics over HTTP, for the master and the launcher (off unless configured).

Needs ``prometheus_client`` (the ``metrics`` extra: ``pip install
'buildbot-sshmux[metrics]'``); nothing imports it unless metrics are asked
for.  Each service has its own ``CollectorRegistry``, holding one collector
that reads the live state at scrape time.  The page is rendered in the
reactor's thread, where that state lives: `MetricsPage` renders
``generate_latest`` itself instead of ``prometheus_client.twisted.MetricsResource``,
which is a WSGI resource that runs the collectors in a thread of the
reactor's pool.

Where to listen: a port number (``9101``, on 127.0.0.1), ``"HOST:PORT"``
(``"[::1]:9101"`` for IPv6), or a Twisted strports description
(``"tcp:9101:interface=127.0.0.1"``, ``"unix:/run/sshmux/metrics.sock"``).
A ``tcp`` description that names no interface listens on 127.0.0.1 too:
say ``interface=0.0.0.0`` (or ``"0.0.0.0:9101"``) to listen on every
address, where the scraper is on another machine.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource

from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.wire.quietsite import QuietSite

INSTALL_HINT = "pip install 'buildbot-sshmux[metrics]'"
_STRPORTS = re.compile(r"^(tcp6?|unix|ssl|systemd):")


def require() -> None:
    """SSHMuxError, in one sentence, unless prometheus_client can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise SSHMuxError(
            f"metrics are configured but prometheus_client is not installed: {INSTALL_HINT}"
        ) from None


def available() -> bool:
    try:
        require()
    except SSHMuxError:
        return False
    return True


def listen_description(value: int | str) -> str:
    """Where ``value`` says to listen, as a strports description; ValueError if it says nothing usable."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"metrics must be a port number, 'HOST:PORT' or a strports description, not {value!r}"
        )
    text = str(value).strip()
    if _STRPORTS.match(text):
        kind = text.split(":", 1)[0]
        if kind in ("tcp", "tcp6") and "interface=" not in text:
            text += r":interface=\:\:1" if kind == "tcp6" else ":interface=127.0.0.1"
        return text
    host, port = "127.0.0.1", text
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    if not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(
            f"metrics must be a port number, 'HOST:PORT' or a strports description, not {value!r}"
        )
    kind = "tcp6" if ":" in host else "tcp"
    host = host.replace(":", r"\:")
    return f"{kind}:{port}:interface={host}"


class MetricsPage(resource.Resource):
    """``GET /metrics``: the registry in Prometheus's text format, rendered in the reactor's thread."""

    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return bytes(generate_latest(self.registry))


def registry_of(collector: Any) -> Any:
    """A registry of its own holding ``collector`` (two services in one process never collide)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def serve(reactor: Any, description: str, collector: Any) -> Deferred[IListeningPort]:
    """Serve ``collector`` at ``/metrics`` (and ``/``) where ``description`` says."""
    require()
    page = MetricsPage(registry_of(collector))
    root = resource.Resource()
    root.putChild(b"metrics", page)
    root.putChild(b"", page)
    site = QuietSite(root)
    return endpoints.serverFromString(reactor, description).listen(site)
