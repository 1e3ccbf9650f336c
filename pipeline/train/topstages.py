"""Top stages fine-tuned on the cached activations of a frozen pretrained body.

Where the budget cannot fine-tune a whole backbone (a CPU, minutes), the lower blocks of an
ImageNet-pretrained EfficientNet stay frozen and their output is computed once per image and
test-time view (the 8 symmetries of the square with ``tta.dihedral``: the member's augmentation)
and cached on disk as float16 (``artifacts/features/<key>.top<n>-{train,test}.npy``, read
memory-mapped); only the last ``train.top_blocks`` blocks, the head convolution and a new
classifier train on them (:meth:`pipeline.models.Pretrained.top_modules`), ``train.epochs`` passes
over every training image in every view, AdamW on a one-cycle schedule, the classifier at
:data:`HEAD_LR` x ``train.lr``, every BatchNorm with its ImageNet statistics and affine (frozen BN),
label smoothing. Sources: the lower layers of an ImageNet network transfer as they are, the top
ones are task-specific (Yosinski et al. 2014, "How transferable are features in deep neural
networks?"); a higher learning rate for the new head than for the pretrained layers below it
(discriminative fine-tuning, Howard & Ruder 2018, ULMFiT).

The trained blocks live inside the backbone, so the member is an ordinary network: its checkpoint
predicts, exports and submits like any other, ``forward(x) = upper(lower(x))``. Its OOF and test
probabilities are the trained top applied to the cached activations, averaged over views.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from filelock import FileLock

from pipeline.augment import class_balanced_weights, tta_views
from pipeline.choices import Sampler
from pipeline.device import autocast, configure_numerics, device_name, peak_memory_mb, select_device, use_device
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import read_rows, write_with
from pipeline.metrics import score
from pipeline.models import Pretrained
from pipeline.train.averaging import one_cycle
from pipeline.train.inference import average_views, softmax
from pipeline.train.probe import TransferSeconds, backbone, features_key

log = logging.getLogger(__name__)

HEAD_LR = 10.0       # the new classifier's peak learning rate, in units of train.lr
CACHE_BATCH = 64     # images per batch of the frozen pass
EVAL_BATCH = 512     # activations per batch of a prediction
TIMED_STEPS = 6      # training steps timed by price()


@dataclass(frozen=True)
class Price:
    """What one top-stages member costs here: seconds of the frozen pass per image (every view)
    and seconds of one training step of ``train.batch_size`` activations; ``on_disk``: the
    activations are cached in ``spec.features_dir`` already."""

    per_image: float
    per_step: float
    on_disk: bool = False


def activations_paths(spec, comp, model: Pretrained, cache_dir: Path) -> tuple[Path, Path]:
    """Where :func:`cached_activations` keeps ``comp``'s train and test activations: keyed like a
    probe's features (:func:`pipeline.train.probe.features_key`: backbone, weights, images, views,
    precision) and by ``train.top_blocks``."""
    stem = f"{features_key(spec, comp, model)}.top{spec.train.top_blocks}"
    return cache_dir / f"{stem}-train.npy", cache_dir / f"{stem}-test.npy"


def _frozen_pass(model: Pretrained, images: np.ndarray, path: Path | None, spec, device: torch.device) -> np.ndarray:
    """``(V, N, C', h, w)`` float16 activations of ``(N, C, S, S)`` uint8 ``images`` below the
    trained blocks, one per view, written batch by batch into ``path`` (a memory-mapped ``.npy``
    renamed into place when complete) or held in memory (``path`` None)."""
    views = tta_views(spec.tta)
    probe = torch.zeros((1, *images.shape[1:]), device=device)
    with torch.no_grad(), autocast(device, spec.precision):
        shape = tuple(model.lower(probe, spec.train.top_blocks).shape[1:])
    full = (len(views), len(images), *shape)

    def fill(out: np.ndarray) -> np.ndarray:
        for i in range(0, len(images), CACHE_BATCH):
            rows = np.arange(i, min(len(images), i + CACHE_BATCH))
            x = torch.from_numpy(read_rows(images, rows)).to(device).float().div_(255)
            for v, xv in enumerate(views(x)):
                with torch.no_grad(), autocast(device, spec.precision):
                    out[v, rows] = model.lower(xv, spec.train.top_blocks).float().cpu().numpy()
        return out

    if path is None:
        return fill(np.empty(full, dtype=np.float16))

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=full)
        fill(out)
        out.flush()
        del out

    write_with(path, write)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def cached_activations(spec, comp, model: Pretrained, device: torch.device,
                       cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """``(train (V, N, C', h, w), test (V, M, C', h, w))`` float16 activations of ``comp``'s
    images below the trained blocks, read memory-mapped from ``cache_dir``
    (:func:`activations_paths`) or computed there once under a file lock (side-by-side folds wait
    for the first); in memory with ``cache_dir`` None. Raises ConfigError as
    :meth:`pipeline.models.Pretrained.top_split` does."""
    if cache_dir is None:
        return (_frozen_pass(model, comp.x_train, None, spec, device),
                _frozen_pass(model, comp.x_test, None, spec, device))
    paths = activations_paths(spec, comp, model, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(paths[0]) + ".lock"):
        out = []
        for images, path in zip((comp.x_train, comp.x_test), paths):
            try:
                out.append(np.load(path, mmap_mode="r", allow_pickle=False))
                log.info("top: %s: activations from %s", spec.key, path)
            except (OSError, ValueError):
                t0 = time.perf_counter()
                out.append(_frozen_pass(model, images, path, spec, device))
                log.info("top: %s: activations %s of %d images in %.1f s -> %s", spec.key, out[-1].shape[2:],
                         len(images), time.perf_counter() - t0, path)
        return out[0], out[1]


def _prepare(model: Pretrained, spec) -> list[nn.Module]:
    """Freeze ``model`` but its top modules, and every BatchNorm layer among them too (they keep
    the pretrained statistics, scale and shift); returns the top modules."""
    model.requires_grad_(False)
    trained = model.top_modules(spec.train.top_blocks)
    for m in trained:
        m.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.requires_grad_(False)
    return trained


def _optimizer(model: Pretrained, spec) -> torch.optim.Optimizer:
    body = [p for m in model.top_modules(spec.train.top_blocks)[:-1] for p in m.parameters() if p.requires_grad]
    head = [p for p in model.classifier.parameters() if p.requires_grad]
    t = spec.train
    return torch.optim.AdamW([{"params": body, "lr": t.lr, "weight_decay": t.weight_decay},
                              {"params": head, "lr": t.lr * HEAD_LR, "weight_decay": t.weight_decay}])


def _eval_mode(model: Pretrained) -> None:
    model.eval()  # dropout off; frozen BatchNorm always normalises with its running statistics


def _train_mode(model: Pretrained) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def view_probs(model: Pretrained, acts: np.ndarray, rows: np.ndarray, device: torch.device, spec) -> np.ndarray:
    """``(V, len(rows), classes)`` float32 probabilities of the top on the cached ``(V, N, ...)``
    activations of ``rows``, in the member's precision."""
    _eval_mode(model)
    out = []
    with torch.no_grad():
        for v in range(acts.shape[0]):
            logits = []
            for i in range(0, len(rows), EVAL_BATCH):
                a = torch.from_numpy(np.asarray(acts[v, rows[i:i + EVAL_BATCH]], dtype=np.float32)).to(device)
                with autocast(device, spec.precision):
                    logits.append(model.upper(a, spec.train.top_blocks).float().cpu().numpy())
            out.append(np.concatenate(logits) if logits else np.zeros((0, model.classifier.out_features), np.float32))
    return softmax(np.stack(out))


def _epoch_batches(n_views: int, rows: np.ndarray, batch: int, seed: int,
                   balanced_by: np.ndarray | None = None) -> list[np.ndarray]:
    """Shuffled ``(b, 2)`` int64 (view, row) pairs of every training row in every view, in full
    batches (a shorter remainder is dropped, as the other members' loaders do); with
    ``balanced_by`` (the rows' classes, ``train.sampler=balanced``) as many pairs drawn with
    replacement, every class equally often (:func:`pipeline.augment.class_balanced_weights`)."""
    pairs = np.stack(np.meshgrid(np.arange(n_views), rows, indexing="ij"), -1).reshape(-1, 2)
    rng = np.random.default_rng(seed)
    if balanced_by is None:
        pairs = pairs[rng.permutation(len(pairs))]
    else:
        w = np.tile(class_balanced_weights(balanced_by).numpy(), n_views)
        pairs = pairs[rng.choice(len(pairs), len(pairs), replace=True, p=w / w.sum())]
    return [pairs[i:i + batch] for i in range(0, len(pairs) - batch + 1, batch)]


def _gather(acts: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))  # sorted reads of the memory map
    out = np.empty((len(pairs), *acts.shape[2:]), dtype=np.float32)
    out[order] = acts[pairs[order, 0], pairs[order, 1]]
    return out


