"""Two launchers list the same worker name: the second is refused cleanly.

Hosts ``hosta`` and ``hostb`` may both attach as ``shared-worker``.  hosta's
session holds the name; hostb's is refused by Buildbot's duplicate
arbitration, again at each retry, while every other session of both hosts
stays attached on its first connection and builds, and hostb's SSH
connection is never dropped.  When hosta stops, hostb's session takes the
name over by itself.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task

from buildbot_sshmux.demo import harness as T
from tests import support as S

from .harness import FaultCase, figures

SHARED = "shared-worker"
PROJECTS = ["alpha", "beta"]


class DuplicateNameRefused(FaultCase):
    timeout = 150
    # Buildbot's duplicate arbitration refuses the login with a logged traceback.
    expected_errors = ((RuntimeError, "rejecting duplicate worker"),)

    def test_duplicate_name_refused_cleanly_others_unaffected(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._duplicate())

    async def _duplicate(self) -> None:
        self.make_site(["hosta", "hostb"])
        text = self.site.authorized_hosts.read_text()
        for host in ("hosta", "hostb"):
            text = text.replace(f'workers="*-{host}"', f'workers="*-{host},{SHARED}"')
        self.site.authorized_hosts.write_text(text)
        master = await self.start_master(PROJECTS, ["hosta", "hostb"], extra_workers=[SHARED])
        a_names = [T.worker_name(p, "hosta") for p in PROJECTS]
        b_names = [T.worker_name(p, "hostb") for p in PROJECTS]

        launcher_a = self.launch("hosta", a_names + [SHARED])
        await self.wait_attached(a_names + [SHARED])
        held = self.connections(a_names + [SHARED])
        ssh_a = self.ssh_connections("hosta")

        started_b = reactor.seconds()
        launcher_b = self.launch("hostb", b_names + [SHARED])
        await self.wait_attached(b_names)
        b_conns = self.connections(b_names)
        ssh_b = self.ssh_connections("hostb")
        await self.wait_for(
            lambda: "rejecting duplicate worker" in launcher_b.output(), 30, "hostb's duplicate to be refused"
        )
        first_refusal_s = reactor.seconds() - started_b
        # Let hostb retry a few times: each retry is refused, nothing else moves.
        await self.wait_for(
            lambda: launcher_b.output().count("rejecting duplicate worker") >= 3,
            30,
            "hostb's retries to be refused",
        )
        refusals = launcher_b.output().count("rejecting duplicate worker")
        arbitration = self.log.matching_after(started_b, "duplicat", SHARED)

        self.assertIs(master.workers.connections.get(SHARED), held[SHARED], "hosta keeps the name")
        self.assertEqual(self.connections(a_names + [SHARED]), held, "hosta's sessions must not be disturbed")
        self.assertEqual(self.connections(b_names), b_conns, "hostb's other sessions must not be disturbed")
        self.assertEqual(self.ssh_connections("hosta"), ssh_a)
        self.assertEqual(self.ssh_connections("hostb"), ssh_b, "hostb's SSH connection must not be dropped")
        self.assertEqual(launcher_b.output().count("connected to master"), 1)
        self.assertIn(f"worker {SHARED}: master rejected the session", launcher_b.output())
        self.assertNotIn("Traceback", launcher_b.output())
        self.assertTrue(arbitration, "the master should log the arbitration")
        await self.assertBuildsGreen([(p, h) for p in PROJECTS for h in ("hosta", "hostb")])
        for launcher in (launcher_a, launcher_b):
            self.assertAlive(launcher)

        # hosta goes away: hostb's session gets the name on one of its retries.
        stop_at = reactor.seconds()
        await S.stop_launcher(reactor, launcher_a)
        await self.wait_for(
            lambda: (
                SHARED in T.attached_workers(master)
                and master.workers.connections[SHARED] is not held[SHARED]
            ),
            60,
            "hostb's session to take the name over",
        )
        takeover_s = reactor.seconds() - stop_at
        self.assertEqual(self.connections(b_names), b_conns)
        self.assertAlive(launcher_b)
        await task.deferLater(reactor, 0.5, lambda: None)
        figures(
            "duplicate worker name",
            first_refusal_after_start_s=first_refusal_s,
            refusals_of_hostb=refusals,
            master_arbitration_log_lines=len(arbitration),
            other_sessions_disturbed=0,
            takeover_after_holder_stopped_s=takeover_s,
        )
