"""Keys and authorization against a real Buildbot master (issue 3).

Every test runs a real Buildbot master (sqlite, in this process, on the global
reactor) with `SSHMuxService`, and ``ssh-worker run`` launchers as child
processes, one per simulated worker host.  Only 127.0.0.1 and port 0 are used.

Hosts are ``a``, ``b``, ``c``, ``d``; a worker is ``PROJECT-HOST`` (``proj-1-a``)
and host X is normally authorized for ``workers="proj-*-X"``.  The master's log
is captured with a twisted.logger observer (``self.log``); each launcher's
output is in ``HOST/ssh-worker.log``.

Figures (revocation-to-disconnect time, etc.) are printed; run pytest with
``-s`` or ``-rP`` to see them.  Set SSHMUX_KEEP_TMP=1 to keep each test's
directory afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.master.authorized_hosts import format_entry, remove_entries
from buildbot_sshmux.wire.keys import fingerprint, generate, load_private_key, public_line, write_private_key
from tests import support as S
from tests.realmaster import RealMasterCase

PROJECTS = ["proj-1", "proj-2"]


def figures(test: str, **values: Any) -> None:
    shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[figures] {test}: {shown}")


def names_for(projects: Iterable[str], host: str) -> list[str]:
    return [T.worker_name(p, host) for p in projects]


def write_atomically(path: Path, text: str) -> None:
    """Replace a file's content the way editors and the admin CLI do (rename over it)."""
    tmp = path.with_name(f".{path.name}.test-tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def hashed_known_hosts_line(name: str, key_line: str) -> str:
    """An OpenSSH hashed known_hosts line (``ssh-keygen -H``) for ``name``."""
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()} {key_line}"


class KeysTestCase(RealMasterCase):
    """A fresh site, master and log per test; launchers and master always stopped."""

    timeout = 150
    tmp_prefix = "sshmux-keys-"

    def make_site(self, hosts: Sequence[str], authorized: dict[str, str] | None = None) -> T.Site:
        """Keys for every host; authorized_hosts lists ``authorized`` (host -> workers globs).

        By default every host X is authorized for ``proj-*-X``.
        """
        self.site = T.Site(self.root, list(hosts))
        if authorized is None:
            authorized = {h: f"proj-*-{h}" for h in hosts}
        write_atomically(
            self.site.authorized_hosts, "".join(self.host_line(h, g) + "\n" for h, g in authorized.items())
        )
        return self.site

    def host_key(self, host: str) -> Any:
        return load_private_key(self.site.identities[host])

    def host_fp(self, host: str) -> str:
        return S.host_fingerprint(self.site, host)

    def host_line(self, host: str, workers: str) -> str:
        """The authorized_hosts line of ``host`` for these comma-separated globs."""
        return format_entry(host, self.host_key(host), tuple(workers.split(",")))

    def new_master_key(self, kind: str, name: str) -> tuple[Path, Any]:
        """A further master host key, written next to the site's one."""
        key = generate(kind)
        path = self.site.master_basedir / "sshmux" / name
        write_private_key(path, key, f"master {name}")
        return path, key

    def config(
        self,
        projects: Sequence[str],
        hosts: Sequence[str],
        *,
        host_keys: Sequence[Path] | None = None,
        inline_hosts: Sequence[str] = (),
        **kwargs: Any,
    ) -> dict[str, Any]:
        """T.master_config, with other host keys or inline hosts= if given."""
        service: dict[str, Any] = {"hosts": list(inline_hosts)}
        if host_keys is not None:
            service["host_keys"] = [str(p) for p in host_keys]
        return T.master_config(projects, hosts, self.site, service=service, **kwargs)

    async def start_master(self, projects: Sequence[str], hosts: Sequence[str], **kwargs: Any) -> Any:
        master = await T.start_master(
            self.site.master_basedir, self.config(projects, hosts, **kwargs), reactor
        )
        self.addCleanup(lambda: defer.ensureDeferred(T.stop_master(master)))
        self.master = master
        return master

    def launch(
        self,
        host: str,
        workers: Sequence[str],
        *,
        pin: str | None = None,
        known_hosts: str | None = None,
        passwords: dict[str, str] | None = None,
    ) -> T.LauncherProcess:
        """Start ``ssh-worker run`` for ``host``.

        The master's key is pinned as T.Site does (its ed25519 key line),
        or with ``pin`` (a key line or fingerprint), or by ``known_hosts`` (the
        text of a known_hosts file written next to the config).
        """
        path = self.site.launcher_config(host, T.ssh_port(self.master), T.pb_port(self.master), workers)
        text = path.read_text()
        default_pin = f'host_key = "{self.site.host_key_line}"'
        assert default_pin in text
        if known_hosts is not None:
            (path.parent / "known_hosts").write_text(known_hosts)
            text = text.replace(default_pin, 'known_hosts = "known_hosts"')
        elif pin is not None:
            text = text.replace(default_pin, f'host_key = "{pin}"')
        for name, password in (passwords or {}).items():
            text = text.replace(
                f'password = "{T.WORKER_PASSWORD.format(name=name)}"', f'password = "{password}"'
            )
        path.write_text(text)
        return self.start_launcher(path)

    async def run_admin(self, *argv: str) -> str:
        """Run ``buildbot-sshmux ARGV`` as a child process (without blocking the reactor)."""
        script = Path(sys.executable).with_name("buildbot-sshmux")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "buildbot_sshmux.cli.admin"]
        out = self.root / f"admin-{argv[0]}.out"
        with open(out, "wb") as f:
            process = subprocess.Popen([*command, *argv], stdout=f, stderr=subprocess.STDOUT)
        await T.wait_until(reactor, lambda: process.poll() is not None, 60, f"buildbot-sshmux {argv[0]}")
        output = out.read_text()
        self.assertEqual(process.returncode, 0, f"buildbot-sshmux {' '.join(argv)}:\n{output}")
        return output

    # -- waiting and asserting -------------------------------------------------

    def extra_diagnostics(self) -> list[str]:
        sshmux = [line.rstrip() for line in self.log.lines if "sshmux" in line]
        return ["--- master log, buildbot_sshmux lines (last 30):\n" + "\n".join(sshmux[-30:])]

    async def wait_attached(self, names: Iterable[str], timeout: float = 30.0) -> float:
        wanted = set(names)
        return await self.wait_for(
            lambda: wanted <= T.attached_workers(self.master), timeout, f"{sorted(wanted)} to attach"
        )

    def ssh_transports(self) -> dict[str, Any]:
        """The master's live SSH transports, by authenticated host name."""
        factory = T.sshmux_service(self.master).factory
        return {t.avatar.entry.name: t for t in factory.connections if getattr(t, "avatar", None) is not None}


