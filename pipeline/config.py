"""The run's config, prepared once at its entry: the one place the composed config is changed.

:func:`prepare` takes the config Hydra composed and returns a checked, read-only copy:

1. each pseudo-label round of ``pseudo.models`` added as a model (:func:`expand_pseudo_rounds`);
2. with ``tuned=true``, a study's best values applied (:func:`apply_tuned_values`);
3. with ``screen.enabled``, the recipe its screening chose for this run applied
   (:func:`apply_recipe`; ``artifacts/screening/``, :mod:`pipeline.screen`);
4. every setting checked (:func:`validate`): a bad one stops the run with one line naming it,
   before any data is read or any model trained.

Everything below reads that copy and never writes it (OmegaConf refuses a write to it).
"""

from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.device import select_device
from pipeline.errors import ConfigError
from pipeline.paths import Paths
from pipeline.recipe import Recipe, fixed_dims, preset_values, screen_balances
from pipeline.runsettings import RunSettings, run_settings
from pipeline.workspace import screening_for
from pipeline.settings import (BUILD_OFFLINE, MODEL_KEYS, PSEUDO_SUFFIX, SPACE_ROOTS, aug_settings, pseudo_settings,
                               round_base, round_name, selected_models)


log = logging.getLogger(__name__)


def prepare(cfg: DictConfig, apply_tuned: bool = True) -> tuple[DictConfig, RunSettings]:
    """The run's config and its typed settings: a read-only copy of ``cfg`` with the pseudo-label
    rounds added, the tuned values applied (``tuned=true``, unless ``apply_tuned=False``: a study
    searches around the config as written) and every setting checked, and the
    :class:`~pipeline.runsettings.RunSettings` derived from it once. ``cfg`` itself is not changed;
    preparing a prepared config gives an equal one.

    Raises:
        ConfigError: the first bad setting, as one line naming the key and what was expected.
    """
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    expand_pseudo_rounds(out)
    settings = validate(out)
    if apply_tuned and out.get("tuned"):
        apply_tuned_values(out)
        settings = validate(out)
    if out.screen.enabled and (found := screening_for(settings)) is not None:
        apply_recipe(out, found.recipe)
        settings = validate(out)
    OmegaConf.set_readonly(out, True)
    return out, settings


def apply_recipe(cfg: DictConfig, recipe: Recipe) -> None:
    """Write ``recipe``'s screened dimensions into ``cfg`` (called by
    :func:`pipeline.config.prepare` only, on its own copy): ``data.img_size``, ``ensemble``, and
    for every model of the ensemble its ``aug`` preset (over its own augmentation) and its
    balance (``train.class_weight``, ``train.sampler``)."""
    with open_dict(cfg):
        if recipe.side:
            cfg.data.img_size = int(recipe.side)
        if recipe.models:
            cfg.ensemble = list(recipe.models)
        for name in map(str, cfg.ensemble):
            node = cfg.models[name]
            if recipe.aug is not None:
                node.aug = OmegaConf.merge(node.get("aug") or {}, preset_values(recipe.aug, aug_settings(cfg, name)))
            if recipe.balance is not None:
                node.train = OmegaConf.merge(node.get("train") or {}, recipe.balance.train_values())


