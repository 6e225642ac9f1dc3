"""``dicom-node evaluate``: run a model through the node's own inference code on labelled data and
compare what it measures with the model card's ``[metrics]`` (a report model's ``[evaluation]``).

==========  ==========================================================  =========================
kind        DATA                                                        measures
==========  ==========================================================  =========================
classifier  DICOM files + ``labels.csv`` (``file``, one 0/1 column per   accuracy, precision,
            output name)                                                recall, F1, ROC AUC,
                                                                        confusion matrix
segmenter   one folder per case: its DICOM series + ``mask.npz``        Dice per case and mean
enhancer    ``noisy/`` and ``clean/`` with the same file names          PSNR and SSIM, output and
                                                                        noisy input vs clean
report      ``cases.jsonl``: per line one case's findings, study        consistency with the
            context and reference reports (with slots)                  findings before and after
                                                                        the check, cases repaired,
                                                                        BLEU and ROUGE-L
==========  ==========================================================  =========================

Modules: :mod:`.classifier`, :mod:`.segmenter`, :mod:`.enhancer`, :mod:`.report` (one per kind),
:mod:`.metrics` (numpy), :mod:`.plots` (matplotlib, Agg), :mod:`.progress` (rich, on stderr),
:mod:`.common` (the :class:`~dicom_node.evaluate.common.Report` every kind returns, its header).
"""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.errors import DicomNodeError
from dicom_node.evaluate.common import Report
from dicom_node.infer.card import ModelCard


def evaluate(card: ModelCard, model_dir: Path, data: Path, out: Path | None = None, *,
             plots: bool = True, limit: int | None = None, progress: bool = True,
             window: tuple[float, float] | None = None) -> Report:
    """Evaluate ``card``'s model on ``data``; with ``out``, write metrics.json and the plots.

    ``window`` (enhancers only): the modality-value window PSNR and SSIM are measured in.
    """
    if not data.is_dir():
        raise DicomNodeError(f"{data}: not a folder")
    if limit is not None and limit < 1:
        raise DicomNodeError("--limit must be at least 1")
    if out is None and plots:
        plots = False  # nowhere to write them
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if card.kind == "classifier":
        from dicom_node.evaluate.classifier import evaluate_classifier

        report = evaluate_classifier(card, model_dir, data, out, plots=plots, limit=limit,
                                     progress=progress)
    elif card.kind == "segmenter":
        from dicom_node.evaluate.segmenter import evaluate_segmenter

        report = evaluate_segmenter(card, model_dir, data, out, plots=plots, limit=limit,
                                    progress=progress)
    elif card.kind == "enhancer":
        from dicom_node.evaluate.enhancer import evaluate_enhancer

        report = evaluate_enhancer(card, model_dir, data, out, plots=plots, limit=limit,
                                   progress=progress, window=window)
    elif card.kind == "report":
        from dicom_node.evaluate.report import evaluate_report

        report = evaluate_report(card, model_dir, data, out, limit=limit, progress=progress)
    else:
        raise DicomNodeError(f"model {card.name}: evaluate does not know the kind {card.kind!r}")
    if out is None:
        return report
    path = out / "metrics.json"
    path.write_text(json.dumps(report.metrics, indent=2, allow_nan=True) + "\n",
                    encoding="utf-8")
    return Report(report.text + f"\nwrote {path}"
                  + "".join(f"\nwrote {f}" for f in report.files),
                  report.agrees, report.metrics, (path, *report.files))
