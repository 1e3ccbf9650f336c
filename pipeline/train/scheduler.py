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

from filelock import FileLock, Timeout

from pipeline import pseudo
from pipeline.errors import PipelineError
from pipeline.paths import RESUME
from pipeline.settings import LockMode, RuntimeSettings, round_base
from pipeline import members
from pipeline.train.engine import FitSpec, fit_member, seconds_per_member
from pipeline.members import MemberKey, MemberStatus
from pipeline.device import device_name, select_device, use_device
from pipeline.train.runtime import barrier, configure_threads, fold_jobs, num_workers, side_by_side
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


class Outcome(Enum):
    """What ``stage=train`` did with one member."""

    TRAINED = "trained"                # no complete member was there
    RETRAINED = "retrained"            # a stale or corrupt member was replaced (reason says why)
    CACHED = "cached"                  # complete and current: skipped
    SKIPPED_LOCKED = "skipped-locked"  # another process holds its lock (runtime.lock=skip)


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


def train_member(ws: Workspace, key: MemberKey, runtime: RuntimeSettings | None = None) -> dict:
    """Train one member (resuming its checkpoint if any) with ``runtime`` (default: the run's),
    write its files, record it verified in ``ws`` and return its metrics. Raises PipelineError
    (NaN loss: nothing is cached)."""
    out = ws.member_dir(key)
    spec = FitSpec.create(ws.settings.models[key.model], runtime or ws.settings.runtime, key, ws.member_config(key))
    res = fit_member(spec, ws.comp, ws.folds, resume_path=out / RESUME, pseudo=_pseudo(ws, key))
    meta = members.checkpoint_metadata(spec.arch, spec.kwargs, ws.comp.num_classes,
                                       int(ws.comp.x_train.shape[1]), ws.comp.side)
    ws.record(key, members.write_member(out, ws.member_config(key), res.model, meta, res.row_ids,
                                        res.oof, res.test, res.metrics))
    (out / RESUME).unlink(missing_ok=True)
    m = res.metrics
    log.info("train: %s: OOF acc %.5f, log loss %.4f, %d epochs, %.1f s on %s", key, m["accuracy"],
             m["log_loss"], m["epochs"], m["seconds"], m["device"])
    return m


def train_locked(ws: Workspace, key: MemberKey, runtime: RuntimeSettings | None = None) -> MemberOutcome:
    """Train one member under its file lock unless it is (or, after waiting for another
    process, has become) cached; ``force=true`` retrains a cached one. ``runtime``: a side-by-side
    worker's own (device, progress bar, DataLoader workers); default the run's."""
    lock_path = ws.paths.member_lock(key.model, key.fold, key.seed_index)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if ws.settings.runtime.lock is LockMode.skip:
            log.info("train: %s: another process holds %s; skipped (runtime.lock=skip)", key, lock_path)
            return MemberOutcome(key, Outcome.SKIPPED_LOCKED, f"locked by another process ({lock_path})")
        log.info("train: %s: another process holds %s; waiting", key, lock_path)
        lock.acquire()
        ws.forget(key)  # the other process may have written it meanwhile
    try:
        v = ws.verify(key)
        if v.ok and not ws.cfg.force:
            log.info("train: %s: cached, skipped (force=true retrains)", key)
            return MemberOutcome(key, Outcome.CACHED, v.reason)
        if v.status in (MemberStatus.STALE, MemberStatus.CORRUPT):
            log.info("train: %s: retraining, %s", key, v.reason)
            outcome = Outcome.RETRAINED
        else:
            outcome = Outcome.RETRAINED if v.ok else Outcome.TRAINED  # v.ok here: force=true
        reason = "force=true" if v.ok else v.reason
        return MemberOutcome(key, outcome, reason, train_member(ws, key, runtime))
    finally:
        lock.release()


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
    """One model's timed steps: a member of it, its fit spec and its pseudo rows (or None)."""

    key: MemberKey
    spec: FitSpec
    pseudo: object = None


def _probes(ws: Workspace, keys: list[MemberKey], later: list[MemberKey]) -> list[Probe]:
    """One probe per pending model; a pseudo-label round's (``later``) is its model without the
    pseudo rows, which do not exist yet."""
    out: dict[str, Probe] = {}
    for key in [*keys, *later]:
        if key.model not in out:
            base = round_base(ws.cfg, key.model) if key in later else None
            cache_key = ws.member_config(MemberKey(base, key.fold, key.seed_index) if base else key)
            out[key.model] = Probe(key, FitSpec.create(ws.settings.models[key.model], ws.settings.runtime, key, cache_key),
                                   None if base else _pseudo(ws, key))
    return list(out.values())


def time_probes(ws: Workspace, probes: list[Probe], after_warmup=None) -> dict[str, float]:
    """Seconds per member of each probe's model, timed in this process
    (:func:`~pipeline.train.engine.seconds_per_member`)."""
    return {p.key.model: seconds_per_member(p.spec, ws.comp, ws.folds, pseudo=p.pseudo,
                                            after_warmup=after_warmup) for p in probes}


