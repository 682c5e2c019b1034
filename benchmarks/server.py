"""The master side of the data workloads (bulk, fairness, stalled peer).

One protocol, `BenchProtocol`, is served over all three transports: on a TCP
port for plain TCP and for the OpenSSH tunnel (sshd connects to it), and on
SSH channels of a real `SSHMuxFactory`.  The first line a client sends says
what the stream is:

``SINK``      count the bytes that follow (worker -> master bulk);
``SOURCE n``  write n bytes at once, as PB writes a large answer, whether or
              not the peer reads;
``PONG``      a PB broker whose root answers ``ping`` (the small call).
"""

from __future__ import annotations

import cProfile
import time
from pathlib import Path
from typing import Any

from twisted.conch.interfaces import IConchUser
from twisted.cred import portal
from twisted.internet import defer, error, protocol
from twisted.spread import pb

from benchmarks import common
from benchmarks.delay import DelayRelay
from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.server import HostAvatar, HostRealm, SSHMuxFactory
from buildbot_sshmux.wire.channel import ProtocolChannel
from buildbot_sshmux.wire.keys import generate_ed25519, load_private_key, public_line, write_private_key

CHUNK = 64 * 1024


class Sink:
    """Bytes received by every SINK stream of one run, and the CPU they cost.

    With a ``profile`` path, cProfile runs from the first byte to the last.
    """

    def __init__(self, expected: int, profile: str | None = None) -> None:
        self.expected = expected
        self.profiler = cProfile.Profile() if profile else None
        self.profile = profile
        self.received = 0
        self.first: tuple[float, float] | None = None  # (wall, cpu)
        self.last: tuple[float, float] | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def count(self, n: int) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())
            if self.profiler is not None:
                self.profiler.enable()
        self.received += n
        if self.received >= self.expected and self.last is None:
            self.last = (time.perf_counter(), time.process_time())
            if self.profiler is not None:
                self.profiler.disable()
                self.profiler.dump_stats(self.profile)
            self.done.callback(None)

    def figures(self) -> dict[str, float]:
        assert self.first is not None and self.last is not None
        return {"seconds": self.last[0] - self.first[0], "cpu": self.last[1] - self.first[1]}


class PongRoot(pb.Root):
    def remote_ping(self, payload: bytes) -> bytes:
        return payload


