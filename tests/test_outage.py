"""A destination that is down is waited out, not failed: its jobs keep their results and their
attempts, the backlog shows in `jobs`, /metrics and one log event per outage, and the results
arrive when it comes back; only the delivery window's end fails a job, and a refused object or a
processing error still spends the attempt budget. Against real peers: a port nobody listens on,
DCMTK's storescp (stopped, refusing, aborting), the node's own receiver as a PACS that answers
a failure status."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from dicom_node.config import Config, Destination, load_config
from dicom_node.errors import DestinationUnreachable
from dicom_node.infer.card import load_card
from dicom_node.jobs import queue
from dicom_node.jobs.runner import FINDINGS_FILE, results_folder, run_job
from dicom_node.messages import findings_to_json
from dicom_node.receive.status import StoreStatus
from dicom_node.send import outages
from dicom_node.send.scu import send_files
from dicom_node.store.db import (
    DestinationOutage,
    Job,
    JobState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from tests.conftest import BASIC_CONFIG, running_receiver, sample_file, write_config
from tests.support.chest_pacs import CHEST_MODEL
from tests.support.metrics import metrics, value
from tests.support.peers import NodeProcess, StoreSCP, dcmtk, free_port, wait_until

JOBS = """
[jobs]
max_attempts = 2
retry_base_seconds = 0.05
retry_max_seconds = 0.2
poll_seconds = 0.05
delivery_window_hours = {window}

[[models]]
name = "chest-xray-cnn"
path = "{model}"

