"""A segmenter's regions as a Measurement Report (PS3.16 TID 1500) in an Enhanced SR (PS3.3 A.35.2).

The document tree, built with highdicom::

    CONTAINER (126000, DCM, "Imaging Measurement Report")              TID 1500
      observation context: Device observer naming the model           TID 1001/1002/1004
      Procedure reported = (363679005, SCT, "Imaging procedure")
      CONTAINER (126010, DCM, "Imaging Measurements")
        CONTAINER (125007, DCM, "Measurement Group"), one per region    TID 1411
          Tracking Identifier "Nodule 1 of 2" / Tracking Unique Identifier   TID 4108
          Finding Category / Finding = the segment's property category / type
          IMAGE (121191, DCM, "Referenced Segment"): the SEG and the segment number;
            IMAGE (121233, DCM, "Source Image for Segmentation") per source image of the region
          Algorithm Name / Version                                     TID 4019
          NUM (118565006, SCT, "Volume")       unit (mm3, UCUM)          TID 1419 / TID 300
          NUM (103339001, SCT, "Long axis")    unit (mm, UCUM)
          NUM (122157, DCM, "Probability"), derivation (373098007, SCT, "Mean")
          CODE <finding> = (52101004, SCT, "Present")                   CID 240
        CONTAINER (125007, DCM, "Measurement Group"), one per segment without regions  TID 1501
          Tracking Identifier, Finding, Algorithm, CODE <finding> = (272519000, SCT, "Absent"),
          IMAGE (121112, DCM, "Source of Measurement") per source image
      CONTAINER (C0034375, UMLS, "Qualitative Evaluations")
        TEXT (121106, DCM, "Comment") = the AI-generated notice
        TEXT (121106, DCM, "Comment") = "No nodule detected ...", when a segment has no region

Choices, with the reason for each:

* Volume: (118565006, SCT, "Volume") of CID 7472; the segmenter counts voxels, but the plain code
  is what viewers of TID 1411 read.
* Longest diameter: (103339001, SCT, "Long axis") of CID 7470 "Linear Measurements", the longest
  diameter of the region. Note that the segmenter measures it in 3D (the longest distance
  between two points of the region), not in one axial plane as a reader's caliper would.
* The region's mean voxel probability is a TID 300 NUM "Probability" with the derivation
  (373098007, SCT, "Mean") of CID 7464, so that it is not read as a lesion-level probability.
* A segment may hold several regions (several nodules in one "Nodule" segment). The Referenced
  Segment item cannot narrow the reference to the region's SEG frames: an IMAGE reference to a
  SEG carries Referenced Frame Number or Referenced Segment Number, not both (PS3.3 Table 10-3;
  dciodvfy and dsrdump flag both). Each group's source images are therefore only the frames its
  region lies on, and its Tracking Identifier numbers the region ("Nodule 2 of 3").
* "No nodule" is a TID 1501 group per segment without regions whose finding is Absent (as the
  classifier SR says Absent), plus a comment in words; the SEG is then not needed and may be
  None.
* Enhanced SR suffices (IMAGE references only, no SCOORD3D) and dciodvfy checks it fully.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.uid import SegmentationStorage

from dicom_node.encode.common import (
    ai_notice,
    derived_uid,
    enhanced_sr,
    observation_context,
    select_sources,
    series_description,
)
from dicom_node.encode.seg import (
    check_segmentation_result,
    segmentation_frame_numbers,
    to_hd_code,
)
from dicom_node.encode.sr import (
    ABSENT,
    COMMENT,
    IMAGING_PROCEDURE,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
)
from dicom_node.errors import EncodeError
from dicom_node.messages import (
    CodedConcept,
    ModelIdentity,
    ResultUIDs,
    SegmentationResult,
    SegmentedRegion,
    SourceFrame,
)

#: CID 7472 "Volume Measurements".
VOLUME = CodedConcept("118565006", "SCT", "Volume")
#: CID 7470 "Linear Measurements": the longest diameter of a region.
LONG_AXIS = CodedConcept("103339001", "SCT", "Long axis")
#: UCUM units of the measurements.
CUBIC_MILLIMETER = CodedConcept("mm3", "UCUM", "cubic millimeter")
MILLIMETER = CodedConcept("mm", "UCUM", "millimeter")
#: CID 7464 derivation of the region's probability: the mean over its voxels.
MEAN = CodedConcept("373098007", "SCT", "Mean")


def build_nodule_sr(
    sources: Sequence[Dataset],
    result: SegmentationResult,
    seg: Dataset | None,
    uids: ResultUIDs,
    route_name: str,
    *,
    timestamp: datetime,
) -> Dataset:
    """Encode the regions of ``result`` as a TID 1500 Enhanced SR that references ``seg``.

    ``seg`` is the SEG built from the same result by
    :func:`dicom_node.encode.seg.build_segmentation`; it may be None only when the result has no
    regions. ``sources`` are the source images (headers suffice). The SR's evidence lists the
    source images of the result's frames and the SEG. Raises EncodeError on input that cannot
    make a valid SR.
    """
    check_segmentation_result(result)
    headers = select_sources(sources, [f.sop_instance_uid for f in result.frames])
    if result.regions and seg is None:
        raise EncodeError("the result has regions, but no SEG was given for the SR to reference")
    if seg is not None:
        _check_seg(seg, result, headers[0])
    model = result.model
    notice = ai_notice(model, route_name)
    absent = [
        number
        for number in range(1, len(result.segments) + 1)
        if all(r.segment_number != number for r in result.regions)
    ]
    comments = [notice] + [
        f"No {result.segments[n - 1][0].meaning.lower()} detected by the model {model.name} "
        f"version {model.version}."
        for n in absent
    ] + [
        f"Source series geometry: {warning}. Volumes and diameters were measured with each "
        f"slice at its own position and may be less accurate."
        for warning in result.geometry_warnings
    ]
    description = series_description(model, "measurements")
    added_text = [*comments, description, model.name, model.version, model.manufacturer] + [
        concept.meaning for pair in result.segments for concept in pair
    ]
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    try:
        if seg is not None:
            groups += _region_groups(result, seg, uids, headers)
        groups += [_absent_group(result, number, uids, headers) for number in absent]
        report = hd.sr.MeasurementReport(
            observation_context=observation_context(model),
            procedure_reported=IMAGING_PROCEDURE,
            imaging_measurements=groups,
        )
        report[0].ContentSequence.append(_comments(comments))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodeError(
            f"highdicom refused the nodule SR for model {model.name} {model.version}: {exc}"
        ) from exc
    evidence = [*headers, _reference(seg)] if seg is not None else list(headers)
    return enhanced_sr(evidence, report, model, uids, description=description,
                       timestamp=timestamp, complete=True, added_text=added_text,
                       schemes=(c.scheme for pair in result.segments for c in pair),
                       what="nodule SR")


def _reference(dataset: Dataset) -> Dataset:
    """What the SR's evidence needs of an instance after the first (highdicom reads the Patient
    and Study modules from the first only): its Study, Series and SOP Instance UIDs and SOP
    Class, not a copy of a whole SEG with its per-frame functional groups."""
    reference = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(reference, keyword, dataset[keyword].value)
    return reference


def _check_seg(seg: Dataset, result: SegmentationResult, source: Dataset) -> None:
    """The SEG must be a Segmentation of the same study that describes the result's segments."""
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise EncodeError(
            f"the SEG to reference has SOP Class {seg.get('SOPClassUID')}, not Segmentation "
            f"Storage ({SegmentationStorage})"
        )
    if seg.get("StudyInstanceUID") != source.StudyInstanceUID:
        raise EncodeError(
            f"the SEG belongs to study {seg.get('StudyInstanceUID')}, the sources to "
            f"{source.StudyInstanceUID}"
        )
    described = {
        int(item.SegmentNumber): (
            str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue),
            str(item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator),
        )
        for item in seg.get("SegmentSequence", [])
    }
    for number, (kind, _) in enumerate(result.segments, start=1):
        if described.get(number) != (kind.value, kind.scheme):
            raise EncodeError(
                f"the SEG's segment {number} is not {kind.meaning!r} ({kind.scheme} "
                f"{kind.value}); was it built from this result?"
            )


