"""The durable job queue: leases, capped backoff, failure after the budget, administrator retry."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import JobsSection
from dicom_node.jobs import queue
from dicom_node.store.db import (
    Job,
    JobState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)

JOBS = JobsSection(max_attempts=3, retry_base_seconds=10, retry_max_seconds=25, lease_seconds=60)


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path}/q.db"))
    now = utcnow()
    with sessions.begin() as session:
        study = Study(study_instance_uid="1.2.3", state=StudyState.ROUTED, generation=0,
                      first_received_at=now, last_received_at=now, instance_count=1)
        session.add(study)
        session.flush()
        queue.create_jobs(session, study, "route", ["model"], ["pacs"], now)
    return sessions


def _job(sessions: sessionmaker[Session]) -> Job:
    with sessions() as session:
        job = session.get(Job, 1)
        assert job is not None
        return job


def test_a_claimed_job_is_not_claimed_again_while_its_lease_holds(
        sessions: sessionmaker[Session]) -> None:
    first = queue.claim(sessions, "w1", JOBS)
    assert first is not None and first.attempts == 1
    assert queue.claim(sessions, "w2", JOBS) is None


def test_an_expired_lease_lets_another_worker_take_the_job(sessions: sessionmaker[Session]) -> None:
    assert queue.claim(sessions, "w1", JOBS) is not None
    later = utcnow() + timedelta(seconds=61)
    taken = queue.claim(sessions, "w2", JOBS, now=later)
    assert taken is not None and taken.owner == "w2" and taken.attempts == 2
    assert _job(sessions).claimed_at == later  # the start of the attempt now running


def test_a_worker_that_lost_its_lease_cannot_finish_the_job(
        sessions: sessionmaker[Session]) -> None:
    stale = queue.claim(sessions, "w1", JOBS)
    assert stale is not None
    assert queue.claim(sessions, "w2", JOBS, now=utcnow() + timedelta(seconds=61))
    assert not queue.succeed(sessions, stale, "1.0")
    assert _job(sessions).lease_owner == "w2"


def test_failures_back_off_exponentially_with_a_cap_then_fail(
        sessions: sessionmaker[Session]) -> None:
    assert [queue.backoff(n, JOBS).total_seconds() for n in (1, 2, 3, 4)] == [10, 20, 25, 25]
    now = utcnow()
    for attempt in range(1, JOBS.max_attempts + 1):
        claimed = queue.claim(sessions, "w", JOBS, now=now)
        assert claimed is not None and claimed.attempts == attempt
        state = queue.fail(sessions, claimed, "destination unreachable", JOBS)
        job = _job(sessions)
        if attempt < JOBS.max_attempts:
            assert state == JobState.PENDING
            assert job.not_before > now
            assert queue.claim(sessions, "w", JOBS, now=now) is None  # not due yet
            now = job.not_before
        else:
            assert state == JobState.FAILED
    with sessions() as session:
        assert session.get(Study, "1.2.3").state == StudyState.FAILED  # type: ignore[union-attr]
        rows = queue.list_jobs(session, "failed")
    assert rows[0]["last_error"] == "destination unreachable"


def test_administrator_retry_requeues_a_failed_job(sessions: sessionmaker[Session]) -> None:
    claimed = queue.claim(sessions, "w", JOBS)
    assert claimed is not None
    queue.fail(sessions, claimed, "bad", JOBS, permanent=True)
    assert queue.retry(sessions) == [1]
    job = _job(sessions)
    assert (job.state, job.attempts) == (JobState.PENDING, 0)
    again = queue.claim(sessions, "w", JOBS)
    assert again is not None
    assert queue.succeed(sessions, again, "1.0")
    with sessions() as session:
        assert session.get(Study, "1.2.3").state == StudyState.DONE  # type: ignore[union-attr]
