"""What a worker session may make the master's broker parse: `PBChannel`, `BananaInput`.

Over the in-memory SSH pair, a session writes raw Banana on its channel past
its own broker; the master's broker records every ``dataReceived`` call, so
the tests assert on the work the master did, not on time.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.cred import credentials, portal
from twisted.cred.error import UnauthorizedLogin
from twisted.spread import banana, pb
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from buildbot_sshmux.master.pbinput import SLICE, BananaInput, PBInputLimits
from buildbot_sshmux.wire.channel import InputRefused

from .sshharness import Echo
from .test_channel_faults import WHERE, FaultsTestCase, PBSession, b128

LIMITS = PBInputLimits()  # what lookupChannel gives every channel
OPEN_LIST = b128(banana.SIZE_LIMIT) + banana.LIST  # a list that the test never closes


def string(data: bytes) -> bytes:
    return b128(len(data)) + banana.STRING + data


class PBInputTestCase(FaultsTestCase):
    def setUp(self) -> None:
        super().setUp()
        # Another session of the host, logged in: it must never notice.
        self.bystander = PBSession(self, self.pair, "glib-debian-sid")
        self.bystander.login()

    def assertUnaffected(self) -> None:
        """The host's other session and its SSH connection go on."""
        self.assertEqual(self.bystander.echo("unaffected"), "unaffected")
        self.assertIs(self.pair.link.connection, self.conn)

    def refusal(self, session: PBSession, *fragments: str) -> str:
        """The one line that says ``session``'s channel was closed."""
        self.assertTrue(session.closed)
        [line] = self.logs.matching("channel closed")
        channel = f"channel {session.server_channel.id}"
        for fragment in ("host debian-sid", self.pair.entry.fingerprint, WHERE, channel, *fragments):
            self.assertIn(fragment, line)
        self.assertUnaffected()
        return line


class BeforeLoginTests(PBInputTestCase):
    def test_a_flood_closes_the_channel_at_login_bytes(self) -> None:
        session = PBSession(self, self.pair)
        sent = session.send_raw(OPEN_LIST + string(b"s" * 4000) * 1000, chunk=1000)
        self.refusal(session, f"bytes before logging in (login_bytes={LIMITS.login_bytes})")
        self.assertLessEqual(sum(session.delivered), LIMITS.login_bytes, "the master took more")
        self.assertLessEqual(sent, LIMITS.login_bytes + 1000, "the channel closed late")

    def test_a_flood_after_a_refused_password_closes_it_too(self) -> None:
        session = PBSession(self, self.pair)
        d = session.factory.login(credentials.UsernamePassword(session.name.encode(), b"wrong"))
        self.pair.flush()
        self.failureResultOf(d, UnauthorizedLogin)
        self.flushLoggedErrors(UnauthorizedLogin)  # PB logs the refusal it answers
        session.send_raw(OPEN_LIST + string(b"s" * 4000) * 1000, chunk=1000)
        self.refusal(session, "bytes before logging in")
        self.assertLessEqual(sum(session.delivered), LIMITS.login_bytes)

    def test_1_MiB_of_1_byte_tokens_is_cut_at_login_items(self) -> None:
        session = PBSession(self, self.pair)
        before = len(session.delivered)
        sent = session.send_raw(OPEN_LIST + banana.LIST * (1 << 20))
        self.refusal(session, f"more than {LIMITS.login_items} items (login_items)")
        self.assertLessEqual(sum(session.delivered[before:]), SLICE, "parsed more than one slice")
        self.assertLessEqual(sent, 32 * 1024)


