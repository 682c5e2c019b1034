"""The launcher against a real Buildbot master: many sessions, one SSH connection.

Every test runs a real Buildbot master (sqlite, in this process, on the global
reactor) with `SSHMuxService`, and ``ssh-worker run`` as child processes (one
per simulated worker host).  Only 127.0.0.1 and port 0 are used.

Figures (attach time, file descriptors, connection counts, re-attach time) are
printed; run pytest with ``-s`` or ``-rP`` to see them.  Set SSHMUX_KEEP_TMP=1
to keep each test's directory (master.log, HOST/ssh-worker.log) afterwards.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from buildbot.process.results import EXCEPTION, RETRY, SUCCESS, Results
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.spread import pb

from buildbot_sshmux.demo import harness as T
from tests import support as S
from tests.realmaster import RealMasterCase

from .relay import Relay


def figures(test: str, **values: Any) -> None:
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[figures] {test}: {shown}")


def names_for(projects: Iterable[str], host: str) -> list[str]:
    return [T.worker_name(p, host) for p in projects]


class LauncherTestCase(RealMasterCase):
    """A fresh site, master and log per test; launchers and master always stopped."""

    timeout = 150

    async def start_master(self, projects: Sequence[str], hosts: Sequence[str], **kwargs: Any) -> Any:
        config = T.master_config(projects, hosts, self.site, **kwargs)
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.stop_master(master)))
        self.master = master
        return master

    async def stop_master(self, master: Any) -> None:
        """Stop a master once (a test may stop it itself; cleanup then skips it)."""
        if getattr(master, "_fault_stopped", False):
            return
        master._fault_stopped = True
        if not await S.stop_master_within(master, reactor, 30):
            self.fail(f"the master did not stop within 30s\n{self.diagnostics()}")
        # Buildbot's Worker.detached restarts its 1-hour "missing" timer after
        # stopService has cancelled it: the master is gone, so is the timer.
        for worker in list(master.workers.workers.values()):
            worker.stopMissingTimer()

    def launch(
        self,
        host: str,
        workers: Sequence[str],
        ssh_port: int | None = None,
        master_options: dict[str, int] | None = None,
    ) -> T.LauncherProcess:
        port = ssh_port if ssh_port is not None else T.ssh_port(self.master)
        config = self.site.launcher_config(host, port, T.pb_port(self.master), workers)
        if master_options:
            extra = "".join(f"{key} = {value}\n" for key, value in master_options.items())
            config.write_text(config.read_text().replace("[master]\n", f"[master]\n{extra}", 1))
        return self.start_launcher(config)

    # -- waiting and asserting -------------------------------------------------

    async def wait_attached(self, names: Iterable[str], timeout: float = 30.0) -> float:
        """Wait until Buildbot has finished attaching each worker (to its builders too)."""
        wanted = sorted(set(names))
        return await self.wait_for(lambda: self.ready(wanted), timeout, f"{wanted} to attach")

    def ready(self, names: Iterable[str]) -> bool:
        """Whether each worker is attached, on its live connection, to all its builders."""
        botmaster = self.master.botmaster
        for name in names:
            if not self.usable([name]):
                return False
            worker = self.master.workers.workers[name]
            for builder in botmaster.getBuildersForWorker(name):
                if not any(wfb.worker is worker for wfb in builder.workers):
                    return False
        return True

    def usable(self, names: Iterable[str]) -> bool:
        """Whether each worker is attached and Buildbot's Worker holds that very connection."""
        conns, workers = self.master.workers.connections, self.master.workers.workers
        return all(n in conns and workers[n].conn is conns[n] for n in names)


