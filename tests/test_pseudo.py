"""Pseudo-labelling (pipeline/pseudo.py): a second round on the confident test rows, with honest
OOF: fold f's pseudo rows are test rows only, labelled only by fold f's source members, and the
source is part of the round's cache key."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TRAINED, compose_cfg, trained

from pipeline import pseudo
from pipeline.errors import ArtifactError, ConfigError
from pipeline.paths import MANIFEST
from pipeline.members import MemberKey, MemberStatus, read_test
from pipeline.workspace import Workspace
from pipeline.runsettings import run_settings

PL = ["pseudo.models=[cnn_deotte]", "pseudo.threshold=0.6"]  # tiny members: few rows reach 0.995


@pytest.fixture
def copied(tmp_path, trained_root):
    """A private copy of the shared training run (2 models x 2 folds, real digits), so a test
    may retrain or modify members."""
    root, data_dir = trained_root
    for part in ("artifacts", "folds", "data"):
        if (root / part).exists():
            shutil.copytree(root / part, tmp_path / part)
    shutil.copytree(data_dir, tmp_path / "digits")

    def make(*overrides: str):
        return compose_cfg(tmp_path, TRAINED + list(overrides), data_dir=tmp_path / "digits")

    return make


def _workspace(cfg):
    from pipeline.workspace import Workspace

    return Workspace.load(cfg)


def test_a_round_is_a_model_after_its_base_with_its_own_overrides(copied):
    cfg = copied(*PL, "+models.cnn_deotte_pl.train.epochs=1")
    ws = _workspace(cfg)
    assert list(cfg.ensemble) == ["cnn_deotte", "cnn_deotte_pl", "mlp"]
    assert cfg.models.cnn_deotte_pl.arch == cfg.models.cnn_deotte.arch
    assert cfg.models.cnn_deotte_pl.kwargs == cfg.models.cnn_deotte.kwargs
    assert cfg.models.cnn_deotte_pl.train.epochs == 1 and cfg.models.cnn_deotte.train.epochs == 6

    from pipeline.config import expand_pseudo_rounds
    from pipeline.io import sha256_file
    from pipeline.settings import pseudo_sources

    expand_pseudo_rounds(cfg)  # idempotent
    assert list(cfg.ensemble) == ["cnn_deotte", "cnn_deotte_pl", "mlp"]
    assert pseudo_sources(cfg) == ["cnn_deotte", "mlp"]  # the first round, not the round itself
    with pytest.raises(ArtifactError, match="pseudo rows .* are not written yet"):
        ws.member_config(MemberKey("cnn_deotte_pl", 0))
    path = pseudo.write_rows(ws, "cnn_deotte_pl", 0)  # the stage output the round trains on
    assert path == ws.paths.pseudo_rows("cnn_deotte_pl", 0) and path.name == "fold0.npz"
    key = ws.member_config(MemberKey("cnn_deotte_pl", 0))
    assert key["pseudo"]["source"] == ["cnn_deotte", "mlp"] and key["pseudo"]["rows_sha256"] == sha256_file(path)
    np.testing.assert_array_equal(pseudo.read_rows(path, 0).rows, pseudo.pseudo_rows(ws, 0).rows)
    assert "pseudo" not in ws.member_config(MemberKey("cnn_deotte", 0))


def test_pseudo_rows_are_test_rows_labelled_by_their_folds_members_only(copied):
    """Fold f's rows: no validated train row; labels = the top class of the mean of fold f's own
    source members' test probabilities (members trained without fold f), read here from disk."""
    from pipeline.train.batches import training_set

    ws = _workspace(copied(*PL))
    comp, n = ws.comp, len(ws.comp.x_train)
    counts = []
    for f in (0, 1):
        rows = pseudo.pseudo_rows(ws, f)
        mean = np.mean([read_test(ws.member_dir(MemberKey(m, f))) for m in ("cnn_deotte", "mlp")], 0)
        expect = np.flatnonzero(mean.max(1) >= 0.6)
        np.testing.assert_array_equal(rows.rows, expect)
        np.testing.assert_array_equal(rows.targets, mean[expect].argmax(1))
        counts.append(len(expect))
        tr, va = np.flatnonzero(ws.folds != f), np.flatnonzero(ws.folds == f)
        data = training_set(comp, tr, rows)
        assert len(data.rows) == len(tr) + len(expect)
        assert not np.isin(data.rows, va).any()  # no validated row, by index...
        np.testing.assert_array_equal(data.rows[len(tr):], n + expect)  # ...the rest are test rows
        np.testing.assert_array_equal(data.images[data.rows[len(tr):]], comp.x_test[expect])
        np.testing.assert_array_equal(data.images[data.rows[:len(tr)]], comp.x_train[tr])
        np.testing.assert_array_equal(data.labels[data.rows[:len(tr)]], comp.y_train[tr])
        np.testing.assert_array_equal(data.labels[n + expect], mean[expect].argmax(1))
    assert min(counts) > 0  # the test exercises real rows