def fit_top(spec, comp, folds: np.ndarray, cache_dir: Path | None = None,
            on_epoch: Callable[[int, dict], None] | None = None,
            check: Callable[[float, int, int], None] | None = None, class_weight: np.ndarray | None = None):
    """Fit member ``spec.key`` as a top-stages member (module docstring) on every fold but its own.

    Args:
        comp: the competition (``x_train (N, C, S, S)`` uint8 ...); folds: ``(N,)`` int64.
        cache_dir: where the activations are cached (None: computed in memory).
        on_epoch: called with each epoch's history record (``val_acc``, ``val_loss`` on the fold).
        check: called after each epoch with its training seconds, its training images and the
            images left to predict (:func:`pipeline.train.engine.check_deadline`); it may raise.
        class_weight: ``(classes,)`` float32 cross-entropy weights (``train.class_weight``), or None.
    Returns:
        the fields of :class:`pipeline.train.engine.FitResult`, in order: the backbone with the
        trained top, ``(n_val, C)`` float32 OOF probabilities (views averaged), the ``(n_val,)``
        int64 rows, ``(M, C)`` float32 test probabilities and its metrics.
    Raises:
        ConfigError: the model is not an EfficientNet-family pretrained backbone, ``train.top_blocks``
            is out of range, or the batch is larger than the training rows in every view.
        PipelineError: the loss became NaN/inf.
    """
    t0 = time.perf_counter()
    device = select_device(spec.runtime.device)
    use_device(device)
    configure_numerics(device, spec.precision, spec.runtime.deterministic)
    model = backbone(spec, comp, device)
    model.top_split(spec.train.top_blocks)
    _eval_mode(model)
    train_a, test_a = cached_activations(spec, comp, model, device, cache_dir)
    t_cache = time.perf_counter() - t0
    tr, va = np.flatnonzero(folds != spec.key.fold), np.flatnonzero(folds == spec.key.fold)
    t = spec.train
    n_views = train_a.shape[0]
    if t.batch_size > len(tr) * n_views:
        raise ConfigError(f"models.{spec.key.model}: train.batch_size={t.batch_size} exceeds the fold's "
                          f"{len(tr)} training rows x {n_views} views")
    optim = _optimization(model, spec, len(tr) * n_views // t.batch_size, class_weight, device)
    y = torch.from_numpy(comp.y_train.astype(np.int64))
    history, oof_views = [], None
    for epoch in range(1, t.epochs + 1):
        e0 = time.perf_counter()
        total, correct, seen = _epoch(model, optim, train_a, tr, y, spec, device, epoch)
        seconds = time.perf_counter() - e0
        oof_views = view_probs(model, train_a, va, device, spec)
        sc = score(comp.y_train[va], average_views(oof_views))
        record = {"epoch": epoch, "train_loss": total / max(1, seen), "train_acc": correct / max(1, seen),
                  "lr": float(optim[1].get_last_lr()[-1]), "seconds": time.perf_counter() - e0,
                  "val_loss": sc.log_loss, "val_acc": sc.accuracy}
        history.append(record)
        log.info("top: %s: epoch %d/%d, loss %.4f, OOF accuracy %.4f (%.1f s)", spec.key, epoch, t.epochs,
                 record["train_loss"], sc.accuracy, record["seconds"])
        if on_epoch is not None:
            on_epoch(epoch, record)
        if check is not None and epoch < t.epochs:
            check(seconds, seen, n_views * (len(va) + len(comp.x_test)))
    test = average_views(view_probs(model, test_a, np.arange(len(comp.x_test)), device, spec))
    metrics = _metrics(spec, comp.y_train[va], oof_views, history, time.perf_counter() - t0, t_cache, device,
                       len(tr), train_a.shape[2:])
    _eval_mode(model)
    return model, average_views(oof_views), va.astype(np.int64), test, metrics


def _optimization(model: Pretrained, spec, steps: int, class_weight: np.ndarray | None, device: torch.device):
    """``model`` frozen but its top (:func:`_prepare`); its (AdamW, one-cycle schedule over
    ``train.epochs`` x ``steps``, cross-entropy with ``train.label_smoothing`` and ``class_weight``)."""
    _prepare(model, spec)
    opt = _optimizer(model, spec)
    sched = one_cycle(opt, spec.train, spec.train.epochs * steps, for_swa=False)
    weight = None if class_weight is None else torch.from_numpy(class_weight).to(device)
    return opt, sched, nn.CrossEntropyLoss(weight=weight, label_smoothing=spec.train.label_smoothing)


def _epoch(model: Pretrained, optim, train_a: np.ndarray, tr: np.ndarray, y: torch.Tensor, spec,
           device: torch.device, epoch: int) -> tuple[float, int, int]:
    """One pass over every training row in every view; ``optim``: (optimizer, schedule, loss).
    Returns the summed loss, the correct predictions and the rows seen. Raises PipelineError for a
    NaN/inf loss."""
    opt, sched, loss_fn = optim
    _train_mode(model)
    total, correct, seen = 0.0, 0, 0
    balanced = y[tr].numpy() if spec.train.sampler is Sampler.balanced else None
    for pairs in _epoch_batches(train_a.shape[0], tr, spec.train.batch_size, spec.training_seed * 1000 + epoch,
                                balanced):
        a = torch.from_numpy(_gather(train_a, pairs)).to(device)
        target = y[pairs[:, 1]].to(device)
        with autocast(device, spec.precision):
            logits = model.upper(a, spec.train.top_blocks)
        loss = loss_fn(logits.float(), target)
        if not torch.isfinite(loss):
            raise PipelineError(f"{spec.key}: the loss became {loss.item()} at epoch {epoch}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(pairs)
        correct += int((logits.argmax(1) == target).sum())
        seen += len(pairs)
    return total, correct, seen


def _metrics(spec, y_val: np.ndarray, oof_views: np.ndarray, history: list[dict], seconds: float, t_cache: float,
             device: torch.device, n_train: int, activations: tuple) -> dict:
    """The member's ``metrics.json`` dict (as a network's, with ``top``: its blocks, the
    activations' shape and the seconds of the cached pass and of the training)."""
    t = spec.train
    oof, plain = score(y_val, average_views(oof_views)), score(y_val, oof_views[0])
    metrics = {"model": spec.key.model, "fold": spec.key.fold, "seed_index": spec.key.seed_index,
               "accuracy": oof.accuracy, "log_loss": oof.log_loss, "epochs": t.epochs, "seconds": seconds,
               "device": device_name(device), "precision": spec.precision.value, "history": history,
               **peak_memory_mb(device), "resumed_after_epoch": None, "n_train": int(n_train), "cache_seconds": t_cache,
               "n_val": int(len(y_val)), "n_pseudo": 0,
               "tta": {"views": len(oof_views), "accuracy_without": plain.accuracy, "log_loss_without": plain.log_loss},
               "top": {"blocks": t.top_blocks, "activations": list(activations),
                       "activations_seconds": t_cache, "train_seconds": seconds - t_cache}}
    log.info("top: %s: OOF accuracy %.4f, log loss %.4f (%.1f s, activations %.1f s)", spec.key, oof.accuracy,
             oof.log_loss, seconds, t_cache)
    return metrics


def price(spec, comp, batch: int = 32) -> Price:
    """Time a batch of ``batch`` images through the frozen part in every view (after a warm-up
    batch) and :data:`TIMED_STEPS` training steps of the top on ``train.batch_size`` activations
    (after two; their median: the first steps after a model's creation are the slowest). Raises
    ConfigError as :meth:`pipeline.models.Pretrained.top_split` does."""
    device = select_device(spec.runtime.device)
    use_device(device)
    configure_numerics(device, spec.precision, spec.runtime.deterministic)
    with torch.random.fork_rng(devices=[]):
        model = backbone(spec, comp, device)
        model.top_split(spec.train.top_blocks)
        _eval_mode(model)
        images = comp.x_train[:batch]
        _frozen_pass(model, images, None, spec, device)
        t0 = time.perf_counter()
        acts = _frozen_pass(model, images, None, spec, device)
        per_image = (time.perf_counter() - t0) / max(1, len(images))
        on_disk = spec.features_dir is not None and all(
            p.exists() for p in activations_paths(spec, comp, model, spec.features_dir))
        _prepare(model, spec)
        opt = _optimizer(model, spec)
        _train_mode(model)
        reps = -(-spec.train.batch_size // acts.shape[1])
        a = torch.from_numpy(np.concatenate([acts[0].astype(np.float32)] * reps)[: spec.train.batch_size]).to(device)
        target = torch.zeros(len(a), dtype=torch.int64, device=device)
        timings = []
        for _ in range(2 + TIMED_STEPS):
            s0 = time.perf_counter()
            with autocast(device, spec.precision):
                loss = nn.functional.cross_entropy(model.upper(a, spec.train.top_blocks).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            timings.append(time.perf_counter() - s0)
    return Price(per_image, float(np.median(timings[2:])), on_disk)


def member_seconds(p: Price, train, views: int, frozen_images: float, train_rows: float, val_rows: float,
                   test_rows: float) -> float:
    """Seconds of one member from its :class:`Price`: the frozen pass over ``frozen_images``
    images (every view; the folds share the cache), ``train.epochs`` epochs over ``train_rows``
    rows in ``views`` views, a validation of the ``val_rows`` after each and the final prediction
    of them and the ``test_rows`` (a third of a training step's seconds per activation)."""
    per_activation = p.per_step / train.batch_size
    epoch = train_rows * views * per_activation + val_rows * views * per_activation / 3
    return p.per_image * frozen_images + train.epochs * epoch + (val_rows + test_rows) * views * per_activation / 3


def transfer_seconds(spec, comp, folds: np.ndarray) -> TransferSeconds:
    """Member ``spec.key``'s :class:`~pipeline.train.probe.TransferSeconds` here (:func:`price`,
    :func:`member_seconds`): its own training and predictions, and the frozen pass over every
    train and test image that the model's folds and seeds share."""
    n_train = int(np.sum(folds != spec.key.fold))
    p = price(spec, comp)
    own = member_seconds(p, spec.train, len(tta_views(spec.tta)), 0.0, n_train, len(comp.x_train) - n_train,
                         len(comp.x_test))
    return TransferSeconds(own, p.per_image * (len(comp.x_train) + len(comp.x_test)), p.on_disk)
