"""Stage dispatch: ``cfg.stage`` -> a plain function of the workspace, ``run(ws)``.

:func:`run_stage` prepares the config once (:func:`pipeline.config.prepare`: pseudo-label rounds
added, ``tuned=true`` applied, every setting checked before any work) into typed settings, builds
one :class:`~pipeline.workspace.Workspace` (the competition and folds, loaded once) that every
stage of ``stage=all`` shares, and calls each stage's function (:func:`stage_function`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from enum import Enum
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig

from pipeline.config import competition_overrides, prepare, with_fixed
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)


class Stage(str, Enum):
    """``stage=``: one function each (:func:`stage_function`), or ``all``."""

    data = "data"
    folds = "folds"
    screen = "screen"
    train = "train"
    tune = "tune"
    blend = "blend"
    report = "report"
    predict = "predict"
    export = "export"
    submit = "submit"
    all = "all"


STAGES = tuple(s.value for s in Stage)
ALL = (Stage.data, Stage.folds, Stage.screen, Stage.train, Stage.blend, Stage.report)  # what stage=all runs


def _data(ws) -> Any:
    """Stage ``data``: build (if needed), validate and cache the competition; log a summary."""
    from pipeline import data

    log.info(data.summary(ws.comp, ws.settings.data.dir))
    return ws.comp


def _folds(ws) -> np.ndarray:
    """Stage ``folds``: the fold assignment, written once (the workspace loads or makes it);
    logs the fold sizes and the file. Returns the ``(N,)`` int64 assignment."""
    sizes, f = np.bincount(ws.folds), ws.settings.folds
    log.info("folds: %d folds of %d..%d rows (%s)", len(sizes), sizes.min(), sizes.max(),
             ws.paths.folds_file(f.k, f.seed, ws.comp.fingerprint))
    return ws.folds


# The module whose ``run(ws)`` is each stage's function, imported when the stage runs: Optuna,
# torch and matplotlib load only for the stages that need them. submit's workspace loads no
# competition (a rerun has only the test side); its settings' ``started`` is where budget= counts from.
STAGE_MODULES: dict[Stage, str] = {
    Stage.screen: "pipeline.screen", Stage.train: "pipeline.train.stage", Stage.tune: "pipeline.tune.study",
    Stage.blend: "pipeline.blend.stage", Stage.report: "pipeline.report", Stage.predict: "pipeline.predict",
    Stage.export: "pipeline.export", Stage.submit: "pipeline.submit",
}


def stage_function(stage: Stage) -> Callable[[Any], Any]:
    """Stage ``stage``'s function: the workspace (its settings, the competition and folds loaded
    on first use) -> its result."""
    if stage is Stage.data:
        return _data
    if stage is Stage.folds:
        return _folds
    return importlib.import_module(STAGE_MODULES[stage]).run


# Stages whose workspace loads nothing up front: data (the competition alone, no folds); predict
# (your images) and submit (an export and a competition's test side): the training data never;
# tune: its search spaces are checked before the data loads.
LAZY = (Stage.data, Stage.predict, Stage.submit, Stage.tune)


def run_stage(cfg: DictConfig, started: float | None = None) -> Any:
    """Run ``cfg.stage``: ``all`` runs data, folds, train, blend and report on one workspace and
    returns the blend's outcome. ``started`` (``time.time()``): where ``budget=`` counts from,
    ``run.py`` passes the command's start; default: now, this call's entry (a notebook's kernel
    may have started hours earlier). Raises ConfigError naming the known stages for an unknown
    one, or for any bad setting (before any work)."""
    from pipeline.workspace import Workspace

    try:
        stage = Stage(str(cfg.stage))
    except ValueError:
        raise ConfigError(f"stage={cfg.stage}: expected one of {', '.join(STAGES)}") from None
    raw = cfg
    _, settings = prepare(raw, apply_tuned=stage is not Stage.tune)  # a study searches the config as written
    if started is not None:
        settings = dataclasses.replace(settings, started=started)
    if stage in LAZY:
        return stage_function(stage)(Workspace(settings))
    ws = Workspace.load(settings=settings)
    if stage is Stage.train:
        ws = _screen_first(raw, ws)  # stage=train alone screens first, as stage=all does
    if stage is not Stage.all:
        return stage_function(stage)(ws)
    result = None
    for s in ALL:
        if s is Stage.screen:
            ws = _screen_first(raw, ws)
            continue
        out = stage_function(s)(ws)
        result = out if s is Stage.blend else result
    return result


def _screen_first(raw: DictConfig, ws) -> Any:
    """The screening before training (``stage=train``, ``stage=all``) when ``screen.enabled``:
    one made for this run is reused (``cfg`` already carries its recipe; the screen stage logs
    its table), else it runs on ``ws``, then ``raw`` is prepared again (which applies the recipe,
    its side too) and its workspace loaded; the run's entry time is kept. Returns the workspace
    to train on. Raises ArtifactError for an unreadable record, and what
    :meth:`pipeline.workspace.Workspace.load` raises for the data at the chosen side."""
    from pipeline.workspace import Workspace, screening_for

    if not ws.settings.screen.enabled:
        return ws
    found = screening_for(ws.settings)
    stage_function(Stage.screen)(ws)
    if found is not None:
        return ws
    _, settings = prepare(raw)
    return Workspace.load(settings=dataclasses.replace(settings, started=ws.settings.started))


def _log_to_files(message: str) -> None:
    """Write ``message`` as an ERROR record to the log files only (the terminal gets it once)."""
    record = logging.LogRecord("run", logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def run_command(cfg: DictConfig) -> None:
    """The command line's run of ``cfg.stage`` (``run.py`` and ``python -m pipeline``): ``budget=``
    counts from the process's start (:func:`pipeline.budget.process_start`); the dimensions its
    overrides and its ``competition=`` file set by hand are not screened
    (:func:`pipeline.config.with_fixed`, :func:`pipeline.config.competition_overrides`); a user
    error (:class:`~pipeline.errors.PipelineError`) is written to the run's log file and as one line
    on stderr, and the process exits with code 2."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline.budget import process_start

    try:
        overrides = []
        if HydraConfig.initialized():  # a competition file's settings count as set by hand, as the command line's
            runtime = HydraConfig.get().runtime
            overrides = [*competition_overrides(runtime.choices.get("competition"), list(runtime.config_sources)),
                         *HydraConfig.get().overrides.task]
        run_stage(with_fixed(cfg, overrides), started=process_start())
    except PipelineError as e:
        _log_to_files(f"error: {e}")
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
