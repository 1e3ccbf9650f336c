"""Stage ``blend``: combine the members' cached OOF/test probabilities into leaderboard files.

    python run.py stage=blend                       # every method (blend.method=all)
    python run.py stage=blend blend.method=stack

Only OOF predictions are used for fitting and scoring. Each blender's CV score is itself
cross-validated on the same folds (:func:`pipeline.blend.blenders.cross_val_oof`); the final
blender is then fitted on all OOF rows and applied to the fold-averaged test probabilities.
``submissions/submission.csv`` is the method with the best OOF ``data.metric`` (accuracy by
default; ties: lower log loss), in the competition's submission format (a label with the original
class names, or one probability column per class).
The blend is saved (:mod:`pipeline.blend.store`) before the submissions are written; its record
holds the sha256 of ``submission.csv``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from pipeline.blend import store
from pipeline.blend.blenders import cross_val_oof, make_blender
from pipeline.data import SubmissionKind, submission_csv
from pipeline.errors import ArtifactError
from pipeline.io import save_text
from pipeline.metrics import DECISION_METRICS, Score, cross_fitted_decision, score
from pipeline.settings import BlendMethod, BlendSeeds, BlendSettings, Metric
from pipeline.members import BlendMember, read_metrics
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class BlendResult:
    """One method's blend: the blender fitted on all OOF rows, its own cross-validated OOF
    ``(N, C)``, its test probabilities ``(M, C)`` and the OOF score."""

    method: BlendMethod
    blender: object
    oof: np.ndarray
    test: np.ndarray
    score: Score


@dataclass
class BlendOutcome:
    """What ``stage=blend`` produced: member and blend scores, the submitted method, the saved blend."""

    members: dict[str, Score]
    blends: dict[BlendMethod, BlendResult]
    best: BlendMethod
    saved: store.SavedBlend


def fit_blend(method: BlendMethod, X: np.ndarray, X_test: np.ndarray, y: np.ndarray,
              folds: np.ndarray, settings: BlendSettings) -> BlendResult:
    """Blend with one method and the ``blend`` group's ``settings``. ``X``: ``(N, M, C)`` OOF and
    ``X_test``: ``(M_test, M, C)`` test probabilities of the M members; ``folds``: ``(N,)``."""
    blender = make_blender(method, settings)
    oof = cross_val_oof(blender, X, y, folds)
    fitted = blender.fit(X, y)
    return BlendResult(method, fitted, oof, fitted.predict_proba(X_test), score(y, oof))


def leave_one_out(method: BlendMethod, X: np.ndarray, y: np.ndarray, folds: np.ndarray,
                  names: list[str], settings: BlendSettings) -> dict[str, Score]:
    """Each member's marginal value: the ``method`` blend of all the other members, fitted and
    cross-validated exactly like the blend itself (empty with a single member)."""
    if len(names) < 2:
        return {}
    return {n: score(y, cross_val_oof(make_blender(method, settings), np.delete(X, i, axis=1), y, folds))
            for i, n in enumerate(names)}


def _record(ws: Workspace, names: list[str], preds, results: dict, best: BlendMethod,
            submission_sha: str, loo: dict[str, Score]) -> dict:
    comp = ws.comp
    return {
        "members": names, "k": ws.settings.folds.k, "folds_digest": ws.folds_digest,
        "data_fingerprint": comp.fingerprint, "num_classes": comp.num_classes,
        "in_chans": int(comp.x_train.shape[1]), "img_size": comp.side,
        "manifests": {p.name: p.manifests for p in preds},
        "class_names": comp.class_names, "metric": Metric(ws.settings.data.metric).value,
        "layout": comp.layout.value, "resize": str(ws.settings.data.resize),
        "model_scores": {p.name: vars(score(comp.y_train, p.oof)) for p in preds},
        "methods": {m.value: {**vars(r.score), "params": r.blender.get_params(),
                              "member_weights": r.blender.member_weights().tolist()}
                    for m, r in results.items()},
        "best": best.value, "submission_sha256": submission_sha,
        "leave_one_out": {n: vars(s) for n, s in loo.items()},
    }


def _decision(ws: Workspace, metric: Metric, best: BlendResult) -> dict | None:
    """For a metric of the predicted classes (balanced accuracy, macro-F1) and a label
    submission: per-class weights on the submitted blend's probabilities fitted on its OOF
    predictions (:func:`pipeline.metrics.cross_fitted_decision`), kept when their cross-fitted
    OOF score beats the plain argmax; ``{weights, oof, argmax_oof}`` or None."""
    if metric not in DECISION_METRICS or ws.comp.submission is not SubmissionKind.label:
        return None
    weights, fitted, plain = cross_fitted_decision(ws.comp.y_train, best.oof, ws.folds, metric)
    log.info("blend: %s of the predicted classes: per-class weights fitted on the OOF predictions give OOF %.5f "
             "(fitted on the other folds), the most probable class %.5f%s", metric.value, fitted, plain,
             "; the submission uses them" if fitted > plain else "; the submission keeps the most probable class")
    if fitted <= plain:
        return None
    return {"weights": weights.tolist(), "oof": fitted, "argmax_oof": plain}


def _log_table(ws: Workspace, outcome: BlendOutcome) -> None:
    auc = any(s.roc_auc is not None for s in outcome.members.values())

    def row(label: str, s: Score, minutes: str = "") -> str:
        extra = f" {s.roc_auc:9.5f}" if auc and s.roc_auc is not None else (" " * 10 if auc else "")
        return f"{label:28s} {s.accuracy:9.5f} {s.log_loss:9.4f}{extra} {minutes:>9s}"

    lines = [f"{'':28s} {'OOF acc':>9s} {'log loss':>9s}{' OOF AUC' if auc else ''} {'train min':>9s}"]
    for name, s in outcome.members.items():
        e = BlendMember.parse(name)
        minutes = sum(read_metrics(ws.member_dir(k)).seconds for k in ws.keys(e.model, seed_index=e.seed_index)) / 60
        lines.append(row("model " + name, s, f"{minutes:.1f}"))
    for m, r in outcome.blends.items():
        lines.append(row("blend " + m.value, r.score))
        if m is not BlendMethod.mean:
            lines.append("  member weights: " + ", ".join(
                f"{n}={w:.3f}" for n, w in zip(outcome.members, r.blender.member_weights())))
    log.info("blend: CV table\n%s", "\n".join(lines))
    metric = Metric(ws.settings.data.metric)
    log.info("blend: submissions/submission.csv = %s (OOF %s %.5f); files in %s", outcome.best.value,
             metric.value, outcome.blends[outcome.best].score.value(metric), ws.paths.submissions_dir)


def run(ws: Workspace) -> BlendOutcome:
    """Stage ``blend``: fit every ``blend.method`` on the members' OOF predictions, save the
    blend, write ``submissions/<method>.csv`` and ``submissions/submission.csv``.

    Raises:
        ArtifactError: a member is missing, stale or corrupt (named, with the command to fix it).
        ConfigError: an unknown method or model name.
    """
    ws.apply_budget_record()  # under budget=: the planned members whose seeds completed
    st = ws.settings
    averaged = BlendSeeds(st.blend.seeds) is BlendSeeds.average
    models = [n for n in st.blend_models if st.models[n].seed_count > 0]
    for n in sorted(set(st.blend_models) - set(models)):
        log.info("blend: %s left out: no seed of it completed within the budget", n)
    if not models:
        raise ArtifactError("blend: no model has a complete seed (every fold) within the budget; run: python "
                            "run.py stage=train with a larger budget")
    entries = [BlendMember(n, s) for n in models for s in ([None] if averaged else ws.seed_indices(n))]
    names = [e.label for e in entries]
    preds = [ws.predictions(e) for e in entries]
    y = ws.comp.y_train
    X, X_test = np.stack([p.oof for p in preds], 1), np.stack([p.test for p in preds], 1)
    results = {m: fit_blend(m, X, X_test, y, ws.folds, st.blend) for m in st.blend_methods}
    metric = Metric(st.data.metric)
    best = min(results, key=lambda m: results[m].score.rank(metric))
    csvs = {m.value: submission_csv(ws.comp, r.test, str(ws.paths.submission(m.value)))
            for m, r in results.items()}
    decision = _decision(ws, metric, results[best])
    if decision is not None:
        csvs[best.value] = submission_csv(ws.comp, results[best].test * np.asarray(decision["weights"]),
                                          str(ws.paths.submission(best.value)))
    sha = hashlib.sha256(csvs[best.value].encode()).hexdigest()
    loo = leave_one_out(best, X, y, ws.folds, names, st.blend)
    for n, s in loo.items():
        log.info("blend: %s without %s: OOF acc %.5f (%+.5f), log loss %.4f", best.value, n, s.accuracy,
                 results[best].score.accuracy - s.accuracy, s.log_loss)
    saved = store.save(ws.paths, {**_record(ws, names, preds, results, best, sha, loo), "decision": decision},
                       {m: (r.oof, r.test, r.blender.state()) for m, r in results.items()})
    for method, text in csvs.items():
        save_text(ws.paths.submission(method), text)
    save_text(ws.paths.submission("submission"), csvs[best.value])
    outcome = BlendOutcome({p.name: score(y, p.oof) for p in preds}, results, best, saved)
    _log_table(ws, outcome)
    return outcome
