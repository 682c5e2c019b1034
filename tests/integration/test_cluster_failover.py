"""A launcher's ``[cluster]`` against two real masters: placement and failover.

The two masters are independent here (each its own sqlite database): what is
tested is the launcher's side, which master each session attaches to and how
fast it moves when its master goes.  tests/cluster/ runs a real multi-master
cluster (PostgreSQL, crossbar).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from buildbot.process.results import SUCCESS
from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster.procs import free_port
from buildbot_sshmux.worker.placement import assign
from tests import support as S
from tests.realmaster import RealMasterCase

PROJECTS = [f"proj{i:02d}" for i in range(12)]
HOST = "hosta"


def figures(test: str, **values: Any) -> None:
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[figures] {test}: {shown}")


class ClusterCase(RealMasterCase):
    """Two real masters (fixed ports, so that one can come back) and a `[cluster]` launcher."""

    timeout = 120

    command = ("sh", "-c", "echo building $PROJECT")

    async def start_masters(self) -> list[Any]:
        self.make_site([HOST])
        self.ports = {name: (free_port(), free_port()) for name in ("m1", "m2")}
        masters = [await self.start_one(name) for name in ("m1", "m2")]
        self.master = masters[0]
        return masters

    async def start_one(self, name: str) -> Any:
        """Start master ``name`` (on the same ports each time)."""
        ssh, pb = self.ports[name]
        config = T.master_config(
            PROJECTS,
            [HOST],
            self.site,
            ssh_port=f"tcp:{ssh}:interface=127.0.0.1",
            pb_port=f"tcp:{pb}:interface=127.0.0.1",
            command=self.command,
        )
        master = await T.start_master(self.root / name, config, reactor)
        self.addCleanup(lambda m=master: defer.ensureDeferred(self.stop_master(m)))
        return master

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


class ClusterFailoverTests(ClusterCase):
    def test_sessions_spread_by_rank_and_move_when_their_master_stops(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._failover())

    async def _failover(self) -> None:
        masters = await self.start_masters()
        self.names = [T.worker_name(p, HOST) for p in PROJECTS]
        addresses = {f"127.0.0.1:{T.ssh_port(m)}": label for m, label in zip(masters, ("m1", "m2"))}
        expected = {n: addresses[o[0]] for n, o in assign(self.names, [(a, 1.0) for a in addresses]).items()}
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
        m2_address = f"127.0.0.1:{T.ssh_port(masters[1])}"
        self.assertIn(f"worker {on_m1[0]}: attached to master {m2_address}", launcher.output())
        self.assertLess(moved_s, 30)


class ClusterDrainTests(ClusterCase):
    """A master stopping cleanly lets its sessions go as their builds end; back, it gets them back."""

    timeout = 150
    command = ("sh", "-c", "sleep 4; echo building $PROJECT")  # the one build forced is slow

    def test_sessions_move_as_builds_end_and_come_back_gradually(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._drain())

    async def _drain(self) -> None:
        masters = await self.start_masters()
        self.names = [T.worker_name(p, HOST) for p in PROJECTS]
        addresses = {f"127.0.0.1:{T.ssh_port(m)}": label for m, label in zip(masters, ("m1", "m2"))}
        expected = {n: addresses[o[0]] for n, o in assign(self.names, [(a, 1.0) for a in addresses]).items()}
        launcher = self.start_launcher(self.cluster_config(masters))
        await self.wait_for(
            lambda: self.placement(masters) == expected, 60, "every session on its first master"
        )

        m1, m2 = masters
        on_m1 = sorted(n for n, m in expected.items() if m == "m1")
        busy, idle = on_m1[0], on_m1[1:]
        slow_project = busy.rsplit("-", 1)[0]
        [brid] = await T.force_builds(m1, [(slow_project, HOST)])
        # Past its ping: Buildbot's clean shutdown aborts the ping of a build
        # still starting (it then ends RETRY), so wait for its first step.
        slow = m1.botmaster.builders[slow_project]
        await self.wait_for(
            lambda: any(b.currentStep is not None for b in slow.building), 20, "its first step"
        )

        started = reactor.seconds()
        stopping = defer.ensureDeferred(defer.maybeDeferred(m1.botmaster.cleanShutdown, stopReactor=False))
        await self.wait_for(lambda: set(idle) <= T.ready_workers(m2), 20, "m1's idle sessions on m2")
        idle_moved_s = reactor.seconds() - started
        self.assertIn(busy, T.ready_workers(m1), "the busy session left before its build ended")
        self.assertTrue(m1.botmaster.builders[slow_project].building, "the build was cut short")
        [result] = await T.buildrequest_results(m1, [brid])
        self.assertEqual(result, SUCCESS)
        await self.wait_for(lambda: busy in T.ready_workers(m2), 20, "the busy session on m2 after its build")
        busy_moved_s = reactor.seconds() - started
        await stopping
        await self.stop_master(m1)
        moves_out = self.moves(launcher)

        restarted = reactor.seconds()
        m1 = await self.start_one("m1")
        self.master = m1
        await self.wait_for(lambda: self.placement([m1, m2]) == expected, 60, "every session back home")
        figures(
            "clean stop and return",
            idle_sessions_moved=len(idle),
            idle_moved_after_s=idle_moved_s,
            busy_moved_after_s=busy_moved_s,
            all_back_after_restart_s=reactor.seconds() - restarted,
        )
        self.assertEqual(moves_out, len(on_m1))
        self.assertEqual(self.moves(launcher) - moves_out, len(on_m1))
        self.assertIn("is about to stop", launcher.output())

    def moves(self, launcher: Any) -> int:
        return sum("moving from master" in line for line in launcher.output().splitlines())
