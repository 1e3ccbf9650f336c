"""Training throughput (images/s, augmentation included) of every registered model, two ways:

(a) naive reference: a torch ``DataLoader`` over per-sample albumentations transforms,
    ``num_workers`` = CPU cores, fp32, default memory format (today's typical Kaggle notebook);
(b) the pipeline's own path: ``DeviceBatches`` (device-resident uint8, ``randperm`` slices,
    batched ``BatchAugment``) and ``train_step`` (channels_last; bf16 autocast per
    ``train.precision``, resolved per device as ``stage=train`` resolves it).

Both use the same model, batch size, optimizer and augmentation settings (the config's ``aug``
group, elastic included) on the real training images, measured in the same run after a
warm-up, as the median of several timed windows (and of 3 alternating repeats, so slow drift of
a shared machine hits both alike). Also printed: the share of a pipeline step spent
in augmentation, peak memory, and the seconds per epoch of a 5-fold run of the default ensemble
extrapolated from these figures.

(c) side by side (``--fold-jobs 1 2 4``): K joblib worker processes, each training its own
    model on the pipeline path, start together (a common wall-clock instant, after each has
    warmed up) and run for ``--side-seconds``; the aggregate images/s over the K jobs, against
    one job, is what ``runtime.fold_jobs`` (several (model, fold) trainings at once) gains on
    this machine. Default: 1 2 4 8 on CUDA, 1 2 on CPU.

    python benchmarks/train_throughput.py                       # every model, default config
    python benchmarks/train_throughput.py --models cnn_deotte cnn_keras --windows 7
    python benchmarks/train_throughput.py --override profile=quick
    python benchmarks/train_throughput.py --models cnn_deotte --fold-jobs 1 2 4 8
    python benchmarks/train_throughput.py --models cnn_deotte --skip-single --fold-jobs --fused 1 5 10 15

(d) fused (``--fused 1 5 10 15``): M members of one model trained as one fused network
    (:mod:`pipeline.fusion`, ``runtime.fuse``) in one process, against the same members trained
    separately (``fold_jobs=auto`` processes, one member each), alternately in one run
    (``--skip-separate`` leaves this table out).

(e) the fused group's data paths (with ``--fused``), in this process, alternately: M
    ``DeviceBatches`` (M device copies, M gathers, M augmentation calls, ``stack_inputs``)
    against one ``GroupBatches`` (one shared device copy, one gather, one augmentation call over
    all M x B images, the fused layout made directly), member m training on the rows outside fold
    ``m % 5``; images/s of the data path alone and of whole fused training steps, and the device
    copies' size.

    python benchmarks/train_throughput.py --models cnn_deotte --skip-single --fold-jobs \\
        --fused 1 5 10 15 --skip-separate

Needs the competition data (``python run.py stage=data`` builds the offline default).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from pipeline.runsettings import run_settings
from pipeline.workspace import Workspace
from pipeline import augment
from pipeline.models import create_model, list_models
from pipeline.train.engine import train_step
from pipeline.device import resolve_precision, select_device
from pipeline.train.runtime import core_share

CONF_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "conf"


def hardware(device: torch.device) -> str:
    """CPU model and cores, and the GPU name when running on CUDA."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_windows(step, device: torch.device, batch: int, warmup: int, steps: int,
                  windows: int) -> float:
    """Median images/s over ``windows`` windows of ``steps`` calls of ``step()``, after ``warmup``."""
    for _ in range(warmup):
        step()
    _sync(device)
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(rates)


def _forever(iterable_factory):
    while True:
        yield from iterable_factory()


