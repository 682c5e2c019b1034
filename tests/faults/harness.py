"""What every fault test shares: a site, real masters, launchers, figures.

Each test runs a real Buildbot master (sqlite, in this process, on the global
reactor) with `SSHMuxService`, and ``ssh-worker run`` child processes; only
127.0.0.1 and port 0 (or a port first picked by port 0) are used.

Figures are printed as ``[figures] ...`` lines and gathered for the summary
that ``conftest.py`` prints at the end of the run.  SSHMUX_KEEP_TMP=1 keeps
each test's directory (master.log, HOST/ssh-worker.log).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from tests import support as S
from tests.realmaster import RealMasterCase

FIGURES: list[tuple[str, dict[str, Any]]] = []


def show(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def figures(test: str, **values: Any) -> str:
    """Print (and keep for the run's summary) what a test measured."""
    FIGURES.append((test, values))
    line = f"[figures] {test}: " + ", ".join(f"{k}={show(v)}" for k, v in values.items())
    print(line)
    return line


def vm_rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/status")


class TimedLog(S.LogCapture):
    """`LogCapture` that also keeps when (reactor time) each line was logged."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.timed: list[tuple[float, str]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        before = len(self.lines)
        super().__call__(event)
        if len(self.lines) > before:
            self.timed.append((float(reactor.seconds()), self.lines[-1]))

    def matching_after(self, after: float, *needles: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.timed if t >= after and all(n in line for n in needles)]


def with_keepalive(config: Path, interval: int, count_max: int) -> Path:
    """Add keepalive settings to a launcher config's [master] table."""
    text = config.read_text()
    config.write_text(
        text.replace(
            "[master]\n", f"[master]\nkeepalive_interval = {interval}\nkeepalive_count_max = {count_max}\n", 1
        )
    )
    return config


def many_workers_config(
    site: T.Site,
    host: str,
    workers: int,
    builders: int,
    *,
    ssh_port: str,
    pb_port: str,
    service_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """A master.cfg dict: ``workers`` workers of one host spread over ``builders`` builders."""
    from buildbot.plugins import schedulers, steps, util, worker

    names = [f"w{i:03d}-{host}" for i in range(workers)]
    builder_names = [f"b{j:02d}" for j in range(builders)]
    builder_configs = [
        util.BuilderConfig(
            name=b,
            workernames=names[j::builders],
            factory=util.BuildFactory([steps.ShellCommand(name="build", command=["sh", "-c", "echo ok"])]),
        )
        for j, b in enumerate(builder_names)
    ]
    config = {
        "workers": [worker.Worker(n, T.WORKER_PASSWORD.format(name=n)) for n in names],
        "builders": builder_configs,
        "schedulers": [schedulers.ForceScheduler(name="force", builderNames=builder_names)],
        "protocols": {"pb": {"port": pb_port}},
        "services": [T.sshmux_service_for(site, ssh_port, **(service_kwargs or {}))],
        "db_url": "sqlite:///state.sqlite",
        "collapseRequests": False,
        "buildbotNetUsageData": None,
        "title": "buildbot-sshmux faults",
    }
    return config, names, builder_names


class FaultCase(RealMasterCase):
    """A fresh site and log per test; launchers, relays and masters always stopped."""

    timeout = 180
    tmp_prefix = "sshmux-fault-"
    log_class = TimedLog

    def master_config(
        self,
        projects: Sequence[str],
        hosts: Sequence[str],
        service_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`T.master_config`, with these extra `SSHMuxService` arguments."""
        return T.master_config(projects, hosts, self.site, service=service_kwargs, **kwargs)

    async def start_master_config(self, config: dict[str, Any]) -> Any:
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.stop_master(master)))
        self.master = master
        return master

    async def start_master(self, projects: Sequence[str], hosts: Sequence[str], **kwargs: Any) -> Any:
        return await self.start_master_config(self.master_config(projects, hosts, **kwargs))

    async def stop_master(self, master: Any) -> None:
        """Stop a master once (a test may stop it itself; cleanup then skips it)."""
        if getattr(master, "_fault_stopped", False):
            return
        master._fault_stopped = True
        await T.stop_master(master)
        # A master stopped while workers are attached: Buildbot's Worker.detached
        # (re)starts the worker's 1-hour "missing" timer after stopService has
        # cancelled it (Buildbot 4.3 does so over plain TCP PB too).  The
        # master is gone; its timers would only make the reactor unclean.
        for worker in list(master.workers.workers.values()):
            worker.stopMissingTimer()

    def launch(
        self,
        host: str,
        workers: Sequence[str],
        ssh_port: int | None = None,
        keepalive: tuple[int, int] | None = None,
        pb_port: int | None = None,
    ) -> T.LauncherProcess:
        port = ssh_port if ssh_port is not None else T.ssh_port(self.master)
        pb = pb_port if pb_port is not None else T.pb_port(self.master)
        config = self.site.launcher_config(host, port, pb, workers)
        if keepalive is not None:
            with_keepalive(config, *keepalive)
        return self.start_launcher(config)

    # -- waiting and asserting ---------------------------------------------------

    async def wait_attached(self, names: Iterable[str], timeout: float = 30.0, master: Any = None) -> float:
        m = master or self.master
        wanted = set(names)
        return await self.wait_for(
            lambda: wanted <= T.attached_workers(m),
            timeout,
            f"{len(wanted)} workers to attach",
        )

    async def wait_ready(self, names: Iterable[str], timeout: float = 30.0, master: Any = None) -> float:
        m = master or self.master
        wanted = set(names)
        return await self.wait_for(
            lambda: wanted <= T.ready_workers(m), timeout, f"{len(wanted)} workers to be ready"
        )

    def ssh_connections(self, host: str) -> list[Any]:
        """The master's SSH transports of one worker host (authenticated)."""
        factory = T.sshmux_service(self.master).factory
        return [c for c in factory.connections if c.authenticated and c.avatar.entry.name == host]
