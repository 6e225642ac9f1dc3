"""A CT or MR series → one 3-D volume in modality values (HU for CT), with its geometry.

:func:`load_volume` takes the instances of one series — single-frame images, multi-frame
Enhanced CT/MR images with per-frame functional groups, or a mix — and returns a
:class:`SeriesVolume`:

- **Frames** are read from each instance: a single-frame image gives one, a multi-frame image
  one per frame, its geometry from the Per-Frame Functional Groups item, else the Shared one,
  else the top level (Plane Position / Plane Orientation / Pixel Measures / Pixel Value
  Transformation sequences, PS3.3 C.7.6.16).
- **Order**: frames are sorted by their distance along the slice normal
  ``n = row cosine × column cosine`` (the first and second triplets of ImageOrientationPatient),
  ascending — for axial slices feet to head. File order and InstanceNumber are never used.
- **Consistency**: every frame must have the same frame of reference, orientation (cosines
  within 1e-3), pixel spacing (relative 1e-3), rows and columns, and no two frames the same
  position; otherwise
  :class:`~dicom_node.errors.PreprocessingError` says which frames differ and how.
- **Spacing**: the usual slice spacing is the median gap between consecutive frames. A gap of
  1.5× that or more is reported as missing slices (about ``round(gap / usual) − 1`` of them); any
  other gap that differs by more than 2 % (at least 0.01 mm) is reported as irregular spacing;
  positions that drift in-plane (gantry tilt) are reported too. Reports go to
  :attr:`SeriesVolume.warnings`; none of them is an error.
- **No resampling.** The volume keeps one plane per source frame, at that frame's own position
  (:attr:`SeriesVolume.positions`), because results (a SEG) must align one to one with the source
  frames. Measurements use the per-frame positions: :meth:`SeriesVolume.patient_points` maps
  voxel indices to patient coordinates exactly, and :attr:`SeriesVolume.slice_extents` gives
  each plane the thickness of its share of the stack (half the gap to each neighbour; half the
  usual spacing outwards at the ends), so a missing slice's volume is shared by its two
  neighbours.
  :attr:`SeriesVolume.affine` is the regular-grid approximation (exact when ``regular``).
- **Values**: the Modality LUT / Rescale Slope and Intercept of each frame (pydicom's
  ``apply_modality_lut`` for single-frame images; the frame's Pixel Value Transformation for
  multi-frame ones), as float32, computed when a plane is asked for
  (:meth:`SeriesVolume.plane`, one frame decoded, nothing kept); :attr:`SeriesVolume.voxels`
  decodes them all.

highdicom 0.28 has volume support (``highdicom.get_volume_from_series``, ``Image.get_volume``,
``highdicom.spatial.get_volume_positions``), but it refuses a series with a gap or irregular
spacing ("not a regularly-spaced volume") without saying where, and orders slices the other way
(right-handed in (slice, row, column), i.e. head first for axial images). Sorting and gap
detection are therefore a few lines of numpy here; tests check that a regular series gives the
same voxels and geometry as highdicom's volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array

from dicom_node.errors import PreprocessingError, UndecodableInstanceError
from dicom_node.messages import SourceFrame

Floats = NDArray[np.float64]
#: A gap of this many usual spacings or more is reported as missing slices.
GAP_FACTOR = 1.5
#: Gaps that differ from the usual spacing by more than this fraction are irregular.
SPACING_RTOL = 0.02
SPACING_ATOL_MM = 0.01
ORIENTATION_ATOL = 1e-3
PIXEL_SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class _Frame:
    """One frame of one instance, with the geometry read for it."""

    ds: Dataset
    index: int  # 0-based frame index in its instance
    sop_instance_uid: str
    position: Floats
    orientation: Floats
    spacing: tuple[float, float]
    slope: float | None  # None: use the instance's Modality LUT / rescale (single-frame)
    intercept: float


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """A series as a volume: planes in spatial order, with per-plane geometry."""

    series_instance_uid: str
    frame_of_reference_uid: str
    #: Source frames, ascending along :attr:`normal`.
    frames: tuple[SourceFrame, ...]
    #: Where each plane's pixels are (same order as :attr:`frames`): decoded by :meth:`plane`.
    _sources: tuple[_Frame, ...]
    #: (planes, rows, columns).
    _shape: tuple[int, int, int]
    #: ImagePositionPatient of each plane (mm), shape (len(frames), 3).
    positions: Floats
    #: ImageOrientationPatient: row cosines, then column cosines.
    orientation: tuple[float, float, float, float, float, float]
    #: Unit normal, row cosine × column cosine.
    normal: Floats
    #: (row spacing, column spacing) mm, as PixelSpacing: between rows, between columns.
    pixel_spacing: tuple[float, float]
    #: The usual spacing between planes (median gap), mm.
    slice_spacing: float
    #: Distance of each plane along the normal (mm).
    offsets: Floats
    #: Thickness (mm) of each plane's share of the stack (see the module docstring).
    slice_extents: Floats
    #: 4×4 matrix: (plane, row, column, 1) → patient (x, y, z, 1) on the regular grid.
    affine: Floats
    #: True when no gap, irregular spacing or tilt was found.
    regular: bool
    warnings: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def plane(self, k: int, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        """Plane ``k`` in modality values (HU for CT), float32 (rows, columns), decoded now:
        only that frame of its instance, and nothing is kept (a segmenter decodes each plane
        as its chunk needs it, while the network runs on the chunk before). Raises
        PreprocessingError for undecodable pixel data."""
        frame = self._sources[k]
        if out is None:
            out = np.empty(self._shape[1:], dtype=np.float32)
        _values(frame, _pixels(frame.ds, frame.index), out)
        return out

    @property
    def voxels(self) -> NDArray[np.float32]:
        """Every plane, shape (planes, rows, columns), decoded now (a new array each time)."""
        volume = np.empty(self._shape, dtype=np.float32)
        for k in range(self._shape[0]):
            self.plane(k, volume[k])
        return volume

    @property
    def voxel_volumes(self) -> Floats:
        """Volume (mm³) of one voxel of each plane."""
        return np.asarray(self.slice_extents * self.pixel_spacing[0] * self.pixel_spacing[1])

    def patient_points(self, planes: NDArray[np.integer[Any]], rows: NDArray[np.floating[Any]]
                       | NDArray[np.integer[Any]], cols: NDArray[np.floating[Any]]
                       | NDArray[np.integer[Any]]) -> Floats:
        """Patient coordinates (mm, shape (n, 3)) of voxel centres (plane index, row, column);
        exact for every plane, whatever the spacing (PS3.3 C.7.6.2.1.1)."""
        row_cos = np.asarray(self.orientation[:3])
        col_cos = np.asarray(self.orientation[3:])
        r = np.asarray(rows, dtype=np.float64)[:, None] * self.pixel_spacing[0]
        c = np.asarray(cols, dtype=np.float64)[:, None] * self.pixel_spacing[1]
        return np.asarray(self.positions[np.asarray(planes)] + r * col_cos + c * row_cos)


def is_localizer(ds: Dataset) -> bool:
    """True when ImageType says LOCALIZER (a scout, not a slice of the volume)."""
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _describe(ds: Dataset) -> str:
    uid = ds.get("SOPInstanceUID")
    return f"instance {uid}" if uid else "dataset"


def _group_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in frame ``index``'s per-frame group, else the shared."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index),
                      ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and i < len(items):
            seq = items[i].get(sequence)
            if seq:
                item: Dataset = seq[0]
                return item
    return None


def _floats(value: Any, count: int, what: str, ds: Dataset) -> Floats:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise PreprocessingError(f"{_describe(ds)}: {what} is missing or not {count} numbers")
    return arr


def _frames_of(ds: Dataset) -> list[_Frame]:
    uid = str(ds.get("SOPInstanceUID", ""))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    multi = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    frames = []
    for i in range(n_frames):
        pos_item = _group_item(ds, i, "PlanePositionSequence") if multi else None
        ori_item = _group_item(ds, i, "PlaneOrientationSequence") if multi else None
        pix_item = _group_item(ds, i, "PixelMeasuresSequence") if multi else None
        pvt_item = _group_item(ds, i, "PixelValueTransformationSequence") if multi else None
        position = (pos_item or ds).get("ImagePositionPatient")
        orientation = (ori_item or ds).get("ImageOrientationPatient")
        spacing = (pix_item or ds).get("PixelSpacing")
        where = f"frame {i + 1} " if n_frames > 1 else ""
        pos = _floats(position, 3, f"{where}Image Position (Patient)", ds)
        ori = _floats(orientation, 6, f"{where}Image Orientation (Patient)", ds)
        sp = _floats(spacing, 2, f"{where}Pixel Spacing", ds)
        if np.any(sp <= 0):
            raise PreprocessingError(f"{_describe(ds)}: {where}Pixel Spacing must be positive")
        slope: float | None = None
        intercept = 0.0
        if multi or n_frames > 1:
            source = pvt_item or ds
            slope = float(source.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
        frames.append(_Frame(ds, i, uid, pos, ori, (float(sp[0]), float(sp[1])), slope,
                             intercept))
    return frames


def _check_consistent(frames: list[_Frame]) -> None:
    ref = frames[0]
    rows, cols = int(ref.ds.Rows), int(ref.ds.Columns)
    frames_of_reference = {str(f.ds.get("FrameOfReferenceUID", "")) for f in frames}
    if len(frames_of_reference) > 1:
        raise PreprocessingError(
            f"the series' images are in {len(frames_of_reference)} frames of reference "
            "(Frame of Reference UID differs), so their positions cannot be compared")
    for f in frames[1:]:
        if np.max(np.abs(f.orientation - ref.orientation)) > ORIENTATION_ATOL:
            raise PreprocessingError(
                f"inconsistent orientation within the series: {f.sop_instance_uid} frame "
                f"{f.index + 1} has Image Orientation (Patient) {np.round(f.orientation, 4)}, "
                f"{ref.sop_instance_uid} has {np.round(ref.orientation, 4)}")
        if not np.allclose(f.spacing, ref.spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
            raise PreprocessingError(
                f"inconsistent pixel spacing within the series: {f.sop_instance_uid} has "
                f"{list(f.spacing)} mm, {ref.sop_instance_uid} has {list(ref.spacing)} mm")
        if (int(f.ds.Rows), int(f.ds.Columns)) != (rows, cols):
            raise PreprocessingError(
                f"inconsistent image size within the series: {f.sop_instance_uid} is "
                f"{f.ds.Rows}×{f.ds.Columns}, {ref.sop_instance_uid} is {rows}×{cols}")


def _spacing_report(offsets: Floats, tilt: float) -> tuple[float, Floats, list[str]]:
    """Usual spacing, per-plane extents and warnings from sorted offsets along the normal."""
    warnings: list[str] = []
    if len(offsets) < 2:
        return 1.0, np.ones(len(offsets)), warnings
    gaps = np.diff(offsets)
    usual = float(np.median(gaps))
    missing = np.nonzero(gaps >= GAP_FACTOR * usual)[0]
    for i in missing:
        count = max(1, round(float(gaps[i]) / usual) - 1)
        warnings.append(
            f"missing slice(s): gap of {gaps[i]:.2f} mm between planes {i} and {i + 1} "
            f"(usual spacing {usual:.2f} mm; about {count} slice(s) missing)")
    tol = max(SPACING_ATOL_MM, SPACING_RTOL * usual)
    odd = np.abs(gaps - usual) > tol
    odd[missing] = False
    if odd.any():
        warnings.append(
            f"irregular slice spacing: {int(odd.sum())} of {len(gaps)} gaps differ from the "
            f"usual {usual:.2f} mm by more than {tol:.2f} mm (gaps {gaps.min():.2f}–"
            f"{gaps.max():.2f} mm); planes are kept at their own positions")
    if tilt > max(SPACING_ATOL_MM, 0.01 * usual):
        warnings.append(
            f"planes are not stacked along the normal (in-plane drift up to {tilt:.2f} mm; "
            "gantry tilt?); each plane keeps its own position")
    extents = np.empty(len(offsets))
    extents[1:-1] = (offsets[2:] - offsets[:-2]) / 2.0
    extents[0] = (gaps[0] + usual) / 2.0
    extents[-1] = (gaps[-1] + usual) / 2.0
    return usual, extents, warnings


def _pixels(ds: Dataset, index: int) -> NDArray[Any]:
    """Frame ``index`` (0-based) of ``ds``'s pixel data, stored values (rows, columns)."""
    if "PixelData" not in ds:
        raise PreprocessingError(f"{_describe(ds)} has no Pixel Data")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        # not Dataset.pixel_array: the dataset would keep a decoded copy (256 CT slices: 134 MB)
        arr = np.asarray(pixel_array(ds, index=index) if n_frames > 1 else pixel_array(ds))
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        raise UndecodableInstanceError(
            f"{_describe(ds)}: cannot decode pixel data: {type(exc).__name__}: {exc}",
            str(ds.get("SOPInstanceUID", ""))) from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if arr.shape != expected:
        where = f"frame {index + 1} " if n_frames > 1 else ""
        raise PreprocessingError(
            f"{_describe(ds)}: {where}pixel array has shape {arr.shape}, expected {expected} "
            "(only single-sample grey-scale images are supported)")
    return arr


