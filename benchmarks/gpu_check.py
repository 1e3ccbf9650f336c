"""One command that verifies and measures the whole CUDA path on an NVIDIA GPU.

    python benchmarks/gpu_check.py --out gpu_check/               # on a GPU: at most 9 minutes (--budget-s 540)
    python benchmarks/gpu_check.py --out /tmp/dry --device cpu    # dry run on a CPU (2-3 minutes on 2 cores)

Each step runs in its own process with its own time box, and is recorded in
``<out>/gpu_check.json`` as passed / failed / skipped with its error and figures, so one failure
hides nothing else; every step's output goes to ``<out>/gpu_check.log``. The key checks come
first, the measurements last. In order:

1. ``environment``: GPU name, compute capability, memory, torch / CUDA / cuDNN versions, the
   precision ``train.precision=auto`` resolves to, and which optional packages are importable;
2. ``pytest_gpu``: ``pytest -m gpu tests/test_cuda.py``;
3. ``fused_vs_alone``: three ``cnn_deotte`` members (two folds of seed 0, one of seed 1) trained
   alone (:func:`pipeline.train.engine.fit_member`) and as one fused group
   (:func:`pipeline.train.fused.fit_group`) with dropout and augmentation off and deterministic
   numerics, in fp32 and at the precision ``auto`` resolves to here: the largest OOF probability
   difference per precision, against :data:`FUSED_TOL`;
4. ``averaging_resume``: a member without a weight average, with EMA and with SWA (cnn_deotte:
   BatchNorm), each interrupted after epoch 2 of 4 and resumed, against the uninterrupted run:
   the largest OOF probability difference;
5. ``sync_audit``: one epoch of the real loop (:func:`pipeline.train.engine.train_epoch`; plain,
   EMA, SWA) and one epoch of a fused group of 3 (:func:`pipeline.train.fused.group_epoch`, what
   CUDA trains by default) with ``torch.cuda.set_sync_debug_mode("warn")``: every GPU->host
   synchronisation and where (on the CPU the epochs just run);
6. ``end_to_end``: ``run.py`` on the committed fixture (k=2, 2 epochs, the estimate on): folds,
   train (``runtime.fold_jobs=auto``), blend, and predict on a PNG; each member's
   ``metrics.json`` must name the device and, on CUDA, its peak GPU memory (torch's
   ``max_memory_allocated`` in the process that trained it);
7. ``fused``: fused groups of M = 1, 5, 10, 15 ``cnn_deotte`` members (``runtime.fuse``,
   :mod:`pipeline.train.fused`; each member its own fold's rows and seed) at batch 128, one epoch
   of the real group loop timed after a warm-up epoch: images/s of all members together (against
   step 8's separate processes), peak GPU memory (torch);
8. ``side_by_side``: 1, 2 and 4 processes each training cnn_deotte (batch 128) at once from a
   common start: images/s in all, what ``runtime.fold_jobs`` gains, each process's peak GPU
   memory (torch);
9. ``throughput``: the real epoch function for ``cnn_deotte``, ``cnn_keras`` and
   ``resnet_timm`` at batch 128, 512 and 2048, eager and ``runtime.compile=true`` (compiled at
   ``--compile-batches`` only: each compile costs tens of seconds): images/s, host ms per step
   (Python issuing the step) against GPU ms per step (CUDA events), peak GPU memory (torch). The
   sweep stops before a run that would end after its time box; what it measured is kept.

Time: the whole run stops at ``--budget-s`` seconds (CUDA 540, CPU 330). Each step's time box is
its share (:data:`SHARE`, per device kind) of the seconds left, among the steps not yet run
(:func:`time_box`): if every step used its whole box the boxes would add up to the budget
exactly, a step that finishes early leaves its time to the later ones, and a step is never boxed
below its share of the whole budget. A step that runs past its box is killed and failed (figures
it had written so far are kept); a step with under :data:`MIN_BOX_S` seconds left is skipped.

On the CPU (the dry run) every step process runs with one intra-op thread (``OMP_NUM_THREADS=1``
unless set): on a 2-core machine shared with other work, two threads that wait on each other
made steps 3-10x slower (``fused_vs_alone`` 94 s against 13 s) and pushed them past their boxes.

Data: the real MNIST arrays when ``--data`` (default ``data/digit-recognizer``) holds the built
competition, else the committed fixture's real digits, repeated to ``--rows`` rows for the
throughput steps. Nothing is downloaded. Only torch, timm, numpy, pandas, scikit-learn, joblib,
safetensors, scipy, pillow, tqdm, hydra-core, omegaconf and antlr4-python3-runtime are needed:
the steps run with albumentations, OpenCV, Optuna, matplotlib and skops made unimportable
(``--allow-all-imports`` lifts that), so the dry run proves the list.

Exit code 0 when every step run passed; 1 when any failed or was skipped (a skipped step is a
check that did not run, never a pass); 2 without a CUDA device and without ``--device``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURE = REPO / "tests" / "fixtures" / "digits"
CONF_DIR = REPO / "pipeline" / "conf"

# key checks first, measurements last
STEPS = ("environment", "pytest_gpu", "fused_vs_alone", "averaging_resume", "sync_audit", "end_to_end", "fused",
         "side_by_side", "throughput")
# Each step's share of the whole run's budget, per device kind (each adds up to 1; see time_box).
# A step's box is at least its share, plus what earlier steps left. CUDA (540 s): environment
# 16 s, pytest_gpu 81 (one test compiles), fused_vs_alone 32, averaging_resume 32, sync_audit 27,
# end_to_end 97 (four run.py processes), fused 54, side_by_side 81 (1 + 2 + 4 processes, each
# warmed up), throughput 119 (9 eager runs, 3 compiles). CPU (the dry run, 330 s): about 1.7x or
# more of the longest each step took in dry runs on a 2-core AMD EPYC shared with other work
# (end_to_end 28-60 s, side_by_side 15-36 s, throughput 7-41 s, the others 4-12 s).
SHARE = {"cuda": {"environment": 0.03, "pytest_gpu": 0.15, "fused_vs_alone": 0.06, "averaging_resume": 0.06,
                  "sync_audit": 0.05, "end_to_end": 0.18, "fused": 0.10, "side_by_side": 0.15, "throughput": 0.22},
         "cpu": {"environment": 0.03, "pytest_gpu": 0.08, "fused_vs_alone": 0.07, "averaging_resume": 0.07,
                 "sync_audit": 0.05, "end_to_end": 0.30, "fused": 0.07, "side_by_side": 0.18, "throughput": 0.15}}
MIN_BOX_S = 5.0  # a step with a smaller time box than this (seconds) is skipped: the run does not pass
BLOCKED = ("albumentations", "cv2", "optuna", "matplotlib", "skops")  # not on a bare GPU machine
# the dry run checks the code paths, not the figures: narrow models on a 2-core CPU
DRY_RUN_MODELS = ["models.cnn_deotte.kwargs.width=0.25", "models.cnn_keras.kwargs.width=0.25",
                  "+models.resnet_timm.kwargs.channels=[8,16,32,64]", "+models.resnet_timm.kwargs.layers=[1,1,1,1]"]
RESUME_TOL = {"cpu": 1e-6, "cuda": 1e-4}  # largest |p_resumed - p_uninterrupted| that passes
AUDIT_GROUP = 3  # members of the fused group whose epoch sync_audit runs

# fused_vs_alone: tests/test_fused.py's exactness settings (deterministic, no dropout, no
# augmentation, the fixture's 3 folds), but 2 epochs at batch 64 and lr 1e-3 (8 optimiser steps).
# More steps amplify the grouped kernels' other rounding chaotically: at the fixture's 3 epochs,
# batch 32 and lr 3e-3, fp32 fused and alone differ by 1.1e-2 (width 0.25) and 7e-2 (width 1.0)
# on a 2-core AMD EPYC with AVX-512; at batch 32, lr 3e-4 and 4 epochs by 1.4e-2 (width 1.0).
FUSED_EXACT = ["ensemble=[cnn_deotte]", "folds.k=3", "models.cnn_deotte.seeds=2", "runtime.deterministic=true",
               "aug=none", "models.cnn_deotte.kwargs.dropout=0.0", "train.min_steps=0", "train.epochs=2",
               "models.cnn_deotte.train.epochs=2", "train.batch_size=64", "train.lr=1e-3"]
FUSED_MEMBERS = ((0, 0), (1, 0), (2, 1))  # (fold, seed index): two folds of seed 0, one of seed 1
# Largest |p_fused - p_alone| of an OOF probability that passes, per precision. Measured under
# FUSED_EXACT on that EPYC (width 0.25 / 1.0): fp32 5.0e-5 / 8.2e-6 (both compute in full fp32, TF32
# off; the kernels only sum in another order); bf16 2.3e-4 / 3.5e-4 (autocast rounds every
# convolution's and matmul's inputs to 8 mantissa bits, 3.9e-3 relative; fp16 to 11 bits, and its
# gradient scaler skips a fused group's step when any member overflows). The bound above: two
# different members of one fold (seeds 0 and 1, both alone) differ by only 2.4e-2 / 1.7e-2 after 8
# steps, so a looser tolerance such as 2e-2 would pass a group that returned another member's
# probabilities; the step records that figure and fails when it is not above the tolerance.
# fp32 1e-3 (20x the largest measured), bf16 / fp16 5e-3 (14x; 3.4x below 1.7e-2).
FUSED_TOL = {"fp32": 1e-3, "bf16": 5e-3, "fp16": 5e-3}


class Skip(Exception):
    """A step that does not apply here; recorded as skipped, which fails the run (exit code 1)."""


class Incomplete(Exception):
    """A step that ran out of its time box part way: recorded as failed, with ``results`` (what it
    measured until then)."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


