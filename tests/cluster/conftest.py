"""Fixtures for the cluster tests; they run only when asked: ``tox -e cluster`` (SSHMUX_CLUSTER=1).

Per test session: one PostgreSQL server with a template database holding
Buildbot's schema (`postgres`, `buildbot_template`) and one crossbar router
with a pool of realms (`crossbar`).  Per test: `cluster`, a `Cluster` with a
database copied from the template and a realm of its own.  The cluster
demo's test (test_cluster_demo.py) needs only the parts (`need_parts`): the
demo starts its own server and router.

When initdb or crossbar is missing, ``.ci/install-cluster`` is run once
(SSHMUX_CLUSTER_INSTALL=0 prevents it); if they are still missing, the tests
are skipped and say why.  SSHMUX_KEEP_TMP=1 keeps every directory.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from buildbot_sshmux.demo.cluster import parts
from buildbot_sshmux.demo.cluster.cluster import Cluster
from buildbot_sshmux.demo.cluster.pg import PostgresServer, find_bindir
from buildbot_sshmux.demo.cluster.router import CrossbarRouter, default_venv, find_crossbar

HERE = Path(__file__).parent
CHECKOUT = HERE.parents[1]  # where .ci/install-cluster is, whatever the current directory
ENABLED = os.environ.get("SSHMUX_CLUSTER") == "1"
KEEP = bool(os.environ.get("SSHMUX_KEEP_TMP"))
REALMS_PER_ROUTER = 32
TEMPLATE = "buildbot_template"
TIMINGS: list[tuple[str, float]] = []
FIGURES: list[str] = []  # "[figures] NAME: k=v, ..." lines the tests printed


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="cluster tests: run them with `tox -e cluster` (or SSHMUX_CLUSTER=1)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("cluster timings")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"    {what:<50} {seconds:6.2f} s")
    if FIGURES:
        terminalreporter.section("cluster figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def timed(what: str, began: float) -> None:
    TIMINGS.append((what, time.monotonic() - began))


def scratch(prefix: str) -> Path:
    """A fresh directory, removed at the end unless SSHMUX_KEEP_TMP is set."""
    return Path(tempfile.mkdtemp(prefix=prefix))


_install: dict[str, str] = {}


def install_once() -> str:
    """Run .ci/install-cluster once per session (unless SSHMUX_CLUSTER_INSTALL=0); its output."""
    if "output" not in _install:
        if os.environ.get("SSHMUX_CLUSTER_INSTALL") == "0":
            _install["output"] = "SSHMUX_CLUSTER_INSTALL=0: .ci/install-cluster not run"
        elif (script := parts.find_install_script(CHECKOUT)) is None:
            _install["output"] = f"no {parts.SCRIPT} in {Path.cwd()}, {parts.SOURCE_TREE} or {CHECKOUT}"
        else:
            began = time.monotonic()
            done = parts.run_install_script(script, capture=True)
            timed(".ci/install-cluster (from the fixture)", began)
            _install["output"] = f"{script} exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}"
    return _install["output"]


def need_parts() -> None:
    """Skip, saying why, unless PostgreSQL and crossbar are there (running the install script once)."""
    if parts.missing_parts():
        output = install_once()
        missing = parts.missing_parts()
        if missing:
            pytest.skip(f"{'; '.join(missing)}; {output}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session."""
    bindir = find_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        output = install_once()
        bindir = find_bindir()
        if bindir is None or not (bindir / "initdb").exists():
            where = f"in {bindir}" if bindir else "under /usr/lib/postgresql/*/bin or on PATH"
            pytest.skip(f"PostgreSQL not found (no initdb {where}); {output}")
    began = time.monotonic()
    server = PostgresServer(bindir)
    try:
        server.start()
        timed("PostgreSQL: initdb + start", began)
        yield server
    finally:
        server.stop()
        if not KEEP:
            server.remove()


@pytest.fixture(scope="session")
def buildbot_template(postgres: PostgresServer) -> str:
    """A database holding Buildbot's schema, to copy per test; its name."""
    from buildbot_sshmux.demo.cluster.masters import write_schema_template

    began = time.monotonic()
    url = postgres.create_database(TEMPLATE)
    directory = scratch("sshmux-schema-")
    try:
        write_schema_template(directory, url)
    finally:
        if not KEEP:
            shutil.rmtree(directory, ignore_errors=True)
    timed("Buildbot schema template (upgrade-master)", began)
    return TEMPLATE


class RealmPool:
    """A crossbar router whose realms are handed out one per test; a new router when they run out."""

    def __init__(self, executable: Path, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.generation = 0
        self.router: CrossbarRouter | None = None
        self.free: list[str] = []

    def take(self) -> tuple[CrossbarRouter, str]:
        if not self.free:
            self.stop()
            self.generation += 1
            realms = [f"sshmux-test-{self.generation}-{i}" for i in range(REALMS_PER_ROUTER)]
            self.router = CrossbarRouter(
                self.executable, self.directory / f"router-{self.generation}", realms
            )
            began = time.monotonic()
            self.router.start()
            timed(f"crossbar start ({REALMS_PER_ROUTER} realms)", began)
            self.free = list(reversed(realms))
        assert self.router is not None
        return self.router, self.free.pop()

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None


@pytest.fixture(scope="session")
def crossbar() -> Iterator[RealmPool]:
    """The session's crossbar router (started at the first test that takes a realm)."""
    executable = find_crossbar()
    if executable is None:
        output = install_once()
        executable = find_crossbar()
        if executable is None:
            pytest.skip(
                f"crossbar not found (SSHMUX_CROSSBAR unset, no completed venv at {default_venv()}); {output}"
            )
    directory = scratch("sshmux-crossbar-")
    pool = RealmPool(executable, directory)
    try:
        yield pool
    finally:
        pool.stop()
        if not KEEP:
            shutil.rmtree(directory, ignore_errors=True)


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def cluster(
    request: Any, postgres: PostgresServer, buildbot_template: str, crossbar: RealmPool
) -> Iterator[Cluster]:
    """A cluster for one test: a database copied from the template, a realm of its own."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    db_name = f"t{next(_counter)}_{slug}"
    began = time.monotonic()
    postgres.create_database(db_name, template=buildbot_template)
    timed("database from the template", began)
    router, realm = crossbar.take()
    root = scratch("sshmux-cluster-")
    cluster = Cluster(root, postgres, db_name, router, realm, keep_hint="set SSHMUX_KEEP_TMP=1 to keep it")
    try:
        yield cluster
    finally:
        failed = any(
            getattr(getattr(request.node, f"report_{w}", None), "failed", False) for w in ("setup", "call")
        )
        if failed:
            print(cluster.diagnostics())
        cluster.close()
        for what, seconds in cluster.timings.items():
            TIMINGS.append((f"{request.node.name}: {what}", seconds))
        postgres.drop_database(db_name)
        if not KEEP and not failed:
            shutil.rmtree(root, ignore_errors=True)
