"""Retention: delete the spool files and results of studies the node has finished with.

The node is a router, not an archive: once a study's results are in the PACS, its images there
are the copy that counts. Without clean-up the spool grows until the disk is full and the
receiver must refuse studies (0xA700). A pass (every ``retention.interval_minutes`` in the
receiver's scheduler, or ``dicom-node purge``):

1. **By age.** A study that is *done* or *unrouted* and whose last activity (last instance
   received, completion, last job ended) is older than ``keep_days``, or *failed* and older than
   ``keep_failed_days``, loses its spool folder and its results folder.
2. **By disk space.** While the free space on data_dir's file system is below ``min_free_gb``,
   more processed studies (done, unrouted, failed) go, the least recently active first,
   whatever their age; a ``disk_space_low`` error says so when nothing more may go.

Never deleted: a study still receiving, held as incomplete, or routed (jobs pending or running),
and a study whose results a destination with ``storage_commitment`` has not yet reported
committed (a transaction still ``requested``).

**No acknowledged instance is lost on the way.** The receiver writes a file before it commits
its index row, so a file being stored while its study is purged could otherwise be deleted
after its row said "stored". A purge therefore (a) moves the study's folders into
``<data_dir>/trash/`` first (a rename: whatever the receiver writes afterwards lands in a new
folder), (b) in one transaction checks that the study is still eligible (a new instance reopens
a study, which makes it ineligible: the folders are moved back) and empties the ``path`` of the
instances received before the move, then (c) after :data:`GRACE_SECONDS` (longer than the
database's busy timeout, the longest a store can wait between its file and its row) moves back
any file whose row says it is stored and deletes the rest. A crash between the steps leaves the
trash to the next pass, which runs the same check first.

The instance rows stay, with an empty path, and the study's row, jobs and findings too: a PACS
re-sending the study re-sends known instances, which are stored again but never reopen a
processed study (no duplicate results); ``purged_studies`` records when and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config, RetentionSection
from dicom_node.log import get_logger
from dicom_node.store.db import (
    Commitment,
    CommitmentState,
    Instance,
    Job,
    PurgedStudy,
    Study,
    StudyState,
    utcnow,
)
from dicom_node.store.spool import fsync_dir
from dicom_node.uids import validate_uid

log = get_logger()

#: States whose files may go, and the section field that says after how many days.
_KEEP = {StudyState.DONE: "keep_days", StudyState.UNROUTED: "keep_days",
         StudyState.FAILED: "keep_failed_days"}
#: Seconds between moving a study's files to the trash and deleting them: longer than the
#: SQLite busy timeout (30 s), the longest a store can wait between writing its file and
#: committing its row.
GRACE_SECONDS = 35.0
TRASH = "trash"
#: In data_dir: the lock that makes passes over one data folder take turns.
LOCK_FILE = "retention.lock"
#: A file in ``incoming/`` unchanged for this long is left over from a transfer that never
#: ended (a receiver killed mid-association, a replaced pod) or a crashed worker's write. It was
#: never acknowledged: acknowledged files are in the spool.
STALE_SCRATCH_SECONDS = 3600.0


@dataclass(frozen=True)
class Candidate:
    """A study retention may delete, with what it would free (from the index)."""

    study_instance_uid: str
    state: StudyState
    last_activity: datetime
    files: int
    bytes: int
    #: "age" or "disk".
    reason: str


@dataclass
class PassReport:
    """What one retention pass did (or, dry, would do)."""

    purged: list[Candidate] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    restored: int = 0
    free_bytes_before: int = 0
    free_bytes_after: int = 0
    #: True when another pass over the same data folder was running, so this one did nothing.
    skipped: bool = False
    #: Left-over files deleted from incoming/ (see STALE_SCRATCH_SECONDS).
    scratch_files: int = 0


def _commitment_pending() -> Any:
    """The study has results whose Storage Commitment a destination has not reported yet: its
    files stay, so that a failure can be sent again (dicom_node.commitment)."""
    return exists().where(Commitment.study_instance_uid == Study.study_instance_uid,
                          Commitment.state == CommitmentState.REQUESTED)


def _last_activity(session: Session, study_uid: str | None = None
                   ) -> dict[str, tuple[StudyState, datetime, int, int]]:
    """Per processed study with files in the spool (or only ``study_uid``): state, last
    activity, files, bytes."""
    jobs = select(Job.study_instance_uid, func.max(Job.updated_at).label("ended"))
    files = (select(Instance.study_instance_uid, func.count().label("n"),
                    func.coalesce(func.sum(Instance.size), 0).label("size"))
             .where(Instance.path != ""))
    studies = select(Study).where(Study.state.in_(list(_KEEP))).where(~_commitment_pending())
    if study_uid is not None:
        jobs = jobs.where(Job.study_instance_uid == study_uid)
        files = files.where(Instance.study_instance_uid == study_uid)
        studies = studies.where(Study.study_instance_uid == study_uid)
    jobs_q = jobs.group_by(Job.study_instance_uid).subquery()
    files_q = files.group_by(Instance.study_instance_uid).subquery()
    study_q = studies.subquery()
    rows = session.execute(
        select(study_q.c.study_instance_uid, study_q.c.state, study_q.c.last_received_at,
               study_q.c.completed_at, jobs_q.c.ended, files_q.c.n, files_q.c.size)
        .join(files_q, files_q.c.study_instance_uid == study_q.c.study_instance_uid)
        .outerjoin(jobs_q, jobs_q.c.study_instance_uid == study_q.c.study_instance_uid))
    out = {}
    for uid, state, received, completed, ended, n, size in rows:
        last = max(t for t in (received, completed, ended) if t is not None)
        out[uid] = (StudyState(state), last, int(n), int(size))
    return out


def candidates(session: Session, section: RetentionSection, now: datetime,
               free_bytes: int) -> list[Candidate]:
    """The studies a pass deletes, in order: those old enough, then, while the space they free
    leaves less than ``min_free_gb`` free, the least recently active other processed ones."""
    studies = sorted(_last_activity(session).items(), key=lambda item: item[1][1])
    chosen: list[Candidate] = []
    rest: list[Candidate] = []
    for uid, (state, last, n, size) in studies:
        keep = timedelta(days=float(getattr(section, _KEEP[state])))
        aged = now - last >= keep
        (chosen if aged else rest).append(
            Candidate(uid, state, last, n, size, "age" if aged else "disk"))
    need = int(section.min_free_gb * 1e9) - free_bytes - sum(c.bytes for c in chosen)
    for candidate in rest:
        if need <= 0:
            break
        chosen.append(candidate)
        need -= candidate.bytes
    return chosen


def _eligible(session: Session, uid: str, section: RetentionSection, now: datetime,
              reason: str) -> bool:
    """Re-checked inside the purge's transaction: the study may have changed since."""
    current = _last_activity(session, uid).get(uid)
    if current is None:
        return False
    state, last, _, _ = current
    return reason == "disk" or now - last >= timedelta(days=float(getattr(section, _KEEP[state])))


