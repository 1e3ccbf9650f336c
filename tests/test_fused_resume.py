"""Fused groups that keep their members (issue 30, defects 2, 3 and 6), on the CPU, on the real
MNIST fixture: every member checkpoints its own ``resume.pt`` (any regrouping, or the member alone,
continues it), a diverged member leaves its group while the others go on, fp16's skipped steps
are counted and a member that keeps overflowing leaves, and AdamW keeps fp16's inf check on the
device."""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import DIGITS, TINY, compose_cfg
from pipeline.errors import PipelineError
from pipeline.fusion import fuse, fuse_like, fuse_optimizers, split, split_like, split_optimizer, stack_inputs
from pipeline.members import MemberKey
from pipeline.models import create_model
from pipeline.paths import RESUME
from pipeline.train import engine, fused
from pipeline.train.engine import FitSpec, fit_member
from pipeline.train.resume import resume_cache_keys
from pipeline.workspace import Workspace

# Exact mode: no dropout, no augmentation, deterministic, fp32 (this CPU's `auto` is bf16).
EXACT = ["ensemble=[cnn_deotte]", "folds.k=3", "models.cnn_deotte.seeds=2", "runtime.deterministic=true",
         "aug=none", "models.cnn_deotte.kwargs.dropout=0.0", "train.epochs=3", "models.cnn_deotte.train.epochs=3",
         "train.precision=fp32"]
FOUR = [MemberKey("cnn_deotte", 0), MemberKey("cnn_deotte", 1), MemberKey("cnn_deotte", 2),
        MemberKey("cnn_deotte", 0, 1)]
BAD = MemberKey("cnn_deotte", 1, 1)  # the member made to diverge
# A member continued after epoch 2 in another grouping (or alone, unfused), or whose group lost a
# diverged member, against the uninterrupted group of 4 (fp32, width 0.25, batch 32, 3 epochs):
# measured on a 2-core Intel Xeon with AVX512-BF16/AMX, weights and OOF probabilities differ by at
# most 9e-8 (0 for a group of 3 or 2: the same kernels), train losses by 1.2e-7; members trained
# alone for 2 epochs, then fused, against alone throughout: 9e-8 / 1.1e-7; with an EMA or SWA
# (mlp) the averaged weights by 7.5e-9 and the probabilities by 6e-8. A resume that lost
# AdamW's moments differs by 1.7e-2 or more, so ATOL separates the two by two orders of magnitude
# either way and leaves room for other CPUs' grouped-convolution kernels.
ATOL = 1e-4


def _specs(ws: Workspace, keys) -> list[FitSpec]:
    return [FitSpec.create(ws.settings.models[k.model], ws.settings.runtime, k, ws.member_config(k)) for k in keys]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted group of FOUR (3 epochs), each member's FitResult by key."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(DIGITS, root / "digits")
    ws = Workspace.load(compose_cfg(root, TINY + EXACT, data_dir=root / "digits"))
    return dict(zip(FOUR, fused.fit_group(_specs(ws, FOUR), ws.comp, ws.folds, predict_test=False)))


