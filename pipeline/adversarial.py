"""Adversarial validation: can a classifier tell the test images from the training images?

A Kaggle staple (e.g. "Adversarial validation", FastML 2016; Pan et al. 2020, "Adversarial
Validation Approach to Concept Drift Problem in User Targeting Automation Systems at Uber"): label
every training image 0 and every test image 1, fit a classifier, and read its cross-validated ROC
AUC. Near 0.5 the two sides come from one distribution and the CV score estimates the
leaderboard; well above it (:data:`SHIFT_AUC`) the test differs (other days, devices, sites, or
patients), and the CV overstates the leaderboard.

Where a linear probe's pooled features of a pretrained backbone are cached (an ImageNet network
sees content: objects, backgrounds, devices), they describe the images, with scikit-learn's
logistic regression on their principal components as the classifier (:func:`adversarial_features`).
Else the images are described by their pixels downsampled to :data:`GRID` x :data:`GRID` per
channel (area means) and each image's mean and standard deviation: cheap, and enough to see shifts
of exposure, colour, framing and resolution, with scikit-learn's ``HistGradientBoostingClassifier``,
early-stopped on a held-out tenth (:func:`adversarial_validation`). Both are regularised so that
without a shift the probabilities stay near the prior (unregularised, ELPV's 2,099 rows gave
importance weights up to 140x: the weighted score rested on 19 to 325 rows; docs/results.md).
Either is cross-validated over at most :data:`MAX_ROWS` images of each side. The out-of-fold
probability ``p`` of "test" for each scored training row gives the rows that look most like the
test and importance weights ``p / (1 - p)`` (the density ratio of test to train, Shimodaira
2000), with which an OOF score can be weighted toward the test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.io import read_rows

SHIFT_AUC = 0.7   # above this cross-validated AUC the test is called distinguishable from train
GRID = 8          # the downsampled side of the pixel description
MAX_ROWS = 4000   # images per side the classifier sees (a stratified random subsample above it)
FOLDS = 3         # the cross-validation of the adversarial classifier
CHUNK = 256       # images described at a time
FEATURES_C = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # inverse L2 strengths tried on the features' components
FEATURES_PCA = 64  # principal components of the standardised pretrained features the regression sees


@dataclass(frozen=True)
class AdversarialResult:
    """What the adversarial classifier found.

    Attributes:
        auc: its cross-validated ROC AUC of test against train (0.5: indistinguishable).
        n_train, n_test: the images of each side it scored.
        rows: ``(n_train,)`` int64 training rows it scored (all, or a random subsample).
        p_test: ``(n_train,)`` float64 out-of-fold probability that each of ``rows`` is a test image.
        source: what described the images and the classifier (e.g. ``pixels 8x8 with each
            image's mean and spread, gradient boosting``).
    """

    auc: float
    n_train: int
    n_test: int
    rows: np.ndarray
    p_test: np.ndarray
    source: str

    @property
    def shifted(self) -> bool:
        """The test is distinguishable from train (:data:`SHIFT_AUC`)."""
        return self.auc > SHIFT_AUC

    def most_test_like(self, n: int = 10) -> np.ndarray:
        """``(n,)`` int64 training rows that look most like the test, the most first."""
        return self.rows[np.argsort(-self.p_test, kind="stable")[:n]]

    def effective_rows(self) -> float:
        """Kish's effective sample size of :meth:`weights`, ``(sum w)^2 / sum w^2``: the rows the
        weighted score rests on (``n_train`` when every weight is 1)."""
        w = self.weights()
        return float(w.sum() ** 2 / max(1e-12, (w ** 2).sum()))

    def weights(self) -> np.ndarray:
        """``(n_train,)`` float64 importance weights ``p / (1 - p)`` of :attr:`rows`, mean 1."""
        p = np.clip(self.p_test, 1e-3, 1 - 1e-3)
        w = p / (1 - p)
        return w / w.mean()


def describe(images: np.ndarray) -> np.ndarray:
    """``(N, C * GRID * GRID + 2)`` float32 description of ``(N, C, S, S)`` uint8 images: each
    channel's area means over a :data:`GRID` x :data:`GRID` grid (the side cropped to a multiple
    of it), then each image's mean and standard deviation, all in [0, 1]. Raises ValueError for
    images smaller than the grid."""
    n, c, s, _ = images.shape
    if s < GRID:
        raise ValueError(f"images of {s} px: smaller than the {GRID} px grid")
    cell, out = s // GRID, []
    for i in range(0, n, CHUNK):  # a chunk at a time: large images never all in float32
        x = np.asarray(images[i: i + CHUNK, :, : cell * GRID, : cell * GRID], dtype=np.float32) / 255.0
        grid = x.reshape(len(x), c, GRID, cell, GRID, cell).mean((3, 5)).reshape(len(x), -1)
        flat = x.reshape(len(x), -1)
        out.append(np.concatenate([grid, flat.mean(1, keepdims=True), flat.std(1, keepdims=True)], 1))
    return np.concatenate(out) if out else np.zeros((0, c * GRID * GRID + 2), np.float32)


def adversarial_validation(x_train: np.ndarray, x_test: np.ndarray, seed: int = 0) -> AdversarialResult:
    """Cross-validated train-against-test classification (module docstring) of ``(N, C, S, S)``
    uint8 training and ``(M, C, S, S)`` uint8 test images: at most :data:`MAX_ROWS` of each side,
    :data:`FOLDS`-fold stratified, scikit-learn's ``HistGradientBoostingClassifier``
    (early-stopped) on :func:`describe`. Deterministic for a ``seed``. Raises ValueError for
    images smaller than :data:`GRID` px or an empty side."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rows, test_rows = _draw(len(x_train), len(x_test), seed)
    x = np.concatenate([describe(read_rows(x_train, rows)), describe(read_rows(x_test, test_rows))])
    clf = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, early_stopping=True, random_state=seed)
    return _classify(clf, x, rows, test_rows, seed,
                     f"pixels {GRID}x{GRID} with each image's mean and spread, gradient boosting")


