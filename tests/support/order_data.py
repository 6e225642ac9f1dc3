"""Small study and worklist-item builders for the order-awareness tests (no network)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.store.db import ScheduledStep, Study, StudyState, utcnow
from dicom_node.store.index import record_instance
from dicom_node.worklist.order import scheduled_start, step_key


@dataclass(frozen=True)
class StoredStudy:
    study_uid: str
    series: dict[str, list[str]]  # series uid → SOP instance uids


def write_instance(folder: Path, *, study_uid: str, series_uid: str, sop_uid: str,
                   modality: str = "CT", accession: str = "", patient_id: str = "PAT-1",
                   study_date: str = "20261121") -> Path:
    """A tiny valid CT image file (8×8 pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = modality
    ds.AccessionNumber = accession
    ds.PatientID = patient_id
    ds.PatientName = "Order^Test"
    ds.StudyDate = study_date
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = bytes(128)
    path = folder / f"{sop_uid}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def store_study(engine: Engine, folder: Path, *, series: int = 1, per_series: int = 2,
                received_ago: float = 0.0, skip: tuple[tuple[int, int], ...] = (),
                study_uid: str | None = None, **header: str) -> StoredStudy:
    """Write and index a study; ``skip`` lists (series, instance) indices made but not stored
    (they are in the returned layout: what an MPPS would list)."""
    study_uid = study_uid or generate_uid()
    layout: dict[str, list[str]] = {}
    when = utcnow() - timedelta(seconds=received_ago)
    for s in range(series):
        series_uid = generate_uid()
        layout[series_uid] = []
        for i in range(per_series):
            sop_uid = generate_uid()
            layout[series_uid].append(sop_uid)
            if (s, i) in skip:
                continue
            store_instance(engine, folder, study_uid, series_uid, sop_uid, when, **header)
    return StoredStudy(study_uid, layout)


def store_instance(engine: Engine, folder: Path, study_uid: str, series_uid: str, sop_uid: str,
                   when: datetime | None = None, **header: str) -> None:
    path = write_instance(folder, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                          **header)
    record_instance(engine, sop_instance_uid=sop_uid, sop_class_uid=CTImageStorage,
                    study_instance_uid=study_uid, series_instance_uid=series_uid,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    modality=header.get("modality", "CT"), path=path, relative_path=str(path),
                    size=path.stat().st_size, calling_ae_title="MODALITY",
                    received_at=when or utcnow())


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def worklist_item(*, accession: str = "ACC-1", study_uid: str = "", patient_id: str = "PAT-1",
                  modality: str = "CT", station: str = "CT01", start: str = "20261121",
                  procedure_code: str = "CTCHEST", procedure_meaning: str = "CT chest",
                  protocol_code: str = "P-LOWDOSE", sps_id: str = "SPS-1",
                  rp_id: str = "RP-1") -> Dataset:
    """A Modality Worklist item as a RIS returns it (PS3.4 K.6.1.2)."""
    item = Dataset()
    item.AccessionNumber = accession
    item.StudyInstanceUID = study_uid or None
    item.PatientID = patient_id
    item.RequestedProcedureID = rp_id
    item.RequestedProcedureDescription = procedure_meaning
    item.RequestedProcedureCodeSequence = Sequence([_code(procedure_code, "99RIS",
                                                          procedure_meaning)])
    item.PlacerOrderNumberImagingServiceRequest = f"PL-{accession}"
    item.FillerOrderNumberImagingServiceRequest = f"FI-{accession}"
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = start
    step.ScheduledProcedureStepStartTime = "090000"
    step.ScheduledProcedureStepID = sps_id
    step.ScheduledProcedureStepDescription = f"{procedure_meaning} step"
    step.ScheduledProtocolCodeSequence = Sequence([_code(protocol_code, "99RIS", "Protocol")])
    item.ScheduledProcedureStepSequence = Sequence([step])
    return item


def add_step(sessions: sessionmaker[Session], item: Dataset) -> int:
    """Store a worklist item as the poller would."""
    now = utcnow()
    step = item.ScheduledProcedureStepSequence[0]
    with sessions.begin() as session:
        row = ScheduledStep(
            key=step_key(item), study_instance_uid=str(item.get("StudyInstanceUID") or "")
            or None, accession_number=str(item.AccessionNumber) or None,
            patient_id=str(item.PatientID) or None, modality=str(step.Modality),
            scheduled_station_ae_title=str(step.ScheduledStationAETitle),
            scheduled_start=scheduled_start(item), item_json=json.dumps(item.to_json_dict()),
            first_seen_at=now, last_seen_at=now)
        session.add(row)
        session.flush()
        return int(row.id)


def add_study(sessions: sessionmaker[Session], study_uid: str) -> None:
    """An index row for a study (no instances): what match_study's summaries stand for."""
    now = utcnow()
    with sessions.begin() as session:
        session.add(Study(study_instance_uid=study_uid, state=StudyState.RECEIVING,
                          generation=0, first_received_at=now, last_received_at=now,
                          instance_count=0))
