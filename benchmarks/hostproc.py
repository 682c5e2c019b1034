"""A worker host's process as the scale workload runs it: started ahead, gated, its keepalives compressible.

    python -m benchmarks.hostproc K DIR MODULE ARGS...

imports what ``python -m MODULE ARGS...`` (``buildbot_sshmux.cli.ssh_worker
run CONFIG``, or ``benchmarks.loadgen``) needs, writes DIR/ready, and waits
for SIGUSR1 to run it, unchanged: fifty hosts' Python start-up, on the
master's two cores, is no part of an attach.  SIGUSR2 then `compress`es its
keepalives by K and writes what it found to DIR/idle.json.

An idle hour, compressed: `compress` finds, in this process, every timer that
fires once per session or per connection and shortens its period K times,
each at a random phase within the new period, so that they fire at their new
steady rate at once:

- buildbot-worker's PB keepalive to the master (``BotFactory``, 600 s:
  ``keepalive`` in buildbot.tac, or in a launcher's config);
- Buildbot master's keepalive to each worker (``Connection``, 3600 s: a class
  attribute Buildbot has no setting for);
- buildbot-sshmux's SSH keepalives, both ends (`Keepalive`, 30 s:
  ``keepalive_interval``), their count of unanswered ones K times as large,
  so a busy peer is given as long as before.

Timers of a fixed period (a launcher's Rebalancer and status line, the
master's authorized_hosts watcher, Buildbot's heartbeat) are left alone.
"""

from __future__ import annotations

import gc
import importlib
import json
import random
import runpy
import signal
import sys
from collections import Counter
from pathlib import Path

import attrs


def compress(k: int, rng: random.Random | None = None) -> dict[str, int]:
    """Shorten this process's keepalive timers K times; how many of each kind."""
    rng = rng or random.Random()
    worker_pb = sys.modules.get("buildbot_worker.pb")
    master_pb = sys.modules.get("buildbot.worker.protocols.pb")
    liveness = sys.modules.get("buildbot_sshmux.wire.liveness")
    found: Counter[str] = Counter()
    for obj in gc.get_objects():
        if worker_pb is not None and isinstance(obj, worker_pb.BotFactory):
            timer = obj.keepaliveTimer
            if obj.keepaliveInterval and timer is not None and timer.active():
                obj.keepaliveInterval /= k
                timer.reset(rng.uniform(0, obj.keepaliveInterval))
                found["worker PB keepalive"] += 1
        elif master_pb is not None and isinstance(obj, master_pb.Connection):
            handler = obj._keepalive_action_handler
            timer = handler._timer
            if timer is not None and timer.active():
                handler.set_interval(handler._interval / k)
                timer.reset(rng.uniform(0, handler._interval))
                found["master PB keepalive"] += 1
        elif liveness is not None and isinstance(obj, liveness.Keepalive):
            settings = obj.settings
            if settings.keepalive_interval > 0 and obj._call is not None:
                obj.settings = attrs.evolve(
                    settings,
                    keepalive_interval=settings.keepalive_interval / k,
                    keepalive_count_max=settings.keepalive_count_max * k,
                )
                obj._call.reset(rng.uniform(0, obj.settings.keepalive_interval))
                found["SSH keepalive"] += 1
    return dict(found)


PRELOAD = {
    "buildbot_sshmux.cli.ssh_worker": ["buildbot_sshmux.worker.runner", "buildbot_worker.bot"],
    "benchmarks.loadgen": ["buildbot_worker.bot"],
}
"""What each module imports once it runs, imported before the gate."""


def main() -> None:
    k, where, module, *args = sys.argv[1:]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    from twisted.internet import reactor

    for name in [module, *PRELOAD.get(module, [])]:
        importlib.import_module(name)
    report = Path(where, "idle.json")

    def compress_and_report() -> None:
        report.write_text(json.dumps(compress(int(k))))

    signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(compress_and_report))
    Path(where, "ready").touch()
    signal.sigwait({signal.SIGUSR1})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
