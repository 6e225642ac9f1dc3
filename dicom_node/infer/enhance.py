"""Run an enhancer (an image in, an image of the same geometry out) over a study's images.

For each source instance, in this order:

1. **Select**: the instance's Modality must be one of the card's modalities, and it must be a
   single-frame, one-sample monochrome image with integer pixel data whose modality values come
   from Rescale Slope/Intercept (a Modality LUT Sequence cannot be inverted). Localizers (Image
   Type value 3 ``LOCALIZER``) are not enhanced. Anything else is skipped with an
   ``image_skipped`` log line; when nothing is left, PreprocessingError.
2. **Decode** with pydicom's pixel handlers (any transfer syntax the installed plug-ins read:
   JPEG, JPEG-LS, JPEG 2000, RLE), then apply Rescale Slope/Intercept: modality values (HU).
3. **Scale**: clip to the card's ``[enhancement].value_range``, then ``(v - offset) / scale``.
4. **Tile**: the image is padded by reflection (``tile_overlap`` on every side, and up to one
   tile), cut into tiles of the card's ``input.shape`` that share ``tile_overlap`` pixels with
   their neighbours, and run through the network in batches (tiles of several images together).
   Tiles are blended with weights that fall linearly to the tile's edge, so seams do not show
   and any matrix size works.
5. **Back to stored values** in the source's own representation: ``v * scale + offset``, the
   inverse rescale, rounding, and clipping to the range of Bits Stored and Pixel Representation;
   the array has the dtype pydicom decodes the source to (same Bits Allocated and signedness).
   Pixels whose modality value lies outside ``value_range`` (e.g. metal) and padding pixels
   (Pixel Padding Value / Range Limit) keep their stored value exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from dicom_node.errors import ModelError, PreprocessingError
from dicom_node.infer.card import EnhancementSpec, EnhancerCard, ModelCard
from dicom_node.infer.runtime import load_model, predict

log = structlog.get_logger(__name__)

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

#: Tiles run through the network per group of images (bounds the memory of a large series).
MAX_TILES_PER_GROUP = 256
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})


def enhance(
    card: ModelCard, model_dir: Path, sources: Sequence[Dataset]
) -> list[tuple[Dataset, NDArray[Any]]]:
    """The enhanced pixels of every usable source image, in source order.

    Each pair is (the source dataset, its enhanced stored pixel values): same rows and columns,
    same dtype, to be encoded with the source's Bits Allocated/Stored, Pixel Representation and
    Rescale Slope/Intercept. Raises ModelError when the card is not an enhancer's or the model
    fails, PreprocessingError when no source can be enhanced.
    """
    if not isinstance(card, EnhancerCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not an enhancer")
    started = time.perf_counter()
    usable: list[tuple[Dataset, _Decoded]] = []
    problems: list[str] = []
    for ds in sources:
        uid = str(ds.get("SOPInstanceUID", ""))
        reason = _reason_to_skip(ds, card)
        decoded: _Decoded | None = None
        if reason is None:
            try:
                decoded = _decode(ds, card.enhancement)
            except Exception as exc:  # pydicom's decoders raise many types for bad pixel data
                reason = f"pixel data cannot be decoded: {exc}"
        if decoded is None:
            problems.append(f"instance {uid or '(no SOP Instance UID)'}: {reason}")
            log.info("image_skipped", model=card.name, sop_instance_uid=uid, reason=reason)
            continue
        usable.append((ds, decoded))
    if not usable:
        detail = "; ".join(problems) if problems else "no instances given"
        raise PreprocessingError(f"model {card.name}: no image to enhance: {detail}")
    model = load_model(card, model_dir)
    _check_output(model, card)
    values = _run(model, card, [d.values for _, d in usable])
    pairs = [(ds, d.to_stored(v)) for (ds, d), v in zip(usable, values, strict=True)]
    log.info("images_enhanced", model=card.name, version=card.version, images=len(pairs),
             skipped=len(problems), seconds=round(time.perf_counter() - started, 3))
    return pairs


def enhance_values(
    card: ModelCard, model_dir: Path, images: Sequence[NDArray[Any]]
) -> list[FloatArray]:
    """Enhance 2-D arrays of modality values (HU for CT) directly, as :func:`enhance` does.

    For training scripts and evaluations that hold images as arrays rather than datasets.
    Values outside the card's value range keep their value.
    """
    if not isinstance(card, EnhancerCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not an enhancer")
    arrays = [np.asarray(image, dtype=np.float64) for image in images]
    for index, array in enumerate(arrays):
        if array.ndim != 2 or min(array.shape) < 1:
            raise PreprocessingError(f"image #{index}: expected a 2-D array, got {array.shape}")
    low, high = card.enhancement.value_range
    model = load_model(card, model_dir)
    _check_output(model, card)
    out = _run(model, card, arrays)
    return [np.where((a < low) | (a > high), a, o) for a, o in zip(arrays, out, strict=True)]


class _Decoded:
    """A source image's stored values, modality values, and the pixels that must not change."""

    def __init__(self, ds: Dataset, stored: NDArray[Any], spec: EnhancementSpec) -> None:
        self.stored = stored
        self.slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        self.intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        self.values: FloatArray = stored.astype(np.float64) * self.slope + self.intercept
        low, high = spec.value_range
        self.keep: BoolArray = (self.values < low) | (self.values > high)
        padding = ds.get("PixelPaddingValue")
        if padding is not None:
            limit = ds.get("PixelPaddingRangeLimit", padding)
            lo, hi = sorted((int(padding), int(limit)))
            self.keep |= (stored >= lo) & (stored <= hi)
        bits = int(ds.BitsStored)
        if int(ds.PixelRepresentation) == 1:
            self.range = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        else:
            self.range = (0, 2**bits - 1)

    def to_stored(self, values: FloatArray) -> NDArray[Any]:
        stored = np.rint((values - self.intercept) / self.slope)
        stored = np.clip(stored, *self.range).astype(self.stored.dtype)
        return np.where(self.keep, self.stored, stored)


