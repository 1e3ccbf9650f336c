"""A loaded competition, whatever its layout: images, labels, classes, test ids, submission format."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from pipeline.io import read_rows
from pipeline.settings import Layout, Resize, SubmissionKind  # noqa: F401 - the data layer's names


@dataclass
class Competition:
    """A loaded competition.

    Attributes:
        x_train: ``(N, C, S, S)`` uint8 training images (C = 1 or 3 channels, side S); may be a
            read-only memory map (image layouts).
        y_train: ``(N,)`` int64 class indices in ``0..num_classes-1``.
        x_test: ``(M, C, S, S)`` uint8 test images, in ``sample_submission.csv``'s order.
        test_ids: ``(M,)`` the submission's ids (int64 for ``pixels``, str for image layouts).
        num_classes: number of classes.
        id_column, label_column: the submission's id column and (label kind) label column.
        fingerprint: hex digest of the parsed arrays; changes whenever the data does.
        class_names: the classes as the competition names them, index order (sorted labels).
        submission: :class:`SubmissionKind`; submission_columns: ``sample_submission.csv``'s header.
        layout: the :class:`Layout` it was read from.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    test_ids: np.ndarray
    num_classes: int
    id_column: str
    label_column: str
    fingerprint: str
    class_names: list[str] = field(default_factory=list)
    submission: SubmissionKind = SubmissionKind.label
    submission_columns: list[str] = field(default_factory=list)
    layout: Layout = Layout.pixels

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if not self.submission_columns:
            self.submission_columns = [self.id_column, self.label_column]
        self.submission = SubmissionKind(self.submission)
        self.layout = Layout(self.layout)

    @property
    def side(self) -> int:
        """Image side S in pixels."""
        return int(self.x_train.shape[-1])

    @property
    def channels(self) -> int:
        """Image channels C (1 grayscale, 3 RGB)."""
        return int(self.x_train.shape[1])


def fingerprint(*arrays: np.ndarray) -> str:
    """Short sha256 hex digest of the arrays' shapes, dtypes and bytes (read in 64 MiB slices with
    :func:`pipeline.io.read_rows`, so a memory-mapped set larger than RAM is hashed without
    loading or mapping it)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.shape}{a.dtype}".encode())
        step = max(1, (64 << 20) // max(1, int(np.prod(a.shape[1:])) * a.dtype.itemsize))
        for i in range(0, max(len(a), 1), step):
            h.update(read_rows(a, np.arange(i, min(len(a), i + step))).tobytes())
    return h.hexdigest()[:16]


def class_index(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Map raw labels to indices in sorted order: numerically when every label is an integer
    (``"2" < "10"``), else as strings. Returns ``(class names, (N,) int64 indices)``."""
    unique = sorted(set(labels))
    try:
        unique = sorted(unique, key=lambda s: int(s))
    except ValueError:
        pass
    lookup = {name: i for i, name in enumerate(unique)}
    return unique, np.array([lookup[x] for x in labels], dtype=np.int64)
