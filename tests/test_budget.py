"""budget=: the planner in isolation (a pure function of budget, costs and ranges), its parsing,
and the deadline in a real run on the MNIST fixture."""

from __future__ import annotations

import pytest

from pipeline.budget import Cost, Range, dispatch, makespan, parse_budget, plan, side_by_side
from pipeline.errors import ConfigError
from pipeline.workspace import Workspace

# Costs as measured on the 2-core CPU (fp32, 2 members side by side, quick profile): a
# cnn_deotte member-epoch ~75 s of the member's own time, an mlp one ~2 s; 5 folds.
COSTS = {"cnn_deotte": Cost(per_epoch=75.0, fixed=30.0, folds=5), "mlp": Cost(per_epoch=2.0, fixed=3.0, folds=5)}
JOBS = 2
RANGES = {"cnn_deotte": Range(epochs_lo=1, knee=8, epochs_hi=12, seeds_lo=1, seeds_hi=3),
          "mlp": Range(epochs_lo=3, knee=10, epochs_hi=15, seeds_lo=1, seeds_hi=1)}
ORDER = ["cnn_deotte", "mlp"]


def test_budget_values_parse_to_seconds():
    assert parse_budget("20m") == 1200 and parse_budget("2h") == 7200 and parse_budget(90) == 90
    assert parse_budget("1h30m") == 5400 and parse_budget("45s") == 45 and parse_budget(None) is None
    for bad in ("soon", "-5", "0", "20x"):
        with pytest.raises(ConfigError, match=f"budget={bad}: expected"):
            parse_budget(bad)


def test_members_fill_the_side_by_side_slots_in_dispatch_order():
    assert makespan([10, 10, 10, 10, 10], 2) == 30 and makespan([10, 1, 1, 1], 2) == 10
    assert makespan([5, 5], 1) == 10
    assert dispatch(["a", "b"], {"a": 2, "b": 1}, {"a": 2, "b": 2}) == [
        ("a", 0, 0), ("a", 0, 1), ("b", 0, 0), ("b", 0, 1), ("a", 1, 0), ("a", 1, 1)]


def test_the_plan_never_exceeds_the_budget_and_grows_with_it():
    """Over budgets from the smallest that fits to far more than every range needs: the plan's
    wall seconds (5 folds on 2 slots: the odd fold counts a whole round) are within what is
    available, and member-epochs never fall as the budget grows."""
    previous = 0
    seen = set()
    for available in range(400, 30_000, 37):
        p = plan(available + 60, available, COSTS, RANGES, ORDER, jobs=JOBS)
        assert p.seconds <= available
        epochs = p.member_epochs(COSTS)
        assert epochs >= previous, (available, p)
        previous = epochs
        seen.add(tuple((m.seeds, m.epochs) for m in p.models))
        for i, m in enumerate(p.models):
            r = RANGES[m.model]
            assert (i > 0 and m.seeds == 0) or r.seeds_lo <= m.seeds <= r.seeds_hi  # 0: not joined yet
            assert r.epochs_lo <= m.epochs <= r.epochs_hi
    assert ((3, 12), (1, 15)) in seen  # a large budget reaches the top of every range
    assert len(seen) >= 12  # every step of the sequence is a plan of some budget


def test_the_policy_epochs_to_the_knee_then_seeds_of_the_strongest_then_more_epochs():
    one = [COSTS["cnn_deotte"].member(8)] * 5 + [COSTS["mlp"].member(10)] * 5
    knee = makespan(one, 1)
    p = plan(knee + 100, knee + 1, COSTS, RANGES, ORDER, jobs=1)
    assert [(m.seeds, m.epochs) for m in p.models] == [(1, 8), (1, 10)]
    second_seed = knee + 5 * COSTS["cnn_deotte"].member(8)
    p = plan(second_seed + 100, second_seed + 1, COSTS, RANGES, ORDER, jobs=1)
    assert [(m.seeds, m.epochs) for m in p.models] == [(2, 8), (1, 10)]


