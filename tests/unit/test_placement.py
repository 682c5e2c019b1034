"""Cluster placement: rendezvous ranking, and the ``[cluster]`` table of the launcher config."""

from __future__ import annotations

import random
import textwrap
from collections import Counter
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from buildbot_sshmux.errors import ConfigError
from buildbot_sshmux.wire.keys import generate_ed25519, write_private_key
from buildbot_sshmux.worker import config as launcher_config
from buildbot_sshmux.worker.launcher import Launcher
from buildbot_sshmux.worker.placement import ClusterEndpoint, Rebalancer, assign, capacity, rank

from .tmpdirs import scratch_dir

MASTERS = [("m1:2222", 1.0), ("m2:2222", 1.0), ("m3:2222", 1.0)]
WORKERS = [f"project{i}-debian-sid" for i in range(200)]


# Sets of 3 masters as a test's are: 127.0.0.1 and ports the kernel picked.
ADDRESS_SETS = [
    [(f"127.0.0.1:{port}", 1.0) for port in random.Random(seed).sample(range(32768, 61000), 3)]
    for seed in range(40)
]


def first_choices(masters: list[tuple[str, float]]) -> Counter[str]:
    return Counter(rank(w, masters)[0] for w in WORKERS)


def assigned(workers: list[str], masters: list[tuple[str, float]]) -> Counter[str]:
    return Counter(order[0] for order in assign(workers, masters).values())


