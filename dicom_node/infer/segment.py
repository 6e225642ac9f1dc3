"""Run a segmenter on a study: pick its series, segment every slice, measure the regions.

:func:`segment` is the runtime of ``kind = "segmenter"`` cards (e.g. lung nodules on chest CT):

1. **Series.** Of the study's instances, those whose Modality is one of the card's modalities,
   that have pixel data and whose Image Type is not LOCALIZER are grouped by Series Instance
   UID; the series with the most frames is segmented (ties: the lowest Series Number, then the
   UID). Other series are ignored.
2. **Volume.** :func:`dicom_node.infer.volume.load_volume` sorts its frames along the slice
   normal (from the headers; nothing is decoded yet); gaps and irregular spacing are logged
   (``volume_warning``), not refused: each slice keeps its own position. Each plane is decoded
   and rescaled (HU) when its chunk is prepared (:meth:`SeriesVolume.plane`), so decoding runs
   while the network works on the chunk before, and the series is never held whole as floats.
3. **Input.** Each slice is windowed with the card's window (``[preprocessing]``
   ``voi = "window"``; values mapped onto [0, 1], clipped) and resampled (linear, antialiased)
   to ``segmentation.pixel_spacing_mm`` on a grid of ``input.shape`` centred on the image centre;
   outside the source field the input is 0 (the bottom of the window: air). With
   ``context_slices = 1`` two more channels (2.5-D) hold the planes before and after: the
   adjacent slices (``context_mm = 0``), or planes interpolated at ± ``context_mm`` along the
   normal between the two nearest slices (:func:`context_planes`; each slice's own position
   is used, so irregular spacing and gaps are handled). Past the ends of the stack, the end
   slice is repeated. (Windowing is float32 on the full slice; the resampling weights, which
   are banded, are applied as :mod:`scipy.sparse` matrices; each slice is resampled once.)
4. **Model.** Slices go through :func:`dicom_node.infer.runtime.predict_overlapped` in chunks
   of :data:`SLICES_PER_CHUNK` (Keras runs them on a GPU when it sees one): the next chunk's
   input is made, and the previous chunk's output mapped back, while the network runs.
5. **Mask.** The probability maps are resampled back (linear) onto the source rows × columns;
   a voxel gets segment *k* when *k*'s probability is at least its output's threshold (the most
   probable such segment when several are). The mask is uint8, (frames, rows, cols), frames in
   spatial order. A resampled probability is a weighted mean of the map's (or 0 outside it), so
   a slice whose map stays below every threshold is left empty without resampling it.
6. **Regions.** Each segment's voxels (if it has any) are split into 3-D connected regions
   (:func:`scipy.ndimage.label`, 26-connectivity; neighbouring slices of the stack are adjacent
   even across a gap); regions under ``segmentation.min_region_volume_mm3`` are removed from the
   mask. Each region is measured in patient space (:meth:`SeriesVolume.patient_points`):
   volume = Σ voxel volumes (pixel area × the slice's extent, see volume.py); centroid = the
   volume-weighted mean of voxel centres; longest diameter = the largest distance between two
   voxel centres (among the convex hull's vertices, :func:`scipy.spatial.distance.pdist`; on
   synthetic spheres of 5–20 mm it is within about 1 mm of the true diameter: the staircase of
   the voxels makes up for the half voxel lost at each end); mean probability over the region;
   the frames it appears on.
   Regions are listed by segment number, then by volume, largest first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage, sparse
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from dicom_node.errors import ModelError, PreprocessingError
from dicom_node.infer.card import ModelCard, SegmenterCard
from dicom_node.infer.runtime import load_model, predict_overlapped
from dicom_node.infer.volume import SeriesVolume, is_localizer, load_volume
from dicom_node.messages import SegmentationResult, SegmentedRegion

log = structlog.get_logger(__name__)

#: Slices preprocessed, predicted and mapped back at a time (bounds the memory in use; one
#: chunk is prepared while the network runs on the one before).
SLICES_PER_CHUNK = 16
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
Floats = NDArray[np.float64]


def select_series(sources: Sequence[Dataset], modalities: Sequence[str]) -> list[Dataset]:
    """The instances of the series to segment (see the module docstring, step 1).

    Raises PreprocessingError, naming what was found, when no series qualifies.
    """
    series: dict[str, list[Dataset]] = defaultdict(list)
    seen: list[str] = []
    for ds in sources:
        modality = str(ds.get("Modality", ""))
        if modality not in modalities:
            seen.append(f"modality {modality or '(none)'}")
        elif is_localizer(ds):
            seen.append(f"{modality} localizer")
        elif not any(k in ds for k in _PIXEL_KEYWORDS):
            seen.append(f"{modality} without pixel data")
        else:
            series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    if not series:
        found = ", ".join(f"{n}× {what}" for what, n in sorted(_count(seen).items())) or "nothing"
        raise PreprocessingError(
            f"no {'/'.join(modalities)} image series to segment in the study (found: {found})")

    def rank(item: tuple[str, list[Dataset]]) -> tuple[int, int, str]:
        uid, datasets = item
        frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
        number = int(datasets[0].get("SeriesNumber", 0) or 0)
        return (-frames, number, uid)

    return sorted(series.items(), key=rank)[0][1]


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for item in items:
        out[item] += 1
    return dict(out)


def resample_weights(n_in: int, spacing_in: float, n_out: int,
                     spacing_out: float) -> Floats:
    """Weights (n_out, n_in) of a linear filter from one centred grid to another.

    Both grids are centred on the same point; ``spacing_*`` are their sample spacings (mm). The
    triangle is widened when the output is coarser (antialiasing). Output samples outside the
    input's field get all-zero weights.
    """
    scale = spacing_out / spacing_in
    support = max(scale, 1.0)
    centres = (n_in - 1) / 2.0 + (np.arange(n_out) - (n_out - 1) / 2.0) * scale
    dist = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support
    weights = np.clip(1.0 - dist, 0.0, None)
    sums = weights.sum(axis=1, keepdims=True)
    inside = ((centres >= -0.5) & (centres <= n_in - 0.5))[:, None] & (sums > 0)
    return np.where(inside, weights / np.where(sums > 0, sums, 1.0), 0.0)


def _window(card: SegmenterCard) -> tuple[float, float]:
    spec = card.preprocessing
    if spec.voi != "window" or len(spec.windows) != 1:
        raise ModelError(
            f"model {card.name}: a segmenter card needs [preprocessing] voi = \"window\" with "
            "one window (the HU range mapped onto the network's input)")
    return spec.windows[0].center, spec.windows[0].width


def context_planes(offsets: Floats, context_mm: float) -> list[tuple[Floats, Floats]]:
    """For each side (−, +): per plane, the fractional index of its neighbour plane.

    ``context_mm = 0``: the adjacent planes; otherwise the point ± ``context_mm`` along the
    normal, as a fractional index into ``offsets`` (ascending), clipped to the stack.
    Returns [(lower index, weight of the upper one)] for − then +.
    """
    n = len(offsets)
    index = np.arange(n, dtype=np.float64)
    out = []
    for sign in (-1.0, 1.0):
        if context_mm == 0 or n == 1:
            f = np.clip(index + sign, 0, n - 1)
        else:
            f = np.interp(offsets + sign * context_mm, offsets, index)
        low = np.minimum(np.floor(f), max(n - 2, 0))
        out.append((low, f - low))
    return out


def interpolate_plane(planes: dict[int, Floats] | Floats, low: float,
                      weight: float) -> Floats:
    """``planes[low]`` blended with ``planes[low + 1]`` by ``weight``."""
    i = int(low)
    if weight <= 1e-6:
        return np.asarray(planes[i])
    return np.asarray((1.0 - weight) * planes[i] + weight * planes[i + 1])


def _inputs(vol: SeriesVolume, planes: range, card: SegmenterCard,
            w_rows: Any, w_cols_t: Any, small: dict[int, Floats]) -> NDArray[np.float32]:
    """The network's input for ``planes``: each needed plane windowed (float32, full size) and
    resampled with the sparse weights ``w_rows`` and ``w_cols_t`` (transposed), then the
    context channels interpolated between the small planes. ``small`` keeps the resampled
    planes between calls (for ascending ``planes``): a plane is resampled once."""
    center, width = _window(card)
    low, high = card.preprocessing.range
    spec = card.segmentation
    sides = context_planes(vol.offsets, spec.context_mm) if spec.context_slices else []
    needed = set(planes)
    for lows, weights in sides:
        for k in planes:
            needed.add(int(lows[k]))
            if weights[k] > 1e-6:
                needed.add(int(lows[k]) + 1)
    for k in [k for k in small if k < min(needed)]:
        del small[k]  # no later (higher) plane needs it
    bottom, span = np.float32(center - width / 2), np.float32(width)
    for k in sorted(needed - small.keys()):
        unit = np.clip((vol.plane(k) - bottom) / span, np.float32(0), np.float32(1))
        windowed = np.float32(low) + np.float32(high - low) * unit
        small[k] = np.asarray((w_rows @ windowed) @ w_cols_t, dtype=np.float64)
    # filled in place: each channel is cast to float32 as it is stored (what stacking the
    # float64 planes and casting the stack gave, without the two intermediate copies)
    batch = np.empty((len(planes), *card.input.shape, card.input.channels), dtype=np.float32)
    for i, k in enumerate(planes):
        if sides:
            (lo_m, w_m), (lo_p, w_p) = sides
            batch[i, :, :, 0] = interpolate_plane(small, lo_m[k], w_m[k])
            batch[i, :, :, 1] = small[k]
            batch[i, :, :, 2] = interpolate_plane(small, lo_p[k], w_p[k])
        else:
            batch[i, :, :, 0] = small[k]
    return batch


def _check_output(model: Any, card: SegmenterCard) -> None:
    rows, cols = card.input.shape
    expected = (None, rows, cols, len(card.outputs))
    got = tuple(model.output_shape)
    if got != expected:
        raise ModelError(f"model {card.name} {card.version}: output shape {got} does not match "
                         f"the card's input shape and {len(card.outputs)} output(s) {expected}")


def _predict_masks(card: SegmenterCard, model_dir: Path,
                   vol: SeriesVolume) -> tuple[NDArray[np.uint8], NDArray[np.float16]]:
    """Mask (frames, rows, cols) uint8 and the probability of each voxel's segment."""
    model = load_model(card, model_dir)
    _check_output(model, card)
    n, rows, cols = vol.shape
    in_r, in_c = card.input.shape
    p = card.segmentation.pixel_spacing_mm
    dr, dc = vol.pixel_spacing
    # the resampling weights are banded: sparse products, in float32 on the full-size planes
    w_rows = sparse.csr_array(resample_weights(rows, dr, in_r, p).astype(np.float32))
    w_cols_t = sparse.csr_array(resample_weights(cols, dc, in_c, p).T.astype(np.float32))
    back_rows, back_cols = resample_weights(in_r, p, rows, dr), resample_weights(in_c, p, cols, dc)
    b_rows, b_cols_t = sparse.csr_array(back_rows), sparse.csr_array(back_cols.T)
    reach_rows, reach_cols = _reach(back_rows), _reach(back_cols)
    thresholds = np.asarray([o.threshold for o in card.outputs])
    # a resampled probability is a weighted mean (or 0 outside the field), never above the
    # plane's largest: a plane whose every probability is below every threshold stays empty
    below = float(thresholds.min()) * (1.0 - 1e-9) if thresholds.min() > 0 else -np.inf
    mask = np.zeros((n, rows, cols), dtype=np.uint8)
    prob = np.zeros((n, rows, cols), dtype=np.float16)
    chunks = [range(start, min(n, start + SLICES_PER_CHUNK))
              for start in range(0, n, SLICES_PER_CHUNK)]
    small: dict[int, Floats] = {}
    inputs = (_inputs(vol, planes, card, w_rows, w_cols_t, small) for planes in chunks)
    # the next chunk's input is made, and this chunk's output mapped back, while the network runs
    outputs = predict_overlapped(model, inputs, f"model {card.name} {card.version}")
    for planes, out in zip(chunks, outputs, strict=True):
        if not np.all(np.isfinite(out)):
            raise ModelError(f"model {card.name} {card.version} returned non-finite values")
        for i, k in enumerate(planes):
            # only source pixels that a map value at or above a threshold reaches can be hits
            hot_r, hot_c = np.nonzero(out[i].max(axis=-1) >= below)
            if not len(hot_r):
                continue  # mask and probability stay 0
            r = slice(int(reach_rows[0][hot_r.min()]), int(reach_rows[1][hot_r.max()]))
            c = slice(int(reach_cols[0][hot_c.min()]), int(reach_cols[1][hot_c.max()]))
            full = np.stack([np.asarray((b_rows[r] @ out[i, :, :, s].astype(np.float64))
                                        @ b_cols_t[:, c])
                             for s in range(len(card.outputs))], axis=-1)
            above = np.where(full >= thresholds, full, -1.0)
            best = above.argmax(axis=-1)
            hit = above.max(axis=-1) >= 0
            mask[k, r, c] = np.where(hit, best + 1, 0).astype(np.uint8)
            prob[k, r, c] = np.where(hit, full.max(axis=-1), 0.0).astype(np.float16)
    return mask, prob


