"""`SSHMuxService.status()` and the master's metrics, on a live in-memory SSH connection.

A real `SSHMuxFactory` and `MasterLink` (`SSHPair`), real PB logins on
channels: what the status says of the connected host (address, algorithms,
bytes, keepalive round trip, rekeys, sessions attached and refused), of the
authorized hosts not connected, and the refusals of the last hour by reason;
the text of ``buildbot-sshmux status``; and the same numbers as Prometheus
metrics, parsed back with prometheus_client's own parser.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from buildbot_sshmux.cli.admin import format_status
from buildbot_sshmux.errors import ChannelRefused
from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.metrics import MasterCollector
from buildbot_sshmux.master.service import SSHMuxService
from buildbot_sshmux.master.stats import REASONS, ServerStats
from buildbot_sshmux.wire.keys import fingerprint, generate_ed25519, write_private_key
from buildbot_sshmux.wire.liveness import Liveness
from buildbot_sshmux.wire.metrics import listen_description, registry_of
from buildbot_sshmux.wire.stats import Histogram, RecentCounts
from buildbot_sshmux.worker.link import ChannelEndpoint

from .sshharness import MASTER_KEY, OTHER_KEY, PB_PORT, WORKER_HOST_ADDRESS, ExtraLink, SSHPair, tune
from .test_live_authorization import login
from .tmpdirs import scratch_dir

PEER = f"{WORKER_HOST_ADDRESS.host}:{WORKER_HOST_ADDRESS.port}"
FEDORA = HostEntry(name="fedora-40", key=OTHER_KEY.public(), workers=("*-fedora",), source="hosts:2")
SERVER_LIVENESS = Liveness(keepalive_interval=10, rekey_bytes=0, rekey_interval=0)
CLIENT_LIVENESS = Liveness(keepalive_interval=0, rekey_bytes=0, rekey_interval=0)


def service_for(testcase: TestCase, pair: SSHPair) -> SSHMuxService:
    """A real SSHMuxService around ``pair``'s factory (as reconfigService would set it up)."""
    directory = scratch_dir(testcase)
    key = directory / "ssh_host_ed25519_key"
    write_private_key(key, MASTER_KEY)
    service = SSHMuxService(host_keys=[str(key)], hosts=["# none"])
    service.parent = SimpleNamespace(master=SimpleNamespace(basedir=str(directory), reactor=pair.clock))  # type: ignore[assignment]
    service.factory = pair.factory
    service.stats = pair.factory.stats
    service.entries = pair.entries  # the very list the factory reads
    return service


