"""The shipped chest-xray-cnn weights run through dicom_node.infer on real and synthetic images."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.errors import ModelError, PreprocessingError
from dicom_node.infer import ClassifierCard, classify, describe_devices, load_card
from dicom_node.infer.runtime import load_model, predict

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "chest-xray-cnn"


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
    """models/chest-xray-cnn/synthetic.py (its folder name is not a package name)."""
    spec = importlib.util.spec_from_file_location("cxr_synthetic", MODEL_DIR / "synthetic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def test_classify_real_chest_cr_returns_the_card_codes_with_probabilities(
    card: ClassifierCard,
) -> None:
    ds = read("RG1_UNCR.dcm")
    result = classify(card, MODEL_DIR, [ds])
    assert [f.concept for f in result.findings] == [o.code.concept() for o in card.outputs]
    assert [f.threshold for f in result.findings] == [o.threshold for o in card.outputs]
    assert all(0.0 <= f.probability <= 1.0 for f in result.findings)
    assert result.source_sop_instance_uids == (ds.SOPInstanceUID,)
    assert result.model == card.identity()


def test_classifying_leaves_no_decoded_copy_in_the_source_datasets(card: ClassifierCard) -> None:
    # Dataset.pixel_array caches its array in the dataset (pydicom's private _pixel_array) for as
    # long as the job holds its sources: 7 MB per radiograph. The node decodes without caching.
    sources = [read("RG1_UNCR.dcm"), read("RG3_J2KR.dcm")]  # uncompressed, JPEG 2000
    classify(card, MODEL_DIR, sources)
    assert [getattr(ds, "_pixel_array", None) for ds in sources] == [None, None]


def test_compressed_copy_of_the_radiograph_gets_the_same_probabilities(
    card: ClassifierCard,
) -> None:
    plain = classify(card, MODEL_DIR, [read("RG1_UNCR.dcm")])
    j2k = classify(card, MODEL_DIR, [read("RG1_J2KR.dcm")])
    np.testing.assert_allclose([f.probability for f in j2k.findings],
                               [f.probability for f in plain.findings], atol=1e-6)


def test_study_probability_is_the_highest_over_its_images(card: ClassifierCard) -> None:
    chest, leg = read("RG1_UNCR.dcm"), read("RG3_UNCR.dcm")  # both CR
    each = [classify(card, MODEL_DIR, [ds]) for ds in (chest, leg)]
    both = classify(card, MODEL_DIR, [chest, leg])
    expected = np.max([[f.probability for f in r.findings] for r in each], axis=0)
    np.testing.assert_allclose([f.probability for f in both.findings], expected, atol=1e-6)
    assert both.source_sop_instance_uids == (chest.SOPInstanceUID, leg.SOPInstanceUID)


def test_images_the_model_cannot_use_are_skipped_and_not_listed(card: ClassifierCard) -> None:
    chest = read("RG1_UNCR.dcm")
    result = classify(card, MODEL_DIR, [read("MR_small.dcm"), chest, read("rtplan.dcm")])
    assert result.source_sop_instance_uids == (chest.SOPInstanceUID,)


def test_study_without_a_usable_image_raises_preprocessing_error(card: ClassifierCard) -> None:
    with pytest.raises(PreprocessingError, match=r"no usable image: .*modality 'MR' not in CR, DX"):
        classify(card, MODEL_DIR, [read("MR_small.dcm")])


def test_card_of_another_kind_is_refused_by_classify(card: ClassifierCard) -> None:
    from dicom_node.infer.card import parse_card

    raw = card.model_dump(mode="json", exclude={"outputs", "metrics", "kind"})
    enhancer = parse_card({**raw, "kind": "enhancer", "series_description": "AI denoised"}, "t")
    with pytest.raises(ModelError, match="is a enhancer, not a classifier"):
        classify(enhancer, MODEL_DIR, [read("RG1_UNCR.dcm")])


def test_model_is_loaded_once_per_weights_and_version(card: ClassifierCard) -> None:
    first = load_model(card, MODEL_DIR)
    assert load_model(card, MODEL_DIR) is first
    newer = card.model_copy(update={"version": card.version + "+test"})
    assert load_model(newer, MODEL_DIR) is not first


def test_weights_that_do_not_match_the_card_are_refused(card: ClassifierCard) -> None:
    wrong = card.model_copy(update={"outputs": card.outputs[:2], "version": "wrong-outputs"})
    with pytest.raises(ModelError, match="does not match the card's 2 outputs"):
        load_model(wrong, MODEL_DIR)


def test_shipped_weights_find_the_synthetic_findings_they_were_trained_for(
    card: ClassifierCard,
) -> None:
    """Fresh synthetic images (a seed the training never used) are separated well per finding."""
    synthetic = synthetic_module()
    images, labels = synthetic.make_dataset(seed=4242, start=0, stop=160,
                                            size=card.input.shape[0], prevalence=0.5)
    probabilities = predict(load_model(card, MODEL_DIR), images)
    for i, output in enumerate(card.outputs):
        assert auc(labels[:, i], probabilities[:, i]) > 0.85, output.name


def test_model_file_holds_only_keras_layers_so_any_backend_can_load_it() -> None:
    """No Lambda or TensorFlow-only op in the saved graph: the same file loads on JAX."""
    with zipfile.ZipFile(MODEL_DIR / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    layers = config["config"]["layers"]
    assert layers
    for layer in layers:
        assert layer["module"] == "keras.layers", layer["class_name"]
        assert layer["class_name"] != "Lambda"


def test_describe_devices_lists_at_least_a_cpu() -> None:
    devices = describe_devices()
    assert any("CPU" in line for line in devices), devices


def test_importing_the_infer_package_does_not_import_keras_or_tensorflow() -> None:
    """The receiver imports dicom_node.infer; it must not pay for TensorFlow."""
    code = (
        "import sys, dicom_node.infer\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('keras', 'tensorflow', 'jax', 'torch'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
