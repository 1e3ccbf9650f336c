"""Stage ``report``: an offline HTML page of what happened, from the cached artifacts only.

    python run.py stage=report         # -> artifacts/report/index.html (+ the PNGs beside it)

Reads the saved blend (:mod:`pipeline.blend.store`), its members' ``metrics.json`` and OOF
probabilities through :mod:`pipeline.members` (checked exactly as ``stage=blend`` checks
them); trains nothing. The page
embeds its images (base64), so it opens offline and can be mailed as one file; the same images
are written as PNGs beside it. It shows:

* the CV table: model x fold accuracy, log loss, epochs, minutes, device; each blend's OOF
  accuracy and log loss, and which one became ``submission.csv``;
* with ``screen.enabled``, the recipe screening (:mod:`pipeline.screen`) that chose the side, the
  architectures, the augmentation and the balance of the classes: one row per trial, why each choice,
  the chosen recipe, its time share and subsample; next to it the budget's plan (``budget=``), or
  the seeds and epochs the chosen models trained with;
* learning curves per model: train / validation loss and accuracy per epoch, mean and spread
  (min..max) over its members (folds x seeds);
* the confusion matrix of the submitted blend's OOF predictions (counts);
* the most confident OOF mistakes, titled (predicted, true, probability);
* the correlation between the models' OOF errors (ensemble diversity) and the blend weights /
  meta-learner coefficients;
* the predicted class distribution on the test set next to the train label distribution, and
  random test images with their predicted labels;
* each pseudo-label round's test rows added per fold and its OOF gain over its base model.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.adversarial import (SHIFT_AUC, AdversarialResult, adversarial_features,  # noqa: E402
                                  adversarial_validation)
from pipeline.blend import store  # noqa: E402
from pipeline.budget import format_minutes  # noqa: E402
from pipeline.io import save_text, write_with  # noqa: E402
from pipeline.recipe import Screening, TrialRecord, TrialState  # noqa: E402
from pipeline.settings import BlendMethod  # noqa: E402
from pipeline.members import BlendMember, read_metrics  # noqa: E402
from pipeline.workspace import Workspace, screening_for  # noqa: E402

log = logging.getLogger(__name__)


def fold_table(ws: Workspace, names: list[str]) -> list[dict]:
    """One row per member (blend member labels: a model, or ``model@seed``) from its
    ``metrics.json``: fold, seed, accuracy, log loss, epochs, minutes, device, TTA/EMA/SWA gains."""
    rows = []
    for name in names:
        e = BlendMember.parse(name)
        for key in ws.keys(e.model, seed_index=e.seed_index):
            m = read_metrics(ws.member_dir(key))
            rows.append({"model": name, "fold": key.fold, "seed": key.seed_index, "accuracy": m.accuracy,
                         "log_loss": m.log_loss, "epochs": m.epochs, "minutes": m.seconds / 60, "device": m.device,
                         "tta": m.tta if (m.tta or {}).get("views", 1) > 1 else None,
                         "ema": m.ema, "swa": m.swa, "n_pseudo": m.n_pseudo, "history": m.history,
                         "memory": _memory(m)})
    return rows


def _memory(m) -> str:
    """A member's peak memory for the table: the process's resident set, and the GPU's, in MiB."""
    parts = [f"{m.peak_rss_mb:,.0f}" if m.peak_rss_mb is not None else "",
             f"GPU {m.peak_gpu_memory_mb:,.0f}" if m.peak_gpu_memory_mb is not None else ""]
    return " / ".join(p for p in parts if p)


def _pseudo_rows(ws: Workspace, names: list[str], rows: list[dict], record: dict) -> list[list]:
    """One row per pseudo-label round among the blend's members: rows added, OOF vs its base."""
    from pipeline.metrics import score

    out = []
    for name in names:
        base = ws.settings.models[BlendMember.parse(name).model].base
        if base is None:
            continue
        added = np.mean([r["n_pseudo"] for r in rows if r["model"] == name])
        acc = record["model_scores"][name]["accuracy"]
        base_acc = score(ws.comp.y_train, ws.predictions(base).oof).accuracy
        out.append([name, base, f"{added:,.0f}", f"{acc:.5f}", f"{base_acc:.5f}", f"{acc - base_acc:+.5f}"])
    return out


