"""The model card (``models/<name>/model.toml``): schema, loading and validation.

A card says what a model is (name, version, kind, manufacturer, intended use), what it takes
(``[input]``, ``[preprocessing]``), what it answers (``[[outputs]]``, coded), how it was made
(``[training]``) and how well it did (``[metrics]``). Cards of every kind share
:class:`ModelCard`; the part that depends on ``kind`` is a discriminated union on that key:

- ``classifier``  — :class:`ClassifierCard`: one probability per coded finding, with a threshold.
- ``segmenter``   — :class:`SegmenterCard`: one probability map per coded segment; its
  ``[segmentation]`` says how slices are resampled and stacked (2.5-D) and which regions are
  kept, its ``[metrics]`` give Dice, detection and volume error per segment (runtime:
  :mod:`dicom_node.infer.segment`).
- ``enhancer``    — :class:`EnhancerCard`: an image in, an image (a derived series) out; its
  ``[enhancement]`` says how modality values are scaled and tiled, its ``[metrics]`` give PSNR
  and SSIM of input and output per held-out set (runtime: :mod:`dicom_node.infer.enhance`).
- ``report``      — :class:`ReportCard`: coded observations written into a report.

Runtimes: :func:`dicom_node.infer.runtime.classify` for classifiers, and the modules named
above; a card validates on its own, so that it can be written and checked ahead of a runtime.

A card that does not validate raises :class:`~dicom_node.errors.ConfigError` whose message names
the file and every offending key, e.g. ``models/x/model.toml: outputs[0].threshold: Input should
be less than or equal to 1``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
)

from dicom_node.errors import ConfigError
from dicom_node.infer.card_kinds import (
    ClassifierCard,
    ConsistencyRates,
    DecodingSpec,
    EnhancementSpec,
    EnhancerCard,
    EnhancerMetrics,
    ImageQuality,
    ReportCard,
    ReportEvaluation,
    SegmentationSpec,
    SegmenterCard,
    SegmenterMetrics,
    SegmentMetrics,
    TextInputSpec,
    TextMetrics,
)
from dicom_node.infer.card_schema import (
    CARD_FILE,
    ClassifierOutput,
    Code,
    InputSpec,
    Metrics,
    ModelCard,
    ModelName,
    OutputMetrics,
    PreprocessingSpec,
    Probability,
    ReportOutput,
    Section,
    SegmentOutput,
    TrainingInfo,
    Window,
)

AnyCard = Annotated[
    ClassifierCard | SegmenterCard | EnhancerCard | ReportCard, Field(discriminator="kind")
]
_CARD_ADAPTER: TypeAdapter[ClassifierCard | SegmenterCard | EnhancerCard | ReportCard] = (
    TypeAdapter(AnyCard)
)
_KINDS = ("classifier", "segmenter", "enhancer", "report")


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        parts = list(err["loc"])
        if parts and parts[0] in _KINDS:
            parts = parts[1:]  # the discriminated union's tag is not a key of the file
        loc = ""
        for part in parts:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (not part of the model card schema; check the spelling)"
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = "kind"
            message = f"must be one of {', '.join(_KINDS)}"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        lines.append(f"{origin}: {loc or '(top level)'}: {message}")
    return "\n".join(lines)


def parse_card(raw: dict[str, object], origin: str, folder: Path | None = None) -> ModelCard:
    """Validate an already-parsed card table; raise ConfigError naming each bad key."""
    if "folder" in raw:
        raise ConfigError(f"{origin}: folder: unknown key (not part of the model card schema)")
    try:
        card = _CARD_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None
    return card.model_copy(update={"folder": folder})


def load_card(folder: Path) -> ModelCard:
    """Read and validate ``folder/model.toml``; check that its weights file exists.

    Raises ConfigError whose message starts with the card's path and names the offending key.
    """
    path = Path(folder) / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the model card: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    card = parse_card(raw, origin=str(path), folder=Path(folder))
    if not card.weights_path.is_file():
        raise ConfigError(
            f"{path}: weights: file {card.weights!r} not found in {Path(folder)}"
        )
    return card


#: Everything the rest of the code imports from here (the schema lives in card_schema and
#: card_kinds).
__all__ = [
    "CARD_FILE",
    "AnyCard",
    "ClassifierCard",
    "ClassifierOutput",
    "Code",
    "ConsistencyRates",
    "DecodingSpec",
    "EnhancementSpec",
    "EnhancerCard",
    "EnhancerMetrics",
    "ImageQuality",
    "InputSpec",
    "Metrics",
    "ModelCard",
    "ModelName",
    "OutputMetrics",
    "PreprocessingSpec",
    "Probability",
    "ReportCard",
    "ReportEvaluation",
    "ReportOutput",
    "Section",
    "SegmentMetrics",
    "SegmentOutput",
    "SegmentationSpec",
    "SegmenterCard",
    "SegmenterMetrics",
    "TextInputSpec",
    "TextMetrics",
    "TrainingInfo",
    "Window",
    "load_card",
    "parse_card",
]
