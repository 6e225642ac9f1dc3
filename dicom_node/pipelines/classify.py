"""Classifier pipeline: probabilities per coded finding → a TID 1500 SR."""

from __future__ import annotations

from pathlib import Path

from dicom_node.encode.sr import build_classification_sr
from dicom_node.infer.card import ModelCard
from dicom_node.infer.runtime import classify
from dicom_node.messages import FindingRecord, PipelineInput, PipelineOutput
from dicom_node.pipelines import uids_for


def run(card: ModelCard, model_dir: Path, job: PipelineInput) -> PipelineOutput:
    result = classify(card, model_dir, job.sources)
    uids = uids_for(job, card, "sr")
    sr = build_classification_sr(job.sources, result, uids, job.route_name,
                                 timestamp=job.timestamp)
    findings = tuple(
        FindingRecord(model=card.name, model_version=card.version, concept=f.concept,
                      present=f.present, probability=f.probability)
        for f in result.findings)
    return PipelineOutput(
        objects=(sr,), findings=findings,
        summary={"images": len(result.source_sop_instance_uids),
                 "findings": {f.concept.meaning: round(f.probability, 4)
                              for f in result.findings},
                 "sr_sop_instance_uid": uids.sop_instance_uid})
