"""The master's list of worker hosts: OpenSSH ``authorized_keys`` lines.

Each line names one worker host and the one key it logs in with::

    host="debian-sid",workers="*-debian-sid" ssh-ed25519 AAAAC3Nz... admin@example

The host's name is the ``host=`` option, else the key's comment.  Options:

- ``workers="GLOB,..."``: fnmatch patterns of the worker names the host may
  attach as (default: any);
- ``from="PATTERN,..."``: source addresses it may connect from, OpenSSH's
  syntax: ``*``/``?`` wildcards, CIDR (``10.0.0.0/8``) and ``!`` negation
  (addresses only: names are not resolved);
- ``max-channels=N``: worker sessions open at once on its connection.

A ``cert-authority`` line trusts the OpenSSH user certificates that its key
(a CA's) signed, as sshd's ``authorized_keys`` does::

    cert-authority,workers="*-{host}",principals="debian-*,fedora-*" ssh-ed25519 AAAAC3Nz... hosts-ca

Each certificate names its host (see ``master/certauth.py`` for the
principals, validity and revocation rules); ``{host}`` in ``workers=`` stands
for that name, and ``principals="GLOB,..."`` limits the host names this CA
may certify (default: any).  ``from=`` and ``max-channels=`` apply to every
host of the CA; ``workers=`` is required (``"*"`` if every certified host may
use every name).  The CA's key itself never logs in.

Comments, blank lines and quoted options follow OpenSSH's syntax.  A bad line
is reported with its file:line and skipped: it never locks the other hosts
out and never lets anyone in.

A cluster of masters shares one file: every master's ``authorized_hosts=``
names the same path (shared storage, or a symlink to it), and each master
re-reads it by itself.  Edits (`add_entry`, `remove_entries`) take a lock
beside the file, so that editors on several machines lose no edit, and
replace the file in one rename, keeping its owner and mode, so that a master
reads the old content or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import ipaddress
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from attrs import frozen
from twisted.conch.ssh import keys

from buildbot_sshmux.wire.certs import Certificate
from buildbot_sshmux.wire.keys import fingerprint

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    }
)
KNOWN_OPTIONS = frozenset({"host", "workers", "from", "max-channels", "cert-authority", "principals"})
HOST_TOKEN = "{host}"  # in a cert-authority line's workers=: the certificate's host name


@frozen
class HostEntry:
    """One worker host: its name, its key and the worker names it may use."""

    name: str
    key: keys.Key
    workers: tuple[str, ...] = ("*",)
    source: str = "<config>"
    from_patterns: tuple[str, ...] = ()
    max_channels: int | None = None
    cert_authority: bool = False  # a CA line: ``key`` signs hosts' certificates, never logs in
    principals: tuple[str, ...] = ("*",)  # a CA line's principals=: host names it may certify
    # A host logged in with a certificate: the certificate, and its workers:
    # principals, which narrow ``workers`` (the CA line's) and never widen them.
    certificate: Certificate | None = None
    cert_workers: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    @property
    def workers_text(self) -> str:
        """The worker names it may use, for a log line."""
        text = ",".join(self.workers)
        return f"{text} and {','.join(self.cert_workers)}" if self.cert_workers else text

    def allows_address(self, address: str) -> bool:
        """Whether ``from=`` lets this host connect from ``address``."""
        return not self.from_patterns or address_matches(address, self.from_patterns)

    def may_attach(self, worker_name: str) -> bool:
        """Whether this host may log in as ``worker_name``."""
        if self.cert_authority:
            return False
        if self.cert_workers and not any(fnmatch.fnmatchcase(worker_name, p) for p in self.cert_workers):
            return False
        return any(fnmatch.fnmatchcase(worker_name, p) for p in self.workers)


class LineError(ValueError):
    """A line of authorized_hosts that cannot be used."""


def _pattern_matches(address: str, pattern: str) -> bool:
    if "/" in pattern:
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(address.lower(), pattern.lower())


def address_matches(address: str, patterns: tuple[str, ...]) -> bool:
    """OpenSSH pattern-list semantics: any negated match refuses, else any positive match allows."""
    if address.startswith("::ffff:"):
        address = address[len("::ffff:") :]
    allowed = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _pattern_matches(address, pattern[1:] if negated else pattern):
            if negated:
                return False
            allowed = True
    return allowed


def _check_from(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        bare = pattern.lstrip("!")
        if not bare:
            raise LineError(f"empty pattern in from={','.join(patterns)!r}")
        if "/" in bare:
            try:
                ipaddress.ip_network(bare, strict=False)
            except ValueError:
                raise LineError(f"from= pattern {pattern!r} is not a valid CIDR network") from None
    if all(p.startswith("!") for p in patterns):
        raise LineError("from= has only negated patterns, which allow no address; add a positive one")


def _split_options(text: str) -> tuple[str, str]:
    """Split ``opts rest`` at the first unquoted blank, as sshd does."""
    quoted = False
    for i, ch in enumerate(text):
        if ch == '"' and not (quoted and i and text[i - 1] == "\\"):
            quoted = not quoted
        elif ch in " \t" and not quoted:
            return text[:i], text[i:].strip()
    if quoted:
        raise LineError("unterminated quote in options")
    return text, ""


def _parse_options(text: str) -> dict[str, str | None]:
    """Parse ``name,name="value",...`` into a dict; quotes may hold commas."""
    options: dict[str, str | None] = {}
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] not in ',="':
            j += 1
        name = text[i:j].strip().lower()
        if not name:
            raise LineError(f"empty option at column {i + 1}")
        value: str | None = None
        if j < len(text) and text[j] == "=":
            if j + 1 >= len(text) or text[j + 1] != '"':
                end = text.find(",", j + 1)
                end = len(text) if end == -1 else end
                value = text[j + 1 : end]
                if not value or '"' in value:
                    raise LineError(f"option {name}= needs a value (quote it if it holds commas)")
                if name in options:
                    raise LineError(f"option {name} given twice")
                options[name] = value
                i = end + 1
                continue
            end = text.find('"', j + 2)
            while end != -1 and text[end - 1] == "\\":
                end = text.find('"', end + 1)
            if end == -1:
                raise LineError(f"unterminated quote in option {name}")
            value = text[j + 2 : end].replace('\\"', '"')
            j = end + 1
        if name in options:
            raise LineError(f"option {name} given twice")
        options[name] = value
        if j < len(text):
            if text[j] != ",":
                raise LineError(f"expected ',' after option {name}")
            j += 1
        i = j
    return options


def parse_line(line: str, source: str = "<config>") -> HostEntry | None:
    """Parse one line; None for blanks and comments, LineError if unusable."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    options: dict[str, str | None] = {}
    first = text.split(None, 1)[0]
    if first not in KEY_TYPES:
        opts, text = _split_options(text)
        options = _parse_options(opts)
    fields = text.split(None, 2)
    if len(fields) < 2:
        raise LineError("expected: [options] KEYTYPE BASE64 [comment]")
    keytype, blob = fields[0], fields[1]
    comment = fields[2].strip() if len(fields) > 2 else ""
    if keytype not in KEY_TYPES:
        raise LineError(f"unsupported key type {keytype!r}")
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise LineError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(KNOWN_OPTIONS))})")
    try:
        key = keys.Key.fromString(f"{keytype} {blob}".encode("ascii"))
    except Exception as e:  # Conch also raises struct.error, IndexError... on corrupt blobs
        raise LineError(f"bad {keytype} key ({e or 'cannot decode'})") from None
    if key.sshType().decode("ascii") != keytype:
        raise LineError(f"key data is {key.sshType().decode()}, line says {keytype}")
    authority = "cert-authority" in options
    if authority and options["cert-authority"] is not None:
        raise LineError("cert-authority takes no value")
    if authority and "host" in options:
        raise LineError(
            "host= names one host: on a cert-authority line each certificate names its host; remove host="
        )
    if "principals" in options and not authority:
        raise LineError("principals= is for cert-authority lines only")
    if authority:
        name = comment.split()[0] if comment else "cert-authority"
    else:
        name = options.get("host") or (comment.split()[0] if comment else "")
    if not name:
        raise LineError('no host name: add host="NAME" or a comment after the key')
    if authority and "workers" not in options:
        # Every host the CA certifies would get every worker name: say so if it is meant.
        raise LineError('a cert-authority line needs workers= (e.g. workers="*-{host}", or workers="*")')
    workers: tuple[str, ...] = ("*",)
    if "workers" in options:
        patterns = tuple(p.strip() for p in (options["workers"] or "").split(",") if p.strip())
        if not patterns:
            raise LineError('workers="" allows no worker name; list at least one pattern')
        workers = patterns
    for pattern in workers:
        rest = pattern.replace(HOST_TOKEN, "") if authority else pattern
        if "{" in rest or "}" in rest:
            raise LineError(
                f"workers= pattern {pattern!r}: only {HOST_TOKEN}, on a cert-authority line, may be"
                " in braces (it stands for the certificate's host name)"
            )
    principals: tuple[str, ...] = ("*",)
    if "principals" in options:
        principals = tuple(p.strip() for p in (options["principals"] or "").split(",") if p.strip())
        if not principals:
            raise LineError('principals="" allows no host; list at least one pattern')
    from_patterns: tuple[str, ...] = ()
    if "from" in options:
        from_patterns = tuple(p.strip() for p in (options["from"] or "").split(",") if p.strip())
        if not from_patterns:
            raise LineError('from="" allows no address; list at least one pattern')
        _check_from(from_patterns)
    max_channels = None
    if "max-channels" in options:
        value = options["max-channels"] or ""
        # ASCII digits only: "²".isdigit() is True but int("²") raises ValueError.
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise LineError(f"max-channels must be a positive integer, not {value!r}")
        max_channels = int(value)
    return HostEntry(
        name=name,
        key=key,
        workers=workers,
        source=source,
        from_patterns=from_patterns,
        max_channels=max_channels,
        cert_authority=authority,
        principals=principals,
    )


