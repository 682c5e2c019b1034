"""Scratch directories outside the source tree, removed after each test.

(trial's ``TestCase.mktemp`` makes them under the working directory, which
under pytest is the repository itself.)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase


def scratch_dir(testcase: TestCase) -> Path:
    """A new empty directory that is deleted when ``testcase`` ends."""
    path = Path(tempfile.mkdtemp(prefix="sshmux-unit-"))
    testcase.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path
