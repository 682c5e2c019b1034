"""Run every workload over every transport, side by side, and print one table.

    python -m benchmarks [--json FILE] [--plot FILE.png] [--reps 3] ...
    tox -e bench -- --json bench.json

Transports: (a) plain PB/TCP, (b) buildbot-sshmux, (c) a stock OpenSSH
``ssh -N -L`` tunnel through a private sshd (skipped, with a notice, if
sshd is absent).  Each measurement runs in fresh processes: the master side
(benchmarks.workloads) and the worker side (benchmarks.loadgen, or
``ssh-worker``).  Figures are medians of ``--reps`` runs; the ratio columns
are sshmux / plain and sshmux / OpenSSH (the "better" column says which way
is good), and the issue's targets are checked below the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import MiB, median, openssh_missing, python_env
from buildbot_sshmux.wire.channel import FlowLimits

TRANSPORTS = ("plain", "sshmux", "openssh")
TITLES = {"plain": "plain PB", "sshmux": "sshmux", "openssh": "OpenSSH"}
COLORS = {"plain": "C0", "sshmux": "C1", "openssh": "C2"}
"""Each transport's colour in the plot (matplotlib's first three)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="write every figure (and the table's rows) as JSON")
    p.add_argument("--plot", metavar="PNG", help="plot attach time and bulk throughput (needs matplotlib)")
    p.add_argument(
        "--workloads",
        default="bulk,wan,fairness,memory,attach,e2e,scale",
        help="comma-separated: bulk, wan, fairness, memory, attach, e2e, scale, profile (default: all but profile)",
    )
    p.add_argument(
        "--transports", default=",".join(TRANSPORTS), help="comma-separated: plain, sshmux, openssh"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions; the table shows medians (default 3)")
    p.add_argument(
        "--bulk-mib",
        type=int,
        default=1024,
        help="MiB sent per bulk run, split across channels (default 1024)",
    )
    p.add_argument("--channels", default="1,10,100", help="bulk channel counts (default 1,10,100)")
    p.add_argument(
        "--wan-rtt-ms", type=float, default=20.0, help="round trip of the wan workload's link (default 20)"
    )
    p.add_argument("--wan-mib", type=int, default=64, help="MiB sent per wan run (default 64)")
    p.add_argument(
        "--profile-channels", type=int, default=1, help="channels of the profiled bulk run (default 1)"
    )
    p.add_argument("--sessions", default="50,200,1000,2000", help="attach sizes (default 50,200,1000,2000)")
    p.add_argument(
        "--attach-reps-upto", type=int, default=200, help="attach sizes above this run once (default 200)"
    )
    p.add_argument(
        "--attach-timeout", type=float, default=30.0, help="seconds to wait for all sessions (default 30)"
    )
    p.add_argument(
        "--attach-default-sessions",
        default="200,1000",
        help="attach sizes run again with Twisted's default listen backlog, 50 (plain and OpenSSH; default 200,1000)",
    )
    p.add_argument(
        "--attach-default-timeout",
        type=float,
        default=15.0,
        help="seconds to wait for all sessions with the default backlog (default 15)",
    )
    p.add_argument(
        "--e2e-mib",
        type=int,
        default=64,
        help="MiB per e2e round (upload or log), split across its builds (default 64)",
    )
    p.add_argument(
        "--e2e-sessions", default="1,10", help="e2e builds running at once, one per session (default 1,10)"
    )
    p.add_argument("--scale-hosts", type=int, default=50, help="scale: worker hosts (default 50)")
    p.add_argument(
        "--scale-sessions-per-host", type=int, default=200, help="scale: sessions per host (default 200)"
    )
    p.add_argument(
        "--scale-timeout",
        type=float,
        default=60.0,
        help="scale: seconds until an attach counts as timed out (default 60; the next phases wait up to 4x)",
    )
    p.add_argument(
        "--scale-idle-seconds", type=float, default=6.0, help="scale: each idle window, seconds (default 6)"
    )
    p.add_argument(
        "--scale-idle-k",
        type=int,
        default=60,
        help="scale: keepalives this many times as frequent (default 60)",
    )
    p.add_argument(
        "--scale-plain-restart",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="scale: restart the plain PB master too (about 2 more minutes at 10,000 sessions; default: no)",
    )
    p.add_argument(
        "--scale-profile",
        action="store_true",
        help="scale: one more sshmux attach, the master under cProfile; print its top functions",
    )
    p.add_argument(
        "--scale-buildbot-prioritizer",
        action="store_true",
        help="scale: keep Buildbot's default prioritizeBuilders (after a large attach it stays busy for minutes)",
    )
    p.add_argument(
        "--db-url",
        default="sqlite://",
        help="the attach and e2e master's database (default: sqlite in memory: disk syncs would hide the transport)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, keys, configs)")
    return p.parse_args(argv)


def environment() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    try:
        openssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.split(
            ","
        )[0]
    except OSError:
        openssh = "absent"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "buildbot": version("buildbot"),
        "buildbot_worker": version("buildbot-worker"),
        "cryptography": version("cryptography"),
        "openssh": openssh,
    }


