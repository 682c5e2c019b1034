"""Buildbot masters of a cluster, each a ``twistd --nodaemon`` subprocess of its own.

Each master's basedir has a ``buildbot.tac`` (Buildbot's own, log rotation
kept: ``twistd.log``) and a ``master.cfg`` written as text: the demo harness's
`master_config` (one builder per project, one worker per (project, host), a
ForceScheduler, `SSHMuxService`; ``config_args``, more of its keyword
arguments, as Python literals), then ``multiMaster``, the shared PostgreSQL
database, the crossbar mq and a web server (REST API) on 127.0.0.1.  Every
master has its own SSH host key and its own SSH, PB and web ports (fixed at
creation, so that a restarted master is where its workers expect it); the
``authorized_hosts`` file is the site's, shared.

Run under our own process control, not ``buildbot start`` (which fails for ~10 s
after a SIGKILL): `start`, `stop` (SIGTERM), `kill` (SIGKILL), `wait_ready`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from buildbot_sshmux.demo.harness import stop_process
from buildbot_sshmux.wire.keys import generate_ed25519, public_line, write_private_key

from .procs import free_port, listening, start_twistd, tail, wait_until

WAMP_JOINED = "Wamp connection succeed!"
RUNNING = "BuildMaster is running"

TAC = """\
import os

from twisted.application import service
from twisted.python.log import FileLogObserver, ILogObserver
from twisted.python.logfile import LogFile

from buildbot.master import BuildMaster

basedir = os.path.abspath(os.path.dirname(__file__))
application = service.Application('buildmaster')
logfile = LogFile.fromFullPath(os.path.join(basedir, "twistd.log"), rotateLength=10000000, maxRotatedFiles=10)
application.setComponent(ILogObserver, FileLogObserver(logfile).emit)
m = BuildMaster(basedir, 'master.cfg', None)
m.setServiceParent(application)
"""

CONFIG = """\
# master {name!r} of a cluster; written by buildbot_sshmux/demo/cluster/masters.py
from types import SimpleNamespace

from buildbot_sshmux.demo import harness

