"""Small frozen types that stages pass to each other (never raw dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


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
