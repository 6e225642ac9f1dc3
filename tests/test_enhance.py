"""The ct-denoise-gan enhancer through dicom_node.infer.enhance and the enhancer pipeline: it
denoises a real CT slice with simulated low-dose noise, keeps the source's pixel representation,
tiles any matrix size, skips what it cannot enhance, and returns a derived series."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from datetime import datetime
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from structlog.testing import capture_logs

from dicom_node.errors import ModelError, PreprocessingError
from dicom_node.infer import load_card
from dicom_node.infer.card import EnhancerCard, parse_card
from dicom_node.infer.enhance import enhance, enhance_values
from dicom_node.messages import PipelineInput
from dicom_node.pipelines import run_pipeline, uids_for

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "ct-denoise-gan"
#: HU window of the PSNR/SSIM checks (the card's metrics use the same).
WINDOW = (-1000.0, 1000.0)


def read(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not installed (pydicom / pydicom-data)"
    return pydicom.dcmread(path)


def synthetic_module() -> ModuleType:
    """models/ct-denoise-gan/synthetic.py (its folder name is not a package name)."""
    spec = importlib.util.spec_from_file_location("ct_denoise_synthetic",
                                                  MODEL_DIR / "synthetic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hu(ds: Dataset, stored: Any = None) -> Any:
    pixels = ds.pixel_array if stored is None else stored
    return pixels.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def quality(reference: Any, image: Any, mask: Any) -> tuple[float, float]:
    ref, img = np.clip(reference, *WINDOW), np.clip(image, *WINDOW)
    span = WINDOW[1] - WINDOW[0]
    _, ssim = structural_similarity(ref, img, data_range=span, full=True)
    return (float(peak_signal_noise_ratio(ref[mask], img[mask], data_range=span)),
            float(ssim[mask].mean()))


def copy_of(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def card() -> EnhancerCard:
    loaded = load_card(MODEL_DIR)
    assert isinstance(loaded, EnhancerCard)
    return loaded


@pytest.fixture(scope="module")
def low_dose_693() -> tuple[Dataset, Dataset]:
    """693_UNCR.dcm and the same slice with simulated low-dose noise (1e5 photons per ray)."""
    clean = read("693_UNCR.dcm")
    noisy_hu = synthetic_module().simulate_low_dose(
        hu(clean), float(clean.PixelSpacing[0]), 1e5, np.random.default_rng(7))
    stored = clean.pixel_array
    new = np.clip(np.rint(noisy_hu - float(clean.RescaleIntercept)), -8192, 8191)
    new = np.where(stored == clean.PixelPaddingValue, stored, new).astype(stored.dtype)
    noisy = copy_of(clean)
    noisy.PixelData = new.tobytes()
    return clean, noisy


@pytest.fixture(scope="module")
def identity_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 'enhancer' whose network returns its input, with 32x32 tiles sharing 4 pixels."""
    import keras

    folder = tmp_path_factory.mktemp("identity")
    inputs = keras.Input((32, 32, 1))
    keras.Model(inputs, keras.layers.Activation("linear")(inputs)).save(folder / "id.keras")
    (folder / "model.toml").write_text(
        'name = "identity"\nversion = "1"\nkind = "enhancer"\nmodalities = ["CT"]\n'
        'description = "returns its input"\nintended_use = "tests"\nmanufacturer = "tests"\n'
        'weights = "id.keras"\nsynthetic_training_data = true\n'
        'series_description = "AI identity"\n[input]\nshape = [32, 32]\n'
        '[enhancement]\ntile_overlap = 4\n', encoding="utf-8")
    return folder


# ------------------------------------------------------------------------- it denoises


def test_enhance_improves_psnr_and_ssim_of_real_693_with_simulated_low_dose(
    card: EnhancerCard, low_dose_693: tuple[Dataset, Dataset]
) -> None:
    clean, noisy = low_dose_693
    [(source, stored)] = enhance(card, MODEL_DIR, [noisy])
    assert source is noisy
    inside = clean.pixel_array != clean.PixelPaddingValue
    psnr_in, ssim_in = quality(hu(clean), hu(noisy), inside)
    psnr_out, ssim_out = quality(hu(clean), hu(clean, stored), inside)
    assert psnr_out > psnr_in + 3.0, (psnr_in, psnr_out)
    assert ssim_out > ssim_in + 0.05, (ssim_in, ssim_out)


