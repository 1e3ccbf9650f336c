"""Stage folds: stratified, disjoint, stable, and never silently rewritten."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import data, folds
from pipeline.workspace import Workspace
from pipeline.errors import ArtifactError, ConfigError
from pipeline.paths import Paths
from pipeline.runsettings import run_settings


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
    path = Paths.from_cfg(cfg).folds_file(2, 42, Workspace(run_settings(cfg)).comp.fingerprint)
    assert path.read_text().splitlines()[0] == "row_id,label,fold"
    stamp = path.stat().st_mtime_ns
    np.testing.assert_array_equal(Workspace.load(cfg).folds, first)
    assert path.stat().st_mtime_ns == stamp


def test_mismatching_folds_file_is_an_error(tiny_cfg):
    cfg = tiny_cfg()
    Workspace.load(cfg).folds
    path = Paths.from_cfg(cfg).folds_file(2, 42, Workspace(run_settings(cfg)).comp.fingerprint)
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


def _group_competition(tmp_path, layout: str):
    """The fixture's 400 real digits written as a ``layout`` competition whose rows come in 40
    groups of 10 (as patients or sessions would): a ``patient`` column of train.csv (``files``), or
    a sub-folder below each class folder (``folders``: one group spans several classes)."""
    import shutil
    import sys

    import pandas as pd

    from conftest import DIGITS, REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_image_competition import write_image_competition

    digits = data.load_competition(DIGITS)
    d = write_image_competition(tmp_path / layout, digits.x_train, digits.y_train, digits.x_test, layout)
    groups = np.array([f"p{i // 10:02d}" for i in range(len(digits.y_train))])
    if layout == "files":
        df = pd.read_csv(d / "train.csv", dtype=str)
        df["patient"] = groups[np.array([int(i[2:]) for i in df["id"]])]
        df.to_csv(d / "train.csv", index=False)
    else:
        for i, f in enumerate(sorted((d / "train").rglob("*.png"))):  # class by class: a group spans classes
            name = f"p{i % 40:02d}"
            (f.parent / name).mkdir(exist_ok=True)
            shutil.move(f, f.parent / name / f.name)
    return d


@pytest.mark.parametrize("layout, group", [("files", "patient"), ("folders", "folder")])
def test_group_folds_keep_every_group_in_one_fold(tmp_path, layout, group):
    """``folds.group``: every group's rows in one fold (StratifiedGroupKFold), the classes still
    spread over the folds, the file named apart from the ungrouped one; the report names the split."""
    from conftest import TINY, compose_cfg

    d = _group_competition(tmp_path, layout)
    extra = ["data.label_column=label"] if layout == "files" else []
    cfg = compose_cfg(tmp_path / "run", TINY + extra + ["folds.k=4", f"folds.group={group}"], data_dir=d)
    ws = Workspace.load(cfg)
    s = run_settings(cfg)
    g = data.train_groups(s.data, s.folds, s.paths)
    assert len(np.unique(g)) == 40 and set(ws.folds) == set(range(4))
    assert all(len(set(ws.folds[g == name])) == 1 for name in np.unique(g))
    assert all(len(set(ws.comp.y_train[ws.folds == f])) == 10 for f in range(4))  # every class in every fold
    plain = Workspace.load(compose_cfg(tmp_path / "run", TINY + extra + ["folds.k=4"], data_dir=d))
    assert any(len(set(plain.folds[g == name])) > 1 for name in np.unique(g))  # stratified only: groups split
    names = sorted(p.name for p in (tmp_path / "run" / "folds").glob("*.csv"))
    assert len(names) == 2 and any("_g" in n for n in names)


def test_group_folds_errors_name_the_setting(tmp_path, digits_dir):
    from conftest import TINY, compose_cfg
    from pipeline.errors import DataError

    with pytest.raises(ConfigError, match="folds.group=patient: group folds need the files or folders layout"):
        Workspace.load(compose_cfg(tmp_path, TINY + ["folds.group=patient"], data_dir=digits_dir))
    d = _group_competition(tmp_path, "files")
    with pytest.raises(DataError, match=r"train.csv line 1: no column 'site' for folds.group \(columns: id, label, "):
        Workspace.load(compose_cfg(tmp_path, TINY + ["data.label_column=label", "folds.group=site"], data_dir=d))
    with pytest.raises(ConfigError, match="folds.group: 3 groups, fewer than folds.k=4"):
        folds.make_folds(np.arange(12) % 2, 4, 0, np.arange(12) % 3)
