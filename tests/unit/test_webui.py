"""`buildbot_sshmux.master.webui`: the WSGI app of the SSH hosts page, called as Buildbot's
wsgi_dashboards plugin calls it (from a thread of the reactor's pool).

The status comes from a stand-in service; the worker ids from a stand-in
worker manager; ``www['authz']`` is Buildbot's own `Authz` with a session
token made by Buildbot's own `BuildbotSite`.  The page itself, in a browser
against a real master, is tests/integration/test_webui.py.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.webui import StatusApp, dashboard, session_token

STATUS = {
    "version": 1,
    "hosts": [
        {
            "name": "hosta",
            "sessions": [
                {"worker": "alpha-hosta", "state": "attached", "reason": None, "ago_s": None},
                {"worker": "nobody-hosta", "state": "refused", "reason": "bad_credentials", "ago_s": 3.0},
                {"worker": None, "state": "logging in", "reason": None, "ago_s": None},
            ],
        }
    ],
    "not_connected": [],
}


class FakeService:
    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def status(self) -> dict[str, Any]:
        self.threads.append(threading.current_thread())
        return json.loads(json.dumps(STATUS))  # a fresh copy, as status() makes one


def fake_master(service: Any = None, www: Any = None) -> Any:
    services = {"sshmux": service} if service is not None else {}
    return SimpleNamespace(
        reactor=reactor,
        service_manager=SimpleNamespace(namedServices=services),
        workers=SimpleNamespace(workers={"alpha-hosta": SimpleNamespace(workerid=7)}),
        www=www,
    )


def configured(master: Any, **kwargs: Any) -> StatusApp:
    """The app as buildbot_wsgi_dashboards leaves it: ``app.buildbot_api.master``."""
    app = dashboard(**kwargs)["app"]
    app.buildbot_api = SimpleNamespace(master=master)
    return app


def call(app: StatusApp, path: str, method: str = "GET", **environ: Any) -> tuple[str, dict[str, str], bytes]:
    """One request through the WSGI interface; (status line, headers, body)."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        started.append((status, dict(headers)))

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method, **environ}, start_response))
    status, headers = started[0]
    assert int(headers["Content-Length"]) == len(body)
    return status, headers, body


class DashboardTests(TestCase):
    def test_the_entry_of_wsgi_dashboards(self) -> None:
        entry = dashboard()
        self.assertEqual(
            {k: v for k, v in entry.items() if k != "app"},
            {"name": "sshmux", "caption": "SSH hosts", "order": 20, "icon": "server"},
        )
        app = entry["app"]
        self.assertIsInstance(app, StatusApp)
        self.assertEqual((app.service_name, app.refresh), ("sshmux", 5.0))
        # What Buildbot's UI receives of the app in /config: nothing of the master.
        self.assertEqual(app.getConfigDict(), {"service": "sshmux", "refresh": 5.0})

    def test_bad_arguments(self) -> None:
        for bad in (0, -1, "5", None):
            with self.assertRaisesRegex(ValueError, "refresh must be"):
                dashboard(refresh=bad)  # type: ignore[arg-type]
        for bad in ("", "a/b"):
            with self.assertRaisesRegex(ValueError, "one path segment"):
                dashboard(name=bad)


class PageTests(TestCase):
    def test_index_is_a_frame_of_the_page(self) -> None:
        # Buildbot's UI inserts index.html as HTML, where scripts do not run.
        app = configured(fake_master(), name="ssh")
        for path in ("/index.html", "/", ""):
            status, headers, body = call(app, path)
            self.assertEqual(status, "200 OK")
            self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
            self.assertIn(b'<iframe class="sshmux-status" src="plugins/wsgi_dashboards/ssh/page.html"', body)
            self.assertNotIn(b"<script", body)

    def test_page_holds_its_refresh_and_builds_with_the_dom(self) -> None:
        status, headers, body = call(configured(fake_master(), refresh=2.5), "/page.html")
        self.assertEqual(status, "200 OK")
        page = body.decode()
        self.assertIn('<body data-refresh="2.5">', page)
        self.assertIn('fetch("status.json"', page)
        self.assertIn('new URL("../../../", window.location.href)', page)  # Buildbot's UI, from the page
        self.assertNotIn("innerHTML", page)  # names and addresses go in as text, never as HTML
        self.assertEqual(headers["Cache-Control"], "no-store")

    def test_other_paths_and_methods(self) -> None:
        app = configured(fake_master())
        self.assertEqual(call(app, "/nothing")[0], "404 Not Found")
        self.assertEqual(call(app, "/../index.html")[0], "404 Not Found")
        status, headers, _ = call(app, "/status.json", method="POST")
        self.assertEqual((status, headers["Allow"]), ("405 Method Not Allowed", "GET, HEAD"))

    def test_status_without_buildbot(self) -> None:
        status, _, body = call(dashboard()["app"], "/status.json")
        self.assertEqual(status, "503 Service Unavailable")
        self.assertIn("wsgi_dashboards", json.loads(body)["error"])


