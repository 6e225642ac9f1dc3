"""Train ct-denoise-gan, a conditional GAN that denoises low-dose CT; write generator.keras and
model.toml.

Usage (from the repository root, with the "train" extra installed)::

    .venv/bin/python models/ct-denoise-gan/train.py                 # the shipped weights
    .venv/bin/python models/ct-denoise-gan/train.py --quick --out /tmp/gan   # a smoke run
    .venv/bin/python models/ct-denoise-gan/train.py --export-eval /tmp/eval  # held-out pairs only

What it does, reproducibly from one seed:

1. draws CT-like slices in HU (synthetic.py: Shepp–Logan, random head and trunk phantoms) and
   reads the real slice CT_small.dcm (pydicom's test files); simulates low-dose scans of them
   (Poisson noise on the photon counts of a sinogram, filtered back projection) at incident
   photon counts drawn log-uniformly from PHOTONS; cuts aligned patches of (noisy, clean);
2. trains, adversarially, a pix2pix-style conditional GAN: a small U-Net generator that predicts
   the noise of the noisy patch (output = input − predicted noise) and a PatchGAN discriminator
   that sees (noisy, clean) or (noisy, generated) pairs. Generator loss = adversarial (binary
   cross-entropy on the discriminator's patch logits) + L1_WEIGHT × L1 to the clean patch; two
   Adam optimisers, one step of each per batch. The generator and discriminator use Keras 3
   layers only; the training step (GradientTape) is TensorFlow code and stays in this script;
3. saves the generator alone, rebuilt for tiles of TILE×TILE pixels (the runtime tiles any matrix
   size), as generator.keras, and writes the model card;
4. measures PSNR and SSIM (skimage.metrics) of the noisy input and of the denoised output against
   the clean reference, through dicom_node.infer (load_card + enhance), on held-out synthetic
   slices and on the real head CT 693_UNCR.dcm (pydicom-data) with simulated low-dose noise —
   a slice never used in training — and writes them into the card.

``--export-eval DIR`` writes the same held-out pairs as DICOM files, DIR/noisy/ and DIR/clean/
with matching file names, for ``dicom-node evaluate``; it does not train.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import resource
import string
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# numpy's BLAS threads only slow the small products of the phantom drawing and fight the worker
# processes for cores; TensorFlow has its own thread pools.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # synthetic.py (the folder name is not a package name)
sys.path.insert(1, str(HERE.parent.parent))  # dicom_node, when the project is not installed

from synthetic import PHANTOMS, noise_sweep, real_slice_hu  # noqa: E402

NAME = "ct-denoise-gan"
VERSION = "1.0.0"
SEED = 20250611
#: Size of the synthetic slices, of the training patches, and of the deployed generator's tiles.
SLICE = 256
PATCH = 64
TILE = 128
OVERLAP = 16
#: Modality values the network sees (HU), and its scaling: x = HU / SCALE.
HU_RANGE = (-1024.0, 3071.0)
SCALE = 1000.0
#: Incident photons per ray of the simulated low-dose scans (log-uniform).
PHOTONS = (2e4, 1e6)
#: Photons per ray of the held-out 693_UNCR low-dose scans (noise ≈ 35 and ≈ 50 HU in brain).
REAL_TEST_PHOTONS = (2e5, 1e5)
#: HU window in which PSNR and SSIM are measured (data range = its width).
METRIC_WINDOW = (-1000.0, 1000.0)
L1_WEIGHT = 100.0
ADV_WEIGHT = 1.0
#: Share of the steps over which the adversarial weight ramps up from 0 (an L1 warm start).
ADV_RAMP = 0.15
BATCH = 16
LEARNING_RATE = 2e-4
CT_SMALL = "CT_small.dcm"  # real CT slice (pydicom's test files): training
CT_693 = "693_UNCR.dcm"  # real head CT slice (pydicom-data): held out, never trained on

CARD = string.Template('''\
# Model card of ct-denoise-gan — written by train.py; edit train.py, not this file.
name = "ct-denoise-gan"
version = "$version"
kind = "enhancer"
modalities = ["CT"]
description = """\\
A conditional GAN (pix2pix-style) that denoises low-dose CT slices: a small U-Net generator \\
predicts the noise of a slice and subtracts it. It was trained on synthetic CT-like phantoms \\
(Shepp-Logan, random head and trunk ellipse phantoms with tissue texture) and on one real CT \\
slice (CT_small.dcm from pydicom's test files), all with simulated low-dose noise. dicom-node \\
sends its output back as a derived series in the source study, marked AI-generated."""
intended_use = """\\
DEMONSTRATION ONLY — NOT FOR CLINICAL USE. For testing and showing dicom-node's derived-series \\
path (receive, route, enhance, encode, send) with a PACS. Trained mostly on synthetic images; \\
a denoiser can remove or invent small structures, and this one has not been validated on \\
patient images. Never use its output for diagnosis or any decision about a patient."""
manufacturer = "dicom-node project"
weights = "generator.keras"
synthetic_training_data = true
series_description = "AI enhanced: ct-denoise-gan $version (synthetic training data)"

[input]
shape = [$tile, $tile]
channels = 1

[enhancement]
value_range = [$hu_low, $hu_high]
offset = 0.0
scale = $scale
tile_overlap = $overlap
description = """\\
Decode (any transfer syntax pydicom's handlers read), apply Rescale Slope/Intercept (HU), clip \\
to [$hu_low, $hu_high] HU, divide by $scale (water 0, air -1). The image is padded by \\
reflection, cut into ${tile}x${tile} tiles sharing $overlap pixels, denoised tile by tile and \\
blended back (fully convolutional network, any matrix size). The output is mapped back to the \\
source's stored values (same rescale, bits and signedness); pixels outside the HU range and \\
padding pixels are left as they were."""

[training]
data = """\\
$n_slices synthetic slices of ${slice}x${slice} pixels (synthetic.py; a third each: modified \\
Shepp-Logan in HU, random head phantoms, random trunk phantoms; pixel spacing 0.7-1.5 mm) and \\
the real CT slice CT_small.dcm (pydicom test file, 128x128) with $real_copies noise \\
realisations. Low-dose noise is simulated physically: parallel-beam sinogram of the linear \\
attenuation (water 0.0192/mm), Poisson noise on the transmitted counts for \\
$photons_low-$photons_high incident photons per ray (log-uniform), filtered back projection \\
(ramp) of the sinogram difference added to the slice; so the noise is correlated, \\
attenuation-dependent and streaky along bone. $n_train aligned ${patch}x${patch} patch pairs \\
(noisy, clean) with flips and 90-degree rotations. The real 693_UNCR.dcm (pydicom-data) is held \\
out. Losses: generator = binary cross-entropy of the PatchGAN discriminator's logits \\
(adversarial, weight ramped 0->$adv_weight over the first $ramp_pct% of the steps) + \\
$l1_weight x L1 to the clean patch; discriminator = binary cross-entropy real/generated, \\
conditioned on the noisy patch. Adam (lr $lr, beta1 0.5) for each, batch $batch, $steps steps."""
script = "train.py"
seed = $seed
epochs = $epochs
train_samples = $n_train
validation_samples = 0
test_samples = $n_test
duration_seconds = $duration
hardware = "$hardware"
framework = "$framework"
$metrics''')


# ----------------------------------------------------------------------------------- data


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _augment(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out = []
    for a in arrays:
        b = np.rot90(a, k)
        out.append(np.ascontiguousarray(b[:, ::-1] if flip else b))
    return out


def _patches(rng: np.random.Generator, clean: np.ndarray, noisy: np.ndarray,
             count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` aligned random patches, preferring ones with something in them (not all air)."""
    cs, ns = [], []
    rows, cols = clean.shape
    tries = 0
    while len(cs) < count:
        r = int(rng.integers(0, rows - PATCH + 1))
        c = int(rng.integers(0, cols - PATCH + 1))
        pc = clean[r:r + PATCH, c:c + PATCH]
        tries += 1
        if np.mean(pc > -900) < 0.3 and tries < 20 * count:
            continue
        pc, pn = _augment(rng, pc, noisy[r:r + PATCH, c:c + PATCH])
        cs.append(pc)
        ns.append(pn)
    return np.stack(cs).astype(np.float32), np.stack(ns).astype(np.float32)


def _photons(rng: np.random.Generator, n: int) -> list[float]:
    low, high = np.log(PHOTONS[0]), np.log(PHOTONS[1])
    return [float(np.exp(rng.uniform(low, high))) for _ in range(n)]


def synthetic_slice(seed: int, index: int) -> tuple[np.ndarray, float]:
    """Slice ``index`` of stream ``seed``: (HU, pixel spacing in mm); kinds in turn."""
    rng = _rng(seed, index)
    kinds = list(PHANTOMS)
    draw, (low, high) = PHANTOMS[kinds[index % len(kinds)]]
    return draw(SLICE, rng), float(rng.uniform(low, high))


def make_training_patches(seed: int, start: int, stop: int, levels: int,
                          per_pair: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches of synthetic slices start … stop-1, each at ``levels`` simulated doses."""
    cs, ns = [], []
    for index in range(start, stop):
        clean, pixel_mm = synthetic_slice(seed, index)
        rng = _rng(seed, index, 1)
        for noisy in noise_sweep(clean, pixel_mm, _photons(rng, levels), rng):
            c, n = _patches(rng, clean, noisy, per_pair)
            cs.append(c)
            ns.append(n)
    return np.concatenate(cs), np.concatenate(ns)


def make_test_pairs(seed: int, start: int, stop: int) -> list[tuple[np.ndarray, np.ndarray,
                                                                      float, float]]:
    """Whole held-out slices: (clean HU, noisy HU, pixel spacing, photons per ray)."""
    out = []
    for index in range(start, stop):
        clean, pixel_mm = synthetic_slice(seed, index)
        rng = _rng(seed, index, 2)
        photons = _photons(rng, 1)[0]
        noisy = noise_sweep(clean, pixel_mm, [photons], rng)[0]
        out.append((clean, noisy, pixel_mm, photons))
    return out


def real_training_patches(seed: int, copies: int,
                          per_pair: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches of CT_small.dcm at ``copies`` simulated doses."""
    ds = read_testdata(CT_SMALL)
    clean = real_slice_hu(ds)
    pixel_mm = float(ds.PixelSpacing[0])
    rng = _rng(seed, 10_000)
    cs, ns = [], []
    for noisy in noise_sweep(clean, pixel_mm, _photons(rng, copies), rng):
        c, n = _patches(rng, clean, noisy, per_pair)
        cs.append(c)
        ns.append(n)
    return np.concatenate(cs), np.concatenate(ns)


def read_testdata(name: str) -> Any:
    """A file of pydicom's test data or pydicom-data, by exact name (never a pattern)."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise SystemExit(f"{name} not found: install pydicom-data (the 'train' extra)")
    return pydicom.dcmread(str(path))


def real_test_pair(seed: int, photons: float) -> tuple[Any, Any]:
    """693_UNCR.dcm and a low-dose version of it (same header, noisy pixels, padding kept)."""
    from pydicom.uid import generate_uid

    clean = read_testdata(CT_693)
    hu = real_slice_hu(clean)
    rng = _rng(seed, 20_000, int(photons))
    noisy_hu = noise_sweep(hu, float(clean.PixelSpacing[0]), [photons], rng)[0]
    stored = clean.pixel_array
    padding = int(clean.get("PixelPaddingValue", -(2**15)))
    slope, intercept = float(clean.RescaleSlope), float(clean.RescaleIntercept)
    bits = int(clean.BitsStored)
    new = np.clip(np.rint((noisy_hu - intercept) / slope), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    new = np.where(stored == padding, stored, new).astype(stored.dtype)
    noisy = copy.deepcopy(clean)
    noisy.PixelData = new.tobytes()
    noisy.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    noisy.DerivationDescription = (
        f"Simulated low-dose scan ({photons:.0f} photons per ray, Poisson noise on the "
        "sinogram, FBP) of the original slice, by models/ct-denoise-gan/train.py")
    noisy.SeriesInstanceUID = generate_uid(entropy_srcs=[NAME, "693 low dose", f"{photons:.0f}"])
    noisy.SOPInstanceUID = generate_uid(entropy_srcs=[NAME, "693 low dose sop", f"{photons:.0f}"])
    noisy.file_meta.MediaStorageSOPInstanceUID = noisy.SOPInstanceUID
    noisy.SeriesDescription = f"Simulated low dose {photons:.0f} photons/ray"
    return clean, noisy


# ---------------------------------------------------------------------------------- model


def build_generator(keras: Any, size: int | None) -> Any:
    """A small U-Net that predicts the noise; output = input − noise (Keras 3 layers only)."""
    layers = keras.layers

    def conv(x: Any, filters: int, name: str, strides: int = 1) -> Any:
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", name=name)(x)
        return layers.LeakyReLU(0.1, name=f"{name}_act")(x)

    noisy = keras.Input((size, size, 1), name="noisy")
    e1 = conv(conv(noisy, 24, "enc1a"), 24, "enc1b")
    e2 = conv(conv(e1, 40, "down2", strides=2), 40, "enc2")
    e3 = conv(conv(e2, 56, "down3", strides=2), 56, "enc3a")
    e3 = conv(e3, 56, "enc3b")
    d2 = conv(layers.UpSampling2D(2, name="up2")(e3), 40, "up2_conv")
    d2 = conv(layers.Concatenate(name="skip2")([d2, e2]), 40, "dec2")
    d1 = conv(layers.UpSampling2D(2, name="up1")(d2), 24, "up1_conv")
    d1 = conv(layers.Concatenate(name="skip1")([d1, e1]), 24, "dec1")
    noise = layers.Conv2D(1, 3, padding="same", name="noise")(d1)
    denoised = layers.Subtract(name="denoised")([noisy, noise])
    return keras.Model(noisy, denoised, name="ct_denoise_generator")


def build_discriminator(keras: Any) -> Any:
    """PatchGAN: logits per patch (receptive field ~34 px) of a (noisy, candidate) pair."""
    layers = keras.layers
    noisy = keras.Input((None, None, 1), name="noisy")
    candidate = keras.Input((None, None, 1), name="candidate")
    x = layers.Concatenate(name="pair")([noisy, candidate])
    for i, (filters, strides) in enumerate(((32, 2), (64, 2), (96, 1))):
        x = layers.Conv2D(filters, 4, strides=strides, padding="same", name=f"d{i + 1}")(x)
        x = layers.LeakyReLU(0.2, name=f"d{i + 1}_act")(x)
    logits = layers.Conv2D(1, 4, padding="same", name="patch_logits")(x)
    return keras.Model([noisy, candidate], logits, name="ct_denoise_patchgan")


def train_gan(keras: Any, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> tuple[Any, list]:
    """Adversarial training (TensorFlow GradientTape); returns the generator and a loss log."""
    import tensorflow as tf

    generator = build_generator(keras, None)
    discriminator = build_discriminator(keras)
    g_opt = keras.optimizers.Adam(LEARNING_RATE, beta_1=0.5)
    d_opt = keras.optimizers.Adam(LEARNING_RATE, beta_1=0.5)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    @tf.function
    def step(noisy: Any, clean: Any, adv_weight: Any) -> tuple[Any, Any, Any]:
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(noisy, training=True)
            real_logits = discriminator([noisy, clean], training=True)
            fake_logits = discriminator([noisy, fake], training=True)
            d_loss = (bce(tf.ones_like(real_logits), real_logits)
                      + bce(tf.zeros_like(fake_logits), fake_logits))
            adv = bce(tf.ones_like(fake_logits), fake_logits)
            l1 = tf.reduce_mean(tf.abs(fake - clean))
            g_loss = adv_weight * adv + L1_WEIGHT * l1
        g_vars = generator.trainable_variables
        d_vars = discriminator.trainable_variables
        g_opt.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars, strict=True))
        d_opt.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars, strict=True))
        return l1, adv, d_loss

    rng = _rng(seed, 30_000)
    order = rng.permutation(len(x))
    position = 0
    history = []
    started = time.perf_counter()
    ramp = max(1, int(ADV_RAMP * steps))
    for i in range(steps):
        if position + BATCH > len(order):
            order, position = rng.permutation(len(x)), 0
        index = order[position:position + BATCH]
        position += BATCH
        weight = np.float32(ADV_WEIGHT * min(1.0, (i + 1) / ramp))
        l1, adv, d_loss = step(x[index], y[index], weight)
        if i % 50 == 0 or i == steps - 1:
            entry = {"step": i, "l1_hu": round(float(l1) * SCALE, 2), "adv": round(float(adv), 3),
                     "d": round(float(d_loss), 3), "s": round(time.perf_counter() - started, 1)}
            history.append(entry)
            print(json.dumps(entry), flush=True)
    return generator, history


def only_builtin_layers(model: Any) -> list[str]:
    """Class names of layers that are not Keras built-ins (must be empty: loads on JAX too)."""
    return [layer.__class__.__name__ for layer in model.layers
            if not layer.__class__.__module__.startswith("keras.")]


# -------------------------------------------------------------------------------- metrics


def quality(clean: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None) -> tuple[float,
                                                                                          float]:
    """PSNR (dB) and mean SSIM of ``test`` against ``clean`` in METRIC_WINDOW (skimage)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    low, high = METRIC_WINDOW
    ref = np.clip(clean, low, high)
    img = np.clip(test, low, high)
    span = high - low
    if mask is None:
        mask = np.ones(ref.shape, dtype=bool)
    psnr = peak_signal_noise_ratio(ref[mask], img[mask], data_range=span)
    _, ssim_map = structural_similarity(ref, img, data_range=span, full=True)
    return float(psnr), float(np.mean(ssim_map[mask]))


def image_quality_toml(key: str, description: str, rows: list[tuple[float, float, float,
                                                                     float]]) -> str:
    a = np.asarray(rows)
    return "\n".join([
        f"[metrics.image_quality.{key}]",
        f"description = {json.dumps(description)}",
        f"samples = {len(rows)}",
        f"psnr_input_db = {a[:, 0].mean():.2f}",
        f"psnr_output_db = {a[:, 2].mean():.2f}",
        f"ssim_input = {a[:, 1].mean():.4f}",
        f"ssim_output = {a[:, 3].mean():.4f}",
    ]) + "\n"


def evaluate(out: Path, seed: int, n_test: int) -> tuple[str, dict[str, Any]]:
    """Measure the saved model through dicom_node.infer; the card's [metrics] text and a summary."""
    from dicom_node.infer import load_card
    from dicom_node.infer.enhance import enhance, enhance_values

    card = load_card(out)
    tests = make_test_pairs(seed + 1, 0, n_test)
    denoised = enhance_values(card, out, [noisy for _, noisy, _, _ in tests])
    synthetic_rows = []
    for (clean, noisy, _, _), den in zip(tests, denoised, strict=True):
        synthetic_rows.append((*quality(clean, noisy), *quality(clean, den)))
    sections = [image_quality_toml(
        "synthetic",
        f"{n_test} held-out synthetic slices (a separate seed; Shepp-Logan, head and trunk "
        f"phantoms in turn; {SLICE}x{SLICE}) at {PHOTONS[0]:.0f}-{PHOTONS[1]:.0f} photons per ray "
        f"(log-uniform); PSNR and SSIM of the whole slice in HU clipped to "
        f"[{METRIC_WINDOW[0]:.0f}, {METRIC_WINDOW[1]:.0f}] (data range "
        f"{METRIC_WINDOW[1] - METRIC_WINDOW[0]:.0f} HU)",
        synthetic_rows)]
    summary: dict[str, Any] = {"synthetic": np.asarray(synthetic_rows).mean(axis=0).round(4)
                               .tolist()}
    for photons in REAL_TEST_PHOTONS:
        clean, noisy = real_test_pair(seed, photons)
        [(_, stored)] = enhance(card, out, [noisy])
        slope, intercept = float(clean.RescaleSlope), float(clean.RescaleIntercept)
        ref = real_slice_hu(clean)
        mask = clean.pixel_array != int(clean.PixelPaddingValue)
        noisy_hu = real_slice_hu(noisy)
        den_hu = stored.astype(np.float64) * slope + intercept
        row = (*quality(ref, noisy_hu, mask), *quality(ref, den_hu, mask))
        key = f"real_693_UNCR_{photons:.0e}".replace("+0", "").replace("+", "")
        sections.append(image_quality_toml(
            key,
            f"The real head CT slice 693_UNCR.dcm (pydicom-data, 512x512, 0.48 mm; never used in "
            f"training) with simulated low-dose noise at {photons:.0f} photons per ray, through "
            "dicom_node.infer.enhance (DICOM in, stored values out); PSNR and SSIM inside the "
            f"reconstruction circle (padding excluded), HU clipped to [{METRIC_WINDOW[0]:.0f}, "
            f"{METRIC_WINDOW[1]:.0f}]. The reference is the original scan, itself not "
            "noise-free.",
            [row]))
        summary[key] = [round(v, 4) for v in row]
    return "\n".join(sections), summary


def metrics_toml(image_quality: str, n_test: int, notes: list[str]) -> str:
    lines = ["", "[metrics]",
             'split = "test (held out: synthetic slices of another seed, and the real 693_UNCR)"',
             f"samples = {n_test + len(REAL_TEST_PHOTONS)}", "notes = ["]
    lines += [f"    {json.dumps(note, ensure_ascii=False)}," for note in notes]
    lines += ["]", ""]
    return "\n".join(lines) + image_quality


# ---------------------------------------------------------------------------- export eval


def export_eval(folder: Path, seed: int, n_test: int) -> None:
    """Write the held-out pairs as DICOM: folder/noisy/NAME.dcm and folder/clean/NAME.dcm."""
    (folder / "noisy").mkdir(parents=True, exist_ok=True)
    (folder / "clean").mkdir(parents=True, exist_ok=True)
    for index, (clean, noisy, pixel_mm, photons) in enumerate(make_test_pairs(seed + 1, 0,
                                                                              n_test)):
        name = f"synthetic_{index:03d}.dcm"
        for kind, hu in (("clean", clean), ("noisy", noisy)):
            ds = synthetic_dataset(hu, pixel_mm, index, kind, photons)
            ds.save_as(folder / kind / name, enforce_file_format=True)
    for photons in REAL_TEST_PHOTONS:
        clean_ds, noisy_ds = real_test_pair(seed, photons)
        name = f"693_UNCR_{photons:.0f}.dcm"
        clean_ds.save_as(folder / "clean" / name, enforce_file_format=True)
        noisy_ds.save_as(folder / "noisy" / name, enforce_file_format=True)
    print(f"wrote {n_test + len(REAL_TEST_PHOTONS)} pairs to {folder}/noisy and {folder}/clean")


def synthetic_dataset(hu: np.ndarray, pixel_mm: float, index: int, kind: str,
                      photons: float) -> Any:
    """A CT Image (PS3.3 A.3) holding one held-out synthetic slice, signed 16 bit, HU = stored."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[NAME, VERSION, *map(str, parts)])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid("sop", kind, index)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = "CT-DENOISE-GAN-TEST"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = uid("study")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250611"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "ct-denoise-gan held-out synthetic slices"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uid("series", kind)
    ds.SeriesNumber = 1 if kind == "clean" else 2
    ds.SeriesDescription = ("Synthetic phantom, clean" if kind == "clean"
                            else f"Synthetic phantom, simulated low dose {photons:.0f} photons")
    ds.PatientPosition = "HFS"
    ds.Laterality = ""  # unknown: a phantom (Type 2C, PS3.3 C.7.3.1)
    ds.FrameOfReferenceUID = uid("frame of reference")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "dicom-node project (synthetic.py)"
    ds.InstanceNumber = index + 1
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.AcquisitionNumber = ""
    ds.KVP = ""
    ds.BurnedInAnnotation = "NO"
    rows, cols = hu.shape
    ds.ImagePositionPatient = [round(-pixel_mm * cols / 2, 4), round(-pixel_mm * rows / 2, 4),
                               5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [round(pixel_mm, 6), round(pixel_mm, 6)]
    ds.SliceThickness = 5.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    pixels = np.clip(np.rint(hu), -32768, 32767).astype("<i2")
    ds.PixelData = pixels.tobytes()
    return ds


# ------------------------------------------------------------------------------------ main


def generate(workers: int, jobs: list[tuple[Any, ...]]) -> tuple[np.ndarray, np.ndarray]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(make_training_patches, *zip(*jobs, strict=True)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the weights and card")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--slices", type=int, default=96, help="synthetic training slices")
    parser.add_argument("--levels", type=int, default=2, help="simulated doses per slice")
    parser.add_argument("--patches", type=int, default=16, help="patches per (slice, dose)")
    parser.add_argument("--real-copies", type=int, default=24, help="doses of CT_small")
    parser.add_argument("--test", type=int, default=12, help="held-out synthetic slices")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not for shipping)")
    parser.add_argument("--export-eval", type=Path, metavar="DIR",
                        help="write the held-out pairs as DICOM to DIR/noisy and DIR/clean; "
                             "no training")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.levels, args.patches, args.real_copies = 12, 1, 8, 4
        args.test, args.epochs = 3, 1
    if args.export_eval is not None:
        export_eval(args.export_eval, args.seed, args.test)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 1. data (before Keras is imported, so the worker processes fork light)
    bounds = np.linspace(0, args.slices, max(1, args.workers) * 3 + 1).astype(int)
    jobs = [(args.seed, int(a), int(b), args.levels, args.patches)
            for a, b in itertools.pairwise(bounds) if b > a]
    y_syn, x_syn = generate(args.workers, jobs)
    y_real, x_real = real_training_patches(args.seed, args.real_copies, args.patches)
    clean = np.concatenate([y_syn, y_real])
    noisy = np.concatenate([x_syn, x_real])
    low, high = HU_RANGE
    x = (np.clip(noisy, low, high) / SCALE)[..., np.newaxis].astype(np.float32)
    y = (np.clip(clean, low, high) / SCALE)[..., np.newaxis].astype(np.float32)
    n_train = len(x)
    print(f"data: {n_train} patch pairs ({len(x_real)} of {CT_SMALL}) "
          f"in {time.perf_counter() - started:.1f} s", flush=True)

    # 2. adversarial training
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(args.seed)
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("train.py's training step is TensorFlow code: run it with "
                         "KERAS_BACKEND=tensorflow (the saved generator loads on any backend)")
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    # grappler's remapper cannot fuse Conv2D+LeakyReLU gradients and logs an error saying so
    tf.config.optimizer.set_experimental_options({"remapping": False})
    steps = args.epochs * int(np.ceil(n_train / BATCH))
    generator, history = train_gan(keras, x, y, steps, args.seed)

    # 3. the deployed generator: the same layers and weights, for TILE x TILE tiles
    deployed = build_generator(keras, TILE)
    deployed.set_weights(generator.get_weights())
    custom = only_builtin_layers(deployed)
    if custom:
        raise SystemExit(f"the generator has layers that are not Keras built-ins: {custom}")
    deployed.save(args.out / "generator.keras")
    duration = time.perf_counter() - started
    cpu = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    values: dict[str, object] = {
        "version": VERSION, "tile": TILE, "overlap": OVERLAP, "slice": SLICE, "patch": PATCH,
        "hu_low": HU_RANGE[0], "hu_high": HU_RANGE[1], "scale": SCALE,
        "n_slices": args.slices, "real_copies": args.real_copies,
        "photons_low": f"{PHOTONS[0]:.0f}", "photons_high": f"{PHOTONS[1]:.0f}",
        "adv_weight": ADV_WEIGHT, "ramp_pct": int(ADV_RAMP * 100), "l1_weight": L1_WEIGHT,
        "lr": LEARNING_RATE, "batch": BATCH, "steps": steps,
        "seed": args.seed, "epochs": args.epochs, "n_train": n_train,
        "n_test": args.test + len(REAL_TEST_PHOTONS), "duration": f"{duration:.0f}",
        "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU"
        if not tf.config.list_physical_devices("GPU") else f"{os.cpu_count()} CPU cores + GPU",
        "framework": f"keras {keras.__version__}, {keras.backend.backend()}",
    }
    (args.out / "model.toml").write_text(CARD.substitute(values, metrics=""), encoding="utf-8")

    # 4. metrics through dicom_node.infer, written into the card
    quality_toml, summary = evaluate(args.out, args.seed, args.test)
    print(json.dumps(summary), flush=True)
    notes = [
        "PSNR/SSIM columns: *_input = the simulated low-dose slice against the clean reference; "
        "*_output = the model's output against the same reference. Higher is better.",
        f"Training took {duration:.0f} s wall, {cpu:.0f} s of CPU, on {values['hardware']} "
        "(data simulation included; other jobs shared the cores); final training L1 "
        f"{history[-1]['l1_hu']} HU on a batch of patches.",
        "The low-dose noise is simulated (Poisson counts on a parallel-beam sinogram, FBP); real "
        "low-dose scans (fan/helical geometry, electronic noise, iterative reconstruction) "
        "differ. Synthetic phantoms dominate the training data. Not for clinical use.",
    ]
    text = CARD.substitute(values, metrics=metrics_toml(quality_toml, args.test, notes))
    (args.out / "model.toml").write_text(text, encoding="utf-8")
    print(f"wrote {args.out / 'generator.keras'} and {args.out / 'model.toml'} "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
