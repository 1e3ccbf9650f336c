"""Steps 1 and 2, what the machine is and whether the GPU tests pass on it.

1. ``environment``: GPU name, compute capability, memory, torch / CUDA / cuDNN versions, the
   precision ``train.precision=auto`` resolves to, and which optional packages are importable;
2. ``pytest_gpu``: ``pytest -m gpu tests/test_cuda.py`` (on the CPU every test there skips: the
   step then proves that the file collects with the bare GPU machine's packages only).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .common import REPO


def step_environment(args, work: Path) -> dict:
    import importlib.metadata as md

    import torch

    from pipeline.device import resolve_precision, select_device

    device = select_device(args.device)
    out = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "cpu_cores": os.cpu_count(), "cpu": _cpu_model(),
           "precision_auto": resolve_precision("auto", device).value}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                "capability": f"{props.major}.{props.minor}", "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count, "nvidia_smi": shutil.which("nvidia-smi") is not None}
    versions = {}
    for pkg in ("timm", "numpy", "pandas", "scikit-learn", "joblib", "safetensors", "hydra-core", "omegaconf"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    out["packages"] = versions
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def step_pytest_gpu(args, work: Path) -> dict:
    """``pytest -m gpu tests/test_cuda.py`` in a child process: its summary line. On the CPU
    without hypothesis's plugin (0.9 s of pytest's start on 2 cores; the bare GPU machine does
    not have it, and test_cuda.py does not use it). Raises RuntimeError when pytest fails, or on
    CUDA when no test ran."""
    cpu = args.device == "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           *(["-p", "no:hypothesispytest"] if cpu else []), str(REPO / "tests" / "test_cuda.py")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest exited {proc.returncode}: {tail}")
    if "passed" not in tail and not cpu:
        raise RuntimeError(f"no GPU test ran: {tail}")
    return {"summary": tail}
