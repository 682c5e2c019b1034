"""``buildbot-sshmux demo``'s options, and what a run leaves behind.

Run in process through ``buildbot-sshmux``'s own ``main`` (what ``tox -e demo --
ARGS`` runs).  Nothing here runs Twisted's global reactor: the step that does
(``run._spin``) is replaced, either by one that runs the real `run.attempt`
(the demo up to its master config) on a memory reactor, or by one that hands
back a finished run's figures.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from buildbot_sshmux.cli import admin
from buildbot_sshmux.demo import harness
from buildbot_sshmux.demo import run as demo

from .tmpdirs import scratch_dir


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``buildbot-sshmux ARGV`` in process; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = admin.main(argv)
        except SystemExit as e:  # argparse: --help, bad options
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def figures(green: int, total: int, failed: list[str] | None = None) -> demo.Figures:
    """A finished run's figures (as `run.run_demo` returns them)."""
    return demo.Figures(sessions=4, hosts=2, ssh_connections=2, green=green, total=total, failed=failed or [])


class ParsingTests(TestCase):
    """-h, --projects, bad options: all read by the demo's one parser."""

    def setUp(self) -> None:
        self.spun: list[list[str]] = []
        spin = mock.patch.object(demo, "_spin", self.fake_spin)
        spin.start()
        self.addCleanup(spin.stop)
        tmp = mock.patch.object(tempfile, "tempdir", str(scratch_dir(self)))
        tmp.start()
        self.addCleanup(tmp.stop)

    def fake_spin(self, root: Path, projects: list[str], hosts: list[str]) -> demo.Outcome:
        self.spun.append(projects)
        return demo.Outcome(figures=figures(green=len(projects) * 2, total=len(projects) * 2))

    def test_help_prints_the_usage_and_exits_0(self) -> None:
        for flag in ("-h", "--help"):
            code, out, err = run_cli(["demo", flag])
            self.assertEqual((code, err), (0, ""), flag)
            self.assertTrue(
                out.startswith("usage: buildbot-sshmux demo [-h] [--projects N] [--keep] [--cluster]\n"), out
            )
            self.assertIn("--keep", out)
            self.assertIn("(default: 20)", out)
            self.assertIn("exits 0 only if every build succeeded", out)
            self.assertIn("--cluster", out)
            self.assertIn("bash .ci/install-cluster", out)
            self.assertNotIn("``", out)  # plain words, no markup
            self.assertNotIn("plain-pb", out)  # the comparison child's option is not for people
        self.assertEqual(self.spun, [], "--help ran the demo")

    def test_projects_3_runs_3_projects(self) -> None:
        code, out, err = run_cli(["demo", "--projects", "3"])
        self.assertEqual(code, 0, err)
        self.assertEqual(self.spun, [["glib", "gtk", "libxml2"]])

    def test_no_options_is_20_projects_as_before(self) -> None:
        code, out, err = run_cli(["demo"])
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.spun), 1)
        self.assertEqual(self.spun[0], demo.PROJECTS)
        self.assertIn("buildbot-sshmux demo summary", out)

    def test_more_projects_than_names_get_numbered(self) -> None:
        names = demo.project_names(45)
        self.assertEqual(len(set(names)), 45)
        self.assertEqual(names[20:22], ["glib-1", "gtk-1"])
        self.assertEqual(names[44], "cairo-2")

    def test_a_bad_option_is_one_line_and_exit_2(self) -> None:
        for argv, named in [
            (["--bogus"], "--bogus"),
            (["--projects", "abc"], "'abc'"),
            (["--projects", "0"], "'0'"),
            (["--projects"], "--projects"),
            (["stray"], "stray"),
            (["--keep", "--projects", "2", "-x"], "-x"),
        ]:
            code, out, err = run_cli(["demo", *argv])
            self.assertEqual(code, 2, argv)
            self.assertEqual(out, "", argv)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith("buildbot-sshmux demo: "), err)
            self.assertIn(named, err)
            self.assertIn("buildbot-sshmux demo --help", err)
        self.assertEqual(self.spun, [], "a bad option ran the demo")

    def test_plain_pb_child_arguments_reach_it(self) -> None:
        with mock.patch.object(demo, "plain_pb_main") as plain_pb_main:
            self.assertEqual(demo.main(["--plain-pb", "9989", "/tmp/plain", "a-debian", "b-debian"]), 0)
        plain_pb_main.assert_called_once_with(9989, Path("/tmp/plain"), ["a-debian", "b-debian"])
        code, out, err = run_cli(["demo", "--plain-pb", "notaport"])
        self.assertEqual((code, len(err.splitlines())), (2, 1), err)


