"""The whole trip against a real PACS: Orthanc auto-forwards a chest CR to the node, the node
stores, completes, routes, runs the CNN and sends a TID 1500 SR back into the same study."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from tests.conftest import sample_file
from tests.dicom_tools import dciodvfy, dsrdump
from tests.peers import NodeProcess, OrthancServer, auto_forward_lua, dcmtk, wait_until

REPO = Path(__file__).resolve().parent.parent
CHEST_MODEL = {"name": "chest-xray-cnn", "path": str(REPO / "models" / "chest-xray-cnn")}
CHEST_ROUTE = {"name": "chest radiographs", "match": {"Modality": ["CR", "DX"]},
               "models": ["chest-xray-cnn"], "send_to": ["pacs"]}


def pacs_with_node(orthanc_factory: Callable[..., OrthancServer],
                   node_factory: Callable[..., NodeProcess], role: str = "serve", *,
                   models: list[dict[str, str]] | None = None,
                   routes: list[dict[str, object]] | None = None,
                   **node_kwargs: object) -> tuple[OrthancServer, NodeProcess]:
    """Orthanc as the PACS, auto-forwarding to a node that sends its results back to it."""
    node = node_factory(role, start=False, models=models or [CHEST_MODEL],
                        routes=routes or [CHEST_ROUTE], **node_kwargs)
    pacs = orthanc_factory(modalities={"node": (node.ae_title, "127.0.0.1", node.port)},
                           stable_age=1, lua=auto_forward_lua("node"))
    node.document["destinations"] = [{"name": "pacs", "ae_title": pacs.ae_title,
                                      "host": "127.0.0.1", "port": pacs.dicom_port}]
    node.document["jobs"] = {"poll_seconds": 0.2, "retry_base_seconds": 1}
    return pacs, node.start()


def sr_series(pacs: OrthancServer, study_uid: str) -> list[dict[str, object]]:
    """The SR series Orthanc holds in a study."""
    return [s for s in pacs.series_of_study(study_uid)
            if s["MainDicomTags"].get("Modality") == "SR"]  # type: ignore[index, union-attr]


def wait_for_the_sr(pacs: OrthancServer, study_uid: str, path: Path) -> Dataset:
    """Wait for the node's one SR (one series, one instance) in the study; write it to ``path``
    and return it."""
    wait_until(lambda: bool(sr_series(pacs, study_uid)), 120,
               "the node's SR to arrive in Orthanc")
    (series,) = sr_series(pacs, study_uid)
    (instance_id,) = series["Instances"]  # type: ignore[misc]
    path.write_bytes(pacs.instance_file(str(instance_id)))
    return dcmread(path)


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
