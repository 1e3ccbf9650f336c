"""Where and how training runs: device choice, torch threads, side-by-side job counts.

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

from pipeline.errors import ConfigError
from pipeline.settings import Precision

# Side-by-side members for runtime.fold_jobs=auto. On the CPU: 2 jobs with half the cores each
# beat 1 job with all of them, because small convolutions scale poorly over intra-op threads
# (2-core AMD EPYC, benchmarks/train_throughput.py, 15 s sustained: cnn_deotte 1,375 -> 2,026
# images/s in all, 1.47x; cnn_keras 1,093 -> 1,356, 1.24x). On CUDA: an MNIST-sized model leaves
# most of a modern GPU idle; separate processes launch in parallel and fill the gaps. The CUDA
# figure is not yet measured: `--fold-jobs 1 2 4 8` on a GPU settles it.
FOLD_JOBS_CPU = 2
FOLD_JOBS_PER_GPU = 4


def launcher_job() -> tuple[int | None, int]:
    """``(job number, parallel jobs)`` inside a Hydra multirun (``-m``), else ``(None, 1)``.

    Parallel jobs is the joblib launcher's ``n_jobs`` resolved against the CPU count (``-1`` =
    every core); other launchers (basic: sequential; submitit: one job per node) count as 1.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main (tests, benchmarks, notebooks)
        return None, 1
    if hc.mode != RunMode.MULTIRUN:
        return None, 1
    num = int(hc.job.num) if hc.job.get("num") is not None else None
    n_jobs = hc.launcher.get("n_jobs") if "joblib" in str(hc.launcher.get("_target_", "")) else 1
    n_jobs = int(n_jobs or 1)
    if n_jobs < 0:
        n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)  # joblib's convention: -1 = all cores
    return num, n_jobs


def select_device(name: str = "auto", slot: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    On a machine with several GPUs, ``auto`` and ``cuda`` (no index) spread parallel work over
    them: side-by-side job ``slot`` or, in a Hydra multirun, launcher job ``n`` uses GPU
    ``slot % device_count`` (``n % device_count``); ``cuda:N`` is kept as given. The caller makes
    it the current device with :func:`use_device` before any CUDA work.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for on a machine without it.
    """
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        dev = torch.device("cuda" if name == "auto" else name)
    except RuntimeError:
        raise ConfigError(f"runtime.device={name}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name}, but CUDA is not available here (use auto or cpu)")
    if dev.type == "cuda" and dev.index is None:
        num = slot if slot is not None else launcher_job()[0]
        count = torch.cuda.device_count()
        if num is not None and count > 1:
            return torch.device(f"cuda:{num % count}")
    return dev


def use_device(device: torch.device) -> None:
    """Make ``device`` the process's current CUDA device (``torch.cuda.set_device``), so that
    everything allocated without an explicit index (cuDNN handles, timm's EMA, ``.cuda()``)
    lands on it. Call it before any CUDA work; nothing happens for the CPU or a bare ``cuda``."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


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


def side_by_side(models: list[str], n_jobs: int) -> list[int]:
    """How many members share the machine while each member trains, ``n_jobs`` at a time, for
    the pending members' model names ``models`` in dispatch order: ``n_jobs`` for every full
    round and the remainder for the last round when every member is of one model (equal lengths,
    so the rounds run in step): the odd 5th member of 5 on 2 jobs gets every core instead of half
    of them. With several models the rounds drift apart and a tail member would overlap a longer
    one (measured: a 3 s ``mlp`` member took 13.7 s on 2 threads beside a ``cnn_deotte`` on 1),
    so every member keeps ``n_jobs``. Returns one share per member, each in ``1..n_jobs``."""
    pending = len(models)
    tail = pending % n_jobs if len(set(models)) == 1 else 0
    return [n_jobs if i < pending - tail else tail for i in range(pending)]


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag in
    ``/proc/cpuinfo``), where bf16 autocast is measured 1.5-2.6x faster than fp32 for the
    pipeline's CNNs (2-core AMD EPYC with AVX512-BF16: cnn_deotte 969 -> 2,059 images/s,
    cnn_keras 696 -> 1,830); elsewhere bf16 is emulated and slower. False when unknown."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(setting: Precision | str, device: torch.device) -> Precision:
    """What ``train.precision`` means on ``device``: ``bf16``, ``fp16`` or ``fp32`` itself, or
    for ``auto``:

    * CUDA compute capability >= 8.0 (A100, L4, H100, H200): ``bf16`` (native bf16 tensor cores);
    * capability 7.x (V100, T4: no bf16 units, fp16 tensor cores): ``fp16``, trained with a
      gradient scaler (``torch.amp.GradScaler``);
    * below 7.0 (P100: no tensor cores): ``fp32`` (fp16 on a P100 is unmeasured here);
    * CPU: ``bf16`` with native bf16 (:func:`cpu_has_native_bf16`), else ``fp32``.

    The resolved value goes into each member's cache key and ``metrics.json``.

    Raises:
        ConfigError: ``setting`` is not a :class:`~pipeline.settings.Precision` value.
    """
    try:
        p = Precision(setting)
    except ValueError:
        raise ConfigError(f"train.precision={setting}: expected one of "
                          f"{', '.join(x.value for x in Precision)}") from None
    if p is not Precision.auto:
        return p
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return Precision.bf16 if major >= 8 else Precision.fp16 if major >= 7 else Precision.fp32
    return Precision.bf16 if cpu_has_native_bf16() else Precision.fp32


AUTOCAST = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def autocast(device: torch.device, precision: Precision):
    """The autocast context of a resolved ``precision`` on ``device`` (disabled for fp32).
    Raises ValueError for ``auto``, which must be resolved first (:func:`resolve_precision`)."""
    if Precision(precision) is Precision.auto:
        raise ValueError("precision 'auto' reached autocast unresolved; call resolve_precision first")
    dtype = AUTOCAST.get(Precision(precision))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (its small gradients would underflow without one),
    else None. The scaler syncs with the host once per step (its inf check), fp16's only sync."""
    return torch.amp.GradScaler(device.type) if Precision(precision) is Precision.fp16 else None


def configure_numerics(device: torch.device, precision: Precision, deterministic: bool) -> None:
    """The numerics of one member's training and of every prediction of it (OOF, test and
    ``stage=predict`` alike), set on the process before its model runs:

    * ``deterministic``: ``torch.use_deterministic_algorithms`` (warn only) and cuDNN's fixed
      algorithms; else cuDNN benchmarks its algorithms per shape (``cudnn.benchmark``);
    * TF32 (A100 and newer) only for bf16/fp16 members; an fp32 member computes convolutions
      and matmuls in full fp32, as its precision says.

    On CUDA with ``cudnn.benchmark`` two processes may pick different algorithms for one shape,
    so ``stage=predict`` matches the blend's test probabilities within a tolerance, not bit for
    bit (README, GPU section); on the CPU they are identical.
    """
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    tf32 = Precision(precision) is not Precision.fp32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def device_name(device: torch.device) -> str:
    """``cuda[:N] (<GPU name>)`` or ``cpu (<cores> cores, <threads> threads)``, for metrics and logs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
