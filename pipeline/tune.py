"""Stage ``tune``: Optuna hyper-parameter search on OOF accuracy, with pruning, resumable and shared.

    python run.py stage=tune model=cnn_deotte tune.n_trials=30
    python run.py stage=train model=cnn_deotte tuned=true      # train with the best parameters

* The search space is declared per model in config, under ``models.<name>.space``: a nested
  mapping whose leaves are ``{type: float|int|categorical, ...}`` and whose paths (``train.lr``,
  ``kwargs.dropout``, ``aug.rotate``) are the model's own keys (see :func:`parse_space`).
* Objective: OOF accuracy on ``tune.folds`` (default fold 0 only), pooled over those folds; ties
  are broken by OOF log loss (:func:`objective_value`). Each epoch's validation accuracy is
  reported (``trial.report``) and ``tune.pruner`` (median by default, hyperband, none) prunes.
* Storage: ``tune.storage`` (default ``sqlite:///<artifacts>/optuna.db``), any SQLAlchemy URL
  (PostgreSQL/MySQL to share a study between machines); the study is loaded when it exists, so
  re-running continues it and N processes on one storage share one study. ``tune.n_trials`` is
  the study's target (finished trials of every worker together). Heartbeats mark a killed
  worker's trial failed after ``2 x tune.heartbeat_s`` and re-queue it (Optuna's
  ``RetryHeartbeatStaleTrialCallback``), so nothing stays RUNNING forever.
* At the end: the best trials, parameter importances (Optuna's fANOVA evaluator) and the best
  parameters written to ``artifacts/tuned/<model>.yaml`` (see :func:`apply_tuned`).
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from typing import Any

import numpy as np
import optuna
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict
from sklearn.metrics import log_loss

from pipeline import data
from pipeline.errors import ConfigError, PipelineError
from pipeline.folds import ensure_folds
from pipeline.io import save_text, write_with
from pipeline.paths import Paths
from pipeline.train import configure_threads, fit_fold, fold_config, model_names, select_device

SPACE_TYPES = ("float", "int", "categorical")
SPACE_ROOTS = ("kwargs", "train", "aug")
PRUNERS = ("median", "hyperband", "none")
LOG_LOSS_CAP = 50.0  # a diverged trial's log loss cannot outweigh one OOF row of accuracy


# --------------------------------------------------------------------------- search space


def parse_space(cfg: DictConfig, name: str) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space of model ``name`` from ``models.<name>.space``.

    Leaves (``{type: ...}`` mappings, at any depth) become Optuna distributions keyed by their
    dotted path, e.g. ``train.lr``:

    * ``{type: float, low, high, log: false, step: null}`` -> ``FloatDistribution``;
    * ``{type: int, low, high, log: false, step: 1}`` -> ``IntDistribution``;
    * ``{type: categorical, choices: [...]}`` -> ``CategoricalDistribution``.

    A path must start with ``kwargs``, ``train`` or ``aug`` and name a key the model's fold
    config has (the global ``train``/``aug`` groups merged with the model's overrides).

    Raises:
        ConfigError: no space declared, an unknown type or key, low > high, no choices, or a
            path the model does not have - naming the ``models.<name>.space.<path>`` entry.
    """
    if name not in cfg.models:
        raise ConfigError(f"unknown model '{name}'; known models: {', '.join(sorted(cfg.models))}")
    raw = cfg.models[name].get("space")
    if not raw:
        raise ConfigError(f"models.{name}.space is empty: declare the search space of {name} in "
                          f"pipeline/conf/models/{name}.yaml (see README, Tuning)")
    target = fold_config(cfg, name, 0, "")
    out: dict[str, optuna.distributions.BaseDistribution] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, DictConfig) and "type" in node:
            out[prefix] = _distribution(name, prefix, node, target)
        elif isinstance(node, DictConfig):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            raise ConfigError(f"models.{name}.space.{prefix}: expected a mapping with a 'type' "
                              f"({', '.join(SPACE_TYPES)}), got {node!r}")

    walk(raw, "")
    return out


def _distribution(name: str, path: str, spec: DictConfig, target: DictConfig):
    where = f"models.{name}.space.{path}"
    root = path.split(".", 1)[0]
    if root not in SPACE_ROOTS or "." not in path:
        raise ConfigError(f"{where}: a tuned key must be under {', '.join(SPACE_ROOTS)} "
                          f"(e.g. train.lr, kwargs.dropout, aug.rotate)")
    if OmegaConf.select(target, path, default="__missing__") == "__missing__":
        raise ConfigError(f"{where}: {name} has no setting '{path}' to tune")
    spec = OmegaConf.to_container(spec)
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


