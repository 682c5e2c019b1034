"""One authorization for the cluster: one authorized_hosts file, named by every master.

Three masters (a, b, c) share the database, the mq and one ``authorized_hosts``
(an absolute path outside their basedirs, as on shared storage).  Two worker
hosts run one launcher each, with a ``[[master]]`` table per master: hosta and
hostb each have one worker session on every master.  Then, with the real CLI
run once as a subprocess (``buildbot-sshmux ... --file PATH``, no basedir):

1. two bad lines added to the file (an unknown option; a line that is not
   UTF-8) are reported with file:line by every master; nobody is dropped;
2. ``revoke --host hosta``: every master logs that it dropped hosta and its
   workers detach there, hostb untouched; hosta's redial is refused on every
   master;
3. ``authorize --host hosta``: every master reloads it and hosta's workers
   attach again on every master.

The seconds from the CLI's exit to each master's reaction are the figures.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.demo.cluster.cluster import Cluster
from buildbot_sshmux.demo.cluster.masters import ClusterMaster
from tests.support import host_fingerprint

PROJECTS = ["p1", "p2", "p3"]
HOSTS = ["hosta", "hostb"]
REVOKE_BOUND = 10.0  # reload_interval is 2 s: every master must have acted well within this


def admin(*argv: str) -> str:
    """The real ``buildbot-sshmux`` (the console script of this environment), once; its output."""
    script = Path(sys.executable).with_name("buildbot-sshmux")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "buildbot_sshmux.cli.admin"]
    done = subprocess.run([*command, *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"buildbot-sshmux {' '.join(argv)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def connected_to(master: ClusterMaster, worker: str) -> list[int]:
    """The masterids ``master``'s REST API says ``worker`` is connected to."""
    rows = master.get("workers", name=worker)["workers"]
    return [c["masterid"] for c in rows[0]["connected_to"]] if rows else []


def each_master(
    cluster: Cluster,
    masters: list[ClusterMaster],
    done: Callable[[ClusterMaster], bool],
    what: str,
    since: float | None = None,
) -> dict[str, float]:
    """Poll until ``done(master)`` holds for every master; the seconds each took since ``since``
    (a time.monotonic(); default now), to the next poll (every 0.2 s)."""
    began = time.monotonic() if since is None else since
    took: dict[str, float] = {}

    def all_done() -> bool:
        for master in masters:
            if master.name not in took and done(master):
                took[master.name] = time.monotonic() - began
        return len(took) == len(masters)

    cluster.wait(all_done, 60, f"{what} on every master (so far: {took})")
    return took