class BenchProtocol(protocol.Protocol):
    """One stream; its first line says which kind (see the module's docstring)."""

    def __init__(self, bench: BenchFactory) -> None:
        self.bench = bench
        self._head = b""
        self._received: Any = None
        self._broker: pb.Broker | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._received is None:
            self._head += data
            line, newline, data = self._head.partition(b"\n")
            if not newline:
                return
            self._start(*line.decode().split())
        if data:
            self._received(data)

    def _start(self, kind: str, *args: str) -> None:
        if kind == "SINK":
            self._received = lambda data: self.bench.sink.count(len(data))
        elif kind == "SOURCE":
            self._received = lambda data: None
            self.bench.sources += 1
            for _ in range(int(args[0]) // CHUNK):
                # A fresh object per write: a queue of references to one
                # buffer would cost no memory.
                self.transport.write(b"%063d\n" % self.bench.written * (CHUNK // 64))
                self.bench.written += 1
        elif kind == "PONG":
            self._broker = pb.PBServerFactory(PongRoot()).buildProtocol(None)
            self._received = self._broker.dataReceived
            self._broker.makeConnection(self.transport)
        else:
            raise ValueError(f"unknown stream kind {kind!r}")

    def connectionLost(self, reason: Any = None) -> None:
        if reason is not None and reason.check(error.ConnectionAborted):
            self.bench.aborted += 1
        if self._broker is not None:
            self._broker.connectionLost(reason)


class BenchFactory(protocol.Factory):
    """Builds every stream of the master side; keeps their counts."""

    def __init__(self) -> None:
        self.sink = Sink(0)
        self.sources = self.written = self.aborted = 0

    def buildProtocol(self, addr: Any) -> BenchProtocol:
        return BenchProtocol(self)


# --- buildbot-sshmux: the real SSH server, BenchProtocol instead of PB ------


class BenchAvatar(HostAvatar):
    """The real `HostAvatar` (policy checks), whose channels are the real
    `ProtocolChannel` carrying a `BenchProtocol` in place of the master's PB
    broker (and so without `PBChannel`'s bounds on PB input: this is not PB)."""

    def lookupChannel(self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> Any:
        checked = super().lookupChannel(channelType, windowSize, maxPacket, data)  # never opened
        return ProtocolChannel(
            self.server.bench.buildProtocol(checked.peer),
            peer=checked.peer,
            host=checked.host,
            limits=checked.limits,
            call_soon=lambda f: self.server.reactor.callLater(0, f),
            clock=self.server.reactor.seconds,
            label=checked.label,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            avatar=self,
        )


class BenchRealm(HostRealm):
    def requestAvatar(self, avatarId: Any, mind: object, *interfaces: Any) -> Any:
        avatar = BenchAvatar(avatarId, self.server)
        return IConchUser, avatar, avatar.logout


class BenchSSHFactory(SSHMuxFactory):
    """An `SSHMuxFactory` (default limits) letting one host key in, bridging to ``bench``."""

    def __init__(
        self, reactor: Any, host_key: Any, client_key: Any, bench: BenchFactory, bench_port: int
    ) -> None:
        entry = HostEntry(name="bench", key=client_key.public())
        unused = portal.Portal(None)
        super().__init__([host_key], lambda: [entry], lambda: (bench_port, unused, False), reactor)
        self.bench = bench
        self.realm = BenchRealm(self)
        self.portal.realm = self.realm


# --- the master side of one transport --------------------------------------


class DataServer:
    """`BenchFactory` reachable over one transport, and its worker-side processes."""

    def __init__(self, reactor: Any, transport: str, root: Path, rtt: float = 0.0) -> None:
        self.reactor = reactor
        self.transport = transport
        self.root = root
        self.rtt = rtt  # seconds: with more than 0, the worker side reaches the master through a DelayRelay
        self.relays: list[DelayRelay] = []
        self.bench = BenchFactory()
        self.openssh: common.OpenSSH | None = None
        self.listening: list[Any] = []
        self.spec: dict[str, Any] = {}
        self.algorithms = ""

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        identity = self.root / "id_ed25519"
        client_key = generate_ed25519()
        write_private_key(identity, client_key, "bench")
        tcp = self.reactor.listenTCP(0, self.bench, interface="127.0.0.1")
        self.listening.append(tcp)
        port = tcp.getHost().port
        if self.transport == "plain":
            self.spec = {"kind": "tcp", "port": await self.far(port)}
        elif self.transport == "openssh":
            self.openssh = common.OpenSSH(self.reactor, self.root / "openssh", identity)
            (local,) = await self.openssh.start([port], via=self.far)
            self.spec = {"kind": "tcp", "port": local}
            self.algorithms = self.openssh.cipher
        else:
            host_key = generate_ed25519()
            ssh = self.reactor.listenTCP(
                0,
                BenchSSHFactory(self.reactor, host_key, load_private_key(identity), self.bench, port),
                interface="127.0.0.1",
            )
            self.listening.append(ssh)
            self.spec = {
                "kind": "sshmux", "ssh_port": await self.far(ssh.getHost().port), "host_key": public_line(host_key),
                "identity": str(identity), "target": port,
            }  # fmt: skip

    async def far(self, port: int) -> int:
        """The port the worker side dials for ``port``: behind a DelayRelay when there is an RTT."""
        if self.rtt <= 0:
            return port
        relay = DelayRelay(self.reactor, port, self.rtt / 2)
        self.relays.append(relay)
        return await relay.start()

    def helper_cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the helpers on (the master's side, the worker's side)."""
        return self.openssh.cpu() if self.openssh is not None else (0.0, 0.0)

    async def loadgen(self, params: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """Run the worker side (benchmarks.loadgen) once; its figures."""
        child = common.python_child(self.reactor, "benchmarks.loadgen", {**self.spec, **params})
        return await child.result(timeout)

    async def stop(self) -> None:
        for port in self.listening:
            await port.stopListening()
        for relay in self.relays:
            await relay.stop()
        if self.openssh is not None:
            await self.openssh.stop()
