"""Stock OpenSSH on either side of buildbot-sshmux.

* The stock ``ssh`` client against the plugin master: ``ssh -N -L`` carries an
  UNMODIFIED ``buildbot_worker.bot.Worker`` to the master's PB broker, answered
  in process; every other forward, an exec request, a remote forward and an
  unknown key are refused.
* The project's launcher (``ssh-worker run``) through a stock ``sshd`` to an
  UNMODIFIED master (no ``SSHMuxService``).

Everything is real: a Buildbot master with sqlite in this process and reactor,
``ssh``/``sshd`` child processes, TCP sockets on 127.0.0.1.  A missing binary
skips the test with the reason.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

try:
    import buildbot  # noqa: F401
    import buildbot_worker  # noqa: F401
except ImportError:  # pragma: no cover
    buildbot = None

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.wire.keys import fingerprint, load_private_key
from tests import support as S

pytestmark = pytest.mark.openssh

SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
SSHD = next((p for p in ("/usr/sbin/sshd", shutil.which("sshd")) if p and os.access(p, os.X_OK)), None)

NEEDS_SSH = (
    "needs buildbot and buildbot-worker (pip install buildbot-sshmux[test])"
    if buildbot is None
    else "needs the OpenSSH client: ssh and ssh-keygen on PATH (apt-get install openssh-client)"
    if not (SSH and SSH_KEYGEN)
    else None
)
NEEDS_SSHD = NEEDS_SSH or (
    "needs the OpenSSH server: /usr/sbin/sshd (apt-get install openssh-server)" if SSHD is None else None
)

PROJECT, HOST = "libfoo", "hosta"
WORKER = T.worker_name(PROJECT, HOST)
SUCCESS = 0  # buildbot.process.results.SUCCESS


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


def authenticated(ssh_output: str) -> bool:
    """Whether ``ssh -v`` says it logged in (OpenSSH >= 8.x; older: "Authentication succeeded")."""
    return "Authenticated to 127.0.0.1" in ssh_output or "Authentication succeeded" in ssh_output


def tcp_sockets() -> list[tuple[str, int, str, int, str]]:
    """(local ip, local port, remote ip, remote port, state) of this machine's IPv4 TCP sockets."""

    def addr(text: str) -> tuple[str, int]:
        ip, port = text.split(":")
        return socket.inet_ntoa(bytes.fromhex(ip)[::-1]), int(port, 16)

    rows = []
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return rows
    for line in lines:
        fields = line.split()
        rows.append((*addr(fields[1]), *addr(fields[2]), fields[3]))
    return rows


class Child(protocol.ProcessProtocol):
    """A child process (ssh, sshd) with its stdout and stderr kept together."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.output = bytearray()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None

    def start(self) -> Child:
        reactor.spawnProcess(self, self.argv[0], self.argv, env=child_env())
        return self

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = reason.value.exitCode
        self.ended.callback(self.exit_code)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return not self.ended.called

    async def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Wait until ``text`` is in the output; fail early, with the output, if the process ends."""
        try:
            await T.wait_until(reactor, lambda: text in self.text or not self.running, timeout, repr(text))
        except TimeoutError:
            raise AssertionError(f"{text!r} not seen in {timeout}s; output:\n{self.text}") from None
        if text not in self.text:
            raise AssertionError(f"process ended ({self.exit_code}) before {text!r}; output:\n{self.text}")

    async def exited(self, timeout: float = 30.0) -> int | None:
        try:
            await T.wait_until(reactor, lambda: not self.running, timeout, "the process to exit")
        except TimeoutError:
            raise AssertionError(f"still running after {timeout}s; output:\n{self.text}") from None
        return self.exit_code

    async def stop(self) -> None:
        for sig in ("TERM", "KILL"):
            if not self.running:
                return
            try:
                self.transport.signalProcess(sig)
            except ProcessExitedAlready:
                pass
            try:
                await T.wait_until(reactor, lambda: not self.running, 10, "the process to exit")
            except TimeoutError:
                continue


