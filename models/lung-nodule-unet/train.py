"""Train lung-nodule-unet on synthetic chest CT; write model.keras and model.toml.

Usage (from the repository root)::

    .venv/bin/python models/lung-nodule-unet/train.py              # the shipped weights
    .venv/bin/python models/lung-nodule-unet/train.py --quick --out /tmp/lnu   # a smoke run
    .venv/bin/python models/lung-nodule-unet/train.py --export-eval DIR        # test cases only

What it does, reproducibly from one seed (nothing is downloaded, no patient data is used):

1. draws training and validation volumes with synthetic.py (random anatomy, 0–4 nodules of
   3–25 mm, random pixel and slice spacing; in SMALL_FRACTION of the training volumes nodules
   of SMALL_MM only, so that small nodules are not rare), windows each slice and resamples it
   to the model's grid exactly as :mod:`dicom_node.infer.segment` does, with the two
   neighbouring slices as extra channels (2.5-D); the target is the nodule's partial-volume
   fraction per pixel; patches are cut around every nodule (more around the small ones), at
   random and on lung vessels (the hard negatives);
2. trains a small 2-D U-Net (Keras 3 layers and ops only, so the .keras file also loads on JAX)
   with binary cross-entropy + soft Dice (``--loss object`` adds a per-patch Tversky term);
3. picks the threshold with the best mean Dice on the validation volumes;
4. writes the card, then writes the held-out test cases as real DICOM series and runs them
   through :func:`dicom_node.infer.segment.segment` — the node's own code path — to measure
   Dice, nodule detection sensitivity, false positives per volume and volume error, which go
   into the card's ``[metrics]``.

Evaluation cases (``--export-eval DIR``; the same cases the card's metrics were measured on)::

    DIR/<case>/IM0001.dcm …      the series: single-frame CT Image Storage, written by
                                 tests/support/ct_series.py (head first; file order is not spatial)
    DIR/<case>/mask.npz          mask               uint8 (slices, rows, cols), 1 = nodule;
                                                    slice i = the i-th image of the series
                                                    sorted along the slice normal (ascending
                                                    Image Position · (row × column cosines))
                                 sop_instance_uids  str (slices,), that order, explicitly
                                 labels             int16 (slices, rows, cols), nodule number
                                 nodule_centers_mm  float (n, 3), patient coordinates (LPS)
                                 nodule_semi_axes_mm, nodule_volumes_mm3, nodule_diameters_mm

``dicom-node evaluate models/lung-nodule-unet DIR`` reads that layout (``mask`` and
``sop_instance_uids``) and reproduces the card's Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))  # synthetic.py (the folder name is not a package name)
sys.path.insert(1, str(ROOT))  # dicom_node and tests.support.ct_series

from synthetic import Grid, SyntheticCT, make_case  # noqa: E402

from dicom_node.infer.segment import (  # noqa: E402
    context_planes,
    interpolate_plane,
    resample_weights,
)

NAME = "lung-nodule-unet"
VERSION = "1.2.0"
SEED = 20250117
SIZE = 256
#: Training patches (the network is fully convolutional; it is saved for SIZE² inputs).
CROP = 80
PIXEL_MM = 1.25
#: The neighbour channels: planes at ± this distance along the normal (mm).
CONTEXT_MM = 4.0
WINDOW = (-300.0, 1400.0)  # centre, width (HU): −1000 … 400
BASE_FILTERS = 8
DEPTH = 4
MIN_REGION_MM3 = 10.0
MIN_SLICES = 8
#: Threshold choice: at most this many false-positive regions per validation volume (1.0.0
#: gave 1.28 at its threshold 0.5 on its validation volumes; 1.1.0 and 1.2.0 use 1.3). A first
#: 1.2.0 run used 1.0, set after looking at its test metrics at 0.5 and 0.6; that was test-set
#: leakage, so the limit is back to the value fixed before (see the card's notes).
FP_LIMIT = 1.3
DIAMETER_BANDS = ((3.0, 6.0), (6.0, 10.0), (10.0, 25.0))
#: Training draw: this fraction of the training volumes gets its nodules from SMALL_MM only.
SMALL_FRACTION = 0.3
SMALL_MM = (3.0, 10.0)
#: Patches per nodule: PATCHES_PER_NODULE, or PATCHES_PER_SMALL for one under SMALL_MM[1].
PATCHES_PER_NODULE = 4
PATCHES_PER_SMALL = 6
#: Hard-negative patches per volume, centred on lung vessels (half on thick ones).
VESSEL_PATCHES = 12
#: object loss: the Tversky weight of missed nodule voxels (that of false ones: 1 − this).
TVERSKY_BETA = 0.5
#: Source pixel spacing (mm) of the training and validation volumes, and of the held-out test
#: cases: real chest CT has 0.6–0.9 mm pixels; 1.1.0 saw only 1.5–2.3 mm and gave many small
#: false positives on fine series (noise and sharpness after downsampling differ).
TRAIN_PIXEL_MM = (0.6, 2.3)
TEST_PIXEL_MM = (0.6, 1.6)
#: Test cases: the field (rows × pixel spacing, mm) is drawn in this range.
TEST_FIELD_MM = (300.0, 400.0)
#: Card notes: results per band of source pixel spacing (mm), [lo, hi).
PIXEL_BANDS = ((0.0, 1.0), (1.0, 10.0))
# seed streams: train, validation, test
STREAMS = (1_000_000, 2_000_000, 3_000_000)


def window(hu: np.ndarray) -> np.ndarray:
    centre, width = WINDOW
    return np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0)


def model_inputs(ct: SyntheticCT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slices, SIZE, SIZE, 3) inputs, (slices, SIZE, SIZE) nodule and vessel fractions, as
    dicom_node.infer.segment prepares a series (grid z ascending = spatial order)."""
    g = ct.grid
    wr = resample_weights(g.rows, g.pixel_spacing[0], SIZE, PIXEL_MM)
    wc = resample_weights(g.cols, g.pixel_spacing[1], SIZE, PIXEL_MM)
    small = np.stack([wr @ window(s.astype(np.float64)) @ wc.T for s in ct.hu])
    soft = np.stack([wr @ s.astype(np.float64) @ wc.T for s in ct.soft])
    vessels = np.stack([wr @ s.astype(np.float64) @ wc.T for s in ct.vessels])
    (lo_m, w_m), (lo_p, w_p) = context_planes(np.asarray(g.z, dtype=np.float64), CONTEXT_MM)
    x = np.stack([np.stack([interpolate_plane(small, lo_m[k], w_m[k]), small[k],
                            interpolate_plane(small, lo_p[k], w_p[k])], axis=-1)
                  for k in range(len(small))])
    return x.astype(np.float32), soft.astype(np.float32), vessels.astype(np.float32)


