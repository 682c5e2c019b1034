"""The master's list of worker hosts: OpenSSH ``authorized_keys`` lines.

Each line names one worker host and the one key it logs in with::

    host="debian-sid",workers="*-debian-sid" ssh-ed25519 AAAAC3Nz... admin@example

The host's name is the ``host=`` option, else the key's comment.  ``workers=``
lists fnmatch patterns of the worker names the host may attach as (default:
any).  Comments, blank lines and quoted options follow OpenSSH's syntax.  A
bad line is reported with its file:line and skipped: it never locks the other
hosts out and never lets anyone in.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from attrs import frozen
from twisted.conch.ssh import keys

from buildbot_sshmux.keys import fingerprint

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    }
)
KNOWN_OPTIONS = frozenset({"host", "workers"})


@frozen
class HostEntry:
    """One worker host: its name, its key and the worker names it may use."""

    name: str
    key: keys.Key
    workers: tuple[str, ...] = ("*",)
    source: str = "<config>"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def may_attach(self, worker_name: str) -> bool:
        """Whether this host may log in as ``worker_name``."""
        return any(fnmatch.fnmatchcase(worker_name, p) for p in self.workers)


class LineError(ValueError):
    """A line of authorized_hosts that cannot be used."""


def _split_options(text: str) -> tuple[str, str]:
    """Split ``opts rest`` at the first unquoted blank, as sshd does."""
    quoted = False
    for i, ch in enumerate(text):
        if ch == '"':
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
                raise LineError(f'option {name}= needs a double-quoted value')
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
    return HostEntry(name=name, key=key, workers=workers, source=source)


def parse_lines(lines: list[str], source: str) -> tuple[list[HostEntry], list[str]]:
    """Parse many lines; return the good entries and one error sentence per bad line."""
    entries: list[HostEntry] = []
    errors: list[str] = []
    for number, line in enumerate(lines, start=1):
        where = f"{source}:{number}"
        try:
            entry = parse_line(line, where)
        except LineError as e:
            errors.append(f"{where}: {e}; this line is ignored, fix it and save the file")
            continue
        if entry is not None:
            entries.append(entry)
    return entries, errors


def load(path: str | Path) -> tuple[list[HostEntry], list[str]]:
    """Read an authorized_hosts file (OSError if it cannot be read)."""
    path = Path(path)
    return parse_lines(path.read_text(encoding="utf-8").splitlines(), str(path))
