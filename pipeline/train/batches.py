"""A member's training batches, for either augmentation backend, reseeded per epoch.

``aug.backend=torch`` keeps the fold's images on the training device and augments a batch at a
time (:class:`pipeline.augment.DeviceBatches`); ``albumentations`` is a ``DataLoader`` over
per-sample transforms that reads the images (a memory map, for image layouts) row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline import augment
from pipeline.settings import AugBackend, AugSettings

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.data import Competition
    from pipeline.pseudo import PseudoRows


class StackedImages:
    """Two ``(N, C, S, S)`` / ``(M, C, S, S)`` uint8 image arrays read as one of ``N + M`` rows
    (the training images, then the test images), neither copied: an int reads one row, an
    int array the rows it names (in its order)."""

    def __init__(self, first: np.ndarray, second: np.ndarray):
        self.first, self.second = first, second
        self.shape = (len(first) + len(second), *first.shape[1:])
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i):
        n = len(self.first)
        if np.isscalar(i):
            return self.first[i] if i < n else self.second[i - n]
        i = np.asarray(i)
        out = np.empty((len(i), *self.shape[1:]), dtype=self.dtype)
        a = i < n
        out[a] = self.first[i[a]]
        out[~a] = self.second[i[~a] - n]
        return out


@dataclass
class TrainingSet:
    """What one member trains on: ``images[rows]`` with ``labels[rows]``.

    ``labels`` are ``(len(images),)`` int64 class indices, or ``(len(images), C)`` float32
    probabilities with soft pseudo-labels (the train rows one-hot); rows never trained on hold
    -1 / zeros."""

    images: np.ndarray | StackedImages
    labels: np.ndarray
    rows: np.ndarray


def training_set(comp: Competition, train_rows: np.ndarray, pseudo: PseudoRows | None = None) -> TrainingSet:
    """The train rows ``train_rows`` of ``comp`` and, with ``pseudo``, its test rows with their
    pseudo-labels (:mod:`pipeline.pseudo`); validated rows are never part of it."""
    if pseudo is None or len(pseudo.rows) == 0:
        return TrainingSet(comp.x_train, comp.y_train, train_rows)
    n, m, c = len(comp.x_train), len(comp.x_test), comp.num_classes
    if pseudo.targets.ndim == 1:
        labels = np.full(n + m, -1, dtype=np.int64)
        labels[:n] = comp.y_train
    else:
        labels = np.zeros((n + m, c), dtype=np.float32)
        labels[np.arange(n), comp.y_train] = 1.0
    labels[n + pseudo.rows] = pseudo.targets
    return TrainingSet(StackedImages(comp.x_train, comp.x_test), labels,
                       np.concatenate([train_rows, n + pseudo.rows]).astype(np.int64))


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def make_batches(data: TrainingSet, batch_size: int, device: torch.device, aug: AugSettings | DictConfig,
                 seed: int, workers: int = 0):
    """The training batches of one member over ``data`` (:func:`training_set`), for ``aug.backend``.

    ``torch``: :class:`pipeline.augment.DeviceBatches` (the rows copied to the device as uint8,
    batched augmentation). ``albumentations``: a shuffling ``DataLoader`` over per-sample
    transforms with ``workers`` processes, reading the images (a memory map, for image layouts)
    one row at a time, so a set larger than RAM trains. Both drop the last incomplete batch and
    yield ``(x (B, C, S, S) float32, y)``: ``y`` is ``(B,)`` int64, or ``(B, C)`` float32 with soft
    pseudo-labels.
    """
    if AugBackend(aug.backend) is AugBackend.torch:
        return augment.DeviceBatches(data.images[data.rows], data.labels[data.rows], batch_size, device, aug, seed)
    transform = augment.transform_from_cfg(aug)
    if transform is not None:
        transform.set_random_seed(seed)
    return DataLoader(augment.ImageDataset(data.images, data.labels, transform, data.rows), batch_size=batch_size,
                      shuffle=True, drop_last=True, num_workers=workers,
                      worker_init_fn=_worker_init if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=device.type == "cuda")


def set_epoch(batches, seed: int, epoch: int) -> None:
    """Reseed the data order and augmentation of ``epoch`` from ``(seed, epoch)`` alone (like
    ``DistributedSampler.set_epoch``), so a resumed run draws exactly the batches the
    uninterrupted run would have, with either backend."""
    s = (seed * 100_003 + epoch) % 2**63
    batches.generator.manual_seed(s)
    transform = getattr(getattr(batches, "dataset", None), "transform", None)
    if transform is not None:
        transform.set_random_seed(s % 2**32)
