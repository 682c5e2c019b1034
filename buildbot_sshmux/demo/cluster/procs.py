"""Small process and socket helpers of the cluster machinery (blocking, no reactor)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the kernel's pick; another process may take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] = lambda: "",
    interval: float = 0.1,
) -> float:
    """Poll ``predicate`` until true; return the seconds waited, TimeoutError after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}\n{diagnostics()}")
        time.sleep(interval)
    return time.monotonic() - start


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


TWISTD = "from twisted.scripts.twistd import run; run()"


def start_twistd(basedir: Path, stdout_path: Path) -> subprocess.Popen[bytes]:
    """``twistd --nodaemon -y buildbot.tac`` in ``basedir`` (no pidfile: a
    SIGKILLed process restarts at once), its output appended to ``stdout_path``."""
    with open(stdout_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", "--no_save", "-y", "buildbot.tac"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=basedir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop_group(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM a child started with ``start_new_session=True``, then SIGKILL its whole group."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(process)
    return int(process.wait())


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group a child leads (its own children included), if any is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
