"""Which members to train, and where: the pending scan, per-member file locks, fused groups and
side-by-side worker processes (joblib/loky, :mod:`pipeline.train.workers`); what to train as
which unit, and the estimate, come from :mod:`pipeline.train.probes`.

Every member is trained under ``<member dir>.lock``, so parallel processes (side-by-side
workers, Hydra launcher jobs, other machines on a shared filesystem) never write one twice: with
``runtime.lock=wait`` a second process waits and then finds the member cached; with ``skip`` it
moves on. Results do not depend on which process trained a member (its seed comes from its key).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from filelock import FileLock, Timeout

from pipeline import members
from pipeline.budget import side_by_side
from pipeline.device import device_name, select_device, use_device
from pipeline.errors import PipelineError
from pipeline.members import MemberKey, MemberStatus
from pipeline.paths import RESUME
from pipeline.settings import FitMethod, LockMode, RuntimeSettings
from pipeline.train import fused
from pipeline.train.engine import DeadlineReached, FitSpec, fit_member, warm_cache
from pipeline.train.probes import (Estimate, FuseChoice, Fusion, decide_fusion, estimate, member_pseudo, member_spec,
                                   plan_units)
from pipeline.train.runtime import configure_threads, fold_jobs
from pipeline.train.workers import enter_worker, log_handlers
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


class Outcome(Enum):
    """What ``stage=train`` did with one member."""

    TRAINED = "trained"                # no complete member was there
    RETRAINED = "retrained"            # a stale or corrupt member was replaced (reason says why)
    CACHED = "cached"                  # complete and current: skipped
    SKIPPED_LOCKED = "skipped-locked"  # another process holds its lock (runtime.lock=skip)
    DROPPED = "dropped"                # not started: it would not end before the budget's deadline
    STOPPED = "stopped"                # stopped at the budget's deadline; its checkpoint stays
    FAILED = "failed"                  # diverged in a fused group and left it (the others trained on)


@dataclass
class MemberOutcome:
    """One member's outcome; ``metrics`` is its ``metrics.json`` when it was (re)trained."""

    key: MemberKey
    outcome: Outcome
    reason: str = ""
    metrics: dict | None = None


def _write(ws: Workspace, key: MemberKey, spec: FitSpec, res, choice: FuseChoice | None = None) -> dict:
    """Write a trained member's files (:func:`pipeline.members.write_member`), with ``choice``
    (what ``runtime.fuse`` decided for its model) in its ``metrics.json``, record it verified and
    log its line. Returns its metrics."""
    if choice is not None:
        res.metrics["fuse"] = choice.to_json()
    meta = members.checkpoint_metadata(spec.arch, spec.kwargs, ws.comp.num_classes,
                                       int(ws.comp.x_train.shape[1]), ws.comp.side)
    ws.record(key, members.write_member(ws.member_dir(key), ws.member_config(key), res.model, meta, res.row_ids,
                                        res.oof, res.test, res.metrics))
    m = res.metrics
    group = f" (fused group of {m['fused']['members']})" if m.get("fused") else ""
    log.info("train: %s: OOF acc %.5f, log loss %.4f, %d epochs, %.1f s on %s%s", key, m["accuracy"],
             m["log_loss"], m["epochs"], m["seconds"], m["device"], group)
    return m


def train_member(ws: Workspace, key: MemberKey, runtime: RuntimeSettings | None = None,
                 deadline: float | None = None, choice: FuseChoice | None = None,
                 predict_s: float | None = None) -> dict:
    """Train one member (resuming its checkpoint if any) with ``runtime`` (default: the run's)
    until ``deadline`` at most (its predictions counted at ``predict_s`` seconds per image when
    timed, :func:`~pipeline.train.engine.check_deadline`), write its files, record it verified in
    ``ws`` and return its metrics. Raises PipelineError (NaN loss: nothing is cached),
    DeadlineReached (its checkpoint stays)."""
    out = ws.member_dir(key)
    spec = member_spec(ws, key, runtime, deadline, predict_s)
    res = fit_member(spec, ws.comp, ws.folds, resume_path=out / RESUME, pseudo=member_pseudo(ws, key))
    m = _write(ws, key, spec, res, choice)
    (out / RESUME).unlink(missing_ok=True)
    return m


