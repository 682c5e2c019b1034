"""``buildbot-sshmux demo``: a real master, two worker hosts, one SSH connection each.

It makes fresh keys and a temporary master (sqlite) with one builder per
project, starts one ``ssh-worker`` process per simulated worker host (one
session per project), runs one build per (project, host), then attaches the
same workers over plain PB for comparison, and prints a summary.  It exits 0
only if every build succeeded.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from attrs import define

PROJECTS = [
    "glib", "gtk", "libxml2", "pango", "cairo", "gdk-pixbuf", "at-spi2-core",
    "gobject-introspection", "libsoup", "json-glib", "gnome-shell", "mutter",
    "nautilus", "evince", "gedit", "epiphany", "tracker", "librsvg", "vte", "gstreamer",
]  # fmt: skip
HOSTS = ["debian-sid", "fedora-41"]


@define
class Figures:
    sessions: int = 0
    hosts: int = 0
    ssh_connections: int = 0
    tcp_on_ssh_port: int = 0
    tcp_on_pb_port_ssh: int = 0
    fds_baseline: int = 0
    fds_ssh: int = 0
    fds_plain: int = 0
    tcp_on_pb_port_plain: int = 0
    attach_seconds: float = 0.0
    build_seconds: float = 0.0
    green: int = 0
    total: int = 0
    algorithms: str = ""


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(reactor: Any, root: Path, projects: list[str], hosts: list[str]) -> Figures:
    from buildbot_sshmux.demo import harness as testing

    figures = Figures(hosts=len(hosts))
    site = testing.Site(root, hosts)
    config = testing.master_config(projects, hosts, site)
    _say(f"starting a Buildbot master in {site.master_basedir} ({len(projects)} projects)")
    master = await testing.start_master(site.master_basedir, config, reactor)
    launchers: list[testing.LauncherProcess] = []
    try:
        ssh_port, pb_port = testing.ssh_port(master), testing.pb_port(master)
        figures.fds_baseline = testing.open_fds()
        names = {h: [testing.worker_name(p, h) for p in projects] for h in hosts}
        all_names = {n for ns in names.values() for n in ns}
        figures.sessions = len(all_names)
        for host in hosts:
            cfg = site.launcher_config(host, ssh_port, pb_port, names[host])
            launcher = testing.LauncherProcess(cfg)
            launcher.start()
            launchers.append(launcher)
        _say(f"started {len(hosts)} ssh-worker processes, {len(all_names)} worker sessions")
        figures.attach_seconds = await testing.wait_until(
            reactor,
            lambda: _check_alive(launchers) and testing.ready_workers(master) >= all_names,
            90,
            "every worker session to attach",
        )
        figures.ssh_connections = testing.sshmux_service(master).connection_count
        figures.algorithms = _algorithms(testing.sshmux_service(master))
        figures.tcp_on_ssh_port = testing.established_tcp(ssh_port)
        figures.tcp_on_pb_port_ssh = testing.established_tcp(pb_port)
        figures.fds_ssh = testing.open_fds()
        _say(f"all {len(all_names)} sessions attached in {figures.attach_seconds:.1f}s; running builds")
        start = time.monotonic()
        results = await testing.run_builds(master, [(p, h) for p in projects for h in hosts])
        figures.build_seconds = time.monotonic() - start
        figures.total = len(results)
        figures.green = sum(1 for r in results if r == 0)
        _say(f"{figures.green}/{figures.total} builds green in {figures.build_seconds:.1f}s")
        for launcher in launchers:
            launcher.stop()
        await testing.wait_until(
            reactor, lambda: not testing.attached_workers(master), 30, "workers to detach"
        )

        _say(f"attaching the same {len(all_names)} workers over plain PB for comparison")
        plain = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "buildbot_sshmux.demo.run",
                "--plain-pb",
                str(pb_port),
                str(root / "plain"),
                *sorted(all_names),
            ],
            stdout=open(root / "plain-pb.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            await testing.wait_until(
                reactor, lambda: testing.ready_workers(master) >= all_names, 90, "plain PB workers to attach"
            )
            figures.fds_plain = testing.open_fds()
            figures.tcp_on_pb_port_plain = testing.established_tcp(pb_port)
        finally:
            plain.terminate()
            plain.wait(15)
        await testing.wait_until(
            reactor, lambda: not testing.attached_workers(master), 30, "workers to detach"
        )
    finally:
        for launcher in launchers:
            launcher.stop()
        await testing.stop_master(master)
    return figures


def _algorithms(sshmux: Any) -> str:
    """What the master's SSH connections negotiated, e.g. cipher and key exchange."""
    seen = set()
    for t in sshmux.factory.connections:
        strict = ", strict KEX" if getattr(t, "strict_kex", False) else ""
        seen.add(f"{t.currentEncryptions.inCipType.decode()}, {t.kexAlg.decode()}{strict}")
    return "; ".join(sorted(seen))