def training_grid(rng: np.random.Generator, slices: int) -> Grid:
    """Random source geometry: field 300–380 mm, pixels TRAIN_PIXEL_MM, slices 1–5 mm apart."""
    pixel = rng.uniform(*TRAIN_PIXEL_MM)
    rows = round(float(SIZE * PIXEL_MM * rng.uniform(0.95, 1.2) / pixel))
    spacing = rng.uniform(1.0, 5.0)
    centre = rng.uniform(-90.0, 90.0)
    z = centre + (np.arange(slices) - (slices - 1) / 2) * spacing
    return Grid(rows, rows, (pixel, pixel), tuple(float(v) for v in z))


def _crop(x: np.ndarray, y: np.ndarray, k: int, r: int, c: int) -> tuple[np.ndarray, ...]:
    h = CROP // 2
    r, c = int(np.clip(r, h, SIZE - h)), int(np.clip(c, h, SIZE - h))
    return x[k, r - h:r + h, c - h:c + h], y[k, r - h:r + h, c - h:c + h, None]


def draw_training_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CROP² patches of one training volume: four per nodule, on slices through it (so small
    nodules count as much as large ones), four anywhere, six centred on lung vessels (the hard
    negatives; half of them on thick ones, near the hilum)."""
    rng = np.random.default_rng(seed)
    grid = training_grid(rng, 16)
    count = int(rng.choice(5, p=[0.1, 0.3, 0.25, 0.2, 0.15]))
    small = SMALL_FRACTION > 0 and rng.random() < SMALL_FRACTION
    ct = make_case(seed, grid, nodule_count=count,
                   diameter_mm=SMALL_MM if small else (3.0, 25.0))
    x, y, vessels = model_inputs(ct)
    z = np.asarray(grid.z)
    crops = []
    for nodule in ct.nodules:
        cx, cy, cz = nodule.center
        row, col = cy / PIXEL_MM + (SIZE - 1) / 2, cx / PIXEL_MM + (SIZE - 1) / 2
        reach = max(nodule.semi_axes) / PIXEL_MM + 1
        through = [k for k in np.nonzero(np.abs(z - cz) < max(nodule.semi_axes))[0]
                   if y[k, int(max(0, row - reach)):int(row + reach) + 1,
                        int(max(0, col - reach)):int(col + reach) + 1].max(initial=0) >= 0.3]
        per = PATCHES_PER_SMALL if nodule.diameter_mm < SMALL_MM[1] else PATCHES_PER_NODULE
        for _ in range(per if through else 0):
            k = int(rng.choice(through))
            jitter = rng.integers(-CROP // 3, CROP // 3 + 1, 2)
            crops.append(_crop(x, y, k, int(row) + jitter[0], int(col) + jitter[1]))
    for _ in range(4):
        crops.append(_crop(x, y, int(rng.integers(len(x))), *rng.integers(0, SIZE, 2)))
    half = VESSEL_PATCHES // 2
    for threshold in [0.9] * half + [0.5] * (VESSEL_PATCHES - half):  # thick (hilum), any
        on_vessel = np.argwhere((vessels >= threshold) & (y < 0.05))
        if len(on_vessel):
            k, r, c = on_vessel[rng.integers(len(on_vessel))]
            crops.append(_crop(x, y, int(k), int(r), int(c)))
    return (np.stack([a for a, _ in crops]).astype(np.float16),
            np.stack([b for _, b in crops]).astype(np.float16))


def draw_validation_volume(seed: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Model inputs of one validation volume, its nodule mask at the source resolution, the
    source pixel spacing and voxel volume (mm3)."""
    rng = np.random.default_rng(seed)
    grid = training_grid(rng, 24)
    ct = make_case(seed, grid, nodule_count=int(rng.integers(1, 5)))
    x, _, _ = model_inputs(ct)
    voxel = grid.pixel_spacing[0] * grid.pixel_spacing[1] * float(np.median(np.diff(grid.z)))
    return x.astype(np.float16), ct.labels > 0, grid.pixel_spacing[0], voxel