def test_the_next_model_joins_only_once_the_first_reaches_its_knee():
    """Step 1 in order: the first model's epochs rise to its knee before the second model joins
    (one seed at its lowest epochs); a model that has not joined is left out (0 seeds), and the
    plan's table says so. A model with existing members has joined from the start. (One slot:
    on two, the second model's first members fill the slot the first model's odd fold leaves.)"""
    first_at = {e: makespan([COSTS["cnn_deotte"].member(e)] * 5, 1) for e in (4, 8)}
    p = plan(first_at[4] + 60, first_at[4] + 1, COSTS, RANGES, ORDER, jobs=1)
    assert [(m.seeds, m.epochs) for m in p.models] == [(1, 4), (0, 3)]
    assert "mlp              left out" in p.table()
    joined = makespan([COSTS["cnn_deotte"].member(8)] * 5 + [COSTS["mlp"].member(3)] * 5, 1)
    p = plan(joined + 60, joined, COSTS, RANGES, ORDER, jobs=1)
    assert [(m.seeds, m.epochs) for m in p.models] == [(1, 8), (1, 3)] and p.seconds <= joined
    assert [(m.seeds, m.epochs) for m in plan(joined + 60, joined - 1, COSTS, RANGES, ORDER, jobs=1).models] == [
        (1, 8), (0, 3)]
    p = plan(first_at[4] + 60, first_at[4] + 1, COSTS, RANGES, ORDER, fixed_epochs={"mlp": 5}, jobs=1)
    assert p.models[1].seeds == 1 and p.models[1].epochs == 5


def test_the_odd_last_member_is_priced_with_the_machine_to_itself():
    """One model's 5 folds on 2 slots: the 5th member trains alone on every core
    (:func:`side_by_side`), so the plan prices it at the rate timed with the machine to itself
    (``solo_per_epoch``) and fits more epochs in the same budget; the figures as on the digits
    (resnet9: about 32 s an epoch at one core of two side by side, 19 s with both). With a second
    model the rounds drift apart and nobody trains alone: every member keeps its shared price."""
    shared = Cost(per_epoch=32.0, fixed=8.0, folds=5)
    solo = Cost(per_epoch=32.0, fixed=8.0, folds=5, solo_per_epoch=19.0)
    assert solo.unit(1, 8, 1) == 8 * 19.0 + 8.0 and solo.unit(1, 8, 2) == shared.unit(1, 8, 1) == 8 * 32.0 + 8.0
    assert solo.unit(2, 8, 1) == shared.unit(2, 8)  # a fused tail keeps its timed price
    ranges = {"resnet9": Range(1, 8, 12, 1, 3), "cnn_deotte": Range(1, 8, 12, 1, 3)}
    available = 2 * shared.member(8) + solo.unit(1, 8, 1) + 1
    one = ["resnet9"]
    p = plan(available + 60, available, {"resnet9": solo}, ranges, one, jobs=2)
    assert (p.models[0].seeds, p.models[0].epochs) == (1, 8)
    assert p.seconds == pytest.approx(2 * shared.member(8) + solo.unit(1, 8, 1))
    assert p.models[0].seconds == pytest.approx(4 * shared.member(8) + solo.unit(1, 8, 1))
    p = plan(available + 60, available, {"resnet9": shared}, ranges, one, jobs=2)
    assert p.models[0].epochs == 6 and p.seconds == pytest.approx(3 * shared.member(6))  # priced as timed
    assert side_by_side(["resnet9"] * 5 + ["cnn_deotte"] * 5, 2) == [2] * 10
    both = plan(1e6, 1e6, {"resnet9": solo, "cnn_deotte": solo}, ranges, ["resnet9", "cnn_deotte"], jobs=2,
                fixed_epochs={"cnn_deotte": 8})
    assert both.models[0].seconds == pytest.approx(both.models[0].seeds * 5 * solo.member(both.models[0].epochs))


