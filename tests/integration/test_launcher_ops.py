"""Running the launcher as a service, against a real master: status, reload, graceful stop.

``ssh-worker status/reload/stop`` are run as the commands an operator types
(child processes), talking to a running ``ssh-worker run`` through its control
socket; SIGHUP and SIGUSR1 are sent as an init system would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import SkipTest

from buildbot.process.results import SUCCESS
from twisted.internet import defer, reactor, task, utils
from twisted.trial.unittest import TestCase

from buildbot_sshmux.demo import harness as T
from tests import support as S

from .test_launcher import LauncherTestCase, figures, names_for

PROJECTS = ["alpha", "beta", "gamma", "delta"]
HOST = "hosta"


async def ssh_worker(*args: str) -> tuple[int, str]:
    """Run ``ssh-worker ARGS`` as an operator would; (exit code, stdout + stderr),
    or only stdout with ``--json`` (what a script parses)."""
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, ["-m", "buildbot_sshmux.cli.ssh_worker", *args], env=dict(os.environ)
    )
    return code, (out if "--json" in args else out + err).decode()


class LauncherOpsTestCase(LauncherTestCase):
    def worker_names(self) -> list[str]:
        return names_for(PROJECTS, HOST)


class StatusTests(LauncherOpsTestCase):
    def test_status_text_and_json_and_a_master_gone(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._status())

    async def _status(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST])
        names = self.worker_names()
        launcher = self.launch(HOST, names, master_options={"keepalive_interval": 1})
        await self.wait_attached(names)
        socket_path = launcher.config.with_suffix(".sock")
        self.assertEqual(stat.S_IMODE(socket_path.stat().st_mode), 0o600)
        for _ in range(50):  # the first keepalive is answered a second after the connection
            code, out = await ssh_worker("status", "--json", str(launcher.config))
            if json.loads(out)["masters"][0]["keepalive_rtt_ms"]["last"] is not None:
                break
        status = json.loads(out)
        self.assertEqual([s["attached"] for s in status["sessions"]], [True] * len(names))
        self.assertEqual(status["pid"], launcher.process.pid if launcher.process else None)
        self.assertLess(status["masters"][0]["keepalive_rtt_ms"]["median"], 1000)

        code, text = await ssh_worker("status", str(launcher.config))
        self.assertEqual(code, 0, text)
        self.assertIn(f"sessions: {len(names)} attached of {len(names)}", text)
        self.assertIn(f"master 127.0.0.1:{T.ssh_port(master)}: connected for", text)
        for name in names:
            self.assertIn(f"  {name}: on 127.0.0.1:{T.ssh_port(master)}", text)
        self.assertIn("keepalive rtt", text)
        print(text)

        await self.stop_master(master)
        self.master = None
        await self.wait_for(lambda: launcher.output().count("lost connection to master")
                            + launcher.output().count("is shutting down") > 0, 15, "the launcher to notice")  # fmt: skip
        code, text = await ssh_worker("status", str(launcher.config))
        self.assertEqual(code, 1, text)
        self.assertIn("NOT CONNECTED; last error", text)
        self.assertIn("sessions: 0 attached of", text)
        print(text)

        code, text = await ssh_worker("stop", str(launcher.config))  # returns once it has exited
        self.assertEqual((code, text.splitlines()[-1]), (0, "stopped"), text)
        self.assertIsNotNone(launcher.process.poll() if launcher.process else None)
        code, text = await ssh_worker("status", str(launcher.config))
        self.assertEqual(code, 2)
        self.assertIn("nothing is running", text)


class ReloadTests(LauncherOpsTestCase):
    def test_sighup_adds_removes_and_restarts_only_what_changed(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._reload())

    async def _reload(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST])
        sshmux = T.sshmux_service(master)
        alpha, beta, gamma, delta = self.worker_names()
        launcher = self.launch(HOST, [alpha, beta, gamma])
        await self.wait_attached([alpha, beta, gamma])
        before = self.connections([alpha, beta])
        [transport] = sshmux.factory.connections

        text = launcher.config.read_text()
        edited = self.site.launcher_config(HOST, T.ssh_port(master), T.pb_port(master), [alpha, beta, delta])
        edited.write_text(edited.read_text().replace(f'name = "{beta}"', f'name = "{beta}"\nkeepalive = 300'))
        self.assertNotEqual(text, edited.read_text())
        started = reactor.seconds()
        assert launcher.process is not None
        launcher.process.send_signal(signal.SIGHUP)
        await self.wait_attached([delta])
        await self.wait_detached([gamma])
        await self.wait_for(lambda: self.usable([beta]) and self.connections([beta])[beta] is not before[beta],
                            20, "beta to restart")  # fmt: skip
        figures("reload", seconds=reactor.seconds() - started)
        self.assertIs(self.connections([alpha])[alpha], before[alpha], "alpha was re-attached")
        self.assertEqual(sshmux.factory.connections, {transport}, "the SSH connection was replaced")
        self.assertIn("reloaded", launcher.output())
        self.assertIn("1 sessions started, 1 stopped, 1 restarted", launcher.output())

        launcher.config.write_text(launcher.config.read_text() + "\n[[worker]\nname = 'broken'\n")
        code, text = await ssh_worker("reload", str(launcher.config))
        self.assertEqual(code, 2, text)
        self.assertIn("reload refused", text)
        self.assertIn(str(launcher.config), text)
        [line] = [t for t in launcher.output().splitlines() if "reload refused" in t]
        self.assertIn("the running sessions go on", line)
        self.assertEqual(set(self.connections([alpha, beta, delta])), {alpha, beta, delta})
        self.assertIs(self.connections([alpha])[alpha], before[alpha])


class GracefulStopTests(LauncherOpsTestCase):
    def test_graceful_stop_lets_the_running_build_finish(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._graceful())

    async def _graceful(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST], command=["sh", "-c", "sleep 3; echo done"])
        names = self.worker_names()
        busy, idle = names[0], names[1:]
        launcher = self.launch(HOST, names)
        await self.wait_attached(names)
        [brid] = await T.force_builds(master, [(PROJECTS[0], HOST)])
        await self.wait_for(lambda: bool(master.botmaster.builders[PROJECTS[0]].building), 20, "the build")

        asked = reactor.seconds()
        code, text = await ssh_worker("stop", "--graceful", "--no-wait", str(launcher.config))
        self.assertEqual(code, 0, text)
        self.assertIn("stopping once the builds of", text)
        await self.wait_detached(idle, timeout=10)
        idle_s = reactor.seconds() - asked
        self.assertIn(busy, T.attached_workers(master), "the busy session left before its build ended")
        [result] = await T.buildrequest_results(master, [brid])
        self.assertEqual(result, SUCCESS)
        code = await S.wait_process_exit(reactor, launcher, 20)
        figures("graceful stop", idle_detached_s=idle_s, exited_after_s=reactor.seconds() - asked)
        self.assertEqual(code, 0, launcher.output())
        self.assertIn("every build has finished; stopping", launcher.output())


class SystemdTests(LauncherOpsTestCase):
    def test_readiness_status_and_stopping_are_notified(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._notify())

    async def _notify(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST])
        names = self.worker_names()
        notify_path = self.root / "notify.sock"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(notify_path))
        receiver.setblocking(False)
        self.addCleanup(receiver.close)
        messages: list[str] = []

        def received(*wanted: str) -> bool:
            try:
                while True:
                    messages.append(receiver.recv(4096).decode())
            except BlockingIOError:
                pass
            return all(any(w in m for m in messages) for w in wanted)

        config = self.site.launcher_config(HOST, T.ssh_port(master), T.pb_port(master), names)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        launcher = self.start_launcher(config, ["--logfile", str(self.root / "launcher.log")], env)
        await self.wait_for(lambda: received("READY=1"), 20, "READY=1")
        await self.wait_attached(names)
        await self.wait_for(lambda: received(f"STATUS={len(names)}/{len(names)} sessions attached"), 20,
                            "a status line with every session attached")  # fmt: skip

        # --logfile: lines go there, not to stdout; SIGHUP reopens it (logrotate moved it away).
        log_path = self.root / "launcher.log"
        self.assertIn("connected to master", log_path.read_text())
        log_path.rename(self.root / "launcher.log.1")
        assert launcher.process is not None
        launcher.process.send_signal(signal.SIGHUP)
        await self.wait_for(lambda: received("RELOADING=1") and log_path.exists(), 20, "the log reopened")
        await self.wait_for(
            lambda: "reloaded" in log_path.read_text(), 20, "the reload's line in the new log"
        )
        self.assertNotIn("connected to master", launcher.output())

        launcher.process.send_signal(signal.SIGTERM)
        await S.wait_process_exit(reactor, launcher, 20)
        self.assertTrue(received("STOPPING=1"), messages)


class UnitFileTests(TestCase):
    def test_the_unit_files_verify(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (Debian's systemd package has it)")
        ssh_worker_bin = Path(sys.executable).with_name("ssh-worker")
        root = Path(tempfile.mkdtemp(prefix="sshmux-unit-"))
        self.addCleanup(shutil.rmtree, root)
        contrib = Path(__file__).parents[2] / "contrib" / "systemd"
        units = sorted(contrib.glob("*.service"))
        self.assertEqual([u.name for u in units], ["ssh-worker.service", "ssh-worker@.service"])
        for unit in units:
            copy = root / unit.name
            copy.write_text(unit.read_text().replace("/usr/local/bin/ssh-worker", str(ssh_worker_bin)))
            target = root / "ssh-worker@site.service" if "@" in unit.name else copy
            if target != copy:
                target.symlink_to(copy)
            result = subprocess.run(
                [analyze, "verify", str(target)], capture_output=True, text=True, cwd=root
            )
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), unit.name)
            text = unit.read_text()
            for line in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                         "ProtectSystem=strict", "Restart=on-failure", "KillSignal=SIGUSR1", "KillMode=mixed"]:  # fmt: skip
                self.assertIn(line, text, unit.name)


class WorkerInfoTests(LauncherOpsTestCase):
    def test_worker_info_says_which_ssh_host_and_key(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._info())

    async def _info(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST])
        names = self.worker_names()
        self.launch(HOST, names)
        await self.wait_attached(names)
        fingerprint = S.host_fingerprint(self.site, HOST)
        infos: dict[str, Any] = {}

        async def read() -> None:
            for name in names:
                worker = await master.data.get(("workers", master.workers.workers[name].workerid))
                infos[name] = worker["workerinfo"]

        async def noted() -> bool:
            await read()
            return all(i.get("ssh_key") == fingerprint for i in infos.values())

        for _ in range(100):
            if await noted():
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        info = infos[names[0]]
        self.assertEqual((info.get("ssh_host"), info.get("ssh_key")), (HOST, fingerprint), info)
        self.assertTrue(info["ssh_address"].startswith("127.0.0.1:"), info)
        self.assertIn("version", info)  # Buildbot's own keys are kept
