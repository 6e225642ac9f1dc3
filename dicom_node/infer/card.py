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

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

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


class Window(_Section):
    """One ``[[preprocessing.windows]]`` entry: a fixed window in modality units (HU for CT).

    Values from ``center - width / 2`` to ``center + width / 2`` map linearly onto the card's
    ``range``; values outside are clipped to its ends.
    """

    #: A label for people (e.g. "brain", "subdural", "bone"); not used by the code.
    name: str = ""
    center: float
    width: Annotated[float, Field(gt=0)]


class PreprocessingSpec(_Section):
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
        if not value[0] < value[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _windows_only_with_window(self) -> PreprocessingSpec:
        if self.voi == "window" and not self.windows:
            raise ValueError(
                'voi = "window" needs windows, e.g. windows = [{ center = 40, width = 80 }]'
            )
        if self.voi != "window" and self.windows:
            raise ValueError(f'windows are used only with voi = "window", not {self.voi!r}')
        return self


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
    """One ``[[outputs]]`` entry of a report model: a coded observation it may write.

    ``name`` selects the observation's phrase lexicon in :mod:`dicom_node.infer.report_check` (the
    consistency check finds mentions of it in the text with that lexicon).
    """

    name: ModelName
    code: Code
    #: Other codes that other models use for the same observation (e.g. SCT 27925004 "Nodule"
    #: for SCT 786838002 "Pulmonary nodule").
    aliases: tuple[Code, ...] = ()


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


def _unique_names(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"output names must be unique; repeated: {', '.join(repeated)}")


def _check_output_names(names: list[str], metrics: Any) -> None:
    """Output names are unique, and the card's per-output metrics name only real outputs."""
    _unique_names(names)
    if metrics is not None:
        unknown = sorted(set(metrics.per_output) - set(names))
        if unknown:
            raise ValueError(
                f"metrics.per_output names outputs that do not exist: {', '.join(unknown)} "
                f"(outputs: {', '.join(names)})"
            )


class ClassifierCard(ModelCard):
    """A classifier: one sigmoid probability per output, in the order of ``outputs``."""

    kind: Literal["classifier"]
    outputs: tuple[ClassifierOutput, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _outputs_consistent(self) -> ClassifierCard:
        _check_output_names([o.name for o in self.outputs], self.metrics)
        return self


class SegmentationSpec(_Section):
    """``[segmentation]`` of a segmenter: how a series becomes the network's input and its
    probability maps become measured regions (see :mod:`dicom_node.infer.segment`).

    The window is ``[preprocessing]``'s (``voi = "window"``, one window).
    """

    #: In-plane pixel size (mm) slices are resampled to; the network sees a field of
    #: ``input.shape`` × this, centred on the image centre.
    pixel_spacing_mm: Annotated[float, Field(gt=0, le=50)] = 2.5
    #: Neighbouring planes on each side given as extra channels (2.5-D):
    #: ``input.channels = 2 × context_slices + 1``.
    context_slices: Annotated[int, Field(ge=0, le=1)] = 0
    #: Where the neighbouring planes are: 0 = the adjacent slices; > 0 = planes interpolated
    #: (linearly, between the two nearest slices) at ± this distance (mm) along the normal, so
    #: that the network sees the same anatomy whatever the slice spacing.
    context_mm: Annotated[float, Field(ge=0, le=100)] = 0.0
    #: 3-D connected regions smaller than this (mm³) are dropped.
    min_region_volume_mm3: Annotated[float, Field(ge=0)] = 0.0
    #: A series with fewer frames than this is refused.
    min_slices: Annotated[int, Field(ge=1, le=4096)] = 1
    description: str = ""


class SegmentMetrics(_Section):
    """One segment on held-out volumes, at the card's threshold, through infer.segment."""

    #: Mean Dice over the volumes whose reference has the segment (what ``dicom-node evaluate``
    #: reports as "mean Dice (reference not empty)").
    dice: Probability
    #: Mean Dice over every volume (both empty scores 1).
    dice_all_volumes: Probability
    volumes: Annotated[int, Field(ge=1)]
    volumes_with_reference: Annotated[int, Field(ge=0)]
    #: Reference regions (e.g. nodules); one counts as detected when a predicted region
    #: overlaps it.
    regions: Annotated[int, Field(ge=0)]
    detection_sensitivity: Probability
    #: Predicted regions that overlap no reference region, per volume.
    false_positives_per_volume: Annotated[float, Field(ge=0)]
    #: Detected regions: median of |measured − true| / true volume, and the signed median (%).
    volume_error_median_abs_percent: Annotated[float, Field(ge=0)]
    volume_error_median_percent: float
    #: Sensitivity per band of reference diameter, e.g. { "3-6 mm" = 0.41 }.
    sensitivity_by_diameter: dict[str, Probability] = Field(default_factory=dict)


class SegmenterMetrics(Metrics):
    """``[metrics]`` of a segmenter: per output (segment) name."""

    per_output: dict[str, SegmentMetrics] = Field(  # type: ignore[assignment]
        default_factory=dict)


class SegmenterCard(ModelCard):
    """A segmenter: one probability map per output, channels last, in the order of ``outputs``."""

    kind: Literal["segmenter"]
    outputs: tuple[SegmentOutput, ...] = Field(min_length=1)
    segmentation: SegmentationSpec = SegmentationSpec()
    metrics: SegmenterMetrics | None = None

    @model_validator(mode="after")
    def _outputs_consistent(self) -> SegmenterCard:
        _check_output_names([o.name for o in self.outputs], self.metrics)
        channels = 2 * self.segmentation.context_slices + 1
        if self.input.channels != channels:
            raise ValueError(
                f"input.channels is {self.input.channels}, but segmentation.context_slices = "
                f"{self.segmentation.context_slices} gives {channels} channel(s) "
                "(the slice and its neighbours)"
            )
        return self


class EnhancementSpec(_Section):
    """``[enhancement]`` of an enhancer: how modality values become the network's input and back
    (see :mod:`dicom_node.infer.enhance`).

    The network is run on tiles of the card's ``input.shape`` cut from the image (any matrix
    size), neighbours sharing ``tile_overlap`` pixels that are blended with a linear ramp.
    """

    #: Modality values (Rescale Slope/Intercept applied; HU for CT) clipped to [low, high]
    #: before the network. Pixels outside the range, and padding pixels, keep their source value.
    value_range: tuple[float, float] = (-1024.0, 3071.0)
    #: Network input = (value - offset) / scale; its output is mapped back the same way.
    offset: float = 0.0
    scale: Annotated[float, Field(gt=0)] = 1000.0
    #: Pixels that neighbouring tiles share (less than half the tile).
    tile_overlap: Annotated[int, Field(ge=0, le=4096)] = 16
    #: Free text for people reading the card.
    description: str = ""

    @field_validator("value_range")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"value_range must be [low, high] with low < high, got {list(value)}")
        return value


class ImageQuality(_Section):
    """An enhancer on one held-out set: its input and its output against the clean reference."""

    #: What the set is (images, how the degraded input was made, the pixels measured).
    description: str = Field(min_length=1)
    samples: Annotated[int, Field(ge=1)]
    psnr_input_db: float
    psnr_output_db: float
    ssim_input: Annotated[float, Field(ge=-1.0, le=1.0)]
    ssim_output: Annotated[float, Field(ge=-1.0, le=1.0)]


class EnhancerMetrics(Metrics):
    """``[metrics]`` of an enhancer: image quality per held-out set (e.g. synthetic, real)."""

    image_quality: dict[str, ImageQuality] = Field(default_factory=dict)


class EnhancerCard(ModelCard):
    """An enhancer: an image in, an image of the same geometry out (a derived series)."""

    kind: Literal["enhancer"]
    #: Series Description of the derived series (it must say that it is AI-generated).
    series_description: str = Field(min_length=1, max_length=64)
    enhancement: EnhancementSpec = EnhancementSpec()
    metrics: EnhancerMetrics | None = None

    @model_validator(mode="after")
    def _overlap_fits_tile(self) -> EnhancerCard:
        if 2 * self.enhancement.tile_overlap >= min(self.input.shape):
            raise ValueError(
                f"enhancement.tile_overlap {self.enhancement.tile_overlap} must be less than half "
                f"the tile (input.shape {list(self.input.shape)})"
            )
        return self


class TextInputSpec(_Section):
    """``[input]`` of a report model: token sequences, not images.

    The source is the token sequence built from the route's findings and the study's context;
    the target is the report text the decoder writes (see dicom_node.infer.report).
    """

    #: Files in the model's folder, one token per line; the line number is the token id.
    source_vocabulary: Annotated[str, AfterValidator(_check_weights)]
    target_vocabulary: Annotated[str, AfterValidator(_check_weights)]
    #: Longest source sequence the model takes (longer inputs are refused, not cut).
    max_source_tokens: Annotated[int, Field(ge=8, le=4096)]
    #: Most tokens the decoder writes before it is stopped.
    max_target_tokens: Annotated[int, Field(ge=8, le=4096)]


class DecodingSpec(_Section):
    """``[decoding]`` of a report model."""

    #: Greedy decoding: the most probable token at each step (deterministic).
    strategy: Literal["greedy"] = "greedy"
    description: str = ""


class TextMetrics(_Section):
    """Similarity of the generated text to the held-out references."""

    #: Corpus BLEU (0–100) and how it was computed (library, tokenisation, references).
    bleu: Annotated[float, Field(ge=0.0, le=100.0)]
    #: Mean ROUGE-L F-measure (0–1) against the best-matching reference.
    rouge_l: Probability
    references_per_case: Annotated[int, Field(ge=1)]
    method: str = Field(min_length=1)


class ConsistencyRates(_Section):
    """Clinical consistency of report texts with the findings they were drafted from."""

    #: Share of cases in which every positive finding is affirmed and none is negated.
    cases_all_positives_mentioned: Probability
    #: Share of cases in which no finding that the models reported absent is asserted.
    cases_no_absent_asserted: Probability
    #: Share of cases that mention no observation that no model reported.
    cases_no_unsupported_statement: Probability
    #: Share of cases in which no sentence mixes the values (size, volume, location) of two
    #: findings and every itemised finding with values is described.
    cases_values_attributed: Probability
    #: The same, counted per finding instead of per case.
    positive_findings_mentioned: Probability
    absent_findings_not_asserted: Probability


class ReportEvaluation(_Section):
    """``[evaluation]`` of a report model, on held-out cases."""

    split: str = Field(min_length=1)
    samples: Annotated[int, Field(ge=1)]
    positive_findings: Annotated[int, Field(ge=0)]
    absent_findings: Annotated[int, Field(ge=0)]
    text: TextMetrics
    #: The model's own text, before the consistency check.
    before_check: ConsistencyRates
    #: The text that is sent, after the check removed and added sentences.
    after_check: ConsistencyRates
    #: The mention extractor run on the reference texts (whose labels are known).
    extractor_on_references: ConsistencyRates
    #: Share of cases in which the check changed the model's text.
    cases_repaired: Probability
    #: The check on model text that does not fit the findings: each case's findings with the
    #: draft the model wrote for another case (what a model that ignores its input would send).
    stress_before_check: ConsistencyRates | None = None
    stress_after_check: ConsistencyRates | None = None
    notes: tuple[str, ...] = ()


class ReportCard(ModelCard):
    """A report model: a sequence model that drafts report text from other models' findings."""

    kind: Literal["report"]
    #: A report model reads tokens, not images; its ``[input]`` says how (the image kinds'
    #: InputSpec does not apply).
    input: TextInputSpec  # type: ignore[assignment]
    outputs: tuple[ReportOutput, ...] = Field(min_length=1)
    decoding: DecodingSpec = DecodingSpec()
    evaluation: ReportEvaluation | None = None

    @model_validator(mode="after")
    def _outputs_unique(self) -> ReportCard:
        _unique_names([o.name for o in self.outputs])
        return self


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
