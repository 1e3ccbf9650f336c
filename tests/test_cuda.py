"""The CUDA path on a real GPU (``pytest -m gpu``; skipped without CUDA). This file imports only
what ``benchmarks/gpu_check.py`` needs on a GPU machine (torch, numpy, hydra, the pipeline), so
it runs where albumentations, Optuna and matplotlib are not installed.

stage=predict on CUDA matches the blend's test probabilities within :data:`PREDICT_ATOL_CUDA`
(cuDNN picks its algorithms per process when benchmarking), and exactly on the CPU
(tests/test_report.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fit
from pipeline import blend, predict, train
from pipeline.settings import AugSettings
from pipeline import device, members
from pipeline.workspace import Workspace
from pipeline.runsettings import run_settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PREDICT_ATOL_CUDA = 2e-3  # probabilities; README's GPU section gives the same figure


def test_device_batches_on_cuda(tiny_cfg):
    comp = Workspace.load(tiny_cfg()).comp
    cfg = AugSettings(rotate=10.0, scale=0.1, shift=0.1, elastic_alpha=34.0, p_elastic=1.0)
    from pipeline import augment

    batches = augment.DeviceBatches(comp.x_train, comp.y_train, 64, torch.device("cuda"), cfg, seed=0)
    xb, yb = next(iter(batches))
    assert xb.is_cuda and yb.is_cuda and xb.shape == (64, 1, 28, 28)
    assert batches.x.dtype == torch.uint8  # resident as uint8, normalised per batch


@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_member_in_its_resolved_precision(tiny_cfg, compile_):
    """A member end to end on the fixture: autocast in the device's resolved precision,
    channels_last, batched augmentation on the GPU, optional torch.compile."""
    cfg = tiny_cfg("runtime.device=cuda", "aug.backend=torch", f"runtime.compile={str(compile_).lower()}")
    res = fit(cfg, "cnn_deotte", 0)
    expected = device.resolve_precision("auto", torch.device("cuda")).value
    assert res.metrics["device"].startswith("cuda") and res.metrics["precision"] == expected
    assert res.metrics["peak_gpu_memory_mb"] > 0
    assert np.allclose(res.oof.sum(1), 1, atol=1e-4) and np.allclose(res.test.sum(1), 1, atol=1e-4)
    assert res.metrics["accuracy"] > 0.15


@pytest.mark.parametrize("average", ["train.swa=0.5", "train.ema=0.9"])
def test_weight_averages_of_a_batchnorm_net_on_cuda(tiny_cfg, average):
    """SWA and EMA of cnn_deotte (BatchNorm: int64 num_batches_tracked) on the GPU."""
    res = fit(tiny_cfg("runtime.device=cuda", "train.epochs=3", average), "cnn_deotte", 0, predict_test=False)
    kind = average.split(".")[1].split("=")[0]
    assert 0 < res.metrics[kind]["accuracy_without"] <= 1 and np.isfinite(res.oof).all()


def test_predict_matches_the_blend_on_cuda(tiny_cfg):
    """stage=predict recomputes the submitted blend's test probabilities on the GPU within
    PREDICT_ATOL_CUDA, with the same labels."""
    cfg = tiny_cfg("runtime.device=cuda", "ensemble=[cnn_deotte,mlp]", "blend.method=mean")
    train.run(Workspace.load(cfg))
    blend.run(Workspace.load(cfg))
    ws = Workspace.load(cfg)
    probs, saved = predict.ensemble_probabilities(run_settings(cfg), ws.comp.x_test)
    blended = saved.probabilities(saved.best, "test")
    np.testing.assert_allclose(probs, blended, atol=PREDICT_ATOL_CUDA, rtol=0)
    assert (probs.argmax(1) == blended.argmax(1)).mean() >= 0.99


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_side_by_side_members_spread_over_the_gpus(tiny_cfg):
    cfg = tiny_cfg("runtime.device=cuda", "runtime.fold_jobs=2", "model=mlp")
    train.run(Workspace.load(cfg))
    ws = Workspace.load(cfg)
    used = {members.read_metrics(ws.member_dir(k)).device.split(" ")[0] for k in ws.keys("mlp")}
    assert used == {"cuda:0", "cuda:1"}
