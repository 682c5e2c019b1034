"""The running launcher's controls: its control socket, SIGHUP and SIGUSR1.

- ``GET /status``: `Launcher.status`;
- ``POST /reload`` and SIGHUP: read the config again and apply it; a config
  with an error is refused, in one line naming its file and line, and the
  running sessions go on;
- ``POST /stop?graceful=1&timeout=S`` and SIGUSR1: a graceful stop (running
  builds finish, idle sessions leave at once); ``POST /stop`` alone stops now,
  as SIGTERM does.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.wire import control
from buildbot_sshmux.worker import config as launcher_config
from buildbot_sshmux.worker import systemd
from buildbot_sshmux.worker.launcher import Launcher

log = Logger()

GRACEFUL_TIMEOUT = 3600.0
"""Seconds a graceful stop waits for builds by default (SIGUSR1 too)."""


class LauncherControls:
    """What the control socket and the signals do to one running `Launcher`."""

    def __init__(self, launcher: Launcher, reactor: Any) -> None:
        self.launcher = launcher
        self.reactor = reactor
        self._reloading: defer.Deferred[Any] | None = None
        self.on_reload: list[Callable[[], object]] = []  # e.g. reopen the log file

    def routes(self) -> dict[tuple[str, str], control.Route]:
        return {
            ("GET", "status"): lambda query: self.launcher.status(),
            ("POST", "reload"): lambda query: self.reload(),
            ("POST", "stop"): self.stop,
        }

    def listen(self) -> defer.Deferred[Any]:
        path = self.launcher.config.control_path
        return control.listen(
            self.reactor, path, self.routes(), f"a launcher for {self.launcher.config.path}"
        )

    def install_signals(self) -> None:
        """SIGHUP reloads, SIGUSR1 stops gracefully (each in the reactor's thread)."""
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload_logged))
        signal.signal(signal.SIGUSR1, lambda *_: self.reactor.callFromThread(self.stop, {"graceful": "1"}))

    def reload_logged(self) -> None:
        self.reload().addErrback(lambda f: f.trap(control.ControlError))

    def reload(self) -> defer.Deferred[Any]:
        if self._reloading is not None:
            return defer.fail(control.ControlError("a reload is running already; try again in a moment"))
        path = self.launcher.config.path
        for hook in self.on_reload:
            hook()
        try:
            new = launcher_config.load(path)
        except SSHMuxError as e:
            log.error("reload refused, the running sessions go on: {error}", error=str(e))
            return defer.fail(control.ControlError(f"reload refused: {e}"))
        systemd.notify("RELOADING=1")
        d = self._reloading = defer.maybeDeferred(self.launcher.reload, new)

        def done(result: Any) -> Any:
            self._reloading = None
            systemd.notify("READY=1", f"STATUS={self.launcher.summary()}")
            return result

        def failed(failure: Any) -> Any:
            self._reloading = None
            systemd.notify("READY=1")
            if failure.check(SSHMuxError):
                log.error("reload refused, the running sessions go on: {error}", error=str(failure.value))
                raise control.ControlError(f"reload refused: {failure.value}")
            return failure

        return d.addCallbacks(done, failed)

    def stop(self, query: dict[str, str]) -> dict[str, Any]:
        if query.get("graceful") in ("1", "true", "yes"):
            try:
                timeout = float(query.get("timeout", GRACEFUL_TIMEOUT))
            except ValueError:
                raise control.ControlError(
                    f"timeout must be a number of seconds, not {query['timeout']!r}"
                ) from None
            return {**self.launcher.stop_gracefully(timeout), "pid": os.getpid()}
        log.info("stopping now, as asked on the control socket")
        self.reactor.callLater(0, self.reactor.stop)
        return {"stopping": True, "sessions_left": sorted(self.launcher.sessions), "pid": os.getpid()}
