"""The ``ssh-worker`` configuration file (TOML).

::

    [master]
    address = "buildmaster.example.org:2222"  # the port defaults to 2222
    host_key = "ssh-ed25519 AAAA..."      # pinned (a key line or SHA256:...); or known_hosts = "path"
    # or host_ca = "ssh-ed25519 AAAA...": any host key with a host certificate of that CA
    identity = "id_ed25519"               # this host's private key (OpenSSH format)
    # its certificate, if id_ed25519-cert.pub is beside it, is offered first
    pb_port = 9989                        # the master's PB port, reached through the channel

    [[worker]]
    name = "libxml2-debian-sid"
    password = "..."                      # or password_file = "path"
    basedir = "workers/libxml2"           # relative paths: to the config file

Many sessions alike are one ``[[workers]]`` table: ``{project}`` in its
``name``, ``basedir`` (default ``workers/{project}``) and ``password_file``
stands for each name of ``projects``::

    [[workers]]
    projects = ["libxml2", "glib", "gtk"]
    name = "{project}-debian-sid"
    password_file = "passwords/{project}"

Unmodified ``buildbot-worker`` processes reach the master through a
``[[forward]]``: a local listener (127.0.0.1 unless ``listen`` names a host)
whose every connection is one channel on the shared SSH connection::

    [[forward]]
    listen = "9989"          # their buildbot.tac says localhost:9989
    master = "gnome"         # optional with one master or cluster

Behind an HTTP proxy, a master (or cluster) table says ``proxy =
"http://[user:password@]host:port"``, or ``proxy = "env"`` to follow
``https_proxy``/``all_proxy`` and ``no_proxy`` as curl does.

``control_socket = "PATH"`` (at the top, before any table) is where the
running launcher answers ``ssh-worker status``, ``reload`` and ``stop``; by
default the config's name with ``.sock`` beside it.

``metrics = "127.0.0.1:9102"`` (at the top too; or a port number, on
127.0.0.1, or a strports description) serves Prometheus metrics at
``/metrics`` (`buildbot_sshmux.worker.metrics`); it needs prometheus_client
(``pip install 'buildbot-sshmux[worker,metrics]'``).  Both are read when the
launcher starts; a reload does not move them.

Several masters: write ``[[master]]`` tables with a ``name`` each, and give
every worker ``master = "NAME"``.

A cluster of masters (Buildbot's multi-master: one database, one message
queue) is one table, with every key of ``[master]`` but ``address``, shared::

    [cluster]
    name = "gnome"                                 # optional
    masters = ["m1.example.org", "m2.example.org", { address = "m3.example.org", weight = 2 }]
    known_hosts = "known_hosts"
    identity = "id_ed25519"

Each worker session is attached to one of them at a time: the first reachable
master in its own order (rendezvous hashing of its name, bounded so that each
master is first for a number of this host's sessions within 10% of its
share), so a restart of the launcher places every session where it was.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from attrs import fields_dict, frozen

from buildbot_sshmux.errors import ConfigError, SSHMuxError
from buildbot_sshmux.wire import defaults
from buildbot_sshmux.wire import metrics as metrics_http
from buildbot_sshmux.wire.address import parse_address
from buildbot_sshmux.wire.liveness import Liveness
from buildbot_sshmux.wire.proxy import ProxyURL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MASTER_KEYS = {
    "name", "address", "host_key", "known_hosts", "identity", "identity_passphrase_file",
    "pb_port", "username", "proxy", "host_ca", "identity_certificate", *fields_dict(Liveness),
}  # fmt: skip
WORKER_KEYS = {
    "name", "password", "password_file", "basedir", "master", "keepalive", "umask", "numcpus",
    "delete_leftover_dirs",
}  # fmt: skip
CLUSTER_KEYS = (MASTER_KEYS - {"address"}) | {"masters"}
PATTERN_KEYS = {"name", "basedir", "password_file"}  # where a [[workers]] table's {project} goes
# What a [cluster] masters entry may set for itself.
MEMBER_KEYS = {"address", "weight", "pb_port", "host_key", "host_ca"}


def _default(cls: type, key: str) -> Any:
    """The default of a config class's field: each default is written once, there."""
    return fields_dict(cls)[key].default


