"""OrphanedClaims: the claims of inactive masters are released, and only theirs.

On Buildbot's own test master (``buildbot.test.fake.fakemaster``) with its
real database layer (sqlite in memory) and its fake message queue, which
records what is produced and delivers what a test hands it.
"""

from __future__ import annotations

from typing import Any

from buildbot.data import masters
from buildbot.test import fakedb
from buildbot.test.fake import fakemaster
from buildbot.test.reactor import TestReactorMixin
from buildbot.util import service
from twisted.internet import defer
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest

from buildbot_sshmux.master import orphans
from buildbot_sshmux.master.orphans import OrphanedClaims, thd_release

from .tmpdirs import scratch_dir

OWN = fakedb.FakeDBConnector.MASTER_ID  # 824: the master running the service
CRASHED, LIVE, NOT_HOUSEKEPT = 14, 15, 16
NOW = 100_000


class LogCapture:
    """The text of every log event while the test runs.

    (Not sshharness's: that imports Conch, and an import of Conch after
    ``buildbot.test``, which turns warnings into errors, fails on Twisted 24.)
    """

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self) -> list[str]:
        return [formatEvent(e) or "" for e in self.events]

    def matching(self, fragment: str) -> list[str]:
        return [t for t in self.texts() if fragment in t]


class Cluster(TestReactorMixin, unittest.TestCase):
    """One master's view of a shared database: itself, a crashed master and others."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.setup_test_reactor()
        self.reactor.advance(NOW)
        self.master = yield fakemaster.make_master(
            self, wantMq=True, wantDb=True, wantData=True, basedir=str(scratch_dir(self) / "master")
        )
        self.logs = LogCapture(self)
        rows: list[Any] = [
            fakedb.Master(id=OWN, name="own", active=1, last_active=NOW),
            # crashed and marked inactive; its housekeeping unlisted it from its builders
            fakedb.Master(id=CRASHED, name="crashed", active=0, last_active=NOW - 700),
            fakedb.Master(id=LIVE, name="live", active=1, last_active=NOW),
            # inactive, but still listed on a builder: housekeeping not run, or it is starting again
            fakedb.Master(id=NOT_HOUSEKEPT, name="starting", active=0, last_active=NOW - 700),
            fakedb.Builder(id=77, name="b1"),
            fakedb.BuilderMaster(builderid=77, masterid=OWN),
            fakedb.BuilderMaster(builderid=77, masterid=LIVE),
            fakedb.BuilderMaster(builderid=77, masterid=NOT_HOUSEKEPT),
            fakedb.SourceStamp(id=234),
        ]
        claims = {
            82: (CRASHED, 0),  # brid: (claimed by, complete)
            83: (CRASHED, 1),
            84: (LIVE, 0),
            85: (OWN, 0),
            86: (NOT_HOUSEKEPT, 0),
            87: (None, 0),
            88: (CRASHED, 0),
        }
        for brid, (masterid, complete) in claims.items():
            rows += [
                fakedb.Buildset(id=brid),
                fakedb.BuildsetSourceStamp(buildsetid=brid, sourcestampid=234),
                fakedb.BuildRequest(id=brid, builderid=77, buildsetid=brid, complete=complete),
            ]
            if masterid is not None:
                rows.append(fakedb.BuildRequestClaim(brid=brid, masterid=masterid, claimed_at=NOW - 800))
        yield self.master.db.insert_test_data(rows)

    @defer.inlineCallbacks
    def claimed_by(self) -> Any:
        """brid -> the master that claims it (None: unclaimed)."""
        requests = yield self.master.db.buildrequests.getBuildRequests()
        return {br.buildrequestid: br.claimed_by_masterid for br in requests}

    def unclaimed_events(self) -> list[tuple[str, ...]]:
        return [key for key, _msg in self.master.mq.productions if key[-1] == "unclaimed"]

    @defer.inlineCallbacks
    def started(self) -> Any:
        claims = OrphanedClaims()
        yield claims.setServiceParent(self.master)
        yield claims.startService()
        self.addCleanup(claims.stopService)
        return claims


class BuildbotItself(Cluster):
    """The defect, on Buildbot alone: a minimal reproduction for upstream."""

    @defer.inlineCallbacks
    def test_housekeeping_of_an_expired_master_leaves_its_requests_claimed(self) -> Any:
        masters_table = self.master.db.model.masters

        def not_yet_expired(conn: Any) -> None:  # crashed 700 s ago, not yet marked inactive
            conn.execute(masters_table.update().where(masters_table.c.id == CRASHED).values(active=1))
            conn.commit()

        yield self.master.db.pool.do(not_yet_expired)
        yield masters.Master(self.master).expireMasters()  # what every live master's heartbeat does
        self.assertFalse((yield self.master.db.masters.getMaster(CRASHED)).active)
        stopped = [
            key for key, _ in self.master.mq.productions if key == ("masters", str(CRASHED), "stopped")
        ]
        self.assertEqual(len(stopped), 1)
        # Buildbot meant to unclaim them (data/masters.py, _masterDeactivatedHousekeeping), but its
        # unclaimBuildRequests deletes only this master's own claims.  If this assertion fails,
        # Buildbot has fixed it: OrphanedClaims then finds nothing to do.
        claimed = yield self.claimed_by()
        self.assertEqual((claimed[82], claimed[88]), (CRASHED, CRASHED))
        self.assertEqual(self.unclaimed_events(), [])


class Sweep(Cluster):
    @defer.inlineCallbacks
    def test_releases_only_the_incomplete_requests_of_housekept_inactive_masters(self) -> Any:
        yield self.started()
        claimed = yield self.claimed_by()
        self.assertEqual(
            claimed, {82: None, 83: CRASHED, 84: LIVE, 85: OWN, 86: NOT_HOUSEKEPT, 87: None, 88: None}
        )
        lines = self.logs.matching("released 2 build requests of inactive master crashed (id 14): 82, 88")
        self.assertEqual(len(lines), 1, self.logs.texts())
        self.assertEqual(
            sorted(self.unclaimed_events()),
            sorted(
                [
                    *[("buildrequests", str(b), "unclaimed") for b in (82, 88)],
                    *[("builders", "77", "buildrequests", str(b), "unclaimed") for b in (82, 88)],
                    *[
                        ("buildsets", str(b), "builders", "77", "buildrequests", str(b), "unclaimed")
                        for b in (82, 88)
                    ],
                ]
            ),
        )

    @defer.inlineCallbacks
    def test_a_second_sweep_releases_nothing(self) -> Any:
        claims = yield self.started()
        self.master.mq.clearProductions()
        yield claims.sweep()
        self.assertEqual(claims.released, [82, 88])
        self.assertEqual(self.unclaimed_events(), [])
        self.assertEqual(len(self.logs.matching("released")), 1)

    @defer.inlineCallbacks
    def test_a_stopped_event_sweeps(self) -> Any:
        claims = yield self.started()
        yield self.master.db.insert_test_data(
            [
                fakedb.Buildset(id=90),
                fakedb.BuildsetSourceStamp(buildsetid=90, sourcestampid=234),
                fakedb.BuildRequest(id=90, builderid=77, buildsetid=90),
                fakedb.BuildRequestClaim(brid=90, masterid=LIVE, claimed_at=NOW),
            ]
        )
        # LIVE crashes; another master's heartbeat expires it and runs its housekeeping.
        yield self.master.db.masters.setMasterState(LIVE, False)
        yield self.master.db.builders.removeBuilderMaster(masterid=LIVE, builderid=77)
        self.master.mq.callConsumer(
            ("masters", str(LIVE), "stopped"), {"masterid": LIVE, "name": "live", "active": False}
        )
        yield self.master.mq.wait_consumed()
        yield claims.sweep()  # waits for the sweep under way
        claimed = yield self.claimed_by()
        self.assertEqual((claimed[84], claimed[90]), (None, None))
        self.assertEqual(claims.released, [82, 88, 84, 90])

    @defer.inlineCallbacks
    def test_after_buildbot_housekeeping_the_requests_are_unclaimed(self) -> Any:
        """Buildbot's expiry, then its 'stopped' event: released here, announced to every master."""
        yield self.master.db.insert_test_data(
            [fakedb.Master(id=17, name="dies", active=1, last_active=NOW - 601)]
            + [
                row
                for brid in (91, 92)
                for row in (
                    fakedb.Buildset(id=brid),
                    fakedb.BuildsetSourceStamp(buildsetid=brid, sourcestampid=234),
                    fakedb.BuildRequest(id=brid, builderid=77, buildsetid=brid),
                    fakedb.BuildRequestClaim(brid=brid, masterid=17, claimed_at=NOW - 650),
                )
            ]
            + [fakedb.BuilderMaster(builderid=77, masterid=17)]
        )
        claims = yield self.started()
        self.assertEqual(claims.released, [82, 88])  # 17 is still active
        yield masters.Master(self.master).expireMasters()
        (key, msg) = next(p for p in self.master.mq.productions if p[0][0] == "masters")
        self.master.mq.callConsumer(key, msg)
        yield self.master.mq.wait_consumed()
        yield claims.sweep()
        self.assertEqual(claims.released, [82, 88, 91, 92])
        self.assertIn(("buildrequests", "92", "unclaimed"), self.unclaimed_events())

    @defer.inlineCallbacks
    def test_own_stopped_event_and_other_started_events_do_nothing(self) -> Any:
        claims = yield self.started()
        swept = []
        self.patch(claims, "sweep", lambda: swept.append(1))
        self.master.mq.callConsumer(
            ("masters", str(OWN), "stopped"), {"masterid": OWN, "name": "own", "active": False}
        )
        self.master.mq.callConsumer(
            ("masters", str(LIVE), "started"), {"masterid": LIVE, "name": "live", "active": True}
        )
        yield self.master.mq.wait_consumed()
        self.assertEqual(swept, [])
        self.assertEqual(self.logs.matching("are released here"), [])

    @defer.inlineCallbacks
    def test_sweeps_again_every_interval(self) -> Any:
        claims = yield self.started()
        yield self.master.db.masters.setMasterState(LIVE, False)
        yield self.master.db.builders.removeBuilderMaster(masterid=LIVE, builderid=77)
        self.reactor.advance(OrphanedClaims.sweep_interval - 1)
        self.assertEqual(claims.released, [82, 88])
        self.reactor.advance(1)
        yield claims.sweep()
        self.assertEqual(claims.released, [82, 88, 84])

    @defer.inlineCallbacks
    def test_a_database_error_is_logged_and_the_next_sweep_runs(self) -> Any:
        claims = OrphanedClaims()
        yield claims.setServiceParent(self.master)
        real_do = self.master.db.pool.do
        self.patch(self.master.db.pool, "do", lambda f: defer.fail(RuntimeError("database gone")))
        yield claims.startService()
        self.addCleanup(claims.stopService)
        self.assertEqual(
            len(self.logs.matching("releasing the build requests of inactive masters failed")), 1
        )
        self.flushLoggedErrors(RuntimeError)
        self.patch(self.master.db.pool, "do", real_do)
        yield claims.sweep()
        self.assertEqual(claims.released, [82, 88])