def _save(fig, path: Path) -> Path:
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_curves(name: str, rows: list[dict], path: Path) -> Path:
    """Train / validation loss and accuracy per epoch for one model: mean line, min..max band
    over its members (folds x seeds)."""
    own = [r for r in rows if r["model"] == name and r["history"]]
    hist = [r["history"] for r in own]
    folds, seeds = len({r["fold"] for r in own}), len({r["seed"] for r in own})
    what = f"{len(hist)} members" + (f": {folds} folds x {seeds} seeds" if seeds > 1 else "")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    if hist:
        n = min(len(h) for h in hist)
        epochs = np.arange(1, n + 1)
        for ax, key in zip(axes, ("loss", "acc")):
            for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
                # validation only after the validated epochs (runtime.val_every): NaN elsewhere
                v = np.array([[h[e].get(f"{split}_{key}", np.nan) for e in range(n)] for h in hist])
                at = ~np.isnan(v).any(0)
                ax.plot(epochs[at], v[:, at].mean(0), color=color, marker="o", ms=3,
                        label=f"{'validation' if split == 'val' else 'train'} (mean of {what})")
                ax.fill_between(epochs[at], v[:, at].min(0), v[:, at].max(0), color=color, alpha=0.2)
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss" if key == "loss" else "accuracy")
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{name}: learning curves (band: min..max over its members)")
    return _save(fig, path)


def plot_confusion(y: np.ndarray, pred: np.ndarray, names: list[str], title: str, path: Path) -> Path:
    """Heatmap of the confusion matrix (rows: true, columns: predicted) with the counts."""
    num_classes = len(names)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    off = cm.copy()
    np.fill_diagonal(off, 0)
    im = ax.imshow(off, cmap="Reds")
    for i in range(num_classes):
        for j in range(num_classes):
            color = "tab:green" if i == j else "white" if off[i, j] > off.max() / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color,
                    fontweight="bold" if i == j else None)
    ax.set_xticks(range(num_classes), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right")
    ax.set_yticks(range(num_classes), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.suptitle(title)  # over the whole figure: an axes title runs under the colorbar
    fig.colorbar(im, ax=ax, label="errors (off-diagonal counts)")
    return _save(fig, path)


def plot_image_grid(images: np.ndarray, titles: list[str], title: str, path: Path,
                    cols: int = 8) -> Path:
    """``(n, C, S, S)`` uint8 images (C = 1 or 3) in a grid, one title each."""
    n = max(len(images), 1)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.25, rows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles):
        if img.shape[0] == 3:
            ax.imshow(img.transpose(1, 2, 0))
        else:
            ax.imshow(img[0], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(t, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_diversity(names: list[str], oofs: np.ndarray, y: np.ndarray, record: dict, path: Path) -> Path:
    """Correlation of the models' OOF error indicators, and each blend's member weights (the
    stack's: mean absolute meta-learner coefficient per member, normalised)."""
    errors = (oofs.argmax(2) != y[None]).astype(np.float64)  # (models, N)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(errors) if len(names) > 1 else np.ones((1, 1))
    corr = np.nan_to_num(np.atleast_2d(corr), nan=0.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.2]})
    im = axes[0].imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
    for i in range(len(names)):
        for j in range(len(names)):
            axes[0].text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=9)
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_title("OOF error correlation\n(lower = more diverse)")
    fig.colorbar(im, ax=axes[0])
    bars = {f"{method}: member weight": info["member_weights"]
            for method, info in record["methods"].items() if method != BlendMethod.mean.value}
    x = np.arange(len(names))
    width = 0.8 / max(len(bars), 1)
    for i, (label, vals) in enumerate(bars.items()):
        axes[1].bar(x + i * width, vals, width, label=label)
    axes[1].set_xticks(x + width * (len(bars) - 1) / 2, names)
    axes[1].set_title("blend weights and meta-learner coefficients")
    if bars:
        axes[1].legend(fontsize=8)
    return _save(fig, path)


