"""``buildbot-sshmux demo --cluster``: its options, what it says when parts are missing, its summary.

In process through ``buildbot-sshmux``'s own ``main``; nothing here starts a
master or PostgreSQL: `cluster_run.attempt` (the run itself) is replaced by
one that hands back a finished run's figures, and `cluster.parts`' look-ups
by what each test needs.  The real run is tests/cluster/test_cluster_demo.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import TestCase

from buildbot_sshmux.demo import cluster_run
from buildbot_sshmux.demo import run as demo
from buildbot_sshmux.demo.cluster import parts

from .test_demo_cli import run_cli
from .tmpdirs import scratch_dir


def figures(green: int = 40, total: int = 40, reattached: int = 13, moved: int = 13) -> cluster_run.Figures:
    """A finished 20-project run's figures (as `cluster_run.run_cluster_demo` returns them)."""
    return cluster_run.Figures(
        projects=20,
        sessions=40,
        startup={"PostgreSQL and Buildbot's schema": 2.0, "crossbar": 3.0, "3 masters": 6.0},
        before={"a": 13, "b": 14, "c": 13},
        after={"b": 20, "c": 20 - (moved - reattached)},
        running_on_killed=13,
        moved=moved,
        reattach=[0.5 + i / 10 for i in range(reattached)],
        not_reattached=[f"w{i}" for i in range(moved - reattached)],
        marked_inactive=11.5,
        green=green,
        total=total,
        build_seconds=30.0,
        retried=13,
        rerun_started=[12.0, 13.0],
        rerun_green=[20.0, 21.5],
        rerun_on={"b": 6, "c": 7},
        stock=5,
        stock_before=5,
        stock_after=0,
        failed=["glib on fedora-41 (failure)"] * (total - green),
    )


