"""Host authorization on a live, in-memory SSH connection.

``from=`` at login (with the peer's real address), ``max-channels`` on channel
opens, and `SSHMuxFactory.apply_entries` after an edit of the entries:
revoking a host drops its connection, narrowing ``workers=`` drops only the
sessions no longer allowed; other hosts are untouched.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.conch.error import ConchError
from twisted.conch.ssh import forwarding
from twisted.conch.ssh.connection import OPEN_RESOURCE_SHORTAGE
from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.spread import pb
from twisted.trial.unittest import TestCase

from buildbot_sshmux.errors import ChannelRefused
from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.server import AuthorizedHostsChecker, HostAvatar, ValidPublicKey
from buildbot_sshmux.wire.keys import fingerprint
from buildbot_sshmux.worker.link import ChannelEndpoint, MasterLink

from .sshharness import (
    HOST_KEY,
    OTHER_KEY,
    PB_PORT,
    WORKER_HOST_ADDRESS,
    ExtraLink,
    LogCapture,
    ProbeChannel,
    SSHPair,
    connect_from,
    flush_all,
    mux_clocked_services,
    pb_portal,
)

PEER = WORKER_HOST_ADDRESS.host  # 198.51.100.7


def host_entry(name: str = "debian-sid", key: Any = HOST_KEY, **kwargs: Any) -> HostEntry:
    kwargs.setdefault("workers", ("*-debian-sid",))
    return HostEntry(name=name, key=key.public(), **kwargs)


def from_pair(testcase: TestCase, entry: HostEntry, peer: Any = None) -> SSHPair:
    """An SSHPair whose server checks from= with the peer's address, as in production."""
    pair = SSHPair(testcase, entries=[entry])
    pair.factory.services = mux_clocked_services(pair.clock)
    if peer is not None:
        connect_from(pair, peer)
    return pair


def login(
    link: MasterLink, flush: Any, name: str, password: bytes = b"pw"
) -> tuple[pb.PBClientFactory, defer.Deferred[Any]]:
    """A PB login as ``name`` through a new direct-tcpip channel on ``link``."""
    factory = pb.PBClientFactory()
    connected = ChannelEndpoint(link, PB_PORT, name).connect(factory)
    flush()
    if not connected.called:
        raise AssertionError("the channel did not open")
    d = factory.login(credentials.UsernamePassword(name.encode(), password))
    flush()
    return factory, d


class FromAtLoginTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def assertRefused(self, pair: SSHPair, address: str) -> None:
        waiting = pair.link.when_ready()
        pair.start()
        self.assertNoResult(waiting)
        self.assertTrue(pair.link.refused)
        self.assertIsNone(pair.link.connection)
        self.assertFalse(hasattr(pair.server, "avatar"), "the host must not be logged in")
        self.assertTrue(
            self.logs.matching("refused host debian-sid", fingerprint(HOST_KEY), address, "from="),
            self.logs.texts(),
        )
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)

    def assertConnects(self, pair: SSHPair) -> None:
        pair.start()
        self.assertIsNotNone(pair.link.connection)
        self.assertFalse(pair.link.refused)
        self.assertEqual(pair.server.avatar.entry.name, "debian-sid")

    def test_address_outside_from_is_refused_and_logged(self) -> None:
        pair = from_pair(self, host_entry(from_patterns=("10.0.0.0/8",)))
        self.assertRefused(pair, PEER)

    def test_address_inside_from_connects(self) -> None:
        pair = from_pair(self, host_entry(from_patterns=("10.0.0.0/8", "198.51.100.0/24")))
        self.assertConnects(pair)
        self.assertEqual(self.logs.matching("refused"), [])

    def test_negated_address_is_refused_though_a_positive_pattern_matches(self) -> None:
        pair = from_pair(self, host_entry(from_patterns=("198.51.100.0/24", f"!{PEER}")))
        self.assertRefused(pair, PEER)

    def test_wildcard_from(self) -> None:
        self.assertConnects(from_pair(self, host_entry(from_patterns=("198.51.100.*",))))

    def test_ipv6_peer(self) -> None:
        peer = IPv6Address("TCP", "2001:db8::7", 40000)
        self.assertConnects(from_pair(self, host_entry(from_patterns=("2001:db8::/32",)), peer))

    def test_ipv6_peer_outside_from(self) -> None:
        peer = IPv6Address("TCP", "2001:db9::7", 40000)
        pair = from_pair(self, host_entry(from_patterns=("2001:db8::/32",)), peer)
        self.assertRefused(pair, "2001:db9::7")

    def test_ipv4_mapped_ipv6_peer_matches_an_ipv4_network(self) -> None:
        peer = IPv6Address("TCP", "::ffff:198.51.100.7", 40000)
        self.assertConnects(from_pair(self, host_entry(from_patterns=("198.51.100.0/24",)), peer))

    def test_ipv4_mapped_ipv6_peer_outside_from(self) -> None:
        peer = IPv6Address("TCP", "::ffff:198.51.100.7", 40000)
        pair = from_pair(self, host_entry(from_patterns=("10.0.0.0/8",)), peer)
        self.assertRefused(pair, "198.51.100.7")

    def test_other_hosts_without_from_are_not_affected(self) -> None:
        pair = from_pair(self, host_entry(from_patterns=("10.0.0.0/8",)))
        pair.entries.append(host_entry("fedora", OTHER_KEY, workers=("*-fedora",)))
        other = ExtraLink(self, pair, OTHER_KEY, IPv4Address("TCP", "203.0.113.9", 50000))
        other.start()
        self.assertIsNotNone(other.link.connection)
        self.assertEqual(other.server.avatar.entry.name, "fedora")


