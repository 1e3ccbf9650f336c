"""Training numerics: one step, prediction, batches, and the one epoch loop of a unit of training.

A unit is M members that train together (:class:`Unit`): a member alone (:class:`MemberUnit`) or
a fused group of a model's members (:class:`pipeline.train.fused.GroupLoop`); :func:`run_epochs`
trains either. The fit loop trains a member on every fold but its own with AdamW and a one-cycle
LR schedule (Smith & Topin 2017, ``OneCycleLR``), validates on its fold after every ``runtime.val_every``-th
epoch and after the last, and keeps the final-epoch weights (no early stopping on the OOF fold, so
the OOF score stays honest), or an average of the weights, EMA or SWA
(:mod:`pipeline.train.averaging`). With a resume path it checkpoints every epoch
(:mod:`pipeline.train.resume`) and continues from there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.data import Competition
from pipeline.errors import ConfigError, PipelineError
from pipeline import members
from pipeline.metrics import score
from pipeline.models import create_model, freeze, parameter_groups
from pipeline.runsettings import ModelSettings
from pipeline.settings import (AugSettings, FitMethod, HeadInit, Metric, Precision, RuntimeSettings, TrainSettings,
                               Sampler, TTASettings)
from pipeline.train.averaging import WeightAverage, one_cycle, swa_epochs
from pipeline.train import probe, topstages
from pipeline.train.batches import Rows, make_batches, set_epoch, training_set
from pipeline.augment import tta_views
from pipeline.train.inference import average_views, place_model, predict_probs, predict_view_probs
from pipeline.members import MemberKey
from pipeline.train.resume import ResumeState, read_state, rng_state, set_rng_state
from pipeline.device import (ImagePlacement, autocast, configure_numerics, device_name, grad_scaler, image_placement,
                             peak_memory_mb, resolve_precision, select_device, use_device)
from pipeline.train.runtime import fold_jobs, num_workers, seed_everything

log = logging.getLogger(__name__)


class DeadlineReached(Exception):
    """Training stopped at the budget's deadline (``budget=``); the last end-of-epoch checkpoint
    stays, so the same command with a larger budget continues from it."""


INFERENCE_COST = 1 / 3  # unmeasured (no budget's probe): an image's prediction at a third of its training step


def check_deadline(deadline: float | None, train_seconds: float, train_images: int, predict_images: int,
                   what: str, per_image: float | None = None) -> None:
    """After an epoch whose training took ``train_seconds`` (its validation excluded): raise
    :class:`DeadlineReached` unless the work left before the member is done, one more epoch's
    training (with 10% margin) and ``predict_images`` predicted images (each test-time view
    counted: the next epoch's validation when it validates, the final prediction of the fold and
    the test set; :func:`images_left`), ends before ``deadline`` (``time.time()``; None: no
    deadline). ``per_image``: seconds to predict one image, timed by the budget's probe
    (:attr:`FitSpec.predict_seconds_per_image`); None: :data:`INFERENCE_COST` of a training image
    (``train_seconds / train_images``)."""
    if deadline is None:
        return
    rate = per_image if per_image is not None else INFERENCE_COST * train_seconds / max(1, train_images)
    if time.time() + 1.1 * train_seconds + rate * predict_images > deadline:
        raise DeadlineReached(f"{what}: the next epoch would end after the budget's deadline")


def images_left(epoch: int, epochs: int, val_every: int, n_val: int, n_test: int, views: int) -> int:
    """Images a member still predicts after epoch ``epoch`` of ``epochs`` (each test-time view
    counted), what :func:`check_deadline` counts: the next epoch's validation of its ``n_val``
    fold rows when that epoch validates before the last (every ``val_every``-th), then the final
    prediction of the fold and ``n_test`` test images in ``views`` views."""
    upcoming = epoch + 1
    validation = n_val if upcoming < epochs and upcoming % val_every == 0 else 0
    return validation + views * (n_val + n_test)


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes,)`` float32 cross-entropy weights for the training labels ``y`` ``(N,)``
    int64: inverse class frequency, ``N / (num_classes x n_c)`` (1 for a class with no row), so
    that every class weighs as much in the loss as in a balanced set (``train.class_weight``;
    scikit-learn's ``class_weight="balanced"``)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 1.0)
    return w.astype(np.float32)


def member_losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (in fp32) of one member's ``(B, C)`` logits, shape ``(1,)``, or of a fused
    group's ``(B, M, C)`` logits (:mod:`pipeline.fusion`), shape ``(M,)``: each member's mean over
    its own batch, so the sum of a group's losses gives every member the gradients it would get
    alone. ``y``: ``(B,)`` / ``(B, M)`` int64 classes, or ``(B, C)`` / ``(B, M, C)`` float32
    target probabilities. ``weight``: ``(C,)`` float32 class weights of one member
    (:func:`class_weights`; a fused group trains none)."""
    if logits.ndim == 2:
        return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=label_smoothing).reshape(1)
    target = y.transpose(1, 2) if y.ndim == 3 else y
    per_row = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none",
                              label_smoothing=label_smoothing)  # (B, M)
    return per_row.mean(0)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float = 0.0, channels_last: bool = False,
               precision: Precision = Precision.fp32, scaler: torch.amp.GradScaler | None = None,
               after_backward: Callable[[], None] | None = None, weight: torch.Tensor | None = None):
    """One optimizer step on a batch: autocast in the resolved ``precision``
    (:func:`~pipeline.device.resolve_precision`), the loss in fp32; with ``scaler`` (fp16)
    the loss is scaled before the backward pass and the step skipped on inf/NaN gradients.
    ``after_backward()`` runs between the backward pass and the step (the gradients, scaled with
    fp16, are in ``.grad``); a fused group counts its members' overflows there.

    Args:
        x: ``(B, C, S, S)`` float32 on the model's device; y: ``(B,)`` int64 class indices, or
            ``(B, C)`` float32 target probabilities (soft pseudo-labels). For a fused group
            (:mod:`pipeline.fusion`) ``x`` is ``(B, M x C, S, S)`` and ``y`` ``(B, M)`` /
            ``(B, M, C)``; the loss is the sum of the members' (:func:`member_losses`).
        weight: ``(C,)`` float32 class weights of the loss (``train.class_weight``), or None.
    Returns:
        ``(loss, logits)``: the scalar loss tensor and ``(B, classes)`` (fused: ``(B, M, classes)``)
        logits (not synchronised).
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, precision):
        logits = model(x)
        loss = member_losses(logits, y, label_smoothing, weight).sum()
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        scaler.step(opt)
        scaler.update()
    return loss, logits


# --------------------------------------------------------------------------- one member


@dataclass
class FitSpec:
    """Everything one member's training needs, resolved once from the config.

    Attributes:
        cache_key: the member's ``config.yaml`` text; a resume checkpoint must match it.
    """

    key: MemberKey
    arch: str
    kwargs: dict
    train: TrainSettings
    aug: AugSettings
    tta: TTASettings
    runtime: RuntimeSettings
    training_seed: int  # the member's seed (pipeline.members.training_seed)
    cache_key: str
    precision: Precision = Precision.fp32  # resolved for the training device (never auto)
    deadline: float | None = None  # time.time() by which training stops (budget=), None = none
    predict_seconds_per_image: float | None = None  # timed by the probe (budget=); None: INFERENCE_COST
    features_dir: Path | None = None  # a linear probe's feature cache (artifacts/features/); None: in memory
    metric: Metric = Metric.log_loss  # data.metric: what picks a linear probe's regularisation

    @classmethod
    def create(cls, model: ModelSettings, runtime: RuntimeSettings, key: MemberKey,
               member_cfg: dict, deadline: float | None = None,
               predict_seconds_per_image: float | None = None, features_dir: Path | None = None) -> "FitSpec":
        """The spec of member ``key`` of ``model`` (the run's typed settings,
        :class:`pipeline.runsettings.ModelSettings`), whose cache key is ``member_cfg`` (it holds the
        resolved precision, :meth:`pipeline.workspace.Workspace.member_config`), run with ``runtime``
        and stopped at ``deadline`` (:func:`check_deadline`, its predictions counted at
        ``predict_seconds_per_image`` seconds per image in one view, when timed); a linear probe
        caches its features in ``features_dir`` and picks its regularisation by the metric its cache
        key names (``probe_metric``, :func:`pipeline.members.member_config`)."""
        precision = resolve_precision(member_cfg["train"]["precision"], select_device(runtime.device))
        return cls(key, model.arch, dict(model.kwargs), model.train, model.aug, model.tta, runtime,
                   int(member_cfg["seed"]), members.key_text(member_cfg), precision, deadline,
                   predict_seconds_per_image, features_dir, Metric(member_cfg.get("probe_metric", "log_loss")))


@dataclass
class FitResult:
    """What :func:`fit_member` learned.

    Attributes:
        model: the trained ``nn.Module`` (on the training device).
        oof: ``(n_val, C)`` float32 OOF probabilities; ``row_ids``: ``(n_val,)`` int64 train rows.
        test: ``(M, C)`` float32 test probabilities, or ``None`` when not asked for.
        metrics: the ``metrics.json`` dict.
    """

    model: nn.Module
    oof: np.ndarray
    row_ids: np.ndarray
    test: np.ndarray | None
    metrics: dict


EpochCallback = Callable[[int, dict], None]


@dataclass
class TrainingLoop:
    """The live state of one member's training."""

    model: nn.Module
    net: nn.Module  # the model, or its torch.compile wrapper (shares the weights)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    batches: object
    device: torch.device
    epochs: int  # planned_epochs
    cycle: int  # the one-cycle schedule's optimizer steps (all of them without SWA)
    average: WeightAverage | None = None  # EMA or SWA of the weights
    scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler
    history: list = field(default_factory=list)
    start: int = 1
    seconds_before: float = 0.0  # training time before a resume
    class_weight: torch.Tensor | None = None  # (classes,) float32 loss weights (train.class_weight)

    @property
    def predictor(self) -> nn.Module:
        """What the member predicts with: the averaged weights once there are any, else the model."""
        return self.average.module if self.average is not None and self.average.ready else self.net


