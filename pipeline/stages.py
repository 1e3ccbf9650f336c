"""Stage dispatch: ``cfg.stage`` -> a plain function taking the composed config.

:func:`run_stage` checks the whole config once (:func:`pipeline.settings.validate`, which adds
the pseudo-label rounds first) before any work, applies ``tuned=true``, and builds one
:class:`~pipeline.workspace.Workspace` (the competition and folds, loaded once) that every stage
of ``stage=all`` shares.
"""

from __future__ import annotations

import importlib
from enum import Enum
from typing import Any

from omegaconf import DictConfig

from pipeline.errors import ConfigError


class Stage(str, Enum):
    """``stage=``: each value is a module of ``pipeline`` with ``run(cfg, ws)``, or ``all``."""

    data = "data"
    folds = "folds"
    train = "train"
    tune = "tune"
    blend = "blend"
    report = "report"
    predict = "predict"
    all = "all"


STAGES = tuple(s.value for s in Stage)
ALL = (Stage.data, Stage.folds, Stage.train, Stage.blend, Stage.report)  # what stage=all runs


def _run(stage: Stage, cfg: DictConfig, ws) -> Any:
    return importlib.import_module(f"pipeline.{stage.value}").run(cfg, ws)


def run_stage(cfg: DictConfig) -> Any:
    """Run ``cfg.stage``: ``all`` runs data, folds, train, blend and report on one workspace and
    returns the blend's outcome. Raises ConfigError naming the known stages for an unknown one,
    or for any bad setting (before any work)."""
    from pipeline.settings import validate
    from pipeline.tune.tuned import apply_tuned

    try:
        stage = Stage(str(cfg.stage))
    except ValueError:
        raise ConfigError(f"stage={cfg.stage}: expected one of {', '.join(STAGES)}") from None
    validate(cfg)  # adds models.<name>_pl for each pseudo-label round first
    if stage is not Stage.tune:  # a study searches around the config as written
        apply_tuned(cfg)
        validate(cfg)  # the tuned values too
    if stage in (Stage.data, Stage.predict):  # data: nothing beyond the data; predict: your images
        return _run(stage, cfg, None)
    from pipeline.workspace import Workspace

    ws = Workspace.load(cfg)
    if stage is not Stage.all:
        return _run(stage, cfg, ws)
    result = None
    for s in ALL:
        out = _run(s, cfg, ws)
        result = out if s is Stage.blend else result
    return result
