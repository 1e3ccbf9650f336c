"""A fused group's batches from one device copy (GroupBatches) are, member by member, exactly the
batches each member draws alone (DeviceBatches), with the default augmentation on; and the fused
network predicts every member's probabilities in one pass (predict_group_probs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.fusion import fuse, stack_inputs
from pipeline.members import MemberKey
from pipeline.models import create_model
from pipeline.pseudo import PseudoRows
from pipeline.settings import AugBackend, Precision, RuntimeSettings, TTASettings
from pipeline.train.batches import GroupBatches, StackedImages, make_batches, set_epoch, training_set
from pipeline.train.engine import FitSpec
from pipeline.train.inference import predict_group_probs, predict_group_view_probs, predict_probs, predict_view_probs
from pipeline.workspace import Workspace

CPU = torch.device("cpu")
# Three members of different folds and seeds; the tiny config's default augmentation (affine + elastic) stays on.
GROUP = [MemberKey("cnn_deotte", 0), MemberKey("cnn_deotte", 1), MemberKey("cnn_deotte", 2, 1)]


def _members(tiny_cfg):
    ws = Workspace.load(tiny_cfg("ensemble=[cnn_deotte]", "folds.k=3", "models.cnn_deotte.seeds=2"))
    specs = [FitSpec.create(ws.settings.models[k.model], ws.settings.runtime, k, ws.member_config(k)) for k in GROUP]
    assert specs[0].aug.elastic_alpha > 0 and specs[0].aug.rotate > 0  # augmentation on
    assert len({s.training_seed for s in specs}) == 3
    return ws, specs


def _assert_members_match(group: GroupBatches, alone: list, seeds: list[int], epochs=(1, 2)) -> None:
    """Every fused batch, split by member, equals (torch.equal) that member's DeviceBatches batch."""
    m = len(alone)
    assert len(group) == len(alone[0]) > 0
    for epoch in epochs:
        group.set_epoch(epoch)
        for b, seed in zip(alone, seeds):
            set_epoch(b, seed, epoch)
        steps = 0
        for (x, y), pairs in zip(group, zip(*alone)):
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            c = xs[0].shape[1]
            assert x.shape == (len(y), m * c, *xs[0].shape[2:]) and x.dtype == torch.float32
            assert torch.equal(x, stack_inputs(xs))
            for k in range(m):
                assert torch.equal(x[:, k * c:(k + 1) * c], xs[k]), (epoch, steps, k)
                assert torch.equal(y[:, k], ys[k])
            assert y.dtype == ys[0].dtype and torch.equal(y, torch.stack(ys, 1))
            steps += 1
        assert steps == len(group)


def test_group_batches_equal_each_members_own_batches(tiny_cfg):
    """3 members (2 folds of seed 0, 1 of seed 1), default augmentation, 2 epochs reseeded:
    member m's slice of each fused batch is exactly its own DeviceBatches' batch, and of a subset's
    in epoch 3; one image copy."""
    ws, specs = _members(tiny_cfg)
    sets = [training_set(ws.comp, np.flatnonzero(ws.folds != s.key.fold)) for s in specs]
    seeds = [s.training_seed for s in specs]
    bs = specs[0].train.batch_size
    alone = [make_batches(d, bs, CPU, s.aug, s.training_seed) for d, s in zip(sets, specs)]
    group = GroupBatches(sets, bs, CPU, specs[0].aug, seeds)
    _assert_members_match(group, alone, seeds)
    part = group.subset([2, 0])  # a group rebuilt without member 1 (it diverged): the others go on as alone
    _assert_members_match(part, [alone[2], alone[0]], [seeds[2], seeds[0]], epochs=(3,))
    assert part.x is group.x
    # one device copy: the members' folds cover every train row, held once (not 3 x 2/3 of them)
    assert group.x.dtype == torch.uint8 and group.x.numel() == ws.comp.x_train.size
    assert group.device_bytes == ws.comp.x_train.size + 2 * 8 * sum(len(d.rows) for d in sets)
    assert sum(b.x.numel() for b in alone) == 2 * ws.comp.x_train.size
    assert [len(p) for p in group.positions] == [len(d.rows) for d in sets]


def test_streamed_group_batches_equal_each_members_own_batches(tiny_cfg):
    """A fused group whose images do not fit (``runtime.stream``: gathered per step from the host
    source and prefetched) yields, member by member, each member's own streamed batches, which
    are its in-memory ones; nothing of the images is held on the device."""
    ws, specs = _members(tiny_cfg)
    sets = [training_set(ws.comp, np.flatnonzero(ws.folds != s.key.fold)) for s in specs]
    seeds = [s.training_seed for s in specs]
    bs = specs[0].train.batch_size
    alone = [make_batches(d, bs, CPU, s.aug, s.training_seed, stream=True) for d, s in zip(sets, specs)]
    group = GroupBatches(sets, bs, CPU, specs[0].aug, seeds, stream=True)
    _assert_members_match(group, alone, seeds)
    assert group.x is None and group.device_bytes == 2 * 8 * sum(len(d.rows) for d in sets)
    memory = [make_batches(d, bs, CPU, s.aug, s.training_seed) for d, s in zip(sets, specs)]
    for b, seed in zip(memory + alone, seeds + seeds):
        set_epoch(b, seed, 4)
    for streamed, whole in zip(alone, memory):
        assert all(torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) for a, c in zip(streamed, whole))


