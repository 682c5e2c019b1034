"""One worker session: a real buildbot-worker ``Worker`` whose PB runs over a channel.

Several sessions share one process and one reactor, so none may stop it.
Stock buildbot-worker calls ``reactor.stop()`` when the master asks the worker
to shut down, when a login fails for a reason other than a bad password (a
duplicate worker name, say) and when retries run out.  Here each such path
stops or retries only its own session, and says so in the log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from buildbot_worker.pb import BotFactory, Worker
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
        self._reactor = reactor

    @defer.inlineCallbacks
    def failedToGetPerspective(self, why: Any, broker: Any) -> Any:
        name = self.session.name
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
        self._failedAttempts += 1
        delay = self._timeoutForAttempt(self._failedAttempts)
        log.info("worker {worker}: next login in {delay:.1f}s", worker=name, delay=delay)
        try:
            yield task.deferLater(self._reactor, delay, lambda: None)
        except defer.CancelledError:
            pass
        broker.transport.loseConnection()

    def gotPerspective(self, perspective: Any) -> None:
        self._failedAttempts = 0
        log.info("worker {worker}: attached to the master", worker=self.session.name)
        super().gotPerspective(perspective)


class WorkerSession(Worker):
    """A buildbot-worker ``Worker`` reaching its master through ``endpoint``."""

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
        **worker_kwargs: Any,
    ) -> None:
        os.makedirs(basedir, exist_ok=True)
        self.retry_delay = retry_delay or backoff(initial=0.5, maximum=30.0)
        self.stopped_by_master = False
        # The placeholder connection string is never dialled: its ClientService
        # is replaced below by one on the channel endpoint.
        super().__init__(
            None,
            None,
            name,
            password,
            basedir,
            keepalive,
            connection_string="tcp:host=localhost:port=1",
            **worker_kwargs,
        )
        for child in list(self):
            if isinstance(child, ClientService):
                self.removeService(child)
        encoding = self.bot.unicode_encoding
        self.bf = SessionBotFactory(self, keepalive, reactor)
        self.bf.startLogin(
            credentials.UsernamePassword(name.encode(encoding), password.encode(encoding)),
            client=self.bot,
        )
        self.bot.remote_shutdown = self._master_asked_shutdown
        self._reactor = reactor
        SessionClientService(endpoint, self.bf, retryPolicy=self.retry_delay, clock=reactor).setServiceParent(
            self
        )

    def stopService(self) -> Any:
        # Worker.stopService waits for BotFactory's shutdown notice, which only
        # stopFactory() gives; a session that never opened a channel (master
        # unreachable) would wait forever.  Stopping the timers gives it.
        self.bf.stopTimers()
        return super().stopService()

    @property
    def attached(self) -> bool:
        """Whether this session is logged in to the master now."""
        return self.bf.perspective is not None and not self.bf.perspective.broker.disconnected

    def _master_asked_shutdown(self) -> None:
        # Stock buildbot-worker stops the reactor, and so every other session.
        log.info(
            "worker {worker}: the master asked this worker to shut down; stopping this session only",
            worker=self.name,
        )
        self.stopped_by_master = True
        self._reactor.callLater(0.2, self.disownServiceParent)
