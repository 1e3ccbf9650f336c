"""The recipe a screening chose (:mod:`pipeline.screen`): its types, its record under
``artifacts/screening/``, its key, and the overrides that fix a dimension.

A :class:`Recipe` holds the screened dimensions only (:class:`~pipeline.choices.Dim`): the input
side, the ensemble's architectures, the augmentation preset, class weighting. A dimension the
command line set (``screen.fixed``, filled from the overrides by :func:`fixed_dims`) is never
screened, so a recipe never overrides a setting given by hand. :func:`pipeline.config.prepare`
applies the record that matches the run (:func:`screening_key`) to the config it prepares
(:func:`pipeline.config.apply_recipe`), so every stage after the screening (train, blend, report,
predict, export) sees the same recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from pipeline.choices import AugPreset, Balance, Dim
from pipeline.errors import ArtifactError, ConfigError
from pipeline.io import save_json
from pipeline.settings import AugSettings, ScreenSettings

if TYPE_CHECKING:
    from pipeline.runsettings import RunSettings

log = logging.getLogger(__name__)

DEFAULT_AFFINE = {"rotate": 10.0, "scale": 0.1, "shift": 0.1}  # when the configured aug has no affine part
DEFAULT_ELASTIC = 34.0  # pixels (Simard et al. 2003), when the configured aug has none
ERASE_P = 0.5           # random erasing's probability in the ``erase`` preset (Zhong et al. 2017 use 0.5)
# the photo preset: a random-resized-crop-like zoom, flips and colour jitter (as timm's create_transform:
# RandomResizedCrop, hflip, ColorJitter 0.4)
PHOTO = {"scale": 0.25, "hflip": 0.5, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3}
_OFF = {"elastic_alpha": 0.0, "hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "erase": 0.0}


def preset_values(preset: AugPreset, configured: AugSettings) -> dict[str, float]:
    """The ``aug`` values of ``preset`` over the ``configured`` augmentation: its affine strengths
    (or :data:`DEFAULT_AFFINE` when it has none) and its colour jitter kept, every other part off
    unless the preset adds it. ``dihedral`` draws uniformly from the 8 symmetries of the square
    (a horizontal flip with probability 0.5, then 0, 90, 180 or 270 degrees); ``photo`` widens
    the zoom and adds flips and colour jitter (:data:`PHOTO`)."""
    affine = {k: float(getattr(configured, k)) for k in DEFAULT_AFFINE}
    if not any(affine.values()):
        affine = dict(DEFAULT_AFFINE)
    if preset is AugPreset.none:
        return {**dict.fromkeys(DEFAULT_AFFINE, 0.0), **_OFF}
    extra = {AugPreset.affine: {}, AugPreset.hflip: {"hflip": 0.5},
             AugPreset.dihedral: {"hflip": 0.5, "rot90": 0.75},
             AugPreset.elastic: {"elastic_alpha": float(configured.elastic_alpha) or DEFAULT_ELASTIC},
             AugPreset.erase: {"erase": ERASE_P}, AugPreset.photo: PHOTO}[preset]
    return {**affine, **_OFF, **extra}


@dataclass(frozen=True)
class Recipe:
    """What a screening chose; ``None`` / ``()``: that dimension was not screened (fixed, or one
    candidate only) and stays as configured.

    Attributes:
        side: ``data.img_size`` in pixels; models: the ensemble's architectures, best first;
        aug: the augmentation preset of every model of the ensemble; balance: how every model
        of the ensemble meets imbalanced classes (``train.class_weight``, ``train.sampler``).
    """

    side: int | None = None
    models: tuple[str, ...] = ()
    aug: AugPreset | None = None
    balance: Balance | None = None

    def describe(self) -> str:
        """One line: the chosen values of the screened dimensions."""
        parts = [f"side {self.side} px" if self.side else None,
                 f"ensemble [{', '.join(self.models)}]" if self.models else None,
                 f"aug {self.aug.value}" if self.aug else None,
                 None if self.balance is None else f"balance {self.balance.value}"]
        return ", ".join(p for p in parts if p) or "nothing: every setting as configured"


@dataclass(frozen=True)
class Candidate:
    """One screened configuration: a model (a name under ``models``) at ``side`` pixels with the
    ``aug`` preset (None: the model's configured augmentation) and its ``balance``."""

    model: str
    side: int
    aug: AugPreset | None = None
    balance: Balance = Balance.none

    def label(self) -> str:
        aug = self.aug.value if self.aug else "configured"
        extra = {Balance.none: "", Balance.class_weight: " class-weighted", Balance.sampler: " balanced-sampler"}
        return f"{self.model} {self.side}px aug={aug}{extra[self.balance]}"


class TrialState(str, Enum):
    """How a candidate's trial ended."""

    complete = "complete"   # every epoch of the short schedule
    pruned = "pruned"       # stopped by successive halving (worse than the others at a rung)
    stopped = "stopped"     # the screening's share ran out during it
    skipped = "skipped"     # not started: its timed estimate did not fit in the share left
    failed = "failed"       # diverged (NaN loss) or did not fit the data


@dataclass(frozen=True)
class TrialRecord:
    """One row of the screening table: the dimension screened, the candidate, how it ended, its
    objective on the validation subsample (:func:`pipeline.tune.study.objective_value`; None when
    it did not complete), its accuracy, the epochs it ran and its wall seconds."""

    dim: Dim
    candidate: Candidate
    state: TrialState
    score: float | None
    accuracy: float | None
    epochs: int
    seconds: float

    def to_json(self) -> dict:
        c = self.candidate
        return {"dim": self.dim.value, "model": c.model, "side": c.side, "aug": c.aug.value if c.aug else None,
                "balance": c.balance.value, "state": self.state.value, "score": self.score,
                "accuracy": self.accuracy, "epochs": self.epochs, "seconds": self.seconds}

    @classmethod
    def from_json(cls, j: dict) -> "TrialRecord":
        c = Candidate(str(j["model"]), int(j["side"]), AugPreset(j["aug"]) if j.get("aug") else None,
                      Balance(j["balance"]))
        return cls(Dim(j["dim"]), c, TrialState(j["state"]), _opt_float(j.get("score")),
                   _opt_float(j.get("accuracy")), int(j["epochs"]), float(j["seconds"]))


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def screen_balances(s: ScreenSettings) -> list[Balance]:
    """``screen.balances`` as :class:`~pipeline.choices.Balance` values, screened against none.
    Raises ConfigError naming an unknown one."""
    try:
        return [Balance(str(b)) for b in s.balances if Balance(str(b)) is not Balance.none]
    except ValueError:
        raise ConfigError(f"screen.balances={list(s.balances)}: expected values among "
                          f"{', '.join(b.value for b in Balance if b is not Balance.none)}") from None


@dataclass(frozen=True)
class Screening:
    """``artifacts/screening/<key>.json``: a screening's trials, its choice and why.

    Attributes:
        key: :func:`screening_key` of the run it was made for; recipe: the choice;
        trials: the table, in the order run; reasons: one line per screened dimension;
        share_seconds: the time it was allowed; seconds: the time it took; rows / val_rows:
        the subsample's training and validation rows; fixed: the dimensions set by hand;
        pretrained: whether pretrained candidates were screened (its share was
        ``screen.pretrained_share``, :func:`screen_share`).
    """

    key: str
    recipe: Recipe
    trials: tuple[TrialRecord, ...]
    reasons: tuple[str, ...]
    share_seconds: float
    seconds: float
    rows: int
    val_rows: int
    fixed: tuple[Dim, ...] = field(default=())
    pretrained: bool = False

    @property
    def complete(self) -> bool:
        """Every trial ran to its end or was pruned: none stopped or skipped when the share ran out."""
        return not any(t.state in (TrialState.stopped, TrialState.skipped) for t in self.trials)

    def table(self) -> str:
        """The screening table as log lines: dimension, candidate, state, score, epochs, seconds."""
        rows = [f"  {t.dim.value:8s} {t.candidate.label():44s} {t.state.value:9s} "
                f"{'' if t.score is None else f'{t.score:.4f}':>7s} {t.epochs:3d} ep {t.seconds:6.1f} s"
                for t in self.trials]
        head = (f"  (fold 0: {self.rows} training / {self.val_rows} validation rows; "
                f"{self.seconds:.0f} s of a {self.share_seconds:.0f} s share)")
        return "\n".join([head, *rows, *(f"  -> {r}" for r in self.reasons), f"  chosen: {self.recipe.describe()}"])

    def to_json(self) -> dict:
        r = self.recipe
        return {"key": self.key, "recipe": {"side": r.side, "models": list(r.models),
                                            "aug": r.aug.value if r.aug else None,
                                            "balance": r.balance.value if r.balance else None},
                "trials": [t.to_json() for t in self.trials], "reasons": list(self.reasons),
                "share_seconds": self.share_seconds, "seconds": self.seconds, "rows": self.rows,
                "val_rows": self.val_rows, "fixed": [d.value for d in self.fixed], "pretrained": self.pretrained}

    @classmethod
    def from_json(cls, j: dict) -> "Screening":
        r = j["recipe"]
        recipe = Recipe(None if r.get("side") is None else int(r["side"]), tuple(map(str, r.get("models") or ())),
                        AugPreset(r["aug"]) if r.get("aug") else None,
                        Balance(r["balance"]) if r.get("balance") else None)
        return cls(str(j["key"]), recipe, tuple(TrialRecord.from_json(t) for t in j["trials"]),
                   tuple(map(str, j.get("reasons") or ())), float(j["share_seconds"]), float(j["seconds"]),
                   int(j["rows"]), int(j["val_rows"]), tuple(Dim(d) for d in j.get("fixed") or ()),
                   bool(j.get("pretrained", False)))


def save_screening(path: Path, screening: Screening) -> None:
    """Write ``screening`` to ``path`` atomically (a temp file renamed)."""
    save_json(path, screening.to_json())


def read_screening(path: Path) -> Screening | None:
    """The screening at ``path``, or None when there is none. Raises ArtifactError (one line)
    when it is not a screening this code wrote."""
    if not path.exists():
        return None
    try:
        return Screening.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable screening ({type(e).__name__}: {e}); delete it to screen "
                            f"again") from None


