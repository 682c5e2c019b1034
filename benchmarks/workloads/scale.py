"""scale: many worker hosts to one real Buildbot master; a restart; an idle spell.

``hosts`` hosts of ``per_host`` worker sessions each, to one master in this
process (builders of 10 workers, as attach; sqlite in memory), its PB and
SSH ports listening with a backlog of N (the kernel caps it at somaxconn):

- sshmux: an ``ssh-worker run`` launcher per host, each with its own key
  (its own line in authorized_hosts), so one SSH connection per host;
- plain: a process of stock buildbot-worker Workers per host
  (benchmarks.loadgen), one TCP connection per session to the PB port.

Every host's process is started ahead and held at a gate once it has
imported what it needs (benchmarks.hostproc); its output goes to a file.
Phases (``phases``):

``attach``   from opening the gate until every session is attached to its
             builder: the master's CPU seconds meanwhile (all its threads,
             and those but the main one: Buildbot's database pool), its RSS
             and open fds after, the worker side's CPU and RSS; ``profile``:
             the master's main thread under cProfile;
``restart``  the master stops (stopService, as on SIGTERM) and a new one
             starts in this process on the same ports: timed until every
             session is attached again, the worker side redialling with its
             own backoff;
``idle``     ``idle_seconds`` as things are, then as long with every
             keepalive ``idle_k`` times as frequent: the CPU of the master
             and of the worker side (summed) in each.

An attach slower than ``timeout`` is reported as timed out, and waited for
up to ``wait_limit`` so that the next phases can run.  At the end the worker
side is killed and this process leaves at once (EXIT_AT_ONCE): the master's
detaching ten thousand sessions is no figure of ours.
"""

from __future__ import annotations

import cProfile
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

from benchmarks import common, hostproc
from benchmarks.workloads import attach
from buildbot_sshmux.demo import harness as T

EXIT_AT_ONCE = True
PROCESS_HEADROOM = 200
"""Open files the master needs beyond one per plain PB session."""

REDIAL = re.compile(r"redialling master \S+ in ([\d.]+)s \(attempt (\d+)\)")


def host_names(hosts: int) -> list[str]:
    return [f"h{i:03d}" for i in range(hosts)]


def worker_names(host: str, per_host: int) -> list[str]:
    return [f"w{j:03d}-{host}" for j in range(per_host)]


def keep_order(master: Any, builders: list[Any]) -> list[Any]:
    """A ``prioritizeBuilders`` that keeps the builders' order: no database queries.

    Buildbot's default sorter asks the database two questions per pending
    builder each time a worker attaches: after a thousand attaches it stays
    busy for tens of seconds, quadratically more with more builders.
    """
    return builders


class Master:
    """The master of this process, restartable on fixed ports."""

    def __init__(self, reactor: Any, root: Path, site: T.Site, names: list[str], p: dict[str, Any]) -> None:
        self.reactor = reactor
        self.site = site
        self.names = names
        self.p = p
        self.ssh_port, self.pb_port = common.free_port(), common.free_port()
        self.log = root / "master.log"
        self.master: Any = None

    async def start(self) -> None:
        backlog = len(self.names)
        # Every host dials from 127.0.0.1: the limit per address stands for one address per host.
        config = attach.master_config(
            self.site, self.names, self.p["db_url"],
            ssh_port=common.listen_on(self.ssh_port, backlog), pb_port=common.listen_on(self.pb_port, backlog),
            max_startups_per_source=len(self.site.hosts),
        )  # fmt: skip
        if self.p["keep_builder_order"]:
            config["prioritizeBuilders"] = keep_order
        self.master = await T.start_master(self.site.master_basedir, config, self.reactor)
        if len(self.master.botmaster.builders) * attach.PER_BUILDER < len(self.names):
            raise RuntimeError(f"the master did not start; see {self.log}")

    async def stop(self) -> None:
        await T.stop_master(self.master)

    def ready(self) -> int:
        """Sessions attached to their builders (counted once every worker has logged in)."""
        if len(self.master.workers.connections) < len(self.names):
            return 0
        return len(T.ready_workers(self.master))

    def distributing(self) -> bool:
        """Whether Buildbot's build request distributor still has work queued (each attach queues some)."""
        brd = self.master.botmaster.brd
        return bool(brd.active or brd._deferwaiter.has_waited())

    def startup_drops(self) -> int:
        """SSH connections dropped before their login, so far (max_startups: the master's log says)."""
        return self.log.read_text(errors="replace").count("dropped connection from")

    def connections(self) -> int:
        """SSH connections (sshmux), or PB ones (plain)."""
        if self.p["transport"] == "sshmux":
            return int(T.sshmux_service(self.master).connection_count)
        return len(self.master.workers.connections)


