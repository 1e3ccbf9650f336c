"""Horizontal fusion: M same-shaped networks run as one network (HFTA, Wang et al., MLSys 2021).

A k-fold ensemble trains many copies of one small net (every fold x every seed). Run one at a
time, each copy launches its own small kernels and leaves a GPU mostly idle. Fused, member ``m``'s
images ride in channels ``m*C .. (m+1)*C - 1`` of one batch and every layer is its M-member
counterpart:

* ``Conv2d``      -> one convolution with ``groups = M x groups``: member blocks never mix;
* ``BatchNorm2d`` -> BatchNorm over ``M x C`` channels, i.e. per-member statistics and affine
  parameters (batch statistics are per channel);
* ``Flatten``     -> :class:`MemberFlatten`, ``(B, M x C, ...) -> (B, M, C x ...)``;
* ``Linear``      -> :class:`MemberLinear`, M matrices applied by one batched matmul;
* ReLU, max/average pooling, Dropout, Identity act per element or per channel, so they are kept.

The fused network maps ``(B, M x C, S, S)`` (:func:`stack_inputs`) to ``(B, M, classes)`` logits.
Elementwise optimisers (AdamW), schedules and weight averages (EMA, SWA) on its parameters act on
each member's slice alone, so with the sum of the members' losses every member learns exactly what
it would alone, up to float rounding of the grouped kernels. :func:`split` cuts a fused network's
state back into M ordinary state dicts, loadable by the unfused model.

Only ``nn.Sequential`` models of the layers above fuse (the registered ``cnn_deotte``,
``cnn_keras`` and ``mlp``); :func:`fusable` says whether one does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_PER_ELEMENT = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity)


class MemberFlatten(nn.Module):
    """``(B, M x C, ...)`` -> ``(B, M, C x ...)``: each member's features flattened in the order
    ``nn.Flatten`` gives them (channel, then row, then column)."""

    def __init__(self, members: int):
        super().__init__()
        self.members = members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.members, -1)


class MemberLinear(nn.Module):
    """M independent ``nn.Linear(in, out)`` layers: ``(B, M, in)`` -> ``(B, M, out)``, one
    ``baddbmm``. ``weight`` is ``(M, out, in)``, ``bias`` ``(M, out)`` (member ``m``'s slice is
    its ``Linear``'s ``weight`` / ``bias``)."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight.dtype != x.dtype else self.weight
        b = self.bias.to(x.dtype) if self.bias.dtype != x.dtype else self.bias
        return torch.baddbmm(b.unsqueeze(1), x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)


def _supported(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.Flatten, nn.Linear, *_PER_ELEMENT))


def fusable(model: nn.Module) -> bool:
    """Whether :func:`fuse` can fuse copies of ``model``: an ``nn.Sequential`` of Conv2d,
    BatchNorm2d, Flatten, Linear and per-element layers (ReLU, pooling, Dropout, Identity)."""
    return isinstance(model, nn.Sequential) and len(model) > 0 and all(_supported(m) for m in model)


@torch.no_grad()
def fuse(models: list[nn.Module]) -> nn.Sequential:
    """One network computing ``len(models)`` same-shaped models side by side.

    Args:
        models: M >= 1 models of one architecture (same layer shapes), each :func:`fusable`;
            their parameters and buffers become the fused network's (copied; the models are
            left as they are).
    Returns:
        an ``nn.Sequential`` on the models' device and dtype mapping ``(B, M x C, S, S)`` float
        (:func:`stack_inputs`) to ``(B, M, classes)`` logits, in training mode if the first model is.
    Raises:
        ValueError: a model is not fusable, or the models differ in shape.
    """
    m = len(models)
    first = models[0]
    if not all(fusable(x) for x in models) or len({tuple(type(l) for l in x) for x in models}) != 1:
        raise ValueError("fuse: expected same-shaped nn.Sequential models of Conv2d, BatchNorm2d, "
                         "Flatten, Linear and per-element layers")
    layers: list[nn.Module] = []
    flat = False
    for i, layer in enumerate(first):
        same = [x[i] for x in models]
        if isinstance(layer, nn.Conv2d):
            out = nn.Conv2d(m * layer.in_channels, m * layer.out_channels, layer.kernel_size, layer.stride,
                            layer.padding, layer.dilation, m * layer.groups, layer.bias is not None,
                            layer.padding_mode, device=layer.weight.device, dtype=layer.weight.dtype)
        elif isinstance(layer, nn.BatchNorm2d):
            out = nn.BatchNorm2d(m * layer.num_features, layer.eps, layer.momentum, layer.affine,
                                 layer.track_running_stats, device=layer.running_mean.device,
                                 dtype=layer.running_mean.dtype)
        elif isinstance(layer, nn.Flatten):
            out, flat = MemberFlatten(m), True
        elif isinstance(layer, nn.Linear):
            if not flat:
                raise ValueError("fuse: a Linear layer before the Flatten")
            out = MemberLinear(m, layer.in_features, layer.out_features).to(layer.weight)
        else:
            out = type(layer)(**_init_args(layer))
        for name, tensor in out.state_dict().items():
            parts = [x.state_dict()[name] for x in same]
            if tensor.ndim == 0:  # BatchNorm's num_batches_tracked: one count for every member
                tensor.copy_(parts[0])
            elif isinstance(out, MemberLinear):
                tensor.copy_(torch.stack(parts))
            else:
                tensor.copy_(torch.cat(parts))
        layers.append(out)
    fused = nn.Sequential(*layers)
    return fused.train(first.training)


def _init_args(layer: nn.Module) -> dict:
    """The constructor arguments of a per-element layer (a fresh, unshared copy)."""
    if isinstance(layer, nn.ReLU):
        return {"inplace": layer.inplace}
    if isinstance(layer, nn.Dropout):
        return {"p": layer.p, "inplace": layer.inplace}
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return {"output_size": layer.output_size}
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
        keys = ("kernel_size", "stride", "padding") + (("dilation", "ceil_mode") if isinstance(layer, nn.MaxPool2d)
                                                       else ("ceil_mode",))
        return {k: getattr(layer, k) for k in keys}
    return {}


def split(fused: nn.Module, members: int) -> list[dict[str, torch.Tensor]]:
    """Member ``m``'s slice of every tensor of a :func:`fuse`-d network (or of its EMA/SWA copy):
    ``members`` state dicts with the unfused model's keys and shapes, detached copies on the
    fused network's device, each loadable by ``create_model(...).load_state_dict``."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(members)]
    for idx, layer in enumerate(fused):
        for name, tensor in layer.state_dict().items():
            key = f"{idx}.{name}"
            for m in range(members):
                if tensor.ndim == 0:
                    part = tensor
                elif isinstance(layer, MemberLinear):
                    part = tensor[m]
                else:
                    part = tensor.chunk(members)[m]
                out[m][key] = part.detach().clone()
    return out


def stack_inputs(xs: list[torch.Tensor]) -> torch.Tensor:
    """M batches ``(B, C, S, S)`` -> one ``(B, M x C, S, S)`` batch: member ``m``'s image ``b`` in
    channels ``m*C .. (m+1)*C - 1`` of row ``b`` (what a :func:`fuse`-d network takes)."""
    x = torch.stack(xs, dim=1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])
