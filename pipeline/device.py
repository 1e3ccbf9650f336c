"""The training device and its numerics: which device a process trains on, what
``train.precision`` means there, and the numerics settings of training and prediction.

Facts about the machine (CUDA devices, their compute capability, the CPU's bf16 support), read
here and nowhere else. Nothing here changes what is learned except the resolved precision, which
is part of each member's cache key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError
from pipeline.settings import Precision


def launcher_job() -> tuple[int | None, int]:
    """``(job number, parallel jobs)`` inside a Hydra multirun (``-m``), else ``(None, 1)``.

    Parallel jobs is the joblib launcher's ``n_jobs`` resolved against the CPU count (``-1`` =
    every core); other launchers (basic: sequential; submitit: one job per node) count as 1.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under @hydra.main (tests, benchmarks, notebooks)
        return None, 1
    if hc.mode != RunMode.MULTIRUN:
        return None, 1
    num = int(hc.job.num) if hc.job.get("num") is not None else None
    n_jobs = hc.launcher.get("n_jobs") if "joblib" in str(hc.launcher.get("_target_", "")) else 1
    n_jobs = int(n_jobs or 1)
    if n_jobs < 0:
        n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)  # joblib's convention: -1 = all cores
    return num, n_jobs


def select_device(name: str = "auto", slot: int | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    On a machine with several GPUs, ``auto`` and ``cuda`` (no index) spread parallel work over
    them: side-by-side job ``slot`` or, in a Hydra multirun, launcher job ``n`` uses GPU
    ``slot % device_count`` (``n % device_count``); ``cuda:N`` is kept as given. The caller makes
    it the current device with :func:`use_device` before any CUDA work.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for on a machine without it.
    """
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        dev = torch.device("cuda" if name == "auto" else name)
    except RuntimeError:
        raise ConfigError(f"runtime.device={name}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={name}, but CUDA is not available here (use auto or cpu)")
    if dev.type == "cuda" and dev.index is None:
        num = slot if slot is not None else launcher_job()[0]
        count = torch.cuda.device_count()
        if num is not None and count > 1:
            return torch.device(f"cuda:{num % count}")
    return dev


def use_device(device: torch.device) -> None:
    """Make ``device`` the process's current CUDA device (``torch.cuda.set_device``), so that
    everything allocated without an explicit index (cuDNN handles, timm's EMA, ``.cuda()``)
    lands on it. Call it before any CUDA work; nothing happens for the CPU or a bare ``cuda``."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag in
    ``/proc/cpuinfo``), where bf16 autocast is measured 1.5-2.6x faster than fp32 for the
    pipeline's CNNs (2-core AMD EPYC with AVX512-BF16: cnn_deotte 969 -> 2,059 images/s,
    cnn_keras 696 -> 1,830); elsewhere bf16 is emulated and slower. False when unknown."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(setting: Precision | str, device: torch.device) -> Precision:
    """What ``train.precision`` means on ``device``: ``bf16``, ``fp16`` or ``fp32`` itself, or
    for ``auto``:

    * CUDA compute capability >= 8.0 (A100, L4, H100, H200): ``bf16`` (native bf16 tensor cores);
    * capability 7.x (V100, T4: no bf16 units, fp16 tensor cores): ``fp16``, trained with a
      gradient scaler (``torch.amp.GradScaler``);
    * below 7.0 (P100: no tensor cores): ``fp32`` (fp16 on a P100 is unmeasured here);
    * CPU: ``bf16`` with native bf16 (:func:`cpu_has_native_bf16`), else ``fp32``.

    The resolved value goes into each member's cache key and ``metrics.json``.

    Raises:
        ConfigError: ``setting`` is not a :class:`~pipeline.settings.Precision` value.
    """
    try:
        p = Precision(setting)
    except ValueError:
        raise ConfigError(f"train.precision={setting}: expected one of "
                          f"{', '.join(x.value for x in Precision)}") from None
    if p is not Precision.auto:
        return p
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return Precision.bf16 if major >= 8 else Precision.fp16 if major >= 7 else Precision.fp32
    return Precision.bf16 if cpu_has_native_bf16() else Precision.fp32


AUTOCAST = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def autocast(device: torch.device, precision: Precision):
    """The autocast context of a resolved ``precision`` on ``device`` (disabled for fp32).
    Raises ValueError for ``auto``, which must be resolved first (:func:`resolve_precision`)."""
    if Precision(precision) is Precision.auto:
        raise ValueError("precision 'auto' reached autocast unresolved; call resolve_precision first")
    dtype = AUTOCAST.get(Precision(precision))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (its small gradients would underflow without one),
    else None. The scaler syncs with the host once per step (its inf check), fp16's only sync."""
    return torch.amp.GradScaler(device.type) if Precision(precision) is Precision.fp16 else None


