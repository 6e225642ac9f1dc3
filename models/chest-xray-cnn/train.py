"""Train chest-xray-cnn on synthetic chest radiographs; write model.keras and model.toml.

Usage (from the repository root, with the "train" extra installed)::

    .venv/bin/python models/chest-xray-cnn/train.py            # the shipped weights
    .venv/bin/python models/chest-xray-cnn/train.py --quick --out /tmp/cxr   # a smoke run
    .venv/bin/python models/chest-xray-cnn/train.py --export-eval /tmp/cxr-test  # test split

``--export-eval DIR`` does not train: it draws the held-out test split again, exactly as a
training run with the same ``--seed`` and ``--test`` drew it (each sample has its own seed, so
``--limit N`` gives the first N of those same images), and writes it as DICOM CR files with a
``labels.csv`` that ``dicom-node evaluate chest-xray-cnn DIR`` reads.

What it does, reproducibly from one seed:

1. draws train / validation / test sets of synthetic PA chest radiographs with three independent
   findings (see synthetic.py) — nothing is downloaded, no patient data is used;
2. trains a small Keras 3 CNN (keras.layers only, so the .keras file also loads on JAX);
3. picks each finding's threshold on the validation set (best F1) and measures accuracy,
   precision, recall, F1 and ROC AUC on the held-out test set (numpy only);
4. saves model.keras and writes the model card model.toml, then loads both back through
   dicom_node.infer (load_card + classify) and runs them on the real chest CR RG1_UNCR.dcm from
   pydicom-data, recording what the model says in the card.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import string
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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

from synthetic import CTR_ENLARGED, CTR_NORMAL, FINDINGS, make_dataset  # noqa: E402

from dicom_node.evaluate import metrics  # noqa: E402

NAME = "chest-xray-cnn"
VERSION = "1.0.0"
SEED = 20250117
SIZE = 128
PREVALENCE = 0.35
#: finding → (SNOMED CT code, meaning). 786838002 |Nodule of lung (disorder)|, synonym
#: "Pulmonary nodule" (checked in a SNOMED CT browser, international core module, 2019-07).
CODES = {
    "cardiomegaly": ("8186001", "Cardiomegaly"),
    "pleural_effusion": ("60046008", "Pleural effusion"),
    "pulmonary_nodule": ("786838002", "Pulmonary nodule"),
}
RG1 = "RG1_UNCR.dcm"  # real PA chest CR (pydicom-data)
RG3 = "RG3_UNCR.dcm"  # real CR of a lower leg: an out-of-domain control

CARD = string.Template('''\
# Model card of chest-xray-cnn — written by train.py; edit train.py, not this file.
name = "chest-xray-cnn"
version = "$version"
kind = "classifier"
modalities = ["CR", "DX"]
description = """\\
A small convolutional network that gives, for a frontal chest radiograph, the probability of \\
three findings: cardiomegaly, pleural effusion and pulmonary nodule. It was trained only on \\
synthetic radiographs drawn by synthetic.py, so it demonstrates the dicom-node pipeline \\
(receive, route, preprocess, infer, encode, send); it has never seen a real radiograph."""
intended_use = """\\
DEMONSTRATION ONLY — NOT FOR CLINICAL USE. For testing and showing dicom-node end to end with \\
PACS, routing and result encoding. Its outputs carry no diagnostic meaning on real images and \\
must never be used for diagnosis, triage or any decision about a patient."""
manufacturer = "dicom-node project"
weights = "model.keras"
synthetic_training_data = true

[input]
shape = [$size, $size]
channels = 1

[preprocessing]
voi = "dataset"
invert_monochrome1 = true
resize = "pad"
pad_value = 0.0
range = [0.0, 1.0]
frames = "all"
description = """\\
Decode (any transfer syntax pydicom's handlers read), Modality LUT or rescale, then the \\
dataset's first VOI LUT or window (pydicom.pixels); min-max scale each frame to [0, 1]; invert \\
MONOCHROME1; scale to fit ${size}x${size} keeping the aspect ratio (antialiasing linear filter), \\
centred and padded with 0. The network itself standardises each image (its first layer, a \\
LayerNormalization over rows, columns and channels), so window and gain matter little."""

$outputs
[training]
data = """\\
Synthetic PA chest radiographs drawn by synthetic.py at ${size}x${size}: body, lungs with \\
diaphragm domes, mediastinum, spine, ribs, clavicles, hila, optional breast shadows, cardiac \\
silhouette; random position, size, rotation, exposure gradient, gamma, blur, noise, collimator \\
edges and side markers. Labels are independent, each present with probability $prevalence: \\
cardiomegaly = cardiothoracic ratio $ctr_enlarged (normal hearts $ctr_normal); pleural \\
effusion = basal opacity with a meniscus blunting the costophrenic angle, one or both sides; \\
pulmonary nodule = 1-3 round opacities of about 1.3-2.6 cm (for a 29 cm wide chest). Thresholds \\
were chosen on the validation set (best F1) and the metrics measured on the test set; all three \\
sets are disjoint draws from the same generator."""
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


def generate(seed: int, n: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """n samples of stream ``seed``, drawn in parallel (each sample has its own seed)."""
    bounds = np.linspace(0, n, max(1, workers) * 4 + 1).astype(int)
    jobs = [(seed, int(a), int(b), SIZE, PREVALENCE)
            for a, b in itertools.pairwise(bounds) if b > a]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(make_dataset, *zip(*jobs, strict=True)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def build_model(keras: Any, n_outputs: int) -> Any:
    """The network, in Keras 3 layers only (no backend-specific code)."""
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, name="standardise")(
        inputs
    )
    x = layers.Conv2D(24, 5, strides=2, padding="same", activation="relu", name="stem")(x)
    for i, filters in enumerate((32, 48, 64, 96)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="context")(x)
    # mean pooling sees sizes and proportions (heart, fluid); max pooling sees one small nodule
    x = layers.Concatenate(name="pool")(
        [layers.GlobalAveragePooling2D()(x), layers.GlobalMaxPooling2D()(x)]
    )
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(n_outputs, activation="sigmoid", name="findings")(x)
    return keras.Model(inputs, outputs, name=NAME)


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1 at ``threshold``, ROC AUC (dicom_node.evaluate.metrics,
    the same code ``dicom-node evaluate`` runs), and the class counts."""
    pos = np.asarray(y) == 1
    return {**metrics.binary_metrics(pos, p, threshold),
            "positives": int(pos.sum()), "negatives": int((~pos).sum())}


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    return metrics.best_threshold(np.asarray(y) == 1, p)


def render_card(
    values: dict[str, object], thresholds: dict[str, float], metrics_toml: str = ""
) -> str:
    """The card's text; ``[metrics]`` is left out until it has been measured."""
    outputs = []
    for finding in FINDINGS:
        code, meaning = CODES[finding]
        outputs.append(
            f'[[outputs]]\nname = "{finding}"\n'
            f'code = {{ value = "{code}", scheme = "SCT", meaning = "{meaning}" }}\n'
            f"threshold = {thresholds[finding]}\n"
        )
    mapping = {k: str(v) for k, v in values.items()}
    return CARD.substitute(mapping, outputs="\n".join(outputs), metrics=metrics_toml)


def metrics_section(per_output: dict[str, dict[str, float]], n_test: int, notes: list[str]) -> str:
    lines = ["", "[metrics]", 'split = "test (held out, synthetic)"', f"samples = {n_test}"]
    lines.append("notes = [")
    lines += [f"    {json.dumps(note, ensure_ascii=False)}," for note in notes]
    lines.append("]")
    for name, m in per_output.items():
        lines.append("")
        lines.append(f"[metrics.per_output.{name}]")
        for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
            lines.append(f"{key} = {m[key]:.4f}")
        lines.append(f"positives = {m['positives']}")
        lines.append(f"negatives = {m['negatives']}")
    return "\n".join(lines) + "\n"


def check_on_real_image(out: Path, name: str) -> str:
    """Load the written card and weights through dicom_node.infer; classify one real image."""
    import pydicom
    from pydicom.data import get_testdata_file

    from dicom_node.infer import classify, load_card

    ds = pydicom.dcmread(get_testdata_file(name))
    card = load_card(out)
    result = classify(card, out, [ds])
    described = ", ".join(
        f"{finding} {f.probability:.3f}"
        for finding, f in zip(FINDINGS, result.findings, strict=True)
    )
    present = [f.concept.meaning for f in result.findings if f.present] or ["none"]
    return f"{described}; above threshold: {', '.join(present)}"


def write_cr(path: Path, image: np.ndarray, index: int, seed: int) -> None:
    """One synthetic radiograph as a DICOM CR image (MONOCHROME2, 16 bits, no VOI window).

    The [0, 1] image is stored as round(x * 65535): preprocessing's min-max scaling gives the
    generator's image back to within 1e-5. UIDs are derived from (seed, index), so an export is
    the same files every time.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=[NAME, "export-eval", str(seed), str(index), kind]))

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid("instance")
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"Synthetic^Chest^{index:05d}"
    ds.PatientID = f"SYNTH-CXR-{index:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = uid("study")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250117"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{index:05d}"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic chest radiograph"
    ds.Modality = "CR"
    ds.SeriesInstanceUID = uid("series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{NAME} synthetic test split"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "dicom-node synthetic.py"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = f"synthetic, not a patient: test stream seed {seed}, sample {index}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.round(np.clip(image[..., 0], 0.0, 1.0) * 65535).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def export_eval(out: Path, seed: int, n_test: int, limit: int | None, workers: int) -> None:
    """Write the test split (or its first ``limit`` samples) as DICOM CR + labels.csv."""
    started = time.perf_counter()
    count = min(n_test, limit) if limit else n_test
    images, labels = generate(seed + 2, count, workers)  # the stream main() tests on
    out.mkdir(parents=True, exist_ok=True)
    rows = ["file," + ",".join(FINDINGS)]
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"case-{index:05d}.dcm"
        write_cr(out / name, image, index, seed)
        rows.append(name + "," + ",".join(str(int(v)) for v in label))
    (out / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (out / "export.json").write_text(json.dumps({
        "model": NAME, "split": "test", "seed": seed, "stream": seed + 2, "test_samples": n_test,
        "exported": count, "first_index": 0, "size": SIZE, "prevalence": PREVALENCE,
        "findings": list(FINDINGS),
    }, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {count} of the {n_test} test images (stream {seed + 2}) and labels.csv "
          f"to {out} in {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for model.keras/model.toml")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not for shipping)")
    parser.add_argument("--export-eval", type=Path, metavar="DIR",
                        help="do not train: write the test split as DICOM + labels.csv to DIR")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="with --export-eval: only the first N test images")
    args = parser.parse_args()
    if args.quick:
        args.train, args.val, args.test, args.epochs = 256, 64, 128, 1
    if args.limit is not None and (args.export_eval is None or args.limit < 1):
        parser.error("--limit N needs --export-eval and N >= 1")
    if args.export_eval is not None:
        export_eval(args.export_eval, args.seed, args.test, args.limit, args.workers)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 1. data (before Keras is imported, so the worker processes fork light)
    x_train, y_train = generate(args.seed, args.train, args.workers)
    x_val, y_val = generate(args.seed + 1, args.val, args.workers)
    x_test, y_test = generate(args.seed + 2, args.test, args.workers)
    print(f"data: {len(x_train)}/{len(x_val)}/{len(x_test)} images "
          f"in {time.perf_counter() - started:.1f} s", flush=True)

    # 2. model
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(args.seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    model = build_model(keras, len(FINDINGS))
    steps = args.epochs * int(np.ceil(len(x_train) / 32))
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(multi_label=True, num_labels=len(FINDINGS), name="auc")],
    )
    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs,
              validation_data=(x_val, y_val), shuffle=True, verbose=2)

    # 3. thresholds on validation, metrics on test
    p_val = np.asarray(model.predict(x_val, batch_size=64, verbose=0))
    p_test = np.asarray(model.predict(x_test, batch_size=64, verbose=0))
    thresholds = {f: best_threshold(y_val[:, i], p_val[:, i]) for i, f in enumerate(FINDINGS)}
    per_output = {
        f: binary_metrics(y_test[:, i], p_test[:, i], thresholds[f])
        for i, f in enumerate(FINDINGS)
    }
    for f, m in per_output.items():
        print(f, f"threshold={thresholds[f]}", {k: round(v, 4) for k, v in m.items()})

    # 4. save, write the card, load both back and look at a real radiograph
    model.save(args.out / "model.keras")
    duration = time.perf_counter() - started
    values: dict[str, object] = {
        "version": VERSION, "size": SIZE, "seed": args.seed, "epochs": args.epochs,
        "n_train": len(x_train), "n_val": len(x_val), "n_test": len(x_test),
        "duration": f"{duration:.0f}", "prevalence": PREVALENCE,
        "ctr_enlarged": "{:.2f}-{:.2f}".format(*CTR_ENLARGED),
        "ctr_normal": "{:.2f}-{:.2f}".format(*CTR_NORMAL),
        "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU"
        if not _has_gpu(keras) else f"{os.cpu_count()} CPU cores + GPU",
        "framework": f"keras {keras.__version__}, {keras.backend.backend()}",
    }
    (args.out / "model.toml").write_text(render_card(values, thresholds), encoding="utf-8")
    rg1, rg3 = check_on_real_image(args.out, RG1), check_on_real_image(args.out, RG3)
    print(f"{RG1}: {rg1}\n{RG3}: {rg3}")
    notes = [
        f"On the real chest CR {RG1} (pydicom-data; PA, MONOCHROME1, 1955x1841) the model "
        f"gives: {rg1}. That image has no labels here, so this is a record of behaviour, not "
        "a measurement of accuracy.",
        f"Out-of-domain control: on {RG3} (pydicom-data; a real CR of a lower leg, not a "
        f"chest) it gives: {rg3}. High probabilities on an image with no thorax show that "
        "its outputs on real radiographs, RG1's included, are artefacts of the domain gap, "
        "not findings.",
        "All metrics are on synthetic images from the same generator as the training data; "
        "they say nothing about performance on real radiographs, where this model is expected "
        "to fail (domain gap). Not for clinical use.",
    ]
    card_text = render_card(values, thresholds, metrics_section(per_output, len(x_test), notes))
    (args.out / "model.toml").write_text(card_text, encoding="utf-8")
    print(f"wrote {args.out / 'model.keras'} and {args.out / 'model.toml'} "
          f"in {time.perf_counter() - started:.0f} s")


def _has_gpu(keras: Any) -> bool:
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


if __name__ == "__main__":
    main()
