"""Fusion decided by measurement, and the budget planned in the units the scheduler trains
(issue 30: defects 1, 7, 8, 9, 10), on the CPU with the MNIST fixture; GPU-like costs are
stand-ins for the timed steps where a test says so."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time

import pytest
import torch

from pipeline import budget as budget_mod
from pipeline import train
from pipeline.budget import Cost, Range, dispatch, form_units, makespan, plan
from pipeline.settings import FuseMode
from pipeline.train import budgeted, probes, scheduler
from pipeline.train.probes import FuseChoice, ModelTiming, decide_fusion, plan_units
from pipeline.train.scheduler import Outcome
from pipeline.workspace import Workspace


@pytest.fixture(autouse=True)
def whole_probe_groups(monkeypatch):
    """These tests check the GPU's logic on the CPU: the probe times a model's whole group, as on
    a GPU (on a CPU it times at most ``probes.CPU_PROBE_GROUP`` members,
    :func:`test_a_cpu_probe_times_a_group_of_two`)."""
    monkeypatch.setattr(probes, "CPU_PROBE_GROUP", 64)


def test_a_cpu_probe_times_a_group_of_two(tiny_cfg, monkeypatch):
    """On the CPU a model's fused group is probed with at most 2 of its members (a group of 8 at
    64 px took minutes to time on the 2-core EPYC); its alone probe is one member."""
    monkeypatch.setattr(probes, "CPU_PROBE_GROUP", 2)
    ws = Workspace.load(tiny_cfg("ensemble=[mlp]", "seeds=2"))
    keys = ws.keys("mlp")
    found = sorted(p.size for p in probes._probes(ws, [tuple(keys)], []))
    assert len(keys) == 4 and found == [1, 2]


def _simulate(units: list[tuple], seconds: list[float], jobs: int, available: float) -> tuple[float, list[tuple]]:
    """What the scheduler does with ``units`` on ``jobs`` slots: each unit starts on the first free
    slot and is dropped when its seconds would end after ``available`` (train_unit_locked's start
    check). Returns (makespan of the units that ran, the dropped units)."""
    free, dropped = [0.0] * jobs, []
    for unit, s in zip(units, seconds):
        i = free.index(min(free))
        if free[i] + s > available * (1 + 1e-9):
            dropped.append(unit)
            continue
        free[i] += s
    return max(free), dropped


# GPU-like costs (issue 30): one member of cnn_deotte alone ~16 s an epoch; fused, a member's
# share of a group of 15 is 2 s an epoch; the mlp does not fuse.
GPU_COSTS = {"cnn_deotte": Cost(16.0, 10.0, 5, group_per_epoch=2.0, group_size=15), "mlp": Cost(1.0, 2.0, 5)}
RANGES = {"cnn_deotte": Range(1, 30, 45, 1, 3), "mlp": Range(1, 10, 15, 1, 1)}


@pytest.mark.parametrize("jobs,fuse_max", [(1, 15), (2, 5), (4, 15), (4, 3)])
def test_the_plan_counts_exactly_the_units_the_scheduler_runs(jobs, fuse_max):
    """For every budget from the smallest that fits upwards, the planned members grouped as the
    scheduler groups them (form_units) and each unit at its planned seconds: no unit is dropped
    at its start check, and the plan's wall seconds are their makespan. (Before: members were
    planned one by one, so a fused model's whole group was dropped at its start.)"""
    order = ["cnn_deotte", "mlp"]

    def group_of(key):
        return key[0] if key[0] == "cnn_deotte" else None

    plans = 0
    for available in range(60, 6000, 41):
        try:
            p = plan(available + 60, available, GPU_COSTS, RANGES, order, jobs=jobs, group_of=group_of,
                     fuse_max=fuse_max)
        except Exception:  # noqa: BLE001 - too small: the planner's own test covers it
            continue
        plans += 1
        seeds = {m.model: m.seeds for m in p.models}
        epochs = {m.model: m.epochs for m in p.models}
        units = form_units(dispatch(order, seeds, {m: 5 for m in order}), group_of, fuse_max, jobs)
        assert all(len(u) <= fuse_max for u in units)
        seconds = [GPU_COSTS[u[0][0]].unit(len(u), epochs[u[0][0]]) for u in units]
        wall, dropped = _simulate(units, seconds, jobs, available)
        assert not dropped, (available, p)
        assert wall == pytest.approx(p.seconds)
        assert sum(m.seconds for m in p.models) == pytest.approx(sum(seconds))
    assert plans > 50


