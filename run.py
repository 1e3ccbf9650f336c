"""Entry point: ``python run.py stage=data|folds|train|tune|blend|report|predict|all key=value ...``.

Composes the Hydra config (``pipeline/conf``) and dispatches ``cfg.stage``. Progress goes through
Python's ``logging`` (Hydra shows it and writes it to the run's ``.log`` file). User errors
(:class:`pipeline.errors.PipelineError`) print one line on stderr, are written to the run's log
file, and exit with code 2.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig


def _log_to_files(message: str) -> None:
    """Write ``message`` as an ERROR record to the log files only (the terminal gets it once)."""
    record = logging.LogRecord("run", logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


@hydra.main(version_base="1.3", config_path="pipeline/conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.budget import process_start
    from pipeline.errors import PipelineError
    from pipeline.stages import run_stage

    try:
        run_stage(cfg, started=process_start())  # budget= counts from the command's start
    except PipelineError as e:
        _log_to_files(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
