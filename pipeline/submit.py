"""Stage ``submit``: an export (:mod:`pipeline.export`) on a competition's test side -> ``submission.csv``.

    python run.py stage=submit export.dir=export data.dir=/path/to/competition
    python -m pipeline stage=submit export.dir=/kaggle/input/<dataset> data.dir=/kaggle/input/<competition> \\
        submit.output=/kaggle/working/submission.csv budget=8h30m        # what submit.ipynb runs

What a code competition's rerun does: it reads only the test side of ``data.dir`` (``test.csv`` or
``test/``, and ``sample_submission.csv``; ``train.csv`` and ``train/`` may be absent) in the
training run's layout, with the training run's side, channels, resize and class names
(:func:`pipeline.data.load_test_side`); verifies the export (every file against its sha256, each
network against the manifest the blend recorded); computes each member's probabilities exactly as
the blend did (:func:`pipeline.predict.member_probabilities`: the same networks, precision, TTA
views, fold-then-seed average), applies the submitted blender (:meth:`pipeline.blend.store.
SavedBlend.blender`) and writes the file with the training run's writer
(:func:`pipeline.data.submission_text`), in ``sample_submission.csv``'s columns and row order. On
the training run's own test set, on the CPU, that is the training run's ``submission.csv`` byte for
byte; the log says so when the sha256 matches.

Under ``budget=`` (the competition's run-time limit, counted from the command's start) each
member's networks are timed on a prediction batch here; when the whole ensemble would not fit in
what is left (less :func:`pipeline.budget.reserve_seconds`), the members of least marginal value
in the blend (:func:`pipeline.blend.store.marginal_values`, the report's figure) are left out
first, the submitted method is refitted on the OOF predictions of the others (``oof.npz`` in the
export), and the log names what was left out and the OOF score given up.

``submission.csv`` is written atomically once everything succeeded; an earlier one at
``submit.output`` is removed when the run starts, so a failed run leaves none (a stale file is
never submitted by mistake).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import data, export, predict
from pipeline.blend import store
from pipeline.blend.blenders import cross_val_oof
from pipeline.budget import format_minutes, reserve_seconds
from pipeline.choices import Layout, SubmissionKind
from pipeline.errors import ConfigError
from pipeline.io import save_text
from pipeline.metrics import SCORE_FIELDS, Score, score
from pipeline.paths import CHECKPOINT, CONFIG
from pipeline.runsettings import RunSettings

if TYPE_CHECKING:
    from pipeline.workspace import Workspace

log = logging.getLogger(__name__)

SUBMIT_FILES = (CHECKPOINT, CONFIG)  # what is checked of each network against its manifest


@dataclass(frozen=True)
class MemberCost:
    """A blend member's inference time here: ``networks`` (folds x seeds) of ``seconds_per_image``
    each (one network timed on a batch, TTA views included), for ``rows`` test images:
    ``seconds`` in all."""

    member: str
    networks: int
    seconds_per_image: float
    rows: int

    @property
    def seconds(self) -> float:
        return self.networks * self.seconds_per_image * self.rows


@dataclass(frozen=True)
class SubmitPlan:
    """What ``budget=`` decided: the members kept (blend order) and left out (in the order they
    were left out), the seconds left for prediction when it was planned, and each member's cost."""

    budget: float
    available: float
    costs: tuple[MemberCost, ...]
    kept: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class SubmitOutcome:
    """What ``stage=submit`` wrote: the file, its sha256, the members used, the blend's OOF score
    (refitted when members were left out), the rows written as the sample's default, the plan."""

    path: Path
    sha256: str
    members: tuple[str, ...]
    oof_score: Score | None
    default_rows: int
    plan: SubmitPlan | None
    same_as_training: bool


def choose_members(seconds: dict[str, float], values: dict[str, float], available: float) -> tuple[list[str], list[str]]:
    """Which members fit in ``available`` seconds: leave out the member of least marginal value
    (ties: the slower, then by name) until the others' ``seconds`` fit; never the last one.

    Args:
        seconds: each member's inference seconds (blend order); values: its marginal value in the
            blend (missing: 0).
    Returns:
        ``(kept in blend order, left out in the order they were left out)``; the kept ones may
        still not fit when one member alone does not (the caller decides).
    """
    kept = list(seconds)
    dropped: list[str] = []
    order = sorted(kept, key=lambda m: (values.get(m, 0.0), -seconds[m], m))
    while len(kept) > 1 and sum(seconds[m] for m in kept) > available:
        m = order.pop(0)
        kept.remove(m)
        dropped.append(m)
    return kept, dropped


