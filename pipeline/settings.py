"""The config schema: typed settings with ranges, checked once when a run starts.

Every group of ``pipeline/conf`` has a dataclass here. :func:`pipeline.config.prepare` merges the
composed config into them (OmegaConf structured configs: types are converted, unknown keys refused) and
then checks each field's range, so a bad override such as ``models.mlp.train.lr=-1`` stops with
one line naming the key and what was expected (:class:`~pipeline.errors.ConfigError`, exit code
2) before any data is read or any model trained. Per-model ``train``/``aug`` overrides are checked
merged over the global groups, exactly as training uses them.

The choices that carry state through the pipeline are enums: :class:`Precision`,
:class:`AugBackend`, :class:`LockMode`, :class:`Pruner`, :class:`BlendMethod`,
:class:`BlendSeeds`, :class:`StackMeta`, :class:`StackFeatures`, :class:`PseudoLabels`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.choices import (  # noqa: F401 - the schema's enums, importable from here too
    Layout,
    Resize,
    SubmissionKind,
    Precision,
    AugBackend,
    FitMethod,
    HeadInit,
    Sampler,
    LockMode,
    FuseMode,
    StreamMode,
    Pruner,
    Metric,
    BlendMethod,
    BlendSeeds,
    StackMeta,
    StackFeatures,
    PseudoLabels,
    AugPreset,
    Dim,
)
from pipeline.errors import ConfigError


def _f(default: Any, **limits: Any) -> Any:
    """A dataclass field with limits: a range (``ge``, ``gt``, ``le``, ``lt``), ``auto`` allowed,
    or ``choices``."""
    return field(default=default, metadata=limits)


@dataclass
class TrainSettings:
    """``train`` (and ``models.<name>.train`` merged over it): what is learned."""

    epochs: int = _f(30, ge=1)                # passes over the k-1 training folds
    min_steps: int = _f(600, ge=0)            # fewer optimizer steps than this raise the epochs (small sets)
    batch_size: int = _f(128, ge=1)           # images per optimizer step
    lr: float = _f(3e-3, gt=0)                # peak one-cycle learning rate (AdamW)
    weight_decay: float = _f(1e-4, ge=0)      # AdamW decoupled weight decay
    warmup_frac: float = _f(0.2, gt=0, lt=1)  # OneCycleLR pct_start
    label_smoothing: float = _f(0.0, ge=0, lt=1)
    precision: Precision = Precision.auto
    ema: float = _f(0.0, ge=0, lt=1)          # EMA decay of the weights (timm ModelEmaV3, warm-up); 0 = off
    swa: float = _f(0.0, ge=0, lt=1)          # SWA: fraction of the final epochs whose weights are averaged; 0 = off
    swa_lr_scale: float = _f(0.05, gt=0, le=1)  # SWA-phase learning rate as a fraction of lr (held constant)
    class_weight: bool = False                # cross-entropy weighted by inverse class frequency of the training rows
    sampler: Sampler = Sampler.shuffle        # balanced: each class drawn equally often (rows with replacement)
    fit: FitMethod = FitMethod.gradient       # gradient (end to end) | linear_probe (frozen features + logistic reg.)
                                              # | top_stages (the top blocks on the frozen body's cached activations)
    top_blocks: int = _f(1, ge=1)             # top_stages: the backbone's last blocks that train
    # pretrained backbones (pipeline/models.py: freeze, parameter_groups):
    freeze_epochs: int = _f(0, ge=0)          # epochs of the new head alone on the frozen body first
    layer_decay: float = _f(1.0, gt=0, le=1)  # each layer group's peak lr x this per group below the head
    frozen_layers: float = _f(0.0, ge=0, lt=1)  # fraction of the lowest layer groups never trained
    head_init: HeadInit = HeadInit.random     # probe: the classifier starts as the linear probe (LP-FT)
    frozen_bn: bool = False                   # BatchNorm normalises with its ImageNet running statistics


@dataclass
class AugSettings:
    """``aug`` (and ``models.<name>.aug`` merged over it); a strength of 0 is off."""

    backend: AugBackend = AugBackend.torch
    rotate: float = _f(0.0, ge=0, le=180)     # degrees
    scale: float = _f(0.0, ge=0, lt=1)        # relative zoom
    shift: float = _f(0.0, ge=0, le=1)        # fraction of the side
    elastic_alpha: float = _f(0.0, ge=0)      # pixels (Simard et al. 2003)
    elastic_sigma: float = _f(4.0, gt=0)      # pixels
    p_affine: float = _f(1.0, ge=0, le=1)
    p_elastic: float = _f(0.5, ge=0, le=1)
    hflip: float = _f(0.0, ge=0, le=1)        # probability of a horizontal flip
    vflip: float = _f(0.0, ge=0, le=1)        # probability of a vertical flip
    rot90: float = _f(0.0, ge=0, le=1)        # probability of a rotation by 90, 180 or 270 degrees (one of the three)
    erase: float = _f(0.0, ge=0, le=1)        # probability of random erasing (Zhong et al. 2017): one rectangle
    erase_area: float = _f(0.25, gt=0, lt=1)  # the erased rectangle's largest area, fraction of the image
    brightness: float = _f(0.0, ge=0, lt=1)   # colour jitter strengths: factor in [1-s, 1+s]
    contrast: float = _f(0.0, ge=0, lt=1)
    saturation: float = _f(0.0, ge=0, lt=1)
    p_color: float = _f(1.0, ge=0, le=1)      # probability of the colour jitter


@dataclass
class TTASettings:
    """``tta`` (and ``models.<name>.tta`` merged over it): deterministic test-time views whose
    probabilities are averaged, for the OOF rows and the test rows alike (0 / false = off)."""

    shifts: int = _f(0, ge=0, le=4)          # pixels: views shifted by +-shifts, horizontally and vertically
    rotations: float = _f(0.0, ge=0, le=45)  # degrees: views rotated by +-rotations
    hflip: bool = False                      # a horizontally mirrored view (photos, not digits)
    dihedral: bool = False                   # the 8 symmetries of the square (cells, aerial, microscopy; never digits)


@dataclass
class RuntimeSettings:
    """``runtime``: how to run; nothing here is part of a member's cache key."""

    device: str = "auto"
    num_workers: Any = _f("auto", auto=True, ge=0)
    eval_batch_size: int = _f(2048, ge=1)
    channels_last: bool = True
    threads: Optional[int] = _f(None, ge=1)
    progress: bool = True
    fold_jobs: Any = _f("auto", auto=True, ge=1)
    lock: LockMode = LockMode.wait
    compile: bool = False          # torch.compile the model
    deterministic: bool = False    # torch deterministic algorithms (exact resume on CPU)
    estimate: bool = True          # time a few steps per model first and log the minutes to go
    val_every: int = _f(1, ge=1)   # validate on the fold every N epochs and after the last (history)
    fuse: FuseMode = FuseMode.auto  # fused members (pipeline/fusion.py): auto | on | off
    fuse_max: int = _f(15, ge=1)    # members per fused group at most
    stream: StreamMode = StreamMode.auto  # a member's images: on the device if they fit, else streamed
    memory_share: float = _f(0.5, gt=0, le=1)  # of available memory, split among side-by-side processes


