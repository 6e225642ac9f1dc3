"""The monitor's own view of the database: an engine with short timeouts, and cheap queries.

The monitor never uses the receiver's engine: its pool serves the C-STORE handlers, and a
scrape must not take their connections or wait behind them. Its engine gives up quickly
(:data:`TIMEOUT_SECONDS`) and only reads:

- **SQLite**: a new connection per use (the file is local; opening it costs well under a
  millisecond), opened without creating the file (``mode=rw``), with ``query_only`` on and a
  short busy timeout. In WAL mode a reader never waits for the receiver's writes.
- **PostgreSQL**: a pool of one connection (two at most), a connect timeout, and a
  ``statement_timeout`` and ``default_transaction_read_only`` for its session.

Every query is a ``COUNT … GROUP BY`` on an indexed state column, a ``MIN`` over one state's
rows, a count of one destination's slots, or the few rows of ``destination_outages``.
"""

from __future__ import annotations

import math
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import case, create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from dicom_node.jobs.queue import siblings_ended
from dicom_node.log import get_logger
from dicom_node.send import outages
from dicom_node.send.slots import held
from dicom_node.store.db import (
    Commitment,
    CommitmentState,
    Job,
    JobState,
    Study,
    StudyState,
)

log = get_logger()

T = TypeVar("T")

#: A connection attempt, a lock wait or a statement of the monitor gives up after this long.
TIMEOUT_SECONDS = 3.0


def _sqlite_read_only(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(TIMEOUT_SECONDS * 1000)}")
    cursor.execute("PRAGMA query_only=1")
    cursor.close()


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    path = parsed.database or ""
    if path and path != ":memory:" and not path.startswith("file:"):
        # a URI that opens the file only if it is there: a vanished database is reported as
        # down, not silently replaced by an empty file
        parsed = parsed.set(database=f"file:{urllib.parse.quote(path)}",
                            query={**parsed.query, "mode": "rw", "uri": "true"})
    engine = create_engine(parsed, poolclass=NullPool,
                           connect_args={"timeout": TIMEOUT_SECONDS, "check_same_thread": False})
    event.listen(engine, "connect", _sqlite_read_only)
    return engine


def monitor_engine(url: str) -> Engine:
    """A read-only engine on ``database.url`` with short timeouts, for scrapes and probes."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    pool: dict[str, Any] = {"pool_size": 1, "max_overflow": 1, "pool_timeout": TIMEOUT_SECONDS,
                            "pool_pre_ping": True}
    if url.startswith("postgresql"):
        milliseconds = int(TIMEOUT_SECONDS * 1000)
        return create_engine(url, **pool, connect_args={
            "connect_timeout": math.ceil(TIMEOUT_SECONDS),
            "options": f"-c statement_timeout={milliseconds} "
                       f"-c lock_timeout={milliseconds} -c default_transaction_read_only=on"})
    return create_engine(url, **pool)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a database error: the driver's exception and its first line
    (SQLAlchemy's own text adds the statement and a link)."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(cause).__name__}: {text[:200]}" if text else type(cause).__name__


def check_reachable(engine: Engine) -> None:
    """Read one row of ``studies``; raises the database's error when it cannot."""
    with engine.connect() as connection:
        connection.execute(select(Study.study_instance_uid).limit(1)).all()


@dataclass(frozen=True)
class Snapshot:
    """What one scrape read from the database."""

    #: Studies per state; every state present (0 when there are none).
    studies: Mapping[str, int]
    #: Jobs per state; every state present.
    jobs: Mapping[str, int]
    #: The earliest ``not_before`` of the pending jobs a worker could claim now (due, and not
    #: waiting for siblings that have not ended); None when there is none.
    oldest_due_pending: datetime | None
    #: When the longest-running job was claimed (the start of its current attempt).
    oldest_running: datetime | None
    #: Running jobs whose lease has expired (their worker stopped renewing it).
    leases_expired: int
    #: Held send slots per configured destination.
    slots_held: Mapping[str, int]
    #: Storage Commitment transactions per state, since the database was made.
    commitments: Mapping[str, int]
    #: When the oldest transaction still awaiting its report was requested; None when none.
    oldest_requested_commitment: datetime | None
    #: Pending or running jobs waiting out an outage, per destination they wait for.
    awaiting_delivery: Mapping[str, int] = field(default_factory=dict)
    #: The start of each unreachable destination's outage (dicom_node.send.outages).
    unreachable_since: Mapping[str, datetime] = field(default_factory=dict)


