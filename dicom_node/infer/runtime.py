"""Run Keras models: load once per process, batch, predict; describe the devices.

Keras (and with it TensorFlow, or JAX when ``KERAS_BACKEND=jax``) is imported on the first call
that needs it, never when this module is imported, so that the receiver process stays light.
On TensorFlow every visible GPU gets memory growth, so one worker does not take the whole card;
without a GPU the models run on the CPU. Nothing here picks a device by hand: Keras places the
work on a GPU when its backend sees one.

Loaded models are cached per process, keyed by (weights path, card version): a new version of a
card loads new weights, and the same card asked for twice loads them once.

A study's images go through the network in batches of :data:`BATCH_SIZE` while the next batch is
decoded and preprocessed (:func:`predict_overlapped`: the network runs in a second thread; the
backends and numpy release the GIL). The batches, and so the outputs, are those of one
:func:`predict` over all the images.
"""

from __future__ import annotations

import importlib
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_node.errors import ModelError, PreprocessingError
from dicom_node.infer.card import ClassifierCard, ModelCard
from dicom_node.infer.preprocess import preprocess
from dicom_node.messages import ClassificationResult, Finding
from dicom_node.native_log import native_stderr_as_events

log = structlog.get_logger(__name__)

#: Images per forward pass.
BATCH_SIZE = 16

_models: dict[tuple[Path, str], Any] = {}
_lock = threading.Lock()
_devices_configured = False


def _keras() -> Any:
    """Import Keras on first use and configure the backend's devices once."""
    global _devices_configured
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no C++ info lines on stderr
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX: grow, don't grab
    with _lock:
        if _devices_configured:
            import keras

            return keras
        # The backend's C++ start-up lines (absl, CUDA) become JSON events (native_log.py).
        with native_stderr_as_events(os.environ.get("KERAS_BACKEND", "tensorflow")):
            import keras

            _configure_devices(keras.backend.backend())
        _devices_configured = True
    return keras


def _configure_devices(backend: str) -> None:
    if backend != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # the GPU was initialised before we got here
            log.warning("gpu_memory_growth_not_set", device=gpu.name, reason=str(exc))


def describe_devices() -> list[str]:
    """One line per device the Keras backend can run on, e.g. ``"tensorflow 2.21.0 CPU:0"``."""
    keras = _keras()
    backend = str(keras.backend.backend())
    lines: list[str] = []
    if backend == "tensorflow":
        import tensorflow as tf

        for device in tf.config.list_physical_devices():
            index = device.name.rsplit(":", 1)[-1]
            line = f"tensorflow {tf.__version__} {device.device_type}:{index}"
            if device.device_type == "GPU":
                details = tf.config.experimental.get_device_details(device)
                if details.get("device_name"):
                    line += f" {details['device_name']}"
                if details.get("compute_capability"):
                    major, minor = details["compute_capability"]
                    line += f" (compute capability {major}.{minor})"
            lines.append(line)
    elif backend == "jax":
        jax = importlib.import_module("jax")
        for dev in jax.devices():
            lines.append(f"jax {jax.__version__} {dev.platform.upper()}:{dev.id} {dev.device_kind}")
    else:
        lines.append(f"{backend} (keras {keras.__version__}): devices not enumerated")
    return lines


def load_model(card: ModelCard, model_dir: Path) -> Any:
    """The Keras model of ``card`` from ``model_dir``, loaded once per process and checked.

    Raises ModelError when the weights cannot be loaded or do not match the card's input and
    outputs.
    """
    path = (Path(model_dir) / card.weights).resolve()
    key = (path, card.version)
    with _lock:
        cached = _models.get(key)
    if cached is not None:
        return cached
    keras = _keras()
    started = time.perf_counter()
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError … for bad files
        raise ModelError(f"{path}: cannot load model {card.name} {card.version}: {exc}") from exc
    _check_signature(model, card, path)
    with _lock:
        model = _models.setdefault(key, model)
    log.info(
        "model_loaded",
        model=card.name,
        version=card.version,
        backend=keras.backend.backend(),
        seconds=round(time.perf_counter() - started, 3),
    )
    return model


def _check_signature(model: Any, card: ModelCard, path: Path) -> None:
    rows, cols = card.input.shape
    expected_in = (None, rows, cols, card.input.channels)
    got_in = tuple(model.input_shape)
    if got_in != expected_in:
        raise ModelError(
            f"{path}: model input shape {got_in} does not match the card's [input] {expected_in}"
        )
    if isinstance(card, ClassifierCard):
        expected_out = (None, len(card.outputs))
        got_out = tuple(model.output_shape)
        if got_out != expected_out:
            raise ModelError(
                f"{path}: model output shape {got_out} does not match the card's "
                f"{len(card.outputs)} outputs"
            )


