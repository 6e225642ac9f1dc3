"""structlog set-up: JSON lines in deployment, a readable console in a terminal.

Events are snake_case facts (``instance_stored``, ``job_failed``) bound with study, job and model
context. UIDs may be logged; patient names, patient IDs and other identifying text never: the
:func:`drop_identifying_keys` processor removes any such key that slips into an event.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

#: Event keys that could identify a patient; removed from every event before it is written.
IDENTIFYING_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "ReferringPhysicianName", "patient_name", "patient_id", "birth_date",
    "AccessionNumber", "accession", "accession_number", "IssuerOfPatientID",
})


def drop_identifying_keys(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: never let identifying attributes reach a log line."""
    for key in IDENTIFYING_KEYS.intersection(event_dict):
        del event_dict[key]
    return event_dict


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of each write (pytest swaps it per test;
    a file object bound once would be closed under the logger's feet)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    process: str | None = None,
) -> None:
    """Configure structlog (and route the stdlib loggers of pynetdicom & co. through it)."""
    stream = stream if stream is not None else _CurrentStderr()  # type: ignore[assignment]
    assert stream is not None
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_identifying_keys,
    ]
    if process:
        shared.insert(0, _add_process(process))
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs through the stdlib; keep its warnings and errors, as structured lines.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer, foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # pynetdicom's own per-message logging would repeat identifiers (it dumps datasets at debug).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _add_process(name: str) -> Any:
    def add(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict.setdefault("process", name)
        return event_dict

    return add


def get_logger(**context: Any) -> structlog.stdlib.BoundLogger:
    """A logger bound with the given context (study_uid=…, job_id=…)."""
    # A lazy proxy: modules create their loggers at import time, before configure_logging runs;
    # the proxy picks up the configuration in force when it first logs.
    logger: structlog.stdlib.BoundLogger = structlog.get_logger("dicom_node", **context)
    return logger
