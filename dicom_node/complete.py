"""Study completion: when a study is whole, route it and create its jobs.

The policy, in the order it is applied at every sweep (docs/receiving.md, "When is a study
complete?"):

1. **MPPS** (when ``[mpps]`` is on): a study whose Modality Performed Procedure Steps are all
   final (COMPLETED, or DISCONTINUED with ``mpps.on_discontinued = "process"``) is complete as
   soon as every performed series they list has arrived — every listed instance, or at least one
   instance of a series listed without its images. No waiting for the timer.
2. **Stable age** (the fallback): a study is complete ``completion.stable_after_seconds`` after
   its last instance arrived, unless something expected is missing: a step still IN PROGRESS
   (for up to ``mpps.in_progress_timeout_seconds``), a DISCONTINUED step (``on_discontinued =
   "hold"``), performed series or instances that never arrived, or the modality its worklist order
   scheduled. Such a study is **incomplete**: with ``completion.on_incomplete = "hold"`` it is kept
   unprocessed in state ``incomplete`` and reported once (``study_incomplete``); whatever arrives
   later (an instance, an MPPS update) is judged again at the next sweep. ``"process"`` routes
   what arrived, with a warning. ``dicom-node reprocess`` forces an incomplete study through.

Each study is matched to its worklist order (dicom_node.worklist.match) before it is routed, so
routes can match on the order; after a worklist outage, :func:`catch_up` matches the studies
completed meanwhile and queues the order routes that fire for them.

An instance that arrives after its study was processed reopens it (see store.index): the study goes
back to ``receiving`` with its generation incremented, becomes complete again once stable, and is
routed again; the new generation's results get new UIDs and a new series, so the PACS keeps both
the earlier result and the one that saw every image.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config
from dicom_node.errors import ConfigError, UnreadableInstanceError
from dicom_node.jobs.queue import create_jobs
from dicom_node.log import get_logger
from dicom_node.messages import StudySummary
from dicom_node.mpps.status import FINAL_STATUSES, StepStatus
from dicom_node.mpps.store import performed_steps_for_study
from dicom_node.route import RouteDecision, route_study, summarize
from dicom_node.store.db import (
    Instance,
    Job,
    PerformedStep,
    PerformedStudy,
    Study,
    StudyOrder,
    StudyState,
    utcnow,
)
from dicom_node.store.index import PROCESSED_STATES, set_aside_instances, study_instances
from dicom_node.store.readback import read_instance, set_aside
from dicom_node.worklist.match import match_study, order_for_study
from dicom_node.worklist.order import Order

log = get_logger()

#: Longest study note kept (the reasons of an incomplete study).
NOTE_LIMIT = 2000


@dataclass(frozen=True)
class _Snapshot:
    study_uid: str
    generation: int
    last_received_at: datetime
    state: StudyState
    note: str | None


@dataclass(frozen=True)
class Readiness:
    """Whether a study is complete now, by which policy, and what it still lacks."""

    ready: bool
    #: "mpps" or "stable_age" (empty while neither applies yet).
    policy: str
    #: What is expected and missing (empty when ready).
    missing: tuple[str, ...] = ()


def summarize_stored_study(session: Session, data_dir: Path, study_uid: str) -> StudySummary:
    """Summary of a stored study from one representative instance per series (headers only).

    A representative that cannot be read is set aside (store.readback) and the next instance of
    its series stands in; the changes are committed with the caller's session. A study whose
    every instance was set aside has a summary with no series (see :func:`_all_unreadable`)."""
    instances = study_instances(session, study_uid)
    by_series: dict[str, list[Instance]] = {}
    for inst in instances:
        by_series.setdefault(inst.series_instance_uid, []).append(inst)
    datasets = []
    set_aside_count = 0
    for members in by_series.values():
        for inst in members:
            try:
                ds = read_instance(data_dir / inst.path, headers_only=True)
            except UnreadableInstanceError as exc:
                set_aside(session, inst, str(exc), stage="completion")
                set_aside_count += 1
                continue
            datasets.append(ds)
            break
    return summarize(study_uid, datasets, {i.calling_ae_title for i in instances},
                     instance_count=len(instances) - set_aside_count)


def _all_unreadable(summary: StudySummary) -> bool:
    return summary.series_count == 0


def _end_unreadable(sessions: sessionmaker[Session], snap: _Snapshot) -> bool:
    """A study none of whose instances can be read ends ``failed`` with a note, reported once:
    it must not stay ``receiving``. A new instance reopens it like any processed study."""
    with sessions.begin() as session:
        study = session.get(Study, snap.study_uid, with_for_update=True)
        if (study is None or study.state != snap.state or study.generation != snap.generation
                or study.last_received_at != snap.last_received_at):
            return False
        reasons = set_aside_instances(session, snap.study_uid)
        study.completed_at = utcnow()
        study.state = StudyState.FAILED
        study.note = (f"not processed: all {len(reasons)} instance(s) were set aside as "
                      "unreadable (see instances.set_aside_reason)")[:NOTE_LIMIT]
    log.error("study_unreadable", study_uid=snap.study_uid, generation=snap.generation,
              set_aside=len(reasons),
              action="state failed; send the study again (a new instance reopens it)")
    return True


def _report_models(config: Config) -> frozenset[str]:
    """Models whose card says kind = "report": they run after the route's other models."""
    from dicom_node.infer.card import load_card

    names = set()
    for model in config.models:
        try:
            if load_card(model.path).kind == "report":
                names.add(model.name)
        except ConfigError:
            continue  # its job fails with the card's message when it runs
    return frozenset(names)


