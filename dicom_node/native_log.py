"""What native libraries write straight to file descriptor 2, turned into JSON log events.

TensorFlow's C++ core logs through absl, which writes to fd 2 below Python: ``import tensorflow``
prints ``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR``
and ``I0000 00:00:… port.cc:153] oneDNN custom operations are on …`` whatever
``TF_CPP_MIN_LOG_LEVEL`` says (TensorFlow 2.21), and more lines when it finds a GPU. Those lines
bypass structlog, so a worker's log would not be JSON only.

:func:`native_stderr_as_events` points fd 2 at a temporary file while such a library starts
(import and device set-up: where it prints), then puts fd 2 back and writes each captured line out
again: a line that is already JSON (a structlog event of another thread in the meantime) as it
is, any other line as one ``library_output`` event (``library``, ``text``, and ``source`` — the
C++ file and line — when the line has absl's prefix; the level from that prefix: I info, W
warning, E error, F critical; ``WARNING: …`` and the like by their word, absl's notice that it
writes to stderr at debug; any other line continues the one before it). The window
is bounded by the caller; a process that dies inside it loses what it captured, as it would lose
an unflushed buffer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from dicom_node.log import get_logger

log = get_logger()

#: absl's prefix: severity letter, MMDD, time, thread id, file:line]
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}
#: absl before its initialisation, and Python-style prefixes: "WARNING: …"
_WORD = re.compile(r"^(INFO|WARNING|ERROR|FATAL): (.*)$")
_WORD_LEVELS = {"INFO": "info", "WARNING": "warning", "ERROR": "error", "FATAL": "critical"}
#: absl's notice that it logs to stderr until initialised: says nothing to an administrator.
_NOISE = "All log messages before absl::InitializeLog() is called are written to STDERR"


@contextlib.contextmanager
def native_stderr_as_events(library: str) -> Iterator[None]:
    """While the block runs, what anything writes to fd 2 is held; then it is logged as JSON."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all (a daemon without stderr): nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            _emit(library, held.read().decode("utf-8", errors="replace"))


def _emit(library: str, text: str) -> None:
    pending: tuple[str, str | None, list[str]] | None = None  # level, source, lines

    def flush() -> None:
        if pending is not None:
            level, source, lines = pending
            fields = {"source": source} if source else {}
            getattr(log, level)("library_output", library=library, text="\n".join(lines),
                                **fields)

    for line in text.splitlines():
        if not line.strip():
            continue
        if _is_json(line):
            flush()
            pending = None
            sys.stderr.write(line + "\n")
            continue
        match = _ABSL.match(line)
        word = _WORD.match(line)
        if match is not None:
            flush()
            pending = (_LEVELS[match.group(1)], match.group(2), [match.group(3)])
        elif word is not None:
            flush()
            level = "debug" if word.group(2) == _NOISE else _WORD_LEVELS[word.group(1)]
            pending = (level, None, [word.group(2)])
        elif pending is not None:
            pending[2].append(line)
        else:
            pending = ("info", None, [line])
    flush()
    sys.stderr.flush()


def _is_json(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
