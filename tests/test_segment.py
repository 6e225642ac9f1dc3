"""The shipped lung-nodule-unet through dicom_node.infer.segment, on synthetic CT as DICOM."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from scipy import ndimage
from structlog.testing import capture_logs

from dicom_node.errors import ModelError, PreprocessingError
from dicom_node.infer import load_card
from dicom_node.infer.card import SegmenterCard
from dicom_node.infer.runtime import BATCH_SIZE, batches, predict_overlapped
from dicom_node.infer.segment import (
    _reach,
    measure_regions,
    resample_weights,
    segment,
    select_series,
)
from dicom_node.infer.volume import load_volume
from dicom_node.messages import CodedConcept, SegmentationResult
from tests.support.ct_series import write_chest_ct_series

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "lung-nodule-unet"
#: (centre in patient mm, diameter mm): one in each lung of the seed-0 phantom, where the shipped
#: model finds them (it misses some nodules: see the card's metrics).
NODULES = [((-60.0, -10.0, 20.0), 14.0), ((65.0, 25.0, 15.0), 18.0)]


def read(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def sphere_volume(diameter: float) -> float:
    return math.pi / 6.0 * diameter**3


@pytest.fixture(scope="module")
def card() -> SegmenterCard:
    loaded = load_card(MODEL_DIR)
    assert isinstance(loaded, SegmenterCard)
    return loaded


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """40 slices of 2.5 mm, 256² pixels of 1.5 mm, two nodules; files shuffled."""
    folder = tmp_path_factory.mktemp("two-nodules")
    return read(write_chest_ct_series(folder, nodules=NODULES, shuffle_files=True))


@pytest.fixture(scope="module")
def result(card: SegmenterCard, series: list[Dataset]) -> SegmentationResult:
    return segment(card, MODEL_DIR, series)


def test_segment_finds_both_nodules_with_their_volume_and_diameter(
    result: SegmentationResult,
) -> None:
    for centre, diameter in NODULES:
        region = min(result.regions, key=lambda r: math.dist(r.centroid, centre))
        assert math.dist(region.centroid, centre) < 3.0, region
        assert region.volume_mm3 == pytest.approx(sphere_volume(diameter), rel=0.3), region
        assert region.longest_diameter_mm == pytest.approx(diameter, abs=2.0), region
        assert 0.5 <= region.mean_probability <= 1.0
        z = [centre[2] - diameter / 2, centre[2] + diameter / 2]
        assert len(region.frames) == pytest.approx((z[1] - z[0]) / 2.5, abs=2)


def test_mask_is_uint8_zero_one_aligned_with_source_frames_in_spatial_order(
    result: SegmentationResult, series: list[Dataset], card: SegmenterCard
) -> None:
    mask = np.asarray(result.mask)
    assert mask.dtype == np.uint8 and mask.shape == (40, 256, 256)
    assert set(np.unique(mask)) <= {0, 1}
    z = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in series}
    zs = [z[f.sop_instance_uid] for f in result.frames]
    assert zs == sorted(zs) and all(f.frame_number == 1 for f in result.frames)
    for region in result.regions:
        assert all(mask[i].any() for i in region.frames)
        assert min(zs[i] for i in region.frames) <= region.centroid[2] <= max(
            zs[i] for i in region.frames)
    assert result.segments == ((
        CodedConcept("786838002", "SCT", "Pulmonary nodule"),
        CodedConcept("49755003", "SCT", "Morphologically abnormal structure"),
    ),)
    assert result.model == card.identity() and result.model.synthetic_training_data


def test_enhanced_multiframe_ct_gives_the_same_mask_and_regions(
    card: SegmenterCard, result: SegmentationResult, tmp_path: Path
) -> None:
    enhanced = read(write_chest_ct_series(tmp_path, nodules=NODULES, enhanced_multiframe=True))
    other = segment(card, MODEL_DIR, enhanced)
    assert [f.frame_number for f in other.frames] == list(range(40, 0, -1))  # head-first file
    np.testing.assert_array_equal(np.asarray(other.mask), np.asarray(result.mask))
    assert [r.volume_mm3 for r in other.regions] == pytest.approx(
        [r.volume_mm3 for r in result.regions])


def test_a_missing_slice_through_a_nodule_keeps_it_one_region_of_about_its_volume(
    card: SegmenterCard, tmp_path: Path
) -> None:
    # slice 26 is z = 16.25 mm, through the 18 mm nodule centred at z = 15 mm
    datasets = read(write_chest_ct_series(tmp_path, nodules=NODULES, drop_slice=26))
    with capture_logs() as logs:
        res = segment(card, MODEL_DIR, datasets)
    (warning,) = [e for e in logs if e["event"] == "volume_warning"]
    assert warning["warning"].startswith("missing slice(s): gap of 5.00 mm")
    assert len(res.frames) == 39
    centre, diameter = NODULES[1]
    near = [r for r in res.regions if math.dist(r.centroid, centre) < 8.0]
    assert len(near) == 1
    assert near[0].volume_mm3 == pytest.approx(sphere_volume(diameter), rel=0.3)


def _copy_series(datasets: list[Dataset], **changes: object) -> list[Dataset]:
    series_uid = generate_uid()
    out = []
    for ds in datasets:
        new = copy.deepcopy(ds)
        new.SeriesInstanceUID = series_uid
        new.SOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(new, keyword, value)
        out.append(new)
    return out


def test_the_ct_series_with_most_slices_is_picked_and_localizers_are_ignored(
    series: list[Dataset], tmp_path: Path
) -> None:
    small = read(write_chest_ct_series(tmp_path, slices=12, rows=64, pixel_spacing=6.0,
                                       study_uid=str(series[0].StudyInstanceUID),
                                       series_number=3, seed=1))
    scouts = _copy_series(series + series[:10], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    report = Dataset()
    report.Modality, report.SOPInstanceUID = "SR", generate_uid()
    chosen = select_series([*small, *scouts, report, *series], ["CT"])
    assert {ds.SeriesInstanceUID for ds in chosen} == {series[0].SeriesInstanceUID}
    assert len(chosen) == 40


def test_no_ct_series_is_refused_saying_what_was_found(series: list[Dataset]) -> None:
    mr = _copy_series(series[:3], Modality="MR")
    scout = _copy_series(series[:1], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(PreprocessingError) as info:
        select_series([*mr, *scout], ["CT"])
    assert str(info.value) == ("no CT image series to segment in the study "
                               "(found: 1× CT localizer, 3× modality MR)")


def test_a_series_with_too_few_slices_is_refused(card: SegmenterCard, tmp_path: Path) -> None:
    few = read(write_chest_ct_series(tmp_path, slices=4, rows=64, pixel_spacing=6.0))
    with pytest.raises(PreprocessingError, match=r"has 4 slice\(s\); model lung-nodule-unet "
                                                 r"needs at least 8"):
        segment(card, MODEL_DIR, few)


def test_a_series_with_inconsistent_geometry_is_refused(
    card: SegmenterCard, series: list[Dataset]
) -> None:
    tilted = copy.deepcopy(series)
    tilted[7].ImageOrientationPatient = [1, 0, 0, 0, 0.96, 0.28]
    with pytest.raises(PreprocessingError, match="inconsistent orientation within the series"):
        segment(card, MODEL_DIR, tilted)
    spaced = copy.deepcopy(series)
    spaced[3].PixelSpacing = [1.5, 1.6]
    with pytest.raises(PreprocessingError, match="inconsistent pixel spacing within the series"):
        segment(card, MODEL_DIR, spaced)


def test_a_classifier_card_is_refused(series: list[Dataset]) -> None:
    classifier_dir = ROOT / "models" / "chest-xray-cnn"
    with pytest.raises(ModelError, match="is a classifier, not a segmenter"):
        segment(load_card(classifier_dir), classifier_dir, series)


def test_resample_weights_are_identity_at_equal_spacing_and_zero_outside_the_field() -> None:
    np.testing.assert_allclose(resample_weights(8, 1.0, 8, 1.0), np.eye(8))
    shrink = resample_weights(512, 0.7, 128, 2.5)  # a 358 mm field onto a 320 mm one
    assert np.allclose(shrink.sum(axis=1), 1.0)
    grow = resample_weights(128, 2.5, 512, 0.7)  # back: the source rim is outside the model
    sums = grow.sum(axis=1)
    assert sums[0] == 0.0 and sums[-1] == 0.0 and np.allclose(sums[40:-40], 1.0)


@pytest.mark.parametrize(("n_in", "spacing_in", "n_out", "spacing_out"),
                         [(160, 2.0, 512, 0.7), (160, 2.0, 256, 0.6), (96, 3.0, 100, 4.0)])
def test_reach_covers_exactly_the_outputs_a_range_of_inputs_contributes_to(
    n_in: int, spacing_in: float, n_out: int, spacing_out: float
) -> None:
    """Mapping a probability map back is restricted to the source pixels its hot samples reach."""
    weights = resample_weights(n_in, spacing_in, n_out, spacing_out)
    first, last = _reach(weights)
    for a, b in [(0, 0), (0, n_in - 1), (3, 9), (n_in // 2, n_in // 2 + 5), (n_in - 4, n_in - 1)]:
        touched = np.flatnonzero(weights[:, a : b + 1].any(axis=1))
        assert set(range(first[a], last[b])) == set(touched.tolist())


def test_regions_are_those_of_labelling_the_whole_volume(
    card: SegmenterCard, series: list[Dataset]
) -> None:
    """Regions are labelled inside the segment's bounding box: the same regions, with the same
    voxels, as labelling the whole volume (26-connectivity: a diagonal neighbour joins)."""
    vol = load_volume(select_series(series, card.modalities))
    mask = np.zeros(vol.shape, dtype=np.uint8)
    mask[5:8, 100:105, 50:55] = 1
    mask[8, 105, 55] = 1  # touches the cube above by a corner only
    mask[20:22, 10:13, 200:204] = 1
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    expected = sorted((float(vol.voxel_volumes[np.nonzero(labels == i)[0]].sum()),
                       tuple(int(k) for k in np.unique(np.nonzero(labels == i)[0])))
                      for i in range(1, count + 1))

    regions = measure_regions(mask, np.full(vol.shape, 0.9), vol, 1, 0.0)

    assert count == 2
    assert sorted((r.volume_mm3, r.frames) for r in regions) == expected
    assert measure_regions(np.zeros_like(mask), np.zeros(vol.shape), vol, 1, 0.0) == ()


# --- the network overlapped with preparing its input --------------------------------------------


class _Doubler:
    """A stand-in network: twice its input; records the batch sizes it was given."""

    def __init__(self, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.fail = fail

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("out of memory")
        self.sizes.append(len(x))
        return 2 * x


def test_overlapped_prediction_gives_each_output_in_order_in_batches_of_the_runtime() -> None:
    model = _Doubler()
    chunks = [np.full((n, 2), float(i), dtype=np.float32) for i, n in enumerate([20, 3, 16])]

    outputs = list(predict_overlapped(model, iter(chunks), "model m 1"))

    assert [o.tolist() for o in outputs] == [(2 * c).tolist() for c in chunks]
    assert model.sizes == [BATCH_SIZE, 4, 3, 16]


def test_a_failing_network_raises_model_error_and_a_failing_input_passes_through() -> None:
    with pytest.raises(ModelError, match="model m 1 failed to run: out of memory"):
        list(predict_overlapped(_Doubler(fail=True), [np.zeros((1, 2), np.float32)], "model m 1"))

    def inputs() -> Any:
        yield np.zeros((1, 2), np.float32)
        raise PreprocessingError("bad slice")

    with pytest.raises(PreprocessingError, match="bad slice"):
        list(predict_overlapped(_Doubler(), inputs(), "model m 1"))


def test_batches_regroup_the_rows_of_the_images_as_one_predict_over_all_would() -> None:
    images = [np.full((n, 1), i, dtype=np.float32) for i, n in enumerate([1, 3, 20, 1, 7])]
    grouped = list(batches(iter(images), size=8))
    assert [len(b) for b in grouped] == [8, 8, 8, 8]
    np.testing.assert_array_equal(np.concatenate(grouped), np.concatenate(images))
