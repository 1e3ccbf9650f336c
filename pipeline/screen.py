"""Stage ``screen``: the recipe by measurement, before the k-fold training.

    python run.py profile=quick                      # data, folds, screen, train, blend, report
    python run.py stage=screen budget=15m            # the screening alone (its share of 15 min)

A bounded share of the budget (``screen.share`` of ``budget=``, or of ``screen.seconds``) trains
candidates on fold 0 only, on a subsample of its training folds (``screen.rows``) with a short
one-cycle schedule (``screen.epochs``, at least ``screen.min_steps`` steps), and scores them on
a subsample of fold 0 (``screen.val_rows``) with the competition's metric. The test set and
the other folds' labels are never used. One dimension after another (coordinate search), each
an Optuna study over its candidates with successive-halving pruning (Li et al. 2018, "Massively
parallel hyperparameter tuning", Optuna's ``SuccessiveHalvingPruner``; the baseline candidate
first, so the rest are pruned against it):

1. ``side``: the first model of ``screen.models`` at the loaded side, its half and its quarter
   (each a resized uint8 cache, :func:`pipeline.data.load` at that ``data.img_size``);
2. ``arch``: every model of ``screen.models`` at the chosen side; the ensemble keeps the best
   ``screen.keep``, best score first, each within ``screen.keep_within`` x the noise of the best
   (:func:`kept`);
3. ``aug``: the presets of ``screen.augs`` (:class:`~pipeline.choices.AugPreset`) on the best model;
4. ``balance``: when the largest class has ``screen.imbalance`` times the rows of the smallest, a
   class-weighted loss against none.

A dimension set on the command line (``screen.fixed``) is not screened. A candidate starts only
when its timed estimate (a few real steps, :func:`pipeline.train.engine.seconds_per_member`) ends
inside the share; a candidate still training when the share runs out stops after its epoch
(:class:`~pipeline.train.engine.DeadlineReached`). The result (:class:`pipeline.recipe.Screening`:
the table, the choice and why) is written to ``artifacts/screening/<key>.json`` and logged; the
run's config then takes the recipe (:func:`pipeline.config.prepare`), and a rerun of the same
data and screening settings, with any budget, reuses it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable

import numpy as np
import optuna

from pipeline import data, members
from pipeline.augment import tta_views
from pipeline.budget import format_minutes, reserve_seconds
from pipeline.choices import AugPreset, Balance, Dim, FitMethod, Layout, Metric, Pruner
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import read_rows
from pipeline.members import MemberKey
from pipeline.metrics import DECISION_METRICS, label_metric, score
from pipeline.pretrained import wants_pretrained, weights_available
from pipeline.recipe import (Candidate, Recipe, Screening, TrialRecord, TrialState, preset_values, save_screening,
                             screen_balances, screen_share)
from pipeline.settings import TrainSettings
from pipeline.train import probe, topstages
from pipeline.train.engine import DeadlineReached, FitSpec, fit_member, planned_epochs, seconds_per_member
from pipeline.tune.study import objective_value
from pipeline.workspace import Workspace, screening_for

log = logging.getLogger(__name__)

MIN_SIDE = 28        # the smallest candidate side (the zoo's networks need it)
VALIDATION_SHARE = 0.25  # a trial's estimate adds this fraction for its per-epoch validation and set-up
PROBE_BATCH = 64         # the timed steps' batch: a 128 px probe at 256 took 45 s on a 2-core CPU
MIN_BATCHES = 24         # a trial's batch leaves at least this many steps per epoch (2,000-image competitions)
MIN_PRETRAINED_SIDE = 64  # pretrained candidates are screened from this side (an ImageNet net at 28 px sees 1x1 maps)


def share_seconds(ws: Workspace, pretrained: bool = False) -> float:
    """The screening's time in seconds (:func:`pipeline.recipe.screen_share` of ``ws``'s settings)."""
    return screen_share(ws.settings.screen, ws.settings.budget, pretrained)


def candidate_sides(loaded: int, layout: Layout, sides: list) -> list[int]:
    """The side candidates, largest first: ``sides`` (those up to the ``loaded`` side), else the
    loaded side, its half and its quarter down to :data:`MIN_SIDE` (multiples of 4). A pixel CSV
    has one side only (its images are not resized)."""
    if layout is Layout.pixels:
        return [loaded]
    if sides:
        out = sorted({int(s) for s in sides if MIN_SIDE <= int(s) <= loaded}, reverse=True)
        return out or [loaded]
    out = [loaded] + [v for d in (2, 4) if (v := loaded // d // 4 * 4) >= MIN_SIDE]
    return sorted(set(out), reverse=True)


def imbalanced(y: np.ndarray, num_classes: int, ratio: float) -> bool:
    """Whether the largest class of ``y`` ``(N,)`` int64 has at least ``ratio`` times the rows of
    the smallest (an absent class counts as one row)."""
    counts = np.maximum(np.bincount(y, minlength=num_classes), 1)
    return counts.max() / counts.min() >= ratio


def subsample(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``, int64 row indices: at most ``screen.rows`` of fold 0's training
    folds and ``screen.val_rows`` of fold 0, drawn per class in proportion (stratified) with the
    run's seed."""
    s, rng = ws.settings.screen, np.random.default_rng(ws.settings.base_seed)

    def draw(rows: np.ndarray, n: int) -> np.ndarray:
        if len(rows) <= n:
            return rows
        y = ws.comp.y_train[rows]
        picked = [rng.permutation(rows[y == c])[:max(1, round(n * (y == c).mean()))] for c in np.unique(y)]
        return np.sort(np.concatenate(picked))

    return draw(np.flatnonzero(ws.folds != 0), s.rows), draw(np.flatnonzero(ws.folds == 0), s.val_rows)