class FiftySessionsOneConnection(LauncherTestCase):
    def test_fifty_sessions_share_one_connection(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._fifty())

    async def _fifty(self) -> None:
        projects = [f"proj{i:02d}" for i in range(50)]
        self.make_site(["hosta"])
        master = await self.start_master(projects, ["hosta"])
        names = names_for(projects, "hosta")
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)
        self.assertEqual(T.established_tcp(ssh_port), 0)

        # Buildbot's sqlite pool opens the database (up to 3 fds) only while a
        # query runs: take the fd snapshots while no query is in flight.
        snapshot: list[list[str]] = []

        def db_idle_snapshot() -> bool:
            targets = S.open_fd_targets()
            if any("state.sqlite" in t for t in targets):
                return False
            snapshot[:] = [targets]
            return True

        await self.wait_for(db_idle_snapshot, 20, "an fd snapshot without a database query in flight")
        targets_before = snapshot[0]
        launcher = self.launch("hosta", names)
        attach_s = await self.wait_attached(names, timeout=60)
        await self.wait_for(db_idle_snapshot, 20, "an fd snapshot without a database query in flight")
        targets_after = snapshot[0]
        fds_before, fds_after = len(targets_before), len(targets_after)
        sockets_before = sum(t.startswith("socket:") for t in targets_before)
        sockets_after = sum(t.startswith("socket:") for t in targets_after)
        new_fds = sorted((Counter(targets_after) - Counter(targets_before)).elements())

        self.assertEqual(len(T.attached_workers(master) & set(names)), 50)
        # The master's side: one accepted SSH connection, nothing on the PB port.
        ssh_master_side = T.established_tcp(ssh_port)
        ssh_launcher_side = S.established_tcp_to(ssh_port)
        pb_connections = T.established_tcp(pb_port) + S.established_tcp_to(pb_port)
        self.assertEqual(ssh_master_side, 1, self.diagnostics())
        self.assertEqual(ssh_launcher_side, 1, self.diagnostics())
        self.assertEqual(T.sshmux_service(master).connection_count, 1)
        self.assertEqual(pb_connections, 0)
        growth = fds_after - fds_before
        # One new socket: the SSH connection.
        self.assertEqual(sockets_after - sockets_before, 1, f"new fds: {new_fds}")
        self.assertLessEqual(growth, 5, f"master fds grew by {growth} for 50 sessions on one host: {new_fds}")

        build_start = reactor.seconds()
        await self.assertBuildsGreen([(p, "hosta") for p in projects])
        build_s = reactor.seconds() - build_start

        # Still the same single connection after 50 builds: no redial happened.
        self.assertEqual(T.established_tcp(ssh_port), 1)
        self.assertEqual(T.established_tcp(pb_port), 0)
        self.assertEqual(launcher.output().count("connected to master"), 1, self.diagnostics())
        self.assertAlive(launcher)
        figures(
            "50 sessions",
            attach_s=attach_s,
            fds_before=fds_before,
            fds_after=fds_after,
            sockets_before=sockets_before,
            sockets_after=sockets_after,
            new_fds=new_fds,
            ssh_tcp_master_side=ssh_master_side,
            ssh_tcp_launcher_side=ssh_launcher_side,
            pb_tcp=pb_connections,
            builds_50_s=build_s,
        )


class CutConnectionMidBuild(LauncherTestCase):
    def test_sessions_reattach_after_the_link_is_cut(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._cut())

    async def _cut(self) -> None:
        projects = ["alpha", "beta", "gamma"]
        self.make_site(["hosta"])
        markers = self.root / "started"
        markers.mkdir()
        command = ["sh", "-c", f'touch "{markers}/$PROJECT"; sleep 3; echo done']
        master = await self.start_master(projects, ["hosta"], command=command)
        names = names_for(projects, "hosta")
        relay = Relay(reactor, "127.0.0.1", T.ssh_port(master))
        await relay.start()
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))
        launcher = self.launch("hosta", names, ssh_port=relay.port)
        await self.wait_attached(names)
        self.assertEqual(relay.accepted, 1)
        pid = launcher.process.pid
        before = self.connections(names)

        brids = await T.force_builds(master, [(p, "hosta") for p in projects])
        # Every shell step is running on the worker host: the builds are mid-step.
        await self.wait_for(
            lambda: all((markers / p).exists() for p in projects), 30, "every build's shell step to start"
        )
        for p in projects:
            (markers / p).unlink()
        cut_at = reactor.seconds()
        self.assertEqual(relay.cut(), 1, "one relayed connection carries every session")

        # Every session comes back on its own, as a new connection at the master.
        reattach_s = await self.wait_for(
            lambda: all(self.master.workers.connections.get(n) not in (None, before[n]) for n in names),
            30,
            "every session to re-attach after the cut",
        )
        self.assertAlive(launcher)
        self.assertEqual(launcher.process.pid, pid)
        self.assertGreaterEqual(relay.accepted, 2, "the launcher should have redialled")
        self.assertEqual(relay.active, 1)
        self.assertEqual(T.established_tcp(T.ssh_port(master)), 1)

        # The interrupted builds ended as Buildbot says; RETRY ones ran again and passed.
        results = await T.buildrequest_results(master, brids)
        outcomes = []
        for project, brid, result in zip(projects, brids, results, strict=True):
            builds = await S.builds_of_request(master, brid)
            first = builds[0]["results"]
            outcomes.append((project, Results[first], len(builds), Results[result]))
            self.assertIn(first, (RETRY, EXCEPTION), f"{project}: the cut build ended {Results[first]}")
            if first == RETRY:
                self.assertEqual(result, SUCCESS, f"{project}: retried build request ended {Results[result]}")
                self.assertEqual(builds[-1]["results"], SUCCESS)
                self.assertGreaterEqual(len(builds), 2)
            else:
                self.assertEqual(result, EXCEPTION)
        retried_s = reactor.seconds() - cut_at

        await self.assertBuildsGreen([(p, "hosta") for p in projects])
        self.assertAlive(launcher)
        figures(
            "cut mid-build",
            reattach_s=reattach_s,
            relay_dials=relay.accepted,
            first_round=outcomes,
            cut_to_retried_builds_done_s=retried_s,
        )