@dataclass
class FoldsSettings:
    k: int = _f(5, ge=2)
    seed: int = 42
    group: Optional[str] = None  # a train.csv column, or "folder" (folders layout): StratifiedGroupKFold


@dataclass
class DataSettings:
    dir: str = "data/digit-recognizer"
    format: str = _f("auto", choices=("auto", *(x.value for x in Layout)))
    num_classes: Optional[int] = _f(None, ge=2)
    build_offline: Any = "auto"
    id_column: Optional[str] = None
    label_column: Optional[str] = None
    img_size: Optional[int] = _f(None, ge=8)
    max_img_size: int = _f(128, ge=8)
    resize: str = _f("stretch", choices=tuple(x.value for x in Resize))
    channels: str = _f("auto", choices=("auto", "1", "3"))
    submission: str = _f("auto", choices=("auto", *(x.value for x in SubmissionKind)))
    metric: Metric = Metric.accuracy
    decode_jobs: Optional[int] = _f(None, ge=1)


@dataclass
class BlendSettings:
    method: Any = "all"
    models: Optional[list] = None
    seeds: BlendSeeds = BlendSeeds.average
    stack_meta: StackMeta = StackMeta.logistic
    stack_features: StackFeatures = StackFeatures.logprob
    stack_entropy: bool = False
    stack_C: float = _f(1.0, gt=0)
    stack_max_iter: int = _f(1000, ge=10)
    power: float = _f(2.0, gt=0)
    es_size: int = _f(25, ge=1)
    es_init: int = _f(1, ge=1)
    es_bags: int = _f(1, ge=1)
    es_bag_fraction: float = _f(0.5, gt=0, le=1)


