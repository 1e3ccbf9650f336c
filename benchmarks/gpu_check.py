"""One command that verifies and measures the whole CUDA path on an NVIDIA GPU.

    python benchmarks/gpu_check.py --out gpu_check/               # on a GPU: at most 9 minutes (--budget-s 540)
    python benchmarks/gpu_check.py --out /tmp/dry --device cpu    # dry run on a CPU (1-2 minutes on 2 cores)

Each step runs in its own process with its own time box, and is recorded in
``<out>/gpu_check.json`` as passed / failed / skipped with its error and figures, so one failure
hides nothing else; every step's output goes to ``<out>/gpu_check.log``. The key checks come
first, the measurements last (:data:`STEPS`, in order; each step's own module says what it
checks or measures): ``environment`` and ``pytest_gpu`` (:mod:`gpu_steps.environment`),
``fused_vs_alone`` and ``averaging_resume`` (:mod:`gpu_steps.exactness`), ``sync_audit``
(:mod:`gpu_steps.audit`), ``end_to_end`` (:mod:`gpu_steps.end_to_end`), then ``fused``,
``side_by_side`` and ``throughput`` (:mod:`gpu_steps.speed`). This file is the entry: the command
line, the time boxes, the step processes and the verdict; ``benchmarks/gpu_steps/`` beside it
holds the steps and what they share (:mod:`gpu_steps.common`).

Time: the whole run stops at ``--budget-s`` seconds (CUDA 540, CPU 330). Each step's time box is
its share (:data:`SHARE`, per device kind) of the seconds left, among the steps not yet run
(:func:`time_box`): if every step used its whole box the boxes would add up to the budget
exactly, a step that finishes early leaves its time to the later ones, and a step is never boxed
below its share of the whole budget. A step that runs past its box is killed and failed (figures
it had written so far are kept); a step with under :data:`MIN_BOX_S` seconds left is skipped.

On the CPU (the dry run) every step process runs with one intra-op thread (``OMP_NUM_THREADS=1``
unless set): on a 2-core machine shared with other work, two threads that wait on each other
made steps 3-10x slower (``fused_vs_alone`` 94 s against 13 s) and pushed them past their boxes.
The dry run checks the code paths, not the figures: narrow models, and smaller measurements
than CUDA's (:func:`parse_args`: 256 rows at batch 32, 0.25 s side by side).

Data: the real MNIST arrays when ``--data`` (default ``data/digit-recognizer``) holds the built
competition, else the committed fixture's real digits, repeated to ``--rows`` rows for the
throughput steps. Nothing is downloaded. Only torch, timm, numpy, pandas, scikit-learn, joblib,
safetensors, scipy, pillow, tqdm, hydra-core, omegaconf and antlr4-python3-runtime are needed:
the steps run with albumentations, OpenCV, Optuna, matplotlib and skops made unimportable
(``--allow-all-imports`` lifts that), so the dry run proves the list.

Exit code 0 when every step run passed; 1 when any failed or was skipped (a skipped step is a
check that did not run, never a pass); 2 without a CUDA device and without ``--device``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # the pipeline
if str(HERE) not in sys.path:  # gpu_steps: there when this file runs by path, maybe not when it is imported
    sys.path.insert(0, str(HERE))

from gpu_steps import STEPS  # noqa: E402  (name -> step function, key checks first, measurements last)
from gpu_steps.common import Incomplete, Skip  # noqa: E402

# Each step's share of the whole run's budget, per device kind (each adds up to 1; see time_box).
# A step's box is at least its share, plus what earlier steps left. CUDA (540 s): environment
# 16 s, pytest_gpu 81 (one test compiles), fused_vs_alone 32, averaging_resume 32, sync_audit 27,
# end_to_end 97 (four run.py processes), fused 54, side_by_side 81 (1 + 2 + 4 processes, each
# warmed up), throughput 119 (9 eager runs, 3 compiles). CPU (the dry run, 330 s): about 1.7x or
# more of the longest each step took in dry runs on a 2-core AMD EPYC shared with other work
# (end_to_end 28-60 s, side_by_side 15-36 s, throughput 7-41 s, the others 4-12 s).
SHARE = {"cuda": {"environment": 0.03, "pytest_gpu": 0.15, "fused_vs_alone": 0.06, "averaging_resume": 0.06,
                  "sync_audit": 0.05, "end_to_end": 0.18, "fused": 0.10, "side_by_side": 0.15, "throughput": 0.22},
         "cpu": {"environment": 0.03, "pytest_gpu": 0.08, "fused_vs_alone": 0.07, "averaging_resume": 0.07,
                 "sync_audit": 0.05, "end_to_end": 0.30, "fused": 0.07, "side_by_side": 0.18, "throughput": 0.15}}
MIN_BOX_S = 5.0  # a step with a smaller time box than this (seconds) is skipped: the run does not pass
BLOCKED = ("albumentations", "cv2", "optuna", "matplotlib", "skops")  # not on a bare GPU machine


def run_step(args) -> int:
    """Run step ``args.step`` (its function in :data:`STEPS`) in this process; write
    ``<out>/steps/<name>.json`` (status passed, failed or skipped; ``seconds``; ``error``;
    ``results``). Returns 0: the record is the result."""
    out = Path(args.out)
    work = out / "work" / args.step
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        record = {"status": "passed", "results": STEPS[args.step](args, work)}
    except Skip as e:
        record = {"status": "skipped", "error": str(e)}
    except Incomplete as e:
        record = {"status": "failed", "error": f"Incomplete: {e}", "results": e.results}
    except BaseException as e:  # noqa: BLE001 - any failure is this step's result
        traceback.print_exc()
        record = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "steps").mkdir(exist_ok=True)
    (out / "steps" / f"{args.step}.json").write_text(json.dumps(record, indent=2, default=str))
    return 0


def _blocker(out: Path) -> Path:
    """A folder whose ``sitecustomize.py`` makes :data:`BLOCKED` unimportable in the steps."""
    d = out / "_gpu_machine_imports"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {BLOCKED!r}\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not on a bare GPU machine (benchmarks/gpu_check.py)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n")
    return d


def time_box(name: str, left: float, remaining: Sequence[str], share: dict[str, float]) -> float:
    """Seconds step ``name`` may run: its ``share`` (one of :data:`SHARE`) of the ``left``
    seconds, among the steps ``remaining`` (``name`` and those after it). When every step runs its
    whole box the boxes add up to the budget exactly (each is its share of the whole budget); time
    a step leaves unused goes to the later ones in proportion to their shares."""
    return left * share[name] / sum(share[s] for s in remaining)


def run_steps(steps: Sequence[str], budget_s: float, run_one: Callable[[str, float], dict],
              share: dict[str, float], clock: Callable[[], float] = time.monotonic) -> dict[str, dict]:
    """Run ``steps`` in order within ``budget_s`` seconds (measured on ``clock``): each by
    ``run_one(name, box)``, which returns its record and must end within ``box`` seconds
    (:func:`time_box` with ``share``). A step whose box is under :data:`MIN_BOX_S` is recorded as skipped
    ("out of time") without running. Returns each step's record, with ``started_s`` (seconds into
    the run) and ``time_box_s``: ``started_s + time_box_s`` never passes ``budget_s``."""
    start = clock()
    deadline = start + budget_s
    report = {}
    for i, name in enumerate(steps):
        now = clock()
        left = deadline - now
        box = time_box(name, max(left, 0.0), steps[i:], share)
        timing = {"started_s": round(now - start, 1), "time_box_s": round(box, 1)}
        if box < MIN_BOX_S:
            report[name] = {"status": "skipped", "seconds": 0.0, **timing,
                            "error": f"out of time: {max(left, 0):.0f} s of --budget-s {budget_s:g} left, "
                                     f"a box of {box:.0f} s (< {MIN_BOX_S:g} s)"}
        else:
            report[name] = run_one(name, box) | timing
        rec = report[name]
        print(f"gpu_check: {name:17s} {rec['status']:7s} {rec['seconds']:6.1f} s of {box:5.0f}  "
              f"{rec.get('error', '')}", flush=True)
    return report


def verdict(report: dict[str, dict]) -> int:
    """The exit code: 0 when every step ran and passed, 1 when any failed or was skipped."""
    return 0 if report and all(r["status"] == "passed" for r in report.values()) else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the device's defaults filled in (``--device`` stays None when not
    given: :func:`main` picks CUDA or refuses). The dry run (``--device cpu``) measures less than
    CUDA: one batch size (32) and no compile, 256 rows, fused groups of 1 and 3, 1 and 2
    processes side by side at batch 32 for 0.25 s each."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and work files")
    p.add_argument("--device", default=None, help="cuda (default when there is one), cuda:N, or cpu (dry run)")
    p.add_argument("--data", default=str(REPO / "data" / "digit-recognizer"), help="a built competition folder")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--budget-s", type=float, default=None, help="whole-run limit in seconds (CUDA 540, CPU 330)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--compile-batches", nargs="*", type=int, default=None)
    p.add_argument("--rows", type=int, default=None, help="training rows per throughput epoch")
    p.add_argument("--side-jobs", nargs="+", type=int, default=None)
    p.add_argument("--side-seconds", type=float, default=None)
    p.add_argument("--side-batch", type=int, default=None, help="batch of fused and side_by_side (CUDA 128, CPU 32)")
    p.add_argument("--fused", nargs="+", type=int, default=None, help="fused group sizes (step fused)")
    p.add_argument("--allow-all-imports", action="store_true")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() seconds
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    defaults = {"models": ["cnn_deotte", "cnn_keras", "resnet_timm"], "batches": [32] if cpu else [128, 512, 2048],
                "compile_batches": [] if cpu else [512], "rows": 256 if cpu else 32768,
                "side_jobs": [1, 2] if cpu else [1, 2, 4], "side_seconds": 0.25 if cpu else 12.0,
                "side_batch": 32 if cpu else 128,
                "fused": [1, 3] if cpu else [1, 5, 10, 15], "budget_s": 330.0 if cpu else 540.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _step_runner(args, out: Path, env: dict, log) -> Callable[[str, float], dict]:
    """``run_one(name, box)`` for :func:`run_steps`: step ``name`` in a process of its own (this
    script again, with ``--step``), in a process group of its own that is killed with everything
    it started at the end of its ``box`` seconds; its output goes to ``log``. Returns the step's
    record (a killed step's figures from its partial record)."""
    passthrough = sys.argv[1:]

    def run_one(name: str, box: float) -> dict:
        log.write(f"\n===== {name} (time box {box:.0f} s) =====\n")
        log.flush()
        t0 = time.perf_counter()
        f, partial = out / "steps" / f"{name}.json", out / "steps" / f"{name}.partial.json"
        cmd = [sys.executable, __file__, *passthrough, "--device", args.device, "--step", name,
               "--step-deadline", f"{time.time() + box:.1f}"]
        # its own process group: at the end of its box the step goes with every process it started
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=box)
            rec = json.loads(f.read_text()) if f.exists() else {
                "status": "failed", "error": "the step died without a record (see gpu_check.log)"}
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rec = {"status": "failed", "error": f"timed out after {box:.0f} s (its time box)"}
        if "results" not in rec and partial.exists():  # what it measured before it was killed
            rec["results"] = json.loads(partial.read_text())
        rec.setdefault("seconds", round(time.perf_counter() - t0, 1))
        return rec

    return run_one