class HostMayRunOnlyItsWorkers(KeysTestCase):
    # Twisted PB logs every failed login (as it does for a wrong password over TCP).
    expected_errors = ((UnauthorizedLogin, ""),)

    def test_foreign_worker_refused_before_the_password(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._foreign())

    async def _foreign(self) -> None:
        projects = ["proj-1", "proj-2", "proj-3"]
        self.make_site(["a", "b"])
        master = await self.start_master(projects, ["a", "b"])
        own = names_for(["proj-1", "proj-2"], "a")
        # Host b's workers, on the master: host a knows the first one's password
        # (refused all the same) and not the second one's (refused before the
        # master's checker could say "invalid login").
        foreign, foreign_bad_pw = "proj-1-b", "proj-2-b"
        control = "proj-3-a"  # host a may use it, but its password is wrong: the PB checker runs
        launcher = self.launch(
            "a",
            own + [foreign, foreign_bad_pw, control],
            passwords={foreign_bad_pw: "not-the-password", control: "not-the-password"},
        )
        await self.wait_attached(own)
        kept = self.connections(own)

        fp = self.host_fp("a")

        def refusals(name: str) -> list[str]:
            return self.log.matching("host a (", fp, f"worker {name!r}", "login refused")

        # Refused, and refused again when the sessions retry.
        await self.wait_for(
            lambda: len(refusals(foreign)) >= 2 and len(refusals(foreign_bad_pw)) >= 2,
            30,
            "the refusals to be logged twice",
        )
        # The master's own password check runs for the allowed name...
        await self.wait_for(
            lambda: bool(self.log.matching("invalid login", repr(control))), 30, "the PB checker's refusal"
        )
        # ... and never for the foreign ones: they were refused before.
        for name in (foreign, foreign_bad_pw):
            self.assertEqual(self.log.matching("invalid login", repr(name)), [], self.diagnostics())
        self.assertEqual(self.log.matching("login refused", repr(control)), [])
        self.assertIn("allowed: proj-*-a", refusals(foreign)[0])

        self.assertAlive(launcher)
        for name in (foreign, foreign_bad_pw):
            self.assertIn(f"worker {name}: master refused the login", launcher.output())
        self.assertFalse({foreign, foreign_bad_pw, control} & T.attached_workers(master))

        await self.assertBuildsGreen([(p, "a") for p in ("proj-1", "proj-2")])
        await self.assertStaysDetached([foreign, foreign_bad_pw, control], 2)
        self.assertEqual(self.connections(own), kept, "host a's allowed sessions must not be disturbed")
        self.assertAlive(launcher)
        for name in (foreign, foreign_bad_pw):
            self.assertEqual(self.log.matching("invalid login", repr(name)), [])
        figures(
            "foreign worker name",
            refusals=len(refusals(foreign)) + len(refusals(foreign_bad_pw)),
            pb_checker_refusals_of_control=len(self.log.matching("invalid login", repr(control))),
            refusal=refusals(foreign)[0].strip(),
        )


