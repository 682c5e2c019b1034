"""``buildbot-sshmux demo --cluster``: three masters, one killed mid-build; its sessions move, every build green.

Real parts in a fresh temporary directory: a private PostgreSQL server, a
crossbar router and three Buildbot masters (a, b, c: ``twistd`` subprocesses)
in Buildbot's multi-master mode, each with SSHMuxService and the shortened
timers (`cluster.timers`: a heartbeat every 2 s, a master silent for 12 s is
dead).  Two worker hosts run one ``ssh-worker`` each, one session per
project, with a ``[cluster]`` of the three masters; a third host runs stock
buildbot-worker processes over plain PB/TCP to master a, as a site without
buildbot-sshmux would.  One build is forced per (project, host), a step of a
few seconds each; once they all run, master a is killed (SIGKILL).  Its
sessions log in to b and c; its builds, finished as RETRY once a is marked
inactive, run again there.  The stock workers stay detached.  A summary is
printed; the exit status is 0 only if every build ended green and every
session of a re-attached.  A run that fails keeps its directory and names
its logs; ``--keep`` keeps it after a good run too.

Its options are the demo's (`run.parser`, ``--cluster``); `run` is the command.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import os
import stat
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import define, field

from buildbot_sshmux.demo.run import (
    HOSTS,
    Outcome,
    _say,
    build_problem,
    finish,
    first_few,
    project_names,
    table,
)

MASTERS = ("a", "b", "c")
KILLED = "a"
STOCK_HOST = "plain-tcp"
STOCK_WORKERS = 5
STEP_SECONDS = 8
DATABASE = REALM = "buildbot"
REATTACH_TIMEOUT = 60.0
BUILDS_TIMEOUT = 240.0

# Each master: the shortened timers, and a force scheduler that says which host builds.
FORCE_PER_HOST = """
# The demo forces one build per (project, host): the harness's canStartBuild reads worker_host.
from buildbot.plugins import schedulers as _schedulers, util as _util