def baseline_params(cfg: DictConfig, name: str, space: dict) -> dict[str, Any]:
    """The model's current values of the searched parameters that lie inside the space, so the
    study's first trial measures the config as written (the baseline a tuned result must beat)."""
    fcfg = fold_config(cfg, name, 0, "")
    out = {}
    for path, dist in space.items():
        value = OmegaConf.select(fcfg, path)
        if value is None:
            continue
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            ok = value in dist.choices
        else:
            ok = dist.low <= value <= dist.high and (
                dist.step is None or abs((value - dist.low) / dist.step - round((value - dist.low) / dist.step)) < 1e-9)
        if ok:
            out[path] = value
    return out


def with_params(cfg: DictConfig, name: str, params: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with ``params`` (dotted paths under ``models.<name>``) set."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for path, value in params.items():
        OmegaConf.update(out, f"models.{name}.{path}", value, force_add=True)
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


# --------------------------------------------------------------------------- objective


def objective_value(accuracy: float, logloss: float, n_val: int) -> float:
    """OOF accuracy with ties broken by log loss: ``accuracy - min(log_loss, 50) / (100 n_val)``.

    Accuracy moves in steps of ``1 / n_val``; the log-loss term is below half a step, so it only
    orders trials of equal accuracy (lower log loss wins).
    """
    return float(accuracy - min(logloss, LOG_LOSS_CAP) / (100.0 * max(n_val, 1)))


def tune_folds(cfg: DictConfig) -> list[int]:
    """``tune.folds`` as a list of fold indices, each checked against ``folds.k``."""
    k = int(cfg.folds.k)
    raw = cfg.tune.folds
    fl = [raw] if isinstance(raw, int) else list(raw)
    if not fl:
        raise ConfigError("tune.folds is empty: give at least one fold index, e.g. tune.folds=[0]")
    for f in fl:
        if not isinstance(f, int) or not 0 <= f < k:
            raise ConfigError(f"tune.folds={list(fl)}: expected fold indices 0..{k - 1} (folds.k={k})")
    return fl


class Objective:
    """The function Optuna maximises for one model: train on the tune folds, score their OOF rows."""

    def __init__(self, cfg: DictConfig, name: str, space: dict, comp: data.Competition,
                 folds: np.ndarray, fold_list: list[int]):
        self.cfg, self.name, self.space = cfg, name, space
        self.comp, self.folds, self.fold_list = comp, folds, fold_list
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, trial: optuna.Trial) -> float:
        params = {path: suggest(trial, path, dist) for path, dist in self.space.items()}
        trial.set_user_attr("worker", self.worker)
        cfg = with_params(self.cfg, self.name, params)
        epochs = int(fold_config(cfg, self.name, 0, "").train.epochs)
        t0 = time.perf_counter()
        probs, labels = [], []
        for i, fold in enumerate(self.fold_list):
            def report(epoch: int, record: dict, _base=i * epochs) -> None:
                trial.report(record["val_acc"], _base + epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {epoch} of fold {fold}: val acc "
                                             f"{record['val_acc']:.4f}")

            res = fit_fold(cfg, self.comp, self.folds, self.name, fold, on_epoch=report,
                           predict_test=False)
            probs.append(res.oof)
            labels.append(self.comp.y_train[res.row_ids])
            trial.set_user_attr(f"fold{fold}_accuracy", res.metrics["accuracy"])
        p, y = np.concatenate(probs), np.concatenate(labels)
        acc = float((p.argmax(1) == y).mean())
        ll = float(log_loss(y, p, labels=np.arange(self.comp.num_classes)))
        trial.set_user_attr("accuracy", acc)
        trial.set_user_attr("log_loss", ll)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return objective_value(acc, ll, len(y))


# --------------------------------------------------------------------------- study


def make_pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """``tune.pruner``: median (``MedianPruner``), hyperband (``HyperbandPruner``) or none."""
    kind = str(cfg.tune.pruner)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(cfg.tune.pruner_startup_trials),
                                           n_warmup_steps=int(cfg.tune.pruner_warmup_epochs))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, int(cfg.tune.pruner_warmup_epochs)))
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner={kind}: expected one of {', '.join(PRUNERS)}")


