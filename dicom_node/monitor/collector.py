"""The gauges computed at scrape time: from the database, the data folder's file system, the
configuration and the worklist poll of this receiver.

They are read when Prometheus asks, not counted as things happen, so they are right whichever
process or machine changed the database: workers on other hosts, a second receiver, the
``dicom-node`` commands of an administrator.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from importlib import metadata

from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric

from dicom_node.config import Config
from dicom_node.log import get_logger
from dicom_node.monitor.counters import PREFIX
from dicom_node.monitor.database import MonitorDatabase, Snapshot
from dicom_node.store.db import utcnow
from dicom_node.worklist.refresh import WorklistPoller

log = get_logger()

#: Bytes in the retention section's GB (the same decimal unit retention.py uses).
GB = 1e9


def _gauge(name: str, documentation: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(labels))


def _seconds_since(then: datetime | None, now: datetime) -> float:
    return 0.0 if then is None else max((now - then).total_seconds(), 0.0)


def _timestamp(naive_utc: datetime) -> float:
    return naive_utc.replace(tzinfo=UTC).timestamp()


def snapshot_metrics(snapshot: Snapshot, config: Config, now: datetime) -> Iterator[Metric]:
    """The database's gauges from one snapshot."""
    studies = _gauge("studies", "Studies in the database, by state.", ["state"])
    for state, count in snapshot.studies.items():
        studies.add_metric([state], count)
    jobs = _gauge("jobs", "Jobs in the database, by state (failed: waiting for an "
                  "administrator's `dicom-node jobs retry`).", ["state"])
    for state, count in snapshot.jobs.items():
        jobs.add_metric([state], count)
    yield from (studies, jobs)
    yield GaugeMetricFamily(
        f"{PREFIX}_oldest_pending_job_age_seconds",
        "Seconds since the longest-waiting pending job a worker could claim became due "
        "(0: none is waiting).", value=_seconds_since(snapshot.oldest_due_pending, now))
    yield GaugeMetricFamily(
        f"{PREFIX}_oldest_running_job_age_seconds",
        "Seconds since a worker claimed the longest-running job: how long its current attempt "
        "has been running (0: none is running).",
        value=_seconds_since(snapshot.oldest_running, now))
    yield GaugeMetricFamily(
        f"{PREFIX}_jobs_lease_expired",
        "Running jobs whose worker stopped renewing the lease (crashed or hung); another "
        "worker takes them over.", value=snapshot.leases_expired)
    held = _gauge("send_slots_held", "Association slots of a destination held by workers "
                  "sending to it now.", ["destination"])
    limit = _gauge("send_slots_limit", "A destination's max_associations: the most slots "
                   "all workers together hold.", ["destination"])
    for destination in config.destinations:
        held.add_metric([destination.name], snapshot.slots_held.get(destination.name, 0))
        limit.add_metric([destination.name], destination.max_associations)
    yield from (held, limit)
    commitments = _gauge("commitments", "Storage Commitment transactions since the database "
                         "was made, by state (requested: awaiting the destination's report).",
                         ["state"])
    for state, count in snapshot.commitments.items():
        commitments.add_metric([state], count)
    yield commitments
    yield GaugeMetricFamily(
        f"{PREFIX}_oldest_pending_commitment_age_seconds",
        "Seconds since the oldest Storage Commitment request still awaiting its report was "
        "sent; 0 when none is.",
        value=_seconds_since(snapshot.oldest_requested_commitment, now))
    yield from outage_metrics(snapshot, config, now)


