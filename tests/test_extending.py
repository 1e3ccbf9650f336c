"""docs/extending.md followed once: a model added by its steps trains per fold, blends and submits."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch.nn as nn
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, TINY, trained
from pipeline.workspace import Workspace


def tiny_two_layer(num_classes: int, in_chans: int = 1, img_size: int = 28, hidden: int = 32) -> nn.Module:
    """Step 1's factory: a two-layer network, ``(B, in_chans, S, S)`` float32 -> ``(B, C)`` logits
    (the smallest model that learns the digits; no published source, it is an example)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


@pytest.fixture
def registered():
    """Step 1: ``@register_model`` (here on the test's factory, removed again afterwards)."""
    from pipeline import models

    models.register_model(tiny_two_layer)
    yield "tiny_two_layer"
    models._REGISTRY.pop("tiny_two_layer")


def test_a_model_added_by_these_steps_trains_and_blends(tmp_path, digits_dir, registered):
    from pipeline import blend, train
    from pipeline.config import prepare

    conf = tmp_path / "conf"  # step 2 on a copy of pipeline/conf: the model's yaml, then its name in the defaults
    shutil.copytree(CONF_DIR, conf)
    (conf / "models" / "tiny.yaml").write_text(
        "# @package models.tiny\n"
        f"arch: {registered}\n"
        "kwargs: {hidden: 32}\n"
        "train: {lr: 1.0e-2}\n"
        "aug: {}\n"
        "space:\n  kwargs:\n    hidden: {type: categorical, choices: [16, 32, 64]}\n")
    config = conf / "config.yaml"
    text = config.read_text()
    assert "models: [mlp," in text
    config.write_text(text.replace("models: [mlp,", "models: [tiny, mlp,", 1))

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):  # step 3: ensemble=[tiny,...]
        raw = compose(config_name="config", overrides=[f"paths.root={tmp_path}", f"data.dir={digits_dir}",
                                                       *TINY, "ensemble=[tiny,mlp]", "train.epochs=6"])
    cfg, _ = prepare(raw)
    assert cfg.models.tiny.arch == registered
    members = trained(train.run(Workspace.load(cfg)))
    assert set(members) == {("tiny", 0), ("tiny", 1), ("mlp", 0), ("mlp", 1)}
    assert min(members["tiny", f]["accuracy"] for f in (0, 1)) > 0.3  # 3x chance on 200 real digits a fold
    out = blend.run(Workspace.load(cfg))
    assert set(out.members) == {"tiny", "mlp"}
    sub = pd.read_csv(tmp_path / "submissions" / "submission.csv")
    assert list(sub.columns) == ["ImageId", "Label"] and len(sub) == 119
