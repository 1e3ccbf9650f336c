"""Stage ``tune`` and its parts: :mod:`~pipeline.tune.space` (search spaces),
:mod:`~pipeline.tune.study` (Optuna studies, the objective, the stage) and
:func:`pipeline.config.apply_tuned_values` (``tuned=true``, applied at the run's entry, without
importing Optuna).
"""


def run(ws):
    """Stage ``tune`` (see :func:`pipeline.tune.study.run`)."""
    from pipeline.tune.study import run as _run

    return _run(ws)