def _region_groups(
    result: SegmentationResult, seg: Dataset, uids: ResultUIDs, headers: Sequence[Dataset]
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1411 group per region, numbered per segment ("Nodule 2 of 3")."""
    counts = Counter(r.segment_number for r in result.regions)
    seen: dict[int, int] = {}
    groups = []
    for index, region in enumerate(result.regions, start=1):
        seen[region.segment_number] = seen.get(region.segment_number, 0) + 1
        kind, category = result.segments[region.segment_number - 1]
        frames = [result.frames[i] for i in sorted(region.frames)]
        if not segmentation_frame_numbers(seg, region.segment_number, frames):
            raise EncodeError(
                f"the SEG has no frame of segment {region.segment_number} on the frames of "
                f"region {index}; was it built from this result?"
            )
        label = f"{kind.meaning} {seen[region.segment_number]} of {counts[region.segment_number]}"
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(uids.sop_instance_uid, "region", str(index)),
                    identifier=label,
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=region.segment_number,
                    source_images=[
                        hd.sr.SourceImageForSegmentation(*reference)
                        for reference in _image_references(frames, headers)
                    ],
                ),
                finding_type=to_hd_code(kind),
                finding_category=to_hd_code(category),
                algorithm_id=_algorithm(result.model),
                measurements=_measurements(region),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(name=to_hd_code(kind), value=PRESENT)
                ],
            )
        )
    return groups


def _measurements(region: SegmentedRegion) -> list[hd.sr.Measurement]:
    return [
        hd.sr.Measurement(
            name=to_hd_code(VOLUME),
            value=float(region.volume_mm3),
            unit=to_hd_code(CUBIC_MILLIMETER),
        ),
        hd.sr.Measurement(
            name=to_hd_code(LONG_AXIS),
            value=float(region.longest_diameter_mm),
            unit=to_hd_code(MILLIMETER),
        ),
        hd.sr.Measurement(
            name=PROBABILITY,
            value=float(region.mean_probability),
            unit=NO_UNITS,
            derivation=to_hd_code(MEAN),
        ),
    ]


def _absent_group(
    result: SegmentationResult, number: int, uids: ResultUIDs, headers: Sequence[Dataset]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group saying that the segment's finding is absent from every source frame."""
    kind, category = result.segments[number - 1]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(uids.sop_instance_uid, "absent", str(number)),
            identifier=f"{kind.meaning}: none detected",
        ),
        finding_type=to_hd_code(kind),
        finding_category=to_hd_code(category),
        algorithm_id=_algorithm(result.model),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=to_hd_code(kind), value=ABSENT)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(*reference)
            for reference in _image_references(result.frames, headers)
        ],
    )


def _image_references(
    frames: Sequence[SourceFrame], headers: Sequence[Dataset]
) -> list[tuple[str, str, list[int] | None]]:
    """(SOP Class, SOP Instance, frame numbers or None) per source instance, in frame order."""
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    numbers: dict[str, list[int]] = {}
    for frame in frames:
        numbers.setdefault(frame.sop_instance_uid, []).append(frame.frame_number)
    return [
        (
            str(by_uid[uid].SOPClassUID),
            uid,
            sorted(found) if "PerFrameFunctionalGroupsSequence" in by_uid[uid] else None,
        )
        for uid, found in numbers.items()
    ]


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the model's name and version."""
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version)


def _comments(texts: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container with the AI notice, the "nothing found" statements and the
    source series' geometry warnings."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            for text in texts
        ]
    )
    return container


__all__ = [
    "CUBIC_MILLIMETER",
    "LONG_AXIS",
    "MEAN",
    "MILLIMETER",
    "VOLUME",
    "build_nodule_sr",
]
