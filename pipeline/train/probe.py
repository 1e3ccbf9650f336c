"""The linear probe: a frozen pretrained backbone's pooled features and a logistic regression.

The evaluation protocol of Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?") and
of SimCLR / CLIP: the backbone (:class:`pipeline.models.Pretrained`) is never trained; each image's
pooled features (its ``pre_logits``, after the pooled outputs of lower levels with
``kwargs.feature_levels``) are computed once per test-time view (the image, its mirror with
``tta.hflip``, the 8 symmetries of the square with ``tta.dihedral``) and cached on disk
(``artifacts/features/<key>.npz``, keyed by the backbone, its weights' digest, the images, the views
and the precision), so every fold and seed reads them. Per fold, an L2-regularised multinomial
logistic regression (scikit-learn) is fitted on the standardised features of the training folds,
every view a training row, its strength C chosen by the competition's metric in a 2-fold cross-
validation inside the training folds (images, not views, split). The fitted scaler and regression
are folded into the backbone's classifier, so the member is an ordinary network: its checkpoint
predicts, exports and submits like any other, and its OOF and test probabilities are the same
classifier applied to the cached features, averaged over views.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from filelock import FileLock

from pipeline.augment import tta_views
from pipeline.choices import Metric, Sampler
from pipeline.device import (autocast, configure_numerics, device_name, peak_memory_mb, select_device,
                             use_device)
from pipeline.errors import ConfigError
from pipeline.io import save_npz
from pipeline.metrics import score
from pipeline.models import Pretrained, create_model
from pipeline.train.inference import average_views, place_model, predict_logits, softmax
from pipeline.train.runtime import seed_everything

log = logging.getLogger(__name__)

C_GRID = (1e-3, 3e-3, 1e-2)  # inverse L2 strengths tried on the standardised features
INNER_FOLDS = 2                   # the cross-validation that picks C, inside the training folds
MAX_ITER = 500                    # lbfgs iterations per fit
TOL = 1e-3                        # lbfgs stopping tolerance (on ELPV: 1e-4's accuracy in half the time)
SCORING = {Metric.accuracy: "accuracy", Metric.log_loss: "neg_log_loss", Metric.roc_auc: "roc_auc_ovr",
           Metric.balanced_accuracy: "balanced_accuracy", Metric.macro_f1: "f1_macro"}  # scikit-learn's scorers
FIT_SECONDS = 0.15  # seconds of one fit per thousand rows and view (1,752 multi-level features): ELPV's
                    # 7 fits of 1,680 rows x 8 views take 11-13 s per fold, two folds side by side on the
                    # 2-core CPU (0.13)


def backbone(spec, comp, device: torch.device) -> Pretrained:
    """``spec``'s pretrained network for ``comp`` on ``device``, its classifier freshly made.
    Raises ConfigError when ``spec``'s model is not a pretrained backbone."""
    seed_everything(spec.training_seed)
    model = create_model(spec.arch, comp.num_classes, comp.x_train.shape[1], comp.side, **spec.kwargs)
    if not isinstance(model, Pretrained):
        raise ConfigError(f"models.{spec.key.model}: train.fit={spec.train.fit.value} needs a pretrained backbone "
                          f"(arch timm_backbone with kwargs.pretrained=true)")
    return place_model(model, device, spec.runtime.channels_last)


