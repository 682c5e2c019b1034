"""``buildbot-sshmux authorize|revoke|list``: edit and show the master's authorized_hosts.

``BASEDIR`` names a master and its ``sshmux/authorized_hosts``; ``--file
/ABSOLUTE/PATH`` names a cluster's shared file instead, and needs no BASEDIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twisted.conch.ssh import keys

from buildbot_sshmux.cli import intermixed
from buildbot_sshmux.errors import SSHMuxError
from buildbot_sshmux.master import authorized_hosts
from buildbot_sshmux.master.authorized_hosts import LineError
from buildbot_sshmux.wire.keys import parse_public_line

DEFAULT_FILE = "sshmux/authorized_hosts"


def hosts_file(args: argparse.Namespace, must_exist: bool = True) -> Path:
    """The file to edit: ``--file`` if absolute (a cluster's shared file), else BASEDIR/--file."""
    file = Path(args.file).expanduser()
    if file.is_absolute():
        path, remedy = file, "give the path that every master's SSHMuxService(authorized_hosts=...) names"
    elif args.basedir is None:
        raise SSHMuxError(
            "give the master's BASEDIR, or --file with an absolute path (the authorized_hosts"
            " that every master of a cluster names)"
        )
    else:
        path, remedy = Path(args.basedir, file), f"run: buildbot-sshmux init {args.basedir}"
    if must_exist and not path.exists():
        raise SSHMuxError(f"{path} does not exist; {remedy}")
    if not path.parent.is_dir():
        raise SSHMuxError(f"{path.parent} does not exist; {remedy}")
    return path


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


def _read_public_key(source: str) -> tuple[keys.Key, str]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    if "PRIVATE KEY-----" in text:  # a multi-line key file: say so, not "found N lines"
        raise SSHMuxError(f"{source} is a private key; give the .pub file")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1:
        raise SSHMuxError(f"{source}: expected one public key line, found {len(lines)}")
    try:
        return parse_public_line(lines[0])
    except ValueError as e:
        raise SSHMuxError(f"{source}: {e}") from None


def cmd_authorize(args: argparse.Namespace) -> int:
    path = hosts_file(args, must_exist=False)
    if args.cert_authority == bool(args.host):
        raise SSHMuxError(
            "give --host NAME for a host's key, or --cert-authority for a CA's key (its certificates name their hosts)"
        )
    if args.principals and not args.cert_authority:
        raise SSHMuxError("--principals is for --cert-authority: the host names the CA may certify")
    key, comment = _read_public_key(args.pubkey)
    workers = _split(args.workers)
    if not workers:
        raise SSHMuxError("--workers needs at least one pattern, e.g. --workers '*-debian-sid'")
    try:
        line = authorized_hosts.format_entry(
            args.host or "",
            key,
            workers,
            _split(args.from_),
            args.max_channels,
            comment,
            cert_authority=args.cert_authority,
            principals=_split(args.principals),
        )
        authorized_hosts.add_entry(path, line)
    except LineError as e:
        raise SSHMuxError(f"{path}: {e}") from None
    except authorized_hosts.EditError as e:
        raise SSHMuxError(str(e)) from None
    entry = authorized_hosts.parse_line(line)
    assert entry is not None
    if args.cert_authority:
        print(
            f"authorized CA {entry.name} ({entry.fingerprint}) for worker names {','.join(workers)} in {path}"
        )
    else:
        print(f"authorized host {args.host} ({entry.fingerprint}) in {path}")
    print(f"every running master whose authorized_hosts is {path} applies it within seconds")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    path = hosts_file(args)
    if bool(args.host) == bool(args.fingerprint):
        raise SSHMuxError("say which host to revoke: --host NAME or --fingerprint SHA256:...")
    try:
        removed = authorized_hosts.remove_entries(path, host=args.host, key_fingerprint=args.fingerprint)
    except authorized_hosts.EditError as e:
        raise SSHMuxError(str(e)) from None
    if not removed:
        raise SSHMuxError(f"{path}: no entry for {args.host or args.fingerprint}; see: buildbot-sshmux list")
    for entry in removed:
        print(f"revoked host {entry.name} ({entry.fingerprint}), was {entry.source}")
    print(f"every running master whose authorized_hosts is {path} disconnects it within seconds")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    path = hosts_file(args)
    try:
        entries, errors = authorized_hosts.load(path)
    except OSError as e:
        raise SSHMuxError(f"{path} cannot be read ({e.strerror})") from None
    rows = [("HOST", "FINGERPRINT", "WORKERS", "FROM")]
    rows += [
        (f"CA {e.name}" if e.cert_authority else e.name, e.fingerprint, ",".join(e.workers),
         ",".join(e.from_patterns) or "*")
        for e in entries
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    for message in errors:
        print(message, file=sys.stderr)
    return 1 if errors else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "basedir", nargs="?", help="the Buildbot master's basedir (not needed with an absolute --file)"
        )
        p.add_argument(
            "--file",
            default=DEFAULT_FILE,
            help=f"relative to BASEDIR (default {DEFAULT_FILE}), or absolute: a cluster's shared file",
        )

    auth = intermixed(sub.add_parser("authorize", help="let a worker host's key in, as some worker names"))
    common(auth)
    auth.add_argument("--host", help="the host's name, in logs")
    auth.add_argument(
        "--cert-authority",
        action="store_true",
        help="PUBKEY is a CA's: hosts log in with its certificates ({host} in --workers: each one's name)",
    )
    auth.add_argument("--principals", help="with --cert-authority: host names it may certify, 'GLOB,...'")
    auth.add_argument("--workers", required=True, help="worker names it may use: 'GLOB,...'")
    auth.add_argument("--from", dest="from_", help="source addresses: 'CIDR,PATTERN,!PATTERN,...'")
    auth.add_argument("--max-channels", type=int, help="sessions at once on its connection")
    auth.add_argument("pubkey", help="the host's public key file (.pub), or - for stdin")
    auth.set_defaults(func=cmd_authorize)

    revoke = sub.add_parser("revoke", help="remove a host (all its keys) or one key")
    common(revoke)
    revoke.add_argument("--host", help="the host's name")
    revoke.add_argument("--fingerprint", help="one key's SHA256:... fingerprint")
    revoke.set_defaults(func=cmd_revoke)

    lst = sub.add_parser("list", help="show the authorized hosts")
    common(lst)
    lst.set_defaults(func=cmd_list)
