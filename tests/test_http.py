"""The receiver's HTTP endpoint: /metrics after real C-STOREs, the probes, and [http] in the config.

Every request is a real HTTP request (urllib) to the endpoint of a real SCP; the metrics are read
with prometheus_client's own parser.
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select, text, update
from structlog.testing import capture_logs

from dicom_node import complete
from dicom_node.config import Config, HttpSection, load_config
from dicom_node.errors import ConfigError
from dicom_node.jobs.queue import create_jobs
from dicom_node.monitor.health import serving
from dicom_node.monitor.server import MAX_CONNECTIONS, MonitorServer, warn_if_restart_needed
from dicom_node.receive.scp import Receiver
from dicom_node.store.db import Job, SendSlot, Study, utcnow
from dicom_node.worklist.refresh import WorklistPoller
from tests.conftest import BASIC_CONFIG, free_port, running_receiver, sample_file, write_config
from tests.support.metrics import Samples, get, metrics, value
from tests.support.peers import NodeProcess, is_listening, wait_until

MONITORED = """
[http]
port = {http_port}

[retention]
min_free_gb = 2.5

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
max_associations = 3
"""

WORKLIST = """
[worklist]
ae_title = "RIS"
host = "127.0.0.1"
port = 1
"""

@dataclass
class Monitored:
    rx: Receiver
    monitor: MonitorServer

    def get(self, path: str) -> tuple[int, str]:
        return get(self.monitor.port, path)

    def metrics(self) -> Samples:
        return metrics(self.monitor.port)


def _config(tmp_path: Path, extra: str = "", node_extra: str = "") -> Config:
    text_ = (BASIC_CONFIG.format(port=free_port(), stable=3600, node_extra=node_extra)
             + MONITORED.format(http_port=free_port()) + extra)
    return load_config(write_config(tmp_path, text_))


@pytest.fixture
def monitored(tmp_path: Path) -> Iterator[Monitored]:
    """A receiver (senders STORESCU and TESTSCU only) with its HTTP endpoint."""
    config = _config(tmp_path, node_extra='allowed_calling_aets = ["STORESCU", "TESTSCU"]')
    assert config.http is not None
    with running_receiver(config) as rx:
        monitor = MonitorServer(config.http, rx)
        assert monitor.start()
        try:
            yield Monitored(rx, monitor)
        finally:
            monitor.stop()


def _study(folder: Path, count: int = 3) -> tuple[str, list[Path]]:
    """``count`` instances of one new CT study, written to ``folder``."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = dcmread(sample_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return study, paths


def _dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
                          text=True, timeout=60, check=False)


def _storescu(port: int, paths: list[Path]) -> None:
    done = _dcmtk("storescu", "-aec", "DICOM_NODE", "127.0.0.1", str(port), *map(str, paths))
    assert done.returncode == 0, done.stderr


def _send_without_study_uid(rx: Receiver) -> int:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


# --------------------------------------------------------------------------------------------
# /metrics


def test_metrics_count_what_storescu_sent_and_read_the_database(monitored: Monitored,
                                                                tmp_path: Path) -> None:
    _storescu(monitored.rx.port, _study(tmp_path / "in")[1])

    samples = monitored.metrics()
    assert value(samples, "dicom_node_instances_received_total") == 3
    assert value(samples, "dicom_node_associations_accepted_total") == 1
    assert value(samples, "dicom_node_associations_rejected_total") == 0
    assert value(samples, "dicom_node_store_failures_total", status="C000") == 0
    assert value(samples, "dicom_node_database_up") == 1
    assert value(samples, "dicom_node_studies", state="receiving") == 1
    assert all(value(samples, "dicom_node_studies", state=s) == 0
               for s in ("incomplete", "routed", "unrouted", "done", "failed"))
    assert all(value(samples, "dicom_node_jobs", state=s) == 0
               for s in ("pending", "running", "done", "failed"))
    assert value(samples, "dicom_node_oldest_pending_job_age_seconds") == 0
    assert value(samples, "dicom_node_send_slots_held", destination="pacs") == 0
    assert value(samples, "dicom_node_send_slots_limit", destination="pacs") == 3
    assert value(samples, "dicom_node_retention_min_free_bytes") == 2.5e9
    assert value(samples, "dicom_node_data_dir_free_bytes") > 0
    build = [dict(labels) for (name, labels) in samples if name == "dicom_node_build_info"]
    assert len(build) == 1 and build[0]["version"] and build[0]["python"]
    assert not any(name.startswith("dicom_node_worklist") for name, _ in samples)


