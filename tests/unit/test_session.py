"""Worker sessions share one reactor: none of them may stop it.

No sockets: each session gets a fake endpoint, and a `task.Clock` stands in
for the reactor.  The global reactor's ``stop`` is patched to record calls,
so a session taking stock buildbot-worker's ``reactor.stop()`` path fails.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from buildbot_sshmux.worker.link import backoff
from buildbot_sshmux.worker.session import SessionBotFactory, SessionClientService, WorkerSession

from .tmpdirs import scratch_dir


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Records connection attempts; each waits until the test fires it."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, defer.Deferred[Any]]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.attempts.append((factory, d))
        return d


class FakeBroker:
    def __init__(self) -> None:
        self.transport = StringTransport()

    # just enough of pb.Broker for Referenceable.remoteMessageReceived
    def unserialize(self, value: Any) -> Any:
        return value

    def serialize(self, value: Any, perspective: Any = None) -> Any:
        return value

    def sendDecRef(self, luid: int) -> None:  # a RemoteReference going away
        pass


class SessionTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stops: list[str] = []
        self.patch(reactor, "stop", lambda: self.stops.append("global reactor"))
        self.clock.stop = lambda: self.stops.append("session reactor")  # type: ignore[attr-defined]

    def session(self, name: str, endpoint: FakeEndpoint | None = None, **kwargs: Any) -> WorkerSession:
        kwargs.setdefault("retry_delay", lambda attempt: 7.0 * attempt)
        return WorkerSession(
            name, "pw", str(scratch_dir(self) / name), endpoint or FakeEndpoint(), self.clock, **kwargs
        )

    def tearDown(self) -> None:
        for call in self.clock.getDelayedCalls():
            call.cancel()


class MasterShutdownTests(SessionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.launcher = MultiService()
        self.endpoints = [FakeEndpoint(), FakeEndpoint()]
        self.one = self.session("one-debian", self.endpoints[0])
        self.two = self.session("two-debian", self.endpoints[1])
        self.one.setServiceParent(self.launcher)
        self.two.setServiceParent(self.launcher)
        self.launcher.startService()

    def tearDown(self) -> None:
        self.successResultOf(self.launcher.stopService())
        super().tearDown()

    def test_each_session_dials_only_its_endpoint(self) -> None:
        self.assertEqual([len(e.attempts) for e in self.endpoints], [1, 1])
        # One ClientService (the stock Worker's, on its connection string, is gone): ours.
        self.assertEqual([type(c) for c in self.one if isinstance(c, ClientService)], [SessionClientService])

    def test_master_shutdown_stops_only_that_session(self) -> None:
        # The master calls remote_shutdown through PB, as it does on a stock worker.
        self.one.bot.remoteMessageReceived(FakeBroker(), b"shutdown", (), {})

        self.assertTrue(self.one.stopped_by_master)
        self.assertFalse(self.two.stopped_by_master)
        self.clock.advance(0.2)

        self.assertEqual(self.stops, [])
        self.assertFalse(self.one.running)
        self.assertIsNone(self.one.parent)
        self.assertTrue(self.two.running)
        self.assertIs(self.two.parent, self.launcher)
        self.assertTrue(self.launcher.running)
        self.assertEqual([len(e.attempts) for e in self.endpoints], [1, 1])
        self.assertTrue(self.endpoints[0].attempts[0][1].called, "its dial is cancelled")
        self.assertFalse(self.endpoints[1].attempts[0][1].called)

    def test_shutdown_waits_a_moment_for_the_reply(self) -> None:
        self.one.bot.remote_shutdown()
        self.clock.advance(0.1)
        self.assertTrue(self.one.running)
        self.clock.advance(0.1)
        self.assertFalse(self.one.running)

    def test_not_attached_before_login(self) -> None:
        self.assertFalse(self.one.attached)


class FakePerspective:
    """A logged-in session's perspective: its broker, and the remote calls made on it."""

    def __init__(self) -> None:
        self.broker = FakeBroker()
        self.broker.disconnected = False  # type: ignore[attr-defined]
        self.calls: list[str] = []

    def callRemote(self, name: str, *args: Any) -> defer.Deferred[None]:
        self.calls.append(name)
        return defer.succeed(None)


