"""The test side of a competition alone: what a code competition's rerun gives a submission.

On Kaggle's rerun the notebook sees the competition folder with the hidden test set: ``test.csv``
(``pixels``) or ``test/`` (``files``, ``folders``) and ``sample_submission.csv``; ``train.csv`` and
``train/`` may be absent. :func:`load_test_side` reads and validates exactly that part, with the
training run's geometry (side, channels, resize) and class names given rather than measured, so
the arrays are the ones the training run's own loader (:func:`pipeline.data.load_competition`)
makes of the same files: the same parsers (:mod:`pipeline.data.pixels`), the same file matching
and decoding (:mod:`pipeline.data.images`), the same header check (:func:`pipeline.data.submission_kind`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.competition import Layout, Resize, SubmissionKind
from pipeline.data.pixels import SAMPLE_CSV, TEST_CSV, parse_sample_submission, parse_test_csv
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSide:
    """The test side of a competition, validated, in ``sample_submission.csv``'s row order.

    Attributes:
        x_test: ``(M, C, S, S)`` uint8 images (a read-only memory map when decoded into ``work_dir``).
        test_ids: ``(M,)`` the sample's ids (int64 for ``pixels``, str for image layouts).
        columns: ``sample_submission.csv``'s header (id first).
        submission: what the header asks for, checked against the class names.
        files: the ``M`` test image files (image layouts), else empty.
        undecodable: rows whose image did not decode (black images), only when allowed.
        default_cells: ``{row: the sample's cells after the id}`` of those rows.
    """

    x_test: np.ndarray
    test_ids: np.ndarray
    columns: tuple[str, ...]
    submission: SubmissionKind
    files: tuple[Path, ...] = ()
    undecodable: tuple[int, ...] = ()
    default_cells: dict | None = None


def resolve_test_dir(data_dir: str | Path, cache_dir: Path) -> Path:
    """``data.dir`` for a submission: a competition folder, or a Kaggle zip unpacked once into
    ``cache_dir`` (:func:`pipeline.data.layout.unpack`). Nothing is ever built or downloaded.

    Raises ConfigError for a path that does not exist.
    """
    from pipeline.data.layout import unpack

    p = Path(data_dir)
    if not p.exists():
        raise ConfigError(f"data.dir={p} does not exist (expected the competition folder with "
                          f"{TEST_CSV} or test/, and {SAMPLE_CSV})")
    if p.is_file() and p.suffix.lower() == ".zip":
        return unpack(p, cache_dir)
    return p


def load_test_side(data_dir: Path, layout: Layout | str, side: int, channels: int, resize: Resize | str,
                   class_names: list[str], submission: SubmissionKind | str, jobs: int | None = None,
                   work_dir: Path | None = None, default_rows: bool = False) -> TestSide:
    """Read and validate the test side of the competition in ``data_dir``.

    Args:
        layout: the training run's layout: ``pixels`` reads ``test.csv``, ``files`` and
            ``folders`` read ``test/`` (their test sides are alike: files named by the sample's
            first column).
        side, channels, resize: the training run's image geometry (``pixels``: checked, not resized).
        class_names, submission: the training run's classes and submission kind; the sample's
            header must fit them as it did in training.
        jobs: decoding processes (default: every core); work_dir: decode into a memory map there
            (default: in memory).
        default_rows: an image that does not decode becomes a black image whose row is listed in
            ``undecodable`` (its cells in ``default_cells``), instead of an error.
    Returns:
        :class:`TestSide`.
    Raises:
        DataError: a missing or malformed file (named, with line and column), test images of
            another side or channel count than the training run's, ids that do not match the
            test files, an image that does not decode (unless ``default_rows``).
    """
    from pipeline.data import submission_kind
    from pipeline.data import images

    data_dir, layout = Path(data_dir), Layout(layout)
    sample = data_dir / SAMPLE_CSV
    if layout is Layout.pixels:
        x = parse_test_csv(data_dir / TEST_CSV)
        if x.shape[1:] != (channels, side, side):
            raise DataError(f"{data_dir / TEST_CSV}: images are {x.shape[-1]}x{x.shape[-1]}x{x.shape[1]}, expected "
                            f"{side}x{side}x{channels} like the training run's")
        ids, id_col, label_col = parse_sample_submission(sample, len(x))
        kind = submission_kind(SubmissionKind(submission).value, [id_col, label_col], class_names, sample)
        return TestSide(x, ids, (id_col, label_col), kind)
    if not (data_dir / "test").is_dir():
        raise DataError(f"{data_dir / 'test'}: folder not found (expected the test images named in {SAMPLE_CSV})")
    s = images.scan_test(data_dir)
    kind = submission_kind(SubmissionKind(submission).value, s.columns, class_names, sample)
    bad: list[int] | None = [] if default_rows else None
    path = Path(work_dir) / "x_test.npy" if work_dir is not None else None
    x = images.decode_to(path, s.test_files, side, channels, Resize(resize).value, int(jobs or os.cpu_count() or 1),
                         "decoding test images", bad)
    cells = None
    if bad:
        import pandas as pd

        rows = pd.read_csv(sample, dtype=str, keep_default_na=False)
        cells = {int(i): rows.iloc[int(i), 1:].tolist() for i in bad}
    return TestSide(x, np.array(s.test_ids, dtype=str), tuple(s.columns), kind, tuple(s.test_files),
                    tuple(bad or ()), cells)