def test_soft_labels_are_the_combined_probabilities(copied):
    from pipeline.train.batches import training_set

    ws = _workspace(copied(*PL, "pseudo.labels=soft"))
    rows = pseudo.pseudo_rows(ws, 1)
    assert rows.targets.shape == (len(rows.rows), 10) and rows.targets.dtype == np.float32
    np.testing.assert_allclose(rows.targets.sum(1), 1, atol=1e-5)
    data = training_set(ws.comp, np.flatnonzero(ws.folds != 1), rows)
    tr = data.rows[:-len(rows.rows)]
    np.testing.assert_array_equal(data.labels[tr].argmax(1), ws.comp.y_train[tr])  # one-hot train rows
    assert data.labels[tr].max(1).min() == 1.0


def _retouch(member_dir):
    """Change a member's test predictions as a retraining would (every test row now confidently
    class 3; a consistent manifest)."""
    from pipeline.io import sha256_file
    from pipeline.paths import TEST

    test = np.load(member_dir / TEST)
    np.save(member_dir / TEST, np.eye(test.shape[1], dtype=np.float32)[np.full(len(test), 3)])
    manifest = json.loads((member_dir / MANIFEST).read_text())
    manifest["files"][TEST] = {"sha256": sha256_file(member_dir / TEST), "bytes": (member_dir / TEST).stat().st_size}
    (member_dir / MANIFEST).write_text(json.dumps(manifest))


def test_every_source_part_is_in_the_rounds_cache_key(copied):
    """Each pseudo setting, and rows re-derived from a retrained source member of the round's
    own fold (the rows file's sha256), make the round's member stale; with pseudo.blend=mean
    another fold's source does not."""
    from pipeline import train

    outcomes = train.run(Workspace.load(copied(*PL, "+models.cnn_deotte_pl.train.epochs=1")))
    assert set(trained(outcomes)) == {("cnn_deotte_pl", 0), ("cnn_deotte_pl", 1)}
    for o in outcomes:
        if o.metrics:
            assert o.metrics["n_pseudo"] > 0 and o.metrics["n_train"] == 200
    base = [*PL, "+models.cnn_deotte_pl.train.epochs=1"]
    key = MemberKey("cnn_deotte_pl", 0)
    assert _workspace(copied(*base)).verify(key).ok
    for change, part in [("pseudo.threshold=0.7", "pseudo"), ("pseudo.labels=soft", "pseudo"),
                         ("pseudo.max_rows=3", "pseudo"),
                         ("pseudo.blend=weighted", "pseudo"), ("pseudo.source=[cnn_deotte]", "pseudo"),
                         ("+models.cnn_deotte_pl.train.epochs=2", "train")]:
        v = _workspace(copied(*base, change) if "epochs" not in change
                       else copied(*PL, change)).verify(key)
        assert v.status is MemberStatus.STALE and part in v.reason, change
    ws = _workspace(copied(*base))
    _retouch(ws.member_dir(MemberKey("mlp", 1)))  # another fold's source member retrained
    ws = _workspace(copied(*base))
    pseudo.prepare_rounds(ws, ws.keys("cnn_deotte_pl"))  # what stage=train does before a round
    v = ws.verify(MemberKey("cnn_deotte_pl", 1))
    assert ws.verify(key).ok and v.status is MemberStatus.STALE and v.reason == "config changed (pseudo)"


