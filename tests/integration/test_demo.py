"""``buildbot-sshmux demo --projects 2``, run for real as a child process (a few seconds each).

A real master, two ``ssh-worker`` launchers, four builds, the plain PB
comparison.  The demo's directory is made under a scratch TMPDIR, so what a
run leaves behind can be seen.  The child imports the installed package (as
its ``ssh-worker`` children do): it runs from the scratch directory, not from
the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

# The demo with every build's command replaced by `false`: the builds fail, nothing else does.
FAILING_BUILDS = """\
import functools, sys
from buildbot_sshmux.demo import harness, run
harness.master_config = functools.partial(harness.master_config, command=["false"])
sys.exit(run.main(sys.argv[1:]))
"""


class DemoRuns(TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="sshmux-demo-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def demo(self, *argv: str, program: list[str] | None = None) -> tuple[int, str, str]:
        """The demo with ``argv``; (exit status, stdout, stderr)."""
        done = subprocess.run(
            [sys.executable, *(program or ["-m", "buildbot_sshmux.cli.admin", "demo"]), *argv],
            cwd=self.tmp,
            env={**os.environ, "TMPDIR": str(self.tmp)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.returncode, done.stdout, done.stderr

    def demo_directory(self, out: str) -> Path:
        """The directory the demo's first line names."""
        first = out.splitlines()[0]
        self.assertTrue(first.startswith(f"demo directory {self.tmp}/sshmux-demo-"), first)
        return Path(first.split()[2])

    def test_a_green_run_exits_0_and_removes_its_directory(self) -> None:
        code, out, err = self.demo("--projects", "2")
        self.assertEqual(code, 0, out + err)
        self.assertIn("worker sessions                              4 (2 projects x 2 hosts)", out)
        self.assertIn("SSH connections at the master                2 (", out)
        self.assertIn("builds green/total                           4/4 in ", out)
        self.assertFalse(self.demo_directory(out).exists(), "a good run kept its directory")

    def test_keep_keeps_a_green_run_and_prints_its_path(self) -> None:
        code, out, err = self.demo("--projects", "2", "--keep")
        self.assertEqual(code, 0, out + err)
        root = self.demo_directory(out)
        self.assertEqual(out.splitlines()[-1], f"kept the demo directory {root}")
        self.assertTrue((root / "master.log").is_file())
        self.assertTrue((root / "debian-sid" / "ssh-worker.log").is_file())

    def test_failed_builds_keep_the_directory_their_message_names(self) -> None:
        code, out, err = self.demo("--projects", "2", program=["-c", FAILING_BUILDS])
        self.assertEqual(code, 1, out + err)
        self.assertIn("builds green/total                           0/4 in ", out)
        root = self.demo_directory(out)
        lines = err.splitlines()
        self.assertEqual(len(lines), 2, err)
        self.assertEqual(
            lines[0],
            "demo failed: 4 of 4 builds not green: glib on debian-sid (failure), glib on fedora-41 "
            "(failure), gtk on debian-sid (failure), gtk on fedora-41 (failure)",
        )
        self.assertTrue(lines[1].startswith(f"kept the demo directory {root}; its logs: "), lines[1])
        named = lines[1].split("its logs: ")[1].split(" (")[0].split(", ")
        self.assertEqual(
            named,
            [
                str(root / "master.log"),
                str(root / "debian-sid" / "ssh-worker.log"),
                str(root / "fedora-41" / "ssh-worker.log"),
                str(root / "plain-pb.log"),
            ],
        )
        for log in named:
            self.assertTrue(Path(log).is_file(), f"{log} was named but is gone")
        self.assertTrue((root / "master" / "state.sqlite").is_file())

    def test_a_bad_option_is_one_line_and_exit_2(self) -> None:
        code, out, err = self.demo("--projects", "2", "--bogus")
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(
            err,
            "buildbot-sshmux demo: unrecognized arguments: --bogus; buildbot-sshmux demo --help lists the options\n",
        )
        self.assertEqual(list(self.tmp.iterdir()), [], "a bad option made a directory")
