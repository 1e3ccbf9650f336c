"""A fused group: the pending members of one model (its folds x seeds) trained as one network.

Each member keeps what makes it itself (:func:`~pipeline.train.engine.member_parts`): its
initial weights and its batches (its own fold's rows, in its own seed's order, with its own
augmentation draws) come from its own seed, exactly as when it trains alone. The group's network
(:func:`pipeline.fusion.fuse`) sees member ``m``'s batch in its channel block ``m``; the loss is
the sum of the members' own mean losses (:func:`~pipeline.train.engine.member_losses`), so each
member gets its own gradients, and AdamW, the one-cycle schedule, EMA and SWA act per element.
BatchNorm statistics are per channel, hence per member. The dropout masks of all members come
from one generator (seeded with the first member's seed): each member still draws its own masks,
but not the ones it draws alone. With fp16 one member's overflow skips the group's step.

After training the fused weights (and their EMA/SWA) are split (:func:`pipeline.fusion.split`)
into ordinary unfused models, which predict the members' OOF and test probabilities with the same
functions as an unfused member: what a member writes does not depend on how it trained, except
``metrics.json``'s ``fused`` record.

With a resume path the group checkpoints all its members every epoch (tensors and plain data, as
one member does) and continues from there when its members and their cache keys are the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pipeline.data import Competition
from pipeline.errors import PipelineError
from pipeline.fusion import fusable, fuse, split, stack_inputs
from pipeline.models import create_model
from pipeline.train.batches import set_epoch
from pipeline.augment import tta_views
from pipeline.train.engine import (DeadlineReached, FitResult, FitSpec, TrainingLoop, check_deadline, epoch_record,
                                   member_losses, member_metrics, member_parts, optimisation, predict_member,
                                   resume_from, save_state, seconds_per_step, train_step)
from pipeline.train.inference import average_views, place_model
from pipeline.train.resume import GROUP_SEPARATOR
from pipeline.device import configure_numerics, select_device, use_device
from pipeline.train.runtime import seed_everything


def can_fuse(spec: FitSpec, comp: Competition) -> bool:
    """Whether members of ``spec``'s model can train fused: its architecture is an
    ``nn.Sequential`` :func:`pipeline.fusion.fuse` handles (the registered ``cnn_deotte``,
    ``cnn_keras`` and ``mlp``; not timm models) and ``runtime.compile`` is off."""
    if spec.runtime.compile:
        return False
    return fusable(create_model(spec.arch, comp.num_classes, comp.x_train.shape[1], comp.side, **spec.kwargs))


@dataclass
class GroupLoop:
    """The live state of a fused group's training.

    Attributes:
        specs: the members' fit specs (one model, one set of settings; their keys, seeds and
            cache keys differ).
        loop: the fused network's optimisation state; its ``history`` holds one list of epoch
            records per member.
        batches: each member's training batches (equal in number).
    """

    specs: list[FitSpec]
    loop: TrainingLoop
    batches: list

    @property
    def name(self) -> str:
        """``<model> fused group of M`` (for log lines)."""
        return f"{self.specs[0].key.model} fused group of {len(self.specs)}"

    @property
    def cache_key(self) -> str:
        """The group's checkpoint key: its members' cache keys, in order."""
        return GROUP_SEPARATOR.join(s.cache_key for s in self.specs)


def setup_group(specs: list[FitSpec], comp: Competition, folds: np.ndarray, pseudo: list | None = None) -> GroupLoop:
    """The fused group of ``specs`` (members of one model, with identical training settings): each
    member's batches and initial model from its own seed, fused into one network and optimised as
    one (:func:`~pipeline.train.engine.optimisation`). ``pseudo``: each member's pseudo rows or None.

    Raises:
        PipelineError: the members' batches per epoch differ in number (the scheduler groups
            only members with equal counts).
        ConfigError: the batch size exceeds a fold's training rows.
    """
    lead = specs[0]
    device = select_device(lead.runtime.device)
    use_device(device)
    configure_numerics(device, lead.precision, lead.runtime.deterministic)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches, models = [], []
    for spec, rows in zip(specs, pseudo or [None] * len(specs)):
        b, m = member_parts(spec, comp, np.flatnonzero(folds != spec.key.fold), device, rows)
        batches.append(b)
        models.append(m)
    if len({len(b) for b in batches}) != 1:
        raise PipelineError(f"{lead.key.model}: fused members have {sorted({len(b) for b in batches})} "
                            f"batches per epoch; expected one count")
    seed_everything(lead.training_seed)  # the group's dropout generator
    fused = place_model(fuse(models), device, lead.runtime.channels_last)
    loop = optimisation(fused, lead, batches[0], device)
    loop.history = [[] for _ in specs]
    return GroupLoop(list(specs), loop, batches)


def group_epoch(g: GroupLoop, epoch: int) -> tuple[list[float], list[float]]:
    """One pass over every member's batches of epoch ``epoch`` (1-based; each member's order and
    augmentation reseeded from its own seed and the epoch), one fused step per batch index. Reads
    the losses and accuracies back from the device once, at the end. Returns each member's
    ``(mean train loss, train accuracy)`` as two lists."""
    loop, lead = g.loop, g.specs[0]
    loop.model.train()
    for b, spec in zip(g.batches, g.specs):
        set_epoch(b, spec.training_seed, epoch)
    members, steps = len(g.specs), len(g.batches[0])
    loss_sum = torch.zeros(members, device=loop.device)
    correct = torch.zeros(members, device=loop.device, dtype=torch.int64)
    seen = 0
    bar = tqdm(zip(*g.batches), total=steps, desc=f"{g.name} epoch {epoch}/{loop.epochs}", leave=False,
               disable=None if lead.runtime.progress else True, mininterval=1.0, dynamic_ncols=True)
    for step, pairs in enumerate(bar):
        if lead.deadline is not None and time.time() > lead.deadline:
            raise DeadlineReached(f"{g.name}: the budget's deadline came in epoch {epoch}")
        x = stack_inputs([x.to(loop.device, non_blocking=True) for x, _ in pairs])
        y = torch.stack([y.to(loop.device, non_blocking=True) for _, y in pairs], dim=1)
        _, logits = train_step(loop.net, loop.opt, x, y, lead.train.label_smoothing,
                               lead.runtime.channels_last, lead.precision, loop.scaler)
        done = (epoch - 1) * steps + step + 1
        if done < loop.cycle:
            loop.sched.step()
        if loop.average is not None:
            loop.average.update(loop.model, done)
        with torch.no_grad():
            logits = logits.detach()
            loss_sum += member_losses(logits, y, lead.train.label_smoothing) * len(y)
            correct += (logits.argmax(-1) == (y.argmax(-1) if y.ndim == 3 else y)).sum(0)
        seen += len(y)
    return (loss_sum / max(seen, 1)).tolist(), (correct.double() / max(seen, 1)).tolist()


def member_loops(g: GroupLoop, comp: Competition) -> list[TrainingLoop]:
    """Every member of the group as an ordinary, unfused member's training state, in order: its
    slice of the fused weights (one :func:`~pipeline.fusion.split` of the group) in its own model
    (and of their EMA/SWA), its history and the group's epochs, so that it predicts, and is scored
    and saved, exactly as a member trained alone. Optimiser and schedule are not split (``None``):
    a member's loop can predict, not train."""
    loop, n = g.loop, len(g.specs)
    raw_states = split(loop.model, n)
    avg_states = split(loop.average.module, n) if loop.average is not None else [None] * n

    def member_model(spec: FitSpec, state: dict) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # its random init must not move the group's dropout draws
            model = create_model(spec.arch, comp.num_classes, comp.x_train.shape[1], comp.side, **spec.kwargs)
        model.load_state_dict(state)
        return place_model(model, loop.device, spec.runtime.channels_last)

    loops = []
    for spec, raw_state, avg_state, history in zip(g.specs, raw_states, avg_states, loop.history):
        raw = member_model(spec, raw_state)
        average = loop.average.for_member(raw, avg_state) if loop.average is not None else None
        loops.append(TrainingLoop(raw, raw, None, None, None, loop.device, loop.epochs, loop.cycle, average,
                                  None, history, loop.start, loop.seconds_before))
    return loops


