"""The four kinds of model card, each a :class:`~dicom_node.infer.card_schema.ModelCard` with
the sections its runtime needs (see :mod:`dicom_node.infer.card` for what each kind is)."""


from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from dicom_node.infer.card_schema import (
    ClassifierOutput,
    Metrics,
    ModelCard,
    Probability,
    ReportOutput,
    Section,
    SegmentOutput,
    check_file_name,
    check_increasing,
    check_output_names,
    unique_names,
)


class ClassifierCard(ModelCard):
    """A classifier: one sigmoid probability per output, in the order of ``outputs``."""

    kind: Literal["classifier"]
    outputs: tuple[ClassifierOutput, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _outputs_consistent(self) -> ClassifierCard:
        check_output_names([o.name for o in self.outputs], self.metrics)
        return self


class SegmentationSpec(Section):
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


class SegmentMetrics(Section):
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
        check_output_names([o.name for o in self.outputs], self.metrics)
        channels = 2 * self.segmentation.context_slices + 1
        if self.input.channels != channels:
            raise ValueError(
                f"input.channels is {self.input.channels}, but segmentation.context_slices = "
                f"{self.segmentation.context_slices} gives {channels} channel(s) "
                "(the slice and its neighbours)"
            )
        return self


class EnhancementSpec(Section):
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
        return check_increasing(value, "value_range")


class ImageQuality(Section):
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


class TextInputSpec(Section):
    """``[input]`` of a report model: token sequences, not images.

    The source is the token sequence built from the route's findings and the study's context;
    the target is the report text the decoder writes (see dicom_node.infer.report).
    """

    #: Files in the model's folder, one token per line; the line number is the token id.
    source_vocabulary: Annotated[str, AfterValidator(check_file_name)]
    target_vocabulary: Annotated[str, AfterValidator(check_file_name)]
    #: Longest source sequence the model takes (longer inputs are refused, not cut).
    max_source_tokens: Annotated[int, Field(ge=8, le=4096)]
    #: Most tokens the decoder writes before it is stopped.
    max_target_tokens: Annotated[int, Field(ge=8, le=4096)]


class DecodingSpec(Section):
    """``[decoding]`` of a report model."""

    #: Greedy decoding: the most probable token at each step (deterministic).
    strategy: Literal["greedy"] = "greedy"
    description: str = ""


class TextMetrics(Section):
    """Similarity of the generated text to the held-out references."""

    #: Corpus BLEU (0–100) and how it was computed (library, tokenisation, references).
    bleu: Annotated[float, Field(ge=0.0, le=100.0)]
    #: Mean ROUGE-L F-measure (0–1) against the best-matching reference.
    rouge_l: Probability
    references_per_case: Annotated[int, Field(ge=1)]
    method: str = Field(min_length=1)


class ConsistencyRates(Section):
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


class ReportEvaluation(Section):
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
        unique_names([o.name for o in self.outputs])
        return self
