"""Forward mode: unmodified ``buildbot-worker`` processes through one launcher.

Three directories made by the real ``buildbot-worker create-worker``, their
``buildbot.tac`` naming the launcher's local listener and nothing else
changed, run by the real buildbot-worker (``twistd``) and build green over
the launcher's one SSH connection; a worker name the host may not use is
refused by the master through the same listener.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from tests import support as S

from .test_cluster_failover import free_port
from .test_import import create_worker
from .test_launcher import LauncherTestCase, figures
from .test_launcher_ops import ssh_worker

HOST = "hosta"
PROJECTS = ["alpha", "beta", "gamma"]


class StockWorker:
    """``twistd --nodaemon -y buildbot.tac`` in a worker directory: buildbot-worker unmodified."""

    def __init__(self, basedir: Path) -> None:
        self.basedir = basedir
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "--nodaemon", "--pidfile=", "--logfile=twistd.log", "-y", "buildbot.tac"],
            cwd=basedir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ForwardTests(LauncherTestCase):
    def test_stock_workers_build_green_through_one_connection(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._forward())

    async def _forward(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST], extra_workers=["intruder-otherhost"])
        sshmux = T.sshmux_service(master)
        listen = free_port()
        config = self.site.launcher_config(HOST, T.ssh_port(master), T.pb_port(master), [])
        config.write_text(config.read_text() + f'\n[[forward]]\nlisten = "{listen}"\n')
        launcher = self.start_launcher(config)
        await self.wait_for(lambda: "listening for buildbot-worker connections" in launcher.output(), 20,
                            "the forward to listen")  # fmt: skip

        names = [T.worker_name(p, HOST) for p in PROJECTS]
        workers = []
        (self.root / "stock").mkdir()
        for name in [*names, "intruder-otherhost"]:
            create_worker(self.root / "stock" / name, name, master=f"localhost:{listen}")
            worker = StockWorker(self.root / "stock" / name)
            self.addCleanup(worker.stop)
            workers.append(worker)
        started = reactor.seconds()
        await self.wait_attached(names, timeout=60)
        figures("forward mode", workers=len(names), attach_s=reactor.seconds() - started)
        await self.assertBuildsGreen([(p, HOST) for p in PROJECTS])

        self.assertEqual(sshmux.connection_count, 1)
        self.assertEqual(T.established_tcp(T.pb_port(master)), 0, "a worker reached the PB port directly")
        self.assertEqual(len(sshmux.factory.connections), 1)
        await self.wait_for(lambda: bool(self.log.matching("may not attach worker 'intruder-otherhost'")), 20,
                            "the intruder to be refused")  # fmt: skip
        self.assertNotIn("intruder-otherhost", T.attached_workers(master))

        code, text = await ssh_worker("status", str(config))
        self.assertIn(f"forward 127.0.0.1:{listen}: listening, 4 connections", text)
        self.assertNotIn("Starting factory", launcher.output())
        for worker in workers:
            worker.stop()
        await self.wait_detached(names)
        await S.stop_launcher(reactor, launcher)
