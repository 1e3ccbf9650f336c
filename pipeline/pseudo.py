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

Before a round trains, ``stage=train`` writes each fold's rows to
``artifacts/pseudo/<round>/fold<k>.npz`` (:func:`write_rows`, a stage output); the file's sha256,
with the sources, method, threshold and label kind, is part of every round member's cache key
(:meth:`pipeline.workspace.Workspace.pseudo_part`): rows re-derived from a retrained source make
the round stale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pipeline.errors import ArtifactError
from pipeline.io import save_npz
from pipeline.settings import BlendMethod, PseudoLabels

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class PseudoRows:
    """Fold ``fold``'s pseudo rows.

    Attributes:
        rows: ``(n,)`` int64 indices into the test images, ascending.
        targets: ``(n,)`` int64 class indices (hard labels) or ``(n, C)`` float32 probabilities (soft).
        confidence: ``(n,)`` float32 top combined probability of each row.
    """

    fold: int
    rows: np.ndarray
    targets: np.ndarray
    confidence: np.ndarray


def _check_source(ws: Workspace, key, fold: int) -> None:
    v = ws.verify(key)
    if not v.ok:
        raise ArtifactError(f"pseudo-labels of fold {fold} need {key}: {v.status.value}, {v.reason} "
                            f"(run: python run.py stage=train model={key.model} fold={key.fold})")


def _fold_test(ws: Workspace, name: str, fold: int) -> np.ndarray:
    """``(M, C)`` float32: model ``name``'s fold-``fold`` test probabilities, seeds averaged."""
    from pipeline.members import average_probs, read_test

    probs = []
    for key in ws.keys(name, [fold]):
        _check_source(ws, key, fold)
        probs.append(read_test(ws.member_dir(key)))
    return average_probs(probs)


def combined(ws: Workspace, fold: int) -> np.ndarray:
    """``(M, C)`` float32: the source members' combined test probabilities for fold ``fold``,
    computed from members trained without fold ``fold``'s rows only (see the module docstring)."""
    from pipeline.blend.blenders import make_blender
    from pipeline.members import BlendMember

    s = ws.settings.pseudo
    names = list(ws.settings.pseudo_sources)
    x_test = np.stack([_fold_test(ws, n, fold) for n in names], 1)
    if BlendMethod(s.blend) is BlendMethod.mean:
        return x_test.astype(np.float64).mean(1).astype(np.float32)
    x = np.stack([ws.predictions(BlendMember(n)).oof for n in names], 1)
    other = ws.folds != fold
    blender = make_blender(BlendMethod(s.blend), ws.settings.blend).fit(x[other], ws.comp.y_train[other])
    return blender.predict_proba(x_test).astype(np.float32)


def pseudo_rows(ws: Workspace, fold: int) -> PseudoRows:
    """Fold ``fold``'s pseudo rows: the test rows whose :func:`combined` top probability is
    ``>= pseudo.threshold`` (at most ``pseudo.max_rows`` of them, drawn at random with a seed of
    ``seed`` and the fold), with hard or soft targets (``pseudo.labels``).
    Raises ArtifactError when a source member is not cached."""
    s = ws.settings.pseudo
    probs = combined(ws, fold)
    conf = probs.max(1)
    above = np.flatnonzero(conf >= s.threshold).astype(np.int64)
    rows = above
    if s.max_rows is not None and len(above) > s.max_rows:
        rng = np.random.default_rng([ws.settings.base_seed, fold])
        rows = np.sort(rng.choice(above, size=s.max_rows, replace=False))
    targets = (probs[rows].argmax(1).astype(np.int64) if PseudoLabels(s.labels) is PseudoLabels.hard
               else (probs[rows] / probs[rows].sum(1, keepdims=True)).astype(np.float32))
    log.info("pseudo: fold %d: %d of %d test rows (%d at >= %.4f; %s labels from %s, %s)", fold, len(rows),
             len(probs), len(above), s.threshold, PseudoLabels(s.labels).value, ", ".join(ws.settings.pseudo_sources),
             BlendMethod(s.blend).value)
    return PseudoRows(fold, rows, targets, conf[rows].astype(np.float32))


def write_rows(ws: Workspace, model: str, fold: int) -> Path:
    """Compute fold ``fold``'s pseudo rows for round ``model`` (:func:`pseudo_rows`) and write
    them, atomically, to ``artifacts/pseudo/<model>/fold<k>.npz`` (``rows (n,) int64``,
    ``targets``, ``confidence (n,) float32``): the stage output a round member trains on, whose
    sha256 is part of its cache key (:meth:`pipeline.workspace.Workspace.member_config`).
    Raises ArtifactError when a source member is not cached."""
    p = pseudo_rows(ws, fold)
    path = ws.paths.pseudo_rows(model, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_npz(path, rows=p.rows, targets=p.targets, confidence=p.confidence)


def read_rows(path: Path, fold: int) -> PseudoRows:
    """The pseudo rows :func:`write_rows` wrote (read without pickle). Raises ArtifactError when
    the file is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return PseudoRows(fold, z["rows"], z["targets"], z["confidence"])
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path}: pseudo rows missing or unreadable ({type(e).__name__}); "
                            f"run: python run.py stage=train") from None


def prepare_rounds(ws: Workspace, keys) -> None:
    """Write the pseudo rows of every (round, fold) among the member keys ``keys``."""
    for model, fold in sorted({(k.model, k.fold) for k in keys if ws.settings.models[k.model].base}):
        write_rows(ws, model, fold)
