"""APScheduler jobs of the receiver process: the completion sweep, the config watch, the
Storage Commitment timeouts, with an enabled ``[worklist]`` section the Modality Worklist poll,
and with ``[retention]`` the clean-up of processed studies' files."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import complete
from dicom_node.commitment.report import log_outcome
from dicom_node.commitment.store import expire
from dicom_node.config import Config, RetentionSection, WorklistSection
from dicom_node.log import get_logger
from dicom_node.retention import Retention
from dicom_node.worklist.refresh import WorklistPoller

log = get_logger()

CONFIG_POLL_SECONDS = 2.0
WORKLIST_JOB = "worklist_poll"
RETENTION_JOB = "retention"
COMMITMENT_JOB = "commitment_timeouts"
#: How often the receiver looks for Storage Commitment transactions past their deadline.
COMMITMENT_CHECK_SECONDS = 60.0
#: The first retention pass runs this long after the start (not in the start's rush).
RETENTION_FIRST_DELAY_SECONDS = 60.0


def _worklist(config: Config) -> WorklistSection | None:
    """The worklist section when it is there and enabled."""
    section = config.worklist
    return section if section is not None and section.enabled else None


def _retention(config: Config) -> RetentionSection | None:
    section = config.retention
    return section if section is not None and section.enabled else None


class ReceiverScheduler:
    """Runs ``complete.sweep`` every ``completion.sweep_interval_seconds`` with the current
    config, polls the config file for changes, and polls the Modality Worklist every
    ``worklist.poll_seconds`` (the first poll at start), runs a retention pass every
    ``retention.interval_minutes``, and times out Storage Commitment transactions every
    :data:`COMMITMENT_CHECK_SECONDS`."""

    def __init__(self, config: Config, sessions: sessionmaker[Session],
                 check_config: Callable[[], object] | None = None) -> None:
        self.config = config
        self.sessions = sessions
        self.worklist = WorklistPoller(sessions, complete.catch_up)
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(self._sweep, "interval", id="completion_sweep",
                                seconds=config.completion.sweep_interval_seconds,
                                max_instances=1, coalesce=True)
        if check_config is not None:
            self._scheduler.add_job(check_config, "interval", id="config_watch",
                                    seconds=CONFIG_POLL_SECONDS, max_instances=1, coalesce=True)
        section = _worklist(config)
        if section is not None:
            self._add_worklist_job(section)
        self._scheduler.add_job(self._expire_commitments, "interval", id=COMMITMENT_JOB,
                                seconds=COMMITMENT_CHECK_SECONDS, max_instances=1,
                                coalesce=True)
        self.retention = Retention(sessions)
        kept = _retention(config)
        if kept is not None:
            self._add_retention_job(kept, RETENTION_FIRST_DELAY_SECONDS)

    def _sweep(self) -> None:
        try:
            complete.sweep(self.config, self.sessions)
        except Exception:  # the next sweep retries; never kill the scheduler thread
            log.exception("completion_sweep_failed")

    def _expire_commitments(self) -> None:
        try:
            for outcome in expire(self.sessions, self.config.jobs):
                log_outcome(outcome)
        except Exception:  # the next check tries again; never kill the scheduler thread
            log.exception("commitment_check_failed")

    def _poll_worklist(self) -> None:
        try:
            self.worklist.poll(self.config)
        except Exception:  # poll() does not raise; this is the last guard of the job thread
            log.exception("worklist_poll_failed")

    def _retain(self) -> None:
        try:
            self.retention.run(self.config)
        except Exception:  # the next pass tries again; never kill the scheduler thread
            log.exception("retention_pass_failed")

    def _add_retention_job(self, section: RetentionSection, delay: float) -> None:
        self._scheduler.add_job(
            self._retain, "interval", id=RETENTION_JOB, minutes=section.interval_minutes,
            max_instances=1, coalesce=True,
            next_run_time=datetime.now(UTC) + timedelta(seconds=delay))

    def _add_worklist_job(self, section: WorklistSection) -> None:
        self._scheduler.add_job(self._poll_worklist, "interval", id=WORKLIST_JOB,
                                seconds=section.poll_seconds, max_instances=1, coalesce=True,
                                next_run_time=datetime.now(UTC))

    def reconfigure(self, config: Config) -> None:
        interval = config.completion.sweep_interval_seconds
        if interval != self.config.completion.sweep_interval_seconds:
            self._scheduler.reschedule_job("completion_sweep", trigger="interval",
                                           seconds=interval)
        self._reconfigure_retention(_retention(self.config), _retention(config))
        old, new = _worklist(self.config), _worklist(config)
        self.config = config  # the next poll reads the new section
        if old is None and new is not None:
            self._add_worklist_job(new)
            log.info("worklist_poll_scheduled", ae_title=new.ae_title,
                     poll_seconds=new.poll_seconds)
        elif old is not None and new is None:
            self._scheduler.remove_job(WORKLIST_JOB)
            log.info("worklist_poll_stopped")
        elif old is not None and new is not None and old != new:
            # A changed RIS address or filter is queried at once, then every poll_seconds.
            self._scheduler.reschedule_job(WORKLIST_JOB, trigger="interval",
                                           seconds=new.poll_seconds)
            self._scheduler.modify_job(WORKLIST_JOB, next_run_time=datetime.now(UTC))
            log.info("worklist_poll_rescheduled", ae_title=new.ae_title,
                     poll_seconds=new.poll_seconds)

    def _reconfigure_retention(self, old: RetentionSection | None,
                               new: RetentionSection | None) -> None:
        if old is None and new is not None:
            self._add_retention_job(new, RETENTION_FIRST_DELAY_SECONDS)
            log.info("retention_scheduled", interval_minutes=new.interval_minutes,
                     keep_days=new.keep_days, keep_failed_days=new.keep_failed_days,
                     min_free_gb=new.min_free_gb)
        elif old is not None and new is None:
            self._scheduler.remove_job(RETENTION_JOB)
            log.info("retention_stopped")
        elif old is not None and new is not None and old.interval_minutes != new.interval_minutes:
            self._scheduler.reschedule_job(RETENTION_JOB, trigger="interval",
                                           minutes=new.interval_minutes)

    def worklist_poll_seconds(self) -> float | None:
        """The worklist poll's interval; None when no poll is scheduled."""
        job = self._scheduler.get_job(WORKLIST_JOB)
        return None if job is None else float(job.trigger.interval.total_seconds())

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self.retention.stop()  # a pass waiting out its 35 s grace must not hold the shutdown
        self._scheduler.shutdown(wait=True)
