"""Stage train: the OOF contract, the artifact layout, outcomes (cached / force / changed config),
seeds per member, the cache key's parts, and checkpoints that load without pickle."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import fit
from pipeline import train
from pipeline.errors import ConfigError, PipelineError
from pipeline.models import create_model
from pipeline.paths import MEMBER_FILES, Paths
from pipeline.config import validate
from pipeline import device, members
from pipeline.train import engine, inference
from pipeline.members import MemberKey, MemberStatus
from pipeline.train.scheduler import Outcome
from pipeline.workspace import Workspace


def test_every_train_row_predicted_exactly_once(trained_cfg):
    ws = Workspace.load(trained_cfg())
    for name in ("cnn_deotte", "mlp"):
        hits = np.zeros(len(ws.comp.y_train), dtype=int)
        for key in ws.keys(name):
            d = ws.member_dir(key)
            assert all((d / n).exists() for n in MEMBER_FILES)
            rows, probs = members.read_oof(d)
            np.testing.assert_array_equal(np.sort(rows), np.flatnonzero(ws.folds == key.fold))
            assert probs.dtype == np.float32 and probs.shape == (len(rows), 10)
            np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
            test = members.read_test(d)
            assert test.shape == (119, 10) and np.isfinite(test).all()
            hits[rows] += 1
            m = members.read_metrics(d).raw
            assert m["epochs"] == 6 and m["device"].startswith("cpu") and m["seconds"] > 0
            assert m["accuracy"] == pytest.approx((probs.argmax(1) == ws.comp.y_train[rows]).mean())
            assert len(m["history"]) == 6 and {"train_loss", "val_acc"} <= set(m["history"][0])
        assert (hits == 1).all()


def test_models_learn_something_real(trained_cfg):
    """Six epochs on 200 real digits: far above the 10% of chance (the data is not noise)."""
    paths = Paths.from_cfg(trained_cfg())
    for name, floor in (("mlp", 0.6), ("cnn_deotte", 0.2)):  # a narrow BN net is slower to start
        acc = np.mean([members.read_metrics(paths.member_dir(name, f)).accuracy for f in range(2)])
        assert acc > floor, name


def test_checkpoint_is_safetensors_and_rebuilds_the_model(trained_cfg):
    ws = Workspace.load(trained_cfg())
    d = ws.member_dir(MemberKey("cnn_deotte", 0))
    assert (d / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors: a JSON header, no pickle
    model, meta = members.load_model(d)
    assert meta["arch"] == "cnn_deotte" and meta["img_size"] == 28 and meta["in_chans"] == 1
    probs = inference.softmax(inference.predict_logits(model, ws.comp.x_test, torch.device("cpu"), channels_last=True,
                                                 precision=members.read_config(d)["train"]["precision"])[0])
    np.testing.assert_allclose(probs, members.read_test(d), atol=1e-5)


def test_cached_members_are_skipped_and_force_retrains(trained_cfg):
    cfg = trained_cfg("model=mlp", "fold=1")
    target = Paths.from_cfg(cfg).member_dir("mlp", 1) / "test.npy"
    stamp = target.stat().st_mtime_ns
    [out] = train.run(Workspace.load(cfg))
    assert out.outcome is Outcome.CACHED and out.metrics is None
    assert target.stat().st_mtime_ns == stamp
    [out] = train.run(Workspace.load(trained_cfg("model=mlp", "fold=1", "force=true")))
    assert out.outcome is Outcome.RETRAINED and out.reason == "force=true"
    assert target.stat().st_mtime_ns != stamp


def test_changed_config_retrains_and_says_why(tiny_cfg):
    [first] = train.run(Workspace.load(tiny_cfg("model=mlp", "fold=0")))
    assert first.outcome is Outcome.TRAINED
    [out] = train.run(Workspace.load(tiny_cfg("model=mlp", "fold=0", "models.mlp.kwargs.hidden=64")))
    assert out.outcome is Outcome.RETRAINED and out.reason == "config changed (kwargs)"


def test_seeds_differ_per_model_and_fold_and_are_stable():
    seeds = {(m, f): members.training_seed(42, MemberKey(m, f)) for m in ("mlp", "cnn_deotte") for f in range(3)}
    assert len(set(seeds.values())) == len(seeds)  # every (model, fold) draws its own batches
    assert members.training_seed(42, MemberKey("mlp", 0)) == seeds[("mlp", 0)]
    assert members.training_seed(43, MemberKey("mlp", 0)) != seeds[("mlp", 0)]
    assert all(0 <= s < 2**31 for s in seeds.values())


def test_cache_key_holds_seed_architecture_and_folds(tiny_cfg):
    ws = Workspace.load(tiny_cfg())
    key = ws.member_config(MemberKey("cnn_deotte", 1))
    assert key["seed"] == members.training_seed(42, MemberKey("cnn_deotte", 1))
    assert key["arch_digest"] == __import__("pipeline.models", fromlist=["x"]).architecture_digest("cnn_deotte")
    assert key["folds"]["digest"] == ws.folds_digest  # train.precision=auto, resolved for the CPU:
    assert key["train"]["precision"] == device.resolve_precision("auto", torch.device("cpu")).value != "auto"
    assert "compile" not in key["train"] and "deterministic" not in key["train"]  # how to run: runtime.*


def test_edited_architecture_makes_members_stale(tiny_cfg, monkeypatch):
    """A changed model definition (here: its digest) makes its cached members stale."""
    from pipeline import models

    train.run(Workspace.load(tiny_cfg("model=mlp", "fold=0")))
    monkeypatch.setattr(members, "architecture_digest", lambda name: "edited")
    ws = Workspace.load(tiny_cfg("model=mlp", "fold=0"))
    v = ws.verify(MemberKey("mlp", 0))
    assert v.status is MemberStatus.STALE and v.reason == "config changed (arch_digest)"
    # the digest ignores docstrings and comments but not code
    assert models.architecture_digest("mlp") == models.architecture_digest("mlp")
    assert len({models.architecture_digest(n) for n in models.list_models()}) == len(models.list_models())


@pytest.mark.parametrize("override, message", [
    ("fold=2", "fold=2: expected 'all' or an integer 0..1"),
    ("model=lenet", "unknown model 'lenet'; known models: cnn_deotte"),
    ("train.epochs=0", "train.epochs=0: expected >= 1"),
    ("models.mlp.train.lr=-1", "models.mlp.train.lr=-1.0: expected > 0"),
    ("models.mlp.train.compile=true", "models.mlp.train.compile: unknown setting"),
    ("train.precision=fp8", "train.precision=fp8: Invalid value 'fp8'"),
    ("runtime.fold_jobs=0", "runtime.fold_jobs=0: expected auto or >= 1"),
    ("aug.shift=1.5", "aug.shift=1.5: expected >= 0 and <= 1"),
])
def test_bad_settings_are_one_config_error_before_any_work(tiny_cfg, override, message):
    if override.startswith("models.mlp.train"):
        override = "+" + override  # the model's train group is empty in the base config
    cfg = tiny_cfg(override)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)
    assert not (Paths.from_cfg(cfg).artifacts_dir).exists()


def test_nan_loss_stops_the_member_and_caches_nothing(tiny_cfg):
    cfg = tiny_cfg("model=mlp", "fold=0", "train.lr=1e30")
    with pytest.raises(PipelineError, match="mlp fold 0: training loss became nan"):
        train.run(Workspace.load(cfg))
    d = Paths.from_cfg(cfg).member_dir("mlp", 0)
    assert not d.exists() or not any(d.iterdir())  # no artifact, no resume checkpoint


def test_precision_auto_resolves_per_device(monkeypatch):
    """train.precision=auto: bf16 at compute capability >= 8.0 (A100, L4, H100), fp16 on 7.x
    (V100, T4), fp32 below (P100); on the CPU bf16 only with native bf16. An explicit value is
    kept; an unknown one is one line."""
    cpu = torch.device("cpu")
    native = "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read()
    assert device.cpu_has_native_bf16() == native
    for has in (False, True):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda h=has: h)
        assert [device.resolve_precision(p, cpu).value for p in ("auto", "fp32", "bf16", "fp16")] == \
            ["bf16" if has else "fp32", "fp32", "bf16", "fp16"]
    gpus = {"P100": (6, 0), "V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "L4": (8, 9), "H200": (9, 0)}
    resolved = {}
    for name, cc in gpus.items():
        monkeypatch.setattr(device.torch.cuda, "get_device_capability", lambda d=None, cc=cc: cc)
        resolved[name] = device.resolve_precision("auto", torch.device("cuda")).value
        assert device.resolve_precision("fp32", torch.device("cuda")).value == "fp32"
    assert resolved == {"P100": "fp32", "V100": "fp16", "T4": "fp16", "A100": "bf16", "L4": "bf16",
                        "H200": "bf16"}
    assert device.grad_scaler(cpu, device.Precision.fp16) is not None
    assert device.grad_scaler(cpu, device.Precision.bf16) is None
    with pytest.raises(ConfigError, match="train.precision=fp8: expected one of auto, fp32, bf16, fp16"):
        device.resolve_precision("fp8", cpu)


def test_resolved_precision_is_the_cache_key_and_metrics(tiny_cfg, monkeypatch):
    """On a (pretended) T4 the cache key says fp16, not auto; on an H200 bf16: one key, one
    numerics. The precision a member trained in is in its metrics.json."""
    from pipeline.train import runtime as rt

    monkeypatch.setattr(rt.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rt.torch.cuda, "device_count", lambda: 1)
    keys = {}
    for cc in ((7, 5), (9, 0)):
        monkeypatch.setattr(rt.torch.cuda, "get_device_capability", lambda d=None, cc=cc: cc)
        ws = Workspace.load(tiny_cfg("runtime.device=cuda"))
        keys[cc] = ws.member_config(MemberKey("mlp", 0))
    assert keys[(7, 5)]["train"]["precision"] == "fp16" and keys[(9, 0)]["train"]["precision"] == "bf16"
    monkeypatch.undo()
    m = train.run(Workspace.load(tiny_cfg("model=mlp", "fold=0", "train.precision=fp16")))[0].metrics
    assert m["precision"] == "fp16" and m["device"].startswith("cpu")


def test_fp16_trains_with_a_grad_scaler_and_resumes_it(tiny_cfg):
    """fp16 (what auto picks on a T4 or V100) runs the CPU's fp16 autocast with a GradScaler: the
    logits are fp16, the loss fp32, the scaler's state is in the resume checkpoint, and the
    member learns as fp32 does."""
    torch.manual_seed(0)
    model = create_model("cnn_keras", 10, width=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    digits = Workspace.load(tiny_cfg()).comp
    x, y = torch.from_numpy(digits.x_train[:8]).float() / 255, torch.from_numpy(digits.y_train[:8])
    scaler = device.grad_scaler(torch.device("cpu"), device.Precision.fp16)
    loss, logits = engine.train_step(model, opt, x, y, precision=device.Precision.fp16, scaler=scaler)
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32
    assert scaler.get_scale() in (2.0 ** 16, 2.0 ** 15)  # the first step may find inf and back off
    cfg = tiny_cfg("model=mlp", "fold=0", "train.precision=fp16", "train.epochs=6", "aug=none")
    d = Paths.from_cfg(cfg).member_dir("mlp", 0)
    d.mkdir(parents=True)
    states = []

    def keep(epoch, record):
        states.append(torch.load(d / "resume.pt", weights_only=True))

    res = fit(cfg, "mlp", 0, predict_test=False, resume_path=d / "resume.pt", on_epoch=keep)
    assert "grad_scaler" in states[0] and states[0]["grad_scaler"]["scale"] > 0
    assert res.metrics["precision"] == "fp16" and res.metrics["accuracy"] > 0.6


def test_bf16_on_cpu_is_opt_in_and_trains(tiny_cfg):
    """The CPU step runs in fp32 with train.precision=fp32; bf16 autocasts the model (logits in
    bf16, loss in fp32) and still learns; the setting is part of the member's cache key."""
    torch.manual_seed(0)
    model = create_model("cnn_keras", 10, width=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    digits = Workspace.load(tiny_cfg()).comp
    x, y = torch.from_numpy(digits.x_train[:8]).float() / 255, torch.from_numpy(digits.y_train[:8])
    assert engine.train_step(model, opt, x, y, precision="fp32")[1].dtype == torch.float32
    loss, logits = engine.train_step(model, opt, x, y, precision="bf16")
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    acc = {}
    for p in ("fp32", "bf16"):  # the shared training run's settings, where mlp clears 0.6
        cfg = tiny_cfg("model=mlp", "fold=0", f"train.precision={p}", "train.epochs=6", "aug=none")
        res = fit(cfg, "mlp", 0, predict_test=False)
        assert np.allclose(res.oof.sum(1), 1, atol=1e-3)
        acc[p] = res.metrics["accuracy"]
    assert acc["bf16"] > 0.6 and abs(acc["bf16"] - acc["fp32"]) < 0.08, acc
    assert Workspace.load(cfg).member_config(MemberKey("mlp", 0))["train"]["precision"] == "bf16"


def test_a_run_says_what_it_will_cost(tiny_cfg, caplog):
    """Before training: the members left and the minutes they should take (from timed steps);
    after each member: the minutes to go; a GPU-sized profile on a CPU is warned about at once."""
    cfg = tiny_cfg("model=mlp", "runtime.estimate=true", "sized_for=gpu", "runtime.fuse=off")  # member by member
    train.run(Workspace.load(cfg))
    text = caplog.text
    assert "train: 2 member(s) to train, about" in text and "min on cpu" in text
    assert "train: 1 of 2 member(s) done, about" in text
    warn = [r for r in caplog.records if r.levelname == "WARNING" and "sized for a GPU" in r.message]
    assert len(warn) == 1 and "profile=quick" in warn[0].message
    from pipeline.train.probes import estimate

    ws = Workspace.load(cfg)
    est = estimate(ws, [(k,) for k in ws.keys("mlp")], 1, torch.device("cpu"))
    assert all(0 < s < 600 for s in est.member_seconds.values())
    assert est.minutes_left(set()) == pytest.approx(sum(est.member_seconds.values()) / 60)


def test_val_every_validates_fewer_epochs_and_changes_no_prediction(tiny_cfg):
    """runtime.val_every=2 over 5 epochs validates after epochs 2, 4 and 5 (the last) only; the
    weights, OOF and test probabilities and the cache key are those of validating every epoch."""
    base = ("model=mlp", "fold=0", "train.epochs=5", "runtime.deterministic=true")
    every = fit(tiny_cfg(*base), "mlp", 0)
    sparse = fit(tiny_cfg(*base, "runtime.val_every=2"), "mlp", 0)
    assert [h["epoch"] for h in sparse.metrics["history"] if "val_acc" in h] == [2, 4, 5]
    assert all("val_acc" in h and "val_loss" in h for h in every.metrics["history"])
    np.testing.assert_array_equal(sparse.oof, every.oof)
    np.testing.assert_array_equal(sparse.test, every.test)
    # the last epoch's validation is the final OOF (no TTA here): its accuracy is the fold's
    assert sparse.metrics["history"][-1]["val_acc"] == pytest.approx(sparse.metrics["accuracy"])
    assert [h["val_acc"] for h in sparse.metrics["history"] if "val_acc" in h] == \
        [every.metrics["history"][e]["val_acc"] for e in (1, 3, 4)]
    from pipeline.report import plot_curves  # validation drawn at the validated epochs only
    png = plot_curves("mlp", [{"model": "mlp", "fold": 0, "seed": 0, "history": sparse.metrics["history"]}],
                      Paths.from_cfg(tiny_cfg(*base)).root / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ws = Workspace.load(tiny_cfg(*base, "runtime.val_every=2"))
    assert ws.member_config(MemberKey("mlp", 0)) == Workspace.load(tiny_cfg(*base)).member_config(
        MemberKey("mlp", 0))


def test_min_steps_raises_the_epochs_of_a_small_competition(tiny_cfg, monkeypatch):
    """200 training rows at batch 32 make 6 steps per epoch: train.min_steps=30 trains 5 epochs
    instead of 2 (one-cycle schedule over all of them), and the estimate counts them (its timed
    step held at one figure, so that the ratio is the epochs', not the shared machine's)."""
    from pipeline.settings import train_settings
    from pipeline.train.probes import estimate

    t = train_settings(tiny_cfg(), "mlp")
    assert engine.planned_epochs(t, 6) == 2  # min_steps=0 in the tests' config
    cfg = tiny_cfg("model=mlp", "fold=0", "train.min_steps=30")
    assert engine.planned_epochs(train_settings(cfg, "mlp"), 6) == 5
    assert engine.planned_epochs(train_settings(cfg, "mlp"), 100) == 2  # enough steps: unchanged
    m = train.run(Workspace.load(cfg))[0].metrics
    assert m["epochs"] == 5 and [h["epoch"] for h in m["history"]] == [1, 2, 3, 4, 5]
    peak = train_settings(cfg, "mlp").lr  # the one-cycle schedule spans the 5 epochs:
    assert m["history"][1]["lr"] > 0.5 * peak and m["history"][-1]["lr"] < 0.01 * peak
    monkeypatch.setattr(engine, "seconds_per_step", lambda step, device, n, warmup, after_warmup=None: 0.01)
    ws = Workspace.load(tiny_cfg("model=mlp", "train.min_steps=30"))
    short = Workspace.load(tiny_cfg("model=mlp"))
    ratio = (estimate(ws, [(k,) for k in ws.keys("mlp")], 1, torch.device("cpu")).member_seconds[MemberKey("mlp", 1)]
             / estimate(short, [(k,) for k in short.keys("mlp")], 1,
                        torch.device("cpu")).member_seconds[MemberKey("mlp", 1)])
    assert 1.5 < ratio < 3.0  # 5 vs 2 epochs (each member's set-up and prediction counted once)


def test_a_member_records_its_peak_memory(tiny_cfg):
    """metrics.json gives the training process's peak resident memory (MiB; a Python process with
    torch holds well over 100 MiB) and, on a CPU, no GPU figure."""
    from conftest import fit

    res = fit(tiny_cfg("train.epochs=1"), "mlp", 0, predict_test=False)
    assert 100 < res.metrics["peak_rss_mb"] < 24 * 1024 and "peak_gpu_memory_mb" not in res.metrics
