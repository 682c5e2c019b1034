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

Comments, blank lines and quoted options follow OpenSSH's syntax.  A bad line
is reported with its file:line and skipped: it never locks the other hosts
out and never lets anyone in.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
from pathlib import Path

from attrs import frozen
from twisted.conch.ssh import keys

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
KNOWN_OPTIONS = frozenset({"host", "workers", "from", "max-channels"})


@frozen
class HostEntry:
    """One worker host: its name, its key and the worker names it may use."""

    name: str
    key: keys.Key
    workers: tuple[str, ...] = ("*",)
    source: str = "<config>"
    from_patterns: tuple[str, ...] = ()
    max_channels: int | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def allows_address(self, address: str) -> bool:
        """Whether ``from=`` lets this host connect from ``address``."""
        return not self.from_patterns or address_matches(address, self.from_patterns)

    def may_attach(self, worker_name: str) -> bool:
        """Whether this host may log in as ``worker_name``."""
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
    name = options.get("host") or (comment.split()[0] if comment else "")
    if not name:
        raise LineError('no host name: add host="NAME" or a comment after the key')
    workers: tuple[str, ...] = ("*",)
    if "workers" in options:
        patterns = tuple(p.strip() for p in (options["workers"] or "").split(",") if p.strip())
        if not patterns:
            raise LineError('workers="" allows no worker name; list at least one pattern')
        workers = patterns
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
    )


def parse_lines(lines: list[str], source: str) -> tuple[list[HostEntry], list[str]]:
    """Parse many lines; return the good entries and one error sentence per bad line."""
    entries: list[HostEntry] = []
    errors: list[str] = []
    first_line: dict[bytes, int] = {}  # a key's line: a key on two lines is its first line's
    for number, line in enumerate(lines, start=1):
        where = f"{source}:{number}"
        try:
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


def load(path: str | Path) -> tuple[list[HostEntry], list[str]]:
    """Read an authorized_hosts file (OSError if it cannot be read)."""
    path = Path(path)
    return parse_lines(path.read_text(encoding="utf-8").splitlines(), str(path))


def format_entry(
    name: str,
    key: keys.Key,
    workers: tuple[str, ...] = ("*",),
    from_patterns: tuple[str, ...] = (),
    max_channels: int | None = None,
    comment: str = "",
) -> str:
    """One authorized_hosts line for a host (checked by parsing it back)."""
    for value in (name, *workers, *from_patterns):
        if '"' in value or "\n" in value:
            raise LineError(f"{value!r} may not contain a double quote or a newline")
    options = [f'host="{name}"', f'workers="{",".join(workers)}"']
    if from_patterns:
        options.append(f'from="{",".join(from_patterns)}"')
    if max_channels is not None:
        options.append(f"max-channels={max_channels}")
    line = f"{','.join(options)} {key.public().toString('OPENSSH').decode('ascii')} {comment or name}"
    parse_line(line)
    return line


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def add_entry(path: str | Path, line: str) -> None:
    """Append a host line; refuse a key that is already there.

    A host may have several lines (several keys) while it rotates its key.
    """
    path = Path(path)
    new = parse_line(line)
    assert new is not None
    existing, _errors = load(path) if path.exists() else ([], [])
    for entry in existing:
        if entry.key.blob() == new.key.blob():
            raise LineError(
                f"key {new.fingerprint} is already authorized as host {entry.name} at"
                f" {entry.source}; revoke it first to change its entry"
            )
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    _write_atomically(path, text + line + "\n")


def remove_entries(
    path: str | Path, host: str | None = None, key_fingerprint: str | None = None
) -> list[HostEntry]:
    """Remove the lines of a host (by name) or of a key (by fingerprint); return them."""
    path = Path(path)
    kept, removed = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = parse_line(line, f"{path}:{number}")
        except LineError:
            entry = None
        if entry is not None and (entry.name == host or entry.fingerprint == key_fingerprint):
            removed.append(entry)
        else:
            kept.append(line)
    if removed:
        _write_atomically(path, "".join(f"{line}\n" for line in kept))
    return removed