def plot_distribution(y: np.ndarray, test_pred: np.ndarray, names: list[str], path: Path) -> Path:
    """Share of each class: train labels next to the submitted predictions on the test set."""
    num_classes = len(names)
    fig, ax = plt.subplots(figsize=(max(8, num_classes * 0.4), 3.2))
    x = np.arange(num_classes)
    ax.bar(x - 0.2, np.bincount(y, minlength=num_classes) / len(y), 0.4, label=f"train labels (n={len(y)})")
    ax.bar(x + 0.2, np.bincount(test_pred, minlength=num_classes) / len(test_pred), 0.4,
           label=f"test predictions (n={len(test_pred)})")
    ax.set_xticks(x, names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right")
    ax.set_xlabel("class")
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    ax.set_title("class distribution")
    return _save(fig, path)


# --------------------------------------------------------------------------- page

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}tr.best td{font-weight:bold;
background:#eef8ee}img{max-width:100%;border:1px solid #eee;margin:0.3em 0}h2{margin-top:1.6em}"""


def _img(png: Path, alt: str) -> str:
    data64 = base64.b64encode(png.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data64}" alt="{html.escape(alt)}" title="{png.name}">'


def _table(header: list[str], rows: list[list], best_rows: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="{"l" if i == 0 else ""}">{html.escape(str(c))}</td>'
                        for i, c in enumerate(row))
        body.append(f'<tr class="{"best" if r in best_rows else ""}">{cells}</tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figures(ws: Workspace, saved: store.SavedBlend, names: list[str], rows: list[dict], seed: int) -> dict[str, Path]:
    """The report's PNGs: learning curves per model, the submitted blend's OOF confusion matrix and
    most confident mistakes, the members' diversity, the test class distribution and a seeded
    sample of test images with their submitted labels."""
    comp, out, best = ws.comp, ws.paths.report_dir, saved.best.value
    y, cn = comp.y_train, comp.class_names
    oof_best, test_best = saved.probabilities(saved.best, "oof"), saved.probabilities(saved.best, "test")
    pngs = {f"curves_{name}": plot_curves(name, rows, out / f"curves_{name}.png") for name in names}
    pred = oof_best.argmax(1)
    pngs["confusion"] = plot_confusion(y, pred, cn, f"OOF confusion matrix: blend '{best}' "
                                       f"(accuracy {(pred == y).mean():.5f})", out / "confusion.png")
    wrong = np.flatnonzero(pred != y)
    top = wrong[np.argsort(-oof_best[wrong, pred[wrong]])][:32]
    pngs["mistakes"] = plot_image_grid(
        comp.x_train[top], [f"pred {cn[pred[i]]} true {cn[y[i]]}\np={oof_best[i, pred[i]]:.3f}" for i in top],
        f"the {len(top)} most confident OOF mistakes of blend '{best}' (of {len(wrong)})", out / "mistakes.png")
    oofs = np.stack([ws.predictions(n).oof for n in names])
    pngs["diversity"] = plot_diversity(names, oofs, y, saved.record, out / "diversity.png")
    test_pred = test_best.argmax(1)
    pngs["distribution"] = plot_distribution(y, test_pred, cn, out / "distribution.png")
    sample = np.sort(np.random.default_rng(seed).choice(len(test_pred), size=min(32, len(test_pred)), replace=False))
    pngs["test_samples"] = plot_image_grid(
        comp.x_test[sample], [f"id {comp.test_ids[i]}: {cn[test_pred[i]]}" for i in sample],
        "random test images with the submitted label", out / "test_samples.png")
    return pngs


def _score_rows(saved: store.SavedBlend, rows: list[dict], auc: bool) -> tuple[list[list], int]:
    """The CV table: one row per model (its OOF scores and train minutes), one per blend method
    (scores, member weights); and the index of the submitted blend's row."""
    blend, names, best = saved.record, saved.members, saved.best.value

    def scores(s: dict) -> list[str]:
        return [f"{s['accuracy']:.5f}", f"{s['log_loss']:.4f}"] + ([f"{s['roc_auc']:.5f}"] if auc else [])

    model_rows = [[f"model {n}", *scores(blend["model_scores"][n]),
                   f"{sum(r['minutes'] for r in rows if r['model'] == n):.1f}", ""] for n in names]
    blend_rows = [[f"blend {m}" + (" -> submission.csv" if m == best else ""), *scores(info), "",
                   "member weights " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, info["member_weights"]))]
                  for m, info in blend["methods"].items()]
    return model_rows + blend_rows, len(model_rows) + list(blend["methods"]).index(best)


