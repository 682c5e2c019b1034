"""`SSHMuxService`: the SSH server as a Buildbot service in ``master.cfg``::

    from buildbot_sshmux import SSHMuxService
    c['protocols'] = {'pb': {'port': 'tcp:9989:interface=127.0.0.1'}}
    c['services'].append(SSHMuxService(
        port='tcp:2222',
        host_keys=['sshmux/ssh_host_ed25519_key'],
        authorized_hosts='sshmux/authorized_hosts'))

Relative paths are taken from the master's basedir.  Worker sessions arrive
as SSH channels and are handed, in process, to the master's PB port.

``buildbot-sshmux status BASEDIR`` asks the running service (`SSHMuxService.status`)
through its control socket, ``BASEDIR/sshmux/control.sock`` (mode 0600; set
``control_socket='PATH'`` to move it, ``control_socket=None`` for none).
``metrics=9101`` serves Prometheus metrics on 127.0.0.1:9101 (see
`buildbot_sshmux.master.metrics`); they are off by default.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from buildbot import config
from buildbot.util import service
from buildbot.warnings import ConfigWarning
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from buildbot_sshmux.errors import KeyFileError, SSHMuxError
from buildbot_sshmux.master import authorized_hosts
from buildbot_sshmux.master.authorized_hosts import HostEntry
from buildbot_sshmux.master.certfiles import CertificateFiles
from buildbot_sshmux.master.limits import ServerLimits, StartupGate
from buildbot_sshmux.master.orphans import OrphanedClaims
from buildbot_sshmux.master.pbinput import PBInputLimits
from buildbot_sshmux.master.server import PBUnavailable, SSHMuxFactory
from buildbot_sshmux.master.stats import ServerStats
from buildbot_sshmux.master.workerinfo import note_ssh_origin
from buildbot_sshmux.wire import control
from buildbot_sshmux.wire import metrics as metrics_http
from buildbot_sshmux.wire.channel import FlowLimits
from buildbot_sshmux.wire.defaults import MASTER_CONTROL_SOCKET, PB_PORT, SSH_PORT
from buildbot_sshmux.wire.keys import fingerprint, load_private_key
from buildbot_sshmux.wire.liveness import Liveness
from buildbot_sshmux.wire.transport import BoundedLogger

log = Logger()


def normalize_portstr(port: int | str) -> str:
    """Buildbot's own normalisation of a PB port string (pbmanager's key)."""
    if isinstance(port, int) or ":" not in port:
        return f"tcp:{port}"
    return port


# Twisted listens with a backlog of 50: a burst of connections (hundreds of
# hosts redialling after a master restart, or a flood from one address) fills
# the accept queue and the kernel drops the next SYNs, so a legitimate host
# waits a 1 s retransmission.  sshd and nginx listen with 128 and 511.
SSH_LISTEN_BACKLOG = 511


def listen_description(port: int | str) -> str:
    """The SSH port's strports description, with a deep listen backlog unless it names one."""
    description = normalize_portstr(port)
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        description += f":backlog={SSH_LISTEN_BACKLOG}"
    return description


def _resolve(basedir: str, path: str | os.PathLike[str]) -> Path:
    return Path(basedir, os.path.expanduser(path))


def _load_host_keys(basedir: str, paths: Sequence[str]) -> list[keys.Key]:
    make_with = f"buildbot-sshmux init {basedir}"
    loaded = [load_private_key(_resolve(basedir, p), make_with=make_with) for p in paths]
    types = [k.sshType() for k in loaded]
    if len(set(types)) != len(types):
        raise KeyFileError("SSHMuxService: two host keys of the same type; SSH offers one key per type")
    return loaded


def _load_entries(basedir: str, path: str | None, inline: Sequence[str]) -> tuple[list[HostEntry], list[str]]:
    entries, errors = authorized_hosts.parse_lines(list(inline), "SSHMuxService(hosts=...)")
    if path is not None:
        more, more_errors = authorized_hosts.load(_resolve(basedir, path))
        entries += more
        errors += more_errors
    return entries, errors


