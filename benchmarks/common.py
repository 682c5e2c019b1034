"""Shared parts: /proc figures, statistics, child processes, a private OpenSSH.

Linux only (figures come from /proc).  Every process of a run is a child of
the runner, so one process tree holds the whole benchmark.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol, task

ROOT = Path(__file__).resolve().parent.parent
"""The project's directory: children import benchmarks and buildbot_sshmux from here."""

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
SSHD = next((p for p in ("/usr/sbin/sshd", shutil.which("sshd")) if p and os.access(p, os.X_OK)), None)
MiB = 1 << 20


# --- figures ---------------------------------------------------------------


def _status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss(pid: int | str = "self") -> int:
    """Resident set size in bytes (VmRSS)."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident set size in bytes since the process started (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of one live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def precise_cpu_seconds(pid: int | str) -> float:
    """CPU seconds of one live process's threads, to the nanosecond (schedstat; 0 if it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except OSError:
        return 0.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (sshd forks one per connection)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in descendants(pid))


def thread_cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process's (main thread, other threads: e.g. Buildbot's database pool)."""
    main = others = 0.0
    for tid in os.listdir("/proc/self/task"):
        seconds = cpu_seconds(f"self/task/{tid}")
        if int(tid) == os.getpid():
            main = seconds
        else:
            others += seconds
    return main, others


def raise_fd_limit() -> int:
    """Raise this process's open files limit (and its children's) to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listen_overflows() -> int:
    """Connections a full accept queue turned away, machine-wide (TcpExt ListenOverflows)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    names, values = (line.split() for line in lines if line.startswith("TcpExt:"))
    return int(values[names.index("ListenOverflows")])


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def median(values: Sequence[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    values = sorted(values)
    if not values:
        return None
    rank = max(1, min(len(values), int(-(-q * len(values) // 100))))
    return values[rank - 1]


LISTEN = "tcp:0:interface=127.0.0.1"
TWISTED_BACKLOG = 50
"""Twisted's listen backlog when a strports description names none: what a stock master.cfg gets."""


def somaxconn() -> int:
    """The kernel's cap on any listen backlog (net.core.somaxconn)."""
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def listen_on(port: int = 0, backlog: int | None = None) -> str:
    """A strports description on 127.0.0.1 (``backlog`` None: Twisted's default)."""
    return f"tcp:{port}:interface=127.0.0.1" + (f":backlog={backlog}" if backlog else "")


