"""One worker session: buildbot-worker's own bot and PB login, over a channel.

Several sessions share one process and one reactor, so none may stop it.
Stock buildbot-worker calls ``reactor.stop()`` when the master asks the worker
to shut down, when a login fails for a reason other than a bad password (a
duplicate worker name, say) and when retries run out.  Here each such path
stops or retries only its own session, and says so in the log.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from buildbot_worker.base import WorkerBase
from buildbot_worker.pb import BotFactory, BotPb
from twisted.application.internet import ClientService
from twisted.cred import credentials
from twisted.cred import error as cred_error
from twisted.internet import defer, task
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.spread import pb

from buildbot_sshmux.wire.transport import BoundedLogger
from buildbot_sshmux.worker.link import backoff

log = Logger()


class SessionClientService(ClientService):
    """A ClientService whose retries are not logged at info: the session's
    factory says "next login in ..." already, naming the worker."""

    _log = BoundedLogger()


class SessionBotFactory(BotFactory):
    """buildbot-worker's PB client factory, minus its ``reactor.stop()``."""

    noisy = False  # no "Starting factory" line for every channel

    def __init__(self, session: WorkerSession, keepalive: int | None, reactor: Any) -> None:
        super().__init__(None, None, keepalive, None, retryPolicy=session.retry_delay)
        self.session = session
        self.clock = reactor
        self.failed_logins = 0  # since the last login that succeeded
        # BotFactory's keepalive timer runs on its class attribute _reactor
        # (buildbot-worker's own tests set it so): ours, the launcher's.
        self._reactor = reactor

    @defer.inlineCallbacks
    def failedToGetPerspective(self, why: Any, broker: Any) -> Any:
        name = self.session.name
        if not why.check(pb.PBConnectionLost):
            refusal = "login refused" if why.check(cred_error.UnauthorizedLogin) else why.getErrorMessage()
            self.session.last_refusal = (refusal, self.clock.seconds())
            kind = "unauthorized" if why.check(cred_error.UnauthorizedLogin) else "rejected"
            self.session.counters["logins_refused", kind] += 1
        if why.check(pb.PBConnectionLost):
            log.info("worker {worker}: lost the channel while logging in", worker=name)
        elif why.check(cred_error.UnauthorizedLogin):
            log.warn(
                "worker {worker}: master refused the login; check the worker name, its"
                " password and this host's workers= in authorized_hosts",
                worker=name,
            )
        else:
            # Stock buildbot-worker stops the reactor here (e.g. duplicate name).
            log.warn(
                "worker {worker}: master rejected the session ({error}); retrying, the other"
                " sessions are not affected",
                worker=name,
                error=why.getErrorMessage(),
            )
        self.failed_logins += 1
        delay = self.session.retry_delay(self.failed_logins)
        log.info("worker {worker}: next login in {delay:.1f}s", worker=name, delay=delay)
        try:
            yield task.deferLater(self.clock, delay, lambda: None)
        except defer.CancelledError:
            pass
        broker.transport.loseConnection()

    def gotPerspective(self, perspective: Any) -> None:
        self.failed_logins = 0
        self.session.moving = False  # a move ends with a login (wherever it lands)
        where = getattr(self.session.endpoint, "master_address", None)
        log.info(
            "worker {worker}: attached to master {master}", worker=self.session.name, master=where or "?"
        )
        super().gotPerspective(perspective)


class SessionBot(BotPb):
    """buildbot-worker's PB bot, whose master-requested shutdown stops its own
    session (stock buildbot-worker stops the reactor, and so every session)."""

    stop_session: Callable[[], None] | None = None
    messages = 0  # remote_print calls: "attached", and the "ping" that starts every build

    def remote_print(self, message: str) -> Any:
        self.messages += 1
        return super().remote_print(message)

    def remote_shutdown(self) -> None:
        if self.stop_session is not None:
            self.stop_session()