def _value_rows(saved: store.SavedBlend, rows: list[dict]) -> list[list]:
    """What each member adds: marginal value (leave-one-out), TTA gain, EMA / SWA gain, ensemble
    selection weight."""
    blend, names = saved.record, saved.members
    marginal = store.marginal_values(saved.typed, "accuracy")  # the one computation, shared with stage=submit
    es = dict(zip(names, blend["methods"].get("ensemble_selection", {}).get("member_weights", [])))

    def without_tta(r: dict) -> float:  # the member's own weights, no test-time views
        return r["tta"]["accuracy_without"] if r.get("tta") else r["accuracy"]

    def gain(members_: list[dict], part: str) -> str:
        """Mean fold gain: TTA = with - without views; EMA/SWA = averaged - raw weights (no TTA)."""
        pairs = [(r["accuracy"] if part == "tta" else without_tta(r), r[part]["accuracy_without"])
                 for r in members_ if r.get(part)]
        return f"{np.mean([a - b for a, b in pairs]):+.5f}" if pairs else "off"

    out = []
    for name in names:
        own = [r for r in rows if r["model"] == name]
        out.append([name, f"{marginal[name]:+.5f}" if name in marginal else "", gain(own, "tta"),
                    gain(own, "swa") if any(r.get("swa") for r in own) else gain(own, "ema"),
                    f"{es[name]:.3f}" if es else ""])
    return out


def run(ws: Workspace) -> Path:
    """Stage ``report``: write ``artifacts/report/index.html`` and its PNGs; return the page.

    Raises:
        ArtifactError: no blend yet, the blend was made for other data or folds, or a member
            is missing, stale or corrupt (the same checks as ``stage=blend``); an unreadable
            screening or budget record.
    """
    budget = ws.apply_budget_record()
    screening = screening_for(ws.settings) if ws.settings.screen.enabled else None
    saved = store.load(ws.paths)
    store.check_matches(saved, ws.comp.fingerprint, ws.folds_digest)
    rows = fold_table(ws, saved.members)
    pngs = _figures(ws, saved, saved.members, rows, ws.settings.base_seed)
    shift = _shift(ws, saved.members, ws.settings.base_seed)
    _log_shift(ws, saved, shift)
    page = save_text(ws.paths.report_dir / "index.html", _page(ws, saved, rows, pngs, budget, screening, shift))
    if screening is not None:
        every, rest = selection_scores(ws, saved)
        log.info("report: fold 0 chose the recipe; the blend's OOF %s is %.5f on all folds, %.5f on folds 1-%d alone",
                 ws.settings.data.metric.value, every, rest, ws.settings.folds.k - 1)
    log.info("report: %s (%d figures; blend '%s' OOF acc %.5f)", page, len(pngs), saved.best.value,
             saved.record["methods"][saved.best.value]["accuracy"])
    return page


def _shift(ws: Workspace, models: list[str], seed: int) -> AdversarialResult:
    """Adversarial validation (:mod:`pipeline.adversarial`) on the pooled pretrained features that
    the first linear probe among the blend's ``models`` has cached (their first test-time view,
    the images as they are), else on the pixels."""
    from pipeline.members import MemberKey
    from pipeline.settings import FitMethod
    from pipeline.train.probe import stored_features
    from pipeline.train.probes import member_spec

    for m in models:
        if ws.settings.models[m].train.fit is FitMethod.linear_probe:
            features = stored_features(member_spec(ws, MemberKey(m, 0)), ws.comp)
            if features is not None:
                return adversarial_features(features[0][0], features[1][0],
                                            f"{m}'s {features[0].shape[-1]} pretrained features", seed)
    return adversarial_validation(ws.comp.x_train, ws.comp.x_test, seed)


def _budget_rows(record, rows: list[dict]) -> list[list]:
    """The budget's plan against what happened: per model, planned seeds x epochs and minutes,
    complete seeds, the members trained and their minutes (their own seconds summed)."""
    out = []
    for m in record.plan.models:
        mine = [r for r in rows if r["model"] == m.model]
        planned = f"{m.seeds} x {m.epochs}" if m.seeds else "left out"  # did not join (pipeline.budget)
        out.append([m.model, planned, f"{m.seconds / 60:.1f}", record.complete.get(m.model, 0),
                    len(mine), f"{sum(r['minutes'] for r in mine):.1f}"])
    return out


