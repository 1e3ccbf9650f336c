"""The choices of the config schema (:mod:`pipeline.settings`) as enums: the values that carry
state through the pipeline (precision, augmentation backend, blend methods, data layouts ...).
"""

from __future__ import annotations

from enum import Enum


class Layout(str, Enum):
    """How a competition's files are laid out (``data.format``; ``auto`` detects it)."""

    pixels = "pixels"    # train.csv = label,pixel0.. ; test.csv ; sample_submission.csv
    files = "files"      # train.csv = id,label ; train/<id>[.ext] ; test/<id>[.ext] ; sample_submission.csv
    folders = "folders"  # train/<class name>/*.ext ; test/*.ext ; sample_submission.csv (file name first)


class Resize(str, Enum):
    """``data.resize``: how an image of another aspect becomes a square of side S."""

    stretch = "stretch"  # resize both sides to S (the aspect changes)
    pad = "pad"          # fit the longer side to S, pad the rest with black (the aspect is kept)
    crop = "crop"        # fit the shorter side to S, crop the centre (the aspect is kept)


class SubmissionKind(str, Enum):
    """What the leaderboard file holds (``data.submission``; ``auto`` reads sample_submission.csv)."""

    label = "label"                  # id, the predicted class (its original name)
    probabilities = "probabilities"  # id, one column per class in sample_submission.csv's order


class Precision(str, Enum):
    """``train.precision``: the autocast dtype of training and prediction. ``auto`` is resolved
    per device before a member's cache key is made (:func:`pipeline.device.resolve_precision`):
    bf16 on CUDA compute capability >= 8.0 and on CPUs with native bf16, fp16 (with a gradient
    scaler) on capability 7.x, fp32 elsewhere."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class FitMethod(str, Enum):
    """``train.fit``: how a member learns. ``gradient``: the network end to end by AdamW (from
    scratch, or fine-tuning a pretrained backbone); ``linear_probe``: a pretrained backbone kept
    frozen, its pooled features computed once and cached, and a regularised logistic regression
    fitted on them (:mod:`pipeline.train.probe`); ``top_stages``: a pretrained backbone's lower
    blocks frozen, their activations computed once and cached, and only its top blocks and head
    fine-tuned on them (:mod:`pipeline.train.topstages`)."""

    gradient = "gradient"
    linear_probe = "linear_probe"
    top_stages = "top_stages"


class Sampler(str, Enum):
    """``train.sampler``: the rows of an epoch. ``shuffle``: every training row once, in a random
    order; ``balanced``: as many rows drawn with replacement, each with probability inversely
    proportional to its class's count, so every class is drawn equally often (PyTorch's
    ``WeightedRandomSampler`` with inverse-frequency weights)."""

    shuffle = "shuffle"
    balanced = "balanced"


class Balance(str, Enum):
    """How a screened candidate meets imbalanced classes (the screening's ``balance`` study):
    ``none``; ``class_weight`` (``train.class_weight=true``: the loss weighted by inverse class
    frequency); ``sampler`` (``train.sampler=balanced``: every class drawn equally often)."""

    none = "none"
    class_weight = "class_weight"
    sampler = "sampler"

    @property
    def train_sampler(self) -> "Sampler":
        """The ``train.sampler`` of this balance."""
        return Sampler.balanced if self is Balance.sampler else Sampler.shuffle

    def train_values(self) -> dict:
        """The ``train`` settings that this balance sets, as config values: ``class_weight`` and ``sampler``."""
        return {"class_weight": self is Balance.class_weight, "sampler": self.train_sampler.value}


class HeadInit(str, Enum):
    """``train.head_init``: a pretrained backbone's new classifier starts ``random`` (timm's
    init), or as the ``probe``: the logistic regression of the backbone's frozen features on the
    member's training rows (linear probing then fine-tuning, LP-FT: Kumar et al. 2022)."""

    random = "random"
    probe = "probe"


