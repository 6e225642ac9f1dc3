"""The durable job queue in the index database.

A job is one (study generation, route, model). Its life::

    pending ──claim (lease)──▶ running ──▶ done
       ▲                          │
       └── retry after backoff ◀──┤ (attempts < max_attempts)
                                  └──▶ failed ──(administrator: retry)──▶ pending

Every state change is one transaction. A claim is a conditional UPDATE (pending and due, or
running with an expired lease), so two workers never hold the same job, on SQLite or PostgreSQL.
A worker killed mid-job leaves its lease to expire; the job then runs again, and because result
UIDs are deterministic the destination sees a re-send, not a duplicate. A worker or ``serve``
starting on the same machine does not wait for that: :func:`release_dead` gives back at once the
leases of owners it can prove dead (dicom_node.jobs.owners).

A try whose results are ready but whose destination cannot be reached (an outage:
dicom_node.send.outages) is not a failed attempt: :func:`await_delivery` puts the job back to
``pending`` after a backoff on its delivery tries, gives the claim's attempt back, and fails the
job only once ``jobs.delivery_window_hours`` have passed since its first such try.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from dicom_node.config import JobsSection
from dicom_node.messages import FindingRecord, findings_from_json, findings_to_json
from dicom_node.store.db import (
    Commitment,
    CommitmentState,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from dicom_node.store.index import order_labels


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_instance_uid: str
    generation: int
    route_name: str
    model_name: str
    destinations: tuple[str, ...]
    delivered: tuple[str, ...]
    attempts: int
    owner: str
    created_at: datetime


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(p for p in (text or "").split(",") if p)


def backoff(attempts: int, jobs: JobsSection) -> timedelta:
    """Capped exponential backoff after the ``attempts``-th failed attempt."""
    seconds = min(jobs.retry_base_seconds * 2 ** max(attempts - 1, 0), jobs.retry_max_seconds)
    return timedelta(seconds=seconds)


def _due(now: datetime) -> Any:
    return or_(
        and_(Job.state == JobState.PENDING, Job.not_before <= now),
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
    )


def siblings_ended() -> Any:
    """A job that waits for its siblings (same study generation and route) is ready only when
    none of them is pending or running."""
    sibling = aliased(Job)
    unfinished = exists().where(
        sibling.study_instance_uid == Job.study_instance_uid,
        sibling.generation == Job.generation,
        sibling.route_name == Job.route_name,
        sibling.id != Job.id,
        sibling.waits_for_siblings.is_(False),
        sibling.state.in_([JobState.PENDING, JobState.RUNNING]))
    return or_(Job.waits_for_siblings.is_(False), ~unfinished)


def sibling_findings(session: Session, job: ClaimedJob) -> tuple[FindingRecord, ...]:
    """Findings of the done jobs of the same study generation and route (for a report model)."""
    rows = session.scalars(select(Job.findings).where(
        Job.study_instance_uid == job.study_instance_uid, Job.generation == job.generation,
        Job.route_name == job.route_name, Job.id != job.id,
        Job.state == JobState.DONE).order_by(Job.id)).all()
    return tuple(f for row in rows for f in findings_from_json(row))


def claim(sessions: sessionmaker[Session], owner: str, jobs: JobsSection,
          now: datetime | None = None) -> ClaimedJob | None:
    """Claim the oldest due job for ``owner`` with a lease; None when there is nothing to do."""
    now = now or utcnow()
    with sessions.begin() as session:
        candidates = session.scalars(
            select(Job).where(_due(now)).where(siblings_ended())
            .order_by(Job.not_before, Job.id).limit(8)).all()
        for job in candidates:
            if job.state == JobState.RUNNING and job.attempts >= jobs.max_attempts:
                _finish_failed(session, job, f"lease of {job.lease_owner} expired on the last "
                               f"of {jobs.max_attempts} attempts", now)
                continue
            result = session.execute(
                update(Job).where(Job.id == job.id).where(_due(now)).values(
                    state=JobState.RUNNING, lease_owner=owner, claimed_at=now,
                    lease_expires_at=now + timedelta(seconds=jobs.lease_seconds),
                    attempts=Job.attempts + 1, updated_at=now)
                .execution_options(synchronize_session=False))
            if result.rowcount == 1:  # type: ignore[attr-defined]
                return ClaimedJob(
                    id=job.id, study_instance_uid=job.study_instance_uid,
                    generation=job.generation, route_name=job.route_name,
                    model_name=job.model_name, destinations=_split(job.destinations),
                    delivered=_split(job.delivered), attempts=job.attempts + 1, owner=owner,
                    created_at=job.created_at)
    return None


@dataclass(frozen=True)
class Released:
    """A running job whose lease :func:`release_dead` gave back."""

    id: int
    study_instance_uid: str
    owner: str
    #: ``pending`` (due at once), or ``failed`` when that was the last allowed attempt.
    state: JobState
    attempts: int
    #: Destinations whose storage commitment request the dead owner had recorded in that
    #: attempt: taken off the deliveries, so that the next attempt sends and requests again.
    recommitted: tuple[str, ...] = ()


def release_dead(sessions: sessionmaker[Session], is_dead: Callable[[str], bool],
                 jobs: JobsSection, now: datetime | None = None) -> list[Released]:
    """Give back, in one transaction, the leases of running jobs whose owner ``is_dead``
    (dicom_node.jobs.owners.is_dead: provably, on this machine): each job is ``pending`` and due
    at once, or ``failed`` when the dead owner's attempt was the last allowed. Each is a
    conditional UPDATE, like a claim, so a job that another worker took meanwhile is left alone.

    The attempt the owner died in counts (a model that kills its worker still ends ``failed``).
    A storage commitment request the owner recorded in that attempt may never have reached the
    destination: it is marked failed and its destination taken off the job's deliveries, so the
    next attempt sends and requests again (the same result UIDs: a re-send)."""
    now = now or utcnow()
    released = []
    with sessions.begin() as session:
        running = session.scalars(select(Job).where(
            Job.state == JobState.RUNNING, Job.lease_owner.is_not(None)).order_by(Job.id)).all()
        for job in running:
            owner = job.lease_owner or ""
            if not is_dead(owner):
                continue
            last = job.attempts >= jobs.max_attempts
            error = (f"worker {owner} died on the last of {jobs.max_attempts} attempts" if last
                     else f"worker {owner} died during attempt {job.attempts}; lease released")
            result = session.execute(
                update(Job).where(Job.id == job.id, Job.state == JobState.RUNNING,
                                  Job.lease_owner == owner)
                .values(state=JobState.FAILED if last else JobState.PENDING,
                        not_before=now, lease_owner=None, lease_expires_at=None,
                        last_error=error, updated_at=now)
                .execution_options(synchronize_session=False))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                continue  # another process released or claimed it first
            session.refresh(job)
            recommitted = _recommit(session, job, owner, now)
            if last:
                _settle_study(session, job)
            released.append(Released(job.id, job.study_instance_uid, owner, job.state,
                                     job.attempts, recommitted))
    return released


def _recommit(session: Session, job: Job, owner: str, now: datetime) -> tuple[str, ...]:
    """The storage commitment requests of a dead owner's attempt (since its claim) fail, and
    their destinations are no longer delivered (inside the caller's transaction)."""
    since = job.claimed_at or job.created_at
    rows = session.scalars(select(Commitment).where(
        Commitment.job_id == job.id, Commitment.state == CommitmentState.REQUESTED,
        Commitment.requested_at >= since)).all()
    for row in rows:
        row.state = CommitmentState.FAILED
        row.note = (f"worker {owner} died before the request was known to have reached the "
                    "destination; requested again by the next attempt")
        unmark_delivered(job, row.destination, now)
    return tuple(sorted({row.destination for row in rows}))


def owned(session: Session, job_id: int, owner: str) -> Job | None:
    """The job, if it is running under ``owner``'s lease (inside the caller's transaction)."""
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.RUNNING or job.lease_owner != owner:
        return None
    return job


def renew(sessions: sessionmaker[Session], claimed: ClaimedJob, jobs: JobsSection) -> bool:
    """Extend the lease; False when the job is no longer ours (the lease expired and was taken)."""
    now = utcnow()
    with sessions.begin() as session:
        job = owned(session, claimed.id, claimed.owner)
        if job is None:
            return False
        job.lease_expires_at = now + timedelta(seconds=jobs.lease_seconds)
        job.updated_at = now
        return True


def record_delivery(sessions: sessionmaker[Session], claimed: ClaimedJob, destination: str,
                    model_version: str) -> None:
    with sessions.begin() as session:
        job = owned(session, claimed.id, claimed.owner)
        if job is not None:
            mark_delivered(job, destination, model_version, utcnow())


def _add_delivery(job: Job, destination: str, now: datetime) -> None:
    job.delivered = ",".join(sorted({*_split(job.delivered), destination}))
    job.updated_at = now


def mark_delivered(job: Job, destination: str, model_version: str, now: datetime) -> None:
    """Add ``destination`` to the job's deliveries (inside the caller's transaction)."""
    _add_delivery(job, destination, now)
    job.model_version = model_version


def unmark_delivered(job: Job, destination: str, now: datetime) -> None:
    """Take ``destination`` off the job's deliveries (inside the caller's transaction)."""
    job.delivered = ",".join(d for d in _split(job.delivered) if d != destination)
    job.updated_at = now


def _taken_back(session: Session, job: Job) -> bool:
    """Whether a storage commitment outcome took a destination off the job's deliveries: the
    newest transaction of a destination not delivered has failed or timed out."""
    missing = set(_split(job.destinations)) - set(_split(job.delivered))
    if not missing:
        return False
    newest = (select(Commitment.destination, func.max(Commitment.delivery).label("delivery"))
              .where(Commitment.job_id == job.id, Commitment.destination.in_(missing))
              .group_by(Commitment.destination).subquery())
    states = session.scalars(select(Commitment.state).join(newest, and_(
        Commitment.destination == newest.c.destination,
        Commitment.delivery == newest.c.delivery)).where(Commitment.job_id == job.id))
    return any(state in (CommitmentState.FAILED, CommitmentState.TIMED_OUT) for state in states)


def succeed(sessions: sessionmaker[Session], claimed: ClaimedJob, model_version: str,
            findings: tuple[FindingRecord, ...] = (), jobs: JobsSection | None = None
            ) -> JobState | None:
    """Finish the job: ``done``, with its findings; None if the job was not ours.

    A destination that a storage commitment outcome took off the job's deliveries while it ran
    (:func:`undeliver`) makes this a failed attempt instead, with the error the commitment left
    (pending after a backoff, or failed once the budget is spent)."""
    now = utcnow()
    with sessions.begin() as session:
        job = owned(session, claimed.id, claimed.owner)
        if job is None:
            return None
        job.findings = findings_to_json(findings)
        job.model_version = model_version
        _stop_awaiting(job)
        if _taken_back(session, job):
            _attempt_failed(session, job, job.last_error or "storage commitment failed",
                            jobs or JobsSection(), now)
            return job.state
        job.state = JobState.DONE
        job.lease_owner = job.lease_expires_at = None
        job.last_error = None
        job.updated_at = now
        _settle_study(session, job)
        return job.state


def fail(sessions: sessionmaker[Session], claimed: ClaimedJob, error: str, jobs: JobsSection,
         *, permanent: bool = False) -> JobState | None:
    """Record a failed attempt: back to pending after a backoff, or failed when the budget is
    spent (or the error is permanent). Returns the new state, None if the job was not ours."""
    now = utcnow()
    with sessions.begin() as session:
        job = owned(session, claimed.id, claimed.owner)
        if job is None:
            return None
        _stop_awaiting(job)
        _attempt_failed(session, job, error, jobs, now, permanent=permanent)
        return job.state


def _stop_awaiting(job: Job) -> None:
    """The job's deliveries no longer wait out an outage (inside the caller's transaction)."""
    job.awaiting_delivery_to = job.awaiting_delivery_since = None


@dataclass(frozen=True)
class DeliveryWait:
    """What :func:`await_delivery` made of the job."""

    state: JobState
    #: Tries since the job's deliveries began to wait, this one included.
    delivery_attempts: int
    since: datetime
    #: The next try (``pending``), or when it failed.
    not_before: datetime


def await_delivery(sessions: sessionmaker[Session], claimed: ClaimedJob,
                   unreachable: Mapping[str, tuple[str, datetime]], jobs: JobsSection
                   ) -> DeliveryWait | None:
    """The try found destinations unreachable (name → (reason, start of its outage)) with the
    job's results ready: not a failed attempt. The claim's attempt is given back and the job
    goes back to ``pending`` after :func:`backoff` of its delivery tries (never past the end of
    its window); ``failed`` once ``jobs.delivery_window_hours`` have passed since its first such
    try. None if the job was not ours."""
    now = utcnow()
    window = timedelta(hours=jobs.delivery_window_hours)
    with sessions.begin() as session:
        job = owned(session, claimed.id, claimed.owner)
        if job is None:
            return None
        if job.awaiting_delivery_since is None:
            job.awaiting_delivery_since, job.delivery_attempts = now, 0
        since = job.awaiting_delivery_since
        job.awaiting_delivery_to = ",".join(sorted(unreachable))
        job.delivery_attempts = (job.delivery_attempts or 0) + 1
        job.attempts = max(job.attempts - 1, 0)  # the claim counted one; this try spent none
        reasons = "; ".join(reason for reason, _start in unreachable.values())
        if now - since >= window:
            down_since = min([since, *(start for _reason, start in unreachable.values())])
            _finish_failed(session, job, (
                f"{job.awaiting_delivery_to} unreachable since {down_since:%Y-%m-%d %H:%M:%S}Z: "
                f"the delivery window of {jobs.delivery_window_hours:g} h "
                f"(jobs.delivery_window_hours) is over after {job.delivery_attempts} delivery "
                f"attempt(s); last: {reasons}"), now)
            return DeliveryWait(job.state, job.delivery_attempts, since, now)
        job.state = JobState.PENDING
        job.not_before = min(now + backoff(job.delivery_attempts, jobs), since + window)
        job.lease_owner = job.lease_expires_at = None
        job.last_error = f"awaiting delivery: {reasons}"
        job.updated_at = now
        return DeliveryWait(job.state, job.delivery_attempts, since, job.not_before)


def wake_awaiting(sessions: sessionmaker[Session], destination: str) -> list[int]:
    """A destination's outage is over: the jobs waiting to deliver there are due now, not at
    the end of their backoff (up to ``jobs.retry_max_seconds`` away). Their ids."""
    now = utcnow()
    with sessions.begin() as session:
        waiting = session.execute(select(Job.id, Job.awaiting_delivery_to).where(
            Job.state == JobState.PENDING, Job.awaiting_delivery_to.is_not(None),
            Job.not_before > now)).all()
        ids = [job_id for job_id, names in waiting if destination in _split(names)]
        if ids:
            session.execute(update(Job).where(
                Job.id.in_(ids), Job.state == JobState.PENDING, Job.not_before > now)
                .values(not_before=now).execution_options(synchronize_session=False))
    return ids


def _attempt_failed(session: Session, job: Job, error: str, jobs: JobsSection, now: datetime,
                    *, permanent: bool = False) -> None:
    if permanent or job.attempts >= jobs.max_attempts:
        _finish_failed(session, job, error, now)
    else:
        job.state = JobState.PENDING
        job.not_before = now + backoff(job.attempts, jobs)
        job.lease_owner = job.lease_expires_at = None
        job.last_error = error
        job.updated_at = now


def _finish_failed(session: Session, job: Job, error: str, now: datetime) -> None:
    job.state = JobState.FAILED
    job.lease_owner = job.lease_expires_at = None
    job.last_error = error
    job.updated_at = now
    _settle_study(session, job)


def _settle_study(session: Session, job: Job) -> None:
    """When every job of the study's current generation has ended, the study's state says how."""
    study = session.get(Study, job.study_instance_uid)
    if study is None or study.generation != job.generation or study.state != StudyState.ROUTED:
        return
    states = set(session.scalars(select(Job.state).where(
        Job.study_instance_uid == study.study_instance_uid,
        Job.generation == study.generation)).all())
    if states <= {JobState.DONE}:
        study.state = StudyState.DONE
    elif states <= {JobState.DONE, JobState.FAILED}:
        study.state = StudyState.FAILED


def _resettle_study(session: Session, job: Job) -> None:
    """An ended job changed state again (a commitment outcome): the study of its generation is
    in work again (``routed``), or settles anew from its jobs' states."""
    study = session.get(Study, job.study_instance_uid)
    if study is None or study.generation != job.generation:
        return
    if study.state in (StudyState.DONE, StudyState.FAILED):
        study.state = StudyState.ROUTED
    _settle_study(session, job)


def undeliver(session: Session, job_id: int, destination: str, error: str, jobs: JobsSection,
              now: datetime, *, retry: bool) -> JobState | None:
    """A destination did not commit to the job's results (:mod:`dicom_node.commitment`): take
    it off the job's deliveries, so that they are sent there again, and record why (inside the
    caller's transaction). Returns the job's new state, None for an unknown job.

    A ``done`` job: with ``retry`` (the report listed failures) a failed attempt, back to
    ``pending`` after a backoff, or ``failed`` once ``max_attempts`` are spent; without it (no
    report in time) ``failed`` at once, for an administrator's ``jobs retry``. A ``pending``
    job sends to the destination again on its next attempt; a ``running`` job's worker finds
    the destination missing when it finishes (:func:`succeed`); a ``failed`` job stays failed,
    with this error."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    unmark_delivered(job, destination, now)
    job.last_error = error
    if job.state == JobState.DONE:
        if retry and job.attempts < jobs.max_attempts:
            job.state = JobState.PENDING
            job.not_before = now + backoff(job.attempts, jobs)
        else:
            job.state = JobState.FAILED
        _resettle_study(session, job)
    return job.state


def redeliver(session: Session, job_id: int, destination: str, now: datetime
              ) -> JobState | None:
    """A late report committed results that a timeout had taken off the job's deliveries: the
    destination counts as delivered again, and a ``failed`` job that has now delivered to every
    destination (and stored its findings) is ``done`` (inside the caller's transaction)."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    _add_delivery(job, destination, now)
    if (job.state == JobState.FAILED and job.findings is not None
            and set(_split(job.destinations)) <= set(_split(job.delivered))):
        job.state = JobState.DONE
        job.last_error = None
        _resettle_study(session, job)
    return job.state


def retry(sessions: sessionmaker[Session], job_ids: Sequence[int] | None = None) -> list[int]:
    """Administrator's retry: failed jobs (all, or those named) go back to pending, budget reset."""
    now = utcnow()
    with sessions.begin() as session:
        query = select(Job).where(Job.state == JobState.FAILED)
        if job_ids:
            query = query.where(Job.id.in_(list(job_ids)))
        retried = []
        for job in session.scalars(query):
            job.state = JobState.PENDING
            job.attempts = 0
            job.not_before = now
            job.updated_at = now
            _stop_awaiting(job)
            job.delivery_attempts = 0
            retried.append(job.id)
            _resettle_study(session, job)  # its study is in work again
        return retried


def create_jobs(session: Session, study: Study, route_name: str, models: Sequence[str],
                destinations: Sequence[str], now: datetime,
                waiting: frozenset[str] = frozenset()) -> list[Job]:
    """Jobs for one fired route on the study's current generation (inside the caller's
    transaction). Models named in ``waiting`` (report models) run after the others."""
    created = []
    for model in models:
        job = Job(study_instance_uid=study.study_instance_uid, generation=study.generation,
                  route_name=route_name, model_name=model, destinations=",".join(destinations),
                  delivered="", state=JobState.PENDING, attempts=0, not_before=now,
                  created_at=now, updated_at=now, waits_for_siblings=model in waiting)
        session.add(job)
        created.append(job)
    return created


def last_error(session: Session, job_id: int) -> str:
    job = session.get(Job, job_id)
    return (job.last_error or "") if job is not None else ""


def list_jobs(session: Session, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Jobs, newest first, with the worklist order matched to their study (for `dicom-node
    jobs`): ``order`` is "<rule> <accession>", e.g. "accession A123", or "" when unmatched."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        query = query.where(Job.state == JobState(state))
    jobs = list(session.scalars(query))
    orders = order_labels(session, {job.study_instance_uid for job in jobs})
    return [{
        "id": job.id, "study_instance_uid": job.study_instance_uid,
        "generation": job.generation, "route": job.route_name, "model": job.model_name,
        "model_version": job.model_version or "", "state": job.state.value,
        "attempts": job.attempts, "destinations": job.destinations,
        "delivered": job.delivered, "not_before": job.not_before.isoformat(timespec="seconds"),
        "claimed_at": job.claimed_at.isoformat(timespec="seconds") if job.claimed_at else "",
        "lease_owner": job.lease_owner or "",
        "order": orders.get(job.study_instance_uid, ""),
        "awaiting_delivery": _awaiting(job),
        "awaiting_delivery_to": job.awaiting_delivery_to or "",
        "awaiting_delivery_since": (job.awaiting_delivery_since.isoformat(timespec="seconds")
                                    if job.awaiting_delivery_since else ""),
        "delivery_attempts": job.delivery_attempts or 0,
        "last_error": job.last_error or "",
        "note": job.note or "",
    } for job in jobs]


def _awaiting(job: Job) -> str:
    """"pacs since 2026-12-08T03:00:12Z, 14 delivery attempts" for a job waiting out an outage,
    "" otherwise."""
    if not job.awaiting_delivery_to or job.awaiting_delivery_since is None or job.state not in (
            JobState.PENDING, JobState.RUNNING):
        return ""
    return (f"{job.awaiting_delivery_to} since "
            f"{job.awaiting_delivery_since.isoformat(timespec='seconds')}Z, "
            f"{job.delivery_attempts} delivery attempt(s)")
