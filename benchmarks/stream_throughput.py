"""Streamed against in-memory training batches (``runtime.stream``), side by side in one run.

On a competition whose training images fit in memory, one model trains on the same rows two ways,
alternately (so the drift of a shared machine hits both alike): ``DeviceBatches`` (the rows copied
to the device once) and ``StreamedBatches`` (each batch's rows gathered from the decoded cache, a
memory map, by a prefetch thread, pinned and copied on CUDA). Printed with the hardware: images/s
of whole training steps (augmentation and the model included) and of the data path alone, the
streamed/in-memory ratio, and the peak resident memory of the process (MiB).

    python benchmarks/stream_throughput.py                                  # the digits (python run.py stage=data)
    python benchmarks/stream_throughput.py --override data.dir=data/elpv data.img_size=128 --model resnet9

Needs the competition data (``python run.py stage=data`` builds the offline default).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from train_throughput import hardware

from pipeline.runsettings import run_settings
from pipeline.workspace import Workspace
from pipeline import augment
from pipeline.device import resolve_precision, select_device
from pipeline.models import create_model
from pipeline.settings import aug_settings
from pipeline.train.engine import adamw_options, train_step

CONF_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "conf"
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf is not available")


def timed(batches, step, n: int, warmup: int) -> float:
    """Images/s of ``step(x, y)`` over ``n`` batches after ``warmup`` (the epoch restarted as needed)."""
    done, t0, it = 0, None, iter(batches)
    for i in range(warmup + n):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        if i == warmup:
            t0 = time.perf_counter()
        step(x, y)
        done += len(y) if i >= warmup else 0
    return done / (time.perf_counter() - t0)


def compare(x, rows: np.ndarray, labels: np.ndarray, num_classes: int, model_cfg, aug, device: torch.device,
            precision, batch_size: int, steps: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median images/s of training steps and of the data path alone, per path (``in memory``,
    ``streamed``), measured alternately ``repeats`` times on ``x[rows]`` (``(N, C, S, S)`` uint8,
    a memory map) with ``labels`` (one per row of ``rows``)."""
    model = create_model(model_cfg.arch, num_classes, x.shape[1], x.shape[2], **dict(model_cfg.kwargs)).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **adamw_options(device))
    paths = {"in memory": lambda: augment.DeviceBatches(x[rows], labels, batch_size, device, aug, 0),
             "streamed": lambda: augment.StreamedBatches(x, rows, labels, batch_size, device, aug, 0)}

    def train(xb, yb):
        train_step(model, opt, xb, yb, 0.0, True, precision)

    def data_only(xb, yb):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    figures: dict[str, dict[str, list[float]]] = {k: {"train": [], "data": []} for k in paths}
    for _ in range(repeats):
        for name, make in paths.items():
            batches = make()
            figures[name]["train"].append(timed(batches, train, steps, 3))
            figures[name]["data"].append(timed(batches, data_only, steps * 4, 3))
    return {name: {k: statistics.median(v) for k, v in f.items()} for name, f in figures.items()}


def report(figures: dict[str, dict[str, float]]) -> str:
    """The table of :func:`compare` and the streamed / in-memory ratio of training images/s."""
    lines = [f"{'path':10s} {'train img/s':>12s} {'data path img/s':>16s}"]
    lines += [f"{name:10s} {f['train']:12.0f} {f['data']:16.0f}" for name, f in figures.items()]
    lines.append(f"streamed / in memory, training: {figures['streamed']['train'] / figures['in memory']['train']:.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides (data.dir=..., data.img_size=...)")
    p.add_argument("--model", default="cnn_deotte")
    p.add_argument("--rows", type=int, default=20000, help="training rows (at most the competition's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per window")
    p.add_argument("--repeats", type=int, default=3, help="alternating windows per path")
    args = p.parse_args()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.override)
    device = select_device(str(cfg.runtime.device))
    comp = Workspace(run_settings(cfg)).comp
    rows = np.arange(min(args.rows, len(comp.x_train)))
    precision = resolve_precision(cfg.train.precision, device)
    print(hardware(device))
    print(f"{type(comp.x_train).__name__} source {comp.x_train.shape} uint8 ({comp.x_train.nbytes / 2**20:.0f} MiB), "
          f"{len(rows)} rows, model {args.model}, batch {args.batch_size}, precision {precision.value}, "
          f"{args.repeats} alternating windows of {args.steps} steps\n")
    figures = compare(comp.x_train, rows, comp.y_train[rows], comp.num_classes, cfg.models[args.model],
                      aug_settings(cfg, args.model), device, precision, args.batch_size, args.steps, args.repeats)
    print(report(figures))
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
