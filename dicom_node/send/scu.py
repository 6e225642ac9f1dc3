"""C-STORE SCU: send files to a configured destination, checking the status of every instance.

A destination with a ``tls`` table is reached over DICOM TLS (:func:`dicom_node.tls.client_context`:
the PACS's certificate verified, the node's own presented when configured); the handshake is part
of connecting, and so bound by the destination's ``timeout_seconds``.

A destination that cannot be reached (:func:`associate`), or that stops answering while the node
sends (:attr:`SendReport.interrupted`), is an outage (:class:`DestinationUnreachable`, waited out
by the job runner); an instance it answers with a failure status is a refusal of that object."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import tls
from dicom_node.config import Destination
from dicom_node.errors import ConfigError, DestinationUnreachable, SendError
from dicom_node.log import get_logger
from dicom_node.receive.scp import set_nodelay
from dicom_node.send.ae import ClientAE
from dicom_node.send.explain import association_failure, is_outage, join, peer_logs

log = get_logger()

#: pynetdicom (and PS3.8) allow at most 128 presentation contexts per association.
MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class SendReport:
    destination: str
    sent: int
    failed: tuple[tuple[str, str], ...]  # (SOP Instance UID, reason)
    warnings: int
    #: Why an association ended before every instance had its answer (aborted, or no answer
    #: in time); None when every instance sent got one. Those failures are an outage.
    interrupted: str | None = None
    #: Failures that are the destination's answer: a failure status, or no presentation
    #: context accepted for the object (a refusal of the object, not an outage).
    refused: int = 0


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files, and every file under folders, sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise SendError(f"{path}: no such file or folder")
    return files


def make_ae(calling_ae: str, timeout: float) -> ClientAE:
    ae = ClientAE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def where(dest: Destination) -> str:
    """``AE@host:port``, and ``over TLS`` for a destination reached over TLS."""
    return (f"{dest.ae_title}@{dest.host}:{dest.port}"
            + (" over TLS" if dest.tls is not None else ""))


def associate(ae: ClientAE, dest: Destination, service: str) -> Association:
    """Open an association to ``dest``; DestinationUnreachable with the reason when it fails
    (connection refused, TLS handshake, rejection and its reason, timeout, abort:
    :mod:`dicom_node.send.explain`), SendError when the destination accepted none of
    ``service`` (what was asked for) or the TLS files are gone."""
    try:
        tls_args = tls.tls_args(dest.tls, dest.host)
    except ConfigError as exc:  # a file changed or went away after the config was loaded
        raise SendError(f"{dest.name}: destinations.tls: {exc}") from None
    connected = threading.Event()

    def on_open(event: Any) -> None:
        connected.set()
        set_nodelay(event)

    with peer_logs.watch(ae) as watch:
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                                 tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
        except OSError as exc:  # the host name does not resolve
            raise DestinationUnreachable(
                f"{dest.name}: {where(dest)}: cannot connect: {exc}") from None
        if not assoc.is_established:
            join(assoc)  # let pynetdicom finish with the socket, and log its last words
            ae.close_sockets()
            reason = association_failure(assoc, connected.is_set(), watch.messages,
                                         dest.timeout_seconds, service)
            if dest.tls is not None and reason.startswith("association aborted"):
                # TLS 1.3: a server refusing the client's certificate (or its absence) closes
                # the connection after the handshake, when the A-ASSOCIATE-RQ is on its way
                reason += ("; over TLS that is often the peer refusing the node's certificate "
                           "or its absence (destinations.tls.certificate)")
            error = DestinationUnreachable if is_outage(reason) else SendError
            raise error(f"{dest.name}: {where(dest)}: {reason}")
    return assoc


def echo(dest: Destination, calling_ae: str) -> int:
    """C-ECHO the destination; return its status (0: success); SendError if unreachable."""
    ae = make_ae(dest.calling_ae_title or calling_ae, dest.timeout_seconds)
    ae.add_requested_context(Verification)
    assoc = associate(ae, dest, "Verification")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status:
        raise DestinationUnreachable(f"{dest.name}: no C-ECHO response (timeout or abort)")
    return int(status.Status)


def send_files(dest: Destination, files: Sequence[Path], calling_ae: str) -> SendReport:
    """C-STORE every file on one association per ≤128 presentation contexts.

    Raises SendError when the destination cannot be reached (DestinationUnreachable) or accepts
    none of the SOP classes; per-instance failures are returned in the report so the caller
    decides (the job runner waits out an interruption, and treats a refusal as a failed
    attempt).
    """
    headers = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        headers.append((path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                        str(ds.file_meta.TransferSyntaxUID)))
    batches: list[list[tuple[Path, str, str, str]]] = []
    batch: list[tuple[Path, str, str, str]] = []
    contexts: set[tuple[str, str]] = set()
    every_context: list[set[tuple[str, str]]] = []
    for header in headers:
        wanted = {(header[1], ts) for ts in _transfer_syntaxes(header[3])}
        if len(contexts | wanted) > MAX_CONTEXTS:
            batches.append(batch)
            every_context.append(contexts)
            batch, contexts = [], set()
        batch.append(header)
        contexts |= wanted
    if batch:
        batches.append(batch)
        every_context.append(contexts)
    report = SendReport(dest.name, 0, (), 0)
    for batch, contexts in zip(batches, every_context, strict=True):
        part = _send_batch(dest, batch, contexts, calling_ae)
        report = SendReport(dest.name, report.sent + part.sent, report.failed + part.failed,
                            report.warnings + part.warnings,
                            report.interrupted or part.interrupted,
                            report.refused + part.refused)
    return report


def _transfer_syntaxes(file_ts: str) -> list[str]:
    if UID(file_ts) in _UNCOMPRESSED:
        return [str(ts) for ts in _UNCOMPRESSED]
    return [file_ts]


def _send_batch(dest: Destination, batch: Sequence[tuple[Path, str, str, str]],
                contexts: set[tuple[str, str]], calling_ae: str) -> SendReport:
    ae = make_ae(dest.calling_ae_title or calling_ae, dest.timeout_seconds)
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = associate(ae, dest, "none of the results' SOP classes in their transfer syntaxes")
    sent, warnings, refused = 0, 0, 0
    interrupted: str | None = None
    failed: list[tuple[str, str]] = []
    try:
        for index, (path, _sop_class, sop_uid, _ts) in enumerate(batch):
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context for this SOP class / TS
                failed.append((sop_uid, f"not accepted by {dest.ae_title}: {exc}"))
                refused += 1
                continue
            if not assoc.is_established and not status:
                interrupted = (f"association aborted, or no answer within "
                               f"{dest.timeout_seconds:g} s")
                # this instance and the rest of the batch have no answer
                failed += [(uid, interrupted) for _p, _c, uid, _t in batch[index:]]
                break
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                interrupted = "no response (timeout or abort)"
                failed.append((sop_uid, interrupted))
            elif code == 0x0000:
                sent += 1
            elif code in (0x0001, 0x0107, 0x0116) or code >> 12 == 0xB:
                sent += 1
                warnings += 1
                log.warning("send_warning", destination=dest.name, sop_instance_uid=sop_uid,
                            status=f"0x{code:04X}")
            else:
                failed.append((sop_uid, f"status 0x{code:04X}"))
                refused += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return SendReport(dest.name, sent, tuple(failed), warnings, interrupted, refused)
