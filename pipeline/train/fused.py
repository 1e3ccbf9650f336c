"""A fused group: the pending members of one model (its folds x seeds) trained as one network.

Each member keeps what makes it itself: its initial weights
(:func:`~pipeline.train.engine.member_model` after seeding with its seed) and its batches (its own
fold's rows, in its own seed's order, with its own augmentation draws) come from its own seed,
exactly as when it trains alone. The batches (:class:`~pipeline.train.batches.GroupBatches`) hold
one device copy of the images for all members and gather and augment all ``M x B`` images of a
step at once; per-epoch validation runs through the fused network in eval mode
(:func:`~pipeline.train.inference.predict_group_probs`). The group's network
(:func:`pipeline.fusion.fuse`) sees member ``m``'s batch in its channel block ``m``; the loss is
the sum of the members' own mean losses (:func:`~pipeline.train.engine.member_losses`), so each
member gets its own gradients, and AdamW, the one-cycle schedule, EMA and SWA act per element.
BatchNorm statistics are per channel, hence per member. The dropout masks of all members come
from one generator (seeded with the first member's seed): each member still draws its own masks,
but not the ones it draws alone.

After training the fused weights (and their EMA/SWA) are split (:func:`pipeline.fusion.split`)
into ordinary unfused models, which predict the members' OOF and test probabilities with the same
functions as an unfused member: what a member writes does not depend on how it trained, except
``metrics.json``'s ``fused`` record.

**Checkpoints.** With resume paths every member's own state (its slice of the weights, AdamW's
moments, EMA/SWA; the group's schedule, RNG, fp16 scaler; its history and its share of the
seconds) is written to its own ``resume.pt`` after every epoch, in the format of a member trained
alone (:class:`~pipeline.train.resume.ResumeState`). Any grouping of members continues each one:
members whose states stopped after the same epoch train as one group, others as further groups
(fresh members start together); a member alone continues with
:func:`~pipeline.train.engine.fit_member`.

**A member that diverges leaves.** Its damage stays in its own tensors (every layer keeps members
apart), so after an epoch in which its loss became NaN/inf it leaves the group (its checkpoint
removed; :class:`~pipeline.train.engine.MemberFailed`) and the others continue as a group rebuilt
from their states. With fp16 one member's overflow makes ``GradScaler`` skip the step of all: each epoch's skipped steps
are counted on the device, logged with the members that overflowed, and a member that overflows
on :data:`OVERFLOW_SHARE` of the steps of :data:`OVERFLOW_EPOCHS` epochs in a row leaves the same
way.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pipeline.data import Competition
from pipeline.device import configure_numerics, select_device, use_device
from pipeline.fusion import fusable, fuse, fuse_like, fuse_optimizers, split, split_like, split_optimizer
from pipeline.members import MemberKey
from pipeline.models import create_model
from pipeline.train.batches import GroupBatches, Rows, training_set
from pipeline.train.engine import (DeadlineReached, FitResult, FitSpec, MemberFailed, TrainingLoop, apply_state,
                                   fresh_model, loop_state, member_losses, member_metrics, member_model, optimisation,
                                   placement, predict_member, run_epochs, seconds_per_step, train_step)
from pipeline.train.inference import average_views, place_model, predict_group_probs
from pipeline.train.resume import ResumeState, read_state
from pipeline.train.runtime import seed_everything

log = logging.getLogger(__name__)

OVERFLOW_SHARE = 0.5  # fp16: a member overflows in an epoch when its gradients held inf/NaN on this share of its steps
OVERFLOW_EPOCHS = 2  # ... and leaves its group after this many such epochs in a row
_STATE_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, IndexError)  # a state that does not fit


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
        batches: the members' training batches (:class:`~pipeline.train.batches.GroupBatches`: one
            device copy of their images, one gather and one augmentation pass per step).
        overflows: fp16: per member, the steps of the last epoch whose gradients held inf/NaN.
        skipped: fp16: the steps of the last epoch ``GradScaler`` skipped (any member overflowed).
        streak: fp16: per member, the epochs in a row it overflowed on :data:`OVERFLOW_SHARE` of
            the steps.
    """

    specs: list[FitSpec]
    loop: TrainingLoop
    batches: GroupBatches
    overflows: list[int] = field(default_factory=list)
    skipped: int = 0
    streak: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.overflows = self.overflows or [0] * len(self.specs)
        self.streak = self.streak or [0] * len(self.specs)

    @property
    def name(self) -> str:
        """``<model> fused group of M`` (for log lines)."""
        return f"{self.specs[0].key.model} fused group of {len(self.specs)}"

    # the unit of training (pipeline.train.engine.Unit) that run_epochs trains
    @property
    def histories(self) -> list[list]:
        return self.loop.history

    def train_epoch(self, epoch: int) -> tuple[list[float], list[float]]:
        return group_epoch(self, epoch)

    def leavers(self, losses: list[float], epoch: int) -> dict[int, str]:
        return _leavers(self, losses, epoch)

    def without(self, comp, leave, epoch, paths):
        return _without(self, comp, leave, epoch, paths)

    def validate(self, comp: Competition, val_rows: list[np.ndarray]) -> list[np.ndarray]:
        """Through the fused network in eval mode: one forward for all members."""
        lead = self.specs[0]
        return predict_group_probs(self.loop.predictor, [Rows(comp.x_train, rows) for rows in val_rows],
                                   self.loop.device, lead.runtime, lead.precision)

    def split(self, comp: Competition) -> list[TrainingLoop]:
        return member_loops(self, comp)

    def states(self, epoch: int, seconds: float) -> list[ResumeState]:
        return group_states(self, epoch, seconds)


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
    sets, models = [], []
    for spec, rows in zip(specs, pseudo or [None] * len(specs)):
        seed_everything(spec.training_seed)  # its initial weights from its own seed, as alone (member_parts)
        sets.append(training_set(comp, np.flatnonzero(folds != spec.key.fold), rows))
        models.append(member_model(spec, comp, device))
    union = len(np.unique(np.concatenate([s.rows for s in sets])))
    place = placement(lead, comp, union, device)
    (log.info if place.streamed else log.debug)("train: %s fused group of %d: %s", lead.key.model, len(specs),
                                                 place.describe())
    batches = GroupBatches(sets, lead.train.batch_size, device, lead.aug, [s.training_seed for s in specs],
                           channels_last=lead.runtime.channels_last, stream=place.streamed)
    seed_everything(lead.training_seed)  # the group's dropout generator
    fused = place_model(fuse(models), device, lead.runtime.channels_last)
    loop = optimisation(fused, lead, batches, device)
    loop.history = [[] for _ in specs]
    return GroupLoop(list(specs), loop, batches)


