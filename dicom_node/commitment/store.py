"""Storage Commitment transactions in the database (table ``commitments``), and what their
outcome does to the job.

One row is one request: a job's results sent to one destination with ``storage_commitment``
on. Its life::

    requested ──report: every instance committed──▶ committed
        │      ──report: failures exist──────────▶ failed     (the job sends again)
        │      ──N-ACTION refused─────────────────▶ failed     (the attempt fails)
        └──no report by the deadline─────────────▶ timed_out  (the job fails; a late report
                                                                is still recorded)

The destination counts as delivered from the moment the transaction is recorded (one
transaction with the job's deliveries, before the N-ACTION leaves: a report can arrive at the
receiver before the worker hears the N-ACTION's response); a failure or a timeout takes the
destination off the job's deliveries again (:func:`dicom_node.jobs.queue.undeliver`). Only the
newest transaction of a (job, destination) changes the job. Times are naive UTC.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.commitment.status import failure_text
from dicom_node.config import Destination, JobsSection
from dicom_node.jobs import queue
from dicom_node.jobs.queue import ClaimedJob
from dicom_node.store.db import Commitment, CommitmentState, JobState, utcnow

#: Namespace of the Transaction UIDs (name-based UUIDs, like the result UIDs of dicom_node.uids).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:storage-commitment")
#: Failed instances quoted in a note (and so in the job's last error); the row keeps them all.
_QUOTED = 3


@dataclass(frozen=True)
class Reference:
    """One instance of a Referenced SOP Sequence item."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failure:
    """An instance the destination did not commit; ``reason`` None: left out of the report."""

    sop_instance_uid: str
    sop_class_uid: str
    reason: int | None


@dataclass(frozen=True)
class Report:
    """A decoded N-EVENT-REPORT (the handler checked its shape)."""

    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...]
    calling_ae: str


@dataclass(frozen=True)
class Outcome:
    """What a report or a timeout did to a transaction and its job, for the log."""

    transaction_uid: str
    job_id: int
    study_instance_uid: str
    destination: str
    #: The state before and after.
    previous: CommitmentState
    state: CommitmentState
    instances: int
    failures: tuple[Failure, ...] = ()
    #: The job's state afterwards; None when the outcome left the job alone (an older
    #: transaction of the same job and destination, or a report repeated).
    job_state: JobState | None = None
    note: str | None = None

    @property
    def repeated(self) -> bool:
        """A report for a transaction that had one already: recorded nothing."""
        return self.previous in (CommitmentState.COMMITTED, CommitmentState.FAILED)


def transaction_uid(job: ClaimedJob, destination: str, calling_ae: str, delivery: int) -> str:
    """The Transaction UID of a job's ``delivery``-th request to ``destination`` (``2.25.``
    form): the same inputs give the same UID, and each request gets a new one (a PACS may
    refuse a Transaction UID it has seen: Failure Reason 0131H)."""
    name = "\x00".join(["commitment", job.study_instance_uid, str(job.generation),
                        job.route_name, job.model_name, destination, calling_ae, str(delivery)])
    return "2.25." + str(uuid.uuid5(_NAMESPACE, name).int)


def record_request(sessions: sessionmaker[Session], job: ClaimedJob, dest: Destination,
                   calling_ae: str, references: tuple[Reference, ...], model_version: str,
                   now: datetime | None = None) -> str | None:
    """Record a new transaction and the destination as delivered, in one transaction; its
    Transaction UID, or None when the job is no longer ours (its lease was lost)."""
    now = now or utcnow()
    with sessions.begin() as session:
        row = queue.owned(session, job.id, job.owner)
        if row is None:
            return None
        delivery = 1 + int(session.scalar(
            select(func.coalesce(func.max(Commitment.delivery), 0))
            .where(Commitment.job_id == job.id, Commitment.destination == dest.name)) or 0)
        uid = transaction_uid(job, dest.name, calling_ae, delivery)
        session.add(Commitment(
            transaction_uid=uid, job_id=job.id, study_instance_uid=job.study_instance_uid,
            destination=dest.name, delivery=delivery, state=CommitmentState.REQUESTED,
            instances=len(references),
            requested=json.dumps([[r.sop_class_uid, r.sop_instance_uid] for r in references]),
            requested_at=now,
            deadline=now + timedelta(minutes=dest.commitment_timeout_minutes)))
        queue.mark_delivered(row, dest.name, model_version, now)
    return uid


def abandon(sessions: sessionmaker[Session], job: ClaimedJob, destination: str, uid: str,
            reason: str) -> None:
    """The N-ACTION did not go through: the transaction failed, and the destination is no
    longer delivered (the attempt fails; the next one sends again)."""
    now = utcnow()
    with sessions.begin() as session:
        row = session.scalar(select(Commitment).where(Commitment.transaction_uid == uid))
        if row is not None and row.state == CommitmentState.REQUESTED:
            row.state = CommitmentState.FAILED
            row.note = f"N-ACTION: {reason}"
        owned = queue.owned(session, job.id, job.owner)
        if owned is not None:
            queue.unmark_delivered(owned, destination, now)


def _is_latest(session: Session, row: Commitment) -> bool:
    newer = session.scalar(select(func.count()).select_from(Commitment).where(
        Commitment.job_id == row.job_id, Commitment.destination == row.destination,
        Commitment.delivery > row.delivery))
    return not newer


