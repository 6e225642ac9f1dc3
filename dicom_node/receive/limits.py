"""Bounded resources per peer: admission of connections at accept time, a deadline for the
association request, and a bounded PDU read.

pynetdicom 3.0 accepts every TCP connection and gives it a thread before any association is
negotiated (``max_associations`` is checked only when the A-ASSOCIATE-RQ arrives), and reads a
PDU by trusting its length field: a peer announcing a 4 GB PDU makes it buffer 4 GB, and one that
sends a byte every few seconds keeps a read going forever, because the socket timeout applies to
each ``recv`` (pynetdicom only advertises the maximum PDU length; its issue #1086). Its ARTIM
timer (PS3.8 9.1.5: started at the transport connection, stopped when the A-ASSOCIATE-RQ has
arrived; pynetdicom sets it to ``acse_timeout``) is checked only between two reads, so a request
that trickles in is never cut by it either, and the acceptor thread waits ``acse_timeout`` for
the request even after the connection closed. This module closes those holes for the receiver:

- :class:`ConnectionCap` decides at accept time (``socketserver``'s ``verify_request``, before a
  thread is started), for the plain and the TLS listener together, and tracks every connection
  it lets in until its socket closes or its association thread ends (it also gives the
  listeners a listen backlog that a burst of connections does not overflow):

  - at most ``node.max_connections_per_host`` connections from one remote address, and at most
    ``node.max_connections`` in all (a TLS connection still in its handshake counts);
  - a new connection over a cap *evicts* the oldest connection of that cap's scope (the host's,
    or all) that is still negotiating (no A-ASSOCIATE-RQ received yet: TLS handshake, or a
    request not complete) and has been for :data:`EVICTABLE_AFTER_S` at least: its socket is
    shut down so that its threads end at once (the acceptor thread's wait for the request is
    ended too). When there is none (every connection in scope an association, never evicted,
    or just accepted), the new one is closed at accept time. A crowd from one host can thus hold
    no more than its own share, and it evicts its own connections, not another host's;
  - ``node.max_associations`` counts associations only (:class:`ReceiverAE`): pynetdicom counts
    every acceptor thread, so connections still negotiating would make it reject a legitimate
    A-ASSOCIATE-RQ ("local limit exceeded") while they hold no association;
  - the association request deadline, ``node.association_request_timeout_seconds`` (PS3.8's
    ARTIM timer for the request): from accept (DICOM TLS: from the end of the handshake) until
    the whole A-ASSOCIATE-RQ is read. The bounded read below applies it to the first PDU, and
    pynetdicom's own ARTIM timer and the acceptor thread's wait for the request are set to it
    (a peer that sends nothing at all). A peer that misses it is dropped with one log event,
    ``association_request_timeout``.

- :func:`install_bounded_reads` replaces ``AssociationSocket.recv`` with a read that refuses a
  PDU longer than the limit and gives the whole PDU one deadline (``network_timeout_seconds``;
  for the A-ASSOCIATE-RQ, the earlier of that and the request deadline), reading into one
  pre-sized buffer in large chunks (fewer system calls than pynetdicom's 4 KB loop). A refused
  read raises ``OSError``, which pynetdicom turns into "transport connection closed" (Evt17): the
  association is aborted and its thread ends.

The patch is process-wide and installed by the receiver process only; ``tests/test_limits.py``
fails if a pynetdicom upgrade changes the methods it replaces or relies on (pynetdicom is pinned
``<4``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pynetdicom.transport
from pynetdicom import AE, evt

from dicom_node.log import get_logger

log = get_logger()

#: A-ASSOCIATE PDUs are not bound by the negotiated maximum; this covers 128 presentation
#: contexts with many transfer syntaxes each.
MIN_READ_LIMIT = 1 << 20
#: The limit when ``max_pdu_bytes = 0`` (unlimited P-DATA): still not 4 GB.
UNLIMITED_READ_LIMIT = 64 << 20
#: Largest single recv_into.
CHUNK = 1 << 20
#: A connection negotiating for less than this is not evicted. A legitimate peer sends its
#: A-ASSOCIATE-RQ within milliseconds of connecting (a TLS handshake within a few hundred), while
#: each connection let in costs the receiver pynetdicom's set-up of its association, 25-75 ms
#: on a loaded 2-core machine (measured; it deep-copies the AE's 170 presentation contexts). So
#: a flood of connections from one host makes the receiver evict, and set up, at most the
#: host's share per second; the rest are closed at accept time at almost no cost.
EVICTABLE_AFTER_S = 1.0
#: Connections the kernel completes and queues until the receiver accepts them (the listen
#: backlog). socketserver's default of 5 makes a burst of connections overflow it: the kernel
#: then drops SYNs, and a peer whose SYN was dropped (a legitimate one too) tries again only
#: after 1 s, then 3 s (measured: a burst of 300 took 45 s to connect, 44 s of it such waits).
LISTEN_BACKLOG = 512


@dataclass
class ReadLimits:
    max_bytes: int = MIN_READ_LIMIT
    deadline_seconds: float = 60.0
    #: Told the reason ("pdu_too_long", "pdu_read_timeout", "association_request_timeout") of
    #: each refused read (counters).
    on_refused: Callable[[str], None] | None = None


@dataclass(frozen=True)
class _Request:
    """An A-ASSOCIATE-RQ still awaited: when it must have arrived (monotonic), and the limit."""

    deadline: float
    seconds: float


_limits = ReadLimits()
_original_recv = pynetdicom.transport.AssociationSocket.recv
#: Acceptor associations whose A-ASSOCIATE-RQ has not arrived yet (set by ConnectionCap).
_requests: weakref.WeakKeyDictionary[Any, _Request] = weakref.WeakKeyDictionary()


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
    # The first PDU of a connection (the A-ASSOCIATE-RQ) has the request's deadline too.
    request = _requests.get(self.assoc)
    if request is not None and request.deadline < deadline:
        deadline = request.deadline
    else:
        request = None
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
            except TimeoutError:  # a deadline, or the socket's idle timeout, came first
                raise _timed_out(self, request, received, nr_bytes) from None
            if count == 0:  # the peer closed the connection
                return buffer[:received]
            received += count
    finally:
        view.release()
        sock.settimeout(previous_timeout)
    return buffer


def _timed_out(assoc_socket: Any, request: _Request | None, received: int,
               expected: int) -> TimeoutError:
    """Log and count a read cut off at its deadline; the error to raise."""
    peer = _peer(assoc_socket.socket)
    if request is not None and _requests.pop(assoc_socket.assoc, None) is not None:
        log.warning("association_request_timeout", peer=peer, received=received,
                    expected=expected, deadline_seconds=request.seconds)
        _refused("association_request_timeout")
        return TimeoutError(f"A-ASSOCIATE-RQ not received within {request.seconds} s")
    log.warning("pdu_read_timeout", peer=peer, received=received, expected=expected,
                deadline_seconds=_limits.deadline_seconds)
    _refused("pdu_read_timeout")
    return TimeoutError(f"PDU not received within {_limits.deadline_seconds} s")


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


@dataclass(eq=False)
class _Connection:
    """One connection the cap let in, from accept until its socket closes."""

    host: str
    #: When it was accepted (monotonic): the oldest still negotiating is evicted first.
    accepted: float
    #: pynetdicom's Association for it, once made (after the TLS handshake on the TLS port).
    association: weakref.ref[Any] | None = None
    #: Its A-ASSOCIATE-RQ arrived: an association now, never evicted.
    requested: bool = False
    #: Evicted: its socket is shut down and its threads are ending.
    dropped: bool = False

    def counts(self, sock: socket.socket) -> bool:
        """Whether it still holds a slot: open, not evicted, its association (if any) running."""
        if self.dropped or sock.fileno() < 0:
            return False
        if self.association is None:
            return True  # accepted, in its TLS handshake, or its association being made
        assoc = self.association()
        return assoc is not None and (assoc.ident is None or assoc.is_alive())


def _association_socket(assoc: Any) -> socket.socket | None:
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


def _end_request_wait(assoc: Any) -> None:
    """Wake the acceptor thread waiting for the A-ASSOCIATE-RQ: pynetdicom's
    ``Association.run_reactor`` takes ``None`` for "no request in time" and ends."""
    assoc.dul.to_user_queue.put(None)


class ConnectionCap:
    """Admission at accept time and the association request deadline, shared by the receiver's
    listeners (plain and TLS): see the module docstring. ``limit``, ``per_host_limit`` and
    ``request_seconds`` may be changed while it runs (a reload)."""

    def __init__(self, limit: int, per_host_limit: int, request_seconds: float,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self.per_host_limit = per_host_limit
        self.request_seconds = request_seconds
        self._on_refused = on_refused
        # Keyed by the accepted socket (the SSLSocket on the TLS port), which pynetdicom's
        # Association reads from: an entry goes with its socket.
        self._connections: weakref.WeakKeyDictionary[socket.socket, _Connection] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    @property
    def handlers(self) -> list[tuple[evt.NotificationEvent, Callable[[Any], None]]]:
        """pynetdicom event handlers the listeners must be started with."""
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_REQUESTED, self._requested),
                (evt.EVT_CONN_CLOSE, self._closed)]

    def install(self, servers: Sequence[Any]) -> None:
        """Admit through this cap on each pynetdicom AssociationServer (socketserver.TCPServer),
        with a listen backlog of :data:`LISTEN_BACKLOG` (listen() again sets it on Linux)."""
        for server in servers:
            server.verify_request = self.verify
            server.socket.listen(LISTEN_BACKLOG)

    def open_connections(self) -> int:
        """Connections holding a slot now."""
        with self._lock:
            return len(self._live())

    def _live(self) -> list[tuple[socket.socket, _Connection]]:
        live = []
        for sock, connection in list(self._connections.items()):
            if sock.fileno() < 0:
                self._connections.pop(sock, None)
            elif connection.counts(sock):
                live.append((sock, connection))
        return live

    def verify(self, request: Any, client_address: Any) -> bool:
        """``verify_request``: let the connection in, evicting one still negotiating if a cap is
        reached, or refuse it (socketserver then closes it)."""
        host = str(client_address[0])
        with self._lock:
            live = self._live()
            from_host = [item for item in live if item[1].host == host]
            if len(from_host) >= self.per_host_limit:
                scope, key, limit = from_host, "node.max_connections_per_host", self.per_host_limit
            elif len(live) >= self.limit:
                scope, key, limit = live, "node.max_connections", self.limit
            else:
                scope = []
            if scope:
                now = time.monotonic()
                negotiating = [item for item in scope if not item[1].requested
                               and now - item[1].accepted >= EVICTABLE_AFTER_S]
                if not negotiating:
                    log.warning("connection_refused", peer=host, open=len(live),
                                from_host=len(from_host),
                                reason=f"{limit} connections already open ({key}), all of them "
                                       f"associations or younger than {EVICTABLE_AFTER_S} s")
                    self._count("connection_cap")
                    return False
                self._evict(*min(negotiating, key=lambda item: item[1].accepted), host, key)
            self._connections[request] = _Connection(host, time.monotonic())
        return True

    def _evict(self, sock: socket.socket, connection: _Connection, newcomer: str,
               key: str) -> None:
        connection.dropped = True
        assoc = connection.association() if connection.association is not None else None
        if assoc is not None:
            _requests.pop(assoc, None)
        log.warning("connection_evicted", peer=connection.host, for_peer=newcomer,
                    negotiating_seconds=round(time.monotonic() - connection.accepted, 3),
                    reason=f"{key} reached; the oldest connection still negotiating makes room")
        self._count("evicted")
        # socket.socket's shutdown (an SSLSocket's would drop the SSL object under a handshake
        # running in the connection's thread): a blocked read returns at once.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if assoc is not None:
            _end_request_wait(assoc)

    def _count(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)

    def _opened(self, event: Any) -> None:
        """EVT_CONN_OPEN (the connection's thread, before the association's): start the
        request clock, and set pynetdicom's ARTIM timer and its wait for the request to it."""
        assoc = event.assoc
        sock = _association_socket(assoc)
        connection = self._connections.get(sock) if sock is not None else None
        if connection is not None:
            connection.association = weakref.ref(assoc)
            if connection.dropped:  # evicted before its association was made
                _end_request_wait(assoc)
                return
        # From accept; on the TLS port from now, the end of the handshake.
        start = (connection.accepted if connection is not None
                 and not isinstance(sock, ssl.SSLSocket) else time.monotonic())
        _requests[assoc] = _Request(start + self.request_seconds, self.request_seconds)
        assoc.acse_timeout = self.request_seconds

    def _requested(self, event: Any) -> None:
        """EVT_REQUESTED (the A-ASSOCIATE-RQ arrived): an association now, never evicted; the
        ACSE timeout is the AE's again for the rest of the association."""
        assoc = event.assoc
        _requests.pop(assoc, None)
        sock = _association_socket(assoc)
        connection = self._connections.get(sock) if sock is not None else None
        if connection is not None:
            with self._lock:  # not while verify() picks a connection to evict
                connection.requested = True
        assoc.acse_timeout = assoc.ae.acse_timeout

    def _closed(self, event: Any) -> None:
        """EVT_CONN_CLOSE: a connection closed by pynetdicom's ARTIM timer (a peer that sent no
        request at all) is logged and counted as the bounded read does a trickling one."""
        request = _requests.pop(event.assoc, None)
        if request is not None and time.monotonic() >= request.deadline:
            log.warning("association_request_timeout", peer=event.assoc.requestor.address,
                        received=0, deadline_seconds=request.seconds)
            self._count("association_request_timeout")

    def reapply(self) -> None:
        """After ``AE.acse_timeout`` was set (a reload), which pynetdicom applies to every running
        association: the connections still negotiating get the request deadline back."""
        for sock, connection in list(self._connections.items()):
            assoc = connection.association() if connection.association is not None else None
            if assoc is not None and not connection.requested and connection.counts(sock):
                assoc.acse_timeout = self.request_seconds

    def not_associated(self, associations: Sequence[Any]) -> int:
        """How many of these running associations have not received their A-ASSOCIATE-RQ (or
        are ending after an eviction)."""
        count = 0
        for assoc in associations:
            sock = _association_socket(assoc)
            connection = self._connections.get(sock) if sock is not None else None
            if connection is None or connection.dropped or not connection.requested:
                count += 1
        return count


class ReceiverAE(AE):
    """pynetdicom's AE whose ``maximum_associations`` counts associations, not connections.

    pynetdicom rejects an A-ASSOCIATE-RQ when more acceptor threads than
    ``maximum_associations`` run, counting those of connections still negotiating and of
    connections ending: a crowd of slow connections, each well within the connection caps, would
    fill ``node.max_associations`` and have every legitimate request rejected. The limit it
    compares with is therefore raised by the acceptor threads that :attr:`cap` knows hold no
    association (read at each check; the configured value is :attr:`associations_limit`)."""

    cap: ConnectionCap | None = None

    @property
    def maximum_associations(self) -> int:
        limit = self._maximum_associations
        if self.cap is None:
            return limit
        acceptors = [a for a in self.active_associations if a.is_acceptor]
        return limit + self.cap.not_associated(acceptors)

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        inherited: property = vars(AE)["maximum_associations"]
        assert inherited.fset is not None
        inherited.fset(self, value)

    @property
    def associations_limit(self) -> int:
        """``node.max_associations``: simultaneous associations."""
        return self._maximum_associations
