"""attach: N worker sessions to a real Buildbot master, until all are ready.

A real master (sqlite, ``sessions / 10`` builders of 10 workers) starts in
this process; then one worker-side process runs every session:

- plain: stock buildbot-worker ``Worker``s straight to the PB port;
- sshmux: ``ssh-worker run`` (one SSH connection, a channel per session);
- openssh: the same stock Workers to the local port of ``ssh -N -L`` through
  a private sshd (one SSH connection; sshd dials the PB port per session).

A launcher holds more sessions than the master's default ``max_channels``
per connection only with that limit raised to N (the figures say so).

The master's PB and SSH ports listen with ``backlog`` (None: Twisted's
default, 50, what a stock master.cfg gets; the kernel caps it at
net.core.somaxconn).  Timed from starting that process until every worker is
attached to its builder; then the master's open fds and RSS, the worker
side's RSS, and how many connections a full accept queue turned away
meanwhile (machine-wide).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks import common
from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.master.limits import ServerLimits

HOST = "bench"
PER_BUILDER = 10


def master_config(
    site: T.Site,
    names: list[str],
    db_url: str,
    ssh_port: str = common.LISTEN,
    pb_port: str = common.LISTEN,
    **service: Any,
) -> dict[str, Any]:
    """Builders of PER_BUILDER workers each; ``service``: more `SSHMuxService` arguments."""
    from buildbot.plugins import schedulers, steps, util, worker

    # One launcher may hold every session: lift the per-connection channel cap if need be.
    if len(names) > ServerLimits().max_channels:
        service["max_channels"] = len(names)
    config = T.master_config(
        ["unused"], site.hosts, site, ssh_port=ssh_port, pb_port=pb_port, service=service
    )
    factory = util.BuildFactory([steps.ShellCommand(command=["true"])])
    groups = [names[i : i + PER_BUILDER] for i in range(0, len(names), PER_BUILDER)]
    config["workers"] = [worker.Worker(n, T.WORKER_PASSWORD.format(name=n)) for n in names]
    config["builders"] = [
        util.BuilderConfig(name=f"b{k:04d}", workernames=group, factory=factory)
        for k, group in enumerate(groups)
    ]
    config["schedulers"] = [
        schedulers.ForceScheduler(name="force", builderNames=[b.name for b in config["builders"]])
    ]
    config["db_url"] = db_url
    return config


async def start_workers(
    reactor: Any, transport: str, root: Path, site: T.Site, master: Any, names: list[str]
) -> tuple[common.Child, common.OpenSSH | None, float]:
    """Start the worker side of ``names`` over ``transport``: (its process, the tunnel, start time).

    The start time is when the sessions start: over OpenSSH, once the tunnel is
    up (as users run it).
    """
    pb_port = T.pb_port(master)
    openssh = None
    start = reactor.seconds()
    if transport == "sshmux":
        config = site.launcher_config(HOST, T.ssh_port(master), pb_port, names)
        argv = [sys.executable, "-m", "buildbot_sshmux.cli.ssh_worker", "run", str(config)]
        return common.Child(reactor, argv, cwd=str(config.parent)), None, start
    port = pb_port
    if transport == "openssh":
        openssh = common.OpenSSH(reactor, root / "openssh", site.identities[HOST])
        (port,) = await openssh.start([pb_port])
        start = reactor.seconds()
    params = {"mode": "workers", "names": names, "port": port, "password": T.WORKER_PASSWORD,
              "basedir": str(root / "workers")}  # fmt: skip
    return common.python_child(reactor, "benchmarks.loadgen", params), openssh, start


async def run(reactor: Any, transport: str, root: Path, p: dict[str, Any]) -> dict[str, Any]:
    n = p["sessions"]
    names = [f"w{i:04d}-{HOST}" for i in range(n)]
    site = T.Site(root, [HOST])
    listen = common.listen_on(backlog=p.get("backlog"))
    config = master_config(site, names, p["db_url"], ssh_port=listen, pb_port=listen)
    master = await T.start_master(site.master_basedir, config, reactor)
    if len(master.botmaster.builders) * PER_BUILDER < n:
        raise RuntimeError(f"the master did not start; see {root / 'master.log'}")
    fds_before, rss_before = common.open_fds(), common.rss()
    overflows = common.listen_overflows()
    workers, openssh, start = await start_workers(reactor, transport, root, site, master, names)
    ready = await common.wait_until(
        reactor, lambda: len(T.ready_workers(master)) >= n or not workers.running, p["timeout"], interval=0.1
    )
    attached = len(T.ready_workers(master))
    figures = {
        "seconds": ready if attached >= n else None,
        "attached": attached,
        "waited": reactor.seconds() - start,
        "master_fds_before": fds_before,
        "master_fds": common.open_fds(),
        "master_rss_before": rss_before,
        "master_rss": common.rss(),
        "worker_rss": common.rss(workers.pid) + (openssh.client_rss() if openssh else 0),
        "connections": T.sshmux_service(master).connection_count,
        "max_channels_raised": n > ServerLimits().max_channels,
        "listen_overflows": common.listen_overflows() - overflows,
        "backlog": common.effective_backlog(p.get("backlog")),
    }
    if not workers.running:
        figures["error"] = f"the worker side exited {workers.exit_code}: {workers.text()[-2000:]}"
    await workers.stop(grace=5)
    if openssh is not None:
        await openssh.stop()
    return figures