class Interleaving:
    """A connection that lets another master act between the sweep's SELECT and its DELETEs."""

    def __init__(self, conn: Any, other_master: Any) -> None:
        self.conn = conn
        self.other_master = other_master
        self.statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        result = self.conn.execute(*args, **kwargs)
        self.statements += 1
        if self.statements == 1:
            rows = result.fetchall()
            self.other_master(self.conn)
            self.conn.commit()
            return _Rows(rows)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchall(self) -> list[Any]:
        return self.rows


class Races(Cluster):
    """The DELETE checks again what the SELECT saw: another master may act in between."""

    @defer.inlineCallbacks
    def release_while(self, other_master: Any) -> Any:
        db = self.master.db
        released = yield db.pool.do(lambda conn: thd_release(Interleaving(conn, other_master), db.model, OWN))
        claimed = yield self.claimed_by()
        return released, claimed

    @defer.inlineCallbacks
    def test_a_master_that_comes_back_keeps_its_claims(self) -> Any:
        model = self.master.db.model

        def comes_back(conn: Any) -> None:
            conn.execute(model.masters.update().where(model.masters.c.id == CRASHED).values(active=1))

        released, claimed = yield self.release_while(comes_back)
        self.assertEqual(released, {})
        self.assertEqual((claimed[82], claimed[88]), (CRASHED, CRASHED))

    @defer.inlineCallbacks
    def test_a_master_that_starts_again_lists_its_builders_first_and_keeps_its_claims(self) -> Any:
        model = self.master.db.model

        def lists_builders(conn: Any) -> None:
            conn.execute(model.builder_masters.insert().values(builderid=77, masterid=CRASHED))

        released, claimed = yield self.release_while(lists_builders)
        self.assertEqual(released, {})
        self.assertEqual((claimed[82], claimed[88]), (CRASHED, CRASHED))

    @defer.inlineCallbacks
    def test_a_claim_released_and_taken_by_another_master_is_left_alone(self) -> Any:
        claims = self.master.db.model.buildrequest_claims

        def releases_82_and_claims_it(conn: Any) -> None:
            conn.execute(claims.delete().where(claims.c.brid == 82))
            conn.execute(claims.insert().values(brid=82, masterid=LIVE, claimed_at=NOW))

        released, claimed = yield self.release_while(releases_82_and_claims_it)
        self.assertEqual(released, {(CRASHED, "crashed"): [88]})
        self.assertEqual((claimed[82], claimed[88]), (LIVE, None))

    @defer.inlineCallbacks
    def test_a_claim_another_master_released_first_is_not_reported(self) -> Any:
        claims = self.master.db.model.buildrequest_claims

        def releases_88(conn: Any) -> None:
            conn.execute(claims.delete().where(claims.c.brid == 88))

        released, claimed = yield self.release_while(releases_88)
        self.assertEqual(released, {(CRASHED, "crashed"): [82]})
        self.assertEqual((claimed[82], claimed[88]), (None, None))

    @defer.inlineCallbacks
    def test_a_request_completed_meanwhile_keeps_its_claim(self) -> Any:
        requests = self.master.db.model.buildrequests

        def completes_82(conn: Any) -> None:
            conn.execute(requests.update().where(requests.c.id == 82).values(complete=1, results=0))

        released, claimed = yield self.release_while(completes_82)
        self.assertEqual(released, {(CRASHED, "crashed"): [88]})
        self.assertEqual(claimed[82], CRASHED)


