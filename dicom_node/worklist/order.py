"""A worklist order as the rest of the node sees it: the attributes routes match on and what the
results carry (Accession Number, Referenced Request Sequence).

A worklist item (PS3.4 K.6.1) holds one Scheduled Procedure Step in the Scheduled Procedure Step
Sequence, inside its Requested Procedure and Imaging Service Request. The node keeps each item
whole as DICOM JSON (``scheduled_steps.item_json``) and reads it back into an :class:`Order`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.messages import CodedConcept
from dicom_node.store.db import ScheduledStep

#: How a study was matched to its order, in the order the matcher tries them.
MATCH_METHODS = ("study_uid", "accession", "patient_modality_date")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _codes(ds: Dataset, keyword: str) -> tuple[CodedConcept, ...]:
    return tuple(
        CodedConcept(value=_text(item, "CodeValue") or _text(item, "LongCodeValue"),
                     scheme=_text(item, "CodingSchemeDesignator"),
                     meaning=_text(item, "CodeMeaning"))
        for item in ds.get(keyword, []) or [])


def scheduled_step(item: Dataset) -> Dataset:
    """The (first) item of the Scheduled Procedure Step Sequence, or an empty dataset."""
    steps = item.get("ScheduledProcedureStepSequence") or []
    return steps[0] if len(steps) else Dataset()


def _date(value: str) -> date | None:
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date() if value else None
    except ValueError:
        return None


def scheduled_start(item: Dataset) -> datetime | None:
    """Scheduled Procedure Step Start Date and Time as a naive datetime (None when absent)."""
    step = scheduled_step(item)
    day = _date(_text(step, "ScheduledProcedureStepStartDate"))
    if day is None:
        return None
    clock = _text(step, "ScheduledProcedureStepStartTime").split(".")[0].ljust(6, "0")[:6]
    try:
        return datetime.combine(day, datetime.strptime(clock, "%H%M%S").time())
    except ValueError:
        return datetime.combine(day, datetime.min.time())


def step_key(item: Dataset) -> str:
    """Identity of a scheduled step across polls: the request (Study Instance UID, else
    Accession Number), the Requested Procedure ID and the Scheduled Procedure Step ID."""
    step = scheduled_step(item)
    request = _text(item, "StudyInstanceUID") or f"acc:{_text(item, 'AccessionNumber')}"
    return "|".join((request, _text(item, "RequestedProcedureID"),
                     _text(step, "ScheduledProcedureStepID")))[:256]


@dataclass(frozen=True)
class Order:
    """The worklist order a study was matched to."""

    step_id: int
    #: How it was matched (one of MATCH_METHODS).
    method: str
    study_instance_uid: str
    accession_number: str
    requested_procedure_id: str
    requested_procedure_description: str
    requested_procedure_codes: tuple[CodedConcept, ...]
    placer_order_number: str
    filler_order_number: str
    scheduled_procedure_step_id: str
    scheduled_procedure_step_description: str
    scheduled_protocol_codes: tuple[CodedConcept, ...]
    scheduled_station_ae_title: str
    scheduled_station_name: str
    modality: str
    scheduled_start: datetime | None

    def route_values(self) -> dict[str, frozenset[str]]:
        """Values per ``routes[].order`` key (config.ORDER_KEYS); empty values are left out."""
        values = {
            "RequestedProcedureCode": {c.value for c in self.requested_procedure_codes},
            "RequestedProcedureCodeMeaning": {c.meaning for c in self.requested_procedure_codes},
            "RequestedProcedureDescription": {self.requested_procedure_description},
            "RequestedProcedureID": {self.requested_procedure_id},
            "ScheduledProtocolCode": {c.value for c in self.scheduled_protocol_codes},
            "ScheduledProtocolCodeMeaning": {c.meaning for c in self.scheduled_protocol_codes},
            "ScheduledProcedureStepDescription": {self.scheduled_procedure_step_description},
            "ScheduledProcedureStepID": {self.scheduled_procedure_step_id},
            "ScheduledStationAETitle": {self.scheduled_station_ae_title},
            "ScheduledStationName": {self.scheduled_station_name},
            "Modality": {self.modality},
            "MatchMethod": {self.method},
        }
        return {k: frozenset(x for x in v if x) for k, v in values.items() if any(v)}

    def referenced_request(self, study_instance_uid: str) -> Dataset:
        """One item of the Referenced Request Sequence (0040,A370), PS3.3 Table C.17-2; also
        the shape of a Request Attributes Sequence (0040,0275) item, PS3.3 Table 10-9.

        ``study_instance_uid`` is the study the results go to, used when the order has none.
        """
        item = Dataset()
        item.StudyInstanceUID = self.study_instance_uid or study_instance_uid
        item.ReferencedStudySequence = Sequence()
        item.AccessionNumber = self.accession_number or None
        item.PlacerOrderNumberImagingServiceRequest = self.placer_order_number or None
        item.FillerOrderNumberImagingServiceRequest = self.filler_order_number or None
        item.RequestedProcedureID = self.requested_procedure_id or None
        item.RequestedProcedureDescription = self.requested_procedure_description or None
        item.RequestedProcedureCodeSequence = Sequence(
            [c.item() for c in self.requested_procedure_codes[:1]])
        return item



def order_from_item(item: Dataset, step_id: int, method: str) -> Order:
    """Read a worklist item (as returned by the RIS) into an :class:`Order`."""
    step = scheduled_step(item)
    return Order(
        step_id=step_id,
        method=method,
        study_instance_uid=_text(item, "StudyInstanceUID"),
        accession_number=_text(item, "AccessionNumber"),
        requested_procedure_id=_text(item, "RequestedProcedureID"),
        requested_procedure_description=_text(item, "RequestedProcedureDescription"),
        requested_procedure_codes=_codes(item, "RequestedProcedureCodeSequence"),
        placer_order_number=_text(item, "PlacerOrderNumberImagingServiceRequest"),
        filler_order_number=_text(item, "FillerOrderNumberImagingServiceRequest"),
        scheduled_procedure_step_id=_text(step, "ScheduledProcedureStepID"),
        scheduled_procedure_step_description=_text(step, "ScheduledProcedureStepDescription"),
        scheduled_protocol_codes=_codes(step, "ScheduledProtocolCodeSequence"),
        scheduled_station_ae_title=_text(step, "ScheduledStationAETitle"),
        scheduled_station_name=_text(step, "ScheduledStationName"),
        modality=_text(step, "Modality"),
        scheduled_start=scheduled_start(item),
    )


def item_from_json(text: str) -> Dataset:
    """A stored worklist item (DICOM JSON) back as a dataset."""
    return Dataset.from_json(text)


def step_order(step: ScheduledStep, method: str) -> Order:
    """A stored scheduled step (its item kept as DICOM JSON) as an :class:`Order`."""
    return order_from_item(item_from_json(step.item_json), step.id, method)