def planned_epochs(train: TrainSettings, steps_per_epoch: int) -> int:
    """The epochs a member trains: ``train.epochs``, raised so that the run makes at least
    ``train.min_steps`` optimizer steps of ``steps_per_epoch`` each (a competition of a thousand
    images gives a few steps per epoch, too few for a CNN to learn in a digits-sized epoch count)."""
    return max(train.epochs, math.ceil(train.min_steps / max(1, steps_per_epoch)))


def member_parts(spec: FitSpec, comp: Competition, tr_idx: np.ndarray, device: torch.device,
                 pseudo=None) -> tuple[object, nn.Module]:
    """One member's training batches over the rows ``tr_idx`` (and ``pseudo`` rows) and its
    freshly initialised model placed on ``device``, both drawn from its seed alone (the global RNGs
    reseeded with ``spec.training_seed`` first): a member trained alone and the same member in a
    fused group (:mod:`pipeline.train.fused`) start from the same weights and draw the same
    batches. Raises ConfigError when the batch size exceeds the rows."""
    seed_everything(spec.training_seed)
    data = training_set(comp, tr_idx, pseudo)
    place = placement(spec, comp, len(data.rows), device)
    (log.info if place.streamed else log.debug)("train: %s: %s", spec.key, place.describe())
    batches = make_batches(data, spec.train.batch_size, device, spec.aug, spec.training_seed,
                           num_workers(spec.runtime.num_workers, device), stream=place.streamed,
                           balanced=spec.train.sampler is Sampler.balanced)
    if len(batches) == 0:
        raise ConfigError(f"{spec.key}: train.batch_size={spec.train.batch_size} is larger than the "
                          f"{len(data.rows)} training rows of the fold")
    return batches, member_model(spec, comp, device)


