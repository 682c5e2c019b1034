"""What a cluster needs besides Python packages: PostgreSQL and crossbar, and the script that installs them.

``.ci/install-cluster`` (idempotent: Debian's ``postgresql``, crossbar in a
venv of its own) is part of a checkout, not of the installed package: it is
looked for in the current directory (``tox`` runs from the checkout), then in
the source tree this package was imported from (an editable install).
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from .pg import find_bindir
from .router import default_venv, find_crossbar

INSTALL_COMMAND = "bash .ci/install-cluster"
SCRIPT = Path(".ci") / "install-cluster"
SOURCE_TREE = Path(__file__).resolve().parents[3]  # buildbot_sshmux/demo/cluster/parts.py
# What the masters import that the master extra does not pull: (module, pip requirement).
PYTHON_PACKAGES = [("psycopg2", "psycopg2-binary"), ("buildbot_www", "buildbot-www")]


def find_install_script(*also: Path) -> Path | None:
    """``.ci/install-cluster``: in the current directory, else in this package's source tree,
    else in the checkouts ``also`` names."""
    for base in (Path.cwd(), SOURCE_TREE, *also):
        if (base / SCRIPT).is_file():
            return (base / SCRIPT).resolve()
    return None


def postgres_bindir() -> Path | None:
    """Where initdb is (`pg.find_bindir`), if it is there."""
    bindir = find_bindir()
    return bindir if bindir is not None and (bindir / "initdb").exists() else None


def missing_parts() -> list[str]:
    """What is missing of PostgreSQL and crossbar, each with where it was looked for."""
    missing = []
    if postgres_bindir() is None:
        bindir = find_bindir()
        where = f"in {bindir}" if bindir else "under /usr/lib/postgresql/*/bin or on PATH"
        missing.append(f"PostgreSQL (no initdb {where})")
    if find_crossbar() is None:
        missing.append(f"crossbar (SSHMUX_CROSSBAR unset, no completed venv at {default_venv()})")
    return missing


def missing_python_packages() -> list[str]:
    """The pip requirements of `PYTHON_PACKAGES` this interpreter cannot import."""
    return [
        requirement for module, requirement in PYTHON_PACKAGES if importlib.util.find_spec(module) is None
    ]


def run_install_script(script: Path, capture: bool) -> subprocess.CompletedProcess[str]:
    """``bash SCRIPT``: its output captured (no stdin: sudo fails at once rather than asks),
    or on this terminal (sudo may ask for a password there)."""
    if capture:
        return subprocess.run(["bash", str(script)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return subprocess.run(["bash", str(script)], text=True)
