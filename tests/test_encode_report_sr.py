"""The AI draft report SR (TID 2000 in an Enhanced SR), built from real headers, checked by
dciodvfy and dsrdump. No model runs here: the drafts come from the consistency check alone."""

from __future__ import annotations

from datetime import datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file

from dicom_node.encode.common import node_version
from dicom_node.encode.report_sr import ADDED_PREFIX, DRAFT_TITLE, build_report_sr
from dicom_node.errors import EncodeError
from dicom_node.infer.report_check import Consistency, ReportDraft, check_and_repair
from dicom_node.messages import CodedConcept, FindingRecord, Measurement, ModelIdentity
from dicom_node.uids import result_uids
from tests.support.dicom_tools import dciodvfy, dsrdump

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456)
DRAFTER = ModelIdentity(name="report-drafter", version="1.0.0", manufacturer="dicom-node project",
                        synthetic_training_data=True, intended_use="DEMONSTRATION ONLY")
EFFUSION = CodedConcept("60046008", "SCT", "Pleural effusion")
CARDIOMEGALY = CodedConcept("8186001", "SCT", "Cardiomegaly")
NODULE = CodedConcept("786838002", "SCT", "Pulmonary nodule")
TABLE = {("SCT", "60046008"): "pleural_effusion", ("SCT", "8186001"): "cardiomegaly",
         ("SCT", "786838002"): "pulmonary_nodule"}
FINDINGS = (
    FindingRecord("chest-xray-cnn", "1.0.0", CARDIOMEGALY, False, 0.02),
    FindingRecord("chest-xray-cnn", "1.0.0", EFFUSION, True, 0.89),
    FindingRecord("lung-nodule-unet", "1.0.0", NODULE, True, 0.93, (
        Measurement(CodedConcept("81827009", "SCT", "Diameter"), 8.3,
                    CodedConcept("mm", "UCUM", "millimeter")),), "right upper lobe"),
)


def _header(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def _draft(findings_text: str, impression_text: str) -> ReportDraft:
    kept_f, kept_i, added_f, added_i, info = check_and_repair(
        findings_text, impression_text, FINDINGS, TABLE)
    return ReportDraft(kept_f, kept_i, added_f, added_i, findings_text, impression_text, info,
                       FINDINGS, {"Modality": "CR"})


def _uids(source: Dataset) -> object:
    return result_uids(source.StudyInstanceUID, "chest", DRAFTER.name, DRAFTER.version, "sr")


def _build(source: Dataset, draft: ReportDraft) -> Dataset:
    return build_report_sr([source], draft, DRAFTER, _uids(source),  # type: ignore[arg-type]
                           "chest", timestamp=WHEN, findings=FINDINGS)


def _saved(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(params=["RG1_UNCR.dcm", "CT_small.dcm"], ids=["chest-CR", "CT"])
def source(request: pytest.FixtureRequest) -> Dataset:
    return _header(request.param)


GOOD = _draft("There is a pleural effusion. The heart size is normal. A nodule is seen.",
              "Pleural effusion. Pulmonary nodule.")
REPAIRED = _draft("No pleural effusion. The heart is enlarged.", "Cardiomegaly.")


def test_report_sr_passes_dciodvfy_and_dsrdump(source: Dataset, tmp_path: Path) -> None:
    for name, draft in (("good", GOOD), ("repaired", REPAIRED)):
        path = _saved(_build(source, draft), tmp_path / f"{name}.dcm")
        report = dciodvfy(path)
        assert report.errors == (), report.output
        tree = dsrdump(path)
        assert tree.returncode == 0, tree.output
        assert not tree.errors, tree.output
        # dsrdump shortens long texts; the texts themselves are checked on the dataset below.
        for text in ("Diagnostic Imaging Report", '"Findings"', '"Impressions"',
                     '"Finding")="', '"Impression")="', "AI-GENERATED DRAFT",
                     "report-drafter 1.0.0", "Device"):
            assert text in tree.output, text


def test_report_sr_is_an_unverified_partial_preliminary_draft_in_the_source_study(
        source: Dataset) -> None:
    sr = _build(source, GOOD)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == (
        "UNVERIFIED", "PARTIAL", "PRELIMINARY")
    assert sr.SeriesDescription.startswith("AI draft report: report-drafter 1.0.0")
    assert "synthetic" in sr.SeriesDescription and len(sr.SeriesDescription) <= 64
    assert f"dicom-node {node_version()}" in list(sr.SoftwareVersions)
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "PatientName" in sr and sr.PatientID == source.PatientID


def _items(sr: Dataset) -> list[tuple[str, str]]:
    """(concept meaning, text) of every TEXT item, depth first."""
    found: list[tuple[str, str]] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                found.append((item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue))
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    return found


def test_report_sr_names_the_draft_its_sources_and_the_device_observer(source: Dataset) -> None:
    sr = _build(source, GOOD)
    texts = _items(sr)
    assert ("Equivalent Meaning of Concept Name", DRAFT_TITLE) in texts
    comments = " ".join(t for name, t in texts if name == "Comment")
    assert "AI-GENERATED DRAFT REPORT, UNVERIFIED" in comments
    assert "synthetic data" in comments
    assert "chest-xray-cnn 1.0.0: Cardiomegaly (absent, probability 0.02)" in comments
    assert "lung-nodule-unet 1.0.0: Pulmonary nodule (present" in comments
    assert "Consistency check: passed" in comments
    findings = [t for name, t in texts if name == "Finding"]
    assert findings == ["There is a pleural effusion. The heart size is normal. A nodule is seen."]
    observer = [i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"]
    names = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in observer}
    assert names["Device Observer Name"].TextValue == "report-drafter 1.0.0"


def test_sentences_added_by_the_check_are_marked_and_the_contradiction_is_gone(
        source: Dataset) -> None:
    assert not REPAIRED.consistency.passed
    sr = _build(source, REPAIRED)
    texts = _items(sr)
    findings = [t for name, t in texts if name == "Finding"]
    impressions = [t for name, t in texts if name == "Impression"]
    assert all(t.startswith(ADDED_PREFIX) for t in findings)  # both model sentences removed
    assert any("Pleural effusion: reported present by chest-xray-cnn 1.0.0" in t
               for t in findings)
    assert any("8.3 mm" in t and "right upper lobe" in t for t in findings)
    assert impressions and all(t.startswith(ADDED_PREFIX) for t in impressions)
    assert not any("No pleural effusion" in t or "enlarged" in t for t in findings + impressions)
    comments = " ".join(t for name, t in texts if name == "Comment")
    assert "sentence(s) were removed" in comments
    assert "Cardiomegaly asserted although reported absent" in comments
    assert "Pleural effusion contradicted" in comments


def test_same_inputs_encode_the_same_bytes(source: Dataset) -> None:
    def encoded() -> bytes:
        buffer = BytesIO()
        _build(source, GOOD).save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert encoded() == encoded()


def test_draft_without_text_or_sources_is_refused(source: Dataset) -> None:
    empty = ReportDraft("", "", (), (), "", "", Consistency((), ()), FINDINGS, {})
    with pytest.raises(EncodeError, match="neither findings nor impression"):
        _build(source, empty)
    with pytest.raises(EncodeError, match="no source instances"):
        build_report_sr([], GOOD, DRAFTER, _uids(source),  # type: ignore[arg-type]
                        "chest", timestamp=WHEN, findings=FINDINGS)
