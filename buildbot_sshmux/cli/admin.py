"""``buildbot-sshmux``: the master side's admin commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from buildbot_sshmux.cli import add_version, ca, hosts, plain, run
from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.wire.address import parse_address
from buildbot_sshmux.wire.defaults import EXAMPLE_HOST, MASTER_CONTROL_SOCKET, PB_PORT, SSH_PORT

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


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from buildbot_sshmux.wire import control

    basedir = Path(args.basedir)
    if not basedir.is_dir():
        raise SSHMuxError(f"{basedir} is not a directory; give the Buildbot master's basedir")
    path = Path(basedir, os.path.expanduser(args.socket))
    try:
        status = control.request(path, "GET", "status")
    except control.NotRunning as e:
        why = str(e).removeprefix("nothing is running: ")
        raise SSHMuxError(f"no master is running in {basedir} ({why})") from None
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True))
    else:
        print(format_status(status))
    return 1 if status["not_connected"] else 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _both_ways(pair: dict[str, str | None]) -> str:
    if pair["in"] == pair["out"]:
        return f"{pair['in']} both ways"
    return f"{pair['in']} in, {pair['out']} out"


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda c: (-c[1], c[0])))


def format_status(status: dict[str, Any]) -> str:
    """``buildbot-sshmux status`` as text: the master, each connected host, then the others."""
    import time

    keys = ", ".join(status["host_keys"]) or "none"
    draining = "; DRAINING (a clean shutdown: hosts move their sessions)" if status["draining"] else ""
    lines = [
        f"master {status['basedir']} (pid {status['pid']}): SSH on {status['listening'] or 'no port'},"
        f" host key {keys}{draining}",
        f"hosts connected: {len(status['hosts'])}"
        + (
            f" ({status['connections_not_logged_in']} connections not logged in yet)"
            if status["connections_not_logged_in"]
            else ""
        ),  # fmt: skip
    ]
    for h in status["hosts"]:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["connected_since"]))
        lines.append(f"host {h['name']} ({h['fingerprint']}) from {h['address']}"
                     + (" (REPLACED: closing)" if h["replaced"] else ""))  # fmt: skip
        lines.append(f"  connected since {since} ({_duration(h['connected_for_s'])}); {h['client_version']}")
        lines.append(
            f"  kex {h['kex']}, host key {h['host_key_algorithm']}, cipher {_both_ways(h['cipher'])},"
            f" mac {_both_ways(h['mac'])}"
        )
        rtt = h["keepalive_rtt_ms"]
        keepalive = (
            f"keepalive rtt {rtt['last']:.1f} ms (median {rtt['median']:.1f})"
            if rtt["last"] is not None
            else "no keepalive answered yet"
        )
        rekey = (
            f"{h['rekeys']} rekeys, the last {_duration(h['last_rekey_ago_s'])} ago"
            if h["last_rekey_ago_s"] is not None
            else "no rekey yet"
        )
        backlog = f", {_size(h['backlog_bytes'])} held" if h["backlog_bytes"] else ""
        lines.append(
            f"  {_size(h['bytes']['received'])} received, {_size(h['bytes']['sent'])} sent{backlog};"
            f" {keepalive}; {rekey}"
        )
        sessions = h["sessions"]
        states = {state: sum(1 for s in sessions if s["state"] == state)
                  for state in ("attached", "logging in", "refused")}  # fmt: skip
        summary = ", ".join(f"{n} {state}" for state, n in states.items() if n) or "none"
        lines.append(f"  sessions: {summary}")
        width = max((len(s["worker"] or "?") for s in sessions), default=0)
        for s in sessions:
            extra = ""
            if s["reason"] is not None:
                ago = f", {_duration(s['ago_s'])} ago" if s["ago_s"] is not None else ""
                extra = f" ({s['reason']}{ago})"
            lines.append(f"    {(s['worker'] or '?').ljust(width)}  {s['state']}{extra}")
        if h["refusals_last_hour"]:
            lines.append(f"  refusals in the last hour: {_reasons(h['refusals_last_hour'])}")
    lines.append(f"authorized, not connected: {len(status['not_connected'])}")
    for e in status["not_connected"]:
        seen = e["last_seen"]
        when = (f"last connected {_duration(seen['ago_s'])} ago from {seen['address']}"
                if seen is not None else "not connected since the master started")  # fmt: skip
        refusals = (
            f"; refusals in the last hour: {_reasons(e['refusals_last_hour'])}"
            if e["refusals_last_hour"]
            else ""
        )
        lines.append(f"  {e['name']} ({e['fingerprint']}) workers={','.join(e['workers'])}; {when}{refusals}")
    total = status["refusals_last_hour"]
    lines.append(
        f"refusals in the last hour, all hosts and unknown keys: {_reasons(total) if total else 'none'}"
    )
    return "\n".join(lines)


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
    status = sub.add_parser(
        "status", help="what the running master's SSH server knows: each host, its sessions, refusals"
    )
    status.add_argument("basedir", help="the Buildbot master's basedir")
    status.add_argument("--json", action="store_true", help="print JSON (SSHMuxService.status())")
    status.add_argument(
        "--socket",
        default=MASTER_CONTROL_SOCKET,
        help=f"the master's control socket, relative to BASEDIR (default {MASTER_CONTROL_SOCKET})"
        " or absolute: SSHMuxService(control_socket=...)",
    )
    status.set_defaults(func=cmd_status)
    hosts.add_parsers(sub)
    ca.add_parsers(sub)
    # The demo's own parser (buildbot_sshmux.demo.run.parser) reads its options: -h, --projects,
    # --keep, --cluster, and reports a bad one in one line, exit 2.  No argument can hold a NUL, so with
    # prefix_chars="\0" none looks like an option here and all of them reach that parser.
    demo = sub.add_parser(
        "demo",
        help="run the demo: a master, two worker hosts, builds; --cluster: three masters, one killed"
        " mid-build (its options: demo --help)",
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
