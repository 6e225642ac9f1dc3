"""Inference benchmark: how much of a model's raw speed does the node's pipeline keep?

For one model (default chest-xray-cnn; ``--model`` names others or ``all``), on the device Keras
uses (a GPU when the backend sees one, else the CPU):

- **pipeline**: ``run_pipeline(card, folder, PipelineInput)`` on one study of ``--images N``
  images: what a worker does per job after reading the files — decode, preprocess, batch, run the
  network, encode the result objects (SR, SEG, derived series). The datasets are parsed from
  in-memory bytes before each run (pixel data not yet decoded), so decoding is timed and pydicom's
  pixel cache never helps; reading the spool and DICOM networking are not timed.
- **bare**: the same network on the same inputs, pre-made: the batches the pipeline handed to
  ``model.predict_on_batch`` during a warm-up run are recorded, then replayed alone. A model whose
  runtime does not call ``predict_on_batch`` gets N copies of its input shape instead (said so).
  The replay runs both from the main thread and from a worker thread (as the pipeline calls the
  network) and the faster median counts: on TensorFlow (CPU) the same calls took 14 ms from a
  worker thread and 21 ms from the main thread right after other work, at equal CPU time, so
  the bare figure must not depend on which thread it is timed from.

Images/s = N / seconds (median of ``--repeat`` runs, pipeline and bare interleaved); the ratio
pipeline/bare is the share of the network's speed the node keeps (target ≥ 0.9). The time the
network takes inside the pipeline is measured too, so the rest (preprocessing and encoding) is
visible.

Decoding alone (``pixel_array`` of every instance, nothing else) is timed too: no pipeline skips
it, so where it takes longer than the network (the small shipped classifiers) it bounds the
ratio below 1 whatever the pipeline does; the table says so.

Images/s and the ratio are wall-clock; the network runs in a second thread while the next batch is
preprocessed (``runtime.predict_overlapped``), so "rest" = pipeline − network − encoding is the
part of decoding/preprocessing/post-processing *not* hidden behind the network.

Sources (pydicom-data, real images, new UIDs, one study): CR/DX → ``RG1_UNCR.dcm`` (chest CR,
1955×1841); CT → ``693_UNCR.dcm`` (head CT, 512×512) as a series with 5 mm spacing.
``--source model`` shrinks them to the card's input shape first, so preprocessing has no resizing
to do (what a node fed with model-sized images would see). ``--source phantom`` (segmenters on
CT) is a synthetic chest CT with two nodules, 512×512 pixels of 0.7 mm, 2.5 mm apart
(``--slice-mm``; ``tests/support/ct_series.py``, the generator lung-nodule-unet was trained on):
the model finds regions, so the SEG is encoded too, which the head CT never gives.

``--model densenet121-untrained`` times a hospital-sized classifier instead of the tiny shipped
ones: ``keras.applications.DenseNet121`` with **random weights (untrained, meaningless outputs,
for timing only)** at 512×512×1 with three sigmoid outputs, built into a temporary folder with a
card that says so; it is never written to ``models/``.

Keras 3 calls only (no TensorFlow-only code): runs with ``KERAS_BACKEND=jax`` too.

Run from the repository root:  .venv/bin/python -m bench.inference [--model NAME|all]
[--images 16] [--repeat 5] [--source native|model|phantom|both] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DEFAULT_MODEL = "chest-xray-cnn"
#: Models the benchmark knows how to feed, in the order ``--model all`` runs them.
KNOWN = ("chest-xray-cnn", "head-ct-ich-cnn", "lung-nodule-unet", "ct-denoise-gan")
#: A hospital-sized classifier with random weights, built for timing only (never shipped).
UNTRAINED = "densenet121-untrained"
UNTRAINED_SHAPE = (512, 512)
#: Nodules of the phantom source: (centre (x, y, z) patient mm, diameter mm), in its lungs.
PHANTOM_NODULES = (((-60.0, -10.0, 0.0), 14.0), ((65.0, 25.0, 5.0), 18.0))
#: Source image per modality (pydicom-data, real).
SOURCES = {"CR": "RG1_UNCR.dcm", "DX": "RG1_UNCR.dcm", "CT": "693_UNCR.dcm",
           "MR": "MR2_UNCR.dcm"}
TARGET = 0.9


@dataclass
class Result:
    model: str
    kind: str
    images: int
    source: str
    pipeline_images_per_second: float
    bare_images_per_second: float
    ratio: float
    #: Median seconds of one run; of the network and of the result encoders inside it.
    pipeline_seconds: float
    network_in_pipeline_seconds: float
    encode_seconds: float
    bare_seconds: float
    #: Median CPU seconds (all threads of the process) of one run of each path.
    pipeline_cpu_seconds: float
    bare_cpu_seconds: float
    network_inputs: int
    #: Median seconds to decode the study's pixel data alone (``pixel_array`` of each instance,
    #: nothing else): work no pipeline can skip. Even hidden entirely behind the network, it
    #: bounds the ratio at bare / max(bare, decode) for decoding in one thread (pydicom's
    #: decoders hold the GIL: two threads decoded no faster than one on this machine).
    decode_seconds: float = 0.0
    #: Peak memory (MB) numpy and Python allocated during one more pipeline run, above what was
    #: in use before it (tracemalloc; the model already loaded; its own backend memory excluded).
    peak_memory_mb: float = 0.0
    note: str = ""
    #: Median seconds of the bare replay from the main thread and from a worker thread.
    bare_seconds_by_thread: dict[str, float] = field(default_factory=dict)


class Recorder:
    """Wraps one model's ``predict_on_batch``: times it, and records the batches on request."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = model.predict_on_batch
        self.batches: list[np.ndarray] = []
        self.seconds = 0.0
        self.recording = False

    def _wrapped(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.recording:
            self.batches.append(np.array(x, copy=True))
        started = time.perf_counter()
        y = self.original(x, *args, **kwargs)
        self.seconds += time.perf_counter() - started
        return y

    def __enter__(self) -> Recorder:
        # object.__setattr__: Keras layers track attributes set the usual way
        object.__setattr__(self.model, "predict_on_batch", self._wrapped)
        return self

    def __exit__(self, *_exc: object) -> None:
        object.__delattr__(self.model, "predict_on_batch")


class EncodeTimer:
    """Times the result builders (``build_*``) the kind's pipeline module calls."""

    def __init__(self, kind: str) -> None:
        import importlib

        from dicom_node.pipelines import PIPELINES

        self.module = importlib.import_module(PIPELINES[kind])
        self.names = [n for n in vars(self.module) if n.startswith("build_")
                      and callable(getattr(self.module, n))]
        self.originals = {n: getattr(self.module, n) for n in self.names}
        self.seconds = 0.0

    def _wrap(self, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed

    def __enter__(self) -> EncodeTimer:
        for name, function in self.originals.items():
            setattr(self.module, name, self._wrap(function))
        return self

    def __exit__(self, *_exc: object) -> None:
        for name, function in self.originals.items():
            setattr(self.module, name, function)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    from dicom_node.infer.runtime import describe_devices

    return {"devices": describe_devices(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(),
            "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset")}


def _shrink(ds: Dataset, shape: tuple[int, int]) -> None:
    """Replace the pixels by a nearest-neighbour copy at ``shape`` (uncompressed)."""
    arr = ds.pixel_array
    rows = np.linspace(0, arr.shape[0] - 1, shape[0]).round().astype(int)
    cols = np.linspace(0, arr.shape[1] - 1, shape[1]).round().astype(int)
    small = np.ascontiguousarray(arr[np.ix_(rows, cols)])
    ds.Rows, ds.Columns = shape
    ds.PixelData = small.tobytes()
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            factor = arr.shape[0] / shape[0]
            ds[keyword].value = [float(v) * factor for v in ds[keyword].value]


#: Slice spacing of the phantom source (mm); ``--slice-mm`` changes it.
PHANTOM_SLICE_MM = 2.5


def phantom_study(count: int, slice_mm: float = PHANTOM_SLICE_MM) -> list[bytes]:
    """A synthetic chest CT series of ``count`` 512×512 slices with two nodules (see docstring)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.ct_series import write_chest_ct_series

    with tempfile.TemporaryDirectory(prefix="bench-phantom-") as folder:
        files = write_chest_ct_series(Path(folder), nodules=PHANTOM_NODULES, slices=count,
                                      spacing=slice_mm, rows=512, pixel_spacing=0.7)
        return [f.read_bytes() for f in sorted(files)]


def make_study(card: Any, count: int, source: str,
               slice_mm: float = PHANTOM_SLICE_MM) -> list[bytes]:
    """``count`` instances of one study for the card's first modality with a source image."""
    if source == "phantom":
        if card.kind != "segmenter" or "CT" not in card.modalities:
            raise SystemExit(f"{card.name}: --source phantom is a chest CT for CT segmenters")
        return phantom_study(count, slice_mm)
    modality = next((m for m in card.modalities if m in SOURCES), None)
    if modality is None:
        raise SystemExit(f"{card.name}: no source image for modalities {card.modalities}")
    path = get_testdata_file(SOURCES[modality])  # exact name: a pattern tries to download
    if path is None:
        raise SystemExit(f"{SOURCES[modality]} not found: pip install pydicom-data")
    template = dcmread(str(path))
    if template.file_meta.TransferSyntaxUID.is_compressed:
        template.decompress()
    if source == "model":
        _shrink(template, tuple(card.input.shape))
    seed = f"bench-inference-{card.name}-{count}-{source}"
    study, series = generate_uid(entropy_srcs=[seed, "study"]), generate_uid(
        entropy_srcs=[seed, "series"])
    blobs = []
    for i in range(count):
        ds = copy.deepcopy(template)
        ds.Modality = modality
        ds.PatientName, ds.PatientID = "Bench^Inference", "BENCH-INFERENCE"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        if "ImagePositionPatient" in ds:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 5.0 * i]
            ds.SliceLocation = z + 5.0 * i
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        blobs.append(buffer.getvalue())
    return blobs


@contextmanager
def untrained_densenet() -> Iterator[Path]:
    """A folder holding an untrained DenseNet121 (512×512×1, three sigmoid outputs) and its card,
    removed afterwards. Random weights: its outputs mean nothing; it exists to be timed."""
    import keras

    from dicom_node.infer.card import ClassifierCard, load_card

    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(
        include_top=True, weights=None, input_shape=(*UNTRAINED_SHAPE, 1), classes=3,
        classifier_activation="sigmoid")
    chest = load_card(MODELS / DEFAULT_MODEL)  # its outputs, modalities and preprocessing
    if not isinstance(chest, ClassifierCard):
        raise SystemExit(f"{DEFAULT_MODEL} is not a classifier")
    outputs = "".join(
        f'[[outputs]]\nname = "{o.name}"\ncode = {{ value = "{o.code.value}", scheme = '
        f'"{o.code.scheme}", meaning = "{o.code.meaning}" }}\nthreshold = 0.5\n\n'
        for o in chest.outputs)
    card = f"""name = "{UNTRAINED}"
version = "0.0.0"
kind = "classifier"
modalities = {json.dumps(list(chest.modalities))}
description = "UNTRAINED DenseNet121 (keras.applications, random weights): for timing only."
intended_use = "BENCHMARK ONLY: untrained, its outputs are meaningless. Never route studies to it."
manufacturer = "dicom-node bench"
weights = "model.keras"
synthetic_training_data = true

[input]
shape = [{UNTRAINED_SHAPE[0]}, {UNTRAINED_SHAPE[1]}]
channels = 1

[preprocessing]
voi = "dataset"
invert_monochrome1 = true
resize = "pad"
pad_value = 0.0
range = [0.0, 1.0]

{outputs}"""
    with tempfile.TemporaryDirectory(prefix="bench-untrained-") as folder:
        model.save(Path(folder) / "model.keras")
        (Path(folder) / "model.toml").write_text(card, encoding="utf-8")
        load_card(Path(folder))  # the card must be valid
        yield Path(folder)


def bench_model(name: str, count: int, repeat: int, source: str,
                slice_mm: float = PHANTOM_SLICE_MM) -> Result:
    if name == UNTRAINED:
        with untrained_densenet() as folder:
            return _bench_model(folder, count, repeat, source, slice_mm)
    return _bench_model(Path(name) if "/" in name else MODELS / name, count, repeat, source,
                        slice_mm)


def _bench_model(folder: Path, count: int, repeat: int, source: str,
                 slice_mm: float = PHANTOM_SLICE_MM) -> Result:
    from dicom_node.infer.card import load_card
    from dicom_node.infer.runtime import load_model
    from dicom_node.messages import PipelineInput
    from dicom_node.pipelines import run_pipeline

    card = load_card(folder)
    blobs = make_study(card, count, source, slice_mm)

    def job() -> Any:
        sources = tuple(dcmread(BytesIO(b)) for b in blobs)
        return PipelineInput(study_instance_uid=str(sources[0].StudyInstanceUID), generation=0,
                             route_name="bench", sources=sources, prior_findings=(),
                             timestamp=datetime(2025, 1, 17, 12, 0, tzinfo=UTC))

    what = "synthetic chest CT" if source == "phantom" else SOURCES.get(card.modalities[0], "?")
    print(f"{card.name}: warming up ({count} × {what}, {source})", file=sys.stderr)
    run_pipeline(card, folder, job())  # loads the model, traces the network
    model = load_model(card, folder)
    name = card.name
    note = ""
    with Recorder(model) as recorder, EncodeTimer(card.kind) as encoder:
        recorder.recording = True
        run_pipeline(card, folder, job())
        recorder.recording = False
        batches = recorder.batches
        if not batches:
            shape = tuple(d if d is not None else s for d, s in
                          zip(model.input_shape[1:], (*card.input.shape, card.input.channels),
                              strict=False))
            batches = [np.zeros((count, *shape), dtype=np.float32)]
            note = ("the pipeline's network calls were not seen (no predict_on_batch); bare = "
                    f"one batch of {count} × {shape}")
        def bare() -> None:
            for batch in batches:
                recorder.original(batch)

        bare()  # the bare path warms up too
        pipeline_s, network_s, encode_s, pipeline_cpu, decode_s = ([] for _ in range(5))
        bare_s: dict[str, list[float]] = {"main thread": [], "worker thread": []}
        bare_cpu: dict[str, list[float]] = {"main thread": [], "worker thread": []}
        for _ in range(repeat):
            work = job()
            recorder.seconds = encoder.seconds = 0.0
            cpu, started = time.process_time(), time.perf_counter()
            run_pipeline(card, folder, work)
            pipeline_s.append(time.perf_counter() - started)
            pipeline_cpu.append(time.process_time() - cpu)
            network_s.append(recorder.seconds)
            encode_s.append(encoder.seconds)
            decoding = job().sources
            started = time.perf_counter()
            for ds in decoding:
                _ = ds.pixel_array
            decode_s.append(time.perf_counter() - started)
            for thread in bare_s:
                cpu, started = time.process_time(), time.perf_counter()
                if thread == "main thread":
                    bare()
                else:
                    with ThreadPoolExecutor(max_workers=1) as pool:
                        pool.submit(bare).result()
                bare_s[thread].append(time.perf_counter() - started)
                bare_cpu[thread].append(time.process_time() - cpu)
    peak = _peak_memory(lambda: run_pipeline(card, folder, job()))
    p = statistics.median(pipeline_s)
    fastest = min(bare_s, key=lambda thread: statistics.median(bare_s[thread]))
    b = statistics.median(bare_s[fastest])
    return Result(model=name, kind=card.kind, images=count, source=source,
                  pipeline_images_per_second=count / p, bare_images_per_second=count / b,
                  ratio=b / p, pipeline_seconds=p,
                  network_in_pipeline_seconds=statistics.median(network_s),
                  encode_seconds=statistics.median(encode_s), bare_seconds=b,
                  pipeline_cpu_seconds=statistics.median(pipeline_cpu),
                  bare_cpu_seconds=statistics.median(bare_cpu[fastest]),
                  network_inputs=sum(len(x) for x in batches), note=note,
                  decode_seconds=statistics.median(decode_s), peak_memory_mb=peak,
                  bare_seconds_by_thread={t: statistics.median(v) for t, v in bare_s.items()})


def _peak_memory(run: Any) -> float:
    """MB allocated at the peak of ``run()`` above the start (tracemalloc traces numpy too).
    The datasets are parsed inside ``run`` too, as a worker holds them for its job."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run()
        return (tracemalloc.get_traced_memory()[1] - base) / 1e6
    finally:
        tracemalloc.stop()


def print_table(results: Sequence[Result], info: dict[str, Any]) -> None:
    print(f"device: {'; '.join(info['devices'])} ({info['cpu']}, {info['cores']} cores)")
    print(f"numpy BLAS threads: OPENBLAS_NUM_THREADS={info['openblas_threads']}")
    header = (f"{'model':<21} {'kind':<10} {'source':<7} {'images':>6} {'pipeline img/s':>14} "
              f"{'bare img/s':>10} {'ratio':>6}  {'network share of pipeline':>25}")
    print(header)
    print("-" * len(header))
    for r in results:
        share = r.network_in_pipeline_seconds / r.pipeline_seconds
        print(f"{r.model:<21} {r.kind:<10} {r.source:<7} {r.images:>6} "
              f"{r.pipeline_images_per_second:>14.1f} {r.bare_images_per_second:>10.1f} "
              f"{r.ratio:>6.2f}  {100 * share:>24.0f}%")
    for r in results:
        verdict = "met" if r.ratio >= TARGET else "NOT met"
        rest = r.pipeline_seconds - r.network_in_pipeline_seconds - r.encode_seconds
        print(f"{r.model} ({r.source}): pipeline/bare = {r.ratio:.2f}, target ≥ {TARGET} "
              f"{verdict}; one study of {r.images} took {1000 * r.pipeline_seconds:.0f} ms = "
              f"network {1000 * r.network_in_pipeline_seconds:.0f} + encoding "
              f"{1000 * r.encode_seconds:.0f} + decoding/preprocessing/other not overlapped "
              f"with the network {1000 * rest:.0f} ms; bare {1000 * r.bare_seconds:.0f} ms for "
              f"{r.network_inputs} network input(s); CPU time {1000 * r.pipeline_cpu_seconds:.0f}"
              f" ms pipeline, {1000 * r.bare_cpu_seconds:.0f} ms bare; bare from the "
              + ", ".join(f"{t} {1000 * v:.0f} ms" for t, v in r.bare_seconds_by_thread.items()))
        ceiling = r.bare_seconds / max(r.bare_seconds, r.decode_seconds)
        print(f"  decoding the {r.images} images alone (pixel_array) takes "
              f"{1000 * r.decode_seconds:.0f} ms: even hidden entirely behind the network, "
              f"pipeline/bare ≤ {ceiling:.2f} with decoding in one thread; peak memory of one "
              f"run {r.peak_memory_mb:.0f} MB (tracemalloc: the study's datasets and the "
              "pipeline's arrays, not the backend's own)")
        if r.note:
            print(f"  note: {r.note}")
        if r.model == UNTRAINED:
            print(f"  note: {UNTRAINED} has random weights (untrained): timing only")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a folder name under models/, a model folder's path (with a /), "
                             f"'all' ({', '.join(KNOWN)} where present), or {UNTRAINED} (an "
                             "untrained DenseNet121 at 512x512, built for timing only)")
    parser.add_argument("--images", type=int, default=16, help="images per study (default 16)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the median counts")
    parser.add_argument("--source", choices=["native", "model", "phantom", "both"],
                        default="both",
                        help="native-size images, images already at the model's input size, "
                             "a synthetic chest CT with nodules (segmenters), or both native and "
                             "model (default; and phantom for a segmenter)")
    parser.add_argument("--slice-mm", type=float, default=PHANTOM_SLICE_MM,
                        help="slice spacing of the phantom chest CT (default 2.5; a nodule "
                             "protocol reconstructs at 1-1.25)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeat < 1:
        parser.error("--images and --repeat must be at least 1")
    if not 0.3 <= args.slice_mm <= 10:
        parser.error("--slice-mm must be between 0.3 and 10")
    names = ([n for n in KNOWN if (MODELS / n / "model.toml").is_file()]
             if args.model == "all" else [args.model])
    kinds = {}
    for name in names:
        if name == UNTRAINED:
            kinds[name] = "classifier"
            continue
        card = (Path(name) if "/" in name else MODELS / name) / "model.toml"
        if not card.is_file():
            parser.error(f"no model card at {card}")
        from dicom_node.infer.card import load_card

        kinds[name] = load_card(card.parent).kind
    from dicom_node.log import configure_logging

    configure_logging("console", "warning", stream=sys.stderr)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-minute load average is {load:.2f}: other work on this machine "
              "makes the figures noisy", file=sys.stderr)
    def sources(name: str) -> list[str]:
        if args.source != "both":
            return [args.source]
        return ["native", "model"] + (["phantom"] if kinds[name] == "segmenter" else [])

    results = [bench_model(n, args.images, args.repeat, s, args.slice_mm)
               for n in names for s in sources(n)]
    info = machine()
    info["load_average_1min"] = {"before": round(load, 2), "after": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps({"machine": info, "target": TARGET,
                          "results": [asdict(r) for r in results]}, indent=2))
    else:
        print_table(results, info)
        print(f"(1-minute load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
