"""Keepalives and rekeying on a live, in-memory SSH connection (`buildbot_sshmux.wire.liveness`).

Time is a `task.Clock`; a blackholed peer is a `Wire` direction held back, so
nothing sleeps and nothing opens a socket.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import transport as ssh_transport
from twisted.cred import credentials
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.spread import pb
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.server import HostAvatar
from buildbot_sshmux.wire.channel import ProtocolChannel
from buildbot_sshmux.wire.keys import fingerprint
from buildbot_sshmux.wire.liveness import KEEPALIVE_REQUEST, Liveness
from buildbot_sshmux.worker.link import ChannelEndpoint, MuxClientConnection, MuxClientTransport

from .sshharness import HOST_KEY, PB_PORT, WORKER_HOST_ADDRESS, LogCapture, SSHPair, tune

INTERVAL = 10.0
COUNT_MAX = 3
KEEPALIVE = Liveness(keepalive_interval=INTERVAL, keepalive_count_max=COUNT_MAX, rekey_interval=0)
NO_KEEPALIVE = Liveness(keepalive_interval=0, rekey_interval=0)
NONE = ssh_transport.SSHTransportBase._KEY_EXCHANGE_NONE


def record_global_requests(testcase: TestCase, clock: Any, answer: int | None = None) -> dict[str, list[Any]]:
    """Record (time, request type) of every global request each side receives;
    with ``answer`` set, the master answers every request with it (0: failure)."""
    seen: dict[str, list[Any]] = {"master": [], "worker": []}
    server_original = HostAvatar.gotGlobalRequest
    client_original = MuxClientConnection.gotGlobalRequest

    def on_master(self: HostAvatar, requestType: bytes, data: bytes) -> int:
        seen["master"].append((clock.seconds(), requestType))
        return server_original(self, requestType, data) if answer is None else answer

    def on_worker(self: MuxClientConnection, requestType: bytes, data: bytes) -> int:
        seen["worker"].append((clock.seconds(), requestType))
        return client_original(self, requestType, data)

    testcase.patch(HostAvatar, "gotGlobalRequest", on_master)
    testcase.patch(MuxClientConnection, "gotGlobalRequest", on_worker)
    return seen


def advance(pair: SSHPair, seconds: float, step: float = 1.0) -> None:
    """Let ``seconds`` pass in ``step``s, moving the bytes after each."""
    remaining = seconds
    while remaining > 1e-9:
        dt = min(step, remaining)
        pair.clock.advance(dt)
        remaining -= dt
        for wire in pair.endpoint.wires:
            wire.flush()


class KeepaliveTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def keepalive_lines(self) -> list[str]:
        return self.logs.matching("no answer to", "keepalives")

    def test_both_sides_send_a_keepalive_every_interval(self) -> None:
        pair = tune(SSHPair(self), liveness=KEEPALIVE, client_liveness=KEEPALIVE)
        seen = record_global_requests(self, pair.clock)
        pair.start()

        advance(pair, INTERVAL - 0.5, step=0.5)
        self.assertEqual(seen, {"master": [], "worker": []})

        advance(pair, INTERVAL * 5, step=0.5)
        expected = [(INTERVAL * k, KEEPALIVE_REQUEST) for k in range(1, 6)]
        self.assertEqual(seen["master"], expected)
        self.assertEqual(seen["worker"], expected)

    def test_answered_keepalives_keep_the_connection(self) -> None:
        pair = tune(SSHPair(self), liveness=KEEPALIVE, client_liveness=KEEPALIVE)
        seen = record_global_requests(self, pair.clock)
        pair.start()
        server = pair.server

        advance(pair, INTERVAL * COUNT_MAX * 10, step=INTERVAL / 2)

        self.assertGreaterEqual(len(seen["master"]), COUNT_MAX * 10)
        self.assertGreaterEqual(len(seen["worker"]), COUNT_MAX * 10)
        self.assertIs(pair.server, server)
        self.assertEqual(pair.link.dials, 1)
        self.assertIsNotNone(pair.link.connection)
        self.assertEqual(pair.factory.connections, {server})
        self.assertEqual(pair.server_connection.keepalive.unanswered, 0)
        self.assertEqual(pair.connection().keepalive.unanswered, 0)
        self.assertEqual(self.keepalive_lines(), [])

    def test_master_drops_a_blackholed_host_after_interval_times_count(self) -> None:
        pair = tune(SSHPair(self), liveness=KEEPALIVE, client_liveness=NO_KEEPALIVE)
        pair.start()
        server = pair.server
        server_io = pair.wire.server_io

        pair.wire.hold_to_server = True  # the worker host's packets vanish
        deadline = INTERVAL * (COUNT_MAX + 1)
        advance(pair, deadline - 0.5, step=0.5)
        self.assertFalse(server_io.disconnecting, "dropped before interval x (count_max + 1)")
        self.assertEqual(self.keepalive_lines(), [])

        advance(pair, 0.5)

        self.assertTrue(server_io.disconnecting, "the master kept a blackholed connection")
        self.assertNotIn(server, pair.factory.connections)
        [line] = self.keepalive_lines()
        self.assertIn("host debian-sid", line)
        self.assertIn(fingerprint(HOST_KEY), line)
        self.assertIn(f"{WORKER_HOST_ADDRESS.host}:{WORKER_HOST_ADDRESS.port}", line)
        self.assertIn(f"no answer to {COUNT_MAX} keepalives", line)

    def test_worker_drops_a_blackholed_master_and_redials(self) -> None:
        pair = tune(SSHPair(self), liveness=NO_KEEPALIVE, client_liveness=KEEPALIVE)
        pair.start()
        first_wire = pair.wire

        first_wire.hold_to_client = True  # the master's packets vanish
        deadline = INTERVAL * (COUNT_MAX + 1)
        advance(pair, deadline - 0.5, step=0.5)
        self.assertFalse(first_wire.client_io.disconnecting)
        self.assertIsNotNone(pair.link.connection)

        advance(pair, 0.5)

        self.assertTrue(first_wire.client_io.disconnecting, "the worker kept a blackholed connection")
        self.assertIsNone(pair.link.connection)
        [line] = self.keepalive_lines()
        self.assertIn("master.example.org:2222", line)
        self.assertIn(fingerprint(HOST_KEY), line)
        # The link redials (retry_delay is 5 s in the harness) and logs in again.
        self.assertEqual(pair.link.dials, 1)
        advance(pair, 5.0)
        self.assertEqual(pair.link.dials, 2)
        self.assertIsNot(pair.wire, first_wire)
        self.assertIsNotNone(pair.link.connection)
        self.assertEqual(pair.factory.connections, {pair.server})

    def test_a_failure_reply_counts_as_an_answer(self) -> None:
        # Stock Conch (and some servers) answer keepalive@openssh.com with
        # SSH_MSG_REQUEST_FAILURE: the peer is alive all the same.
        pair = tune(SSHPair(self), liveness=NO_KEEPALIVE, client_liveness=KEEPALIVE)
        seen = record_global_requests(self, pair.clock, answer=0)
        pair.start()
        sent: list[int] = []
        send = pair.server.sendPacket
        pair.server.sendPacket = lambda kind, payload: (sent.append(kind), send(kind, payload))[1]  # type: ignore[method-assign]

        advance(pair, INTERVAL * (COUNT_MAX + 1) * 3, step=INTERVAL / 2)

        self.assertGreaterEqual(len(seen["master"]), (COUNT_MAX + 1) * 3 - 1)
        self.assertEqual(sent.count(82), len(seen["master"]), "every keepalive got a REQUEST_FAILURE")
        self.assertNotIn(81, sent)
        self.assertEqual(pair.link.dials, 1)
        self.assertIsNotNone(pair.link.connection)
        self.assertEqual(self.keepalive_lines(), [])

    def test_master_answers_keepalive_with_success_and_does_not_log_it(self) -> None:
        pair = SSHPair(self)
        pair.start()
        before = len(self.logs.events)
        d = pair.connection().sendGlobalRequest(KEEPALIVE_REQUEST, b"", wantReply=1)
        pair.flush()
        self.successResultOf(d)  # REQUEST_SUCCESS, not an errback
        said = [e for e in self.logs.events[before:] if e.get("log_level") != LogLevel.debug]
        self.assertEqual(said, [])

    def test_worker_answers_keepalive_with_success_and_refuses_others(self) -> None:
        pair = SSHPair(self)
        pair.start()
        conn = pair.server_connection
        d = conn.sendGlobalRequest(KEEPALIVE_REQUEST, b"", wantReply=1)
        pair.flush()
        self.successResultOf(d)
        self.assertEqual(self.logs.matching("refused global request"), [])

        d = conn.sendGlobalRequest(b"tcpip-forward", b"", wantReply=1)
        pair.flush()
        self.failureResultOf(d)
        self.assertEqual(len(self.logs.matching("refused global request", "'tcpip-forward'")), 1)

    def test_a_draining_master_tells_its_hosts_and_those_that_log_in_later(self) -> None:
        pair = SSHPair(self)
        pair.start()
        self.assertFalse(pair.link.draining)
        pair.factory.announce_draining()
        pair.flush()
        self.assertTrue(pair.link.draining)
        self.assertEqual(len(self.logs.matching("is about to stop", pair.link.address)), 1)
        self.assertEqual(self.logs.matching("refused global request"), [])
        pair.server.transport.loseConnection()  # the host comes back while the master drains
        pair.flush()
        self.assertFalse(pair.link.draining)
        pair.clock.advance(60)
        pair.flush()
        self.assertIsNotNone(pair.link.connection, "the launcher did not redial")
        self.assertTrue(pair.link.draining)

    def test_keepalive_stops_with_the_connection(self) -> None:
        pair = tune(SSHPair(self), liveness=KEEPALIVE, client_liveness=KEEPALIVE)
        pair.start()
        keepalive = pair.server_connection.keepalive
        pair.factory.disconnect_all()
        pair.flush()
        self.assertIsNone(keepalive._call)
        self.assertFalse(
            [c for c in pair.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is keepalive]
        )


class EchoSession:
    """A worker session: a PB login through a direct-tcpip channel, echoing values."""

    def __init__(self, testcase: Any, pair: SSHPair) -> None:
        self.pair = pair
        testcase.services = (pair.server.service, pair.link.connection)
        factory = pb.PBClientFactory()
        connected = ChannelEndpoint(pair.link, PB_PORT, "libxml2-debian-sid").connect(factory)
        pair.flush()
        testcase.successResultOf(connected)
        d = factory.login(credentials.UsernamePassword(b"libxml2-debian-sid", b"pw"))
        pair.flush()
        self.perspective = testcase.successResultOf(d)

    def echo(self, value: Any) -> defer.Deferred[Any]:
        return self.perspective.callRemote("echo", value)


def payloads(count: int, size: int) -> list[str]:
    """Distinct strings, so reordering or corruption shows."""
    return [(f"{i:06d}:" * (size // 7 + 1))[:size] for i in range(count)]


def blocked_bytes(t: Any) -> int:
    return sum(len(payload) for _kind, payload in t._blockedByKeyExchange or [])


class RekeyTests(TestCase):
    cipher = b"aes128-gcm@openssh.com"

    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def kexinits(self, t: Any) -> list[float]:
        """Record when ``t`` receives a KEXINIT."""
        seen: list[float] = []
        original = t.ssh_KEXINIT

        def wrapped(packet: bytes) -> Any:
            seen.append(self.pair.clock.seconds())
            return original(packet)

        t.ssh_KEXINIT = wrapped
        return seen

    def assertConnected(self, pair: SSHPair, server: Any) -> None:
        """Still the first connection, with the same ssh-connection services on
        both ends (a re-key must not restart ssh-userauth or drop channels)."""
        self.assertEqual(pair.link.dials, 1, "the connection was lost")
        self.assertIs(pair.server, server)
        self.assertIs(server.service, self.services[0], "the master's ssh-connection was restarted")
        self.assertIs(pair.link.connection, self.services[1], "the worker's ssh-connection was restarted")
        for t in (pair.server, pair.client_transport()):
            self.assertEqual(t._keyExchangeState, NONE)
            self.assertEqual(t.currentEncryptions.outCipType, self.cipher)
            self.assertFalse(t.service.budget.rekeying)

    def echo_all(self, session: EchoSession, values: list[str]) -> None:
        results = [session.echo(v) for v in values]
        self.pair.flush()
        self.assertEqual([self.successResultOf(d) for d in results], values)

    def test_volume_starts_a_rekey_and_data_flows_intact(self) -> None:
        self.pair = pair = tune(
            SSHPair(self),
            liveness=NO_KEEPALIVE,
            client_liveness=Liveness(keepalive_interval=0, rekey_bytes=64 * 1024, rekey_interval=0),
        )
        pair.start()
        server = pair.server
        seen = self.kexinits(server)
        session = EchoSession(self, pair)
        self.assertEqual(pair.client_transport().rekeys, 0)

        values = payloads(24, 20_000)
        self.echo_all(session, values)

        client = pair.client_transport()
        self.assertGreaterEqual(client.rekeys, 4)
        self.assertEqual(len(seen), client.rekeys, "each rekey sent one KEXINIT")
        self.assertEqual(pair.server.rekeys, 0)
        [avatar] = pair.realm.avatars
        self.assertEqual(avatar.calls, values)
        self.assertConnected(pair, server)
        # And the session still works after the last exchange.
        self.echo_all(session, ["after"])

    def test_volume_rekey_started_by_the_master(self) -> None:
        self.pair = pair = tune(
            SSHPair(self),
            liveness=Liveness(keepalive_interval=0, rekey_bytes=64 * 1024, rekey_interval=0),
            client_liveness=NO_KEEPALIVE,
        )
        pair.start()
        server = pair.server
        session = EchoSession(self, pair)
        values = payloads(24, 20_000)
        self.echo_all(session, values)
        self.assertGreaterEqual(server.rekeys, 4)
        self.assertEqual(pair.client_transport().rekeys, 0)
        self.assertConnected(pair, server)

    def test_rekey_interval_fires_on_the_clock(self) -> None:
        timed = Liveness(keepalive_interval=0, rekey_interval=60.0)
        self.pair = pair = tune(SSHPair(self), liveness=NO_KEEPALIVE, client_liveness=timed)
        pair.start()
        server = pair.server
        seen = self.kexinits(server)
        client = pair.client_transport()
        session = EchoSession(self, pair)

        pair.clock.advance(59.5)
        pair.flush()
        self.assertEqual((client.rekeys, seen), (0, []))
        pair.clock.advance(0.5)
        self.assertEqual(client.rekeys, 1)
        pair.flush()
        self.assertEqual(seen, [60.0])
        self.assertConnected(pair, server)
        self.echo_all(session, ["one"])

        pair.clock.advance(60.0)
        pair.flush()
        self.assertEqual(client.rekeys, 2)
        self.assertEqual(seen, [60.0, 120.0])
        self.assertConnected(pair, server)
        self.echo_all(session, ["two"])

    def test_both_sides_rekeying_at_once(self) -> None:
        timed = Liveness(keepalive_interval=0, rekey_interval=60.0)
        self.pair = pair = tune(SSHPair(self), liveness=timed, client_liveness=timed)
        pair.start()
        server = pair.server
        session = EchoSession(self, pair)
        for n in range(1, 4):
            pair.clock.advance(60.0)
            pair.flush()
            self.assertConnected(pair, server)
            self.echo_all(session, [f"round {n}"])
        self.assertGreaterEqual(server.rekeys + pair.client_transport().rekeys, 3)

    def test_channels_are_held_during_a_kex_then_flow(self) -> None:
        self.pair = pair = tune(SSHPair(self), liveness=NO_KEEPALIVE, client_liveness=NO_KEEPALIVE)
        pair.start()
        server = pair.server
        session = EchoSession(self, pair)
        client = pair.client_transport()
        budgets = {"worker": client.service.budget, "master": server.service.budget}

        client.rekey()
        self.assertEqual(client.rekeys, 1)
        self.assertNotEqual(client._keyExchangeState, NONE)
        self.assertTrue(budgets["worker"].rekeying)
        self.assertTrue(budgets["worker"].blocked)

        # A session writes a lot meanwhile: it waits in its channel, not in
        # Conch's unbounded queue of packets blocked by the exchange.
        values = payloads(6, 100_000)
        results = [session.echo(v) for v in values]
        [channel] = [c for c in client.service.channels.values() if isinstance(c, ProtocolChannel)]
        self.assertGreater(channel.pending, 500_000)
        self.assertLess(blocked_bytes(client), 4096)

        # Move the bytes one step at a time: whenever a side is in a key
        # exchange its channels are held, and Conch's queue stays small.
        states = set()
        for _ in range(10_000):
            for name, t in (("worker", client), ("master", server)):
                in_kex = t._keyExchangeState != NONE
                states.add((name, in_kex))
                self.assertEqual(budgets[name].rekeying, in_kex, f"{name}: rekeying flag out of step")
                self.assertLess(
                    blocked_bytes(t), 4096, f"{name}: {blocked_bytes(t)} bytes blocked by the kex"
                )
            if not pair.wire.pump():
                break
        self.assertIn(("master", True), states, "the master never took part in the exchange")

        self.assertEqual([self.successResultOf(d) for d in results], values)
        self.assertEqual(channel.pending, 0)
        self.assertEqual(budgets["worker"].pending, 0)
        self.assertConnected(pair, server)

    def test_rekey_when_the_volume_is_reached_by_the_kexinit_itself(self) -> None:
        # The KEXINIT of an exchange started by the clock (or by the peer) may
        # be what crosses rekey_bytes: that must not start a second exchange.
        limit = 64 * 1024
        self.pair = pair = tune(
            SSHPair(self),
            liveness=NO_KEEPALIVE,
            client_liveness=Liveness(keepalive_interval=0, rekey_bytes=limit, rekey_interval=0),
        )
        pair.start()
        server = pair.server
        session = EchoSession(self, pair)
        client = pair.client_transport()
        seen = self.kexinits(server)

        client._bytes_since_kex = limit - 1
        client.rekey()
        pair.flush()

        self.assertEqual((client.rekeys, len(seen)), (1, 1))
        self.assertConnected(pair, server)
        self.echo_all(session, ["still here"])

    def test_peer_started_rekey_when_our_kexinit_reaches_the_volume(self) -> None:
        limit = 64 * 1024
        self.pair = pair = tune(
            SSHPair(self),
            liveness=Liveness(keepalive_interval=0, rekey_bytes=limit, rekey_interval=0),
            client_liveness=NO_KEEPALIVE,
        )
        pair.start()
        server = pair.server
        session = EchoSession(self, pair)
        client = pair.client_transport()
        seen = self.kexinits(client)

        server._bytes_since_kex = limit - 1
        client.rekey()
        pair.flush()

        self.assertEqual(len(seen), 1, "the master sent more than one KEXINIT")
        self.assertConnected(pair, server)
        self.echo_all(session, ["still here"])

    def test_rekey_is_a_no_op_before_encryption_and_during_a_kex(self) -> None:
        self.pair = pair = SSHPair(self)
        pair.link.startService()  # nothing pumped: no keys yet
        client = pair.client_transport()
        client.rekey()
        self.assertEqual(client.rekeys, 0)
        pair.flush()
        self.services = (pair.server.service, pair.link.connection)
        client.rekey()
        client.rekey()
        self.assertEqual(client.rekeys, 1)
        pair.flush()
        self.assertConnected(pair, pair.server)

    def test_queued_packets_reaching_the_volume_keep_channels_held(self) -> None:
        # Packets queued during an exchange are sent when it ends; if they are
        # what reaches rekey_bytes, the next exchange starts at once and the
        # channels must stay held for it.
        limit = 64 * 1024
        self.pair = pair = tune(
            SSHPair(self),
            liveness=NO_KEEPALIVE,
            client_liveness=Liveness(keepalive_interval=0, rekey_bytes=limit, rekey_interval=0),
        )
        pair.start()
        server = pair.server
        session = EchoSession(self, pair)
        client = pair.client_transport()
        after: list[tuple[bool, bool]] = []
        new_keys = client._newKeys

        def near_the_limit_then_new_keys() -> None:
            client._bytes_since_kex = limit - 1
            new_keys()
            after.append((client._keyExchangeState != NONE, client.service.budget.rekeying))

        client._newKeys = near_the_limit_then_new_keys
        client.rekey()
        pair.connection().sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)  # queued
        self.assertTrue(client._blockedByKeyExchange)
        pair.flush()

        self.assertTrue(after)
        for in_kex, held in after:
            self.assertEqual(held, in_kex, "channels released while an exchange runs")
        self.assertConnected(pair, server)
        self.echo_all(session, ["still here"])


class RekeyWithAESCTRTests(RekeyTests):
    """The same exchanges over AES-CTR and HMAC (Conch's own packet framing);
    `RekeyTests` run over AES-GCM, which both ends prefer."""

    cipher = b"aes128-ctr"

    def setUp(self) -> None:
        super().setUp()
        self.patch(MuxClientTransport, "supportedCiphers", [b"aes128-ctr"])


class RekeyWithChaCha20Tests(RekeyTests):
    """The same exchanges over chacha20-poly1305, whose nonce is the sequence
    number that strict key exchange resets at every NEWKEYS."""

    cipher = b"chacha20-poly1305@openssh.com"

    def setUp(self) -> None:
        super().setUp()
        self.patch(MuxClientTransport, "supportedCiphers", [self.cipher])


class CountMaxZeroTests(TestCase):
    """keepalive_count_max=0 keeps sending but never drops, as OpenSSH's CountMax 0."""

    def test_unanswered_keepalives_never_drop_the_connection(self) -> None:
        from twisted.internet.defer import Deferred
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from buildbot_sshmux.wire.liveness import Keepalive, Liveness

        class Silent:
            def __init__(self) -> None:
                self.transport = type("T", (), {"transport": StringTransport()})()
                self.sent = 0

            def sendGlobalRequest(self, request: bytes, data: bytes, wantReply: int = 0) -> Deferred[None]:
                self.sent += 1
                return Deferred()  # never answered

        clock, conn = Clock(), Silent()
        keepalive = Keepalive(
            conn, clock, Liveness(keepalive_interval=5, keepalive_count_max=0), lambda: "peer"
        )
        keepalive.start()
        clock.pump([5] * 20)
        self.assertEqual(conn.sent, 20)
        self.assertFalse(conn.transport.transport.disconnecting)
        keepalive.stop()
