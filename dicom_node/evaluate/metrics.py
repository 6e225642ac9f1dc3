"""Metrics, in numpy only: binary classification, ROC, tolerances, Dice.

The binary metrics are the definitions models/chest-xray-cnn/train.py wrote into the card
(a finding is predicted present when ``p >= threshold``, as :class:`~dicom_node.messages.Finding`
decides; precision, recall and F1 are 0 when their denominator is 0; ROC AUC is the
Mann–Whitney U statistic with ties counted half), so the same predictions give the card's numbers
to the last digit. scikit-learn gives the same values (``roc_auc_score`` is the same statistic);
it is not a dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

#: Metrics that are proportions of cases, compared with the card's [metrics.per_output].
RATES = ("accuracy", "precision", "recall", "f1", "roc_auc")
#: The smallest tolerance used when comparing with the card (rounding to 4 digits, float noise).
TOLERANCE_FLOOR = 0.005
#: Standard errors allowed between a measurement and the card's value (≈ 99.7 % two-sided).
Z = 3.0


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.fp + self.tn

    @property
    def predicted_positives(self) -> int:
        return self.tp + self.fp


def confusion(y: BoolArray, p: FloatArray, threshold: float) -> Confusion:
    pred = p >= threshold
    return Confusion(tp=int(np.sum(pred & y)), fp=int(np.sum(pred & ~y)),
                     fn=int(np.sum(~pred & y)), tn=int(np.sum(~pred & ~y)))


def roc_auc(y: BoolArray, p: FloatArray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties half); NaN with one class only."""
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y: BoolArray, p: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """False and true positive rates at every distinct score, from (0, 0) to (1, 1).

    Returns (fpr, tpr, thresholds); point i counts ``p >= thresholds[i]`` as positive.
    """
    order = np.argsort(-p, kind="stable")
    scores, truth = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tied run
    tps = np.cumsum(truth)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    n_pos, n_neg = max(float(truth.sum()), 1.0), max(float(len(truth) - truth.sum()), 1.0)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, scores[last]].astype(np.float64)
    return fpr, tpr, thresholds


def binary_metrics(y: BoolArray, p: FloatArray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1 at ``threshold``, and ROC AUC."""
    c = confusion(y, p, threshold)
    precision = c.tp / c.predicted_positives if c.predicted_positives else 0.0
    recall = c.tp / c.positives if c.positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (c.tp + c.tn) / len(y) if len(y) else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(y, p),
    }


def best_threshold(y: BoolArray, p: FloatArray) -> float:
    """The threshold (0.05 … 0.95, step 0.01) with the best F1; the lowest such on ties (how
    the shipped classifiers' train.py scripts choose theirs on the validation split)."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    scores = [binary_metrics(y, p, float(t))["f1"] for t in grid]
    return float(grid[int(np.argmax(scores))])


def standard_error(metric: str, expected: float, c: Confusion) -> float:
    """Standard error of ``metric`` measured on the cases of ``c`` if its true value were
    ``expected`` (the card's): binomial for the rates, Hanley & McNeil (1982) for ROC AUC.

    F1 is treated as a proportion over the mean of positives and predicted positives (its
    harmonic-mean denominator), which is close for the values a card holds.
    """
    e = min(max(expected, 0.0), 1.0)
    n = {
        "accuracy": c.positives + c.negatives,
        "precision": c.predicted_positives,
        "recall": c.positives,
        "f1": (c.positives + c.predicted_positives) / 2.0,
    }.get(metric)
    if n is not None:
        return math.sqrt(e * (1 - e) / n) if n > 0 else math.inf
    if metric == "roc_auc":
        n_pos, n_neg = c.positives, c.negatives
        if not n_pos or not n_neg:
            return math.inf
        q1, q2 = e / (2 - e), 2 * e * e / (1 + e)
        var = (e * (1 - e) + (n_pos - 1) * (q1 - e * e) + (n_neg - 1) * (q2 - e * e)) / (
            n_pos * n_neg)
        return math.sqrt(max(var, 0.0))
    raise ValueError(f"no standard error for {metric!r}")


def tolerance(metric: str, expected: float, c: Confusion) -> float:
    """How far a measurement on these cases may lie from the card's value and still agree."""
    return max(Z * standard_error(metric, expected, c), TOLERANCE_FLOOR)


def dice(pred: BoolArray, truth: BoolArray) -> float:
    """Dice coefficient 2|P∩T| / (|P| + |T|); 1.0 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.sum(pred & truth)) / total
