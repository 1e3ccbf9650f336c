"""Scores of ``(N, C)`` probabilities, and the competition metric (``data.metric``) that ranks them.

Accuracy, log loss (probabilities clipped at 1e-7, renormalised), balanced accuracy and macro-F1
(scikit-learn's, of the predicted classes) and, for binary competitions, ROC AUC of the positive
class's probability. The metric picks the submitted blend and is the tuning objective; ties are
broken by log loss (or accuracy, for ``log_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from pipeline.errors import ConfigError
from pipeline.settings import Metric

EPS = 1e-7


@dataclass(frozen=True)
class Score:
    """OOF accuracy, log loss, balanced accuracy and macro-F1 of the most probable class, and ROC
    AUC (binary, both classes present). ``None``: not computed (ROC AUC of more classes; a score
    recorded before the last two existed)."""

    accuracy: float
    log_loss: float
    roc_auc: float | None = None
    balanced_accuracy: float | None = None
    macro_f1: float | None = None

    def value(self, metric: Metric) -> float:
        """The value of ``metric`` (ConfigError when ROC AUC is asked of a non-binary score, or a
        metric of a score recorded without it)."""
        v = getattr(self, Metric(metric).value)
        if v is None:
            raise ConfigError("data.metric=roc_auc: needs a binary competition (2 classes)"
                              if Metric(metric) is Metric.roc_auc else f"data.metric={Metric(metric).value}: "
                              f"not recorded with this score; run: python run.py stage=blend")
        return float(v)

    def rank(self, metric: Metric) -> tuple[float, float]:
        """A sort key, best first: the metric (higher is better except log loss), then a tie-break."""
        metric = Metric(metric)
        if metric is Metric.log_loss:
            return (self.log_loss, -self.accuracy)
        return (-self.value(metric), self.log_loss)


SCORE_FIELDS = ("accuracy", "log_loss", "roc_auc", "balanced_accuracy", "macro_f1")  # Score's, in order


def score(y: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> Score:
    """:class:`Score` of ``(N, C)`` probabilities against labels ``(N,)`` int; with ``weights``
    ``(N,)``, each row weighted (e.g. toward the test: :mod:`pipeline.adversarial`)."""
    p = np.clip(probs, EPS, 1)
    p = p / p.sum(1, keepdims=True)
    auc = None
    if probs.shape[1] == 2 and len(np.unique(y)) == 2:
        auc = float(roc_auc_score(y, probs[:, 1], sample_weight=weights))
    pred = probs.argmax(1)
    return Score(float(np.average(pred == y, weights=weights)),
                 float(log_loss(y, p, labels=np.arange(p.shape[1]), sample_weight=weights)), auc,
                 float(balanced_accuracy_score(y, pred, sample_weight=weights)),
                 float(f1_score(y, pred, labels=np.unique(y), average="macro", sample_weight=weights, zero_division=0)))


def check_metric(metric: Metric, num_classes: int) -> None:
    """ConfigError when ``metric`` does not apply to a competition of ``num_classes`` classes."""
    if Metric(metric) is Metric.roc_auc and num_classes != 2:
        raise ConfigError(f"data.metric=roc_auc: needs a binary competition; this one has "
                          f"{num_classes} classes (use accuracy or log_loss)")


# Metrics of the predicted classes whose best decision is not the most probable class: the
# submission's labels come from per-class weights fitted on the OOF predictions (fit_decision).
DECISION_METRICS = (Metric.balanced_accuracy, Metric.macro_f1)
DECISION_GRID = np.geomspace(0.25, 4.0, 9)  # the multipliers tried on each class's weight
DECISION_ROUNDS = 2                         # coordinate-ascent passes over the classes


def label_metric(y: np.ndarray, pred: np.ndarray, num_classes: int, metric: Metric) -> float:
    """Balanced accuracy or macro-F1 (over the classes present in ``y``, as scikit-learn's
    ``balanced_accuracy_score`` and ``f1_score(average="macro", labels=unique(y),
    zero_division=0)``) of ``(N,)`` int predicted classes against ``(N,)`` int labels, from one
    confusion matrix. Raises ValueError for another metric."""
    cm = np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    present = cm.sum(1) > 0
    diag = np.diag(cm).astype(np.float64)
    if Metric(metric) is Metric.balanced_accuracy:
        return float((diag[present] / cm.sum(1)[present]).mean())
    if Metric(metric) is Metric.macro_f1:
        denom = (cm.sum(0) + cm.sum(1))[present].astype(np.float64)
        return float(np.where(denom > 0, 2 * diag[present] / np.maximum(denom, 1), 0.0).mean())
    raise ValueError(f"{metric}: not a metric of predicted classes")


def fit_decision(y: np.ndarray, probs: np.ndarray, metric: Metric) -> np.ndarray:
    """``(C,)`` float64 per-class weights whose weighted argmax ``argmax(probs * w)`` maximises
    ``metric`` (:data:`DECISION_METRICS`) on ``(N, C)`` probabilities with labels ``(N,)``:
    coordinate ascent over :data:`DECISION_GRID` from equal weights, :data:`DECISION_ROUNDS`
    passes (the per-class threshold tuning of F1-optimal decisions, Lipton et al. 2014); for
    balanced accuracy the optimum under calibrated probabilities is ``1 / prior``, which the
    search approaches. Normalised to a maximum of 1."""
    c = probs.shape[1]
    w = np.ones(c)
    best = label_metric(y, probs.argmax(1), c, metric)
    for _ in range(DECISION_ROUNDS):
        for k in range(c):
            for g in DECISION_GRID:
                trial = w.copy()
                trial[k] = w[k] * g
                v = label_metric(y, (probs * trial).argmax(1), c, metric)
                if v > best + 1e-12:
                    best, w = v, trial
    return w / w.max()


def cross_fitted_decision(y: np.ndarray, probs: np.ndarray, folds: np.ndarray,
                          metric: Metric) -> tuple[np.ndarray, float, float]:
    """The decision for the submission and its honest OOF figure: ``(weights (C,) fitted on every
    row, metric of the weights fitted on the other folds applied to each fold, metric of the plain
    argmax)`` for ``(N, C)`` OOF probabilities, labels and folds ``(N,)``."""
    c = probs.shape[1]
    pred = np.empty(len(y), dtype=np.int64)
    for f in np.unique(folds):
        tr, va = folds != f, folds == f
        pred[va] = (probs[va] * fit_decision(y[tr], probs[tr], metric)).argmax(1)
    return (fit_decision(y, probs, metric), label_metric(y, pred, c, metric),
            label_metric(y, probs.argmax(1), c, metric))