class WorkerSession(WorkerBase):
    """One worker session, from buildbot-worker's public pieces: a `WorkerBase`
    with a `SessionBot`, logged in by a `SessionBotFactory` over ``endpoint``
    (a channel on the host's shared SSH connection)."""

    def __init__(
        self,
        name: str,
        password: str,
        basedir: str,
        endpoint: IStreamClientEndpoint,
        reactor: Any,
        *,
        keepalive: int = 600,
        retry_delay: Callable[[int], float] | None = None,
        umask: int | None = None,
        unicode_encoding: str | None = None,
        delete_leftover_dirs: bool = False,
        numcpus: int | None = None,
        counters: Counter[Hashable] | None = None,
    ) -> None:
        os.makedirs(basedir, exist_ok=True)
        # ("logins_refused", "unauthorized" | "rejected") -> n: the launcher's, for its metrics
        self.counters: Counter[Hashable] = counters if counters is not None else Counter()
        super().__init__(
            name,
            basedir,
            SessionBot,
            umask=umask,
            unicode_encoding=unicode_encoding,
            delete_leftover_dirs=delete_leftover_dirs,
        )
        if numcpus is not None:
            self.bot.numcpus = numcpus
        self.retry_delay = retry_delay or backoff(initial=0.5, maximum=30.0)
        self.stopped_by_master = False
        self.moving = False  # asked its master to let it go, to log in elsewhere
        self.leaving = False  # asked its master to let it go, to stop (a graceful stop)
        self.last_refusal: tuple[str, float] | None = None  # the master's last refusal, and when
        self.on_stopped_by_master: Callable[[WorkerSession], None] | None = None
        self.endpoint = endpoint
        self._clock = reactor
        self.bot.stop_session = self._master_asked_shutdown
        encoding = self.bot.unicode_encoding
        self.bf = SessionBotFactory(self, keepalive or None, reactor)
        self.bf.startLogin(
            credentials.UsernamePassword(name.encode(encoding), password.encode(encoding)),
            client=self.bot,
        )
        SessionClientService(endpoint, self.bf, retryPolicy=self.retry_delay, clock=reactor).setServiceParent(
            self
        )

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        # buildbot-worker's Worker.stopService, which waits for BotFactory's
        # shutdown notice; only stopFactory() gives it, and a session that
        # never opened a channel (master unreachable) would wait forever:
        # stopping the timers gives it.
        self.bf.stopTimers()
        yield super().stopService()
        yield self.bf.waitForCompleteShutdown()

    @property
    def attached(self) -> bool:
        """Whether this session is logged in to the master now."""
        return self.bf.perspective is not None and not self.bf.perspective.broker.disconnected

    @property
    def busy(self) -> bool:
        """Whether a command of a build is running on this session now.

        buildbot-worker's PB bot keeps each builder's running command on that
        builder (``bot.builders[name].protocol_command``); its msgpack bot
        keeps them all in ``bot.protocol_commands``.
        """
        builders = getattr(self.bot, "builders", None) or {}
        if any(getattr(wfb, "protocol_command", None) is not None for wfb in builders.values()):
            return True
        return bool(getattr(self.bot, "protocol_commands", None))

    def move(self) -> None:
        """Leave this master once its builds on this session have ended, and log
        in again wherever the endpoint then leads (another master of a cluster).

        This is Buildbot's own graceful worker shutdown: the master starts no
        new build on the worker and, once none runs, asks it to shut down.
        """
        if self.moving or self.leaving or not self.attached:
            return
        self.moving = True

        def refused(failure: Any) -> None:
            self.moving = False
            log.warn("worker {worker}: the master refused to let it move ({error})", worker=self.name,
                     error=failure.getErrorMessage())  # fmt: skip

        self.bf.perspective.callRemote("shutdown").addErrback(refused)

    def leave(self) -> None:
        """Stop once the master has let this session go, its builds ended (a graceful stop)."""
        if self.leaving:
            return
        self.leaving, self.moving = True, False
        if not self.attached:
            self._stop()
            return

        def refused(failure: Any) -> None:
            log.warn("worker {worker}: cannot stop gracefully ({error}); stopping now", worker=self.name,
                     error=failure.getErrorMessage())  # fmt: skip
            self._stop()

        self.bf.perspective.callRemote("shutdown").addErrback(refused)

    def _stop(self) -> None:
        if self.parent is not None:
            self.disownServiceParent()
        if self.on_stopped_by_master is not None:
            self.on_stopped_by_master(self)

    release_grace = 0.5
    """Seconds between the master's release of a moving or stopping session and its leaving."""

    def _leave(self, broker: Any, messages: int) -> None:
        """Leave the master that released this session (drop the channel to move,
        or stop the session), unless a build began meanwhile.

        Buildbot releases a worker whose builders are all idle, but a build
        it had already chosen the worker for may start just after (a
        race of its graceful shutdown): its ping and first command follow the
        release.  Leaving would cut that build (RETRY).  Buildbot releases
        the worker again once that build ends (the worker stays in graceful
        shutdown), and the session leaves then.
        """
        if getattr(broker, "disconnected", False):
            return
        if self.busy or self.bot.messages != messages:
            log.info(
                "worker {worker}: a build started as the master released it; it leaves once that build ends",
                worker=self.name,
            )
            return
        if self.leaving:
            log.info("worker {worker}: its builds have finished; stopping it", worker=self.name)
            self._stop()
            return
        self.moving = False
        broker.transport.loseConnection()

    def _master_asked_shutdown(self) -> None:
        if self.moving or self.leaving:
            # Released (Buildbot's answer to move() or leave()): leave a moment
            # later, so that the answer gets out; a move's ClientService then
            # logs in again, through the endpoint.
            broker = self.bf.perspective.broker if self.bf.perspective is not None else None
            if broker is not None:
                self._clock.callLater(self.release_grace, self._leave, broker, self.bot.messages)
            elif self.leaving:
                self._stop()
            else:
                self.moving = False
            return
        # Stock buildbot-worker stops the reactor, and so every other session.
        log.info(
            "worker {worker}: the master asked this worker to shut down; stopping this session only",
            worker=self.name,
        )
        self.stopped_by_master = True
        self._clock.callLater(0.2, self._stop)