def fit_group(specs: list[FitSpec], comp: Competition, folds: np.ndarray, predict_test: bool = True,
              resume_path: Path | None = None, pseudo: list | None = None,
              on_epoch: Callable[[int, list[dict]], None] | None = None) -> list[FitResult]:
    """Train ``specs`` (members of one model with identical settings) as one fused network; predict
    each member's fold (and the test set) with its split-out unfused model.

    ``on_epoch(epoch, records)`` is called after each epoch with every member's history record.
    With ``resume_path``, the group's end-of-epoch state (the fused network, optimiser, schedule,
    weight average, every member's history, the RNG states) is written there after every epoch and
    training continues from it when it was written for the same members with the same cache keys.

    Returns one :class:`~pipeline.train.engine.FitResult` per spec, in order: its ``model`` an
    ordinary unfused model (the averaged weights with EMA/SWA), its ``metrics`` the member's
    ``metrics.json`` with ``seconds`` its share of the group's (group seconds / M) and a ``fused``
    record (``members``, ``group_seconds``).

    Raises:
        PipelineError: a member's loss became NaN/inf (the checkpoint is removed); the members'
            batch counts differ.
        DeadlineReached: the members' ``deadline`` (``budget=``) came; the last end-of-epoch
            checkpoint stays.
        ConfigError: the batch size exceeds a fold's training rows.
    """
    t0 = time.perf_counter()
    g = setup_group(specs, comp, folds, pseudo)
    if resume_path is not None and resume_path.exists() and not resume_from(g.loop, g.cache_key, g.name, resume_path):
        g = setup_group(specs, comp, folds, pseudo)
    val_rows = [np.flatnonzero(folds == s.key.fold) for s in specs]
    loops, views = _run_group_epochs(g, comp, val_rows, t0, on_epoch, resume_path,
                                     len(comp.x_test) if predict_test else 0)
    wall = g.loop.seconds_before + time.perf_counter() - t0
    results = []
    for m, (spec, member) in enumerate(zip(specs, loops)):
        x_val, y_val = comp.x_train[val_rows[m]], comp.y_train[val_rows[m]]
        test = average_views(predict_member(member, spec, comp.x_test, tta=True)) if predict_test else None
        metrics = member_metrics(member, spec, views[m], x_val, y_val, t0)
        metrics |= {"seconds": wall / len(specs), "n_train": int((folds != spec.key.fold).sum()),
                    "n_val": int(len(val_rows[m])),
                    "n_pseudo": int(len(pseudo[m].rows)) if pseudo and pseudo[m] is not None else 0,
                    "fused": {"members": len(specs), "group_seconds": wall,
                              "group": [str(s.key) for s in specs]}}
        weights = member.average.module if member.average is not None else member.model
        results.append(FitResult(weights, average_views(views[m]), val_rows[m].astype(np.int64), test, metrics))
    return results


