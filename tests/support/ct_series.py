"""Write synthetic chest CT series as real DICOM files, for tests and evaluation sets.

The volumes come from ``models/lung-nodule-unet/synthetic.py`` (the generator the model was
trained on); this module only puts them into DICOM:

- single-frame **CT Image Storage** (one file per slice), or one multi-frame **Enhanced CT Image
  Storage** file with its functional groups (Pixel Measures, Plane Position/Orientation, Pixel
  Value Transformation, Frame Content, CT Image Frame Type …); both check clean with dciodvfy;
- axial slices (ImageOrientationPatient 1\\0\\0\\0\\1\\0), numbered as scanners do, head first:
  InstanceNumber 1 (or the first frame) is the most superior slice, so sorting by
  InstanceNumber gives the *reverse* of the order along the slice normal;
- stored values = HU + 1024 (unsigned, 12 bits), Rescale Intercept −1024, slope 1;
- Patient/Study/Series attributes are the same for every file of a call; UIDs are derived from
  the call's arguments, so the same call writes the same files again.

Use :func:`write_chest_ct_series` in tests; :func:`write_ct` writes an already drawn
:class:`SyntheticCT` (``models/lung-nodule-unet/train.py --export-eval`` uses it).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

MODEL_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "lung-nodule-unet"
#: Nodule density written by :func:`write_chest_ct_series` (solid soft tissue, HU).
NODULE_HU = 40.0
_WHEN = datetime(2025, 1, 17, 9, 30, 0)


def synthetic() -> ModuleType:
    """``models/lung-nodule-unet/synthetic.py`` (its folder name is not a package name)."""
    name = "lung_nodule_unet_synthetic"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MODEL_DIR / "synthetic.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def slice_positions(slices: int, spacing: float, *, z_center: float = 0.0,
                    irregular: bool = False, drop_slice: int | None = None,
                    seed: int = 0) -> list[float]:
    """z (mm) of each slice, ascending. ``irregular``: gaps drawn from 0.7–1.3 × spacing;
    ``drop_slice``: that index (in ascending order) is left out, leaving a 2× gap."""
    if irregular:
        gaps = spacing * np.random.default_rng(seed + 7919).uniform(0.7, 1.3, slices - 1)
        z = np.concatenate([[0.0], np.cumsum(gaps)])
    else:
        z = np.arange(slices) * spacing
    z = z - z.mean() + z_center
    out = [round(float(v), 4) for v in z]
    if drop_slice is not None:
        del out[drop_slice]
    return out


def write_chest_ct_series(
    folder: Path,
    *,
    nodules: Sequence[tuple[tuple[float, float, float], float]] = (),
    slices: int = 40,
    spacing: float = 2.5,
    rows: int = 256,
    pixel_spacing: float = 1.5,
    z_center: float = 0.0,
    shuffle_files: bool = False,
    drop_slice: int | None = None,
    irregular: bool = False,
    enhanced_multiframe: bool = False,
    study_uid: str | None = None,
    series_number: int = 2,
    seed: int = 0,
) -> list[Path]:
    """Draw a synthetic chest CT and write it to ``folder``; return the files written.

    ``nodules``: (centre (x, y, z) in patient mm, diameter mm) of spherical solid nodules; each
    centre must lie in a lung of the phantom that ``seed`` draws (e.g. (-65, 15, z) or
    (65, 20, z) for |z| ≤ 40), else ValueError. ``rows`` × ``rows`` pixels of
    ``pixel_spacing`` mm; ``slices`` axial slices ``spacing`` mm apart centred on
    ``z_center`` (see :func:`slice_positions` for ``irregular`` and ``drop_slice``).
    ``shuffle_files``: file names (and frames of the multi-frame file) in random order.
    """
    syn = synthetic()
    z = slice_positions(slices, spacing, z_center=z_center, irregular=irregular,
                        drop_slice=drop_slice, seed=seed)
    grid = syn.Grid(rows=rows, cols=rows, pixel_spacing=(pixel_spacing, pixel_spacing),
                    z=tuple(z))
    phantom = syn.draw_phantom(np.random.default_rng(seed))
    specs = tuple(syn.Nodule.sphere(tuple(float(v) for v in c), float(d), hu=NODULE_HU)
                  for c, d in nodules)
    for spec in specs:
        point = [np.array([v], dtype=np.float32) for v in spec.center]
        if syn.lung_fraction(phantom, *point, 1.0)[0] < 1.0:
            raise ValueError(f"nodule centre {spec.center} is not inside a lung of seed {seed}")
    ct = syn.make_case(seed, grid, nodules=specs)
    key = f"{study_uid}|{seed}|{slices}|{spacing}|{rows}|{pixel_spacing}|{z_center}|" \
          f"{drop_slice}|{irregular}|{enhanced_multiframe}|{series_number}|{list(nodules)}"
    return write_ct(folder, ct, key=key, study_uid=study_uid, series_number=series_number,
                    enhanced_multiframe=enhanced_multiframe, shuffle_files=shuffle_files,
                    seed=seed, slice_thickness=spacing)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _common(ds: Dataset, study_uid: str, series_uid: str, for_uid: str,
            series_number: int) -> None:
    """Patient, study, series, frame of reference and equipment attributes."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Synthetic^Chest CT"
    ds.PatientID = "SYNTHETIC-CT"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _WHEN.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _WHEN.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "SYN0001"
    ds.StudyDescription = "Synthetic chest CT"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Synthetic chest CT (not a patient)"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS"
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "dicom-node synthetic"
    ds.AcquisitionNumber = 1
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _stored(hu: np.ndarray) -> bytes:
    return np.clip(np.rint(hu + 1024.0), 0, 4095).astype("<u2").tobytes()


