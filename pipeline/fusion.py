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
state back into M ordinary state dicts, loadable by the unfused model; :func:`split_like` /
:func:`fuse_like` and :func:`split_optimizer` / :func:`fuse_optimizers` cut and join any tensors of
its layout (EMA/SWA weights, optimiser moments), so members can leave or join a group.

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
    return split_like(fused, members, fused.state_dict())


def _layer(fused: nn.Module, key: str) -> nn.Module:
    """The layer of a :func:`fuse`-d network that the state key ``"<layer index>.<name>"`` names."""
    return fused[int(key.split(".", 1)[0])]


def split_like(fused: nn.Module, members: int, tensors: dict[str, torch.Tensor],
               prefix: str = "") -> list[dict[str, torch.Tensor]]:
    """Member ``m``'s slice of tensors laid out like the :func:`fuse`-d network's own: each value of
    ``tensors`` has the shape of ``fused.state_dict()[key]`` (a weight, a buffer, or a
    per-parameter optimiser moment such as AdamW's ``exp_avg``), its key that key after
    ``prefix`` (``"module."`` for an EMA/SWA's state dict). A ``MemberLinear`` tensor is ``(M,
    ...)`` (member ``m`` at index ``m``), any other is cut into M equal chunks along dim 0, and a
    0-dim tensor (BatchNorm's ``num_batches_tracked``, AdamW's ``step``, SWA's ``n_averaged``) is
    every member's.

    Returns:
        ``members`` dicts with the keys of ``tensors``, detached copies on the tensors' devices.
    Raises:
        KeyError / IndexError / ValueError: a key names no layer of ``fused``, or a tensor has no
            ``members`` slices.
    """
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(members)]
    for key, tensor in tensors.items():
        if tensor.ndim == 0:
            parts = [tensor] * members
        elif isinstance(_layer(fused, key.removeprefix(prefix)), MemberLinear):
            parts = list(tensor)
        else:
            parts = tensor.chunk(members)
        if len(parts) != members or any(p.shape != parts[0].shape for p in parts):
            raise ValueError(f"split_like: {key} of shape {tuple(tensor.shape)} has no {members} member slices")
        for m in range(members):
            out[m][key] = parts[m].detach().clone()
    return out


def fuse_like(fused: nn.Module, parts: list[dict[str, torch.Tensor]], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_like`: the members' tensors (same keys, unfused shapes) joined
    in the layout of the :func:`fuse`-d network ``fused`` of ``len(parts)`` members: stacked for a
    ``MemberLinear``, concatenated along dim 0 otherwise; a 0-dim tensor is the first member's.

    Raises:
        KeyError: a member lacks a key of the first; RuntimeError: their shapes differ.
    """
    out: dict[str, torch.Tensor] = {}
    for key, first in parts[0].items():
        same = [p[key] for p in parts]
        if first.ndim == 0:
            out[key] = first.detach().clone()
        elif isinstance(_layer(fused, key.removeprefix(prefix)), MemberLinear):
            out[key] = torch.stack(same)
        else:
            out[key] = torch.cat(same)
    return out


def split_optimizer(fused: nn.Module, members: int, state: dict) -> list[dict]:
    """An elementwise optimiser's ``state_dict()`` over ``fused``'s parameters (AdamW: per
    parameter index ``step``, ``exp_avg``, ``exp_avg_sq``) split into each member's, as the
    optimiser of the member's unfused model would hold it (its parameters in the same order);
    ``param_groups`` shared. Raises what :func:`split_like` raises."""
    names = [name for name, _ in fused.named_parameters()]
    out: list[dict] = [{"state": {}, "param_groups": state["param_groups"]} for _ in range(members)]
    for i, per_param in state["state"].items():
        for k, v in per_param.items():
            for m, part in enumerate(split_like(fused, members, {names[i]: v})):
                out[m]["state"].setdefault(i, {})[k] = part[names[i]]
    return out


def fuse_optimizers(fused: nn.Module, states: list[dict]) -> dict:
    """The inverse of :func:`split_optimizer`: the members' optimiser states (one per member of
    ``fused``, in order) as one over ``fused``'s parameters; ``param_groups`` and 0-dim entries
    (``step``) the first member's. Raises KeyError when a member lacks a parameter's state."""
    names = [name for name, _ in fused.named_parameters()]
    return {"state": {i: {k: fuse_like(fused, [{names[i]: s["state"][i][k]} for s in states])[names[i]]
                          for k in per_param} for i, per_param in states[0]["state"].items()},
            "param_groups": states[0]["param_groups"]}


def stack_inputs(xs: list[torch.Tensor]) -> torch.Tensor:
    """M batches ``(B, C, S, S)`` -> one ``(B, M x C, S, S)`` batch: member ``m``'s image ``b`` in
    channels ``m*C .. (m+1)*C - 1`` of row ``b`` (what a :func:`fuse`-d network takes)."""
    x = torch.stack(xs, dim=1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])
