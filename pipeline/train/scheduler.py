"""Which members to train, and where: the pending scan, per-member file locks, side-by-side
worker processes (joblib/loky) and the watchdog that ends a worker when ``run.py`` dies.

Every member is trained under ``<member dir>.lock``, so parallel processes (side-by-side
workers, Hydra launcher jobs, other machines on a shared filesystem) never write one twice: with
``runtime.lock=wait`` a second process waits and then finds the member cached; with ``skip`` it
moves on. Results do not depend on which process trained a member (its seed comes from its key).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
from filelock import FileLock, Timeout

from pipeline import pseudo
from pipeline.errors import PipelineError
from pipeline.paths import RESUME
from pipeline.budget import form_units, unit_seconds
from pipeline.settings import AugBackend, FuseMode, LockMode, RuntimeSettings, round_base
from pipeline import members
from pipeline.models import create_model
from pipeline.train.engine import DeadlineReached, FitSpec, fit_member, seconds_per_member
from pipeline.train.inference import place_model, predict_probs
from pipeline.train import fused
from pipeline.members import MemberKey, MemberStatus
from pipeline.device import GROUP_MEMORY_SHARE, device_name, group_memory_limit, select_device, use_device
from pipeline.train.runtime import barrier, configure_threads, fold_jobs, num_workers, side_by_side
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


def _pseudo(ws: Workspace, key: MemberKey):
    """The member's pseudo rows (the file :func:`pipeline.pseudo.write_rows` wrote) when it is a
    pseudo-label round, else None."""
    if round_base(ws.cfg, key.model) is None:
        return None
    return pseudo.read_rows(ws.paths.pseudo_rows(key.model, key.fold), key.fold)


def _spec(ws: Workspace, key: MemberKey, runtime: RuntimeSettings | None = None,
          deadline: float | None = None) -> FitSpec:
    return FitSpec.create(ws.settings.models[key.model], runtime or ws.settings.runtime, key, ws.member_config(key),
                          deadline)


def _write(ws: Workspace, key: MemberKey, spec: FitSpec, res, choice: "FuseChoice | None" = None) -> dict:
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
                 deadline: float | None = None, choice: "FuseChoice | None" = None) -> dict:
    """Train one member (resuming its checkpoint if any) with ``runtime`` (default: the run's)
    until ``deadline`` at most, write its files, record it verified in ``ws`` and return its
    metrics. Raises PipelineError (NaN loss: nothing is cached), DeadlineReached (its checkpoint
    stays)."""
    out = ws.member_dir(key)
    spec = _spec(ws, key, runtime, deadline)
    res = fit_member(spec, ws.comp, ws.folds, resume_path=out / RESUME, pseudo=_pseudo(ws, key))
    m = _write(ws, key, spec, res, choice)
    (out / RESUME).unlink(missing_ok=True)
    return m


def train_group(ws: Workspace, keys: list[MemberKey], runtime: RuntimeSettings | None = None,
                deadline: float | None = None, choice: "FuseChoice | None" = None) -> list[dict | fused.MemberFailed]:
    """Train ``keys`` (members of one model) as one fused group
    (:func:`pipeline.train.fused.fit_group`), each member continuing its own ``resume.pt`` if any;
    write every member's ordinary files, record them verified and return their metrics, in order,
    or a :class:`~pipeline.train.fused.MemberFailed` for a member that diverged and left the group
    (the others trained on). A group that runs out of GPU memory is halved, each half continuing
    from its members' end-of-epoch checkpoints (one log line). Raises DeadlineReached (every
    member's checkpoint stays)."""
    specs = [_spec(ws, k, runtime, deadline) for k in keys]
    paths = [ws.member_dir(k) / RESUME for k in keys]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    log.info("train: %s: %d members trained as one fused network (runtime.fuse)", keys[0].model, len(keys))
    try:
        results = fused.fit_group(specs, ws.comp, ws.folds, resume_paths=paths, pseudo=[_pseudo(ws, k) for k in keys])
    except torch.cuda.OutOfMemoryError:
        if len(keys) == 1:
            raise
        half = (len(keys) + 1) // 2
        log.info("train: %s: a fused group of %d ran out of GPU memory; it continues as groups of %d and %d from "
                 "its members' checkpoints", keys[0].model, len(keys), half, len(keys) - half)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (train_group(ws, keys[:half], runtime, deadline, choice)
                + train_group(ws, keys[half:], runtime, deadline, choice))
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
                      choice: "FuseChoice | None" = None) -> list[MemberOutcome]:
    """Train the members of ``unit`` (one member, or a fused group of one model's members) under
    all their file locks (taken in key order), except those that are (or, after waiting for
    another process, have become) cached and, with ``runtime.lock=skip``, those another process
    holds; ``force=true`` retrains cached ones. Two or more left train as one fused group, one
    alone. With a ``deadline`` (``budget=``): members that would not end before it (``seconds``
    estimated for the unit) are dropped unstarted, and training stopped by it keeps its
    checkpoint (outcome STOPPED). Returns one outcome per member of ``unit``, in order."""
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
            if v.ok and not ws.cfg.force:
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
        if train and deadline is not None and time.time() + seconds > deadline:
            for key in train:
                log.info("train: %s: dropped, not started: about %.1f min of training would end after the "
                         "budget's deadline", key, seconds / 60)
                outcomes[key] = MemberOutcome(key, Outcome.DROPPED, "would end after the budget's deadline")
            train = []
        try:
            if len(train) == 1:
                outcomes[train[0]].metrics = train_member(ws, train[0], runtime, deadline, choice)
            elif train:
                for key, metrics in zip(train, train_group(ws, train, runtime, deadline, choice)):
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


