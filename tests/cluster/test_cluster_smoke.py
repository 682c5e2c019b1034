"""Two masters, one database, one message queue: a build forced on one runs on the other's worker.

Master A and master B share a PostgreSQL database and a crossbar realm.  One
``ssh-worker`` launcher attaches a worker session to A over SSH; a build forced
through B's REST API is written to the shared database by B, announced on the
shared mq, claimed by A and run on the worker attached to A.
"""

from __future__ import annotations

import time

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster.cluster import Cluster
from tests.support import host_fingerprint


def test_build_forced_on_b_runs_on_worker_attached_to_a(cluster: Cluster) -> None:
    site = cluster.make_site(["hosta"])
    a = cluster.add_master("a", ["proj"])
    b = cluster.add_master("b", ["proj"])
    cluster.start(a, b)

    # Each master sees the other as active: the shared table, and each REST API.
    active = cluster.active_masters()
    assert len(active) == 2 and all(active.values()), active
    for via in (a, b):
        shown = {m["masterid"]: m["active"] for m in via.get("masters")["masters"]}
        assert shown == {a.masterid(): True, b.masterid(): True}, (via.name, shown)

    worker = T.worker_name("proj", "hosta")
    began = time.monotonic()
    cluster.start_launcher(cluster.launcher_config("hosta", a, [worker]))
    cluster.wait_connected(worker, to=a, via=b)
    cluster.timings["worker attach to A, seen from B"] = time.monotonic() - began
    assert host_fingerprint(site, "hosta") in a.log(), "A's log names the host that logged in"

    began = time.monotonic()
    brid = cluster.force_build(via=b, builder="proj")
    request = cluster.wait_request(via=b, brid=brid)
    cluster.timings["build forced on B, complete"] = time.monotonic() - began
    assert request["results"] == 0, (request, cluster.diagnostics())
    assert request["claimed_by_masterid"] == a.masterid(), request
    (build,) = b.get("builds", buildrequestid=brid)["builds"]
    workers = {w["workerid"]: w["name"] for w in b.get("workers")["workers"]}
    assert (build["masterid"], workers[build["workerid"]]) == (a.masterid(), worker), build
