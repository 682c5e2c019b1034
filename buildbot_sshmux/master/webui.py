"""A page in Buildbot's web UI: the SSH server's hosts and sessions, refreshed as it runs.

In ``master.cfg`` (with ``buildbot-www`` and ``buildbot-wsgi-dashboards``
installed, as the ``master`` extra brings them)::

    from buildbot_sshmux.master.webui import dashboard
    c['www'] = {'port': 8010,
                'plugins': {'wsgi_dashboards': [dashboard()]}}

The menu gains "SSH hosts"; its page (``#/sshmux``) shows what
``buildbot-sshmux status`` shows: each connected host with its key, address,
algorithms, traffic, keepalive round trip, rekeys and refusals, its sessions
each linked to its worker's page, then the authorized hosts not connected.
It asks the master again every ``refresh`` seconds, without a reload.

The app answers three paths under ``plugins/wsgi_dashboards/NAME/``:

``index.html``
    what Buildbot's UI puts into its page.  The UI inserts it as HTML, where
    no script runs, so it is a frame holding ``page.html``.
``page.html``
    the table and the script that fills it (it also works on its own).
``status.json``
    `SSHMuxService.status` (see its docstring), each session with its
    ``workerid`` added (None where Buildbot has no such worker), and
    ``refresh`` (seconds).  Only those who may read Buildbot's ``workers``
    endpoint (``www['authz']``, as ``/api/v2/workers``) get it: 403 otherwise.

Buildbot runs a WSGI app in the reactor's thread pool, while the SSH
server's connections change in the reactor thread: ``status.json`` is built
and encoded in the reactor thread (`blockingCallFromThread`), so no thread
reads a connection the reactor is changing; the pool's thread only waits.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import Any, cast

from buildbot.interfaces import IConfigured
from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

DEFAULT_NAME = "sshmux"
DEFAULT_REFRESH = 5.0
PAGE = "webui.html"  # beside this module

StartResponse = Callable[..., Any]


def dashboard(
    service_name: str = "sshmux",
    *,
    name: str = DEFAULT_NAME,
    caption: str = "SSH hosts",
    order: int = 20,
    icon: str = "server",
    refresh: float = DEFAULT_REFRESH,
) -> dict[str, Any]:
    """An entry of ``c['www']['plugins']['wsgi_dashboards']``: the page of the `SSHMuxService`
    named ``service_name`` (its ``name``, "sshmux" unless set), at ``#/NAME``.

    ``icon`` names a Font Awesome icon, as Buildbot's docs say (buildbot-wsgi-dashboards
    4.2 and 4.3 look it up wrongly and show their default icon whatever the name);
    ``refresh`` is the seconds between two questions of the page.
    """
    if not isinstance(refresh, (int, float)) or refresh <= 0:
        raise ValueError(f"refresh must be a number of seconds > 0, not {refresh!r}")
    if not name or "/" in name:
        raise ValueError(f"name must be one path segment, not {name!r}")
    return {
        "name": name,
        "caption": caption,
        "app": StatusApp(service_name, refresh=float(refresh), name=name),
        "order": order,
        "icon": icon,
    }


@implementer(IConfigured)
class StatusApp:
    """The WSGI app of `dashboard`; Buildbot's wsgi_dashboards plugin sets ``buildbot_api``."""

    def __init__(self, service_name: str, *, refresh: float = DEFAULT_REFRESH, name: str = DEFAULT_NAME):
        self.service_name = service_name
        self.refresh = refresh
        self.name = name
        self.buildbot_api: Any = None  # buildbot_wsgi_dashboards' Application (its .master)

    def getConfigDict(self) -> dict[str, Any]:
        """What Buildbot's UI receives of this app in its config (nothing of the master)."""
        return {"service": self.service_name, "refresh": self.refresh}

    # -- WSGI, in a thread of the reactor's pool --------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path in ("", "/"):
            path = "/index.html"
        if path not in ("/index.html", "/page.html", "/status.json"):
            return respond(start_response, "404 Not Found", "text/plain", b"not found\n")
        if method not in ("GET", "HEAD"):
            return respond(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n",
                           [("Allow", "GET, HEAD")])  # fmt: skip
        if path == "/index.html":
            return respond(start_response, "200 OK", "text/html", self.frame())
        if path == "/page.html":
            return respond(start_response, "200 OK", "text/html", self.page())
        master = getattr(self.buildbot_api, "master", None)
        if master is None:
            return respond(
                start_response,
                "503 Service Unavailable",
                "application/json",
                error_body("this page is served through c['www']['plugins']['wsgi_dashboards'] only"),
            )
        try:
            answer = blockingCallFromThread(master.reactor, self.snapshot, master, environ)
            status, body = cast(tuple[str, bytes], answer)
        except Exception:
            log.failure("SSH hosts page: status.json failed")
            status, body = "500 Internal Server Error", error_body("the master could not answer; see its log")
        return respond(start_response, status, "application/json", body)

    # -- the pages ---------------------------------------------------------------

    def frame(self) -> bytes:
        """The fragment Buildbot's UI inserts at ``#/NAME`` (relative to the UI's root)."""
        src = html.escape(f"plugins/wsgi_dashboards/{self.name}/page.html")
        return (
            f'<iframe class="sshmux-status" src="{src}" title="SSH worker hosts"'
            ' style="width:100%;min-height:420px;border:0;display:block"></iframe>\n'
        ).encode()

    def page(self) -> bytes:
        text = resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8")
        return text.replace("{{refresh}}", html.escape(repr(self.refresh))).encode()

    # -- status.json, in the reactor thread ----------------------------------------

    @defer.inlineCallbacks
    def snapshot(self, master: Any, environ: dict[str, Any]) -> Any:
        """(HTTP status line, JSON bytes) of the service's status now; run in the reactor thread."""
        allowed = yield may_read_workers(master, environ)
        if not allowed:
            return "403 Forbidden", error_body("you may not read Buildbot's workers here")
        service = master.service_manager.namedServices.get(self.service_name)
        if service is None or not callable(getattr(service, "status", None)):
            return "503 Service Unavailable", error_body(
                f"this master has no SSHMuxService named {self.service_name!r} in c['services']"
            )
        status = service.status()
        status["refresh"] = self.refresh
        add_worker_ids(status, master)
        return "200 OK", json.dumps(status).encode()