def _assert_same(res, ref) -> None:
    """``res`` learned what ``ref`` did, within ATOL, over the same 3 epochs."""
    assert isinstance(res, engine.FitResult), res
    wa, wb = ref.model.state_dict(), res.model.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), atol=ATOL, rtol=0, msg=k)
    np.testing.assert_allclose(res.oof, ref.oof, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(res.row_ids, ref.row_ids)
    assert res.metrics["accuracy"] == ref.metrics["accuracy"]
    assert [h["epoch"] for h in res.metrics["history"]] == [1, 2, 3]
    assert [h["train_loss"] for h in res.metrics["history"]] == pytest.approx(
        [h["train_loss"] for h in ref.metrics["history"]], abs=ATOL)


def _stop_after(epoch_to_stop: int):
    def stop(epoch, _):
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt  # as a kill after the epoch's checkpoints

    return stop


def test_a_group_of_4_stopped_after_epoch_2_continues_as_groups_of_3_and_1(tiny_cfg, reference):
    """A group of 4 stopped after epoch 2 leaves each member's own resume.pt (the format of a
    member trained alone, keyed by its own cache key; no group-wide file); 3 of them continue as
    a group and the 4th alone, unfused: every member ends as the uninterrupted group (ATOL), its
    first two epochs' records read back exactly."""
    ws = Workspace.load(tiny_cfg(*EXACT))
    specs = _specs(ws, FOUR)
    paths = [ws.member_dir(k) / RESUME for k in FOUR]
    with pytest.raises(KeyboardInterrupt):
        fused.fit_group(specs, ws.comp, ws.folds, predict_test=False, resume_paths=paths, on_epoch=_stop_after(2))
    for spec, path in zip(specs, paths):
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == 2 and len(state["history"]) == 2 and state["seconds"] > 0
        assert resume_cache_keys(path) == [spec.cache_key]  # what budgeted.existing_epochs reads
        assert state["model"].keys() == create_model("cnn_deotte", 10, width=0.25).state_dict().keys()
    assert not list(ws.paths.artifacts_dir.glob("cnn_deotte/fused-*"))
    three = fused.fit_group(specs[:3], ws.comp, ws.folds, predict_test=False, resume_paths=paths[:3])
    alone = fit_member(specs[3], ws.comp, ws.folds, predict_test=False, resume_path=paths[3])
    for key, res in zip(FOUR, [*three, alone]):
        _assert_same(res, reference[key])
        assert res.metrics["resumed_after_epoch"] == 2
        for a, b in zip(res.metrics["history"][:2], reference[key].metrics["history"][:2]):
            assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert [r.metrics["fused"]["members"] for r in three] == [3, 3, 3] and "fused" not in alone.metrics
    assert all(torch.load(p, weights_only=True)["epoch"] == 3 for p in paths)


def test_members_stopped_alone_or_never_started_continue_in_one_call(tiny_cfg, reference, caplog, tmp_path):
    """Two members' checkpoints written after epoch 2 while they trained alone join one fused
    group; a third without a checkpoint trains from the start as a group of its own in the same
    call (one log line says so). The two end as they do trained alone throughout, the third as in
    the uninterrupted group (ATOL)."""
    ws = Workspace.load(tiny_cfg(*EXACT))
    specs = _specs(ws, FOUR[:3])
    paths = [ws.member_dir(k) / RESUME for k in FOUR[:3]]
    alone = []
    for spec, path in zip(specs[:2], paths):
        def keep(epoch, _, path=path):  # the checkpoint after epoch 2, as if it had been killed there
            if epoch == 2:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp_path / "alone.pt", path)

        alone.append(fit_member(spec, ws.comp, ws.folds, predict_test=False, resume_path=tmp_path / "alone.pt",
                                on_epoch=keep))
    with caplog.at_level(logging.INFO):
        res = fused.fit_group(specs, ws.comp, ws.folds, predict_test=False, resume_paths=paths)
    assert ("cnn_deotte: its members continue from different epochs (after epoch 2: cnn_deotte fold 0, "
            "cnn_deotte fold 1; after epoch 0: cnn_deotte fold 2); they train as 2 groups") in caplog.text
    for ref, r in zip([*alone, reference[FOUR[2]]], res):
        _assert_same(r, ref)
    assert [r.metrics["resumed_after_epoch"] for r in res] == [2, 2, None]
    assert [r.metrics["fused"]["members"] for r in res] == [2, 2, 1]


@pytest.mark.parametrize("average", ["train.ema=0.9", "train.swa=0.5"])
def test_ema_and_swa_weights_continue_in_another_grouping(tiny_cfg, average):
    """A group of 2 (mlp: MemberLinear layers) with an EMA, or with SWA averaging its last 2 of 3
    epochs, stopped after epoch 2 (SWA has averaged by then): one member continues as a group of
    its own, the other alone; both end with the uninterrupted group's averaged weights and OOF
    probabilities (ATOL)."""
    ws = Workspace.load(tiny_cfg("ensemble=[mlp]", "seeds=2", "train.epochs=3", "aug=none", "train.precision=fp32",
                                 "runtime.deterministic=true", average))
    keys = [MemberKey("mlp", 0), MemberKey("mlp", 1, 1)]
    specs, paths = _specs(ws, keys), [ws.member_dir(k) / RESUME for k in keys]
    ref = fused.fit_group(specs, ws.comp, ws.folds, predict_test=False)
    with pytest.raises(KeyboardInterrupt):
        fused.fit_group(specs, ws.comp, ws.folds, predict_test=False, resume_paths=paths, on_epoch=_stop_after(2))
    kind = average.split(".")[1].split("=")[0]
    state = torch.load(paths[0], weights_only=True)
    assert kind in state and (kind == "ema" or int(state["swa"]["n_averaged"]) > 0)
    res = [*fused.fit_group(specs[:1], ws.comp, ws.folds, predict_test=False, resume_paths=paths[:1]),
           fit_member(specs[1], ws.comp, ws.folds, predict_test=False, resume_path=paths[1])]
    for a, b in zip(ref, res):
        assert b.metrics["resumed_after_epoch"] == 2 and kind in b.metrics
        for k, v in a.model.state_dict().items():
            torch.testing.assert_close(b.model.state_dict()[k].float(), v.float(), atol=ATOL, rtol=0, msg=k)
        np.testing.assert_allclose(b.oof, a.oof, atol=ATOL, rtol=0)


