"""What the master's SSH server counts, for `SSHMuxService.status` and its metrics.

Plain Python, kept by the service across reconfigurations (a new listening
port makes a new `SSHMuxFactory`, not new counts), updated where each event
happens and read when asked.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from buildbot_sshmux.wire.stats import Histogram, RecentCounts

# reason -> (kind, what it means).  The reason is the metric label and the
# status key; the kind says which counter it is part of.
AUTH = "auth"
CHANNEL = "channel"
LOGIN = "login"
DUPLICATE = "duplicate"

REASONS: dict[str, tuple[str, str]] = {
    # SSH authentication (sshmux_auth_failures_total)
    "unknown_key": (AUTH, "a key that is not in authorized_hosts"),
    "address_not_allowed": (AUTH, "an authorized key from an address its from= does not allow"),
    "signature_algorithm": (AUTH, "a signature algorithm not accepted (ssh-rsa with SHA-1)"),
    "bad_signature": (AUTH, "an authorized key with a signature that does not verify"),
    "unparsable_key": (AUTH, "a key that cannot be parsed"),
    "auth_method": (AUTH, "an authentication method other than publickey"),
    # Channels and requests of a logged-in host (sshmux_channel_refusals_total)
    "channel_type": (CHANNEL, "a channel type other than direct-tcpip"),
    "malformed_request": (CHANNEL, "a direct-tcpip request that cannot be parsed"),
    "pb_unavailable": (CHANNEL, "the master's PB port is not open"),
    "target": (CHANNEL, "a channel to anything but the master's PB port"),
    "host_max_channels": (CHANNEL, "a channel beyond the host's max-channels="),
    "max_channels": (CHANNEL, "a channel beyond max_channels per connection"),
    "global_request": (CHANNEL, "a global request other than a keepalive"),
    # PB logins on a host's channels (sshmux_worker_logins_refused_total)
    "worker_not_allowed": (LOGIN, "a worker name the host's workers= does not allow"),
    "no_worker_name": (LOGIN, "a login with no usable worker name"),
    "bad_credentials": (LOGIN, "a worker name the master does not know, or a wrong password"),
    "master_refused": (LOGIN, "the master refused the worker (e.g. attached already elsewhere)"),
    # Connections of a key that is connected already (sshmux_duplicate_connections_total)
    "duplicate_connection": (DUPLICATE, "a second connection refused: the first answers keepalives"),
}
REPLACED = "replaced"  # a connection closed for a newer one of its key (not a refusal)


def reasons_of(kind: str) -> list[str]:
    return [reason for reason, (k, _what) in REASONS.items() if k == kind]


class ServerStats:
    """Counts of one `SSHMuxService`: refusals (totals, and the last hour per
    host), keepalive round trips, and what connections that have closed sent,
    received and rekeyed (those still open are asked directly)."""

    max_last_seen = 10_000

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.totals: Counter[str] = Counter()  # a reason of REASONS, or REPLACED -> events so far
        self.recent = RecentCounts(clock)  # (host name or None, reason) -> events in the last hour
        self.round_trips = Histogram()
        self.closed = {"received": 0, "sent": 0, "rekeys": 0}
        self.last_seen: dict[str, tuple[float, str]] = {}  # fingerprint -> (when it left, address)

    def refused(self, reason: str, host: str | None = None) -> None:
        """Count a refusal; ``host`` names the authorized host it concerns (None: unknown)."""
        if reason not in REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        self.totals[reason] += 1
        self.recent.add((host, reason))

    def replaced(self) -> None:
        self.totals[REPLACED] += 1

    def connection_closed(self, transport: Any) -> None:
        """Keep what a connection counted, as it goes."""
        self.closed["received"] += transport.bytes_received
        self.closed["sent"] += transport.bytes_sent
        self.closed["rekeys"] += transport.rekeys_completed
        avatar = getattr(transport, "avatar", None)
        if avatar is not None:
            peer = avatar.peer_address()
            address = f"{peer.host}:{peer.port}" if peer is not None else "?"
            self.last_seen.pop(avatar.entry.fingerprint, None)
            self.last_seen[avatar.entry.fingerprint] = (self.clock.seconds(), address)
            while len(self.last_seen) > self.max_last_seen:
                del self.last_seen[next(iter(self.last_seen))]

    def recent_refusals(self, host: str | None = None, everyone: bool = False) -> dict[str, int]:
        """Refusals in the last hour by reason: of ``host`` (None: of no known host), or of ``everyone``."""
        counts: Counter[str] = Counter()
        for (name, reason), n in self.recent.counts().items():
            if everyone or name == host:
                counts[reason] += n
        return dict(sorted(counts.items()))