def test_job_gauges_count_by_state_and_age_only_claimable_jobs(monitored: Monitored,
                                                               tmp_path: Path) -> None:
    study_uid, paths = _study(tmp_path / "in", count=1)
    _storescu(monitored.rx.port, paths)
    now = utcnow()
    with monitored.rx.context.sessions.begin() as session:
        study = session.get(Study, study_uid)
        assert study is not None
        jobs = {job.model_name: job for job in create_jobs(
            session, study, "chest", ["a", "b", "report"], ["pacs"],
            now - timedelta(minutes=10), waiting=frozenset({"report"}))}
        session.flush()
        # a: due for two minutes; b: due since 10 minutes, claimed 7 minutes ago, its worker
        # gone (lease expired); report: pending since 10 minutes, but waits for a and b, so no
        # worker could claim it
        jobs["a"].not_before = now - timedelta(minutes=2)
        jobs["b"].state, jobs["b"].lease_owner = "running", "w1"
        jobs["b"].claimed_at = now - timedelta(minutes=7)
        jobs["b"].lease_expires_at = now - timedelta(seconds=5)
        session.add(SendSlot(destination="pacs", slot=0, holder="w1",
                             expires_at=now + timedelta(seconds=60)))
        session.add(SendSlot(destination="pacs", slot=1, holder=None))

    samples = monitored.metrics()
    assert value(samples, "dicom_node_jobs", state="pending") == 2
    assert value(samples, "dicom_node_jobs", state="running") == 1
    assert 115 <= value(samples, "dicom_node_oldest_pending_job_age_seconds") < 300
    assert 415 <= value(samples, "dicom_node_oldest_running_job_age_seconds") < 595
    assert value(samples, "dicom_node_jobs_lease_expired") == 1
    assert value(samples, "dicom_node_send_slots_held", destination="pacs") == 1

    with monitored.rx.context.sessions.begin() as session:
        session.execute(update(Job).where(Job.model_name.in_(["a", "b"]))
                        .values(state="failed", lease_owner=None))
    samples = monitored.metrics()
    assert value(samples, "dicom_node_jobs", state="failed") == 2
    assert value(samples, "dicom_node_jobs_lease_expired") == 0
    # a and b have ended: the report job is claimable, due since 10 minutes
    assert value(samples, "dicom_node_oldest_pending_job_age_seconds") >= 595


def test_a_refused_instance_and_a_rejected_association_are_counted(monitored: Monitored) -> None:
    assert _send_without_study_uid(monitored.rx) == 0xC000
    refused = _dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "DICOM_NODE", "127.0.0.1",
                     str(monitored.rx.port))
    assert refused.returncode != 0

    samples = monitored.metrics()
    assert value(samples, "dicom_node_store_failures_total", status="C000") == 1
    assert value(samples, "dicom_node_store_failures_total", status="A700") == 0
    assert value(samples, "dicom_node_instances_received_total") == 0
    assert value(samples, "dicom_node_associations_accepted_total") == 1
    assert value(samples, "dicom_node_associations_rejected_total") == 1


