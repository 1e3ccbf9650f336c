"""A member's training batches, for either augmentation backend, reseeded per epoch; and a fused
group's batches with one device copy of its members' images.

``aug.backend=torch`` keeps the fold's images on the training device and augments a batch at a
time (:class:`pipeline.augment.DeviceBatches`); ``albumentations`` is a ``DataLoader`` over
per-sample transforms that reads the images (a memory map, for image layouts) row by row.
:class:`GroupBatches` (torch backend) gives a fused group's M members their batches from one
shared device copy, in the fused layout, with one gather and one augmentation pass per step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from pipeline import augment
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import read_rows
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
        out[a] = read_rows(self.first, i[a])
        out[~a] = read_rows(self.second, i[~a] - n)
        return out


class Rows:
    """The rows ``rows`` of an ``(N, C, S, S)`` uint8 image array (a memory map) read lazily: a
    slice or an int array of it reads only the rows it names, so predicting a fold batch by batch
    never copies the whole fold (:func:`pipeline.train.inference.predict_logits` slices it).
    ``np.asarray`` of it reads them all."""

    def __init__(self, images, rows: np.ndarray):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *images.shape[1:])
        self.dtype = images.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return read_rows(self.images, self.rows[i])

    def __array__(self, dtype=None, copy=None):
        out = read_rows(self.images, self.rows)
        return out if dtype is None else out.astype(dtype)


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


def make_batches(data: TrainingSet, batch_size: int, device: torch.device, aug: AugSettings,
                 seed: int, workers: int = 0, stream: bool = False, balanced: bool = False):
    """The training batches of one member over ``data`` (:func:`training_set`), for ``aug.backend``.

    ``torch``: :class:`pipeline.augment.DeviceBatches` (the rows copied to the device as uint8,
    batched augmentation), or with ``stream`` :class:`pipeline.augment.StreamedBatches` (each
    batch's rows gathered from ``data.images`` and prefetched; the same batches on the CPU). ``albumentations``: a shuffling ``DataLoader`` over per-sample
    transforms with ``workers`` processes, reading the images (a memory map, for image layouts)
    one row at a time, so a set larger than RAM trains. Both drop the last incomplete batch and
    yield ``(x (B, C, S, S) float32, y)``: ``y`` is ``(B,)`` int64, or ``(B, C)`` float32 with soft
    pseudo-labels. With ``balanced`` (``train.sampler=balanced``) each epoch draws as many rows,
    with replacement, every class equally often (:func:`pipeline.augment.epoch_order`; the
    loader: ``WeightedRandomSampler`` on its generator).
    """
    labels = data.labels[data.rows]
    if AugBackend(aug.backend) is AugBackend.torch and stream:
        return augment.StreamedBatches(data.images, data.rows, labels, batch_size, device, aug, seed, balanced=balanced)
    if AugBackend(aug.backend) is AugBackend.torch:
        return augment.DeviceBatches(read_rows(data.images, data.rows), labels, batch_size, device, aug, seed, balanced)
    transform = augment.transform_from_cfg(aug)
    if transform is not None:
        transform.set_random_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # set_epoch reseeds it: the order and the sampler's draws
    sampler = WeightedRandomSampler(augment.class_balanced_weights(labels), len(labels), replacement=True,
                                    generator=generator) if balanced else None
    return DataLoader(augment.ImageDataset(data.images, data.labels, transform, data.rows), batch_size=batch_size,
                      shuffle=sampler is None, sampler=sampler, drop_last=True, num_workers=workers,
                      worker_init_fn=_worker_init if workers > 0 else None, generator=generator,
                      pin_memory=device.type == "cuda")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a member's data order and augmentation in ``epoch``: ``(seed * 100_003 +
    epoch) mod 2**63``, from ``(seed, epoch)`` alone (like ``DistributedSampler.set_epoch``)."""
    return (seed * 100_003 + epoch) % 2**63


def set_epoch(batches, seed: int, epoch: int) -> None:
    """Reseed the data order and augmentation of ``epoch`` from ``(seed, epoch)`` alone
    (:func:`epoch_seed`), so a resumed run draws exactly the batches the uninterrupted run would
    have, with either backend."""
    s = epoch_seed(seed, epoch)
    batches.generator.manual_seed(s)
    transform = getattr(getattr(batches, "dataset", None), "transform", None)
    if transform is not None:
        transform.set_random_seed(s % 2**32)


def _shared_images(sets: Sequence[TrainingSet]) -> np.ndarray | StackedImages:
    """The one image source of ``sets``: their common ``images``; with pseudo rows the train +
    test :class:`StackedImages` (a member without pseudo rows reads ``comp.x_train``, its first
    part, whose rows have the same numbers). Raises PipelineError when they read different images."""
    stacked = [s.images for s in sets if isinstance(s.images, StackedImages)]
    source = stacked[0] if stacked else sets[0].images
    for m, s in enumerate(sets):
        im = s.images
        same = im is source or (isinstance(source, StackedImages) and (
            im is source.first or (isinstance(im, StackedImages) and im.first is source.first
                                   and im.second is source.second)))
        if not same:
            raise PipelineError(f"GroupBatches: member {m} trains on other images than member 0; a fused "
                                f"group's members share one image array")
    return source


class GroupBatches:
    """The training batches of a fused group's M members (:mod:`pipeline.train.fused`), with ONE
    device copy of their images, in the fused layout (:func:`pipeline.fusion.stack_inputs`).

    Member ``m``'s batches are exactly those its own :class:`~pipeline.augment.DeviceBatches`
    (:func:`make_batches` with its seed) would yield, bit for bit on the CPU (tests/
    test_group_batches.py): its own generator, seeded with its own seed (and reseeded per epoch
    by :meth:`set_epoch`), draws its ``randperm`` once per epoch and its augmentation per step
    (:meth:`pipeline.augment.BatchAugment.draw_members`) with the same calls as alone. What is
    shared is the work: per step ONE gather of all ``M x B`` rows from the shared copy, one
    ``.float().div_(255)``, one :meth:`~pipeline.augment.BatchAugment.apply` over all ``M x B``
    images, one copy into the fused layout; per step M x (one ``uniform_`` per augmentation part)
    draws and no host synchronisation.

    Args:
        sets: the members' :class:`TrainingSet`, in the group's order (:func:`training_set`); all
            read one image source (``comp.x_train``, or the train + test :class:`StackedImages`
            with pseudo rows, of which ``comp.x_train`` is the first part). Their labels may be
            different arrays (pseudo rows), but all ``(N,)`` int64 or all ``(N, C)`` float32.
        batch_size: B, images per member per step (the last incomplete batch dropped, like
            :class:`~pipeline.augment.DeviceBatches`).
        device: the training device.
        aug: the group's ``aug`` settings (one for all members; torch backend).
        seeds: each member's seed (its ``training_seed``, what :func:`make_batches` takes).
        channels_last: yield ``x`` in channels_last memory format (what ``train_step`` converts
            it to with ``runtime.channels_last``; then it does not copy again). Same values.

    With ``stream`` (the images exceed the group's share of memory, ``runtime.stream``) no device
    copy is made: each step's ``M x B`` rows are gathered from the host source (the decoded cache,
    a memory map) and prefetched (:func:`pipeline.augment.prefetched`); the same batches.

    Device memory held: one uint8 copy of the union U of the members' rows, ``U x C x S x S``
    bytes (``U`` <= the rows of the image source; M members of different folds share it, against
    ``sum of n_m x C x S x S`` for M :class:`~pipeline.augment.DeviceBatches`), plus per member
    its row positions (``n_m`` int64) and labels (``n_m`` int64 or ``n_m x C`` float32), plus
    per epoch the batch table, ``steps x M x B`` int64 and the labels likewise
    (:attr:`device_bytes`). Per step, transient float32 tensors of at most about ``(3C + 12) x M
    x B x S x S x 4`` bytes (the gathered batch, the augmented batch and its fused copy; the
    elastic field, its smoothing and the sampling grid, 2 values per pixel each).

    Iterating yields ``len(self)`` pairs ``(x, y)``: ``x`` ``(B, M x C, S, S)`` float32 in
    ``[0, 1]`` (member ``m``'s image ``b`` in channels ``m*C .. (m+1)*C - 1`` of row ``b``) and
    ``y`` ``(B, M)`` int64 or ``(B, M, classes)`` float32, on ``device``.

    Raises:
        PipelineError: the members' batches per epoch differ in number, or they read different
            images, or mix hard and soft labels; ``aug.backend`` is not ``torch``.
        ConfigError: ``batch_size`` exceeds a member's rows.
    """

    def __init__(self, sets: Sequence[TrainingSet], batch_size: int, device: torch.device,
                 aug: AugSettings, seeds: Sequence[int], channels_last: bool = False,
                 stream: bool = False):
        if AugBackend(aug.backend) is not AugBackend.torch:
            raise PipelineError(f"GroupBatches: aug.backend={AugBackend(aug.backend).value}; a fused group's "
                                f"shared batches need aug.backend=torch")
        if len(sets) != len(seeds) or not sets:
            raise ValueError(f"GroupBatches: {len(sets)} training sets and {len(seeds)} seeds")
        counts = [len(s.rows) // batch_size for s in sets]
        if min(counts) == 0:
            raise ConfigError(f"train.batch_size={batch_size} is larger than the {min(len(s.rows) for s in sets)} "
                              f"training rows of a fused member")
        if len(set(counts)) != 1:
            raise PipelineError(f"GroupBatches: the members have {sorted(set(counts))} batches per epoch; "
                                f"expected one count")
        if len({s.labels.ndim for s in sets}) != 1:
            raise PipelineError("GroupBatches: the members mix hard (class) and soft (probability) labels")
        source = _shared_images(sets)
        union = np.unique(np.concatenate([np.asarray(s.rows, dtype=np.int64) for s in sets]))
        # (U, C, S, S) uint8 on the device; streamed: the host source, each step's rows gathered and prefetched
        self.source, self.union = source, union
        self.x = None if stream else torch.from_numpy(read_rows(source, union)).to(device)
        self.image_shape = tuple(source.shape[1:])
        self.positions = [torch.from_numpy(np.searchsorted(union, s.rows).astype(np.int64)).to(device) for s in sets]
        self.labels = [torch.from_numpy(np.ascontiguousarray(s.labels[s.rows])).to(device) for s in sets]
        self.batch_size, self.device, self.steps = batch_size, device, counts[0]
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        self.augment = augment.batch_augment_from_cfg(aug)
        self.channels_last = channels_last

    @property
    def members(self) -> int:
        """M, the members of the group."""
        return len(self.generators)

    @property
    def device_bytes(self) -> int:
        """Bytes this object holds on the device between epochs: the shared uint8 image copy,
        the members' row positions and labels (the per-epoch batch table comes on top)."""
        held = (*self.positions, *self.labels) if self.x is None else (self.x, *self.positions, *self.labels)
        return sum(t.numel() * t.element_size() for t in held)

    def __len__(self) -> int:
        """Batches (fused steps) per epoch, the same for every member."""
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Reseed every member's generator for ``epoch`` from its seed (:func:`epoch_seed`, as
        :func:`set_epoch` reseeds a member training alone)."""
        for generator, seed in zip(self.generators, self.seeds):
            generator.manual_seed(epoch_seed(seed, epoch))

    def subset(self, members: Sequence[int]) -> GroupBatches:
        """The batches of this group's members ``members`` (indices, in that order), for a group
        rebuilt without some (one that diverged, or a half after running out of memory): the same
        device copy (no new one) and each member's own generator object, so its draws go on
        exactly where they are (after :meth:`set_epoch`, as alone). Iterate one of the two, not
        both: they share the generators. Raises IndexError for an index out of range."""
        out = copy.copy(self)
        out.positions = [self.positions[m] for m in members]
        out.labels = [self.labels[m] for m in members]
        out.seeds = [self.seeds[m] for m in members]
        out.generators = [self.generators[m] for m in members]
        return out

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """``(M x B, C, S, S)`` member-major -> ``(B, M x C, S, S)`` (one copy; channels_last:
        memory order ``(B, S, S, M x C)``)."""
        m, b = self.members, self.batch_size
        c, h, w = x.shape[1:]
        x = x.view(m, b, c, h, w)
        if self.channels_last:
            return x.permute(1, 3, 4, 0, 2).contiguous().view(b, h, w, m * c).permute(0, 3, 1, 2)
        return x.transpose(0, 1).reshape(b, m * c, h, w)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b, steps = self.batch_size, self.steps
        rows, labels = [], []
        for pos, y, generator in zip(self.positions, self.labels, self.generators):
            perm = torch.randperm(len(pos), device=self.device, generator=generator)[: steps * b]
            rows.append(pos[perm].view(steps, b))
            labels.append(y[perm].view(steps, b, *y.shape[1:]))
        table = torch.stack(rows, 1).view(steps, self.members * b)  # step i: member 0's B rows, then member 1's ...
        targets = torch.stack(labels, 2)  # (steps, B, M) or (steps, B, M, classes)
        c, h, w = self.image_shape
        if self.x is None:  # streamed: one read of the table per epoch, the rows of each step from the host
            host = self.union[table.cpu().numpy()]
            steps_x = augment.prefetched(lambda r: augment.host_to_device(self.source, r, self.device), list(host))
        else:
            steps_x = (torch.index_select(self.x, 0, table[i]) for i in range(steps))
        for i, x in enumerate(steps_x):
            params = self.augment.draw_members(self.generators, b, c, w, self.device)
            yield self._fused(self.augment.apply(x.float().div_(255), params)), targets[i]
