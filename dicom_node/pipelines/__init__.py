"""Model pipelines: one per card kind, each turning a job's input into DICOM results.

=============  ================================================  ==============================
kind           pipeline                                          results
=============  ================================================  ==============================
classifier     :mod:`dicom_node.pipelines.classify`              TID 1500 SR
segmenter      :mod:`dicom_node.pipelines.segment`               SEG + TID 1500 SR
enhancer       :mod:`dicom_node.pipelines.enhance`               derived image series
report         :mod:`dicom_node.pipelines.report`                report SR (an AI draft)
=============  ================================================  ==============================

A pipeline is ``run(card, model_dir, PipelineInput) -> PipelineOutput``. Modules are imported on
first use: the receiver process never loads Keras.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from dicom_node.errors import ModelError
from dicom_node.infer.card import ModelCard
from dicom_node.messages import PipelineInput, PipelineOutput, ResultUIDs
from dicom_node.uids import result_uids

Pipeline = Callable[[ModelCard, Path, PipelineInput], PipelineOutput]

#: card kind → module holding its ``run`` function.
PIPELINES: dict[str, str] = {
    "classifier": "dicom_node.pipelines.classify",
    "segmenter": "dicom_node.pipelines.segment",
    "enhancer": "dicom_node.pipelines.enhance",
    "report": "dicom_node.pipelines.report",
}


def pipeline_for(kind: str) -> Pipeline:
    """The pipeline of a card kind."""
    try:
        module = importlib.import_module(PIPELINES[kind])
    except KeyError:
        raise ModelError(f"no pipeline for model kind {kind!r}") from None
    run: Pipeline = module.run
    return run


def run_pipeline(card: ModelCard, model_dir: Path, job: PipelineInput) -> PipelineOutput:
    return pipeline_for(card.kind)(card, model_dir, job)


def uids_for(job: PipelineInput, card: ModelCard, what: str) -> ResultUIDs:
    """Deterministic UIDs of one result object of a job (``what``: "sr", "seg", "derived" …).

    A reopened study (generation > 0) gets new UIDs: its results describe other images."""
    kind = what if job.generation == 0 else f"{what}.g{job.generation}"
    return result_uids(job.study_instance_uid, job.route_name, card.name, card.version, kind)