def train_group(ws: Workspace, keys: list[MemberKey], runtime: RuntimeSettings | None = None,
                deadline: float | None = None, choice: FuseChoice | None = None,
                predict_s: float | None = None) -> list[dict | fused.MemberFailed]:
    """Train ``keys`` (members of one model) as one fused group
    (:func:`pipeline.train.fused.fit_group`) in the memory layout ``choice`` measured faster
    (:meth:`~pipeline.train.probes.FuseChoice.group_runtime`), its predictions counted against
    ``deadline`` at ``predict_s`` seconds per image when timed, each member continuing its own
    ``resume.pt`` if any; write every member's ordinary files, record them verified and return
    their metrics, in order, or a :class:`~pipeline.train.engine.MemberFailed` for a member that
    diverged and left the group (the others trained on). A group that runs out of GPU memory is
    halved, each half continuing from its members' end-of-epoch checkpoints (one log line).
    Raises DeadlineReached (every member's checkpoint stays)."""
    if choice is not None:
        runtime = choice.group_runtime(runtime or ws.settings.runtime)
    specs = [member_spec(ws, k, runtime, deadline, predict_s) for k in keys]
    paths = [ws.member_dir(k) / RESUME for k in keys]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    log.info("train: %s: %d members trained as one fused network (runtime.fuse)", keys[0].model, len(keys))
    try:
        results = fused.fit_group(specs, ws.comp, ws.folds, resume_paths=paths,
                                  pseudo=[member_pseudo(ws, k) for k in keys])
    except torch.cuda.OutOfMemoryError:
        if len(keys) == 1:
            raise
        half = (len(keys) + 1) // 2
        log.info("train: %s: a fused group of %d ran out of GPU memory; it continues as groups of %d and %d from "
                 "its members' checkpoints", keys[0].model, len(keys), half, len(keys) - half)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (train_group(ws, keys[:half], runtime, deadline, choice, predict_s)
                + train_group(ws, keys[half:], runtime, deadline, choice, predict_s))
    out: list[dict | fused.MemberFailed] = []
    for key, spec, res, path in zip(keys, specs, results, paths):
        if isinstance(res, fused.MemberFailed):  # fit_group logged its line
            out.append(res)
            continue
        out.append(_write(ws, key, spec, res, choice))
        path.unlink(missing_ok=True)
    return out


def train_locked(ws: Workspace, key: MemberKey, runtime: RuntimeSettings | None = None) -> MemberOutcome:
    """Train one member under its file lock unless it is (or, after waiting for another
    process, has become) cached; ``force=true`` retrains a cached one. ``runtime``: a side-by-side
    worker's own (device, progress bar, DataLoader workers); default the run's."""
    return train_unit_locked(ws, (key,), runtime)[0]


def _acquire(ws: Workspace, key: MemberKey) -> FileLock | None:
    """The member's file lock, held; None when another process holds it and ``runtime.lock=skip``
    (with ``wait``: waits for it, then forgets what was known of the member)."""
    lock_path = ws.paths.member_lock(key.model, key.fold, key.seed_index)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if ws.settings.runtime.lock is LockMode.skip:
            log.info("train: %s: another process holds %s; skipped (runtime.lock=skip)", key, lock_path)
            return None
        log.info("train: %s: another process holds %s; waiting", key, lock_path)
        lock.acquire()
        ws.forget(key)  # the other process may have written it meanwhile
    return lock