def test_one_authorization_for_the_cluster(cluster: Cluster) -> None:
    site = cluster.make_site(HOSTS)
    shared = site.authorized_hosts
    masters = [cluster.add_master(name, PROJECTS) for name in ("a", "b", "c")]
    for master in masters:
        assert shared.is_absolute() and master.basedir not in shared.parents
        assert repr(str(shared)) in (master.basedir / "master.cfg").read_text()
    cluster.start(*masters)

    placement = list(zip(masters, PROJECTS))  # master a runs p1-*, b p2-*, c p3-*
    launchers = {
        host: cluster.start_launcher(
            cluster.launcher_config_masters(host, [(m, [T.worker_name(p, host)]) for m, p in placement])
        )
        for host in HOSTS
    }
    for master, project in placement:
        for host in HOSTS:
            cluster.wait_connected(T.worker_name(project, host), to=master, via=master)
    ids = {m.name: m.masterid() for m in masters}
    fp_a, fp_b = host_fingerprint(site, "hosta"), host_fingerprint(site, "hostb")
    dials_b = launchers["hostb"].output().count("connected to master")
    assert dials_b == len(masters), launchers["hostb"].output()

    # 1. Bad lines, added by hand: reported by every master, nobody dropped.
    lines = len(shared.read_bytes().splitlines())
    with open(shared, "ab") as f:
        f.write(b'host="typo",bogus="1" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA typo\n')
        f.write(b"# h\xf4te de Zo\xe9, en Latin-1\n")
    bad_option, not_utf8 = f"{shared}:{lines + 1}: ", f"{shared}:{lines + 2}: not UTF-8 text"
    began = time.monotonic()
    took = each_master(
        cluster,
        masters,
        lambda m: bad_option in m.log() and "unknown option 'bogus'" in m.log() and not_utf8 in m.log(),
        "the bad lines to be reported",
        since=began,
    )
    cluster.timings["bad lines -> reported by all (slowest)"] = max(took.values())
    for master, project in placement:
        assert "no longer authorized" not in master.log(), master.diagnostics()
        for host in HOSTS:
            worker = T.worker_name(project, host)
            assert connected_to(master, worker) == [ids[master.name]], (master.name, worker)

    # 2. One revoke: hosta is dropped by every master, hostb stays.
    out = admin("revoke", "--file", str(shared), "--host", "hosta")
    revoked_at = time.monotonic()  # the CLI has exited: the file is replaced
    assert f"revoked host hosta ({fp_a})" in out, out
    drop = f"host hosta ({fp_a}) from "

    def dropped(master: ClusterMaster) -> bool:
        return any(
            drop in line and "is no longer authorized; disconnected" in line
            for line in master.log().splitlines()
        )

    def attached(master: ClusterMaster, host: str) -> bool:
        worker = T.worker_name(PROJECTS[masters.index(master)], host)
        return connected_to(master, worker) == [ids[master.name]]

    took = each_master(cluster, masters, dropped, "the drop line for hosta", since=revoked_at)
    detached = each_master(
        cluster, masters, lambda m: not attached(m, "hosta"), "hosta's worker to detach", since=revoked_at
    )
    for name in took:
        cluster.timings[f"revoke -> master {name} logged the drop"] = took[name]
        cluster.timings[f"revoke -> master {name} REST: worker detached"] = detached[name]
    assert max(took.values()) < REVOKE_BOUND, took
    for master in masters:
        drops = [line for line in master.log().splitlines() if "no longer authorized" in line]
        assert len(drops) == 1 and fp_b not in drops[0], (master.name, drops)
        assert attached(master, "hostb"), master.name
    assert launchers["hostb"].output().count("connected to master") == dials_b, "hostb redialled"
    took = each_master(
        cluster,
        masters,
        lambda m: f"refused key {fp_a}" in m.log(),
        "hosta's redial to be refused",
        since=revoked_at,
    )
    cluster.timings["revoke -> hosta's redial refused by all"] = max(took.values())

    # 3. One authorize: hosta logs in to every master again.
    pub = f"{site.identities['hosta']}.pub"  # write_private_key wrote it beside the key
    reloads = f"authorized_hosts {shared} reloaded: 2 hosts"
    before = {m.name: m.log().count(reloads) for m in masters}
    out = admin("authorize", "--file", str(shared), "--host", "hosta", "--workers", "*-hosta", pub)
    authorized_at = time.monotonic()
    assert f"authorized host hosta ({fp_a})" in out, out
    took = each_master(
        cluster,
        masters,
        lambda m: m.log().count(reloads) > before[m.name],
        "the authorization to be reloaded",
        since=authorized_at,
    )
    cluster.timings["authorize -> reloaded by all (slowest)"] = max(took.values())
    took = each_master(
        cluster,
        masters,
        lambda m: attached(m, "hosta"),
        "hosta's worker to attach again",
        since=authorized_at,
    )
    cluster.timings["authorize -> hosta attached on all (backoff)"] = max(took.values())
    for master in masters:  # the bad lines are still there, reported at each reload, and harmless
        assert master.log().count(bad_option) == 3, (master.name, master.log().count(bad_option))
        assert attached(master, "hostb"), master.name
