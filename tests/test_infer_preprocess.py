"""Preprocessing turns real DICOM images into model input the way the model card says."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.errors import PreprocessingError
from dicom_node.infer.card import ModelCard, parse_card
from dicom_node.infer.preprocess import preprocess, resample_matrix, resize


def make_card(
    shape: tuple[int, int] = (64, 64), channels: int = 1, **preprocessing: Any
) -> ModelCard:
    """A classifier card (validated like a file) with the given input and preprocessing."""
    raw: dict[str, object] = {
        "name": "test-model",
        "version": "1",
        "kind": "classifier",
        "modalities": ["CR", "DX", "CT", "MR", "NM", "OT"],
        "description": "test",
        "intended_use": "tests",
        "manufacturer": "tests",
        "weights": "model.keras",
        "synthetic_training_data": True,
        "input": {"shape": list(shape), "channels": channels},
        "preprocessing": preprocessing,
        "outputs": [
            {
                "name": "cardiomegaly",
                "code": {"value": "8186001", "scheme": "SCT", "meaning": "Cardiomegaly"},
                "threshold": 0.5,
            }
        ],
    }
    return parse_card(raw, origin="test")


def read(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not installed (pydicom / pydicom-data)"
    return pydicom.dcmread(path)


def make_image(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12, **tags: Any
) -> Dataset:
    """A real, encodable CT-like dataset around ``pixels`` (uint16, one frame)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.set_pixel_data(pixels.astype(np.uint16), photometric, bits_stored)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


# --- grey levels ------------------------------------------------------------------------------


def test_monochrome1_real_cr_matches_its_inverted_monochrome2_copy() -> None:
    """RG1 (MONOCHROME1) and a MONOCHROME2 copy with inverted values and window give one input."""
    mono1 = read("RG1_UNCR.dcm")
    mono2 = read("RG1_UNCR.dcm")
    top = 2**mono2.BitsStored - 1
    mono2.PhotometricInterpretation = "MONOCHROME2"
    mono2.PixelData = (top - mono2.pixel_array).astype(np.uint16).tobytes()
    mono2.WindowCenter = top - float(mono1.WindowCenter)
    card = make_card((128, 128))
    a, b = preprocess(mono1, card), preprocess(mono2, card)
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert a.std() > 0.1  # a real picture, not a constant


def test_monochrome1_is_inverted_so_bright_means_attenuating() -> None:
    """The same low stored value is dark in MONOCHROME2 and bright in MONOCHROME1."""
    pixels = np.tile(np.arange(64, dtype=np.uint16) * 64, (64, 1))
    card = make_card((64, 64))
    dark_left = preprocess(make_image(pixels, "MONOCHROME2"), card)[0, :, :, 0]
    bright_left = preprocess(make_image(pixels, "MONOCHROME1"), card)[0, :, :, 0]
    assert dark_left[32, 0] == pytest.approx(0.0, abs=1e-6)
    assert bright_left[32, 0] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(dark_left, 1.0 - bright_left, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied_before_the_window() -> None:
    """A window given in rescaled units (HU) acts on rescaled values, not on stored ones."""
    # stored 0, 450, 500, 550, 1000 → HU -1000, -100, 0, 100, 1000 with slope 2, intercept -1000
    stored = np.repeat(np.array([[0, 0, 450, 500, 550, 1000, 1000, 1000]], dtype=np.uint16), 8, 0)
    ds = make_image(stored, RescaleSlope=2, RescaleIntercept=-1000, RescaleType="HU",
                    WindowCenter=0, WindowWidth=201, VOILUTFunction="LINEAR")
    out = preprocess(ds, make_card((8, 8), resize="stretch"))[0, 0, :, 0]
    np.testing.assert_allclose(out, [0, 0, 0, 0.5, 1, 1, 1, 1], atol=0.01)


def test_window_is_ignored_when_the_card_asks_for_modality_values_only() -> None:
    stored = np.repeat(np.array([[0, 0, 450, 500, 550, 1000, 1000, 1000]], dtype=np.uint16), 8, 0)
    ds = make_image(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0,
                    WindowWidth=201)
    out = preprocess(ds, make_card((8, 8), resize="stretch", voi="modality"))[0, 0, :, 0]
    np.testing.assert_allclose(out, [0, 0, 0.45, 0.5, 0.55, 1, 1, 1], atol=1e-6)


def test_voi_lut_sequence_is_applied_in_preference_to_the_window() -> None:
    """A step VOI LUT (0 below 128, full scale from 128) turns a ramp into two levels."""
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint16), (8, 1))  # 0, 32, … 224
    ds = make_image(ramp, bits_stored=8, WindowCenter=128, WindowWidth=256)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 16])
    item.add_new("LUTData", "US", [0] * 128 + [65535] * 128)
    ds.VOILUTSequence = [item]
    out = preprocess(ds, make_card((8, 8), resize="stretch"))[0, 0, :, 0]
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 1, 1, 1, 1])


