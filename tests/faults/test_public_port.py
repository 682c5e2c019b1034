"""The master's public SSH port under attack (issue 9): each attack stays within budget.

Each test runs a real master (sqlite, in this process, 127.0.0.1, port 0), one
legitimate worker host ``hosta`` (a real ``ssh-worker`` with two sessions),
and two child processes (``attack_client.py``), so that neither's memory or
CPU is the master's:

- the probe: another authorized host, ``hostp``, from another address
  (127.0.0.2), that logs in anew every 100 ms, opens a channel to the PB port
  and makes one PB round trip: what a legitimate host gets from the master;
- the attacker, from 127.0.0.1, running one attack for ~5 s (or N MB).

While the attacker works the test measures, and prints as ``[figures]`` lines
(the run's summary repeats them) before it asserts anything:

- ``rss_growth_mib``: the master's memory growth, the peak VmRSS of this
  process (sampled every 20 ms by a thread, so a busy reactor cannot hide
  it) less its value after a collection (and ``malloc_trim``) just before;
- ``log_growth_kib``: what the master logged meanwhile and as the attacker
  left (the length of every line the test's log capture formats, debug
  included, as Buildbot's master.log writes them), less the probe's own
  lines (logged while the master serves or accepts the probe's socket, or
  naming ``hostp`` or 127.0.0.2);
- ``legit_worst_latency_s``: the slowest probe overlapping the attack (one
  still running at its end counts for as long as it has run); a failed probe
  is counted in ``legit_probe_failures``;
- ``legit_sessions_detached``: whether either of hosta's sessions lost its
  connection at the master at any moment (sampled every 50 ms and compared
  by identity at the end);
- ``master_cpu_s``: this process's CPU time meanwhile.

Budgets: RSS growth <= 64 MiB (256 MiB for 100 attacking connections), log
growth <= 64 KiB, every probe served within 1 s and none failing, hosta's
sessions never detached, and the master alive afterwards (a new probe login
succeeds, the launcher still runs).  An attacker the master disconnects early
has simply lost: that is never an error here.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol, reactor, task
from twisted.logger import globalLogBeginner, globalLogPublisher
from twisted.python import context
from twisted.python import log as legacy_log

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.wire.keys import load_private_key, public_line

from .harness import FaultCase, TimedLog, figures, vm_rss_kib

KiB = 1024
MiB = 1024 * KiB
CLIENT = Path(__file__).with_name("attack_client.py")
REPO = Path(__file__).resolve().parents[2]

LEGIT, ATTACKER, PROBE = "hosta", "hostx", "hostp"
PROJECTS = ["alpha", "beta"]
PROBE_BIND = "127.0.0.2"  # another host: a per-source limit on 127.0.0.1 must not lock it out
ATTACK_SECONDS = 5.0

RSS_BUDGET = 64 * MiB
RSS_BUDGET_MANY = 256 * MiB
LOG_BUDGET = 64 * KiB
LATENCY_BUDGET = 1.0


# An age, as the refusal of a duplicate connection must give it: "12s", "3.5 s", "age", "ago".
AGE = re.compile(r"\d+(\.\d+)?\s*(s|sec|secs|seconds?|min|minutes?|h|hours?|ms)\b|\bage\b|\bago\b")


def inline(method: Callable[[Any], Awaitable[None]]) -> Callable[[Any], defer.Deferred[None]]:
    """A trial test method written as a coroutine."""

    @functools.wraps(method)
    def run(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(method(self))

    return run


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def release_memory() -> None:
    """Collect, and hand freed heap back to the system, so that an earlier
    test's freed memory is not reused unseen by this one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def probe_context() -> bool:
    """Whether the event being logged comes from the probe's connection: the
    reactor is serving its socket (the legacy log context names the peer), or
    the listening port is accepting it (its address is a local of ``doRead``)."""
    system = str((context.get(legacy_log.ILogContext) or {}).get("system", ""))
    if PROBE_BIND in system:
        return True
    try:
        frame = sys._getframe(2)
    except ValueError:
        return False
    for _ in range(60):
        if frame is None:
            return False
        if frame.f_code.co_name in ("doRead", "buildProtocol"):
            addr = frame.f_locals.get("addr")
            host = getattr(addr, "host", None) or (addr[0] if isinstance(addr, tuple) and addr else None)
            if host is not None:
                return bool(host == PROBE_BIND)
        frame = frame.f_back
    return False