def _check_alive(launchers: list[Any]) -> bool:
    for launcher in launchers:
        if launcher.process.poll() is not None:
            raise RuntimeError(
                f"ssh-worker exited with {launcher.process.returncode}; its log:\n{launcher.output()[-3000:]}"
            )
    return True


def summary(f: Figures) -> str:
    rows = [
        ("worker sessions", f"{f.sessions} ({f.sessions // max(f.hosts, 1)} projects x {f.hosts} hosts)"),
        (
            "SSH connections at the master",
            f"{f.ssh_connections} (TCP on the SSH port: {f.tcp_on_ssh_port}, on the PB port: {f.tcp_on_pb_port_ssh})",
        ),
        ("master open fds, no workers", str(f.fds_baseline)),
        ("master open fds, sessions over SSH", f"{f.fds_ssh} (+{f.fds_ssh - f.fds_baseline})"),
        (
            "master open fds, same workers over plain PB",
            f"{f.fds_plain} (+{f.fds_plain - f.fds_baseline}; TCP on the PB port: {f.tcp_on_pb_port_plain})",
        ),
        ("SSH cipher, key exchange", f.algorithms),
        ("attach time over SSH", f"{f.attach_seconds:.1f}s"),
        ("builds green/total", f"{f.green}/{f.total} in {f.build_seconds:.1f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "buildbot-sshmux demo summary", "-" * (width + 40)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="buildbot-sshmux demo", description=__doc__)
    p.add_argument("--projects", type=int, default=20, help="number of projects (default 20)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    projects = (PROJECTS * (args.projects // len(PROJECTS) + 1))[: args.projects]
    projects = [
        f"{name}-{i // len(PROJECTS)}" if i >= len(PROJECTS) else name for i, name in enumerate(projects)
    ]

    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    root = Path(tempfile.mkdtemp(prefix="sshmux-demo-"))
    log_file = open(root / "master.log", "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    _say(f"demo directory {root} (master log: {root / 'master.log'})")
    outcome: dict[str, Any] = {}

    async def go() -> None:
        outcome["figures"] = await run_demo(reactor, root, projects, HOSTS)

    def done(result: Any) -> None:
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            outcome["error"] = result.getErrorMessage()
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(go()).addBoth(done))
    reactor.run()
    log_file.close()
    if "error" in outcome:
        print(f"demo failed: {outcome['error']} (logs in {root})", file=sys.stderr)
        return 1
    figures: Figures = outcome["figures"]
    print(summary(figures))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if figures.total and figures.green == figures.total else 1


def plain_pb_main(port: int, basedir: Path, names: list[str]) -> None:
    """Run stock buildbot-worker Workers over plain PB/TCP (the comparison)."""
    from buildbot_worker.bot import Worker
    from twisted.application import service
    from twisted.internet import reactor

    from buildbot_sshmux.demo.harness import WORKER_PASSWORD

    top = service.MultiService()
    for name in names:
        workdir = basedir / name
        workdir.mkdir(parents=True, exist_ok=True)
        Worker(
            "127.0.0.1", port, name, WORKER_PASSWORD.format(name=name), str(workdir), 600
        ).setServiceParent(top)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--plain-pb":
        plain_pb_main(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(main())
