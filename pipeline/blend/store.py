"""The saved blend: the one reader and writer of ``artifacts/blend/``.

Layout: ``blend.json`` (the record: members, k, folds digest, data fingerprint, image shape, each
member fold's manifest sha256, every method's score, parameters and member weights, the
submitted method and the sha256 of ``submission.csv``), ``<method>_oof.npy`` ``(N, C)`` and
``<method>_test.npy`` ``(M, C)`` float32 probabilities, and ``<method>_state.npz`` (the fitted
blender's arrays, read with ``allow_pickle=False``). The folder is written whole beside the old
one and swapped in, so files of an earlier blend never linger and a failure leaves the old blend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.blend.blenders import BLENDERS
from pipeline.errors import ArtifactError
from pipeline.io import atomic_folder, save_json, save_npy, save_npz
from pipeline.paths import Paths
from pipeline.settings import BlendMethod, Metric

RECORD = "blend.json"


@dataclass(frozen=True)
class ManifestEntry:
    """One member fold a blend was built from: its seed index, fold and ``manifest.json`` sha256."""

    seed_index: int
    fold: int
    sha256: str


@dataclass(frozen=True)
class BlendRecord:
    """The typed part of ``blend.json`` that ``stage=predict`` and the report rely on, checked
    against itself when read (:meth:`parse`). ``raw`` is the whole record (scores and weights)."""

    members: tuple[str, ...]
    best: BlendMethod
    methods: dict[BlendMethod, dict]
    manifests: dict[str, tuple[ManifestEntry, ...]]
    num_classes: int
    in_chans: int
    img_size: int
    data_fingerprint: str
    folds_digest: str
    raw: dict

    @classmethod
    def parse(cls, data: object, path: Path) -> "BlendRecord":
        """The record of ``blend.json`` at ``path``.

        Raises:
            ArtifactError: one line naming ``path`` and what is wrong: not an object, a missing or
                mistyped key, a member listed without its manifests (or a manifest of a member not
                listed), an unknown method, or a submitted method without its entry.
        """
        def bad(what: str) -> ArtifactError:
            return ArtifactError(f"{path}: {what}; run: python run.py stage=blend")

        if not isinstance(data, dict):
            raise bad("expected a JSON object")
        kinds = {"members": list, "best": str, "methods": dict, "manifests": dict, "num_classes": int,
                 "in_chans": int, "img_size": int, "data_fingerprint": str, "folds_digest": str}
        for key, kind in kinds.items():
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                raise bad(f"'{key}' is {'missing' if key not in data else 'not a ' + kind.__name__}")
        members = tuple(map(str, data["members"]))
        if not members or set(members) != set(data["manifests"]):
            extra = sorted(set(data["manifests"]) - set(members))
            lost = sorted(set(members) - set(data["manifests"]))
            raise bad(f"members {list(members)} and manifests {sorted(data['manifests'])} disagree"
                      f"{' (no manifests for ' + ', '.join(lost) + ')' if lost else ''}"
                      f"{' (manifests of unlisted ' + ', '.join(extra) + ')' if extra else ''}")
        try:
            methods = {BlendMethod(m): info for m, info in data["methods"].items()}
            best = BlendMethod(data["best"])
            manifests = {n: tuple(ManifestEntry(int(e["seed"]), int(e["fold"]), str(e["sha256"])) for e in entries)
                         for n, entries in data["manifests"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"unreadable entry ({type(e).__name__}: {e})") from None
        if best not in methods or not isinstance(methods[best], dict) or "params" not in methods[best]:
            raise bad(f"the submitted method '{best.value}' has no entry with its params under 'methods'")
        if any(not entries for entries in manifests.values()):
            raise bad("a member lists no member folds under 'manifests'")
        return cls(members, best, methods, manifests, data["num_classes"], data["in_chans"], data["img_size"],
                   data["data_fingerprint"], data["folds_digest"], data)


@dataclass
class SavedBlend:
    """A saved blend: its checked ``blend.json`` (:class:`BlendRecord`) and its folder."""

    typed: BlendRecord
    folder: Path

    @property
    def record(self) -> dict:
        """The whole ``blend.json`` (already checked as :attr:`typed`)."""
        return self.typed.raw

    @property
    def members(self) -> list[str]:
        return list(self.typed.members)

    @property
    def best(self) -> BlendMethod:
        return self.typed.best

    def blender(self, method: BlendMethod | None = None):
        """The fitted blender of ``method`` (default: the submitted one), rebuilt from plain arrays.
        Raises ArtifactError when its state is missing or does not fit."""
        method = method or self.best
        if method not in self.typed.methods:
            raise ArtifactError(f"{self.folder / RECORD}: no method '{method.value}'; run: python run.py stage=blend")
        info = self.typed.methods[method]
        path = self.folder / f"{method.value}_state.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable blender state ({e}); run: python run.py stage=blend") from None
        try:
            return BLENDERS[method].from_state(info["params"], arrays, self.typed.num_classes)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: does not fit {RECORD}'s '{method.value}' ({type(e).__name__}: {e}); "
                                f"run: python run.py stage=blend") from None

    def unfitted(self, method: BlendMethod | None = None):
        """An unfitted blender of ``method`` (default: the submitted one) with the settings it was
        fitted with (its recorded ``params``): what refitting it on other members' OOF needs."""
        method = method or self.best
        return BLENDERS[method](**self.typed.methods[method]["params"])

    def decision_weights(self) -> np.ndarray | None:
        """``(C,)`` float64 per-class weights of the submission's labels (``argmax(probs * w)``,
        fitted on the OOF predictions for balanced accuracy or macro-F1, ``stage=blend``), or None:
        the most probable class. Raises ArtifactError when they do not fit the classes."""
        d = self.record.get("decision")
        if d is None:
            return None
        w = np.asarray(d.get("weights") if isinstance(d, dict) else None, dtype=np.float64)
        if w.shape != (self.typed.num_classes,) or not np.all(np.isfinite(w)) or (w <= 0).any():
            raise ArtifactError(f"{self.folder / RECORD}: 'decision' weights do not fit {self.typed.num_classes} "
                                f"classes; run: python run.py stage=blend")
        return w

    def probabilities(self, method: BlendMethod, split: str) -> np.ndarray:
        """``(N, C)`` OOF (``split="oof"``) or ``(M, C)`` test probabilities of ``method``."""
        return np.load(self.folder / f"{method.value}_{split}.npy", allow_pickle=False)


