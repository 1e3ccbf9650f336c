"""Build a second competition in Digit Recognizer's CSV format from real data a package ships.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin &
Kaynak 1998; ``sklearn.datasets.load_digits``): 1,797 real handwritten digits, 8x8 pixels with
17 grey levels. This script scales each image to 0..255 and resizes it to ``--side`` pixels
(bilinear, PIL) so every registered model applies, splits the rows with a fixed seed into a
labelled ``train.csv`` and an unlabelled ``test.csv`` (test labels are written nowhere) and writes
``sample_submission.csv``:

    python benchmarks/make_uci_digits_competition.py data/uci-digits
    python run.py profile=quick data.dir=data/uci-digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.data import write_competition_csvs


def build(side: int = 28, test_fraction: float = 1 / 3, seed: int = 0):
    """Returns ``(x_train (N, side*side) uint8, y_train (N,) int64, x_test (M, side*side) uint8)``."""
    d = load_digits()
    images = np.rint(d.images / 16.0 * 255).astype(np.uint8)  # (1797, 8, 8), 0..255
    big = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BILINEAR))
                    for im in images]).reshape(len(images), -1)
    perm = np.random.default_rng(seed).permutation(len(big))
    n_test = int(round(len(big) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return big[train], d.target[train].astype(np.int64), big[test]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write train.csv, test.csv, sample_submission.csv")
    p.add_argument("--side", type=int, default=28)
    args = p.parse_args()
    x_train, y_train, x_test = build(args.side)
    write_competition_csvs(args.out, x_train, y_train, x_test)
    print(f"{args.out}: {len(x_train)} train / {len(x_test)} test images, {args.side}x{args.side}")


if __name__ == "__main__":
    main()
