"""Bounded resources per peer: a cap on connections at accept time, and a bounded PDU read.

pynetdicom 3.0 accepts every TCP connection and gives it a thread before any association is
negotiated (``max_associations`` is checked only when the A-ASSOCIATE-RQ arrives), and reads a
PDU by trusting its length field: a peer announcing a 4 GB PDU makes it buffer 4 GB, and one that
sends a byte every few seconds keeps a read going forever, because the socket timeout applies to
each ``recv`` (pynetdicom only advertises the maximum PDU length; its issue #1086). This module
closes those holes for the receiver:

- :func:`cap_connections` refuses a TCP connection at accept time (the socket is closed before a
  thread is started) when ``node.max_connections`` are open, on the plain and the TLS listener
  together (a TLS connection still in its handshake counts);
- :func:`install_bounded_reads` replaces ``AssociationSocket.recv`` with a read that refuses a
  PDU longer than the limit and gives the whole PDU one deadline (``network_timeout_seconds``),
  reading into one pre-sized buffer in large chunks (fewer system calls than pynetdicom's 4 KB
  loop). A refused read raises ``OSError``, which pynetdicom turns into "transport connection
  closed" (Evt17): the association is aborted and its thread ends.

The patch is process-wide and installed by the receiver process only; ``tests/test_limits.py``
fails if a pynetdicom upgrade changes the method it replaces (pynetdicom is pinned ``<4``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pynetdicom.transport

from dicom_node.log import get_logger

log = get_logger()

#: A-ASSOCIATE PDUs are not bound by the negotiated maximum; this covers 128 presentation
#: contexts with many transfer syntaxes each.
MIN_READ_LIMIT = 1 << 20
#: The limit when ``max_pdu_bytes = 0`` (unlimited P-DATA): still not 4 GB.
UNLIMITED_READ_LIMIT = 64 << 20
#: Largest single recv_into.
CHUNK = 1 << 20


@dataclass
class ReadLimits:
    max_bytes: int = MIN_READ_LIMIT
    deadline_seconds: float = 60.0
    #: Told the reason ("pdu_too_long", "pdu_read_timeout") of each refused read (counters).
    on_refused: Callable[[str], None] | None = None


_limits = ReadLimits()
_original_recv = pynetdicom.transport.AssociationSocket.recv


def read_limit(max_pdu_bytes: int) -> int:
    """Largest PDU body the receiver reads, from the advertised maximum PDU length."""
    if max_pdu_bytes == 0:
        return UNLIMITED_READ_LIMIT
    return max(max_pdu_bytes + 1024, MIN_READ_LIMIT)


def _bounded_recv(self: Any, nr_bytes: int) -> bytearray:
    sock: socket.socket = self.socket
    if nr_bytes > _limits.max_bytes:
        log.warning("pdu_refused", reason=f"announced length {nr_bytes} exceeds the limit "
                    f"{_limits.max_bytes}", peer=_peer(sock))
        _refused("pdu_too_long")
        raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {_limits.max_bytes}")
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    deadline = time.monotonic() + _limits.deadline_seconds
    previous_timeout = sock.gettimeout()
    try:
        while received < nr_bytes:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining if previous_timeout is None
                                else min(remaining, previous_timeout))
                count = sock.recv_into(view[received:], min(nr_bytes - received, CHUNK))
            except TimeoutError:  # the deadline, or the socket's idle timeout, came first
                log.warning("pdu_read_timeout", peer=_peer(sock), received=received,
                            expected=nr_bytes, deadline_seconds=_limits.deadline_seconds)
                _refused("pdu_read_timeout")
                raise TimeoutError(
                    f"PDU not received within {_limits.deadline_seconds} s") from None
            if count == 0:  # the peer closed the connection
                return buffer[:received]
            received += count
    finally:
        view.release()
        sock.settimeout(previous_timeout)
    return buffer


def _refused(reason: str) -> None:
    if _limits.on_refused is not None:
        _limits.on_refused(reason)


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def install_bounded_reads(max_pdu_bytes: int, deadline_seconds: float,
                          on_refused: Callable[[str], None] | None = None) -> None:
    """Route every association socket read of this process through :func:`_bounded_recv`;
    ``on_refused`` (kept until replaced) is told the reason of each refused read."""
    _limits.max_bytes = read_limit(max_pdu_bytes)
    _limits.deadline_seconds = deadline_seconds
    if on_refused is not None:
        _limits.on_refused = on_refused
    pynetdicom.transport.AssociationSocket.recv = _bounded_recv  # type: ignore[method-assign]


def uninstall_bounded_reads() -> None:
    pynetdicom.transport.AssociationSocket.recv = _original_recv  # type: ignore[method-assign]


class ConnectionCap:
    """``socketserver`` ``verify_request`` hook: refuse a connection when ``limit`` are open.

    Open connections are counted from the server's live acceptor threads at each accept, so the
    count cannot drift, whatever way a connection ended."""

    def __init__(self, limit: int, count_open: Callable[[], int],
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self._count_open = count_open
        self._on_refused = on_refused

    def verify(self, _request: Any, client_address: Any) -> bool:
        open_now = self._count_open()
        if open_now < self.limit:
            return True
        log.warning("connection_refused", peer=str(client_address[0]), open=open_now,
                    reason=f"{self.limit} connections already open (node.max_connections)")
        if self._on_refused is not None:
            self._on_refused("connection_cap")
        return False


def _open_connections(server: Any) -> int:
    """A server's open connections: its associations' threads, and (a TLS server) the
    connections still in their handshake, which have no association thread yet."""
    return len(server.active_associations) + int(getattr(server, "handshakes_in_progress", 0))


def cap_connections(servers: Sequence[Any], limit: int,
                    on_refused: Callable[[str], None] | None = None) -> ConnectionCap:
    """Install one cap, shared by the receiver's listeners (plain and TLS), on each of its
    pynetdicom AssociationServers (socketserver.TCPServers)."""
    cap = ConnectionCap(limit, lambda: sum(_open_connections(s) for s in servers), on_refused)
    for server in servers:
        server.verify_request = cap.verify
    return cap
