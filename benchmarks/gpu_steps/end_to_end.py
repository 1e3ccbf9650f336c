"""Step 6, ``end_to_end``: ``run.py`` on the committed fixture (k=2, 2 epochs, the estimate on):
folds, train (``runtime.fold_jobs=auto``), blend, and predict on a PNG; each member's
``metrics.json`` must name the device and, on CUDA, its peak GPU memory (torch's
``max_memory_allocated`` in the process that trained it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .common import DRY_RUN_MODELS, REPO, fixture_copy


def member_figures(artifacts: Path, device: str) -> dict:
    """Each trained member's ``metrics.json`` figures under ``artifacts`` (``<model>/fold*``):
    ``device``, ``precision``, ``accuracy``, ``seconds`` and ``peak_gpu_memory_mb`` (torch's
    ``max_memory_allocated`` in the process that trained it, MiB), keyed ``<model>/<fold dir>``.

    Raises:
        AssertionError: a member trained on another device than ``device`` (``cpu``, ``cuda``,
            ``cuda:N``), or, on CUDA, one has no positive peak GPU memory (named).
    """
    from pipeline.members import read_metrics

    metrics = {}
    for d in sorted(artifacts.glob("*/fold*")):
        if (d / "metrics.json").exists():
            m = read_metrics(d)
            metrics[f"{d.parent.name}/{d.name}"] = {k: m.raw.get(k) for k in ("device", "precision", "accuracy",
                                                                             "seconds", "peak_gpu_memory_mb")}
    want = device.split(":")[0]
    wrong = {k: m["device"] for k, m in metrics.items() if not str(m["device"]).startswith(want)}
    if wrong:
        raise AssertionError(f"members trained elsewhere than {want}: {wrong}")
    empty = [k for k, m in metrics.items() if not (m["peak_gpu_memory_mb"] or 0) > 0]
    if want == "cuda" and empty:
        raise AssertionError(f"CUDA members without a peak GPU memory in metrics.json: {', '.join(empty)}")
    return metrics


def step_end_to_end(args, work: Path) -> dict:
    """``run.py`` stage by stage on the fixture (2 folds x cnn_deotte + mlp, the estimate on,
    ``runtime.fold_jobs`` and ``runtime.fuse`` at their defaults): each member's figures
    (:func:`member_figures`), the estimate line and the prediction of a PNG. Raises RuntimeError
    when a stage exits non-zero, AssertionError when a figure is missing or wrong."""
    from PIL import Image

    data_dir = fixture_copy(work)
    common = [f"paths.root={work}", f"data.dir={data_dir}", f"runtime.device={args.device}", "folds.k=2",
              "train.epochs=2", "train.min_steps=0", "train.batch_size=32", "models.cnn_deotte.train.epochs=2",
              "models.cnn_deotte.seeds=1",
              "pseudo.models=[]", "pseudo.blend=mean", "runtime.estimate=true", "runtime.progress=false",
              "ensemble=[cnn_deotte,mlp]", "blend.method=[mean,weighted]", "screen.enabled=false"]
    if args.device == "cpu":
        common += DRY_RUN_MODELS
    img = work / "digit.png"  # a PNG of the first test row
    import pandas as pd

    row = pd.read_csv(data_dir / "test.csv", nrows=1).to_numpy(dtype="uint8").reshape(28, 28)
    Image.fromarray(row).save(img)
    stages = {}
    log_text = ""
    for stage in ("folds", "train", "blend", "predict"):
        extra = [f"input={img}"] if stage == "predict" else []
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "run.py"), f"stage={stage}", *common, *extra],
                              cwd=work, capture_output=True, text=True, env=os.environ)
        stages[stage] = {"seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode}
        log_text += proc.stdout + proc.stderr
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
        if proc.returncode:
            raise RuntimeError(f"stage={stage} exited {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    metrics = member_figures(work / "artifacts", args.device)
    if len(metrics) != 4:
        raise AssertionError(f"expected 4 members, got {metrics}")
    if not (work / "submissions" / "submission.csv").exists():
        raise AssertionError("no submission.csv")
    estimate = next((line.split("train: ", 1)[1] for line in log_text.splitlines() if "to train, about" in line), None)
    predicted = next((line.split(": ", 1)[1] for line in log_text.splitlines() if "digit.png:" in line), None)
    if estimate is None or predicted is None:
        raise AssertionError(f"missing the estimate ({estimate}) or the prediction ({predicted}) in the log")
    peaks = [m["peak_gpu_memory_mb"] for m in metrics.values() if m["peak_gpu_memory_mb"]]
    return {"stages": stages, "members": metrics, "estimate": estimate, "prediction": predicted,
            "peak_gpu_memory_mb": max(peaks) if peaks else None}
