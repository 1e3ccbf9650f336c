"""Entry point: ``python run.py stage=data|folds|train|tune|blend|report|predict|export|submit|all key=value ...``.

Composes the Hydra config (``pipeline/conf``) and dispatches ``cfg.stage``. Progress goes through
Python's ``logging`` (Hydra shows it and writes it to the run's ``.log`` file). User errors
(:class:`pipeline.errors.PipelineError`) print one line on stderr, are written to the run's log
file, and exit with code 2.
"""

import warnings

import hydra
from omegaconf import DictConfig

# config.yaml's search path names ./conf (your conf/competition/<name>.yaml); its absence is normal
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf is not available")


@hydra.main(version_base="1.3", config_path="pipeline/conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.stages import run_command

    run_command(cfg)


if __name__ == "__main__":
    main()