def samples(service: SSHMuxService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape of ``service``'s metrics: (name, labels) -> value."""
    text = generate_latest(registry_of(MasterCollector(service))).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class LiveHost(TestCase):
    """One host connected (debian-sid), one authorized and not (fedora-40)."""

    def setUp(self) -> None:
        self.pair = tune(
            SSHPair(self), liveness=SERVER_LIVENESS, client_liveness=CLIENT_LIVENESS, mux_auth=True
        )
        self.pair.entries.append(FEDORA)
        self.service = service_for(self, self.pair)
        self.pair.start()
        self.pair.clock.advance(5)

    def login(self, name: str, password: bytes = b"pw") -> defer.Deferred[Any]:
        _factory, d = login(self.pair.link, self.pair.flush, name, password)
        return d

    def make_activity(self) -> None:
        """One session attached, two logins refused, a channel refused, a keepalive, a rekey, an unknown key."""
        pair = self.pair
        self.successResultOf(self.login("libxml2-debian-sid"))
        self.failureResultOf(self.login("glib-fedora"))  # not in this host's workers=
        self.failureResultOf(self.login("nope-debian-sid"))  # unknown to the master
        refused = ChannelEndpoint(pair.link, PB_PORT + 1, "x").connect(Factory.forProtocol(Protocol))
        pair.flush()
        self.failureResultOf(refused, ChannelRefused)
        # A keepalive whose answer takes 500 ms.
        pair.clock.advance(SERVER_LIVENESS.keepalive_interval)
        pair.wire.hold_to_server = True
        pair.flush()
        pair.clock.advance(0.5)
        pair.wire.hold_to_server = False
        pair.flush()
        pair.server.rekey()
        pair.flush()
        stranger = ExtraLink(self, pair, generate_ed25519())
        stranger.start()
        self.assertTrue(stranger.link.refused)
        stranger.close()
        pair.flush()


class StatusTests(LiveHost):
    def test_a_connected_host_its_sessions_and_refusals(self) -> None:
        self.make_activity()
        status = self.service.status()
        json.dumps(status)  # JSON-able
        self.assertEqual(status["version"], 1)
        [host] = status["hosts"]
        self.assertEqual((host["name"], host["fingerprint"], host["address"]),
                         ("debian-sid", self.pair.entry.fingerprint, PEER))  # fmt: skip
        self.assertEqual(host["connected_since"], 0.0)
        self.assertEqual(host["connected_for_s"], 15.5)
        self.assertEqual(host["cipher"], {"in": "aes128-gcm@openssh.com", "out": "aes128-gcm@openssh.com"})
        self.assertEqual(host["mac"], {"in": "<implicit>", "out": "<implicit>"})
        self.assertIn(host["kex"], ("curve25519-sha256", "curve25519-sha256@libssh.org"))
        self.assertEqual(host["host_key_algorithm"], "ssh-ed25519")
        self.assertTrue(host["client_version"].startswith("SSH-2.0-"), host["client_version"])
        # Bytes on the wire, as each end counted them: what one wrote, the other read.
        client = self.pair.client_transport()
        self.assertEqual(host["bytes"], {"received": client.bytes_sent, "sent": client.bytes_received})
        self.assertGreater(host["bytes"]["received"], 1000)
        self.assertEqual(host["keepalive_rtt_ms"], {"last": 500.0, "median": 500.0})
        self.assertEqual((host["rekeys"], host["last_rekey_ago_s"]), (1, 0.0))
        self.assertEqual(
            host["sessions"],
            [
                {"worker": "libxml2-debian-sid", "state": "attached", "reason": None, "ago_s": None},
                {"worker": "glib-fedora", "state": "refused", "reason": "worker_not_allowed", "ago_s": 10.5},
                {"worker": "nope-debian-sid", "state": "refused", "reason": "bad_credentials", "ago_s": 10.5},
            ],
        )
        self.assertEqual(
            host["refusals_last_hour"], {"bad_credentials": 1, "target": 1, "worker_not_allowed": 1}
        )
        self.assertFalse(host["replaced"])
        self.assertEqual(
            status["refusals_last_hour"],
            {"bad_credentials": 1, "target": 1, "unknown_key": 1, "worker_not_allowed": 1},
        )
        [other] = status["not_connected"]
        self.assertEqual(
            other,
            {
                "name": "fedora-40",
                "fingerprint": fingerprint(OTHER_KEY),
                "workers": ["*-fedora"],
                "source": "hosts:2",
                "last_seen": None,
                "refusals_last_hour": {},
            },
        )

    def test_a_host_that_leaves_is_listed_as_not_connected_with_when_and_where(self) -> None:
        self.successResultOf(self.login("libxml2-debian-sid"))
        server = self.pair.server
        self.pair.close()
        self.pair.clock.advance(30)
        status = self.service.status()
        self.assertEqual(status["hosts"], [])
        names = [(e["name"], e["last_seen"]) for e in status["not_connected"]]
        self.assertEqual(names, [("debian-sid", {"ago_s": 30.0, "address": PEER}), ("fedora-40", None)])
        self.assertEqual(self.pair.factory.stats.closed["received"], server.bytes_received)
        self.assertEqual(self.pair.factory.stats.closed["sent"], server.bytes_sent)

    def test_refusals_leave_the_last_hour(self) -> None:
        self.failureResultOf(self.login("glib-fedora"))
        self.assertEqual(self.service.status()["refusals_last_hour"], {"worker_not_allowed": 1})
        self.pair.clock.advance(3600 + 120)
        status = self.service.status()
        self.assertEqual(status["refusals_last_hour"], {})
        self.assertEqual(status["hosts"][0]["refusals_last_hour"], {})
        self.assertEqual(self.pair.factory.stats.totals["worker_not_allowed"], 1, "a total is kept")

    def test_the_text_of_buildbot_sshmux_status(self) -> None:
        self.make_activity()
        text = format_status(self.service.status())
        lines = text.splitlines()
        self.assertIn(f"host debian-sid ({self.pair.entry.fingerprint}) from {PEER}", lines)
        self.assertIn("  connected since 1970-01-01 00:00:00 UTC (15s); ", text)
        self.assertIn("cipher aes128-gcm@openssh.com both ways, mac <implicit> both ways", text)
        self.assertIn("keepalive rtt 500.0 ms (median 500.0); 1 rekeys, the last 0s ago", text)
        self.assertIn("  sessions: 1 attached, 2 refused", lines)
        self.assertIn("    libxml2-debian-sid  attached", lines)
        self.assertIn("    glib-fedora         refused (worker_not_allowed, 10s ago)", lines)
        self.assertIn("  refusals in the last hour: bad_credentials 1, target 1, worker_not_allowed 1", lines)
        self.assertIn("authorized, not connected: 1", lines)
        self.assertIn(
            f"  fedora-40 ({fingerprint(OTHER_KEY)}) workers=*-fedora; not connected since the master started",
            lines,
        )
        self.assertEqual(
            lines[-1],
            "refusals in the last hour, all hosts and unknown keys:"
            " bad_credentials 1, target 1, unknown_key 1, worker_not_allowed 1",
        )


class MetricsTests(LiveHost):
    def test_the_numbers_of_the_status_as_metrics(self) -> None:
        self.make_activity()
        got = samples(self.service)
        server = self.pair.server
        self.assertEqual(got["sshmux_hosts_connected", ()], 1)
        self.assertEqual(got["sshmux_authorized_hosts", ()], 2)
        self.assertEqual(got["sshmux_sessions", (("state", "attached"),)], 1)
        self.assertEqual(got["sshmux_sessions", (("state", "refused"),)], 2)
        self.assertEqual(got["sshmux_sessions", (("state", "logging_in"),)], 0)
        # The stranger's connection has closed: its bytes are in the totals too.
        self.assertGreater(got["sshmux_bytes_total", (("direction", "received"),)], server.bytes_received)
        self.assertGreater(got["sshmux_bytes_total", (("direction", "sent"),)], server.bytes_sent)
        self.assertEqual(got["sshmux_keepalive_rtt_seconds_count", ()], 1)
        self.assertEqual(got["sshmux_keepalive_rtt_seconds_sum", ()], 0.5)
        self.assertEqual(got["sshmux_keepalive_rtt_seconds_bucket", (("le", "0.25"),)], 0)
        self.assertEqual(got["sshmux_keepalive_rtt_seconds_bucket", (("le", "0.5"),)], 1)
        self.assertEqual(got["sshmux_auth_failures_total", (("reason", "unknown_key"),)], 1)
        self.assertEqual(got["sshmux_auth_failures_total", (("reason", "bad_signature"),)], 0)
        self.assertEqual(got["sshmux_channel_refusals_total", (("reason", "target"),)], 1)
        self.assertEqual(got["sshmux_worker_logins_refused_total", (("reason", "worker_not_allowed"),)], 1)
        self.assertEqual(got["sshmux_worker_logins_refused_total", (("reason", "bad_credentials"),)], 1)
        self.assertEqual(got["sshmux_rekeys_total", ()], 1)
        self.assertEqual(got["sshmux_duplicate_connections_total", (("outcome", "refused"),)], 0)
        # Every reason is there from the start.
        reasons = {dict(labels)["reason"] for (name, labels) in got if name.endswith("_total") and labels
                   and "reason" in dict(labels)}  # fmt: skip
        self.assertEqual(reasons, {r for r, (kind, _) in REASONS.items() if kind != "duplicate"})

    def test_two_services_in_one_process_have_their_own_registries(self) -> None:
        other = service_for(self, tune(SSHPair(self), mux_auth=True))
        self.assertEqual(samples(self.service)["sshmux_hosts_connected", ()], 1)
        self.assertEqual(samples(other)["sshmux_hosts_connected", ()], 0)

    def test_where_metrics_listen(self) -> None:
        self.assertEqual(listen_description(9101), "tcp:9101:interface=127.0.0.1")
        self.assertEqual(listen_description("9101"), "tcp:9101:interface=127.0.0.1")
        self.assertEqual(listen_description("0.0.0.0:9101"), "tcp:9101:interface=0.0.0.0")
        self.assertEqual(listen_description("[::1]:9101"), r"tcp6:9101:interface=\:\:1")
        self.assertEqual(listen_description("tcp:9101"), "tcp:9101:interface=127.0.0.1")
        self.assertEqual(listen_description("tcp:9101:interface=0.0.0.0"), "tcp:9101:interface=0.0.0.0")
        self.assertEqual(listen_description("unix:/run/m.sock"), "unix:/run/m.sock")
        for bad in ("", "host:", "nine", "1.2.3.4:99999", True, 1.5):
            with self.assertRaises(ValueError):
                listen_description(bad)  # type: ignore[arg-type]


class CountsTests(TestCase):
    def test_histogram_buckets_are_cumulative_and_inclusive(self) -> None:
        h = Histogram((0.1, 1.0))
        for value in (0.05, 0.1, 0.5, 3.0):
            h.observe(value)
        self.assertEqual(h.cumulative(), [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)])
        self.assertEqual((h.count, h.sum), (4, 3.65))

    def test_recent_counts_are_bounded_per_key_and_in_keys(self) -> None:
        clock = task.Clock()
        recent = RecentCounts(clock, window=3600, slot=60, max_keys=2)
        for _ in range(10_000):  # a flood: one pair per minute, not one entry per event
            recent.add("a")
            clock.advance(1)
        # The last hour's 3600 events, and at most one slot (60 s) more.
        self.assertTrue(3600 <= recent.counts()["a"] <= 3660, recent.counts())
        self.assertLessEqual(len(recent._slots["a"]), 61)
        recent.add("b")
        clock.advance(1)
        recent.add("c")  # a third key: the one whose last event is oldest goes
        self.assertEqual(set(recent.counts()), {"b", "c"})
        clock.advance(3600 + 60)
        self.assertEqual(recent.counts(), {})

    def test_an_unknown_reason_is_a_bug(self) -> None:
        with self.assertRaises(ValueError):
            ServerStats(task.Clock()).refused("no such reason")
