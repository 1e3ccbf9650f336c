"""Atomic writes: a failure leaves neither the target nor a temp file behind."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io import save_npy, write_with


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "x.csv"

    def half_then_fail(p):
        p.write_text("ImageId,Label\n1,")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_with(target, half_then_fail)
    assert list(target.parent.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.npy"
    save_npy(target, np.arange(3))
    with pytest.raises(RuntimeError):
        write_with(target, lambda p: (p.write_bytes(b"junk"), (_ for _ in ()).throw(RuntimeError())))
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.npy"]
