"""The index: SQLAlchemy tables for studies, instances and jobs, and the engine factory.

SQLite (a file under data_dir) is the embedded default; a PostgreSQL URL lets several receivers and
workers on several machines share one index and one queue. SQLite runs in WAL mode with
``synchronous=FULL``, so a committed row survives a power cut, and readers never block the receiver.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from dicom_node.errors import ConfigError


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"      # instances arriving; waiting to be stable
    INCOMPLETE = "incomplete"    # stable, but what its MPPS/order expects has not all arrived
    ROUTED = "routed"            # complete; jobs created
    UNROUTED = "unrouted"        # complete; no route matched (kept, logged)
    DONE = "done"                # every job of this generation finished
    FAILED = "failed"            # at least one job failed for good


class JobState(enum.StrEnum):
    PENDING = "pending"          # waiting for a worker (or for its retry time)
    RUNNING = "running"          # claimed by a worker holding a lease
    DONE = "done"                # results sent to every destination
    FAILED = "failed"            # retry budget spent; an administrator can retry it


def _values(enum_type: type[enum.StrEnum]) -> list[str]:
    """Store an enum's values (``receiving``), not its member names, in the database."""
    return [member.value for member in enum_type]


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16, values_callable=_values), index=True)
    #: Incremented each time a late instance reopens a processed study.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    #: Path relative to data_dir.
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    #: Why later stages could not read this acknowledged instance (revision 0005); a set-aside
    #: instance is left out of routing and of the jobs' inputs, and the rest of the study goes on.
    set_aside_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "generation", "route_name", "model_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    route_name: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    #: Destination names, comma separated, as the route named them when the job was made.
    destinations: Mapped[str] = mapped_column(Text)
    #: Destinations that have acknowledged every result object (comma separated).
    delivered: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, values_callable=_values), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    #: Model version that produced the results (set when inference ran).
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: A job that consumes the findings of the other models of its route (a report model)
    #: waits until those jobs have ended (done or failed).
    waits_for_siblings: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The findings of a done job, as JSON (messages.findings_to_json).
    findings: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: When a worker last claimed the job (the start of its current or last attempt); added
    #: by revision 0004, so it comes last like the column in upgraded databases.
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: What the job's result left out and why (instances set aside), revision 0005.
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Revision 0006 (dicom_node.send.outages): the destinations (comma separated) the job's
    #: last try could not reach, and since when its tries have found one unreachable; None
    #: while its deliveries are not waiting out an outage. Such a try spends no attempt.
    awaiting_delivery_to: Mapped[str | None] = mapped_column(Text, nullable=True)
    awaiting_delivery_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: Tries to deliver since ``awaiting_delivery_since`` (each found a destination unreachable).
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ScheduledStep(Base):
    """One Scheduled Procedure Step of the Modality Worklist, as the RIS last returned it."""

    __tablename__ = "scheduled_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: Identity of the step across polls (see worklist.order.step_key).
    key: Mapped[str] = mapped_column(String(256), unique=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    #: Used only to match a study (patient + modality + date); never logged.
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    scheduled_station_ae_title: Mapped[str | None] = mapped_column(String(16), nullable=True)
    scheduled_start: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    #: The worklist item as DICOM JSON (PS3.18 F.2): the order's other attributes.
    item_json: Mapped[str] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class StudyOrder(Base):
    """The scheduled step a study was matched to, and how (worklist.match)."""

    __tablename__ = "study_orders"

    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("scheduled_steps.id", ondelete="CASCADE"))
    #: "study_uid", "accession" or "patient_modality_date".
    method: Mapped[str] = mapped_column(String(32))
    matched_at: Mapped[datetime] = mapped_column(DateTime)


