"""The model card (``models/<name>/model.toml``): schema, loading and validation.

A card says what a model is (name, version, kind, manufacturer, intended use), what it takes
(``[input]``, ``[preprocessing]``), what it answers (``[[outputs]]``, coded), how it was made
(``[training]``) and how well it did (``[metrics]``). Cards of every kind share
:class:`ModelCard`; the part that depends on ``kind`` is a discriminated union on that key:

- ``classifier``  — :class:`ClassifierCard`: one probability per coded finding, with a threshold.
- ``segmenter``   — :class:`SegmenterCard`: one probability map per coded segment.
- ``enhancer``    — :class:`EnhancerCard`: an image in, an image (a derived series) out.
- ``report``      — :class:`ReportCard`: coded observations written into a report.

Only classifiers have a runtime so far (:func:`dicom_node.infer.runtime.classify`); the other
kinds validate so that their cards can be written and checked ahead of their runtimes.

A card that does not validate raises :class:`~dicom_node.errors.ConfigError` whose message names
the file and every offending key, e.g. ``models/x/model.toml: outputs[0].threshold: Input should
be less than or equal to 1``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.errors import ConfigError
from dicom_node.messages import CodedConcept, ModelIdentity

#: The file name of a model card inside its folder.
CARD_FILE = "model.toml"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SCHEME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")


def _check_name(value: str) -> str:
    if _NAME_RE.match(value) is None:
        raise ValueError(
            f"{value!r} is not a model name: use 1–64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _check_weights(value: str) -> str:
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or not value.strip():
        raise ValueError(f"{value!r} must be a file name inside the model's folder")
    return value


ModelName = Annotated[str, AfterValidator(_check_name)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Section):
    """A coded concept as written in a card: ``{ value, scheme, meaning }`` (PS3.3 §8.8)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str
    meaning: str = Field(min_length=1, max_length=64)

    @field_validator("scheme")
    @classmethod
    def _scheme_is_designator(cls, value: str) -> str:
        if _SCHEME_RE.match(value) is None:
            raise ValueError(f"{value!r} is not a coding scheme designator (e.g. SCT, DCM)")
        return value

    @model_validator(mode="after")
    def _sct_is_numeric(self) -> Code:
        if self.scheme == "SCT" and not (self.value.isdigit() and 6 <= len(self.value) <= 18):
            raise ValueError(f"SNOMED CT identifiers are 6–18 digits, got {self.value!r}")
        return self

    def concept(self) -> CodedConcept:
        """The code as the coded concept that results carry."""
        return CodedConcept(value=self.value, scheme=self.scheme, meaning=self.meaning)


class InputSpec(_Section):
    """``[input]``: the tensor the network takes, one image at a time (batch axis not counted)."""

    #: Rows and columns of the model's input.
    shape: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]]
    #: 1 for grey-scale models, 3 for colour models (grey images are repeated over 3 channels).
    channels: Literal[1, 3] = 1


class PreprocessingSpec(_Section):
    """``[preprocessing]``: how a DICOM image becomes the model's input (see infer.preprocess)."""

    #: "dataset": apply the Modality LUT/rescale, then the dataset's first VOI LUT or window.
    #: "modality": the Modality LUT/rescale only. Either way the result is min–max scaled to range.
    voi: Literal["dataset", "modality"] = "dataset"
    #: Invert MONOCHROME1 so that bright always means attenuating (as MONOCHROME2 displays).
    invert_monochrome1: bool = True
    #: "pad": scale to fit keeping the aspect ratio, centre, pad; "stretch": scale each axis.
    resize: Literal["pad", "stretch"] = "pad"
    #: Value of padded pixels, in the output range.
    pad_value: float = 0.0
    #: Output range of the normalised pixels [low, high].
    range: tuple[float, float] = (0.0, 1.0)
    #: Which frames of a multi-frame image are used: every frame, or the first only.
    frames: Literal["all", "first"] = "all"
    #: Frames taken at most from one multi-frame instance (evenly spaced when there are more).
    max_frames: Annotated[int, Field(ge=1, le=4096)] = 64
    #: Free text for people reading the card.
    description: str = ""

    @field_validator("range")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(value)}")
        return value


class ClassifierOutput(_Section):
    """One ``[[outputs]]`` entry of a classifier: a coded finding and its decision threshold."""

    name: ModelName
    code: Code
    threshold: Probability