class RankTests(TestCase):
    def test_the_order_depends_only_on_the_names(self) -> None:
        self.assertEqual([rank(w, MASTERS) for w in WORKERS], [rank(w, MASTERS[::-1]) for w in WORKERS])
        self.assertEqual(sorted(rank("w", MASTERS)), sorted(m for m, _ in MASTERS))

    def test_alone_it_spreads_200_sessions_over_3_masters_only_as_evenly_as_chance(self) -> None:
        # Why `assign` bounds the first choices: a master off its even share
        # by more than 10% is common (binomial: sd 6.7 sessions, 10% is 6.7).
        even = len(WORKERS) / 3
        worst = [max(abs(n - even) for n in first_choices(masters).values()) for masters in ADDRESS_SETS]
        self.assertGreater(sum(w > 0.1 * even for w in worst), len(ADDRESS_SETS) // 4, worst)

    def test_losing_a_master_moves_only_its_sessions(self) -> None:
        before = {w: rank(w, MASTERS)[0] for w in WORKERS}
        survivors = [m for m in MASTERS if m[0] != "m2:2222"]
        after = {w: rank(w, survivors)[0] for w in WORKERS}
        moved = {w for w in WORKERS if before[w] != after[w]}
        self.assertEqual(moved, {w for w in WORKERS if before[w] == "m2:2222"})
        # and they spread over both survivors, not onto one
        self.assertEqual(set(after[w] for w in moved), {"m1:2222", "m3:2222"})

    def test_weights_share_sessions_in_proportion(self) -> None:
        weighted = [("m1:2222", 1.0), ("m2:2222", 3.0)]
        counts = Counter(rank(f"w{i}", weighted)[0] for i in range(4000))
        self.assertLess(abs(counts["m2:2222"] / 4000 - 0.75), 0.03, counts)


class AssignTests(TestCase):
    def test_200_sessions_spread_within_10_percent_of_even_over_3_masters(self) -> None:
        even = len(WORKERS) / 3
        for masters in [MASTERS, *ADDRESS_SETS]:
            counts = assigned(WORKERS, masters)
            for master, _weight in masters:
                self.assertLessEqual(abs(counts[master] - even), 0.1 * even + 1e-9, (master, counts))

    def test_a_session_leaves_its_ranked_first_master_only_if_that_one_is_full(self) -> None:
        for masters in ADDRESS_SETS:
            orders = assign(WORKERS, masters)
            counts = Counter(order[0] for order in orders.values())
            room = {m: capacity(len(WORKERS), 1.0, 3.0, 0.05) for m, _w in masters}
            displaced = [w for w in WORKERS if orders[w][0] != rank(w, masters)[0]]
            for worker in displaced:
                self.assertEqual(counts[rank(worker, masters)[0]], room[rank(worker, masters)[0]])
            self.assertLess(len(displaced), 0.15 * len(WORKERS))
            for worker, order in orders.items():  # the rest of its order as ranked
                self.assertEqual(order[1:], [m for m in rank(worker, masters) if m != order[0]])

    def test_the_orders_depend_only_on_the_names_and_weights(self) -> None:
        shuffled = WORKERS[::-1]
        self.assertEqual(assign(WORKERS, MASTERS), assign(shuffled, MASTERS[::-1]))

    def test_weights_share_sessions_in_proportion(self) -> None:
        workers = [f"w{i}" for i in range(400)]
        counts = assigned(workers, [("m1:2222", 1.0), ("m2:2222", 3.0), ("m3:2222", 2.0)])
        for master, share in (("m1:2222", 400 / 6), ("m2:2222", 200.0), ("m3:2222", 400 / 3)):
            self.assertLessEqual(abs(counts[master] - share), 0.1 * share, counts)

    def test_few_sessions_or_one_master(self) -> None:
        self.assertEqual(assign([], MASTERS), {})
        self.assertEqual(assign(["w"], [("m1:2222", 1.0)]), {"w": ["m1:2222"]})
        for n in range(1, 12):
            counts = assigned([f"w{i}" for i in range(n)], MASTERS)
            self.assertEqual(sum(counts.values()), n)
            self.assertLessEqual(max(counts.values()) - min(counts[m] for m, _w in MASTERS), 2, counts)

    def test_the_launcher_orders_each_sessions_masters_so(self) -> None:
        directory = scratch_dir(self)
        write_private_key(directory / "id_ed25519", generate_ed25519(), "test")
        masters = ADDRESS_SETS[0]
        members = ", ".join(f'"{m}"' for m, _w in masters)
        workers = "".join(f'\n[[worker]]\nname = "{w}"\npassword = "p"\n' for w in WORKERS[:90])
        path = directory / "ssh-worker.toml"
        path.write_text(
            f'[cluster]\nmasters = [{members}]\nhost_key = "SHA256:x"\nidentity = "id_ed25519"\n{workers}'
        )
        from twisted.internet import reactor  # not run: the launcher is never started

        launcher = Launcher(launcher_config.load(path), reactor)
        orders = {s.name: [link.address for link, _port in e.order] for s, e in launcher.rebalancer.placed()}
        self.assertEqual(orders, assign(WORKERS[:90], masters))


CLUSTER = """
[cluster]
name = "gnome"
masters = ["m1.example.org", "m2.example.org:2200", { address = "m3.example.org", weight = 2, pb_port = 9991 }]
host_key = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
identity = "id_ed25519"
keepalive_interval = 10

[[worker]]
name = "libxml2-debian-sid"
password = "s3cret"
"""


class ClusterConfigTests(TestCase):
    def setUp(self) -> None:
        self.path = scratch_dir(self) / "ssh-worker.toml"

    def load(self, text: str) -> launcher_config.LauncherConfig:
        self.path.write_text(textwrap.dedent(text), encoding="utf-8")
        return launcher_config.load(self.path)

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        return str(caught.exception)

    def test_one_table_makes_a_master_per_member_sharing_the_other_keys(self) -> None:
        config = self.load(CLUSTER)
        [cluster] = config.clusters
        self.assertEqual(cluster.name, "gnome")
        self.assertEqual(
            cluster.masters, ("m1.example.org:2222", "m2.example.org:2200", "m3.example.org:2222")
        )
        m1, m2, m3 = config.masters
        self.assertEqual((m2.host, m2.port, m2.cluster), ("m2.example.org", 2200, "gnome"))
        self.assertEqual((m1.weight, m3.weight), (1, 2))
        self.assertEqual((m1.pb_port, m3.pb_port), (9989, 9991))
        self.assertEqual({m.liveness.keepalive_interval for m in config.masters}, {10})
        self.assertEqual({m.identity for m in config.masters}, {self.path.parent / "id_ed25519"})
        [worker] = config.workers
        self.assertEqual(worker.master, "gnome")  # the only target: no master = needed

    def test_a_cluster_and_a_named_master_may_be_mixed(self) -> None:
        text = CLUSTER.replace("[[worker]]", '[[master]]\nname = "solo"\naddress = "solo.example.org"\n'
                               'host_key = "SHA256:x"\nidentity = "id"\n\n[[worker]]', 1)  # fmt: skip
        self.assertIn('say which one with master = "NAME"', self.error(text))
        config = self.load(text.replace('password = "s3cret"', 'password = "s3cret"\nmaster = "solo"'))
        self.assertEqual(config.workers[0].master, "solo")

    def test_bad_members_and_weights_name_the_line_and_the_fault(self) -> None:
        bad = {
            "masters = []": "masters must be a list",
            'masters = ["m1:0"]': "the port must be a number",
            'masters = [{ address = "m1", weight = 0 }]': "the weight of m1 must be a number > 0",
            'masters = [{ address = "m1", colour = "red" }]': 'is not "HOST[:PORT]" or { address = ... }',
            'masters = ["m1", "m1:2222"]': "the same name or address",
        }
        for line, fragment in bad.items():
            text = CLUSTER.replace(CLUSTER.splitlines()[3], line)
            message = self.error(text)
            self.assertIn(fragment, message, line)
            if "same name" not in fragment:
                self.assertIn(f"{self.path}:2: [cluster]", message, line)

    def test_a_cluster_key_of_master_alone_is_refused(self) -> None:
        self.assertIn("unknown key 'address'", self.error(CLUSTER.replace('name = "gnome"', 'address = "m"')))


class FakeLink:
    def __init__(self, address: str, up: bool = True) -> None:
        self.address = address
        self.connection: object | None = object() if up else None
        self.draining = False
        self.tried = True
        self.observers: list[Any] = []


class FakeEndpoint:
    def __init__(self, current: FakeLink, preferred: FakeLink | None) -> None:
        self.current = current
        self._preferred = preferred

    def preferred(self) -> FakeLink | None:
        return self._preferred


class FakeSession:
    def __init__(self, busy: bool = False) -> None:
        self.busy = busy
        self.attached = True
        self.moving = False
        self.moves = 0

    def move(self) -> None:
        self.moving = True
        self.moves += 1


class RebalancerTests(TestCase):
    def setUp(self) -> None:
        self.a, self.b = FakeLink("a:2222"), FakeLink("b:2222")

    def rebalancer(self, pairs: list[tuple[FakeSession, FakeEndpoint]]) -> Rebalancer:
        return Rebalancer(lambda: pairs, Clock())  # type: ignore[arg-type, return-value]

    def test_every_session_of_a_draining_master_moves_busy_or_not(self) -> None:
        self.a.draining = True
        sessions = [FakeSession(busy=i % 2 == 0) for i in range(30)]
        self.rebalancer([(s, FakeEndpoint(self.a, self.b)) for s in sessions]).rebalance()
        self.assertEqual([s.moves for s in sessions], [1] * 30)

    def test_sessions_return_home_idle_ones_only_a_bounded_number_at_a_time(self) -> None:
        sessions = [FakeSession(busy=i < 5) for i in range(30)]
        rebalancer = self.rebalancer([(s, FakeEndpoint(self.b, self.a)) for s in sessions])
        rebalancer.rebalance()
        self.assertEqual(sum(s.moves for s in sessions), Rebalancer.max_moving)
        self.assertEqual(sum(s.moves for s in sessions[:5]), 0, "a busy session was moved")
        rebalancer.rebalance()  # the first ten are still moving: nothing more
        self.assertEqual(sum(s.moves for s in sessions), Rebalancer.max_moving)
        for s in sessions:
            s.moving = False  # they landed
        rebalancer.rebalance()
        self.assertEqual(sum(s.moves for s in sessions), 2 * Rebalancer.max_moving)

    def test_it_ticks_only_while_there_are_cluster_sessions(self) -> None:
        clock, pairs = Clock(), []
        rebalancer = Rebalancer(lambda: pairs, clock)  # type: ignore[arg-type]
        rebalancer.startService()
        self.assertEqual(clock.getDelayedCalls(), [], "a launcher without a cluster keeps a timer")
        session = FakeSession()
        pairs.append((session, FakeEndpoint(self.b, self.a)))
        rebalancer.refresh()
        clock.advance(Rebalancer.interval)
        self.assertEqual(session.moves, 1)
        pairs.clear()
        rebalancer.refresh()
        self.assertEqual(clock.getDelayedCalls(), [])
        pairs.append((FakeSession(), FakeEndpoint(self.a, self.a)))
        rebalancer.refresh()
        rebalancer.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_sessions_where_they_belong_stay(self) -> None:
        sessions = [FakeSession() for _ in range(5)]
        self.rebalancer([(s, FakeEndpoint(self.a, self.a)) for s in sessions]).rebalance()
        self.rebalancer([(s, FakeEndpoint(self.a, None)) for s in sessions]).rebalance()
        self.assertEqual([s.moves for s in sessions], [0] * 5)


class ChoiceTests(TestCase):
    def endpoint(self, links: list[FakeLink], worker: str = "w") -> ClusterEndpoint:
        return ClusterEndpoint([(link, 1.0, 9989) for link in links], worker)  # type: ignore[misc]

    def test_the_first_master_in_the_sessions_order_that_is_up_and_not_draining(self) -> None:
        links = [FakeLink(f"m{i}:2222") for i in range(3)]
        endpoint = self.endpoint(links)
        first, second, third = (link for link, _port in endpoint.order)
        self.assertIs(endpoint.choice(), first)
        first.draining = True
        self.assertIs(endpoint.choice(), second)
        second.connection = None
        self.assertIs(endpoint.choice(), third)

    def test_at_start_it_waits_for_an_earlier_masters_first_dial(self) -> None:
        links = [FakeLink(f"m{i}:2222") for i in range(2)]
        endpoint = self.endpoint(links)
        first, second = (link for link, _port in endpoint.order)
        first.connection, first.tried = None, False
        self.assertIsNone(endpoint.choice(), "took the second master while the first was still dialling")
        first.tried = True  # its dial failed
        self.assertIs(endpoint.choice(), second)
