"""Ensemble members: the key of one (model, fold[, seed]), its cache key, its files.

A *member* is one model trained on every fold but one. This module is the only reader and writer
of a member's files under ``artifacts/<model>/fold<k>/`` (:data:`pipeline.paths.MEMBER_FILES`):

* ``model.safetensors`` - the final weights; architecture, kwargs, classes, channels and side in
  its metadata (safetensors: tensors only, nothing is unpickled when it is read);
* ``oof.npz``           - ``row_ids (n_val,) int64`` and ``probs (n_val, C) float32``;
* ``test.npy``          - ``(M, C) float32`` test probabilities;
* ``metrics.json``      - fold accuracy, log loss, epochs, seconds, device, per-epoch history;
* ``config.yaml``       - the member's cache key (:func:`member_config`);
* ``manifest.json``     - sha256 and size of the five above; written last, it marks the member
  complete.

Arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from pipeline.errors import ArtifactError
from pipeline.io import save_json, save_npy, save_npz, save_text, sha256_file, write_with
from pipeline.models import architecture_digest
from pipeline.paths import CHECKPOINT, CONFIG, DATA_FILES, MEMBER_FILES, MANIFEST, METRICS, OOF, TEST
from pipeline.runsettings import RunSettings
from pipeline.settings import FitMethod, Metric, Precision

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn


@dataclass(frozen=True, order=True)
class MemberKey:
    """One ensemble member: ``model`` trained without fold ``fold``; ``seed`` is the seed index
    (0 = the run's base seed; further indices are extra seeds of the same model and fold)."""

    model: str
    fold: int
    seed_index: int = 0

    def __str__(self) -> str:
        return f"{self.model} fold {self.fold}" + (f" seed {self.seed_index}" if self.seed_index else "")


class MemberStatus(Enum):
    """What :func:`verify` found in a member's directory."""

    OK = "ok"            # complete, intact, trained with the current settings
    MISSING = "missing"  # files absent: never trained, or interrupted
    CORRUPT = "corrupt"  # unreadable manifest, a size or checksum mismatch, an unreadable config
    STALE = "stale"      # trained with other settings


@dataclass(frozen=True)
class Verification:
    """:func:`verify`'s answer: a status and a one-line reason (the changed keys when stale)."""

    status: MemberStatus
    reason: str

    @property
    def ok(self) -> bool:
        return self.status is MemberStatus.OK


@dataclass(frozen=True)
class BlendMember:
    """What a blend combines: the members of ``model`` of one seed index, or (``seed_index=None``) of
    all its seeds averaged. Its label is ``model`` or ``model@seed``."""

    model: str
    seed_index: int | None = None

    @property
    def label(self) -> str:
        return self.model if self.seed_index is None else f"{self.model}@{self.seed_index}"

    @classmethod
    def parse(cls, label: str) -> "BlendMember":
        model, _, seed = label.partition("@")
        return cls(model, int(seed) if seed else None)


@dataclass
class MemberPredictions:
    """A blend member's cached predictions over its folds (and seeds).

    Attributes:
        name: the :class:`BlendMember` label.
        oof: ``(N, C)`` float32 OOF probabilities in train-row order (each seed's row from exactly
            one fold; seeds averaged).
        test: ``(M, C)`` float32 test probabilities averaged over folds, then seeds.
        manifests: ``[{seed, fold, sha256 of its manifest.json}]``: what a saved blend was built from.
    """

    name: str
    oof: np.ndarray
    test: np.ndarray
    manifests: list[dict]


def training_seed(base: int, key: MemberKey) -> int:
    """The seed a member trains with, a stable hash of ``(base seed, model, fold, seed index)``:
    every (model, fold) draws its own batch order, initialisation and augmentation."""
    digest = hashlib.sha256(f"{base}/{key.model}/{key.fold}/{key.seed_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def member_config(settings: RunSettings, key: MemberKey, fingerprint: str, folds_digest: str,
                  precision: Precision, pseudo: dict | None = None) -> dict:
    """The settings that determine one member's results: its cache key, saved as ``config.yaml``.

    The model's settings (:meth:`pipeline.runsettings.ModelSettings.learned`, from ``settings``)
    with ``train.precision`` as resolved for the training
    device (``precision``: bf16, fp16 or fp32, never ``auto``, so one key means one numerics), the
    architecture's digest (so an edited model makes its members stale), the fold and seed index,
    the folds (k, seed, digest of the assignment), the data fingerprint, the training seed
    (:func:`training_seed`), for a linear probe the metric that picks its regularisation
    (``data.metric``) and, for a pseudo-label round, its pseudo rows
    (:meth:`pipeline.workspace.Workspace.member_config`).
    """
    ms = settings.models[key.model].learned()
    ms["train"]["precision"] = Precision(precision).value
    extra = {"pseudo": pseudo} if pseudo is not None else {}
    if FitMethod(ms["train"]["fit"]) is FitMethod.linear_probe:
        extra["probe_metric"] = Metric(settings.data.metric).value
    return {**extra,
        "model": key.model, "arch": ms["arch"], "arch_digest": architecture_digest(ms["arch"]),
        "kwargs": ms["kwargs"], "train": ms["train"], "aug": ms["aug"], "tta": ms["tta"], "fold": key.fold,
        "seed_index": key.seed_index,
        "folds": {"k": settings.folds.k, "seed": settings.folds.seed, "digest": folds_digest},
        "data_fingerprint": fingerprint, "seed": training_seed(settings.base_seed, key),
    }


def key_text(cache_key: dict) -> str:
    """A member's cache key as the YAML text of its ``config.yaml`` (keys in order): what a resume
    checkpoint must match (:mod:`pipeline.train.resume`)."""
    return yaml.safe_dump(cache_key, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------- integrity


def verify(out_dir: Path, expected: dict) -> Verification:
    """Check one member's files against its manifest and the expected cache key."""
    missing = [n for n in MEMBER_FILES if not (out_dir / n).exists()]
    if missing:
        return Verification(MemberStatus.MISSING, f"missing {', '.join(missing)}")
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return Verification(MemberStatus.CORRUPT, f"{MANIFEST} is unreadable")
    for n in DATA_FILES:
        entry = manifest.get(n) if isinstance(manifest, dict) else None
        if not entry:
            return Verification(MemberStatus.CORRUPT, f"{MANIFEST} does not list {n}")
        if (out_dir / n).stat().st_size != entry.get("bytes") or sha256_file(out_dir / n) != entry.get("sha256"):
            return Verification(MemberStatus.CORRUPT, f"{n} does not match its checksum (truncated or modified)")
    try:
        old = read_config(out_dir)
    except (OSError, ValueError, yaml.YAMLError):  # a yaml that no longer parses despite its checksum
        return Verification(MemberStatus.CORRUPT, f"{CONFIG} is unreadable")
    if old != expected:
        changed = sorted(k for k in set(old) | set(expected) if old.get(k) != expected.get(k))
        return Verification(MemberStatus.STALE, f"config changed ({', '.join(changed)})")
    return Verification(MemberStatus.OK, "cached")


def manifest_sha256(out_dir: Path) -> str:
    """sha256 of a member's ``manifest.json``: one value that changes whenever any file does."""
    return sha256_file(out_dir / MANIFEST)


# --------------------------------------------------------------------------- writing


def checkpoint_metadata(arch: str, kwargs: dict, num_classes: int, in_chans: int, img_size: int) -> dict:
    """How to rebuild a member's model, as safetensors metadata (strings only)."""
    return {"arch": arch, "kwargs": json.dumps(kwargs, sort_keys=True), "num_classes": str(num_classes),
            "in_chans": str(in_chans), "img_size": str(img_size)}


def write_member(out_dir: Path, cache_key: dict, model: "nn.Module", meta: dict,
                 row_ids: np.ndarray, oof: np.ndarray, test: np.ndarray, metrics: dict) -> Verification:
    """Write a finished member: checkpoint, OOF, test, metrics, cache key, then the manifest.

    Args:
        meta: :func:`checkpoint_metadata`; row_ids: ``(n_val,)`` int64; oof: ``(n_val, C)`` and
            test ``(M, C)`` float32 probabilities.
    Each file is written atomically; the member counts as complete only once ``manifest.json``
    (written last) exists. Returns the member's (OK) verification.
    """
    from safetensors.torch import save_file

    (out_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is back
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_with(out_dir / CHECKPOINT, lambda p: save_file(tensors, str(p), metadata=meta))
    save_npz(out_dir / OOF, row_ids=row_ids.astype(np.int64), probs=oof.astype(np.float32))
    save_npy(out_dir / TEST, test.astype(np.float32))
    save_json(out_dir / METRICS, metrics)
    save_text(out_dir / CONFIG, key_text(cache_key))
    files = {n: {"sha256": sha256_file(out_dir / n), "bytes": (out_dir / n).stat().st_size}
             for n in DATA_FILES}
    save_json(out_dir / MANIFEST, {"files": files})
    return Verification(MemberStatus.OK, "cached")


# --------------------------------------------------------------------------- reading


def read_oof(out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(row_ids (n_val,) int64, probs (n_val, C) float32)``; ArtifactError when unreadable."""
    try:
        with np.load(out_dir / OOF, allow_pickle=False) as z:
            return z["row_ids"], z["probs"]
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{out_dir / OOF}: unreadable ({e})") from None


def read_test(out_dir: Path) -> np.ndarray:
    """``(M, C) float32`` test probabilities; ArtifactError when unreadable."""
    try:
        return np.load(out_dir / TEST, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{out_dir / TEST}: unreadable ({e})") from None


def read_config(out_dir: Path) -> dict:
    """The member's cache key (``config.yaml``): how it was trained. Raises OSError for a missing
    file, ValueError for one that is not a mapping, yaml.YAMLError for one that does not parse."""
    key = yaml.safe_load((out_dir / CONFIG).read_text())
    if not isinstance(key, dict):
        raise ValueError(f"{out_dir / CONFIG}: expected a mapping")
    return key


def check_recorded(out_dir: Path, manifest_sha: str, what: str, files: tuple[str, ...] = (CHECKPOINT,)) -> None:
    """Check that a member is the one a saved blend recorded: its ``manifest.json`` has the
    recorded sha256 and ``files`` (default: the checkpoint) still match the manifest.

    Args:
        files: names of :data:`pipeline.paths.DATA_FILES` to check (``stage=export`` checks all
            five, ``stage=submit`` the checkpoint and ``config.yaml``, which is all an export holds).
    Raises:
        ArtifactError: missing, retrained or modified since the blend (naming the member and file).
    """
    if not (out_dir / MANIFEST).exists():
        raise ArtifactError(f"{what}: missing {out_dir / MANIFEST} (run: python run.py stage=train, "
                            f"then stage=blend)")
    if manifest_sha256(out_dir) != manifest_sha:
        raise ArtifactError(f"{what}: {out_dir} changed since the blend (retrained?); run: python "
                            f"run.py stage=blend")
    listed = json.loads((out_dir / MANIFEST).read_text())["files"]
    for name in files:
        entry = listed.get(name) or {}
        path = out_dir / name
        if not path.exists():
            raise ArtifactError(f"{what}: missing {path}")
        if path.stat().st_size != entry.get("bytes", path.stat().st_size) or sha256_file(path) != entry.get("sha256"):
            raise ArtifactError(f"{what}: {path} does not match its checksum (truncated or modified)")


def check_shape(images: np.ndarray, in_chans: int, img_size: int) -> None:
    """ArtifactError unless ``images`` is ``(N, in_chans, img_size, img_size)``, the members' input."""
    if images.ndim != 4 or images.shape[1:] != (in_chans, img_size, img_size):
        raise ArtifactError(f"images of shape {tuple(images.shape[1:])}, but the members take "
                            f"{(in_chans, img_size, img_size)}")


@dataclass(frozen=True)
class MemberMetrics:
    """A member's ``metrics.json``, read in one place (:func:`read_metrics`) and checked.

    Attributes:
        accuracy, log_loss: its fold's OOF scores (with TTA when it has views).
        seconds: training time; device / precision: where and how it trained.
        history: one record per epoch (``train_loss``, ``train_acc``, ``lr``, ``seconds`` and,
            on validated epochs, ``val_loss`` / ``val_acc``).
        tta, ema, swa: ``{views | settings..., accuracy_without, log_loss_without}`` or None.
        peak_rss_mb / peak_gpu_memory_mb: the training process's peak memory (MiB), or None.
        raw: the whole file.
    """

    model: str
    fold: int
    seed_index: int
    accuracy: float
    log_loss: float
    epochs: int
    seconds: float
    device: str
    precision: str | None
    history: list
    tta: dict | None
    ema: dict | None
    swa: dict | None
    n_pseudo: int
    raw: dict
    peak_rss_mb: float | None = None
    peak_gpu_memory_mb: float | None = None


def read_metrics(out_dir: Path) -> MemberMetrics:
    """The member's ``metrics.json`` as a :class:`MemberMetrics`.

    Raises:
        ArtifactError: the file is missing, not JSON, or lacks a field (one line naming it).
    """
    path = out_dir / METRICS
    try:
        m = json.loads(path.read_text())
        return MemberMetrics(str(m["model"]), int(m["fold"]), int(m.get("seed_index", 0)), float(m["accuracy"]),
                             float(m["log_loss"]), int(m["epochs"]), float(m["seconds"]), str(m["device"]),
                             m.get("precision"), list(m.get("history") or []), m.get("tta"), m.get("ema"),
                             m.get("swa"), int(m.get("n_pseudo", 0)), m, m.get("peak_rss_mb"),
                             m.get("peak_gpu_memory_mb"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: unreadable member metrics ({type(e).__name__}: {e}); run: python run.py "
                            f"stage=train force=true") from None


def load_model(out_dir: Path) -> tuple["nn.Module", dict]:
    """Rebuild a member's model from ``model.safetensors`` (no pickle) on the CPU.

    Returns ``(model in eval mode, metadata)``: metadata has ``arch``, ``kwargs`` (dict),
    ``num_classes``, ``in_chans``, ``img_size`` (ints). Raises ArtifactError when the file is
    missing, not a safetensors file, or does not fit its architecture.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from pipeline.models import create_model

    path = out_dir / CHECKPOINT
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
        meta = {"arch": raw["arch"], "kwargs": json.loads(raw["kwargs"]),
                **{k: int(raw[k]) for k in ("num_classes", "in_chans", "img_size")}}
        model = create_model(meta["arch"], meta["num_classes"], meta["in_chans"], meta["img_size"],
                             load_weights=False, **meta["kwargs"])
        model.load_state_dict(state)
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: cannot load the checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return model.eval(), meta


def average_probs(probs: list[np.ndarray]) -> np.ndarray:
    """The mean of probability arrays of one shape, float32 (accumulated in float64, in list
    order): how folds' test probabilities, and seeds' probabilities, are averaged, in
    ``stage=blend`` and in ``stage=predict`` alike."""
    acc = np.zeros(probs[0].shape, dtype=np.float64)
    for p in probs:
        acc += p / len(probs)
    return acc.astype(np.float32)


def fold_then_seed_average(per_seed: dict[int, list[np.ndarray]]) -> np.ndarray:
    """A blend member's test probabilities: each seed's folds averaged, then the seeds
    (:func:`average_probs`, in order): how ``stage=blend`` and ``stage=predict`` both compute them.
    ``per_seed[s]`` holds seed ``s``'s ``(M, C)`` fold probabilities; returns ``(M, C)`` float32."""
    return average_probs([average_probs(folds) for folds in per_seed.values()])


def recorded_precision(out_dir: Path) -> str | None:
    """The precision a member's ``config.yaml`` records, or None when it cannot be read."""
    try:
        return str(read_config(out_dir)["train"]["precision"])
    except Exception:  # unreadable: the caller reports the member's own problem
        return None


def read_seed_predictions(dirs: list[tuple[MemberKey, Path]], folds: np.ndarray, n_test: int,
                          num_classes: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One seed's OOF and fold-averaged test probabilities from its (verified) members' files.

    Args:
        dirs: ``(key, member directory)`` of every fold of one model and seed.
        folds: ``(N,)`` int64 fold of each training row.
    Returns:
        ``(oof (N, C) float32, [test (n_test, C) float32 of each fold], [{seed, fold, sha256 of
        manifest.json}])``.
    Raises:
        ArtifactError: a member's rows are not exactly its fold's, a shape is wrong, or an OOF row
            is not predicted exactly once (the OOF contract).
    """
    n, c = len(folds), num_classes
    oof = np.full((n, c), np.nan, dtype=np.float32)
    hits = np.zeros(n, dtype=np.int64)
    tests, entries = [], []
    for key, d in dirs:
        rows, probs = read_oof(d)
        fold_rows = np.flatnonzero(folds == key.fold)
        if not np.array_equal(np.sort(rows), fold_rows) or probs.shape != (len(rows), c):
            raise ArtifactError(f"{key}: {d / OOF} does not hold exactly the fold's "
                                f"{len(fold_rows)} rows x {c} classes")
        oof[rows] = probs
        hits[rows] += 1
        t = read_test(d)
        if t.shape != (n_test, c):
            raise ArtifactError(f"{key}: {d / TEST} has shape {t.shape}, expected {(n_test, c)}")
        tests.append(t)
        entries.append({"seed": key.seed_index, "fold": key.fold, "sha256": manifest_sha256(d)})
    if not (hits == 1).all():
        key = dirs[0][0]
        raise ArtifactError(f"{key.model} seed {key.seed_index}: OOF rows predicted {hits.min()}..{hits.max()} "
                            f"times, expected exactly once")
    return oof, tests, entries
