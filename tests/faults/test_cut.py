"""Cut the link mid-build, ten times: no build is lost, no log is truncated.

One launcher with four sessions dials the master through a relay.  Each round
forces a build on every session; the shell step streams 20000 numbered lines
over about two seconds, then their sha256; the link is cut (both sides
aborted) at a different moment of the stream each round.  Buildbot must end
each interrupted build (RETRY, or EXCEPTION), the sessions must come back by
themselves, the retried requests must be built green, and every completed
build's log must hold the whole stream and the right checksum.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from buildbot.process.results import EXCEPTION, RETRY, SUCCESS, Results
from twisted.internet import defer, reactor, task

from buildbot_sshmux.demo import harness as T
from tests import support as S

from ..integration.relay import Relay
from .harness import FaultCase, figures

ROUNDS = 10
LINES, CHUNK = 20000, 500
PROJECTS = ["alpha", "beta", "gamma", "delta"]
EXPECTED_SHA = hashlib.sha256("".join(f"{n}\n" for n in range(1, LINES + 1)).encode()).hexdigest()


class CutMidBuildTenTimes(FaultCase):
    timeout = 240

    def test_ten_cuts_lose_no_build_and_no_log_line(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._cuts())

    async def _cuts(self) -> None:
        self.make_site(["hosta"])
        markers = self.root / "started"
        markers.mkdir()
        chunks = LINES // CHUNK
        command = [
            "sh",
            "-c",
            f'touch "{markers}/$PROJECT"; i=0; while [ $i -lt {chunks} ]; do'
            f" seq $((i*{CHUNK}+1)) $((i*{CHUNK}+{CHUNK})); i=$((i+1)); sleep 0.05; done;"
            f" seq 1 {LINES} | sha256sum; echo done",
        ]
        master = await self.start_master(PROJECTS, ["hosta"], command=command)
        names = [T.worker_name(p, "hosta") for p in PROJECTS]
        relay = Relay(reactor, "127.0.0.1", T.ssh_port(master))
        await relay.start()
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))
        launcher = self.launch("hosta", names, ssh_port=relay.port)
        await self.wait_ready(names, timeout=60)
        pid = launcher.process.pid
        rng = random.Random(4)

        all_brids: list[int] = []
        reattach_times: list[float] = []
        round_s: list[float] = []
        for _round in range(ROUNDS):
            started = reactor.seconds()
            for p in PROJECTS:
                (markers / p).unlink(missing_ok=True)
            brids = await T.force_builds(master, [(p, "hosta") for p in PROJECTS])
            all_brids += brids
            await self.wait_for(
                lambda: all((markers / p).exists() for p in PROJECTS), 30, "every shell step to start"
            )
            # Somewhere in the two seconds of output: a different moment each round.
            await task.deferLater(reactor, rng.uniform(0.1, 1.4), lambda: None)
            before = self.connections(names)
            self.assertEqual(relay.cut(), 1, "one relayed connection carries every session")
            reattach_times.append(
                await self.wait_for(
                    lambda before=before: all(
                        master.workers.connections.get(n) not in (None, before.get(n)) for n in names
                    ),
                    30,
                    "every session to re-attach after the cut",
                )
            )
            await self.wait_for_requests(brids, timeout=60)
            round_s.append(reactor.seconds() - started)

        # Nothing stays in progress; every request ended, and ended green.
        builds = await master.data.get(("builds",))
        in_progress = [b["buildid"] for b in builds if not b["complete"]]
        self.assertEqual(in_progress, [], "builds still in progress after every request completed")
        requests = [await master.data.get(("buildrequests", brid)) for brid in all_brids]
        lost = [r["buildrequestid"] for r in requests if r["results"] != SUCCESS]

        interrupted, outcomes, checked_logs = 0, {}, 0
        for brid in all_brids:
            made = await S.builds_of_request(master, brid)
            for build in made[:-1]:
                # Every build but the last of a request was cut short, and Buildbot said so.
                self.assertIn(
                    build["results"], (RETRY, EXCEPTION), f"request {brid}: an earlier build ended {build}"
                )
            for build in made:
                outcomes[Results[build["results"]]] = outcomes.get(Results[build["results"]], 0) + 1
                if build["results"] in (RETRY, EXCEPTION):
                    interrupted += 1
                if build["results"] == SUCCESS:
                    await self.assert_log_complete(build)
                    checked_logs += 1

        figures(
            "cut mid-build x10",
            cuts=ROUNDS,
            build_requests=len(all_brids),
            builds_lost=len(lost),
            builds_interrupted=interrupted,
            build_outcomes=outcomes,
            completed_logs_checked=checked_logs,
            reattach_s_max=max(reattach_times),
            reattach_s_mean=sum(reattach_times) / len(reattach_times),
            round_s_mean=sum(round_s) / len(round_s),
            relay_dials=relay.accepted,
        )
        self.assertEqual(lost, [], f"build requests that did not end SUCCESS: {requests}")
        self.assertGreaterEqual(interrupted, ROUNDS, "each cut should interrupt running builds")
        self.assertAlive(launcher)
        self.assertEqual(launcher.process.pid, pid)
        self.assertEqual(relay.accepted, ROUNDS + 1, "one redial per cut, no more")
        self.assertEqual(relay.active, 1)
        await self.assertBuildsGreen([(p, "hosta") for p in PROJECTS])

    async def wait_for_requests(self, brids: list[int], timeout: float) -> None:
        done: dict[int, bool] = {}

        async def poll() -> None:
            for brid in brids:
                if not done.get(brid):
                    done[brid] = (await self.master.data.get(("buildrequests", brid)))["complete"]

        deadline = reactor.seconds() + timeout
        while True:
            await poll()
            if all(done.values()):
                return
            if reactor.seconds() > deadline:
                self.fail(f"build requests not complete after {timeout}s: {done}\n{self.diagnostics()}")
            await task.deferLater(reactor, 0.2, lambda: None)

    async def assert_log_complete(self, build: dict[str, Any]) -> None:
        lines = await S.build_stdout(self.master, build)
        numbers, tail = lines[:LINES], lines[LINES:]
        expected = [str(n) for n in range(1, LINES + 1)]
        if numbers != expected:
            missing = sorted(set(expected) - set(numbers), key=int)[:10]
            self.fail(
                f"build {build['buildid']}: stdout lines differ ({len(numbers)} lines, missing {missing})"
            )
        self.assertEqual(tail, [f"{EXPECTED_SHA}  -", "done"], f"build {build['buildid']}: checksum line")
