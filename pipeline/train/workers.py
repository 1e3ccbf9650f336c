"""Side-by-side worker processes (joblib/loky), set up for training or timing: the parent's log
handlers, the watchdog that ends a worker when ``run.py`` dies, the worker's device and threads.

:mod:`pipeline.train.probes` times steps in such workers and :mod:`pipeline.train.scheduler`
trains in them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time

from pipeline.device import select_device, use_device
from pipeline.settings import RuntimeSettings
from pipeline.train.runtime import configure_threads, num_workers
from pipeline.workspace import Workspace


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker process: end it as soon as the process that started it is gone (``kill -9``
    of ``run.py`` would otherwise leave workers training, holding cores or GPU memory). A member
    cut short this way keeps its last end-of-epoch resume checkpoint. One watchdog thread per
    process."""
    if any(t.name == "exit-with-parent" for t in threading.enumerate()):
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(70)  # the parent died: stop now, without cleanup (nothing is half-written)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def log_handlers() -> list[tuple[str, str, str | None, int]]:
    """The root logger's console and file handlers as ``(kind, target, format, level)``, so a
    worker process can log where the parent does (Hydra's console and the run's log file)."""
    out = []
    for h in logging.getLogger().handlers:
        fmt = h.formatter._fmt if h.formatter else None  # noqa: SLF001 - the format string itself
        if isinstance(h, logging.FileHandler):
            out.append(("file", h.baseFilename, fmt, h.level))
        elif type(h) is logging.StreamHandler:
            out.append(("stream", "stderr" if h.stream is sys.stderr else "stdout", fmt, h.level))
    return out


def install_log_handlers(handlers: list[tuple[str, str, str | None, int]], level: int) -> None:
    """In a worker process: add :func:`log_handlers`' handlers to a root logger that has none."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.setLevel(level)
    for kind, target, fmt, hlevel in handlers:
        h = (logging.FileHandler(target, mode="a") if kind == "file"
             else logging.StreamHandler(sys.stderr if target == "stderr" else sys.stdout))
        h.setLevel(hlevel)
        if fmt:
            h.setFormatter(logging.Formatter(fmt))
        root.addHandler(h)


def enter_worker(ws: Workspace, slot: int, sharing: int, handlers: list, level: int) -> RuntimeSettings:
    """Set up a side-by-side worker process for training or timing: the parent's log handlers,
    exit when the parent dies, its device (GPU ``slot % count`` on a multi-GPU machine, made
    current before any CUDA work), ``cores // sharing`` torch threads on the CPU (DataLoader
    workers on CUDA), no progress bar. Returns the worker's runtime settings (the run's config
    is not changed)."""
    exit_with_parent()
    install_log_handlers(handlers, level)
    rt = ws.settings.runtime
    device = select_device(rt.device, slot=slot)
    use_device(device)
    configure_threads(rt.threads, device, sharing)
    # several processes' progress bars would garble one terminal
    return dataclasses.replace(rt, device=str(device), progress=False,
                               num_workers=num_workers(rt.num_workers, device, sharing))