def clear_model_cache() -> None:
    """Forget every loaded model (the next call loads the weights again)."""
    with _lock:
        _models.clear()


def predict(model: Any, batch: NDArray[np.float32]) -> NDArray[np.float32]:
    """Run ``model`` over ``batch`` in chunks of BATCH_SIZE; return its outputs as numpy."""
    chunks = [
        np.asarray(model.predict_on_batch(batch[i : i + BATCH_SIZE]), dtype=np.float32)
        for i in range(0, len(batch), BATCH_SIZE)
    ]
    return np.concatenate(chunks)


def predict_overlapped(
    model: Any, inputs: Iterable[NDArray[np.float32]], what: str
) -> Iterator[NDArray[np.float32]]:
    """:func:`predict` over each array of ``inputs``, outputs in order, the network in a second
    thread: the caller prepares the next input (decoding, preprocessing) and uses the previous
    output while the network runs (the backends and numpy release the GIL). One input runs at a
    time and at most one more waits. A failure of the network raises ModelError naming ``what``
    (e.g. "model chest-cls 1.0"); exceptions of ``inputs`` pass unchanged."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicom-node-predict") as pool:
        pending: Future[NDArray[np.float32]] | None = None
        for x in inputs:
            submitted = pool.submit(predict, model, x)
            if pending is not None:
                yield _result(pending, what)
            pending = submitted
        if pending is not None:
            yield _result(pending, what)


def _result(future: Future[NDArray[np.float32]], what: str) -> NDArray[np.float32]:
    try:
        return future.result()
    except Exception as exc:  # a backend error must not escape as a bare framework exception
        raise ModelError(f"{what} failed to run: {exc}") from exc


def batches(arrays: Iterable[NDArray[np.float32]], size: int = BATCH_SIZE
            ) -> Iterator[NDArray[np.float32]]:
    """The rows of ``arrays`` (concatenated along the first axis) in batches of ``size``, the
    last one shorter: the batches :func:`predict` makes of their concatenation, as they come."""
    buffer: list[NDArray[np.float32]] = []
    count = 0
    for array in arrays:
        buffer.append(array)
        count += len(array)
        while count >= size:
            joined = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            yield joined[:size]
            buffer, count = [joined[size:]], count - size
    if count:
        yield np.concatenate(buffer)


def classify(
    card: ModelCard, model_dir: Path, datasets: Sequence[Dataset]
) -> ClassificationResult:
    """Classify the images of one study: per finding, the highest probability over its images.

    Instances whose Modality is not one of the card's modalities, or that cannot be
    preprocessed (no pixel data, unsupported photometric interpretation, undecodable), are
    skipped and logged; ``source_sop_instance_uids`` lists the instances that were used.
    Raises PreprocessingError when no instance can be used, ModelError when the card is not a
    classifier's or the model fails.
    """
    if not isinstance(card, ClassifierCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not a classifier")
    used: list[str] = []
    problems: list[str] = []
    # images are preprocessed as the network needs them: the next batch while it runs this one
    pending = batches(_usable_inputs(card, datasets, used, problems))
    first = next(pending, None)
    if first is None:
        detail = "; ".join(problems) if problems else "no instances given"
        raise PreprocessingError(f"model {card.name}: no usable image: {detail}")
    model = load_model(card, model_dir)
    probabilities = np.concatenate(list(predict_overlapped(
        model, itertools.chain([first], pending), f"model {card.name} {card.version}")))
    if not np.all(np.isfinite(probabilities)):
        raise ModelError(f"model {card.name} {card.version} returned non-finite probabilities")
    study = np.clip(probabilities.max(axis=0), 0.0, 1.0)
    findings = tuple(
        Finding(concept=output.code.concept(), probability=float(p), threshold=output.threshold)
        for output, p in zip(card.outputs, study, strict=True)
    )
    return ClassificationResult(
        model=card.identity(),
        findings=findings,
        source_sop_instance_uids=tuple(dict.fromkeys(used)),
    )


def _usable_inputs(card: ModelCard, datasets: Sequence[Dataset], used: list[str],
                   problems: list[str]) -> Iterator[NDArray[np.float32]]:
    """The model input of each instance the card can take, in order; appends the instance's UID
    to ``used``, or the reason it is skipped (logged) to ``problems``."""
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        modality = str(ds.get("Modality", ""))
        if modality not in card.modalities:
            problems.append(f"instance {uid}: modality {modality or '(none)'!r} not in "
                            f"{', '.join(card.modalities)}")
            log.info("image_skipped", model=card.name, sop_instance_uid=uid, reason="modality",
                     modality=modality)
            continue
        try:
            x = preprocess(ds, card)
        except PreprocessingError as exc:
            problems.append(str(exc))
            log.warning("image_skipped", model=card.name, sop_instance_uid=uid,
                        reason=str(exc))
            continue
        used.append(uid)
        yield x
