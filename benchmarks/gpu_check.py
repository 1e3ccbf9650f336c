"""One command that verifies and measures the whole CUDA path on an NVIDIA GPU.

    python benchmarks/gpu_check.py --out gpu_check/               # on a GPU: about 6-8 minutes
    python benchmarks/gpu_check.py --out /tmp/dry --device cpu    # dry run on a CPU (< 3 minutes)

Each step runs in its own process with its own time box, and is recorded in
``<out>/gpu_check.json`` as passed / failed / skipped with its error and figures, so one failure
hides nothing else; every step's output goes to ``<out>/gpu_check.log``. In order:

1. ``environment``: GPU name, compute capability, memory, torch / CUDA / cuDNN versions, the
   precision ``train.precision=auto`` resolves to, and which optional packages are importable;
2. ``pytest_gpu``: ``pytest -m gpu tests/test_cuda.py``;
3. ``averaging_resume``: a member without a weight average, with EMA and with SWA (cnn_deotte:
   BatchNorm), each interrupted after epoch 2 of 4 and resumed, against the uninterrupted run:
   the largest OOF probability difference;
4. ``sync_audit``: one epoch of the real loop (:func:`pipeline.train.engine.train_epoch`) with
   ``torch.cuda.set_sync_debug_mode("warn")``: every GPU->host synchronisation and where;
5. ``throughput``: the real epoch function for ``cnn_deotte``, ``cnn_keras`` and
   ``resnet_timm`` at batch 128, 512 and 2048, eager and ``runtime.compile=true`` (compiled at
   ``--compile-batches`` only: each compile costs tens of seconds): images/s, host ms per step
   (Python issuing the step) against GPU ms per step (CUDA events), peak GPU memory;
6. ``side_by_side``: 1, 2 and 4 processes each training cnn_deotte (batch 128) at once from a
   common start: images/s in all, what ``runtime.fold_jobs`` gains;
7. ``fused``: fused groups of M = 1, 5, 10, 15 ``cnn_deotte`` members (``runtime.fuse``,
   :mod:`pipeline.train.fused`; each member its own fold's rows and seed) at batch 128, one epoch
   of the real group loop timed after a warm-up epoch: images/s of all members together (against
   step 6's separate processes), peak GPU memory;
8. ``end_to_end``: ``run.py`` on the committed fixture (k=2, 2 epochs, the estimate on): folds,
   train (``runtime.fold_jobs=auto``), blend, and predict on a PNG; each member's
   ``metrics.json`` must name the device, and each process's peak GPU memory is read from
   ``nvidia-smi`` while it trains.

Data: the real MNIST arrays when ``--data`` (default ``data/digit-recognizer``) holds the built
competition, else the committed fixture's real digits, repeated to ``--rows`` rows for the
throughput steps. Nothing is downloaded. Only torch, timm, numpy, pandas, scikit-learn, joblib,
safetensors, scipy, pillow, tqdm, hydra-core, omegaconf and antlr4-python3-runtime are needed:
the steps run with albumentations, OpenCV, Optuna, matplotlib and skops made unimportable
(``--allow-all-imports`` lifts that), so the dry run proves the list. Exit code 0 when no step
failed, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIXTURE = REPO / "tests" / "fixtures" / "digits"
CONF_DIR = REPO / "pipeline" / "conf"

STEPS = ("environment", "pytest_gpu", "averaging_resume", "sync_audit", "throughput", "side_by_side", "fused",
         "end_to_end")
TIME_BOX_S = {"environment": 60, "pytest_gpu": 150, "averaging_resume": 120, "sync_audit": 90,
              "throughput": 300, "side_by_side": 120, "fused": 150, "end_to_end": 240}
BLOCKED = ("albumentations", "cv2", "optuna", "matplotlib", "skops")  # not on a bare GPU machine
# the dry run checks the code paths, not the figures: narrow models on a 2-core CPU
DRY_RUN_MODELS = ["models.cnn_deotte.kwargs.width=0.25", "models.cnn_keras.kwargs.width=0.25",
                  "+models.resnet_timm.kwargs.channels=[8,16,32,64]", "+models.resnet_timm.kwargs.layers=[1,1,1,1]"]
RESUME_TOL = {"cpu": 1e-6, "cuda": 1e-4}  # largest |p_resumed - p_uninterrupted| that passes


class Skip(Exception):
    """A step that does not apply here (e.g. CUDA-only figures on the CPU)."""


# --------------------------------------------------------------------------- shared helpers


def compose(root: Path, data_dir: Path, device: str, *overrides: str):
    """The real config (the competition profile) on ``data_dir``, outputs under ``root``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    ov = [f"paths.root={root}", f"data.dir={data_dir}", f"runtime.device={device}", "runtime.progress=false",
          "pseudo.models=[]", "pseudo.blend=mean", *(DRY_RUN_MODELS if device == "cpu" else []), *overrides]
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
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(loop.device) / 2**20, 1)
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
    import numpy as np
    import torch

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
        found = []
        if loop.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_epoch(loop, spec, 2)
        finally:
            if loop.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                found.append(f"{Path(w.filename).name}:{w.lineno}")
        steps = len(loop.batches)
        allowed = 2 + (steps if spec.precision.value == "fp16" else 0)  # the epoch's loss/acc reads; fp16's scaler
        results[name] = {"steps": steps, "syncs": len(found), "allowed": allowed, "precision": spec.precision.value,
                         "where": sorted(set(found))}
    if args.device == "cpu":
        results["note"] = "CPU: no GPU->host synchronisation exists; the audit ran the loop only"
    bad = {k: v for k, v in results.items() if isinstance(v, dict) and v["syncs"] > v["allowed"]}
    if bad:
        raise AssertionError(f"host syncs inside the training steps: {bad}")
    return results