def parse_lines(lines: Sequence[str | None], source: str) -> tuple[list[HostEntry], list[str]]:
    """Parse many lines; return the good entries and one error sentence per bad line.

    A line given as None is one that is not UTF-8 text (see `parse_bytes`).
    """
    entries: list[HostEntry] = []
    errors: list[str] = []
    first_line: dict[bytes, int] = {}  # a key's line: a key on two lines is its first line's
    for number, line in enumerate(lines, start=1):
        where = f"{source}:{number}"
        try:
            if line is None:
                raise LineError("not UTF-8 text")
            entry = parse_line(line, where)
        except LineError as e:
            errors.append(f"{where}: {e}; this line is ignored, fix it and save the file")
            continue
        if entry is None:
            continue
        blob = entry.key.blob()
        if blob in first_line:
            errors.append(
                f"{where}: the key {entry.fingerprint} is on line {first_line[blob]} already;"
                " this line is ignored, remove it or merge it into that one"
            )
            continue
        first_line[blob] = number
        entries.append(entry)
    return entries, errors


def _decode_lines(data: bytes) -> list[str | None]:
    """The file's lines as text, None for a line that is not UTF-8."""
    lines: list[str | None] = []
    for raw in data.splitlines():
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(None)
    return lines


def parse_bytes(data: bytes, source: str) -> tuple[list[HostEntry], list[str]]:
    """Parse a file's content.  A line that is not UTF-8 is a bad line like any other:
    reported and skipped, never a reason to reject the whole file."""
    return parse_lines(_decode_lines(data), source)


