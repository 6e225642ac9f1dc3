"""A classifier's result as a Measurement Report (PS3.16 TID 1500) in an Enhanced SR (PS3.3 A.35.2).

The document tree, built with highdicom::

    CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500 row 1
      language, TID 1204; observation context, TID 1001 with a Device observer, TID 1002/1004:
        Observer Type = (121007, DCM, "Device"), Device Observer UID/Name/Manufacturer/Model Name
      Procedure reported = (363679005, SCT, "Imaging procedure")      row 4, CID 100
      CONTAINER (126010, DCM, "Imaging Measurements")                 row 6
        CONTAINER (125007, DCM, "Measurement Group"), one per finding TID 1501
          Tracking Identifier / Tracking Unique Identifier            TID 4108
          Finding (121071, DCM) = the finding's code
          Algorithm Name / Version / Parameters (decision threshold)  TID 4019
          NUM (122157, DCM, "Probability") = p, unit (1, UCUM, "no units")   TID 300
          CODE <finding> = (52101004, SCT, "Present") | (272519000, SCT, "Absent")  CID 240
          IMAGE (121112, DCM, "Source of Measurement"), one per source image
      CONTAINER (C0034375, UMLS, "Qualitative Evaluations")           row 12
        TEXT (121106, DCM, "Comment") = the AI-generated notice        row 14

Choices, with the reason for each:

* Probability: (122157, DCM, "Probability") from PS3.16 Annex D, a number in [0, 1] with the
  dimensionless UCUM unit "1" (PS3.16 CID 7181 style "no units").
* Present/Absent: the codes of CID 240 "Present-Absent", SCT 52101004 "Present" and SCT 272519000
  "Absent". (SNOMED's own "Absent (qualifier value)" is 2667000, but CID 240 lists 272519000.)
* The decision threshold is an algorithm parameter (TID 4019 row "Algorithm Parameters"), not a
  measurement: it describes the model, not the patient.
* Enhanced SR suffices (no SCOORD3D, no by-reference relationships) and dciodvfy checks it fully.
* No Image Library (TID 1600, optional in TID 1500 as highdicom builds it): its descriptors
  (TID 1602/1603) need attributes such as Imager Pixel Spacing that real radiographs often lack;
  the measurement groups and the Current Requested Procedure Evidence Sequence reference every
  source image.
* Completion Flag COMPLETE, Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY
  (PS3.3 C.17.2): the content is all the model says, and no physician has attested it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom import Dataset

from dicom_node.encode.common import (
    ai_notice,
    derived_uid,
    enhanced_sr,
    observation_context,
    select_sources,
    series_description,
)
from dicom_node.errors import EncodeError
from dicom_node.messages import ClassificationResult, Finding, ModelIdentity, ResultUIDs

#: Name of the NUM that carries the model's probability (PS3.16 Annex D).
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
#: Dimensionless unit of the probability (UCUM).
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
#: CID 240 "Present-Absent".
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
#: TID 1500 row 4, from CID 100 "Quantitative Diagnostic Imaging Procedures".
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
#: TID 1500 row 12: evaluations of the whole subject of the report.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: Concept name of the AI notice (TID 1500 row 14 leaves it open).
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


def build_classification_sr(
    sources: Sequence[Dataset],
    result: ClassificationResult,
    uids: ResultUIDs,
    route_name: str,
    *,
    timestamp: datetime | None = None,
) -> Dataset:
    """Encode ``result`` as a TID 1500 Enhanced SR in the study of ``sources``.

    ``sources`` are the headers of the source images (``stop_before_pixels`` is enough); every SOP
    instance in ``result.source_sop_instance_uids`` must be among them. Patient and study
    attributes come from the first referenced source. Series/SOP Instance UIDs and the Series
    Number come from ``uids``; content, series and creation date/times from ``timestamp`` (now
    when None), so the same inputs and timestamp give the same object. Raises EncodeError on
    input that cannot make a valid SR.
    """
    _check_findings(result.findings)
    headers = select_sources(sources, result.source_sop_instance_uids)
    when = timestamp if timestamp is not None else datetime.now()
    model = result.model
    notice = ai_notice(model, route_name)
    description = series_description(model)
    added_text = [
        notice,
        description,
        model.name,
        model.version,
        model.manufacturer,
        *(f.concept.meaning for f in result.findings),
    ]
    try:
        report = _measurement_report(result, uids, headers, notice)
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(
            f"highdicom refused the SR for model {model.name} {model.version}: {exc}"
        ) from exc
    return enhanced_sr(headers, report, model, uids, description=description, timestamp=when,
                       complete=True, added_text=added_text,
                       schemes=(f.concept.scheme for f in result.findings))


def _check_findings(findings: Sequence[Finding]) -> None:
    """Refuse results that no Measurement Report can carry faithfully."""
    if not findings:
        raise EncodeError(
            "the result has no findings; TID 1500 needs at least one measurement group"
        )
    for finding in findings:
        for what, value in (("probability", finding.probability), ("threshold", finding.threshold)):
            number = float(value)
            if not math.isfinite(number) or not 0.0 <= number <= 1.0:
                raise EncodeError(
                    f"finding {finding.concept.meaning!r} ({finding.concept.scheme} "
                    f"{finding.concept.value}) has {what} {value!r}, outside [0, 1]"
                )


def _measurement_report(
    result: ClassificationResult,
    uids: ResultUIDs,
    headers: Sequence[Dataset],
    notice: str,
) -> hd.sr.MeasurementReport:
    """TID 1500 root: observation context, a TID 1501 group per finding, the AI notice (row 14)."""
    # one IMAGE item per source image, shared by every group (the same content in each)
    images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(result.model),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[
            _finding_group(index, finding, result.model, uids, images)
            for index, finding in enumerate(result.findings, start=1)
        ],
    )
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT,
                value=notice,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    report[0].ContentSequence.append(evaluations)
    return report


def _finding_group(
    index: int,
    finding: Finding,
    model: ModelIdentity,
    uids: ResultUIDs,
    images: Sequence[hd.sr.SourceImageForMeasurementGroup],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the finding, its probability (TID 300), Present/Absent, the source images."""
    concept = hd.sr.CodedConcept(
        value=finding.concept.value,
        scheme_designator=finding.concept.scheme,
        meaning=finding.concept.meaning,
    )
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid(
            uids.sop_instance_uid, "finding", str(index), concept.scheme_designator, concept.value
        ),
        identifier=f"Finding {index}: {concept.meaning}",
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"decision threshold {float(finding.threshold)!r}"],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability), unit=NO_UNITS)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if finding.present else ABSENT)
        ],
        source_images=images,
    )
