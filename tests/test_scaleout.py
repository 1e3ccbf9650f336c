"""Scale-out: Hydra launchers (joblib runs, SLURM composes), the per-(model, fold) lock, and a
blend that sees every parallel job's artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, REPO, TINY, trained
from pipeline import blend, budget, device, train
from pipeline.paths import MEMBER_FILES, Paths
from pipeline.train import runtime
from pipeline.members import MemberKey
from pipeline.train.scheduler import Outcome, train_member
from pipeline.workspace import Workspace


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min == 120 and launcher.array_parallelism == 32


def test_joblib_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=joblib",
                                                       "hydra.launcher.n_jobs=2"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


@pytest.mark.slow
def test_joblib_multirun_trains_both_folds_then_blend_sees_them(tmp_path, digits_dir, tiny_cfg):
    """`run.py -m ... fold=0,1 hydra/launcher=joblib`: two processes, one fold each, each with
    half the cores; `stage=blend` afterwards finds both folds exactly as after a serial run."""
    args = [sys.executable, str(REPO / "run.py"), "-m", f"paths.root={tmp_path}",
            f"data.dir={digits_dir}", *TINY, "stage=train", "model=mlp", "fold=0,1",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = Paths.from_cfg(tiny_cfg())
    threads = max(1, (os.cpu_count() or 1) // 2)
    for f in (0, 1):
        d = paths.member_dir("mlp", f)
        assert all((d / n).exists() for n in MEMBER_FILES), f
        assert f"{threads} threads" in (d / "metrics.json").read_text()  # the jobs split the cores
    assert "#0 :" in r.stdout + r.stderr and "#1 :" in r.stdout + r.stderr  # two launcher jobs
    out = blend.run(Workspace.load(tiny_cfg("ensemble=[mlp]", "blend.method=mean")))
    assert set(out.members) == {"mlp"} and out.best.value == "mean"
    assert (paths.submissions_dir / "submission.csv").exists()


@pytest.mark.slow
def test_submitit_local_multirun_then_blend(tmp_path, digits_dir, tiny_cfg):
    """The cluster path exercised, not only configured: a 2-job `stage=train` multirun through
    Hydra's submitit_local launcher (the SLURM launcher's submitit code path, as local processes),
    then a blend that sees both jobs' members."""
    args = [sys.executable, str(REPO / "run.py"), "-m", f"paths.root={tmp_path}",
            f"data.dir={digits_dir}", *TINY, "train.epochs=6", "aug=none", "stage=train",
            "model=mlp", "fold=0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = Paths.from_cfg(tiny_cfg())
    for f in (0, 1):
        assert all((paths.member_dir("mlp", f) / n).exists() for n in MEMBER_FILES), f
    assert list(tmp_path.glob("logs/multirun/*/.submitit/*"))  # submitit ran the jobs
    out = blend.run(Workspace.load(tiny_cfg("ensemble=[mlp]", "blend.method=mean", "train.epochs=6", "aug=none")))
    assert set(out.members) == {"mlp"} and out.blends[out.best].score.accuracy > 0.5


def test_locked_member_is_skipped_with_lock_skip(tiny_cfg):
    cfg = tiny_cfg("model=mlp", "fold=0", "train.epochs=1", "runtime.lock=skip")
    paths = Paths.from_cfg(cfg)
    lock_path = paths.member_lock("mlp", 0)
    lock_path.parent.mkdir(parents=True)
    with FileLock(lock_path):  # "another process" is training mlp fold 0
        [out] = train.run(Workspace.load(cfg))
    assert out.outcome is Outcome.SKIPPED_LOCKED and "another process" in out.reason
    assert not (paths.member_dir("mlp", 0) / "config.yaml").exists()


def test_second_trainer_waits_then_finds_the_member_cached(tiny_cfg, caplog):
    """Two trainers of one member: the second waits on the lock, and once the first has
    written the member it skips it instead of training it again."""
    cfg = tiny_cfg("model=mlp", "fold=0", "train.epochs=1")
    paths = Paths.from_cfg(cfg)
    lock_path = paths.member_lock("mlp", 0)
    lock_path.parent.mkdir(parents=True)
    first = FileLock(lock_path)
    first.acquire()
    result = {}
    second = threading.Thread(target=lambda: result.update(trained=train.run(Workspace.load(cfg))))
    second.start()
    deadline = time.time() + 60
    while "waiting" not in caplog.text and time.time() < deadline:  # until it reports the lock
        time.sleep(0.1)
    assert "waiting" in caplog.text and second.is_alive()  # blocked on the lock
    train_member(Workspace.load(cfg), MemberKey("mlp", 0))  # the first trainer's work
    mtime = (paths.member_dir("mlp", 0) / "oof.npz").stat().st_mtime_ns
    first.release()
    second.join(timeout=60)
    [out] = result["trained"]
    assert out.outcome is Outcome.CACHED
    assert (paths.member_dir("mlp", 0) / "oof.npz").stat().st_mtime_ns == mtime  # not rewritten


def test_bad_lock_mode_is_a_config_error(tiny_cfg):
    from pipeline.errors import ConfigError
    from pipeline.config import validate

    with pytest.raises(ConfigError, match="runtime.lock=maybe"):
        validate(tiny_cfg("runtime.lock=maybe"))


def test_launcher_job_outside_a_multirun():
    assert device.launcher_job() == (None, 1)


def test_fold_jobs_resolution(monkeypatch):
    """runtime.fold_jobs: auto is 2 on a CPU with >= 2 cores, several per GPU on CUDA, and 1
    inside a parallel multirun; an explicit count is capped by the pending folds; nonsense is a ConfigError."""
    from pipeline.errors import ConfigError

    cpu, cuda = device.torch.device("cpu"), device.torch.device("cuda")
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.fold_jobs("auto", cpu, 10) == runtime.FOLD_JOBS_CPU == 2
    assert runtime.fold_jobs("auto", cpu, 1) == 1
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 1)
    assert runtime.fold_jobs("auto", cpu, 10) == 1
    assert runtime.fold_jobs(3, cpu, 2) == 2 and runtime.fold_jobs("4", cpu, 10) == 4
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 2)
    assert runtime.fold_jobs("auto", cuda, 100) == 2 * runtime.FOLD_JOBS_PER_GPU
    assert runtime.fold_jobs("auto", device.torch.device("cuda:1"), 100) == runtime.FOLD_JOBS_PER_GPU
    assert runtime.fold_jobs("auto", cuda, 3) == 3
    monkeypatch.setattr(runtime, "launcher_job", lambda: (0, 2))  # a joblib multirun already
    assert runtime.fold_jobs("auto", cuda, 100) == 1
    for bad in (0, -1, "many"):
        with pytest.raises(ConfigError, match=f"runtime.fold_jobs={bad}: expected auto"):
            runtime.fold_jobs(bad, cpu, 5)


