"""The demo's machinery: real parts on 127.0.0.1.

A real Buildbot master (sqlite) with `SSHMuxService`, keys made fresh,
``ssh-worker`` launchers run as separate processes, builds forced through
the master's data API, and the figures the demo prints (file descriptors,
TCP connections).  The integration and fault tests and the benchmarks use
it too; what only the tests need is in ``tests/support.py``.  Needs the
``master`` and ``worker`` extras.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import task

from buildbot_sshmux.wire.keys import generate_ed25519, public_line, write_private_key

WORKER_PASSWORD = "pass-{name}"


def worker_name(project: str, host: str) -> str:
    return f"{project}-{host}"


@define
class Site:
    """The files of a test site: master host key, worker host keys, authorized_hosts."""

    root: Path
    hosts: list[str]
    host_key_path: Path = field(init=False)
    host_key_line: str = field(init=False)
    identities: dict[str, Path] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        (self.root / "master" / "sshmux").mkdir(parents=True, exist_ok=True)
        self.host_key_path = self.root / "master" / "sshmux" / "ssh_host_ed25519_key"
        key = generate_ed25519()
        write_private_key(self.host_key_path, key, "master")
        self.host_key_line = public_line(key)
        lines = []
        for host in self.hosts:
            (self.root / host).mkdir(exist_ok=True)
            identity = self.root / host / "id_ed25519"
            host_key = generate_ed25519()
            write_private_key(identity, host_key, host)
            self.identities[host] = identity
            lines.append(f'host="{host}",workers="*-{host}" {public_line(host_key, host)}')
        self.authorized_hosts.write_text("\n".join(lines) + "\n")

    @property
    def master_basedir(self) -> Path:
        return self.root / "master"

    @property
    def authorized_hosts(self) -> Path:
        return self.root / "master" / "sshmux" / "authorized_hosts"

    def launcher_config(
        self, host: str, ssh_port: int, pb_port: int, workers: Iterable[str], password: str | None = None
    ) -> Path:
        """Write ``HOST/ssh-worker.toml`` for these worker names; return its path."""
        lines = [
            "[master]",
            f'address = "127.0.0.1:{ssh_port}"',
            f'host_key = "{self.host_key_line}"',
            f'identity = "{self.identities[host].name}"',
            f"pb_port = {pb_port}",
        ]
        for name in workers:
            pw = password if password is not None else WORKER_PASSWORD.format(name=name)
            lines += [
                "",
                "[[worker]]",
                f'name = "{name}"',
                f'password = "{pw}"',
                f'basedir = "workers/{name}"',
            ]
        path = self.root / host / "ssh-worker.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


def master_config(
    projects: Sequence[str],
    hosts: Sequence[str],
    site: Site,
    *,
    ssh_port: str = "tcp:0:interface=127.0.0.1",
    pb_port: str = "tcp:0:interface=127.0.0.1",
    command: Sequence[str] | None = None,
    extra_workers: Sequence[str] = (),
    service: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A master.cfg dict: one builder per project (tagged), one worker per (project, host).

    ``service`` holds further `SSHMuxService` arguments (limits, ``host_keys``, ``hosts``).
    """
    from buildbot.plugins import schedulers, steps, util, worker

    def right_host(builder: Any, wfb: Any, request: Any) -> bool:
        wanted = request.properties.getProperty("worker_host")
        return wanted is None or wfb.worker.workername.endswith(f"-{wanted}")

    command = list(command or ["sh", "-c", "echo building $PROJECT on $WORKER; uname -s"])
    workers, builders = [], []
    for project in projects:
        names = [worker_name(project, h) for h in hosts]
        workers += [worker.Worker(n, WORKER_PASSWORD.format(name=n)) for n in names]
        factory = util.BuildFactory(
            [
                steps.ShellCommand(
                    name="build",
                    command=command,
                    env={"PROJECT": project, "WORKER": util.Property("workername")},
                )
            ]
        )
        builders.append(
            util.BuilderConfig(
                name=project, workernames=names, tags=[project], factory=factory, canStartBuild=right_host
            )
        )
    workers += [worker.Worker(n, WORKER_PASSWORD.format(name=n)) for n in extra_workers]
    return {
        "workers": workers,
        "builders": builders,
        "schedulers": [schedulers.ForceScheduler(name="force", builderNames=list(projects))],
        "protocols": {"pb": {"port": pb_port}},
        "services": [sshmux_service_for(site, ssh_port, **(service or {}))],
        "db_url": "sqlite:///state.sqlite",
        # Requests for one builder differ only by worker_host: never collapse them.
        "collapseRequests": False,
        "buildbotNetUsageData": None,
        "title": "buildbot-sshmux",
    }


def sshmux_service_for(site: Site, port: str = "tcp:0:interface=127.0.0.1", **arguments: Any) -> Any:
    """The site's `SSHMuxService` (its host key and authorized_hosts unless overridden)."""
    from buildbot_sshmux import SSHMuxService

    arguments.setdefault("host_keys", [str(site.host_key_path)])
    arguments.setdefault("authorized_hosts", str(site.authorized_hosts))
    return SSHMuxService(port=port, **arguments)


