"""Train head-ct-ich-cnn on synthetic head CT slices; write model.keras and model.toml.

Usage (from the repository root, with the "train" extra installed)::

    .venv/bin/python models/head-ct-ich-cnn/train.py             # the shipped weights
    .venv/bin/python models/head-ct-ich-cnn/train.py --quick --out /tmp/ich    # a smoke run
    .venv/bin/python models/head-ct-ich-cnn/train.py --export-eval /tmp/ich-eval

What a training run does, reproducibly from one seed:

1. reads the real head CT slice 693_UNCR.dcm from pydicom-data (by its exact name; nothing is
   downloaded) and resizes it in HU with the preprocessing's own filter, as
   dicom_node.infer.preprocess does before the card's windows;
2. draws train / validation / test sets of 128 x 128 slices in HU (synthetic.py): phantoms and,
   for a fraction ``REAL_FRACTION``, augmented copies of the real slice; half of them with one
   or two inserted acute haemorrhages;
3. maps them through the card's three windows with dicom_node.infer.preprocess.apply_windows
   (the same code the node runs) and trains a small Keras 3 CNN (keras.layers only, so the
   .keras file also loads on JAX);
4. picks the threshold on the validation set (best F1) and measures accuracy, precision,
   recall, F1 and ROC AUC on the held-out test set (numpy only), and recall per haemorrhage kind;
5. saves model.keras, writes the card model.toml, loads both back through dicom_node.infer
   (load_card + classify) and records in the card what the model says on the real slice, on the
   real slice with inserted haemorrhages (full 512 x 512 resolution, through the whole
   preprocessing), and on a non-head CT (CT_small.dcm) as an out-of-domain control.

``--export-eval DIR`` trains nothing: it draws the same held-out test set again (same seed, so
the same slices the card's metrics were measured on) and writes it as DICOM for
``dicom-node evaluate``:

- ``DIR/ich-test-00000.dcm`` …: one CT Image Storage file per case, 128 x 128, MONOCHROME2,
  12 bits stored (unsigned), Rescale Intercept -1024, Rescale Slope 1, Rescale Type HU, so that
  the stored value minus 1024 is exactly the HU the model was tested on; Pixel Spacing is the
  case's millimetres per pixel; Window Center/Width 40/80. Every file is a study of its own (its
  own Study, Series and SOP Instance UIDs, derived from the seed and the case number), so a
  study-level result is the result of that one slice. Patient Name/ID are synthetic
  (``SYNTHETIC^HEADCT``, ``SYNTH-ICH-00000``) and Image Comments says the image is synthetic.
- ``DIR/labels.csv``: header ``file,intracranial_hemorrhage``; one row per file with the file
  name relative to DIR and 1 (haemorrhage inserted) or 0.
- ``DIR/cases.csv`` (informative, not needed by evaluate): ``file,background,kinds``, e.g.
  ``ich-test-00007.dcm,real,subdural+subarachnoid``.

When the folder of ``--out`` has model.keras and model.toml, the export then runs every file
through dicom_node.infer.classify and prints the metrics at the card's threshold, which must
match the card's ``[metrics]``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import string
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from copy import deepcopy
from pathlib import Path
from typing import Any

# numpy's BLAS threads only slow the small matrix products of the generator (and fight the
# worker processes for cores); TensorFlow has its own thread pools.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # synthetic.py (the folder name is not a package name)
sys.path.insert(1, str(HERE.parent.parent))  # dicom_node, when the project is not installed

from synthetic import FINDINGS, KINDS, make_dataset, with_bleed  # noqa: E402

from dicom_node.evaluate import metrics  # noqa: E402

NAME = "head-ct-ich-cnn"
VERSION = "1.0.0"
SEED = 20250214
SIZE = 128
PREVALENCE = 0.5
REAL_FRACTION = 0.3
#: SNOMED CT 1386000 |Intracranial hemorrhage (disorder)| (UMLS C0151699).
CODE = ("1386000", "Intracranial hemorrhage")
#: (name, centre, width) in HU, one input channel each.
WINDOWS = (("brain", 40, 80), ("subdural", 80, 200), ("bone", 600, 2800))
REAL = "693_UNCR.dcm"  # real head CT slice (pydicom-data): background and negative
NON_HEAD = "CT_small.dcm"  # real CT of the spine and back muscles: an out-of-domain control
REAL_LOSSLESS = "693_J2KR.dcm"  # the same slice, JPEG 2000 lossless
REAL_LOSSY = "693_UNCI.dcm"  # the same slice after heavy lossy JPEG 2000
#: Seeds of the haemorrhages inserted into the real slice for the card's notes (and the tests).
REAL_BLEED_SEED = 7

CARD = string.Template('''\
# Model card of head-ct-ich-cnn — written by train.py; edit train.py, not this file.
name = "head-ct-ich-cnn"
version = "$version"
kind = "classifier"
modalities = ["CT"]
description = """\\
A small convolutional network that gives, for an axial non-contrast head CT slice, the \\
probability of acute intracranial haemorrhage (intraparenchymal, subdural, epidural, \\
subarachnoid or intraventricular: blood that is hyperdense, about 45-90 HU). It sees three \\
fixed windows (brain, subdural, bone) of the slice resized to ${size}x${size}. The study's \\
probability is the highest over its slices (dicom_node.infer.runtime.classify), which is the \\
right rule for this finding: a study has a haemorrhage if any slice shows one, and a bleed is \\
often visible on a few slices only, so an average would dilute it. The price is that false \\
positives add up over slices: at a per-slice false-positive rate f, a normal study of n \\
slices is called positive with probability 1-(1-f)^n (see the notes). It was trained on \\
synthetic slices (synthetic.py) and on augmented copies of ONE real slice with synthetic \\
haemorrhages inserted; it has never seen a real haemorrhage. Chronic (hypodense) \\
collections are outside what it was taught."""
intended_use = """\\
DEMONSTRATION ONLY — NOT FOR CLINICAL USE. For testing and showing dicom-node end to end with \\
PACS, routing and result encoding on head CT. Its outputs carry no diagnostic meaning on real \\
images and must never be used for diagnosis, triage or any decision about a patient. Route \\
only axial head CT to it (it says nothing meaningful about other body parts)."""
manufacturer = "dicom-node project"
weights = "model.keras"
synthetic_training_data = true

[input]
shape = [$size, $size]
channels = 3

[preprocessing]
voi = "window"
windows = [
$windows]
resize = "pad"
pad_value = 0.0
range = [0.0, 1.0]
frames = "all"
exclude_image_types = ["LOCALIZER"]
description = """\\
Decode, Modality LUT or rescale to HU (pydicom.pixels.apply_modality_lut); scale to fit \\
${size}x${size} in HU keeping the aspect ratio (antialiasing linear filter), centred; then three \\
fixed windows, one channel each: brain 40/80, subdural 80/200, bone 600/2800 (centre/width in \\
HU; [c - w/2, c + w/2] maps to [0, 1], clipped); padding 0. Localizer (scout) images are not \\
used, so they cannot drive the study-level maximum."""

[[outputs]]
name = "intracranial_hemorrhage"
code = { value = "$code", scheme = "SCT", meaning = "$meaning" }
threshold = $threshold

[training]
data = """\\
$data"""
script = "train.py"
seed = $seed
epochs = $epochs
train_samples = $n_train
validation_samples = $n_val
test_samples = $n_test
duration_seconds = $duration
hardware = "$hardware"
framework = "$framework"
$metrics''')

DATA = (
    "Synthetic axial head CT slices in HU drawn by synthetic.py at {size}x{size} (field of view "
    "210-280 mm): air, head holder, scalp, skull with tables, diploe and frontal sinus, CSF rim, "
    "cortex with sulci, white matter (grey/white contrast 7-14 HU), interhemispheric fissure and "
    "falx, lateral and third ventricles (CSF 2-10 HU), basal ganglia, periventricular low "
    "density; blur, correlated noise 1.5-3.5 HU, HU offset, beam-hardening streaks and cupping. "
    "REAL PART: {real_pct}% of the slices of every split are augmented copies (flip, rotation, "
    "scale, shift, HU offset, noise) of one real head CT slice, 693_UNCR.dcm from pydicom-data "
    "(CQ500 case 310, 5 mm, 512x512, resized in HU like the preprocessing does); nothing else is "
    "real. Positives (prevalence {prevalence}): one or two inserted acute haemorrhages, "
    "intraparenchymal (8-40 mm, 55-85 HU, oedema halo), subdural (crescent 4-15 mm, 50-85 HU, "
    "or along the falx), epidural (lens 6-22 mm, 55-90 HU), subarachnoid (blood in sulci and "
    "fissure, 45-75 HU), intraventricular (layering with a level, or a cast, 50-80 HU). Mimics in "
    "both classes: calcifications (120-400 HU), falx, infarcts, faint hyperdensities up to 45 HU, "
    "streaks. Inputs are the three windows of the card, computed by "
    "dicom_node.infer.preprocess.apply_windows. The threshold was chosen on the validation set "
    "(best F1), the metrics measured on the test set; the three sets are disjoint draws from "
    "the same generator (the real-background cases of all three share the one real slice)."
)


# --- data -------------------------------------------------------------------------------------


def real_background() -> tuple[np.ndarray, float]:
    """693_UNCR.dcm in HU, resized to SIZE x SIZE as the preprocessing does; mm per pixel."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels.processing import apply_modality_lut

    from dicom_node.infer.preprocess import resize

    path = get_testdata_file(REAL)
    if path is None:
        raise SystemExit(f"{REAL} not found: install pydicom-data (the 'train' extra)")
    ds = pydicom.dcmread(path)
    hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    small = resize(hu[:, :, np.newaxis], (SIZE, SIZE), "pad", -1024.0)[:, :, 0]
    mm = float(ds.PixelSpacing[0]) * max(ds.Rows, ds.Columns) / SIZE
    return small, mm


