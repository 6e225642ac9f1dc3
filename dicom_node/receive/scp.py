"""The Storage SCP: a pynetdicom AE with C-ECHO and C-STORE, limits, timeouts and TCP_NODELAY."""

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

from dicom_node.config import Config
from dicom_node.log import get_logger
from dicom_node.mpps.scp import mpps_handlers
from dicom_node.receive import limits, polling
from dicom_node.receive.status import EchoStatus
from dicom_node.receive.store_handler import StoreContext, handle_store
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

    def _make_ae(self, config: Config) -> AE:
        ae = AE(ae_title=config.node.ae_title)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
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

    def start(self) -> None:
        config = self.context.config
        # Each receiver (host, port) has its own scratch folder, so that clearing leftovers at
        # start never touches another receiver's data sets in flight on a shared data folder.
        scratch = config.incoming_dir / f"{socket.gethostname()}-{config.node.port}"
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
        limits.install_bounded_reads(config.node.max_pdu_bytes,
                                     config.node.network_timeout_seconds)
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
        ]
        if self.mpps:
            handlers.extend(mpps_handlers(self.context))
        self._server = self.ae.start_server(
            (config.node.bind, config.node.port), block=False, evt_handlers=handlers)
        self._cap = limits.cap_connections(self._server, _connection_limit(config))
        log.info("receiver_started", ae_title=config.node.ae_title, bind=config.node.bind,
                 port=self.port, max_associations=config.node.max_associations,
                 allowed_calling_aets=list(config.node.allowed_calling_aets) or "any")

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self.context.io.shutdown(wait=True)
            log.info("receiver_stopped")

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: limits and allow-list now; address changes need a restart."""
        old = self.context.config
        if (old.node.ae_title, old.node.port, old.node.bind, old.node.data_dir) != (
                config.node.ae_title, config.node.port, config.node.bind, config.node.data_dir):
            log.warning("restart_required", reason="node.ae_title, port, bind or data_dir changed; "
                        "the receiver keeps its current address until restarted")
            config = config.model_copy(update={"node": old.node.model_copy(update={
                k: getattr(config.node, k) for k in (
                    "allowed_calling_aets", "max_associations", "network_timeout_seconds",
                    "acse_timeout_seconds", "dimse_timeout_seconds", "max_pdu_bytes",
                    "max_connections",
                    "on_duplicate")})})
        if mpps_enabled(config) != self.mpps:
            log.warning("restart_required", reason="[mpps] was turned "
                        f"{'on' if mpps_enabled(config) else 'off'}; the MPPS SCP stays "
                        f"{'on' if self.mpps else 'off'} until the receiver is restarted")
        self._apply_limits(self.ae, config)
        if self._server is not None:
            self._cap.limit = _connection_limit(config)
            limits.install_bounded_reads(config.node.max_pdu_bytes,
                                         config.node.network_timeout_seconds)
        self.context.config = config

    def _handle_echo(self, event: Any) -> int:
        log.info("echo_answered", calling_ae=str(event.assoc.requestor.ae_title).strip())
        return EchoStatus.SUCCESS

    def _handle_store(self, event: Any) -> int:
        status = handle_store(event, self.context)
        if status == 0:
            polling.mark_busy(event.assoc)
            with self._lock:
                self._counts[id(event.assoc)] += 1
        return status

    def _on_accepted(self, event: Any) -> None:
        log.info("association_accepted", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                 peer=event.assoc.requestor.address)

    def _on_closed(self, event: Any) -> None:
        polling.forget(event.assoc)
        with self._lock:
            stored = self._counts.pop(id(event.assoc), 0)
        log.info("association_closed", how=event.event.name.removeprefix("EVT_").lower(),
                 calling_ae=str(event.assoc.requestor.ae_title).strip(), instances_stored=stored)

    def _on_rejected(self, event: Any) -> None:
        log.warning("association_rejected", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                    peer=event.assoc.requestor.address)
