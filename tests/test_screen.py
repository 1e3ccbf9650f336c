"""The screening (pipeline/screen.py): the recipe chosen by measurement on fold 0, within its share
of the budget, never over a setting given by hand, reused by a rerun; on the committed real digits."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from conftest import DIGITS
from pipeline import data
from pipeline.choices import AugPreset, Balance, Dim
from pipeline.recipe import Candidate, Recipe, TrialState, fixed_dims, read_screening
from pipeline.runsettings import run_settings


def _ws(cfg):
    from pipeline.config import prepare
    from pipeline.workspace import Workspace

    c, s = prepare(cfg)
    return Workspace.load(c, s)


def test_the_screening_never_exceeds_its_share(tiny_cfg):
    """A share too small for every candidate (10 s for 3 architectures x 6 presets of 10 epochs,
    about 60 s here): the trials that would not fit are skipped or stopped at an epoch's end, the
    screening's wall time stays within its share (10% and a second for the last epoch's and the
    timed steps' spread), and whatever did complete still makes a choice."""
    from pipeline.screen import screen, share_seconds

    cfg = tiny_cfg("screen.enabled=true", "screen.seconds=20", "screen.share=0.5",
                   "screen.models=[mlp,cnn_deotte,resnet9]", "screen.epochs=10", "screen.min_steps=1",
                   "screen.pruner=none")
    ws = _ws(cfg)
    result = screen(ws)
    share = share_seconds(ws)
    assert share == 10.0 and result.share_seconds == 10.0
    assert result.seconds <= share * 1.1 + 1.0, result.table()
    assert sum(t.seconds for t in result.trials) <= result.seconds
    states = {t.state for t in result.trials}
    assert states & {TrialState.skipped, TrialState.stopped}, result.table()  # not every candidate fitted
    assert TrialState.complete in states  # mlp's trials take about a second


def test_a_flip_loses_the_screening_on_digits(tiny_cfg):
    """Flips do not preserve a digit's label: on the fixture's digits (fold 0: 200 training, 200
    validation rows), the mlp for 30 short epochs. Measured with seeds 0-3 (accuracy on fold 0):
    affine 0.81 / 0.845 / 0.83 / 0.84, horizontal flips 0.725 / 0.725 / 0.76 / 0.74, dihedral
    (flips and 90-degree rotations) 0.50 / 0.51 / 0.475 / 0.45: seed-to-seed spread 0.035 at most,
    the flips' loss 0.07 to 0.39. So affine wins, each flip preset loses by more than 0.05."""
    from pipeline.screen import screen

    cfg = tiny_cfg("screen.enabled=true", "screen.seconds=600", "screen.models=[mlp]", "screen.epochs=30",
                   "screen.min_steps=1", "screen.augs=[affine,hflip,dihedral]", "screen.pruner=none")
    result = screen(_ws(cfg))
    assert result.recipe.aug is AugPreset.affine, result.table()
    score = {t.candidate.aug: t.accuracy for t in result.trials if t.dim is Dim.aug}
    assert score[AugPreset.affine] - score[AugPreset.hflip] > 0.05
    assert score[AugPreset.affine] - score[AugPreset.dihedral] > 0.2
    assert "aug: preset affine" in result.reasons[-1]


def test_overrides_fix_their_dimensions():
    assert fixed_dims(["profile=quick", "data.dir=x", "budget=15m", "model=all", "models.mlp.kwargs.hidden=64",
                       "models.cnn_deotte.train.lr=0.01", "screen.models=[mlp,resnet9]"]) == []
    assert fixed_dims(["data.img_size=64"]) == [Dim.side]
    assert fixed_dims(["ensemble=[mlp]"]) == fixed_dims(["model=mlp"]) == [Dim.arch]
    assert fixed_dims(["aug.hflip=0.5"]) == fixed_dims(["aug=none"]) == fixed_dims(["+models.mlp.aug.rotate=3"]) \
        == [Dim.aug]
    assert fixed_dims(["models.mlp.train.class_weight=true"]) == fixed_dims(["train.sampler=balanced"]) == [Dim.balance]