class RevokeHost(KeysTestCase):
    def test_revoked_host_is_dropped_within_5s(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._revoke())

    async def _revoke(self) -> None:
        self.make_site(["a", "b"])
        await self.start_master(PROJECTS, ["a", "b"])
        a_names, b_names = names_for(PROJECTS, "a"), names_for(PROJECTS, "b")
        launcher_a = self.launch("a", a_names)
        launcher_b = self.launch("b", b_names)
        await self.wait_attached(a_names + b_names)
        b_kept = self.connections(b_names)
        b_transport = self.ssh_transports()["b"]
        self.assertEqual(set(self.ssh_transports()), {"a", "b"})

        removed = remove_entries(self.site.authorized_hosts, host="a")
        self.assertEqual([e.name for e in removed], ["a"])
        revoked_at = reactor.seconds()
        detach_s = await self.wait_detached(a_names, timeout=15)
        await self.wait_for(lambda: "a" not in self.ssh_transports(), 15, "host a's SSH connection to close")
        disconnect_s = reactor.seconds() - revoked_at
        figures(
            "revocation", revoked_to_workers_detached_s=detach_s, revoked_to_connection_closed_s=disconnect_s
        )
        self.assertLessEqual(detach_s, 5.0, f"host a's workers detached {detach_s:.2f}s after revocation")
        self.assertLessEqual(
            disconnect_s, 5.0, f"host a's connection closed {disconnect_s:.2f}s after revocation"
        )
        fp = self.host_fp("a")
        self.assertTrue(self.log.matching("host a (", fp, "no longer authorized"), self.diagnostics())

        # Host b is untouched and keeps building.
        self.assertEqual(self.connections(b_names), b_kept)
        self.assertIs(self.ssh_transports()["b"], b_transport)
        await self.assertBuildsGreen([(p, "b") for p in PROJECTS])
        self.assertEqual(self.connections(b_names), b_kept)

        # Host a redials, is refused at key authentication, and keeps trying.
        await self.wait_for(
            lambda: len(self.log.matching("refused key", fp, "not in authorized_hosts")) >= 2,
            30,
            "host a's redials to be refused twice",
        )
        self.assertIn(f"refused this host's key {fp}", launcher_a.output())
        await self.assertStaysDetached(a_names, 2)
        for launcher in (launcher_a, launcher_b):
            self.assertAlive(launcher)
        self.assertNotIn("Traceback", launcher_a.output())
        figures(
            "revocation",
            refused_redials=len(self.log.matching("refused key", fp)),
            launcher_a_alive=launcher_a.process.poll() is None,
        )


class AddHostWithoutRestart(KeysTestCase):
    def test_new_host_connects_without_restart(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._add())

    async def _add(self) -> None:
        self.make_site(["a", "c"], authorized={"a": "proj-*-a"})
        master = await self.start_master(PROJECTS, ["a", "c"])
        listening = T.sshmux_service(master).listening_port
        a_names, c_names = names_for(PROJECTS, "a"), names_for(PROJECTS, "c")
        self.launch("a", a_names)
        await self.wait_attached(a_names)
        a_kept = self.connections(a_names)

        # Host c's launcher runs before c is authorized: refused, retrying.
        launcher_c = self.launch("c", c_names)
        pid = launcher_c.process.pid
        fp = self.host_fp("c")
        await self.wait_for(lambda: bool(self.log.matching("refused key", fp)), 30, "host c to be refused")
        await self.wait_for(
            lambda: "refused this host's key" in launcher_c.output(), 30, "c to see the refusal"
        )
        self.assertFalse(set(c_names) & T.attached_workers(master))

        # The administrator authorizes c with the CLI; the running master applies it.
        output = await self.run_admin(
            "authorize",
            str(self.site.master_basedir),
            "--host",
            "c",
            "--workers",
            "proj-*-c",
            f"{self.site.identities['c']}.pub",
        )
        self.assertIn(f"authorized host c ({fp})", output)
        authorized_at = reactor.seconds()
        attach_s = await self.wait_attached(c_names, timeout=60)
        await self.assertBuildsGreen([(p, "c") for p in PROJECTS])

        self.assertAlive(launcher_c)
        self.assertEqual(launcher_c.process.pid, pid, "the launcher was not restarted")
        self.assertIs(T.sshmux_service(master).listening_port, listening, "the master was not restarted")
        self.assertEqual(self.connections(a_names), a_kept, "host a is untouched")
        self.assertTrue(self.log.matching("authorized_hosts", "reloaded: 2 hosts"), self.diagnostics())
        figures(
            "new host",
            refusals_before=len(self.log.matching("refused key", fp)),
            authorized_to_attached_s=attach_s,
            authorize_then_builds_s=reactor.seconds() - authorized_at,
        )


