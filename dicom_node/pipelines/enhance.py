"""Enhancer pipeline: the study's images → enhanced pixels → a derived series in the same study.

The derived series has one instance per enhanced source image (see
:mod:`dicom_node.encode.derived`); its Series Instance UID comes from
``uids_for(job, card, "derived")``, so a job that runs again sends the same UIDs. An enhancer
concludes nothing about the patient, so it records no findings; how much it improved the image
cannot be measured without a reference, so the summary gives counts and timing only.
"""

from __future__ import annotations

import time
from pathlib import Path

from dicom_node.encode.derived import build_derived_series
from dicom_node.errors import ModelError
from dicom_node.infer.card import EnhancerCard, ModelCard
from dicom_node.infer.enhance import enhance
from dicom_node.messages import PipelineInput, PipelineOutput
from dicom_node.pipelines import uids_for


def run(card: ModelCard, model_dir: Path, job: PipelineInput) -> PipelineOutput:
    if not isinstance(card, EnhancerCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not an enhancer")
    started = time.perf_counter()
    pairs = enhance(card, model_dir, job.sources)
    inferred = time.perf_counter()
    uids = uids_for(job, card, "derived")
    instances = build_derived_series(pairs, card.identity(), uids, job.route_name,
                                     timestamp=job.timestamp,
                                     description=card.series_description)
    encoded = time.perf_counter()
    return PipelineOutput(
        objects=tuple(instances),
        findings=(),
        summary={
            "images": len(job.sources),
            "enhanced": len(instances),
            "skipped": len(job.sources) - len(instances),
            "series_instance_uid": uids.series_instance_uid,
            "infer_seconds": round(inferred - started, 3),
            "encode_seconds": round(encoded - inferred, 3),
        },
    )