def test_a_round_trains_blends_and_predicts_exactly(copied, tmp_path):
    """stage=train trains the round after the first round; the blend and stage=predict take it
    like any member (predict reproduces the blend's test probabilities); the report shows the
    rows added and the gain over its base."""
    from pipeline import blend, report
    from pipeline.predict import ensemble_probabilities
    from pipeline.workspace import Workspace

    cfg = copied(*PL, "pseudo.labels=soft", "aug.backend=albumentations", "+models.cnn_deotte_pl.train.epochs=2")
    trained(__import__("pipeline.train", fromlist=["run"]).run(Workspace.load(cfg)))
    out = blend.run(Workspace.load(cfg))
    assert "cnn_deotte_pl" in out.members
    ws = Workspace.load(cfg)
    probs, saved = ensemble_probabilities(run_settings(cfg), ws.comp.x_test)
    np.testing.assert_array_equal(probs, saved.probabilities(saved.best, "test"))
    page = report.run(Workspace.load(cfg)).read_text()
    assert "Pseudo-labels" in page and "cnn_deotte_pl" in page
    n = int(np.mean([pseudo.pseudo_rows(ws, f).rows.size for f in (0, 1)]))
    assert f"{n:,}" in page


def test_a_round_without_its_source_says_what_to_train(tmp_path, tiny_cfg):
    from pipeline import train

    cfg = tiny_cfg("pseudo.models=[mlp]", "pseudo.source=[mlp]", "model=mlp_pl", "fold=0")
    with pytest.raises(ArtifactError, match=r"pseudo-labels of fold 0 need mlp fold 0: missing.*"
                                            r"stage=train model=mlp fold=0"):
        train.run(Workspace.load(cfg))


@pytest.mark.parametrize("override, message", [
    ("pseudo.models=[lenet]", "pseudo.models: unknown model 'lenet'"),
    ("pseudo.source=[cnn_deotte_pl]", "pseudo.source: cnn_deotte_pl is a pseudo-label round"),
    ("pseudo.threshold=0", "pseudo.threshold=0.0: expected > 0"),
    ("pseudo.labels=fuzzy", "pseudo.labels"),
])
def test_bad_pseudo_settings_are_one_line_errors(tiny_cfg, override, message):
    from pipeline.config import validate
    from pipeline.settings import pseudo_sources

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        cfg = tiny_cfg("pseudo.models=[cnn_deotte]", override)  # the rounds are added as it is made
        validate(cfg)
        pseudo_sources(cfg)


def test_tuned_values_of_the_base_apply_to_its_round(copied, tmp_path):
    from pipeline.config import apply_tuned_values

    cfg = copied(*PL, "tuned=true")
    (tmp_path / "artifacts" / "tuned").mkdir(parents=True, exist_ok=True)
    (tmp_path / "artifacts" / "tuned" / "cnn_deotte.yaml").write_text("train:\n  lr: 0.0123\n")
    _workspace(cfg)  # expands the rounds
    apply_tuned_values(cfg)
    assert cfg.models.cnn_deotte_pl.train.lr == cfg.models.cnn_deotte.train.lr == 0.0123


def test_max_rows_draws_a_seeded_subset_of_the_confident_rows(copied):
    ws = _workspace(copied(*PL))
    every = pseudo.pseudo_rows(ws, 1)
    picks = [pseudo.pseudo_rows(_workspace(copied(*PL, "pseudo.max_rows=5")), 1) for _ in range(2)]
    assert len(every.rows) > 5 and len(picks[0].rows) == 5
    assert np.isin(picks[0].rows, every.rows).all()
    np.testing.assert_array_equal(picks[0].rows, picks[1].rows)  # the same draw every time
    at = np.searchsorted(every.rows, picks[0].rows)
    np.testing.assert_array_equal(picks[0].targets, every.targets[at])
    assert len(every.rows) >= 10 and not np.array_equal(picks[0].rows, every.rows[:5])  # drawn, not the first


def test_the_estimate_counts_the_round_before_its_rows_exist(copied, caplog):
    """With the first round still to train, the announced members and minutes include the
    round (scaled as if every test row were added); the round then announces its own."""
    import logging

    from pipeline import train

    cfg = copied(*PL, "force=true", "runtime.estimate=true", "model=all")
    with caplog.at_level(logging.INFO):
        train.run(Workspace.load(cfg))
    lines = [r.message for r in caplog.records if "member(s) to train" in r.message]
    assert lines[0].startswith("train: 6 member(s) to train (2 of them in a pseudo-label round")
    assert lines[1].startswith("train: 2 member(s) to train, about")
