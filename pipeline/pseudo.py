"""Pseudo-labelling: a second training round that adds confident test rows to every fold.

    python run.py pseudo.models=[cnn_deotte]                    # + member cnn_deotte_pl
    python run.py pseudo.models=[cnn_deotte] pseudo.labels=soft pseudo.threshold=0.99

Each model of ``pseudo.models`` gets a round: a model ``<name>_pl`` with the same settings
(``models.<name>_pl`` overrides them, e.g. fewer epochs), added to the ensemble after its base,
trained once the first round is cached (:func:`pipeline.train.stage.run`) and blended like any
other member. The classic semi-supervised recipe (Lee 2013, "Pseudo-Label"), as Kaggle's
Digit Recognizer write-ups use it.

Honest OOF: the member of fold f trains on fold f's training rows plus the test rows whose
combined probability reaches ``pseudo.threshold``, labelled only by the *source* members of fold f
(trained without fold f's rows; seeds averaged). No train row is ever a pseudo row, so no
validated row's label reaches its own fold through the test set. With ``pseudo.blend=mean`` (the
default) fold f's labels depend on fold f's source members alone; another method is fitted on the
OOF rows of the other folds only (as ``stage=blend`` cross-validates a blender).

The source (its members' manifests, the method, the threshold, the label kind) is part of every
round member's cache key (:func:`cache_part`): retraining a source member makes the round stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.errors import ArtifactError, ConfigError
from pipeline.settings import BlendMethod, PseudoLabels, PseudoSettings, checked

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.workspace import Workspace

SUFFIX = "_pl"
log = logging.getLogger(__name__)


def settings(cfg: DictConfig) -> PseudoSettings:
    """The checked ``pseudo`` group (defaults when the config has none)."""
    return checked(PseudoSettings, cfg.get("pseudo"), "pseudo")


def round_name(base: str) -> str:
    """The model name of ``base``'s pseudo-label round: ``<base>_pl``."""
    return base + SUFFIX


def base_model(cfg: DictConfig, name: str) -> str | None:
    """The first-round model that ``name`` is the pseudo-label round of, or None."""
    for base in settings(cfg).models:
        if name == round_name(str(base)):
            return str(base)
    return None


def expand(cfg: DictConfig) -> None:
    """Add each round of ``pseudo.models`` to the config: ``models.<base>_pl`` = the base's
    settings merged with any ``models.<base>_pl`` given, and to ``ensemble`` after its base.
    Settings of a round whose base is not listed (a profile's, with ``pseudo.models=[]``) are
    dropped. Idempotent. Raises ConfigError for an unknown base or a round of a round."""
    s = settings(cfg)
    listed = set(map(str, s.models))
    for name in [str(n) for n in cfg.models]:
        node = cfg.models[name]
        if name.endswith(SUFFIX) and name[:-len(SUFFIX)] not in listed and "arch" not in node:
            with open_dict(cfg):
                del cfg.models[name]
    for base in map(str, s.models):
        if base not in cfg.models:
            raise ConfigError(f"pseudo.models: unknown model '{base}'; known models: "
                              f"{', '.join(sorted(cfg.models))}")
        if base.endswith(SUFFIX) and base[:-len(SUFFIX)] in map(str, s.models):
            raise ConfigError(f"pseudo.models: {base} is itself a pseudo-label round; list its base")
        name = round_name(base)
        own = cfg.models.get(name)
        with open_dict(cfg):
            cfg.models[name] = OmegaConf.merge(cfg.models[base], own or {})
            ens = list(cfg.ensemble)
            if base in ens and name not in ens:
                ens.insert(ens.index(base) + 1, name)
                cfg.ensemble = ens


def source_models(cfg: DictConfig) -> list[str]:
    """``pseudo.source``, or the ensemble's first-round models. Raises ConfigError for an
    unknown model or a pseudo-label round among them."""
    s = settings(cfg)
    names = [str(n) for n in s.source] if s.source else [n for n in map(str, cfg.ensemble)
                                                         if base_model(cfg, n) is None]
    for n in names:
        if n not in cfg.models:
            raise ConfigError(f"pseudo.source: unknown model '{n}'; known models: {', '.join(sorted(cfg.models))}")
        if base_model(cfg, n) is not None:
            raise ConfigError(f"pseudo.source: {n} is a pseudo-label round; the source must be first-round models")
    if not names:
        raise ConfigError("pseudo.source: no first-round model to take the pseudo-labels from")
    return names


@dataclass
class PseudoRows:
    """Fold ``fold``'s pseudo rows.

    Attributes:
        rows: ``(n,)`` int64 indices into the test images, ascending.
        targets: ``(n,)`` int64 class indices (hard labels) or ``(n, C)`` float32 probabilities (soft).
        confidence: ``(n,)`` float32 top combined probability of each row.
        source: the :func:`cache_part` these rows were derived from.
    """

    fold: int
    rows: np.ndarray
    targets: np.ndarray
    confidence: np.ndarray
    source: dict


