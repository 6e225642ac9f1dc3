"""The Storage SCP: a pynetdicom AE with C-ECHO and C-STORE, limits, timeouts and TCP_NODELAY,
listening on plain TCP, on DICOM TLS (:mod:`dicom_node.receive.tls_server`), or on both."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections import Counter
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    Verification,
)
from sqlalchemy.engine import Engine

from dicom_node import tls
from dicom_node.commitment import status as commitment
from dicom_node.commitment.report import handle_report
from dicom_node.config import Config, NodeSection, NodeTlsSection
from dicom_node.errors import ConfigError
from dicom_node.log import get_logger
from dicom_node.mpps.scp import mpps_handlers
from dicom_node.receive import disk, limits, polling
from dicom_node.receive.status import EchoStatus
from dicom_node.receive.store_handler import StoreContext, handle_store
from dicom_node.receive.tls_server import TlsAssociationServer, start_tls_server
from dicom_node.store.db import make_sessionmaker

#: Transfer syntaxes the receiver accepts: uncompressed, deflated and the common compressed ones.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

log = get_logger()


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: switch Nagle off, or every small PDU waits for the peer's delayed ACK."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def mpps_enabled(config: Config) -> bool:
    """Whether the config turns the MPPS SCP on (an [mpps] section with enabled = true)."""
    return config.mpps is not None and config.mpps.enabled


def _connection_limit(config: Config) -> int:
    node = config.node
    return node.max_connections or node.max_associations + 8


def _per_host_limit(config: Config) -> int:
    """node.max_connections_per_host; absent: half of the connection limit, so that one host
    never holds every slot."""
    return config.node.max_connections_per_host or max(1, _connection_limit(config) // 2)


def _make_cap(config: Config, refused: Any) -> limits.ConnectionCap:
    return limits.ConnectionCap(_connection_limit(config), _per_host_limit(config),
                                config.node.association_request_timeout_seconds, refused)


def _tls_listener(node: NodeSection) -> tuple[int, bool] | None:
    """The TLS listener's shape (port, plain TCP too), None without TLS."""
    return None if node.tls is None else (node.tls.port, node.tls.plain_tcp)


def _listeners(node: NodeSection) -> tuple[object, ...]:
    """What a reload cannot change on a running receiver: its identity and its listeners."""
    return (node.ae_title, node.port, node.bind, node.data_dir, _tls_listener(node))


#: [node] keys a reload applies to a running receiver.
RELOADABLE_NODE_KEYS = ("allowed_calling_aets", "check_called_ae_title", "max_associations",
                        "network_timeout_seconds", "acse_timeout_seconds",
                        "dimse_timeout_seconds", "max_pdu_bytes", "max_connections",
                        "on_duplicate", "min_free_mb", "max_connections_per_host",
                        "association_request_timeout_seconds")


#: The receiver warns (tls_certificate_expiring) at start and reload within this many days.
CERTIFICATE_WARN_DAYS = 30


def _certificate_fields(section: NodeTlsSection) -> dict[str, Any]:
    """Log fields about the node's certificate (subject, expiry)."""
    leaf = tls.read_certificates(section.certificate)[0]
    return {"certificate": leaf.subject, "certificate_expires": leaf.not_after.isoformat(),
            "certificate_days_left": int(leaf.days_left())}


def _warn_if_expiring(fields: dict[str, Any]) -> None:
    if fields["certificate_days_left"] < CERTIFICATE_WARN_DAYS:
        log.warning("tls_certificate_expiring", certificate=fields["certificate"],
                    certificate_expires=fields["certificate_expires"],
                    certificate_days_left=fields["certificate_days_left"])


