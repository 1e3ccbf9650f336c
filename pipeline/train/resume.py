"""End-of-epoch resume state of an unfinished member, saved and loaded without pickle.

``resume.pt`` holds only tensors and plain Python data (dicts, lists, numbers, strings), written
with ``torch.save`` and read with ``torch.load(weights_only=True)``, so a checkpoint from a
teammate or a downloaded artifact folder cannot run code when it is loaded. RNG states are kept
as tensors and lists, not as numpy objects.

Its content is a :class:`ResumeState`. A member trained alone and a member of a fused group
(:mod:`pipeline.train.fused`, which writes each member's slice of the group to the member's own
``resume.pt``) write the same format, so either continues from the other's.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.io import write_with
from pipeline.train.averaging import AverageKind

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


@dataclass
class ResumeState:
    """One member's (or, with fused tensors, a fused group's) end-of-epoch training state: what
    ``resume.pt`` holds (:meth:`as_dict`), tensors on the CPU or the training device.

    Attributes:
        cache_key: the member's ``config.yaml`` text; a state resumes only a member of that key.
        epoch: the last epoch completed (1-based).
        model: the network's ``state_dict``.
        optimizer: AdamW's ``state_dict`` (``state``: per parameter index ``step`` (0-dim float32)
            and the moments ``exp_avg`` / ``exp_avg_sq``, shaped like the parameter;
            ``param_groups``).
        scheduler: the one-cycle schedule's ``state_dict`` (plain data).
        history: the epoch records (:func:`pipeline.train.engine.epoch_record`); a fused group's
            holds one list per member.
        seconds: training wall time so far (s); a fused member's is its share of the group's.
        rng: :func:`rng_state` after the epoch (a fused member's: its group's generators).
        average: the EMA's / SWA's ``state_dict`` (``module.<key>`` tensors, SWA's ``n_averaged``),
            stored under ``average_kind``'s value (``"ema"`` / ``"swa"``); None without one.
        grad_scaler: fp16's ``GradScaler.state_dict()`` (plain data), or None.
    """

    cache_key: str
    epoch: int
    model: dict
    optimizer: dict
    scheduler: dict
    history: list
    seconds: float
    rng: dict
    average: dict | None = None
    average_kind: AverageKind | None = None
    grad_scaler: dict | None = None

    def as_dict(self) -> dict:
        """The plain dict ``resume.pt`` holds (the keys every earlier version wrote)."""
        state = {"cache_key": self.cache_key, "epoch": self.epoch, "model": self.model,
                 "optimizer": self.optimizer, "scheduler": self.scheduler, "history": self.history,
                 "seconds": self.seconds, "rng": self.rng}
        if self.average is not None and self.average_kind is not None:
            state[self.average_kind.value] = self.average
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler
        return state

    @classmethod
    def from_dict(cls, state: dict) -> "ResumeState":
        """Read what :meth:`as_dict` wrote. Raises KeyError / TypeError / ValueError for a dict
        that is not a resume state."""
        kind = next((k for k in AverageKind if k.value in state), None)
        return cls(str(state["cache_key"]), int(state["epoch"]), dict(state["model"]), dict(state["optimizer"]),
                   dict(state["scheduler"]), list(state["history"]), float(state["seconds"]), dict(state["rng"]),
                   dict(state[kind.value]) if kind is not None else None, kind,
                   dict(state["grad_scaler"]) if "grad_scaler" in state else None)

    def save(self, path: Path) -> None:
        """Atomically write it to ``path`` (:func:`save_resume`)."""
        save_resume(path, self.as_dict())


def resume_cache_keys(path: Path) -> list[str] | None:
    """The cache key (YAML) a member's ``resume.pt`` was written for, whether the member trained
    alone or in a fused group, as a one-element list; None when the file is unreadable or not a
    resume state (loaded with ``weights_only=True``, never unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - truncated / corrupt / pickled objects: the training reports it
        return None
    key = state.get("cache_key") if isinstance(state, dict) else None
    return [key] if isinstance(key, str) else None


def read_state(path: Path, cache_key_yaml: str, what: str) -> ResumeState | None:
    """The :class:`ResumeState` at ``path`` if it is readable, a resume state and written for
    this cache key, else ``None`` (and a log line naming ``what`` saying why; never raises for a
    bad file)."""
    raw = load_resume(path, cache_key_yaml, what)
    if raw is None:
        return None
    try:
        return ResumeState.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("train: %s: ignoring %s, which is not a resume state (%s); starting over", what, path,
                    type(e).__name__)
        return None


def load_resume(path: Path, cache_key_yaml: str, what: str) -> dict | None:
    """The resume state at ``path`` (the dict :meth:`ResumeState.as_dict` wrote) if it is readable
    and was written for this cache key, else ``None`` (and a log line saying why). Loaded with
    ``weights_only=True``: a file holding anything but tensors and plain data is refused, never
    executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / pickled objects: start over, say why
        log.warning("train: %s: ignoring unreadable %s (%s); starting over", what, path, type(e).__name__)
        return None
    if not isinstance(state, dict) or state.get("cache_key") != cache_key_yaml:
        log.warning("train: %s: %s was written for other settings; starting over", what, path)
        return None
    return state