def test_worklist_gauges_show_the_receivers_last_successful_poll(tmp_path: Path) -> None:
    config = _config(tmp_path, extra=WORKLIST)
    assert config.http is not None
    with running_receiver(config) as rx:
        poller = WorklistPoller(rx.context.sessions, complete.catch_up)
        monitor = MonitorServer(config.http, rx, poller)
        assert monitor.start()
        try:
            before = metrics(monitor.port)
            poller.last_success_at = datetime(2026, 3, 4, 5, 6, 7)  # naive UTC, as stored
            poller.failed_polls = 2
            after = metrics(monitor.port)
        finally:
            monitor.stop()
    assert value(before, "dicom_node_worklist_last_success_timestamp_seconds") == 0
    assert value(after, "dicom_node_worklist_last_success_timestamp_seconds") == datetime(
        2026, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp()
    assert value(after, "dicom_node_worklist_failed_polls") == 2
    assert value(after, "dicom_node_worklist_poll_interval_seconds") == 60


# --------------------------------------------------------------------------------------------
# probes


def test_probes_answer_200_while_the_scp_listens_and_503_once_it_stopped(
        monitored: Monitored) -> None:
    status, body = monitored.get("/healthz")
    assert status == 200 and '"status": "ok"' in body
    status, body = monitored.get("/readyz")
    assert status == 200 and '"database": {"ok": true' in body

    monitored.rx.stop()

    for path in ("/healthz", "/readyz"):
        status, body = monitored.get(path)
        assert status == 503, path
        assert "scp: the DICOM listener is not running" in body


def test_liveness_fails_when_the_accept_loop_ended(monitored: Monitored) -> None:
    server = monitored.rx.listeners[0]
    assert serving(server)
    socketserver.BaseServer.shutdown(server)  # the loop ends; the socket stays open

    assert not serving(server)
    status, body = monitored.get("/healthz")
    assert status == 503
    assert f"the accept loop on port {monitored.rx.port} ended" in body


def test_serving_reads_the_standard_librarys_accept_loop_flag() -> None:
    """Pins the private socketserver detail that health.serving relies on."""
    server = socketserver.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        wait_until(lambda: serving(server), 5, "serve_forever to start")
    finally:
        server.shutdown()
        thread.join()
    assert not serving(server)
    server.server_close()
    assert not serving(server)


def test_unreachable_database_gives_database_up_0_and_readyz_503_not_500(
        monitored: Monitored) -> None:
    database = Path(monitored.rx.context.config.database.url.removeprefix("sqlite:///"))
    away = database.with_name("away.db")
    with capture_logs() as logs:
        database.rename(away)
        database.mkdir()  # a path SQLite cannot open
        try:
            samples = monitored.metrics()
            ready = monitored.get("/readyz")
            live = monitored.get("/healthz")
        finally:
            database.rmdir()
            away.rename(database)
        restored = monitored.metrics()
        ready_again = monitored.get("/readyz")

    assert value(samples, "dicom_node_database_up") == 0
    assert not any(name == "dicom_node_studies" for name, _ in samples)
    assert value(samples, "dicom_node_instances_received_total") == 0  # the rest is served
    assert ready[0] == 503 and "database: OperationalError: unable to open database" in ready[1]
    assert live[0] == 200
    assert value(restored, "dicom_node_database_up") == 1
    assert ready_again[0] == 200
    events = [e["event"] for e in logs if e["event"].startswith("monitor_database")]
    assert events == ["monitor_database_unreachable", "monitor_database_restored"]
    assert not database.with_name("away.db").exists()


def test_other_paths_and_methods_are_refused(monitored: Monitored) -> None:
    assert monitored.get("/")[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{monitored.monitor.port}/metrics",
                                     method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=15)
    with refused.value:
        assert refused.value.code == 405


def test_connections_beyond_the_cap_are_closed_at_once(monitored: Monitored) -> None:
    idle = [socket.create_connection(("127.0.0.1", monitored.monitor.port), timeout=5)
            for _ in range(MAX_CONNECTIONS)]
    try:
        with socket.create_connection(("127.0.0.1", monitored.monitor.port), timeout=5) as extra:
            assert extra.recv(100) == b""  # closed at once, by the server
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: monitored.get("/healthz")[0] == 200, 10, "a slot to be free again")


