"""Layouts of image files: ``files`` (a labels CSV) and ``folders`` (one folder per class).

* ``files`` (CIFAR-10, Dog Breed, Aerial Cactus, Histopathologic Cancer): ``train.csv`` with an id
  column and a label column, images ``train/<id>`` or ``train/<id>.<ext>``, test images in
  ``test/``, and ``sample_submission.csv`` giving the test ids (first column), the submission's
  header and its row order.
* ``folders`` (Plant Seedlings): ``train/<class name>/*.<ext>`` (sub-folders of a class folder,
  e.g. one per patient, included: ``folds.group=folder`` keeps each in one fold), ``test/*.<ext>``,
  and ``sample_submission.csv`` whose first column is the test file name.

Images are decoded once, in parallel (joblib processes, a progress bar), converted to 1 or 3
channels, resized to a square side (:func:`to_array`: ``stretch``, ``pad`` or ``crop``), and written
into a memory-mapped ``(N, C, S, S)`` uint8 ``.npy`` (so a set larger than RAM is never held
whole). Every problem names the file (or the CSV line): an unreadable image, an id with no file, a
file with no row, a duplicate id, an empty class folder.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.data.competition import Resize
from pipeline.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """The files of one competition in an image layout, validated, in submission order.

    Attributes:
        train_files: ``N`` paths; labels: ``N`` raw labels (strings).
        test_files: ``M`` paths, in ``sample_submission.csv``'s order; test_ids: its ``M`` ids.
        columns: ``sample_submission.csv``'s header.
    """

    train_files: list[Path]
    labels: list[str]
    test_files: list[Path]
    test_ids: list[str]
    columns: list[str]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse CSV ({str(e).splitlines()[0]})") from None
    if df.empty:
        raise DataError(f"{path}: no data rows after the header")
    return df


def _unique_ids(path: Path, ids: list[str], column: str) -> None:
    seen: set[str] = set()
    for r, i in enumerate(ids):
        if i in seen:
            raise DataError(f"{path} line {r + 2}, column {column}: duplicated id '{i}' (ids must be unique)")
        seen.add(i)


def _match_files(folder: Path, ids: list[str], csv: Path, column: str) -> list[Path]:
    """The file of each id: ``folder/<id>`` or ``folder/<id>.<ext>``; every file must have a row."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected the images named in {csv.name})")
    files = _images_in(folder)
    by_name = {p.name: p for p in files}
    by_stem: dict[str, Path] = {}
    for p in files:
        by_stem.setdefault(p.stem, p)
    out = []
    for r, i in enumerate(ids):
        p = by_name.get(i) or by_stem.get(i)
        if p is None:
            raise DataError(f"{csv} line {r + 2}, column {column}: id '{i}' has no image in {folder} "
                            f"(expected {i} or {i}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS[:4])}>)")
        out.append(p)
    extra = sorted(set(files) - set(out))
    if extra:
        raise DataError(f"{extra[0]}: no row in {csv.name} (every image needs one; {len(extra)} such file(s))")
    return out


def _sample_ids(data_dir: Path) -> tuple[list[str], list[str]]:
    path = data_dir / "sample_submission.csv"
    df = _read_csv(path)
    if len(df.columns) < 2:
        raise DataError(f"{path} line 1: {len(df.columns)} column(s), expected an id column and at "
                        f"least one prediction column")
    ids = df.iloc[:, 0].tolist()
    _unique_ids(path, ids, df.columns[0])
    return ids, [str(c) for c in df.columns]