class CutWhileAttaching(LauncherTestCase):
    # Buildbot logs the remote calls that the cut breaks while workers attach.
    expected_errors = ((pb.PBConnectionLost, ""), (pb.DeadReferenceError, ""))

    def test_sessions_reattach_after_a_cut_during_attach(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._cut_while_attaching())

    async def _cut_while_attaching(self) -> None:
        projects = [f"proj{i}" for i in range(10)]
        self.make_site(["hosta"])
        master = await self.start_master(projects, ["hosta"])
        names = names_for(projects, "hosta")
        relay = Relay(reactor, "127.0.0.1", T.ssh_port(master))
        await relay.start()
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))

        # Cut the link the moment the master has accepted the first session and
        # Buildbot is attaching it (the others are mid-login).
        cut_when: list[str] = []

        def cut_on_first_attach(event: dict[str, Any]) -> None:
            text = formatEvent(event) or ""
            if not cut_when and "Got workerinfo from" in text:
                cut_when.append(text)
                reactor.callLater(0, relay.cut)

        globalLogPublisher.addObserver(cut_on_first_attach)
        self.addCleanup(globalLogPublisher.removeObserver, cut_on_first_attach)
        launcher = self.launch("hosta", names, ssh_port=relay.port)
        await self.wait_for(lambda: relay.cuts >= 1, 30, "the link to be cut while sessions attach")

        # Every session comes back, and Buildbot's worker holds the live connection.
        reattach_s = await self.wait_for(
            lambda: self.usable(names), 30, "every session to re-attach for real"
        )
        self.assertGreaterEqual(relay.accepted, 2)
        self.assertAlive(launcher)
        await self.assertBuildsGreen([(p, "hosta") for p in projects])
        self.assertTrue(self.usable(names))
        figures(
            "cut during attach",
            cut_when=cut_when[0].strip(),
            reattach_s=reattach_s,
            relay_dials=relay.accepted,
        )


class StalledLink(LauncherTestCase):
    def test_sessions_reattach_after_the_link_goes_silent(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stall())

    async def _stall(self) -> None:
        projects = ["alpha", "beta", "gamma"]
        self.make_site(["hosta"])
        master = await self.start_master(projects, ["hosta"])
        names = names_for(projects, "hosta")
        relay = Relay(reactor, "127.0.0.1", T.ssh_port(master))
        await relay.start()
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))
        launcher = self.launch(
            "hosta",
            names,
            ssh_port=relay.port,
            master_options={"keepalive_interval": 1, "keepalive_count_max": 2},
        )
        await self.wait_attached(names)
        before = self.connections(names)

        # The link silently stops carrying data: nothing is closed, nothing errors.
        self.assertEqual(relay.stall(), 1)
        # The launcher's keepalives go unanswered; it drops the link, redials, re-attaches.
        reattach_s = await self.wait_for(
            lambda: (
                self.ready(names) and all(self.master.workers.connections[n] is not before[n] for n in names)
            ),
            30,
            "every session to re-attach after the link went silent",
        )
        self.assertAlive(launcher)
        self.assertGreaterEqual(relay.accepted, 2, "the launcher should have redialled")
        await self.assertBuildsGreen([(p, "hosta") for p in projects])
        self.assertEqual(T.established_tcp(T.ssh_port(master)), 1)
        figures("stalled link", reattach_s=reattach_s, relay_dials=relay.accepted)


