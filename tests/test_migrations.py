"""Schema migrations (Alembic): the same schema as the models, pre-migration databases adopted with
their rows, processes starting together migrate once, a newer database refused."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from dicom_node.cli import main
from dicom_node.config import JobsSection, parse_config
from dicom_node.doctor import check_database
from dicom_node.errors import ConfigError
from dicom_node.jobs import queue
from dicom_node.store import migrations
from dicom_node.store.db import Base, Job, JobState, Study, make_engine, make_sessionmaker
from tests.support.engines import ROOT, open_together


def _affinity(declared: str) -> str:
    """SQLite's type affinity of a declared column type (https://sqlite.org/datatype3.html 3.1)."""
    upper = declared.upper()
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in upper or not upper:
        return "BLOB"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _schema(engine: Engine) -> dict[str, Any]:
    """Everything the index's schema is made of, as plain data that compares with ==."""
    inspector = inspect(engine)
    schema: dict[str, Any] = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        schema[table] = {
            "columns": [(c["name"], str(c["type"]), _affinity(str(c["type"])), c["nullable"])
                        for c in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"])
                             for u in inspector.get_unique_constraints(table)),
            "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"],
                                    tuple(f["referred_columns"]),
                                    f.get("options", {}).get("ondelete"))
                                   for f in inspector.get_foreign_keys(table)),
        }
    return schema