def marginal_values(record: BlendRecord, metric: Metric | str = Metric.accuracy) -> dict[str, float]:
    """Each member's marginal value in the submitted blend: its OOF ``metric`` minus that of the
    same method fitted and cross-validated without the member (``leave_one_out`` in
    ``blend.json``, :func:`pipeline.blend.stage.leave_one_out`), signed so that positive means the
    member helps (for ``log_loss``, lower is better: without minus with). Empty for a blend of a
    single member or a record without leave-one-out scores. What the report shows and what
    ``stage=submit`` leaves out first under a budget."""
    metric = Metric(metric)
    best = record.methods[record.best]
    out = {}
    for name, loo in (record.raw.get("leave_one_out") or {}).items():
        if loo.get(metric.value) is None or best.get(metric.value) is None:
            continue
        diff = float(best[metric.value]) - float(loo[metric.value])
        out[name] = -diff if metric is Metric.log_loss else diff
    return out


def save(paths: Paths, record: dict, outputs: dict[BlendMethod, tuple[np.ndarray, np.ndarray, dict]]) -> SavedBlend:
    """Write the blend folder: ``outputs[method] = (oof (N, C), test (M, C), state arrays)``, then
    ``record`` last; swap it in place of the old folder. Returns the saved blend."""
    final = paths.blend_dir
    with atomic_folder(final) as tmp:
        for method, (oof, test, state) in outputs.items():
            save_npy(tmp / f"{method.value}_oof.npy", oof.astype(np.float32))
            save_npy(tmp / f"{method.value}_test.npy", test.astype(np.float32))
            save_npz(tmp / f"{method.value}_state.npz", **state)
        typed = BlendRecord.parse(record, final / RECORD)  # never write a record that would not read
        save_json(tmp / RECORD, record)
    return SavedBlend(typed, final)


def load(paths: Paths) -> SavedBlend:
    """The last saved blend; ArtifactError when there is none or its record is unreadable."""
    path = paths.blend_dir / RECORD
    if not path.exists():
        raise ArtifactError(f"{path}: no blend yet (run: python run.py stage=blend)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            f"run: python run.py stage=blend") from None
    return SavedBlend(BlendRecord.parse(data, path), paths.blend_dir)


def check_matches(saved: SavedBlend, fingerprint: str, folds_digest: str) -> None:
    """ArtifactError when the blend was made for other data or folds than the current ones."""
    r = saved.typed
    if r.data_fingerprint != fingerprint or r.folds_digest != folds_digest:
        raise ArtifactError(f"{saved.folder / RECORD}: made for other data or folds "
                            f"(run: python run.py stage=blend)")
