"""Stage ``train``: per-(model, fold) training that caches OOF and test probabilities.

For each model of the ensemble (or ``model=NAME``) and each fold (``fold=all`` or an int), train
on the other folds, validate on this one, then write under ``artifacts/<model>/fold<k>/``:

* ``model.pt``     - the final weights and how to rebuild the model;
* ``oof.npz``      - ``row_ids (n_val,) int64`` and ``probs (n_val, C) float32`` for the fold's rows;
* ``test.npy``     - ``(M, C) float32`` probabilities for every test row;
* ``metrics.json`` - fold accuracy and log loss, epochs, seconds, device, per-epoch history;
* ``config.yaml``  - the resolved fold config; written last, it is also the cache key.

A (model, fold) whose files exist and whose ``config.yaml`` equals the current one is skipped;
``force=true`` retrains. The final-epoch weights are used (no early stopping on the OOF fold, so
the OOF score stays an honest estimate).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import log_loss
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import augment, data
from pipeline.errors import ConfigError, PipelineError
from pipeline.folds import ensure_folds
from pipeline.io import save_json, save_npy, save_npz, save_text, write_with
from pipeline.models import create_model
from pipeline.paths import (CHECKPOINT, CONFIG, DATA_FILES, FOLD_FILES, MANIFEST, METRICS, OOF,
                            RESUME, TEST, Paths)


# --------------------------------------------------------------------------- selection

RUNTIME_ONLY_TRAIN_KEYS = ("compile", "deterministic")


def model_names(cfg: DictConfig) -> list[str]:
    """Models to run: ``cfg.model`` if set (not ``all``), else ``cfg.ensemble``.

    Raises ConfigError for a name with no entry under ``models`` (listing the known ones).
    """
    names = list(cfg.ensemble) if cfg.model in (None, "all") else [str(cfg.model)]
    for n in names:
        if n not in cfg.models:
            raise ConfigError(f"unknown model '{n}'; known models: {', '.join(sorted(cfg.models))}")
    if not names:
        raise ConfigError("ensemble is empty: list at least one model under 'ensemble'")
    return names


def fold_ids(cfg: DictConfig) -> list[int]:
    """Folds to run: every fold for ``fold=all``, else the one given (checked against folds.k)."""
    k = int(cfg.folds.k)
    if cfg.fold in (None, "all"):
        return list(range(k))
    try:
        f = int(cfg.fold)
    except (TypeError, ValueError):
        raise ConfigError(f"fold={cfg.fold}: expected 'all' or an integer 0..{k - 1}") from None
    if not 0 <= f < k:
        raise ConfigError(f"fold={f}: expected 'all' or an integer 0..{k - 1} (folds.k={k})")
    return [f]


def folds_digest(folds: np.ndarray) -> str:
    """A short sha256 of a fold assignment ``(N,)``: part of every fold's cache key."""
    return hashlib.sha256(np.ascontiguousarray(folds, dtype=np.int64).tobytes()).hexdigest()[:16]


def fold_config(cfg: DictConfig, name: str, fold: int, data_fingerprint: str,
                folds: np.ndarray | None = None) -> DictConfig:
    """The settings that determine one (model, fold)'s results; also its cache key.

    ``train`` and ``aug`` are the global groups with the model's own ``train``/``aug``
    overrides merged on top; ``folds`` (the ``(N,)`` assignment, when given) adds its digest, so
    a changed folds file makes every fold stale.
    """
    m = cfg.models[name]
    train = OmegaConf.merge(cfg.train, m.get("train") or {})
    # how to run, not what is learned: not part of the cache key
    train = OmegaConf.create({k: v for k, v in train.items() if k not in RUNTIME_ONLY_TRAIN_KEYS})
    aug = OmegaConf.merge(cfg.aug, m.get("aug") or {})
    if int(train.epochs) <= 0:
        raise ConfigError(f"models.{name}.train.epochs / train.epochs={train.epochs}: expected >= 1")
    folds_key = {"k": int(cfg.folds.k), "seed": int(cfg.folds.seed)}
    if folds is not None:
        folds_key["digest"] = folds_digest(folds)
    return OmegaConf.create({
        "model": name, "arch": m.arch, "kwargs": m.get("kwargs") or {},
        "train": train, "aug": aug, "fold": fold, "folds": folds_key,
        "data_fingerprint": data_fingerprint, "seed": int(cfg.seed),
    })


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(out_dir: Path) -> Path:
    """Record the sha256 and size of every file of a finished fold in ``manifest.json``; written
    last, after all of them exist, it marks the fold complete."""
    files = {n: {"sha256": _sha256(out_dir / n), "bytes": (out_dir / n).stat().st_size}
             for n in DATA_FILES}
    return save_json(out_dir / MANIFEST, {"files": files})


