"""The MPPS SCP: EVT_N_CREATE and EVT_N_SET handlers of the Modality Performed Procedure Step SOP
Class (PS3.4 Annex F.7), bound by the Receiver when ``[mpps]`` is enabled.

N-CREATE stores a new step IN PROGRESS with the studies of its Scheduled Step Attributes Sequence;
N-SET replaces the attributes it carries (a sequence as a whole) until the step is COMPLETED or
DISCONTINUED, after which the step may no longer be updated (PS3.4 F.7.2.2.3). Every request is
answered only after its transaction is committed, with a named :class:`MppsStatus`; an exception
never reaches pynetdicom. Log events carry UIDs, AE titles and attribute keywords, never attribute
values that could identify a patient.

pynetdicom contract (3.0): a handler returns ``(status, dataset)``; ``status`` is an int or a
Dataset holding Status plus ErrorComment / ErrorID. When the N-CREATE request has no Affected SOP
Instance UID, the returned dataset must carry ``AffectedSOPInstanceUID``: pynetdicom moves it into
the response's command set (PS3.7 10.1.5.1.4).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.errors import InvalidUIDError
from dicom_node.log import get_logger
from dicom_node.mpps.status import (
    COMMENT_MAY_NO_LONGER_BE_UPDATED,
    ERROR_ID_MAY_NO_LONGER_BE_UPDATED,
    FINAL_STATUSES,
    MppsStatus,
    StepStatus,
)
from dicom_node.mpps.store import NewStep, StepUpdate, create_step, load_step, update_step
from dicom_node.receive.store_handler import StoreContext
from dicom_node.store.db import utcnow
from dicom_node.uids import validate_uid

log = get_logger()

#: Type 1 attributes of an N-CREATE (PS3.4 Table F.7.2-1), besides the Study Instance UID of
#: each Scheduled Step Attributes item.
CREATE_TYPE1 = (
    "PerformedProcedureStepStatus",
    "ScheduledStepAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "Modality",
)

#: Attributes PS3.4 Table F.7.2-1 marks "Not allowed" in an N-SET. An N-SET that carries them is
#: accepted, but they keep the value of the N-CREATE (logged as ``ignored_attributes``).
NOT_SETTABLE = frozenset({
    "ScheduledStepAttributesSequence",
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientSex", "ReferencedPatientSequence", "OtherPatientIDsSequence",
    "AdmissionID", "IssuerOfAdmissionIDSequence",
    "PerformedStationAETitle", "PerformedStationName", "PerformedLocation",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID", "Modality", "StudyID",
})

#: Values that a COMPLETED step must have (PS3.4 Table F.7.2-1, final state requirement 1).
COMPLETED_TYPE1 = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")

_REFERENCE_SEQUENCES = ("ReferencedImageSequence",
                        "ReferencedNonImageCompositeSOPInstanceSequence")
_CHARSET_TAG = 0x00080005
#: Error Comment (0000,0902) is an LO: at most 64 characters of the default repertoire.
_COMMENT_MAX = 64


class _Refused(Exception):
    """A request the SCP answers with a failure status (the caller logs ``mpps_refused``)."""

    def __init__(self, status: MppsStatus, reason: str, error_id: int | None = None,
                 comment: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error_id = error_id
        self.comment = comment or reason


@dataclass(frozen=True)
class _Outcome:
    """What an accepted N-SET changed, for the log line and the reply."""

    status: str
    series: int
    instances: int
    study_uids: tuple[str, ...]
    ignored: tuple[str, ...]
    reply: Dataset


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str | bytes):
        return not value.strip()
    try:
        return len(value) == 0  # type: ignore[arg-type]
    except TypeError:
        return False


def _require(ds: Dataset, keyword: str, absent: MppsStatus, where: str = "") -> Any:
    """The attribute's value; refused with ``absent`` if missing, 0121 if it has no value."""
    name = f"{where}{keyword}"
    if keyword not in ds:
        raise _Refused(absent, f"{name} is missing (Type 1)")
    value = ds[keyword].value
    if _empty(value):
        raise _Refused(MppsStatus.MISSING_ATTRIBUTE_VALUE, f"{name} has no value (Type 1)")
    return value


def _uid(value: object, what: str) -> str:
    try:
        return validate_uid(_text(value), what)
    except InvalidUIDError as exc:
        raise _Refused(MppsStatus.INVALID_ATTRIBUTE_VALUE, str(exc)) from None


