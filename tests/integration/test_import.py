"""``ssh-worker import``: directories made by ``buildbot-worker create-worker`` become sessions.

The directories are made by the real ``buildbot-worker create-worker`` (a
child process, several option sets), imported by the real ``ssh-worker
import``, run by ``ssh-worker run`` against a real master, and build.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.worker import config as launcher_config
from buildbot_sshmux.worker import importer

from .test_launcher import LauncherTestCase, figures
from .test_launcher_ops import ssh_worker

HOST = "hosta"
PROJECTS = ["plain", "tuned", "relocatable", "endpoint"]
OPTIONS = {
    "plain": [],
    "tuned": [
        "--umask=0o22",
        "--keepalive=300",
        "--numcpus=3",
        "--delete-leftover-dirs",
        "--maxdelay=60",
        "--use-tls",
    ],  # fmt: skip
    "relocatable": ["--relocatable", "--allow-shutdown=file", "--maxretries=5"],
    "endpoint": ["--connection-string=tcp:host=buildmaster.example.org:port=9989"],
}


def create_worker(basedir: Path, name: str, *options: str, master: str = "localhost:9989") -> None:
    """``buildbot-worker create-worker`` as an administrator ran it, years ago."""
    buildbot_worker = Path(sys.executable).with_name("buildbot-worker")
    subprocess.run(
        [str(buildbot_worker), "create-worker", "--quiet", *options, str(basedir), master, name,
         T.WORKER_PASSWORD.format(name=name)],
        check=True,
        capture_output=True,
    )  # fmt: skip


class ImportTests(LauncherTestCase):
    def test_create_worker_directories_build_green_after_import(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._import())

    async def _import(self) -> None:
        self.make_site([HOST])
        master = await self.start_master(PROJECTS, [HOST])
        old = self.root / "old-workers"
        old.mkdir()
        for project in PROJECTS:
            create_worker(old / project, T.worker_name(project, HOST), *OPTIONS[project])
        create_worker(old / "msgpack", "msgpack-hosta", "--protocol=msgpack_experimental_v7")
        (old / "edited").mkdir()
        (old / "edited" / "buildbot.tac").write_text("from buildbot_worker.bot import Worker\nimport json\n"
                                                    "cfg = json.load(open('w.json'))\ns = Worker(**cfg)\n")  # fmt: skip
        config = self.site.launcher_config(HOST, T.ssh_port(master), T.pb_port(master), [])
        dirs = [str(old / p) for p in [*PROJECTS, "msgpack", "edited"]]

        code, out = await ssh_worker("import", str(config), *dirs)
        print(out)
        self.assertEqual(code, 1, out)  # some were skipped
        self.assertIn("4 imported, 2 skipped", out)
        self.assertIn(
            f"{old / 'msgpack' / 'buildbot.tac'}: protocol 'msgpack_experimental_v7' is not PB", out
        )
        self.assertIn(f"{old / 'edited' / 'buildbot.tac'}: no workername = '...' line; skipped", out)
        self.assertIn("ignored use_tls (1 workers): the SSH connection encrypts every session", out)
        self.assertIn("ignored connection_string (1 workers)", out)
        self.assertIn("ignored allow_shutdown (1 workers)", out)
        text = config.read_text()
        for project in PROJECTS:
            self.assertNotIn(T.WORKER_PASSWORD.format(name=T.worker_name(project, HOST)), text)
            password = config.parent / "passwords" / T.worker_name(project, HOST)
            self.assertEqual(stat.S_IMODE(password.stat().st_mode), 0o600)
        tuned = next(w for w in launcher_config.load(config).workers if w.name == "tuned-hosta")
        self.assertEqual((tuned.umask, tuned.keepalive, tuned.numcpus, tuned.delete_leftover_dirs),
                         (0o22, 300, 3, True))  # fmt: skip
        self.assertEqual(tuned.basedir, old / "tuned")

        code, again = await ssh_worker("import", str(config), str(old / "plain"))
        self.assertIn("is in", again)  # importing twice adds nothing

        names = [T.worker_name(p, HOST) for p in PROJECTS]
        self.start_launcher(config)
        await self.wait_attached(names)
        await self.assertBuildsGreen([(p, HOST) for p in PROJECTS])
        self.assertEqual(self.master.workers.connections["tuned-hosta"].info["numcpus"], 3)
        self.assertTrue((old / "plain" / "plain").is_dir(), "the build did not run in the old directory")

    def test_importing_200_directories(self) -> None:
        from buildbot_worker.scripts.create_worker import createWorker

        root = self.root / "many"
        root.mkdir()
        base = {"quiet": True, "relocatable": False, "no-logrotate": False, "log-size": 10000000,
                "log-count": 10, "host": "localhost", "port": 9989, "connection-string": None,
                "keepalive": 600, "umask": None, "maxdelay": 300, "numcpus": None, "allow-shutdown": None,
                "maxretries": None, "use-tls": 0, "delete-leftover-dirs": 0, "proxy-connection-string": None,
                "protocol": "pb", "force": False}  # fmt: skip
        dirs = []
        for i in range(200):
            basedir = root / f"w{i:03d}"
            createWorker({**base, "basedir": str(basedir), "name": f"w{i:03d}-hosta", "passwd": f"pw{i}"})
            dirs.append(basedir)
        self.make_site([HOST])
        config = self.site.launcher_config(HOST, 2222, 9989, [])
        started = time.monotonic()
        with open(self.root / "import.out", "w") as out:
            skipped = importer.import_dirs(config, dirs, out)
        elapsed = time.monotonic() - started
        figures("import 200 worker directories", seconds=elapsed)
        self.assertEqual(skipped, 0)
        loaded = launcher_config.load(config)
        self.assertEqual(len(loaded.workers), 200)
        self.assertEqual(loaded.workers[7].password, "pw7")