def load(path: str | Path) -> tuple[list[HostEntry], list[str]]:
    """Read an authorized_hosts file (OSError if it cannot be read)."""
    path = Path(path)
    return parse_bytes(path.read_bytes(), str(path))


def format_entry(
    name: str,
    key: keys.Key,
    workers: tuple[str, ...] = ("*",),
    from_patterns: tuple[str, ...] = (),
    max_channels: int | None = None,
    comment: str = "",
    cert_authority: bool = False,
    principals: tuple[str, ...] = (),
) -> str:
    """One authorized_hosts line for a host, or for a CA (checked by parsing it back)."""
    for value in (name, *workers, *from_patterns, *principals):
        if '"' in value or "\n" in value:
            raise LineError(f"{value!r} may not contain a double quote or a newline")
    if cert_authority:
        options = ["cert-authority", f'workers="{",".join(workers)}"']
        if principals:
            options.append(f'principals="{",".join(principals)}"')
    else:
        options = [f'host="{name}"', f'workers="{",".join(workers)}"']
    if from_patterns:
        options.append(f'from="{",".join(from_patterns)}"')
    if max_channels is not None:
        options.append(f"max-channels={max_channels}")
    line = f"{','.join(options)} {key.public().toString('OPENSSH').decode('ascii')} {comment or name}"
    parse_line(line)
    return line


