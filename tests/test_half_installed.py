"""Installed without a Keras backend, ``serve`` and ``worker`` refuse to start when the config names
models, with ``doctor``'s message naming the extra to install, instead of starting workers whose
every job fails. The backend is missing for real in the started processes: ``KERAS_BACKEND``
names one that is not installed (torch), or a ``sitecustomize`` makes ``tensorflow`` unimportable
(``sys.modules["tensorflow"] = None`` is what Python shows for a missing module)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.chest_pacs import CHEST_MODEL, CHEST_ROUTE
from tests.support.peers import NodeProcess, wait_until

#: The refusal ends the process at once; a serve that started instead would not end at all.
REFUSAL_SECONDS = 60.0


def _no_tensorflow(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import tensorflow`` fails as if it were not installed."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text('import sys\nsys.modules["tensorflow"] = None\n')
    return {"PYTHONPATH": str(shim), "KERAS_BACKEND": "tensorflow"}


def _with_models(node_factory: Callable[..., NodeProcess], env: dict[str, str]) -> NodeProcess:
    return node_factory("serve", start=False, models=[CHEST_MODEL], routes=[CHEST_ROUTE],
                        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                       "port": 104}], env=env)


def _doctor_says(node: NodeProcess) -> str:
    """What ``dicom-node doctor`` says about the Keras backend in the node's environment."""
    done = node.cli("doctor", "--json")
    (check,) = [c for c in json.loads(done.stdout) if c["name"] == "keras backend"]
    assert check["status"] == "FAIL" and done.returncode == 1
    detail: str = check["detail"]
    return detail


def _refused(node: NodeProcess) -> str:
    """Start ``serve``, expect it to exit non-zero soon with no child started; its output."""
    node.start(wait=False)
    process = node.process
    assert process is not None
    wait_until(lambda: process.poll() is not None, REFUSAL_SECONDS, "serve to refuse to start")
    assert process.returncode == 1
    assert node.find_logs("process_started") == [] and node.find_logs("worker_started") == []
    (refused,) = node.find_logs("start_refused")
    assert refused["models"] == 1
    return node.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("backend_missing", ["KERAS_BACKEND=torch", "no tensorflow module"])
def test_serve_refuses_to_start_without_the_keras_backend_and_says_which_extra_to_install(
        node_factory: Callable[..., NodeProcess], tmp_path: Path, backend_missing: str) -> None:
    env = ({"KERAS_BACKEND": "torch"} if backend_missing == "KERAS_BACKEND=torch"
           else _no_tensorflow(tmp_path))
    node = _with_models(node_factory, env)
    doctor = _doctor_says(node)
    module = "torch" if env["KERAS_BACKEND"] == "torch" else "tensorflow"
    assert f"No module named '{module}'" in doctor
    assert "pip install 'dicom-node[cpu]'" in doctor and "'dicom-node[jax]'" in doctor

    output = _refused(node)
    assert f"error: cannot run the 1 configured model(s): {doctor}" in output


@pytest.mark.slow
def test_worker_refuses_to_start_without_the_keras_backend(
        node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = _with_models(node_factory, _no_tensorflow(tmp_path))
    node.write_config()
    done = node.cli("worker", "--name", "w1", timeout=REFUSAL_SECONDS)
    assert done.returncode == 1
    assert f"cannot run the 1 configured model(s): {_doctor_says(node)}" in done.stderr
    assert "worker_started" not in done.stdout + done.stderr


@pytest.mark.slow
def test_serve_without_models_starts_although_no_keras_backend_is_installed(
        node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory("serve", env={"KERAS_BACKEND": "torch"})  # waits until it listens
    node.wait_for_log("worker_started", timeout=60)
    assert node.find_logs("start_refused") == []
    assert node.stop() == 0
