"""A member's training batches, for either augmentation backend, reseeded per epoch.

``aug.backend=torch`` keeps the fold's images on the training device and augments a batch at a
time (:class:`pipeline.augment.DeviceBatches`); ``albumentations`` is a ``DataLoader`` over
per-sample transforms that reads the images (a memory map, for image layouts) row by row.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline import augment
from pipeline.settings import AugBackend, AugSettings


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def make_batches(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int,
                 device: torch.device, aug: AugSettings | DictConfig, seed: int, workers: int = 0):
    """The training batches of one member, over ``rows`` of ``images``, for ``aug.backend``.

    ``torch``: :class:`pipeline.augment.DeviceBatches` (the rows copied to the device as uint8,
    batched augmentation). ``albumentations``: a shuffling ``DataLoader`` over per-sample
    transforms with ``workers`` processes, reading ``images`` (a memory map, for image layouts)
    one row at a time, so a set larger than RAM trains. Both drop the last incomplete batch and
    yield ``(x (B, C, S, S) float32, y (B,) int64)``.
    """
    if AugBackend(aug.backend) is AugBackend.torch:
        return augment.DeviceBatches(images[rows], labels[rows], batch_size, device, aug, seed)
    transform = augment.transform_from_cfg(aug)
    if transform is not None:
        transform.set_random_seed(seed)
    return DataLoader(augment.ImageDataset(images, labels, transform, rows), batch_size=batch_size,
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
