"""Model registry: every ensemble member is built by name with :func:`create_model`.

All models map ``(B, in_chans, S, S)`` float images to ``(B, num_classes)`` logits.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from typing import Callable

import torch
import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator adding a model factory to the registry under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_chans: int = 1, img_size: int = 28,
                 load_weights: bool = True, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: C, the number of output logits.
        in_chans: input channels (1 for grayscale).
        img_size: input side S in pixels.
        load_weights: False builds a pretrained backbone without loading its ImageNet weights
            (a checkpoint's tensors replace them); ignored by models trained from scratch.
        **kwargs: the model's own options (e.g. ``width``, ``dropout``, ``pretrained``).
    Returns:
        an ``nn.Module`` mapping ``(B, in_chans, S, S)`` float32 to ``(B, C)`` logits.
    Raises:
        ConfigError: ``name`` is not registered (the message lists the known names), or a
            pretrained backbone's weights are missing (:func:`pipeline.pretrained.resolve_weights`).
    """
    if name not in _REGISTRY:
        from pipeline.errors import ConfigError

        raise ConfigError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    factory = _REGISTRY[name]
    if "load_weights" in inspect.signature(factory).parameters:
        kwargs["load_weights"] = load_weights
    return factory(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)


def _ch(base: int, width: float) -> int:
    return max(4, int(round(base * width)))