# --------------------------------------------------------------------------- shared helpers


def compose(root: Path, data_dir: Path, device: str, *overrides: str):
    """The real config (the competition profile) on ``data_dir``, outputs under ``root``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    ov = [f"paths.root={root}", f"data.dir={data_dir}", f"runtime.device={device}", "runtime.progress=false",
          "pseudo.models=[]", "pseudo.blend=mean", "screen.enabled=false",
          *(DRY_RUN_MODELS if device == "cpu" else []), *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=ov)


def fixture_copy(work: Path) -> Path:
    """A private copy of the committed fixture (400 train / 119 test real MNIST rows)."""
    d = work / "digits"
    if not d.exists():
        shutil.copytree(FIXTURE, d)
    return d


def competition(args, work: Path):
    """``(workspace, source)``: the real competition under ``--data`` when it is built, else the
    fixture; folds written under ``work``."""
    from pipeline.workspace import Workspace

    real = Path(args.data)
    data_dir = real if (real / "train.csv").exists() else fixture_copy(work)
    cfg = compose(work, data_dir, args.device, "data.build_offline=false", "runtime.estimate=false")
    return Workspace.load(cfg), "real MNIST" if data_dir == real else "fixture"


def tiled_competition(comp, rows: int):
    """``comp`` with its training images repeated (real digits, not noise) to ``rows`` rows."""
    reps = -(-rows // len(comp.x_train))
    import numpy as np

    x = np.concatenate([np.asarray(comp.x_train)] * reps)[:rows]
    y = np.concatenate([comp.y_train] * reps)[:rows]
    return dataclasses.replace(comp, x_train=x, y_train=y)


def member_spec(ws, model: str, key=None, **changes):
    """The fit spec of ``model``'s fold-0 member (or of ``key``) under ``ws``; ``changes`` replace
    ``train`` / ``runtime`` fields (``batch_size``, ``compile``, ``epochs`` ...)."""
    from pipeline.train.engine import FitSpec
    from pipeline.members import MemberKey

    key = key or MemberKey(model, 0)
    spec = FitSpec.create(ws.settings.models[model], ws.settings.runtime, key, ws.member_config(key))
    train = {k: v for k, v in changes.items() if hasattr(spec.train, k)}
    rt = {k: v for k, v in changes.items() if hasattr(spec.runtime, k)}
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **train),
                               runtime=dataclasses.replace(spec.runtime, **rt))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    """Start a new peak of torch's allocator on ``device`` (CUDA; nothing on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float | None:
    """The most memory (MiB) torch's allocator held on ``device`` in this process since the last
    :func:`reset_peak_memory` (``torch.cuda.max_memory_allocated``: it counts this process's
    tensors, so it holds in containers where ``nvidia-smi`` cannot see the process); None on the CPU.

    Raises:
        RuntimeError: CUDA reports no memory at all after work ran on it (the figure would be empty).
    """
    import torch

    if device.type != "cuda":
        return None
    mib = torch.cuda.max_memory_allocated(device) / 2**20
    if mib <= 0:
        raise RuntimeError(f"torch.cuda.max_memory_allocated({device}) is 0 after work on it: no peak memory figure")
    return round(mib, 1)


