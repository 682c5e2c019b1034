"""The master's limits on what worker hosts may ask of it, like sshd's."""

from __future__ import annotations

import random

from attrs import frozen


@frozen
class ServerLimits:
    """Limits of `SSHMuxService`; each has a safe default and is an argument.

    ``max_startups`` is OpenSSH's ``start:rate:full``: past ``start``
    unauthenticated connections new ones are dropped with probability
    ``rate`` percent, rising linearly to 100% at ``full``.

    ``max_startups_per_source``: unauthenticated connections from one
    address at once (OpenSSH's ``PerSourceMaxStartups``).  And unlike
    OpenSSH, a source with none pending is admitted until ``full``: one
    address's idle connections cannot make everyone else's a lottery.

    ``max_connections_per_host``: when a host key opens one connection more,
    the master sends the oldest a keepalive and waits up to
    ``duplicate_probe_timeout`` seconds.  Answered: the newcomer is refused
    ("too many connections"), so a second launcher or an admin's test cannot
    detach a live host.  Not answered: the old connection is half open (a
    crash, a cut) and the newcomer replaces it.

    ``max_backlog``: bytes of SSH messages (not channel data, which has its
    own budget) the master holds for one connection: queued during a key
    exchange, or written while the peer's socket is full.  Past it the peer
    is not reading, and it is dropped.

    ``max_unauthenticated_memory``: bytes held for all connections not yet
    logged in together (their unparsed input and their backlog); the
    connection that passes it is dropped.
    """

    login_grace_time: float = 30.0
    max_startups: tuple[int, int, int] = (10, 30, 100)
    max_startups_per_source: int = 10
    max_auth_tries: int = 6
    max_channels: int = 4096
    max_connections_per_host: int = 1
    duplicate_probe_timeout: float = 3.0
    max_backlog: int = 1024 * 1024
    max_unauthenticated_memory: int = 16 * 1024 * 1024


# Fixed limits on what a peer may send before it has logged in, as OpenSSH's
# are fixed.  The largest a real client sends: an RSA-16384 key blob and its
# signature are about 2 KiB each; a post-quantum key exchange message is
# about 1.2 KiB.
PREAUTH_MAX_PACKET = 32 * 1024
MAX_NAME = 64  # an algorithm, method or service name (RFC 4251, section 6)
MAX_USER_NAME = 256
MAX_KEY_BLOB = 16 * 1024
MAX_SIGNATURE = 16 * 1024


class StartupGate:
    """OpenSSH's MaxStartups random early drop of unauthenticated connections."""

    def __init__(self, start: int, rate: int, full: int, rng: random.Random | None = None) -> None:
        if not 0 < start <= full or not 0 <= rate <= 100:
            raise ValueError("max_startups must be (start, rate, full) with 0 < start <= full, rate 0-100")
        self.start, self.rate, self.full = start, rate, full
        self.rng = rng or random.Random()

    def admit(self, unauthenticated: int) -> bool:
        """Whether to accept one more connection while ``unauthenticated`` are pending."""
        if unauthenticated < self.start:
            return True
        if unauthenticated >= self.full:
            return False
        span = self.full - self.start
        drop = self.rate + (100 - self.rate) * (unauthenticated - self.start) / span
        return self.rng.uniform(0, 100) >= drop