class Retention:
    """Runs retention passes over one node's data_dir and index."""

    def __init__(self, sessions: sessionmaker[Session], *, grace_seconds: float = GRACE_SECONDS,
                 free_bytes: Callable[[Path], int] | None = None) -> None:
        self.sessions = sessions
        self.grace_seconds = grace_seconds
        #: Set by :meth:`stop`: a pass waiting out its grace returns at once and leaves its
        #: trash to the next pass (which checks it the same way), so a receiver stops promptly.
        self._stopping = threading.Event()
        # how much space is free where data_dir lives (a parameter so tests can set it)
        self.free_bytes = free_bytes or (lambda path: shutil.disk_usage(path).free)

    def run(self, config: Config, *, dry_run: bool = False, wait: bool = False,
            now: datetime | None = None) -> PassReport:
        """One pass (see the module docstring); ``dry_run`` only reports what would go.

        Passes over one data folder run one at a time, whichever receiver (or ``dicom-node
        purge``) starts them: a pass holds an exclusive lock on ``<data_dir>/retention.lock``
        from its start to the end of its grace. Another pass returns at once, with
        ``skipped`` set, or with ``wait`` waits for it."""
        section = config.retention
        report = PassReport()
        if section is None or not section.enabled:
            return report
        data_dir = config.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if dry_run:
            return self._pass(config, section, report, dry_run=True, now=now)
        with _pass_lock(data_dir / LOCK_FILE, wait=wait) as locked:
            if not locked:
                report.skipped = True
                log.info("retention_pass_skipped",
                         reason="another retention pass over this data folder is running "
                                "(another receiver, or dicom-node purge)")
                return report
            return self._pass(config, section, report, dry_run=False, now=now)

    def _pass(self, config: Config, section: RetentionSection, report: PassReport, *,
              dry_run: bool, now: datetime | None) -> PassReport:
        data_dir = config.node.data_dir
        if not dry_run:  # what a pass that crashed or was stopped left
            report.restored += self._empty_trash(config, older_than=self.grace_seconds)
            report.scratch_files = clear_stale_scratch(config.incoming_dir)
        now = now or utcnow()
        report.free_bytes_before = self.free_bytes(data_dir)
        with self.sessions() as session:
            chosen = candidates(session, section, now, report.free_bytes_before)
        if dry_run:
            report.purged = chosen
            report.files = sum(c.files for c in chosen)
            report.bytes = sum(c.bytes for c in chosen)
            report.free_bytes_after = report.free_bytes_before
            return report
        trash = data_dir / TRASH / now.strftime("%Y%m%dT%H%M%S%f")
        for candidate in chosen:
            if self._purge(config, section, candidate, trash, now) == "purged":
                report.purged.append(candidate)
                report.files += candidate.files
                report.bytes += candidate.bytes
                log.info("retention_purged", study_uid=candidate.study_instance_uid,
                         state=str(candidate.state), reason=candidate.reason,
                         files=candidate.files, mb=round(candidate.bytes / 1e6, 1),
                         idle_days=round((now - candidate.last_activity).total_seconds()
                                         / 86400, 1))
        if report.purged and not self._stopping.wait(self.grace_seconds):
            report.restored += self._empty_trash(config, only=trash)
        report.free_bytes_after = self.free_bytes(data_dir)
        self._log_pass(config, section, report)
        return report

    def stop(self) -> None:
        """Cut a pass's grace short (receiver shutdown); its trash waits for the next pass."""
        self._stopping.set()

    def _log_pass(self, config: Config, section: RetentionSection, report: PassReport) -> None:
        if report.purged or report.restored:
            log.info("retention_pass", studies=len(report.purged), files=report.files,
                     mb=round(report.bytes / 1e6, 1), restored=report.restored,
                     free_gb=round(report.free_bytes_after / 1e9, 2))
        if report.free_bytes_after < section.min_free_gb * 1e9:
            with self.sessions() as session:
                held = dict(session.execute(
                    select(Study.state, func.count()).group_by(Study.state)).all())
            log.error("disk_space_low", free_gb=round(report.free_bytes_after / 1e9, 2),
                      min_free_gb=section.min_free_gb, data_dir=str(config.node.data_dir),
                      kept={str(k): v for k, v in held.items() if k not in _KEEP},
                      reason="every study retention may delete is deleted; the rest are "
                             "receiving, incomplete or in work")

    def _purge(self, config: Config, section: RetentionSection, candidate: Candidate,
               trash: Path, now: datetime) -> str:
        """Move the study's folders to ``trash``, then mark its instances purged.

        Returns "purged"; "changed" when it is no longer eligible (the folders are moved back);
        "taken" when another pass (another receiver sharing the data folder and the database)
        purged it first: its instances are marked already, and what this pass moved, if
        anything, goes with this pass's trash."""
        uid = validate_uid(candidate.study_instance_uid, "Study Instance UID")
        folders = [(config.spool_dir / uid, trash / "spool" / uid),
                   (config.results_dir / uid, trash / "results" / uid)]
        moved = []
        for source, target in folders:
            if not source.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(source, target)
            except FileNotFoundError:  # another pass moved it since the check
                continue
            fsync_dir(source.parent)
            moved.append((source, target))
        moved_at = utcnow()
        with self.sessions.begin() as session:
            if not _eligible(session, uid, section, now, candidate.reason):
                outcome = "changed"
            else:
                # Another pass marking the same rows holds their locks until it commits; this
                # statement then finds them marked (PostgreSQL re-reads the rows; SQLite
                # serialises the two transactions).
                result: Any = session.execute(
                    update(Instance).where(Instance.study_instance_uid == uid)
                    .where(Instance.path != "").where(Instance.received_at <= moved_at)
                    .values(path=""))
                marked = int(result.rowcount or 0)
                if not marked:
                    outcome = "taken"
                else:
                    outcome = "purged"
                    record = session.get(PurgedStudy, uid)
                    if record is None:
                        record = PurgedStudy(study_instance_uid=uid, files=0, bytes=0)
                        session.add(record)
                    record.purged_at, record.reason = now, candidate.reason
                    record.files += candidate.files
                    record.bytes += candidate.bytes
        if outcome == "changed":
            for source, target in moved:
                _move_back(target, source)
            log.info("retention_skipped", study_uid=uid,
                     reason="the study changed while it was being deleted (new instance or job)")
        elif outcome == "taken":
            log.info("retention_skipped", study_uid=uid,
                     reason="another retention pass (another receiver) deleted it first")
        return outcome

    def _empty_trash(self, config: Config, *, only: Path | None = None,
                     older_than: float = 0.0) -> int:
        """Move back every trashed file whose instance row says it is stored (it was being
        stored while its study was purged), then delete the trash: the folder ``only``, or
        every pass's folder last changed more than ``older_than`` seconds ago (another pass may
        be waiting out its grace). Returns the files moved back."""
        root = config.node.data_dir / TRASH
        if only is not None:
            passes = [only] if only.is_dir() else []
        elif root.is_dir():
            passes = [p for p in root.iterdir()
                      if p.is_dir() and time.time() - _changed(p) > older_than]
            # _changed is 0 for a folder another pass removed meanwhile: nothing to do there
            passes = [p for p in passes if p.is_dir()]
        else:
            passes = []
        restored = 0
        for folder in passes:
            restored += self._restore(config, folder)
            _remove_tree(folder)
        if passes:
            # another pass may be creating its folder, or removing the root, meanwhile
            with contextlib.suppress(OSError):
                root.rmdir()
        return restored

    def _restore(self, config: Config, folder: Path) -> int:
        restored = 0
        with self.sessions() as session:
            for spool in folder.glob("spool/*"):
                for path in spool.rglob("*.dcm"):
                    row = session.get(Instance, path.stem)
                    if row is None or not row.path:
                        continue
                    final = config.node.data_dir / row.path
                    if not final.exists():
                        final.parent.mkdir(parents=True, exist_ok=True)
                        try:
                            os.replace(path, final)
                        except FileNotFoundError:  # another pass restored it meanwhile
                            continue
                        fsync_dir(final.parent)
                        restored += 1
                        log.warning("retention_restored", study_uid=row.study_instance_uid,
                                    sop_instance_uid=row.sop_instance_uid,
                                    reason="stored while its study was being deleted")
        return restored