class NarrowWorkers(KeysTestCase):
    expected_errors = ((UnauthorizedLogin, ""),)

    def test_narrowing_closes_the_forbidden_session_only(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._narrow())

    async def _narrow(self) -> None:
        self.make_site(["a"])
        await self.start_master(PROJECTS, ["a"])
        kept_name, dropped = "proj-1-a", "proj-2-a"
        launcher = self.launch("a", [kept_name, dropped])
        await self.wait_attached([kept_name, dropped])
        kept = self.connections([kept_name])
        transport = self.ssh_transports()["a"]

        text = self.site.authorized_hosts.read_text()
        self.assertIn('workers="proj-*-a"', text)
        write_atomically(self.site.authorized_hosts, text.replace('workers="proj-*-a"', 'workers="proj-1-a"'))
        narrowed_s = await self.wait_detached([dropped], timeout=15)
        fp = self.host_fp("a")
        self.assertTrue(
            self.log.matching(
                "host a (", fp, f"may no longer attach worker {dropped!r}", "closing its session"
            ),
            self.diagnostics(),
        )
        # Its retries are refused by the host's authorization.
        await self.wait_for(
            lambda: bool(self.log.matching("host a (", f"worker {dropped!r}", "login refused")),
            30,
            f"{dropped}'s next login to be refused",
        )
        await self.assertStaysDetached([dropped], 3)
        self.assertEqual(self.connections([kept_name]), kept, f"{kept_name} must stay attached")
        self.assertIs(self.ssh_transports().get("a"), transport, "host a's connection must stay up")
        await self.assertBuildsGreen([("proj-1", "a")])
        self.assertEqual(self.connections([kept_name]), kept)
        self.assertAlive(launcher)
        figures("narrowed workers=", narrowed_to_session_closed_s=narrowed_s)


class OldPinRefusesNewKey(KeysTestCase):
    def test_launcher_pinned_to_old_key_refuses_master(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._old_pin())

    async def _old_pin(self) -> None:
        self.make_site(["a"])
        old_fp = fingerprint(load_private_key(self.site.host_key_path))
        new_path, new_key = self.new_master_key("ed25519", "ssh_host_ed25519_key.new")
        new_fp = fingerprint(new_key)
        master = await self.start_master(PROJECTS, ["a"], host_keys=[new_path])
        names = names_for(PROJECTS, "a")
        launcher = self.launch("a", names)  # pinned to the site's (old) key

        mismatch = re.compile(
            rf"host key of 127\.0\.0\.1:\d+ is {re.escape(new_fp)}, expected {re.escape(old_fp)}"
        )

        def mismatch_lines() -> list[str]:
            return [line for line in launcher.output().splitlines() if mismatch.search(line)]

        await self.wait_for(lambda: len(mismatch_lines()) >= 2, 30, "the launcher to refuse the master twice")
        await self.assertStaysDetached(names, 2)
        self.assertEqual(T.attached_workers(master), set())
        self.assertAlive(launcher)
        output = launcher.output()
        # The refusal is said once per dial, in one line: every line naming the
        # offered key is the launcher's own refusal (no repr of a Failure, no traceback).
        offered = [line for line in output.splitlines() if new_fp in line]
        self.assertEqual(offered, mismatch_lines(), "\n".join(offered))
        self.assertTrue(
            all("[buildbot_sshmux.worker.link#error]" in line for line in offered), "\n".join(offered)
        )
        self.assertNotIn("Traceback", output)
        self.assertGreaterEqual(output.count("redialling master"), 1, self.diagnostics())
        self.assertNotIn("connected to master", output)
        # The launcher never authenticated: the master saw no host log in or be refused.
        fp = self.host_fp("a")
        self.assertEqual(self.log.matching(fp), [], "the launcher must stop before user authentication")
        self.assertEqual(self.ssh_transports(), {})
        figures("old pin", refusal=mismatch_lines()[0].strip(), refusals=len(mismatch_lines()))


