"""The typed, frozen settings of a run, derived once from its prepared config.

:func:`run_settings` checks every group and every model (the global ``train`` / ``aug`` / ``tta``
groups with the model's overrides merged) and returns a :class:`RunSettings`; the workspace holds
it, so a stage, a worker or the cache key reads a model's settings from there instead of deriving
them from the config again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from pipeline.choices import AugPreset, BlendMethod, Dim
from pipeline.errors import ConfigError
from pipeline.paths import Paths
from pipeline.settings import (GROUPS, AugSettings, BlendSettings, DataSettings, ExportSettings, FoldsSettings,
                               PredictSettings, PseudoSettings, RuntimeSettings, ScreenSettings, SubmitSettings,
                               TrainSettings, TTASettings, TuneSettings, aug_settings, blend_methods, blend_models,
                               checked, plan_ranges, pseudo_sources, round_base, screen_augs, screen_fixed, seed_count,
                               selected_folds, selected_models, train_settings, tta_settings, tune_folds)
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
    space: Mapping[str, Any] = field(default_factory=dict)  # models.<name>.space, plain (pipeline.tune.space)

    def learned(self) -> dict:
        """``arch``, ``kwargs``, ``train``, ``aug`` and ``tta`` as plain data: the model's part of
        each member's cache key (and the values a tuning search space may set)."""
        return {"arch": self.arch, "kwargs": plain(self.kwargs), "train": plain(self.train),
                "aug": plain(self.aug), "tta": plain(self.tta)}

    def with_values(self, params: Mapping[str, Any]) -> "ModelSettings":
        """These settings with ``params`` (dotted paths under ``kwargs``, ``train`` or ``aug``,
        e.g. ``train.lr``: a tuning trial's values) set, checked as the config's are. Raises
        ConfigError naming ``models.<name>.<path>`` for a value its setting refuses."""
        values = self.learned()
        for path, value in params.items():
            node, *parents, leaf = [values, *path.split(".")]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        where = f"models.{self.name}"
        return dataclasses.replace(self, kwargs=values["kwargs"],
                                   train=checked(TrainSettings, values["train"], f"{where}.train"),
                                   aug=checked(AugSettings, values["aug"], f"{where}.aug"))


@dataclass(frozen=True)
class Selection:
    """What the run's stages work on, from the command line's top-level keys.

    Attributes:
        ensemble: ``ensemble``, the models blended and trained by default.
        models: ``model=NAME`` alone, else the ensemble (:func:`pipeline.settings.selected_models`).
        folds: ``fold=`` (every fold for ``all``).
        force: ``force=true`` retrains cached members.
        input: ``input=``, stage=predict's image file or folder.
        sized_for: the profile's machine (``gpu`` / ``cpu``), or None.
        tuned: ``tuned=true`` applied a study's values.
    """

    ensemble: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    folds: tuple[int, ...] = ()
    force: bool = False
    input: str | None = None
    sized_for: str | None = None
    tuned: bool = False


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
    selection: Selection = field(default_factory=Selection)
    export: ExportSettings = field(default_factory=ExportSettings)
    submit: SubmitSettings = field(default_factory=SubmitSettings)
    blend_methods: tuple[BlendMethod, ...] = ()   # blend.method, checked (pipeline.settings.blend_methods)
    blend_models: tuple[str, ...] = ()            # blend.models, else the selected models
    pseudo_sources: tuple[str, ...] = ()          # the models labelling the pseudo-label rows (none without rounds)
    screen_fixed: frozenset[Dim] = frozenset()    # screen.fixed as dimensions (the command line's added)
    screen_augs: tuple[AugPreset, ...] = ()       # screen.augs as presets, the baseline first
    tune_folds: tuple[int, ...] = ()              # tune.folds, checked against folds.k
    screening_basis: str = ""  # what a screening depends on in the settings, as JSON (pipeline.recipe.screening_key)

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
    kw, space = node.get("kwargs"), node.get("space")
    kwargs = OmegaConf.to_container(kw, resolve=True) if isinstance(kw, DictConfig) else dict(kw or {})
    train, seeds = train_settings(cfg, name), seed_count(cfg, name)
    e_lo, e_hi, s_lo, s_hi = plan_ranges(cfg, name, train.epochs, seeds)
    ranges = Range(e_lo, min(max(train.epochs, e_lo), e_hi), e_hi, s_lo, s_hi)
    return ModelSettings(name, str(node.get("arch")), kwargs, train, aug_settings(cfg, name),
                         tta_settings(cfg, name), seeds, round_base(cfg, name), ranges,
                         OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) else {})