def scan_files(data_dir: Path, id_column: str | None, label_column: str | None) -> ImageSet:
    """Validate the ``files`` layout (see the module docstring) and list its images.

    ``id_column`` defaults to ``sample_submission.csv``'s first column, ``label_column`` to the one
    other column of ``train.csv``. Raises DataError naming the file, line and column.
    """
    test_ids, columns = _sample_ids(data_dir)
    path = data_dir / "train.csv"
    df = _read_csv(path)
    id_col = id_column or columns[0]
    if id_col not in df.columns:
        raise DataError(f"{path} line 1: no id column '{id_col}' (columns: {', '.join(df.columns)}); "
                        f"set data.id_column")
    others = [c for c in df.columns if c != id_col]
    lab_col = label_column or (others[0] if len(others) == 1 else None)
    if lab_col is None or lab_col not in df.columns:
        raise DataError(f"{path} line 1: cannot tell the label column among {', '.join(others)}; "
                        f"set data.label_column")
    ids = df[id_col].tolist()
    _unique_ids(path, ids, id_col)
    empty = np.flatnonzero(df[lab_col].str.strip() == "")
    if len(empty):
        raise DataError(f"{path} line {empty[0] + 2}, column {lab_col}: missing label")
    train_files = _match_files(data_dir / "train", ids, path, id_col)
    test_files = _match_files(data_dir / "test", test_ids, data_dir / "sample_submission.csv", columns[0])
    return ImageSet(train_files, df[lab_col].tolist(), test_files, test_ids, columns)