def estimate_seconds(ens: export.ExportedEnsemble, label: str, images: np.ndarray, device, runtime) -> MemberCost:
    """Member ``label``'s cost here: its first network timed on a batch of ``images``
    (:func:`pipeline.predict.seconds_per_image`) times its networks and the rows."""
    nets = predict.networks(ens.saved, ens.paths, label)
    per_image = predict.seconds_per_image(nets[0], images, device, runtime, SUBMIT_FILES)
    return MemberCost(label, len(nets), per_image, len(images))


def plan_members(ens: export.ExportedEnsemble, images: np.ndarray, device, runtime, budget: float,
                 started: float) -> SubmitPlan:
    """Time every member here and choose the members that fit what is left of ``budget`` seconds
    since ``started`` (less :func:`pipeline.budget.reserve_seconds`) (:func:`choose_members`).

    Raises:
        ConfigError: even the most valuable member alone does not fit (one line with the budget
            that would).
    """
    costs = tuple(estimate_seconds(ens, m, images, device, runtime) for m in ens.saved.members)
    seconds = {c.member: c.seconds for c in costs}
    values = store.marginal_values(ens.saved.typed, ens.prep.metric)
    elapsed = time.time() - started
    available = budget - elapsed - reserve_seconds(budget)
    kept, dropped = choose_members(seconds, values, available)
    need = sum(seconds[m] for m in kept)
    log.info("submit: budget %s, %s gone, %s left for prediction (%s kept in reserve); members here: %s",
             format_minutes(budget), format_minutes(elapsed), format_minutes(max(0.0, available)),
             format_minutes(reserve_seconds(budget)),
             ", ".join(f"{c.member} {c.networks} network(s) x {c.seconds_per_image * 1e3:.2f} ms/image = "
                       f"{format_minutes(c.seconds)}" for c in costs))
    if need > available:
        smallest = (elapsed + reserve_seconds(0.0) + need) / 0.96  # reserve_seconds: 20 s + 4% of the budget
        raise ConfigError(f"budget={format_minutes(budget)}: too small; {kept[0]} alone needs about {format_minutes(need)} "
                          f"here and {format_minutes(max(0.0, available))} are left; expected budget >= "
                          f"{int(np.ceil(smallest / 60))}m")
    return SubmitPlan(budget, available, costs, tuple(kept), tuple(dropped))


def refit(ens: export.ExportedEnsemble, kept: list[str]):
    """The submitted method refitted on the OOF predictions of ``kept`` alone (its recorded
    settings, :meth:`pipeline.blend.store.SavedBlend.unfitted`), and its cross-validated OOF score
    on the training folds (as ``stage=blend`` scores a blend).

    Returns ``(fitted blender, Score)``. Raises ArtifactError for an unreadable ``oof.npz``."""
    X, y, folds = ens.oof()
    idx = [ens.saved.members.index(m) for m in kept]
    cv = cross_val_oof(ens.saved.unfitted(), X[:, idx], y, folds)
    return ens.saved.unfitted().fit(X[:, idx], y), score(y, cv)


def _clear(output: Path) -> None:
    if output.exists():
        output.unlink()
        log.info("submit: removed the earlier %s (a failed run leaves none)", output)


def _check_environment(record: dict) -> None:
    """Log the packages whose installed version differs from the training environment's."""
    from importlib import metadata

    env = record.get("environment") or {}
    differ = []
    for name, version in {**(env.get("assumed") or {}), **(env.get("shipped") or {})}.items():
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = None
        if version is not None and here != version:
            differ.append(f"{name} {here or 'missing'} (trained with {version})")
    if differ:
        log.warning("submit: versions differ from the training environment: %s", "; ".join(differ))