def train_unit_locked(ws: Workspace, unit: tuple[MemberKey, ...], runtime: RuntimeSettings | None = None,
                      deadline: float | None = None, seconds: float = 0.0,
                      choice: FuseChoice | None = None, predict_s: float | None = None,
                      protect: bool = False) -> list[MemberOutcome]:
    """Train the members of ``unit`` (one member, or a fused group of one model's members) under
    all their file locks (taken in key order), except those that are (or, after waiting for
    another process, have become) cached and, with ``runtime.lock=skip``, those another process
    holds; ``force=true`` retrains cached ones. Two or more left train as one fused group, one
    alone. With a ``deadline`` (``budget=``): members that would not end before it (``seconds``
    estimated for the unit) are dropped unstarted, and training stopped by it keeps its
    checkpoint (outcome STOPPED); ``predict_s``: the timed seconds per predicted image that its
    deadline checks count (None: not timed); ``protect``: the unit is part of the submission (the
    first model's first seed) and starts even when its estimate ends after the deadline. Returns
    one outcome per member of ``unit``, in order."""
    outcomes: dict[MemberKey, MemberOutcome] = {}
    locks, train = [], []
    try:
        for key in sorted(unit):
            lock = _acquire(ws, key)
            if lock is None:
                outcomes[key] = MemberOutcome(key, Outcome.SKIPPED_LOCKED, "locked by another process "
                                              f"({ws.paths.member_lock(key.model, key.fold, key.seed_index)})")
                continue
            locks.append(lock)
            v = ws.verify(key)
            if v.ok and not ws.settings.selection.force:
                log.info("train: %s: cached, skipped (force=true retrains)", key)
                outcomes[key] = MemberOutcome(key, Outcome.CACHED, v.reason)
                continue
            if v.status in (MemberStatus.STALE, MemberStatus.CORRUPT):
                log.info("train: %s: retraining, %s", key, v.reason)
            outcome = Outcome.RETRAINED if v.ok or v.status in (MemberStatus.STALE, MemberStatus.CORRUPT) \
                else Outcome.TRAINED
            outcomes[key] = MemberOutcome(key, outcome, "force=true" if v.ok else v.reason)
            train.append(key)
        train = [k for k in unit if k in train]  # the unit's order: the group's seeds follow it
        train = _start_or_drop(train, outcomes, deadline, seconds, protect)
        try:
            if len(train) == 1:
                outcomes[train[0]].metrics = train_member(ws, train[0], runtime, deadline, choice, predict_s)
            elif train:
                for key, metrics in zip(train, train_group(ws, train, runtime, deadline, choice, predict_s)):
                    if isinstance(metrics, fused.MemberFailed):
                        outcomes[key] = MemberOutcome(key, Outcome.FAILED, metrics.reason)
                    else:
                        outcomes[key].metrics = metrics
        except DeadlineReached as e:
            log.info("train: %s; stopped after its last end-of-epoch checkpoint (the same command with a "
                     "larger budget continues it)", e)
            for key in train:
                outcomes[key] = MemberOutcome(key, Outcome.STOPPED, "stopped at the budget's deadline")
    finally:
        for lock in locks:
            lock.release()
    return [outcomes[k] for k in unit]


def _start_or_drop(train: list[MemberKey], outcomes: dict[MemberKey, MemberOutcome], deadline: float | None,
                   seconds: float, protect: bool) -> list[MemberKey]:
    """The members of ``train`` that start: all, unless their ``seconds`` would end after the
    ``deadline`` (then each is DROPPED in ``outcomes``) and they are not ``protect``-ed (the
    submission's, which start anyway, with one log line)."""
    if not train or deadline is None or time.time() + seconds <= deadline:
        return train
    if protect:
        log.info("train: %s: starts although about %.1f min of training may end after the budget's deadline: "
                 "the first model's first seed is the submission", ", ".join(map(str, train)), seconds / 60)
        return train
    for key in train:
        log.info("train: %s: dropped, not started: about %.1f min of training would end after the "
                 "budget's deadline", key, seconds / 60)
        outcomes[key] = MemberOutcome(key, Outcome.DROPPED, "would end after the budget's deadline")
    return []


def _announce(ws: Workspace, est: Estimate, device) -> None:
    minutes = est.minutes_left(set())
    log.info("train: %d member(s) to train%s, about %.1f min on %s (%d side by side; estimated from "
             "5 timed steps of each model)", len(est.member_seconds),
             f" ({est.later} of them in a pseudo-label round, counted with every test row)" if est.later else "",
             minutes, device_name(device), est.n_jobs)
    if device.type == "cpu" and ws.settings.selection.sized_for == "gpu":
        log.warning("train: this profile is sized for a GPU, and this machine has none: about %.0f min "
                    "here; for a CPU run use profile=quick", minutes)


