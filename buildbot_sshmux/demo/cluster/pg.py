"""A private PostgreSQL server (a test session's, the demo's): its own data directory, port and socket.

Debian's binaries (``/usr/lib/postgresql/N/bin``, off PATH) or SSHMUX_PG_BINDIR;
the server runs as the ``postgres`` user when the tests run as root (PostgreSQL
refuses root), trusts every local connection, listens on 127.0.0.1 only, keeps
its unix socket in its data directory and never fsyncs.  Tests get a database
each, copied from a template (``CREATE DATABASE x TEMPLATE t``: ~0.1 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .procs import free_port, tail

INITDB_OPTIONS = "-A trust -U postgres -E UTF8 --no-locale --no-sync"
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    " -c full_page_writes=off -c max_connections=300"
)


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl are: SSHMUX_PG_BINDIR, Debian's newest, or PATH."""
    configured = os.environ.get("SSHMUX_PG_BINDIR")
    if configured:
        return Path(configured)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain database name: {name!r}")
    return f'"{name}"'


class PostgresServer:
    """One PostgreSQL server: `start`, `create_database`, `url`, `query`, `stop`."""

    def __init__(self, bindir: Path, directory: Path | None = None) -> None:
        self.bindir = bindir
        self.directory = directory or Path(tempfile.mkdtemp(prefix="sshmux-pg-"))
        self.datadir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port = 0
        self.running = False
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.directory, "postgres", "postgres")

    def _run(self, *argv: str) -> None:
        command = [*self._as_postgres, str(self.bindir / argv[0]), *argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.directory)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
                f"\n--- {self.log_path}:\n{tail(self.log_path)}"
            )

    def start(self, timeout: int = 60, attempts: int = 3) -> None:
        """initdb, then start on a free port (another one if that port was taken meanwhile)."""
        if not self.datadir.exists():
            self._run("initdb", "-D", str(self.datadir), *INITDB_OPTIONS.split())
        for attempt in range(attempts):
            self.port = free_port()
            options = f"{SERVER_OPTIONS} -p {self.port} -k {self.datadir}"
            datadir, log = str(self.datadir), str(self.log_path)
            try:
                self._run(
                    "pg_ctl", "-D", datadir, "-l", log, "-w", "-t", str(timeout), "-o", options, "start"
                )
            except RuntimeError:
                if attempt + 1 == attempts or "already in use" not in tail(self.log_path, 10):
                    raise
                continue
            self.running = True
            return

    def stop(self) -> None:
        """Stop at once (``-m immediate``: the data is thrown away anyway)."""
        if self.running:
            self.running = False
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        """Stop, and delete the data directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- databases -----------------------------------------------------------

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of a database (psycopg2: SQLAlchemy 2.1's plain
        ``postgresql://`` means psycopg 3)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        """A psycopg2 connection in autocommit mode (close it when done)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database)
        conn.autocommit = True
        return conn

    def query(self, database: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows ([] for a statement without rows)."""
        conn = self.connect(database)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, tuple(params))
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            conn.close()

    def create_database(self, name: str, template: str | None = None) -> str:
        """CREATE DATABASE (a copy of ``template`` if given, which nobody may be connected to);
        return its URL."""
        sql = f"CREATE DATABASE {_identifier(name)}"
        if template is not None:
            sql += f" TEMPLATE {_identifier(template)}"
        self.query("postgres", sql)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE, closing whatever is still connected to it."""
        self.query("postgres", f"DROP DATABASE IF EXISTS {_identifier(name)} WITH (FORCE)")