def generate(seed: int, n: int, workers: int, real: tuple[np.ndarray, float]
             ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """n samples of stream ``seed``, drawn in parallel (each sample has its own seed)."""
    bounds = np.linspace(0, n, max(1, workers) * 4 + 1).astype(int)
    jobs = [(seed, int(a), int(b), SIZE, PREVALENCE, real, REAL_FRACTION)
            for a, b in itertools.pairwise(bounds) if b > a]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(make_dataset, *zip(*jobs, strict=True)))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [k for p in parts for k in p[2]], np.concatenate([p[3] for p in parts]))


def card_windows() -> Any:
    from dicom_node.infer.card import Window

    return tuple(Window(name=n, center=c, width=w) for n, c, w in WINDOWS)


def to_input(hu: np.ndarray) -> np.ndarray:
    """HU slices (n, rows, cols) → the model input, through the node's own window code."""
    from dicom_node.infer.preprocess import apply_windows

    return apply_windows(hu, card_windows(), (0.0, 1.0)).astype(np.float32)


# --- model ------------------------------------------------------------------------------------


def build_model(keras: Any) -> Any:
    """The network, in Keras 3 layers only (no backend-specific code)."""
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, len(WINDOWS)), name="windows")

    def conv(x: Any, filters: int, size: int, strides: int, name: str) -> Any:
        x = layers.Conv2D(filters, size, strides=strides, padding="same", use_bias=False,
                          name=name)(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    x = conv(inputs, 24, 5, 2, "stem")  # 64 x 64
    x = conv(x, 32, 3, 2, "conv1")  # 32 x 32
    for i, filters in enumerate((48, 64, 96)):
        x = conv(x, filters, 3, 1, f"conv{i + 2}")
        x = layers.MaxPooling2D(name=f"pool{i + 2}")(x)  # 16, 8, 4
    x = conv(x, 128, 3, 1, "context")
    # max pooling finds one small bleed anywhere; mean pooling sees large, diffuse ones
    x = layers.Concatenate(name="pool")(
        [layers.GlobalAveragePooling2D(name="mean")(x), layers.GlobalMaxPooling2D(name="max")(x)]
    )
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(len(FINDINGS), activation="sigmoid", name="findings")(x)
    return keras.Model(inputs, outputs, name=NAME)


def batches(keras: Any, hu: np.ndarray, y: np.ndarray, batch: int, seed: int | None) -> Any:
    """A keras PyDataset that windows HU per batch (the float inputs of a whole set are big)."""

    class Windowed(keras.utils.PyDataset):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.order = np.arange(len(hu))
            self.rng = np.random.default_rng(seed) if seed is not None else None
            self.on_epoch_end()

        def __len__(self) -> int:
            return int(np.ceil(len(hu) / batch))

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            idx = np.sort(self.order[i * batch : (i + 1) * batch])
            return to_input(hu[idx]), y[idx]

        def on_epoch_end(self) -> None:
            if self.rng is not None:
                self.rng.shuffle(self.order)

    return Windowed()


def predict(model: Any, hu: np.ndarray) -> np.ndarray:
    return np.concatenate([
        np.asarray(model.predict_on_batch(to_input(hu[i : i + 128])))
        for i in range(0, len(hu), 128)
    ])


# --- metrics ----------------------------------------------------------------------------------


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1 at ``threshold``, ROC AUC (dicom_node.evaluate.metrics,
    the same code ``dicom-node evaluate`` runs), and the class counts."""
    pos = np.asarray(y) == 1
    return {**metrics.binary_metrics(pos, p, threshold),
            "positives": int(pos.sum()), "negatives": int((~pos).sum())}


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    return metrics.best_threshold(np.asarray(y) == 1, p)


def breakdown(y: np.ndarray, p: np.ndarray, kinds: list[str], threshold: float) -> list[str]:
    """Recall per haemorrhage kind and metrics per background, as lines for the card's notes."""
    pred = p >= threshold
    parts = []
    for kind in KINDS:
        has = np.array([kind in k.split("+")[1:] for k in kinds])
        if has.any():
            parts.append(f"{kind} {pred[has].mean():.3f} (n={int(has.sum())})")
    lines = ["Test recall per haemorrhage kind (slices with that kind, alone or with another): "
             + ", ".join(parts) + "."]
    for background in ("phantom", "real"):
        on = np.array([k.split("+")[0] == background for k in kinds])
        if on.any():
            m = binary_metrics(y[on], p[on], threshold)
            specificity = 1.0 - float(np.mean(pred[on & (y == 0)])) if m["negatives"] else 1.0
            lines.append(
                f"Test slices on the {background} background (n={int(on.sum())}, "
                f"{m['positives']} positive): accuracy {m['accuracy']:.3f}, recall "
                f"{m['recall']:.3f}, specificity {specificity:.3f}, ROC AUC {m['roc_auc']:.3f}."
            )
    return lines


# --- card -------------------------------------------------------------------------------------


def render_card(values: dict[str, object], threshold: float, metrics_toml: str = "") -> str:
    """The card's text; ``[metrics]`` is left out until it has been measured."""
    windows = "".join(
        f'    {{ name = "{n}", center = {c}, width = {w} }},\n' for n, c, w in WINDOWS
    )
    mapping = {k: str(v) for k, v in values.items()}
    return CARD.substitute(mapping, windows=windows, threshold=threshold, code=CODE[0],
                           meaning=CODE[1], metrics=metrics_toml)


def metrics_section(m: dict[str, float], n_test: int, notes: list[str]) -> str:
    lines = ["", "[metrics]", 'split = "test (held out, synthetic)"', f"samples = {n_test}"]
    lines.append("notes = [")
    lines += [f"    {json.dumps(note, ensure_ascii=False)}," for note in notes]
    lines.append("]")
    lines.append("")
    lines.append(f"[metrics.per_output.{FINDINGS[0]}]")
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        lines.append(f"{key} = {m[key]:.4f}")
    lines.append(f"positives = {m['positives']}")
    lines.append(f"negatives = {m['negatives']}")
    return "\n".join(lines) + "\n"


# --- real images ------------------------------------------------------------------------------


def read_testdata(name: str) -> Any:
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise SystemExit(f"{name} not found: install pydicom-data (the 'train' extra)")
    return pydicom.dcmread(path)


def dataset_with_bleed(ds: Any, kind: str, seed: int) -> Any:
    """A copy of a CT dataset with one synthetic haemorrhage inserted at full resolution."""
    from pydicom.pixels.processing import apply_modality_lut
    from pydicom.uid import generate_uid

    hu = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    out = with_bleed(hu, float(ds.PixelSpacing[0]), kind, seed)
    stored = np.rint((out - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
    info = np.iinfo(ds.pixel_array.dtype)
    copy = deepcopy(ds)  # Dataset.copy() is shallow: it would share the elements
    copy.PixelData = np.clip(stored, info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
    copy.SOPInstanceUID = generate_uid()
    return copy


def classify_one(out: Path, ds: Any) -> float:
    from dicom_node.infer import classify, load_card

    return float(classify(load_card(out), out, [ds]).findings[0].probability)


# --- export -----------------------------------------------------------------------------------


def write_case(path: Path, hu: np.ndarray, mm: float, index: int, seed: int) -> None:
    """One held-out slice as a CT Image Storage file (see the module docstring)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    def uid(part: str) -> str:
        return str(generate_uid(entropy_srcs=[NAME, str(seed), str(index), part]))

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid("sop")
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-node project (synthetic)"
    ds.PatientName = "SYNTHETIC^HEADCT"
    ds.PatientID = f"SYNTH-ICH-{index:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250214"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = f"{index:05d}"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic head CT (dicom-node evaluation set)"
    ds.SeriesDescription = "SYNTHETIC head CT slice"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = None
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.SliceThickness = "5"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    corner = f"{-mm * SIZE / 2:.4f}"
    ds.ImagePositionPatient = [corner, corner, "0"]
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [f"{mm:.6f}", f"{mm:.6f}"]
    ds.ImageComments = f"SYNTHETIC image made by models/{NAME}/train.py; not patient data"
    stored = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 12)
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.save_as(path, enforce_file_format=True)


def export_eval(folder: Path, seed: int, n_test: int, workers: int, model_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    real = real_background()
    hu, y, kinds, spacing = generate(seed + 2, n_test, workers, real)
    names = [f"ich-test-{i:05d}.dcm" for i in range(len(hu))]
    for i, name in enumerate(names):
        write_case(folder / name, hu[i], float(spacing[i]), i, seed)
    with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", *FINDINGS])
        writer.writerows([name, *(int(v) for v in y[i])] for i, name in enumerate(names))
    with (folder / "cases.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "background", "kinds"])
        for name, kind in zip(names, kinds, strict=True):
            background, *drawn = kind.split("+")
            writer.writerow([name, background, "+".join(drawn)])
    print(f"wrote {len(names)} DICOM files, labels.csv and cases.csv to {folder}")
    if not (model_dir / "model.keras").is_file() or not (model_dir / "model.toml").is_file():
        return
    import pydicom

    from dicom_node.infer import ClassifierCard, classify, load_card

    card = load_card(model_dir)
    assert isinstance(card, ClassifierCard)
    p = np.array([
        classify(card, model_dir, [pydicom.dcmread(folder / name)]).findings[0].probability
        for name in names
    ])
    m = binary_metrics(y[:, 0], p, card.outputs[0].threshold)
    print("through dicom_node.infer.classify:", {k: round(v, 4) for k, v in m.items()})


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for model.keras/model.toml")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not for shipping)")
    parser.add_argument("--export-eval", type=Path, metavar="DIR",
                        help="write the held-out test set as DICOM + labels.csv to DIR; "
                        "no training")
    args = parser.parse_args()
    if args.quick:
        args.train, args.val, args.test, args.epochs = 256, 96, 128, 1
    if args.export_eval is not None:
        export_eval(args.export_eval, args.seed, args.test, args.workers, args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 1-2. data (before Keras is imported, so the worker processes fork light)
    real = real_background()
    x_train, y_train, _, _ = generate(args.seed, args.train, args.workers, real)
    x_val, y_val, _, _ = generate(args.seed + 1, args.val, args.workers, real)
    x_test, y_test, kinds_test, _ = generate(args.seed + 2, args.test, args.workers, real)
    print(f"data: {len(x_train)}/{len(x_val)}/{len(x_test)} slices "
          f"in {time.perf_counter() - started:.1f} s", flush=True)

    # 3. model
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(args.seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    model = build_model(keras)
    batch = 32
    steps = args.epochs * int(np.ceil(len(x_train) / batch))
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    model.fit(batches(keras, x_train, y_train, batch, args.seed), epochs=args.epochs,
              validation_data=batches(keras, x_val, y_val, 128, None), verbose=2)

    # 4. threshold on validation, metrics on test
    p_val = predict(model, x_val)[:, 0]
    p_test = predict(model, x_test)[:, 0]
    threshold = best_threshold(y_val[:, 0], p_val)
    metrics = binary_metrics(y_test[:, 0], p_test, threshold)
    print(f"threshold={threshold}", {k: round(v, 4) for k, v in metrics.items()})
    lines = breakdown(y_test[:, 0], p_test, kinds_test, threshold)
    print("\n".join(lines))

    # 5. save, write the card, load both back and look at real slices
    model.save(args.out / "model.keras")
    duration = time.perf_counter() - started
    values: dict[str, object] = {
        "version": VERSION, "size": SIZE, "seed": args.seed, "epochs": args.epochs,
        "n_train": len(x_train), "n_val": len(x_val), "n_test": len(x_test),
        "duration": f"{duration:.0f}",
        "data": " \\\n".join(textwrap.wrap(
            DATA.format(size=SIZE, real_pct=round(100 * REAL_FRACTION), prevalence=PREVALENCE),
            width=94)),
        "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU"
        if not _has_gpu(keras) else f"{os.cpu_count()} CPU cores + GPU",
        "framework": f"keras {keras.__version__}, {keras.backend.backend()}",
    }
    (args.out / "model.toml").write_text(render_card(values, threshold), encoding="utf-8")
    notes = real_image_notes(args.out, threshold) + lines + study_level_note(
        y_test[:, 0], p_test, threshold
    ) + [
        "All metrics are on synthetic slices from the same generator as the training data, and "
        "the real-background cases reuse the one real slice the model was trained on; they say "
        "nothing about performance on real haemorrhages, where this model is expected to fail "
        "(domain gap). Not for clinical use.",
    ]
    print("\n".join(notes))
    card_text = render_card(values, threshold, metrics_section(metrics, len(x_test), notes))
    (args.out / "model.toml").write_text(card_text, encoding="utf-8")
    print(f"wrote {args.out / 'model.keras'} and {args.out / 'model.toml'} "
          f"in {time.perf_counter() - started:.0f} s")


def real_image_notes(out: Path, threshold: float) -> list[str]:
    """What the written model says on real slices, through dicom_node.infer.classify."""
    ds = read_testdata(REAL)
    p_real = classify_one(out, ds)
    with_bleeds = []
    for kind in KINDS:
        p = classify_one(out, dataset_with_bleed(ds, kind, REAL_BLEED_SEED))
        with_bleeds.append(f"{kind} {p:.3f}")
    p_other = classify_one(out, read_testdata(NON_HEAD))
    p_lossless = classify_one(out, read_testdata(REAL_LOSSLESS))
    p_lossy = classify_one(out, read_testdata(REAL_LOSSY))

    def call(p: float) -> str:
        return "present" if p >= threshold else "absent"

    return [
        f"On the real head CT slice {REAL} (pydicom-data; CQ500 case 310, axial, 5 mm, 512x512) "
        f"the model gives {p_real:.3f}: {call(p_real)}. That slice has no label here and was "
        "used (augmented) as a negative background in training, so this is a record of "
        "behaviour, not a measurement. It is not a clean normal: it shows a hypodense "
        "extra-axial collection over the left convexity with mass effect (on review by the "
        "model's developers, not a radiologist; possibly a chronic subdural collection), which "
        "is outside what this model detects.",
        f"The same slice compressed: {REAL_LOSSLESS} (JPEG 2000 lossless) gives {p_lossless:.3f}: "
        f"{call(p_lossless)}; {REAL_LOSSY} (after heavy lossy JPEG 2000, Lossy Image "
        f"Compression 01) gives {p_lossy:.3f}: {call(p_lossy)}. Strong compression artefacts "
        "(bright ringing along the skull) look like extra-axial blood to it: send it "
        "losslessly compressed or uncompressed images only.",
        f"On {REAL} with one synthetic acute haemorrhage inserted at full resolution "
        f"(synthetic.with_bleed, seed {REAL_BLEED_SEED}) and run through the whole "
        f"preprocessing: {', '.join(with_bleeds)} (threshold {threshold}).",
        f"Out-of-domain control: on {NON_HEAD} (pydicom-data; a real CT of the spine and back "
        f"muscles, not a head) it gives {p_other:.3f}: {call(p_other)}. Its outputs on "
        "anything but axial head CT mean nothing; route only head CT to it.",
    ]


def study_level_note(y: np.ndarray, p: np.ndarray, threshold: float) -> list[str]:
    fpr = float(np.mean(p[y == 0] >= threshold))
    studies = ", ".join(f"{n} slices {1 - (1 - fpr) ** n:.2f}" for n in (10, 30))
    return [
        f"Per-slice false-positive rate on the test negatives: {fpr:.4f}. With the study "
        "probability taken as the maximum over slices, a normal study is called positive with "
        f"probability about 1-(1-f)^n if slices erred independently: {studies}."
    ]


def _has_gpu(keras: Any) -> bool:
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


if __name__ == "__main__":
    main()