def _time_in_worker(ws: Workspace, probes: list[Probe], slot: int, n_jobs: int, handlers: list,
                    level: int, folder: str) -> tuple[int, dict[str, float]]:
    """In a side-by-side worker: time every probe on the worker's device and threads, in step
    with the other ``n_jobs - 1`` workers. Returns ``(pid, seconds per member of each model)``."""
    runtime = _enter_worker(ws, slot, n_jobs, handlers, level)
    probes = [Probe(p.key, dataclasses.replace(p.spec, runtime=runtime), p.pseudo) for p in probes]
    log.debug("train: timing %d model(s) on %s", len(probes), runtime.device)
    return os.getpid(), time_probes(ws, probes, barrier(folder, slot, n_jobs))


def estimate(ws: Workspace, keys: list[MemberKey], n_jobs: int, device,
             later: list[MemberKey] = ()) -> Estimate:
    """Time a few training steps of each pending model where the members will train, and
    extrapolate to every pending member's steps.

    With ``n_jobs`` side-by-side members the steps are timed in ``n_jobs`` worker processes at
    once (the pool that then trains the members; this process opens no GPU context and compiles
    nothing), each with the device and threads its members will have, so the figure is measured
    under that concurrency; the slowest worker's figure is kept. With one job they are timed
    here, where the members train.

    ``later``: pseudo-label round members to train after ``keys``; their pseudo rows do not exist
    yet, so each is estimated as its model without them, scaled by (training rows + every test
    row) / training rows: at most what it will take."""
    probes = _probes(ws, keys, list(later))
    if n_jobs == 1:
        per_model = time_probes(ws, probes)
    else:
        from joblib import Parallel, delayed

        handlers, level = log_handlers(), logging.getLogger().level
        with tempfile.TemporaryDirectory(prefix="kfold-estimate-") as folder:
            timed = Parallel(n_jobs=n_jobs, backend="loky")(
                delayed(_time_in_worker)(ws, probes, slot, n_jobs, handlers, level, folder)
                for slot in range(n_jobs))
        per_model = {p.key.model: max(t[p.key.model] for _, t in timed) for p in probes}
    seconds = {k: per_model[k.model] for k in keys}
    for k in later:
        rows = int((ws.folds != k.fold).sum())
        seconds[k] = per_model[k.model] * (rows + len(ws.comp.x_test)) / rows
    return Estimate(seconds, n_jobs, len(later))


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


def _worker(ws: Workspace, key: MemberKey, slot: int, sharing: int, handlers: list,
            level: int) -> tuple[MemberKey, MemberOutcome | PipelineError]:
    """One side-by-side member (in a joblib worker process, :func:`_enter_worker`; ``sharing``:
    the members training at once, :func:`side_by_side`). Returns the outcome, or the user error
    that stopped it (so the other members can finish first)."""
    runtime = _enter_worker(ws, slot, sharing, handlers, level)
    try:
        return key, train_locked(ws, key, runtime)
    except PipelineError as e:
        return key, e


def schedule(ws: Workspace, keys: list[MemberKey], later: list[MemberKey] = ()) -> list[MemberOutcome]:
    """Train every member of ``keys`` that is not cached, ``runtime.fold_jobs`` side by side.
    ``later`` (the pseudo-label round members that will follow) only counts in the estimate.

    Returns one :class:`MemberOutcome` per key, in order. A user error in a worker is raised
    (as the project's one-line error) once the other members have finished and kept their files.
    """
    rt = ws.settings.runtime
    device = select_device(rt.device)
    done: dict[MemberKey, MemberOutcome] = {}
    pending = []
    for key in keys:
        v = ws.verify(key)
        if v.ok and not ws.cfg.force:
            log.info("train: %s: cached, skipped (force=true retrains)", key)
            done[key] = MemberOutcome(key, Outcome.CACHED, v.reason)
        else:
            pending.append(key)
    n_jobs = fold_jobs(rt.fold_jobs, device, len(pending))
    log.info("train: %d member(s) cached, %d to train%s", len(done), len(pending),
             f", {n_jobs} side by side (runtime.fold_jobs={rt.fold_jobs})" if n_jobs > 1 else "")
    if not pending:
        return [done[k] for k in keys]
    if n_jobs == 1:
        use_device(device)
        configure_threads(rt.threads, device)
    est = estimate(ws, pending, n_jobs, device, list(later)) if rt.estimate else None
    if est is not None:
        _announce(ws, est, device)
    finished: dict[MemberKey, float] = {}

    def finish(outcome: MemberOutcome) -> None:
        done[outcome.key] = outcome
        finished[outcome.key] = (outcome.metrics or {}).get("seconds", 0.0)
        if est is not None:
            _progress(est, finished)

    if n_jobs == 1:
        for key in pending:
            finish(train_locked(ws, key))
        return [done[k] for k in keys]
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    handlers, level = log_handlers(), logging.getLogger().level
    errors, shares = [], side_by_side([k.model for k in pending], n_jobs)
    for key, r in Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")(
            delayed(_worker)(ws, key, i % n_jobs, shares[i], handlers, level) for i, key in enumerate(pending)):
        ws.forget(key)  # what the worker wrote, as this process's workspace sees it
        if isinstance(r, PipelineError):
            errors.append(r)
            continue
        if r.metrics is not None:
            ws.record(key, members.Verification(MemberStatus.OK, "cached"))
        finish(r)
    get_reusable_executor().shutdown(wait=True)  # free their memory now, not after loky's idle timeout
    if errors:  # every other member has finished and kept its files
        raise errors[0]
    return [done[k] for k in keys]