class AfterLoginTests(PBInputTestCase):
    def logged_in(self) -> tuple[PBSession, int]:
        session = PBSession(self, self.pair)
        session.login()
        return session, len(session.delivered)

    def test_a_never_closed_list_is_cut_at_max_message(self) -> None:
        session, before = self.logged_in()
        blocks = (LIMITS.max_message // (64 * 1024)) + 16
        sent = session.send_raw(OPEN_LIST + string(b"s" * (64 * 1024 - 8)) * blocks)
        self.refusal(
            session, "worker 'libxml2-debian-sid'", f"more than {LIMITS.max_message} bytes (max_message)"
        )
        taken = sum(session.delivered[before:])
        self.assertGreater(taken, LIMITS.max_message - 64 * 1024)
        self.assertLessEqual(taken, LIMITS.max_message + 64 * 1024, "the master held more")
        self.assertLess(sent, LIMITS.max_message + 256 * 1024, "the channel closed late")

    def test_1_MiB_of_1_byte_tokens_is_cut_at_max_items_in_slices(self) -> None:
        session, before = self.logged_in()
        session.send_raw(OPEN_LIST + banana.INT * (1 << 20))
        self.refusal(session, f"more than {LIMITS.max_items} items (max_items)")
        calls = session.delivered[before:]
        self.assertLessEqual(max(calls), SLICE, "Banana got more than a slice of tiny tokens at once")
        self.assertLessEqual(sum(calls), LIMITS.max_items + SLICE + len(OPEN_LIST))

    def test_calls_work_and_a_600_KiB_string_is_not_sliced(self) -> None:
        session, before = self.logged_in()
        self.assertEqual(session.echo("hello"), "hello")
        big = b"x" * (600 * 1024)
        start = len(session.delivered)
        self.assertEqual(session.echo(big), big)
        packets = math.ceil(len(big) / session.channel.remoteMaxPacket)
        # At most one slice before the string starts, then its rest in one piece a packet.
        self.assertLessEqual(len(session.delivered) - start, packets + 3)
        self.assertEqual(
            [a.calls for a in self.pair.realm.avatars if a.name == b"libxml2-debian-sid"], [["hello", big]]
        )
        self.assertEqual(self.logs.matching("channel closed"), [])
        self.assertFalse(session.closed)
        self.assertUnaffected()

    def test_the_attach_exchange_before_the_login_completes_is_not_a_login(self) -> None:
        """Buildbot asks the worker for its info (environment included) before the
        login completes: past the password, that is not bounded by login_bytes."""
        realm = AttachingRealm()
        self.pair.portal.realm = realm
        session = PBSession(self, self.pair)
        session.login(mind=Mind())
        self.assertEqual(realm.info, [b"e" * Mind.size])
        self.assertGreater(sum(session.delivered), LIMITS.login_bytes)
        self.assertEqual(self.logs.matching("channel closed"), [])
        self.assertUnaffected()


class Mind(pb.Referenceable):
    """A worker's mind: its info is larger than a login may be."""

    size = 4 * LIMITS.login_bytes

    def remote_info(self) -> bytes:
        return b"e" * self.size


@implementer(portal.IRealm)
class AttachingRealm:
    """Like Buildbot's: asks the mind for its info before the avatar is ready."""

    def __init__(self) -> None:
        self.info: list[bytes] = []

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        def attached(info: bytes) -> Any:
            self.info.append(info)
            return pb.IPerspective, Echo(avatarId), lambda: None

        return mind.callRemote("info").addCallback(attached)


class BananaInputTests(TestCase):
    """Message sizes counted per top-level message, whatever the packets."""

    def setUp(self) -> None:
        self.protocol = banana.Banana(isClient=0)
        self.protocol.setPrefixLimit(64)
        self.protocol.currentDialect = b"pb"
        self.received: list[Any] = []
        self.protocol.expressionReceived = self.received.append  # type: ignore[method-assign]
        limits = PBInputLimits(max_message=3 * SLICE)
        self.input = BananaInput(self.protocol, limits, lambda: True)

    def feed(self, data: bytes, packet: int) -> None:
        for i in range(0, len(data), packet):
            for piece in self.input.pieces(data[i : i + packet]):
                self.protocol.dataReceived(piece)

    def test_many_small_messages_never_add_up_to_one(self) -> None:
        messages = [[b"message", i, b"x" * (i * 7 % 2000)] for i in range(2000)]
        stream = b"".join(banana.encode(m) for m in messages)
        for packet in (1000, 5000, 65536):
            del self.received[:]
            self.feed(stream, packet)  # 2 MB in all: raises if counted as one
            self.assertEqual(self.received, messages)

    def test_one_message_past_max_message_is_refused(self) -> None:
        self.feed(banana.encode([b"ok", b"x" * 5000]), 65536)
        self.assertRaises(InputRefused, self.feed, OPEN_LIST + string(b"s" * 1000) * 20, 65536)
        self.assertEqual(self.received, [[b"ok", b"x" * 5000]])


class ConnectionLoginBytesTests(PBInputTestCase):
    def test_logged_in_channels_give_their_share_back(self) -> None:
        # Sessions that logged in no longer count towards connection_login_bytes:
        # a launcher's sessions attaching one after another never add up.
        server_conn = self.pair.server_connection
        self.assertEqual(server_conn.pb_login_bytes, 0)
        session = PBSession(self, self.pair)
        session.login()
        self.assertEqual(session.echo("after"), "after")
        self.assertEqual(server_conn.pb_login_bytes, 0)

    def test_a_closed_channel_gives_its_share_back(self) -> None:
        server_conn = self.pair.server_connection
        session = PBSession(self, self.pair)
        session.send_raw(OPEN_LIST)
        self.assertGreater(server_conn.pb_login_bytes, 0)
        session.server_channel.loseConnection()
        self.pair.flush()
        self.assertEqual(server_conn.pb_login_bytes, 0)
