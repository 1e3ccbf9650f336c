"""Steps 3 and 4, whether fusing members and resuming them change what they learn.

3. ``fused_vs_alone``: three ``cnn_deotte`` members (two folds of seed 0, one of seed 1) trained
   alone (:func:`pipeline.train.engine.fit_member`) and as one fused group
   (:func:`pipeline.train.fused.fit_group`) with dropout and augmentation off and deterministic
   numerics, in fp32 and at the precision ``auto`` resolves to here: the largest OOF probability
   difference per precision, against :data:`FUSED_TOL`;
4. ``averaging_resume``: a member without a weight average, with EMA and with SWA (cnn_deotte:
   BatchNorm), each interrupted after epoch 2 of 4 and resumed, against the uninterrupted run:
   the largest OOF probability difference, against :data:`RESUME_TOL`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .common import compose, fixture_copy, member_spec

RESUME_TOL = {"cpu": 1e-6, "cuda": 1e-4}  # largest |p_resumed - p_uninterrupted| that passes

# fused_vs_alone: tests/test_fused.py's exactness settings (deterministic, no dropout, no
# augmentation, the fixture's 3 folds), but 2 epochs at batch 64 and lr 1e-3 (8 optimiser steps).
# More steps amplify the grouped kernels' other rounding chaotically: at the fixture's 3 epochs,
# batch 32 and lr 3e-3, fp32 fused and alone differ by 1.1e-2 (width 0.25) and 7e-2 (width 1.0)
# on a 2-core AMD EPYC with AVX-512; at batch 32, lr 3e-4 and 4 epochs by 1.4e-2 (width 1.0).
FUSED_EXACT = ["ensemble=[cnn_deotte]", "folds.k=3", "models.cnn_deotte.seeds=2", "runtime.deterministic=true",
               "aug=none", "models.cnn_deotte.kwargs.dropout=0.0", "train.min_steps=0", "train.epochs=2",
               "models.cnn_deotte.train.epochs=2", "train.batch_size=64", "train.lr=1e-3"]
FUSED_MEMBERS = ((0, 0), (1, 0), (2, 1))  # (fold, seed index): two folds of seed 0, one of seed 1
# Largest |p_fused - p_alone| of an OOF probability that passes, per precision. Measured under
# FUSED_EXACT on that EPYC (width 0.25 / 1.0): fp32 5.0e-5 / 8.2e-6 (both compute in full fp32, TF32
# off; the kernels only sum in another order); bf16 2.3e-4 / 3.5e-4 (autocast rounds every
# convolution's and matmul's inputs to 8 mantissa bits, 3.9e-3 relative; fp16 to 11 bits, and its
# gradient scaler skips a fused group's step when any member overflows). The bound above: two
# different members of one fold (seeds 0 and 1, both alone) differ by only 2.4e-2 / 1.7e-2 after 8
# steps, so a looser tolerance such as 2e-2 would pass a group that returned another member's
# probabilities; the step records that figure and fails when it is not above the tolerance.
# fp32 1e-3 (20x the largest measured), bf16 / fp16 5e-3 (14x; 3.4x below 1.7e-2).
FUSED_TOL = {"fp32": 1e-3, "bf16": 5e-3, "fp16": 5e-3}


def step_fused_vs_alone(args, work: Path) -> dict:
    """:data:`FUSED_MEMBERS` of ``cnn_deotte`` trained alone and as one fused group under
    :data:`FUSED_EXACT`, on the fixture, in fp32 and (when it differs) the precision ``auto``
    resolves to on this device. Per precision: the largest |p_fused - p_alone| of an OOF
    probability (each member and overall), the fold accuracies, and as the scale of a real
    difference the same comparison between two different members of fold 0 (seeds 0 and 1, both
    alone).

    Raises:
        AssertionError: a member's OOF probabilities differ by more than :data:`FUSED_TOL` of
            its precision, or its OOF rows differ, or it left the group (training diverged), or
            two different members differ by no more than the tolerance (the comparison could
            not tell them apart).
    """
    from pipeline.device import resolve_precision, select_device
    from pipeline.members import MemberKey

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read when CUDA starts
    resolved = resolve_precision("auto", select_device(args.device)).value
    keys = [MemberKey("cnn_deotte", fold, seed) for fold, seed in FUSED_MEMBERS]
    other = MemberKey("cnn_deotte", 0, 1)  # fold 0 as keys[0], another seed: another member
    results = {"members": [str(k) for k in keys], "precision_auto": resolved, "settings": FUSED_EXACT}
    problems = []
    for precision in dict.fromkeys(["fp32", resolved]):
        results[precision], found = _fused_against_alone(args, work, precision, keys, other)
        problems += found
    if problems:
        raise AssertionError("; ".join(problems))
    return results


def _fused_against_alone(args, work: Path, precision: str, keys, other) -> tuple[dict, list[str]]:
    """``keys`` trained alone and fused, and ``other`` alone, under :data:`FUSED_EXACT` at
    ``precision`` (``fp32``, ``bf16``, ``fp16``): the row of figures :func:`step_fused_vs_alone`
    records for it, and the problems found (empty when it passes)."""
    import numpy as np

    from pipeline.train import fused
    from pipeline.train.engine import fit_member
    from pipeline.workspace import Workspace

    t0 = time.perf_counter()
    cfg = compose(work / precision, fixture_copy(work), args.device, *FUSED_EXACT, f"train.precision={precision}")
    ws = Workspace.load(cfg)
    specs = [member_spec(ws, "cnn_deotte", key) for key in keys]
    alone = [fit_member(spec, ws.comp, ws.folds, predict_test=False) for spec in specs]
    together = fused.fit_group(specs, ws.comp, ws.folds, predict_test=False)
    control = fit_member(member_spec(ws, "cnn_deotte", other), ws.comp, ws.folds, predict_test=False)
    tol = FUSED_TOL[precision]
    row = {"precision": specs[0].precision.value, "tolerance": tol}
    left = [f"{k}: {getattr(f, 'reason', f)}" for k, f in zip(keys, together) if not hasattr(f, "oof")]
    if left:
        return row, [f"{precision}: members left the fused group: {'; '.join(left)}"]
    diffs = [float(np.abs(f.oof - a.oof).max()) if np.array_equal(f.row_ids, a.row_ids) else float("inf")
             for a, f in zip(alone, together)]
    scale = float(np.abs(control.oof - alone[0].oof).max())
    row |= {"max_abs_diff": max(diffs), "per_member": diffs, "another_member_max_abs_diff": scale,
            "accuracy_alone": [a.metrics["accuracy"] for a in alone],
            "accuracy_fused": [f.metrics["accuracy"] for f in together],
            "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    problems = []
    if max(diffs) > tol:
        problems.append(f"{precision}: fused and alone differ by {max(diffs):.2e} (> {tol}; per member "
                        f"{', '.join(f'{d:.1e}' for d in diffs)})")
    if scale <= tol:
        problems.append(f"{precision}: two different members differ by only {scale:.2e} (<= {tol}): "
                        f"the comparison cannot tell members apart")
    return row, problems


def step_averaging_resume(args, work: Path) -> dict:
    """Per weight average (``plain``: none, ``ema``, ``swa``): one ``cnn_deotte`` member (width
    0.25, deterministic, no augmentation, 2 folds of the fixture) trained 4 epochs uninterrupted,
    then again stopped after epoch 2 and resumed from its checkpoint: the largest
    |p_resumed - p_uninterrupted| of an OOF probability, the accuracy (with and without the
    average). Raises AssertionError when a difference is over :data:`RESUME_TOL` of the device
    kind or a run did not resume after epoch 2."""
    import numpy as np

    from pipeline.train.engine import FitSpec, fit_member
    from pipeline.members import MemberKey
    from pipeline.workspace import Workspace

    class Stop(Exception):
        pass

    def stop(epoch, record):
        if epoch == 2:
            raise Stop

    results, worst = {}, 0.0
    for name, extra in (("plain", []), ("ema", ["train.ema=0.9"]), ("swa", ["train.swa=0.5"])):
        cfg = compose(work / name, fixture_copy(work), args.device, "folds.k=2", "train.min_steps=0",
                      "train.batch_size=32", "models.cnn_deotte.train.epochs=4", "models.cnn_deotte.kwargs.width=0.25",
                      "runtime.deterministic=true", "aug=none", *extra)
        ws = Workspace.load(cfg)
        key = MemberKey("cnn_deotte", 0)
        spec = FitSpec.create(ws.settings.models["cnn_deotte"], ws.settings.runtime, key, ws.member_config(key))
        ref = fit_member(spec, ws.comp, ws.folds, predict_test=False)
        path = work / name / "resume.pt"
        try:
            fit_member(spec, ws.comp, ws.folds, predict_test=False, resume_path=path, on_epoch=stop)
        except Stop:
            pass
        res = fit_member(spec, ws.comp, ws.folds, predict_test=False, resume_path=path)
        diff = float(np.abs(res.oof - ref.oof).max())
        worst = max(worst, diff)
        results[name] = {"max_abs_diff": diff, "resumed_after_epoch": res.metrics["resumed_after_epoch"],
                         "accuracy": res.metrics["accuracy"], "precision": res.metrics["precision"]}
        if name in ("ema", "swa"):
            results[name]["accuracy_raw_weights"] = res.metrics[name]["accuracy_without"]
    tol = RESUME_TOL["cpu" if args.device == "cpu" else "cuda"]
    results["tolerance"] = tol
    if worst > tol or any(r["resumed_after_epoch"] != 2 for k, r in results.items() if k != "tolerance"):
        raise AssertionError(f"resume differs from the uninterrupted run by {worst:.2e} (> {tol}): {results}")
    return results
