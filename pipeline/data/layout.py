"""Which layout a competition folder has, and Kaggle's zip downloads unpacked once.

``kaggle competitions download -c NAME`` gives ``NAME.zip``; ``data.dir`` may point at that zip,
or at a folder holding it (and nothing else of the competition). It is unpacked once into
``data/cache/unzipped-<name>-<hash>/`` (zips inside it, such as ``train.zip``, too) and a marker
file records that the unpacking finished.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import zipfile
from pathlib import Path

from pipeline.data.competition import Layout
from pipeline.errors import DataError

log = logging.getLogger(__name__)
DONE = ".unpacked"


def detect(data_dir: Path) -> Layout:
    """The layout of ``data_dir``: ``pixels`` when ``train.csv``'s header starts with ``label,pixel0``,
    ``files`` when there is a ``train.csv`` and a ``train/`` folder of images, ``folders`` when
    ``train/`` holds class folders. Raises DataError naming what was found."""
    train_csv, train_dir = data_dir / "train.csv", data_dir / "train"
    if train_csv.exists():
        with open(train_csv, "rb") as f:
            head = f.readline(4096).decode("utf-8-sig", errors="replace").strip().split(",")
        if len(head) > 1 and head[1].strip() == "pixel0" or not train_dir.exists():
            return Layout.pixels
        return Layout.files
    if train_dir.is_dir():
        return Layout.folders
    found = ", ".join(sorted(p.name for p in data_dir.iterdir())[:8]) if data_dir.is_dir() else "nothing"
    raise DataError(f"{data_dir}: no competition layout found (expected train.csv with pixel columns, "
                    f"train.csv + train/, or train/<class>/; found {found})")


def _extract(zip_path: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(into)  # member names are sanitised: nothing lands outside `into`
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{zip_path}: cannot unpack it ({e})") from None


def unpack(zip_path: Path, cache_dir: Path) -> Path:
    """Unpack a Kaggle zip (and the zips inside it) once; return the competition folder in it."""
    key = hashlib.sha1(f"{zip_path.resolve()}:{zip_path.stat().st_size}:{zip_path.stat().st_mtime_ns}"
                       .encode()).hexdigest()[:10]
    out = cache_dir / f"unzipped-{zip_path.stem}-{key}"
    if not (out / DONE).exists():
        shutil.rmtree(out, ignore_errors=True)
        log.info("data: unpacking %s into %s", zip_path, out)
        _extract(zip_path, out)
        for inner in sorted(out.rglob("*.zip")):
            _extract(inner, inner.parent)
            inner.unlink()
        (out / DONE).write_text("ok\n")
    entries = [p for p in out.iterdir() if p.name != DONE and not p.name.startswith("__MACOSX")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else out


def find_zip(data_dir: Path) -> Path | None:
    """``data_dir`` itself when it is a zip, or the one zip in a folder without competition files."""
    if data_dir.is_file() and data_dir.suffix.lower() == ".zip":
        return data_dir
    if data_dir.is_dir() and not (data_dir / "train.csv").exists() and not (data_dir / "train").exists():
        zips = sorted(data_dir.glob("*.zip"))
        if len(zips) == 1:
            return zips[0]
    return None