def write_ct(folder: Path, ct: Any, *, key: str, study_uid: str | None = None,
             series_number: int = 2, enhanced_multiframe: bool = False,
             shuffle_files: bool = False, seed: int = 0,
             slice_thickness: float | None = None) -> list[Path]:
    """Write the synthetic volume ``ct`` (a ``SyntheticCT``) as DICOM files in ``folder``.

    Slices are written head first (descending z); ``key`` seeds the UIDs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _uid("study", key)
    series_uid = _uid("series", key)
    for_uid = _uid("frame-of-reference", study_uid, seed)
    grid = ct.grid
    order = sorted(range(len(grid.z)), key=lambda k: -grid.z[k])  # head first
    if shuffle_files:
        order = [order[i] for i in np.random.default_rng(seed + 1).permutation(len(order))]
    thickness = slice_thickness or (abs(grid.z[-1] - grid.z[0]) / max(1, len(grid.z) - 1))
    head_first = sorted(range(len(grid.z)), key=lambda k: -grid.z[k])
    numbers = {k: i + 1 for i, k in enumerate(head_first)}
    if enhanced_multiframe:
        sop_uid = _uid("enhanced", key)
        ds = _enhanced(ct, order, numbers, thickness, study_uid, series_uid, for_uid,
                       series_number, sop_uid)
        path = folder / "enhanced_ct.dcm"
        ds.save_as(path, enforce_file_format=True)
        return [path]
    paths = []
    names = {k: i + 1 for i, k in enumerate(order)}
    for k in order:
        sop_uid = _uid("slice", key, k)
        ds = Dataset()
        ds.file_meta = _meta(CTImageStorage, sop_uid)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        _common(ds, study_uid, series_uid, for_uid, series_number)
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = numbers[k]
        ds.PatientOrientation = ""
        ds.ImagePositionPatient = [f"{v:.4f}" for v in grid.image_position(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{grid.z[k]:.4f}"
        ds.SliceThickness = f"{thickness:.4f}"
        ds.PixelSpacing = [f"{grid.pixel_spacing[0]:.6g}", f"{grid.pixel_spacing[1]:.6g}"]
        ds.Rows, ds.Columns = grid.rows, grid.cols
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = _stored(ct.hu[k])
        path = folder / f"IM{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _enhanced(ct: Any, order: list[int], numbers: dict[int, int], thickness: float,
              study_uid: str, series_uid: str, for_uid: str, series_number: int,
              sop_uid: str) -> Dataset:
    """One Enhanced CT Image (PS3.3 A.38) holding every slice, frames in ``order``."""
    grid = ct.grid
    ds = Dataset()
    ds.file_meta = _meta(EnhancedCTImageStorage, sop_uid)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_uid
    _common(ds, study_uid, series_uid, for_uid, series_number)
    del ds.KVP, ds.AcquisitionNumber
    ds.ManufacturerModelName = "synthetic.py"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "RESEARCH"
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = _WHEN.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionDuration = 1.0
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = grid.rows, grid.cols
    dim_uid = _uid("dimensions", sop_uid)
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dim_uid)]
    ds.DimensionIndexSequence = [
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111,
              DimensionDescriptionLabel="In-Stack Position Number"),
    ]
    shared = _item(
        PixelMeasuresSequence=[_item(
            PixelSpacing=[f"{grid.pixel_spacing[0]:.6g}", f"{grid.pixel_spacing[1]:.6g}"],
            SliceThickness=f"{thickness:.4f}")],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
        PixelValueTransformationSequence=[_item(RescaleIntercept=-1024, RescaleSlope=1,
                                                RescaleType="HU")],
        FrameVOILUTSequence=[_item(WindowCenter=-600, WindowWidth=1500)],
        CTImageFrameTypeSequence=[_item(
            FrameType=["DERIVED", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")],
        FrameAnatomySequence=[_item(
            AnatomicRegionSequence=[_code("51185008", "SCT", "Thorax")], FrameLaterality="U")],
        IrradiationEventIdentificationSequence=[_item(
            IrradiationEventUID=_uid("irradiation", sop_uid))],
    )
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in order:
        per_frame.append(_item(
            FrameContentSequence=[_item(
                StackID="1", InStackPositionNumber=numbers[k],
                DimensionIndexValues=[1, numbers[k]],
                FrameAcquisitionDateTime=ds.AcquisitionDateTime,
                FrameReferenceDateTime=ds.AcquisitionDateTime,
                FrameAcquisitionDuration=1.0)],
            PlanePositionSequence=[_item(
                ImagePositionPatient=[f"{v:.4f}" for v in grid.image_position(k)])],
        ))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = b"".join(_stored(ct.hu[k]) for k in order)
    return ds
