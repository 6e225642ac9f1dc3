"""The segmenter's results: SEG (PS3.3 A.51) and nodule SR (TID 1500/1411), built from real CT
slices (pydicom's CT_small.dcm placed along z, and Enhanced CT multi-frame images), checked with
dciodvfy and dsrdump and read back with highdicom."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.encode.nodule_sr import (
    CUBIC_MILLIMETER,
    LONG_AXIS,
    MILLIMETER,
    VOLUME,
    build_nodule_sr,
)
from dicom_node.encode.seg import ARTIFICIAL_INTELLIGENCE, build_segmentation
from dicom_node.encode.seg import to_hd_code as code
from dicom_node.encode.sr import ABSENT, PRESENT, PROBABILITY
from dicom_node.errors import EncodeError
from dicom_node.messages import (
    CodedConcept,
    ModelIdentity,
    ResultUIDs,
    SegmentationResult,
    SegmentedRegion,
    SourceFrame,
)
from dicom_node.uids import result_uids
from tests.support.dicom_tools import dciodvfy, dsrdump

WHEN = datetime(2024, 5, 6, 7, 8, 9, 123456)
ROUTE = "chest-ct"
NODULE = CodedConcept("27925004", "SCT", "Nodule")
ABNORMAL = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
MODEL = ModelIdentity("lung-nodules", "1.0.0", "Example AI Lab", False, "Lung nodules on chest CT")
SYNTHETIC = ModelIdentity("lung-nodules", "0.1.0", "Example AI Lab", True)
#: Slices of the test series, and the distance between them (mm).
SLICES = 6
SPACING = 5.0


# --- sources -----------------------------------------------------------------------------------


def ct_series(count: int = SLICES, series: str = "series-a") -> list[Dataset]:
    """CT_small.dcm (128 x 128) copied into ``count`` slices of one series along z."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid(entropy_srcs=[series])
    slices = []
    for index in range(count):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(index)])
        ds.InstanceNumber = index + 1
        z = -75.7 + SPACING * index
        ds.ImagePositionPatient = [-158.135803, -179.035797, z]
        ds.SliceLocation = z
        slices.append(ds)
    return slices


def enhanced_ct(slices: Sequence[Dataset]) -> Dataset:
    """A multi-frame (Legacy Converted Enhanced CT) image of the same slices."""
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        list(slices),
        series_instance_uid=generate_uid(entropy_srcs=["enhanced series"]),
        series_number=501,
        sop_instance_uid=generate_uid(entropy_srcs=["enhanced instance"]),
        instance_number=1,
    )


def frame_z(image: Dataset, frame_number: int) -> float:
    item = image.PerFrameFunctionalGroupsSequence[frame_number - 1]
    return float(item.PlanePositionSequence[0].ImagePositionPatient[2])


def spatial_frames(image: Dataset) -> tuple[SourceFrame, ...]:
    """The frames of a multi-frame image ordered along z (not in file order)."""
    numbers = sorted(range(1, int(image.NumberOfFrames) + 1), key=lambda n: frame_z(image, n))
    return tuple(SourceFrame(image.SOPInstanceUID, n) for n in numbers)


def two_nodules(frames: int, rows: int = 128, columns: int = 128) -> NDArray[np.uint8]:
    mask = np.zeros((frames, rows, columns), np.uint8)
    mask[1:4, 40:50, 40:52] = 1  # nodule 1 on frames 1-3
    mask[2, 90:94, 90:95] = 1  # nodule 2 on frame 2
    return mask


REGIONS = (
    SegmentedRegion(1, 1587.5, 16.25, (-120.0, -150.5, -65.7), 0.91, (1, 2, 3)),
    SegmentedRegion(1, 8.75, 3.5, (-100.0, -120.0, -65.7), 0.62, (2,)),
)


def result(
    frames: tuple[SourceFrame, ...],
    mask: NDArray[np.uint8] | None = None,
    regions: tuple[SegmentedRegion, ...] = REGIONS,
    model: ModelIdentity = MODEL,
) -> SegmentationResult:
    return SegmentationResult(
        model=model,
        segments=((NODULE, ABNORMAL),),
        frames=frames,
        mask=two_nodules(len(frames)) if mask is None else mask,
        regions=regions,
    )


