"""A worker host behind a real HTTP proxy (Debian's tinyproxy, started by the test).

The launcher's SSH connection goes through ``CONNECT``; a proxy that refuses
(a port it does not allow, a wrong password) gives one clear line.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster.procs import free_port
from tests import support as S

from .test_launcher import LauncherTestCase

HOST = "hosta"
PROJECTS = ["alpha", "beta"]


class Tinyproxy:
    """``tinyproxy -d`` with a config of its own: 127.0.0.1 only, CONNECT to ``connect_ports``."""

    def __init__(self, root: Path, connect_ports: list[int], auth: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = root / f"tinyproxy-{self.port}.log"
        config = root / f"tinyproxy-{self.port}.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Allow 127.0.0.1",
            "Timeout 60",
            f'LogFile "{self.log}"',
            "LogLevel Info",
            *[f"ConnectPort {p}" for p in connect_ports],
        ]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        config.write_text("\n".join(lines) + "\n")
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        self.process = subprocess.Popen([binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)  # fmt: skip

    def stop(self) -> None:
        T.stop_process(self.process, 10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ProxyTests(LauncherTestCase):
    def setUp(self) -> None:
        super().setUp()
        if shutil.which("tinyproxy") is None and not Path("/usr/bin/tinyproxy").exists():
            self.skipTest("tinyproxy is not installed (apt-get install tinyproxy; .ci/run does)")

    def start_proxy(self, *args: Any, **kwargs: Any) -> Tinyproxy:
        proxy = Tinyproxy(self.root, *args, **kwargs)
        self.addCleanup(proxy.stop)
        return proxy

    def proxied_launcher(self, master: Any, url: str, name: str = "ssh-worker") -> T.LauncherProcess:
        config = self.site.launcher_config(
            HOST, T.ssh_port(master), T.pb_port(master), [T.worker_name(p, HOST) for p in PROJECTS]
        )
        proxied = config.with_name(f"{name}.toml")  # its own log and control socket
        proxied.write_text(config.read_text().replace("[master]\n", f'[master]\nproxy = "{url}"\n', 1))
        return self.start_launcher(proxied)

    def test_a_host_behind_a_proxy_builds_green(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._through())

    async def _through(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST])
        proxy = self.start_proxy([T.ssh_port(master)], auth=("ci", "s3cret"))
        await self.wait_for(
            lambda: "listening on" in proxy.text().lower() or proxy.log.exists(), 10, "tinyproxy"
        )
        launcher = self.proxied_launcher(master, f"http://ci:s3cret@127.0.0.1:{proxy.port}")
        names = [T.worker_name(p, HOST) for p in PROJECTS]
        await self.wait_attached(names)
        await self.assertBuildsGreen([(p, HOST) for p in PROJECTS])
        self.assertIn(f"CONNECT 127.0.0.1:{T.ssh_port(master)} HTTP/1.1", proxy.text())
        self.assertEqual(T.sshmux_service(master).connection_count, 1)
        self.assertIn(f"through proxy http://ci:***@127.0.0.1:{proxy.port}", launcher.output())
        self.assertNotIn("s3cret", launcher.output())

    def test_refusing_proxies_say_why(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._refused())

    async def _refused(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST])
        closed = self.start_proxy([443])  # SSH to port 2222-ish is not allowed there
        wants_auth = self.start_proxy([T.ssh_port(master)], auth=("ci", "s3cret"))
        for proxy, url, expected in [
            (closed, f"http://127.0.0.1:{closed.port}", "403"),
            (wants_auth, f"http://ci:wrong@127.0.0.1:{wants_auth.port}", "401"),  # tinyproxy's, not 407
        ]:
            await self.wait_for(lambda p=proxy: p.log.exists(), 10, "tinyproxy")
            launcher = self.proxied_launcher(master, url, f"refused-{expected}")
            line = f"did not open a tunnel to 127.0.0.1:{T.ssh_port(master)}: it answered 'HTTP/1."

            def refused(lch: T.LauncherProcess = launcher, ln: str = line, code: str = expected) -> list[str]:
                return [t for t in lch.output().splitlines() if ln in t and f" {code} " in t]

            await self.wait_for(lambda: bool(refused()), 20, f"the {expected} refusal")
            text = refused()[0]
            self.assertIn(f"cannot reach master 127.0.0.1:{T.ssh_port(master)}: proxy http://", text)
            if expected == "401":
                self.assertIn("check the user and password", text)
                self.assertNotIn("wrong", text)
            self.assertEqual(T.attached_workers(master), set())
            await S.stop_launcher(reactor, launcher)
