"""Stage ``tune``: Optuna hyper-parameter search on OOF accuracy, with pruning, resumable and shared.

    python run.py stage=tune model=cnn_deotte tune.n_trials=30
    python run.py stage=train model=cnn_deotte tuned=true      # train with the best parameters

* The search space is declared per model in config (:mod:`pipeline.tune.space`).
* Objective: ``data.metric`` (accuracy by default; ties broken by OOF log loss) on the OOF rows of
  ``tune.folds`` (default fold 0 only), pooled over those folds (:func:`objective_value`). Each epoch's validation accuracy is
  reported (``trial.report``) and ``tune.pruner`` (median by default, hyperband, none) prunes.
* Storage: ``tune.storage`` (default ``sqlite:///<artifacts>/optuna.db``), any SQLAlchemy URL
  (PostgreSQL/MySQL to share a study between machines); the study is loaded when it exists, so
  re-running continues it and N processes on one storage share one study. ``tune.n_trials`` is
  the study's target (finished trials of every worker together). Heartbeats mark a killed
  worker's trial failed after ``2 x tune.heartbeat_s`` and re-queue it, so nothing stays
  RUNNING forever.
* At the end: the best trials, parameter importances (Optuna's fANOVA evaluator) and the best
  parameters written to ``artifacts/tuned/<model>.yaml`` (``tuned=true`` applies them:
  :func:`pipeline.config.apply_tuned_values`).
"""

from __future__ import annotations

import logging
import dataclasses
import os
import random
import socket
import time
import warnings

import numpy as np
import optuna
import pandas as pd
import yaml

from pipeline.errors import ConfigError, PipelineError
from pipeline.io import save_text, write_with
from pipeline.paths import Paths
from pipeline.metrics import Score, score
from pipeline.settings import Metric, Pruner, TuneSettings
from pipeline import members
from pipeline.train.engine import FitSpec, fit_member, planned_epochs
from pipeline.members import MemberKey
from pipeline.device import select_device
from pipeline.train.runtime import configure_threads
from pipeline.tune.space import baseline_params, nested, parse_space, suggest
from pipeline.workspace import Workspace

LOG_LOSS_CAP = 50.0  # a diverged trial's log loss cannot outweigh one OOF row of accuracy
log = logging.getLogger(__name__)


def objective_value(s: Score, metric: Metric, n_val: int) -> float:
    """What the study maximises: for ``accuracy``, OOF accuracy with ties broken by log loss,
    ``accuracy - min(log_loss, 50) / (100 n_val)`` (accuracy moves in steps of ``1 / n_val``; the
    log-loss term is below half a step, so it only orders trials of equal accuracy); for
    ``log_loss``, minus the log loss (capped at 50); for ``roc_auc``, the AUC; for
    ``balanced_accuracy`` and ``macro_f1``, their value with the same tie-break as accuracy."""
    if metric is Metric.log_loss:
        return -float(min(s.log_loss, LOG_LOSS_CAP))
    if metric is Metric.roc_auc:
        return s.value(metric)
    return float(s.value(metric) - min(s.log_loss, LOG_LOSS_CAP) / (100.0 * max(n_val, 1)))