def _progress(est: Estimate, done: dict[MemberKey, float]) -> None:
    """After each finished member: how many are left and the minutes to go, rescaled by how the
    finished members' real seconds compare with their estimates."""
    estimated = sum(est.member_seconds[k] for k in done)
    ratio = sum(done.values()) / estimated if estimated > 0 else 1.0
    left = len(est.member_seconds) - len(done)
    if left:
        log.info("train: %d of %d member(s) done, about %.1f min to go", len(done), len(est.member_seconds),
                 est.minutes_left(set(done), ratio))


def _worker(ws: Workspace, unit: tuple[MemberKey, ...], slot: int, sharing: int, handlers: list,
            level: int, deadline: float | None = None, seconds: float = 0.0, choice: FuseChoice | None = None,
            protect: bool = False,
            predict_s: float | None = None) -> tuple[tuple[MemberKey, ...], list[MemberOutcome] | PipelineError]:
    """One side-by-side unit, a member or a fused group (in a joblib worker process,
    :func:`~pipeline.train.workers.enter_worker`; ``sharing``: the units training at once, :func:`side_by_side`).
    Returns its outcomes, or the user error that stopped it (so the other units can finish first)."""
    runtime = enter_worker(ws, slot, sharing, handlers, level)
    try:
        return unit, train_unit_locked(ws, unit, runtime, deadline, seconds, choice, predict_s, protect)
    except PipelineError as e:
        return unit, e


def _pending(ws: Workspace, keys: list[MemberKey]) -> tuple[dict[MemberKey, MemberOutcome], list[MemberKey]]:
    """The cached members of ``keys`` (their outcomes; ``force=true``: none) and the others."""
    done, pending = {}, []
    for key in keys:
        v = ws.verify(key)
        if v.ok and not ws.settings.selection.force:
            log.info("train: %s: cached, skipped (force=true retrains)", key)
            done[key] = MemberOutcome(key, Outcome.CACHED, v.reason)
        else:
            pending.append(key)
    return done, pending


@dataclass(frozen=True)
class UnitPlan:
    """What a budget's plan (:mod:`pipeline.train.budgeted`) fixed before :func:`schedule`: the
    fusion decision and ``seconds(unit, sharing)``, the planned seconds of a unit trained with
    ``sharing`` units at once (:meth:`pipeline.budget.Cost.unit`,
    :func:`~pipeline.budget.side_by_side`), so that the scheduler checks each unit against the
    deadline with the seconds the plan counted."""

    fusion: Fusion
    seconds: Callable[[tuple[MemberKey, ...], int], float]
    protected: frozenset = frozenset()  # the submission's members: the first model's first seed
    protected_deadline: float | None = None  # theirs: later than the others' (into the reserve)