class FakeBuilder:
    protocol_command: object | None = None


class MoveTests(SessionTestCase):
    """A move: Buildbot's graceful shutdown of the worker, then a login elsewhere."""

    def setUp(self) -> None:
        super().setUp()
        self.one = self.session("one-debian")
        self.perspective = FakePerspective()
        self.one.bf.perspective = self.perspective
        self.transport = self.perspective.broker.transport

    def release(self) -> None:
        """The master's answer to the move: it calls remote_shutdown through PB."""
        self.one.bot.remoteMessageReceived(self.perspective.broker, b"shutdown", (), {})

    def test_busy_while_a_builder_runs_a_command(self) -> None:
        builder = FakeBuilder()
        self.one.bot.builders["proj"] = builder
        self.assertFalse(self.one.busy)
        builder.protocol_command = object()  # buildbot-worker's PB bot: the command is the builder's
        self.assertTrue(self.one.busy)

    def test_released_it_leaves_a_moment_later_and_is_not_stopped(self) -> None:
        self.one.move()
        self.assertEqual(self.perspective.calls, ["shutdown"])
        self.assertTrue(self.one.moving)
        self.release()
        self.clock.advance(WorkerSession.release_grace - 0.01)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.01)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.one.moving)
        self.assertFalse(self.one.stopped_by_master)

    def test_a_build_starting_as_it_is_released_is_not_cut(self) -> None:
        # Buildbot releases an idle worker while a build it chose the worker
        # for is starting: the build's ping follows the release.
        self.one.move()
        self.release()
        self.one.bot.remoteMessageReceived(self.perspective.broker, b"print", ("ping",), {})
        self.clock.advance(5)
        self.assertFalse(self.transport.disconnecting, "the starting build was cut")
        self.assertTrue(self.one.moving)
        self.release()  # at that build's end, Buildbot releases the worker again
        self.clock.advance(WorkerSession.release_grace)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.one.stopped_by_master)

    def test_a_command_running_when_it_would_leave_is_not_cut(self) -> None:
        builder = FakeBuilder()
        self.one.bot.builders["proj"] = builder
        self.one.move()
        self.release()
        builder.protocol_command = object()
        self.clock.advance(5)
        self.assertFalse(self.transport.disconnecting)
        builder.protocol_command = None
        self.release()
        self.clock.advance(WorkerSession.release_grace)
        self.assertTrue(self.transport.disconnecting)


