"""Shared fixtures: the real config composed with Hydra, pointed at pytest's tmp_path, on CPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

os.environ["HF_HUB_OFFLINE"] = "1"  # no test downloads: pretrained weights come from packages or files

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "pipeline" / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DIGITS = FIXTURES / "digits"

# Small but real settings: 2 folds, 2 epochs, narrow nets, CPU, no progress bars.
TINY = [
    "folds.k=2",
    "runtime.device=cpu",
    "runtime.num_workers=0",
    "runtime.progress=false",
    "runtime.fold_jobs=1",   # in-process, so tests see the output (fold_jobs has its own tests)
    "runtime.estimate=false",  # no timed probe before training (it has its own test)
    "train.epochs=2",
    "train.min_steps=0",  # the fixture's 6 steps per epoch would otherwise raise the epochs
    "train.batch_size=32",
    "models.cnn_deotte.train.epochs=2",
    "models.resnet_timm.train.epochs=2",
    "models.cnn_deotte.kwargs.width=0.25",
    "models.cnn_keras.kwargs.width=0.25",
    "+models.resnet_timm.kwargs.channels=[8,16,32,64]",
    "+models.resnet_timm.kwargs.layers=[1,1,1,1]",
    "models.cnn_deotte.seeds=1",  # the competition profile's seeds and pseudo-label round: off
    "pseudo.models=[]",
    "pseudo.blend=mean",
    "screen.enabled=false",  # the profiles' recipe screening (tests/test_screen.py turns it on)
]


def command_error(capsys, *overrides: str) -> tuple[int, list[str]]:
    """Run the command line's own handler (``pipeline.stages.run_command``, what ``run.py``
    calls with Hydra's composed config) in this process on ``overrides``, expecting a user error:
    its exit code and its stderr lines. ``run.py`` itself in a subprocess: tests/test_cli.py."""
    from pipeline.stages import run_command

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_command(cfg)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def compose_cfg(root: Path, overrides: list[str] = (), data_dir: Path | None = None):
    """The real config (``pipeline/conf``) with every output under ``root``, its pseudo-label
    rounds added as models (what :func:`pipeline.config.prepare` does first; the rest of
    ``prepare``, checking and ``tuned=true``, is left to the tests that test it)."""
    from pipeline.config import expand_pseudo_rounds

    ov = [f"paths.root={root}"]
    if data_dir is not None:
        ov.append(f"data.dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=ov + list(overrides))
    expand_pseudo_rounds(cfg)
    return cfg


@pytest.fixture
def digits_dir(tmp_path: Path) -> Path:
    """A private copy of the miniature competition (400 train / 119 test real MNIST rows)."""
    d = tmp_path / "digits"
    shutil.copytree(DIGITS, d)
    return d


@pytest.fixture
def tiny_cfg(tmp_path: Path, digits_dir: Path):
    """Factory: the tiny config on the fixture competition, with extra overrides."""

    def make(*overrides: str):
        return compose_cfg(tmp_path, TINY + list(overrides), data_dir=digits_dir)

    return make


# The shared training run: enough steps on 200 real digits per fold to be far above chance.
TRAINED = TINY + ["ensemble=[cnn_deotte,mlp]", "aug=none", "train.epochs=6",
                  "models.cnn_deotte.train.epochs=6"]


@pytest.fixture(scope="session")
def trained_root(tmp_path_factory):
    """One tiny training run shared by the blend/cache tests: 2 models x 2 folds, 6 epochs."""
    from pipeline import train
    from pipeline.workspace import Workspace

    root = tmp_path_factory.mktemp("trained")
    data_dir = root / "digits"
    shutil.copytree(DIGITS, data_dir)
    cfg = compose_cfg(root, TRAINED, data_dir=data_dir)
    train.run(Workspace.load(cfg))
    return root, data_dir


@pytest.fixture
def trained_cfg(trained_root):
    """Factory: the config of :func:`trained_root` with extra overrides."""
    root, data_dir = trained_root

    def make(*overrides: str):
        return compose_cfg(root, TRAINED + list(overrides),
                           data_dir=data_dir)

    return make


def trained(outcomes) -> dict:
    """``{(model, fold): metrics}`` of the members a ``stage=train`` call (re)trained."""
    return {(o.key.model, o.key.fold): o.metrics for o in outcomes if o.metrics is not None}


def fit(cfg, name: str, fold: int, **kwargs):
    """One member's fit loop on ``cfg`` (no files written): :func:`pipeline.train.engine.fit_member`."""
    from pipeline.train.engine import FitSpec, fit_member
    from pipeline.members import MemberKey
    from pipeline.workspace import Workspace

    ws = Workspace.load(cfg)
    key = MemberKey(name, fold)
    spec = FitSpec.create(ws.settings.models[name], ws.settings.runtime, key, ws.member_config(key))
    return fit_member(spec, ws.comp, ws.folds, **kwargs)
