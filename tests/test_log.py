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


#: A worker's start of TensorFlow: its C++ core writes absl lines straight to fd 2.
TENSORFLOW_START = """
import os, threading
os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
from dicom_node.log import configure_logging, get_logger
from dicom_node.infer import runtime

configure_logging("json", "debug", process="worker-1")
get_logger().info("worker_started")
runtime._keras()
import tensorflow as tf
tf.constant([1.0]) + 1.0
get_logger().info("worker_stopped")
"""


def test_tensorflows_native_start_up_lines_become_json_events() -> None:
    result = subprocess.run([sys.executable, "-c", TENSORFLOW_START], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]  # plain text fails
    native = [e for e in events if e["event"] == "library_output"]
    assert native, "TensorFlow printed nothing at start (oneDNN's notice expected on x86)"
    assert all(e["library"] == "tensorflow" and e["process"] == "worker-1" for e in native)
    onednn = [e for e in native if "oneDNN" in e["text"]]
    assert onednn and all(e["source"].startswith("port.cc:") for e in onednn)
    assert events[0]["event"] == "worker_started" and events[-1]["event"] == "worker_stopped"


def test_captured_lines_keep_json_events_and_group_continuations(
        capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.native_log import _emit

    with capture_logs() as logs:
        _emit("tensorflow", "\n".join([
            "WARNING: All log messages before absl::InitializeLog() is called are written to "
            "STDERR",
            "I0000 00:00:1796705125.360519   21201 cpu_feature_guard.cc:227] This TensorFlow "
            "binary is optimized",
            "To enable the following instructions: AVX2 FMA, rebuild TensorFlow.",
            '{"event": "lease_renewal_failed", "level": "warning"}',
            "E0000 00:00:1.0   7 cuda_dnn.cc:8] Unable to register cuDNN factory",
        ]))
    assert [(e["log_level"], e.get("source")) for e in logs] == [
        ("debug", None), ("info", "cpu_feature_guard.cc:227"), ("error", "cuda_dnn.cc:8")]
    assert logs[1]["text"].endswith("AVX2 FMA, rebuild TensorFlow.")
    assert capsys.readouterr().err == '{"event": "lease_renewal_failed", "level": "warning"}\n'
