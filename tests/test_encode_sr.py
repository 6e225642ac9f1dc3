"""The classifier SR (TID 1500 Measurement Report), built from real images, checked by dciodvfy."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from dicom_node.encode import build_classification_sr
from dicom_node.encode.sr import ABSENT, PRESENT, PROBABILITY
from dicom_node.errors import EncodeError
from dicom_node.messages import (
    ClassificationResult,
    CodedConcept,
    Finding,
    ModelIdentity,
    ResultUIDs,
)
from dicom_node.uids import result_uids
from tests.support.dicom_tools import dciodvfy, dsrdump

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456)
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
MODEL = ModelIdentity(
    name="chest-cls",
    version="1.2.0",
    manufacturer="Example AI Lab",
    synthetic_training_data=False,
    intended_use="Triage of adult chest radiographs",
)
SYNTHETIC_MODEL = ModelIdentity(
    name="chest-cls", version="0.1.0", manufacturer="Example AI Lab", synthetic_training_data=True
)


def _header(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


@pytest.fixture(params=["RG1_UNCR.dcm", "CT_small.dcm"], ids=["chest-CR", "CT"])
def source(request: pytest.FixtureRequest) -> Dataset:
    return _header(request.param)


@pytest.fixture
def chest_cr() -> Dataset:
    return _header("RG1_UNCR.dcm")


def _result(source: Dataset, model: ModelIdentity = MODEL) -> ClassificationResult:
    return ClassificationResult(
        model=model,
        findings=(
            Finding(PNEUMOTHORAX, probability=0.87, threshold=0.5),
            Finding(PNEUMONIA, probability=0.12345678901234567, threshold=0.4),
        ),
        source_sop_instance_uids=(source.SOPInstanceUID,),
    )


def _uids(source: Dataset, model: ModelIdentity = MODEL) -> ResultUIDs:
    return result_uids(source.StudyInstanceUID, "chest", model.name, model.version, "sr")


def _build(source: Dataset, model: ModelIdentity = MODEL) -> Dataset:
    return build_classification_sr(
        [source], _result(source, model), _uids(source, model), "chest", timestamp=WHEN
    )


def _write(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def _read(dataset: Dataset, tmp_path: Path) -> hd.sr.EnhancedSR:
    return hd.sr.srread(_write(dataset, tmp_path / "sr.dcm"))


def _notice(sr: Dataset) -> str:
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    return str(container.ContentSequence[0].TextValue)


# --- conformance -------------------------------------------------------------------------------


def test_sr_passes_dciodvfy_without_errors_and_dsrdump_parses_it(
    source: Dataset, tmp_path: Path
) -> None:
    path = _write(_build(source), tmp_path / "sr.dcm")

    iod = dciodvfy(path)
    assert iod.errors == (), iod.output
    assert "EnhancedSR" in iod.output
    tree = dsrdump(path)
    assert tree.returncode == 0, tree.output
    assert tree.errors == ()
    assert "Imaging Measurement Report" in tree.output


def test_sr_with_synthetic_model_and_non_ascii_text_passes_dciodvfy(
    chest_cr: Dataset, tmp_path: Path
) -> None:
    model = ModelIdentity("Lungen-Klassifikator für Röntgen", "2.0", "Bildlabor Zürich", True)
    path = _write(_build(chest_cr, model), tmp_path / "sr.dcm")

    assert dciodvfy(path).errors == ()
    assert dsrdump(path).returncode == 0
    reread = pydicom.dcmread(path)
    assert reread.SpecificCharacterSet == "ISO_IR 192"
    assert reread.Manufacturer == "Bildlabor Zürich"
    assert reread.PatientName == chest_cr.PatientName


# --- place in the study ------------------------------------------------------------------------


def test_sr_is_a_new_series_in_the_source_study(source: Dataset, tmp_path: Path) -> None:
    uids = _uids(source)
    sr = _read(_build(source), tmp_path)

    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID == uids.series_instance_uid
    assert sr.SOPInstanceUID == uids.sop_instance_uid
    assert sr.SeriesNumber == uids.series_number
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == pydicom.uid.EnhancedSRStorage


def test_sr_copies_patient_and_study_attributes_from_the_source(
    source: Dataset, tmp_path: Path
) -> None:
    sr = _read(_build(source), tmp_path)

    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "StudyDescription",
    ):
        assert sr.get(keyword) == source.get(keyword), keyword


# --- content -----------------------------------------------------------------------------------


def test_each_finding_is_a_group_with_its_probability_and_present_or_absent(
    source: Dataset, tmp_path: Path
) -> None:
    sr = _read(_build(source), tmp_path)

    groups = sr.content.get_image_measurement_groups()
    assert [g.finding_type.value for g in groups] == [PNEUMOTHORAX.value, PNEUMONIA.value]
    expected = [(PNEUMOTHORAX, 0.87, PRESENT), (PNEUMONIA, 0.12345678901234567, ABSENT)]
    for group, (concept, probability, presence) in zip(groups, expected, strict=True):
        (measurement,) = group.get_measurements(name=PROBABILITY)
        assert measurement.value == probability
        assert measurement.unit.value == "1"
        (evaluation,) = group.get_qualitative_evaluations(
            name=hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)
        )
        assert evaluation.value == presence


def test_decision_threshold_is_recorded_as_an_algorithm_parameter(
    chest_cr: Dataset, tmp_path: Path
) -> None:
    sr = _read(_build(chest_cr), tmp_path)

    parameters = [
        [
            item.TextValue
            for item in group[0].ContentSequence
            if item.name == codes.DCM.AlgorithmParameters
        ]
        for group in sr.content.get_image_measurement_groups()
    ]
    assert parameters == [["decision threshold 0.5"], ["decision threshold 0.4"]]


def test_device_observer_names_the_model_its_version_and_manufacturer(
    source: Dataset, tmp_path: Path
) -> None:
    sr = _read(_build(source), tmp_path)

    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.name == "chest-cls 1.2.0"
    assert device.model_name == "chest-cls"
    assert device.manufacturer_name == "Example AI Lab"


def test_sr_references_the_source_images_in_evidence_and_in_every_group(
    source: Dataset, tmp_path: Path
) -> None:
    sr = _read(_build(source), tmp_path)

    assert sr.get_evidence(current_procedure_only=True) == [
        (
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
            source.SOPInstanceUID,
            source.SOPClassUID,
        )
    ]
    for group in sr.content.get_image_measurement_groups():
        assert [image.referenced_sop_instance_uid for image in group.source_images] == [
            source.SOPInstanceUID
        ]


def test_sr_references_only_the_instances_the_model_looked_at(tmp_path: Path) -> None:
    first = _header("CT_small.dcm")
    second = _header("CT_small.dcm")
    second.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["second CT_small"])
    unused = _header("CT_small.dcm")
    unused.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["unused CT_small"])
    result = ClassificationResult(
        MODEL,
        (Finding(PNEUMONIA, 0.3, 0.5),),
        (second.SOPInstanceUID, first.SOPInstanceUID),
    )

    dataset = build_classification_sr(
        [first, second, unused], result, _uids(first), "chest", timestamp=WHEN
    )

    sr = _read(dataset, tmp_path)
    (group,) = sr.content.get_image_measurement_groups()
    referenced = [image.referenced_sop_instance_uid for image in group.source_images]
    assert referenced == [second.SOPInstanceUID, first.SOPInstanceUID]
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert dciodvfy(tmp_path / "sr.dcm").errors == ()


def test_every_group_references_every_image_of_a_series_and_dciodvfy_passes(
    tmp_path: Path,
) -> None:
    """The image items are built once and shared by the groups; each group still lists them."""
    sources = []
    for index in range(3):
        ds = _header("CT_small.dcm")
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["series", str(index)])
        sources.append(ds)
    uids = tuple(str(ds.SOPInstanceUID) for ds in sources)
    result = ClassificationResult(
        MODEL, (Finding(PNEUMOTHORAX, 0.9, 0.5), Finding(PNEUMONIA, 0.1, 0.4)), uids)

    dataset = build_classification_sr(sources, result, _uids(sources[0]), "chest",
                                      timestamp=WHEN)

    sr = _read(dataset, tmp_path)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        assert tuple(image.referenced_sop_instance_uid for image in group.source_images) == uids
    assert dciodvfy(tmp_path / "sr.dcm").errors == ()


# --- labelled as AI ----------------------------------------------------------------------------


def test_sr_is_labelled_ai_generated_and_unverified(chest_cr: Dataset, tmp_path: Path) -> None:
    sr = _read(_build(chest_cr), tmp_path)

    assert sr.SeriesDescription == "AI result: chest-cls 1.2.0"
    assert sr.Manufacturer == "Example AI Lab"
    assert sr.ManufacturerModelName == "chest-cls"
    assert sr.SoftwareVersions[0] == "1.2.0"
    assert sr.SoftwareVersions[1].startswith("dicom-node ")
    assert sr.VerificationFlag == "UNVERIFIED"
    notice = _notice(sr)
    assert notice.startswith("AI-generated result of the model chest-cls version 1.2.0")
    assert "Intended use: Triage of adult chest radiographs" in notice
    assert "synthetic" not in notice
    assert "synthetic" not in sr.SeriesDescription


def test_model_trained_on_synthetic_data_is_stated_in_description_and_content(
    chest_cr: Dataset, tmp_path: Path
) -> None:
    sr = _read(_build(chest_cr, SYNTHETIC_MODEL), tmp_path)

    assert sr.SeriesDescription == "AI result: chest-cls 0.1.0 (synthetic training data)"
    assert "trained on synthetic data" in _notice(sr)


def test_long_model_name_is_shortened_but_keeps_ai_label_version_and_synthetic_note(
    chest_cr: Dataset, tmp_path: Path
) -> None:
    model = ModelIdentity("x" * 80, "10.20.30", "Example AI Lab", True)
    sr = _read(_build(chest_cr, model), tmp_path)

    description = sr.SeriesDescription
    assert len(description) == 64
    assert description.startswith("AI result: xxx")
    assert description.endswith("... 10.20.30 (synthetic training data)")


# --- determinism -------------------------------------------------------------------------------


def test_building_twice_with_the_same_inputs_gives_identical_bytes(
    source: Dataset, tmp_path: Path
) -> None:
    first = _write(_build(source), tmp_path / "first.dcm").read_bytes()
    second = _write(_build(source), tmp_path / "second.dcm").read_bytes()

    assert first == second


def test_building_leaves_the_source_dataset_unchanged(chest_cr: Dataset) -> None:
    before = chest_cr.to_json_dict()

    _build(chest_cr)

    assert chest_cr.to_json_dict() == before


def test_source_with_pixel_data_is_referenced_without_copying_pixels(tmp_path: Path) -> None:
    full = pydicom.dcmread(get_testdata_file("CT_small.dcm"))

    sr = _build(full)

    assert "PixelData" not in sr
    assert dciodvfy(_write(sr, tmp_path / "sr.dcm")).errors == ()


# --- bad input ---------------------------------------------------------------------------------


def test_no_sources_is_refused(chest_cr: Dataset) -> None:
    with pytest.raises(EncodeError, match="no source instances"):
        build_classification_sr([], _result(chest_cr), _uids(chest_cr), "chest", timestamp=WHEN)


def test_sources_from_two_studies_are_refused(chest_cr: Dataset) -> None:
    ct = _header("CT_small.dcm")

    with pytest.raises(EncodeError, match="more than one study"):
        build_classification_sr(
            [chest_cr, ct], _result(chest_cr), _uids(chest_cr), "chest", timestamp=WHEN
        )


@pytest.mark.parametrize("probability", [-0.01, 1.5, math.nan, math.inf])
def test_probability_outside_zero_to_one_is_refused(chest_cr: Dataset, probability: float) -> None:
    result = ClassificationResult(
        MODEL, (Finding(PNEUMOTHORAX, probability, 0.5),), (chest_cr.SOPInstanceUID,)
    )

    with pytest.raises(EncodeError, match=r"Pneumothorax.*probability.*outside \[0, 1\]"):
        build_classification_sr([chest_cr], result, _uids(chest_cr), "chest", timestamp=WHEN)


def test_threshold_outside_zero_to_one_is_refused(chest_cr: Dataset) -> None:
    result = ClassificationResult(
        MODEL, (Finding(PNEUMOTHORAX, 0.5, 2.0),), (chest_cr.SOPInstanceUID,)
    )

    with pytest.raises(EncodeError, match="threshold"):
        build_classification_sr([chest_cr], result, _uids(chest_cr), "chest", timestamp=WHEN)


def test_result_without_findings_is_refused(chest_cr: Dataset) -> None:
    result = ClassificationResult(MODEL, (), (chest_cr.SOPInstanceUID,))

    with pytest.raises(EncodeError, match="no findings"):
        build_classification_sr([chest_cr], result, _uids(chest_cr), "chest", timestamp=WHEN)


def test_reference_to_an_instance_not_among_the_sources_is_refused(chest_cr: Dataset) -> None:
    result = ClassificationResult(MODEL, (Finding(PNEUMOTHORAX, 0.5, 0.5),), ("1.2.3.4",))

    with pytest.raises(EncodeError, match=r"not among the sources: 1\.2\.3\.4"):
        build_classification_sr([chest_cr], result, _uids(chest_cr), "chest", timestamp=WHEN)


def test_result_without_source_references_is_refused(chest_cr: Dataset) -> None:
    result = ClassificationResult(MODEL, (Finding(PNEUMOTHORAX, 0.5, 0.5),), ())

    with pytest.raises(EncodeError, match="names no source"):
        build_classification_sr([chest_cr], result, _uids(chest_cr), "chest", timestamp=WHEN)


def test_source_without_sop_instance_uid_is_refused(chest_cr: Dataset) -> None:
    del chest_cr.SOPInstanceUID

    with pytest.raises(EncodeError, match="source #0 has no SOPInstanceUID"):
        build_classification_sr(
            [chest_cr], _result(_header("RG1_UNCR.dcm")), _uids(chest_cr), "chest", timestamp=WHEN
        )


def test_private_coding_scheme_of_a_finding_is_identified(
    chest_cr: Dataset, tmp_path: Path
) -> None:
    local = CodedConcept("NODULE-1", "99DICOMNODE", "Suspicious nodule")
    result = ClassificationResult(MODEL, (Finding(local, 0.6, 0.5),), (chest_cr.SOPInstanceUID,))

    dataset = build_classification_sr([chest_cr], result, _uids(chest_cr), "chest", timestamp=WHEN)

    schemes = [item.CodingSchemeDesignator for item in dataset.CodingSchemeIdentificationSequence]
    assert schemes == ["99DICOMNODE"]
    assert dciodvfy(_write(dataset, tmp_path / "sr.dcm")).errors == ()
