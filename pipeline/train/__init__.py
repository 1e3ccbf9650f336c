"""Stage ``train`` and its parts, one concern a module:

* :mod:`~pipeline.members`   - a member's key, cache key, integrity and files (the only reader/writer);
* :mod:`~pipeline.train.engine`    - numerics: train step, prediction, the fit loop;
* :mod:`~pipeline.train.batches`   - a member's training batches (either backend), reseeded per epoch;
* :mod:`~pipeline.train.resume`    - end-of-epoch resume state (no pickle);
* :mod:`~pipeline.train.runtime`   - device, threads and side-by-side job policy;
* :mod:`~pipeline.train.scheduler` - pending members, file locks, worker processes, watchdog;
* :mod:`~pipeline.train.stage`     - ``stage=train`` glue.

Importing this package imports none of them: a blender that reads members does not pull in the trainer.
"""


def run(cfg, ws=None):
    """Stage ``train`` (see :func:`pipeline.train.stage.run`)."""
    from pipeline.train.stage import run as _run

    return _run(cfg, ws)