c["schedulers"].append(
    _schedulers.ForceScheduler(
        name="demo",
        builderNames=[b.name for b in c["builders"]],
        properties=[_util.StringParameter(name="worker_host", default="")],
    )
)
"""

# REST answers that may fail while a master is busy, stopping or killed.
REST_ERRORS = (OSError, http.client.HTTPException, ValueError)


@define
class Figures:
    projects: int = 0
    sessions: int = 0
    startup: dict[str, float] = field(factory=dict)  # what started -> seconds
    before: dict[str, int] = field(factory=dict)  # master -> sessions attached, before the kill
    after: dict[str, int] = field(factory=dict)
    running_on_killed: int = 0  # builds running on the killed master at the kill
    moved: int = 0  # the killed master's sessions
    reattach: list[float] = field(factory=list)  # seconds from the kill, each session that re-attached
    marked_inactive: float | None = None  # seconds from the kill
    green: int = 0
    total: int = 0
    build_seconds: float = 0.0  # from the first build forced to the last request complete
    retried: int = 0  # builds that ended RETRY (the interrupted ones)
    rerun_started: list[float] = field(factory=list)  # seconds from the kill, each interrupted request
    rerun_green: list[float] = field(factory=list)
    rerun_on: dict[str, int] = field(factory=dict)  # master -> interrupted requests it ran again
    stock: int = 0
    stock_before: int = 0
    stock_after: int = 0
    failed: list[str] = field(factory=list)  # "PROJECT on HOST (RESULT)" of each build not green
    not_reattached: list[str] = field(factory=list)


# -- before the directory: what the cluster needs -------------------------------------------


def prepare() -> str | None:
    """Check the Python packages, PostgreSQL and crossbar (running ``.ci/install-cluster`` when
    it is found and they are missing); what is wrong, in one sentence, or None."""
    from buildbot_sshmux.demo.cluster import parts

    packages = parts.missing_python_packages()
    if packages:
        wanted = [
            f"buildbot-www=={_version('buildbot')}" if p == "buildbot-www" and _version("buildbot") else p
            for p in packages
        ]
        return (
            f"the cluster demo needs {' and '.join(packages)} in this Python ({sys.executable}): "
            f"`tox -e demo -- --cluster` installs them, or `pip install {' '.join(wanted)}`"
        )
    unreachable = _unreachable_by_postgres(Path(tempfile.gettempdir()))
    if unreachable is not None:
        return (
            f"PostgreSQL runs as user postgres here (this is root), and it cannot enter {unreachable}: "
            "set TMPDIR to a directory every user can enter, such as /tmp"
        )
    missing = parts.missing_parts()
    if not missing:
        return None
    script = parts.find_install_script()
    if script is None:
        return (
            f"the cluster demo needs PostgreSQL and crossbar, and this machine lacks {'; '.join(missing)}: "
            f"run `{parts.INSTALL_COMMAND}` in a checkout of buildbot-sshmux (it installs both), then this again"
        )
    _say(f"missing {'; '.join(missing)}: running bash {script} (1-2 minutes the first time)")
    done = parts.run_install_script(script, capture=False)
    missing = parts.missing_parts()
    if done.returncode != 0 or missing:
        still = f"; still missing: {'; '.join(missing)}" if missing else ""
        return f"bash {script} exited {done.returncode} (its output is above){still}"
    return None


def _unreachable_by_postgres(directory: Path) -> Path | None:
    """As root, the first of ``directory`` and its parents that others may not enter (the
    demo's PostgreSQL directory is made under it, and the server runs as user postgres)."""
    if os.geteuid() != 0:
        return None
    for path in [directory.resolve(), *directory.resolve().parents]:
        if not path.stat().st_mode & stat.S_IXOTH:
            return path
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the run ---------------------------------------------------------------------------------


def run_cluster_demo(root: Path, projects: Sequence[str]) -> Figures:
    """The scenario, in ``root``; its figures.  Everything it started is stopped when it returns."""
    from buildbot.process.results import RETRY, SUCCESS, statusToString

    from buildbot_sshmux.demo import harness
    from buildbot_sshmux.demo.cluster import parts, timers
    from buildbot_sshmux.demo.cluster.cluster import Cluster
    from buildbot_sshmux.demo.cluster.masters import write_schema_template
    from buildbot_sshmux.demo.cluster.pg import PostgresServer
    from buildbot_sshmux.demo.cluster.router import CrossbarRouter, find_crossbar
    from buildbot_sshmux.demo.cluster.stock import StockWorker, create_all

    bindir, crossbar = parts.postgres_bindir(), find_crossbar()
    if bindir is None or crossbar is None:
        raise RuntimeError(f"missing {'; '.join(parts.missing_parts())}")
    f = Figures(projects=len(projects))
    with contextlib.ExitStack() as stack:
        # PostgreSQL and Buildbot's schema; crossbar.
        began = time.monotonic()
        if os.geteuid() == 0:  # PostgreSQL runs as user postgres: let it through to its directory
            root.chmod(0o711)
        (root / "postgres").mkdir()
        pg = PostgresServer(bindir, root / "postgres")
        stack.callback(pg.stop)
        pg.start()
        write_schema_template(root / "schema", pg.create_database(DATABASE))
        f.startup["PostgreSQL and Buildbot's schema"] = time.monotonic() - began
        began = time.monotonic()
        router = CrossbarRouter(crossbar, root / "crossbar", [REALM])
        stack.callback(router.stop)
        router.start()
        f.startup["crossbar"] = time.monotonic() - began
        _say(f"PostgreSQL on port {pg.port} and crossbar on port {router.port} are running")

        # Three masters.
        cluster = Cluster(root, pg, DATABASE, router, REALM)
        stack.callback(cluster.close)
        cluster.make_site(HOSTS)
        stock_names = [harness.worker_name(p, STOCK_HOST) for p in project_names(STOCK_WORKERS)]
        command = ["sh", "-c", f"echo building $PROJECT on $WORKER; sleep {STEP_SECONDS}"]
        masters = [
            cluster.add_master(
                name,
                projects,
                HOSTS,
                extra_config=timers.snippet() + FORCE_PER_HOST,
                config_args={"command": command, "extra_workers": stock_names},
            )
            for name in MASTERS
        ]
        _say(f"starting {len(masters)} Buildbot masters in {root / 'masters'} ({len(projects)} projects)")
        f.startup[f"{len(masters)} masters"] = cluster.start(*masters, timeout=180)
        by_name = {m.name: m for m in masters}
        killed, survivors = by_name[KILLED], [m for m in masters if m.name != KILLED]
        ids = {m.name: m.masterid() for m in masters}

        # Two ssh-worker hosts with a [cluster] of the three; stock workers to master a.
        names = {h: [harness.worker_name(p, h) for p in projects] for h in HOSTS}
        sessions = [n for h in HOSTS for n in names[h]]
        f.sessions = len(sessions)
        for host in HOSTS:
            cluster.start_launcher(cluster.cluster_launcher_config(host, masters, names[host]))
        stock = [
            StockWorker(root / STOCK_HOST / n, n, harness.WORKER_PASSWORD.format(name=n), killed.pb_port)
            for n in stock_names
        ]
        f.stock = len(stock)
        create_all(stock)
        for stock_worker in stock:
            stack.callback(stock_worker.stop)
            stock_worker.start()
        _say(
            f"started {len(HOSTS)} ssh-worker processes ({len(sessions)} sessions, a [cluster] of "
            f"{len(masters)} masters) and {len(stock)} stock buildbot-workers (plain PB/TCP to master {KILLED})"
        )
        every_master = {ids[m.name]: m.name for m in masters}
        now: dict[str, list[str]] = {}

        def all_attached() -> bool:
            _check_alive(cluster, stock)
            now.update(_sample(masters[0], every_master) or {})
            return all(len(now.get(w, [])) == 1 for w in sessions) and all(
                now.get(w) == [KILLED] for w in stock_names
            )

        attach_s = cluster.wait(all_attached, 120, "every session and stock worker to attach")
        f.before = dict(Counter(now[w][0] for w in sessions))
        f.stock_before = sum(bool(now.get(w)) for w in stock_names)
        shown = ", ".join(f"{m} {f.before.get(m, 0)}" for m in MASTERS)
        _say(f"all attached in {attach_s:.1f}s: sessions per master {shown}; stock workers {f.stock_before}")

        # One build per (project, host); once all run, SIGKILL master a.
        via = survivors[0]
        builderids = {b["name"]: b["builderid"] for b in via.get("builders")["builders"]}
        requests: dict[int, tuple[str, str]] = {}
        forced = time.monotonic()
        for project in projects:
            for host in HOSTS:
                bid = builderids[project]
                _bsid, brids = via.rpc("forceschedulers/demo", "force", builderid=bid, worker_host=host)
                requests[int(brids[str(bid)])] = (project, host)
        f.total = len(requests)
        builds: list[dict[str, Any]] = []

        def all_started() -> bool:
            _check_alive(cluster, stock)
            try:
                builds[:] = via.get("builds")["builds"]
            except REST_ERRORS:
                return False
            return set(requests) <= {b["buildrequestid"] for b in builds}

        cluster.wait(all_started, 120, "every build to start")
        interrupted = {
            b["buildrequestid"] for b in builds if b["masterid"] == ids[KILLED] and not b["complete"]
        }
        f.running_on_killed = len(interrupted)
        moved = [w for w in sessions if now[w] == [KILLED]]
        f.moved = len(moved)
        _say(
            f"{len(requests)} builds running ({f.running_on_killed} on master {KILLED}); "
            f"killing master {KILLED} (SIGKILL)"
        )
        kill = time.monotonic()
        killed.kill()

        # A's sessions re-attach to b and c (the REST API of each, in turn).
        live = {ids[m.name]: m.name for m in survivors}
        seen: dict[str, float] = {}
        turn = 0
        while len(seen) < len(moved) and time.monotonic() - kill < REATTACH_TIMEOUT:
            sample = _sample(survivors[turn % len(survivors)], live)
            turn += 1
            at = time.monotonic() - kill
            for w in moved:
                if sample and sample.get(w):
                    seen.setdefault(w, at)
            time.sleep(0.1)
        f.reattach = sorted(seen.values())
        f.not_reattached = sorted(set(moved) - set(seen))
        _say(
            f"{len(seen)}/{len(moved)} of master {KILLED}'s sessions re-attached"
            + (f", the last {f.reattach[-1]:.1f}s after the kill" if seen else "")
            + f"; waiting for the interrupted builds to run again (after {timers.expiry_seconds():.0f}s)"
        )

        # Every build request completes; the interrupted ones run again on b and c.
        rows: dict[int, dict[str, Any]] = {}
        started_again: dict[int, float] = {}
        again_on: dict[int, str] = {}
        green_again: dict[int, float] = {}
        deadline = time.monotonic() + BUILDS_TIMEOUT
        while time.monotonic() < deadline:
            _check_alive(cluster, stock)
            try:
                answer = via.get("buildrequests")["buildrequests"]
                builds[:] = via.get("builds")["builds"]
                inactive = [m for m in via.get("masters")["masters"] if m["masterid"] == ids[KILLED]]
            except REST_ERRORS:
                time.sleep(0.5)
                continue
            at = time.monotonic() - kill
            if f.marked_inactive is None and inactive and not inactive[0]["active"]:
                f.marked_inactive = at
            rows = {r["buildrequestid"]: r for r in answer if r["buildrequestid"] in requests}
            for b in builds:
                if b["buildrequestid"] in interrupted and b["masterid"] != ids[KILLED]:
                    started_again.setdefault(b["buildrequestid"], at)
                    again_on[b["buildrequestid"]] = every_master[b["masterid"]]
            for brid in interrupted:
                if rows.get(brid, {}).get("complete"):
                    green_again.setdefault(brid, at)
            if len(rows) == len(requests) and all(r["complete"] for r in rows.values()):
                break
            time.sleep(0.5)
        f.build_seconds = time.monotonic() - forced
        f.rerun_started = sorted(started_again.values())
        f.rerun_green = sorted(t for b, t in green_again.items() if rows[b]["results"] == SUCCESS)
        f.rerun_on = dict(sorted(Counter(again_on.values()).items()))
        f.retried = sum(b["results"] == RETRY for b in builds)
        for brid, (project, host) in requests.items():
            row = rows.get(brid, {})
            if not row.get("complete"):
                f.failed.append(f"{project} on {host} (not complete after {BUILDS_TIMEOUT:.0f}s)")
            elif row["results"] != SUCCESS:
                f.failed.append(f"{project} on {host} ({statusToString(row['results'])})")
        f.green = f.total - len(f.failed)

        # After: where the sessions are, and the stock workers (still redialling master a).
        after = _sample(via, live) or {}
        f.after = dict(Counter(after[w][0] for w in sessions if len(after.get(w, [])) == 1))
        f.stock_after = sum(bool(after.get(w)) for w in stock_names)
        _say(f"{f.green}/{f.total} builds green; stopping the cluster")
    return f


def _sample(via: Any, live: dict[int, str]) -> dict[str, list[str]] | None:
    """``via``'s REST ``workers``: each worker's masters (names) among ``live`` (masterid -> name):
    a killed master's rows stay until it is marked inactive.  None if ``via`` did not answer."""
    try:
        rows = via.get("workers")["workers"]
    except REST_ERRORS:
        return None
    return {
        r["name"]: [live[c["masterid"]] for c in r["connected_to"] if c["masterid"] in live] for r in rows
    }


def _check_alive(cluster: Any, stock: Sequence[Any]) -> None:
    for launcher in cluster.launchers:
        if launcher.process.poll() is not None:
            raise RuntimeError(
                f"ssh-worker ({launcher.config.parent.name}) exited with {launcher.process.returncode}; "
                f"the end of its log {launcher.log_path}:\n{launcher.output()[-3000:]}"
            )
    for w in stock:
        if not w.running():
            raise RuntimeError(f"stock worker {w.name} exited\n{w.diagnostics()}")


def attempt(root: Path, projects: Sequence[str]) -> Outcome:
    """`run_cluster_demo`; an exception becomes the outcome's error (its traceback in ROOT/demo.log)."""
    try:
        return Outcome(figures=run_cluster_demo(root, projects))
    except Exception as e:
        with open(root / "demo.log", "a") as log:
            log.write(traceback.format_exc())
        return Outcome(error=(str(e) or type(e).__name__).splitlines()[0])


# -- the summary -------------------------------------------------------------------------------


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.1f}s" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}s"


