"""The files in keys.example/ stay valid examples of each format."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from buildbot_sshmux.master import authorized_hosts
from buildbot_sshmux.wire.keys import fingerprint, load_private_key
from buildbot_sshmux.worker import config as launcher_config
from buildbot_sshmux.worker.link import HostKeyPins

EXAMPLES = Path(__file__).resolve().parents[2] / "keys.example"


class ExampleFilesTests(unittest.TestCase):
    def test_authorized_hosts_has_two_hosts_and_no_errors(self) -> None:
        entries, errors = authorized_hosts.load(EXAMPLES / "authorized_hosts")
        self.assertEqual(errors, [])
        self.assertEqual([e.name for e in entries], ["debian-sid", "fedora-41"])
        self.assertTrue(entries[0].may_attach("libxml2-debian-sid"))
        self.assertFalse(entries[0].may_attach("libxml2-fedora-41"))

    def test_launcher_config_loads_and_pins_the_example_master_key(self) -> None:
        config = launcher_config.load(EXAMPLES / "ssh-worker.toml")
        self.assertEqual([w.name for w in config.workers], ["libxml2-debian-sid", "glib-debian-sid"])
        (master,) = config.masters
        self.assertEqual((master.host, master.port, master.pb_port), ("buildmaster.example.org", 2222, 9989))
        host_key = (EXAMPLES / "ssh_host_ed25519_key.pub").read_text()
        from twisted.conch.ssh import keys

        key = keys.Key.fromString(host_key.encode())
        pins = HostKeyPins.from_config(master.host_keys, master.known_hosts)
        self.assertTrue(pins.accepts("buildmaster.example.org", 2222, key))
        self.assertFalse(pins.accepts("other.example.org", 2222, key))

    def test_worker_key_matches_its_authorized_line(self) -> None:
        path = EXAMPLES / "id_ed25519"
        path.chmod(0o600)  # git does not keep modes
        key = load_private_key(path)
        entries, _ = authorized_hosts.load(EXAMPLES / "authorized_hosts")
        self.assertEqual(fingerprint(key), entries[0].fingerprint)
