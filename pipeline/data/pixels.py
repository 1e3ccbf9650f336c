"""Layout ``pixels`` (Kaggle's Digit Recognizer, Kannada-MNIST): CSVs of square grayscale pixels.

``train.csv`` = ``label,pixel0..pixel{P-1}``, ``test.csv`` = ``pixel0..pixel{P-1}`` (no labels),
``sample_submission.csv`` = ``ImageId,Label``; pixel values are integers 0..255 and
``P = side * side``. Every problem is reported with the file, line and column.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError

TRAIN_CSV, TEST_CSV, SAMPLE_CSV = "train.csv", "test.csv", "sample_submission.csv"


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: file is empty (expected a header row and data rows)")
    return lines


def _check_header(path: Path, header: list[str], expected_first: str | None) -> int:
    """Validate ``[expected_first,] pixel0..pixel{P-1}``; return P."""
    cols = header
    if expected_first is not None:
        if cols[0] != expected_first:
            raise DataError(f"{path} line 1, column 1: header '{cols[0]}', expected '{expected_first}'")
        cols = cols[1:]
    elif cols and cols[0].lower() == "label":
        raise DataError(f"{path} line 1: has a '{cols[0]}' column; test files must not carry labels")
    offset = 2 if expected_first is not None else 1
    for i, name in enumerate(cols):
        if name != f"pixel{i}":
            raise DataError(f"{path} line 1, column {i + offset}: header '{name}', expected 'pixel{i}'")
    n = len(cols)
    side = math.isqrt(n)
    if n == 0 or side * side != n:
        raise DataError(f"{path}: {n} pixel columns is not a square image "
                        f"(expected side*side columns, e.g. 784 = 28*28)")
    return n


def _parse_numeric(path: Path, lines: list[str], header: list[str]) -> np.ndarray:
    """Parse data rows into a float64 ``(rows, cols)`` array, naming the first bad cell."""
    n_cols = len(header)
    if len(lines) < 2:
        raise DataError(f"{path}: no data rows after the header")
    for ln, line in enumerate(lines[1:], start=2):
        n = line.count(",") + 1
        if n != n_cols:
            what = "empty row" if not line.strip() else f"{n} fields"
            raise DataError(f"{path} line {ln}: {what}, expected {n_cols} fields")
    try:
        df = pd.read_csv(io.StringIO("\n".join(lines)), header=0, names=header,
                         skip_blank_lines=False, low_memory=False)
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: cannot parse CSV ({str(e).splitlines()[0]})") from None
    for col in [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = np.flatnonzero(num.isna().to_numpy() & df[col].notna().to_numpy())
        if len(bad):
            r = bad[0]
            raise DataError(f"{path} line {r + 2}, column {col}: '{df[col].iloc[r]}' is not an integer")
        df[col] = num
    values = df.to_numpy(dtype=np.float64)
    for mask, what in ((np.isnan(values), "missing value (NaN)"),
                       (np.isfinite(values) & (values != np.round(values)), "not an integer")):
        if mask.any():
            r, c = np.argwhere(mask)[0]
            shown = "" if what.startswith("missing") else f"{values[r, c]:g} is "
            raise DataError(f"{path} line {r + 2}, column {header[c]}: {shown}{what}")
    return values


def _to_pixels(path: Path, values: np.ndarray, names: list[str]) -> np.ndarray:
    """``(N, P)`` float64 in 0..255 -> ``(N, 1, S, S)`` uint8; errors name the first bad cell."""
    bad = (values < 0) | (values > 255) | ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{path} line {r + 2}, column {names[c]}: value {values[r, c]:g} "
                        f"outside 0..255")
    side = math.isqrt(values.shape[1])
    return values.astype(np.uint8).reshape(-1, 1, side, side)


def _to_labels(path: Path, values: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    """Validate labels as integers in ``0..C-1``; with ``num_classes=None`` C = max + 1 and
    every class must occur."""
    if num_classes is not None:
        bad = np.flatnonzero((values < 0) | (values >= num_classes))
        if len(bad):
            raise DataError(f"{path} line {bad[0] + 2}, column label: {values[bad[0]]:g} outside "
                            f"the classes 0..{num_classes - 1}")
        return values.astype(np.int64), int(num_classes)
    neg = np.flatnonzero(values < 0)
    if len(neg):
        raise DataError(f"{path} line {neg[0] + 2}, column label: {values[neg[0]]:g} is negative "
                        f"(expected class indices 0..C-1)")
    labels = values.astype(np.int64)
    n_cls = int(labels.max()) + 1
    missing = np.setdiff1d(np.arange(n_cls), labels)
    if len(missing):
        top = np.flatnonzero(labels == n_cls - 1)[0]
        raise DataError(f"{path} line {top + 2}, column label: label {n_cls - 1} implies classes "
                        f"0..{n_cls - 1}, but class {missing[0]} never occurs "
                        f"(set data.num_classes to allow empty classes)")
    return labels, n_cls


def parse_train_csv(path: Path, num_classes: int | None = None):
    """Validate and parse ``train.csv``.

    Returns:
        ``(images (N, 1, S, S) uint8, labels (N,) int64, num_classes)``.
    Raises:
        DataError: naming the file, line and column of the first problem.
    """
    lines = _read_lines(path)
    header = [h.strip() for h in lines[0].split(",")]
    _check_header(path, header, "label")
    values = _parse_numeric(path, lines, header)
    labels, n_cls = _to_labels(path, values[:, 0], num_classes)
    return _to_pixels(path, values[:, 1:], header[1:]), labels, n_cls


def parse_test_csv(path: Path) -> np.ndarray:
    """Validate and parse ``test.csv`` into ``(M, 1, S, S)`` uint8; raises :class:`DataError`."""
    lines = _read_lines(path)
    header = [h.strip() for h in lines[0].split(",")]
    _check_header(path, header, None)
    return _to_pixels(path, _parse_numeric(path, lines, header), header)


def parse_sample_submission(path: Path, n_test: int) -> tuple[np.ndarray, str, str]:
    """Validate ``sample_submission.csv`` (``ImageId,Label``, one row per test row, unique ids).

    Returns ``(ids (M,) int64, id_column, label_column)``; raises :class:`DataError`.
    """
    lines = _read_lines(path)
    header = [h.strip() for h in lines[0].split(",")]
    if len(header) != 2:
        raise DataError(f"{path} line 1: {len(header)} columns, expected 2 (ImageId,Label)")
    values = _parse_numeric(path, lines, header)
    if len(values) != n_test:
        raise DataError(f"{path}: {len(values)} rows, expected {n_test} (one per test.csv row)")
    ids = values[:, 0].astype(np.int64)
    seen: set[int] = set()
    for r, i in enumerate(ids.tolist()):
        if i in seen:
            raise DataError(f"{path} line {r + 2}, column {header[0]}: duplicated id {i} "
                            f"(ids must be unique)")
        seen.add(i)
    return ids, header[0], header[1]




def read_pixels(data_dir: Path, num_classes: int | None = None):
    """Read and validate a ``pixels`` competition.

    Returns ``(x_train (N, 1, S, S) uint8, y_train (N,) int64, x_test (M, 1, S, S) uint8,
    test_ids (M,) int64, num_classes, [id column, label column])``. Raises DataError.
    """
    x_train, y_train, n_cls = parse_train_csv(data_dir / TRAIN_CSV, num_classes)
    x_test = parse_test_csv(data_dir / TEST_CSV)
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(f"{data_dir / TEST_CSV}: images are {x_test.shape[-1]}x{x_test.shape[-1]}, "
                        f"expected {x_train.shape[-1]}x{x_train.shape[-1]} like {TRAIN_CSV}")
    test_ids, id_col, label_col = parse_sample_submission(data_dir / SAMPLE_CSV, len(x_test))
    return x_train, y_train, x_test, test_ids, n_cls, [id_col, label_col]