def uids(source: Dataset, what: str, model: ModelIdentity = MODEL) -> ResultUIDs:
    return result_uids(source.StudyInstanceUID, ROUTE, model.name, model.version, what)


def single_frames() -> tuple[list[Dataset], SegmentationResult]:
    slices = ct_series()
    return slices, result(tuple(SourceFrame(s.SOPInstanceUID) for s in slices))


def multi_frame() -> tuple[list[Dataset], SegmentationResult]:
    image = enhanced_ct(ct_series())
    return [image], result(spatial_frames(image))


def supplemental() -> tuple[list[Dataset], SegmentationResult]:
    """pydicom's Enhanced CT: 2 frames of 512 x 512, stored in descending z order."""
    image = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    mask = np.zeros((2, 512, 512), np.uint8)
    mask[1, 200:230, 250:270] = 1
    region = SegmentedRegion(1, 600.0, 12.0, (0.0, 0.0, -149.0), 0.8, (1,))
    return [image], result(spatial_frames(image), mask, (region,))


LAYOUTS = {"single-frame": single_frames, "multi-frame": multi_frame, "enhanced-ct": supplemental}


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def case(request: pytest.FixtureRequest) -> tuple[list[Dataset], SegmentationResult]:
    return LAYOUTS[request.param]()


def build_seg(sources: Sequence[Dataset], res: SegmentationResult) -> Dataset:
    return build_segmentation(sources, res, uids(sources[0], "seg", res.model), ROUTE,
                              timestamp=WHEN)


def build_both(sources: Sequence[Dataset], res: SegmentationResult) -> tuple[Dataset, Dataset]:
    seg = build_seg(sources, res)
    sr = build_nodule_sr(sources, res, seg, uids(sources[0], "sr", res.model), ROUTE,
                         timestamp=WHEN)
    return seg, sr


def write(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


# --- conformance -------------------------------------------------------------------------------


def test_seg_and_sr_pass_dciodvfy_and_dsrdump_parses_the_sr(
    case: tuple[list[Dataset], SegmentationResult], tmp_path: Path
) -> None:
    seg, sr = build_both(*case)

    seg_report = dciodvfy(write(seg, tmp_path / "seg.dcm"))
    sr_report = dciodvfy(write(sr, tmp_path / "sr.dcm"))
    tree = dsrdump(tmp_path / "sr.dcm")

    assert seg_report.errors == (), seg_report.output
    assert "Segmentation" in seg_report.output
    assert sr_report.errors == (), sr_report.output
    assert tree.returncode == 0 and tree.errors == () and tree.warnings == (), tree.output
    assert "Imaging Measurement Report" in tree.output


def test_seg_of_an_empty_mask_is_still_valid_and_keeps_every_frame(tmp_path: Path) -> None:
    slices = ct_series()
    res = result(tuple(SourceFrame(s.SOPInstanceUID) for s in slices),
                 np.zeros((SLICES, 128, 128), np.uint8), ())

    seg = build_seg(slices, res)

    assert dciodvfy(write(seg, tmp_path / "seg.dcm")).errors == ()
    assert seg.NumberOfFrames == SLICES
    pixels = hd.seg.segread(tmp_path / "seg.dcm").get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in slices], combine_segments=True
    )
    assert pixels.shape == (SLICES, 128, 128) and not pixels.any()


# --- reading back ------------------------------------------------------------------------------


def test_mask_round_trips_through_highdicom_for_single_frame_sources(tmp_path: Path) -> None:
    slices, res = single_frames()
    write(build_seg(slices, res), tmp_path / "seg.dcm")

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = seg.get_pixels_by_source_instance(
        [f.sop_instance_uid for f in res.frames], combine_segments=True
    )

    np.testing.assert_array_equal(pixels, res.mask)


def test_mask_round_trips_for_frames_of_a_multi_frame_source(tmp_path: Path) -> None:
    (image,), res = multi_frame()
    write(build_seg([image], res), tmp_path / "seg.dcm")

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = seg.get_pixels_by_source_frame(
        image.SOPInstanceUID,
        [f.frame_number for f in res.frames],
        combine_segments=True,
        assert_missing_frames_are_empty=True,  # empty frames are not encoded
    )

    np.testing.assert_array_equal(pixels, res.mask)


