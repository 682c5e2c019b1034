"""Which master of a cluster each worker session attaches to.

Every session ranks the cluster's masters by weighted rendezvous hashing of
(worker name, master name) and attaches to the first one whose connection is
up.  Hashing alone spreads a host's sessions only as evenly as chance does
(200 sessions over 3 masters: a master's count is off its even share by more
than 10% for about half of all sets of master addresses), so `assign` keeps
each master first for a number of the host's sessions within 10% of its
share: a session whose first master is full starts its order at its next one
with room.  The orders depend on nothing but the names and weights, so a
restarted launcher places every session where it was, and losing one master
moves only that master's sessions, spread over the others in proportion to
their weights.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from buildbot_sshmux.worker.link import ChannelEndpoint, MasterLink
from buildbot_sshmux.worker.session import WorkerSession

log = Logger()


def rendezvous_score(worker: str, master: str, weight: float = 1.0) -> float:
    """The weighted rendezvous score of ``master`` for ``worker`` (highest wins)."""
    digest = hashlib.sha256(f"{worker}\0{master}".encode()).digest()
    unit = (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -weight / math.log(unit)


def rank(worker: str, masters: Sequence[tuple[str, float]]) -> list[str]:
    """``masters`` (name, weight) ordered as ``worker`` prefers them."""
    return [name for name, weight in sorted(masters, key=lambda m: -rendezvous_score(worker, *m))]


def capacity(sessions: int, weight: float, total_weight: float, over: float) -> int:
    """The most of ``sessions`` a master of ``weight`` may be first for: ``over`` (a
    fraction) above its share, rounded down, but not below its share rounded up."""
    share = sessions * weight / total_weight
    return max(math.floor(share * (1 + over) + 1e-9), math.ceil(share - 1e-9))


def assign(
    workers: Sequence[str], masters: Sequence[tuple[str, float]], tolerance: float = 0.1
) -> dict[str, list[str]]:
    """Each worker's order of ``masters`` (name, weight): its `rank`, except that
    every master is first for a number of these workers within ``tolerance`` of
    its share (or, where the shares are too small for that, within a session
    of it per master).

    The bound is a `capacity`: a master may be first for ``over`` above its
    share, ``over`` so small that what the others may take leaves none more
    than ``tolerance`` under its own (``tolerance / (N - 1)`` for N masters of
    equal weight).  Greedy by rendezvous score, highest first: a worker takes
    the best master it scores that still has room.  So a worker keeps its
    ranked first master unless that master is over capacity, and then the
    workers that score it highest keep it; the others start at their best
    master with room, the rest of their order as ranked.
    """
    total = sum(weight for _name, weight in masters)
    over = tolerance * min((w / (total - w) for _n, w in masters if w < total), default=0.0)
    room = {name: capacity(len(workers), weight, total, over) for name, weight in masters}
    pairs = sorted(
        ((rendezvous_score(w, name, weight), w, name) for w in workers for name, weight in masters),
        key=lambda p: (-p[0], p[1], p[2]),
    )
    first: dict[str, str] = {}
    for _score, worker, name in pairs:
        if worker not in first and room[name] > 0:
            first[worker] = name
            room[name] -= 1
    return {w: [first[w]] + [m for m in rank(w, masters) if m != first[w]] for w in workers}


def _usable(link: MasterLink) -> bool:
    return link.connection is not None and not link.draining


@implementer(IStreamClientEndpoint)
class ClusterEndpoint:
    """A worker session's way to a cluster: a channel on the connection to
    the first master, in the session's own order, that is up now; if none is,
    on the first that comes up."""

    def __init__(
        self,
        links: Sequence[tuple[MasterLink, float, int]],
        worker: str,
        counters: Counter[Hashable] | None = None,
        order: Sequence[str] | None = None,
    ) -> None:
        """``order``: the masters' addresses in this session's order (`assign`'s); its `rank` if None."""
        self.worker = worker
        self.counters: Counter[Hashable] = counters if counters is not None else Counter()  # "moves" -> n
        self.update(links, order)
        self.current: MasterLink | None = None  # the master of the last channel opened

    def update(
        self, links: Sequence[tuple[MasterLink, float, int]], order: Sequence[str] | None = None
    ) -> None:
        """The cluster's members changed (a reload): the next login follows the new order."""
        by_name = {link.address: (link, pb_port) for link, _weight, pb_port in links}
        if order is None:
            order = rank(self.worker, [(l.address, w) for l, w, _ in links])
        self.order = [by_name[name] for name in order]

    @property
    def master_address(self) -> str | None:
        return self.current.address if self.current is not None else None

    def preferred(self) -> MasterLink | None:
        """The master this session belongs on now: its first one that is up (and not stopping)."""
        return next((link for link, _port in self.order if _usable(link)), None)

    def choice(self) -> MasterLink | None:
        """Where to attach now: the first master that is up, unless one before
        it is still on its first dial (at start, so that every session lands
        on its own first master, not on whichever answered first); None: wait."""
        for link, _port in self.order:
            if _usable(link):
                return link
            if not link.tried:
                return None
        return None

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        link = self.choice()
        if link is not None:
            return self._open(link, protocolFactory)
        links = [link for link, _port in self.order]

        def cancel(_: Any) -> None:
            for link in links:
                if changed in link.observers:
                    link.observers.remove(changed)

        result: defer.Deferred[Any] = defer.Deferred(cancel)

        def changed(_link: MasterLink) -> None:
            link = self.choice()
            if link is None or result.called:
                return
            cancel(None)
            self._open(link, protocolFactory).chainDeferred(result)

        for link in links:
            link.observers.append(changed)
        return result

    def _open(self, link: MasterLink, protocolFactory: IProtocolFactory) -> defer.Deferred[Any]:
        pb_port = next(port for candidate, port in self.order if candidate is link)
        if self.current is not None and self.current is not link:
            self.counters["moves"] += 1
            first = self.order[0][0]
            log.info(
                "worker {worker}: moving from master {old} to {new}{why}",
                worker=self.worker,
                old=self.current.address,
                new=link.address,
                why="" if link is first else f" (its first master, {first.address}, is down)",
            )
        self.current = link
        return ChannelEndpoint(link, pb_port, self.worker).connect(protocolFactory)


class Rebalancer(service.Service):
    """Moves a cluster's sessions to where they belong, never interrupting a build.

    Every ``interval`` seconds: each session on a master that is about to
    stop moves (Buildbot lets it go once its build ends), and sessions away
    from their first master that is up go back to it, idle ones only and at
    most ``max_moving`` at a time, so a master that returns does not face
    every login at once.  It ticks only while there are cluster sessions
    (`refresh` after they change): a launcher without a cluster keeps no timer.
    """

    interval = 1.0
    max_moving = 10

    def __init__(
        self, placed: Callable[[], Sequence[tuple[WorkerSession, ClusterEndpoint]]], clock: Any
    ) -> None:
        self.placed = placed  # the cluster's sessions now, with their endpoints
        self.clock = clock
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.refresh()

    def stopService(self) -> Any:
        self._stop_loop()
        return super().stopService()

    def refresh(self) -> None:
        """Tick while running with cluster sessions to place, and only then."""
        if not (self.running and self.placed()):
            self._stop_loop()
        elif self._loop is None:
            self._loop = task.LoopingCall(self.rebalance)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def rebalance(self) -> None:
        placed = self.placed()
        budget = self.max_moving - sum(1 for s, _ in placed if s.moving)
        for session, endpoint in placed:
            current = endpoint.current
            if session.moving or not session.attached or current is None:
                continue
            if current.draining:
                session.move()
            elif budget > 0 and not session.busy and endpoint.preferred() not in (None, current):
                budget -= 1
                session.move()