def effective_backlog(backlog: int | None) -> int:
    """The accept queue a listen with ``backlog`` gets (None: Twisted's 50), after the kernel's cap."""
    return min(backlog or TWISTED_BACKLOG, somaxconn())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def wait_until(reactor: Any, predicate: Any, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout``."""
    start = reactor.seconds()
    while not predicate():
        if reactor.seconds() - start > timeout:
            return None
        await sleep(reactor, interval)
    return float(reactor.seconds() - start)


# --- child processes -------------------------------------------------------


def python_env() -> dict[str, str]:
    """The environment of Python children: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def openssh_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


class Child(protocol.ProcessProtocol):
    """A child process; its stdout and stderr kept apart, or both written to ``log``.

    A ``log`` file spares this process reading a chatty child's output.
    """

    def __init__(
        self,
        reactor: Any,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        log: Path | None = None,
    ) -> None:
        self.reactor = reactor
        self.argv = [str(a) for a in argv]
        self.out = bytearray()
        self.err = bytearray()
        self.log = log
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.exit_code: int | None = None
        self.pid = 0
        env = env if env is not None else python_env()
        if log is None:
            reactor.spawnProcess(self, self.argv[0], self.argv, env=env, path=cwd)
            return
        with open(log, "ab") as f:
            fds = {0: "w", 1: f.fileno(), 2: f.fileno()}
            reactor.spawnProcess(self, self.argv[0], self.argv, env=env, path=cwd, childFDs=fds)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.exit_code = reason.value.exitCode
        self.ended.callback(None)

    @property
    def running(self) -> bool:
        return not self.ended.called

    def text(self) -> str:
        if self.log is not None:
            return self.log.read_text(errors="replace")
        return (self.out + self.err).decode("utf-8", "replace")

    async def wait_for(self, needle: str, timeout: float = 20.0) -> None:
        """Wait until ``needle`` is in the output; RuntimeError if it never comes."""
        await wait_until(self.reactor, lambda: needle in self.text() or not self.running, timeout)
        if needle not in self.text():
            raise RuntimeError(f"{self.argv[0]}: no {needle!r} after {timeout}s:\n{self.text()[-3000:]}")

    async def result(self, timeout: float) -> dict[str, Any]:
        """The JSON object the child prints last, once it exits."""
        if await wait_until(self.reactor, lambda: not self.running, timeout) is None:
            await self.stop()
            raise RuntimeError(
                f"{' '.join(self.argv[:4])}: timed out after {timeout:.0f}s:\n{self.text()[-3000:]}"
            )
        lines = self.out.decode().strip().splitlines()
        if self.exit_code != 0 or not lines:
            raise RuntimeError(f"{' '.join(self.argv[:4])} exited {self.exit_code}:\n{self.text()[-3000:]}")
        return json.loads(lines[-1])  # type: ignore[no-any-return]

    async def stop(self, grace: float = 10.0) -> None:
        for sig in ("TERM", "KILL"):
            if not self.running:
                return
            try:
                self.transport.signalProcess(sig)
            except error.ProcessExitedAlready:
                return
            await wait_until(self.reactor, lambda: not self.running, grace)


def python_child(reactor: Any, module: str, params: dict[str, Any], cwd: str | None = None) -> Child:
    return Child(reactor, [sys.executable, "-m", module, json.dumps(params)], cwd=cwd)


# --- OpenSSH ---------------------------------------------------------------


def openssh_missing() -> str | None:
    """Why the OpenSSH column cannot be measured here, or None."""
    if not (SSH and SSH_KEYGEN):
        return "no OpenSSH client (apt-get install openssh-client)"
    if SSHD is None:
        return "no sshd (apt-get install openssh-server)"
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        # sshd started as root wants its privilege separation directory.
        try:
            Path("/run/sshd").mkdir(mode=0o755, parents=True)
        except OSError as e:
            return f"sshd as root needs /run/sshd ({e})"
    return None


class OpenSSH:
    """A private stock sshd on 127.0.0.1 and one ``ssh -N -L`` tunnel through it.

    OpenSSH keeps its default algorithms (the ones users get).
    """

    def __init__(self, reactor: Any, root: Path, identity: Path) -> None:
        self.reactor = reactor
        self.root = root
        self.identity = identity
        self.sshd: Child | None = None
        self.ssh: Child | None = None
        self.cipher = "?"

    def _write_config(self, port: int, user: str, dialled: int) -> tuple[Path, Path]:
        """sshd_config and known_hosts (for ``dialled``) for a fresh host key; (config, known_hosts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "ssh_host_ed25519_key"
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.identity}.pub\nAllowUsers {user}\n"
            "PidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nAllowTcpForwarding local\nX11Forwarding no\n"
            "PermitTTY no\nLogLevel INFO\n"
        )
        known_hosts = self.root / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{dialled} {Path(f'{host_key}.pub').read_text()}")
        return config, known_hosts

    async def start(self, targets: Sequence[int], via: Any = None) -> list[int]:
        """Start sshd and a tunnel; return the local port forwarded to each target port.

        ``via`` (async, port -> port) puts something between ssh and sshd, e.g. a delay.
        """
        port, user = free_port(), pwd.getpwuid(os.geteuid()).pw_name
        dialled = await via(port) if via is not None else port
        config, known_hosts = self._write_config(port, user, dialled)
        self.sshd = Child(self.reactor, [SSHD, "-D", "-e", "-f", config], env=openssh_env())
        await self.sshd.wait_for(f"Server listening on 127.0.0.1 port {port}")
        locals_ = [free_port() for _ in targets]
        forwards = [f"-L127.0.0.1:{local}:127.0.0.1:{target}" for local, target in zip(locals_, targets)]
        # fmt: off
        argv = [
            SSH, "-F", "/dev/null", "-v", "-N", "-n", "-p", str(dialled), "-i", self.identity,
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ExitOnForwardFailure=yes", *forwards, f"{user}@127.0.0.1",
        ]
        # fmt: on
        self.ssh = Child(self.reactor, argv, env=openssh_env())
        for local in locals_:
            await self.ssh.wait_for(f"Local forwarding listening on 127.0.0.1 port {local}")
        for line in self.ssh.text().splitlines():
            if "kex: client->server cipher:" in line:
                self.cipher = line.split("cipher:")[1].split()[0]
        return locals_

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (sshd and its children, the ssh client)."""
        assert self.sshd is not None and self.ssh is not None
        return tree_cpu_seconds(self.sshd.pid), cpu_seconds(self.ssh.pid)

    def client_rss(self) -> int:
        assert self.ssh is not None
        return rss(self.ssh.pid)

    async def stop(self) -> None:
        for child in (self.ssh, self.sshd):
            if child is not None:
                await child.stop()
