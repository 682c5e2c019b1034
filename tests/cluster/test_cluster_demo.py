"""``buildbot-sshmux demo --cluster --projects 3``, run for real as a child process (~30 s).

Three masters, PostgreSQL and crossbar of the demo's own (not the session's:
the demo starts its parts itself), two ``ssh-worker`` hosts of 3 sessions
each, 5 stock workers; master a SIGKILLed mid-build.  The exit status and the
summary's lines are checked.  The child runs from a scratch directory with
TMPDIR there, so what a run leaves behind can be seen.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import FIGURES, KEEP, need_parts


@pytest.mark.timeout(480)
def test_the_cluster_demo_kills_a_master_and_every_build_ends_green() -> None:
    need_parts()
    tmp = Path(tempfile.mkdtemp(prefix="sshmux-cluster-demo-test-"))
    tmp.chmod(0o711)  # as root, the demo's PostgreSQL runs as user postgres, under this directory
    try:
        done = subprocess.run(
            [sys.executable, "-m", "buildbot_sshmux.cli.admin", "demo", "--cluster", "--projects", "3"],
            cwd=tmp,
            env={**os.environ, "TMPDIR": str(tmp)},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=420,
        )
        out, err = done.stdout, done.stderr
        assert done.returncode == 0, out + err
        assert err == "", err
        root = Path(out.splitlines()[0].split()[2])
        assert root.parent == tmp and root.name.startswith("sshmux-demo-cluster-"), out
        assert not root.exists(), "a good run kept its directory"

        lines = out.splitlines()
        start = lines.index("buildbot-sshmux cluster demo summary")
        rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[start + 2 :])
        FIGURES.extend(f"[figures] cluster demo --projects 3: {k}: {v}" for k, v in rows.items())
        assert rows["worker sessions"].startswith("6 (3 projects x 2 hosts"), rows
        before = dict(
            (m, int(n)) for m, n in re.findall(r"(\w) (\d+)", rows["sessions per master before the kill"])
        )
        assert sorted(before) == ["a", "b", "c"] and sum(before.values()) == 6, rows
        after = re.fullmatch(r"a 0 \(killed\), b (\d+), c (\d+)", rows["sessions per master after"])
        assert after and int(after[1]) + int(after[2]) == 6, rows
        moved = before["a"]
        assert moved >= 1, rows
        assert rows["re-attach after the kill"].startswith(f"{moved}/{moved} of master a's sessions, p50 "), (
            rows
        )
        running = int(re.fullmatch(r"with (\d+) builds running on it", rows["master a killed (SIGKILL)"])[1])
        assert running == moved, rows  # one build per session, each running at the kill
        assert rows["builds green/total"].startswith("6/6 in "), rows
        assert rows["interrupted by the kill"] == f"{running}; {running} finished RETRY on a", rows
        assert rows["run again"].startswith(f"{running}/{running} green ("), rows
        assert rows["stock workers (plain PB/TCP to a)"] == (
            "5/5 attached before the kill, 0/5 after (they stay detached)"
        ), rows
        assert re.fullmatch(r"\d+\.\ds after the kill", rows["master a marked inactive"]), rows
    finally:
        if not KEEP:
            shutil.rmtree(tmp, ignore_errors=True)
