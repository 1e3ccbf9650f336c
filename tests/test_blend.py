"""Stage blend: every method, blenders as estimators (against scikit-learn itself), the saved
blend, the submission format, and missing/stale members."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import blend
from pipeline.blend import store
from pipeline.blend.blenders import (BLENDERS, EnsembleSelectionBlender, GeometricMeanBlender,
                                     MeanBlender, PowerMeanBlender, RankMeanBlender, StackBlender,
                                     cross_val_oof, fit_weights, greedy_selection,
                                     make_blender, stack_features)
from pipeline.errors import ArtifactError, ConfigError
from pipeline.paths import Paths
from pipeline.config import validate
from pipeline.settings import BlendMethod
from pipeline.workspace import Workspace


def _oof(cfg):
    ws = Workspace.load(cfg)
    X = np.stack([ws.predictions(n).oof for n in ("cnn_deotte", "mlp")], 1)
    return ws, X, ws.comp.y_train


@pytest.mark.parametrize("method", ["mean", "weighted", "stack"])
def test_each_method_writes_a_valid_submission(trained_cfg, method):
    cfg = trained_cfg(f"blend.method={method}")
    out = blend.run(Workspace.load(cfg))
    assert set(out.members) == {"cnn_deotte", "mlp"} and list(out.blends) == [BlendMethod(method)]
    s = out.blends[BlendMethod(method)].score
    assert 0.3 < s.accuracy <= 1 and s.log_loss > 0  # 3x chance on 400 real digits
    paths = Paths.from_cfg(cfg)
    sample = pd.read_csv(paths.root / "digits" / "sample_submission.csv")
    for name in (method, "submission"):
        sub = pd.read_csv(paths.submission(name))
        assert list(sub.columns) == ["ImageId", "Label"]
        np.testing.assert_array_equal(sub["ImageId"], sample["ImageId"])
        assert sub["Label"].between(0, 9).all() and len(sub) == 119


def test_all_methods_best_is_the_submission_and_the_record_says_so(trained_cfg):
    import hashlib

    cfg = trained_cfg("blend.method=all")
    out = blend.run(Workspace.load(cfg))
    assert set(out.blends) == set(BlendMethod)
    assert out.blends[out.best].score.accuracy == max(r.score.accuracy for r in out.blends.values())
    paths = Paths.from_cfg(cfg)
    text = paths.submission("submission").read_text()
    assert text == paths.submission(out.best.value).read_text()
    saved = store.load(paths)
    assert saved.best is out.best and saved.record["k"] == 2 and saved.members == ["cnn_deotte", "mlp"]
    assert saved.record["submission_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert [(e["seed"], e["fold"]) for e in saved.record["manifests"]["mlp"]] == [(0, 0), (0, 1)]
    w = saved.record["methods"]["weighted"]["member_weights"]
    assert len(w) == 2 and abs(sum(w) - 1) < 1e-9 and min(w) >= 0


def test_a_new_blend_clears_the_files_of_the_last(trained_cfg):
    blend.run(Workspace.load(trained_cfg("blend.method=all")))
    blend.run(Workspace.load(trained_cfg("blend.method=mean")))
    folder = Paths.from_cfg(trained_cfg()).blend_dir
    assert sorted(p.name for p in folder.iterdir()) == ["blend.json", "mean_oof.npy", "mean_state.npz",
                                                       "mean_test.npy"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".blend")]  # no temp folders


def test_mean_blender_is_the_probability_average(trained_cfg):
    ws, X, y = _oof(trained_cfg())
    oof = cross_val_oof(MeanBlender(), X, y, ws.folds)
    np.testing.assert_allclose(oof, (X[:, 0] + X[:, 1]) / 2, rtol=1e-6)


def test_stack_oof_equals_sklearn_cross_val_predict(trained_cfg):
    """The stack blender's cross-validated OOF is scikit-learn's own cross_val_predict with the
    same folds (PredefinedSplit) on the same features and meta-learner."""
    ws, X, y = _oof(trained_cfg())
    ours = cross_val_oof(StackBlender(C=1.0, max_iter=1000), X, y, ws.folds)
    meta = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    theirs = cross_val_predict(meta, stack_features(X), y, cv=PredefinedSplit(ws.folds),
                               method="predict_proba")
    np.testing.assert_allclose(ours, theirs, atol=1e-10)


def test_stack_converges_on_real_digits_without_warnings(trained_cfg):
    """Standardised features: the meta-learner converges (it warned six times on raw log-probabilities)."""
    ws, X, y = _oof(trained_cfg())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        cross_val_oof(StackBlender(), X, y, ws.folds)
        b = StackBlender().fit(X, y)
    assert b.meta_.n_iter_.max() < 1000


def test_blenders_handle_a_class_absent_from_the_training_rows(trained_cfg):
    ws, X, y = _oof(trained_cfg())
    keep = y != 3  # no row of class 3 to fit on
    for blender in [make_blender(m) for m in BLENDERS] + [StackBlender(meta="hgb", max_iter=20)]:
        p = blender.fit(X[keep], y[keep]).predict_proba(X)
        assert p.shape == (len(y), 10) and np.allclose(p.sum(1), 1, atol=1e-6), type(blender).__name__
    assert (StackBlender().fit(X[keep], y[keep]).predict_proba(X)[:, 3] == 0).all()


def test_fit_weights_prefers_the_better_member(trained_cfg):
    """mlp (~0.7 OOF accuracy) against a copy of it made uninformative (uniform)."""
    ws, X, y = _oof(trained_cfg())
    good, flat = X[:, 1], np.full_like(X[:, 1], 0.1)
    w = fit_weights(np.stack([good, flat], 1), y)
    assert w[0] > 0.95 and w.sum() == pytest.approx(1)


def test_unknown_blend_model_is_a_config_error(trained_cfg):
    with pytest.raises(ConfigError, match="blend.models: unknown model 'lenet'"):
        validate(trained_cfg("blend.models=[mlp,lenet]"))


def test_missing_member_is_named_and_nothing_is_written(trained_cfg, tmp_path):
    cfg = trained_cfg()
    d = Paths.from_cfg(cfg).member_dir("mlp", 1)
    backup = tmp_path / "backup"
    shutil.copytree(d, backup)
    (d / "oof.npz").unlink()
    try:
        subs = Paths.from_cfg(cfg).submissions_dir
        before = {p.name: p.read_bytes() for p in subs.glob("*.csv")} if subs.exists() else {}
        with pytest.raises(ArtifactError, match=r"mlp fold 1: missing oof.npz .*stage=train model=mlp fold=1"):
            blend.run(Workspace.load(cfg))
        after = {p.name: p.read_bytes() for p in subs.glob("*.csv")} if subs.exists() else {}
        assert after == before  # nothing (half-)written
    finally:
        shutil.rmtree(d)
        shutil.copytree(backup, d)


def test_stale_member_is_refused(trained_cfg):
    cfg = trained_cfg("models.mlp.kwargs.hidden=64")
    with pytest.raises(ArtifactError, match=r"mlp fold 0: stale: config changed \(kwargs\)"):
        blend.run(Workspace.load(cfg))


def test_ensemble_selection_against_a_hand_computed_case():
    """Two rows, classes (0, 1); members A [.9 .1 | .4 .6], B [.6 .4 | .1 .9], C [.5 .5 | .5 .5].
    Log loss: A and B 0.5108 each, C 0.6931. Sorted init (1): A (the first of the tie). Adding
    B gives p_true (.65, .65): 0.4308; adding A keeps 0.5108; adding C (.7, .45): 0.5776 -> B.
    A third pick: A or B gives (.733, .567) or (.567, .733): 0.4390 > 0.4308, C gives 0.5108 ->
    the best point of the path is {A, B}: weights (0.5, 0.5, 0)."""
    X = np.array([[[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]],
                  [[0.6, 0.4], [0.1, 0.9], [0.5, 0.5]]])
    y = np.array([0, 1])
    np.testing.assert_array_equal(greedy_selection(X, y, size=5, init=1), [1, 1, 0])
    b = EnsembleSelectionBlender(size=5, init=1, bags=1).fit(X, y)
    np.testing.assert_allclose(b.weights_, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(b.predict_proba(X), [[0.65, 0.35], [0.35, 0.65]])


def test_ensemble_selection_and_means_on_real_members(trained_cfg):
    """On the fixture's members: bagged selection weights sum to 1 and favour the better member
    (mlp); the fixed means are valid probabilities; each is cross-validated like the others."""
    ws, X, y = _oof(trained_cfg())
    b = EnsembleSelectionBlender(size=10, bags=5).fit(X, y)
    assert b.weights_.sum() == pytest.approx(1) and b.weights_[1] > b.weights_[0]
    for blender in (GeometricMeanBlender(), PowerMeanBlender(3.0), RankMeanBlender(), b):
        oof = cross_val_oof(blender, X, y, ws.folds)
        assert oof.shape == X.shape[::2] and np.allclose(oof.sum(1), 1, atol=1e-6)
    g = GeometricMeanBlender().fit(X, y).predict_proba(X)
    expect = np.exp(np.log(np.clip(X, 1e-7, 1)).mean(1))
    np.testing.assert_allclose(g, expect / expect.sum(1, keepdims=True))


@pytest.mark.parametrize("overrides, methods", [
    (["blend.method=all"], set(BlendMethod)),
    (["blend.method=stack", "blend.stack_meta=hgb", "blend.stack_max_iter=20", "blend.stack_entropy=true"],
     {BlendMethod.stack}),
])
def test_every_blender_round_trips_through_the_store(trained_cfg, overrides, methods):
    """All methods, stack with HistGradientBoosting (saved with skops, no pickle) too: the saved
    blender predicts exactly like the fitted one."""
    cfg = trained_cfg(*overrides)
    out = blend.run(Workspace.load(cfg))
    assert set(out.blends) == methods
    ws, X, _ = _oof(cfg)
    saved = store.load(Paths.from_cfg(cfg))
    for method, result in out.blends.items():
        np.testing.assert_array_equal(saved.blender(method).predict_proba(X), result.blender.predict_proba(X))
        np.testing.assert_array_equal(saved.probabilities(method, "test"), result.test.astype(np.float32))


def _imbalanced_oof():
    """OOF probabilities of a real model on imbalanced real data: a logistic regression of the
    fixture's digit pixels, cross-validated, after keeping a fifth of the rows of classes 0-4 (so
    the majority classes pull its most probable class)."""
    from conftest import DIGITS
    from pipeline import data

    comp = data.load_competition(DIGITS)
    y = comp.y_train
    keep = np.flatnonzero((y >= 5) | (np.arange(len(y)) % 5 == 0))
    x, y = comp.x_train[keep].reshape(len(keep), -1) / 255.0, y[keep]
    folds = np.arange(len(y)) % 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probs = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=200)), x, y,
                                  cv=PredefinedSplit(folds), method="predict_proba")
    return y, probs, folds


def test_balanced_accuracy_and_macro_f1_are_scikit_learns_and_their_decision_is_fitted_out_of_fold():
    """The two metrics of predicted classes equal scikit-learn's; per-class weights fitted on
    other folds' OOF predictions raise each on held-out folds above the most probable class."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from pipeline.metrics import cross_fitted_decision, label_metric, score
    from pipeline.settings import Metric

    y, probs, folds = _imbalanced_oof()
    s, pred = score(y, probs), probs.argmax(1)
    assert s.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
    assert s.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    assert label_metric(y, pred, 10, Metric.macro_f1) == pytest.approx(s.macro_f1)
    for metric in (Metric.balanced_accuracy, Metric.macro_f1):
        weights, fitted, plain = cross_fitted_decision(y, probs, folds, metric)
        assert plain == pytest.approx(s.value(metric)) and fitted > plain, (metric, fitted, plain)
        assert weights.shape == (10,) and weights.max() == 1.0 and weights[:5].mean() > weights[5:].mean()


def test_a_balanced_accuracy_blend_submits_the_weighted_decision(trained_cfg):
    """data.metric=balanced_accuracy: the blend is picked by it, the record keeps the decision
    (or none when it does not beat the most probable class out of fold), and submission.csv's
    labels are the argmax of the submitted blend's test probabilities times those weights."""
    out = blend.run(Workspace.load(trained_cfg("data.metric=balanced_accuracy")))
    saved = out.saved
    assert saved.record["metric"] == "balanced_accuracy"
    weights = saved.decision_weights()
    test = saved.probabilities(saved.best, "test")
    expected = (test * (weights if weights is not None else 1.0)).argmax(1)
    sub = pd.read_csv(Paths.from_cfg(trained_cfg()).submission("submission"))
    assert (sub["Label"].to_numpy() == expected).all()
    assert saved.record["decision"] is None or saved.record["decision"]["oof"] > saved.record["decision"]["argmax_oof"]
