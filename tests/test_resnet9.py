"""ResNet-9 (Page 2018, "How to train your ResNet"): shapes at small and large sides, its width and
depth settings, its errors, its cache-key digest, that it learns real digits (the committed MNIST
fixture) and that it trains unfused (pipeline/fusion.py has no residual layer)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline import members, models, train
from pipeline.errors import ConfigError
from pipeline.fusion import fusable
from pipeline.members import MemberKey
from pipeline.models import Residual, Scale, count_parameters, create_model
from pipeline.train import inference
from pipeline.train.probes import plan_units
from pipeline.tune.space import parse_space
from pipeline.workspace import Workspace
from pipeline.runsettings import run_settings

TINY_WIDTH = 0.125  # 8/16/32/64 channels


@pytest.mark.parametrize("side", [28, 32, 64, 128])
@pytest.mark.parametrize("chans", [1, 3])
def test_logits_for_one_and_three_channels_at_small_and_large_sides(chans, side):
    model = create_model("resnet9", 7, in_chans=chans, img_size=side, width=TINY_WIDTH).eval()
    with torch.no_grad():
        out = model(torch.rand(2, chans, side, side))
    assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # from 96 px on the prep conv has stride 2: layer1 runs at 64 px for 128 px images
    assert model[0].stride == ((2, 2) if side >= 96 else (1, 1))


def test_large_sides_halve_in_the_prep_layer_until_below_96():
    """300 px: a stride-2 prep conv (150) and one 2x2 max-pool (75) before layer1; the net still
    trains (finite gradients) and maps to logits."""
    model = create_model("resnet9", 10, in_chans=3, img_size=300, width=TINY_WIDTH)
    assert model[0].stride == (2, 2) and isinstance(model[3], nn.MaxPool2d)
    out = model(torch.rand(2, 3, 300, 300))
    assert out.shape == (2, 10)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not isinstance(create_model("resnet9", 10, img_size=95, width=TINY_WIDTH)[3], nn.MaxPool2d)


def test_the_published_layout_and_its_parameter_count():
    """width 1.0, depth 1: 64/128/256/512 channels, two residual blocks, bias-free linear layer
    scaled by 0.125 - 6,571,968 parameters for 1 channel and 10 classes (the ~6.5M of Page's net)."""
    model = create_model("resnet9", 10, in_chans=1, img_size=32)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 128, 128, 128, 256, 512, 512, 512]
    assert sum(isinstance(m, Residual) for m in model) == 2
    assert isinstance(model[-1], Scale) and model[-1].factor == 0.125 and model[-2].bias is None
    assert count_parameters(model) == 6_571_968


def test_parameters_grow_with_width_and_depth():
    count = {(w, d): count_parameters(create_model("resnet9", 10, width=w, depth=d))
             for w in (0.25, 0.5) for d in (0, 1, 2)}
    for w in (0.25, 0.5):
        assert count[w, 0] < count[w, 1] < count[w, 2]
    for d in (0, 1, 2):
        assert count[0.25, d] < count[0.5, d]
    assert count[0.25, 1] == 412_656 and count[0.5, 1] == 1_645_536  # ~1/16 and ~1/4 of width 1.0
    model = create_model("resnet9", 10, width=0.5, depth=2)
    assert sum(isinstance(m, Residual) for m in model) == 4


def test_dropout_sits_before_the_linear_layer_and_the_logits_are_scaled():
    model = create_model("resnet9", 10, width=TINY_WIDTH, dropout=0.3).eval()
    assert isinstance(model[-3], nn.Dropout) and model[-3].p == 0.3
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        features = model[:-2](x)
        torch.testing.assert_close(model(x), 0.125 * model[-2](features))


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=7), "resnet9: img_size=7: expected >= 8"),
    (dict(width=0.0), "resnet9: kwargs.width=0.0: expected > 0"),
    (dict(depth=-1), "resnet9: kwargs.depth=-1: expected >= 0"),
    (dict(dropout=1.0), r"resnet9: kwargs.dropout=1.0: expected in \[0, 1\)"),
])
def test_bad_settings_raise_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_model("resnet9", 10, **kwargs)