def test_only_frames_that_contain_the_segment_are_encoded_each_naming_its_source_frame(
    case: tuple[list[Dataset], SegmentationResult],
) -> None:
    sources, res = case
    seg = build_seg(sources, res)

    nonempty = [res.frames[i] for i in range(len(res.frames)) if res.mask[i].any()]
    assert seg.NumberOfFrames == len(nonempty)
    referenced = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        (derivation,) = item.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        number = int(source.get("ReferencedFrameNumber", 1))
        referenced.append(SourceFrame(source.ReferencedSOPInstanceUID, number))
    assert sorted(referenced, key=str) == sorted(nonempty, key=str)


def test_frame_of_a_multi_frame_source_is_referenced_alone_when_others_share_its_position(
    tmp_path: Path,
) -> None:
    image = enhanced_ct(ct_series())
    by_z = spatial_frames(image)
    # a second phase: the second frame along z is moved onto the first
    twin, used = by_z[1], by_z[0]
    position = image.PerFrameFunctionalGroupsSequence[used.frame_number - 1].PlanePositionSequence
    image.PerFrameFunctionalGroupsSequence[twin.frame_number - 1].PlanePositionSequence = (
        copy.deepcopy(position)
    )
    frames = (used, *by_z[2:])
    mask = np.zeros((len(frames), 128, 128), np.uint8)
    mask[0, 10:20, 10:20] = 1
    region = SegmentedRegion(1, 100.0, 14.0, (0.0, 0.0, 0.0), 0.7, (0,))

    seg = build_seg([image], result(frames, mask, (region,)))

    (item,) = seg.PerFrameFunctionalGroupsSequence
    (source,) = item.DerivationImageSequence[0].SourceImageSequence
    assert source.ReferencedFrameNumber == used.frame_number
    assert dciodvfy(write(seg, tmp_path / "seg.dcm")).errors == ()


def test_segment_says_what_it_is_and_which_ai_model_made_it() -> None:
    slices, res = single_frames()
    seg = hd.seg.Segmentation.from_dataset(build_seg(slices, res))

    description = seg.get_segment_description(1)
    assert description.segment_label == "Nodule"
    assert description.segmented_property_type == code(NODULE)
    assert description.segmented_property_category == code(ABNORMAL)
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = description.algorithm_identification[0]
    assert algorithm.AlgorithmName == "lung-nodules"
    assert algorithm.AlgorithmVersion == "1.0.0"
    assert hd.sr.CodedConcept.from_dataset(algorithm.AlgorithmFamilyCodeSequence[0]) == (
        ARTIFICIAL_INTELLIGENCE
    )
    assert codes.cid7162.ArtificialIntelligence == ARTIFICIAL_INTELLIGENCE
    assert seg.SegmentationType == "BINARY"


# --- place in the study, AI labelling ------------------------------------------------------------


def test_seg_and_sr_are_new_series_in_the_source_study(
    case: tuple[list[Dataset], SegmentationResult],
) -> None:
    sources, res = case
    seg, sr = build_both(sources, res)

    for dataset, what, modality in ((seg, "seg", "SEG"), (sr, "sr", "SR")):
        expected = uids(sources[0], what)
        assert dataset.StudyInstanceUID == sources[0].StudyInstanceUID
        assert dataset.SeriesInstanceUID == expected.series_instance_uid
        assert dataset.SOPInstanceUID == expected.sop_instance_uid
        assert dataset.SeriesNumber == expected.series_number
        assert dataset.Modality == modality
        assert dataset.PatientID == sources[0].PatientID
        assert dataset.PatientName == sources[0].PatientName


