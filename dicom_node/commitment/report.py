"""The EVT_N_EVENT_REPORT handler: a destination's Storage Commitment report (PS3.4 J.3.3).

The receiver binds it (the report normally comes on a new association that the PACS opens to
the node, proposing the Push Model with itself as SCP: the receiver accepts that role), and so
does the worker on the association of its N-ACTION, for a PACS that reports there before the
node releases it. A report is answered Success only after its outcome is committed to the
database, in one transaction with its job's change; every other answer is a named
:class:`ReportStatus` with an Error Comment, logged as ``commitment_report_refused`` (the
report is wrong) or ``commitment_report_failed`` (the node is). An exception never reaches
pynetdicom. Log events carry UIDs, AE titles and Failure Reasons, nothing about the patient.
"""

from __future__ import annotations

import traceback
from typing import Any, Protocol

from pydicom import Dataset
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.commitment.status import (
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    EventType,
    ReportStatus,
    failure_text,
)
from dicom_node.commitment.store import Outcome, Reference, Report, apply_report
from dicom_node.config import Config
from dicom_node.errors import InvalidUIDError
from dicom_node.log import get_logger
from dicom_node.store.db import CommitmentState, utcnow
from dicom_node.uids import validate_uid

log = get_logger()

#: Error Comment (0000,0902) is an LO: at most 64 characters of the default repertoire.
_COMMENT_MAX = 64


class ReportContext(Protocol):
    """What the handler needs: the database and the current config (its ``[jobs]``). The
    receiver's StoreContext is one; its ``config`` is swapped on reload."""

    @property
    def config(self) -> Config: ...

    @property
    def sessions(self) -> sessionmaker[Session]: ...


class _Refused(Exception):
    def __init__(self, status: ReportStatus, reason: str, comment: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.comment = comment or reason


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _uid(value: object, what: str) -> str:
    try:
        return validate_uid(_text(value), what)
    except InvalidUIDError as exc:
        raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE, str(exc),
                       f"{what}: not a valid UID") from None


def _reference(item: Dataset, where: str) -> Reference:
    for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"):
        if not _text(item.get(keyword)):
            raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE, f"{where}.{keyword} is missing",
                           f"{keyword} missing")
    return Reference(_uid(item.ReferencedSOPClassUID, "Referenced SOP Class UID"),
                     _uid(item.ReferencedSOPInstanceUID, "Referenced SOP Instance UID"))


def _failure_reason(item: Dataset, where: str) -> int:
    value = item.get("FailureReason")
    if value is None or value == "":
        raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE,
                       f"{where}.FailureReason is missing (Type 1)", "FailureReason missing")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE,
                       f"{where}.FailureReason is not one number",
                       "FailureReason invalid") from None


def _event_information(event: Any) -> Dataset:
    try:
        ds: Dataset | None = event.event_information
        if ds is None:
            raise ValueError("no Event Information")
        for _elem in ds.iterall():  # decode every element now, not lazily later
            pass
    except Exception as exc:
        raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE,
                       f"the Event Information could not be decoded ({type(exc).__name__})",
                       "the Event Information could not be decoded") from None
    return ds


