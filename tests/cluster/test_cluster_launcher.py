"""A launcher's ``[cluster]`` against a real multi-master cluster: spread, a crash, a rolling restart.

Three master processes share one PostgreSQL database and one crossbar realm;
one ``ssh-worker`` launcher runs every worker session of host ``hosta`` with a
``[cluster]`` of the three (each member pinned to its own host key).  Checks:

1. spread: 200 sessions, each attached to the master its placement names
   (`placement.assign`), the three within 10% of an even share;
2. a master SIGKILLed during a build: its sessions re-attach to the survivors
   (to the next master of their own order) within 5 s of the kill (when each
   did: the shared database, polled every 50 ms);
3. throughout, no worker is attached to two live masters at once (`Watch`:
   the REST API of each live master in turn, polled every 0.2 s; and the
   database during the re-attach of 2; rows of a killed master are stale
   and left out);
4. a rolling restart under load (a build forced every 0.5 s): each master in
   turn stops cleanly (SIGUSR1, as ``buildbot stop --clean``) and comes back;
   no build request is lost.

Each test prints ``[figures] NAME: k=v, ...`` (also under "cluster figures"
at the end of the run).  Worker ``pNNN-hosta`` is the one worker of builder
``pNNN`` (the harness's master config: 200 builders and workers per master,
three masters start in ~6 s); every build is one ``sleep`` step as long as
its ``sleep`` property (force scheduler ``timed``).
"""

from __future__ import annotations

import datetime
import http.client
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from buildbot.process.results import RETRY, SUCCESS

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster.cluster import Cluster
from buildbot_sshmux.demo.cluster.masters import ClusterMaster
from buildbot_sshmux.worker.placement import assign, rank

from .conftest import FIGURES

HOST = "hosta"
MASTERS = ("a", "b", "c")

# Every build is one step, `sleep PROPERTY`; force scheduler "timed" sets the property.
TIMED_BUILDS = """
from buildbot.plugins import schedulers as _schedulers, steps as _steps, util as _util

for _builder in c["builders"]:
    _builder.factory = _util.BuildFactory(
        [_steps.ShellCommand(name="sleep", command=["sleep", _util.Interpolate("%(prop:sleep:-0)s")])]
    )
c["schedulers"].append(
    _schedulers.ForceScheduler(
        name="timed",
        builderNames=[b.name for b in c["builders"]],
        properties=[_util.StringParameter(name="sleep", default="0")],
    )
)
"""


def figures(name: str, **values: Any) -> None:
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    line = f"[figures] {name}: {shown}"
    print(line)
    FIGURES.append(line)


def address(master: ClusterMaster) -> str:
    return f"127.0.0.1:{master.ssh_port}"


def orders(workers: Sequence[str], masters: Sequence[ClusterMaster]) -> dict[str, list[str]]:
    """Each worker's order of masters (names), as the launcher orders them (`assign`)."""
    by_address = {address(m): m.name for m in masters}
    members = [(a, 1.0) for a in by_address]
    return {w: [by_address[a] for a in order] for w, order in assign(workers, members).items()}


def ranked_first(workers: Sequence[str], masters: Sequence[ClusterMaster]) -> dict[str, str]:
    """Each worker's first master by rendezvous hashing alone (`rank`)."""
    by_address = {address(m): m.name for m in masters}
    return {w: by_address[rank(w, [(a, 1.0) for a in by_address])[0]] for w in workers}


def start_cluster(cluster: Cluster, projects: Sequence[str]) -> list[ClusterMaster]:
    cluster.make_site([HOST])
    masters = [cluster.add_master(name, projects, extra_config=TIMED_BUILDS) for name in MASTERS]
    cluster.start(*masters, timeout=180)
    return masters


def force(via: ClusterMaster, builder: str, seconds: float) -> int:
    """Force one build of ``builder`` sleeping ``seconds``; its build request id."""
    builderid = via.get("builders", name=builder)["builders"][0]["builderid"]
    _bsid, brids = via.rpc("forceschedulers/timed", "force", builderid=builderid, sleep=str(seconds))
    return int(brids[str(builderid)])