def verify_fold(out_dir: Path, fcfg: DictConfig) -> tuple[str, str]:
    """Check one (model, fold)'s artifacts against its manifest and the current settings.

    Returns ``(status, reason)``; status is ``ok``, ``missing`` (files absent: never trained or
    interrupted), ``corrupt`` (unreadable manifest, a size or checksum mismatch, an unreadable
    config) or ``stale`` (trained with other settings; the reason names the keys that changed).
    """
    missing = [n for n in FOLD_FILES if not (out_dir / n).exists()]
    if missing:
        return "missing", f"missing {', '.join(missing)}"
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "corrupt", f"{MANIFEST} is unreadable"
    for n in DATA_FILES:
        entry = manifest.get(n) if isinstance(manifest, dict) else None
        if not entry:
            return "corrupt", f"{MANIFEST} does not list {n}"
        if (out_dir / n).stat().st_size != entry.get("bytes") or _sha256(out_dir / n) != entry.get("sha256"):
            return "corrupt", f"{n} does not match its checksum (truncated or modified)"
    try:
        old = OmegaConf.load(out_dir / CONFIG)
    except Exception:  # a yaml that no longer parses despite its checksum: treat as corrupt
        return "corrupt", f"{CONFIG} is unreadable"
    if old != fcfg:
        changed = sorted(k for k in set(old) | set(fcfg) if old.get(k) != fcfg.get(k))
        return "stale", f"config changed ({', '.join(changed)})"
    return "ok", "cached"


def is_cached(out_dir: Path, fcfg: DictConfig) -> tuple[bool, str]:
    """Whether ``out_dir`` holds a complete, intact fold trained with ``fcfg`` (see
    :func:`verify_fold`). Returns ``(cached, reason)``."""
    status, reason = verify_fold(out_dir, fcfg)
    return status == "ok", reason


# --------------------------------------------------------------------------- runtime helpers


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
    cores = os.cpu_count() or 1
    n_jobs = int(n_jobs or 1)
    if n_jobs < 0:
        n_jobs = max(1, cores + 1 + n_jobs)  # joblib's convention: -1 = all cores
    return num, n_jobs


def select_device(name: str = "auto", slot: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    On a machine with several GPUs, ``auto`` spreads parallel work over them: side-by-side fold
    job ``slot`` (see :func:`fold_jobs`) or, in a Hydra multirun, launcher job ``n`` uses GPU
    ``slot % device_count`` (``n % device_count``). Raises ConfigError for a CUDA device on a
    machine without CUDA.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        num = slot if slot is not None else launcher_job()[0]
        count = torch.cuda.device_count()
        return torch.device(f"cuda:{num % count}" if num is not None and count > 1 else "cuda")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name}, but CUDA is not available here (use auto or cpu)")
    return dev


