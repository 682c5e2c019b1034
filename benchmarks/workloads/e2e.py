"""e2e: bulk data worker -> master through Buildbot itself, on a real master.

A real master (sqlite, as for attach) and ``sessions`` real worker sessions
over the transport, started as attach starts them (stock Workers over TCP or
the OpenSSH tunnel, ``ssh-worker`` over sshmux).  Two builders, each with
every worker; a round forces 1 or ``sessions`` builds of one of them at once,
``bytes`` split evenly across the builds:

- ``upload``: a `FileUpload` of a random file the harness wrote beforehand
  (outside the timing) next to the workers;
- ``log``: a `ShellCommand` writing its share to stdout (``yes LINE | head -c``),
  a log stream the master splits into lines, compresses and stores.

Timed at the master, inside the steps: each waits in its ``run()`` until
every step of the round is there, then all go at once; a round's figure is
its bytes over the span from then to the last step's end (its stdio log
finished).  CPU is the master process's (its database threads included) and
the worker side process's over that span, plus sshd's and ssh's for the
OpenSSH tunnel.  Every uploaded file is checked at the master afterwards
(size and sha256) and every log stream as it comes (bytes and CRC-32 of
stdout, seen by a log observer): a round that moved the wrong bytes, lost a
worker session (Buildbot would retry the build: the round is cancelled) or
did not end in ``round_timeout`` answers {"error": ...} instead of figures.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from pathlib import Path
from typing import Any

from twisted.internet import defer

from benchmarks import common
from benchmarks.workloads.attach import HOST, start_workers
from buildbot_sshmux.demo import harness as T

LINE = b"".join(b"%x" % (i % 16) for i in range(63)) + b"\n"
"""One stdout line of the log stream (64 bytes); the log's bytes are a multiple of it."""

BLOCK = 64 * 1024
"""Each build's share is rounded down to a multiple of this (and so of LINE)."""

KINDS = ("upload", "log")


class Meter:
    """The timed steps of one round: a barrier until all ``count`` have started, then when each ended.

    The clock (and the CPU figures) start when the last of them starts, so that
    a round times ``count`` transfers running at once, not the master starting
    builds one after the other.
    """

    def __init__(self, sample: Any, count: int) -> None:
        self.sample = sample  # () -> (wall, master cpu, worker side cpu)
        self.count = count
        self.started = 0
        self.waiting: list[defer.Deferred[None]] = []
        self.first: tuple[float, float, float] | None = None
        self.last: tuple[float, float, float] | None = None
        self.steps: list[dict[str, Any]] = []
        self.failed: list[str] = []

    @defer.inlineCallbacks
    def begin(self) -> Any:
        """Wait for the other steps of the round; the wall time they all start at."""
        self.started += 1
        if self.first is None and self.started < self.count:
            ready: defer.Deferred[None] = defer.Deferred()
            self.waiting.append(ready)
            yield ready
        elif self.first is None:
            self.first = self.sample()
        self.release()
        assert self.first is not None
        return self.first[0]

    def release(self) -> None:
        """Let every waiting step go (at once, or at the end of a failed round)."""
        if self.first is None:
            self.first = self.sample()
        waiting, self.waiting = self.waiting, []
        for ready in waiting:
            ready.callback(None)

    def end(self, start: float, worker: str, result: int, **step: Any) -> None:
        self.last = self.sample()
        if result != 0:
            self.failed.append(f"{worker}: step result {result}")
        self.steps.append({"seconds": self.last[0] - start, "worker": worker, **step})

    def lost(self, worker: str, why: Any) -> None:
        self.failed.append(f"{worker}: {why}")

    @property
    def over(self) -> bool:
        return len(self.steps) >= self.count or bool(self.failed)


METER: Meter | None = None
"""The current round's `Meter` (one workload per process)."""


class Timed:
    """Mixed into a step: ``run()`` waits for the round's other steps, is timed,
    and reports to the round's `Meter`."""

    @defer.inlineCallbacks
    def run(self) -> Any:
        assert METER is not None
        meter = METER
        worker = self.build.workername  # type: ignore[attr-defined]
        start = yield meter.begin()
        try:
            result = yield super().run()  # type: ignore[misc]
            yield self.finished()
        except Exception as e:
            meter.lost(worker, repr(e))
            raise
        meter.end(start, worker, result, **self.figures())
        return result

    def finished(self) -> defer.Deferred[None]:
        """What the step's end waits for besides ``run()``."""
        return defer.succeed(None)

    def figures(self) -> dict[str, Any]:
        return {}


class TimedUpload(Timed):
    """Mixed into `FileUpload`: say where the file went."""

    def figures(self) -> dict[str, Any]:
        return {"path": self.masterdest}  # type: ignore[attr-defined]


