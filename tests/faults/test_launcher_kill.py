"""The launcher is killed (SIGKILL) mid-build and started again.

Two ways a launcher dies:

- its process is killed: the kernel closes its socket and the master hears
  it at once;
- its host dies with it (power, a kernel panic, a cut cable): nothing reaches
  the master, whose connection stays half open.  The relay plays that
  (``half_open``).  The master's keepalives (5 s x 3 here) would free the old
  sessions only after 15-20 s; the restarted launcher's connection from the
  same host key makes the master probe the old one with a keepalive, and
  replaces it once that goes unanswered for duplicate_probe_timeout (3 s;
  max_connections_per_host=1).

Either way the new sessions must attach, without duplicate-name rejections
lasting past one keepalive interval, and the interrupted builds must be
rebuilt green.
"""

from __future__ import annotations

import signal
from typing import Any

from buildbot.process.results import EXCEPTION, RETRY, SUCCESS, Results
from twisted.internet import defer, reactor, task

from buildbot_sshmux.demo import harness as T
from tests import support as S

from .harness import FaultCase, figures
from .relay import FaultRelay

SESSIONS = 20
BUSY = ["p00", "p01", "p02"]  # projects with a build running when the launcher dies
INTERVAL, COUNT = 5, 3


class LauncherKilled(FaultCase):
    timeout = 150
    # Buildbot's duplicate-name arbitration logs its refusal with a traceback.
    expected_errors = ((RuntimeError, "rejecting duplicate worker"),)

    def test_sigkill_launcher_restarts_and_reattaches(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._kill(half_open=False))

    def test_sigkill_with_half_open_connection_newest_wins(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._kill(half_open=True))

    async def _kill(self, half_open: bool) -> None:
        projects = [f"p{i:02d}" for i in range(SESSIONS)]
        self.make_site(["hosta"])
        markers = self.root / "started"
        markers.mkdir()
        # Short sleeps: the killed launcher's orphaned commands end by themselves.
        command = ["sh", "-c", f'touch "{markers}/$PROJECT"; sleep 4; echo done']
        master = await self.start_master(
            projects,
            ["hosta"],
            command=command,
            service_kwargs={"keepalive_interval": INTERVAL, "keepalive_count_max": COUNT},
        )
        names = [T.worker_name(p, "hosta") for p in projects]
        port = T.ssh_port(master)
        relay: FaultRelay | None = None
        if half_open:
            relay = FaultRelay(reactor, "127.0.0.1", port)
            await relay.start()
            self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))
            port = relay.port
        first = self.launch("hosta", names, ssh_port=port)
        await self.wait_ready(names, timeout=60)
        old = self.connections(names)
        old_ssh = self.ssh_connections("hosta")
        self.assertEqual(len(old_ssh), 1)

        brids = await T.force_builds(master, [(p, "hosta") for p in BUSY])
        await self.wait_for(
            lambda: all((markers / p).exists() for p in BUSY), 30, "the builds' steps to start"
        )
        if relay is not None:
            relay.half_open = True
        killed_at = reactor.seconds()
        first.process.send_signal(signal.SIGKILL)
        await S.wait_process_exit(reactor, first, 10)

        freed_by_kill_s: Any = "-"
        if half_open:
            # The master cannot know: the old connection and sessions stay.
            await task.deferLater(reactor, 1.5, lambda: None)
            self.assertEqual(
                self.ssh_connections("hosta"), old_ssh, "the half-open connection should look alive"
            )
            self.assertEqual(self.connections(names), old, "the half-open sessions should look attached")
        else:
            await self.wait_detached(names, timeout=10)
            freed_by_kill_s = reactor.seconds() - killed_at

        restart_at = reactor.seconds()
        second = self.start_launcher(first.config)  # the same config, the same host key
        new_ssh_s = await self.wait_for(
            lambda: any(c not in old_ssh for c in self.ssh_connections("hosta")), 30, "the new SSH connection"
        )
        old_closed_s = await self.wait_for(
            lambda: not any(c in old_ssh for c in self.ssh_connections("hosta")),
            30,
            "the old SSH connection to close",
        )
        all_s = await self.wait_for(
            lambda: all(master.workers.connections.get(n) not in (None, old.get(n)) for n in names),
            60,
            "every session to re-attach",
        )
        ready_s = await self.wait_ready(names, timeout=30) + all_s
        duplicates = self.log.matching_after(restart_at, "duplicat")
        last_duplicate_s = max((t - restart_at for t, _l in duplicates), default=0.0)
        replaced = self.log.matching_after(restart_at, "connected again", "did not answer a keepalive")

        results = await T.buildrequest_results(master, brids)
        outcomes = []
        for brid in brids:
            made = await S.builds_of_request(master, brid)
            outcomes.append("/".join(Results[b["results"]] for b in made))
            self.assertIn(made[0]["results"], (RETRY, EXCEPTION), f"the killed build ended {made[0]}")
        self.assertEqual(
            results, [SUCCESS] * len(BUSY), f"interrupted builds: {outcomes}\n{self.diagnostics()}"
        )
        self.assertEqual(len(self.ssh_connections("hosta")), 1)
        self.assertAlive(second)

        kind = "half-open (host died)" if half_open else "process killed"
        figures(
            f"launcher SIGKILL, {kind}, {SESSIONS} sessions",
            master_freed_old_sessions_on_kill_s=freed_by_kill_s,
            restart_to_new_ssh_connection_s=new_ssh_s,
            restart_to_old_connection_closed_s=new_ssh_s + old_closed_s,
            restart_to_all_attached_s=new_ssh_s + old_closed_s + all_s,
            restart_to_all_ready_s=new_ssh_s + old_closed_s + ready_s,
            kill_to_all_ready_s=restart_at - killed_at + new_ssh_s + old_closed_s + ready_s,
            duplicate_name_log_lines=len(duplicates),
            last_duplicate_after_restart_s=last_duplicate_s,
            replaced_connection_log_lines=len(replaced),
            interrupted_builds=outcomes,
        )
        if half_open:
            self.assertEqual(len(replaced), 1, "the replacement of the old connection should be logged once")
            self.assertIn("host hosta (", replaced[0][1])
        self.assertLessEqual(
            last_duplicate_s,
            INTERVAL,
            f"duplicate-name rejections lasted past one keepalive interval: {duplicates}",
        )
        self.assertLessEqual(
            new_ssh_s + old_closed_s + all_s,
            INTERVAL,
            "the new sessions should all attach within one keepalive interval of the restart",
        )
