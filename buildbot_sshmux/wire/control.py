"""A local control socket: a small JSON-over-HTTP API on a UNIX socket, mode 0600.

The running launcher and the running master each serve one, so that their
command-line tools (``ssh-worker status``, ``buildbot-sshmux status``) can
ask them what they know, and nobody else can: the socket is the owner's
only, and no network port is opened.  ``curl --unix-socket PATH
http://local/status`` works too.

Each route is a function of the request's query arguments that returns a
JSON-able value (or a Deferred of one); a `ControlError` becomes a 400 with
its message.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web import resource, server

from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.wire.quietsite import QuietSite

log = Logger()

MAX_PATH = 100  # sun_path is 108 bytes on Linux, 104 on the BSDs

Route = Callable[[dict[str, str]], Any]


class ControlError(SSHMuxError):
    """A control request that cannot be done; its message is the answer."""


class NotRunning(SSHMuxError):
    """Nothing answers on the control socket."""


class _Routes(resource.Resource):
    isLeaf = True

    def __init__(self, routes: dict[tuple[str, str], Route]) -> None:
        super().__init__()
        self.routes = routes

    def render(self, request: Any) -> Any:
        method = request.method.decode("ascii", "replace")
        name = request.path.decode("utf-8", "replace").strip("/")
        route = self.routes.get((method, name))
        if route is None:
            known = ", ".join(f"{m} /{n}" for m, n in sorted(self.routes))
            return self._answer(request, 404, {"error": f"no {method} /{name}; known: {known}"})
        query = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        d = defer.maybeDeferred(route, query)
        d.addCallback(lambda value: self._answer(request, 200, value))
        d.addErrback(self._failed, request)
        d.addCallback(self._finish, request)
        return server.NOT_DONE_YET

    def _failed(self, failure: Any, request: Any) -> bytes:
        if failure.check(ControlError):
            return self._answer(request, 400, {"error": str(failure.value)})
        log.failure("control request {path} failed", failure, path=request.path)
        return self._answer(request, 500, {"error": "internal error; see the log"})

    @staticmethod
    def _answer(request: Any, code: int, value: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value, indent=1, sort_keys=True).encode() + b"\n"

    @staticmethod
    def _finish(body: bytes, request: Any) -> None:
        if not request.finished and request.channel is not None:
            request.write(body)
            request.finish()


def check_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_PATH:
        raise SSHMuxError(
            f"control socket path {path} is longer than {MAX_PATH} bytes (a UNIX socket limit);"
            " give a shorter one"
        )


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(os.fsencode(path))
        except OSError:
            return False
    return True


def listen(
    reactor: Any, path: Path, routes: dict[tuple[str, str], Route], owner: str
) -> defer.Deferred[IListeningPort]:
    """Serve ``routes`` on ``path`` (0600).  ``owner`` names the process in the
    error when another one already answers there; a stale socket is replaced."""
    check_path(path)
    if path.exists():
        if _answers(path):
            raise SSHMuxError(f"{path}: {owner} is already running here (its control socket answers)")
        path.unlink()
    site = QuietSite(_Routes(routes))
    endpoint = endpoints.UNIXServerEndpoint(reactor, os.fsdecode(path), mode=0o600)
    mask = os.umask(0o177)  # no moment with a wider mode: bind() creates the file
    try:
        return endpoint.listen(site)
    finally:
        os.umask(mask)


class _UNIXConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("local", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(os.fsencode(self.unix_path))


def request(path: Path, method: str, route: str, timeout: float = 10.0, **query: Any) -> Any:
    """Ask the process serving ``path`` (blocking: for command-line tools)."""
    target = "/" + route
    if query:
        target += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    connection = _UNIXConnection(path, timeout)
    try:
        connection.request(method, target)
        response = connection.getresponse()
        body = response.read()
    except FileNotFoundError:
        raise NotRunning(f"nothing is running: no control socket {path}") from None
    except ConnectionRefusedError:
        raise NotRunning(f"nothing is running: {path} is a stale control socket") from None
    except PermissionError:
        raise SSHMuxError(f"{path}: permission denied; run this as the user that runs it") from None
    except TimeoutError:
        raise SSHMuxError(f"{path}: no answer within {timeout:.0f} s") from None
    finally:
        connection.close()
    value = json.loads(body)
    if response.status != 200:
        raise ControlError(value.get("error", f"HTTP {response.status}"))
    return value
