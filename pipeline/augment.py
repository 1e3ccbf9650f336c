"""Training-time augmentation: a batched torch path and the per-sample albumentations reference.

``aug.backend=torch`` (default): :class:`BatchAugment` warps a whole ``(B, 1, S, S)`` batch at
once on the training device (one ``affine_grid`` + a smoothed random displacement field + one
``grid_sample``, then one ``where`` per flip / rotation, elementwise colour jitter and one masked
``where`` for erasing), so no per-sample Python runs in the hot loop. ``aug.backend=albumentations``:
:class:`ImageDataset` applies :func:`build_transform` per sample in a ``DataLoader``. Both take the
same parameters with the same meaning, and produce images of similar statistics (tests/test_augment.py);
the differences: albumentations' ``Affine`` truncates the shift to whole pixels (at most
``int(shift * side)``), the torch path shifts by any fraction up to ``shift * side``; its
``Erasing`` draws the aspect ratio uniformly (torch: log-uniform, as torchvision) and caps the area
at ``0.3`` of the image (torch: clamps a rectangle that overflows to the side, never needed for
``erase_area <= 0.3``).

Published recipes, each off when its strength is 0. For handwritten digits:

* affine: random rotation (degrees), isotropic scale and shift (fraction of the side), as in the
  Keras ``ImageDataGenerator`` settings of the top Digit Recognizer kernels;
* elastic distortion: Simard, Steinkraus & Platt, "Best practices for convolutional neural
  networks applied to visual document analysis", ICDAR 2003: a random displacement field
  smoothed by a Gaussian of std ``sigma`` pixels and scaled by ``alpha`` pixels (alpha~34,
  sigma~4 at 28 px).

For photographs, aerial and microscopy images (never digits: a rotated 6 is a 9):

* flips and ``rot90``: a rotation by 90, 180 or 270 degrees (one of the three, uniformly) with
  probability ``rot90``, applied with the flips (needs square images; ours are ``(S, S)``);
* colour jitter (brightness, contrast, saturation), as torchvision's ``ColorJitter``;
* random erasing: Zhong, Zheng, Kang, Li & Yang, "Random Erasing Data Augmentation", AAAI 2020
  (arXiv:1708.04896, 2017): with probability ``erase``, one rectangle per image of area uniform in
  ``[0.02, erase_area]`` of the image and aspect ratio (height / width) log-uniform in ``[0.3,
  3.3]``, at a uniform position where it fits, its pixels set to uniform random values (every
  channel; ``[0, 1)`` floats on the torch path, which works on images scaled to [0, 1], uint8
  ``0..255`` on the albumentations path). Applied last, after the geometric and colour parts, as
  in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pipeline.io import read_rows

if TYPE_CHECKING:  # pragma: no cover - albumentations and OpenCV load only for that backend
    import albumentations as A

_PARAMS = ("rotate", "scale", "shift", "elastic_alpha", "elastic_sigma", "p_affine", "p_elastic",
           "hflip", "vflip", "rot90", "erase", "erase_area", "brightness", "contrast", "saturation", "p_color")

ERASE_MIN_AREA = 0.02          # Zhong et al. 2017: the erased area's lower bound s_l (fraction of the image)
ERASE_RATIO = (0.3, 3.3)       # ... and its aspect ratio's range (r_1, 1/r_1), as torchvision's RandomErasing


def build_transform(rotate: float = 0.0, scale: float = 0.0, shift: float = 0.0,
                    elastic_alpha: float = 0.0, elastic_sigma: float = 4.0,
                    p_affine: float = 1.0, p_elastic: float = 0.5, hflip: float = 0.0,
                    vflip: float = 0.0, rot90: float = 0.0, erase: float = 0.0, erase_area: float = 0.25,
                    brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                    p_color: float = 1.0) -> A.Compose | None:
    """Build the albumentations pipeline for one training image.

    Args:
        rotate: max rotation in degrees (uniform in ``[-rotate, rotate]``); 0 = none.
        scale: max relative zoom (uniform in ``[1-scale, 1+scale]``); 0 = none.
        shift: max translation as a fraction of the side; 0 = none.
        elastic_alpha: elastic displacement scale in pixels (Simard et al. 2003); 0 = off.
        elastic_sigma: std in pixels of the Gaussian smoothing the displacement field.
        p_affine, p_elastic: probability of applying each part to an image.
        hflip, vflip: probability of a horizontal / vertical flip (off for digits).
        rot90: probability of a rotation by 90, 180 or 270 degrees, one of the three uniformly
            (``A.OneOf`` of transpose/flip pairs: ``A.RandomRotate90`` would also pick 0 degrees).
        erase: probability of random erasing (``A.Erasing``, Zhong et al. 2017): one rectangle of
            area uniform in ``[0.02, erase_area]`` of the image (at most 0.3, so that every ratio
            fits), aspect ratio uniform in ``[0.3, 3.3]``, filled with uniform random uint8 values.
        erase_area: the erased rectangle's largest area, fraction of the image.
        brightness, contrast, saturation: colour jitter strength s, a factor uniform in
            ``[1-s, 1+s]`` (saturation acts on RGB only); p_color: its probability per image.
    Order: affine, elastic, flips, rot90, colour jitter, erasing.
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
    if rot90:  # np.rot90 by k=1: transpose then vertical flip; k=2: both flips; k=3: transpose then horizontal flip
        parts.append(A.OneOf([A.Sequential([A.Transpose(p=1), A.VerticalFlip(p=1)], p=1),
                              A.Sequential([A.HorizontalFlip(p=1), A.VerticalFlip(p=1)], p=1),
                              A.Sequential([A.Transpose(p=1), A.HorizontalFlip(p=1)], p=1)], p=rot90))
    if brightness or contrast or saturation:
        parts.append(A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation,
                                   hue=0.0, p=p_color))
    if erase:
        parts.append(A.Erasing(scale=(min(ERASE_MIN_AREA, erase_area), max(ERASE_MIN_AREA, erase_area)),
                               ratio=ERASE_RATIO, fill="random", p=erase))
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


