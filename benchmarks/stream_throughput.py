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
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from train_throughput import hardware

from pipeline import augment, data
from pipeline.device import resolve_precision, select_device
from pipeline.models import create_model
from pipeline.settings import aug_settings
from pipeline.train.engine import adamw_options, train_step

CONF_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "conf"


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
    comp = data.load(cfg)
    rows = np.arange(min(args.rows, len(comp.x_train)))
    aug = aug_settings(cfg, args.model)
    precision = resolve_precision(cfg.train.precision, device)
    m = cfg.models[args.model]
    model = create_model(m.arch, comp.num_classes, comp.x_train.shape[1], comp.side, **dict(m.kwargs)).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **adamw_options(device))
    labels = comp.y_train[rows]
    paths = {"in memory": lambda: augment.DeviceBatches(comp.x_train[rows], labels, args.batch_size, device, aug, 0),
             "streamed": lambda: augment.StreamedBatches(comp.x_train, rows, labels, args.batch_size, device, aug, 0)}

    def train(x, y):
        train_step(model, opt, x, y, 0.0, True, precision)

    def data_only(x, y):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(hardware(device))
    print(f"{type(comp.x_train).__name__} source {comp.x_train.shape} uint8 ({comp.x_train.nbytes / 2**20:.0f} MiB), "
          f"{len(rows)} rows, model {args.model}, batch {args.batch_size}, precision {precision.value}, "
          f"{args.repeats} alternating windows of {args.steps} steps\n")
    figures: dict[str, dict[str, list[float]]] = {k: {"train": [], "data": []} for k in paths}
    for _ in range(args.repeats):
        for name, make in paths.items():
            batches = make()
            figures[name]["train"].append(timed(batches, train, args.steps, 3))
            figures[name]["data"].append(timed(batches, data_only, args.steps * 4, 3))
    print(f"{'path':10s} {'train img/s':>12s} {'data path img/s':>16s}")
    for name, f in figures.items():
        print(f"{name:10s} {statistics.median(f['train']):12.0f} {statistics.median(f['data']):16.0f}")
    ratio = statistics.median(figures["streamed"]["train"]) / statistics.median(figures["in memory"]["train"])
    print(f"\nstreamed / in memory, training: {ratio:.2f}; peak resident memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
