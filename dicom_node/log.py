"""structlog set-up: JSON lines in deployment, a readable console in a terminal.

Events are snake_case facts (``instance_stored``, ``job_failed``) bound with study, job and model
context. UIDs may be logged; patient names, patient IDs and other identifying text never: the
:func:`drop_identifying_keys` processor removes any such key that slips into an event.

Nothing else reaches stderr as plain text once :func:`configure_logging` has run: the stdlib
loggers (pynetdicom's, with their tracebacks) and Python's warnings (pydicom's) are rendered by the
same renderer, and an exception nobody catches (in any thread, the main one included) becomes
one ``thread_crashed`` event with the traceback as a field, where Python would print it: a
pynetdicom reactor thread that dies is one JSON line, not twenty lines of traceback. An exception
Python can only ignore (raised in a finaliser) becomes ``exception_ignored``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from types import TracebackType
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
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # pynetdicom's own per-message logging would repeat identifiers (it dumps datasets at debug).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom's warnings (an odd element in a received data set) as py.warnings log events
    logging.captureWarnings(True)
    install_crash_hooks()


#: The hooks found when :func:`install_crash_hooks` replaced them (a test runner's, a debugger's).
_previous_hooks: dict[str, Any] = {}


def install_crash_hooks() -> None:
    """Log an uncaught exception (``threading.excepthook``, ``sys.excepthook``) and one Python
    ignores (``sys.unraisablehook``) as one event each, instead of a traceback on stderr.

    A hook someone installed before (pytest's, which fails the test that let a thread die) is
    still called after the event; Python's own default, which prints, is not."""
    for name, owner, hook in (("thread", threading, _thread_crashed),
                              ("main", sys, _main_crashed),
                              ("unraisable", sys, _exception_ignored)):
        attribute = "excepthook" if name != "unraisable" else "unraisablehook"
        current = getattr(owner, attribute)
        if current is not hook:
            _previous_hooks[name] = current
            setattr(owner, attribute, hook)


def _exception_fields(exc_type: type[BaseException], exc: BaseException | None,
                      tb: TracebackType | None) -> dict[str, Any]:
    """The exception's type and message as fields of their own, and its traceback as the
    ``exception`` field (format_exc_info; the console renderer prints it as a traceback)."""
    return {"exc_type": exc_type.__qualname__, "exc_message": str(exc),
            "exc_info": (exc_type, exc, tb)}


def _chain(name: str, default: Any, *args: Any) -> None:
    previous = _previous_hooks.get(name)
    if previous is not None and previous is not default:
        previous(*args)


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # what threading's own hook ignores, too
        return
    try:
        get_logger().error("thread_crashed", thread=getattr(args.thread, "name", "<unknown>"),
                           **_exception_fields(args.exc_type, args.exc_value, args.exc_traceback))
    except Exception:  # logging itself failed: Python's own hook still tells someone
        threading.__excepthook__(args)
    _chain("thread", threading.__excepthook__, args)


def _main_crashed(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    try:
        get_logger().error("thread_crashed", thread=threading.current_thread().name,
                           **_exception_fields(exc_type, exc, tb))
    except Exception:
        sys.__excepthook__(exc_type, exc, tb)
    _chain("main", sys.__excepthook__, exc_type, exc, tb)


def _exception_ignored(args: Any) -> None:
    """sys.unraisablehook: an exception in a finaliser or a garbage-collected generator.
    The object is named by its type only (its repr could hold a data set's values)."""
    try:
        get_logger().warning(
            "exception_ignored", reason=args.err_msg or "Exception ignored in",
            object_type=type(args.object).__qualname__,
            **_exception_fields(args.exc_type, args.exc_value, args.exc_traceback))
    except Exception:
        sys.__unraisablehook__(args)
    _chain("unraisable", sys.__unraisablehook__, args)


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