def _mpps_on(config: Config) -> bool:
    return config.mpps is not None and config.mpps.enabled


def judge(session: Session, config: Config, study_uid: str, *, stable: bool,
          order: Order | None, now: datetime, last_received_at: datetime | None = None
          ) -> Readiness:
    """Apply the completion policy to a study from the index alone (no file is read)."""
    rows = session.execute(
        select(Instance.series_instance_uid, Instance.sop_instance_uid, Instance.modality)
        .where(Instance.study_instance_uid == study_uid)).all()
    series_present = {r[0] for r in rows}
    sops_present = {r[1] for r in rows}
    missing: list[str] = []
    counted = []
    if config.mpps is not None and config.mpps.enabled:
        stale = timedelta(seconds=config.mpps.in_progress_timeout_seconds)
        quiet_for = config.mpps.unlisted_series_quiet_seconds
        for step in performed_steps_for_study(session, study_uid):
            if step.status == StepStatus.IN_PROGRESS:
                if now - step.updated_at <= stale:
                    missing.append(f"procedure step {step.sop_instance_uid} is still in "
                                   f"progress (MPPS)")
            elif step.status == StepStatus.DISCONTINUED and config.mpps.on_discontinued == "hold":
                missing.append(f"procedure step {step.sop_instance_uid} was discontinued "
                               f"({step.discontinuation_reason or 'no reason given'})")
            else:
                counted.append(step)
        for step in counted:
            for series, sops in step.performed_series.items():
                if sops:
                    absent = [s for s in sops if s not in sops_present]
                    if absent:
                        missing.append(f"series {series}: {len(absent)} of {len(sops)} "
                                       f"instances listed by MPPS have not arrived")
                elif series not in series_present:
                    missing.append(f"series {series} listed by MPPS has not arrived")
                elif not stable and (last_received_at is None or now - last_received_at
                                     < timedelta(seconds=quiet_for)):
                    # Listed without its images: the study must also have gone quiet.
                    missing.append(f"series {series} (listed by MPPS without its images) "
                                   f"may still be arriving")
        if counted and not missing:
            return Readiness(True, "mpps")
    if not stable:
        return Readiness(False, "", tuple(missing))
    modalities = {r[2] for r in rows}
    if order is not None and order.modality and order.modality not in modalities:
        missing.append(f"the worklist order schedules modality {order.modality}; no instance "
                       f"of it arrived")
    return Readiness(not missing, "stable_age", tuple(missing))


def _candidates(session: Session, config: Config, cutoff: datetime) -> list[_Snapshot]:
    """Studies to judge: stable ones, ones with a final MPPS, and the incomplete ones."""
    conditions = [
        (Study.state == StudyState.RECEIVING) & (Study.last_received_at <= cutoff),
        Study.state == StudyState.INCOMPLETE,
    ]
    if _mpps_on(config):
        final = (select(PerformedStudy.study_instance_uid)
                 .join(PerformedStep,
                       PerformedStep.sop_instance_uid == PerformedStudy.mpps_uid)
                 .where(PerformedStep.status.in_(sorted(FINAL_STATUSES))))
        conditions.append((Study.state == StudyState.RECEIVING)
                          & Study.study_instance_uid.in_(final))
    return [_Snapshot(s.study_instance_uid, s.generation, s.last_received_at, s.state, s.note)
            for s in session.scalars(select(Study).where(or_(*conditions))
                                     .order_by(Study.last_received_at))]