def test_a_cache_that_a_models_members_share_is_priced_once():
    """A transfer model's frozen pass (``Cost.once``: computed once, before any unit trains) is
    counted once whatever its seeds and folds: a second seed costs its members alone."""
    top = Cost(per_epoch=10.0, fixed=2.0, folds=5, once=100.0)
    ranges = {"lite0_top": Range(1, 6, 6, 1, 2)}
    member = top.member(6)
    two_seeds = 100.0 + makespan([member] * 10, 2)
    p = plan(two_seeds + 60, two_seeds, {"lite0_top": top}, ranges, ["lite0_top"], jobs=2)
    assert (p.models[0].seeds, p.models[0].epochs) == (2, 6)
    assert p.seconds == pytest.approx(two_seeds) and p.models[0].seconds == pytest.approx(100.0 + 10 * member)
    p = plan(two_seeds + 60, two_seeds - 1, {"lite0_top": top}, ranges, ["lite0_top"], jobs=2)
    assert (p.models[0].seeds, p.models[0].epochs) == (1, 6)
    with pytest.raises(ConfigError, match="too small"):  # the cache alone takes what is available
        plan(160, 100, {"lite0_top": top}, ranges, ["lite0_top"], jobs=2)


def test_a_model_with_existing_members_keeps_its_epochs():
    p = plan(60_000, 59_000, COSTS, RANGES, ORDER, fixed_epochs={"cnn_deotte": 5}, jobs=JOBS)
    assert p.models[0].epochs == 5 and p.models[0].seeds == 3 and p.models[1].epochs == 15


def test_too_small_a_budget_names_the_smallest_that_fits():
    # one seed at the lowest epochs: 5 cnn_deotte members of 105 s and 5 mlp of 7 s on 2 slots
    least = makespan([105.0] * 5 + [7.0] * 5, JOBS)
    assert least == 3 * 105.0  # 3 rounds of cnn_deotte; the mlp members fill the other slot
    with pytest.raises(ConfigError, match=r"budget=5.0 min: too small; .* expected budget >= 7m"):
        plan(300, 300 - 60, COSTS, RANGES, ORDER, jobs=JOBS)
    assert plan(least + 60, least, COSTS, RANGES, ORDER, jobs=JOBS).seconds == pytest.approx(least)


# --------------------------------------------------------------------------- the deadline, for real

import dataclasses  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from conftest import TINY, command_error  # noqa: E402


def test_a_member_stopped_by_the_deadline_resumes_from_its_checkpoint(tiny_cfg):
    """The deadline comes during epoch 3's planning (after epoch 2's checkpoint): training stops
    with DeadlineReached, the checkpoint stays, and the same member run again (a larger budget)
    continues after epoch 2 to the uninterrupted run's probabilities."""
    from pipeline.members import MemberKey
    from pipeline.train.engine import DeadlineReached, FitSpec, fit_member
    from pipeline.workspace import Workspace

    cfg = tiny_cfg("model=cnn_deotte", "runtime.deterministic=true", "train.epochs=4", "models.cnn_deotte.train.epochs=4")
    ws = Workspace.load(cfg)
    key = MemberKey("cnn_deotte", 0)
    spec = FitSpec.create(ws.settings.models["cnn_deotte"], ws.settings.runtime, key, ws.member_config(key))
    ref = fit_member(spec, ws.comp, ws.folds, predict_test=False)
    path = ws.member_dir(key) / "resume.pt"
    path.parent.mkdir(parents=True)
    timed = dataclasses.replace(spec, deadline=time.time() + 3600)

    def deadline_now(epoch, record):
        if epoch == 2:
            timed.deadline = time.time()  # the budget's deadline is here

    with pytest.raises(DeadlineReached, match="the next epoch would end after the budget's deadline"):
        fit_member(timed, ws.comp, ws.folds, predict_test=False, resume_path=path, on_epoch=deadline_now)
    import torch

    assert torch.load(path, weights_only=True)["epoch"] == 2
    res = fit_member(spec, ws.comp, ws.folds, predict_test=False, resume_path=path)
    assert res.metrics["resumed_after_epoch"] == 2
    np.testing.assert_allclose(res.oof, ref.oof, atol=1e-6)


