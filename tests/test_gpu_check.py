"""benchmarks/gpu_check.py's dry run on the CPU (what CI runs, so the script cannot rot before a
GPU sees it): every step runs in its own time-boxed process, with the packages a bare GPU
machine lacks made unimportable, and is recorded; a failing step hides nothing else, and a
skipped one fails the run. The orchestration (time boxes within the budget, the verdict) and the
checks' own logic (fused vs alone, the sync audit over a fused epoch, peak memory from torch) are
tested in this process, with fakes where a GPU or a long training would be needed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import types
import warnings
import zlib

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_steps import audit, common, end_to_end, exactness, speed  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _args(tmp_path, *extra: str):
    return gpu_check.parse_args(["--out", str(tmp_path / "out"), "--device", "cpu", *extra])


def _work(tmp_path, name: str):
    work = tmp_path / "out" / "work" / name
    work.mkdir(parents=True)
    return work


@pytest.fixture
def one_thread():
    """torch's intra-op threads at 1 while a test trains in this process, as the check's step
    processes train on the CPU (OMP_NUM_THREADS=1): two threads that wait on each other on a
    2-core machine shared with other work made the sync audit's test 20x slower (47 s against 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_dry_run_passes_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "dry"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    wall = time.perf_counter() - t0
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "pytest_gpu", "fused_vs_alone", "averaging_resume", "sync_audit",
                           "end_to_end", "fused", "side_by_side", "throughput"]
    assert {n: s["status"] for n, s in steps.items()} == dict.fromkeys(steps, "passed"), proc.stdout
    assert proc.returncode == 0 and report["passed"] and report["seconds"] < 300, wall
    assert all(s["started_s"] + s["time_box_s"] <= report["budget_s"] + 0.1 for s in steps.values())
    assert set(report["blocked_imports"]) >= {"albumentations", "cv2", "optuna", "matplotlib"}
    auto = steps["environment"]["results"]["precision_auto"]
    assert auto in ("fp32", "bf16")
    exact = steps["fused_vs_alone"]["results"]
    assert exact["precision_auto"] == auto and len(exact["members"]) == 3
    for precision in {"fp32", auto}:  # fp32 always, and the precision auto resolves to here
        row = exact[precision]
        assert row["tolerance"] == exactness.FUSED_TOL[precision]
        assert 0 <= row["max_abs_diff"] <= row["tolerance"] < row["another_member_max_abs_diff"]
    resumed = steps["averaging_resume"]["results"]
    assert all(resumed[k]["max_abs_diff"] <= 1e-6 and resumed[k]["resumed_after_epoch"] == 2
               for k in ("plain", "ema", "swa"))
    audit = steps["sync_audit"]["results"]
    assert audit["fused"]["members"] == 3 and audit["fused"]["steps"] > 0
    e2e = steps["end_to_end"]["results"]
    assert len(e2e["members"]) == 4 and all(m["device"].startswith("cpu") for m in e2e["members"].values())
    assert "to train, about" in e2e["estimate"] and e2e["prediction"]
    assert e2e["peak_gpu_memory_mb"] is None and "gpu_memory_mib_per_process" not in e2e  # torch's, not nvidia-smi's
    groups = steps["fused"]["results"]["groups"]
    assert [g["members"] for g in groups] == [1, 3] and all(g["images_per_s"] > 0 for g in groups)
    assert set(steps["side_by_side"]["results"]["jobs"]) == {"1", "2"}
    runs = steps["throughput"]["results"]["runs"]
    assert {r["model"] for r in runs} == {"cnn_deotte", "cnn_keras", "resnet_timm"}
    assert all(r["images_per_s"] > 0 and r["host_ms_per_step"] > 0 for r in runs)
    assert "===== throughput" in (out / "gpu_check.log").read_text()


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    out = tmp_path / "fail"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out),
                           "--steps", "throughput", "environment", "--models", "no_such_model"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert proc.returncode == 1
    assert steps["throughput"]["status"] == "failed" and "no_such_model" in steps["throughput"]["error"]
    assert steps["environment"]["status"] == "passed"