def _failures(row: Commitment, report: Report) -> tuple[Failure, ...]:
    """The requested instances not committed: reported failed, or left out of the report."""
    requested = {sop: cls for cls, sop in json.loads(row.requested)}
    committed = {r.sop_instance_uid for r in report.committed} & requested.keys()
    listed = {ref.sop_instance_uid: reason for ref, reason in report.failed
              if ref.sop_instance_uid in requested}
    failures = [Failure(sop, requested[sop], listed[sop]) for sop in requested if sop in listed]
    failures += [Failure(sop, cls, None) for sop, cls in requested.items()
                 if sop not in committed and sop not in listed]
    return tuple(failures)


def _note(destination: str, failures: tuple[Failure, ...], instances: int) -> str:
    quoted = "; ".join(f"{f.sop_instance_uid}: {failure_text(f.reason)}"
                       for f in failures[:_QUOTED])
    more = f"; … {len(failures) - _QUOTED} more" if len(failures) > _QUOTED else ""
    return (f"storage commitment: {destination}: {len(failures)} of {instances} instance(s) "
            f"not committed: {quoted}{more}")


def apply_report(session: Session, report: Report, jobs: JobsSection,
                 now: datetime | None = None) -> Outcome | None:
    """Record a report (inside the caller's transaction) and apply it to the job; None for a
    Transaction UID the node never requested. A second report for a transaction changes
    nothing (``Outcome.repeated``); a late one, after a timeout, is recorded and, when it
    commits everything, gives the job its delivery back."""
    now = now or utcnow()
    row = session.execute(select(Commitment).where(
        Commitment.transaction_uid == report.transaction_uid).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        return None
    previous = row.state
    base: dict[str, Any] = {
        "transaction_uid": row.transaction_uid, "job_id": row.job_id,
        "study_instance_uid": row.study_instance_uid, "destination": row.destination,
        "previous": previous, "instances": row.instances}
    if previous in (CommitmentState.COMMITTED, CommitmentState.FAILED):
        return Outcome(state=previous, **base)
    failures = _failures(row, report)
    row.reported_at, row.reported_by = now, report.calling_ae[:16]
    job_state = None
    if failures:
        row.state = CommitmentState.FAILED
        row.failed = json.dumps([[f.sop_instance_uid, f.sop_class_uid, f.reason]
                                 for f in failures])
        row.note = _note(row.destination, failures, row.instances)
        if _is_latest(session, row):
            job_state = queue.undeliver(session, row.job_id, row.destination, row.note, jobs,
                                        now, retry=True)
    else:
        row.state = CommitmentState.COMMITTED
        row.failed = None
        if previous == CommitmentState.TIMED_OUT and _is_latest(session, row):
            row.note = f"committed after the timeout: {row.note}"
            job_state = queue.redeliver(session, row.job_id, row.destination, now)
    return Outcome(state=row.state, failures=failures, job_state=job_state, note=row.note,
                   **base)


def expire(sessions: sessionmaker[Session], jobs: JobsSection,
           now: datetime | None = None) -> list[Outcome]:
    """Time out every transaction still requested after its deadline, each in a transaction of
    its own; the newest of its job and destination fails the job (no automatic re-send: a
    destination that never reports needs an administrator). What it did, for the log."""
    now = now or utcnow()
    with sessions() as session:
        due = list(session.scalars(select(Commitment.id).where(
            Commitment.state == CommitmentState.REQUESTED, Commitment.deadline < now)
            .order_by(Commitment.deadline)))
    outcomes = []
    for row_id in due:
        with sessions.begin() as session:
            row = session.execute(select(Commitment).where(Commitment.id == row_id)
                                  .with_for_update()).scalar_one()
            if row.state != CommitmentState.REQUESTED:  # a report came meanwhile
                continue
            minutes = (row.deadline - row.requested_at).total_seconds() / 60
            row.state = CommitmentState.TIMED_OUT
            row.note = (f"storage commitment: {row.destination}: no report within "
                        f"{minutes:g} min (transaction {row.transaction_uid}); check that the "
                        f"destination can open an association to the node's receiver")
            job_state = None
            if _is_latest(session, row):
                job_state = queue.undeliver(session, row.job_id, row.destination, row.note,
                                            jobs, now, retry=False)
            outcomes.append(Outcome(
                transaction_uid=row.transaction_uid, job_id=row.job_id,
                study_instance_uid=row.study_instance_uid, destination=row.destination,
                previous=CommitmentState.REQUESTED, state=row.state, instances=row.instances,
                job_state=job_state, note=row.note))
    return outcomes


def failures_of(row: Commitment) -> tuple[Failure, ...]:
    return tuple(Failure(sop, cls, reason) for sop, cls, reason in json.loads(row.failed or "[]"))


def list_commitments(session: Session, states: Sequence[str] = (),
                     limit: int = 200) -> list[dict[str, Any]]:
    """Transactions in ``states`` (all when empty), newest first (``dicom-node commitments``)."""
    query = select(Commitment).order_by(Commitment.id.desc()).limit(limit)
    if states:
        query = query.where(Commitment.state.in_([CommitmentState(s) for s in states]))
    return [{
        "id": row.id, "job_id": row.job_id, "study_instance_uid": row.study_instance_uid,
        "destination": row.destination, "delivery": row.delivery, "state": row.state.value,
        "instances": row.instances, "transaction_uid": row.transaction_uid,
        "requested_at": row.requested_at.isoformat(timespec="seconds"),
        "deadline": row.deadline.isoformat(timespec="seconds"),
        "reported_at": row.reported_at.isoformat(timespec="seconds") if row.reported_at else "",
        "reported_by": row.reported_by or "",
        "failed": [{"sop_instance_uid": f.sop_instance_uid, "sop_class_uid": f.sop_class_uid,
                    "failure_reason": f.reason, "reason": failure_text(f.reason)}
                   for f in failures_of(row)],
        "note": row.note or "",
    } for row in session.scalars(query)]