def test_case(seed: int) -> SyntheticCT:
    """A held-out case at a typical source geometry: pixels TEST_PIXEL_MM (0.6–1.6 mm), a
    field of TEST_FIELD_MM (300–400 mm, so 188–667 rows), 40 slices 1.25–3 mm apart; 0–4
    nodules (about one case in eight has none)."""
    rng = np.random.default_rng(seed)
    pixel = round(float(rng.uniform(*TEST_PIXEL_MM)), 3)
    spacing = round(float(rng.uniform(1.25, 3.0)), 2)
    centre = rng.uniform(-60.0, 60.0)
    rows = round(float(rng.uniform(*TEST_FIELD_MM)) / pixel)
    z = centre + (np.arange(40) - 19.5) * spacing
    grid = Grid(rows, rows, (pixel, pixel), tuple(round(float(v), 3) for v in z))
    count = int(rng.choice(5, p=[0.125, 0.3, 0.25, 0.2, 0.125]))
    return make_case(seed, grid, nodule_count=count)


def parallel(fn: Any, seeds: list[int], workers: int) -> list[Any]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, seeds, chunksize=4))


def build_model(keras: Any, size: int | None = SIZE) -> Any:
    """A 2-D U-Net: 4 levels of two 3×3 convolutions, 8 … 128 filters; sigmoid output.
    ``size=None`` builds it for any input size (training on patches)."""
    layers = keras.layers

    def block(x: Any, filters: int, name: str) -> Any:
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                              kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        return x

    inputs = keras.Input((size, size, 3), name="slices")
    x, skips = inputs, []
    for level in range(DEPTH):
        x = block(x, BASE_FILTERS * 2**level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{level}")(x)
    x = block(x, BASE_FILTERS * 2**DEPTH, "bottom")
    for level in reversed(range(DEPTH)):
        x = layers.UpSampling2D(name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = block(x, BASE_FILTERS * 2**level, f"dec{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="nodule")(x)
    return keras.Model(inputs, outputs, name="lung_nodule_unet")


def dice_bce_loss(keras: Any) -> Any:
    ops = keras.ops

    def loss(y_true: Any, y_pred: Any) -> Any:
        bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
        inter = ops.sum(y_true * y_pred)
        soft_dice = (2.0 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
        return bce + (1.0 - soft_dice)

    return loss


def object_loss(keras: Any) -> Any:
    """BCE + soft Dice over the batch + (1 − Tversky) per patch that holds a nodule, averaged
    over those patches: a small nodule's patch weighs as much as a large one's, and a missed
    voxel (beta) costs more than a false one (alpha)."""
    ops = keras.ops
    base = dice_bce_loss(keras)
    alpha, beta = 1.0 - TVERSKY_BETA, TVERSKY_BETA

    def loss(y_true: Any, y_pred: Any) -> Any:
        axes = (1, 2, 3)
        tp = ops.sum(y_true * y_pred, axis=axes)
        fn = ops.sum(y_true, axis=axes) - tp
        fp = ops.sum(y_pred, axis=axes) - tp
        tversky = (tp + 1.0) / (tp + alpha * fp + beta * fn + 1.0)
        has = ops.cast(ops.max(y_true, axis=axes) >= 0.3, y_pred.dtype)
        per_object = ops.sum(has * (1.0 - tversky)) / ops.maximum(ops.sum(has), 1.0)
        return base(y_true, y_pred) + per_object

    return loss


LOSSES = {"dice_bce": dice_bce_loss, "object": object_loss}
LOSS_TEXT = {"dice_bce": "binary cross-entropy + soft Dice",
             "object": "binary cross-entropy + soft Dice + per-patch Tversky"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def pick_threshold(model: Any, val: list[tuple[np.ndarray, np.ndarray, float, float]]) -> float:
    """The threshold (0.20 … 0.90, step 0.05) by mean Dice over the validation volumes, at the
    source resolution (the probabilities resampled back as dicom_node.infer.segment does),
    among those that give at most FP_LIMIT false positives per validation volume (3-D regions
    of at least MIN_REGION_MM3 that touch no nodule, as the node keeps them). The targets are
    partial-volume fractions, whose boundary is 0.5: of the thresholds within 0.01 of the best
    Dice, the one nearest 0.5 is taken."""
    grid = np.round(np.arange(0.2, 0.901, 0.05), 2)
    scores = np.zeros(len(grid))
    false = np.zeros(len(grid))
    cube = np.ones((3, 3, 3), bool)
    for x, truth, pixel, voxel in val:
        probs = np.asarray(model.predict(x.astype(np.float32), batch_size=16, verbose=0))
        back = resample_weights(SIZE, PIXEL_MM, truth.shape[1], pixel)
        full = np.stack([back @ p[..., 0] @ back.T for p in probs])
        for i, t in enumerate(grid):
            comps, n = ndimage.label(full >= t, structure=cube)
            keep = np.bincount(comps.ravel(), minlength=n + 1) * voxel >= MIN_REGION_MM3
            keep[0] = False
            mask = keep[comps]
            scores[i] += dice(mask, truth)
            false[i] += np.count_nonzero(keep) - np.count_nonzero(np.unique(comps[truth & mask]))
    scores /= max(1, len(val))
    false /= max(1, len(val))
    print("validation mean Dice / false positives per volume by threshold: " + ", ".join(
        f"{t:.2f} {s:.3f}/{f:.2f}" for t, s, f in zip(grid, scores, false, strict=True)))
    allowed = false <= FP_LIMIT
    if not allowed.any():
        allowed[:] = True
    best = scores[allowed].max()
    near_best = grid[allowed & (scores >= best - 0.01)]
    return float(near_best[np.argmin(np.abs(near_best - 0.5))])


def export_case(folder: Path, index: int, seed: int) -> Path:
    """Write one held-out case as a DICOM series plus mask.npz (layout: module docstring)."""
    import pydicom

    from tests.support.ct_series import write_ct

    ct = test_case(seed)
    case = folder / f"case{index:03d}"
    paths = write_ct(case, ct, key=f"{NAME}-eval-{seed}", seed=seed)
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    heads.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial: normal = +z
    np.savez_compressed(
        case / "mask.npz", mask=(ct.labels > 0).astype(np.uint8),
        sop_instance_uids=np.array([str(ds.SOPInstanceUID) for ds in heads]),
        labels=ct.labels,
        nodule_centers_mm=np.array([n.center for n in ct.nodules]).reshape(-1, 3),
        nodule_semi_axes_mm=np.array([n.semi_axes for n in ct.nodules]).reshape(-1, 3),
        nodule_volumes_mm3=np.array([n.volume_mm3 for n in ct.nodules]),
        nodule_diameters_mm=np.array([n.diameter_mm for n in ct.nodules]))
    return case


def export_cases(folder: Path, seeds: list[int], workers: int) -> list[Path]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(export_case, [folder] * len(seeds), range(len(seeds)), seeds))


from evaluation import evaluate_cases, render_card  # noqa: E402  (train.py's second half)


def main() -> None:
    global SMALL_FRACTION, PATCHES_PER_SMALL, VESSEL_PATCHES, TVERSKY_BETA  # (forked) workers
    global PIXEL_MM, SIZE, CROP
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for model.keras/.toml")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train", type=int, default=300, help="training volumes")
    parser.add_argument("--val", type=int, default=32, help="validation volumes")
    parser.add_argument("--test", type=int, default=32, help="held-out test cases")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--export-eval", type=Path, metavar="DIR",
                        help="only write the held-out test cases (DICOM + mask.npz) to DIR")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="dice_bce")
    parser.add_argument("--small-fraction", type=float, default=SMALL_FRACTION,
                        help="fraction of training volumes with nodules of SMALL_MM only")
    parser.add_argument("--small-patches", type=int, default=PATCHES_PER_SMALL,
                        help="patches per nodule under SMALL_MM[1]")
    parser.add_argument("--vessel-patches", type=int, default=VESSEL_PATCHES,
                        help="hard-negative patches per training volume")
    parser.add_argument("--tversky-beta", type=float, default=TVERSKY_BETA,
                        help="object loss: weight of missed voxels (false ones: 1 - this)")
    parser.add_argument("--pixel-mm", type=float, default=PIXEL_MM, help="model grid spacing")
    parser.add_argument("--size", type=int, default=SIZE, help="model grid (pixels a side)")
    parser.add_argument("--crop", type=int, default=CROP, help="training patch (pixels a side)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not for shipping)")
    args = parser.parse_args()
    SMALL_FRACTION, PATCHES_PER_SMALL = args.small_fraction, args.small_patches
    VESSEL_PATCHES, TVERSKY_BETA = args.vessel_patches, args.tversky_beta
    PIXEL_MM, SIZE, CROP = args.pixel_mm, args.size, args.crop
    if args.quick:
        args.train, args.val, args.test, args.epochs = 24, 4, 3, 1
    test_seeds = [args.seed + STREAMS[2] + i for i in range(args.test)]
    if args.export_eval is not None:
        cases = export_cases(args.export_eval, test_seeds, args.workers)
        print(f"wrote {len(cases)} cases to {args.export_eval}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # 1. data (before Keras is imported, so the worker processes fork light)
        train = parallel(draw_training_volume,
                         [args.seed + STREAMS[0] + i for i in range(args.train)], args.workers)
        val = parallel(draw_validation_volume,
                       [args.seed + STREAMS[1] + i for i in range(args.val)], args.workers)
        cases = export_cases(Path(tmp), test_seeds, args.workers)
        x_train = np.concatenate([x for x, _ in train])
        y_train = np.concatenate([y for _, y in train])
        positives = int((y_train.max(axis=(1, 2, 3)) >= 0.3).sum())
        print(f"data: {len(x_train)} training patches ({positives} with nodule) from "
              f"{args.train} volumes, {args.val} validation volumes, {len(cases)} test cases "
              f"in {time.perf_counter() - started:.0f} s", flush=True)
        values = fit_and_save(args, x_train, y_train, val)
        metrics = evaluate_cases(args.out, cases, DIAMETER_BANDS, PIXEL_BANDS)
    summary = {k: v for k, v in metrics.items() if k != "per_case"}
    print(json.dumps(summary, indent=1))
    values["duration"] = time.perf_counter() - started
    (args.out / "model.toml").write_text(render_card(values, metrics), encoding="utf-8")
    print(f"wrote {args.out / 'model.keras'} and {args.out / 'model.toml'} "
          f"in {values['duration']:.0f} s")


def fit_and_save(args: argparse.Namespace, x_train: np.ndarray, y_train: np.ndarray,
                 val: list[tuple[np.ndarray, np.ndarray, float, float]]) -> dict[str, Any]:
    """Train on patches, pick the threshold, save the SIZE² model and a card without metrics."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(args.seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    net = build_model(keras, size=None)
    batch = 32
    steps = args.epochs * int(np.ceil(len(x_train) / batch))
    net.compile(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(3e-3, steps)),
        loss=LOSSES[args.loss](keras))
    trained = time.perf_counter()
    net.fit(x_train, y_train, batch_size=batch, epochs=args.epochs, shuffle=True, verbose=2)
    train_seconds = time.perf_counter() - trained
    model = build_model(keras, size=SIZE)
    model.set_weights(net.get_weights())
    threshold = pick_threshold(model, val)
    print(f"threshold {threshold}; network trained in {train_seconds:.0f} s", flush=True)
    model.save(args.out / "model.keras")
    values: dict[str, Any] = {
        "version": VERSION, "size": SIZE, "crop": CROP, "pixel_mm": PIXEL_MM, "window": WINDOW,
        "context_mm": CONTEXT_MM,
        "threshold": threshold, "min_region": MIN_REGION_MM3, "min_slices": MIN_SLICES,
        "small_draw": (f"; in {SMALL_FRACTION:.0%} of the training volumes the nodules were drawn "
                       f"from {SMALL_MM[0]:g}-{SMALL_MM[1]:g} mm only" if SMALL_FRACTION > 0
                       else ""),
        "per_nodule": (f"{PATCHES_PER_NODULE} per nodule" if PATCHES_PER_SMALL == PATCHES_PER_NODULE
                       else f"{PATCHES_PER_SMALL} per nodule under {SMALL_MM[1]:g} mm, "
                            f"{PATCHES_PER_NODULE} per larger one"),
        "vessel_patches": VESSEL_PATCHES, "loss": LOSS_TEXT[args.loss],
        "fp_limit": FP_LIMIT,
        "train_pixel": "{:g}-{:g}".format(*TRAIN_PIXEL_MM),
        "test_pixel": "{:g}-{:g}".format(*TEST_PIXEL_MM),
        "test_field": "{:g}-{:g}".format(*TEST_FIELD_MM),
        "seed": args.seed, "epochs": args.epochs, "n_train": len(x_train),
        "n_train_volumes": args.train, "n_val": args.val, "n_test": args.test,
        "duration": None, "train_seconds": train_seconds,
        "hardware": _hardware(keras),
        "framework": f"keras {keras.__version__}, {keras.backend.backend()}",
    }
    (args.out / "model.toml").write_text(render_card(values, None), encoding="utf-8")
    return values


def _hardware(keras: Any) -> str:
    gpu = False
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpu = bool(tf.config.list_physical_devices("GPU"))
    cores = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    return f"{cores} + GPU" if gpu else f"{cores}, no GPU"


if __name__ == "__main__":
    main()
