"""The derived (AI-enhanced) series: same study and geometry, new deterministic UIDs, marked
DERIVED and AI-generated, valid CT Images by dciodvfy. No model is run: pixels are given."""

from __future__ import annotations

from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.encode.derived import SMOOTHING, SOURCE_FOR_PROCESSING, build_derived_series
from dicom_node.errors import EncodeError
from dicom_node.messages import ModelIdentity, ResultUIDs
from dicom_node.receive.store_handler import is_own_result
from dicom_node.uids import result_uids
from tests.support.dicom_tools import dciodvfy

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456)
MODEL = ModelIdentity(name="ct-denoise-gan", version="1.0.0", manufacturer="dicom-node project",
                      synthetic_training_data=True, intended_use="Demonstration only")
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
            "SliceLocation", "Rows", "Columns")
REPRESENTATION = ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                  "RescaleSlope", "RescaleIntercept", "RescaleType", "PhotometricInterpretation",
                  "SamplesPerPixel", "PixelPaddingValue")
PATIENT_STUDY = ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber")


def read(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not installed (pydicom / pydicom-data)"
    return pydicom.dcmread(path)


def uids_of(source: Dataset, route: str = "denoise") -> ResultUIDs:
    return result_uids(str(source.StudyInstanceUID), route, MODEL.name, MODEL.version, "derived")


def second_slice(source: Dataset, offset_mm: float) -> Dataset:
    """Another slice of the same series: new SOP Instance UID, moved along z."""
    other = pydicom.dcmread(BytesIO(to_bytes(source)))
    other.SOPInstanceUID = generate_uid(entropy_srcs=[str(source.SOPInstanceUID), "second"])
    position = [float(v) for v in source.ImagePositionPatient]
    other.ImagePositionPatient = [position[0], position[1], position[2] + offset_mm]
    other.InstanceNumber = int(source.get("InstanceNumber", 1) or 1) + 1
    return other


def to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def smoothed(source: Dataset) -> NDArray[Any]:
    """Stand-in for a model's output: the source's stored values, slightly changed."""
    stored = source.pixel_array
    return np.asarray(np.clip(stored.astype(np.int32) + 3, stored.min(), stored.max())
                      .astype(stored.dtype))


def build(*sources: Dataset, **kwargs: Any) -> list[Dataset]:
    pairs = [(s, smoothed(s)) for s in sources]
    return build_derived_series(pairs, MODEL, uids_of(sources[0]), "denoise", timestamp=WHEN,
                                **kwargs)


# ------------------------------------------------------------------------ same study, geometry


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "CT_small.dcm"])
def test_derived_instance_keeps_study_patient_geometry_and_rescale(name: str) -> None:
    source = read(name)
    [derived] = build(source)
    for keyword in PATIENT_STUDY + GEOMETRY + REPRESENTATION:
        if keyword in source:
            assert derived.get(keyword) == source.get(keyword), keyword
    assert derived.SOPClassUID == source.SOPClassUID
    assert derived.Modality == "CT"
    assert derived.InstanceNumber == source.InstanceNumber


def test_derived_pixels_are_the_given_stored_values_uncompressed() -> None:
    source = read("693_J2KR.dcm")  # JPEG 2000 lossless source
    pixels = smoothed(source)
    [derived] = build_derived_series([(source, pixels)], MODEL, uids_of(source), "denoise",
                                     timestamp=WHEN)
    again = pydicom.dcmread(BytesIO(to_bytes(derived)))
    assert again.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(again.pixel_array, pixels)
    assert again.pixel_array.dtype == source.pixel_array.dtype


def test_frame_of_reference_missing_in_source_is_derived_once_per_source_series() -> None:
    source = read("693_UNCR.dcm")  # has no Frame of Reference UID
    assert "FrameOfReferenceUID" not in source
    first, second = build(source, second_slice(source, 5.0))
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert first.FrameOfReferenceUID.startswith("2.25.")
    source_with = read("CT_small.dcm")
    [derived] = build(source_with)
    assert derived.FrameOfReferenceUID == source_with.FrameOfReferenceUID


# ------------------------------------------------------------------------------- new UIDs


def test_series_uid_is_the_results_and_sop_uids_are_new_and_deterministic() -> None:
    source = read("CT_small.dcm")
    other = second_slice(source, 5.0)
    first = build(source, other)
    again = build(source, other)
    uids = uids_of(source)
    assert {d.SeriesInstanceUID for d in first} == {uids.series_instance_uid}
    assert {d.SeriesNumber for d in first} == {uids.series_number}
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert len({d.SOPInstanceUID for d in first}) == 2
    assert source.SOPInstanceUID not in {d.SOPInstanceUID for d in first}
    other_route = build_derived_series([(source, smoothed(source))], MODEL,
                                       uids_of(source, "another-route"), "another-route",
                                       timestamp=WHEN)
    assert other_route[0].SOPInstanceUID != first[0].SOPInstanceUID


