"""The completion policy with MPPS and worklist expectations: MPPS COMPLETED completes a study as
soon as its performed series arrived; what is expected and missing holds a stable study as
incomplete (reported once) instead of processing half of it; the timer stays the fallback."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from dicom_node import complete
from dicom_node.config import Config, parse_config
from dicom_node.jobs import queue
from dicom_node.store.db import (
    PerformedStep,
    PerformedStudy,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from tests.support.order_data import (
    StoredStudy,
    add_step,
    store_instance,
    store_study,
    worklist_item,
)

STABLE = 300.0


def _config(tmp_path: Path, *, mpps: dict[str, object] | None = None,
            completion: dict[str, object] | None = None, worklist: bool = False) -> Config:
    raw: dict[str, object] = {
        "node": {"data_dir": str(tmp_path / "var")},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "completion": {"stable_after_seconds": STABLE, **(completion or {})},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": 104}],
        "models": [{"name": "m", "path": str(tmp_path / "m")}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["m"],
                    "send_to": ["pacs"]}],
    }
    if mpps is not None:
        raw["mpps"] = mpps
    if worklist:
        raw["worklist"] = {"ae_title": "RIS", "host": "127.0.0.1", "port": 2005}
    return parse_config(raw)


def _mpps(config: Config, study: StoredStudy, status: str, *, listed: bool = True,
          updated_ago: float = 0.0, reason: str | None = None) -> str:
    """An MPPS instance as the SCP stores it (dicom_node.mpps writes the same rows)."""
    sessions = make_sessionmaker(make_engine(config.database.url))
    uid = f"2.25.{abs(hash((study.study_uid, status, listed))) % 10**30}"
    when = utcnow() - timedelta(seconds=updated_ago)
    series = {s: (sops if listed else []) for s, sops in study.series.items()}
    with sessions.begin() as session:
        session.add(PerformedStep(
            sop_instance_uid=uid, status=status, modality="CT", station_ae_title="CT01",
            calling_ae_title="CT01", performed_series=json.dumps(series),
            discontinuation_reason=reason, attributes_json="{}", created_at=when,
            updated_at=when))
        session.flush()
        session.add(PerformedStudy(mpps_uid=uid, study_instance_uid=study.study_uid))
    return uid


def _state(config: Config, study_uid: str) -> tuple[StudyState, str]:
    with make_sessionmaker(make_engine(config.database.url))() as session:
        study = session.get(Study, study_uid)
        assert study is not None
        return study.state, study.note or ""


def _setup(tmp_path: Path, **kwargs: Any) -> tuple[Config, Engine]:
    config = _config(tmp_path, **kwargs)
    engine = make_engine(config.database.url)
    return config, engine


def test_mpps_completed_completes_the_study_without_waiting_for_the_timer(
        tmp_path: Path) -> None:
    config, engine = _setup(tmp_path, mpps={})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "files", series=2, per_series=3)
    assert complete.sweep(config, sessions) == 0  # arrived just now, no MPPS: the timer decides
    _mpps(config, study, "COMPLETED")
    with capture_logs() as logs:
        assert complete.sweep(config, sessions) == 1
    assert _state(config, study.study_uid)[0] == StudyState.ROUTED
    (done,) = [e for e in logs if e["event"] == "study_completed"]
    assert done["policy"] == "mpps" and done["instances"] == 6


def test_mpps_completed_waits_for_listed_instances_then_holds_them_as_incomplete(
        tmp_path: Path) -> None:
    config, engine = _setup(tmp_path, mpps={})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "files", per_series=3,
                        skip=((0, 2),))
    _mpps(config, study, "COMPLETED")
    assert complete.sweep(config, sessions) == 0
    assert _state(config, study.study_uid)[0] == StudyState.RECEIVING
    later = utcnow() + timedelta(seconds=STABLE + 1)
    with capture_logs() as logs:
        assert complete.sweep(config, sessions, now=later) == 0
        assert complete.sweep(config, sessions, now=later) == 0
    state, note = _state(config, study.study_uid)
    assert state == StudyState.INCOMPLETE and "1 of 3 instances listed by MPPS" in note
    assert [e["event"] for e in logs].count("study_incomplete") == 1  # reported once
    with sessions() as session:
        assert queue.list_jobs(session) == []
    (series_uid, sops), = study.series.items()
    store_instance(engine, tmp_path / "files", study.study_uid, series_uid,
                   sops[2])
    assert complete.sweep(config, sessions) == 1  # the missing one arrived: complete at once
    assert _state(config, study.study_uid)[0] == StudyState.ROUTED


def test_a_procedure_in_progress_holds_a_stable_study_until_it_goes_stale(
        tmp_path: Path) -> None:
    config, engine = _setup(tmp_path, mpps={"in_progress_timeout_seconds": 3600})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "files", received_ago=STABLE + 1)
    _mpps(config, study, "IN PROGRESS", updated_ago=STABLE + 1)
    assert complete.sweep(config, sessions) == 0
    state, note = _state(config, study.study_uid)
    assert state == StudyState.INCOMPLETE and "still in progress" in note
    # The modality never sent its final N-SET: after the timeout the timer decides again.
    assert complete.sweep(config, sessions, now=utcnow() + timedelta(seconds=3600)) == 1
    assert _state(config, study.study_uid)[0] == StudyState.ROUTED


def test_discontinued_is_held_or_processed_as_configured(tmp_path: Path) -> None:
    config, engine = _setup(tmp_path / "hold", mpps={})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "hold" / "files")
    _mpps(config, study, "DISCONTINUED", reason="Patient refused")
    later = utcnow() + timedelta(seconds=STABLE + 1)
    assert complete.sweep(config, sessions, now=later) == 0
    state, note = _state(config, study.study_uid)
    assert state == StudyState.INCOMPLETE and "discontinued (Patient refused)" in note

    config, engine = _setup(tmp_path / "process", mpps={"on_discontinued": "process"})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "process" / "files")
    _mpps(config, study, "DISCONTINUED", reason="Patient refused")
    assert complete.sweep(config, sessions) == 1  # its performed series are here: at once
    assert _state(config, study.study_uid)[0] == StudyState.ROUTED


def test_on_incomplete_process_routes_what_arrived_with_a_warning(tmp_path: Path) -> None:
    config, engine = _setup(tmp_path, mpps={}, completion={"on_incomplete": "process"})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "files", per_series=2, skip=((0, 1),),
                        received_ago=STABLE + 1)
    _mpps(config, study, "COMPLETED")
    with capture_logs() as logs:
        assert complete.sweep(config, sessions) == 1
    state, note = _state(config, study.study_uid)
    assert state == StudyState.ROUTED and note.startswith("processed although incomplete")
    assert "study_processed_incomplete" in [e["event"] for e in logs]


def test_an_ordered_modality_that_never_arrived_holds_the_study(tmp_path: Path) -> None:
    config, engine = _setup(tmp_path, worklist=True)
    sessions = make_sessionmaker(engine)
    add_step(sessions, worklist_item(accession="ACC-MR", modality="MR"))
    study = store_study(engine, tmp_path / "files", accession="ACC-MR",
                        received_ago=STABLE + 1)
    assert complete.sweep(config, sessions) == 0
    state, note = _state(config, study.study_uid)
    assert state == StudyState.INCOMPLETE and "schedules modality MR" in note


def test_reprocess_forces_an_incomplete_study_through(tmp_path: Path) -> None:
    config, engine = _setup(tmp_path, mpps={})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "files", skip=((0, 1),),
                        received_ago=STABLE + 1)
    _mpps(config, study, "COMPLETED")
    complete.sweep(config, sessions)
    assert _state(config, study.study_uid)[0] == StudyState.INCOMPLETE
    assert complete.force(config, sessions, study.study_uid)
    assert _state(config, study.study_uid)[0] == StudyState.ROUTED


def test_without_mpps_or_worklist_the_stable_age_timer_alone_decides(tmp_path: Path) -> None:
    config, engine = _setup(tmp_path)
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "files")
    _mpps(config, study, "COMPLETED")  # stored, but [mpps] is off: ignored
    assert complete.sweep(config, sessions) == 0
    assert complete.sweep(config, sessions, now=utcnow() + timedelta(seconds=STABLE + 1)) == 1


def test_series_listed_without_images_complete_once_the_study_is_quiet(tmp_path: Path) -> None:
    config, engine = _setup(tmp_path, mpps={"unlisted_series_quiet_seconds": 10})
    sessions = make_sessionmaker(engine)
    study = store_study(engine, tmp_path / "files", per_series=3)
    _mpps(config, study, "COMPLETED", listed=False)
    assert complete.sweep(config, sessions) == 0  # instances may still be coming
    with capture_logs() as logs:
        assert complete.sweep(config, sessions, now=utcnow() + timedelta(seconds=11)) == 1
    (done,) = [e for e in logs if e["event"] == "study_completed"]
    assert done["policy"] == "mpps"  # long before the 300 s timer