def _budget_part(record, rows: list[dict]) -> list[str]:
    """The report's budget section (none without ``budget=``)."""
    if record is None:
        return []
    spent = (f"training took {record.train_seconds / 60:.1f} min" if record.train_seconds is not None
             else "training did not finish")
    return ['<a id="budget"></a><h2>Budget</h2>',
            f"<p><code>budget</code> = {record.plan.budget / 60:.1f} min from the command's start: "
            f"{record.plan.available / 60:.1f} min were left for training when it was planned, "
            f"{record.plan.reserve / 60:.1f} min reserved for prediction, blend and report; {spent}. "
            f"Stopped at the deadline: {html.escape(', '.join(record.stopped) or 'none')}; never started: "
            f"{html.escape(', '.join(record.dropped) or 'none')}.</p>",
            _table(["model", "planned seeds x epochs", "planned minutes (member time)", "complete seeds",
                    "members in the blend", "their minutes (each member's own)"], _budget_rows(record, rows))]


def _chosen(t: TrialRecord, screening: Screening) -> bool:
    """Whether trial ``t`` is (one of) what its dimension chose: a complete trial whose value of
    that dimension is the recipe's."""
    r, c = screening.recipe, t.candidate
    if t.state is not TrialState.complete:
        return False
    return {"side": r.side == c.side, "arch": c.model in r.models, "aug": r.aug is not None and r.aug == c.aug,
            "balance": r.balance is not None and r.balance == c.balance}[t.dim.value]


def _screening_rows(screening: Screening) -> tuple[list[list], set[int]]:
    """The screening table, one row per trial in the order run: dimension, model, side,
    augmentation preset, balance, state, score, accuracy, epochs, seconds; and the rows
    of the chosen candidates."""
    out = []
    for t in screening.trials:
        c = t.candidate
        out.append([t.dim.value, c.model, c.side, c.aug.value if c.aug else "configured",
                    c.balance.value, t.state.value,
                    "" if t.score is None else f"{t.score:.4f}", "" if t.accuracy is None else f"{t.accuracy:.4f}",
                    t.epochs, f"{t.seconds:.1f}"])
    return out, {i for i, t in enumerate(screening.trials) if _chosen(t, screening)}


def _trained_as(rows: list[dict], models: list[str]) -> str:
    """What the models trained with when no budget planned them: per model, its seeds x epochs,
    members and their minutes (from their ``metrics.json``)."""
    out = []
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        if mine:
            epochs = sorted({r["epochs"] for r in mine})
            out.append(f"{m} {len({r['seed'] for r in mine})} seed(s) x {'/'.join(map(str, epochs))} epochs "
                       f"({len(mine)} members, {sum(r['minutes'] for r in mine):.1f} min)")
    return "; ".join(out) or "none"


def shift_scores(ws: Workspace, saved: store.SavedBlend, shift: AdversarialResult) -> tuple[float, float]:
    """The submitted blend's OOF score by ``data.metric`` on the training rows the adversarial
    classifier scored: as is, and weighted toward the test (importance weights ``p / (1 - p)``,
    :meth:`pipeline.adversarial.AdversarialResult.weights`)."""
    from pipeline.metrics import score

    metric, rows = ws.settings.data.metric, shift.rows
    y, oof = ws.comp.y_train[rows], saved.probabilities(saved.best, "oof")[rows]
    return score(y, oof).value(metric), score(y, oof, shift.weights()).value(metric)


def _log_shift(ws: Workspace, saved: store.SavedBlend, shift: AdversarialResult) -> None:
    plain, weighted = shift_scores(ws, saved, shift)
    line = (f"adversarial validation: train against test ROC AUC {shift.auc:.3f} ({shift.source}, {shift.n_train} / "
            f"{shift.n_test} images); the blend's OOF {ws.settings.data.metric.value} {plain:.5f}, weighted toward "
            f"the test {weighted:.5f} (an effective {shift.effective_rows():.0f} rows)")
    if shift.shifted:
        log.warning("report: %s: the test is distinguishable from train (AUC above %.1f), so the CV score likely "
                    "overstates the leaderboard; group folds (folds.group) may show it", line, SHIFT_AUC)
    else:
        log.info("report: %s: no shift seen", line)


