"""Training images that do not fit their share of memory are streamed from the decoded cache
(``runtime.stream``): the same batches, hence the same member, as the whole-fold device copy."""

from __future__ import annotations

import logging

import numpy as np
import torch

from conftest import fit
from pipeline import augment
from pipeline.device import image_placement


def test_a_member_streamed_under_a_small_memory_share_equals_the_in_memory_member(tiny_cfg, caplog):
    """The fixture's real digits (200 training rows a fold, affine augmentation on), trained once
    with its images on the device and once under a memory share too small for them (``auto``
    streams): the same OOF probabilities, bit for bit (the CPU draws the same permutation and
    augmentation from the same generator; only where the pixels come from differs)."""
    overrides = ("aug.rotate=10", "aug.shift=0.1", "train.epochs=2")
    with caplog.at_level(logging.DEBUG, logger="pipeline.train.engine"):
        whole = fit(tiny_cfg(*overrides, "runtime.stream=off"), "cnn_keras", 0)
        assert "training images: on the device" in caplog.text and "streamed from" not in caplog.text
        caplog.clear()
        streamed = fit(tiny_cfg(*overrides, "runtime.memory_share=1e-9"), "cnn_keras", 0)
    assert "streamed from the decoded cache" in caplog.text and "against a share of" in caplog.text
    np.testing.assert_array_equal(streamed.oof, whole.oof)


def test_streamed_batches_gather_only_the_rows_asked_for(digits_dir):
    """Each epoch covers each training row once (labels here: each row's position), and the
    images a batch holds are exactly its rows' pixels (no augmentation configured)."""
    from pipeline import data
    from pipeline.settings import AugSettings

    comp = data.load_competition(digits_dir)
    rows = np.arange(0, 300, 3)

    def batches(size):
        return augment.StreamedBatches(comp.x_train, rows, np.arange(len(rows)), size, torch.device("cpu"),
                                       AugSettings(), seed=0)

    seen = torch.cat([y for _, y in batches(10)]).numpy()
    assert len(batches(10)) == 10 and sorted(seen) == list(range(100))
    x, y = next(iter(batches(100)))
    got = np.round(x.numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, comp.x_train[rows[y.numpy()]])


def test_the_placement_follows_the_memory_share():
    """``auto`` streams when the images exceed the share of what is available, split among the
    side-by-side processes; ``on`` / ``off`` force it without measuring."""
    cpu = torch.device("cpu")
    assert not image_placement(10_000, cpu, "auto", 0.5, 2).streamed  # 10 kB fits any machine
    big = image_placement(1 << 50, cpu, "auto", 0.5, 2)  # a petabyte does not
    assert big.streamed and 0 < big.limit_bytes < 1 << 50
    assert image_placement(10_000, cpu, "on", 0.5, 2).streamed
    assert not image_placement(1 << 50, cpu, "off", 0.5, 2).streamed
    assert image_placement(1 << 50, cpu, "off", 0.5, 2).limit_bytes is None
    assert "streamed from the decoded cache" in big.describe()


def test_a_prediction_batch_holds_about_as_many_pixels_whatever_the_side():
    """``runtime.eval_batch_size`` counts 28 x 28 images: the digits keep their batch, larger
    images get as many pixels a batch (at least one image)."""
    from pipeline.train.inference import eval_rows

    assert eval_rows(2048, (400, 1, 28, 28)) == 2048
    assert eval_rows(2048, (9, 3, 128, 128)) == 98
    assert eval_rows(2048, (9, 3, 384, 384)) == 10
    assert eval_rows(16, (9, 3, 1024, 1024)) == 1