def _reach(weights: Floats) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """For the weights (n_out, n_in) of a resampling: per input sample j, the first output
    sample it contributes to and one past the last (cumulative over j, so that
    ``[first[a], last[b])`` covers every output reached by inputs a..b; banded weights)."""
    touched = weights > 0
    n_out = weights.shape[0]
    first = np.where(touched.any(axis=0), touched.argmax(axis=0), n_out)
    last = np.where(touched.any(axis=0), n_out - touched[::-1].argmax(axis=0), 0)
    # an input that reaches nothing (outside the output field) must not narrow a range
    first = np.minimum.accumulate(first[::-1])[::-1]
    last = np.maximum.accumulate(last)
    return first, last


def _longest_diameter(points: Floats, vol: SeriesVolume, extent: float) -> float:
    """Largest distance between two voxel centres (candidates: the convex hull's vertices);
    for a region of one voxel, that voxel's largest side."""
    if len(points) == 1:
        return float(max(vol.pixel_spacing[0], vol.pixel_spacing[1], extent))
    candidates = points
    if len(points) > 4:
        try:
            candidates = points[ConvexHull(points, qhull_options="QJ").vertices]
        except (QhullError, ValueError):
            candidates = points
    return float(pdist(candidates).max())


def _bounding_box(hits: NDArray[np.bool_]) -> tuple[slice, slice, slice] | None:
    """The smallest box (planes, rows, columns) holding every True voxel; None when none is."""
    planes = np.flatnonzero(hits.any(axis=(1, 2)))
    if not len(planes):
        return None
    inside = hits[planes[0] : planes[-1] + 1]
    rows = np.flatnonzero(inside.any(axis=(0, 2)))
    cols = np.flatnonzero(inside.any(axis=(0, 1)))
    return (slice(int(planes[0]), int(planes[-1]) + 1), slice(int(rows[0]), int(rows[-1]) + 1),
            slice(int(cols[0]), int(cols[-1]) + 1))


