"""Log lines about what a peer sent, that the peer cannot flood or forge.

Peer input only ever goes into a named field, after `quote` has escaped and
truncated it; and each peer gets a `RateLimitedLog`, so a peer that makes the
master refuse things thousands of times a second costs a few lines a minute
and one "N more suppressed" summary.
"""

from __future__ import annotations

import reprlib
from typing import Any

from twisted.logger import Logger, LogLevel

QUOTE_LIMIT = 80


def quote(value: bytes | str | Any, limit: int = QUOTE_LIMIT) -> str:
    """``value`` as one printable ASCII string of at most about ``limit`` characters."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        text = raw[:limit].decode("utf-8", "replace")
        more = len(raw) - limit
    else:
        text = str(value)
        more = len(text) - limit
        text = text[:limit]
    escaped = text.encode("unicode_escape").decode("ascii")
    return f"{escaped}...(+{more} bytes)" if more > 0 else escaped


_short = reprlib.Repr()  # long strings and lists are cut before they are formatted
_short.maxstring = _short.maxother = QUOTE_LIMIT


def short_repr(value: Any) -> str:
    """``repr(value)`` of a peer's value, as one ASCII line of at most ``QUOTE_LIMIT`` characters."""
    return _short.repr(value).encode("ascii", "backslashreplace").decode("ascii")[:QUOTE_LIMIT]


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds for one peer.

    Lines past that are counted; the next line let through (or `close`) says
    how many were suppressed.
    """

    def __init__(self, logger: Logger, clock: Any, burst: int = 10, period: float = 60.0) -> None:
        self.logger = logger
        self.clock = clock
        self.burst = burst
        self.period = period
        self.suppressed = 0
        self._window_start = clock.seconds()
        self._in_window = 0

    def emit(self, level: LogLevel, format: str, **fields: Any) -> bool:
        """Log the line unless this peer is over its rate; True if it was logged."""
        now = self.clock.seconds()
        if now - self._window_start >= self.period:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        if self.suppressed:
            format += " ({suppressed} more lines about this peer suppressed)"
            fields["suppressed"], self.suppressed = self.suppressed, 0
        self.logger.emit(level, format, **fields)
        return True

    def warn(self, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.warn, format, **fields)

    def info(self, format: str, **fields: Any) -> bool:
        return self.emit(LogLevel.info, format, **fields)

    def close(self, who: str) -> None:
        """Say how many lines were suppressed since the last one (at disconnect)."""
        if self.suppressed:
            self.logger.info(
                "{who}: {suppressed} more lines about this peer suppressed",
                who=who,
                suppressed=self.suppressed,
            )
            self.suppressed = 0


class PeerLogs:
    """One `RateLimitedLog` per source address, for the most recent ``size`` sources."""

    def __init__(self, logger: Logger, clock: Any, size: int = 4096, **rate: Any) -> None:
        self.logger = logger
        self.clock = clock
        self.size = size
        self.rate = rate
        self._logs: dict[str, RateLimitedLog] = {}

    def __call__(self, source: str) -> RateLimitedLog:
        peer_log = self._logs.pop(source, None)
        if peer_log is None:
            peer_log = RateLimitedLog(self.logger, self.clock, **self.rate)
            if len(self._logs) >= self.size:
                del self._logs[next(iter(self._logs))]  # the least recently used
        self._logs[source] = peer_log
        return peer_log