def test_existing_checkpoints_fix_a_models_epochs(tiny_cfg):
    """A model whose members left checkpoints keeps their epochs under a budget, so that a larger
    budget continues them: a member's end-of-epoch checkpoint (what a fused member writes too,
    written for 3 epochs) is read past an unreadable one, and a complete member's config comes
    first."""
    from pipeline import members

    from pipeline.members import MemberKey
    from pipeline.paths import RESUME
    from pipeline.train.budgeted import existing_epochs
    from pipeline.train.resume import save_resume
    from pipeline.workspace import Workspace

    ws = Workspace.load(tiny_cfg("model=mlp"))
    assert existing_epochs(ws, "mlp") is None
    keys = [MemberKey("mlp", f) for f in range(2)]
    configs = [ws.member_config(k) for k in keys]
    for c in configs:
        c["train"]["epochs"] = 3
    broken = ws.member_dir(keys[0]) / RESUME
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not a checkpoint")
    ws.member_dir(keys[1]).mkdir(parents=True)
    save_resume(ws.member_dir(keys[1]) / RESUME, {"cache_key": members.key_text(configs[1]), "epoch": 1})
    assert existing_epochs(ws, "mlp") == 3
    done = ws.member_dir(keys[0])
    configs[0]["train"]["epochs"] = 5
    (done / "config.yaml").write_text(members.key_text(configs[0]))
    (done / "manifest.json").write_text("{}")
    assert existing_epochs(ws, "mlp") == 5


def test_a_budgeted_run_shows_its_plan_and_blends_only_complete_seeds(tiny_cfg, caplog, monkeypatch):
    """stage=train with budget=: the plan (model, seeds, epochs, minutes, reserve) is logged before
    any member trains and saved; a seed with a member stopped at the deadline is left out of the
    blend (its complete seed 0 blends), and the log says what was dropped."""
    import logging

    from pipeline import blend, train
    from pipeline.budget import read_record
    from pipeline.members import MemberKey
    from pipeline.train import scheduler
    from pipeline.train.engine import DeadlineReached
    from pipeline.train.scheduler import Outcome
    from pipeline.workspace import Workspace

    real = scheduler.train_member

    def stopped_at_the_deadline(ws, key, runtime=None, deadline=None, choice=None, predict_s=None):
        if key == MemberKey("cnn_deotte", 1, 1):
            raise DeadlineReached(f"{key}: the budget's deadline came in epoch 1")
        return real(ws, key, runtime, deadline, choice, predict_s)

    monkeypatch.setattr(scheduler, "train_member", stopped_at_the_deadline)
    run = ("ensemble=[cnn_deotte]", "budget=2h", "runtime.fuse=off", "+models.cnn_deotte.ranges.seeds=[1,2]",
           "+models.cnn_deotte.ranges.epochs=[1,3]", "blend.method=mean", "aug=none")
    cfg = tiny_cfg(*run)
    with caplog.at_level(logging.INFO):
        outcomes = train.run(Workspace.load(cfg))
    text = caplog.text
    assert "cnn_deotte       2 seed(s) x 3 epochs" in text and "reserved for prediction, blend and report" in text
    assert text.index("the plan, from steps timed here") < text.index("OOF acc")
    assert [o.outcome for o in outcomes].count(Outcome.STOPPED) == 1
    assert "cnn_deotte: 1 of 2 planned seed(s) complete; the blend uses those (dropped: cnn_deotte fold 1 seed 1)" in text
    ws = Workspace.load(cfg)
    record = read_record(ws.paths.budget_plan)
    assert record.complete == {"cnn_deotte": 1} and record.stopped == ("cnn_deotte fold 1 seed 1",)
    assert record.plan.seconds <= record.plan.available
    out = blend.run(Workspace.load(tiny_cfg(*run)))
    assert [e["seed"] for e in out.saved.record["manifests"]["cnn_deotte"]] == [0, 0]  # seed 0's two folds
    from pipeline import report

    page = report.run(Workspace.load(tiny_cfg(*run))).read_text()  # the plan against what happened
    assert "<h2>Budget</h2>" in page and "Stopped at the deadline: cnn_deotte fold 1 seed 1" in page
    assert '<td class="l">cnn_deotte</td><td class="">2 x 3</td>' in page


