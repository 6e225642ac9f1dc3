"""Every shipped model runs on Keras' JAX backend and gives what it gives on TensorFlow.

The models are written with the Keras 3 API only, so that the same .keras file runs where
TensorFlow's CUDA build is missing (a GPU server with JAX). This loads each model folder's weights
under ``KERAS_BACKEND=jax`` in a child process (the backend is chosen when Keras is imported) and
compares its outputs with TensorFlow's on the same seeded inputs. jax comes with the test extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.infer import load_card

MODELS = Path(__file__).resolve().parent.parent / "models"
FOLDERS = sorted(p.parent for p in MODELS.glob("*/model.toml"))
#: Backends differ by float32 rounding in convolutions and reductions (seen: at most 3e-6).
ATOL, RTOL = 5e-5, 1e-4

# For every model folder given: seeded inputs of the model's input shapes, and its outputs saved to
# OUT/<name>.npz. Run in a child process per backend (Keras picks its backend at import).
_PREDICT = """
import json, sys
from pathlib import Path
import numpy as np
import keras
from dicom_node.infer import load_card

out = Path(sys.argv[1])
for folder in map(Path, json.loads(sys.argv[2])):
    card = load_card(folder)
    model = keras.saving.load_model(folder / card.weights, compile=False)
    rng = np.random.default_rng(20251121)
    inputs = []
    for tensor in model.inputs:
        # two samples; an unknown length (a sequence model's tokens): 12
        shape = [2] + [12 if d is None else int(d) for d in tensor.shape[1:]]
        if "int" in str(tensor.dtype):
            inputs.append(rng.integers(1, 50, size=shape).astype(str(tensor.dtype)))
        else:
            inputs.append(rng.random(shape, dtype=np.float32))
    y = model.predict_on_batch(inputs if len(inputs) > 1 else inputs[0])
    np.savez(out / f"{card.name}.npz", output=np.asarray(y, dtype=np.float32),
             backend=keras.backend.backend())
"""


@pytest.fixture(scope="module")
def jax_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", _PREDICT, str(out), json.dumps([str(f) for f in FOLDERS])],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tensorflow_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tf")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(
        [sys.executable, "-c", _PREDICT, str(out), json.dumps([str(f) for f in FOLDERS])],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_every_shipped_model_is_checked() -> None:
    assert {f.name for f in FOLDERS} >= {"chest-xray-cnn", "head-ct-ich-cnn", "lung-nodule-unet",
                                        "ct-denoise-gan", "report-drafter"}


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_model_gives_the_same_outputs_on_jax_as_on_tensorflow(
    folder: Path, jax_outputs: Path, tensorflow_outputs: Path
) -> None:
    name = load_card(folder).name
    on_jax = np.load(jax_outputs / f"{name}.npz")
    on_tf = np.load(tensorflow_outputs / f"{name}.npz")

    assert str(on_jax["backend"]) == "jax" and str(on_tf["backend"]) == "tensorflow"
    assert on_jax["output"].shape == on_tf["output"].shape
    np.testing.assert_allclose(on_jax["output"], on_tf["output"], atol=ATOL, rtol=RTOL)