def test_results_are_labelled_ai_generated_and_say_when_training_data_was_synthetic() -> None:
    slices, res = single_frames()
    seg, sr = build_both(slices, res)
    synthetic_seg, synthetic_sr = build_both(slices, result(res.frames, model=SYNTHETIC))

    assert seg.SeriesDescription == "AI segmentation: lung-nodules 1.0.0"
    assert sr.SeriesDescription == "AI measurements: lung-nodules 1.0.0"
    assert seg.ImageComments.startswith("AI-generated result of the model lung-nodules")
    assert seg.SoftwareVersions[0] == "1.0.0"
    assert synthetic_seg.SeriesDescription.endswith("(synthetic training data)")
    assert synthetic_sr.SeriesDescription.endswith("(synthetic training data)")
    assert "trained on synthetic data" in synthetic_seg.ImageComments
    assert sr.VerificationFlag == "UNVERIFIED"


def build_for(model: ModelIdentity) -> tuple[Dataset, Dataset]:
    slices = ct_series()
    frames = tuple(SourceFrame(s.SOPInstanceUID) for s in slices)
    return build_both(slices, result(frames, model=model))


def test_non_ascii_model_names_are_encoded_in_utf8_and_pass_dciodvfy(tmp_path: Path) -> None:
    model = ModelIdentity("Lungenrundherde für CT", "2.0", "Bildlabor Zürich", True)

    for dataset, name in zip(build_for(model), ("seg.dcm", "sr.dcm"), strict=True):
        report = dciodvfy(write(dataset, tmp_path / name))
        assert report.errors == (), report.output
        reread = pydicom.dcmread(tmp_path / name)
        assert reread.SpecificCharacterSet == "ISO_IR 192"
        assert reread.Manufacturer == "Bildlabor Zürich"


def test_long_model_names_are_shortened_to_fit_and_pass_dciodvfy(tmp_path: Path) -> None:
    model = ModelIdentity("lung-nodule-segmenter-" + "x" * 70, "10.20.30", "Example AI Lab", True)
    seg, sr = build_for(model)

    for dataset, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        assert dciodvfy(write(dataset, tmp_path / name)).errors == ()
        assert len(dataset.SeriesDescription) == 64
        assert dataset.SeriesDescription.endswith("... 10.20.30 (synthetic training data)")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert len(algorithm.AlgorithmName) == 64


def test_long_non_ascii_model_names_fit_lo_in_bytes(tmp_path: Path) -> None:
    model = ModelIdentity("Lungenrundherd-Segmentierer für CT " + "x" * 60, "2.0", "Lab", True)

    for dataset, name in zip(build_for(model), ("seg.dcm", "sr.dcm"), strict=True):
        assert dciodvfy(write(dataset, tmp_path / name)).errors == ()


# --- the SR's content --------------------------------------------------------------------------


def read_sr(sr: Dataset, tmp_path: Path) -> hd.sr.EnhancedSR:
    return hd.sr.srread(write(sr, tmp_path / "sr.dcm"))


def test_sr_has_one_volumetric_group_per_region_with_its_measurements(tmp_path: Path) -> None:
    slices, res = single_frames()
    sr = read_sr(build_both(slices, res)[1], tmp_path)

    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Nodule 1 of 2", "Nodule 2 of 2"]
    for group, region in zip(groups, REGIONS, strict=True):
        assert group.finding_type == code(NODULE)
        assert group.finding_category == code(ABNORMAL)
        (volume,) = group.get_measurements(name=code(VOLUME))
        (long_axis,) = group.get_measurements(name=code(LONG_AXIS))
        (probability,) = group.get_measurements(name=PROBABILITY)
        assert (volume.value, volume.unit) == (region.volume_mm3, code(CUBIC_MILLIMETER))
        assert (long_axis.value, long_axis.unit) == (region.longest_diameter_mm, code(MILLIMETER))
        assert probability.value == region.mean_probability
        (presence,) = group.get_qualitative_evaluations(name=code(NODULE))
        assert presence.value == PRESENT


