"""Training-time augmentation: a batched torch path and the per-sample albumentations reference.

``aug.backend=torch`` (default): :class:`BatchAugment` warps a whole ``(B, 1, S, S)`` batch at
once on the training device (one ``affine_grid`` + a smoothed random displacement field + one
``grid_sample``), so no per-sample Python runs in the hot loop. ``aug.backend=albumentations``:
:class:`ImageDataset` applies :func:`build_transform` per sample in a ``DataLoader``. Both take the
same parameters with the same meaning, and produce images of similar statistics (tests/test_augment.py);
the one difference: albumentations' ``Affine`` truncates the shift to whole pixels (at most
``int(shift * side)``), the torch path shifts by any fraction up to ``shift * side``.

Two published recipes for handwritten digits, each off when its strength is 0:

* affine: random rotation (degrees), isotropic scale and shift (fraction of the side), as in the
  Keras ``ImageDataGenerator`` settings of the top Digit Recognizer kernels;
* elastic distortion: Simard, Steinkraus & Platt, "Best practices for convolutional neural
  networks applied to visual document analysis", ICDAR 2003: a random displacement field
  smoothed by a Gaussian of std ``sigma`` pixels and scaled by ``alpha`` pixels (alpha~34,
  sigma~4 at 28 px).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

if TYPE_CHECKING:  # pragma: no cover - albumentations and OpenCV load only for that backend
    import albumentations as A

_PARAMS = ("rotate", "scale", "shift", "elastic_alpha", "elastic_sigma", "p_affine", "p_elastic",
           "hflip", "vflip", "brightness", "contrast", "saturation", "p_color")


def build_transform(rotate: float = 0.0, scale: float = 0.0, shift: float = 0.0,
                    elastic_alpha: float = 0.0, elastic_sigma: float = 4.0,
                    p_affine: float = 1.0, p_elastic: float = 0.5, hflip: float = 0.0,
                    vflip: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
                    saturation: float = 0.0, p_color: float = 1.0) -> A.Compose | None:
    """Build the albumentations pipeline for one training image.

    Args:
        rotate: max rotation in degrees (uniform in ``[-rotate, rotate]``); 0 = none.
        scale: max relative zoom (uniform in ``[1-scale, 1+scale]``); 0 = none.
        shift: max translation as a fraction of the side; 0 = none.
        elastic_alpha: elastic displacement scale in pixels (Simard et al. 2003); 0 = off.
        elastic_sigma: std in pixels of the Gaussian smoothing the displacement field.
        p_affine, p_elastic: probability of applying each part to an image.
        hflip, vflip: probability of a horizontal / vertical flip (off for digits).
        brightness, contrast, saturation: colour jitter strength s, a factor uniform in
            ``[1-s, 1+s]`` (saturation acts on RGB only); p_color: its probability per image.
    Returns:
        an ``A.Compose`` taking ``image=(S, S) or (S, S, 3) uint8``, or ``None`` when every
        strength is 0.
    """
    import albumentations as A
    import cv2

    parts: list[A.BasicTransform] = []
    if rotate or scale or shift:
        parts.append(A.Affine(rotate=(-rotate, rotate), scale=(1 - scale, 1 + scale),
                              translate_percent=(-shift, shift), interpolation=cv2.INTER_LINEAR,
                              keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, p=p_affine))
    if elastic_alpha:
        parts.append(A.ElasticTransform(alpha=elastic_alpha, sigma=elastic_sigma,
                                        noise_distribution="uniform", interpolation=cv2.INTER_LINEAR,
                                        border_mode=cv2.BORDER_CONSTANT, fill=0, p=p_elastic))
    if hflip:
        parts.append(A.HorizontalFlip(p=hflip))
    if vflip:
        parts.append(A.VerticalFlip(p=vflip))
    if brightness or contrast or saturation:
        parts.append(A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation,
                                   hue=0.0, p=p_color))
    return A.Compose(parts) if parts else None


def aug_params(aug_cfg) -> dict[str, float]:
    """The strength parameters of the ``aug`` settings (config group or
    :class:`~pipeline.settings.AugSettings`) as floats (``backend`` excluded)."""
    return {k: float(getattr(aug_cfg, k)) for k in _PARAMS}


def transform_from_cfg(aug_cfg) -> A.Compose | None:
    """:func:`build_transform` from the ``aug`` config group (same keys)."""
    return build_transform(**aug_params(aug_cfg))


def gaussian_blur_matrix(side: int, sigma: float, device: torch.device) -> torch.Tensor:
    """``(S, S)`` matrix M such that ``M @ f @ M.T`` is ``f`` (S x S) blurred by a Gaussian of std
    ``sigma`` px with replicated borders; radius 4 sigma, OpenCV's automatic size for float32.
    Two small matmuls are far faster than a 33-tap convolution on CPU and GPU alike."""
    radius = max(1, int(round(4 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    cols = (torch.arange(side, device=device)[:, None] + t.long()[None, :]).clamp_(0, side - 1)
    return torch.zeros(side, side, device=device).scatter_add_(1, cols, k.expand(side, -1).contiguous())


class BatchAugment:
    """Affine + elastic augmentation of a whole batch on its device, in one resampling, then
    flips and colour jitter.

    Same parameters and meaning as :func:`build_transform`: ``rotate`` degrees, ``scale`` relative
    zoom, ``shift`` fraction of the side, elastic ``alpha``/``sigma`` in pixels (Simard et al.
    2003: a uniform(-1, 1) field per axis, Gaussian-smoothed with std ``sigma`` and replicated
    borders, times ``alpha``), applied with probabilities ``p_affine`` / ``p_elastic`` per image.
    Bilinear sampling, zero fill outside the image. Flips with probabilities ``hflip``/``vflip``;
    colour jitter (brightness: ``x * f``, contrast: ``(x - mean) * f + mean``, saturation: ``gray +
    (x - gray) * f`` on RGB; each ``f`` uniform in ``[1-s, 1+s]``) with probability ``p_color``,
    clamped to [0, 1]. A strength of 0 is the identity.

    Args:
        generator: a ``torch.Generator`` on the images' device (for reproducible draws).
    Call with ``(B, C, S, S)`` float images; returns a new ``(B, C, S, S)`` float tensor.
    """

    def __init__(self, rotate: float = 0.0, scale: float = 0.0, shift: float = 0.0,
                 elastic_alpha: float = 0.0, elastic_sigma: float = 4.0, p_affine: float = 1.0,
                 p_elastic: float = 0.5, hflip: float = 0.0, vflip: float = 0.0,
                 brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 p_color: float = 1.0, generator: torch.Generator | None = None):
        self.rotate, self.scale, self.shift = rotate, scale, shift
        self.alpha, self.sigma = elastic_alpha, elastic_sigma
        self.p_affine, self.p_elastic = p_affine, p_elastic
        self.generator = generator
        self.has_affine = bool(rotate or scale or shift) and p_affine > 0
        self.has_elastic = bool(elastic_alpha) and p_elastic > 0
        self.hflip, self.vflip = hflip, vflip
        self.jitter = (brightness, contrast, saturation)
        self.p_color = p_color
        self.has_color = any(self.jitter) and p_color > 0
        self._blur = None  # ((side, device), blur matrix), built on first use

    @property
    def is_identity(self) -> bool:
        """True when every strength is 0 (calling returns the input unchanged)."""
        return not (self.has_affine or self.has_elastic or self.hflip or self.vflip or self.has_color)

    def _uniform(self, *shape: int, device: torch.device) -> torch.Tensor:
        """Uniform(-1, 1) draws."""
        return torch.rand(*shape, device=device, generator=self.generator) * 2 - 1

    def _gate(self, b: int, p: float, device: torch.device) -> torch.Tensor:
        return (torch.rand(b, device=device, generator=self.generator) < p).float()

    def sampling_grid(self, b: int, side: int, device: torch.device) -> torch.Tensor:
        """``(B, S, S, 2)`` normalised sampling coordinates (``grid_sample`` convention)."""
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if self.has_affine:
            gate = self._gate(b, self.p_affine, device)
            angle = self._uniform(b, device=device) * math.radians(self.rotate) * gate
            zoom = 1 + self._uniform(b, device=device) * self.scale * gate
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            theta[:, :, 2] = self._uniform(b, 2, device=device) * (2 * self.shift) * gate[:, None]
        grid = F.affine_grid(theta, [b, 1, side, side], align_corners=False)
        if self.has_elastic:
            grid = grid + self.displacement(b, side, device) * (2.0 / side)
        return grid

    def displacement(self, b: int, side: int, device: torch.device) -> torch.Tensor:
        """``(B, S, S, 2)`` elastic displacement in pixels (x, y); zero for ungated images."""
        key = (side, device)
        if self._blur is None or self._blur[0] != key:
            self._blur = (key, gaussian_blur_matrix(side, self.sigma, device))
        m = self._blur[1]
        field = m @ self._uniform(b * 2, side, side, device=device) @ m.T
        gate = self._gate(b, self.p_elastic, device)
        return (field.view(b, 2, side, side) * (self.alpha * gate)[:, None, None, None]).permute(0, 2, 3, 1)

    def _flip(self, x: torch.Tensor, p: float, dim: int) -> torch.Tensor:
        gate = self._gate(x.shape[0], p, x.device).bool()[:, None, None, None]
        return torch.where(gate, x.flip(dim), x)

    def _color(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        gate = self._gate(b, self.p_color, x.device)[:, None, None, None]
        brightness, contrast, saturation = self.jitter

        def factor(s: float) -> torch.Tensor:
            return 1 + self._uniform(b, device=x.device)[:, None, None, None] * s * gate

        if brightness:
            x = x * factor(brightness)
        if contrast:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * factor(contrast) + mean
        if saturation and x.shape[1] == 3:
            gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = gray + (x - gray) * factor(saturation)
        return x.clamp_(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_affine or self.has_elastic:
            grid = self.sampling_grid(x.shape[0], x.shape[-1], x.device)
            x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        if self.hflip:
            x = self._flip(x, self.hflip, -1)
        if self.vflip:
            x = self._flip(x, self.vflip, -2)
        if self.has_color:
            x = self._color(x)
        return x


def batch_augment_from_cfg(aug_cfg, generator: torch.Generator | None = None) -> BatchAugment:
    """:class:`BatchAugment` from the ``aug`` config group."""
    return BatchAugment(**aug_params(aug_cfg), generator=generator)


class TTAViews:
    """Deterministic test-time views of a batch: the image itself, then shifts by ``+-shifts``
    pixels along x and y, rotations by ``+-rotations`` degrees, and a horizontal mirror, as the
    settings ask (:class:`~pipeline.settings.TTASettings`). Shifts and rotations are one
    ``affine_grid`` + ``grid_sample`` each (bilinear, zero fill; a whole-pixel shift moves pixels to within float rounding).
    Iterating ``views(x)`` over a ``(B, C, S, S)`` float batch yields one ``(B, C, S, S)`` tensor
    per view, identity first; ``len(views)`` is their number."""

    def __init__(self, shifts: int = 0, rotations: float = 0.0, hflip: bool = False):
        self.params = [(0.0, 0.0, 0.0)]  # (degrees, dx px, dy px)
        if shifts:
            self.params += [(0.0, s, 0.0) for s in (shifts, -shifts)] + [(0.0, 0.0, s) for s in (shifts, -shifts)]
        if rotations:
            self.params += [(r, 0.0, 0.0) for r in (rotations, -rotations)]
        self.hflip = bool(hflip)

    def __len__(self) -> int:
        return len(self.params) + int(self.hflip)

    @staticmethod
    def _warp(x: torch.Tensor, degrees: float, dx: float, dy: float) -> torch.Tensor:
        side, a = x.shape[-1], math.radians(degrees)
        theta = torch.tensor([[math.cos(a), -math.sin(a), -2 * dx / side],
                              [math.sin(a), math.cos(a), -2 * dy / side]], device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __call__(self, x: torch.Tensor):
        for degrees, dx, dy in self.params:
            yield x if (degrees, dx, dy) == (0.0, 0.0, 0.0) else self._warp(x, degrees, dx, dy)
        if self.hflip:
            yield x.flip(-1)


def tta_views(tta) -> TTAViews:
    """:class:`TTAViews` from the ``tta`` settings (``None``: the identity view alone)."""
    if tta is None:
        return TTAViews()
    return TTAViews(int(tta.shifts), float(tta.rotations), bool(tta.hflip))


class ImageDataset(Dataset):
    """Images (and optionally labels) as float tensors, augmented per sample when training.

    Args:
        images: ``(N, C, S, S)`` uint8 (C = 1 or 3), possibly a memory map: read one row at a time.
        labels: ``(N,)`` int64, ``(N, C)`` float32 soft targets, or ``None`` for unlabeled (test)
            images.
        transform: an albumentations pipeline from :func:`build_transform`, or ``None``.
        rows: the rows of ``images`` this dataset serves (default: all), so a fold of a set larger
            than RAM is never copied whole.
    Items are ``(x, y)`` with ``x`` a ``(C, S, S)`` float32 tensor in [0, 1] and ``y`` an int64
    scalar (-1 when unlabeled) or a ``(C,)`` float32 target.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 transform: A.Compose | None = None, rows: np.ndarray | None = None):
        self.images = images
        self.labels = labels
        self.transform = transform
        self.rows = np.arange(len(images)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        i = int(self.rows[j])
        img = np.ascontiguousarray(self.images[i].transpose(1, 2, 0))  # (S, S, C) for albumentations
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        img = img.reshape(img.shape[0], img.shape[1], -1).transpose(2, 0, 1)
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32) / 255.0)
        if self.labels is not None and self.labels.ndim == 2:  # soft targets (pseudo-labels)
            return x, torch.from_numpy(np.ascontiguousarray(self.labels[i], dtype=np.float32))
        y = -1 if self.labels is None else int(self.labels[i])
        return x, torch.tensor(y, dtype=torch.int64)


class DeviceBatches:
    """Training batches with no per-sample Python: the images live on ``device`` as uint8, each
    epoch is a ``randperm`` cut into slices, normalised to [0, 1] and augmented a batch at a time.

    Args:
        images: ``(N, C, S, S)`` uint8; labels: ``(N,)`` int64 or ``(N, C)`` float32 soft targets.
        batch_size: images per batch (the last incomplete batch is dropped, like the loader's).
        aug_cfg: the ``aug`` config group; seed: seeds the device generator (order + augmentation).
    Iterating yields ``(x (B, C, S, S) float32, y (B,) int64 or (B, C) float32)`` on ``device``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 device: torch.device, aug_cfg, seed: int):
        self.x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.augment = batch_augment_from_cfg(aug_cfg, self.generator)

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.x), device=self.x.device, generator=self.generator)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.augment(self.x[idx].float().div_(255)), self.y[idx]
