"""The worker side, one process: ``python -m benchmarks.loadgen JSON``.

It reaches the master side either over TCP (plain, or an OpenSSH tunnel's
local port) or over buildbot-sshmux (a real `MasterLink` and a
`ChannelEndpoint` per stream), runs one mode, and prints its figures as one
JSON line:

``bulk``      ``channels`` SINK streams of ``bytes`` each, started together;
``fairness``  a PB ping on its own stream, idle, then while 10 SINK streams
              run flat out;
``stall``     ``channels`` SOURCE requests, then never read the socket again;
``workers``   ``names`` stock buildbot-worker Workers over TCP (attach, scale).
"""

from __future__ import annotations

import cProfile
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.spread import pb
from zope.interface import implementer

from benchmarks.common import percentile, sleep
from buildbot_sshmux.wire.keys import load_private_key
from buildbot_sshmux.worker.link import ChannelEndpoint, HostKeyPins, MasterLink

PAYLOAD = b"w" * (64 * 1024)


@implementer(IPushProducer)
class Sender(protocol.Protocol):
    """Streams ``size`` bytes (None: until stopped) as fast as its transport takes them."""

    def __init__(self, size: int | None) -> None:
        self.left = size
        self.paused = False
        self.writing = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"SINK\n")

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.writing:  # called back from inside our own write()
            return
        self.writing = True
        while not self.paused and self.left != 0:
            n = len(PAYLOAD) if self.left is None else min(len(PAYLOAD), self.left)
            self.transport.write(PAYLOAD if n == len(PAYLOAD) else PAYLOAD[:n])
            if self.left is not None:
                self.left -= n
        self.writing = False
        if self.left == 0:
            self.stop()

    def stop(self) -> None:
        self.left = 0
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.left = 0

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class PongBroker(pb.Broker):
    """A PB client that first names its stream's kind."""

    def connectionMade(self) -> None:
        self.transport.write(b"PONG\n")
        super().connectionMade()


class Requester(protocol.Protocol):
    """Asks for ``size`` bytes; the caller stops reading afterwards."""

    def __init__(self, size: int) -> None:
        self.size = size

    def ask(self) -> None:
        self.transport.write(b"SOURCE %d\n" % self.size)


class Link:
    """Connects protocols to the master side over TCP or buildbot-sshmux."""

    def __init__(self, reactor: Any, spec: dict[str, Any]) -> None:
        self.reactor = reactor
        self.spec = spec
        self.master_link: Any = None

    async def start(self) -> None:
        if self.spec["kind"] != "sshmux":
            return
        pins = HostKeyPins.from_config([self.spec["host_key"]])
        identity = load_private_key(self.spec["identity"])
        self.master_link = MasterLink(self.reactor, "127.0.0.1", self.spec["ssh_port"], identity, pins)
        self.master_link.startService()
        await self.master_link.when_ready()

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.master_link is None:
            endpoint = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.spec["port"])
        else:
            endpoint = ChannelEndpoint(self.master_link, self.spec["target"], "bench")
        return endpoint.connect(factory)

    async def open(self, count: int, make: Callable[[], protocol.Protocol]) -> list[Any]:
        factory = protocol.Factory.forProtocol(make)
        return list(await defer.gatherResults([self.connect(factory) for _ in range(count)]))

    def algorithms(self) -> str:
        if self.master_link is None:
            return ""
        cur = self.master_link.connection.transport.currentEncryptions
        return f"{cur.outCipType.decode()} {cur.outMACType.decode()}"

    def pause_reading(self, protocols: list[Any]) -> None:
        """Stop reading the socket(s) under these streams."""
        if self.master_link is None:
            for p in protocols:
                p.transport.pauseProducing()
        else:
            self.master_link.connection.transport.transport.pauseProducing()

    async def stop(self) -> None:
        if self.master_link is not None:
            await self.master_link.stopService()


async def bulk(reactor: Any, link: Link, p: dict[str, Any]) -> dict[str, Any]:
    senders = await link.open(p["channels"], lambda: Sender(p["bytes"]))
    profiler = cProfile.Profile() if p.get("profile") else None
    cpu = time.process_time()
    if profiler is not None:
        profiler.enable()
    for s in senders:
        s.start()
    await defer.gatherResults([s.lost for s in senders])
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(p["profile"])
    return {"cpu": time.process_time() - cpu}


async def fairness(reactor: Any, link: Link, p: dict[str, Any]) -> dict[str, Any]:
    senders = await link.open(p["channels"], lambda: Sender(None))
    factory = pb.PBClientFactory()
    factory.protocol = PongBroker
    await link.connect(factory)
    root = await factory.getRootObject()
    payload = b"p" * 100

    async def rtts(seconds: float, limit: int) -> list[float]:
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and len(times) < limit:
            start = time.perf_counter()
            call = root.callRemote("ping", payload)
            call.addTimeout(p["timeout"], reactor)
            try:
                await call
            except defer.TimeoutError:
                pass  # counted as the timeout: the p99 shows it
            times.append(time.perf_counter() - start)
            await sleep(reactor, p["gap"])
        return times

    idle = await rtts(1.0, 50)
    for s in senders:
        s.start()
    await sleep(reactor, p["warmup"])
    busy = await rtts(p["seconds"], 1000)
    for s in senders:
        s.stop()
    factory.disconnect()
    await defer.gatherResults([s.lost for s in senders])
    return {
        "idle_p50": percentile(idle, 50), "busy_p50": percentile(busy, 50),
        "busy_p99": percentile(busy, 99), "busy_max": max(busy), "calls": len(busy),
        "timeouts": sum(1 for t in busy if t >= p["timeout"]),
    }  # fmt: skip


async def stall(reactor: Any, link: Link, p: dict[str, Any]) -> dict[str, Any]:
    requesters = await link.open(p["channels"], lambda: Requester(p["bytes"]))
    link.pause_reading(requesters)
    for r in requesters:
        r.ask()
    await sleep(reactor, p["hold"])
    return {}


def workers(reactor: Any, p: dict[str, Any]) -> None:
    """Stock buildbot-worker Workers, all in this process, straight to ``port``; runs until killed.

    ``log``: their log to stdout (as a worker's twistd.log).
    """
    from buildbot_worker.bot import Worker
    from twisted.application import service
    from twisted.logger import globalLogBeginner, textFileLogObserver

    if p.get("log"):
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    top = service.MultiService()
    for name in p["names"]:
        basedir = Path(p["basedir"], name)
        basedir.mkdir(parents=True, exist_ok=True)
        Worker(
            "127.0.0.1", p["port"], name, p["password"].format(name=name), str(basedir), 600
        ).setServiceParent(top)
    reactor.callWhenRunning(top.startService)
    reactor.run()


MODES = {"bulk": bulk, "fairness": fairness, "stall": stall}


def main() -> None:
    from twisted.internet import reactor

    p = json.loads(sys.argv[1])
    if p["mode"] == "workers":
        return workers(reactor, p)
    outcome: dict[str, Any] = {}

    async def run() -> None:
        link = Link(reactor, p)
        await link.start()
        figures = await MODES[p["mode"]](reactor, link, p)
        figures["algorithms"] = link.algorithms()
        await link.stop()
        outcome["figures"] = figures

    def done(result: Any) -> None:
        if isinstance(result, Exception) or hasattr(result, "getTraceback"):
            outcome["error"] = result.getTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(done))
    reactor.run()
    if "error" in outcome:
        sys.exit(f"loadgen failed:\n{outcome['error']}")
    print(json.dumps(outcome["figures"]))


if __name__ == "__main__":
    main()