def test_an_explicit_recipe_is_never_overridden(tiny_cfg):
    """Every dimension given on the command line (the run's entry adds them to screen.fixed): the
    screening runs no trial, chooses nothing, and the prepared config keeps the hand-set values."""
    from pipeline.config import prepare, with_fixed
    from pipeline.screen import run

    hand = ["ensemble=[mlp]", "aug.hflip=0.5", "data.img_size=28", "train.class_weight=true"]
    cfg = with_fixed(tiny_cfg("screen.enabled=true", "screen.seconds=600", *hand), hand)
    assert set(cfg.screen.fixed) == {"arch", "aug", "side", "balance"}
    ws = _ws(cfg)
    result = run(ws)
    assert result.trials == () and result.recipe == Recipe()
    prepared, settings = prepare(cfg)
    assert list(prepared.ensemble) == ["mlp"] and settings.models["mlp"].aug.hflip == 0.5
    assert settings.models["mlp"].train.class_weight is True


def test_the_arch_and_aug_choice_is_applied_to_every_stage_after_it(tiny_cfg):
    """Only the augmentation is fixed: the screening ranks the architectures, keeps the best
    ``screen.keep``, and every later prepare of the same run (train, blend, predict) gets that
    ensemble; the hand-set augmentation is untouched. The first model is the baseline: another
    replaces it only by beating it by more than the noise of the validation rows."""
    from pipeline.config import prepare, with_fixed
    from pipeline.screen import run

    cfg = with_fixed(tiny_cfg("screen.enabled=true", "screen.seconds=600", "screen.models=[mlp,cnn_keras]",
                              "screen.keep=1", "screen.epochs=4", "screen.min_steps=1", "aug=none"), ["aug=none"])
    ws = _ws(cfg)
    result = run(ws)
    arch = [t for t in result.trials if t.dim is Dim.arch]
    assert [t.candidate.model for t in arch] == ["mlp", "cnn_keras"] and all(t.candidate.aug is None for t in arch)
    (mlp, keras), p = (t.score for t in arch), max(t.accuracy for t in arch if t.accuracy is not None)
    noise = (2 * p * (1 - p) / result.val_rows) ** 0.5  # one standard error of a difference of accuracies
    winner = "cnn_keras" if keras is not None and (mlp is None or keras - mlp > noise) else "mlp"
    assert result.recipe == Recipe(models=(winner,)), result.table()
    prepared, settings = prepare(cfg)
    assert list(prepared.ensemble) == [winner] and settings.models[winner].aug.rotate == 0.0


def test_a_rerun_reuses_the_screening(tiny_cfg, caplog):
    """The record is keyed by what the screening depends on (not the budget), so a rerun with a
    larger budget, and any later stage, finds it: no trial runs again."""
    from pipeline.screen import run

    args = ("screen.enabled=true", "screen.models=[mlp]", "screen.augs=[affine,none]", "screen.epochs=2",
            "screen.min_steps=1")
    ws = _ws(tiny_cfg(*args, "budget=10m"))
    first = run(ws)
    assert len(first.trials) == 3  # arch: mlp; aug: affine (the same trial, reused), none
    assert [t.seconds for t in first.trials][1] == 0.0
    key = ws.screening_key()
    bigger = _ws(tiny_cfg(*args, "budget=1h"))
    assert first.complete and bigger.screening_key() == key
    with caplog.at_level(logging.INFO):
        again = run(bigger)
    assert again == first and "screen: reusing" in caplog.text
    assert read_screening(bigger.paths.screening(key)) == first
    assert _ws(tiny_cfg(*args, "screen.rows=150")).screening_key() != key  # another subsample: screened again
    assert _ws(tiny_cfg(*args, "screen.keep_within=1")).screening_key() != key  # another rule for the ensemble


