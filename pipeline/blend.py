"""Stage ``blend``: combine the cached OOF/test probabilities into leaderboard files.

Methods (``blend.method``: ``all`` or one or a list of these):

* ``mean``     - the plain average of the models' probabilities;
* ``weighted`` - a convex combination of the models' probabilities, weights fitted on OOF by
  minimising log loss (softmax-parametrised, scipy L-BFGS);
* ``stack``    - a scikit-learn meta-learner (multinomial logistic regression) on the models'
  OOF log-probabilities.

Only OOF predictions are used for fitting and scoring. The CV score of ``weighted`` and ``stack``
is itself cross-validated on the same folds (fit on k-1 folds' OOF rows, score the held-out
fold), as scikit-learn's ``StackingClassifier`` documentation recommends; the final weights /
meta-learner are then refit on all OOF rows and applied to the fold-averaged test probabilities.
``submissions/submission.csv`` is the method with the best OOF accuracy (ties: lower log loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import joblib

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from scipy.optimize import minimize
from scipy.special import softmax as sp_softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from pipeline import data
from pipeline.errors import ArtifactError, ConfigError
from pipeline.folds import ensure_folds
from pipeline.io import save_json, save_npy, write_with
from pipeline.paths import METRICS, OOF, TEST, Paths
from pipeline.train import fold_config, folds_digest, model_names, verify_fold

METHODS = ("mean", "weighted", "stack")
EPS = 1e-7


@dataclass
class ModelPredictions:
    """One model's cached predictions.

    Attributes:
        oof: ``(N, C)`` float32 OOF probabilities in train-row order, every row from exactly one fold.
        test: ``(M, C)`` float32 test probabilities averaged over the folds' models.
    """

    name: str
    oof: np.ndarray
    test: np.ndarray


def load_predictions(cfg: DictConfig, comp: data.Competition, folds: np.ndarray,
                     name: str) -> ModelPredictions:
    """Read every fold's OOF and test arrays of ``name`` and check the OOF contract.

    Raises:
        ArtifactError: a fold's files are missing or stale (its config differs from the current
            one), its row ids are not exactly that fold's rows, or the shapes are wrong.
    """
    paths = Paths.from_cfg(cfg)
    n, m, c = len(comp.y_train), len(comp.x_test), comp.num_classes
    k = int(cfg.folds.k)
    oof = np.full((n, c), np.nan, dtype=np.float32)
    hits = np.zeros(n, dtype=np.int64)
    test = np.zeros((m, c), dtype=np.float64)
    for f in range(k):
        d = paths.fold_dir(name, f)
        status, reason = verify_fold(d, fold_config(cfg, name, f, comp.fingerprint, folds))
        if status != "ok":
            hint = ""
            if status == "stale" and not cfg.get("tuned") and paths.tuned(name).exists():
                hint = "; trained with tuned=true? then blend with tuned=true too"
            what = reason if status == "missing" else f"{status}: {reason}"
            raise ArtifactError(f"{name} fold {f}: {what} in {d} (run: python run.py "
                                f"stage=train model={name} fold={f}){hint}")
        try:
            with np.load(d / OOF) as z:
                rows, probs = z["row_ids"], z["probs"]
            t = np.load(d / TEST)
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{name} fold {f}: cannot read {d}: {e}") from None
        fold_rows = np.flatnonzero(folds == f)
        if not np.array_equal(np.sort(rows), fold_rows) or probs.shape != (len(rows), c):
            raise ArtifactError(f"{name} fold {f}: {d / OOF} does not hold exactly the fold's "
                                f"{len(fold_rows)} rows x {c} classes")
        oof[rows] = probs
        hits[rows] += 1
        if t.shape != (m, c):
            raise ArtifactError(f"{name} fold {f}: {d / TEST} has shape {t.shape}, expected {(m, c)}")
        test += t / k
    if not (hits == 1).all():
        raise ArtifactError(f"{name}: OOF rows predicted {hits.min()}..{hits.max()} times, "
                            f"expected exactly once")
    return ModelPredictions(name, oof, test.astype(np.float32))


def _score(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(accuracy, log loss) of ``(N, C)`` probabilities."""
    p = np.clip(probs, EPS, 1)
    p /= p.sum(1, keepdims=True)
    return float((probs.argmax(1) == y).mean()), float(log_loss(y, p, labels=np.arange(p.shape[1])))


