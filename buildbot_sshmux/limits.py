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

    ``max_connections_per_host``: when a host key opens one connection more,
    the oldest is closed.  The newest wins because a host that reconnects
    after a crash or a cut must not wait for its old, half-open connection to
    time out; two launchers sharing one key would take turns, and the log
    says so each time.
    """

    login_grace_time: float = 30.0
    max_startups: tuple[int, int, int] = (10, 30, 100)
    max_auth_tries: int = 6
    max_channels: int = 4096
    max_connections_per_host: int = 1


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
