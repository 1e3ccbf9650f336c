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
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.blend.blenders import BLENDERS
from pipeline.errors import ArtifactError
from pipeline.io import save_json, save_npy, save_npz
from pipeline.paths import Paths
from pipeline.settings import BlendMethod

RECORD = "blend.json"


@dataclass
class SavedBlend:
    """A saved blend: its ``record`` (``blend.json``) and its folder."""

    record: dict
    folder: Path

    @property
    def members(self) -> list[str]:
        return list(self.record["members"])

    @property
    def best(self) -> BlendMethod:
        return BlendMethod(self.record["best"])

    def blender(self, method: BlendMethod | None = None):
        """The fitted blender of ``method`` (default: the submitted one), rebuilt from plain arrays."""
        method = method or self.best
        info = self.record["methods"][method.value]
        path = self.folder / f"{method.value}_state.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable blender state ({e}); run: python run.py stage=blend") from None
        return BLENDERS[method].from_state(info["params"], arrays, int(self.record["num_classes"]))

    def probabilities(self, method: BlendMethod, split: str) -> np.ndarray:
        """``(N, C)`` OOF (``split="oof"``) or ``(M, C)`` test probabilities of ``method``."""
        return np.load(self.folder / f"{method.value}_{split}.npy", allow_pickle=False)


def save(paths: Paths, record: dict, outputs: dict[BlendMethod, tuple[np.ndarray, np.ndarray, dict]]) -> SavedBlend:
    """Write the blend folder: ``outputs[method] = (oof (N, C), test (M, C), state arrays)``, then
    ``record`` last; swap it in place of the old folder. Returns the saved blend."""
    final = paths.blend_dir
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        for method, (oof, test, state) in outputs.items():
            save_npy(tmp / f"{method.value}_oof.npy", oof.astype(np.float32))
            save_npy(tmp / f"{method.value}_test.npy", test.astype(np.float32))
            save_npz(tmp / f"{method.value}_state.npz", **state)
        save_json(tmp / RECORD, record)
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SavedBlend(record, final)


def load(paths: Paths) -> SavedBlend:
    """The last saved blend; ArtifactError when there is none or its record is unreadable."""
    path = paths.blend_dir / RECORD
    if not path.exists():
        raise ArtifactError(f"{path}: no blend yet (run: python run.py stage=blend)")
    try:
        return SavedBlend(json.loads(path.read_text()), paths.blend_dir)
    except ValueError as e:
        raise ArtifactError(f"{path}: unreadable ({e}); run: python run.py stage=blend") from None


def check_matches(saved: SavedBlend, fingerprint: str, folds_digest: str) -> None:
    """ArtifactError when the blend was made for other data or folds than the current ones."""
    r = saved.record
    if r["data_fingerprint"] != fingerprint or r["folds_digest"] != folds_digest:
        raise ArtifactError(f"{saved.folder / RECORD}: made for other data or folds "
                            f"(run: python run.py stage=blend)")
