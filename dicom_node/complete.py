"""Study completion: when a study is whole, route it and create its jobs.

Policy (today): *stable age* — a study is complete ``completion.stable_after_seconds`` after its
last instance arrived. The sweep runs on an APScheduler interval in the receiver process.

An instance that arrives after its study was processed reopens it (see store.index): the study goes
back to ``receiving`` with its generation incremented, becomes complete again once stable, and is
routed again; the new generation's results get new UIDs and a new series, so the PACS keeps both
the earlier result and the one that saw every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config
from dicom_node.errors import ConfigError
from dicom_node.jobs.queue import create_jobs
from dicom_node.log import get_logger
from dicom_node.messages import StudySummary
from dicom_node.route import RouteDecision, route_study, summarize
from dicom_node.store.db import Instance, Study, StudyState, utcnow
from dicom_node.store.index import stable_studies, study_instances

log = get_logger()


@dataclass(frozen=True)
class _Snapshot:
    study_uid: str
    generation: int
    last_received_at: datetime


def summarize_stored_study(session: Session, data_dir: Path, study_uid: str) -> StudySummary:
    """Summary of a stored study from one representative instance per series (headers only)."""
    instances = study_instances(session, study_uid)
    representatives: dict[str, Instance] = {}
    for inst in instances:
        representatives.setdefault(inst.series_instance_uid, inst)
    datasets = []
    for inst in representatives.values():
        try:
            datasets.append(dcmread(data_dir / inst.path, stop_before_pixels=True))
        except OSError as exc:
            log.error("spool_file_unreadable", study_uid=study_uid,
                      sop_instance_uid=inst.sop_instance_uid, reason=str(exc))
    return summarize(study_uid, datasets, {i.calling_ae_title for i in instances},
                     instance_count=len(instances))


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


def sweep(config: Config, sessions: sessionmaker[Session], now: datetime | None = None) -> int:
    """Complete every stable study; returns how many were completed."""
    now = now or utcnow()
    stable_after = timedelta(seconds=config.completion.stable_after_seconds)
    with sessions() as session:
        snapshots = [_Snapshot(s.study_instance_uid, s.generation, s.last_received_at)
                     for s in stable_studies(session, stable_after, now)]
    completed = 0
    for snap in snapshots:
        with sessions() as session:
            summary = summarize_stored_study(session, config.node.data_dir, snap.study_uid)
        decisions = route_study(summary, config.routes)
        if _commit_completion(config, sessions, snap, summary, decisions):
            completed += 1
    return completed


def _commit_completion(config: Config, sessions: sessionmaker[Session], snap: _Snapshot,
                       summary: StudySummary, decisions: list[RouteDecision]) -> bool:
    now = utcnow()
    fired = [d for d in decisions if d.fires]
    bound = log.bind(study_uid=snap.study_uid, generation=snap.generation)
    with sessions.begin() as session:
        # FOR UPDATE: two receivers sweeping one PostgreSQL database complete a study once (the
        # second waits, then sees it routed). SQLite's BEGIN IMMEDIATE already serialises them.
        study = session.get(Study, snap.study_uid, with_for_update=True)
        # An instance that arrived while we summarized restarts the clock: try again later.
        if (study is None or study.state != StudyState.RECEIVING
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
        study.note = None if jobs else "no route matched"
    modalities = sorted(summary.values.get("Modality", frozenset()))
    bound.info("study_completed", instances=summary.instance_count, series=summary.series_count,
               modalities=modalities, policy="stable_age",
               stable_after_seconds=config.completion.stable_after_seconds)
    if fired:
        for decision in fired:
            bound.info("study_routed", route=decision.route.name,
                       models=list(decision.route.models), send_to=list(decision.route.send_to),
                       reasons=list(decision.reasons))
    else:
        bound.warning("study_unrouted", reason="no route matched; the study is kept",
                      routes={d.route.name: list(d.reasons) for d in decisions})
    return True
