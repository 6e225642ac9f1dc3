"""The head-ct-ich-cnn card, its fixed HU windows and its shipped weights, on real head CT."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from copy import deepcopy
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.errors import ConfigError, PreprocessingError
from dicom_node.infer import ClassifierCard, classify, load_card
from dicom_node.infer.card import ModelCard, Window, parse_card
from dicom_node.infer.preprocess import apply_windows, preprocess
from dicom_node.infer.runtime import load_model, predict

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "head-ct-ich-cnn"
REAL = "693_UNCR.dcm"  # a real axial head CT slice (pydicom-data), 512 x 512, HU = stored - 1024
BRAIN, SUBDURAL, BONE = (40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)


@pytest.fixture(scope="module")
def card() -> ClassifierCard:
    loaded = load_card(MODEL_DIR)
    assert isinstance(loaded, ClassifierCard)
    return loaded


def read(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not installed (pydicom / pydicom-data)"
    return pydicom.dcmread(path)


def synthetic_module() -> ModuleType:
    """models/head-ct-ich-cnn/synthetic.py (its folder name is not a package name)."""
    spec = importlib.util.spec_from_file_location("ich_synthetic", MODEL_DIR / "synthetic.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    return module


def with_hu(ds: Dataset, hu: np.ndarray) -> Dataset:
    """A copy of a CT dataset whose pixels are ``hu`` (written back through its rescale)."""
    stored = np.rint((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    dtype = ds.pixel_array.dtype
    info = np.iinfo(dtype)
    copy = deepcopy(ds)  # Dataset.copy() is shallow: it would share the elements
    copy.PixelData = np.clip(stored, info.min, info.max).astype(dtype).tobytes()
    copy.SOPInstanceUID = generate_uid()
    return copy


def real_hu() -> tuple[Dataset, np.ndarray]:
    ds = read(REAL)
    return ds, np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def window_card(shape: tuple[int, int] = (8, 8), channels: int = 3, **preprocessing: Any
                ) -> ModelCard:
    """A CT classifier card with the brain/subdural/bone windows and the given preprocessing."""
    windows = [{"name": "brain", "center": BRAIN[0], "width": BRAIN[1]},
               {"name": "subdural", "center": SUBDURAL[0], "width": SUBDURAL[1]},
               {"name": "bone", "center": BONE[0], "width": BONE[1]}]
    raw: dict[str, object] = {
        "name": "ct-test", "version": "1", "kind": "classifier", "modalities": ["CT"],
        "description": "test", "intended_use": "tests", "manufacturer": "tests",
        "weights": "model.keras", "synthetic_training_data": True,
        "input": {"shape": list(shape), "channels": channels},
        "preprocessing": {"voi": "window", "windows": windows[: max(1, channels)]}
        | preprocessing,
        "outputs": [{"name": "ich", "threshold": 0.5,
                     "code": {"value": "1386000", "scheme": "SCT",
                              "meaning": "Intracranial hemorrhage"}}],
    }
    return parse_card(raw, origin="test")


def ct_image(hu: np.ndarray, **tags: Any) -> Dataset:
    """A CT dataset whose HU are ``hu`` (12-bit stored, Rescale Intercept -1024)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.set_pixel_data((np.asarray(hu) + 1024).astype(np.uint16), "MONOCHROME2", 12)
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


# --- the card ----------------------------------------------------------------------------------


def test_card_is_a_ct_classifier_of_intracranial_hemorrhage(card: ClassifierCard) -> None:
    assert card.kind == "classifier"
    assert card.modalities == ("CT",)
    (output,) = card.outputs
    assert output.name == "intracranial_hemorrhage"
    assert (output.code.value, output.code.scheme, output.code.meaning) == (
        "1386000", "SCT", "Intracranial hemorrhage")
    assert 0.0 < output.threshold < 1.0
    assert card.input.channels == len(card.preprocessing.windows) == 3
    assert card.preprocessing.voi == "window"
    assert "LOCALIZER" in card.preprocessing.exclude_image_types


