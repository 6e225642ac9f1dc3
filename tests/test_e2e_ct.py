"""CT studies through a real PACS: Orthanc auto-forwards to the node, and gets back in the same
study a SEG + nodule SR (lung nodules), a denoised derived series (GAN), a haemorrhage SR (head
CT) and the report drafter's SR; every object passes dciodvfy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import sample_file
from tests.support.ct_series import write_chest_ct_series
from tests.support.dicom_tools import dciodvfy
from tests.support.peers import NodeProcess, OrthancServer, auto_forward_lua, dcmtk, wait_until

REPO = Path(__file__).resolve().parent.parent


def _model(name: str) -> dict[str, str]:
    return {"name": name, "path": str(REPO / "models" / name)}


CHEST_CT_ROUTES = [
    {"name": "chest CT", "match": {"Modality": "CT", "BodyPartExamined": "CHEST"},
     "models": ["lung-nodule-unet", "report-drafter"], "send_to": ["pacs"]},
    {"name": "chest CT enhancement", "match": {"Modality": "CT", "BodyPartExamined": "CHEST"},
     "models": ["ct-denoise-gan"], "send_to": ["pacs"]},
]
HEAD_CT_ROUTES = [
    {"name": "head CT", "match": {"Modality": "CT", "BodyPartExamined": {"regex": "HEAD|BRAIN"}},
     "models": ["head-ct-ich-cnn", "report-drafter"], "send_to": ["pacs"]},
]


def _pacs_and_node(orthanc_factory: Callable[..., OrthancServer],
                   node_factory: Callable[..., NodeProcess],
                   routes: list[dict[str, Any]]) -> tuple[OrthancServer, NodeProcess]:
    names = sorted({name for route in routes for name in route["models"]})
    node = node_factory("serve", start=False, models=[_model(n) for n in names], routes=routes,
                        stable_after_seconds=2.0)
    pacs = orthanc_factory(modalities={"node": (node.ae_title, "127.0.0.1", node.port)},
                           stable_age=2, lua=auto_forward_lua("node"))
    node.document["destinations"] = [{"name": "pacs", "ae_title": pacs.ae_title,
                                      "host": "127.0.0.1", "port": pacs.dicom_port}]
    node.document["jobs"] = {"poll_seconds": 0.2, "retry_base_seconds": 1, "workers": 2}
    return pacs, node.start()


def _series_by_modality(pacs: OrthancServer, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for series in pacs.series_of_study(study_uid):
        found.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return found


def _fetch(pacs: OrthancServer, series: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for instance_id in series["Instances"]:
        path = folder / f"{instance_id}.dcm"
        path.write_bytes(pacs.instance_file(instance_id))
        paths.append(path)
    return paths


def _assert_valid(paths: list[Path]) -> None:
    for path in paths:
        report = dciodvfy(path)
        assert report.errors == (), report.output


@pytest.mark.slow
def test_chest_ct_comes_back_with_seg_nodule_sr_report_and_denoised_series(
        orthanc_factory: Callable[..., OrthancServer],
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    pacs, node = _pacs_and_node(orthanc_factory, node_factory, CHEST_CT_ROUTES)
    files = write_chest_ct_series(tmp_path / "ct", nodules=[((-60.0, -20.0, 0.0), 14.0),
                                                           ((55.0, 10.0, 12.0), 10.0)],
                                  slices=32, shuffle_files=True)
    source = dcmread(files[0], stop_before_pixels=True)
    sent = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port), *files)
    assert sent.returncode == 0, sent.stderr

    def arrived() -> bool:
        found = _series_by_modality(pacs, source.StudyInstanceUID)
        derived = [s for s in found.get("CT", [])
                   if s["MainDicomTags"]["SeriesInstanceUID"] != source.SeriesInstanceUID]
        return ("SEG" in found and len(found.get("SR", [])) == 2
                and len(derived) == 1 and len(derived[0]["Instances"]) == len(files))

    wait_until(arrived, 300, "SEG, nodule SR, report SR and the derived CT series")
    found = _series_by_modality(pacs, source.StudyInstanceUID)
    seg_paths = _fetch(pacs, found["SEG"][0], tmp_path / "seg")
    seg = dcmread(seg_paths[0])
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    sr_paths = [p for i, s in enumerate(found["SR"]) for p in _fetch(pacs, s, tmp_path / f"sr{i}")]
    derived = next(s for s in found["CT"] if s["MainDicomTags"]["SeriesInstanceUID"]
                   != source.SeriesInstanceUID)
    derived_paths = _fetch(pacs, derived, tmp_path / "derived")
    assert len(derived_paths) == len(files)
    first = dcmread(derived_paths[0])
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "AI" in first.SeriesDescription
    _assert_valid(seg_paths + sr_paths + derived_paths[:3])
    texts = [str(dcmread(p).SeriesDescription) for p in sr_paths]
    assert any("report" in t.lower() for t in texts), texts
    jobs = {job["model"]: job["state"] for job in node.jobs()}
    assert jobs == {"lung-nodule-unet": "done", "report-drafter": "done",
                    "ct-denoise-gan": "done"}


@pytest.mark.slow
def test_head_ct_comes_back_with_a_haemorrhage_sr_and_a_report(
        orthanc_factory: Callable[..., OrthancServer],
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    pacs, node = _pacs_and_node(orthanc_factory, node_factory, HEAD_CT_ROUTES)
    head = dcmread(sample_file("693_UNCR.dcm"))
    head.BodyPartExamined = "HEAD"
    path = tmp_path / "head.dcm"
    head.save_as(path)
    sent = dcmtk("storescu", "-aec", pacs.ae_title, "127.0.0.1", str(pacs.dicom_port), path)
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: len(_series_by_modality(pacs, head.StudyInstanceUID).get("SR", [])) == 2,
               180, "the haemorrhage SR and the report SR")
    found = _series_by_modality(pacs, head.StudyInstanceUID)
    sr_paths = [p for i, s in enumerate(found["SR"]) for p in _fetch(pacs, s, tmp_path / f"sr{i}")]
    _assert_valid(sr_paths)
    jobs = {job["model"]: job["state"] for job in node.jobs()}
    assert jobs == {"head-ct-ich-cnn": "done", "report-drafter": "done"}
