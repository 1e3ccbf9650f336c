"""benchmarks/gpu_check.py's dry run on the CPU (what CI runs, so the script cannot rot before a
GPU sees it): every step runs in its own time-boxed process, with the packages a bare GPU
machine lacks made unimportable, and is recorded; a failing step hides nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_passes_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "dry"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "pytest_gpu", "averaging_resume", "sync_audit", "throughput",
                           "side_by_side", "fused", "end_to_end"]
    assert {n: s["status"] for n, s in steps.items()} == dict.fromkeys(steps, "passed"), proc.stdout
    assert proc.returncode == 0 and report["seconds"] < 300
    assert set(report["blocked_imports"]) >= {"albumentations", "cv2", "optuna", "matplotlib"}
    assert steps["environment"]["results"]["precision_auto"] in ("fp32", "bf16")
    resumed = steps["averaging_resume"]["results"]
    assert all(resumed[k]["max_abs_diff"] <= 1e-6 and resumed[k]["resumed_after_epoch"] == 2
               for k in ("plain", "ema", "swa"))
    runs = steps["throughput"]["results"]["runs"]
    assert {r["model"] for r in runs} == {"cnn_deotte", "cnn_keras", "resnet_timm"}
    assert all(r["images_per_s"] > 0 and r["host_ms_per_step"] > 0 for r in runs)
    assert set(steps["side_by_side"]["results"]["jobs"]) == {"1", "2"}
    groups = steps["fused"]["results"]["groups"]
    assert [g["members"] for g in groups] == [1, 3] and all(g["images_per_s"] > 0 for g in groups)
    e2e = steps["end_to_end"]["results"]
    assert len(e2e["members"]) == 4 and all(m["device"].startswith("cpu") for m in e2e["members"].values())
    assert "to train, about" in e2e["estimate"] and e2e["prediction"]
    assert "===== end_to_end" in (out / "gpu_check.log").read_text()


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    out = tmp_path / "fail"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out),
                           "--steps", "throughput", "environment", "--models", "no_such_model"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert proc.returncode == 1
    assert steps["throughput"]["status"] == "failed" and "no_such_model" in steps["throughput"]["error"]
    assert steps["environment"]["status"] == "passed"
