"""bulk: MB/s of raw byte streams worker -> master, and CPU seconds per GB on each side.

The same number of bytes goes through 1, 10 or 100 streams opened first and
started together; throughput is timed at the master, first byte to last.  CPU
is each process's own: the master's from first to last byte, the sender's
from start to its last close, plus sshd's and ssh's for the OpenSSH tunnel.
With ``profile``, the first run is profiled over those same spans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.server import DataServer, Sink


async def run(reactor: Any, transport: str, root: Path, p: dict[str, Any]) -> dict[str, Any]:
    server = DataServer(reactor, transport, root, rtt=p.get("rtt_ms", 0) / 1000)
    await server.start()
    runs: dict[str, list[dict[str, float]]] = {str(n): [] for n in p["channels"]}
    try:
        for rep in range(p["reps"]):
            for n in p["channels"]:
                per_channel = p["bytes"] // n
                profile = p.get("profile") if rep == 0 else None
                sink = server.bench.sink = Sink(per_channel * n, profile and f"{profile}.master")
                helpers = server.helper_cpu()
                worker = await server.loadgen(
                    {
                        "mode": "bulk",
                        "channels": n,
                        "bytes": per_channel,
                        "profile": profile and f"{profile}.worker",
                    }
                )
                await sink.done
                master_helper, worker_helper = (b - a for a, b in zip(helpers, server.helper_cpu()))
                figures = sink.figures()
                gb = sink.expected / 1e9
                runs[str(n)].append({
                    "mb_per_s": sink.expected / figures["seconds"] / 1e6,
                    "master_cpu_s_per_gb": (figures["cpu"] + master_helper) / gb,
                    "worker_cpu_s_per_gb": (worker["cpu"] + worker_helper) / gb,
                })  # fmt: skip
                server.algorithms = server.algorithms or worker["algorithms"]
    finally:
        await server.stop()
    return {"runs": runs, "algorithms": server.algorithms}
