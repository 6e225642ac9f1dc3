"""Keep the RIS's scheduled procedure steps in the database, and ride out worklist outages.

:func:`store_items` upserts the items of one query into ``scheduled_steps`` by their step key
(:func:`~dicom_node.worklist.order.step_key`) and removes the steps the RIS has not returned for
``worklist.keep_days``. :func:`refresh` is one query and store, as ``dicom-node worklist`` runs
it. :class:`WorklistPoller` is the scheduled poll of the receiver: it never raises, logs an
outage once (``worklist_unreachable``) and its end once (``worklist_restored``), and after an
outage matches the studies that completed without their order (the ``catch_up`` it is given:
``complete.catch_up``, passed in by the scheduler, so that the worklist stage never imports the
completion that imports it).

The network query runs before the database session opens, so a slow RIS never holds a
transaction; the upsert and the prune are one short transaction. Plain SQLAlchemy ORM and Core
statements only: SQLite and PostgreSQL behave the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config, WorklistSection
from dicom_node.errors import ConfigError, WorklistError
from dicom_node.log import get_logger
from dicom_node.store.db import ScheduledStep, utcnow
from dicom_node.worklist.order import scheduled_start, scheduled_step, step_key
from dicom_node.worklist.query import query_worklist

log = get_logger()

#: Keys looked up per SELECT … IN (…) (well below SQLite's and PostgreSQL's parameter limits).
_CHUNK = 500

#: The catch-up run when an outage ends: (config, sessions, since) → studies matched.
CatchUp = Callable[[Config, sessionmaker[Session], datetime], int]


@dataclass(frozen=True)
class RefreshCounts:
    """What one refresh did to ``scheduled_steps``."""

    #: Items the RIS returned (that fit the filter).
    fetched: int
    #: Steps not stored before.
    new: int
    #: Steps stored before and returned again: their item and columns are rewritten and
    #: ``last_seen_at`` moves on (``first_seen_at`` is kept).
    updated: int
    #: Steps removed because the RIS has not returned them for ``keep_days``.
    pruned: int


@dataclass(frozen=True)
class RefreshOutcome:
    """The result of one :meth:`WorklistPoller.poll`."""

    ok: bool
    counts: RefreshCounts | None = None
    #: Why the poll failed (the query's reason, or the unexpected error).
    error: str | None = None
    #: The first successful poll after an outage.
    restored: bool = False
    #: Studies matched to an order by the catch-up after an outage (None: none ran, or failed).
    caught_up: int | None = None


def enabled_section(config: Config) -> WorklistSection:
    """The ``[worklist]`` section; ConfigError when there is none or it is disabled."""
    section = config.worklist
    if section is None:
        raise ConfigError("no [worklist] section in the config: the node does not query a "
                          "Modality Worklist (see docs/worklist.md)")
    if not section.enabled:
        raise ConfigError("the [worklist] section is disabled (enabled = false)")
    return section


# --------------------------------------------------------------------------------------------
# storing


def _text(ds: Dataset, keyword: str, length: int) -> str | None:
    """An attribute as text for an indexed column (values of a multi-valued one joined by a
    backslash, as DICOM writes them), cut to the column's length; None when empty."""
    value = ds.get(keyword)
    if value is None:
        return None
    values = list(value) if isinstance(value, MultiValue) else [value]
    text = "\\".join(str(v).strip() for v in values).strip("\\ ")
    return text[:length] or None


def _columns(item: Dataset) -> dict[str, Any]:
    step = scheduled_step(item)
    return {
        "study_instance_uid": _text(item, "StudyInstanceUID", 64),
        "accession_number": _text(item, "AccessionNumber", 16),
        "patient_id": _text(item, "PatientID", 64),
        "modality": _text(step, "Modality", 16),
        "scheduled_station_ae_title": _text(step, "ScheduledStationAETitle", 16),
        "scheduled_start": scheduled_start(item),
        "item_json": item.to_json(),
    }


def _existing(session: Session, keys: Sequence[str]) -> dict[str, ScheduledStep]:
    found: dict[str, ScheduledStep] = {}
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i:i + _CHUNK]
        found.update((row.key, row) for row in session.scalars(
            select(ScheduledStep).where(ScheduledStep.key.in_(chunk))))
    return found


def _upsert(session: Session, rows: dict[str, dict[str, Any]], now: datetime) -> tuple[int, int]:
    existing = _existing(session, list(rows))
    new = updated = 0
    for key, columns in rows.items():
        row = existing.get(key)
        if row is None:
            session.add(ScheduledStep(key=key, first_seen_at=now, last_seen_at=now, **columns))
            new += 1
        else:
            for name, value in columns.items():
                setattr(row, name, value)
            row.last_seen_at = max(row.last_seen_at, now)
            updated += 1
    return new, updated


def _prune(session: Session, now: datetime, keep_days: int | None) -> int:
    if keep_days is None:
        return 0
    result: Any = session.execute(
        delete(ScheduledStep).where(ScheduledStep.last_seen_at < now - timedelta(days=keep_days))
        .execution_options(synchronize_session=False))
    return int(result.rowcount or 0)