class TimedLog(Timed):
    """Mixed into `ShellCommand`: the step ends when its stdio log is finished; count stdout."""

    def __init__(self, **kwargs: Any) -> None:
        from buildbot.process import logobserver

        class Counter(logobserver.LogObserver):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.bytes = 0
                self.crc = 0

            def outReceived(self, data: str) -> None:
                raw = data.encode()
                self.bytes += len(raw)
                self.crc = zlib.crc32(raw, self.crc)

        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.counter = Counter()
        self.addLogObserver("stdio", self.counter)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def finished(self) -> Any:
        stdio = yield self.getLog("stdio")  # type: ignore[attr-defined]
        yield stdio.finish()

    def figures(self) -> dict[str, Any]:
        return {"bytes": self.counter.bytes, "crc": self.counter.crc}


def master_config(site: T.Site, names: list[str], db_url: str, uploads: Path) -> dict[str, Any]:
    from buildbot.plugins import schedulers, steps, util, worker

    class Upload(TimedUpload, steps.FileUpload):  # type: ignore[misc]
        pass

    class Log(TimedLog, steps.ShellCommand):  # type: ignore[misc]
        pass

    config = T.master_config(["unused"], [HOST], site)
    line = LINE.decode().strip()
    upload = Upload(
        name="upload",
        workersrc=util.Property("e2e_source"),
        masterdest=util.Interpolate(f"{uploads}/%(prop:workername)s-%(prop:buildnumber)s.bin"),
    )
    log = Log(name="log", command=util.Interpolate(f"yes {line} | head -c %(prop:e2e_bytes)s"))
    factories = {"upload": util.BuildFactory([upload]), "log": util.BuildFactory([log])}
    config["workers"] = [worker.Worker(n, T.WORKER_PASSWORD.format(name=n)) for n in names]
    config["builders"] = [
        util.BuilderConfig(name=kind, workernames=names, factory=factory)
        for kind, factory in factories.items()
    ]
    config["schedulers"] = [schedulers.ForceScheduler(name="force", builderNames=list(factories))]
    config["db_url"] = db_url
    return config


