"""Steps 7 to 9, the measurements (``--rows`` training rows, the real digits repeated).

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

The sizes above are CUDA's; the dry run on the CPU measures smaller ones (``gpu_check.parse_args``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from .common import (Incomplete, competition, fused_keys, fused_steps, member_spec, peak_memory_mb,
                     reset_peak_memory, sync, tiled_competition, timed_epoch, write_partial)


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


def _side_by_side_worker(args_dict: dict, work: str, slot: int, n: int, folder: str, seconds: float) -> dict:
    """One of ``n`` processes: cnn_deotte at ``--side-batch`` on its device, warmed up, then
    epochs of the real loop from a common start for ``seconds``; its peak GPU memory (torch, MiB)
    since it set its loop up. On the CPU it keeps the step process's intra-op threads when
    ``OMP_NUM_THREADS`` sets them (the dry run: 1), also when it trains alone: two threads that
    wait on each other on a 2-core machine shared with other work made its epochs 10-25x slower."""
    import numpy as np
    import torch

    from pipeline.train.engine import setup_loop, train_epoch
    from pipeline.device import select_device, use_device
    from pipeline.train.runtime import barrier, configure_threads

    args = argparse.Namespace(**args_dict)
    device = select_device(args.device, slot=slot)
    use_device(device)
    configure_threads(os.environ.get("OMP_NUM_THREADS") if device.type == "cpu" else None, device, n)
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
    """``--side-jobs`` processes (joblib's loky workers; a count of 1 runs in this process) training
    cnn_deotte at once for ``--side-seconds`` each (:func:`_side_by_side_worker`): images/s of
    all of them together and per process, their devices and peak GPU memory (MiB), and the
    ``speedup`` of each count over one process. Each count starts from fresh workers."""
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
