"""Evaluate an enhancer: PSNR and SSIM of its output, and of its input, against clean images.

DATA holds ``noisy/`` and ``clean/`` with the same file names. The noisy images go through
:func:`dicom_node.infer.enhance.enhance` (a few at a time, as a series does in the node); its
stored values are turned into modality values with the noisy source's Rescale Slope/Intercept,
the values the derived series carries. Both images are compared in modality units (HU for CT),
clipped to a window whose width is the data range: ``--window LOW HIGH`` when given, else
[-1000, 1000] for CT, else the clean image's own minimum and maximum. Pixels that the clean image
marks as padding (Pixel Padding Value) are left out; PSNR is computed over the other pixels
(``skimage.metrics.peak_signal_noise_ratio``), SSIM is the mean of skimage's SSIM map over them.

Files are grouped by name: ``<group>.dcm`` or ``<group>_<number>.dcm``. Each set of the card's
``[metrics.image_quality]`` is compared with the files named after it (:func:`named_after`: the
group of that name, or files whose words and numbers all appear in the set's name, e.g.
``693_UNCR_200000.dcm`` for ``real_693_UNCR_2e5``): mean PSNR within 3 standard errors or 0.1 dB,
mean SSIM within 3 standard errors or 0.005; with as many files as the set's ``samples`` (taken as
the card's own set), within 0.1 dB and 0.005.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut

from dicom_node.errors import DicomNodeError, ModelError
from dicom_node.evaluate.common import Report, header
from dicom_node.evaluate.metrics import Z
from dicom_node.evaluate.progress import progress_bar
from dicom_node.infer.card import EnhancerCard, ModelCard

#: Default window (modality units) of CT images: air to dense bone, as the shipped card measures.
CT_WINDOW = (-1000.0, 1000.0)
#: Images per call of enhance().
CHUNK = 8
_GROUP_RE = re.compile(r"^(.*?)(?:_\d+)?$")


def group_of(name: str) -> str:
    """``synthetic_007.dcm`` → ``synthetic``; ``real.dcm`` → ``real``."""
    match = _GROUP_RE.match(Path(name).stem)
    return match.group(1) if match and match.group(1) else Path(name).stem


def _tokens(name: str) -> list[str | float]:
    """Words (lower case) and numbers (by value: 2e5 = 200000) of a name."""
    out: list[str | float] = []
    for token in re.split(r"[_\-. ]+", name):
        if not token:
            continue
        try:
            out.append(float(token))
        except ValueError:
            out.append(token.lower())
    return out


def named_after(file_name: str, set_name: str) -> bool:
    """Whether a file belongs to a card's image-quality set: its group has the set's name, or
    every word and number of its name is in the set's name, and every number of the set's name
    is in the file's (``693_UNCR_200000.dcm`` belongs to ``real_693_UNCR_2e5``)."""
    if group_of(file_name) == set_name:
        return True
    mine, theirs = _tokens(Path(file_name).stem), _tokens(set_name)
    return (all(t in theirs for t in mine)
            and all(t in mine for t in theirs if isinstance(t, float)))


def quality(clean: np.ndarray, test: np.ndarray, mask: np.ndarray,
            window: tuple[float, float]) -> tuple[float, float]:
    """PSNR (dB) and mean SSIM of ``test`` against ``clean`` inside ``mask``, in ``window``."""
    metrics: Any = importlib.import_module("skimage.metrics")
    low, high = window
    ref, img = np.clip(clean, low, high), np.clip(test, low, high)
    span = high - low
    if np.array_equal(ref[mask], img[mask]):
        psnr = math.inf  # identical: no error to put a peak over
    else:
        psnr = float(metrics.peak_signal_noise_ratio(ref[mask], img[mask], data_range=span))
    _, ssim_map = metrics.structural_similarity(ref, img, data_range=span, full=True)
    return psnr, float(np.mean(ssim_map[mask]))