def _changed(folder: Path) -> float:
    """When a pass's trash folder last got a study (its spool/ and results/ entries change);
    0 when another pass removed it meanwhile."""
    try:
        return max([folder.stat().st_mtime, *(c.stat().st_mtime for c in folder.iterdir())])
    except FileNotFoundError:
        return 0.0


@contextlib.contextmanager
def _pass_lock(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` for the duration of a pass; yields whether it was
    taken. The kernel releases it when the holder exits, so a crashed pass leaves no stale lock
    (on NFS, Linux maps ``flock`` to the server's byte-range locks)."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_stale_scratch(incoming: Path, now: float | None = None) -> int:
    """Delete the files under ``incoming`` unchanged for :data:`STALE_SCRATCH_SECONDS`; their
    number. Folders stay: a receiver that is running writes into its own one."""
    now = time.time() if now is None else now
    removed, size = 0, 0
    for path in incoming.rglob("*") if incoming.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # a transfer that ended meanwhile
            stat = path.lstat()
            if path.is_file() and now - stat.st_mtime > STALE_SCRATCH_SECONDS:
                path.unlink()
                removed, size = removed + 1, size + stat.st_size
    if removed:
        log.warning("scratch_cleared", files=removed, mb=round(size / 1e6, 1),
                    reason=f"left in {incoming.name}/ by transfers or writes that never ended "
                           f"(unchanged for {STALE_SCRATCH_SECONDS / 3600:.0f} h); never "
                           "acknowledged")
    return removed


def _remove_tree(folder: Path) -> None:
    """``shutil.rmtree``, where entries another pass removes meanwhile are no error."""
    def ignore_gone(_function: object, _path: str, exc_info: tuple[type, BaseException, object]
                    ) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(folder, onerror=ignore_gone)


def _move_back(trashed: Path, original: Path) -> None:
    """Undo a move to the trash; files the receiver wrote meanwhile (a new folder) are kept."""
    if not original.exists():
        original.parent.mkdir(parents=True, exist_ok=True)
        os.replace(trashed, original)
        fsync_dir(original.parent)
        return
    for path in sorted(trashed.rglob("*")):
        if path.is_file():
            target = original / path.relative_to(trashed)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.replace(path, target)
                fsync_dir(target.parent)
    shutil.rmtree(trashed)


def purged_at(session: Session, study_uid: str) -> datetime | None:
    """When retention last deleted files of the study; None if it never did."""
    record = session.get(PurgedStudy, study_uid)
    return None if record is None else record.purged_at