@frozen
class WorkerConfig:
    name: str
    password: str
    basedir: Path
    master: str
    keepalive: int = defaults.WORKER_KEEPALIVE
    umask: int | None = None
    numcpus: int | None = None  # what the worker reports to the master (default: this host's CPUs)
    delete_leftover_dirs: bool = False  # buildbot-worker's: remove build dirs no builder uses


@frozen
class MasterConfig:
    name: str
    host: str
    port: int
    identity: Path
    host_keys: tuple[str, ...] = ()
    known_hosts: Path | None = None
    identity_passphrase_file: Path | None = None
    host_cas: tuple[str, ...] = ()  # CAs whose host certificates stand for the master's key
    identity_certificate: Path | None = None  # None: IDENTITY-cert.pub, if it exists
    pb_port: int = defaults.PB_PORT
    username: str = defaults.SSH_USERNAME
    liveness: Liveness = Liveness()
    proxy: str | None = None  # an HTTP CONNECT proxy URL, or "env" for the *_proxy variables
    cluster: str | None = None  # the [cluster] this master is one of
    weight: float = 1.0  # its share of the cluster's sessions


@frozen
class ForwardConfig:
    listen: str  # a Twisted strports description, e.g. tcp:9989:interface=127.0.0.1
    address: str  # HOST:PORT, as the config wrote it (for log lines)
    master: str  # a [[master]] or [cluster] name


@frozen
class ClusterConfig:
    name: str
    masters: tuple[str, ...]  # MasterConfig names, which are their addresses


@frozen
class LauncherConfig:
    path: Path
    masters: tuple[MasterConfig, ...]
    workers: tuple[WorkerConfig, ...]
    clusters: tuple[ClusterConfig, ...] = ()
    forwards: tuple[ForwardConfig, ...] = ()
    control_socket: Path | None = None  # where `ssh-worker status` finds the running launcher
    metrics: str | None = None  # where to serve Prometheus metrics (a strports description)

    @property
    def control_path(self) -> Path:
        """``control_socket``, or the config's own name with ``.sock`` beside it."""
        return self.control_socket or self.path.with_suffix(".sock")


def _fail(path: Path, where: str, message: str) -> ConfigError:
    line = _line_of(path, where)
    return ConfigError(f"{path}{f':{line}' if line else ''}: {where}: {message}")


