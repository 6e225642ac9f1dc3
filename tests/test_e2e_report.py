"""The report drafter against a real PACS: Orthanc auto-forwards a chest CR to the node; the route
runs chest-xray-cnn, then report-drafter on its findings (the job graph: report jobs wait for
the route's other jobs); Orthanc ends up with both SRs in the source study."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from tests.conftest import sample_file
from tests.support.chest_pacs import CHEST_MODEL, pacs_with_node, sr_series
from tests.support.dicom_tools import dciodvfy, dsrdump
from tests.support.peers import NodeProcess, OrthancServer, dcmtk, wait_until

REPO = Path(__file__).resolve().parent.parent
REPORT_MODEL = {"name": "report-drafter", "path": str(REPO / "models" / "report-drafter")}
ROUTE = {"name": "chest radiographs with report", "match": {"Modality": ["CR", "DX"]},
         "models": ["chest-xray-cnn", "report-drafter"], "send_to": ["pacs"]}


def _texts(items: list[Dataset], name: str) -> list[str]:
    found = []
    for item in items:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == name:
            found.append(str(item.TextValue))
        found += _texts(list(item.get("ContentSequence", [])), name)
    return found


@pytest.mark.slow
def test_route_with_classifier_and_drafter_sends_both_srs_into_the_study(
        orthanc_factory: Callable[..., OrthancServer],
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    pacs, node = pacs_with_node(orthanc_factory, node_factory,
                                models=[CHEST_MODEL, REPORT_MODEL], routes=[ROUTE])
    chest = sample_file("RG1_UNCR.dcm")
    source = dcmread(chest, stop_before_pixels=True)
    sent = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port), chest)
    assert sent.returncode == 0, sent.stderr

    wait_until(lambda: len(sr_series(pacs, source.StudyInstanceUID)) >= 2, 180,
               "both SRs (classifier and draft report) to arrive in Orthanc")
    srs: dict[str, Path] = {}
    for series in sr_series(pacs, source.StudyInstanceUID):
        (instance_id,) = series["Instances"]  # type: ignore[misc]
        path = tmp_path / f"{instance_id}.dcm"
        path.write_bytes(pacs.instance_file(str(instance_id)))
        srs[str(dcmread(path, stop_before_pixels=True).ManufacturerModelName)] = path
    assert set(srs) == {"chest-xray-cnn", "report-drafter"}

    for path in srs.values():
        sr = dcmread(path)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        report = dciodvfy(path)
        assert report.errors == (), report.output
        assert dsrdump(path).returncode == 0

    draft = dcmread(srs["report-drafter"])
    assert draft.SeriesDescription.startswith("AI draft report")
    assert (draft.VerificationFlag, draft.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")
    # The classifier's positive findings on RG1 (its card's notes): pleural effusion and a
    # pulmonary nodule; cardiomegaly absent.
    classifier = dcmread(srs["chest-xray-cnn"])
    present = {str(group.ConceptNameCodeSequence[0].CodeMeaning)
               for group in _code_items(list(classifier.ContentSequence))
               if group.ConceptCodeSequence[0].CodeMeaning == "Present"}
    assert present == {"Pleural effusion", "Pulmonary nodule"}
    findings = " ".join(_texts(list(draft.ContentSequence), "Finding")).lower()
    assert "pleural effusion" in findings and "nodule" in findings
    assert "cardiomegaly is present" not in findings and "enlarged" not in findings
    comments = " ".join(_texts(list(draft.ContentSequence), "Comment"))
    assert "chest-xray-cnn 1.0.0" in comments and "AI-GENERATED DRAFT" in comments

    jobs = {job["model"]: job for job in node.jobs()}
    assert {m: (j["state"], j["delivered"]) for m, j in jobs.items()} == {
        "chest-xray-cnn": ("done", "pacs"), "report-drafter": ("done", "pacs")}
    # Neither result reopened the study: no further jobs, and the Lua guard sent nothing back.
    assert pacs.instance_count() == 3
    assert len(node.jobs()) == 2


def _code_items(items: list[Dataset]) -> list[Dataset]:
    found = []
    for item in items:
        if item.ValueType == "CODE":
            found.append(item)
        found += _code_items(list(item.get("ContentSequence", [])))
    return found
