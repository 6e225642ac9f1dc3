"""``dicom-node evaluate``: the card's metrics are reproduced from DICOM files through the node's
own inference code; the metrics are the card's definitions; segmenter and enhancer evaluations
align and compare their images correctly."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.cli import main
from dicom_node.evaluate import evaluate
from dicom_node.evaluate.metrics import (
    binary_metrics,
    confusion,
    dice,
    roc_auc,
    roc_curve,
    tolerance,
)
from dicom_node.infer.card import ModelCard, load_card, parse_card
from dicom_node.messages import CodedConcept, ModelIdentity, SegmentationResult, SourceFrame
from tests.conftest import sample_file
from tests.support.evaluate_runs import export_eval, run_evaluate

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "chest-xray-cnn"
SUBSET = 200


def load_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 200 images of chest-xray-cnn's test split, exported by train.py."""
    folder = tmp_path_factory.mktemp("cxr-test")
    stdout = export_eval(MODEL_DIR, folder, SUBSET, "--workers", "2")
    assert f"wrote {SUBSET} of the 2000 test images" in stdout
    return folder


@pytest.fixture(scope="module")
def evaluated(exported: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[int, str, str, Path]:
    """``dicom-node evaluate`` on the export, once for the module: (exit code, stdout, stderr,
    --out folder)."""
    return run_evaluate(MODEL_DIR, exported, tmp_path_factory.mktemp("cxr-eval"))


# --------------------------------------------------------------------------------------------
# chest-xray-cnn: export, then evaluate


def test_export_writes_the_training_test_split_as_dicom_with_its_labels(exported: Path) -> None:
    synthetic = load_module("cxr_synthetic_eval", MODEL_DIR / "synthetic.py")
    train = load_module("cxr_train_eval", MODEL_DIR / "train.py")
    images, labels = synthetic.make_dataset(train.SEED + 2, 0, 4, train.SIZE, train.PREVALENCE)
    with (exported / "labels.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["file", "cardiomegaly", "pleural_effusion", "pulmonary_nodule"]
    assert len(rows) == SUBSET + 1
    for i in range(4):
        ds = pydicom.dcmread(exported / rows[i + 1][0])
        assert ds.Modality == "CR" and ds.PhotometricInterpretation == "MONOCHROME2"
        np.testing.assert_allclose(ds.pixel_array / 65535.0, images[i, :, :, 0], atol=1e-5)
        assert [int(v) for v in rows[i + 1][1:]] == labels[i].astype(int).tolist()
    again = pydicom.dcmread(exported / "case-00000.dcm")
    assert again.SOPInstanceUID == pydicom.dcmread(exported / rows[1][0]).SOPInstanceUID


def test_evaluate_reproduces_the_card_metrics_on_a_subset_of_its_test_split(
        evaluated: tuple[int, str, str, Path]) -> None:
    code, out, err, folder = evaluated
    assert code == 0, out + err
    assert "every metric agrees with the card within its tolerance" in out
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["cases"] == SUBSET and metrics["agrees"] is True
    card = load_card(MODEL_DIR)
    assert card.metrics is not None
    for name, expected in card.metrics.per_output.items():
        measured = metrics["per_output"][name]
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
            ref = getattr(expected, key)
            # 3 standard errors of a proportion measured on this many cases (≥ 0.005)
            assert abs(measured[key] - ref) <= measured["tolerance"][key], (name, key)
            assert measured["tolerance"][key] < 0.16, (name, key)
        assert measured["positives"] + measured["negatives"] == SUBSET
        prevalence = expected.positives / (expected.positives + expected.negatives)
        assert abs(measured["positives"] / SUBSET - prevalence) < 0.1


def test_evaluate_writes_a_confusion_matrix_and_a_roc_curve_per_output(
        evaluated: tuple[int, str, str, Path]) -> None:
    _, out, _, folder = evaluated
    for name in ("cardiomegaly", "pleural_effusion", "pulmonary_nodule"):
        for kind in ("confusion", "roc"):
            png = folder / f"{kind}-{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert png.stat().st_size > 10_000
            assert f"wrote {png}" in out


def test_evaluate_prints_the_table_on_stdout_and_the_progress_on_stderr(
        evaluated: tuple[int, str, str, Path]) -> None:
    _, out, err, _ = evaluated
    assert "OUTPUT" in out and "MEASURED" in out and "TOLERANCE" in out
    assert "classifying" not in out
    assert "classifying" in err and f"{SUBSET}/{SUBSET}" in err


def test_evaluate_probabilities_are_the_models_on_the_generators_images(
        evaluated: tuple[int, str, str, Path]) -> None:
    """DICOM round trip + the node's preprocessing give the network the generator's image."""
    from dicom_node.infer.runtime import load_model, predict

    folder = evaluated[3]
    synthetic = load_module("cxr_synthetic_eval2", MODEL_DIR / "synthetic.py")
    train = load_module("cxr_train_eval2", MODEL_DIR / "train.py")
    images, _ = synthetic.make_dataset(train.SEED + 2, 0, 16, train.SIZE, train.PREVALENCE)
    card = load_card(MODEL_DIR)
    direct = predict(load_model(card, MODEL_DIR), images)
    with (folder / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))[:16]
    got = np.array([[float(r[f"p_{n}"]) for n in synthetic.FINDINGS] for r in rows])
    np.testing.assert_allclose(got, direct, atol=1e-3)


def test_labels_csv_without_an_output_column_is_refused_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "labels.csv").write_text("file,cardiomegaly,pleural_effusion\na.dcm,0,1\n")
    code = main(["evaluate", str(MODEL_DIR), str(tmp_path), "--no-progress"])
    assert code == 1
    assert "no column for output(s) pulmonary_nodule" in capsys.readouterr().err


