"""``ssh-worker``: run this host's worker sessions over one SSH connection per master."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from buildbot_sshmux.cli import add_version, plain, run
from buildbot_sshmux.errors import KeyFileError, SSHMuxError
from buildbot_sshmux.wire.address import parse_address
from buildbot_sshmux.wire.defaults import EXAMPLE_HOST, IDENTITY_FILE, PB_PORT, SSH_PORT


def cmd_run(args: argparse.Namespace) -> int:
    from buildbot_sshmux.worker import runner

    return runner.run(args.config, debug=args.debug, stop_timeout=args.stop_timeout, logfile=args.logfile)


def cmd_import(args: argparse.Namespace) -> int:
    from buildbot_sshmux.worker import importer

    skipped = importer.import_dirs(Path(args.config).absolute(), [Path(d) for d in args.dirs], sys.stdout)
    return 1 if skipped else 0


def _control_path(args: argparse.Namespace) -> Path:
    from buildbot_sshmux.worker import config as launcher_config

    return launcher_config.control_path_of(Path(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from buildbot_sshmux.wire import control

    status = control.request(_control_path(args), "GET", "status")
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True))
    else:
        print(format_status(status))
    return 0 if all(m["connected"] for m in status["masters"]) else 1


def format_status(status: dict[str, Any]) -> str:
    """``ssh-worker status`` as text: one line per master, then per session."""
    lines = [f"launcher {status['config']} (pid {status['pid']})"]
    for m in status["masters"]:
        rtt = m["keepalive_rtt_ms"]
        state = f"connected for {m['connected_for_s']:.0f}s" if m["connected"] else "NOT CONNECTED"
        if m["draining"]:
            state += ", draining"
        if rtt["last"] is not None:
            state += f", keepalive rtt {rtt['last']:.1f} ms (median {rtt['median']:.1f})"
        error = m["last_error"]
        if error is not None:
            state += f"; last error {error['ago_s']:.0f}s ago: {error['text']}"
        lines.append(f"master {m['name']}{' (' + m['cluster'] + ')' if m['cluster'] else ''}: {state}")
    attached = sum(s["attached"] for s in status["sessions"])
    lines.append(f"sessions: {attached} attached of {len(status['sessions'])}")
    for s in status["sessions"]:
        where = f"on {s['master']}" if s["attached"] else "NOT ATTACHED"
        flags = [f for f in ("busy", "moving") if s[f]]
        refusal = s["last_refusal"]
        extra = f"; last refusal {refusal['ago_s']:.0f}s ago: {refusal['text']}" if refusal else ""
        lines.append(f"  {s['name']}: {where}{' (' + ', '.join(flags) + ')' if flags else ''}{extra}")
    for f in status.get("forwards", []):
        state = "listening" if f["listening"] else "NOT LISTENING (see the log)"
        lines.append(f"forward {f['listen']}: {state}, {f['connections']} connections")
    return "\n".join(lines)


def cmd_reload(args: argparse.Namespace) -> int:
    from buildbot_sshmux.wire import control

    summary = control.request(_control_path(args), "POST", "reload", timeout=120)
    print(", ".join(f"{k.replace('_', ' ')}: {len(v)}" for k, v in sorted(summary.items())))
    return 0


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (an exited one its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def cmd_stop(args: argparse.Namespace) -> int:
    import time

    from buildbot_sshmux.wire import control

    path = _control_path(args)
    query = {"graceful": 1, "timeout": args.timeout} if args.graceful else {}
    answer = control.request(path, "POST", "stop", **query)
    left = answer["sessions_left"]
    if args.graceful:
        print(f"stopping once the builds of {len(left)} sessions have finished (at most {args.timeout:.0f}s)")
    else:
        print("stopping now")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + (args.timeout if args.graceful else 0) + 60
    while time.monotonic() < deadline:  # as `buildbot-worker stop`: return once it is gone
        if not _alive(answer["pid"]):
            print("stopped")
            return 0
        time.sleep(0.2)
    raise SSHMuxError(f"the launcher of {args.config} is still running; see its log")


def cmd_keygen(args: argparse.Namespace) -> int:
    import getpass

    from buildbot_sshmux.wire.keys import fingerprint, generate_ed25519, public_line, write_private_key

    path = Path(args.path)
    if path.exists():
        raise SSHMuxError(f"{path} exists; choose another path or remove it first")
    stale = Path(f"{path}-cert.pub")
    if stale.exists():  # it certifies another key: the launcher would offer it with the new one
        raise SSHMuxError(f"{stale} exists and certifies another key; remove it first")
    passphrase = None
    if args.passphrase:
        passphrase = getpass.getpass("passphrase for the new key: ").encode("utf-8")
        if getpass.getpass("the same passphrase again: ").encode("utf-8") != passphrase:
            raise KeyFileError("the two passphrases differ; nothing was written, run keygen again")
    comment = args.comment or _default_comment()
    key = generate_ed25519()
    write_private_key(path, key, comment, passphrase)
    print(f"wrote {path} (mode 0600) and {path}.pub; fingerprint {fingerprint(key)}")
    print("send this line to the master's administrator:")
    print(public_line(key, comment))
    print(f"(with a certificate authority: have {path}.pub signed, and put the certificate in {stale};")
    print(" ssh-worker offers it first)")
    return 0


INIT_TEMPLATE = """\
# ssh-worker configuration: run with `ssh-worker run {config}`
[master]
address = "{address}"
host_key = "{fingerprint}"     # the master's key, pinned (`buildbot-sshmux hostkey` prints it)
identity = "{identity}"        # this host's private key (`ssh-worker keygen {identity}`), mode 0600
pb_port = {pb_port}                     # the master's c['protocols']['pb'] port
{workers}"""

WORKER_TEMPLATE = """
[[worker]]
name = "{name}"
password_file = "passwords/{name}"   # the worker's password on the master, one line
basedir = "workers/{name}"
"""


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.config)
    if path.exists():
        raise SSHMuxError(f"{path} exists; remove it or choose another file")
    if not args.fingerprint.startswith("SHA256:"):
        raise SSHMuxError("--fingerprint must be the master's SHA256:... host key fingerprint")
    try:
        parse_address(args.master)  # HOST alone is port 2222, as in the TOML
    except ValueError as e:
        raise SSHMuxError(f"--master must be HOST[:PORT], e.g. {EXAMPLE_HOST}:{SSH_PORT}: {e}") from None
    workers = "".join(WORKER_TEMPLATE.format(name=n) for n in args.worker) or (
        '\n# add one table per worker session:\n# [[worker]]\n# name = "..."\n'
        '# password_file = "passwords/..."\n# basedir = "workers/..."\n'
    )
    path.write_text(
        INIT_TEMPLATE.format(
            config=path,
            address=args.master,
            fingerprint=args.fingerprint,
            identity=args.identity,
            pb_port=args.pb_port,
            workers=workers,
        )
    )
    print(f"wrote {path}")
    if not Path(path.parent, args.identity).exists():
        print(f"next: ssh-worker keygen {Path(path.parent, args.identity)}")
    for name in args.worker:
        print(f"next: put {name}'s password in {Path(path.parent, 'passwords', name)}")
    return 0


def _default_comment() -> str:
    import socket

    return socket.gethostname()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssh-worker", description=plain(__doc__))
    add_version(p, "buildbot-worker")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every worker session of CONFIG.toml")
    run.add_argument("config", help="launcher configuration (TOML)")
    run.add_argument("--stop-timeout", type=float, default=10.0, help="seconds to wait for a clean stop")
    run.add_argument("--debug", action="store_true", help="log SSH protocol details too")
    run.add_argument(
        "--logfile", help="log to this file (rotated at 10 MB, 10 kept; reopened on SIGHUP), not stdout"
    )
    run.set_defaults(func=cmd_run)
    imp = sub.add_parser("import", help="add existing buildbot-worker directories to CONFIG.toml, in place")
    imp.add_argument("config", help="launcher configuration (TOML), made by ssh-worker init")
    imp.add_argument("dirs", nargs="+", metavar="WORKER_DIR", help="a directory holding a buildbot.tac")
    imp.set_defaults(func=cmd_import)
    status = sub.add_parser("status", help="what the running launcher of CONFIG.toml is connected to")
    status.add_argument("config", help="launcher configuration (TOML)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)
    reload = sub.add_parser("reload", help="make the running launcher apply its edited config (as SIGHUP)")
    reload.add_argument("config", help="launcher configuration (TOML)")
    reload.set_defaults(func=cmd_reload)
    stop = sub.add_parser("stop", help="stop the running launcher of CONFIG.toml")
    stop.add_argument("config", help="launcher configuration (TOML)")
    stop.add_argument("--graceful", action="store_true", help="let running builds finish first (as SIGUSR1)")
    stop.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for builds (default 3600)"
    )
    stop.add_argument("--no-wait", action="store_true", help="return at once, not once it has stopped")
    stop.set_defaults(func=cmd_stop)
    keygen = sub.add_parser("keygen", help="make this host's SSH key (ed25519, mode 0600)")
    keygen.add_argument("path", nargs="?", default=IDENTITY_FILE)
    keygen.add_argument("--comment", help="key comment, the host name by default")
    keygen.add_argument("--passphrase", action="store_true", help="ask for a passphrase")
    keygen.set_defaults(func=cmd_keygen)
    init = sub.add_parser("init", help="write a launcher config pinned to a master's host key")
    init.add_argument("config", help="the config file to write")
    init.add_argument(
        "--master", required=True, help=f"HOST[:PORT] of the master's SSH server (port {SSH_PORT} if none)"
    )
    init.add_argument("--fingerprint", required=True, help="the master's host key, SHA256:...")
    init.add_argument("--identity", default=IDENTITY_FILE, help="this host's private key file")
    init.add_argument("--pb-port", type=int, default=PB_PORT, help="the master's PB port")
    init.add_argument("--worker", action="append", default=[], help="a worker name (repeat)")
    init.set_defaults(func=cmd_init)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
