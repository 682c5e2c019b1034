"""Logs an operator can act on, and no secret in any of them.

One run provokes each event the master must log: a host connects, a key that
is not authorized is refused, a host asks for a worker name it may not use,
its link is blackholed (keepalive loss), it reconnects, the link is cut, it
reconnects again.  Each event must be one line naming the host, its key
fingerprint and its peer address (an unknown key has no host name: its
fingerprint and address).  Then every log (the master's and the launchers')
is searched for the worker passwords and the private keys' material.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor

from buildbot_sshmux.demo import harness as T
from buildbot_sshmux.wire.keys import load_private_key
from tests import support as S

from .harness import FaultCase, figures
from .relay import FaultRelay

INTERVAL, COUNT = 1, 3
PEER = re.compile(r"127\.0\.0\.1:\d+")
# Before a key is known the master logs the peer's IP only (the port is in the
# connection's other lines); it is the address from= rules are checked against.
PEER_IP = re.compile(r"from 127\.0\.0\.1\b")


def secrets_of_key(path: Path) -> list[str]:
    """Strings that would betray a private key: its file's base64 lines, its raw bytes."""
    body = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("-----")
    ]
    # The first line starts with the format's fixed header ("openssh-key-v1" and
    # the public key): the secret is in the others.
    found = body[1:]
    key = load_private_key(path)._keyObject
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    found += [raw.hex(), base64.b64encode(raw).decode().rstrip("="), repr(raw)[2:-1]]
    return found


