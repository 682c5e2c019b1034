"""``ssh-worker``: run this host's worker sessions over one SSH connection per master."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from buildbot_sshmux.cli import add_version, plain, run
from buildbot_sshmux.errors import KeyFileError, SSHMuxError
from buildbot_sshmux.wire.address import parse_address
from buildbot_sshmux.wire.defaults import EXAMPLE_HOST, IDENTITY_FILE, PB_PORT, SSH_PORT


def cmd_run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from buildbot_sshmux.wire.transport import BoundedLogger
    from buildbot_sshmux.worker import config as launcher_config
    from buildbot_sshmux.worker.launcher import Launcher

    config = launcher_config.load(args.config)
    launcher = Launcher(config, reactor)
    level = LogLevel.debug if args.debug else LogLevel.info
    BoundedLogger.show_debug = args.debug  # Conch's protocol lines too
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor.callWhenRunning(launcher.startService)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: launcher.stop_within(reactor, args.stop_timeout)
    )
    reactor.run()
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import getpass

    from buildbot_sshmux.wire.keys import fingerprint, generate_ed25519, public_line, write_private_key

    path = Path(args.path)
    if path.exists():
        raise SSHMuxError(f"{path} exists; choose another path or remove it first")
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
    run.set_defaults(func=cmd_run)
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
