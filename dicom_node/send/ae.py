"""The AE of the associations the node opens (results to destinations, ``echo``, the worklist
query): it closes their sockets when asked, TLS ones included.

pynetdicom 3.0.4 never closes the socket of a refused connection, nor of a TLS handshake that
failed (it shuts the socket down, which fails on a socket that is not connected, and drops it):
every attempt to reach a peer that is down, or that refuses the node's certificate, would leave
a socket to the garbage collector and a ResourceWarning. The socket is caught here as it is
created (``AE._create_socket``) and closed by :meth:`ClientAE.close_sockets`.

With TLS the socket is wrapped here too, where pynetdicom would wrap it in ``connect`` (same
context, same server host name, handshake when connecting, bound by the connection timeout):
the TLS socket that replaces the plain one is then the one kept, and closed.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association


class ClientAE(AE):
    """pynetdicom's AE, keeping the sockets of its associations for :meth:`close_sockets`."""

    def __init__(self, ae_title: str) -> None:
        super().__init__(ae_title=ae_title)
        self._sockets: list[socket.socket] = []

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> Any:
        wrapper = super()._create_socket(assoc, address, None)
        if isinstance(wrapper.socket, socket.socket):
            if tls_args is not None:
                context, server_hostname = tls_args
                wrapper.socket = context.wrap_socket(wrapper.socket, server_side=False,
                                                     server_hostname=server_hostname)
            self._sockets.append(wrapper.socket)
        return wrapper

    def close_sockets(self) -> None:
        """Close every socket this AE made (a no-op on one pynetdicom closed already)."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
