"""The whole trip against a real PACS: Orthanc auto-forwards a chest CR to the node, the node
stores, completes, routes, runs the CNN and sends a TID 1500 SR back into the same study."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import sample_file
from tests.support.chest_pacs import pacs_with_node, wait_for_the_sr
from tests.support.dicom_tools import dciodvfy, dsrdump
from tests.support.peers import NodeProcess, OrthancServer, dcmtk


@pytest.mark.slow
def test_forwarded_chest_cr_comes_back_as_a_valid_sr_in_the_same_study(
        orthanc_factory: Callable[..., OrthancServer],
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    pacs, node = pacs_with_node(orthanc_factory, node_factory)
    chest = sample_file("RG1_UNCR.dcm")
    source = dcmread(chest, stop_before_pixels=True)
    sent = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port), chest)
    assert sent.returncode == 0, sent.stderr

    sr_path = tmp_path / "result.dcm"
    sr = wait_for_the_sr(pacs, source.StudyInstanceUID, sr_path)

    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert "AI" in sr.SeriesDescription and "synthetic" in sr.SeriesDescription
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    report = dciodvfy(sr_path)
    assert report.errors == (), report.output
    tree = dsrdump(sr_path)
    assert tree.returncode == 0, tree.output
    for finding in ("Cardiomegaly", "Pleural effusion", "Pulmonary nodule"):
        assert finding in tree.output
    assert "chest-xray-cnn" in tree.output

    dry_run = node.cli("route", "--dry-run", str(source.StudyInstanceUID))
    assert dry_run.returncode == 0, dry_run.stderr
    assert "route 'chest radiographs': FIRES" in dry_run.stdout
    (job,) = node.jobs()
    assert (job["state"], job["delivered"], job["study_instance_uid"]) == (
        "done", "pacs", source.StudyInstanceUID)
    # The SR arriving in Orthanc made the study stable again: the Lua guard must not re-send it,
    # and the node must not process its own result.
    assert pacs.instance_count() == 2
    assert len(node.jobs()) == 1
    # No log line carries the patient's name or ID.
    logs = (node.log_text() + "".join(p.read_text() for p in node.workdir.glob("*.log")))
    for identifying in (str(source.PatientName), str(source.PatientID)):
        if identifying.strip():
            assert identifying not in logs