def _poison(monkeypatch, key: MemberKey) -> None:
    """Member ``key`` starts from NaN weights (its loss is NaN from the first step)."""
    real = fused.member_model

    def poisoned(spec, *args, **kwargs):
        model = real(spec, *args, **kwargs)
        if spec.key == key:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return model

    monkeypatch.setattr(fused, "member_model", poisoned)


def test_a_diverged_member_leaves_its_group_and_the_others_go_on(tiny_cfg, reference, monkeypatch, caplog):
    """A member whose loss is NaN in epoch 1 leaves its group of 3 (a MemberFailed naming it and
    the epoch in one line; its resume.pt removed); the other two complete, keep their checkpoints
    and learn what they learn without it (the uninterrupted group of 4, ATOL)."""
    ws = Workspace.load(tiny_cfg(*EXACT))
    keys = [FOUR[0], BAD, FOUR[2]]
    paths = [ws.member_dir(k) / RESUME for k in keys]
    paths[1].parent.mkdir(parents=True)
    paths[1].write_bytes(b"an earlier, unreadable checkpoint")
    _poison(monkeypatch, BAD)
    with caplog.at_level(logging.INFO):
        res = fused.fit_group(_specs(ws, keys), ws.comp, ws.folds, predict_test=False, resume_paths=paths)
    failed = res[1]
    assert isinstance(failed, fused.MemberFailed) and (failed.key, failed.epoch) == (BAD, 1)
    assert failed.reason.startswith("cnn_deotte fold 1 seed 1: training loss became nan in epoch 1 of a "
                                    "cnn_deotte fused group of 3; it left the group") and "\n" not in failed.reason
    assert isinstance(failed.error(), PipelineError) and str(failed.error()) == failed.reason
    assert failed.reason in caplog.text
    assert not paths[1].exists()
    for key, r, path in zip(keys[::2], res[::2], paths[::2]):
        _assert_same(r, reference[key])
        assert r.metrics["fused"]["members"] == 2
        assert torch.load(path, weights_only=True)["epoch"] == 3  # its checkpoint kept (the caller removes it)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the steps fp16 skipped
def test_fp16_overflows_are_counted_and_a_member_that_keeps_overflowing_leaves(tiny_cfg, monkeypatch, caplog):
    """fp16 (GradScaler on the CPU): a member whose gradients overflow on every step makes the
    scaler skip the group's steps; each epoch logs the skipped steps and the member, and after
    OVERFLOW_EPOCHS such epochs it leaves (MemberFailed); the other member trains its last epoch
    without skips and completes."""
    cfg = tiny_cfg("ensemble=[mlp]", "seeds=2", "train.precision=fp16", "train.epochs=3", "aug=none",
                   "runtime.deterministic=true")
    ws = Workspace.load(cfg)
    keys = [MemberKey("mlp", 0), MemberKey("mlp", 1, 1)]
    real = engine.member_losses

    def overflowing(logits, y, label_smoothing=0.0, weight=None):  # member 1's gradients x 1e30: inf in fp16
        out = real(logits, y, label_smoothing, weight)
        return out * torch.tensor([1.0, 1e30]) if out.numel() == 2 else out

    monkeypatch.setattr(engine, "member_losses", overflowing)  # the training loss only (train_step's)
    with caplog.at_level(logging.INFO):
        res = fused.fit_group(_specs(ws, keys), ws.comp, ws.folds, predict_test=False)
    assert fused.OVERFLOW_EPOCHS == 2
    lines = [r.message for r in caplog.records if "steps skipped" in r.message]
    assert len(lines) == 2, lines
    for epoch, line in enumerate(lines, 1):
        m = re.search(r"epoch (\d): (\d+) of (\d+) steps skipped .*: mlp fold 1 seed 1 on (\d+)$", line)
        assert m and int(m[1]) == epoch and m[2] == m[3] == m[4], line
    assert isinstance(res[1], fused.MemberFailed) and (res[1].key, res[1].epoch) == (keys[1], 2)
    assert "fp16 gradients overflowed" in res[1].reason and "mlp fold 1 seed 1" in res[1].reason
    assert isinstance(res[0], engine.FitResult) and len(res[0].metrics["history"]) == 3
    assert res[0].metrics["fused"]["members"] == 1


