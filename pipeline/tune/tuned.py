"""``tuned=true``: apply a study's best parameters (``artifacts/tuned/<model>.yaml``) to the
models of a run. Imports no Optuna: training with tuned parameters needs none.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.errors import ConfigError
from pipeline.paths import Paths
from pipeline.settings import round_base, selected_models

SPACE_ROOTS = ("kwargs", "train", "aug")  # the model keys a search space (and a tuned file) may set
log = logging.getLogger(__name__)


def apply_tuned(cfg: DictConfig) -> DictConfig:
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
