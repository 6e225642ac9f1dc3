"""Which destinations the workers cannot reach now, shared by every worker in the database.

A destination that refuses connections, times out, fails the TLS handshake, rejects or aborts the
association (:class:`dicom_node.errors.DestinationUnreachable`) is down: the jobs waiting to
deliver there wait it out (:func:`dicom_node.jobs.queue.await_delivery`). A hospital's PACS goes
down for maintenance with a backlog of hundreds of jobs behind it, each retrying; the log must
still say so once, not once per try:

- the first failed try makes the destination's row in ``destination_outages`` (one INSERT: on a
  primary key, so two workers failing at the same moment make one row) and logs
  ``destination_unreachable``; the later tries only update the row (latest error, count);
- the first try that reaches the destination again deletes the row (one DELETE: whoever deleted
  it logs) and logs ``destination_recovered`` with the outage's duration;
- while the row is there the workers try the destination **one at a time**, at most once per
  ``jobs.retry_base_seconds`` (:func:`take_try`, a conditional UPDATE of ``next_try_at``, like a
  claim): the other jobs' tries are deferred at once with the outage's last error, without
  connecting. A PACS behind a firewall that drops packets costs every try its whole
  ``timeout_seconds``; without this, a backlog of hundreds of jobs would keep every association
  slot and every worker busy failing, and the models of new studies would wait behind them.

A try that reaches the destination counts as recovery even when the destination then refuses an
object (a failure status): it answered. The rows are what ``/metrics`` shows as
``dicom_node_destination_unreachable`` and what ``dicom-node jobs`` prints as the outage's start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.log import get_logger
from dicom_node.store.db import DestinationOutage, utcnow

log = get_logger()


@dataclass(frozen=True)
class Outage:
    destination: str
    since: datetime
    last_failure_at: datetime
    last_error: str
    failures: int
    next_try_at: datetime


def _outage(row: DestinationOutage) -> Outage:
    return Outage(row.destination, row.since, row.last_failure_at, row.last_error, row.failures,
                  row.next_try_at)


def take_try(sessions: sessionmaker[Session], destination: str, hold_seconds: float,
             now: datetime | None = None) -> Outage | None:
    """None when the caller may try ``destination`` now: it has no outage, or the caller took
    the outage's next try (no one else tries it for ``hold_seconds``, the try's longest
    expected duration). Otherwise the outage: another worker's try is running or was made
    less than the retry interval ago, and the caller defers without connecting."""
    now = now or utcnow()
    with sessions.begin() as session:
        row = session.get(DestinationOutage, destination)
        if row is None:
            return None
        result: Any = session.execute(
            update(DestinationOutage).where(DestinationOutage.destination == destination)
            .where(DestinationOutage.next_try_at <= now)
            .values(next_try_at=now + timedelta(seconds=hold_seconds))
            .execution_options(synchronize_session=False))
        return None if result.rowcount else _outage(row)


def note_unreachable(sessions: sessionmaker[Session], destination: str, reason: str,
                     retry_seconds: float, now: datetime | None = None) -> datetime:
    """Record a failed try to reach ``destination`` (the next try is due ``retry_seconds``
    later); the start of its outage. The try that starts an outage logs
    ``destination_unreachable``."""
    now = now or utcnow()
    next_try = now + timedelta(seconds=retry_seconds)
    for _ in range(3):  # a recovery may delete the row between our two statements
        with sessions.begin() as session:
            result: Any = session.execute(
                update(DestinationOutage).where(DestinationOutage.destination == destination)
                .values(last_failure_at=now, last_error=reason, next_try_at=next_try,
                        failures=DestinationOutage.failures + 1)
                .execution_options(synchronize_session=False))
            if result.rowcount:
                since = session.scalar(select(DestinationOutage.since).where(
                    DestinationOutage.destination == destination))
                if since is not None:
                    return since
                continue
        try:
            with sessions.begin() as session:
                session.add(DestinationOutage(destination=destination, since=now,
                                              last_failure_at=now, last_error=reason,
                                              failures=1, next_try_at=next_try))
        except IntegrityError:  # another worker's try started it at the same moment
            continue
        log.warning("destination_unreachable", destination=destination, reason=reason,
                    action="results wait and are re-sent when it answers again "
                           "(jobs.delivery_window_hours)")
        return now
    return now


def note_reachable(sessions: sessionmaker[Session], destination: str,
                   now: datetime | None = None) -> bool:
    """A try reached ``destination``: end its outage, if it had one (the try that ends it logs
    ``destination_recovered`` and gets True)."""
    now = now or utcnow()
    with sessions.begin() as session:
        row = session.get(DestinationOutage, destination)
        if row is None:
            return False
        outage = _outage(row)
        result: Any = session.execute(
            delete(DestinationOutage).where(DestinationOutage.destination == destination)
            .where(DestinationOutage.since == outage.since)
            .execution_options(synchronize_session=False))
        if not result.rowcount:
            return False
    log.info("destination_recovered", destination=destination,
             since=outage.since.isoformat(timespec="seconds") + "Z",
             outage_seconds=round((now - outage.since).total_seconds(), 1),
             failed_tries=outage.failures)
    return True


def current(session: Session) -> Mapping[str, Outage]:
    """The destinations unreachable now, by name."""
    return {row.destination: _outage(row)
            for row in session.scalars(select(DestinationOutage))}
