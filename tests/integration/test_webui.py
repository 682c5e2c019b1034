"""The SSH hosts page in Buildbot's web UI, in a real browser, against a real master.

A master with its web UI (``buildbot-www``) and the page as a WSGI dashboard
(`buildbot_sshmux.master.webui.dashboard`), two launchers; headless Chromium
(Debian's ``chromium``, driven through Debian's ``chromium-driver`` by
Selenium) opens Buildbot's UI at ``#/sshmux``, sees both hosts and their
sessions, each linking to its worker's page; one launcher stops and the page,
never reloaded, shows that host as not connected; a session's link opens its
worker's page.  The browser is driven from a thread (`threads.deferToThread`):
the master runs on this reactor and must go on serving meanwhile.

``SSHMUX_WEBUI_SCREENSHOT=PATH`` copies the screenshot there (the README's
``docs/webui.png`` comes from such a run).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads

from buildbot_sshmux.demo import harness as T
from tests import support as S

from .test_launcher import LauncherTestCase, figures, names_for

PROJECTS = ["alpha", "beta", "gamma"]
HOSTS = ["hosta", "hostb", "hostc"]  # hostc is authorized and never connects
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Known to work as root in a container, with no network beyond this machine.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,900",
]
REFRESH = 1.0  # seconds between two questions of the page


def missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} missing: apt-get install chromium chromium-driver (.ci/run does)"
    for module, package in (
        ("selenium", "selenium"),
        ("buildbot_www", "buildbot-www"),
        ("buildbot_wsgi_dashboards", "buildbot-wsgi-dashboards"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"Python package {package} missing (pip install -e '.[test]')"
    return None


class Browser:
    """Headless Chromium through Selenium; every method blocks: call it from a thread."""

    def __init__(self, profile: Path, log_path: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        service = Service(executable_path=CHROMEDRIVER, log_output=str(log_path))
        self.driver = webdriver.Chrome(options=options, service=service)

    def quit(self) -> None:
        self.driver.quit()

    def until(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Poll ``check()`` until it is truthy; its value (AssertionError with ``what`` after timeout)."""
        from selenium.common.exceptions import WebDriverException

        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = check()
                if value:
                    return value
            except WebDriverException as e:  # a frame or row replaced while read
                error = e
            time.sleep(0.1)
        raise AssertionError(f"the browser gave up after {timeout:.0f}s waiting for {what} ({error})")

    def open_dashboard(self, url: str, timeout: float) -> dict[str, Any]:
        """Open Buildbot's UI at the page; its menu entry and the frame's URL."""
        from selenium.webdriver.common.by import By

        d = self.driver
        d.get(url)
        frames = self.until(
            "the page's frame", lambda: d.find_elements(By.CSS_SELECTOR, "iframe.sshmux-status"), timeout
        )
        menu = [e.text for e in d.find_elements(By.CSS_SELECTOR, "a, span") if e.text == "SSH hosts"]
        return {"menu": menu, "frame_src": frames[0].get_attribute("src")}

    def in_frame(self) -> None:
        from selenium.webdriver.common.by import By

        d = self.driver
        d.switch_to.default_content()
        d.switch_to.frame(d.find_element(By.CSS_SELECTOR, "iframe.sshmux-status"))

    def tables(self) -> dict[str, Any]:
        """What the page shows now: connected hosts with their sessions, the others, the footer."""
        self.in_frame()
        return self.driver.execute_script(
            """
            const rows = sel => Array.from(document.querySelectorAll(sel));
            return {
              connected: rows("#hosts tr.host").map(tr => ({
                host: tr.dataset.host,
                text: tr.innerText,
                sessions: Array.from(tr.querySelectorAll(".session")).map(s => {
                  const a = s.querySelector("a.worker");
                  return {worker: s.dataset.worker, state: s.dataset.state,
                          href: a ? a.href : null, target: a ? a.target : null};
                }),
              })),
              absent: rows("#not-connected tr.absent").map(tr => tr.dataset.host),
              footer: document.getElementById("footer").textContent,
              summary: document.getElementById("summary").textContent,
              stale: document.body.classList.contains("stale"),
              loaded_at: performance.timeOrigin,
            };
            """
        )

    def wait_tables(
        self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """The tables, once ``predicate`` holds of them."""

        def check() -> dict[str, Any] | None:
            tables = self.tables()
            return tables if predicate(tables) else None

        return self.until(what, check, timeout)

    def screenshot(self, path: Path) -> None:
        """The window, as tall as the UI with the page's frame (which fits its page)."""
        d = self.driver
        d.switch_to.default_content()
        bottom, chrome = d.execute_script(
            "return [document.querySelector('iframe.sshmux-status').getBoundingClientRect().bottom,"
            " window.outerHeight - window.innerHeight]"
        )
        d.set_window_size(1440, int(bottom + chrome + 24))
        time.sleep(0.5)
        d.save_screenshot(str(path))

    def follow_worker_link(self, worker: str, timeout: float) -> dict[str, Any]:
        """Click ``worker``'s link in the page; the UI's URL and text once the worker page shows it."""
        from selenium.webdriver.common.by import By

        self.in_frame()
        link = self.driver.find_element(By.CSS_SELECTOR, f'.session[data-worker="{worker}"] a.worker')
        link.click()
        d = self.driver
        d.switch_to.default_content()

        def worker_page() -> bool:
            return (
                "#/workers/" in d.current_url
                and not d.find_elements(By.CSS_SELECTOR, "iframe.sshmux-status")
                and worker in d.find_element(By.TAG_NAME, "body").text
            )

        self.until(f"{worker}'s page", worker_page, timeout)
        return {"url": d.current_url, "text": d.find_element(By.TAG_NAME, "body").text}


class WebUITests(LauncherTestCase):
    timeout = 240

    def setUp(self) -> None:
        reason = missing()
        if reason is not None:
            self.skipTest(reason)
        super().setUp()

    async def start_master_with_www(self, projects: Sequence[str], hosts: Sequence[str]) -> Any:
        from buildbot_sshmux.master.webui import dashboard

        config = T.master_config(projects, hosts, self.site, service={"keepalive_interval": 1})
        # tcp:0 on 127.0.0.1 exactly: Buildbot's WWWService then keeps the port (getPortnum).
        config["www"] = {
            "port": "tcp:0:interface=127.0.0.1",
            "plugins": {"wsgi_dashboards": [dashboard(refresh=REFRESH)]},
        }
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.stop_master(master)))
        self.master = master
        return master

    async def browser(self) -> Browser:
        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=self.root))
        browser = await threads.deferToThread(Browser, profile, self.root / "chromedriver.log")
        self.addCleanup(lambda: threads.deferToThread(browser.quit))
        return browser

    def test_page_shows_hosts_links_workers_and_sees_a_host_leave(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._page())

    async def _page(self) -> None:
        self.make_site(HOSTS)
        master = await self.start_master_with_www(PROJECTS, HOSTS)
        a_names, b_names = names_for(PROJECTS, "hosta"), names_for(PROJECTS, "hostb")
        intruder = b_names[0]  # hosta tries to run one of hostb's workers: its workers= is *-hosta
        stranger = "delta-hosta"  # and a worker Buildbot does not know
        self.launch("hosta", [*a_names, intruder, stranger])
        launcher_b = self.launch("hostb", b_names)
        await self.wait_attached(a_names + b_names, timeout=60)
        workerids = {n: master.workers.workers[n].workerid for n in a_names + b_names}
        self.assertNotIn(None, workerids.values())
        www_port = master.www.getPortnum()
        root = f"http://127.0.0.1:{www_port}/"

        started = time.monotonic()
        browser = await self.browser()
        browser_s = time.monotonic() - started

        def both_hosts(t: dict[str, Any]) -> bool:
            states = {(h["host"], s["worker"], s["state"]) for h in t["connected"] for s in h["sessions"]}
            wanted = {("hosta", n, "attached") for n in a_names} | {("hostb", n, "attached") for n in b_names}
            wanted |= {("hosta", intruder, "refused"), ("hosta", stranger, "refused")}
            answered = all("no answer yet" not in h["text"] for h in t["connected"])  # keepalive RTTs
            return answered and states == wanted

        def open_and_read() -> tuple[dict[str, Any], dict[str, Any]]:
            opened = browser.open_dashboard(root + "#/sshmux", 30)
            return opened, browser.wait_tables("both hosts with their sessions attached", both_hosts, 30)

        started = time.monotonic()
        opened, seen = await threads.deferToThread(open_and_read)
        first_view_s = time.monotonic() - started
        self.assertEqual(opened["menu"][:1], ["SSH hosts"], opened)
        self.assertEqual(opened["frame_src"], root + "plugins/wsgi_dashboards/sshmux/page.html")
        by_host = {h["host"]: h for h in seen["connected"]}
        self.assertEqual([h["host"] for h in seen["connected"]], ["hosta", "hostb"])
        for host, names in (("hosta", a_names), ("hostb", b_names)):
            sessions = {s["worker"]: s for s in by_host[host]["sessions"] if s["state"] == "attached"}
            for name in names:
                self.assertEqual(sessions[name]["href"], f"{root}#/workers/{workerids[name]}", sessions[name])
                self.assertEqual(sessions[name]["target"], "_top")
            self.assertIn(S.host_fingerprint(self.site, host), by_host[host]["text"])
            self.assertIn("127.0.0.1:", by_host[host]["text"])
        refused = {s["worker"]: s for s in by_host["hosta"]["sessions"] if s["state"] == "refused"}
        self.assertEqual(refused[intruder]["href"], f"{root}#/workers/{workerids[intruder]}")
        self.assertIsNone(refused[stranger]["href"])  # no such worker in Buildbot: no page, no link
        self.assertIn(f"{intruder} (worker_not_allowed)", by_host["hosta"]["text"])
        self.assertIn(f"{stranger} (bad_credentials)", by_host["hosta"]["text"])
        self.assertEqual(seen["absent"], ["hostc"])
        self.assertIn("2 hosts connected", seen["summary"])
        self.assertFalse(seen["stale"])

        shot = self.root / "webui.png"
        await threads.deferToThread(browser.screenshot, shot)
        self.assertGreater(shot.stat().st_size, 10_000)
        wanted = os.environ.get("SSHMUX_WEBUI_SCREENSHOT")
        if wanted:
            shutil.copyfile(shot, wanted)

        # hostb's launcher stops: the page, never reloaded, sees it leave.
        loaded_at = seen["loaded_at"]
        await S.stop_launcher(reactor, launcher_b)
        await self.wait_detached(b_names)
        gone_at = time.monotonic()

        def hostb_gone(t: dict[str, Any]) -> bool:
            return [h["host"] for h in t["connected"]] == ["hosta"] and t["absent"] == ["hostb", "hostc"]

        after = await threads.deferToThread(browser.wait_tables, "hostb to leave the page", hostb_gone, 30)
        page_lag_s = time.monotonic() - gone_at
        self.assertEqual(after["loaded_at"], loaded_at, "the page was reloaded")
        self.assertIn("1 host connected", after["summary"])
        attached = [s["worker"] for s in after["connected"][0]["sessions"] if s["state"] == "attached"]
        self.assertEqual(sorted(attached), sorted(a_names))

        # A session's link opens its worker's page in Buildbot's UI (the whole window, not the frame).
        worker = a_names[0]
        page = await threads.deferToThread(browser.follow_worker_link, worker, 30)
        self.assertEqual(page["url"], f"{root}#/workers/{workerids[worker]}")
        figures(
            "web UI page",
            browser_start_s=browser_s,
            first_view_s=first_view_s,
            page_sees_host_leave_s=page_lag_s,
            refresh_s=REFRESH,
        )