class MasterShutsOneSessionDown(LauncherTestCase):
    def test_shutdown_of_one_worker_leaves_the_others(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        projects = ["alpha", "beta", "gamma"]
        self.make_site(["hosta"])
        master = await self.start_master(projects, ["hosta"])
        names = names_for(projects, "hosta")
        launcher = self.launch("hosta", names)
        await self.wait_attached(names)
        victim, others = names[0], names[1:]
        kept = self.connections(others)

        # What the web UI's "graceful shutdown" does: control action 'stop'.
        workerid = master.workers.workers[victim].workerid
        await master.data.control("stop", {}, ("workers", workerid))
        detach_s = await self.wait_detached([victim], timeout=20)

        self.assertAlive(launcher)
        self.assertEqual(self.connections(others), kept, "the other sessions must not re-attach")
        await self.assertBuildsGreen([(p, "hosta") for p in projects[1:]])
        # The session stays stopped: it does not log in again.
        await self.assertStaysDetached([victim], 3)
        self.assertEqual(self.connections(others), kept)
        self.assertAlive(launcher)
        self.assertEqual(T.established_tcp(T.ssh_port(master)), 1)
        self.assertIn(f"worker {victim}: the master asked this worker to shut down", launcher.output())
        figures("master shutdown of one session", detach_s=detach_s, still_attached=len(kept))


class DuplicateSessionRejected(LauncherTestCase):
    # Twisted PB logs the failed login of the duplicate (Buildbot's arbitration
    # raises RuntimeError) before sending it to the worker, as over plain TCP.
    expected_errors = ((RuntimeError, "rejecting duplicate worker"),)

    def test_duplicate_worker_name_leaves_the_others(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._duplicate())

    async def _duplicate(self) -> None:
        projects = ["alpha", "beta"]
        shared = "shared-worker"
        self.make_site(["hosta", "hostb"])
        # Both hosts may attach as the shared name.
        text = self.site.authorized_hosts.read_text()
        for host in ("hosta", "hostb"):
            text = text.replace(f'workers="*-{host}"', f'workers="*-{host},{shared}"')
        self.site.authorized_hosts.write_text(text)
        master = await self.start_master(projects, ["hosta", "hostb"], extra_workers=[shared])
        a_names, b_names = names_for(projects, "hosta"), names_for(projects, "hostb")

        launcher_a = self.launch("hosta", a_names + [shared])
        await self.wait_attached(a_names + [shared])
        first = self.master.workers.connections[shared]

        launcher_b = self.launch("hostb", b_names + [shared])
        await self.wait_attached(b_names)
        await self.wait_for(
            lambda: "rejecting duplicate worker" in launcher_b.output(),
            30,
            "hostb's duplicate to be rejected",
        )
        self.assertTrue(self.log.matching("duplicat", shared), "the master should log the arbitration")
        self.assertIn(f"worker {shared}: master rejected the session", launcher_b.output())

        for launcher in (launcher_a, launcher_b):
            self.assertAlive(launcher)
        self.assertIs(self.master.workers.connections.get(shared), first, "hosta keeps the shared name")
        await self.assertBuildsGreen([(p, h) for p in projects for h in ("hosta", "hostb")])
        self.assertLessEqual(set(a_names + b_names + [shared]), T.attached_workers(master))
        self.assertIs(self.master.workers.connections.get(shared), first)
        for launcher in (launcher_a, launcher_b):
            self.assertAlive(launcher)
        self.assertEqual(T.established_tcp(T.ssh_port(master)), 2)
        figures(
            "duplicate rejected",
            rejections_logged_by_hostb=launcher_b.output().count("rejecting duplicate worker"),
            attached=len(T.attached_workers(master)),
        )


class UnauthorizedWorkerName(LauncherTestCase):
    # Twisted PB logs every failed login (as it does for a wrong password over TCP).
    expected_errors = ((UnauthorizedLogin, ""),)

    def test_login_as_another_hosts_worker_is_refused(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._unauthorized())

    async def _unauthorized(self) -> None:
        projects = ["alpha", "beta"]
        self.make_site(["hosta", "hostb"])
        master = await self.start_master(projects, ["hosta", "hostb"])
        own = names_for(projects, "hosta")
        foreign = T.worker_name("alpha", "hostb")  # a real worker, but hostb's
        launcher = self.launch("hosta", own + [foreign])
        await self.wait_attached(own)

        fp = S.host_fingerprint(self.site, "hosta")
        needles = ("host hosta", fp, repr(foreign), "login refused")
        # Refused, and refused again when the session retries.
        await self.wait_for(
            lambda: len(self.log.matching(*needles)) >= 2, 30, "the refusal to be logged twice"
        )
        self.assertNotIn(foreign, T.attached_workers(master))
        self.assertAlive(launcher)
        self.assertIn(f"worker {foreign}: master refused the login", launcher.output())
        self.assertEqual(self.connections(own).keys(), set(own))

        await self.assertBuildsGreen([(p, "hosta") for p in projects])
        await self.assertStaysDetached([foreign], 2)
        self.assertLessEqual(set(own), T.attached_workers(master))
        self.assertAlive(launcher)
        figures(
            "unauthorized name",
            refusals_logged=len(self.log.matching(*needles)),
            refusal=self.log.matching(*needles)[0].strip(),
        )


class SigtermStopsCleanly(LauncherTestCase):
    def test_sigterm_mid_build_stops_the_launcher_and_detaches(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._sigterm())

    async def _sigterm(self) -> None:
        projects = ["alpha", "beta", "gamma"]
        self.make_site(["hosta"])
        markers, long_builds = self.root / "started", self.root / "long-builds"
        markers.mkdir()
        # Short builds, or one-minute builds once the long-builds file exists.
        command = [
            "sh",
            "-c",
            f'echo $$ > "{markers}/$PROJECT"; if [ -e "{long_builds}" ]; then sleep 60; fi; echo done',
        ]
        master = await self.start_master(projects, ["hosta"], command=command)
        names = names_for(projects, "hosta")
        launcher = self.launch("hosta", names)
        await self.wait_attached(names)
        await self.assertBuildsGreen([(p, "hosta") for p in projects])

        # SIGTERM while every session runs a build.
        for p in projects:
            (markers / p).unlink()
        long_builds.touch()
        brids = await T.force_builds(master, [(p, "hosta") for p in projects])
        await self.wait_for(
            lambda: all((markers / p).exists() for p in projects), 30, "every build's shell step to start"
        )
        build_pids = [int((markers / p).read_text()) for p in projects]
        assert launcher.process is not None
        launcher.process.send_signal(signal.SIGTERM)
        start = reactor.seconds()
        try:
            code = await S.wait_process_exit(reactor, launcher, 10)
        except TimeoutError:
            self.fail(f"the launcher did not exit within 10s of SIGTERM\n{self.diagnostics()}")
        exit_s = reactor.seconds() - start
        self.assertEqual(code, 0, self.diagnostics())
        self.assertNotIn("Traceback", launcher.output())
        detach_s = await self.wait_detached(names, timeout=10)
        await self.wait_for(
            lambda: T.established_tcp(T.ssh_port(master)) == 0, 10, "the SSH connection to close"
        )
        self.assertEqual(T.sshmux_service(master).connection_count, 0)

        # The launcher killed its builds' commands on the way out.
        def running(pid: int) -> bool:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            return stat.rsplit(")", 1)[1].split()[0] != "Z"

        await self.wait_for(lambda: not any(map(running, build_pids)), 10, "the builds' commands to end")

        # At the master the interrupted builds end as a lost worker's do.
        async def first_builds() -> list[dict[str, Any]]:
            return [(await S.builds_of_request(master, brid))[0] for brid in brids]

        ended: list[list[dict[str, Any]]] = []

        async def all_ended() -> bool:
            builds = await first_builds()
            ended[:] = [builds]
            return all(b["complete"] for b in builds)

        deadline = reactor.seconds() + 20
        while not await all_ended():
            if reactor.seconds() > deadline:
                self.fail(f"interrupted builds did not end: {ended[0]}\n{self.diagnostics()}")
            await task.deferLater(reactor, 0.2, lambda: None)
        results = [Results[b["results"]] for b in ended[0]]
        for build in ended[0]:
            self.assertIn(build["results"], (RETRY, EXCEPTION), results)
        figures(
            "SIGTERM mid-build", exit_s=exit_s, master_detached_all_s=detach_s, interrupted_builds=results
        )
