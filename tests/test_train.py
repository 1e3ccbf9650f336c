"""Stage train: the OOF contract, the artifact layout, cache skip / force / config change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import data, train
from pipeline.errors import ConfigError
from pipeline.folds import ensure_folds
from pipeline.models import create_model
from pipeline.paths import FOLD_FILES, Paths


def test_every_train_row_predicted_exactly_once(trained_cfg):
    cfg = trained_cfg()
    comp = data.load(cfg)
    folds = ensure_folds(cfg, comp.y_train)
    paths = Paths.from_cfg(cfg)
    for name in ("cnn_deotte", "mlp"):
        hits = np.zeros(len(comp.y_train), dtype=int)
        for f in range(2):
            d = paths.fold_dir(name, f)
            assert all((d / n).exists() for n in FOLD_FILES)
            with np.load(d / "oof.npz") as z:
                rows, probs = z["row_ids"], z["probs"]
            np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(folds == f))
            assert probs.dtype == np.float32 and probs.shape == (len(rows), 10)
            np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
            test = np.load(d / "test.npy")
            assert test.shape == (119, 10) and np.isfinite(test).all()
            hits[rows] += 1
            m = json.loads((d / "metrics.json").read_text())
            assert m["epochs"] == 6 and m["device"].startswith("cpu") and m["seconds"] > 0
            assert m["accuracy"] == pytest.approx((probs.argmax(1) == comp.y_train[rows]).mean())
            assert len(m["history"]) == 6 and {"train_loss", "val_acc"} <= set(m["history"][0])
        assert (hits == 1).all()


def test_models_learn_something_real(trained_cfg):
    """Six epochs on 200 real digits: far above the 10% of chance (the data is not noise)."""
    paths = Paths.from_cfg(trained_cfg())
    for name, floor in (("mlp", 0.6), ("cnn_deotte", 0.2)):  # a narrow BN net is slower to start
        acc = np.mean([json.loads((paths.fold_dir(name, f) / "metrics.json").read_text())["accuracy"]
                       for f in range(2)])
        assert acc > floor, name


def test_checkpoint_rebuilds_the_model(trained_cfg):
    cfg = trained_cfg()
    ckpt = torch.load(Paths.from_cfg(cfg).fold_dir("cnn_deotte", 0) / "model.pt", weights_only=True)
    model = create_model(ckpt["arch"], ckpt["num_classes"], 1, ckpt["img_size"], **ckpt["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    comp = data.load(cfg)
    logits = train.predict_logits(model, comp.x_test, torch.device("cpu"))
    np.testing.assert_allclose(train.softmax(logits),
                               np.load(Paths.from_cfg(cfg).fold_dir("cnn_deotte", 0) / "test.npy"),
                               atol=1e-4)


def test_cached_folds_are_skipped_and_force_retrains(trained_cfg, capsys):
    cfg = trained_cfg("model=mlp", "fold=1")
    target = Paths.from_cfg(cfg).fold_dir("mlp", 1) / "test.npy"
    stamp = target.stat().st_mtime_ns
    assert train.run(cfg) == {}
    assert "mlp fold 1: cached, skipped" in capsys.readouterr().out
    assert target.stat().st_mtime_ns == stamp
    done = train.run(trained_cfg("model=mlp", "fold=1", "force=true"))
    assert list(done) == [("mlp", 1)] and target.stat().st_mtime_ns != stamp


def test_changed_config_retrains(tiny_cfg, capsys):
    train.run(tiny_cfg("model=mlp", "fold=0"))
    capsys.readouterr()
    done = train.run(tiny_cfg("model=mlp", "fold=0", "models.mlp.kwargs.hidden=64"))
    assert list(done) == [("mlp", 0)]
    assert "config changed (kwargs)" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("fold=2", "fold=2: expected 'all' or an integer 0..1"),
    ("model=lenet", "unknown model 'lenet'; known models: cnn_deotte"),
    ("train.epochs=0", "epochs=0: expected >= 1"),
])
def test_bad_selection(tiny_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        train.run(tiny_cfg(override))


def test_nan_loss_stops_the_fold_and_caches_nothing(tiny_cfg):
    from pipeline.errors import PipelineError

    cfg = tiny_cfg("model=mlp", "fold=0", "train.lr=1e30")
    with pytest.raises(PipelineError, match="mlp fold 0: training loss became nan"):
        train.run(cfg)
    d = Paths.from_cfg(cfg).fold_dir("mlp", 0)
    assert not d.exists() or not any(d.iterdir())  # no artifact, no resume checkpoint


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_fold_bf16_channels_last(tiny_cfg, compile_):
    """The CUDA path end to end on the fixture: bf16 autocast, channels_last, batched torch
    augmentation on the GPU, optional torch.compile; probabilities stay valid."""
    from pipeline import data
    from pipeline.folds import ensure_folds

    cfg = tiny_cfg("runtime.device=cuda", "aug.backend=torch", f"train.compile={str(compile_).lower()}")
    comp = data.load(cfg)
    res = train.fit_fold(cfg, comp, ensure_folds(cfg, comp.y_train), "cnn_deotte", 0)
    assert res.metrics["device"].startswith("cuda")
    assert np.allclose(res.oof.sum(1), 1, atol=1e-4) and np.allclose(res.test.sum(1), 1, atol=1e-4)
    assert res.metrics["accuracy"] > 0.15


def test_precision_setting():
    """train.precision: auto is bf16 on CUDA and fp32 on CPU; bf16 / fp32 force it; else an error."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [train.use_bf16(p, cpu) for p in ("auto", "fp32", "bf16")] == [False, False, True]
    assert [train.use_bf16(p, cuda) for p in ("auto", "fp32", "bf16")] == [True, False, True]
    with pytest.raises(ConfigError, match="train.precision=fp16: expected one of auto, fp32, bf16"):
        train.use_bf16("fp16", cpu)


def test_bf16_on_cpu_is_opt_in_and_trains(tiny_cfg):
    """The CPU step runs in fp32 unless train.precision=bf16, which autocasts the model (logits in
    bf16, loss in fp32) and still learns; the setting is part of the fold's cache key."""
    torch.manual_seed(0)
    model = create_model("cnn_keras", 10, width=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    assert train.train_step(model, opt, x, y)[1].dtype == torch.float32
    loss, logits = train.train_step(model, opt, x, y, precision="bf16")
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    acc = {}
    for p in ("fp32", "bf16"):  # the shared training run's settings, where mlp clears 0.6
        cfg = tiny_cfg("model=mlp", "fold=0", f"train.precision={p}", "train.epochs=6", "aug=none")
        comp = data.load(cfg)
        res = train.fit_fold(cfg, comp, ensure_folds(cfg, comp.y_train), "mlp", 0, predict_test=False)
        assert np.allclose(res.oof.sum(1), 1, atol=1e-3)
        acc[p] = res.metrics["accuracy"]
    assert acc["bf16"] > 0.6 and abs(acc["bf16"] - acc["fp32"]) < 0.08, acc
    assert train.fold_config(cfg, "mlp", 0, comp.fingerprint).train.precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision=fp8"):
        train.run(tiny_cfg("model=mlp", "fold=0", "train.precision=fp8"))