class MeasuredLog(TimedLog):
    """`TimedLog` that counts every formatted line's full length, the probe's
    apart (marked "(probe)" in master.log), but keeps little of them: at most
    1 KiB of each in master.log, and only the first MiB of lines in memory, so
    that a flood of long lines does not grow the test's memory in the
    master's name (a real master writes its log to a file)."""

    KEEP_LINE = 1 * KiB
    KEEP_TOTAL = 1 * MiB
    PROBE_MARKS = (PROBE_BIND, f"host {PROBE} ")

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.total_bytes = 0
        self.total_lines = 0
        self.probe_bytes = 0
        self.unformattable = 0
        self.kept = 0

    def __call__(self, event: dict[str, Any]) -> None:
        text = self._format(event)
        if not text:
            return
        if probe_context() or any(mark in text[:2000] for mark in self.PROBE_MARKS):
            self.probe_bytes += len(text)
            text = "(probe) " + text  # in master.log, not counted
        else:
            self.total_bytes += len(text)
            self.total_lines += 1
        if "Unable to format event" in text[:200]:
            self.unformattable += 1
        if len(text) > self.KEEP_LINE:
            text = f"{text[: self.KEEP_LINE]}... [{len(text)} characters in all]\n"
        self._file.write(text)
        if self.kept < self.KEEP_TOTAL:
            self.kept += len(text)
            self.lines.append(text)
            self.timed.append((float(reactor.seconds()), text))


