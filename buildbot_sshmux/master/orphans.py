"""Releasing the build requests that inactive masters still hold, so that they run again.

In a cluster of masters (Buildbot's multi-master), every live master's
heartbeat marks a master inactive once it has been silent for
``buildbot.data.masters.EXPIRE_MINUTES``.  That master's housekeeping then
runs on the live master: its builds are finished as RETRY and its build
requests are meant to be unclaimed.  They are not: Buildbot's
``unclaimBuildRequests`` releases only the calling master's own claims, so
a crashed master's requests stay claimed until that master starts again,
and nothing runs them meanwhile.

`OrphanedClaims` releases them.  It looks when a master is announced
stopped (the ``masters/ID/stopped`` event, which the multi-master message
queue delivers to every master), when this master starts, and every
`OrphanedClaims.sweep_interval` seconds in case an event was missed.  A
claim is released only while its request is incomplete and its master

- is not this one,
- is inactive, and
- is listed on no builder: Buildbot's housekeeping for it has run (it
  removes the master from every builder) and the master has not started
  again since (a starting master lists its builders before it can claim).

The three conditions are checked by the DELETE itself, one claim at a time,
so two live masters sweeping together release each claim once and a
master that comes back keeps the claims of its new life.  Each release is
announced as Buildbot announces its own (``buildrequests/ID/unclaimed``),
which every master's build request distributor acts on: the request runs
again on whichever master has a free worker for it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from buildbot.util import service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

EVENT_STOPPED = ("masters", None, "stopped")
EVENT_STARTED = ("masters", None, "started")
# Buildbot's own heartbeat interval (master.py: TimerService(60, heartbeat)).
DEFAULT_HEARTBEAT = 60.0


def expiry_seconds() -> float:
    """Seconds of silence after which Buildbot marks a master inactive (its module constant)."""
    from buildbot.data import masters

    return 60.0 * float(masters.EXPIRE_MINUTES)


def thd_release(conn: Any, model: Any, own_masterid: int) -> dict[tuple[int, str], list[int]]:
    """Delete the claims that inactive masters hold on incomplete requests; (masterid, name) -> brids.

    Runs in Buildbot's database thread (``master.db.pool.do``).
    """
    claims, requests, masters = model.buildrequest_claims, model.buildrequests, model.masters
    builder_masters = model.builder_masters

    def master_is_gone(masterid: Any) -> Any:
        inactive = sa.select(masters.c.id).where(masters.c.id == masterid, masters.c.active == 0)
        listed = sa.select(builder_masters.c.id).where(builder_masters.c.masterid == masterid)
        return sa.and_(inactive.exists(), ~listed.exists())

    incomplete = sa.select(requests.c.id).where(requests.c.id == claims.c.brid, requests.c.complete == 0)
    on_builders = sa.select(builder_masters.c.id).where(builder_masters.c.masterid == claims.c.masterid)
    candidates = conn.execute(
        sa.select(claims.c.brid, claims.c.masterid, claims.c.claimed_at, masters.c.name)
        .select_from(claims.join(masters, masters.c.id == claims.c.masterid))
        .where(
            claims.c.masterid != own_masterid,
            masters.c.active == 0,
            ~on_builders.exists(),
            incomplete.exists(),
        )
        .order_by(claims.c.masterid, claims.c.brid)
    ).fetchall()
    released: dict[tuple[int, str], list[int]] = defaultdict(list)
    try:
        for row in candidates:  # in brid order: two masters sweeping together lock rows alike
            done = conn.execute(
                claims.delete().where(
                    claims.c.brid == row.brid,
                    claims.c.masterid == row.masterid,
                    claims.c.claimed_at == row.claimed_at,
                    sa.select(requests.c.id)
                    .where(requests.c.id == row.brid, requests.c.complete == 0)
                    .exists(),
                    master_is_gone(row.masterid),
                )
            )
            if done.rowcount == 1:
                released[(row.masterid, row.name)].append(row.brid)
    except Exception:
        conn.rollback()
        raise
    conn.commit()
    return dict(released)


class OrphanedClaims(service.AsyncService):
    """Releases the build requests of inactive masters; a child of `SSHMuxService` in a cluster."""

    name = "orphaned-claims"  # type: ignore[assignment]
    sweep_interval = 60.0
    """Seconds between sweeps that do not wait for an event."""

    def __init__(self) -> None:
        self._consumers: list[Any] = []
        self._loop: task.LoopingCall | None = None
        self._running_sweep: defer.Deferred[None] | None = None
        self._again = False
        self._waiters: list[defer.Deferred[None]] = []
        self.released: list[int] = []  # every brid released here, for tests and the curious

    @classmethod
    @defer.inlineCallbacks
    def follow_config(cls, parent: Any) -> Any:
        """Run under ``parent`` exactly when the master's config has ``multiMaster``."""
        existing = parent.namedServices.get(cls.name)
        wanted = bool(getattr(parent.master.config, "multiMaster", False))
        if wanted and existing is None:
            yield cls().setServiceParent(parent)
        elif not wanted and existing is not None:
            yield existing.disownServiceParent()

    @defer.inlineCallbacks
    def startService(self) -> Any:
        yield super().startService()
        mq = self.master.mq
        self._consumers = [
            (yield mq.startConsuming(self._master_stopped, EVENT_STOPPED)),
            (yield mq.startConsuming(self._master_started, EVENT_STARTED)),
        ]
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = self.master.reactor
        self._loop.start(self.sweep_interval, now=True)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        for consumer in self._consumers:
            consumer.stopConsuming()
        self._consumers = []
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._running_sweep is not None:
            yield self._running_sweep
        yield super().stopService()

    def _master_stopped(self, key: Any, msg: dict[str, Any]) -> None:
        if msg.get("masterid") != self.master.masterid:
            self.sweep()

    def _master_started(self, key: Any, msg: dict[str, Any]) -> None:
        if msg.get("masterid") == self.master.masterid:
            self.log_timers()

    def log_timers(self) -> None:
        """One line at start: how long a crashed master's builds wait; a warning if too short."""
        heartbeat = getattr(getattr(self.master, "masterHeartbeatService", None), "step", DEFAULT_HEARTBEAT)
        expiry = expiry_seconds()
        log.info(
            "build requests that inactive masters hold are released here: a master is marked "
            "inactive {expiry:g} s after its last heartbeat (every {heartbeat:g} s), so a crashed "
            "master's builds run again {soonest:g} to {latest:g} s after the crash",
            expiry=expiry,
            heartbeat=heartbeat,
            soonest=max(expiry - heartbeat, 0),
            latest=expiry + heartbeat,
        )
        if expiry < 3 * heartbeat:
            log.warn(
                "EXPIRE_MINUTES ({expiry:g} s) is less than three heartbeats ({heartbeat:g} s): "
                "a slow but live master may be marked inactive and its builds run a second time "
                "elsewhere while they still run on it",
                expiry=expiry,
                heartbeat=heartbeat,
            )

    def sweep(self) -> defer.Deferred[None]:
        """Release what inactive masters hold now (one sweep at a time; another follows if asked)."""
        if self._running_sweep is not None:
            self._again = True
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        done: defer.Deferred[None] = defer.Deferred()
        self._running_sweep = done
        self._sweep_until_quiet().addBoth(lambda _: self._sweep_ended(done))
        return done

    def _sweep_ended(self, done: defer.Deferred[None]) -> None:
        self._running_sweep = None
        waiters, self._waiters = self._waiters, []
        for waiter in [done, *waiters]:
            waiter.callback(None)

    @defer.inlineCallbacks
    def _sweep_until_quiet(self) -> Any:
        again = True
        while again:
            self._again = False
            try:
                yield self._sweep_once()
            except Exception:
                log.failure("releasing the build requests of inactive masters failed; next sweep later")
            again = self._again and self.running

    @defer.inlineCallbacks
    def _sweep_once(self) -> Any:
        db = self.master.db
        own = self.master.masterid
        if own is None:
            return
        released = yield db.pool.do(lambda conn: thd_release(conn, db.model, own))
        for (masterid, name), brids in sorted(released.items()):
            self.released += brids
            log.info(
                "released {count} build request{s} of inactive master {name} (id {masterid}): "
                "{brids}; unclaimed, to run again on a master with a free worker",
                count=len(brids),
                s="" if len(brids) == 1 else "s",
                name=name,
                masterid=masterid,
                brids=", ".join(map(str, brids)),
            )
            # What Buildbot's own unclaim announces: every master's distributor takes it up.
            yield self.master.data.rtypes.buildrequest.generateEvent(brids, "unclaimed")
