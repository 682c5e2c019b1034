"""``ssh-worker run``: the launcher in the foreground, its log, its controls and systemd.

The log goes to stdout, to ``--logfile`` (rotated as buildbot-worker's
``twistd.log``: 10 MB, 10 files kept; reopened on SIGHUP, for logrotate), or,
under systemd, to the journal with each line's priority and no timestamp of
our own.  Under systemd the launcher says when it is ready (``Type=notify``),
reloading and stopping, and keeps a status line up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from twisted.internet import defer, task
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.wire.transport import BoundedLogger
from buildbot_sshmux.worker import config as launcher_config
from buildbot_sshmux.worker import systemd
from buildbot_sshmux.worker.control import LauncherControls
from buildbot_sshmux.worker.launcher import Launcher

ROTATE_LENGTH = 10_000_000
MAX_ROTATED_FILES = 10
STATUS_INTERVAL = 5.0

log = Logger()

_PRIORITY = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6, LogLevel.debug: 7}


def journal_observer(out: IO[str]) -> ILogObserver:
    """Lines as the journal reads them from stdout: ``<priority>`` then the text."""

    def format(event: dict[str, Any]) -> str | None:
        text = formatEvent(event)
        if not text:
            return None
        priority = _PRIORITY.get(event.get("log_level", LogLevel.info), 6)
        return "".join(f"<{priority}>{line}\n" for line in text.splitlines())

    return FileLogObserver(out, format)


def run(config_path: str, *, debug: bool, stop_timeout: float, logfile: str | None) -> int:
    from twisted.internet import reactor

    config = launcher_config.load(config_path)
    launcher = Launcher(config, reactor)
    controls = LauncherControls(launcher, reactor)
    port: list[Any] = []
    failed: list[Any] = []
    controls.listen().addCallbacks(port.append, failed.append)  # a second launcher stops here
    if failed:
        raise SSHMuxError(
            f"cannot serve the control socket {config.control_path}: {failed[0].getErrorMessage()};"
            " set control_socket in the config to a writable place"
        )
    if config.metrics is not None:
        from buildbot_sshmux.wire import metrics
        from buildbot_sshmux.worker.metrics import LauncherCollector

        metrics.serve(reactor, config.metrics, LauncherCollector(launcher)).addCallbacks(
            port.append, failed.append
        )
        if failed:
            for listening in port:
                listening.stopListening()
            raise SSHMuxError(
                f"cannot serve metrics on {config.metrics}: {failed[0].getErrorMessage()};"
                " set metrics in the config to a free port"
            )
    log_file: LogFile | None = None
    sink: ILogObserver
    if logfile is not None:
        path = Path(logfile).absolute()
        log_file = LogFile(
            path.name, str(path.parent), rotateLength=ROTATE_LENGTH, maxRotatedFiles=MAX_ROTATED_FILES
        )
        sink = textFileLogObserver(log_file)  # type: ignore[arg-type]  # a file-like LogFile
        controls.on_reload.append(log_file.reopen)
    elif systemd.under_journal():
        sink = journal_observer(sys.stdout)
    else:
        sink = textFileLogObserver(sys.stdout)
    BoundedLogger.show_debug = debug  # Conch's protocol lines too
    level = LogLevel.debug if debug else LogLevel.info
    observer = FilteringLogObserver(sink, [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    shown: list[str] = []

    def report_status() -> None:
        line = launcher.summary()
        if shown != [line]:
            shown[:] = [line]
            systemd.notify(f"STATUS={line}")

    status_loop = task.LoopingCall(report_status)
    status_loop.clock = reactor

    def started() -> None:
        if len(port) > 1:
            address = port[1].getHost()
            log.info(
                "Prometheus metrics on http://{host}:{port}/metrics",
                host=getattr(address, "host", "?"),
                port=getattr(address, "port", "?"),
            )
        launcher.startService()
        controls.install_signals()
        systemd.notify("READY=1", f"STATUS={launcher.summary()}")
        if systemd.notifying():  # the status line is for systemd alone: no timer without it
            status_loop.start(STATUS_INTERVAL, now=False)

    def stopping() -> Any:
        systemd.notify("STOPPING=1")
        if status_loop.running:
            status_loop.stop()
        return launcher.stop_within(reactor, stop_timeout)

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    reactor.addSystemEventTrigger(  # waited for: an answer on the control socket gets out first
        "before",
        "shutdown",
        lambda: defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in port]),
    )
    reactor.run()
    if log_file is not None:
        log_file.close()
    return 0
