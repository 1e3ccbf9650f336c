"""The CUDA path's policies, checked on the CPU: SWA's update on the multi-tensor path, one GPU
per side-by-side worker, RNG state of the member's own device only, resume across devices,
the joblib floor, no albumentations/OpenCV on the torch path, the estimate timed in the
workers, and one set of numerics for training and stage=predict. CUDA facts (availability,
device count, capability) are monkeypatched where the policy is what is tested."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch
import torch.nn as nn
from packaging.requirements import Requirement

from conftest import REPO, fit
from pipeline import device, predict, train
from pipeline.paths import Paths
from pipeline.train import averaging, probes, resume, workers
from pipeline.members import MemberKey
from pipeline.workspace import Workspace
from pipeline.runsettings import run_settings


class _Synced(Exception):
    pass


def _forbid_host_sync(monkeypatch):
    """Make every read of a tensor's value on the host (``bool``, ``item``, ``int``, ``float``)
    raise: what would be a GPU->host sync on CUDA."""
    def refuse(*args, **kwargs):
        raise _Synced

    for name in ("__bool__", "item", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_swa_update_averages_floats_copies_integers_and_never_syncs(monkeypatch):
    """SWA of a BatchNorm net: the running mean of the weight snapshots (to float precision), the
    int64 num_batches_tracked copied, not averaged, and no host read in any update."""
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(2, 1, 8, 8))
    avg = AveragedModel(model, use_buffers=True)
    snapshots = []
    with monkeypatch.context() as m:
        for n in range(4):
            with torch.no_grad():
                model(torch.rand(4, 1, 8, 8))  # BN statistics move, num_batches_tracked counts
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            _forbid_host_sync(m)
            averaging.swa_update(avg, model, n)
            m.undo()
    assert int(avg.n_averaged) == 4
    for k, v in avg.module.state_dict().items():
        if v.is_floating_point():
            mean = torch.stack([s[k] for s in snapshots]).mean(0)
            torch.testing.assert_close(v, mean, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(v, snapshots[-1][k]), k


def test_swa_with_batchnorm_trains_on_the_multi_tensor_path(tiny_cfg, monkeypatch):
    """CUDA's multi-tensor (foreach) SWA path, forced on the CPU: torch's own default averaging
    fails there at the second update on BatchNorm's int64 buffer ("Integer division with addcdiv
    is no longer supported"); a cnn_deotte member (BatchNorm) with train.swa trains through it."""
    import torch.optim.swa_utils as swa_utils

    monkeypatch.setattr(swa_utils, "_get_foreach_kernels_supported_devices", lambda: ["cuda", "cpu"])
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    torch_default = swa_utils.AveragedModel(model, use_buffers=True)
    torch_default.update_parameters(model)
    with pytest.raises(RuntimeError, match="addcdiv"):  # the defect, reproduced on the CPU
        torch_default.update_parameters(model)
    cfg = tiny_cfg("model=cnn_deotte", "fold=0", "train.epochs=3", "train.swa=0.5", "aug=none")
    res = fit(cfg, "cnn_deotte", 0, predict_test=False)
    assert res.metrics["swa"]["steps"] > 1 and np.allclose(res.oof.sum(1), 1, atol=1e-4)