def test_a_group_costs_what_its_size_costs():
    """A unit of one trains unfused (its member alone); a group's seconds run linearly from one
    member alone to the timed group, and a member's share beyond it."""
    c = GPU_COSTS["cnn_deotte"]
    assert c.unit(1, 10) == c.member(10) == 16.0 * 10 + 10.0
    assert c.unit(15, 10) == pytest.approx(15 * 2.0 * 10 + 15 * 10.0)
    assert c.unit(8, 10) == pytest.approx((16.0 + (30.0 - 16.0) * 7 / 14) * 10 + 8 * 10.0)
    assert c.unit(20, 1) == pytest.approx(20 * 2.0 + 20 * 10.0)
    assert GPU_COSTS["mlp"].unit(3, 2) == 3 * GPU_COSTS["mlp"].member(2)


def test_a_budgeted_fused_run_on_four_slots_drops_nothing_it_planned(tiny_cfg, monkeypatch):
    """stage=train with budget=, runtime.fuse=on and 4 side-by-side slots (the issue's case),
    with GPU-like timings standing in for the timed steps and the side-by-side pool simulated:
    every unit the scheduler starts was counted by the plan at the same seconds, none is
    dropped at its start check, and their makespan is the plan's wall time."""
    cfg = tiny_cfg("ensemble=[cnn_deotte]", "budget=12m", "runtime.fuse=on", "runtime.fold_jobs=4",
                   "+models.cnn_deotte.ranges.seeds=[1,6]", "+models.cnn_deotte.ranges.epochs=[1,40]",
                   "models.cnn_deotte.seeds=6")
    monkeypatch.setattr(scheduler, "fold_jobs", lambda setting, device, pending: min(4, pending))
    monkeypatch.setattr(budgeted, "fold_jobs", lambda setting, device, pending: min(4, pending))

    def gpu_like(ws, units, n_jobs, later=(), solo=frozenset()):
        size = max(len(u) for u in units)
        return {"cnn_deotte": ModelTiming(alone=40.0 * 2, group=5.0 * 2, size=size, predict_s=1e-5)}

    monkeypatch.setattr(probes, "time_models", gpu_like)
    seen = {}

    def pool(ws, units, seconds, choices, n_jobs, deadlines, finish, rates=None, protect=None):
        seconds = [s() for s in seconds]  # each read at its dispatch (the observed slowdown: none here)
        wall, dropped = _simulate(units, seconds, n_jobs, min(deadlines) - time.time())  # the unprotected units'
        assert any(protect) and not all(protect)  # the first seed's units are the submission's
        seen.update(units=units, seconds=seconds, wall=wall, dropped=dropped, jobs=n_jobs, rates=rates)
        finish([scheduler.MemberOutcome(k, Outcome.TRAINED) for u in units for k in u])

    monkeypatch.setattr(scheduler, "_side_by_side", pool)
    ws = Workspace.load(cfg)
    train.run(ws)
    record = budget_mod.read_record(ws.paths.budget_plan)
    assert seen["jobs"] == 4 and not seen["dropped"]
    assert any(len(u) > 1 for u in seen["units"])  # fused groups, at least one per slot
    assert len(seen["units"]) >= 4
    assert seen["wall"] == pytest.approx(record.plan.seconds, rel=1e-6)
    assert record.plan.seconds <= record.plan.available
    assert seen["rates"] == [1e-5] * len(seen["units"])  # each unit's deadline checks count the timed prediction


def _fused_timing(faster: bool):
    def timed(ws, units, n_jobs, later=(), solo=frozenset()):
        size = max(len(u) for u in units)
        return {m: ModelTiming(alone=10.0, group=5.0 if faster else 20.0, size=size, predict_s=1e-4)
                for m in {u[0].model for u in units}}
    return timed