class StatusJSONTests(TestCase):
    """status.json: asked from a pool thread, answered in the reactor thread."""

    def get(self, app: StatusApp, **environ: Any) -> defer.Deferred[tuple[str, dict[str, str], bytes]]:
        return threads.deferToThread(call, app, "/status.json", **environ)

    @defer.inlineCallbacks
    def test_status_with_worker_ids_built_in_the_reactor_thread(self) -> Any:
        service = FakeService()
        status, headers, body = yield self.get(configured(fake_master(service), refresh=1))
        self.assertEqual(status, "200 OK")
        self.assertEqual(headers["Content-Type"], "application/json; charset=utf-8")
        self.assertEqual(service.threads, [threading.main_thread()])  # the reactor's, not the pool's
        got = json.loads(body)
        self.assertEqual(got["version"], 1)
        self.assertEqual(got["refresh"], 1.0)
        ids = [(s["worker"], s["workerid"]) for s in got["hosts"][0]["sessions"]]
        self.assertEqual(ids, [("alpha-hosta", 7), ("nobody-hosta", None), (None, None)])

    @defer.inlineCallbacks
    def test_no_such_service(self) -> Any:
        status, _, body = yield self.get(configured(fake_master(FakeService()), service_name="other"))
        self.assertEqual(status, "503 Service Unavailable")
        self.assertEqual(json.loads(body)["error"],
                         "this master has no SSHMuxService named 'other' in c['services']")  # fmt: skip

    @defer.inlineCallbacks
    def test_a_failing_status_is_a_500_and_a_log_line(self) -> Any:
        class Broken:
            def status(self) -> dict[str, Any]:
                raise RuntimeError("boom")

        status, _, body = yield self.get(configured(fake_master(Broken())))
        self.assertEqual(status, "500 Internal Server Error")
        self.assertNotIn("boom", json.loads(body)["error"])  # the log has it, not the page
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class AuthzTests(TestCase):
    """Only those who may read Buildbot's workers endpoint get status.json."""

    def setUp(self) -> None:
        from buildbot.www import authz
        from buildbot.www.authz import roles
        from buildbot.www.authz.endpointmatchers import AnyEndpointMatcher
        from buildbot.www.service import BuildbotSite
        from twisted.web.resource import Resource

        self.site = BuildbotSite(Resource(), logPath=None, rotateLength=1, maxRotatedFiles=1)
        self.site.setSessionSecret("s" * 32)
        rules = authz.Authz(
            allowRules=[AnyEndpointMatcher(role="admins", defaultDeny=True)],
            roleMatchers=[roles.RolesFromUsername(roles=["admins"], usernames=["alice"])],
        )
        master = fake_master(FakeService(), www=SimpleNamespace(authz=rules, site=self.site))
        rules.setMaster(master)
        self.app = configured(master)

    def token(self, username: str) -> str:
        from buildbot.www.service import BuildbotSession

        session = BuildbotSession(self.site)
        session.user_info = {"username": username}
        return session.uid

    @defer.inlineCallbacks
    def test_anonymous_and_others_are_refused(self) -> Any:
        for cookie in ("", f"TWISTED_SESSION={self.token('bob')}", "TWISTED_SESSION=; x=1"):
            status, _, body = yield threads.deferToThread(call, self.app, "/status.json", HTTP_COOKIE=cookie)
            self.assertEqual(status, "403 Forbidden", cookie)
            self.assertIn("error", json.loads(body))
        # The page itself holds no data: it is served to anyone, and says 403 where it asks.
        self.assertEqual(call(self.app, "/page.html")[0], "200 OK")

    @defer.inlineCallbacks
    def test_a_user_allowed_by_authz(self) -> Any:
        cookie = f"other=1; TWISTED_SESSION={self.token('alice')}"
        status, _, body = yield threads.deferToThread(call, self.app, "/status.json", HTTP_COOKIE=cookie)
        self.assertEqual(status, "200 OK")
        self.assertEqual(json.loads(body)["hosts"][0]["name"], "hosta")
        # Over https Twisted names the cookie TWISTED_SECURE_SESSION.
        status, _, _ = yield threads.deferToThread(
            call, self.app, "/status.json", HTTP_COOKIE=cookie, **{"wsgi.url_scheme": "https"}
        )
        self.assertEqual(status, "403 Forbidden")

    def test_session_token(self) -> None:
        self.assertEqual(session_token({"HTTP_COOKIE": "a=1; TWISTED_SESSION=abc.def"}), "abc.def")
        self.assertIsNone(session_token({"HTTP_COOKIE": "TWISTED_SESSION=abc", "wsgi.url_scheme": "https"}))
        self.assertEqual(
            session_token({"HTTP_COOKIE": "TWISTED_SECURE_SESSION=x", "wsgi.url_scheme": "https"}), "x"
        )
        self.assertIsNone(session_token({}))