@dataclass
class PseudoSettings:
    """``pseudo``: a second training round with confident test rows (:mod:`pipeline.pseudo`)."""

    models: list = field(default_factory=list)  # models that get a round; each adds <name>_pl
    source: Optional[list] = None                # models labelling the rows; null = the ensemble's first round
    blend: BlendMethod = BlendMethod.mean        # how the sources' fold-f test probabilities are combined
    threshold: float = _f(0.995, gt=0, le=1)     # a test row is used when its top probability is >= this
    max_rows: Optional[int] = _f(None, ge=1)     # at most this many per fold, drawn at random (seeded)
    labels: PseudoLabels = PseudoLabels.hard


@dataclass
class TuneSettings:
    n_trials: int = _f(20, ge=1)
    timeout: Optional[float] = _f(None, gt=0)
    folds: Any = field(default_factory=lambda: [0])
    storage: str = "sqlite:///artifacts/optuna.db"
    study_name: Optional[str] = None
    pruner: Pruner = Pruner.median
    pruner_startup_trials: int = _f(3, ge=0)
    pruner_warmup_epochs: int = _f(1, ge=0)
    sampler_seed: Optional[int] = None
    heartbeat_s: int = _f(60, ge=1)
    max_retry: int = _f(2, ge=0)
    top: int = _f(5, ge=1)
    baseline_first: bool = True


@dataclass
class ScreenSettings:
    """``screen``: the recipe chosen by measurement before the k-fold training (:mod:`pipeline.screen`)."""

    enabled: bool = False
    share: float = _f(0.25, gt=0, lt=1)        # of budget= (or of `seconds` without one), at most
    seconds: float = _f(300.0, gt=0)           # the screening's time without budget=
    models: list = field(default_factory=lambda: ["cnn_deotte", "resnet9", "cnn_keras"])  # architectures screened
    augs: list = field(default_factory=lambda: ["affine", "none", "hflip", "dihedral", "elastic", "erase"])
    sides: list = field(default_factory=list)  # candidate sides; [] = the loaded side, its half and quarter (>= 28 px)
    keep: int = _f(2, ge=1)                    # architectures the ensemble keeps, best first
    keep_within: float = _f(2.0, ge=0)         # ...each within this many times the noise of the best
    rows: int = _f(6000, ge=100)               # training rows of the subsample (fold 0's training folds)
    val_rows: int = _f(3000, ge=100)           # validation rows (fold 0)
    epochs: int = _f(3, ge=1)                  # the short schedule of every candidate
    min_steps: int = _f(60, ge=1)              # a small competition's short schedule has at least this many steps
    imbalance: float = _f(2.0, ge=1)           # largest / smallest class count at which the balance is screened
    balances: list = field(default_factory=lambda: ["class_weight", "sampler"])  # ...these against none (Balance)
    pruner: Pruner = Pruner.successive_halving
    fixed: list = field(default_factory=list)  # dimensions set by hand (side, arch, aug, balance): not screened
    pretrained: list = field(default_factory=list)  # pretrained candidates (names under models), arch study
    pretrained_side: int = _f(128, ge=32)      # their side: the loaded side, at most this (below 64: not screened)
    pretrained_share: float = _f(0.3, gt=0, lt=1)  # the share when pretrained candidates are screened (>= share)
    pretrained_augs: list = field(default_factory=lambda: ["photo"])  # presets tried on a pretrained winner


@dataclass
class PredictSettings:
    output: Optional[str] = None
    top_k: int = _f(3, ge=1)
    preprocess: str = _f("auto", choices=("auto", "mnist", "resize"))


# The packages (and minimum versions) an export expects the target image (Kaggle's Python image)
# to provide; stage=export ships the wheels of every other requirement of kfold-stack, transitively.
KAGGLE_IMAGE = ("torch>=2.2", "timm>=1.0", "albumentations>=2.0", "scikit-learn>=1.3", "scipy>=1.10", "numpy>=1.25",
                "pandas>=2.0", "optuna>=4.0", "joblib>=1.4", "filelock>=3.12", "tqdm>=4.60", "matplotlib>=3.7",
                "pillow>=10", "safetensors>=0.4", "PyYAML>=5.1", "packaging>=17")


