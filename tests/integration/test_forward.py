"""Forward mode: unmodified ``buildbot-worker`` processes through one launcher.

Three directories made by the real ``buildbot-worker create-worker``, their
``buildbot.tac`` naming the launcher's local listener and nothing else
changed, run by the real buildbot-worker (``twistd``) and build green over
the launcher's one SSH connection; a worker name the host may not use is
refused by the master through the same listener.
"""

from __future__ import annotations

from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster import stock
from buildbot_sshmux.demo.cluster.procs import free_port
from buildbot_sshmux.demo.cluster.stock import StockWorker
from tests import support as S

from .test_launcher import LauncherTestCase, figures
from .test_launcher_ops import ssh_worker

HOST = "hosta"
PROJECTS = ["alpha", "beta", "gamma"]


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
        workers = [
            StockWorker(self.root / "stock" / n, n, T.WORKER_PASSWORD.format(name=n), listen)
            for n in [*names, "intruder-otherhost"]
        ]  # each its buildbot.tac naming the listener, and nothing else changed
        stock.create_all(workers)
        for worker in workers:
            self.addCleanup(worker.stop)
            worker.start()
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
