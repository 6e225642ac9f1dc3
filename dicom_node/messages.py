"""Small frozen types that stages pass to each other (never raw dicts)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class StoredInstance:
    """One instance that is durably in the spool and committed in the index."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    path: Path
    size: int
    calling_ae_title: str
    received_at: datetime
    duplicate: bool = False
    #: True when the study had already been processed and this instance reopened it.
    reopened_study: bool = False


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept (value, scheme designator, meaning) as in PS3.3 §8.8."""

    value: str
    scheme: str
    meaning: str

    def item(self) -> Dataset:
        """The concept as a code sequence item (Code Value, Coding Scheme Designator, Code
        Meaning: the Basic Code Sequence Macro, PS3.3 Table 8.8-1)."""
        item = Dataset()
        item.CodeValue = self.value
        item.CodingSchemeDesignator = self.scheme
        item.CodeMeaning = self.meaning
        return item


@dataclass(frozen=True)
class ModelIdentity:
    """What a result says about the model that made it."""

    name: str
    version: str
    manufacturer: str
    #: True when the model was trained on synthetic data; results must say so.
    synthetic_training_data: bool
    intended_use: str = ""


@dataclass(frozen=True)
class Finding:
    """One classifier output for a study: a coded finding with its probability."""

    concept: CodedConcept
    probability: float
    threshold: float

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class ClassificationResult:
    """What a classifier concluded about a set of source images."""

    model: ModelIdentity
    findings: tuple[Finding, ...]
    #: SOP Instance UIDs of the images the model looked at.
    source_sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class ResultUIDs:
    """Deterministic UIDs of one result object (see dicom_node.uids)."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int


@dataclass(frozen=True)
class StudySummary:
    """What routing sees of a study: keyword → set of values found, plus the calling AEs.

    Study and series level attributes come from one representative instance per series.
    """

    study_instance_uid: str
    values: dict[str, frozenset[str]] = field(default_factory=dict)
    calling_ae_titles: frozenset[str] = frozenset()
    instance_count: int = 0
    series_count: int = 0


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement attached to a finding, e.g. a nodule's volume (UCUM unit)."""

    name: CodedConcept
    value: float
    unit: CodedConcept


@dataclass(frozen=True)
class FindingRecord:
    """What one model concluded, in a form other models (the report drafter) and the job listing
    can read back. Stored as JSON with the job; see :func:`findings_to_json`."""

    model: str
    model_version: str
    concept: CodedConcept
    present: bool
    probability: float | None = None
    measurements: tuple[Measurement, ...] = ()
    #: Free text the next model may use (e.g. "right upper lobe"); never patient data.
    detail: str = ""


@dataclass(frozen=True)
class PipelineInput:
    """Everything a model pipeline gets for one job."""

    study_instance_uid: str
    generation: int
    route_name: str
    #: The study's instances of the card's modalities, full datasets (pixels included).
    sources: tuple[Any, ...]
    #: Findings of the other models of the same route and study generation that finished before
    #: this job (only report models wait for them; see jobs.queue).
    prior_findings: tuple[FindingRecord, ...]
    #: The job's timestamp: content/series dates of the results, so a re-run encodes the same.
    timestamp: datetime


@dataclass(frozen=True)
class PipelineOutput:
    """What a model pipeline hands back: DICOM objects to send, and its findings."""

    objects: tuple[Any, ...]
    findings: tuple[FindingRecord, ...] = ()
    #: Facts for the job log (no patient data): e.g. {"images": 40, "nodules": 2}.
    summary: dict[str, object] = field(default_factory=dict)


def findings_to_json(findings: tuple[FindingRecord, ...]) -> str:
    """Serialise findings for the jobs table."""
    return json.dumps([asdict(f) for f in findings])


def findings_from_json(text: str | None) -> tuple[FindingRecord, ...]:
    """The inverse of :func:`findings_to_json`."""
    records = []
    for raw in json.loads(text or "[]"):
        records.append(FindingRecord(
            model=raw["model"], model_version=raw["model_version"],
            concept=CodedConcept(**raw["concept"]), present=raw["present"],
            probability=raw["probability"],
            measurements=tuple(Measurement(CodedConcept(**m["name"]), m["value"],
                                           CodedConcept(**m["unit"]))
                               for m in raw["measurements"]),
            detail=raw["detail"]))
    return tuple(records)


@dataclass(frozen=True)
class SourceFrame:
    """One source image frame a result is aligned to."""

    sop_instance_uid: str
    #: 1-based; 1 for a single-frame image.
    frame_number: int = 1


@dataclass(frozen=True)
class SegmentedRegion:
    """One connected region of a segment (e.g. one lung nodule), measured in patient space."""

    #: 1-based index into SegmentationResult.segments.
    segment_number: int
    volume_mm3: float
    #: Longest distance between two points of the region (3D), in mm.
    longest_diameter_mm: float
    #: Centre of mass in patient coordinates (mm).
    centroid: tuple[float, float, float]
    mean_probability: float
    #: Indices into SegmentationResult.frames of the frames the region appears on.
    frames: tuple[int, ...]


@dataclass(frozen=True)
class SegmentationResult:
    """A segmenter's output on one series, aligned to its source frames in spatial order."""

    model: ModelIdentity
    #: (segmented property type, segmented property category) per segment number (1-based).
    segments: tuple[tuple[CodedConcept, CodedConcept], ...]
    #: The source frames, ordered along the slice normal (not by file order).
    frames: tuple[SourceFrame, ...]
    #: numpy uint8 array (len(frames), rows, cols): 0 background, k = segment number k.
    mask: Any
    regions: tuple[SegmentedRegion, ...]
    #: What was odd about the series' geometry (missing slices, irregular spacing, drift); the
    #: SR states each, since volumes and diameters rest on that geometry.
    geometry_warnings: tuple[str, ...] = ()