def schedule(ws: Workspace, keys: list[MemberKey], later: list[MemberKey] = (), deadline: float | None = None,
             planned: UnitPlan | None = None) -> list[MemberOutcome]:
    """Train every member of ``keys`` that is not cached: fused groups where fusion is on or
    measured faster (:func:`~pipeline.train.probes.decide_fusion`,
    :func:`~pipeline.train.probes.plan_units`), ``runtime.fold_jobs`` units side
    by side. ``later`` (the pseudo-label round members that will follow) only counts in the
    estimate. With a ``deadline`` (``time.time()``, ``budget=``) no unit starts unless its
    seconds (``planned``'s, else timed here) end before it, and training stops at it
    (:func:`train_unit_locked`).

    Returns one :class:`MemberOutcome` per key, in order. A user error in a worker is raised
    (as the project's one-line error) once the other units have finished and kept their files.
    """
    rt = ws.settings.runtime
    device = select_device(rt.device)
    done, pending = _pending(ws, keys)
    slots = fold_jobs(rt.fold_jobs, device, len(pending))
    if pending and slots == 1:
        use_device(device)
        configure_threads(rt.threads, device)
    fusion, units, est = _units(ws, pending, later, slots, device, deadline, planned)
    n_jobs = fold_jobs(rt.fold_jobs, device, len(units))
    groups = [u for u in units if len(u) > 1]
    log.info("train: %d member(s) cached, %d to train%s%s", len(done), len(pending),
             f" ({sum(map(len, groups))} of them in {len(groups)} fused group(s) of "
             f"{'/'.join(str(len(u)) for u in groups)})" if groups else "",
             f", {n_jobs} side by side (runtime.fold_jobs={rt.fold_jobs})" if n_jobs > 1 else "")
    if not pending:
        return [done[k] for k in keys]
    if est is not None and planned is None:
        _announce(ws, est, device)
    if n_jobs > 1:
        _warm_caches(ws, pending)
    _train_units(ws, units, fusion, est, n_jobs, deadline, done, planned)
    failed = [done[k] for k in keys if done[k].outcome is Outcome.FAILED]
    if failed:  # every other member has trained and kept its files
        raise PipelineError(failed[0].reason if len(failed) == 1 else
                            f"{len(failed)} members diverged and were not cached: " + "; ".join(o.reason for o in failed))
    return [done[k] for k in keys]


def _warm_caches(ws: Workspace, pending: list[MemberKey]) -> None:
    """Compute the caches that the folds of a linear probe or a top-stages model share (their
    features or activations, :func:`pipeline.train.engine.warm_cache`) here, with every thread,
    before the units train side by side: else the first fold computes it on its one thread while
    the others wait for it."""
    first: dict[str, MemberKey] = {}
    for key in pending:
        if ws.settings.models[key.model].train.fit is not FitMethod.gradient:
            first.setdefault(key.model, key)
    for key in first.values():
        warm_cache(member_spec(ws, key), ws.comp)


def _units(ws: Workspace, pending: list[MemberKey], later: list[MemberKey], slots: int, device,
           deadline: float | None,
           planned: UnitPlan | None) -> tuple[Fusion, list[tuple[MemberKey, ...]], Estimate | None]:
    """The fusion decision, the units to train on ``slots`` slots and their estimate (None when
    nothing was timed): ``planned``'s (a budget's plan), else decided here, measured when
    ``runtime.estimate`` is on or there is a ``deadline``."""
    if planned is not None:
        fusion = planned.fusion
        units = plan_units(ws, pending, device, fusion.models, slots, fusion.fuse_max)
        n_jobs = min(slots, max(1, len(units)))
        shares = side_by_side([u[0].model for u in units], n_jobs)
        return fusion, units, Estimate({k: planned.seconds(u, share) / len(u) for u, share in zip(units, shares)
                                        for k in u}, n_jobs)
    rt = ws.settings.runtime
    measure = bool(pending) and (rt.estimate or deadline is not None)
    fusion = decide_fusion(ws, pending, slots, device, measure, list(later))
    units = plan_units(ws, pending, device, fusion.models, slots, fusion.fuse_max)
    est = None
    if fusion.timed is not None:
        est = estimate(ws, units, min(slots, len(units)), device, list(later), fusion.timed)
    return fusion, units, est


def training_seconds(metrics: dict) -> float:
    """A finished member's seconds (its ``metrics.json``) less those of a cache its model's folds
    share (``cache_seconds``: a linear probe's features, a top-stages member's activations,
    computed by one fold and waited for by the others, planned as a share of each)."""
    return metrics.get("seconds", 0.0) - metrics.get("cache_seconds", 0.0)


def observed_slowdown(finished: dict[MemberKey, float], planned: dict[MemberKey, float], model: str) -> float:
    """How much slower ``model``'s members trained so far ran than planned: their seconds
    (``finished``) over their planned seconds, at least 1 (a faster machine keeps the plan); 1
    before any. Per model: another model's members say nothing of this one's price. A linear
    probe's or a top-stages member's seconds come without the cache its folds share (computed by
    the first, waited for by the others, planned as a share of each: ``cache_seconds``)."""
    keys = [k for k in finished if k.model == model and planned.get(k, 0.0) > 0]
    if not keys:
        return 1.0
    return max(1.0, sum(finished[k] for k in keys) / sum(planned[k] for k in keys))


