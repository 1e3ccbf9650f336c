"""The typed, frozen settings of a run, derived once from its prepared config.

:func:`run_settings` checks every group and every model (the global ``train`` / ``aug`` / ``tta``
groups with the model's overrides merged) and returns a :class:`RunSettings`; the workspace holds
it, so a stage, a worker or the cache key reads a model's settings from there instead of deriving
them from the config again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.paths import Paths
from pipeline.settings import (GROUPS, AugSettings, BlendSettings, DataSettings, FoldsSettings, PredictSettings,
                               PseudoSettings, RuntimeSettings, ScreenSettings, TrainSettings, TTASettings, TuneSettings,
                               aug_settings, checked, plan_ranges, round_base, seed_count, train_settings,
                               tta_settings)
from pipeline.budget import Plan, Range, parse_budget


def plain(obj: Any) -> Any:
    """A settings dataclass (or anything inside one) as plain YAML/JSON data (enums as values)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class ModelSettings:
    """What is learned for one model, whatever the fold: checked, merged over the global groups.

    Attributes:
        kwargs: the architecture's keyword arguments (plain data).
        seed_count: seeds per fold (``models.<name>.seeds`` or ``seeds``).
        base: the first-round model when this is a pseudo-label round, else None.
    """

    name: str
    arch: str
    kwargs: Mapping[str, Any]
    train: TrainSettings
    aug: AugSettings
    tta: TTASettings
    seed_count: int
    base: str | None = None
    ranges: Range | None = None  # what budget= may plan (pipeline.budget)

    def learned(self) -> dict:
        """``arch``, ``kwargs``, ``train``, ``aug`` and ``tta`` as plain data: the model's part of
        each member's cache key (and the values a tuning search space may set)."""
        return {"arch": self.arch, "kwargs": plain(self.kwargs), "train": plain(self.train),
                "aug": plain(self.aug), "tta": plain(self.tta)}


@dataclass(frozen=True)
class RunSettings:
    """Every checked group of a run and every model's settings.

    Attributes:
        base_seed: the run's ``seed``; each member's training seed hashes it with its key.
    """

    models: Mapping[str, ModelSettings]
    runtime: RuntimeSettings
    data: DataSettings
    folds: FoldsSettings
    blend: BlendSettings
    pseudo: PseudoSettings
    tune: TuneSettings
    predict: PredictSettings
    base_seed: int
    budget: float | None = None  # budget= in seconds (pipeline.budget), None = no budget
    screen: ScreenSettings = field(default_factory=ScreenSettings)  # the recipe's screening (pipeline.screen)
    paths: Paths | None = None  # every location the run reads and writes (paths group)
    # the run's entry (time.time()), from which budget= counts: when these settings were derived,
    # or the command's start that run.py passes (pipeline.stages.run_stage)
    started: float = field(default_factory=time.time, compare=False)

    def planned(self, plan: Plan, complete: Mapping[str, int] | None = None) -> "RunSettings":
        """These settings with ``plan``'s seeds and epochs for its models (``train.min_steps`` off:
        the plan sets the epochs exactly); with ``complete`` (model -> its complete seeds, after a
        budgeted training) the seed counts are those, 0 for a model with none."""
        models = dict(self.models)
        for p in plan.models:
            m = models[p.model]
            seeds = p.seeds if complete is None else int(complete.get(p.model, 0))
            models[p.model] = dataclasses.replace(
                m, seed_count=seeds, train=dataclasses.replace(m.train, epochs=p.epochs, min_steps=0))
        planned = {p.model for p in plan.models}
        for name, seeds in (complete or {}).items():  # models the plan left out (pseudo-label rounds)
            if name not in planned and name in models:
                models[name] = dataclasses.replace(models[name], seed_count=int(seeds))
        return dataclasses.replace(self, models=models)


def model_settings(cfg: DictConfig, name: str) -> ModelSettings:
    """The checked settings of model ``name``. Raises ConfigError for a bad value (naming
    ``models.<name>.<group>.<key>``) or an unknown model."""
    if name not in cfg.models:
        raise ConfigError(f"unknown model '{name}'; known models: {', '.join(sorted(cfg.models))}")
    node = cfg.models[name]
    kw = node.get("kwargs")
    kwargs = OmegaConf.to_container(kw, resolve=True) if isinstance(kw, DictConfig) else dict(kw or {})
    train, seeds = train_settings(cfg, name), seed_count(cfg, name)
    e_lo, e_hi, s_lo, s_hi = plan_ranges(cfg, name, train.epochs, seeds)
    ranges = Range(e_lo, min(max(train.epochs, e_lo), e_hi), e_hi, s_lo, s_hi)
    return ModelSettings(name, str(node.get("arch")), kwargs, train, aug_settings(cfg, name),
                         tta_settings(cfg, name), seeds, round_base(cfg, name), ranges)


def run_settings(cfg: DictConfig) -> RunSettings:
    """The typed settings of the prepared config ``cfg`` (:func:`pipeline.config.prepare`).

    Raises:
        ConfigError: the first bad setting, one line naming the key and what was expected.
    """
    groups = {g: checked(schema, cfg[g], g) for g, schema in GROUPS.items()}
    models = {str(n): model_settings(cfg, str(n)) for n in cfg.models}
    try:
        base_seed = int(cfg.get("seed", 42))
    except (TypeError, ValueError):
        raise ConfigError(f"seed={cfg.get('seed')}: expected an integer") from None
    return RunSettings(models, groups["runtime"], groups["data"], groups["folds"], groups["blend"],
                       groups["pseudo"], groups["tune"], groups["predict"], base_seed, parse_budget(cfg.get("budget")),
                       groups["screen"], paths=Paths.from_cfg(cfg))