def test_sr_groups_reference_the_seg_segment_and_their_region_frames(
    case: tuple[list[Dataset], SegmentationResult], tmp_path: Path
) -> None:
    sources, res = case
    seg, sr = build_both(sources, res)

    groups = read_sr(sr, tmp_path).content.get_volumetric_roi_measurement_groups()
    for group, region in zip(groups, res.regions, strict=True):
        reference = group.referenced_segment
        assert reference is not None
        segment = reference[0]
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment.referenced_sop_class_uid == seg.SOPClassUID
        assert segment.ReferencedSOPSequence[0].ReferencedSegmentNumber == 1
        images = [
            (item.referenced_sop_instance_uid,
             item.ReferencedSOPSequence[0].get("ReferencedFrameNumber"))
            for item in reference[1:]
        ]
        frames = [res.frames[i] for i in sorted(region.frames)]
        if "PerFrameFunctionalGroupsSequence" in sources[0]:
            assert len(images) == 1 and images[0][0] == sources[0].SOPInstanceUID
            numbers = images[0][1]
            numbers = [numbers] if isinstance(numbers, int) else list(numbers)
            assert numbers == sorted(f.frame_number for f in frames)
        else:
            assert [uid for uid, _ in images] == [f.sop_instance_uid for f in frames]


def test_sr_evidence_lists_the_seg_and_the_source_images(tmp_path: Path) -> None:
    slices, res = single_frames()
    seg, sr = build_both(slices, res)

    evidence = {uid for _, _, uid, _ in read_sr(sr, tmp_path).get_evidence()}

    assert evidence == {seg.SOPInstanceUID} | {s.SOPInstanceUID for s in slices}


def test_device_observer_and_algorithm_name_the_model_and_version(tmp_path: Path) -> None:
    slices, res = single_frames()
    sr = read_sr(build_both(slices, res)[1], tmp_path)

    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert observer.observer_identifying_attributes.name == "lung-nodules 1.0.0"
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    texts = [(item.name, item.TextValue) for item in group[0].ContentSequence
             if item.ValueType == "TEXT"]
    assert (codes.DCM.AlgorithmName, "lung-nodules") in texts
    assert (codes.DCM.AlgorithmVersion, "1.0.0") in texts


def test_sr_without_regions_says_no_nodule_and_needs_no_seg(tmp_path: Path) -> None:
    slices = ct_series()
    res = result(tuple(SourceFrame(s.SOPInstanceUID) for s in slices),
                 np.zeros((SLICES, 128, 128), np.uint8), ())

    sr = build_nodule_sr(slices, res, None, uids(slices[0], "sr"), ROUTE, timestamp=WHEN)

    assert dciodvfy(write(sr, tmp_path / "sr.dcm")).errors == ()
    assert dsrdump(tmp_path / "sr.dcm").returncode == 0
    document = hd.sr.srread(tmp_path / "sr.dcm")
    assert document.content.get_volumetric_roi_measurement_groups() == []
    (group,) = document.content.get_image_measurement_groups()
    (absent,) = group.get_qualitative_evaluations(name=code(NODULE))
    assert absent.value == ABSENT
    assert [image.referenced_sop_instance_uid for image in group.source_images] == [
        s.SOPInstanceUID for s in slices
    ]
    comments = [item.TextValue for item in sr.ContentSequence[-1].ContentSequence]
    assert comments[1] == "No nodule detected by the model lung-nodules version 1.0.0."


# --- determinism ---------------------------------------------------------------------------------


def test_building_twice_gives_identical_bytes(
    case: tuple[list[Dataset], SegmentationResult], tmp_path: Path
) -> None:
    first = [write(d, tmp_path / f"a{i}.dcm").read_bytes() for i, d in enumerate(build_both(*case))]
    again = [write(d, tmp_path / f"b{i}.dcm").read_bytes() for i, d in enumerate(build_both(*case))]

    assert first == again


def test_building_leaves_the_sources_unchanged() -> None:
    slices, res = single_frames()
    before = [s.to_json_dict() for s in slices]

    build_both(slices, res)

    assert [s.to_json_dict() for s in slices] == before


def test_changing_the_results_afterwards_leaves_the_sources_unchanged() -> None:
    # the order's accession is set on the results after they are built (encode/order.py); the
    # header copies share element objects with the sources, so this must not reach them
    slices, res = single_frames()
    before = [s.to_json_dict() for s in slices]

    for built in build_both(slices, res):
        changes = {"AccessionNumber": "CHANGED", "PatientID": "CHANGED", "StudyID": "CHANGED",
                   "StudyDate": "20000101", "PatientName": "CHANGED^X",
                   "FrameOfReferenceUID": "1.2.3.4"}
        for keyword, value in changes.items():
            if keyword in built:
                setattr(built, keyword, value)

    assert [s.to_json_dict() for s in slices] == before


