"""``ssh-worker``'s engine: every worker session of a host in one process and reactor."""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.internet import defer

from buildbot_sshmux.errors import ConfigError, KeyFileError
from buildbot_sshmux.wire.keys import load_private_key
from buildbot_sshmux.worker.config import LauncherConfig, MasterConfig
from buildbot_sshmux.worker.link import ChannelEndpoint, HostKeyPins, MasterLink
from buildbot_sshmux.worker.placement import ClusterEndpoint, Rebalancer, assign
from buildbot_sshmux.worker.session import WorkerSession

PASSPHRASE_ENV = "SSH_WORKER_PASSPHRASE"


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


class Launcher(service.MultiService):
    """One `MasterLink` per master and one `WorkerSession` per worker.

    A worker of a ``[cluster]`` reaches it through a `ClusterEndpoint`: when
    its master's connection is lost, its session's next login (about half a
    second later) goes to the next master of its own order that is up.

    Children stop in reverse order: sessions close their channels before the
    links close their connections.
    """

    def __init__(self, config: LauncherConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.links: dict[str, MasterLink] = {}
        self.sessions: dict[str, WorkerSession] = {}
        for master in config.masters:
            identity = load_private_key(master.identity, _passphrase(master))
            try:
                pins = HostKeyPins.from_config(master.host_keys, master.known_hosts)
            except Exception as e:
                raise ConfigError(
                    f"{config.path}: master {master.name}: host_key is not an OpenSSH key line"
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
            )
            link.setName(f"link {master.name}")
            link.setServiceParent(self)
            self.links[master.name] = link
        pb_ports = {m.name: m.pb_port for m in config.masters}
        weights = {m.name: m.weight for m in config.masters}
        clusters = {
            c.name: [(self.links[m], weights[m], pb_ports[m]) for m in c.masters] for c in config.clusters
        }
        orders: dict[str, list[str]] = {}  # a cluster's worker -> its masters' addresses, in order
        for c in config.clusters:
            names = [w.name for w in config.workers if w.master == c.name]
            members = [(link.address, weight) for link, weight, _pb in clusters[c.name]]
            orders.update(assign(names, members))
        placed: list[tuple[WorkerSession, ClusterEndpoint]] = []
        for worker in config.workers:
            endpoint: Any
            if worker.master in clusters:
                endpoint = ClusterEndpoint(clusters[worker.master], worker.name, orders[worker.name])
            else:
                endpoint = ChannelEndpoint(self.links[worker.master], pb_ports[worker.master], worker.name)
            session = WorkerSession(
                worker.name,
                worker.password,
                str(worker.basedir),
                endpoint,
                reactor,
                keepalive=worker.keepalive,
                umask=worker.umask,
            )
            session.setServiceParent(self)
            self.sessions[worker.name] = session
            if isinstance(endpoint, ClusterEndpoint):
                placed.append((session, endpoint))
        if placed:
            Rebalancer(placed, reactor).setServiceParent(self)

    def attached_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.attached)

    def stop_within(self, reactor: Any, seconds: float) -> defer.Deferred[Any]:
        """Stop every session and link, giving up waiting after ``seconds``."""
        d = defer.maybeDeferred(self.stopService)
        d.addTimeout(seconds, reactor)
        d.addErrback(lambda _: None)
        return d
