"""A crossbar WAMP router, the message queue of Buildbot's multi-master mode.

crossbar lives in a venv of its own (``.ci/install-cluster`` makes it, see
`parts`: ~/.cache/buildbot-sshmux/crossbar-venv, or SSHMUX_CROSSBAR_VENV), or
SSHMUX_CROSSBAR names the executable.  The router serves the realms it is
given, anonymous and allowed everything, on ``ws://127.0.0.1:PORT/ws``.
crossbar refuses port 0, so a free port is picked (and another one tried if
it was taken meanwhile).  Ready when its node prints NODE_BOOT_COMPLETE.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .procs import free_port, stop_group, tail, wait_until

READY = "NODE_BOOT_COMPLETE"


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("SSHMUX_CROSSBAR_VENV") or cache / "buildbot-sshmux" / "crossbar-venv")


def find_crossbar() -> Path | None:
    """The crossbar executable: SSHMUX_CROSSBAR, or the venv ``.ci/install-cluster`` completed."""
    configured = os.environ.get("SSHMUX_CROSSBAR")
    if configured:
        return Path(configured)
    venv = default_venv()
    return venv / "bin" / "crossbar" if (venv / ".complete").exists() else None


def realm_config(name: str) -> dict[str, Any]:
    """A realm whose anonymous clients may call, register, publish and subscribe anything."""
    allow = {"call": True, "register": True, "publish": True, "subscribe": True}
    permission = {
        "uri": "",
        "match": "prefix",
        "allow": allow,
        "disclose": {"caller": False, "publisher": False},
    }
    return {"name": name, "roles": [{"name": "anonymous", "permissions": [permission]}]}


def node_config(realms: Sequence[str], port: int) -> dict[str, Any]:
    """A crossbar node: one router worker, these realms, one WebSocket transport at /ws."""
    transport = {
        "type": "web",
        "endpoint": {"type": "tcp", "port": port, "interface": "127.0.0.1"},
        "paths": {"ws": {"type": "websocket"}},
    }
    router = {"type": "router", "realms": [realm_config(r) for r in realms], "transports": [transport]}
    return {"version": 2, "controller": {}, "workers": [router]}


class CrossbarRouter:
    """A crossbar node in ``directory``: `start`, `url`, `stop`; its output in ``crossbar.log``."""

    def __init__(self, executable: Path, directory: Path, realms: Sequence[str]) -> None:
        self.executable = executable
        self.directory = directory
        self.realms = list(realms)
        self.cbdir = directory / ".crossbar"
        self.log_path = directory / "crossbar.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The router URL for Buildbot's ``c['mq']['router_url']``."""
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 60.0, attempts: int = 3) -> float:
        """Start on a free port and wait for the node to boot; return the seconds it took."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                self.stop()
                if attempt + 1 == attempts or "already in use" not in self.output():
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> float:
        self.cbdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.cbdir / "config.json").write_text(json.dumps(node_config(self.realms, self.port), indent=2))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.executable), "start", "--cbdir", str(self.cbdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # else READY sits in its buffer
                start_new_session=True,  # its router worker is a child: stop the group
            )
        process = self.process

        def booted() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"crossbar exited ({process.returncode}):\n{tail(self.log_path)}")
            return READY in self.output()

        return wait_until(booted, timeout, "crossbar to boot", lambda: tail(self.log_path))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (the node stops its router worker), SIGKILL the group after 15 s."""
        if self.process is not None:
            stop_group(self.process)
            self.process = None
