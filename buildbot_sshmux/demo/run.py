"""``buildbot-sshmux demo``: a real master, two worker hosts, one SSH connection each.

It makes fresh keys and a temporary master (sqlite) with one builder per
project, starts one ``ssh-worker`` process per simulated worker host (one
session per project), runs one build per (project, host), then attaches the
same workers over plain PB for comparison, and prints a summary.  It exits 0
only if every build succeeded.  A run that fails (a build not green, a
timeout, an exception) keeps its directory and says so; ``--keep`` keeps it
after a good run too.  ``--cluster`` runs the cluster demo instead
(`cluster_run`: three masters, one killed mid-build).

Its options are parsed here, by `parser`, whichever way it is started:
``buildbot-sshmux demo ...`` (``tox -e demo -- ...``) passes every argument
through, and ``python -m buildbot_sshmux.demo.run`` is the same command.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from attrs import define, field
from twisted.logger import Logger

PROJECTS = [
    "glib", "gtk", "libxml2", "pango", "cairo", "gdk-pixbuf", "at-spi2-core",
    "gobject-introspection", "libsoup", "json-glib", "gnome-shell", "mutter",
    "nautilus", "evince", "gedit", "epiphany", "tracker", "librsvg", "vte", "gstreamer",
]  # fmt: skip
HOSTS = ["debian-sid", "fedora-41"]
DEFAULT_PROJECTS = 20

DESCRIPTION = (
    "Run a real Buildbot master with buildbot-sshmux in a fresh temporary directory. "
    "Two simulated worker hosts connect to it, one SSH connection each, with one worker "
    "session per project; one build runs per project and host; then the same workers "
    "attach over plain PB for comparison, and a summary is printed."
)
EPILOG = (
    "It exits 0 only if every build succeeded. A run that fails keeps its directory "
    "and prints where it is and which logs to read. With --cluster: three masters "
    "(subprocesses sharing a private PostgreSQL server and a crossbar router), the two hosts' "
    "sessions spread over them with a [cluster] launcher config, and stock buildbot-workers "
    "over plain PB to one master; one build per project and host; that master is killed "
    "with SIGKILL while they run; its sessions move to the others and its builds run again "
    "there. It exits 0 only if every build ended green and every session re-attached. It "
    "needs PostgreSQL and crossbar: bash .ci/install-cluster installs both."
)

_log = Logger()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad option is one line on stderr, exit status 2 (argparse prints the usage too)."""
        self.exit(2, f"{self.prog}: {message}; {self.prog} --help lists the options\n")


def _project_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, not {text!r}")
    return count