def test_a_skipped_step_fails_the_run(tmp_path, monkeypatch):
    """A step skipped for lack of time, or because it raised Skip, is not a pass: the exit code
    is 1 and the summary says NOT PASSED."""
    out = tmp_path / "skip"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out),
                           "--steps", "environment", "pytest_gpu", "--budget-s", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    report = json.loads((out / "gpu_check.json").read_text())
    assert {n: s["status"] for n, s in report["steps"].items()} == {"environment": "skipped", "pytest_gpu": "skipped"}
    assert "out of time" in report["steps"]["environment"]["error"]
    assert proc.returncode == 1 and not report["passed"] and "NOT PASSED" in proc.stdout
    # a step that raises Skip is recorded as skipped, and that fails the verdict
    monkeypatch.setitem(gpu_check.STEPS, "environment", lambda args, work: (_ for _ in ()).throw(
        common.Skip("does not apply here")))
    args = _args(tmp_path, "--step", "environment")
    assert gpu_check.run_step(args) == 0
    record = json.loads((tmp_path / "out" / "steps" / "environment.json").read_text())
    assert record["status"] == "skipped" and record["error"] == "does not apply here"
    assert gpu_check.verdict({"environment": record, "fused": {"status": "passed"}}) == 1
    assert gpu_check.verdict({"fused": {"status": "passed"}}) == 0
    assert gpu_check.verdict({}) == 1


def test_time_boxes_add_up_to_the_budget_and_key_steps_come_first():
    """Every step used its whole box: all ran, their boxes add up to the budget (not past it),
    each got at least its share of the whole budget; a step that ends early leaves its time to
    the later ones. The key checks run before the measurements."""
    order = list(gpu_check.STEPS)
    assert order.index("throughput") == len(order) - 1
    for key in ("fused_vs_alone", "sync_audit", "end_to_end", "fused"):
        assert order.index(key) < order.index("side_by_side") < order.index("throughput")
    for share in gpu_check.SHARE.values():
        assert set(share) == set(order) and sum(share.values()) == pytest.approx(1)

    for kind, budget, use in (("cuda", 540.0, 1.0), ("cpu", 330.0, 1.0), ("cuda", 540.0, 0.25)):
        share, now = gpu_check.SHARE[kind], [0.0]
        boxes = {}

        def run_one(name, box):
            boxes[name] = box
            now[0] += use * box
            return {"status": "passed", "seconds": use * box}

        report = gpu_check.run_steps(order, budget, run_one, share, clock=lambda: now[0])
        assert [n for n, r in report.items() if r["status"] == "passed"] == order
        assert all(r["started_s"] + r["time_box_s"] <= budget + 0.1 for r in report.values())
        assert sum(boxes.values()) * use <= budget + 1e-6 and now[0] <= budget + 1e-6
        for name in order:
            assert boxes[name] >= share[name] * budget - 1e-6, name
        if use == 1.0:
            assert sum(boxes.values()) == pytest.approx(budget)
        else:  # the time the early steps left went to the later ones
            assert boxes["throughput"] > 2 * share["throughput"] * budget


@pytest.mark.usefixtures("one_thread")
def test_the_throughput_sweep_stops_within_its_box_and_keeps_its_figures(tmp_path):
    """A sweep whose time box ends after its first run stops there (Incomplete, a failure) with
    that run's figures and the runs it left out, also written where the orchestrator finds them
    if the step is killed."""
    args = _args(tmp_path, "--models", "cnn_deotte", "cnn_keras", "--rows", "256", "--step", "throughput")
    args.step_deadline = time.time() + 1.0
    with pytest.raises(common.Incomplete, match="after 1 of 2 runs") as e:
        speed.step_throughput(args, _work(tmp_path, "throughput"))
    assert [r["model"] for r in e.value.results["runs"]] == ["cnn_deotte"]
    assert e.value.results["left_out"] == ["cnn_keras batch 32 eager"]
    partial = json.loads((tmp_path / "out" / "steps" / "throughput.partial.json").read_text())
    assert partial["runs"] == e.value.results["runs"]


@pytest.mark.usefixtures("one_thread")
def test_the_sync_audit_runs_a_fused_group_epoch_under_the_audit(tmp_path, monkeypatch):
    """The audit runs group_epoch (a warm-up epoch, then the audited one) and counts the
    synchronisations it makes: three on the CPU (injected) are over the fused epoch's allowance."""
    from pipeline.train import fused

    real, epochs = fused.group_epoch, []

    def audited(g, epoch):
        epochs.append(epoch)
        out = real(g, epoch)
        if epoch == 2:
            for _ in range(3):
                warnings.warn("called a synchronizing CUDA operation", UserWarning)
        return out

    monkeypatch.setattr(fused, "group_epoch", audited)
    with pytest.raises(AssertionError, match=re.escape("'fused': {'members': 3, 'steps': 6, 'syncs': 3,")):
        audit.step_sync_audit(_args(tmp_path), _work(tmp_path, "sync_audit"))
    assert epochs == [1, 2]