def payload(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // BLOCK):
            block = os.urandom(BLOCK)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def settle(reactor: Any, timeout: float, interval: float = 0.25, busy: float = 0.05) -> float | None:
    """Wait until this process (the master) is idle: under ``busy`` of a CPU over ``interval``.

    A log round leaves the master compressing and storing for a while after its
    step ended; the next round must not pay for it.  Seconds waited, or None.
    """
    start = reactor.seconds()
    while reactor.seconds() - start < timeout:
        cpu = time.process_time()
        await common.sleep(reactor, interval)
        if time.process_time() - cpu < busy * interval:
            return float(reactor.seconds() - start)
    return None


async def force(master: Any, builder: str, count: int, properties: dict[str, Any]) -> list[int]:
    """Force ``count`` builds of ``builder`` at once; their build request ids."""
    builderid = await master.data.updates.findBuilderId(builder)
    brids: list[int] = []
    for _ in range(count):
        _bsid, by_builder = await master.data.updates.addBuildset(
            waited_for=False,
            builderids=[builderid],
            sourcestamps=[
                {"codebase": "", "repository": "", "branch": None, "revision": None, "project": ""}
            ],
            properties={k: (v, "bench") for k, v in properties.items()},
        )
        brids += list(by_builder.values())
    return brids


async def one_round(
    reactor: Any,
    master: Any,
    meter: Meter,
    kind: str,
    count: int,
    share: int,
    expected: dict[str, Any],
    timeout: float,
) -> dict[str, Any]:
    """``count`` builds of ``kind`` at once, ``share`` bytes each; the round's figures, checked.

    A round in which a worker session was lost (Buildbot would retry the build)
    is cancelled and answers {"error": ...}.
    """
    global METER
    METER = meter
    properties: dict[str, Any] = {"e2e_bytes": share}
    if kind == "upload":
        properties["e2e_source"] = expected["path"]
    brids = await force(master, kind, count, properties)
    # Only the meter is polled meanwhile: the data API would cost the master CPU.
    await common.wait_until(reactor, lambda: meter.over, timeout)
    problems = list(meter.failed)
    if not meter.over:
        problems.append(f"{len(meter.steps)} of {count} steps done after {timeout:.0f}s")
    if problems:
        for brid in brids:
            await master.data.control("cancel", {"reason": "e2e round failed"}, ("buildrequests", brid))
        meter.release()
    requests: list[dict[str, Any]] = []

    async def complete() -> bool:
        requests[:] = [await master.data.get(("buildrequests", brid)) for brid in brids]
        return all(r["complete"] for r in requests)

    deadline = reactor.seconds() + timeout
    while not await complete():
        if reactor.seconds() > deadline:
            raise RuntimeError(f"e2e {kind}, {count} builds: not complete {timeout:.0f}s after {problems}")
        await common.sleep(reactor, 0.2)
    METER = None
    builds = [len(await master.data.get(("buildrequests", brid, "builds"))) for brid in brids]
    if not problems and (sum(builds) != count or any(r["results"] != 0 for r in requests)):
        problems.append(
            f"{sum(builds)} builds for {count} requests, results {[r['results'] for r in requests]}"
        )
    if not problems and len({s["worker"] for s in meter.steps}) != count:
        problems.append(f"{count} builds ran on {len({s['worker'] for s in meter.steps})} workers")
    for step in meter.steps:
        if kind == "upload":
            path = step["path"]
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != share or sha256_file(path) != expected["sha256"]:
                problems.append(
                    f"{step['worker']}: uploaded {size} bytes, not the {share} sent (or not the same)"
                )
            if os.path.exists(path):
                os.remove(path)
        elif step["bytes"] != share or step["crc"] != expected["crc"]:
            problems.append(
                f"{step['worker']}: the log got {step['bytes']} bytes of stdout, not the {share} written"
            )
    if problems:
        return {"error": "; ".join(problems)}
    assert meter.first is not None and meter.last is not None
    (wall0, master0, worker0), (wall1, master1, worker1) = meter.first, meter.last
    total, gb = share * count, share * count / 1e9
    return {
        "mb_per_s": total / (wall1 - wall0) / 1e6,
        "seconds": wall1 - wall0,
        "step_seconds": [s["seconds"] for s in meter.steps],
        "workers": len({s["worker"] for s in meter.steps}),
        "bytes": total,
        "master_cpu_s_per_gb": (master1 - master0) / gb,
        "worker_cpu_s_per_gb": (worker1 - worker0) / gb,
    }


async def run(reactor: Any, transport: str, root: Path, p: dict[str, Any]) -> dict[str, Any]:
    n = max(p["sessions"])
    names = [f"w{i:02d}-{HOST}" for i in range(n)]
    site = T.Site(root, [HOST])
    uploads = root / "uploads"
    uploads.mkdir(parents=True)
    master = await T.start_master(
        site.master_basedir, master_config(site, names, p["db_url"], uploads), reactor
    )
    if len(master.botmaster.builders) != len(KINDS):
        raise RuntimeError(f"the master did not start; see {root / 'master.log'}")
    workers, openssh, _start = await start_workers(reactor, transport, root, site, master, names)
    try:
        ready = await common.wait_until(
            reactor,
            lambda: len(T.ready_workers(master)) >= n or not workers.running,
            p["timeout"],
            interval=0.1,
        )
        if ready is None or not workers.running:
            raise RuntimeError(
                f"{len(T.ready_workers(master))} of {n} workers attached:\n{workers.text()[-2000:]}"
            )

        def sample() -> tuple[float, float, float]:
            master_cpu, worker_cpu = time.process_time(), common.cpu_seconds(workers.pid)
            if openssh is not None:
                sshd, ssh = openssh.cpu()
                master_cpu, worker_cpu = master_cpu + sshd, worker_cpu + ssh
            return time.perf_counter(), master_cpu, worker_cpu

        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            k: {str(c): [] for c in p["sessions"]} for k in KINDS
        }
        for count in p["sessions"]:
            share = p["bytes"] // count // BLOCK * BLOCK
            source = root / f"payload-{share}.bin"
            expected = {
                "path": str(source),
                "sha256": payload(source, share),
                "crc": zlib.crc32(LINE * (share // len(LINE))),
            }
            for _rep in range(p["reps"]):
                for kind in p.get("kinds", KINDS):
                    # After a failed round, the lost sessions come back first.
                    await common.wait_until(reactor, lambda: len(T.ready_workers(master)) >= n, p["timeout"])
                    settled = await settle(reactor, 30.0)
                    said = len(workers.text())
                    figures = await one_round(
                        reactor,
                        master,
                        Meter(sample, count),
                        kind,
                        count,
                        share,
                        expected,
                        p["round_timeout"],
                    )
                    figures["settled_after"] = settled
                    if "error" in figures:
                        errors = [line for line in workers.text()[said:].splitlines() if "#error]" in line]
                        figures["worker_side"] = errors[:3]
                    runs[kind][str(count)].append(figures)
            source.unlink()
    finally:
        await workers.stop(grace=5)
        (root / "worker-side.log").write_text(workers.text())
        if openssh is not None:
            await openssh.stop()
    return {"runs": runs, "algorithms": openssh.cipher if openssh else ""}
