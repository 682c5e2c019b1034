"""One authorized_hosts for a cluster of masters: the edits and the masters' watcher.

Every master of a cluster names the same file (shared storage, or a symlink
to it); `add_entry` and `remove_entries` (``buildbot-sshmux authorize|revoke``)
may run on any machine at once and must neither lose an edit nor leave a file
the masters cannot read; each master's watcher must see every edit, whatever
the file's stat() says, and keep watching whatever the file holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

from twisted.internet import task
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import TestCase

from buildbot_sshmux.master import authorized_hosts, service
from buildbot_sshmux.master.authorized_hosts import (
    EditError,
    add_entry,
    format_entry,
    load,
    lock_path,
    remove_entries,
)
from buildbot_sshmux.master.service import SSHMuxService
from buildbot_sshmux.wire.keys import generate_ed25519, public_line, write_private_key

from .tmpdirs import scratch_dir

KEY_A = generate_ed25519()
KEY_B = generate_ed25519()
KEY_C = generate_ed25519()
REPO = Path(__file__).resolve().parents[2]

HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)

ADD_MANY = textwrap.dedent(
    """
    import sys
    from buildbot_sshmux.master.authorized_hosts import add_entry, format_entry
    from buildbot_sshmux.wire.keys import generate_ed25519
    for i in range(int(sys.argv[3])):
        add_entry(sys.argv[1], format_entry(f"{sys.argv[2]}-{i}", generate_ed25519()))
    """
)


def python(*argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", *argv], env=env, text=True, **kwargs)


class SharedEditTests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        self.shared = self.dir / "shared" / "authorized_hosts"
        self.shared.parent.mkdir()
        add_entry(self.shared, format_entry("a", KEY_A, ("a-*",)))
        add_entry(self.shared, format_entry("b", KEY_B, ("b-*",)))

    def names(self, path: Path) -> list[str]:
        entries, errors = load(path)
        self.assertEqual(errors, [])
        return [e.name for e in entries]

    def test_an_edit_through_a_symlink_changes_the_shared_file_and_keeps_the_link(self) -> None:
        link = self.dir / "master-a" / "sshmux" / "authorized_hosts"
        link.parent.mkdir(parents=True)
        link.symlink_to(self.shared)
        remove_entries(link, host="a")
        add_entry(link, format_entry("c", KEY_C))
        self.assertTrue(link.is_symlink(), "the link was replaced by a copy")
        self.assertEqual(self.names(self.shared), ["b", "c"])
        self.assertEqual(
            sorted(os.listdir(link.parent)), ["authorized_hosts"], "nothing left beside the link"
        )

    def test_the_lock_and_no_temporary_file_are_left_beside_the_file(self) -> None:
        self.assertEqual(
            sorted(os.listdir(self.shared.parent)), [".authorized_hosts.lock", "authorized_hosts"]
        )

    def test_an_edit_waits_for_another_process_holding_the_lock(self) -> None:
        holder = python(HOLD_LOCK, str(lock_path(self.shared)), "1.0", stdout=subprocess.PIPE)
        self.addCleanup(holder.wait)
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        began = time.monotonic()
        remove_entries(self.shared, host="a")
        self.assertGreater(time.monotonic() - began, 0.5, "the edit did not wait for the lock")
        self.assertEqual(self.names(self.shared), ["b"])

    def test_a_lock_held_too_long_is_an_error_and_nothing_is_written(self) -> None:
        holder = python(HOLD_LOCK, str(lock_path(self.shared)), "5", stdout=subprocess.PIPE)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        before = self.shared.read_bytes()
        with mock.patch.object(authorized_hosts, "LOCK_TIMEOUT", 0.3):
            with self.assertRaises(EditError) as caught:
                add_entry(self.shared, format_entry("c", KEY_C))
        self.assertIn("being edited by another buildbot-sshmux", str(caught.exception))
        self.assertIn(str(lock_path(self.shared)), str(caught.exception))
        self.assertEqual(self.shared.read_bytes(), before)

    def test_concurrent_editors_lose_no_edit(self) -> None:
        editors = [python(ADD_MANY, str(self.shared), f"host{i}", "5") for i in range(4)]
        self.assertEqual([e.wait(60) for e in editors], [0, 0, 0, 0])
        names = self.names(self.shared)
        self.assertEqual(len(names), 2 + 4 * 5, names)
        self.assertEqual(set(names), {"a", "b"} | {f"host{i}-{j}" for i in range(4) for j in range(5)})

    def test_the_owner_and_mode_are_kept(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("needs root to give the file another owner")
        os.chown(self.shared, 4321, 4322)
        self.shared.chmod(0o640)
        remove_entries(self.shared, host="a")
        st = self.shared.stat()
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o777), (4321, 4322, 0o640))

    def test_an_owner_that_cannot_be_kept_is_refused_and_nothing_is_written(self) -> None:
        before = self.shared.read_bytes()
        me = (os.geteuid(), os.getegid())
        with (
            mock.patch.object(os, "geteuid", return_value=me[0] + 1),
            mock.patch.object(os, "fchown", side_effect=PermissionError(1, "Operation not permitted")),
            self.assertRaises(EditError) as caught,
        ):
            remove_entries(self.shared, host="a")
        self.assertIn(f"belongs to uid {me[0]}", str(caught.exception))
        self.assertIn("run this as that user", str(caught.exception))
        self.assertEqual(self.shared.read_bytes(), before)
        self.assertEqual(
            sorted(os.listdir(self.shared.parent)), [".authorized_hosts.lock", "authorized_hosts"]
        )

    def test_lines_that_are_not_utf8_are_reported_and_kept_by_an_edit(self) -> None:
        latin1 = "# Zoé's hosts".encode("latin-1")
        self.shared.write_bytes(latin1 + b"\n" + self.shared.read_bytes())
        entries, errors = load(self.shared)
        self.assertEqual([e.name for e in entries], ["a", "b"])
        self.assertEqual(len(errors), 1)
        self.assertIn(f"{self.shared}:1: not UTF-8 text; this line is ignored", errors[0])
        remove_entries(self.shared, host="a")
        add_entry(self.shared, format_entry("c", KEY_C))
        self.assertEqual(self.shared.read_bytes().splitlines()[0], latin1)
        self.assertEqual([e.name for e in load(self.shared)[0]], ["b", "c"])


class FakeFactory:
    def __init__(self, fail: int = 0) -> None:
        self.applied = 0
        self.fail = fail

    def apply_entries(self) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("apply_entries broke")
        self.applied += 1


class WatcherTests(TestCase):
    """`SSHMuxService`'s check of authorized_hosts, every reload_interval."""

    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        host_key = self.dir / "ssh_host_ed25519_key"
        write_private_key(host_key, generate_ed25519())
        self.path = self.dir / "authorized_hosts"
        self.write(f'host="a" {public_line(KEY_A)}', f'host="b" {public_line(KEY_B)}')
        self.service = SSHMuxService(host_keys=[str(host_key)], authorized_hosts=str(self.path))
        self.service.parent = SimpleNamespace(master=SimpleNamespace(basedir=str(self.dir)))  # type: ignore[assignment]
        self.service._hosts_file = self.path
        self.events: list[dict[str, Any]] = []
        patcher = mock.patch.object(service, "log", Logger(observer=self.events.append))
        patcher.start()
        self.addCleanup(patcher.stop)
        self.service._reload_hosts()

    def write(self, *lines: str) -> None:
        self.path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    def names(self) -> list[str]:
        return [e.name for e in self.service.entries]

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_an_in_place_edit_of_the_same_size_and_mtime_is_seen(self) -> None:
        # NFS may answer stat() from its attribute cache, and some file systems
        # keep mtimes to the second: the content decides.
        st = self.path.stat()
        with open(self.path, "r+b") as f:  # same inode, same size
            f.write(b'host="x"')
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = self.path.stat()
        self.assertEqual(
            (after.st_ino, after.st_size, after.st_mtime_ns), (st.st_ino, st.st_size, st.st_mtime_ns)
        )
        self.service._check_hosts_file()
        self.assertEqual(self.names(), ["x", "b"])

    def test_a_file_renamed_in_is_seen(self) -> None:
        new = self.dir / "new"
        new.write_text(f'host="c" {public_line(KEY_C)}\n')
        os.replace(new, self.path)
        self.service._check_hosts_file()
        self.assertEqual(self.names(), ["c"])
        self.assertIn(f"authorized_hosts {self.path} reloaded: 1 hosts", self.logged())

    def test_an_unchanged_file_is_not_reloaded(self) -> None:
        self.service.factory = FakeFactory()  # type: ignore[assignment]
        os.utime(self.path)  # touched, not changed
        self.service._check_hosts_file()
        self.assertEqual(self.service.factory.applied, 0)  # type: ignore[attr-defined]

    def test_a_bad_line_is_reported_with_file_and_line_and_the_others_stay(self) -> None:
        self.write(
            f'host="a" {public_line(KEY_A)}',
            'host="oops",bogus=1 ssh-ed25519 AAAA',
            f'host="b" {public_line(KEY_B)}',
        )
        self.service._check_hosts_file()
        self.assertEqual(self.names(), ["a", "b"])
        self.assertTrue(any(m.startswith(f"{self.path}:2: ") for m in self.logged()), self.logged())

    def test_a_line_that_is_not_utf8_does_not_stop_the_watch(self) -> None:
        clock = task.Clock()
        watch = task.LoopingCall(self.service._check_hosts_file)
        watch.clock = clock
        watch.start(2.0, now=False)
        self.path.write_bytes(self.path.read_bytes() + b"# caf\xe9\n")
        clock.advance(2.0)
        self.assertTrue(watch.running, "the watch stopped")
        self.assertEqual(self.names(), ["a", "b"])
        self.assertTrue(any(f"{self.path}:3: not UTF-8 text" in m for m in self.logged()), self.logged())
        self.write(f'host="b" {public_line(KEY_B)}')  # a later revocation is still seen
        clock.advance(2.0)
        self.assertEqual(self.names(), ["b"])
        watch.stop()

    def test_a_failure_to_apply_is_logged_once_and_retried(self) -> None:
        self.service.factory = FakeFactory(fail=2)  # type: ignore[assignment]
        self.write(f'host="b" {public_line(KEY_B)}')
        self.service._check_hosts_file()
        self.service._check_hosts_file()
        self.assertEqual(sum("applying the new entries failed" in m for m in self.logged()), 1)
        self.service._check_hosts_file()
        self.assertEqual(self.service.factory.applied, 1)  # type: ignore[attr-defined]
        self.assertEqual(self.names(), ["b"])
        self.service._check_hosts_file()
        self.assertEqual(self.service.factory.applied, 1, "applied once the file is unchanged")  # type: ignore[attr-defined]

    def test_an_unreadable_file_keeps_the_entries_and_is_reloaded_when_back(self) -> None:
        moved = self.dir / "moved"
        os.replace(self.path, moved)
        self.service._check_hosts_file()
        self.service._check_hosts_file()
        self.assertEqual(self.names(), ["a", "b"])
        self.assertEqual(sum("cannot be read" in m for m in self.logged()), 1)
        os.replace(moved, self.path)
        self.service._check_hosts_file()
        self.assertIn(f"authorized_hosts {self.path} reloaded: 2 hosts", self.logged())
