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
* :class:`StackBlender`    - a meta-learner on the members' OOF predictions (stacked
  generalisation, Wolpert 1992; scikit-learn's ``StackingClassifier`` recipe of fitting it on
  out-of-fold predictions only): multinomial logistic regression on standardised features, or
  scikit-learn's ``HistGradientBoostingClassifier``; features log-probabilities or probabilities,
  optionally each member's prediction entropy;
* :class:`GeometricMeanBlender`, :class:`PowerMeanBlender`, :class:`RankMeanBlender` - fixed
  means (of probabilities, of their powers, of their per-class ranks);
* :class:`EnsembleSelectionBlender` - greedy forward selection with replacement on OOF log loss
  (Caruana, Niculescu-Mizil, Crew & Ksikes, "Ensemble selection from libraries of models", ICML
  2004), with sorted initialisation and bagged selections (as AutoGluon and auto-sklearn use it).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax as sp_softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit
from sklearn.preprocessing import StandardScaler

from pipeline.metrics import EPS
from pipeline.settings import BlendMethod, BlendSettings, StackMeta

BLENDERS: dict[BlendMethod, type["_Blender"]] = {}  # filled by @register, one entry per method


def register(method: BlendMethod):
    """Class decorator: the blender of ``method`` (:func:`make_blender` creates it by name)."""
    def add(cls):
        cls.method = method
        BLENDERS[method] = cls
        return cls

    return add


class _Blender(ClassifierMixin, BaseEstimator):
    """Shared: the class set (all C columns of ``X``) and the state round trip."""

    method: BlendMethod

    def _set_classes(self, X: np.ndarray) -> None:
        self.classes_ = np.arange(X.shape[2])

    @classmethod
    def from_settings(cls, b: BlendSettings) -> "_Blender":
        """An unfitted blender with its settings from the checked ``blend`` group (none by default)."""
        return cls()

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


@register(BlendMethod.mean)
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


@register(BlendMethod.weighted)
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


def stack_features(X: np.ndarray, kind: str = "logprob", entropy: bool = False) -> np.ndarray:
    """``(N, M, C)`` probabilities -> ``(N, M*C [+ M])`` meta-features: log-probabilities (clipped
    at 1e-7) or probabilities, plus each member's prediction entropy when ``entropy``."""
    P = np.clip(X, EPS, 1)
    F = (np.log(P) if kind == "logprob" else X).reshape(len(X), -1)
    if entropy:
        F = np.concatenate([F, -(P * np.log(P)).sum(2)], axis=1)
    return F