def fusable_models(ws: Workspace, pending: list[MemberKey]) -> frozenset[str]:
    """The models of ``pending`` whose members can train fused: a :func:`pipeline.train.fused.can_fuse`
    architecture, ``runtime.compile`` off and the ``torch`` augmentation backend (the
    ``albumentations`` backend's DataLoader workers would be started once per member of a group).
    Every other model says in one log line why it trains unfused."""
    out = set()
    for model in dict.fromkeys(k.model for k in pending):
        spec = _spec(ws, next(k for k in pending if k.model == model))
        if spec.runtime.compile:
            why = "runtime.compile=true"
        elif AugBackend(spec.aug.backend) is not AugBackend.torch:
            why = f"aug.backend={AugBackend(spec.aug.backend).value}: one DataLoader per member"
        elif not fused.can_fuse(spec, ws.comp):
            why = f"{spec.arch} is not a fusable nn.Sequential"
        else:
            out.add(model)
            continue
        log.info("train: %s: %d member(s) train unfused (%s)", model, sum(k.model == model for k in pending), why)
    return frozenset(out)


def group_key(ws: Workspace, key: MemberKey, fused_models: frozenset[str]) -> tuple[str, int] | None:
    """The fused group ``key`` may join: its model and batches per epoch (members of one group
    step together), or None when its model trains unfused."""
    if key.model not in fused_models:
        return None
    rows = int((ws.folds != key.fold).sum())
    extra = _pseudo(ws, key)
    rows += len(extra.rows) if extra is not None else 0
    return key.model, rows // ws.settings.models[key.model].train.batch_size