def _undecodable(exc: Exception) -> _Refused:
    return _Refused(MppsStatus.INVALID_ATTRIBUTE_VALUE,
                    f"the data set could not be decoded ({type(exc).__name__})",
                    comment="the data set could not be decoded")


def _fetch(event: Any, name: str) -> Dataset:
    """The request's ``attribute_list`` or ``modification_list`` (an empty Dataset if absent)."""
    try:
        ds: Dataset = getattr(event, name)
    except Exception as exc:
        raise _undecodable(exc) from None
    return ds


def _decoded(ds: Dataset) -> Dataset:
    """Convert every element now (pydicom decodes lazily), so that a malformed list is refused
    here rather than failing later."""
    try:
        for _elem in ds.iterall():
            pass
    except Exception as exc:
        raise _undecodable(exc) from None
    return ds


def performed_series_of(ds: Dataset, absent: MppsStatus) -> dict[str, list[str]]:
    """{Series Instance UID: [Referenced SOP Instance UID, ...]} of the Performed Series
    Sequence (images and non-image composite objects); ``[]`` where none are listed."""
    series: dict[str, list[str]] = {}
    for i, item in enumerate(ds.get("PerformedSeriesSequence") or ()):
        where = f"PerformedSeriesSequence[{i}]."
        series_uid = _uid(_require(item, "SeriesInstanceUID", absent, where), "Series Instance UID")
        sops = series.setdefault(series_uid, [])
        for sequence in _REFERENCE_SEQUENCES:
            for j, ref in enumerate(item.get(sequence) or ()):
                sop = _uid(_require(ref, "ReferencedSOPInstanceUID", absent,
                                    f"{where}{sequence}[{j}]."), "Referenced SOP Instance UID")
                if sop not in sops:
                    sops.append(sop)
    return series


def discontinuation_reason_of(ds: Dataset) -> str | None:
    """The Code Meanings (else Code Values) of the PPS Discontinuation Reason Code Sequence."""
    items = ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence") or ()
    texts = [_text(item.get("CodeMeaning")) or _text(item.get("CodeValue")) for item in items]
    return "; ".join(t for t in texts if t) or None


def _to_json(ds: Dataset) -> str:
    return json.dumps(ds.to_json_dict(), separators=(",", ":"), ensure_ascii=False)


def _encodable(ds: Dataset, event: Any) -> Dataset | None:
    """``ds`` if it encodes in the presentation context's transfer syntax, else None: a reply
    that cannot be encoded would turn an already committed Success into a failure status."""
    try:
        syntax = event.context.transfer_syntax
        buffer = DicomBytesIO()
        buffer.is_little_endian = syntax.is_little_endian
        buffer.is_implicit_VR = syntax.is_implicit_VR
        write_dataset(buffer, ds)
    except Exception:
        return None
    return ds


