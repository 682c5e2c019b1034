"""The base of the tests that run a real Buildbot master and ``ssh-worker`` processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from buildbot_sshmux import testing as T


class RealMasterCase(unittest.TestCase):
    """A fresh directory and master log per test; set-up always undone."""

    tmp_prefix = "sshmux-it-"
    log_class: Any = T.LogCapture
    # Errors Buildbot or Twisted log (with a traceback) on a path the test
    # provokes: (exception type, message).  Any other logged error fails the test.
    expected_errors: tuple[tuple[type[BaseException], str], ...] = ()

    def setUp(self) -> None:
        self.addCleanup(self.flush_expected_errors)
        self.root = Path(tempfile.mkdtemp(prefix=self.tmp_prefix))
        if not os.environ.get("SSHMUX_KEEP_TMP"):
            self.addCleanup(shutil.rmtree, self.root, True)
        self.log = self.log_class(self.root / "master.log")
        self.log.start()
        self.addCleanup(self.log.stop)
        self.launchers: list[T.LauncherProcess] = []
        self.master: Any = None

    def flush_expected_errors(self) -> None:
        for kind, message in self.expected_errors:
            for failure in self.flushLoggedErrors(kind):
                if message not in str(failure.value):
                    self.fail(f"unexpected logged error: {failure.getTraceback()}")

    def make_site(self, hosts: Sequence[str]) -> T.Site:
        self.site = T.Site(self.root, list(hosts))
        return self.site
