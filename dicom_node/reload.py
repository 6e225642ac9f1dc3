"""Reload config.toml while running: on change (polled) and on SIGHUP.

A new file is validated first. A valid one is handed to ``apply`` and takes effect for the next
study; an invalid one is refused with the same message as ``dicom-node check-config`` and the last
good config keeps running.
"""

from __future__ import annotations

import hashlib
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger()


class ConfigWatcher:
    def __init__(self, config: Config, apply: Callable[[Config], None]) -> None:
        if config.source is None:
            raise ValueError("the config was not loaded from a file")
        self.path: Path = config.source
        self.current = config
        self._apply = apply
        self._digest = self._read_digest()
        self._lock = threading.Lock()

    def _read_digest(self) -> str:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def check(self, force: bool = False) -> bool:
        """Reload if the file changed (or when forced); True when a new config was applied."""
        with self._lock:
            digest = self._read_digest()
            if not force and digest == self._digest:
                return False
            self._digest = digest
            try:
                new = load_config(self.path)
            except ConfigError as exc:
                log.error("config_rejected", path=str(self.path), reason=str(exc),
                          action="keeping the last good config")
                return False
            self.current = new
            self._apply(new)
            log.info("config_reloaded", path=str(self.path), routes=len(new.routes),
                     models=len(new.models), destinations=len(new.destinations))
            return True

    def install_sighup(self) -> None:
        """Reload on SIGHUP (main thread only); the handler just hands off to a thread."""
        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            threading.Thread(target=self.check, kwargs={"force": True}, daemon=True).start()
        signal.signal(signal.SIGHUP, on_hup)