def summary(f: Figures) -> str:
    from buildbot_sshmux.demo.cluster import timers

    started = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in f.startup.items())
    after = ", ".join(f"{m} {f.after.get(m, 0)}" + (" (killed)" if m == KILLED else "") for m in MASTERS)
    reattach = f"{len(f.reattach)}/{f.moved} of master {KILLED}'s sessions"
    if f.reattach:
        reattach += f", p50 {statistics.median(f.reattach):.1f}s, max {f.reattach[-1]:.1f}s after the kill"
    inactive = f"{f.marked_inactive:.1f}s after the kill" if f.marked_inactive is not None else "not seen"
    on = ", ".join(f"{m} {n}" for m, n in f.rerun_on.items()) or "none"
    rerun = (
        f"{len(f.rerun_green)}/{f.running_on_killed} green ({on}): started {_seconds(f.rerun_started)} "
        f"after the kill, green {_seconds(f.rerun_green)} after"
    )
    rows = [
        ("masters", f"{len(MASTERS)} ({', '.join(MASTERS)}) sharing PostgreSQL and crossbar"),
        (
            "master timers",
            f"heartbeat {timers.HEARTBEAT}s; a master silent {timers.expiry_seconds():.0f}s is marked inactive",
        ),
        ("started", started),
        (
            "worker sessions",
            f"{f.sessions} ({f.projects} projects x {len(HOSTS)} hosts; an ssh-worker per host, "
            f"a [cluster] of {len(MASTERS)})",
        ),
        ("sessions per master before the kill", ", ".join(f"{m} {f.before.get(m, 0)}" for m in MASTERS)),
        (f"master {KILLED} killed (SIGKILL)", f"with {f.running_on_killed} builds running on it"),
        ("sessions per master after", after),
        ("re-attach after the kill", reattach),
        (f"master {KILLED} marked inactive", inactive),
        ("builds green/total", f"{f.green}/{f.total} in {f.build_seconds:.1f}s ({STEP_SECONDS}s step)"),
        ("  interrupted by the kill", f"{f.running_on_killed}; {f.retried} finished RETRY on {KILLED}"),
        ("  run again", rerun),
        (
            f"stock workers (plain PB/TCP to {KILLED})",
            f"{f.stock_before}/{f.stock} attached before the kill, {f.stock_after}/{f.stock} after"
            + (" (they stay detached)" if f.stock and not f.stock_after else ""),
        ),
    ]
    return table("buildbot-sshmux cluster demo summary", rows, 60)


