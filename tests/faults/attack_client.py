"""Attackers of the master's public SSH port, and a legitimate host's probe.

Run as a child process by ``test_public_port`` so that the attacker's memory
and CPU are not counted in the master's::

    python attack_client.py MODE JSON_ARGUMENTS

Each mode (below, ``MODES``) sets itself up, prints ``READY {...}``, waits for
a ``GO`` line on stdin, attacks for ``duration`` seconds or ``cap`` bytes
(whichever comes first), prints ``DONE {...}`` (what it sent, whether the
master dropped it, the disconnect reasons it read) and then holds its
connections until stdin closes.  A master that disconnects the attacker is a
success here, not an error: the attacker counts it and stops.  ``FAILED {...}``
means the attacker itself broke (a setup that could not finish).

``probe`` is the legitimate host: a new SSH login with an authorized key from
another source address (``bind``), a ``direct-tcpip`` channel to the PB port
and one PB round trip (``remote_login``, which only returns a challenge),
every ``interval`` seconds, each printed as ``START t`` and ``END {...}``
(times are ``time.monotonic()``, the same clock as the test's).
"""

from __future__ import annotations

import itertools
import json
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twisted.conch.ssh import connection, keys, transport  # noqa: E402
from twisted.conch.ssh.common import NS  # noqa: E402
from twisted.internet import defer, endpoints, protocol, reactor, stdio, task  # noqa: E402
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver  # noqa: E402
from twisted.spread import banana, pb  # noqa: E402

from buildbot_sshmux.wire.keys import load_private_key  # noqa: E402
from buildbot_sshmux.worker.link import ChannelEndpoint, HostKeyPins, MasterLink  # noqa: E402
from tests.unit.sshharness import RawSSHClient  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
QUEUE = 1 * MiB  # what one attacking connection keeps queued on its own side, at most
BIG = 1_000_000  # a field that still fits Conch's 1 MiB packet limit
now = time.monotonic


