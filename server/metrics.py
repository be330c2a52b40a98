# SPDX-License-Identifier: GPL-3.0-or-later
"""What the server counts and measures, for Prometheus (``--metrics``; README, "Metrics").

Two kinds of numbers, each taken where it is cheapest and cannot drift:

* counters (secrets sent, refusals by reason, checker failures, state-write failures) add up
  the server's typed events (:mod:`server.events`): :meth:`ServerMetrics.on_event` subscribes;
* gauges (clients by state, expiry and last check per client, connections open, handshakes in
  progress, whether the state can be saved, etcd in sync) are read from the running server at
  each scrape, so they are never stale and cost nothing between scrapes.

Label cardinality is bounded by the configuration: the only label values are the names of
configured clients (a client removed from clients.conf disappears at the next scrape) and the
fixed refusal reasons.  An unknown key is counted under ``reason="unknown_key"``, never as a
label of its own: anyone can present any key.

prometheus-client is imported only here, and this module only when ``--metrics`` is given.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from server import events
from server.clients import Client
from server.events import Refusal

_Family = CounterMetricFamily | GaugeMetricFamily

#: Seconds of encoding after which the exposition lets the loop run (between two families).
SLICE = 0.002

#: The end of an OpenMetrics exposition, which each family's encoding has.
_EOF = b"# EOF\n"

#: The checker events that count as a failure: it failed or was killed, was stopped (it hung
#: until its next turn, or the client was disabled under it), or could not be started.
_CHECKER_FAILURES = (events.CheckerFinished, events.CheckerStopped, events.CheckerNotStarted)


class Connections(Protocol):
    """What the listener (:class:`server.listener.Listener`) tells of its connections now."""

    @property
    def open_connections(self) -> int:
        """Every connection open."""

    @property
    def handshakes_in_progress(self) -> int:
        """Connections short of a finished handshake (reading the protocol line, or in the
        TLS handshake)."""


class ServerMetrics:
    """The counters, and a collector that reads the gauges from the running server.

    ``clients`` is the client table (iterated at each scrape); ``connections`` the listener;
    ``state_writable`` says whether the state can be saved (the last write succeeded and the
    directory takes files).  :attr:`etcd_in_sync` is set when the server has a fleet sync
    (``--etcd``); without it ``mandos_etcd_in_sync`` is not exported."""

    def __init__(self, clients: Iterable[Client], connections: Connections,
                 state_writable: Callable[[], bool]) -> None:
        self.clients = clients
        self.connections = connections
        self.state_writable = state_writable
        self.etcd_in_sync: Callable[[], bool] | None = None
        self.secrets_sent: dict[str, int] = {}
        self.checker_failures: dict[str, int] = {}
        self.refusals = dict.fromkeys(Refusal, 0)
        self.state_write_failures = 0

    # -- counting ---------------------------------------------------------------------------

    def subscribe(self, publisher: events.Publisher) -> Callable[[], None]:
        """Count the events of ``publisher`` from now on; returns the function that stops."""
        return publisher.subscribe(
            self.on_event, events.SecretSent, events.RequestRefused, events.ConnectionFailed,
            *_CHECKER_FAILURES, events.StateWriteFailed)

    def on_event(self, event: events.ServerEvent) -> None:
        if isinstance(event, events.SecretSent):
            self.secrets_sent[event.client] = self.secrets_sent.get(event.client, 0) + 1
        elif isinstance(event, events.RequestRefused):
            self.refusals[event.reason] += 1
        elif isinstance(event, events.ConnectionFailed):
            if event.refusal is not None:
                self.refusals[event.refusal] += 1
        elif isinstance(event, _CHECKER_FAILURES):
            if not (isinstance(event, events.CheckerFinished) and event.succeeded):
                self.checker_failures[event.client] = (
                    self.checker_failures.get(event.client, 0) + 1)
        elif isinstance(event, events.StateWriteFailed):
            self.state_write_failures += 1

    # -- the exposition ---------------------------------------------------------------------

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        """The text for a scraper whose ``Accept`` header is ``accept``: OpenMetrics if it
        asks for it (Prometheus does), else the Prometheus text format.

        Built one metric family at a time, letting the loop run whenever :data:`SLICE` has
        passed: encoding a thousand clients takes tens of milliseconds, which must not hold
        an unlock up in one piece, while a few dozen take well under one, and each turn of a
        loop busy with a storm of handshakes would make the scrape wait longer."""
        encoder, content_type = choose_encoder(accept)
        parts = []
        pause = time.monotonic() + SLICE
        for family in self.collect():  # each family is read when it is reached
            parts.append(encoder(_OneFamily(family)).removesuffix(_EOF))
            if time.monotonic() >= pause:
                await asyncio.sleep(0)
                pause = time.monotonic() + SLICE
        if content_type.startswith("application/openmetrics-text"):
            parts.append(_EOF)
        return b"".join(parts), content_type

    def collect(self) -> Iterator[Metric]:
        clients = list(self.clients)
        names = {client.name for client in clients}
        # Counts of clients gone from the configuration are dropped with them.
        for counts in (self.secrets_sent, self.checker_failures):
            for name in [name for name in counts if name not in names]:
                del counts[name]
        for family, value in self._per_client():
            for client in clients:
                number = value(client)
                if number is not None:
                    family.add_metric([client.name], number)
            yield family
        refusals = CounterMetricFamily("mandos_refusals", "Connections that got no secret, "
                                       "by reason", labels=["reason"])
        for reason, count in self.refusals.items():
            refusals.add_metric([reason.name.lower()], count)
        yield refusals
        by_state = GaugeMetricFamily("mandos_clients", "Configured clients, by state",
                                     labels=["state"])
        enabled = sum(1 for client in clients if client.enabled)
        by_state.add_metric(["enabled"], enabled)
        by_state.add_metric(["disabled"], len(clients) - enabled)
        yield by_state
        yield GaugeMetricFamily("mandos_connections_open", "Client connections open now",
                                value=self.connections.open_connections)
        yield GaugeMetricFamily("mandos_handshakes_in_progress", "Client connections short "
                                "of a finished TLS handshake now",
                                value=self.connections.handshakes_in_progress)
        yield CounterMetricFamily("mandos_state_write_failures", "Times the state file could "
                                  "not be written, once per reason until a write succeeds "
                                  "again", value=self.state_write_failures)
        yield GaugeMetricFamily("mandos_state_writable", "1 if the state can be saved (the "
                                "last write succeeded and the directory is writable), else 0",
                                value=int(self.state_writable()))
        if self.etcd_in_sync is not None:
            yield GaugeMetricFamily("mandos_etcd_in_sync", "1 if this server is in sync with "
                                    "etcd, 0 if it is detached", value=int(self.etcd_in_sync()))

    def _per_client(self) -> list[tuple[_Family, Callable[[Client], float | None]]]:
        """The families labelled by client, each with its value for a client (None: none)."""
        def timestamp(when: datetime.datetime | None) -> float | None:
            return None if when is None else when.timestamp()

        labels = ["client"]
        return [
            (CounterMetricFamily("mandos_secrets_sent", "Secrets sent, by client",
                                 labels=labels),
             lambda client: self.secrets_sent.get(client.name, 0)),
            (CounterMetricFamily("mandos_client_checker_failures", "Checkers that failed, "
                                 "were killed or were stopped as hanging", labels=labels),
             lambda client: self.checker_failures.get(client.name, 0)),
            (GaugeMetricFamily("mandos_client_enabled", "1 if the client is enabled",
                               labels=labels),
             lambda client: int(client.enabled)),
            (GaugeMetricFamily("mandos_client_last_checked_ok_timestamp_seconds", "When the "
                               "client's checker last succeeded (Unix time)", labels=labels),
             lambda client: timestamp(client.state.last_checked_ok)),
            (GaugeMetricFamily("mandos_client_expiry_timestamp_seconds", "When an enabled "
                               "client is disabled unless a checker succeeds first (Unix "
                               "time)", labels=labels),
             lambda client: timestamp(client.expires) if client.enabled else None),
            (GaugeMetricFamily("mandos_client_checker_interval_seconds", "Seconds between "
                               "the client's checkers", labels=labels),
             lambda client: client.settings.interval.total_seconds()),
        ]


class _OneFamily(CollectorRegistry):
    """A registry of one metric family: what the encoders take."""

    def __init__(self, family: Metric) -> None:
        super().__init__(auto_describe=False)
        self._family = family

    def collect(self) -> Iterator[Metric]:
        yield self._family