def sweep(config: Config, sessions: sessionmaker[Session], now: datetime | None = None) -> int:
    """Judge every candidate study; complete (route) the ready ones, hold the incomplete ones.
    Returns how many were completed."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=config.completion.stable_after_seconds)
    with sessions() as session:
        snapshots = _candidates(session, config, cutoff)
    completed = 0
    for snap in snapshots:
        try:
            completed += _consider(config, sessions, snap, now, cutoff)
        except Exception as exc:  # one bad study must not stop the others; the next sweep
            _report_failure(snap, exc)  # retries it
        else:
            _FAILURES.pop(snap.study_uid, None)
    return completed


#: Study UID → the last completion failure logged for it: a study that fails the same way at
#: every sweep logs its traceback once, not every sweep (bounded: oldest entries dropped).
_FAILURES: dict[str, str] = {}
_FAILURES_LIMIT = 10_000


def _report_failure(snap: _Snapshot, exc: Exception) -> None:
    # The same error is the same exception type raised at the same line (its message may hold
    # changing values, e.g. the timestamps among an SQL error's parameters).
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    seen = f"{snap.generation}:{type(exc).__name__}:{where}"
    if _FAILURES.get(snap.study_uid) == seen:
        log.debug("completion_failed", study_uid=snap.study_uid, repeated=True,
                  reason=f"{type(exc).__name__} at {where}")
        return
    while len(_FAILURES) >= _FAILURES_LIMIT:
        _FAILURES.pop(next(iter(_FAILURES)))
    _FAILURES[snap.study_uid] = seen
    log.exception("completion_failed", study_uid=snap.study_uid,
                  action="retried at every sweep; logged again only if the error changes")


def _consider(config: Config, sessions: sessionmaker[Session], snap: _Snapshot,
              now: datetime, cutoff: datetime) -> bool:
    stable = snap.last_received_at <= cutoff or snap.state == StudyState.INCOMPLETE
    with sessions() as session:
        held_order = order_for_study(session, snap.study_uid) \
            if snap.state == StudyState.INCOMPLETE else None
        readiness = judge(session, config, snap.study_uid, stable=stable, order=held_order,
                          now=now, last_received_at=snap.last_received_at)
        if not readiness.ready and not stable:
            return False  # an MPPS says what to expect and it is still arriving
        if (snap.state == StudyState.INCOMPLETE and not readiness.ready
                and config.completion.on_incomplete == "hold"
                and _incomplete_note(readiness) == snap.note):
            return False  # held, and nothing it waits for has changed
        summary = summarize_stored_study(session, config.node.data_dir, snap.study_uid)
        session.commit()
        if _all_unreadable(summary):
            return _end_unreadable(sessions, snap)
        order = match_study(session, config, summary)
        session.commit()
        if order is not None and snap.state == StudyState.RECEIVING:
            readiness = judge(session, config, snap.study_uid, stable=stable, order=order,
                              now=now, last_received_at=snap.last_received_at)
    if readiness.ready:
        return _commit_completion(config, sessions, snap, summary,
                                  route_study(summary, config.routes, order), readiness.policy,
                                  order)
    if config.completion.on_incomplete == "process":
        return _commit_completion(config, sessions, snap, summary,
                                  route_study(summary, config.routes, order), "stable_age",
                                  order, missing=readiness.missing)
    _hold(sessions, snap, summary, readiness)
    return False


def _incomplete_note(readiness: Readiness) -> str:
    return ("incomplete: " + "; ".join(readiness.missing))[:NOTE_LIMIT]


def _hold(sessions: sessionmaker[Session], snap: _Snapshot, summary: StudySummary,
          readiness: Readiness) -> None:
    """Keep a stable study unprocessed as incomplete; report it when that starts or changes."""
    note = _incomplete_note(readiness)
    if snap.state == StudyState.INCOMPLETE and snap.note == note:
        return
    with sessions.begin() as session:
        study = session.get(Study, snap.study_uid, with_for_update=True)
        if (study is None or study.state != snap.state or study.generation != snap.generation
                or study.last_received_at != snap.last_received_at):
            return
        study.state = StudyState.INCOMPLETE
        study.note = note
    log.warning("study_incomplete", study_uid=snap.study_uid, generation=snap.generation,
                instances=summary.instance_count, series=summary.series_count,
                missing=list(readiness.missing),
                action="held unprocessed; it is judged again when anything arrives "
                       "(dicom-node reprocess forces it through)")


def _commit_completion(config: Config, sessions: sessionmaker[Session], snap: _Snapshot,
                       summary: StudySummary, decisions: list[RouteDecision], policy: str,
                       order: Order | None, missing: tuple[str, ...] = ()) -> bool:
    now = utcnow()
    fired = [d for d in decisions if d.fires]
    bound = log.bind(study_uid=snap.study_uid, generation=snap.generation)
    with sessions.begin() as session:
        # FOR UPDATE: two receivers sweeping one PostgreSQL database complete a study once (the
        # second waits, then sees it routed). SQLite's BEGIN IMMEDIATE already serialises them.
        study = session.get(Study, snap.study_uid, with_for_update=True)
        # An instance that arrived while we summarized restarts the clock: try again later.
        if (study is None or study.state != snap.state
                or study.generation != snap.generation
                or study.last_received_at != snap.last_received_at):
            return False
        study.completed_at = now
        jobs = []
        waiting = _report_models(config)
        for decision in fired:
            jobs += create_jobs(session, study, decision.route.name, decision.route.models,
                                decision.route.send_to, now, waiting)
        study.state = StudyState.ROUTED if jobs else StudyState.UNROUTED
        set_aside_count = len(set_aside_instances(session, snap.study_uid))
        notes = ([] if jobs else ["no route matched"]) + (
            ["processed although incomplete: " + "; ".join(missing)] if missing else []) + (
            [f"{set_aside_count} instance(s) set aside as unreadable"] if set_aside_count
            else [])
        study.note = "; ".join(notes)[:NOTE_LIMIT] or None
    modalities = sorted(summary.values.get("Modality", frozenset()))
    if missing:
        bound.warning("study_processed_incomplete", missing=list(missing),
                      reason="completion.on_incomplete = \"process\"")
    bound.info("study_completed", instances=summary.instance_count, series=summary.series_count,
               modalities=modalities, policy=policy,
               stable_after_seconds=config.completion.stable_after_seconds,
               order_match=order.method if order else None,
               accession_number=order.accession_number if order else None)
    if fired:
        for decision in fired:
            bound.info("study_routed", route=decision.route.name,
                       models=list(decision.route.models), send_to=list(decision.route.send_to),
                       reasons=list(decision.reasons))
    else:
        bound.warning("study_unrouted", reason="no route matched; the study is kept",
                      routes={d.route.name: list(d.reasons) for d in decisions})
    return True


def force(config: Config, sessions: sessionmaker[Session], study_uid: str) -> bool:
    """An administrator's ``reprocess`` of an incomplete study: route what arrived now."""
    with sessions() as session:
        study = session.get(Study, study_uid)
        if study is None or study.state != StudyState.INCOMPLETE:
            return False
        snap = _Snapshot(study.study_instance_uid, study.generation, study.last_received_at,
                         study.state, study.note)
        summary = summarize_stored_study(session, config.node.data_dir, study_uid)
        session.commit()
        if _all_unreadable(summary):
            return _end_unreadable(sessions, snap)
        order = match_study(session, config, summary)
        session.commit()
    return _commit_completion(config, sessions, snap, summary,
                              route_study(summary, config.routes, order), "forced", order)


