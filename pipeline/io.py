"""Atomic file writes: every artifact goes to a temp file in its directory, then is renamed
(a folder of artifacts likewise: written beside the old one, then swapped in).

A crash or a user error therefore never leaves a half-written file under ``folds/``,
``artifacts/`` or ``submissions/``: a path either holds the complete old content, the complete
new content, or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The parent directory is created. The temporary file is created exclusively with mode 0666,
    which the kernel reduces by the process umask (normal permissions, and no process-wide
    ``os.umask`` call that other threads could race with). On any exception the temporary file is
    removed and the exception propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder path beside ``path`` (not created: the block writes into it); if
    the block succeeds, swap it in place of ``path`` (the old folder is renamed aside, then
    removed). The parent directory is created. On any exception the temporary folder is removed
    and the exception propagates; ``path`` is untouched."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.old")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``; returns ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def save_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return write_with(path, lambda p: p.write_text(text, encoding="utf-8"))


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    return save_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Atomically write one array in ``.npy`` format to ``path``."""

    def _write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return write_with(path, _write)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Atomically write several named arrays in (uncompressed) ``.npz`` format to ``path``."""

    def _write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **arrays)  # plain arrays only: read back with allow_pickle=False

    return write_with(path, _write)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# open read-only descriptors of decoded caches in this process, per (file, inode, modification time):
# a cache written again under the same name is opened anew, never read through the old file's
_FILES: dict[tuple[str, int, int], int] = {}


def _whole_map(images) -> tuple[str, int, int] | None:
    """The identity ``(file, inode, modification time)`` of ``images`` when it is a whole ``.npy``
    memory map (its file holds exactly its header and its bytes, not a slice of one), else None."""
    if not isinstance(images, np.memmap) or not images.flags.c_contiguous or images.filename is None:
        return None
    try:
        st = os.stat(images.filename)
    except OSError:
        return None
    return (images.filename, st.st_ino, st.st_mtime_ns) if st.st_size == images.offset + images.nbytes else None


def read_rows(images, rows) -> np.ndarray:
    """``images[rows]`` as a new in-memory array ``(len(rows), ...)``. From a whole memory-mapped
    ``.npy`` (the decoded cache) the rows are read with ``os.preadv`` (consecutive rows in one
    call) instead of through the mapping, so the pages read count in the kernel's page cache, not
    in this process's resident memory; anything else is indexed as it is."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim == 0:  # one row: its (C, S, S) image
        return read_rows(images, rows[None])[0]
    identity = _whole_map(images)
    if identity is None:
        return np.asarray(images[rows])
    out = np.empty((len(rows), *images.shape[1:]), dtype=images.dtype)
    if len(rows) == 0:
        return out
    fd = _FILES.get(identity)
    if fd is None:
        fd = _FILES[identity] = os.open(images.filename, os.O_RDONLY)
    row = out[0].nbytes
    flat = memoryview(out.reshape(-1).view(np.uint8))
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        want, done = (stop - start) * row, 0
        while done < want:  # preadv may return fewer bytes than asked
            n = os.preadv(fd, [flat[start * row + done:stop * row]], images.offset + int(rows[start]) * row + done)
            if n <= 0:
                raise OSError(f"{images.filename}: short read at row {int(rows[start])}")
            done += n
    return out
