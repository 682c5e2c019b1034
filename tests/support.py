"""What the tests that run a real master and ``ssh-worker`` processes need
beyond the demo's harness (`buildbot_sshmux.demo.harness`, imported as ``T``):
build requests and their builds' output, launchers stopped or waited for
without blocking the reactor, the master's log captured, a master stopped
within a deadline, a worker host's key fingerprint, and what the kernel says
about this process (dialled TCP connections, open file descriptors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import ILogObserver
from zope.interface import implementer

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.wire.keys import fingerprint, load_private_key

# -- builds -------------------------------------------------------------------


async def builds_of_request(master: Any, brid: int) -> list[dict[str, Any]]:
    """The builds made for one build request, oldest first."""
    builds = await master.data.get(("buildrequests", brid, "builds"))
    return sorted(builds, key=lambda b: b["buildid"])


async def build_stdout(master: Any, build: dict[str, Any]) -> list[str]:
    """The stdout lines of a build's "build" step (its stdio log, 'o' lines)."""
    log = await master.data.get(("builds", build["buildid"], "steps", "build", "logs", "stdio", "contents"))
    assert log is not None, f"build {build['buildid']}: no stdio log"
    return [line[1:] for line in log["content"].splitlines() if line.startswith("o")]


# -- launchers and masters ----------------------------------------------------


async def wait_process_exit(reactor: Any, launcher: T.LauncherProcess, timeout: float) -> int:
    """Wait (without blocking the reactor) for a launcher to exit; return its exit code."""
    assert launcher.process is not None
    await T.wait_until(reactor, lambda: launcher.process.poll() is not None, timeout, "the launcher to exit")
    return int(launcher.process.returncode)


async def stop_launcher(reactor: Any, launcher: T.LauncherProcess, timeout: float = 15.0) -> int | None:
    """SIGTERM a launcher, SIGKILL it after ``timeout``; never blocks the reactor."""
    if launcher.process is None:
        return None
    if launcher.process.poll() is None:
        launcher.process.terminate()
        try:
            await wait_process_exit(reactor, launcher, timeout)
        except TimeoutError:
            launcher.process.kill()
            await wait_process_exit(reactor, launcher, timeout)
    return launcher.process.returncode


async def stop_master_within(master: Any, reactor: Any, timeout: float = 30.0) -> bool:
    """`T.stop_master`, but give up after ``timeout`` seconds and still stop the database
    threads (so that a test run whose master hangs can exit); True if it stopped cleanly."""
    finished: defer.Deferred[Any] = defer.Deferred()
    stopping = defer.ensureDeferred(T.stop_master(master))
    stopping.addBoth(lambda result: None if finished.called else finished.callback(result))
    timer = reactor.callLater(timeout, lambda: None if finished.called else finished.callback(False))
    result = await finished
    if timer.active():
        timer.cancel()
    if result is False:
        await master.db.pool.stop()
        compression = getattr(getattr(master.db, "logs", None), "_compression_pool", None)
        if compression is not None:
            compression.stop()
        return False
    return True


# -- the master's log ---------------------------------------------------------


@implementer(ILogObserver)
class LogCapture:
    """Every log event of this process, formatted, kept in memory and written to a file."""

    def __init__(self, path: Path) -> None:
        from twisted.logger import formatEventAsClassicLogText

        self.path = path
        self.lines: list[str] = []
        self._file = open(path, "a", encoding="utf-8")
        self._format = formatEventAsClassicLogText

    def __call__(self, event: dict[str, Any]) -> None:
        text = self._format(event)
        if text:
            self.lines.append(text)
            self._file.write(text)

    def start(self) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self)

    def stop(self) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self)
        self._file.close()

    def matching(self, *needles: str) -> list[str]:
        """Logged lines containing every one of ``needles``."""
        return [line for line in self.lines if all(n in line for n in needles)]


def host_fingerprint(site: T.Site, host: str) -> str:
    """The SHA256 fingerprint of a worker host's key, as the master logs it."""
    return fingerprint(load_private_key(site.identities[host]))


# -- what the kernel says -----------------------------------------------------


def established_tcp_to(remote_port: int) -> int:
    """Established TCP connections whose remote port is ``remote_port`` (the dialling side)."""
    return sum(1 for _local, remote in T.established_tcp_ports() if remote == remote_port)


def open_fd_targets(pid: int | str = "self") -> list[str]:
    """What each open fd of a process is (``socket:[inode]``, a path, ``pipe:[...]``)."""
    targets = []
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            targets.append(os.readlink(f"{base}/{fd}"))
        except OSError:  # closed meanwhile (e.g. the fd of os.listdir itself)
            continue
    return targets