def make_storage(cfg: DictConfig) -> optuna.storages.RDBStorage:
    """The study storage (``tune.storage``, an SQLAlchemy URL) with heartbeats and retries.

    For SQLite the parent directory is created and a 60 s busy timeout lets concurrent workers
    queue for the database lock. Raises ConfigError for a URL SQLAlchemy cannot open.
    """
    url = str(cfg.tune.storage)
    kwargs: dict = {}
    if url.startswith("sqlite:///"):
        db = url[len("sqlite:///"):]
        if db and db != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    hb = int(cfg.tune.heartbeat_s)
    retry = int(cfg.tune.max_retry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 5
            kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry)
        else:
            kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=retry)
    # Workers starting together race to create the schema (one gets a UNIQUE-constraint error
    # on alembic_version); the loser retries and then finds the tables in place.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; we rely on them
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=hb, grace_period=2 * hb,
                                                  **kwargs)
        except Exception as e:  # SQLAlchemy: ArgumentError / OperationalError / IntegrityError ...
            transient = type(e).__name__ in ("IntegrityError", "OperationalError")
            if transient and attempt < 4:
                time.sleep(0.5 + random.random())
                continue
            raise ConfigError(f"tune.storage={url}: cannot open it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from None


def load_study(cfg: DictConfig, name: str, comp: data.Competition) -> optuna.Study:
    """Create or load (``load_if_exists``) the study of ``name``.

    The study records the data fingerprint, folds and tune folds it was run on; loading it for
    other data or folds raises ConfigError (its trials would not be comparable).
    """
    study_name = str(cfg.tune.study_name or name)
    sampler = optuna.samplers.TPESampler(
        seed=None if cfg.tune.sampler_seed is None else int(cfg.tune.sampler_seed))
    study = optuna.create_study(study_name=study_name, storage=make_storage(cfg),
                                direction="maximize", sampler=sampler, pruner=make_pruner(cfg),
                                load_if_exists=True)
    key = {"model": name, "data_fingerprint": comp.fingerprint, "folds_k": int(cfg.folds.k),
           "folds_seed": int(cfg.folds.seed), "tune_folds": tune_folds(cfg)}
    old = study.user_attrs.get("key")
    if old is None:
        study.set_user_attr("key", key)
    elif old != key:
        changed = ", ".join(k for k in key if old.get(k) != key[k])
        raise ConfigError(f"study '{study_name}' in {cfg.tune.storage} was run with other "
                          f"{changed}; its trials are not comparable (use tune.study_name=<new name>)")
    return study


def finished(study: optuna.Study) -> int:
    """Trials that count towards ``tune.n_trials``: complete or pruned."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def best_table(study: optuna.Study, top: int = 5) -> pd.DataFrame:
    """The ``top`` complete trials, best first: number, accuracy, log loss, minutes, parameters."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        rows.append({"trial": t.number, "accuracy": t.user_attrs.get("accuracy"),
                     "log_loss": t.user_attrs.get("log_loss"), "value": t.value,
                     "minutes": (t.duration.total_seconds() / 60) if t.duration else None,
                     **t.params})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values("value", ascending=False).head(top).reset_index(drop=True)


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA), or ``{}`` when there are too few complete trials."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. every trial has the same parameters
        return {}


def write_tuned(cfg: DictConfig, name: str, study: optuna.Study) -> str:
    """Write the best trial's parameters to ``artifacts/tuned/<name>.yaml``; return its path."""
    best = study.best_trial
    path = Paths.from_cfg(cfg).tuned(name)
    header = (f"# Best parameters of {name}: study '{study.study_name}', trial {best.number}, "
              f"OOF accuracy {best.user_attrs.get('accuracy', float('nan')):.5f}, "
              f"log loss {best.user_attrs.get('log_loss', float('nan')):.4f} on folds "
              f"{tune_folds(cfg)}.\n# Applied by: python run.py stage=train model={name} tuned=true\n")
    save_text(path, header + OmegaConf.to_yaml(OmegaConf.create(nested(best.params))))
    return str(path)


