"""Retention: processed studies' files deleted by age and under disk pressure, nothing in work
touched, no stored instance lost to a purge running at the same time, re-sent studies not
reprocessed. Studies arrive through the real receiver from DCMTK's storescu."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update
from structlog.testing import capture_logs

from dicom_node.config import load_config
from dicom_node.errors import ConfigError, PreprocessingError
from dicom_node.jobs.queue import ClaimedJob
from dicom_node.jobs.runner import _load_sources
from dicom_node.receive.scp import Receiver
from dicom_node.retention import Retention, candidates
from dicom_node.scheduler import RETENTION_JOB, ReceiverScheduler
from dicom_node.store.db import (
    Commitment,
    CommitmentState,
    Instance,
    Job,
    JobState,
    PurgedStudy,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from dicom_node.store.index import reprocess
from tests.conftest import BASIC_CONFIG, free_port, running_receiver, write_config
from tests.support.studies import send_with_storescu, study_files

RETENTION = """
[retention]
keep_days = 7
keep_failed_days = 30
min_free_gb = 1
interval_minutes = 60
"""
GB = 1_000_000_000
PLENTY = 100 * GB


def _config_text(extra: str = RETENTION) -> str:
    return BASIC_CONFIG.format(port=free_port(), stable=3600, node_extra="") + extra


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Receiver]:
    with running_receiver(load_config(write_config(tmp_path, _config_text()))) as rx:
        yield rx


def _set_state(rx: Receiver, study: str, state: StudyState, days_ago: float) -> None:
    when = utcnow() - timedelta(days=days_ago)
    with rx.context.sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == study).values(
            state=state, last_received_at=when, completed_at=when))


def _spooled(rx: Receiver, study: str) -> list[Path]:
    return sorted((rx.context.config.spool_dir / study).rglob("*.dcm"))


def _paths(rx: Receiver, study: str) -> list[str]:
    with rx.context.sessions() as session:
        return list(session.scalars(select(Instance.path)
                                    .where(Instance.study_instance_uid == study)))


def _retention(rx: Receiver, free: int = PLENTY) -> Retention:
    return Retention(rx.context.sessions, grace_seconds=0.0, free_bytes=lambda _: free)


def check_two_passes_at_once(rx: Receiver, tmp_path: Path, studies: int = 6) -> None:
    """Two receivers sharing the database and the data folder (the second with its own engine)
    purge the same old studies at the same moment: each study's files go once, are counted
    once, and neither pass fails."""
    uids = []
    for _ in range(studies):
        study, paths = study_files(tmp_path / "in", "CT_small.dcm")
        send_with_storescu(rx, paths)
        _set_state(rx, study, StudyState.DONE, 9)
        uids.append(study)
    first = _retention(rx)
    engine = make_engine(rx.context.config.database.url)
    second = Retention(make_sessionmaker(engine), grace_seconds=0.0, free_bytes=lambda _: PLENTY)
    start = threading.Barrier(2)

    def run(retention: Retention) -> list[str]:
        start.wait()
        report = retention.run(rx.context.config)
        return [c.study_instance_uid for c in report.purged]

    try:
        with capture_logs() as logs, ThreadPoolExecutor(max_workers=2) as pool:
            runs = [pool.submit(run, r) for r in (first, second)]
            purged = [uid for done in runs for uid in done.result()]
    finally:
        engine.dispose()

    assert sorted(purged) == sorted(uids)  # every study once, by one pass or the other
    for study in uids:
        assert _spooled(rx, study) == [] and _paths(rx, study) == ["", "", ""]
    with rx.context.sessions() as session:
        records = session.scalars(select(PurgedStudy)).all()
    assert sorted(r.study_instance_uid for r in records) == sorted(uids)
    assert all(r.files == 3 for r in records)
    assert not (rx.context.config.node.data_dir / "trash").exists()
    assert len([e for e in logs if e["event"] == "retention_purged"]) == studies


def test_old_processed_studies_go_and_everything_in_work_stays(node: Receiver,
                                                               tmp_path: Path) -> None:
    studies = {}
    for label, state, days in [("old done", StudyState.DONE, 8),
                               ("old unrouted", StudyState.UNROUTED, 10),
                               ("young done", StudyState.DONE, 2),
                               ("failed 8 days", StudyState.FAILED, 8),
                               ("failed 31 days", StudyState.FAILED, 31),
                               ("old routed", StudyState.ROUTED, 40),
                               ("old incomplete", StudyState.INCOMPLETE, 40),
                               ("old receiving", StudyState.RECEIVING, 40)]:
        study, paths = study_files(tmp_path / "in", "CT_small.dcm")
        send_with_storescu(node, paths)
        _set_state(node, study, state, days)
        studies[label] = study
    results = node.context.config.results_dir / studies["old done"] / "0" / "abc"
    results.mkdir(parents=True)
    (results / "findings.json").write_text("[]")

    with capture_logs() as logs:
        report = _retention(node).run(node.context.config)

    gone = {"old done", "old unrouted", "failed 31 days"}
    assert {c.study_instance_uid for c in report.purged} == {studies[g] for g in gone}
    assert report.files == 9 and report.restored == 0
    for label, study in studies.items():
        if label in gone:
            assert _spooled(node, study) == []
            assert _paths(node, study) == ["", "", ""]  # rows kept, files gone
        else:
            assert len(_spooled(node, study)) == 3, label
            assert "" not in _paths(node, study)
    assert not (node.context.config.results_dir / studies["old done"]).exists()
    assert not (node.context.config.node.data_dir / "trash").exists()
    with node.context.sessions() as session:
        record = session.get(PurgedStudy, studies["old done"])
        assert record is not None and record.reason == "age" and record.files == 3
        # the study, its state and its history stay
        assert session.get(Study, studies["old done"]).state == StudyState.DONE  # type: ignore[union-attr]
    purged = [e for e in logs if e["event"] == "retention_purged"]
    assert len(purged) == 3 and {e["reason"] for e in purged} == {"age"}
    assert all("patient" not in key for e in logs for key in e)


def _commitment(rx: Receiver, study: str, state: CommitmentState) -> None:
    """The study's job sent its results to a destination with storage_commitment, and the
    transaction is in ``state``."""
    now = utcnow() - timedelta(days=9)
    with rx.context.sessions.begin() as session:
        job = Job(study_instance_uid=study, generation=0, route_name="r", model_name="m",
                  destinations="pacs", delivered="pacs", state=JobState.DONE, attempts=1,
                  not_before=now, created_at=now, updated_at=now)
        session.add(job)
        session.flush()
        session.add(Commitment(
            transaction_uid=f"2.25.{job.id}{len(study)}", job_id=job.id,
            study_instance_uid=study, destination="pacs", delivery=1, state=state, instances=1,
            requested="[]", requested_at=now, deadline=now + timedelta(hours=1)))


def test_a_study_whose_commitment_is_pending_stays_even_under_disk_pressure(
        node: Receiver, tmp_path: Path) -> None:
    studies = {}
    for state in (CommitmentState.REQUESTED, CommitmentState.COMMITTED):
        study, paths = study_files(tmp_path / "in", "CT_small.dcm")
        send_with_storescu(node, paths)
        _set_state(node, study, StudyState.DONE, 9)
        _commitment(node, study, state)
        studies[state] = study

    report = _retention(node, free=0).run(node.context.config)

    assert [c.study_instance_uid for c in report.purged] == [studies[CommitmentState.COMMITTED]]
    assert len(_spooled(node, studies[CommitmentState.REQUESTED])) == 3
    # once the destination has reported, the study may go
    with node.context.sessions.begin() as session:
        session.execute(update(Commitment).values(state=CommitmentState.TIMED_OUT))
    again = _retention(node).run(node.context.config)
    assert [c.study_instance_uid for c in again.purged] == [studies[CommitmentState.REQUESTED]]


def test_a_purged_study_sent_again_is_stored_but_not_processed_again(node: Receiver,
                                                                     tmp_path: Path) -> None:
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    _set_state(node, study, StudyState.DONE, 9)
    _retention(node).run(node.context.config)
    assert _spooled(node, study) == []

    # the administrator cannot reprocess it: nothing is left to process
    done, purged = reprocess(node.context.sessions, [study])
    assert done == [] and study in purged

    send_with_storescu(node, paths)  # a PACS forwards the old study again

    assert len(_spooled(node, study)) == 3
    assert "" not in _paths(node, study)
    with node.context.sessions() as session:
        again = session.get(Study, study)
        assert again is not None and again.state == StudyState.DONE and again.generation == 0
    # now it can be reprocessed, and the next pass deletes the copies again (still old)
    done, purged = reprocess(node.context.sessions, [study])
    assert done == [study] and purged == {}


def test_a_job_of_a_purged_study_fails_saying_what_to_do(node: Receiver, tmp_path: Path) -> None:
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    _set_state(node, study, StudyState.DONE, 9)
    _retention(node).run(node.context.config)
    job = ClaimedJob(id=1, study_instance_uid=study, generation=0, route_name="r",
                     model_name="m", destinations=("pacs",), delivered=(), attempts=1,
                     owner="test", created_at=utcnow())

    with pytest.raises(PreprocessingError, match=r"retention deleted the study's files on "
                       r"\d{4}-\d\d-\d\d \d\d:\d\dZ; send the study to the node again"):
        _load_sources(node.context.config, node.context.sessions, job, ("CT",), False)


def test_a_file_stored_while_its_study_is_purged_is_moved_back(node: Receiver,
                                                               tmp_path: Path) -> None:
    """The receiver writes the file, then commits its row: a purge can move the file to the
    trash in between. The check before the trash is emptied puts it back."""
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    _set_state(node, study, StudyState.DONE, 9)
    config = node.context.config
    retention = _retention(node)
    with node.context.sessions() as session:
        (candidate,) = candidates(session, config.retention, utcnow(), PLENTY)  # type: ignore[arg-type]
    trash = config.node.data_dir / "trash" / "pass"

    outcome = retention._purge(config, config.retention, candidate, trash,  # type: ignore[arg-type]
                               utcnow())
    assert outcome == "purged"
    # the row of one instance is committed after the purge's transaction (it was re-sent just
    # before the move): the index says stored, the file is in the trash
    sop = dcmread(paths[0]).SOPInstanceUID
    relative = f"spool/{study}/{dcmread(paths[0]).SeriesInstanceUID}/{sop}.dcm"
    with node.context.sessions.begin() as session:
        session.execute(update(Instance).where(Instance.sop_instance_uid == sop)
                        .values(path=relative, received_at=utcnow()))
    with capture_logs() as logs:
        restored = retention._empty_trash(config, only=trash)

    assert restored == 1
    assert (config.node.data_dir / relative).is_file()
    assert dcmread(config.node.data_dir / relative).SOPInstanceUID == sop
    assert not trash.exists()
    assert [e["event"] for e in logs] == ["retention_restored"]


def test_a_study_that_changes_during_the_purge_is_left_whole(node: Receiver,
                                                              tmp_path: Path) -> None:
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    _set_state(node, study, StudyState.DONE, 9)
    config = node.context.config
    with node.context.sessions() as session:
        (candidate,) = candidates(session, config.retention, utcnow(), PLENTY)  # type: ignore[arg-type]
    # a new instance of the study arrives after the pass chose it: the study is reopened
    _, late = study_files(tmp_path / "late", "CT_small.dcm", count=1)
    ds = dcmread(late[0])
    ds.StudyInstanceUID = study
    ds.save_as(late[0], enforce_file_format=True)
    send_with_storescu(node, late)

    outcome = _retention(node)._purge(config, config.retention, candidate,  # type: ignore[arg-type]
                                      config.node.data_dir / "trash" / "pass", utcnow())

    assert outcome == "changed"
    assert len(_spooled(node, study)) == 4
    assert "" not in _paths(node, study)
    with node.context.sessions() as session:
        assert session.get(PurgedStudy, study) is None


def test_below_min_free_gb_the_least_recently_active_studies_go_first(node: Receiver,
                                                                       tmp_path: Path) -> None:
    ages = {}
    for days in (1.0, 3.0, 2.0):
        study, paths = study_files(tmp_path / "in", "CT_small.dcm")
        send_with_storescu(node, paths)
        _set_state(node, study, StudyState.DONE, days)
        ages[days] = study
    busy, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    _set_state(node, busy, StudyState.ROUTED, 30)
    # free space 1 byte short of min_free_gb + the oldest study: it and the next one must go
    # (the studies differ in size by a few bytes: their UIDs have different lengths)
    free = GB - sum(p.stat().st_size for p in _spooled(node, ages[3.0])) - 1

    with capture_logs() as logs:
        report = _retention(node, free=free).run(node.context.config)

    assert [c.study_instance_uid for c in report.purged] == [ages[3.0], ages[2.0]]
    assert [c.reason for c in report.purged] == ["disk", "disk"]
    assert len(_spooled(node, ages[1.0])) == 3 and len(_spooled(node, busy)) == 3
    # the stub keeps reporting the same free space: the node says it is still short
    (low,) = [e for e in logs if e["event"] == "disk_space_low"]
    assert low["log_level"] == "error" and low["kept"] == {"routed": 1}


def test_stopping_cuts_the_grace_short_and_the_next_pass_finishes(node: Receiver,
                                                                   tmp_path: Path) -> None:
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    _set_state(node, study, StudyState.DONE, 9)
    config = node.context.config
    slow = Retention(node.context.sessions, grace_seconds=60.0, free_bytes=lambda _: PLENTY)
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(slow.run, config)
        trash = config.node.data_dir / "trash"
        deadline = time.monotonic() + 10
        while not list(trash.glob("*/spool/*")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the pass has moved the study and waits out its grace
        started = time.monotonic()
        slow.stop()
        report = running.result(timeout=10)

    assert time.monotonic() - started < 5
    assert [c.study_instance_uid for c in report.purged] == [study]
    assert list(trash.glob("*/spool/*"))  # left for the next pass
    _retention(node).run(config)  # grace 0: the leftover trash is old enough
    assert not trash.exists() and _spooled(node, study) == []


def test_dry_run_lists_and_deletes_nothing(tmp_path: Path) -> None:
    path = write_config(tmp_path, _config_text())
    config = load_config(path)
    with running_receiver(config) as rx:
        study, files = study_files(tmp_path / "in", "CT_small.dcm")
        send_with_storescu(rx, files)
        _set_state(rx, study, StudyState.DONE, 8)

    listed = subprocess.run([sys.executable, "-m", "dicom_node", "purge", "--dry-run",
                             "--config", str(path)], capture_output=True, text=True, timeout=120)

    assert listed.returncode == 0, listed.stderr
    assert study in listed.stdout and "would delete 1 study(ies), 3 file(s)" in listed.stdout
    assert len(list((config.spool_dir / study).rglob("*.dcm"))) == 3


def test_retention_section_is_validated_and_optional(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"retention\.keep_days: Input should be greater than 0"):
        load_config(write_config(tmp_path, _config_text("[retention]\nkeep_days = 0\n")))
    assert load_config(write_config(tmp_path, _config_text(""))).retention is None
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'x.db'}"))
    off = load_config(write_config(tmp_path, _config_text("")))
    assert Retention(sessions).run(off).purged == []


def test_reload_adds_and_removes_the_retention_pass(tmp_path: Path) -> None:
    on = load_config(write_config(tmp_path, _config_text()))
    off = load_config(write_config(tmp_path, _config_text("")))
    sessions = make_sessionmaker(make_engine(on.database.url))
    scheduler = ReceiverScheduler(off, sessions)
    assert scheduler._scheduler.get_job(RETENTION_JOB) is None
    scheduler.reconfigure(on)
    job = scheduler._scheduler.get_job(RETENTION_JOB)
    assert job is not None and job.trigger.interval == timedelta(minutes=60)
    scheduler.reconfigure(off)
    assert scheduler._scheduler.get_job(RETENTION_JOB) is None


def test_the_shipped_config_keeps_processed_studies_a_week() -> None:
    shipped = load_config(Path(__file__).resolve().parent.parent / "config.toml")
    assert shipped.retention is not None and shipped.retention.enabled
    assert shipped.retention.keep_days == 7 and shipped.retention.keep_failed_days == 30


def test_a_pass_waits_its_turn_behind_another_over_the_same_data_folder(node: Receiver,
                                                                      tmp_path: Path) -> None:
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    _set_state(node, study, StudyState.DONE, 9)
    data_dir = node.context.config.node.data_dir
    with (data_dir / "retention.lock").open("a") as other:  # another receiver's pass
        fcntl.flock(other, fcntl.LOCK_EX)
        with capture_logs() as logs:
            report = _retention(node).run(node.context.config)
        assert report.skipped and not report.purged
        assert len(_spooled(node, study)) == 3
        assert [e["event"] for e in logs] == ["retention_pass_skipped"]
        with ThreadPoolExecutor(max_workers=1) as pool:
            waiting = pool.submit(_retention(node).run, node.context.config, wait=True)
            time.sleep(0.3)
            assert not waiting.done()
            fcntl.flock(other, fcntl.LOCK_UN)
            report = waiting.result(timeout=30)
    assert [c.study_instance_uid for c in report.purged] == [study]
    assert _spooled(node, study) == []


def test_two_receivers_purging_at_once_delete_each_study_once(node: Receiver,
                                                             tmp_path: Path) -> None:
    check_two_passes_at_once(node, tmp_path)


def test_files_left_in_incoming_by_transfers_that_never_ended_are_cleared(
        node: Receiver, tmp_path: Path) -> None:
    incoming = node.context.config.incoming_dir
    gone = incoming / "dicom-node-receiver-7f9c-11112"  # a replaced pod's scratch folder
    gone.mkdir(parents=True)
    stale = [gone / "tmpa1b2c3", incoming / ".1.2.3.dcm.4242.tmp"]  # a crashed worker's write
    fresh = gone / "tmpd4e5f6"  # a transfer still running on another receiver
    for path in [*stale, fresh]:
        path.write_bytes(b"\0" * 1000)
    hours_ago = time.time() - 2 * 3600
    for path in stale:
        os.utime(path, (hours_ago, hours_ago))
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)  # the node's own scratch folder is in use

    with capture_logs() as logs:
        report = _retention(node).run(node.context.config)

    assert report.scratch_files == 2
    assert not any(p.exists() for p in stale) and fresh.exists()
    own = incoming / f"{socket.gethostname()}-{node.port}"
    assert gone.is_dir() and own.is_dir()  # folders stay: a receiver writes in its own
    (cleared,) = [e for e in logs if e["event"] == "scratch_cleared"]
    assert cleared["files"] == 2
    send_with_storescu(node, paths)  # the receiver still stores
    assert len(_spooled(node, study)) == 3