def _shift_part(ws: Workspace, saved: store.SavedBlend, shift: AdversarialResult | None) -> list[str]:
    """The report's train / test shift section (adversarial validation)."""
    if shift is None:
        return []
    plain, weighted = shift_scores(ws, saved, shift)
    metric = html.escape(ws.settings.data.metric.value)
    verdict = (f"<b>The test is distinguishable from train</b> (AUC above {SHIFT_AUC}): the CV score likely "
               f"overstates the leaderboard. Keep what differs (patient, day, site) out of the validation folds "
               f"with <code>folds.group</code>, and trust the weighted score more than the plain one."
               if shift.shifted else "No shift seen: the CV score estimates the leaderboard.")
    return ['<h2 id="shift">Train / test shift (adversarial validation)</h2>',
            f"<p>A classifier of test against training images ({html.escape(shift.source)}, "
            f"{shift.n_train:,} training and {shift.n_test:,} test images, "
            f"cross-validated): ROC AUC <b>{shift.auc:.3f}</b> (0.5: indistinguishable). {verdict}</p>",
            f"<p>The submitted blend's OOF {metric} on those training rows: {plain:.5f}; weighted toward the test "
            f"(each row by the classifier's odds that it is a test image): <b>{weighted:.5f}</b>, resting on an "
            f"effective {shift.effective_rows():,.0f} rows (Kish). The training rows "
            f"that look most like the test (0-based rows of train.csv): "
            f"{', '.join(map(str, shift.most_test_like()))}.</p>"]


def _split(ws: Workspace) -> str:
    """How the folds were split: stratified, and grouped by ``folds.group`` when set."""
    group = ws.settings.folds.group
    return "stratified" if group is None else f"stratified, each group of {group} in one fold"


def selection_scores(ws: Workspace, saved: store.SavedBlend) -> tuple[float, float]:
    """The submitted blend's OOF score by the competition's metric (``data.metric``) on every fold
    and on the folds but fold 0 alone: the screening chose the recipe on fold 0's rows, which
    the first figure also counts; the second took no part in the choice."""
    from pipeline.metrics import score

    metric, y, oof = ws.settings.data.metric, ws.comp.y_train, saved.probabilities(saved.best, "oof")
    rest = ws.folds != 0
    return score(y, oof).value(metric), score(y[rest], oof[rest]).value(metric)


def _selection_part(ws: Workspace, saved: store.SavedBlend, screening: Screening | None) -> list[str]:
    """Beside the CV scores, with a screening: that fold 0 chose the recipe, and the submitted
    blend's OOF score without fold 0 (:func:`selection_scores`)."""
    if screening is None:
        return []
    every, rest = selection_scores(ws, saved)
    k, metric = ws.settings.folds.k, ws.settings.data.metric.value
    return [f"<p>Fold 0 chose the recipe (the <a href=\"#screening\">screening</a> trained and scored its "
            f"candidates on fold 0's rows), and its rows count in the CV scores above: the submitted blend's OOF "
            f"{html.escape(metric)} is <b>{every:.5f}</b> on all {k} folds and <b>{rest:.5f}</b> on folds 1-{k - 1} "
            f"alone, which took no part in the choice.</p>"]


def _screening_part(screening: Screening | None, metric: str, budget, rows: list[dict], names: list[str]) -> list[str]:
    """The report's recipe screening section (none without a screening for this run), followed
    by the budget section it leads to."""
    if screening is None:
        return []
    table, chosen_rows = _screening_rows(screening)
    fixed = ", ".join(d.value for d in screening.fixed) or "none"
    if budget is not None:
        plan = ('<p>The chosen recipe then had the rest of the budget: its plan (models, seeds, epochs, '
                'minutes) is in <a href="#budget">Budget</a> below.</p>')
    else:
        plan = (f"<p>No <code>budget</code> for this run: the chosen models trained with their configured seeds and "
                f"epochs: {html.escape(_trained_as(rows, names))}.</p>")
    return ['<h2 id="screening">Recipe screening</h2>',
            f"<p>Before the k-fold training, candidates were trained on fold 0 only, on a stratified subsample "
            f"of {screening.rows:,} training and {screening.val_rows:,} validation rows, with a short schedule, "
            f"one dimension after another (<code>pipeline/screen.py</code>). Score: the objective of "
            f"<b>{html.escape(metric)}</b> on the validation subsample (blank: the trial did not complete); "
            f"the chosen candidates are in bold. The screening took {html.escape(format_minutes(screening.seconds))} "
            f"of a {html.escape(format_minutes(screening.share_seconds))} share; fixed by hand (not screened): "
            f"{html.escape(fixed)}.</p>",
            _table(["dimension", "model", "side (px)", "augmentation", "balance", "state", "score",
                    "accuracy", "epochs", "seconds"], table, chosen_rows),
            "<p>Why:</p><ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in screening.reasons) + "</ul>"
            if screening.reasons else "<p>Why: nothing was screened (every dimension fixed).</p>",
            f"<p>Chosen recipe: <b>{html.escape(screening.recipe.describe())}</b>.</p>",
            plan]