def test_fuse_auto_measures_both_ways_and_records_its_choice(tiny_cfg, monkeypatch, caplog):
    """runtime.fuse=auto times a fused group and one member alone where they train (CPU here),
    logs both figures, fuses only when the group was faster, and every member's metrics.json
    records the choice; without the estimate, auto fuses nothing and says so."""
    run = ("ensemble=[mlp]", "+models.mlp.seeds=2", "runtime.fuse=auto", "runtime.estimate=true")
    with caplog.at_level(logging.INFO):  # the real measurement, on this CPU
        outcomes = train.run(Workspace.load(tiny_cfg(*run)))
    line = next(r.message for r in caplog.records if "(runtime.fuse=auto)" in r.message)
    assert "a fused group of 4" in line and "s per member, against" in line and "s alone" in line
    fuse = outcomes[0].metrics["fuse"]
    assert fuse["mode"] == "auto" and fuse["group_size"] == 4 and fuse["alone_s"] > 0 and fuse["group_s"] > 0
    assert fuse["fused"] == (fuse["group_s"] < fuse["alone_s"]) == ("fused" in outcomes[0].metrics)
    # the group timed in both memory layouts, the choice and its figure recorded (issue 30, 7)
    assert fuse["contiguous_s"] > 0 and fuse["channels_last_s"] > 0
    assert fuse["channels_last"] == probes.faster_layout(fuse["contiguous_s"], fuse["channels_last_s"], True)
    assert fuse["group_s"] == (fuse["channels_last_s"] if fuse["channels_last"] else fuse["contiguous_s"])
    assert "its fused group of 4 takes" in caplog.text and "s channels_last: " in caplog.text
    for faster in (True, False):
        monkeypatch.setattr(probes, "time_models", _fused_timing(faster))
        cfg = tiny_cfg(*run, "force=true")
        outcomes = train.run(Workspace.load(cfg))
        assert all(o.metrics["fuse"]["fused"] is faster for o in outcomes)
        assert all(("fused" in o.metrics) is faster for o in outcomes)
        on_disk = json.loads((Workspace.load(cfg).member_dir(outcomes[0].key) / "metrics.json").read_text())
        assert on_disk["fuse"] == FuseChoice(FuseMode.auto, faster, 10.0, 5.0 if faster else 20.0,
                                             4).to_json()
    caplog.clear()
    ws = Workspace.load(tiny_cfg("ensemble=[mlp]", "+models.mlp.seeds=2", "runtime.fuse=auto"))
    with caplog.at_level(logging.INFO):
        fusion = decide_fusion(ws, ws.keys("mlp"), 1, torch.device("cpu"), measure=False)
    assert fusion.models == frozenset() and fusion.timed is None
    assert "runtime.fuse=auto: not measured (runtime.estimate=false); mlp train unfused" in caplog.text


def test_the_albumentations_backend_trains_unfused(tiny_cfg, caplog):
    """With aug.backend=albumentations a model's members never fuse (one DataLoader and its
    workers per member); one log line says why."""
    ws = Workspace.load(tiny_cfg("ensemble=[cnn_deotte]", "models.cnn_deotte.seeds=2", "runtime.fuse=on",
                                 "aug.backend=albumentations"))
    keys = ws.keys("cnn_deotte")
    with caplog.at_level(logging.INFO):
        assert plan_units(ws, keys, torch.device("cpu")) == [(k,) for k in keys]
    assert "cnn_deotte: 4 member(s) train unfused (aug.backend=albumentations: one DataLoader per member)" in caplog.text
    torch_ws = Workspace.load(tiny_cfg("ensemble=[cnn_deotte]", "models.cnn_deotte.seeds=2", "runtime.fuse=on"))
    assert plan_units(torch_ws, keys, torch.device("cpu")) == [tuple(keys)]


def test_a_budget_counts_from_the_runs_entry_not_the_process_start(tiny_cfg, monkeypatch):
    """Run in-process from a kernel that started two hours ago, a 10-minute budget is counted
    from the run's entry (the settings' start), so it plans instead of failing as too small."""
    monkeypatch.setattr(budget_mod, "process_start", lambda: time.time() - 7200)
    monkeypatch.setattr(budgeted, "process_start", lambda: time.time() - 7200, raising=False)
    entry = time.time()
    ws = Workspace.load(tiny_cfg("model=mlp", "budget=10m"))
    record, _, _ = budgeted.make_plan(ws, ["mlp"])
    assert entry <= record.started <= time.time() and record.deadline == record.started + 600
    assert record.plan.available > 500


