"""An enhancer's output as a derived image series in the source study (PS3.3 A.3 CT Image, or the
source's own single-frame image IOD).

One new instance per source image, of the source's SOP Class, in a new series of the same study:

* **Copied from the source** (so the PACS shows the derived slice where the source is): the
  Patient, General Study and Patient Study modules; Frame of Reference; the Image Plane module
  (Image Position/Orientation (Patient), Pixel Spacing, Slice Thickness, Slice Location); the
  Image Pixel description (rows, columns, bits, pixel representation, photometric
  interpretation, padding); Rescale Slope/Intercept/Type; windows; the acquisition attributes of
  the CT Image module (they still describe how the data was acquired).
* **New**: Series Instance UID and Series Number from :class:`~dicom_node.messages.ResultUIDs`;
  SOP Instance UID derived from the result series and the source SOP Instance UID
  (:func:`~dicom_node.encode.common.derived_uid`), so a re-run sends the same UIDs; Series
  Description saying that the series is AI-generated (and trained on synthetic data, when so);
  General Equipment naming the model (Manufacturer, Manufacturer's Model Name) and Software
  Versions with the model's version and ``dicom-node <version>`` — the receiver recognises its own
  results by that value; Contributing Equipment: dicom-node as Processing Equipment (and the
  source's scanner as Acquisition Equipment when the source names its manufacturer); Content,
  Series and Instance Creation date/time from the job's timestamp.
* **Derivation** (PS3.3 C.7.6.1.1.2–4): Image Type ``DERIVED\\SECONDARY\\<source value 3>``;
  Derivation Description (the model, and that it is AI output); Derivation Code Sequence
  (DCM 113087 "Smoothing", CID 7203 Image Derivation: noise reduction smooths the image);
  Source Image Sequence with the source, Purpose of Reference DCM 121322 "Source image for image
  processing operation" (CID 7202), Spatial Locations Preserved YES. Burned In Annotation NO
  (unless the source says YES: its burned-in text is still in the pixels).
* **Dropped**: private attributes and group lengths, the source's derivation and source-image
  references, icon image, overlays, curves, and the smallest/largest pixel value attributes
  (they describe the source's pixels).
* **Filled in** when the source lacks them, so the object is valid: Type 2 attributes the IOD
  needs (empty), Frame of Reference UID (derived from the source series: every slice of one
  source series gets the same one), and the De-identification Method when the source says the
  patient identity was removed without saying how.

Written as Explicit VR Little Endian (uncompressed). Raises EncodeError on input that cannot
make a valid series.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from datetime import datetime
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from dicom_node.encode.common import (
    LO_MAX,
    character_set,
    derived_uid,
    finish_result,
    fit_lo,
    node_equipment,
    node_version,
    select_sources,
    series_description,
)
from dicom_node.errors import EncodeError
from dicom_node.messages import CodedConcept, ModelIdentity, ResultUIDs

#: CID 7203 "Image Derivation": a denoiser smooths the image.
SMOOTHING = CodedConcept("113087", "DCM", "Smoothing")
#: CID 7202 "Source Image Purpose of Reference".
SOURCE_FOR_PROCESSING = CodedConcept("121322", "DCM",
                                     "Source image for image processing operation")

#: Attributes of the source that describe the source instance or its series, not the image
#: geometry or the patient: replaced or left out.
_DROPPED = (
    "ImageType", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "SeriesDate", "SeriesTime", "ContentDate", "ContentTime", "InstanceCreationDate",
    "InstanceCreationTime", "InstanceCreatorUID", "DerivationDescription",
    "DerivationCodeSequence", "SourceImageSequence", "SourceInstanceSequence",
    "SourceImageEvidenceSequence", "IconImageSequence", "Manufacturer", "ManufacturerModelName",
    "SoftwareVersions", "DeviceSerialNumber", "StationName", "DeviceUID",
    "ContributingEquipmentSequence", "SmallestImagePixelValue", "LargestImagePixelValue",
    "ImageComments", "ReferencedRawDataSequence", "BurnedInAnnotation", "NumberOfFrames",
    "SeriesDescriptionCodeSequence", "OriginalAttributesSequence", "DigitalSignaturesSequence",
    "EncryptedAttributesSequence", "HL7StructuredDocumentReferenceSequence",
)
#: Type 2 attributes of the modules written here, added empty when the source lacks them.
#: (Laterality is Type 2C — only for a paired body part — so it is copied, never invented.)
_TYPE2 = (
    "PatientPosition", "PositionReferenceIndicator", "AcquisitionNumber", "SliceThickness",
)
#: Type 2 attributes of the CT Image module (PS3.3 C.8.2.1).
_CT_TYPE2 = ("KVP",)
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Groups of repeating overlay and curve attributes (PS3.3 C.9.2, retired curves).
_REPEATING_GROUPS = (0x5000, 0x6000)


def build_derived_series(
    pairs: Sequence[tuple[Dataset, NDArray[Any]]],
    model: ModelIdentity,
    uids: ResultUIDs,
    route_name: str,
    *,
    timestamp: datetime,
    description: str | None = None,
    derivation: CodedConcept = SMOOTHING,
) -> list[Dataset]:
    """One derived instance per (source dataset, stored pixel values) pair, in pair order.

    ``pixels`` are stored values in the source's representation (its rows and columns, the dtype
    of its Bits Allocated and Pixel Representation, within Bits Stored), as
    :func:`dicom_node.infer.enhance.enhance` returns them. ``description`` overrides the Series
    Description (it must say "AI"; the synthetic-data note is added when it fits and is missing).
    """
    if not pairs:
        raise EncodeError("no enhanced images given: a derived series needs at least one")
    sources = [source for source, _ in pairs]
    source_uids = [str(source.get("SOPInstanceUID", "")) for source in sources]
    headers = select_sources(sources, source_uids)  # one study, every identifying UID present
    repeated = sorted({uid for uid in source_uids if source_uids.count(uid) > 1})
    if repeated:
        raise EncodeError(
            f"source instances given more than once: {', '.join(repeated)} "
            "(each derived instance's UID is derived from its source's)"
        )
    series_text = _series_description(model, description)
    notice = _derivation_description(model, route_name)
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    out = []
    for index, (source, pixels) in enumerate(pairs):
        header = by_uid[str(source.SOPInstanceUID)]
        array = _checked_pixels(source, pixels, index)
        derived = _derived_instance(header, source, array, model, uids, series_text, notice,
                                    derivation, timestamp)
        if derived.get("InstanceNumber") is None:
            derived.InstanceNumber = index + 1
        out.append(derived)
    return out


def _series_description(model: ModelIdentity, description: str | None) -> str:
    if description is None:
        return series_description(model, "enhanced")
    if "AI" not in description.replace("-", " ").split() and not description.startswith("AI"):
        raise EncodeError(
            f"Series Description {description!r} must say that the series is AI-generated "
            "(contain the word 'AI')"
        )
    note = " (synthetic training data)"
    if model.synthetic_training_data and "synthetic" not in description.lower():
        if len(description) + len(note) > LO_MAX:
            return series_description(model, "enhanced")
        description += note
    if len(description) > LO_MAX:
        raise EncodeError(f"Series Description {description!r} is longer than {LO_MAX} characters")
    return description


def _derivation_description(model: ModelIdentity, route_name: str) -> str:
    text = (
        f"AI-generated: enhanced (denoised) by the model {model.name} {model.version} "
        f"({model.manufacturer}) in dicom-node {node_version()}, route {route_name!r}; "
        "not reviewed by a physician."
    )
    if model.synthetic_training_data:
        text += " The model was trained on synthetic data; not for diagnosis."
    return text[:1024]  # ST (PS3.5 Table 6.2-1)


def _stored_range(source: Dataset) -> tuple[int, int]:
    bits = int(source.BitsStored)
    if int(source.PixelRepresentation) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _checked_pixels(source: Dataset, pixels: NDArray[Any], index: int) -> NDArray[Any]:
    uid = source.SOPInstanceUID
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword not in source:
            raise EncodeError(f"source {uid} has no {keyword}")
    if int(source.get("NumberOfFrames", 1) or 1) != 1 or int(source.SamplesPerPixel) != 1:
        raise EncodeError(f"source {uid}: only single-frame one-sample images are derived here")
    array = np.asarray(pixels)
    shape = (int(source.Rows), int(source.Columns))
    if array.shape != shape:
        raise EncodeError(f"pair #{index}: pixels of shape {array.shape} for source {uid} of "
                          f"{shape[0]} rows and {shape[1]} columns")
    bits, signed = int(source.BitsAllocated), int(source.PixelRepresentation) == 1
    if bits not in (8, 16):
        raise EncodeError(f"source {uid}: Bits Allocated {bits} is not 8 or 16")
    expected = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    if array.dtype.kind not in "iu" or array.dtype.itemsize != expected.itemsize \
            or (array.dtype.kind == "i") != signed:
        raise EncodeError(f"pair #{index}: pixels of dtype {array.dtype} for source {uid}, "
                          f"whose stored values are {expected} (Bits Allocated {bits}, "
                          f"Pixel Representation {int(signed)})")
    low, high = _stored_range(source)
    if array.size and (int(array.min()) < low or int(array.max()) > high):
        raise EncodeError(f"pair #{index}: pixel values {int(array.min())}…{int(array.max())} "
                          f"outside the {source.BitsStored} stored bits ({low}…{high})")
    return array.astype(expected.newbyteorder("<"))


def _derived_instance(header: Dataset, source: Dataset, pixels: NDArray[Any],
                      model: ModelIdentity, uids: ResultUIDs, series_text: str, notice: str,
                      derivation: CodedConcept, when: datetime) -> Dataset:
    ds = Dataset()
    for element in header:
        group, number = element.tag.group, element.tag.element
        if element.tag.is_private or number == 0 or (group & 0xFF00) in _REPEATING_GROUPS:
            continue
        if element.keyword in _DROPPED:
            continue
        ds.add(deepcopy(element))
    source_uid = str(source.SOPInstanceUID)
    ds.SOPInstanceUID = derived_uid(uids.series_instance_uid, source_uid)
    ds.SeriesInstanceUID = uids.series_instance_uid
    ds.SeriesNumber = uids.series_number
    ds.SeriesDescription = series_text
    ds.SeriesDate = ds.ContentDate = DA(when.date())
    ds.SeriesTime = ds.ContentTime = TM(when.time())
    ds.Manufacturer = fit_lo(model.manufacturer)
    ds.ManufacturerModelName = fit_lo(model.name)
    ds.SoftwareVersions = [fit_lo(model.version), fit_lo(f"dicom-node {node_version()}")]
    image_type = [str(v) for v in (source.get("ImageType") or [])]
    value3 = image_type[2] if len(image_type) > 2 and image_type[2] else "AXIAL"
    ds.ImageType = ["DERIVED", "SECONDARY", value3]
    ds.DerivationDescription = notice
    ds.DerivationCodeSequence = [derivation.item()]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source_uid
    reference.PurposeOfReferenceCodeSequence = [SOURCE_FOR_PROCESSING.item()]
    reference.SpatialLocationsPreserved = "YES"
    ds.SourceImageSequence = [reference]
    burned = str(source.get("BurnedInAnnotation", "")).upper() == "YES"
    ds.BurnedInAnnotation = "YES" if burned else "NO"
    ds.ContributingEquipmentSequence = _equipment(source, when)
    _fill_required(ds, source)
    ds.SpecificCharacterSet = character_set(
        [series_text, notice, model.name, model.version, model.manufacturer],
        source.get("SpecificCharacterSet"),
    )
    if ds.SpecificCharacterSet is None:
        del ds.SpecificCharacterSet
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if int(source.BitsAllocated) == 8 else "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    finish_result(ds, when)
    return ds


def _fill_required(ds: Dataset, source: Dataset) -> None:
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    # Laterality (Type 2C) is needed for a paired body part: with none stated it is unknown
    # (present, empty); with one stated (CHEST, HEAD …) an invented empty value is an error.
    if "Laterality" not in ds and not ds.get("BodyPartExamined"):
        ds.Laterality = None
    if str(ds.SOPClassUID) == _CT_IMAGE_STORAGE:
        for keyword in _CT_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, None)
    if not ds.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = derived_uid(
            str(source.StudyInstanceUID), str(source.SeriesInstanceUID), "frame-of-reference"
        )


def _equipment(source: Dataset, when: datetime) -> list[Dataset]:
    items: list[Dataset] = [node_equipment(when)]
    manufacturer = str(source.get("Manufacturer", "") or "").strip()
    if manufacturer:
        software = source.get("SoftwareVersions")
        versions = ([str(software)] if isinstance(software, str)
                    else [str(v) for v in software] if software else None)
        items.append(hd.ContributingEquipment(
            manufacturer=fit_lo(manufacturer),
            purpose_of_reference=codes.DCM.AcquisitionEquipment,
            manufacturer_model_name=str(source.get("ManufacturerModelName", "") or "") or None,
            software_versions=versions,
            station_name=str(source.get("StationName", "") or "") or None,
        ))
    return items