def _by_state(session: Session, column: Any, states: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(states, 0)
    for state, count in session.execute(select(column, func.count()).group_by(column)).all():
        counts[str(getattr(state, "value", state))] = int(count)
    return counts


def read_snapshot(engine: Engine, destinations: Sequence[str], now: datetime) -> Snapshot:
    """Run the scrape's queries (``now``: naive UTC, like the database's times)."""
    with Session(engine) as session:
        studies = _by_state(session, Study.state, [s.value for s in StudyState])
        jobs = _by_state(session, Job.state, [s.value for s in JobState])
        oldest_due = session.scalar(
            select(func.min(Job.not_before)).where(Job.state == JobState.PENDING)
            .where(Job.not_before <= now).where(siblings_ended()))
        running = session.execute(
            select(func.min(func.coalesce(Job.claimed_at, Job.not_before)),
                   func.coalesce(func.sum(case((Job.lease_expires_at < now, 1), else_=0)), 0))
            .where(Job.state == JobState.RUNNING)).one()
        slots = {name: held(session, name, now) for name in destinations}
        commitments = _by_state(session, Commitment.state, [s.value for s in CommitmentState])
        oldest_requested = session.scalar(select(func.min(Commitment.requested_at)).where(
            Commitment.state == CommitmentState.REQUESTED))
        awaiting = dict.fromkeys(destinations, 0)
        for names, count in session.execute(
                select(Job.awaiting_delivery_to, func.count())
                .where(Job.state.in_([JobState.PENDING, JobState.RUNNING]))
                .where(Job.awaiting_delivery_to.is_not(None))
                .group_by(Job.awaiting_delivery_to)).all():
            for name in (names or "").split(","):
                if name:
                    awaiting[name] = awaiting.get(name, 0) + int(count)
        down = {name: outage.since for name, outage in outages.current(session).items()}
    return Snapshot(studies=studies, jobs=jobs, oldest_due_pending=oldest_due,
                    oldest_running=running[0], leases_expired=int(running[1]),
                    slots_held=slots, commitments=commitments,
                    oldest_requested_commitment=oldest_requested,
                    awaiting_delivery=awaiting, unreachable_since=down)


class MonitorDatabase:
    """The monitor's engine, used by one scrape or probe at a time; logs when the database
    stops answering (``monitor_database_unreachable``) and when it answers again
    (``monitor_database_restored``), once each."""

    def __init__(self, url: str) -> None:
        self.engine = monitor_engine(url)
        self._lock = threading.Lock()
        #: Why the last attempt failed; None while the database answers.
        self.down_reason: str | None = None

    def _run(self, work: Callable[[], T]) -> tuple[T | None, str | None]:
        # one at a time: scrapes and probes that pile up on a slow database wait here for at
        # most TIMEOUT_SECONDS, then report it down, instead of opening more connections
        if not self._lock.acquire(timeout=TIMEOUT_SECONDS):
            return None, f"an earlier query has been running for over {TIMEOUT_SECONDS:g} s"
        try:
            result, error = work(), None
        except (SQLAlchemyError, OSError) as exc:
            result, error = None, describe_error(exc)
        finally:
            self._lock.release()
        self._note(error)
        return result, error

    def _note(self, error: str | None) -> None:
        if error is not None and self.down_reason is None:
            log.warning("monitor_database_unreachable", reason=error,
                        action="dicom_node_database_up is 0 and /readyz answers 503")
        elif error is None and self.down_reason is not None:
            log.info("monitor_database_restored")
        self.down_reason = error

    def snapshot(self, destinations: Sequence[str],
                 now: datetime) -> tuple[Snapshot | None, str | None]:
        """The scrape's numbers, or None and why the database could not be read."""
        return self._run(lambda: read_snapshot(self.engine, destinations, now))

    def check(self) -> str | None:
        """None when the database answers a read; otherwise why not."""
        return self._run(lambda: check_reachable(self.engine))[1]

    def close(self) -> None:
        self.engine.dispose()