def add_worker_ids(status: dict[str, Any], master: Any) -> None:
    """Each session's ``workerid``: its worker's id in Buildbot (its page is ``#/workers/ID``)."""
    workers = master.workers.workers
    for host in status["hosts"]:
        for session in host["sessions"]:
            worker = workers.get(session["worker"]) if session["worker"] is not None else None
            session["workerid"] = getattr(worker, "workerid", None)


def session_token(environ: dict[str, Any]) -> str | None:
    """The Buildbot session's token (a JWT) in the request's cookies, as Twisted names it."""
    secure = environ.get("wsgi.url_scheme") == "https"
    cookie_name = "TWISTED_SECURE_SESSION" if secure else "TWISTED_SESSION"  # Buildbot's site: no sitepath
    try:
        cookies = SimpleCookie(environ.get("HTTP_COOKIE", ""))
    except CookieError:
        return None
    morsel = cookies.get(cookie_name)
    return (morsel.value or None) if morsel is not None else None


@defer.inlineCallbacks
def may_read_workers(master: Any, environ: dict[str, Any]) -> Any:
    """Whether this request's user may GET Buildbot's ``workers`` endpoint (``www['authz']``)."""
    from buildbot.www.authz import Forbidden

    www = getattr(master, "www", None)
    authz = getattr(www, "authz", None)
    if authz is None:
        return True
    user_info: dict[str, Any] = {"anonymous": True}  # Buildbot's session of no one (4.2 and 4.3)
    token = session_token(environ)
    site = getattr(www, "site", None)
    if token is not None and site is not None and site.session_secret is not None:
        try:  # as Twisted's Request.getSession: an expired or bad token is no session
            user_info = site.getSession(token).user_info
        except KeyError:
            pass
    try:
        yield authz.assertUserAllowed(("workers",), "get", {}, user_info)
    except Forbidden:
        return False
    return True


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def respond(
    start_response: StartResponse,
    status: str,
    content_type: str,
    body: bytes,
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    start_response(
        status,
        [
            ("Content-Type", f"{content_type}; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *headers,
        ],
    )
    return [body]