@dataclass
class ExportSettings:
    """``export``: the folder ``stage=export`` writes and ``stage=submit`` reads (pipeline/export.py)."""

    dir: str = "export"                # the export folder (a Kaggle dataset); stage=submit reads it
    zip: bool = True                   # also write <dir>.zip (upload it as the dataset)
    wheels: bool = True                # build <dir>/wheels: kfold-stack's wheel and every requirement not in `image`
    image: list = field(default_factory=lambda: list(KAGGLE_IMAGE))  # what the target image provides (name>=min)
    dependencies: list = field(default_factory=list)  # more wheels to ship beyond that closure
    dataset_id: Optional[str] = None   # dataset-metadata.json id <user>/<slug>; null: INSERT_USERNAME/kfold-stack-<data>
    title: Optional[str] = None        # the dataset's title (6-50 characters); null: from the members


@dataclass
class SubmitSettings:
    """``submit``: the submission of an export on a competition's test side (pipeline/submit.py)."""

    output: str = "submission.csv"   # where submission.csv is written
    default_row: bool = False         # an undecodable test image gets sample_submission.csv's row (counted in the log)


GROUPS: dict[str, type] = {
    "train": TrainSettings, "aug": AugSettings, "tta": TTASettings, "runtime": RuntimeSettings,
    "folds": FoldsSettings, "data": DataSettings, "blend": BlendSettings, "tune": TuneSettings,
    "predict": PredictSettings, "pseudo": PseudoSettings, "screen": ScreenSettings, "export": ExportSettings,
    "submit": SubmitSettings,
}
MODEL_KEYS = ("arch", "kwargs", "train", "aug", "tta", "seeds", "space", "ranges")
SPACE_ROOTS = ("kwargs", "train", "aug")  # the model keys a search space (and a tuned file) may set
BUILD_OFFLINE = ("auto", "true", "false")


def _structured(schema: type, node: Any, where: str):
    """``node`` merged into ``schema``; ConfigError (one line) for a wrong type or unknown key."""
    try:
        if isinstance(node, DictConfig):  # interpolations resolve against the whole config
            node = OmegaConf.to_container(node, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node or {}))
    except OmegaConfBaseException as e:
        key = f"{where}.{e.full_key}" if getattr(e, "full_key", None) else where
        if isinstance(e, ConfigKeyError):
            known = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(f"{key}: unknown setting (expected one of {known})") from None
        value = getattr(e, "value", None)
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        shown = f"={value}" if value is not None else ""
        raise ConfigError(f"{key}{shown}: {msg}") from None


