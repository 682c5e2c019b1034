"""sshd-like limits of the master (`buildbot_sshmux.master.limits`, `server`, `service.settings`).

MaxStartups early drop, login grace time, max auth tries, max channels per
connection, max connections per host key, and the validation of
`SSHMuxService`'s limit arguments.  In memory, on a `task.Clock`.
"""

from __future__ import annotations

import random
from typing import Any

from buildbot.config.errors import capture_config_errors
from twisted.conch.error import ConchError
from twisted.conch.ssh import forwarding, userauth
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import OPEN_RESOURCE_SHORTAGE
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.limits import ServerLimits, StartupGate
from buildbot_sshmux.master.pbinput import PBInputLimits
from buildbot_sshmux.master.service import SSHMuxService, settings
from buildbot_sshmux.wire.channel import FlowLimits
from buildbot_sshmux.wire.keys import fingerprint, generate_ed25519
from buildbot_sshmux.wire.liveness import Liveness

from .sshharness import (
    HOST_KEY,
    OTHER_KEY,
    PB_PORT,
    WORKER_HOST_ADDRESS,
    ExtraLink,
    LogCapture,
    ProbeChannel,
    SSHPair,
    flush_all,
    raw_connect,
    tune,
)

PEER = f"{WORKER_HOST_ADDRESS.host}:{WORKER_HOST_ADDRESS.port}"
QUIET = Liveness(keepalive_interval=0, rekey_interval=0)
OTHER_PEER = IPv4Address("TCP", "203.0.113.5", 50000)
THIRD_PEER = IPv4Address("TCP", "203.0.113.6", 50001)
FEDORA = HostEntry(name="fedora-40", key=OTHER_KEY.public(), workers=("*-fedora",))


class StartupGateTests(TestCase):
    def test_below_start_always_admits(self) -> None:
        gate = StartupGate(10, 30, 100, rng=random.Random(1))
        for pending in range(10):
            self.assertTrue(all(gate.admit(pending) for _ in range(500)), pending)

    def test_at_and_after_full_never_admits(self) -> None:
        gate = StartupGate(10, 30, 100, rng=random.Random(2))
        for pending in (100, 101, 1000):
            self.assertFalse(any(gate.admit(pending) for _ in range(500)), pending)

    def test_drop_rises_linearly_from_rate_to_100_percent(self) -> None:
        start, rate, full = 10, 30, 100
        gate = StartupGate(start, rate, full, rng=random.Random(3))
        draws = 4000
        for pending in (10, 25, 55, 80, 99):
            expected = rate + (100 - rate) * (pending - start) / (full - start)
            dropped = sum(not gate.admit(pending) for _ in range(draws)) / draws * 100
            self.assertLess(abs(dropped - expected), 4.0, f"pending={pending}: {dropped}% dropped")

    def test_rate_zero_start_equals_full(self) -> None:
        gate = StartupGate(5, 0, 5, rng=random.Random(4))
        self.assertTrue(gate.admit(4))
        self.assertFalse(gate.admit(5))
        gate = StartupGate(5, 0, 50, rng=random.Random(4))
        self.assertTrue(all(gate.admit(5) for _ in range(200)), "rate 0: no drop at start")

    def test_seeded_gates_agree(self) -> None:
        a = StartupGate(1, 50, 10, rng=random.Random(9))
        b = StartupGate(1, 50, 10, rng=random.Random(9))
        self.assertEqual([a.admit(5) for _ in range(100)], [b.admit(5) for _ in range(100)])

    def test_invalid_tuples_raise(self) -> None:
        for bad in [(0, 30, 100), (-1, 30, 100), (10, 30, 9), (10, -1, 100), (10, 101, 100)]:
            with self.assertRaises(ValueError, msg=str(bad)) as caught:
                StartupGate(*bad)
            self.assertIn("max_startups", str(caught.exception))


def pair_with(testcase: TestCase, limits: ServerLimits, **kwargs: Any) -> SSHPair:
    return tune(
        SSHPair(testcase, **kwargs), limits=limits, liveness=QUIET, client_liveness=QUIET, mux_auth=True
    )


class MaxStartupsTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        # start=2, rate=100: with two connections not logged in, the next is dropped.
        self.pair = pair_with(self, ServerLimits(max_startups=(2, 100, 3)))

    def test_unauthenticated_connections_beyond_start_are_dropped(self) -> None:
        pair = self.pair
        pair.start()  # logged in: does not count
        first = raw_connect(pair.factory, pair.clock)
        second = raw_connect(pair.factory, pair.clock)
        self.assertEqual(pair.factory.connections, {pair.server, first[1], second[1]})
        self.assertEqual(self.logs.matching("dropped connection"), [])

        _client, third, wire = raw_connect(pair.factory, pair.clock)

        self.assertTrue(wire.server_io.disconnecting)
        self.assertNotIn(third, pair.factory.connections)
        [line] = self.logs.matching("dropped connection")
        self.assertIn(PEER, line)
        self.assertIn("max_startups=2:100:3", line)
        wire.flush()  # the drop ends cleanly
        self.assertNotIn(third, pair.factory.connections)

    def test_a_slot_frees_when_a_pending_connection_logs_in(self) -> None:
        pair = self.pair
        first = raw_connect(pair.factory, pair.clock)
        raw_connect(pair.factory, pair.clock)
        first[2].flush()
        first[0].auth.publickey_signed(HOST_KEY)
        first[2].flush()
        self.assertTrue(first[1].authenticated)

        _client, server, wire = raw_connect(pair.factory, pair.clock)
        self.assertFalse(wire.server_io.disconnecting)
        self.assertIn(server, pair.factory.connections)


class LoginGraceTimeTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.pair = pair_with(self, ServerLimits(login_grace_time=10))

    def lines(self) -> list[str]:
        return self.logs.matching("did not log in within", "login_grace_time")

    def test_a_connection_that_never_logs_in_is_dropped(self) -> None:
        client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        self.assertTrue(client.auth.started, "the key exchange ran, ssh-userauth started")
        self.pair.clock.advance(9.5)
        wire.flush()
        self.assertFalse(wire.server_io.disconnecting)

        self.pair.clock.advance(0.5)
        wire.flush()

        self.assertTrue(client.lost)
        self.assertNotIn(server, self.pair.factory.connections)
        [line] = self.lines()
        self.assertIn(PEER, line)
        self.assertIn("10s", line)

    def test_a_silent_tcp_connection_is_dropped(self) -> None:
        _client, server, wire = raw_connect(self.pair.factory, self.pair.clock, client=protocol.Protocol())
        self.pair.clock.advance(10)
        wire.flush()
        self.assertTrue(wire.server_io.disconnected)
        self.assertNotIn(server, self.pair.factory.connections)
        self.assertEqual(len(self.lines()), 1)

    def test_an_authenticated_connection_stays(self) -> None:
        pair = self.pair
        pair.start()
        server = pair.server
        pair.clock.advance(100)
        pair.flush()
        self.assertFalse(pair.wire.server_io.disconnecting)
        self.assertEqual(pair.factory.connections, {server})
        self.assertEqual(pair.link.dials, 1)
        self.assertIsNotNone(pair.link.connection)
        self.assertEqual(self.lines(), [])

    def test_grace_timer_is_cancelled_when_the_connection_ends(self) -> None:
        _client, server, wire = raw_connect(self.pair.factory, self.pair.clock)
        wire.flush()
        call = server._grace_call
        self.assertTrue(call.active())
        wire.client_io.loseConnection()
        wire.flush()
        self.assertFalse(call.active())


class MaxAuthTriesTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.pair = pair_with(self, ServerLimits(max_auth_tries=3))
        self.client, self.server, self.wire = raw_connect(self.pair.factory, self.pair.clock)
        self.wire.flush()
        self.assertTrue(self.client.auth.started)

    def lines(self) -> list[str]:
        return self.logs.matching("failed authentication attempts", "max_auth_tries")

    def try_keys(self, *keys_: Any, signed: bool = False) -> None:
        for key in keys_:
            if signed:
                self.client.auth.publickey_signed(*key)
            else:
                self.client.auth.publickey_query(key)
            self.wire.flush()

    def assertCutAfter(self, tries: int) -> None:
        failures = self.client.auth.replies(userauth.MSG_USERAUTH_FAILURE)
        self.assertEqual(len(failures), tries - 1, "a FAILURE for each try before the last")
        self.assertTrue(self.client.lost)
        self.assertNotIn(self.server, self.pair.factory.connections)
        [line] = self.lines()
        self.assertIn(PEER, line)
        self.assertIn(f"{tries} failed", line)

    def test_an_unknown_key_retried_is_cut_off_after_max_auth_tries(self) -> None:
        self.try_keys(OTHER_KEY, OTHER_KEY)
        self.assertFalse(self.client.lost)
        self.assertEqual(self.lines(), [])
        self.try_keys(OTHER_KEY)
        self.assertCutAfter(3)

    def test_several_unauthorized_keys_are_cut_off(self) -> None:
        self.try_keys(generate_ed25519(), generate_ed25519(), generate_ed25519())
        self.assertCutAfter(3)

    def test_bad_signatures_count(self) -> None:
        self.try_keys((HOST_KEY, OTHER_KEY), (HOST_KEY, OTHER_KEY), (HOST_KEY, OTHER_KEY), signed=True)
        self.assertCutAfter(3)

    def test_queries_count_too(self) -> None:
        # Today's OpenSSH counts every request but the first 'none': unsigned
        # queries ("would this key do?") cost a peer nothing otherwise.
        self.try_keys(HOST_KEY, HOST_KEY, HOST_KEY)
        self.assertEqual(len(self.client.auth.replies(userauth.MSG_USERAUTH_PK_OK)), 3)
        self.assertFalse(self.client.lost)
        self.try_keys((HOST_KEY, None), signed=True)
        self.assertTrue(self.client.lost)
        self.assertFalse(self.server.authenticated)
        [line] = self.lines()
        self.assertIn("3 failed", line)

    def test_a_query_then_a_signed_request_logs_in(self) -> None:
        self.try_keys(HOST_KEY)
        self.try_keys((HOST_KEY, None), signed=True)
        self.assertTrue(self.server.authenticated)
        self.assertEqual(self.lines(), [])

    def test_only_the_first_none_is_free(self) -> None:
        for _ in range(3):
            self.client.auth.request(b"none")
            self.wire.flush()
        self.assertFalse(self.client.lost)
        self.client.auth.request(b"none")
        self.wire.flush()
        self.assertTrue(self.client.lost)
        self.assertEqual(len(self.lines()), 1)

    def test_failures_advertise_publickey_only(self) -> None:
        self.try_keys(OTHER_KEY)
        [failure] = self.client.auth.replies(userauth.MSG_USERAUTH_FAILURE)
        self.assertEqual(failure, NS(b"publickey") + b"\x00")


class MaxChannelsTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.pair = pair_with(self, ServerLimits(max_channels=2))
        self.pair.start()
        self.conn = self.pair.connection()

    def open(self) -> ProbeChannel:
        channel = ProbeChannel(conn=self.conn)
        self.conn.openChannel(
            channel, forwarding.packOpen_direct_tcpip(("localhost", PB_PORT), ("127.0.0.1", 1))
        )
        self.pair.flush()
        self.flushLoggedErrors(ConchError)
        return channel

    def test_channels_beyond_max_channels_are_refused(self) -> None:
        first, second = self.open(), self.open()
        self.assertTrue(first.opened and second.opened)
        self.assertEqual(self.logs.matching("max_channels"), [])

        third = self.open()

        self.assertFalse(third.opened)
        self.assertEqual([r.data for r in third.refusals], [OPEN_RESOURCE_SHORTAGE])
        [line] = self.logs.matching("refused", "max_channels=2 per connection")
        self.assertIn("host debian-sid", line)
        self.assertIn(fingerprint(HOST_KEY), line)
        self.assertIn(PEER, line)

        # A closed channel frees its place.
        self.conn.sendClose(first)
        self.pair.flush()
        self.assertTrue(self.open().opened)


class MaxConnectionsPerHostTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def make(self, limit: int) -> SSHPair:
        entry = HostEntry(name="debian-sid", key=HOST_KEY.public(), workers=("*-debian-sid",))
        return pair_with(self, ServerLimits(max_connections_per_host=limit), entries=[entry, FEDORA])

    def test_a_live_connection_stays_and_the_newcomer_is_refused(self) -> None:
        pair = self.make(1)
        pair.start()
        fedora = ExtraLink(self, pair, OTHER_KEY, peer=THIRD_PEER)
        fedora.start()
        live = pair.server
        pair.clock.advance(42)

        again = ExtraLink(self, pair, HOST_KEY, peer=OTHER_PEER)
        again.link.startService()
        flush_all(pair.wire, again.wire, fedora.wire)

        self.assertIsNotNone(pair.link.connection, "the live connection was closed")
        self.assertIsNone(again.link.connection)
        self.assertIn(live, pair.factory.connections)
        self.assertEqual(pair.factory.connections, {live, fedora.server})
        self.assertIsNotNone(fedora.link.connection)
        # The newcomer hears why, with the live connection's address and age.
        [refusal] = self.logs.matching("refused this connection", "too many connections")
        self.assertIn(f"connected from {PEER} for 42s", refusal)
        # The master says it once, naming the host and both addresses.
        [line] = self.logs.matching("refused a second connection", "max_connections_per_host=1")
        self.assertIn("host debian-sid", line)
        self.assertIn(fingerprint(HOST_KEY), line)
        self.assertIn(f"{OTHER_PEER.host}:{OTHER_PEER.port}", line)
        self.assertIn(PEER, line)
        # It backs off and tries again later; the live connection stays.
        self.assertTrue(again.link._retry_call.active())
        pair.clock.advance(5)
        flush_all(pair.wire, again.wire, fedora.wire)
        self.assertIsNotNone(pair.link.connection)
        self.assertEqual(len(self.logs.matching("refused a second connection")), 2)
        # Counted for the status and the metrics, as the host's.
        stats = pair.factory.stats
        self.assertEqual((stats.totals["duplicate_connection"], stats.totals["replaced"]), (2, 0))
        self.assertEqual(stats.recent_refusals("debian-sid"), {"duplicate_connection": 2})

    def test_a_connection_that_does_not_answer_is_replaced(self) -> None:
        pair = self.make(1)
        pair.start()
        old_server = pair.server
        pair.wire.hold_to_client = pair.wire.hold_to_server = True  # half open: nothing crosses

        again = ExtraLink(self, pair, HOST_KEY, peer=OTHER_PEER)
        again.link.startService()
        flush_all(again.wire)
        self.assertIsNone(again.link.connection, "logged in before the old connection was probed")
        pair.clock.advance(ServerLimits().duplicate_probe_timeout)
        flush_all(again.wire)

        self.assertIsNotNone(again.link.connection)
        self.assertTrue(old_server.replaced)
        self.assertTrue(old_server.transport.disconnecting)
        self.assertEqual(pair.factory.stats.totals["replaced"], 1)
        self.assertEqual(pair.factory.stats.totals["duplicate_connection"], 0)
        [line] = self.logs.matching(
            "connected again", "did not answer a keepalive", "max_connections_per_host=1"
        )
        self.assertIn("host debian-sid", line)
        self.assertIn(f"{OTHER_PEER.host}:{OTHER_PEER.port}", line)
        self.assertIn(PEER, line)

    def test_up_to_the_limit_all_stay(self) -> None:
        pair = self.make(2)
        pair.start()
        again = ExtraLink(self, pair, HOST_KEY, peer=OTHER_PEER)
        again.start()
        flush_all(pair.wire, again.wire)
        self.assertIsNotNone(pair.link.connection)
        self.assertIsNotNone(again.link.connection)
        self.assertEqual(self.logs.matching("connected again"), [])
        self.assertEqual(self.logs.matching("refused a second connection"), [])

    def test_beyond_the_limit_only_the_silent_oldest_is_replaced(self) -> None:
        pair = self.make(2)
        pair.start()
        second = ExtraLink(self, pair, HOST_KEY, peer=OTHER_PEER)
        second.start()
        third = ExtraLink(self, pair, HOST_KEY, peer=THIRD_PEER)
        third.link.startService()
        flush_all(pair.wire, second.wire, third.wire)
        self.assertIsNone(third.link.connection, "both live connections answered: the third is refused")
        self.assertEqual(len(pair.factory.connections), 2)

        pair.wire.hold_to_client = pair.wire.hold_to_server = True  # the oldest goes silent
        fourth = ExtraLink(self, pair, HOST_KEY, peer=IPv4Address("TCP", "203.0.113.9", 40000))
        fourth.link.startService()
        flush_all(second.wire, fourth.wire)
        pair.clock.advance(ServerLimits().duplicate_probe_timeout)
        flush_all(second.wire, fourth.wire)
        self.assertIsNotNone(fourth.link.connection)
        self.assertIsNotNone(second.link.connection, "a live connection was closed")
        self.assertTrue(pair.server.replaced)