class Objective:
    """The function Optuna maximises for one model: train on the tune folds, score their OOF rows."""

    def __init__(self, name: str, space: dict, ws: Workspace, fold_list: list[int]):
        self.name, self.space = name, space
        self.ws, self.fold_list = ws, fold_list
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.user_error: ConfigError | None = None  # a bad setting met in a trial: the study stops on it

    def __call__(self, trial: optuna.Trial) -> float:
        """The trial's objective (:func:`objective_value`). A user error (ConfigError, e.g. a
        sampled value its setting refuses) is kept in :attr:`user_error` and stops the study,
        the trial failing without a traceback; :func:`run` raises it as the run's one line."""
        try:
            return self._objective(trial)
        except ConfigError as e:
            self.user_error = e
            trial.study.stop()
            return float("nan")  # Optuna marks the trial failed, with one warning line

    def _objective(self, trial: optuna.Trial) -> float:
        params = {path: suggest(trial, path, dist) for path, dist in self.space.items()}
        trial.set_user_attr("worker", self.worker)
        comp = self.ws.comp
        model = self.ws.settings.models[self.name].with_values(params)  # the trial's values, checked
        settings = dataclasses.replace(self.ws.settings, models={**self.ws.settings.models, self.name: model})
        t = model.train  # pruning steps: fold i's epochs come after i x epochs
        epochs = planned_epochs(t, int((self.ws.folds != self.fold_list[0]).sum()) // t.batch_size)
        t0 = time.perf_counter()
        probs, labels = [], []
        for i, fold in enumerate(self.fold_list):
            def report(epoch: int, record: dict, _base=i * epochs) -> None:
                if "val_acc" not in record:  # not a validated epoch (runtime.val_every)
                    return
                trial.report(record["val_acc"], _base + epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {epoch} of fold {fold}: val acc "
                                             f"{record['val_acc']:.4f}")

            key = MemberKey(self.name, fold)
            member_cfg = members.member_config(settings, key, comp.fingerprint, self.ws.folds_digest,
                                               self.ws.precision(t.precision))
            res = fit_member(FitSpec.create(model, settings.runtime, key, member_cfg), comp, self.ws.folds,
                             on_epoch=report, predict_test=False)
            probs.append(res.oof)
            labels.append(comp.y_train[res.row_ids])
            trial.set_user_attr(f"fold{fold}_accuracy", res.metrics["accuracy"])
        p, y = np.concatenate(probs), np.concatenate(labels)
        s = score(y, p)
        trial.set_user_attr("accuracy", s.accuracy)
        trial.set_user_attr("log_loss", s.log_loss)
        if s.roc_auc is not None:
            trial.set_user_attr("roc_auc", s.roc_auc)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        return objective_value(s, Metric(self.ws.settings.data.metric), len(y))


# --------------------------------------------------------------------------- study


def make_pruner(t: TuneSettings) -> optuna.pruners.BasePruner:
    """``tune.pruner``: median (``MedianPruner``), hyperband (``HyperbandPruner``) or none."""
    kind = Pruner(t.pruner)
    if kind is Pruner.median:
        return optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials,
                                           n_warmup_steps=t.pruner_warmup_epochs)
    if kind is Pruner.hyperband:
        return optuna.pruners.HyperbandPruner(min_resource=max(1, t.pruner_warmup_epochs))
    return optuna.pruners.NopPruner()


