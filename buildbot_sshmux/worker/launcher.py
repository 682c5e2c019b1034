"""``ssh-worker``'s engine: every worker session of a host in one process and reactor."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from buildbot_sshmux.errors import ConfigError, KeyFileError
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import fingerprint, load_private_key
from buildbot_sshmux.wire.proxy import HTTPConnectEndpoint, ProxyURL, proxy_from_environment
from buildbot_sshmux.worker.config import ForwardConfig, LauncherConfig, MasterConfig, WorkerConfig
from buildbot_sshmux.worker.forward import Forward, ForwardService
from buildbot_sshmux.worker.link import ChannelEndpoint, HostKeyPins, MasterLink
from buildbot_sshmux.worker.placement import ClusterEndpoint, Rebalancer, assign
from buildbot_sshmux.worker.session import WorkerSession

PASSPHRASE_ENV = "SSH_WORKER_PASSPHRASE"

log = Logger()


def _passphrase(master: MasterConfig) -> bytes | None:
    if master.identity_passphrase_file is not None:
        try:
            return master.identity_passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as e:
            raise KeyFileError(
                f"identity_passphrase_file {master.identity_passphrase_file} cannot be read ({e.strerror})"
            ) from None
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def _certificate(master: MasterConfig, identity: Any, config_path: Any) -> Path:
    """This host's certificate file (identity_certificate, else IDENTITY-cert.pub), checked if it exists."""
    path = master.identity_certificate or certs.certificate_path(master.identity)
    if master.identity_certificate is None and not path.exists():
        return path  # none now; one put there later is offered from the next login
    try:
        cert = certs.load_certificate(path)
    except certs.CertificateError as e:
        raise ConfigError(f"{config_path}: master {master.name}: {e}") from None
    if not certs.certifies(cert, identity):
        raise ConfigError(
            f"{config_path}: master {master.name}: certificate {path} certifies {cert.fingerprint}, not"
            f" this host's key {fingerprint(identity)} ({master.identity}); sign {master.identity}.pub"
        )
    if cert.kind != certs.USER:
        raise ConfigError(
            f"{config_path}: master {master.name}: certificate {path} is a host certificate; a worker"
            " host logs in with a user certificate (sign it without -h)"
        )
    return path


def _link(master: MasterConfig, reactor: Any, config_path: Any) -> MasterLink:
    identity = load_private_key(master.identity, _passphrase(master))
    try:
        pins = HostKeyPins.from_config(master.host_keys, master.known_hosts, master.host_cas)
    except Exception as e:
        raise ConfigError(
            f"{config_path}: master {master.name}: host_key or host_ca is not an OpenSSH key line"
            f" or SHA256: fingerprint ({e})"
        ) from None
    link = MasterLink(
        reactor,
        master.host,
        master.port,
        identity,
        pins,
        username=master.username,
        liveness=master.liveness,
        endpoint=_proxied(reactor, master),
        certificate=_certificate(master, identity, config_path),
        certificate_required=master.identity_certificate is not None,
    )
    link.setName(f"link {master.name}")
    return link


def _proxied(reactor: Any, master: MasterConfig) -> HTTPConnectEndpoint | None:
    """The way to the master through its proxy, if it has one."""
    url = proxy_from_environment(master.host) if master.proxy == "env" else master.proxy
    if not url:
        return None
    try:
        proxy = ProxyURL.parse(url)
    except ValueError as e:
        raise ConfigError(
            f"master {master.name}: the proxy from the environment is not usable: {e}"
        ) from None
    log.info("master {master}: through proxy {proxy}", master=master.name, proxy=proxy.display)
    return HTTPConnectEndpoint(reactor, proxy, master.host, master.port)