class CheckerFromTests(TestCase):
    """AuthorizedHostsChecker on its own: a signed request straight away (as
    OpenSSH sends for a private key file with no .pub beside it) must be
    refused and logged like a query is."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.entry = host_entry(from_patterns=("10.0.0.0/8",))

    def creds(self, signed: bool) -> credentials.SSHPrivateKey:
        sig_data = b"session-id and userauth request"
        signature = HOST_KEY.sign(sig_data) if signed else None
        return credentials.SSHPrivateKey(
            b"buildbot-worker",
            b"ssh-ed25519",
            HOST_KEY.public().blob(),
            sig_data if signed else None,
            signature,
        )

    def test_query_from_outside_is_refused_and_logged(self) -> None:
        checker = AuthorizedHostsChecker(lambda: [self.entry], "192.0.2.50")
        self.failureResultOf(checker.requestAvatarId(self.creds(signed=False)), UnauthorizedLogin)
        self.assertTrue(
            self.logs.matching("debian-sid", fingerprint(HOST_KEY), "192.0.2.50"), self.logs.texts()
        )

    def test_signed_request_from_outside_is_refused_and_logged(self) -> None:
        checker = AuthorizedHostsChecker(lambda: [self.entry], "192.0.2.50")
        self.failureResultOf(checker.requestAvatarId(self.creds(signed=True)), UnauthorizedLogin)
        self.assertTrue(
            self.logs.matching("debian-sid", fingerprint(HOST_KEY), "192.0.2.50"), self.logs.texts()
        )

    def test_signed_request_from_inside_is_accepted(self) -> None:
        checker = AuthorizedHostsChecker(lambda: [self.entry], "10.1.2.3")
        self.assertEqual(self.successResultOf(checker.requestAvatarId(self.creds(signed=True))), self.entry)
        self.failureResultOf(checker.requestAvatarId(self.creds(signed=False)), ValidPublicKey)
        self.assertEqual(self.logs.matching("refused"), [])


class MaxChannelsTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def start(self, max_channels: int | None) -> SSHPair:
        pair = SSHPair(self, entries=[host_entry(max_channels=max_channels)])
        pair.start()
        return pair

    def open(self, pair: SSHPair) -> ProbeChannel:
        conn = pair.connection()
        channel = ProbeChannel(conn=conn)
        conn.openChannel(channel, forwarding.packOpen_direct_tcpip(("localhost", PB_PORT), ("127.0.0.1", 0)))
        pair.flush()
        # Conch logs every refused open as a failure; expected here.
        self.flushLoggedErrors(ConchError)
        return channel

    def test_third_channel_is_refused_with_resource_shortage(self) -> None:
        pair = self.start(2)
        first, second, third = self.open(pair), self.open(pair), self.open(pair)
        self.assertTrue(first.opened)
        self.assertTrue(second.opened)
        self.assertFalse(third.opened)
        self.assertEqual([r.data for r in third.refusals], [OPEN_RESOURCE_SHORTAGE])
        self.assertEqual(len(pair.server_connection.channels), 2)
        self.assertTrue(
            self.logs.matching("refused", "max-channels=2", "debian-sid", fingerprint(HOST_KEY)),
            self.logs.texts(),
        )

    def test_closing_a_channel_makes_room(self) -> None:
        pair = self.start(2)
        first, _second = self.open(pair), self.open(pair)
        pair.connection().sendClose(first)
        pair.flush()
        self.assertEqual(len(pair.server_connection.channels), 1)
        self.assertTrue(self.open(pair).opened)
        self.assertFalse(self.open(pair).opened)

    def test_no_limit_without_the_option(self) -> None:
        pair = self.start(None)
        channels = [self.open(pair) for _ in range(6)]
        self.assertTrue(all(c.opened for c in channels))

    def test_worker_sees_a_channel_refusal(self) -> None:
        pair = self.start(1)
        _factory, d = login(pair.link, pair.flush, "libxml2-debian-sid")
        self.successResultOf(d)
        refused = ChannelEndpoint(pair.link, PB_PORT, "second").connect(pb.PBClientFactory())
        pair.flush()
        self.flushLoggedErrors(ConchError)
        failure = self.failureResultOf(refused, ChannelRefused)
        self.assertIn("max-channels=1", str(failure.value))


class RevocationTests(TestCase):
    """apply_entries after the host's entry is removed or its from= narrowed."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.entry_a = host_entry()
        self.entry_b = host_entry("fedora", OTHER_KEY, workers=("*-fedora",))
        self.pair = SSHPair(self, entries=[self.entry_a, self.entry_b])
        self.pair.start()
        self.b = ExtraLink(self, self.pair, OTHER_KEY, IPv4Address("TCP", "203.0.113.9", 50000))
        self.b.start()
        self.assertIsNotNone(self.pair.link.connection)
        self.assertIsNotNone(self.b.link.connection)
        self.server_a, self.server_b = self.pair.server, self.b.server

    def flush(self) -> None:
        flush_all(self.pair.wire, self.b.wire)

    def assertBStillWorks(self) -> None:
        self.assertIsNotNone(self.b.link.connection)
        self.assertIn(self.server_b, self.pair.factory.connections)
        _factory, d = login(self.b.link, self.flush, "glib-fedora")
        perspective = self.successResultOf(d)
        echoed = perspective.callRemote("echo", "still here")
        self.flush()
        self.assertEqual(self.successResultOf(echoed), "still here")

    def test_removed_host_is_disconnected_and_the_other_stays(self) -> None:
        _factory, d = login(self.pair.link, self.flush, "libxml2-debian-sid")
        perspective = self.successResultOf(d)
        lost: list[Any] = []
        perspective.notifyOnDisconnect(lost.append)

        self.pair.entries.remove(self.entry_a)
        self.pair.factory.apply_entries()
        self.flush()

        self.assertIsNone(self.pair.link.connection)
        self.assertIsNone(self.pair.link._transport, "the client link must see the connection lost")
        self.assertNotIn(self.server_a, self.pair.factory.connections)
        self.assertEqual(len(lost), 1, "the worker session on the revoked host must end")
        self.assertTrue(
            self.logs.matching("debian-sid", fingerprint(HOST_KEY), "no longer authorized"), self.logs.texts()
        )
        self.assertBStillWorks()

    def test_revoked_host_is_refused_when_it_redials(self) -> None:
        self.pair.entries.remove(self.entry_a)
        self.pair.factory.apply_entries()
        self.flush()
        self.assertEqual(self.pair.link.dials, 1)
        self.pair.clock.advance(5.0)
        self.assertEqual(self.pair.link.dials, 2)
        flush_all(self.pair.wire, self.b.wire)
        self.assertTrue(self.pair.link.refused)
        self.assertIsNone(self.pair.link.connection)
        self.assertBStillWorks()

    def test_from_narrowed_away_from_the_hosts_address_disconnects_it(self) -> None:
        self.pair.entries[0] = attrs.evolve(self.entry_a, from_patterns=("10.0.0.0/8",))
        self.pair.factory.apply_entries()
        self.flush()
        self.assertIsNone(self.pair.link.connection)
        self.assertNotIn(self.server_a, self.pair.factory.connections)
        self.assertBStillWorks()

    def test_unchanged_entries_disconnect_nobody(self) -> None:
        _factory, d = login(self.pair.link, self.flush, "libxml2-debian-sid")
        self.successResultOf(d)
        self.pair.factory.apply_entries()
        self.flush()
        self.assertIsNotNone(self.pair.link.connection)
        self.assertEqual(len(self.server_a.service.channels), 1)
        self.assertEqual(self.logs.matching("no longer"), [])

    def test_a_reloaded_identical_entry_keeps_the_connection(self) -> None:
        # A reload makes new HostEntry objects (with new sources) for the same lines.
        self.pair.entries[:] = [attrs.evolve(self.entry_a, source="hosts:9"), self.entry_b]
        self.pair.factory.apply_entries()
        self.flush()
        self.assertIsNotNone(self.pair.link.connection)
        self.assertIsInstance(self.server_a.avatar, HostAvatar)
        self.assertEqual(self.server_a.avatar.entry.source, "hosts:9")


