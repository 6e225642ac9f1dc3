"""Segmenter pipeline: a series → a SEG (PS3.3 A.51) and a TID 1500 SR with a TID 1411 group per
region (e.g. lung nodules on chest CT), both in the source study and marked AI-generated.

When the model finds no region, only the SR is sent: it says, per segment, that the finding is
absent (a SEG with nothing in it would only clutter the study; see :mod:`dicom_node.encode.seg`).
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.encode.nodule_sr import (
    CUBIC_MILLIMETER,
    LONG_AXIS,
    MILLIMETER,
    VOLUME,
    build_nodule_sr,
)
from dicom_node.encode.seg import build_segmentation
from dicom_node.infer.card import ModelCard
from dicom_node.infer.segment import segment
from dicom_node.messages import (
    FindingRecord,
    Measurement,
    PipelineInput,
    PipelineOutput,
    SegmentationResult,
)
from dicom_node.pipelines import uids_for


def run(card: ModelCard, model_dir: Path, job: PipelineInput) -> PipelineOutput:
    """Segment the job's sources; encode the SEG (if anything was found) and the SR."""
    result = segment(card, model_dir, job.sources)
    seg = None
    if result.regions:
        seg = build_segmentation(job.sources, result, uids_for(job, card, "seg"),
                                 job.route_name, timestamp=job.timestamp)
    sr_uids = uids_for(job, card, "sr")
    sr = build_nodule_sr(job.sources, result, seg, sr_uids, job.route_name,
                         timestamp=job.timestamp)
    summary: dict[str, object] = {
        "frames": len(result.frames),
        "regions": len(result.regions),
        "volumes_mm3": [round(r.volume_mm3, 1) for r in result.regions],
        "geometry_warnings": len(result.geometry_warnings),
        "sr_sop_instance_uid": sr_uids.sop_instance_uid,
    }
    if seg is not None:
        summary["seg_sop_instance_uid"] = str(seg.SOPInstanceUID)
    return PipelineOutput(
        objects=(sr,) if seg is None else (seg, sr),
        findings=findings(card, result),
        summary=summary)


def findings(card: ModelCard, result: SegmentationResult) -> tuple[FindingRecord, ...]:
    """One present finding per region, with its volume and longest diameter, and one absent
    finding per segment without regions (so "no nodule" is a finding the report model reads)."""
    records = []
    for number, (kind, _) in enumerate(result.segments, start=1):
        regions = [r for r in result.regions if r.segment_number == number]
        if not regions:
            records.append(FindingRecord(model=card.name, model_version=card.version,
                                         concept=kind, present=False,
                                         detail=f"no {kind.meaning.lower()} detected"))
        for index, region in enumerate(regions, start=1):
            x, y, z = region.centroid
            records.append(FindingRecord(
                model=card.name, model_version=card.version, concept=kind, present=True,
                probability=region.mean_probability,
                measurements=(
                    Measurement(VOLUME, region.volume_mm3, CUBIC_MILLIMETER),
                    Measurement(LONG_AXIS, region.longest_diameter_mm, MILLIMETER),
                ),
                detail=(f"{kind.meaning.lower()} {index} of {len(regions)}, centre at "
                        f"({x:.1f}, {y:.1f}, {z:.1f}) mm patient coordinates")))
    return tuple(records)
