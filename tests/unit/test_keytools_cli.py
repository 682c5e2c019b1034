"""The key tooling commands, run in process.

``buildbot-sshmux init|hostkey|authorize|revoke|list`` on a master's basedir
and ``ssh-worker keygen|init`` on a worker host, with their output captured.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from twisted.conch.ssh import keys
from twisted.trial.unittest import TestCase

from buildbot_sshmux.cli import admin, ssh_worker
from buildbot_sshmux.errors import ConfigError, KeyFileError
from buildbot_sshmux.master.authorized_hosts import load
from buildbot_sshmux.wire.defaults import SSH_PORT
from buildbot_sshmux.wire.keys import (
    fingerprint,
    generate_ed25519,
    load_private_key,
    public_line,
    write_private_key,
)
from buildbot_sshmux.worker import config as launcher_config
from buildbot_sshmux.worker.link import HostKeyPins

from .tmpdirs import scratch_dir

ADDRESS = "master.example.org:2222"


def run(main: Callable[[list[str]], int], argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    """Run a CLI's main(); return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        if stdin is not None:
            stack.enter_context(mock.patch.object(sys, "stdin", io.StringIO(stdin)))
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class MasterTestCase(TestCase):
    def setUp(self) -> None:
        self.basedir = scratch_dir(self)
        self.sshmux = self.basedir / "sshmux"
        self.hosts = self.sshmux / "authorized_hosts"

    def admin(self, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        return run(admin.main, list(argv), stdin)

    def init(self, *extra: str) -> str:
        code, out, err = self.admin("init", str(self.basedir), "--address", ADDRESS, *extra)
        self.assertEqual(code, 0, err)
        return out


class InitTests(MasterTestCase):
    def test_without_address_the_line_is_said_to_be_a_placeholder(self) -> None:
        for command in (["init", str(self.basedir)], ["hostkey", str(self.basedir)]):
            code, out, err = self.admin(*command)
            self.assertEqual(code, 0, err)
            self.assertIn("no --address given: buildmaster.example.org:2222 below is a placeholder", out)

    def test_an_address_without_port_is_the_services_default_port(self) -> None:
        code, out, err = self.admin("init", str(self.basedir), "--address", "master.example.org")
        self.assertEqual(code, 0, err)
        self.assertIn(f"[master.example.org]:{SSH_PORT} ssh-ed25519 ", out)
        self.assertIn(f"port='tcp:{SSH_PORT}'", out)

    def test_a_malformed_address_is_refused(self) -> None:
        code, _out, err = self.admin("init", str(self.basedir), "--address", "master.example.org:0")
        self.assertEqual(code, 2)
        self.assertIn("--address must be HOST[:PORT]", err)

    def test_init_makes_a_0600_key_and_an_empty_0600_authorized_hosts(self) -> None:
        self.init()
        key_path = self.sshmux / "ssh_host_ed25519_key"
        self.assertEqual(mode(key_path), 0o600)
        self.assertEqual(mode(self.hosts), 0o600)
        self.assertEqual(mode(self.sshmux), 0o700)
        key = load_private_key(key_path)
        self.assertEqual(key.sshType(), b"ssh-ed25519")
        self.assertEqual(load(self.hosts), ([], []))

    def test_init_prints_fingerprint_known_hosts_line_and_snippet(self) -> None:
        out = self.init()
        key = load_private_key(self.sshmux / "ssh_host_ed25519_key")
        lines = out.splitlines()
        self.assertIn(f"host key fingerprint: {fingerprint(key)}", lines)
        known = f"[master.example.org]:2222 {public_line(key)}"
        self.assertIn(known, lines)
        self.assertTrue(known.startswith("[master.example.org]:2222 ssh-ed25519 AAAA"))
        self.assertIn("SSHMuxService(", out)
        self.assertIn("port='tcp:2222'", out)
        self.assertIn("host_keys=['sshmux/ssh_host_ed25519_key']", out)
        self.assertIn("authorized_hosts='sshmux/authorized_hosts'", out)
        snippet = out[out.index("from buildbot_sshmux import SSHMuxService") :]
        compile(snippet, "master.cfg", "exec")  # the snippet is valid Python

    def test_printed_known_hosts_line_pins_the_key(self) -> None:
        out = self.init()
        key = load_private_key(self.sshmux / "ssh_host_ed25519_key")
        [line] = [l for l in out.splitlines() if l.startswith("[master.example.org]:2222 ")]
        known_hosts = self.basedir / "known_hosts"
        known_hosts.write_text(line + "\n")
        pins = HostKeyPins(known_hosts=known_hosts)
        self.assertTrue(pins.accepts("master.example.org", 2222, key.public()))
        self.assertFalse(pins.accepts("master.example.org", 2222, generate_ed25519().public()))
        self.assertFalse(pins.accepts("other.example.org", 2222, key.public()))

    def test_init_twice_refuses_and_keeps_the_key(self) -> None:
        self.init()
        key_path = self.sshmux / "ssh_host_ed25519_key"
        before = key_path.read_bytes()
        code, out, err = self.admin("init", str(self.basedir), "--address", ADDRESS)
        self.assertEqual(code, 2)
        self.assertIn(str(key_path), err)
        self.assertIn("exists", err)
        self.assertEqual(key_path.read_bytes(), before)

    def test_init_type_rsa_adds_a_second_key_and_keeps_authorized_hosts(self) -> None:
        self.init()
        with self.hosts.open("a") as f:
            f.write(f'host="kept",workers="*" {public_line(generate_ed25519())}\n')
        before = self.hosts.read_text()

        out = self.init("--type", "rsa")

        rsa_path = self.sshmux / "ssh_host_rsa_key"
        self.assertEqual(mode(rsa_path), 0o600)
        rsa_key = load_private_key(rsa_path)
        self.assertEqual(rsa_key.sshType(), b"ssh-rsa")
        self.assertTrue((self.sshmux / "ssh_host_ed25519_key").exists())
        self.assertEqual(self.hosts.read_text(), before)
        self.assertIn(f"[master.example.org]:2222 {public_line(rsa_key)}", out.splitlines())
        self.assertIn(fingerprint(rsa_key), out)
        self.assertNotIn("authorized_hosts and", out.splitlines()[0])

    def test_init_of_a_missing_basedir_exits_2(self) -> None:
        code, _out, err = self.admin("init", str(self.basedir / "absent"))
        self.assertEqual(code, 2)
        self.assertIn("not a directory", err)


class HostkeyTests(MasterTestCase):
    def known_lines(self, out: str) -> list[str]:
        return [l for l in out.splitlines() if l and not l.startswith("#")]

    def test_one_known_hosts_line_per_key(self) -> None:
        self.init()
        self.init("--type", "rsa")
        code, out, err = self.admin("hostkey", str(self.basedir), "--address", ADDRESS)
        self.assertEqual(code, 0, err)
        lines = self.known_lines(out)
        expected = {
            f"[master.example.org]:2222 {public_line(load_private_key(self.sshmux / name))}"
            for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key")
        }
        self.assertEqual(len(lines), 2)
        self.assertEqual(set(lines), expected)
        for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
            self.assertIn(f"# {name}: {fingerprint(load_private_key(self.sshmux / name))}", out)

    def test_port_22_gives_a_bare_host_name(self) -> None:
        self.init()
        code, out, _err = self.admin("hostkey", str(self.basedir), "--address", "master.example.org:22")
        self.assertEqual(code, 0)
        [line] = self.known_lines(out)
        self.assertTrue(line.startswith("master.example.org ssh-ed25519 "), line)

    def test_key_option_selects_one_key(self) -> None:
        self.init()
        self.init("--type", "ecdsa")
        ecdsa = self.sshmux / "ssh_host_ecdsa_key"
        code, out, _err = self.admin("hostkey", str(self.basedir), "--address", ADDRESS, "--key", str(ecdsa))
        self.assertEqual(code, 0)
        [line] = self.known_lines(out)
        self.assertEqual(line, f"[master.example.org]:2222 {public_line(load_private_key(ecdsa))}")

    def test_refuses_a_key_others_can_read(self) -> None:
        self.init()
        key_path = self.sshmux / "ssh_host_ed25519_key"
        key_path.chmod(0o644)
        code, _out, err = self.admin("hostkey", str(self.basedir))
        self.assertEqual(code, 2)
        self.assertIn(f"chmod 600 {key_path}", err)

    def test_no_host_key_exits_2(self) -> None:
        code, _out, err = self.admin("hostkey", str(self.basedir))
        self.assertEqual(code, 2)
        self.assertIn("buildbot-sshmux init", err)


class AuthorizeTests(MasterTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.init()
        self.key = generate_ed25519()
        self.pub = self.basedir / "worker.pub"
        self.pub.write_text(public_line(self.key, "root@debian-sid") + "\n")

    def authorize(self, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        return self.admin("authorize", str(self.basedir), *argv, stdin=stdin)

    def test_appends_a_parseable_line(self) -> None:
        code, out, err = self.authorize(
            "--host", "debian-sid", "--workers", "*-debian-sid, tools-*",
            "--from", "10.0.0.0/8,!10.9.9.9", "--max-channels", "5", str(self.pub),
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn("debian-sid", out)
        self.assertIn(fingerprint(self.key), out)
        entries, errors = load(self.hosts)
        self.assertEqual(errors, [])
        [entry] = entries
        self.assertEqual(entry.name, "debian-sid")
        self.assertEqual(entry.key, self.key.public())
        self.assertEqual(entry.workers, ("*-debian-sid", "tools-*"))
        self.assertEqual(entry.from_patterns, ("10.0.0.0/8", "!10.9.9.9"))
        self.assertEqual(entry.max_channels, 5)
        self.assertTrue(self.hosts.read_text().splitlines()[-1].endswith(" root@debian-sid"))
        self.assertTrue(self.hosts.read_text().startswith("#"), "init's comment is kept")
        self.assertEqual(mode(self.hosts), 0o600)

    def test_refuses_a_key_already_authorized(self) -> None:
        self.assertEqual(self.authorize("--host", "debian-sid", "--workers", "*", str(self.pub))[0], 0)
        before = self.hosts.read_text()
        code, _out, err = self.authorize("--host", "impostor", "--workers", "*", str(self.pub))
        self.assertEqual(code, 2)
        self.assertIn("debian-sid", err)
        self.assertIn(fingerprint(self.key), err)
        self.assertIn(f"{self.hosts}:2", err)
        self.assertEqual(self.hosts.read_text(), before)

    def test_a_second_key_for_the_same_host(self) -> None:
        new = generate_ed25519()
        self.assertEqual(self.authorize("--host", "debian-sid", "--workers", "*", str(self.pub))[0], 0)
        code, _out, err = self.authorize(
            "--host", "debian-sid", "--workers", "*", "-", stdin=public_line(new)
        )
        self.assertEqual(code, 0, err)
        self.assertEqual([e.key for e in load(self.hosts)[0]], [self.key.public(), new.public()])

    def test_reads_the_key_from_stdin(self) -> None:
        code, out, err = self.authorize(
            "--host", "fedora", "--workers", "*-fedora", "-", stdin=public_line(self.key, "from-stdin") + "\n"
        )
        self.assertEqual(code, 0, err)
        [entry] = load(self.hosts)[0]
        self.assertEqual((entry.name, entry.key), ("fedora", self.key.public()))
        self.assertIn(fingerprint(self.key), out)

    def test_refuses_a_private_key_file(self) -> None:
        private = self.basedir / "id_ed25519"
        write_private_key(private, self.key, "x")
        before = self.hosts.read_text()
        code, _out, err = self.authorize("--host", "debian-sid", "--workers", "*", str(private))
        self.assertEqual(code, 2)
        self.assertIn("private key", err)
        self.assertIn(".pub", err)
        self.assertNotIn("BEGIN OPENSSH", err)
        self.assertEqual(self.hosts.read_text(), before)

    def test_refuses_a_private_key_on_stdin(self) -> None:
        data = self.key.toString("OPENSSH", subtype="v1").decode()
        code, _out, err = self.authorize("--host", "debian-sid", "--workers", "*", "-", stdin=data)
        self.assertEqual(code, 2)
        self.assertIn("private key", err)
        self.assertEqual(load(self.hosts)[0], [])

    def test_refuses_what_is_not_a_key(self) -> None:
        self.pub.write_text("hello world\n")
        code, _out, err = self.authorize("--host", "h", "--workers", "*", str(self.pub))
        self.assertEqual(code, 2)
        self.assertIn("not an OpenSSH public key", err)

    def test_refuses_bad_options(self) -> None:
        for argv in (
            ["--workers", ","],
            ["--workers", "*", "--from", "!10.0.0.1"],
            ["--workers", "*", "--from", "10.0.0.0/40"],
            ["--workers", "*", "--max-channels", "0"],
        ):
            code, _out, err = self.authorize("--host", "h", *argv, str(self.pub))
            self.assertEqual(code, 2, argv)
            self.assertTrue(err, argv)
        self.assertEqual(load(self.hosts)[0], [])


class ListAndRevokeTests(MasterTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.init()
        self.key_a, self.key_a2, self.key_b = generate_ed25519(), generate_ed25519(), generate_ed25519()
        for host, key, extra in (
            ("debian-sid", self.key_a, ["--workers", "*-debian-sid"]),
            ("debian-sid", self.key_a2, ["--workers", "*-debian-sid"]),
            ("fedora", self.key_b, ["--workers", "*-fedora,tools", "--from", "192.0.2.0/24"]),
        ):
            code, _out, err = self.admin(
                "authorize", str(self.basedir), "--host", host, *extra, "-", stdin=public_line(key)
            )
            self.assertEqual(code, 0, err)

    def list_rows(self) -> list[list[str]]:
        code, out, err = self.admin("list", str(self.basedir))
        self.assertEqual(code, 0, err)
        return [line.split() for line in out.splitlines()]

    def test_list_shows_host_fingerprint_workers_from(self) -> None:
        rows = self.list_rows()
        self.assertEqual(rows[0], ["HOST", "FINGERPRINT", "WORKERS", "FROM"])
        self.assertEqual(
            rows[1:],
            [
                ["debian-sid", fingerprint(self.key_a), "*-debian-sid", "*"],
                ["debian-sid", fingerprint(self.key_a2), "*-debian-sid", "*"],
                ["fedora", fingerprint(self.key_b), "*-fedora,tools", "192.0.2.0/24"],
            ],
        )

    def test_list_reports_bad_lines_with_file_and_line(self) -> None:
        with self.hosts.open("a") as f:
            f.write('host="broken",bogus="1" ' + public_line(generate_ed25519()) + "\n")
        code, out, err = self.admin("list", str(self.basedir))
        self.assertEqual(code, 1)
        self.assertIn("fedora", out)
        self.assertIn(f"{self.hosts}:5", err)
        self.assertIn("bogus", err)

    def test_revoke_by_host_removes_all_its_keys(self) -> None:
        code, out, err = self.admin("revoke", str(self.basedir), "--host", "debian-sid")
        self.assertEqual(code, 0, err)
        self.assertIn(fingerprint(self.key_a), out)
        self.assertIn(fingerprint(self.key_a2), out)
        self.assertEqual([r[0] for r in self.list_rows()[1:]], ["fedora"])
        self.assertTrue(self.hosts.read_text().startswith("#"), "comments are kept")

    def test_revoke_by_fingerprint_removes_one_key(self) -> None:
        code, out, err = self.admin("revoke", str(self.basedir), "--fingerprint", fingerprint(self.key_a))
        self.assertEqual(code, 0, err)
        self.assertIn("debian-sid", out)
        self.assertEqual(
            [(r[0], r[1]) for r in self.list_rows()[1:]],
            [("debian-sid", fingerprint(self.key_a2)), ("fedora", fingerprint(self.key_b))],
        )

    def test_revoke_of_an_unknown_host_exits_2(self) -> None:
        before = self.hosts.read_text()
        code, _out, err = self.admin("revoke", str(self.basedir), "--host", "nobody")
        self.assertEqual(code, 2)
        self.assertIn("no entry for nobody", err)
        self.assertEqual(self.hosts.read_text(), before)

    def test_revoke_needs_exactly_one_of_host_and_fingerprint(self) -> None:
        self.assertEqual(self.admin("revoke", str(self.basedir))[0], 2)
        code, _out, err = self.admin(
            "revoke", str(self.basedir), "--host", "fedora", "--fingerprint", fingerprint(self.key_a)
        )
        self.assertEqual(code, 2)
        self.assertIn("--host", err)
        self.assertEqual(len(load(self.hosts)[0]), 3)


class SharedFileTests(MasterTestCase):
    """A cluster's one authorized_hosts, outside every basedir: ``--file /ABSOLUTE/PATH``."""

    def setUp(self) -> None:
        super().setUp()
        self.shared = self.basedir / "shared" / "authorized_hosts"
        self.shared.parent.mkdir()
        self.key_a, self.key_b = generate_ed25519(), generate_ed25519()

    def authorize(self, host: str, key: keys.Key, *where: str) -> tuple[int, str, str]:
        return self.admin(
            "authorize", *where, "--host", host, "--workers", f"*-{host}", "-", stdin=public_line(key)
        )

    def test_authorize_revoke_list_without_basedir(self) -> None:
        code, out, err = self.authorize("hosta", self.key_a, "--file", str(self.shared))
        self.assertEqual(code, 0, err)
        self.assertIn(f"in {self.shared}", out)
        self.assertIn(f"every running master whose authorized_hosts is {self.shared}", out)
        self.assertEqual(self.authorize("hostb", self.key_b, "--file", str(self.shared))[0], 0)
        code, out, err = self.admin("list", "--file", str(self.shared))
        self.assertEqual(code, 0, err)
        self.assertEqual([line.split()[0] for line in out.splitlines()[1:]], ["hosta", "hostb"])
        code, out, err = self.admin("revoke", "--file", str(self.shared), "--host", "hosta")
        self.assertEqual(code, 0, err)
        self.assertIn(fingerprint(self.key_a), out)
        self.assertEqual([e.name for e in load(self.shared)[0]], ["hostb"])

    def test_an_absolute_file_wins_over_basedir(self) -> None:
        self.init()
        code, _out, err = self.authorize("hosta", self.key_a, str(self.basedir), "--file", str(self.shared))
        self.assertEqual(code, 0, err)
        self.assertEqual([e.name for e in load(self.shared)[0]], ["hosta"])
        self.assertEqual(load(self.hosts)[0], [], "the basedir's own file is untouched")

    def test_the_basedir_and_the_key_may_sit_on_either_side_of_the_options(self) -> None:
        self.init()
        pub = self.basedir / "hosta.pub"
        pub.write_text(public_line(self.key_a) + "\n")
        for argv in (
            [str(self.basedir), "--host", "hosta", "--workers", "*", str(pub)],
            ["--host", "hosta", str(self.basedir), "--workers", "*", str(pub)],
            ["--host", "hosta", "--workers", "*", str(self.basedir), str(pub)],
        ):
            code, _out, err = self.admin("authorize", *argv)
            self.assertEqual(code, 0, (argv, err))
            self.assertEqual([e.name for e in load(self.hosts)[0]], ["hosta"])
            self.assertEqual(self.admin("revoke", str(self.basedir), "--host", "hosta")[0], 0)

    def test_a_relative_file_without_basedir_is_refused(self) -> None:
        for argv in (["list"], ["revoke", "--host", "hosta"], ["list", "--file", "shared/authorized_hosts"]):
            code, _out, err = self.admin(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("give the master's BASEDIR, or --file with an absolute path", err)
        code, _out, err = self.authorize("hosta", self.key_a)
        self.assertEqual(code, 2)
        self.assertIn("--file with an absolute path", err)

    def test_a_missing_shared_file_names_the_path_not_init(self) -> None:
        missing = self.basedir / "nowhere" / "authorized_hosts"
        code, _out, err = self.admin("revoke", "--file", str(missing), "--host", "hosta")
        self.assertEqual(code, 2)
        self.assertIn(f"{missing} does not exist", err)
        self.assertIn("SSHMuxService(authorized_hosts=...)", err)
        self.assertNotIn("buildbot-sshmux init", err)
        code, _out, err = self.authorize("hosta", self.key_a, "--file", str(missing))
        self.assertEqual(code, 2)
        self.assertIn(f"{missing.parent} does not exist", err)

    def test_a_basedir_symlinked_to_the_shared_file_edits_the_shared_file(self) -> None:
        self.init()
        self.hosts.unlink()
        self.hosts.symlink_to(self.shared)
        self.assertEqual(self.authorize("hosta", self.key_a, str(self.basedir))[0], 0)
        self.assertEqual(self.authorize("hostb", self.key_b, str(self.basedir))[0], 0)
        self.assertEqual(self.admin("revoke", str(self.basedir), "--host", "hosta")[0], 0)
        self.assertTrue(self.hosts.is_symlink())
        self.assertEqual([e.name for e in load(self.shared)[0]], ["hostb"])

    def test_an_edit_that_cannot_keep_the_owner_exits_2_and_changes_nothing(self) -> None:
        self.assertEqual(self.authorize("hosta", self.key_a, "--file", str(self.shared))[0], 0)
        before = self.shared.read_bytes()
        with (
            mock.patch("os.geteuid", return_value=os.geteuid() + 1),
            mock.patch("os.fchown", side_effect=PermissionError(1, "Operation not permitted")),
        ):
            code, _out, err = self.admin("revoke", "--file", str(self.shared), "--host", "hosta")
        self.assertEqual(code, 2)
        self.assertIn("could not keep that owner", err)
        self.assertEqual(self.shared.read_bytes(), before)


class KeygenTests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.path = self.dir / "id_ed25519"

    def keygen(self, *argv: str) -> tuple[int, str, str]:
        return run(ssh_worker.main, ["keygen", *argv])

    def test_writes_a_0600_key_and_pub_and_prints_the_public_line(self) -> None:
        code, out, err = self.keygen(str(self.path), "--comment", "debian-sid")
        self.assertEqual(code, 0, err)
        self.assertEqual(mode(self.path), 0o600)
        key = load_private_key(self.path)
        pub = Path(f"{self.path}.pub").read_text().strip()
        self.assertEqual(pub, public_line(key, "debian-sid"))
        self.assertIn(pub, out.splitlines())
        self.assertIn(fingerprint(key), out)
        # What it prints is what `buildbot-sshmux authorize -` takes.
        self.assertEqual(keys.Key.fromString(pub.encode()), key.public())

    def test_refuses_to_overwrite(self) -> None:
        self.assertEqual(self.keygen(str(self.path), "--comment", "x")[0], 0)
        before = self.path.read_bytes(), Path(f"{self.path}.pub").read_bytes()
        code, _out, err = self.keygen(str(self.path), "--comment", "x")
        self.assertEqual(code, 2)
        self.assertIn("exists", err)
        self.assertEqual((self.path.read_bytes(), Path(f"{self.path}.pub").read_bytes()), before)

    def test_passphrase_encrypts_the_key(self) -> None:
        with mock.patch("getpass.getpass", return_value="sesame"):
            code, _out, err = self.keygen(str(self.path), "--comment", "x", "--passphrase")
        self.assertEqual(code, 0, err)
        self.assertNotIn(b"sesame", self.path.read_bytes())
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path)
        self.assertIn("encrypted", str(caught.exception))
        key = load_private_key(self.path, b"sesame")
        self.assertEqual(Path(f"{self.path}.pub").read_text().split()[:2], public_line(key).split())

    def test_the_passphrase_is_asked_twice(self) -> None:
        with mock.patch("getpass.getpass", side_effect=["sesame", "sesamE"]) as asked:
            code, _out, err = self.keygen(str(self.path), "--comment", "x", "--passphrase")
        self.assertEqual(asked.call_count, 2)
        self.assertEqual(code, 2)
        self.assertIn("the two passphrases differ; nothing was written", err)
        self.assertFalse(self.path.exists())

    def test_an_encrypted_key_without_passphrase_says_how_to_give_one(self) -> None:
        with mock.patch("getpass.getpass", return_value="sesame"):
            self.keygen(str(self.path), "--comment", "x", "--passphrase")
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path)
        self.assertIn("SSH_WORKER_PASSPHRASE", str(caught.exception))
        self.assertIn("identity_passphrase_file", str(caught.exception))

    def test_a_wrong_passphrase_says_so(self) -> None:
        with mock.patch("getpass.getpass", return_value="sesame"):
            self.keygen(str(self.path), "--comment", "x", "--passphrase")
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path, b"open up")
        self.assertEqual(str(caught.exception), f"wrong passphrase for private key {self.path}")

    def test_a_passphrase_given_for_a_corrupt_plain_key_is_not_blamed(self) -> None:
        self.keygen(str(self.path), "--comment", "x")
        lines = self.path.read_text().splitlines()
        del lines[-3:-1]  # the end of the key's bytes
        self.path.write_text("\n".join(lines) + "\n")
        with self.assertRaises(KeyFileError) as caught:
            load_private_key(self.path, b"sesame")
        self.assertIn("is not a valid OpenSSH key", str(caught.exception))


class WorkerInitTests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.config = self.dir / "ssh-worker.toml"
        self.master_key = generate_ed25519()

    def init(self, *extra: str) -> tuple[int, str, str]:
        return run(
            ssh_worker.main,
            [
                "init", str(self.config), "--master", ADDRESS,
                "--fingerprint", fingerprint(self.master_key), *extra,
            ],
        )  # fmt: skip

    def test_a_master_without_port_is_the_default_port_as_in_the_toml(self) -> None:
        code, _out, err = run(
            ssh_worker.main,
            ["init", str(self.config), "--master", "master.example.org", "--fingerprint",
             fingerprint(self.master_key), "--worker", "w"],
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        (self.dir / "passwords").mkdir()
        (self.dir / "passwords" / "w").write_text("pw\n")
        [master] = launcher_config.load(self.config).masters
        self.assertEqual((master.host, master.port), ("master.example.org", SSH_PORT))

    def test_config_loads_once_the_password_files_exist(self) -> None:
        code, out, err = self.init("--worker", "libxml2-debian-sid", "--worker", "glib-debian-sid")
        self.assertEqual(code, 0, err)
        self.assertIn("ssh-worker keygen", out)
        with self.assertRaises(ConfigError) as caught:
            launcher_config.load(self.config)
        self.assertIn("password_file", str(caught.exception))

        (self.dir / "passwords").mkdir()
        (self.dir / "passwords" / "libxml2-debian-sid").write_text("pw1\n")
        (self.dir / "passwords" / "glib-debian-sid").write_text("pw2\n")
        config = launcher_config.load(self.config)

        [master] = config.masters
        self.assertEqual((master.host, master.port), ("master.example.org", 2222))
        self.assertEqual(master.host_keys, (fingerprint(self.master_key),))
        self.assertEqual(master.identity, self.dir / "id_ed25519")
        self.assertEqual(master.pb_port, 9989)
        self.assertEqual(
            [(w.name, w.password, w.basedir) for w in config.workers],
            [
                ("libxml2-debian-sid", "pw1", self.dir / "workers" / "libxml2-debian-sid"),
                ("glib-debian-sid", "pw2", self.dir / "workers" / "glib-debian-sid"),
            ],
        )
        pins = HostKeyPins.from_config(master.host_keys, master.known_hosts)
        self.assertTrue(pins.accepts(master.host, master.port, self.master_key.public()))
        self.assertFalse(pins.accepts(master.host, master.port, generate_ed25519().public()))

    def test_identity_and_pb_port_options(self) -> None:
        code, _out, err = self.init("--worker", "w", "--identity", "keys/host_key", "--pb-port", "19989")
        self.assertEqual(code, 0, err)
        (self.dir / "passwords").mkdir()
        (self.dir / "passwords" / "w").write_text("pw\n")
        [master] = launcher_config.load(self.config).masters
        self.assertEqual(master.identity, self.dir / "keys" / "host_key")
        self.assertEqual(master.pb_port, 19989)

    def test_refuses_to_overwrite(self) -> None:
        self.assertEqual(self.init("--worker", "w")[0], 0)
        before = self.config.read_text()
        code, _out, err = self.init("--worker", "other")
        self.assertEqual(code, 2)
        self.assertIn("exists", err)
        self.assertEqual(self.config.read_text(), before)

    def test_refuses_a_fingerprint_that_is_not_sha256(self) -> None:
        code, _out, err = run(
            ssh_worker.main,
            ["init", str(self.config), "--master", ADDRESS, "--fingerprint", "MD5:aa:bb"],
        )
        self.assertEqual(code, 2)
        self.assertIn("SHA256:", err)
        self.assertFalse(self.config.exists())

    def test_whole_flow_master_init_to_worker_config(self) -> None:
        basedir = scratch_dir(self)
        code, out, err = run(admin.main, ["init", str(basedir), "--address", ADDRESS])
        self.assertEqual(code, 0, err)
        printed = next(l for l in out.splitlines() if l.startswith("host key fingerprint: "))
        master_fp = printed.split(": ", 1)[1]
        code, _out, err = run(
            ssh_worker.main,
            ["init", str(self.config), "--master", ADDRESS, "--fingerprint", master_fp, "--worker", "w"],
        )
        self.assertEqual(code, 0, err)
        (self.dir / "passwords").mkdir()
        (self.dir / "passwords" / "w").write_text("pw\n")
        [master] = launcher_config.load(self.config).masters
        pins = HostKeyPins.from_config(master.host_keys, master.known_hosts)
        master_key = load_private_key(basedir / "sshmux" / "ssh_host_ed25519_key")
        self.assertTrue(pins.accepts("master.example.org", 2222, master_key.public()))
