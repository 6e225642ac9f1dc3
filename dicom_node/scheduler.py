"""APScheduler jobs of the receiver process: the completion sweep and the config watch."""

from __future__ import annotations

from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import complete
from dicom_node.config import Config
from dicom_node.log import get_logger

log = get_logger()

CONFIG_POLL_SECONDS = 2.0


class ReceiverScheduler:
    """Runs ``complete.sweep`` every ``completion.sweep_interval_seconds`` with the current
    config, and polls the config file for changes."""

    def __init__(self, config: Config, sessions: sessionmaker[Session],
                 check_config: Callable[[], object] | None = None) -> None:
        self.config = config
        self.sessions = sessions
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(self._sweep, "interval", id="completion_sweep",
                                seconds=config.completion.sweep_interval_seconds,
                                max_instances=1, coalesce=True)
        if check_config is not None:
            self._scheduler.add_job(check_config, "interval", id="config_watch",
                                    seconds=CONFIG_POLL_SECONDS, max_instances=1, coalesce=True)

    def _sweep(self) -> None:
        try:
            complete.sweep(self.config, self.sessions)
        except Exception:  # the next sweep retries; never kill the scheduler thread
            log.exception("completion_sweep_failed")

    def reconfigure(self, config: Config) -> None:
        interval = config.completion.sweep_interval_seconds
        if interval != self.config.completion.sweep_interval_seconds:
            self._scheduler.reschedule_job("completion_sweep", trigger="interval",
                                           seconds=interval)
        self.config = config

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)
