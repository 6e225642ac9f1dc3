"""Index operations on studies and instances, each one a single transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, DateTime, bindparam, func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.messages import StoredInstance
from dicom_node.store.db import (
    Instance,
    Job,
    JobState,
    PurgedStudy,
    ScheduledStep,
    Study,
    StudyOrder,
    StudyState,
    utcnow,
)

#: Study states after processing; an instance arriving in one of these reopens the study.
PROCESSED_STATES = frozenset({StudyState.ROUTED, StudyState.UNROUTED, StudyState.DONE,
                              StudyState.FAILED})


# The receiver's per-instance statements, fixed SQL compiled once: this runs on the C-STORE
# critical path, where building ORM or Core expressions each time cost more than the SQL itself
# (measured: 0.87 ms of CPU per instance with the ORM, 0.45 ms with these).
_SELECT_STUDY = text(
    "SELECT state FROM studies WHERE study_instance_uid = :study")
_INSERT_STUDY = text(
    "INSERT INTO studies (study_instance_uid, state, generation, first_received_at, "
    "last_received_at, instance_count) VALUES (:study, :state, 0, :now, :now, 0)"
).bindparams(bindparam("now", type_=DateTime()))
_SELECT_INSTANCE = text("SELECT 1 FROM instances WHERE sop_instance_uid = :sop")
_INSERT_INSTANCE = text(
    "INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, "
    "sop_class_uid, transfer_syntax_uid, modality, path, size, calling_ae_title, received_at) "
    "VALUES (:sop, :study, :series, :sop_class, :ts, :modality, :path, :size, :aet, :now)"
).bindparams(bindparam("now", type_=DateTime()))
_UPDATE_INSTANCE = text(
    "UPDATE instances SET transfer_syntax_uid = :ts, size = :size, calling_ae_title = :aet, "
    "received_at = :now, path = :path, set_aside_reason = NULL WHERE sop_instance_uid = :sop"
).bindparams(bindparam("now", type_=DateTime()))
_TOUCH_STUDY = text(
    "UPDATE studies SET instance_count = instance_count + :added, "
    "last_received_at = CASE WHEN :own THEN last_received_at ELSE :now END "
    "WHERE study_instance_uid = :study"
).bindparams(bindparam("now", type_=DateTime()), bindparam("own", type_=Boolean()))
_RESUME_STUDY = text(
    "UPDATE studies SET state = :state, note = :note WHERE study_instance_uid = :study")
_REOPEN_STUDY = text(
    "UPDATE studies SET state = :state, generation = generation + 1, completed_at = NULL, "
    "note = :note WHERE study_instance_uid = :study")


def record_instance(
    engine: Engine,
    *,
    sop_instance_uid: str,
    sop_class_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    transfer_syntax_uid: str,
    modality: str,
    path: Path,
    relative_path: str,
    size: int,
    calling_ae_title: str,
    received_at: datetime | None = None,
    update_existing: bool = True,
    own_result: bool = False,
) -> StoredInstance:
    """Index one stored instance and update its study, in one transaction.

    A new instance for a study held as ``incomplete`` puts it back to RECEIVING (same
    generation: nothing was processed). A new instance for a study in a processed state reopens
    it: back to RECEIVING with its generation incremented, so it is completed and routed again
    once stable (documented in docs/receiving.md). A re-sent instance (a SOP Instance UID
    already indexed) replaces or keeps the file per ``on_duplicate`` but does not reopen a
    processed study — a PACS re-forwarding a whole study must not make the node process it
    again. ``own_result`` (an object this node made, forwarded back to it by a PACS) is indexed
    but never restarts the study's clock or reopens it — no result loops. With
    ``update_existing`` False (``on_duplicate = "keep"`` threw the new copy away) the index
    keeps describing the kept file.
    """
    now = received_at or utcnow()
    ids = {"study": study_instance_uid, "sop": sop_instance_uid}
    with engine.begin() as conn:
        state = conn.execute(_SELECT_STUDY, ids).scalar()
        if state is None:
            conn.execute(_INSERT_STUDY, {**ids, "state": StudyState.RECEIVING.value, "now": now})
            state = StudyState.RECEIVING.value
        existing = conn.execute(_SELECT_INSTANCE, ids).first() is not None
        fields = {**ids, "ts": transfer_syntax_uid, "size": size, "aet": calling_ae_title,
                  "now": now}
        if not existing:
            conn.execute(_INSERT_INSTANCE, {**fields, "series": series_instance_uid,
                                            "sop_class": sop_class_uid, "modality": modality,
                                            "path": relative_path})
        elif update_existing:
            # the path too: an instance whose file retention deleted (path "") has one again
            conn.execute(_UPDATE_INSTANCE, {**fields, "path": relative_path})
        conn.execute(_TOUCH_STUDY, {**ids, "added": 0 if existing else 1, "own": own_result,
                                    "now": now})
        reopened = not existing and not own_result and StudyState(state) in PROCESSED_STATES
        if not existing and not own_result and StudyState(state) == StudyState.INCOMPLETE:
            # A study held as incomplete gets what it was missing (perhaps): judge it again.
            conn.execute(_RESUME_STUDY, {**ids, "state": StudyState.RECEIVING.value,
                                         "note": "was incomplete; an instance arrived at "
                                                 f"{now.isoformat()}Z"})
        if reopened:
            conn.execute(_REOPEN_STUDY, {**ids, "state": StudyState.RECEIVING.value,
                                         "note": f"reopened by a late instance at "
                                                 f"{now.isoformat()}Z"})
    return StoredInstance(
        sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
        study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid,
        transfer_syntax_uid=transfer_syntax_uid, modality=modality, path=path, size=size,
        calling_ae_title=calling_ae_title, received_at=now, duplicate=existing,
        reopened_study=reopened)


def reprocess(sessions: sessionmaker[Session], study_uids: Sequence[str]
              ) -> tuple[list[str], dict[str, datetime]]:
    """Administrator's re-run: reopen processed studies (new generation) and make them due for
    completion at the next sweep, e.g. after adding a route for studies that were unrouted.
    Returns the UIDs reopened, and those left alone because retention deleted every file of
    theirs (with when); studies still receiving or unknown are left alone too."""
    now = utcnow()
    reopened = []
    purged: dict[str, datetime] = {}
    with sessions.begin() as session:
        for uid in study_uids:
            study = session.get(Study, uid)
            if study is None or study.state not in PROCESSED_STATES:
                continue
            record = session.get(PurgedStudy, uid)
            if record is not None and not study_instances(session, uid):
                purged[uid] = record.purged_at
                continue
            study.state = StudyState.RECEIVING
            study.generation += 1
            study.completed_at = None
            # Already stable: the next completion sweep routes it with the current config.
            study.last_received_at = now - timedelta(days=1)
            study.note = f"reprocess requested by an administrator at {now.isoformat()}Z"
            reopened.append(uid)
    return reopened, purged


def stable_studies(session: Session, stable_after: timedelta, now: datetime) -> Sequence[Study]:
    """Studies still receiving whose last instance is older than ``stable_after``."""
    return session.scalars(
        select(Study)
        .where(Study.state == StudyState.RECEIVING)
        .where(Study.last_received_at <= now - stable_after)
        .order_by(Study.last_received_at)
    ).all()


def study_instances(session: Session, study_uid: str) -> Sequence[Instance]:
    """The study's instances that have a file in the spool (retention empties the path of the
    ones it deleted) and were not set aside as unreadable, by series, then as received."""
    return session.scalars(
        select(Instance).where(Instance.study_instance_uid == study_uid)
        .where(Instance.path != "").where(Instance.set_aside_reason.is_(None))
        .order_by(Instance.series_instance_uid, Instance.received_at)
    ).all()


def set_aside_instance(session: Session, sop_instance_uid: str, reason: str) -> None:
    """Mark an acknowledged instance that later stages cannot read (store.readback.set_aside):
    it is left out of summaries and job inputs until a new copy of it arrives."""
    session.execute(update(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
                    .values(set_aside_reason=reason or "unreadable"))


def set_aside_instances(session: Session, study_uid: str,
                        modalities: Sequence[str] = ()) -> dict[str, str]:
    """SOP Instance UID → reason, for the study's set-aside instances (of these modalities,
    if any are given)."""
    query = (select(Instance.sop_instance_uid, Instance.set_aside_reason)
             .where(Instance.study_instance_uid == study_uid)
             .where(Instance.set_aside_reason.is_not(None)))
    if modalities:
        query = query.where(Instance.modality.in_(list(modalities)))
    rows = session.execute(query).all()
    return {row[0]: row[1] or "unreadable" for row in rows}


def order_labels(session: Session, study_uids: set[str]) -> dict[str, str]:
    """Study UID → "<match rule> <accession number>" of its matched worklist order (the
    ``order`` column of `dicom-node studies` and `dicom-node jobs`)."""
    if not study_uids:
        return {}
    rows = session.execute(
        select(StudyOrder.study_instance_uid, StudyOrder.method, ScheduledStep.accession_number)
        .join(ScheduledStep, ScheduledStep.id == StudyOrder.step_id)
        .where(StudyOrder.study_instance_uid.in_(sorted(study_uids)))).all()
    return {uid: f"{method} {accession or '(no accession)'}" for uid, method, accession in rows}


def list_studies(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    """Studies with their state and job counts, newest first (for `dicom-node studies`)."""
    rows = []
    studies = list(session.scalars(
        select(Study).order_by(Study.last_received_at.desc()).limit(limit)))
    orders = order_labels(session, {s.study_instance_uid for s in studies})
    set_aside: dict[str, int] = {row[0]: row[1] for row in session.execute(
        select(Instance.study_instance_uid, func.count())
        .where(Instance.study_instance_uid.in_([s.study_instance_uid for s in studies]))
        .where(Instance.set_aside_reason.is_not(None))
        .group_by(Instance.study_instance_uid)).all()}
    for study in studies:
        counts = {row[0]: row[1] for row in session.execute(
            select(Job.state, func.count()).where(
                Job.study_instance_uid == study.study_instance_uid,
                Job.generation == study.generation).group_by(Job.state)).all()}
        rows.append({
            "study_instance_uid": study.study_instance_uid, "state": study.state.value,
            "generation": study.generation, "instances": study.instance_count,
            "last_received_at": study.last_received_at.isoformat(timespec="seconds"),
            "jobs": {JobState(k).value: v for k, v in counts.items()},
            "order": orders.get(study.study_instance_uid, ""), "note": study.note or "",
            "set_aside": set_aside.get(study.study_instance_uid, 0),
        })
    return rows
