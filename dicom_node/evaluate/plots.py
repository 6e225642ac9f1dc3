"""PNG figures of an evaluation (matplotlib, the Agg canvas; pyplot is never imported).

Figures are built with :class:`matplotlib.figure.Figure` and drawn on an explicit
``FigureCanvasAgg``: no global pyplot state, no GUI backend, nothing that needs a display, and no
figure left open between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.errors import DicomNodeError
from dicom_node.evaluate.metrics import BoolArray, Confusion, FloatArray, roc_curve


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DicomNodeError("the plots need matplotlib: pip install 'dicom-node[eval]' "
                             "(or pass --no-plots)") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def confusion_png(path: Path, name: str, c: Confusion, threshold: float) -> Path:
    """A 2×2 confusion matrix with counts and row percentages."""
    fig = _figure(4.2, 3.8)
    ax = fig.add_subplot()
    cells = np.array([[c.tn, c.fp], [c.fn, c.tp]], dtype=np.float64)
    rows = cells.sum(axis=1, keepdims=True)
    share = np.divide(cells, rows, out=np.zeros_like(cells), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(cells):
        ax.text(j, i, f"{int(count)}\n{100 * share[i, j]:.1f} %", ha="center", va="center",
                color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks([0, 1], labels=["absent", "present"])
    ax.set_yticks([0, 1], labels=["absent", "present"])
    ax.set_xlabel(f"predicted (p ≥ {threshold:g})")
    ax.set_ylabel("label")
    ax.set_title(f"{name}: confusion matrix")
    fig.savefig(path)
    return path


def roc_png(path: Path, name: str, y: BoolArray, p: FloatArray, threshold: float,
            auc: float, card_auc: float | None) -> Path:
    """The ROC curve, its AUC (and the card's), and the operating point at the threshold."""
    fpr, tpr, _ = roc_curve(y, p)
    fig = _figure(4.2, 4.2)
    ax = fig.add_subplot()
    label = f"AUC {auc:.4f}" + (f" (card {card_auc:.4f})" if card_auc is not None else "")
    ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    pred = p >= threshold
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    ax.plot([np.sum(pred & ~y) / n_neg], [np.sum(pred & y) / n_pos], "o", color="black",
            label=f"threshold {threshold:g}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"{name}: ROC, {len(y)} cases")
    ax.legend(loc="lower right")
    fig.savefig(path)
    return path


def values_png(path: Path, title: str, xlabel: str, series: dict[str, Sequence[float]]) -> Path:
    """Histogram of per-case values (Dice, PSNR …), one colour per series."""
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot()
    finite = [v for values in series.values() for v in values if np.isfinite(v)]
    if finite:
        bins = np.linspace(min(finite), max(finite) + 1e-9, 21)
        for label, values in series.items():
            kept = [v for v in values if np.isfinite(v)]
            ax.hist(kept, bins=bins, alpha=0.6, label=f"{label} (mean {np.mean(kept):.3f})")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cases")
    ax.set_title(title)
    fig.savefig(path)
    return path