class Probe(protocol.Protocol):
    """Connects to a local forward and records what happens."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.lost = True


class Counting(protocol.Factory):
    """A decoy listener: counts every connection made to it."""

    def __init__(self) -> None:
        self.count = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.count += 1
        return protocol.Protocol()


class Base(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sshmux-openssh-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.log_lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            try:
                self.log_lines.append(formatEvent(event))
            except Exception:  # pragma: no cover
                pass

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def logged(self, *parts: str) -> list[str]:
        return [line for line in self.log_lines if all(p in line for p in parts)]

    async def start_master(
        self,
        *,
        sshmux: bool = True,
        projects: tuple[str, ...] = (PROJECT,),
        command: list[str] | None = None,
    ) -> Any:
        self.site = T.Site(self.root, [HOST])
        config = T.master_config(list(projects), [HOST], self.site, command=command)
        if not sshmux:
            config["services"] = []
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(T.stop_master(master)))
        return master

    async def attach_worker(self, master: Any, port: int, label: str = WORKER) -> Any:
        """An unmodified buildbot-worker `Worker` dialling 127.0.0.1:port, once it
        is attached; stopped at clean-up if still running."""
        from buildbot_worker.bot import Worker

        basedir = self.root / "worker" / label
        basedir.mkdir(parents=True)
        worker = Worker("127.0.0.1", port, WORKER, T.WORKER_PASSWORD.format(name=WORKER), str(basedir), 0)
        worker.startService()
        self.addCleanup(lambda: worker.stopService() if worker.running else None)
        await T.wait_until(reactor, lambda: WORKER in T.attached_workers(master), 30, f"{WORKER} to attach")
        return worker

    def known_hosts(self, ssh_port: int) -> Path:
        path = self.root / "known_hosts"
        path.write_text(f"[127.0.0.1]:{ssh_port} {self.site.host_key_line}\n")
        return path

    def ssh(self, port: int, identity: Path, *args: str, command: tuple[str, ...] = ()) -> Child:
        """Start the stock ssh client against 127.0.0.1:port; it is killed at cleanup."""
        argv = [
            SSH, "-F", "/dev/null", "-v", "-n",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts(port)}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "ConnectTimeout=20",
            "-o", "ExitOnForwardFailure=yes",
            "-i", str(identity),
            "-p", str(port),
            *getattr(self, "_extra_options", []),
            *args,
            "127.0.0.1",
            *command,
        ]  # fmt: skip
        child = Child(argv).start()
        self.addCleanup(lambda: defer.ensureDeferred(child.stop()))
        return child

    async def forward_with(
        self, port: int, options: list[str], targets: list[tuple[str, int]]
    ) -> tuple[Child, list[int]]:
        """`forward` with extra ``-o`` options for ssh."""
        self._extra_options = options
        try:
            return await self.forward(port, self.site.identities[HOST], targets)
        finally:
            self._extra_options = []

    async def forward(
        self, port: int, identity: Path, targets: list[tuple[str, int]]
    ) -> tuple[Child, list[int]]:
        """``ssh -N -L 127.0.0.1:LOCAL:HOST:PORT ...``, once every local listener is up.

        Local ports come from binding port 0; should one be taken meanwhile,
        ssh exits (ExitOnForwardFailure) and is started again on fresh ports.
        """
        for _attempt in range(3):
            locals_ = [free_port() for _ in targets]
            args = ["-N"]
            for (host, target_port), local in zip(targets, locals_):
                args += ["-L", f"127.0.0.1:{local}:{host}:{target_port}"]
            ssh = self.ssh(port, identity, *args)
            try:
                for local in locals_:
                    await ssh.wait_for(f"Local forwarding listening on 127.0.0.1 port {local}")
            except AssertionError:
                if ssh.running or "Address already in use" not in ssh.text:
                    raise
                continue
            self.assertTrue(authenticated(ssh.text), ssh.text)
            return ssh, locals_
        raise AssertionError(f"ssh could not listen on free ports:\n{ssh.text}")


class StockSSHClientTests(Base):
    """The stock ssh client against a master with SSHMuxService."""

    def setUp(self) -> None:
        if NEEDS_SSH:
            raise unittest.SkipTest(NEEDS_SSH)
        super().setUp()

    def test_stock_ssh_client_forward_runs_build(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._forward_runs_build())

    async def _forward_runs_build(self) -> None:

        stops: list[tuple[Any, ...]] = []
        self.patch(reactor, "stop", lambda *a: stops.append(a))

        master = await self.start_master()
        sshmux = T.sshmux_service(master)
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)

        ssh, (local,) = await self.forward(ssh_port, self.site.identities[HOST], [("localhost", pb_port)])
        self.assertEqual(sshmux.connection_count, 1)

        await self.attach_worker(master, local)
        self.assertEqual(await T.run_builds(master, [(PROJECT, HOST)]), [SUCCESS])

        # One SSH connection; the worker's PB connection is a channel inside it,
        # so the master sees the SSH peer as the worker's address and no TCP
        # connection ever reaches the PB port.
        self.assertEqual(sshmux.connection_count, 1)
        (transport,) = sshmux.factory.connections
        self.assertTrue(transport.transport.getTcpNoDelay())
        peer = transport.transport.getPeer()
        self.assertEqual(peer.host, "127.0.0.1")
        self.assertNotEqual(peer.port, local)
        self.assertEqual(master.workers.connections[WORKER].get_peer(), f"127.0.0.1:{peer.port}")
        attaching = self.logged(f"worker '{WORKER}' attaching from ChannelAddress(")
        self.assertEqual(len(attaching), 1, self.log_lines)
        self.assertIn(f"host='127.0.0.1', port={peer.port}, ssh_host='{HOST}'", attaching[0])
        self.assertTrue(
            self.logged(f"host {HOST} (", f"from 127.0.0.1:{peer.port} connected"), self.log_lines
        )
        self.assertFalse(
            [s for s in tcp_sockets() if s[4] == "01" and pb_port in (s[1], s[3])],
            "a TCP connection reached the PB port",
        )
        # A master's draining notice is ours: stock ssh ignores it (no reply is
        # wanted), stays connected, and the worker behind it keeps building.
        sshmux.factory.announce_draining()
        self.assertEqual(await T.run_builds(master, [(PROJECT, HOST)]), [SUCCESS])
        self.assertIn("draining@buildbot-sshmux", ssh.text)
        self.assertTrue(ssh.running, ssh.text)
        self.assertEqual(stops, [], "buildbot-worker called reactor.stop()")

    def test_keepalive_and_rekey_with_stock_ssh(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._keepalive_and_rekey())

    async def _keepalive_and_rekey(self) -> None:
        """Our keepalives and rekeys against ssh's ServerAlive* and RekeyLimit, both ways."""
        from twisted.internet import task

        self.patch(reactor, "stop", lambda *a: None)
        self.site = T.Site(self.root, [HOST])
        config = T.master_config(
            [PROJECT],
            [HOST],
            self.site,
            command=["sh", "-c", "seq 1 40000"],
            service={"keepalive_interval": 1, "keepalive_count_max": 2, "rekey_bytes": 64 * 1024},
        )
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(T.stop_master(master)))
        sshmux = T.sshmux_service(master)
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)
        # ssh rekeys every 2 s (it starts the exchanges in the quiet phase below),
        # the master every 64 KiB (during the builds).
        alive = ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2", "-o", "RekeyLimit=1G 2"]
        ssh, (local,) = await self.forward_with(ssh_port, alive, [("localhost", pb_port)])

        await self.attach_worker(master, local)
        results = await T.run_builds(master, [(PROJECT, HOST), (PROJECT, HOST)])
        self.assertEqual(results, [SUCCESS, SUCCESS])

        (transport,) = sshmux.factory.connections
        self.assertGreaterEqual(transport.rekeys, 1, "the master started no key re-exchange")
        kexinits = ssh.text.count("SSH2_MSG_KEXINIT received")
        self.assertGreaterEqual(kexinits, 2, ssh.text[-3000:])
        # Quiet for four keepalive intervals: each side answers the other's,
        # and ssh starts its time-based re-exchanges.
        await task.deferLater(reactor, 4.5, lambda: None)
        self.assertGreater(ssh.text.count("SSH2_MSG_KEXINIT received"), kexinits, ssh.text[-3000:])
        self.assertTrue(ssh.running, ssh.text[-3000:])
        self.assertEqual(sshmux.connection_count, 1)
        self.assertEqual(self.logged("no answer to"), [])
        self.assertIn(WORKER, T.attached_workers(master))

    def test_aead_ciphers_with_stock_ssh(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._aead_ciphers())

    async def _aead_ciphers(self) -> None:
        """ssh asks for each AEAD cipher in turn, with strict key exchange; a
        build's log crosses re-exchanges started by either side."""

        self.patch(reactor, "stop", lambda *a: None)
        self.site = T.Site(self.root, [HOST])
        config = T.master_config(
            [PROJECT],
            [HOST],
            self.site,
            command=["sh", "-c", "seq 1 40000 | sha256sum; seq 1 40000"],
            service={"rekey_bytes": 8 * 1024},  # ssh (below) re-keys about every 32 KiB it sends
        )
        master = await T.start_master(self.site.master_basedir, config, reactor)
        self.addCleanup(lambda: defer.ensureDeferred(T.stop_master(master)))
        sshmux = T.sshmux_service(master)
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)
        expected = hashlib.sha256("".join(f"{n}\n" for n in range(1, 40001)).encode()).hexdigest()

        for cipher in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"):
            options = ["-o", f"Ciphers={cipher}", "-o", "RekeyLimit=128K"]
            ssh, (local,) = await self.forward_with(ssh_port, options, [("localhost", pb_port)])
            for direction in ("client->server", "server->client"):
                self.assertIn(f"kex: {direction} cipher: {cipher} MAC: <implicit>", ssh.text)
            (transport,) = sshmux.factory.connections
            self.assertEqual(transport.currentEncryptions.inCipType, cipher.encode())
            # Both ends reset sequence numbers at NEWKEYS (else nothing would decrypt).
            self.assertTrue(transport.strict_kex)
            self.assertIn("resetting send seqnr", ssh.text)
            self.assertIn("resetting read seqnr", ssh.text)

            worker = await self.attach_worker(master, local, cipher)
            [brid] = await T.force_builds(master, [(PROJECT, HOST)])
            self.assertEqual(await T.buildrequest_results(master, [brid]), [SUCCESS])
            [build] = await S.builds_of_request(master, brid)
            lines = await S.build_stdout(master, build)
            self.assertEqual(lines, [f"{expected}  -"] + [str(n) for n in range(1, 40001)])
            self.assertGreaterEqual(transport.rekeys, 1, "the master started no key re-exchange")
            self.assertGreaterEqual(ssh.text.count("ssh_set_newkeys: rekeying out"), 2, ssh.text[-3000:])
            self.assertEqual(transport.currentEncryptions.outCipType, cipher.encode())
            await worker.stopService()
            await ssh.stop()
            await T.wait_until(reactor, lambda: not sshmux.factory.connections, 30, "ssh to disconnect")
        self.assertEqual(self.logged("bad MAC"), [])

    def test_stock_ssh_refused_targets(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._refused_targets())

    async def _refused_targets(self) -> None:
        from twisted.conch.error import ConchError

        master = await self.start_master()
        sshmux = T.sshmux_service(master)
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)
        identity = self.site.identities[HOST]
        host_fp = fingerprint(load_private_key(identity))

        # A real listener on another loopback port: it must never see a connection.
        decoy = Counting()
        decoy_port = reactor.listenTCP(0, decoy, interface="127.0.0.1")
        self.addCleanup(decoy_port.stopListening)
        other = decoy_port.getHost().port

        # Record every outbound TCP connection this process makes from now on.
        real_connect = reactor.connectTCP
        dialled: list[tuple[str, int]] = []

        def connect(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            dialled.append((host, port))
            return real_connect(host, port, *args, **kwargs)

        self.patch(reactor, "connectTCP", connect)

        # Another loopback port, a non-loopback address (never contacted), and
        # the PB port number on a non-loopback address.
        targets = [("localhost", other), ("192.0.2.1", 80), ("192.0.2.1", pb_port)]
        ssh, locals_ = await self.forward(ssh_port, identity, targets)
        forwards = dict(zip(targets, locals_))

        for (host, port), local in forwards.items():
            probe = Probe()
            await protocol.ClientCreator(reactor, lambda p=probe: p).connectTCP("127.0.0.1", local)
            await T.wait_until(
                reactor, lambda p=probe: p.lost, 15, f"ssh to close the forward to {host}:{port}"
            )
            self.assertEqual(probe.data, b"")
            await ssh.wait_for(
                f"open failed: administratively prohibited: buildbot-sshmux refuses a channel to {host}:{port}"
            )
            self.assertTrue(
                self.logged(
                    f"refused a channel to {host}:{port}", f"host {HOST} ({host_fp}) from 127.0.0.1:"
                ),
                self.log_lines,
            )

        self.assertEqual(decoy.count, 0)
        self.assertEqual(dialled, [("127.0.0.1", local) for local in forwards.values()])
        self.assertFalse(
            [s for s in tcp_sockets() if s[2] == "192.0.2.1"], "a socket to 192.0.2.1 was opened"
        )
        # Refusing channels leaves the connection up.
        self.assertTrue(ssh.running, ssh.text)
        self.assertEqual(sshmux.connection_count, 1)

        # A second stock ssh with the same key (an admin's test) is refused while
        # the first answers keepalives, and does not disturb it.
        second = self.ssh(ssh_port, identity, command=("true",))
        code = await second.exited()
        self.assertNotEqual(code, 0, second.text)
        self.assertIn(f"too many connections: host {HOST} is connected from 127.0.0.1:", second.text)
        self.assertTrue(ssh.running, ssh.text)
        self.assertEqual(sshmux.connection_count, 1)
        self.assertTrue(self.logged("refused a second connection of host", host_fp), self.log_lines)
        await ssh.stop()
        await T.wait_until(reactor, lambda: sshmux.connection_count == 0, 15, "the forward to close")

        # An exec request needs a session channel: refused, ssh exits non-zero.
        execd = self.ssh(ssh_port, identity, command=("true",))
        code = await execd.exited()
        self.assertNotEqual(code, 0, execd.text)
        self.assertIn("open failed: unknown channel type", execd.text)
        self.assertTrue(
            self.logged("refused a 'session' channel", f"host {HOST} ({host_fp}) from 127.0.0.1:"),
            self.log_lines,
        )

        # A remote forward (tcpip-forward global request) is refused too.
        remote = self.ssh(ssh_port, identity, "-N", "-R", f"127.0.0.1:{free_port()}:localhost:{other}")
        code = await remote.exited()
        self.assertNotEqual(code, 0, remote.text)
        self.assertIn("remote port forwarding failed", remote.text)
        self.assertTrue(
            self.logged("refused global request 'tcpip-forward'", f"host {HOST} ({host_fp})"), self.log_lines
        )
        self.assertEqual(decoy.count, 0)

        # Conch logs each refused channel open as a failure.
        self.flushLoggedErrors(ConchError)

    def test_unknown_key_refused(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._unknown_key_refused())

    async def _unknown_key_refused(self) -> None:
        master = await self.start_master()
        ssh_port = T.ssh_port(master)
        stranger = self.root / "stranger_ed25519"
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f", str(stranger)], check=True
        )
        listed = subprocess.run(
            [SSH_KEYGEN, "-l", "-f", f"{stranger}.pub"], check=True, capture_output=True, text=True
        ).stdout.split()[1]

        ssh = self.ssh(
            ssh_port, stranger, "-N", "-L", f"127.0.0.1:{free_port()}:localhost:{T.pb_port(master)}"
        )
        code = await ssh.exited()
        self.assertEqual(code, 255, ssh.text)
        self.assertIn("Permission denied (publickey)", ssh.text)
        self.assertFalse(authenticated(ssh.text), ssh.text)
        # ssh-keygen's fingerprint and the master's log agree.
        self.assertTrue(
            self.logged(f"refused key {listed} from 127.0.0.1: not in authorized_hosts"), self.log_lines
        )
        await T.wait_until(reactor, lambda: T.sshmux_service(master).connection_count == 0, 10, "disconnect")


