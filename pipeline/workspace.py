"""The run's shared state: the competition and folds loaded once, member keys computed once.

``stage=all`` builds one :class:`Workspace` and hands it to every stage and every side-by-side
worker; a single stage builds its own. Each member's cache key is computed once per run and
verified (sha256 of its files) at most once per run: a member written in this run is recorded as
verified by its writer. A blend member's predictions are read once per run.

It works on a prepared config (:func:`pipeline.config.prepare`: the pseudo-label rounds are
models there) and reads it only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from pipeline import data, members
from pipeline.budget import BudgetRecord, read_record
from pipeline.device import device_kind, resolve_precision, select_device
from pipeline.errors import ArtifactError
from pipeline.folds import ensure_folds, folds_digest
from pipeline.io import sha256_file
from pipeline.members import BlendMember, MemberKey, MemberPredictions, MemberStatus, Verification
from pipeline.metrics import check_metric
from pipeline.paths import Paths
from pipeline.recipe import MeasuredOn, Screening, screened, screening_key
from pipeline.runsettings import RunSettings, run_settings
from pipeline.settings import BlendMethod, Precision, PseudoLabels


def measured_on(settings: RunSettings) -> MeasuredOn:
    """What a screening under ``settings`` measures on: the data's files
    (:func:`pipeline.data.source_digest`) and the device kind (:func:`pipeline.device.device_kind`).
    Raises ConfigError for a device this machine does not have."""
    return MeasuredOn(data.source_digest(settings.data.dir, settings.data.format), device_kind(settings.runtime.device))


def screening_for(settings: RunSettings) -> Screening | None:
    """The screening made for the run of ``settings`` (:func:`pipeline.recipe.screened` on
    :func:`measured_on`), or None (none, or one cut short in a smaller share)."""
    return screened(settings, measured_on(settings))


class Workspace:
    """The run's typed settings (their paths too), the loaded competition and the fold assignment,
    shared by every stage: each stage is a function of a workspace alone
    (:func:`pipeline.stages.stage_function`).

    Attributes:
        settings: every checked group and model (:func:`pipeline.runsettings.run_settings`).
        comp: the competition (``x_train (N, C, S, S) uint8``, ``y_train (N,) int64``, ...),
            loaded on first use.
        folds: ``(N,)`` int64 fold of each training row; ``folds_digest``: its short sha256.
    """

    def __init__(self, settings: RunSettings, comp: data.Competition | None = None, folds: np.ndarray | None = None):
        self.settings = settings
        self._comp, self._folds = comp, folds
        self._digest: str | None = None
        self._configs: dict[MemberKey, dict] = {}
        self._verified: dict[MemberKey, Verification] = {}
        self._predictions: dict[BlendMember, MemberPredictions] = {}

    @classmethod
    def load(cls, cfg: DictConfig | None = None, settings: RunSettings | None = None) -> "Workspace":
        """Load (building the offline default if needed) the competition and its folds now;
        ``settings``: the run's (:func:`pipeline.config.prepare` derived them), else derived from
        ``cfg`` here.

        Raises DataError / ConfigError / ArtifactError as :func:`pipeline.data.load` and
        :func:`pipeline.folds.ensure_folds` do."""
        ws = cls(settings or run_settings(cfg))
        ws.folds  # noqa: B018  (loads the competition, then its folds)
        return ws

    @property
    def paths(self) -> Paths:
        """Every location the run reads and writes (``settings.paths``)."""
        return self.settings.paths

    @property
    def comp(self) -> data.Competition:
        """The competition, loaded (and its metric checked) on first use."""
        if self._comp is None:
            comp = data.load(self.settings.data, self.paths)
            check_metric(self.settings.data.metric, comp.num_classes)
            self._comp = comp
        return self._comp

    @property
    def folds(self) -> np.ndarray:
        """The ``(N,)`` int64 fold assignment, written once (:func:`pipeline.folds.ensure_folds`)."""
        if self._folds is None:
            s = self.settings
            self._folds = ensure_folds(s.folds, s.paths, self.comp.y_train, self.comp.fingerprint,
                                       data.train_groups(s.data, s.folds, s.paths))
        return self._folds

    @property
    def folds_digest(self) -> str:
        """The fold assignment's short sha256 (:func:`pipeline.folds.folds_digest`), computed once."""
        if self._digest is None:
            self._digest = folds_digest(self.folds)
        return self._digest

    def screening_key(self) -> str:
        """This run's screening key (:func:`pipeline.recipe.screening_key` on :func:`measured_on`)."""
        return screening_key(self.settings, measured_on(self.settings))

    def with_settings(self, settings: RunSettings) -> "Workspace":
        """This workspace (the same config, competition and folds) under other ``settings`` (e.g.
        a budget's plan, :meth:`pipeline.runsettings.RunSettings.planned`), with empty memos."""
        return Workspace(settings, self._comp, self._folds)

    def use_settings(self, settings: RunSettings) -> None:
        """Run the stages that follow under ``settings`` (``stage=all`` after a budgeted
        ``stage=train``: the blend and report see the planned, complete members); memos dropped."""
        self.settings = settings
        self._configs.clear()
        self._verified.clear()
        self._predictions.clear()

    def apply_budget_record(self) -> BudgetRecord | None:
        """Under ``budget=``, put this workspace under the recorded plan's complete members
        (``artifacts/budget/plan.json``, :class:`pipeline.budget.BudgetRecord`) when it was made for
        this budget: what a stage run after a budgeted ``stage=train`` (the blend, the report)
        works on. Returns the record, or None (no budget, or no record for it). Raises
        ArtifactError for an unreadable record."""
        if self.settings.budget is None:
            return None
        record = read_record(self.paths.budget_plan)
        if record is None or record.plan.budget != self.settings.budget:
            return None
        self.use_settings(self.settings.planned(record.plan, record.complete))
        return record

    def seed_indices(self, name: str) -> list[int]:
        """The seed indices of model ``name`` (``models.<name>.seeds`` or ``seeds``)."""
        return list(range(self.settings.models[name].seed_count))

    def keys(self, name: str, folds: list[int] | None = None, seed_index: int | None = None) -> list[MemberKey]:
        """The members of model ``name``: one per seed index (or only ``seed_index``) and fold (all
        ``folds.k`` folds by default), seed by seed."""
        fl = range(self.settings.folds.k) if folds is None else folds
        seeds = self.seed_indices(name) if seed_index is None else [seed_index]
        return [MemberKey(name, f, s) for s in seeds for f in fl]

    def member_dir(self, key: MemberKey) -> Path:
        """The member's directory (:meth:`pipeline.paths.Paths.member_dir`)."""
        return self.paths.member_dir(key.model, key.fold, key.seed_index)

    def member_config(self, key: MemberKey) -> dict:
        """The member's cache key (:func:`pipeline.members.member_config`), with ``train.precision``
        resolved for this run's device; computed once. A pseudo-label round's includes its rows
        file's sha256 (:meth:`pseudo_part`), read each time (the round's rows are rewritten when
        their source members change)."""
        if self.settings.models[key.model].base is not None:
            return self._member_config(key, self.pseudo_part(key))
        if key not in self._configs:
            self._configs[key] = self._member_config(key, None)
        return self._configs[key]

    def _member_config(self, key: MemberKey, part: dict | None) -> dict:
        return members.member_config(self.settings, key, self.comp.fingerprint, self.folds_digest,
                                     self.precision(self.settings.models[key.model].train.precision), part)

    def pseudo_part(self, key: MemberKey) -> dict:
        """A pseudo-label round member's cache-key part: its source models, combining method,
        threshold, row cap and label kind, and the sha256 of the rows file it trains on
        (``artifacts/pseudo/<model>/fold<k>.npz``, :func:`pipeline.pseudo.write_rows`).
        Raises ArtifactError while that file has not been written."""
        path = self.paths.pseudo_rows(key.model, key.fold)
        if not path.exists():
            raise ArtifactError(f"{key}: its pseudo rows {path} are not written yet (run: python run.py "
                                f"stage=train model={key.model})")
        s = self.settings.pseudo
        return {"source": list(self.settings.pseudo_sources), "blend": BlendMethod(s.blend).value,
                "threshold": float(s.threshold), "max_rows": s.max_rows, "labels": PseudoLabels(s.labels).value,
                "rows_sha256": sha256_file(path)}

    def precision(self, setting: Precision) -> Precision:
        """``train.precision`` resolved for this run's training device
        (:func:`pipeline.device.resolve_precision`: ``auto`` is bf16, fp16 or fp32 by the
        GPU's compute capability or the CPU's bf16 support). Raises ConfigError for an unknown
        ``runtime.device`` or CUDA asked for where there is none."""
        return resolve_precision(setting, select_device(self.settings.runtime.device))

    def verify(self, key: MemberKey) -> Verification:
        """The member's verification against its cache key, hashed at most once per run."""
        if key not in self._verified:
            self._verified[key] = members.verify(self.member_dir(key), self.member_config(key))
        return self._verified[key]

    def record(self, key: MemberKey, verification: Verification) -> None:
        """What a writer (or another process) established about a member in this run."""
        self._verified[key] = verification
        self._drop_predictions(key.model)

    def forget(self, key: MemberKey) -> None:
        """Drop what is known about a member (another process may have written it)."""
        self._verified.pop(key, None)
        self._drop_predictions(key.model)

    def _drop_predictions(self, model: str) -> None:
        for member in [m for m in self._predictions if m.model == model]:
            del self._predictions[member]

    def require(self, key: MemberKey) -> Path:
        """The member's directory once it is verified complete and current.

        Raises:
            ArtifactError: missing, stale or corrupt, naming the member, the reason, the command
                that fixes it and a likely cause (tuned values, another device's precision).
        """
        d, v = self.member_dir(key), self.verify(key)
        if v.ok:
            return d
        hint = ""
        if v.status is MemberStatus.STALE and not self.settings.selection.tuned and self.paths.tuned(key.model).exists():
            hint = "; trained with tuned=true? then blend with tuned=true too"
        elif v.status is MemberStatus.STALE and (p := members.recorded_precision(d)) and \
                p != self.member_config(key)["train"]["precision"]:
            hint = f"; trained in {p} on another device? then add train.precision={p}"
        what = v.reason if v.status is MemberStatus.MISSING else f"{v.status.value}: {v.reason}"
        raise ArtifactError(f"{key}: {what} in {d} (run: python run.py stage=train "
                            f"model={key.model} fold={key.fold}){hint}")

    def predictions(self, member: BlendMember | str) -> MemberPredictions:
        """A blend member's (a model's, or ``model@seed``) OOF ``(N, C)`` and test ``(M, C)``
        float32 probabilities, every seed's checked against the OOF contract, seeds averaged;
        read once per run.

        Raises:
            ArtifactError: a member is missing, stale or corrupt (:meth:`require`), or its files
                break the OOF contract (:func:`pipeline.members.read_seed_predictions`).
        """
        member = BlendMember.parse(member) if isinstance(member, str) else member
        if member not in self._predictions:
            parts = {}
            for s in self.seed_indices(member.model) if member.seed_index is None else [member.seed_index]:
                dirs = [(k, self.require(k)) for k in self.keys(member.model, seed_index=s)]
                parts[s] = members.read_seed_predictions(dirs, self.folds, len(self.comp.x_test),
                                                         self.comp.num_classes)
            self._predictions[member] = MemberPredictions(
                member.label, members.average_probs([p[0] for p in parts.values()]),
                members.fold_then_seed_average({s: p[1] for s, p in parts.items()}),
                [e for p in parts.values() for e in p[2]])
        return self._predictions[member]