class Timers(Cluster):
    def heartbeat(self, seconds: float) -> None:
        self.master.masterHeartbeatService = type("Timer", (), {"step": seconds})()  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def own_started(self) -> Any:
        claims = yield self.started()
        self.master.mq.callConsumer(
            ("masters", str(OWN), "started"), {"masterid": OWN, "name": "own", "active": True}
        )
        yield self.master.mq.wait_consumed()
        return claims

    @defer.inlineCallbacks
    def test_buildbot_defaults(self) -> Any:
        self.heartbeat(60)
        yield self.own_started()
        (line,) = self.logs.matching("are released here")
        self.assertIn("inactive 600 s after its last heartbeat (every 60 s)", line)
        self.assertIn("run again 540 to 660 s after the crash", line)
        self.assertEqual(self.logs.matching("less than three heartbeats"), [])

    @defer.inlineCallbacks
    def test_shortened_expiry_follows_the_module_constant(self) -> Any:
        self.patch(masters, "EXPIRE_MINUTES", 0.5)
        self.heartbeat(5)
        yield self.own_started()
        self.assertEqual(orphans.expiry_seconds(), 30)
        (line,) = self.logs.matching("are released here")
        self.assertIn("inactive 30 s after its last heartbeat (every 5 s)", line)

    @defer.inlineCallbacks
    def test_expiry_below_three_heartbeats_is_warned_of(self) -> Any:
        self.patch(masters, "EXPIRE_MINUTES", 1)
        self.heartbeat(30)
        yield self.own_started()
        (line,) = self.logs.matching("less than three heartbeats")
        self.assertIn("EXPIRE_MINUTES (60 s) is less than three heartbeats (30 s)", line)


class FollowConfig(TestReactorMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.setup_test_reactor()
        self.master = yield fakemaster.make_master(self, basedir=str(scratch_dir(self) / "master"))
        self.parent = service.AsyncMultiService()
        yield self.parent.setServiceParent(self.master)

    @defer.inlineCallbacks
    def test_only_with_multimaster(self) -> Any:
        yield OrphanedClaims.follow_config(self.parent)
        self.assertNotIn(OrphanedClaims.name, self.parent.namedServices)
        self.master.config.multiMaster = True
        yield OrphanedClaims.follow_config(self.parent)
        yield OrphanedClaims.follow_config(self.parent)  # a reconfig: still one
        self.assertIsInstance(self.parent.namedServices[OrphanedClaims.name], OrphanedClaims)
        self.master.config.multiMaster = False
        yield OrphanedClaims.follow_config(self.parent)
        self.assertNotIn(OrphanedClaims.name, self.parent.namedServices)