def test_group_batches_channels_last_and_pseudo_rows(tiny_cfg):
    """With soft pseudo rows (each member its own test rows and train + test StackedImages, one
    member without any) the fused batches still equal the members' own, soft labels (B, M, C)
    included; channels_last gives the same values in channels_last memory format."""
    ws, specs = _members(tiny_cfg)
    comp, rng = ws.comp, np.random.default_rng(0)
    n_test, c = len(comp.x_test), comp.num_classes
    sets = []
    for m, s in enumerate(specs):
        rows = np.sort(rng.choice(n_test, 30 + 3 * m, replace=False)).astype(np.int64)
        targets = rng.dirichlet(np.ones(c), len(rows)).astype(np.float32)
        sets.append(training_set(comp, np.flatnonzero(ws.folds != s.key.fold),
                                 PseudoRows(s.key.fold, rows, targets, targets.max(1))))
    assert all(isinstance(d.images, StackedImages) for d in sets) and sets[0].images is not sets[1].images
    seeds = [s.training_seed for s in specs]
    bs = specs[0].train.batch_size
    lengths = {len(d.rows) // bs for d in sets}
    assert len(lengths) == 1  # equal batch counts, as the scheduler groups them
    alone = [make_batches(d, bs, CPU, s.aug, s.training_seed) for d, s in zip(sets, specs)]
    group = GroupBatches(sets, bs, CPU, specs[0].aug, seeds, channels_last=True)
    x, y = next(iter(group))
    assert x.is_contiguous(memory_format=torch.channels_last) and y.shape == (bs, 3, c) and y.dtype == torch.float32
    _assert_members_match(group, alone, seeds, epochs=(3,))
    used = np.unique(np.concatenate([d.rows for d in sets]))
    assert group.x.shape[0] == len(used) < len(comp.x_train) + n_test


def test_group_batches_refuse_what_cannot_share(tiny_cfg):
    """Different batch counts, different image arrays, the albumentations backend: one-line errors."""
    ws, specs = _members(tiny_cfg)
    aug, comp = specs[0].aug, ws.comp
    full = training_set(comp, np.arange(len(comp.x_train)))
    half = training_set(comp, np.arange(len(comp.x_train) // 2))
    with pytest.raises(PipelineError, match="batches per epoch"):
        GroupBatches([full, half], 32, CPU, aug, [0, 1])
    other = type(full)(comp.x_train.copy(), comp.y_train, full.rows)
    with pytest.raises(PipelineError, match="other images"):
        GroupBatches([full, other], 32, CPU, aug, [0, 1])
    alb = dataclasses.replace(aug, backend=AugBackend.albumentations)
    with pytest.raises(PipelineError, match="aug.backend"):
        GroupBatches([full, full], 32, CPU, alb, [0, 1])


def _fresh_members(n: int) -> list[torch.nn.Module]:
    """``n`` cnn_deotte (width 0.25) with their own weights and non-trivial BatchNorm statistics."""
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = create_model("cnn_deotte", 10, width=0.25)
        with torch.no_grad():
            net.train()(torch.rand(64, 1, 28, 28))  # running statistics other than (0, 1)
        nets.append(net.eval())
    return nets


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_prediction_equals_each_members_own(tiny_cfg, channels_last):
    """predict_group_probs through the fused network (eval mode, fp32) gives each member's
    predict_probs within 1e-5, members of 26 / 24 / 21 rows (the shorter ones padded), one
    forward per batch of eval_batch_size // M rows; with TTA views likewise (checked once)."""
    comp = Workspace.load(tiny_cfg()).comp
    nets = _fresh_members(3)
    fused = fuse(nets).eval()
    images = [comp.x_train[0:26], comp.x_train[100:124], comp.x_test[:21]]
    runtime = RuntimeSettings(device="cpu", eval_batch_size=24, channels_last=channels_last)
    calls = []
    hook = fused.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    probs = predict_group_probs(fused, images, CPU, runtime, Precision.fp32)
    hook.remove()
    assert len(calls) == 4 and calls[0] == (8, 3, 28, 28) and calls[-1] == (2, 3, 28, 28)  # one forward per 8 rows
    assert [p.shape for p in probs] == [(26, 10), (24, 10), (21, 10)] and probs[0].dtype == np.float32
    for net, x, p in zip(nets, images, probs):
        np.testing.assert_allclose(p, predict_probs(net, x, CPU, runtime, Precision.fp32), atol=1e-5, rtol=0)
    assert not np.allclose(probs[0][:24], predict_probs(nets[1], images[0][:24], CPU, runtime, Precision.fp32),
                           atol=1e-3)  # members differ: the comparison can fail
    if channels_last:
        return
    tta = TTASettings(rotations=10.0, hflip=True)
    views = predict_group_view_probs(fused, images, CPU, runtime, Precision.fp32, tta)
    for net, x, v in zip(nets, images, views):
        assert v.shape == (4, len(x), 10)  # identity, 2 rotations, a mirror
        np.testing.assert_allclose(v, predict_view_probs(net, x, CPU, runtime, Precision.fp32, tta), atol=1e-5, rtol=0)