def test_adamw_keeps_fp16s_inf_check_on_the_device(tiny_cfg):
    """AdamW is fused on CUDA (GradScaler hands it the scale and the inf flag as device tensors:
    no host read per step) and multi-tensor (foreach) on the CPU; a checkpoint written with the
    other implementation keeps this device's."""
    assert engine.adamw_options(torch.device("cuda")) == {"fused": True}
    assert engine.adamw_options(torch.device("cpu")) == {"foreach": True}
    ws = Workspace.load(tiny_cfg("model=mlp"))
    spec = _specs(ws, [MemberKey("mlp", 0)])[0]
    cpu = engine.optimisation(create_model("mlp", 10), spec, range(6), torch.device("cpu"))
    assert cpu.opt.param_groups[0]["foreach"] is True
    # the options a CUDA device gets (fused AdamW also runs on CPU tensors, so this builds here)
    cuda = engine.optimisation(create_model("mlp", 10), spec, range(6), torch.device("cuda"))
    assert cuda.opt.param_groups[0]["fused"] is True and cuda.opt._step_supports_amp_scaling
    engine.load_optimizer(cuda.opt, cpu.opt.state_dict(), torch.device("cuda"))
    assert cuda.opt.param_groups[0]["fused"] is True and not cuda.opt.param_groups[0]["foreach"]


@pytest.mark.parametrize("arch", ["cnn_deotte", "mlp"])
def test_any_tensor_of_a_fused_layout_splits_and_joins_back(arch):
    """split_like / fuse_like (weights, EMA-style 'module.' keys) and split_optimizer /
    fuse_optimizers (AdamW's moments after a step) are inverse, and member m's optimiser slice is
    what the same step gives its unfused model."""
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(create_model(arch, 10, width=0.25, dropout=0.0) if arch != "mlp" else create_model(arch, 10))
    net = fuse(nets)
    x = torch.rand(8, 1, 28, 28)
    opt = torch.optim.AdamW(net.parameters(), foreach=True)
    net(stack_inputs([x] * 3)).sum().backward()
    opt.step()
    for m, model in enumerate(nets):
        alone = torch.optim.AdamW(model.parameters(), foreach=True)
        model(x).sum().backward()
        alone.step()
        mine = split_optimizer(net, 3, opt.state_dict())[m]["state"]
        for i, per_param in alone.state_dict()["state"].items():
            for k, v in per_param.items():
                torch.testing.assert_close(mine[i][k], v, atol=1e-5, rtol=1e-4, msg=f"{m} {i} {k}")
    state = net.state_dict()
    for k, v in fuse_like(net, split_like(net, 3, state)).items():
        assert torch.equal(v, state[k]), k
    prefixed = {f"module.{k}": v for k, v in state.items()} | {"n_averaged": torch.tensor(5)}
    parts = split_like(net, 3, prefixed, "module.")
    assert {k: v.shape for k, v in parts[1].items() if k != "n_averaged"} == {
        f"module.{k}": v.shape for k, v in split(net, 3)[1].items()}
    assert all(torch.equal(a, b) for a, b in zip(fuse_like(net, parts, "module.").values(), prefixed.values()))
    joined = fuse_optimizers(net, split_optimizer(net, 3, opt.state_dict()))
    for i, per_param in opt.state_dict()["state"].items():
        for k, v in per_param.items():
            assert torch.equal(joined["state"][i][k], v), (i, k)