@contextlib.contextmanager
def host_syncs(device):
    """Within the block: ``torch.cuda.set_sync_debug_mode("warn")`` on CUDA (nothing is set on
    the CPU, where no GPU->host synchronisation exists). Yields a list that, when the block ends,
    holds ``file:line`` of every synchronising call the block made (torch's warnings that name a
    synchronising CUDA operation, also when something else raised them)."""
    import torch

    cuda = device.type == "cuda"
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    found += [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def fused_keys(m: int, k: int = 5):
    """``m`` members of ``cnn_deotte`` for a fused group: member ``i`` fold ``i % k``, seed index ``i // k``."""
    from pipeline.members import MemberKey

    return [MemberKey("cnn_deotte", i % k, i // k) for i in range(m)]


def fused_steps(specs, folds, batch: int) -> int:
    """Fused steps per epoch of a group of ``specs``: each member's training rows (every fold but
    its own) in whole batches (the loaders drop the last partial batch)."""
    import numpy as np

    return min(int(np.sum(folds != s.key.fold)) // batch for s in specs)


def write_partial(args, results: dict) -> None:
    """Write what step ``args.step`` measured so far to ``<out>/steps/<step>.partial.json``: the
    orchestrator keeps it when the step is killed at the end of its time box."""
    if getattr(args, "step", None):
        d = Path(args.out) / "steps"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{args.step}.partial.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(d / f"{args.step}.partial.json")


class ClockedBatches:
    """A member's batches, noting when the training loop asked past the last one: the moment
    the host has issued every step of the epoch (the GPU may still be working)."""

    def __init__(self, inner):
        self.inner, self.issued = inner, 0.0

    def __getattr__(self, name):  # the generator set_epoch reseeds, the dataset ...
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        yield from self.inner
        self.issued = time.perf_counter()


def timed_epoch(loop, spec, epoch: int) -> dict:
    """One epoch of the real loop, timed: wall, host (issuing) and GPU (CUDA events) ms per step."""
    import torch

    from pipeline.train.engine import train_epoch

    clock = loop.batches = ClockedBatches(loop.batches)
    sync(loop.device)
    cuda = loop.device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    train_epoch(loop, spec, epoch)
    if cuda:
        end.record()
    sync(loop.device)
    wall = time.perf_counter() - t0
    loop.batches = clock.inner
    steps = len(clock)
    out = {"steps": steps, "images_per_s": round(steps * spec.train.batch_size / wall),
           "wall_ms_per_step": round(wall / steps * 1e3, 3),
           "host_ms_per_step": round((clock.issued - t0) / steps * 1e3, 3)}
    if cuda:
        out["gpu_ms_per_step"] = round(start.elapsed_time(end) / steps, 3)
        out["peak_gpu_memory_mb"] = peak_memory_mb(loop.device)
    return out


# --------------------------------------------------------------------------- the steps


def step_environment(args, work: Path) -> dict:
    import importlib.metadata as md

    import torch

    from pipeline.device import resolve_precision, select_device

    device = select_device(args.device)
    out = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "cpu_cores": os.cpu_count(), "cpu": _cpu_model(),
           "precision_auto": resolve_precision("auto", device).value}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                "capability": f"{props.major}.{props.minor}", "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count, "nvidia_smi": shutil.which("nvidia-smi") is not None}
    versions = {}
    for pkg in ("timm", "numpy", "pandas", "scikit-learn", "joblib", "safetensors", "hydra-core", "omegaconf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    out["packages"] = versions
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def step_pytest_gpu(args, work: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           str(REPO / "tests" / "test_cuda.py")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {proc.returncode}: {tail}")
    if "passed" not in tail and args.device != "cpu":
        raise RuntimeError(f"no GPU test ran: {tail}")
    return {"summary": tail}


def step_fused_vs_alone(args, work: Path) -> dict:
    """:data:`FUSED_MEMBERS` of ``cnn_deotte`` trained alone and as one fused group under
    :data:`FUSED_EXACT`, on the fixture, in fp32 and (when it differs) the precision ``auto``
    resolves to on this device. Per precision: the largest |p_fused - p_alone| of an OOF
    probability (each member and overall), the fold accuracies, and as the scale of a real
    difference the same comparison between two different members of fold 0 (seeds 0 and 1, both
    alone).

    Raises:
        AssertionError: a member's OOF probabilities differ by more than :data:`FUSED_TOL` of
            its precision, or its OOF rows differ, or it left the group (training diverged), or
            two different members differ by no more than the tolerance (the comparison could
            not tell them apart).
    """
    import numpy as np

    from pipeline.device import resolve_precision, select_device
    from pipeline.members import MemberKey
    from pipeline.train import fused
    from pipeline.train.engine import fit_member
    from pipeline.workspace import Workspace

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read when CUDA starts
    resolved = resolve_precision("auto", select_device(args.device)).value
    keys = [MemberKey("cnn_deotte", fold, seed) for fold, seed in FUSED_MEMBERS]
    other = MemberKey("cnn_deotte", 0, 1)  # fold 0 as keys[0], another seed: another member
    results = {"members": [str(k) for k in keys], "precision_auto": resolved, "settings": FUSED_EXACT}
    problems = []
    for precision in dict.fromkeys(["fp32", resolved]):
        t0 = time.perf_counter()
        cfg = compose(work / precision, fixture_copy(work), args.device, *FUSED_EXACT, f"train.precision={precision}")
        ws = Workspace.load(cfg)
        specs = [member_spec(ws, "cnn_deotte", key) for key in keys]
        alone = [fit_member(spec, ws.comp, ws.folds, predict_test=False) for spec in specs]
        together = fused.fit_group(specs, ws.comp, ws.folds, predict_test=False)
        control = fit_member(member_spec(ws, "cnn_deotte", other), ws.comp, ws.folds, predict_test=False)
        tol = FUSED_TOL[precision]
        row = {"precision": specs[0].precision.value, "tolerance": tol}
        left = [f"{k}: {getattr(f, 'reason', f)}" for k, f in zip(keys, together) if not hasattr(f, "oof")]
        if left:
            problems.append(f"{precision}: members left the fused group: {'; '.join(left)}")
            results[precision] = row
            continue
        diffs = [float(np.abs(f.oof - a.oof).max()) if np.array_equal(f.row_ids, a.row_ids) else float("inf")
                 for a, f in zip(alone, together)]
        scale = float(np.abs(control.oof - alone[0].oof).max())
        row |= {"max_abs_diff": max(diffs), "per_member": diffs, "another_member_max_abs_diff": scale,
                "accuracy_alone": [a.metrics["accuracy"] for a in alone],
                "accuracy_fused": [f.metrics["accuracy"] for f in together],
                "seconds": round(time.perf_counter() - t0, 1)}
        results[precision] = row
        print(json.dumps(row), flush=True)
        if max(diffs) > tol:
            problems.append(f"{precision}: fused and alone differ by {max(diffs):.2e} (> {tol}; per member "
                            f"{', '.join(f'{d:.1e}' for d in diffs)})")
        if scale <= tol:
            problems.append(f"{precision}: two different members differ by only {scale:.2e} (<= {tol}): "
                            f"the comparison cannot tell members apart")
    if problems:
        raise AssertionError("; ".join(problems))
    return results


def step_averaging_resume(args, work: Path) -> dict:
    import numpy as np

    from pipeline.train.engine import FitSpec, fit_member
    from pipeline.members import MemberKey
    from pipeline.workspace import Workspace

    class Stop(Exception):
        pass

    def stop(epoch, record):
        if epoch == 2:
            raise Stop

    results, worst = {}, 0.0
    for name, extra in (("plain", []), ("ema", ["train.ema=0.9"]), ("swa", ["train.swa=0.5"])):
        cfg = compose(work / name, fixture_copy(work), args.device, "folds.k=2", "train.min_steps=0",
                      "train.batch_size=32", "models.cnn_deotte.train.epochs=4", "models.cnn_deotte.kwargs.width=0.25",
                      "runtime.deterministic=true", "aug=none", *extra)
        ws = Workspace.load(cfg)
        key = MemberKey("cnn_deotte", 0)
        spec = FitSpec.create(ws.settings.models["cnn_deotte"], ws.settings.runtime, key, ws.member_config(key))
        ref = fit_member(spec, ws.comp, ws.folds, predict_test=False)
        path = work / name / "resume.pt"
        try:
            fit_member(spec, ws.comp, ws.folds, predict_test=False, resume_path=path, on_epoch=stop)
        except Stop:
            pass
        res = fit_member(spec, ws.comp, ws.folds, predict_test=False, resume_path=path)
        diff = float(np.abs(res.oof - ref.oof).max())
        worst = max(worst, diff)
        results[name] = {"max_abs_diff": diff, "resumed_after_epoch": res.metrics["resumed_after_epoch"],
                         "accuracy": res.metrics["accuracy"], "precision": res.metrics["precision"]}
        if name in ("ema", "swa"):
            results[name]["accuracy_raw_weights"] = res.metrics[name]["accuracy_without"]
    tol = RESUME_TOL["cpu" if args.device == "cpu" else "cuda"]
    results["tolerance"] = tol
    if worst > tol or any(r["resumed_after_epoch"] != 2 for k, r in results.items() if k != "tolerance"):
        raise AssertionError(f"resume differs from the uninterrupted run by {worst:.2e} (> {tol}): {results}")
    return results


def step_sync_audit(args, work: Path) -> dict:
    """GPU->host synchronisations in one epoch of the real loop (plain, EMA, SWA) and in one
    epoch of a fused group of :data:`AUDIT_GROUP` members (:func:`pipeline.train.fused.group_epoch`),
    each after a warm-up epoch. Raises AssertionError when an epoch synchronises more often than
    it reads its figures back (2 reads, the fused group 3 with fp16's overflow counts; plus one per
    step with fp16's gradient scaler)."""
    import numpy as np

    from pipeline.device import select_device
    from pipeline.train import fused
    from pipeline.train.engine import setup_loop, train_epoch

    ws, source = competition(args, work)
    batch = args.batches[0]
    steps = 8 if args.device == "cpu" else 32
    comp = tiled_competition(ws.comp, steps * batch)
    results = {"data": source}
    for name, changes in (("plain", {}), ("ema", {"ema": 0.9}), ("swa", {"swa": 0.5})):
        spec = member_spec(ws, "cnn_deotte", epochs=2, min_steps=0, batch_size=batch, **changes)
        loop = setup_loop(spec, comp, np.arange(len(comp.x_train)))
        train_epoch(loop, spec, 1)  # warm-up (and, for SWA, epoch 2 is the averaged one)
        sync(loop.device)
        with host_syncs(loop.device) as found:
            train_epoch(loop, spec, 2)
        n = len(loop.batches)
        allowed = 2 + (n if spec.precision.value == "fp16" else 0)  # the epoch's loss/acc reads; fp16's scaler
        results[name] = {"steps": n, "syncs": len(found), "allowed": allowed, "precision": spec.precision.value,
                         "where": sorted(set(found))}
    # the fused group's epoch: what CUDA trains by default (runtime.fuse=auto)
    folds = np.arange(len(comp.x_train)) % 5
    specs = [member_spec(ws, "cnn_deotte", key, epochs=2, min_steps=0, batch_size=batch)
             for key in fused_keys(AUDIT_GROUP)]
    device = select_device(specs[0].runtime.device)
    g = fused.setup_group(specs, comp, folds)
    fused.group_epoch(g, 1)  # warm-up
    sync(device)
    with host_syncs(device) as found:
        fused.group_epoch(g, 2)
    n = fused_steps(specs, folds, batch)
    fp16 = specs[0].precision.value == "fp16"
    results["fused"] = {"members": len(specs), "steps": n, "syncs": len(found), "precision": specs[0].precision.value,
                        "allowed": 2 + (1 + n if fp16 else 0), "where": sorted(set(found))}
    del g
    if args.device == "cpu":
        results["note"] = "CPU: no GPU->host synchronisation exists; the audit ran the epochs only"
    bad = {k: v for k, v in results.items() if isinstance(v, dict) and v["syncs"] > v["allowed"]}
    if bad:
        raise AssertionError(f"host syncs inside the training steps: {bad}")
    return results


def step_throughput(args, work: Path) -> dict:
    """The sweep over ``--models`` x ``--batches`` x eager/compiled, one row per run (written
    as it goes, see :func:`write_partial`). Raises :class:`Incomplete` (with the rows measured)
    before a run that would end after the step's time box (``--step-deadline``), judged by the
    last run of the same mode (seconds)."""
    import numpy as np

    from pipeline.device import select_device
    from pipeline.train.engine import setup_loop, train_epoch

    ws, source = competition(args, work)
    comp = tiled_competition(ws.comp, args.rows)
    results = {"data": source, "rows": args.rows, "runs": []}
    plan = [(model, batch, compiled) for model in args.models for batch in args.batches for compiled in (False, True)
            if not compiled or batch in args.compile_batches]
    last: dict[bool, float] = {}
    for i, (model, batch, compiled) in enumerate(plan):
        deadline = getattr(args, "step_deadline", None)
        if deadline and i and time.time() + 1.2 * last.get(compiled, max(last.values())) + 5 > deadline:
            results["left_out"] = [f"{m} batch {b} {'compile' if c else 'eager'}" for m, b, c in plan[i:]]
            raise Incomplete(f"out of its time box after {i} of {len(plan)} runs; left out: "
                             f"{', '.join(results['left_out'])}", results)
        t0 = time.perf_counter()
        spec = member_spec(ws, model, batch_size=batch, compile=compiled, epochs=2, min_steps=0)
        reset_peak_memory(select_device(spec.runtime.device))
        loop = setup_loop(spec, comp, np.arange(len(comp.x_train)))
        train_epoch(loop, spec, 1)  # warm-up: compilation, cuDNN autotuning
        warm = time.perf_counter() - t0
        row = {"model": model, "batch": batch, "mode": "compile" if compiled else "eager",
               "precision": spec.precision.value, "warmup_s": round(warm, 1), **timed_epoch(loop, spec, 2)}
        results["runs"].append(row)
        write_partial(args, results)
        print(json.dumps(row), flush=True)
        del loop
        last[compiled] = time.perf_counter() - t0
    return results


def _side_by_side_worker(args_dict: dict, work: str, slot: int, n: int, folder: str, seconds: float) -> dict:
    """One of ``n`` processes: cnn_deotte at batch 128 on its device, warmed up, then epochs of
    the real loop from a common start for ``seconds``; its peak GPU memory (torch, MiB) since it
    set its loop up."""
    import numpy as np
    import torch

    from pipeline.train.engine import setup_loop, train_epoch
    from pipeline.device import select_device, use_device
    from pipeline.train.runtime import barrier, configure_threads

    args = argparse.Namespace(**args_dict)
    device = select_device(args.device, slot=slot)
    use_device(device)
    configure_threads(None, device, n)
    ws, _ = competition(args, Path(work) / f"slot{slot}")
    comp = tiled_competition(ws.comp, args.rows)
    spec = member_spec(ws, "cnn_deotte", epochs=1000, min_steps=0, batch_size=args.side_batch, device=str(device))
    loop = setup_loop(spec, comp, np.arange(len(comp.x_train)))
    train_epoch(loop, spec, 1)
    sync(loop.device)
    barrier(folder, slot, n)()
    t0, images, epoch = time.perf_counter(), 0, 1
    while time.perf_counter() - t0 < seconds:
        epoch += 1
        train_epoch(loop, spec, epoch)
        images += len(loop.batches) * spec.train.batch_size
    sync(loop.device)
    return {"images": images, "seconds": time.perf_counter() - t0, "device": str(device),
            "threads": torch.get_num_threads(), "peak_gpu_memory_mb": peak_memory_mb(device)}


def step_side_by_side(args, work: Path) -> dict:
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    results = {"model": "cnn_deotte", "batch": args.side_batch, "seconds": args.side_seconds, "jobs": {}}
    for n in args.side_jobs:
        with tempfile.TemporaryDirectory() as folder:
            runs = Parallel(n_jobs=n, backend="loky")(
                delayed(_side_by_side_worker)(vars(args), str(work), slot, n, folder, args.side_seconds)
                for slot in range(n))
        get_reusable_executor().shutdown(wait=True)
        total = sum(r["images"] for r in runs) / max(r["seconds"] for r in runs)
        results["jobs"][str(n)] = {"images_per_s": round(total), "per_process": [round(r["images"] / r["seconds"])
                                                                               for r in runs],
                                   "devices": sorted({r["device"] for r in runs}),
                                   "peak_gpu_memory_mb": [r["peak_gpu_memory_mb"] for r in runs]}
        write_partial(args, results)
        print(n, results["jobs"][str(n)], flush=True)
    one = results["jobs"].get("1", {}).get("images_per_s")
    if one:
        results["speedup"] = {n: round(r["images_per_s"] / one, 2) for n, r in results["jobs"].items()}
    return results


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


def step_fused(args, work: Path) -> dict:
    """Fused groups of ``--fused`` sizes of ``cnn_deotte`` at ``--side-batch``: one epoch of
    :func:`pipeline.train.fused.group_epoch` timed after a warm-up epoch; images/s of all members
    together and the peak GPU memory (torch, MiB) of setting the group up and training it."""
    import numpy as np

    from pipeline.device import select_device
    from pipeline.train import fused

    ws, source = competition(args, work)
    comp = tiled_competition(ws.comp, args.rows)
    k = 5
    folds = np.arange(len(comp.x_train)) % k
    results = {"data": source, "rows": args.rows, "batch": args.side_batch, "groups": []}
    for m in args.fused:
        specs = [member_spec(ws, "cnn_deotte", key, epochs=3, min_steps=0, batch_size=args.side_batch)
                 for key in fused_keys(m, k)]
        device = select_device(specs[0].runtime.device)
        steps = fused_steps(specs, folds, args.side_batch)
        t0 = time.perf_counter()
        reset_peak_memory(device)
        g = fused.setup_group(specs, comp, folds)
        fused.group_epoch(g, 1)  # warm-up: cuDNN autotuning of the grouped convolutions
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        fused.group_epoch(g, 2)
        sync(device)
        wall = time.perf_counter() - t0
        row = {"members": m, "precision": specs[0].precision.value, "steps": steps,
               "images_per_s": round(m * steps * args.side_batch / wall), "warmup_s": round(warm, 1),
               "peak_gpu_memory_mb": peak_memory_mb(device)}
        results["groups"].append(row)
        write_partial(args, results)
        print(json.dumps(row), flush=True)
        del g
    return results


# --------------------------------------------------------------------------- orchestration


def run_step(args) -> int:
    """Run step ``args.step`` in this process; write ``<out>/steps/<name>.json`` (status passed,
    failed or skipped; ``seconds``; ``error``; ``results``). Returns 0: the record is the result."""
    out = Path(args.out)
    work = out / "work" / args.step
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        record = {"status": "passed", "results": globals()[f"step_{args.step}"](args, work)}
    except Skip as e:
        record = {"status": "skipped", "error": str(e)}
    except Incomplete as e:
        record = {"status": "failed", "error": f"Incomplete: {e}", "results": e.results}
    except BaseException as e:  # noqa: BLE001 - any failure is this step's result
        traceback.print_exc()
        record = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "steps").mkdir(exist_ok=True)
    (out / "steps" / f"{args.step}.json").write_text(json.dumps(record, indent=2, default=str))
    return 0


def _blocker(out: Path) -> Path:
    """A folder whose ``sitecustomize.py`` makes :data:`BLOCKED` unimportable in the steps."""
    d = out / "_gpu_machine_imports"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {BLOCKED!r}\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not on a bare GPU machine (benchmarks/gpu_check.py)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n")
    return d


def time_box(name: str, left: float, remaining: Sequence[str], share: dict[str, float]) -> float:
    """Seconds step ``name`` may run: its ``share`` (one of :data:`SHARE`) of the ``left``
    seconds, among the steps ``remaining`` (``name`` and those after it). When every step runs its
    whole box the boxes add up to the budget exactly (each is its share of the whole budget); time
    a step leaves unused goes to the later ones in proportion to their shares."""
    return left * share[name] / sum(share[s] for s in remaining)


def run_steps(steps: Sequence[str], budget_s: float, run_one: Callable[[str, float], dict],
              share: dict[str, float], clock: Callable[[], float] = time.monotonic) -> dict[str, dict]:
    """Run ``steps`` in order within ``budget_s`` seconds (measured on ``clock``): each by
    ``run_one(name, box)``, which returns its record and must end within ``box`` seconds
    (:func:`time_box` with ``share``). A step whose box is under :data:`MIN_BOX_S` is recorded as skipped
    ("out of time") without running. Returns each step's record, with ``started_s`` (seconds into
    the run) and ``time_box_s``: ``started_s + time_box_s`` never passes ``budget_s``."""
    start = clock()
    deadline = start + budget_s
    report = {}
    for i, name in enumerate(steps):
        now = clock()
        left = deadline - now
        box = time_box(name, max(left, 0.0), steps[i:], share)
        timing = {"started_s": round(now - start, 1), "time_box_s": round(box, 1)}
        if box < MIN_BOX_S:
            report[name] = {"status": "skipped", "seconds": 0.0, **timing,
                            "error": f"out of time: {max(left, 0):.0f} s of --budget-s {budget_s:g} left, "
                                     f"a box of {box:.0f} s (< {MIN_BOX_S:g} s)"}
        else:
            report[name] = run_one(name, box) | timing
        rec = report[name]
        print(f"gpu_check: {name:17s} {rec['status']:7s} {rec['seconds']:6.1f} s of {box:5.0f}  "
              f"{rec.get('error', '')}", flush=True)
    return report


def verdict(report: dict[str, dict]) -> int:
    """The exit code: 0 when every step ran and passed, 1 when any failed or was skipped."""
    return 0 if report and all(r["status"] == "passed" for r in report.values()) else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the device's defaults filled in (``--device`` stays None when not
    given: :func:`main` picks CUDA or refuses)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and work files")
    p.add_argument("--device", default=None, help="cuda (default when there is one), cuda:N, or cpu (dry run)")
    p.add_argument("--data", default=str(REPO / "data" / "digit-recognizer"), help="a built competition folder")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--budget-s", type=float, default=None, help="whole-run limit in seconds (CUDA 540, CPU 330)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--compile-batches", nargs="*", type=int, default=None)
    p.add_argument("--rows", type=int, default=None, help="training rows per throughput epoch")
    p.add_argument("--side-jobs", nargs="+", type=int, default=None)
    p.add_argument("--side-seconds", type=float, default=None)
    p.add_argument("--side-batch", type=int, default=128)
    p.add_argument("--fused", nargs="+", type=int, default=None, help="fused group sizes (step fused)")
    p.add_argument("--allow-all-imports", action="store_true")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() seconds
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    defaults = {"models": ["cnn_deotte", "cnn_keras", "resnet_timm"], "batches": [32] if cpu else [128, 512, 2048],
                "compile_batches": [] if cpu else [512], "rows": 512 if cpu else 32768,
                "side_jobs": [1, 2] if cpu else [1, 2, 4], "side_seconds": 1.0 if cpu else 12.0,
                "fused": [1, 3] if cpu else [1, 5, 10, 15], "budget_s": 330.0 if cpu else 540.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main() -> int:
    args = parse_args()
    import torch

    if args.device is None:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; for the dry run use --device cpu", file=sys.stderr)
            return 2
        args = parse_args([*sys.argv[1:], "--device", "cuda"])
    if args.step:
        return run_step(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "steps", ignore_errors=True)
    env = dict(os.environ)
    if args.device == "cpu":  # see the module docstring: one intra-op thread per step process on the CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    if not args.allow_all_imports:
        env["PYTHONPATH"] = os.pathsep.join([str(_blocker(out)), str(REPO), env.get("PYTHONPATH", "")])
    started = time.time()
    report = {"device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s,
              "blocked_imports": [] if args.allow_all_imports else list(BLOCKED), "steps": {}}
    passthrough = sys.argv[1:]
    steps = [s for s in STEPS if s in args.steps]  # always in STEPS' order: key checks first
    with open(out / "gpu_check.log", "w") as log:

        def run_one(name: str, box: float) -> dict:
            log.write(f"\n===== {name} (time box {box:.0f} s) =====\n")
            log.flush()
            t0 = time.perf_counter()
            f, partial = out / "steps" / f"{name}.json", out / "steps" / f"{name}.partial.json"
            cmd = [sys.executable, __file__, *passthrough, "--device", args.device, "--step", name,
                   "--step-deadline", f"{time.time() + box:.1f}"]
            # its own process group: at the end of its box the step goes with every process it started
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                proc.wait(timeout=box)
                rec = json.loads(f.read_text()) if f.exists() else {
                    "status": "failed", "error": "the step died without a record (see gpu_check.log)"}
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rec = {"status": "failed", "error": f"timed out after {box:.0f} s (its time box)"}
            if "results" not in rec and partial.exists():  # what it measured before it was killed
                rec["results"] = json.loads(partial.read_text())
            rec.setdefault("seconds", round(time.perf_counter() - t0, 1))
            return rec

        report["steps"] = run_steps(steps, args.budget_s, run_one, SHARE["cpu" if args.device == "cpu" else "cuda"])
    report["seconds"] = round(time.time() - started, 1)
    code = verdict(report["steps"])
    report["passed"] = code == 0
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")
    by = {st: [n for n, r in report["steps"].items() if r["status"] == st] for st in ("passed", "failed", "skipped")}
    print(f"gpu_check: {'PASSED' if code == 0 else 'NOT PASSED'}: {len(by['passed'])} of {len(steps)} steps passed"
          + "".join(f"; {st}: {', '.join(by[st])}" for st in ("failed", "skipped") if by[st])
          + f"; {report['seconds']:.0f} s of {args.budget_s:g}; {out / 'gpu_check.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