def features_key(spec, comp, model: Pretrained) -> str:
    """The feature cache's key: the backbone (its timm name, its feature levels and every tensor
    but the classifier's: a probe and a fine-tuned member of one backbone share it when their
    feature levels and views agree), the images (the data fingerprint, the shapes and a strided
    sample of the bytes: the screening's subsample is other images under the same fingerprint),
    the test-time views and the precision."""
    weights = hashlib.sha256()
    for name, t in sorted(model.body_tensors().items()):
        weights.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    sample = hashlib.sha256()
    for x in (comp.x_train, comp.x_test):
        sample.update(str(x.shape).encode() + np.ascontiguousarray(x[:: max(1, len(x) // 64)]).tobytes())
    parts = {"timm_name": spec.kwargs.get("timm_name"), "levels": model.feature_levels,
             "weights": weights.hexdigest(), "data": comp.fingerprint,
             "sample": sample.hexdigest(), "tta": repr(spec.tta), "precision": spec.precision.value}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Features(nn.Module):
    """A :class:`Pretrained` network's pooled features as its output."""

    def __init__(self, model: Pretrained):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def pooled_features(model: Pretrained, images: np.ndarray, device: torch.device, spec) -> np.ndarray:
    """``(V, N, F)`` float32 pooled features of ``(N, C, S, S)`` uint8 images, one set per
    test-time view of ``spec.tta``: the one inference path (:func:`pipeline.train.inference.predict_logits`)
    with the classifier left out."""
    return predict_logits(_Features(model), images, device, spec.runtime.eval_batch_size, spec.runtime.channels_last,
                          spec.precision, tta_views(spec.tta))


def features_path(spec, comp, model: Pretrained, cache_dir: Path) -> Path:
    """Where :func:`cached_features` keeps ``comp``'s features under ``cache_dir``
    (``<key>.npz``, :func:`features_key`)."""
    return cache_dir / f"{features_key(spec, comp, model)}.npz"


def cached_features(spec, comp, model: Pretrained, device: torch.device, cache_dir: Path | None):
    """``(train (V, N, F), test (V, M, F))`` float32 features of ``comp``'s images, read from
    ``cache_dir`` (:func:`features_path`) or computed (:func:`pooled_features`) and written there
    atomically under a file lock, so that side-by-side folds compute them once. No cache with
    ``cache_dir`` None."""
    if cache_dir is None:
        return pooled_features(model, comp.x_train, device, spec), pooled_features(model, comp.x_test, device, spec)
    path = features_path(spec, comp, model, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    log.info("probe: %s: features from %s", spec.key, path)
                    return z["train"], z["test"]
            except (OSError, ValueError, KeyError):
                log.warning("probe: %s: unreadable feature cache %s; computing it again", spec.key, path)
        t0 = time.perf_counter()
        train, test = (pooled_features(model, comp.x_train, device, spec),
                       pooled_features(model, comp.x_test, device, spec))
        save_npz(path, train=train, test=test)
        n = (train.shape[0] * train.shape[1] + test.shape[0] * test.shape[1])
        log.info("probe: %s: %d features of %d images x %d views in %.1f s (%.0f images/s) -> %s", spec.key,
                 train.shape[-1], train.shape[1] + test.shape[1], train.shape[0], time.perf_counter() - t0,
                 n / max(1e-9, time.perf_counter() - t0), path)
        return train, test


def stored_features(spec, comp) -> tuple[np.ndarray, np.ndarray] | None:
    """``(train (V, N, F), test (V, M, F))`` float32 features of ``comp``'s images that a probe
    member of ``spec``'s model has cached in ``spec.features_dir`` (:func:`features_path`), or
    None where there are none (nothing is computed). Raises ConfigError as :func:`backbone` does."""
    if spec.features_dir is None:
        return None
    device = select_device(spec.runtime.device)
    with torch.random.fork_rng(devices=[]):
        path = features_path(spec, comp, backbone(spec, comp, device), spec.features_dir)
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["train"], z["test"]
    except (OSError, ValueError, KeyError):
        return None


def fit_logistic(x: np.ndarray, y: np.ndarray, groups: np.ndarray, num_classes: int, balanced: bool,
                 seed: int, metric: Metric = Metric.log_loss) -> tuple[np.ndarray, np.ndarray, float]:
    """An L2-regularised multinomial logistic regression of standardised features (scikit-learn's
    ``StandardScaler``, ``LogisticRegression`` and ``GridSearchCV``), C from :data:`C_GRID` by
    the competition's ``metric`` (:data:`SCORING`; the smallest C among equals) in a
    :data:`INNER_FOLDS`-fold cross-validation whose folds keep each image's views together
    (``groups``: ``(R,)`` int64 image of each row).

    Args:
        x: ``(R, F)`` float32 features; y: ``(R,)`` int64 classes.
        balanced: weight the classes by inverse frequency (``train.class_weight``).
    Returns:
        ``(weight (num_classes, F) float32, bias (num_classes,) float32, C)``: the scaler folded in,
        so ``x @ weight.T + bias`` are the regression's logits of the raw features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    inner = min(INNER_FOLDS, int(np.bincount(y).min()) if len(np.unique(y)) > 1 else 2)
    cv = list(StratifiedGroupKFold(max(2, inner), shuffle=True, random_state=seed % 2**31).split(z, y, groups))
    search = GridSearchCV(LogisticRegression(max_iter=MAX_ITER, tol=TOL, class_weight="balanced" if balanced else None),
                          {"C": list(C_GRID)}, cv=cv, scoring=SCORING[Metric(metric)], n_jobs=1)
    search.fit(z, y)
    reg = search.best_estimator_
    coef, intercept = reg.coef_, reg.intercept_
    if coef.shape[0] == 1:  # a binary task: logits (0, z) give the same softmax
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    full_coef = np.zeros((num_classes, coef.shape[1]))
    full_bias = np.full(num_classes, -1e4)  # a class absent from the training rows is never predicted
    present = reg.classes_
    full_coef[present], full_bias[present] = coef, intercept
    weight = full_coef / scaler.scale_
    bias = full_bias - weight @ scaler.mean_
    return weight.astype(np.float32), bias.astype(np.float32), float(reg.C)


def fit_rows(model: Pretrained, features: np.ndarray, y: np.ndarray, rows: np.ndarray, spec,
             cache: Path | None = None) -> dict:
    """Fit the logistic regression (:func:`fit_logistic`) of ``(V, N, F)`` features on the
    ``rows`` (every view a training row) and copy it into ``model``'s classifier. The fit depends
    on the features, the rows, their labels and the class balance alone (``train.class_weight``,
    or ``train.sampler=balanced``: the same weights for a convex fit; its inner
    cross-validation is seeded from them), so with ``cache`` (the features' file) it is kept
    beside them (``<key>.fit-<digest>.npz``, arrays only) and shared: a probe member and an LP-FT
    head of the same fold fit once. Returns ``{C, features, views}``."""
    views = features.shape[0]
    balanced = spec.train.class_weight or spec.train.sampler is Sampler.balanced  # the same, for a convex fit
    digest = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()
                            + np.ascontiguousarray(y[rows], dtype=np.int64).tobytes()
                            + repr((balanced, C_GRID, INNER_FOLDS, MAX_ITER, TOL,
                                    Metric(spec.metric).value)).encode()).hexdigest()[:16]
    path = None if cache is None else cache.with_name(f"{cache.stem}.fit-{digest}.npz")
    lock = FileLock(str(path) + ".lock") if path is not None else contextlib.nullcontext()
    with lock:
        fitted = _read_fit(path)
        if fitted is None:
            x = features[:, rows].reshape(-1, features.shape[-1])
            fitted = fit_logistic(x, np.tile(y[rows], views), np.tile(np.arange(len(rows)), views),
                                  model.classifier.weight.shape[0], balanced, int(digest[:8], 16), spec.metric)
            if path is not None:
                save_npz(path, weight=fitted[0], bias=fitted[1], C=np.float64(fitted[2]))
    weight, bias, c = fitted
    head = model.classifier
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return {"C": c, "features": int(features.shape[-1]), "views": views}


def _read_fit(path: Path | None) -> tuple[np.ndarray, np.ndarray, float] | None:
    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            log.info("probe: fitted probe from %s", path)
            return z["weight"], z["bias"], float(z["C"])
    except (OSError, ValueError, KeyError):
        log.warning("probe: unreadable fitted probe %s; fitting it again", path)
        return None


def init_head(model: Pretrained, spec, comp, rows: np.ndarray, device: torch.device) -> None:
    """Start ``model``'s classifier as the linear probe of its frozen features on the training
    ``rows`` (linear probing, then fine-tuning: LP-FT, Kumar et al. 2022, "Fine-Tuning can
    Distort Pretrained Features and Underperform Out-of-Distribution"): the features cached as a
    probe's (:func:`cached_features`, shared with a probe of the same backbone). Raises
    ConfigError when ``model`` is not a pretrained backbone."""
    if not isinstance(model, Pretrained):
        raise ConfigError(f"models.{spec.key.model}: train.head_init=probe needs a pretrained backbone "
                          f"(kwargs.pretrained=true)")
    t0 = time.perf_counter()
    train_f, _ = cached_features(spec, comp, model, device, spec.features_dir)
    cache = None if spec.features_dir is None else features_path(spec, comp, model, spec.features_dir)
    fitted = fit_rows(model, train_f, comp.y_train, rows, spec, cache)
    log.info("probe: %s: the head starts as the linear probe (C=%g, %.1f s)", spec.key, fitted["C"],
             time.perf_counter() - t0)


def view_probs(model: Pretrained, features: np.ndarray, device: torch.device, spec) -> np.ndarray:
    """``(V, N, C)`` float32 probabilities of the classifier of ``model`` on ``(V, N, F)`` features,
    in the member's precision (as its forward pass computes them)."""
    head = model.classifier
    with torch.no_grad(), autocast(device, spec.precision):
        logits = [head(torch.from_numpy(v).to(device)).float().cpu().numpy() for v in features]
    return softmax(np.stack(logits))


def fit_probe(spec, comp, folds: np.ndarray, cache_dir: Path | None = None):
    """Fit member ``spec.key`` as a linear probe (module docstring) on every fold but its own.

    Args:
        comp: the competition (``x_train (N, C, S, S)`` uint8 ...); folds: ``(N,)`` int64.
        cache_dir: where the features are cached (None: computed in memory).
    Returns:
        the fields of :class:`pipeline.train.engine.FitResult`, in order: the backbone with the
        fitted classifier, ``(n_val, C)`` float32 OOF probabilities (views averaged), the
        ``(n_val,)`` int64 rows, ``(M, C)`` float32 test probabilities, and its metrics (``probe``:
        C, the feature width, the views, the seconds of features and of the fit).
    Raises:
        ConfigError: the model is not a pretrained backbone.
    """
    t0 = time.perf_counter()
    device = select_device(spec.runtime.device)
    use_device(device)
    configure_numerics(device, spec.precision, spec.runtime.deterministic)
    model = backbone(spec, comp, device).eval()
    train_f, test_f = cached_features(spec, comp, model, device, cache_dir)
    t_features = time.perf_counter() - t0
    tr, va = np.flatnonzero(folds != spec.key.fold), np.flatnonzero(folds == spec.key.fold)
    cache = None if cache_dir is None else features_path(spec, comp, model, cache_dir)
    fitted = fit_rows(model, train_f, comp.y_train, tr, spec, cache)
    c, views = fitted["C"], fitted["views"]
    oof_views = view_probs(model, train_f[:, va], device, spec)
    test = average_views(view_probs(model, test_f, device, spec))
    oof, plain = score(comp.y_train[va], average_views(oof_views)), score(comp.y_train[va], oof_views[0])
    seconds = time.perf_counter() - t0
    record = {"epoch": 1, "train_loss": float("nan"), "train_acc": float("nan"), "lr": 0.0, "seconds": seconds,
              "val_loss": oof.log_loss, "val_acc": oof.accuracy}
    metrics = {"model": spec.key.model, "fold": spec.key.fold, "seed_index": spec.key.seed_index,
               "accuracy": oof.accuracy, "log_loss": oof.log_loss, "epochs": 1, "seconds": seconds,
               "device": device_name(device), "precision": spec.precision.value, "history": [record],
               **peak_memory_mb(device),
               "resumed_after_epoch": None, "n_train": int(len(tr)), "n_val": int(len(va)), "n_pseudo": 0,
               "cache_seconds": t_features,
               "tta": {"views": views, "accuracy_without": plain.accuracy, "log_loss_without": plain.log_loss},
               "probe": {"C": c, "features": int(train_f.shape[-1]), "views": views,
                         "features_seconds": t_features, "fit_seconds": seconds - t_features}}
    log.info("probe: %s: C=%g, OOF accuracy %.4f, log loss %.4f (%.1f s, features %.1f s)", spec.key, c,
             oof.accuracy, oof.log_loss, seconds, t_features)
    return model, average_views(oof_views), va.astype(np.int64), test, metrics


@dataclass(frozen=True)
class TransferSeconds:
    """What a transfer member (a linear probe, top stages) costs here, in seconds: ``own``, one
    member's own work (its fits, or its training and predictions on the cache); ``frozen``, the
    frozen backbone's one pass over every train and test image in every view, which the model's
    folds and seeds share (its cache); ``on_disk``: that cache exists already."""

    own: float
    frozen: float
    on_disk: bool = False

    @property
    def shared(self) -> float:
        """Seconds the shared cache still costs: ``frozen``, or 0 when it is on disk."""
        return 0.0 if self.on_disk else self.frozen

    def member(self, share: float) -> float:
        """One member's seconds with ``share`` of the frozen pass (1: it computes it alone)."""
        return self.own + share * self.frozen


def transfer_seconds(spec, comp, folds: np.ndarray, batch: int = 32) -> TransferSeconds:
    """A probe member's :class:`TransferSeconds`: a timed batch of ``batch`` images through the
    frozen backbone (after one warm-up batch) scaled to every image in every view, and the
    regression's fits (:data:`C_GRID` x :data:`INNER_FOLDS` + 1, priced at :data:`FIT_SECONDS`
    per thousand rows and view); ``on_disk`` when ``spec.features_dir`` holds the features."""
    device = select_device(spec.runtime.device)
    use_device(device)
    configure_numerics(device, spec.precision, spec.runtime.deterministic)
    with torch.random.fork_rng(devices=[]):
        model = backbone(spec, comp, device).eval()
    x = comp.x_train[:batch]
    pooled_features(model, x, device, spec)
    t0 = time.perf_counter()
    pooled_features(model, x, device, spec)
    per_image = (time.perf_counter() - t0) / max(1, len(x))  # every view of one image
    k = max(2, len(np.unique(folds)))
    fits = fit_seconds(len(comp.x_train) * (k - 1) / k, len(tta_views(spec.tta)))
    on_disk = spec.features_dir is not None and features_path(spec, comp, model, spec.features_dir).exists()
    return TransferSeconds(fits, per_image * (len(comp.x_train) + len(comp.x_test)), on_disk)


def seconds_per_member(spec, comp, folds: np.ndarray, share: float | None = None) -> float:
    """Seconds one probe member takes here (:func:`transfer_seconds`) with ``share`` of the frozen
    pass (None: 1 / k, the folds sharing the cached features; the screening computes all of its
    subsample's: 1.0)."""
    share = 1 / max(2, len(np.unique(folds))) if share is None else share
    return transfer_seconds(spec, comp, folds).member(share)


def fit_seconds(train_rows: float, views: int) -> float:
    """Seconds of one probe member's regression fits on ``train_rows`` rows of ``views`` views:
    :data:`C_GRID` x :data:`INNER_FOLDS` + 1 fits at :data:`FIT_SECONDS` per thousand rows and view."""
    return (len(C_GRID) * INNER_FOLDS + 1) * FIT_SECONDS * train_rows * views / 1000