def measure_regions(mask: NDArray[np.uint8], prob: NDArray[np.floating[Any]],
                    vol: SeriesVolume, segments: int,
                    min_volume_mm3: float) -> tuple[SegmentedRegion, ...]:
    """Label and measure each segment's 3-D regions; clear those below ``min_volume_mm3``
    from ``mask`` (in place). See the module docstring, step 6."""
    structure = np.ones((3, 3, 3), dtype=bool)
    voxel_volumes = vol.voxel_volumes
    regions: list[SegmentedRegion] = []
    for k in range(1, segments + 1):
        region = _bounding_box(mask == k)
        if region is None:
            continue
        # labelled inside the segment's bounding box: the same regions, in the same order
        labels, _ = ndimage.label(mask[region] == k, structure=structure)
        found = []
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            local = labels[box] == index
            kk, rr, cc = np.nonzero(local)
            kk = kk + box[0].start + region[0].start
            rr = rr + box[1].start + region[1].start
            cc = cc + box[2].start + region[2].start
            weights = voxel_volumes[kk]
            volume = float(weights.sum())
            if volume < min_volume_mm3:
                mask[kk, rr, cc] = 0
                continue
            points = vol.patient_points(kk, rr, cc)
            centroid = (points * weights[:, None]).sum(axis=0) / volume
            extent = float(np.median(vol.slice_extents[np.unique(kk)]))
            found.append(SegmentedRegion(
                segment_number=k,
                volume_mm3=volume,
                longest_diameter_mm=_longest_diameter(points, vol, extent),
                centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                mean_probability=float(np.mean(prob[kk, rr, cc], dtype=np.float64)),
                frames=tuple(int(v) for v in np.unique(kk)),
            ))
        regions += sorted(found, key=lambda r: -r.volume_mm3)
    return tuple(regions)