def _reason_to_skip(ds: Dataset, card: EnhancerCard) -> str | None:
    """Why ``ds`` cannot be enhanced, or None when it can."""
    modality = str(ds.get("Modality", ""))
    if modality not in card.modalities:
        return f"modality {modality or '(none)'!r} not in {', '.join(card.modalities)}"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if len(image_type) > 2 and image_type[2] == "LOCALIZER":
        return "a localizer (Image Type value 3 LOCALIZER)"
    if "PixelData" not in ds:
        return "no Pixel Data (0x7FE0,0x0010)"
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return "a multi-frame image (only single-frame images are enhanced)"
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return f"Samples per Pixel is {ds.SamplesPerPixel}, not 1"
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in MONOCHROME:
        return f"photometric interpretation {photometric or '(none)'!r} is not monochrome"
    if "ModalityLUTSequence" in ds:
        return "a Modality LUT Sequence (only Rescale Slope/Intercept can be inverted)"
    if int(ds.get("BitsAllocated", 0)) not in (8, 16) or "BitsStored" not in ds:
        return f"Bits Allocated {ds.get('BitsAllocated')} (8 or 16 are enhanced)"
    if "PixelRepresentation" not in ds:
        return "no Pixel Representation (0028,0103)"
    return None


def _decode(ds: Dataset, spec: EnhancementSpec) -> _Decoded:
    stored = np.asarray(pixel_array(ds))  # no decoded copy kept in the dataset
    if stored.ndim != 2:
        raise PreprocessingError(f"decoded pixels have shape {stored.shape}, expected 2-D")
    return _Decoded(ds, stored, spec)


def _check_output(model: Any, card: EnhancerCard) -> None:
    expected = (None, *card.input.shape, card.input.channels)
    got = tuple(model.output_shape)
    if got != expected:
        raise ModelError(
            f"model {card.name} {card.version}: output shape {got} is not its input shape "
            f"{expected}: an enhancer returns an image like the one it takes"
        )
    if card.input.channels != 1:
        raise ModelError(f"model {card.name}: enhancers take one channel, not "
                         f"{card.input.channels}")


