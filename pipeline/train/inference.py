"""Prediction with a member's model: logits and probabilities of uint8 images, one set per
test-time view (:func:`pipeline.augment.tta_views`), and the model's placement on its device. The
one way a member's OOF, test and ``stage=predict`` probabilities are computed; a fused group's
network predicts all its members at once (:func:`predict_group_probs`) the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from pipeline import augment
from pipeline.device import autocast
from pipeline.io import read_rows
from pipeline.settings import Precision, RuntimeSettings


EVAL_PIXELS_OF = 28 * 28  # runtime.eval_batch_size counts images of this many pixels


def eval_rows(batch_size: int, shape: tuple) -> int:
    """Rows per prediction batch of images of ``shape`` (``(..., S, S)``): ``runtime.eval_batch_size``
    counts 28 x 28 images, so a batch of larger images holds as many pixels (2,048 digits, 98
    images of 128 px): the activations of a batch stay about one size whatever the side (Lite0's
    activations of 2,048 images of 128 px took 6 GB of memory)."""
    pixels = int(shape[-1]) * int(shape[-2])
    return max(1, min(batch_size, batch_size * EVAL_PIXELS_OF // max(1, pixels)))


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, device: torch.device,
                   batch_size: int = 2048, channels_last: bool = False,
                   precision: Precision = Precision.fp32, views=None) -> np.ndarray:
    """Logits for uint8 images, autocast in the resolved ``precision``, one set per test-time view.

    Args:
        images: ``(N, C, S, S)`` uint8.
        views: :class:`pipeline.augment.TTAViews` (default: the image itself only).
    Returns:
        ``(V, N, classes)`` float32 logits, V = ``len(views)`` (1 without TTA).
    """
    model.eval()
    views = views or augment.TTAViews()
    out = []
    batch_size = eval_rows(batch_size, images.shape)
    for i in range(0, len(images), batch_size):
        # a copy (read_rows): the images may be the read-only decoded cache (read without mapping it)
        rows = np.arange(i, min(len(images), i + batch_size))
        x = torch.from_numpy(read_rows(images, rows)).to(device, non_blocking=True).float().div_(255)
        per_view = []
        for v in views(x):
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                per_view.append(model(v).float().cpu())
        out.append(torch.stack(per_view))
    return torch.cat(out, dim=1).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of ``(..., C)`` logits as float32 probabilities (in float64)."""
    return torch.softmax(torch.from_numpy(logits).double(), dim=-1).float().numpy()


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on ``device``, in channels_last memory format when asked: the same placement
    for training and for ``stage=predict``, so both compute bit-identical probabilities."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def predict_view_probs(model: nn.Module, images: np.ndarray, device: torch.device,
                       runtime: RuntimeSettings, precision: Precision, tta=None) -> np.ndarray:
    """``(V, N, classes)`` float32 probabilities of ``(N, C, S, S)`` uint8 images, one per
    test-time view of ``tta`` (:func:`pipeline.augment.tta_views`; the identity view first)."""
    return softmax(predict_logits(model, images, device, runtime.eval_batch_size, runtime.channels_last,
                                  precision, augment.tta_views(tta)))


def average_views(view_probs: np.ndarray) -> np.ndarray:
    """``(V, N, C)`` -> ``(N, C)`` float32: the mean over test-time views (in float64)."""
    return view_probs.astype(np.float64).mean(0).astype(np.float32)


def predict_probs(model: nn.Module, images: np.ndarray, device: torch.device,
                  runtime: RuntimeSettings, precision: Precision, tta=None) -> np.ndarray:
    """``(N, classes)`` float32 probabilities of ``(N, C, S, S)`` uint8 images, averaged over the
    test-time views of ``tta``: the one way a member's OOF, test and ``stage=predict``
    probabilities are computed."""
    return average_views(predict_view_probs(model, images, device, runtime, precision, tta))


@torch.no_grad()
def predict_group_view_probs(model: nn.Module, images: Sequence[np.ndarray], device: torch.device,
                             runtime: RuntimeSettings, precision: Precision, tta=None) -> list[np.ndarray]:
    """Every member's probabilities from a fused group's network (:func:`pipeline.fusion.fuse`)
    in eval mode: member ``m``'s ``(V, N_m, classes)`` float32 probabilities of ``images[m]``, one
    set per test-time view of ``tta`` (the identity first), as :func:`predict_view_probs` gives
    them for the member's split-out model (to float rounding of the grouped kernels).

    Batches of ``max(1, eval_rows(runtime.eval_batch_size) // M)`` rows per member (about as many images per
    forward as one member's prediction) are stacked on the host in the fused layout ``(b, M, C,
    S, S)`` uint8 (a member with fewer rows padded with zeros, its padding dropped afterwards),
    copied to ``device`` once, normalised, and run through the network once per view, autocast in
    ``precision`` as :func:`predict_logits` does; ONE device-to-host copy of the ``(V, b, M,
    classes)`` logits per batch. Test-time views warp every channel alike, so a view of the fused
    batch is each member's view.

    Args:
        images: M arrays ``(N_m, C, S, S)`` uint8 of one ``C x S x S`` (their ``N_m`` may differ).
    Raises:
        ValueError: the members' images differ in shape past the first axis.
    """
    members = len(images)
    shape = images[0].shape[1:]
    if any(x.shape[1:] != shape for x in images):
        raise ValueError(f"predict_group_view_probs: the members' images differ in shape: {[x.shape for x in images]}")
    views = augment.tta_views(tta)
    rows = max(1, eval_rows(runtime.eval_batch_size, shape) // members)
    longest = max(len(x) for x in images)
    model.eval()
    out = []
    for i in range(0, longest, rows):
        b = min(rows, longest - i)
        batch = np.zeros((b, members, *shape), dtype=np.uint8)
        for m, x in enumerate(images):
            part = x[i:i + b]
            batch[:len(part), m] = part
        x = torch.from_numpy(batch).to(device, non_blocking=True).float().div_(255)
        x = x.view(b, members * shape[0], *shape[1:])  # (b, M, C, S, S) -> the fused layout, no copy
        per_view = []
        for v in views(x):
            if runtime.channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                per_view.append(model(v).float())
        out.append(torch.stack(per_view).cpu())  # (V, b, M, classes): one copy per batch
    logits = torch.cat(out, dim=1).numpy()
    return [softmax(np.ascontiguousarray(logits[:, :len(x), m])) for m, x in enumerate(images)]


def predict_group_probs(model: nn.Module, images: Sequence[np.ndarray], device: torch.device,
                        runtime: RuntimeSettings, precision: Precision, tta=None) -> list[np.ndarray]:
    """Every member's ``(N_m, classes)`` float32 probabilities from a fused group's network,
    averaged over the test-time views of ``tta`` (:func:`predict_group_view_probs`): what
    :func:`predict_probs` gives for each split-out member, without splitting the group (per-epoch
    validation: ``tta=None``)."""
    return [average_views(v) for v in predict_group_view_probs(model, images, device, runtime, precision, tta)]