class StockSSHDTests(Base):
    """The project's launcher through a stock sshd to an unmodified master."""

    timeout = 180

    def setUp(self) -> None:
        if NEEDS_SSHD:
            raise unittest.SkipTest(NEEDS_SSHD)
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
            # sshd started as root insists on its privilege-separation directory,
            # which only the service's init script creates (mkdir -p /run/sshd).
            try:
                Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as e:
                raise unittest.SkipTest(f"sshd as root needs /run/sshd, which cannot be made ({e})") from e
        super().setUp()

    async def start_sshd(self, pb_port: int, user: str, options: list[str]) -> tuple[Child, int, Path]:
        """A stock sshd on a free port, allowed only local forwards to localhost:pb_port;
        ``options`` are further sshd_config lines."""
        sshd_dir = self.root / "sshd"
        sshd_dir.mkdir()
        host_key = sshd_dir / "ssh_host_ed25519_key"
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "sshd", "-f", str(host_key)], check=True
        )
        authorized_keys = sshd_dir / "authorized_keys"
        shutil.copy(f"{self.site.identities[HOST]}.pub", authorized_keys)
        last = ""
        for _attempt in range(3):
            port = free_port()
            config = sshd_dir / "sshd_config"
            config.write_text(
                "\n".join(
                    [
                        f"Port {port}",
                        "ListenAddress 127.0.0.1",
                        f"HostKey {host_key}",
                        f"AuthorizedKeysFile {authorized_keys}",
                        "PidFile none",
                        "UsePAM no",
                        "StrictModes no",
                        "PubkeyAuthentication yes",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        f"AllowUsers {user}",
                        "AllowTcpForwarding local",
                        f"PermitOpen localhost:{pb_port}",
                        "AllowAgentForwarding no",
                        "X11Forwarding no",
                        "PermitTTY no",
                        "LogLevel DEBUG1",
                        *options,
                    ]
                )
                + "\n"
            )
            sshd = Child([SSHD, "-D", "-e", "-f", str(config)]).start()
            self.addCleanup(lambda s=sshd: defer.ensureDeferred(s.stop()))
            try:
                await sshd.wait_for(f"Server listening on 127.0.0.1 port {port}", 15)
            except AssertionError:
                last = sshd.text
                await sshd.stop()
                continue
            return sshd, port, Path(f"{host_key}.pub")
        raise AssertionError(f"sshd did not start:\n{last}")

    def test_launcher_through_stock_sshd(self) -> defer.Deferred[None]:
        """sshd's default ciphers: the launcher's first choice, AES-128-GCM."""
        return defer.ensureDeferred(self._launcher_through_stock_sshd([], "aes128-gcm@openssh.com"))

    def test_launcher_through_stock_sshd_aes256_gcm_rekeying(self) -> defer.Deferred[None]:
        options = ["Ciphers aes256-gcm@openssh.com", "RekeyLimit 16K"]
        return defer.ensureDeferred(
            self._launcher_through_stock_sshd(options, "aes256-gcm@openssh.com", rekeys=2)
        )

    def test_launcher_through_stock_sshd_chacha20_rekeying(self) -> defer.Deferred[None]:
        options = ["Ciphers chacha20-poly1305@openssh.com", "RekeyLimit 16K"]
        return defer.ensureDeferred(
            self._launcher_through_stock_sshd(options, "chacha20-poly1305@openssh.com", rekeys=2)
        )

    def test_launcher_through_stock_sshd_aes_ctr_rekeying(self) -> defer.Deferred[None]:
        options = ["Ciphers aes128-ctr", "MACs hmac-sha2-256", "RekeyLimit 16K"]
        return defer.ensureDeferred(self._launcher_through_stock_sshd(options, "aes128-ctr", rekeys=2))

    async def _launcher_through_stock_sshd(self, options: list[str], cipher: str, rekeys: int = 0) -> None:
        projects = (PROJECT, "libbar")
        names = [T.worker_name(p, HOST) for p in projects]
        # Each build's log is ~240 KB: many packets, and re-keys when asked for.
        command = ["sh", "-c", "seq 1 40000 | sha256sum; seq 1 40000"] if rekeys else None
        master = await self.start_master(sshmux=False, projects=projects, command=command)
        self.assertFalse([s for s in master.service_manager if type(s).__name__ == "SSHMuxService"])
        pb_port = T.pb_port(master)
        user = pwd.getpwuid(os.geteuid()).pw_name
        sshd, sshd_port, sshd_pub = await self.start_sshd(pb_port, user, options)

        # The launcher pins sshd's host key and logs in as a real account
        # (stock sshd knows no "buildbot-worker" user).
        config = self.site.launcher_config(HOST, sshd_port, pb_port, names)
        text = config.read_text()
        pin = f'host_key = "{self.site.host_key_line}"'
        self.assertIn(pin, text)
        sshd_key = " ".join(sshd_pub.read_text().split()[:2])
        text = text.replace(pin, f'host_key = "{sshd_key}"\nusername = "{user}"')
        if rekeys:  # the launcher re-keys too, every 16 KiB
            text = text.replace("[master]\n", "[master]\nrekey_bytes = 16384\n", 1)
        config.write_text(text)

        launcher = T.LauncherProcess(config)
        launcher.start()
        self.addCleanup(launcher.stop)

        try:
            await T.wait_until(
                reactor, lambda: T.attached_workers(master) >= set(names), 60, "workers to attach"
            )
        except TimeoutError:
            self.fail(f"workers did not attach\nlauncher:\n{launcher.output()}\nsshd:\n{sshd.text}")
        self.assertEqual(await T.run_builds(master, [(p, HOST) for p in projects]), [SUCCESS] * len(projects))

        host_fp = fingerprint(load_private_key(self.site.identities[HOST]))
        self.assertIn(f"Accepted publickey for {user} from 127.0.0.1", sshd.text)
        self.assertIn(host_fp, sshd.text)
        mac = "hmac-sha2-256" if cipher == "aes128-ctr" else "<implicit>"
        for direction in ("client->server", "server->client"):
            self.assertIn(f"kex: {direction} cipher: {cipher} MAC: {mac}", sshd.text)
        self.assertGreaterEqual(sshd.text.count("ssh_set_newkeys: rekeying"), rekeys, sshd.text[-3000:])
        if rekeys:
            self.assertIn("starting key re-exchange", launcher.output())
        # Strict key exchange (Terrapin countermeasure): sshd resets sequence numbers.
        self.assertIn("resetting send seqnr", sshd.text)
        self.assertIn("resetting read seqnr", sshd.text)
        # One SSH connection carries both sessions; sshd opens one loopback TCP
        # connection per channel to the unmodified master's PB port.
        established = [s for s in tcp_sockets() if s[4] == "01"]
        self.assertEqual(len([s for s in established if s[1] == sshd_port]), 1, established)
        self.assertEqual(len([s for s in established if s[1] == pb_port]), len(names), established)
        for name in names:
            self.assertTrue(master.workers.connections[name].get_peer().startswith("127.0.0.1:"))
        self.assertIsNone(launcher.process.poll(), launcher.output())