def with_fixed(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` (a copy) with ``screen.fixed`` extended by the dimensions the command line's
    ``overrides`` set by hand (:func:`pipeline.recipe.fixed_dims`): what the run's entry does, so
    that the screening never overrides a setting given on the command line."""
    extra = [d.value for d in fixed_dims(overrides) if d.value not in map(str, cfg.screen.fixed)]
    if not extra:
        return cfg
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    with open_dict(out):
        out.screen.fixed = [*map(str, cfg.screen.fixed), *extra]
    return out


def competition_overrides(name: str | None, sources: list[dict]) -> list[str]:
    """The settings of ``competition=<name>``'s file as ``key=value`` overrides, so that what a
    competition file sets counts as set by hand, as on the command line (:func:`with_fixed`).
    ``sources``: Hydra's config sources in search order (``HydraConfig.get().runtime.config_sources``,
    each ``{"path", "schema"}``); the first holding ``competition/<name>.yaml`` is read (values
    unresolved: only the keys matter). ``name`` None: no competition, ``[]``.

    Raises:
        ConfigError: no config source holds ``competition/<name>.yaml``.
    """
    if not name:
        return []
    for source in sources:
        if source.get("schema") == "file":
            path = Path(str(source["path"])) / "competition" / f"{name}.yaml"
        elif source.get("schema") == "pkg":
            path = Path(str(resources.files(str(source["path"]).replace("/", ".")))) / "competition" / f"{name}.yaml"
        else:
            continue
        if path.is_file():
            flat = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            return [f"{k}={v}" for k, v in _flatten(flat)]
    raise ConfigError(f"competition={name}: no conf/competition/{name}.yaml in the folder you run from "
                      "or among the shipped ones")


def _flatten(node: object, prefix: str = "") -> list[tuple[str, object]]:
    """``{"a": {"b": 1}, "c": [2]}`` -> ``[("a.b", 1), ("c", [2])]``: dict keys joined by dots."""
    if not isinstance(node, dict):
        return [(prefix, node)]
    return [kv for k, v in node.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]


def expand_pseudo_rounds(cfg: DictConfig) -> None:
    """Add each round of ``pseudo.models`` to the config: ``models.<base>_pl`` = the base's
    settings merged with any ``models.<base>_pl`` given, and to ``ensemble`` after its base.
    Settings of a round whose base is not listed (a profile's, with ``pseudo.models=[]``) are
    dropped. Idempotent. Raises ConfigError for an unknown base or a round of a round."""
    s = pseudo_settings(cfg)
    listed = set(map(str, s.models))
    for name in [str(n) for n in cfg.models]:
        node = cfg.models[name]
        if name.endswith(PSEUDO_SUFFIX) and name[:-len(PSEUDO_SUFFIX)] not in listed and "arch" not in node:
            with open_dict(cfg):
                del cfg.models[name]
    for base in map(str, s.models):
        if base not in cfg.models:
            raise ConfigError(f"pseudo.models: unknown model '{base}'; known models: "
                              f"{', '.join(sorted(cfg.models))}")
        if base.endswith(PSEUDO_SUFFIX) and base[:-len(PSEUDO_SUFFIX)] in map(str, s.models):
            raise ConfigError(f"pseudo.models: {base} is itself a pseudo-label round; list its base")
        name = round_name(base)
        own = cfg.models.get(name)
        with open_dict(cfg):
            cfg.models[name] = OmegaConf.merge(cfg.models[base], own or {})
            ens = list(cfg.ensemble)
            if base in ens and name not in ens:
                ens.insert(ens.index(base) + 1, name)
                cfg.ensemble = ens


def validate(cfg: DictConfig) -> RunSettings:
    """Check the whole composed config once, before any work (see the module docstring), and
    return its typed settings (:func:`pipeline.runsettings.run_settings`).

    The pseudo-label rounds must have been added (:func:`prepare` does it first), so they are
    checked like any model.

    Raises:
        ConfigError: the first bad setting, as one line naming the key and what was expected.
    """
    from pipeline.models import list_models

    for name, node in cfg.models.items():
        extra = sorted(set(node) - set(MODEL_KEYS))
        if extra:
            raise ConfigError(f"models.{name}.{extra[0]}: unknown key (expected {', '.join(MODEL_KEYS)})")
        if node.get("arch") not in list_models():
            raise ConfigError(f"models.{name}.arch={node.get('arch')}: unknown architecture; "
                              f"known: {', '.join(list_models())}")
    settings = run_settings(cfg)
    select_device(settings.runtime.device)  # cuda asked for without CUDA: one line now, not inside a trial
    if str(cfg.data.build_offline).lower() not in BUILD_OFFLINE:
        raise ConfigError(f"data.build_offline={cfg.data.build_offline}: expected auto, true or false")

    screen_balances(settings.screen)
    unknown = [str(m) for m in cfg.screen.models if m not in cfg.models]
    if unknown or not cfg.screen.models:
        raise ConfigError(f"screen.models={list(cfg.screen.models)}: expected names under models "
                          f"({', '.join(sorted(cfg.models))})")
    return settings


def apply_tuned_values(cfg: DictConfig) -> DictConfig:
    """With ``tuned=true``, merge ``artifacts/tuned/<model>.yaml`` into ``models.<model>`` for
    every model of the run (``model=NAME`` or the ensemble) that has one, and say so.

    Raises ConfigError when ``model=NAME`` is given and it has no tuned file, or when no model
    of the ensemble has one.
    """
    if not cfg.get("tuned"):
        return cfg
    paths = Paths.from_cfg(cfg)
    names = selected_models(cfg)
    applied = []
    for name in names:
        path = paths.tuned(round_base(cfg, name) or name)  # a round takes its base's values
        if not path.exists():
            if cfg.model not in (None, "all"):
                raise ConfigError(f"tuned=true: no {path} for {name} (run: python run.py "
                                  f"stage=tune model={name})")
            log.info("tuned: %s: no %s, using its config as is", name, path)
            continue
        params = OmegaConf.load(path)
        bad = [k for k in params if k not in SPACE_ROOTS]
        if bad:
            raise ConfigError(f"{path}: unexpected top-level key(s) {', '.join(bad)}; "
                              f"expected {', '.join(SPACE_ROOTS)}")
        node = cfg.models[name]
        with open_dict(node):
            node.merge_with(params)
        applied.append(name)
        flat = ", ".join(f"{k}.{kk}={vv}" for k, v in params.items() for kk, vv in v.items())
        log.info("tuned: %s <- %s: %s", name, path, flat)
    if not applied:
        raise ConfigError(f"tuned=true: none of {', '.join(names)} has tuned parameters under "
                          f"{paths.artifacts_dir / 'tuned'} (run stage=tune first)")
    return cfg