def test_a_label_that_is_not_0_or_1_is_refused_naming_the_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "labels.csv").write_text(
        "file,cardiomegaly,pleural_effusion,pulmonary_nodule\na.dcm,0,1,0\nb.dcm,0,yes,0\n")
    code = main(["evaluate", str(MODEL_DIR), str(tmp_path), "--no-progress"])
    assert code == 1
    assert "labels.csv:3: labels must be 0 or 1: pleural_effusion='yes'" in (
        capsys.readouterr().err)


# --------------------------------------------------------------------------------------------
# metrics: the card's definitions


def test_binary_metrics_are_those_train_py_wrote_into_the_card() -> None:
    train = load_module("cxr_train_metrics", MODEL_DIR / "train.py")
    rng = np.random.default_rng(7)
    y = rng.random(500) < 0.3
    p = np.clip(0.4 * y + rng.random(500) * 0.7, 0, 1).round(2)  # ties on purpose
    for threshold in (0.14, 0.5, 0.71):
        ours = binary_metrics(y, p, threshold)
        theirs = train.binary_metrics(y.astype(np.float32), p, threshold)
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key


def test_roc_auc_counts_ties_half_and_the_curve_spans_the_square() -> None:
    y = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    p = np.array([0.9, 0.5, 0.5, 0.1, 0.7, 0.3])
    pairs = [(a, b) for a in p[y] for b in p[~y]]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(y, p) == pytest.approx(brute)
    fpr, tpr, _ = roc_curve(y, p)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute)


def test_tolerance_narrows_as_the_number_of_cases_grows() -> None:
    rng = np.random.default_rng(1)
    small_y, large_y = rng.random(200) < 0.35, rng.random(2000) < 0.35
    small = confusion(small_y, small_y * 0.9, 0.5)
    large = confusion(large_y, large_y * 0.9, 0.5)
    for metric in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert tolerance(metric, 0.9, small) > tolerance(metric, 0.9, large) >= 0.005


