"""Blenders: scikit-learn-style estimators over the members' probabilities.

Every blender takes ``X`` of shape ``(N, M, C)`` float (the probabilities of M members for N rows
and C classes) and labels ``y (N,)``; ``fit(X, y)`` learns its state in attributes ending in
``_``; ``predict_proba(X)`` returns ``(N, C)`` probabilities with all C columns, also when a class
is absent from the rows it was fitted on. Cross-validation is a function of a blender and the
folds (:func:`cross_val_oof`, equal to scikit-learn's ``cross_val_predict`` with a
``PredefinedSplit``), not code inside it. A fitted blender is a handful of arrays
(:meth:`state` / ``from_state``), saved as plain data, never pickled.

* :class:`MeanBlender`     - the plain average;
* :class:`WeightedBlender` - convex weights minimising OOF log loss (softmax-parametrised,
  scipy L-BFGS);
* :class:`StackBlender`    - a multinomial logistic-regression meta-learner on the standardised
  log-probabilities (stacked generalisation, Wolpert 1992; scikit-learn's ``StackingClassifier``
  recipe of fitting the meta-learner on out-of-fold predictions only).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax as sp_softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit
from sklearn.preprocessing import StandardScaler

from pipeline.settings import BlendMethod

from pipeline.metrics import EPS


class _Blender(ClassifierMixin, BaseEstimator):
    """Shared: the class set (all C columns of ``X``) and the state round trip."""

    def _set_classes(self, X: np.ndarray) -> None:
        self.classes_ = np.arange(X.shape[2])

    def state(self) -> dict[str, np.ndarray]:
        """The fitted state as named arrays (saved with ``np.savez``, read without pickle)."""
        return {}

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    @classmethod
    def from_state(cls, params: dict, arrays: dict[str, np.ndarray], num_classes: int) -> "_Blender":
        """A fitted blender from :meth:`get_params` and :meth:`state`."""
        b = cls(**params)
        b.classes_ = np.arange(num_classes)
        b._load_state(arrays)
        return b

    def member_weights(self) -> np.ndarray:
        """``(M,)`` non-negative importance of each member, summing to 1 (for the report)."""
        raise NotImplementedError


class MeanBlender(_Blender):
    """The plain average of the members' probabilities."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> "MeanBlender":
        self._set_classes(X)
        self.n_members_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return X.mean(1)

    def _load_state(self, arrays):
        self.n_members_ = int(arrays.get("n_members", np.array(0)))

    def state(self):
        return {"n_members": np.array(self.n_members_)}

    def member_weights(self) -> np.ndarray:
        return np.full(self.n_members_, 1 / self.n_members_)


def fit_weights(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Convex blend weights minimising the log loss of ``sum_m w_m X[:, m]``.

    Args:
        X: ``(N, M, C)`` probabilities; y: ``(N,)`` labels.
    Returns:
        ``(M,)`` float64 weights, non-negative, summing to 1 (softmax of the L-BFGS solution).
    """
    p_true = X[np.arange(len(y)), :, y].T.astype(np.float64)  # (M, N)

    def loss(theta):
        w = sp_softmax(theta)
        p = np.clip(w @ p_true, EPS, 1)
        g_w = p_true @ (-(1.0 / p) / len(y))
        return -np.log(p).mean(), w * (g_w - w @ g_w)

    return sp_softmax(minimize(loss, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B").x)


class WeightedBlender(_Blender):
    """A convex combination of the members' probabilities, weights fitted on OOF log loss."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> "WeightedBlender":
        self._set_classes(X)
        self.weights_ = fit_weights(X, y)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.tensordot(X, self.weights_, axes=([1], [0]))

    def state(self):
        return {"weights": self.weights_}

    def _load_state(self, arrays):
        self.weights_ = np.asarray(arrays["weights"], dtype=np.float64)

    def member_weights(self) -> np.ndarray:
        return self.weights_


def stack_features(X: np.ndarray) -> np.ndarray:
    """``(N, M, C)`` probabilities -> ``(N, M*C)`` log-probability features (clipped at 1e-7)."""
    return np.log(np.clip(X, EPS, 1)).reshape(len(X), -1)


class StackBlender(_Blender):
    """Multinomial logistic regression on the standardised log-probabilities of the members.

    Standardising the features (each log-probability column to zero mean, unit variance) puts
    the L2 penalty ``C`` on one scale for every member and lets L-BFGS converge well within
    ``max_iter`` (raw log-probabilities span 0..-16 and left it short of convergence).
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000):
        self.C = C
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> "StackBlender":
        self._set_classes(X)
        F = stack_features(X)
        self.scaler_ = StandardScaler().fit(F)
        self.meta_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(self.scaler_.transform(F), y)
        self.n_members_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros((len(X), len(self.classes_)))
        out[:, self.meta_.classes_] = self.meta_.predict_proba(self.scaler_.transform(stack_features(X)))
        return out

    def state(self):
        return {"scaler_mean": self.scaler_.mean_, "scaler_scale": self.scaler_.scale_,
                "coef": self.meta_.coef_, "intercept": self.meta_.intercept_,
                "meta_classes": self.meta_.classes_, "n_members": np.array(self.n_members_)}

    def _load_state(self, arrays):
        n_features = arrays["scaler_mean"].shape[0]
        self.scaler_ = StandardScaler()
        self.scaler_.mean_, self.scaler_.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
        self.scaler_.var_ = self.scaler_.scale_ ** 2
        self.scaler_.n_features_in_ = n_features
        self.meta_ = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self.meta_.coef_, self.meta_.intercept_ = arrays["coef"], arrays["intercept"]
        self.meta_.classes_, self.meta_.n_features_in_ = arrays["meta_classes"], n_features
        self.n_members_ = int(arrays["n_members"])

    def member_weights(self) -> np.ndarray:
        """Mean absolute coefficient of each member's features, normalised to sum to 1."""
        c = np.abs(self.meta_.coef_).reshape(self.meta_.coef_.shape[0], self.n_members_, -1).mean((0, 2))
        return c / c.sum() if c.sum() else c


BLENDERS: dict[BlendMethod, type[_Blender]] = {
    BlendMethod.mean: MeanBlender, BlendMethod.weighted: WeightedBlender, BlendMethod.stack: StackBlender,
}


def make_blender(method: BlendMethod, stack_C: float = 1.0, stack_max_iter: int = 1000) -> _Blender:
    """An unfitted blender for ``method`` (``blend.stack_C`` / ``blend.stack_max_iter`` for stack)."""
    if method is BlendMethod.stack:
        return StackBlender(C=stack_C, max_iter=stack_max_iter)
    return BLENDERS[method]()


def cross_val_oof(blender: _Blender, X: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold predictions of the blender itself: for each fold f, a clone fitted on the
    other folds' rows predicts fold f's rows (scikit-learn's ``cross_val_predict`` with
    ``PredefinedSplit(folds)``), so a blender's CV score is as honest as its members'.

    Args:
        X: ``(N, M, C)`` OOF probabilities of the members; y: ``(N,)``; folds: ``(N,)`` fold ids.
    Returns:
        ``(N, C)`` float64 probabilities.
    """
    out = np.zeros((len(y), X.shape[2]))
    for tr, va in PredefinedSplit(folds).split():
        out[va] = clone(blender).fit(X[tr], y[tr]).predict_proba(X[va])
    return out