def test_last_odd_member_gets_every_core(monkeypatch):
    """The members of the last, incomplete round of side-by-side jobs of one model share the
    machine among themselves only: the 5th member on 2 jobs trains on both cores, not on half of
    them. Members of several models (unequal lengths) keep their share."""
    assert budget.side_by_side(["cnn"] * 5, 2) == [2, 2, 2, 2, 1]
    assert budget.side_by_side(["cnn"] * 4, 2) == [2, 2, 2, 2]
    assert budget.side_by_side(["cnn"] * 7, 3) == [3, 3, 3, 3, 3, 3, 1]
    assert budget.side_by_side(["cnn"] * 8, 3) == [3, 3, 3, 3, 3, 3, 2, 2]
    assert budget.side_by_side(["cnn"] * 10 + ["mlp"] * 5, 2) == [2] * 15
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert [runtime.core_share(n) for n in budget.side_by_side(["cnn_pl"] * 5, 2)] == [1, 1, 1, 1, 2]


def test_side_by_side_jobs_spread_over_gpus(monkeypatch):
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 2)
    assert [str(device.select_device("auto", slot=s)) for s in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 1)
    assert str(device.select_device("auto", slot=3)) == "cuda"


@pytest.mark.slow
def test_fold_jobs_train_folds_side_by_side_like_a_serial_run(tmp_path, digits_dir, tiny_cfg, caplog):
    """runtime.fold_jobs=2: two worker processes, one fold each, half the cores each; every fold's
    OOF and test probabilities equal a serial run's on the same thread count."""
    import numpy as np

    common = ["model=mlp", "train.epochs=2", "runtime.deterministic=true"]
    par = tiny_cfg(*common, "runtime.fold_jobs=2")
    done = trained(train.run(Workspace.load(par)))
    assert set(done) == {("mlp", 0), ("mlp", 1)}
    assert "2 side by side" in caplog.text
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(f"{threads} threads" in m["device"] for m in done.values())
    ser = tiny_cfg(*common, "runtime.fold_jobs=1", f"runtime.threads={threads}",
                                    f"paths.artifacts_dir={tmp_path / 'serial'}")
    assert set(trained(train.run(Workspace.load(ser)))) == {("mlp", 0), ("mlp", 1)}
    for f in (0, 1):
        a, b = Paths.from_cfg(par).member_dir("mlp", f), Paths.from_cfg(ser).member_dir("mlp", f)
        np.testing.assert_allclose(np.load(a / "oof.npz")["probs"], np.load(b / "oof.npz")["probs"], atol=1e-6)
        np.testing.assert_allclose(np.load(a / "test.npy"), np.load(b / "test.npy"), atol=1e-6)
    assert {o.outcome for o in train.run(Workspace.load(par))} == {Outcome.CACHED}  # nothing is started


def test_fold_job_worker_exits_when_its_parent_is_killed(tmp_path):
    """A side-by-side worker whose parent dies (kill -9 of run.py) stops instead of training on
    as an orphan: a real process tree, parent SIGKILLed, the child gone within seconds."""
    child_code = ("from pipeline.train.workers import exit_with_parent; import time; "
                  "exit_with_parent(0.1); print('ready', flush=True); time.sleep(120)")
    parent_code = ("import subprocess, sys, time; "
                   f"c = subprocess.Popen([sys.executable, '-c', {child_code!r}]); "
                   "print(c.pid, flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env, stdout=subprocess.PIPE,
                              text=True)
    child_pid = int(parent.stdout.readline())
    status = f"/proc/{child_pid}/status"

    def alive() -> bool:
        try:  # a zombie (exited, not yet reaped by whoever adopted it) counts as gone
            return "\nState:\tZ" not in open(status).read()
        except FileNotFoundError:
            return False

    assert parent.stdout.readline().strip() == "ready"  # the child's watchdog runs (same pipe)
    assert alive()
    parent.kill()
    parent.wait()
    deadline = time.time() + 15
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive()


def test_user_error_in_a_side_by_side_fold_is_the_projects_error(tiny_cfg):
    """A fold that fails in a worker process (NaN loss) reaches the caller as the same one-line
    PipelineError as in-process, after the other fold has finished; nothing is cached."""
    from pipeline.errors import PipelineError

    cfg = tiny_cfg("model=mlp", "runtime.fold_jobs=2", "train.lr=1e30")
    with pytest.raises(PipelineError, match=r"mlp fold \d: training loss became nan"):
        train.run(Workspace.load(cfg))
    paths = Paths.from_cfg(cfg)
    assert not any((paths.member_dir("mlp", f) / n).exists() for f in (0, 1) for n in MEMBER_FILES)