[[destinations]]
name = "pacs"
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {port}
timeout_seconds = 5
"""


def _config(tmp_path: Path, port: int, *, window: float = 1.0, ae_title: str = "PACS") -> Config:
    text = (BASIC_CONFIG.format(port=free_port(), stable=3600, node_extra="")
            + JOBS.format(window=window, model=CHEST_MODEL["path"], ae_title=ae_title,
                          port=port))
    return load_config(write_config(tmp_path, text))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[..., tuple[Config, sessionmaker[Session]]]]:
    """``node(port, window=…)``: a config sending to 127.0.0.1:port, and its database with one
    routed study and its job, whose results (a real instance and findings.json) are already
    written: every run of the job reuses them, as a retry after a first send does."""
    engines = []

    def make(port: int, **kwargs: Any) -> tuple[Config, sessionmaker[Session]]:
        config = _config(tmp_path, port, **kwargs)
        engine = make_engine(config.database.url)
        engines.append(engine)
        sessions = make_sessionmaker(engine)
        now = utcnow()
        with sessions.begin() as session:
            study = Study(study_instance_uid=generate_uid(), state=StudyState.ROUTED,
                          generation=0, first_received_at=now, last_received_at=now,
                          instance_count=1)
            session.add(study)
            session.flush()
            queue.create_jobs(session, study, "chest radiographs", ["chest-xray-cnn"], ["pacs"],
                              now)
        claimed = queue.claim(sessions, "setup", config.jobs)
        assert claimed is not None
        folder = results_folder(config, claimed, load_card(Path(CHEST_MODEL["path"])).version)
        folder.mkdir(parents=True)
        result = dcmread(sample_file("CT_small.dcm"))
        result.save_as(folder / f"{result.SOPInstanceUID}.dcm", enforce_file_format=True)
        (folder / FINDINGS_FILE).write_text(findings_to_json(()), encoding="utf-8")
        queue.fail(sessions, claimed, "set-up", config.jobs.model_copy(
            update={"retry_base_seconds": 0.001, "retry_max_seconds": 0.001}))
        with sessions.begin() as session:  # the set-up claim spent no attempt
            job = session.scalars(select(Job)).one()
            job.attempts, job.last_error = 0, None
        return config, sessions

    yield make
    for engine in engines:
        engine.dispose()


def _job(sessions: sessionmaker[Session]) -> Job:
    with sessions() as session:
        return session.scalars(select(Job)).one()


def _work(config: Config, sessions: sessionmaker[Session], until: Callable[[Job], bool],
          timeout: float = 30.0) -> Job:
    """Claim and run the job, as a worker does, until ``until(job)``; the job then."""
    deadline = time.monotonic() + timeout
    while not until(job := _job(sessions)):
        assert time.monotonic() < deadline, f"job still {job.state}: {job.last_error}"
        claimed = queue.claim(sessions, "worker-1", config.jobs)
        if claimed is None:
            time.sleep(0.02)
        else:
            run_job(config, sessions, claimed)
    return job


def _events(logs: Sequence[MutableMapping[str, Any]], name: str
            ) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_the_delivery_window_ending_fails_the_job_saying_since_when_it_was_unreachable(
        node: Callable[..., tuple[Config, sessionmaker[Session]]]) -> None:
    down_port = free_port()
    config, sessions = node(down_port, window=0.0005)  # 1.8 s
    with capture_logs() as logs:
        job = _work(config, sessions, lambda j: j.state == JobState.FAILED)
    # Far more tries than max_attempts (2), none of them spent an attempt.
    assert job.delivery_attempts > 2 * config.jobs.max_attempts
    assert job.attempts == 0
    assert job.last_error is not None
    assert job.last_error.startswith("pacs unreachable since ")
    assert "the delivery window of 0.0005 h (jobs.delivery_window_hours) is over after " in (
        job.last_error)
    assert f"PACS@127.0.0.1:{down_port}: cannot connect: [Errno 111] Connection refused" in (
        job.last_error)
    assert len(_events(logs, "destination_unreachable")) == 1
    assert len(_events(logs, "delivery_deferred")) == job.delivery_attempts - 1
    assert [e["delivery_attempts"] for e in _events(logs, "job_failed")] == [
        job.delivery_attempts]
    assert not _events(logs, "inference_done")  # the results were ready: reused every time
    with sessions() as session:
        study = session.get(Study, job.study_instance_uid)
        assert study is not None and study.state == StudyState.FAILED
        assert session.get(DestinationOutage, "pacs") is not None  # still down


def test_while_a_destination_is_down_its_jobs_wait_for_one_try_at_a_time(
        node: Callable[..., tuple[Config, sessionmaker[Session]]]) -> None:
    config, sessions = node(free_port())
    # Another worker's try has just failed; the next try is due in an hour.
    since = outages.note_unreachable(sessions, "pacs", "pacs: the other worker's try failed",
                                     retry_seconds=3600)
    with capture_logs() as logs:
        job = _work(config, sessions, lambda j: j.delivery_attempts >= 3)
    # The job's tries were deferred with what the outage knows, without connecting.
    assert job.last_error == "awaiting delivery: pacs: the other worker's try failed"
    assert job.state == JobState.PENDING and job.attempts == 0
    with sessions() as session:
        outage = session.get(DestinationOutage, "pacs")
        assert outage is not None and (outage.failures, outage.since) == (1, since)
        outage.next_try_at = utcnow()  # the retry interval is over
        session.commit()
    job = _work(config, sessions, lambda j: j.delivery_attempts >= 4)
    assert "Connection refused" in (job.last_error or "")  # this try did connect
    with sessions() as session:
        outage = session.get(DestinationOutage, "pacs")
        assert outage is not None and outage.failures == 2
    assert not _events(logs, "destination_unreachable")  # the outage was known already


def test_an_instance_the_destination_refuses_is_a_failed_attempt_not_an_outage(
        node: Callable[..., tuple[Config, sessionmaker[Session]]], tmp_path: Path) -> None:
    # The node's own receiver as the PACS, below its free-space floor: it answers every
    # C-STORE with Out of Resources, an answer about the object, not an outage.
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = load_config(write_config(pacs_dir, BASIC_CONFIG.format(
        port=free_port(), stable=3600, node_extra=f"min_free_mb = {2**40}")))
    with running_receiver(pacs):
        config, sessions = node(pacs.node.port, ae_title=pacs.node.ae_title)
        with capture_logs() as logs:
            job = _work(config, sessions, lambda j: j.state == JobState.FAILED)
    assert job.attempts == config.jobs.max_attempts == 2
    assert job.delivery_attempts == 0 and job.awaiting_delivery_since is None
    assert f"status 0x{StoreStatus.OUT_OF_RESOURCES:04X}" in (job.last_error or "")
    assert not _events(logs, "destination_unreachable")
    assert not _events(logs, "delivery_deferred")
    with sessions() as session:
        assert session.get(DestinationOutage, "pacs") is None


@pytest.mark.parametrize("peer_args", [("--refuse",), ("--abort-after",),
                                       ("--sleep-during", "3")],
                         ids=["association-rejected", "aborted-after-the-c-store",
                              "no-answer-in-time"])
def test_a_rejected_aborted_or_silent_association_is_an_outage(
        tmp_path: Path, peer_args: tuple[str, ...]) -> None:
    files = [sample_file("CT_small.dcm")]
    with StoreSCP(tmp_path / "scp", extra_args=peer_args) as scp:
        dest = Destination(name="pacs", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port,
                           timeout_seconds=1)
        try:
            report = send_files(dest, files, "DICOM_NODE")
        except DestinationUnreachable as exc:
            assert peer_args == ("--refuse",)
            assert "association rejected" in str(exc)
        else:
            assert peer_args != ("--refuse",)
            assert report.interrupted is not None and report.refused == 0
            assert len(report.failed) == 1 and report.sent == 0


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_workers_failing_at_once_start_one_outage_and_the_first_success_ends_it(
        database: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path}/outages.db" if database == "sqlite"
           else request.getfixturevalue("postgres_url"))
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    start = threading.Barrier(8)

    def fail(worker: int) -> None:
        start.wait()
        outages.note_unreachable(sessions, "pacs", f"try of worker {worker} failed", 10)

    def succeed(_worker: int) -> None:
        start.wait()
        outages.note_reachable(sessions, "pacs")

    def at_once(work: Callable[[int], None]) -> None:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        with capture_logs() as logs:
            at_once(fail)
            with sessions() as session:
                (outage,) = outages.current(session).values()
            assert outage.failures == 8
            at_once(succeed)
        assert len(_events(logs, "destination_unreachable")) == 1
        (recovered,) = _events(logs, "destination_recovered")
        assert recovered["failed_tries"] == 8
        with sessions() as session:
            assert outages.current(session) == {}
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# A long outage, end to end


def _cr_study(folder: Path) -> tuple[str, Path]:
    """A chest CR of its own study (new Study, Series and SOP Instance UIDs)."""
    ds = dcmread(sample_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.StudyInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID), path


@pytest.mark.slow
def test_a_long_outage_is_waited_out_and_the_results_arrive_when_the_destination_is_back(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    down_port, http_port = free_port(), free_port()
    broken = tmp_path / "broken-cnn"
    shutil.copytree(CHEST_MODEL["path"], broken)
    card = (broken / "model.toml").read_text()
    (broken / "model.toml").write_text(card.replace('name = "chest-xray-cnn"',
                                                    'name = "broken-cnn"'))
    (broken / "model.keras").write_bytes(b"not a keras file")
    node = node_factory(
        "serve", models=[CHEST_MODEL, {"name": "broken-cnn", "path": str(broken)}],
        routes=[{"name": "chest", "match": {"Modality": "CR"},
                 "models": ["chest-xray-cnn", "broken-cnn"], "send_to": ["pacs"]}],
        destinations=[{"name": "pacs", "ae_title": "LATER", "host": "127.0.0.1",
                       "port": down_port, "timeout_seconds": 5}],
        sections={"jobs": {"workers": 2, "poll_seconds": 0.1, "max_attempts": 2,
                           "retry_base_seconds": 0.1, "retry_max_seconds": 0.5},
                  "http": {"port": http_port}})
    studies = [_cr_study(tmp_path / "in" / str(i)) for i in range(2)]
    for _study, path in studies:
        sent = dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), path)
        assert sent.returncode == 0, sent.stderr

    # The destination is down: both workers try the two chest jobs again and again.
    node.wait_for_log("delivery_deferred", count=12, timeout=120)
    jobs = {(j["study_instance_uid"], j["model"]): j for j in node.jobs()}
    for study, _path in studies:
        waiting, broken_job = jobs[(study, "chest-xray-cnn")], jobs[(study, "broken-cnn")]
        # a processing error keeps its budget: failed after max_attempts
        assert (broken_job["state"], broken_job["attempts"]) == ("failed", 2)
        assert waiting["state"] in ("pending", "running")
        assert waiting["attempts"] <= 1  # none of its delivery tries spent an attempt
        assert waiting["awaiting_delivery"].startswith("pacs since ")
        assert waiting["awaiting_delivery"].endswith(" delivery attempt(s)")
        assert waiting["awaiting_delivery_to"] == "pacs"
    tries = sum(j["delivery_attempts"] for j in jobs.values())
    assert tries > 2 * 2  # far more delivery tries than the jobs' attempt budgets
    samples = metrics(http_port)
    assert value(samples, "dicom_node_destination_unreachable", destination="pacs") == 1
    assert value(samples, "dicom_node_jobs_awaiting_delivery", destination="pacs") == 2
    assert value(samples, "dicom_node_destination_unreachable_seconds", destination="pacs") > 0
    listing = node.cli("jobs", check=True).stdout
    assert "AWAITING_DELIVERY" in listing and "pacs since " in listing

    with StoreSCP(tmp_path / "pacs", ae_title="LATER", port=down_port) as pacs:
        node.wait_for_log("job_done", count=2, timeout=60)
        received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in pacs.files()}
    # The very objects the first try built (their files are named by SOP Instance UID).
    built = {p.stem for p in (node.data_dir / "results").rglob("*.dcm")}
    assert received == built and len(built) == 2
    assert len(node.find_logs("inference_done")) == 2  # once per chest job
    assert len(node.find_logs("destination_unreachable")) == 1  # two workers, two jobs
    (recovered,) = node.find_logs("destination_recovered")
    assert recovered["destination"] == "pacs" and recovered["outage_seconds"] > 0
    jobs = {(j["study_instance_uid"], j["model"]): j for j in node.jobs()}
    for study, _path in studies:
        done = jobs[(study, "chest-xray-cnn")]
        assert (done["state"], done["attempts"], done["awaiting_delivery"]) == ("done", 1, "")
    wait_until(lambda: value(metrics(http_port), "dicom_node_destination_unreachable",
                             destination="pacs") == 0, 10, "the outage gauge to clear")
    samples = metrics(http_port)
    assert value(samples, "dicom_node_jobs_awaiting_delivery", destination="pacs") == 0



def test_when_a_try_reaches_the_destination_again_its_waiting_jobs_are_due_at_once(
        node: Callable[..., tuple[Config, sessionmaker[Session]]], tmp_path: Path) -> None:
    """Not at the end of their backoff, which after many tries is up to retry_max_seconds."""
    port = free_port()
    config, sessions = node(port, window=24.0)
    _work(config, sessions, lambda j: j.delivery_attempts >= 1)  # refused: the outage begins
    later = utcnow() + timedelta(hours=1)
    with sessions.begin() as session:
        session.scalars(select(Job)).one().not_before = later  # as after many tries
    assert queue.claim(sessions, "worker-1", config.jobs) is None
    pacs = StoreSCP(tmp_path / "pacs", ae_title="PACS", port=port).start()
    try:
        with capture_logs() as logs:
            # another job's try answered by the destination (runner._reached does these two)
            assert outages.note_reachable(sessions, "pacs")
            woken = queue.wake_awaiting(sessions, "pacs")
        assert woken == [_job(sessions).id]
        assert len(_events(logs, "destination_recovered")) == 1
        assert not outages.note_reachable(sessions, "pacs")  # ended once
        job = _work(config, sessions, lambda j: j.state == JobState.DONE)
        assert job.attempts == 1 and job.awaiting_delivery_to is None
        assert len([p for p in pacs.output_dir.rglob("*") if p.is_file()]) == 1
    finally:
        pacs.stop()