def _failure_reason(exc: BaseException) -> str:
    """The exception's type and where it was raised, without its message: a message can quote
    attribute values (a patient name)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}"


def _refusal(refused: _Refused, operation: str, mpps_uid: str,
             calling_ae: str) -> tuple[Dataset, None]:
    log.warning("mpps_refused", operation=operation, mpps_uid=mpps_uid,
                status=f"0x{refused.status:04X}", reason=refused.reason, calling_ae=calling_ae)
    status = Dataset()
    status.Status = int(refused.status)
    comment = refused.comment.encode("ascii", "replace").decode("ascii")
    status.ErrorComment = comment[:_COMMENT_MAX]
    if refused.error_id is not None:
        status.ErrorID = refused.error_id
    return status, None


def _failure(exc: Exception, operation: str, mpps_uid: str,
             calling_ae: str) -> tuple[int, None]:
    if isinstance(exc, SQLAlchemyError):
        reason = f"database error: {type(exc).__name__}"
    else:
        reason = f"unexpected: {_failure_reason(exc)}"
    log.error("mpps_failed", operation=operation, mpps_uid=mpps_uid, reason=reason,
              calling_ae=calling_ae)
    return MppsStatus.PROCESSING_FAILURE, None


# --- N-CREATE ---------------------------------------------------------------------------------

def _new_step(ds: Dataset, mpps_uid: str, calling_ae: str) -> NewStep:
    for keyword in CREATE_TYPE1:
        _require(ds, keyword, MppsStatus.MISSING_ATTRIBUTE)
    status = _text(ds.PerformedProcedureStepStatus)
    if status != StepStatus.IN_PROGRESS:
        raise _Refused(MppsStatus.INVALID_ATTRIBUTE_VALUE,
                       f"PerformedProcedureStepStatus is {status[:16]!r}; an N-CREATE must "
                       f"create a step IN PROGRESS (PS3.4 F.7.2.1.3)",
                       comment="PerformedProcedureStepStatus must be IN PROGRESS")
    study_uids = []
    for i, item in enumerate(ds.ScheduledStepAttributesSequence):
        value = _require(item, "StudyInstanceUID", MppsStatus.MISSING_ATTRIBUTE,
                         f"ScheduledStepAttributesSequence[{i}].")
        study_uids.append(_uid(value, "Study Instance UID"))
    return NewStep(
        sop_instance_uid=mpps_uid, status=status, modality=_text(ds.Modality)[:16],
        station_ae_title=_text(ds.PerformedStationAETitle)[:16], calling_ae_title=calling_ae,
        study_uids=tuple(dict.fromkeys(study_uids)),
        performed_series=performed_series_of(ds, MppsStatus.MISSING_ATTRIBUTE),
        discontinuation_reason=discontinuation_reason_of(ds), attributes_json=_to_json(ds))


def handle_n_create(event: Any, context: StoreContext) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_CREATE handler (bound with ``[context]``): create a step IN PROGRESS."""
    calling_ae = _calling_ae(event)
    requested = event.request.AffectedSOPInstanceUID
    mpps_uid = _text(requested)
    try:
        if requested is None:
            # MPPS has the SCU give the UID (PS3.4 F.7.2.1); plain N-CREATE lets the SCP
            # assign it (PS3.7 10.1.5). Lenient: assign one, answered in the response.
            mpps_uid = generate_uid(prefix=None)
        try:
            validate_uid(mpps_uid, "Affected SOP Instance UID")
        except InvalidUIDError as exc:
            raise _Refused(MppsStatus.INVALID_OBJECT_INSTANCE, str(exc)) from None
        ds = _decoded(_fetch(event, "attribute_list"))
        step = _new_step(ds, mpps_uid, calling_ae)
        with context.sessions.begin() as session:
            if not create_step(session, step, utcnow()):
                raise _Refused(MppsStatus.DUPLICATE_SOP_INSTANCE,
                               "an MPPS instance with this SOP Instance UID already exists")
    except _Refused as refused:
        return _refusal(refused, "N-CREATE", mpps_uid, calling_ae)
    except Exception as exc:  # never let an exception reach pynetdicom
        return _failure(exc, "N-CREATE", mpps_uid, calling_ae)
    log.info("mpps_created", mpps_uid=mpps_uid, study_uids=list(step.study_uids),
             modality=step.modality, station_ae=step.station_ae_title, calling_ae=calling_ae)
    reply = _encodable(ds, event)
    if requested is None:
        reply = reply if reply is not None else Dataset()
        reply.AffectedSOPInstanceUID = mpps_uid
    return MppsStatus.SUCCESS, reply


# --- N-SET ------------------------------------------------------------------------------------

