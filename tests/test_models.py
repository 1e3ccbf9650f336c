"""Model registry: every registered model trains one step and has the right output shape."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.models import create_model, list_models


def test_registry_has_the_required_variants():
    assert {"mlp", "cnn_keras", "cnn_deotte", "resnet_timm"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, img_size=28)
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_other_sizes_and_classes(name):
    model = create_model(name, num_classes=3, in_chans=1, img_size=32).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)


def test_resnet_timm_keeps_resolution_in_the_stem():
    model = create_model("resnet_timm", 10)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown model 'lenet'; known models: cnn_deotte, cnn_keras"):
        create_model("lenet", 10)