def _modality(ds: Dataset, stored: np.ndarray | None = None) -> np.ndarray:
    arr = ds.pixel_array if stored is None else stored
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)


def _window(clean: Dataset, values: np.ndarray, given: tuple[float, float] | None
            ) -> tuple[float, float]:
    if given is not None:
        return given
    if str(clean.get("Modality", "")) == "CT":
        return CT_WINDOW
    low, high = float(values.min()), float(values.max())
    return (low, high if high > low else low + 1.0)


def _enhance_function() -> Any:
    try:
        return importlib.import_module("dicom_node.infer.enhance").enhance
    except (ImportError, AttributeError) as exc:
        raise DicomNodeError("this version of dicom-node has no enhancer runtime "
                             "(dicom_node.infer.enhance)") from exc


def _read(path: Path) -> Dataset:
    try:
        return dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise DicomNodeError(f"{path}: not a DICOM file: {exc}") from exc


def evaluate_enhancer(card: ModelCard, model_dir: Path, data: Path, out: Path | None, *,
                      plots: bool, limit: int | None, progress: bool,
                      window: tuple[float, float] | None = None) -> Report:
    if not isinstance(card, EnhancerCard):
        raise ModelError(f"model {card.name} is an {card.kind}, not an enhancer")
    try:
        importlib.import_module("skimage.metrics")
    except ImportError as exc:
        raise DicomNodeError("PSNR and SSIM need scikit-image: pip install "
                             "'dicom-node[eval]'") from exc
    enhance = _enhance_function()
    noisy_dir, clean_dir = data / "noisy", data / "clean"
    if not noisy_dir.is_dir() or not clean_dir.is_dir():
        raise DicomNodeError(f"{data}: needs the folders noisy/ and clean/")
    names = sorted(p.name for p in noisy_dir.iterdir() if p.is_file())[:limit]
    missing = [n for n in names if not (clean_dir / n).is_file()]
    if missing:
        raise DicomNodeError(f"{clean_dir}: no clean image for {', '.join(missing[:5])}")
    if not names:
        raise DicomNodeError(f"{noisy_dir}: no files")
    rows: list[dict[str, Any]] = []
    with progress_bar(f"{card.name}: enhancing", len(names), progress) as advance:
        for start in range(0, len(names), CHUNK):
            chunk = names[start:start + CHUNK]
            sources = [_read(noisy_dir / n) for n in chunk]
            outputs = {id(src): stored for src, stored in enhance(card, model_dir, sources)}
            for name, source in zip(chunk, sources, strict=True):
                rows.append(_compare(name, source, outputs.get(id(source)),
                                     _read(clean_dir / name), window))
                advance()
    return _report(card, data, rows, out, plots)


def _compare(name: str, noisy: Dataset, stored: np.ndarray | None, clean: Dataset,
             window: tuple[float, float] | None) -> dict[str, Any]:
    if stored is None:
        return {"file": name, "skipped": "the model did not enhance it (see the log)"}
    ref = _modality(clean)
    noisy_values = _modality(noisy)
    output = _modality(noisy, np.asarray(stored))
    if not ref.shape == noisy_values.shape == output.shape:
        raise DicomNodeError(f"{name}: shapes differ: clean {ref.shape}, noisy "
                             f"{noisy_values.shape}, output {output.shape}")
    mask = np.ones(ref.shape, dtype=bool)
    if "PixelPaddingValue" in clean:
        mask = clean.pixel_array != int(clean.PixelPaddingValue)
    win = _window(clean, ref, window)
    psnr_in, ssim_in = quality(ref, noisy_values, mask, win)
    psnr_out, ssim_out = quality(ref, output, mask, win)
    return {"file": name, "group": group_of(name), "window": list(win),
            "psnr_input_db": psnr_in, "psnr_output_db": psnr_out,
            "ssim_input": ssim_in, "ssim_output": ssim_out}