@register_model
def mlp(num_classes: int, in_chans: int = 1, img_size: int = 28, hidden: int = 200,
        depth: int = 3, dropout: float = 0.0) -> nn.Module:
    """Fully connected baseline: 784-200-200-200-10 with ReLU (the fast.ai MNIST baseline)."""
    layers: list[nn.Module] = [nn.Flatten()]
    n_in = in_chans * img_size * img_size
    for _ in range(depth):
        layers += [nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        n_in = hidden
    layers.append(nn.Linear(n_in, num_classes))
    return nn.Sequential(*layers)


@register_model
def cnn_keras(num_classes: int, in_chans: int = 1, img_size: int = 28, width: float = 1.0,
              hidden: int = 256) -> nn.Module:
    """The classic Kaggle Keras notebook net (Y. Ghouzam, "Introduction to CNN Keras", 2017):
    2xConv32 k5 - MaxPool - Dropout .25 - 2xConv64 k3 - MaxPool - Dropout .25 - Dense256 - Dropout .5.

    ``width`` scales the channel counts (1.0 = the published 32/64).
    """
    a, b = _ch(32, width), _ch(64, width)
    side = img_size // 4
    return nn.Sequential(
        nn.Conv2d(in_chans, a, 5, padding=2), nn.ReLU(inplace=True),
        nn.Conv2d(a, a, 5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(a, b, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(b, b, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(b * side * side, hidden), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(hidden, num_classes),
    )


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, padding, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


@register_model
def cnn_deotte(num_classes: int, in_chans: int = 1, img_size: int = 28, width: float = 1.0,
               dropout: float = 0.4) -> nn.Module:
    """[32C3-32C3-32C5S2]-[64C3-64C3-64C5S2]-128C4-10 with BatchNorm and dropout 0.4.

    The member net of C. Deotte's 15-CNN ensemble that scored 0.99757 on Kaggle's Digit
    Recognizer ("How to choose CNN Architecture MNIST", 2018). The 5x5 stride-2 convs replace
    max-pooling; a global average pool after 128C4 makes any ``img_size`` >= 28 work (at 28 px
    the map is already 1x1). ``width`` scales the channel counts.
    """
    a, b, c = _ch(32, width), _ch(64, width), _ch(128, width)
    return nn.Sequential(
        *_conv_bn(in_chans, a, 3), *_conv_bn(a, a, 3), *_conv_bn(a, a, 5, 2, 2), nn.Dropout(dropout),
        *_conv_bn(a, b, 3), *_conv_bn(b, b, 3), *_conv_bn(b, b, 5, 2, 2), nn.Dropout(dropout),
        *_conv_bn(b, c, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(c, num_classes),
    )


class Residual(nn.Module):
    """``x + body(x)``: an identity shortcut around ``body`` (no activation after the sum, as in
    Page's ResNet-9). ``body`` maps ``(N, C, H, W)`` to the same shape."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    """Multiplies its input by a constant ``factor`` (no parameter): ResNet-9's logit scale."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


@register_model
def resnet9(num_classes: int, in_chans: int = 1, img_size: int = 28, width: float = 1.0, depth: int = 1,
            dropout: float = 0.0) -> nn.Module:
    """ResNet-9 of the DAWNBench CIFAR-10 records: D. Page, "How to train your ResNet" (Myrtle.ai,
    2018), the network K. Jordan's airbench (2024) descends from.

    prep Conv64 - layer1 Conv128, MaxPool2, Residual(Conv128, Conv128) - layer2 Conv256, MaxPool2 -
    layer3 Conv512, MaxPool2, Residual(Conv512, Conv512) - global max pool - [Dropout] -
    Linear (no bias) - logits x 0.125. Every Conv is 3x3 padding 1, no bias, then BatchNorm2d and
    ReLU; a residual is ``x + body(x)`` with nothing after the sum.

    Args:
        num_classes: C, the number of logits.
        in_chans: input channels (1 grayscale, 3 RGB; any count >= 1 works).
        img_size: the side S the model is built for. The three max-pools halve it (28 px:
            28 -> 14 -> 7 -> 3; 32 px: 32 -> 16 -> 8 -> 4) and the global max pool takes any
            remainder, so any S >= 8 works. From S >= 96 the prep conv has stride 2, and one
            2x2 max-pool follows it per further halving while the side is still >= 96 (96 -> 48,
            128 -> 64, 224 -> 56, 300 -> 75): layer1 runs below 96 px, so a large image costs
            about what a 48..95 px one does (128 px: the multiply-adds of 64 px).
        width: multiplier of the channel counts (1.0 = the published 64/128/256/512; at least 4
            channels each).
        depth: residual blocks (two convs each) in layer1 and in layer3 (1 = the published net;
            0 = no residuals).
        dropout: probability of the dropout before the linear layer (0 = none, as published).
    Returns:
        an ``nn.Sequential`` (a :class:`Residual` per residual block, a :class:`Scale` last)
        mapping ``(N, in_chans, S, S)`` float32 to ``(N, num_classes)`` float32 logits.
    Raises:
        ConfigError: ``img_size`` < 8, ``width`` <= 0, ``depth`` < 0, ``dropout`` outside [0, 1),
            ``in_chans`` < 1.
    """
    from pipeline.errors import ConfigError

    for bad, what in ((img_size < 8, f"img_size={img_size}: expected >= 8 (three 2x2 max-pools)"),
                      (width <= 0, f"kwargs.width={width}: expected > 0"),
                      (depth < 0, f"kwargs.depth={depth}: expected >= 0"),
                      (not 0 <= dropout < 1, f"kwargs.dropout={dropout}: expected in [0, 1)"),
                      (in_chans < 1, f"in_chans={in_chans}: expected >= 1")):
        if bad:
            raise ConfigError(f"resnet9: {what}")
    c0, c1, c2, c3 = _ch(64, width), _ch(128, width), _ch(256, width), _ch(512, width)
    halvings, side = 0, img_size
    while side >= 96:  # large images: halve in the prep layer until the side is < 96 (docstring)
        halvings, side = halvings + 1, side // 2
    layers: list[nn.Module] = _conv_bn(in_chans, c0, 3, 2 if halvings else 1, 1)
    for _ in range(halvings - 1):
        layers.append(nn.MaxPool2d(2))
    layers += _conv_bn(c0, c1, 3, 1, 1) + [nn.MaxPool2d(2)]
    for _ in range(depth):
        layers.append(Residual(nn.Sequential(*_conv_bn(c1, c1, 3, 1, 1), *_conv_bn(c1, c1, 3, 1, 1))))
    layers += _conv_bn(c1, c2, 3, 1, 1) + [nn.MaxPool2d(2)]
    layers += _conv_bn(c2, c3, 3, 1, 1) + [nn.MaxPool2d(2)]
    for _ in range(depth):
        layers.append(Residual(nn.Sequential(*_conv_bn(c3, c3, 3, 1, 1), *_conv_bn(c3, c3, 3, 1, 1))))
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c3, num_classes, bias=False),
               Scale(0.125)]
    return nn.Sequential(*layers)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: the input statistics a pretrained backbone expects."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Pretrained(nn.Module):
    """A pretrained timm backbone ``net`` behind the input normalisation its weights expect
    (``norm``): maps ``(N, in_chans, S, S)`` float32 in [0, 1] to ``(N, C)`` logits. It names its
    layer groups from the stem (0) to the classifier (the last) with timm's ``group_matcher``,
    for layer-wise learning rates and freezing (:func:`parameter_groups`, :func:`freeze`).

    With ``feature_levels`` = n > 0 its features are multi-level: the global-average-pooled
    outputs of the last n feature levels (timm's ``forward_intermediates``, e.g. the stages of
    reduction 8, 16 and 32 of an EfficientNet) concatenated before the pooled features, and its
    classifier is a linear layer ``head`` on all of them (intermediate representations for
    transfer: Evci et al. 2022, "Head2Toe"; lower levels carry the texture that images far from
    ImageNet, such as solar cells or cells under a microscope, differ by)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], feature_levels: int = 0,
                 num_classes: int = 0):
        super().__init__()
        self.norm = Normalize(mean, std)
        self.net = net
        self.feature_levels = int(feature_levels)
        if self.feature_levels:
            width = sum(f["num_chs"] for f in net.feature_info[-self.feature_levels:]) + net.num_features
            net.reset_classifier(0)
            self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_levels:
            return self.head(self.features(x))
        return self.net(self.norm(x))

    @property
    def classifier(self) -> nn.Module:
        """The linear layer that maps :meth:`features` to the logits."""
        return self.head if self.feature_levels else self.net.get_classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` pooled features (timm's ``pre_logits``, after the pooled outputs of the last
        ``feature_levels`` levels when there are any): what :attr:`classifier` takes."""
        if not self.feature_levels:
            return self.net.forward_head(self.net.forward_features(self.norm(x)), pre_logits=True)
        final, levels = self.net.forward_intermediates(self.norm(x), indices=self.feature_levels)
        return torch.cat([*(t.mean((2, 3)) for t in levels), self.net.forward_head(final, pre_logits=True)], 1)

    def top_split(self, top_blocks: int) -> int:
        """The index of the first of the last ``top_blocks`` blocks of an EfficientNet-family body
        (timm's ``EfficientNet``: ``conv_stem``, ``bn1``, ``blocks``, ``conv_head``, ``bn2``), where
        :meth:`lower` ends and :meth:`upper` starts. Raises ConfigError for another family, multi-level
        features, or ``top_blocks`` outside 1 .. blocks - 1."""
        from timm.models.efficientnet import EfficientNet

        from pipeline.errors import ConfigError

        if not isinstance(self.net, EfficientNet):
            raise ConfigError(f"train.fit=top_stages: {type(self.net).__name__} is not supported (expected a timm "
                              f"EfficientNet-family backbone, e.g. tf_efficientnet_lite0)")
        if self.feature_levels:
            raise ConfigError(f"train.fit=top_stages: kwargs.feature_levels={self.feature_levels} is not supported "
                              f"(expected 0: the top trains on the last block's pooled features)")
        n = len(self.net.blocks)
        if not 1 <= top_blocks < n:
            raise ConfigError(f"train.top_blocks={top_blocks}: expected 1 to {n - 1} (the backbone has {n} blocks)")
        return n - top_blocks

    def lower(self, x: torch.Tensor, top_blocks: int) -> torch.Tensor:
        """``(N, C', h, w)`` activations of ``(N, in_chans, S, S)`` images below the last
        ``top_blocks`` blocks (:meth:`top_split`): the frozen part of a top-stages member."""
        t = self.net.bn1(self.net.conv_stem(self.norm(x)))
        return self.net.blocks[: self.top_split(top_blocks)](t)

    def upper(self, a: torch.Tensor, top_blocks: int) -> torch.Tensor:
        """``(N, classes)`` logits of :meth:`lower`'s activations: the last ``top_blocks`` blocks,
        the head convolution and the classifier, so ``upper(lower(x))`` is ``forward(x)``."""
        t = self.net.blocks[self.top_split(top_blocks):](a)
        return self.net.forward_head(self.net.bn2(self.net.conv_head(t)))

    def top_modules(self, top_blocks: int) -> list[nn.Module]:
        """The modules a top-stages member trains: the last ``top_blocks`` blocks, the head
        convolution and the classifier (their BatchNorm layers keep the pretrained statistics)."""
        return [*self.net.blocks[self.top_split(top_blocks):], self.net.conv_head, self.classifier]

    def body_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer but the classifier's: what fixes the features."""
        head = {id(t) for t in self.classifier.parameters()}
        return {n: t for n, t in [*self.named_parameters(), *self.named_buffers()] if id(t) not in head}

    def layer_ids(self) -> dict[str, int]:
        """``{parameter name: layer group}``: 0 = the stem ... the classifier's group last."""
        from timm.models import group_parameters

        if not hasattr(self.net, "group_matcher"):  # every timm family has one; a safe fallback
            head = {n for n, _ in self.net.get_classifier().named_parameters()}
            return {f"net.{n}": (1 if n.split(".", 1)[-1] in head else 0) for n, _ in self.net.named_parameters()}
        groups = group_parameters(self.net, self.net.group_matcher(coarse=True), reverse=True)
        top = max(groups.values()) + 1
        classifier = {f"{n}" for n, _ in _classifier_params(self.net)}
        raw = {f"net.{n}": (top if n in classifier else groups.get(n, top)) for n, _ in self.net.named_parameters()}
        dense = {v: i for i, v in enumerate(sorted(set(raw.values())))}  # numbered 0..n-1, no gaps
        return {n: dense[v] for n, v in raw.items()}


def _classifier_params(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    head = net.get_classifier()
    ids = {id(p) for p in head.parameters()}
    return [(n, p) for n, p in net.named_parameters() if id(p) in ids]


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW's parameter groups of ``model``: one group of every parameter for a network trained
    from scratch; for a :class:`Pretrained` backbone one group per layer group, its peak learning
    rate ``lr x layer_decay ** (depth below the classifier)`` (layer-wise learning-rate decay:
    Clark et al. 2020, ELECTRA; Bao et al. 2021, BEiT; the discriminative learning rates of Howard
    & Ruder 2018, ULMFiT). Each group has ``params``, ``lr`` (its peak) and ``weight_decay``."""
    if not isinstance(model, Pretrained) or layer_decay == 1.0:
        return [{"params": [p for p in model.parameters()], "lr": lr, "weight_decay": weight_decay}]
    ids = model.layer_ids()
    top = max(ids.values())
    groups: dict[int, list] = {}
    for name, p in model.named_parameters():
        groups.setdefault(ids.get(name, top), []).append(p)
    return [{"params": ps, "lr": lr * layer_decay ** (top - i), "weight_decay": weight_decay}
            for i, ps in sorted(groups.items())]


def freeze(model: nn.Module, head_only: bool, frozen_fraction: float = 0.0, frozen_bn: bool = False) -> None:
    """Set which parameters of ``model`` train (``requires_grad``): every one of a network
    trained from scratch; of a :class:`Pretrained` backbone the classifier alone when
    ``head_only`` (the new head on a frozen body first: fastai's ``fine_tune``, Howard & Ruder
    2018), else all but the lowest ``frozen_fraction`` of its layer groups (the stem first). The
    BatchNorm layers of the frozen part go to eval mode (their running statistics stay the
    pretrained ones: a small batch's statistics would shift the features the head learns on);
    with ``frozen_bn`` every BatchNorm normalises with its running statistics (its scale and
    shift still train: a "frozen BN" as in Detectron2 and timm's ``freeze_batch_norm_2d``). Call
    it after ``model.train()``."""
    if not isinstance(model, Pretrained):
        return
    ids = model.layer_ids()
    top = max(ids.values())
    lowest = round(frozen_fraction * top)
    for name, p in model.named_parameters():
        layer = ids.get(name, top)
        p.requires_grad_(layer == top if head_only else layer >= lowest)
    for module in model.modules():  # a frozen BatchNorm keeps its ImageNet statistics too
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (frozen_bn or not any(
                p.requires_grad for p in module.parameters(recurse=False))):
            module.eval()


def _timm(timm_name: str, num_classes: int, in_chans: int, drop_rate: float, pretrained: bool,
          pretrained_file: str | None, timm_kwargs: dict, adapt: Callable[[nn.Module], None] | None = None,
          load_weights: bool = True, feature_levels: int = 0) -> nn.Module:
    """``timm.create_model``. With ``pretrained`` (or a ``pretrained_file``) the ImageNet weights
    come from the first source of :func:`pipeline.pretrained.resolve_weights` that has them
    (a local file, packaged weights, timm's hub), timm adapts the stem to ``in_chans`` (summing
    the RGB filters for one channel) and drops the 1000-class head, and the model is a
    :class:`Pretrained` that normalises its input with the weights' mean/std (averaged over RGB
    for 1 channel). ``load_weights=False`` builds the same module without loading any (a
    checkpoint's tensors replace them: :func:`pipeline.members.load_model`). ``adapt(model)``
    edits it before wrapping; ``feature_levels``: see :class:`Pretrained`. Raises ConfigError for
    an unknown name, missing weights, or ``feature_levels`` without pretrained weights."""
    import timm

    from pipeline.errors import ConfigError
    from pipeline.pretrained import WeightsSource, missing_message, resolve_weights

    for key in ("channels", "layers"):
        if timm_kwargs.get(key) is not None:
            timm_kwargs[key] = tuple(timm_kwargs[key])
    pretrained = bool(pretrained or pretrained_file)
    if feature_levels and not pretrained:
        raise ConfigError(f"timm_name={timm_name}: kwargs.feature_levels={feature_levels} needs pretrained=true "
                          f"(multi-level features of a pretrained backbone)")
    options = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **timm_kwargs)
    try:
        if pretrained and load_weights:
            cfg = timm.get_pretrained_cfg(timm_name)
            weights = resolve_weights(timm_name, pretrained_file, getattr(cfg, "hf_hub_id", None) if cfg else None)
            try:
                model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=weights.overlay or None,
                                          **options)
            except Exception as e:  # the hub unreachable (requests' or httpx's errors), a download cut short
                if weights.source is not WeightsSource.hub or isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"{missing_message(timm_name)} (the hub failed: {type(e).__name__})") from None
        else:
            model = timm.create_model(timm_name, pretrained=False, **options)
    except RuntimeError as e:
        raise ConfigError(f"timm_name={timm_name}: {str(e).splitlines()[0]}") from None
    if adapt is not None:
        adapt(model)
    if not pretrained:
        return model
    mean, std = model.pretrained_cfg.get("mean", IMAGENET_MEAN), model.pretrained_cfg.get("std", IMAGENET_STD)
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Pretrained(model, tuple(mean), tuple(std), feature_levels, num_classes)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_INPUT = 64  # below this side a ResNet's stride-4 stem leaves too little resolution


@register_model
def resnet_timm(num_classes: int, in_chans: int = 1, img_size: int = 28, timm_name: str = "resnet18",
                drop_rate: float = 0.1, pretrained: bool = False, pretrained_file: str | None = None,
                load_weights: bool = True, **timm_kwargs) -> nn.Module:
    """A timm ResNet (``timm.create_model``) at any input size and channel count.

    Below 64 px the 7x7 stride-2 stem and the max-pool would shrink the image 4x before the first
    block (28 px to 7); they are replaced by a 3x3 stride-1 conv and no pool (as for CIFAR
    ResNets, He et al. 2016), so the stages run at 28/14/7/4 px (a pretrained stem is then not
    used). From 64 px on, timm's own stem is kept. ``pretrained``, ``pretrained_file``,
    ``load_weights``: see :func:`_timm`. ``timm_kwargs`` go to timm (e.g.
    ``channels=[32,64,128,256]``, ``layers=[1,1,1,1]``).
    """
    def small_stem(model: nn.Module) -> None:
        if img_size < SMALL_INPUT:
            model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()

    return _timm(timm_name, num_classes, in_chans, drop_rate, pretrained, pretrained_file, timm_kwargs, small_stem,
                 load_weights)


@register_model
def timm_backbone(num_classes: int, in_chans: int = 3, img_size: int = 224, timm_name: str = "resnet18",
                  drop_rate: float = 0.0, pretrained: bool = False, pretrained_file: str | None = None,
                  load_weights: bool = True, feature_levels: int = 0, **timm_kwargs) -> nn.Module:
    """Any timm architecture by name (``timm_name``: e.g. ``tf_efficientnet_lite0``,
    ``convnext_nano``), unchanged, at any input size and channel count; with ``pretrained`` its
    ImageNet weights from a local file, packaged weights or timm's hub (see :func:`_timm`).
    ``img_size`` is passed to timm for models that take one (vision transformers);
    ``feature_levels`` > 0: multi-level features and a linear head on them (:class:`Pretrained`)."""
    if timm_name.startswith(("vit", "deit", "swin", "beit", "eva")):  # transformers fix their grid
        timm_kwargs.setdefault("img_size", img_size)
    return _timm(timm_name, num_classes, in_chans, drop_rate, pretrained, pretrained_file, timm_kwargs,
                 load_weights=load_weights, feature_levels=feature_levels)


def _definition(fn: Callable | type) -> str:
    """The AST of a function or class without its docstrings (its own and those of the functions
    and classes it defines): code edits change it, comments and docstrings do not."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    node = tree.body[0]
    for inner in ast.walk(node):
        if (isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and inner.body
                and isinstance(inner.body[0], ast.Expr) and isinstance(inner.body[0].value, ast.Constant)):
            inner.body = inner.body[1:]
    node.decorator_list = []
    return ast.dump(node)


def _names(code) -> set[str]:
    """The global names a code object and the code nested in it (comprehensions, inner
    functions) refer to."""
    out = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            out |= _names(const)
    return out


def architecture_digest(name: str) -> str:
    """A short digest of registered model ``name``'s definition: its factory and the module
    helpers (functions and classes, e.g. :class:`Residual`) it names, nested code included
    (docstrings and comments excluded), plus timm's version for timm-based models. Part of every
    member's cache key, so editing an architecture makes its cached members stale. Raises
    ConfigError for an unknown name."""
    if name not in _REGISTRY:
        create_model(name, 2)  # raises the ConfigError listing the known names
    fn = _REGISTRY[name]
    parts = [_definition(fn)]
    for ref in sorted(_names(fn.__code__)):
        helper = globals().get(ref)
        if ((inspect.isfunction(helper) or inspect.isclass(helper)) and helper.__module__ == __name__
                and ref not in _REGISTRY):
            parts.append(_definition(helper))
    if "timm" in fn.__code__.co_names:
        import timm

        parts.append(f"timm {timm.__version__}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

