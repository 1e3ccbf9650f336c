"""What ``stage=train`` will train, and what it will cost: the units (one member, or a fused
group of one model's members), the probes whose steps are timed where the members train, the
estimate built from them, and ``runtime.fuse``'s decision.

The probes run in this process or, with side-by-side units, in as many worker processes
(:mod:`pipeline.train.workers`), so every figure is measured under the concurrency the members
will have. :mod:`pipeline.train.scheduler` trains the units; :mod:`pipeline.train.budgeted`
plans a budget from the same timings and units.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from pipeline import pseudo
from pipeline.budget import form_units, unit_seconds
from pipeline.device import GROUP_MEMORY_SHARE, group_memory_limit, select_device
from pipeline.members import MemberKey
from pipeline.settings import AugBackend, FitMethod, FuseMode, RuntimeSettings, Sampler
from pipeline.train import fused
from pipeline.train.engine import FitSpec, fresh_model, seconds_per_member, transfer_seconds
from pipeline.train.inference import predict_probs
from pipeline.train.runtime import barrier, configure_threads, fold_jobs
from pipeline.train.workers import enter_worker, log_handlers
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


def member_pseudo(ws: Workspace, key: MemberKey):
    """The member's pseudo rows (the file :func:`pipeline.pseudo.write_rows` wrote) when it is a
    pseudo-label round, else None."""
    if ws.settings.models[key.model].base is None:
        return None
    return pseudo.read_rows(ws.paths.pseudo_rows(key.model, key.fold), key.fold)


def member_spec(ws: Workspace, key: MemberKey, runtime: RuntimeSettings | None = None,
                deadline: float | None = None, predict_s: float | None = None) -> FitSpec:
    """A member's fit spec: its model's settings with ``runtime`` (default: the run's), its cache
    key's config, ``deadline`` and ``predict_s``, the seconds per predicted image its deadline
    checks count (timed, :attr:`ModelTiming.predict_s`; None: not timed)
    (:meth:`pipeline.train.engine.FitSpec.create`)."""
    return FitSpec.create(ws.settings.models[key.model], runtime or ws.settings.runtime, key, ws.member_config(key),
                          deadline, predict_s, ws.paths.features_dir())


def fusable_models(ws: Workspace, pending: list[MemberKey]) -> frozenset[str]:
    """The models of ``pending`` whose members can train fused: a :func:`pipeline.train.fused.can_fuse`
    architecture, ``runtime.compile`` off, ``train.class_weight`` off, ``train.sampler=shuffle`` and the ``torch``
    augmentation backend (the ``albumentations`` backend's DataLoader workers would be started
    once per member of a group).
    Every other model says in one log line why it trains unfused."""
    out = set()
    for model in dict.fromkeys(k.model for k in pending):
        spec = member_spec(ws, next(k for k in pending if k.model == model))
        if spec.runtime.compile:
            why = "runtime.compile=true"
        elif AugBackend(spec.aug.backend) is not AugBackend.torch:
            why = f"aug.backend={AugBackend(spec.aug.backend).value}: one DataLoader per member"
        elif spec.train.class_weight:
            why = "train.class_weight=true: each fold's own loss weights"
        elif spec.train.sampler is Sampler.balanced:
            why = "train.sampler=balanced: each fold's own draws"
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
    extra = member_pseudo(ws, key)
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


CPU_PROBE_GROUP = 2  # members of a fused group timed on the CPU: its steps cost the group's size (a group
# of 8 at 64 px took minutes to time on a 2-core EPYC), and a CPU gains nothing from larger groups
LAYOUT_NOISE = 0.05  # runtime.fuse=auto: a memory layout counts as faster when its timed steps took 5% less


def faster_layout(contiguous_s: float, channels_last_s: float, configured: bool) -> bool:
    """Whether a fused group trains in channels_last, from a member's share of the group timed in
    each layout (seconds, :func:`_time_group`): the layout more than :data:`LAYOUT_NOISE` faster,
    else (the timings cannot tell them apart, as on a CPU) ``configured``
    (``runtime.channels_last``)."""
    if channels_last_s < (1 - LAYOUT_NOISE) * contiguous_s:
        return True
    if contiguous_s < (1 - LAYOUT_NOISE) * channels_last_s:
        return False
    return configured


@dataclass(frozen=True)
class ModelTiming:
    """One model's members timed here (seconds of their planned epochs, validation excluded):
    ``alone``, one member trained unfused; ``group``, one member's share of a fused group of
    ``size`` (None: no group was timed), in the layout it will train in; ``predict_s``, seconds
    to predict one image in one test-time view (a prediction batch timed). With
    ``runtime.fuse=auto`` the group is timed in both memory layouts: ``layouts`` holds a member's
    share in ``(contiguous, channels_last)`` and ``channels_last`` the layout chosen
    (:meth:`with_layout`; None: not measured, the configured one). ``solo``: one member alone with
    the whole machine to itself (as the odd last member of a round trains,
    :func:`pipeline.budget.side_by_side`), timed after the side-by-side probes where those ran in
    several processes and asked for (None: not timed; with one process ``alone`` is that).
    ``cache``: a transfer member's frozen pass that its model's folds and seeds share, once per
    model (:func:`~pipeline.train.engine.transfer_seconds`; 0 when on disk), left out of
    ``alone``."""

    alone: float
    group: float | None = None
    size: int = 1
    predict_s: float = 0.0
    member_bytes: float | None = None  # CUDA: one member's share of the group probe's peak memory
    free_bytes: float | None = None  # CUDA: the device's free memory before the probe
    layouts: tuple[float, float] | None = None  # fuse=auto: the group's seconds per member, contiguous / channels_last
    channels_last: bool | None = None  # fuse=auto: the group's layout, chosen from ``layouts``
    solo: float | None = None  # one member with the machine to itself (one process), seconds
    cache: float = 0.0  # the shared frozen pass of a transfer model, once per model, seconds

    @property
    def fused_is_faster(self) -> bool:
        """Whether a member trains faster in the timed group than alone."""
        return self.group is not None and self.group < self.alone

    def member_seconds(self, unit_size: int) -> float:
        """One member's share of a unit of ``unit_size`` members (:func:`pipeline.budget.unit_seconds`)."""
        return unit_seconds(self.alone, self.group, self.size, unit_size) / max(1, unit_size)

    def with_layout(self, configured: bool) -> "ModelTiming":
        """This timing with the group's layout chosen from ``layouts`` (:func:`faster_layout`,
        ``configured``: ``runtime.channels_last``) and ``group`` that layout's seconds; itself
        when the layouts were not timed."""
        if self.layouts is None:
            return self
        chosen = faster_layout(*self.layouts, configured)
        return dataclasses.replace(self, group=self.layouts[int(chosen)], channels_last=chosen)

    def slower(self, other: "ModelTiming") -> "ModelTiming":
        """The larger of each figure of two workers' timings of the same probes (the layouts
        each; choose the layout again with :meth:`with_layout`)."""
        group = None if self.group is None or other.group is None else max(self.group, other.group)
        memory = None if self.member_bytes is None else max(self.member_bytes, other.member_bytes or 0.0)
        free = None if self.free_bytes is None else min(self.free_bytes, other.free_bytes or self.free_bytes)
        layouts = None if self.layouts is None or other.layouts is None else \
            (max(self.layouts[0], other.layouts[0]), max(self.layouts[1], other.layouts[1]))
        solo = max((s for s in (self.solo, other.solo) if s is not None), default=None)
        return ModelTiming(max(self.alone, other.alone), group, min(self.size, other.size),
                           max(self.predict_s, other.predict_s), memory, free, layouts, self.channels_last, solo,
                           max(self.cache, other.cache))


@dataclass(frozen=True)
class FuseChoice:
    """What ``runtime.fuse`` decided for a model, recorded in each member's ``metrics.json``
    (``fuse``): with ``auto``, fused when a member's share of the timed group (``group_s``
    seconds, a group of ``size``) was below one member alone (``alone_s``), both timed here
    side by side as they would train; the group timed in both memory layouts (``contiguous_s``,
    ``channels_last_s``: a member's share, seconds) trains in ``channels_last``, the faster
    (:func:`faster_layout`; None: not measured, ``runtime.channels_last``)."""

    mode: FuseMode
    fused: bool
    alone_s: float | None = None
    group_s: float | None = None
    size: int = 1
    channels_last: bool | None = None
    contiguous_s: float | None = None
    channels_last_s: float | None = None

    @classmethod
    def timed(cls, mode: FuseMode, fused: bool, t: ModelTiming) -> "FuseChoice":
        """The choice for a model timed as ``t`` (its layouts too, when timed)."""
        contiguous, channels_last = t.layouts if t.layouts is not None else (None, None)
        return cls(mode, fused, t.alone, t.group, t.size, t.channels_last, contiguous, channels_last)

    def group_runtime(self, runtime: RuntimeSettings) -> RuntimeSettings:
        """``runtime`` for a fused group of this model: with the measured layout
        (``channels_last``) when there is one, else unchanged."""
        if self.channels_last is None or self.channels_last == runtime.channels_last:
            return runtime
        return dataclasses.replace(runtime, channels_last=self.channels_last)

    def to_json(self) -> dict:
        out = {"mode": self.mode.value, "fused": self.fused, "alone_s": self.alone_s, "group_s": self.group_s,
               "group_size": self.size}
        if self.channels_last is not None:
            out |= {"channels_last": self.channels_last, "contiguous_s": self.contiguous_s,
                    "channels_last_s": self.channels_last_s}
        return out


def _probes(ws: Workspace, units: list[tuple[MemberKey, ...]], later: list[MemberKey]) -> list[Probe]:
    """Per pending model, one member alone and, when ``units`` fuse some of its members, its
    largest group; a pseudo-label round's (``later``) is one member of its model without the
    pseudo rows, which do not exist yet. On the CPU the group probed is at most
    :data:`CPU_PROBE_GROUP` members (the plan prices larger groups at its per-member share)."""
    out: dict[tuple[str, int], Probe] = {}
    cpu = select_device(ws.settings.runtime.device).type == "cpu"

    def probe(unit) -> Probe:
        return Probe(unit, tuple(member_spec(ws, k) for k in unit), tuple(member_pseudo(ws, k) for k in unit))

    for unit in sorted(units, key=len, reverse=True):
        model = unit[0].model
        if len(unit) > 1 and not any(m == model for m, _ in out):
            unit = unit[:CPU_PROBE_GROUP] if cpu else unit
            out[(model, len(unit))] = probe(unit)
        if (model, 1) not in out:
            out[(model, 1)] = probe(unit[:1])
    for key in later:
        if (key.model, 1) not in out:
            base = MemberKey(ws.settings.models[key.model].base, key.fold, key.seed_index)
            spec = FitSpec.create(ws.settings.models[key.model], ws.settings.runtime, key, ws.member_config(base))
            out[(key.model, 1)] = Probe((key,), (spec,), (None,))
    return list(out.values())


def seconds_per_image(spec: FitSpec, comp, batch: int = 512) -> float:
    """Seconds to predict one ``(C, S, S)`` uint8 image in one test-time view with a fresh model of
    ``spec`` on its device (:func:`~pipeline.train.inference.predict_probs`, its precision and
    placement): one batch of up to ``batch`` training images, timed after one warm-up batch."""
    device = select_device(spec.runtime.device)
    model = fresh_model(spec, comp, device)  # its init moves none of the seeded draws that follow
    images = comp.x_train[:batch]
    predict_probs(model, images, device, spec.runtime, spec.precision)
    t0 = time.perf_counter()
    predict_probs(model, images, device, spec.runtime, spec.precision)  # returns on the host: synchronised
    return (time.perf_counter() - t0) / max(1, len(images))


def time_probes(ws: Workspace, probes: list[Probe], after_warmup=None) -> dict[str, ModelTiming]:
    """Each probed model's :class:`ModelTiming`, timed in this process: one member alone
    (:func:`~pipeline.train.engine.seconds_per_member`) with a prediction batch
    (:func:`seconds_per_image`) and, when probed, a fused group's seconds over its size
    (:func:`_time_group`: with ``runtime.fuse=auto`` in both memory layouts, the faster chosen,
    :meth:`ModelTiming.with_layout`)."""
    alone, cache, predict, group = {}, {}, {}, {}
    for p in probes:
        if p.size == 1:
            alone[p.model], cache[p.model] = _alone(ws, p, after_warmup)
            predict[p.model] = seconds_per_image(p.specs[0], ws.comp)
        else:
            group[p.model] = _time_group(ws, p, after_warmup)
    configured = {p.model: p.specs[0].runtime.channels_last for p in probes}
    return {m: ModelTiming(alone[m], predict_s=predict[m], cache=cache[m], **group.get(m, {})).with_layout(
        configured[m]) for m in alone}


def _alone(ws: Workspace, p: Probe, after_warmup=None) -> tuple[float, float]:
    """Seconds of one member of ``p`` trained alone and of the cache its model's members share
    (a transfer member's frozen pass, :func:`~pipeline.train.engine.transfer_seconds`; else 0)."""
    spec = p.specs[0]
    if spec.train.fit is FitMethod.gradient:
        return seconds_per_member(spec, ws.comp, ws.folds, pseudo=p.pseudo[0], after_warmup=after_warmup), 0.0
    t = transfer_seconds(spec, ws.comp, ws.folds, after_warmup)
    return t.own, t.shared


def _with_layout(specs: list[FitSpec], channels_last: bool) -> list[FitSpec]:
    """``specs`` with ``runtime.channels_last`` set to ``channels_last``."""
    return [dataclasses.replace(s, runtime=dataclasses.replace(s.runtime, channels_last=channels_last))
            for s in specs]


def _time_group(ws: Workspace, p: Probe, after_warmup) -> dict:
    """A fused group's probe, as :class:`ModelTiming`'s fields: ``group`` (seconds per member),
    ``size``, ``member_bytes`` (one member's share of its peak memory) and ``free_bytes`` (the
    device's free memory before it), the memory figures on CUDA only, else None. With
    ``runtime.fuse=auto`` the same steps are timed in the contiguous and the channels_last
    layout (``layouts``, seconds per member each; ``group`` is then the configured layout's
    until :meth:`ModelTiming.with_layout` chooses). A group that runs out of GPU memory is
    halved and timed again, with one log line."""
    size, rt = p.size, p.specs[0].runtime
    layouts = (False, True) if rt.fuse is FuseMode.auto else (rt.channels_last,)
    while True:
        specs, device = list(p.specs[:size]), select_device(rt.device)
        free = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free = float(torch.cuda.mem_get_info(device)[0])
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        try:
            seconds = {cl: fused.seconds_per_group(_with_layout(specs, cl), ws.comp, ws.folds,
                                                   pseudo=list(p.pseudo[:size]), after_warmup=after_warmup) / size
                       for cl in layouts}
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            log.info("train: %s: a fused group of %d ran out of GPU memory in its timed steps; timing %d",
                     p.model, size, size // 2)
            size //= 2
            continue
        memory = (torch.cuda.max_memory_allocated(device) - base) / size if device.type == "cuda" else None
        return {"group": seconds[rt.channels_last], "size": size, "member_bytes": memory, "free_bytes": free,
                "layouts": (seconds[False], seconds[True]) if len(layouts) == 2 else None}


def _time_in_worker(ws: Workspace, probes: list[Probe], slot: int, n_jobs: int, handlers: list,
                    level: int, folder: str, solo: frozenset[str] = frozenset()) -> tuple[int, dict[str, ModelTiming]]:
    """In a side-by-side worker: time every probe on the worker's device and threads, in step
    with the other ``n_jobs - 1`` workers; then, once every worker is done, worker 0 times the
    lone member of each of ``solo`` again with the whole machine (``ModelTiming.solo``: the
    threads the scheduler gives the odd last member of a round). Returns ``(pid, each model's
    timing)``."""
    runtime = enter_worker(ws, slot, n_jobs, handlers, level)
    probes = [Probe(p.keys, tuple(dataclasses.replace(s, runtime=runtime) for s in p.specs), p.pseudo)
              for p in probes]
    log.debug("train: timing %d probe(s) on %s", len(probes), runtime.device)
    wait = barrier(folder, slot, n_jobs)
    timed = time_probes(ws, probes, wait)
    alone = [p for p in probes if p.size == 1 and p.model in solo]
    if alone:
        wait()  # every worker's timed steps are over: worker 0 has the machine to itself
        if slot == 0:
            configure_threads(runtime.threads, select_device(runtime.device), 1)
            timed |= {p.model: dataclasses.replace(timed[p.model], solo=_alone(ws, p)[0]) for p in alone}
    return os.getpid(), timed


def time_models(ws: Workspace, units: list[tuple[MemberKey, ...]], n_jobs: int,
                later: list[MemberKey] = (), solo: frozenset[str] = frozenset()) -> dict[str, ModelTiming]:
    """Time a few training steps of each pending model where its members will train: one member
    alone and, when ``units`` fuse some of its members, its largest group (:func:`_probes`).

    With ``n_jobs`` side-by-side units the steps are timed in ``n_jobs`` worker processes at once
    (the pool that then trains the members; this process opens no GPU context and compiles
    nothing), each with the device and threads its members will have, so every figure is
    measured under that concurrency; the slowest worker's figures are kept. The lone member of
    each model of ``solo`` is then timed once more in one worker with the whole machine
    (:attr:`ModelTiming.solo`). With one job they are timed here, where the members train."""
    probes = _probes(ws, units, list(later))
    if n_jobs == 1:
        return time_probes(ws, probes)
    from joblib import Parallel, delayed

    handlers, level = log_handlers(), logging.getLogger().level
    with tempfile.TemporaryDirectory(prefix="kfold-estimate-") as folder:
        timed = Parallel(n_jobs=n_jobs, backend="loky")(
            delayed(_time_in_worker)(ws, probes, slot, n_jobs, handlers, level, folder, frozenset(solo))
            for slot in range(n_jobs))
    out = dict(timed[0][1])
    for _, t in timed[1:]:
        out = {m: out[m].slower(t[m]) for m in out}
    return {m: t.with_layout(ws.settings.runtime.channels_last) for m, t in out.items()}


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

    def predict_s(self, model: str) -> float | None:
        """Seconds to predict one image in one test-time view with ``model``, as its probe timed
        them (:attr:`ModelTiming.predict_s`), or None when it was not timed."""
        t = (self.timed or {}).get(model)
        return t.predict_s if t is not None and t.predict_s > 0 else None


def decide_fusion(ws: Workspace, pending: list[MemberKey], slots: int, device, measure: bool,
                  later: list[MemberKey] = (), solo: frozenset[str] = frozenset()) -> Fusion:
    """Which models of ``pending`` train fused (``runtime.fuse``), in groups of how many.

    ``off``: none. ``on``: every fusable model (:func:`fusable_models`). ``auto``: with
    ``measure`` (``runtime.estimate``, or a budget), each fusable model's group (the one fusion
    would form on ``slots`` slots) and one of its members alone are timed side by side as they
    would train (:func:`time_models`), and the model fuses when a member's share of the group is
    faster; the group is timed in both memory layouts and trains in the faster
    (:meth:`ModelTiming.with_layout`, :meth:`FuseChoice.group_runtime`); log lines per model give
    every figure (:func:`_log_measured`). Without ``measure`` ``auto`` fuses
    nothing (one log line). With ``measure`` every pending model is timed (the estimate), and on
    CUDA the groups are capped at what the probe's peak memory says fits
    (:func:`pipeline.device.group_memory_limit`, one log line); the models of ``solo`` are also
    timed with the machine to themselves (:func:`time_models`)."""
    rt = ws.settings.runtime
    candidates = fusable_models(ws, pending) if rt.fuse is not FuseMode.off else frozenset()
    if not measure:
        if rt.fuse is FuseMode.auto and candidates:
            log.info("train: runtime.fuse=auto: not measured (runtime.estimate=false); %s train unfused",
                     ", ".join(sorted(candidates)))
        models = candidates if rt.fuse is FuseMode.on else frozenset()
        return Fusion(models, {m: FuseChoice(rt.fuse, m in models) for m in candidates}, rt.fuse_max)
    timed = time_models(ws, plan_units(ws, pending, device, candidates, slots), slots, later, solo)
    models = candidates if rt.fuse is FuseMode.on else frozenset(m for m in candidates if timed[m].fused_is_faster)
    if rt.fuse is FuseMode.auto:
        _log_measured(timed, candidates, models, slots, rt.channels_last)
    fuse_max = rt.fuse_max
    for m in sorted(models):
        t = timed[m]
        if t.member_bytes is not None and t.free_bytes is not None:
            limit = group_memory_limit(t.member_bytes, t.free_bytes, slots)
            log.info("train: %s: a fused member takes about %.0f MiB (peak of a group of %d); %.0f%% of the %.1f GiB "
                     "free, shared by %d process(es), holds %d per group", m, t.member_bytes / 2**20, t.size,
                     100 * GROUP_MEMORY_SHARE, t.free_bytes / 2**30, slots, limit)
            fuse_max = min(fuse_max, limit, t.size)
    choices = {m: FuseChoice.timed(rt.fuse, m in models, timed[m]) for m in candidates}
    return Fusion(models, choices, fuse_max, timed)


def _log_measured(timed: dict[str, ModelTiming], candidates: frozenset[str], models: frozenset[str], slots: int,
                  configured: bool) -> None:
    """``runtime.fuse=auto``'s log lines, per fusable model: its group's two memory layouts, each
    a member's share in seconds, and the one chosen (:func:`faster_layout`; ``configured``:
    ``runtime.channels_last``); then the group in that layout against one member alone and
    whether the model fuses."""
    for m in sorted(candidates):
        t = timed[m]
        if t.layouts is not None:
            log.info("train: %s: its fused group of %d takes %.3f s per member contiguous, %.3f s channels_last: "
                     "%s (runtime.channels_last=%s; within %.0f%% it stays)", m, t.size, *t.layouts,
                     "channels_last" if t.channels_last else "contiguous", str(configured).lower(),
                     100 * LAYOUT_NOISE)
        log.info("train: %s: a fused group of %d, %.1f s per member, against %.1f s alone (%d side by side): "
                 "%s (runtime.fuse=auto)", m, t.size, t.group or 0.0, t.alone, slots,
                 "fused" if m in models else "unfused")
