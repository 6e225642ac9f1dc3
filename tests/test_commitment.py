"""Storage Commitment (Push Model) of the results the node sends, with real peers on loopback.

Orthanc 1.10 is the PACS: it takes the node's C-STOREs and N-ACTION, and reports back on a new
association to the node's receiver (it knows the node from its DicomModalities). A Lua filter
makes it a PACS that loses instances (Success to the C-STORE, nothing stored), which it then
reports as failed (0112H); an Orthanc that knows the node at a port where nothing listens is a
PACS whose report never comes. The job's model is replaced by ready-made result files: the
sending, the commitment and the job's states are the node's real code. A pynetdicom SCU in the
role of the PACS checks the receiver's answers to reports that are wrong.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from dicom_node.cli import main
from dicom_node.commitment import store
from dicom_node.commitment.status import SOP_CLASS_UID, SOP_INSTANCE_UID, ReportStatus
from dicom_node.commitment.store import Reference, Report
from dicom_node.config import Config, JobsSection, RetentionSection, load_config
from dicom_node.errors import ConfigError
from dicom_node.jobs import queue, runner
from dicom_node.jobs.queue import ClaimedJob
from dicom_node.monitor.collector import snapshot_metrics
from dicom_node.monitor.database import monitor_engine, read_snapshot
from dicom_node.receive.scp import Receiver
from dicom_node.retention import candidates
from dicom_node.scheduler import COMMITMENT_JOB, ReceiverScheduler
from dicom_node.store.db import (
    Commitment,
    CommitmentState,
    Job,
    JobState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from tests.conftest import BASIC_CONFIG, free_port, running_receiver, sample_file, write_config
from tests.support.chest_pacs import CHEST_MODEL, CHEST_ROUTE
from tests.support.peers import (
    NodeProcess,
    OrthancServer,
    StoreSCP,
    auto_forward_lua,
    dcmtk,
    wait_until,
)

AET = "DICOM_NODE"
#: Series Description of result files the lossy PACS drops (see LOSSY_LUA).
LOST = "LOST BY THE PACS"
#: Orthanc answers Success to the C-STORE of such an instance but does not store it.
LOSSY_LUA = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.SeriesDescription ~= '{LOST}'
end
"""


def _config(folder: Path, port: int, pacs_port: int, *, ae_title: str = "ORTHANC",
            timeout_minutes: float = 60.0, database_url: str | None = None) -> Config:
    database = f'[database]\nurl = "{database_url}"\n' if database_url else ""
    text = BASIC_CONFIG.format(port=port, stable=3600, node_extra="") + database + f"""
[jobs]
max_attempts = 2
retry_base_seconds = 30
retry_max_seconds = 30

[[destinations]]
name = "pacs"
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {pacs_port}
timeout_seconds = 10
storage_commitment = true
commitment_timeout_minutes = {timeout_minutes}
"""
    return load_config(write_config(folder, text))


@contextmanager
def pacs_and_node(tmp_path: Path, orthanc_factory: Callable[..., OrthancServer], *,
                  lua: str | None = None, report_port: int | None = None,
                  timeout_minutes: float = 60.0) -> Iterator[tuple[OrthancServer, Receiver]]:
    """Orthanc as the PACS that knows the node (at ``report_port`` if given: where nothing
    listens), and the node's receiver, whose config sends to Orthanc with commitment on."""
    port = free_port()
    pacs = orthanc_factory(modalities={"node": (AET, "127.0.0.1", report_port or port)},
                           lua=lua)
    config = _config(tmp_path, port, pacs.dicom_port, timeout_minutes=timeout_minutes)
    with running_receiver(config) as rx:
        yield pacs, rx


def _study(sessions: sessionmaker[Session], study_uid: str) -> ClaimedJob:
    """A routed study with one job for the destination "pacs", claimed."""
    now = utcnow()
    with sessions.begin() as session:
        study = Study(study_instance_uid=study_uid, state=StudyState.ROUTED, generation=0,
                      first_received_at=now, last_received_at=now, instance_count=1)
        session.add(study)
        session.flush()
        queue.create_jobs(session, study, "chest", ["classifier"], ["pacs"], now)
    return _claim(sessions)