def test_card_reports_a_gain_on_every_held_out_set(card: EnhancerCard) -> None:
    assert card.metrics is not None
    sets = card.metrics.image_quality
    assert "synthetic" in sets and any(key.startswith("real_693_UNCR") for key in sets)
    for name, q in sets.items():
        assert q.psnr_output_db > q.psnr_input_db, name
        assert q.ssim_output > q.ssim_input, name


# ------------------------------------------------------------- the source's representation


def test_enhanced_pixels_keep_shape_dtype_padding_and_stored_range(
    card: EnhancerCard, low_dose_693: tuple[Dataset, Dataset]
) -> None:
    _, noisy = low_dose_693
    [(_, stored)] = enhance(card, MODEL_DIR, [noisy])
    source = noisy.pixel_array
    assert stored.shape == source.shape and stored.dtype == source.dtype
    padding = source == noisy.PixelPaddingValue
    np.testing.assert_array_equal(stored[padding], source[padding])
    assert stored.min() >= -(2**13) and stored.max() < 2**13  # 14 bits stored, signed
    assert not np.array_equal(stored, source)


def test_identity_network_gives_back_the_source_stored_values(identity_dir: Path) -> None:
    card = load_card(identity_dir)
    for name in ("693_UNCR.dcm", "CT_small.dcm"):
        source = read(name)
        [(_, stored)] = enhance(card, identity_dir, [source])
        np.testing.assert_array_equal(stored, source.pixel_array)


@pytest.mark.parametrize("shape", [(37, 300), (8, 8), (1, 50), (32, 32), (100, 33)])
def test_any_matrix_size_is_tiled_and_joined_back(identity_dir: Path,
                                                  shape: tuple[int, int]) -> None:
    image = np.random.default_rng(1).uniform(-1000, 2000, shape)
    [out] = enhance_values(load_card(identity_dir), identity_dir, [image])
    assert out.shape == shape
    np.testing.assert_allclose(out, image, atol=1e-3)


def test_compressed_source_is_decoded_and_enhanced_like_the_uncompressed(
    card: EnhancerCard,
) -> None:
    [(_, from_j2k)] = enhance(card, MODEL_DIR, [read("693_J2KR.dcm")])  # JPEG 2000 lossless
    [(_, from_raw)] = enhance(card, MODEL_DIR, [read("693_UNCR.dcm")])
    np.testing.assert_array_equal(from_j2k, from_raw)


# ------------------------------------------------------------------------ what is skipped


def test_non_ct_and_localizer_are_skipped_with_a_log_line(card: EnhancerCard) -> None:
    ct = read("CT_small.dcm")
    localizer = copy_of(ct)
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.SOPInstanceUID = generate_uid(entropy_srcs=["localizer"])
    with capture_logs() as logs:
        pairs = enhance(card, MODEL_DIR, [read("MR_small.dcm"), localizer, ct])
    assert [source for source, _ in pairs] == [ct]
    skipped = [e for e in logs if e["event"] == "image_skipped"]
    assert [e["sop_instance_uid"] for e in skipped] == [
        read("MR_small.dcm").SOPInstanceUID, localizer.SOPInstanceUID]
    assert "modality 'MR'" in skipped[0]["reason"] and "localizer" in skipped[1]["reason"]


def test_nothing_to_enhance_raises_preprocessing_error(card: EnhancerCard) -> None:
    with pytest.raises(PreprocessingError, match=r"no image to enhance: .*modality 'MR'"):
        enhance(card, MODEL_DIR, [read("MR_small.dcm")])
    with pytest.raises(PreprocessingError, match="no instances given"):
        enhance(card, MODEL_DIR, [])
    no_pixels = copy_of(read("CT_small.dcm"))
    del no_pixels.PixelData
    with pytest.raises(PreprocessingError, match="no Pixel Data"):
        enhance(card, MODEL_DIR, [no_pixels])