def _run(model: Any, card: EnhancerCard, images: Sequence[FloatArray]) -> list[FloatArray]:
    """Network output for each image, in modality values (values outside the range too)."""
    spec = card.enhancement
    low, high = spec.value_range
    tile = card.input.shape
    out: list[FloatArray] = []
    for group in _groups(images, tile, spec.tile_overlap):
        tiles: list[FloatArray] = []
        layouts: list[_Layout] = []
        for image in group:
            x = (np.clip(image, low, high) - spec.offset) / spec.scale
            layout = _Layout(x.shape, tile, spec.tile_overlap)
            tiles.extend(layout.cut(x))
            layouts.append(layout)
        batch = np.stack(tiles)[..., np.newaxis].astype(np.float32)
        try:
            pred = predict(model, batch)
        except Exception as exc:  # a backend error must not escape as a framework exception
            raise ModelError(f"model {card.name} {card.version} failed to run: {exc}") from exc
        if not np.all(np.isfinite(pred)):
            raise ModelError(f"model {card.name} {card.version} returned non-finite pixels")
        start = 0
        for layout in layouts:
            n = layout.count
            y = layout.join(pred[start:start + n, ..., 0].astype(np.float64))
            out.append(y * spec.scale + spec.offset)
            start += n
    return out


def _groups(images: Sequence[FloatArray], tile: tuple[int, int],
            overlap: int) -> Iterator[list[FloatArray]]:
    """Consecutive images whose tiles together stay under MAX_TILES_PER_GROUP (one at least)."""
    group: list[FloatArray] = []
    count = 0
    for image in images:
        n = _Layout((image.shape[0], image.shape[1]), tile, overlap).count
        if group and count + n > MAX_TILES_PER_GROUP:
            yield group
            group, count = [], 0
        group.append(image)
        count += n
    if group:
        yield group


def _starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile origins along one axis of ``length`` (>= size) pixels."""
    if length <= size:
        return [0]
    step = size - 2 * overlap
    starts = list(range(0, length - size, step))
    starts.append(length - size)
    return starts


class _Layout:
    """How one image is padded, cut into tiles, and put together again."""

    def __init__(self, shape: tuple[int, ...], tile: tuple[int, int], overlap: int) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.tile = tile
        self.overlap = overlap
        padded = [max(n + 2 * overlap, t) for n, t in zip(self.shape, tile, strict=True)]
        self.before = [overlap + (p - n - 2 * overlap) // 2
                       for n, p in zip(self.shape, padded, strict=True)]
        self.after = [p - n - b for n, p, b in zip(self.shape, padded, self.before, strict=True)]
        self.padded = (padded[0], padded[1])
        self.rows = _starts(padded[0], tile[0], overlap)
        self.cols = _starts(padded[1], tile[1], overlap)
        self.count = len(self.rows) * len(self.cols)

    def cut(self, image: FloatArray) -> list[FloatArray]:
        widths = list(zip(self.before, self.after, strict=True))
        if min(self.shape) > 1:
            padded = np.pad(image, widths, mode="reflect")
        else:
            padded = np.pad(image, widths, mode="edge")
        th, tw = self.tile
        return [padded[r:r + th, c:c + tw] for r in self.rows for c in self.cols]

    def join(self, tiles: NDArray[np.float64]) -> FloatArray:
        th, tw = self.tile
        weight = np.outer(_ramp(th, self.overlap), _ramp(tw, self.overlap))
        total = np.zeros(self.padded)
        norm = np.zeros(self.padded)
        index = 0
        for r in self.rows:
            for c in self.cols:
                total[r:r + th, c:c + tw] += tiles[index] * weight
                norm[r:r + th, c:c + tw] += weight
                index += 1
        joined = total / norm
        r0, c0 = self.before
        return np.asarray(joined[r0:r0 + self.shape[0], c0:c0 + self.shape[1]])


def _ramp(size: int, overlap: int) -> FloatArray:
    """Weights along one tile axis: rising linearly over ``overlap`` pixels at both ends."""
    i = np.arange(size, dtype=np.float64)
    return np.minimum(1.0, np.minimum(i + 1.0, size - i) / (overlap + 1.0))