class SegmentOutput(_Section):
    """One ``[[outputs]]`` entry of a segmenter: a coded segment and its binarisation threshold."""

    name: ModelName
    code: Code
    #: Segmented property category (PS3.16 CID 7150), e.g. SCT 49755003 "Morphologically abnormal".
    category: Code
    threshold: Probability = 0.5


class ReportOutput(_Section):
    """One ``[[outputs]]`` entry of a report model: a coded observation it may write."""

    name: ModelName
    code: Code


class TrainingInfo(_Section):
    """``[training]``: how the weights were made, enough to make them again."""

    data: str = Field(min_length=1)
    script: str = Field(min_length=1)
    seed: int
    epochs: Annotated[int, Field(ge=1)]
    train_samples: Annotated[int, Field(ge=1)]
    validation_samples: Annotated[int, Field(ge=0)] = 0
    test_samples: Annotated[int, Field(ge=0)] = 0
    #: Wall time of the run that produced the shipped weights, and where it ran.
    duration_seconds: Annotated[float, Field(ge=0)] | None = None
    hardware: str = ""
    framework: str = ""


class OutputMetrics(_Section):
    """Metrics of one output on the held-out split, at the card's threshold."""

    accuracy: Probability
    precision: Probability
    recall: Probability
    f1: Probability
    roc_auc: Probability
    positives: Annotated[int, Field(ge=0)]
    negatives: Annotated[int, Field(ge=0)]


class Metrics(_Section):
    """``[metrics]``: what was measured, on what, and per output."""

    split: str = Field(min_length=1)
    samples: Annotated[int, Field(ge=1)]
    per_output: dict[str, OutputMetrics] = Field(default_factory=dict)
    #: Notes people must read with the numbers (e.g. what the model said on a real image).
    notes: tuple[str, ...] = ()


class ModelCard(_Section):
    """What every card has, whatever its kind."""

    name: ModelName
    version: str = Field(min_length=1, max_length=64)
    kind: Literal["classifier", "segmenter", "enhancer", "report"]
    modalities: tuple[Annotated[str, Field(pattern=r"^[A-Z]{2,16}$")], ...] = Field(min_length=1)
    description: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    manufacturer: str = Field(min_length=1, max_length=64)
    weights: Annotated[str, AfterValidator(_check_weights)]
    synthetic_training_data: bool
    input: InputSpec
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    training: TrainingInfo | None = None
    metrics: Metrics | None = None
    #: The folder the card was read from (set by load_card; not a key of the file).
    folder: Path | None = Field(default=None, exclude=True)

    def identity(self) -> ModelIdentity:
        """What a result says about the model that made it."""
        return ModelIdentity(
            name=self.name,
            version=self.version,
            manufacturer=self.manufacturer,
            synthetic_training_data=self.synthetic_training_data,
            intended_use=self.intended_use,
        )

    @property
    def weights_path(self) -> Path:
        """The weights file (relative to the working directory if the card has no folder)."""
        return (self.folder or Path(".")) / self.weights


def _unique_names(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"output names must be unique; repeated: {', '.join(repeated)}")


class ClassifierCard(ModelCard):
    """A classifier: one sigmoid probability per output, in the order of ``outputs``."""

    kind: Literal["classifier"]
    outputs: tuple[ClassifierOutput, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _outputs_consistent(self) -> ClassifierCard:
        names = [o.name for o in self.outputs]
        _unique_names(names)
        if self.metrics is not None:
            unknown = sorted(set(self.metrics.per_output) - set(names))
            if unknown:
                raise ValueError(
                    f"metrics.per_output names outputs that do not exist: {', '.join(unknown)} "
                    f"(outputs: {', '.join(names)})"
                )
        return self


class SegmenterCard(ModelCard):
    """A segmenter: one probability map per output, channels last, in the order of ``outputs``."""

    kind: Literal["segmenter"]
    outputs: tuple[SegmentOutput, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _outputs_consistent(self) -> SegmenterCard:
        _unique_names([o.name for o in self.outputs])
        return self


class EnhancerCard(ModelCard):
    """An enhancer: an image in, an image of the same geometry out (a derived series)."""

    kind: Literal["enhancer"]
    #: Series Description of the derived series (it must say that it is AI-generated).
    series_description: str = Field(min_length=1, max_length=64)


class ReportCard(ModelCard):
    """A report model: coded observations written into a structured report."""

    kind: Literal["report"]
    outputs: tuple[ReportOutput, ...] = Field(min_length=1)


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