def test_card_says_it_is_synthetic_not_for_clinical_use_and_how_it_was_measured(
    card: ClassifierCard,
) -> None:
    assert card.synthetic_training_data is True
    assert "NOT FOR CLINICAL USE" in card.intended_use
    assert card.training is not None and card.metrics is not None
    assert REAL in card.training.data  # the one real part is named
    metrics = card.metrics.per_output["intracranial_hemorrhage"]
    assert metrics.positives > 0 and metrics.negatives > 0
    assert metrics.roc_auc > 0.8
    assert any(REAL in note for note in card.metrics.notes)


# --- window preprocessing ----------------------------------------------------------------------


def test_each_window_maps_its_hu_range_linearly_onto_zero_to_one_and_clips() -> None:
    hu = np.array([-1000, 0, 40, 80, 180, 600, 2000, 3000], dtype=np.int64)
    out = preprocess(ct_image(np.repeat(hu[np.newaxis], 8, 0)),
                     window_card(resize="stretch"))[0, 0]
    np.testing.assert_allclose(out[:, 0], [0, 0, 0.5, 1, 1, 1, 1, 1], atol=1e-6)  # brain 40/80
    np.testing.assert_allclose(out[:, 1], [0, 0.1, 0.3, 0.5, 1, 1, 1, 1], atol=1e-6)  # 80/200
    np.testing.assert_allclose(  # bone 600/2800: -800 … 2000
        out[:, 2], [0, 800 / 2800, 840 / 2800, 880 / 2800, 980 / 2800, 0.5, 1, 1], atol=1e-6)


def test_apply_windows_gives_one_channel_per_window_in_the_card_range() -> None:
    windows = [Window(center=40, width=80), Window(center=80, width=200)]
    out = apply_windows(np.array([[0.0, 40.0, 80.0]]), windows, (-1.0, 1.0))
    assert out.shape == (1, 3, 2)
    np.testing.assert_allclose(out[0, :, 0], [-1, 0, 1])
    np.testing.assert_allclose(out[0, :, 1], [-0.8, -0.4, 0.0])


def test_window_ignores_the_dataset_window_and_does_not_stretch_to_min_max() -> None:
    """A fixed window: 30–50 HU stay 0.375–0.625 whatever the image's range or its own window."""
    hu = np.tile(np.linspace(30, 50, 8).round(), (8, 1)).astype(np.int64)
    card = window_card(resize="stretch", channels=1)
    plain = preprocess(ct_image(hu), card)
    own_window = preprocess(ct_image(hu, WindowCenter=400, WindowWidth=2000), card)
    np.testing.assert_array_equal(plain, own_window)
    np.testing.assert_allclose(plain[0, 0, :, 0], (hu[0] - 0) / 80, atol=1e-6)


def test_rescale_is_applied_before_the_window() -> None:
    """Slope 2, intercept -1000: stored 520 is 40 HU, the brain window's centre."""
    ds = ct_image(np.zeros((8, 8), dtype=np.int64))
    ds.set_pixel_data(np.full((8, 8), 520, dtype=np.uint16), "MONOCHROME2", 12)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    out = preprocess(ds, window_card(channels=1))
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_window_resizes_in_hu_before_windowing() -> None:
    """Columns of 0 and 160 HU average to 80 HU (brain window 1.0), not to mean(0, 1) = 0.5."""
    hu = np.tile(np.array([0, 160] * 16), (32, 1))
    out = preprocess(ct_image(hu), window_card((16, 16), channels=1))[0, :, :, 0]
    np.testing.assert_allclose(out[4:12, 4:12], 1.0, atol=1e-6)


def test_padding_gets_the_pad_value_in_every_channel() -> None:
    hu = np.full((40, 80), 40)  # fits 64 x 64 as 32 x 64: 16 rows of padding above and below
    out = preprocess(ct_image(hu), window_card((64, 64), pad_value=0.25))[0]
    np.testing.assert_allclose(out[:16], 0.25)
    np.testing.assert_allclose(out[48:], 0.25)
    np.testing.assert_allclose(out[32, 32], [0.5, 0.3, 840 / 2800], atol=1e-6)