def _line_of(path: Path, where: str) -> int | None:
    """The line of the table that ``where`` names ("[master]", "[[worker]] #2",
    "worker 'NAME'"): tomllib gives positions for syntax errors only."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    numbered = re.match(r"\[\[(\w+)\]\] #(\d+)", where)
    named = re.fullmatch(r"worker '(.*)'", where)
    if named:  # the [[worker]] header above its name = "..." line
        name_line = re.compile(rf"""\s*name\s*=\s*["']{re.escape(named[1])}["']""")
        at = next((i for i, text in enumerate(lines) if name_line.match(text)), None)
        if at is None:
            return None
        header = next((i for i in range(at, -1, -1) if lines[i].strip().startswith("[")), at)
        return header + 1
    if where in ("[master]", "[cluster]"):
        pattern, nth = re.compile(rf"\s*\[{where[1:-1]}\]"), 1
    elif numbered:
        pattern, nth = re.compile(rf"\s*\[\[{numbered[1]}\]\]"), int(numbered[2])
    else:
        return None
    found = [i + 1 for i, text in enumerate(lines) if pattern.match(text)]
    return found[nth - 1] if len(found) >= nth else None


LIVENESS_KEYS = tuple(fields_dict(Liveness))  # keepalive_interval, ... rekey_interval


def _int(path: Path, where: str, table: dict[str, Any], key: str, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _fail(path, where, f"{key} must be an integer, not {value!r}")


def _table(
    path: Path,
    where: str,
    table: Any,
    known: set[str],
    hidden: frozenset[str] | set[str] = frozenset(),
    not_table: str = "must be a table",
) -> None:
    """A table of ``known`` keys (and ``hidden`` ones, not listed in the error), or ConfigError."""
    if not isinstance(table, dict):
        raise _fail(path, where, not_table)
    unknown = sorted(set(table) - known - hidden)
    if unknown:
        raise _fail(path, where, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _bool(path: Path, where: str, table: dict[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if isinstance(value, bool):
        return value
    raise _fail(path, where, f"{key} must be true or false, not {value!r}")


def _str(path: Path, where: str, table: dict[str, Any], key: str) -> str | None:
    value = table.get(key)
    if value is None or isinstance(value, str):
        return value
    shown = type(value).__name__ if key == "password" else repr(value)  # never echo a password
    raise _fail(path, where, f"{key} must be a string, not {shown}")


def _split_address(path: Path, where: str, address: Any) -> tuple[str, int]:
    if not isinstance(address, str) or not address:
        raise _fail(path, where, 'address must be "HOST:PORT"')
    try:
        return parse_address(address)
    except ValueError as e:
        raise _fail(path, where, f'address must be "HOST:PORT": {e}') from None


def _pins(path: Path, where: str, table: dict[str, Any], key: str) -> tuple[str, ...]:
    """host_key or host_ca: a key line or a SHA256: fingerprint, or a list of them."""
    pins = table.get(key, ())
    pins = (pins,) if isinstance(pins, str) else pins
    if not isinstance(pins, (list, tuple)) or not all(isinstance(p, str) for p in pins):
        raise _fail(path, where, f"{key} must be a key line, a SHA256: fingerprint, or a list of them")
    return tuple(pins)


def _master(path: Path, index: int, table: Any, single: bool, where: str = "") -> MasterConfig:
    where = where or ("[master]" if single else f"[[master]] #{index + 1}")
    _table(path, where, table, MASTER_KEYS, {"cluster", "weight"} if where == "[cluster]" else set())
    host, port = _split_address(path, where, table.get("address"))
    pins, cas = _pins(path, where, table, "host_key"), _pins(path, where, table, "host_ca")
    known_hosts = _str(path, where, table, "known_hosts")
    for key in ("identity", "identity_passphrase_file", "username", "name", "identity_certificate"):
        _str(path, where, table, key)
    if not pins and not known_hosts and not cas:
        raise _fail(
            path,
            where,
            "no host_key, host_ca or known_hosts: pin the master's key (buildbot-sshmux init prints it)",
        )
    if "identity" not in table:
        raise _fail(
            path, where, "identity (this host's private key) is missing; make one with: ssh-worker keygen"
        )
    base = path.parent
    name = table.get("name", f"{host}:{port}")
    return MasterConfig(
        name=str(name),
        host=host,
        port=port,
        identity=base / str(table["identity"]),
        host_keys=pins,
        known_hosts=base / str(known_hosts) if known_hosts else None,
        identity_passphrase_file=(
            base / str(table["identity_passphrase_file"]) if "identity_passphrase_file" in table else None
        ),
        host_cas=cas,
        identity_certificate=(
            base / str(table["identity_certificate"]) if "identity_certificate" in table else None
        ),
        username=str(table.get("username", defaults.SSH_USERNAME)),
        pb_port=_int(path, where, table, "pb_port", _default(MasterConfig, "pb_port")),
        liveness=Liveness(
            **{key: _int(path, where, table, key, _default(Liveness, key)) for key in LIVENESS_KEYS}
        ),
        proxy=_proxy(path, where, table),
        cluster=table.get("cluster"),
        weight=table.get("weight", 1.0),
    )


def _proxy(path: Path, where: str, table: dict[str, Any]) -> str | None:
    proxy = _str(path, where, table, "proxy")
    if proxy is None or proxy == "env":
        return proxy
    try:
        ProxyURL.parse(proxy)
    except ValueError as e:
        raise _fail(path, where, f'{e}, or "env" (https_proxy, all_proxy, no_proxy)') from None
    return proxy


def _cluster(path: Path, table: Any) -> tuple[ClusterConfig, list[MasterConfig]]:
    """The [cluster] table: one MasterConfig per member, sharing every other key."""
    where = "[cluster]"
    _table(path, where, table, CLUSTER_KEYS, not_table="must be a table (one [cluster] per config)")
    members = table.get("masters")
    if not isinstance(members, list) or not members:
        raise _fail(
            path, where, 'masters must be a list of "HOST[:PORT]" (or { address = ..., weight = ... })'
        )
    name = _str(path, where, table, "name") or "cluster"
    shared = {k: v for k, v in table.items() if k not in ("masters", "name")}
    masters = []
    for member in members:
        entry = {"address": member} if isinstance(member, str) else member
        if not isinstance(entry, dict) or set(entry) - MEMBER_KEYS or "address" not in entry:
            raise _fail(path, where, f'{member!r} in masters is not "HOST[:PORT]" or {{ address = ... }}')
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise _fail(path, where, f"the weight of {entry['address']} must be a number > 0, not {weight!r}")
        host, port = _split_address(path, where, entry["address"])
        merged = {**shared, **entry, "name": f"{host}:{port}", "cluster": name, "weight": weight}
        masters.append(_master(path, 0, merged, True, where))
    return ClusterConfig(name=name, masters=tuple(m.name for m in masters)), masters


def _worker(path: Path, index: int, table: Any, targets: list[str], where: str = "") -> WorkerConfig:
    expanded = bool(where)  # from a [[workers]] table: name it, not the generated name
    where = where or f"[[worker]] #{index + 1}"
    _table(path, where, table, WORKER_KEYS)
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(path, where, "name is missing")
    where = f"{where} worker {name!r}" if expanded else f"worker {name!r}"
    for key in ("password", "password_file", "basedir", "master"):
        _str(path, where, table, key)
    if "password" in table and "password_file" in table:
        raise _fail(path, where, "give password or password_file, not both")
    if "password_file" in table:
        pw_path = path.parent / str(table["password_file"])
        try:
            password = pw_path.read_text().strip()
        except OSError as e:
            raise _fail(path, where, f"password_file {pw_path} cannot be read ({e.strerror})") from None
    elif "password" in table:
        password = str(table["password"])
    else:
        raise _fail(path, where, "password or password_file is missing")
    master = _target(path, where, table, targets)
    basedir = path.parent / str(table.get("basedir", f"workers/{name}"))
    return WorkerConfig(
        name=name,
        password=password,
        basedir=basedir,
        master=master,
        keepalive=_int(path, where, table, "keepalive", _default(WorkerConfig, "keepalive")),
        umask=_int(path, where, table, "umask", None),
        numcpus=_int(path, where, table, "numcpus", None),
        delete_leftover_dirs=_bool(path, where, table, "delete_leftover_dirs", False),
    )


def control_path_of(path: Path) -> Path:
    """Where the launcher of the config at ``path`` answers, even if the config
    has an error now (``ssh-worker reload`` must reach it to be refused)."""
    path = path.absolute()
    try:
        control = tomllib.loads(path.read_text(encoding="utf-8")).get("control_socket")
    except (OSError, tomllib.TOMLDecodeError):
        control = None
    if isinstance(control, str) and control:
        return path.parent / control
    return path.with_suffix(".sock")


def _target(path: Path, where: str, table: dict[str, Any], targets: list[str]) -> str:
    """The master (or cluster) a table names, or the only one there is."""
    if "master" in table:
        master = str(table["master"])
        if master not in targets:
            raise _fail(
                path, where, f"master {master!r} is not a [[master]] or [cluster] name ({', '.join(targets)})"
            )
        return master
    if len(targets) == 1:
        return targets[0]
    raise _fail(path, where, 'several masters are configured: say which one with master = "NAME"')


def _forward(path: Path, index: int, table: Any, targets: list[str]) -> ForwardConfig:
    where = f"[[forward]] #{index + 1}"
    _table(path, where, table, {"listen", "master"})
    listen = table.get("listen")
    if isinstance(listen, int) and not isinstance(listen, bool):
        listen = str(listen)
    if not isinstance(listen, str) or not listen:
        raise _fail(path, where, 'listen must be "PORT" or "HOST:PORT" (127.0.0.1 unless HOST is given)')
    try:
        host, port = parse_address(f"127.0.0.1:{listen}" if listen.isdigit() else listen, default_port=None)
    except ValueError as e:
        raise _fail(path, where, f'listen must be "PORT" or "HOST:PORT": {e}') from None
    interface = host.replace(":", "\\:")
    return ForwardConfig(
        listen=f"tcp:{port}:interface={interface}",
        address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        master=_target(path, where, table, targets),
    )


def _expand(path: Path, where: str, table: Any) -> list[tuple[str, dict[str, Any]]]:
    """A [[workers]] table as one [[worker]] table per project: ``{project}``
    in name, basedir and password_file is replaced by each project's name."""
    _table(path, where, table, WORKER_KEYS | {"projects"})
    projects = table.get("projects")
    if not isinstance(projects, list) or not projects or not all(isinstance(p, str) and p for p in projects):
        raise _fail(path, where, 'projects must be a list of names, e.g. projects = ["glib", "gtk"]')
    name = table.get("name")
    if not isinstance(name, str) or "{project}" not in name:
        raise _fail(path, where, 'name must contain {project}, e.g. name = "{project}-debian-sid"')
    rest = {k: v for k, v in table.items() if k != "projects"}
    rest.setdefault("basedir", "workers/{project}")
    expanded = []
    for project in projects:
        one = {k: v.replace("{project}", project) if k in PATTERN_KEYS and isinstance(v, str) else v
               for k, v in rest.items()}  # fmt: skip
        expanded.append((project, one))
    return expanded


def load(path: str | Path) -> LauncherConfig:
    """Read and check a launcher config; ConfigError names the file and the fault."""
    path = Path(path).absolute()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(
        set(data) - {"master", "cluster", "worker", "workers", "forward", "control_socket", "metrics"}
    )
    if unknown:
        raise ConfigError(
            f"{path}: unknown key or section {unknown[0]!r}"
            " (known: control_socket, metrics, [master], [cluster], [[worker]], [[workers]], [[forward]])"
        )
    control = _str(path, "control_socket", data, "control_socket")
    metrics = _metrics(path, data)
    raw = data.get("master", [])
    if not raw and "cluster" not in data:
        raise ConfigError(f"{path}: no [master] or [cluster] section")
    single = isinstance(raw, dict)
    masters_list = [_master(path, i, t, single) for i, t in enumerate([raw] if single else raw)]
    targets = [m.name for m in masters_list]
    clusters = []
    if "cluster" in data:
        cluster, members = _cluster(path, data["cluster"])
        clusters.append(cluster)
        masters_list += members
        targets.append(cluster.name)
    masters = {m.name: m for m in masters_list}
    if len(masters) != len(masters_list) or len(set(targets)) != len(targets):
        raise ConfigError(f"{path}: two masters (or a master and the cluster) have the same name or address")
    workers = [_worker(path, i, t, targets) for i, t in enumerate(data.get("worker", []))]
    for i, table in enumerate(data.get("workers", [])):
        where = f"[[workers]] #{i + 1}"
        workers += [_worker(path, i, t, targets, f"{where} ({p!r})") for p, t in _expand(path, where, table)]
    forwards = [_forward(path, i, t, targets) for i, t in enumerate(data.get("forward", []))]
    listens = [f.listen for f in forwards]
    if len(set(listens)) != len(listens):
        raise ConfigError(f"{path}: two [[forward]] tables listen on the same address")
    if not workers and not forwards:
        raise ConfigError(f"{path}: no [[worker]], [[workers]] or [[forward]] tables: nothing to run")
    names = [w.name for w in workers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: worker {duplicates[0]!r} is listed twice")
    return LauncherConfig(
        path=path,
        masters=tuple(masters_list),
        workers=tuple(workers),
        clusters=tuple(clusters),
        forwards=tuple(forwards),
        control_socket=path.parent / control if control else None,
        metrics=metrics,
    )


def _metrics(path: Path, data: dict[str, Any]) -> str | None:
    if "metrics" not in data:
        return None
    try:
        description = metrics_http.listen_description(data["metrics"])
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        metrics_http.require()
    except SSHMuxError as e:
        raise ConfigError(f"{path}: {e}") from None
    return description
