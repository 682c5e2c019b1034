"""`wire.control`: the local control socket, on a real UNIX socket."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.wire import control


class ControlSocketTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sshmux-ctl-"))
        self.path = self.dir / "x.sock"
        self.addCleanup(lambda: [p.unlink() for p in self.dir.iterdir()] and self.dir.rmdir())

    async def serve(self, routes: dict[tuple[str, str], control.Route]) -> Any:
        port = await control.listen(reactor, self.path, routes, "the test")
        self.addCleanup(port.stopListening)
        return port

    def ask(self, method: str, route: str, **query: Any) -> defer.Deferred[Any]:
        return threads.deferToThread(control.request, self.path, method, route, 5.0, **query)

    def test_routes_answer_json_and_errors_are_one_sentence(self) -> defer.Deferred[None]:
        async def run() -> None:
            def refuse(query: dict[str, str]) -> Any:
                raise control.ControlError(f"cannot do {query['what']}")

            await self.serve({("GET", "status"): lambda q: {"ok": True, **q}, ("POST", "x"): refuse})
            self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
            self.assertEqual(await self.ask("GET", "status", a="1"), {"ok": True, "a": "1"})
            with self.assertRaises(control.ControlError) as caught:
                await self.ask("POST", "x", what="that")
            self.assertEqual(str(caught.exception), "cannot do that")
            with self.assertRaises(control.ControlError) as caught:
                await self.ask("GET", "nope")
            self.assertIn("no GET /nope; known: GET /status, POST /x", str(caught.exception))

        return defer.ensureDeferred(run())

    def test_a_second_process_is_refused_and_a_stale_socket_replaced(self) -> defer.Deferred[None]:
        async def run() -> None:
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(os.fsencode(self.path))
            stale.close()  # the file stays, nobody answers: a crashed process's
            with self.assertRaises(control.NotRunning) as caught:
                control.request(self.path, "GET", "status")
            self.assertIn("stale control socket", str(caught.exception))
            await self.serve({("GET", "status"): lambda q: "up"})
            self.assertEqual(await self.ask("GET", "status"), "up")
            with self.assertRaises(SSHMuxError) as refused:
                control.listen(reactor, self.path, {}, "a launcher for site.toml")
            self.assertIn("a launcher for site.toml is already running here", str(refused.exception))

        return defer.ensureDeferred(run())

    def test_nothing_running_and_a_path_too_long_say_so(self) -> None:
        with self.assertRaises(control.NotRunning) as caught:
            control.request(self.path, "GET", "status")
        self.assertIn(f"no control socket {self.path}", str(caught.exception))
        with self.assertRaises(SSHMuxError) as long:
            control.listen(reactor, self.dir / ("x" * 120), {}, "the test")
        self.assertIn("longer than 100 bytes", str(long.exception))


class ServiceEndpointsTests(TestCase):
    """`SSHMuxService`'s control socket and metrics page follow its config (a reconfig moves them)."""

    def setUp(self) -> None:
        import shutil
        from types import SimpleNamespace

        from buildbot_sshmux.master.service import SSHMuxService
        from buildbot_sshmux.wire.keys import generate_ed25519, write_private_key

        self.dir = Path(tempfile.mkdtemp(prefix="sshmux-svc-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        key = self.dir / "key"
        write_private_key(key, generate_ed25519())
        self.service = SSHMuxService(host_keys=[str(key)], hosts=["# none"])
        self.service.parent = SimpleNamespace(master=SimpleNamespace(basedir=str(self.dir), reactor=reactor))  # type: ignore[assignment]
        self.addCleanup(lambda: defer.ensureDeferred(self.stop()))

    async def stop(self) -> None:
        await self.service._stop_control()
        await self.service._stop_metrics()

    def ask(self, path: Path) -> defer.Deferred[Any]:
        return threads.deferToThread(control.request, path, "GET", "status", 5.0)

    def test_the_control_socket_is_made_moved_and_closed(self) -> defer.Deferred[None]:
        async def run() -> None:
            service = self.service
            default = self.dir / "sshmux" / "control.sock"
            service._control_wanted = default
            await service._serve_control()
            self.assertEqual(stat.S_IMODE(default.parent.stat().st_mode), 0o700, "made as init makes it")
            self.assertEqual(stat.S_IMODE(default.stat().st_mode), 0o600)
            self.assertEqual((await self.ask(default))["hosts"], [])
            moved = self.dir / "moved.sock"
            service._control_wanted = moved
            await service._serve_control()
            self.assertFalse(default.exists())
            self.assertEqual((await self.ask(moved))["version"], 1)
            service._control_wanted = None  # control_socket=None
            await service._serve_control()
            self.assertFalse(moved.exists())
            self.assertIsNone(service.control_path)

        return defer.ensureDeferred(run())

    def test_the_metrics_page_is_served_and_moved(self) -> defer.Deferred[None]:
        import urllib.request

        def get(port: int) -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return bytes(response.read())

        async def run() -> None:
            service = self.service
            service._metrics_wanted = "tcp:0:interface=127.0.0.1"
            await service._serve_metrics()
            assert service.metrics_port is not None
            first = service.metrics_port.getHost().port
            self.assertIn(b"sshmux_hosts_connected 0.0", await threads.deferToThread(get, first))
            service._metrics_wanted = "tcp:0:interface=127.0.0.1:backlog=5"
            await service._serve_metrics()
            assert service.metrics_port is not None
            self.assertNotEqual(service.metrics_port.getHost().port, first)
            with self.assertRaises(OSError):
                await threads.deferToThread(get, first)
            service._metrics_wanted = None
            await service._serve_metrics()
            self.assertIsNone(service.metrics_port)

        return defer.ensureDeferred(run())