def run(ws: "Workspace") -> SubmitOutcome:
    """Stage ``submit``: write ``submit.output`` from the export ``export.dir`` and the test side
    of ``data.dir`` (see the module docstring).

    Raises:
        ConfigError: ``data.dir`` missing, or ``budget=`` too small for even one member.
        ArtifactError: no export, an export file missing or modified, a member that does not match
            the blend's record.
        DataError: a missing or malformed test file or sample submission, ids that do not match the
            test files, a test image that does not decode (unless ``submit.default_row=true``).
    """
    from pipeline.device import select_device, use_device

    settings = ws.settings  # no competition is loaded: only its test side is read
    sub = settings.submit
    output = Path(sub.output)
    _clear(output)
    base = settings.paths
    ens = export.read(Path(settings.export.dir), base)
    prep, saved = ens.prep, ens.saved
    _check_environment(ens.record)
    data_dir = data.resolve_test_dir(settings.data.dir, base.cache_dir)
    runtime = settings.runtime
    _check_runtime(ens.record, runtime)
    with tempfile.TemporaryDirectory(prefix="kfold-submit-") as work:
        test = _test_side(ens, data_dir, settings, sub.default_row, Path(work))
        device = select_device(runtime.device)
        use_device(device)
        plan = None
        kept = list(saved.members)
        if settings.budget is not None:
            plan = plan_members(ens, test.x_test, device, runtime, settings.budget, settings.started)
            kept = list(plan.kept)
        t0 = time.perf_counter()
        per_member = predict.member_probabilities(saved, ens.paths, test.x_test, device, runtime, kept, SUBMIT_FILES)
        seconds = time.perf_counter() - t0
    blender, oof_score = _blender(ens, plan, kept)
    probs = blender.predict_proba(np.stack([per_member[m] for m in kept], 1))  # float64, as stage=blend wrote them
    weights = saved.decision_weights()  # balanced accuracy / macro-F1: the labels' per-class weights
    if weights is not None and test.submission is SubmissionKind.label:
        probs = probs * weights
    text = data.submission_text(probs, test.test_ids, list(prep.class_names), test.submission, list(test.columns),
                                prep.layout is Layout.pixels, str(output), test.default_cells)
    save_text(output, text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    same = sha == ens.record.get("training_submission_sha256")
    log.info("submit: wrote %s (%d rows; %d network(s) predicted in %.1f s on %s%s)%s", output, len(test.test_ids),
             sum(len(predict.networks(saved, ens.paths, m)) for m in kept), seconds, device,
             f"; {len(test.undecodable)} default row(s)" if test.undecodable else "",
             "; identical to the training run's submission.csv" if same else "")
    return SubmitOutcome(output, sha, tuple(kept), oof_score, len(test.undecodable), plan, same)


def _check_runtime(record: dict, runtime) -> None:
    """Log the runtime settings that differ from the export's run (the probabilities may differ
    in the last bits)."""
    differ = [f"runtime.{k}={getattr(runtime, k)} (the export's run: {v})"
              for k, v in (record.get("runtime") or {}).items() if getattr(runtime, k, v) != v]
    if differ:
        log.warning("submit: %s: the probabilities may differ from the training run's in the last bits",
                    "; ".join(differ))


def _test_side(ens: export.ExportedEnsemble, data_dir, settings: RunSettings, default_row: bool, work: Path):
    """The competition's test side in the training run's preprocessing
    (:func:`pipeline.data.load_test_side`), decoded under ``work``; logs what was read, and the
    test images that did not decode (``submit.default_row=true``)."""
    prep, saved = ens.prep, ens.saved
    test = data.load_test_side(data_dir, prep.layout, prep.img_size, prep.channels, prep.resize,
                               list(prep.class_names), prep.submission, settings.data.decode_jobs,
                               work, default_row)
    log.info("submit: %s: %d test rows (%s layout, %dx%dx%d), %s submission; export %s: %s, blend '%s'",
             data_dir, len(test.test_ids), prep.layout.value, prep.img_size, prep.img_size, prep.channels,
             test.submission.value, ens.folder, "+".join(saved.members), saved.best.value)
    if test.undecodable:
        log.warning("submit: %d test image(s) did not decode; their rows are sample_submission.csv's "
                    "(submit.default_row=true): %s", len(test.undecodable),
                    ", ".join(str(test.files[i]) for i in test.undecodable[:5]) +
                    (", ..." if len(test.undecodable) > 5 else ""))
    return test


def _blender(ens: export.ExportedEnsemble, plan: SubmitPlan | None, kept: list[str]):
    """The blender to apply and its OOF score: the submitted one when every member is kept, else
    the submitted method refitted on ``kept`` (:func:`refit`, one log line of what was given up)."""
    saved, metric = ens.saved, ens.prep.metric
    full = Score(**{k: ens.record["oof_score"].get(k) for k in SCORE_FIELDS})
    if plan is not None and plan.dropped:
        blender, oof_score = refit(ens, kept)
        values = store.marginal_values(saved.typed, metric)
        log.warning("submit: the whole ensemble would not fit budget=%s: left out %s (least marginal value first); "
                    "'%s' refitted on the OOF predictions of %s: OOF %s %.5f, %.5f with every member: %s given up",
                    format_minutes(plan.budget),
                    ", ".join(f"{m} (marginal value {values.get(m, 0.0):+.5f})" for m in plan.dropped),
                    saved.best.value, "+".join(kept), metric.value, oof_score.value(metric), full.value(metric),
                    f"{abs(full.value(metric) - oof_score.value(metric)):.5f}")
        return blender, oof_score
    blender = saved.blender()
    if plan is not None:
        log.info("submit: every member fits budget=%s (about %s of %s)", format_minutes(plan.budget),
                 format_minutes(sum(c.seconds for c in plan.costs)), format_minutes(max(0.0, plan.available)))
    return blender, full