class NarrowWorkersTests(TestCase):
    """apply_entries after the host's workers= is narrowed."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.portal, self.checker, self.realm = pb_portal(
            **{"libxml2-debian-sid": b"pw", "gtk-debian-sid": b"pw"}
        )
        self.entry = host_entry(workers=("*-debian-sid",))
        self.pair = SSHPair(self, entries=[self.entry], pb_lookup=lambda: (PB_PORT, self.portal, False))
        self.pair.start()
        self.libxml2_factory, d = login(self.pair.link, self.pair.flush, "libxml2-debian-sid")
        self.libxml2 = self.successResultOf(d)
        self.gtk_factory, d = login(self.pair.link, self.pair.flush, "gtk-debian-sid")
        self.gtk = self.successResultOf(d)
        self.lost: list[str] = []
        self.libxml2.notifyOnDisconnect(lambda _: self.lost.append("libxml2"))
        self.gtk.notifyOnDisconnect(lambda _: self.lost.append("gtk"))

    def server_channels(self) -> list[Any]:
        return list(self.pair.server_connection.channels.values())

    def narrow(self, *workers: str) -> None:
        self.pair.entries[:] = [attrs.evolve(self.entry, workers=workers)]
        self.pair.factory.apply_entries()
        self.pair.flush()

    def test_worker_login_records_the_logged_in_worker_name(self) -> None:
        names = sorted(c.login.worker_name for c in self.server_channels())
        self.assertEqual(names, ["gtk-debian-sid", "libxml2-debian-sid"])

    def test_only_the_no_longer_allowed_session_is_closed(self) -> None:
        self.narrow("libxml2-*")

        self.assertEqual(self.lost, ["gtk"])
        [remaining] = self.server_channels()
        self.assertEqual(remaining.login.worker_name, "libxml2-debian-sid")
        self.assertEqual(len(self.pair.connection().channels), 1)
        self.assertIsNotNone(self.pair.link.connection, "the host's connection stays up")
        echoed = self.libxml2.callRemote("echo", "unaffected")
        self.pair.flush()
        self.assertEqual(self.successResultOf(echoed), "unaffected")
        self.assertTrue(
            self.logs.matching("debian-sid", "may no longer attach worker 'gtk-debian-sid'"),
            self.logs.texts(),
        )
        self.assertEqual(self.logs.matching("may no longer attach worker 'libxml2"), [])

    def test_a_later_login_as_that_name_is_refused_before_the_checker(self) -> None:
        self.narrow("libxml2-*")
        asked_before = list(self.checker.asked)

        _factory, d = login(self.pair.link, self.pair.flush, "gtk-debian-sid")

        self.failureResultOf(d, UnauthorizedLogin)
        # PB logs every failed login it sends back; expected here.
        self.flushLoggedErrors(UnauthorizedLogin)
        self.assertEqual(self.checker.asked, asked_before, "the password checker must not be asked")
        self.assertTrue(
            self.logs.matching("debian-sid", "may not attach worker 'gtk-debian-sid'"), self.logs.texts()
        )

    def test_a_login_on_a_surviving_channel_follows_the_new_entry(self) -> None:
        self.narrow("libxml2-*")
        asked_before = list(self.checker.asked)
        d = self.libxml2_factory.login(credentials.UsernamePassword(b"gtk-debian-sid", b"pw"))
        self.pair.flush()
        self.failureResultOf(d, UnauthorizedLogin)
        self.flushLoggedErrors(UnauthorizedLogin)
        self.assertEqual(self.checker.asked, asked_before)

    def test_widening_closes_nothing(self) -> None:
        self.narrow("*-debian-sid", "tools-*")
        self.assertEqual(self.lost, [])
        self.assertEqual(len(self.server_channels()), 2)