def test_output_range_follows_the_card() -> None:
    out = preprocess(read("CT_small.dcm"), make_card((128, 128), range=[-1.0, 1.0]))
    assert out.min() == pytest.approx(-1.0)
    assert out.max() == pytest.approx(1.0)


# --- the same numbers as pixel by pixel ---------------------------------------------------------


def reference_input(ds: Dataset, card: ModelCard) -> np.ndarray:
    """Steps 4–6 of the module docstring done the plain way: every pixel through pydicom's LUTs
    in float64, min–max, then dense resampling matrices (one grey frame, resize = "stretch")."""
    spec = card.preprocessing
    grey = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    if spec.voi == "dataset":
        if ds.get("VOILUTSequence") and not np.issubdtype(grey.dtype, np.integer):
            grey = np.rint(grey).astype(np.int64)
        grey = pydicom.pixels.apply_voi_lut(grey, ds, index=0)
    grey = np.asarray(grey, dtype=np.float64)
    unit = (grey - grey.min()) / (grey.max() - grey.min())
    if ds.PhotometricInterpretation == "MONOCHROME1" and spec.invert_monochrome1:
        unit = 1.0 - unit
    low, high = spec.range
    (rows, cols), (out_r, out_c) = grey.shape, card.input.shape
    return resample_matrix(rows, out_r) @ (low + (high - low) * unit) @ resample_matrix(
        cols, out_c).T


def _ramp(shape: tuple[int, int], low: int, high: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.linspace(low, high, shape[1])[None, :] + rng.normal(0, 40, shape),
                   low, high).round()