async def start_master(basedir: Path, config: dict[str, Any], reactor: Any) -> Any:
    """Create the sqlite database and start a real BuildMaster."""
    from buildbot.config.master import MasterConfig
    from buildbot.interfaces import IConfigLoader
    from buildbot.master import BuildMaster
    from zope.interface import implementer

    @implementer(IConfigLoader)
    class DictLoader:
        def __init__(self, config_dict: dict[str, Any]) -> None:
            self.config_dict = config_dict

        def loadConfig(self) -> Any:
            return MasterConfig.loadFromDict(self.config_dict, "<dict>")

    basedir.mkdir(parents=True, exist_ok=True)
    master = BuildMaster(str(basedir), reactor=reactor, config_loader=DictLoader(config))
    if isinstance(master.config.db, dict):  # Buildbot 4.2; a DBConfig from 4.3 on
        master.config.db["db_url"] = config["db_url"]
    else:
        master.config.db.db_url = config["db_url"]
    cwd = os.getcwd()
    os.chdir(basedir)  # sqlite:///state.sqlite is relative to the basedir
    try:
        await master.db.setup(check_version=False)
        await master.db.model.upgrade()
        master.db.setup = lambda: None
        await master.startService()
    finally:
        os.chdir(cwd)
    return master


async def stop_master(master: Any) -> None:
    await master.stopService()
    await master.db.pool.stop()


def sshmux_service(master: Any) -> Any:
    from buildbot_sshmux.master.service import SSHMuxService

    return next(s for s in master.service_manager if isinstance(s, SSHMuxService))


def ssh_port(master: Any) -> int:
    return int(sshmux_service(master).listening_port.getHost().port)


def pb_port(master: Any) -> int:
    dispatcher = next(iter(master.pbmanager.dispatchers.values()))
    return int(dispatcher.port.getHost().port)


def attached_workers(master: Any) -> set[str]:
    """Workers with a connection (their attach may still be in progress)."""
    return set(master.workers.connections)


def ready_workers(master: Any) -> set[str]:
    """Workers fully attached to their builders, ready to build."""
    return {
        wfb.worker.workername
        for builder in master.botmaster.builders.values()
        for wfb in builder.workers
        if wfb.worker is not None and wfb.worker.conn is not None
    }


async def wait_until(reactor: Any, predicate: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``predicate`` until true; return the seconds waited, TimeoutError after ``timeout``."""
    start = reactor.seconds()
    while not predicate():
        if reactor.seconds() - start > timeout:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")
        await task.deferLater(reactor, interval, lambda: None)
    return float(reactor.seconds() - start)


async def run_builds(master: Any, requests: Sequence[tuple[str, str]]) -> list[int]:
    """Force one build per (builder, host); wait for all; return their results."""
    return await buildrequest_results(master, await force_builds(master, requests, waited_for=True))


async def force_builds(
    master: Any, requests: Sequence[tuple[str, str]], waited_for: bool = False
) -> list[int]:
    """Force one build per (builder, host) without waiting; return the build request ids."""
    builderids: dict[str, int] = {}
    brids: list[int] = []
    for builder, host in requests:
        if builder not in builderids:
            builderids[builder] = await master.data.updates.findBuilderId(builder)
        _bsid, by_builder = await master.data.updates.addBuildset(
            waited_for=waited_for,
            builderids=[builderids[builder]],
            sourcestamps=[
                {"codebase": "", "repository": "", "branch": None, "revision": None, "project": builder}
            ],
            properties={"worker_host": (host, "sshmux")},
        )
        brids += list(by_builder.values())
    return brids


async def buildrequest_results(master: Any, brids: Sequence[int]) -> list[int]:
    """Wait for each build request to complete; return their results."""
    return [await _buildrequest_result(master, brid) for brid in brids]


async def _buildrequest_result(master: Any, brid: int) -> int:
    while True:
        request = await master.data.get(("buildrequests", brid))
        if request["complete"]:
            return int(request["results"])
        await task.deferLater(master.reactor, 0.2, lambda: None)


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def established_tcp_ports() -> list[tuple[int, int]]:
    """The (local port, remote port) of each established TCP connection on this machine."""
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01":  # TCP_ESTABLISHED
                ports.append((_hex_port(fields[1]), _hex_port(fields[2])))
    return ports


def _hex_port(address: str) -> int:
    """The port of a /proc/net/tcp address (``ADDRESS:PORT``, in hexadecimal)."""
    return int(address.rsplit(":", 1)[1], 16)


def established_tcp(local_port: int) -> int:
    """Established TCP connections whose local port is ``local_port`` (the listening side)."""
    return sum(1 for local, _remote in established_tcp_ports() if local == local_port)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> int | None:
    """SIGTERM a child and wait, SIGKILL after ``timeout`` seconds; its exit code (None: never started)."""
    if process is None:
        return None
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class LauncherProcess:
    """An ``ssh-worker run CONFIG`` child process, its output in a log file."""

    def __init__(self, config: Path, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.config = config
        self.args = list(args)  # more `ssh-worker run` options
        self.env = env  # the child's whole environment (None: this one's)
        self.log_path = config.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "buildbot_sshmux.cli.ssh_worker", "run", *self.args, str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.config.parent,
            env=self.env,
        )
        log.close()

    def stop(self, timeout: float = 15.0) -> int | None:
        return stop_process(self.process, timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