def _page(ws: Workspace, saved: store.SavedBlend, rows: list[dict], pngs: dict[str, Path], budget=None,
          screening: Screening | None = None, shift: AdversarialResult | None = None) -> str:
    """The report's HTML: the CV table, the train / test shift (adversarial validation), the recipe
    screening (with ``screen.enabled``), the budget's plan against what happened (under
    ``budget=``), what each member adds, pseudo-label rounds, per-member scores and the figures."""
    comp, blend, names, best = ws.comp, saved.record, saved.members, saved.best.value
    auc = blend["model_scores"][names[0]].get("roc_auc") is not None
    summary, best_row = _score_rows(saved, rows, auc)
    fold_rows = [[r["model"], r["fold"], r["seed"], f"{r['accuracy']:.5f}", f"{r['log_loss']:.4f}", r["epochs"],
                  f"{r['minutes']:.2f}", r["device"], r["memory"]] for r in rows]
    pseudo_rows = _pseudo_rows(ws, names, rows, blend)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kfold-stack report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>kfold-stack report</h1>",
        f"<p>Data fingerprint <code>{html.escape(comp.fingerprint)}</code>, {len(comp.y_train)} train / "
        f"{len(comp.x_test)} test images ({comp.side}x{comp.side}x{comp.channels}), {comp.num_classes} classes, "
        f"{int(blend['k'])} folds ({html.escape(_split(ws))}); metric "
        f"<b>{html.escape(blend.get('metric', 'accuracy'))}</b> picks the "
        f"submission. Every number is out-of-fold (OOF): no test label is used anywhere.</p>",
        "<h2>CV scores</h2>",
        _table(["", "OOF accuracy", "OOF log loss", *(["OOF ROC AUC"] if auc else []), "train minutes",
                "blend"], summary, {best_row}),
        *_selection_part(ws, saved, screening),
        *_shift_part(ws, saved, shift),
        *_screening_part(screening, ws.settings.data.metric.value, budget, rows, names),
        *_budget_part(budget, rows),
        "<h2>What each member adds</h2>",
        f"<p>Marginal value: the submitted blend's OOF accuracy minus that of the same blend "
        f"({html.escape(best)}) fitted and cross-validated without the member. TTA: the members' "
        f"mean fold OOF accuracy with minus without the test-time views; EMA / SWA: with the averaged "
        f"minus the raw weights (both without TTA). Ensemble selection: its weight.</p>",
        _table(["model", "marginal value", "TTA gain", "EMA / SWA gain", "ensemble selection weight"],
               _value_rows(saved, rows)),
        *(["<h2>Pseudo-labels</h2>",
            "<p>Each pseudo-label round (<code>pseudo.models</code>): the test rows added to each fold's "
            "training rows (mean over its folds), its OOF accuracy, and the gain over its base model "
            "(the same settings without pseudo rows).</p>",
            _table(["round", "base", "test rows added per fold", "OOF accuracy", "base OOF accuracy",
                    "gain"], pseudo_rows)] if pseudo_rows else []),
        "<h2>Per member</h2>",
        _table(["model", "fold", "seed", "accuracy", "log loss", "epochs", "minutes", "device",
                "peak memory (MiB: process / GPU)"], fold_rows),
        "<h2>Learning curves</h2>",
        *[_img(pngs[f"curves_{n}"], f"learning curves of {n}") for n in names],
        "<h2>Confusion matrix (submitted blend, OOF)</h2>", _img(pngs["confusion"], "confusion matrix"),
        "<h2>Most confident mistakes (OOF)</h2>", _img(pngs["mistakes"], "most confident mistakes"),
        "<h2>Ensemble diversity and blend weights</h2>", _img(pngs["diversity"], "diversity"),
        "<h2>Test predictions</h2>", _img(pngs["distribution"], "class distribution"),
        _img(pngs["test_samples"], "random test images"),
        # for headless checks: how many images decoded once the page has loaded
        "<script>window.addEventListener('load',function(){var i=[].slice.call(document.images);"
        "document.body.setAttribute('data-images-loaded',i.filter(function(x){return x.complete&&"
        "x.naturalWidth>0}).length+'/'+i.length);});</script>",
        "</body></html>",
    ]
    return "\n".join(parts)
