"""How many associations the workers open to one destination at a time, all workers together.

A PACS is shared by the whole hospital: an AI node must not open as many associations to it as it
has workers (each pushing, say, a 300-image enhanced series). ``destinations.max_associations``
caps them across every worker sharing the database, on one machine or several:

- the destination has that many **slots**, rows of ``send_slots`` (made when first needed);
- a worker takes a free slot (one conditional UPDATE, the same pattern as claiming a job) before
  it opens an association, holds it while it sends, and frees it afterwards;
- while all slots are taken it waits, checking every :data:`POLL_SECONDS` (``send_waiting`` once);
- a slot is leased: its holder renews it every :data:`LEASE_SECONDS` / 3 while it sends, and the
  slot of a worker that crashed is free again :data:`LEASE_SECONDS` after its last renewal, or at
  once when a worker starting on the same machine proves its holder dead (:func:`release_dead`).

Lowering ``max_associations`` by a reload takes effect as the slots above the new limit are freed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.log import get_logger
from dicom_node.store.db import SendSlot, utcnow

log = get_logger()

#: A held slot's lease; its holder renews it every third of this while it sends.
LEASE_SECONDS = 60.0
#: How often a worker waiting for a slot looks again.
POLL_SECONDS = 1.0


def _free(now: datetime) -> Any:
    return or_(SendSlot.holder.is_(None), SendSlot.expires_at < now)


def _ensure_slots(sessions: sessionmaker[Session], destination: str, limit: int) -> None:
    """Make the destination's slot rows 0 … limit-1 that do not exist yet."""
    with sessions() as session:
        existing = set(session.scalars(
            select(SendSlot.slot).where(SendSlot.destination == destination)))
    for slot in range(limit):
        if slot in existing:
            continue
        # another worker may make the same row at the same moment: its row serves as well
        with contextlib.suppress(IntegrityError), sessions.begin() as session:
            session.add(SendSlot(destination=destination, slot=slot))


def acquire(sessions: sessionmaker[Session], destination: str, limit: int, holder: str,
            now: datetime | None = None) -> int | None:
    """Take a free slot of ``destination`` among the first ``limit``; its number, or None."""
    _ensure_slots(sessions, destination, limit)
    now = now or utcnow()
    with sessions.begin() as session:
        free = session.scalars(
            select(SendSlot.slot).where(SendSlot.destination == destination)
            .where(SendSlot.slot < limit).where(_free(now)).order_by(SendSlot.slot)).all()
        for slot in free:
            result: Any = session.execute(
                update(SendSlot).where(SendSlot.destination == destination)
                .where(SendSlot.slot == slot).where(_free(now))
                .values(holder=holder, expires_at=now + timedelta(seconds=LEASE_SECONDS))
                .execution_options(synchronize_session=False))
            if result.rowcount == 1:
                return slot
    return None


def renew(sessions: sessionmaker[Session], destination: str, slot: int, holder: str) -> bool:
    """Extend the lease of a slot ``holder`` holds; False when it no longer does."""
    with sessions.begin() as session:
        result: Any = session.execute(
            update(SendSlot).where(SendSlot.destination == destination)
            .where(SendSlot.slot == slot).where(SendSlot.holder == holder)
            .values(expires_at=utcnow() + timedelta(seconds=LEASE_SECONDS))
            .execution_options(synchronize_session=False))
        return bool(result.rowcount)


def release(sessions: sessionmaker[Session], destination: str, slot: int, holder: str) -> None:
    """Free the slot if ``holder`` still holds it."""
    with sessions.begin() as session:
        session.execute(
            update(SendSlot).where(SendSlot.destination == destination)
            .where(SendSlot.slot == slot).where(SendSlot.holder == holder)
            .values(holder=None, expires_at=None)
            .execution_options(synchronize_session=False))


def release_dead(sessions: sessionmaker[Session], is_dead: Callable[[str], bool]
                 ) -> list[tuple[str, int, str]]:
    """Free, in one transaction, the slots whose holder ``is_dead`` (dicom_node.jobs.owners:
    provably, on this machine), each by a conditional UPDATE; (destination, slot, holder) of
    each slot freed."""
    freed = []
    with sessions.begin() as session:
        rows = session.execute(select(SendSlot.destination, SendSlot.slot, SendSlot.holder)
                               .where(SendSlot.holder.is_not(None))
                               .order_by(SendSlot.destination, SendSlot.slot)).all()
        for destination, slot, holder in rows:
            if holder is None or not is_dead(holder):
                continue
            result: Any = session.execute(
                update(SendSlot).where(SendSlot.destination == destination)
                .where(SendSlot.slot == slot).where(SendSlot.holder == holder)
                .values(holder=None, expires_at=None)
                .execution_options(synchronize_session=False))
            if result.rowcount == 1:
                freed.append((destination, slot, holder))
    return freed


def held(session: Session, destination: str, now: datetime | None = None) -> int:
    """How many of the destination's slots are held now."""
    now = now or utcnow()
    return int(session.scalar(
        select(func.count()).select_from(SendSlot).where(SendSlot.destination == destination)
        .where(SendSlot.holder.is_not(None)).where(SendSlot.expires_at >= now)) or 0)


@contextlib.contextmanager
def send_slot(sessions: sessionmaker[Session], destination: str, limit: int,
              holder: str) -> Iterator[int]:
    """Hold one of the destination's slots for the ``with`` block, waiting for one if needed;
    the lease is renewed in a thread while the block runs, and the slot freed at its end."""
    started = time.monotonic()
    waited = False
    while (slot := acquire(sessions, destination, limit, holder)) is None:
        if not waited:
            log.info("send_waiting", destination=destination, max_associations=limit,
                     reason="every association slot of the destination is in use by workers")
            waited = True
        time.sleep(POLL_SECONDS)
    if waited:
        log.info("send_slot_taken", destination=destination, slot=slot,
                 waited_seconds=round(time.monotonic() - started, 1))
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                if not renew(sessions, destination, slot, holder):
                    log.warning("send_slot_lost", destination=destination, slot=slot)
                    return
            except Exception:  # a busy database: try again at the next tick
                log.warning("send_slot_renewal_failed", destination=destination, slot=slot)

    keeper = threading.Thread(target=keep, daemon=True, name=f"slot-{destination}-{slot}")
    keeper.start()
    try:
        yield slot
    finally:
        stop.set()
        keeper.join()
        release(sessions, destination, slot, holder)