def test_the_plans_prediction_cost_is_timed_on_a_batch(tiny_cfg):
    """The probe times a prediction batch (seconds per image), and each member's fixed cost is
    its fold and the test set in every TTA view at that rate (no constant ratio to training)."""
    ws = Workspace.load(tiny_cfg("model=mlp"))
    keys = ws.keys("mlp")
    timed = probes.time_models(ws, [(k,) for k in keys], 1)
    t = timed["mlp"]
    assert t.predict_s > 0 and t.group is None and t.alone > 0
    for rate in (t.predict_s, 10 * t.predict_s):
        cost = budgeted.costs(ws, {"mlp": ModelTiming(t.alone, None, 1, rate)}, frozenset(), ["mlp"], 2)["mlp"]
        views = len(budgeted.tta_views(ws.settings.models["mlp"].tta))
        n = len(ws.comp.x_train)
        assert cost.fixed == pytest.approx(budgeted.MARGIN * (rate * views * (n / 2 + len(ws.comp.x_test)) + 2.0))
        assert cost.group_per_epoch is None


def test_the_first_model_is_timed_with_the_machine_to_itself(tiny_cfg):
    """Probes in 2 side-by-side worker processes, then the lone member of each ``solo`` model
    once more in one worker with every core (the threads the odd last member of a round trains
    with): its ``solo`` figure reaches the plan's cost (``solo_per_epoch``) and survives merging
    with another worker's timing (which has none); with one process nothing is timed twice
    (``alone`` is that figure) and the cost has no solo rate."""
    ws = Workspace.load(tiny_cfg("ensemble=[mlp]", "runtime.fuse=off"))
    units = [(k,) for k in ws.keys("mlp")]
    timed = probes.time_models(ws, units, 2, solo=frozenset({"mlp"}))
    assert timed["mlp"].solo > 0 and timed["mlp"].alone > 0
    costs = budgeted.costs(ws, timed, frozenset(), ["mlp"], 2)
    knee = ws.settings.models["mlp"].ranges.knee
    assert costs["mlp"].solo_per_epoch - costs["mlp"].per_epoch == pytest.approx(
        budgeted.MARGIN * (timed["mlp"].solo - timed["mlp"].alone) / knee)
    assert budgeted.costs(ws, {"mlp": timed["mlp"].slower(dataclasses.replace(timed["mlp"], solo=None))},
                          frozenset(), ["mlp"], 2)["mlp"].solo_per_epoch == costs["mlp"].solo_per_epoch
    assert probes.time_models(ws, units, 1, solo=frozenset({"mlp"}))["mlp"].solo is None
    assert budgeted.costs(ws, {"mlp": dataclasses.replace(timed["mlp"], solo=None)}, frozenset(), ["mlp"],
                          2)["mlp"].solo_per_epoch is None


def test_the_scheduler_checks_the_odd_last_member_at_its_planned_price(tiny_cfg):
    """Under a budget the scheduler's start check uses the plan's price for each unit at its
    share of the machine: the 5th member of 5 on 2 slots (alone on every core) at its solo
    price, the others at their side-by-side price, so a plan that counted the cheaper tail never
    drops the member that completes the seed."""
    ws = Workspace.load(tiny_cfg("ensemble=[mlp]", "folds.k=5"))
    keys = ws.keys("mlp")
    planned = scheduler.UnitPlan(probes.Fusion(frozenset(), {}, 1), lambda unit, sharing: 60.0 if sharing == 1 else 100.0)
    _, units, est = scheduler._units(ws, keys, [], 2, torch.device("cpu"), time.time() + 600, planned)
    assert len(units) == 5 and est.n_jobs == 2
    assert [est.member_seconds[k] for k in keys] == [100.0] * 4 + [60.0]