def bench_naive(name, x, y, cfg, device, args, num_classes) -> float:
    """(a): DataLoader + per-sample albumentations, fp32, num_workers = cores.

    The loader's worker processes are shut down before returning, so they cannot steal cycles
    from the next measurement."""
    torch.manual_seed(0)
    model = create_model(name, num_classes, 1, x.shape[-1], **_kwargs(cfg, name)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = augment.ImageDataset(x, y, augment.transform_from_cfg(cfg.aug))
    workers = os.cpu_count() or 1
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda")
    needed = args.warmup + args.steps * args.windows
    if len(loader) < needed:
        raise SystemExit(f"--rows {len(x)} gives {len(loader)} batches per epoch; the naive "
                         f"measurement needs {needed} (raise --rows)")
    it = iter(loader)  # one epoch, no restart inside the timed windows

    def step():
        xb, yb = next(it)
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        return timed_windows(step, device, args.batch_size, args.warmup, args.steps, args.windows)
    finally:
        it._shutdown_workers()  # noqa: SLF001 - join the workers now, not at garbage collection


def pipeline_step(name, x, y, cfg, device, batch_size: int, num_classes: int, seed: int = 0):
    """The pipeline's training path for ``name``: a fresh model (channels_last per the config),
    AdamW, ``DeviceBatches`` over ``x``/``y`` and ``train_step`` (precision per ``train.precision``).
    Returns ``(step, batches)``: ``step()`` trains on the next batch (batches repeat forever)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes, 1, x.shape[-1], **_kwargs(cfg, name)).to(device)
    channels_last = bool(cfg.runtime.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = augment.DeviceBatches(x, y, batch_size, device, cfg.aug, seed=seed)
    it = _forever(lambda: batches)
    precision = resolve_precision(cfg.train.precision, device)

    def step():
        train_step(model, opt, *next(it), 0.0, channels_last, precision)

    return step, batches


def bench_pipeline(name, x, y, cfg, device, args, num_classes) -> tuple[float, float]:
    """(b): DeviceBatches + train_step. Returns (images/s, augmentation-only images/s)."""
    step, batches = pipeline_step(name, x, y, cfg, device, args.batch_size, num_classes)
    rate = timed_windows(step, device, args.batch_size, args.warmup, args.steps, args.windows)
    raw = batches.x[: args.batch_size].float().div_(255)
    aug_rate = timed_windows(lambda: batches.augment(raw), device, args.batch_size, args.warmup,
                             args.steps, args.windows)
    return rate, aug_rate


def fused_step(name, x, y, cfg, device, batch_size: int, num_classes: int, members: int, seed: int = 0):
    """A fused group of ``members`` copies of ``name`` (:mod:`pipeline.fusion`), each with its own
    initial weights and its own ``DeviceBatches`` (seeds ``seed .. seed + members - 1``), trained
    by ``train_step`` on the stacked batches: the pipeline's fused path (``runtime.fuse``).
    Returns ``step()``, which trains every member on its next batch (``members x batch_size`` images)."""
    from pipeline.fusion import fuse, stack_inputs

    models, its = [], []
    for m in range(members):
        torch.manual_seed(seed + m)
        models.append(create_model(name, num_classes, 1, x.shape[-1], **_kwargs(cfg, name)))
        batches = augment.DeviceBatches(x, y, batch_size, device, cfg.aug, seed=seed + m)
        its.append(_forever(lambda b=batches: b))
    channels_last = bool(cfg.runtime.channels_last)
    net = fuse(models).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    precision = resolve_precision(cfg.train.precision, device)

    def step():
        pairs = [next(it) for it in its]
        train_step(net, opt, stack_inputs([p[0] for p in pairs]), torch.stack([p[1] for p in pairs], 1),
                   0.0, channels_last, precision)

    return step


def fused_paths(name, x, y, cfg, device, batch_size: int, num_classes: int, members: int, seed: int = 0,
                k: int = 5) -> dict:
    """(e): a fused group of ``members`` copies of ``name`` on both data paths. Member ``m``
    (seed ``seed + m``) trains on the rows of ``x``/``y`` outside fold ``m % k`` (folds: row
    ``i`` in fold ``i % k``), as a k-fold model's members do.

    Returns ``{path: (step, batch, device_bytes)}`` for ``"M copies"`` (``M`` x ``DeviceBatches``
    + :func:`pipeline.fusion.stack_inputs`, today's ``group_epoch``) and ``"shared"``
    (:class:`pipeline.train.batches.GroupBatches`): ``step()`` trains the path's own fused network
    (same initial weights for both paths) on its next batch with ``train_step``; ``batch()`` only
    makes the next batch; ``device_bytes`` is the images' device copies (uint8)."""
    from pipeline.fusion import fuse, stack_inputs
    from pipeline.train.batches import GroupBatches, TrainingSet

    sets = [TrainingSet(x, y, np.flatnonzero(np.arange(len(x)) % k != m % k)) for m in range(members)]
    seeds = [seed + m for m in range(members)]
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(create_model(name, num_classes, 1, x.shape[-1], **_kwargs(cfg, name)))
    channels_last = bool(cfg.runtime.channels_last)
    precision = resolve_precision(cfg.train.precision, device)
    own = [augment.DeviceBatches(d.images[d.rows], d.labels[d.rows], batch_size, device, cfg.aug, seed=s)
           for d, s in zip(sets, seeds)]
    its = [_forever(lambda b=b: b) for b in own]

    def copies():
        pairs = [next(it) for it in its]
        return stack_inputs([p[0] for p in pairs]), torch.stack([p[1] for p in pairs], 1)

    group = GroupBatches(sets, batch_size, device, cfg.aug, seeds, channels_last=channels_last)
    shared_it = _forever(lambda: group)
    out = {}
    for path, batch, nbytes in (("M copies", copies, sum(b.x.numel() for b in own)),
                                ("shared", lambda: next(shared_it), group.x.numel())):
        net = fuse(models).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step(batch=batch, net=net, opt=opt):
            train_step(net, opt, *batch(), 0.0, channels_last, precision)

        out[path] = (step, batch, nbytes)
    return out


def aten_ops(fn) -> int:
    """The ATen operators one call of ``fn()`` dispatches (views included): a device-independent
    proxy of its kernel launches, which bound a GPU step's host time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as count:
        fn()
    return count.n


def bench_fused_paths(names, x, y, cfg, device, args, num_classes) -> None:
    """(e): for each group size M of ``--fused``, images/s (all M members' images) of the fused
    group's two data paths (:func:`fused_paths`), measured alternately ``--repeats`` times in this
    process (medians): the data path alone (batches made, nothing trained; windows of
    ``--data-steps`` batches) and whole training steps (windows of ``--steps``). Prints one row
    per (model, M)."""
    print(f"\nfused data paths (--fused, one process): images/s of all M members together; 'M copies' = M "
          f"DeviceBatches + stack_inputs (one device copy, gather and augmentation call per member), 'shared' "
          f"= GroupBatches (one device copy, one gather, one augmentation call); member m trains on the rows "
          f"outside fold m % 5 of {len(x)}")
    print(f"{'model':14s} {'M':>3s} {'data M copies':>14s} {'data shared':>12s} {'ratio':>6s} "
          f"{'step M copies':>14s} {'step shared':>12s} {'ratio':>6s} {'copies MiB':>11s} {'shared MiB':>11s} "
          f"{'ops copies':>10s} {'ops shared':>10s}")
    for name in names:
        for m in args.fused:
            paths = fused_paths(name, x, y, cfg, device, args.batch_size, num_classes, m)
            images = m * args.batch_size
            runs = {p: ([], []) for p in paths}
            for _ in range(args.repeats):  # alternate, so drift of a shared machine hits both alike
                for p, (step, batch, _) in paths.items():
                    runs[p][0].append(timed_windows(batch, device, images, args.warmup, args.data_steps, args.windows))
                    runs[p][1].append(timed_windows(step, device, images, args.warmup, args.steps, args.windows))
            (dc, sc), (ds, ss) = ((statistics.median(r) for r in runs[p]) for p in ("M copies", "shared"))
            mib = [paths[p][2] / 2**20 for p in ("M copies", "shared")]
            layout = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
            ops = [aten_ops(lambda: paths["M copies"][1]()[0].contiguous(memory_format=layout)),
                   aten_ops(lambda: paths["shared"][1]()[0].contiguous(memory_format=layout))]
            print(f"{name:14s} {m:3d} {dc:14.0f} {ds:12.0f} {ds / dc:6.2f} {sc:14.0f} {ss:12.0f} {ss / sc:6.2f} "
                  f"{mib[0]:11.1f} {mib[1]:11.1f} {ops[0]:10d} {ops[1]:10d}", flush=True)


def _side_by_side_job(name, cfg, rows, batch_size, slot, n_jobs, start_at, seconds, members=0) -> float:
    """One of (c)'s and (d)'s processes: its own model and batches (``members`` >= 1: a fused group
    of that many, :func:`fused_step`) on its device (GPU ``slot % count``), a ``1/n_jobs`` share of
    the cores, warm-up, then training from ``start_at`` (``time.time()``) for ``seconds``,
    synchronised every 10 steps. Returns its images/s (every member's images); raises when it was
    not ready at ``start_at`` (raise ``--side-spawn-s``)."""
    device = select_device(str(cfg.runtime.device), slot=slot)
    if device.type == "cpu":
        torch.set_num_threads(core_share(n_jobs))
    comp = Workspace(run_settings(cfg)).comp
    x, y = comp.x_train[:rows], comp.y_train[:rows]
    if members:
        step = fused_step(name, x, y, cfg, device, batch_size, comp.num_classes, members, seed=100 * slot)
    else:
        step, _ = pipeline_step(name, x, y, cfg, device, batch_size, comp.num_classes, seed=slot)
    per_step = batch_size * max(1, members)
    for _ in range(10):
        step()
    _sync(device)
    wait = start_at - time.time()
    if wait < 0:
        raise RuntimeError(f"side-by-side job {slot} was ready {-wait:.1f} s late; raise --side-spawn-s")
    time.sleep(wait)
    t0, images = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            step()
        _sync(device)
        images += 10 * per_step
    return images / (time.perf_counter() - t0)


def bench_side_by_side(name, cfg, args, n_jobs: int, members: int = 0) -> float:
    """(c): aggregate images/s of ``n_jobs`` simultaneous pipeline-path trainings of ``name``;
    (d) with ``members`` >= 1: each job a fused group of that many."""
    from joblib.externals.loky import get_reusable_executor

    # fresh worker processes for every K, K=1 included (joblib's Parallel would run 1 job inline)
    executor = get_reusable_executor(max_workers=n_jobs, kill_workers=True, reuse=False)
    start_at = time.time() + args.side_spawn_s
    futures = [executor.submit(_side_by_side_job, name, cfg, args.rows, args.batch_size, slot,
                               n_jobs, start_at, args.side_seconds, members) for slot in range(n_jobs)]
    rates = [f.result() for f in futures]
    executor.shutdown(wait=True)
    return sum(rates)


def bench_fused(names, cfg, args, device) -> None:
    """(d): for each group size M of ``--fused``, images/s of M members trained as one fused
    network in one process (every core), against the same members trained separately the way
    ``runtime.fuse=off`` trains them (``fold_jobs=auto`` side-by-side processes, one member each;
    their aggregate rate), measured alternately in this run; on the CPU also M members as two
    fused groups side by side (half the cores each). Prints one row per (model, M)."""
    from pipeline.train.runtime import fold_jobs

    jobs = fold_jobs("auto", device, 64)
    halves = device.type == "cpu" and jobs > 1
    print(f"\nfused members (runtime.fuse): images/s of all M members together, {args.side_seconds:.0f} s "
          f"each; separate = {jobs} side-by-side process(es), one member each (runtime.fuse=off)")
    print(f"{'model':14s} {'M':>3s} {'separate':>10s} {'fused':>10s} {'ratio':>6s}"
          + (f" {f'{jobs} x fused M/{jobs}':>14s} {'ratio':>6s}" if halves else ""))
    for name in names:
        for m in args.fused:
            separate = bench_side_by_side(name, cfg, args, jobs)
            fused = bench_side_by_side(name, cfg, args, 1, members=m)
            line = f"{name:14s} {m:3d} {separate:10.0f} {fused:10.0f} {fused / separate:6.2f}"
            if halves and m >= jobs:
                split = bench_side_by_side(name, cfg, args, jobs, members=m // jobs)
                line += f" {split:14.0f} {split / separate:6.2f}"
            print(line, flush=True)


def _kwargs(cfg, name):
    return OmegaConf.to_container(cfg.models[name].get("kwargs") or {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--steps", type=int, default=30,
                   help="steps per timed window (short windows overstate sustained throughput on "
                        "shared VMs: 0.7 s windows read ~25%% high on a 2-core EPYC)")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternate (b) and (a) this many times per model; medians reported")
    p.add_argument("--rows", type=int, default=42000, help="training images to draw batches from")
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. profile=quick")
    p.add_argument("--fold-jobs", type=int, nargs="*", default=None,
                   help="(c): side-by-side job counts to compare; default 1 2 4 8 on CUDA, 1 2 on "
                        "CPU; pass no number to skip")
    p.add_argument("--fused", type=int, nargs="*", default=None,
                   help="(d): fused group sizes M to compare with separate members, e.g. 1 5 10 15; "
                        "default none")
    p.add_argument("--data-steps", type=int, default=30,
                   help="(e): batches per timed window of the data path alone (far cheaper than a step)")
    p.add_argument("--skip-separate", action="store_true",
                   help="(d): leave out the fused-vs-separate-processes table; (e) still runs")
    p.add_argument("--skip-single", action="store_true",
                   help="skip (a) and (b), the one-process naive/pipeline comparison")
    p.add_argument("--side-seconds", type=float, default=10.0, help="(c): timed seconds per count")
    p.add_argument("--side-spawn-s", type=float, default=30.0,
                   help="(c): seconds allowed for the processes to start and warm up")
    args = p.parse_args()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.override)
    device = select_device(str(cfg.runtime.device))
    comp = Workspace(run_settings(cfg)).comp
    x, y = comp.x_train[: args.rows], comp.y_train[: args.rows]
    names = args.models or [n for n in list_models() if n in cfg.models]
    print(hardware(device))
    print(f"device {device}; precision {cfg.train.precision} ({resolve_precision(cfg.train.precision, device).value}); batch {args.batch_size}; aug {OmegaConf.to_container(cfg.aug)}; "
          f"median of {args.windows} windows x {args.steps} steps after {args.warmup} warm-up steps, "
          f"median of {args.repeats} alternating repeats\n")
    print(f"{'model':14s} {'naive img/s':>12s} {'pipeline img/s':>15s} {'ratio':>6s} "
          f"{'aug share':>9s} {'epoch s (5 folds)':>18s}")
    k = int(cfg.folds.k)
    per_fold_rows = len(comp.x_train) * (k - 1) // k
    results = {}
    for name in [] if args.skip_single else names:
        runs = []  # (pipeline, aug-only, naive) per repeat, alternating so drift hits both
        for _ in range(args.repeats):
            pipe, aug_rate = bench_pipeline(name, x, y, cfg, device, args, comp.num_classes)
            runs.append((pipe, aug_rate, bench_naive(name, x, y, cfg, device, args, comp.num_classes)))
        pipe, aug_rate, naive = (statistics.median(r[i] for r in runs) for i in range(3))
        share = pipe / aug_rate  # (seconds of augmentation) / (seconds of a whole step), per image
        epoch_s = k * per_fold_rows / pipe
        results[name] = epoch_s
        print(f"{name:14s} {naive:12.0f} {pipe:15.0f} {pipe / naive:6.2f} {share:9.1%} {epoch_s:18.1f}",
              flush=True)
    ens = [n for n in cfg.ensemble if n in results]
    if ens:
        per_epoch = sum(results[n] for n in ens)
        total = sum(results[n] * int((cfg.models[n].get("train") or {}).get("epochs", cfg.train.epochs))
                    for n in ens)
        print(f"\nensemble {ens}: {per_epoch:.1f} s per epoch of all {k} folds x all models; "
              f"{total / 60:.1f} min for the configured epochs (training only, extrapolated)")
    counts = args.fold_jobs if args.fold_jobs is not None else (
        [1, 2, 4, 8] if device.type == "cuda" else [1, 2])
    if counts:
        print(f"\nside by side (runtime.fold_jobs): aggregate pipeline img/s of K simultaneous "
              f"trainings, {args.side_seconds:.0f} s each")
        print(f"{'model':14s} " + " ".join(f"{f'K={k}':>14s}" for k in counts))
        for name in names:
            rates = [bench_side_by_side(name, cfg, args, k) for k in counts]
            print(f"{name:14s} " + " ".join(f"{r:8.0f} ({r / rates[0]:.2f}x)" for r in rates),
                  flush=True)
    if args.fused:
        bench_fused_paths(names, x, y, cfg, device, args, comp.num_classes)
        if not args.skip_separate:
            bench_fused(names, cfg, args, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem = f"peak RSS {peak:.0f} MiB"
    if device.type == "cuda":
        mem += f"; peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    print(mem)


if __name__ == "__main__":
    main()
