"""Members that earn their keep: test-time augmentation, weight averaging (EMA, SWA), their cache
keys and an exact resume with each weight average, on the real fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DIGITS, fit
from pipeline import augment, data, train
from pipeline.settings import runtime_settings
from pipeline import members
from pipeline.train import inference
from pipeline.members import MemberKey, MemberStatus
from pipeline.workspace import Workspace
from pipeline.runsettings import run_settings


@pytest.fixture(scope="module")
def digits():
    return torch.from_numpy(data.load_competition(DIGITS).x_train[:32]).float() / 255


def test_tta_views_are_deterministic_and_exact(digits):
    views = augment.TTAViews(shifts=1, rotations=5.0, hflip=True)
    assert len(views) == 8  # identity, 4 shifts, 2 rotations, mirror
    a, b = list(views(digits)), list(views(digits))
    assert len(a) == 8 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0] is digits  # the identity view is the image itself
    # +1 px along x: every pixel moves one column to the right, a zero column enters (to float rounding)
    torch.testing.assert_close(a[1][..., 1:], digits[..., :-1], atol=1e-5, rtol=0)
    assert a[1][..., 0].abs().max() == 0
    torch.testing.assert_close(a[3][..., 1:, :], digits[..., :-1, :], atol=1e-5, rtol=0)  # +1 px along y
    assert torch.equal(a[-1], digits.flip(-1))
    ink = digits.sum((1, 2, 3))
    assert ((a[5].sum((1, 2, 3)) - ink).abs() / ink < 0.05).all()  # a 5 degree turn keeps the ink
    assert len(augment.TTAViews()) == 1


def test_tta_applies_the_same_views_to_oof_and_test_rows(tiny_cfg):
    """A member trained with TTA: its saved OOF and test probabilities are exactly what the one
    prediction function gives for those rows with its checkpoint; metrics record the view count
    and the OOF score without TTA."""
    cfg = tiny_cfg("model=mlp", "fold=0", "tta.shifts=1", "tta.rotations=6")
    train.run(Workspace.load(cfg))
    ws = Workspace.load(cfg)
    d = ws.member_dir(MemberKey("mlp", 0))
    model, _ = members.load_model(d)
    recorded, tta = members.read_config(d)["tta"], ws.settings.models["mlp"].tta
    assert (recorded["shifts"], recorded["rotations"]) == (tta.shifts, tta.rotations) == (1, 6.0)
    rt = runtime_settings(cfg)
    model = inference.place_model(model, torch.device("cpu"), rt.channels_last)
    rows, oof = members.read_oof(d)
    p = members.read_config(d)["train"]["precision"]  # resolved when it trained
    again = inference.predict_probs(model, ws.comp.x_train[rows], torch.device("cpu"), rt, p, tta)
    np.testing.assert_array_equal(again, oof)
    test = inference.predict_probs(model, ws.comp.x_test, torch.device("cpu"), rt, p, tta)
    np.testing.assert_array_equal(test, members.read_test(d))
    m = members.read_metrics(d).raw
    assert m["tta"]["views"] == 7 and 0 < m["tta"]["accuracy_without"] <= 1
    # the views really differ: one shifted row is predicted differently from the plain row
    views = inference.predict_view_probs(model, ws.comp.x_test[:8], torch.device("cpu"), rt, p, tta)
    assert views.shape == (7, 8, 10) and not np.allclose(views[0], views[1])


@pytest.mark.parametrize("override, changed", [("tta.shifts=1", "tta"), ("train.ema=0.9", "train"),
                                               ("train.swa=0.5", "train"), ("train.swa_lr_scale=0.1", "train"),
                                               ("tta.hflip=true", "tta")])
def test_new_cache_key_parts_make_members_stale(tiny_cfg, override, changed):
    train.run(Workspace.load(tiny_cfg("model=mlp", "fold=0")))
    v = Workspace.load(tiny_cfg("model=mlp", "fold=0", override)).verify(MemberKey("mlp", 0))
    assert v.status is MemberStatus.STALE and v.reason == f"config changed ({changed})"


class _Stop(Exception):
    pass


def _interrupt_and_resume(cfg, model: str, after_epoch: int, resume):
    """Fold 0 of ``model`` stopped after ``after_epoch``, then resumed from its checkpoint:
    ``(the checkpoint's state at the stop, the resumed FitResult)``."""

    def stop(epoch, record):
        if epoch == after_epoch:
            raise _Stop

    with pytest.raises(_Stop):
        fit(cfg, model, 0, predict_test=False, resume_path=resume, on_epoch=stop)
    state = torch.load(resume, weights_only=True)
    res = fit(cfg, model, 0, predict_test=False, resume_path=resume)
    assert res.metrics["resumed_after_epoch"] == after_epoch
    return state, res


def test_resume_with_ema_is_exact(tiny_cfg, tmp_path):
    """EMA on: a fit interrupted after epoch 2 of 4 and resumed from its checkpoint ends with the
    uninterrupted fit's OOF probabilities (CPU, deterministic), and the EMA's raw-weights
    comparison is recorded."""
    common = ["model=mlp", "fold=0", "train.epochs=4", "train.ema=0.9", "runtime.deterministic=true",
              "train.precision=fp32"]
    ref = fit(tiny_cfg(*common), "mlp", 0, predict_test=False)
    assert ref.metrics["ema"]["decay"] == 0.9 and 0 < ref.metrics["ema"]["accuracy_without"] <= 1
    state, res = _interrupt_and_resume(tiny_cfg(*common), "mlp", 2, tmp_path / "resume.pt")
    assert "ema" in state  # the EMA weights are in the checkpoint
    np.testing.assert_allclose(res.oof, ref.oof, atol=1e-6, rtol=0)
    # the member predicts with the averaged weights, not the raw ones
    assert res.metrics["ema"]["log_loss_without"] != pytest.approx(res.metrics["log_loss"], rel=1e-9, abs=0)


def test_resume_with_swa_is_exact(tiny_cfg, tmp_path):
    """SWA over the last 2 of 4 epochs (cnn_deotte: BatchNorm statistics averaged too): the
    one-cycle schedule ends at swa_lr_scale * lr and holds it, SWA averages every step of those
    epochs, and a fit interrupted inside the averaging phase resumes to the uninterrupted OOF."""
    common = ["model=cnn_deotte", "fold=0", "models.cnn_deotte.train.epochs=4",
              "train.lr=0.004", "train.swa=0.5", "train.swa_lr_scale=0.1", "runtime.deterministic=true",
              "train.precision=fp32"]
    ref = fit(tiny_cfg(*common), "cnn_deotte", 0, predict_test=False)
    swa = ref.metrics["swa"]
    assert swa["epochs"] == 2 and swa["steps"] > 0 and 0 < swa["accuracy_without"] <= 1
    lrs = [h["lr"] for h in ref.metrics["history"]]
    assert lrs[1:] == pytest.approx([0.0004] * 3) and lrs[0] > 0.0004  # decayed to 0.1 * lr, then held
    state, res = _interrupt_and_resume(tiny_cfg(*common), "cnn_deotte", 3, tmp_path / "resume.pt")
    assert 2 * int(state["swa"]["n_averaged"]) == swa["steps"]  # one of two epochs averaged so far
    np.testing.assert_allclose(res.oof, ref.oof, atol=1e-6, rtol=0)
    # the member predicts with the averaged weights (and their BatchNorm statistics), not the raw ones
    assert swa["log_loss_without"] != pytest.approx(ref.metrics["log_loss"], rel=1e-9, abs=0)
    running_var = res.model.state_dict()["1.running_var"]  # the first BatchNorm's; 1 at init
    assert not torch.allclose(running_var, torch.ones_like(running_var))


@pytest.mark.parametrize("overrides, message", [
    (["train.ema=0.9", "train.swa=0.5"], "models.mlp.train: ema=0.9 and swa=0.5: expected at most one weight average"),
    (["train.epochs=2", "train.swa=0.6"], "models.mlp.train.swa=0.6: averages 2 of the 2 epochs; expected at least one epoch"),
])
def test_swa_settings_are_checked(tiny_cfg, overrides, message):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        fit(tiny_cfg("model=mlp", "fold=0", *overrides), "mlp", 0, predict_test=False)


def test_seeds_are_members_cached_blended_and_predicted(tiny_cfg):
    """seeds=2: each (model, fold) trains under two seeds (seed 1 under artifacts/<model>/seed1/),
    each cached on its own; the blend averages a model's seeds, or takes each seed as a member;
    predict reproduces the submitted blend exactly either way."""
    from pipeline import blend, predict
    from pipeline.blend import store
    from pipeline.settings import BlendMethod
    from pipeline.train.scheduler import Outcome

    common = ["ensemble=[mlp]", "seeds=2", "train.epochs=3", "blend.method=[mean,weighted]"]
    cfg = tiny_cfg(*common)
    outcomes = train.run(Workspace.load(cfg))
    assert [(o.key.seed_index, o.key.fold) for o in outcomes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ws = Workspace.load(cfg)
    assert ws.member_dir(MemberKey("mlp", 1, 1)).parts[-3:] == ("mlp", "seed1", "fold1")
    s0, s1 = (members.read_oof(ws.member_dir(MemberKey("mlp", 0, s)))[1] for s in (0, 1))
    assert not np.allclose(s0, s1)  # other seeds, other members
    assert {o.outcome for o in train.run(Workspace.load(cfg))} == {Outcome.CACHED}
    out = blend.run(Workspace.load(cfg))
    both = ws.predictions("mlp")
    np.testing.assert_allclose(both.oof, (ws.predictions("mlp@0").oof.astype(np.float64)
                                          + ws.predictions("mlp@1").oof) / 2, atol=1e-7)
    assert list(out.members) == ["mlp"] and len(both.manifests) == 4
    for seeds_mode, labels in (("average", ["mlp"]), ("members", ["mlp@0", "mlp@1"])):
        c = tiny_cfg(*common, f"blend.seeds={seeds_mode}")
        out = blend.run(Workspace.load(c))
        assert list(out.members) == labels and BlendMethod.weighted in out.blends
        probs, saved = predict.ensemble_probabilities(run_settings(c), ws.comp.x_test)
        np.testing.assert_array_equal(probs, saved.probabilities(saved.best, "test"))
        assert store.load(ws.paths).members == labels