def step_throughput(args, work: Path) -> dict:
    import numpy as np

    from pipeline.train.engine import setup_loop, train_epoch

    ws, source = competition(args, work)
    comp = tiled_competition(ws.comp, args.rows)
    results = {"data": source, "rows": args.rows, "runs": []}
    for model in args.models:
        for batch in args.batches:
            for compiled in (False, True):
                if compiled and batch not in args.compile_batches:
                    continue
                changes = {"batch_size": batch, "compile": compiled, "epochs": 2, "min_steps": 0}
                t0 = time.perf_counter()
                spec = member_spec(ws, model, **changes)
                loop = setup_loop(spec, comp, np.arange(len(comp.x_train)))
                train_epoch(loop, spec, 1)  # warm-up: compilation, cuDNN autotuning
                warm = time.perf_counter() - t0
                row = {"model": model, "batch": batch, "mode": "compile" if compiled else "eager",
                       "precision": spec.precision.value, "warmup_s": round(warm, 1), **timed_epoch(loop, spec, 2)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    return results


def _side_by_side_worker(args_dict: dict, work: str, slot: int, n: int, folder: str, seconds: float) -> dict:
    """One of ``n`` processes: cnn_deotte at batch 128 on its device, warmed up, then epochs of
    the real loop from a common start for ``seconds``."""
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
            "threads": torch.get_num_threads()}


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
                                   "devices": sorted({r["device"] for r in runs})}
        print(n, results["jobs"][str(n)], flush=True)
    one = results["jobs"].get("1", {}).get("images_per_s")
    if one:
        results["speedup"] = {n: round(r["images_per_s"] / one, 2) for n, r in results["jobs"].items()}
    return results


def _gpu_memory_poller(stop: threading.Event, peaks: dict) -> None:
    """Until ``stop``: the largest GPU memory (MiB) each process used, read from nvidia-smi."""
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            for line in out.stdout.strip().splitlines():
                pid, mib = (int(x) for x in line.split(","))
                peaks[pid] = max(peaks.get(pid, 0), mib)
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        stop.wait(0.5)


def step_end_to_end(args, work: Path) -> dict:
    from PIL import Image

    data_dir = fixture_copy(work)
    common = [f"paths.root={work}", f"data.dir={data_dir}", f"runtime.device={args.device}", "folds.k=2",
              "train.epochs=2", "train.min_steps=0", "train.batch_size=32", "models.cnn_deotte.train.epochs=2",
              "models.cnn_deotte.seeds=1",
              "pseudo.models=[]", "pseudo.blend=mean", "runtime.estimate=true", "runtime.progress=false",
              "ensemble=[cnn_deotte,mlp]", "blend.method=[mean,weighted]"]
    if args.device == "cpu":
        common += DRY_RUN_MODELS
    img = work / "digit.png"  # a PNG of the first test row
    import pandas as pd

    row = pd.read_csv(data_dir / "test.csv", nrows=1).to_numpy(dtype="uint8").reshape(28, 28)
    Image.fromarray(row).save(img)
    stages = {}
    peaks: dict[int, int] = {}
    stop = threading.Event()
    poller = None
    if args.device != "cpu" and shutil.which("nvidia-smi"):
        poller = threading.Thread(target=_gpu_memory_poller, args=(stop, peaks), daemon=True)
        poller.start()
    log_text = ""
    try:
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
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=5)
    from pipeline.members import read_metrics

    metrics = {}
    for d in sorted((work / "artifacts").glob("*/fold*")):
        if (d / "metrics.json").exists():
            m = read_metrics(d)
            metrics[f"{d.parent.name}/{d.name}"] = {k: m.raw.get(k) for k in ("device", "precision", "accuracy",
                                                                             "seconds", "peak_gpu_memory_mb")}
    want = args.device.split(":")[0]
    wrong = {k: m["device"] for k, m in metrics.items() if not str(m["device"]).startswith(want)}
    if len(metrics) != 4 or wrong:
        raise AssertionError(f"expected 4 members trained on {want}, got {metrics}")
    if want == "cuda" and any(not m["peak_gpu_memory_mb"] for m in metrics.values()):
        raise AssertionError("a CUDA member's metrics.json has no peak GPU memory")
    if not (work / "submissions" / "submission.csv").exists():
        raise AssertionError("no submission.csv")
    estimate = next((line.split("train: ", 1)[1] for line in log_text.splitlines() if "to train, about" in line), None)
    predicted = next((line.split(": ", 1)[1] for line in log_text.splitlines() if "digit.png:" in line), None)
    if estimate is None or predicted is None:
        raise AssertionError(f"missing the estimate ({estimate}) or the prediction ({predicted}) in the log")
    return {"stages": stages, "members": metrics, "estimate": estimate, "prediction": predicted,
            "gpu_memory_mib_per_process": {str(k): v for k, v in peaks.items()} or None}


