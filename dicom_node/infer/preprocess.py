"""Turn a DICOM image into a model's input tensor, as the model card's ``[preprocessing]`` says.

For each instance, in this order:

1. **Check** that it has pixel data and a photometric interpretation the model can take:
   MONOCHROME1/MONOCHROME2 for every model; RGB and the YBR family only for 3-channel models
   that do not use fixed windows; and that its Image Type (0008,0008) has none of the card's
   ``exclude_image_types`` (e.g. LOCALIZER, the scout of a CT study).
   Anything else raises :class:`~dicom_node.errors.PreprocessingError` naming the problem.
2. **Decode** with pydicom's pixel handlers, which use the installed pylibjpeg (JPEG baseline,
   extended, lossless; JPEG 2000; RLE) and pyjpegls (JPEG-LS) plug-ins. YBR colour is converted to
   RGB by the decoder.
3. **Frames**: a multi-frame instance gives one input per frame (``frames = "all"``, at most
   ``max_frames`` evenly spaced) or only its first frame (``frames = "first"``).
4. **Grey levels** (monochrome only): the Modality LUT or Rescale Slope/Intercept
   (:func:`pydicom.pixels.apply_modality_lut`), then, with ``voi = "dataset"``, the first VOI LUT
   or window of the dataset (:func:`pydicom.pixels.apply_voi_lut`). Window centre and width come
   from the top level of the dataset; per-frame functional groups of enhanced multi-frame objects
   are not read.
   With ``voi = "window"`` only the Modality LUT/rescale is applied here (the values are then
   in modality units, HU for CT); an instance whose rescale lives only in functional groups
   (enhanced multi-frame) is refused rather than windowed in stored values.
5. **Normalise** each frame by min–max to [0, 1], then invert MONOCHROME1 (bright always means
   attenuating, as MONOCHROME2 displays), then map to the card's ``range``.
6. **Resize** to the card's input shape with an antialiasing linear filter: ``resize = "pad"``
   scales to fit keeping the aspect ratio and centres the image on ``pad_value``;
   ``"stretch"`` scales each axis on its own. Pixel spacing and aspect ratio tags are not used
   (pixels are taken as square).

With ``voi = "window"`` steps 5 and 6 change order and meaning: each frame is first resized
in modality units (a linear filter on HU is what a coarser reconstruction would give, so the
result does not depend on the source's matrix size), then every window of the card,
``[center - width / 2, center + width / 2]``, maps linearly onto ``range`` and is clipped to it
(:func:`apply_windows`): no min–max scaling, so a given HU always gives the same input value.
One window gives one channel (repeated for a 3-channel model); several windows give one channel
each, in the card's order. MONOCHROME1 is not inverted: HU mean the same however displayed.
Padding gets ``pad_value`` in every channel.

The result is a float32 array of shape (frames, rows, columns, channels).

How it is computed (the same numbers, a fraction of the work; see docs/performance.md):

* Only the frames the card uses are decoded (:func:`pydicom.pixels.pixel_array` with ``index``)
  when they are fewer than all.
* For integer pixel data of at most 16 bits, steps 4 and 5 (and the HU of ``voi = "window"``)
  are a function of the stored value alone, so they are computed once per stored value in the
  frame's range (its minimum to its maximum; the same float64 expressions as per pixel), not
  once per pixel. The min–max bounds are read off that table: its end points when it is
  monotonic, else the values actually present.
* When that table is a straight line (a rescale, a window that does not clip the values present,
  no VOI) the frame is resized first and mapped after: the filter's weights sum to 1, so
  resizing commutes with an affine map, and the mapping runs on the small image. Otherwise each
  pixel is looked up in the table (one gather) and then resized.
* The resize uses the same weights as :func:`resample_matrix`, as sparse matrices
  (:mod:`scipy.sparse`, cached per size), in float32 on the full-size image. Inputs differ from
  a float64 dense computation by about 1e-7.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from scipy import sparse

from dicom_node.errors import PreprocessingError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dicom_node.infer.card import ModelCard, Window

MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Colour interpretations a 3-channel model takes (the decoders give RGB for the YBR family).
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

FloatArray = NDArray[np.float32]
Floats = NDArray[np.float64]
#: Stored-value types whose grey levels are computed per stored value (tables of ≤ 65 536 rows).
_TABLE_TYPES = frozenset(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16"))
#: A table counts as a straight line when no entry is further from it than this share of its
#: scale (float64 rounding is ~1e-16; a window that clips even one value is far above).
_LINE_RTOL = 1e-9


def _describe(ds: Dataset) -> str:
    """A short, patient-free name for the instance in error messages."""
    uid = ds.get("SOPInstanceUID")
    return f"instance {uid}" if uid else "dataset"


def check_supported(ds: Dataset, channels: int) -> str:
    """Return the photometric interpretation if the model can take this image, else raise."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        sop_class = ds.get("SOPClassUID")
        what = f" ({sop_class.name})" if sop_class is not None else ""
        raise PreprocessingError(
            f"{_describe(ds)}{what} has no pixel data (no Pixel Data, Float Pixel Data or "
            "Double Float Pixel Data element)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if not photometric:
        raise PreprocessingError(f"{_describe(ds)} has no Photometric Interpretation (0028,0004)")
    if photometric in MONOCHROME:
        return photometric
    if photometric in COLOUR and channels == 3:
        return photometric
    supported = sorted(MONOCHROME | (COLOUR if channels == 3 else frozenset()))
    raise PreprocessingError(
        f"{_describe(ds)}: photometric interpretation {photometric!r} is not supported by a "
        f"{channels}-channel model (supported: {', '.join(supported)})"
    )


def check_image_type(ds: Dataset, excluded: Sequence[str]) -> None:
    """Raise when a value of the instance's Image Type (0008,0008) is one the card excludes."""
    if not excluded:
        return
    value = ds.get("ImageType")
    values = [value] if isinstance(value, str) else list(value or [])
    hits = sorted({str(v).strip().upper() for v in values} & {e.upper() for e in excluded})
    if hits:
        raise PreprocessingError(
            f"{_describe(ds)}: Image Type {'/'.join(hits)} is excluded by the model card "
            "(preprocessing.exclude_image_types)"
        )


def _has_modality_rescale(ds: Dataset) -> bool:
    return bool(ds.get("ModalityLUTSequence")) or (
        "RescaleSlope" in ds and "RescaleIntercept" in ds
    )


def _decode(ds: Dataset, indices: NDArray[np.intp], n_frames: int) -> NDArray[Any]:
    """The frames ``indices`` of the pixel data, shape (frames, rows, columns[, samples]).

    All frames are decoded at once when all are used; otherwise only the ones used, one by one.
    :func:`pydicom.pixels.pixel_array`, not ``Dataset.pixel_array``: the dataset does not keep a
    decoded copy for the rest of the job (16 radiographs: 115 MB).
    """
    try:
        if len(indices) < n_frames:
            return np.stack([np.asarray(pixel_array(ds, index=int(i))) for i in indices])
        arr = np.asarray(pixel_array(ds))
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = tsyntax.name if tsyntax is not None else "unknown transfer syntax"
        raise PreprocessingError(
            f"{_describe(ds)}: cannot decode pixel data ({name}): {type(exc).__name__}: {exc}"
        ) from exc
    return arr[np.newaxis] if n_frames == 1 else arr


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        return int(value or 1)
    except (TypeError, ValueError):
        raise PreprocessingError(
            f"{_describe(ds)}: cannot decode pixel data: Number of Frames (0028,0008) is "
            f"{value!r}, not a number"
        ) from None


def _frame_indices(n_frames: int, frames: str, max_frames: int) -> NDArray[np.intp]:
    if frames == "first" or n_frames == 1:
        return np.zeros(1, dtype=np.intp)
    if n_frames <= max_frames:
        return np.arange(n_frames, dtype=np.intp)
    return np.unique(np.linspace(0, n_frames - 1, max_frames).round().astype(np.intp))


def _grey_levels(arr: NDArray[np.generic], ds: Dataset, voi: str) -> Floats:
    """Modality LUT / rescale, then (optionally) the dataset's VOI LUT or window."""
    try:
        out = apply_modality_lut(arr, ds)
        if voi == "dataset":
            if ds.get("VOILUTSequence") and not np.issubdtype(out.dtype, np.integer):
                # a VOI LUT is indexed by the (integer) output of the Modality LUT
                out = np.rint(out).astype(np.int64)
            out = apply_voi_lut(out, ds, index=0)
    except (ValueError, NotImplementedError, KeyError, IndexError, AttributeError) as exc:
        raise PreprocessingError(
            f"{_describe(ds)}: cannot apply the Modality/VOI LUT: {exc}"
        ) from exc
    return np.asarray(out, dtype=np.float64)


def _stored_levels(frame: NDArray[Any], ds: Dataset, voi: str) -> tuple[int, Floats] | None:
    """``(v0, levels)``: the grey level (:func:`_grey_levels`) of every stored value from the
    frame's smallest, v0, to its largest; None unless the frame holds integers of ≤ 16 bits."""
    if frame.dtype not in _TABLE_TYPES:
        return None
    first, last = int(frame.min()), int(frame.max())
    return first, _grey_levels(np.arange(first, last + 1).astype(frame.dtype), ds, voi)


def _unit(values: Floats, lo: float, hi: float) -> Floats:
    """``values`` scaled so that ``lo`` → 0 and ``hi`` → 1 (all 0 when ``hi <= lo``)."""
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise PreprocessingError("pixel values are not finite (NaN or infinity)")
    if hi <= lo:
        return np.zeros_like(values)
    return np.asarray((values - lo) / (hi - lo), dtype=np.float64)


def _minmax(frame: Floats) -> Floats:
    return _unit(frame, float(frame.min()), float(frame.max()))


def _bounds(levels: Floats, first: int, frame: NDArray[Any]) -> tuple[float, float]:
    """Smallest and largest grey level of the values present in ``frame`` (levels from ``first``):
    the table's end points when it is monotonic, else the levels of the values present."""
    steps = np.diff(levels)
    if np.all(steps >= 0) or np.all(steps <= 0):
        ends = (float(levels[0]), float(levels[-1]))
        return min(ends), max(ends)
    present = np.bincount((frame.astype(np.int64) - first).ravel(), minlength=len(levels)) > 0
    return float(levels[present].min()), float(levels[present].max())


def _is_line(levels: Floats) -> bool:
    """True when ``levels`` (equally spaced stored values) lie on a straight line."""
    if len(levels) <= 2:
        return bool(np.all(np.isfinite(levels)))
    line = np.linspace(levels[0], levels[-1], len(levels))
    scale = float(np.max(np.abs(levels))) + abs(float(levels[-1] - levels[0]))
    return bool(np.isfinite(scale) and np.max(np.abs(levels - line)) <= _LINE_RTOL * scale)


def _lookup(levels: Floats, first: int, frame: NDArray[Any]) -> FloatArray:
    """``levels[v - first]`` for each stored value v of ``frame`` (integers, ≤ 16 bits), float32."""
    if frame.dtype.kind == "u":
        table = np.zeros(first + len(levels), dtype=np.float32)
        table[first:] = levels
        return np.take(table, frame)
    unsigned = np.dtype(f"u{frame.dtype.itemsize}")  # index by the bit pattern, no subtraction
    table = np.zeros(2 ** (8 * frame.dtype.itemsize), dtype=np.float32)
    table[np.arange(first, first + len(levels)).astype(frame.dtype).view(unsigned)] = levels
    return np.take(table, frame.view(unsigned))


def _mapped(frame: NDArray[Any], first: int, levels: Floats, size: tuple[int, int]) -> Floats:
    """Each pixel's level (``levels[v - first]``), resized to ``size`` (unpadded), float64.

    When the levels are a straight line the stored values are resized and then mapped: exact,
    because the filter's weights sum to 1 (an affine map commutes with the resize). A resized
    value is a weighted mean, so it is clipped to the range of the values it comes from: float32
    rounding must not take it past the card's range."""
    last = first + len(levels) - 1
    if _is_line(levels):
        step = float(levels[-1] - levels[0]) / (last - first) if last > first else 0.0
        small = np.clip(_scale(frame.astype(np.float32), size), first, last).astype(np.float64)
        return np.asarray(levels[0] + step * (small - first), dtype=np.float64)
    small = _scale(_lookup(levels, first, frame), size).astype(np.float64)
    return np.asarray(np.clip(small, levels.min(), levels.max()), dtype=np.float64)


def _to_range(unit: Floats, invert: bool, out_range: tuple[float, float]) -> Floats:
    low, high = out_range
    if invert:
        unit = 1.0 - unit
    return np.asarray(low + (high - low) * unit, dtype=np.float64)


def apply_windows(
    values: NDArray[np.floating], windows: Sequence[Window], out_range: tuple[float, float]
) -> NDArray[np.float64]:
    """Map modality values (HU for CT) through fixed windows: one output channel per window.

    ``values`` has any shape; the result has that shape plus a last axis of ``len(windows)``.
    Each window maps ``center - width / 2`` to ``out_range[0]`` and ``center + width / 2`` to
    ``out_range[1]``, linearly, and clips to the range. NaN stays NaN.
    """
    low, high = out_range
    x = np.asarray(values, dtype=np.float64)[..., np.newaxis]
    lower = np.array([w.center - w.width / 2.0 for w in windows], dtype=np.float64)
    width = np.array([w.width for w in windows], dtype=np.float64)
    unit = np.clip((x - lower) / width, 0.0, 1.0)
    return np.asarray(low + (high - low) * unit, dtype=np.float64)


def resample_matrix(n_in: int, n_out: int) -> NDArray[np.float64]:
    """Weights (n_out, n_in) of a linear (triangle) filter, widened when shrinking (antialiasing).

    ``resample_matrix(rows, R) @ image @ resample_matrix(cols, C).T`` resizes a 2-D image.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    dist = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support
    weights = np.clip(1.0 - dist, 0.0, None)
    return np.asarray(weights / weights.sum(axis=1, keepdims=True), dtype=np.float64)


@lru_cache(maxsize=32)
def _sparse_weights(n_in: int, n_out: int, dtype: str) -> tuple[Any, Any]:
    """:func:`resample_matrix` and its transpose as CSR matrices of ``dtype``."""
    weights = resample_matrix(n_in, n_out).astype(dtype)
    return sparse.csr_array(weights), sparse.csr_array(weights.T)


def _scale(image: NDArray[np.floating[Any]], size: tuple[int, int]) -> NDArray[Any]:
    """A (rows, cols[, channels]) float image resized to ``size`` by :func:`resample_matrix`'s
    filter, in the image's precision; the same image when it already has that size (the filter
    is then the identity)."""
    rows, cols = image.shape[:2]
    if (rows, cols) == size:
        return image
    dtype = "float32" if image.dtype == np.float32 else "float64"
    wy, _ = _sparse_weights(rows, size[0], dtype)
    _, wxt = _sparse_weights(cols, size[1], dtype)
    if image.ndim == 2:
        return np.asarray((wy @ image.astype(dtype, copy=False)) @ wxt)
    return np.stack([np.asarray((wy @ image[:, :, c].astype(dtype)) @ wxt)
                     for c in range(image.shape[2])], axis=-1)


def _fitted(rows: int, cols: int, shape: tuple[int, int], mode: str) -> tuple[int, int]:
    """Size of the scaled image inside ``shape``: all of it ("stretch"), or the largest that
    keeps the aspect ratio ("pad")."""
    out_r, out_c = shape
    if mode == "stretch":
        return out_r, out_c
    scale = min(out_r / rows, out_c / cols)
    return min(out_r, max(1, round(rows * scale))), min(out_c, max(1, round(cols * scale)))


def _pad(scaled: NDArray[Any], shape: tuple[int, int], pad_value: float) -> NDArray[Any]:
    """A (rows, cols, channels) image centred on a ``shape`` canvas of ``pad_value``."""
    if scaled.ndim == 2:
        scaled = scaled[:, :, np.newaxis]
    new_r, new_c = scaled.shape[:2]
    out_r, out_c = shape
    if (new_r, new_c) == (out_r, out_c):
        return scaled
    canvas = np.full((out_r, out_c, scaled.shape[2]), pad_value, dtype=scaled.dtype)
    top, left = (out_r - new_r) // 2, (out_c - new_c) // 2
    canvas[top : top + new_r, left : left + new_c] = scaled
    return canvas


def resize(
    image: NDArray[np.float64], shape: tuple[int, int], mode: str, pad_value: float
) -> NDArray[np.float64]:
    """Resize a (rows, cols, channels) image to ``shape`` by ``mode`` ("pad" or "stretch")."""
    size = _fitted(image.shape[0], image.shape[1], shape, mode)
    return np.asarray(_pad(_scale(image, size), shape, pad_value))


def preprocess(ds: Dataset, card: ModelCard) -> FloatArray:
    """The model input for one instance: float32 (frames, rows, columns, channels).

    Raises PreprocessingError when the instance has no pixel data, an unsupported photometric
    interpretation, pixel data that cannot be decoded, or an invalid Modality/VOI LUT.
    """
    spec, channels = card.preprocessing, card.input.channels
    photometric = check_supported(ds, channels)
    check_image_type(ds, spec.exclude_image_types)
    colour = photometric in COLOUR
    windowed = spec.voi == "window"
    if windowed and colour:
        raise PreprocessingError(
            f"{_describe(ds)}: photometric interpretation {photometric!r} has no modality "
            'values; a card with voi = "window" takes MONOCHROME1/MONOCHROME2 images only'
        )
    if windowed and not _has_modality_rescale(ds) and (
        "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds
    ):
        raise PreprocessingError(
            f"{_describe(ds)}: its rescale is in functional groups, which are not read, so "
            "the card's windows (in modality units) cannot be applied"
        )
    n_frames = _number_of_frames(ds)
    arr = _decode(ds, _frame_indices(n_frames, spec.frames, spec.max_frames), n_frames)
    if arr.ndim != (4 if colour else 3):
        raise PreprocessingError(
            f"{_describe(ds)}: decoded pixel array has shape {arr.shape}, which does not match "
            f"{n_frames} frame(s) of {photometric}"
        )
    if windowed:
        batch = np.stack([_windowed_frame(frame, ds, card) for frame in arr])
    else:
        invert = photometric == "MONOCHROME1" and spec.invert_monochrome1
        batch = np.stack([_scaled_frame(frame, ds, card, colour, invert) for frame in arr])
    if batch.shape[-1] != channels:
        batch = np.repeat(batch, channels, axis=-1)
    return batch.astype(np.float32)


def _scaled_frame(frame: NDArray[Any], ds: Dataset, card: ModelCard, colour: bool,
                  invert: bool) -> Floats:
    """One frame: grey levels (not for colour), min–max, inverted if asked, onto ``range``,
    resized and padded."""
    spec = card.preprocessing
    size = _fitted(frame.shape[0], frame.shape[1], card.input.shape, spec.resize)
    table = (_stored_levels(frame, ds, spec.voi) if not colour
             else _identity_levels(frame))
    if table is None:  # float or 32-bit pixel data: every pixel through the steps
        grey = frame.astype(np.float64) if colour else _grey_levels(frame, ds, spec.voi)
        small = _scale(_to_range(_minmax(grey), invert, spec.range), size)
    else:
        first, grey = table
        lo, hi = _bounds(grey, first, frame)
        small = _mapped(frame, first, _to_range(_unit(grey, lo, hi), invert, spec.range), size)
    return np.asarray(_pad(small, card.input.shape, spec.pad_value), dtype=np.float64)


def _identity_levels(frame: NDArray[Any]) -> tuple[int, Floats] | None:
    """Colour samples are used as they are: the table of a colour frame is its stored values."""
    if frame.dtype not in _TABLE_TYPES:
        return None
    first, last = int(frame.min()), int(frame.max())
    return first, np.arange(first, last + 1, dtype=np.float64)


def _windowed_frame(frame: NDArray[Any], ds: Dataset, card: ModelCard) -> Floats:
    """One frame in modality units (HU), resized in those units, then through the card's
    windows; padding gets ``pad_value`` in every channel."""
    spec = card.preprocessing
    size = _fitted(frame.shape[0], frame.shape[1], card.input.shape, spec.resize)
    table = _stored_levels(frame, ds, "modality")
    if table is None:
        values = _grey_levels(frame, ds, "modality")
        _check_finite(values)
        small = _scale(values, size)
    else:
        first, values = table
        _check_finite(values)
        small = _mapped(frame, first, values, size)
    windowed = apply_windows(small, spec.windows, spec.range)
    return np.asarray(_pad(windowed, card.input.shape, spec.pad_value), dtype=np.float64)


def _check_finite(values: Floats) -> None:
    if not np.all(np.isfinite(values)):
        raise PreprocessingError("pixel values are not finite (NaN or infinity)")