class Screen:
    """One screening: the subsample at each side, the trials run so far and the share's deadline."""

    def __init__(self, ws: Workspace, deadline: float):
        self.ws, self.deadline, self.s = ws, deadline, ws.settings.screen
        self.train_rows, self.val_rows = subsample(ws)
        self.trials: list[TrialRecord] = []
        self.predictions: dict[Candidate, tuple[np.ndarray, np.ndarray]] = {}  # complete trials' validation
        self.curves: dict[Candidate, dict[int, float]] = {}  # complete trials' per-epoch values (the pruner's)
        self._data: dict[int, tuple] = {}
        self._estimates: dict[tuple[str, int], float] = {}  # (model, side) -> seconds of a trial
        self._probe_seconds = 0.0  # the longest timed probe so far
        self.prices: dict[tuple[str, int], topstages.Price] = {}  # (model, side) -> a top-stages member's price
        self.out_of_time = False

    def estimate(self, c: Candidate, spec: FitSpec, comp, folds) -> float:
        """Seconds a trial of ``c`` takes: two real steps of its model at its side on a batch of
        at most :data:`PROBE_BATCH` (one warm-up step before them), timed once per (model, side)
        (the augmentation and the loss weights barely change it), scaled to the trial's images,
        plus :data:`VALIDATION_SHARE`. Raises ConfigError when it cannot train on the subsample."""
        if (c.model, c.side) not in self._estimates and spec.train.fit is FitMethod.linear_probe:
            t0 = time.time()  # features of every subsample image, then the regression's fits
            self._estimates[c.model, c.side] = probe.seconds_per_member(spec, comp, folds, share=1.0)
            self._probe_seconds = max(self._probe_seconds, time.time() - t0)
        if (c.model, c.side) not in self._estimates and spec.train.fit is FitMethod.top_stages:
            t0 = time.time()  # the frozen pass of every subsample image, then the top's epochs
            self.prices[c.model, c.side] = p = topstages.price(spec, comp)
            self._estimates[c.model, c.side] = topstages.member_seconds(
                p, spec.train, len(tta_views(spec.tta)), len(comp.x_train) + len(comp.x_test), len(self.train_rows),
                len(self.val_rows), len(comp.x_test))
            self._probe_seconds = max(self._probe_seconds, time.time() - t0)
        if (c.model, c.side) not in self._estimates:
            t0 = time.time()
            batch = min(PROBE_BATCH, spec.train.batch_size)
            timed = dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch_size=batch, epochs=1,
                                                                       min_steps=0))
            if not self._estimates:  # the first steps of a process pay torch's one-time set-up
                seconds_per_member(timed, comp, folds, steps=1, warmup=1)
            rows = len(self.train_rows)
            per_image = seconds_per_member(timed, comp, folds, steps=2, warmup=1) / ((rows // batch) * batch)
            self._estimates[c.model, c.side] = per_image * self.images(spec.train) * (1 + VALIDATION_SHARE)
            self._probe_seconds = max(self._probe_seconds, time.time() - t0)
        return self._estimates[c.model, c.side]

    def images(self, train: TrainSettings) -> int:
        """Training images of a trial under ``train`` (the short schedule's epochs x full batches)."""
        steps = len(self.train_rows) // train.batch_size
        return planned_epochs(train, steps) * steps * train.batch_size

    def epochs(self, model: str) -> int:
        """The short schedule's epochs for ``model`` (``screen.epochs``, raised to ``screen.min_steps``)."""
        train = self.short(model)
        return planned_epochs(train, len(self.train_rows) // train.batch_size)

    def short(self, model: str, balance: Balance = Balance.none) -> TrainSettings:
        """``model``'s training settings for a trial: ``screen.epochs`` with at least
        ``screen.min_steps`` steps, on a batch of at most the subsample's rows over
        :data:`MIN_BATCHES` (a power of two, at least 16), with ``balance``'s class weighting
        and sampler."""
        m, s = self.ws.settings.models[model].train, self.s
        fit = 2 ** int(math.log2(max(16, len(self.train_rows) // MIN_BATCHES)))
        return dataclasses.replace(m, epochs=s.epochs, min_steps=s.min_steps, batch_size=min(m.batch_size, fit),
                                   class_weight=balance is Balance.class_weight, sampler=balance.train_sampler)

    def data_at(self, side: int) -> tuple[data.Competition, np.ndarray]:
        """The subsample as a competition at ``side`` pixels (the loaded images, or at another
        side the subsample's files alone decoded again, :func:`pipeline.data.decode_train_rows`)
        and its folds (0: validation)."""
        if side not in self._data:
            comp, d = self.ws.comp, self.ws.settings.data
            rows = np.concatenate([self.train_rows, self.val_rows])
            if side != comp.x_train.shape[-1]:
                x = data.decode_train_rows(data.resolve_data_dir(d, self.ws.paths), rows, side, comp.x_train.shape[1],
                                           d.resize, d.format, d.id_column, d.label_column, d.decode_jobs)
                x_test = np.zeros((1, *x.shape[1:]), dtype=np.uint8)
            else:
                x, x_test = read_rows(comp.x_train, rows), comp.x_test[:1]
            sub = dataclasses.replace(comp, x_train=x, y_train=comp.y_train[rows], x_test=x_test,
                                      test_ids=comp.test_ids[:1])
            folds = np.r_[np.ones(len(self.train_rows), np.int64), np.zeros(len(self.val_rows), np.int64)]
            self._data[side] = (sub, folds)
        return self._data[side]

    def data_for(self, c: Candidate) -> tuple[data.Competition, np.ndarray]:
        """The competition and folds (0: validation) a trial of ``c`` trains on: the subsample at
        its side (:meth:`data_at`); but a linear probe or a top-stages candidate at the loaded side,
        when the subsample holds every training row, trains on the competition itself with fold 0
        as validation: its frozen pass then covers every train and test image and is the very
        cache (same key) that its members read if the ensemble keeps it. The validation rows and
        their order are the subsample's either way (fold 0's, ascending)."""
        comp = self.ws.comp
        whole = len(self.train_rows) + len(self.val_rows) == len(comp.x_train)
        if (whole and c.side == comp.x_train.shape[-1]
                and self.ws.settings.models[c.model].train.fit is not FitMethod.gradient):
            return comp, (self.ws.folds != 0).astype(np.int64)
        return self.data_at(c.side)

    def spec(self, c: Candidate, comp) -> FitSpec:
        """The fit spec of candidate ``c``: its model's settings with the short schedule, its
        augmentation preset and class weighting, validated every epoch."""
        ws = self.ws
        m = ws.settings.models[c.model]
        aug = m.aug if c.aug is None else dataclasses.replace(m.aug, **preset_values(c.aug, m.aug))
        train = self.short(c.model, c.balance)
        model = dataclasses.replace(m, train=train, aug=aug, seed_count=1)
        runtime = dataclasses.replace(ws.settings.runtime, val_every=1, progress=False)
        settings = dataclasses.replace(ws.settings, models={**ws.settings.models, c.model: model}, runtime=runtime)
        key = MemberKey(c.model, 0)
        member_cfg = members.member_config(settings, key, f"{comp.fingerprint}-{c.side}", "screen",
                                           ws.precision(train.precision))
        return FitSpec.create(model, runtime, key, member_cfg, deadline=self.deadline,
                              features_dir=ws.paths.features_dir())  # a probe's and an LP-FT head's, shared

    def run_trial(self, dim: Dim, c: Candidate, trial: optuna.Trial | None) -> TrialRecord:
        """Train and score candidate ``c`` (reusing an earlier trial of the same candidate); its
        row of the table. Successive halving may prune it at an epoch (``trial``)."""
        done = next((t for t in self.trials if t.candidate == c and t.state is not TrialState.skipped), None)
        if done is not None:  # reused: no time spent; its epochs' values join this study's rungs
            if trial is not None:
                for epoch, value in sorted(self.curves.get(c, {}).items()):
                    trial.report(value, epoch)
            return dataclasses.replace(done, dim=dim, seconds=0.0)
        t0 = time.time()
        if (c.model, c.side) not in self._estimates and t0 + self._probe_seconds >= self.deadline:
            self.out_of_time = True  # not even its timed steps fit
            return TrialRecord(dim, c, TrialState.skipped, None, None, 0, 0.0)
        comp, folds = self.data_for(c)
        spec = self.spec(c, comp)
        epochs_run = [0]
        try:
            estimate = self.estimate(c, spec, comp, folds)
        except ConfigError as e:  # e.g. a batch larger than the subsample
            log.info("screen: %s: not screened (%s)", c.label(), e)
            return TrialRecord(dim, c, TrialState.failed, None, None, 0, time.time() - t0)
        if time.time() + estimate > self.deadline:
            log.info("screen: %s: skipped, its estimate %s does not fit in the share left", c.label(),
                     format_minutes(estimate))
            return TrialRecord(dim, c, TrialState.skipped, None, None, 0, time.time() - t0)

        if c.model in self.s.pretrained:  # a probe's one fit or a short fine-tuning: no fair rung against scratch nets
            trial = None

        curve: dict[int, float] = {}

        def report(epoch: int, record: dict) -> None:
            epochs_run[0] = epoch
            if "val_acc" in record:
                curve[epoch] = _step_value(record, self.ws.settings.data.metric)
            if trial is not None and "val_acc" in record:
                trial.report(curve[epoch], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        try:
            res = fit_member(spec, comp, folds, on_epoch=report, predict_test=False)
        except optuna.TrialPruned:
            return TrialRecord(dim, c, TrialState.pruned, None, None, epochs_run[0], time.time() - t0)
        except DeadlineReached:
            self.out_of_time = True
            return TrialRecord(dim, c, TrialState.stopped, None, None, epochs_run[0], time.time() - t0)
        except PipelineError as e:  # diverged
            log.info("screen: %s: failed (%s)", c.label(), e)
            return TrialRecord(dim, c, TrialState.failed, None, None, epochs_run[0], time.time() - t0)
        y = comp.y_train[res.row_ids]
        self.predictions[c] = (y, res.oof)  # for the paired noise (:func:`noise`)
        self.curves[c] = curve
        sc = score(y, res.oof)
        value = objective_value(sc, self.ws.settings.data.metric, len(y))
        return TrialRecord(dim, c, TrialState.complete, value, sc.accuracy, epochs_run[0], time.time() - t0)

    def study(self, dim: Dim, candidates: list[Candidate]) -> list[TrialRecord]:
        """Screen ``candidates`` (the first is the baseline) as one Optuna study with
        ``screen.pruner``; their rows of the table, in order. Stops starting trials once the share
        is spent."""
        pruner = make_pruner(self.s.pruner, self.epochs(candidates[0].model), rung_noise(len(self.val_rows)))
        study = optuna.create_study(direction="maximize", pruner=pruner)
        rows: list[TrialRecord] = []
        for i in range(len(candidates)):
            study.enqueue_trial({"candidate": i})

        def objective(trial: optuna.Trial) -> float:
            c = candidates[trial.suggest_int("candidate", 0, len(candidates) - 1)]
            row = self.run_trial(dim, c, trial)
            rows.append(row)
            self.trials.append(row)
            log.info("screen: %-8s %-44s %-9s %s (%d epochs, %.1f s)", dim.value, c.label(), row.state.value,
                     "" if row.score is None else f"{row.score:.4f}", row.epochs, row.seconds)
            if row.state is TrialState.pruned:
                raise optuna.TrialPruned()
            return row.score if row.score is not None else -math.inf

        for c in candidates:
            if self.out_of_time:  # the share is spent: the rest are listed, not run
                row = TrialRecord(dim, c, TrialState.skipped, None, None, 0, 0.0)
                rows.append(row)
                self.trials.append(row)
                continue
            study.optimize(objective, n_trials=1)
        return rows


def _step_value(record: dict, metric: Metric) -> float:
    """An epoch's validation figure for pruning: minus the log loss for ``log_loss``, else the accuracy."""
    return -float(record["val_loss"]) if metric is Metric.log_loss else float(record["val_acc"])


def rung_noise(n_val: int, p: float = 0.9) -> float:
    """The tolerance at a pruning rung: one standard error of a difference of two accuracies near
    ``p`` on ``n_val`` validation rows, ``sqrt(2 p (1 - p) / n_val)`` (no per-row predictions
    exist mid-trial to pair; 0.014 at 0.9 on 900 rows). A rung compares validation accuracies,
    except under ``data.metric=log_loss`` (minus the log loss: this figure is then a rough
    stand-in of the same order)."""
    return math.sqrt(2 * p * (1 - p) / max(1, n_val))


class TolerantPruner(optuna.pruners.BasePruner):
    """``inner``'s decision, overruled where the trial's value at the step is within
    ``tolerance`` of the best value reported at that step by the study's other trials: a
    candidate is pruned for being worse than the leader by more than the noise, not for 0.899
    against 0.900."""

    def __init__(self, inner: optuna.pruners.BasePruner, tolerance: float):
        self.inner, self.tolerance = inner, tolerance

    def prune(self, study: optuna.Study, trial) -> bool:
        if not self.inner.prune(study, trial):
            return False
        step = trial.last_step
        if step is None:
            return True
        value = trial.intermediate_values[step]
        others = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and step in t.intermediate_values]
        return not others or value < max(others) - self.tolerance


def make_pruner(kind: Pruner, epochs: int, tolerance: float = 0.0) -> optuna.pruners.BasePruner:
    """The screening's pruner: successive halving with one rung at two thirds of the short
    schedule where the better half goes on (a candidate's first epoch, in the one-cycle warm-up,
    ranks augmentations and architectures badly: on the digits every flip and the CNNs lost to the
    MLP there), Hyperband over ``epochs``, the median rule, or none; under successive halving and
    the median rule a candidate within ``tolerance`` of the best at its step is never pruned
    (:class:`TolerantPruner`)."""
    if kind is Pruner.successive_halving:
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, math.ceil(2 * epochs / 3)),
                                                       reduction_factor=2)
    elif kind is Pruner.hyperband:  # its brackets need the study's own pruner to be it: not wrapped
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))
    elif kind is Pruner.median:
        inner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    else:
        return optuna.pruners.NopPruner()
    return TolerantPruner(inner, tolerance) if tolerance > 0 else inner



def noise(rows: list[TrialRecord], n_val: int, metric: Metric,
          predictions: dict[Candidate, tuple[np.ndarray, np.ndarray]] | None = None) -> float:
    """How far apart two candidates' scores may be by chance: one standard error of the
    difference between the best complete row and the baseline (the first row; when the baseline
    is the best, its runner-up).

    With their validation ``predictions`` (``{candidate: (labels (n,) int64, probabilities
    (n, C) float32)}``, the same rows), the estimate is paired, as the two were measured on the
    same rows: for accuracy the standard error of the mean per-row difference of correctness
    (the variance behind McNemar's test, McNemar 1947), for log loss that of the per-row
    difference of log losses, for ROC AUC, balanced accuracy and macro-F1 a paired bootstrap
    (:data:`BOOTSTRAP` resamples of the rows). Without them: for accuracy
    ``sqrt(2 p (1 - p) / n_val)`` at the best accuracy ``p`` (two independent binomials: it
    overstates the noise of a paired comparison), 0 for another metric."""
    done = [r for r in rows if r.state is TrialState.complete]
    if not done:
        return 0.0
    top = max(done, key=lambda r: r.score)
    base = rows[0] if rows[0].state is TrialState.complete else top
    if base is top:
        rest = sorted((r for r in done if r is not top), key=lambda r: -r.score)
        base = rest[0] if rest else top
    pair = [predictions.get(r.candidate) for r in (top, base)] if predictions else [None, None]
    if base is not top and all(x is not None for x in pair):
        return paired_se(pair[0][0], pair[0][1], pair[1][1], metric)
    accuracies = [r.accuracy for r in done if r.accuracy is not None]
    if metric is not Metric.accuracy or not accuracies:
        return 0.0
    p = max(accuracies)
    return math.sqrt(2 * p * (1 - p) / max(1, n_val))


BOOTSTRAP = 200  # resamples of a paired bootstrap (ROC AUC, balanced accuracy, macro-F1)


def paired_se(y: np.ndarray, a: np.ndarray, b: np.ndarray, metric: Metric, seed: int = 0) -> float:
    """One standard error of the difference of ``metric`` between two candidates' ``(n, C)``
    probabilities ``a`` and ``b`` on the same rows with labels ``y`` ``(n,)`` (see :func:`noise`)."""
    n = len(y)
    if metric in (Metric.roc_auc, *DECISION_METRICS):  # not a mean over rows: a paired bootstrap
        from sklearn.metrics import roc_auc_score

        def value(i: np.ndarray, p: np.ndarray) -> float:
            if metric is Metric.roc_auc:
                return roc_auc_score(y[i], p[i, 1])
            return label_metric(y[i], p[i].argmax(1), p.shape[1], metric)

        rng, diffs = np.random.default_rng(seed), []
        for _ in range(BOOTSTRAP):
            i = rng.integers(0, n, n)
            if metric is not Metric.roc_auc or len(np.unique(y[i])) == 2:
                diffs.append(value(i, a) - value(i, b))
        return float(np.std(diffs)) if len(diffs) > 1 else 0.0
    if metric is Metric.log_loss:
        rows = np.arange(n)
        d = -np.log(np.clip(a[rows, y], 1e-7, 1)) + np.log(np.clip(b[rows, y], 1e-7, 1))
    else:
        d = (a.argmax(1) == y).astype(np.float64) - (b.argmax(1) == y)
    return float(np.std(d) / math.sqrt(max(1, n)))


def best(rows: list[TrialRecord], margin: float = 0.0) -> TrialRecord | None:
    """The baseline (the study's first candidate, when it completed) unless another complete row
    scores more than ``margin`` above it; then the highest (the earliest among equals). None when
    none completed."""
    done = [r for r in rows if r.state is TrialState.complete]
    if not done:
        return None
    top = max(done, key=lambda r: r.score)
    base = rows[0] if rows[0].state is TrialState.complete else top
    return top if top.score - base.score > margin else base


def ranked(rows: list[TrialRecord], margin: float = 0.0) -> list[TrialRecord]:
    """Complete rows, :func:`best` first, then by score (the earliest among equals)."""
    first = best(rows, margin)
    rest = sorted([r for r in rows if r.state is TrialState.complete and r is not first], key=lambda r: -r.score)
    return [first, *rest] if first is not None else []


def kept(rows: list[TrialRecord], margin: float, keep: int, within: float,
         blend: Callable[[list[TrialRecord]], float | None] | None = None,
         ) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """The architectures the ensemble keeps, the best score first (the earliest among equals; the
    budget's planner gives the first its epochs before the next joins, :mod:`pipeline.budget`),
    then up to ``keep`` in all from the complete rows within ``within`` x ``margin`` (the noise,
    :func:`noise`; none left out when it is 0, a metric without a noise estimate) of the best.

    Without ``blend`` the next are the best-scoring. With it (the validation score of the mean
    of the rows' probabilities, :func:`blend_value`; None where the rows were not measured on the
    same validation rows) they are added by greedy forward selection: each next one is the row
    whose blend with those kept scores best (ensemble selection, Caruana et al. 2004), so a
    second backbone that errs elsewhere can win over a near copy of the first. A clearly weaker
    network would take its share of the budget's training from the best and add little to the
    blend. Both rules were measured (docs/results.md: ELPV, Fashion-MNIST, the silhouettes).
    Returns the kept rows and those among the best ``keep`` by score left out as weaker."""
    done = sorted((r for r in rows if r.state is TrialState.complete), key=lambda r: -r.score)
    if not done:
        return [], []
    near = [r for r in done if margin <= 0 or r.score >= done[0].score - within * margin]
    weaker = [r for r in done[1:keep] if r not in near]
    chosen, pool = [done[0]], near[1:]
    while len(chosen) < keep and pool:
        values = [blend([*chosen, r]) if blend else None for r in pool]
        pick = pool[0] if any(v is None for v in values) else pool[int(np.argmax(values))]
        chosen.append(pick)
        pool.remove(pick)
    return chosen, weaker


def blend_value(sc: "Screen", rows: list[TrialRecord]) -> float | None:
    """The validation objective (:func:`pipeline.tune.study.objective_value`) of the mean of the
    ``rows``' validation probabilities (``sc.predictions``), or None when any row has none or they
    were not measured on the same labelled rows."""
    predictions = getattr(sc, "predictions", {})
    pairs = [predictions.get(r.candidate) for r in rows]
    if any(p is None for p in pairs) or any(len(p[0]) != len(pairs[0][0]) or not np.array_equal(p[0], pairs[0][0])
                                            for p in pairs):
        return None
    y = pairs[0][0]
    return objective_value(score(y, np.mean([p[1] for p in pairs], axis=0)), sc.ws.settings.data.metric, len(y))


def _why(dim: Dim, rows: list[TrialRecord], chosen: TrialRecord | None, what: str, margin: float) -> str:
    unmeasured = [r for r in rows if r.state in (TrialState.skipped, TrialState.stopped)]
    missed = ("; not measured (the share ran out), so deciding nothing: "
              + ", ".join(f"{r.candidate.label()} {r.state.value}" for r in unmeasured)) if unmeasured else ""
    if chosen is None:
        return f"{dim.value}: no candidate completed in the share; kept as configured{missed}"
    others = [r for r in ranked(rows) if r is not chosen][:2]
    against = "; ".join(f"{r.candidate.label()} {r.score:.4f}" for r in others) or "no other candidate completed"
    kept = " (the baseline: nothing beat it by more than the noise, %.4f)" % margin if (
        chosen is rows[0] and any(r.score > chosen.score for r in others)) else ""
    return f"{dim.value}: {what} ({chosen.score:.4f}) against {against}{kept}{missed}"


def pretrained_sides(sides: list[int], loaded: int, cap: int) -> list[int]:
    """The side candidates (``sides``, largest first) of a pretrained network: those from
    :data:`MIN_PRETRAINED_SIDE` to ``cap`` (``screen.pretrained_side``), else its one side, the
    ``loaded`` side at most ``cap``: an ImageNet network is not screened at 28-32 px."""
    return [v for v in sides if MIN_PRETRAINED_SIDE <= v <= cap] or [min(loaded, cap)]


def _is_pretrained(ws: Workspace, model: str) -> bool:
    """Whether ``model`` starts from pretrained weights (``kwargs.pretrained`` or
    ``kwargs.pretrained_file``) or trains on a frozen backbone (``train.fit``)."""
    m = ws.settings.models[model]
    return wants_pretrained(m.kwargs) or m.train.fit is not FitMethod.gradient


def pretrained_candidates(ws: Workspace, loaded: int, fixed: frozenset[Dim]) -> list[Candidate]:
    """The pretrained candidates of the arch study (``screen.pretrained``), each at its family's
    side: the loaded side, at most ``screen.pretrained_side``, with its configured augmentation;
    none when the architectures are fixed, the side is fixed at another, or the side is below
    :data:`MIN_PRETRAINED_SIDE` (a pixel CSV's 28 px digits: logged); a candidate whose weights
    no source has (:func:`pipeline.pretrained.weights_available`: offline, a hub-only backbone)
    is left out with one log line."""
    s = ws.settings.screen
    names = [str(m) for m in s.pretrained]
    if not names or Dim.arch in fixed:
        return []
    side = loaded if Dim.side in fixed else min(loaded, s.pretrained_side)
    if side < MIN_PRETRAINED_SIDE:
        log.info("screen: pretrained candidates (%s) not screened: %d px, below %d px", ", ".join(names), side,
                 MIN_PRETRAINED_SIDE)
        return []
    out = []
    for m in names:
        try:
            weights_available(ws.settings.models[m].kwargs)
        except ConfigError as e:
            log.info("screen: %s not screened: %s", m, e)
            continue
        out.append(Candidate(m, side, None))
    return out


def full_seconds(sc: Screen, row: TrialRecord) -> float:
    """About the least training ``row``'s candidate costs on the whole competition, from its
    trial's seconds: a linear probe computes its features once for every train and test image
    (the trial's rate per image of the subsample), then each of the ``k`` folds fits its
    regression (priced as the budget prices it, :func:`pipeline.train.probe.fit_seconds`); a
    network trains one epoch of every fold (``k - 1`` folds of rows each, at the trial's rate per
    row and epoch); a top-stages member is priced from its timed steps
    (:func:`pipeline.train.topstages.member_seconds`, its configured epochs)."""
    comp, n_sub, k = sc.ws.comp, len(sc.train_rows) + len(sc.val_rows), sc.ws.settings.folds.k
    m = sc.ws.settings.models[row.candidate.model]
    if m.train.fit is FitMethod.linear_probe:
        fits = k * probe.fit_seconds(len(comp.x_train) * (k - 1) / k, len(tta_views(m.tta)))
        return row.seconds * (len(comp.x_train) + len(comp.x_test)) / max(1, n_sub) + fits
    price = sc.prices.get((row.candidate.model, row.candidate.side)) if m.train.fit is FitMethod.top_stages else None
    if price is not None:  # one frozen pass, k members' epochs
        n, n_test = len(comp.x_train), len(comp.x_test)
        return k * topstages.member_seconds(price, m.train, len(tta_views(m.tta)), (n + n_test) / k, n * (k - 1) / k,
                                            n / k, n_test)
    per_row_epoch = row.seconds / max(1, row.epochs * len(sc.train_rows))
    return per_row_epoch * len(comp.x_train) * (k - 1)


def affordable(sc: Screen, rows: list[TrialRecord]) -> tuple[list[TrialRecord], list[str]]:
    """The rows whose candidate's :func:`full_seconds` fit in what ``budget=`` leaves for training
    (its end less the reserve for the blend and report, from now); all rows without a budget.
    Returns the rows that fit and one reason per complete row that does not."""
    settings = sc.ws.settings
    if settings.budget is None:
        return rows, []
    left = settings.started + settings.budget - reserve_seconds(settings.budget) - time.time()
    fits, why = [], []
    for r in rows:
        if r.state is TrialState.complete and full_seconds(sc, r) > left:
            why.append(f"left out {r.candidate.model}: about {full_seconds(sc, r) / 60:.1f} min of training on the "
                       f"whole competition, {max(0.0, left) / 60:.1f} min of the budget left")
        else:
            fits.append(r)
    return fits, why


def _arch(sc: Screen, models: list[str], side: int, aug, pretrained: list[Candidate], reasons: list[str]):
    """The arch study: ``models`` at ``side`` (from scratch, ``aug``) and the ``pretrained``
    candidates at theirs. The best-scoring row's side becomes the ensemble's (one side for all);
    the ensemble keeps the best ``screen.keep`` rows screened at that side (:func:`kept`). Returns
    ``(ordered models, side, kept model names)``."""
    s, metric, n_val = sc.s, sc.ws.settings.data.metric, len(sc.val_rows)
    measured = sc.study(Dim.arch, [Candidate(m, side, aug) for m in models] + pretrained)
    rows, dear = affordable(sc, measured)  # a candidate the budget cannot train at full scale never wins
    margin = noise(rows, n_val, metric, getattr(sc, "predictions", None))
    top = kept(rows, margin, 1, s.keep_within)[0]  # the best score (the earliest among equals)
    side = top[0].candidate.side if top else side
    chosen, weaker = kept([r for r in rows if r.candidate.side == side], margin, s.keep, s.keep_within,
                          lambda kept_rows: blend_value(sc, kept_rows))
    order = [r.candidate.model for r in chosen]
    left = "".join(f"; left out {r.candidate.model} {r.score:.4f}, more than {s.keep_within:g} x the noise "
                   f"below the best" for r in weaker)
    other = sorted({r.candidate.model for r in rows if r.candidate.side != side and r.state is TrialState.complete})
    left += f"; left out {', '.join(other)}: screened at another side than the best's {side} px" if other else ""
    left += "".join(f"; {d}" for d in dear)
    pairs = [(r, blend_value(sc, [chosen[0], r])) for r in rows if chosen and r is not chosen[0]
             and r.candidate.side == side and r.state is TrialState.complete]
    if len(chosen) > 1 and all(v is not None for _, v in pairs):
        left += (f"; the next by their mean's score with {chosen[0].candidate.model}: "
                 + ", ".join(f"{r.candidate.model} {v:.4f}" for r, v in sorted(pairs, key=lambda p: -p[1])))
    reasons.append(_why(Dim.arch, rows, chosen[0] if chosen else None, f"ensemble [{', '.join(order)}]",
                        margin) + left)
    return order + [m for m in models if m not in order], side, order


def screen(ws: Workspace) -> Screening:
    """Run the screening of ``ws`` (see the module docstring) and return it (not yet saved)."""
    s, fixed = ws.settings.screen, ws.settings.screen_fixed
    t0 = time.time()
    loaded = side = ws.comp.x_train.shape[-1]
    pretrained = pretrained_candidates(ws, loaded, fixed)
    share = share_seconds(ws, bool(pretrained))
    sc = Screen(ws, t0 + share)
    models = [str(m) for m in s.models] if Dim.arch not in fixed else [ws.settings.selection.ensemble[0]]
    augs = list(ws.settings.screen_augs) if Dim.aug not in fixed else [None]
    reasons, recipe = [], Recipe()
    sides = candidate_sides(side, ws.comp.layout, list(s.sides)) if Dim.side not in fixed else [side]
    if Dim.side not in fixed and _is_pretrained(ws, models[0]):  # e.g. ensemble=[lite0_probe]: its own sides
        sides = pretrained_sides(sides, loaded, s.pretrained_side)
        side = sides[0] if len(sides) == 1 else side
    metric, n_val = ws.settings.data.metric, len(sc.val_rows)
    if len(sides) > 1:  # the smallest side is the baseline: a larger one must pay for its cost
        rows = sc.study(Dim.side, [Candidate(models[0], v, augs[0]) for v in sorted(sides)])
        chosen = best(rows, margin := noise(rows, n_val, metric, sc.predictions))
        side = chosen.candidate.side if chosen else side
        recipe = dataclasses.replace(recipe, side=side)
        reasons.append(_why(Dim.side, rows, chosen, f"{side} px", margin))
    if Dim.arch not in fixed:
        models, side, order = _arch(sc, models, side, augs[0], pretrained, reasons)
        recipe = dataclasses.replace(recipe, models=tuple(order))
    recipe = dataclasses.replace(recipe, side=side if side != loaded else None)  # the loaded side: no decode again
    ensemble = list(recipe.models) or models[:1]
    trained = [m for m in ensemble if ws.settings.models[m].train.fit is FitMethod.gradient]
    augmented = trained[0] if trained else ensemble[0]  # a linear probe's features see no augmentation
    if augmented in s.pretrained and Dim.aug not in fixed:  # its configured augmentation is the baseline
        augs = [None, *(AugPreset(str(a)) for a in s.pretrained_augs)]
    if Dim.aug not in fixed and len(augs) > 1 and trained:
        rows = sc.study(Dim.aug, [Candidate(augmented, side, a) for a in augs])
        chosen = best(rows, margin := noise(rows, n_val, metric, sc.predictions))
        recipe = dataclasses.replace(recipe, aug=chosen.candidate.aug if chosen else None)
        label = (chosen.candidate.aug.value if chosen.candidate.aug else "as configured") if chosen else ""
        reasons.append(_why(Dim.aug, rows, chosen, f"preset {label}", margin))
    if Dim.balance not in fixed and imbalanced(ws.comp.y_train[sc.train_rows], ws.comp.num_classes, s.imbalance):
        aug = recipe.aug if recipe.aug is not None else (None if models[0] in s.pretrained else augs[0])
        rows = sc.study(Dim.balance, [Candidate(models[0], side, aug, b) for b in (Balance.none, *screen_balances(s))])
        chosen = best(rows, margin := noise(rows, n_val, metric, sc.predictions))
        recipe = dataclasses.replace(recipe, balance=chosen.candidate.balance if chosen else None)
        reasons.append(_why(Dim.balance, rows, chosen, recipe.balance.value if recipe.balance else "", margin))
    return Screening(ws.screening_key(), recipe, tuple(sc.trials), tuple(reasons), share, time.time() - t0,
                     len(sc.train_rows), len(sc.val_rows), tuple(sorted(fixed, key=list(Dim).index)), bool(pretrained))


def run(ws: Workspace) -> Screening | None:
    """Stage ``screen``: with ``screen.enabled``, the screening of this run, reused from
    ``artifacts/screening/`` when one was made for it, else run and written there; the table,
    the choice and why are logged either way. Returns it, or None when screening is off.
    Raises ArtifactError for an unreadable record."""
    if not ws.settings.screen.enabled:
        return None
    path = ws.paths.screening(ws.screening_key())
    found = screening_for(ws.settings)
    if found is not None:
        log.info("screen: reusing %s (made in %.0f s):\n%s", path, found.seconds, found.table())
        return found
    log.info("screen: up to %s on fold 0 (%s)", format_minutes(share_seconds(ws, bool(ws.settings.screen.pretrained))),
             ", ".join(f"{d.value} fixed" for d in sorted(ws.settings.screen_fixed, key=list(Dim).index))
             or "nothing fixed")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the screening logs its own rows
    result = screen(ws)
    save_screening(path, result)
    log.info("screen: done in %s -> %s\n%s", format_minutes(result.seconds), path, result.table())
    return result

