"""The receiver's DICOM TLS listener, with the handshake off the accept thread and on a deadline.

pynetdicom 3.0.4's ``AssociationServer.get_request`` wraps each accepted socket with
``ssl_context.wrap_socket(sock, server_side=True)`` on the thread that accepts connections, and
the accepted socket is blocking: a peer that connects and says nothing (a health-checker, a port
scanner, plain DICOM that waits for the server to speak) stalls the handshake, and with it every
later connection, forever. :class:`TlsAssociationServer` instead

- wraps at accept time with ``do_handshake_on_connect=False`` (no I/O on the accept thread);
- runs the handshake in the connection's own thread with one deadline for the whole handshake
  (``node.acse_timeout_seconds``, the time allowed for setting an association up); a failed or
  late handshake is logged (``tls_handshake_failed``: peer address, port, reason; at debug level
  when the peer only connected and closed, as TCP health checks do) and the connection closed;
  then the association starts as on a plain connection;
- leaves the connections still in their handshake to the connection cap
  (:mod:`dicom_node.receive.limits`), which counts them from accept, per host too, and may evict
  them for a new connection; the association request's deadline starts when the handshake ends;
- closes the connections still in their handshake when it shuts down, so that stopping the
  receiver does not wait for their deadline.

``ssl_context`` may be replaced while the server runs (a reloaded certificate): each connection
is wrapped with the context of the moment it was accepted.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, cast

from pynetdicom.ae import ApplicationEntity
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node import tls
from dicom_node.log import get_logger

log = get_logger()


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved to the connection's thread."""

    def __init__(self, *args: Any, handshake_timeout: float,
                 on_refused: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        self.handshake_timeout = handshake_timeout
        #: Told "tls_handshake" for each failed handshake but a bare connect-and-close.
        self.on_refused = on_refused
        self._handshaking: set[ssl.SSLSocket] = set()
        self._handshaking_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[ssl.SSLSocket, Any]:
        """Accept a connection and wrap it, without a handshake (no I/O here)."""
        listener, context = cast(socket.socket, self.socket), cast(ssl.SSLContext,
                                                                    self.ssl_context)
        raw, address = listener.accept()
        try:
            wrapped = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except Exception as exc:  # socketserver skips a connection on OSError, dies on others
            raw.close()
            raise OSError(f"cannot wrap the connection for TLS: {exc}") from exc
        return wrapped, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the accept thread: count the connection, then start its thread."""
        with self._handshaking_lock:
            self._handshaking.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread could be started
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread: the handshake, then pynetdicom's association."""
        try:
            if self._handshake(request, client_address):
                super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _handshake(self, sock: ssl.SSLSocket, client_address: Any) -> bool:
        timeout = self.handshake_timeout
        try:
            tls.handshake(sock, timeout)
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            # A peer that connects and closes (a TCP health check) is no one's problem: debug.
            probe = tls.closed_by_peer(exc)
            emit = log.debug if probe else log.warning
            emit("tls_handshake_failed", peer=str(client_address[0]),
                 port=self.server_address[1], reason=tls.handshake_failure(exc, timeout))
            if not probe and self.on_refused is not None:
                self.on_refused("tls_handshake")
            self.shutdown_request(sock)
            return False
        return True

    def _forget(self, sock: ssl.SSLSocket) -> None:
        with self._handshaking_lock:
            self._handshaking.discard(sock)

    def server_close(self) -> None:
        """Cut the handshakes still running (their threads end at once), then close."""
        with self._handshaking_lock:
            pending = list(self._handshaking)
        for sock in pending:
            # socket.socket's shutdown, not SSLSocket's: that one also drops the SSL object
            # under the handshake running in the connection's thread.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        super().server_close()


def start_tls_server(ae: ApplicationEntity, address: tuple[str, int],
                     context: ssl.SSLContext, handlers: list[Any],
                     handshake_timeout: float,
                     on_refused: Callable[[str], None] | None = None) -> TlsAssociationServer:
    """Start a :class:`TlsAssociationServer` for ``ae`` in its own thread, as
    ``AE.start_server(block=False)`` does for pynetdicom's own server class."""
    server = cast(TlsAssociationServer, ae.make_server(
        address, ssl_context=context, evt_handlers=handlers,
        server_class=TlsAssociationServer, handshake_timeout=handshake_timeout,
        on_refused=on_refused))
    thread = threading.Thread(target=make_target(server.serve_forever),
                              name=f"AcceptorServer@tls-{server.server_address[1]}",
                              daemon=True)
    thread.start()
    # AE.shutdown() and the server's own shutdown() look for it in this list.
    ae._servers.append(server)
    return server
