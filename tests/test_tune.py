"""Stage tune: search-space parsing, a real 3-trial study with pruning, tuned=true, and two
processes sharing one SQLite study."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
from omegaconf import OmegaConf

from conftest import REPO, TINY
from pipeline.tune import space as tune_space
from pipeline.tune import study as tune_study
from pipeline.config import apply_tuned_values
from pipeline.errors import ConfigError
from pipeline.paths import Paths
from pipeline.stages import run_stage
from pipeline.runsettings import model_settings
from pipeline.runsettings import run_settings

# mlp on the fixture, 2-3 epochs per trial: about a second a trial on 2 cores
TUNE = ["model=mlp", "stage=tune", "models.mlp.space.train.epochs.low=2",
        "models.mlp.space.train.epochs.high=3"]


def test_default_spaces_parse(tiny_cfg):
    cfg = tiny_cfg()
    for name in ("cnn_deotte", "cnn_keras", "mlp", "resnet_timm"):
        space = tune_space.parse_space(run_settings(cfg).models[name])
        assert {"train.lr", "train.weight_decay", "train.epochs"} <= set(space), name
    space = tune_space.parse_space(run_settings(cfg).models["cnn_deotte"])
    assert space["train.lr"] == optuna.distributions.FloatDistribution(5e-4, 1e-2, log=True)
    assert space["train.batch_size"].choices == (64, 128, 256)
    assert space["train.epochs"] == optuna.distributions.IntDistribution(10, 50, step=5)
    assert {"aug.rotate", "aug.elastic_alpha", "kwargs.dropout"} <= set(space)


@pytest.mark.parametrize("override, message", [
    ("models.mlp.space.train.lr.type=normal", "models.mlp.space.train.lr: type='normal'"),
    ("models.mlp.space.train.lr.low=0.1", "expected low <= high"),
    ("+models.mlp.space.train.lrr={type:float,low:0.1,high:0.2}", "mlp has no setting 'train.lrr'"),
    ("+models.mlp.space.seed={type:int,low:1,high:2}", "must be under kwargs, train, aug"),
    ("models.mlp.space.kwargs.hidden={type:categorical,choices:[]}", "non-empty 'choices'"),
    ("+models.mlp.space.train.lr.sigma=3", "unknown key(s) sigma"),
    ("~models.mlp.space", "models.mlp.space is empty"),
])
def test_bad_space_is_a_config_error(tiny_cfg, override, message):
    with pytest.raises(ConfigError) as e:
        tune_space.parse_space(run_settings(tiny_cfg(override)).models["mlp"])
    assert message in str(e.value)


def test_params_apply_to_the_model_settings(tiny_cfg):
    cfg = tiny_cfg()
    params = {"train.lr": 0.01, "kwargs.dropout": 0.3, "aug.rotate": 4.0}
    model = run_settings(cfg).models["mlp"]
    tuned = model.with_values(params)
    assert (tuned.train.lr, tuned.kwargs["dropout"], tuned.aug.rotate) == (0.01, 0.3, 4.0)
    assert model.train.lr != 0.01 and model_settings(cfg, "mlp") == model  # the original is untouched
    with pytest.raises(ConfigError, match="models.mlp.train"):
        model.with_values({"train.lr": -1.0})  # checked as the config's values are
    assert tune_space.nested(params) == {"train": {"lr": 0.01}, "kwargs": {"dropout": 0.3},
                                   "aug": {"rotate": 4.0}}


def test_objective_orders_by_the_metric_then_log_loss():
    from pipeline.metrics import Score
    from pipeline.settings import Metric

    n, acc = 8400, Metric.accuracy
    v = lambda a, ll, auc=None, m=acc: tune_study.objective_value(Score(a, ll, auc), m, n)  # noqa: E731
    assert v(0.99, 0.05) > v(0.99, 0.06)
    # one more correct row beats any log loss, even a diverged one
    assert v(0.99 + 1 / n, 1e9) > v(0.99, 0.0)
    assert v(0.90, 0.05, m=Metric.log_loss) > v(0.99, 0.06, m=Metric.log_loss)
    assert v(0.90, 0.5, 0.97, m=Metric.roc_auc) > v(0.95, 0.1, 0.96, m=Metric.roc_auc)


def test_three_trial_study_writes_the_best_parameters(tiny_cfg, caplog):
    """3 sampled trials on real digits: table, importances, best parameters in artifacts/tuned/."""
    cfg = tiny_cfg(*TUNE, "tune.n_trials=3", "tune.sampler_seed=0")
    result = run_stage(cfg)["mlp"]
    out = caplog.text
    study = optuna.load_study(study_name="mlp", storage=str(cfg.tune.storage))
    assert result["trials"] == len(study.trials) == 3
    tuned_file = Paths.from_cfg(cfg).tuned("mlp")
    best = OmegaConf.load(tuned_file)
    assert best.train.lr == pytest.approx(study.best_params["train.lr"])
    assert best.kwargs.hidden == study.best_params["kwargs.hidden"]
    assert study.best_trial.user_attrs["accuracy"] > 0.3  # well above chance (0.1)
    assert "best parameters ->" in out and f"trial {study.best_trial.number}" in out
    assert (tuned_file.parent / "mlp_trials.csv").exists()


def test_pruner_stops_a_hopeless_trial(tiny_cfg):
    """Median pruner, 2 startup trials with a good learning rate, then lr=1e-7: pruned at epoch 1."""
    cfg = tiny_cfg(*TUNE, "tune.n_trials=3", "tune.pruner_startup_trials=2",
                   "tune.pruner_warmup_epochs=0", "models.mlp.space.train.lr.low=1e-7")
    from pipeline.workspace import Workspace

    study = tune_study.load_study("mlp", Workspace.load(cfg))
    fixed = {"train.weight_decay": 1e-4, "train.epochs": 3, "kwargs.hidden": 200, "kwargs.dropout": 0.0}
    study.enqueue_trial({"train.lr": 3e-3, **fixed})
    study.enqueue_trial({"train.lr": 4e-3, **fixed})
    study.enqueue_trial({"train.lr": 1e-7, **fixed})
    run_stage(cfg)
    trials = optuna.load_study(study_name="mlp", storage=str(cfg.tune.storage)).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[2].last_step == 1  # stopped after its first epoch, not after all three
    assert trials[0].user_attrs["accuracy"] > 0.2  # real digits: 2x chance after 18 steps


def test_rerun_continues_the_study(tiny_cfg):
    cfg = tiny_cfg(*TUNE, "tune.n_trials=2", "tune.pruner=none")
    run_stage(cfg)
    assert run_stage(tiny_cfg(*TUNE, "tune.n_trials=3", "tune.pruner=none"))["mlp"]["trials"] == 3
    # target already met: nothing new
    assert run_stage(tiny_cfg(*TUNE, "tune.n_trials=3", "tune.pruner=none"))["mlp"]["trials"] == 3


def test_study_refuses_other_folds(tiny_cfg):
    run_stage(tiny_cfg(*TUNE, "tune.n_trials=1", "tune.pruner=none"))
    with pytest.raises(ConfigError, match="tune_folds"):
        run_stage(tiny_cfg(*TUNE, "tune.n_trials=2", "tune.folds=[1]"))


def test_tuned_true_trains_with_the_best_parameters(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    path = Paths.from_cfg(cfg).tuned("mlp")
    path.parent.mkdir(parents=True)
    path.write_text("train: {lr: 0.0123, epochs: 1}\nkwargs: {dropout: 0.2}\n")
    applied = apply_tuned_values(tiny_cfg("model=mlp", "tuned=true"))
    fcfg = model_settings(applied, "mlp")
    assert (fcfg.train.lr, fcfg.train.epochs, fcfg.kwargs["dropout"]) == (0.0123, 1, 0.2)
    # through the stage: the fold's cache key records the tuned values
    run_stage(tiny_cfg("model=mlp", "fold=0", "stage=train", "tuned=true"))
    saved = OmegaConf.load(Paths.from_cfg(cfg).member_dir("mlp", 0) / "config.yaml")
    assert saved.train.lr == 0.0123 and saved.train.epochs == 1
    # without tuned=true nothing changes
    assert model_settings(apply_tuned_values(tiny_cfg("model=mlp")), "mlp").train.lr != 0.0123
    with pytest.raises(ConfigError, match="no .*cnn_keras.yaml"):
        apply_tuned_values(tiny_cfg("model=cnn_keras", "tuned=true"))


def test_sqlite_transactions_take_the_write_lock_first(tiny_cfg, tmp_path):
    """Optuna's check-then-set when a worker takes an enqueued trial is atomic on SQLite: a
    transaction that has only read already holds the write lock, so another process's write
    waits for it (with no busy timeout: fails at once) and succeeds once it ends. Without this,
    two workers starting together both ran the baseline trial ("Cannot tell a COMPLETE trial")."""
    import sqlite3

    db = tmp_path / "lock.db"
    storage = tune_study.make_storage(run_settings(tiny_cfg(f"tune.storage=sqlite:///{db}")).tune)
    other = sqlite3.connect(db, timeout=0)
    with storage.engine.connect() as conn, conn.begin():
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM trials").scalar() == 0
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("CREATE TABLE probe (x)")
    other.execute("CREATE TABLE probe (x)")  # the lock is released with the transaction
    other.close()


@pytest.mark.slow
def test_two_processes_share_one_study(tiny_cfg, digits_dir, tmp_path):
    """Two concurrent `stage=tune` processes on one SQLite study: both finish, every trial is
    recorded once with a unique number, both workers contributed, none is left RUNNING."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = [sys.executable, str(REPO / "run.py"), f"paths.root={tmp_path}", f"data.dir={digits_dir}",
            *TINY, *TUNE, "tune.n_trials=8", "tune.pruner=none", f"tune.storage={storage}",
            # trials of ~1 s on one thread each, so both workers are busy when the slower starts
            "models.mlp.space.train.epochs.low=10", "models.mlp.space.train.epochs.high=10",
            "runtime.threads=1"]
    # folds and the parsed-data cache first, so the two workers race only on the study
    run_stage(tiny_cfg("stage=folds"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    study = optuna.load_study(study_name="mlp", storage=storage)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # unique, none lost
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 8 and len(study.trials) <= 9  # the target, plus at most one in flight
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) == 2, workers
    # each process logged exactly the trials it ran
    logged = sorted(int(line.split("tune: mlp trial ")[1].split(":")[0]) for o in outs
                    for line in o.splitlines() if "tune: mlp trial " in line)
    assert logged == sorted(t.number for t in done)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_killed_worker_trial_is_failed_and_retried(tiny_cfg, digits_dir, tmp_path):
    """kill -9 a tuning process mid-trial: with heartbeats, the next worker marks that trial
    failed and re-runs its parameters; nothing is left RUNNING."""
    storage = f"sqlite:///{tmp_path / 'crash.db'}"
    slow = ["models.mlp.space.train.epochs.low=400", "models.mlp.space.train.epochs.high=400",
            "tune.heartbeat_s=1", f"tune.storage={storage}", "tune.pruner=none"]
    run_stage(tiny_cfg("stage=folds"))
    args = [sys.executable, str(REPO / "run.py"), f"paths.root={tmp_path}", f"data.dir={digits_dir}",
            *TINY, *TUNE, *slow, "tune.n_trials=5"]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import sqlite3

    def beating() -> bool:
        """A trial is RUNNING and has recorded a heartbeat (Optuna fails only such trials)."""
        try:
            with sqlite3.connect(tmp_path / "crash.db") as db:
                return bool(db.execute("SELECT COUNT(*) FROM trial_heartbeats h JOIN trials t ON "
                                       "h.trial_id = t.trial_id WHERE t.state = 'RUNNING'").fetchone()[0])
        except sqlite3.Error:  # not created yet
            return False

    deadline = time.time() + 120
    while not beating() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    running = optuna.load_study(study_name="mlp", storage=storage).get_trials(
        states=(optuna.trial.TrialState.RUNNING,))
    proc.kill()
    proc.wait()
    assert running, "the worker never started a trial"
    crashed = running[0]
    time.sleep(3.5)  # past the grace period (2 x heartbeat_s), on SQLite's whole-second clock
    done_before = tune_study.finished(optuna.load_study(study_name="mlp", storage=storage))
    # the retry re-runs the crashed trial's 400 epochs; a batch of 128 of the fold's 200 training rows
    # makes them 400 steps
    run_stage(tiny_cfg(*TUNE, *slow, f"tune.n_trials={done_before + 1}", "train.batch_size=128"))
    trials = optuna.load_study(study_name="mlp", storage=storage).trials
    assert trials[crashed.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == crashed.number]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == crashed.params
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_first_trial_is_the_current_config(tiny_cfg):
    cfg = tiny_cfg(*TUNE, "tune.n_trials=1", "tune.pruner=none", "+models.mlp.train.lr=0.002",
                   "+models.mlp.train.epochs=3")
    run_stage(cfg)
    first = optuna.load_study(study_name="mlp", storage=str(cfg.tune.storage)).trials[0]
    assert first.params["train.lr"] == 0.002 and first.params["train.epochs"] == 3
    assert first.params["kwargs.hidden"] == 200 and first.params["kwargs.dropout"] == 0.0
