"""Stage folds: stratified, disjoint, stable, and never silently rewritten."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import data, folds
from pipeline.workspace import Workspace
from pipeline.errors import ArtifactError, ConfigError
from pipeline.paths import Paths


def test_stratified_disjoint_and_covering(digits_dir):
    y = data.load_competition(digits_dir).y_train
    f = folds.make_folds(y, 5, 42)
    assert f.shape == y.shape and set(f) == set(range(5))  # every row in exactly one fold
    per_class = np.array([[np.sum((f == k) & (y == c)) for c in range(10)] for k in range(5)])
    assert (per_class.max(0) - per_class.min(0)).max() <= 1  # each class split evenly
    np.testing.assert_array_equal(f, folds.make_folds(y, 5, 42))  # stable for a seed
    assert not np.array_equal(f, folds.make_folds(y, 5, 7))


def test_written_once_and_reused(tiny_cfg):
    cfg = tiny_cfg()
    first = Workspace.load(cfg).folds
    path = Paths.from_cfg(cfg).folds_file(2, 42, data.load(cfg).fingerprint)
    assert path.read_text().splitlines()[0] == "row_id,label,fold"
    stamp = path.stat().st_mtime_ns
    np.testing.assert_array_equal(Workspace.load(cfg).folds, first)
    assert path.stat().st_mtime_ns == stamp


def test_mismatching_folds_file_is_an_error(tiny_cfg):
    cfg = tiny_cfg()
    Workspace.load(cfg).folds
    path = Paths.from_cfg(cfg).folds_file(2, 42, data.load(cfg).fingerprint)
    lines = path.read_text().splitlines()
    row, label, fold = lines[4].split(",")
    lines[4] = f"{row},{(int(label) + 1) % 10},{fold}"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_text()
    with pytest.raises(ArtifactError, match=r"row_id 3: label .* made for other data"):
        Workspace.load(cfg).folds
    assert path.read_text() == before  # not rewritten
    path.write_text("\n".join(lines[:100]) + "\n")
    with pytest.raises(ArtifactError, match="99 rows, but train.csv has 400"):
        Workspace.load(cfg).folds


def test_k_below_two_is_rejected():
    with pytest.raises(ConfigError, match="folds.k=1"):
        folds.make_folds(np.arange(10) % 2, 1, 0)
