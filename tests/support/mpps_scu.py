"""A modality's side of MPPS for tests: realistic N-CREATE / N-SET data sets and a pynetdicom SCU.

``mpps_create_dataset`` builds what a CT or MR console sends when an examination starts (PS3.4
Table F.7.2-1, N-CREATE column); ``mpps_completed_dataset`` and ``mpps_discontinued_dataset`` what
it sends when it ends. ``send_mpps`` runs N-CREATE (and optionally N-SET) on one association, the
way most modalities do; ``send_mpps_set`` sends an N-SET on an association of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

#: Patient attributes the data sets carry: the tests check that no log event ever shows them.
PATIENT_NAME = "Testpatient^Erika"
PATIENT_ID = "PID-0047-1147"
START = datetime(2025, 3, 4, 9, 12, 0)
END = datetime(2025, 3, 4, 9, 31, 30)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def mpps_create_dataset(study_uid: str | Sequence[str], modality: str = "CT", *,
                        station_ae: str = "CT_SCANNER1", accession: str = "ACC20250304",
                        patient_name: str = PATIENT_NAME, patient_id: str = PATIENT_ID,
                        pps_id: str = "PPS-0815", started: datetime = START,
                        character_set: str | None = None) -> Dataset:
    """The N-CREATE attribute list of a step that starts now; one Scheduled Step Attributes item
    per study UID given."""
    ds = Dataset()
    if character_set is not None:
        ds.SpecificCharacterSet = character_set
    items = []
    for uid in [study_uid] if isinstance(study_uid, str) else study_uid:
        item = Dataset()
        item.StudyInstanceUID = uid
        item.ReferencedStudySequence = []
        item.AccessionNumber = accession
        item.RequestedProcedureID = "RP-12"
        item.RequestedProcedureDescription = "CT chest"
        item.ScheduledProcedureStepID = "SPS-34"
        item.ScheduledProcedureStepDescription = "CT chest without contrast"
        item.ScheduledProtocolCodeSequence = []
        items.append(item)
    ds.ScheduledStepAttributesSequence = items
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = pps_id
    ds.PerformedStationAETitle = station_ae
    ds.PerformedStationName = "CT1"
    ds.PerformedLocation = "Radiology 1"
    ds.PerformedProcedureStepStartDate = started.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = started.strftime("%H%M%S")
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT chest"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.Modality = modality
    ds.StudyID = "4711"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def _series_items(series: Mapping[str, Sequence[tuple[str, str]]],
                  protocol: str) -> list[Dataset]:
    items = []
    for series_uid, instances in series.items():
        item = Dataset()
        item.PerformingPhysicianName = ""
        item.ProtocolName = protocol
        item.OperatorsName = ""
        item.SeriesInstanceUID = series_uid
        item.SeriesDescription = protocol
        item.RetrieveAETitle = ""
        images: list[Dataset] = []
        others: list[Dataset] = []
        for sop_class, sop_uid in instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_uid
            # Images in the Referenced Image Sequence, SR and other objects in the non-image one
            is_image = "1.2.840.10008.5.1.4.1.1.88" not in sop_class
            (images if is_image else others).append(ref)
        item.ReferencedImageSequence = images
        item.ReferencedNonImageCompositeSOPInstanceSequence = others
        items.append(item)
    return items


def mpps_completed_dataset(series: Mapping[str, Sequence[tuple[str, str]]], *,
                           protocol: str = "Chest routine", ended: datetime = END) -> Dataset:
    """The final N-SET of a step that ended well: {series UID: [(SOP class, SOP instance)]}."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = ended.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = ended.strftime("%H%M%S")
    ds.PerformedSeriesSequence = _series_items(series, protocol)
    return ds


def mpps_discontinued_dataset(series: Mapping[str, Sequence[tuple[str, str]]] | None = None, *,
                              reason: tuple[str, str, str] = ("110514", "DCM",
                                                              "Incorrect worklist entry selected"),
                              ended: datetime = END) -> Dataset:
    """The final N-SET of a step broken off; ``reason`` is (code value, scheme, meaning) from
    CID 9300 "Procedure Discontinuation Reasons"."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "DISCONTINUED"
    ds.PerformedProcedureStepEndDate = ended.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = ended.strftime("%H%M%S")
    ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = [_code(*reason)]
    ds.PerformedSeriesSequence = _series_items(series or {}, "Chest routine")
    return ds


@contextmanager
def mpps_association(host: str, port: int, called_aet: str,
                     calling_aet: str = "CT_SCANNER1") -> Iterator[Association]:
    """An established association with the MPPS SOP class accepted (released afterwards)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(host, port, ae_title=called_aet)
    assert assoc.is_established, "the SCP refused the association"
    try:
        assert any(cx.abstract_syntax == ModalityPerformedProcedureStep
                   for cx in assoc.accepted_contexts), "MPPS presentation context not accepted"
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _status(status: Dataset) -> int:
    assert "Status" in status, "no N-CREATE / N-SET response (timeout or abort)"
    return int(status.Status)


def send_mpps(host: str, port: int, called_aet: str, create_ds: Dataset,
              set_ds: Dataset | None = None, *, mpps_uid: str | None = None,
              calling_aet: str = "CT_SCANNER1") -> tuple[int, int | None]:
    """N-CREATE ``create_ds`` as ``mpps_uid`` (a new UID if None), then N-SET ``set_ds`` if given,
    on one association. Returns (N-CREATE status, N-SET status or None)."""
    mpps_uid = mpps_uid or generate_uid()
    with mpps_association(host, port, called_aet, calling_aet) as assoc:
        status, _ = assoc.send_n_create(create_ds, ModalityPerformedProcedureStep, mpps_uid)
        created = _status(status)
        if set_ds is None:
            return created, None
        status, _ = assoc.send_n_set(set_ds, ModalityPerformedProcedureStep, mpps_uid)
        return created, _status(status)


def send_mpps_set(host: str, port: int, called_aet: str, mpps_uid: str, set_ds: Dataset, *,
                  calling_aet: str = "CT_SCANNER1") -> int:
    """N-SET ``set_ds`` on the step ``mpps_uid``, on an association of its own."""
    with mpps_association(host, port, called_aet, calling_aet) as assoc:
        status, _ = assoc.send_n_set(set_ds, ModalityPerformedProcedureStep, mpps_uid)
        return _status(status)


def send_mpps_create_without_uid(host: str, port: int, called_aet: str, create_ds: Dataset, *,
                                 calling_aet: str = "CT_SCANNER1") -> tuple[int, str | None]:
    """N-CREATE with no Affected SOP Instance UID: (status, the UID the SCP answered with)."""
    answered: list[str] = []

    def on_response(event: Any) -> None:
        command = event.message.command_set
        if "AffectedSOPInstanceUID" in command:
            answered.append(str(command.AffectedSOPInstanceUID))

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate(host, port, ae_title=called_aet,
                         evt_handlers=[(evt.EVT_DIMSE_RECV, on_response)])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(create_ds, ModalityPerformedProcedureStep, None)
        return _status(status), (answered[-1] if answered else None)
    finally:
        assoc.release()
