"""``stage=train`` under ``budget=``: measure what each model costs here, plan the seeds and
epochs that fit (:func:`pipeline.budget.plan`), show the plan, train it against the deadline and
record what completed (``artifacts/budget/plan.json``).

The deadline counts from the command's start (:func:`pipeline.budget.process_start`). Training
must end :func:`~pipeline.budget.reserve_seconds` before it, which leaves the time for the
blend and the report. Members train seed by seed (every fold of seed 0 of every model, then seed
1 ...), so the members that complete form whole seeds; no unit starts unless its estimate ends
before the training deadline, and a member still training then stops after its last end-of-epoch
checkpoint (the same command with a larger budget continues it).
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import members
from pipeline.budget import (BudgetRecord, Cost, ModelPlan, Plan, format_minutes, plan, process_start,
                             reserve_seconds, save_record)
from pipeline.members import MemberKey
from pipeline.paths import MANIFEST, RESUME
from pipeline.device import select_device
from pipeline.settings import round_base, selected_folds, selected_models
from pipeline.augment import tta_views
from pipeline.train.engine import INFERENCE_COST
from pipeline.train.resume import resume_cache_keys
from pipeline.train.runtime import fold_jobs
from pipeline.train.scheduler import Estimate, MemberOutcome, Outcome, estimate, plan_units, schedule
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


def costs(ws: Workspace, est: Estimate, models: list[str], k: int) -> dict[str, Cost]:
    """Each model's :class:`~pipeline.budget.Cost` from the estimate (a member's own seconds,
    timed at its knee epochs with ``est.n_jobs`` side by side), times :data:`MARGIN`: per epoch,
    member seconds / epochs plus a validation of its fold every ``runtime.val_every`` epochs; once
    per member, 2 s of set-up and the final prediction of its fold and the test set in every TTA
    view. A prediction costs :data:`~pipeline.train.engine.INFERENCE_COST` of a training image."""
    out = {}
    n_train, n_test = len(ws.comp.x_train), len(ws.comp.x_test)
    for m in models:
        s = ws.settings.models[m]
        member = next(v for key, v in est.member_seconds.items() if key.model == m)
        per_epoch = member / s.ranges.knee
        per_image = per_epoch / (n_train * (k - 1) / k) * INFERENCE_COST
        validation = per_image * n_train / k / max(1, ws.settings.runtime.val_every)
        final = per_image * len(tta_views(s.tta)) * (n_train / k + n_test)
        out[m] = Cost(MARGIN * (per_epoch + validation), MARGIN * (final + 2.0), k)
    return out


def existing_epochs(ws: Workspace, model: str) -> int | None:
    """The epochs of ``model``'s members that already exist (complete, an end-of-epoch checkpoint,
    or a fused group's checkpoint), so that a larger budget continues them: the first found, or
    None. An unreadable one is passed over (the training itself reports it)."""
    r = ws.settings.models[model].ranges
    dirs = [ws.paths.member_dir(model, f, s) for s in range(r.seeds_hi) for f in range(ws.settings.folds.k)]
    for d in dirs:
        if (d / MANIFEST).exists():
            try:
                return int(members.read_config(d).train.epochs)
            except (OSError, ValueError, TypeError, AttributeError, OmegaConfBaseException):
                continue
    for path in [d / RESUME for d in dirs] + ws.paths.group_resumes(model):
        keys = resume_cache_keys(path) if path.exists() else None
        if not keys:
            continue
        try:
            return int(OmegaConf.create(keys[0]).train.epochs)
        except (ValueError, TypeError, AttributeError, OmegaConfBaseException):
            continue
    return None


def make_plan(ws: Workspace, models: list[str]) -> tuple[BudgetRecord, dict[str, Cost], int]:
    """Time each model where it will train and plan the budget (see the module docstring).
    Returns the record (no results yet), each model's measured cost and the members trained side
    by side. Raises ConfigError when even the smallest plan does not fit (one line naming the
    budget that would)."""
    budget = ws.settings.budget
    started = process_start()
    wide = widest(ws, models)
    device = select_device(ws.settings.runtime.device)
    keys = [k for m in models for k in wide.keys(m)]
    units = plan_units(wide, keys, device)
    jobs = fold_jobs(ws.settings.runtime.fold_jobs, device, len(units))
    est = estimate(wide, units, jobs, device)
    fixed = {m: e for m in models if (e := existing_epochs(ws, m)) is not None}
    ranges = {m: ws.settings.models[m].ranges for m in models}
    reserve = reserve_seconds(budget)
    available = started + budget - reserve - time.time()
    measured = costs(ws, est, models, ws.settings.folds.k)
    p = plan(budget, available, measured, ranges, models, fixed, jobs)
    return BudgetRecord(p, started, started + budget), measured, jobs


def run(cfg: DictConfig, ws: Workspace) -> list[MemberOutcome]:
    """Stage ``train`` with ``budget=``: plan, show the plan, train it seed by seed against the
    deadline, record what completed, and leave ``ws`` under the complete members' settings for the
    stages that follow (``stage=all``).

    Returns one outcome per planned member. Pseudo-label rounds are not planned (left out, with
    one log line). Raises ConfigError for a budget too small for one seed of each model at its
    lowest epochs.
    """
    rounds = [m for m in selected_models(cfg) if round_base(cfg, m) is not None]
    models = [m for m in selected_models(cfg) if m not in rounds]
    if rounds:
        log.info("budget: pseudo-label rounds are not planned under a budget; %s left out (run without "
                 "budget= to train them)", ", ".join(rounds))
    record, measured, jobs = make_plan(ws, models)
    p = record.plan
    log.info("budget: %s from the command's start; the plan, from steps timed here:\n%s",
             format_minutes(p.budget), p.table())
    planned = ws.with_settings(ws.settings.planned(p))
    save_record(ws.paths.budget_plan, record)
    folds = selected_folds(cfg)
    top = max(m.seeds for m in p.models)
    keys = [MemberKey(m.model, f, s) for s in range(top) for m in p.models if s < m.seeds
            for f in (folds if folds is not None else range(ws.settings.folds.k))]
    t0 = time.time()
    epochs = {m.model: m.epochs for m in p.models}
    est = Estimate({k: measured[k.model].member(epochs[k.model]) for k in keys}, jobs)
    outcomes = schedule(planned, keys, deadline=record.deadline - p.reserve, est=est)
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