class EditError(Exception):
    """authorized_hosts cannot be edited safely; it is left as it was."""


LOCK_TIMEOUT = 10.0


def edit_target(path: Path) -> Path:
    """The file an edit of ``path`` replaces: the one a symlink names, not the symlink.

    ``BASEDIR/sshmux/authorized_hosts`` may be a symlink to a cluster's shared
    file; a rename onto the symlink would replace the link with a copy, and
    the edit would reach this master alone.
    """
    return Path(os.path.realpath(path))


def lock_path(path: Path) -> Path:
    """The lock file that serializes edits of ``path`` (next to it: on the same storage)."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def edit_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock for one read-modify-write of ``path``.

    Several administrators (or one on several machines, with the file on
    shared storage) may run ``authorize`` and ``revoke`` at once: without it
    one edit could overwrite the other.  A POSIX record lock (``fcntl.lockf``)
    on a lock file beside ``path``, as those work on NFS too.  Readers take no
    lock: every write replaces the file in one rename.
    """
    lock = lock_path(path)
    existing = path.stat() if path.exists() else None
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, existing.st_mode & 0o666 if existing else 0o600)
    except OSError as e:
        raise EditError(f"cannot open the lock file {lock} ({e.strerror})") from None
    try:
        if existing is not None:
            with contextlib.suppress(OSError):  # as the file's owner: the next editor may open it
                os.fchown(fd, existing.st_uid, existing.st_gid)
        timeout = LOCK_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise EditError(f"cannot lock {lock} ({e.strerror})") from None
                if time.monotonic() > deadline:
                    raise EditError(
                        f"{path} is being edited by another buildbot-sshmux (it holds {lock});"
                        f" waited {timeout:.0f} s, try again"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` in one rename, keeping its mode and owner.

    A master reading the file at any moment sees the old content or the new,
    never a part.  The new file keeps the old one's owner: one written by
    root as root:root 0600 could not be read by the masters, which then keep
    serving the entries they had, the revoked host included; so when the
    owner cannot be kept (not root, not the owner) nothing is written.
    """
    existing = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if existing is not None:
            try:
                if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, existing.st_uid, existing.st_gid)
            except OSError:
                raise EditError(
                    f"{path} belongs to uid {existing.st_uid} gid {existing.st_gid}; the new file"
                    " could not keep that owner, and the masters might not read it: run this as"
                    " that user (or root)"
                ) from None
        os.fchmod(fd, existing.st_mode & 0o777 if existing else 0o600)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable (best effort)
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def add_entry(path: str | Path, line: str) -> None:
    """Append a host line; refuse a key that is already there.

    A host may have several lines (several keys) while it rotates its key.
    """
    path = Path(path)
    target = edit_target(path)
    new = parse_line(line)
    assert new is not None
    with edit_lock(target):
        data = target.read_bytes() if target.exists() else b""
        existing, _errors = parse_bytes(data, str(path))
        for entry in existing:
            if entry.key.blob() == new.key.blob():
                raise LineError(
                    f"key {new.fingerprint} is already authorized as host {entry.name} at"
                    f" {entry.source}; revoke it first to change its entry"
                )
        if data and not data.endswith(b"\n"):
            data += b"\n"
        _write_atomically(target, data + line.encode("utf-8") + b"\n")


def remove_entries(
    path: str | Path, host: str | None = None, key_fingerprint: str | None = None
) -> list[HostEntry]:
    """Remove the lines of a host (by name) or of a key (by fingerprint); return them.

    Every other line is kept as it was: comments, bad lines, lines that are
    not UTF-8.
    """
    path = Path(path)
    target = edit_target(path)
    with edit_lock(target):
        kept: list[bytes] = []
        removed: list[HostEntry] = []
        for number, raw in enumerate(target.read_bytes().splitlines(), start=1):
            try:
                entry = parse_line(raw.decode("utf-8"), f"{path}:{number}")
            except (LineError, UnicodeDecodeError):
                entry = None
            named = host is not None and entry is not None and not entry.cert_authority and entry.name == host
            if entry is not None and (named or entry.fingerprint == key_fingerprint):
                removed.append(entry)
            else:
                kept.append(raw)
        if removed:
            _write_atomically(target, b"".join(raw + b"\n" for raw in kept))
    return removed
