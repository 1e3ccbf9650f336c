"""Training-time augmentation with albumentations, and the dataset that applies it.

Two published recipes for handwritten digits, each off when its strength is 0:

* affine: random rotation (degrees), isotropic scale and shift (fraction of the side), as in the
  Keras ``ImageDataGenerator`` settings of the top Digit Recognizer kernels;
* elastic distortion: Simard, Steinkraus & Platt, "Best practices for convolutional neural
  networks applied to visual document analysis", ICDAR 2003: a random displacement field
  smoothed by a Gaussian of std ``sigma`` pixels and scaled by ``alpha`` pixels (alpha~34,
  sigma~4 at 28 px).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset


def build_transform(rotate: float = 0.0, scale: float = 0.0, shift: float = 0.0,
                    elastic_alpha: float = 0.0, elastic_sigma: float = 4.0,
                    p_affine: float = 1.0, p_elastic: float = 0.5) -> A.Compose | None:
    """Build the albumentations pipeline for one training image.

    Args:
        rotate: max rotation in degrees (uniform in ``[-rotate, rotate]``); 0 = none.
        scale: max relative zoom (uniform in ``[1-scale, 1+scale]``); 0 = none.
        shift: max translation as a fraction of the side; 0 = none.
        elastic_alpha: elastic displacement scale in pixels (Simard et al. 2003); 0 = off.
        elastic_sigma: std in pixels of the Gaussian smoothing the displacement field.
        p_affine, p_elastic: probability of applying each part to an image.
    Returns:
        an ``A.Compose`` taking ``image=(S, S) uint8``, or ``None`` when every strength is 0.
    """
    parts: list[A.BasicTransform] = []
    if rotate or scale or shift:
        parts.append(A.Affine(rotate=(-rotate, rotate), scale=(1 - scale, 1 + scale),
                              translate_percent=(-shift, shift), interpolation=cv2.INTER_LINEAR,
                              border_mode=cv2.BORDER_CONSTANT, fill=0, p=p_affine))
    if elastic_alpha:
        parts.append(A.ElasticTransform(alpha=elastic_alpha, sigma=elastic_sigma,
                                        interpolation=cv2.INTER_LINEAR,
                                        border_mode=cv2.BORDER_CONSTANT, fill=0, p=p_elastic))
    return A.Compose(parts) if parts else None


def transform_from_cfg(aug_cfg) -> A.Compose | None:
    """:func:`build_transform` from the ``aug`` config group (same keys)."""
    return build_transform(**{k: float(v) for k, v in aug_cfg.items()})


class ImageDataset(Dataset):
    """Images (and optionally labels) as float tensors, augmented per sample when training.

    Args:
        images: ``(N, 1, S, S)`` uint8.
        labels: ``(N,)`` int64, or ``None`` for unlabeled (test) images.
        transform: an albumentations pipeline from :func:`build_transform`, or ``None``.
    Items are ``(x, y)`` with ``x`` a ``(1, S, S)`` float32 tensor in [0, 1] and ``y`` an int64
    scalar (-1 when unlabeled).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 transform: A.Compose | None = None):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i, 0]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
        y = -1 if self.labels is None else int(self.labels[i])
        return x, torch.tensor(y, dtype=torch.int64)