def fit_weights(oofs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Convex blend weights minimising OOF log loss.

    Args:
        oofs: ``(n_models, N, C)`` probabilities; y: ``(N,)`` labels.
    Returns:
        ``(n_models,)`` float64 weights, non-negative, summing to 1.
    """
    logp_true = oofs[:, np.arange(len(y)), y].astype(np.float64)  # (M, N)

    def loss(theta):
        w = sp_softmax(theta)
        p = np.clip(w @ logp_true, EPS, 1)
        g_p = -(1.0 / p) / len(y)  # d loss / d p
        g_w = logp_true @ g_p
        return -np.log(p).mean(), w * (g_w - w @ g_w)

    res = minimize(loss, np.zeros(len(oofs)), jac=True, method="L-BFGS-B")
    return sp_softmax(res.x)


def _stack_features(probs: np.ndarray) -> np.ndarray:
    """``(n_models, N, C)`` probabilities -> ``(N, n_models*C)`` log-probability features."""
    return np.concatenate([np.log(np.clip(p, EPS, 1)) for p in probs], axis=1)


def make_meta_learner(cfg: DictConfig) -> LogisticRegression:
    """The stacking meta-learner: multinomial logistic regression with ``blend.stack_C``."""
    return LogisticRegression(C=float(cfg.blend.stack_C), max_iter=1000)


def blend(method: str, oofs: np.ndarray, tests: np.ndarray, y: np.ndarray, folds: np.ndarray,
          cfg: DictConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Blend with one method.

    Args:
        oofs: ``(n_models, N, C)``; tests: ``(n_models, M, C)`` probabilities; folds: ``(N,)``.
    Returns:
        ``(oof_probs (N, C), test_probs (M, C), info)`` where ``oof_probs`` are out-of-fold for
        the blender too (cross-validated on ``folds``) and ``info`` holds weights/coefficients.
    """
    if method == "mean":
        return oofs.mean(0), tests.mean(0), {"weights": [1 / len(oofs)] * len(oofs)}
    oof_out = np.zeros(oofs.shape[1:], dtype=np.float64)
    if method == "weighted":
        for f in np.unique(folds):
            tr, va = folds != f, folds == f
            oof_out[va] = np.tensordot(fit_weights(oofs[:, tr], y[tr]), oofs[:, va], 1)
        w = fit_weights(oofs, y)
        return oof_out, np.tensordot(w, tests, 1), {"weights": w.round(4).tolist()}
    if method == "stack":
        x, xt = _stack_features(oofs), _stack_features(tests)
        for f in np.unique(folds):
            tr, va = folds != f, folds == f
            oof_out[va] = make_meta_learner(cfg).fit(x[tr], y[tr]).predict_proba(x[va])
        meta = make_meta_learner(cfg).fit(x, y)
        c = oofs.shape[2]
        per_model = np.abs(meta.coef_).reshape(meta.coef_.shape[0], len(oofs), c).mean((0, 2))
        return oof_out, meta.predict_proba(xt), {"meta_learner": repr(meta), "model": meta,
                                                 "mean_abs_coef": per_model.round(4).tolist()}
    raise ConfigError(f"blend.method={method}: expected all or one of {', '.join(METHODS)}")


def write_submission(path, comp: data.Competition, labels: np.ndarray) -> None:
    """Write ``ImageId,Label`` for every test row, in ``sample_submission.csv``'s id order.

    Raises ArtifactError if the frame does not match the sample submission (rows, ids, classes).
    """
    if labels.shape != comp.test_ids.shape or labels.min() < 0 or labels.max() >= comp.num_classes:
        raise ArtifactError(f"{path}: {labels.shape[0]} labels in {labels.min()}..{labels.max()}, expected "
                            f"{len(comp.test_ids)} in 0..{comp.num_classes - 1} (sample_submission.csv)")
    df = pd.DataFrame({comp.id_column: comp.test_ids, comp.label_column: labels.astype(np.int64)})
    write_with(path, lambda p: df.to_csv(p, index=False))


def _methods(cfg: DictConfig) -> list[str]:
    m = cfg.blend.method
    methods = list(METHODS) if m == "all" else ([str(m)] if isinstance(m, str) else list(m))
    for x in methods:
        if x not in METHODS:
            raise ConfigError(f"blend.method={x}: expected all or one of {', '.join(METHODS)}")
    return methods


def run(cfg: DictConfig) -> dict:
    """Stage ``blend``: print the CV table and write ``submissions/<method>.csv`` and
    ``submissions/submission.csv`` (the best OOF accuracy).

    Returns ``{"models": {name: (acc, logloss)}, "blends": {method: (acc, logloss, info)},
    "best": method}``.
    """
    names = list(cfg.blend.models) if cfg.blend.models else model_names(cfg)
    comp = data.load(cfg)
    folds = ensure_folds(cfg, comp.y_train)
    preds = [load_predictions(cfg, comp, folds, n) for n in names]
    y = comp.y_train
    oofs, tests = np.stack([p.oof for p in preds]), np.stack([p.test for p in preds])
    paths = Paths.from_cfg(cfg)

    report = {"models": {}, "blends": {}}
    rows = []
    for p in preds:
        acc, ll = _score(y, p.oof)
        report["models"][p.name] = (acc, ll)
        rows.append((f"model {p.name}", acc, ll, _minutes(paths, p.name, int(cfg.folds.k))))
    outputs, oof_outputs = {}, {}
    for method in _methods(cfg):
        oof_b, test_b, info = blend(method, oofs, tests, y, folds, cfg)
        acc, ll = _score(y, oof_b)
        report["blends"][method] = (acc, ll, info)
        rows.append((f"blend {method}", acc, ll, ""))
        outputs[method] = test_b
        oof_outputs[method] = oof_b
        write_submission(paths.submission(method), comp, test_b.argmax(1))
    best = min(report["blends"], key=lambda m: (-report["blends"][m][0], report["blends"][m][1]))
    write_submission(paths.submission("submission"), comp, outputs[best].argmax(1))
    report["best"] = best
    save_blend(paths, names, report, oof_outputs, outputs, comp, folds)

    print(f"\n{'':28s} {'OOF acc':>9s} {'log loss':>9s} {'train min':>9s}")
    for label, acc, ll, minutes in rows:
        print(f"{label:28s} {acc:9.5f} {ll:9.4f} {minutes:>9s}")
    for method in report["blends"]:
        info = report["blends"][method][2]
        if "weights" in info and method != "mean":
            print(f"blend {method} weights: " + ", ".join(f"{n}={w:.3f}" for n, w in zip(names, info["weights"])))
    print(f"blend: submissions/submission.csv = {best} (OOF acc {report['blends'][best][0]:.5f}); "
          f"files in {paths.submissions_dir}")
    return report


def save_blend(paths: Paths, names: list[str], report: dict, oof_outputs: dict, test_outputs: dict,
               comp: data.Competition, folds: np.ndarray) -> None:
    """Persist the blend for ``stage=report`` / ``stage=predict`` under ``artifacts/blend/``:
    ``<method>_oof.npy`` ``(N, C)`` and ``<method>_test.npy`` ``(M, C)`` float32 probabilities,
    ``stack.joblib`` (the meta-learner refit on all OOF rows) and ``blend.json`` (written last:
    models, scores, weights/coefficients, the submitted method, data fingerprint, folds digest)."""
    d = paths.blend_dir
    for method in oof_outputs:
        save_npy(d / f"{method}_oof.npy", oof_outputs[method].astype(np.float32))
        save_npy(d / f"{method}_test.npy", test_outputs[method].astype(np.float32))
    methods = {}
    for method, (acc, ll, info) in report["blends"].items():
        if "model" in info:
            write_with(d / "stack.joblib", lambda p, m=info.pop("model"): joblib.dump(m, p))
        methods[method] = {"accuracy": acc, "log_loss": ll, **info}
    save_json(d / "blend.json", {
        "models": names, "best": report["best"], "methods": methods,
        "model_scores": {n: {"accuracy": a, "log_loss": ll} for n, (a, ll) in report["models"].items()},
        "data_fingerprint": comp.fingerprint, "folds_digest": folds_digest(folds),
    })


def _minutes(paths: Paths, name: str, k: int) -> str:
    total = 0.0
    for f in range(k):
        total += json.loads((paths.fold_dir(name, f) / METRICS).read_text())["seconds"]
    return f"{total / 60:.1f}"
