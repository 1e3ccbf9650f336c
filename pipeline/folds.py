"""Stage ``folds``: one stratified k-fold assignment, written once and shared by every model.

The file ``folds/folds_k<k>_seed<seed>_<data>[_g<groups>].csv`` (``<data>``: the competition's
fingerprint, shortened; ``<groups>``: a digest of the rows' groups) has the columns
``row_id,label,fold``: ``row_id`` is the 0-based row of ``train.csv``. It is made with
scikit-learn's ``StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)``, or with
``folds.group`` its ``StratifiedGroupKFold`` (every row of a group in one fold: a patient, a
session or a site never on both sides of a validation split), and is never silently rewritten: a
file that does not match the data is an error.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.errors import ArtifactError, ConfigError
from pipeline.io import write_with
from pipeline.paths import Paths
from pipeline.settings import FoldsSettings

COLUMNS = ["row_id", "label", "fold"]
log = logging.getLogger(__name__)


def folds_digest(folds: np.ndarray) -> str:
    """A short sha256 of a fold assignment ``(N,)``: part of every member's cache key and of
    the saved blend, so an edited folds file makes them stale."""
    return hashlib.sha256(np.ascontiguousarray(folds, dtype=np.int64).tobytes()).hexdigest()[:16]


def make_folds(labels: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Assign each training row to one of ``k`` stratified folds; with ``groups``, every row of a
    group to the same fold (scikit-learn's ``StratifiedGroupKFold``, stratified as far as the
    groups allow).

    Args:
        labels: ``(N,)`` int labels; groups: ``(N,)`` group of each row (any dtype) or None.
    Returns:
        ``(N,)`` int64 fold index in ``0..k-1``; fold f is the validation set of model fold f.
    Raises:
        ConfigError: ``k < 2``, a class has fewer than ``k`` rows, or fewer than ``k`` groups.
    """
    if k < 2:
        raise ConfigError(f"folds.k={k}: expected at least 2 folds")
    counts = np.bincount(labels)
    if counts[counts > 0].min() < k:
        raise ConfigError(f"folds.k={k}: the rarest class has only {counts[counts > 0].min()} rows, "
                          f"fewer than k")
    folds = np.empty(len(labels), dtype=np.int64)
    if groups is not None:
        n = len(np.unique(groups))
        if n < k:
            raise ConfigError(f"folds.group: {n} groups, fewer than folds.k={k}")
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels, groups)
    else:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    for f, (_, val_idx) in enumerate(splits):
        folds[val_idx] = f
    return folds


def write_folds(path: Path, labels: np.ndarray, folds: np.ndarray) -> Path:
    """Atomically write ``row_id,label,fold`` for every training row to ``path``."""
    df = pd.DataFrame({"row_id": np.arange(len(labels)), "label": labels, "fold": folds})
    return write_with(path, lambda p: df.to_csv(p, index=False))


def read_folds(path: Path, labels: np.ndarray, k: int) -> np.ndarray:
    """Read a folds file and check it matches the data.

    Returns:
        ``(N,)`` int64 fold per training row.
    Raises:
        ArtifactError: unreadable file, wrong columns, row count, labels or fold range.
    """
    hint = "delete it to rebuild, or change folds.seed"
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable folds file ({str(e).splitlines()[0]}); {hint}") from None
    if list(df.columns) != COLUMNS:
        raise ArtifactError(f"{path}: columns {list(df.columns)}, expected {COLUMNS}; {hint}")
    if len(df) != len(labels) or not np.array_equal(df["row_id"].to_numpy(), np.arange(len(labels))):
        raise ArtifactError(f"{path}: {len(df)} rows, but train.csv has {len(labels)}; "
                            f"it was made for other data; {hint}")
    diff = np.flatnonzero(df["label"].to_numpy() != labels)
    if len(diff):
        r = diff[0]
        raise ArtifactError(f"{path} row_id {r}: label {df['label'].iloc[r]}, but train.csv says "
                            f"{labels[r]}; it was made for other data; {hint}")
    folds = df["fold"].to_numpy().astype(np.int64)
    if folds.min() != 0 or folds.max() != k - 1:
        raise ArtifactError(f"{path}: folds {folds.min()}..{folds.max()}, expected 0..{k - 1}; {hint}")
    return folds


def ensure_folds(settings: FoldsSettings, paths: Paths, labels: np.ndarray, data: str,
                 groups: np.ndarray | None = None) -> np.ndarray:
    """Return the fold assignment of ``settings`` (the ``folds`` group) for the competition with
    fingerprint ``data`` and labels ``(N,)`` (with ``groups`` ``(N,)``: grouped,
    :func:`make_folds`), writing its file under ``paths`` the first time. Raises ArtifactError for
    a folds file that does not fit the labels."""
    k, seed = settings.k, settings.seed
    digest = None if groups is None else hashlib.sha256("\n".join(map(str, groups)).encode()).hexdigest()
    path = paths.folds_file(k, seed, data, digest)
    if path.exists():
        return read_folds(path, labels, k)
    folds = make_folds(labels, k, seed, groups)
    write_folds(path, labels, folds)
    how = ("stratified" if groups is None
           else f"stratified, grouped by {settings.group}: {len(np.unique(groups))} groups")
    log.info("folds: wrote %s (%d folds, %s, seed %d)", path, k, how, seed)
    return folds