def test_same_inputs_and_timestamp_encode_the_same_bytes() -> None:
    source = read("693_UNCR.dcm")
    assert to_bytes(build(source)[0]) == to_bytes(build(source)[0])


# ------------------------------------------------------------------ derived, AI-generated


def test_image_type_derivation_and_source_reference() -> None:
    source = read("CT_small.dcm")
    [derived] = build(source)
    assert list(derived.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    [code] = derived.DerivationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        SMOOTHING.value, SMOOTHING.scheme, SMOOTHING.meaning)
    assert "AI-generated" in derived.DerivationDescription
    assert MODEL.name in derived.DerivationDescription
    [reference] = derived.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    [purpose] = reference.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == (
        SOURCE_FOR_PROCESSING.value, SOURCE_FOR_PROCESSING.scheme)
    assert derived.BurnedInAnnotation == "NO"


def test_series_is_labelled_ai_with_synthetic_note_and_node_software_version() -> None:
    [derived] = build(read("CT_small.dcm"))
    assert derived.SeriesDescription.startswith("AI enhanced: ct-denoise-gan 1.0.0")
    assert "synthetic training data" in derived.SeriesDescription
    assert derived.Manufacturer == MODEL.manufacturer
    assert derived.ManufacturerModelName == MODEL.name
    assert any(str(v).startswith("dicom-node ") for v in derived.SoftwareVersions)
    assert is_own_result(derived.SoftwareVersions)
    [described] = build(read("CT_small.dcm"), description="AI denoised CT")
    assert described.SeriesDescription == "AI denoised CT (synthetic training data)"


def test_dates_come_from_the_timestamp_and_equipment_names_node_and_scanner() -> None:
    source = read("CT_small.dcm")
    [derived] = build(source)
    assert (str(derived.ContentDate), str(derived.ContentTime)) == ("20240506", "070809.123456")
    assert (str(derived.SeriesDate), str(derived.InstanceCreationDate)) == ("20240506",) * 2
    purposes = [item.PurposeOfReferenceCodeSequence[0].CodeValue
                for item in derived.ContributingEquipmentSequence]
    assert purposes == ["109102", "109101"]  # Processing Equipment, Acquisition Equipment
    assert derived.ContributingEquipmentSequence[1].Manufacturer == source.Manufacturer


def test_private_tags_group_lengths_and_source_derivation_are_dropped() -> None:
    source = read("693_UNCR.dcm")  # has group lengths and a Derivation Code Sequence
    assert Dataset.__contains__(source, 0x00080000)
    source.add_new(0x00091010, "LO", "private")
    [derived] = build(source)
    assert all(element.tag.element != 0 for element in derived)
    assert not any(element.tag.is_private for element in derived)
    assert [c.CodeValue for c in derived.DerivationCodeSequence] == [SMOOTHING.value]
    assert derived.SoftwareVersions[0] == MODEL.version  # not the scanner's


# ----------------------------------------------------------------------------- dciodvfy


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "693_J2KR.dcm", "CT_small.dcm"])
def test_derived_ct_image_passes_dciodvfy(name: str, tmp_path: Path) -> None:
    [derived] = build(read(name))
    path = tmp_path / "derived.dcm"
    derived.save_as(path, enforce_file_format=True)
    report = dciodvfy(path)
    assert report.errors == (), report.output
    assert "CTImage" in report.output


# ------------------------------------------------------------------------------ bad input


def test_no_pairs_is_refused() -> None:
    with pytest.raises(EncodeError, match="at least one"):
        build_derived_series([], MODEL, uids_of(read("CT_small.dcm")), "r", timestamp=WHEN)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((64, 64), np.int16), "shape"),
        (np.zeros((128, 128), np.float32), "dtype"),
        (np.zeros((128, 128), np.uint16), "dtype"),
        (np.full((128, 128), 40000, np.int32), "dtype"),
    ],
)
def test_pixels_that_do_not_fit_the_source_are_refused(pixels: NDArray[Any],
                                                       message: str) -> None:
    source = read("CT_small.dcm")
    with pytest.raises(EncodeError, match=message):
        build_derived_series([(source, pixels)], MODEL, uids_of(source), "r", timestamp=WHEN)


def test_values_beyond_bits_stored_are_refused() -> None:
    source = read("693_UNCR.dcm")  # 14 bits stored, signed
    pixels = np.full((512, 512), 9000, np.int16)
    with pytest.raises(EncodeError, match="outside the 14 stored bits"):
        build_derived_series([(source, pixels)], MODEL, uids_of(source), "r", timestamp=WHEN)


def test_sources_of_two_studies_or_repeated_sources_are_refused() -> None:
    small, head = read("CT_small.dcm"), read("693_UNCR.dcm")
    with pytest.raises(EncodeError, match="more than one study"):
        build(small, head)
    with pytest.raises(EncodeError, match="more than once"):
        build(small, small)


def test_series_description_must_say_ai() -> None:
    with pytest.raises(EncodeError, match="AI-generated"):
        build(read("CT_small.dcm"), description="Denoised CT")
