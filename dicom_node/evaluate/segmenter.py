"""Evaluate a segmenter: Dice of its masks against reference masks, per case and on average.

DATA holds one folder per case (sorted by name): the case's DICOM series (every file but
``mask.npz``) and ``mask.npz`` with the array ``mask``, uint8 (slices, rows, cols): 0 background,
k = the card's k-th output (segment number k). Slice i of the reference is the i-th image of the
series sorted along the slice normal (Image Position (Patient) projected on the cross product of
the Image Orientation (Patient) vectors), the order :class:`~dicom_node.messages.SegmentationResult`
uses; an optional array ``sop_instance_uids`` in the same file gives the order explicitly.

Each case goes through :func:`dicom_node.infer.segment.segment`, as one series does in the node.
Its mask is put in the reference's slice order by SOP Instance UID (a slice the model did not
return counts as empty). Dice = 2|P∩R| / (|P| + |R|) per segment; a case where both are empty
scores 1.0 and is counted apart ("both empty"), and the mean is also given over the cases whose
reference is not empty, the usual figure for lesion segmentation.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import DicomNodeError, ModelError, PreprocessingError
from dicom_node.evaluate.common import Report, header
from dicom_node.evaluate.metrics import TOLERANCE_FLOOR, Z, dice
from dicom_node.evaluate.progress import progress_bar
from dicom_node.infer.card import ModelCard, SegmenterCard

MASK_FILE = "mask.npz"


def slice_order(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The datasets sorted along the slice normal (Instance Number when geometry is missing)."""
    def key(ds: Dataset) -> tuple[float, int]:
        orientation = ds.get("ImageOrientationPatient")
        position = ds.get("ImagePositionPatient")
        number = int(ds.get("InstanceNumber", 0) or 0)
        if orientation is None or position is None:
            return (float(number), number)
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return (float(np.dot(normal, np.asarray(position, float))), number)

    return sorted(datasets, key=key)


def _segment_function() -> Any:
    try:
        return importlib.import_module("dicom_node.infer.segment").segment
    except (ImportError, AttributeError) as exc:
        raise DicomNodeError("this version of dicom-node has no segmenter runtime "
                             "(dicom_node.infer.segment)") from exc


def _read_case(folder: Path) -> tuple[list[Dataset], np.ndarray, list[str]]:
    datasets: list[Dataset] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MASK_FILE):
        try:
            datasets.append(dcmread(path))
        except (InvalidDicomError, OSError) as exc:
            raise DicomNodeError(f"{path}: not a DICOM file: {exc}") from exc
    if not datasets:
        raise DicomNodeError(f"{folder}: no DICOM file")
    try:
        with np.load(folder / MASK_FILE) as npz:
            mask = np.asarray(npz["mask"])
            order = ([str(u) for u in npz["sop_instance_uids"]]
                     if "sop_instance_uids" in npz.files else None)
    except (OSError, KeyError, ValueError) as exc:
        raise DicomNodeError(f"{folder / MASK_FILE}: cannot read the array 'mask': {exc}") from exc
    if order is None:
        order = [str(ds.SOPInstanceUID) for ds in slice_order(datasets)]
    if mask.ndim != 3 or mask.shape[0] != len(order):
        raise DicomNodeError(f"{folder / MASK_FILE}: mask has shape {mask.shape}; expected "
                             f"({len(order)}, rows, cols), one slice per image of the series")
    return datasets, mask, order