class Control(LineReceiver):
    """stdin/stdout: ``GO`` starts the attack, closing stdin ends the process."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self.go: defer.Deferred[None] = defer.Deferred()

    def say(self, word: str, payload: Any = None) -> None:
        line = word if payload is None else f"{word} {json.dumps(payload)}"
        self.sendLine(line.encode())

    def lineReceived(self, line: bytes) -> None:
        if line.strip() == b"GO" and not self.go.called:
            self.go.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        if reactor.running:
            reactor.stop()


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def until(predicate: Callable[[], bool], seconds: float) -> None:
    """Wait until ``predicate()`` holds, or ``seconds`` have passed."""
    end = now() + seconds
    while not predicate() and now() < end:
        await sleep(0.02)


def queued(tcp: Any) -> int:
    """Bytes a Twisted TCP transport holds that the kernel has not taken yet."""
    try:
        return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
    except AttributeError:
        return 0


def b128(n: int) -> bytes:
    out: list[bytes] = []
    banana.int2b128(n, out.append)
    return b"".join(out)


def plain_packet(number: int, payload: bytes) -> bytes:
    """An SSH binary packet before any key exchange: no cipher, no MAC (block size 8)."""
    body = bytes((number,)) + payload
    pad = 8 - (len(body) + 5) % 8
    if pad < 4:
        pad += 8
    return struct.pack(">IB", len(body) + pad + 1, pad) + body + b"\0" * pad


def userauth_request(user: bytes, method: bytes, data: bytes = b"") -> bytes:
    return NS(user) + NS(b"ssh-connection") + NS(method) + data


def channel_open(sender_id: int, host: bytes, port: int) -> bytes:
    target = NS(host) + struct.pack(">L", port) + NS(b"127.0.0.1") + struct.pack(">L", 0)
    return NS(b"direct-tcpip") + struct.pack(">3L", sender_id, 2 * MiB, 32 * KiB) + target


class Raw(RawSSHClient):  # type: ignore[misc,valid-type]
    """A bare Conch client (see sshharness): ready once ssh-userauth runs or,
    with ``login``, once logged in with that key; it records the master's
    DISCONNECT reason and when the connection was lost."""

    def __init__(self, login: keys.Key | None = None) -> None:
        super().__init__()
        self.login = login
        self.ready: defer.Deferred[Raw] = defer.Deferred()
        self.gone: defer.Deferred[None] = defer.Deferred()
        self.reason: str | None = None
        self.code: int | None = None
        self.lost_at: float | None = None
        self.logged_in = False
        self.channel_ids = 0

    def setService(self, service: Any) -> None:
        super().setService(service)
        if service is self.auth:
            if self.login is not None:
                self.auth.publickey_signed(self.login)
            elif not self.ready.called:
                self.ready.callback(self)
        elif service is self.conn:
            self.logged_in = True
            if not self.ready.called:
                self.ready.callback(self)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.code = reasonCode
        self.reason = description.decode("utf-8", "replace")

    def connectionLost(self, reason: Any) -> None:
        self.lost_at = now()
        super().connectionLost(reason)
        if not self.ready.called:
            self.ready.errback(ConnectionError(self.reason or "connection lost before it was ready"))
        self.gone.callback(None)

    def next_channel(self) -> int:
        self.channel_ids += 1
        return self.channel_ids


class PreKex(protocol.Protocol):
    """Speaks SSH without ever exchanging keys: version line, then plaintext packets."""

    def __init__(self) -> None:
        self.lost = False
        self.lost_at: float | None = None
        self.reason: str | None = None
        self.received = 0

    def connectionMade(self) -> None:
        self.transport.write(b"SSH-2.0-attacker_prekex\r\n")
        self.transport.write(plain_packet(transport.MSG_SERVICE_REQUEST, NS(b"ssh-userauth")))

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost, self.lost_at = True, now()


class Idle(protocol.Protocol):
    """Connects and then sends nothing (or only its version line)."""

    def __init__(self, version: bool) -> None:
        self.version = version
        self.lost = False

    def connectionMade(self) -> None:
        if self.version:
            self.transport.write(b"SSH-2.0-attacker_idle\r\n")

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class BananaChannel(protocol.Protocol):
    """The attacker's end of a PB channel: it writes raw Banana, never PB."""

    def __init__(self) -> None:
        self.lost = False
        self.lost_at: float | None = None

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost, self.lost_at = True, now()


def tcp_endpoint(args: dict[str, Any], bind: str | None = None) -> Any:
    bind_address = (bind, 0) if bind else None
    return endpoints.TCP4ClientEndpoint(
        reactor, "127.0.0.1", args["ssh_port"], timeout=10, bindAddress=bind_address
    )


async def connect_raw(
    args: dict[str, Any], login: keys.Key | None = None, timeout: float = 15.0, bind: str | None = None
) -> Raw:
    """A `Raw` connection (from ``bind``), ready (or ConnectionError / TimeoutError)."""
    proto = await tcp_endpoint(args, bind).connect(protocol.Factory.forProtocol(lambda: Raw(login)))
    ready = proto.ready
    ready.addTimeout(timeout, reactor)
    try:
        return await ready  # type: ignore[no-any-return]
    except defer.TimeoutError:
        proto.transport.abortConnection()
        raise TimeoutError("not ready in time") from None


async def connect_many(
    args: dict[str, Any], n: int, login: keys.Key | None = None
) -> tuple[list[Raw], list[str]]:
    """``n`` connections at once: those that got ready, and why the others did not."""

    async def one() -> Raw:
        return await connect_raw(args, login)

    results = await defer.DeferredList([defer.ensureDeferred(one()) for _ in range(n)], consumeErrors=True)
    ready = [r for ok, r in results if ok]
    errors = [r.getErrorMessage() for ok, r in results if not ok]
    return ready, errors