# The command line's overrides that fix a dimension (prefixes of the override's key).
FIXING = {
    Dim.side: ("data.img_size",),
    Dim.arch: ("ensemble", "model"),
    Dim.aug: ("aug",),
    Dim.balance: ("train.class_weight", "train.sampler"),
}


def fixed_dims(overrides: Iterable[str]) -> list[Dim]:
    """The dimensions a list of Hydra overrides (``key=value``, ``+key=value``, ``group=option``)
    sets by hand: ``data.img_size`` the side; ``ensemble``, ``model=<name>`` or any
    ``models.<name>.arch`` the architectures (a model's ``kwargs`` are its settings as a candidate); ``aug`` or ``models.<name>.aug`` the
    augmentation; ``train.class_weight`` or ``train.sampler`` (or a model's own) the balance."""
    out = []
    for raw in overrides:
        key, _, value = raw.lstrip("+~").partition("=")
        parts = key.split(".")
        if parts[0] == "models" and len(parts) >= 3:  # models.<name>.<rest>
            key = "model" if parts[2] == "arch" else ".".join(parts[2:])
        for dim, prefixes in FIXING.items():
            hit = any(key == p or key.startswith(p + ".") for p in prefixes)
            if dim is Dim.arch and key == "model" and value.strip() == "all":
                hit = False
            if hit and dim not in out:
                out.append(dim)
    return out


