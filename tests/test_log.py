"""Every line the node writes to stderr is one JSON object: its own events, the stdlib loggers'
(pynetdicom's tracebacks), Python's warnings, and what Python prints when an exception kills a
thread, the main one included, or is raised where it can only be ignored."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from dicom_node import log

#: Run in a fresh interpreter: the node's log set-up, then every way a library writes to stderr.
CRASHING_PROCESS = """
import logging, threading, warnings
from dicom_node.log import configure_logging, get_logger

configure_logging("json", "info", process="receiver")
get_logger().info("receiver_started")
try:
    {}["PatientName"]
except KeyError:
    logging.getLogger("pynetdicom.service_class").exception("Exception in handler")
warnings.warn("Invalid value for VR UI")

def reactor():
    raise OSError(28, "No space left on device")

thread = threading.Thread(target=reactor, name="Thread-4 (run_reactor)")
thread.start()
thread.join()

class Finalised:
    def __del__(self):
        raise ValueError("raised in a finaliser")

Finalised()
raise RuntimeError("the main thread dies")
"""


def test_uncaught_exceptions_in_any_thread_are_one_json_event_each() -> None:
    result = subprocess.run([sys.executable, "-c", CRASHING_PROCESS], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # fails on any plain-text line
    assert [e["event"] for e in events if e.get("logger") != "py.warnings"] == [
        "receiver_started", "Exception in handler", "thread_crashed", "exception_ignored",
        "thread_crashed"]
    assert all(e["process"] == "receiver" and e["timestamp"].endswith("Z") for e in events)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_name.setdefault(event["event"], []).append(event)
    reactor, main = by_name["thread_crashed"]
    assert reactor["level"] == "error"
    assert reactor["thread"] == "Thread-4 (run_reactor)"
    assert reactor["exc_type"] == "OSError"
    assert reactor["exc_message"] == "[Errno 28] No space left on device"
    assert reactor["exception"].startswith("Traceback (most recent call last):")
    assert "in reactor" in reactor["exception"]
    assert (main["thread"], main["exc_type"]) == ("MainThread", "RuntimeError")
    [ignored] = by_name["exception_ignored"]
    assert (ignored["exc_type"], ignored["level"]) == ("ValueError", "warning")
    [handler] = by_name["Exception in handler"]
    assert handler["logger"] == "pynetdicom.service_class"
    assert "KeyError: 'PatientName'" in handler["exception"]
    [warning] = [e for e in events if e.get("logger") == "py.warnings"]
    assert "Invalid value for VR UI" in warning["event"]


@pytest.fixture
def restored_hooks() -> Iterator[list[threading.ExceptHookArgs]]:
    """A hook installed before the node's (as pytest's own is), recording what it is given;
    the hooks in force before the test are put back after it."""
    saved = threading.excepthook, sys.excepthook, sys.unraisablehook, dict(log._previous_hooks)
    seen: list[threading.ExceptHookArgs] = []
    threading.excepthook = seen.append
    try:
        yield seen
    finally:
        threading.excepthook, sys.excepthook, sys.unraisablehook = saved[:3]
        log._previous_hooks.clear()
        log._previous_hooks.update(saved[3])


def test_a_thread_crash_is_logged_and_still_handed_to_the_hook_installed_before(
        restored_hooks: list[threading.ExceptHookArgs]) -> None:
    log.install_crash_hooks()
    log.install_crash_hooks()  # installing twice does not chain the node's hook to itself

    def fail() -> None:
        raise LookupError("no such association")

    with capture_logs() as logs:
        thread = threading.Thread(target=fail, name="reactor")
        thread.start()
        thread.join()
    [crashed] = [e for e in logs if e["event"] == "thread_crashed"]
    assert crashed["thread"] == "reactor" and crashed["exc_type"] == "LookupError"
    assert crashed["log_level"] == "error"
    [args] = restored_hooks
    assert args.exc_type is LookupError