def scan_folders(data_dir: Path) -> ImageSet:
    """Validate the ``folders`` layout (see the module docstring) and list its images.

    Raises DataError for a missing ``train/``, a class folder without images, or test files and
    sample ids that do not match.
    """
    train = data_dir / "train"
    if not train.is_dir():
        raise DataError(f"{train}: folder not found (expected train/<class name>/*.png ...)")
    classes = sorted(p for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train}: no class folders (expected train/<class name>/*.png ...)")
    files, labels = [], []
    for c in classes:
        imgs = sorted(p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not imgs:
            raise DataError(f"{c}: empty class folder (no {', '.join(IMAGE_EXTENSIONS[:4])} images)")
        files += imgs
        labels += [c.name] * len(imgs)
    test_ids, columns = _sample_ids(data_dir)
    test_files = _match_files(data_dir / "test", test_ids, data_dir / "sample_submission.csv", columns[0])
    return ImageSet(files, labels, test_files, test_ids, columns)


GROUP_FOLDER = "folder"  # folds.group of the folders layout: the sub-folder below each class folder


def train_groups(data_dir: Path, layout_files: bool, group: str, id_column: str | None,
                 label_column: str | None) -> np.ndarray:
    """``(N,)`` str group of each training image, in the competition's row order, for group folds:
    the ``files`` layout's ``train.csv`` column ``group``; the ``folders`` layout's sub-folder of
    each image below its class folder (``group="folder"``: ``train/<class>/<group>/...``; one name
    across classes is one group, e.g. a patient with images in two classes).

    Raises:
        DataError: no such column (naming train.csv's columns), an empty group cell (its line), or
            an image directly in its class folder (naming it).
    """
    if layout_files:
        path = data_dir / "train.csv"
        df = _read_csv(path)
        if group not in df.columns:
            raise DataError(f"{path} line 1: no column '{group}' for folds.group (columns: {', '.join(df.columns)})")
        empty = np.flatnonzero(df[group].str.strip() == "")
        if len(empty):
            raise DataError(f"{path} line {empty[0] + 2}, column {group}: missing group")
        scan_files(data_dir, id_column, label_column)  # the rows the competition loads, checked alike
        return df[group].to_numpy(dtype=str)
    if group != GROUP_FOLDER:
        raise DataError(f"{data_dir / 'train'}: folds.group={group}: the folders layout groups by sub-folder only "
                        f"(folds.group={GROUP_FOLDER}: train/<class>/<group>/<image>)")
    files = scan_folders(data_dir).train_files
    out = []
    for f in files:
        parts = f.relative_to(data_dir / "train").parts
        if len(parts) < 3:
            raise DataError(f"{f}: folds.group={GROUP_FOLDER} needs train/<class>/<group>/<image>; this image is "
                            f"directly in its class folder")
        out.append(parts[1])
    return np.array(out, dtype=str)


def scan_test(data_dir: Path) -> ImageSet:
    """The test side alone of a ``files`` or ``folders`` competition (a code competition's rerun:
    ``train.csv`` and ``train/`` may be absent): ``sample_submission.csv``'s ids and header and
    the file of each id in ``test/``, validated as :func:`scan_files` and :func:`scan_folders`
    validate them (``train_files`` and ``labels`` empty).

    Raises DataError for a missing or unreadable ``sample_submission.csv``, a duplicated id, an
    id without an image in ``test/`` or an image without a row (naming the file and line).
    """
    test_ids, columns = _sample_ids(data_dir)
    test_files = _match_files(data_dir / "test", test_ids, data_dir / "sample_submission.csv", columns[0])
    return ImageSet([], [], test_files, test_ids, columns)


# --------------------------------------------------------------------------- decoding


def open_image(path: Path) -> Image.Image:
    """Open and decode an image file; DataError naming it when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read it as an image ({type(e).__name__})") from None


def to_array(img: Image.Image, side: int, channels: int, resize: Resize | str = Resize.stretch) -> np.ndarray:
    """One image as ``(channels, side, side)`` uint8.

    Grayscale (``channels=1``, PIL's ``L``) or RGB (``channels=3``; transparency composited on
    black); resized with PIL's antialiased bilinear filter per :class:`Resize`.
    """
    resize = Resize(resize)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (side, side):
        if resize is Resize.stretch:
            img = img.resize((side, side), Image.Resampling.BILINEAR)
        else:
            scale = side / (max(w, h) if resize is Resize.pad else min(w, h))
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            small = img.resize((nw, nh), Image.Resampling.BILINEAR)
            canvas = Image.new(img.mode, (side, side))
            canvas.paste(small, ((side - nw) // 2, (side - nh) // 2))
            img = canvas
    a = np.array(img, dtype=np.uint8)  # a writable copy of PIL's buffer
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _headers(paths: list[Path]) -> list[tuple[int, int, str]]:
    """``(width, height, mode)`` of each image without decoding its pixels.

    Raises:
        DataError: a file that is not an image, or whose header claims more pixels than Pillow's
            decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, twice over), naming it.
    """
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append((im.size[0], im.size[1], im.mode))
        except Image.DecompressionBombError as e:
            claimed = re.search(r"\((\d+) pixels\)", str(e))
            raise DataError(f"{p}: its header claims {int(claimed[1]) if claimed else 0:,} pixels, more than "
                            f"Pillow's decompression-bomb limit ({2 * Image.MAX_IMAGE_PIXELS:,}): expected "
                            f"a real image") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{p}: cannot read it as an image ({type(e).__name__})") from None
    return out


def _decode(paths: list[Path], side: int, channels: int, resize: str,
            tolerant: bool = False) -> tuple[np.ndarray, list[int]]:
    """``(len(paths), channels, side, side)`` uint8 and the indices of the images that did not
    decode: with ``tolerant`` such an image is left black and listed, else DataError names it."""
    out = np.zeros((len(paths), channels, side, side), dtype=np.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            out[i] = to_array(open_image(p), side, channels, resize)
        except DataError:
            if not tolerant:
                raise
            bad.append(i)
    return out, bad


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


CHUNK = 512  # files per decoding task (and per step of a resumable decode)


def _parallel(fn, paths: list[Path], jobs: int, what: str, *args):
    """``fn(paths[chunk], *args)`` over chunks of :data:`CHUNK` files in ``jobs`` processes, in
    order, with a progress bar in images (its rate in images/s and the time left); yields
    ``(slice, result)``."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    chunks = _chunks(len(paths), CHUNK)
    results = Parallel(n_jobs=jobs, return_as="generator")(delayed(fn)(paths[c], *args) for c in chunks)
    with tqdm(total=len(paths), desc=what, unit="img", leave=False, smoothing=0.1,
              disable=None if len(chunks) > 1 else True) as bar:
        for chunk, result in zip(chunks, results):
            bar.update(chunk.stop - chunk.start)
            yield chunk, result


def choose_geometry(paths: list[Path], img_size: int | None, max_img_size: int,
                    channels: int | str, jobs: int) -> tuple[int, int]:
    """``(side, channels)`` for a set of images: ``img_size`` or the median longer side capped at
    ``max_img_size``; ``channels`` or ``auto``: 1 when every image is grayscale, else 3."""
    heads = [h for _, part in _parallel(_headers, paths, jobs, "image headers") for h in part]
    side = int(img_size) if img_size else int(min(max_img_size, np.median([max(w, h) for w, h, _ in heads])))
    if channels in (None, "auto"):
        channels = 1 if all(m in GRAY_MODES for _, _, m in heads) else 3
    return side, int(channels)


def decode_to(path: Path | None, files: list[Path], side: int, channels: int, resize: Resize | str,
              jobs: int, what: str, undecodable: list[int] | None = None) -> np.ndarray:
    """Decode ``files`` into a new memory-mapped ``(N, channels, side, side)`` uint8 ``.npy`` at
    ``path`` and return it opened read-only; with no ``path``, decode into memory.

    The file is written beside ``path`` (``.<name>.partial``) under a file lock and renamed when
    complete. A decode that was killed resumes where it stopped: after every chunk of
    :data:`CHUNK` images the partial file is flushed and its progress recorded
    (``.<name>.partial.json``: the files, the geometry, the images done, the undecodable rows),
    and the next call with the same files and geometry continues from there (one log line).

    Raises DataError naming the first file that does not decode, unless ``undecodable`` is a
    list: then such an image is left black (zeros) and its row index appended to it.
    """
    tolerant = undecodable is not None
    if path is None:
        arrays = []
        for chunk, (arr, bad) in _parallel(_decode, files, jobs, what, side, channels, Resize(resize).value, tolerant):
            arrays.append(arr)
            if tolerant:
                undecodable.extend(chunk.start + i for i in bad)
        return np.concatenate(arrays) if arrays else np.zeros((0, channels, side, side), dtype=np.uint8)
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        bad = _decode_resumable(path, files, side, channels, Resize(resize).value, jobs, what, tolerant)
    if tolerant:
        undecodable.extend(bad)
    return np.load(path, mmap_mode="r")


def _stat(f: Path) -> tuple[int, int]:
    """``(size, modification time in ns)`` of ``f``; ``(-1, -1)`` when it cannot be read (the
    decode names it)."""
    try:
        st = os.stat(f)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _decode_resumable(path: Path, files: list[Path], side: int, channels: int, resize: str, jobs: int,
                      what: str, tolerant: bool) -> list[int]:
    """The body of :func:`decode_to` under its lock: continue (when its record names the same
    files, sizes, modification times and geometry) or start ``.<name>.partial``, chunk by chunk,
    then rename it to ``path``. Returns the undecodable rows."""
    import hashlib
    import json

    from pipeline.io import save_json

    partial, progress = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.partial.json")
    stats = [(str(f), *_stat(f)) for f in files]
    what_key = hashlib.sha1(json.dumps([stats, side, channels, resize, tolerant]).encode()).hexdigest()
    try:
        state = json.loads(progress.read_text())
    except (OSError, ValueError):
        state = {}
    shape = (len(files), channels, side, side)
    if partial.exists() and state.get("key") == what_key:
        done, bad = int(state["done"]), list(state.get("bad", []))
        log.info("data: resuming the decode of %s at image %d of %d", path.name, done, len(files))
    else:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape).flush()  # header + zeros
        done, bad = 0, []
    offset, row = np.load(partial, mmap_mode="r").offset, channels * side * side
    fd = os.open(partial, os.O_WRONLY)  # written with pwrite, not through a mapping (no resident pages)
    try:
        for chunk, (arr, chunk_bad) in _parallel(_decode, files[done:], jobs, what, side, channels, resize, tolerant):
            data = np.ascontiguousarray(arr).tobytes()
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], offset + (done + chunk.start) * row + written)
            bad += [done + chunk.start + i for i in chunk_bad]
            os.fsync(fd)
            save_json(progress, {"key": what_key, "done": done + chunk.stop, "bad": bad})
    finally:
        os.close(fd)
    os.replace(partial, path)
    progress.unlink(missing_ok=True)
    return bad