def test_the_screening_key_follows_the_metric_the_files_and_the_device(tiny_cfg, digits_dir, monkeypatch):
    """A screening measured by another metric, on other files unpacked into the same folder, or
    on another kind of device is not this run's: each changes the key; the same settings keep it."""
    import os

    from pipeline import workspace
    from pipeline.recipe import MeasuredOn, screening_key

    args = ("screen.enabled=true", "screen.models=[mlp]")
    key = _ws(tiny_cfg(*args)).screening_key()
    assert _ws(tiny_cfg(*args)).screening_key() == key
    assert _ws(tiny_cfg(*args, "data.metric=log_loss")).screening_key() != key
    assert screening_key(run_settings(tiny_cfg(*args, "folds.group=site")), MeasuredOn("d", "cpu")) != screening_key(
        run_settings(tiny_cfg(*args)), MeasuredOn("d", "cpu"))  # other folds: fold 0 holds other rows
    st = (digits_dir / "train.csv").stat()
    os.utime(digits_dir / "train.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same name, other files
    touched = _ws(tiny_cfg(*args)).screening_key()
    assert touched != key
    monkeypatch.setattr(workspace, "device_kind", lambda name: "cuda (NVIDIA H100 80GB HBM3 x 1)")
    assert _ws(tiny_cfg(*args)).screening_key() not in (key, touched)


def test_a_screening_cut_short_is_screened_again_under_a_larger_share(tiny_cfg, caplog):
    """A screening whose share ran out (a trial skipped or stopped) is reused by a run with the
    same share, and screened again (one log line) by one with a larger share; a complete one is
    reused by any share."""
    import dataclasses

    from pipeline.choices import Dim
    from pipeline.recipe import Screening, TrialRecord, save_screening
    from pipeline.workspace import screening_for

    args = ("screen.enabled=true", "screen.models=[mlp,cnn_keras]", "screen.share=0.2")
    ws = _ws(tiny_cfg(*args, "budget=10m"))
    cut = Screening(ws.screening_key(), Recipe(models=("mlp",)),
                    (TrialRecord(Dim.arch, Candidate("mlp", 28), TrialState.complete, 0.8, 0.8, 2, 3.0),
                     TrialRecord(Dim.arch, Candidate("cnn_keras", 28), TrialState.skipped, None, None, 0, 0.0)),
                    ("arch: mlp",), 120.0, 3.0, 200, 100)
    assert not cut.complete
    save_screening(ws.paths.screening(ws.screening_key()), cut)
    assert screening_for(ws.settings) == cut  # the same 120 s share: reused
    longer = tiny_cfg(*args, "budget=1h")
    from pipeline.runsettings import run_settings

    with caplog.at_level(logging.INFO):
        assert screening_for(run_settings(longer)) is None
    assert "was cut short in a 120 s share; this run's 720 s share screens again" in caplog.text
    whole = dataclasses.replace(cut, trials=cut.trials[:1])
    save_screening(ws.paths.screening(ws.screening_key()), whole)
    assert screening_for(run_settings(longer)) == whole


def test_candidate_sides_are_the_loaded_side_its_half_and_quarter():
    from pipeline.choices import Layout
    from pipeline.screen import candidate_sides

    assert candidate_sides(128, Layout.files, []) == [128, 64, 32]
    assert candidate_sides(64, Layout.folders, []) == [64, 32]
    assert candidate_sides(28, Layout.pixels, [56]) == [28]  # a pixel CSV is not resized
    assert candidate_sides(128, Layout.files, [96, 200, 48]) == [96, 48]


def test_a_pretrained_network_is_screened_at_its_own_sides_only():
    """With the ensemble fixed to a pretrained network (``ensemble=[lite0_probe]``), the side
    study keeps the sides from 64 px to ``screen.pretrained_side``; with none left, its one side."""
    from pipeline.screen import pretrained_sides

    assert pretrained_sides([128, 64, 32], 128, 128) == [128, 64]
    assert pretrained_sides([256, 128, 64], 256, 128) == [128, 64]
    assert pretrained_sides([300, 150], 300, 128) == [128]  # the loaded side at most the cap: decoded there
    assert pretrained_sides([32], 32, 128) == [32]


def test_a_candidate_names_what_it_is():
    assert Candidate("resnet9", 64, AugPreset.dihedral, Balance.class_weight).label() == \
        "resnet9 64px aug=dihedral class-weighted"
    assert Candidate("resnet9", 64, None, Balance.sampler).label() == "resnet9 64px aug=configured balanced-sampler"


def test_the_balance_study_screens_class_weights_and_the_sampler_on_imbalanced_digits(tiny_cfg, digits_dir):
    """The fixture's digits with classes 5-9 cut to a fifth (imbalanced: the largest class has
    about 5x the rows of the smallest); side, architecture and augmentation set by hand: the
    screening studies the balance alone, none against class weights and the balanced sampler,
    and the prepared settings carry the one chosen."""
    import pandas as pd

    from pipeline.config import prepare, with_fixed
    from pipeline.screen import run

    train = pd.read_csv(digits_dir / "train.csv")
    keep = (train["label"] < 5) | (np.arange(len(train)) % 5 == 0)
    train[keep].to_csv(digits_dir / "train.csv", index=False)
    hand = ["ensemble=[mlp]", "aug=none", "data.img_size=28"]
    cfg = with_fixed(tiny_cfg("screen.enabled=true", "screen.seconds=600", "screen.min_steps=1", "screen.pruner=none",
                              *hand), hand)
    ws = _ws(cfg)
    result = run(ws)
    assert [(t.dim, t.candidate.balance) for t in result.trials] == [
        (Dim.balance, Balance.none), (Dim.balance, Balance.class_weight), (Dim.balance, Balance.sampler)]
    assert all(t.state is TrialState.complete for t in result.trials), result.table()
    assert result.recipe.balance is not None
    assert result.reasons[-1].startswith(f"balance: {result.recipe.balance.value} ("), result.reasons
    _, settings = prepare(cfg)
    train_settings = settings.models["mlp"].train
    assert train_settings.sampler is result.recipe.balance.train_sampler
    assert train_settings.class_weight is (result.recipe.balance is Balance.class_weight)


def test_class_weights_balance_the_loss_and_reach_the_training_step(tiny_cfg, monkeypatch):
    """train.class_weight: inverse class frequency of the fold's training rows (scikit-learn's
    "balanced"), passed to every training step's cross-entropy; such a member trains unfused."""
    import numpy as np

    from conftest import fit
    from pipeline.train import engine

    w = engine.class_weights(np.array([0, 0, 0, 1]), 3)
    assert np.allclose(w, [4 / 9, 4 / 3, 1.0]) and w.dtype == np.float32
    seen = []
    real = engine.member_losses

    def spy(logits, y, label_smoothing=0.0, weight=None):
        seen.append(None if weight is None else weight.cpu().numpy())
        return real(logits, y, label_smoothing, weight)

    monkeypatch.setattr(engine, "member_losses", spy)
    cfg = tiny_cfg("ensemble=[mlp]", "train.class_weight=true", "train.epochs=1")
    fit(cfg, "mlp", 0, predict_test=False)
    from pipeline.workspace import Workspace

    ws = Workspace.load(cfg)
    y = ws.comp.y_train[ws.folds != 0]
    assert seen and all(np.allclose(s, engine.class_weights(y, 10)) for s in seen)
    from pipeline.members import MemberKey
    from pipeline.train.probes import fusable_models

    assert fusable_models(ws, [MemberKey("mlp", 0), MemberKey("mlp", 1)]) == frozenset()


def test_a_rerun_with_a_larger_budget_reuses_the_screening_and_the_members(tiny_cfg, caplog, monkeypatch):
    """``stage=train budget=3m`` screens, plans one seed of the chosen mlp (its costs pinned at 20 s
    an epoch, so the plans depend on the budget alone) and trains it; the same command with
    ``budget=10m`` reuses the screening (no trial runs again), keeps the members' 2 epochs (the
    range would otherwise plan 4 and retrain), finds seed 0's members cached and trains seed 1."""
    from pipeline.budget import Cost, read_record
    from pipeline.paths import Paths
    from pipeline.stages import run_stage
    from pipeline.train import budgeted
    from pipeline.train.scheduler import Outcome

    monkeypatch.setattr(budgeted, "costs", lambda ws, timed, fused, models, k: {m: Cost(20.0, 0.0, k) for m in models})
    args = ("stage=train", "screen.enabled=true", "screen.models=[mlp]", "screen.augs=[affine,none]",
            "screen.epochs=2", "screen.min_steps=1", "runtime.fuse=off", "+models.mlp.train.epochs=2",
            "+models.mlp.ranges.epochs=[2,4]", "+models.mlp.ranges.seeds=[1,2]")
    with caplog.at_level(logging.INFO):
        first = run_stage(tiny_cfg(*args, "budget=3m"))
    assert "screen: done" in caplog.text
    assert {(o.key.seed_index, o.outcome) for o in first} == {(0, Outcome.TRAINED)} and len(first) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = run_stage(tiny_cfg(*args, "budget=10m"))
    assert "screen: reusing" in caplog.text and "screen: done" not in caplog.text
    assert "mlp              2 seed(s) x 2 epochs" in caplog.text
    assert sorted((o.key.seed_index, o.key.fold, o.outcome) for o in second) == [
        (0, 0, Outcome.CACHED), (0, 1, Outcome.CACHED), (1, 0, Outcome.TRAINED), (1, 1, Outcome.TRAINED)]
    record = read_record(Paths.from_cfg(tiny_cfg(*args, "budget=10m")).budget_plan)
    assert record.complete == {"mlp": 2}


@pytest.mark.parametrize("scores, n_val, expected, strict", [  # strict: within=0
    ({"cnn_deotte": 0.8053, "resnet9": 0.8647}, 3000, ["resnet9"], ["resnet9"]),  # Fashion-MNIST's screening
    ({"cnn_deotte": 0.9164, "resnet9": 0.9492}, 1555, ["resnet9"], ["resnet9"]),  # the animal silhouettes'
    ({"cnn_deotte": 0.9830, "resnet9": 0.9857}, 3001, ["resnet9", "cnn_deotte"], ["resnet9"]),  # the digits'
    ({"cnn_deotte": 0.6833, "resnet9": 0.6357}, 420, ["cnn_deotte", "resnet9"], ["cnn_deotte"]),  # ELPV's: 1.5 x
])
def test_a_clearly_weaker_architecture_leaves_the_ensemble(scores, n_val, expected, strict):
    """The ensemble keeps the best ``screen.keep`` architectures, best score first, but one more
    than 2 x the noise below the best leaves (its time goes to the best); the screenings
    measured on four competitions (docs/results.md)."""
    from pipeline.choices import Metric
    from pipeline.screen import kept, noise
    from pipeline.recipe import TrialRecord

    rows = [TrialRecord(Dim.arch, Candidate(m, 28), TrialState.complete, v, v, 3, 10.0) for m, v in scores.items()]
    rows.append(TrialRecord(Dim.arch, Candidate("cnn_keras", 28), TrialState.pruned, None, None, 2, 4.0))
    margin = noise(rows, n_val, Metric.accuracy)
    def names(out):
        return [r.candidate.model for r in out]

    chosen, weaker = kept(rows, margin, keep=2, within=2.0)
    assert names(chosen) == expected  # best score first
    assert names(weaker) == [m for m in scores if m not in expected]
    assert names(kept(rows, 0.0, keep=2, within=2.0)[0]) == sorted(scores, key=lambda m: -scores[m])  # no noise
    assert names(kept(rows, margin, keep=1, within=2.0)[0]) == expected[:1]
    assert names(kept(rows, margin, keep=2, within=0.0)[0]) == strict  # the best always stays


def test_the_next_architecture_is_the_one_that_blends_best():
    """With their validation predictions, the ensemble adds architectures by greedy forward
    selection on the blend (Caruana et al. 2004): a second backbone whose errors differ wins over
    a near copy of the best with a higher score of its own; without comparable predictions the
    order is by score."""
    from types import SimpleNamespace

    from pipeline.choices import Metric
    from pipeline.recipe import TrialRecord
    from pipeline.screen import blend_value, kept

    rows = [TrialRecord(Dim.arch, Candidate(m, 128), TrialState.complete, v, v, 3, 10.0)
            for m, v in (("top", 0.80), ("probe", 0.79), ("other", 0.78))]
    top, probe, other = rows
    blends = {("top", "probe"): 0.80, ("top", "other"): 0.82, ("top", "other", "probe"): 0.81}

    def blend(chosen):
        return blends.get(tuple(r.candidate.model for r in chosen))

    def names(out):
        return [r.candidate.model for r in out]

    assert names(kept(rows, 0.01, 2, 2.0, blend)[0]) == ["top", "other"]
    assert names(kept(rows, 0.01, 3, 2.0, blend)[0]) == ["top", "other", "probe"]
    assert names(kept(rows, 0.01, 2, 2.0)[0]) == ["top", "probe"]  # no blend: by score
    assert names(kept(rows, 0.01, 2, 2.0, lambda chosen: None)[0]) == ["top", "probe"]  # not comparable
    assert names(kept(rows, 0.005, 2, 2.0, blend)[0]) == ["top", "probe"]  # "other": 4 x the noise below, never

    # the blend's score: the mean of the rows' probabilities on the same labelled rows
    y = np.array([0, 1, 1, 1])
    right = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]], np.float32)  # every row right
    wrong = right[:, ::-1].copy()                                                    # every row wrong
    sc = SimpleNamespace(predictions={top.candidate: (y, right), probe.candidate: (y, wrong),
                                      other.candidate: (y[::-1].copy(), right)},
                         ws=SimpleNamespace(settings=SimpleNamespace(data=SimpleNamespace(metric=Metric.accuracy))))
    alone, mixed = blend_value(sc, [top]), blend_value(sc, [top, probe])
    assert alone > 0.99 and mixed < alone  # the mean of a right and a wrong member is 0.5 each: ties
    assert blend_value(sc, [top, other]) is None  # other labels: other rows, not comparable