@register(BlendMethod.stack)
class StackBlender(_Blender):
    """A meta-learner on the members' predictions.

    ``meta="logistic"``: multinomial logistic regression on standardised features (each column to
    zero mean, unit variance: the L2 penalty ``C`` acts on one scale for every member and L-BFGS
    converges well within ``max_iter``; raw log-probabilities span 0..-16 and left it short).
    ``meta="hgb"``: scikit-learn's ``HistGradientBoostingClassifier`` (at most 200 trees, early
    stopping off), saved in scikit-learn's secure format (skops), loading only scikit-learn and
    numpy types. ``features``: ``logprob`` or ``prob``; ``entropy``: add each member's prediction
    entropy.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, meta: str = "logistic",
                 features: str = "logprob", entropy: bool = False):
        self.C = C
        self.max_iter = max_iter
        self.meta = meta
        self.features = features
        self.entropy = entropy

    @classmethod
    def from_settings(cls, b: BlendSettings) -> "StackBlender":
        return cls(C=float(b.stack_C), max_iter=int(b.stack_max_iter), meta=StackMeta(b.stack_meta).value,
                   features=str(b.stack_features.value), entropy=bool(b.stack_entropy))

    def _features(self, X: np.ndarray) -> np.ndarray:
        return stack_features(X, self.features, self.entropy)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "StackBlender":
        self._set_classes(X)
        F = self._features(X)
        self.n_members_ = X.shape[1]
        if StackMeta(self.meta) is StackMeta.hgb:
            from sklearn.ensemble import HistGradientBoostingClassifier

            self.scaler_ = None
            self.meta_ = HistGradientBoostingClassifier(max_iter=min(self.max_iter, 200), early_stopping=False,
                                                        random_state=0).fit(F, y)
            return self
        self.scaler_ = StandardScaler().fit(F)
        self.meta_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(self.scaler_.transform(F), y)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        F = self._features(X)
        out = np.zeros((len(X), len(self.classes_)))
        out[:, self.meta_.classes_] = self.meta_.predict_proba(F if self.scaler_ is None else self.scaler_.transform(F))
        return out

    def state(self):
        if StackMeta(self.meta) is StackMeta.hgb:
            import skops.io

            return {"skops": np.frombuffer(skops.io.dumps(self.meta_), dtype=np.uint8),
                    "n_members": np.array(self.n_members_)}
        return {"scaler_mean": self.scaler_.mean_, "scaler_scale": self.scaler_.scale_,
                "coef": self.meta_.coef_, "intercept": self.meta_.intercept_,
                "meta_classes": self.meta_.classes_, "n_members": np.array(self.n_members_)}

    def _load_state(self, arrays):
        if StackMeta(self.meta) is StackMeta.hgb:
            import skops.io

            blob = arrays["skops"].tobytes()
            untrusted = skops.io.get_untrusted_types(data=blob)
            foreign = [t for t in untrusted if not t.startswith(("sklearn.", "numpy."))]
            if foreign:
                raise ValueError(f"the saved meta-learner holds types other than scikit-learn's: {foreign}")
            self.meta_, self.scaler_ = skops.io.loads(blob, trusted=untrusted), None
            self.n_members_ = int(arrays["n_members"])
            return
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
        """Mean absolute coefficient of each member's features, normalised to sum to 1 (uniform
        for the gradient-boosted meta-learner, which has no coefficients)."""
        if StackMeta(self.meta) is StackMeta.hgb:
            return np.full(self.n_members_, 1 / self.n_members_)
        M = self.n_members_
        coef = np.abs(self.meta_.coef_)
        c = coef[:, :coef.shape[1] - (M if self.entropy else 0)].reshape(coef.shape[0], M, -1).mean((0, 2))
        return c / c.sum() if c.sum() else c


def _renormalise(p: np.ndarray) -> np.ndarray:
    return p / np.clip(p.sum(1, keepdims=True), EPS, None)


@register(BlendMethod.geometric)
class GeometricMeanBlender(MeanBlender):
    """The renormalised geometric mean of the members' probabilities (the mean of their
    log-probabilities): a member that is confidently against a class vetoes it more strongly."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _renormalise(np.exp(np.log(np.clip(X, EPS, 1)).mean(1)))


@register(BlendMethod.power)
class PowerMeanBlender(MeanBlender):
    """The renormalised power mean ``(mean_m p_m^power)^(1/power)``; ``power`` > 1 favours the
    members' confident votes."""

    def __init__(self, power: float = 2.0):
        self.power = power

    @classmethod
    def from_settings(cls, b: BlendSettings) -> "PowerMeanBlender":
        return cls(power=float(b.power))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _renormalise(np.power(np.power(X, self.power).mean(1), 1 / self.power))


