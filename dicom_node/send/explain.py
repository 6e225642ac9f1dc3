"""Why an association the node opened failed, in words an administrator can act on.

pynetdicom reports a refused connection, a failed TLS handshake, a rejection or a timeout only in
its own log records, and ``associate()`` returns an association that is simply not established.
:data:`peer_logs` (a :class:`logging.Filter` on pynetdicom's loggers) takes those records of one
association out of the log and hands them to its caller (:meth:`PeerLogs.watch`), and
:func:`association_failure` turns them, with the peer's A-ASSOCIATE-RJ if it sent one, into the
reason: "cannot connect: [Errno 111] Connection refused", "association rejected (…: calling AE
title not recognised)", "no answer to the association request within 30 s", … The caller puts it
in its own error (a job's last error, the worklist outage), so it is logged once, by the node.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

#: How long a caller waits for its association's threads to end, so that their last log
#: records are still caught by its watch.
JOIN_SECONDS = 2.0


@dataclass
class Watch:
    ae: AE
    caller: threading.Thread
    messages: list[str] = field(default_factory=list)


class PeerLogs(logging.Filter):
    """Keeps pynetdicom's records about a watched association out of the log, for its caller.

    Records are told apart by the thread that emits them: the caller's thread, or the
    association's and its DUL's threads (whose ``ae`` is the watched AE). Every other record (the
    receiver's associations, other workers' threads) passes untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._watches: list[Watch] = []
        self._installed_on: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._watches:
            return True
        thread = threading.current_thread()
        assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
        ae = getattr(assoc, "ae", None)
        with self._lock:
            for watch in self._watches:
                if thread is watch.caller or (ae is not None and ae is watch.ae):
                    watch.messages.append(record.getMessage())
                    return False
        return True

    @contextlib.contextmanager
    def watch(self, ae: AE) -> Iterator[Watch]:
        """Collect the records of ``ae``'s associations (and of the calling thread)."""
        self._install()
        entry = Watch(ae, threading.current_thread())
        with self._lock:
            self._watches.append(entry)
        try:
            yield entry
        finally:
            with self._lock:
                self._watches.remove(entry)

    def _install(self) -> None:
        """On every pynetdicom logger: a logger's filters see only its own records."""
        names = [name for name in list(logging.root.manager.loggerDict)
                 if name == "pynetdicom" or name.startswith("pynetdicom.")]
        for name in names:
            if name not in self._installed_on:
                logging.getLogger(name).addFilter(self)
                self._installed_on.add(name)


peer_logs = PeerLogs()


def detail(messages: list[str], prefix: str) -> str | None:
    """The rest of the first message starting with ``prefix``."""
    for message in messages:
        if message.startswith(prefix):
            return message.removeprefix(prefix).strip()
    return None


def join(assoc: Association) -> None:
    """Wait (briefly) for the association's threads to end."""
    for thread in (assoc, assoc.dul):
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=JOIN_SECONDS)


def rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ, if it sent one.

    A peer that closes the connection right after its A-ASSOCIATE-RJ (wlmscpfs does) can win a
    race in pynetdicom 3.0: the transport is seen closed before the rejection is read, the
    association counts as aborted, and the rejection stays unread in the DUL's queue."""
    candidates = (assoc.acceptor.primitive, assoc.dul.peek_next_pdu())
    for primitive in candidates:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            return primitive
    return None


def association_failure(assoc: Association, connected: bool, messages: list[str],
                        timeout: float, service: str) -> str:
    """Why ``assoc`` was not established; ``connected``: whether the TCP connection opened
    (EVT_CONN_OPEN); ``service``: what was asked for, for "… was not accepted"."""
    if not connected:
        cause = (detail(messages, "TCP Initialisation Error:")
                 or detail(messages, "Association request failed: unable to connect to remote")
                 or "no connection")
        return f"cannot connect: {cause}"
    rejected = rejection(assoc)
    if rejected is not None:
        return (f"association rejected ({rejected.result_str} by {rejected.source_str}: "
                f"{rejected.reason_str})")
    if assoc.is_rejected:
        return "association rejected"
    if any(m.startswith("ACSE timeout") for m in messages):
        return f"no answer to the association request within {timeout:g} s"
    if any(m.startswith("No accepted presentation contexts") for m in messages):
        return f"{service} was not accepted"
    last = f" ({messages[-1]})" if messages else ""
    return f"association aborted while it was negotiated{last}"


def is_outage(reason: str) -> bool:
    """Whether a reason from :func:`association_failure` means the destination could not be
    reached (refused or timed-out connection, TLS handshake, rejection, abort: an outage to wait
    out), rather than that it answered and accepted none of what was asked for (a refusal of
    the objects, like a failure status)."""
    return not reason.endswith(" was not accepted")