@torch.no_grad()
def member_overflow(model: nn.Module, members: int) -> torch.Tensor:
    """``(members,)`` bool on the device, not synchronised: whether member ``m``'s slice of the
    fused network's gradients (``.grad``, fp16-scaled) holds an inf/NaN, i.e. whether it makes
    ``GradScaler`` skip the group's step. Each parameter's dim 0 is member-major (see
    :func:`pipeline.fusion.split_like`)."""
    sums = [p.grad.reshape(members, -1).abs().sum(1, dtype=torch.float32)
            for p in model.parameters() if p.grad is not None]
    return ~torch.isfinite(torch.stack(sums).sum(0))


def group_epoch(g: GroupLoop, epoch: int) -> tuple[list[float], list[float]]:
    """One pass over every member's batches of epoch ``epoch`` (1-based; each member's order and
    augmentation reseeded from its own seed and the epoch), one fused step per batch index. Reads
    the losses and accuracies (and with fp16 the overflow counts, into ``g.overflows`` /
    ``g.skipped``) back from the device once, at the end. Returns each member's ``(mean train
    loss, train accuracy)`` as two lists; a member whose loss was NaN/inf on any step has a
    non-finite mean."""
    loop, lead = g.loop, g.specs[0]
    loop.model.train()
    g.batches.set_epoch(epoch)
    members, steps = len(g.specs), len(g.batches)
    loss_sum = torch.zeros(members, device=loop.device)
    correct = torch.zeros(members, device=loop.device, dtype=torch.int64)
    overflow = torch.zeros(members + 1, device=loop.device, dtype=torch.int64)  # per member, then skipped steps

    def count_overflow() -> None:
        flags = member_overflow(loop.model, members)
        overflow[:members] += flags
        overflow[members] += flags.any()

    hook = count_overflow if loop.scaler is not None else None
    seen = 0
    bar = tqdm(g.batches, total=steps, desc=f"{g.name} epoch {epoch}/{loop.epochs}", leave=False,
               disable=None if lead.runtime.progress else True, mininterval=1.0, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        if lead.deadline is not None and time.time() > lead.deadline:
            raise DeadlineReached(f"{g.name}: the budget's deadline came in epoch {epoch}")
        _, logits = train_step(loop.net, loop.opt, x, y, lead.train.label_smoothing,
                               lead.runtime.channels_last, lead.precision, loop.scaler, hook)
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
    if hook is not None:
        counts = overflow.tolist()
        g.overflows, g.skipped = counts[:members], counts[members]
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
    loops = []
    for spec, raw_state, avg_state, history in zip(g.specs, raw_states, avg_states, loop.history):
        raw = fresh_model(spec, comp, loop.device, raw_state)
        average = loop.average.for_member(raw, avg_state) if loop.average is not None else None
        loops.append(TrainingLoop(raw, raw, None, None, None, loop.device, loop.epochs, loop.cycle, average,
                                  None, history, loop.start, loop.seconds_before))
    return loops


def group_states(g: GroupLoop, epoch: int, seconds: float) -> list[ResumeState]:
    """Every member's own end-of-epoch state (after ``epoch``), in order: its slice of the fused
    weights, of AdamW's per-parameter ``step`` / ``exp_avg`` / ``exp_avg_sq`` and of the EMA/SWA
    (:mod:`pipeline.fusion`); the group's schedule, RNG states and fp16 scaler; its history;
    ``seconds / M`` (the group's training wall time so far, shared). The format of a member
    trained alone: its ``resume.pt``."""
    full, n, net = loop_state(g.loop, "", epoch, seconds), len(g.specs), g.loop.model
    models, opts = split_like(net, n, full.model), split_optimizer(net, n, full.optimizer)
    avgs = split_like(net, n, full.average, "module.") if full.average is not None else [None] * n
    return [ResumeState(spec.cache_key, epoch, models[m], opts[m], full.scheduler, full.history[m], seconds / n,
                        full.rng, avgs[m], full.average_kind, full.grad_scaler) for m, spec in enumerate(g.specs)]


def load_group(g: GroupLoop, states: list[ResumeState]) -> None:
    """Continue the group from its members' states (one per member, in order, each written by
    :func:`group_states` in any grouping or by the member trained alone, all after the same
    epoch): fused and loaded like one member's (:func:`~pipeline.train.engine.apply_state`); the
    RNG states and schedule are the first member's, fp16's scaler the one of smallest scale, the
    seconds their sum. Raises ValueError when the states stopped after different epochs or
    average differently, KeyError / RuntimeError when one does not fit the group's network."""
    if len({s.epoch for s in states}) != 1 or len({s.average_kind for s in states}) != 1:
        raise ValueError("the members' states differ in epoch or weight average")
    net, first = g.loop.model, states[0]
    scalers = [s.grad_scaler for s in states if s.grad_scaler is not None]
    fused = ResumeState("", first.epoch, fuse_like(net, [s.model for s in states]),
                        fuse_optimizers(net, [s.optimizer for s in states]), first.scheduler,
                        [s.history for s in states], sum(s.seconds for s in states), first.rng,
                        fuse_like(net, [s.average for s in states], "module.") if first.average is not None else None,
                        first.average_kind, min(scalers, key=lambda d: d["scale"]) if scalers else None)
    apply_state(g.loop, fused, g.name)


def _leavers(g: GroupLoop, losses: list[float], epoch: int) -> dict[int, str]:
    """The members that leave after ``epoch`` (index -> one-line reason): a NaN/inf training loss,
    or with fp16 overflows on :data:`OVERFLOW_SHARE` of the steps of :data:`OVERFLOW_EPOCHS`
    epochs in a row (``g.streak`` updated). Logs fp16's skipped steps of the epoch, if any."""
    steps, out = len(g.batches), {}
    if g.loop.scaler is not None and g.skipped:
        who = ", ".join(f"{s.key} on {n}" for s, n in zip(g.specs, g.overflows) if n)
        log.warning("train: %s: epoch %d: %d of %d steps skipped for every member (fp16 gradients overflowed; "
                    "GradScaler skips the whole group's step): %s", g.name, epoch, g.skipped, steps, who)
    for m, spec in enumerate(g.specs):
        if not math.isfinite(losses[m]):
            out[m] = (f"{spec.key}: training loss became {losses[m]} in epoch {epoch} of a {g.name}; it left the "
                      f"group, the others went on, nothing was cached for it (try a lower train.lr)")
        elif g.loop.scaler is not None:
            g.streak[m] = g.streak[m] + 1 if g.overflows[m] >= OVERFLOW_SHARE * steps else 0
            if g.streak[m] >= OVERFLOW_EPOCHS:
                out[m] = (f"{spec.key}: its fp16 gradients overflowed on {OVERFLOW_SHARE:.0%} or more of the steps "
                          f"of epochs {epoch - OVERFLOW_EPOCHS + 1}-{epoch} ({g.overflows[m]} of {steps} in epoch "
                          f"{epoch}), skipping every member's step; it left the {g.name}, the others went on, "
                          f"nothing was cached for it (try train.precision=bf16 or fp32, or a lower train.lr)")
    return out


def _without(g: GroupLoop, comp: Competition, leave: dict[int, str], epoch: int,
             paths: dict[MemberKey, Path] | None) -> tuple[GroupLoop | None, list[MemberFailed]]:
    """The group rebuilt without the members ``leave`` names (each as a :class:`MemberFailed`,
    logged, its checkpoint removed) from the others' in-memory states after ``epoch``: a fresh
    fused network of theirs, loaded with :func:`load_group`; None when none is left."""
    failed = [MemberFailed(g.specs[m].key, epoch, reason) for m, reason in sorted(leave.items())]
    for f in failed:
        log.error("train: %s", f.reason)
        if paths is not None:
            paths[f.key].unlink(missing_ok=True)
    keep = [m for m in range(len(g.specs)) if m not in leave]
    if not keep:
        return None, failed
    states = group_states(g, epoch, g.loop.seconds_before)
    specs, device = [g.specs[m] for m in keep], g.loop.device
    net = place_model(fuse([fresh_model(s, comp, device) for s in specs]), device, specs[0].runtime.channels_last)
    batches = g.batches.subset(keep)
    new = GroupLoop(specs, optimisation(net, specs[0], batches, device), batches, streak=[g.streak[m] for m in keep])
    load_group(new, [states[m] for m in keep])
    new.loop.seconds_before = g.loop.seconds_before
    return new, failed


def fit_group(specs: list[FitSpec], comp: Competition, folds: np.ndarray, predict_test: bool = True,
              resume_paths: list[Path] | None = None, pseudo: list | None = None,
              on_epoch: Callable[[int, list[dict]], None] | None = None) -> list[FitResult | MemberFailed]:
    """Train ``specs`` (members of one model with identical settings) as one fused network; predict
    each member's fold (and the test set) with its split-out unfused model.

    ``on_epoch(epoch, records)`` is called after each epoch with the history record of every
    member still training in that group, in order. ``resume_paths``: each member's ``resume.pt``
    (``<member dir>/resume.pt``), written after every epoch (:func:`group_states`) and continued
    from when written for the member's cache key, alone or in any group; members stopped after
    different epochs train as one group per epoch, one after the other (see the module docstring).

    Returns one entry per spec, in order: a :class:`~pipeline.train.engine.FitResult` (its
    ``model`` an ordinary unfused model, the averaged weights with EMA/SWA; its ``metrics`` the
    member's ``metrics.json`` with ``seconds`` its share of its group's and a ``fused`` record:
    ``members``, ``group_seconds``, ``group``), or a :class:`MemberFailed` for a member whose
    training diverged (it left its group, its resume path removed). Resume paths of the others
    stay (the caller removes each once the member's files are written).

    Raises:
        PipelineError: the members' batch counts differ.
        DeadlineReached: the members' ``deadline`` (``budget=``) came; each member's last
            end-of-epoch checkpoint stays.
        ConfigError: the batch size exceeds a fold's training rows.
    """
    paths = dict(zip((s.key for s in specs), resume_paths)) if resume_paths is not None else None
    rows = dict(zip((s.key for s in specs), pseudo or [None] * len(specs)))
    states = [read_state(paths[s.key], s.cache_key, str(s.key)) if paths is not None and paths[s.key].exists()
              else None for s in specs]
    cohorts: dict[int, list[int]] = {}
    for i, state in enumerate(states):
        cohorts.setdefault(state.epoch if state is not None else 0, []).append(i)
    if len(cohorts) > 1:
        log.info("train: %s: its members continue from different epochs (%s); they train as %d groups",
                 specs[0].key.model, "; ".join(f"after epoch {e}: {', '.join(str(specs[i].key) for i in c)}"
                                               for e, c in cohorts.items()), len(cohorts))
    results: dict[MemberKey, FitResult | MemberFailed] = {}
    for cohort in cohorts.values():
        results |= _fit_cohort([specs[i] for i in cohort], [states[i] for i in cohort], comp, folds,
                               predict_test, paths, rows, on_epoch)
    return [results[s.key] for s in specs]


def _fit_cohort(specs: list[FitSpec], states: list, comp: Competition, folds: np.ndarray, predict_test: bool,
                paths: dict | None, rows: dict, on_epoch) -> dict[MemberKey, FitResult | MemberFailed]:
    """:func:`fit_group` of members whose states (or None: fresh) stopped after the same epoch."""
    t0 = time.perf_counter()
    g = setup_group(specs, comp, folds, [rows[s.key] for s in specs])
    if states[0] is not None:
        try:
            load_group(g, states)
            log.info("train: %s: resuming after epoch %d/%d (each member's resume.pt)", g.name, states[0].epoch,
                     g.loop.epochs)
        except _STATE_ERRORS as e:
            log.warning("train: %s: ignoring its members' resume states, which do not fit it (%s: %s); "
                        "starting over", g.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            g = setup_group(specs, comp, folds, [rows[s.key] for s in specs])
    g, loops, views, failed = run_epochs(g, comp, folds, t0, on_epoch, paths, len(comp.x_test) if predict_test else 0)
    out: dict[MemberKey, FitResult | MemberFailed] = {f.key: f for f in failed}
    if g is None:
        return out
    wall = g.loop.seconds_before + time.perf_counter() - t0
    for spec, member, view in zip(g.specs, loops, views):
        val = np.flatnonzero(folds == spec.key.fold)
        test = average_views(predict_member(member, spec, comp.x_test, tta=True)) if predict_test else None
        metrics = member_metrics(member, spec, view, Rows(comp.x_train, val), comp.y_train[val], t0)
        metrics |= {"seconds": wall / len(g.specs), "n_train": int((folds != spec.key.fold).sum()),
                    "n_val": int(len(val)), "n_pseudo": int(len(rows[spec.key].rows)) if rows[spec.key] is not None else 0,
                    "fused": {"members": len(g.specs), "group_seconds": wall, "group": [str(s.key) for s in g.specs]}}
        weights = member.average.module if member.average is not None else member.model
        out[spec.key] = FitResult(weights, average_views(view), val.astype(np.int64), test, metrics)
    return out


def seconds_per_group(specs: list[FitSpec], comp: Competition, folds: np.ndarray, steps: int = 5,
                      warmup: int = 2, pseudo: list | None = None,
                      after_warmup: Callable[[], None] | None = None) -> float:
    """Seconds the fused training of ``specs`` takes here: ``steps`` real fused steps (after
    ``warmup``) on its device, times the steps of its planned epochs (validation excluded), as
    :func:`~pipeline.train.engine.seconds_per_member` times one member. Nothing is written."""
    g = setup_group(specs, comp, folds, pseudo)
    loop, lead = g.loop, g.specs[0]
    loop.model.train()
    it = iter(g.batches)

    def step() -> None:
        x, y = next(it)
        train_step(loop.net, loop.opt, x, y, lead.train.label_smoothing, lead.runtime.channels_last,
                   lead.precision, loop.scaler)

    steps_per_epoch = len(g.batches)
    per_step = seconds_per_step(step, loop.device, min(steps_per_epoch, warmup + steps), warmup, after_warmup)
    return per_step * steps_per_epoch * loop.epochs