def configure_numerics(device: torch.device, precision: Precision, deterministic: bool) -> None:
    """The numerics of one member's training and of every prediction of it (OOF, test and
    ``stage=predict`` alike), set on the process before its model runs:

    * ``deterministic``: ``torch.use_deterministic_algorithms`` (warn only) and cuDNN's fixed
      algorithms; else cuDNN benchmarks its algorithms per shape (``cudnn.benchmark``);
    * TF32 (A100 and newer) only for bf16/fp16 members; an fp32 member computes convolutions
      and matmuls in full fp32, as its precision says.

    On CUDA with ``cudnn.benchmark`` two processes may pick different algorithms for one shape,
    so ``stage=predict`` matches the blend's test probabilities within a tolerance, not bit for
    bit (README, GPU section); on the CPU they are identical.
    """
    if (torch.are_deterministic_algorithms_enabled() != deterministic
            or (deterministic and not torch.is_deterministic_algorithms_warn_only_enabled())):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)  # imports torch._inductor: only on a change
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    tf32 = Precision(precision) is not Precision.fp32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def device_name(device: torch.device) -> str:
    """``cuda[:N] (<GPU name>)`` or ``cpu (<cores> cores, <threads> threads)``, for metrics and logs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far, in MiB: ``peak_rss_mb`` (its peak resident set, the
    kernel's ``ru_maxrss``; a process that trained earlier members counts them too) and, on CUDA,
    ``peak_gpu_memory_mb`` (the allocator's peak on ``device`` since its last reset)."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device.type == "cuda":
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def device_kind(name: str = "auto") -> str:
    """The kind of device ``runtime.device`` resolves to here, for keying what was measured on
    it: ``cpu (<cores> cores)`` or ``cuda (<GPU name> x <count>)``. Raises ConfigError as
    :func:`select_device` does."""
    device = select_device(name, slot=0)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)} x {torch.cuda.device_count()})"
    return f"{device.type} ({os.cpu_count()} cores)"


# The share of a GPU's free memory that fused groups may plan for: the rest is headroom for the
# CUDA context, cuDNN workspaces, the allocator's fragmentation and a validation batch.
GROUP_MEMORY_SHARE = 0.7


def group_memory_limit(member_bytes: float, free_bytes: float, processes: int,
                       share: float = GROUP_MEMORY_SHARE) -> int:
    """The most members a fused group may hold on a GPU: ``share`` of its ``free_bytes`` (measured
    before any member's tensors exist, ``torch.cuda.mem_get_info``) split between the
    ``processes`` training side by side on it, over ``member_bytes``, one member's share of a
    probe group's peak memory (``torch.cuda.max_memory_allocated``: its images, weights, optimiser
    state and activations). At least 1 (a member that alone does not fit fails as it would unfused)."""
    if member_bytes <= 0:
        return 1 << 30
    return max(1, int(share * free_bytes / max(1, processes) // member_bytes))


def available_memory_bytes(device: torch.device) -> int:
    """Bytes that new tensors may take on ``device`` now: on CUDA the free memory
    (``torch.cuda.mem_get_info``), on the CPU the kernel's ``MemAvailable`` (``/proc/meminfo``;
    elsewhere the free pages, ``os.sysconf``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class ImagePlacement:
    """Where one member's training images live (``runtime.stream``).

    Attributes:
        streamed: True: gathered per step from host memory (the decoded cache, a memory map) and
            prefetched; False: one copy on the training device for the whole fit.
        images_bytes: the member's training images (uint8), in bytes.
        limit_bytes: its share of the device's memory: ``runtime.memory_share`` of what is
            available there, divided by the members training side by side on it (None when
            ``runtime.stream`` decided without measuring).
    """

    streamed: bool
    images_bytes: int
    limit_bytes: int | None

    def describe(self) -> str:
        """One line: the choice and both sizes."""
        where = "streamed from the decoded cache" if self.streamed else "on the device"
        share = f" against a share of {_size(self.limit_bytes)}" if self.limit_bytes is not None else ""
        return f"{_size(self.images_bytes)} of training images{share}: {where}"


def _size(n: int) -> str:
    """``n`` bytes as ``1.23 GiB`` or ``4.5 MiB``."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def image_placement(images_bytes: int, device: torch.device, mode: str, share: float, processes: int) -> ImagePlacement:
    """Whether a member's ``images_bytes`` of training images go on ``device`` whole or are
    streamed (:class:`ImagePlacement`): ``mode`` ``on`` / ``off`` force it; ``auto`` streams
    when they exceed ``share`` of :func:`available_memory_bytes` split among ``processes``
    training side by side on the device."""
    if mode in ("on", "off"):
        return ImagePlacement(mode == "on", int(images_bytes), None)
    limit = int(share * available_memory_bytes(device) / max(1, processes))
    return ImagePlacement(images_bytes > limit, int(images_bytes), limit)