def test_a_budget_too_small_is_one_line_and_exit_2(tmp_path, digits_dir, capsys):
    code, lines = command_error(capsys, "stage=train", f"paths.root={tmp_path}", f"data.dir={digits_dir}", *TINY,
                                "ensemble=[cnn_deotte]", "budget=2s")
    assert code == 2 and len(lines) == 1, lines
    assert "budget=2 s: too small" in lines[0] and "expected budget >= " in lines[0]
    assert not list(tmp_path.glob("artifacts/cnn_deotte/*/model.safetensors"))


def test_pseudo_label_rounds_are_left_out_of_a_budget(tiny_cfg, caplog):
    """A profile with a pseudo-label round (the competition profile's) runs under budget=: the
    round is not planned, says so in one line, and the blend goes on without it."""
    import logging

    from pipeline import blend, train

    run = ("ensemble=[mlp]", "pseudo.models=[mlp]", "budget=2h", "blend.method=mean")
    with caplog.at_level(logging.INFO):
        outcomes = train.run(Workspace.load(tiny_cfg(*run)))
    assert {o.key.model for o in outcomes} == {"mlp"} and len(outcomes) == 2
    assert "budget: pseudo-label rounds are not planned under a budget; mlp_pl left out" in caplog.text
    out = blend.run(Workspace.load(tiny_cfg(*run)))
    assert set(out.members) == {"mlp"}


def test_the_first_seed_fits_even_on_a_machine_that_slows_after_the_timing():
    """The first model's first seed is the submission: with ``guard`` (stage=train passes
    FIRST_SEED_GUARD, 1.3), however the budget falls, the plan keeps it within the time available
    at 1.3 times its timed cost, beyond its lowest epochs; without, it may fill the time."""
    from pipeline.budget import FIRST_SEED_GUARD, form_units, priced

    costs = {"cnn_deotte": COSTS["cnn_deotte"]}
    ranges = {"cnn_deotte": Range(epochs_lo=1, knee=8, epochs_hi=30, seeds_lo=1, seeds_hi=1)}
    units = form_units(dispatch(["cnn_deotte"], {"cnn_deotte": 1}, {"cnn_deotte": 5}), lambda k: None, 1, JOBS)
    unguarded = 0
    for available in range(600, 6000, 113):
        p = plan(available + 60, available, costs, ranges, ["cnn_deotte"], jobs=JOBS, guard=FIRST_SEED_GUARD)
        first = makespan(priced(units, costs, {"cnn_deotte": p.models[0].epochs}, JOBS), JOBS)
        assert first * FIRST_SEED_GUARD <= available or p.models[0].epochs == 1, (available, p)
        assert p.seconds <= available
        loose = plan(available + 60, available, costs, ranges, ["cnn_deotte"], jobs=JOBS)
        unguarded += makespan(priced(units, costs, {"cnn_deotte": loose.models[0].epochs}, JOBS), JOBS) * \
            FIRST_SEED_GUARD > available
    assert unguarded > 10  # without the guard a 30% slowdown would cut the only seed short


