"""Model cards: the shipped card loads; a card with a mistake is refused naming the key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from dicom_node.infer.card import (
    ClassifierCard,
    SegmenterCard,
    load_card,
    parse_card,
)

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "chest-xray-cnn"
CARD_TEXT = (MODEL_DIR / "model.toml").read_text(encoding="utf-8")


def card_folder(tmp_path: Path, text: str, weights: bool = True) -> Path:
    """A model folder with ``text`` as its model.toml (and an empty weights file)."""
    folder = tmp_path / "cxr"
    folder.mkdir()
    (folder / "model.toml").write_text(text, encoding="utf-8")
    if weights:
        (folder / "model.keras").write_bytes(b"")
    return folder


def replace_once(text: str, pattern: str, new: str) -> str:
    changed, count = re.subn(pattern, new, text, count=1, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} not in the card"
    return changed


def test_shipped_card_loads_as_a_classifier_with_its_codes() -> None:
    card = load_card(MODEL_DIR)
    assert isinstance(card, ClassifierCard)
    assert [(o.name, o.code.scheme, o.code.value) for o in card.outputs] == [
        ("cardiomegaly", "SCT", "8186001"),
        ("pleural_effusion", "SCT", "60046008"),
        ("pulmonary_nodule", "SCT", "786838002"),
    ]
    assert card.modalities == ("CR", "DX")
    assert card.weights_path == MODEL_DIR / "model.keras"
    assert card.metrics is not None
    assert set(card.metrics.per_output) == {o.name for o in card.outputs}


def test_shipped_card_says_it_is_synthetic_and_not_for_clinical_use() -> None:
    identity = load_card(MODEL_DIR).identity()
    assert identity.name == "chest-xray-cnn"
    assert identity.synthetic_training_data is True
    assert "NOT FOR CLINICAL USE" in identity.intended_use


def test_threshold_above_one_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    folder = card_folder(tmp_path, replace_once(CARD_TEXT, r"^threshold = .*$", "threshold = 1.5"))
    with pytest.raises(ConfigError) as caught:
        load_card(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'model.toml'}: outputs[0].threshold: ")
    assert "less than or equal to 1" in message


def test_misspelt_key_is_refused_as_unknown(tmp_path: Path) -> None:
    text = replace_once(CARD_TEXT, r"^threshold = ", "thresold = ")
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.thresold: unknown key"):
        load_card(card_folder(tmp_path, text))


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.toml: weights: file 'model\.keras' not found"):
        load_card(card_folder(tmp_path, CARD_TEXT, weights=False))


def test_weights_outside_the_model_folder_are_refused(tmp_path: Path) -> None:
    text = replace_once(CARD_TEXT, r'^weights = .*$', 'weights = "../other/model.keras"')
    with pytest.raises(ConfigError, match=r"weights: '\.\./other/model\.keras' must be a file"):
        load_card(card_folder(tmp_path, text))


def test_unknown_kind_is_refused_naming_the_allowed_kinds(tmp_path: Path) -> None:
    text = replace_once(CARD_TEXT, r'^kind = .*$', 'kind = "detector"')
    with pytest.raises(ConfigError, match=r"kind: must be one of classifier, segmenter"):
        load_card(card_folder(tmp_path, text))


def test_snomed_code_that_is_not_numeric_is_refused(tmp_path: Path) -> None:
    text = replace_once(CARD_TEXT, r'value = "8186001"', 'value = "cardio-1"')
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.code: SNOMED CT identifiers"):
        load_card(card_folder(tmp_path, text))


def test_metrics_for_an_output_that_does_not_exist_are_refused(tmp_path: Path) -> None:
    text = CARD_TEXT.replace("[metrics.per_output.pulmonary_nodule]",
                             "[metrics.per_output.pneumothorax]")
    with pytest.raises(ConfigError, match=r"metrics\.per_output names outputs that do not "
                                          r"exist: pneumothorax"):
        load_card(card_folder(tmp_path, text))


def test_card_that_is_not_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = card_folder(tmp_path, CARD_TEXT + "\nthis is not toml\n")
    with pytest.raises(ConfigError, match=r"model\.toml: not valid TOML"):
        load_card(folder)


def test_missing_card_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.toml: cannot read the model card"):
        load_card(tmp_path)


def test_every_mistake_is_reported_at_once(tmp_path: Path) -> None:
    text = replace_once(CARD_TEXT, r"^threshold = .*$", "threshold = -1")
    text = replace_once(text, r"^channels = 1$", "channels = 2")
    with pytest.raises(ConfigError) as caught:
        load_card(card_folder(tmp_path, text))
    assert "input.channels" in str(caught.value)
    assert "outputs[0].threshold" in str(caught.value)


def test_segmenter_card_validates_with_its_own_outputs() -> None:
    """Kinds other than classifier already have a schema (their runtimes come later)."""
    card = parse_card(
        {
            "name": "lung-seg", "version": "0.1", "kind": "segmenter", "modalities": ["CT"],
            "description": "d", "intended_use": "demo", "manufacturer": "m",
            "weights": "model.keras", "synthetic_training_data": True,
            "input": {"shape": [256, 256]},
            "outputs": [{
                "name": "nodule",
                "code": {"value": "786838002", "scheme": "SCT", "meaning": "Pulmonary nodule"},
                "category": {"value": "49755003", "scheme": "SCT",
                             "meaning": "Morphologically abnormal structure"},
            }],
        },
        origin="lung-seg/model.toml",
    )
    assert isinstance(card, SegmenterCard)
    assert card.outputs[0].threshold == 0.5


def test_card_copied_with_its_weights_loads_from_anywhere(tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    card = load_card(folder)
    assert card.folder == folder
    assert card.weights_path.is_file()