def test_form_units_keeps_dispatch_order_and_fills_the_slots():
    keys = [(m, s, f) for s in range(2) for m in ("a", "b") for f in range(3)]
    units = form_units(keys, lambda k: k[0] if k[0] == "a" else None, 15, 2)
    assert units == [(("a", 0, 0), ("a", 0, 1), ("a", 0, 2)), (("b", 0, 0),), (("b", 0, 1),), (("b", 0, 2),),
                     (("a", 1, 0), ("a", 1, 1), ("a", 1, 2)), (("b", 1, 0),), (("b", 1, 1),), (("b", 1, 2),)]
    assert [len(u) for u in form_units(keys, lambda k: "all", 4, 1)] == [4, 4, 4]
    assert makespan([1.0] * 3, 2) == 2.0 and list(itertools.chain(*form_units(keys, lambda k: None, 4, 3))) == keys


def test_a_gpus_memory_sizes_the_groups(tiny_cfg, monkeypatch, caplog):
    """The group size comes from the probe's measured peak memory: 70% of the free memory, shared
    by the side-by-side processes, over one member's share of the peak (stand-in figures of a
    16 GB GPU: 11 GiB free, 1.2 GiB a member, 2 processes -> 3 a group); one log line."""
    from pipeline.device import group_memory_limit

    assert group_memory_limit(1.2 * 2**30, 11 * 2**30, 2) == 3
    assert group_memory_limit(1.2 * 2**30, 11 * 2**30, 1) == 6 and group_memory_limit(50 * 2**30, 2**30, 1) == 1

    def measured(ws, units, n_jobs, later=(), solo=frozenset()):
        return {"cnn_deotte": ModelTiming(10.0, 2.0, max(len(u) for u in units), 1e-4, 1.2 * 2**30, 11 * 2**30)}

    monkeypatch.setattr(probes, "time_models", measured)
    ws = Workspace.load(tiny_cfg("ensemble=[cnn_deotte]", "models.cnn_deotte.seeds=4", "runtime.fuse=on"))
    keys = ws.keys("cnn_deotte")
    with caplog.at_level(logging.INFO):
        fusion = decide_fusion(ws, keys, 2, torch.device("cpu"), measure=True)
    assert fusion.fuse_max == 3 and fusion.models == {"cnn_deotte"}
    assert "holds 3 per group" in caplog.text and "1229 MiB" in caplog.text
    units = plan_units(ws, keys, torch.device("cpu"), fusion.models, 2, fusion.fuse_max)
    assert [len(u) for u in units] == [3, 3, 2]