def test_the_observed_slowdown_scales_what_is_left():
    from pipeline.members import MemberKey
    from pipeline.train.scheduler import observed_slowdown

    a, b, c = (MemberKey("mlp", f, 0) for f in range(3))
    probe = MemberKey("lite0_probe", 0, 0)
    planned = {a: 10.0, b: 10.0, c: 10.0, probe: 18.0}
    assert observed_slowdown({}, planned, "mlp") == 1.0
    assert observed_slowdown({a: 13.0, b: 13.0}, planned, "mlp") == pytest.approx(1.3)
    assert observed_slowdown({a: 7.0}, planned, "mlp") == 1.0  # a faster machine keeps the plan
    # ELPV: the probe's first member held its whole feature pass (68 s against 18 s planned): that
    # says nothing of another model's members
    assert observed_slowdown({probe: 68.0}, planned, "mlp") == 1.0
    assert observed_slowdown({probe: 68.0}, planned, "lite0_probe") == pytest.approx(68 / 18)


def test_the_submissions_unit_starts_where_another_is_dropped(tiny_cfg):
    """A unit whose estimate ends after the deadline is dropped unstarted, unless it is the first
    model's first seed (protected): that one trains (and would stop at its own deadline)."""
    import time

    from pipeline.members import MemberKey
    from pipeline.train.scheduler import Outcome, train_unit_locked
    from pipeline.workspace import Workspace

    ws = Workspace.load(tiny_cfg("model=mlp", "train.epochs=1"))
    deadline = time.time() + 300
    dropped = train_unit_locked(ws, (MemberKey("mlp", 0, 0),), deadline=deadline, seconds=1000.0)
    assert [o.outcome for o in dropped] == [Outcome.DROPPED]
    kept = train_unit_locked(ws, (MemberKey("mlp", 0, 0),), deadline=deadline, seconds=1000.0, protect=True)
    assert [o.outcome for o in kept] == [Outcome.TRAINED] and ws.verify(MemberKey("mlp", 0, 0)).ok


@pytest.mark.slow
def test_a_machine_that_slows_by_30_percent_after_the_timing_still_submits_within_the_budget(tiny_cfg, monkeypatch):
    """budget=40s: the plan fills the time from steps timed here (the submission's seed at 1.3x its
    timed cost); then every training step takes 1.3 times as long (a shared machine slowing down
    after the timing). The first model's first
    seed still completes, the blend writes the submission, and it lands before the deadline."""
    import time

    from pipeline import blend, train
    from pipeline.budget import read_record
    from pipeline.train import budgeted, engine
    from pipeline.workspace import Workspace

    real_plan, real_step = budgeted.make_plan, engine.train_step

    def slow_step(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_step(*args, **kwargs)
        time.sleep(0.3 * (time.perf_counter() - t0))
        return out

    def plan_then_slow(ws, models):
        out = real_plan(ws, models)
        monkeypatch.setattr(engine, "train_step", slow_step)
        return out

    monkeypatch.setattr(budgeted, "make_plan", plan_then_slow)
    run = ("ensemble=[cnn_deotte]", "budget=40s", "runtime.fuse=off", "models.cnn_deotte.train.epochs=150",
           "+models.cnn_deotte.ranges.seeds=[1,3]", "+models.cnn_deotte.ranges.epochs=[1,150]", "blend.method=mean",
           "aug=none")
    train.run(Workspace.load(tiny_cfg(*run)))
    blend.run(Workspace.load(tiny_cfg(*run)))
    landed = time.time()
    paths = Workspace.load(tiny_cfg(*run)).paths
    record = read_record(paths.budget_plan)
    # the plan gave the only seed every epoch that fits 1.3x slower (FIRST_SEED_GUARD): its steps dominate
    assert record.plan.seconds > 0.6 * record.plan.available and record.plan.models[0].epochs > 10
    assert record.complete["cnn_deotte"] >= 1 and paths.submission("submission").exists()
    assert landed <= record.deadline, (landed - record.started, record.to_json())