class Runner:
    """Runs one workload over one transport in a fresh process; keeps what it says."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0
        self.errors: list[str] = []
        self.started = time.monotonic()

    def __call__(self, workload: str, transport: str, limit: float, **params: Any) -> dict[str, Any]:
        """Figures of one run, or {"error": ...} if it failed or gave no answer in ``limit`` seconds."""
        self.count += 1
        root = self.root / f"{self.count:03d}-{workload}-{transport}"
        params.update(workload=workload, transport=transport, root=str(root))
        what = f"{workload} over {TITLES[transport]}"
        if "sessions" in params:
            what += f", {params['sessions']} sessions"
        if "backlog" in params:
            what += f", backlog {params['backlog'] or 'default'}"
        if "hosts" in params:
            what += f", {params['hosts']} hosts x {params['per_host']} sessions, {'+'.join(params['phases'])}"
            what += ", profiled" if params.get("profile") else ""
        print(f"[{time.monotonic() - self.started:6.1f}s] {what}", flush=True)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.workloads", json.dumps(params)],
                env=python_env(), capture_output=True, text=True, timeout=limit, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            error = f"no answer in {limit:.0f}s"
        else:
            if done.returncode == 0:
                return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
            error = (done.stderr or done.stdout)[-2000:]
        print(f"    FAILED: {error}", flush=True)
        self.errors.append(what)
        return {"error": error}


# --- the workloads, as the runner sees them ---------------------------------


def run_bulk(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    channels = [int(c) for c in args.channels.split(",")]
    return {
        t: run("bulk", t, 600, channels=channels, bytes=args.bulk_mib * MiB, reps=args.reps)
        for t in transports
    }


def run_wan(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    """bulk, through a relay that delays every byte by half the RTT each way."""
    params = {"channels": [1, 10], "bytes": args.wan_mib * MiB, "reps": args.reps, "rtt_ms": args.wan_rtt_ms}
    return {t: {**run("bulk", t, 600, **params), "rtt_ms": args.wan_rtt_ms} for t in transports}


FAIRNESS = {"channels": 10, "seconds": 3.0, "warmup": 0.5, "gap": 0.005, "timeout": 5.0}
STALL = {"channels": 64, "bytes": 6 * MiB, "hold": 1.5}


def run_fairness(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    return {t: run("fairness", t, 300, reps=args.reps, loadgen=FAIRNESS) for t in transports}


def run_memory(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    # One run per process: a process's peak RSS is only clean once.
    return {t: [run("memory", t, 120, loadgen=STALL) for _ in range(args.reps)] for t in transports}


def run_attach(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    """Every size with a fair listen backlog (N); some again with Twisted's default (50), as users meet it.

    sshmux's one connection needs no deep queue: it runs with the fair backlog only.
    """
    sizes = [int(s) for s in args.sessions.split(",")]
    default_sizes = [int(s) for s in args.attach_default_sessions.split(",") if s]
    return {
        "fair": attach_sizes(run, args, transports, sizes, True, args.attach_timeout),
        "default_backlog": attach_sizes(run, args, [t for t in transports if t != "sshmux"], default_sizes,
                                        False, args.attach_default_timeout, reps=1),
    }  # fmt: skip


def attach_sizes(
    run: Runner,
    args: argparse.Namespace,
    transports: list[str],
    sizes: list[int],
    fair: bool,
    timeout: float,
    reps: int | None = None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{transport: {sessions: runs}}; a transport that timed out at one size skips the larger ones.

    Sizes up to --attach-reps-upto run ``reps`` times (default --reps), larger ones once.
    """
    results: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in transports}
    gave_up: dict[str, int] = {}
    for n in sizes:
        for t, at in gave_up.items():
            results[t][str(n)] = [{"skipped": f"timed out at {at}"}]
        for _rep in range((reps or args.reps) if n <= args.attach_reps_upto else 1):
            for t in transports:
                if t not in gave_up:
                    figures = run("attach", t, timeout + 120, sessions=n, timeout=timeout, db_url=args.db_url,
                                  backlog=n if fair else None)  # fmt: skip
                    results[t].setdefault(str(n), []).append(figures)
        for t in transports:
            if t not in gave_up and attach_seconds(results[t][str(n)]) == INF:
                gave_up[t] = n
                print(f"    {TITLES[t]}: not all {n} sessions attached in {timeout:g}s; no larger sizes")
    return results


INF = float("inf")


def attach_seconds(runs: list[dict[str, Any]]) -> float | None:
    """Median seconds to all attached, a run that timed out counting as infinity."""
    return median([INF if f.get("seconds") is None else f["seconds"] for f in runs if "attached" in f])