def plan_units(ws: Workspace, pending: list[MemberKey], device, fused_models: frozenset[str] | None = None,
               slots: int | None = None, fuse_max: int | None = None) -> list[tuple[MemberKey, ...]]:
    """The units ``stage=train`` trains, in ``pending``'s order (:func:`pipeline.budget.form_units`,
    the rule the budget's planner uses too): the pending members of each of ``fused_models`` with
    equal batches per epoch (:func:`group_key`) form groups of at most ``fuse_max`` (default
    ``runtime.fuse_max``), at
    least one per side-by-side slot (``slots``; default ``runtime.fold_jobs`` for ``pending``);
    every other member is a unit of its own. ``fused_models`` None: the fusable models
    (:func:`fusable_models`) with ``runtime.fuse=on``, none otherwise (``auto`` decides by
    measuring, in :func:`decide_fusion`)."""
    rt = ws.settings.runtime
    if fused_models is None:
        fused_models = fusable_models(ws, pending) if rt.fuse is FuseMode.on else frozenset()
    if slots is None:
        slots = fold_jobs(rt.fold_jobs, device, len(pending))
    return form_units(pending, lambda k: group_key(ws, k, fused_models), fuse_max or rt.fuse_max, slots)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker process: end it as soon as the process that started it is gone (``kill -9``
    of ``run.py`` would otherwise leave workers training, holding cores or GPU memory). A member
    cut short this way keeps its last end-of-epoch resume checkpoint. One watchdog thread per
    process."""
    if any(t.name == "exit-with-parent" for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(70)  # the parent died: stop now, without cleanup (nothing is half-written)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def log_handlers() -> list[tuple[str, str, str | None, int]]:
    """The root logger's console and file handlers as ``(kind, target, format, level)``, so a
    worker process can log where the parent does (Hydra's console and the run's log file)."""
    out = []
    for h in logging.getLogger().handlers:
        fmt = h.formatter._fmt if h.formatter else None  # noqa: SLF001 - the format string itself
        if isinstance(h, logging.FileHandler):
            out.append(("file", h.baseFilename, fmt, h.level))
        elif type(h) is logging.StreamHandler:
            out.append(("stream", "stderr" if h.stream is sys.stderr else "stdout", fmt, h.level))
    return out


def install_log_handlers(handlers: list[tuple[str, str, str | None, int]], level: int) -> None:
    """In a worker process: add :func:`log_handlers`' handlers to a root logger that has none."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.setLevel(level)
    for kind, target, fmt, hlevel in handlers:
        h = (logging.FileHandler(target, mode="a") if kind == "file"
             else logging.StreamHandler(sys.stderr if target == "stderr" else sys.stdout))
        h.setLevel(hlevel)
        if fmt:
            h.setFormatter(logging.Formatter(fmt))
        root.addHandler(h)


@dataclass
class Estimate:
    """What ``stage=train`` expects to spend: seconds per member (from steps timed where the
    members train, with as many probes side by side as members will train side by side) and
    that number of side-by-side members."""

    member_seconds: dict[MemberKey, float]
    n_jobs: int
    later: int = 0  # of them, pseudo-label round members estimated before their rows exist

    def minutes_left(self, done: set[MemberKey], actual_over_estimated: float = 1.0) -> float:
        """Minutes until every member not in ``done`` has trained: their seconds (each measured
        under ``n_jobs``-way sharing) over ``n_jobs``, times the finished members' ratio of real
        to estimated seconds."""
        left = sum(s for k, s in self.member_seconds.items() if k not in done)
        return left * actual_over_estimated / self.n_jobs / 60


