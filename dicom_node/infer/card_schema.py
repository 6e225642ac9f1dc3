"""The model card's shared schema: the sections every kind of card has, and :class:`ModelCard`.

The kinds (classifier, segmenter, enhancer, report) extend :class:`ModelCard` in
:mod:`dicom_node.infer.card_kinds`; :mod:`dicom_node.infer.card` reads and validates a card file
and is where the rest of the code imports all of them from.
"""


from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

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


def check_file_name(value: str) -> str:
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or not value.strip():
        raise ValueError(f"{value!r} must be a file name inside the model's folder")
    return value


def check_increasing(value: tuple[float, float], key: str) -> tuple[float, float]:
    """A [low, high] pair of a card with low < high; ValueError naming ``key`` otherwise."""
    if not value[0] < value[1]:
        raise ValueError(f"{key} must be [low, high] with low < high, got {list(value)}")
    return value


ModelName = Annotated[str, AfterValidator(_check_name)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(Section):
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


class InputSpec(Section):
    """``[input]``: the tensor the network takes, one image at a time (batch axis not counted)."""

    #: Rows and columns of the model's input.
    shape: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]]
    #: 1 for grey-scale models, 3 for colour models (grey images are repeated over 3 channels).
    channels: Literal[1, 3] = 1


class Window(Section):
    """One ``[[preprocessing.windows]]`` entry: a fixed window in modality units (HU for CT).

    Values from ``center - width / 2`` to ``center + width / 2`` map linearly onto the card's
    ``range``; values outside are clipped to its ends.
    """

    #: A label for people (e.g. "brain", "subdural", "bone"); not used by the code.
    name: str = ""
    center: float
    width: Annotated[float, Field(gt=0)]


class PreprocessingSpec(Section):
    """``[preprocessing]``: how a DICOM image becomes the model's input (see infer.preprocess)."""

    #: "dataset": apply the Modality LUT/rescale, then the dataset's first VOI LUT or window.
    #: "modality": the Modality LUT/rescale only. Either way the result is min–max scaled to range.
    #: "window": the Modality LUT/rescale, then the card's fixed ``windows`` (no min–max), one
    #: channel per window.
    voi: Literal["dataset", "modality", "window"] = "dataset"
    #: The fixed windows of ``voi = "window"``, in modality units (HU for CT), in channel order.
    windows: tuple[Window, ...] = ()
    #: Invert MONOCHROME1 so that bright always means attenuating (as MONOCHROME2 displays).
    #: Not used with ``voi = "window"``: a window acts on modality values (HU), whose meaning
    #: does not depend on how they are displayed.
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
    #: Images whose Image Type (0008,0008) has one of these values are not used, e.g.
    #: ["LOCALIZER"] keeps the scout of a CT study out of a classifier's study-level maximum.
    exclude_image_types: tuple[Annotated[str, Field(pattern=r"^[A-Z0-9_ ]{1,16}$")], ...] = ()
    #: Free text for people reading the card.
    description: str = ""

    @field_validator("range")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        return check_increasing(value, "range")

    @model_validator(mode="after")
    def _windows_only_with_window(self) -> PreprocessingSpec:
        if self.voi == "window" and not self.windows:
            raise ValueError(
                'voi = "window" needs windows, e.g. windows = [{ center = 40, width = 80 }]'
            )
        if self.voi != "window" and self.windows:
            raise ValueError(f'windows are used only with voi = "window", not {self.voi!r}')
        return self


class ClassifierOutput(Section):
    """One ``[[outputs]]`` entry of a classifier: a coded finding and its decision threshold."""

    name: ModelName
    code: Code
    threshold: Probability


class SegmentOutput(Section):
    """One ``[[outputs]]`` entry of a segmenter: a coded segment and its binarisation threshold."""

    name: ModelName
    code: Code
    #: Segmented property category (PS3.16 CID 7150), e.g. SCT 49755003 "Morphologically abnormal".
    category: Code
    threshold: Probability = 0.5


class ReportOutput(Section):
    """One ``[[outputs]]`` entry of a report model: a coded observation it may write.

    ``name`` selects the observation's phrase lexicon in :mod:`dicom_node.infer.report_check` (the
    consistency check finds mentions of it in the text with that lexicon).
    """

    name: ModelName
    code: Code
    #: Other codes that other models use for the same observation (e.g. SCT 27925004 "Nodule"
    #: for SCT 786838002 "Pulmonary nodule").
    aliases: tuple[Code, ...] = ()


class TrainingInfo(Section):
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


class OutputMetrics(Section):
    """Metrics of one output on the held-out split, at the card's threshold."""

    accuracy: Probability
    precision: Probability
    recall: Probability
    f1: Probability
    roc_auc: Probability
    positives: Annotated[int, Field(ge=0)]
    negatives: Annotated[int, Field(ge=0)]


class Metrics(Section):
    """``[metrics]``: what was measured, on what, and per output."""

    split: str = Field(min_length=1)
    samples: Annotated[int, Field(ge=1)]
    per_output: dict[str, OutputMetrics] = Field(default_factory=dict)
    #: Notes people must read with the numbers (e.g. what the model said on a real image).
    notes: tuple[str, ...] = ()


class ModelCard(Section):
    """What every card has, whatever its kind."""

    name: ModelName
    version: str = Field(min_length=1, max_length=64)
    kind: Literal["classifier", "segmenter", "enhancer", "report"]
    modalities: tuple[Annotated[str, Field(pattern=r"^[A-Z]{2,16}$")], ...] = Field(min_length=1)
    description: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    manufacturer: str = Field(min_length=1, max_length=64)
    weights: Annotated[str, AfterValidator(check_file_name)]
    synthetic_training_data: bool
    input: InputSpec
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    training: TrainingInfo | None = None
    metrics: Metrics | None = None
    #: The folder the card was read from (set by load_card; not a key of the file).
    folder: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _windows_fit_channels(self) -> ModelCard:
        n_windows = len(self.preprocessing.windows)
        if n_windows > 1 and n_windows != self.input.channels:
            raise ValueError(
                f"preprocessing.windows: {n_windows} windows give {n_windows} channels, but "
                f"input.channels is {self.input.channels} (give one window, repeated over the "
                "channels, or one window per channel)"
            )
        return self

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


def unique_names(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"output names must be unique; repeated: {', '.join(repeated)}")


def check_output_names(names: list[str], metrics: Any) -> None:
    """Output names are unique, and the card's per-output metrics name only real outputs."""
    unique_names(names)
    if metrics is not None:
        unknown = sorted(set(metrics.per_output) - set(names))
        if unknown:
            raise ValueError(
                f"metrics.per_output names outputs that do not exist: {', '.join(unknown)} "
                f"(outputs: {', '.join(names)})"
            )
