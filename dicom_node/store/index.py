"""Index operations on studies and instances, each one a single transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.messages import StoredInstance
from dicom_node.store.db import Instance, Job, JobState, Study, StudyState, utcnow

#: Study states after processing; an instance arriving in one of these reopens the study.
PROCESSED_STATES = frozenset({StudyState.ROUTED, StudyState.UNROUTED, StudyState.DONE,
                              StudyState.FAILED})


def record_instance(
    sessions: sessionmaker[Session],
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

    A new instance for a study in a processed state reopens it: back to RECEIVING with its
    generation incremented, so it is completed and routed again once stable (documented in
    docs/receiving.md). A re-sent instance (a SOP Instance UID already indexed) replaces or keeps
    the file per ``on_duplicate`` but does not reopen a processed study — a PACS re-forwarding a
    whole study must not make the node process it again. ``own_result`` (an object this node
    made, forwarded back to it by a PACS) is indexed but never restarts the study's clock or
    reopens it — no result loops. With
    ``update_existing`` False (``on_duplicate = "keep"`` threw the new copy away) the index keeps
    describing the kept file.
    """
    now = received_at or utcnow()
    with sessions.begin() as session:
        study = session.get(Study, study_instance_uid)
        reopened = False
        if study is None:
            study = Study(study_instance_uid=study_instance_uid, state=StudyState.RECEIVING,
                          generation=0, first_received_at=now, last_received_at=now,
                          instance_count=0)
            session.add(study)
            session.flush()
        existing = session.get(Instance, sop_instance_uid)
        if existing is None and not own_result and study.state in PROCESSED_STATES:
            study.state = StudyState.RECEIVING
            study.generation += 1
            study.completed_at = None
            study.note = f"reopened by a late instance at {now.isoformat()}Z"
            reopened = True
        if not own_result:
            study.last_received_at = now
        if existing is None:
            session.add(Instance(
                sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid, sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax_uid, modality=modality, path=relative_path,
                size=size, calling_ae_title=calling_ae_title, received_at=now))
            study.instance_count += 1
        elif update_existing:
            existing.transfer_syntax_uid = transfer_syntax_uid
            existing.size = size
            existing.calling_ae_title = calling_ae_title
            existing.received_at = now
    return StoredInstance(
        sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
        study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid,
        transfer_syntax_uid=transfer_syntax_uid, modality=modality, path=path, size=size,
        calling_ae_title=calling_ae_title, received_at=now, duplicate=existing is not None,
        reopened_study=reopened)


def stable_studies(session: Session, stable_after: timedelta, now: datetime) -> Sequence[Study]:
    """Studies still receiving whose last instance is older than ``stable_after``."""
    return session.scalars(
        select(Study)
        .where(Study.state == StudyState.RECEIVING)
        .where(Study.last_received_at <= now - stable_after)
        .order_by(Study.last_received_at)
    ).all()


def study_instances(session: Session, study_uid: str) -> Sequence[Instance]:
    return session.scalars(
        select(Instance).where(Instance.study_instance_uid == study_uid)
        .order_by(Instance.series_instance_uid, Instance.received_at)
    ).all()


def list_studies(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    """Studies with their state and job counts, newest first (for `dicom-node studies`)."""
    rows = []
    for study in session.scalars(
            select(Study).order_by(Study.last_received_at.desc()).limit(limit)):
        counts = dict(session.execute(
            select(Job.state, func.count()).where(
                Job.study_instance_uid == study.study_instance_uid,
                Job.generation == study.generation).group_by(Job.state)).tuples().all())
        rows.append({
            "study_instance_uid": study.study_instance_uid, "state": study.state.value,
            "generation": study.generation, "instances": study.instance_count,
            "last_received_at": study.last_received_at.isoformat(timespec="seconds"),
            "jobs": {JobState(k).value: v for k, v in counts.items()}, "note": study.note or "",
        })
    return rows