def placement(spec: FitSpec, comp: Competition, rows: int, device: torch.device) -> ImagePlacement:
    """Where a member's ``rows`` training images of ``comp`` live (``runtime.stream``,
    :func:`pipeline.device.image_placement`): its share of the device's memory is
    ``runtime.memory_share`` of what is available, divided by the members training side by side
    on that device (``runtime.fold_jobs``)."""
    jobs = fold_jobs(spec.runtime.fold_jobs, device, 1 << 30)
    per_device = math.ceil(jobs / max(1, torch.cuda.device_count() if device.type == "cuda" and device.index is None
                                      else 1))
    image_bytes = rows * int(np.prod(comp.x_train.shape[1:])) * comp.x_train.dtype.itemsize
    return image_placement(image_bytes, device, spec.runtime.stream, spec.runtime.memory_share, per_device)


def member_model(spec: FitSpec, comp: Competition, device: torch.device) -> nn.Module:
    """A freshly initialised model of ``spec``'s architecture for ``comp`` (its classes, channels
    and side), placed on ``device`` (:func:`~pipeline.train.inference.place_model`); its initial
    weights are drawn from torch's global generator (seeded by the caller with the member's seed)."""
    return place_model(create_model(spec.arch, comp.num_classes, comp.x_train.shape[1], comp.side, **spec.kwargs),
                       device, spec.runtime.channels_last)


def fresh_model(spec: FitSpec, comp: Competition, device: torch.device, state: dict | None = None) -> nn.Module:
    """:func:`member_model` holding ``state`` (if any), its random init drawn from a forked
    generator, so that it moves none of the seeded draws around it (a split-out member of a
    fused group, a throw-away model timed by the estimate)."""
    with torch.random.fork_rng(devices=[]):
        model = member_model(spec, comp, device)
    if state is not None:
        model.load_state_dict(state)
    return model


def setup_loop(spec: FitSpec, comp: Competition, tr_idx: np.ndarray, pseudo=None,
               init_head: bool = True) -> TrainingLoop:
    """The live state of one member's training on the rows ``tr_idx`` (and ``pseudo`` rows): its
    device made current and its numerics set (:func:`~pipeline.device.configure_numerics`),
    seeded, the model placed (and compiled with ``runtime.compile``), AdamW, the one-cycle
    schedule, the weight average and fp16's gradient scaler (:func:`optimisation`), and with
    ``train.class_weight`` the loss weights of the rows' classes (:func:`class_weights`). With
    ``train.head_init=probe`` (and ``init_head``) a pretrained backbone's classifier starts as the
    linear probe of the rows (:func:`pipeline.train.probe.init_head`). Raises ConfigError when the
    batch size exceeds the rows."""
    device = select_device(spec.runtime.device)
    use_device(device)
    configure_numerics(device, spec.precision, spec.runtime.deterministic)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches, model = member_parts(spec, comp, tr_idx, device, pseudo)
    if init_head and spec.train.head_init is HeadInit.probe:
        probe.init_head(model, spec, comp, tr_idx, device)
    loop = optimisation(model, spec, batches, device)
    if spec.train.class_weight:
        loop.class_weight = torch.from_numpy(class_weights(comp.y_train[tr_idx], comp.num_classes)).to(device)
    return loop


