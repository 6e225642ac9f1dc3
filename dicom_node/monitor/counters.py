"""What one receiver process counts while it runs (Prometheus counters, process-local).

They start at 0 when the receiver starts; Prometheus' ``rate()`` and ``increase()`` handle the
reset of a restart. Each :class:`ReceiverCounters` is its own collector, not registered in
prometheus_client's global registry, so two receivers in one process (the tests) count apart.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter
from prometheus_client.metrics_core import Metric

from dicom_node.receive.status import StoreStatus

PREFIX = "dicom_node"
#: The reasons of dicom_node_peers_refused_total (a bounded label set).
PEER_REFUSALS = ("connection_cap", "evicted", "association_request_timeout", "pdu_too_long",
                 "pdu_read_timeout", "tls_handshake")


def status_label(status: int) -> str:
    """A DIMSE status as the four hex digits the standard writes (``A700``)."""
    return f"{status:04X}"


class ReceiverCounters:
    """Counters of the SCP; a collector for a ``CollectorRegistry``."""

    def __init__(self) -> None:
        self.instances_received = Counter(
            f"{PREFIX}_instances_received", "Instances stored and answered with Success.",
            registry=None)
        self.store_failures = Counter(
            f"{PREFIX}_store_failures", "C-STORE requests answered with a failure status, by "
            "status (A700 out of resources, C000 cannot understand, 0110 processing failure).",
            ["status"], registry=None)
        self.associations_accepted = Counter(
            f"{PREFIX}_associations_accepted", "Associations accepted.", registry=None)
        self.associations_rejected = Counter(
            f"{PREFIX}_associations_rejected", "Associations rejected (calling AE title not "
            "allowed, called AE title wrong, max_associations reached).", registry=None)
        self.peers_refused = Counter(
            f"{PREFIX}_peers_refused", "Connections the receiver cut to bound what a peer can "
            "hold, by reason: connection_cap (node.max_connections or "
            "node.max_connections_per_host, all associations), evicted (a connection still "
            "negotiating, closed to make room for a new one), association_request_timeout "
            "(node.association_request_timeout_seconds), pdu_too_long "
            "(node.max_pdu_bytes), pdu_read_timeout (node.network_timeout_seconds), "
            "tls_handshake (a failed DICOM TLS handshake).", ["reason"], registry=None)
        for reason in PEER_REFUSALS:
            self.peers_refused.labels(reason)
        for status in StoreStatus:
            if status != StoreStatus.SUCCESS:  # each known status shows 0 before it happens
                self.store_failures.labels(status_label(status))

    def stored(self, status: int) -> None:
        """Count one C-STORE answer."""
        if status == StoreStatus.SUCCESS:
            self.instances_received.inc()
        else:
            self.store_failures.labels(status_label(status)).inc()

    def peer_refused(self, reason: str) -> None:
        """Count one connection cut by a limit (:data:`PEER_REFUSALS`)."""
        self.peers_refused.labels(reason).inc()

    def collect(self) -> Iterable[Metric]:
        for counter in (self.instances_received, self.store_failures,
                        self.associations_accepted, self.associations_rejected,
                        self.peers_refused):
            yield from counter.collect()