class WorkerSide:
    """The worker side: a process per host (benchmarks.hostproc), its files in HOST/proc."""

    def __init__(self, reactor: Any, root: Path, site: T.Site, master: Master, p: dict[str, Any]) -> None:
        self.reactor = reactor
        self.dirs = [root / host / "proc" for host in site.hosts]
        self.children: list[common.Child] = []
        for host, where in zip(site.hosts, self.dirs):
            where.mkdir(parents=True)
            names = worker_names(host, p["per_host"])
            if p["transport"] == "sshmux":
                config = site.launcher_config(host, master.ssh_port, master.pb_port, names)
                command = ["buildbot_sshmux.cli.ssh_worker", "run", str(config)]
            else:
                params = {"mode": "workers", "names": names, "port": master.pb_port, "password": T.WORKER_PASSWORD,
                          "basedir": str(root / host), "log": True}  # fmt: skip
                command = ["benchmarks.loadgen", json.dumps(params)]
            argv = [sys.executable, "-m", "benchmarks.hostproc", str(p["idle_k"]), str(where), *command]
            self.children.append(common.Child(reactor, argv, cwd=str(root / host), log=where / "log"))

    async def ready(self) -> None:
        """Wait until every process has imported what it needs."""
        await common.wait_until(
            self.reactor, lambda: all((d / "ready").exists() for d in self.dirs) or not self.running, 300
        )
        if not self.running:
            raise RuntimeError(self.exited())

    def go(self) -> None:
        for child in self.children:
            child.transport.signalProcess(signal.SIGUSR1)

    @property
    def running(self) -> bool:
        return all(c.running for c in self.children)

    def exited(self) -> str:
        dead = [c for c in self.children if not c.running]
        return f"{len(dead)} worker-side processes exited: {dead[0].text()[-2000:]}" if dead else ""

    def cpu(self, precise: bool = False) -> float:
        seconds = common.precise_cpu_seconds if precise else common.cpu_seconds
        return sum(seconds(c.pid) for c in self.children)

    def rss(self) -> int:
        return sum(common.rss(c.pid) for c in self.children if c.running)

    def log_sizes(self) -> list[int]:
        return [(d / "log").stat().st_size for d in self.dirs]

    def redials(self, since: list[int]) -> dict[str, float]:
        """sshmux: the launchers' redials of the master since ``since`` (log sizes): most attempts, longest delay."""
        found = []
        for where, offset in zip(self.dirs, since):
            with open(where / "log", "rb") as f:
                f.seek(offset)
                found += [
                    (int(m[2]), float(m[1])) for m in REDIAL.finditer(f.read().decode(errors="replace"))
                ]
        return {"max_attempt": max((a for a, _ in found), default=0),
                "longest_delay": max((d for _, d in found), default=0.0)}  # fmt: skip

    async def compress(self) -> dict[str, int]:
        """Compress every process's keepalives (SIGUSR2); what they found, summed."""
        for child in self.children:
            child.transport.signalProcess(signal.SIGUSR2)
        reports = [d / "idle.json" for d in self.dirs]
        await common.wait_until(self.reactor, lambda: all(r.exists() for r in reports), 60)
        found: dict[str, int] = {}
        for r in reports:
            for kind, count in (json.loads(r.read_text()) if r.exists() else {}).items():
                found[f"{kind} (worker side)"] = found.get(f"{kind} (worker side)", 0) + count
        return found

    def kill(self) -> None:
        for child in self.children:
            if child.running:
                child.transport.signalProcess("KILL")


async def wait_attached(
    reactor: Any, master: Master, workers: WorkerSide, p: dict[str, Any]
) -> dict[str, Any]:
    """Wait until every session is attached to its builder (or up to ``wait_limit``): when; how many at ``timeout``."""
    n, start = len(master.names), reactor.seconds()
    at_timeout: list[int] = []

    def done() -> bool:
        if not at_timeout and reactor.seconds() - start > p["timeout"]:
            at_timeout.append(len(T.ready_workers(master.master)))
        return master.ready() >= n or not workers.running

    await common.wait_until(reactor, done, p["wait_limit"], interval=0.5)
    waited = reactor.seconds() - start
    all_ready = master.ready() >= n
    figures = {
        "seconds": waited if all_ready and not at_timeout else None,
        "all_after": waited if all_ready else None,
        "attached": at_timeout[0] if at_timeout else master.ready(),
        "waited": min(waited, p["timeout"]),
    }
    if not workers.running:
        figures["error"] = workers.exited()
    return figures


