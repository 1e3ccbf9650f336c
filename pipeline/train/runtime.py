"""How training runs on the device :mod:`pipeline.device` picks: torch threads, side-by-side
job counts, DataLoader workers, seeding, and a barrier between side-by-side processes.

None of this changes what is learned, so none of it is part of a member's cache key.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.device import launcher_job
from pipeline.errors import ConfigError

# Side-by-side members for runtime.fold_jobs=auto. On the CPU: 2 jobs with half the cores each
# beat 1 job with all of them, because small convolutions scale poorly over intra-op threads
# (2-core AMD EPYC, benchmarks/train_throughput.py, 15 s sustained: cnn_deotte 1,375 -> 2,026
# images/s in all, 1.47x; cnn_keras 1,093 -> 1,356, 1.24x). On CUDA: an MNIST-sized model leaves
# most of a modern GPU idle; separate processes launch in parallel and fill the gaps. The CUDA
# figure is not yet measured: `--fold-jobs 1 2 4 8` on a GPU settles it.
FOLD_JOBS_CPU = 2
FOLD_JOBS_PER_GPU = 4


def fold_jobs(setting, device: torch.device, pending: int) -> int:
    """How many members ``stage=train`` trains side by side (joblib processes).

    Args:
        setting: ``runtime.fold_jobs``: an int >= 1, or ``auto``: :data:`FOLD_JOBS_CPU` on a CPU
            with at least that many cores, :data:`FOLD_JOBS_PER_GPU` x the GPU count on CUDA, and
            1 inside a parallel Hydra multirun (the launcher already runs jobs side by side).
        device: the training device; pending: the members left to train.
    Returns:
        ``min(jobs, pending)``, at least 1. Raises ConfigError for a value not auto or >= 1.
    """
    if setting in (None, "auto"):
        if launcher_job()[1] > 1:
            n = 1
        elif device.type == "cuda":
            n = FOLD_JOBS_PER_GPU * (torch.cuda.device_count() if device.index is None else 1)
        else:
            n = FOLD_JOBS_CPU if (os.cpu_count() or 1) >= FOLD_JOBS_CPU else 1
    else:
        try:
            n = int(setting)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise ConfigError(f"runtime.fold_jobs={setting}: expected auto or an integer >= 1")
    return max(1, min(n, pending))


def core_share(parallel: int) -> int:
    """Cores for each of ``parallel`` jobs side by side on this machine: ``cores // parallel``, >= 1."""
    return max(1, (os.cpu_count() or 1) // parallel)


def configure_threads(setting, device: torch.device, parallel: int | None = None) -> int:
    """Set torch's intra-op threads: ``setting`` when given, else (CPU training with ``parallel``
    jobs side by side; default: the parallel Hydra multirun's job count) :func:`core_share`, so
    the jobs split the cores instead of oversubscribing them. A side-by-side worker passes its
    ``parallel`` even when it trains alone (1: every core), since the joblib worker pool caps its
    processes' threads. Returns the thread count in effect."""
    if setting:
        torch.set_num_threads(int(setting))
    elif device.type == "cpu":
        jobs = launcher_job()[1] if parallel is None else parallel
        if jobs > 1 or parallel is not None:
            torch.set_num_threads(core_share(jobs))
    return torch.get_num_threads()


def num_workers(setting, device: torch.device, parallel: int = 1) -> int:
    """DataLoader workers (albumentations backend); ``auto``: none when training on the CPU (the
    workers' IPC then costs more than it overlaps: 2,570 vs 2,367 images/s for cnn_deotte width
    0.5 on 2 cores), else ``min(8, cores // parallel - 1)`` so augmentation overlaps GPU compute."""
    if setting in (None, "auto"):
        return 0 if device.type == "cpu" else max(0, min(8, core_share(parallel) - 1))
    return int(setting)


def barrier(folder: str | Path, slot: int, n: int, timeout_s: float = 120.0) -> Callable[[], None]:
    """A barrier between ``n`` side-by-side processes through files in ``folder`` (no shared
    memory, so it works across joblib/loky workers): each call marks process ``slot`` ready for
    the next round, then waits until all ``n`` are, or ``timeout_s`` seconds have passed (a
    process that died does not hang the others). Returns the function to call at each round."""
    rounds = [0]

    def wait() -> None:
        rounds[0] += 1
        Path(folder, f"{rounds[0]}-{slot}").touch()
        deadline = time.monotonic() + timeout_s
        while len(list(Path(folder).glob(f"{rounds[0]}-*"))) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    return wait


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