# Side-by-side (model, fold) trainings for runtime.fold_jobs=auto. On the CPU: 2 jobs with half
# the cores each beat 1 job with all of them, because small convolutions scale poorly over
# intra-op threads (2-core AMD EPYC, benchmarks/train_throughput.py, 15 s sustained:
# cnn_deotte 1,375 -> 2,026 images/s in all, 1.47x; cnn_keras 1,093 -> 1,356, 1.24x).
# On CUDA: an MNIST-sized model leaves most of a modern GPU idle (each step is a few small
# kernels, so the Python/launch side sets the pace); separate processes launch in parallel and
# fill the gaps. The CUDA figure is not yet measured: `--fold-jobs 1 2 4 8` on a GPU settles it.
FOLD_JOBS_CPU = 2
FOLD_JOBS_PER_GPU = 4


def fold_jobs(setting, device: torch.device, pending: int) -> int:
    """How many (model, fold) trainings ``stage=train`` runs side by side (joblib processes).

    Args:
        setting: ``runtime.fold_jobs``: an int >= 1, or ``auto``: ``FOLD_JOBS_CPU`` on a CPU with
            at least that many cores (each job gets ``cores // jobs`` threads),
            ``FOLD_JOBS_PER_GPU`` x the GPU count on CUDA, and 1 inside a parallel Hydra
            multirun (the launcher already runs jobs side by side).
        device: the training device; pending: the (model, fold)s left to train.
    Returns:
        ``min(jobs, pending)``, at least 1. Raises ConfigError for a value that is not auto or >= 1.
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
    the jobs split the cores instead of oversubscribing them. Returns the thread count in effect."""
    if setting:
        torch.set_num_threads(int(setting))
    else:
        parallel = launcher_job()[1] if parallel is None else parallel
        if parallel > 1 and device.type == "cpu":
            torch.set_num_threads(core_share(parallel))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _num_workers(setting, device: torch.device) -> int:
    """DataLoader workers; ``auto``: none when training on the CPU (the workers' IPC then costs
    more than it overlaps: 2,570 vs 2,367 images/s for cnn_deotte width 0.5 on 2 cores), else
    ``min(8, cores - 1)`` so augmentation overlaps GPU compute."""
    if setting in (None, "auto"):
        return 0 if device.type == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 1))
    return int(setting)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


PRECISIONS = ("auto", "fp32", "bf16")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``train.precision`` means bf16 autocast on ``device``: ``auto`` = on CUDA only
    (CPU results stay fp32), ``bf16`` = everywhere (on CPUs with AVX512-BF16/AMX it is ~1.5-2x
    faster: cnn_keras 1,106 -> 2,329 images/s on a 2-core AMD EPYC), ``fp32`` = never.
    Raises ConfigError for another value."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision}: expected one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, device: torch.device,
                   batch_size: int = 2048, channels_last: bool = False,
                   precision: str = "auto") -> np.ndarray:
    """Logits for uint8 images without augmentation (bf16 autocast per :func:`use_bf16`).

    Args:
        images: ``(N, 1, S, S)`` uint8.
    Returns:
        ``(N, C)`` float32 logits.
    """
    model.eval()
    out = []
    bf16 = use_bf16(precision, device)
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device, non_blocking=True).float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits as float32 probabilities."""
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).float().numpy()


def make_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                 aug_cfg, seed: int, num_workers="auto"):
    """The training batches of one fold for ``aug.backend``.

    ``torch``: :class:`pipeline.augment.DeviceBatches` (device-resident uint8, batched
    augmentation). ``albumentations``: a shuffling ``DataLoader`` over per-sample transforms.
    Both drop the last incomplete batch and yield ``(x (B, 1, S, S) float32, y (B,) int64)``.
    Raises ConfigError for another backend.
    """
    backend = str(aug_cfg.backend)
    if backend == "torch":
        return augment.DeviceBatches(images, labels, batch_size, device, aug_cfg, seed)
    if backend != "albumentations":
        raise ConfigError(f"aug.backend={backend}: expected one of {', '.join(augment.BACKENDS)}")
    transform = augment.transform_from_cfg(aug_cfg)
    if transform is not None:
        transform.set_random_seed(seed)
    workers = _num_workers(num_workers, device)
    return DataLoader(augment.ImageDataset(images, labels, transform), batch_size=batch_size,
                      shuffle=True, drop_last=True, num_workers=workers,
                      worker_init_fn=_worker_init if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=device.type == "cuda")


def set_epoch(batches, seed: int, epoch: int) -> None:
    """Reseed the data order and augmentation of ``epoch`` from ``(seed, epoch)`` alone (like
    ``DistributedSampler.set_epoch``), so a resumed run draws exactly the batches the
    uninterrupted run would have. Works for both backends (DataLoader workers are re-created each
    epoch and seeded from the loader's generator)."""
    s = (seed * 100_003 + epoch) % 2**63
    batches.generator.manual_seed(s)
    transform = getattr(getattr(batches, "dataset", None), "transform", None)
    if transform is not None:
        transform.set_random_seed(s % 2**32)


def rng_state() -> dict:
    """python, numpy, torch (CPU and every CUDA device) RNG states, for a resume checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float = 0.0, channels_last: bool = False, precision: str = "auto"):
    """One optimizer step on a batch; bf16 autocast per :func:`use_bf16` (``auto``: on CUDA
    only), the loss in fp32.

    Args:
        x: ``(B, 1, S, S)`` float32 on the model's device; y: ``(B,)`` int64.
    Returns:
        ``(loss, logits)``: the scalar loss tensor and ``(B, C)`` logits (not synchronised).
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, x.device)):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits


# --------------------------------------------------------------------------- one (model, fold)


@dataclass
class FitResult:
    """What :func:`fit_fold` learned on one (model, fold).

    Attributes:
        model: the trained ``nn.Module`` (on the training device).
        oof: ``(n_val, C)`` float32 OOF probabilities; ``row_ids``: ``(n_val,)`` int64 train rows.
        test: ``(M, C)`` float32 test probabilities, or ``None`` when not asked for.
        metrics: the ``metrics.json`` dict (see :func:`train_fold`).
    """

    model: nn.Module
    oof: np.ndarray
    row_ids: np.ndarray
    test: np.ndarray | None
    metrics: dict


EpochCallback = Callable[[int, dict], None]


def fit_fold(cfg: DictConfig, comp: data.Competition, folds: np.ndarray, name: str, fold: int,
             on_epoch: EpochCallback | None = None, predict_test: bool = True,
             resume_path: Path | None = None) -> FitResult:
    """Train ``name`` on every fold but ``fold`` and predict that fold (and the test set).

    ``on_epoch(epoch, record)`` is called after each epoch with that epoch's history record
    (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``lr``, ``seconds``); it may raise
    to stop training (the tune stage prunes trials this way).

    With ``resume_path``, the end-of-epoch state (model, optimizer, LR scheduler, epoch, history,
    best validation accuracy, python/numpy/torch RNG states) is written there after every epoch
    (temp file + rename), and training continues from it when it exists and was written for the
    same fold config; one written for other settings is ignored (and replaced). Data order and
    augmentation are reseeded per epoch (:func:`set_epoch`), so on CPU with
    ``train.deterministic=true`` a resumed run gives the uninterrupted run's probabilities.
    No AMP scaler (bf16 autocast needs none) and no EMA are used, so none is saved.

    Raises:
        PipelineError: the loss became NaN/inf.
    """
    fcfg = fold_config(cfg, name, fold, comp.fingerprint, folds)
    tcfg, rt = fcfg.train, cfg.runtime
    device = select_device(str(rt.device))
    seed = int(cfg.seed) * 1000 + fold
    seed_everything(seed)
    if cfg.train.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = bool(rt.channels_last)
    precision = str(tcfg.get("precision", "auto"))
    use_bf16(precision, device)  # an unknown value fails before any work
    t0 = time.perf_counter()

    tr_idx, va_idx = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    batches = make_batches(comp.x_train[tr_idx], comp.y_train[tr_idx], int(tcfg.batch_size),
                           device, fcfg.aug, seed, rt.num_workers)
    if len(batches) == 0:
        raise ConfigError(f"{name} fold {fold}: train.batch_size={tcfg.batch_size} is larger than "
                          f"the {len(tr_idx)} training rows of the fold")

    model = create_model(fcfg.arch, comp.num_classes, 1, comp.side,
                         **OmegaConf.to_container(fcfg.kwargs)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.train.get("compile") else model  # shares model's weights
    opt = torch.optim.AdamW(model.parameters(), lr=float(tcfg.lr),
                            weight_decay=float(tcfg.weight_decay))
    epochs, steps = int(tcfg.epochs), len(batches)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(tcfg.lr), total_steps=epochs * steps,
                                                pct_start=float(tcfg.warmup_frac))
    history: list[dict] = []
    start = 1
    fcfg_yaml = OmegaConf.to_yaml(fcfg)
    if resume_path is not None and resume_path.exists():
        state = _load_resume(resume_path, fcfg_yaml, name, fold)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            history = state["history"]
            set_rng_state(state["rng"])
            start = int(state["epoch"]) + 1
            print(f"train: {name} fold {fold}: resuming after epoch {state['epoch']}/{epochs} "
                  f"({resume_path})", flush=True)
    y_val = torch.from_numpy(comp.y_train[va_idx])
    val_logits = None
    for epoch in range(start, epochs + 1):
        model.train()
        set_epoch(batches, seed, epoch)
        te = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        bar = tqdm(batches, desc=f"{name} fold {fold} epoch {epoch}/{epochs}", leave=False,
                   disable=None if rt.progress else True, mininterval=1.0, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = train_step(net, opt, x, y, float(tcfg.label_smoothing), channels_last,
                                      precision)
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if not bar.disable and (step % 25 == 0 or step == steps - 1):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
        train_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(train_loss):
            if resume_path is not None:
                resume_path.unlink(missing_ok=True)
            raise PipelineError(f"{name} fold {fold}: training loss became {train_loss} in epoch "
                                f"{epoch}; nothing was cached (try a lower train.lr)")
        val_logits = predict_logits(net, comp.x_train[va_idx], device, int(rt.eval_batch_size),
                                    channels_last, precision)
        val_logp = torch.log_softmax(torch.from_numpy(val_logits), 1)
        record = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": correct.item() / max(seen, 1),
            "val_loss": float(F.nll_loss(val_logp, y_val)),
            "val_acc": float((val_logp.argmax(1) == y_val).float().mean()),
            "lr": float(sched.get_last_lr()[0]), "seconds": time.perf_counter() - te,
        }
        history.append(record)
        if resume_path is not None:
            state = {"fold_config": fcfg_yaml, "epoch": epoch, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "history": history, "best_val_acc": max(h["val_acc"] for h in history),
                     "rng": rng_state()}
            write_with(resume_path, lambda p: torch.save(state, p))
        if on_epoch is not None:
            on_epoch(epoch, record)

    if val_logits is None:  # resumed after the last epoch: the weights are final, predict again
        val_logits = predict_logits(net, comp.x_train[va_idx], device, int(rt.eval_batch_size),
                                    channels_last, precision)
    oof = softmax(val_logits)
    test = (softmax(predict_logits(net, comp.x_test, device, int(rt.eval_batch_size), channels_last,
                                   precision))
            if predict_test else None)
    y_val_np = comp.y_train[va_idx]
    metrics = {
        "model": name, "fold": fold,
        "accuracy": float((oof.argmax(1) == y_val_np).mean()),
        "log_loss": float(log_loss(y_val_np, oof, labels=np.arange(comp.num_classes))),
        "epochs": epochs, "seconds": time.perf_counter() - t0, "device": _device_name(device),
        "n_train": int(len(tr_idx)), "n_val": int(len(va_idx)), "history": history,
        "resumed_after_epoch": start - 1 if start > 1 else None,
    }
    return FitResult(model, oof, va_idx.astype(np.int64), test, metrics)


