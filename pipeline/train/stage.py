"""Stage ``train``: every selected (model, fold) member, cached members skipped.

    python run.py stage=train fold=all                 # every ensemble model, every fold
    python run.py stage=train model=cnn_deotte fold=2  # one member
    python run.py stage=train force=true               # retrain even when cached

Pseudo-label rounds (``pseudo.models``, :mod:`pipeline.pseudo`) train after the first-round
members, whose test predictions label their extra rows.
"""

from __future__ import annotations

from pipeline import pseudo
from pipeline.train.scheduler import MemberOutcome, schedule
from pipeline.workspace import Workspace


def run(ws: Workspace) -> list[MemberOutcome]:
    """Train the members of ``model`` (or the ensemble) x its seeds x ``fold`` (or all folds),
    first-round members first, then pseudo-label rounds.

    With ``budget=`` the seeds and epochs are planned to fit it (:mod:`pipeline.train.budgeted`).

    Returns one :class:`~pipeline.train.scheduler.MemberOutcome` per member (trained, retrained
    and why, cached, skipped because another process holds its lock, or under a budget dropped
    or stopped at the deadline). Raises ConfigError /
    PipelineError for bad settings or a diverged training (see
    :func:`pipeline.train.scheduler.schedule`).
    """
    if ws.settings.budget is not None:
        from pipeline.train.budgeted import run as run_budgeted

        return run_budgeted(ws)
    chosen = ws.settings.selection
    keys = [k for name in chosen.models for k in ws.keys(name, list(chosen.folds))]
    first = [k for k in keys if ws.settings.models[k.model].base is None]
    rounds = [k for k in keys if k not in first]  # their pseudo-labels need the first round cached
    done = {o.key: o for o in schedule(ws, first, later=rounds)} if first else {}
    if rounds:
        pseudo.prepare_rounds(ws, rounds)  # artifacts/pseudo/<round>/fold<k>.npz, in the rounds' keys
        done.update({o.key: o for o in schedule(ws, rounds)})
    return [done[k] for k in keys]