def _non_monotonic_voi_lut(ds: Dataset) -> Dataset:
    """A "V" VOI LUT over 0..4095: dark in the middle, bright at both ends."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "US", [abs(2048 - v) * 16 for v in range(4096)])
    ds.VOILUTSequence = [item]
    return ds


@pytest.mark.parametrize(
    ("name", "make", "preprocessing"),
    [
        # a window that clips part of the values: each pixel is looked up in a table
        ("clipping window", lambda: make_image(_ramp((37, 53), 0, 4095), WindowCenter=1500,
                                               WindowWidth=1200), {}),
        # a window that holds every value: a straight line, resized before it is applied
        ("wide window", lambda: make_image(_ramp((37, 53), 300, 3000), WindowCenter=2048,
                                           WindowWidth=4096), {}),
        ("rescale only", lambda: make_image(_ramp((40, 30), 0, 2000), RescaleSlope=0.5,
                                            RescaleIntercept=-100), {"voi": "modality"}),
        ("MONOCHROME1", lambda: make_image(_ramp((37, 53), 0, 4095), "MONOCHROME1",
                                           WindowCenter=2500, WindowWidth=2000), {}),
        # not monotonic: the bounds come from the values present, not the table's ends
        ("V-shaped VOI LUT", lambda: _non_monotonic_voi_lut(make_image(_ramp((37, 53), 600,
                                                                             3900))), {}),
    ],
)
@pytest.mark.parametrize("shape", [(16, 24), (64, 80)], ids=["shrink", "enlarge"])
def test_input_is_the_pixel_by_pixel_computation(
    name: str, make: Any, preprocessing: dict[str, Any], shape: tuple[int, int]
) -> None:
    ds = make()
    card = make_card(shape, resize="stretch", **preprocessing)

    expected = reference_input(ds, card)

    np.testing.assert_allclose(preprocess(ds, card)[0, :, :, 0], expected, atol=2e-6)


def test_signed_ct_input_is_the_pixel_by_pixel_computation() -> None:
    ds = read("CT_small.dcm")  # int16, rescale to HU; a narrow window clips most of it
    ds.WindowCenter, ds.WindowWidth = 40, 400
    card = make_card((48, 40), resize="stretch")

    np.testing.assert_allclose(preprocess(ds, card)[0, :, :, 0], reference_input(ds, card),
                               atol=2e-6)


def test_resize_matches_the_dense_resampling_matrices() -> None:
    image = np.random.default_rng(1).random((70, 45, 2))
    expected = np.stack([resample_matrix(70, 30) @ image[:, :, c] @ resample_matrix(45, 20).T
                         for c in range(2)], axis=-1)
    np.testing.assert_allclose(resize(image, (30, 20), "stretch", 0.0), expected, atol=1e-12)


def test_only_the_frames_used_are_decoded_and_they_match_the_full_decode() -> None:
    ds = read("emri_small.dcm")  # 10 frames; max_frames = 4 takes frames 0, 3, 6, 9
    every = preprocess(ds, make_card((32, 32)))
    some = preprocess(read("emri_small.dcm"), make_card((32, 32), max_frames=4))
    np.testing.assert_array_equal(some, every[[0, 3, 6, 9]])


# --- compressed transfer syntaxes --------------------------------------------------------


@pytest.mark.parametrize(
    ("compressed", "original"),
    [
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # JPEG 2000 lossless, real chest CR
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
    ],
)
def test_lossless_compressed_copy_preprocesses_like_the_uncompressed_original(
    compressed: str, original: str
) -> None:
    card = make_card((128, 128))
    np.testing.assert_array_equal(preprocess(read(compressed), card),
                                  preprocess(read(original), card))


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",  # JPEG 2000
        "JPEG-LL.dcm",  # JPEG lossless, process 14
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
    ],
)
def test_lossy_and_lossless_compressed_images_decode_to_the_input_shape(name: str) -> None:
    out = preprocess(read(name), make_card((96, 96)))
    assert out.shape == (1, 96, 96, 1)
    assert out.dtype == np.float32
    assert 0.0 <= out.min() < out.max() <= 1.0


def test_jpeg_baseline_colour_image_feeds_a_three_channel_model() -> None:
    """SC_rgb_jpeg_dcmtk.dcm is JPEG baseline YBR_FULL; the decoder gives RGB."""
    out = preprocess(read("SC_rgb_jpeg_dcmtk.dcm"), make_card((50, 50), channels=3))
    assert out.shape == (1, 50, 50, 3)
    assert not np.allclose(out[..., 0], out[..., 1])  # real colour, not grey repeated


def test_grey_image_is_repeated_over_three_channels() -> None:
    out = preprocess(read("MR_small.dcm"), make_card((64, 64), channels=3))
    assert out.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


# --- geometry and frames -------------------------------------------------------------------


def test_pad_keeps_the_aspect_ratio_and_centres_the_image() -> None:
    wide = np.full((40, 80), 4000, dtype=np.uint16)
    wide[:, :40] = 0  # left half dark, right half bright: min–max gives 0 and 1
    out = preprocess(make_image(wide), make_card((64, 64), pad_value=0.25))[0, :, :, 0]
    np.testing.assert_allclose(out[:16], 0.25)  # 40x80 fits 64x64 as 32x64: 16 rows pad above
    np.testing.assert_allclose(out[48:], 0.25)  # … and 16 below
    assert out[32, 0] == pytest.approx(0.0) and out[32, 63] == pytest.approx(1.0)


def test_stretch_fills_the_whole_input() -> None:
    wide = np.full((40, 80), 4000, dtype=np.uint16)
    wide[:, :40] = 0
    out = preprocess(make_image(wide), make_card((64, 64), resize="stretch", pad_value=0.25))
    assert not np.any(np.isclose(out, 0.25))


def test_multi_frame_image_gives_one_input_per_frame() -> None:
    ds = read("emri_small.dcm")  # 10 frames
    assert preprocess(ds, make_card((32, 32))).shape == (10, 32, 32, 1)
    assert preprocess(ds, make_card((32, 32), frames="first")).shape == (1, 32, 32, 1)
    assert preprocess(ds, make_card((32, 32), max_frames=4)).shape == (4, 32, 32, 1)


# --- refusals --------------------------------------------------------------------------------


def test_dataset_without_pixel_data_is_refused_naming_the_problem() -> None:
    with pytest.raises(PreprocessingError, match="no pixel data"):
        preprocess(read("rtplan.dcm"), make_card())


def test_palette_colour_is_refused_naming_the_photometric_interpretation() -> None:
    with pytest.raises(PreprocessingError, match="'PALETTE COLOR' is not supported"):
        preprocess(read("OBXXXX1A.dcm"), make_card(channels=3))


def test_colour_image_is_refused_by_a_grey_model() -> None:
    with pytest.raises(PreprocessingError, match="'RGB' is not supported by a 1-channel model"):
        preprocess(read("SC_rgb.dcm"), make_card())


def test_undecodable_pixel_data_is_refused_naming_the_transfer_syntax() -> None:
    """JPEG-lossy.dcm is a known non-conformant 12-bit JPEG Extended file no decoder reads."""
    with pytest.raises(PreprocessingError, match=r"cannot decode pixel data \(JPEG Extended"):
        preprocess(read("JPEG-lossy.dcm"), make_card())