class Receiver:
    """The running SCP. ``reconfigure`` applies what can change without a restart."""

    def __init__(self, config: Config, engine: Engine) -> None:
        self.context = StoreContext(config=config, engine=engine,
                                    sessions=make_sessionmaker(engine))
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()
        #: The MPPS SCP is on or off for the life of the AE: its presentation context is part of
        #: what the AE accepts at association time, so switching it needs a restart.
        self.mpps = mpps_enabled(config)
        self.ae = self._make_ae(config)
        self._server: Any = None
        self._tls_server: TlsAssociationServer | None = None
        self._previous_tempdir: str | None = None

    def _make_ae(self, config: Config) -> limits.ReceiverAE:
        # max_associations counting associations, not connections still negotiating (limits.py)
        ae = limits.ReceiverAE(ae_title=config.node.ae_title)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        # Storage Commitment reports (dicom_node.commitment): the PACS opens the association
        # and proposes itself as the SOP Class's SCP by SCP/SCU role selection (Orthanc, IHE
        # RAD-10). Whatever roles a peer proposes are accepted; the node only takes reports.
        ae.add_supported_context(commitment.SOP_CLASS_UID,
                                 [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                 scu_role=True, scp_role=True)
        if self.mpps:
            ae.add_supported_context(ModalityPerformedProcedureStep,
                                     [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._apply_limits(ae, config)
        return ae

    @staticmethod
    def _apply_limits(ae: AE, config: Config) -> None:
        node = config.node
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.require_called_aet = node.check_called_ae_title

    def start(self) -> None:
        config = self.context.config
        node = config.node
        # Each receiver (host, port) has its own scratch folder, so that clearing leftovers at
        # start never touches another receiver's data sets in flight on a shared data folder.
        scratch = config.incoming_dir / f"{socket.gethostname()}-{node.listen_ports[0]}"
        scratch.mkdir(parents=True, exist_ok=True)
        config.spool_dir.mkdir(parents=True, exist_ok=True)
        # Data sets go straight to a file in incoming/ (same file system as the spool, so the
        # move into the spool is a rename). Both settings are process-wide: this process is the
        # receiver and nothing else.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's "standard" handlers format a debug line for every PDU and DIMSE message,
        # bound whatever the log level; the node logs its own structured events instead.
        _config.LOG_HANDLER_LEVEL = "none"
        polling.install()
        # below node.min_free_mb, or when a write fails, a C-STORE is answered A700 (disk.py)
        disk.install(node.min_free_mb)
        refused = self.context.counters.peer_refused
        limits.install_bounded_reads(node.max_pdu_bytes, node.network_timeout_seconds, refused)
        self._cap = _make_cap(config, refused)
        # given back at stop(), so that the rest of a process running a receiver for a while
        # (the tests) writes its temporary files where it did before
        self._previous_tempdir = tempfile.tempdir
        tempfile.tempdir = str(scratch)
        for leftover in scratch.glob("*.dcm"):
            leftover.unlink(missing_ok=True)  # never acknowledged: the sender will re-send
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_N_EVENT_REPORT, handle_report, [self.context]),
            *self._cap.handlers,  # connection admission and the request deadline (limits.py)
        ]
        if self.mpps:
            handlers.extend(mpps_handlers(self.context))
        tls_fields: dict[str, Any] = {}
        if node.tls is not None:
            self._tls_server = start_tls_server(
                self.ae, (node.bind, node.tls.port), tls.server_context(node.tls), handlers,
                node.acse_timeout_seconds, refused)
            tls_fields = {"tls_port": self.tls_port, "tls_min_version": node.tls.min_version,
                          "client_certificate_required": node.tls.require_client_certificate,
                          **_certificate_fields(node.tls)}
        if node.tls is None or node.tls.plain_tcp:
            self._server = self.ae.start_server(
                (node.bind, node.port), block=False, evt_handlers=handlers)
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        self._cap.install(servers)
        self.ae.cap = self._cap
        log.info("receiver_started", ae_title=node.ae_title, bind=node.bind,
                 port=self._server_port(self._server), max_associations=node.max_associations,
                 allowed_calling_aets=list(node.allowed_calling_aets) or "any",
                 check_called_ae_title=node.check_called_ae_title, **tls_fields)
        if tls_fields:
            _warn_if_expiring(tls_fields)

    @staticmethod
    def _server_port(server: Any) -> int | None:
        return int(server.server_address[1]) if server is not None else None

    @property
    def port(self) -> int:
        """The plain TCP listener's port (the TLS one's when there is no plain listener)."""
        return self._server_port(self._server) or self.tls_port

    @property
    def tls_port(self) -> int:
        """The TLS listener's port; 0 without one."""
        return self._server_port(self._tls_server) or 0

    @property
    def listeners(self) -> tuple[Any, ...]:
        """The running listeners' servers (plain TCP, then TLS); empty once stopped."""
        return tuple(s for s in (self._server, self._tls_server) if s is not None)

    def stop(self) -> None:
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        self._server = self._tls_server = None
        for server in servers:
            server.shutdown()
        if servers:
            self.context.io.shutdown(wait=True)
            tempfile.tempdir = self._previous_tempdir
            log.info("receiver_stopped")

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: limits, allow-list and the TLS certificate now; address and
        listener changes need a restart."""
        old = self.context.config
        if _listeners(old.node) != _listeners(config.node):
            log.warning("restart_required", reason="node.ae_title, port, bind, data_dir, or "
                        "whether and where TLS listens (node.tls, tls.port, tls.plain_tcp) "
                        "changed; the receiver keeps its current listeners until restarted")
            keep_tls = (old.node.tls is not None
                        and _tls_listener(old.node) == _tls_listener(config.node))
            config = config.model_copy(update={"node": old.node.model_copy(update={
                k: getattr(config.node, k) for k in (
                    *RELOADABLE_NODE_KEYS, *(("tls",) if keep_tls else ()))})})
        if mpps_enabled(config) != self.mpps:
            log.warning("restart_required", reason="[mpps] was turned "
                        f"{'on' if mpps_enabled(config) else 'off'}; the MPPS SCP stays "
                        f"{'on' if self.mpps else 'off'} until the receiver is restarted")
        self._apply_limits(self.ae, config)
        if self._server is not None or self._tls_server is not None:
            self._cap.limit = _connection_limit(config)
            self._cap.per_host_limit = _per_host_limit(config)
            self._cap.request_seconds = config.node.association_request_timeout_seconds
            self._cap.reapply()  # _apply_limits gave every association the AE's acse_timeout
            limits.install_bounded_reads(config.node.max_pdu_bytes,
                                         config.node.network_timeout_seconds)
            disk.install(config.node.min_free_mb)
        if self._tls_server is not None and config.node.tls is not None:
            self._tls_server.handshake_timeout = config.node.acse_timeout_seconds
            if not self._reload_tls(self._tls_server, config.node.tls):
                config = config.model_copy(update={"node": config.node.model_copy(
                    update={"tls": old.node.tls})})
        self.context.config = config

    def _reload_tls(self, server: TlsAssociationServer, section: NodeTlsSection) -> bool:
        """A new SSL context from the files, read again, for the connections accepted from now
        on (open associations keep their session); False, and the old context kept, when a file
        changed after the config was validated and no longer works."""
        try:
            context = tls.server_context(section)
            fields = _certificate_fields(section)
        except ConfigError as exc:
            log.error("tls_reload_failed", reason=f"node.tls: {exc}",
                      action="keeping the current certificate and settings")
            return False
        server.ssl_context = context
        log.info("tls_reloaded", tls_port=self.tls_port, **fields)
        _warn_if_expiring(fields)
        return True

    def _handle_echo(self, event: Any) -> int:
        log.info("echo_answered", calling_ae=str(event.assoc.requestor.ae_title).strip())
        return EchoStatus.SUCCESS

    def _handle_store(self, event: Any) -> int:
        status = handle_store(event, self.context)
        self.context.counters.stored(status)
        if status == 0:
            polling.mark_busy(event.assoc)
            with self._lock:
                self._counts[id(event.assoc)] += 1
        return status

    def _on_accepted(self, event: Any) -> None:
        self.context.counters.associations_accepted.inc()
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        log.info("association_accepted", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                 peer=event.assoc.requestor.address, **tls.peer_fields(sock))

    def _on_closed(self, event: Any) -> None:
        polling.forget(event.assoc)
        with self._lock:
            stored = self._counts.pop(id(event.assoc), 0)
        log.info("association_closed", how=event.event.name.removeprefix("EVT_").lower(),
                 calling_ae=str(event.assoc.requestor.ae_title).strip(), instances_stored=stored)

    def _on_rejected(self, event: Any) -> None:
        self.context.counters.associations_rejected.inc()
        log.warning("association_rejected", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                    peer=event.assoc.requestor.address, reason=rejection_reason(event.assoc))


def rejection_reason(assoc: Any) -> str:
    """Why pynetdicom rejected an association request, from the request and the AE's settings
    (its EVT_REJECTED carries no reason). pynetdicom checks in this order and the last failing
    check decides the A-ASSOCIATE-RJ: calling AE title, called AE title, association limit."""
    ae, request = assoc.ae, assoc.requestor.primitive
    calling = str(request.calling_ae_title).strip() if request is not None else "?"
    called = str(request.called_ae_title).strip() if request is not None else "?"
    reason = "rejected by the association negotiation"
    if ae.require_calling_aet and calling not in [t.strip() for t in ae.require_calling_aet]:
        reason = f"calling AE title {calling!r} is not in node.allowed_calling_aets"
    if ae.require_called_aet and called != str(assoc.acceptor.ae_title).strip():
        reason = (f"called AE title {called!r} is not this node's "
                  f"{str(assoc.acceptor.ae_title).strip()!r} (node.check_called_ae_title)")
    acceptors = [a for a in ae.active_associations if a.is_acceptor]
    if len(acceptors) > ae.maximum_associations:
        limit = getattr(ae, "associations_limit", ae.maximum_associations)
        reason = f"{limit} associations already open (node.max_associations)"
    return reason
