"""The ``ssh-worker`` TOML configuration: good files load, bad ones say what is wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

from twisted.trial.unittest import TestCase

from buildbot_sshmux.errors import ConfigError
from buildbot_sshmux.wire.defaults import SSH_PORT
from buildbot_sshmux.worker import config as launcher_config

from .tmpdirs import scratch_dir

PIN = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"

ONE_MASTER = f"""
[master]
address = "buildmaster.example.org:2222"
host_key = "{PIN}"
identity = "id_ed25519"
pb_port = 9990

[[worker]]
name = "libxml2-debian-sid"
password = "s3cret"
basedir = "workers/libxml2"
"""


class LauncherConfigTests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.path = self.dir / "ssh-worker.toml"

    def load(self, text: str) -> launcher_config.LauncherConfig:
        self.path.write_text(textwrap.dedent(text), encoding="utf-8")
        return launcher_config.load(self.path)

    def assertConfigError(self, text: str, *fragments: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        message = str(caught.exception)
        self.assertIn(str(self.path), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    # good files

    def test_one_master(self) -> None:
        config = self.load(ONE_MASTER)
        [master] = config.masters
        self.assertEqual((master.host, master.port), ("buildmaster.example.org", 2222))
        self.assertEqual(master.host_keys, (PIN,))
        self.assertEqual(master.pb_port, 9990)
        self.assertEqual(master.username, "buildbot-worker")
        self.assertIsNone(master.known_hosts)
        [worker] = config.workers
        self.assertEqual(worker.name, "libxml2-debian-sid")
        self.assertEqual(worker.password, "s3cret")
        self.assertEqual(worker.master, master.name)
        self.assertEqual(worker.keepalive, 600)
        self.assertEqual((master.liveness.rekey_bytes, master.liveness.rekey_interval), (1 << 30, 3600))

    def test_metrics(self) -> None:
        self.assertIsNone(self.load(ONE_MASTER).metrics, "off by default")
        for value, description in [
            ('"127.0.0.1:9102"', "tcp:9102:interface=127.0.0.1"),
            ("9102", "tcp:9102:interface=127.0.0.1"),
            ('"0.0.0.0:9102"', "tcp:9102:interface=0.0.0.0"),
        ]:
            self.assertEqual(self.load(f"metrics = {value}\n" + ONE_MASTER).metrics, description)
        self.assertConfigError('metrics = "here"\n' + ONE_MASTER, "metrics must be a port number")

    def test_metrics_without_prometheus_client_is_one_clear_error(self) -> None:
        from unittest import mock

        with mock.patch.dict("sys.modules", {"prometheus_client": None}):
            self.assertConfigError(
                "metrics = 9102\n" + ONE_MASTER,
                "metrics are configured but prometheus_client is not installed",
                "buildbot-sshmux[metrics]",
            )

    def test_rekey_limits(self) -> None:
        config = self.load(
            """
            [master]
            address = "m:22"
            host_key = "SHA256:abc"
            identity = "id"
            rekey_bytes = 65536
            rekey_interval = 600

            [[worker]]
            name = "w"
            password = "p"
            """
        )
        [master] = config.masters
        self.assertEqual((master.liveness.rekey_bytes, master.liveness.rekey_interval), (65536, 600))
        self.assertConfigError(
            ONE_MASTER.replace("[master]\n", '[master]\nrekey_bytes = "1G"\n', 1),
            "[master]",
            "rekey_bytes must be an integer",
        )

    def test_relative_paths_are_resolved_against_the_config_files_directory(self) -> None:
        (self.dir / "pw").write_text("from-a-file\n")
        config = self.load(
            """
            [master]
            address = "m:22"
            known_hosts = "known_hosts"
            identity = "keys/id_ed25519"
            identity_passphrase_file = "keys/passphrase"

            [[worker]]
            name = "w"
            password_file = "pw"
            """
        )
        master = config.masters[0]
        base = self.path.absolute().parent
        self.assertEqual(master.identity, base / "keys" / "id_ed25519")
        self.assertEqual(master.known_hosts, base / "known_hosts")
        self.assertEqual(master.identity_passphrase_file, base / "keys" / "passphrase")
        self.assertEqual(config.workers[0].basedir, base / "workers" / "w")
        self.assertEqual(config.workers[0].password, "from-a-file")

    def test_relative_paths_do_not_depend_on_the_working_directory(self) -> None:
        config = self.load(ONE_MASTER)
        self.assertTrue(config.workers[0].basedir.is_absolute())
        self.assertEqual(config.workers[0].basedir, self.path.absolute().parent / "workers" / "libxml2")

    def test_absolute_paths_are_kept(self) -> None:
        config = self.load(ONE_MASTER.replace('"id_ed25519"', '"/etc/ssh-worker/id"'))
        self.assertEqual(config.masters[0].identity, Path("/etc/ssh-worker/id"))

    def test_address_without_port_means_the_default_port_and_ipv6_brackets(self) -> None:
        config = self.load(ONE_MASTER.replace("buildmaster.example.org:2222", "buildmaster"))
        self.assertEqual((config.masters[0].host, config.masters[0].port), ("buildmaster", SSH_PORT))
        config2 = launcher_config.load(
            self._write_other(ONE_MASTER.replace("buildmaster.example.org:2222", "[::1]:2200"))
        )
        self.assertEqual((config2.masters[0].host, config2.masters[0].port), ("::1", 2200))

    def _write_other(self, text: str) -> Path:
        path = self.dir / "other.toml"
        path.write_text(text)
        return path

    def test_several_host_keys(self) -> None:
        config = self.load(ONE_MASTER.replace(f'host_key = "{PIN}"', f'host_key = ["{PIN}", "SHA256:x"]'))
        self.assertEqual(config.masters[0].host_keys, (PIN, "SHA256:x"))

    def test_several_masters_with_named_workers(self) -> None:
        config = self.load(
            f"""
            [[master]]
            name = "east"
            address = "east.example.org:2222"
            host_key = "{PIN}"
            identity = "id"

            [[master]]
            name = "west"
            address = "west.example.org:2222"
            host_key = "{PIN}"
            identity = "id"

            [[worker]]
            name = "a"
            password = "p"
            master = "west"

            [[worker]]
            name = "b"
            password = "p"
            master = "east"
            """
        )
        self.assertEqual([m.name for m in config.masters], ["east", "west"])
        self.assertEqual({w.name: w.master for w in config.workers}, {"a": "west", "b": "east"})

    # bad files

    def test_missing_master_section(self) -> None:
        self.assertConfigError(
            """
            [[worker]]
            name = "w"
            password = "p"
            """,
            "no [master] or [cluster] section",
        )

    def test_unknown_top_level_section(self) -> None:
        self.assertConfigError(ONE_MASTER + "\n[logging]\nlevel = 1\n", "unknown key or section 'logging'")

    def test_unknown_master_key(self) -> None:
        self.assertConfigError(
            ONE_MASTER.replace("pb_port = 9990", "pb_port = 9990\nhostkey = 'x'"),
            "[master]",
            "unknown key 'hostkey'",
        )

    def test_unknown_worker_key(self) -> None:
        self.assertConfigError(ONE_MASTER + 'passwd = "x"\n', "[[worker]] #1", "unknown key 'passwd'")

    def test_errors_name_the_line_of_their_table(self) -> None:
        # ONE_MASTER: line 1 is empty, [master] is line 2, [[worker]] line 8.
        second = '\n[[worker]]\nname = "glib-debian-sid"\npassword = "x"\nbogus = 1\n'
        message = self.assertConfigError(ONE_MASTER + second, "[[worker]] #2", "unknown key 'bogus'")
        self.assertTrue(message.startswith(f"{self.path}:13: "), message)
        message = self.assertConfigError(ONE_MASTER.replace("9990", '"x"'), "pb_port must be an integer")
        self.assertTrue(message.startswith(f"{self.path}:2: [master]: "), message)
        message = self.assertConfigError(ONE_MASTER + 'password_file = "pw"\n', "not both")
        self.assertTrue(message.startswith(f"{self.path}:8: worker 'libxml2-debian-sid': "), message)

    def test_a_password_of_the_wrong_type_is_not_echoed(self) -> None:
        message = self.assertConfigError(
            ONE_MASTER.replace('password = "s3cret"', "password = 271828"),
            "password must be a string, not int",
        )
        self.assertNotIn("271828", message)

    def test_password_and_password_file_together(self) -> None:
        self.assertConfigError(ONE_MASTER + 'password_file = "pw"\n', "libxml2-debian-sid", "not both")

    def test_neither_password_nor_password_file(self) -> None:
        self.assertConfigError(
            ONE_MASTER.replace('password = "s3cret"\n', ""), "password or password_file is missing"
        )

    def test_unreadable_password_file(self) -> None:
        text = ONE_MASTER.replace('password = "s3cret"', 'password_file = "nope"')
        self.assertConfigError(text, "password_file", str(self.dir.absolute() / "nope"))

    def test_no_host_key_pin(self) -> None:
        self.assertConfigError(
            ONE_MASTER.replace(f'host_key = "{PIN}"\n', ""), "no host_key, host_ca or known_hosts"
        )

    def test_missing_identity(self) -> None:
        self.assertConfigError(ONE_MASTER.replace('identity = "id_ed25519"\n', ""), "identity")

    def test_bad_address(self) -> None:
        self.assertConfigError(ONE_MASTER.replace("buildmaster.example.org:2222", "host:port"), "HOST:PORT")

    def test_not_toml(self) -> None:
        self.assertConfigError("[master\n", "not valid TOML")

    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            launcher_config.load(self.dir / "absent.toml")
        self.assertIn("cannot be read", str(caught.exception))

    def test_no_workers(self) -> None:
        self.assertConfigError(ONE_MASTER.split("[[worker]]")[0], "no [[worker]]")

    def test_worker_listed_twice(self) -> None:
        text = ONE_MASTER + '\n[[worker]]\nname = "libxml2-debian-sid"\npassword = "p"\n'
        self.assertConfigError(text, "'libxml2-debian-sid' is listed twice")

    def test_worker_without_a_name(self) -> None:
        self.assertConfigError(ONE_MASTER.replace('name = "libxml2-debian-sid"\n', ""), "name is missing")

    def test_several_masters_need_a_master_per_worker(self) -> None:
        self.assertConfigError(
            f"""
            [[master]]
            name = "east"
            address = "east:2222"
            host_key = "{PIN}"
            identity = "id"

            [[master]]
            name = "west"
            address = "west:2222"
            host_key = "{PIN}"
            identity = "id"

            [[worker]]
            name = "a"
            password = "p"
            """,
            "several masters",
            'master = "NAME"',
        )

    def test_worker_naming_an_unknown_master(self) -> None:
        self.assertConfigError(ONE_MASTER + 'master = "north"\n', "'north'")

    def test_two_masters_with_the_same_name(self) -> None:
        self.assertConfigError(
            f"""
            [[master]]
            name = "m"
            address = "a:1"
            host_key = "{PIN}"
            identity = "id"

            [[master]]
            name = "m"
            address = "b:1"
            host_key = "{PIN}"
            identity = "id"

            [[worker]]
            name = "w"
            password = "p"
            master = "m"
            """,
            "same name",
        )


MANY = f"""
[master]
address = "buildmaster.example.org"
host_key = "{PIN}"
identity = "id_ed25519"