class AugBackend(str, Enum):
    """``aug.backend``: batched on the training device, or per sample (the reference)."""

    torch = "torch"
    albumentations = "albumentations"


class LockMode(str, Enum):
    """``runtime.lock``: what to do with a member another process is training."""

    wait = "wait"
    skip = "skip"


class StreamMode(str, Enum):
    """``runtime.stream``: where a member's training images live. ``auto``: on the training
    device when they fit its share of memory (``runtime.memory_share``), else gathered per step
    from the decoded cache (a memory map) and prefetched; ``on``: always gathered; ``off``: always
    on the device."""

    auto = "auto"
    on = "on"
    off = "off"


class FuseMode(str, Enum):
    """``runtime.fuse``: train a model's pending members (folds x seeds) as one fused network
    (:mod:`pipeline.fusion`): ``auto`` on CUDA (and on the CPU where the benchmark found it
    faster), ``on``, ``off``."""

    auto = "auto"
    on = "on"
    off = "off"


class Pruner(str, Enum):
    """``tune.pruner``."""

    median = "median"
    hyperband = "hyperband"
    successive_halving = "successive_halving"
    none = "none"


class Metric(str, Enum):
    """``data.metric``: what scores members, blends and trials, and picks the submitted blend."""

    accuracy = "accuracy"
    log_loss = "log_loss"
    roc_auc = "roc_auc"  # binary competitions
    balanced_accuracy = "balanced_accuracy"  # the mean of the per-class recalls (scikit-learn's)
    macro_f1 = "macro_f1"                    # the unweighted mean of the per-class F1 scores


class BlendMethod(str, Enum):
    """``blend.method``: the blenders of :mod:`pipeline.blend.blenders`."""

    mean = "mean"
    weighted = "weighted"
    stack = "stack"
    geometric = "geometric"
    power = "power"
    rank = "rank"
    ensemble_selection = "ensemble_selection"


class BlendSeeds(str, Enum):
    """``blend.seeds``: what a blend combines of a model trained under several seeds."""

    average = "average"  # one blend member per model, its seeds averaged
    members = "members"  # one blend member per (model, seed): model@seed


class StackMeta(str, Enum):
    """``blend.stack_meta``: the stacking meta-learner."""

    logistic = "logistic"  # multinomial logistic regression on standardised features
    hgb = "hgb"            # scikit-learn's HistGradientBoostingClassifier


class StackFeatures(str, Enum):
    """``blend.stack_features``: what the meta-learner sees of each member."""

    logprob = "logprob"
    prob = "prob"


class PseudoLabels(str, Enum):
    """``pseudo.labels``: what a pseudo row is trained towards."""

    hard = "hard"  # the combined prediction's top class (cross-entropy on a class index)
    soft = "soft"  # the combined probabilities themselves (cross-entropy on a distribution)


class Dim(str, Enum):
    """A dimension of the recipe that the screening (``screen``, :mod:`pipeline.screen`) may
    choose by measurement; one the command line sets (``screen.fixed``) is trained as set."""

    side = "side"          # data.img_size
    arch = "arch"          # the ensemble's architectures
    aug = "aug"            # the augmentation preset (:class:`AugPreset`)
    balance = "balance"    # train.class_weight or train.sampler (imbalanced classes)


class AugPreset(str, Enum):
    """An augmentation candidate of the screening: the configured affine strengths plus what the
    name says. Flips and 90-degree rotations are candidates only, never defaults."""

    none = "none"          # no augmentation
    affine = "affine"      # rotation, zoom, shift (aug.rotate / scale / shift as configured)
    hflip = "hflip"        # affine + horizontal flips (objects, clothing)
    dihedral = "dihedral"  # affine + the 8 flips and 90-degree rotations of the square (cells, aerial)
    elastic = "elastic"    # affine + elastic distortion (Simard et al. 2003)
    erase = "erase"        # affine + random erasing (Zhong et al. 2017)
    photo = "photo"        # photos: a wider zoom, horizontal flips, colour jitter (as timm's create_transform)