class RssSampler(threading.Thread):
    """Peak VmRSS of this process, every 20 ms, from a thread of its own."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = vm_rss_kib()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            self.peak = max(self.peak, vm_rss_kib())

    def finish(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, vm_rss_kib())
        return self.peak


class Child(protocol.ProcessProtocol):
    """An ``attack_client.py`` child: its ``WORD {json}`` lines, its stderr tail."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.lines: list[str] = []
        self.errors = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.lines += [line.decode(errors="replace").strip() for line in lines]

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data)[-16 * KiB :]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def records(self, word: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            head, _, body = line.partition(" ")
            if head == word:
                found.append(json.loads(body) if body else {})
        return found

    def first(self, *words: str) -> tuple[str, dict[str, Any]] | None:
        for line in self.lines:
            head, _, body = line.partition(" ")
            if head in words:
                return head, json.loads(body) if body else {}
        return None

    def send(self, line: bytes) -> None:
        self.transport.write(line + b"\n")

    def describe(self) -> str:
        return f"{self.mode}: last lines {self.lines[-5:]}, stderr: {self.errors.decode(errors='replace')[-3000:]}"


class PublicPortAttacks(FaultCase):
    timeout = 150
    log_class = MeasuredLog

    def setUp(self) -> None:
        super().setUp()
        # Before logging has begun, Twisted keeps the last events (and the
        # payloads they quote) for a future observer; a real master has begun.
        held = globalLogBeginner._temporaryObserver
        if held is not None:
            globalLogPublisher.removeObserver(held)
            self.addCleanup(globalLogPublisher.addObserver, held)

    def flush_expected_errors(self) -> None:
        # An attack may make Buildbot or Twisted log errors; the budgets are
        # what this suite asserts, those errors are in the log it measures,
        # and `attack` reports their types (master_logged_errors).
        self.flushLoggedErrors()

    # -- the pieces of one attack ---------------------------------------------------------------

    def spawn(self, mode: str, **args: Any) -> Child:
        child = Child(mode)
        process = reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, str(CLIENT), mode, json.dumps(args)],
            env=dict(os.environ),
            path=str(REPO),
        )

        def kill() -> Any:
            if child.ended.called:
                return None
            try:
                process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                return None
            return child.ended

        self.addCleanup(kill)
        return child

    async def stop_child(self, child: Child, timeout: float = 10.0) -> None:
        """Close its stdin (it exits, closing its connections); SIGKILL if it lingers."""
        if child.ended.called:
            return
        child.transport.closeStdin()
        try:
            await T.wait_until(reactor, lambda: child.ended.called, timeout, "the child to exit", 0.05)
        except TimeoutError:
            try:
                child.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            await child.ended

    async def wait_line(self, child: Child, words: tuple[str, ...], timeout: float, what: str) -> Any:
        await self.wait_for(
            lambda: child.first(*words) is not None or child.ended.called,
            timeout,
            f"{what} ({child.describe()})",
            interval=0.05,
        )
        found = child.first(*words)
        if found is None:
            self.fail(f"{what}: the child exited\n{child.describe()}")
        return found

    async def settle(self, limit: float, busy: float = 0.35) -> float:
        """Wait until the master's CPU use over half a second falls below ``busy``."""
        start = time.monotonic()
        while time.monotonic() - start < limit:
            cpu, wall = cpu_seconds(), time.monotonic()
            await sleep(0.5)
            if (cpu_seconds() - cpu) / max(1e-3, time.monotonic() - wall) < busy:
                break
        return time.monotonic() - start

    def probe_figures(self, probe: Child, start: float, end: float) -> dict[str, Any]:
        """The probes that overlapped [start, end]: how many, the slowest, the failures."""
        ended = {r["t"]: r for r in probe.records("END")}
        overlapping = []
        for started in probe.records("START"):
            t = started["t"]
            record = ended.get(t, {"t": t, "ok": None, "latency": end - t})  # still running
            if t <= end and t + record["latency"] >= start:
                overlapping.append(record)
        failures = [r for r in overlapping if r["ok"] is False]
        return {
            "legit_probes": len(overlapping),
            "legit_worst_latency_s": max((r["latency"] for r in overlapping), default=float("inf")),
            "legit_probe_failures": len(failures),
            "legit_failure_example": failures[0].get("error") if failures else None,
        }

    async def attack(
        self,
        title: str,
        mode: str,
        *,
        seconds: float = ATTACK_SECONDS,
        cap: int = 1 << 30,
        rss_budget: int = RSS_BUDGET,
        attacker_workers: bool = False,
        settle_limit: float = 10.0,
        watch: tuple[str, ...] = (),
        attacker_args: Callable[[Any], dict[str, Any]] = lambda master: {},
        full_startups: bool = False,
    ) -> tuple[dict[str, Any], list[str]]:
        """Run one attack against a fresh master; return its figures and the
        budgets it broke (`conclude` prints and asserts them).
        ``attacker_args(master)``: the attack's own arguments (the site
        exists by then); ``watch``: more workers whose detachments are
        recorded (in ``self.watched_detached``); ``full_startups``: the
        attack fills max_startups from as many addresses, so a new login
        may be refused meanwhile, as sshd would refuse it (counted, not a
        broken budget: the launcher retries; logged-in hosts must go on)."""
        self.make_site([LEGIT, ATTACKER, PROBE])
        hosts = [LEGIT, ATTACKER] if attacker_workers else [LEGIT]
        master = await self.start_master(PROJECTS, hosts)
        ssh_port, pb_port = T.ssh_port(master), T.pb_port(master)
        names = [T.worker_name(p, LEGIT) for p in PROJECTS]
        launcher = self.launch(LEGIT, names)
        common = {"ssh_port": ssh_port, "pb_port": pb_port, "host_key": self.site.host_key_line}
        probe = self.spawn("probe", identity=str(self.site.identities[PROBE]), bind=PROBE_BIND, **common)
        attacker = self.spawn(mode, duration=seconds, cap=cap, **common, **attacker_args(master))
        try:
            await self.wait_ready(names)
            (legit_ssh,) = self.ssh_connections(LEGIT)
            peer = legit_ssh.transport.getPeer()
            self.legit_address = f"{peer.host}:{peer.port}"
            await self.wait_for(
                lambda: any(r.get("ok") for r in probe.records("END")) or probe.ended.called,
                30,
                f"the probe's first login ({probe.describe()})",
            )
            word, ready = await self.wait_line(attacker, ("READY", "FAILED"), 40, "the attacker to get ready")
            if word == "FAILED":
                self.fail(f"the attacker could not set up: {ready}\n{attacker.describe()}")
        except self.failureException as e:
            figures(f"public port: {title}", setup_failed=str(e).splitlines()[0])
            raise

        # -- the attack -----------------------------------------------------------------------
        release_memory()
        await sleep(0.3)
        rss_before = vm_rss_kib()
        log_before = self.log.total_bytes
        lines_before = self.log.total_lines
        cpu_before = cpu_seconds()
        held = self.connections(names)
        held_ssh = self.ssh_connections(LEGIT)
        watched = self.connections(watch)
        legit_detached: set[str] = set()
        watched_detached: set[str] = set()

        watching = [True]

        def look() -> None:
            now = self.connections(names)
            legit_detached.update(n for n in names if now.get(n) is not held.get(n))
            if watching[0]:  # the attacker's own sessions: until it is stopped
                now = self.connections(watch)
                watched_detached.update(n for n in watch if now.get(n) is not watched.get(n))

        watcher = task.LoopingCall(look)
        sampler = RssSampler()
        sampler.start()
        watcher.start(0.05)
        go = time.monotonic()
        attacker.send(b"GO")
        try:
            try:
                word, report = await self.wait_line(
                    attacker, ("DONE", "FAILED"), seconds + 40, "the attacker to finish"
                )
            except self.failureException as e:
                word, report = "NO_REPORT", {"error": str(e).splitlines()[0]}
            settled = await self.settle(settle_limit)
            end = time.monotonic()
        finally:
            rss_peak = sampler.finish()
        cpu = cpu_seconds() - cpu_before
        attacked_s = end - go
        logged_errors = sorted({f.type.__name__ for f in self.flushLoggedErrors()})
        probes = self.probe_figures(probe, go, end)
        look()
        watching[0] = False
        await self.stop_child(attacker)
        await sleep(0.5)  # what the master logs once the attacker is gone counts too
        log_bytes = self.log.total_bytes - log_before
        log_lines = self.log.total_lines - lines_before
        look()
        watcher.stop()
        if self.ssh_connections(LEGIT) != held_ssh:
            legit_detached.add("(its SSH connection)")

        # -- afterwards: the master still serves a new login ----------------------------------
        after = time.monotonic()
        try:
            await self.wait_for(
                lambda: any(r.get("ok") and r["t"] >= after for r in probe.records("END")),
                20,
                "a probe login after the attack",
            )
            alive = True
        except self.failureException:
            alive = False
        launcher_alive = launcher.process is not None and launcher.process.poll() is None
        await self.stop_child(probe)

        values: dict[str, Any] = {
            "rss_growth_mib": (rss_peak - rss_before) / 1024,
            "rss_budget_mib": rss_budget / MiB,
            "log_growth_kib": log_bytes / KiB,
            "log_lines": log_lines,
            **probes,
            "legit_sessions_detached": sorted(legit_detached) or False,
            "master_cpu_s": cpu,
            "attack_s": attacked_s,
            "settle_s": settled,
            "attacker": word,
            "attacker_sent_mb": (report.get("sent") or 0) / 1e6,
            "attacker_connections": report.get("connections"),
            "attacker_dropped_by_master": report.get("lost"),
            "attacker_first_dropped_after_s": report.get("first_lost_after"),
            "attacker_disconnect_reasons": report.get("reasons"),
            "attacker_refused_at_setup": bool(report.get("refused_at_setup")),
            "master_logged_errors": logged_errors,
            "master_alive": alive and launcher_alive,
        }
        self.report_raw = report
        self.watched_detached = watched_detached
        problems = []
        if word != "DONE":
            problems.append(f"the attacker broke: {report}")
        if rss_peak - rss_before > rss_budget // KiB:
            problems.append(
                f"master RSS grew {values['rss_growth_mib']:.0f} MiB (budget {rss_budget // MiB} MiB)"
            )
        if log_bytes > LOG_BUDGET:
            problems.append(f"master log grew {log_bytes / KiB:.0f} KiB (budget {LOG_BUDGET // KiB} KiB)")
        if probes["legit_worst_latency_s"] > LATENCY_BUDGET:
            problems.append(
                f"the legitimate host waited {probes['legit_worst_latency_s']:.2f} s"
                f" (budget {LATENCY_BUDGET:.0f} s)"
            )
        if probes["legit_probe_failures"] and not full_startups:
            problems.append(
                f"{probes['legit_probe_failures']} of {probes['legit_probes']} legitimate logins failed"
                f" ({probes['legit_failure_example']})"
            )
        if legit_detached:
            problems.append(f"legitimate sessions detached: {sorted(legit_detached)}")
        if not alive:
            problems.append("the master served no new login after the attack")
        if not launcher_alive:
            problems.append("the legitimate launcher exited")
        return values, problems

    def conclude(self, title: str, values: dict[str, Any], problems: list[str]) -> None:
        """Print the figures, then fail with every budget broken."""
        values["budgets_broken"] = len(problems)
        figures(f"public port: {title}", **values)
        if problems:
            self.fail(f"{title}: " + "; ".join(problems) + f"\n{self.diagnostics()}")

    def legit_public_key(self, master: Any) -> dict[str, Any]:
        # The attacker knows an authorized host's public key (it is public): hosta's own.
        return {"public_key": public_line(load_private_key(self.site.identities[LEGIT]))}

    def identity_of(self, host: str) -> Callable[[Any], dict[str, Any]]:
        return lambda master: {"identity": str(self.site.identities[host])}

    # -- 1. memory, before any login -----------------------------------------------------------

    @inline
    async def test_1a_unsigned_key_queries_with_huge_algorithm_not_read(self) -> None:
        """Unsigned publickey queries (hasSig=0) with hosta's public key and a 1 MB
        algorithm name, which the master's PK_OK echoes; the answers are never read."""
        title = "1a unsigned key queries, 1 MB algorithm, not read"
        self.conclude(title, *await self.attack(title, "pkquery", attacker_args=self.legit_public_key))

    @inline
    async def test_1b_key_queries_before_key_exchange(self) -> None:
        """The same in plaintext: version line, SERVICE_REQUEST and USERAUTH_REQUESTs,
        never a KEXINIT."""
        title = "1b key queries with no key exchange"
        self.conclude(title, *await self.attack(title, "prekex", attacker_args=self.legit_public_key))

    # -- 2. logs, before any login -----------------------------------------------------------

    @inline
    async def test_2a_unknown_messages_with_1mb_payloads(self) -> None:
        """After the userauth service request: message numbers 70-79 and 200, 1 MB each."""
        title = "2a unknown messages, 1 MB payloads"
        self.conclude(title, *await self.attack(title, "unknown", cap=60_000_000))

    @inline
    async def test_2b_none_auth_with_900kb_user_names(self) -> None:
        """20 'none' authentication requests, each with a 900 KB user name."""
        title = "2b 'none' auth, 900 KB user names"
        self.conclude(title, *await self.attack(title, "nonebig", cap=18_000_000))

    @inline
    async def test_2c_key_type_with_braces(self) -> None:
        """Publickey requests whose key type has braces ("ssh-{x}") and
        whose key does not parse, on three connections one after the other (each
        until the master drops it): no log event may fail to format."""
        title = "2c key type with braces"
        values, problems = await self.attack(title, "braces", attacker_args=lambda master: {"connections": 3})
        values["attacker_requests"] = self.report_raw.get("requests")
        values["unformattable_log_events"] = self.log.unformattable
        if self.log.unformattable:
            problems.append(f"{self.log.unformattable} log events could not be formatted")
        self.conclude(title, values, problems)

    # -- 3. an authorized host, before any PB password -----------------------------------------

    @inline
    async def test_3a_refused_channel_opens_with_30kb_host_not_read(self) -> None:
        """Logged in as hostx: channel opens to a 30 KB host name, each refused with a
        reason quoting it; the refusals are never read."""
        title = "3a refused opens, 30 KB host, not read"
        args = self.identity_of(ATTACKER)
        self.conclude(title, *await self.attack(title, "badopen", cap=600_000_000, attacker_args=args))

    @inline
    async def test_3b_rekey_never_finished(self) -> None:
        """Logged in as hostx: a KEXINIT, never followed by the key exchange, then channel
        opens (30 KB host names) and global requests (30 KB names) whose answers wait."""
        title = "3b re-key never finished, replies queued"
        args = self.identity_of(ATTACKER)
        self.conclude(title, *await self.attack(title, "rekey", cap=600_000_000, attacker_args=args))

    @inline
    async def test_3c_banana_list_never_closed(self) -> None:
        """Logged in as hostx, on a PB channel before any PB login: one Banana list of
        600000 items that never closes, of 64 KB strings, up to 600 MB."""
        title = "3c Banana list of 64 KB strings, never closed"
        args = self.identity_of(ATTACKER)
        self.conclude(title, *await self.attack(title, "bananalist", cap=600_000_000, attacker_args=args))

    @inline
    async def test_3d_one_mib_of_one_byte_banana_tokens(self) -> None:
        """Logged in as hostx, on a PB channel before any PB login: 1 MiB of 1-byte
        Banana tokens.  The attack ends when the master's CPU use calms down (or 30 s)."""
        title = "3d 1 MiB of 1-byte Banana tokens"
        values, problems = await self.attack(
            title,
            "bananatokens",
            seconds=40.0,
            cap=1 * MiB,
            settle_limit=30.0,
            attacker_args=self.identity_of(ATTACKER),
        )
        values["attacker_tokens"] = self.report_raw.get("tokens")
        self.conclude(title, values, problems)

    # -- 4. one channel's PB error closes that channel only --------------------------------------

    @inline
    async def test_4_pb_error_on_one_channel_closes_only_that_channel(self) -> None:
        """hostx runs a real launcher with two attached sessions; its first session sends
        a Banana STRING header longer than 640 KiB (BananaError at the master)."""
        title = "4 PB error on one channel of two"
        attacked, other = (T.worker_name(p, ATTACKER) for p in PROJECTS)

        def launcher_config(master: Any) -> dict[str, Any]:
            ports = T.ssh_port(master), T.pb_port(master)
            return {"config": str(self.site.launcher_config(ATTACKER, *ports, [attacked, other]))}

        values, problems = await self.attack(
            title,
            "pberror",
            seconds=3.0,
            attacker_workers=True,
            watch=(attacked, other),
            attacker_args=launcher_config,
        )
        report = self.report_raw
        values.update(
            attacker_ssh_connection_lost=report.get("ssh_connection_lost"),
            attacked_session_detached=attacked in self.watched_detached,
            other_session_detached=other in self.watched_detached,
        )
        if other in self.watched_detached:
            problems.append(f"{other}, on the same SSH connection, detached")
        if report.get("ssh_connection_lost"):
            problems.append("the whole SSH connection was dropped")
        if attacked not in self.watched_detached:
            problems.append(f"the channel of {attacked}, which sent the bad token, was not closed")
        self.conclude(title, values, problems)

    # -- 5. a second connection with a connected host's key --------------------------------------

    @inline
    async def test_5_second_connection_with_connected_hosts_key_is_refused(self) -> None:
        """Logins with hosta's own key while hosta's launcher is connected, every 0.5 s:
        each must be refused with a DISCONNECT saying "too many connections" and naming
        the live connection's address and age; hosta's sessions stay attached."""
        title = "5 second connection with a connected host's key"
        values, problems = await self.attack(
            title, "dupkey", seconds=3.5, attacker_args=self.identity_of(LEGIT)
        )
        live = self.legit_address
        attempts = self.report_raw.get("attempts", [])
        reasons = [a.get("reason") or "" for a in attempts]
        proper = [r for r in reasons if "too many connections" in r and live in r and AGE.search(r)]
        values.update(
            newcomer_attempts=len(attempts),
            newcomer_logged_in_and_kept=sum(
                1 for a in attempts if a.get("logged_in") and not a.get("dropped_by_master")
            ),
            newcomer_refused_properly=len(proper),
            newcomer_reasons=sorted(set(reasons))[:3],
            live_connection=live,
        )
        if not attempts:
            problems.append("the newcomer made no attempt")
        elif len(proper) != len(attempts):
            problems.append(
                f"{len(attempts) - len(proper)} of {len(attempts)} newcomers were not refused with"
                f" 'too many connections' naming {live} and its age: {sorted(set(reasons))[:3]}"
            )
        self.conclude(title, values, problems)

    # -- 6. many connections from one address ---------------------------------------------------

    @inline
    async def test_6a_300_idle_connections_from_one_address(self) -> None:
        """300 TCP connections from 127.0.0.1 at once, sending nothing (half of them) or
        only a version line, held open: the probe (127.0.0.2) must still log in."""
        title = "6a 300 idle connections from one address"
        values, problems = await self.attack(title, "idle", attacker_args=lambda master: {"connections": 300})
        report = self.report_raw
        values.update(
            idle_opened=report.get("opened"),
            idle_connect_failed=report.get("connect_failed"),
            idle_closed_by_master=report.get("closed_by_master"),
            idle_open_at_end=report.get("open_now"),
        )
        self.conclude(title, values, problems)

    @inline
    async def test_6b_100_connections_each_flooding_key_queries(self) -> None:
        """100 connections at once from 127.0.0.1, each doing attack 1a as soon as it
        can (a per-source limit may refuse most of them: what the master holds counts)."""
        await self.flooders("6b 100 connections each flooding key queries", spread=False)

    @inline
    async def test_6c_100_sources_each_flooding_key_queries(self) -> None:
        """100 connections at once, each from its own address (127.0.2.1-100), each
        doing attack 1a as soon as it can: the per-source limit does not apply,
        max_startups and max_unauthenticated_memory do (while all 100 are
        pending, max_startups is full and a new login may be refused)."""
        await self.flooders("6c 100 sources each flooding key queries", spread=True)

    async def flooders(self, title: str, spread: bool) -> None:
        """Attack 1a from 100 connections at once (each from its own address if ``spread``)."""
        values, problems = await self.attack(
            title,
            "pkquery",
            seconds=6.0,
            cap=2 << 30,
            rss_budget=RSS_BUDGET_MANY,
            attacker_args=lambda master: {
                **self.legit_public_key(master),
                "connections": 100,
                "spread": spread,
            },
            full_startups=spread,
        )
        report = self.report_raw
        values.update(
            flooders_wanted=report.get("wanted"),
            flooders_ready=report.get("connections"),
            flooders_refused_at_connect=report.get("refused_at_connect"),
            flooders_still_connecting=report.get("still_connecting"),
            flooders_connect_errors=report.get("connect_errors"),
        )
        self.conclude(title, values, problems)