def _values(frame: _Frame, stored: NDArray[Any], out: NDArray[np.float32]) -> None:
    """The frame's values (HU for CT) written into ``out`` (float32, the frame's shape)."""
    if frame.slope is None:
        try:
            out[...] = apply_modality_lut(stored, frame.ds)
        except (ValueError, NotImplementedError, KeyError, IndexError, AttributeError) as exc:
            raise PreprocessingError(
                f"{_describe(frame.ds)}: cannot apply the Modality LUT: {exc}") from exc
        return
    # stored × slope + intercept in float32, as stored.astype(float32) * slope + intercept
    # computes it, without the intermediate arrays
    np.multiply(stored, np.float32(frame.slope), out=out, dtype=np.float32)
    out += np.float32(frame.intercept)


def load_volume(datasets: Sequence[Dataset]) -> SeriesVolume:
    """The volume of one series' instances (any order); see the module docstring.

    Raises PreprocessingError for no instances, instances of different series, missing or
    inconsistent geometry, duplicate positions, or no pixel data. Nothing is decoded here:
    :meth:`SeriesVolume.plane` decodes a plane when it is needed (and raises for undecodable
    pixel data then).
    """
    if not datasets:
        raise PreprocessingError("no instances to build a volume from")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise PreprocessingError(f"instances of {len(series)} series given; expected one")
    frames = [f for ds in datasets for f in _frames_of(ds)]
    _check_consistent(frames)
    orientation = frames[0].orientation
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    normal = normal / np.linalg.norm(normal)
    positions = np.stack([f.position for f in frames])
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    frames = [frames[i] for i in order]
    positions, offsets = positions[order], offsets[order]
    gaps = np.diff(offsets)
    if len(gaps) and gaps.min() < SPACING_ATOL_MM:
        i = int(np.argmin(gaps))
        a, b = frames[i], frames[i + 1]
        raise PreprocessingError(
            f"two frames at the same position ({offsets[i]:.2f} mm along the normal): "
            f"{a.sop_instance_uid} frame {a.index + 1} and {b.sop_instance_uid} frame "
            f"{b.index + 1} (repeated acquisition in one series?)")
    in_plane = positions - offsets[:, None] * normal
    tilt = float(np.max(np.linalg.norm(in_plane - in_plane[0], axis=1))) if len(frames) else 0.0
    usual, extents, warnings = _spacing_report(offsets, tilt)
    if not frames:
        raise PreprocessingError("the instances hold no frames")
    first = frames[0].ds
    for ds in {id(f.ds): f.ds for f in frames}.values():
        if "PixelData" not in ds:
            raise PreprocessingError(f"{_describe(ds)} has no Pixel Data")
    spacing = frames[0].spacing
    affine = np.eye(4)
    affine[:3, 0] = normal * usual
    affine[:3, 1] = col_cos * spacing[0]
    affine[:3, 2] = row_cos * spacing[1]
    affine[:3, 3] = positions[0]
    return SeriesVolume(
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        frames=tuple(SourceFrame(f.sop_instance_uid, f.index + 1) for f in frames),
        _sources=tuple(frames),
        _shape=(len(frames), int(first.Rows), int(first.Columns)),
        positions=positions,
        orientation=tuple(float(v) for v in orientation),  # type: ignore[arg-type]
        normal=normal,
        pixel_spacing=spacing,
        slice_spacing=usual,
        offsets=offsets,
        slice_extents=extents,
        affine=affine,
        regular=not warnings,
        warnings=tuple(warnings),
    )