def _claim(sessions: sessionmaker[Session], later: float = 0.0) -> ClaimedJob:
    job = queue.claim(sessions, "test-worker", JobsSection(max_attempts=2),
                      now=utcnow() + timedelta(seconds=later))
    assert job is not None
    return job


def _results(folder: Path, study_uid: str, descriptions: Sequence[str]) -> list[Path]:
    """Result files of one series in the study (copies of a CT with new UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for i, description in enumerate(descriptions):
        ds = dcmread(sample_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = description
        ds.InstanceNumber = i + 1
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _model_makes(monkeypatch: pytest.MonkeyPatch, files: list[Path]) -> None:
    """The job's model "produces" ``files`` (the pipeline is not what these tests are about)."""
    monkeypatch.setattr(runner, "build_results",
                        lambda *_args, **_kwargs: (files, "1.0", ()))


def _commitments(sessions: sessionmaker[Session]) -> list[Commitment]:
    with sessions() as session:
        return list(session.scalars(select(Commitment).order_by(Commitment.id)))


def _job(sessions: sessionmaker[Session]) -> Job:
    with sessions() as session:
        (job,) = session.scalars(select(Job)).all()
        return job


def _study_state(sessions: sessionmaker[Session]) -> StudyState:
    with sessions() as session:
        (study,) = session.scalars(select(Study)).all()
        return study.state


def _events(logs: Sequence[MutableMapping[str, Any]], name: str
            ) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def _report(port: int, transaction_uid: str | None, *, event_type: int = 1,
            committed: Sequence[Reference] = (),
            failed: Sequence[tuple[Reference, int | None]] = (),
            instance_uid: str = SOP_INSTANCE_UID) -> Dataset:
    """Send an N-EVENT-REPORT to the node as a PACS does (a new association, proposing itself
    as the Storage Commitment SCP by role selection); the response's status data set."""
    info = Dataset()
    if transaction_uid is not None:
        info.TransactionUID = transaction_uid
    items = []
    for ref in committed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = (
            ref.sop_class_uid, ref.sop_instance_uid)
        items.append(item)
    if items:
        info.ReferencedSOPSequence = items
    bad = []
    for ref, reason in failed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = (
            ref.sop_class_uid, ref.sop_instance_uid)
        if reason is not None:
            item.FailureReason = reason
        bad.append(item)
    if bad:
        info.FailedSOPSequence = bad
    ae = AE(ae_title="PACS_AE")
    ae.add_requested_context(SOP_CLASS_UID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=AET,
                         ext_neg=[build_role(SOP_CLASS_UID, scp_role=True)])
    assert assoc.is_established
    try:
        status, _reply = assoc.send_n_event_report(info, event_type, SOP_CLASS_UID,
                                                   instance_uid)
    finally:
        assoc.release()
    assert status, "no response"
    return status


# --- with Orthanc as the PACS ---------------------------------------------------------------