class Launcher(service.MultiService):
    """One `MasterLink` per master and one `WorkerSession` per worker.

    A worker of a ``[cluster]`` reaches it through a `ClusterEndpoint`: when
    its master's connection is lost, its session's next login (about half a
    second later) goes to the next master of its own order that is up.

    `reload` applies an edited config: sessions added, removed or changed
    start, stop or restart; every other session, and every connection whose
    master is unchanged, goes on untouched.  The sessions are a child
    service added after the links, so they stop first: their channels close
    before the connections do.
    """

    def __init__(self, config: LauncherConfig, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.links: dict[str, MasterLink] = {}
        self.sessions: dict[str, WorkerSession] = {}
        self.cluster_endpoints: dict[str, ClusterEndpoint] = {}
        self.link_group = service.MultiService()
        self.link_group.setServiceParent(self)
        self.session_group = service.MultiService()
        self.session_group.setServiceParent(self)
        self.rebalancer = Rebalancer(self.placed, reactor)
        self.rebalancer.setServiceParent(self.session_group)
        self.stopping_gracefully = False
        self._graceful_timer: Any = None
        # Events so far, for the metrics: ("logins_refused", kind), "moves".
        self.counters: Counter[Hashable] = Counter()
        for master in config.masters:
            self._add_link(master, _link(master, reactor, config.path))
        self.orders = self._assign(config)
        for worker in config.workers:
            self._add_session(worker)
        self.forwards: dict[str, ForwardService] = {}
        for forward in config.forwards:
            self._add_forward(forward)

    # -- building ------------------------------------------------------------

    def _add_link(self, master: MasterConfig, link: MasterLink) -> None:
        link.setServiceParent(self.link_group)
        self.links[master.name] = link

    def _members(self, cluster: str) -> list[tuple[MasterLink, float, int]]:
        by_name = {m.name: m for m in self.config.masters}
        [members] = [c.masters for c in self.config.clusters if c.name == cluster]
        return [(self.links[m], by_name[m].weight, by_name[m].pb_port) for m in members]

    def _assign(self, config: LauncherConfig) -> dict[str, list[str]]:
        """Each cluster worker's order of its cluster's masters (`placement.assign`: balanced)."""
        weights = {m.name: m.weight for m in config.masters}
        orders: dict[str, list[str]] = {}
        for cluster in config.clusters:
            names = [w.name for w in config.workers if w.master == cluster.name]
            orders.update(assign(names, [(m, weights[m]) for m in cluster.masters]))
        return orders

    def _add_session(self, worker: WorkerConfig) -> WorkerSession:
        endpoint = self._endpoint_to(worker.master, worker.name, self.orders.get(worker.name))
        if isinstance(endpoint, ClusterEndpoint):
            self.cluster_endpoints[worker.name] = endpoint
        session = WorkerSession(
            worker.name,
            worker.password,
            str(worker.basedir),
            endpoint,
            self.reactor,
            keepalive=worker.keepalive,
            umask=worker.umask,
            numcpus=worker.numcpus,
            delete_leftover_dirs=worker.delete_leftover_dirs,
            counters=self.counters,
        )
        session.on_stopped_by_master = self._session_gone
        session.setServiceParent(self.session_group)
        self.sessions[worker.name] = session
        return session

    def _endpoint_to(self, target: str, label: str, order: list[str] | None = None) -> Any:
        if target in {c.name for c in self.config.clusters}:
            return ClusterEndpoint(self._members(target), label, self.counters, order)
        master = next(m for m in self.config.masters if m.name == target)
        return ChannelEndpoint(self.links[target], master.pb_port, label)

    def _add_forward(self, forward: ForwardConfig) -> None:
        endpoint = self._endpoint_to(forward.master, f"forward {forward.address}")
        listener = ForwardService(self.reactor, forward.listen, Forward(endpoint, forward.address))
        listener.setServiceParent(self.session_group)
        self.forwards[forward.listen] = listener

    def placed(self) -> list[tuple[WorkerSession, ClusterEndpoint]]:
        """The sessions of a cluster, with their endpoints (for the Rebalancer)."""
        return [(self.sessions[n], e) for n, e in self.cluster_endpoints.items() if n in self.sessions]

    # -- reloading -----------------------------------------------------------

    @defer.inlineCallbacks
    def reload(self, new: LauncherConfig) -> Any:
        """Apply ``new``; what it leaves unchanged is not touched.  Returns a summary."""
        old = self.config
        old_masters = {m.name: m for m in old.masters}
        new_masters = {m.name: m for m in new.masters}
        changed_masters = {n for n in old_masters if new_masters.get(n) != old_masters[n]}
        added_masters = [m for n, m in new_masters.items() if n not in old_masters or n in changed_masters]
        fresh = {
            m.name: _link(m, self.reactor, new.path) for m in added_masters
        }  # may raise: nothing changed yet

        old_workers = {w.name: w for w in old.workers}
        new_workers = {w.name: w for w in new.workers}
        old_clusters = {c.name: c for c in old.clusters}
        new_clusters = {c.name: c for c in new.clusters}

        def target_changed(worker: WorkerConfig) -> bool:
            if worker.master in new_clusters:  # a cluster's endpoints follow in place
                return worker.master not in old_clusters
            return worker.master in changed_masters

        def target_changed_forward(forward: ForwardConfig) -> bool:
            cluster = new_clusters.get(forward.master)
            return forward.master in changed_masters or (
                cluster is not None and old_clusters.get(forward.master) != cluster
            )

        stop = [
            n for n, w in old_workers.items() if new_workers.get(n) != w or target_changed(new_workers[n])
        ]
        start = [w for n, w in new_workers.items() if n not in old_workers or n in stop]
        yield defer.gatherResults([self._stop_session(n) for n in stop])
        yield defer.gatherResults(
            [
                defer.maybeDeferred(self.links.pop(n).disownServiceParent)
                for n in old_masters
                if n not in new_masters or n in changed_masters
            ]
        )
        self.config = new
        for name, link in fresh.items():
            self._add_link(new_masters[name], link)
        self.orders = self._assign(new)
        for name, endpoint in list(self.cluster_endpoints.items()):
            if name not in new_workers or new_workers[name].master not in new_clusters:
                del self.cluster_endpoints[name]
            else:
                endpoint.update(self._members(new_workers[name].master), self.orders.get(name))
        for worker in start:
            self._add_session(worker)
        self.rebalancer.refresh()
        old_forwards = {f.listen: f for f in old.forwards}
        new_forwards = {f.listen: f for f in new.forwards}
        redo = {
            listen
            for listen, f in old_forwards.items()
            if new_forwards.get(listen) != f or target_changed_forward(f)
        }
        yield defer.gatherResults(
            [defer.maybeDeferred(self.forwards.pop(listen).disownServiceParent) for listen in redo]
        )
        for listen, forward in new_forwards.items():
            if listen not in old_forwards or listen in redo:
                self._add_forward(forward)
        summary = {
            "sessions_started": sorted(w.name for w in start if w.name not in stop),
            "sessions_stopped": sorted(n for n in stop if n not in new_workers),
            "sessions_restarted": sorted(n for n in stop if n in new_workers),
            "masters_connected": sorted(fresh),
            "masters_dropped": sorted(n for n in old_masters if n not in new_masters or n in changed_masters),
        }
        log.info(
            "reloaded {path}: {started} sessions started, {stopped} stopped, {restarted} restarted;"
            " the others go on",
            path=new.path,
            started=len(summary["sessions_started"]),
            stopped=len(summary["sessions_stopped"]),
            restarted=len(summary["sessions_restarted"]),
        )
        return summary

    def _stop_session(self, name: str) -> defer.Deferred[Any]:
        session = self.sessions.pop(name)
        return defer.maybeDeferred(session.disownServiceParent)

    def _session_gone(self, session: WorkerSession) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
        if self.stopping_gracefully and not self.sessions:
            self._graceful_done()

    # -- stopping --------------------------------------------------------------

    def attached_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.attached)

    def summary(self) -> str:
        """One line: sessions attached, masters connected (systemd's status line)."""
        up = sum(1 for link in self.links.values() if link.connection is not None)
        return f"{self.attached_count()}/{len(self.sessions)} sessions attached, {up}/{len(self.links)} masters connected"

    def stop_within(self, reactor: Any, seconds: float) -> defer.Deferred[Any]:
        """Stop every session and link, giving up waiting after ``seconds``."""
        d = defer.maybeDeferred(self.stopService)
        d.addTimeout(seconds, reactor)
        d.addErrback(lambda _: None)
        return d

    def stop_gracefully(self, timeout: float) -> dict[str, Any]:
        """Let running builds finish (each session leaves its master once idle:
        Buildbot's graceful worker shutdown), then stop the reactor; after
        ``timeout`` seconds, stop anyway."""
        if not self.stopping_gracefully:
            self.stopping_gracefully = True
            self.rebalancer.disownServiceParent()  # no moves now
            busy = [s.name for s in self.sessions.values() if s.attached and s.busy]
            log.info(
                "stopping gracefully: {n} sessions finish their builds first (at most {timeout:.0f}s)",
                n=len(busy),
                timeout=timeout,
            )
            for session in list(self.sessions.values()):
                if session.attached:
                    session.leave()
                else:
                    self._stop_session(session.name)
            self._graceful_timer = self.reactor.callLater(timeout, self._graceful_timeout)
            if not self.sessions:
                self._graceful_done()
        return {"stopping": True, "sessions_left": sorted(self.sessions)}

    def _graceful_timeout(self) -> None:
        log.warn(
            "stopping now: {names} still had builds running after the graceful stop's timeout",
            names=", ".join(sorted(self.sessions)),
        )
        self.reactor.stop()

    def _graceful_done(self) -> None:
        if self._graceful_timer is not None and self._graceful_timer.active():
            self._graceful_timer.cancel()
        log.info("every build has finished; stopping")
        self.reactor.callLater(0, self.reactor.stop)

    # -- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``ssh-worker status`` shows: each master's connection, each session."""
        now = self.reactor.seconds()
        masters = []
        by_link = {id(link): name for name, link in self.links.items()}
        for master in self.config.masters:
            link = self.links[master.name]
            keepalive = getattr(link.connection, "keepalive", None)
            error = link.last_error
            masters.append(
                {
                    "name": master.name,
                    "address": link.address,
                    "cluster": master.cluster,
                    "connected": link.connection is not None,
                    "connected_for_s": None
                    if link.connected_since is None
                    else round(now - link.connected_since, 1),
                    "draining": link.draining,
                    "last_error": None
                    if error is None
                    else {"text": error[0], "ago_s": round(now - error[1], 1)},
                    "keepalive_rtt_ms": _rtt(keepalive),
                }
            )
        sessions = []
        for name, session in sorted(self.sessions.items()):
            endpoint = session.endpoint
            where = getattr(endpoint, "current", None) or getattr(endpoint, "link", None)
            refusal = session.last_refusal
            sessions.append(
                {
                    "name": name,
                    "master": by_link.get(id(where)) if where is not None else None,
                    "attached": session.attached,
                    "busy": session.busy,
                    "moving": session.moving,
                    "last_refusal": None
                    if refusal is None
                    else {"text": refusal[0], "ago_s": round(now - refusal[1], 1)},
                }
            )
        forwards = [
            {
                "listen": f.forward.description,
                "listening": f.port is not None,
                "connections": f.forward.active,
            }
            for f in self.forwards.values()
        ]
        return {
            "config": str(self.config.path),
            "pid": os.getpid(),
            "masters": masters,
            "sessions": sessions,
            "forwards": forwards,
        }


def _rtt(keepalive: Any) -> dict[str, float | None]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    if keepalive is None:
        return {"last": None, "median": None}
    return {"last": ms(keepalive.last_round_trip), "median": ms(keepalive.median_round_trip)}