def test_a_probe_group_out_of_memory_is_halved(tiny_cfg, monkeypatch, caplog):
    """A fused group's timed steps that run out of GPU memory are timed again at half the size
    (one log line), instead of ending stage=train with a traceback."""
    from pipeline.train import fused

    real = fused.seconds_per_group

    def small_gpu(specs, *args, **kwargs):
        if len(specs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(specs, *args, **kwargs)

    monkeypatch.setattr(fused, "seconds_per_group", small_gpu)
    ws = Workspace.load(tiny_cfg("ensemble=[cnn_deotte]", "models.cnn_deotte.seeds=2", "runtime.fuse=on"))
    keys = ws.keys("cnn_deotte")
    with caplog.at_level(logging.INFO):
        timed = probes.time_models(ws, [tuple(keys)], 1)
    assert timed["cnn_deotte"].size == 2 and timed["cnn_deotte"].group > 0
    assert "a fused group of 4 ran out of GPU memory in its timed steps; timing 2" in caplog.text


def test_a_group_out_of_memory_in_training_continues_as_two_halves(tiny_cfg, monkeypatch, caplog):
    """stage=train: a fused group that runs out of GPU memory is halved (one log line) and each
    half trains from its members' checkpoints; every member ends trained and cached."""
    from pipeline.train import fused

    real = fused.fit_group

    def small_gpu(specs, *args, **kwargs):
        if len(specs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(specs, *args, **kwargs)

    monkeypatch.setattr(fused, "fit_group", small_gpu)
    cfg = tiny_cfg("ensemble=[mlp]", "+models.mlp.seeds=2", "runtime.fuse=on")
    with caplog.at_level(logging.INFO):
        outcomes = train.run(Workspace.load(cfg))
    assert [o.outcome for o in outcomes] == [Outcome.TRAINED] * 4
    assert all(o.metrics["fused"]["members"] == 2 for o in outcomes)
    assert "mlp: a fused group of 4 ran out of GPU memory; it continues as groups of 2 and 2" in caplog.text
    ws = Workspace.load(cfg)
    assert all(ws.verify(o.key).ok for o in outcomes)


def _layout_timing(monkeypatch, contiguous_s: float, channels_last_s: float) -> list[bool]:
    """Stand-ins for the timed steps: one member alone 10 s; a fused group ``contiguous_s`` /
    ``channels_last_s`` per member in each layout. Returns the layouts timed, in order."""
    from pipeline.train import fused

    timed = []

    def group(specs, *args, **kwargs):
        timed.append(specs[0].runtime.channels_last)
        return (channels_last_s if specs[0].runtime.channels_last else contiguous_s) * len(specs)

    monkeypatch.setattr(probes, "seconds_per_member", lambda *args, **kwargs: 10.0)
    monkeypatch.setattr(fused, "seconds_per_group", group)
    return timed


def test_fuse_auto_times_both_memory_layouts_and_the_group_trains_in_the_faster(tiny_cfg, monkeypatch, caplog):
    """runtime.fuse=auto times the fused group with runtime.channels_last off and on, logs both
    figures in one line, records them and the choice in metrics.json, and the group trains in
    the faster layout even when the config says the other; the fused-vs-alone decision uses the
    chosen layout's figure."""
    from pipeline.train import fused

    timed = _layout_timing(monkeypatch, contiguous_s=3.0, channels_last_s=1.0)
    trained = []
    real = fused.fit_group

    def fit_group(specs, *args, **kwargs):
        trained.append({s.runtime.channels_last for s in specs})
        return real(specs, *args, **kwargs)

    monkeypatch.setattr(fused, "fit_group", fit_group)
    cfg = tiny_cfg("ensemble=[mlp]", "+models.mlp.seeds=2", "runtime.fuse=auto", "runtime.estimate=true",
                   "runtime.channels_last=false")
    with caplog.at_level(logging.INFO):
        outcomes = train.run(Workspace.load(cfg))
    assert sorted(timed) == [False, True]
    assert "mlp: its fused group of 4 takes 3.000 s per member contiguous, 1.000 s channels_last: channels_last " \
           "(runtime.channels_last=false; within 5% it stays)" in caplog.text
    assert "a fused group of 4, 1.0 s per member, against 10.0 s alone" in caplog.text
    assert trained == [{True}]  # the group trained in the layout measured faster
    assert all(o.metrics["fuse"] == {"mode": "auto", "fused": True, "alone_s": 10.0, "group_s": 1.0, "group_size": 4,
                                     "channels_last": True, "contiguous_s": 3.0, "channels_last_s": 1.0}
               for o in outcomes)
    on_disk = json.loads((Workspace.load(cfg).member_dir(outcomes[0].key) / "metrics.json").read_text())
    assert on_disk["fuse"]["channels_last"] is True and on_disk["fuse"]["contiguous_s"] == 3.0


@pytest.mark.parametrize("fuse,contiguous_s,channels_last_s,configured,expected,layouts", [
    ("auto", 1.0, 1.02, False, False, 2),  # within noise: the configured layout stays
    ("auto", 1.0, 1.02, True, True, 2),
    ("auto", 1.0, 2.0, True, False, 2),  # contiguous clearly faster, although channels_last is configured
    ("on", 1.0, 2.0, True, None, 1),  # only auto measures; on times the configured layout alone
])
def test_the_layout_choice_keeps_the_configured_one_within_noise(tiny_cfg, monkeypatch, fuse, contiguous_s,
                                                                channels_last_s, configured, expected, layouts):
    """Where the timings cannot tell the layouts apart (within LAYOUT_NOISE) runtime.channels_last
    stays; only runtime.fuse=auto times both layouts."""
    timed = _layout_timing(monkeypatch, contiguous_s, channels_last_s)
    ws = Workspace.load(tiny_cfg("ensemble=[mlp]", "+models.mlp.seeds=2", f"runtime.fuse={fuse}",
                                 f"runtime.channels_last={str(configured).lower()}"))
    fusion = decide_fusion(ws, ws.keys("mlp"), 1, torch.device("cpu"), measure=True)
    choice = fusion.choices["mlp"]
    assert len(timed) == layouts and choice.channels_last is expected and fusion.models == {"mlp"}
    assert choice.group_s == {None: channels_last_s if configured else contiguous_s,
                              True: channels_last_s, False: contiguous_s}[expected]
    runtime = choice.group_runtime(ws.settings.runtime)
    assert runtime.channels_last is (configured if expected is None else expected)


def test_the_deadline_check_counts_the_timed_prediction_and_the_next_validation():
    """check_deadline counts the predictions left at the probe's timed seconds per image when
    given (else a third of a training image), and the images left include the next epoch's
    validation when it validates before the last."""
    from pipeline.train.engine import DeadlineReached, check_deadline, images_left

    assert images_left(1, 3, 1, 200, 119, 2) == 200 + 2 * 319  # epoch 2 validates, then the final views
    assert images_left(2, 3, 1, 200, 119, 2) == 2 * 319  # epoch 3 is the last: its validation is the final views
    assert images_left(1, 5, 2, 200, 119, 1) == 200 + 319 and images_left(2, 5, 2, 200, 119, 1) == 319
    soon = time.time() + 100
    check_deadline(soon, 1.0, 100, 10_000, "m", None)  # the old ratio: 10,000 x 1/300 s = 33 s, fits
    with pytest.raises(DeadlineReached, match="m: the next epoch would end after the budget's deadline"):
        check_deadline(soon, 1.0, 100, 10_000, "m", 0.01)  # timed: 100 s of prediction
    with pytest.raises(DeadlineReached):
        check_deadline(soon, 1.0, 100, 10**6, "m", None)  # the old ratio: 3,333 s
    check_deadline(soon, 1.0, 100, 10**6, "m", 1e-6)  # timed: 1 s
    check_deadline(None, 1e9, 1, 10**9, "m", 1.0)  # no deadline


@pytest.mark.parametrize("fuse", [False, True])
def test_a_members_deadline_uses_its_timed_prediction_seconds(tiny_cfg, fuse):
    """A member (or a fused group) whose spec carries a slow timed prediction rate stops after
    its first epoch at a deadline a minute away (the fold and test set would take minutes to
    predict); with a fast rate the same deadline lets it finish."""
    from pipeline.train import fused
    from pipeline.train.engine import DeadlineReached, FitSpec, fit_member

    ws = Workspace.load(tiny_cfg("model=mlp", "train.epochs=3"))
    keys = ws.keys("mlp")[:2 if fuse else 1]

    def fit(rate):
        specs = [FitSpec.create(ws.settings.models["mlp"], ws.settings.runtime, k, ws.member_config(k),
                                time.time() + 60, rate) for k in keys]
        if fuse:
            return fused.fit_group(specs, ws.comp, ws.folds, predict_test=True)
        return [fit_member(specs[0], ws.comp, ws.folds, predict_test=True)]

    with pytest.raises(DeadlineReached, match="the next epoch would end after the budget's deadline"):
        fit(1.0)  # about 319 images x 1 s each
    done = fit(1e-6)
    assert all(r.metrics["epochs"] == 3 and len(r.metrics["history"]) == 3 for r in done)


def test_a_budgeted_member_carries_the_probes_prediction_seconds(tiny_cfg, monkeypatch):
    """Under budget= every member's fit spec carries the seconds per image its model's prediction
    batch was timed at (ModelTiming.predict_s), unfused and in a fused group."""
    from pipeline.train import fused
    from pipeline.train.engine import DeadlineReached

    monkeypatch.setattr(probes, "seconds_per_image", lambda spec, comp: 2.5e-4)
    rates = []

    def stopped(specs):
        rates.extend(s.predict_seconds_per_image for s in specs)
        raise DeadlineReached("stand-in: stopped at once")

    monkeypatch.setattr(scheduler, "fit_member", lambda spec, *args, **kwargs: stopped([spec]))
    monkeypatch.setattr(fused, "fit_group", lambda specs, *args, **kwargs: stopped(specs))
    for fuse in ("off", "on"):
        rates.clear()
        outcomes = train.run(Workspace.load(tiny_cfg("ensemble=[mlp]", "budget=10m", f"runtime.fuse={fuse}")))
        assert outcomes and all(o.outcome is Outcome.STOPPED for o in outcomes)
        assert len(rates) == len(outcomes) and set(rates) == {2.5e-4}
