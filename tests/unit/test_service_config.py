"""SSHMuxService.checkConfig: every fault becomes one config error naming what to fix."""

from __future__ import annotations

import os

from buildbot.config.errors import capture_config_errors
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from buildbot_sshmux.master.service import SSH_LISTEN_BACKLOG, SSHMuxService, listen_description
from buildbot_sshmux.wire.keys import generate_ed25519, public_line, write_private_key
from tests.unit.tmpdirs import scratch_dir


def config_errors(**kwargs: object) -> list[str]:
    with capture_config_errors() as errors:
        SSHMuxService(**kwargs)
    return list(errors.errors)


class CheckConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.host_key = self.dir / "ssh_host_ed25519_key"
        write_private_key(self.host_key, generate_ed25519())
        self.hosts = self.dir / "authorized_hosts"
        self.hosts.write_text(public_line(generate_ed25519(), "hosta") + "\n")

    def test_good_config_has_no_errors(self) -> None:
        self.assertEqual(config_errors(host_keys=[str(self.host_key)], authorized_hosts=str(self.hosts)), [])

    def test_missing_host_key(self) -> None:
        errors = config_errors(host_keys=[str(self.dir / "nope")], authorized_hosts=str(self.hosts))
        self.assertEqual(len(errors), 1)
        self.assertIn("does not exist", errors[0])

    def test_host_key_readable_by_others(self) -> None:
        os.chmod(self.host_key, 0o644)
        errors = config_errors(host_keys=[str(self.host_key)], authorized_hosts=str(self.hosts))
        self.assertEqual(len(errors), 1)
        self.assertIn(f"chmod 600 {self.host_key}", errors[0])

    def test_unreadable_authorized_hosts(self) -> None:
        errors = config_errors(host_keys=[str(self.host_key)], authorized_hosts=str(self.dir / "none"))
        self.assertEqual(len(errors), 1)
        self.assertIn("cannot be read", errors[0])

    def test_no_hosts_at_all(self) -> None:
        errors = config_errors(host_keys=[str(self.host_key)])
        self.assertTrue(any("no worker host may log in" in e for e in errors), errors)

    def test_host_keys_given_as_a_string(self) -> None:
        errors = config_errors(host_keys=str(self.host_key), authorized_hosts=str(self.hosts))
        self.assertIn("must be a list", errors[0])

    def test_bad_inline_host_names_its_position(self) -> None:
        good = public_line(generate_ed25519(), "hostb")
        errors = config_errors(host_keys=[str(self.host_key)], hosts=[good, "frobnicate=1 " + good])
        self.assertEqual(len(errors), 1)
        self.assertIn("SSHMuxService(hosts=...):2", errors[0])

    def test_bad_port_description(self) -> None:
        errors = config_errors(
            port="nonsense:1:2", host_keys=[str(self.host_key)], authorized_hosts=str(self.hosts)
        )
        self.assertEqual(len(errors), 1)
        self.assertIn("strports", errors[0])

    def test_control_socket_and_metrics(self) -> None:
        good = {"host_keys": [str(self.host_key)], "authorized_hosts": str(self.hosts)}
        self.assertEqual(config_errors(**good, control_socket=None, metrics=9101), [])
        self.assertEqual(config_errors(**good, control_socket=str(self.dir / "c.sock"), metrics="tcp:0"), [])
        [error] = config_errors(**good, control_socket=123)
        self.assertIn("control_socket must be a path or None", error)
        [error] = config_errors(**good, control_socket=str(self.dir / ("x" * 120)))
        self.assertIn("longer than 100 bytes (a UNIX socket limit)", error)
        [error] = config_errors(**good, metrics="localhost:nine")
        self.assertIn("metrics must be a port number, 'HOST:PORT' or a strports description", error)

    def test_metrics_without_prometheus_client_is_one_clear_error(self) -> None:
        from unittest import mock

        with mock.patch.dict("sys.modules", {"prometheus_client": None}):
            [error] = config_errors(
                host_keys=[str(self.host_key)], authorized_hosts=str(self.hosts), metrics=9101
            )
        self.assertIn("prometheus_client is not installed: pip install 'buildbot-sshmux[metrics]'", error)


class ListenBacklogTests(unittest.TestCase):
    """The SSH port listens with a deep accept queue unless its description names one."""

    def test_tcp_ports_get_a_deep_backlog(self) -> None:
        self.assertEqual(listen_description(2222), f"tcp:2222:backlog={SSH_LISTEN_BACKLOG}")
        self.assertEqual(
            listen_description("tcp:0:interface=127.0.0.1"),
            f"tcp:0:interface=127.0.0.1:backlog={SSH_LISTEN_BACKLOG}",
        )
        self.assertEqual(listen_description("tcp:2222:backlog=64"), "tcp:2222:backlog=64")
        self.assertEqual(listen_description("unix:/run/sshmux.sock"), "unix:/run/sshmux.sock")

    def test_the_description_is_one_twisted_takes(self) -> None:
        reactor = MemoryReactor()
        endpoints.serverFromString(reactor, listen_description("tcp:0:interface=127.0.0.1")).listen(object())
        [(_port, _factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((backlog, interface), (SSH_LISTEN_BACKLOG, "127.0.0.1"))