class _Study:
    """A stand-in for :class:`pipeline.screen.Screen` whose studies return given rows: the choice
    logic alone, on constructed scores."""

    def __init__(self, rows, keep=2, pretrained=("lite0", "lite0_probe"), budget=None, n_train=2099):
        import time
        from types import SimpleNamespace

        from pipeline.choices import FitMethod, Metric
        from pipeline.settings import TTASettings

        self.rows = rows
        self.s = SimpleNamespace(keep=keep, keep_within=2.0, pretrained=list(pretrained))
        fit = {m: SimpleNamespace(train=SimpleNamespace(fit=FitMethod.linear_probe if m.endswith("_probe")
                                                       else FitMethod.gradient), tta=TTASettings(hflip=True))
               for m in ("cnn_deotte", "resnet9", "lite0", "lite0_probe")}
        self.ws = SimpleNamespace(settings=SimpleNamespace(data=SimpleNamespace(metric=Metric.accuracy), budget=budget,
                                                           started=time.time(), models=fit,
                                                           folds=SimpleNamespace(k=5)),
                                  comp=SimpleNamespace(x_train=range(n_train), x_test=range(n_train // 5)))
        self.val_rows = list(range(420))
        self.train_rows = list(range(1679))

    def study(self, dim, candidates):
        return [r for r in self.rows if r.candidate in candidates]


def _row(model, side, state, score, dim=Dim.arch):
    from pipeline.recipe import TrialRecord

    return TrialRecord(dim, Candidate(model, side, AugPreset.affine if side == 32 else None), TrialState(state),
                       score, score, 3, 1.0)


def test_a_pretrained_winner_brings_its_side_and_the_ensemble_keeps_its_family():
    """Pretrained candidates at 128 px beat the networks from scratch at 32 px: the ensemble's side
    becomes 128 px and it keeps the rows screened there, best first; the 32 px networks are left
    out with the reason."""
    from pipeline.screen import _arch

    rows = [_row("cnn_deotte", 32, "complete", 0.70), _row("resnet9", 32, "complete", 0.68),
            _row("lite0_probe", 128, "complete", 0.76), _row("lite0", 128, "complete", 0.81)]
    reasons = []
    pretrained = [r.candidate for r in rows[2:]]
    models, side, order = _arch(_Study(rows), ["cnn_deotte", "resnet9"], 32, AugPreset.affine, pretrained, reasons)
    assert side == 128 and order == ["lite0", "lite0_probe"] and models[:2] == order
    assert "screened at another side" in reasons[0] and "cnn_deotte" in reasons[0]


def test_a_winner_the_budget_cannot_train_at_full_scale_never_decides():
    """60,000 photos: the linear probe wins the subsample (150 s for 2,099 images) but would need
    about 71 min of features and 7 min of the 5 folds' regressions (as the budget prices them) on
    the whole set, more than a 15-minute budget leaves; the networks from scratch it beat (3 epochs
    of 1,679 rows in 10 s) fit, so they decide, and the reason says why. A probe whose features
    alone would fit (20 s on the subsample: 9.5 min) still does not (16.5 min) with its regressions. Without a
    budget, or on a set the probe affords, the probe wins."""
    from pipeline.screen import _arch

    rows = [_row("cnn_deotte", 32, "complete", 0.93), _row("resnet9", 32, "complete", 0.94),
            _row("lite0_probe", 128, "complete", 1.00)]
    rows = [dataclasses.replace(r, seconds=150.0 if r.candidate.model == "lite0_probe" else 10.0) for r in rows]
    reasons = []
    _, side, order = _arch(_Study(rows, budget=900.0, n_train=50000), ["cnn_deotte", "resnet9"], 32,
                           AugPreset.affine, [Candidate("lite0_probe", 128, None)], reasons)
    assert (side, order) == (32, ["resnet9", "cnn_deotte"])
    assert "left out lite0_probe: about 78.5 min of training on the whole competition" in reasons[0]
    cheap = [dataclasses.replace(r, seconds=20.0) if r.candidate.model == "lite0_probe" else r for r in rows]
    reasons = []
    _, side, order = _arch(_Study(cheap, budget=900.0, n_train=50000), ["cnn_deotte", "resnet9"], 32,
                           AugPreset.affine, [Candidate("lite0_probe", 128, None)], reasons)
    assert (side, order) == (32, ["resnet9", "cnn_deotte"]) and "about 16.5 min" in reasons[0]
    for study in (_Study(rows, n_train=50000), _Study(rows, budget=900.0)):
        _, side, order = _arch(study, ["cnn_deotte", "resnet9"], 32, AugPreset.affine,
                               [Candidate("lite0_probe", 128, None)], [])
        assert (side, order) == (128, ["lite0_probe"])


def test_an_unmeasured_candidate_never_decides_and_is_reported():
    """The fine-tuned candidate did not fit in the share: it is never chosen, whatever its
    configured promise, and the reason line names it as not measured; the measured best decides."""
    from pipeline.screen import _arch, best

    rows = [_row("cnn_deotte", 32, "complete", 0.70), _row("lite0_probe", 128, "complete", 0.69),
            _row("lite0", 128, "skipped", None)]
    reasons = []
    models, side, order = _arch(_Study(rows), ["cnn_deotte"], 32, AugPreset.affine,
                                [r.candidate for r in rows[1:]], reasons)
    assert side == 32 and order == ["cnn_deotte"]
    assert "not measured" in reasons[0] and "lite0 128px aug=configured skipped" in reasons[0]
    sides = [_row("resnet9", 32, "complete", 0.60, Dim.side), _row("resnet9", 64, "stopped", None, Dim.side),
             _row("resnet9", 128, "skipped", None, Dim.side)]
    assert best(sides).candidate.side == 32


def test_pretrained_candidates_skip_sides_below_64_px(tiny_cfg, caplog):
    """The digits are 28 px (a pixel CSV is never resized): an ImageNet network is not screened
    there, and says so."""
    from pipeline.screen import pretrained_candidates

    ws = _ws(tiny_cfg("screen.enabled=true", "screen.pretrained=[lite0_probe]"))
    with caplog.at_level(logging.INFO, logger="pipeline.screen"):
        assert pretrained_candidates(ws, 28, frozenset()) == []
    assert "not screened: 28 px, below 64 px" in caplog.text
    assert [c.side for c in pretrained_candidates(ws, 300, frozenset())] == [min(300, ws.settings.screen.pretrained_side)]
    assert pretrained_candidates(ws, 300, frozenset({Dim.arch})) == []


def test_a_hub_only_candidate_is_left_out_when_offline(tiny_cfg, caplog, monkeypatch):
    """With the hub offline and nothing in its cache, the competition profile's hub backbone is
    not screened (one log line naming the three ways to give its weights); the packaged one is."""
    from pipeline.screen import pretrained_candidates

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ws = _ws(tiny_cfg("screen.enabled=true", "screen.pretrained=[lite0_probe,convnext_nano]"))
    with caplog.at_level(logging.INFO, logger="pipeline.screen"):
        assert [c.model for c in pretrained_candidates(ws, 300, frozenset())] == ["lite0_probe"]
    assert "convnext_nano not screened" in caplog.text and "pretrained_file" in caplog.text


def test_paired_noise_sees_a_gain_the_independent_formula_calls_chance():
    """Two candidates on the same 100 validation rows (the fixture's real labels): the baseline
    right on 90, the candidate right on the same 90 and 3 more. Treated as independent binomials
    the 0.03 gain is within one standard error (0.036) and the baseline stays; paired (McNemar's
    variance: only 3 discordant rows) it is 1.8 x its standard error and the candidate wins. For log
    loss and ROC AUC the paired estimate is a positive noise, not 0."""
    from pipeline.choices import Metric
    from pipeline.recipe import TrialRecord
    from pipeline.screen import best, noise, paired_se

    y = data.load_competition(DIGITS).y_train[:100]
    base = np.full((100, 10), 0.05, np.float32)
    base[np.arange(100), y] = 0.55
    wrong = np.flatnonzero(np.arange(100) % 10 == 0)  # 10 rows the baseline gets wrong
    base[wrong, y[wrong]] = 0.05
    base[wrong, (y[wrong] + 1) % 10] = 0.55
    cand = base.copy()
    fixed = wrong[:3]
    cand[fixed, (y[fixed] + 1) % 10] = 0.05
    cand[fixed, y[fixed]] = 0.55
    a, b = Candidate("mlp", 28), Candidate("cnn_keras", 28)
    rows = [TrialRecord(Dim.arch, a, TrialState.complete, 0.90, 0.90, 3, 1.0),
            TrialRecord(Dim.arch, b, TrialState.complete, 0.93, 0.93, 3, 1.0)]
    independent = noise(rows, 100, Metric.accuracy)
    paired = noise(rows, 100, Metric.accuracy, {a: (y, base), b: (y, cand)})
    assert independent == pytest.approx((2 * 0.93 * 0.07 / 100) ** 0.5) and best(rows, independent).candidate == a
    assert paired == pytest.approx(np.std(np.r_[np.ones(3), np.zeros(97)]) / 10) and best(rows, paired).candidate == b
    assert paired_se(y, cand, base, Metric.log_loss) > 0 and noise(rows, 100, Metric.log_loss) == 0.0
    yb = (y % 2).astype(np.int64)
    pa, pb = np.stack([1 - base[:, 0], base[:, 0]], 1), np.stack([1 - cand[:, 1], cand[:, 1]], 1)
    assert paired_se(yb, pa, pb, Metric.roc_auc) > 0


def test_a_rung_prunes_beyond_the_noise_only_and_a_reused_baseline_reports_its_epochs(tiny_cfg):
    """Successive halving with its rung at epoch 2 of 3: a candidate 0.001 behind the baseline
    there goes on (within the rung's noise), one 0.05 behind is pruned, and bare successive
    halving would have pruned both. A baseline reused from an earlier study reports its recorded
    epochs into the new study, so its rung has the baseline to compare with."""
    import optuna

    from pipeline.choices import Pruner
    from pipeline.recipe import TrialRecord
    from pipeline.screen import Screen, make_pruner, rung_noise

    def rung(pruner, values):
        study = optuna.create_study(direction="maximize", pruner=pruner)
        out = []
        for v in values:
            t = study.ask()
            t.report(v, 2)
            out.append(t.should_prune())
            study.tell(t, v)
        return out

    tolerance = rung_noise(900)
    assert tolerance == pytest.approx(0.01414, abs=1e-5)
    assert rung(make_pruner(Pruner.successive_halving, 3, tolerance), [0.900, 0.899, 0.850]) == [False, False, True]
    assert rung(make_pruner(Pruner.successive_halving, 3), [0.900, 0.899, 0.850])[1:] == [True, True]

    ws = _ws(tiny_cfg())
    sc = Screen(ws, deadline=1e12)
    base = Candidate("mlp", 28)
    sc.trials.append(TrialRecord(Dim.arch, base, TrialState.complete, 0.8, 0.8, 3, 5.0))
    sc.curves[base] = {1: 0.5, 2: 0.7, 3: 0.8}
    seen = []

    class Recorder:
        def report(self, value, step):
            seen.append((step, value))

    row = sc.run_trial(Dim.aug, base, Recorder())
    assert row.dim is Dim.aug and row.seconds == 0.0 and seen == [(1, 0.5), (2, 0.7), (3, 0.8)]


def test_an_unknown_balance_stops_the_command_at_the_entry(tmp_path, digits_dir, capsys):
    """``screen.balances`` is checked before any work, not when an imbalanced set reaches the study."""
    from conftest import TINY, command_error

    code, lines = command_error(capsys, "stage=train", f"paths.root={tmp_path}", f"data.dir={digits_dir}", *TINY,
                                "ensemble=[mlp]", "screen.balances=[smote]")
    assert code == 2 and len(lines) == 1, lines
    assert "screen.balances=['smote']: expected values among class_weight, sampler" in lines[0]
    assert not (tmp_path / "artifacts").exists()
