"""A peer that stops reading cannot make the master buffer without bound.

A raw client (``stalled_client.py``, a child process built from this
package's own `MasterLink` and `ChannelEndpoint`, so its memory is not the
master's) logs in as host ``hostx`` and opens eight PB channels.  Then it
stops reading its socket and sends 3000 PB calls per channel, each making the
master answer with a ~740-byte error: ~17 MiB of answers, of which the
client's windows let 8 MiB out.  The rest piles up in the master.

The master runs with ``connection_max_buffer`` = 4 MiB: the data it holds for
that connection (``budget.pending``) and its memory growth (VmRSS) must stay
under 4 MiB + 20%, the channels that overflow are aborted with one log line
each, and another host keeps building meanwhile.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

from buildbot.process.results import SUCCESS
from twisted.internet import defer, protocol, reactor, task

from buildbot_sshmux.demo import harness as T

from .harness import FaultCase, figures, vm_rss_kib

MiB = 1024 * 1024
CONNECTION_MAX_BUFFER = 4 * MiB
CONNECTION_HIGH_WATER = 2 * MiB
BOUND = CONNECTION_MAX_BUFFER * 1.2
CHANNELS, CALLS = 8, 3000
STALL_SECONDS = 8.0
CLIENT = Path(__file__).with_name("stalled_client.py")


class ClientProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.lines += [line.decode(errors="replace").strip() for line in lines]

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def line(self, prefix: str) -> str | None:
        return next((line for line in self.lines if line.startswith(prefix)), None)


class StalledPeer(FaultCase):
    timeout = 150

    def test_stalled_reader_is_bounded_and_others_keep_building(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stalled())

    async def _stalled(self) -> None:
        projects = ["alpha", "beta"]
        self.make_site(["hosta", "hostx"])
        master = await self.start_master(
            projects,
            ["hosta"],
            service_kwargs={
                "connection_max_buffer": CONNECTION_MAX_BUFFER,
                "connection_high_water": CONNECTION_HIGH_WATER,
                # The client never logs in: past the default 16 KiB of PB before
                # login its channels would be closed before any answer queued
                # (test_public_port covers that bound); this test is about output.
                "pb_login_bytes": 64 * MiB,
                "pb_login_items": 1_000_000,
                "pb_connection_login_bytes": 64 * MiB,
            },
        )
        names = [T.worker_name(p, "hosta") for p in projects]
        launcher = self.launch("hosta", names)
        await self.wait_ready(names)
        await self.assertBuildsGreen([(p, "hosta") for p in projects])

        client = ClientProcess()
        args = [
            sys.executable, str(CLIENT), str(T.ssh_port(master)), str(T.pb_port(master)),
            str(self.site.identities["hostx"]), self.site.host_key_line, str(CHANNELS), str(CALLS),
        ]  # fmt: skip
        process = reactor.spawnProcess(client, sys.executable, args, env=None)

        def kill() -> Any:
            if process.pid is not None:
                process.signalProcess("KILL")
                return client.ended
            return None

        self.addCleanup(kill)
        await self.wait_for(
            lambda: client.line("READY") or client.line("FAILED") or client.ended.called,
            30,
            "the stalled client to open its channels",
        )
        self.assertTrue(client.line("READY"), f"{client.lines} {client.errors.decode(errors='replace')}")
        (server,) = self.ssh_connections("hostx")
        budget = server.service.budget
        peak = {"pending": 0}
        charge = budget.charge

        def charged(n: int) -> None:
            charge(n)
            peak["pending"] = max(peak["pending"], budget.pending)

        budget.charge = charged  # type: ignore[method-assign]

        # A controlled comparison: the same build loop, for as long, first without
        # the stall, then with it.  The master's RSS grows a little while it
        # builds (sqlite's page cache, Buildbot's caches); what the stall adds
        # on top is the stalled peer's.
        requests = [(p, "hosta") for p in projects]
        control_kib, _times, control_results = await self.build_for(STALL_SECONDS, requests)
        stall_started = reactor.seconds()

        def go() -> None:
            process.write(b"GO\n")  # the client stops reading, and asks

        stall_kib, build_times, results = await self.build_for(STALL_SECONDS, requests, then=go)
        results += control_results
        sent = client.line("SENT")
        overflows = self.log.matching_after(stall_started, "the peer is not reading")
        held_at_end = budget.pending

        # The peer goes away: everything it held is released.
        process.closeStdin()
        await client.ended
        await self.wait_for(
            lambda: not self.ssh_connections("hostx"), 20, "the stalled peer's connection to close"
        )
        self.assertEqual(budget.pending, 0)

        rss_delta = stall_kib * 1024
        attributable = (stall_kib - control_kib) * 1024
        figures(
            "stalled peer (connection_max_buffer 4 MiB)",
            client_sent=sent,
            peak_budget_pending_mib=peak["pending"] / MiB,
            bound_mib=BOUND / MiB,
            rss_peak_delta_builds_alone_mib=control_kib / 1024,
            rss_peak_delta_builds_and_stall_mib=rss_delta / MiB,
            rss_growth_due_to_stall_mib=attributable / MiB,
            pending_at_end_mib=held_at_end / MiB,
            channels_aborted_for_not_reading=len(overflows),
            other_host_builds=len(results),
            other_host_build_s_max=max(build_times),
        )
        self.assertTrue(sent, f"the client did not send its calls: {client.lines}")
        self.assertEqual(results, [SUCCESS] * len(results), self.diagnostics())
        self.assertGreaterEqual(len(build_times), 2, "the other host should keep building during the stall")
        self.assertGreater(peak["pending"], CONNECTION_HIGH_WATER, "the stall should have filled the buffers")
        self.assertGreaterEqual(len(overflows), 1, "a channel past connection_max_buffer should be aborted")
        for _t, line in overflows:
            self.assertIn("host hostx", line)
        self.assertLessEqual(peak["pending"], BOUND, "budget.pending went past connection_max_buffer + 20%")
        self.assertLessEqual(
            attributable, BOUND, "the stalled peer grew the master's memory past connection_max_buffer + 20%"
        )
        self.assertAlive(launcher)

    async def build_for(
        self, seconds: float, requests: list[tuple[str, str]], then: Any = None
    ) -> tuple[int, list[float], list[int]]:
        """Build ``requests`` again and again for ``seconds``.

        Return the peak growth of this process's VmRSS meanwhile (KiB, from
        its value at the start, after a collection), each round's time and
        every result.  ``then`` is called once the starting value is taken.
        """
        gc.collect()
        await task.deferLater(reactor, 0.5, lambda: None)
        start_kib = vm_rss_kib()
        peak = [start_kib]
        sampler = task.LoopingCall(lambda: peak.append(max(peak.pop(), vm_rss_kib())))
        sampler.start(0.02)
        if then is not None:
            then()
        times: list[float] = []
        results: list[int] = []
        start = reactor.seconds()
        try:
            while reactor.seconds() - start < seconds:
                t0 = reactor.seconds()
                results += await T.run_builds(self.master, requests)
                times.append(reactor.seconds() - t0)
        finally:
            sampler.stop()
        return max(peak[0], vm_rss_kib()) - start_kib, times, results