def _load_resume(path: Path, fcfg_yaml: str, name: str, fold: int) -> dict | None:
    """The resume state at ``path`` if it is readable and was written for this fold config."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupt file: start over, say why
        print(f"train: {name} fold {fold}: ignoring unreadable {path} ({type(e).__name__}); "
              f"starting over", flush=True)
        return None
    if state.get("fold_config") != fcfg_yaml:
        print(f"train: {name} fold {fold}: {path} was written for other settings; starting over",
              flush=True)
        return None
    return state


def train_fold(cfg: DictConfig, comp: data.Competition, folds: np.ndarray, name: str,
               fold: int) -> dict:
    """Train ``name`` on every fold but ``fold``; write its artifacts; return its metrics.

    Returns:
        the ``metrics.json`` dict: ``accuracy``, ``log_loss`` (OOF on this fold), ``epochs``,
        ``seconds`` (wall time, training + prediction), ``device``, ``history`` (per epoch).
    Raises:
        PipelineError: the loss became NaN/inf (nothing is cached for this fold).
    """
    fcfg = fold_config(cfg, name, fold, comp.fingerprint, folds)
    out = Paths.from_cfg(cfg).fold_dir(name, fold)
    res = fit_fold(cfg, comp, folds, name, fold, resume_path=out / RESUME)
    metrics = res.metrics
    (out / MANIFEST).unlink(missing_ok=True)  # the fold is incomplete until the manifest is back
    ckpt = {"arch": fcfg.arch, "kwargs": OmegaConf.to_container(fcfg.kwargs),
            "num_classes": comp.num_classes, "img_size": comp.side,
            "state_dict": {k: v.cpu() for k, v in res.model.state_dict().items()}}
    write_with(out / CHECKPOINT, lambda p: torch.save(ckpt, p))
    save_npz(out / OOF, row_ids=res.row_ids, probs=res.oof)
    save_npy(out / TEST, res.test)
    save_json(out / METRICS, metrics)
    save_text(out / CONFIG, OmegaConf.to_yaml(fcfg))
    write_manifest(out)
    (out / RESUME).unlink(missing_ok=True)
    print(f"train: {name} fold {fold}: OOF acc {metrics['accuracy']:.5f}, log loss "
          f"{metrics['log_loss']:.4f}, {metrics['epochs']} epochs, {metrics['seconds']:.1f} s on "
          f"{metrics['device']}", flush=True)
    return metrics


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- stage


def _train_locked(cfg: DictConfig, comp: data.Competition, folds: np.ndarray, name: str,
                  fold: int) -> dict | None:
    """Train one (model, fold) under its file lock unless it is (or, after waiting for another
    process, has become) cached; returns its metrics, or ``None`` when skipped."""
    paths = Paths.from_cfg(cfg)
    fcfg = fold_config(cfg, name, fold, comp.fingerprint, folds)
    lock_path = paths.fold_lock(name, fold)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if str(cfg.runtime.get("lock", "wait")) == "skip":
            print(f"train: {name} fold {fold}: another process holds {lock_path}; skipped "
                  f"(runtime.lock=skip)", flush=True)
            return None
        print(f"train: {name} fold {fold}: another process holds {lock_path}; waiting", flush=True)
        lock.acquire()
    try:
        cached, reason = is_cached(paths.fold_dir(name, fold), fcfg)
        if cached and not cfg.force:
            print(f"train: {name} fold {fold}: cached, skipped (force=true retrains)", flush=True)
            return None
        if not cached and not reason.startswith("missing"):
            print(f"train: {name} fold {fold}: retraining, {reason}", flush=True)
        return train_fold(cfg, comp, folds, name, fold)
    finally:
        lock.release()


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker process: end it as soon as the process that started it is gone (``kill -9``
    of ``run.py`` would otherwise leave workers training, holding cores or GPU memory). A fold
    cut short this way keeps its last end-of-epoch resume checkpoint. One watchdog thread per
    process."""
    import threading

    if any(t.name == "exit-with-parent" for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(70)  # the parent died: stop now, without cleanup (nothing is half-written)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _fold_job(cfg: DictConfig, name: str, fold: int, slot: int,
              n_jobs: int) -> dict | PipelineError | None:
    """One side-by-side fold job (runs in a joblib worker process): pins its device (GPU
    ``slot % count`` on a multi-GPU machine), takes ``cores // n_jobs`` of the cores (torch
    threads on the CPU, DataLoader workers on CUDA), loads the cached data and folds, and trains
    the fold under its lock. The worker exits when the parent process dies. Returns the fold's
    metrics, ``None`` (skipped) or the :class:`PipelineError` that stopped it."""
    _exit_with_parent()
    cfg = copy.deepcopy(cfg)
    device = select_device(str(cfg.runtime.device), slot=slot)
    cfg.runtime.device = str(device)
    cfg.runtime.progress = False  # several processes' bars would garble one terminal
    configure_threads(cfg.runtime.threads, device, n_jobs)
    if cfg.runtime.num_workers in (None, "auto") and device.type == "cuda":
        cfg.runtime.num_workers = max(0, min(8, core_share(n_jobs) - 1))  # albumentations backend
    try:
        comp = data.load(cfg)
        return _train_locked(cfg, comp, ensure_folds(cfg, comp.y_train), name, fold)
    except PipelineError as e:  # a user error: returned, so the other folds can finish first
        return e


