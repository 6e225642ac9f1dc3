"""C-FIND SCU on the Modality Worklist Information Model (PS3.4 Annex K): ask the RIS for the
scheduled procedure steps that the ``[worklist]`` filter selects.

The identifier asks for the order's attributes (return keys, sent empty) and carries the
filter's matching keys inside the one Scheduled Procedure Step Sequence item, where PS3.4 K.6.1
places them (a Modality at the top level is not a matching key: DCMTK's wlmscpfs ignores it and
answers 0xFF01). Patient's Name is never asked for; Patient ID is, to match studies that carry
no worklist UID or accession number. What the SCP returns beyond the keys asked for is dropped.

Not every SCP matches on every key (wlmscpfs ignores Scheduled Station Name), so the items are
checked against the filter again here, and those that the SCP should not have returned are left
out. One association per query, released as soon as the last response arrived; over DICOM TLS
when ``[worklist.tls]`` is set (:func:`dicom_node.tls.client_context`).
"""

from __future__ import annotations

import threading
from datetime import date, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from pynetdicom.status import (
    MODALITY_WORKLIST_SERVICE_CLASS_STATUS,
    STATUS_PENDING,
    STATUS_SUCCESS,
    STATUS_WARNING,
    code_to_category,
)

from dicom_node import tls
from dicom_node.config import WorklistFilter, WorklistSection
from dicom_node.errors import ConfigError, WorklistError
from dicom_node.log import get_logger
from dicom_node.send.ae import ClientAE
from dicom_node.send.explain import association_failure, join, peer_logs
from dicom_node.worklist.order import scheduled_start, scheduled_step

log = get_logger()

#: Return keys at the top level of the identifier (Patient's Name deliberately absent).
RETURN_KEYS = (
    "AccessionNumber",
    "PatientID",
    "StudyInstanceUID",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
)
#: Sequence return keys at the top level (sent empty: every item's attributes come back).
RETURN_SEQUENCES = ("RequestedProcedureCodeSequence",)
#: Keys of the Scheduled Procedure Step Sequence item.
STEP_KEYS = (
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
)
STEP_SEQUENCES = ("ScheduledProtocolCodeSequence",)
#: Top-level attributes kept from a response: what was asked for, and its character set.
_KEPT = frozenset({*RETURN_KEYS, *RETURN_SEQUENCES, "ScheduledProcedureStepSequence",
                   "SpecificCharacterSet"})


def date_range(section: WorklistSection, today: date) -> tuple[date, date]:
    """First and last Scheduled Procedure Step Start Date the filter asks for."""
    return (today - timedelta(days=section.filter.days_before),
            today + timedelta(days=section.filter.days_after))


def build_identifier(section: WorklistSection, today: date) -> Dataset:
    """The C-FIND identifier: empty return keys, the filter's values as matching keys."""
    first, last = date_range(section, today)
    wanted = section.filter
    step = Dataset()
    for keyword in STEP_KEYS:
        setattr(step, keyword, "")
    step.ScheduledProcedureStepStartDate = f"{first:%Y%m%d}-{last:%Y%m%d}"
    if wanted.modality is not None:
        step.Modality = wanted.modality
    if wanted.scheduled_station_ae_title is not None:
        step.ScheduledStationAETitle = wanted.scheduled_station_ae_title
    if wanted.scheduled_station_name is not None:
        step.ScheduledStationName = wanted.scheduled_station_name
    for keyword in STEP_SEQUENCES:
        setattr(step, keyword, Sequence())
    identifier = Dataset()
    for keyword in RETURN_KEYS:
        setattr(identifier, keyword, "")
    for keyword in RETURN_SEQUENCES:
        setattr(identifier, keyword, Sequence())
    identifier.ScheduledProcedureStepSequence = Sequence([step])
    return identifier


def _values(ds: Dataset, keyword: str) -> list[str]:
    """The values of an attribute (several for a multi-valued one), stripped; [] when empty."""
    value = ds.get(keyword)
    if value is None:
        return []
    values = list(value) if isinstance(value, MultiValue) else [value]
    return [text for text in (str(v).strip() for v in values) if text]


def matches_filter(item: Dataset, wanted: WorklistFilter, first: date, last: date) -> bool:
    """Whether a returned item fits the filter. A value the item lacks does not exclude it (the
    SCP chose to return it); a value that differs does."""
    step = scheduled_step(item)
    for expected, keyword in ((wanted.modality, "Modality"),
                              (wanted.scheduled_station_ae_title, "ScheduledStationAETitle"),
                              (wanted.scheduled_station_name, "ScheduledStationName")):
        values = _values(step, keyword)
        if expected is not None and values and expected.strip() not in values:
            return False
    start = scheduled_start(item)
    return start is None or first <= start.date() <= last