_KEYS = ("psnr_input_db", "psnr_output_db", "ssim_input", "ssim_output")
_FLOORS = {"psnr_input_db": 0.1, "psnr_output_db": 0.1, "ssim_input": 0.005,
           "ssim_output": 0.005}


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def _report(card: EnhancerCard, data: Path, rows: list[dict[str, Any]], out: Path | None,
            plots: bool) -> Report:
    done = [r for r in rows if "skipped" not in r]
    skipped = [f"{r['file']}: {r['skipped']}" for r in rows if "skipped" in r]
    if not done:
        raise DicomNodeError(f"{data}: no image could be enhanced")
    lines = header(card, data, len(done), skipped)
    groups: dict[str, list[dict[str, Any]]] = {"all": done}
    for r in done:
        groups.setdefault(r["group"], []).append(r)
    # [metrics.image_quality] of an enhancer card: set name → ImageQuality
    card_sets: dict[str, Any] = dict(getattr(card.metrics, "image_quality", None) or {})
    for set_name in card_sets:
        members = [r for r in done if named_after(r["file"], set_name)]
        if members and set_name not in groups:
            groups[set_name] = members
    table, summary, agrees = [], {}, True
    for group, members in groups.items():
        means = {k: _mean(members, k) for k in _KEYS}
        entry: dict[str, Any] = {"samples": len(members), **means}
        expected = card_sets.get(group)
        cells = ["-"] * 4
        verdict = ""
        if expected is not None:
            entry["card"], entry["tolerance"] = expected.model_dump(), {}
            ok_all = True
            for i, k in enumerate(_KEYS):
                values = [r[k] for r in members]
                se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 \
                    else 0.0
                # the card's own set (same size): only rounding may differ
                tol = (_FLOORS[k] if len(members) == expected.samples
                       else max(Z * se, _FLOORS[k]))
                ref = float(getattr(expected, k))
                ok = abs(means[k] - ref) <= tol
                ok_all &= ok
                entry["tolerance"][k] = tol
                cells[i] = f"{ref:.4g} ±{tol:.2g}"
            entry["agrees"] = ok_all
            agrees &= ok_all
            verdict = "ok" if ok_all else "DIFFERS"
        summary[group] = entry
        table.append([group, str(len(members)), f"{means['psnr_input_db']:.2f}",
                      f"{means['psnr_output_db']:.2f}",
                      f"{means['psnr_output_db'] - means['psnr_input_db']:+.2f}",
                      f"{means['ssim_input']:.4f}", f"{means['ssim_output']:.4f}",
                      *cells, verdict])
    columns = ["SET", "N", "PSNR IN", "PSNR OUT", "GAIN dB", "SSIM IN", "SSIM OUT",
               "CARD PSNR IN", "CARD PSNR OUT", "CARD SSIM IN", "CARD SSIM OUT", ""]
    widths = [max(len(r[i]) for r in [columns, *table]) for i in range(len(columns))]
    lines.append("")
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in [columns, *table]]
    unmatched = sorted(set(card_sets) - set(groups))
    if unmatched:
        lines.append(f"card sets with no files named after them here: {', '.join(unmatched)}")
    written: list[Path] = []
    if out is not None and plots:
        from dicom_node.evaluate.plots import values_png

        written.append(values_png(out / "psnr.png", f"{card.name}: PSNR per image", "PSNR (dB)",
                                  {"input": [r["psnr_input_db"] for r in done],
                                   "output": [r["psnr_output_db"] for r in done]}))
        written.append(values_png(out / "ssim.png", f"{card.name}: SSIM per image", "SSIM",
                                  {"input": [r["ssim_input"] for r in done],
                                   "output": [r["ssim_output"] for r in done]}))
    metrics = {"model": card.name, "version": card.version, "kind": card.kind,
               "data": str(data), "cases": len(done), "skipped": skipped, "sets": summary,
               "per_image": rows, "agrees": agrees}
    return Report("\n".join(lines), agrees, metrics, tuple(written))