def _digest(data: bytes | None) -> bytes | None:
    return hashlib.sha256(data).digest() if data is not None else None


DEFAULT_PORT = f"tcp:{SSH_PORT}"
DEFAULT_CONTROL_SOCKET = MASTER_CONTROL_SOCKET
STATUS_VERSION = 1
PB_PREFIX = "pb_"  # SSHMuxService(pb_max_message=...) is PBInputLimits(max_message=...)


def config_basedir() -> str | None:
    """The master's basedir while Buildbot executes master.cfg, else None.

    Buildbot runs master.cfg with ``basedir`` and ``__file__`` in its
    namespace (and no ``__name__``: it is not a module), as its docs say
    master.cfg may use; the service is built from within that frame.
    """
    frame = inspect.currentframe()
    while frame is not None:
        names = frame.f_globals
        if "__name__" not in names and isinstance(names.get("basedir"), str) and "__file__" in names:
            return os.path.abspath(os.path.expanduser(names["basedir"]))
        frame = frame.f_back
    return None


def settings(**options: Any) -> tuple[FlowLimits, ServerLimits, Liveness, PBInputLimits]:
    """Split SSHMuxService's limit arguments into their value objects (ValueError if bad)."""
    groups: list[Any] = [FlowLimits, ServerLimits, Liveness, PBInputLimits]
    values: list[dict[str, Any]] = [{}, {}, {}, {}]
    for name, value in options.items():
        index = next((i for i, g in enumerate(groups[:3]) if name in attrs.fields_dict(g)), None)
        if name.startswith(PB_PREFIX) and name[len(PB_PREFIX) :] in attrs.fields_dict(PBInputLimits):
            index = 3
        if index is None:
            raise ValueError(f"unknown argument {name!r}")
        if name == "max_startups":
            if isinstance(value, str):
                parts = value.split(":")
            else:
                parts = list(value) if isinstance(value, (tuple, list)) else []
            if len(parts) != 3 or not all(str(p).isdigit() for p in parts):
                raise ValueError(f"max_startups must be 'start:rate:full', e.g. '10:30:100', not {value!r}")
            value = tuple(int(p) for p in parts)
        if name != "max_startups" and (not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a number >= 0, not {value!r}")
        values[index][name[len(PB_PREFIX) :] if index == 3 else name] = value
    flow, limits, liveness, pb_input = (g(**v) for g, v in zip(groups, values))
    StartupGate(*limits.max_startups)  # validates
    if flow.max_packet > flow.window_size:
        raise ValueError("max_packet must not exceed window_size")
    return flow, limits, liveness, pb_input


class SSHMuxService(service.BuildbotService):
    """An SSH server in the master: one connection per worker host, a channel per worker."""

    name: str | None = "sshmux"  # type: ignore[assignment]
    reload_interval = 2.0
    """Seconds between checks of authorized_hosts for edits."""

    def checkConfig(  # type: ignore[override]
        self,
        port: str | int = DEFAULT_PORT,
        host_keys: Sequence[str] = (),
        authorized_hosts: str | None = None,
        hosts: Sequence[str] = (),
        debug: bool = False,
        control_socket: str | None = DEFAULT_CONTROL_SOCKET,
        metrics: int | str | None = None,
        host_certificates: Sequence[str] = (),
        revoked_certificates: str | None = None,
        **limits: Any,
    ) -> None:
        if not isinstance(debug, bool):
            config.error(f"SSHMuxService: debug must be True or False, not {debug!r}")
        self._check_endpoints(config_basedir(), control_socket, metrics)
        try:
            settings(**limits)
        except (ValueError, TypeError) as e:
            config.error(f"SSHMuxService: {e}")
        if isinstance(host_keys, str):
            config.error("SSHMuxService: host_keys must be a list of paths, not a string")
            return
        if not host_keys:
            config.error("SSHMuxService: host_keys is empty; make one with: buildbot-sshmux init BASEDIR")
        if authorized_hosts is None and not hosts:
            config.error(
                "SSHMuxService: no worker host may log in; set authorized_hosts='FILE' or hosts=[...]"
            )
        try:
            from twisted.internet import reactor  # parsing only; nothing listens until startService

            endpoints.serverFromString(reactor, normalize_portstr(port))
        except (ValueError, KeyError) as e:
            config.error(f"SSHMuxService: port {port!r} is not a Twisted strports description ({e})")
        # Relative paths are the master's basedir's: known while Buildbot loads
        # master.cfg (`buildbot checkconfig DIR`, `start`, `reconfig`), from
        # any cwd; otherwise they are checked when the service starts.
        basedir = config_basedir()
        paths = [*host_keys, *([authorized_hosts] if authorized_hosts else [])]
        paths += [*host_certificates, *([revoked_certificates] if revoked_certificates else [])]
        if basedir is not None or all(os.path.isabs(os.path.expanduser(p)) for p in paths):
            self._check_files(basedir or os.getcwd(), host_keys, authorized_hosts)
            self._check_certificate_files(
                basedir or os.getcwd(), host_keys, host_certificates, revoked_certificates
            )
        _entries, errors = _load_entries(basedir or os.getcwd(), None, hosts)
        for message in errors:
            config.error(message)

    @staticmethod
    def _check_endpoints(basedir: str | None, control_socket: Any, metrics: Any) -> None:
        if control_socket is not None:
            if not isinstance(control_socket, str) or not control_socket:
                config.error(f"SSHMuxService: control_socket must be a path or None, not {control_socket!r}")
            elif basedir is not None or os.path.isabs(os.path.expanduser(control_socket)):
                try:
                    control.check_path(_resolve(basedir or os.getcwd(), control_socket))
                except SSHMuxError as e:
                    config.error(f"SSHMuxService: {e}")
        if metrics is not None:
            try:
                metrics_http.listen_description(metrics)
                metrics_http.require()
            except (ValueError, SSHMuxError) as e:
                config.error(f"SSHMuxService: {e}")

    @staticmethod
    def _check_files(basedir: str, host_keys: Sequence[str], authorized_hosts: str | None) -> None:
        try:
            _load_host_keys(basedir, host_keys)
        except KeyFileError as e:
            config.error(f"SSHMuxService: {e}")
        if authorized_hosts is not None:
            try:
                _entries, errors = _load_entries(basedir, authorized_hosts, ())
            except OSError as e:
                config.error(
                    f"SSHMuxService: authorized_hosts {authorized_hosts} cannot be read ({e.strerror})"
                )
                return
            # A warning, not an error: the running master skips a bad line and
            # serves the others, so a typo in one line must not stop it.
            for message in errors:
                warnings.warn(ConfigWarning(f"SSHMuxService: {message}"), stacklevel=2)

    @staticmethod
    def _check_certificate_files(
        basedir: str, host_keys: Sequence[str], host_certificates: Sequence[str], revoked: str | None
    ) -> None:
        try:
            loaded = _load_host_keys(basedir, host_keys)
        except KeyFileError:
            return  # _check_files said so
        files = CertificateFiles(basedir, host_keys, loaded, host_certificates, revoked)
        errors, warnings_ = files.load(time.time())
        for message in errors:
            config.error(f"SSHMuxService: {message}")
        for message in warnings_:
            warnings.warn(ConfigWarning(f"SSHMuxService: {message}"), stacklevel=2)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.factory: SSHMuxFactory | None = None
        self.listening_port: IListeningPort | None = None
        self.entries: list[HostEntry] = []
        self._listen_args: tuple[Any, ...] | None = None
        self._hosts_file: Path | None = None
        self._hosts_inline: Sequence[str] = ()
        self._hosts_stamp: bytes | None = None  # the SHA-256 of the content loaded
        self._failed_stamp: bytes | None = None
        self._watch: task.LoopingCall | None = None
        self._shutdown_watch: task.LoopingCall | None = None
        self.stats: ServerStats | None = None  # made once, kept across reconfigurations
        self._control_wanted: Path | None = None
        self._control: tuple[Path, IListeningPort] | None = None
        self._metrics_wanted: str | None = None
        self._metrics: tuple[str, IListeningPort] | None = None
        self._cert_files: CertificateFiles | None = None

    @defer.inlineCallbacks
    def reconfigService(  # type: ignore[override]
        self,
        port: str | int = DEFAULT_PORT,
        host_keys: Sequence[str] = (),
        authorized_hosts: str | None = None,
        hosts: Sequence[str] = (),
        debug: bool = False,
        control_socket: str | None = DEFAULT_CONTROL_SOCKET,
        metrics: int | str | None = None,
        host_certificates: Sequence[str] = (),
        revoked_certificates: str | None = None,
        **limits: Any,
    ) -> Any:
        basedir = self.master.basedir
        if self.stats is None:
            self.stats = ServerStats(self.master.reactor)
        self._control_wanted = _resolve(basedir, control_socket) if control_socket is not None else None
        self._metrics_wanted = metrics_http.listen_description(metrics) if metrics is not None else None
        BoundedLogger.show_debug = debug  # Conch's protocol lines, several a packet
        flow, server_limits, liveness, pb_input = settings(**limits)
        if "pb" not in self.master.config.protocols:
            config.error(
                "SSHMuxService needs Buildbot's PB protocol: set "
                f"c['protocols'] = {{'pb': {{'port': 'tcp:{PB_PORT}:interface=127.0.0.1'}}}}"
            )
        try:
            loaded_keys = _load_host_keys(basedir, host_keys)
        except KeyFileError as e:
            config.error(f"SSHMuxService: {e}")
        cert_files = CertificateFiles(
            basedir, host_keys, loaded_keys, host_certificates, revoked_certificates
        )
        cert_errors, cert_warnings = cert_files.load(self.master.reactor.seconds())
        for message in cert_errors:
            config.error(f"SSHMuxService: {message}")
        for message in cert_warnings:
            log.warn("SSHMuxService: {warning}", warning=message)
        self._hosts_file = _resolve(basedir, authorized_hosts) if authorized_hosts else None
        self._hosts_inline = hosts
        try:
            self._reload_hosts()
        except OSError as e:
            config.error(f"SSHMuxService: authorized_hosts {authorized_hosts} cannot be read ({e.strerror})")
        listen_args = (str(port), tuple(fingerprint(k) for k in loaded_keys))
        if listen_args != self._listen_args or self.factory is None:
            yield self._stop_listening()
            self.factory = SSHMuxFactory(
                loaded_keys, lambda: self.entries, self.pb_lookup, self.master.reactor, stats=self.stats
            )
            self.factory.on_worker_attached = lambda *a: note_ssh_origin(self.master, *a)
            if self.running:
                yield self._start_listening(str(port))
        if self.running:
            yield self._serve_control()
            yield self._serve_metrics()
        # New limits apply to new connections and channels.
        self.factory.flow, self.factory.limits, self.factory.liveness = flow, server_limits, liveness
        self.factory.pb_input = pb_input
        self.factory.startup_gate = StartupGate(*server_limits.max_startups)
        self._cert_files = cert_files
        cert_files.apply(self.factory)  # host certificates and the revocation list
        self.factory.apply_entries()
        self._listen_args = listen_args
        self._port = str(port)
        yield OrphanedClaims.follow_config(self)  # a cluster: release what dead masters hold

    @defer.inlineCallbacks
    def startService(self) -> Any:
        yield super().startService()
        if self.listening_port is None and self.factory is not None:
            yield self._start_listening(self._port)
        yield self._serve_control()
        yield self._serve_metrics()
        self._watch = task.LoopingCall(self._check_watched_files)
        self._watch.clock = self.master.reactor
        self._watch.start(self.reload_interval, now=False)
        self._shutdown_watch = task.LoopingCall(self._watch_shutdown)
        self._shutdown_watch.clock = self.master.reactor
        self._shutdown_watch.start(self.shutdown_check_interval, now=False)

    shutdown_check_interval = 0.5
    """Seconds between looks at whether a clean shutdown has begun (one attribute read)."""

    def _check_watched_files(self) -> None:
        self._check_hosts_file()
        if self._cert_files is not None and self.factory is not None:
            self._cert_files.check(self.factory, self.master.reactor.seconds())

    def _watch_shutdown(self) -> None:
        # A clean shutdown (`buildbot stop --clean`, SIGUSR1) runs builds to
        # their end first: the hosts move their sessions meanwhile.
        if getattr(self.master.botmaster, "shuttingDown", False) and self.factory is not None:
            self.factory.announce_draining()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        for loop in (self._watch, self._shutdown_watch):
            if loop is not None and loop.running:
                loop.stop()
        yield self._stop_control()
        yield self._stop_metrics()
        yield self._stop_listening()
        yield super().stopService()

    # -- the control socket and the metrics page ---------------------------------

    def control_routes(self) -> dict[tuple[str, str], control.Route]:
        return {("GET", "status"): lambda query: self.status()}

    @defer.inlineCallbacks
    def _serve_control(self) -> Any:
        """Serve the control socket where the config says now (a failure is logged: SSH goes on)."""
        wanted = self._control_wanted
        if self._control is not None and self._control[0] == wanted:
            return
        yield self._stop_control()
        if wanted is None:
            return
        basedir = Path(self.master.basedir)
        try:
            if wanted.parent == basedir / "sshmux" and not wanted.parent.exists():
                wanted.parent.mkdir(mode=0o700)  # as `buildbot-sshmux init` makes it
            port = yield control.listen(
                self.master.reactor, wanted, self.control_routes(), f"a master of {basedir}"
            )
        except Exception as e:
            log.error(
                "SSHMuxService: cannot serve the control socket {path} ({error});"
                " `buildbot-sshmux status` will not answer",
                path=wanted,
                error=str(e),
            )
            return
        self._control = (wanted, port)

    @defer.inlineCallbacks
    def _stop_control(self) -> Any:
        if self._control is not None:
            (_path, port), self._control = self._control, None
            yield port.stopListening()  # Twisted removes the socket file

    @defer.inlineCallbacks
    def _serve_metrics(self) -> Any:
        """Serve the metrics page where the config says now (a failure is logged: SSH goes on)."""
        wanted = self._metrics_wanted
        if self._metrics is not None and self._metrics[0] == wanted:
            return
        yield self._stop_metrics()
        if wanted is None:
            return
        try:
            from buildbot_sshmux.master.metrics import MasterCollector

            port = yield metrics_http.serve(self.master.reactor, wanted, MasterCollector(self))
        except Exception as e:
            log.error("SSHMuxService: cannot serve metrics on {where} ({error})", where=wanted, error=str(e))
            return
        self._metrics = (wanted, port)
        address = port.getHost()
        log.info(
            "Prometheus metrics of the SSH server on http://{host}:{port}/metrics",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
        )

    @defer.inlineCallbacks
    def _stop_metrics(self) -> Any:
        if self._metrics is not None:
            (_where, port), self._metrics = self._metrics, None
            yield port.stopListening()

    @property
    def metrics_port(self) -> IListeningPort | None:
        """The listening port of the metrics page, if it is served."""
        return self._metrics[1] if self._metrics is not None else None

    @property
    def control_path(self) -> Path | None:
        """The control socket served now, if any."""
        return self._control[0] if self._control is not None else None

    def _read_hosts_file(self) -> bytes | None:
        """authorized_hosts' bytes (OSError if it cannot be read); None without one."""
        return self._hosts_file.read_bytes() if self._hosts_file is not None else None

    def _reload_hosts(self, data: bytes | None = None) -> None:
        """Read the entries afresh and apply them to the hosts logged in now."""
        if data is None:
            data = self._read_hosts_file()
        self.entries, errors = authorized_hosts.parse_lines(
            list(self._hosts_inline), "SSHMuxService(hosts=...)"
        )
        if data is not None:
            more, more_errors = authorized_hosts.parse_bytes(data, str(self._hosts_file))
            self.entries += more
            errors += more_errors
        for message in errors:
            log.error("{error}", error=message)
        if self.factory is not None:
            self.factory.apply_entries()
        self._hosts_stamp = _digest(data)  # once applied: a failure is retried at the next check

    def _check_hosts_file(self) -> None:
        """Reload authorized_hosts when its content changed (an unreadable file changes nothing).

        The content is compared, not the file's stat(): the file may be on
        shared storage for a cluster of masters, where stat() can answer from
        a cache for up to a minute (NFS attribute caching) while open() and
        read() see the new file (close-to-open consistency), and where mtimes
        may have a granularity of a second or two.  The file is small; one
        read every reload_interval costs nothing.  Nothing may stop this loop
        (a LoopingCall ends at its first exception): every later revocation
        would go unseen.
        """
        try:
            data = self._read_hosts_file()
        except OSError as e:
            if self._hosts_stamp is not None:
                log.error(
                    "authorized_hosts {path} cannot be read ({error}); keeping the entries loaded before",
                    path=self._hosts_file,
                    error=e.strerror,
                )
            self._hosts_stamp = None
            return
        digest = _digest(data)
        if digest is None or digest == self._hosts_stamp:
            return
        try:
            self._reload_hosts(data)
        except Exception:
            if digest != self._failed_stamp:  # one line per content that fails, not one per check
                self._failed_stamp = digest
                log.failure(
                    "authorized_hosts {path}: applying the new entries failed; retrying",
                    path=self._hosts_file,
                )
            return
        log.info(
            "authorized_hosts {path} reloaded: {count} hosts", path=self._hosts_file, count=len(self.entries)
        )

    @defer.inlineCallbacks
    def _start_listening(self, port: str) -> Any:
        assert self.factory is not None
        endpoint = endpoints.serverFromString(self.master.reactor, listen_description(port))
        self.listening_port = yield endpoint.listen(self.factory)
        address = self.listening_port.getHost()
        log.info(
            "SSH server for worker hosts listening on {host}:{port}, host keys {keys}",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
            keys=", ".join(fingerprint(k) for k in self.factory.host_keys),
        )

    @defer.inlineCallbacks
    def _stop_listening(self) -> Any:
        if self.listening_port is not None:
            listening, self.listening_port = self.listening_port, None
            yield listening.stopListening()
        if self.factory is not None:
            self.factory.disconnect_all()

    @property
    def connection_count(self) -> int:
        """SSH connections currently open to this master."""
        return len(self.factory.connections) if self.factory is not None else 0

    def status(self) -> dict[str, Any]:
        """What this SSH server knows now, as JSON-able values (``buildbot-sshmux status``).

        Times are the reactor's seconds (Unix time in a running master);
        durations are seconds and round trips milliseconds, rounded to 0.1.
        ::

            {
              "version": 1,                  # of this shape; fields may be added, not changed
              "basedir": str, "pid": int, "now": float,
              "listening": "HOST:PORT" | None,   # the SSH port
              "host_keys": [fingerprint, ...],
              "draining": bool,              # a clean shutdown: hosts are moving their sessions
              "connections_not_logged_in": int,
              "hosts": [HOST, ...],          # each logged-in connection, by name, oldest first
              "not_connected": [ENTRY, ...], # authorized keys with no logged-in connection
              "refusals_last_hour": {reason: int},  # every refusal, of any host or of none
            }
            HOST = {
              "name": str, "fingerprint": "SHA256:...", "address": "IP:PORT",
              "connected_since": float,      # when it logged in
              "connected_for_s": float,
              "client_version": str,         # its SSH version line
              "kex": str, "host_key_algorithm": str,
              "cipher": {"in": str, "out": str}, "mac": {"in": str, "out": str},
              "sessions": [{"worker": str | None,
                            "state": "attached" | "logging in" | "refused",
                            "reason": str | None,   # of a refusal (a key of stats.REASONS)
                            "ago_s": float | None}, ...],  # since that refusal
              "bytes": {"received": int, "sent": int},  # on the wire, this connection
              "backlog_bytes": int,          # SSH messages held for it (max_backlog)
              "keepalive_rtt_ms": {"last": float | None, "median": float | None},
              "rekeys": int,                 # key re-exchanges completed (either end started)
              "last_rekey_ago_s": float | None,
              "refusals_last_hour": {reason: int},  # of this host name
              "replaced": bool,              # closing: a newer connection of its key took over
            }
            ENTRY = {
              "name": str, "fingerprint": str, "workers": [pattern, ...], "source": "FILE:LINE",
              "last_seen": {"ago_s": float, "address": str} | None,  # its last connection's end
              "refusals_last_hour": {reason: int},  # of this host name
            }

        A refused worker name stays in its host's ``sessions`` for an hour
        unless it attaches.  Reasons are the keys of
        `buildbot_sshmux.master.stats.REASONS`.
        """
        reactor = self.master.reactor
        now = reactor.seconds()
        stats = self.stats if self.stats is not None else ServerStats(reactor)
        factory = self.factory
        connections = list(factory.connections) if factory is not None else []
        logged_in = sorted((c for c in connections if c.authenticated),
                           key=lambda c: (c.avatar.entry.name, c.serial))  # fmt: skip
        connected_keys = {c.avatar.entry.key.blob() for c in logged_in}
        not_connected, seen = [], set()
        for entry in self.entries:
            blob = entry.key.blob()
            if blob in seen:  # a key on several lines is its first line's, as at login
                continue
            seen.add(blob)
            if blob in connected_keys:
                continue
            left = stats.last_seen.get(entry.fingerprint)
            not_connected.append(
                {
                    "name": entry.name,
                    "fingerprint": entry.fingerprint,
                    "workers": list(entry.workers),
                    "source": entry.source,
                    "last_seen": None
                    if left is None
                    else {"ago_s": round(now - left[0], 1), "address": left[1]},
                    "refusals_last_hour": stats.recent_refusals(entry.name),
                }
            )
        address = self.listening_port.getHost() if self.listening_port is not None else None
        return {
            "version": STATUS_VERSION,
            "basedir": str(self.master.basedir),
            "pid": os.getpid(),
            "now": now,
            "listening": None
            if address is None
            else f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}",
            "host_keys": [fingerprint(k) for k in factory.host_keys] if factory is not None else [],
            "draining": bool(factory is not None and factory.draining),
            "connections_not_logged_in": len(connections) - len(logged_in),
            "hosts": [c.status() for c in logged_in],
            "not_connected": sorted(not_connected, key=lambda e: (e["name"], e["fingerprint"])),
            "refusals_last_hour": stats.recent_refusals(everyone=True),
        }

    def pb_lookup(self) -> tuple[int, portal.Portal, bool]:
        """The master's PB dispatcher, looked up afresh for every channel."""
        pb_config = self.master.config.protocols.get("pb") or {}
        if "port" not in pb_config:
            raise PBUnavailable("the master has no c['protocols']['pb']['port']")
        portstr = normalize_portstr(pb_config["port"])
        dispatcher = self.master.pbmanager.dispatchers.get(portstr)
        if dispatcher is None or dispatcher.port is None:
            raise PBUnavailable("the master's PB port is not open: no worker is configured")
        return (
            dispatcher.port.getHost().port,
            dispatcher.portal,
            dispatcher.serverFactory.unsafeTracebacks,
        )