def parse_report(event: Any) -> Report:
    """The report of an N-EVENT-REPORT request; :class:`_Refused` when it is not one the node
    can take: the wrong SOP Class or Instance, an unknown event type, a malformed Event
    Information."""
    request = event.request
    if _text(request.AffectedSOPClassUID) != SOP_CLASS_UID:
        raise _Refused(ReportStatus.NO_SUCH_SOP_CLASS,
                       f"Affected SOP Class UID {_text(request.AffectedSOPClassUID)[:64]!r} is "
                       f"not Storage Commitment Push Model", "not Storage Commitment Push Model")
    if _text(request.AffectedSOPInstanceUID) != SOP_INSTANCE_UID:
        raise _Refused(ReportStatus.NO_SUCH_SOP_INSTANCE,
                       f"Affected SOP Instance UID {_text(request.AffectedSOPInstanceUID)[:64]!r}"
                       f" is not the well-known {SOP_INSTANCE_UID} (PS3.4 J.3.5)",
                       f"SOP Instance must be {SOP_INSTANCE_UID}")
    try:
        event_type = EventType(int(request.EventTypeID))
    except (TypeError, ValueError):
        raise _Refused(ReportStatus.NO_SUCH_EVENT_TYPE,
                       f"Event Type ID {request.EventTypeID!r} is neither 1 nor 2",
                       "Event Type ID must be 1 or 2") from None
    ds = _event_information(event)
    if not _text(ds.get("TransactionUID")):
        raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE, "TransactionUID is missing",
                       "TransactionUID missing")
    uid = _uid(ds.TransactionUID, "Transaction UID")
    committed = tuple(_reference(item, f"ReferencedSOPSequence[{i}]")
                      for i, item in enumerate(ds.get("ReferencedSOPSequence") or ()))
    failed = tuple((_reference(item, f"FailedSOPSequence[{i}]"),
                    _failure_reason(item, f"FailedSOPSequence[{i}]"))
                   for i, item in enumerate(ds.get("FailedSOPSequence") or ()))
    if event_type == EventType.ALL_COMMITTED and failed:
        raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE,
                       "Event Type ID 1 (all committed) with a Failed SOP Sequence",
                       "event type 1 with failed instances")
    if event_type == EventType.FAILURES_EXIST and not failed:
        raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE,
                       "Event Type ID 2 (failures exist) without a Failed SOP Sequence item",
                       "event type 2 without failed instances")
    return Report(transaction_uid=uid, committed=committed, failed=failed,
                  calling_ae=_text(event.assoc.requestor.ae_title))


def _status(status: ReportStatus, comment: str) -> Dataset:
    reply = Dataset()
    reply.Status = int(status)
    reply.ErrorComment = comment.encode("ascii", "replace").decode("ascii")[:_COMMENT_MAX]
    return reply


def _where(exc: BaseException) -> str:
    """The exception's type and where it was raised, without its message."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{at}"


def log_outcome(outcome: Outcome, **fields: Any) -> None:
    """``results_committed``, ``results_commitment_failed``, ``results_commitment_timeout`` or
    ``commitment_report_repeated``, with the transaction's context."""
    bound = log.bind(job_id=outcome.job_id, study_uid=outcome.study_instance_uid,
                     destination=outcome.destination, transaction_uid=outcome.transaction_uid,
                     instances=outcome.instances, **fields)
    job = {"job_state": str(outcome.job_state)} if outcome.job_state is not None else {}
    if outcome.repeated:
        bound.info("commitment_report_repeated", state=str(outcome.state),
                   reason="the transaction was settled already (reported, or its request "
                          "failed); nothing changed")
    elif outcome.state == CommitmentState.COMMITTED:
        late = {"late": True} if outcome.previous == CommitmentState.TIMED_OUT else {}
        bound.info("results_committed", **late, **job)
    elif outcome.state == CommitmentState.FAILED:
        bound.error("results_commitment_failed", failed=[
            {"sop_instance_uid": f.sop_instance_uid, "reason": failure_text(f.reason)}
            for f in outcome.failures], **job)
    elif outcome.state == CommitmentState.TIMED_OUT:
        bound.error("results_commitment_timeout", reason=outcome.note, **job)


def handle_report(event: Any, context: ReportContext) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_EVENT_REPORT handler (bound with ``[context]``)."""
    calling_ae = _text(event.assoc.requestor.ae_title)
    transaction = ""
    try:
        report = parse_report(event)
        transaction = report.transaction_uid
        with context.sessions.begin() as session:
            outcome = apply_report(session, report, context.config.jobs, utcnow())
        if outcome is None:
            raise _Refused(ReportStatus.INVALID_ARGUMENT_VALUE,
                           "unknown Transaction UID: the node requested no such commitment",
                           "unknown Transaction UID")
    except _Refused as refused:
        log.warning("commitment_report_refused", calling_ae=calling_ae,
                    transaction_uid=transaction or None, status=f"0x{refused.status:04X}",
                    reason=refused.reason)
        return _status(refused.status, refused.comment), None
    except Exception as exc:  # never let an exception reach pynetdicom
        reason = (f"database error: {type(exc).__name__}" if isinstance(exc, SQLAlchemyError)
                  else f"unexpected: {_where(exc)}")
        log.error("commitment_report_failed", calling_ae=calling_ae,
                  transaction_uid=transaction or None, reason=reason)
        return ReportStatus.PROCESSING_FAILURE, None
    log_outcome(outcome, calling_ae=calling_ae)
    return ReportStatus.SUCCESS, None
