"""Search spaces of ``stage=tune``: declared per model in config (``models.<name>.space``).

Leaves ``{type: float|int|categorical, low, high, log, step, choices}`` at dotted paths under
``kwargs``, ``train`` or ``aug`` (e.g. ``train.lr``) become Optuna distributions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from pipeline.errors import ConfigError
from pipeline.runsettings import ModelSettings
from pipeline.settings import SPACE_ROOTS

SPACE_TYPES = ("float", "int", "categorical")


def parse_space(model: ModelSettings) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space of ``model`` from its ``models.<name>.space`` (``model.space``).

    Leaves (``{type: ...}`` mappings, at any depth) become Optuna distributions keyed by their
    dotted path, e.g. ``train.lr``:

    * ``{type: float, low, high, log: false, step: null}`` -> ``FloatDistribution``;
    * ``{type: int, low, high, log: false, step: 1}`` -> ``IntDistribution``;
    * ``{type: categorical, choices: [...]}`` -> ``CategoricalDistribution``.

    A path must start with ``kwargs``, ``train`` or ``aug`` and name a key the model's settings
    have (:meth:`pipeline.runsettings.ModelSettings.learned`: the global ``train``/``aug`` groups
    merged with the model's overrides).

    Raises:
        ConfigError: no space declared, an unknown type or key, low > high, no choices, or a
            path the model does not have - naming the ``models.<name>.space.<path>`` entry.
    """
    name = model.name
    if not model.space:
        raise ConfigError(f"models.{name}.space is empty: declare the search space of {name} in "
                          f"pipeline/conf/models/{name}.yaml (see README, Tuning)")
    target = model.learned()
    out: dict[str, optuna.distributions.BaseDistribution] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and "type" in node:
            out[prefix] = _distribution(name, prefix, dict(node), target)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            raise ConfigError(f"models.{name}.space.{prefix}: expected a mapping with a 'type' "
                              f"({', '.join(SPACE_TYPES)}), got {node!r}")

    walk(dict(model.space), "")
    return out


_MISSING = object()


def _select(values: dict, path: str) -> Any:
    """The value at dotted ``path`` in nested ``values``, or ``_MISSING``."""
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _distribution(name: str, path: str, spec: dict, target: dict):
    where = f"models.{name}.space.{path}"
    root = path.split(".", 1)[0]
    if root not in SPACE_ROOTS or "." not in path:
        raise ConfigError(f"{where}: a tuned key must be under {', '.join(SPACE_ROOTS)} "
                          f"(e.g. train.lr, kwargs.dropout, aug.rotate)")
    if _select(target, path) is _MISSING:
        raise ConfigError(f"{where}: {name} has no setting '{path}' to tune")
    kind = spec.pop("type")
    try:
        if kind == "categorical":
            choices = spec.pop("choices", None)
            if not choices:
                raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
            dist = optuna.distributions.CategoricalDistribution(choices)
        elif kind in ("float", "int"):
            if "low" not in spec or "high" not in spec:
                raise ConfigError(f"{where}: {kind} needs 'low' and 'high'")
            low, high = spec.pop("low"), spec.pop("high")
            if not low <= high:
                raise ConfigError(f"{where}: expected low <= high, got low={low} high={high}")
            log, step = bool(spec.pop("log", False)), spec.pop("step", None)
            if kind == "float":
                dist = optuna.distributions.FloatDistribution(float(low), float(high), log=log,
                                                              step=None if step is None else float(step))
            else:
                dist = optuna.distributions.IntDistribution(int(low), int(high), log=log,
                                                            step=int(step or 1))
        else:
            raise ConfigError(f"{where}: type={kind!r}, expected one of {', '.join(SPACE_TYPES)}")
    except ValueError as e:  # Optuna's own checks (e.g. log with low <= 0)
        raise ConfigError(f"{where}: {e}") from None
    if spec:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(spec)} for type {kind}")
    return dist


def suggest(trial: optuna.Trial, path: str, dist) -> Any:
    """Draw ``path`` from ``dist`` with the trial's public ``suggest_*`` API."""
    D = optuna.distributions
    if isinstance(dist, D.CategoricalDistribution):
        return trial.suggest_categorical(path, list(dist.choices))
    if isinstance(dist, D.IntDistribution):
        return trial.suggest_int(path, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(path, dist.low, dist.high, step=dist.step, log=dist.log)


def baseline_params(model: ModelSettings, space: dict) -> dict[str, Any]:
    """The model's current values of the searched parameters that lie inside the space, so the
    study's first trial measures the config as written (the baseline a tuned result must beat)."""
    values = model.learned()
    out = {}
    for path, dist in space.items():
        value = _select(values, path)
        if value is _MISSING or value is None:
            continue
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            ok = value in dist.choices
        else:
            ok = dist.low <= value <= dist.high and (
                dist.step is None or abs((value - dist.low) / dist.step - round((value - dist.low) / dist.step)) < 1e-9)
        if ok:
            out[path] = value
    return out


def nested(params: dict[str, Any]) -> dict:
    """``{"train.lr": 1e-3}`` -> ``{"train": {"lr": 1e-3}}``."""
    out: dict = {}
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    return out
