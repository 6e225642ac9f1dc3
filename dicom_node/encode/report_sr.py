"""An AI-drafted report as a Basic Diagnostic Imaging Report (PS3.16 TID 2000) in an Enhanced SR.

The document tree, built with highdicom's content items::

    CONTAINER (18748-4, LN, "Diagnostic Imaging Report")                   TID 2000 row 1, CID 7000
      HAS CONCEPT MOD  CODE Language of Content Item and Descendants       TID 1204 (en-US)
      HAS CONCEPT MOD  TEXT (121050, DCM, "Equivalent Meaning of Concept Name")
                       = "AI-GENERATED DRAFT imaging report - UNVERIFIED"     TID 1210
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID/Name/Manufacturer/Model Name
                       = the report model                                   TID 1001, 1002, 1004
      CONTAINS CONTAINER (121070, DCM, "Findings")                          CID 7001, TID 2002
        CONTAINS TEXT (121071, DCM, "Finding") = the model's findings text (checked)
        CONTAINS TEXT (121071, DCM, "Finding") = "[Added by the consistency check] ..." (each)
      CONTAINS CONTAINER (121072, DCM, "Impressions")
        CONTAINS TEXT (121073, DCM, "Impression") = impression text (+ added ones, marked)
      CONTAINS TEXT (121106, DCM, "Comment") = AI draft notice (what it is, unverified, synthetic)
      CONTAINS TEXT (121106, DCM, "Comment") = the models and findings it was drafted from
      CONTAINS TEXT (121106, DCM, "Comment") = what the consistency check did

Choices, with the reason for each:

* Enhanced SR: TEXT, CODE and CONTAINER items only, no SCOORD3D; dciodvfy checks it fully.
* Completion Flag PARTIAL (with a Completion Flag Description): the text covers only what the
  route's AI models assessed, not a reading of the whole study. Verification Flag UNVERIFIED,
  Preliminary Flag PRELIMINARY: nobody has attested it, and a radiologist must finish it.
* The notices are Comment TEXT items at the root after the report sections (TID 2000 is
  extensible); the title's Equivalent Meaning says "AI draft" wherever only the title is shown.
* The sentences the consistency check added are separate TEXT items, prefixed so that a reader
  sees which sentences the model wrote and which the node added.
* Evidence: every source instance is in the Current Requested Procedure Evidence Sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_node.encode.common import (
    ai_notice,
    device_uid,
    enhanced_sr,
    select_sources,
    series_description,
)
from dicom_node.errors import EncodeError
from dicom_node.infer.report_check import ReportDraft
from dicom_node.messages import FindingRecord, ModelIdentity, ResultUIDs

#: TID 2000 row 1, from CID 7000 "Diagnostic Imaging Report Document Title".
DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS = hd.sr.CodedConcept("121070", "DCM", "Findings")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
IMPRESSIONS = hd.sr.CodedConcept("121072", "DCM", "Impressions")
IMPRESSION = hd.sr.CodedConcept("121073", "DCM", "Impression")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
EQUIVALENT_MEANING = hd.sr.CodedConcept("121050", "DCM", "Equivalent Meaning of Concept Name")
ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
#: Shown as the title's equivalent meaning (TID 1210).
DRAFT_TITLE = "AI-GENERATED DRAFT imaging report - UNVERIFIED"
#: Prefix of every sentence the consistency check added.
ADDED_PREFIX = "[Added by the consistency check] "
#: Completion Flag Description (0040,A492), LO.
COMPLETION_DESCRIPTION = "AI draft: covers only the findings of the route's AI models"


def draft_notice(model: ModelIdentity, route_name: str) -> str:
    """The statement that the report is an unverified AI draft (plus the common AI notice)."""
    return ("AI-GENERATED DRAFT REPORT, UNVERIFIED. This text was drafted by a language model "
            "from the findings of other AI models; it is not a radiologist's report and must be "
            "reviewed, corrected and verified by a radiologist before any use. "
            + ai_notice(model, route_name))


def _fmt(record: FindingRecord) -> str:
    facts = ["present" if record.present else "absent"]
    if record.probability is not None:
        facts.append(f"probability {record.probability:.2f}")
    facts += [f"{m.name.meaning} {m.value:g} {m.unit.value}" for m in record.measurements]
    if record.detail:
        facts.append(record.detail)
    return f"{record.concept.meaning} ({', '.join(facts)})"


def sources_statement(findings: Sequence[FindingRecord]) -> str:
    """Which models' findings the draft was made from, model by model."""
    if not findings:
        return "Drafted from: no findings (no other model of the route produced any)."
    by_model: dict[str, list[FindingRecord]] = {}
    for record in findings:
        by_model.setdefault(f"{record.model} {record.model_version}", []).append(record)
    parts = [f"{name}: {'; '.join(_fmt(r) for r in records)}"
             for name, records in by_model.items()]
    return "Drafted from the findings of: " + " | ".join(parts) + "."


