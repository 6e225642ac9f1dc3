"""The segmenter pipeline: a job's CT series → SEG + nodule SR in the study, and findings that the
report model and the job listing read back.

Two kinds of test: with the model replaced by a prepared SegmentationResult (the pipeline's
wiring), and on synthetic chest CT series written as DICOM files (tests/support/ct_series.py,
single-frame and Enhanced CT multi-frame) through the real
:func:`dicom_node.infer.segment.segment` with the network's probability maps replaced by the
known nodule spheres (series selection, slice ordering, region measurement and both encoders are
real).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

import dicom_node.infer.segment as runtime
import dicom_node.pipelines.segment as pipeline
from dicom_node.encode.nodule_sr import CUBIC_MILLIMETER, LONG_AXIS, MILLIMETER, VOLUME
from dicom_node.infer.card import ModelCard, parse_card
from dicom_node.infer.volume import SeriesVolume
from dicom_node.messages import (
    PipelineInput,
    SegmentationResult,
    SourceFrame,
    findings_from_json,
    findings_to_json,
)
from dicom_node.pipelines import pipeline_for, uids_for
from tests.support.ct_series import write_chest_ct_series
from tests.support.dicom_tools import dciodvfy, dsrdump
from tests.test_encode_seg import NODULE, REGIONS, SLICES, ct_series, result

WHEN = datetime(2024, 5, 6, 7, 8, 9)


def card(**changes: Any) -> ModelCard:
    raw: dict[str, Any] = {
        "name": "lung-nodules",
        "version": "1.0.0",
        "kind": "segmenter",
        "modalities": ["CT"],
        "description": "Lung nodule segmentation on chest CT",
        "intended_use": "Evaluation only",
        "manufacturer": "Example AI Lab",
        "weights": "model.keras",
        "synthetic_training_data": True,
        "input": {"shape": [128, 128]},
        "outputs": [
            {
                "name": "nodule",
                "code": {"value": NODULE.value, "scheme": NODULE.scheme, "meaning": NODULE.meaning},
                "category": {"value": "49755003", "scheme": "SCT",
                             "meaning": "Morphologically abnormal structure"},
            }
        ],
    }
    raw.update(changes)
    return parse_card(raw, origin="test card")


def job(sources: Sequence[Dataset], generation: int = 0) -> PipelineInput:
    return PipelineInput(
        study_instance_uid=str(sources[0].StudyInstanceUID), generation=generation,
        route_name="chest-ct", sources=tuple(sources), prior_findings=(), timestamp=WHEN)


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> list[SegmentationResult]:
    """Replace the model with a result the test sets (the encoders are what is tested here)."""
    answers: list[SegmentationResult] = []

    def segment(card: ModelCard, model_dir: Path, sources: Sequence[Dataset]) -> SegmentationResult:
        return answers.pop(0)

    monkeypatch.setattr(pipeline, "segment", segment)
    return answers


def with_model_identity(res: SegmentationResult, model_card: ModelCard) -> SegmentationResult:
    return SegmentationResult(model_card.identity(), res.segments, res.frames, res.mask,
                              res.regions)


def test_segmenter_cards_run_this_pipeline() -> None:
    assert pipeline_for("segmenter") is pipeline.run


def test_regions_give_a_seg_and_an_sr_with_the_job_uids(
    fake_model: list[SegmentationResult], tmp_path: Path
) -> None:
    slices, model_card = ct_series(), card()
    frames = tuple(SourceFrame(s.SOPInstanceUID) for s in slices)
    fake_model.append(with_model_identity(result(frames), model_card))
    the_job = job(slices)

    output = pipeline.run(model_card, tmp_path, the_job)

    seg, sr = output.objects
    assert seg.SOPInstanceUID == uids_for(the_job, model_card, "seg").sop_instance_uid
    assert sr.SOPInstanceUID == uids_for(the_job, model_card, "sr").sop_instance_uid
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == slices[0].StudyInstanceUID
    for dataset in output.objects:
        path = tmp_path / f"{dataset.Modality}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert dciodvfy(path).errors == ()
    document = hd.sr.srread(tmp_path / "SR.dcm")
    (group, _) = document.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment[0].referenced_sop_instance_uid == seg.SOPInstanceUID


def test_each_region_is_a_present_finding_with_volume_and_longest_diameter(
    fake_model: list[SegmentationResult], tmp_path: Path
) -> None:
    slices, model_card = ct_series(), card()
    frames = tuple(SourceFrame(s.SOPInstanceUID) for s in slices)
    fake_model.append(with_model_identity(result(frames), model_card))

    output = pipeline.run(model_card, tmp_path, job(slices))

    assert [f.present for f in output.findings] == [True, True]
    for record, region in zip(output.findings, REGIONS, strict=True):
        assert (record.model, record.model_version) == ("lung-nodules", "1.0.0")
        assert record.concept == NODULE
        assert record.probability == region.mean_probability
        volume, diameter = record.measurements
        assert (volume.name, volume.value, volume.unit) == (
            VOLUME, region.volume_mm3, CUBIC_MILLIMETER)
        assert (diameter.name, diameter.value, diameter.unit) == (
            LONG_AXIS, region.longest_diameter_mm, MILLIMETER)
    assert output.findings[0].detail.startswith("nodule 1 of 2")
    assert output.findings[1].detail.startswith("nodule 2 of 2")
    assert findings_from_json(findings_to_json(output.findings)) == output.findings
    assert output.summary["frames"] == SLICES
    assert output.summary["regions"] == 2
    assert output.summary["volumes_mm3"] == [1587.5, 8.8]


def test_no_region_gives_only_an_sr_and_an_absent_finding(
    fake_model: list[SegmentationResult], tmp_path: Path
) -> None:
    slices, model_card = ct_series(), card()
    frames = tuple(SourceFrame(s.SOPInstanceUID) for s in slices)
    empty = result(frames, np.zeros((SLICES, 128, 128), np.uint8), ())
    fake_model.append(with_model_identity(empty, model_card))

    output = pipeline.run(model_card, tmp_path, job(slices))

    (sr,) = output.objects
    assert sr.Modality == "SR"
    (record,) = output.findings
    assert (record.concept, record.present, record.measurements) == (NODULE, False, ())
    assert record.detail == "no nodule detected"
    assert output.summary["regions"] == 0
    assert "seg_sop_instance_uid" not in output.summary


def test_a_reopened_study_gets_new_result_uids(
    fake_model: list[SegmentationResult], tmp_path: Path
) -> None:
    slices, model_card = ct_series(), card()
    frames = tuple(SourceFrame(s.SOPInstanceUID) for s in slices)
    fake_model.extend([with_model_identity(result(frames), model_card)] * 2)

    first = pipeline.run(model_card, tmp_path, job(slices))
    reopened = pipeline.run(model_card, tmp_path, job(slices, generation=1))

    assert {d.SOPInstanceUID for d in first.objects}.isdisjoint(
        d.SOPInstanceUID for d in reopened.objects)


# --- synthetic chest CT through the real segmenter runtime ----------------------------------------

#: (centre (x, y, z) mm, diameter mm) of the nodules drawn into the series.
NODULES = (((-65.0, 15.0, 0.0), 14.0), ((65.0, 20.0, 10.0), 8.0))


def windowed_card() -> ModelCard:
    return card(preprocessing={"voi": "window", "windows": [{"center": -600, "width": 1500}]},
                segmentation={"pixel_spacing_mm": 3.0})


@pytest.fixture
def sphere_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probability maps = the nodule spheres (0.9 inside, 0 outside), on the volume's voxels."""

    def predict_masks(card: ModelCard, model_dir: Path,
                      vol: SeriesVolume) -> tuple[np.ndarray, np.ndarray]:
        planes, rows, cols = np.indices(vol.shape).reshape(3, -1)
        points = vol.patient_points(planes, rows, cols)
        inside = np.zeros(len(points), dtype=bool)
        for centre, diameter in NODULES:
            inside |= np.linalg.norm(points - np.asarray(centre), axis=1) <= diameter / 2
        mask = inside.reshape(vol.shape).astype(np.uint8)
        return mask, (mask * 0.9).astype(np.float16)

    monkeypatch.setattr(runtime, "_predict_masks", predict_masks)


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "enhanced-ct"])
def test_synthetic_chest_ct_gives_a_valid_seg_and_sr_measuring_each_nodule(
    sphere_model: None, multiframe: bool, tmp_path: Path
) -> None:
    files = write_chest_ct_series(tmp_path / "ct", nodules=NODULES, slices=24, spacing=2.5,
                                  rows=192, enhanced_multiframe=multiframe, shuffle_files=True)
    sources = [pydicom.dcmread(f) for f in files]
    model_card = windowed_card()

    output = pipeline.run(model_card, tmp_path, job(sources))

    seg, sr = output.objects
    for dataset in output.objects:
        path = tmp_path / f"{dataset.Modality}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        report = dciodvfy(path)
        assert report.errors == (), report.output
    assert dsrdump(tmp_path / "SR.dcm").returncode == 0
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == sources[0].StudyInstanceUID
    # the larger nodule first; volumes near the spheres', equal in SR and findings
    expected = [np.pi / 6 * d**3 for _, d in NODULES]
    groups = hd.sr.srread(tmp_path / "SR.dcm").content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(output.findings) == 2
    for group, record, volume in zip(groups, output.findings, expected, strict=True):
        (measured,) = group.get_measurements(name=hd.sr.CodedConcept(
            VOLUME.value, VOLUME.scheme, VOLUME.meaning))
        assert measured.value == record.measurements[0].value
        assert measured.value == pytest.approx(volume, rel=0.25)
        assert group.referenced_segment[0].referenced_sop_instance_uid == seg.SOPInstanceUID