def _train_units(ws: Workspace, units: list[tuple[MemberKey, ...]], fusion: Fusion, est: Estimate | None,
                 n_jobs: int, deadline: float | None, done: dict[MemberKey, MemberOutcome],
                 planned: UnitPlan | None = None) -> None:
    """Train ``units``, ``n_jobs`` side by side (:func:`_side_by_side`) or one after the other
    here, each with its fusion choice and estimated seconds, scaled before it starts by the
    slowdown observed so far on its model's members (:func:`observed_slowdown`): on a machine that
    slowed after the timing, later units are dropped rather than the submission's. ``planned``'s protected units
    (the first model's first seed) are never dropped and stop at its later deadline. Puts every
    member's outcome in ``done`` and logs the progress (:func:`_progress`) as each unit ends."""
    finished: dict[MemberKey, float] = {}

    def finish(outcomes: list[MemberOutcome]) -> None:
        for outcome in outcomes:
            done[outcome.key] = outcome
            if outcome.outcome not in (Outcome.DROPPED, Outcome.STOPPED, Outcome.FAILED):
                finished[outcome.key] = training_seconds(outcome.metrics or {})
        if est is not None:
            _progress(est, finished)

    def slowdown(model: str) -> float:
        return observed_slowdown(finished, est.member_seconds, model) if est is not None else 1.0

    seconds = [sum(est.member_seconds.get(k, 0.0) for k in u) if est is not None else 0.0 for u in units]
    unit_choices = [fusion.choices.get(u[0].model) for u in units]
    rates = [fusion.predict_s(u[0].model) for u in units]
    protect = [planned is not None and any(k in planned.protected for k in u) for u in units]
    deadlines = [planned.protected_deadline if p and planned.protected_deadline is not None else deadline
                 for p in protect]
    if n_jobs == 1:
        for unit, s, choice, rate, p, d in zip(units, seconds, unit_choices, rates, protect, deadlines):
            finish(train_unit_locked(ws, unit, None, d, s * slowdown(unit[0].model), choice, rate, p))
    else:
        _side_by_side(ws, units, [lambda s=s, m=u[0].model: s * slowdown(m) for s, u in zip(seconds, units)],
                      unit_choices, n_jobs, deadlines, finish, rates, protect)


def _side_by_side(ws: Workspace, units: list[tuple[MemberKey, ...]], seconds: list[Callable[[], float]],
                  choices: list, n_jobs: int, deadlines: list[float | None], finish, rates: list | None = None,
                  protect: list[bool] | None = None) -> None:
    """Train ``units`` in ``n_jobs`` joblib worker processes (:func:`_worker`; ``rates``: each
    unit's timed seconds per predicted image, or None), calling ``finish(outcomes)`` as each ends.
    Each unit's estimate (``seconds[i]()``) is read when it is dispatched, one unit ahead of the
    free worker, so it sees the slowdown of the units finished by then. A user error in a worker
    is raised once the other units have finished and kept their files."""
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    handlers, level = log_handlers(), logging.getLogger().level
    errors, shares = [], side_by_side([u[0].model for u in units], n_jobs)
    protect = protect or [False] * len(units)
    for unit, r in Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered", pre_dispatch="n_jobs")(
            delayed(_worker)(ws, unit, i % n_jobs, shares[i], handlers, level, deadlines[i], seconds[i](), choices[i],
                             protect[i], rates[i] if rates is not None else None)
            for i, unit in enumerate(units)):
        for key in unit:
            ws.forget(key)  # what the worker wrote, as this process's workspace sees it
        if isinstance(r, PipelineError):
            errors.append(r)
            continue
        for o in r:
            if o.metrics is not None:
                ws.record(o.key, members.Verification(MemberStatus.OK, "cached"))
        finish(r)
    get_reusable_executor().shutdown(wait=True)  # free their memory now, not after loky's idle timeout
    if errors:  # every other unit has finished and kept its files
        raise errors[0]
