"""The learning-rate schedule of a member's training and the average of its weights.

A member trains with AdamW on a one-cycle schedule (Smith & Topin 2017, ``OneCycleLR``) and may
predict with an average of its weights instead of the last ones: an exponential moving average
(``train.ema``; timm's ``ModelEmaV3`` with warm-up) or stochastic weight averaging (``train.swa``;
Izmailov et al. 2018, ``torch.optim.swa_utils.AveragedModel``). For SWA the one-cycle schedule is
compressed into the epochs before the averaged ones and ends at ``train.swa_lr_scale * lr``, which
is then held while the weights of every step are averaged uniformly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn as nn

from pipeline.errors import ConfigError
from pipeline.settings import TrainSettings

DIV_FACTOR = 25.0  # OneCycleLR's: the schedule starts at lr / 25


class AverageKind(str, Enum):
    """Which average of the weights a member predicts with; also its key in ``metrics.json``
    and in the resume checkpoint."""

    ema = "ema"
    swa = "swa"


def swa_epochs(train: TrainSettings, epochs: int, where: str = "train") -> int:
    """The final epochs whose weights SWA averages: ``ceil(train.swa * epochs)``, 0 when off.

    Raises:
        ConfigError: that leaves no epoch before averaging starts (e.g. one epoch in all),
            naming ``<where>.swa``.
    """
    if not train.swa:
        return 0
    n = math.ceil(train.swa * epochs)
    if n >= epochs:
        raise ConfigError(f"{where}.swa={train.swa}: averages {n} of the {epochs} epochs; expected at "
                          f"least one epoch before averaging starts (lower swa or raise train.epochs)")
    return n


def one_cycle(opt: torch.optim.Optimizer, train: TrainSettings, cycle_steps: int,
              for_swa: bool) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule over ``cycle_steps`` optimizer steps, peaking at each parameter
    group's ``lr`` as the optimizer was built (``train.lr``; layer-wise decayed below a pretrained
    backbone's head, :func:`pipeline.models.parameter_groups`) after
    ``train.warmup_frac`` of them; it ends at ``lr / 25 / 1e4`` (OneCycleLR's default), or at
    ``train.swa_lr_scale * lr`` when ``for_swa`` (the SWA learning rate, held afterwards)."""
    end = {"final_div_factor": 1.0 / (DIV_FACTOR * train.swa_lr_scale)} if for_swa else {}
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=cycle_steps,
                                               pct_start=train.warmup_frac, div_factor=DIV_FACTOR, **end)


@torch.no_grad()
def swa_update(average: nn.Module, model: nn.Module, n_before: int) -> None:
    """Fold ``model``'s parameters and buffers into SWA's running mean ``average``
    (``AveragedModel(model, use_buffers=True)``), which holds the mean of ``n_before`` snapshots:
    the first snapshot is copied; floating tensors then move ``1 / (n_before + 1)`` of the way
    (one multi-tensor ``lerp`` per device and dtype); integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied, not averaged.

    Replaces ``AveragedModel.update_parameters``, whose default multi-tensor path on CUDA fails on
    the int64 buffers at the second update ("Integer division with addcdiv is no longer
    supported") and which reads its step count back to the host twice per call. ``n_before``
    is known on the host (optimizer steps past the one-cycle phase), so no step syncs.
    """
    pairs = list(zip([*average.module.parameters(), *average.module.buffers()],
                     [*model.parameters(), *model.buffers()], strict=True))
    floats = [(a, m) for a, m in pairs if a.is_floating_point()]
    for a, m in pairs if n_before == 0 else [(a, m) for a, m in pairs if not a.is_floating_point()]:
        a.copy_(m)
    if n_before > 0 and floats:
        torch._foreach_lerp_([a for a, _ in floats], [m for _, m in floats], 1.0 / (n_before + 1))
    average.n_averaged += 1


@dataclass
class WeightAverage:
    """The average of a member's weights during its training.

    Attributes:
        kind: EMA or SWA.
        average: timm ``ModelEmaV3`` or torch ``AveragedModel``; ``.module`` is the averaged net.
        after: SWA averages the weights after each optimizer step past this many (the one-cycle
            steps); 0 for the EMA, which follows every step.
    """

    kind: AverageKind
    average: nn.Module
    after: int = 0

    @classmethod
    def create(cls, model: nn.Module, train: TrainSettings, cycle_steps: int) -> WeightAverage | None:
        """The average ``train`` asks for (``ema`` or ``swa``, not both: the settings check that),
        of ``model`` (not a ``torch.compile`` wrapper), or None."""
        if train.ema:
            from timm.utils import ModelEmaV3

            return cls(AverageKind.ema, ModelEmaV3(model, decay=train.ema, use_warmup=True))
        if train.swa:
            from torch.optim.swa_utils import AveragedModel

            # BatchNorm statistics are averaged with the weights (no extra pass to recompute them)
            return cls(AverageKind.swa, AveragedModel(model, use_buffers=True), cycle_steps)
        return None

    @property
    def module(self) -> nn.Module:
        """The averaged network."""
        return self.average.module

    @property
    def ready(self) -> bool:
        """Whether the average holds any weights yet (SWA: once a step has been averaged)."""
        return self.kind is AverageKind.ema or int(self.average.n_averaged) > 0

    def update(self, model: nn.Module, step: int) -> None:
        """Fold in ``model``'s weights after optimizer step ``step`` (1-based, over all epochs)."""
        if self.kind is AverageKind.ema:
            self.average.update(model, step=step)  # the decay ramps up over the first steps
        elif step > self.after:
            swa_update(self.average, model, step - self.after - 1)

    def for_member(self, model: nn.Module, state: dict) -> WeightAverage:
        """This average's counterpart for one member of a fused group: the same kind over the
        member's unfused ``model``, holding ``state`` (the member's slice of the averaged fused
        weights, :func:`pipeline.fusion.split`) and, for SWA, the group's snapshot count."""
        if self.kind is AverageKind.ema:
            from timm.utils import ModelEmaV3

            twin = ModelEmaV3(model, decay=self.average.decay, use_warmup=True)
        else:
            from torch.optim.swa_utils import AveragedModel

            twin = AveragedModel(model, use_buffers=True)
            twin.n_averaged.copy_(self.average.n_averaged)
        twin.module.load_state_dict(state)
        return WeightAverage(self.kind, twin, self.after)

    def describe(self, train: TrainSettings, epochs: int) -> dict:
        """Its settings for ``metrics.json`` (beside the raw weights' scores)."""
        if self.kind is AverageKind.ema:
            return {"decay": train.ema}
        return {"fraction": train.swa, "epochs": swa_epochs(train, epochs),
                "steps": int(self.average.n_averaged), "lr_scale": train.swa_lr_scale}