# --------------------------------------------------------------------------------------------
# the query (pynetdicom's log records of its association: dicom_node.send.explain)


def query_worklist(section: WorklistSection, node_ae_title: str,
                   today: date | None = None) -> list[Dataset]:
    """C-FIND the worklist SCP of ``section``; the items it returns that fit the filter.

    ``today`` (default: the local date) anchors the Scheduled Procedure Step Start Date range.
    Raises :class:`~dicom_node.errors.WorklistError`, naming the SCP and the reason, when the
    connection is refused or times out, the association is rejected or aborted, a response does
    not come within ``timeout_seconds``, or the final status is a failure or a cancel.
    """
    today = today or date.today()
    first, last = date_range(section, today)
    where = (f"Modality Worklist {section.ae_title}@{section.host}:{section.port}"
             + (" over TLS" if section.tls is not None else ""))
    timeout = section.timeout_seconds
    ae = ClientAE(section.calling_ae_title or node_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(ModalityWorklistInformationFind)
    identifier = build_identifier(section, today)
    connected = threading.Event()

    def on_open(_event: Any) -> None:
        connected.set()

    try:
        tls_args = tls.tls_args(section.tls, section.host)
    except ConfigError as exc:  # a file changed or went away after the config was loaded
        reason = f"worklist.tls: {exc}"
        raise WorklistError(f"{where}: {reason}", reason) from None
    with peer_logs.watch(ae) as watch:
        try:
            assoc = ae.associate(section.host, section.port, ae_title=section.ae_title,
                                 tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
        except OSError as exc:  # the host name does not resolve
            reason = f"cannot connect: {exc}"
            raise WorklistError(f"{where}: {reason}", reason) from None
        try:
            if not assoc.is_established:
                join(assoc)
                reason = association_failure(
                    assoc, connected.is_set(), watch.messages, timeout,
                    "the Modality Worklist Information Model - FIND")
                raise WorklistError(f"{where}: {reason}", reason)
            try:
                items, undecodable = _collect(assoc, identifier, watch.messages, timeout)
            except WorklistError as exc:
                raise WorklistError(f"{where}: {exc}", str(exc)) from None
            finally:
                if assoc.is_established:
                    assoc.release()
        finally:
            join(assoc)
            ae.close_sockets()
    if undecodable:
        log.warning("worklist_item_undecodable", count=undecodable, ae_title=section.ae_title,
                    host=section.host, port=section.port)
    kept = [item for item in items if matches_filter(item, section.filter, first, last)]
    if len(kept) < len(items):
        log.debug("worklist_items_outside_filter", count=len(items) - len(kept),
                  ae_title=section.ae_title)
    return kept


def _collect(assoc: Association, identifier: Dataset, messages: list[str],
             timeout: float) -> tuple[list[Dataset], int]:
    """The identifiers of the pending responses; WorklistError unless the final status is a
    success or a warning."""
    items: list[Dataset] = []
    undecodable = 0
    for status, found in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
        if "Status" not in status:  # no response: DIMSE timeout, abort or closed connection
            if any(m.startswith("DIMSE timeout") for m in messages):
                raise WorklistError(f"no C-FIND response within {timeout:g} s")
            raise WorklistError("the association was aborted or the connection closed during "
                                "the C-FIND")
        code = int(status.Status)
        category = code_to_category(code)
        if category == STATUS_PENDING:
            if found is None:
                undecodable += 1
            else:
                items.append(_requested_only(found))
            continue
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            break
        meaning = MODALITY_WORKLIST_SERVICE_CLASS_STATUS.get(code, (category, ""))[1]
        comment = str(status.get("ErrorComment", "") or "").strip()
        raise WorklistError(f"C-FIND failed with status 0x{code:04X} ({category}"
                            + (f": {meaning}" if meaning else "")
                            + (f"; {comment}" if comment else "") + ")")
    return items, undecodable


def _requested_only(item: Dataset) -> Dataset:
    """The item without the top-level attributes that were not asked for (a RIS may add the
    patient's name, birth date, …; the node keeps none of them)."""
    for element in list(item):
        if element.keyword not in _KEPT:
            del item[element.tag]
    return item
