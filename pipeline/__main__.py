"""``python -m pipeline key=value ...``: ``run.py`` for an installed kfold-stack.

A wheel holds the package and its Hydra config (``pipeline/conf``) but not ``run.py``, so the
code-competition notebook (``submit.ipynb``, :mod:`pipeline.submit`) runs

    python -m pipeline stage=submit export.dir=/kaggle/input/<dataset> data.dir=/kaggle/input/<competition>

It is ``run.py``'s entry point: the same config, the same dispatch, one-line user errors (exit 2).
"""

import warnings

import hydra
from omegaconf import DictConfig

# config.yaml's search path names ./conf (your conf/competition/<name>.yaml); its absence is normal
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf is not available")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.stages import run_command

    run_command(cfg)


if __name__ == "__main__":
    main()
