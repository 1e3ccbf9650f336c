"""Adversarial validation: near 0.5 where train and test come from one source, high on a shift."""

from __future__ import annotations

import numpy as np

from conftest import DIGITS
from pipeline import data
from pipeline.adversarial import SHIFT_AUC, adversarial_features, adversarial_validation, describe


def test_the_digits_own_train_and_test_are_indistinguishable():
    """The fixture's real MNIST rows, split at random into train and test: AUC near 0.5."""
    comp = data.load_competition(DIGITS)
    res = adversarial_validation(comp.x_train, comp.x_test, seed=0)
    assert abs(res.auc - 0.5) < 0.1 and not res.shifted, res.auc
    assert res.n_train == len(comp.x_train) and res.p_test.shape == res.rows.shape
    np.testing.assert_allclose(res.weights().mean(), 1.0)
    assert res.effective_rows() > 0.5 * res.n_train  # regularised: no shift, no extreme weights


def test_a_test_side_from_another_source_is_found():
    """Train: the fixture's MNIST digits; test: scikit-learn's own handwritten digits (8x8, 16
    grey levels, another scanner and writers), upsampled to 28 px: the classifier tells them
    apart, and the test-like training rows are the ones it scores highest."""
    from PIL import Image
    from sklearn.datasets import load_digits

    comp = data.load_competition(DIGITS)
    other = load_digits().images[:300]
    test = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
                     for im in other])[:, None]
    res = adversarial_validation(comp.x_train, test, seed=0)
    assert res.auc > 0.95 and res.shifted and SHIFT_AUC < res.auc, res.auc
    top = res.most_test_like(5)
    assert set(top) <= set(res.rows) and res.p_test[np.searchsorted(res.rows, top[0])] == res.p_test.max()


def test_describe_is_a_grid_of_means_and_two_moments():
    img = np.zeros((1, 1, 16, 16), np.uint8)
    img[0, 0, :8] = 255  # the top half white
    d = describe(img)
    assert d.shape == (1, 66)
    np.testing.assert_allclose(d[0, :64].reshape(8, 8)[:4], 1.0)
    np.testing.assert_allclose(d[0, :64].reshape(8, 8)[4:], 0.0)
    np.testing.assert_allclose(d[0, 64:], [0.5, 0.5])


def test_features_of_one_source_are_indistinguishable_and_of_two_are_not():
    """The features classifier (standardised logistic regression): scikit-learn's 8x8 digits split
    at random give an AUC near 0.5 (its first 900 against the next 500, other writers: 0.76); against the fixture's MNIST digits area-averaged to 8x8 (the
    same 64 features from another scanner and writers) it is high."""
    from sklearn.datasets import load_digits

    ours = load_digits().images.reshape(-1, 64) / 16.0
    ours = ours[np.random.default_rng(0).permutation(len(ours))]  # its file is ordered by writer: 0.76 unshuffled
    same = adversarial_features(ours[:900], ours[900:1400], "digits 8x8", seed=0)
    assert abs(same.auc - 0.5) < 0.1 and not same.shifted and same.source == "digits 8x8, logistic regression"
    assert same.effective_rows() > 0.5 * same.n_train  # C chosen by log loss: probabilities near the prior
    comp = data.load_competition(DIGITS)
    mnist = comp.x_train[:, 0, 2:26, 2:26].reshape(-1, 8, 3, 8, 3).mean((2, 4)).reshape(-1, 64) / 255.0
    other = adversarial_features(ours[:900], mnist, "digits 8x8", seed=0)
    assert other.auc > 0.9 and other.shifted, other.auc
