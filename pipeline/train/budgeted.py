"""``stage=train`` under ``budget=``: measure what each model costs here, plan the seeds and
epochs that fit (:func:`pipeline.budget.plan`), show the plan, train it against the deadline and
record what completed (``artifacts/budget/plan.json``).

The deadline counts from the run's entry (``RunSettings.started``: the command's start for
``python run.py``, the call's for a run started in-process, e.g. from a notebook). Training
must end :func:`~pipeline.budget.reserve_seconds` before it, which leaves the time for the
blend and the report. Members train seed by seed (every fold of seed 0 of every model, then seed
1 ...), so the members that complete form whole seeds; no unit starts unless its estimate ends
before the training deadline, and a member still training then stops after its last end-of-epoch
checkpoint (the same command with a larger budget continues it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import yaml

from pipeline import members
from pipeline.budget import (FIRST_SEED_GUARD, BudgetRecord, Cost, ModelPlan, Plan, Range, format_minutes, plan,
                             reserve_seconds, save_record)
from pipeline.members import MemberKey
from pipeline.paths import MANIFEST, RESUME
from pipeline.device import select_device
from pipeline.settings import FitMethod
from pipeline.augment import tta_views
from pipeline.train.engine import planned_epochs
from pipeline.train.resume import resume_cache_keys
from pipeline.train.runtime import fold_jobs
from pipeline.train.probes import ModelTiming, decide_fusion, group_key
from pipeline.train.scheduler import MemberOutcome, Outcome, UnitPlan, schedule
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


def widest(ws: Workspace, models: list[str]) -> Workspace:
    """``ws`` with each of ``models`` at the top of its seeds range and its configured epochs
    (``train.min_steps`` off): the members whose steps are timed for the plan."""
    top = Plan(0.0, 0.0, 0.0, tuple(_model_plan(ws, m) for m in models))
    return ws.with_settings(ws.settings.planned(top))


def _model_plan(ws: Workspace, model: str) -> ModelPlan:
    r = ws.settings.models[model].ranges
    return ModelPlan(model, r.seeds_hi, r.knee, 0.0)


MARGIN = 1.1  # planned costs are 10% over the timed steps: a shared machine drifts, and 5 steps are few


def costs(ws: Workspace, timed: dict[str, ModelTiming], fused_models: frozenset[str], models: list[str],
          k: int) -> dict[str, Cost]:
    """Each model's :class:`~pipeline.budget.Cost` from its timings (:func:`~pipeline.train.probes.time_models`:
    a member alone and, for a model that trains fused, its share of a fused group, each timed at
    its knee epochs with the units side by side), times :data:`MARGIN`: per epoch, those seconds
    / epochs plus a validation of its fold every ``runtime.val_every`` epochs; once per member,
    2 s of set-up and the final prediction of its fold and the test set in every TTA view, at the
    seconds per image timed for a prediction batch (``ModelTiming.predict_s``; none for a linear
    probe or top stages, whose timing holds its predictions). A transfer model's cached frozen
    pass (``ModelTiming.cache``) is its ``once``. A model timed with the machine to itself too
    (``ModelTiming.solo``) gets its ``solo_per_epoch`` likewise."""
    out = {}
    n_train, n_test = len(ws.comp.x_train), len(ws.comp.x_test)
    for m in models:
        s, t = ws.settings.models[m], timed[m]
        validation = t.predict_s * n_train / k / max(1, ws.settings.runtime.val_every)
        final = t.predict_s * len(tta_views(s.tta)) * (n_train / k + n_test)
        if s.train.fit is not FitMethod.gradient:  # its timing holds its predictions already
            validation = final = 0.0
        group = MARGIN * (t.group / s.ranges.knee + validation) if m in fused_models and t.group is not None else None
        solo = MARGIN * (t.solo / s.ranges.knee + validation) if t.solo is not None else None
        out[m] = Cost(MARGIN * (t.alone / s.ranges.knee + validation), MARGIN * (final + 2.0), k, group, t.size, solo,
                      MARGIN * t.cache)
    return out


def existing_epochs(ws: Workspace, model: str) -> int | None:
    """The epochs of ``model``'s members that already exist (complete, or an end-of-epoch
    checkpoint, which a fused member writes too), so that a larger budget continues them: the
    first found, or None. An unreadable one is passed over (the training itself reports it)."""
    r = ws.settings.models[model].ranges
    dirs = [ws.paths.member_dir(model, f, s) for s in range(r.seeds_hi) for f in range(ws.settings.folds.k)]
    for d in dirs:
        if (d / MANIFEST).exists():
            try:
                return int(members.read_config(d)["train"]["epochs"])
            except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
                continue
    for path in [d / RESUME for d in dirs]:
        keys = resume_cache_keys(path) if path.exists() else None
        if not keys:
            continue
        try:
            return int(yaml.safe_load(keys[0])["train"]["epochs"])
        except (ValueError, TypeError, KeyError, yaml.YAMLError):
            continue
    return None


def step_ranges(ws: Workspace, models: list[str]) -> Workspace:
    """``ws`` with each of ``models``' epoch ranges scaled to its data: where a fold's training
    rows give fewer optimizer steps than ``train.min_steps`` in the range's knee epochs (a small
    competition), the knee becomes the epochs that make those steps
    (:func:`~pipeline.train.engine.planned_epochs`) and the top of the range grows by the same
    factor; the lowest epochs stay. So the plan counts in steps, whatever the competition's size:
    the digits' ranges are unchanged, a competition of 2,000 images gets tens of epochs."""
    rows = int((ws.folds != 0).sum())
    models_s = dict(ws.settings.models)
    for m in models:
        s = models_s[m]
        r = s.ranges
        knee = planned_epochs(dataclasses.replace(s.train, epochs=r.knee), rows // s.train.batch_size)
        if knee > r.knee:
            hi = max(r.epochs_hi, math.ceil(r.epochs_hi * knee / r.knee))
            models_s[m] = dataclasses.replace(s, ranges=Range(r.epochs_lo, knee, hi, r.seeds_lo, r.seeds_hi))
    return ws.with_settings(dataclasses.replace(ws.settings, models=models_s))


def make_plan(ws: Workspace, models: list[str]) -> tuple[BudgetRecord, dict[str, Cost], UnitPlan]:
    """Time each model where it will train (and decide ``runtime.fuse=auto`` by it,
    :func:`~pipeline.train.probes.decide_fusion`), then plan the budget (epoch ranges in steps,
    :func:`step_ranges`) in the units the
    scheduler will train (:func:`pipeline.budget.plan` with the scheduler's own grouping,
    :func:`~pipeline.train.probes.group_key`). Returns the record (no results yet), each
    model's measured cost, and the fusion decision with the unit seconds the scheduler checks
    against the deadline; the first model's first seed (the submission) protected: planned to
    fit :data:`~pipeline.budget.FIRST_SEED_GUARD` times slower, never dropped, stopped only
    half-way into the reserve. Raises ConfigError when even the smallest plan does not fit (one
    line naming the budget that would)."""
    ws = step_ranges(ws, models)
    budget, rt = ws.settings.budget, ws.settings.runtime
    started = ws.settings.started
    wide = widest(ws, models)
    device = select_device(rt.device)
    keys = [k for m in models for k in wide.keys(m)]
    slots = fold_jobs(rt.fold_jobs, device, len(keys))
    # the first model is the one that can train alone in a round's tail (the others join it)
    fusion = decide_fusion(wide, keys, slots, device, measure=True, solo=frozenset(models[:1]))
    fixed = {m: e for m in models if (e := existing_epochs(ws, m)) is not None}
    ranges = {m: ws.settings.models[m].ranges for m in models}
    reserve = reserve_seconds(budget)
    available = started + budget - reserve - time.time()
    measured = costs(ws, fusion.timed, fusion.models, models, ws.settings.folds.k)
    p = plan(budget, available, measured, ranges, models, fixed, slots,
             lambda t: group_key(ws, MemberKey(t[0], t[2], t[1]), fusion.models), fusion.fuse_max, FIRST_SEED_GUARD)
    epochs = {m.model: m.epochs for m in p.models}
    first = frozenset(MemberKey(models[0], f, 0) for f in range(ws.settings.folds.k))
    units = UnitPlan(fusion, lambda u, sharing: measured[u[0].model].unit(len(u), epochs[u[0].model], sharing),
                     first, started + budget - p.reserve / 2)  # the submission may use half the reserve
    return BudgetRecord(p, started, started + budget), measured, units


def run(ws: Workspace) -> list[MemberOutcome]:
    """Stage ``train`` with ``budget=``: plan, show the plan, train it seed by seed against the
    deadline, record what completed, and leave ``ws`` under the complete members' settings for the
    stages that follow (``stage=all``).

    Returns one outcome per planned member. Pseudo-label rounds are not planned (left out, with
    one log line). Raises ConfigError for a budget too small for one seed of the first model at its
    lowest epochs.
    """
    selected = ws.settings.selection.models
    rounds = [m for m in selected if ws.settings.models[m].base is not None]
    models = [m for m in selected if m not in rounds]
    if rounds:
        log.info("budget: pseudo-label rounds are not planned under a budget; %s left out (run without "
                 "budget= to train them)", ", ".join(rounds))
    record, measured, units = make_plan(ws, models)
    p = record.plan
    log.info("budget: a member-epoch, timed here (+%.0f%%): %s", 100 * (MARGIN - 1), "; ".join(
        f"{m} {c.per_epoch:.1f} s" + (f" ({c.solo_per_epoch:.1f} s as a round's odd last member, alone on the "
                                       f"machine)" if c.solo_per_epoch is not None else "")
        + (f", its cache {c.once:.0f} s once" if c.once else "") for m, c in measured.items()))
    log.info("budget: %s from the command's start; the plan, from steps timed here:\n%s",
             format_minutes(p.budget), p.table())
    planned = ws.with_settings(ws.settings.planned(p))
    save_record(ws.paths.budget_plan, record)
    folds = ws.settings.selection.folds
    top = max(m.seeds for m in p.models)
    keys = [MemberKey(m.model, f, s) for s in range(top) for m in p.models if s < m.seeds
            for f in folds]
    t0 = time.time()
    outcomes = schedule(planned, keys, deadline=record.deadline - p.reserve, planned=units)
    complete = {m.model: _complete_seeds(planned, m.model, m.seeds) for m in p.models}
    complete |= dict.fromkeys(rounds, 0)
    by = {o: [str(x.key) for x in outcomes if x.outcome is o] for o in Outcome}
    done = BudgetRecord(p, record.started, record.deadline, complete,
                        tuple(by[Outcome.TRAINED] + by[Outcome.RETRAINED]), tuple(by[Outcome.STOPPED]),
                        tuple(by[Outcome.DROPPED]), time.time() - t0)
    save_record(ws.paths.budget_plan, done)
    for m in p.models:
        if complete[m.model] < m.seeds:
            log.info("budget: %s: %d of %d planned seed(s) complete; the blend uses those (dropped: %s)",
                     m.model, complete[m.model], m.seeds,
                     ", ".join(str(o.key) for o in outcomes if o.key.model == m.model
                               and o.outcome in (Outcome.DROPPED, Outcome.STOPPED)) or "none")
    ws.use_settings(ws.settings.planned(p, complete))
    return outcomes


def _complete_seeds(ws: Workspace, model: str, seeds: int) -> int:
    """How many leading seeds of ``model`` have every fold complete (verified)."""
    n = 0
    for s in range(seeds):
        if not all(ws.verify(MemberKey(model, f, s)).ok for f in range(ws.settings.folds.k)):
            break
        n += 1
    return n