def test_monochrome1_ct_is_not_inverted_by_a_window() -> None:
    """HU mean the same however they are displayed."""
    hu = np.full((8, 8), 60)
    mono2 = preprocess(ct_image(hu), window_card(channels=1))
    mono1 = ct_image(hu)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(preprocess(mono1, window_card(channels=1)), mono2)


def test_one_window_is_repeated_over_three_channels() -> None:
    card = window_card(channels=3, windows=[{"center": 40, "width": 80}])
    out = preprocess(ct_image(np.full((8, 8), 60)), card)
    np.testing.assert_allclose(out, 0.75, atol=1e-6)


def test_localizer_images_are_excluded_when_the_card_says_so() -> None:
    scout = ct_image(np.full((8, 8), 60), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(PreprocessingError, match="Image Type LOCALIZER is excluded"):
        preprocess(scout, window_card(exclude_image_types=["LOCALIZER"]))
    assert preprocess(scout, window_card()).shape == (1, 8, 8, 3)  # the default keeps them


def test_colour_image_is_refused_by_a_window_card() -> None:
    with pytest.raises(PreprocessingError, match="has no modality values"):
        preprocess(read("SC_rgb.dcm"), window_card())


def test_enhanced_image_with_rescale_only_in_functional_groups_is_refused() -> None:
    ds = ct_image(np.full((8, 8), 60))
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.SharedFunctionalGroupsSequence = [Dataset()]
    with pytest.raises(PreprocessingError, match="rescale is in functional groups"):
        preprocess(ds, window_card())


@pytest.mark.parametrize(
    ("preprocessing", "message"),
    [
        ({"voi": "window", "windows": []}, 'voi = "window" needs windows'),
        ({"voi": "dataset", "windows": [{"center": 40, "width": 80}]},
         'windows are used only with voi = "window"'),
        ({"voi": "window", "windows": [{"center": 40, "width": 0}]},
         r"windows\[0\]\.width: Input should be greater than 0"),
        ({"voi": "window", "windows": [{"center": 40, "width": 80}] * 2},
         "2 windows give 2 channels, but input.channels is 3"),
    ],
)
def test_card_with_inconsistent_windows_is_refused_naming_the_key(
    preprocessing: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        window_card(**preprocessing)


# --- the shipped weights on real head CT ---------------------------------------------------


def test_real_head_ct_slice_is_called_absent(card: ClassifierCard) -> None:
    ds = read(REAL)
    result = classify(card, MODEL_DIR, [ds])
    (finding,) = result.findings
    assert finding.concept == card.outputs[0].code.concept()
    assert not finding.present, finding.probability
    assert result.source_sop_instance_uids == (ds.SOPInstanceUID,)


def test_lossless_jpeg2000_copy_of_the_slice_gets_the_same_probability(
    card: ClassifierCard,
) -> None:
    plain = classify(card, MODEL_DIR, [read(REAL)]).findings[0]
    j2k = classify(card, MODEL_DIR, [read("693_J2KR.dcm")]).findings[0]
    assert j2k.probability == pytest.approx(plain.probability, abs=1e-6)


@pytest.mark.parametrize("kind", ["intraparenchymal", "subdural", "epidural"])
def test_real_slice_with_a_synthetic_bleed_inserted_is_called_present(
    card: ClassifierCard, kind: str
) -> None:
    """synthetic.with_bleed at full resolution (seed 7, as the card's notes), whole pipeline."""
    ds, hu = real_hu()
    bled = synthetic_module().with_bleed(hu, float(ds.PixelSpacing[0]), kind, 7)
    (finding,) = classify(card, MODEL_DIR, [with_hu(ds, bled)]).findings
    assert finding.present, finding.probability


def test_real_slice_with_a_plain_hyperdense_disc_is_called_present(card: ClassifierCard) -> None:
    """A bleed drawn here, not by the generator: a 65 HU disc, 20 mm across, in the right
    hemisphere's white matter (image left), with noise like the slice's own."""
    ds, hu = real_hu()
    yy, xx = np.mgrid[0:512, 0:512]
    radius = 10.0 / float(ds.PixelSpacing[0])
    disc = np.hypot(yy - 275, xx - 195) < radius
    assert np.median(hu[disc]) < 40  # it lands in brain, not in bone or air
    rng = np.random.default_rng(0)
    bled = np.where(disc, 65.0 + 3.5 * rng.standard_normal(hu.shape), hu)
    (finding,) = classify(card, MODEL_DIR, [with_hu(ds, bled)]).findings
    assert finding.present, finding.probability


def test_study_is_positive_when_any_slice_is_and_the_scout_does_not_count(
    card: ClassifierCard,
) -> None:
    """The study probability is the maximum over its slices; a LOCALIZER is skipped."""
    ds, hu = real_hu()
    bled = with_hu(ds, synthetic_module().with_bleed(hu, float(ds.PixelSpacing[0]),
                                                      "intraparenchymal", 7))
    scout = with_hu(ds, hu)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    normal = classify(card, MODEL_DIR, [ds]).findings[0]
    positive = classify(card, MODEL_DIR, [bled]).findings[0]
    study = classify(card, MODEL_DIR, [scout, ds, bled])
    assert study.findings[0].present
    assert study.findings[0].probability == pytest.approx(
        max(normal.probability, positive.probability), abs=1e-6)
    assert study.source_sop_instance_uids == (ds.SOPInstanceUID, bled.SOPInstanceUID)


def test_shipped_weights_separate_fresh_synthetic_slices(card: ClassifierCard,
                                                         tmp_path: Path) -> None:
    """Slices of a seed training never used (drawn in a subprocess with one BLAS thread)."""
    target = tmp_path / "fresh.npz"
    code = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(MODEL_DIR)!r})\n"
        "from synthetic import make_dataset\n"
        "x, y, _, _ = make_dataset(4242, 0, 96, 128, 0.5)\n"
        f"np.savez({str(target)!r}, x=x, y=y)\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    data = np.load(target)
    x = apply_windows(data["x"], card.preprocessing.windows, card.preprocessing.range)
    p = predict(load_model(card, MODEL_DIR), x.astype(np.float32))[:, 0]
    y = data["y"][:, 0]
    pos, neg = p[y == 1], p[y == 0]
    auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg))
    assert auc > 0.85


