"""``--version`` and ``--help`` on both tools: versions, and help text without markup."""

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


def help_of(main: Callable[[list[str]], int], argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*argv, "--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
    return out.getvalue()


class HelpTests(TestCase):
    def test_no_markup_in_any_help(self) -> None:
        tools = {
            admin.main: [[], ["init"], ["hostkey"], ["authorize"], ["revoke"], ["list"]],
            ssh_worker.main: [[], ["run"], ["keygen"], ["init"]],
        }
        for main, commands in tools.items():
            for argv in commands:
                text = help_of(main, argv)
                self.assertIn("usage:", text, argv)
                self.assertNotIn("`", text, f"{argv}: {text}")
