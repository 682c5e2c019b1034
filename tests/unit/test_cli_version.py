"""``--version`` on both tools: this package's version and what it runs on."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from importlib import metadata

from twisted.trial.unittest import TestCase

from buildbot_sshmux import __version__
from buildbot_sshmux.cli import admin, ssh_worker


def version_of(main: Callable[[list[str]], int]) -> str:
    """What ``TOOL --version`` prints (argparse prints it and exits 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["--version"])
        except SystemExit as e:
            assert e.code == 0, e.code
        else:
            raise AssertionError("--version did not exit")
    return out.getvalue()


class VersionTests(TestCase):
    def test_buildbot_sshmux_names_itself_twisted_and_buildbot(self) -> None:
        text = version_of(admin.main)
        self.assertIn(f"buildbot-sshmux {__version__}", text)
        self.assertIn(f"twisted {metadata.version('twisted')}", text)
        self.assertIn(f"buildbot {metadata.version('buildbot')}", text)

    def test_ssh_worker_names_itself_twisted_and_buildbot_worker(self) -> None:
        text = version_of(ssh_worker.main)
        self.assertIn(f"ssh-worker {__version__}", text)
        self.assertIn(f"buildbot-worker {metadata.version('buildbot-worker')}", text)