class SettingsTests(TestCase):
    """`service.settings`: SSHMuxService's limit arguments, checked and grouped."""

    def assertBad(self, message: str, **options: Any) -> None:
        with self.assertRaises(ValueError, msg=str(options)) as caught:
            settings(**options)
        self.assertIn(message, str(caught.exception))

    def test_defaults(self) -> None:
        self.assertEqual(settings(), (FlowLimits(), ServerLimits(), Liveness(), PBInputLimits()))

    def test_each_argument_lands_in_its_group(self) -> None:
        flow, limits, liveness, pb_input = settings(
            pb_max_message=1000,
            pb_login_bytes=500,
            max_startups_per_source=4,
            duplicate_probe_timeout=1.5,
            window_size=2 * 1024 * 1024,
            max_packet=64 * 1024,
            high_water=100_000,
            login_grace_time=5,
            max_startups="3:50:9",
            max_auth_tries=2,
            max_channels=10,
            max_connections_per_host=2,
            keepalive_interval=15,
            keepalive_count_max=4,
            rekey_bytes=1000,
            rekey_interval=60.5,
        )
        self.assertEqual(
            flow, FlowLimits(window_size=2 * 1024 * 1024, max_packet=64 * 1024, high_water=100_000)
        )
        self.assertEqual(
            limits,
            ServerLimits(
                login_grace_time=5,
                max_startups=(3, 50, 9),
                max_auth_tries=2,
                max_channels=10,
                max_connections_per_host=2,
                max_startups_per_source=4,
                duplicate_probe_timeout=1.5,
            ),
        )
        self.assertEqual(pb_input, PBInputLimits(max_message=1000, login_bytes=500))
        self.assertEqual(
            liveness,
            Liveness(keepalive_interval=15, keepalive_count_max=4, rekey_bytes=1000, rekey_interval=60.5),
        )

    def test_max_startups_as_a_tuple(self) -> None:
        self.assertEqual(settings(max_startups=(1, 0, 1))[1].max_startups, (1, 0, 1))

    def test_zero_disables_what_can_be_disabled(self) -> None:
        _flow, _limits, liveness, _pb = settings(keepalive_interval=0, rekey_bytes=0, rekey_interval=0)
        self.assertEqual(
            (liveness.keepalive_interval, liveness.rekey_bytes, liveness.rekey_interval), (0, 0, 0)
        )

    def test_unknown_argument(self) -> None:
        self.assertBad("unknown argument 'bogus_limit'", bogus_limit=1)
        self.assertBad("unknown argument 'maxStartups'", maxStartups="10:30:100")
        self.assertBad("unknown argument 'max_message'", max_message=1)  # it is pb_max_message
        self.assertBad("unknown argument 'pb_window_size'", pb_window_size=1)

    def test_negative_numbers(self) -> None:
        for name in ("login_grace_time", "keepalive_interval", "rekey_bytes", "window_size", "max_channels"):
            self.assertBad(f"{name} must be a number >= 0, not -1", **{name: -1})

    def test_not_a_number(self) -> None:
        self.assertBad("login_grace_time must be a number >= 0, not '30'", login_grace_time="30")
        self.assertBad("keepalive_interval must be a number >= 0, not None", keepalive_interval=None)

    def test_bad_max_startups_strings(self) -> None:
        for bad in ["10:30", "10:30:100:1", "", "a:b:c", "10:-30:100", "10 30 100", "10:30:1e2", "10:30:"]:
            self.assertBad("max_startups must be 'start:rate:full'", max_startups=bad)
        for bad in ["0:30:100", "50:30:10", "10:130:100"]:
            self.assertBad("max_startups must be (start, rate, full)", max_startups=bad)

    def test_max_packet_beyond_window_size(self) -> None:
        self.assertBad("max_packet must not exceed window_size", window_size=1000, max_packet=2000)
        self.assertEqual(settings(window_size=2000, max_packet=2000)[0].max_packet, 2000)


class ServiceLimitArgumentTests(TestCase):
    """A bad limit given to SSHMuxService is one config error saying what is wrong."""

    def limit_errors(self, **limits: Any) -> list[str]:
        with capture_config_errors() as errors:
            SSHMuxService(host_keys=["k"], hosts=["# none"], **limits)
        return [e for e in errors.errors if any(name in e for name in limits)]

    def test_unknown_limit_is_a_config_error(self) -> None:
        [error] = self.limit_errors(bogus_limit=1)
        self.assertEqual(error, "SSHMuxService: unknown argument 'bogus_limit'")

    def test_bad_max_startups_is_a_config_error(self) -> None:
        [error] = self.limit_errors(max_startups="10:30")
        self.assertIn("max_startups must be 'start:rate:full'", error)

    def test_max_startups_of_the_wrong_type_is_a_clear_config_error(self) -> None:
        [error] = self.limit_errors(max_startups=10)
        self.assertIn("max_startups must be 'start:rate:full'", error)

    def test_good_limits_add_no_error(self) -> None:
        self.assertEqual(self.limit_errors(max_startups="5:10:20", keepalive_interval=10), [])