site = SimpleNamespace(host_key_path={host_key!r}, authorized_hosts={authorized_hosts!r})
c = BuildmasterConfig = harness.master_config(
    {projects!r}, {hosts!r}, site,
    ssh_port="tcp:{ssh}:interface=127.0.0.1", pb_port="tcp:{pb}:interface=127.0.0.1",{config_args}
)
del c["db_url"]
c["db"] = {{"db_url": {db_url!r}}}
c["multiMaster"] = True
c["mq"] = {{"type": "wamp", "router_url": {router_url!r}, "realm": {realm!r}}}
c["www"] = {{"port": "tcp:{www}:interface=127.0.0.1", "plugins": {{}}}}
c["buildbotURL"] = "http://127.0.0.1:{www}/"
c["title"] = "cluster master {name}"
"""


class PortInUse(RuntimeError):
    """A port picked free was taken by another process before the master bound it."""


class ClusterMaster:
    """One master's basedir and process.

    ``config_args`` are more keyword arguments of `harness.master_config`
    (literals: ``command``, ``extra_workers``...); ``extra_config`` is appended to
    master.cfg (Python, ``c`` is the config dict).
    """

    def __init__(
        self,
        name: str,
        basedir: Path,
        *,
        authorized_hosts: Path,
        db_url: str,
        router_url: str,
        realm: str,
        projects: Sequence[str],
        hosts: Sequence[str],
        extra_config: str = "",
        config_args: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.basedir = basedir
        self.authorized_hosts = authorized_hosts
        self.db_url = db_url
        self.router_url = router_url
        self.realm = realm
        self.projects = list(projects)
        self.hosts = list(hosts)
        self.extra_config = extra_config
        self.config_args = dict(config_args or {})
        self.host_key_path = basedir / "sshmux" / "ssh_host_ed25519_key"
        self.log_path = basedir / "twistd.log"
        self.stdout_path = basedir / "twistd.stdout"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        (basedir / "sshmux").mkdir(parents=True, exist_ok=True)
        key = generate_ed25519()
        write_private_key(self.host_key_path, key, f"master {name}")
        self.host_key_line = public_line(key)
        self.pick_ports()

    def pick_ports(self) -> None:
        """Free ports for SSH, PB and the web server (again after a `PortInUse`); rewrite the files."""
        self.ssh_port, self.pb_port, self.www_port = free_port(), free_port(), free_port()
        self.write()

    def write(self) -> None:
        (self.basedir / "buildbot.tac").write_text(TAC)
        text = CONFIG.format(
            name=self.name,
            host_key=str(self.host_key_path),
            authorized_hosts=str(self.authorized_hosts),
            projects=self.projects,
            hosts=self.hosts,
            ssh=self.ssh_port,
            pb=self.pb_port,
            www=self.www_port,
            db_url=self.db_url,
            router_url=self.router_url,
            realm=self.realm,
            config_args="".join(f"\n    {key}={value!r}," for key, value in self.config_args.items()),
        )
        (self.basedir / "master.cfg").write_text(text + self.extra_config)

    # -- the process ----------------------------------------------------------

    def start(self) -> None:
        """Start twistd (no pidfile: a SIGKILLed master restarts at once)."""
        assert self.process is None or self.process.poll() is not None, f"master {self.name} is running"
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = start_twistd(self.basedir, self.stdout_path)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until this start joined the WAMP realm and the SSH and web ports listen."""

        def ready() -> bool:
            log = self.log()
            if "Address already in use" in log or "Couldn't listen on" in log:
                raise PortInUse(f"master {self.name}: a port was taken\n{self.diagnostics()}")
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"master {self.name} exited\n{self.diagnostics()}")
            return (
                WAMP_JOINED in log
                and RUNNING in log
                and listening(self.ssh_port)
                and listening(self.www_port)
            )

        return wait_until(ready, timeout, f"master {self.name} to start", self.diagnostics, 0.2)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); its exit code."""
        return stop_process(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash: the database still says this master is active and has its workers."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop_clean(self, timeout: float = 120.0) -> float:
        """SIGUSR1, as ``buildbot stop --clean``: Buildbot's clean shutdown (no new build
        starts here, running builds finish, then the master stops); the seconds until it exited."""
        assert self.process is not None and self.process.poll() is None, f"master {self.name} is not running"
        began = time.monotonic()
        self.process.send_signal(signal.SIGUSR1)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"master {self.name} did not stop within {timeout:.0f}s of SIGUSR1\n{self.diagnostics()}"
            ) from None
        return time.monotonic() - began

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, since_start: bool = True) -> str:
        """twistd.log (what this start wrote, unless ``since_start`` is False)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset if since_start else 0)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        code = self.process.poll() if self.process else None
        return (
            f"--- master {self.name} ({self.basedir}, exit code {code}), twistd.log, last lines:\n"
            f"{tail(self.log_path)}\n--- twistd.stdout:\n{tail(self.stdout_path, 15)}"
        )

    # -- its REST API -----------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.www_port}/api/v2/"

    def get(self, path: str, **filters: Any) -> dict[str, Any]:
        """GET /api/v2/PATH?FILTERS; the decoded JSON."""
        url = self.api_url + path + ("?" + urllib.parse.urlencode(filters) if filters else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.load(response))

    def rpc(self, path: str, method: str, **params: Any) -> Any:
        """POST a JSON-RPC control call to /api/v2/PATH; its result."""
        body = json.dumps({"jsonrpc": "2.0", "method": method, "id": 1, "params": params}).encode()
        request = urllib.request.Request(
            self.api_url + path, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        if "error" in answer:
            raise RuntimeError(f"{path} {method}: {answer['error']}")
        return answer["result"]

    def masterid(self) -> int:
        """This master's id (its row in the shared masters table: "HOSTNAME:BASEDIR")."""
        suffix = ":" + str(self.basedir.resolve())
        for master in self.get("masters")["masters"]:
            if master["name"].endswith(suffix):
                return int(master["masterid"])
        raise LookupError(f"master {self.name} is not in the masters table")


def write_schema_template(basedir: Path, db_url: str) -> None:
    """Create Buildbot's schema in an empty database (``buildbot upgrade-master``, ~1-2 s)."""
    basedir.mkdir(parents=True, exist_ok=True)
    (basedir / "buildbot.tac").write_text(TAC)
    (basedir / "master.cfg").write_text(
        f"c = BuildmasterConfig = {{'db': {{'db_url': {db_url!r}}}, 'buildbotNetUsageData': None,\n"
        "                          'multiMaster': True}  # no workers nor builders needed\n"
    )
    runner = "import sys; from buildbot.scripts.runner import run; sys.argv[0] = 'buildbot'; run()"
    done = subprocess.run(
        [sys.executable, "-c", runner, "upgrade-master", "--quiet", str(basedir)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"buildbot upgrade-master exited {done.returncode}:\n{done.stdout}{done.stderr}")
