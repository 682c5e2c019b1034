"""memory: master RSS while a peer asks for data and never reads it.

The worker side opens ``channels`` streams, asks each for ``bytes`` (the
master writes them at once, as PB writes a large answer), then never reads
its socket again.  The master's peak RSS (VmHWM, reset before the peer
connects) less its RSS before is the figure; buildbot-sshmux should hold it
near its per-connection budget (`FlowLimits.connection_max_buffer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.server import DataServer
from buildbot_sshmux.wire.channel import FlowLimits


async def run(reactor: Any, transport: str, root: Path, p: dict[str, Any]) -> dict[str, Any]:
    server = DataServer(reactor, transport, root)
    await server.start()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = common.rss()
        await server.loadgen({"mode": "stall", **p["loadgen"]})
        peak = common.peak_rss()
    finally:
        await server.stop()
    limits = FlowLimits()
    return {
        "rss_before": before, "peak_growth": peak - before, "requested": server.bench.written * 64 * 1024,
        "aborted_streams": server.bench.aborted, "streams": server.bench.sources,
        "budget": limits.connection_max_buffer, "high_water": limits.connection_high_water,
    }  # fmt: skip