# --- bad input -----------------------------------------------------------------------------------


def test_mask_that_does_not_match_the_frames_is_refused() -> None:
    slices, res = single_frames()
    short = result(res.frames, np.zeros((SLICES - 1, 128, 128), np.uint8), ())

    with pytest.raises(EncodeError, match=r"mask shape \(5, 128, 128\) does not match the 6"):
        build_seg(slices, short)


def test_mask_of_other_rows_and_columns_than_the_sources_is_refused() -> None:
    slices, res = single_frames()
    wrong = result(res.frames, two_nodules(SLICES, 64, 64))

    with pytest.raises(EncodeError, match=r"mask frames are \(64, 64\).*\(128, 128\)"):
        build_seg(slices, wrong)


def test_frames_that_are_not_among_the_sources_are_refused() -> None:
    slices, res = single_frames()

    with pytest.raises(EncodeError, match="not among the sources"):
        build_seg(slices[:-1], res)
    with pytest.raises(EncodeError, match="not among the sources"):
        build_nodule_sr(slices[:-1], res, None, uids(slices[0], "sr"), ROUTE, timestamp=WHEN)


def test_frame_number_beyond_a_multi_frame_image_is_refused() -> None:
    (image,), res = multi_frame()
    frames = (*res.frames[:-1], SourceFrame(image.SOPInstanceUID, SLICES + 1))

    with pytest.raises(EncodeError, match=r"frame 7 of .* does not exist \(the image has 6"):
        build_seg([image], result(frames))


def test_frames_from_two_series_are_refused() -> None:
    first, second = ct_series(3, "series-a"), ct_series(3, "series-b")
    for index, ds in enumerate(second):
        ds.ImagePositionPatient = [-158.135803, -179.035797, 100.0 + index]
    frames = tuple(SourceFrame(s.SOPInstanceUID) for s in first + second)

    with pytest.raises(EncodeError, match="from 2 series"):
        build_seg(first + second, result(frames))


def test_mask_values_without_a_segment_are_refused() -> None:
    slices, res = single_frames()
    mask = two_nodules(SLICES)
    mask[0, 0, 0] = 2

    with pytest.raises(EncodeError, match=r"only segments 1\.\.1 are described"):
        build_seg(slices, result(res.frames, mask))


@pytest.mark.parametrize(
    ("region", "message"),
    [
        (SegmentedRegion(2, 1.0, 1.0, (0, 0, 0), 0.5, (1,)), "names segment 2"),
        (SegmentedRegion(1, 1.0, 1.0, (0, 0, 0), 0.5, (9,)), r"lies on frames \[9\]"),
        (SegmentedRegion(1, float("nan"), 1.0, (0, 0, 0), 0.5, (1,)), "finite"),
        (SegmentedRegion(1, 1.0, 1.0, (0, 0, 0), 1.5, (1,)), r"outside \[0, 1\]"),
        (SegmentedRegion(1, 1.0, 1.0, (0, 0, 0), 0.5, (0,)), "not in the mask"),
    ],
)
def test_regions_that_do_not_fit_the_result_are_refused(
    region: SegmentedRegion, message: str
) -> None:
    slices, res = single_frames()

    with pytest.raises(EncodeError, match=message):
        build_seg(slices, result(res.frames, regions=(region,)))


def test_sr_with_regions_but_no_seg_is_refused() -> None:
    slices, res = single_frames()

    with pytest.raises(EncodeError, match="no SEG was given"):
        build_nodule_sr(slices, res, None, uids(slices[0], "sr"), ROUTE, timestamp=WHEN)


def test_sr_referencing_a_seg_of_another_result_is_refused() -> None:
    slices, res = single_frames()
    other = SegmentationResult(MODEL, ((CodedConcept("39607008", "SCT", "Lung"), ABNORMAL),),
                               res.frames, res.mask, res.regions)
    seg = build_seg(slices, other)

    with pytest.raises(EncodeError, match="segment 1 is not 'Nodule'"):
        build_nodule_sr(slices, res, seg, uids(slices[0], "sr"), ROUTE, timestamp=WHEN)
