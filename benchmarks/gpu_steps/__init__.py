"""The steps of ``benchmarks/gpu_check.py``, one module per step or group of related steps.

:data:`STEPS` maps each step's name to its function, in the order the check runs them (the key
checks first, the measurements last). A step function takes the parsed command line and its own
empty work folder, and returns its figures (a JSON-serialisable dict): it raises to fail,
:class:`~gpu_steps.common.Skip` when it does not apply, :class:`~gpu_steps.common.Incomplete`
when it ran out of its time box part way. ``benchmarks/`` must be on ``sys.path`` (the check
puts it there; it is not an installed package).
"""

from __future__ import annotations

from typing import Callable

from .audit import step_sync_audit
from .end_to_end import step_end_to_end
from .environment import step_environment, step_pytest_gpu
from .exactness import step_averaging_resume, step_fused_vs_alone
from .speed import step_fused, step_side_by_side, step_throughput

# key checks first, measurements last
STEPS: dict[str, Callable] = {
    "environment": step_environment,
    "pytest_gpu": step_pytest_gpu,
    "fused_vs_alone": step_fused_vs_alone,
    "averaging_resume": step_averaging_resume,
    "sync_audit": step_sync_audit,
    "end_to_end": step_end_to_end,
    "fused": step_fused,
    "side_by_side": step_side_by_side,
    "throughput": step_throughput,
}