def test_seg_of_a_shuffled_series_lies_on_the_slices_of_each_nodule(
    sphere_model: None, tmp_path: Path
) -> None:
    files = write_chest_ct_series(tmp_path / "ct", nodules=NODULES, slices=24, spacing=2.5,
                                  rows=192, shuffle_files=True)
    sources = [pydicom.dcmread(f) for f in files]

    seg, _ = pipeline.run(windowed_card(), tmp_path, job(sources)).objects

    z_of = {s.SOPInstanceUID: float(s.ImagePositionPatient[2]) for s in sources}
    segmented_z = {
        z_of[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    def near(margin: float) -> set[float]:
        return {z for z in z_of.values() if any(abs(z - c[2]) <= d / 2 - margin
                                                for c, d in NODULES)}

    # slices grazing a sphere may hold no voxel centre inside it; those well inside must be there
    assert near(1.0) <= segmented_z <= near(0.0)


def test_a_missing_slice_is_stated_in_the_sr_next_to_the_measurements(
    sphere_model: None, tmp_path: Path
) -> None:
    files = write_chest_ct_series(tmp_path / "ct", nodules=NODULES, slices=24, spacing=2.5,
                                  rows=192)
    sources = [pydicom.dcmread(f) for f in files]
    positions = sorted(sources, key=lambda ds: float(ds.ImagePositionPatient[2]))
    sources.remove(positions[3])  # a slice far from the nodules never arrived

    output = pipeline.run(windowed_card(), tmp_path, job(sources))

    *_, sr = output.objects
    path = tmp_path / "SR.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy(path).errors == ()
    assert "Source series geometry: mis" in dsrdump(path).output  # dsrdump shortens texts
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    (stated,) = [t for t in texts if t.startswith("Source series geometry")]
    assert "missing slice(s): gap of 5.00 mm" in stated and "may be less accurate" in stated
    assert output.summary["geometry_warnings"] == 1