[[workers]]
projects = ["libxml2", "glib", "gtk"]
name = "{{project}}-debian-sid"
password_file = "passwords/{{project}}"
keepalive = 300
"""


class CompactWorkersTests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.path = self.dir / "ssh-worker.toml"
        (self.dir / "passwords").mkdir()
        for project in ["libxml2", "glib", "gtk"]:
            (self.dir / "passwords" / project).write_text(f"pw-{project}\n")

    def load(self, text: str) -> launcher_config.LauncherConfig:
        self.path.write_text(textwrap.dedent(text), encoding="utf-8")
        return launcher_config.load(self.path)

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(text)
        return str(caught.exception)

    def test_one_table_is_a_session_per_project(self) -> None:
        workers = self.load(MANY).workers
        self.assertEqual(
            [w.name for w in workers], ["libxml2-debian-sid", "glib-debian-sid", "gtk-debian-sid"]
        )
        self.assertEqual([w.password for w in workers], ["pw-libxml2", "pw-glib", "pw-gtk"])
        self.assertEqual(
            [w.basedir for w in workers], [self.dir / "workers" / p for p in ["libxml2", "glib", "gtk"]]
        )
        self.assertEqual({w.keepalive for w in workers}, {300})

    def test_200_sessions_in_a_few_lines(self) -> None:
        names = [f"p{i}" for i in range(200)]
        text = MANY.replace(
            'projects = ["libxml2", "glib", "gtk"]', f"projects = {names!r}".replace("'", '"')
        )
        text = text.replace('password_file = "passwords/{project}"', 'password = "same"')
        self.assertLess(len(text.splitlines()), 15)
        self.assertEqual(len(self.load(text).workers), 200)

    def test_it_mixes_with_single_tables_and_a_name_listed_twice_is_refused(self) -> None:
        single = '\n[[worker]]\nname = "tools-debian-sid"\npassword = "x"\n'
        self.assertEqual(len(self.load(MANY + single).workers), 4)
        twice = single.replace("tools-debian-sid", "glib-debian-sid")
        self.assertIn("worker 'glib-debian-sid' is listed twice", self.error(MANY + twice))

    def test_mistakes_name_the_table_and_its_line(self) -> None:
        cases = {
            'name = "{project}-debian-sid"': ('name = "debian-sid"', "name must contain {project}"),
            'projects = ["libxml2", "glib", "gtk"]': ("projects = []", "projects must be a list of names"),
            "keepalive = 300": ('colour = "red"', "unknown key 'colour'"),
        }
        for old, (new, fragment) in cases.items():
            message = self.error(MANY.replace(old, new))
            self.assertIn(f"{self.path}:7: [[workers]] #1", message, new)
            self.assertIn(fragment, message, new)
        (self.dir / "passwords" / "gtk").unlink()
        message = self.error(MANY)
        self.assertIn(f"{self.path}:7: [[workers]] #1 ('gtk') worker 'gtk-debian-sid'", message)
        self.assertIn("password_file", message)


class ForwardConfigTests(TestCase):
    def setUp(self) -> None:
        self.path = scratch_dir(self) / "ssh-worker.toml"

    def load(self, text: str) -> launcher_config.LauncherConfig:
        self.path.write_text(textwrap.dedent(text), encoding="utf-8")
        return launcher_config.load(self.path)

    def forward(self, listen: str) -> str:
        return ONE_MASTER + f"\n[[forward]]\nlisten = {listen}\n"

    def test_a_port_alone_listens_on_loopback_only(self) -> None:
        [forward] = self.load(self.forward('"9989"')).forwards
        self.assertEqual(
            (forward.listen, forward.address), ("tcp:9989:interface=127.0.0.1", "127.0.0.1:9989")
        )
        [forward] = self.load(self.forward("9989")).forwards
        self.assertEqual(forward.listen, "tcp:9989:interface=127.0.0.1")

    def test_another_address_only_when_the_config_names_it(self) -> None:
        [forward] = self.load(self.forward('"0.0.0.0:9990"')).forwards
        self.assertEqual(forward.listen, "tcp:9990:interface=0.0.0.0")
        [forward] = self.load(self.forward('"[::1]:9990"')).forwards
        self.assertEqual((forward.listen, forward.address), ("tcp:9990:interface=\\:\\:1", "[::1]:9990"))

    def test_a_forward_alone_is_a_config_and_mistakes_are_named(self) -> None:
        text = ONE_MASTER.split("[[worker]]")[0] + '\n[[forward]]\nlisten = "9989"\n'
        self.assertEqual(len(self.load(text).forwards), 1)
        for listen, fragment in [('"x:0"', "the port must be a number"), ('""', 'listen must be "PORT"')]:
            with self.assertRaises(ConfigError) as caught:
                self.load(self.forward(listen))
            self.assertIn(f"{self.path}:13: [[forward]] #1", str(caught.exception))
            self.assertIn(fragment, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            self.load(self.forward('"9989"') + '\n[[forward]]\nlisten = "127.0.0.1:9989"\n')
        self.assertIn("listen on the same address", str(caught.exception))


class ProxyConfigTests(TestCase):
    def setUp(self) -> None:
        self.path = scratch_dir(self) / "ssh-worker.toml"

    def load(self, proxy: str) -> launcher_config.LauncherConfig:
        self.path.write_text(ONE_MASTER.replace("[master]\n", f"[master]\nproxy = {proxy}\n", 1))
        return launcher_config.load(self.path)

    def test_a_url_or_the_environment(self) -> None:
        self.assertEqual(self.load('"http://ci:pw@proxy:3128"').masters[0].proxy, "http://ci:pw@proxy:3128")
        self.assertEqual(self.load('"env"').masters[0].proxy, "env")

    def test_a_bad_proxy_names_the_line_and_says_what_is_accepted(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.load('"socks5://proxy:1080"')
        message = str(caught.exception)
        self.assertIn(f"{self.path}:2: [master]: proxy must be http://", message)
        self.assertIn('or "env"', message)
