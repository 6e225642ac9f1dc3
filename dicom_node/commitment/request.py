"""The Storage Commitment request: N-ACTION-RQ (PS3.4 J.3.2) to a destination with
``storage_commitment = true``, after a job's results were C-STOREd there.

The transaction is recorded first (:func:`dicom_node.commitment.store.record_request`: the
destination counts as delivered from then on), because the report may reach the receiver before
the worker has the N-ACTION's response. The request goes on an association of its own, opened
like the C-STORE ones (same calling AE title, timeouts, TLS, failure explanations); a refused
request takes the delivery back and fails the attempt (:class:`SendError`). A report the
destination sends on that association before the node releases it is handled like one that
comes to the receiver; the node does not wait for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.commitment import store
from dicom_node.commitment.report import handle_report
from dicom_node.commitment.status import ACTION_REQUEST, SOP_CLASS_UID, SOP_INSTANCE_UID
from dicom_node.commitment.store import Reference
from dicom_node.config import Config, Destination
from dicom_node.errors import SendError
from dicom_node.jobs.queue import ClaimedJob
from dicom_node.send.scu import associate, make_ae

#: N-ACTION statuses that mean the request was taken: Success, and the warnings of PS3.7 C.
_ACCEPTED = frozenset({0x0000, 0x0001, 0x0107, 0x0116})


@dataclass(frozen=True)
class _WorkerContext:
    """The report handler's context on the worker's own association."""

    config: Config
    sessions: sessionmaker[Session]


def references(files: Sequence[Path]) -> tuple[Reference, ...]:
    """The SOP Class and Instance UIDs of the result files (headers only)."""
    refs = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID",
                                                                    "SOPInstanceUID"])
        refs.append(Reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return tuple(refs)


def request_dataset(transaction_uid: str, refs: Sequence[Reference]) -> Dataset:
    """The N-ACTION's Action Information (PS3.4 Table J.3-1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def send_request(dest: Destination, calling_ae: str, transaction_uid: str,
                 refs: Sequence[Reference], context: _WorkerContext | None = None) -> None:
    """Send the N-ACTION on an association of its own; SendError unless it is accepted."""
    ae = make_ae(calling_ae, dest.timeout_seconds)
    ae.add_requested_context(SOP_CLASS_UID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = associate(ae, dest, "Storage Commitment Push Model")
    if context is not None:
        assoc.bind(evt.EVT_N_EVENT_REPORT, handle_report, [context])
    try:
        status, _reply = assoc.send_n_action(request_dataset(transaction_uid, refs),
                                             ACTION_REQUEST, SOP_CLASS_UID, SOP_INSTANCE_UID)
    except (ValueError, RuntimeError):  # the context was rejected; the association ended
        raise SendError(f"{dest.name}: {dest.ae_title} did not accept Storage Commitment Push "
                        f"Model (storage_commitment = true, but the destination does not "
                        f"support it)") from None
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code is None:
        raise SendError(f"{dest.name}: no response to the storage commitment request "
                        f"(timeout, or the destination ended the association: does it know "
                        f"the node's AE title {calling_ae} as a modality allowed to request "
                        f"storage commitment?)")
    if code not in _ACCEPTED:
        comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
        raise SendError(f"{dest.name}: the storage commitment request was answered with "
                        f"status 0x{code:04X}{comment}")


def request_commitment(config: Config, sessions: sessionmaker[Session], job: ClaimedJob,
                       dest: Destination, files: Sequence[Path], model_version: str
                       ) -> tuple[str, int] | None:
    """Record the transaction for the results just sent to ``dest`` and request it; the
    Transaction UID and the number of instances, or None when the job is no longer ours.
    SendError when the request fails (the delivery is taken back first)."""
    calling_ae = dest.calling_ae_title or config.node.ae_title
    refs = references(files)
    uid = store.record_request(sessions, job, dest, calling_ae, refs, model_version)
    if uid is None:
        return None
    try:
        send_request(dest, calling_ae, uid, refs, _WorkerContext(config, sessions))
    except SendError as exc:
        store.abandon(sessions, job, dest.name, uid, str(exc))
        raise
    return uid, len(refs)