def _check_source(ws: Workspace, key, fold: int) -> None:
    v = ws.verify(key)
    if not v.ok:
        raise ArtifactError(f"pseudo-labels of fold {fold} need {key}: {v.status.value}, {v.reason} "
                            f"(run: python run.py stage=train model={key.model} fold={key.fold})")


def cache_part(ws: Workspace, fold: int) -> dict:
    """What fold ``fold``'s pseudo rows depend on, for a round member's cache key: the source
    models, a digest of the manifests of the source members used (fold ``fold``'s for ``mean``,
    every fold's for a fitted method), the method (with the ``blend`` settings when fitted), the
    threshold and the label kind. Raises ArtifactError when a source member is not cached."""
    from pipeline.train.members import manifest_sha256, plain

    s = settings(ws.cfg)
    method = BlendMethod(s.blend)
    folds = [fold] if method is BlendMethod.mean else list(range(int(ws.cfg.folds.k)))
    manifests = {}
    for name in source_models(ws.cfg):
        for key in ws.keys(name, folds):
            _check_source(ws, key, fold)
            manifests[f"{key.model}/{key.seed}/{key.fold}"] = manifest_sha256(ws.member_dir(key))
    digest = hashlib.sha256(json.dumps(manifests, sort_keys=True).encode()).hexdigest()[:16]
    part = {"source": source_models(ws.cfg), "blend": method.value, "threshold": float(s.threshold),
            "max_rows": s.max_rows, "labels": PseudoLabels(s.labels).value, "source_digest": digest}
    if method is not BlendMethod.mean:
        from pipeline.settings import BlendSettings

        part["blend_settings"] = plain(checked(BlendSettings, ws.cfg.blend, "blend"))
    return part


def _fold_test(ws: Workspace, name: str, fold: int) -> np.ndarray:
    """``(M, C)`` float32: model ``name``'s fold-``fold`` test probabilities, seeds averaged."""
    from pipeline.train.members import average_probs, read_test

    probs = []
    for key in ws.keys(name, [fold]):
        _check_source(ws, key, fold)
        probs.append(read_test(ws.member_dir(key)))
    return average_probs(probs)


def combined(ws: Workspace, fold: int) -> np.ndarray:
    """``(M, C)`` float32: the source members' combined test probabilities for fold ``fold``,
    computed from members trained without fold ``fold``'s rows only (see the module docstring)."""
    from pipeline.blend.blenders import make_blender
    from pipeline.train.members import BlendMember

    s = settings(ws.cfg)
    names = source_models(ws.cfg)
    x_test = np.stack([_fold_test(ws, n, fold) for n in names], 1)
    if BlendMethod(s.blend) is BlendMethod.mean:
        return x_test.astype(np.float64).mean(1).astype(np.float32)
    x = np.stack([ws.predictions(BlendMember(n)).oof for n in names], 1)
    other = ws.folds != fold
    blender = make_blender(BlendMethod(s.blend), ws.cfg.blend).fit(x[other], ws.comp.y_train[other])
    return blender.predict_proba(x_test).astype(np.float32)


def pseudo_rows(ws: Workspace, fold: int) -> PseudoRows:
    """Fold ``fold``'s pseudo rows: the test rows whose :func:`combined` top probability is
    ``>= pseudo.threshold`` (at most ``pseudo.max_rows`` of them, drawn at random with a seed of
    ``seed`` and the fold), with hard or soft targets (``pseudo.labels``).
    Raises ArtifactError when a source member is not cached."""
    s = settings(ws.cfg)
    probs = combined(ws, fold)
    conf = probs.max(1)
    above = np.flatnonzero(conf >= s.threshold).astype(np.int64)
    rows = above
    if s.max_rows is not None and len(above) > s.max_rows:
        rng = np.random.default_rng([int(ws.cfg.seed), fold])
        rows = np.sort(rng.choice(above, size=s.max_rows, replace=False))
    targets = (probs[rows].argmax(1).astype(np.int64) if PseudoLabels(s.labels) is PseudoLabels.hard
               else (probs[rows] / probs[rows].sum(1, keepdims=True)).astype(np.float32))
    log.info("pseudo: fold %d: %d of %d test rows (%d at >= %.4f; %s labels from %s, %s)", fold, len(rows),
             len(probs), len(above), s.threshold, PseudoLabels(s.labels).value, ", ".join(source_models(ws.cfg)),
             BlendMethod(s.blend).value)
    return PseudoRows(fold, rows, targets, conf[rows].astype(np.float32), cache_part(ws, fold))
