"""A launcher's ``[cluster]`` against two real masters: placement and failover.

The two masters are independent here (each its own sqlite database): what is
tested is the launcher's side, which master each session attaches to and how
fast it moves when its master goes.  tests/cluster/ runs a real multi-master
cluster (PostgreSQL, crossbar).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.worker.placement import rank
from tests import support as S
from tests.realmaster import RealMasterCase

PROJECTS = [f"proj{i:02d}" for i in range(12)]
HOST = "hosta"


def figures(test: str, **values: Any) -> None:
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[figures] {test}: {shown}")


class ClusterFailoverTests(RealMasterCase):
    timeout = 120

    async def start_masters(self) -> list[Any]:
        self.make_site([HOST])
        masters = []
        for name in ("m1", "m2"):
            config = T.master_config(PROJECTS, [HOST], self.site)
            master = await T.start_master(self.root / name, config, reactor)
            self.addCleanup(lambda m=master: defer.ensureDeferred(self.stop_master(m)))
            masters.append(master)
        self.master = masters[0]
        return masters

    async def stop_master(self, master: Any) -> None:
        """Stop a master once (the test stops one itself)."""
        if getattr(master, "_fault_stopped", False):
            return
        master._fault_stopped = True
        await S.stop_master_within(master, reactor, 30)
        # Buildbot's Worker.detached restarts its 1-hour "missing" timer after
        # stopService has cancelled it: the master is gone, so is the timer.
        for worker in list(master.workers.workers.values()):
            worker.stopMissingTimer()

    def cluster_config(self, masters: list[Any]) -> Path:
        members = ", ".join(
            f'{{ address = "127.0.0.1:{T.ssh_port(m)}", pb_port = {T.pb_port(m)} }}' for m in masters
        )
        lines = [
            "[cluster]",
            f"masters = [{members}]",
            f'host_key = "{self.site.host_key_line}"',
            f'identity = "{self.site.identities[HOST].name}"',
        ]
        for name in self.names:
            lines += [
                "",
                "[[worker]]",
                f'name = "{name}"',
                f'password = "{T.WORKER_PASSWORD.format(name=name)}"',
            ]
        path = self.root / HOST / "ssh-worker.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def placement(self, masters: list[Any]) -> dict[str, str]:
        """Where each session is attached now (a name on both would be a fault)."""
        where: dict[str, str] = {}
        for label, master in zip(("m1", "m2"), masters):
            for name in T.ready_workers(master):
                self.assertNotIn(name, where, f"{name} attached to two masters")
                where[name] = label
        return where

    def test_sessions_spread_by_rank_and_move_when_their_master_stops(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._failover())

    async def _failover(self) -> None:
        masters = await self.start_masters()
        self.names = [T.worker_name(p, HOST) for p in PROJECTS]
        addresses = {f"127.0.0.1:{T.ssh_port(m)}": label for m, label in zip(masters, ("m1", "m2"))}
        expected = {n: addresses[rank(n, [(a, 1.0) for a in addresses])[0]] for n in self.names}
        self.assertEqual(set(expected.values()), {"m1", "m2"}, "pick names that use both masters")
        launcher = self.start_launcher(self.cluster_config(masters))
        await self.wait_for(lambda: len(self.placement(masters)) == len(self.names), 60, "every session")
        self.assertEqual(self.placement(masters), expected)

        on_m1 = sorted(n for n, m in expected.items() if m == "m1")
        stopped_at = reactor.seconds()
        await self.stop_master(masters[0])
        self.master = masters[1]
        moved_s = await self.wait_for(
            lambda: set(on_m1) <= T.ready_workers(masters[1]), 30, "m1's sessions on m2"
        )
        figures(
            "cluster failover", sessions_moved=len(on_m1), seconds_after_stop=reactor.seconds() - stopped_at
        )
        self.assertEqual(T.ready_workers(masters[1]), set(self.names))
        await self.assertBuildsGreen([(on_m1[0].rsplit("-", 1)[0], HOST)])
        lines = [line for line in launcher.output().splitlines() if "moving from master" in line]
        self.assertEqual(len(lines), len(on_m1), launcher.output())
        self.assertIn("is down", lines[0])
        self.assertLess(moved_s, 30)