class Flood:
    """Sends on every connection while its own queue is short, for ``duration``
    seconds or ``cap`` bytes in all; stops early once every connection is lost
    (and none is still being made).  Its report's ``first_lost_after`` counts
    from the start of the flood (negative: the master dropped it before)."""

    def __init__(
        self,
        conns: list[Any],
        send: Callable[[Any], int],
        duration: float,
        cap: int,
        pending: Callable[[Any], int] = lambda c: queued(c.transport),
        drain: bool = False,
    ) -> None:
        self.conns = conns
        self.send = send
        self.duration = duration
        self.cap = cap
        self.pending = pending
        self.drain = drain  # DONE only once everything written has left this side
        self.expecting = 0  # connections still being made, that will join ``conns``
        self.written = 0
        self.packets = 0
        self.done: defer.Deferred[dict[str, Any]] = defer.Deferred()

    def start(self) -> defer.Deferred[dict[str, Any]]:
        self.t0 = now()
        self.loop = task.LoopingCall(self.tick)
        self.loop.start(0.002)
        return self.done

    def alive(self) -> list[Any]:
        return [c for c in self.conns if not c.lost]

    def tick(self) -> None:
        live = self.alive()
        elapsed = now() - self.t0
        full = self.written >= self.cap
        idle = not live and not self.expecting
        if idle or elapsed >= self.duration or (full and not (self.drain and self.unsent(live))):
            self.finish(live)
            return
        for c in live:
            sent_now = 0
            while not full and not c.lost and self.pending(c) < QUEUE and sent_now < 16:
                self.written += self.send(c)
                self.packets += 1
                sent_now += 1
                full = self.written >= self.cap

    def unsent(self, live: list[Any]) -> int:
        return sum(self.pending(c) for c in live)

    def finish(self, live: list[Any]) -> None:
        self.loop.stop()
        losses = [c.lost_at - self.t0 for c in self.conns if getattr(c, "lost_at", None) is not None]
        reasons = sorted({c.reason for c in self.conns if getattr(c, "reason", None)})
        self.done.callback(
            {
                "sent": self.written - self.unsent(live),
                "packets": self.packets,
                "seconds": now() - self.t0,
                "connections": len(self.conns),
                "lost": len(self.conns) - len(live),
                "first_lost_after": min(losses) if losses else None,
                "reasons": reasons[:5],
            }
        )


async def refused(control: Control, errors: list[str]) -> None:
    """The master turned the attacker away before its attack began: it has lost."""
    control.say("READY", {"refused_at_setup": errors[:5]})
    await control.go
    control.say(
        "DONE",
        {"sent": 0, "connections": 1, "lost": 1, "reasons": errors[:5], "refused_at_setup": True},
    )


def public_key(args: dict[str, Any]) -> keys.Key:
    return keys.Key.fromString(args["public_key"].encode("ascii"))


def identity(args: dict[str, Any]) -> keys.Key:
    return load_private_key(Path(args["identity"]))


def pins(args: dict[str, Any]) -> HostKeyPins:
    return HostKeyPins.from_config([args["host_key"]])


# --- the attacks --------------------------------------------------------------------------


async def pkquery(args: dict[str, Any], control: Control) -> None:
    """Attack 1: unsigned "would this key do?" queries, an authorized host's public
    key and a 1 MB algorithm name, never reading the answers (PK_OK echoes both).
    With ``connections`` > 1 they all connect at GO, each flooding once ready
    (with ``spread``, each from its own address)."""
    blob = public_key(args).blob()
    query = b"\x00" + NS(b"ssh-ed25519" + b"x" * (BIG - 11)) + NS(blob)
    n = args.get("connections", 1)
    conns: list[Raw] = []
    errors: list[str] = []
    if n == 1:
        conns, errors = await connect_many(args, 1)
        if not conns:
            return await refused(control, errors)
    control.say("READY", {"connections": len(conns)})
    await control.go
    for c in conns:
        c.transport.pauseProducing()  # the answers are never read
    flood = Flood(
        conns,
        lambda c: c.auth.request(b"publickey", query) or len(query),
        args["duration"],
        args["cap"],
    )
    if n > 1:
        flood.expecting = n

        def joined(c: Raw) -> None:
            c.transport.pauseProducing()
            flood.conns.append(c)

        def settled(_: Any) -> None:
            flood.expecting -= 1

        for i in range(n):
            # ``spread``: each from its own loopback address, as 100 hosts would be.
            bind = f"127.0.2.{i + 1}" if args.get("spread") else None
            d = defer.ensureDeferred(connect_raw(args, bind=bind))
            d.addCallbacks(joined, lambda f: errors.append(f.getErrorMessage()))
            d.addBoth(settled)
    report = await flood.start()
    report.update(
        refused_at_connect=len(errors),
        connect_errors=sorted(set(errors))[:5],
        wanted=n,
        still_connecting=flood.expecting,
    )
    control.say("DONE", report)