@dataclass(frozen=True)
class Probe:
    """One model's timed steps: one of its members alone, or one of its fused groups, with their
    fit specs and pseudo rows (or None)."""

    keys: tuple[MemberKey, ...]
    specs: tuple[FitSpec, ...]
    pseudo: tuple = ()

    @property
    def model(self) -> str:
        return self.keys[0].model

    @property
    def size(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class ModelTiming:
    """One model's members timed here (seconds of their planned epochs, validation excluded):
    ``alone``, one member trained unfused; ``group``, one member's share of a fused group of
    ``size`` (None: no group was timed); ``predict_s``, seconds to predict one image in one
    test-time view (a prediction batch timed)."""

    alone: float
    group: float | None = None
    size: int = 1
    predict_s: float = 0.0
    member_bytes: float | None = None  # CUDA: one member's share of the group probe's peak memory
    free_bytes: float | None = None  # CUDA: the device's free memory before the probe

    @property
    def fused_is_faster(self) -> bool:
        """Whether a member trains faster in the timed group than alone."""
        return self.group is not None and self.group < self.alone

    def member_seconds(self, unit_size: int) -> float:
        """One member's share of a unit of ``unit_size`` members (:func:`pipeline.budget.unit_seconds`)."""
        return unit_seconds(self.alone, self.group, self.size, unit_size) / max(1, unit_size)

    def slower(self, other: "ModelTiming") -> "ModelTiming":
        """The larger of each figure of two workers' timings of the same probes."""
        group = None if self.group is None or other.group is None else max(self.group, other.group)
        memory = None if self.member_bytes is None else max(self.member_bytes, other.member_bytes or 0.0)
        free = None if self.free_bytes is None else min(self.free_bytes, other.free_bytes or self.free_bytes)
        return ModelTiming(max(self.alone, other.alone), group, min(self.size, other.size),
                           max(self.predict_s, other.predict_s), memory, free)


@dataclass(frozen=True)
class FuseChoice:
    """What ``runtime.fuse`` decided for a model, recorded in each member's ``metrics.json``
    (``fuse``): with ``auto``, fused when a member's share of the timed group (``group_s``
    seconds, a group of ``size``) was below one member alone (``alone_s``), both timed here
    side by side as they would train."""

    mode: FuseMode
    fused: bool
    alone_s: float | None = None
    group_s: float | None = None
    size: int = 1

    def to_json(self) -> dict:
        return {"mode": self.mode.value, "fused": self.fused, "alone_s": self.alone_s, "group_s": self.group_s,
                "group_size": self.size}


def _probes(ws: Workspace, units: list[tuple[MemberKey, ...]], later: list[MemberKey]) -> list[Probe]:
    """Per pending model, one member alone and, when ``units`` fuse some of its members, its
    largest group; a pseudo-label round's (``later``) is one member of its model without the
    pseudo rows, which do not exist yet."""
    out: dict[tuple[str, int], Probe] = {}

    def probe(unit) -> Probe:
        return Probe(unit, tuple(_spec(ws, k) for k in unit), tuple(_pseudo(ws, k) for k in unit))

    for unit in sorted(units, key=len, reverse=True):
        model = unit[0].model
        if len(unit) > 1 and not any(m == model for m, _ in out):
            out[(model, len(unit))] = probe(unit)
        if (model, 1) not in out:
            out[(model, 1)] = probe(unit[:1])
    for key in later:
        if (key.model, 1) not in out:
            base = MemberKey(round_base(ws.cfg, key.model), key.fold, key.seed_index)
            spec = FitSpec.create(ws.settings.models[key.model], ws.settings.runtime, key, ws.member_config(base))
            out[(key.model, 1)] = Probe((key,), (spec,), (None,))
    return list(out.values())


def seconds_per_image(spec: FitSpec, comp, batch: int = 512) -> float:
    """Seconds to predict one ``(C, S, S)`` uint8 image in one test-time view with a fresh model of
    ``spec`` on its device (:func:`~pipeline.train.inference.predict_probs`, its precision and
    placement): one batch of up to ``batch`` training images, timed after one warm-up batch."""
    device = select_device(spec.runtime.device)
    with torch.random.fork_rng(devices=[]):  # its random init must not move the seeded draws that follow
        model = create_model(spec.arch, comp.num_classes, comp.x_train.shape[1], comp.side, **spec.kwargs)
    model = place_model(model, device, spec.runtime.channels_last)
    images = comp.x_train[:batch]
    predict_probs(model, images, device, spec.runtime, spec.precision)
    t0 = time.perf_counter()
    predict_probs(model, images, device, spec.runtime, spec.precision)  # returns on the host: synchronised
    return (time.perf_counter() - t0) / max(1, len(images))


def time_probes(ws: Workspace, probes: list[Probe], after_warmup=None) -> dict[str, ModelTiming]:
    """Each probed model's :class:`ModelTiming`, timed in this process: one member alone
    (:func:`~pipeline.train.engine.seconds_per_member`) with a prediction batch
    (:func:`seconds_per_image`) and, when probed, a fused group's seconds over its size
    (:func:`~pipeline.train.fused.seconds_per_group`)."""
    alone, predict, group = {}, {}, {}
    for p in probes:
        if p.size == 1:
            alone[p.model] = seconds_per_member(p.specs[0], ws.comp, ws.folds, pseudo=p.pseudo[0],
                                                after_warmup=after_warmup)
            predict[p.model] = seconds_per_image(p.specs[0], ws.comp)
        else:
            group[p.model] = _time_group(ws, p, after_warmup)
    return {m: ModelTiming(alone[m], *group.get(m, (None, 1, None, None))[:2], predict[m],
                           *group.get(m, (None, 1, None, None))[2:]) for m in alone}


def _time_group(ws: Workspace, p: Probe, after_warmup) -> tuple[float, int, float | None, float | None]:
    """A fused group's probe: ``(seconds per member, its size, one member's share of its peak
    memory in bytes, the device's free bytes before it)`` (the memory figures on CUDA only, else
    None). A group that runs out of GPU memory is halved and timed again, with one log line."""
    size = p.size
    while True:
        specs, device = list(p.specs[:size]), select_device(p.specs[0].runtime.device)
        free = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free = float(torch.cuda.mem_get_info(device)[0])
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            seconds = fused.seconds_per_group(specs, ws.comp, ws.folds, pseudo=list(p.pseudo[:size]),
                                              after_warmup=after_warmup) / size
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            log.info("train: %s: a fused group of %d ran out of GPU memory in its timed steps; timing %d",
                     p.model, size, size // 2)
            size //= 2
            continue
        memory = (torch.cuda.max_memory_allocated(device) - base) / size if device.type == "cuda" else None
        return seconds, size, memory, free


def _time_in_worker(ws: Workspace, probes: list[Probe], slot: int, n_jobs: int, handlers: list,
                    level: int, folder: str) -> tuple[int, dict[str, ModelTiming]]:
    """In a side-by-side worker: time every probe on the worker's device and threads, in step
    with the other ``n_jobs - 1`` workers. Returns ``(pid, each model's timing)``."""
    runtime = _enter_worker(ws, slot, n_jobs, handlers, level)
    probes = [Probe(p.keys, tuple(dataclasses.replace(s, runtime=runtime) for s in p.specs), p.pseudo)
              for p in probes]
    log.debug("train: timing %d probe(s) on %s", len(probes), runtime.device)
    return os.getpid(), time_probes(ws, probes, barrier(folder, slot, n_jobs))


def time_models(ws: Workspace, units: list[tuple[MemberKey, ...]], n_jobs: int,
                later: list[MemberKey] = ()) -> dict[str, ModelTiming]:
    """Time a few training steps of each pending model where its members will train: one member
    alone and, when ``units`` fuse some of its members, its largest group (:func:`_probes`).

    With ``n_jobs`` side-by-side units the steps are timed in ``n_jobs`` worker processes at once
    (the pool that then trains the members; this process opens no GPU context and compiles
    nothing), each with the device and threads its members will have, so every figure is
    measured under that concurrency; the slowest worker's figures are kept. With one job they
    are timed here, where the members train."""
    probes = _probes(ws, units, list(later))
    if n_jobs == 1:
        return time_probes(ws, probes)
    from joblib import Parallel, delayed

    handlers, level = log_handlers(), logging.getLogger().level
    with tempfile.TemporaryDirectory(prefix="kfold-estimate-") as folder:
        timed = Parallel(n_jobs=n_jobs, backend="loky")(
            delayed(_time_in_worker)(ws, probes, slot, n_jobs, handlers, level, folder)
            for slot in range(n_jobs))
    out = dict(timed[0][1])
    for _, t in timed[1:]:
        out = {m: out[m].slower(t[m]) for m in out}
    return out


def estimate(ws: Workspace, units: list[tuple[MemberKey, ...]], n_jobs: int, device,
             later: list[MemberKey] = (), timed: dict[str, ModelTiming] | None = None) -> Estimate:
    """Seconds per pending member: each unit's (one member, or a fused group:
    :meth:`ModelTiming.member_seconds` of its size), from ``timed`` or from steps timed now
    (:func:`time_models`), shared by its members.

    ``later``: pseudo-label round members to train after ``units``; their pseudo rows do not exist
    yet, so each is estimated as one unfused member of its model without them, scaled by
    (training rows + every test row) / training rows: at most what it will take."""
    timed = timed if timed is not None else time_models(ws, units, n_jobs, later)
    seconds = {k: timed[k.model].member_seconds(len(u)) for u in units for k in u}
    for k in later:
        rows = int((ws.folds != k.fold).sum())
        seconds[k] = timed[k.model].alone * (rows + len(ws.comp.x_test)) / rows
    return Estimate(seconds, n_jobs, len(later))


@dataclass(frozen=True)
class Fusion:
    """What :func:`decide_fusion` decided: the models whose members train fused, each fusable
    model's :class:`FuseChoice`, the largest group (``runtime.fuse_max``, lowered on a GPU to what
    its memory holds) and the timings behind it (None when nothing was timed)."""

    models: frozenset[str]
    choices: dict
    fuse_max: int
    timed: dict | None = None


def decide_fusion(ws: Workspace, pending: list[MemberKey], slots: int, device, measure: bool,
                  later: list[MemberKey] = ()) -> Fusion:
    """Which models of ``pending`` train fused (``runtime.fuse``), in groups of how many.

    ``off``: none. ``on``: every fusable model (:func:`fusable_models`). ``auto``: with
    ``measure`` (``runtime.estimate``, or a budget), each fusable model's group (the one fusion
    would form on ``slots`` slots) and one of its members alone are timed side by side as they
    would train (:func:`time_models`), and the model fuses when a member's share of the group is
    faster; one log line per model gives both figures. Without ``measure`` ``auto`` fuses
    nothing (one log line). With ``measure`` every pending model is timed (the estimate), and on
    CUDA the groups are capped at what the probe's peak memory says fits
    (:func:`pipeline.device.group_memory_limit`, one log line)."""
    rt = ws.settings.runtime
    candidates = fusable_models(ws, pending) if rt.fuse is not FuseMode.off else frozenset()
    if not measure:
        if rt.fuse is FuseMode.auto and candidates:
            log.info("train: runtime.fuse=auto: not measured (runtime.estimate=false); %s train unfused",
                     ", ".join(sorted(candidates)))
        models = candidates if rt.fuse is FuseMode.on else frozenset()
        return Fusion(models, {m: FuseChoice(rt.fuse, m in models) for m in candidates}, rt.fuse_max)
    timed = time_models(ws, plan_units(ws, pending, device, candidates, slots), slots, later)
    models = candidates if rt.fuse is FuseMode.on else frozenset(m for m in candidates if timed[m].fused_is_faster)
    if rt.fuse is FuseMode.auto:
        for m in sorted(candidates):
            t = timed[m]
            log.info("train: %s: a fused group of %d, %.1f s per member, against %.1f s alone (%d side by side): "
                     "%s (runtime.fuse=auto)", m, t.size, t.group or 0.0, t.alone, slots,
                     "fused" if m in models else "unfused")
    fuse_max = rt.fuse_max
    for m in sorted(models):
        t = timed[m]
        if t.member_bytes is not None and t.free_bytes is not None:
            limit = group_memory_limit(t.member_bytes, t.free_bytes, slots)
            log.info("train: %s: a fused member takes about %.0f MiB (peak of a group of %d); %.0f%% of the %.1f GiB "
                     "free, shared by %d process(es), holds %d per group", m, t.member_bytes / 2**20, t.size,
                     100 * GROUP_MEMORY_SHARE, t.free_bytes / 2**30, slots, limit)
            fuse_max = min(fuse_max, limit, t.size)
    choices = {m: FuseChoice(rt.fuse, m in models, timed[m].alone, timed[m].group, timed[m].size) for m in candidates}
    return Fusion(models, choices, fuse_max, timed)


def _announce(ws: Workspace, est: Estimate, device) -> None:
    minutes = est.minutes_left(set())
    log.info("train: %d member(s) to train%s, about %.1f min on %s (%d side by side; estimated from "
             "5 timed steps of each model)", len(est.member_seconds),
             f" ({est.later} of them in a pseudo-label round, counted with every test row)" if est.later else "",
             minutes, device_name(device), est.n_jobs)
    if device.type == "cpu" and str(ws.cfg.get("sized_for", "")) == "gpu":
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


def _enter_worker(ws: Workspace, slot: int, sharing: int, handlers: list, level: int) -> RuntimeSettings:
    """Set up a side-by-side worker process for training or timing: the parent's log handlers,
    exit when the parent dies, its device (GPU ``slot % count`` on a multi-GPU machine, made
    current before any CUDA work), ``cores // sharing`` torch threads on the CPU (DataLoader
    workers on CUDA), no progress bar. Returns the worker's runtime settings (the run's config
    is not changed)."""
    exit_with_parent()
    install_log_handlers(handlers, level)
    rt = ws.settings.runtime
    device = select_device(rt.device, slot=slot)
    use_device(device)
    configure_threads(rt.threads, device, sharing)
    # several processes' progress bars would garble one terminal
    return dataclasses.replace(rt, device=str(device), progress=False,
                               num_workers=num_workers(rt.num_workers, device, sharing))


def _worker(ws: Workspace, unit: tuple[MemberKey, ...], slot: int, sharing: int, handlers: list,
            level: int, deadline: float | None = None, seconds: float = 0.0,
            choice: FuseChoice | None = None) -> tuple[tuple[MemberKey, ...], list[MemberOutcome] | PipelineError]:
    """One side-by-side unit, a member or a fused group (in a joblib worker process,
    :func:`_enter_worker`; ``sharing``: the units training at once, :func:`side_by_side`).
    Returns its outcomes, or the user error that stopped it (so the other units can finish first)."""
    runtime = _enter_worker(ws, slot, sharing, handlers, level)
    try:
        return unit, train_unit_locked(ws, unit, runtime, deadline, seconds, choice)
    except PipelineError as e:
        return unit, e


def _pending(ws: Workspace, keys: list[MemberKey]) -> tuple[dict[MemberKey, MemberOutcome], list[MemberKey]]:
    """The cached members of ``keys`` (their outcomes; ``force=true``: none) and the others."""
    done, pending = {}, []
    for key in keys:
        v = ws.verify(key)
        if v.ok and not ws.cfg.force:
            log.info("train: %s: cached, skipped (force=true retrains)", key)
            done[key] = MemberOutcome(key, Outcome.CACHED, v.reason)
        else:
            pending.append(key)
    return done, pending


@dataclass(frozen=True)
class UnitPlan:
    """What a budget's plan (:mod:`pipeline.train.budgeted`) fixed before :func:`schedule`: the
    fusion decision and ``seconds(unit)``, the planned seconds of a unit
    (:meth:`pipeline.budget.Cost.unit`), so that the scheduler checks each unit against the
    deadline with the seconds the plan counted."""

    fusion: Fusion
    seconds: Callable[[tuple[MemberKey, ...]], float]


def schedule(ws: Workspace, keys: list[MemberKey], later: list[MemberKey] = (), deadline: float | None = None,
             planned: UnitPlan | None = None) -> list[MemberOutcome]:
    """Train every member of ``keys`` that is not cached: fused groups where fusion is on or
    measured faster (:func:`decide_fusion`, :func:`plan_units`), ``runtime.fold_jobs`` units side
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
    est = None
    if planned is not None:
        fusion = planned.fusion
        units = plan_units(ws, pending, device, fusion.models, slots, fusion.fuse_max)
        est = Estimate({k: planned.seconds(u) / len(u) for u in units for k in u}, min(slots, max(1, len(units))))
    else:
        measure = bool(pending) and (rt.estimate or deadline is not None)
        fusion = decide_fusion(ws, pending, slots, device, measure, list(later))
        units = plan_units(ws, pending, device, fusion.models, slots, fusion.fuse_max)
        if fusion.timed is not None:
            est = estimate(ws, units, min(slots, len(units)), device, list(later), fusion.timed)
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
    finished: dict[MemberKey, float] = {}

    def finish(outcomes: list[MemberOutcome]) -> None:
        for outcome in outcomes:
            done[outcome.key] = outcome
            if outcome.outcome not in (Outcome.DROPPED, Outcome.STOPPED, Outcome.FAILED):
                finished[outcome.key] = (outcome.metrics or {}).get("seconds", 0.0)
        if est is not None:
            _progress(est, finished)

    seconds = [sum(est.member_seconds.get(k, 0.0) for k in u) if est is not None else 0.0 for u in units]
    unit_choices = [fusion.choices.get(u[0].model) for u in units]
    if n_jobs == 1:
        for unit, s, choice in zip(units, seconds, unit_choices):
            finish(train_unit_locked(ws, unit, None, deadline, s, choice))
    else:
        _side_by_side(ws, units, seconds, unit_choices, n_jobs, deadline, finish)
    failed = [done[k] for k in keys if done[k].outcome is Outcome.FAILED]
    if failed:  # every other member has trained and kept its files
        raise PipelineError(failed[0].reason if len(failed) == 1 else
                            f"{len(failed)} members diverged and were not cached: " + "; ".join(o.reason for o in failed))
    return [done[k] for k in keys]


def _side_by_side(ws: Workspace, units: list[tuple[MemberKey, ...]], seconds: list[float], choices: list,
                  n_jobs: int, deadline: float | None, finish) -> None:
    """Train ``units`` in ``n_jobs`` joblib worker processes (:func:`_worker`), calling
    ``finish(outcomes)`` as each ends. A user error in a worker is raised once the other units
    have finished and kept their files."""
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    handlers, level = log_handlers(), logging.getLogger().level
    errors, shares = [], side_by_side([u[0].model for u in units], n_jobs)
    for unit, r in Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")(
            delayed(_worker)(ws, unit, i % n_jobs, shares[i], handlers, level, deadline, seconds[i], choices[i])
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
