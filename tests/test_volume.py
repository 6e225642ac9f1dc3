"""A CT series becomes one volume in spatial order, whatever the file order, spacing or encoding."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.errors import PreprocessingError
from dicom_node.infer.volume import load_volume
from tests.support.ct_series import slice_positions, write_chest_ct_series
from tests.support.dicom_tools import dciodvfy


def read(paths: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """A regular 24-slice series, files in spatial order."""
    folder = tmp_path_factory.mktemp("regular")
    return read(write_chest_ct_series(folder, slices=24, rows=96, pixel_spacing=4.0))


def test_written_series_and_enhanced_ct_pass_dciodvfy(tmp_path: Path) -> None:
    single = write_chest_ct_series(tmp_path / "single", slices=3, rows=64, pixel_spacing=6.0)
    enhanced = write_chest_ct_series(tmp_path / "enhanced", slices=3, rows=64,
                                     pixel_spacing=6.0, enhanced_multiframe=True)
    for path in (single[0], enhanced[0]):
        report = dciodvfy(path)
        assert not report.errors, report.output


def test_loading_a_volume_leaves_no_decoded_copy_in_the_datasets(tmp_path: Path) -> None:
    # Dataset.pixel_array would keep each slice's array (pydicom's private _pixel_array) in the
    # job's sources next to the volume: 134 MB more for 256 slices of 512².
    datasets = read(write_chest_ct_series(tmp_path, slices=4, rows=64, pixel_spacing=6.0))
    load_volume(datasets)
    assert [getattr(ds, "_pixel_array", None) for ds in datasets] == [None] * 4


def test_shuffled_files_are_sorted_along_the_normal_not_by_instance_number(
    tmp_path: Path, series: list[Dataset]
) -> None:
    shuffled = read(write_chest_ct_series(tmp_path, slices=24, rows=96, pixel_spacing=4.0,
                                          shuffle_files=True))
    assert [ds.SOPInstanceUID for ds in shuffled] != [ds.SOPInstanceUID for ds in series]
    vol = load_volume(shuffled)
    assert np.all(np.diff(vol.offsets) > 0)
    np.testing.assert_allclose(vol.positions[:, 2], slice_positions(24, 2.5))
    by_uid = {ds.SOPInstanceUID: ds for ds in shuffled}
    numbers = [int(by_uid[f.sop_instance_uid].InstanceNumber) for f in vol.frames]
    assert numbers == sorted(numbers, reverse=True)  # head-first numbering, feet-first volume
    np.testing.assert_array_equal(vol.voxels, load_volume(series).voxels)
    assert vol.regular and vol.warnings == ()
    assert vol.slice_spacing == pytest.approx(2.5)


def test_regular_series_matches_highdicoms_volume_in_hounsfield_units(
    series: list[Dataset],
) -> None:
    vol = load_volume(series)
    ref = hd.get_volume_from_series(series)
    # highdicom stacks right-handed in (slice, row, column): head first for axial slices
    np.testing.assert_allclose(vol.voxels, ref.array[::-1], atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, 1:3], ref.affine[:3, 1:3])
    np.testing.assert_allclose(vol.affine[:3, 0], -ref.affine[:3, 0])
    np.testing.assert_allclose(vol.positions[-1], ref.affine[:3, 3])
    stored = series[0].pixel_array.astype(np.float32) - 1024.0
    first = next(i for i, f in enumerate(vol.frames)
                 if f.sop_instance_uid == series[0].SOPInstanceUID)
    np.testing.assert_array_equal(vol.voxels[first], stored)


def test_irregular_spacing_is_reported_and_every_slice_keeps_its_position(
    tmp_path: Path,
) -> None:
    vol = load_volume(read(write_chest_ct_series(tmp_path, slices=20, rows=64,
                                                 pixel_spacing=6.0, irregular=True,
                                                 shuffle_files=True)))
    assert not vol.regular
    assert any(w.startswith("irregular slice spacing") for w in vol.warnings), vol.warnings
    z = slice_positions(20, 2.5, irregular=True)
    np.testing.assert_allclose(vol.positions[:, 2], z)
    # plane extents tile the stack: half a gap each side, half the usual spacing past the ends
    assert vol.slice_extents.sum() == pytest.approx(z[-1] - z[0] + vol.slice_spacing)


def test_missing_slice_is_reported_with_its_gap(tmp_path: Path) -> None:
    vol = load_volume(read(write_chest_ct_series(tmp_path, slices=20, rows=64,
                                                 pixel_spacing=6.0, drop_slice=7)))
    assert vol.shape[0] == 19
    assert vol.slice_spacing == pytest.approx(2.5)
    (warning,) = vol.warnings
    assert "missing slice(s): gap of 5.00 mm between planes 6 and 7" in warning
    assert "about 1 slice(s) missing" in warning
    assert vol.slice_extents[6] == pytest.approx(3.75)
    assert vol.slice_extents[7] == pytest.approx(3.75)


def test_enhanced_multiframe_ct_gives_the_same_volume_as_the_single_frame_series(
    tmp_path: Path, series: list[Dataset]
) -> None:
    (path,) = write_chest_ct_series(tmp_path, slices=24, rows=96, pixel_spacing=4.0,
                                    enhanced_multiframe=True, shuffle_files=True)
    enhanced = pydicom.dcmread(path)
    assert "ImagePositionPatient" not in enhanced and "RescaleIntercept" not in enhanced
    vol, ref = load_volume([enhanced]), load_volume(series)
    np.testing.assert_array_equal(vol.voxels, ref.voxels)
    np.testing.assert_allclose(vol.positions, ref.positions)
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert vol.pixel_spacing == ref.pixel_spacing
    assert {f.sop_instance_uid for f in vol.frames} == {enhanced.SOPInstanceUID}
    numbers = [f.frame_number for f in vol.frames]
    assert sorted(numbers) == list(range(1, 25)) and numbers != sorted(numbers)


def test_per_frame_rescale_overrides_the_shared_one(tmp_path: Path) -> None:
    (path,) = write_chest_ct_series(tmp_path, slices=4, rows=64, pixel_spacing=6.0,
                                    enhanced_multiframe=True)
    ds = pydicom.dcmread(path)
    before = load_volume([ds])
    item = Dataset()
    item.RescaleIntercept, item.RescaleSlope, item.RescaleType = -1000, 2, "HU"
    ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence = [item]
    after = load_volume([ds])
    plane = next(i for i, f in enumerate(after.frames) if f.frame_number == 1)
    stored = before.voxels[plane] + 1024.0
    np.testing.assert_allclose(after.voxels[plane], stored * 2 - 1000)


def _with(datasets: list[Dataset], index: int, **changes: object) -> list[Dataset]:
    out = [copy.deepcopy(ds) for ds in datasets]
    for keyword, value in changes.items():
        if value is None:
            delattr(out[index], keyword)
        else:
            setattr(out[index], keyword, value)
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0.96, 0.28]},
         "inconsistent orientation within the series"),
        ({"PixelSpacing": [4.0, 4.2]}, "inconsistent pixel spacing within the series"),
        ({"ImagePositionPatient": None}, "Image Position (Patient) is missing"),
        ({"SeriesInstanceUID": "1.2.3.4"}, "instances of 2 series given"),
        ({"FrameOfReferenceUID": "1.2.3.4"}, "the series' images are in 2 frames of reference"),
    ],
)
def test_inconsistent_series_is_refused_with_a_message_saying_why(
    series: list[Dataset], changes: dict[str, object], message: str
) -> None:
    with pytest.raises(PreprocessingError) as info:
        load_volume(_with(series, 5, **changes))
    assert message in str(info.value)


def test_two_frames_at_one_position_are_refused(series: list[Dataset]) -> None:
    changed = _with(series, 3, ImagePositionPatient=list(series[4].ImagePositionPatient))
    with pytest.raises(PreprocessingError, match="two frames at the same position"):
        load_volume(changed)