class RotationTwoHostKeys(KeysTestCase):
    def test_old_and_new_pins_both_connect(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._rotation())

    async def _rotation(self) -> None:
        hosts = ["a", "b", "c", "d"]
        self.make_site(hosts)
        old_line = self.site.host_key_line
        new_path, new_key = self.new_master_key("ecdsa", "ssh_host_ecdsa_key")
        new_line = public_line(new_key)
        master = await self.start_master(["proj-1"], hosts, host_keys=[self.site.host_key_path, new_path])
        port = T.ssh_port(master)

        # The administrator distributes the new key with `buildbot-sshmux hostkey`.
        printed = await self.run_admin(
            "hostkey", str(self.site.master_basedir), "--address", f"127.0.0.1:{port}", "--key", str(new_path)
        )
        self.assertIn(f"[127.0.0.1]:{port} {new_line}", printed)
        self.assertNotIn(old_line, printed)

        self.launch("a", ["proj-1-a"], pin=old_line)  # not moved yet: pins the old ed25519 key
        self.launch("b", ["proj-1-b"], pin=new_line)  # moved: pins the new ecdsa key
        self.launch("c", ["proj-1-c"], known_hosts=printed)  # known_hosts from the CLI (new key)
        self.launch(
            "d", ["proj-1-d"], known_hosts=hashed_known_hosts_line(f"[127.0.0.1]:{port}", new_line) + "\n"
        )
        names = names_for(["proj-1"], "a") + names_for(["proj-1"], "b") + names_for(["proj-1"], "c")
        names += names_for(["proj-1"], "d")
        attach_s = await self.wait_attached(names, timeout=60)

        # Each launcher negotiated the key type it pinned.
        negotiated = {h: t.keyAlg.decode() for h, t in self.ssh_transports().items()}
        self.assertEqual(
            negotiated,
            {
                "a": "ssh-ed25519",
                "b": "ecdsa-sha2-nistp256",
                "c": "ecdsa-sha2-nistp256",
                "d": "ecdsa-sha2-nistp256",
            },
        )
        for launcher in self.launchers:
            self.assertNotIn("host key of", launcher.output())
            self.assertEqual(launcher.output().count("connected to master"), 1, self.diagnostics())
            self.assertAlive(launcher)
        await self.assertBuildsGreen([("proj-1", h) for h in hosts])
        figures("rotation", attach_s=attach_s, negotiated=negotiated)


class ReconfigInlineHosts(KeysTestCase):
    def test_reconfig_adds_an_inline_host(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._reconfig())

    async def _reconfig(self) -> None:
        self.make_site(["a", "c"], authorized={"a": "proj-*-a"})
        master = await self.start_master(PROJECTS, ["a", "c"])
        service = T.sshmux_service(master)
        listening = service.listening_port
        a_names, c_names = names_for(PROJECTS, "a"), names_for(PROJECTS, "c")
        self.launch("a", a_names)
        await self.wait_attached(a_names)
        a_kept = self.connections(a_names)
        a_transport = self.ssh_transports()["a"]

        launcher_c = self.launch("c", c_names)
        fp = self.host_fp("c")
        await self.wait_for(lambda: bool(self.log.matching("refused key", fp)), 30, "host c to be refused")

        # `buildbot reconfig` with master.cfg now listing c inline.
        master.config_loader.config_dict = self.config(
            PROJECTS, ["a", "c"], inline_hosts=[self.host_line("c", "proj-*-c")]
        )
        reconfig_at = reactor.seconds()
        await master.reconfig()
        self.assertTrue(self.log.matching("configuration update complete"), self.diagnostics())
        self.assertIs(T.sshmux_service(master), service)
        self.assertIs(service.listening_port, listening, "the SSH port must not be reopened")
        self.assertEqual(
            sorted((e.name, e.source) for e in service.entries),
            [("a", str(self.site.authorized_hosts) + ":1"), ("c", "SSHMuxService(hosts=...):1")],
        )

        attach_s = await self.wait_attached(c_names, timeout=60)
        await self.assertBuildsGreen([(p, "c") for p in PROJECTS])
        self.assertEqual(self.connections(a_names), a_kept, "host a is untouched by the reconfig")
        self.assertIs(self.ssh_transports()["a"], a_transport)
        self.assertAlive(launcher_c)
        figures(
            "reconfig inline hosts", reconfig_to_attached_s=reactor.seconds() - reconfig_at, attach_s=attach_s
        )
