"""Match a study to its worklist order (scheduled procedure step).

The order of the rules is fixed and documented (docs/worklist.md):

1. **study_uid**: a stored step whose Study Instance UID is the study's — the modality took the
   UID from the worklist, the strongest link;
2. **accession**: a step whose Accession Number is one of the study's (non-empty) accession
   numbers;
3. **patient_modality_date**: a step for the same Patient ID, whose scheduled modality is one of
   the study's modalities and whose scheduled date is within ``worklist.match_days`` of the Study
   Date. Only an unambiguous match counts: two different requests fitting is no match (a wrong
   order is worse than none), logged as ``order_ambiguous``.

Under rules 1 and 2 a request can hold several scheduled steps (e.g. CT and a reconstruction
step); the step of the study's modality is taken, then the earliest scheduled.

The match is kept in ``study_orders``; results read it back with :func:`order_for_study`. The
catch-up after a worklist outage (``complete.catch_up``) and the order column of the listings
(``store.index.order_labels``) live with the code that runs them, so that this module imports
neither the completion nor the queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import Config
from dicom_node.log import get_logger
from dicom_node.messages import StudySummary
from dicom_node.store.db import ScheduledStep, StudyOrder, utcnow
from dicom_node.worklist.order import Order, step_order

log = get_logger()


def _dates(values: Iterable[str]) -> list[date]:
    found = []
    for value in values:
        try:
            found.append(datetime.strptime(value.strip()[:8], "%Y%m%d").date())
        except ValueError:
            continue
    return found


def _prefer(steps: Sequence[ScheduledStep], modalities: frozenset[str]) -> ScheduledStep:
    """Of several steps of one request: the study's modality first, then the earliest."""
    return sorted(steps, key=lambda s: (s.modality not in modalities,
                                        s.scheduled_start or datetime.max, s.id))[0]


def find_step(session: Session, summary: StudySummary,
              match_days: int = 0) -> tuple[ScheduledStep, str] | None:
    """The stored step this study belongs to and the rule that found it, or None."""
    modalities = summary.values.get("Modality", frozenset())
    steps = session.scalars(select(ScheduledStep).where(
        ScheduledStep.study_instance_uid == summary.study_instance_uid)).all()
    if steps:
        return _prefer(steps, modalities), "study_uid"
    accessions = sorted(a for a in summary.values.get("AccessionNumber", frozenset()) if a)
    if accessions:
        steps = session.scalars(select(ScheduledStep).where(
            ScheduledStep.accession_number.in_(accessions))).all()
        if steps:
            return _prefer(steps, modalities), "accession"
    patients = sorted(p for p in summary.values.get("PatientID", frozenset()) if p)
    study_dates = _dates(summary.values.get("StudyDate", frozenset()))
    if not patients or not modalities or not study_dates:
        return None
    window = timedelta(days=match_days)
    candidates = [
        step for step in session.scalars(select(ScheduledStep).where(
            ScheduledStep.patient_id.in_(patients),
            ScheduledStep.modality.in_(sorted(modalities)))).all()
        if step.scheduled_start is not None
        and any(abs(step.scheduled_start.date() - d) <= window for d in study_dates)]
    requests = {(s.study_instance_uid or "", s.accession_number or "") for s in candidates}
    if len(requests) > 1:
        log.warning("order_ambiguous", study_uid=summary.study_instance_uid,
                    rule="patient_modality_date", candidates=len(requests),
                    reason="several worklist requests fit; the study is left unmatched")
        return None
    return (_prefer(candidates, modalities), "patient_modality_date") if candidates else None


def match_study(session: Session, config: Config, summary: StudySummary) -> Order | None:
    """Match (or re-match) a study and record it in ``study_orders`` (the caller commits).

    Without an enabled [worklist] section nothing is matched. A study that matches nothing keeps
    no row (an earlier match of a reopened study is dropped only when a new match replaces it)."""
    worklist = config.worklist
    if worklist is None or not worklist.enabled:
        return None
    found = find_step(session, summary, worklist.match_days)
    if found is None:
        return None
    step, method = found
    row = session.get(StudyOrder, summary.study_instance_uid)
    if row is None:
        session.add(StudyOrder(study_instance_uid=summary.study_instance_uid, step_id=step.id,
                               method=method, matched_at=utcnow()))
    elif (row.step_id, row.method) != (step.id, method):
        row.step_id, row.method, row.matched_at = step.id, method, utcnow()
    order = step_order(step, method)
    log.info("order_matched", study_uid=summary.study_instance_uid, rule=method,
             accession_number=order.accession_number,
             requested_procedure=order.requested_procedure_description
             or ",".join(c.value for c in order.requested_procedure_codes))
    return order


def order_for_study(session: Session, study_uid: str) -> Order | None:
    """The order a study was matched to (None: unmatched, or the step was pruned)."""
    row = session.get(StudyOrder, study_uid)
    if row is None:
        return None
    step = session.get(ScheduledStep, row.step_id)
    if step is None:
        return None
    return step_order(step, row.method)