def test_dice_is_one_for_two_empty_masks_and_counts_overlap() -> None:
    a = np.zeros((2, 4, 4), dtype=bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    a[0, :2, :2] = True  # 4 voxels
    b[0, :2, :1] = True  # 2 voxels, inside a
    assert dice(a, b) == pytest.approx(2 * 2 / 6)


# --------------------------------------------------------------------------------------------
# segmenter and enhancer evaluation, with stand-ins for their runtimes

_COMMON: dict[str, Any] = {
    "version": "0.1", "modalities": ["CT"], "description": "test", "intended_use": "test",
    "manufacturer": "test", "weights": "model.keras", "synthetic_training_data": True,
    "input": {"shape": [64, 64]},
}


def ct_series(folder: Path, count: int) -> list[Dataset]:
    """``count`` slices made from CT_small.dcm, 5 mm apart, written in reverse order of z."""
    template = pydicom.dcmread(sample_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    slices = []
    for i in range(count):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(folder), str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 5.0 * i]
        ds.InstanceNumber = count - i
        ds.save_as(folder / f"{count - i:03d}.dcm", enforce_file_format=True)  # names ≠ z order
        slices.append(ds)
    return slices


def test_segmenter_dice_aligns_slices_by_position_not_by_file_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    card = parse_card({**_COMMON, "name": "seg", "kind": "segmenter", "outputs": [{
        "name": "nodule", "code": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
        "category": {"value": "49755003", "scheme": "SCT",
                     "meaning": "Morphologically abnormal structure"}}]}, "test")
    data = tmp_path / "data"
    shape = (3, 128, 128)
    for case in ("a", "b"):
        ct_series(data / case, 3)
        reference = np.zeros(shape, dtype=np.uint8)
        reference[2, 10:20, 10:20] = 1  # the top slice (highest z) has the lesion
        np.savez_compressed(data / case / "mask.npz", mask=reference)

    def fake_segment(card: ModelCard, model_dir: Path,
                     sources: Sequence[Dataset]) -> SegmentationResult:
        ordered = sorted(sources, key=lambda ds: float(ds.ImagePositionPatient[2]))
        mask = np.zeros(shape, dtype=np.uint8)
        mask[2, 10:20, 10:20] = 1
        if Path(sources[0].filename).parent.name == "b":  # case b: half the lesion found
            mask[2, 10:20, 15:20] = 0
        # hand the frames back in reverse spatial order, as a model may
        return SegmentationResult(
            model=ModelIdentity("seg", "0.1", "test", True),
            segments=((CodedConcept("27925004", "SCT", "Nodule"),
                       CodedConcept("49755003", "SCT", "Morphologically abnormal structure")),),
            frames=tuple(SourceFrame(str(ds.SOPInstanceUID)) for ds in reversed(ordered)),
            mask=mask[::-1].copy(), regions=())

    monkeypatch.setitem(sys.modules, "dicom_node.infer.segment",
                        types.SimpleNamespace(segment=fake_segment))
    report = evaluate(card, tmp_path, data, tmp_path / "out", progress=False)
    per_case = {c["case"]: c["nodule"]["dice"] for c in report.metrics["per_case"]}
    assert per_case == {"a": 1.0, "b": pytest.approx(2 * 50 / 150)}
    assert report.metrics["per_output"]["nodule"]["mean_dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert (tmp_path / "out" / "dice.png").stat().st_size > 5_000


def test_enhancer_psnr_and_ssim_compare_output_and_input_with_the_clean_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = parse_card({**_COMMON, "name": "den", "kind": "enhancer",
                       "series_description": "AI denoised",
                       "metrics": {"split": "test", "samples": 3, "image_quality": {
                           "phantom": {"description": "t", "samples": 3,
                                       "psnr_input_db": 0.0, "psnr_output_db": 0.0,
                                       "ssim_input": 0.0, "ssim_output": 0.0}}}}, "test")
    template = pydicom.dcmread(sample_file("CT_small.dcm"))
    rng = np.random.default_rng(3)
    for folder in ("noisy", "clean"):
        (tmp_path / folder).mkdir()
    clean_pixels = {}
    for i in range(3):
        clean, noisy = copy.deepcopy(template), copy.deepcopy(template)
        base = clean.pixel_array.astype(np.int16)
        noise = rng.normal(0, 40, base.shape).round().astype(np.int16)
        noisy.PixelData = (base + noise).astype(np.int16).tobytes()
        name = f"phantom_{i:03d}.dcm"
        clean.save_as(tmp_path / "clean" / name, enforce_file_format=True)
        noisy.save_as(tmp_path / "noisy" / name, enforce_file_format=True)
        clean_pixels[name] = base

    def fake_enhance(card: ModelCard, model_dir: Path,
                     sources: Sequence[Dataset]) -> list[tuple[Dataset, np.ndarray]]:
        # halfway between the noisy image and the clean one: output PSNR = input PSNR + 6 dB
        return [(ds, ((ds.pixel_array.astype(np.int32)
                       + clean_pixels[Path(ds.filename).name]) / 2).astype(np.int16))
                for ds in sources]

    monkeypatch.setitem(sys.modules, "dicom_node.infer.enhance",
                        types.SimpleNamespace(enhance=fake_enhance))
    report = evaluate(card, tmp_path, tmp_path, tmp_path / "out", progress=False)
    sets = report.metrics["sets"]
    assert set(sets) == {"all", "phantom"}
    gain = sets["all"]["psnr_output_db"] - sets["all"]["psnr_input_db"]
    assert gain == pytest.approx(6.0, abs=0.3)
    assert sets["all"]["ssim_output"] > sets["all"]["ssim_input"]
    assert sets["phantom"]["agrees"] is False  # the card's zeros are far off
    assert report.agrees is False
    assert "DIFFERS" in report.text
    assert (tmp_path / "out" / "psnr.png").is_file() and (tmp_path / "out" / "ssim.png").is_file()