def _run_group_epochs(g: GroupLoop, comp: Competition, val_rows: list[np.ndarray], t0: float,
                      on_epoch, resume_path: Path | None,
                      n_test: int = 0) -> tuple[list[TrainingLoop], list[np.ndarray]]:
    """The epochs left of the group, each member's epoch recorded (validated every
    ``runtime.val_every``-th epoch and the last, with its split-out model) and the group
    checkpointed; returns the members' final loops (:func:`member_loops`) and each member's final
    ``(V, n_val, C)`` OOF probabilities per test-time view. Raises PipelineError when a member's
    loss becomes NaN/inf, and :class:`~pipeline.train.engine.DeadlineReached` (after the epoch's
    checkpoint) when the next epoch and the final predictions would end after the members'
    deadline."""
    loop, lead = g.loop, g.specs[0]
    members, views = None, None
    for epoch in range(loop.start, loop.epochs + 1):
        te = time.perf_counter()
        losses, accs = group_epoch(g, epoch)
        bad = [str(s.key) for s, v in zip(g.specs, losses) if not math.isfinite(v)]
        if bad:
            if resume_path is not None:
                resume_path.unlink(missing_ok=True)
            raise PipelineError(f"{', '.join(bad)}: training loss became non-finite in epoch {epoch} of a "
                                f"{g.name}; nothing was cached (try a lower train.lr)")
        last, validate = epoch == loop.epochs, epoch % lead.runtime.val_every == 0
        vals: list = [None] * len(g.specs)
        if last or validate:
            members = member_loops(g, comp)
            preds = [predict_member(member, spec, comp.x_train[rows], tta=last)
                     for member, spec, rows in zip(members, g.specs, val_rows)]
            views, vals = (preds, [v[0] for v in preds]) if last else (None, preds)
        seconds = time.perf_counter() - te
        lr = float(loop.sched.get_last_lr()[0])
        records = [epoch_record(epoch, losses[m], accs[m], vals[m], comp.y_train[val_rows[m]], lr, seconds)
                   for m in range(len(g.specs))]
        for history, record in zip(loop.history, records):
            history.append(record)
        if resume_path is not None:
            save_state(loop, g.cache_key, resume_path, epoch, loop.seconds_before + time.perf_counter() - t0)
        if on_epoch is not None:
            on_epoch(epoch, records)
        if epoch < loop.epochs:
            n = len(g.specs)
            check_deadline(lead.deadline, seconds, n * len(g.batches[0]) * lead.train.batch_size,
                           sum(map(len, val_rows)) + n * n_test, len(tta_views(lead.tta)), g.name)
    if views is None:  # resumed from a checkpoint written after the last epoch
        members = member_loops(g, comp)
        views = [predict_member(member, spec, comp.x_train[rows], tta=True)
                 for member, spec, rows in zip(members, g.specs, val_rows)]
    return members, views


def seconds_per_group(specs: list[FitSpec], comp: Competition, folds: np.ndarray, steps: int = 5,
                      warmup: int = 2, pseudo: list | None = None,
                      after_warmup: Callable[[], None] | None = None) -> float:
    """Seconds the fused training of ``specs`` takes here: ``steps`` real fused steps (after
    ``warmup``) on its device, times the steps of its planned epochs (validation excluded), as
    :func:`~pipeline.train.engine.seconds_per_member` times one member. Nothing is written."""
    g = setup_group(specs, comp, folds, pseudo)
    loop, lead = g.loop, g.specs[0]
    loop.model.train()
    its = [iter(b) for b in g.batches]

    def step() -> None:
        pairs = [next(it) for it in its]
        x = stack_inputs([x.to(loop.device) for x, _ in pairs])
        y = torch.stack([y.to(loop.device) for _, y in pairs], dim=1)
        train_step(loop.net, loop.opt, x, y, lead.train.label_smoothing, lead.runtime.channels_last,
                   lead.precision, loop.scaler)

    steps_per_epoch = len(g.batches[0])
    per_step = seconds_per_step(step, loop.device, min(steps_per_epoch, warmup + steps), warmup, after_warmup)
    return per_step * steps_per_epoch * loop.epochs
