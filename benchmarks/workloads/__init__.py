"""The master side of one workload over one transport, in its own process:

    python -m benchmarks.workloads '{"workload": "bulk", "transport": "sshmux", "root": DIR, ...}'

prints its figures as one JSON line; its log goes to DIR/master.log.  The
worker side runs in child processes (benchmarks.loadgen, ssh-worker).  A
workload whose module says ``EXIT_AT_ONCE`` leaves once it has its figures,
without the reactor's shutdown (closing ten thousand sessions one by one).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

WORKLOADS = ("bulk", "fairness", "memory", "attach", "e2e", "scale")


def main() -> None:
    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    p = json.loads(sys.argv[1])
    root = Path(p["root"])
    root.mkdir(parents=True, exist_ok=True)
    log_file = open(root / "master.log", "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    workload = importlib.import_module(f"benchmarks.workloads.{p['workload']}")
    outcome: dict[str, Any] = {}

    async def go() -> None:
        outcome["figures"] = await workload.run(reactor, p["transport"], root, p)

    def done(result: Any) -> None:
        if hasattr(result, "getTraceback"):
            outcome["error"] = result.getTraceback()
        elif getattr(workload, "EXIT_AT_ONCE", False):
            print(json.dumps(outcome["figures"]), flush=True)
            log_file.flush()
            os._exit(0)
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(go()).addBoth(done))
    reactor.run()
    if "error" in outcome:
        sys.exit(
            f"{p['workload']} over {p['transport']} failed (log: {root / 'master.log'}):\n{outcome['error']}"
        )
    print(json.dumps(outcome["figures"]))


if __name__ == "__main__":
    main()