def test_a_port_in_use_leaves_the_receiver_running_without_the_endpoint(
        tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.http is not None
    with socket.socket() as taken, running_receiver(config) as rx:
        taken.bind(("127.0.0.1", config.http.port))
        taken.listen()
        monitor = MonitorServer(config.http, rx)
        with capture_logs() as logs:
            assert not monitor.start()
        monitor.stop()
        assert [e["event"] for e in logs] == ["http_failed"]
        assert rx.listeners and serving(rx.listeners[0])


# --------------------------------------------------------------------------------------------
# the receiver process


def test_receiver_process_serves_the_endpoint_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    http_port = free_port()
    node = NodeProcess(tmp_path / "node", "receive", sections={"http": {"port": http_port}})
    with node:
        node.wait_for_log("http_started", port=http_port)
        assert get(http_port, "/readyz")[0] == 200
        _storescu(node.port, _study(tmp_path / "in", count=2)[1])
        samples = metrics(http_port)
        assert value(samples, "dicom_node_instances_received_total") == 2
        assert value(samples, "dicom_node_studies", state="receiving") == 1
        assert value(samples, "process_resident_memory_bytes") > 0

        node.document["http"] = {"port": free_port()}  # moving it needs a restart
        node.write_config()
        node.wait_for_log("restart_required")
        assert get(http_port, "/healthz")[0] == 200

        assert node.stop() == 0
    assert node.find_logs("http_stopped")
    assert not is_listening(http_port)


# --------------------------------------------------------------------------------------------
# configuration


def test_http_section_defaults_and_is_absent_without_the_table(tmp_path: Path) -> None:
    assert _config(tmp_path).http is not None
    bare = load_config(write_config(tmp_path, BASIC_CONFIG.format(
        port=free_port(), stable=1, node_extra="")))
    assert bare.http is None
    assert HttpSection() == HttpSection(bind="127.0.0.1", port=8080)


@pytest.mark.parametrize(("table", "message"), [
    ('address = "0.0.0.0"', "http.address: unknown key"),
    ('bind = "0.0.0.0:9100"', "http.bind: '0.0.0.0:9100' is neither an IP address nor a host"),
    ("port = 0", "http.port: Input should be greater than or equal to 1"),
])
def test_invalid_http_keys_are_named(tmp_path: Path, table: str, message: str) -> None:
    text_ = BASIC_CONFIG.format(port=free_port(), stable=1, node_extra="") + f"[http]\n{table}\n"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(write_config(tmp_path, text_))


def test_a_reload_that_changes_http_logs_restart_required() -> None:
    with capture_logs() as logs:
        warn_if_restart_needed(HttpSection(), HttpSection())
        warn_if_restart_needed(None, None)
        warn_if_restart_needed(HttpSection(), HttpSection(port=9100))
        warn_if_restart_needed(None, HttpSection())
    assert [e["event"] for e in logs] == ["restart_required"] * 2


# --------------------------------------------------------------------------------------------
# PostgreSQL


def test_metrics_and_readiness_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    config = _config(tmp_path, extra=f'\n[database]\nurl = "{postgres_url}"\n')
    assert config.http is not None
    with running_receiver(config) as rx:
        monitor = MonitorServer(config.http, rx)
        assert monitor.start()
        try:
            _storescu(rx.port, _study(tmp_path / "in", count=1)[1])
            samples = metrics(monitor.port)
            ready = get(monitor.port, "/readyz")
            with monitor.database.engine.connect() as connection:
                timeout = connection.execute(text("SHOW statement_timeout")).scalar()
                read_only = connection.execute(text("SHOW default_transaction_read_only")).scalar()
                studies = connection.execute(select(Study.study_instance_uid)).all()
        finally:
            monitor.stop()
    assert value(samples, "dicom_node_database_up") == 1
    assert value(samples, "dicom_node_studies", state="receiving") == 1 == len(studies)
    assert ready[0] == 200
    assert (timeout, read_only) == ("3s", "on")