def test_every_side_by_side_worker_and_launcher_job_gets_its_own_gpu(tiny_cfg, monkeypatch):
    """runtime.device=cuda (or auto) on a 2-GPU machine: side-by-side worker ``slot`` and Hydra
    launcher job ``n`` train on GPU ``slot % 2`` / ``n % 2`` and make it current
    (torch.cuda.set_device) before any CUDA work; cuda:N is kept as given."""
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(device.torch.cuda, "set_device", lambda d: current.append(str(d)))
    for name in ("cuda", "auto"):
        assert [str(device.select_device(name, slot=s)) for s in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert str(device.select_device("cuda:1", slot=0)) == "cuda:1"
    monkeypatch.setattr(device, "launcher_job", lambda: (3, 4))
    assert str(device.select_device("cuda")) == "cuda:1"
    ws = Workspace.load(tiny_cfg("runtime.device=cuda", "runtime.num_workers=0"))
    dev = workers.enter_worker(ws, 3, 4, [], logging.INFO)
    assert dev.device == "cuda:1" and current == ["cuda:1"] and not dev.progress
    assert ws.settings.runtime.device == "cuda"  # the run's settings are read, not written


def test_rng_state_touches_only_the_members_own_device(monkeypatch):
    """A CPU member on a GPU host saves no CUDA RNG state (today's code opened every GPU); a
    state with another machine's GPUs, or from a GPU resumed on the CPU, restores the CPU side
    and never raises."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched for a CPU member")

    monkeypatch.setattr(resume.torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state_all", "get_rng_state", "set_rng_state_all", "set_rng_state"):
        monkeypatch.setattr(resume.torch.cuda, name, no_cuda)
    cpu = torch.device("cpu")
    state = resume.rng_state(cpu)
    assert state["device"] == "cpu" and "cuda" not in state
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    saved = resume.rng_state(cpu)
    old_format = {**saved, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 4}  # 4 GPUs, all saved
    old_format.pop("device")
    for s in (saved, old_format, {**saved, "device": "cuda", "cuda": torch.zeros(16, dtype=torch.uint8)}):
        torch.manual_seed(123)
        resume.set_rng_state(s, cpu)
        assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_from_another_device_resumes_or_is_ignored_in_one_line(tiny_cfg, caplog):
    """A resume checkpoint written on a GPU resumes on the CPU with one log line; one that does
    not fit the member (another architecture's weights) is ignored with one line and the member
    trains from the start. Neither is a traceback."""
    cfg = tiny_cfg("model=mlp", "fold=0", "train.epochs=3", "aug=none", "runtime.deterministic=true")
    path = Paths.from_cfg(cfg).member_dir("mlp", 0) / "resume.pt"
    path.parent.mkdir(parents=True)

    class Stop(Exception):
        pass

    def stop(epoch, record):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, "mlp", 0, predict_test=False, resume_path=path, on_epoch=stop)
    state = torch.load(path, weights_only=True)
    state["rng"] = {**state["rng"], "device": "cuda", "cuda": torch.zeros(16, dtype=torch.uint8)}
    resume.save_resume(path, state)
    res = fit(cfg, "mlp", 0, predict_test=False, resume_path=path)
    assert res.metrics["resumed_after_epoch"] == 2
    assert sum("written on cuda" in r.message for r in caplog.records) == 1
    state["model"] = {k: v[:1] for k, v in state["model"].items()}  # weights of another shape
    resume.save_resume(path, state)
    caplog.clear()
    res = fit(cfg, "mlp", 0, predict_test=False, resume_path=path)
    assert res.metrics["resumed_after_epoch"] is None and len(res.metrics["history"]) == 3
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "does not fit this member" in warned[0].message
    assert "\n" not in warned[0].getMessage()


def test_joblib_floor_has_generator_unordered():
    """Parallel(return_as="generator_unordered") needs joblib >= 1.4: pyproject may not allow less."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    joblib = next(Requirement(d) for d in deps if Requirement(d).name == "joblib")
    assert not joblib.specifier.contains("1.3.2") and joblib.specifier.contains("1.4.0")


def test_the_torch_training_path_imports_no_albumentations_or_opencv():
    code = ("import sys; import pipeline.train.stage, pipeline.train.engine, pipeline.predict, "
            "pipeline.blend.stage; print(sorted(m for m in ('albumentations', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_estimate_is_timed_in_the_side_by_side_workers(tiny_cfg, monkeypatch, caplog):
    """With members side by side, the parent process times no step (on CUDA it would open a GPU
    context and compile there for the whole run): the workers that train time their models
    together, and the run announces their estimate."""
    def not_here(*args, **kwargs):
        raise AssertionError("the estimate ran in the parent process")

    monkeypatch.setattr(probes, "seconds_per_member", not_here)
    cfg = tiny_cfg("model=mlp", "runtime.fold_jobs=2", "runtime.estimate=true")
    ws = Workspace.load(cfg)
    est = probes.estimate(ws, [(k,) for k in ws.keys("mlp")], 2, torch.device("cpu"))
    assert est.n_jobs == 2 and all(0 < s < 600 for s in est.member_seconds.values())
    assert est.minutes_left(set()) == pytest.approx(sum(est.member_seconds.values()) / 2 / 60)
    out = train.run(Workspace.load(cfg))
    assert len(out) == 2 and "member(s) to train, about" in caplog.text


def test_training_and_predict_set_the_same_numerics(trained_cfg, tmp_path):
    """configure_numerics: cuDNN benchmarks its algorithms on CUDA unless deterministic, TF32 only
    for bf16/fp16 members; stage=predict sets what training set before each member runs."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32, torch.are_deterministic_algorithms_enabled())
    try:
        _check_numerics(trained_cfg, tmp_path)
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before[:3]
        torch.use_deterministic_algorithms(before[3])


def _check_numerics(trained_cfg, tmp_path):
    from PIL import Image

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cuda, P = torch.device("cuda"), device.Precision
    device.configure_numerics(cuda, P.fp32, deterministic=False)
    assert cudnn.benchmark and not cudnn.allow_tf32 and not matmul.allow_tf32
    device.configure_numerics(cuda, P.bf16, deterministic=True)
    assert not cudnn.benchmark and cudnn.allow_tf32 and matmul.allow_tf32
    from pipeline import blend

    cfg = trained_cfg("blend.method=mean")
    blend.run(Workspace.load(cfg))
    ws = Workspace.load(cfg)
    precision = ws.member_config(MemberKey("cnn_deotte", 0))["train"]["precision"]
    img = tmp_path / "digit.png"
    Image.fromarray(ws.comp.x_test[0, 0]).save(img)
    cudnn.benchmark, cudnn.allow_tf32 = True, precision == "fp32"  # the opposite of training's
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.input = str(img)
    predict.run(Workspace(run_settings(cfg)))
    assert cudnn.benchmark is False  # the CPU: no cuDNN autotuning
    assert cudnn.allow_tf32 is (precision != "fp32")
