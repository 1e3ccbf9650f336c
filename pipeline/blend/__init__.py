"""Stage ``blend`` and its parts:

* :mod:`~pipeline.blend.blenders` - Mean, Weighted, Stack as estimators; cross-validated OOF;
* :mod:`~pipeline.blend.store`    - the one owner of the saved blend (``artifacts/blend/``);
* :mod:`~pipeline.blend.stage`    - ``stage=blend`` glue and the leaderboard files.
"""


def run(ws):
    """Stage ``blend`` (see :func:`pipeline.blend.stage.run`)."""
    from pipeline.blend.stage import run as _run

    return _run(ws)