def store_items(sessions: sessionmaker[Session], items: Iterable[Dataset], now: datetime,
                keep_days: int | None = None) -> RefreshCounts:
    """Upsert worklist items by step key and prune steps last seen more than ``keep_days``
    before ``now`` (None: prune nothing). ``now`` is naive UTC, like ``store.db.utcnow()``.

    One transaction. Two nodes storing the same new step at once (PostgreSQL) make one of them
    retry, and it then updates the row the other inserted.
    """
    items = list(items)
    rows = {step_key(item): _columns(item) for item in items}  # the last of a repeated key wins

    def store() -> RefreshCounts:
        with sessions.begin() as session:
            new, updated = _upsert(session, rows, now)
            pruned = _prune(session, now, keep_days)
        return RefreshCounts(fetched=len(items), new=new, updated=updated, pruned=pruned)

    try:
        return store()
    except IntegrityError:  # another node inserted one of these steps first: now an update
        return store()


def refresh(config: Config, sessions: sessionmaker[Session], now: datetime | None = None,
            today: date | None = None) -> RefreshCounts:
    """Query the worklist now and store what it returns (``dicom-node worklist``).

    Raises ConfigError without an enabled ``[worklist]`` section, WorklistError when the query
    fails (nothing is stored or pruned then)."""
    section = enabled_section(config)
    items = query_worklist(section, config.node.ae_title, today)
    return store_items(sessions, items, now or utcnow(), keep_days=section.keep_days)


# --------------------------------------------------------------------------------------------
# the scheduled poll


class WorklistPoller:
    """The receiver's worklist poll, with the state of the current outage.

    An outage begins with the first failed poll and ends with the next successful one. Its
    first failure is logged as a warning (``worklist_unreachable``); the following ones only at
    debug level (``worklist_still_unreachable``). The successful poll that ends it logs
    ``worklist_restored`` and then runs the catch-up: the studies completed since the last
    successful poll before the outage (or since the outage began, when this process had none)
    that have no order are matched again, by ``catch_up`` (``complete.catch_up`` in the receiver).
    """

    def __init__(self, sessions: sessionmaker[Session], catch_up: CatchUp) -> None:
        self.sessions = sessions
        self.catch_up = catch_up
        #: When the current outage's first failed poll began (None: no outage).
        self.outage_started_at: datetime | None = None
        self.failed_polls = 0
        #: When the last successful poll began.
        self.last_success_at: datetime | None = None

    @property
    def in_outage(self) -> bool:
        return self.outage_started_at is not None

    def poll(self, config: Config, now: datetime | None = None) -> RefreshOutcome:
        """Query and store once; never raises (a scheduler job must survive every poll)."""
        try:
            return self._poll(config, now or utcnow())
        except Exception as exc:  # a database error, a bug: logged, and the next poll retries
            log.exception("worklist_poll_failed")
            return RefreshOutcome(ok=False, error=f"{type(exc).__name__}: {exc}")

    def _poll(self, config: Config, now: datetime) -> RefreshOutcome:
        section = config.worklist
        if section is None or not section.enabled:
            return RefreshOutcome(ok=False, error="no [worklist] section is enabled")
        started = time.monotonic()
        try:
            items = query_worklist(section, config.node.ae_title)
        except WorklistError as exc:
            self._failed(section, exc, now)
            return RefreshOutcome(ok=False, error=exc.reason)
        counts = store_items(self.sessions, items, now, keep_days=section.keep_days)
        log.info("worklist_refreshed", fetched=counts.fetched, new=counts.new,
                 updated=counts.updated, pruned=counts.pruned, ae_title=section.ae_title,
                 duration_seconds=round(time.monotonic() - started, 3))
        outage_started_at, since = self.outage_started_at, self.last_success_at
        self.last_success_at = now
        if outage_started_at is None:
            return RefreshOutcome(ok=True, counts=counts)
        log.info("worklist_restored", ae_title=section.ae_title, host=section.host,
                 port=section.port, failed_polls=self.failed_polls,
                 outage_seconds=round((now - outage_started_at).total_seconds(), 1))
        self.outage_started_at, self.failed_polls = None, 0
        caught_up = self._catch_up(config, since or outage_started_at)
        return RefreshOutcome(ok=True, counts=counts, restored=True, caught_up=caught_up)

    def _failed(self, section: WorklistSection, exc: WorklistError, now: datetime) -> None:
        self.failed_polls += 1
        if self.outage_started_at is None:
            self.outage_started_at = now
            log.warning("worklist_unreachable", reason=exc.reason, ae_title=section.ae_title,
                        host=section.host, port=section.port)
        else:
            log.debug("worklist_still_unreachable", reason=exc.reason,
                      ae_title=section.ae_title, failed_polls=self.failed_polls)

    def _catch_up(self, config: Config, since: datetime) -> int | None:
        try:
            matched = self.catch_up(config, self.sessions, since)
        except Exception:  # the orders are stored; the studies wait for a reprocess
            log.exception("worklist_catch_up_failed", since=since.isoformat())
            return None
        log.info("worklist_catch_up", matched=matched, since=since.isoformat())
        return matched
