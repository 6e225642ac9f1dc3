"""Several models per study: report models wait for their route's other models, read their
findings, and one model failing does not lose the others' results."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import JobsSection
from dicom_node.jobs import queue
from dicom_node.messages import CodedConcept, FindingRecord
from dicom_node.store.db import Study, StudyState, make_engine, make_sessionmaker, utcnow
from tests.conftest import sample_file
from tests.support.chest_pacs import CHEST_MODEL
from tests.support.peers import NodeProcess, StoreSCP, dcmtk

JOBS = JobsSection(max_attempts=2, retry_base_seconds=1, retry_max_seconds=1, lease_seconds=60)
CARDIOMEGALY = CodedConcept("8186001", "SCT", "Cardiomegaly")


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path}/q.db"))
    now = utcnow()
    with sessions.begin() as session:
        study = Study(study_instance_uid="1.2.3", state=StudyState.ROUTED, generation=0,
                      first_received_at=now, last_received_at=now, instance_count=1)
        session.add(study)
        session.flush()
        queue.create_jobs(session, study, "chest", ["classifier", "report"], ["pacs"], now,
                          waiting=frozenset({"report"}))
    return sessions


def test_a_report_job_waits_until_the_other_models_of_its_route_have_ended(
        sessions: sessionmaker[Session]) -> None:
    classifier = queue.claim(sessions, "w1", JOBS)
    assert classifier is not None and classifier.model_name == "classifier"
    assert queue.claim(sessions, "w2", JOBS) is None  # the report waits for the classifier
    finding = FindingRecord("classifier", "1.0", CARDIOMEGALY, True, 0.9)
    assert queue.succeed(sessions, classifier, "1.0", (finding,))
    report = queue.claim(sessions, "w2", JOBS)
    assert report is not None and report.model_name == "report"
    with sessions() as session:
        assert queue.sibling_findings(session, report) == (finding,)


def test_a_failed_model_does_not_hold_up_the_report(sessions: sessionmaker[Session]) -> None:
    classifier = queue.claim(sessions, "w1", JOBS)
    assert classifier is not None
    queue.fail(sessions, classifier, "weights missing", JOBS, permanent=True)
    report = queue.claim(sessions, "w2", JOBS)
    assert report is not None and report.model_name == "report"
    with sessions() as session:
        assert queue.sibling_findings(session, report) == ()


@pytest.mark.slow
def test_one_model_failing_does_not_lose_the_other_models_results(
        storescp: StoreSCP, node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    broken = tmp_path / "broken-cnn"
    shutil.copytree(CHEST_MODEL["path"], broken)
    card = (broken / "model.toml").read_text()
    (broken / "model.toml").write_text(card.replace('name = "chest-xray-cnn"',
                                                    'name = "broken-cnn"'))
    (broken / "model.keras").write_bytes(b"not a keras file")
    receiver = node_factory(
        "receive", models=[CHEST_MODEL, {"name": "broken-cnn", "path": str(broken)}],
        routes=[{"name": "chest", "match": {"Modality": "CR"},
                 "models": ["broken-cnn", "chest-xray-cnn"], "send_to": ["pacs"]}],
        destinations=[{"name": "pacs", "ae_title": storescp.ae_title, "host": "127.0.0.1",
                       "port": storescp.port}],
        sections={"jobs": {"poll_seconds": 0.2, "max_attempts": 2, "retry_base_seconds": 0.2,
                           "retry_max_seconds": 0.2}})
    worker = node_factory("worker", like=receiver)
    sent = dcmtk("storescu", "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port),
                 sample_file("RG1_UNCR.dcm"))
    assert sent.returncode == 0, sent.stderr
    worker.wait_for_log("job_done", timeout=90)
    worker.wait_for_log("job_failed", timeout=60)
    jobs = {job["model"]: job for job in worker.jobs()}
    assert jobs["chest-xray-cnn"]["state"] == "done"
    assert jobs["broken-cnn"]["state"] == "failed" and jobs["broken-cnn"]["last_error"]
    assert len(storescp.files()) == 1  # the classifier's SR was delivered all the same
    (study,) = worker.studies()
    assert study["state"] == "failed"  # visible: one of its jobs needs an administrator
