"""The launcher's Prometheus metrics: ``metrics = "127.0.0.1:9102"`` in its TOML (needs prometheus_client).

One collector reads the `Launcher` at scrape time.  Counters of a master
start again from 0 when a reload replaces its connection settings.

=================================================  =======  ================================
ssh_worker_masters                                 gauge    masters configured
ssh_worker_masters_connected                       gauge    masters connected (logged in)
ssh_worker_sessions                                gauge    worker sessions running
ssh_worker_sessions_attached                       gauge    sessions logged in to a master
ssh_worker_bytes_total{master,direction}           counter  SSH bytes, received and sent
ssh_worker_keepalive_rtt_seconds{master}           histo.   keepalive round trips
ssh_worker_rekeys_total{master}                    counter  key re-exchanges completed
ssh_worker_logins_refused_total{reason}            counter  PB logins refused: unauthorized
                                                            (name, password, workers=) or
                                                            rejected (e.g. a duplicate name)
ssh_worker_session_moves_total                     counter  sessions that logged in to
                                                            another master of their cluster
=================================================  =======  ================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LOGIN_REFUSALS = ("unauthorized", "rejected")


class LauncherCollector:
    """Reads one `Launcher` when Prometheus scrapes."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher

    def collect(self) -> Iterator[Any]:
        launcher = self.launcher
        links = sorted(launcher.links.items())
        yield GaugeMetricFamily("ssh_worker_masters", "Masters configured.", value=len(links))
        yield GaugeMetricFamily(
            "ssh_worker_masters_connected",
            "Masters this launcher is connected to (logged in).",
            value=sum(1 for _name, link in links if link.connection is not None),
        )
        yield GaugeMetricFamily(
            "ssh_worker_sessions", "Worker sessions running.", value=len(launcher.sessions)
        )
        yield GaugeMetricFamily(
            "ssh_worker_sessions_attached",
            "Worker sessions logged in to a master.",
            value=launcher.attached_count(),
        )
        traffic = CounterMetricFamily(
            "ssh_worker_bytes",
            "SSH bytes to and from each master, on the wire.",
            labels=["master", "direction"],
        )
        rekeys = CounterMetricFamily(
            "ssh_worker_rekeys", "Key re-exchanges completed, per master.", labels=["master"]
        )
        rtt = HistogramMetricFamily(
            "ssh_worker_keepalive_rtt_seconds", "Round trips of the keepalives sent to each master.",
            labels=["master"],
        )  # fmt: skip
        for name, link in links:
            counts = link.counts()
            traffic.add_metric([name, "received"], counts["received"])
            traffic.add_metric([name, "sent"], counts["sent"])
            rekeys.add_metric([name], counts["rekeys"])
            rtt.add_metric([name], link.round_trips.cumulative(), link.round_trips.sum)
        yield traffic
        yield rtt
        yield rekeys
        refused = CounterMetricFamily(
            "ssh_worker_logins_refused", "PB logins the masters refused, by reason.", labels=["reason"]
        )
        for reason in LOGIN_REFUSALS:
            refused.add_metric([reason], launcher.counters["logins_refused", reason])
        yield refused
        yield CounterMetricFamily(
            "ssh_worker_session_moves",
            "Sessions that logged in to another master of their cluster than before.",
            value=launcher.counters["moves"],
        )