def segment(card: ModelCard, model_dir: Path, sources: Sequence[Dataset]) -> SegmentationResult:
    """Segment the study's main series with ``card``'s model (see the module docstring).

    ``sources``: the study's instances (several series allowed). Raises PreprocessingError when
    there is no series of the card's modalities, it has fewer than ``segmentation.min_slices``
    frames, or its geometry is missing or inconsistent; ModelError when the card is not a
    segmenter's or the model cannot be loaded or run.
    """
    if not isinstance(card, SegmenterCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not a segmenter")
    _window(card)
    datasets = select_series(sources, card.modalities)
    vol = load_volume(datasets)
    minimum = card.segmentation.min_slices
    if vol.shape[0] < minimum:
        raise PreprocessingError(
            f"series {vol.series_instance_uid} has {vol.shape[0]} slice(s); model {card.name} "
            f"needs at least {minimum}")
    for warning in vol.warnings:
        log.warning("volume_warning", model=card.name, series=vol.series_instance_uid,
                    warning=warning)
    mask, prob = _predict_masks(card, model_dir, vol)
    regions = measure_regions(mask, prob, vol, len(card.outputs),
                              card.segmentation.min_region_volume_mm3)
    log.info("series_segmented", model=card.name, version=card.version,
             series=vol.series_instance_uid, frames=len(vol.frames), regions=len(regions))
    return SegmentationResult(
        model=card.identity(),
        segments=tuple((o.code.concept(), o.category.concept()) for o in card.outputs),
        frames=vol.frames,
        mask=mask,
        regions=regions,
        geometry_warnings=vol.warnings,
    )