@dataclass
class AugParams:
    """One batch's random draws for :class:`BatchAugment`: raw uniform ``[0, 1)`` float32 tensors
    on the images' device, exactly as the generator gave them (:meth:`BatchAugment.apply` turns
    them into gates, angles, zooms, shifts, displacements and factors). A part that is off is
    ``None``. The fields are declared in the order they are drawn (the order
    :meth:`BatchAugment.__call__` has always drawn them, so draws and results are unchanged).

    Attributes:
        batch: the images B they are for.
        affine_gate: ``(B,)`` the affine part applies where ``u < p_affine``.
        angle: ``(B,)`` rotation ``(2u - 1) x rotate`` degrees.
        zoom: ``(B,)`` zoom ``1 + (2u - 1) x scale``.
        shift: ``(B, 2)`` translation (x, y) ``(2u - 1) x shift`` of the side.
        field: ``(2B, S, S)`` the elastic displacement before smoothing, ``2u - 1`` per pixel (rows
            ``2b`` and ``2b + 1``: image ``b``'s x and y).
        elastic_gate: ``(B,)`` the elastic part applies where ``u < p_elastic``.
        hflip, vflip: ``(B,)`` a flip where ``u < hflip`` / ``u < vflip``.
        rot90: ``(B,)`` a rotation by a multiple of 90 degrees where ``u < rot90``.
        rot90_k: ``(B,)`` by ``k x 90`` degrees (counter-clockwise), ``k = 1 + floor(3u)`` in {1, 2, 3}.
        color_gate: ``(B,)`` the colour jitter applies where ``u < p_color``.
        brightness, contrast, saturation: ``(B,)`` factor ``1 + (2u - 1) x s`` (saturation: RGB only).
        erase: ``(B,)`` random erasing applies where ``u < erase``.
        erase_box: ``(B, 4)`` the rectangle: area ``0.02 + u0 x (erase_area - 0.02)`` of the image,
            aspect ratio ``0.3 x (3.3 / 0.3) ** u1`` (height / width), top ``floor(u2 x (S - h + 1))``,
            left ``floor(u3 x (S - w + 1))``.
        erase_fill: ``(B, C, S, S)`` the erased pixels' values ``u`` (used inside the rectangle only).
    Several members' draws concatenate along the batch (:meth:`cat`) and apply in one pass.
    """

    batch: int
    affine_gate: torch.Tensor | None = None
    angle: torch.Tensor | None = None
    zoom: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    field: torch.Tensor | None = None
    elastic_gate: torch.Tensor | None = None
    hflip: torch.Tensor | None = None
    vflip: torch.Tensor | None = None
    rot90: torch.Tensor | None = None
    rot90_k: torch.Tensor | None = None
    color_gate: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    erase: torch.Tensor | None = None
    erase_box: torch.Tensor | None = None
    erase_fill: torch.Tensor | None = None

    @staticmethod
    def draw_order() -> tuple[str, ...]:
        """The tensor fields in the order they are drawn."""
        return tuple(f.name for f in fields(AugParams) if f.name != "batch")

    @classmethod
    def cat(cls, parts: Sequence[AugParams]) -> AugParams:
        """Several batches' draws as one: images in the order of ``parts`` (one ``torch.cat``
        per part that is on). Raises ValueError when the parts do not draw the same parts."""
        tensors = {}
        for name in cls.draw_order():
            present = [getattr(p, name) is not None for p in parts]
            if any(present) and not all(present):
                raise ValueError(f"AugParams.cat: {name} is drawn for some batches only")
            tensors[name] = torch.cat([getattr(p, name) for p in parts]) if all(present) else None
        return cls(sum(p.batch for p in parts), **tensors)