def screening_basis(cfg: DictConfig, fixed: frozenset[Dim]) -> str:
    """What a screening depends on in the config and a recipe does not change, as canonical JSON
    (:func:`pipeline.recipe.screening_key` hashes it with the data's files and the device): the
    data's files and their decoding (the side only when fixed), the metric it scored by, the
    folds (their grouping too), the base seed, the ``screen`` settings but its time share, the
    screened models' architectures (the ensemble and augmentation only when ``fixed``)."""
    data = {k: cfg.data.get(k) for k in ("dir", "format", "id_column", "label_column", "max_img_size",
                                          "resize", "channels", "metric")}
    if Dim.side in fixed:
        data["img_size"] = cfg.data.get("img_size")
    screen = {k: v for k, v in OmegaConf.to_container(cfg.screen, resolve=True).items()
              if k not in ("share", "seconds", "enabled")}
    models = {str(m): {k: OmegaConf.to_container(cfg.models[m], resolve=True).get(k) for k in ("arch", "kwargs")}
              for m in cfg.screen.models if m in cfg.models}
    parts = {"data": data, "folds": {"k": cfg.folds.k, "seed": cfg.folds.seed, "group": cfg.folds.get("group")},
             "seed": cfg.get("seed"), "screen": screen, "models": models,
             "ensemble": list(cfg.ensemble) if Dim.arch in fixed else None,
             "aug": OmegaConf.to_container(cfg.aug, resolve=True) if Dim.aug in fixed else None}
    return json.dumps(parts, sort_keys=True, default=str)


def selection(cfg: DictConfig) -> Selection:
    """The top-level keys of ``cfg`` as a :class:`Selection`. Raises ConfigError for an empty
    ensemble, an unknown ``model=`` or a ``fold=`` outside ``0..folds.k-1``."""
    sized = cfg.get("sized_for")
    return Selection(tuple(map(str, cfg.ensemble)), tuple(selected_models(cfg)), tuple(selected_folds(cfg)),
                     bool(cfg.get("force", False)), None if cfg.get("input") is None else str(cfg.input),
                     None if sized is None else str(sized), bool(cfg.get("tuned", False)))


def run_settings(cfg: DictConfig) -> RunSettings:
    """The typed settings of the prepared config ``cfg`` (:func:`pipeline.config.prepare`).

    Raises:
        ConfigError: the first bad setting, one line naming the key and what was expected.
    """
    groups = {g: checked(schema, cfg.get(g), g) for g, schema in GROUPS.items()}
    models = {str(n): model_settings(cfg, str(n)) for n in cfg.models}
    try:
        base_seed = int(cfg.get("seed", 42))
    except (TypeError, ValueError):
        raise ConfigError(f"seed={cfg.get('seed')}: expected an integer") from None
    screen, folds = groups["screen"], groups["folds"]
    fixed = screen_fixed(screen)
    return RunSettings(models, groups["runtime"], groups["data"], folds, groups["blend"],
                       groups["pseudo"], groups["tune"], groups["predict"], base_seed, parse_budget(cfg.get("budget")),
                       screen, paths=Paths.from_cfg(cfg), selection=selection(cfg), export=groups["export"],
                       submit=groups["submit"], blend_methods=tuple(blend_methods(cfg)),
                       blend_models=tuple(blend_models(cfg)),
                       pseudo_sources=tuple(pseudo_sources(cfg)) if groups["pseudo"].models else (),
                       screen_fixed=fixed, screen_augs=tuple(screen_augs(screen)),
                       tune_folds=tuple(tune_folds(groups["tune"], folds.k)),
                       screening_basis=screening_basis(cfg, fixed))
