"""The master restarts with 200 sessions attached: every one comes back.

One launcher runs 200 worker sessions (four builders, fifty workers each)
over its one SSH connection.  The master is stopped (stopService, as a
``buildbot restart`` does) and a new master is started on the same basedir,
database and ports; the launcher redials by itself and re-attaches every
session.  The time from the new master's start to all 200 attached (and
ready on their builders) is the figure.
"""

from __future__ import annotations

from buildbot.process.results import SUCCESS
from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T

from .harness import FaultCase, figures, many_workers_config

SESSIONS, BUILDERS = 200, 4
REATTACH_LIMIT = 120.0


class MasterRestartWith200Sessions(FaultCase):
    timeout = 300

    def test_all_200_sessions_reattach_after_a_master_restart(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._restart())

    async def _restart(self) -> None:
        self.make_site(["hosta"])
        config, names, builders = many_workers_config(
            self.site,
            "hosta",
            SESSIONS,
            BUILDERS,
            ssh_port="tcp:0:interface=127.0.0.1",
            pb_port="tcp:0:interface=127.0.0.1",
        )
        first = await self.start_master_config(config)
        # Port 0 picked the ports once; the new master listens on the same ones.
        ssh, pb = T.ssh_port(first), T.pb_port(first)
        launcher = self.launch("hosta", names)
        attach_s = await self.wait_ready(names, timeout=REATTACH_LIMIT)
        self.assertEqual(T.sshmux_service(first).connection_count, 1)
        results = await T.run_builds(first, [(b, "hosta") for b in builders])
        self.assertEqual(results, [SUCCESS] * BUILDERS, self.diagnostics())
        dials_before = launcher.output().count("connected to master")

        stop_start = reactor.seconds()
        await self.stop_master(first)
        stopped_s = reactor.seconds() - stop_start
        self.assertEqual(T.established_tcp(ssh), 0, "the old master left an SSH connection open")

        fixed = f"tcp:{ssh}:interface=127.0.0.1"
        config, _names, _builders = many_workers_config(
            self.site, "hosta", SESSIONS, BUILDERS, ssh_port=fixed, pb_port=f"tcp:{pb}:interface=127.0.0.1"
        )
        started_at = reactor.seconds()
        second = await self.start_master_config(config)
        master_start_s = reactor.seconds() - started_at
        self.assertEqual((T.ssh_port(second), T.pb_port(second)), (ssh, pb))
        attached_s = await self.wait_attached(names, timeout=REATTACH_LIMIT) + master_start_s
        ready_s = await self.wait_ready(names, timeout=REATTACH_LIMIT) + attached_s
        first_conn_s = (
            next(t for t, _l in self.log.matching_after(started_at, "host hosta (", "connected")) - started_at
        )

        self.assertAlive(launcher)
        self.assertEqual(
            T.sshmux_service(second).connection_count, 1, "one SSH connection for all 200 sessions"
        )
        self.assertEqual(T.established_tcp(ssh), 1)
        self.assertEqual(
            launcher.output().count("connected to master"), dials_before + 1, "one redial, no more"
        )
        results = await T.run_builds(second, [(b, "hosta") for b in builders])
        self.assertEqual(results, [SUCCESS] * BUILDERS, self.diagnostics())
        self.assertNotIn("Traceback", launcher.output())
        figures(
            f"master restart with {SESSIONS} sessions",
            sessions=SESSIONS,
            initial_attach_s=attach_s,
            master_stop_s=stopped_s,
            new_master_startup_s=master_start_s,
            launcher_redialled_after_start_s=first_conn_s,
            all_attached_after_start_s=attached_s,
            all_ready_after_start_s=ready_s,
            all_ready_after_stop_began_s=ready_s + (started_at - stop_start),
        )
        self.assertLess(ready_s, REATTACH_LIMIT)