def _check_limits(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value, lim = getattr(obj, f.name), f.metadata
        if not lim or value is None:
            continue
        key = f"{where}.{f.name}={value}"
        if "choices" in lim:
            if str(value) not in lim["choices"]:
                raise ConfigError(f"{key}: expected one of {', '.join(lim['choices'])}")
            continue
        if lim.get("auto") and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = int(value) if lim.get("auto") else value
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected auto or an integer >= {lim['ge']}") from None
        expect = " and ".join(f"{op} {lim[name]}" for name, op in
                              (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if name in lim)
        ok = all((name not in lim) or test(value, lim[name]) for name, test in (
            ("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b),
            ("le", lambda v, b: v <= b), ("lt", lambda v, b: v < b)))
        if not ok:
            prefix = "auto or " if lim.get("auto") else ""
            raise ConfigError(f"{key}: expected {prefix}{expect}")


def checked(schema: type, node: Any, where: str):
    """``node`` as a ``schema`` dataclass instance, types converted and ranges checked.

    Raises:
        ConfigError: one line naming ``where.<key>``, the value and what was expected.
    """
    obj = _structured(schema, node, where)
    _check_limits(obj, where)
    return obj


def model_group(cfg: DictConfig, name: str, group: str) -> DictConfig:
    """The global ``train``/``aug`` group with ``models.<name>.<group>`` merged over it (plain,
    not struct: a key the schema lacks is reported by :func:`checked`, naming the model)."""
    own = cfg.models[name].get(group)
    return OmegaConf.merge(OmegaConf.to_container(cfg[group], resolve=True),
                           OmegaConf.to_container(own, resolve=True) if own else {})


def train_settings(cfg: DictConfig, name: str) -> TrainSettings:
    """The checked training settings of model ``name`` (global ``train`` + its overrides).
    Raises ConfigError for a bad value, or for ``ema`` and ``swa`` both on (one weight average)."""
    t = checked(TrainSettings, model_group(cfg, name, "train"), f"models.{name}.train")
    if t.ema and t.swa:
        raise ConfigError(f"models.{name}.train: ema={t.ema} and swa={t.swa}: expected at most one "
                          f"weight average (set the other to 0)")
    return t


def aug_settings(cfg: DictConfig, name: str) -> AugSettings:
    """The checked augmentation settings of model ``name`` (global ``aug`` + its overrides)."""
    return checked(AugSettings, model_group(cfg, name, "aug"), f"models.{name}.aug")


def tta_settings(cfg: DictConfig, name: str) -> TTASettings:
    """The checked test-time augmentation of model ``name`` (global ``tta`` + its overrides)."""
    return checked(TTASettings, model_group(cfg, name, "tta"), f"models.{name}.tta")


def seed_count(cfg: DictConfig, name: str) -> int:
    """How many seeds model ``name`` trains per fold: ``models.<name>.seeds``, else ``seeds``.
    Raises ConfigError below 1."""
    own = cfg.models[name].get("seeds")
    n = own if own is not None else cfg.get("seeds", 1)
    try:
        n = int(n)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        where = f"models.{name}.seeds" if own is not None else "seeds"
        raise ConfigError(f"{where}={own if own is not None else cfg.get('seeds')}: expected an integer >= 1")
    return n


@dataclass
class RangeSettings:
    """``models.<name>.ranges``: what ``budget=`` may plan for a model (:mod:`pipeline.budget`):
    epochs ``[lo, hi]`` and seeds ``[lo, hi]``; ``null`` = the defaults of :func:`plan_ranges`."""

    epochs: Optional[list] = None
    seeds: Optional[list] = None


def plan_ranges(cfg: DictConfig, name: str, epochs: int, seeds: int) -> tuple[int, int, int, int]:
    """Model ``name``'s planning ranges ``(epochs_lo, epochs_hi, seeds_lo, seeds_hi)`` from
    ``models.<name>.ranges``; defaults: epochs ``[1, ceil(1.5 x train.epochs)]``, seeds
    ``[1, seeds]`` (``epochs`` / ``seeds``: the model's configured values).

    Raises:
        ConfigError: not two integers ``1 <= lo <= hi`` (one line naming the key).
    """
    r = checked(RangeSettings, cfg.models[name].get("ranges"), f"models.{name}.ranges")
    out = []
    for key, default in (("epochs", [1, max(1, -(-3 * epochs // 2))]), ("seeds", [1, seeds])):
        value = getattr(r, key)
        value = default if value is None else value
        try:
            lo, hi = (int(v) for v in value)
        except (TypeError, ValueError):
            lo = hi = 0
        if not 1 <= lo <= hi:
            raise ConfigError(f"models.{name}.ranges.{key}={value}: expected [lo, hi] with 1 <= lo <= hi")
        out += [lo, hi]
    return tuple(out)


def runtime_settings(cfg: DictConfig) -> RuntimeSettings:
    """The checked ``runtime`` group."""
    return checked(RuntimeSettings, cfg.runtime, "runtime")


def export_settings(cfg: DictConfig) -> ExportSettings:
    """The checked ``export`` group (defaults when the config has none)."""
    return checked(ExportSettings, cfg.get("export"), "export")


def submit_settings(cfg: DictConfig) -> SubmitSettings:
    """The checked ``submit`` group (defaults when the config has none)."""
    return checked(SubmitSettings, cfg.get("submit"), "submit")


def selected_models(cfg: DictConfig) -> list[str]:
    """Models a stage runs on: ``model=NAME`` if set (not ``all``), else ``ensemble``.

    Raises ConfigError for an empty ensemble or a name with no entry under ``models``.
    """
    names = list(cfg.ensemble) if cfg.model in (None, "all") else [str(cfg.model)]
    if not names:
        raise ConfigError("ensemble is empty: list at least one model under 'ensemble'")
    for n in names:
        if n not in cfg.models:
            raise ConfigError(f"unknown model '{n}'; known models: {', '.join(sorted(cfg.models))}")
    return names


def selected_folds(cfg: DictConfig) -> list[int]:
    """Folds a stage runs on: every fold for ``fold=all``, else the one given (0..k-1)."""
    k = int(cfg.folds.k)
    if cfg.fold in (None, "all"):
        return list(range(k))
    try:
        f = int(cfg.fold)
    except (TypeError, ValueError):
        raise ConfigError(f"fold={cfg.fold}: expected 'all' or an integer 0..{k - 1}") from None
    if not 0 <= f < k:
        raise ConfigError(f"fold={f}: expected 'all' or an integer 0..{k - 1} (folds.k={k})")
    return [f]


def blend_settings(cfg: DictConfig) -> BlendSettings:
    """The checked ``blend`` group."""
    return checked(BlendSettings, cfg.blend, "blend")


def blend_methods(cfg: DictConfig) -> list[BlendMethod]:
    """``blend.method`` (``all``, one name or a list) as :class:`BlendMethod` values."""
    m = cfg.blend.method
    raw = [x.value for x in BlendMethod] if m == "all" else ([str(m)] if isinstance(m, str) else list(m))
    known = ", ".join(x.value for x in BlendMethod)
    out = []
    for x in raw:
        try:
            out.append(BlendMethod(str(x)))
        except ValueError:
            raise ConfigError(f"blend.method={x}: expected all or one of {known}") from None
    if not out:
        raise ConfigError(f"blend.method=[]: expected all or one of {known}")
    return out


def blend_models(cfg: DictConfig) -> list[str]:
    """``blend.models`` (default: the selected models), each checked against ``models``."""
    names = list(cfg.blend.models) if cfg.blend.models else selected_models(cfg)
    for n in names:
        if n not in cfg.models:
            raise ConfigError(f"blend.models: unknown model '{n}'; known models: "
                              f"{', '.join(sorted(cfg.models))}")
    return names


PSEUDO_SUFFIX = "_pl"  # a pseudo-label round of model <base> is the model <base>_pl


def pseudo_settings(cfg: DictConfig) -> PseudoSettings:
    """The checked ``pseudo`` group (defaults when the config has none)."""
    return checked(PseudoSettings, cfg.get("pseudo"), "pseudo")


def round_name(base: str) -> str:
    """The model name of ``base``'s pseudo-label round: ``<base>_pl``."""
    return base + PSEUDO_SUFFIX


def round_base(cfg: DictConfig, name: str) -> str | None:
    """The first-round model that model ``name`` is the pseudo-label round of, or None."""
    for base in pseudo_settings(cfg).models:
        if name == round_name(str(base)):
            return str(base)
    return None


def pseudo_sources(cfg: DictConfig) -> list[str]:
    """``pseudo.source``, or the ensemble's first-round models: the models whose test
    predictions label a round's rows. Raises ConfigError for an unknown model or a pseudo-label
    round among them."""
    s = pseudo_settings(cfg)
    names = [str(n) for n in s.source] if s.source else [n for n in map(str, cfg.ensemble)
                                                         if round_base(cfg, n) is None]
    for n in names:
        if n not in cfg.models:
            raise ConfigError(f"pseudo.source: unknown model '{n}'; known models: {', '.join(sorted(cfg.models))}")
        if round_base(cfg, n) is not None:
            raise ConfigError(f"pseudo.source: {n} is a pseudo-label round; the source must be first-round models")
    if not names:
        raise ConfigError("pseudo.source: no first-round model to take the pseudo-labels from")
    return names


def screen_fixed(s: ScreenSettings) -> frozenset[Dim]:
    """``screen.fixed`` as dimensions. Raises ConfigError naming an unknown one."""
    try:
        return frozenset(Dim(str(d)) for d in s.fixed)
    except ValueError:
        raise ConfigError(f"screen.fixed={list(s.fixed)}: expected dimensions among "
                          f"{', '.join(d.value for d in Dim)}") from None


def screen_augs(s: ScreenSettings) -> list[AugPreset]:
    """``screen.augs`` as presets (the first is the baseline). Raises ConfigError naming an unknown one."""
    try:
        augs = [AugPreset(str(a)) for a in s.augs]
    except ValueError:
        raise ConfigError(f"screen.augs={list(s.augs)}: expected presets among "
                          f"{', '.join(a.value for a in AugPreset)}") from None
    if not augs:
        raise ConfigError("screen.augs is empty: give at least one preset, e.g. screen.augs=[affine]")
    return augs


def tune_folds(s: TuneSettings, k: int) -> list[int]:
    """``tune.folds`` as a list of fold indices, each checked against ``folds.k`` (``k``)."""
    raw = s.folds
    fl = [raw] if isinstance(raw, int) else list(raw)
    if not fl:
        raise ConfigError("tune.folds is empty: give at least one fold index, e.g. tune.folds=[0]")
    for f in fl:
        if not isinstance(f, int) or not 0 <= f < k:
            raise ConfigError(f"tune.folds={list(fl)}: expected fold indices 0..{k - 1} (folds.k={k})")
    return fl