def _problem(outcome: Outcome) -> str | None:
    """What went wrong, or None if every build ended green and every session re-attached."""
    builds = build_problem(outcome)
    f = outcome.figures
    if outcome.error is not None or f is None or not f.total:
        return builds
    problems = [builds] if builds else []
    if f.not_reattached or len(f.reattach) != f.moved:
        problems.append(
            f"{len(f.not_reattached)} of master {KILLED}'s {f.moved} sessions did not re-attach "
            f"within {REATTACH_TIMEOUT:.0f}s: {first_few(f.not_reattached)}"
        )
    if sum(f.after.values()) != f.sessions:
        problems.append(
            f"{f.sessions - sum(f.after.values())} of {f.sessions} sessions not attached at the end"
        )
    return "; ".join(problems) or None


def _logs(root: Path) -> list[str]:
    """The log files a run left in ``root``: the demo's, the masters', the hosts', crossbar's, PostgreSQL's."""
    paths = [
        root / "demo.log",
        *(root / "masters" / m / "twistd.log" for m in MASTERS),
        *(root / h / "ssh-worker.log" for h in HOSTS),
        root / "crossbar" / "crossbar.log",
        root / "postgres" / "postgres.log",
    ]
    logs = [str(p) for p in paths if p.exists()]
    if any((root / STOCK_HOST).glob("*/twistd.log")):
        logs.append(str(root / STOCK_HOST / "*" / "twistd.log"))
    return logs


def report(root: Path, outcome: Outcome, keep: bool) -> int:
    """Print how a run went; delete ``root`` after a good run unless ``keep``; the exit status."""
    return finish(root, outcome, keep, summary, _problem(outcome), _logs(root))


def run(options: argparse.Namespace) -> int:
    """``buildbot-sshmux demo --cluster``, as ``options`` say; the exit status."""
    problem = prepare()
    if problem is not None:
        print(f"buildbot-sshmux demo --cluster: {problem}", file=sys.stderr)
        return 1
    projects = project_names(options.projects)
    root = Path(tempfile.mkdtemp(prefix="sshmux-demo-cluster-"))
    _say(f"demo directory {root} (cluster demo: 3 masters, {len(projects)} projects x {len(HOSTS)} hosts)")
    try:
        outcome = attempt(root, projects)
    except BaseException:
        print(f"demo failed; kept the demo directory {root}", file=sys.stderr)
        raise
    return report(root, outcome, options.keep)