# --------------------------------------------------------------------------- orchestration


def step_fused(args, work: Path) -> dict:
    import numpy as np
    import torch

    from pipeline.members import MemberKey
    from pipeline.train import fused

    ws, source = competition(args, work)
    comp = tiled_competition(ws.comp, args.rows)
    k = 5
    folds = np.arange(len(comp.x_train)) % k
    results = {"data": source, "rows": args.rows, "batch": args.side_batch, "groups": []}
    for m in args.fused:
        keys = [MemberKey("cnn_deotte", i % k, i // k) for i in range(m)]
        specs = [member_spec(ws, "cnn_deotte", key, epochs=3, min_steps=0, batch_size=args.side_batch) for key in keys]
        t0 = time.perf_counter()
        g = fused.setup_group(specs, comp, folds)
        fused.group_epoch(g, 1)  # warm-up: cuDNN autotuning of the grouped convolutions
        sync(g.loop.device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        fused.group_epoch(g, 2)
        sync(g.loop.device)
        wall = time.perf_counter() - t0
        row = {"members": m, "precision": specs[0].precision.value, "steps": len(g.batches[0]),
               "images_per_s": round(m * len(g.batches[0]) * args.side_batch / wall), "warmup_s": round(warm, 1)}
        if g.loop.device.type == "cuda":
            row["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(g.loop.device) / 2**20, 1)
        results["groups"].append(row)
        print(json.dumps(row), flush=True)
        del g
    return results


def run_step(args) -> int:
    """Run one step in this process; write ``<out>/steps/<name>.json``."""
    out = Path(args.out)
    work = out / "work" / args.step
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        record = {"status": "passed", "results": globals()[f"step_{args.step}"](args, work)}
    except Skip as e:
        record = {"status": "skipped", "error": str(e)}
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


def main() -> int:
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
    args = p.parse_args()
    import torch

    if args.device is None:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; for the dry run use --device cpu", file=sys.stderr)
            return 2
        args.device = "cuda"
    cpu = args.device == "cpu"
    defaults = {"models": ["cnn_deotte", "cnn_keras", "resnet_timm"], "batches": [32] if cpu else [128, 512, 2048],
                "compile_batches": [] if cpu else [512], "rows": 512 if cpu else 32768,
                "side_jobs": [1, 2] if cpu else [1, 2, 4], "side_seconds": 1.0 if cpu else 12.0,
                "fused": [1, 3] if cpu else [1, 5, 10, 15], "budget_s": 330.0 if cpu else 540.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.step:
        return run_step(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "steps", ignore_errors=True)
    env = dict(os.environ)
    if not args.allow_all_imports:
        env["PYTHONPATH"] = os.pathsep.join([str(_blocker(out)), str(REPO), env.get("PYTHONPATH", "")])
    started, deadline = time.time(), time.monotonic() + args.budget_s
    report = {"device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s,
              "blocked_imports": [] if args.allow_all_imports else list(BLOCKED), "steps": {}}
    passthrough = sys.argv[1:]
    with open(out / "gpu_check.log", "w") as log:
        for name in args.steps:
            left = deadline - time.monotonic()
            if left < 5:
                report["steps"][name] = {"status": "skipped", "seconds": 0.0,
                                         "error": f"out of time (--budget-s {args.budget_s})"}
                print(f"gpu_check: {name:17s} skipped  out of time", flush=True)
                continue
            box = min(TIME_BOX_S[name], left)
            log.write(f"\n===== {name} (time box {box:.0f} s) =====\n")
            log.flush()
            t0 = time.perf_counter()
            try:
                subprocess.run([sys.executable, __file__, *passthrough, "--device", args.device, "--step", name],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=box)
                f = out / "steps" / f"{name}.json"
                rec = json.loads(f.read_text()) if f.exists() else {
                    "status": "failed", "error": "the step died without a record (see gpu_check.log)"}
            except subprocess.TimeoutExpired:
                rec = {"status": "failed", "error": f"timed out after {box:.0f} s"}
            rec.setdefault("seconds", round(time.perf_counter() - t0, 1))
            report["steps"][name] = rec
            print(f"gpu_check: {name:17s} {rec['status']:7s} {rec['seconds']:6.1f} s  {rec.get('error', '')}",
                  flush=True)
    report["seconds"] = round(time.time() - started, 1)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")
    failed = [n for n, r in report["steps"].items() if r["status"] == "failed"]
    print(f"gpu_check: {len(report['steps']) - len(failed)} of {len(report['steps'])} steps passed or skipped "
          f"in {report['seconds']:.0f} s; {out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