class Watch(threading.Thread):
    """Polls the REST ``workers`` of each live master in turn, every ``interval`` seconds.

    Each answer is a sample: for every worker, the live masters it is
    connected to (``connected_to``, masters whose process runs, checked after
    the answer arrived: a killed master's rows are stale).  A worker connected
    to two live masters in one sample is a violation.
    """

    def __init__(self, masters: Sequence[ClusterMaster], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.masters = list(masters)
        self.ids = {m.name: m.masterid() for m in self.masters}
        self.names = {i: n for n, i in self.ids.items()}
        self.interval = interval
        self.samples = 0
        self.failed_polls = 0
        self.latencies: list[float] = []
        self.violations: list[tuple[float, str, list[str]]] = []
        self.now: dict[str, set[str]] = {}  # worker -> live masters (names), in the last sample
        self.first_on: dict[tuple[str, str], float] = {}  # (worker, master) -> first sample seeing it
        self.changed = threading.Condition()
        self._done = threading.Event()

    def live(self) -> list[ClusterMaster]:
        return [m for m in self.masters if m.running()]

    def run(self) -> None:
        turn = 0
        while not self._done.is_set():
            live = self.live()
            if live:
                via = live[turn % len(live)]
                turn += 1
                self.poll(via)
            self._done.wait(self.interval)

    def poll(self, via: ClusterMaster) -> None:
        began = time.monotonic()
        try:
            rows = via.get("workers")["workers"]
        except (OSError, http.client.HTTPException, ValueError):
            self.failed_polls += 1  # a master stopping or killed meanwhile
            return
        at = time.monotonic()
        alive = {self.ids[m.name] for m in self.live()}
        sample: dict[str, set[str]] = {}
        for row in rows:
            on = {self.names[c["masterid"]] for c in row["connected_to"] if c["masterid"] in alive}
            sample[row["name"]] = on
            if len(on) > 1:
                self.violations.append((at, row["name"], sorted(on)))
            for master in on:
                self.first_on.setdefault((row["name"], master), at)
        with self.changed:
            self.samples += 1
            self.latencies.append(at - began)
            self.now = sample
            self.changed.notify_all()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> float:
        """Wait until ``predicate(self.now)`` holds for a sample; the seconds waited."""
        began = time.monotonic()
        with self.changed:
            while not predicate(self.now):
                left = timeout - (time.monotonic() - began)
                if left <= 0:
                    missing = {w: sorted(on) for w, on in self.now.items()}
                    raise TimeoutError(
                        f"gave up after {timeout:.0f}s waiting for {what}; last sample: {missing}"
                    )
                self.changed.wait(left)
        return time.monotonic() - began

    def placement(self) -> dict[str, str]:
        """Where each worker is attached in the last sample (workers on exactly one live master)."""
        return {w: next(iter(on)) for w, on in self.now.items() if len(on) == 1}

    def stop(self) -> None:
        self._done.set()
        self.join(10)

    def report(self, name: str) -> None:
        figures(
            name,
            samples=self.samples,
            failed_polls=self.failed_polls,
            poll_p50_s=statistics.median(self.latencies) if self.latencies else 0.0,
            poll_max_s=max(self.latencies, default=0.0),
            on_two_live_masters=len(self.violations),
        )


def connected_at(
    cluster: Cluster, wanted: dict[str, int], dead: set[int], timeout: float
) -> tuple[dict[str, float], list[tuple[str, list[int]]]]:
    """Poll the shared database every 50 ms until each worker of ``wanted`` is connected
    to its master (worker -> masterid): when (monotonic) each first was; and each
    worker seen connected to two masters not in ``dead`` (stale rows) at once."""
    sql = "SELECT w.name, c.masterid FROM connected_workers c JOIN workers w ON w.id = c.workerid"
    seen: dict[str, float] = {}
    doubles: list[tuple[str, list[int]]] = []
    began = time.monotonic()
    conn = cluster.pg.connect(cluster.db_name)
    try:
        with conn.cursor() as cursor:
            while len(seen) < len(wanted):
                cursor.execute(sql)
                now = time.monotonic()
                live: dict[str, list[int]] = {}
                for name, masterid in cursor.fetchall():
                    if masterid not in dead:
                        live.setdefault(name, []).append(masterid)
                    if wanted.get(name) == masterid:
                        seen.setdefault(name, now)
                doubles += [(name, ids) for name, ids in live.items() if len(ids) > 1]
                if now - began > timeout:
                    missing = sorted(set(wanted) - set(seen))
                    raise TimeoutError(
                        f"{len(missing)} sessions not re-attached after {timeout:.0f}s: {missing}"
                    )
                time.sleep(0.05)
    finally:
        conn.close()
    return seen, doubles


def logged_within(log: str, text: str, since: float) -> float | None:
    """Seconds from ``since`` (epoch) to the end of the second the launcher logged ``text``
    in (its log has whole seconds): an upper bound on how soon it was logged."""
    for line in log.splitlines():
        if text in line:
            stamp = datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z")
            return stamp.timestamp() + 1 - since
    return None


def moves(cluster: Cluster) -> list[str]:
    return [line for line in cluster.launchers[0].output().splitlines() if "moving from master" in line]


def test_200_sessions_spread_evenly_and_a_killed_masters_sessions_reattach(cluster: Cluster) -> None:
    projects = [f"p{i:03d}" for i in range(200)]
    workers = [T.worker_name(p, HOST) for p in projects]
    masters = start_cluster(cluster, projects)
    by_name = {m.name: m for m in masters}
    order = orders(workers, masters)
    expected = {w: order[w][0] for w in workers}
    by_rank = ranked_first(workers, masters)
    watch = Watch(masters)
    watch.start()
    try:
        # 1. Spread.
        began = time.monotonic()
        cluster.start_launcher(cluster.cluster_launcher_config(HOST, masters, workers))
        attach_s = watch.wait_for(lambda now: len(watch.placement()) == len(workers), 120, "every session")
        placement = watch.placement()
        counts = Counter(placement.values())
        even = len(workers) / len(masters)
        figures(
            "spread",
            sessions=len(placement),
            all_attached_s=time.monotonic() - began,
            **{f"on_{m}": counts[m] for m in MASTERS},
            **{f"rank_alone_{m}": Counter(by_rank.values())[m] for m in MASTERS},
            not_on_rank_first=sum(placement.get(w) != by_rank[w] for w in workers),
            max_off_even_pct=100 * max(abs(counts[m] - even) for m in MASTERS) / even,
            master_start_s=cluster.timings[f"start {'+'.join(MASTERS)}"],
        )
        assert attach_s < 120
        assert placement == expected, {
            w: (placement.get(w), e) for w, e in expected.items() if placement.get(w) != e
        }
        for m in MASTERS:
            assert abs(counts[m] - even) <= 0.1 * even + 1e-9, (m, counts)

        # 2. SIGKILL mid-build: a build sleeping 10 s on one of A's sessions.
        a = by_name["a"]
        on_a = sorted(w for w, m in expected.items() if m == "a")
        busy = on_a[0]
        brid = force(by_name["b"], busy.rsplit("-", 1)[0], 10)

        def step_running() -> bool:
            builds = by_name["b"].get("builds", buildrequestid=brid)["builds"]
            if not builds:
                return False
            steps = by_name["b"].get(f"builds/{builds[0]['buildid']}/steps")["steps"]
            return any(s["name"] == "sleep" and s["started_at"] and not s["complete"] for s in steps)

        cluster.wait(step_running, 30, "the 10 s step to run on a session of master a")
        (build,) = by_name["b"].get("builds", buildrequestid=brid)["builds"]
        assert build["masterid"] == watch.ids["a"], build
        survivors = [m for m in masters if m is not a]
        next_master = {w: next(m for m in order[w] if m != "a") for w in on_a}
        wanted = {w: watch.ids[m] for w, m in next_master.items()}
        killed_at = time.time()
        killed = time.monotonic()
        a.kill()
        seen, doubles = connected_at(cluster, wanted, {watch.ids["a"]}, 60)
        reattach = sorted(t - killed for t in seen.values())
        watch.wait_for(
            lambda now: all(now.get(w) == {next_master[w]} for w in on_a), 30, "a's sessions on the survivors"
        )
        request = by_name["b"].get(f"buildrequests/{brid}")["buildrequests"][0]
        (build,) = by_name["b"].get("builds", buildrequestid=brid)["builds"]  # as the dead master left it
        log = cluster.launchers[0].output()
        figures(
            "sigkill mid-build",
            sessions_moved=len(on_a),
            reattach_p50_s=statistics.median(reattach),
            reattach_max_s=reattach[-1],
            **{f"now_on_{m.name}": Counter(watch.placement().values())[m.name] for m in survivors},
            moves_logged=len(moves(cluster)),
            db_on_two_live_masters=len(doubles),
            lost_logged_within_s=logged_within(log, f"lost connection to master {address(a)}", killed_at),
            interrupted_build_complete=build["complete"],
            interrupted_build_results=build["results"],
            request_complete=request["complete"],
            request_claimed_by_a=request["claimed_by_masterid"] == watch.ids["a"],
        )
        assert f"lost connection to master {address(a)}" in log, log[-3000:]
        assert reattach[-1] <= 5.0, reattach
        assert not doubles, doubles[:20]
        assert len(moves(cluster)) == len(on_a), moves(cluster)
        assert all(on == {expected[w]} for w, on in watch.now.items() if w not in on_a)
    finally:
        watch.stop()
    # 3. Never two masters.
    watch.report("never two masters (spread, sigkill)")
    assert not watch.violations, watch.violations[:20]


class Forcer(threading.Thread):
    """Forces a build every ``interval`` seconds through a live master, builders in turn,
    steps of 1-3 s; never through ``avoid`` (the master being stopped)."""

    def __init__(
        self, masters: Sequence[ClusterMaster], builders: Sequence[str], interval: float = 0.5
    ) -> None:
        super().__init__(daemon=True)
        self.masters = list(masters)
        self.builders = list(builders)
        self.interval = interval
        self.avoid: ClusterMaster | None = None
        self.brids: list[int] = []
        self.errors: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        turn = 0
        while not self._done.wait(self.interval):
            live = [m for m in self.masters if m.running() and m is not self.avoid]
            if not live:
                continue
            via = live[turn % len(live)]
            try:
                self.brids.append(force(via, self.builders[turn % len(self.builders)], 1 + turn % 3))
            except (OSError, http.client.HTTPException, ValueError, RuntimeError) as e:
                self.errors.append(f"{via.name}: {e!r}")
            turn += 1

    def stop(self) -> None:
        self._done.set()
        self.join(15)


def test_rolling_restart_under_load_loses_no_build(cluster: Cluster) -> None:
    projects = [f"q{i:02d}" for i in range(30)]
    workers = [T.worker_name(p, HOST) for p in projects]
    masters = start_cluster(cluster, projects)
    order = orders(workers, masters)
    expected = {w: order[w][0] for w in workers}
    watch = Watch(masters)
    watch.start()
    forcer = Forcer(masters, projects)
    drains: dict[str, float] = {}
    home: dict[str, float] = {}
    busy_at_stop: dict[str, int] = {}
    try:
        cluster.start_launcher(cluster.cluster_launcher_config(HOST, masters, workers))
        watch.wait_for(lambda now: watch.placement() == expected, 60, "every session on its first master")
        forcer.start()
        time.sleep(4)  # builds running on every master

        for master in masters:
            forcer.avoid = master
            masterid = watch.ids[master.name]
            running = master.get("builds", complete="false")["builds"]
            busy_at_stop[master.name] = sum(b["masterid"] == masterid for b in running)
            drains[master.name] = master.stop_clean()
            master.start()
            master.wait_ready(90)
            forcer.avoid = None
            home[master.name] = watch.wait_for(
                lambda now: watch.placement() == expected,
                60,
                f"every session home after {master.name}'s restart",
            )
        time.sleep(2)
        forcer.stop()

        via = masters[0]

        def all_complete() -> bool:
            rows = via.get("buildrequests")["buildrequests"]
            return all(r["complete"] for r in rows)

        cluster.wait(all_complete, 120, "every build request to complete")
    finally:
        forcer.stop()
        watch.stop()
    requests = {r["buildrequestid"]: r for r in via.get("buildrequests")["buildrequests"]}
    builds = via.get("builds")["builds"]
    retries = sum(b["results"] == RETRY for b in builds)
    successes = sum(r["results"] == SUCCESS for r in requests.values())
    lost = sorted(brid for brid, r in requests.items() if not r["complete"] or r["results"] != SUCCESS)
    log = cluster.launchers[0].output()
    figures(
        "rolling restart",
        forced=len(forcer.brids),
        force_errors=len(forcer.errors),
        requests=len(requests),
        successes=successes,
        lost=len(lost),
        retries=retries,
        builds=len(builds),
        **{f"drain_{m}_s": drains[m] for m in MASTERS},
        **{f"busy_at_stop_{m}": busy_at_stop[m] for m in MASTERS},
        **{f"home_after_{m}_s": home[m] for m in MASTERS},
        draining_notices=log.count("is about to stop"),
        moves_logged=len(moves(cluster)),
    )
    watch.report("never two masters (rolling restart)")
    assert not forcer.errors, forcer.errors
    assert set(forcer.brids) <= set(requests), "a forced request is missing"
    assert not lost, [requests[b] for b in lost]
    assert not watch.violations, watch.violations[:20]
