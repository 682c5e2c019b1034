"""``ssh-worker import``: existing buildbot-worker directories become launcher sessions.

A ``buildbot.tac`` as ``buildbot-worker create-worker`` writes it is read
without running it (its literal assignments, parsed with `ast`); the worker
directory is used in place, its password goes to a 0600 file beside the
launcher config (never into the TOML), and each option says whether it still
means something over SSH.  A ``buildbot.tac`` that is not the standard form
is reported with its path and skipped.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

from attrs import frozen

from buildbot_sshmux.errors import ConfigError

NEEDED = ("workername", "passwd")

IGNORED = {
    "maxdelay": "the launcher's one connection per master redials with its own backoff (at most 30 s)",
    "maxretries": "sessions retry for as long as the launcher runs",
    "allow_shutdown": "ssh-worker stop --graceful (or SIGUSR1) stops every session gracefully",
    "use_tls": "the SSH connection encrypts every session",
    "connection_string": "the launcher reaches the master over its SSH connection",
    "proxy_connection_string": "the launcher reaches the master over its SSH connection",
    "buildmaster_host": "the config's [master] or [cluster] says where the master is",
    "rotateLength": "the launcher keeps one log (ssh-worker run --logfile)",
    "maxRotatedFiles": "the launcher keeps one log (ssh-worker run --logfile)",
}
"""The options of a buildbot.tac that mean nothing over SSH, and why."""


class NotStandard(ConfigError):
    """A buildbot.tac this tool will not read; the message names it and says why."""


@frozen
class ImportedWorker:
    name: str
    password: str
    basedir: Path
    keepalive: int | None
    umask: int | None
    numcpus: int | None
    delete_leftover_dirs: bool
    port: int | None
    ignored: tuple[str, ...]  # the options set that mean nothing over SSH


def _literals(tree: ast.Module) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                values.setdefault(node.targets[0].id, _NOT_LITERAL)
    return values


_NOT_LITERAL = object()


def _calls_worker(tree: ast.Module) -> bool:
    imports = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "buildbot_worker.bot"
        and any(a.name == "Worker" for a in n.names)
        for n in tree.body
    )
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Worker"
    ]  # fmt: skip
    return imports and len(calls) == 1


def read_tac(worker_dir: Path) -> ImportedWorker:
    """The session a worker directory stands for; `NotStandard` if its buildbot.tac is not the standard form."""
    tac = worker_dir / "buildbot.tac"
    try:
        text = tac.read_text(encoding="utf-8")
    except OSError as e:
        raise NotStandard(f"{tac}: cannot be read ({e.strerror}); skipped") from None
    try:
        tree = ast.parse(text, str(tac))
    except SyntaxError as e:
        raise NotStandard(f"{tac}:{e.lineno}: not Python ({e.msg}); skipped") from None
    if not _calls_worker(tree):
        raise NotStandard(
            f"{tac}: not the form buildbot-worker create-worker writes (no Worker(...) call); skipped"
        )
    values = _literals(tree)
    for name in (*NEEDED, "keepalive", "umask", "numcpus", "delete_leftover_dirs", "port", "protocol"):
        if values.get(name) is _NOT_LITERAL:
            raise NotStandard(f"{tac}: {name} is computed, not written out; skipped (edit it into a value)")
    missing = [n for n in NEEDED if not isinstance(values.get(n), str)]
    if missing:
        raise NotStandard(f"{tac}: no {missing[0]} = '...' line; skipped")
    protocol = values.get("protocol", "pb")
    if protocol not in (None, "pb"):
        raise NotStandard(
            f"{tac}: protocol {protocol!r} is not PB, and only PB runs over SSH channels; skipped"
        )
    ignored = tuple(
        name for name in IGNORED
        if values.get(name) not in (None, 0, False, "", _NOT_LITERAL) and not (name == "maxdelay" and values[name] == 300)
    )  # fmt: skip
    return ImportedWorker(
        name=values["workername"],
        password=values["passwd"],
        basedir=worker_dir.absolute(),
        keepalive=_int_or_none(values.get("keepalive")),
        umask=_int_or_none(values.get("umask")),
        numcpus=_int_or_none(values.get("numcpus")),
        delete_leftover_dirs=bool(values.get("delete_leftover_dirs")),
        port=_int_or_none(values.get("port")),
        ignored=ignored,
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def worker_table(worker: ImportedWorker, password_file: str) -> str:
    """The ``[[worker]]`` table of an imported directory (TOML)."""
    lines = [
        f"# imported from {worker.basedir}/buildbot.tac",
        "[[worker]]",
        f"name = {_toml_string(worker.name)}",
        f"password_file = {_toml_string(password_file)}",
        f"basedir = {_toml_string(str(worker.basedir))}",
    ]
    if worker.keepalive is not None:
        lines.append(f"keepalive = {worker.keepalive}")
    if worker.umask is not None:
        lines.append(f"umask = 0o{worker.umask:o}")
    if worker.numcpus is not None:
        lines.append(f"numcpus = {worker.numcpus}")
    if worker.delete_leftover_dirs:
        lines.append("delete_leftover_dirs = true")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_password(path: Path, password: str) -> None:
    """Write ``path`` (mode 0600); an existing file must hold the same password."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if path.exists():
        if path.read_text(encoding="utf-8").strip() != password:
            raise ConfigError(f"{path} exists and holds another password; remove it or rename the worker")
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")


def import_dirs(config: Path, dirs: list[Path], out: Any) -> int:
    """Append a ``[[worker]]`` table per directory to ``config``; print what was
    done to ``out``; return how many directories were skipped."""
    from buildbot_sshmux.worker.config import load, tomllib

    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(
            f"{config}: cannot be read ({e.strerror}); make it first with: ssh-worker init"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{config}: not valid TOML ({e})") from None
    known = {t.get("name") for t in data.get("worker", []) if isinstance(t, dict)}
    masters = data.get("master", [])
    pb_ports = {m.get("pb_port", 9989) for m in ([masters] if isinstance(masters, dict) else masters)}
    tables: list[str] = []
    skipped = 0
    ignored_by: dict[str, list[str]] = {}
    for directory in dirs:
        try:
            worker = read_tac(directory)
        except NotStandard as e:
            print(e, file=out)
            skipped += 1
            continue
        if worker.name in known:
            print(f"{directory}: worker {worker.name!r} is in {config} already; skipped", file=out)
            skipped += 1
            continue
        known.add(worker.name)
        password_file = f"passwords/{worker.name}"
        write_password(config.parent / password_file, worker.password)
        tables.append(worker_table(worker, password_file))
        for name in worker.ignored:
            ignored_by.setdefault(name, []).append(worker.name)
        note = ""
        if worker.port is not None and pb_ports and worker.port not in pb_ports:
            note = f" (its buildbot.tac says port {worker.port}; the config's pb_port is used)"
        print(f"imported {worker.name} from {directory}{note}", file=out)
    if tables:
        with config.open("a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(tables))
    for name, workers in sorted(ignored_by.items()):
        print(f"ignored {name} ({len(workers)} workers): {IGNORED[name]}", file=out)
    print(
        f"{len(tables)} imported, {skipped} skipped; passwords in {config.parent / 'passwords'} (mode 0600)",
        file=out,
    )
    if tables:
        load(config)  # the config as it is now must load: say so here, not at the next start
    return skipped