def run(cfg: DictConfig) -> dict[tuple[str, int], dict]:
    """Stage ``train``: every selected (model, fold), skipping those already cached.

    Each (model, fold) is trained under a file lock (``artifacts/<model>/fold<k>.lock``), so
    parallel jobs never write the same fold twice: with ``runtime.lock=wait`` (default) a second
    process waits for the first and then finds the fold cached; with ``skip`` it moves on.
    With ``runtime.fold_jobs`` > 1 (see :func:`fold_jobs`; ``auto`` = 2 on a CPU, 4 per GPU on
    CUDA) the pending (model, fold)s run side by side in joblib worker processes; each fold's
    results do not depend on which process trained it (seeds come from the model, fold and
    ``seed``); a user error in one of them is raised once the others have finished.
    Returns ``{(model, fold): metrics}`` for the folds trained in this call.
    """
    names, fids = model_names(cfg), fold_ids(cfg)
    lock_mode = str(cfg.runtime.get("lock", "wait"))
    if lock_mode not in ("wait", "skip"):
        raise ConfigError(f"runtime.lock={lock_mode}: expected wait or skip")
    comp = data.load(cfg)
    folds = ensure_folds(cfg, comp.y_train)
    paths = Paths.from_cfg(cfg)
    device = select_device(str(cfg.runtime.device))
    pending = []
    for name in names:
        for f in fids:
            cached, _ = is_cached(paths.fold_dir(name, f), fold_config(cfg, name, f, comp.fingerprint, folds))
            if cached and not cfg.force:
                print(f"train: {name} fold {f}: cached, skipped (force=true retrains)")
            else:
                pending.append((name, f))
    setting = cfg.runtime.get("fold_jobs", "auto")
    n_jobs = fold_jobs(setting, device, len(pending))
    if n_jobs == 1:
        configure_threads(cfg.runtime.threads, device)
        trained = [_train_locked(cfg, comp, folds, name, f) for name, f in pending]
    else:
        from joblib import Parallel, delayed
        from joblib.externals.loky import get_reusable_executor

        print(f"train: {len(pending)} (model, fold)s, {n_jobs} side by side "
              f"(runtime.fold_jobs={setting})", flush=True)
        trained = Parallel(n_jobs=n_jobs, backend="loky")(
            delayed(_fold_job)(cfg, name, f, i % n_jobs, n_jobs) for i, (name, f) in enumerate(pending))
        get_reusable_executor().shutdown(wait=True)  # free their memory now, not after loky's idle timeout
        errors = [e for e in trained if isinstance(e, PipelineError)]
        if errors:  # every other fold has finished and kept its artifacts
            raise errors[0]
    return {job: m for job, m in zip(pending, trained) if m is not None}
