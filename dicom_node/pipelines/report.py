"""Report pipeline: the route's other models' findings → an AI draft report SR (TID 2000).

The job's sources are headers only (the runner loads them so for kind "report"): they give the
study context (Modality, BodyPartExamined, StudyDescription — never patient name or ID) and the
evidence references. The findings are ``job.prior_findings``, those of the route's models that
finished before this job (see dicom_node.jobs.queue).

When there are no prior findings (every other model of the route failed, or the route has no
other model) the report is still drafted and sent: a fixed text that says no AI findings are
available and makes no statement about the images (see infer.report.draft_report). A reader of
the study then learns that the AI assessment is missing, instead of finding nothing; the failed
jobs themselves stay visible to the administrator in the job list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom import Dataset

from dicom_node.encode.report_sr import build_report_sr
from dicom_node.infer.card import ModelCard
from dicom_node.infer.report import draft_report
from dicom_node.messages import PipelineInput, PipelineOutput
from dicom_node.pipelines import uids_for

#: The only source attributes the drafter sees.
CONTEXT_KEYWORDS = ("Modality", "BodyPartExamined", "StudyDescription")


def study_context(sources: Sequence[Dataset]) -> Mapping[str, str]:
    """Modality (the most frequent), BodyPartExamined and StudyDescription (the first given)."""
    modalities = Counter(str(s.get("Modality", "") or "") for s in sources)
    modalities.pop("", None)
    context = {"Modality": modalities.most_common(1)[0][0] if modalities else ""}
    for keyword in CONTEXT_KEYWORDS[1:]:
        values = [str(s.get(keyword, "") or "").strip() for s in sources]
        context[keyword] = next((v for v in values if v), "")
    return context


def run(card: ModelCard, model_dir: Path, job: PipelineInput) -> PipelineOutput:
    context = study_context(job.sources)
    draft = draft_report(card, model_dir, job.prior_findings, context)
    uids = uids_for(job, card, "sr")
    sr = build_report_sr(job.sources, draft, card.identity(), uids, job.route_name,
                         timestamp=job.timestamp, findings=job.prior_findings)
    return PipelineOutput(
        objects=(sr,),
        summary={"prior_findings": len(job.prior_findings),
                 "positive_findings": sum(1 for f in job.prior_findings if f.present),
                 "no_findings": draft.no_findings,
                 "consistent_as_drafted": draft.consistency.passed,
                 "sentences_removed": len(draft.consistency.removed),
                 "sentences_added": len(draft.findings_added) + len(draft.impression_added),
                 "sr_sop_instance_uid": uids.sop_instance_uid})
