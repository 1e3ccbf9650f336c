"""Entry point: ``python run.py stage=data|folds|train|tune|blend|report|predict|all key=value ...``.

Composes the Hydra config (``pipeline/conf``) and dispatches ``cfg.stage``. User errors
(:class:`pipeline.errors.PipelineError`) print one line and exit with code 2.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pipeline/conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.errors import PipelineError
    from pipeline.stages import run_stage

    try:
        run_stage(cfg)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
