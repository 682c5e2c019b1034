"""The fault suite runs only when asked: ``tox -e faults`` (SSHMUX_FAULTS=1).

Its cases take minutes (ten cuts mid-build, a master restart with 200
sessions, ...), so the default ``tox`` run skips them.  At the end of a run
the figures every case measured are printed together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
ENABLED = os.environ.get("SSHMUX_FAULTS") == "1"


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="fault suite: run it with `tox -e faults` (or SSHMUX_FAULTS=1)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.faults.harness import FIGURES, show

    if not FIGURES:
        return
    terminalreporter.section("fault suite figures")
    for test, values in FIGURES:
        terminalreporter.write_line(f"{test}:")
        for key, value in values.items():
            terminalreporter.write_line(f"    {key:<34} {show(value)}")
