"""An idle host costs the master's log nothing, and its launcher's log nothing.

At 200 hosts every per-keepalive line is thousands of lines an hour.  A host
with two sessions sits idle for 12 s with keepalives every second both ways
(the default is every 30 s): neither log may grow by a line meanwhile.  The
figure is lines per idle host per hour, scaled to the default interval.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task

from buildbot_sshmux.demo import harness as T

from .harness import FaultCase, figures

PROJECTS = ["alpha", "beta"]
INTERVAL, IDLE_SECONDS = 1, 12
DEFAULT_INTERVAL = 30


class IdleLogs(FaultCase):
    timeout = 90

    def test_an_idle_host_logs_nothing_on_either_side(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._idle())

    async def _idle(self) -> None:
        self.make_site(["hosta"])
        await self.start_master(
            PROJECTS, ["hosta"], service_kwargs={"keepalive_interval": INTERVAL, "keepalive_count_max": 5}
        )
        names = [T.worker_name(p, "hosta") for p in PROJECTS]
        launcher = self.launch("hosta", names, keepalive=(INTERVAL, 5))
        await self.wait_ready(names)
        await task.deferLater(reactor, 2, lambda: None)  # the attach's own lines are done
        master_before = len(self.log.lines)
        launcher_before = len(launcher.output().splitlines())
        await task.deferLater(reactor, IDLE_SECONDS, lambda: None)
        master_lines = self.log.lines[master_before:]
        launcher_lines = launcher.output().splitlines()[launcher_before:]
        keepalives = IDLE_SECONDS / INTERVAL
        per_hour = 3600 / DEFAULT_INTERVAL / keepalives  # lines a keepalive interval, scaled to an hour
        figures(
            "idle host, keepalives every 1 s both ways",
            idle_s=IDLE_SECONDS,
            master_lines=len(master_lines),
            launcher_lines=len(launcher_lines),
            master_lines_per_idle_host_per_hour=round(len(master_lines) * per_hour),
            launcher_lines_per_hour=round(len(launcher_lines) * per_hour),
            example_master_line=master_lines[0][:160] if master_lines else None,
            example_launcher_line=launcher_lines[0][:160] if launcher_lines else None,
        )
        self.assertEqual(master_lines, [], "the master logged while the host was idle")
        self.assertEqual(launcher_lines, [], "the launcher logged while idle")
        self.assertAlive(launcher)


ROUTINE = ("Starting factory", "Stopping factory", "opening channel", "Scheduling retry", "connection lost")


class PlannedStopLogs(FaultCase):
    """A launcher attaching and a master stopping on purpose: events, not noise."""

    timeout = 90

    def test_attach_and_planned_stop_are_a_few_lines_at_info(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._planned())

    async def _planned(self) -> None:
        self.make_site(["hosta"])
        master = await self.start_master(PROJECTS, ["hosta"])
        names = [T.worker_name(p, "hosta") for p in PROJECTS]
        launcher = self.launch("hosta", names)
        await self.wait_ready(names)
        await task.deferLater(reactor, 1, lambda: None)
        attach_lines = launcher.output().splitlines()
        master_before = len(self.log.lines)
        await self.stop_master(master)
        await self.wait_for(lambda: "redialling master" in launcher.output(), 20, "the launcher to redial")
        stop_lines = launcher.output().splitlines()[len(attach_lines) :]
        stop_lines = stop_lines[: next(i for i, line in enumerate(stop_lines) if "redialling" in line) + 1]
        master_stop_lines = [
            line for line in self.log.lines[master_before:] if "hosta" in line or "worker host" in line
        ]
        figures(
            "planned master stop",
            launcher_lines_to_attach_2_sessions=len(attach_lines),
            launcher_lines_for_the_stop=len(stop_lines),
            master_sshmux_lines_for_the_stop=len(master_stop_lines),
            launcher_stop_lines=[line.split("] ", 1)[-1][:90] for line in stop_lines],
        )
        for line in attach_lines + stop_lines:
            for routine in ROUTINE:
                self.assertNotIn(routine, line)
        for line in stop_lines:
            self.assertNotRegex(line, r"#(warn|error|critical)\]", "a planned stop is not a fault")
        self.assertTrue(any("is shutting down" in line for line in stop_lines), stop_lines)
        # Buildbot's stopService runs a quick clean shutdown first: the master
        # may announce it (hosts move their sessions) before it disconnects them.
        self.assertEqual(
            len([line for line in master_stop_lines if "disconnecting 1 worker hosts" in line]), 1
        )
        self.assertLessEqual(len([line for line in master_stop_lines if "once its builds end" in line]), 1)
        self.assertAlive(launcher)