def test_orthanc_commits_the_results_and_its_report_marks_the_transaction_committed(
        tmp_path: Path, orthanc_factory: Callable[..., OrthancServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    study_uid = generate_uid()
    files = _results(tmp_path / "results", study_uid, ["AI result", "AI result"])
    _model_makes(monkeypatch, files)
    with pacs_and_node(tmp_path, orthanc_factory) as (pacs, rx), capture_logs() as logs:
        sessions = rx.context.sessions
        job = _study(sessions, study_uid)
        runner.run_job(rx.context.config, sessions, job)
        wait_until(lambda: _commitments(sessions)[0].state != CommitmentState.REQUESTED, 20,
                   "Orthanc's storage commitment report")
        assert pacs.instance_count() == 2
    (row,) = _commitments(sessions)
    assert (row.state, row.destination, row.job_id, row.study_instance_uid, row.instances,
            row.delivery, row.reported_by, row.failed) == (
        CommitmentState.COMMITTED, "pacs", job.id, study_uid, 2, 1, "ORTHANC", None)
    assert row.transaction_uid == store.transaction_uid(job, "pacs", AET, 1)
    assert sorted(sop for _cls, sop in json.loads(row.requested)) == sorted(
        p.stem for p in files)
    assert row.reported_at is not None and row.reported_at <= row.deadline
    finished = _job(sessions)
    assert (finished.state, finished.delivered) == (JobState.DONE, "pacs")
    assert _study_state(sessions) == StudyState.DONE
    (requested,) = _events(logs, "commitment_requested")
    assert (requested["transaction_uid"], requested["instances"]) == (row.transaction_uid, 2)
    (committed,) = _events(logs, "results_committed")
    assert (committed["transaction_uid"], committed["destination"], committed["calling_ae"],
            committed["job_id"]) == (row.transaction_uid, "pacs", "ORTHANC", job.id)


def test_an_instance_the_pacs_lost_is_reported_failed_sent_again_then_the_job_fails(
        tmp_path: Path, orthanc_factory: Callable[..., OrthancServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Orthanc answers Success to the C-STORE of the second file but drops it: its report says
    0112H (no such object instance). The failure counts as a failed attempt: the job sends
    again with a new transaction, and fails once max_attempts (2) are spent; an
    administrator's retry queues it once more."""
    study_uid = generate_uid()
    files = _results(tmp_path / "results", study_uid, ["AI result", LOST])
    lost = files[1].stem
    _model_makes(monkeypatch, files)
    with pacs_and_node(tmp_path, orthanc_factory, lua=LOSSY_LUA) as (pacs, rx), \
            capture_logs() as logs:
        sessions = rx.context.sessions
        config = rx.context.config
        runner.run_job(config, sessions, _study(sessions, study_uid))
        wait_until(lambda: _job(sessions).state == JobState.PENDING, 20,
                   "the failure report to send the job back to pending")
        assert pacs.instance_count() == 1
        first = _job(sessions)
        assert first.delivered == "" and first.attempts == 1
        assert f"{lost}: 0x0112 no such object instance" in (first.last_error or "")
        assert _study_state(sessions) == StudyState.ROUTED

        runner.run_job(config, sessions, _claim(sessions, later=60))
        wait_until(lambda: _job(sessions).state == JobState.FAILED, 20,
                   "the second failure report to fail the job")
    rows = _commitments(sessions)
    assert [(r.delivery, r.state) for r in rows] == [(1, CommitmentState.FAILED),
                                                     (2, CommitmentState.FAILED)]
    assert rows[0].transaction_uid != rows[1].transaction_uid
    assert json.loads(rows[1].failed or "") == [[lost, str(dcmread(files[1]).SOPClassUID),
                                                  0x0112]]
    failed = _job(sessions)
    assert (failed.attempts, failed.delivered) == (2, "")
    assert failed.last_error == rows[1].note
    assert "pacs: 1 of 2 instance(s) not committed" in (failed.last_error or "")
    assert _study_state(sessions) == StudyState.FAILED
    reports = _events(logs, "results_commitment_failed")
    assert len(reports) == 2 and reports[0]["log_level"] == "error"
    assert reports[0]["failed"] == [{"sop_instance_uid": lost,
                                     "reason": "0x0112 no such object instance"}]
    assert queue.retry(sessions) == [failed.id]
    assert (_job(sessions).state, _study_state(sessions)) == (JobState.PENDING,
                                                              StudyState.ROUTED)


def test_a_pacs_that_never_reports_times_out_fails_the_job_and_a_late_report_restores_it(
        tmp_path: Path, orthanc_factory: Callable[..., OrthancServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Orthanc knows the node at a port where nothing listens: it takes the request, and its
    report never arrives. The receiver's scheduler times the transaction out; the job fails
    for an administrator. A report that comes after all is still recorded."""
    study_uid = generate_uid()
    files = _results(tmp_path / "results", study_uid, ["AI result"])
    _model_makes(monkeypatch, files)
    with pacs_and_node(tmp_path, orthanc_factory, report_port=free_port(),
                       timeout_minutes=0.02) as (pacs, rx), capture_logs() as logs:
        sessions = rx.context.sessions
        config = rx.context.config
        runner.run_job(config, sessions, _study(sessions, study_uid))
        assert pacs.instance_count() == 1
        assert _job(sessions).state == JobState.DONE
        (row,) = _commitments(sessions)
        assert row.state == CommitmentState.REQUESTED
        scheduler = ReceiverScheduler(config, sessions)
        assert scheduler._scheduler.get_job(COMMITMENT_JOB) is not None
        time.sleep(max(0.0, (row.deadline - utcnow()).total_seconds()) + 0.1)
        scheduler._expire_commitments()

        (row,) = _commitments(sessions)
        assert row.state == CommitmentState.TIMED_OUT
        job = _job(sessions)
        assert (job.state, job.delivered) == (JobState.FAILED, "")
        assert "no report within 0.02 min" in (job.last_error or "")
        assert _study_state(sessions) == StudyState.FAILED
        (timeout,) = _events(logs, "results_commitment_timeout")
        assert (timeout["log_level"], timeout["transaction_uid"], timeout["job_state"]) == (
            "error", row.transaction_uid, "failed")

        sent = Reference(str(dcmread(files[0]).SOPClassUID), files[0].stem)
        status = _report(rx.port, row.transaction_uid, committed=[sent])
        assert status.Status == ReportStatus.SUCCESS
    (row,) = _commitments(sessions)
    assert row.state == CommitmentState.COMMITTED and row.reported_by == "PACS_AE"
    job = _job(sessions)
    assert (job.state, job.delivered, job.last_error) == (JobState.DONE, "pacs", None)
    assert _study_state(sessions) == StudyState.DONE
    (late,) = _events(logs, "results_committed")
    assert late["late"] is True


@pytest.mark.slow
def test_the_whole_trip_orthanc_commits_the_sr_of_a_forwarded_study_to_the_node_s_receiver(
        orthanc_factory: Callable[..., OrthancServer],
        node_factory: Callable[..., NodeProcess]) -> None:
    """dicom-node serve (receiver and worker processes) with the chest model; Orthanc forwards
    a chest CR, takes the SR back, and reports its commitment to the receiver process."""
    node = node_factory("serve", start=False, models=[CHEST_MODEL], routes=[CHEST_ROUTE])
    pacs = orthanc_factory(modalities={"node": (node.ae_title, "127.0.0.1", node.port)},
                           stable_age=1, lua=auto_forward_lua("node"))
    node.document["destinations"] = [{"name": "pacs", "ae_title": pacs.ae_title,
                                      "host": "127.0.0.1", "port": pacs.dicom_port,
                                      "storage_commitment": True}]
    node.document["jobs"] = {"poll_seconds": 0.2, "retry_base_seconds": 1}
    node.start()
    sent = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port),
                 sample_file("RG1_UNCR.dcm"))
    assert sent.returncode == 0, sent.stderr

    committed = node.wait_for_log("results_committed", timeout=180)
    assert (committed["process"], committed["calling_ae"]) == ("receiver", pacs.ae_title)
    (row,) = json.loads(node.cli("commitments", "--all", "--json", check=True).stdout)
    assert (row["state"], row["destination"], row["instances"], row["reported_by"]) == (
        "committed", "pacs", 1, pacs.ae_title)
    assert row["transaction_uid"] == committed["transaction_uid"]
    (job,) = node.jobs()
    assert (job["state"], job["delivered"]) == ("done", "pacs")
    requested = node.find_logs("commitment_requested")
    assert [e["transaction_uid"] for e in requested] == [row["transaction_uid"]]


def test_a_destination_without_storage_commitment_fails_the_attempt_and_takes_the_delivery_back(
        tmp_path: Path, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch) -> None:
    """DCMTK's storescp stores the results but refuses the Storage Commitment context."""
    study_uid = generate_uid()
    files = _results(tmp_path / "results", study_uid, ["AI result"])
    _model_makes(monkeypatch, files)
    config = _config(tmp_path, free_port(), storescp.port, ae_title=storescp.ae_title)
    engine = make_engine(config.database.url)
    sessions = make_sessionmaker(engine)
    try:
        with capture_logs() as logs:
            runner.run_job(config, sessions, _study(sessions, study_uid))
        assert len(storescp.files()) == 1
        job = _job(sessions)
        assert (job.state, job.delivered) == (JobState.PENDING, "")
        assert "Storage Commitment Push Model" in (job.last_error or "")
        (row,) = _commitments(sessions)
        assert row.state == CommitmentState.FAILED and (row.note or "").startswith("N-ACTION: ")
        assert _events(logs, "job_retry")
    finally:
        engine.dispose()


# --- the receiver's answers to reports (a pynetdicom SCU as the PACS) -----------------------

@pytest.fixture
def node(tmp_path: Path) -> Iterator[Receiver]:
    with running_receiver(_config(tmp_path, free_port(), free_port())) as rx:
        yield rx


REFS = (Reference("1.2.840.10008.5.1.4.1.1.88.22", "1.2.826.0.1.3680043.8.498.1"),
        Reference("1.2.840.10008.5.1.4.1.1.66.4", "1.2.826.0.1.3680043.8.498.2"),
        Reference("1.2.840.10008.5.1.4.1.1.88.22", "1.2.826.0.1.3680043.8.498.3"))


def _requested(rx: Receiver) -> tuple[ClaimedJob, str]:
    """A claimed job with a recorded transaction for REFS to "pacs" (no N-ACTION sent)."""
    sessions = rx.context.sessions
    job = _study(sessions, generate_uid())
    uid = store.record_request(sessions, job, rx.context.config.destination("pacs"), AET, REFS,
                               "1.0")
    assert uid is not None
    return job, uid


def test_a_report_for_a_known_transaction_is_answered_success_and_recorded_once(
        node: Receiver) -> None:
    job, uid = _requested(node)
    with capture_logs() as logs:
        assert _report(node.port, uid, committed=REFS).Status == ReportStatus.SUCCESS
        again = _report(node.port, uid, event_type=2, committed=REFS[:2],
                        failed=[(REFS[2], 0x0110)])
    assert again.Status == ReportStatus.SUCCESS
    (row,) = _commitments(node.context.sessions)
    assert (row.state, row.reported_by, row.failed) == (CommitmentState.COMMITTED, "PACS_AE",
                                                        None)
    assert [e["event"] for e in logs if e["event"].startswith(("results_", "commitment_"))] == [
        "results_committed", "commitment_report_repeated"]
    # the job was still running: its delivery stands, and it finishes done
    assert queue.succeed(node.context.sessions, job, "1.0") == JobState.DONE


def test_failures_and_instances_left_out_of_the_report_are_recorded_with_their_reasons(
        node: Receiver) -> None:
    """The report arrives while the worker still runs the job: the job's end is then a failed
    attempt, with the commitment's error."""
    job, uid = _requested(node)
    status = _report(node.port, uid, event_type=2, committed=REFS[:1],
                     failed=[(REFS[1], 0x0119)])
    assert status.Status == ReportStatus.SUCCESS
    (row,) = _commitments(node.context.sessions)
    assert row.state == CommitmentState.FAILED
    assert [(f.sop_instance_uid, f.reason) for f in store.failures_of(row)] == [
        (REFS[1].sop_instance_uid, 0x0119), (REFS[2].sop_instance_uid, None)]
    assert "0x0119 class instance conflict" in (row.note or "")
    assert f"{REFS[2].sop_instance_uid}: not in the report" in (row.note or "")
    assert queue.succeed(node.context.sessions, job, "1.0",
                         jobs=node.context.config.jobs) == JobState.PENDING
    pending = _job(node.context.sessions)
    assert (pending.delivered, pending.last_error) == ("", row.note)


@pytest.mark.parametrize(("kwargs", "status", "reason"), [
    ({"transaction_uid": "1.2.3.4.5"}, ReportStatus.INVALID_ARGUMENT_VALUE,
     "unknown Transaction UID"),
    ({"transaction_uid": None, "committed": REFS}, ReportStatus.INVALID_ARGUMENT_VALUE,
     "TransactionUID is missing"),
    ({"transaction_uid": "1.2.03"}, ReportStatus.INVALID_ARGUMENT_VALUE, "not a valid UID"),
    ({"instance_uid": "1.2.840.10008.1.20.1.2"}, ReportStatus.NO_SUCH_SOP_INSTANCE,
     "is not the well-known"),
    ({"event_type": 3}, ReportStatus.NO_SUCH_EVENT_TYPE, "neither 1 nor 2"),
    ({"event_type": 2, "failed": [(REFS[0], None)]}, ReportStatus.INVALID_ARGUMENT_VALUE,
     "FailedSOPSequence[0].FailureReason is missing"),
    ({"event_type": 1, "failed": [(REFS[0], 0x0112)]}, ReportStatus.INVALID_ARGUMENT_VALUE,
     "Event Type ID 1 (all committed) with a Failed SOP Sequence"),
    ({"event_type": 2, "committed": REFS}, ReportStatus.INVALID_ARGUMENT_VALUE,
     "without a Failed SOP Sequence item"),
])
def test_a_wrong_report_is_refused_with_a_named_status_and_changes_nothing(
        node: Receiver, kwargs: dict[str, Any], status: ReportStatus, reason: str) -> None:
    _, uid = _requested(node)
    arguments = {"transaction_uid": uid, **kwargs}
    with capture_logs() as logs, warnings.catch_warnings():
        # pydicom warns about the invalid UID where it is encoded, and where it is decoded
        warnings.simplefilter("ignore", UserWarning)
        answer = _report(node.port, **arguments)
    assert answer.Status == status
    assert answer.ErrorComment
    (refused,) = _events(logs, "commitment_report_refused")
    assert refused["status"] == f"0x{status:04X}" and reason in refused["reason"]
    assert refused["calling_ae"] == "PACS_AE"
    (row,) = _commitments(node.context.sessions)
    assert row.state == CommitmentState.REQUESTED and row.reported_at is None


# --- the database side ----------------------------------------------------------------------

def test_only_the_newest_transaction_of_a_job_and_destination_changes_the_job(
        node: Receiver) -> None:
    sessions = node.context.sessions
    dest = node.context.config.destination("pacs")
    job, old = _requested(node)
    new = store.record_request(sessions, job, dest, AET, REFS, "1.0")
    assert new is not None and new != old
    assert new == store.transaction_uid(job, "pacs", AET, 2)
    with sessions.begin() as session:
        outcome = store.apply_report(session, Report(old, (), ((REFS[0], 0x0110),), "PACS"),
                                     node.context.config.jobs)
    assert outcome is not None and outcome.job_state is None
    assert _job(sessions).delivered == "pacs"


def test_transaction_uids_are_deterministic_valid_and_new_for_each_delivery() -> None:
    job = ClaimedJob(id=7, study_instance_uid="1.2.3", generation=0, route_name="chest",
                     model_name="cnn", destinations=("pacs",), delivered=(), attempts=1,
                     owner="w", created_at=utcnow())
    first = store.transaction_uid(job, "pacs", AET, 1)
    assert first == store.transaction_uid(job, "pacs", AET, 1)
    assert first.startswith("2.25.") and len(first) <= 64
    assert len({first, store.transaction_uid(job, "pacs", AET, 2),
                store.transaction_uid(job, "archive", AET, 1)}) == 3


def test_commitments_command_lists_what_is_pending_or_failed(
        node: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    _, pending = _requested(node)
    _, committed = _requested(node)
    assert _report(node.port, committed, committed=REFS).Status == ReportStatus.SUCCESS
    source = str(node.context.config.source)
    capsys.readouterr()  # the receiver's log lines so far

    def listed(*args: str) -> dict[str, str]:
        assert main(["commitments", *args, "--json", "--config", source]) == 0
        return {r["transaction_uid"]: r["state"] for r in json.loads(capsys.readouterr().out)}

    assert listed() == {pending: "requested"}
    assert listed("--all") == {pending: "requested", committed: "committed"}
    assert listed("--state", "committed") == {committed: "committed"}
    assert main(["commitments", "--config", source]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:6] == ["ID", "JOB_ID", "STUDY_INSTANCE_UID", "DESTINATION",
                                  "DELIVERY", "STATE"]
    assert row.split()[5] == "requested"


def test_commitment_is_off_by_default_and_its_timeout_is_validated(tmp_path: Path) -> None:
    base = BASIC_CONFIG.format(port=free_port(), stable=30, node_extra="") + """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 104
"""
    (dest,) = load_config(write_config(tmp_path, base)).destinations
    assert (dest.storage_commitment, dest.commitment_timeout_minutes) == (False, 60.0)
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.commitment_timeout_minutes"):
        load_config(write_config(tmp_path, base + "commitment_timeout_minutes = 0\n"))


@pytest.mark.slow
def test_reports_timeouts_and_retention_hold_on_postgresql(tmp_path: Path,
                                                          postgres_url: str) -> None:
    """The queries of the commitment (row locks, the newest transaction, a delivery taken back
    while the job runs, retention's exclusion) on the scale-out database."""
    config = _config(tmp_path, free_port(), free_port(), database_url=postgres_url)
    with running_receiver(config) as rx:
        sessions = rx.context.sessions
        failing, failing_uid = _requested(rx)
        status = _report(rx.port, failing_uid, event_type=2, committed=REFS[:2],
                         failed=[(REFS[2], 0x0213)])
        assert status.Status == ReportStatus.SUCCESS
        assert queue.succeed(sessions, failing, "1.0", jobs=config.jobs) == JobState.PENDING

        silent, silent_uid = _requested(rx)
        assert queue.succeed(sessions, silent, "1.0") == JobState.DONE
        with sessions() as session:
            study = session.get(Study, silent.study_instance_uid)
            assert study is not None and study.state == StudyState.DONE
            assert silent.study_instance_uid not in {
                c.study_instance_uid for c in candidates(
                    session, RetentionSection(keep_days=0.0001), utcnow() + timedelta(days=1),
                    free_bytes=0)}
        (outcome,) = store.expire(sessions, config.jobs, utcnow() + timedelta(hours=2))
        assert (outcome.transaction_uid, outcome.job_state) == (silent_uid, JobState.FAILED)
        assert _report(rx.port, silent_uid, committed=REFS).Status == ReportStatus.SUCCESS
        with sessions() as session:
            states = {row.transaction_uid: row.state
                      for row in session.scalars(select(Commitment))}
            jobs = {job.id: job.state for job in session.scalars(select(Job))}
        assert states == {failing_uid: CommitmentState.FAILED,
                          silent_uid: CommitmentState.COMMITTED}
        assert jobs == {failing.id: JobState.PENDING, silent.id: JobState.DONE}


def test_metrics_show_commitments_by_state_and_the_oldest_awaiting_its_report(
        node: Receiver) -> None:
    _, uid = _requested(node)
    config = node.context.config
    later = utcnow() + timedelta(seconds=90)
    engine = monitor_engine(config.database.url)
    try:
        pending = read_snapshot(engine, [], later)
        assert pending.commitments == {"requested": 1, "committed": 0, "failed": 0,
                                       "timed_out": 0}
        samples = {(s.name, s.labels.get("state")): s.value
                   for m in snapshot_metrics(pending, config, later) for s in m.samples}
        assert samples[("dicom_node_commitments", "requested")] == 1
        assert 89 < samples[("dicom_node_oldest_pending_commitment_age_seconds", None)] < 120
        assert _report(node.port, uid, committed=REFS).Status == ReportStatus.SUCCESS
        done = read_snapshot(engine, [], later)
    finally:
        engine.dispose()
    assert (done.commitments["committed"], done.oldest_requested_commitment) == (1, None)
