"""``buildbot-sshmux status`` and the Prometheus metrics, against a real master and launchers.

``buildbot-sshmux status`` runs as an operator types it (a child process),
asking the running master through its control socket; the metrics pages of
the master and of a launcher are scraped over HTTP and parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task, threads, utils

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster.procs import free_port
from tests import support as S

from .test_launcher import LauncherTestCase, figures, names_for

PROJECTS = ["alpha", "beta"]
HOSTS = ["hosta", "hostb"]


async def buildbot_sshmux(*args: str) -> tuple[int, str]:
    """Run ``buildbot-sshmux ARGS`` as an operator would; (exit code, stdout + stderr)."""
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, ["-m", "buildbot_sshmux.cli.admin", *args], env=dict(os.environ)
    )
    return code, (out + err).decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
last_scrape: list[str] = []  # the text of the latest scrape


async def scrape(port: int) -> Samples:
    """GET http://127.0.0.1:PORT/metrics (as Prometheus would, from another thread), parsed:
    (sample name, labels) -> value."""

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.headers["content-type"], response.read().decode()

    content_type, text = await threads.deferToThread(get)
    assert content_type.startswith("text/plain; version="), content_type
    last_scrape[:] = [text]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class MasterStatusTests(LauncherTestCase):
    def test_status_two_hosts_one_leaves_a_refused_login_and_the_metrics(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._status())

    async def _status(self) -> None:
        site = self.make_site(HOSTS)
        service = {"keepalive_interval": 1, "metrics": "tcp:0"}
        master = await self.start_master(PROJECTS, HOSTS, service=service)
        basedir = str(site.master_basedir)
        sshmux = T.sshmux_service(master)
        control_sock = site.master_basedir / "sshmux" / "control.sock"
        self.assertEqual(sshmux.control_path, control_sock)
        self.assertEqual(stat.S_IMODE(control_sock.stat().st_mode), 0o600)
        a_names, b_names = names_for(PROJECTS, "hosta"), names_for(PROJECTS, "hostb")
        intruder = b_names[0]  # hosta tries to run one of hostb's workers: its workers= is *-hosta
        hosta = self.launch("hosta", [*a_names, intruder])
        hostb = self.launch("hostb", b_names)
        await self.wait_attached(a_names + b_names)

        def ready(status: dict[str, Any]) -> bool:
            hosts = {h["name"]: h for h in status["hosts"]}
            return (
                set(hosts) == set(HOSTS)
                and all(h["keepalive_rtt_ms"]["last"] is not None for h in hosts.values())
                and any(s["state"] == "refused" for s in hosts["hosta"]["sessions"])
            )

        for _ in range(100):  # the first keepalive is a second after login
            code, out = await buildbot_sshmux("status", "--json", basedir)
            self.assertEqual(code, 0, out)
            status = json.loads(out)
            if ready(status):
                break
        self.assertTrue(ready(status), out)
        print(out)
        hosts = {h["name"]: h for h in status["hosts"]}
        self.assertEqual(status["listening"], f"127.0.0.1:{T.ssh_port(master)}")
        self.assertEqual(status["not_connected"], [])
        for name, workers in (("hosta", a_names), ("hostb", b_names)):
            host = hosts[name]
            self.assertEqual(host["fingerprint"], S.host_fingerprint(site, name))
            self.assertTrue(host["address"].startswith("127.0.0.1:"), host["address"])
            self.assertEqual(
                host["cipher"], {"in": "aes128-gcm@openssh.com", "out": "aes128-gcm@openssh.com"}
            )
            attached = [s["worker"] for s in host["sessions"] if s["state"] == "attached"]
            self.assertEqual(attached, sorted(workers))
            self.assertGreater(host["bytes"]["received"], 0)
            self.assertGreater(host["bytes"]["sent"], 0)
            self.assertLess(host["keepalive_rtt_ms"]["median"], 1000)
        [refused] = [s for s in hosts["hosta"]["sessions"] if s["state"] == "refused"]
        self.assertEqual((refused["worker"], refused["reason"]), (intruder, "worker_not_allowed"))
        self.assertGreaterEqual(hosts["hosta"]["refusals_last_hour"]["worker_not_allowed"], 1)
        self.assertEqual(hosts["hostb"]["refusals_last_hour"], {})

        code, text = await buildbot_sshmux("status", basedir)
        self.assertEqual(code, 0, text)
        print(text)
        lines = text.splitlines()
        self.assertTrue(lines[0].startswith(f"master {basedir} (pid {os.getpid()}): SSH on 127.0.0.1:"))
        self.assertIn("hosts connected: 2", lines)
        self.assertIn(f"host hosta ({S.host_fingerprint(site, 'hosta')}) from 127.0.0.1:", text)
        # The refused worker redials by itself: its next login may be under way.
        sessions_line = re.compile(r"  sessions: 2 attached(, 1 logging in)?, 1 refused")
        self.assertTrue(any(sessions_line.fullmatch(line) for line in lines), text)
        self.assertIn(f"    {intruder}  refused (worker_not_allowed, ", text)
        self.assertIn("authorized, not connected: 0", lines)

        got = await scrape(sshmux.metrics_port.getHost().port)
        print(last_scrape[0])
        self.assertEqual(got["sshmux_hosts_connected", ()], 2)
        self.assertEqual(got["sshmux_authorized_hosts", ()], 2)
        self.assertEqual(got["sshmux_sessions", (("state", "attached"),)], 4)
        self.assertGreaterEqual(
            got["sshmux_worker_logins_refused_total", (("reason", "worker_not_allowed"),)], 1
        )
        self.assertGreater(got["sshmux_bytes_total", (("direction", "received"),)], 0)
        self.assertGreaterEqual(got["sshmux_keepalive_rtt_seconds_count", ()], 2)
        self.assertEqual(got["sshmux_auth_failures_total", (("reason", "unknown_key"),)], 0)
        figures(
            "master status",
            hosts=len(status["hosts"]),
            hosta_bytes_received=hosts["hosta"]["bytes"]["received"],
            hosta_bytes_sent=hosts["hosta"]["bytes"]["sent"],
            hosta_rtt_ms=hosts["hosta"]["keepalive_rtt_ms"]["median"],
            metric_samples=len(got),
        )

        # hostb's launcher stops: it is authorized, and no longer connected.
        await S.stop_launcher(reactor, hostb)
        await self.wait_for(lambda: len(sshmux.factory.connections) == 1, 20, "hostb's connection to close")
        code, out = await buildbot_sshmux("status", "--json", basedir)
        self.assertEqual(code, 1, out)  # an authorized host is not connected
        status = json.loads(out)
        self.assertEqual([h["name"] for h in status["hosts"]], ["hosta"])
        [gone] = status["not_connected"]
        self.assertEqual((gone["name"], gone["fingerprint"]), ("hostb", S.host_fingerprint(site, "hostb")))
        self.assertEqual(gone["workers"], ["*-hostb"])
        self.assertTrue(gone["last_seen"]["address"].startswith("127.0.0.1:"), gone)
        code, text = await buildbot_sshmux("status", basedir)
        self.assertEqual(code, 1, text)
        print(text)
        self.assertIn("authorized, not connected: 1", text)
        self.assertIn(f"  hostb ({S.host_fingerprint(site, 'hostb')}) workers=*-hostb; last connected ", text)
        got = await scrape(sshmux.metrics_port.getHost().port)
        self.assertEqual(got["sshmux_hosts_connected", ()], 1)
        self.assertEqual(got["sshmux_sessions", (("state", "attached"),)], 2)
        self.assertAlive(hosta)

        # A master that is not running: one sentence.
        await self.stop_master(master)
        self.assertFalse(control_sock.exists(), "the control socket was left behind")
        code, text = await buildbot_sshmux("status", basedir)
        self.assertEqual(code, 2, text)
        self.assertEqual(
            text.strip(),
            f"buildbot-sshmux: no master is running in {basedir} (no control socket {control_sock})",
        )


class LauncherMetricsTests(LauncherTestCase):
    def test_the_launcher_serves_its_metrics(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._metrics())

    async def _metrics(self) -> None:
        self.make_site(["hosta"])
        master = await self.start_master(PROJECTS, ["hosta"])
        names = names_for(PROJECTS, "hosta")
        port = free_port()
        config = self.site.launcher_config(
            "hosta", T.ssh_port(master), T.pb_port(master), [*names, "alpha-other"]
        )
        text = config.read_text().replace("[master]\n", "[master]\nkeepalive_interval = 1\n", 1)
        config.write_text(f'metrics = "127.0.0.1:{port}"\n' + text)
        launcher = self.start_launcher(config)
        await self.wait_attached(names)

        master_name = f"127.0.0.1:{T.ssh_port(master)}"
        key = ("ssh_worker_keepalive_rtt_seconds_count", (("master", master_name),))
        refused = ("ssh_worker_logins_refused_total", (("reason", "unauthorized"),))
        for _ in range(100):  # the first keepalive is a second after login
            got = await scrape(port)
            if got.get(key, 0) >= 1 and got.get(refused, 0) >= 1:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        self.assertGreaterEqual(got[key], 1, got)
        print(last_scrape[0])
        self.assertEqual(got["ssh_worker_masters", ()], 1)
        self.assertEqual(got["ssh_worker_masters_connected", ()], 1)
        self.assertEqual(got["ssh_worker_sessions", ()], 3)
        self.assertEqual(got["ssh_worker_sessions_attached", ()], 2)
        self.assertGreater(got["ssh_worker_bytes_total", (("direction", "sent"), ("master", master_name))], 0)
        self.assertGreater(
            got["ssh_worker_bytes_total", (("direction", "received"), ("master", master_name))], 0
        )
        self.assertGreaterEqual(got[refused], 1)
        self.assertEqual(got["ssh_worker_session_moves_total", ()], 0)
        self.assertEqual(got["ssh_worker_rekeys_total", (("master", master_name),)], 0)
        self.assertIn(f"Prometheus metrics on http://127.0.0.1:{port}/metrics", launcher.output())
        figures("launcher metrics", samples=len(got), rtt_count=got[key])
