"""A segmenter's result as a Segmentation (PS3.3 A.51 Segmentation IOD), built with highdicom.

What the object carries, with the reason for each choice:

* Segmentation Type BINARY (PS3.3 C.8.20.2), SOP Class Segmentation Storage
  (1.2.840.10008.5.1.4.1.1.66.4). LABELMAP (Label Map Segmentation Storage, 2024) would fit a
  label mask, but dciodvfy (dicom3tools 2022) and most PACS do not know that SOP Class yet.
* One segment per ``result.segments`` entry (Segment Description Macro, PS3.3 C.8.20.4.1):
  label = the property type's meaning, Segmented Property Category/Type from the result,
  Segment Algorithm Type AUTOMATIC, Segmentation Algorithm Identification Sequence naming the
  model, its version and the family (123110, DCM, "Artificial Intelligence") of CID 7162.
  The regions of a segment (e.g. several nodules) are not separate segments; the SR's
  measurement groups reference the segment and, as source images, the frames each region lies
  on (:mod:`dicom_node.encode.nodule_sr`).
* Frames: only frames that contain a segment (highdicom's ``omit_empty_frames``). Each frame
  references the one source frame it was derived from (Derivation Image Sequence, PS3.3
  C.7.6.16.2.6), whether the source is a series of single-frame images or frames of one
  multi-frame image (Enhanced CT); the plane positions are those of the source frames.
* An all-empty mask still makes a valid SEG (every frame encoded, every segment empty; a SEG
  without frames is not valid). The segment pipeline does not send one: when there are no
  regions it sends only the SR, which says that nothing was found.
* Labelled as AI-generated: Series Description and Content Description (``AI segmentation:
  <model> <version>``, with a synthetic-training-data note when so), Image Comments with the
  notice of :func:`dicom_node.encode.common.ai_notice`.
* Deterministic: UIDs from :class:`ResultUIDs` and :func:`derived_uid` (also the Dimension
  Organization UID, which highdicom draws at random), dates from the job's timestamp, so the
  same inputs give the same bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from dicom_node.encode.common import (
    ai_notice,
    character_set,
    derived_uid,
    device_uid,
    finish_result,
    fit_lo,
    local_coding_schemes,
    node_equipment,
    node_version,
    select_sources,
    series_description,
)
from dicom_node.errors import EncodeError
from dicom_node.messages import (
    CodedConcept,
    ModelIdentity,
    ResultUIDs,
    SegmentationResult,
    SourceFrame,
)

#: Segmentation algorithm family, PS3.16 CID 7162 (DCM 123110).
ARTIFICIAL_INTELLIGENCE = hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")
#: Content Label (0070,0080): a CS of at most 16 characters.
CONTENT_LABEL = "AI_SEGMENTATION"
#: Largest distance (mm) at which a segmentation plane is taken to lie on a source frame.
_POSITION_TOLERANCE_MM = 1e-3


def check_segmentation_result(result: SegmentationResult) -> NDArray[np.uint8]:
    """Refuse a result that no SEG (and no SR about it) can carry faithfully; return its mask.

    Checks: at least one segment and one frame, frames not repeated, the mask an integer array
    of shape (frames, rows, columns) whose values are segment numbers, and regions that name a
    described segment, existing frames, and finite non-negative sizes. Raises EncodeError.
    """
    if not result.segments:
        raise EncodeError("the result describes no segments; a SEG needs at least one")
    if not result.frames:
        raise EncodeError("the result names no source frames")
    repeated = sorted((f for f, n in Counter(result.frames).items() if n > 1), key=str)
    if repeated:
        raise EncodeError(f"the result lists source frames more than once: {repeated}")
    mask = np.asarray(result.mask)
    if mask.ndim != 3 or mask.shape[0] != len(result.frames):
        raise EncodeError(
            f"mask shape {mask.shape} does not match the {len(result.frames)} source frames: "
            "expected (frames, rows, columns)"
        )
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise EncodeError(f"mask must hold integer segment numbers, not {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > len(result.segments)):
        raise EncodeError(
            f"mask values range over [{mask.min()}, {mask.max()}], but only segments "
            f"1..{len(result.segments)} are described (0 is background)"
        )
    for index, region in enumerate(result.regions, start=1):
        if not 1 <= region.segment_number <= len(result.segments):
            raise EncodeError(
                f"region {index} names segment {region.segment_number}; "
                f"the result describes segments 1..{len(result.segments)}"
            )
        if not region.frames or any(not 0 <= f < len(result.frames) for f in region.frames):
            raise EncodeError(
                f"region {index} lies on frames {list(region.frames)}; the result has frames "
                f"0..{len(result.frames) - 1}"
            )
        sizes = (region.volume_mm3, region.longest_diameter_mm)
        if not all(np.isfinite(v) and v >= 0 for v in sizes):
            raise EncodeError(
                f"region {index} has volume {region.volume_mm3!r} mm3 and longest diameter "
                f"{region.longest_diameter_mm!r} mm; both must be finite and >= 0"
            )
        if not (np.isfinite(region.mean_probability) and 0 <= region.mean_probability <= 1):
            raise EncodeError(
                f"region {index} has mean probability {region.mean_probability!r}, "
                "outside [0, 1]"
            )
        if not np.any(mask[list(region.frames)] == region.segment_number):
            raise EncodeError(
                f"region {index} (segment {region.segment_number}) is not in the mask "
                f"on its frames {list(region.frames)}"
            )
    return mask.astype(np.uint8)


def build_segmentation(
    sources: Sequence[Dataset],
    result: SegmentationResult,
    uids: ResultUIDs,
    route_name: str,
    *,
    timestamp: datetime,
) -> Dataset:
    """Encode ``result`` as a BINARY Segmentation in the study of ``sources``.

    ``sources`` are the images the result's frames come from (headers suffice); each
    ``SourceFrame`` must name one of them, and all frames must come either from single-frame
    images of one series or from one multi-frame image. ``result.mask[i]`` is aligned with
    ``result.frames[i]`` pixel for pixel. Raises EncodeError on input that cannot make a valid
    SEG.
    """
    mask = check_segmentation_result(result)
    headers = select_sources(sources, [f.sop_instance_uid for f in result.frames])
    source_images, positions = _source_layout(headers, result.frames, mask.shape[1:])
    model = result.model
    description = series_description(model, "segmentation")
    notice = ai_notice(model, route_name)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=fit_lo(kind.meaning),
            segmented_property_category=to_hd_code(category),
            segmented_property_type=to_hd_code(kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model),
        )
        for number, (kind, category) in enumerate(result.segments, start=1)
    ]
    added_text = [description, notice, model.name, model.version, model.manufacturer] + [
        concept.meaning for pair in result.segments for concept in pair
    ]
    try:
        seg: Dataset = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=mask,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=uids.series_instance_uid,
            series_number=uids.series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=1,
            manufacturer=fit_lo(model.manufacturer),
            manufacturer_model_name=fit_lo(model.name),
            software_versions=fit_lo(model.version),
            device_serial_number=device_uid(model),
            content_description=description,
            content_label=CONTENT_LABEL,
            plane_positions=positions,
            omit_empty_frames=bool(mask.any()),
            series_description=description,
            series_date=timestamp.date(),
            series_time=timestamp.time(),
            content_date=timestamp.date(),
            content_time=timestamp.time(),
            contributing_equipment=[node_equipment(timestamp)],
            coding_schemes=local_coding_schemes(
                c.scheme for pair in result.segments for c in pair
            ) or None,
            specific_character_set=character_set(
                added_text, headers[0].get("SpecificCharacterSet")
            ),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodeError(
            f"highdicom refused the SEG for model {model.name} {model.version}: {exc}"
        ) from exc
    seg.SoftwareVersions = [fit_lo(model.version), fit_lo(f"dicom-node {node_version()}")]
    seg.ImageComments = notice
    _pin_source_frames(seg, result.frames, positions)
    _pin_dimension_organization(seg, uids)
    finish_result(seg, timestamp)
    return seg


def segmentation_frame_numbers(
    seg: Dataset, segment_number: int, frames: Sequence[SourceFrame]
) -> list[int]:
    """The SEG frame numbers (1-based) of ``segment_number`` derived from any of ``frames``.

    Read from the Segment Identification and Derivation Image Sequences of each frame's
    functional groups (PS3.3 C.8.20.3, C.7.6.16.2.6), as built here.
    """
    wanted = {(f.sop_instance_uid, f.frame_number) for f in frames}
    shared = seg.SharedFunctionalGroupsSequence[0]
    numbers = []
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        # highdicom moves the identification to the shared groups when there is one segment
        identification = item.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        if int(identification[0].ReferencedSegmentNumber) != segment_number:
            continue
        if wanted & _derived_from(item):
            numbers.append(number)
    return numbers


def _derived_from(frame_item: Dataset) -> set[tuple[str, int]]:
    return {
        (str(src.ReferencedSOPInstanceUID), int(src.get("ReferencedFrameNumber", 1)))
        for derivation in frame_item.get("DerivationImageSequence", [])
        for src in derivation.get("SourceImageSequence", [])
    }


def to_hd_code(concept: CodedConcept) -> hd.sr.CodedConcept:
    """highdicom's form of a coded concept of :mod:`dicom_node.messages`."""
    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)


