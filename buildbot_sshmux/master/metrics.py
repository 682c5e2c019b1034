"""The master's Prometheus metrics: `SSHMuxService(metrics=9101)` (needs prometheus_client).

One collector per service reads the service at scrape time: gauges from
the connections open now, counters from `ServerStats` (incremented where
each event happens) plus what the open connections have counted so far.

===========================================  =======  =====================================
sshmux_hosts_connected                       gauge    worker hosts logged in (connections)
sshmux_connections_not_logged_in             gauge    SSH connections not logged in yet
sshmux_authorized_hosts                      gauge    keys in authorized_hosts (and hosts=)
sshmux_sessions{state}                       gauge    PB channels: attached, logging_in, refused
sshmux_bytes_total{direction}                counter  SSH bytes, received and sent
sshmux_keepalive_rtt_seconds                 histo.   keepalive round trips to the hosts
sshmux_auth_failures_total{reason}           counter  refused SSH authentications
sshmux_channel_refusals_total{reason}        counter  refused channels and global requests
sshmux_worker_logins_refused_total{reason}   counter  refused PB logins on the channels
sshmux_rekeys_total                          counter  key re-exchanges completed
sshmux_duplicate_connections_total{outcome}  counter  a key connected twice: replaced, refused
===========================================  =======  =====================================

Every reason of `stats.REASONS` is exported from the start, at 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from buildbot_sshmux.master import stats as S


class MasterCollector:
    """Reads one `SSHMuxService` when Prometheus scrapes."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        service = self.service
        stats: S.ServerStats = service.stats or S.ServerStats(service.master.reactor)  # not configured yet
        factory = service.factory
        connections = list(factory.connections) if factory is not None else []
        logged_in = [c for c in connections if c.authenticated]

        yield GaugeMetricFamily(
            "sshmux_hosts_connected", "Worker hosts logged in (SSH connections).", value=len(logged_in)
        )
        yield GaugeMetricFamily(
            "sshmux_connections_not_logged_in",
            "SSH connections that have not logged in yet.",
            value=len(connections) - len(logged_in),
        )
        yield GaugeMetricFamily(
            "sshmux_authorized_hosts",
            "Host keys in authorized_hosts (and hosts=).",
            value=len({e.key.blob() for e in service.entries}),
        )
        sessions = {"attached": 0, "logging_in": 0, "refused": 0}
        for connection in logged_in:
            for session in connection.avatar.open_sessions():
                sessions[session["state"].replace(" ", "_")] += 1
        by_state = GaugeMetricFamily(
            "sshmux_sessions", "Worker sessions (PB channels) by state.", labels=["state"]
        )
        for state, n in sessions.items():
            by_state.add_metric([state], n)
        yield by_state

        received = stats.closed["received"] + sum(c.bytes_received for c in connections)
        sent = stats.closed["sent"] + sum(c.bytes_sent for c in connections)
        traffic = CounterMetricFamily(
            "sshmux_bytes", "SSH bytes to and from worker hosts, on the wire.", labels=["direction"]
        )
        traffic.add_metric(["received"], received)
        traffic.add_metric(["sent"], sent)
        yield traffic

        yield HistogramMetricFamily(
            "sshmux_keepalive_rtt_seconds",
            "Round trips of the keepalives sent to worker hosts.",
            buckets=stats.round_trips.cumulative(),
            sum_value=stats.round_trips.sum,
        )
        for kind, name, text in (
            (S.AUTH, "sshmux_auth_failures", "Refused SSH authentications, by reason."),
            (S.CHANNEL, "sshmux_channel_refusals", "Refused channels and global requests, by reason."),
            (S.LOGIN, "sshmux_worker_logins_refused", "Refused PB logins on hosts' channels, by reason."),
        ):
            by_reason = CounterMetricFamily(name, text, labels=["reason"])
            for reason in S.reasons_of(kind):
                by_reason.add_metric([reason], stats.totals[reason])
            yield by_reason
        yield CounterMetricFamily(
            "sshmux_rekeys",
            "Key re-exchanges completed (either end started them).",
            value=stats.closed["rekeys"] + sum(c.rekeys_completed for c in connections),
        )
        duplicates = CounterMetricFamily(
            "sshmux_duplicate_connections",
            "A host key connected again: the old connection replaced, or the new one refused.",
            labels=["outcome"],
        )
        duplicates.add_metric(["replaced"], stats.totals[S.REPLACED])
        duplicates.add_metric(["refused"], stats.totals["duplicate_connection"])
        yield duplicates