def _end_now(code: int) -> None:
    """End this step process with ``code`` once its record is written: atexit's callbacks run
    (logging's flush, joblib's and torch's clean-ups) and the output is flushed, but the
    interpreter does not tear its modules down, which took 1.2 s of each step process on the
    2-core CPU (torch, scikit-learn, scipy ...). Used on the CPU only (the dry run)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> int:
    args = parse_args()
    if args.device is None:  # torch only here: a step process is always given its --device
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; for the dry run use --device cpu", file=sys.stderr)
            return 2
        args = parse_args([*sys.argv[1:], "--device", "cuda"])
    if args.step:
        code = run_step(args)
        if args.device == "cpu":
            _end_now(code)
        return code
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "steps", ignore_errors=True)
    env = dict(os.environ)
    if args.device == "cpu":  # see the module docstring: one intra-op thread per step process on the CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    if not args.allow_all_imports:
        env["PYTHONPATH"] = os.pathsep.join([str(_blocker(out)), str(REPO), env.get("PYTHONPATH", "")])
    started = time.time()
    report = {"device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s,
              "blocked_imports": [] if args.allow_all_imports else list(BLOCKED), "steps": {}}
    steps = [s for s in STEPS if s in args.steps]  # always in STEPS' order: key checks first
    with open(out / "gpu_check.log", "w") as log:
        report["steps"] = run_steps(steps, args.budget_s, _step_runner(args, out, env, log),
                                    SHARE["cpu" if args.device == "cpu" else "cuda"])
    report["seconds"] = round(time.time() - started, 1)
    code = verdict(report["steps"])
    report["passed"] = code == 0
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")
    by = {st: [n for n, r in report["steps"].items() if r["status"] == st] for st in ("passed", "failed", "skipped")}
    print(f"gpu_check: {'PASSED' if code == 0 else 'NOT PASSED'}: {len(by['passed'])} of {len(steps)} steps passed"
          + "".join(f"; {st}: {', '.join(by[st])}" for st in ("failed", "skipped") if by[st])
          + f"; {report['seconds']:.0f} s of {args.budget_s:g}; {out / 'gpu_check.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