class ClusterDemoTests(TestCase):
    def setUp(self) -> None:
        self.tmp = scratch_dir(self)
        self.tmp.chmod(0o711)  # as root, PostgreSQL (user postgres) must be able to enter it
        for patch in (
            mock.patch.object(tempfile, "tempdir", str(self.tmp)),
            mock.patch.object(cluster_run, "attempt", self.attempt),
            mock.patch.object(parts, "missing_python_packages", lambda: []),
            mock.patch.object(parts, "missing_parts", lambda: list(self.missing)),
            mock.patch.object(parts, "find_install_script", lambda: self.script),
            mock.patch.object(parts, "run_install_script", self.install),
        ):
            patch.start()
            self.addCleanup(patch.stop)
        self.missing: list[str] = []
        self.script: Path | None = None
        self.installed: list[tuple[Path, bool]] = []
        self.attempts: list[tuple[Path, list[str]]] = []
        self.outcome = cluster_run.Outcome(figures=figures())

    def attempt(self, root: Path, projects: Sequence[str]) -> cluster_run.Outcome:
        self.attempts.append((root, list(projects)))
        (root / "demo.log").write_text("")
        return self.outcome

    def install(self, script: Path, capture: bool) -> subprocess.CompletedProcess[str]:
        self.installed.append((script, capture))
        self.missing = []
        return subprocess.CompletedProcess(["bash", str(script)], 0)

    def test_cluster_runs_the_cluster_demo_with_its_projects(self) -> None:
        with mock.patch.object(demo, "_spin") as single:
            code, out, err = run_cli(["demo", "--cluster", "--projects", "3"])
        self.assertEqual((code, err), (0, ""))
        single.assert_not_called()
        [(root, projects)] = self.attempts
        self.assertEqual(projects, ["glib", "gtk", "libxml2"])
        self.assertTrue(root.name.startswith("sshmux-demo-cluster-"), root)
        self.assertFalse(root.exists(), "a good run without --keep kept its directory")
        self.assertIn("buildbot-sshmux cluster demo summary", out)

    def test_options_in_any_order_and_keep(self) -> None:
        code, out, err = run_cli(["demo", "--keep", "--cluster"])
        self.assertEqual((code, err), (0, ""))
        [(root, projects)] = self.attempts
        self.assertEqual(projects, demo.PROJECTS)
        self.assertTrue(root.is_dir(), "--keep removed the directory")
        self.assertEqual(out.splitlines()[-1], f"kept the demo directory {root}")

    def test_a_bad_option_with_cluster_is_one_line_and_exit_2(self) -> None:
        for argv in (["--cluster", "--projects", "0"], ["--cluster", "--bogus"], ["--cluster=yes"]):
            code, out, err = run_cli(["demo", *argv])
            self.assertEqual((code, out, len(err.splitlines())), (2, "", 1), (argv, err))
            self.assertIn("buildbot-sshmux demo --help", err)
        self.assertEqual(self.attempts, [])

    def test_missing_parts_without_the_script_is_one_sentence_and_no_directory(self) -> None:
        self.missing = ["PostgreSQL (no initdb under /usr/lib/postgresql/*/bin or on PATH)"]
        code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(
            err.startswith("buildbot-sshmux demo --cluster: the cluster demo needs PostgreSQL"), err
        )
        self.assertIn("no initdb under /usr/lib/postgresql/*/bin", err)
        self.assertIn("run `bash .ci/install-cluster` in a checkout of buildbot-sshmux", err)
        self.assertEqual((self.attempts, self.installed, list(self.tmp.iterdir())), ([], [], []))

    def test_missing_parts_with_the_script_runs_it_then_the_demo(self) -> None:
        self.missing = ["crossbar (SSHMUX_CROSSBAR unset, no completed venv at /nowhere)"]
        self.script = Path("/checkout/.ci/install-cluster")
        code, out, err = run_cli(["demo", "--cluster", "--projects", "2"])
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.installed, [(self.script, False)])  # on the terminal: sudo may ask
        self.assertTrue(out.startswith("missing crossbar (SSHMUX_CROSSBAR unset"), out)
        self.assertIn(f"running bash {self.script}", out.splitlines()[0])
        self.assertEqual(len(self.attempts), 1)

    def test_a_failed_install_is_one_sentence(self) -> None:
        self.missing = ["crossbar (no completed venv)"]
        self.script = Path("/checkout/.ci/install-cluster")

        def fails(script: Path, capture: bool) -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(["bash", str(script)], 1)

        with mock.patch.object(parts, "run_install_script", fails):
            code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual(code, 1)
        self.assertEqual(
            err,
            "buildbot-sshmux demo --cluster: bash /checkout/.ci/install-cluster exited 1 (its output is "
            "above); still missing: crossbar (no completed venv)\n",
        )
        self.assertEqual(self.attempts, [])

    def test_as_root_a_tmpdir_postgres_cannot_enter_is_one_sentence(self) -> None:
        (self.tmp / "closed").mkdir(mode=0o700)
        with (
            mock.patch.object(tempfile, "tempdir", str(self.tmp / "closed")),
            mock.patch.object(os, "geteuid", lambda: 0),
        ):
            code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err,
            "buildbot-sshmux demo --cluster: PostgreSQL runs as user postgres here (this is root), and it "
            f"cannot enter {(self.tmp / 'closed').resolve()}: set TMPDIR to a directory every user can "
            "enter, such as /tmp\n",
        )
        self.assertEqual(self.attempts, [])

    def test_missing_python_packages_are_named(self) -> None:
        with mock.patch.object(parts, "missing_python_packages", lambda: ["psycopg2-binary", "buildbot-www"]):
            code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual((code, len(err.splitlines())), (1, 1), err)
        self.assertIn("needs psycopg2-binary and buildbot-www", err)
        self.assertIn("`tox -e demo -- --cluster` installs them", err)
        self.assertIn("buildbot-www==", err)  # the version of the installed buildbot

    def test_the_summary(self) -> None:
        code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        start = lines.index("buildbot-sshmux cluster demo summary")
        rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[start + 2 :])
        self.assertEqual(rows["sessions per master before the kill"], "a 13, b 14, c 13")
        self.assertEqual(rows["sessions per master after"], "a 0 (killed), b 20, c 20")
        self.assertEqual(
            rows["re-attach after the kill"],
            "13/13 of master a's sessions, p50 1.1s, max 1.7s after the kill",
        )
        self.assertEqual(rows["builds green/total"], "40/40 in 30.0s (8s step)")
        self.assertEqual(rows["interrupted by the kill"], "13; 13 finished RETRY on a")
        self.assertEqual(
            rows["run again"],
            "2/13 green (b 6, c 7): started 12.0-13.0s after the kill, green 20.0-21.5s after",
        )
        self.assertEqual(
            rows["stock workers (plain PB/TCP to a)"],
            "5/5 attached before the kill, 0/5 after (they stay detached)",
        )

    def test_a_session_not_reattached_fails_the_run_and_keeps_its_logs(self) -> None:
        self.outcome = cluster_run.Outcome(figures=figures(reattached=12))
        code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual(code, 1)
        [(root, _)] = self.attempts
        self.assertTrue(root.is_dir())
        lines = err.splitlines()
        self.assertEqual(
            lines[0],
            "demo failed: 1 of master a's 13 sessions did not re-attach within 60s: w0; "
            "1 of 40 sessions not attached at the end",
        )
        self.assertEqual(lines[1], f"kept the demo directory {root}; its logs: {root / 'demo.log'}")

    def test_a_build_not_green_fails_the_run(self) -> None:
        self.outcome = cluster_run.Outcome(figures=figures(green=39))
        code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual(code, 1)
        self.assertIn("demo failed: 1 of 40 builds not green: glib on fedora-41 (failure)", err)

    def test_an_error_keeps_the_directory(self) -> None:
        self.outcome = cluster_run.Outcome(error="gave up after 120s waiting for every build to start")
        code, out, err = run_cli(["demo", "--cluster"])
        self.assertEqual(code, 1)
        self.assertNotIn("summary", out)
        self.assertEqual(
            err.splitlines()[0], "demo failed: gave up after 120s waiting for every build to start"
        )


class PartsTests(TestCase):
    def test_the_install_script_is_found_in_the_current_directory(self) -> None:
        tmp = scratch_dir(self)
        (tmp / ".ci").mkdir()
        (tmp / ".ci" / "install-cluster").write_text("true\n")
        with mock.patch.object(Path, "cwd", lambda: tmp):
            self.assertEqual(parts.find_install_script(), tmp / ".ci" / "install-cluster")

    def test_else_in_the_source_tree_else_none(self) -> None:
        tmp = scratch_dir(self)
        with mock.patch.object(Path, "cwd", lambda: tmp):
            found = parts.find_install_script()
            with mock.patch.object(parts, "SOURCE_TREE", tmp):
                self.assertIsNone(parts.find_install_script())
        if (parts.SOURCE_TREE / ".ci" / "install-cluster").is_file():  # a checkout, not an installed package
            self.assertEqual(found, parts.SOURCE_TREE / ".ci" / "install-cluster")