def test_card_of_another_kind_is_refused(card: EnhancerCard) -> None:
    raw = card.model_dump(mode="json", exclude={"series_description", "enhancement", "metrics",
                                                 "kind"})
    other = parse_card({**raw, "kind": "classifier", "outputs": [
        {"name": "x", "code": {"value": "1", "scheme": "99X", "meaning": "x"},
         "threshold": 0.5}]}, "t")
    with pytest.raises(ModelError, match="is a classifier, not an enhancer"):
        enhance(other, MODEL_DIR, [read("CT_small.dcm")])
    with pytest.raises(ModelError, match="not an enhancer"):
        enhance_values(other, MODEL_DIR, [np.zeros((8, 8))])


# ------------------------------------------------------------------ the deployed generator


def test_generator_has_only_builtin_keras_layers_so_it_loads_on_any_backend(
    card: EnhancerCard,
) -> None:
    import keras

    with zipfile.ZipFile(MODEL_DIR / card.weights) as archive:
        config = json.loads(archive.read("config.json"))
    layers = config["config"]["layers"]
    assert layers
    for layer in layers:
        assert layer["module"] == "keras.layers", layer["class_name"]
        assert layer.get("registered_name") in (None, layer["class_name"]), layer
        assert hasattr(keras.layers, layer["class_name"]), layer["class_name"]
        assert layer["class_name"] != "Lambda"
    assert tuple(config["config"]["layers"][0]["config"]["batch_shape"]) == (
        None, *card.input.shape, 1)


# --------------------------------------------------------------------------- the pipeline


def test_pipeline_returns_one_derived_instance_per_slice_in_the_job_series(
    card: EnhancerCard, low_dose_693: tuple[Dataset, Dataset]
) -> None:
    _, noisy = low_dose_693
    second = copy_of(noisy)
    second.SOPInstanceUID = generate_uid(entropy_srcs=["693 second slice"])
    second.ImagePositionPatient = [-122.5, -112.4, 52.0]
    localizer = copy_of(noisy)
    localizer.SOPInstanceUID = generate_uid(entropy_srcs=["693 localizer"])
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    job = PipelineInput(study_instance_uid=str(noisy.StudyInstanceUID), generation=0,
                        route_name="ct-denoise", sources=(noisy, second, localizer),
                        prior_findings=(), timestamp=datetime(2024, 5, 6, 7, 8, 9))
    output = run_pipeline(card, MODEL_DIR, job)
    uids = uids_for(job, card, "derived")
    assert output.findings == ()
    assert len(output.objects) == 2
    assert {o.SeriesInstanceUID for o in output.objects} == {uids.series_instance_uid}
    assert {o.StudyInstanceUID for o in output.objects} == {noisy.StudyInstanceUID}
    assert [o.SourceImageSequence[0].ReferencedSOPInstanceUID for o in output.objects] == [
        noisy.SOPInstanceUID, second.SOPInstanceUID]
    assert [list(o.ImagePositionPatient) for o in output.objects] == [
        list(noisy.ImagePositionPatient), list(second.ImagePositionPatient)]
    assert output.objects[0].SeriesDescription == card.series_description
    assert output.summary["enhanced"] == 2 and output.summary["skipped"] == 1
    again = run_pipeline(card, MODEL_DIR, job)
    assert [o.SOPInstanceUID for o in again.objects] == [o.SOPInstanceUID for o in output.objects]


def test_generator_runs_on_the_jax_backend_as_on_tensorflow(
    card: EnhancerCard, low_dose_693: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    """Needs the "jax" extra; the layer check above covers the cause when it is not installed."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'dicom-node[jax]')")
    _, noisy = low_dose_693
    noisy.save_as(tmp_path / "noisy.dcm", enforce_file_format=True)
    script = (
        "import sys, numpy, pydicom; from pathlib import Path;"
        "from dicom_node.infer import load_card; from dicom_node.infer.enhance import enhance;"
        f"d = Path({str(MODEL_DIR)!r}); ds = pydicom.dcmread({str(tmp_path / 'noisy.dcm')!r});"
        "[(_, s)] = enhance(load_card(d), d, [ds]);"
        f"numpy.save({str(tmp_path / 'jax.npy')!r}, s)"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300,
                   capture_output=True)
    [(_, on_tf)] = enhance(card, MODEL_DIR, [noisy])
    on_jax = np.load(tmp_path / "jax.npy")
    assert np.abs(on_jax.astype(np.int32) - on_tf.astype(np.int32)).max() <= 1
