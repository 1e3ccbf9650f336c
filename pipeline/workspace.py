"""The run's shared state: the competition and folds loaded once, member keys computed once.

``stage=all`` builds one :class:`Workspace` and hands it to every stage and every side-by-side
fold worker; a single stage builds its own. Each member's cache key is computed once per run and
verified (sha256 of its files) at most once per run: a member written in this run is recorded as
verified by its writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from pipeline import data
from pipeline.folds import ensure_folds, folds_digest
from pipeline.paths import Paths
from pipeline.train import members
from pipeline.settings import Precision, runtime_settings, seed_count, train_settings
from pipeline.train.members import BlendMember, MemberKey, MemberPredictions, Verification


@dataclass
class Workspace:
    """The composed config, its paths, the loaded competition and the fold assignment.

    Attributes:
        comp: the competition (``x_train (N, 1, S, S) uint8``, ``y_train (N,) int64``, ...).
        folds: ``(N,)`` int64 fold of each training row; ``folds_digest``: its short sha256.
    """

    cfg: DictConfig
    paths: Paths
    comp: data.Competition
    folds: np.ndarray
    folds_digest: str
    _configs: dict = field(default_factory=dict, repr=False)
    _verified: dict = field(default_factory=dict, repr=False)
    _predictions: dict = field(default_factory=dict, repr=False)
    _pseudo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, cfg: DictConfig) -> "Workspace":
        """Load (building the offline default if needed) the competition and its folds.

        Raises DataError / ConfigError / ArtifactError as :func:`pipeline.data.load` and
        :func:`pipeline.folds.ensure_folds` do."""
        from pipeline import pseudo
        from pipeline.metrics import check_metric

        pseudo.expand(cfg)  # idempotent; run_stage has done it already
        comp = data.load(cfg)
        check_metric(cfg.data.metric, comp.num_classes)
        folds = ensure_folds(cfg, comp.y_train, comp.fingerprint)
        return cls(cfg, Paths.from_cfg(cfg), comp, folds, folds_digest(folds))

    def seeds(self, name: str) -> list[int]:
        """The seed indices of model ``name`` (``models.<name>.seeds`` or ``seeds``)."""
        return list(range(seed_count(self.cfg, name)))

    def keys(self, name: str, folds: list[int] | None = None, seed: int | None = None) -> list[MemberKey]:
        """The members of model ``name``: one per seed (or only ``seed``) and fold (all
        ``folds.k`` folds by default), seed by seed."""
        fl = range(int(self.cfg.folds.k)) if folds is None else folds
        return [MemberKey(name, f, s) for s in (self.seeds(name) if seed is None else [seed]) for f in fl]

    def member_dir(self, key: MemberKey) -> Path:
        return self.paths.fold_dir(key.model, key.fold, key.seed)

    def member_config(self, key: MemberKey) -> DictConfig:
        """The member's cache key (:func:`pipeline.train.members.member_config`), computed once;
        a pseudo-label round's includes its source (ArtifactError while a source member is not
        cached)."""
        if key not in self._configs:
            from pipeline import pseudo

            part = pseudo.cache_part(self, key.fold) if pseudo.base_model(self.cfg, key.model) else None
            self._configs[key] = members.member_config(
                self.cfg, key, self.comp.fingerprint, self.folds_digest,
                self.precision(train_settings(self.cfg, key.model).precision), part)
        return self._configs[key]

    def precision(self, setting: Precision) -> Precision:
        """``train.precision`` resolved for this run's training device
        (:func:`pipeline.train.runtime.resolve_precision`: ``auto`` is bf16, fp16 or fp32 by the
        GPU's compute capability or the CPU's bf16 support). Raises ConfigError for an unknown
        ``runtime.device`` or CUDA asked for where there is none."""
        from pipeline.train.runtime import resolve_precision, select_device

        return resolve_precision(setting, select_device(runtime_settings(self.cfg).device))

    def verify(self, key: MemberKey) -> Verification:
        """The member's verification against its cache key, hashed at most once per run."""
        if key not in self._verified:
            self._verified[key] = members.verify(self.member_dir(key), self.member_config(key))
        return self._verified[key]

    def _drop_predictions(self, model: str) -> None:
        from pipeline import pseudo

        for label in [k for k in self._predictions if BlendMember.parse(k).model == model]:
            del self._predictions[label]
        for key in [k for k in self._configs if pseudo.base_model(self.cfg, k.model)]:
            del self._configs[key]  # a round's cache key holds its source members' manifests
        self._pseudo.clear()

    def record(self, key: MemberKey, verification: Verification) -> None:
        """What a writer (or another process) established about a member in this run."""
        self._verified[key] = verification
        self._drop_predictions(key.model)

    def forget(self, key: MemberKey) -> None:
        """Drop what is known about a member (another process may have written it)."""
        self._verified.pop(key, None)
        self._drop_predictions(key.model)

    def predictions(self, member: BlendMember | str) -> MemberPredictions:
        """A blend member's (a model's, or ``model@seed``) OOF and averaged test probabilities,
        read once per run."""
        member = BlendMember.parse(member) if isinstance(member, str) else member
        if member.label not in self._predictions:
            self._predictions[member.label] = members.load_predictions(self, member)
        return self._predictions[member.label]

    def pseudo_rows(self, fold: int):
        """Fold ``fold``'s pseudo rows (:func:`pipeline.pseudo.pseudo_rows`), computed once per run."""
        from pipeline import pseudo

        if fold not in self._pseudo:
            self._pseudo[fold] = pseudo.pseudo_rows(self, fold)
        return self._pseudo[fold]
