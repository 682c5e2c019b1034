"""Counts both ends keep for their status and metrics: plain Python, no dependency.

`Histogram` holds bucket counts as Prometheus reads them; `RecentCounts`
holds how often something happened in the last hour, per key, in bounded
memory.  Both are updated where the event happens (in the reactor's thread)
and read when a status or a scrape asks.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: the bucket bounds of the keepalive round-trip histograms."""


class Histogram:
    """Observations counted into buckets with upper bounds ``bounds`` (and +Inf)."""

    def __init__(self, bounds: Sequence[float] = RTT_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # value <= bounds[i]
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, observations <= le)`` for each bound, then ``("+Inf", count)``: Prometheus's buckets."""
        result, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            result.append((repr(float(bound)), float(running)))
        result.append(("+Inf", float(self.count)))
        return result


class RecentCounts:
    """How many events of each key happened in the last ``window`` seconds.

    Each key keeps one ``[slot start, count]`` pair per ``slot`` seconds that
    saw an event, so at most ``window / slot`` pairs (60 for an hour counted
    per minute) however many events arrive; at most ``max_keys`` keys are
    kept, the one whose last event is oldest going first.  A count may
    include up to one slot's worth of events older than the window.
    """

    def __init__(self, clock: Any, window: float = 3600.0, slot: float = 60.0, max_keys: int = 4096) -> None:
        self.clock = clock
        self.window = window
        self.slot = slot
        self.max_keys = max_keys
        self._slots: dict[Hashable, deque[list[float]]] = {}
        self._last: dict[Hashable, float] = {}

    def add(self, key: Hashable, n: int = 1) -> None:
        now = self.clock.seconds()
        start = now - now % self.slot
        slots = self._slots.get(key)
        if slots is None:
            if len(self._slots) >= self.max_keys:
                oldest = min(self._last, key=self._last.__getitem__)
                del self._slots[oldest], self._last[oldest]
            slots = self._slots[key] = deque(maxlen=max(1, int(self.window // self.slot) + 1))
        if slots and slots[-1][0] == start:
            slots[-1][1] += n
        else:
            slots.append([start, n])
        self._last[key] = now

    def _prune(self, now: float) -> None:
        horizon = now - self.window - self.slot
        for key in list(self._slots):
            slots = self._slots[key]
            while slots and slots[0][0] <= horizon:
                slots.popleft()
            if not slots:
                del self._slots[key], self._last[key]

    def counts(self, where: Callable[[Any], bool] = lambda key: True) -> dict[Any, int]:
        """The count of each key (of those ``where`` accepts) with events in the window."""
        now = self.clock.seconds()
        self._prune(now)
        return {key: int(sum(n for _start, n in slots)) for key, slots in self._slots.items() if where(key)}
