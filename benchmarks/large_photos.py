"""A Kaggle-sized photo competition from real photos that a package ships, and what the data path
does with it: decoding images/s, training images/s streamed against in memory, peak memory.

The competition (``files`` layout: ``train.csv``, ``train/<id>.jpg``, ``test/<id>.jpg``,
``sample_submission.csv``; the test labels in ``<dir>.solution.csv``, outside it) holds ``--train``
+ ``--test`` JPEGs of ``--size`` px (quality 90), each a random crop (10-100% of the photo's area,
aspect 3/4-4/3), flip and brightness change of one of scikit-image's photographs
(``skimage.data``: astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry,
retina, camera, brick, grass, gravel, moon; the grayscale ones as RGB); the class is the
photograph. Never noise: every pixel comes from a real photo. The same seed writes the same files.

Then, on the machine it runs on (printed; training on its GPU when it has one): the decode into the pipeline's cache at ``--side`` px
(``pipeline.data.load_competition``: images/s, seconds, the cache's size, this process's peak
resident memory), and :mod:`stream_throughput`'s side-by-side comparison of streamed and
in-memory training batches on ``--fit-rows`` rows (a set that fits).

    python benchmarks/large_photos.py --dir data/photos60k                 # 50,000 train + 10,000 test
    python benchmarks/large_photos.py --dir data/photos60k --skip-build --side 256
    python run.py profile=quick data.dir=data/photos60k
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "brick", "grass", "gravel", "moon")


def photos() -> list[np.ndarray]:
    """The source photographs as ``(H, W, 3)`` uint8, in :data:`PHOTOS` order."""
    import skimage.data

    out = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        out.append(np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a[..., :3])
    return out


def _write_chunk(paths: list[str], classes: list[int], seeds: list[int], size: int) -> int:
    """Write one JPEG per path: a random crop, flip and brightness change of photo ``classes[i]``."""
    from PIL import Image, ImageEnhance

    sources = [Image.fromarray(p) for p in photos()]
    for path, c, seed in zip(paths, classes, seeds):
        rng = np.random.default_rng(seed)
        src = sources[c]
        w, h = src.size
        area = rng.uniform(0.1, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        img.save(path, quality=90)
    return len(paths)


def build(out: Path, n_train: int, n_test: int, size: int, seed: int, jobs: int) -> float:
    """Write the competition into ``out`` (absent or empty); returns the seconds it took."""
    from joblib import Parallel, delayed

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty")
    t0 = time.perf_counter()
    n = n_train + n_test
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, len(PHOTOS), n)
    seeds = rng.integers(0, 2**63 - 1, n)
    ids = [f"img{i:06d}" for i in range(n)]
    for part in ("train", "test"):
        (out / part).mkdir(parents=True, exist_ok=True)
    paths = [str(out / ("train" if i < n_train else "test") / f"{ids[i]}.jpg") for i in range(n)]
    step = 500
    Parallel(n_jobs=jobs)(delayed(_write_chunk)(paths[i:i + step], classes[i:i + step].tolist(),
                                                seeds[i:i + step].tolist(), size) for i in range(0, n, step))
    names = np.array(PHOTOS)
    pd.DataFrame({"id": ids[:n_train], "label": names[classes[:n_train]]}).to_csv(out / "train.csv", index=False)
    pd.DataFrame({"id": ids[n_train:], "label": names[0]}).to_csv(out / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ids[n_train:], "label": names[classes[n_train:]]}).to_csv(
        out.with_name(out.name + ".solution.csv"), index=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--size", type=int, default=384, help="side of the JPEGs written, px")
    p.add_argument("--side", type=int, default=128, help="side of the decoded cache, px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--fit-rows", type=int, default=4000, help="rows of the streamed / in-memory comparison")
    p.add_argument("--model", default="resnet9")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from stream_throughput import CONF_DIR, compare, report
    from train_throughput import hardware
    from pipeline import data
    from pipeline.device import resolve_precision, select_device
    from pipeline.settings import aug_settings

    device = select_device("auto")  # the GPU when there is one
    print(hardware(device))
    if not args.skip_build:
        seconds = build(args.dir, args.train, args.test, args.size, args.seed, args.jobs)
        n = args.train + args.test
        print(f"built {n} JPEGs of {args.size} px in {seconds:.0f} s ({n / seconds:.0f} images/s, {args.jobs} jobs)")
    cache = args.dir.with_name(args.dir.name + f".cache{args.side}")
    t0 = time.perf_counter()
    comp = data.load_competition(args.dir, cache, img_size=args.side, decode_jobs=args.jobs)
    seconds = time.perf_counter() - t0
    n = len(comp.x_train) + len(comp.x_test)
    size = (comp.x_train.nbytes + comp.x_test.nbytes) / 2**30
    print(f"decoded {n} images to {args.side} px in {seconds:.0f} s ({n / seconds:.0f} images/s, {args.jobs} jobs); "
          f"cache {size:.2f} GiB; peak resident memory of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["profile=quick"])
    rows = np.arange(min(args.fit_rows, len(comp.x_train)))
    precision = resolve_precision(cfg.train.precision, device)
    print(f"\nstreamed against in memory: {len(rows)} rows at {args.side} px, {args.model}, batch 64, "
          f"{precision.value}, 3 alternating windows of {args.steps} steps")
    figures = compare(comp.x_train, rows, comp.y_train[rows], comp.num_classes, cfg.models[args.model],
                      aug_settings(cfg, args.model), device, precision, 64, args.steps, 3)
    print(report(figures))
    print(f"peak resident memory of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