def _charset_values(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    return tuple(str(v).strip() for v in value)  # type: ignore[attr-defined]


def _merge(current: Dataset, modification: Dataset) -> tuple[Dataset, tuple[str, ...]]:
    """Apply the modification list to ``current`` in place: each top-level attribute replaces
    the stored one (a sequence as a whole). Returns what was applied, and the keywords ignored."""
    stored_charset = current.get("SpecificCharacterSet")
    if _CHARSET_TAG in modification:
        new_charset = modification.SpecificCharacterSet
        if _charset_values(new_charset) != _charset_values(stored_charset):
            # PS3.4 F.7.2.2.3: the N-SET's character set adds to, not replaces, the stored
            # one. Every stored value is already Unicode text, so UTF-8 covers both.
            current.SpecificCharacterSet = "ISO_IR 192"
    elif stored_charset:
        # An N-SET without (0008,0005) is read in the character set of the instance.
        modification.SpecificCharacterSet = stored_charset
    _decoded(modification)
    applied = Dataset()
    ignored = []
    for elem in modification:
        if elem.tag == _CHARSET_TAG or elem.tag.element == 0x0000:
            continue
        if elem.keyword in NOT_SETTABLE:
            ignored.append(elem.keyword)
            continue
        current[elem.tag] = elem
        applied[elem.tag] = elem
    if "SpecificCharacterSet" in current:
        applied.SpecificCharacterSet = current.SpecificCharacterSet
    return applied, tuple(ignored)


def _step_update(merged: Dataset) -> StepUpdate:
    status = _text(merged.get("PerformedProcedureStepStatus"))
    if not status:
        raise _Refused(MppsStatus.MISSING_ATTRIBUTE_VALUE, "PerformedProcedureStepStatus has "
                       "no value")
    if status not in {s.value for s in StepStatus}:
        raise _Refused(MppsStatus.INVALID_ATTRIBUTE_VALUE,
                       f"PerformedProcedureStepStatus {status[:16]!r} is not IN PROGRESS, "
                       f"COMPLETED or DISCONTINUED",
                       comment="PerformedProcedureStepStatus: unknown value")
    series = performed_series_of(merged, MppsStatus.MISSING_ATTRIBUTE_VALUE)
    if status == StepStatus.COMPLETED:
        for keyword in COMPLETED_TYPE1:
            _require(merged, keyword, MppsStatus.MISSING_ATTRIBUTE_VALUE)
        if not series:
            raise _Refused(MppsStatus.MISSING_ATTRIBUTE_VALUE,
                           "PerformedSeriesSequence has no item; a COMPLETED step lists the "
                           "series it made (PS3.4 Table F.7.2-1, final state)",
                           comment="PerformedSeriesSequence has no item")
    return StepUpdate(status=status, performed_series=series,
                      discontinuation_reason=discontinuation_reason_of(merged),
                      attributes_json=_to_json(merged))


def _apply_n_set(event: Any, context: StoreContext, mpps_uid: str) -> _Outcome:
    with context.sessions.begin() as session:
        stored = load_step(session, mpps_uid)
        if stored is None:
            raise _Refused(MppsStatus.NO_SUCH_SOP_INSTANCE,
                           "no MPPS instance with this SOP Instance UID")
        if stored.status in FINAL_STATUSES:
            raise _Refused(MppsStatus.PROCESSING_FAILURE,
                           f"the step is already {stored.status}; it may no longer be updated "
                           f"(PS3.4 F.7.2.2.3)", error_id=ERROR_ID_MAY_NO_LONGER_BE_UPDATED,
                           comment=COMMENT_MAY_NO_LONGER_BE_UPDATED)
        current = Dataset.from_json(stored.attributes_json)
        applied, ignored = _merge(current, _fetch(event, "modification_list"))
        update = _step_update(current)
        update_step(session, mpps_uid, update, utcnow())
    return _Outcome(status=update.status, series=len(update.performed_series),
                    instances=sum(len(s) for s in update.performed_series.values()),
                    study_uids=stored.study_uids, ignored=ignored, reply=applied)


def handle_n_set(event: Any, context: StoreContext) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_SET handler (bound with ``[context]``): update a step that is still IN PROGRESS."""
    calling_ae = _calling_ae(event)
    mpps_uid = _text(event.request.RequestedSOPInstanceUID)
    try:
        try:
            validate_uid(mpps_uid, "Requested SOP Instance UID")
        except InvalidUIDError as exc:
            raise _Refused(MppsStatus.NO_SUCH_SOP_INSTANCE, str(exc)) from None
        outcome = _apply_n_set(event, context, mpps_uid)
    except _Refused as refused:
        return _refusal(refused, "N-SET", mpps_uid, calling_ae)
    except Exception as exc:  # never let an exception reach pynetdicom
        return _failure(exc, "N-SET", mpps_uid, calling_ae)
    extra: dict[str, Any] = {"ignored_attributes": list(outcome.ignored)} if outcome.ignored else {}
    log.info("mpps_updated", mpps_uid=mpps_uid, status=outcome.status, series=outcome.series,
             instances=outcome.instances, study_uids=list(outcome.study_uids),
             calling_ae=calling_ae, **extra)
    return MppsStatus.SUCCESS, _encodable(outcome.reply, event)


def mpps_handlers(context: StoreContext) -> Iterable[tuple[Any, Any, list[Any]]]:
    """The (event, handler, args) bindings the Receiver adds when [mpps] is enabled."""
    return [(evt.EVT_N_CREATE, handle_n_create, [context]),
            (evt.EVT_N_SET, handle_n_set, [context])]
