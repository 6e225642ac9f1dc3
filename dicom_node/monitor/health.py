"""Liveness and readiness of the receiver, for Kubernetes probes and load balancers.

- **Liveness** (``/healthz``): the process answers, and each of the SCP's listeners (plain TCP,
  TLS) still runs its accept loop on an open socket. When it fails, restarting the process is
  the cure. The database is not part of it: a restart does not bring a database back.
- **Readiness** (``/readyz``): live, and the database answers a read within the monitor's
  timeout. While the database does not answer, the receiver refuses every C-STORE with ``A700``
  (Out of Resources): a load balancer should not send it studies.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from dicom_node.config import Config
from dicom_node.monitor.database import MonitorDatabase


class Listening(Protocol):
    """What the health checks need of :class:`~dicom_node.receive.scp.Receiver`."""

    @property
    def listeners(self) -> tuple[Any, ...]: ...


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    """The outcome of a probe: every check, and whether all passed."""

    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())

    def body(self) -> dict[str, Any]:
        """The JSON answer: ``status``, the failing checks' ``reasons``, every check."""
        return {"status": "ok" if self.ok else "fail",
                "reasons": [f"{name}: {c.detail}" for name, c in self.checks.items() if not c.ok],
                "checks": {name: {"ok": c.ok, "detail": c.detail}
                           for name, c in self.checks.items()}}


def serving(server: Any) -> bool:
    """Whether a ``socketserver`` server (pynetdicom's association servers are ones) runs its
    accept loop on an open socket.

    The standard library keeps no public flag for it: ``serve_forever`` clears the server's
    private ``__is_shut_down`` event when it starts and sets it when it returns (after
    ``shutdown()``, or an error that ended the loop). ``tests/test_http.py`` fails should a
    Python release change that.
    """
    if server.socket.fileno() == -1:
        return False
    shut_down = getattr(server, "_BaseServer__is_shut_down", None)
    return isinstance(shut_down, threading.Event) and not shut_down.is_set()


def scp_check(receiver: Listening, config: Config) -> Check:
    """Every listener the config asks for is serving."""
    expected = config.node.listen_ports
    servers = receiver.listeners
    if not servers:
        return Check(False, "the DICOM listener is not running (stopped, or not started)")
    stopped = [int(s.server_address[1]) for s in servers if not serving(s)]
    if stopped:
        return Check(False, f"the accept loop on port {', '.join(map(str, stopped))} ended")
    if len(servers) < len(expected):
        return Check(False, f"{len(servers)} of {len(expected)} DICOM listeners are running")
    ports = ", ".join(str(s.server_address[1]) for s in servers)
    return Check(True, f"listening on port {ports}")


def liveness(receiver: Listening, config: Config) -> Health:
    return Health({"scp": scp_check(receiver, config)})


def readiness(receiver: Listening, config: Config, database: MonitorDatabase) -> Health:
    error = database.check()
    return Health({"scp": scp_check(receiver, config),
                   "database": Check(error is None, error or "reachable")})
