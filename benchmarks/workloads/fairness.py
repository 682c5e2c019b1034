"""fairness: round trip of a small PB call on its own stream, alone and while
10 other streams of the same connection send bulk as fast as they can.

Over plain TCP every stream is its own connection; over buildbot-sshmux and
the OpenSSH tunnel all share one SSH connection.  A call that takes longer
than ``timeout`` is counted at ``timeout``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.server import DataServer, Sink


async def run(reactor: Any, transport: str, root: Path, p: dict[str, Any]) -> dict[str, Any]:
    server = DataServer(reactor, transport, root)
    await server.start()
    runs = []
    try:
        for _rep in range(p["reps"]):
            sink = server.bench.sink = Sink(1 << 62)
            figures = await server.loadgen({"mode": "fairness", **p["loadgen"]})
            if sink.first is not None:  # the bulk streams have stopped: their rate meanwhile
                figures["bulk_mb_per_s"] = sink.received / 1e6 / (time.perf_counter() - sink.first[0])
            runs.append(figures)
    finally:
        await server.stop()
    return {"runs": runs, "algorithms": runs[0]["algorithms"] if runs else ""}
