"""The launcher's trust in master host certificates, and known_hosts markers.

A launcher may trust a CA instead of one master key: ``host_ca = "ssh-ed25519
AAAA..."`` (or ``"SHA256:..."``) in a ``[master]`` or ``[cluster]`` table, or
an ``@cert-authority`` line in its known_hosts file, as OpenSSH's::

    @cert-authority [*.example.org]:2222 ssh-ed25519 AAAAC3Nz... masters-ca

Then any host key the master shows with a *host* certificate
(``ssh-keygen -s CA -h -n m1.example.org key.pub``) of that CA is accepted,
provided that:

- one of its principals is the master's host name as the launcher dials it
  (``address``'s host, compared without case, no wildcards);
- now is within its validity window;
- it has no critical option (none is defined for host certificates);
- neither its key nor its CA is marked ``@revoked`` in known_hosts.

A CA named by ``host_ca`` applies to the master (or every master of the
cluster) of its table; one in known_hosts applies to the hosts its pattern
list matches, as ssh matches them: ``HOST`` on port 22, ``[HOST]:PORT``
otherwise, ``*``/``?`` wildcards and ``!`` negation; hashed names (``|1|``)
too.  Conch's known_hosts reader skips marker lines, so they are read here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from pathlib import Path

from attrs import frozen
from twisted.conch.ssh import keys

from buildbot_sshmux.wire import certs
from buildbot_sshmux.wire.certs import Certificate
from buildbot_sshmux.wire.keys import fingerprint

CERT_AUTHORITY = "@cert-authority"
REVOKED = "@revoked"


def known_hosts_name(host: str, port: int) -> str:
    """How ssh names a host in known_hosts: ``HOST`` on port 22, ``[HOST]:PORT`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def _match_pattern(name: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: ``*`` and ``?`` only (``[`` is a plain character here)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.DOTALL) is not None


def _match_hashed(name: str, entry: str) -> bool:
    """A hashed known_hosts name, ``|1|base64(salt)|base64(HMAC-SHA1(salt, name))``."""
    parts = entry.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
    except ValueError:
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def host_matches(name: str, patterns: str) -> bool:
    """OpenSSH's match_hostname over a known_hosts host field: a negated match refuses."""
    name = name.lower()
    matched = False
    for pattern in patterns.split(","):
        if pattern.startswith("|"):
            if _match_hashed(name, pattern):
                matched = True
            continue
        negated = pattern.startswith("!")
        if _match_pattern(name, pattern[1:].lower() if negated else pattern.lower()):
            if negated:
                return False
            matched = True
    return matched


@frozen
class Marker:
    """An ``@cert-authority`` or ``@revoked`` line of a known_hosts file."""

    kind: str
    patterns: str
    key: keys.Key


def read_markers(path: Path) -> list[Marker]:
    """The marker lines of a known_hosts file (lines that cannot be parsed are skipped, as ssh does)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    markers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] not in (CERT_AUTHORITY, REVOKED):
            continue
        try:
            key = keys.Key.fromString(f"{fields[2]} {fields[3]}".encode("ascii"))
        except Exception:
            continue
        markers.append(Marker(fields[0], fields[1], key))
    return markers


def check_host_certificate(cert: Certificate, host: str, now: float) -> str | None:
    """Why a master's host certificate may not stand for ``host`` (its CA aside), or None."""
    if cert.kind != certs.HOST:
        return "it is a user certificate, not a host certificate (sign the master's key with -h)"
    problem = cert.validity_problem(now)
    if problem is not None:
        return f"it {problem}"
    if cert.critical_options:
        return f"it has the critical option {cert.critical_options[0][0]!r} (none is defined for hosts)"
    if not cert.principals:
        return f"it names no host (sign it with -n {host})"
    if host.lower() not in (p.lower() for p in cert.principals):
        shown = ", ".join(cert.principals[:4])
        return f"its principals ({shown}) do not name {host}, the address this launcher dials"
    return None


def revoked_by(markers: list[Marker], name: str, key: keys.Key) -> bool:
    """Whether a ``@revoked`` line of these markers matching ``name`` names ``key``."""
    blob = key.public().blob()
    return any(m.kind == REVOKED and m.key.blob() == blob and host_matches(name, m.patterns) for m in markers)


def authorities(markers: list[Marker], name: str) -> list[str]:
    """Fingerprints of the CAs that ``@cert-authority`` lines trust for ``name``."""
    return [
        fingerprint(m.key) for m in markers if m.kind == CERT_AUTHORITY and host_matches(name, m.patterns)
    ]