async def prekex(args: dict[str, Any], control: Control) -> None:
    """Attack 1, variant: the same queries in plaintext, with no key exchange at all."""
    blob = public_key(args).blob()
    query = plain_packet(
        50,
        userauth_request(
            b"buildbot-worker", b"publickey", b"\x00" + NS(b"ssh-ed25519" + b"x" * (BIG - 11)) + NS(blob)
        ),
    )
    try:
        proto = await tcp_endpoint(args).connect(protocol.Factory.forProtocol(PreKex))
    except Exception as e:
        return await refused(control, [str(e)])
    control.say("READY", {})
    await control.go
    proto.transport.pauseProducing()

    def send(c: PreKex) -> int:
        c.transport.write(query)
        return len(query)

    control.say("DONE", await Flood([proto], send, args["duration"], args["cap"]).start())


async def unknown_messages(args: dict[str, Any], control: Control) -> None:
    """Attack 2: after the userauth service request, unknown message numbers
    (70-79, 200) with 1 MB payloads."""
    numbers = [*range(70, 80), 200]
    payload = (bytes(range(256)) * (BIG // 256 + 1))[:BIG]
    conns, errors = await connect_many(args, 1)
    if not conns:
        return await refused(control, errors)
    control.say("READY", {})
    await control.go

    turn = itertools.count()

    def send(c: Raw) -> int:
        c.sendPacket(numbers[next(turn) % len(numbers)], payload)
        return len(payload)

    control.say("DONE", await Flood(conns, send, args["duration"], args["cap"]).start())


async def none_big_user(args: dict[str, Any], control: Control) -> None:
    """Attack 2: 'none' authentication requests with 900 KB user names."""
    user = b"u" * 900_000
    conns, errors = await connect_many(args, 1)
    if not conns:
        return await refused(control, errors)
    control.say("READY", {})
    await control.go

    def send(c: Raw) -> int:
        c.auth.request(b"none", b"", user=user)
        return len(user)

    control.say("DONE", await Flood(conns, send, args["duration"], args["cap"]).start())


async def braces(args: dict[str, Any], control: Control) -> None:
    """Attack 2: publickey requests whose key type has braces ("ssh-{x}", short:
    within any size limit) and whose key blob does not parse, on
    ``connections`` connections one after the other, each until the master
    drops it (max_auth_tries) or 8 requests."""
    alg = b"ssh-{x}"
    request = b"\x00" + NS(alg) + NS(NS(b"ssh-{x}") + NS(b"not a key"))
    control.say("READY", {})
    await control.go
    t0 = now()
    sent = connections = refused = dropped = requests = 0
    reasons: set[str] = set()
    while connections + refused < args.get("connections", 3) and now() - t0 < args["duration"]:
        try:
            c = await connect_raw(args)
        except Exception as e:
            refused += 1
            reasons.add(str(e))
            continue
        connections += 1
        for _ in range(8):  # more than max_auth_tries
            if c.lost:
                break
            c.auth.request(b"publickey", request)
            sent += len(request)
            requests += 1
            await sleep(0.01)
        await until(lambda c=c: c.lost, 1.0)
        dropped += c.lost
        if c.reason:
            reasons.add(c.reason)
        c.transport.loseConnection()
    control.say(
        "DONE",
        {
            "sent": sent,
            "requests": requests,
            "seconds": now() - t0,
            "connections": connections,
            "lost": dropped,
            "refused": refused,
            "reasons": sorted(reasons)[:5],
        },
    )


async def logged_in(args: dict[str, Any], control: Control) -> Raw | None:
    conns, errors = await connect_many(args, 1, login=identity(args))
    if not conns:
        await refused(control, errors)
        return None
    return conns[0]


async def bad_opens(args: dict[str, Any], control: Control) -> None:
    """Attack 3a: an authorized host opens channels to a 30 KB host name (each
    refused, the refusal quoting it) and never reads the refusals."""
    c = await logged_in(args, control)
    if c is None:
        return
    host = b"a" * 30_000
    control.say("READY", {})
    await control.go
    c.transport.pauseProducing()

    def send(c: Raw) -> int:
        packet = channel_open(c.next_channel(), host, args["pb_port"])
        c.sendPacket(connection.MSG_CHANNEL_OPEN, packet)
        return len(packet)

    control.say("DONE", await Flood([c], send, args["duration"], args["cap"]).start())


async def stuck_rekey(args: dict[str, Any], control: Control) -> None:
    """Attack 3b: an authorized host starts a key re-exchange and never finishes
    it, then sends channel opens and global requests whose answers must wait
    for the exchange to end."""
    c = await logged_in(args, control)
    if c is None:
        return
    host = b"a" * 30_000
    name = b"g" * 30_000
    control.say("READY", {})
    await control.go
    c.transport.pauseProducing()
    c.sendKexInit()
    # Our own side must not hold back what follows until the exchange ends.
    c._keyExchangeState = c._KEY_EXCHANGE_NONE
    c._blockedByKeyExchange = []

    turn = itertools.count()

    def send(c: Raw) -> int:
        if next(turn) % 2:
            packet = NS(name) + b"\x01"  # want a reply
            c.sendPacket(connection.MSG_GLOBAL_REQUEST, packet)
        else:
            packet = channel_open(c.next_channel(), host, args["pb_port"])
            c.sendPacket(connection.MSG_CHANNEL_OPEN, packet)
        return len(packet)

    control.say("DONE", await Flood([c], send, args["duration"], args["cap"]).start())


async def banana_channel(args: dict[str, Any]) -> BananaChannel:
    """Log in with the host's key and open a channel to the PB port; select the
    Banana dialect "pb" (what any PB client sends first)."""
    link = MasterLink(reactor, "127.0.0.1", args["ssh_port"], identity(args), pins(args))
    link.startService()
    opening = ChannelEndpoint(link, args["pb_port"], "attacker").connect(
        protocol.Factory.forProtocol(BananaChannel)
    )
    opening.addTimeout(15, reactor)
    try:
        proto = await opening
    except Exception as e:
        link.stopService()
        raise Refused(f"{type(e).__name__}: {e}") from None
    proto.transport.write(b128(2) + banana.STRING + b"pb")
    return proto  # type: ignore[no-any-return]


class Refused(Exception):
    """The master would not let the attacker set up."""


async def banana_list(args: dict[str, Any], control: Control) -> None:
    """Attack 3c: one Banana list that never closes, of 64 KB strings, before any
    PB login: the master keeps every string until the list ends."""
    try:
        proto = await banana_channel(args)
    except Refused as e:
        return await refused(control, [str(e)])
    item = b128(64 * KiB) + banana.STRING + b"s" * (64 * KiB)
    control.say("READY", {})
    await control.go
    proto.transport.write(b128(600_000) + banana.LIST)

    def send(c: BananaChannel) -> int:
        c.transport.write(item)
        return len(item)

    flood = Flood([proto], send, args["duration"], args["cap"], pending=lambda c: c.transport.pending)
    control.say("DONE", await flood.start())


async def banana_tokens(args: dict[str, Any], control: Control) -> None:
    """Attack 3d: 1-byte Banana tokens (INT with an empty prefix: the int 0), in
    lists that never close (an outer one of inner ones of 600000 tokens, under
    Banana's 640 K limit): tiny items, each one a turn of the master's Banana
    parser, which copies what is left of its buffer at every token."""
    try:
        proto = await banana_channel(args)
    except Refused as e:
        return await refused(control, [str(e)])
    inner = b128(600_000) + banana.LIST
    control.say("READY", {})
    await control.go
    proto.transport.write(b128(600_000) + banana.LIST)
    state = {"left": 0, "tokens": 0}

    def send(c: BananaChannel) -> int:
        out = b""
        if state["left"] == 0:
            out, state["left"] = inner, 600_000
        n = min(state["left"], 64 * KiB - len(out))
        state["left"] -= n
        state["tokens"] += n
        out += banana.INT * n
        c.transport.write(out)
        return len(out)

    flood = Flood(
        [proto], send, args["duration"], args["cap"], pending=lambda c: c.transport.pending, drain=True
    )
    report = await flood.start()
    report["tokens"] = state["tokens"]
    control.say("DONE", report)


async def pb_error(args: dict[str, Any], control: Control) -> None:
    """Attack 4: a real launcher (two real buildbot-worker sessions over one SSH
    connection) whose first session sends a Banana token the master must
    refuse (a STRING longer than Banana's 640 KiB limit)."""
    from buildbot_sshmux.worker import config as launcher_config
    from buildbot_sshmux.worker.launcher import Launcher

    launcher = Launcher(launcher_config.load(args["config"]), reactor)
    launcher.startService()
    (link,) = launcher.links.values()
    losses: list[float] = []
    lost = link.transport_lost

    def transport_lost(proto: Any, reason: Any) -> None:
        losses.append(now())
        lost(proto, reason)

    link.transport_lost = transport_lost  # type: ignore[method-assign]
    names = list(launcher.sessions)
    t0 = now()
    while launcher.attached_count() < len(names):
        if now() - t0 > 30:
            control.say("FAILED", {"error": f"sessions not attached: {launcher.attached_count()}"})
            return
        await sleep(0.05)
    control.say("READY", {"sessions": names})
    await control.go
    target = launcher.sessions[names[0]]
    token = b128(700 * KiB) + banana.STRING
    go = now()
    target.bf.perspective.broker.transport.write(token)
    await sleep(args["duration"])
    control.say(
        "DONE",
        {
            "sent": len(token),
            "target": names[0],
            "ssh_connection_lost": bool(losses),
            "lost_after": losses[0] - go if losses else None,
            "attached_now": {n: s.attached for n, s in launcher.sessions.items()},
        },
    )


async def duplicate_key(args: dict[str, Any], control: Control) -> None:
    """Attack 5: log in with the key of a host that is connected, again and again;
    record what the master answers each time (its DISCONNECT reason)."""
    key = identity(args)
    control.say("READY", {})
    await control.go
    t0 = now()
    attempts: list[dict[str, Any]] = []
    while now() - t0 < args["duration"]:
        start = now()
        attempt: dict[str, Any] = {"at": start - t0}
        try:
            c = await tcp_endpoint(args).connect(protocol.Factory.forProtocol(lambda: Raw(key)))
        except Exception as e:
            attempt.update(logged_in=False, reason=None, error=str(e), seconds=now() - start)
            attempts.append(attempt)
            await sleep(0.5)
            continue
        c.ready.addErrback(lambda _: None)  # a refusal: read below
        # Until the login ends, and a second more: a master may also
        # disconnect a newcomer after its login.
        await until(lambda c=c: c.lost or c.logged_in, 6.0)
        if c.logged_in:
            await until(lambda c=c: c.lost, 1.0)
        attempt.update(
            logged_in=c.logged_in,
            dropped_by_master=c.lost,
            reason=c.reason,
            code=c.code,
            seconds=now() - start,
        )
        c.transport.loseConnection()
        attempts.append(attempt)
        await sleep(0.5)
    control.say("DONE", {"attempts": attempts, "seconds": now() - t0})


async def idle_connections(args: dict[str, Any], control: Control) -> None:
    """Attack 6: ``connections`` TCP connections from one address that send
    nothing (half of them) or only their version line, held open."""
    n = args["connections"]
    control.say("READY", {})
    await control.go
    t0 = now()
    protos: list[Idle] = []

    async def one(i: int) -> None:
        protos.append(
            await tcp_endpoint(args).connect(protocol.Factory.forProtocol(lambda: Idle(i % 2 == 1)))
        )

    results = await defer.DeferredList([defer.ensureDeferred(one(i)) for i in range(n)], consumeErrors=True)
    failed = [r.getErrorMessage() for ok, r in results if not ok]
    opened_after = now() - t0
    await sleep(max(0.0, args["duration"] - (now() - t0)))
    control.say(
        "DONE",
        {
            "connections": n,
            "opened": len(protos),
            "connect_failed": len(failed),
            "connect_errors": sorted(set(failed))[:3],
            "closed_by_master": sum(p.lost for p in protos),
            "open_now": sum(not p.lost for p in protos),
            "opened_in_s": opened_after,
            "seconds": now() - t0,
        },
    )


# --- the legitimate host's probe ------------------------------------------------------------


class ProbeFailed(Exception):
    pass


async def probe_once(args: dict[str, Any], key: keys.Key, host_pins: HostKeyPins) -> None:
    """One new login, one channel to the PB port, one PB round trip."""
    link = MasterLink(
        reactor,
        "127.0.0.1",
        args["ssh_port"],
        key,
        host_pins,
        retry_delay=lambda attempt: 3600.0,
        endpoint=tcp_endpoint(args, args["bind"]),
    )
    failed: defer.Deferred[Any] = defer.Deferred()

    def dropped() -> None:  # MasterLink would redial: a failed probe instead
        if not failed.called:
            failed.errback(ProbeFailed("the connection was refused or dropped before the PB answer"))

    link._schedule_redial = dropped  # type: ignore[method-assign]
    link.startService()

    async def session() -> None:
        factory = pb.PBClientFactory()
        await ChannelEndpoint(link, args["pb_port"], "probe").connect(factory)
        root = await factory.getRootObject()
        await root.callRemote("login", b"probe")

    work = defer.ensureDeferred(session())
    work.addBoth(lambda r: None if failed.called else failed.callback(r))
    failed.addTimeout(args.get("timeout", 20.0), reactor)
    try:
        await failed
    finally:
        work.addErrback(lambda _: None)
        if not work.called:
            work.cancel()
        await link.stopService()


async def probe(args: dict[str, Any], control: Control) -> None:
    key, host_pins = identity(args), pins(args)
    interval = args.get("interval", 0.1)
    while True:
        start = now()
        control.say("START", {"t": start})
        result: dict[str, Any] = {"t": start}
        try:
            await probe_once(args, key, host_pins)
            result.update(ok=True)
        except Exception as e:
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
        result["latency"] = now() - start
        control.say("END", result)
        await sleep(max(0.0, start + interval - now()))


MODES: dict[str, Callable[[dict[str, Any], Control], Awaitable[None]]] = {
    "probe": probe,
    "pkquery": pkquery,
    "prekex": prekex,
    "unknown": unknown_messages,
    "nonebig": none_big_user,
    "braces": braces,
    "badopen": bad_opens,
    "rekey": stuck_rekey,
    "bananalist": banana_list,
    "bananatokens": banana_tokens,
    "pberror": pb_error,
    "dupkey": duplicate_key,
    "idle": idle_connections,
}


def run() -> None:
    mode, raw = sys.argv[1], sys.argv[2]
    args = json.loads(raw)
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)]
            )
        ],
        redirectStandardIO=False,
    )
    control = Control()
    stdio.StandardIO(control)

    def start() -> None:
        d = defer.ensureDeferred(MODES[mode](args, control))

        def failed(f: Any) -> None:
            sys.stderr.write(f.getTraceback())
            control.say("FAILED", {"error": f"{f.type.__name__}: {f.getErrorMessage()}"})

        d.addErrback(failed)

    reactor.callWhenRunning(start)
    reactor.run()


if __name__ == "__main__":
    run()
