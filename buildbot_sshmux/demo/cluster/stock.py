"""Stock buildbot-worker processes over plain PB/TCP: the comparison the cluster demo prints.

Each is what a site without buildbot-sshmux runs: a directory made by
``buildbot-worker create-worker`` naming one master's PB port, run as
``twistd --nodaemon -y buildbot.tac`` (its log in ``twistd.log``).  It knows
that one master only: when the master dies it keeps redialling it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from buildbot_sshmux.demo.harness import stop_process

from .procs import start_twistd, tail

RUNNER = "import sys; from buildbot_worker.scripts.runner import run; sys.argv[0] = 'buildbot-worker'; run()"


class StockWorker:
    """One ``buildbot-worker`` in ``basedir``, logging in as ``name`` to ``127.0.0.1:PB_PORT``."""

    def __init__(self, basedir: Path, name: str, password: str, pb_port: int) -> None:
        self.basedir = basedir
        self.name = name
        self.password = password
        self.pb_port = pb_port
        self.log_path = basedir / "twistd.log"
        self.stdout_path = basedir / "twistd.stdout"
        self.process: subprocess.Popen[bytes] | None = None

    def create_command(self) -> list[str]:
        """``buildbot-worker create-worker BASEDIR 127.0.0.1:PORT NAME PASSWORD``."""
        master = f"127.0.0.1:{self.pb_port}"
        return [
            *[sys.executable, "-c", RUNNER, "create-worker", "--quiet"],
            *[str(self.basedir), master, self.name, self.password],
        ]

    def start(self) -> None:
        """``twistd --nodaemon -y buildbot.tac`` in its basedir (no pidfile)."""
        self.process = start_twistd(self.basedir, self.stdout_path)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.process, timeout)

    def diagnostics(self) -> str:
        code = self.process.poll() if self.process else None
        return f"--- stock worker {self.name} ({self.basedir}, exit code {code}):\n{tail(self.log_path, 15)}"


def create_all(workers: Sequence[StockWorker], timeout: float = 120.0) -> None:
    """``buildbot-worker create-worker`` for each, the processes side by side."""
    running = []
    for w in workers:
        w.basedir.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(w.create_command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        running.append((w, process))
    for w, process in running:
        output, _ = process.communicate(timeout=timeout)
        if process.returncode != 0:
            raise RuntimeError(
                f"buildbot-worker create-worker {w.basedir} exited {process.returncode}:\n"
                f"{output.decode(errors='replace')[-2000:]}"
            )
