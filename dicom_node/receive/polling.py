"""Adaptive polling for pynetdicom's reactor threads: short sleeps while instances stream in.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever the
socket has no data, the association thread sleeps 1 ms before every look at its message queue.
On one association a sender waits for each C-STORE response before it sends the next instance, so
both sleeps sit on the critical path: ~1 ms of ~6 ms per instance (docs/performance.md). Shorter
sleeps everywhere would cost CPU on idle associations (4 idle associations: 21 % of a core at
1 ms, 129 % at 0.1 ms — measured), so the sleeps are shortened only for the threads of an
association that stored an instance in the last :data:`BUSY_WINDOW_S`; an idle association
falls back to pynetdicom's own delay.

Mechanism: the ``time`` name inside ``pynetdicom.dul`` and ``pynetdicom.association`` is replaced
by :class:`_ReactorClock`, which delegates everything to :mod:`time` except ``sleep``. This is
the only place the node reaches into pynetdicom; ``tests/test_polling.py`` fails if a pynetdicom
upgrade changes the loops it relies on (pynetdicom is pinned ``<4``).
"""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any

import pynetdicom.association
import pynetdicom.dul

#: Sleep of a busy association's reactor threads (pynetdicom's own: 1 ms).
BUSY_SLEEP_S = 0.0001
#: How long after its last stored instance an association counts as busy.
BUSY_WINDOW_S = 0.5

_busy_until: dict[int, float] = {}


class _ReactorClock:
    """Stands in for the ``time`` module inside pynetdicom's reactor modules."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        if _busy_until.get(threading.get_ident(), 0.0) > self._real.monotonic():
            seconds = min(seconds, BUSY_SLEEP_S)
        self._real.sleep(seconds)


def install() -> None:
    """Route pynetdicom's reactor sleeps through the adaptive clock (idempotent)."""
    for module in (pynetdicom.dul, pynetdicom.association):
        if not isinstance(module.time, _ReactorClock):
            module.time = _ReactorClock(time)  # type: ignore[attr-defined]


def mark_busy(assoc: Any) -> None:
    """Called per stored instance: the association's two reactor threads poll fast for a while."""
    until = time.monotonic() + BUSY_WINDOW_S
    _busy_until[threading.get_ident()] = until  # the association thread runs the handler
    dul_ident = getattr(assoc.dul, "ident", None)
    if dul_ident is not None:
        _busy_until[dul_ident] = until


def forget(assoc: Any) -> None:
    """Called when an association ends (thread idents are reused)."""
    for ident in (getattr(assoc, "ident", None), getattr(assoc.dul, "ident", None)):
        if ident is not None:
            _busy_until.pop(ident, None)