def _create_all(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    return engine


def _revisions(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT version_num FROM alembic_version"))
        return [row[0] for row in rows]


def test_the_migrations_make_the_schema_the_models_declare(tmp_path: Path) -> None:
    migrated = make_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    reference = _create_all(tmp_path / "create_all.db")
    assert _schema(migrated) == _schema(reference)
    assert set(_schema(migrated)) == set(Base.metadata.tables)
    assert _revisions(migrated) == [migrations.head_revision()]
    # Alembic's own comparison: a model changed without a new revision fails here.
    with migrated.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_a_database_at_head_is_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    make_engine(url)
    engine = make_engine(url)
    assert _revisions(engine) == [migrations.head_revision()]


#: The DDL create_all ran in the first builds: jobs without waits_for_siblings and findings, and
#: none of the tables added later (worklist, MPPS, retention).
OLD_DDL = [
    """CREATE TABLE studies (
        study_instance_uid VARCHAR(64) NOT NULL, state VARCHAR(16) NOT NULL,
        generation INTEGER NOT NULL, first_received_at DATETIME NOT NULL,
        last_received_at DATETIME NOT NULL, completed_at DATETIME, instance_count INTEGER NOT NULL,
        note TEXT, PRIMARY KEY (study_instance_uid))""",
    "CREATE INDEX ix_studies_state ON studies (state)",
    "CREATE INDEX ix_studies_last_received_at ON studies (last_received_at)",
    """CREATE TABLE instances (
        sop_instance_uid VARCHAR(64) NOT NULL, study_instance_uid VARCHAR(64) NOT NULL,
        series_instance_uid VARCHAR(64) NOT NULL, sop_class_uid VARCHAR(64) NOT NULL,
        transfer_syntax_uid VARCHAR(64) NOT NULL, modality VARCHAR(16) NOT NULL,
        path VARCHAR(512) NOT NULL, size INTEGER NOT NULL, calling_ae_title VARCHAR(16) NOT NULL,
        received_at DATETIME NOT NULL, PRIMARY KEY (sop_instance_uid),
        FOREIGN KEY(study_instance_uid) REFERENCES studies (study_instance_uid))""",
    "CREATE INDEX ix_instances_study_instance_uid ON instances (study_instance_uid)",
    """CREATE TABLE jobs (
        id INTEGER NOT NULL, study_instance_uid VARCHAR(64) NOT NULL, generation INTEGER NOT NULL,
        route_name VARCHAR(128) NOT NULL, model_name VARCHAR(128) NOT NULL,
        destinations TEXT NOT NULL, delivered TEXT NOT NULL, state VARCHAR(16) NOT NULL,
        attempts INTEGER NOT NULL, not_before DATETIME NOT NULL, lease_owner VARCHAR(128),
        lease_expires_at DATETIME, last_error TEXT, created_at DATETIME NOT NULL,
        updated_at DATETIME NOT NULL, model_version VARCHAR(64), PRIMARY KEY (id),
        UNIQUE (study_instance_uid, generation, route_name, model_name),
        FOREIGN KEY(study_instance_uid) REFERENCES studies (study_instance_uid))""",
    "CREATE INDEX ix_jobs_state ON jobs (state)",
    "CREATE INDEX ix_jobs_study_instance_uid ON jobs (study_instance_uid)",
    "INSERT INTO studies VALUES ('1.2.3', 'routed', 0, '2024-05-01 10:00:00.000000',"
    " '2024-05-01 10:00:05.000000', '2024-05-01 10:01:00.000000', 1, NULL)",
    "INSERT INTO instances VALUES ('1.2.3.4', '1.2.3', '1.2.3.5', '1.2.840.10008.5.1.4.1.1.1',"
    " '1.2.840.10008.1.2.1', 'CR', 'spool/1.2.3/1.2.3.4.dcm', 1234, 'PACS',"
    " '2024-05-01 10:00:05.000000')",
    "INSERT INTO jobs VALUES (1, '1.2.3', 0, 'chest', 'chest-xray-cnn', 'pacs', '', 'pending', 0,"
    " '2024-05-01 10:01:00.000000', NULL, NULL, NULL, '2024-05-01 10:01:00.000000',"
    " '2024-05-01 10:01:00.000000', NULL)",
]


def _old_database(path: Path) -> None:
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        for statement in OLD_DDL:
            connection.exec_driver_sql(statement)
    engine.dispose()


def test_a_database_made_before_migrations_is_adopted_with_its_rows(tmp_path: Path) -> None:
    _old_database(tmp_path / "old.db")
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")

    assert _revisions(engine) == [migrations.head_revision()]
    adopted, reference = _schema(engine), _schema(_create_all(tmp_path / "create_all.db"))
    assert adopted == reference  # the late columns added, the missing tables created
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.execute(text(
            "SELECT study_instance_uid, state, instance_count FROM studies")).all() == [
            ("1.2.3", "routed", 1)]
        assert connection.execute(text(
            "SELECT sop_instance_uid, path, size FROM instances")).all() == [
            ("1.2.3.4", "spool/1.2.3/1.2.3.4.dcm", 1234)]
        assert connection.execute(text(
            "SELECT id, model_name, state, waits_for_siblings, findings FROM jobs")).all() == [
            (1, "chest-xray-cnn", "pending", 0, None)]

    # The node's code runs on it: the old job is claimed and finished with findings.
    sessions = make_sessionmaker(engine)
    jobs = JobsSection(max_attempts=3, retry_base_seconds=10, retry_max_seconds=25,
                       lease_seconds=60)
    claimed = queue.claim(sessions, "w1", jobs)
    assert claimed is not None and claimed.id == 1
    with sessions() as session:
        job = session.get(Job, 1)
        study = session.get(Study, "1.2.3")
        assert job is not None and study is not None
        assert job.state is JobState.RUNNING and job.waits_for_siblings is False
        assert job.findings is None and study.first_received_at.year == 2024
    with sessions.begin() as session:
        job = session.get(Job, 1)
        assert job is not None
        job.findings = '{"label": "normal"}'
    with sessions() as session:
        job = session.get(Job, 1)
        assert job is not None and job.findings == '{"label": "normal"}'

    # Opening it again changes nothing.
    assert _revisions(make_engine(f"sqlite:///{tmp_path / 'old.db'}")) == [
        migrations.head_revision()]


@pytest.mark.parametrize("start", ["new", "made_before_migrations"])
def test_processes_starting_together_migrate_once(tmp_path: Path, start: str) -> None:
    path = tmp_path / "shared.db"
    if start != "new":
        _old_database(path)
    url = f"sqlite:///{path}"
    children, outputs = open_together(url, tmp_path / "go")
    for child, output in zip(children, outputs, strict=True):
        assert child.returncode == 0, output
        assert output.rstrip().endswith("done"), output
    assert sum(output.count("database_schema_upgraded") for output in outputs) == 1, outputs
    engine = create_engine(url)
    assert _revisions(engine) == [migrations.head_revision()]
    assert _schema(engine) == _schema(_create_all(tmp_path / "create_all.db"))
    if start != "new":
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 1


def _from_the_future(path: Path) -> str:
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dcafe9999'"))
    engine.dispose()
    return url


def test_a_database_upgraded_by_a_newer_build_is_refused(tmp_path: Path) -> None:
    url = _from_the_future(tmp_path / "new.db")
    with pytest.raises(ConfigError, match=r"revision 'f00dcafe9999'.*Upgrade dicom-node"):
        make_engine(url)
    assert _revisions(create_engine(url)) == ["f00dcafe9999"]  # left as it was


def test_doctor_shows_the_schema_revision_and_fails_on_a_newer_one(tmp_path: Path) -> None:
    current = tmp_path / "current.db"
    make_engine(f"sqlite:///{current}").dispose()
    config = parse_config({"database": {"url": f"sqlite:///{current}"}})
    check = check_database(config)
    head = migrations.head_revision()
    assert (check.status, check.detail.endswith(f"schema at revision {head}")) == ("ok", True)

    newer = parse_config({"database": {"url": _from_the_future(tmp_path / "new.db")}})
    check = check_database(newer)
    assert check.status == "FAIL" and "a newer dicom-node upgraded it" in check.detail


CONFIG = """
[node]
ae_title = "DICOM_NODE"
port = 11112
data_dir = "var"

[database]
url = "sqlite:///{path}"
"""


def test_db_status_and_upgrade_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _old_database(tmp_path / "old.db")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(path=tmp_path / "old.db"), encoding="utf-8")

    assert main(["db", "status", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "current revision: none" in out
    assert f"head revision:    {migrations.head_revision()}" in out
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert main(["db", "status", "--config", str(config)]) == 0
    assert "up to date" in capsys.readouterr().out

    _from_the_future(tmp_path / "future.db")
    config.write_text(CONFIG.format(path=tmp_path / "future.db"), encoding="utf-8")
    assert main(["db", "status", "--config", str(config)]) == 2
    assert main(["jobs", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "'f00dcafe9999'" in err and "Upgrade dicom-node" in err


def test_the_migration_scripts_are_package_files() -> None:
    location = migrations.SCRIPT_LOCATION
    assert location == ROOT / "dicom_node" / "store" / "migrations"
    assert (location / "env.py").is_file() and (location / "script.py.mako").is_file()
    assert (location / "versions" / "__init__.py").is_file()  # found by packages.find
    with (ROOT / "pyproject.toml").open("rb") as file:
        setuptools = tomllib.load(file)["tool"]["setuptools"]
    assert "script.py.mako" in setuptools["package-data"]["dicom_node.store.migrations"]
