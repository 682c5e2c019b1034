"""A master killed mid-build: its build request runs again, and succeeds, on the other master.

Two masters with shortened timers (`timers`: heartbeat every 2 s, a master
silent for 12 s is marked inactive; README, "Several masters").  One launcher with a
``[cluster]`` of both attaches the worker to one of them; a build of a few
seconds starts there and that master is killed (SIGKILL) during its step.
The launcher moves the session to the survivor within seconds; the
survivor's heartbeat marks the dead master inactive and Buildbot finishes
its build as RETRY, but leaves its build request claimed (a claim only its
claimer can release).  `OrphanedClaims` on the survivor releases it, and the
request runs again there.
"""

from __future__ import annotations

import time
from pathlib import Path

from buildbot.process.results import RETRY, SUCCESS

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster import timers
from buildbot_sshmux.demo.cluster.cluster import Cluster
from buildbot_sshmux.demo.cluster.masters import ClusterMaster

STEP_SECONDS = 5

# A step of a few seconds that leaves a line per attempt (after the shortened timers).
ATTEMPT_STEP = """
from buildbot.plugins import steps as _steps, util as _util

c["builders"][0].factory = _util.BuildFactory(
    [_steps.ShellCommand(name="build", command=["sh", "-c", "echo attempt >> {mark}; sleep {step}"])]
)
"""


def cluster_launcher_config(cluster: Cluster, host: str, masters: list[ClusterMaster], worker: str) -> Path:
    """``HOST/ssh-worker.toml``: one ``[cluster]`` of these masters, each pinned to its host key."""
    assert cluster.site is not None
    members = ", ".join(f'{{ address = "127.0.0.1:{m.ssh_port}", pb_port = {m.pb_port} }}' for m in masters)
    keys = ", ".join(f'"{m.host_key_line}"' for m in masters)
    text = "\n".join(
        [
            "[cluster]",
            f"masters = [{members}]",
            f"host_key = [{keys}]",
            f'identity = "{cluster.site.identities[host].name}"',
            "",
            "[[worker]]",
            f'name = "{worker}"',
            f'password = "{T.WORKER_PASSWORD.format(name=worker)}"',
            f'basedir = "workers/{worker}"',
        ]
    )
    path = cluster.site.root / host / "ssh-worker.toml"
    path.write_text(text + "\n")
    return path


def attempts(mark: Path) -> int:
    return len(mark.read_text().splitlines()) if mark.exists() else 0


def test_build_interrupted_by_a_killed_master_runs_again_on_the_other(cluster: Cluster) -> None:
    cluster.make_site(["hosta"])
    mark = cluster.root / "attempts"
    extra = timers.snippet() + ATTEMPT_STEP.format(mark=mark, step=STEP_SECONDS)
    a = cluster.add_master("a", ["proj"], extra_config=extra)
    b = cluster.add_master("b", ["proj"], extra_config=extra)
    cluster.start(a, b)
    worker = T.worker_name("proj", "hosta")
    cluster.start_launcher(cluster_launcher_config(cluster, "hosta", [a, b], worker))
    by_id = {a.masterid(): a, b.masterid(): b}
    where: list[int] = []

    def attached() -> bool:
        rows = a.get("workers", name=worker)["workers"]
        where[:] = [c["masterid"] for c in rows[0]["connected_to"]] if rows else []
        return len(where) == 1

    cluster.wait(attached, 60, f"{worker} to attach to a master")
    doomed_id = where[0]
    doomed = by_id[doomed_id]
    survivor = b if doomed is a else a

    brid = cluster.force_build(via=survivor, builder="proj")
    cluster.wait(lambda: attempts(mark) == 1, 60, "the build's step to start")
    killed = time.monotonic()
    doomed.kill()

    def inactive() -> bool:
        rows = cluster.pg.query(cluster.db_name, "SELECT active FROM masters WHERE id = %s", [doomed_id])
        return not rows[0][0]

    cluster.wait(inactive, 60, "the dead master to be marked inactive")
    cluster.timings["kill, dead master marked inactive"] = time.monotonic() - killed

    def released() -> bool:
        sql = "SELECT masterid FROM buildrequest_claims WHERE brid = %s"
        return cluster.pg.query(cluster.db_name, sql, [brid]) != [(doomed_id,)]

    cluster.wait(released, 60, f"the dead master's claim on build request {brid} to be released")
    cluster.timings["kill, build request released"] = time.monotonic() - killed
    request = cluster.wait_request(via=survivor, brid=brid, timeout=90)
    took = time.monotonic() - killed
    cluster.timings["kill, re-run build's success"] = took
    print(f"[figures] seconds from kill to the re-run build's success: {took:.1f}")

    assert request["results"] == SUCCESS, (request, cluster.diagnostics())
    assert request["claimed_by_masterid"] == survivor.masterid(), request
    assert attempts(mark) == 2, mark.read_text()
    builds = sorted(survivor.get("builds", buildrequestid=brid)["builds"], key=lambda b: b["buildid"])
    assert [(x["masterid"], x["results"]) for x in builds] == [
        (doomed_id, RETRY),
        (survivor.masterid(), SUCCESS),
    ], builds
    # The survivor said so, once; both masters run with the shortened timers.
    lines = [line for line in survivor.log().splitlines() if "released 1 build request of inactive" in line]
    assert len(lines) == 1 and f"(id {doomed_id}): {brid};" in lines[0], lines
    for master in (a, b):
        assert "marked inactive 12 s after its last heartbeat (every 2 s)" in master.log(), master.name