class DirectoryTests(TestCase):
    """A failed run keeps its directory and names it; a good one removes it unless --keep."""

    def setUp(self) -> None:
        self.tmp = scratch_dir(self)
        tmp = mock.patch.object(tempfile, "tempdir", str(self.tmp))
        tmp.start()
        self.addCleanup(tmp.stop)
        self.outcome: demo.Outcome | None = None
        self.configs: list[dict[str, Any]] = []

    def spin(self, root: Path, projects: list[str], hosts: list[str]) -> demo.Outcome:
        """What the real `_spin` does, less the global reactor and log."""
        (root / "master.log").write_text("")
        if self.outcome is not None:
            return self.outcome
        return self.successResultOf(
            defer.ensureDeferred(demo.attempt(MemoryReactorClock(), root, projects, hosts))
        )

    async def master_that_does_not_start(self, basedir: Path, config: dict[str, Any], reactor: Any) -> Any:
        self.configs.append(config)
        raise TimeoutError("gave up after 90s waiting for the master to start")

    def run_demo(self, *argv: str) -> tuple[int, str, str, Path]:
        """``buildbot-sshmux demo ARGV`` with `spin`; also the directory it made."""
        with (
            mock.patch.object(demo, "_spin", self.spin),
            mock.patch.object(harness, "start_master", self.master_that_does_not_start),
        ):
            code, out, err = run_cli(["demo", *argv])
        first = out.splitlines()[0]
        self.assertTrue(first.startswith(f"demo directory {self.tmp}/sshmux-demo-"), first)
        root = Path(first.split()[2])
        self.assertEqual(first, f"demo directory {root} (master log: {root / 'master.log'})")
        return code, out, err, root

    def test_projects_3_reaches_the_master_config(self) -> None:
        self.run_demo("--projects", "3")
        self.flushLoggedErrors(TimeoutError)
        [config] = self.configs
        self.assertEqual([b.name for b in config["builders"]], ["glib", "gtk", "libxml2"])
        self.assertEqual(
            sorted(w.workername for w in config["workers"]),
            sorted(f"{p}-{h}" for p in ("glib", "gtk", "libxml2") for h in demo.HOSTS),
        )

    def test_an_exception_keeps_the_directory_and_says_so(self) -> None:
        code, out, err, root = self.run_demo("--projects", "2")
        self.assertEqual(len(self.flushLoggedErrors(TimeoutError)), 1)  # its traceback, in master.log
        self.assertEqual(code, 1)
        self.assertTrue(root.is_dir(), "the failed run's directory was removed")
        self.assertTrue((root / "master" / "sshmux" / "authorized_hosts").exists())
        self.assertEqual(
            err.splitlines(),
            [
                "demo failed: gave up after 90s waiting for the master to start",
                f"kept the demo directory {root}; its logs: {root / 'master.log'}",
            ],
        )
        self.assertNotIn("summary", out)

    def test_a_build_not_green_keeps_the_directory_and_says_so(self) -> None:
        self.outcome = demo.Outcome(figures=figures(green=3, total=4, failed=["gtk on fedora-41 (failure)"]))
        code, out, err, root = self.run_demo()
        self.assertEqual(code, 1)
        self.assertTrue(root.is_dir(), "the failed run's directory was removed")
        self.assertIn("builds green/total                           3/4", out)  # the summary, as always
        lines = err.splitlines()
        self.assertEqual(lines[0], "demo failed: 1 of 4 builds not green: gtk on fedora-41 (failure)")
        self.assertTrue(
            lines[1].startswith(f"kept the demo directory {root}; its logs: {root / 'master.log'}")
        )
        self.assertEqual(len(lines), 2, err)

    def test_no_build_at_all_is_a_failure(self) -> None:
        self.outcome = demo.Outcome(figures=figures(green=0, total=0))
        code, out, err, root = self.run_demo()
        self.assertEqual(code, 1)
        self.assertTrue(root.is_dir())
        self.assertIn("demo failed: no build ran", err)

    def test_an_interruption_keeps_the_directory_and_says_so(self) -> None:
        def interrupted(root: Path, projects: list[str], hosts: list[str]) -> demo.Outcome:
            raise KeyboardInterrupt

        with mock.patch.object(demo, "_spin", interrupted):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                self.assertRaises(KeyboardInterrupt, admin.main, ["demo"])
        [root] = self.tmp.glob("sshmux-demo-*")
        self.assertIn(f"kept the demo directory {root}", err.getvalue())

    def test_a_good_run_removes_its_directory(self) -> None:
        self.outcome = demo.Outcome(figures=figures(green=4, total=4))
        code, out, err, root = self.run_demo()
        self.assertEqual((code, err), (0, ""))
        self.assertFalse(root.exists(), "a good run without --keep kept its directory")
        self.assertTrue(
            out.rstrip().endswith("builds green/total                           4/4 in 0.0s"), out
        )

    def test_keep_keeps_a_good_run_and_prints_its_path(self) -> None:
        self.outcome = demo.Outcome(figures=figures(green=4, total=4))
        code, out, err, root = self.run_demo("--keep")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(root.is_dir(), "--keep removed the directory")
        self.assertEqual(out.splitlines()[-1], f"kept the demo directory {root}")