class PerformedStep(Base):
    """One Modality Performed Procedure Step instance (the node is the MPPS SCP)."""

    __tablename__ = "performed_steps"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: "IN PROGRESS", "COMPLETED" or "DISCONTINUED".
    status: Mapped[str] = mapped_column(String(16), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    station_ae_title: Mapped[str | None] = mapped_column(String(16), nullable=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    #: JSON {series_instance_uid: [sop_instance_uid, ...]} from the Performed Series Sequence;
    #: an empty list means the series' images were not listed.
    performed_series: Mapped[str] = mapped_column(Text, default="{}")
    #: Code meaning of the Discontinuation Reason Code Sequence, if any.
    discontinuation_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The MPPS instance's attributes (after every N-SET) as DICOM JSON.
    attributes_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class PerformedStudy(Base):
    """Which studies an MPPS instance is about (Scheduled Step Attributes Sequence)."""

    __tablename__ = "performed_studies"

    mpps_uid: Mapped[str] = mapped_column(
        ForeignKey("performed_steps.sop_instance_uid", ondelete="CASCADE"), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class PurgedStudy(Base):
    """A study whose spool files and results retention deleted (dicom_node.retention). Its
    instance rows stay, with an empty path, so that a PACS re-sending it is seen re-sending
    known instances, which never reopens a processed study."""

    __tablename__ = "purged_studies"

    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), primary_key=True)
    #: The last time files of the study were deleted.
    purged_at: Mapped[datetime] = mapped_column(DateTime)
    #: "age" (older than keep_days/keep_failed_days) or "disk" (below min_free_gb).
    reason: Mapped[str] = mapped_column(String(16))
    #: Files and bytes deleted, over every purge of the study.
    files: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _begin_immediate).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_immediate(conn: Any) -> None:
    # Take the write lock at BEGIN: a deferred transaction that reads and then writes can fail at
    # once with SQLITE_BUSY when another process committed in between; IMMEDIATE waits its turn.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, upgrade: bool = True) -> Engine:
    """Create the engine (and the SQLite file's folder); bring the schema to head.

    The schema is upgraded by the migrations in ``dicom_node/store/migrations`` (Alembic), in one
    transaction that concurrent processes take in turn; a database made before migrations is
    adopted. A database that a newer dicom-node upgraded raises :class:`ConfigError`. With
    ``upgrade=False`` the database is left as it is (``dicom-node db status``).
    """
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _begin_immediate)
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"database.url: the driver for {url.split(':', 1)[0]!r} is not installed "
                f"({exc.name}); for PostgreSQL install dicom-node[postgres]") from None
    if upgrade:
        from dicom_node.store import migrations

        migrations.upgrade(engine)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)


class SendSlot(Base):
    """One of a destination's association slots (dicom_node.send.slots): a worker holds one
    while it has an association open to the destination, so that all workers sharing the
    database together open at most ``destinations.max_associations`` to it."""

    __tablename__ = "send_slots"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: Who holds it (worker name and job), or None when free.
    holder: Mapped[str | None] = mapped_column(String(160), nullable=True)
    #: A holder that crashed frees its slot at this time (the holder renews it while it sends).
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class DestinationOutage(Base):
    """A destination that the workers cannot reach now (dicom_node.send.outages): one row per
    outage, made by the first failed try (which logs ``destination_unreachable``) and deleted by
    the first try that reaches it again (which logs ``destination_recovered``), whichever
    worker or job made them. Revision 0006."""

    __tablename__ = "destination_outages"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The first failed try of this outage.
    since: Mapped[datetime] = mapped_column(DateTime)
    #: The latest failed try, and why it failed.
    last_failure_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str] = mapped_column(Text)
    #: Failed tries during this outage, all workers and jobs together.
    failures: Mapped[int] = mapped_column(Integer, default=1)
    #: No worker tries the destination again before this: during an outage one try at a time,
    #: at most one per jobs.retry_base_seconds, whatever the backlog; the other jobs wait.
    next_try_at: Mapped[datetime] = mapped_column(DateTime)


class CommitmentState(enum.StrEnum):
    REQUESTED = "requested"      # the N-ACTION is sent (or on its way); the report is awaited
    COMMITTED = "committed"      # the destination reported every instance committed
    FAILED = "failed"            # the report listed failures, or the N-ACTION was refused
    TIMED_OUT = "timed_out"      # no report within the destination's commitment_timeout_minutes


class Commitment(Base):
    """One Storage Commitment transaction (dicom_node.commitment): a job's results sent to a
    destination with ``storage_commitment = true``, and what the destination reported."""

    __tablename__ = "commitments"
    __table_args__ = (UniqueConstraint("job_id", "destination", "delivery"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: Transaction UID (0008,1195), derived from the job, the destination and the delivery.
    transaction_uid: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    #: 1 for the job's first request to the destination, 2 for the next (after a re-send), …
    delivery: Mapped[int] = mapped_column(Integer)
    state: Mapped[CommitmentState] = mapped_column(
        Enum(CommitmentState, native_enum=False, length=16, values_callable=_values), index=True)
    #: How many instances were requested.
    instances: Mapped[int] = mapped_column(Integer)
    #: The Referenced SOP Sequence requested, as JSON [[SOP Class UID, SOP Instance UID], …].
    requested: Mapped[str] = mapped_column(Text)
    #: Instances not committed, as JSON [[SOP Instance UID, SOP Class UID, Failure Reason or
    #: null (not in the report)], …]; None until a report lists failures.
    failed: Mapped[str | None] = mapped_column(Text, nullable=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime)
    #: No report by then: timed out (requested_at + commitment_timeout_minutes).
    deadline: Mapped[datetime] = mapped_column(DateTime, index=True)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: Calling AE title of the association that carried the report.
    reported_by: Mapped[str | None] = mapped_column(String(16), nullable=True)
    #: Why it failed or timed out, in words (also the job's last error).
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
