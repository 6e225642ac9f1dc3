"""kill -9 of the receiver, of a worker or of the whole ``serve`` at a bad moment, then a restart:
every instance stored, every study processed, every result sent, with the same result UIDs when a
job ran twice; the jobs of dead workers on this machine run again at once, not after their lease,
and the leases of live workers, here or on other machines, hold."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import JobsSection
from dicom_node.infer.card import load_card
from dicom_node.jobs import owners, queue
from dicom_node.processes import release_dead_owners
from dicom_node.send import slots
from dicom_node.store.db import (
    Commitment,
    CommitmentState,
    Job,
    JobState,
    SendSlot,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from dicom_node.uids import result_uids
from tests.conftest import sample_file
from tests.support.chest_pacs import CHEST_MODEL, CHEST_ROUTE
from tests.support.peers import PEER_ENV, NodeProcess, StoreSCP, dcmtk, wait_until


def _node_to(storescp: StoreSCP, node_factory: Callable[..., NodeProcess], role: str = "receive",
             lease_seconds: float = 3, **kwargs: object) -> NodeProcess:
    return node_factory(
        role, models=[CHEST_MODEL], routes=[CHEST_ROUTE],
        destinations=[{"name": "pacs", "ae_title": storescp.ae_title, "host": "127.0.0.1",
                       "port": storescp.port}],
        sections={"jobs": {"poll_seconds": 0.2, "lease_seconds": lease_seconds,
                           "retry_base_seconds": 1}},
        **kwargs)


@pytest.mark.slow
def test_worker_killed_mid_job_is_replaced_and_the_result_has_the_same_uids(
        storescp: StoreSCP, node_factory: Callable[..., NodeProcess]) -> None:
    receiver = _node_to(storescp, node_factory)
    worker = node_factory("worker", like=receiver)
    chest = sample_file("RG1_UNCR.dcm")
    study_uid = str(dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
    sent = dcmtk("storescu", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port), chest)
    assert sent.returncode == 0, sent.stderr

    worker.wait_for_log("job_started", timeout=60)
    worker.kill(signal.SIGKILL)  # mid-job: the model is loading or running
    worker.process.wait(timeout=10)  # type: ignore[union-attr]
    assert worker.find_logs("job_done") == []

    replacement = node_factory("worker", like=receiver)
    replacement.wait_for_log("job_done", timeout=90)
    (job,) = replacement.jobs()
    # its lease was released at the replacement's start (or expired); it ran again
    assert (job["state"], job["attempts"]) == ("done", 2)

    card = load_card(Path(CHEST_MODEL["path"]))
    expected = result_uids(study_uid, CHEST_ROUTE["name"], card.name, card.version, "sr")
    (received,) = [dcmread(p) for p in storescp.files()]
    assert received.SOPInstanceUID == expected.sop_instance_uid
    assert received.SeriesInstanceUID == expected.series_instance_uid
    assert received.StudyInstanceUID == study_uid


def _ct_series(folder: Path, count: int) -> list[Path]:
    template = dcmread(sample_file("CT_small.dcm"))
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    folder.mkdir()
    paths = []
    for i in range(count):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = i + 1
        path = folder / f"ct{i:03d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_receiver_killed_mid_association_loses_nothing_it_acknowledged(
        storescp: StoreSCP, node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    receiver = _node_to(storescp, node_factory, stable_after_seconds=4.0)
    files = _ct_series(tmp_path / "series", 60)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    report = tmp_path / "storescu.log"
    with open(report, "w") as log:
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port),
             *map(str, files)], env=PEER_ENV, stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: report.read_text().count("Received Store Response (Success)") >= 10,
               30, "ten acknowledged instances")
    receiver.kill(signal.SIGKILL)
    sender.wait(timeout=30)
    acknowledged = report.read_text().count("Received Store Response (Success)")
    assert 10 <= acknowledged < len(files)

    # Everything acknowledged before the crash is in the spool, whole, and in the index.
    restarted = node_factory("receive", like=receiver)
    (study,) = restarted.studies()
    assert study["instances"] >= acknowledged
    for path in restarted.spool_dir.rglob("*.dcm"):
        assert dcmread(path).StudyInstanceUID == study_uid

    # The sender re-sends the study; it ends complete, once, with every instance.
    resent = dcmtk("storescu", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port),
                   *files)
    assert resent.returncode == 0, resent.stderr
    restarted.wait_for_log("study_completed", timeout=30)
    (study,) = restarted.studies()
    assert (study["instances"], study["state"], study["generation"]) == (
        len(files), "unrouted", 0)
    assert len(list(restarted.spool_dir.rglob("*.dcm"))) == len(files)


# --------------------------------------------------------------------------------------------
# leases of dead workers on this machine


JOBS = JobsSection(max_attempts=3, lease_seconds=300)
OTHER_HOST = "ai-node-2"


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process that runs for the test: a worker started on its own, as far as /proc sees."""
    process = subprocess.Popen(["sleep", "120"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _owner_of(pid: int, name: str = "worker-1", *, host: str | None = None,
              started: int | None = None) -> str:
    ticks = owners.start_ticks(pid) if started is None else started
    assert ticks is not None
    return str(owners.Owner(name, host or owners.host_name(), pid, ticks, owners.kernel_token()))


def _dead_owner(name: str = "worker-1") -> str:
    """The lease owner a process wrote before it was killed with -9."""
    process = subprocess.Popen(["sleep", "120"])
    owner = _owner_of(process.pid, name)
    process.kill()
    process.wait()
    return owner


def _elsewhere(owner: str) -> str:
    """``owner`` as a worker on another machine would have written it."""
    elsewhere = owner.replace(f"@{owners.host_name()}:", f"@{OTHER_HOST}:")
    assert elsewhere != owner
    return elsewhere


def _running_jobs(sessions: sessionmaker[Session], held_by: list[str], attempts: int = 1
                  ) -> list[int]:
    """One study with one running job per owner in ``held_by``, its lease good for 300 s."""
    now = utcnow()
    with sessions.begin() as session:
        study = Study(study_instance_uid=generate_uid(), state=StudyState.ROUTED, generation=0,
                      first_received_at=now, last_received_at=now, instance_count=1)
        session.add(study)
        session.flush()
        jobs = queue.create_jobs(session, study, "route", [f"model-{i}" for i in
                                                            range(len(held_by))], ["pacs"], now)
        for job, owner in zip(jobs, held_by, strict=True):
            job.state, job.lease_owner, job.attempts = JobState.RUNNING, owner, attempts
            job.claimed_at, job.lease_expires_at = now, now + timedelta(seconds=300)
        session.flush()
        return [job.id for job in jobs]


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """The index on SQLite, and on a real PostgreSQL server (tests/support/postgres_peer.py)."""
    url = (f"sqlite:///{tmp_path}/index.db" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _jobs(sessions: sessionmaker[Session], ids: list[int]) -> list[Job]:
    with sessions() as session:
        return [job for i in ids if (job := session.get(Job, i)) is not None]


def test_a_lease_owner_names_host_pid_and_start_time_and_fits_the_column() -> None:
    owner = owners.parse(owners.this_process("ct-ai-01:worker-1"))
    assert owner == owners.Owner("ct-ai-01:worker-1", owners.host_name(), os.getpid(),
                                 owners.start_ticks(os.getpid()) or -1, owners.kernel_token())
    assert len(owners.this_process("w" * 300)) == owners.OWNER_LENGTH
    assert owners.parse(owners.this_process("a@b:1:2:ff") + "/job 7") == owners.parse(
        owners.this_process("a@b:1:2:ff"))


def test_only_the_leases_of_provably_dead_owners_on_this_machine_are_released(
        sessions: sessionmaker[Session], live_process: subprocess.Popen[bytes]) -> None:
    dead = _dead_owner()
    live_pid = live_process.pid
    held_by = {
        "dead here": dead,
        "pid reused": _owner_of(live_pid, started=(owners.start_ticks(live_pid) or 0) + 1),
        "live here": _owner_of(live_pid, "dicom-node worker"),
        "this process": owners.this_process("pytest"),
        "other host": _elsewhere(dead),  # the same pid and start time, on another machine
        "older format": f"{owners.host_name()}:worker-1",
    }
    ids = dict(zip(held_by, _running_jobs(sessions, list(held_by.values())), strict=True))

    with structlog.testing.capture_logs() as logs:
        assert release_dead_owners(sessions, JOBS) == 2
        assert release_dead_owners(sessions, JOBS) == 0  # a second start finds nothing

    jobs = {name: job for name, job in zip(ids, _jobs(sessions, list(ids.values())),
                                           strict=True)}
    for name in ("dead here", "pid reused"):
        job = jobs[name]
        assert (job.state, job.lease_owner, job.lease_expires_at, job.attempts) == (
            JobState.PENDING, None, None, 1)
        assert job.not_before <= utcnow()
        assert f"worker {held_by[name]} died during attempt 1" in (job.last_error or "")
    for name in ("live here", "this process", "other host", "older format"):
        assert (jobs[name].state, jobs[name].lease_owner) == (JobState.RUNNING, held_by[name])
    released = [e for e in logs if e["event"] == "lease_released"]
    assert sorted((e["job_id"], e["owner"]) for e in released) == sorted(
        (ids[name], held_by[name]) for name in ("dead here", "pid reused"))
    assert {e["reason"] for e in released} == {"owner process is dead"}
    assert {e["state"] for e in released} == {"pending"}

    # the released jobs are claimed at once; the others wait for their leases
    claimed = [queue.claim(sessions, "w2", JOBS) for _ in range(3)]
    assert sorted(c.id for c in claimed if c is not None) == sorted(
        ids[name] for name in ("dead here", "pid reused"))


def test_a_dead_owners_last_attempt_fails_its_job_and_settles_the_study(
        sessions: sessionmaker[Session]) -> None:
    (job_id,) = _running_jobs(sessions, [_dead_owner()], attempts=JOBS.max_attempts)
    with structlog.testing.capture_logs() as logs:
        release_dead_owners(sessions, JOBS)
    (job,) = _jobs(sessions, [job_id])
    assert job.state == JobState.FAILED
    assert "died on the last of 3 attempts" in (job.last_error or "")
    with sessions() as session:
        study = session.get(Study, job.study_instance_uid)
        assert study is not None and study.state == StudyState.FAILED
    assert [e["state"] for e in logs if e["event"] == "lease_released"] == ["failed"]


def test_a_dead_owners_send_slots_and_commitment_requests_are_released(
        sessions: sessionmaker[Session], live_process: subprocess.Popen[bytes]) -> None:
    dead, live = _dead_owner(), _owner_of(live_process.pid)
    (job_id,) = _running_jobs(sessions, [dead])
    assert slots.acquire(sessions, "pacs", 2, f"{dead}/job {job_id}") == 0
    assert slots.acquire(sessions, "pacs", 2, f"{live}/job 99") == 1
    now = utcnow()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        queue.mark_delivered(job, "pacs", "1.0", now)  # as commitment.record_request does
        session.add(Commitment(
            transaction_uid=generate_uid(), job_id=job_id,
            study_instance_uid=job.study_instance_uid, destination="pacs", delivery=1,
            state=CommitmentState.REQUESTED, instances=1, requested="[]", requested_at=now,
            deadline=now + timedelta(minutes=10)))

    with structlog.testing.capture_logs() as logs:
        assert release_dead_owners(sessions, JOBS) == 1

    with sessions() as session:
        holders = {slot: holder for slot, holder in session.execute(
            select(SendSlot.slot, SendSlot.holder))}
        (commitment,) = session.scalars(select(Commitment)).all()
        job = session.get(Job, job_id)
        assert job is not None
    assert holders == {0: None, 1: f"{live}/job 99"}
    assert [(e["destination"], e["slot"]) for e in logs
            if e["event"] == "send_slot_released"] == [("pacs", 0)]
    # the next attempt sends to pacs again and requests a new commitment
    assert commitment.state == CommitmentState.FAILED and job.delivered == ""
    (released,) = [e for e in logs if e["event"] == "lease_released"]
    assert released["commitment_requested_again"] == ["pacs"]


def _sessions_of(node: NodeProcess) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(f"sqlite:///{node.data_dir}/dicom-node.db"))


@pytest.mark.slow
def test_after_kill_9_of_serve_the_interrupted_job_runs_again_within_seconds_not_its_lease(
        storescp: StoreSCP, node_factory: Callable[..., NodeProcess]) -> None:
    lease = 300.0
    node = _node_to(storescp, node_factory, "serve", lease_seconds=lease)
    chest = sample_file("RG1_UNCR.dcm")
    sent = dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), chest)
    assert sent.returncode == 0, sent.stderr
    node.wait_for_log("job_started", timeout=60)
    assert node.process is not None
    os.killpg(node.process.pid, signal.SIGKILL)  # supervisor, receiver and workers at once
    node.process.wait(timeout=10)
    assert node.find_logs("job_done") == []

    (job,) = node.jobs()
    assert (job["state"], job["attempts"]) == ("running", 1)
    wait_until(lambda: owners.is_dead(job["lease_owner"]), 10, "the killed worker to be gone")
    # Jobs whose leases must hold through the restart: one of a worker on another machine, one
    # of a live process here (this test's own).
    sessions = _sessions_of(node)
    foreign, local = _running_jobs(sessions, [
        _elsewhere(job["lease_owner"]),
        owners.this_process("worker-on-its-own")])

    restarted_at = time.monotonic()
    restarted = node_factory("serve", like=node)
    released = restarted.wait_for_log("lease_released", timeout=60)
    rerun = restarted.wait_for_log("job_started", count=2, timeout=60)
    restarted.wait_for_log("job_done", timeout=lease / 3)
    recovery = time.monotonic() - restarted_at

    assert (released["job_id"], released["owner"], released["reason"]) == (
        job["id"], job["lease_owner"], "owner process is dead")
    assert rerun["job_id"] == job["id"]
    (done,) = [j for j in restarted.jobs() if j["id"] == job["id"]]
    assert (done["state"], done["attempts"]) == ("done", 2)
    assert len(storescp.files()) == 1
    for kept in _jobs(sessions, [foreign, local]):
        assert kept.state == JobState.RUNNING and kept.lease_owner is not None
    assert len(restarted.find_logs("lease_released")) == 1
    print(f"\nkill -9 of serve -> restarted serve has the interrupted job done in "
          f"{recovery:.1f} s (lease {lease:.0f} s)")
    assert recovery < lease / 3
