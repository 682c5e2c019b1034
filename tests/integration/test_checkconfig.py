"""`buildbot checkconfig DIR`, run as users run it: from the basedir's parent.

The service's file checks used to run only when the cwd was the basedir,
so `buildbot checkconfig master` said "Config file is good!" with a missing
or world-readable host key.  A bad authorized_hosts line is a warning with
its file:line: the running master skips that line and serves the others.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from buildbot_sshmux.demo import harness as T

MASTER_CFG = """\
from buildbot.plugins import schedulers, steps, util, worker
from buildbot_sshmux import SSHMuxService

c = BuildmasterConfig = {}
c['db'] = {'db_url': 'sqlite://'}
c['buildbotNetUsageData'] = None
c['protocols'] = {'pb': {'port': 'tcp:0:interface=127.0.0.1'}}
c['services'] = [SSHMuxService(
    port='tcp:0:interface=127.0.0.1',
    host_keys=['sshmux/ssh_host_ed25519_key'],
    authorized_hosts='sshmux/authorized_hosts')]
c['workers'] = [worker.Worker('w-hosta', 'pw')]
c['builders'] = [util.BuilderConfig(name='b', workernames=['w-hosta'],
                 factory=util.BuildFactory([steps.ShellCommand(command=['true'])]))]
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['b'])]
"""


class CheckconfigCase(TestCase):
    """A master basedir with MASTER_CFG and the site's keys, checked as users check it."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sshmux-checkconfig-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.site = T.Site(self.root, ["hosta"])
        (self.site.master_basedir / "master.cfg").write_text(MASTER_CFG)
        self.key = self.site.host_key_path

    def checkconfig(self) -> tuple[int, str]:
        """``buildbot checkconfig master`` from the basedir's parent."""
        buildbot = Path(sys.executable).with_name("buildbot")
        done = subprocess.run(
            [str(buildbot), "checkconfig", "master"],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.returncode, done.stdout + done.stderr


class CheckconfigFromAnyDirectory(CheckconfigCase):
    def test_a_good_config_is_good(self) -> None:
        code, output = self.checkconfig()
        self.assertEqual(code, 0, output)
        self.assertIn("Config file is good!", output)

    def test_a_missing_host_key_says_how_to_make_one(self) -> None:
        self.key.unlink()
        code, output = self.checkconfig()
        self.assertNotEqual(code, 0, output)
        self.assertIn(f"private key {self.key} does not exist", output)
        self.assertIn(f"buildbot-sshmux init {self.site.master_basedir}", output)
        self.assertNotIn("Config file is good!", output)

    def test_a_world_readable_host_key_is_an_error(self) -> None:
        self.key.chmod(0o644)
        code, output = self.checkconfig()
        self.assertNotEqual(code, 0, output)
        self.assertIn("mode 0644", output)
        self.assertIn(f"chmod 600 {self.key}", output)

    def test_a_bad_authorized_hosts_line_is_a_warning_with_its_line(self) -> None:
        hosts = self.site.authorized_hosts
        hosts.write_text(hosts.read_text() + "ssh-ed25519 not-base64 broken-host\n")
        code, output = self.checkconfig()
        self.assertEqual(code, 0, output)  # the master would start and skip the line
        self.assertIn(f"{hosts}:2:", output)
        self.assertIn("this line is ignored", output)


class PluginEntryPoint(CheckconfigCase):
    """``util.SSHMuxService``: the service through Buildbot's plugin namespace."""

    def test_util_sshmux_service_in_master_cfg(self) -> None:
        text = MASTER_CFG.replace("from buildbot_sshmux import SSHMuxService\n", "")
        text = text.replace("c['services'] = [SSHMuxService(", "c['services'] = [util.SSHMuxService(")
        self.assertIn("util.SSHMuxService(", text)
        (self.site.master_basedir / "master.cfg").write_text(text)
        code, output = self.checkconfig()
        self.assertEqual(code, 0, output)
        self.assertIn("Config file is good!", output)
        self.key.chmod(0o644)  # and it is our service that checks: it refuses a world-readable key
        code, output = self.checkconfig()
        self.assertNotEqual(code, 0, output)
        self.assertIn("chmod 600", output)