def parser() -> argparse.ArgumentParser:
    """The demo's options (``buildbot-sshmux demo --help``)."""
    p = _Parser(prog="buildbot-sshmux demo", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument(
        "--projects",
        type=_project_count,
        default=DEFAULT_PROJECTS,
        metavar="N",
        help=f"how many projects the master builds; each has one worker session on each of the "
        f"{len(HOSTS)} hosts and one build per host (default: {DEFAULT_PROJECTS})",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (keys, master, logs) after a good run too, "
        "and print its path; a failed run always keeps it",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run the cluster demo: 3 masters sharing PostgreSQL and crossbar, one killed "
        "mid-build with SIGKILL, its sessions moved and its builds run again (see below)",
    )
    # The plain PB comparison: run_demo starts this same module as a child process
    # with --plain-pb PORT BASEDIR NAME...; not for people, so not in --help.
    p.add_argument("--plain-pb", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    return p


def project_names(count: int) -> list[str]:
    """``count`` project names: PROJECTS, then PROJECTS again with ``-1``, ``-2``... suffixes."""
    names = (PROJECTS * (count // len(PROJECTS) + 1))[:count]
    return [f"{name}-{i // len(PROJECTS)}" if i >= len(PROJECTS) else name for i, name in enumerate(names)]


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
    failed: list[str] = field(factory=list)  # "PROJECT on HOST (RESULT)" of each build not green


@define
class Outcome:
    """How a run ended: its figures (this demo's or the cluster demo's), or what stopped it."""

    figures: Any = None
    error: str | None = None


def table(title: str, rows: list[tuple[str, str]], rule: int) -> str:
    """A demo's summary: a title, a rule, then each row's label and value."""
    width = max(len(k) for k, _ in rows)
    lines = ["", title, "-" * (width + rule)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def first_few(names: list[str], most: int = 5) -> str:
    """``names`` for a one-line message: the first ``most``, then how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(reactor: Any, root: Path, projects: list[str], hosts: list[str]) -> Figures:
    from buildbot.process.results import SUCCESS, statusToString

    from buildbot_sshmux.demo import harness

    figures = Figures(hosts=len(hosts))
    site = harness.Site(root, hosts)
    config = harness.master_config(projects, hosts, site)
    _say(f"starting a Buildbot master in {site.master_basedir} ({len(projects)} projects)")
    master = await harness.start_master(site.master_basedir, config, reactor)
    launchers: list[harness.LauncherProcess] = []
    try:
        ssh_port, pb_port = harness.ssh_port(master), harness.pb_port(master)
        figures.fds_baseline = harness.open_fds()
        names = {h: [harness.worker_name(p, h) for p in projects] for h in hosts}
        all_names = {n for ns in names.values() for n in ns}
        figures.sessions = len(all_names)
        for host in hosts:
            cfg = site.launcher_config(host, ssh_port, pb_port, names[host])
            launcher = harness.LauncherProcess(cfg)
            launcher.start()
            launchers.append(launcher)
        _say(f"started {len(hosts)} ssh-worker processes, {len(all_names)} worker sessions")
        figures.attach_seconds = await harness.wait_until(
            reactor,
            lambda: _check_alive(launchers) and harness.ready_workers(master) >= all_names,
            90,
            "every worker session to attach",
        )
        figures.ssh_connections = harness.sshmux_service(master).connection_count
        figures.algorithms = _algorithms(harness.sshmux_service(master))
        figures.tcp_on_ssh_port = harness.established_tcp(ssh_port)
        figures.tcp_on_pb_port_ssh = harness.established_tcp(pb_port)
        figures.fds_ssh = harness.open_fds()
        _say(f"all {len(all_names)} sessions attached in {figures.attach_seconds:.1f}s; running builds")
        start = time.monotonic()
        requests = [(p, h) for p in projects for h in hosts]
        results = await harness.run_builds(master, requests)
        figures.build_seconds = time.monotonic() - start
        figures.total = len(results)
        figures.green = sum(1 for r in results if r == SUCCESS)
        figures.failed = [
            f"{p} on {h} ({statusToString(r)})" for (p, h), r in zip(requests, results) if r != SUCCESS
        ]
        _say(f"{figures.green}/{figures.total} builds green in {figures.build_seconds:.1f}s")
        for launcher in launchers:
            launcher.stop()
        await harness.wait_until(
            reactor, lambda: not harness.attached_workers(master), 30, "workers to detach"
        )

        _say(f"attaching the same {len(all_names)} workers over plain PB for comparison")
        with open(root / "plain-pb.log", "wb") as plain_log:
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
                stdout=plain_log,
                stderr=subprocess.STDOUT,
            )
        try:
            await harness.wait_until(
                reactor, lambda: harness.ready_workers(master) >= all_names, 90, "plain PB workers to attach"
            )
            figures.fds_plain = harness.open_fds()
            figures.tcp_on_pb_port_plain = harness.established_tcp(pb_port)
        finally:
            plain.terminate()
            plain.wait(15)
        await harness.wait_until(
            reactor, lambda: not harness.attached_workers(master), 30, "workers to detach"
        )
    finally:
        for launcher in launchers:
            launcher.stop()
        await harness.stop_master(master)
    return figures


async def attempt(reactor: Any, root: Path, projects: list[str], hosts: list[str]) -> Outcome:
    """`run_demo`; an exception it raises becomes the outcome's error (its traceback goes to the log)."""
    try:
        return Outcome(figures=await run_demo(reactor, root, projects, hosts))
    except Exception as e:
        _log.failure("the demo failed")
        return Outcome(error=str(e) or type(e).__name__)


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
                f"ssh-worker ({launcher.config.parent.name}) exited with {launcher.process.returncode}; "
                f"the end of its log {launcher.log_path}:\n{launcher.output()[-3000:]}"
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
    return table("buildbot-sshmux demo summary", rows, 40)


def build_problem(outcome: Outcome) -> str | None:
    """What went wrong in a demo run, as far as its builds tell, or None if all are green."""
    if outcome.error is not None:
        return outcome.error
    f = outcome.figures
    if f is None:
        return "it stopped before it finished"
    if not f.total:
        return "no build ran"
    if f.green != f.total:
        return f"{f.total - f.green} of {f.total} builds not green: {first_few(f.failed)}"
    return None


def _logs(root: Path) -> list[str]:
    """The log files a run left in ``root``, master's first."""
    paths = [root / "master.log", *(root / h / "ssh-worker.log" for h in HOSTS), root / "plain-pb.log"]
    return [str(p) for p in paths if p.exists()]


def report(root: Path, outcome: Outcome, keep: bool) -> int:
    """Print how a run went; delete ``root`` after a good run unless ``keep``; the exit status."""
    hint = " (build output is in the master's database, master/state.sqlite)" if outcome.figures else ""
    return finish(root, outcome, keep, summary, build_problem(outcome), _logs(root), hint)


def finish(
    root: Path,
    outcome: Outcome,
    keep: bool,
    summary: Any,
    problem: str | None,
    logs: list[str],
    hint: str = "",
) -> int:
    """Either demo's end: its summary; ``root`` deleted after a good run unless
    ``keep``, else kept with its logs named; the exit status."""
    if outcome.figures is not None:
        print(summary(outcome.figures))
    if problem is None:
        if keep:
            print(f"kept the demo directory {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        return 0
    print(f"demo failed: {problem}", file=sys.stderr)
    where = f"; its logs: {', '.join(logs)}" if logs else ""
    print(f"kept the demo directory {root}{where}{hint}", file=sys.stderr)
    return 1


def _spin(root: Path, projects: list[str], hosts: list[str]) -> Outcome:
    """`attempt` in Twisted's global reactor, the process's log going to ROOT/master.log."""
    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # Ended before `attempt` returned: the reactor was stopped (Ctrl-C, a signal).
    outcome = [Outcome(error="interrupted before it finished")]

    def finished(result: Any) -> None:
        if isinstance(result, Outcome):
            outcome[0] = result
        else:  # a Failure that `attempt` did not turn into an outcome
            outcome[0] = Outcome(error=result.getErrorMessage())
        reactor.stop()

    with open(root / "master.log", "w") as log_file:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
        reactor.callWhenRunning(
            lambda: defer.ensureDeferred(attempt(reactor, root, projects, hosts)).addBoth(finished)
        )
        reactor.run()
    return outcome[0]


def run(options: argparse.Namespace) -> int:
    """Run the demo in a new temporary directory, as ``options`` say; the exit status."""
    projects = project_names(options.projects)
    root = Path(tempfile.mkdtemp(prefix="sshmux-demo-"))
    _say(f"demo directory {root} (master log: {root / 'master.log'})")
    try:
        outcome = _spin(root, projects, HOSTS)
    except BaseException:
        print(f"demo failed; kept the demo directory {root}", file=sys.stderr)
        raise
    return report(root, outcome, options.keep)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    options = p.parse_args(argv)
    if options.plain_pb is not None:
        port, *rest = options.plain_pb
        if not port.isdigit() or not rest:
            p.error("--plain-pb takes PORT BASEDIR NAME...")
        plain_pb_main(int(port), Path(rest[0]), rest[1:])
        return 0
    if options.cluster:
        from buildbot_sshmux.demo import cluster_run

        return cluster_run.run(options)
    return run(options)


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
    sys.exit(main())