async def attach_phase(
    reactor: Any, master: Master, workers: WorkerSide, p: dict[str, Any]
) -> dict[str, Any]:
    await workers.ready()
    fds_before = common.open_fds()
    main0, others0 = common.thread_cpu_seconds()
    workers0 = workers.cpu()
    profiler = cProfile.Profile() if p.get("profile") else None
    if profiler is not None:
        profiler.enable()
    workers.go()
    figures = await wait_attached(reactor, master, workers, p)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(p["profile"])
    main1, others1 = common.thread_cpu_seconds()
    settled = await common.wait_until(reactor, lambda: not master.distributing(), p["wait_limit"], 0.2)
    main2, others2 = common.thread_cpu_seconds()
    return {
        **figures,
        "master_cpu": main1 - main0 + others1 - others0,
        "master_cpu_other_threads": others1 - others0,
        "settled_after": settled,
        "master_cpu_settling": main2 - main1 + others2 - others1,
        "master_rss": common.rss(),
        "master_fds_before": fds_before,
        "master_fds": common.open_fds(),
        "connections": master.connections(),
        "worker_cpu": workers.cpu() - workers0,
        "worker_rss": workers.rss(),
        "startup_drops": master.startup_drops(),
    }


async def restart_phase(
    reactor: Any, master: Master, workers: WorkerSide, p: dict[str, Any]
) -> dict[str, Any]:
    drops, logs = master.startup_drops(), workers.log_sizes()
    began = reactor.seconds()
    await master.stop()
    stopped = reactor.seconds()
    await master.start()
    started = reactor.seconds()
    figures = await wait_attached(reactor, master, workers, p)
    settled = await common.wait_until(reactor, lambda: not master.distributing(), p["wait_limit"], 0.2)

    def since(base: float, seconds: float | None) -> float | None:
        return seconds + started - base if seconds is not None else None

    return {
        **figures,
        "stop_seconds": stopped - began,
        "start_seconds": started - stopped,
        "from_start": since(stopped, figures["seconds"]),
        "from_stop": since(began, figures["seconds"]),
        "all_after_start": since(stopped, figures["all_after"]),
        "settled_after": settled,
        "master_rss": common.rss(),
        "startup_drops": master.startup_drops() - drops,
        **({"redials": workers.redials(logs)} if p["transport"] == "sshmux" else {}),
    }


async def idle_phase(reactor: Any, workers: WorkerSide, p: dict[str, Any]) -> dict[str, Any]:
    """CPU over ``idle_seconds`` as things are, then over as long with the keepalives compressed."""
    seconds = p["idle_seconds"]

    async def window() -> tuple[float, float]:
        master0, workers0 = common.precise_cpu_seconds("self"), workers.cpu(precise=True)
        await common.sleep(reactor, seconds)
        return common.precise_cpu_seconds("self") - master0, workers.cpu(precise=True) - workers0

    await common.sleep(reactor, p["idle_settle"])
    master_real, workers_real = await window()
    compressed = hostproc.compress(p["idle_k"])
    compressed.update(await workers.compress())
    master_fast, workers_fast = await window()
    return {
        "seconds": seconds,
        "k": p["idle_k"],
        "master_cpu": master_real,
        "worker_cpu": workers_real,
        "master_cpu_compressed": master_fast,
        "worker_cpu_compressed": workers_fast,
        "compressed": compressed,
    }


async def run(reactor: Any, transport: str, root: Path, p: dict[str, Any]) -> dict[str, Any]:
    p = {**p, "transport": transport}
    hosts = host_names(p["hosts"])
    names = [name for host in hosts for name in worker_names(host, p["per_host"])]
    fd_limit = common.raise_fd_limit()
    figures: dict[str, Any] = {"sessions": len(names), "hosts": len(hosts), "fd_limit": fd_limit,
                               "backlog": common.effective_backlog(len(names))}  # fmt: skip
    if transport == "plain" and fd_limit < len(names) + PROCESS_HEADROOM:
        return {
            **figures,
            "skipped": f"open files limit {fd_limit} < {len(names)} sessions + {PROCESS_HEADROOM}",
        }
    site = T.Site(root, hosts)
    master = Master(reactor, root, site, names, p)
    workers = WorkerSide(reactor, root, site, master, p)  # they start while the master does
    try:
        started = reactor.seconds()
        await master.start()
        figures["master_start_seconds"] = reactor.seconds() - started
        figures["attach"] = await attach_phase(reactor, master, workers, p)
        complete = figures["attach"]["all_after"] is not None
        if "restart" in p["phases"] and complete:
            figures["restart"] = await restart_phase(reactor, master, workers, p)
            complete = figures["restart"]["all_after"] is not None
        if "idle" in p["phases"] and complete:
            figures["idle"] = await idle_phase(reactor, workers, p)
    finally:
        workers.kill()  # the master goes with this process
    return figures