def _algorithm(model: ModelIdentity) -> hd.AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification (PS3.3 Table 10-19): name, version, AI family."""
    return hd.AlgorithmIdentificationSequence(
        name=fit_lo(model.name),
        family=ARTIFICIAL_INTELLIGENCE,
        version=fit_lo(model.version),
        source=fit_lo(model.manufacturer),
    )


def _source_layout(
    headers: Sequence[Dataset],
    frames: Sequence[SourceFrame],
    frame_shape: tuple[int, ...],
) -> tuple[list[Dataset], list[hd.PlanePositionSequence]]:
    """highdicom's ``source_images`` and the plane position of each result frame.

    highdicom takes either single-frame images of one series or exactly one multi-frame image;
    the frames must share rows, columns, orientation and pixel spacing with the mask.
    """
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    multi = [h for h in headers if "PerFrameFunctionalGroupsSequence" in h]
    if multi and len(headers) > 1:
        raise EncodeError(
            "the result's frames come from a multi-frame image and other instances "
            f"({', '.join(by_uid)}); a SEG can be derived from one multi-frame image or from "
            "single-frame images of one series"
        )
    series = {str(h.SeriesInstanceUID) for h in headers}
    if len(series) > 1:
        raise EncodeError(
            f"the result's frames come from {len(series)} series ({', '.join(sorted(series))}); "
            "a SEG is derived from one series"
        )
    for header in headers:
        shape = (int(header.get("Rows", 0)), int(header.get("Columns", 0)))
        if shape != tuple(frame_shape):
            raise EncodeError(
                f"mask frames are {tuple(frame_shape)} but source {header.SOPInstanceUID} is "
                f"{shape} (rows, columns); the mask must be aligned with its source frames"
            )
    positions = []
    for frame in frames:
        header = by_uid[frame.sop_instance_uid]
        if multi:
            count = int(header.get("NumberOfFrames", 1))
            if not 1 <= frame.frame_number <= count:
                raise EncodeError(
                    f"frame {frame.frame_number} of {frame.sop_instance_uid} does not exist "
                    f"(the image has {count} frames)"
                )
            item = header.PerFrameFunctionalGroupsSequence[frame.frame_number - 1]
            position = item.get("PlanePositionSequence") or header.SharedFunctionalGroupsSequence[
                0
            ].get("PlanePositionSequence")
            point = position[0].ImagePositionPatient if position else None
        else:
            if frame.frame_number != 1:
                raise EncodeError(
                    f"frame {frame.frame_number} of single-frame image {frame.sop_instance_uid} "
                    "does not exist"
                )
            point = header.get("ImagePositionPatient")
        if point is None:
            raise EncodeError(
                f"source frame {frame.frame_number} of {frame.sop_instance_uid} has no Image "
                "Position (Patient); a SEG of it needs the patient coordinate system"
            )
        positions.append(hd.PlanePositionSequence("PATIENT", [float(v) for v in point]))
    if not multi:
        _check_same_plane_geometry(headers)
    return list(headers), positions


def _check_same_plane_geometry(headers: Sequence[Dataset]) -> None:
    """Single-frame sources must share orientation and pixel spacing (highdicom uses the first)."""
    first = headers[0]
    for keyword in ("ImageOrientationPatient", "PixelSpacing"):
        if keyword not in first:
            raise EncodeError(f"source {first.SOPInstanceUID} has no {keyword}")
        reference = np.asarray(first.get(keyword), dtype=float)
        for header in headers[1:]:
            value = np.asarray(header.get(keyword, []), dtype=float)
            if value.shape != reference.shape or not np.allclose(value, reference, atol=1e-4):
                raise EncodeError(
                    f"source {header.SOPInstanceUID} has {keyword} {list(value)}, unlike "
                    f"{list(reference)} of {first.SOPInstanceUID}; the frames of one SEG must "
                    "share it"
                )


def _pin_source_frames(
    seg: Dataset, frames: Sequence[SourceFrame], positions: Sequence[hd.PlanePositionSequence]
) -> None:
    """Make every SEG frame reference exactly the source frame it was derived from.

    highdicom matches planes to source frames by position; a multi-frame source may have several
    frames at one position (e.g. phases), of which the model used one.
    """
    points = np.array([p[0].ImagePositionPatient for p in positions], dtype=float)
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        point = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        distances = np.linalg.norm(points - point, axis=1)
        nearest = int(np.argmin(distances))
        derivations = item.get("DerivationImageSequence", [])
        if distances[nearest] > _POSITION_TOLERANCE_MM or not derivations:
            raise EncodeError(
                f"SEG frame {number} could not be matched to a source frame; the source "
                "geometry is inconsistent"
            )
        wanted = (frames[nearest].sop_instance_uid, frames[nearest].frame_number)
        for derivation in derivations:
            kept = [
                src
                for src in derivation.SourceImageSequence
                if (str(src.ReferencedSOPInstanceUID), int(src.get("ReferencedFrameNumber", 1)))
                == wanted
            ]
            if not kept:
                raise EncodeError(
                    f"SEG frame {number} was matched to other source frames than "
                    f"{wanted[0]} frame {wanted[1]}"
                )
            derivation.SourceImageSequence = kept


def _pin_dimension_organization(seg: Dataset, uids: ResultUIDs) -> None:
    """Replace the Dimension Organization UID highdicom draws at random (PS3.3 C.7.6.17)."""
    old = {str(item.DimensionOrganizationUID) for item in seg.DimensionOrganizationSequence}
    new = derived_uid(uids.sop_instance_uid, "dimension-organization")
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = new
    for item in seg.get("DimensionIndexSequence", []):
        if str(item.get("DimensionOrganizationUID", "")) in old:
            item.DimensionOrganizationUID = new


__all__ = [
    "ARTIFICIAL_INTELLIGENCE",
    "build_segmentation",
    "check_segmentation_result",
    "segmentation_frame_numbers",
    "to_hd_code",
]