def tune_model(cfg: DictConfig, name: str, comp: data.Competition, folds: np.ndarray) -> dict:
    """Run (or continue) the study of one model up to ``tune.n_trials``; report and save the best.

    Returns ``{"study", "trials", "best_value", "best_params", "tuned_file"}``.
    """
    space = parse_space(cfg, name)
    fold_list = tune_folds(cfg)
    study = load_study(cfg, name, comp)
    target = int(cfg.tune.n_trials)
    done = finished(study)
    print(f"tune: {name}: study '{study.study_name}' in {cfg.tune.storage}: {done} finished "
          f"trials, target {target}; space {', '.join(space)}; folds {fold_list}", flush=True)

    def log_trial(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        acc = t.user_attrs.get("accuracy")
        what = f"OOF acc {acc:.5f}" if acc is not None else t.state.name.lower()
        try:
            best = f"best #{study.best_trial.number} {study.best_trial.user_attrs['accuracy']:.5f}"
        except ValueError:
            best = "no complete trial yet"
        secs = t.duration.total_seconds() if t.duration else 0.0
        print(f"tune: {name} trial {t.number}: {what} in {secs:.0f} s ({best})", flush=True)

    if not study.trials and cfg.tune.baseline_first:
        base = baseline_params(cfg, name, space)
        if base:
            study.enqueue_trial(base, skip_if_exists=True)
            print(f"tune: {name}: trial 0 is the current config ({len(base)} of {len(space)} "
                  f"parameters; the rest sampled)")
    if done < target:
        timeout = None if cfg.tune.timeout is None else float(cfg.tune.timeout)
        study.optimize(
            Objective(cfg, name, space, comp, folds, fold_list), n_trials=target - done,
            timeout=timeout, catch=(PipelineError,), gc_after_trial=True,
            show_progress_bar=bool(cfg.runtime.progress),
            callbacks=[optuna.study.MaxTrialsCallback(
                target, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)),
                log_trial])

    counts = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
    print(f"tune: {name}: {len(study.trials)} trials ({', '.join(f'{n} {s.lower()}' for s, n in counts.items())})")
    table = best_table(study, int(cfg.tune.top))
    if table.empty:
        raise PipelineError(f"tune: {name}: no trial completed (all pruned or failed); "
                            f"raise tune.n_trials or loosen tune.pruner")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    imp = importances(study)
    if imp:
        print("tune: parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    path = write_tuned(cfg, name, study)
    _write_trials_csv(cfg, name, study)
    print(f"tune: {name}: best parameters -> {path} (train with them: python run.py stage=train "
          f"model={name} tuned=true)", flush=True)
    return {"study": study.study_name, "trials": len(study.trials), "best_value": study.best_value,
            "best_params": study.best_params, "tuned_file": path, "importances": imp}


def _write_trials_csv(cfg: DictConfig, name: str, study: optuna.Study) -> None:
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    path = Paths.from_cfg(cfg).tuned(name).with_name(f"{name}_trials.csv")
    write_with(path, lambda p: df.to_csv(p, index=False))


def run(cfg: DictConfig) -> dict[str, dict]:
    """Stage ``tune``: one study per selected model (``model=NAME``, or every ensemble model)."""
    names = model_names(cfg)
    comp = data.load(cfg)
    folds = ensure_folds(cfg, comp.y_train)
    configure_threads(cfg.runtime.threads, select_device(str(cfg.runtime.device)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    return {name: tune_model(cfg, name, comp, folds) for name in names}


# --------------------------------------------------------------------------- tuned=true


def apply_tuned(cfg: DictConfig) -> DictConfig:
    """With ``tuned=true``, merge ``artifacts/tuned/<model>.yaml`` into ``models.<model>`` for
    every model of the run (``model=NAME`` or the ensemble) that has one, and say so.

    Raises ConfigError when ``model=NAME`` is given and it has no tuned file, or when no model
    of the ensemble has one.
    """
    if not cfg.get("tuned"):
        return cfg
    paths = Paths.from_cfg(cfg)
    names = model_names(cfg)
    applied = []
    for name in names:
        path = paths.tuned(name)
        if not path.exists():
            if cfg.model not in (None, "all"):
                raise ConfigError(f"tuned=true: no {path} for {name} (run: python run.py "
                                  f"stage=tune model={name})")
            print(f"tuned: {name}: no {path}, using its config as is")
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
        print(f"tuned: {name} <- {path}: {flat}")
    if not applied:
        raise ConfigError(f"tuned=true: none of {', '.join(names)} has tuned parameters under "
                          f"{paths.artifacts_dir / 'tuned'} (run stage=tune first)")
    return cfg