def outage_metrics(snapshot: Snapshot, config: Config, now: datetime) -> Iterator[Metric]:
    """Destinations the workers cannot reach now, and the jobs waiting for them (one series
    per configured destination, and per destination that jobs or an outage still name)."""
    names = sorted({d.name for d in config.destinations} | set(snapshot.awaiting_delivery)
                   | set(snapshot.unreachable_since))
    awaiting = _gauge("jobs_awaiting_delivery", "Jobs whose results are ready and wait for "
                      "the destination to be reachable again (pending, spending none of "
                      "max_attempts, for up to jobs.delivery_window_hours).", ["destination"])
    down = _gauge("destination_unreachable", "1 while the workers' last try could not reach "
                  "the destination (refused or timed-out connection, TLS handshake, rejected "
                  "or aborted association), 0 once a try reaches it.", ["destination"])
    seconds = _gauge("destination_unreachable_seconds", "Seconds since the destination's "
                     "outage began (its first failed try); 0 while it is reachable.",
                     ["destination"])
    for name in names:
        since = snapshot.unreachable_since.get(name)
        awaiting.add_metric([name], snapshot.awaiting_delivery.get(name, 0))
        down.add_metric([name], int(since is not None))
        seconds.add_metric([name], _seconds_since(since, now))
    yield from (awaiting, down, seconds)


def disk_metrics(config: Config) -> Iterator[Metric]:
    """Free and total space of data_dir's file system, and retention's threshold."""
    try:
        usage = shutil.disk_usage(config.node.data_dir)
    except OSError as exc:
        log.warning("monitor_disk_unreadable", data_dir=str(config.node.data_dir),
                    reason=str(exc))
    else:
        yield GaugeMetricFamily(
            f"{PREFIX}_data_dir_free_bytes", "Bytes free for the node on data_dir's file "
            "system (what retention compares with min_free_gb).", value=usage.free)
        yield GaugeMetricFamily(f"{PREFIX}_data_dir_size_bytes",
                                "Size of data_dir's file system in bytes.", value=usage.total)
    retention = config.retention
    if retention is not None and retention.enabled:
        yield GaugeMetricFamily(
            f"{PREFIX}_retention_min_free_bytes", "retention.min_free_gb in bytes: below this, "
            "retention deletes finished studies whatever their age.",
            value=retention.min_free_gb * GB)


def worklist_metrics(config: Config, poller: WorklistPoller) -> Iterator[Metric]:
    """The worklist poll of this receiver, when [worklist] is enabled."""
    if config.worklist is None or not config.worklist.enabled:
        return
    last = poller.last_success_at
    yield GaugeMetricFamily(
        f"{PREFIX}_worklist_last_success_timestamp_seconds",
        "Unix time of this receiver's last successful worklist poll (0: none since it "
        "started).", value=0.0 if last is None else _timestamp(last))
    yield GaugeMetricFamily(
        f"{PREFIX}_worklist_failed_polls", "Failed worklist polls in a row (0: the RIS "
        "answered the last poll).", value=poller.failed_polls)
    yield GaugeMetricFamily(f"{PREFIX}_worklist_poll_interval_seconds",
                            "worklist.poll_seconds.", value=config.worklist.poll_seconds)


def _version() -> str:
    try:
        return metadata.version("dicom-node")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def build_info() -> Metric:
    info = InfoMetricFamily(f"{PREFIX}_build", "The dicom-node version and Python that run.")
    info.add_metric([], {"version": _version(), "python": platform.python_version()})
    return info


class NodeCollector:
    """A prometheus_client collector: every gauge of the node, read at each scrape."""

    def __init__(self, config: Callable[[], Config], database: MonitorDatabase,
                 worklist: WorklistPoller | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        #: The current config (the receiver's, swapped on reload).
        self._config = config
        self.database = database
        self.worklist = worklist
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        config = self._config()
        yield build_info()
        now = self._clock()
        snapshot, _error = self.database.snapshot([d.name for d in config.destinations], now)
        yield GaugeMetricFamily(
            f"{PREFIX}_database_up", "1 when this scrape read the database, 0 when it could "
            "not (the database's gauges are then missing).", value=int(snapshot is not None))
        if snapshot is not None:
            yield from snapshot_metrics(snapshot, config, now)
        yield from disk_metrics(config)
        if self.worklist is not None:
            yield from worklist_metrics(config, self.worklist)