@dataclass(frozen=True)
class MeasuredOn:
    """What a screening's numbers depend on beyond its settings: the competition's input files
    (``data``: :func:`pipeline.data.source_digest`) and the kind of device it timed and trained
    on (``device``: :func:`pipeline.device.device_kind`)."""

    data: str
    device: str


def screening_key(settings: "RunSettings", on: MeasuredOn) -> str:
    """A short digest of what a screening depends on and a recipe does not change: the settings'
    part (:func:`pipeline.runsettings.screening_basis`: the data's files and their decoding, the
    metric, the folds, the base seed, the ``screen`` settings but its time share, the screened
    models' architectures), the data's files and the device kind it measured on (``on``). Equal
    before and after the recipe is applied, so a rerun (another stage, a larger budget after a
    complete screening) finds the same record."""
    parts = {"settings": settings.screening_basis, "files": on.data, "device": on.device}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def screen_share(screen: ScreenSettings, budget: float | None, pretrained: bool) -> float:
    """A screening's time in seconds: ``screen.share`` of ``budget=`` (seconds), else of
    ``screen.seconds``; ``screen.pretrained_share`` instead when ``pretrained`` candidates are
    screened too (their trials cost more)."""
    fraction = max(screen.share, screen.pretrained_share) if pretrained else screen.share
    return fraction * (budget if budget is not None else screen.seconds)


def screened(settings: "RunSettings", on: MeasuredOn) -> Screening | None:
    """The screening made for the run of ``settings`` (``artifacts/screening/<key>.json``,
    :func:`screening_key` on ``on``), or None: also when that screening was cut short (a trial
    stopped or skipped, :attr:`Screening.complete`) and this run's share (:func:`screen_share` of
    its ``screen`` settings and ``budget``) is larger than the one it had: such a run screens
    again (one log line says so). Raises ArtifactError for an unreadable one."""
    path = settings.paths.screening(screening_key(settings, on))
    found = read_screening(path)
    if found is not None and not found.complete:
        share = screen_share(settings.screen, settings.budget, found.pretrained)
        if share > found.share_seconds + 1.0:
            log.info("screen: %s was cut short in a %.0f s share; this run's %.0f s share screens again", path,
                     found.share_seconds, share)
            return None
    return found