class BatchAugment:
    """Affine + elastic augmentation of a whole batch on its device, in one resampling, then
    flips, 90-degree rotations, colour jitter and random erasing.

    Same parameters and meaning as :func:`build_transform`: ``rotate`` degrees, ``scale`` relative
    zoom, ``shift`` fraction of the side, elastic ``alpha``/``sigma`` in pixels (Simard et al.
    2003: a uniform(-1, 1) field per axis, Gaussian-smoothed with std ``sigma`` and replicated
    borders, times ``alpha``), applied with probabilities ``p_affine`` / ``p_elastic`` per image.
    Bilinear sampling, zero fill outside the image. Flips with probabilities ``hflip``/``vflip``;
    with probability ``rot90`` a rotation by 90, 180 or 270 degrees (uniformly; ``torch.rot90`` of
    the batch, one ``where`` per angle; square images only); colour jitter (brightness: ``x * f``,
    contrast: ``(x - mean) * f + mean``, saturation: ``gray + (x - gray) * f`` on RGB; each ``f``
    uniform in ``[1-s, 1+s]``) with probability ``p_color``, clamped to [0, 1]; last, with
    probability ``erase``, random erasing (Zhong et al. 2017): one rectangle per image, area
    uniform in ``[0.02, erase_area]`` of the image, aspect ratio log-uniform in ``[0.3, 3.3]``
    (sides rounded to whole pixels, at least 1; a side longer than the image, possible only for
    ``erase_area > 0.3``, is clamped to it), uniformly placed where it fits, its pixels uniform in
    ``[0, 1)`` per channel (the range of the images here). The rectangles are masks built from
    per-image bounds by ``arange`` comparisons, so no per-image Python either. A strength of 0 is
    the identity and draws nothing, so the generator's stream is that of the parts that are on.

    Drawing and applying are separate: :meth:`draw` takes one batch's random numbers from a
    generator (:class:`AugParams`), :meth:`apply` augments a batch with given draws; calling is
    both. :meth:`draw_members` draws several members' batches, each from its own generator, into
    one :class:`AugParams`, so a fused group (:class:`pipeline.train.batches.GroupBatches`)
    augments all its members' images in one pass: one sampling grid, one ``grid_sample``, one
    flip, one colour op, one erasing mask. Every operation of :meth:`apply` computes each image from its own draws
    only, so an image comes out bit-identical whether it is augmented alone or concatenated
    with others on the CPU (tested); on CUDA the two matrix products (elastic smoothing, the
    affine grid) may pick other cuBLAS kernels for another batch size, so equal to float rounding.

    Args:
        generator: a ``torch.Generator`` on the images' device (for reproducible draws).
    Call with ``(B, C, S, S)`` float images; returns a new ``(B, C, S, S)`` float tensor.
    """

    def __init__(self, rotate: float = 0.0, scale: float = 0.0, shift: float = 0.0,
                 elastic_alpha: float = 0.0, elastic_sigma: float = 4.0, p_affine: float = 1.0,
                 p_elastic: float = 0.5, hflip: float = 0.0, vflip: float = 0.0, rot90: float = 0.0,
                 erase: float = 0.0, erase_area: float = 0.25, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, p_color: float = 1.0,
                 generator: torch.Generator | None = None):
        self.rotate, self.scale, self.shift = rotate, scale, shift
        self.alpha, self.sigma = elastic_alpha, elastic_sigma
        self.p_affine, self.p_elastic = p_affine, p_elastic
        self.generator = generator
        self.has_affine = bool(rotate or scale or shift) and p_affine > 0
        self.has_elastic = bool(elastic_alpha) and p_elastic > 0
        self.hflip, self.vflip = hflip, vflip
        self.rot90 = rot90
        self.erase, self.erase_area = erase, erase_area
        self.jitter = (brightness, contrast, saturation)
        self.p_color = p_color
        self.has_color = any(self.jitter) and p_color > 0
        self._blur = None  # ((side, device), blur matrix), built on first use

    @property
    def is_identity(self) -> bool:
        """True when every strength is 0 (calling returns the input unchanged)."""
        return not (self.has_affine or self.has_elastic or self.hflip or self.vflip or self.rot90 or self.has_color
                    or self.erase)

    # ------------------------------------------------------------------ drawing

    def _parts(self, channels: int, geometric_only: bool = False) -> tuple[str, ...]:
        """The :class:`AugParams` fields these settings draw for ``channels``-channel images, in
        draw order (:meth:`sampling_grid` draws the geometric ones only)."""
        on = {"affine_gate": self.has_affine, "angle": self.has_affine, "zoom": self.has_affine,
              "shift": self.has_affine, "field": self.has_elastic, "elastic_gate": self.has_elastic,
              "hflip": bool(self.hflip) and not geometric_only, "vflip": bool(self.vflip) and not geometric_only}
        rot90 = bool(self.rot90) and not geometric_only
        on |= {"rot90": rot90, "rot90_k": rot90}
        color = self.has_color and not geometric_only
        brightness, contrast, saturation = self.jitter
        on |= {"color_gate": color, "brightness": color and bool(brightness),
               "contrast": color and bool(contrast), "saturation": color and bool(saturation) and channels == 3}
        erase = bool(self.erase) and not geometric_only
        on |= {"erase": erase, "erase_box": erase, "erase_fill": erase}
        return tuple(name for name in AugParams.draw_order() if on[name])

    def draw_members(self, generators: Sequence[torch.Generator | None], batch: int, channels: int, side: int,
                     device: torch.device, geometric_only: bool = False) -> AugParams:
        """The draws of ``len(generators)`` batches of ``batch`` images each, batch ``m`` from
        ``generators[m]`` exactly as :meth:`draw` with that generator would draw it (same calls,
        same shapes, same order; ``None``: torch's default generator), written into one
        :class:`AugParams` of ``len(generators) x batch`` images (batch ``m``'s rows
        ``m*batch .. (m+1)*batch - 1``; no concatenation copy). One ``uniform_`` per part per
        generator, nothing else: no host synchronisation.

        Args:
            batch: images per member; channels: C (saturation is drawn for RGB only; the erasing
                fill per channel); side: S px.
            device: where the draws live (the generators' device).
            geometric_only: draw the affine and elastic parts only (:meth:`sampling_grid`).
        """
        n = len(generators) * batch
        shapes = {"shift": (n, 2), "field": (2 * n, side, side), "erase_box": (n, 4),
                  "erase_fill": (n, channels, side, side)}
        parts = self._parts(channels, geometric_only)
        p = AugParams(n, **{name: torch.empty(shapes.get(name, (n,)), device=device) for name in parts})
        for m, generator in enumerate(generators):
            for name in parts:
                rows = 2 * batch if name == "field" else batch
                getattr(p, name)[m * rows:(m + 1) * rows].uniform_(0, 1, generator=generator)
        return p

    def draw(self, batch: int, channels: int, side: int, device: torch.device,
             generator: torch.Generator | None = None) -> AugParams:
        """One batch's draws (:class:`AugParams`) for ``batch`` images of ``channels`` x ``side``
        x ``side`` px, from ``generator`` (default: this augment's), in exactly the order and
        shapes :meth:`__call__` draws them."""
        return self.draw_members([self.generator if generator is None else generator], batch, channels, side, device)

    # ------------------------------------------------------------------ applying

    def _blur_matrix(self, side: int, device: torch.device) -> torch.Tensor:
        key = (side, device)
        if self._blur is None or self._blur[0] != key:
            self._blur = (key, gaussian_blur_matrix(side, self.sigma, device))
        return self._blur[1]

    def _displacement(self, field: torch.Tensor, gate: torch.Tensor, side: int) -> torch.Tensor:
        """``(B, S, S, 2)`` elastic displacement in pixels (x, y) of raw draws ``field`` ``(2B, S,
        S)`` and ``gate`` ``(B,)``; zero for ungated images."""
        m = self._blur_matrix(side, field.device)
        smooth = m @ (field * 2 - 1) @ m.T
        on = (gate < self.p_elastic).float()
        b = on.shape[0]
        return (smooth.view(b, 2, side, side) * (self.alpha * on)[:, None, None, None]).permute(0, 2, 3, 1)

    def grid(self, p: AugParams, side: int, device: torch.device) -> torch.Tensor:
        """``(B, S, S, 2)`` normalised sampling coordinates (``grid_sample`` convention) of the
        affine and elastic draws of ``p`` (the identity grid where both are off)."""
        b = p.batch
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if p.affine_gate is not None:
            gate = (p.affine_gate < self.p_affine).float()
            angle = (p.angle * 2 - 1) * math.radians(self.rotate) * gate
            zoom = 1 + (p.zoom * 2 - 1) * self.scale * gate
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
            theta[:, :, 2] = (p.shift * 2 - 1) * (2 * self.shift) * gate[:, None]
        grid = F.affine_grid(theta, [b, 1, side, side], align_corners=False)
        if p.field is not None:
            grid = grid + self._displacement(p.field, p.elastic_gate, side) * (2.0 / side)
        return grid

    def _color(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        gate = (p.color_gate < self.p_color).float()[:, None, None, None]

        def factor(u: torch.Tensor, s: float) -> torch.Tensor:
            return 1 + (u * 2 - 1)[:, None, None, None] * s * gate

        brightness, contrast, saturation = self.jitter
        if p.brightness is not None:
            x = x * factor(p.brightness, brightness)
        if p.contrast is not None:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * factor(p.contrast, contrast) + mean
        if p.saturation is not None:
            gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = gray + (x - gray) * factor(p.saturation, saturation)
        return x.clamp_(0, 1)

    def _rot90(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        """``x`` rotated by ``k x 90`` degrees per image (:attr:`AugParams.rot90_k`) where gated:
        ``torch.rot90`` of the whole batch per ``k`` and a ``where`` (no host synchronisation)."""
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"BatchAugment: rot90 needs square images, got {tuple(x.shape[-2:])}")
        k = torch.where(p.rot90 < self.rot90, 1 + (p.rot90_k * 3).long().clamp_(max=2), 0)
        out = x
        for turns in (1, 2, 3):
            out = torch.where((k == turns)[:, None, None, None], x.rot90(turns, (-2, -1)), out)
        return out

    def erase_mask(self, p: AugParams, side: int) -> torch.Tensor:
        """``(B, S, S)`` bool: the pixels random erasing replaces (the draws :attr:`AugParams.erase`
        and :attr:`AugParams.erase_box`; all False for ungated images)."""
        lo, (r_min, r_max) = ERASE_MIN_AREA, ERASE_RATIO
        u = p.erase_box
        area = (lo + u[:, 0] * (self.erase_area - lo)) * (side * side)
        ratio = torch.exp(math.log(r_min) + u[:, 1] * math.log(r_max / r_min))
        h = torch.sqrt(area * ratio).round_().clamp_(1, side)
        w = torch.sqrt(area / ratio).round_().clamp_(1, side)
        top = torch.minimum((u[:, 2] * (side - h + 1)).floor_(), side - h)
        left = torch.minimum((u[:, 3] * (side - w + 1)).floor_(), side - w)
        at = torch.arange(side, device=u.device, dtype=u.dtype)
        rows = (at >= top[:, None]) & (at < (top + h)[:, None])
        cols = (at >= left[:, None]) & (at < (left + w)[:, None])
        return rows[:, :, None] & cols[:, None, :] & (p.erase < self.erase)[:, None, None]

    def apply(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        """``x`` ``(B, C, S, S)`` float augmented with the draws ``p`` (:meth:`draw`,
        :meth:`draw_members` or :meth:`AugParams.cat` of them, ``p.batch == B``): one sampling
        grid and one ``grid_sample``, one ``where`` per flip and per 90-degree angle, one colour
        jitter, one erasing ``where``, over the whole batch. Returns a new ``(B, C, S, S)`` tensor
        (``x`` itself when ``p`` draws nothing). Raises ValueError when ``p`` is for another batch
        size, or when it draws rot90 for images that are not square."""
        if p.batch != x.shape[0]:
            raise ValueError(f"BatchAugment.apply: draws for {p.batch} images, got a batch of {x.shape[0]}")
        if p.affine_gate is not None or p.field is not None:
            grid = self.grid(p, x.shape[-1], x.device)
            x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        if p.hflip is not None:
            x = torch.where((p.hflip < self.hflip)[:, None, None, None], x.flip(-1), x)
        if p.vflip is not None:
            x = torch.where((p.vflip < self.vflip)[:, None, None, None], x.flip(-2), x)
        if p.rot90 is not None:
            x = self._rot90(x, p)
        if p.color_gate is not None:
            x = self._color(x, p)
        if p.erase is not None:
            x = torch.where(self.erase_mask(p, x.shape[-1])[:, None], p.erase_fill.to(x.dtype), x)
        return x

    # ------------------------------------------------------------------ both

    def sampling_grid(self, b: int, side: int, device: torch.device) -> torch.Tensor:
        """``(B, S, S, 2)`` normalised sampling coordinates (``grid_sample`` convention), the
        affine and elastic parts drawn from this augment's generator."""
        return self.grid(self.draw_members([self.generator], b, 1, side, device, geometric_only=True), side, device)

    def displacement(self, b: int, side: int, device: torch.device) -> torch.Tensor:
        """``(B, S, S, 2)`` elastic displacement in pixels (x, y), drawn from this augment's
        generator; zero for ungated images."""
        field = torch.rand(b * 2, side, side, device=device, generator=self.generator)
        gate = torch.rand(b, device=device, generator=self.generator)
        return self._displacement(field, gate, side)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` of :meth:`draw` for the batch ``x`` ``(B, C, S, S)`` float."""
        return self.apply(x, self.draw(x.shape[0], x.shape[1], x.shape[-1], x.device))


def batch_augment_from_cfg(aug_cfg, generator: torch.Generator | None = None) -> BatchAugment:
    """:class:`BatchAugment` from the ``aug`` config group."""
    return BatchAugment(**aug_params(aug_cfg), generator=generator)


class TTAViews:
    """Deterministic test-time views of a batch: the image itself, then shifts by ``+-shifts``
    pixels along x and y, rotations by ``+-rotations`` degrees, and a horizontal mirror, as the
    settings ask (:class:`~pipeline.settings.TTASettings`); with ``dihedral`` the mirror is
    followed by the other six symmetries of the square (rotations by 90, 180 and 270 degrees and
    their mirrors: the dihedral group D4, exact pixel permutations), so the first two views are
    the same as with ``hflip`` alone. Shifts and rotations are one ``affine_grid`` +
    ``grid_sample`` each (bilinear, zero fill; a whole-pixel shift moves pixels to within float
    rounding). Iterating ``views(x)`` over a ``(B, C, S, S)`` float batch yields one
    ``(B, C, S, S)`` tensor per view, identity first; ``len(views)`` is their number."""

    def __init__(self, shifts: int = 0, rotations: float = 0.0, hflip: bool = False, dihedral: bool = False):
        self.params = [(0.0, 0.0, 0.0)]  # (degrees, dx px, dy px)
        if shifts:
            self.params += [(0.0, s, 0.0) for s in (shifts, -shifts)] + [(0.0, 0.0, s) for s in (shifts, -shifts)]
        if rotations:
            self.params += [(r, 0.0, 0.0) for r in (rotations, -rotations)]
        self.hflip = bool(hflip) or bool(dihedral)
        self.dihedral = bool(dihedral)

    def __len__(self) -> int:
        return len(self.params) + int(self.hflip) + 6 * int(self.dihedral)

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
        if self.dihedral:
            for k in (1, 2, 3):
                turned = torch.rot90(x, k, (-2, -1))
                yield turned
                yield turned.flip(-1)


def tta_views(tta) -> TTAViews:
    """:class:`TTAViews` from the ``tta`` settings (``None``: the identity view alone)."""
    if tta is None:
        return TTAViews()
    return TTAViews(int(tta.shifts), float(tta.rotations), bool(tta.hflip), bool(tta.dihedral))


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


def class_balanced_weights(y: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N,)`` float64 sampling weights of ``N`` training rows, each the inverse of its class's
    count (``y``: ``(N,)`` int64 classes, or ``(N, C)`` float32 soft targets: their argmax), so
    that every class is drawn equally often (``train.sampler=balanced``)."""
    y = torch.as_tensor(y)
    classes = y.argmax(1) if y.ndim == 2 else y.clamp(min=0)
    return 1.0 / torch.bincount(classes).double()[classes]


def epoch_order(y: torch.Tensor, generator: torch.Generator, balanced: bool) -> torch.Tensor:
    """``(N,)`` int64 positions of one epoch's rows among ``N`` training rows with labels ``y``,
    on ``y``'s device, drawn on ``generator``: a ``randperm`` (``train.sampler=shuffle``), or with
    ``balanced`` ``N`` draws with replacement weighted by :func:`class_balanced_weights`."""
    if not balanced:
        return torch.randperm(len(y), device=y.device, generator=generator)
    weights = class_balanced_weights(y).to(y.device)
    return torch.multinomial(weights, len(y), replacement=True, generator=generator)


class DeviceBatches:
    """Training batches with no per-sample Python: the images live on ``device`` as uint8, each
    epoch is a ``randperm`` cut into slices, normalised to [0, 1] and augmented a batch at a time.

    Args:
        images: ``(N, C, S, S)`` uint8; labels: ``(N,)`` int64 or ``(N, C)`` float32 soft targets.
        batch_size: images per batch (the last incomplete batch is dropped, like the loader's).
        aug_cfg: the ``aug`` config group; seed: seeds the device generator (order + augmentation).
        balanced: each epoch's rows drawn class-balanced (:func:`epoch_order`, ``train.sampler``).
    Iterating yields ``(x (B, C, S, S) float32, y (B,) int64 or (B, C) float32)`` on ``device``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 device: torch.device, aug_cfg, seed: int, balanced: bool = False):
        self.x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
        self.batch_size, self.balanced = batch_size, balanced
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.augment = batch_augment_from_cfg(aug_cfg, self.generator)

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self):
        perm = epoch_order(self.y, self.generator, self.balanced)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.augment(self.x[idx].float().div_(255)), self.y[idx]


class StreamedBatches:
    """:class:`DeviceBatches` for images that do not fit the device: the same epochs (one
    ``randperm`` of the rows on the device's generator, cut into slices; the same augmentation
    after), but each batch's images are gathered from host memory (the decoded cache, a memory
    map: only the rows of the batch are read) by a background thread, pinned on CUDA and copied
    without blocking, ``prefetch`` batches ahead of the step that uses them. On the CPU it yields
    exactly what :class:`DeviceBatches` yields for the same seed.

    Args:
        images: ``(N, C, S, S)`` uint8, any array-like indexable by an int array (a memory map,
            :class:`pipeline.train.batches.StackedImages`); not copied.
        rows: ``(R,)`` int64, the rows of ``images`` to train on; labels: ``(R,)`` int64 or
            ``(R, C)`` float32 soft targets (one per row of ``rows``), copied to the device.
        batch_size, device, aug_cfg, seed, balanced: as :class:`DeviceBatches`; prefetch: batches
            gathered ahead.
    Iterating yields ``(x (B, C, S, S) float32, y)`` on ``device``.
    """

    def __init__(self, images, rows: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                 aug_cfg, seed: int, prefetch: int = 2, balanced: bool = False):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        self.y = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
        self.batch_size, self.device, self.prefetch = batch_size, device, max(1, prefetch)
        self.balanced = balanced
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.augment = batch_augment_from_cfg(aug_cfg, self.generator)

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size

    def _gather(self, picks: np.ndarray) -> torch.Tensor:
        return host_to_device(self.images, self.rows[picks], self.device)

    def __iter__(self):
        perm = epoch_order(self.y, self.generator, self.balanced)
        order, b = perm.cpu().numpy(), self.batch_size
        batches = prefetched(self._gather, [order[i * b:(i + 1) * b] for i in range(len(self))], self.prefetch)
        for i, x in enumerate(batches):
            yield self.augment(x.float().div_(255)), self.y[perm[i * b:(i + 1) * b]]


def host_to_device(images, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """``images[rows]`` (``(B, C, S, S)`` uint8 from host memory; from the decoded cache only those
    rows are read, :func:`pipeline.io.read_rows`) on ``device``: pinned and copied without
    blocking on CUDA."""
    x = torch.from_numpy(read_rows(images, rows))
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def prefetched(gather, picks: list, ahead: int = 2):
    """``gather(p)`` for each ``p`` of ``picks``, in order, computed by one background thread
    ``ahead`` items before they are used (the host reads the next batches while the device
    trains on this one). Leaving the loop early waits for the gathers already started."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        queue = deque(pool.submit(gather, p) for p in picks[:ahead])
        for i in range(len(picks)):
            x = queue.popleft().result()
            if i + ahead < len(picks):
                queue.append(pool.submit(gather, picks[i + ahead]))
            yield x