_ISSUE_WORDS = {"missing": "not mentioned", "contradicted": "contradicted",
                "asserted_absent": "asserted although reported absent",
                "unsupported": "spoken of although no model reported it",
                "slot_mismatch": "values mixed up with another finding's",
                "undescribed": "values not given", "repeated": "repeated",
                "unparsed": "in a sentence the check could not read"}


def check_statement(draft: ReportDraft) -> str:
    """What the consistency check found and did, for people reading the report."""
    if draft.no_findings:
        return ("Consistency check: not applicable; the model was not run because there were no "
                "findings, and the text above is fixed.")
    info = draft.consistency
    added = len(draft.findings_added) + len(draft.impression_added)
    if info.passed and not added:
        return ("Consistency check: passed. The model's text mentions every finding reported "
                "present and asserts none reported absent.")
    issues = "; ".join(dict.fromkeys(f"{i.name} {_ISSUE_WORDS.get(i.kind, i.kind)}"
                                      for i in info.issues))
    return (f"Consistency check: the model's text did not agree with the findings ({issues}). "
            f"{len(info.removed)} sentence(s) were removed and {added} sentence(s) were added "
            f"by the check (marked '{ADDED_PREFIX.strip()}'); the text now mentions every "
            "finding reported present and asserts none reported absent.")


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _section(name: hd.sr.CodedConcept, item_name: hd.sr.CodedConcept, text: str,
             added: Sequence[str]) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(
        name=name, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = ([_text(item_name, text)] if text else []) + [
        _text(item_name, ADDED_PREFIX + sentence) for sentence in added]
    section.ContentSequence = hd.sr.ContentSequence(items)
    return section


def _root(draft: ReportDraft, model: ModelIdentity, findings: Sequence[FindingRecord],
          notice: str) -> hd.sr.ContainerContentItem:
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model), name=f"{model.name} {model.version}",
            manufacturer_name=model.manufacturer, model_name=model.name)))
    content = hd.sr.ContentSequence(is_root=False)
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(language=ENGLISH))
    content.append(hd.sr.TextContentItem(
        name=EQUIVALENT_MEANING, value=DRAFT_TITLE,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD))
    content.extend(observer)
    content.append(_section(FINDINGS, FINDING, draft.findings_text, draft.findings_added))
    content.append(_section(IMPRESSIONS, IMPRESSION, draft.impression_text,
                            draft.impression_added))
    for comment in (notice, sources_statement(findings), check_statement(draft)):
        content.append(_text(COMMENT, comment))
    root.ContentSequence = content
    return root


def build_report_sr(
    sources: Sequence[Dataset],
    draft: ReportDraft,
    model: ModelIdentity,
    uids: ResultUIDs,
    route_name: str,
    *,
    timestamp: datetime,
    findings: Sequence[FindingRecord],
) -> Dataset:
    """Encode ``draft`` as a TID 2000 Enhanced SR in the study of ``sources``.

    ``sources`` are the headers of the study's instances (``stop_before_pixels`` is enough);
    every one of them is referenced as evidence, and patient and study attributes come from the
    first. ``findings`` are the records the draft was made from (named, with their models and
    versions, in the document). UIDs and Series Number come from ``uids``, the content, series
    and creation date/times from ``timestamp``, so the same inputs encode the same object.
    Raises EncodeError on input that cannot make a valid SR.
    """
    if not (draft.findings or draft.impression):
        raise EncodeError("the draft has neither findings nor impression text")
    headers = select_sources(sources, [str(s.get("SOPInstanceUID", "")) for s in sources])
    notice = draft_notice(model, route_name)
    description = series_description(model, "draft report")
    root = _root(draft, model, findings, notice)
    added_text = [notice, description, draft.findings, draft.impression,
                  sources_statement(findings), check_statement(draft), model.name,
                  model.version, model.manufacturer]
    document = enhanced_sr(headers, root, model, uids, description=description,
                           timestamp=timestamp, complete=False, added_text=added_text,
                           what="report SR")
    document.CompletionFlagDescription = COMPLETION_DESCRIPTION
    return document