def _aligned(result: Any, order: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """The result's mask in the reference's slice order."""
    predicted = np.asarray(result.mask)
    index = {frame.sop_instance_uid: i for i, frame in enumerate(result.frames)}
    out = np.zeros(shape, dtype=np.uint8)
    if predicted.shape[1:] != shape[1:]:
        raise DicomNodeError(f"the model's mask has slices of {predicted.shape[1:]}, the "
                             f"reference {shape[1:]}")
    for i, uid in enumerate(order):
        if uid in index:
            out[i] = predicted[index[uid]]
    return out


def evaluate_segmenter(card: ModelCard, model_dir: Path, data: Path, out: Path | None, *,
                       plots: bool, limit: int | None, progress: bool) -> Report:
    if not isinstance(card, SegmenterCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not a segmenter")
    segment = _segment_function()
    cases = sorted(p for p in data.iterdir() if p.is_dir() and (p / MASK_FILE).is_file())
    if not cases:
        raise DicomNodeError(f"{data}: no case folder with a {MASK_FILE}")
    cases = cases[:limit]
    names = [o.name for o in card.outputs]
    per_case: list[dict[str, Any]] = []
    skipped: list[str] = []
    with progress_bar(f"{card.name}: segmenting", len(cases), progress) as advance:
        for folder in cases:
            datasets, reference, order = _read_case(folder)
            try:
                result = segment(card, model_dir, datasets)
            except PreprocessingError as exc:
                skipped.append(f"{folder.name}: {exc}")
                advance()
                continue
            predicted = _aligned(result, order, reference.shape)
            row: dict[str, Any] = {"case": folder.name, "slices": int(reference.shape[0])}
            for k, name in enumerate(names, start=1):
                ref_k, pred_k = reference == k, predicted == k
                row[name] = {"dice": dice(pred_k, ref_k), "reference_voxels": int(ref_k.sum()),
                             "predicted_voxels": int(pred_k.sum())}
            per_case.append(row)
            advance()
    if not per_case:
        raise DicomNodeError(f"{data}: no case could be segmented: {skipped[0]}")
    lines = header(card, data, len(per_case), skipped)
    summary: dict[str, Any] = {}
    agrees = True
    table = []
    for name in names:
        scores = np.array([c[name]["dice"] for c in per_case])
        lesion = np.array([c[name]["dice"] for c in per_case if c[name]["reference_voxels"]])
        both_empty = sum(1 for c in per_case
                         if not c[name]["reference_voxels"] and not c[name]["predicted_voxels"])
        entry: dict[str, Any] = {
            "mean_dice": float(scores.mean()),
            "mean_dice_non_empty_reference": float(lesion.mean()) if lesion.size else math.nan,
            "cases_non_empty_reference": int(lesion.size),
            "cases_both_empty": both_empty,
        }
        verdicts, card_text = [], []
        for key, value in _card_dice(card, name).items():
            scores_k = lesion if key == "mean_dice_non_empty_reference" else scores
            if not scores_k.size:
                continue
            se = (float(scores_k.std(ddof=1) / math.sqrt(scores_k.size))
                  if scores_k.size > 1 else 0.0)
            same_set = getattr(card.metrics, "samples", None) == len(per_case)
            tol = TOLERANCE_FLOOR if same_set else max(Z * se, TOLERANCE_FLOOR)
            ok = abs(entry[key] - value) <= tol
            agrees &= ok
            verdicts.append(ok)
            entry.setdefault("card", {})[key] = value
            entry.setdefault("tolerance", {})[key] = tol
            card_text.append(f"{value:.4f} ±{tol:.4f}")
        if verdicts:
            entry["agrees"] = all(verdicts)
        verdict = ("ok" if all(verdicts) else "DIFFERS") if verdicts else ""
        summary[name] = entry
        table.append([name, f"{entry['mean_dice']:.4f}",
                      f"{entry['mean_dice_non_empty_reference']:.4f}", str(lesion.size),
                      str(both_empty), " / ".join(card_text) or "-", verdict])
    lines.append("")
    widths = [max(len(r[i]) for r in [*table, _SEG_COLUMNS]) for i in range(len(_SEG_COLUMNS))]
    for r in [_SEG_COLUMNS, *table]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    lines.append("")
    lines += [f"  {c['case']}: " + ", ".join(f"{n} Dice {c[n]['dice']:.3f} "
                                             f"({c[n]['predicted_voxels']} / "
                                             f"{c[n]['reference_voxels']} voxels)"
                                             for n in names) for c in per_case[:20]]
    if len(per_case) > 20:
        lines.append(f"  … {len(per_case) - 20} more cases in metrics.json")
    written: list[Path] = []
    if out is not None and plots:
        from dicom_node.evaluate.plots import values_png

        written.append(values_png(out / "dice.png", f"{card.name}: Dice per case", "Dice",
                                  {n: [c[n]["dice"] for c in per_case] for n in names}))
    metrics = {"model": card.name, "version": card.version, "kind": card.kind,
               "data": str(data), "cases": len(per_case), "skipped": skipped,
               "per_output": summary, "per_case": per_case, "agrees": agrees}
    return Report("\n".join(lines), agrees, metrics, tuple(written))


_SEG_COLUMNS = ["SEGMENT", "MEAN DICE", "MEAN DICE (REFERENCE NOT EMPTY)", "CASES",
                "BOTH EMPTY", "CARD (ALL / NOT EMPTY)", ""]


def _card_dice(card: SegmenterCard, name: str) -> dict[str, float]:
    """The card's Dice of an output, where its ``[metrics.per_output.<name>]`` gives them:
    ``dice_all_volumes`` (→ mean Dice) and ``dice`` (→ mean Dice, reference not empty)."""
    metrics: Any = card.metrics
    per_output = getattr(metrics, "per_output", None) or {}
    holder = per_output.get(name)
    found = {}
    for ours, theirs in (("mean_dice", "dice_all_volumes"),
                         ("mean_dice_non_empty_reference", "dice")):
        value = getattr(holder, theirs, None)
        if isinstance(value, int | float):
            found[ours] = float(value)
    return found
