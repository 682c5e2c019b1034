"""The base of the tests that run a real Buildbot master and ``ssh-worker`` processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from buildbot_sshmux.demo import harness as T
from tests import support as S


class RealMasterCase(unittest.TestCase):
    """A fresh directory and master log per test; set-up always undone."""

    tmp_prefix = "sshmux-it-"
    log_class: Any = S.LogCapture
    # Errors Buildbot or Twisted log (with a traceback) on a path the test
    # provokes: (exception type, message).  Any other logged error fails the test.
    expected_errors: tuple[tuple[type[BaseException], str], ...] = ()

    def setUp(self) -> None:
        self.addCleanup(self.flush_expected_errors)
        self.root = Path(tempfile.mkdtemp(prefix=self.tmp_prefix))
        if not os.environ.get("SSHMUX_KEEP_TMP"):
            self.addCleanup(shutil.rmtree, self.root, True)
        self.log = self.log_class(self.root / "master.log")
        self.log.start()
        self.addCleanup(self.log.stop)
        self.launchers: list[T.LauncherProcess] = []
        self.master: Any = None

    def flush_expected_errors(self) -> None:
        for kind, message in self.expected_errors:
            for failure in self.flushLoggedErrors(kind):
                if message not in str(failure.value):
                    self.fail(f"unexpected logged error: {failure.getTraceback()}")

    def make_site(self, hosts: Sequence[str]) -> T.Site:
        self.site = T.Site(self.root, list(hosts))
        return self.site

    def start_launcher(
        self, config: Path, args: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> T.LauncherProcess:
        """Start ``ssh-worker run [ARGS] CONFIG``; it is stopped at clean-up."""
        launcher = T.LauncherProcess(config, args, env)
        launcher.start()
        self.launchers.append(launcher)
        self.addCleanup(lambda: defer.ensureDeferred(S.stop_launcher(reactor, launcher)))
        return launcher

    # -- waiting and asserting ---------------------------------------------------

    def extra_diagnostics(self) -> list[str]:
        """More to show when a test fails (subclasses add theirs)."""
        return []

    def diagnostics(self) -> str:
        parts = [f"test directory: {self.root} (set SSHMUX_KEEP_TMP=1 to keep it)"]
        if self.master is not None and not getattr(self.master, "_fault_stopped", False):
            parts.append(f"attached now: {sorted(T.attached_workers(self.master))}")
        parts += self.extra_diagnostics()
        seen = set()
        for launcher in self.launchers:
            if launcher.log_path in seen:
                continue
            seen.add(launcher.log_path)
            code = launcher.process.poll() if launcher.process else None
            tail = "\n".join(launcher.output().splitlines()[-30:])
            parts.append(f"--- {launcher.log_path} (exit code {code}), last lines:\n{tail}")
        return "\n".join(parts)

    async def wait_for(self, predicate: Any, timeout: float, what: str, interval: float = 0.1) -> float:
        try:
            return await T.wait_until(reactor, predicate, timeout, what, interval)
        except TimeoutError as e:
            raise self.failureException(f"{e}\n{self.diagnostics()}") from None

    async def wait_detached(self, names: Iterable[str], timeout: float = 30.0) -> float:
        gone = set(names)
        return await self.wait_for(
            lambda: not gone & T.attached_workers(self.master), timeout, f"{sorted(gone)} to detach"
        )

    async def assertStaysDetached(self, names: Iterable[str], seconds: float) -> None:
        """None of ``names`` attaches at any moment of the next ``seconds``."""
        names = set(names)
        try:
            await T.wait_until(reactor, lambda: bool(names & T.attached_workers(self.master)), seconds, "")
        except TimeoutError:
            return
        self.fail(f"{sorted(names & T.attached_workers(self.master))} attached\n{self.diagnostics()}")

    def assertAlive(self, launcher: T.LauncherProcess) -> None:
        assert launcher.process is not None
        if launcher.process.poll() is not None:
            self.fail(
                f"launcher {launcher.config} exited ({launcher.process.returncode})\n{self.diagnostics()}"
            )

    async def assertBuildsGreen(self, requests: Sequence[tuple[str, str]]) -> None:
        from buildbot.process.results import Results

        results = await T.run_builds(self.master, requests)
        named = {f"{b} on {h}": Results[r] for (b, h), r in zip(requests, results, strict=True)}
        self.assertEqual(named, {k: "success" for k in named}, self.diagnostics())

    def connections(self, names: Iterable[str]) -> dict[str, Any]:
        """The master's connection object of each attached worker."""
        conns = self.master.workers.connections
        return {n: conns[n] for n in names if n in conns}