def route_late_order(config: Config, sessions: sessionmaker[Session], study_uid: str) -> bool:
    """Catch-up after a worklist outage: match a processed study to its order now, and queue
    the jobs of routes that match on the order and fire now. Routes on image tags already ran
    and are not run twice. Returns whether an order was matched."""
    with sessions() as session:
        summary = summarize_stored_study(session, config.node.data_dir, study_uid)
        order = match_study(session, config, summary)
        session.commit()
    if order is None:
        return False
    fired = [d for d in route_study(summary, config.routes, order) if d.fires and d.route.order]
    now = utcnow()
    queued: list[str] = []
    with sessions.begin() as session:
        study = session.get(Study, study_uid, with_for_update=True)
        if study is None or study.state not in PROCESSED_STATES:
            return True
        existing = set(session.scalars(select(Job.route_name).where(
            Job.study_instance_uid == study_uid, Job.generation == study.generation)))
        waiting = _report_models(config)
        for decision in fired:
            if decision.route.name in existing:
                continue
            create_jobs(session, study, decision.route.name, decision.route.models,
                        decision.route.send_to, now, waiting)
            queued.append(decision.route.name)
        if queued:
            study.state = StudyState.ROUTED
            study.note = None
    bound = log.bind(study_uid=study_uid)
    for decision in fired:
        if decision.route.name in queued:
            bound.info("study_routed", route=decision.route.name,
                       models=list(decision.route.models), send_to=list(decision.route.send_to),
                       reasons=list(decision.reasons), catch_up=True)
    return True


def catch_up(config: Config, sessions: sessionmaker[Session], since: datetime) -> int:
    """After a worklist outage: match the studies completed since ``since`` that have no order,
    and queue the jobs of order-based routes that fire now (image-tag routes already ran).

    The receiver's worklist poll calls it when an outage ends (``WorklistPoller``, given it by
    the scheduler). Returns how many studies were matched."""
    if config.worklist is None or not config.worklist.enabled:
        return 0
    with sessions() as session:
        uids = list(session.scalars(
            select(Study.study_instance_uid)
            .outerjoin(StudyOrder, StudyOrder.study_instance_uid == Study.study_instance_uid)
            .where(StudyOrder.study_instance_uid.is_(None))
            .where(Study.state.in_([StudyState.ROUTED, StudyState.UNROUTED, StudyState.DONE,
                                    StudyState.FAILED]))
            .where(Study.completed_at >= since)))
    matched = 0
    for uid in uids:
        if route_late_order(config, sessions, uid):
            matched += 1
    return matched
