"""Stage dispatch: ``cfg.stage`` -> a plain function of the prepared config and the workspace.

:func:`run_stage` prepares the config once (:func:`pipeline.config.prepare`: pseudo-label rounds
added, ``tuned=true`` applied, every setting checked before any work), builds one
:class:`~pipeline.workspace.Workspace` (the competition and folds, loaded once) that every stage
of ``stage=all`` shares, and calls each stage's function from :data:`STAGE_FUNCTIONS`.
"""

from __future__ import annotations

import dataclasses
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
    """``stage=``: one function of :data:`STAGE_FUNCTIONS` each, or ``all``."""

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


def _data(cfg: DictConfig, ws) -> Any:
    """Stage ``data``: build (if needed), validate and cache the competition; log a summary."""
    from pipeline import data

    comp = ws.comp if ws is not None else data.load(cfg)
    log.info(data.summary(comp, str(cfg.data.dir)))
    return comp


def _folds(cfg: DictConfig, ws) -> np.ndarray:
    """Stage ``folds``: the fold assignment, written once (the workspace loads or makes it);
    logs the fold sizes and the file. Returns the ``(N,)`` int64 assignment."""
    sizes = np.bincount(ws.folds)
    log.info("folds: %d folds of %d..%d rows (%s)", len(sizes), sizes.min(), sizes.max(),
             ws.paths.folds_file(int(cfg.folds.k), int(cfg.folds.seed), ws.comp.fingerprint))
    return ws.folds


def _screen(cfg: DictConfig, ws) -> Any:
    from pipeline.screen import run  # imports Optuna and torch: only the stages that train need them

    return run(cfg, ws)


def _train(cfg: DictConfig, ws) -> Any:
    from pipeline.train.stage import run

    return run(cfg, ws)


def _tune(cfg: DictConfig, ws) -> Any:
    from pipeline.tune.study import run  # imports Optuna: only this stage needs it

    return run(cfg, ws)


def _blend(cfg: DictConfig, ws) -> Any:
    from pipeline.blend.stage import run

    return run(cfg, ws)


def _report(cfg: DictConfig, ws) -> Any:
    from pipeline.report import run  # imports matplotlib: only this stage needs it

    return run(cfg, ws)


def _predict(cfg: DictConfig, ws) -> Any:
    from pipeline.predict import run

    return run(cfg, ws)


def _export(cfg: DictConfig, ws) -> Any:
    from pipeline.export import run

    return run(cfg, ws)


def _submit(cfg: DictConfig, settings) -> Any:
    """Stage ``submit``: no workspace (no training data on a rerun); it gets the run's settings,
    whose ``started`` is where ``budget=`` counts from."""
    from pipeline.submit import run

    return run(cfg, settings)


# Every stage's function: (prepared config, workspace or None) -> its result; submit: (config, settings).
STAGE_FUNCTIONS: dict[Stage, Callable[[DictConfig, Any], Any]] = {
    Stage.data: _data, Stage.folds: _folds, Stage.screen: _screen, Stage.train: _train, Stage.tune: _tune,
    Stage.blend: _blend, Stage.report: _report, Stage.predict: _predict, Stage.export: _export,
    Stage.submit: _submit,
}
# data: nothing beyond the data; predict: your images; submit: an export and a competition's test side
NO_WORKSPACE = (Stage.data, Stage.predict, Stage.submit)


def run_stage(cfg: DictConfig, started: float | None = None) -> Any:
    """Run ``cfg.stage``: ``all`` runs data, folds, train, blend and report on one workspace and
    returns the blend's outcome. ``started`` (``time.time()``): where ``budget=`` counts from,
    ``run.py`` passes the command's start; default: now, this call's entry (a notebook's kernel
    may have started hours earlier). Raises ConfigError naming the known stages for an unknown
    one, or for any bad setting (before any work)."""
    from pipeline.workspace import Workspace, screening_for

    try:
        stage = Stage(str(cfg.stage))
    except ValueError:
        raise ConfigError(f"stage={cfg.stage}: expected one of {', '.join(STAGES)}") from None
    raw = cfg
    cfg, settings = prepare(raw, apply_tuned=stage is not Stage.tune)  # a study searches the config as written
    if started is not None:
        settings = dataclasses.replace(settings, started=started)
    if stage in NO_WORKSPACE:
        return STAGE_FUNCTIONS[stage](cfg, settings if stage is Stage.submit else None)
    ws = Workspace.load(cfg, settings)
    if stage is Stage.train:
        cfg, ws = _screen_first(raw, cfg, ws)  # stage=train alone screens first, as stage=all does
    if stage is not Stage.all:
        return STAGE_FUNCTIONS[stage](cfg, ws)
    result = None
    for s in ALL:
        if s is Stage.screen:
            cfg, ws = _screen_first(raw, cfg, ws)
            continue
        out = STAGE_FUNCTIONS[s](cfg, ws)
        result = out if s is Stage.blend else result
    return result


def _screen_first(raw: DictConfig, cfg: DictConfig, ws) -> tuple[DictConfig, Any]:
    """The screening before training (``stage=train``, ``stage=all``) when ``screen.enabled``:
    one made for this run is reused (``cfg`` already carries its recipe; the screen stage logs
    its table), else it runs on ``ws``, then ``raw`` is prepared again (which applies the recipe,
    its side too) and its workspace loaded; the run's entry time is kept. Returns the config and
    workspace to train on. Raises ArtifactError for an unreadable record, and what
    :meth:`pipeline.workspace.Workspace.load` raises for the data at the chosen side."""
    from pipeline.workspace import Workspace, screening_for

    if not ws.settings.screen.enabled:
        return cfg, ws
    found = screening_for(cfg, ws.settings)
    _screen(ws.cfg, ws)
    if found is not None:
        return cfg, ws
    cfg, settings = prepare(raw)
    return cfg, Workspace.load(cfg, dataclasses.replace(settings, started=ws.settings.started))


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
