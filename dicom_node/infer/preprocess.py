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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from dicom_node.errors import PreprocessingError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dicom_node.infer.card import ModelCard, Window

MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Colour interpretations a 3-channel model takes (the decoders give RGB for the YBR family).
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

FloatArray = NDArray[np.float32]


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


def _decode(ds: Dataset) -> NDArray[np.generic]:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = tsyntax.name if tsyntax is not None else "unknown transfer syntax"
        raise PreprocessingError(
            f"{_describe(ds)}: cannot decode pixel data ({name}): {type(exc).__name__}: {exc}"
        ) from exc


def _frame_indices(n_frames: int, frames: str, max_frames: int) -> NDArray[np.intp]:
    if frames == "first" or n_frames == 1:
        return np.zeros(1, dtype=np.intp)
    if n_frames <= max_frames:
        return np.arange(n_frames, dtype=np.intp)
    return np.unique(np.linspace(0, n_frames - 1, max_frames).round().astype(np.intp))


def _grey_levels(arr: NDArray[np.generic], ds: Dataset, voi: str) -> NDArray[np.float64]:
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


def _minmax(frame: NDArray[np.float64]) -> NDArray[np.float64]:
    lo, hi = float(frame.min()), float(frame.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise PreprocessingError("pixel values are not finite (NaN or infinity)")
    if hi <= lo:
        return np.zeros_like(frame)
    return np.asarray((frame - lo) / (hi - lo), dtype=np.float64)


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


def resize(
    image: NDArray[np.float64], shape: tuple[int, int], mode: str, pad_value: float
) -> NDArray[np.float64]:
    """Resize a (rows, cols, channels) image to ``shape`` by ``mode`` ("pad" or "stretch")."""
    rows, cols = image.shape[:2]
    out_r, out_c = shape
    if mode == "stretch":
        new_r, new_c = out_r, out_c
    else:
        scale = min(out_r / rows, out_c / cols)
        new_r = min(out_r, max(1, round(rows * scale)))
        new_c = min(out_c, max(1, round(cols * scale)))
    wy, wx = resample_matrix(rows, new_r), resample_matrix(cols, new_c)
    scaled = np.stack([wy @ image[:, :, c] @ wx.T for c in range(image.shape[2])], axis=-1)
    if (new_r, new_c) == (out_r, out_c):
        return scaled
    canvas = np.full((out_r, out_c, image.shape[2]), pad_value, dtype=np.float64)
    top, left = (out_r - new_r) // 2, (out_c - new_c) // 2
    canvas[top : top + new_r, left : left + new_c] = scaled
    return canvas


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
    arr = _decode(ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames == 1:
        arr = arr[np.newaxis]
    if arr.ndim != (4 if colour else 3):
        raise PreprocessingError(
            f"{_describe(ds)}: decoded pixel array has shape {arr.shape}, which does not match "
            f"{n_frames} frame(s) of {photometric}"
        )
    arr = arr[_frame_indices(arr.shape[0], spec.frames, spec.max_frames)]
    if windowed:
        batch = _windowed_frames(_grey_levels(arr, ds, "modality"), card)
        if batch.shape[-1] != channels:
            batch = np.repeat(batch, channels, axis=-1)
        return batch.astype(np.float32)
    grey = arr.astype(np.float64) if colour else _grey_levels(arr, ds, spec.voi)[..., np.newaxis]
    low, high = spec.range
    frames = []
    for frame in grey:
        unit = _minmax(frame)
        if photometric == "MONOCHROME1" and spec.invert_monochrome1:
            unit = 1.0 - unit
        scaled = low + (high - low) * unit
        frames.append(resize(scaled, card.input.shape, spec.resize, spec.pad_value))
    batch = np.stack(frames)
    if batch.shape[-1] != channels:
        batch = np.repeat(batch, channels, axis=-1)
    return batch.astype(np.float32)


def _windowed_frames(values: NDArray[np.float64], card: ModelCard) -> NDArray[np.float64]:
    """Frames of modality values → resized in those units, then through the card's windows."""
    spec = card.preprocessing
    if not np.all(np.isfinite(values)):
        raise PreprocessingError("pixel values are not finite (NaN or infinity)")
    frames = []
    for frame in values:
        # pad with NaN so that padding is told apart from values after resizing
        sized = resize(frame[:, :, np.newaxis], card.input.shape, spec.resize, np.nan)
        out = apply_windows(sized[:, :, 0], spec.windows, spec.range)
        frames.append(np.where(np.isnan(out), spec.pad_value, out))
    return np.stack(frames)