def adamw_options(device: torch.device) -> dict:
    """AdamW's implementation on ``device``: ``fused=True`` on CUDA (one kernel for all parameters,
    and it takes fp16's gradient scale and inf flag as device tensors, so ``GradScaler.step``
    never reads them back to the host), the multi-tensor ``foreach=True`` elsewhere (the CPU)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def optimisation(model: nn.Module, spec: FitSpec, batches, device: torch.device) -> TrainingLoop:
    """``model``'s training state for ``spec``'s settings over ``batches`` (one epoch's steps):
    the ``torch.compile`` wrapper with ``runtime.compile``, AdamW (:func:`adamw_options`; a
    pretrained backbone's layer groups at layer-wise decayed learning rates with
    ``train.layer_decay``, :func:`pipeline.models.parameter_groups`), the one-cycle schedule over
    :func:`planned_epochs` (compressed before SWA's epochs), the EMA / SWA and fp16's gradient
    scaler. The same for one member and for a fused group's network (every one of these acts per
    element, so fused members never mix). Raises ConfigError for a SWA fraction leaving no epoch."""
    t = spec.train
    net = torch.compile(model) if spec.runtime.compile else model
    groups = parameter_groups(model, t.lr, t.weight_decay, t.layer_decay)
    opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, **adamw_options(device))
    epochs = planned_epochs(t, len(batches))
    averaged = swa_epochs(t, epochs, f"models.{spec.key.model}.train")
    cycle = (epochs - averaged) * len(batches)
    sched = one_cycle(opt, t, cycle, for_swa=averaged > 0)
    average = WeightAverage.create(model, t, cycle)
    return TrainingLoop(model, net, opt, sched, batches, device, epochs, cycle, average,
                        grad_scaler(device, spec.precision))


def resume_from(loop: TrainingLoop, cache_key: str, what: str, path: Path) -> bool:
    """Continue ``loop`` (one member's) from the checkpoint at ``path`` when it was written for
    ``cache_key`` (by this member alone or as a member of a fused group). Returns False when the
    checkpoint did not fit after all (a state of another shape or kind): one warning line naming
    ``what``, and the caller starts over."""
    state = read_state(path, cache_key, what)
    if state is None:
        return True
    try:
        apply_state(loop, state, what)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        log.warning("train: %s: ignoring %s, which does not fit this member (%s: %s); starting over",
                    what, path, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    log.info("train: %s: resuming after epoch %d/%d (%s)", what, state.epoch, loop.epochs, path)
    return True


def apply_state(loop: TrainingLoop, state: ResumeState, what: str) -> None:
    """Load ``state`` into ``loop`` (weights, AdamW, schedule, weight average, fp16's scaler, RNG
    states, history, seconds) to continue after ``state.epoch``; a fused group's loop takes its
    members' states fused (:func:`pipeline.train.fused.load_group`). Raises KeyError / TypeError /
    ValueError / RuntimeError when the state does not fit ``loop`` (another shape or kind)."""
    loop.model.load_state_dict(state.model)
    load_optimizer(loop.opt, state.optimizer, loop.device)
    loop.sched.load_state_dict(state.scheduler)
    if loop.average is not None:
        if state.average_kind is not loop.average.kind or state.average is None:
            raise KeyError(f"no {loop.average.kind.value} weights in the state")
        loop.average.average.load_state_dict(state.average)
    if loop.scaler is not None and state.grad_scaler is not None:
        loop.scaler.load_state_dict(state.grad_scaler)
    set_rng_state(state.rng, loop.device, what)
    loop.history, loop.seconds_before = state.history, float(state.seconds)
    loop.start = int(state.epoch) + 1


def load_optimizer(opt: torch.optim.Optimizer, state: dict, device: torch.device) -> None:
    """``opt.load_state_dict(state)``, keeping this device's implementation
    (:func:`adamw_options`): a state written elsewhere (a CPU checkpoint resumed on CUDA) would
    otherwise bring its ``foreach`` / ``fused`` flags along, and ``step`` moves to the parameters'
    device when fused. Raises ValueError / KeyError when ``state`` is not one of ``opt``'s shape."""
    options = {"foreach": None, "fused": None} | adamw_options(device)
    groups = [{**group, **options} for group in state["param_groups"]]
    opt.load_state_dict({**state, "param_groups": groups})


def loop_state(loop: TrainingLoop, cache_key: str, epoch: int, seconds: float) -> ResumeState:
    """``loop``'s end-of-epoch state (after epoch ``epoch``; ``seconds``: training wall time so
    far), tensors and plain data only, referencing the live tensors (save or copy it before the
    next step)."""
    avg = loop.average
    return ResumeState(cache_key, epoch, loop.model.state_dict(), loop.opt.state_dict(), loop.sched.state_dict(),
                       loop.history, seconds, rng_state(loop.device),
                       avg.average.state_dict() if avg is not None else None, avg.kind if avg is not None else None,
                       loop.scaler.state_dict() if loop.scaler is not None else None)


def train_mode(model: nn.Module, spec: FitSpec, epoch: int) -> None:
    """``model`` in training mode for epoch ``epoch``: a pretrained backbone's head alone in the
    first ``train.freeze_epochs``, then all but its lowest ``train.frozen_layers``, its BatchNorm
    frozen with ``train.frozen_bn`` (:func:`pipeline.models.freeze`)."""
    model.train()
    freeze(model, epoch <= spec.train.freeze_epochs, spec.train.frozen_layers, spec.train.frozen_bn)


def train_epoch(loop: TrainingLoop, spec: FitSpec, epoch: int) -> tuple[float, float]:
    """One pass over the batches of epoch ``epoch`` (1-based; reseeded from it): the epoch
    function of ``stage=train``, the model set up for it by :func:`train_mode`. Reads the loss
    and accuracy back from the device once, at the end (and every 25 steps when a progress bar
    shows). Returns ``(mean train loss, train accuracy)``."""
    train_mode(loop.model, spec, epoch)
    set_epoch(loop.batches, spec.training_seed, epoch)
    loss_sum = torch.zeros((), device=loop.device)
    correct = torch.zeros((), device=loop.device, dtype=torch.int64)
    seen, steps = 0, len(loop.batches)
    bar = tqdm(loop.batches, desc=f"{spec.key} epoch {epoch}/{loop.epochs}", leave=False,
               disable=None if spec.runtime.progress else True, mininterval=1.0, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        if spec.deadline is not None and time.time() > spec.deadline:
            raise DeadlineReached(f"{spec.key}: the budget's deadline came in epoch {epoch}")
        x, y = x.to(loop.device, non_blocking=True), y.to(loop.device, non_blocking=True)
        loss, logits = train_step(loop.net, loop.opt, x, y, spec.train.label_smoothing,
                                  spec.runtime.channels_last, spec.precision, loop.scaler, weight=loop.class_weight)
        done = (epoch - 1) * steps + step + 1  # optimizer steps so far
        if done < loop.cycle:
            loop.sched.step()  # after the cycle its last learning rate is held (SWA)
        if loop.average is not None:
            loop.average.update(loop.model, done)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum()
        seen += len(y)
        if not bar.disable and (step % 25 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


def predict_member(loop: TrainingLoop, spec: FitSpec, images: np.ndarray, tta: bool = False,
             model: nn.Module | None = None) -> np.ndarray:
    """Probabilities of the member's predictor (EMA/SWA weights if any; or ``model``) for
    ``images`` ``(N, C, H, W)`` uint8: ``(N, classes)`` float32 without TTA (per-epoch
    validation), or ``(V, N, classes)`` per test-time view with it. Used by one member and by each
    split-out member of a fused group (:mod:`pipeline.train.fused`)."""
    model = loop.predictor if model is None else model
    if tta:
        return predict_view_probs(model, images, loop.device, spec.runtime, spec.precision, spec.tta)
    return predict_probs(model, images, loop.device, spec.runtime, spec.precision)


def epoch_record(epoch: int, train_loss: float, train_acc: float, val: np.ndarray | None,
                  y_val: np.ndarray, lr: float, seconds: float) -> dict:
    """One epoch's history record (``seconds`` of wall time); ``val_loss`` / ``val_acc`` only when
    the fold was validated (``val`` its ``(n_val, classes)`` probabilities, else None)."""
    record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "lr": lr, "seconds": seconds}
    if val is not None:
        s = score(y_val, val)
        record |= {"val_loss": s.log_loss, "val_acc": s.accuracy}
    return record


def seconds_per_member(spec: FitSpec, comp: Competition, folds: np.ndarray, steps: int = 5,
                       warmup: int = 2, pseudo=None, after_warmup: Callable[[], None] | None = None) -> float:
    """Seconds the training of ``spec`` takes here: ``steps`` real training steps (after
    ``warmup``) of its model, batches and augmentation on its device, times the steps of its
    :func:`planned_epochs` (validation excluded; ``pseudo`` rows counted). Trains a throw-away
    copy; nothing is written. ``after_warmup()`` runs between the warm-up and the timed steps
    (side-by-side probes wait there for each other, so that their timed steps overlap). A linear
    probe or a top-stages member: :func:`transfer_seconds`, with 1 / k of the frozen pass its folds
    share; the probe that starts a head with ``train.head_init=probe`` is added."""
    if spec.train.fit is not FitMethod.gradient:
        return transfer_seconds(spec, comp, folds, after_warmup).member(1 / max(2, len(np.unique(folds))))
    loop = setup_loop(spec, comp, np.flatnonzero(folds != spec.key.fold), pseudo, init_head=False)
    train_mode(loop.model, spec, spec.train.freeze_epochs + 1)  # the steady state: past any head-only epochs
    it = iter(loop.batches)

    def step() -> None:
        x, y = next(it)
        train_step(loop.net, loop.opt, x.to(loop.device), y.to(loop.device), spec.train.label_smoothing,
                   spec.runtime.channels_last, spec.precision, loop.scaler)

    per_step = seconds_per_step(step, loop.device, min(len(loop.batches), warmup + steps), warmup, after_warmup)
    head = probe.seconds_per_member(spec, comp, folds) if spec.train.head_init is HeadInit.probe else 0.0
    return per_step * len(loop.batches) * loop.epochs + head


def transfer_seconds(spec: FitSpec, comp: Competition, folds: np.ndarray,
                     after_warmup: Callable[[], None] | None = None) -> probe.TransferSeconds:
    """A linear probe's or a top-stages member's seconds here, its own work apart from the frozen
    pass that its model's folds and seeds share (:func:`pipeline.train.probe.transfer_seconds`,
    :func:`pipeline.train.topstages.transfer_seconds`; the scheduler computes that pass once,
    :func:`warm_cache`). ``after_warmup()`` runs first (side-by-side probes wait there for each
    other). Raises ConfigError for a network trained end to end (``train.fit=gradient``)."""
    if spec.train.fit is FitMethod.gradient:
        raise ConfigError(f"models.{spec.key.model}: train.fit=gradient has no frozen pass to price")
    if after_warmup is not None:
        after_warmup()
    if spec.train.fit is FitMethod.top_stages:
        return topstages.transfer_seconds(spec, comp, folds)
    return probe.transfer_seconds(spec, comp, folds)


def seconds_per_step(step: Callable[[], None], device: torch.device, n: int, warmup: int,
                     after_warmup: Callable[[], None] | None = None) -> float:
    """Mean seconds of ``step()`` over ``n`` calls after the first ``warmup`` (at least one timed),
    the device synchronised before and after the timed calls; ``after_warmup()`` runs just before
    them."""
    t0 = time.perf_counter()
    for i in range(n):
        if i == min(warmup, n - 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if after_warmup is not None:
                after_warmup()
            t0 = time.perf_counter()
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / max(1, n - min(warmup, n - 1))


def warm_cache(spec: FitSpec, comp: Competition) -> None:
    """Compute (or find) the cache that the folds of ``spec``'s model share: a linear probe's
    pooled features (:func:`pipeline.train.probe.cached_features`) or a top-stages member's
    activations (:func:`pipeline.train.topstages.cached_activations`) in ``spec.features_dir``;
    nothing for a network trained end to end. Raises ConfigError as those members do."""
    if spec.train.fit is FitMethod.gradient or spec.features_dir is None:
        return
    device = select_device(spec.runtime.device)
    use_device(device)
    configure_numerics(device, spec.precision, spec.runtime.deterministic)
    model = probe.backbone(spec, comp, device).eval()
    if spec.train.fit is FitMethod.linear_probe:
        probe.cached_features(spec, comp, model, device, spec.features_dir)
    else:
        topstages.cached_activations(spec, comp, model, device, spec.features_dir)


def _fit_top(spec: FitSpec, comp: Competition, folds: np.ndarray, on_epoch: EpochCallback | None,
             pseudo) -> FitResult:
    """A top-stages member (:func:`pipeline.train.topstages.fit_top`), stopped at ``spec.deadline``
    after an epoch as a network is (its predictions priced from its own steps). Raises ConfigError
    for a pseudo-label round."""
    if pseudo is not None:
        raise ConfigError(f"models.{spec.key.model}: a pseudo-label round of a top-stages member is not supported "
                          f"(train.fit=top_stages)")
    tr = np.flatnonzero(folds != spec.key.fold)
    weight = class_weights(comp.y_train[tr], comp.num_classes) if spec.train.class_weight else None
    return FitResult(*topstages.fit_top(
        spec, comp, folds, spec.features_dir, on_epoch,
        lambda seconds, images, left: check_deadline(spec.deadline, seconds, images, left, str(spec.key)), weight))


def fit_member(spec: FitSpec, comp: Competition, folds: np.ndarray,
               on_epoch: EpochCallback | None = None, predict_test: bool = True,
               resume_path: Path | None = None, pseudo=None) -> FitResult:
    """Train ``spec.key.model`` on every fold but ``spec.key.fold``; predict that fold (and the test set).

    ``on_epoch(epoch, record)`` is called after each epoch with its history record
    (``train_loss``, ``train_acc``, ``lr``, ``seconds``, and ``val_loss``, ``val_acc`` after the
    epochs validated on the fold: every ``runtime.val_every``-th and the last); it may raise to
    stop training (the tune stage prunes trials this way).

    With ``resume_path``, the end-of-epoch state (model, optimizer, LR scheduler, weight average,
    epoch, history, seconds so far, python/numpy/torch RNG states) is written there after every
    epoch, and training continues from it when it was written for the same cache key. Data order and
    augmentation are reseeded per epoch (:func:`set_epoch`), so on CPU with
    ``runtime.deterministic=true`` a resumed run gives the uninterrupted run's probabilities.

    With ``pseudo`` (:class:`pipeline.pseudo.PseudoRows` of this fold) its test rows train with
    their pseudo-labels beside the training rows; the validated fold is never among them.

    With ``train.fit=linear_probe`` the member is a linear probe of a frozen pretrained backbone
    (:func:`pipeline.train.probe.fit_probe`; no epochs, nothing to resume: its features are cached).

    Raises:
        PipelineError: the loss became NaN/inf (the resume checkpoint is removed).
        ConfigError: the batch size exceeds the fold's training rows; a linear probe of a network
            that is not pretrained, or with pseudo-labels.
        DeadlineReached: ``spec.deadline`` (``budget=``) came; the last end-of-epoch checkpoint
            stays (with ``resume_path``).
    """
    if spec.train.fit is FitMethod.linear_probe:
        if pseudo is not None:
            raise ConfigError(f"models.{spec.key.model}: a pseudo-label round of a linear probe is not supported "
                              f"(train.fit=linear_probe)")
        result = FitResult(*probe.fit_probe(spec, comp, folds, spec.features_dir))
        if on_epoch is not None:
            on_epoch(1, result.metrics["history"][0])
        return result
    if spec.train.fit is FitMethod.top_stages:
        return _fit_top(spec, comp, folds, on_epoch, pseudo)
    t0 = time.perf_counter()
    tr_idx, va_idx = np.flatnonzero(folds != spec.key.fold), np.flatnonzero(folds == spec.key.fold)
    loop = setup_loop(spec, comp, tr_idx, pseudo)
    if (resume_path is not None and resume_path.exists()
            and not resume_from(loop, spec.cache_key, str(spec.key), resume_path)):
        loop = setup_loop(spec, comp, tr_idx, pseudo)
    unit, _, views, failed = run_epochs(MemberUnit(spec, loop), comp, folds, t0,
                                        None if on_epoch is None else lambda e, records: on_epoch(e, records[0]),
                                        {spec.key: resume_path} if resume_path is not None else None,
                                        len(comp.x_test) if predict_test else 0)
    if unit is None:
        raise failed[0].error()
    views = views[0]
    test = average_views(predict_member(loop, spec, comp.x_test, tta=True)) if predict_test else None
    metrics = member_metrics(loop, spec, views, Rows(comp.x_train, va_idx), comp.y_train[va_idx], t0)
    metrics |= {"n_train": int(len(tr_idx)), "n_val": int(len(va_idx)),
                "n_pseudo": int(len(pseudo.rows)) if pseudo is not None else 0}
    weights = loop.average.module if loop.average is not None else loop.model  # not the compile wrapper
    return FitResult(weights, average_views(views), va_idx.astype(np.int64), test, metrics)


@dataclass(frozen=True)
class MemberFailed:
    """A member whose training diverged; the other members of its unit went on.

    Attributes:
        key: the member.
        epoch: the epoch (1-based) after which it left.
        reason: one line naming the member, the epoch and what to try (the message of
            :meth:`error`). Its ``resume.pt`` was removed; nothing of it is cached.
    """

    key: MemberKey
    epoch: int
    reason: str

    def error(self) -> PipelineError:
        """The project's one-line user error for it."""
        return PipelineError(self.reason)


class Unit(Protocol):
    """A unit of training: M members that train together, epoch by epoch, in :func:`run_epochs`.
    A member alone is a unit of one (:class:`MemberUnit`); a fused group of M members
    (:class:`pipeline.train.fused.GroupLoop`) is a unit of M. Lists are per member, in order."""

    specs: list[FitSpec]
    loop: TrainingLoop

    @property
    def name(self) -> str:
        """For log lines and errors."""

    @property
    def histories(self) -> list[list]:
        """Each member's epoch records so far (appended to in place)."""

    def train_epoch(self, epoch: int) -> tuple[list[float], list[float]]:
        """One epoch (1-based): each member's mean train loss (non-finite when it diverged) and accuracy."""

    def leavers(self, losses: list[float], epoch: int) -> dict[int, str]:
        """The members that must leave after ``epoch``: index -> one-line reason."""

    def without(self, comp: Competition, leave: dict[int, str], epoch: int,
                paths: dict[MemberKey, Path] | None) -> tuple["Unit | None", list[MemberFailed]]:
        """The unit without the members ``leave`` names (their checkpoints removed), None when none is left."""

    def validate(self, comp: Competition, val_rows: list[np.ndarray]) -> list[np.ndarray]:
        """Each member's ``(n_val, C)`` float32 probabilities of its validation rows, mid-training."""

    def split(self, comp: Competition) -> list[TrainingLoop]:
        """Each member as its own loop, which predicts exactly as its checkpoint will."""

    def states(self, epoch: int, seconds: float) -> list[ResumeState]:
        """Each member's own end-of-epoch state (its ``resume.pt``)."""


@dataclass
class MemberUnit:
    """A member trained alone: a :class:`Unit` of one (its network is the member's own)."""

    spec: FitSpec
    loop: TrainingLoop

    @property
    def specs(self) -> list[FitSpec]:
        return [self.spec]

    @property
    def name(self) -> str:
        return str(self.spec.key)

    @property
    def histories(self) -> list[list]:
        return [self.loop.history]

    def train_epoch(self, epoch: int) -> tuple[list[float], list[float]]:
        loss, acc = train_epoch(self.loop, self.spec, epoch)
        return [loss], [acc]

    def leavers(self, losses: list[float], epoch: int) -> dict[int, str]:
        if math.isfinite(losses[0]):
            return {}
        return {0: f"{self.spec.key}: training loss became {losses[0]} in epoch {epoch}; "
                   f"nothing was cached (try a lower train.lr)"}

    def without(self, comp, leave, epoch, paths):
        if paths is not None:
            paths[self.spec.key].unlink(missing_ok=True)
        return None, [MemberFailed(self.spec.key, epoch, leave[0])]

    def validate(self, comp: Competition, val_rows: list[np.ndarray]) -> list[np.ndarray]:
        return [predict_member(self.loop, self.spec, Rows(comp.x_train, val_rows[0]))]

    def split(self, comp: Competition) -> list[TrainingLoop]:
        return [self.loop]

    def states(self, epoch: int, seconds: float) -> list[ResumeState]:
        return [loop_state(self.loop, self.spec.cache_key, epoch, seconds)]


def run_epochs(unit: Unit, comp: Competition, folds: np.ndarray, t0: float,
               on_epoch: Callable[[int, list[dict]], None] | None, paths: dict[MemberKey, Path] | None,
               n_test: int = 0) -> tuple[Unit | None, list[TrainingLoop], list[np.ndarray], list[MemberFailed]]:
    """The one epoch loop: the epochs left of ``unit`` (a member alone or a fused group), each
    member's epoch recorded (validated every ``runtime.val_every``-th epoch and the last) and
    checkpointed to ``paths`` (each member's ``resume.pt``); ``on_epoch(epoch, records)`` after
    each, with the records of the members still training. A member that diverges leaves
    (:meth:`Unit.leavers`, :meth:`Unit.without`).

    Returns ``(unit, loops, views, failed)``: the unit that finished (None when no member did),
    its members' final loops (:meth:`Unit.split`), each one's final ``(V, n_val, C)`` OOF
    probabilities per test-time view, and the members that left. ``t0``: ``time.perf_counter()``
    at the fit's start (seconds are counted from it after the checkpoints' own).

    Raises:
        DeadlineReached: after an epoch's checkpoints, when the next epoch and the final
            predictions (the folds and ``n_test`` test images in every view) would end after the
            members' ``deadline``; or mid-epoch when the deadline came.
    """
    failed, loops, views, epoch = [], None, None, unit.loop.start
    while epoch <= unit.loop.epochs:
        te = time.perf_counter()
        losses, accs = unit.train_epoch(epoch)
        train_seconds = time.perf_counter() - te
        leave = unit.leavers(losses, epoch)
        if leave:
            keep = [m for m in range(len(losses)) if m not in leave]
            losses, accs = [losses[m] for m in keep], [accs[m] for m in keep]
            unit, gone = unit.without(comp, leave, epoch, paths)
            failed += gone
            if unit is None:
                return None, [], [], failed
        loop, lead = unit.loop, unit.specs[0]
        val_rows = [np.flatnonzero(folds == s.key.fold) for s in unit.specs]
        vals: list = [None] * len(unit.specs)
        if epoch == loop.epochs:
            loops, views = _final_views(unit, comp, folds)
            vals = [v[0] for v in views]
        elif epoch % lead.runtime.val_every == 0:
            vals = unit.validate(comp, val_rows)
        seconds, lr = time.perf_counter() - te, float(loop.sched.get_last_lr()[0])
        records = [epoch_record(epoch, losses[m], accs[m], vals[m], comp.y_train[val_rows[m]], lr, seconds)
                   for m in range(len(unit.specs))]
        for history, record in zip(unit.histories, records):
            history.append(record)
        if paths is not None:
            for spec, state in zip(unit.specs, unit.states(epoch, loop.seconds_before + time.perf_counter() - t0)):
                state.save(paths[spec.key])
        if on_epoch is not None:
            on_epoch(epoch, records)
        if epoch < loop.epochs:
            left = sum(images_left(epoch, loop.epochs, lead.runtime.val_every, len(rows), n_test,
                                   len(tta_views(lead.tta))) for rows in val_rows)
            check_deadline(lead.deadline, train_seconds, len(unit.specs) * len(loop.batches) * lead.train.batch_size,
                           left, unit.name, lead.predict_seconds_per_image)
        epoch += 1
    if views is None:  # resumed from checkpoints written after the last epoch
        loops, views = _final_views(unit, comp, folds)
    return unit, loops, views, failed


def _final_views(unit: Unit, comp: Competition, folds: np.ndarray) -> tuple[list[TrainingLoop], list[np.ndarray]]:
    """Each member of ``unit`` as its own loop and its ``(V, n_val, C)`` OOF probabilities per
    test-time view, predicted exactly as its checkpoint will predict them (``stage=predict``)."""
    loops = unit.split(comp)
    return loops, [predict_member(m, s, Rows(comp.x_train, np.flatnonzero(folds == s.key.fold)), tta=True)
                   for m, s in zip(loops, unit.specs)]


def member_metrics(loop: TrainingLoop, spec: FitSpec, views: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             t0: float) -> dict:
    """The member's ``metrics.json`` (:func:`pipeline.metrics.score` of its OOF probabilities, with
    and without TTA, and of its raw weights beside an EMA's or SWA's). ``views``: ``(V, n_val,
    classes)`` OOF probabilities per test-time view; ``seconds`` counted from ``t0``
    (``time.perf_counter()``) after the checkpoint's earlier seconds."""
    oof, plain = score(y_val, average_views(views)), score(y_val, views[0])
    metrics = {
        "model": spec.key.model, "fold": spec.key.fold, "seed_index": spec.key.seed_index,
        "accuracy": oof.accuracy, "log_loss": oof.log_loss,
        "epochs": loop.epochs, "seconds": loop.seconds_before + time.perf_counter() - t0,
        "device": device_name(loop.device), "precision": spec.precision.value,
        **peak_memory_mb(loop.device),
        "history": loop.history, "resumed_after_epoch": loop.start - 1 if loop.start > 1 else None,
        "tta": {"views": len(views), "accuracy_without": plain.accuracy, "log_loss_without": plain.log_loss},
    }
    if loop.average is not None:  # the EMA's or SWA's gain: the same member's raw weights, without TTA
        raw = score(y_val, predict_member(loop, spec, x_val, model=loop.net))
        metrics[loop.average.kind.value] = {**loop.average.describe(spec.train, loop.epochs),
                                            "accuracy_without": raw.accuracy, "log_loss_without": raw.log_loss}
    return metrics
