"""Evaluate a classifier on DICOM files labelled in ``labels.csv``.

``labels.csv``: a header row ``file,<output name>,…`` with one column per output of the card
(any order; every output must have one), then one row per case: a file name relative to the
data folder, and 0 or 1 per output. Each file is one case: it goes through
:func:`dicom_node.infer.runtime.classify` alone, exactly as a one-image study does in the node
(modality check, preprocessing, the model, the highest probability over its frames), and the
finding is predicted present when its probability is at least the card's threshold.

Per output: accuracy, precision, recall, F1, ROC AUC and the confusion matrix; compared with the
card's ``[metrics.per_output]`` with a tolerance of 3 standard errors for the number of cases
(binomial; Hanley & McNeil for ROC AUC), at least 0.005. On the card's own test set (as many
cases as the card's ``samples``) the numbers must agree to rounding (0.005) and the class counts
exactly; on a subset they differ by sampling error, which the tolerance allows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.errors import DicomNodeError, ModelError, PreprocessingError
from dicom_node.evaluate.common import Report, header
from dicom_node.evaluate.metrics import (
    RATES,
    TOLERANCE_FLOOR,
    binary_metrics,
    confusion,
    tolerance,
)
from dicom_node.evaluate.progress import progress_bar
from dicom_node.infer.card import ClassifierCard, ModelCard

LABELS_FILE = "labels.csv"


def read_labels(data: Path, outputs: list[str]) -> list[tuple[str, list[int]]]:
    """Rows of labels.csv as (file, labels in the card's output order); checked."""
    path = data / LABELS_FILE
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise DicomNodeError(f"{path}: cannot read: {exc.strerror}") from None
    with handle:
        reader = csv.reader(handle)
        head = [h.strip() for h in next(reader, [])]
        if not head or head[0] != "file":
            raise DicomNodeError(f"{path}: the first column must be 'file', got {head[:1]}")
        missing = [o for o in outputs if o not in head]
        if missing:
            raise DicomNodeError(f"{path}: no column for output(s) {', '.join(missing)} "
                                 f"(columns: {', '.join(head)})")
        index = [head.index(o) for o in outputs]
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(head):
                raise DicomNodeError(f"{path}:{line}: {len(row)} values, expected {len(head)}")
            values = [row[i].strip() for i in index]
            bad = [f"{o}={v!r}" for o, v in zip(outputs, values, strict=True)
                   if v not in ("0", "1")]
            if bad:
                raise DicomNodeError(f"{path}:{line}: labels must be 0 or 1: {', '.join(bad)}")
            rows.append((row[0].strip(), [int(v) for v in values]))
    if not rows:
        raise DicomNodeError(f"{path}: no cases")
    return rows


def evaluate_classifier(card: ModelCard, model_dir: Path, data: Path, out: Path | None, *,
                        plots: bool, limit: int | None, progress: bool) -> Report:
    from dicom_node.infer.runtime import classify

    if not isinstance(card, ClassifierCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not a classifier")
    names = [o.name for o in card.outputs]
    rows = read_labels(data, names)[:limit]
    files, labels, probs, skipped = [], [], [], []
    with progress_bar(f"{card.name}: classifying", len(rows), progress) as advance:
        for name, row_labels in rows:
            path = data / name
            try:
                result = classify(card, model_dir, [dcmread(path)])
            except (OSError, InvalidDicomError) as exc:
                raise DicomNodeError(f"{path}: cannot read: {exc}") from exc
            except PreprocessingError as exc:  # not an image this model reads: skip the case
                skipped.append(f"{name}: {exc}")
                advance()
                continue
            files.append(name)
            labels.append(row_labels)
            probs.append([f.probability for f in result.findings])
            advance()
    if not files:
        raise DicomNodeError(f"{data}: no case could be classified: {skipped[0]}")
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(probs, dtype=np.float64)
    lines = header(card, data, len(files), skipped)
    per_output: dict[str, Any] = {}
    agrees = True
    table: list[list[str]] = []
    written: list[Path] = []
    card_metrics = card.metrics.per_output if card.metrics else {}
    same_set = card.metrics is not None and card.metrics.samples == len(files)
    for i, output in enumerate(card.outputs):
        yi, pi = y[:, i], p[:, i]
        c = confusion(yi, pi, output.threshold)
        measured = binary_metrics(yi, pi, output.threshold)
        entry: dict[str, Any] = {
            "threshold": output.threshold,
            "code": output.code.model_dump(),
            **measured,
            "positives": c.positives, "negatives": c.negatives,
            "confusion": {"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn},
        }
        expected = card_metrics.get(output.name)
        if expected is not None:
            entry["card"] = expected.model_dump()
            entry["difference"], entry["tolerance"] = {}, {}
            for metric in RATES:
                value, ref = measured[metric], float(getattr(expected, metric))
                # the card's own set (same size): only rounding may differ
                tol = TOLERANCE_FLOOR if same_set else tolerance(metric, ref, c)
                diff = value - ref
                shown = diff if abs(diff) >= 5e-5 else 0.0  # no "-0.0000"
                ok = bool(np.isfinite(value) and abs(diff) <= tol)
                agrees &= ok
                entry["difference"][metric] = diff
                entry["tolerance"][metric] = tol
                table.append([output.name, metric, f"{value:.4f}", f"{ref:.4f}", f"{shown:+.4f}",
                              f"±{tol:.4f}", "ok" if ok else "DIFFERS"])
            if same_set:
                counts_ok = (expected.positives, expected.negatives) == (c.positives,
                                                                         c.negatives)
                agrees &= counts_ok
                table.append([output.name, "positives", str(c.positives),
                              str(expected.positives), f"{c.positives - expected.positives:+d}",
                              "0", "ok" if counts_ok else "DIFFERS"])
            entry["agrees"] = all(abs(entry["difference"][m]) <= entry["tolerance"][m]
                                  for m in RATES)
        else:
            table += [[output.name, metric, f"{measured[metric]:.4f}", "-", "-", "-", ""]
                      for metric in RATES]
        per_output[output.name] = entry
        if out is not None and plots:
            from dicom_node.evaluate.plots import confusion_png, roc_png

            written.append(confusion_png(out / f"confusion-{output.name}.png", output.name, c,
                                         output.threshold))
            written.append(roc_png(out / f"roc-{output.name}.png", output.name, yi, pi,
                                   output.threshold, measured["roc_auc"],
                                   expected.roc_auc if expected is not None else None))
    lines.append("")
    lines += _format(table, ["output", "metric", "measured", "card", "difference", "tolerance",
                             ""])
    lines.append("")
    for output in card.outputs:
        cm = per_output[output.name]["confusion"]
        lines.append(f"{output.name} at threshold {output.threshold:g}: TP {cm['tp']}, "
                     f"FP {cm['fp']}, FN {cm['fn']}, TN {cm['tn']}")
    if card_metrics:
        lines.append("every metric agrees with the card within its tolerance" if agrees else
                     "SOME METRICS DIFFER from the card by more than their tolerance")
    if out is not None:
        written.append(_write_predictions(out, names, files, y, p))
    metrics = {"model": card.name, "version": card.version, "kind": card.kind,
               "data": str(data), "cases": len(files), "skipped": skipped,
               "card_samples": card.metrics.samples if card.metrics else None,
               "per_output": per_output, "agrees": agrees}
    return Report("\n".join(lines), agrees, metrics, tuple(written))


def _write_predictions(out: Path, names: list[str], files: list[str], y: np.ndarray,
                       p: np.ndarray) -> Path:
    path = out / "predictions.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", *(f"label_{n}" for n in names), *(f"p_{n}" for n in names)])
        for name, yi, pi in zip(files, y, p, strict=True):
            writer.writerow([name, *(int(v) for v in yi), *(f"{v:.6f}" for v in pi)])
    return path


def _format(rows: list[list[str]], columns: list[str]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return lines