def test_model_file_holds_only_keras_layers_so_any_backend_can_load_it() -> None:
    with zipfile.ZipFile(MODEL_DIR / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    layers = config["config"]["layers"]
    assert layers
    for layer in layers:
        assert layer["module"] == "keras.layers", layer["class_name"]
        assert layer["class_name"] != "Lambda"


# --- the evaluation export -------------------------------------------------------------------


def test_export_eval_writes_ct_files_and_labels_that_preprocess_to_the_tested_hu(
    tmp_path: Path,
) -> None:
    out = tmp_path / "eval"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(MODEL_DIR / "train.py"), "--export-eval", str(out), "--test", "6",
         "--workers", "1", "--out", str(tmp_path / "no-model")],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    with (out / "labels.csv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "intracranial_hemorrhage"]
    assert len(rows) == 7 and {r[1] for r in rows[1:]} <= {"0", "1"}
    uids = set()
    for name, _label in rows[1:]:
        ds = pydicom.dcmread(out / name)
        assert ds.Modality == "CT" and ds.SOPClassUID == CTImageStorage
        uids.add(ds.StudyInstanceUID)
        hu = apply_modality_lut(ds.pixel_array, ds)
        card = window_card((128, 128))
        expected = apply_windows(hu, card.preprocessing.windows, (0.0, 1.0))
        np.testing.assert_allclose(preprocess(ds, card)[0], expected, atol=1e-6)
    assert len(uids) == 6  # one study per case
