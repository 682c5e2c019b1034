"""Two launchers run with one host key (a second one started by mistake).

The first holds the host's connection and its sessions.  The second is
refused with "too many connections" (the master probes the first with a
keepalive, and it answers), logs the refusal and backs off, again at each
retry; the first one's sessions and SSH connection are never disturbed.
When the first stops, the second takes over on one of its retries.
"""

from __future__ import annotations

import re
import shutil

from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from tests import support as S

from .harness import FaultCase, figures

PROJECTS = ["alpha", "beta"]
REFUSED = "refused this connection: too many connections"


class SharedKey(FaultCase):
    timeout = 150

    def test_second_launcher_with_the_same_key_is_refused_and_backs_off(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._shared_key())

    async def _shared_key(self) -> None:
        self.make_site(["hosta"])
        await self.start_master(PROJECTS, ["hosta"])
        names = [T.worker_name(p, "hosta") for p in PROJECTS]
        first = self.launch("hosta", names)
        await self.wait_ready(names)
        held = self.connections(names)
        ssh = self.ssh_connections("hosta")

        # The same config, key and worker names, in a second process.
        second_config = first.config.with_name("ssh-worker-second.toml")
        shutil.copy(first.config, second_config)
        started = reactor.seconds()
        second = self.start_launcher(second_config)
        await self.wait_for(lambda: second.output().count(REFUSED) >= 3, 60, "three refusals of the second")
        third_refusal_s = reactor.seconds() - started
        master_lines = self.log.matching_after(started, "refused a second connection of host hosta")

        self.assertEqual(self.connections(names), held, "the first launcher's sessions must not be disturbed")
        self.assertEqual(self.ssh_connections("hosta"), ssh, "the first launcher's connection must stay")
        await self.assertBuildsGreen([(p, "hosta") for p in PROJECTS])
        self.assertGreaterEqual(len(master_lines), 3)
        for _t, line in master_lines:
            self.assertIn("is connected from 127.0.0.1:", line)
        # It backs off: each redial waits longer (1, 2, 4 s, jittered by +-50%).
        delays = [float(d) for d in re.findall(r"redialling master \S+ in ([\d.]+)s", second.output())]
        self.assertGreaterEqual(len(delays), 3, second.output())
        self.assertGreater(delays[2], delays[0])
        self.assertNotIn("Traceback", second.output())
        self.assertAlive(first)
        self.assertAlive(second)

        # The first stops: the second's next retry takes the host over.
        stopped = reactor.seconds()
        await S.stop_launcher(reactor, first)
        await self.wait_attached(names, timeout=90)
        takeover_s = reactor.seconds() - stopped
        self.assertNotEqual(self.connections(names), held)
        await self.assertBuildsGreen([(p, "hosta") for p in PROJECTS])
        figures(
            "two launchers, one host key",
            third_refusal_after_start_s=third_refusal_s,
            refusals_logged_by_second=second.output().count(REFUSED),
            master_refusal_lines=len(master_lines),
            redial_delays_s=[round(d, 1) for d in delays[:4]],
            first_launchers_sessions_disturbed=0,
            takeover_after_first_stopped_s=takeover_s,
        )