def adversarial_features(f_train: np.ndarray, f_test: np.ndarray, source: str, seed: int = 0) -> AdversarialResult:
    """The same classification on ``(N, F)`` and ``(M, F)`` float features of the training and
    test images (a pretrained backbone's pooled features, ``source`` naming them): scikit-learn's
    logistic regression on the standardised features' first :data:`FEATURES_PCA` principal
    components, its C (:data:`FEATURES_C`) chosen by log loss in an inner 3-fold CV, so that
    without a shift its probabilities stay near the prior and the importance weights near 1.
    Deterministic for a ``seed``. Raises ValueError for an empty side or features of different
    widths."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if f_train.ndim != 2 or f_test.ndim != 2 or f_train.shape[1] != f_test.shape[1]:
        raise ValueError(f"features of shapes {f_train.shape} and {f_test.shape}: expected (N, F) and (M, F)")
    rows, test_rows = _draw(len(f_train), len(f_test), seed)
    x = np.concatenate([f_train[rows], f_test[test_rows]]).astype(np.float32)
    search = GridSearchCV(LogisticRegression(max_iter=1000), {"C": list(FEATURES_C)}, scoring="neg_log_loss",
                          cv=FOLDS)
    clf = make_pipeline(StandardScaler(), PCA(min(FEATURES_PCA, *x.shape), random_state=seed), search)
    return _classify(clf, x, rows, test_rows, seed, f"{source}, logistic regression")


def _draw(n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most :data:`MAX_ROWS` sorted random rows of each side. Raises ValueError for an empty side."""
    if n_train == 0 or n_test == 0:
        raise ValueError("adversarial validation needs training and test images")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_train)[:MAX_ROWS]), np.sort(rng.permutation(n_test)[:MAX_ROWS])


def _classify(clf, x: np.ndarray, rows: np.ndarray, test_rows: np.ndarray, seed: int, source: str) -> AdversarialResult:
    """``clf``'s :data:`FOLDS`-fold out-of-fold probabilities of "test" on ``x`` (the ``rows``'
    descriptions, then the ``test_rows``'), and their ROC AUC."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.r_[np.zeros(len(rows), dtype=np.int64), np.ones(len(test_rows), dtype=np.int64)]
    cv = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    p = cross_val_predict(clf, x, y, cv=cv, method="predict_proba")[:, 1]
    return AdversarialResult(float(roc_auc_score(y, p)), len(rows), len(test_rows), rows.astype(np.int64),
                             p[: len(rows)].astype(np.float64), source)
