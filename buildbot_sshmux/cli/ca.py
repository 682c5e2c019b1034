"""``buildbot-sshmux ca init|sign|revoke``: a certificate authority for worker hosts and masters.

``init`` makes the CA's key.  ``sign`` certifies a public key: a worker
host's (a user certificate, what ``ssh-keygen -s CA -I ID -n PRINCIPALS``
makes) or, with ``--host-certificate``, a master's host key (``-h``); the
result is ``KEY-cert.pub`` beside ``KEY.pub``, which ``ssh-keygen -L -f``
reads.  ``revoke`` adds a certificate to the master's revocation list
(``revoked_certificates=``).  Keep the CA's private key off the masters.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import time
from pathlib import Path

from twisted.conch.ssh import keys

from buildbot_sshmux.cli import intermixed
from buildbot_sshmux.errors import KeyFileError, SSHMuxError
from buildbot_sshmux.master import authorized_hosts, certauth
from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.keys import fingerprint, generate, load_private_key, public_line, write_private_key

DEFAULT_REVOKED = "sshmux/revoked_certificates"
DEFAULT_VALIDITY = "+52w"
BACKDATE = 300  # a certificate starts 5 minutes ago: clocks differ

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _relative(text: str) -> int:
    """``1w2d``, ``30d``, ``90m``... as seconds (ssh-keygen's time format)."""
    parts = re.findall(r"(\d+)([smhdwSMHDW]?)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a time like 52w, 30d or 1h30m")
    return sum(int(n) * _UNITS[(u or "s").lower()] for n, u in parts)


def _moment(text: str, now: int, start: bool) -> int:
    """One end of a validity interval: +/-TIME, YYYYMMDD[HHMM[SS]] (UTC), always, forever."""
    if text == "always" and start:
        return 0
    if text == "forever" and not start:
        return certs.FOREVER
    if text[:1] in "+-":
        delta = _relative(text[1:])
        return now + delta if text[0] == "+" else max(0, now - delta)
    digits = text.rstrip("Zz")
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if digits.isdigit() and len(digits) in formats:
        import calendar

        return int(calendar.timegm(time.strptime(digits, formats[len(digits)])))
    raise ValueError(f"{text!r} is not +TIME, -TIME, YYYYMMDD[HHMM[SS]], always or forever")


def parse_validity(spec: str, now: int) -> tuple[int, int]:
    """``ssh-keygen -V``'s interval: ``FROM:TO``, or ``TO`` alone (from 5 minutes ago)."""
    try:
        if ":" in spec:
            first, last = spec.split(":", 1)
            after, before = _moment(first, now, True), _moment(last, now, False)
        else:
            after, before = max(0, now - BACKDATE), _moment(spec, now, False)
    except ValueError as e:
        raise SSHMuxError(f"--validity {spec!r}: {e}") from None
    if before <= after:
        raise SSHMuxError(f"--validity {spec!r} ends before it starts")
    return after, before


def _split(value: str | None) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def _read_public(path: str) -> tuple[keys.Key, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SSHMuxError(f"{path} cannot be read ({getattr(e, 'strerror', e)})") from None
    if "PRIVATE KEY-----" in text:
        raise SSHMuxError(f"{path} is a private key; give the .pub file")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1:
        raise SSHMuxError(f"{path}: expected one public key line, found {len(lines)}")
    fields = lines[0].split(None, 2)
    if certs.is_certificate(fields[0].encode("ascii", "replace")):
        raise SSHMuxError(f"{path} is a certificate; give the public key it certifies")
    try:
        key = keys.Key.fromString(" ".join(fields[:2]).encode("ascii"))
    except Exception:
        raise SSHMuxError(f"{path}: not an OpenSSH public key line") from None
    return key, fields[2].strip() if len(fields) > 2 else ""


def _load_ca(path: str) -> keys.Key:
    import getpass

    try:
        return load_private_key(path, make_with=f"buildbot-sshmux ca init {path}")
    except KeyFileError as e:
        if "is encrypted" not in str(e):
            raise
    passphrase = getpass.getpass(f"passphrase for the CA key {path}: ").encode("utf-8")
    return load_private_key(path, passphrase)


def cmd_init(args: argparse.Namespace) -> int:
    import getpass

    path = Path(args.path)
    if path.exists():
        raise SSHMuxError(f"{path} exists; choose another path or remove it first")
    passphrase = None
    if args.passphrase:
        passphrase = getpass.getpass("passphrase for the new CA key: ").encode("utf-8")
        if getpass.getpass("the same passphrase again: ").encode("utf-8") != passphrase:
            raise KeyFileError("the two passphrases differ; nothing was written, run ca init again")
    key = generate(args.type)
    comment = args.comment or path.name
    write_private_key(path, key, comment, passphrase)
    line = public_line(key, comment)
    print(f"wrote {path} (mode 0600) and {path}.pub; CA fingerprint {fingerprint(key)}")
    print("trust it for worker hosts, on the master:")
    print(f"  buildbot-sshmux authorize BASEDIR --cert-authority --workers '*-{{host}}' {path}.pub")
    print("trust it for masters' host keys, in a launcher config ([master] or [cluster]):")
    print(f'  host_ca = "{public_line(key)}"')
    print("or in its known_hosts:")
    print(f"  @cert-authority * {line}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    ca = _load_ca(args.ca)
    key, _comment = _read_public(args.pubkey)
    principals = _split(args.principals)
    if not principals:
        raise SSHMuxError("--principals needs at least one name, e.g. --principals debian-sid")
    kind = certs.HOST if args.host_certificate else certs.USER
    if kind == certs.USER:
        hosts = [p for p in principals if not p.startswith(certauth.WORKERS_PREFIX)]
        if len(hosts) != 1 or not certauth.HOST_NAME.match(hosts[0]):
            raise SSHMuxError(
                "a worker host's certificate names exactly one host (letters, digits, '.', '_', '-'),"
                " and may add workers:GLOB principals: e.g. --principals 'debian-sid,workers:*-debian-sid'"
            )
    elif args.source_address:
        raise SSHMuxError("--source-address is for worker hosts' certificates, not host certificates")
    now = int(time.time())
    after, before = parse_validity(args.validity, now)
    serial = args.serial if args.serial is not None else certs.random_serial()
    if not 0 <= serial < 2**64:
        raise SSHMuxError("--serial must be 0 to 2^64-1")
    sources = _split(args.source_address)
    for source in sources:
        try:
            ipaddress.ip_network(source, strict=False)
        except ValueError:
            raise SSHMuxError(f"--source-address {source!r} is not an address or CIDR network") from None
    try:
        cert = certs.sign(
            ca,
            key,
            kind=kind,
            key_id=args.id or principals[0],
            principals=principals,
            valid_after=after,
            valid_before=before,
            serial=serial,
            source_addresses=sources,
        )
    except certs.CertificateError as e:
        raise SSHMuxError(str(e)) from None
    pub = Path(args.pubkey)
    out = Path(args.output) if args.output else pub.with_name(pub.name.removesuffix(".pub") + "-cert.pub")
    if out.exists() and not args.force:
        raise SSHMuxError(f"{out} exists; give --force to replace it (a renewal)")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(cert.line(_comment) + "\n")
    tmp.replace(out)
    print(f"wrote {out}: {kind} {cert.describe()}")
    print(f"  key {cert.fingerprint}, principals {','.join(principals)}")
    print(f"  valid from {certs.when(after)} to {certs.when(before)}")
    beside = f"{pub.name.removesuffix('.pub')}-cert.pub"
    if kind == certs.USER:
        print(
            f"ssh-worker offers {beside} from beside the host's private key (copy it there if signed elsewhere)"
        )
    else:
        print(
            f"the master offers {beside} from beside its host key within seconds (copy it there if signed elsewhere)"
        )
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    given = [v for v in (args.serial, args.key_id, args.key, args.certificate) if v is not None]
    if len(given) != 1:
        raise SSHMuxError(
            "say what to revoke: one of --certificate KEY-cert.pub, --serial N, --key-id ID, --key KEY.pub"
        )
    path = Path(args.file).expanduser()
    if not path.is_absolute():
        if args.basedir is None:
            raise SSHMuxError("give the master's BASEDIR, or --file with an absolute path")
        path = Path(args.basedir, path)
    if not path.parent.is_dir():
        raise SSHMuxError(f"{path.parent} does not exist")
    comment = ""
    try:
        if args.serial is not None:
            line = certauth.revocation_line(serial=args.serial)
        elif args.key_id is not None:
            line = certauth.revocation_line(key_id=args.key_id)
        elif args.key is not None:
            key, _ = _read_public(args.key)
            line = certauth.revocation_line(key=key)
            comment = f"every certificate of {args.key}"
        else:
            cert = certs.load_certificate(args.certificate)
            comment = f"{cert.describe()}, principals {','.join(cert.principals)}"
            if cert.serial:
                line = certauth.revocation_line(serial=cert.serial)
            elif cert.key_id.strip() and cert.key_id == cert.key_id.strip() and "\n" not in cert.key_id:
                line = certauth.revocation_line(key_id=cert.key_id)  # serial 0 cannot be revoked by serial
            else:
                line = certauth.revocation_line(key=cert.key)
    except (certauth.RevocationListError, certs.CertificateError) as e:
        raise SSHMuxError(str(e)) from None
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    text = f"# {stamp}{': ' + comment if comment else ''}\n{line}\n"
    target = authorized_hosts.edit_target(path)
    try:
        with authorized_hosts.edit_lock(target):
            data = target.read_bytes() if target.exists() else b""
            try:
                certauth.parse_revocations(data, str(path))
            except certauth.RevocationListError as e:
                raise SSHMuxError(
                    f"{e}; fix the list first (a master refuses every certificate meanwhile)"
                ) from None
            if data and not data.endswith(b"\n"):
                data += b"\n"
            authorized_hosts._write_atomically(target, data + text.encode("utf-8"))
    except authorized_hosts.EditError as e:
        raise SSHMuxError(str(e)) from None
    print(f"revoked {line!r} in {path}{' (' + comment + ')' if comment else ''}")
    print(f"every running master whose revoked_certificates is {path} disconnects it within seconds")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ca = sub.add_parser("ca", help="a certificate authority: init, sign, revoke")
    commands = ca.add_subparsers(dest="ca_command", required=True)

    init = commands.add_parser("init", help="make a CA key (ed25519, mode 0600) and its .pub")
    init.add_argument("path", help="the CA's private key file to write")
    init.add_argument("--type", choices=["ed25519", "ecdsa", "rsa"], default="ed25519")
    init.add_argument("--comment", help="the key's comment (default: the file's name)")
    init.add_argument("--passphrase", action="store_true", help="ask for a passphrase (sign asks for it)")
    init.set_defaults(func=cmd_init)

    sign = commands.add_parser(
        "sign", help="certify a worker host's key (or, --host-certificate, a master's)"
    )
    sign.add_argument("--ca", required=True, help="the CA's private key file")
    sign.add_argument(
        "--principals",
        required=True,
        help="'HOSTNAME[,workers:GLOB...]' for a worker host; the master's DNS names for --host-certificate",
    )
    sign.add_argument("--host-certificate", action="store_true", help="a master's host key (ssh-keygen -h)")
    sign.add_argument("--id", help="the key id, in every log line about it (default: the first principal)")
    sign.add_argument(
        "--validity",
        default=DEFAULT_VALIDITY,
        help=f"as ssh-keygen -V: +52w, -1d:+30d, 20260101:20270101 (UTC), always:forever (default {DEFAULT_VALIDITY})",
    )
    sign.add_argument("--serial", type=int, help="the serial number (default: random)")
    sign.add_argument("--source-address", help="'CIDR,...': the only addresses it may log in from")
    sign.add_argument("--output", "-o", help="the certificate file (default: KEY-cert.pub beside KEY.pub)")
    sign.add_argument("--force", action="store_true", help="replace an existing certificate file")
    sign.add_argument("pubkey", help="the public key to certify (.pub)")
    sign.set_defaults(func=cmd_sign)

    revoke = intermixed(commands.add_parser("revoke", help="add a certificate to the revocation list"))
    revoke.add_argument(
        "basedir", nargs="?", help="the Buildbot master's basedir (not needed with an absolute --file)"
    )
    revoke.add_argument(
        "--file",
        default=DEFAULT_REVOKED,
        help=f"the list SSHMuxService(revoked_certificates=...) names (default BASEDIR/{DEFAULT_REVOKED})",
    )
    revoke.add_argument("--serial", type=int, help="revoke the certificates with this serial")
    revoke.add_argument("--key-id", help="revoke the certificates with this key id")
    revoke.add_argument("--key", help="revoke every certificate of this public key (.pub), or of this CA")
    revoke.add_argument(
        "--certificate", help="revoke this certificate (a -cert.pub file): its serial, else its key id"
    )
    revoke.set_defaults(func=cmd_revoke)