def _fake_training(monkeypatch, offset: float, members_differ: bool = True, leaver: int | None = None):
    """fit_member / fit_group fakes: each member's OOF probabilities drawn from its own key (or
    all alike), the fused ones ``offset`` away from the alone ones; member ``leaver`` leaves the
    fused group."""
    from pipeline import device
    from pipeline.settings import Precision
    from pipeline.train import engine, fused

    def probs(spec):
        rng = np.random.default_rng(zlib.crc32(str(spec.key).encode()) if members_differ else 0)
        return rng.dirichlet(np.ones(10), size=20).astype(np.float32)

    def fit_member(spec, comp, folds, predict_test=True, **_):
        return types.SimpleNamespace(oof=probs(spec), row_ids=np.arange(20) + 100 * spec.key.fold,
                                     metrics={"accuracy": 0.5})

    def fit_group(specs, comp, folds, predict_test=True, **_):
        out = [fit_member(s, comp, folds) for s in specs]
        for r in out:
            r.oof = r.oof + offset
        if leaver is not None:
            out[leaver] = types.SimpleNamespace(reason="its training loss became non-finite in epoch 1")
        return out

    monkeypatch.setattr(engine, "fit_member", fit_member)
    monkeypatch.setattr(fused, "fit_group", fit_group)
    monkeypatch.setattr(device, "resolve_precision", lambda setting, dev: Precision.bf16)  # as on an A100


def test_fused_vs_alone_compares_each_precision_against_its_tolerance(tmp_path, monkeypatch):
    """fp32 and the resolved precision (bf16 here) each pass within their own tolerance, with the
    measured difference recorded; past fp32's 1e-3 the check fails naming fp32 (bf16's looser
    5e-3 still holds); a member that left the group fails it; members that cannot be told apart
    make the comparison meaningless, which fails too."""
    args = _args(tmp_path)
    _fake_training(monkeypatch, offset=5e-4)
    res = exactness.step_fused_vs_alone(args, _work(tmp_path, "a"))
    assert res["precision_auto"] == "bf16" and res["members"] == ["cnn_deotte fold 0", "cnn_deotte fold 1",
                                                                  "cnn_deotte fold 2 seed 1"]
    for precision, tol in (("fp32", 1e-3), ("bf16", 5e-3)):
        assert res[precision]["precision"] == precision and res[precision]["tolerance"] == tol
        assert res[precision]["max_abs_diff"] == pytest.approx(5e-4, rel=1e-3)
        assert res[precision]["another_member_max_abs_diff"] > tol
    _fake_training(monkeypatch, offset=2e-3)
    with pytest.raises(AssertionError, match=r"^fp32: fused and alone differ by 2\.00e-03 \(> 0\.001") as e:
        exactness.step_fused_vs_alone(args, _work(tmp_path, "b"))
    assert "bf16" not in str(e.value)
    _fake_training(monkeypatch, offset=0.0, leaver=1)
    with pytest.raises(AssertionError, match="members left the fused group: cnn_deotte fold 1: its training loss"):
        exactness.step_fused_vs_alone(args, _work(tmp_path, "c"))
    _fake_training(monkeypatch, offset=0.0, members_differ=False)
    with pytest.raises(AssertionError, match="cannot tell members apart"):
        exactness.step_fused_vs_alone(args, _work(tmp_path, "d"))


def test_peak_memory_comes_from_torch_and_is_never_empty_on_cuda(tmp_path, monkeypatch):
    """The peak is torch's own max_memory_allocated (it sees the process in a container, where
    nvidia-smi shows host PIDs or [N/A]); CUDA reporting none is an error, not an empty figure;
    a CUDA member whose metrics.json lacks it fails end_to_end, naming it."""
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 812.5 * 2**20)
    cuda = torch.device("cuda", 0)
    common.reset_peak_memory(cuda)
    assert common.peak_memory_mb(cuda) == 812.5 and calls == [("reset", cuda)]
    assert common.peak_memory_mb(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 0)
    with pytest.raises(RuntimeError, match="no peak memory figure"):
        common.peak_memory_mb(cuda)

    artifacts = tmp_path / "artifacts"
    for fold, peak in ((0, 812.5), (1, None)):
        d = artifacts / "cnn_deotte" / f"fold{fold}"
        d.mkdir(parents=True)
        metrics = {"model": "cnn_deotte", "fold": fold, "accuracy": 0.9, "log_loss": 0.3, "epochs": 2,
                   "seconds": 4.0, "device": "cuda:0 (NVIDIA H200)", "precision": "bf16"}
        if peak is not None:
            metrics["peak_gpu_memory_mb"] = peak
        (d / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(AssertionError, match=r"without a peak GPU memory in metrics.json: cnn_deotte/fold1$"):
        end_to_end.member_figures(artifacts, "cuda")
    with pytest.raises(AssertionError, match="trained elsewhere than cpu"):
        end_to_end.member_figures(artifacts, "cpu")
    (artifacts / "cnn_deotte" / "fold1" / "metrics.json").unlink()
    assert end_to_end.member_figures(artifacts, "cuda")["cnn_deotte/fold0"]["peak_gpu_memory_mb"] == 812.5
