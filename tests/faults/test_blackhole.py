"""A blackholed link (no byte, no FIN either way) is found by the keepalives.

Both sides send ``keepalive@openssh.com`` every second and give up after three
unanswered ones; the relay drops the link without closing anything.  Each
side must drop the connection within interval x count_max, plus the interval
it may take before the first unanswered keepalive is sent (4 s here), and
the sessions must re-attach once the path is back.
"""

from __future__ import annotations

from buildbot.process.results import SUCCESS
from twisted.internet import defer, reactor, task

from buildbot_sshmux.demo import harness as T
from tests import support as S

from .harness import FaultCase, figures
from .relay import FaultRelay

INTERVAL, COUNT = 1, 3
BOUND = INTERVAL * COUNT + INTERVAL  # interval x count, plus one interval of slack
SCHEDULING = 0.5  # a busy 2-core machine may run a timer this late


class BlackholeDetected(FaultCase):
    timeout = 120

    def test_blackhole_is_detected_by_both_sides_and_sessions_reattach(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._blackhole())

    async def _blackhole(self) -> None:
        projects = ["alpha", "beta", "gamma"]
        self.make_site(["hosta"])
        master = await self.start_master(
            projects,
            ["hosta"],
            service_kwargs={"keepalive_interval": INTERVAL, "keepalive_count_max": COUNT},
        )
        names = [T.worker_name(p, "hosta") for p in projects]
        relay = FaultRelay(reactor, "127.0.0.1", T.ssh_port(master))
        await relay.start()
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))
        launcher = self.launch("hosta", names, ssh_port=relay.port, keepalive=(INTERVAL, COUNT))
        await self.wait_ready(names)
        # Keepalives flow both ways: a quiet, healthy link stays up.
        await task.deferLater(reactor, INTERVAL * (COUNT + 2), lambda: None)
        self.assertEqual(relay.accepted, 1, "a healthy link must not be dropped by the keepalives")
        await self.assertBuildsGreen([(p, "hosta") for p in projects])
        old = self.connections(names)
        self.assertEqual(len(self.ssh_connections("hosta")), 1)

        start = reactor.seconds()
        relay.blackhole()
        await self.wait_for(
            lambda: not self.ssh_connections("hosta"), 3 * BOUND, "the master to drop the link"
        )
        await self.wait_for(
            lambda: relay.first("launcher side closed", start) is not None,
            3 * BOUND,
            "the launcher to drop the link",
        )
        master_s = relay.first("master side closed", start) - start
        launcher_s = relay.first("launcher side closed", start) - start
        await self.wait_detached(names, timeout=10)
        detached_s = reactor.seconds() - start
        fp = S.host_fingerprint(self.site, "hosta")
        master_lines = self.log.matching_after(start, "host hosta (", fp, "no answer to", "keepalives")
        self.assertEqual(
            len(master_lines), 1, f"one log line for the master's keepalive loss: {master_lines}"
        )
        self.assertIn("no answer to 3 keepalives", launcher.output())
        # The launcher keeps redialling into the blackhole meanwhile.
        await task.deferLater(reactor, 1.0, lambda: None)

        restored = reactor.seconds()
        relay.restore()
        reattach_s = await self.wait_for(
            lambda: all(master.workers.connections.get(n) not in (None, old[n]) for n in names),
            60,
            "every session to re-attach after the blackhole",
        )
        ready_s = await self.wait_ready(names, timeout=30) + reattach_s
        self.assertAlive(launcher)
        results = await T.run_builds(master, [(p, "hosta") for p in projects])
        figures(
            "blackhole (keepalive 1s x 3, both sides)",
            detection_master_s=master_s,
            detection_launcher_s=launcher_s,
            bound_s=float(BOUND),
            workers_detached_by_s=detached_s,
            reattach_after_restore_s=reattach_s,
            ready_after_restore_s=ready_s,
            relay_dials=relay.accepted,
            restored_after_s=restored - start,
        )
        for who, seconds in (("master", master_s), ("launcher", launcher_s)):
            self.assertGreaterEqual(
                seconds, INTERVAL * COUNT - SCHEDULING, f"the {who} dropped a live link too early"
            )
            self.assertLessEqual(
                seconds,
                BOUND + SCHEDULING,
                f"the {who} took {seconds:.2f}s to find the blackhole (bound {BOUND}s)",
            )
        self.assertEqual(results, [SUCCESS] * len(projects), self.diagnostics())
