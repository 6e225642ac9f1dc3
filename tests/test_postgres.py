"""The scale-out path on a real PostgreSQL server (tests/support/postgres_peer.py): the
schema migrated once by processes starting together, the receiver indexing what storescu sends,
completion and routing, workers claiming each job once, and retention."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import complete
from dicom_node.config import Config, JobsSection, load_config
from dicom_node.jobs import queue
from dicom_node.receive.scp import Receiver
from dicom_node.retention import Retention
from dicom_node.send import slots
from dicom_node.store import migrations
from dicom_node.store.db import (
    Base,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from tests.conftest import BASIC_CONFIG, free_port, running_receiver, write_config
from tests.support.engines import ROOT, open_together
from tests.support.studies import send_with_storescu, study_files
from tests.test_retention import check_two_passes_at_once
from tests.test_send_slots import check_workers_never_exceed_the_limit

pytestmark = pytest.mark.slow

ROUTED = """
[database]
url = "{url}"

[retention]
keep_days = 7

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[models]]
name = "head-ct-ich-cnn"
path = "{models}/head-ct-ich-cnn"

[[routes]]
name = "ct"
match = {{ Modality = "CT" }}
models = ["head-ct-ich-cnn"]
send_to = ["pacs"]
"""


@pytest.fixture
def config(tmp_path: Path, postgres_url: str) -> Config:
    text_ = BASIC_CONFIG.format(port=free_port(), stable=3600, node_extra="") + ROUTED.format(
        url=postgres_url, models=ROOT / "models")
    return load_config(write_config(tmp_path, text_))


@pytest.fixture
def node(config: Config) -> Iterator[Receiver]:
    with running_receiver(config) as rx:
        yield rx


def test_processes_starting_together_migrate_a_new_database_once(postgres_url: str,
                                                                 tmp_path: Path) -> None:
    children, outputs = open_together(postgres_url, tmp_path / "go")
    assert [c.returncode for c in children] == [0] * 4, outputs
    assert sum(output.count("database_schema_upgraded") for output in outputs) == 1, outputs
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() \
            == [migrations.head_revision()]
        # the schema PostgreSQL got is the one the models declare
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_received_study_is_indexed_completed_and_routed(node: Receiver, tmp_path: Path) -> None:
    study, paths = study_files(tmp_path / "in", "CT_small.dcm", count=3)
    send_with_storescu(node, paths)  # and the same files again: duplicates, no new rows
    send_with_storescu(node, paths)
    sessions = node.context.sessions
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3
        row = session.get(Study, study)
        assert row is not None and row.instance_count == 3 and row.state == StudyState.RECEIVING

    routed = complete.sweep(node.context.config, sessions, now=utcnow() + timedelta(hours=2))

    assert routed == 1
    with sessions() as session:
        assert session.get(Study, study).state == StudyState.ROUTED  # type: ignore[union-attr]
        assert [j["model"] for j in queue.list_jobs(session)] == ["head-ct-ich-cnn"]


@pytest.fixture
def sessions(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(postgres_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_concurrent_workers_claim_each_job_once(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions.begin() as session:
        for i in range(12):
            study = Study(study_instance_uid=f"1.2.3.{i}", state=StudyState.ROUTED, generation=0,
                          first_received_at=now, last_received_at=now, instance_count=1)
            session.add(study)
            session.flush()
            queue.create_jobs(session, study, "route", ["model"], ["pacs"], now)
    jobs = JobsSection(lease_seconds=300)

    def work(owner: str) -> list[int]:
        claimed = []
        while (job := queue.claim(sessions, owner, jobs)) is not None:
            claimed.append(job.id)
        return claimed

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(work, [f"worker-{i}" for i in range(6)]))

    ids = [i for claimed in results for i in claimed]
    assert sorted(ids) == list(range(1, 13)), results  # every job once, none twice
    with sessions() as session:
        states = session.scalars(select(Job.state)).all()
    assert set(states) == {JobState.RUNNING}


def test_retention_deletes_an_old_finished_study(node: Receiver, tmp_path: Path) -> None:
    study, paths = study_files(tmp_path / "in", "CT_small.dcm")
    send_with_storescu(node, paths)
    sessions: sessionmaker[Session] = node.context.sessions
    old = utcnow() - timedelta(days=9)
    with sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == study).values(
            state=StudyState.DONE, last_received_at=old, completed_at=old))

    report = Retention(sessions, grace_seconds=0.0).run(node.context.config)

    assert [c.study_instance_uid for c in report.purged] == [study]
    assert not (node.context.config.spool_dir / study).exists()
    with sessions() as session:
        assert session.scalars(select(Instance.path)).all() == ["", "", ""]


def test_two_receivers_purging_at_once_delete_each_study_once(node: Receiver,
                                                             tmp_path: Path) -> None:
    check_two_passes_at_once(node, tmp_path)


def test_workers_sending_at_once_take_their_turns_for_a_destination(
        sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "POLL_SECONDS", 0.02)
    check_workers_never_exceed_the_limit(sessions)
