"""The node's Prometheus counters as tests read them: over its monitoring HTTP server
(:func:`metrics`, :func:`value`) or straight from an in-process receiver (:func:`refused`)."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.receive.scp import Receiver

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str) -> tuple[int, str]:
    """Status and body of ``GET http://127.0.0.1:<port><path>``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # its response, closed
            return exc.code, exc.read().decode()


def metrics(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def refused(rx: Receiver, reason: str) -> float:
    """The receiver's dicom_node_peers_refused_total{reason} (monitor.counters)."""
    registry = CollectorRegistry()
    registry.register(rx.context.counters)
    value = registry.get_sample_value("dicom_node_peers_refused_total", {"reason": reason})
    return float(value or 0.0)
