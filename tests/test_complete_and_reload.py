"""Completion by stable age, routing into jobs, unrouted studies kept, and config reload."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from pydicom import dcmread
from structlog.testing import capture_logs

from dicom_node import complete
from dicom_node.config import Config, load_config
from dicom_node.jobs import queue
from dicom_node.reload import ConfigWatcher
from dicom_node.store.db import Study, StudyState, make_engine, make_sessionmaker, utcnow
from dicom_node.store.index import record_instance
from tests.conftest import free_port, sample_file

ROUTED = """
[node]
port = {port}
bind = "127.0.0.1"

[completion]
stable_after_seconds = 5

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[models]]
name = "m"
path = "models/m"

[[routes]]
name = "ct route"
match = {{ Modality = "CT" }}
models = ["m"]
send_to = ["pacs"]
"""


def _config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text.format(port=free_port()))
    return load_config(path)


def _store(config: Config, name: str, when_ago: float) -> str:
    path = sample_file(name)
    ds = dcmread(path, stop_before_pixels=True)
    record_instance(
        make_engine(config.database.url), sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, modality=ds.Modality, path=path,
        relative_path=str(path), size=1, calling_ae_title="SCU",
        received_at=utcnow() - timedelta(seconds=when_ago))
    return str(ds.StudyInstanceUID)


def test_a_study_is_complete_only_after_it_is_stable(tmp_path: Path) -> None:
    config = _config(tmp_path, ROUTED)
    sessions = make_sessionmaker(make_engine(config.database.url))
    study_uid = _store(config, "CT_small.dcm", when_ago=1)
    assert complete.sweep(config, sessions) == 0
    with capture_logs() as logs:
        assert complete.sweep(config, sessions, now=utcnow() + timedelta(seconds=5)) == 1
    with sessions() as session:
        assert session.get(Study, study_uid).state == StudyState.ROUTED  # type: ignore[union-attr]
        (job,) = queue.list_jobs(session)
    assert (job["route"], job["model"], job["destinations"]) == ("ct route", "m", "pacs")
    events = [e["event"] for e in logs]
    assert events == ["study_completed", "study_routed"]


def test_a_study_no_route_matches_is_kept_and_logged(tmp_path: Path) -> None:
    config = _config(tmp_path, ROUTED)
    sessions = make_sessionmaker(make_engine(config.database.url))
    study_uid = _store(config, "MR_small.dcm", when_ago=10)
    with capture_logs() as logs:
        assert complete.sweep(config, sessions) == 1
    with sessions() as session:
        study = session.get(Study, study_uid)
        assert study is not None and study.state == StudyState.UNROUTED
        assert queue.list_jobs(session) == []
    (unrouted,) = [e for e in logs if e["event"] == "study_unrouted"]
    assert "Modality: 'MR' does not match 'CT'" in unrouted["routes"]["ct route"]


def test_valid_edit_is_applied_and_invalid_edit_keeps_the_last_good_config(
        tmp_path: Path) -> None:
    config = _config(tmp_path, ROUTED)
    applied: list[Config] = []
    watcher = ConfigWatcher(config, applied.append)
    assert config.source is not None
    config.source.write_text(config.source.read_text().replace('"CT"', '"MR"'))
    assert watcher.check()
    assert applied[-1].routes[0].match["Modality"] == "MR"
    config.source.write_text(config.source.read_text().replace('send_to = ["pacs"]',
                                                               'send_to = ["nowhere"]'))
    with capture_logs() as logs:
        assert not watcher.check()
    assert watcher.current is applied[-1] and len(applied) == 1
    (rejected,) = [e for e in logs if e["event"] == "config_rejected"]
    assert "routes[0].send_to: unknown destination 'nowhere'" in rejected["reason"]


def test_route_dry_run_on_a_folder_prints_which_routes_fire(tmp_path: Path) -> None:
    config = _config(tmp_path, ROUTED)
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(sample_file("CT_small.dcm").read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "route", "--dry-run", str(folder),
         "--config", str(config.source)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "route 'ct route': FIRES" in result.stdout
    assert "Modality: 'CT' matches 'CT'" in result.stdout


def test_reprocess_routes_an_unrouted_study_again_after_a_route_is_added(tmp_path: Path) -> None:
    config = _config(tmp_path, ROUTED)
    sessions = make_sessionmaker(make_engine(config.database.url))
    study_uid = _store(config, "MR_small.dcm", when_ago=10)
    assert complete.sweep(config, sessions) == 1
    assert config.source is not None
    config.source.write_text(config.source.read_text().replace('"CT"', '["CT", "MR"]'))
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "reprocess", study_uid, "--config",
         str(config.source)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "reopened" in result.stdout
    new_config = load_config(config.source)
    assert complete.sweep(new_config, sessions) == 1
    with sessions() as session:
        study = session.get(Study, study_uid)
        assert study is not None and (study.state, study.generation) == (StudyState.ROUTED, 1)
        (job,) = queue.list_jobs(session)
    assert job["generation"] == 1
