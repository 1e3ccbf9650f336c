"""Stage ``train`` and its parts, one concern a module:

* :mod:`~pipeline.train.engine`    - numerics: train step, the epoch, the fit loop;
* :mod:`~pipeline.train.inference` - a member's probabilities (test-time views), the model's placement;
* :mod:`~pipeline.train.averaging` - the one-cycle schedule and the weight average (EMA, SWA);
* :mod:`~pipeline.train.batches`   - a member's training batches (either backend), reseeded per epoch;
* :mod:`~pipeline.train.resume`    - end-of-epoch resume state (no pickle);
* :mod:`~pipeline.train.runtime`   - threads, side-by-side job policy, a barrier between processes;
* :mod:`~pipeline.train.probes`    - units (members, fused groups), timed probes, the estimate, fusion;
* :mod:`~pipeline.train.workers`   - a worker process's set-up: log handlers, watchdog, device, threads;
* :mod:`~pipeline.train.scheduler` - pending members, file locks, training the units side by side;
* :mod:`~pipeline.train.stage`     - ``stage=train`` glue.

The member store is :mod:`pipeline.members` and the device facts :mod:`pipeline.device`.
Importing this package imports none of its modules: a blender that reads members does not pull in
the trainer.
"""


def run(ws):
    """Stage ``train`` (see :func:`pipeline.train.stage.run`)."""
    from pipeline.train.stage import run as _run

    return _run(ws)