class OperatorLogs(FaultCase):
    timeout = 120
    # Twisted PB logs each refused login (as over plain TCP).
    expected_errors = ((UnauthorizedLogin, ""),)

    def test_each_event_is_one_line_with_host_fingerprint_and_peer_and_no_secret(
        self,
    ) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._logs())

    async def _logs(self) -> None:
        projects = ["alpha", "beta"]
        self.make_site(["hosta", "hostb", "hostz"])
        # hostz's key is not authorized at all.
        entries = self.site.authorized_hosts.read_text().splitlines()
        self.site.authorized_hosts.write_text("\n".join(e for e in entries if 'host="hostz"' not in e) + "\n")
        master = await self.start_master(
            projects,
            ["hosta", "hostb"],
            service_kwargs={"keepalive_interval": INTERVAL, "keepalive_count_max": COUNT},
        )
        own = [T.worker_name(p, "hosta") for p in projects]
        foreign = T.worker_name("alpha", "hostb")
        fp_a, fp_z = S.host_fingerprint(self.site, "hosta"), S.host_fingerprint(self.site, "hostz")
        relay = FaultRelay(reactor, "127.0.0.1", T.ssh_port(master))
        await relay.start()
        self.addCleanup(lambda: defer.ensureDeferred(relay.stop()))

        launcher_a = self.launch("hosta", own + [foreign], ssh_port=relay.port, keepalive=(INTERVAL, COUNT))
        await self.wait_ready(own)
        await self.wait_for(
            lambda: self.log.matching("host hosta (", repr(foreign), "login refused"),
            30,
            "the refusal of a foreign name",
        )
        launcher_z = self.launch("hostz", [T.worker_name("alpha", "hostz")])
        await self.wait_for(lambda: self.log.matching("refused key", fp_z), 30, "hostz's key to be refused")
        await self.wait_for(lambda: "refused this host's key" in launcher_z.output(), 30, "hostz to say so")

        relay.blackhole()
        await self.wait_for(
            lambda: not self.ssh_connections("hosta"), 10, "the master to drop the blackholed link"
        )
        await self.wait_for(lambda: "no answer to" in launcher_a.output(), 10, "the launcher to drop it too")
        relay.restore()
        await self.wait_for(
            lambda: len(self.log.matching("host hosta (", " connected")) >= 2, 30, "the reconnect"
        )
        await self.wait_ready(own)  # a cut while Buildbot attaches would log its own traceback
        relay.cut()
        await self.wait_for(
            lambda: len(self.log.matching("host hosta (", " connected")) >= 3, 30, "the 2nd reconnect"
        )
        await self.wait_ready(own)
        await self.assertBuildsGreen([(p, "hosta") for p in projects])
        for launcher in (launcher_a, launcher_z):
            await S.stop_launcher(reactor, launcher)
        await self.wait_for(
            lambda: not T.sshmux_service(master).connection_count, 10, "every host to disconnect"
        )

        # -- the master's lines, one per event ----------------------------------
        events = {
            "connect": self.log.matching("host hosta (", fp_a, " connected"),
            "disconnect": self.log.matching("host hosta (", fp_a, " disconnected"),
            "auth refused (unknown key)": self.log.matching("refused key", fp_z, "not in authorized_hosts"),
            "worker name refused": self.log.matching("host hosta (", fp_a, repr(foreign), "login refused"),
            "keepalive loss": self.log.matching("host hosta (", fp_a, "no answer to", "keepalives"),
        }
        counts = {kind: len(found) for kind, found in events.items()}
        self.assertGreaterEqual(
            counts["connect"], 3, "a connect line for the first connection and each reconnect"
        )
        self.assertGreaterEqual(counts["disconnect"], 3)
        self.assertEqual(counts["keepalive loss"], 1)
        for kind, found in events.items():
            self.assertTrue(found, f"no log line for: {kind}")
            for line in found:
                text = line.rstrip("\n")
                self.assertNotIn("\n", text, f"{kind}: not one line: {text!r}")
                self.assertNotIn("Traceback", text)
                if kind == "auth refused (unknown key)":
                    self.assertTrue(PEER_IP.search(text), f"{kind}: no peer address in {text!r}")
                else:
                    self.assertTrue(
                        PEER.search(text), f"{kind}: no peer address (127.0.0.1:PORT) in {text!r}"
                    )
                    self.assertIn("host hosta (", text, f"{kind}: no host name in {text!r}")

        # -- the launcher's lines ------------------------------------------------
        out_a, out_z = launcher_a.output(), launcher_z.output()
        master_address = f"127.0.0.1:{relay.port}"
        launcher_events = {
            "connect": [line for line in out_a.splitlines() if "connected to master" in line],
            "keepalive loss": [line for line in out_a.splitlines() if "no answer to" in line],
            "key refused": [line for line in out_z.splitlines() if "refused this host's key" in line],
        }
        for kind, found in launcher_events.items():
            self.assertTrue(found, f"launcher: no log line for {kind}")
            for line in found:
                self.assertIn(master_address if kind != "key refused" else "127.0.0.1:", line)
                self.assertIn(
                    fp_a if kind != "key refused" else fp_z, line, f"launcher {kind}: no fingerprint"
                )
        self.assertGreaterEqual(len(launcher_events["connect"]), 3)
        self.assertIn(f"lost connection to master {master_address}", out_a)

        # -- no secret anywhere ------------------------------------------------------
        passwords = [
            T.WORKER_PASSWORD.format(name=n) for n in own + [foreign, T.worker_name("alpha", "hostz")]
        ]
        keys = {
            "master host key": self.site.host_key_path,
            **{f"{h} key": self.site.identities[h] for h in ("hosta", "hostb", "hostz")},
        }
        logs = {
            "master": "".join(self.log.lines),
            "hosta launcher": out_a,
            "hostz launcher": out_z,
        }
        leaks = []
        for where, text in logs.items():
            leaks += [f"{where}: password {p!r}" for p in passwords if p in text]
            for what, path in keys.items():
                leaks += [f"{where}: {what} material" for s in secrets_of_key(path) if s in text]
        self.assertEqual(leaks, [], "secrets in the logs")
        figures(
            "operator logs",
            master_lines_per_event=counts,
            launcher_lines_per_event={k: len(v) for k, v in launcher_events.items()},
            log_bytes_scanned={k: len(v) for k, v in logs.items()},
            secrets_searched=len(passwords) + sum(len(secrets_of_key(p)) for p in keys.values()),
            secrets_found=len(leaks),
            example_keepalive_loss=events["keepalive loss"][0].split("] ", 1)[-1].strip(),
            example_refusal=events["worker name refused"][0].split("] ", 1)[-1].strip(),
        )
