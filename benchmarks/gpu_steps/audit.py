"""Step 5, ``sync_audit``: one epoch of the real loop (:func:`pipeline.train.engine.train_epoch`;
plain, EMA, SWA) and one epoch of a fused group of :data:`AUDIT_GROUP`
(:func:`pipeline.train.fused.group_epoch`, what CUDA trains by default) with
``torch.cuda.set_sync_debug_mode("warn")``: every GPU->host synchronisation and where (on the
CPU the epochs just run).
"""

from __future__ import annotations

from pathlib import Path

from .common import competition, fused_keys, fused_steps, host_syncs, member_spec, sync, tiled_competition

AUDIT_GROUP = 3  # members of the fused group whose epoch sync_audit runs


def step_sync_audit(args, work: Path) -> dict:
    """GPU->host synchronisations in one epoch of the real loop (plain, EMA, SWA) and in one
    epoch of a fused group of :data:`AUDIT_GROUP` members (:func:`pipeline.train.fused.group_epoch`),
    each after a warm-up epoch. Raises AssertionError when an epoch synchronises more often than
    it reads its figures back (2 reads, the fused group 3 with fp16's overflow counts; plus one per
    step with fp16's gradient scaler)."""
    import numpy as np

    from pipeline.train.engine import setup_loop, train_epoch

    ws, source = competition(args, work)
    batch = args.batches[0]
    steps = 8 if args.device == "cpu" else 32
    comp = tiled_competition(ws.comp, steps * batch)
    results = {"data": source}
    for name, changes in (("plain", {}), ("ema", {"ema": 0.9}), ("swa", {"swa": 0.5})):
        spec = member_spec(ws, "cnn_deotte", epochs=2, min_steps=0, batch_size=batch, **changes)
        loop = setup_loop(spec, comp, np.arange(len(comp.x_train)))
        train_epoch(loop, spec, 1)  # warm-up (and, for SWA, epoch 2 is the averaged one)
        sync(loop.device)
        with host_syncs(loop.device) as found:
            train_epoch(loop, spec, 2)
        n = len(loop.batches)
        allowed = 2 + (n if spec.precision.value == "fp16" else 0)  # the epoch's loss/acc reads; fp16's scaler
        results[name] = {"steps": n, "syncs": len(found), "allowed": allowed, "precision": spec.precision.value,
                         "where": sorted(set(found))}
    results["fused"] = _fused_epoch_syncs(ws, comp, batch)  # what CUDA trains by default (runtime.fuse=auto)
    if args.device == "cpu":
        results["note"] = "CPU: no GPU->host synchronisation exists; the audit ran the epochs only"
    bad = {k: v for k, v in results.items() if isinstance(v, dict) and v["syncs"] > v["allowed"]}
    if bad:
        raise AssertionError(f"host syncs inside the training steps: {bad}")
    return results


def _fused_epoch_syncs(ws, comp, batch: int) -> dict:
    """The synchronisations of one epoch of a fused group of :data:`AUDIT_GROUP` ``cnn_deotte``
    members at ``batch`` on ``comp`` (5 folds), after a warm-up epoch: its row of figures."""
    import numpy as np

    from pipeline.device import select_device
    from pipeline.train import fused

    folds = np.arange(len(comp.x_train)) % 5
    specs = [member_spec(ws, "cnn_deotte", key, epochs=2, min_steps=0, batch_size=batch)
             for key in fused_keys(AUDIT_GROUP)]
    device = select_device(specs[0].runtime.device)
    g = fused.setup_group(specs, comp, folds)
    fused.group_epoch(g, 1)  # warm-up
    sync(device)
    with host_syncs(device) as found:
        fused.group_epoch(g, 2)
    n = fused_steps(specs, folds, batch)
    fp16 = specs[0].precision.value == "fp16"
    return {"members": len(specs), "steps": n, "syncs": len(found), "precision": specs[0].precision.value,
            "allowed": 2 + (1 + n if fp16 else 0), "where": sorted(set(found))}