def run_e2e(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    sessions = [int(s) for s in args.e2e_sessions.split(",")]
    # A round may take 0.5 s per MiB (the OpenSSH tunnel moves one FileUpload at ~6 MB/s).
    round_timeout = max(120.0, args.e2e_mib * 0.5)
    limit = 300 + args.reps * len(sessions) * len(E2E_KINDS) * args.e2e_mib * 0.5
    return {
        t: run(
            "e2e",
            t,
            limit,
            sessions=sessions,
            bytes=args.e2e_mib * MiB,
            reps=args.reps,
            db_url=args.db_url,
            timeout=args.attach_timeout,
            round_timeout=round_timeout,
        )
        for t in transports
    }


E2E_KINDS = {"upload": "FileUpload", "log": "stdout log"}


def e2e_rounds(results: dict[str, Any]) -> dict[str, dict[str, dict[str, list[dict[str, Any]]]]]:
    """{kind: {sessions: {transport: rounds}}} of the e2e workload."""
    out: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for t, r in results.get("e2e", {}).items():
        for kind, by_n in r.get("runs", {}).items():
            for n, rounds in by_n.items():
                if rounds:
                    out.setdefault(kind, {}).setdefault(n, {})[t] = rounds
    return out


def run_scale(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    """Many hosts to one master, plain PB and sshmux (the OpenSSH tunnel has no part in it)."""
    params: dict[str, Any] = {
        "hosts": args.scale_hosts,
        "per_host": args.scale_sessions_per_host,
        "timeout": args.scale_timeout,
        "wait_limit": 4 * args.scale_timeout,
        "phases": ["attach", "restart", "idle"],
        "db_url": "sqlite://",
        "keep_builder_order": not args.scale_buildbot_prioritizer,
        "idle_seconds": args.scale_idle_seconds,
        "idle_k": args.scale_idle_k,
        "idle_settle": 1.0,
    }
    limit = 300 + 12 * args.scale_timeout
    out: dict[str, Any] = {"params": params, "runs": {}}
    for t in transports:
        if t == "openssh":
            continue
        phases = [
            ph for ph in params["phases"] if ph != "restart" or t != "plain" or args.scale_plain_restart
        ]
        out["runs"][t] = {**run("scale", t, limit, **{**params, "phases": phases}), "phases": phases}
    if args.scale_profile:
        path = run.root / "scale-profile.master"
        profiled = {**params, "phases": ["attach"], "profile": str(path), "timeout": 3 * args.scale_timeout}
        out["profile"] = {"figures": run("scale", "sshmux", limit, **profiled)}
        if path.exists():
            out["profile"].update(profile_report(path))
    return out


PACKAGES = ("buildbot_sshmux", "buildbot_worker", "buildbot", "twisted/spread", "twisted/conch", "twisted",
            "sqlalchemy", "cryptography")  # fmt: skip
EPOLL_WAIT = "<method 'poll' of 'select.epoll' objects>"


def scale_profile_text(profiled: dict[str, Any]) -> str:
    """The profiled scale attach: the master's time by package, then its top functions."""
    f = profiled["figures"].get("attach", {})
    shares, total = profiled["shares"], sum(profiled["shares"].values())
    lines = [
        f"\nprofile, sshmux scale attach ({profiled['figures'].get('sessions')} sessions, under cProfile:"
        f" {f.get('all_after') or 0:.1f} s), the master's main thread; besides it, its other threads (the database)"
        f" used {f.get('master_cpu_other_threads', 0):.1f} CPU s, and it waited {profiled['epoll_wait']:.1f} s in"
        " epoll. Own time by package (a builtin's goes to its caller's; cProfile's cost per call inflates"
        " code of many small calls the most, e.g. Buildbot's SimpleMQ matching each event against every"
        " consumer):",
        *(f"  {name:24s} {secs:8.2f} s  {secs / total:6.1%}" for name, secs in shares.items()),
        profiled["top"],
    ]
    return "\n".join(lines)


def package(path: str) -> str:
    return next((name for name in PACKAGES if f"/{name}/" in path), "other (stdlib, ...)")


def profile_report(path: Path) -> dict[str, Any]:
    """A profile's own time by package (a builtin's goes to its callers'; waiting in epoll apart), and its top."""
    stats = pstats.Stats(str(path))
    shares: dict[str, float] = {}
    waiting = 0.0
    for (where, _line, func), (_cc, _nc, tottime, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func == EPOLL_WAIT:
            waiting += tottime
        elif where != "~":
            shares[package(where)] = shares.get(package(where), 0.0) + tottime
        else:
            for (caller, _l, _f), (_c, _n, caller_tottime, _t) in callers.items():
                name = "builtins" if caller == "~" else package(caller)
                shares[name] = shares.get(name, 0.0) + caller_tottime
    text = Path(f"{path}.txt")
    with open(text, "w") as f:
        top = pstats.Stats(str(path), stream=f).strip_dirs()
        top.sort_stats("cumulative").print_stats(25)
        top.sort_stats("tottime").print_stats(15)
    return {"shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])), "epoll_wait": waiting,
            "top": text.read_text()}  # fmt: skip


def run_profile(run: Runner, args: argparse.Namespace, transports: list[str]) -> dict[str, Any]:
    """One change's measure: sshmux bulk unprofiled (medians of --reps), then
    cProfile on both sides of one more run; Python calls per packet."""
    prefix = str(run.root / "profile")
    channels = [args.profile_channels]
    size = args.bulk_mib * MiB
    plain = run("bulk", "sshmux", 300, channels=channels, bytes=size, reps=args.reps)
    profiled = run("bulk", "sshmux", 300, channels=channels, bytes=size, reps=1, profile=prefix)
    tops, calls = {}, {}
    packets = size / FlowLimits().max_packet
    for side in ("master", "worker"):
        path = f"{prefix}.{side}"
        if not Path(path).exists():
            continue
        out = Path(f"{path}.txt")
        with open(out, "w") as f:
            stats = pstats.Stats(path, stream=f).strip_dirs()
            calls[side] = stats.total_calls / packets  # type: ignore[attr-defined]
            stats.sort_stats("cumulative").print_stats(15)
            stats.sort_stats("tottime").print_stats(25)
        tops[side] = out.read_text()
    return {"bulk": plain, "profiled": profiled, "pstats": tops, "calls_per_packet": calls}


# --- the table ---------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def med(runs: list[dict[str, Any]], key: str, scale: float = 1.0) -> float | None:
    values = [r[key] * scale for r in runs if r.get(key) is not None]
    return median(values) if values else None


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: {name, better, plain, sshmux, openssh}; a cell is a number, text or None."""
    out: list[dict[str, Any]] = []

    def row(name: str, better: str, cells: dict[str, Any]) -> None:
        out.append({"name": name, "better": better, **cells})

    bulk = {t: r for t, r in results.get("bulk", {}).items() if "runs" in r}
    for n in next(iter(bulk.values()), {}).get("runs", {}):
        row(
            f"bulk, {n} ch, MB/s (aggregate)",
            "higher",
            {t: med(r["runs"][n], "mb_per_s") for t, r in bulk.items()},
        )
    for side in ("master", "worker"):
        for n in next(iter(bulk.values()), {}).get("runs", {}):
            row(f"bulk, {n} ch, {side} CPU s/GB", "lower",
                {t: med(r["runs"][n], f"{side}_cpu_s_per_gb") for t, r in bulk.items()})  # fmt: skip

    wan = {t: r for t, r in results.get("wan", {}).items() if "runs" in r}
    for n in next(iter(wan.values()), {}).get("runs", {}):
        rtt = next(iter(wan.values()))["rtt_ms"]
        row(
            f"bulk over a {rtt:g} ms RTT link, {n} ch, MB/s",
            "higher",
            {t: med(r["runs"][n], "mb_per_s") for t, r in wan.items()},
        )

    fair = {t: r["runs"] for t, r in results.get("fairness", {}).items() if "runs" in r}
    if fair:
        row("small PB call RTT, idle, p50 ms", "lower", {t: med(r, "idle_p50", 1e3) for t, r in fair.items()})
        row(
            "small call RTT, 10 bulk ch, p50 ms",
            "lower",
            {t: med(r, "busy_p50", 1e3) for t, r in fair.items()},
        )
        row(
            "small call RTT, 10 bulk ch, p99 ms",
            "lower",
            {t: med(r, "busy_p99", 1e3) for t, r in fair.items()},
        )
        row(
            "  bulk meanwhile, MB/s (aggregate)",
            "higher",
            {t: med(r, "bulk_mb_per_s") for t, r in fair.items()},
        )

    mem = {t: [r for r in runs if "peak_growth" in r] for t, runs in results.get("memory", {}).items()}
    if any(mem.values()):
        budget = next(r["budget"] for runs in mem.values() for r in runs) / MiB
        row(f"stalled peer: master peak RSS +MiB (budget {budget:.0f})", "lower",
            {t: med(r, "peak_growth", 1 / MiB) for t, r in mem.items()})  # fmt: skip

    attach = results.get("attach", {}).get("fair", {})
    default = results.get("attach", {}).get("default_backlog", {})
    sizes = sorted({int(n) for by_n in attach.values() for n in by_n})
    for n in sizes:
        runs = {t: [f for f in by_n.get(str(n), []) if "attached" in f] for t, by_n in attach.items()}
        row(f"attach {n} sessions, s (fair backlog)", "lower", attach_cells(attach, n))
        if any(str(n) in by_n for by_n in default.values()):
            row(f"attach {n} sessions, s (default backlog 50)", "lower", attach_cells(default, n))
        row(f"  master open fds after ({n})", "lower", {t: med(r, "master_fds") for t, r in runs.items()})
        row(
            f"  master RSS after, MiB ({n})",
            "lower",
            {t: med(r, "master_rss", 1 / MiB) for t, r in runs.items()},
        )
        row(f"  worker side RSS/session, KiB ({n})", "lower",
            {t: median([f["worker_rss"] / 1024 / n for f in r]) for t, r in runs.items()})  # fmt: skip
    if len(sizes) >= 2:
        a, b = sizes[:2]

        def slope(by_n: dict[str, list[dict[str, Any]]]) -> float | None:
            rss = [med([f for f in by_n.get(str(k), []) if "worker_rss" in f], "worker_rss") for k in (a, b)]
            return None if None in rss else (rss[1] - rss[0]) / 1024 / (b - a)  # type: ignore[operator]

        row(f"worker side RSS per added session, KiB ({a}->{b})", "lower",
            {t: slope(by_n) for t, by_n in attach.items()})  # fmt: skip

    scale_rows(results.get("scale", {}), row)

    e2e = e2e_rounds(results)
    for key, what, better in (
        ("mb_per_s", "MB/s", "higher"),
        ("master_cpu_s_per_gb", "master CPU s/GB", "lower"),
    ):
        for kind, by_n in e2e.items():
            for n, by_t in by_n.items():
                figures: dict[str, Any] = {}
                for t, rounds in by_t.items():
                    failed = sum(1 for f in rounds if "error" in f)
                    figures[t] = f"FAILED {failed}/{len(rounds)}" if failed else med(rounds, key)
                sessions = f"{n} session{'s' if n != '1' else ''}"
                aggregate = " (aggregate)" if n != "1" and key == "mb_per_s" else ""
                row(f"e2e {E2E_KINDS.get(kind, kind)}, {sessions}, {what}{aggregate}", better, figures)
    return out


def scale_rows(scale: dict[str, Any], row: Any) -> None:
    """The scale workload's rows: attach, restart, idle hour; plain and sshmux."""
    runs, params = scale.get("runs", {}), scale.get("params", {})
    if not runs:
        return
    n = params["hosts"] * params["per_host"]

    def cells(phase: str, key: str = "seconds", scale_by: float = 1.0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t, f in runs.items():
            figures = f.get(phase)
            if "skipped" in f or "error" in f:
                out[t] = f"skipped: {f['skipped']}" if "skipped" in f else "error"
            elif figures is None:
                out[t] = "not run" if phase not in f.get("phases", [phase]) else "skipped: no full attach"
            elif key in ("seconds", "from_start", "from_stop") and figures["seconds"] is None:
                out[t] = f"t/o {figures['attached']}/{n} @{figures['waited']:.0f}s"
            elif figures.get(key) is not None:
                out[t] = figures[key] * scale_by
        return out

    row(f"scale: attach {n} sessions ({params['hosts']} hosts), s", "lower", cells("attach"))
    row("  master CPU s during the attach", "lower", cells("attach", "master_cpu"))
    row("  of it, threads but the main one (database)", "lower", cells("attach", "master_cpu_other_threads"))
    row("  master RSS after, MiB", "lower", cells("attach", "master_rss", 1 / MiB))
    row("  master open fds after", "lower", cells("attach", "master_fds"))
    row("  worker side CPU s during the attach (all hosts)", "lower", cells("attach", "worker_cpu"))
    row("  worker side RSS/session, KiB", "lower", cells("attach", "worker_rss", 1 / 1024 / n))
    row("scale: master restart, stop, s", "lower", cells("restart", "stop_seconds"))
    row("  all attached again, s from the new master's start", "lower", cells("restart", "from_start"))
    row("  all attached again, s from the stop", "lower", cells("restart", "from_stop"))
    for side, what in (("master", "master"), ("worker", "worker side")):
        total, fixed = {}, {}
        for t, f in runs.items():
            if f.get("idle"):
                total[t], fixed[t] = idle_hour(f["idle"], side, n)
        row(f"idle hour: {what} CPU s per 1000 sessions", "lower", total)
        row("  of it, fixed-period timers", "lower", fixed)


def idle_hour(idle: dict[str, Any], side: str, n: int) -> tuple[float, float]:
    """CPU seconds an idle hour costs per 1000 sessions, and the part of it with fixed periods.

    The first window (T s) runs at real periods: fixed-period timers run, no PB keepalive is due yet;
    the second, with every keepalive K times as frequent, adds K times their cost.
    """
    seconds, k = idle["seconds"], idle["k"]
    fixed = idle[f"{side}_cpu"] * 3600 / seconds
    keepalives = (idle[f"{side}_cpu_compressed"] - idle[f"{side}_cpu"]) * 3600 / (k * seconds)
    return (fixed + keepalives) * 1000 / n, fixed * 1000 / n


def attach_cells(attach: dict[str, dict[str, list[dict[str, Any]]]], n: int) -> dict[str, Any]:
    """Each transport's median seconds for ``n`` sessions, or why there is none."""
    cells: dict[str, Any] = {}
    for t, by_n in attach.items():
        if str(n) not in by_n:
            continue
        r = [f for f in by_n[str(n)] if "attached" in f]
        seconds = attach_seconds(r)
        skipped = [f["skipped"] for f in by_n[str(n)] if "skipped" in f]
        if skipped:
            cells[t] = f"skipped: {skipped[0]}"
        elif not r:
            cells[t] = "error"
        elif seconds == INF:
            worst = min(r, key=lambda f: f["attached"])
            cells[t] = f"t/o {worst['attached']}/{n} @{worst['waited']:.0f}s"
        else:
            cells[t] = seconds
    return cells


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "-"
    return f"{a / b:.2f}x"


def table(env: dict[str, Any], table_rows: list[dict[str, Any]], notes: list[str]) -> str:
    header = ["workload", "better", "plain PB", "sshmux", "OpenSSH", "sshmux/plain", "sshmux/OpenSSH"]
    lines = [
        [r["name"], r["better"], fmt(r.get("plain")), fmt(r.get("sshmux")), fmt(r.get("openssh")),
         ratio(r.get("sshmux"), r.get("plain")), ratio(r.get("sshmux"), r.get("openssh"))]
        for r in table_rows
    ]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]

    def render(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    title = (
        f"buildbot-sshmux benchmarks, {env['date']}: {env['cpus']} CPUs, {env['machine']}; Python {env['python']},"
        f" Twisted {env['twisted']}, Buildbot {env['buildbot']}, cryptography {env['cryptography']}, {env['openssh']}"
    )
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([title, "", render(header), rule, *map(render, lines), "", *notes])


def target(name: str, value: Any, unit: str, op: str, limit: float) -> dict[str, Any]:
    """One target as the JSON carries it; ``pass`` is None when not measured.

    A cell that timed out ("t/o ...") misses, its text kept as ``text``.
    """
    number = value if isinstance(value, (int, float)) and value == value else None
    passed = None if number is None else (number >= limit if op == ">=" else number <= limit)
    entry = {"name": name, "value": number, "unit": unit, "target": f"{op} {limit:g}", "pass": passed}
    if isinstance(value, str):
        entry["text"] = value
        entry["pass"] = False if value.startswith("t/o") else None
    return entry


def cell_ratio(row: dict[str, Any], a: str, b: str) -> float | None:
    x, y = row.get(a), row.get(b)
    return x / y if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else None


def targets(results: dict[str, Any], table_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 14's targets (and issue 5's that still stand), for those the run measured."""
    by_name = {r["name"]: r for r in table_rows}
    out: list[dict[str, Any]] = []
    one = by_name.get("bulk, 1 ch, MB/s (aggregate)", {})
    cpu = by_name.get("bulk, 1 ch, master CPU s/GB", {})
    if one:
        out.append(
            target("bulk, 1 channel: sshmux / plain PB", cell_ratio(one, "sshmux", "plain"), "x", ">=", 0.8)
        )
        out.append(target("bulk, 1 channel: master CPU per GB, sshmux / plain PB", cell_ratio(cpu, "sshmux", "plain"),
                          "x", "<=", 2))  # fmt: skip
        if "openssh" in results.get("bulk", {}):
            out.append(target("bulk, 1 channel: sshmux / OpenSSH tunnel", cell_ratio(one, "sshmux", "openssh"), "x",
                              ">=", 1))  # fmt: skip
    hundred = by_name.get("bulk, 100 ch, MB/s (aggregate)", {})
    if one and hundred:
        both = {"sshmux": hundred.get("sshmux"), "one": one.get("sshmux")}
        out.append(
            target(
                "bulk: 100 channels aggregate / 1 channel", cell_ratio(both, "sshmux", "one"), "x", ">=", 1
            )
        )
    p99 = by_name.get("small call RTT, 10 bulk ch, p99 ms")
    if p99:
        out.append(target("small-call p99 with 10 bulk channels", p99.get("sshmux"), "ms", "<=", 2))
    attach = results.get("attach", {}).get("fair", {}).get("sshmux", {})
    if "2000" in attach:
        row = by_name.get("attach 2000 sessions, s (fair backlog)", {})
        out.append(target("attach 2000 sessions", row.get("sshmux"), "s", "<=", 15))
        out.append(target("attach 2000 sessions: sshmux / plain PB, fair backlog", cell_ratio(row, "sshmux", "plain"),
                          "x", "<=", 1.1))  # fmt: skip
    added = {n: median([f["master_fds"] - f["master_fds_before"] - f["connections"] for f in runs if "master_fds" in f])
             for n, runs in attach.items()}  # fmt: skip
    added = {n: v for n, v in added.items() if v is not None}
    if added:
        spread = max(added.values()) - min(added.values())
        sizes = ", ".join(f"{n}: {v:g}" for n, v in added.items())
        out.append(target(f"master fds = connections + constant (fds added less connections: {sizes}); spread",
                          spread, "fds", "<=", 1))  # fmt: skip
    per_session = by_name.get("worker side RSS per added session, KiB (50->200)", {})
    if per_session:
        out.append(target("launcher RSS per idle session, 50 -> 200 sessions", per_session.get("sshmux"), "KiB",
                          "<=", 100))  # fmt: skip
    out += scale_targets(results.get("scale", {}), by_name, max(added.values(), default=2))
    mem = [r for r in results.get("memory", {}).get("sshmux", []) if "peak_growth" in r]
    if mem:
        worst = max(r["peak_growth"] for r in mem) / mem[0]["budget"]
        out.append(target("stalled peer: master peak RSS growth / budget (worst run)", worst, "x", "<=", 1.2))
    return out


def scale_targets(
    scale: dict[str, Any], by_name: dict[str, dict[str, Any]], constant: float
) -> list[dict[str, Any]]:
    """The scale workload's targets: all attached, back after a restart, fds."""
    sshmux = scale.get("runs", {}).get("sshmux", {})
    params = scale.get("params", {})
    if not sshmux or not params:
        return []
    n, hosts = params["hosts"] * params["per_host"], params["hosts"]
    attach = by_name.get(f"scale: attach {n} sessions ({hosts} hosts), s", {})
    out = [target(f"{n} sessions over {hosts} connections all attached", attach.get("sshmux"), "s", "<=", 60)]
    if "restart" in sshmux.get("phases", []):
        back = by_name.get("  all attached again, s from the stop", {})
        out.append(target(f"{n} sessions back after a master restart (from the stop)", back.get("sshmux"), "s",
                          "<=", 60))  # fmt: skip
    f = sshmux.get("attach")
    if f:
        extra = f["master_fds"] - f["master_fds_before"] - f["connections"]
        out.append(target(f"master fds = connections + constant at {n} sessions ({f['connections']} connections):"
                          " fds added besides them", extra, "fds", "<=", constant))  # fmt: skip
    return out


def target_lines(checks: list[dict[str, Any]]) -> list[str]:
    def line(t: dict[str, Any]) -> str:
        verdict = {True: "PASS", False: "MISS", None: "?   "}[t["pass"]]
        unit = t["unit"] if t["unit"] in ("x", "") else f" {t['unit']}"
        value = t.get("text", "not measured") if t["value"] is None else f"{fmt(t['value'])}{unit}"
        return f"  {verdict} {t['name']}: {value} (target {t['target']}{unit})"

    return [line(t) for t in checks]


def notes(
    results: dict[str, Any], skipped: dict[str, str], args: argparse.Namespace, errors: list[str]
) -> list[str]:
    algorithms = {t: r.get("algorithms") for t, r in results.get("bulk", {}).items() if r.get("algorithms")}
    explain = {
        "bulk": f"bulk: {args.bulk_mib} MiB worker -> master per run, split over the channels; timed at the master,"
        " first to last byte. CPU: each side's processes, sshd and ssh included for OpenSSH.",
        "wan": f"wan: bulk ({args.wan_mib} MiB a run) through a relay delaying every byte"
        f" {args.wan_rtt_ms / 2:g} ms each way (latency only: the relay itself buffers without limit, so TCP's own"
        " window never binds; an SSH channel's window does).",
        "fairness": f"fairness: PB ping on its own channel, {FAIRNESS['gap'] * 1e3:g} ms apart, for"
        f" {FAIRNESS['seconds']:g} s while {FAIRNESS['channels']} channels of the same connection stream flat out"
        " (plain PB: separate TCP connections).",
        "memory": f"memory: {STALL['channels']} channels each ask for {STALL['bytes'] // MiB} MiB, written at once"
        " by the master; the peer never reads its socket.",
        "attach": f"attach: real Buildbot master (sqlite {'in memory' if args.db_url == 'sqlite://' else args.db_url}),"
        " 10 workers per builder. Fair backlog: the master's PB port (and sshmux's SSH port) listen with a backlog"
        f" of N (tcp:0:...:backlog=N in c['protocols']['pb']['port'], which Buildbot hands to Twisted as is; the"
        f" kernel caps it at net.core.somaxconn, {common.somaxconn()} here); default backlog 50: Twisted's, when"
        " the port names none, as a stock master.cfg has it (what users meet; plain and OpenSSH only, timeout"
        f" {args.attach_default_timeout:g} s). The OpenSSH tunnel's ssh -L listener keeps OpenSSH's fixed"
        " backlog either way: SSH_LISTEN_BACKLOG, 128 (ssh.h; channels.c listens forwarding sockets with it)."
        f" t/o = attached/N when the {args.attach_timeout:g} s timeout hit (the median"
        " counts it as infinite).",
        "e2e": f"e2e: real Buildbot master (as attach), builds worker -> master of {args.e2e_mib} MiB per round,"
        " split across the sessions' builds running at once: a FileUpload (file checked: size, sha256) or a"
        " ShellCommand's stdout (checked: bytes, CRC-32); timed at the master from when the round's steps have all"
        " started (they wait for each other) to the last one's end. CPU: the master process (sshd included for"
        " OpenSSH).",
    }
    lines = [
        (
            f"Medians of {args.reps} runs (attach above {args.attach_reps_upto} sessions, and with the default backlog: 1 run); ratios are"
            " sshmux divided by the other column (see 'better' for which way is good)."
        ),
        *(text for name, text in explain.items() if name in results),
    ]
    lines += scale_notes(results.get("scale", {}), args)
    if algorithms:
        lines.append("ciphers: " + "; ".join(f"{TITLES[t]} {a}" for t, a in algorithms.items()))
    for t, by_n in results.get("attach", {}).get("fair", {}).items():
        raised = [n for n, runs in by_n.items() if any(f.get("max_channels_raised") for f in runs)]
        if raised:
            lines.append(f"attach over {TITLES[t]}: max_channels raised to N for N = {', '.join(raised)}"
                         " (the default caps channels per connection)")  # fmt: skip
    for variant, what in (("fair", "fair backlog"), ("default_backlog", "default backlog 50")):
        overflows = {t: sum(f.get("listen_overflows", 0) for runs in by_n.values() for f in runs)
                     for t, by_n in results.get("attach", {}).get(variant, {}).items()}  # fmt: skip
        if any(overflows.values()):
            lines.append(f"attach, {what}: connections turned away by a full accept queue (ListenOverflows),"
                         " all runs: " + ", ".join(f"{TITLES[t]} {v}" for t, v in overflows.items()))  # fmt: skip
    mem = {t: runs for t, runs in results.get("memory", {}).items() if runs and "aborted_streams" in runs[0]}
    if mem:
        lines.append("memory: streams the master aborted: " + ", ".join(
            f"{TITLES[t]} {runs[0]['aborted_streams']}/{runs[0]['streams']}" for t, runs in mem.items()))  # fmt: skip
    for kind, by_n in e2e_rounds(results).items():
        for n, by_t in by_n.items():
            for t, rounds in by_t.items():
                failed = [f for f in rounds if "error" in f]
                if failed:
                    said = "; ".join(failed[0].get("worker_side", []))
                    lines.append(f"FAILED e2e {E2E_KINDS.get(kind, kind)} over {TITLES[t]}, {n} session(s): "
                                 f"{len(failed)} of {len(rounds)} rounds: {failed[0]['error']}"
                                 + (f" (worker side: {said})" if said else ""))  # fmt: skip
    for transport, why in skipped.items():
        lines.append(f"NOTICE: {TITLES[transport]} column skipped: {why}")
    if errors:
        lines.append("FAILED: " + ", ".join(errors) + " (see the output above)")
    return lines


def scale_notes(scale: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """How the scale workload ran, and what its figures left out."""
    runs, params = scale.get("runs", {}), scale.get("params", {})
    if not runs:
        return []
    n, hosts = params["hosts"] * params["per_host"], params["hosts"]
    k, seconds = params["idle_k"], params["idle_seconds"]
    backlog = next((f["backlog"] for f in runs.values() if "backlog" in f), None)
    fd_limit = next((f["fd_limit"] for f in runs.values() if "fd_limit" in f), None)
    lines = [
        f"scale: {hosts} hosts x {params['per_host']} sessions to one real master (in the workload's process; builders"
        " of 10 workers; sqlite in memory, as attach: a file on this disk cost about twice the master CPU per"
        " attach, and a fresh master registers its workers anew, the restarted one too). sshmux: an ssh-worker run"
        f" launcher per host, its own key, so {hosts} SSH connections; plain PB: a process of stock Workers per host,"
        f" a TCP connection per session. PB and SSH ports listen with a backlog of {n}, capped by the kernel at"
        f" somaxconn: {backlog}. Open files limit {fd_limit} (soft raised to hard)."
        " Each host's process is started, and has imported what it needs, before the clock starts: the hosts'"
        " Python start-ups, here on the master's own cores, are no part of an attach. All hosts dial from 127.0.0.1, so"
        " sshmux's max_startups_per_source is the host count (it stands for one address each); max_startups stays"
        " 10:30:100. c['prioritizeBuilders'] keeps the builders' order"
        + (
            " (Buildbot's default sorter queries the database twice per pending builder at every attach: at 1000"
            " sessions the master stayed busy 42 s after the last one; --scale-buildbot-prioritizer keeps it)."
            if params["keep_builder_order"]
            else ": NOT set (--scale-buildbot-prioritizer): Buildbot's default sorter."
        ),
        "scale restart: the master's stopService (as on SIGTERM), then a new BuildMaster in the same process on the"
        " same ports (Python's imports not timed). Launchers redial with their backoff (1 s, doubling, +-50%"
        " jitter, at most 60 s; their sessions wait for the connection); stock Workers with Twisted's (1.5^n s"
        " plus up to 1 s, at most 60 s).",
        f"idle hour: two {seconds:g} s windows after the restart, as things are, then with every keepalive {k}x as"
        " frequent, each at a random phase (PB keepalives of the workers, 600 s; of the master, 3600 s, a Buildbot"
        f" class attribute with no setting; SSH keepalives both ways, 30 s, their count max x{k}). Fixed-period timers"
        " keep their periods (launcher: none here, its Rebalancer ticking each 1 s only with a cluster and its status"
        " line each 5 s only under systemd; master: authorized_hosts and certificates 2 s, shutdown watch 0.5 s;"
        " Buildbot's heartbeat 60 s). CPU per hour = W1 x 3600/T (fixed-period timers;"
        " no PB keepalive is due yet in W1, each having started at its session's login) + (W2 - W1) x 3600/(K T)"
        f" (keepalives; T = {seconds:g} s, K = {k}); per 1000 sessions: x 1000/{n}. CPU from schedstat (ns);"
        " worker side: its processes summed."
        + (
            ""
            if "restart" in runs.get("plain", {}).get("phases", ["restart"])
            else " The plain PB master's restart is not run unless --scale-plain-restart (~2 min more at 10k)."
        ),
    ]
    for t, f in runs.items():
        for phase in ("attach", "restart"):
            figures = f.get(phase) or {}
            if figures.get("seconds") is None and figures.get("all_after") is not None:
                lines.append(f"scale {phase} over {TITLES[t]}: timed out at {params['timeout']:g} s; all"
                             f" {n} attached after {figures['all_after']:.1f} s")  # fmt: skip
        drops = {phase: (f.get(phase) or {}).get("startup_drops") for phase in ("attach", "restart")}
        if t == "sshmux" and any(drops.values()):
            lines.append(f"scale over sshmux: SSH connections dropped by max_startups before their login: attach"
                         f" {drops['attach']}, restart {drops['restart']} (each host redialled)")  # fmt: skip
        redials = (f.get("restart") or {}).get("redials")
        if redials:
            lines.append(f"scale restart over sshmux: a launcher dialled the master again at most"
                         f" {redials['max_attempt']} times, its longest wait {redials['longest_delay']:g} s")  # fmt: skip
    return lines


def plot(path: str, results: dict[str, Any]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    variants = (("fair", "", "-"), ("default_backlog", ", backlog 50", ":"))
    for variant, label, style in variants:
        for t, by_n in results.get("attach", {}).get(variant, {}).items():
            seconds = {int(n): attach_seconds(runs) for n, runs in by_n.items()}
            done = sorted((n, s) for n, s in seconds.items() if s not in (None, INF))
            timed_out = [(n, max(f["waited"] for f in by_n[str(n)] if "waited" in f))
                         for n, s in seconds.items() if s == INF]  # fmt: skip
            name = TITLES[t] + label
            if done:
                left.plot(*zip(*done), style, marker="o", color=COLORS[t], label=name)
            if timed_out:
                left.plot(*zip(*timed_out), "x", markersize=10, color=COLORS[t], label=f"{name}: timed out")
    for t, r in results.get("scale", {}).get("runs", {}).items():
        attach = r.get("attach", {})
        seconds = attach.get("seconds") or attach.get("all_after")  # past its timeout: when the last came in
        if seconds is not None:
            label = f"{TITLES[t]}, {r['hosts']} hosts (scale)"
            left.plot([r["sessions"]], [seconds], "s", markersize=8, color=COLORS[t], label=label)
    left.set(xlabel="worker sessions", ylabel="seconds to all attached", xscale="log", title="attach")
    for t, r in results.get("bulk", {}).items():
        if "runs" in r:
            points = sorted((int(n), med(runs, "mb_per_s")) for n, runs in r["runs"].items())
            right.plot(*zip(*points), marker="o", color=COLORS[t], label=TITLES[t])
    right.set(xlabel="channels", ylabel="MB/s (aggregate)", xscale="log", yscale="log", title="bulk")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return f"plot written to {path}"


def profile_summary(profile: dict[str, Any], args: argparse.Namespace) -> str:
    """The profile workload's verdict on one change: unprofiled figures, calls per packet."""
    runs = profile["bulk"].get("runs", {}).get(str(args.profile_channels), [])
    lines = [f"profile workload: sshmux bulk, {args.profile_channels} channel(s), {args.bulk_mib} MiB a run,"
             f" {len(runs)} unprofiled runs (median, then every run):"]  # fmt: skip
    for key, what in (("mb_per_s", "MB/s"), ("master_cpu_s_per_gb", "master CPU s/GB"),
                      ("worker_cpu_s_per_gb", "worker CPU s/GB")):  # fmt: skip
        values = [r[key] for r in runs]
        lines.append(f"  {what:16} {fmt(median(values))}  ({' '.join(fmt(v) for v in values)})")
    calls = profile.get("calls_per_packet", {})
    lines.append("  Python calls per 64 KiB packet (profiled run): "
                 + ", ".join(f"{side} {n:.1f}" for side, n in calls.items()))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    env = environment()
    transports = [t for t in args.transports.split(",") if t]
    skipped = {}
    if "openssh" in transports and (why := openssh_missing()):
        skipped["openssh"] = why
        transports.remove("openssh")
        print(f"NOTICE: the OpenSSH column is skipped: {why}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="sshmux-bench-"))
    run = Runner(root)
    workloads = {"bulk": run_bulk, "wan": run_wan, "fairness": run_fairness, "memory": run_memory, "attach": run_attach,
                 "e2e": run_e2e, "scale": run_scale, "profile": run_profile}  # fmt: skip
    results = {name: workloads[name](run, args, transports) for name in args.workloads.split(",")}
    if args.keep or run.errors:
        print(f"work directory kept (logs, keys, configs): {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    table_rows = rows(results)
    wall = time.monotonic() - started
    checks = targets(results, table_rows)
    lines = notes(results, skipped, args, run.errors) + ["", "targets:", *target_lines(checks)]
    lines.append(f"wall time {wall:.0f} s")
    print()
    print(table(env, table_rows, lines))
    profiled = results.get("scale", {}).get("profile", {})
    if "shares" in profiled:
        print(scale_profile_text(profiled))
    profile = results.get("profile", {})
    for side, text in profile.get("pstats", {}).items():
        print(
            f"\nprofile, sshmux bulk, {args.profile_channels} channel(s), {side} side (first to last byte):\n{text}"
        )
    if profile:
        print(profile_summary(profile, args))
    if args.plot:
        print(plot(args.plot, results))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": env, "wall_seconds": wall, "targets": checks, "rows": table_rows, "results": results,
             "skipped": skipped, "arguments": vars(args)}, indent=1))  # fmt: skip
        print(f"JSON written to {args.json}")
    return 1 if run.errors else 0
