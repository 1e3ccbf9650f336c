"""Scores of ``(N, C)`` probabilities, and the competition metric (``data.metric``) that ranks them.

Accuracy, log loss (probabilities clipped at 1e-7, renormalised) and, for binary competitions,
ROC AUC of the positive class's probability. The metric picks the submitted blend and is the
tuning objective; ties are broken by log loss (or accuracy, for ``log_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from pipeline.errors import ConfigError
from pipeline.settings import Metric

EPS = 1e-7


@dataclass(frozen=True)
class Score:
    """OOF accuracy, log loss and (binary, both classes present) ROC AUC, else ``None``."""

    accuracy: float
    log_loss: float
    roc_auc: float | None = None

    def value(self, metric: Metric) -> float:
        """The value of ``metric`` (ConfigError when ROC AUC is asked of a non-binary score)."""
        v = getattr(self, Metric(metric).value)
        if v is None:
            raise ConfigError("data.metric=roc_auc: needs a binary competition (2 classes)")
        return float(v)

    def rank(self, metric: Metric) -> tuple[float, float]:
        """A sort key, best first: the metric (higher is better except log loss), then a tie-break."""
        metric = Metric(metric)
        if metric is Metric.log_loss:
            return (self.log_loss, -self.accuracy)
        return (-self.value(metric), self.log_loss)


def score(y: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> Score:
    """:class:`Score` of ``(N, C)`` probabilities against labels ``(N,)`` int; with ``weights``
    ``(N,)``, each row weighted (e.g. toward the test: :mod:`pipeline.adversarial`)."""
    p = np.clip(probs, EPS, 1)
    p = p / p.sum(1, keepdims=True)
    auc = None
    if probs.shape[1] == 2 and len(np.unique(y)) == 2:
        auc = float(roc_auc_score(y, probs[:, 1], sample_weight=weights))
    return Score(float(np.average(probs.argmax(1) == y, weights=weights)),
                 float(log_loss(y, p, labels=np.arange(p.shape[1]), sample_weight=weights)), auc)


def check_metric(metric: Metric, num_classes: int) -> None:
    """ConfigError when ``metric`` does not apply to a competition of ``num_classes`` classes."""
    if Metric(metric) is Metric.roc_auc and num_classes != 2:
        raise ConfigError(f"data.metric=roc_auc: needs a binary competition; this one has "
                          f"{num_classes} classes (use accuracy or log_loss)")
