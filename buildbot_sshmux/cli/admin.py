"""``buildbot-sshmux``: the master side's admin commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from buildbot_sshmux.cli import add_version, ca, hosts, plain, run
from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.wire.address import parse_address
from buildbot_sshmux.wire.defaults import EXAMPLE_HOST, PB_PORT, SSH_PORT

SNIPPET = """\
from buildbot_sshmux import SSHMuxService
c['protocols'] = {{'pb': {{'port': 'tcp:{pb_port}:interface=127.0.0.1'}}}}
c['services'].append(SSHMuxService(
    port='tcp:{port}',
    host_keys=['sshmux/{key}'],
    authorized_hosts='sshmux/authorized_hosts'))"""


PLACEHOLDER = f"{EXAMPLE_HOST}:{SSH_PORT}"


def split_address(address: str | None) -> tuple[str, str]:
    """``--address HOST[:PORT]`` (``[v6]:PORT`` too) as (host, port); SSHMuxError if malformed.

    Without ``--address`` the lines printed name a placeholder, and say so."""
    if address is None:
        print(f"no --address given: {PLACEHOLDER} below is a placeholder; give --address HOST[:PORT]")
        address = PLACEHOLDER
    try:
        host, port = parse_address(address)
    except ValueError as e:
        raise SSHMuxError(f"--address must be HOST[:PORT], e.g. {PLACEHOLDER}: {e}") from None
    return host, str(port)


def known_hosts_name(host: str, port: str) -> str:
    """How OpenSSH's known_hosts names a host and port."""
    return host if port == "22" else f"[{host}]:{port}"


def cmd_init(args: argparse.Namespace) -> int:
    from buildbot_sshmux.wire.keys import fingerprint, generate, public_line, write_private_key

    host, port = split_address(args.address)
    basedir = Path(args.basedir)
    if not basedir.is_dir():
        raise SSHMuxError(f"{basedir} is not a directory; create the master first (buildbot create-master)")
    sshmux = basedir / "sshmux"
    sshmux.mkdir(mode=0o700, exist_ok=True)
    key_path = sshmux / f"ssh_host_{args.type}_key"
    if key_path.exists():
        raise SSHMuxError(f"{key_path} exists: this master already has a {args.type} host key")
    key = generate(args.type)
    write_private_key(key_path, key, "buildbot-sshmux host key")
    hosts = sshmux / "authorized_hosts"
    wrote = [str(key_path)]
    if not hosts.exists():
        wrote.append(str(hosts))
        fd = os.open(hosts, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                '# one line per worker host: host="NAME",workers="GLOB,..." ssh-ed25519 AAAA... comment\n'
            )
    print(f"wrote {' and '.join(wrote)} (mode 0600)")
    print(f"host key fingerprint: {fingerprint(key)}")
    print("known_hosts line for worker hosts:")
    print(f"{known_hosts_name(host, port)} {public_line(key)}")
    print("add to master.cfg:")
    print(SNIPPET.format(port=port, pb_port=PB_PORT, key=key_path.name))
    return 0


def cmd_hostkey(args: argparse.Namespace) -> int:
    from buildbot_sshmux.wire.keys import fingerprint, load_private_key, public_line

    paths = [Path(p) for p in args.key] or sorted(Path(args.basedir, "sshmux").glob("ssh_host_*_key"))
    if not paths:
        raise SSHMuxError(f"no host key in {args.basedir}/sshmux; make one with: buildbot-sshmux init")
    host, port = split_address(args.address)
    name = known_hosts_name(host, port)
    for path in paths:
        key = load_private_key(path)
        print(f"# {path.name}: {fingerprint(key)}")
        print(f"{name} {public_line(key)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``buildbot-sshmux demo [OPTIONS]``: every argument goes to the demo's own parser."""
    from buildbot_sshmux.demo import run as demo

    return demo.main(args.demo_args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="buildbot-sshmux", description=plain(__doc__))
    add_version(p, "buildbot")
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="make the master's SSH host key and authorized_hosts")
    init.add_argument("basedir", help="the Buildbot master's basedir")
    init.add_argument("--address", help=f"HOST[:PORT] workers dial (port {SSH_PORT} if none)")
    init.add_argument("--type", choices=["ed25519", "ecdsa", "rsa"], default="ed25519")
    init.set_defaults(func=cmd_init)
    hostkey = sub.add_parser("hostkey", help="print known_hosts lines of the master's host keys")
    hostkey.add_argument("basedir", help="the Buildbot master's basedir")
    hostkey.add_argument("--address", help=f"HOST[:PORT] workers dial (port {SSH_PORT} if none)")
    hostkey.add_argument(
        "--key", action="append", default=[], help="a host key file (default: all in BASEDIR/sshmux)"
    )
    hostkey.set_defaults(func=cmd_hostkey)
    hosts.add_parsers(sub)
    ca.add_parsers(sub)
    # The demo's own parser (buildbot_sshmux.demo.run.parser) reads its options: -h, --projects,
    # --keep, and reports a bad one in one line, exit 2.  No argument can hold a NUL, so with
    # prefix_chars="\0" none looks like an option here and all of them reach that parser.
    demo = sub.add_parser(
        "demo",
        help="run the demo: a master, two worker hosts, builds (its options: demo --help)",
        add_help=False,
        prefix_chars="\0",
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