class FailedLoginTests(SessionTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.worker = self.session("libxml2-debian-sid")
        self.factory: SessionBotFactory = self.worker.bf
        self.broker = FakeBroker()

    def fail_login(self, why: Failure) -> defer.Deferred[Any]:
        return self.factory.failedToGetPerspective(why, self.broker)

    def assertRetriesAfter(self, d: defer.Deferred[Any], delay: float) -> None:
        self.assertEqual([c.getTime() - self.clock.seconds() for c in self.clock.getDelayedCalls()], [delay])
        self.clock.advance(delay - 0.01)
        self.assertFalse(self.broker.transport.disconnecting)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertTrue(self.broker.transport.disconnecting, "the channel is closed to retry")
        self.successResultOf(d)
        self.assertEqual(self.stops, [])

    def test_master_rejecting_the_session_does_not_stop_the_reactor(self) -> None:
        why = Failure(pb.RemoteError("builtins.RuntimeError", "rejecting duplicate worker", None))
        d = self.fail_login(why)
        self.assertEqual(self.stops, [])
        self.assertRetriesAfter(d, 7.0)
        self.assertEqual(self.worker.counters, {("logins_refused", "rejected"): 1})  # the metrics' count

    def test_local_exception_does_not_stop_the_reactor(self) -> None:
        d = self.fail_login(Failure(RuntimeError("rejecting duplicate worker")))
        self.assertRetriesAfter(d, 7.0)

    def test_unauthorized_login_retries(self) -> None:
        d = self.fail_login(Failure(UnauthorizedLogin()))
        self.assertRetriesAfter(d, 7.0)
        self.assertEqual(self.worker.counters, {("logins_refused", "unauthorized"): 1})

    def test_channel_lost_while_logging_in_retries(self) -> None:
        d = self.fail_login(Failure(pb.PBConnectionLost("gone")))
        self.assertRetriesAfter(d, 7.0)
        self.assertEqual(self.worker.counters, {}, "a lost channel is not a refusal")

    def test_retries_back_off_and_reset_on_success(self) -> None:
        self.assertRetriesAfter(self.fail_login(Failure(UnauthorizedLogin())), 7.0)
        self.broker = FakeBroker()
        self.assertRetriesAfter(self.fail_login(Failure(UnauthorizedLogin())), 14.0)

        perspective = pb.RemoteReference(None, FakeBroker(), 1, None)  # type: ignore[arg-type]
        self.factory.gotPerspective(perspective)
        self.factory.stopTimers()
        self.broker = FakeBroker()
        self.assertRetriesAfter(self.fail_login(Failure(UnauthorizedLogin())), 7.0)


class ReconnectTests(SessionTestCase):
    def test_session_that_never_reached_the_master_stops_at_once(self) -> None:
        worker = self.session("w")
        worker.startService()
        self.successResultOf(worker.stopService())
        self.assertFalse(worker.running)

    def test_failed_dial_is_retried_on_the_sessions_clock(self) -> None:
        endpoint = FakeEndpoint()
        worker = self.session("w", endpoint)
        worker.startService()
        self.addCleanup(lambda: self.successResultOf(worker.stopService()))
        _factory, d = endpoint.attempts[0]
        d.errback(Failure(RuntimeError("the master refused the channel")))
        self.clock.advance(6.9)
        self.assertEqual(len(endpoint.attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(endpoint.attempts), 2)
        self.assertEqual(self.stops, [])


class Midpoint(random.Random):
    """An rng whose jitter is always none: uniform(a, b) is the middle."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


class BackoffTests(TestCase):
    def test_grows_by_factor_and_caps_at_maximum(self) -> None:
        delay = backoff(initial=1.0, factor=2.0, maximum=20.0, rng=Midpoint())
        self.assertEqual([delay(n) for n in range(1, 8)], [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0])

    def test_first_attempt_waits_the_initial_delay(self) -> None:
        delay = backoff(initial=0.5, rng=Midpoint())
        self.assertEqual(delay(0), 0.5)
        self.assertEqual(delay(1), 0.5)

    def test_huge_attempt_numbers_stay_at_the_cap(self) -> None:
        delay = backoff(initial=1.0, factor=2.0, maximum=60.0, rng=Midpoint())
        self.assertEqual(delay(1000), 60.0)

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        seed=st.integers(0, 2**32),
        attempt=st.integers(1, 40),
        initial=st.floats(0.1, 5.0),
        maximum=st.floats(5.0, 120.0),
    )
    def test_jitter_stays_within_half(self, seed: int, attempt: int, initial: float, maximum: float) -> None:
        base = min(maximum, initial * 2.0 ** (attempt - 1))
        value = backoff(initial=initial, maximum=maximum, rng=random.Random(seed))(attempt)
        self.assertGreaterEqual(value, base * 0.5)
        self.assertLessEqual(value, base * 1.5)

    def test_jitter_spreads_hosts_apart(self) -> None:
        delay = backoff(initial=10.0, maximum=10.0, rng=random.Random(1))
        values = [delay(1) for _ in range(200)]
        self.assertLess(min(values), 6.0)
        self.assertGreater(max(values), 14.0)
