"""Persistence of MPPS instances, and the queries the completion logic reads them with.

One MPPS instance is one :class:`~dicom_node.store.db.PerformedStep` row plus one
:class:`~dicom_node.store.db.PerformedStudy` row per study its Scheduled Step Attributes Sequence
names. The SCP (``mpps/scp.py``) writes them; completion reads them through
:func:`performed_steps_for_study` and :func:`studies_with_final_steps`, which return frozen
:class:`PerformedStepInfo` values, never ORM rows.

Every function takes a session inside the caller's transaction and does not commit: the SCP
commits once per N-CREATE / N-SET, before it answers. Times are naive UTC
(:func:`~dicom_node.store.db.utcnow`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.mpps.status import FINAL_STATUSES
from dicom_node.store.db import PerformedStep, PerformedStudy

#: Series Instance UID → SOP Instance UIDs listed for it (empty: the series' instances were not
#: listed by the modality).
PerformedSeries = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class PerformedStepInfo:
    """One MPPS instance as completion sees it."""

    sop_instance_uid: str
    #: "IN PROGRESS", "COMPLETED" or "DISCONTINUED".
    status: str
    modality: str
    #: Series Instance UID → SOP Instance UIDs (``()`` when the series' instances were not listed).
    performed_series: dict[str, tuple[str, ...]]
    discontinuation_reason: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class NewStep:
    """What an accepted N-CREATE stores."""

    sop_instance_uid: str
    status: str
    modality: str
    station_ae_title: str
    calling_ae_title: str
    #: Distinct Study Instance UIDs of the Scheduled Step Attributes Sequence, in their order.
    study_uids: tuple[str, ...]
    performed_series: PerformedSeries
    discontinuation_reason: str | None
    #: The instance's attributes as DICOM JSON (PS3.18 F.2).
    attributes_json: str


@dataclass(frozen=True)
class StoredStep:
    """What an N-SET needs to know of the instance it modifies."""

    sop_instance_uid: str
    status: str
    attributes_json: str
    study_uids: tuple[str, ...]


@dataclass(frozen=True)
class StepUpdate:
    """What an accepted N-SET stores (the whole instance after the modification)."""

    status: str
    performed_series: PerformedSeries
    discontinuation_reason: str | None
    attributes_json: str


def _series_to_json(series: PerformedSeries) -> str:
    return json.dumps({uid: list(sops) for uid, sops in series.items()}, separators=(",", ":"))


def _series_from_json(text: str) -> dict[str, tuple[str, ...]]:
    raw = json.loads(text or "{}")
    return {str(uid): tuple(str(s) for s in sops) for uid, sops in raw.items()}


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def create_step(session: Session, step: NewStep, now: datetime) -> bool:
    """Insert the step and its study links; False (nothing written) if the UID already exists."""
    if session.get(PerformedStep, step.sop_instance_uid) is not None:
        return False
    try:
        # A savepoint: a concurrent insert of the same UID (PostgreSQL) fails here, and the
        # caller's transaction stays usable.
        with session.begin_nested():
            session.add(PerformedStep(
                sop_instance_uid=step.sop_instance_uid, status=step.status,
                modality=step.modality, station_ae_title=step.station_ae_title,
                calling_ae_title=step.calling_ae_title,
                performed_series=_series_to_json(step.performed_series),
                discontinuation_reason=step.discontinuation_reason,
                attributes_json=step.attributes_json, created_at=now, updated_at=now))
            session.flush()
            session.add_all(PerformedStudy(mpps_uid=step.sop_instance_uid, study_instance_uid=uid)
                            for uid in dict.fromkeys(step.study_uids))
    except IntegrityError:
        return False
    return True


def load_step(session: Session, sop_instance_uid: str) -> StoredStep | None:
    """The step, locked for update until the caller's transaction ends (None if unknown)."""
    row = session.execute(
        select(PerformedStep).where(PerformedStep.sop_instance_uid == sop_instance_uid)
        .with_for_update()).scalar_one_or_none()
    if row is None:
        return None
    studies = session.scalars(select(PerformedStudy.study_instance_uid)
                              .where(PerformedStudy.mpps_uid == sop_instance_uid)
                              .order_by(PerformedStudy.study_instance_uid))
    return StoredStep(row.sop_instance_uid, row.status, row.attributes_json, tuple(studies))


def update_step(session: Session, sop_instance_uid: str, update: StepUpdate,
                now: datetime) -> None:
    """Write an N-SET's result over the step (which must exist)."""
    row = session.get(PerformedStep, sop_instance_uid)
    if row is None:
        raise LookupError(f"MPPS instance {sop_instance_uid} does not exist")
    row.status = update.status
    row.performed_series = _series_to_json(update.performed_series)
    row.discontinuation_reason = update.discontinuation_reason
    row.attributes_json = update.attributes_json
    row.updated_at = now


def _info(row: PerformedStep) -> PerformedStepInfo:
    return PerformedStepInfo(
        sop_instance_uid=row.sop_instance_uid, status=row.status, modality=row.modality or "",
        performed_series=_series_from_json(row.performed_series),
        discontinuation_reason=row.discontinuation_reason,
        created_at=row.created_at, updated_at=row.updated_at)


def performed_steps_for_study(session: Session, study_instance_uid: str) -> list[PerformedStepInfo]:
    """Every MPPS instance whose Scheduled Step Attributes name the study, oldest first."""
    rows = session.scalars(
        select(PerformedStep)
        .join(PerformedStudy, PerformedStudy.mpps_uid == PerformedStep.sop_instance_uid)
        .where(PerformedStudy.study_instance_uid == study_instance_uid)
        .order_by(PerformedStep.created_at, PerformedStep.sop_instance_uid))
    return [_info(row) for row in rows]


def studies_with_final_steps(session: Session, since: datetime) -> list[str]:
    """Study UIDs with an MPPS instance that became COMPLETED or DISCONTINUED at or after
    ``since`` (naive UTC, or aware). A final step is never updated again, so its ``updated_at``
    is the moment it became final."""
    rows = session.scalars(
        select(PerformedStudy.study_instance_uid)
        .join(PerformedStep, PerformedStudy.mpps_uid == PerformedStep.sop_instance_uid)
        .where(PerformedStep.status.in_([str(s) for s in FINAL_STATUSES]),
               PerformedStep.updated_at >= _naive_utc(since))
        .distinct()
        .order_by(PerformedStudy.study_instance_uid))
    return list(rows)


def list_performed_steps(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently updated MPPS instances, newest first, for a listing: no patient data."""
    rows = list(session.scalars(
        select(PerformedStep)
        .order_by(PerformedStep.updated_at.desc(), PerformedStep.sop_instance_uid)
        .limit(limit)))
    studies: dict[str, list[str]] = {row.sop_instance_uid: [] for row in rows}
    if rows:
        for link in session.scalars(select(PerformedStudy).where(
                PerformedStudy.mpps_uid.in_(list(studies)))
                .order_by(PerformedStudy.study_instance_uid)):
            studies[link.mpps_uid].append(link.study_instance_uid)
    listing = []
    for row in rows:
        series = _series_from_json(row.performed_series)
        listing.append({
            "sop_instance_uid": row.sop_instance_uid,
            "status": row.status,
            "modality": row.modality,
            "station_ae_title": row.station_ae_title,
            "calling_ae_title": row.calling_ae_title,
            "study_uids": studies[row.sop_instance_uid],
            "series": len(series),
            "instances": sum(len(sops) for sops in series.values()),
            "discontinuation_reason": row.discontinuation_reason,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        })
    return listing
