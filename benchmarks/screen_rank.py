"""Does the screening rank candidates as a full run would? (issue 31: "check that on the digits")

The same candidates trained twice on fold 0 of a competition (default: the offline digits), in
one run, one after another:

(a) **short**: the screening as the profile runs it (``screen.rows`` training and
    ``screen.val_rows`` validation rows of fold 0, ``screen.epochs`` one-cycle epochs with at
    least ``screen.min_steps`` steps), with pruning off so that every candidate gets a score;
(b) **full**: every training row of the other folds, scored on all of fold 0, for ``--epochs``
    (default 8: the quick profile's ``train.epochs``, where its plan stops raising epochs), with
    the model's learning rate and one-cycle schedule and its batch (at most the rows / 24, as
    every screening trial: 256 on the digits, the profile's own): what a k-fold member trains.

The candidates are those :mod:`pipeline.screen` screens: the input sides (when the layout has
more than one), every architecture of ``screen.models`` with the baseline preset (the first of
``screen.augs``) at the smallest side, and every preset of ``screen.augs`` on the first model.
Printed per dimension: each candidate's accuracy and seconds in both passes, the two rankings,
Kendall's tau between them, and the noise of each pass (one standard error of a difference of two
accuracies on its validation rows, :func:`pipeline.screen.noise`), so that a swap between two
candidates closer than the noise reads as what it is. The hardware is printed with the figures. Measured figures: docs/results.md.

    python benchmarks/screen_rank.py                                  # digits, profile=quick
    python benchmarks/screen_rank.py --data data/fashion --epochs 4 --out /tmp/rank_fashion
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scipy.stats import kendalltau  # noqa: E402

from train_throughput import hardware  # noqa: E402  (benchmarks/ is the script's own folder)

CONF_DIR = REPO / "pipeline" / "conf"
HUGE = 10 ** 9  # rows: every row of fold 0's training folds / of fold 0


def workspace(args, *overrides: str):
    """The prepared workspace of ``--profile`` on ``--data`` (outputs under ``--out``), with no
    budget (the passes set their own deadline, which never comes)."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import prepare
    from pipeline.workspace import Workspace

    ov = [f"profile={args.profile}", f"paths.root={args.out}", "runtime.progress=false", "budget=null",
          "screen.enabled=false",  # no recorded recipe applied: the candidates are trained as listed
          *([f"data.dir={args.data}"] if args.data else []), *args.override, *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=ov)
    return Workspace.load(*prepare(cfg))


def candidates(ws) -> list[tuple]:
    """``[(dim, Candidate), ...]``, as :func:`pipeline.screen.screen` builds them but with nothing
    chosen in between: the sides on the first model with the baseline preset (the first of
    ``screen.augs``), the architectures at the smallest side with that preset, the presets on the
    first model at that side."""
    from pipeline.choices import Dim
    from pipeline.recipe import Candidate
    from pipeline.screen import candidate_sides

    s = ws.settings.screen
    models = [str(m) for m in s.models]
    sides = candidate_sides(ws.comp.x_train.shape[-1], ws.comp.layout, list(s.sides))
    augs = list(ws.settings.screen_augs)
    out = [(Dim.side, Candidate(models[0], side, augs[0])) for side in sides] if len(sides) > 1 else []
    side = sides[-1]  # the smallest: the side's baseline
    out += [(Dim.arch, Candidate(m, side, augs[0])) for m in models]
    out += [(Dim.aug, Candidate(models[0], side, preset)) for preset in augs]
    return out


def run_pass(ws, todo: list[tuple], name: str) -> tuple[dict, int]:
    """Train every candidate of ``todo`` on ``ws``'s screening subsample, pruning off; returns
    ``{(dim, candidate): TrialRecord}`` and the validation rows."""
    from pipeline.screen import Screen

    sc = Screen(ws, time.time() + HUGE)
    rows = {}
    for dim, c in todo:
        r = sc.run_trial(dim, c, None)  # a candidate in two dimensions trains once
        sc.trials.append(r)
        rows[dim, c] = r
        acc = "" if r.accuracy is None else f"{r.accuracy:.4f}"
        print(f"{name:5s} {dim.value:7s} {c.label():44s} {r.state.value:9s} {acc} "
              f"({r.epochs} epochs, {r.seconds:.1f} s)", flush=True)
    return rows, len(sc.val_rows)


def compare(short: dict, full: dict, n_short: int, n_full: int, metric) -> None:
    """Per dimension: both passes' accuracies and ranks (by the screening's score: the metric,
    log loss breaking ties), Kendall's tau between the scores, each pass's noise."""
    from pipeline.screen import noise

    for dim in dict.fromkeys(d for d, _ in short):
        keys = [k for k in short if k[0] == dim]
        a = [short[k].score if short[k].score is not None else -math.inf for k in keys]
        b = [full[k].score if full[k].score is not None else -math.inf for k in keys]
        rank_a = {k: i + 1 for i, k in enumerate(sorted(keys, key=lambda k: -a[keys.index(k)]))}
        rank_b = {k: i + 1 for i, k in enumerate(sorted(keys, key=lambda k: -b[keys.index(k)]))}
        na = noise([short[k] for k in keys], n_short, metric)
        nb = noise([full[k] for k in keys], n_full, metric)
        print(f"\n{dim.value}: short pass noise {na:.4f} ({n_short} rows), full pass noise {nb:.4f} ({n_full} rows)")
        print(f"  {'candidate':44s} {'short':>7s} {'rank':>4s} {'s':>6s}   {'full':>7s} {'rank':>4s} {'s':>7s}")
        for k in keys:
            print(f"  {k[1].label():44s} {short[k].accuracy or 0:7.4f} {rank_a[k]:4d} {short[k].seconds:6.1f}   "
                  f"{full[k].accuracy or 0:7.4f} {rank_b[k]:4d} {full[k].seconds:7.1f}")
        if len(keys) > 1:
            tau = kendalltau(a, b).statistic
            best_a, best_b = keys[a.index(max(a))][1].label(), keys[b.index(max(b))][1].label()
            print(f"  Kendall's tau between the rankings: {tau:.2f}; the full pass's best: {best_b}; "
                  f"the short pass's best: {best_a}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a competition folder (default: the offline digits)")
    p.add_argument("--profile", default="quick")
    p.add_argument("--epochs", type=int, default=8, help="the full pass's epochs (default 8)")
    p.add_argument("--out", default="/tmp/screen_rank", help="paths.root of both passes")
    p.add_argument("--override", nargs="*", default=[], help="more config overrides (key=value)")
    args = p.parse_args(argv)
    from pipeline.device import select_device

    short_ws = workspace(args)  # builds the offline default and the folds when missing
    print(hardware(select_device(short_ws.settings.runtime.device)),
          f"\nprofile={args.profile}, data: {args.data or 'the offline digits'}, "
          f"{len(short_ws.comp.x_train)} training images", flush=True)
    todo = candidates(short_ws)
    t0 = time.time()
    short, n_short = run_pass(short_ws, todo, "short")
    t1 = time.time()
    full_ws = workspace(args, f"screen.rows={HUGE}", f"screen.val_rows={HUGE}", f"screen.epochs={args.epochs}",
                        "screen.min_steps=1")
    full, n_full = run_pass(full_ws, todo, "full")
    print(f"\nshort pass {(t1 - t0) / 60:.1f} min, full pass {(time.time() - t1) / 60:.1f} min")
    compare(short, full, n_short, n_full, short_ws.settings.data.metric)


if __name__ == "__main__":
    main()
