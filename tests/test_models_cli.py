"""The model registry commands and doctor: an engineer adds a model with a folder and a config
entry, no code; the commands list, show and validate it; a card with a mistake is refused
naming the key; doctor says what is broken."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from dicom_node.cli import main

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "chest-xray-cnn"

CONFIG = """
[node]
data_dir = "var"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242

[[models]]
name = "chest-xray-cnn"
path = "{shipped}"

[[models]]
name = "{name}"
path = "models/{name}"

[[routes]]
name = "chest radiographs"
match = {{ Modality = ["CR", "DX"] }}
models = ["chest-xray-cnn", "{name}"]
send_to = ["pacs"]
"""


def add_model(root: Path, name: str, version: str, edit: tuple[str, str] | None = None) -> Path:
    """Copy the shipped model to root/models/<name> as another name and version (and edit it)."""
    folder = root / "models" / name
    shutil.copytree(MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    card = folder / "model.toml"
    text = card.read_text(encoding="utf-8")
    text = re.sub(r'^name = "chest-xray-cnn"$', f'name = "{name}"', text, count=1, flags=re.M)
    text = re.sub(r'^version = ".*"$', f'version = "{version}"', text, count=1, flags=re.M)
    if edit is not None:
        assert edit[0] in text, edit[0]
        text = text.replace(edit[0], edit[1], 1)
    card.write_text(text, encoding="utf-8")
    return folder


def write_config(root: Path, name: str) -> Path:
    path = root / "config.toml"
    path.write_text(CONFIG.format(shipped=MODEL_DIR, name=name), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_copied_model_with_a_config_entry_is_accepted_without_code_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_model(tmp_path, "my-cxr", "2.0.0-rc1")
    config = write_config(tmp_path, "my-cxr")
    code, out, err = run(capsys, "check-config", str(config))
    assert code == 0, err
    assert "2 models" in out
    code, out, err = run(capsys, "models", "validate", "--config", str(config), "--load")
    assert code == 0, err
    assert "my-cxr 2.0.0-rc1 (classifier)" in out
    assert "weights loaded: input (None, 128, 128, 1), output (None, 3)" in out
    code, out, err = run(capsys, "models", "validate", "my-cxr", "--config", str(config))
    assert code == 0, err


def test_models_list_shows_every_model_with_version_kind_and_card_state(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_model(tmp_path, "my-cxr", "2.0.0")
    add_model(tmp_path, "not-routed", "0.1")
    add_model(tmp_path, "broken", "0.1", ("threshold = 0.71", "threshold = 1.5"))
    # the config names my-cxr only; the models/ folder next to it holds three
    config = write_config(tmp_path, "my-cxr")
    code, out, err = run(capsys, "models", "list", "--config", str(config), "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == {"chest-xray-cnn", "my-cxr", "not-routed", "broken"}
    assert rows["my-cxr"] == {
        "name": "my-cxr", "version": "2.0.0", "kind": "classifier", "modalities": ["CR", "DX"],
        "synthetic_training_data": True, "configured": True,
        "path": str(tmp_path / "models" / "my-cxr"), "valid": True, "problems": []}
    assert rows["not-routed"]["configured"] is False and rows["not-routed"]["valid"]
    assert rows["broken"]["valid"] is False
    assert "outputs[0].threshold" in rows["broken"]["problems"][0]

    code, out, _ = run(capsys, "models", "--config", str(config))
    assert code == 0
    assert re.search(r"^my-cxr\s+2\.0\.0\s+classifier\s+CR,DX\s+yes\s+yes\s+valid\s", out, re.M)
    assert re.search(r"^broken\s.*INVALID", out, re.M)
    assert "not in the config's [[models]] (no route can use them yet): not-routed" in out


def test_models_list_without_a_config_scans_the_given_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    add_model(tmp_path, "my-cxr", "2.0.0")
    monkeypatch.chdir(tmp_path)  # no config.toml here
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    code, out, err = run(capsys, "models", "list", "--dir", str(tmp_path / "models"))
    assert code == 0, err
    assert re.search(r"^my-cxr\s+2\.0\.0\s.*\sno\s+valid\s", out, re.M)
    code, _, err = run(capsys, "models", "list")
    assert code == 1
    assert "no config file found and no --dir given" in err


def test_a_card_with_a_mistake_is_refused_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_model(tmp_path, "my-cxr", "2.0.0", ("scheme = \"SCT\"", "scheme = \"SNOMED CT\""))
    config = write_config(tmp_path, "my-cxr")
    code, _, err = run(capsys, "models", "validate", "my-cxr", "--config", str(config))
    assert code == 2
    assert "models[my-cxr]:" in err
    assert "model.toml: outputs[0].code.scheme: " in err
    assert "is not a coding scheme designator" in err
    code, _, err = run(capsys, "check-config", str(config))
    assert code == 2 and "outputs[0].code.scheme" in err
    # the same card given by its path
    code, _, err = run(capsys, "models", "validate", str(tmp_path / "models" / "my-cxr"))
    assert code == 2 and "outputs[0].code.scheme" in err


def test_an_unknown_key_and_a_missing_weights_file_are_named_without_a_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config.toml here: a folder given by path needs none
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    folder = add_model(tmp_path, "typo", "1", ("threshold = 0.71", "treshold = 0.71"))
    code, _, err = run(capsys, "models", "validate", str(folder))
    assert code == 2
    assert "outputs[0].treshold: unknown key" in err
    folder = add_model(tmp_path, "no-weights", "1")
    (folder / "model.keras").unlink()
    code, _, err = run(capsys, "models", "validate", str(folder))
    assert code == 2
    assert "weights: file 'model.keras' not found" in err


def test_a_card_named_differently_from_its_config_entry_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = add_model(tmp_path, "my-cxr", "2.0.0")
    card = folder / "model.toml"
    card.write_text(card.read_text(encoding="utf-8").replace(
        'name = "my-cxr"', 'name = "other-name"', 1), encoding="utf-8")
    config = write_config(tmp_path, "my-cxr")
    code, _, err = run(capsys, "models", "validate", "--config", str(config))
    assert code == 2
    assert "name: the card is named 'other-name'" in err


def test_models_show_prints_intended_use_codes_thresholds_and_metrics(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "models", "show", str(MODEL_DIR))
    assert code == 0, err
    assert out.startswith("chest-xray-cnn 1.0.0 — classifier, CR, DX")
    assert "DEMONSTRATION ONLY — NOT FOR CLINICAL USE" in out
    assert re.search(r"^pulmonary_nodule\s+SCT 786838002\s+Pulmonary nodule\s+0\.38$", out, re.M)
    assert re.search(r"^cardiomegaly\s+0\.9900\s+0\.9878\s+0\.9851\s+0\.9864\s+0\.9997\s+738\s+"
                     r"1262$", out, re.M)
    assert "training: train.py, seed 20250117, 12 epochs" in out
    code, out, _ = run(capsys, "models", "show", str(MODEL_DIR), "--json")
    shown = json.loads(out)
    assert shown["outputs"][0]["code"] == {"value": "8186001", "scheme": "SCT",
                                           "meaning": "Cardiomegaly"}
    assert shown["metrics"]["per_output"]["pleural_effusion"]["roc_auc"] == 0.9982


def test_an_unknown_model_name_lists_the_known_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_model(tmp_path, "my-cxr", "2.0.0")
    config = write_config(tmp_path, "my-cxr")
    code, _, err = run(capsys, "models", "show", "nope", "--config", str(config))
    assert code == 1
    assert "no model named 'nope' (known: chest-xray-cnn, my-cxr)" in err


def test_doctor_passes_on_a_valid_config_and_loads_the_weights(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_model(tmp_path, "my-cxr", "2.0.0")
    config = write_config(tmp_path, "my-cxr")
    code, out, err = run(capsys, "doctor", "--config", str(config), "--load", "--json")
    assert code == 0, out + err
    checks = {c["name"]: c for c in json.loads(out)}
    assert {"python", "packages", "keras backend", "devices", "config", "database", "data_dir",
            "disk", "dcmtk, dicom3tools", "model chest-xray-cnn", "model my-cxr"} <= set(checks)
    assert all(c["status"] != "FAIL" for c in checks.values())
    assert "CPU" in checks["devices"]["detail"] or "GPU" in checks["devices"]["detail"]
    assert "keras 3." in checks["keras backend"]["detail"]
    assert "weights loaded" in checks["model my-cxr"]["detail"]
    assert "not created yet" in checks["database"]["detail"]
    assert not (tmp_path / "var").exists(), "doctor must not create the data folder"


def test_doctor_fails_naming_a_broken_model_and_an_unreachable_database(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_model(tmp_path, "my-cxr", "2.0.0", ("threshold = 0.71", "threshold = -1"))
    config = write_config(tmp_path, "my-cxr")
    (tmp_path / "var").write_text("a file where the data folder should be")
    code, out, _ = run(capsys, "doctor", "--config", str(config))
    assert code == 1
    assert re.search(r"^\[FAIL\] model my-cxr\s.*outputs\[0\]\.threshold", out, re.M)
    assert re.search(r"^\[ ok \] model chest-xray-cnn\s", out, re.M)
    assert re.search(r"^\[FAIL\] (database|data_dir)\s", out, re.M)
    assert re.search(r"^\d+ failed, \d+ warning\(s\), \d+ ok$", out, re.M)
