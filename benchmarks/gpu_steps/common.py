"""What the steps share: the real config on the fixture or the built competition, member specs,
device synchronisation, torch's peak memory, the host-sync audit and the timed epoch.

Every heavy import (torch, the pipeline) stands inside the function that needs it, so importing
this package costs nothing before a step runs, and tests can monkeypatch the pipeline's
functions (``pipeline.train.engine.fit_member`` ...) that a step calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "digits"
CONF_DIR = REPO / "pipeline" / "conf"

# the dry run checks the code paths, not the figures: narrow models on a 2-core CPU
DRY_RUN_MODELS = ["models.cnn_deotte.kwargs.width=0.25", "models.cnn_keras.kwargs.width=0.25",
                  "+models.resnet_timm.kwargs.channels=[8,16,32,64]", "+models.resnet_timm.kwargs.layers=[1,1,1,1]"]


class Skip(Exception):
    """A step that does not apply here; recorded as skipped, which fails the run (exit code 1)."""


class Incomplete(Exception):
    """A step that ran out of its time box part way: recorded as failed, with ``results`` (what it
    measured until then)."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


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
