"""A cluster: its database and realm, a site of keys, masters and launchers.

The cluster tests' `cluster` fixture (tests/cluster/conftest.py) makes one per
test and closes it after: launchers stopped, masters stopped (SIGKILL after
30 s), database dropped; ``buildbot-sshmux demo --cluster`` makes one.
Everything is blocking and talks to the masters the way a user would: their
REST API, their logs, the shared database.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from buildbot_sshmux.demo import harness as T

from .masters import ClusterMaster, PortInUse
from .pg import PostgresServer
from .procs import tail, wait_until
from .router import CrossbarRouter


class Cluster:
    """N masters sharing one database (``db_name`` on ``pg``) and one realm on ``router``."""

    def __init__(
        self,
        root: Path,
        pg: PostgresServer,
        db_name: str,
        router: CrossbarRouter,
        realm: str,
        keep_hint: str = "",
    ) -> None:
        self.root = root
        self.pg = pg
        self.db_name = db_name
        self.router = router
        self.realm = realm
        self.site: T.Site | None = None
        self.masters: dict[str, ClusterMaster] = {}
        self.launchers: list[T.LauncherProcess] = []
        self.timings: dict[str, float] = {}
        self.keep_hint = keep_hint  # how to keep the directory, said with it in `diagnostics`

    @property
    def db_url(self) -> str:
        return self.pg.url(self.db_name)

    def make_site(self, hosts: Sequence[str]) -> T.Site:
        """Worker host keys and the shared authorized_hosts (``host="H",workers="*-H"`` each)."""
        self.site = T.Site(self.root, list(hosts))
        return self.site

    def add_master(
        self,
        name: str,
        projects: Sequence[str],
        hosts: Sequence[str] | None = None,
        extra_config: str = "",
        config_args: dict[str, Any] | None = None,
    ) -> ClusterMaster:
        """Write master ``name``'s basedir (``ROOT/masters/NAME``); start it with `start`."""
        assert self.site is not None, "make_site first"
        master = ClusterMaster(
            name,
            self.root / "masters" / name,
            authorized_hosts=self.site.authorized_hosts,
            db_url=self.db_url,
            router_url=self.router.url,
            realm=self.realm,
            projects=projects,
            hosts=hosts if hosts is not None else self.site.hosts,
            extra_config=extra_config,
            config_args=config_args,
        )
        self.masters[name] = master
        return master

    def start(self, *masters: ClusterMaster, timeout: float = 90.0, attempts: int = 3) -> float:
        """Start masters together and wait for each to be ready; the seconds it took.

        A master that found a port taken gets new ports and another try (only
        before anything depends on its ports: its first start).
        """
        began = time.monotonic()
        pending = list(masters or self.masters.values())
        for master in pending:
            master.start()
        for master in pending:
            for attempt in range(attempts):
                try:
                    master.wait_ready(timeout)
                    break
                except PortInUse:
                    master.stop()
                    if attempt + 1 == attempts:
                        raise
                    master.pick_ports()
                    master.start()
        took = time.monotonic() - began
        self.timings[f"start {'+'.join(m.name for m in pending)}"] = took
        return took

    # -- launchers ----------------------------------------------------------------

    def launcher_config(self, host: str, master: ClusterMaster, workers: Iterable[str]) -> Path:
        """``HOST/ssh-worker.toml``: these workers, over SSH to ``master``, pinned to its host key."""
        assert self.site is not None
        path = self.site.launcher_config(host, master.ssh_port, master.pb_port, workers)
        text = path.read_text().replace(self.site.host_key_line, master.host_key_line)
        path.write_text(text)
        return path

    def launcher_config_masters(
        self, host: str, placement: Sequence[tuple[ClusterMaster, Iterable[str]]]
    ) -> Path:
        """``HOST/ssh-worker.toml`` with a ``[[master]]`` per master: these workers on each.

        One launcher process, one SSH connection per master, each pinned to
        that master's host key; every worker says which master it is on.
        """
        assert self.site is not None
        lines: list[str] = []
        for master, _workers in placement:
            lines += [
                "[[master]]",
                f'name = "{master.name}"',
                f'address = "127.0.0.1:{master.ssh_port}"',
                f'host_key = "{master.host_key_line}"',
                f'identity = "{self.site.identities[host].name}"',
                f"pb_port = {master.pb_port}",
                "",
            ]
        for master, workers in placement:
            for name in workers:
                lines += [
                    "[[worker]]",
                    f'name = "{name}"',
                    f'password = "{T.WORKER_PASSWORD.format(name=name)}"',
                    f'basedir = "workers/{name}"',
                    f'master = "{master.name}"',
                    "",
                ]
        path = self.site.root / host / "ssh-worker.toml"
        path.write_text("\n".join(lines))
        return path

    def start_launcher(self, config: Path) -> T.LauncherProcess:
        """``ssh-worker run CONFIG``; stopped when the cluster closes."""
        launcher = T.LauncherProcess(config)
        launcher.start()
        self.launchers.append(launcher)
        return launcher

    def cluster_launcher_config(
        self, host: str, masters: Sequence[ClusterMaster], workers: Iterable[str], **shared: Any
    ) -> Path:
        """``HOST/ssh-worker.toml``: one ``[cluster]`` of these masters, each member with its
        address, PB port and host key; these workers; ``shared`` keys in the table too."""
        assert self.site is not None
        members = ",\n".join(
            f'    {{ address = "127.0.0.1:{m.ssh_port}", pb_port = {m.pb_port}, host_key = "{m.host_key_line}" }}'
            for m in masters
        )
        lines = [
            "[cluster]",
            f"masters = [\n{members},\n]",
            f'identity = "{self.site.identities[host].name}"',
        ]
        lines += [f"{key} = {value!r}" for key, value in shared.items()]
        for name in workers:
            lines += [
                "",
                "[[worker]]",
                f'name = "{name}"',
                f'password = "{T.WORKER_PASSWORD.format(name=name)}"',
                f'basedir = "workers/{name}"',
            ]
        path = self.site.root / host / "ssh-worker.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- what the cluster says ------------------------------------------------------

    def active_masters(self) -> dict[str, bool]:
        """The shared masters table: name -> active."""
        return {
            name: bool(active)
            for name, active in self.pg.query(self.db_name, "SELECT name, active FROM masters")
        }

    def wait_connected(
        self, worker: str, to: ClusterMaster, via: ClusterMaster, timeout: float = 60.0
    ) -> float:
        """Wait until ``via``'s REST API says ``worker`` is connected to master ``to`` (and only to it)."""
        masterid = to.masterid()

        def connected() -> bool:
            rows = via.get("workers", name=worker)["workers"]
            return bool(rows) and [c["masterid"] for c in rows[0]["connected_to"]] == [masterid]

        return self.wait(connected, timeout, f"{worker} to be connected to master {to.name}")

    def force_build(self, via: ClusterMaster, builder: str, scheduler: str = "force") -> int:
        """Force a build of ``builder`` through ``via``'s REST API; the build request id."""
        builderid = via.get("builders", name=builder)["builders"][0]["builderid"]
        _bsid, brids = via.rpc(f"forceschedulers/{scheduler}", "force", builderid=builderid)
        return int(brids[str(builderid)])

    def wait_request(self, via: ClusterMaster, brid: int, timeout: float = 90.0) -> dict[str, Any]:
        """Wait for a build request to complete; its row as ``via``'s REST API shows it."""
        found: dict[str, Any] = {}

        def complete() -> bool:
            found.update(via.get(f"buildrequests/{brid}")["buildrequests"][0])
            return bool(found["complete"])

        self.wait(complete, timeout, f"build request {brid} to complete")
        return found

    def wait(self, predicate: Any, timeout: float, what: str) -> float:
        return wait_until(predicate, timeout, what, self.diagnostics, 0.2)

    def diagnostics(self) -> str:
        parts = [f"cluster directory: {self.root}{self.keep_hint and f' ({self.keep_hint})'}"]
        parts += [m.diagnostics() for m in self.masters.values()]
        for launcher in self.launchers:
            code = launcher.process.poll() if launcher.process else None
            parts.append(f"--- {launcher.log_path} (exit code {code}):\n{tail(launcher.log_path, 30)}")
        parts.append(f"--- crossbar {self.router.log_path}:\n{tail(self.router.log_path, 15)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every launcher, then every master."""
        for launcher in self.launchers:
            launcher.stop()
        for master in self.masters.values():
            master.stop()