def _immediate_transactions(engine) -> None:
    """Make every SQLite transaction of ``engine`` start with ``BEGIN IMMEDIATE`` (SQLAlchemy's
    documented pysqlite recipe, "Serializable isolation / Savepoints / Transactional DDL").

    Python's sqlite3 opens no transaction before a SELECT, so Optuna's check-then-set when a
    worker takes a waiting (enqueued) trial is not atomic across processes: two workers starting
    together both ran the baseline trial, and the second failed with "Cannot tell a COMPLETE
    trial" (Optuna issues #4002, #4621). Taking the write lock first makes it atomic; the busy
    timeout queues the other workers. Pooled connections are dropped so that every connection
    gets the setting."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite: emit no BEGIN of its own

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def make_storage(t: TuneSettings) -> optuna.storages.RDBStorage:
    """The study storage (``tune.storage``, an SQLAlchemy URL) with heartbeats and retries.

    For SQLite the parent directory is created, a 60 s busy timeout lets concurrent workers
    queue for the database lock, and every transaction takes that lock first
    (:func:`_immediate_transactions`). Raises ConfigError for a URL SQLAlchemy cannot open.
    """
    url = str(t.storage)
    kwargs: dict = {}
    if url.startswith("sqlite:///"):
        db = url[len("sqlite:///"):]
        if db and db != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    hb, retry = t.heartbeat_s, t.max_retry
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
                storage = optuna.storages.RDBStorage(url, heartbeat_interval=hb, grace_period=2 * hb,
                                                     **kwargs)
            if url.startswith("sqlite"):
                _immediate_transactions(storage.engine)
            return storage
        except Exception as e:  # SQLAlchemy: ArgumentError / OperationalError / IntegrityError ...
            transient = type(e).__name__ in ("IntegrityError", "OperationalError")
            if transient and attempt < 4:
                time.sleep(0.5 + random.random())
                continue
            raise ConfigError(f"tune.storage={url}: cannot open it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]})") from None


def load_study(name: str, ws: Workspace) -> optuna.Study:
    """Create or load (``load_if_exists``) the study of ``name``.

    The study records the data fingerprint, folds and tune folds it was run on; loading it for
    other data or folds raises ConfigError (its trials would not be comparable).
    """
    t, folds = ws.settings.tune, ws.settings.folds
    study_name = str(t.study_name or name)
    sampler = optuna.samplers.TPESampler(seed=t.sampler_seed)
    study = optuna.create_study(study_name=study_name, storage=make_storage(t),
                                direction="maximize", sampler=sampler, pruner=make_pruner(t),
                                load_if_exists=True)
    key = {"model": name, "data_fingerprint": ws.comp.fingerprint, "folds_k": folds.k,
           "folds_seed": folds.seed, "tune_folds": list(ws.settings.tune_folds)}
    old = study.user_attrs.get("key")
    if old is None:
        study.set_user_attr("key", key)
    elif old != key:
        changed = ", ".join(k for k in key if old.get(k) != key[k])
        raise ConfigError(f"study '{study_name}' in {t.storage} was run with other "
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


def write_tuned(paths: Paths, name: str, study: optuna.Study, folds: list[int]) -> str:
    """Write the best trial's parameters (measured on ``folds``) to ``artifacts/tuned/<name>.yaml``
    under ``paths``; return its path."""
    best = study.best_trial
    path = paths.tuned(name)
    header = (f"# Best parameters of {name}: study '{study.study_name}', trial {best.number}, "
              f"OOF accuracy {best.user_attrs.get('accuracy', float('nan')):.5f}, "
              f"log loss {best.user_attrs.get('log_loss', float('nan')):.4f} on folds "
              f"{folds}.\n# Applied by: python run.py stage=train model={name} tuned=true\n")
    save_text(path, header + yaml.safe_dump(nested(best.params), sort_keys=False, default_flow_style=False))
    return str(path)


def tune_model(name: str, ws: Workspace) -> dict:
    """Run (or continue) the study of one model up to ``tune.n_trials``; report and save the best.

    Returns ``{"study", "trials", "best_value", "best_params", "tuned_file"}``.
    """
    t, model = ws.settings.tune, ws.settings.models[name]
    space = parse_space(model)
    fold_list = list(ws.settings.tune_folds)
    study = load_study(name, ws)
    target = t.n_trials
    done = finished(study)
    log.info("tune: %s: study '%s' in %s: %d finished trials, target %d; space %s; folds %s", name,
             study.study_name, t.storage, done, target, ", ".join(space), fold_list)

    def log_trial(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        acc = t.user_attrs.get("accuracy")
        what = f"OOF acc {acc:.5f}" if acc is not None else t.state.name.lower()
        try:
            best = f"best #{study.best_trial.number} {study.best_trial.user_attrs['accuracy']:.5f}"
        except ValueError:
            best = "no complete trial yet"
        secs = t.duration.total_seconds() if t.duration else 0.0
        log.info("tune: %s trial %d: %s in %.0f s (%s)", name, t.number, what, secs, best)

    if not study.trials and t.baseline_first:
        base = baseline_params(model, space)
        if base:
            study.enqueue_trial(base, skip_if_exists=True)
            log.info("tune: %s: trial 0 is the current config (%d of %d parameters; the rest "
                     "sampled)", name, len(base), len(space))
    if done < target:
        objective = Objective(name, space, ws, fold_list)
        study.optimize(
            objective, n_trials=target - done,
            timeout=t.timeout, catch=(PipelineError,), gc_after_trial=True,
            show_progress_bar=ws.settings.runtime.progress,
            callbacks=[optuna.study.MaxTrialsCallback(
                target, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)),
                log_trial])
        if objective.user_error is not None:
            raise objective.user_error

    counts = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
    log.info("tune: %s: %d trials (%s)", name, len(study.trials),
             ", ".join(f"{n} {s.lower()}" for s, n in counts.items()))
    table = best_table(study, t.top)
    if table.empty:
        raise PipelineError(f"tune: {name}: no trial completed (all pruned or failed); "
                            f"raise tune.n_trials or loosen tune.pruner")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        log.info("tune: %s: best trials\n%s", name, table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    imp = importances(study)
    if imp:
        log.info("tune: parameter importances: %s", ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    path = write_tuned(ws.paths, name, study, fold_list)
    _write_trials_csv(ws.paths, name, study)
    log.info("tune: %s: best parameters -> %s (train with them: python run.py stage=train "
             "model=%s tuned=true)", name, path, name)
    return {"study": study.study_name, "trials": len(study.trials), "best_value": study.best_value,
            "best_params": study.best_params, "tuned_file": path, "importances": imp}


def _write_trials_csv(paths: Paths, name: str, study: optuna.Study) -> None:
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    path = paths.tuned(name).with_name(f"{name}_trials.csv")
    write_with(path, lambda p: df.to_csv(p, index=False))


def run(ws: Workspace) -> dict[str, dict]:
    """Stage ``tune``: one study per selected model (``model=NAME``, or every first-round model of
    the ensemble; pseudo-label rounds use their base model's values). Every search space is
    checked before the data is loaded or any trial runs (ConfigError naming the entry)."""
    selected, models = ws.settings.selection.models, ws.settings.models
    names = [n for n in selected if models[n].base is None]
    if not names:
        raise ConfigError(f"stage=tune: {', '.join(selected)} is a pseudo-label round; tune its base model "
                          f"(tuned=true applies the base's values to the round too)")
    for name in names:  # every search space is checked before any trial runs
        parse_space(models[name])
    runtime = ws.settings.runtime
    configure_threads(runtime.threads, select_device(runtime.device))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    return {name: tune_model(name, ws) for name in names}
