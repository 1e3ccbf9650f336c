"""Stage dispatch: ``cfg.stage`` -> a plain function taking the composed config."""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig

from pipeline.errors import ConfigError


def run_all(cfg: DictConfig) -> Any:
    """Stage ``all``: data, folds, train, blend, report, in order; returns the blend report."""
    from pipeline import blend, data, folds, report, train

    data.run(cfg)
    folds.run(cfg)
    train.run(cfg)
    result = blend.run(cfg)
    report.run(cfg)
    return result


def _stage(module: str) -> Callable[[DictConfig], Any]:
    def call(cfg: DictConfig) -> Any:
        import importlib

        return importlib.import_module(f"pipeline.{module}").run(cfg)

    return call


STAGES: dict[str, Callable[[DictConfig], Any]] = {
    "data": _stage("data"),
    "folds": _stage("folds"),
    "train": _stage("train"),
    "tune": _stage("tune"),
    "blend": _stage("blend"),
    "report": _stage("report"),
    "predict": _stage("predict"),
    "all": run_all,
}


def run_stage(cfg: DictConfig) -> Any:
    """Run ``cfg.stage`` (with ``tuned=true``: on the tuned parameters, see
    :func:`pipeline.tune.apply_tuned`); raises ConfigError naming the known stages for an unknown one."""
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise ConfigError(f"stage={stage}: expected one of {', '.join(STAGES)}")
    if stage != "tune":  # a study searches around the config as written
        from pipeline.tune import apply_tuned

        apply_tuned(cfg)
    return STAGES[stage](cfg)
