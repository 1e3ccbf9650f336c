"""Stage blend: every method, the CV table, the submission format, and missing/stale folds."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline import blend, data
from pipeline.errors import ArtifactError
from pipeline.paths import Paths


@pytest.mark.parametrize("method", ["mean", "weighted", "stack"])
def test_each_method_writes_a_valid_submission(trained_cfg, method, capsys):
    cfg = trained_cfg(f"blend.method={method}")
    report = blend.run(cfg)
    out = capsys.readouterr().out
    assert f"blend {method}" in out and "model cnn_deotte" in out and "model mlp" in out
    acc, ll, _ = report["blends"][method]
    assert 0.3 < acc <= 1 and ll > 0  # 3x chance on 400 real digits (the 2 members: ~0.3 and ~0.7)
    paths = Paths.from_cfg(cfg)
    sample = pd.read_csv(paths.root / "digits" / "sample_submission.csv")
    for name in (method, "submission"):
        sub = pd.read_csv(paths.submission(name))
        assert list(sub.columns) == ["ImageId", "Label"]
        np.testing.assert_array_equal(sub["ImageId"], sample["ImageId"])
        assert sub["Label"].between(0, 9).all() and len(sub) == 119


def test_all_methods_and_best_is_the_submission(trained_cfg):
    cfg = trained_cfg("blend.method=all")
    report = blend.run(cfg)
    assert set(report["blends"]) == {"mean", "weighted", "stack"}
    best = report["best"]
    assert report["blends"][best][0] == max(v[0] for v in report["blends"].values())
    paths = Paths.from_cfg(cfg)
    assert paths.submission("submission").read_text() == paths.submission(best).read_text()
    w = report["blends"]["weighted"][2]["weights"]
    assert len(w) == 2 and abs(sum(w) - 1) < 1e-3 and min(w) >= 0


def test_mean_blend_is_the_probability_average(trained_cfg):
    cfg = trained_cfg()
    comp = data.load(cfg)
    from pipeline.folds import ensure_folds

    folds = ensure_folds(cfg, comp.y_train)
    preds = [blend.load_predictions(cfg, comp, folds, n) for n in ("cnn_deotte", "mlp")]
    oofs = np.stack([p.oof for p in preds])
    tests = np.stack([p.test for p in preds])
    oof_b, test_b, _ = blend.blend("mean", oofs, tests, comp.y_train, folds, cfg)
    np.testing.assert_allclose(oof_b, (preds[0].oof + preds[1].oof) / 2, rtol=1e-6)
    assert test_b.shape == (119, 10)


def test_fit_weights_prefers_the_better_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = np.full((300, 3), 0.05)
    good[np.arange(300), y] = 0.9
    bad = np.full((300, 3), 1 / 3)
    w = blend.fit_weights(np.stack([good, bad]), y)
    assert w[0] > 0.95 and w.sum() == pytest.approx(1)


def test_missing_fold_is_named(trained_cfg, tmp_path):
    cfg = trained_cfg()
    d = Paths.from_cfg(cfg).fold_dir("mlp", 1)
    backup = tmp_path / "backup"
    shutil.copytree(d, backup)
    (d / "oof.npz").unlink()
    try:
        subs = Paths.from_cfg(cfg).submissions_dir
        before = {p.name: p.read_bytes() for p in subs.glob("*.csv")} if subs.exists() else {}
        with pytest.raises(ArtifactError, match=r"mlp fold 1: missing oof.npz .*stage=train model=mlp fold=1"):
            blend.run(cfg)
        after = {p.name: p.read_bytes() for p in subs.glob("*.csv")} if subs.exists() else {}
        assert after == before  # nothing (half-)written
    finally:
        shutil.rmtree(d)
        shutil.copytree(backup, d)


def test_stale_fold_is_refused(trained_cfg):
    cfg = trained_cfg("models.mlp.kwargs.hidden=64")
    with pytest.raises(ArtifactError, match=r"mlp fold 0: stale: config changed \(kwargs\)"):
        blend.run(cfg)