@register(BlendMethod.rank)
class RankMeanBlender(MeanBlender):
    """The mean over members of each class column's rank among the rows (scaled to 0..1),
    renormalised per row: calibration-free, the classic blend for ROC AUC. Ranks are taken over
    the rows it is given (the test set at prediction time)."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.stats import rankdata

        ranks = rankdata(X, axis=0) / len(X)  # (N, M, C), ranks over rows
        return _renormalise(ranks.mean(1) + EPS)


def _log_loss(p_true: np.ndarray) -> float:
    return float(-np.log(np.clip(p_true, EPS, 1)).mean())


def greedy_selection(X: np.ndarray, y: np.ndarray, size: int, init: int) -> np.ndarray:
    """Caruana et al. (2004)'s forward selection with replacement on OOF log loss.

    The ``init`` best single members start the ensemble (sorted initialisation); then, up to
    ``size`` picks in all, the member whose addition lowers the log loss of the running average
    the most is added (ties go to a member already chosen, then to the lower index). Returns the
    ``(M,)`` pick counts at the best point along the path (AutoGluon keeps that point too).
    """
    n, M = len(y), X.shape[1]
    p_true = X[np.arange(n), :, y]  # (N, M): each member's probability of the true class
    losses = np.array([_log_loss(p_true[:, m]) for m in range(M)])
    counts = np.zeros(M, dtype=np.int64)
    total = np.zeros(n)
    for m in np.argsort(losses, kind="stable")[:max(1, min(init, M))]:
        counts[m] += 1
        total += p_true[:, m]
    best_loss, best_counts = _log_loss(total / counts.sum()), counts.copy()
    while counts.sum() < size:
        k = counts.sum() + 1
        trial = np.array([_log_loss((total + p_true[:, m]) / k) for m in range(M)])
        m = min(range(M), key=lambda j: (round(trial[j], 12), -counts[j], j))
        counts[m] += 1
        total += p_true[:, m]
        if trial[m] < best_loss - 1e-12:
            best_loss, best_counts = trial[m], counts.copy()
    return best_counts


@register(BlendMethod.ensemble_selection)
class EnsembleSelectionBlender(_Blender):
    """Ensemble selection (Caruana et al. 2004): weights = pick counts / picks, from
    :func:`greedy_selection`; with ``bags`` > 1 each selection sees a random ``bag_fraction`` of
    the members and the counts of all bags are summed (bagged ensemble selection, Caruana et al.
    2004, section 4.3), which limits overfitting the OOF rows."""

    def __init__(self, size: int = 25, init: int = 1, bags: int = 1, bag_fraction: float = 0.5,
                 seed: int = 0):
        self.size = size
        self.init = init
        self.bags = bags
        self.bag_fraction = bag_fraction
        self.seed = seed

    @classmethod
    def from_settings(cls, b: BlendSettings) -> "EnsembleSelectionBlender":
        return cls(size=int(b.es_size), init=int(b.es_init), bags=int(b.es_bags), bag_fraction=float(b.es_bag_fraction))

    def fit(self, X: np.ndarray, y: np.ndarray) -> "EnsembleSelectionBlender":
        self._set_classes(X)
        M = X.shape[1]
        counts = np.zeros(M)
        if self.bags <= 1 or M < 3:
            counts += greedy_selection(X, y, self.size, self.init)
        else:
            rng = np.random.default_rng(self.seed)
            k = max(2, int(round(M * self.bag_fraction)))
            for _ in range(self.bags):
                bag = np.sort(rng.choice(M, k, replace=False))
                counts[bag] += greedy_selection(X[:, bag], y, self.size, self.init)
        self.counts_ = counts
        self.weights_ = counts / counts.sum()
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.tensordot(X, self.weights_, axes=([1], [0]))

    def state(self):
        return {"weights": self.weights_, "counts": self.counts_}

    def _load_state(self, arrays):
        self.weights_ = np.asarray(arrays["weights"], dtype=np.float64)
        self.counts_ = np.asarray(arrays["counts"], dtype=np.float64)

    def member_weights(self) -> np.ndarray:
        return self.weights_


assert set(BLENDERS) == set(BlendMethod), "every blend method has one registered blender"


def make_blender(method: BlendMethod, blend: BlendSettings | None = None) -> _Blender:
    """An unfitted blender for ``method``, created from the registry with its settings from the
    checked ``blend`` group (``stack_*``, ``power``, ``es_*``); defaults without one."""
    cls = BLENDERS[BlendMethod(method)]
    return cls() if blend is None else cls.from_settings(blend)


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