class _Edited(nn.Module):  # not pipeline.models' code
    pass


def test_the_digest_covers_the_residual_and_scale_classes(monkeypatch):
    """The cache key's architecture digest includes the module classes resnet9 builds with, so
    editing Residual or Scale makes resnet9's cached members stale; other models' digests do not
    depend on them."""
    before = {n: models.architecture_digest(n) for n in models.list_models()}
    assert before["resnet9"] not in {v for k, v in before.items() if k != "resnet9"}
    for cls in ("Residual", "Scale"):
        with monkeypatch.context() as m:
            m.setattr(models, cls, _Edited)
            after = {n: models.architecture_digest(n) for n in models.list_models()}
        assert after["resnet9"] != before["resnet9"], cls
        assert {k: v for k, v in after.items() if k != "resnet9"} == {k: v for k, v in before.items()
                                                                      if k != "resnet9"}


def test_it_learns_real_digits_and_its_checkpoint_reloads(tiny_cfg):
    """5 epochs on fold 0's 200 real MNIST digits (width 0.125, batch 16, lr 5e-3, fp32, no
    augmentation): measured OOF accuracy 0.835 (fold 1: 0.825); asserted > 0.5, five times chance.
    The member's safetensors checkpoint (nested Residual keys) rebuilds the model and predicts
    its cached test probabilities."""
    cfg = tiny_cfg("model=resnet9", "fold=0", "aug=none", "train.precision=fp32",
                   f"models.resnet9.kwargs.width={TINY_WIDTH}", "models.resnet9.train.epochs=5",
                   "+models.resnet9.train.batch_size=16", "models.resnet9.train.lr=5e-3")
    [out] = train.run(Workspace.load(cfg))
    assert out.metrics["accuracy"] > 0.5, out.metrics["accuracy"]
    ws = Workspace.load(cfg)
    d = ws.member_dir(MemberKey("resnet9", 0))
    model, meta = members.load_model(d)
    assert meta["arch"] == "resnet9" and meta["kwargs"]["width"] == TINY_WIDTH and meta["img_size"] == 28
    logits = inference.predict_logits(model, ws.comp.x_test, torch.device("cpu"))[0]  # fp32
    np.testing.assert_allclose(inference.softmax(logits), members.read_test(d), atol=1e-5)


def test_it_trains_unfused_and_says_why(tiny_cfg, caplog):
    """pipeline/fusion.py fuses flat nn.Sequential nets of Conv2d/BatchNorm2d/Flatten/Linear and
    per-element layers; ResNet-9's Residual blocks, global max pool and logit Scale are not among
    them, so runtime.fuse=on trains each member alone and logs one line."""
    assert not fusable(create_model("resnet9", 10, width=TINY_WIDTH))
    ws = Workspace.load(tiny_cfg("model=resnet9", "runtime.fuse=on", f"models.resnet9.kwargs.width={TINY_WIDTH}"))
    keys = ws.keys("resnet9")
    with caplog.at_level(logging.INFO):
        assert plan_units(ws, keys, torch.device("cpu")) == [(k,) for k in keys]
    assert "train: resnet9: 2 member(s) train unfused (resnet9 is not a fusable nn.Sequential)" in caplog.text


def test_its_config_composes_and_has_a_search_space(tiny_cfg):
    cfg = tiny_cfg("model=resnet9")
    assert cfg.models.resnet9.arch == "resnet9" and cfg.models.resnet9.kwargs.width == 0.5
    space = parse_space(run_settings(cfg).models["resnet9"])
    assert {"train.lr", "kwargs.width", "kwargs.depth", "kwargs.dropout"} <= set(space)
