"""End-of-epoch resume state of an unfinished member, saved and loaded without pickle.

``resume.pt`` holds only tensors and plain Python data (dicts, lists, numbers, strings), written
with ``torch.save`` and read with ``torch.load(weights_only=True)``, so a checkpoint from a
teammate or a downloaded artifact folder cannot run code when it is loaded. RNG states are kept
as tensors and lists, not as numpy objects.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.io import write_with

log = logging.getLogger(__name__)


def rng_state(device: torch.device) -> dict:
    """python, numpy and torch CPU RNG states and, for a member training on CUDA, the RNG state
    of its own GPU only (no other GPU is touched, and none on a CPU member), as tensors and lists.
    ``device`` records where it was taken: ``"cuda"`` or ``"cpu"``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "internal": list(internal), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state(), "device": device.type}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device, what: str = "member") -> None:
    """Restore what :func:`rng_state` saved; the CUDA state goes to ``device`` (the member's own
    GPU, whatever index it had when saved). A state saved on the other kind of device (a GPU
    checkpoint resumed on the CPU, or the reverse) restores the CPU-side generators and says in
    one log line that the draws (dropout masks) continue from other generators; nothing raises."""
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    saved_on = state.get("device", "cuda" if "cuda" in state else "cpu")
    cuda = state.get("cuda")
    if device.type == "cuda" and isinstance(cuda, torch.Tensor) and saved_on == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    elif saved_on != device.type:
        log.info("train: %s: resuming on %s from a checkpoint written on %s; its random draws "
                 "(dropout) continue from other generators than an uninterrupted run's", what,
                 device.type, saved_on)


def save_resume(path: Path, state: dict) -> None:
    """Atomically write ``state`` (tensors and plain data only) to ``path``."""
    write_with(path, lambda p: torch.save(state, p))


GROUP_SEPARATOR = "\n---\n"  # a fused group's checkpoint key: its members' cache keys joined by this


def resume_cache_keys(path: Path) -> list[str] | None:
    """The cache keys (YAML) a resume state was written for: one for a member's, one per member
    for a fused group's (:mod:`pipeline.train.fused`); None when the file is unreadable or not a
    resume state (loaded with ``weights_only=True``, never unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - truncated / corrupt / pickled objects: the training reports it
        return None
    key = state.get("cache_key") if isinstance(state, dict) else None
    return key.split(GROUP_SEPARATOR) if isinstance(key, str) else None


def load_resume(path: Path, cache_key_yaml: str, what: str) -> dict | None:
    """The resume state at ``path`` if it is readable and was written for this cache key, else
    ``None`` (and a log line saying why). Loaded with ``weights_only=True``: a file holding
    anything but tensors and plain data is refused, never executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / pickled objects: start over, say why
        log.warning("train: %s: ignoring unreadable %s (%s); starting over", what, path, type(e).__name__)
        return None
    if not isinstance(state, dict) or state.get("cache_key") != cache_key_yaml:
        log.warning("train: %s: %s was written for other settings; starting over", what, path)
        return None
    return state
