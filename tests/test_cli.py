"""The Hydra entry point as a user runs it: every config composes, stage=all end to end,
and user errors print one line with exit code 2 and leave nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import CONF_DIR, REPO, TINY, command_error, compose_cfg
from pipeline.stages import STAGES


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


MODEL_GROUPS = ("profile", "aug", "train", "runtime")  # the groups that change a model or its augmentation


@pytest.mark.parametrize("group, option", [(g, o) for g in ("profile", "aug", "train", "blend",
                                                             "runtime", "data", "folds", "paths", "pseudo")
                                           for o in _options(g)])
def test_every_config_option_instantiates(tmp_path, group, option):
    """Each option of each group passes the schema, and what it configures is built for real:
    every model with its kwargs (forward pass on real digits) and every member's augmentation on
    both backends (for the groups that change them, MODEL_GROUPS), every blender, the device."""
    import torch

    from conftest import DIGITS
    from pipeline import augment, data
    from pipeline.blend.blenders import make_blender
    from pipeline.models import create_model
    from pipeline.config import validate
    from pipeline.settings import aug_settings, blend_methods, blend_settings, runtime_settings
    from pipeline.device import select_device
    from pipeline.errors import ConfigError
    from pipeline.pretrained import weights_available

    cfg = compose_cfg(tmp_path, [f"{group}={option}"])
    validate(cfg)
    assert set(cfg.ensemble) <= set(cfg.models) and cfg.stage in STAGES
    digits = data.load_competition(DIGITS).x_train[:4]
    x = torch.from_numpy(digits).float() / 255
    for name, m in (cfg.models.items() if group in MODEL_GROUPS else ()):
        try:  # a hub-only backbone offline (tests never download): its architecture, without the weights
            weights_available(dict(m.kwargs))
            load = True
        except ConfigError:
            load = False
        pretrained = bool(m.kwargs.get("pretrained"))  # an ImageNet network needs more than 28 px (ConvNeXt's stages)
        side = 64 if pretrained else 28
        model = create_model(m.arch, 10, 1, side, load_weights=load, **dict(m.kwargs)).eval()
        assert model(torch.nn.functional.interpolate(x, size=side) if pretrained else x).shape == (4, 10), name
        aug = aug_settings(cfg, name)
        out = augment.batch_augment_from_cfg(aug, torch.Generator().manual_seed(0))(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        transform = augment.transform_from_cfg(aug)
        assert transform is None or transform(image=digits[0, 0])["image"].shape == (28, 28)
    for method in blend_methods(cfg):
        make_blender(method, blend_settings(cfg))
    assert select_device(runtime_settings(cfg).device).type in ("cpu", "cuda")


def test_profiles_blend_several_members(tmp_path):
    """Each profile trains several members per fold (models x seeds) and the quick one less."""
    from pipeline.config import validate
    from pipeline.settings import seed_count

    quick = compose_cfg(tmp_path, ["profile=quick"])
    full = compose_cfg(tmp_path, [])
    for cfg in (quick, full):
        validate(cfg)  # adds the pseudo-label rounds
        assert sum(seed_count(cfg, n) for n in cfg.ensemble) >= 3
    assert seed_count(quick, "cnn_deotte") == 2 and quick.sized_for == "cpu" and full.sized_for == "gpu"
    assert "cnn_deotte_pl" in full.ensemble and seed_count(full, "cnn_deotte_pl") == 1
    assert full.models.cnn_deotte_pl.train.epochs == full.models.cnn_deotte.train.epochs
    off = compose_cfg(tmp_path, ["pseudo.models=[]"])  # the profile's round settings are dropped
    validate(off)
    assert "cnn_deotte_pl" not in off.models and "cnn_deotte_pl" not in off.ensemble
    assert quick.models.cnn_deotte.train.epochs < full.models.cnn_deotte.train.epochs


@pytest.mark.slow
def _competition_file(folder: Path, name: str, *settings: str) -> None:
    """``folder/conf/competition/<name>.yaml``: ``settings`` (overrides) as a user's competition file."""
    from omegaconf import OmegaConf

    path = folder / "conf" / "competition" / f"{name}.yaml"
    path.parent.mkdir(parents=True)
    body = OmegaConf.to_yaml(OmegaConf.from_dotlist([s.lstrip("+") for s in settings]))
    path.write_text("# @package _global_\n" + body)


def test_stage_all_end_to_end(tmp_path, digits_dir):
    """``stage=all`` through ``run.py`` with the competition's settings in the user's own
    ``conf/competition/mine.yaml`` (nothing else on the command line), then ``stage=blend`` of the
    same competition finds the same members and writes the same submission."""
    _competition_file(tmp_path, "mine", f"paths.root={tmp_path}", f"data.dir={digits_dir}",
                      "ensemble=[cnn_keras,mlp]", *TINY)
    res = run_cli("competition=mine", "stage=all", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "blend: submissions/submission.csv =" in res.stdout + res.stderr
    logs = list((tmp_path / "logs" / "runs").glob("*/run.log"))  # Hydra's job log holds the run
    assert len(logs) == 1 and "blend: submissions/submission.csv =" in logs[0].read_text()
    assert "train: cnn_keras fold 1: OOF acc" in logs[0].read_text()
    sub = pd.read_csv(tmp_path / "submissions" / "submission.csv")
    assert list(sub.columns) == ["ImageId", "Label"] and len(sub) == 119
    assert len(list((tmp_path / "folds").glob("folds_k2_seed42_*.csv"))) == 1
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["blend", "cnn_keras", "mlp", "report"]
    assert (tmp_path / "artifacts" / "report" / "index.html").exists()  # stage=all ends with the report
    again = run_cli("competition=mine", "stage=blend", cwd=tmp_path)
    assert again.returncode == 0 and "train:" not in again.stdout + again.stderr, again.stderr[-2000:]
    assert pd.read_csv(tmp_path / "submissions" / "submission.csv").equals(sub)


def test_a_competition_files_settings_count_as_set_by_hand(tmp_path):
    """What a competition file sets is trained as set (``screen.fixed``), like the command line's;
    the shipped competitions compose and pass every check."""
    from pipeline.config import competition_overrides, validate, with_fixed
    from pipeline.errors import ConfigError

    _competition_file(tmp_path, "mine", "data.dir=/x", "data.img_size=64", "ensemble=[resnet9]")
    sources = [{"path": "pkg.absent", "schema": "structured"}, {"path": str(tmp_path / "conf"), "schema": "file"}]
    overrides = competition_overrides("mine", sources)
    assert sorted(overrides) == ["data.dir=/x", "data.img_size=64", "ensemble=['resnet9']"]
    cfg = with_fixed(compose_cfg(tmp_path, ["profile=quick"]), overrides)
    assert set(cfg.screen.fixed) == {"side", "arch"}
    assert competition_overrides(None, sources) == []
    with pytest.raises(ConfigError, match="competition=theirs: no conf/competition/theirs.yaml"):
        competition_overrides("theirs", sources)
    for name in _options("competition"):
        cfg = compose_cfg(tmp_path, [f"competition={name}"])
        validate(cfg)
        assert cfg.folds.k == 5 and not with_fixed(cfg, competition_overrides(name, [
            {"path": str(CONF_DIR), "schema": "file"}])).screen.fixed  # data and folds only: nothing fixed


# A user error: (the command's arguments, what its one line must say).
USER_ERRORS = [
    (["stage=data", "data.dir={tmp}/nowhere"], "does not exist"),
    (["stage=train", "model=lenet"], "unknown model 'lenet'"),
    (["stage=train", "fold=9"], "fold=9: expected 'all' or an integer 0..1"),
    (["stage=blend"], "missing"),
    (["stage=tea"], "stage=tea: expected one of data, folds, screen, train, tune, blend, report, predict, export, submit, all"),
    (["stage=folds", "folds.k=1"], "folds.k=1: expected >= 2"),
    (["stage=train", "+models.mlp.train.lr=-1"], "models.mlp.train.lr=-1.0: expected > 0"),
    (["stage=blend", "blend.models=[lenet]"], "blend.models: unknown model 'lenet'"),
    (["stage=train", "train.precision=fp8"], "train.precision=fp8: Invalid value 'fp8'"),
    (["stage=train", "pseudo.models=[lenet]"], "pseudo.models: unknown model 'lenet'"),
    (["stage=train", "pseudo.models=[mlp]", "model=mlp_pl"], "pseudo-labels of fold 0 need cnn_deotte fold 0"),
]


@pytest.mark.parametrize("args, message", USER_ERRORS)
def test_user_errors_exit_2_with_one_line(tmp_path, digits_dir, capsys, args, message):
    """Every user error through the command line's own handler (``pipeline.stages.run_command``,
    what ``run.py`` calls with Hydra's composed config), in this process: exit code 2 and one
    line on stderr. Outside ``run.py`` Hydra has no run (``HydraConfig``), so no override fixes a
    screening dimension here (``with_fixed``: tests/test_screen.py); ``run.py`` itself, in a
    subprocess: the test after this one."""
    from hydra import compose, initialize_config_dir

    from pipeline.stages import run_command

    overrides = [f"paths.root={tmp_path}", f"data.dir={digits_dir}", *TINY, *[a.format(tmp=tmp_path) for a in args]]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_command(cfg)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("args, message", [USER_ERRORS[6]])
def test_run_py_prints_a_user_error_as_one_line_and_exits_2(tmp_path, digits_dir, args, message):
    """``run.py`` as a user runs it (a subprocess): nothing but the one line on stderr, no
    traceback, exit code 2 (a setting error; every other user error runs through the same
    handler in process, :func:`test_user_errors_exit_2_with_one_line`)."""
    args = [a.format(tmp=tmp_path) for a in args]
    res = run_cli(f"paths.root={tmp_path}", f"data.dir={digits_dir}", *TINY, *args, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in res.stderr


def test_bad_csv_exits_2_and_writes_nothing(tmp_path, digits_dir, capsys):
    lines = (digits_dir / "train.csv").read_text().splitlines()
    lines[10] = lines[10] + ",0"
    (digits_dir / "train.csv").write_text("\n".join(lines) + "\n")
    code, err = command_error(capsys, "stage=all", f"paths.root={tmp_path}", f"data.dir={digits_dir}", *TINY)
    assert code == 2
    assert err == [f"error: {digits_dir / 'train.csv'} line 11: 786 fields, expected 785 fields"]
    for out in ("folds", "artifacts", "submissions"):
        assert not (tmp_path / out).exists() or not any((tmp_path / out).rglob("*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_stops_at_the_entry_before_any_screening(tmp_path, digits_dir):
    """``profile=quick runtime.device=cuda`` on a machine without CUDA: the one line and exit 2
    from the entry's checks, before the screening starts (no Optuna trial, no traceback, nothing
    written under artifacts/)."""
    res = run_cli("profile=quick", f"paths.root={tmp_path}", f"data.dir={digits_dir}", "runtime.device=cuda",
                  cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: runtime.device=cuda, but CUDA is not available here (use auto or cpu)"], res.stderr
    assert "Trial" not in res.stdout + res.stderr and "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*"))


def test_a_user_error_inside_a_tuning_trial_ends_the_study_in_one_line(tmp_path, digits_dir):
    """A sampled value its setting refuses (a negative learning rate) is a user error met inside
    an Optuna trial: the study stops there, the trial is failed without a traceback, and the run
    ends with the one error line and exit 2."""
    res = run_cli(f"paths.root={tmp_path}", f"data.dir={digits_dir}", *TINY, "stage=tune", "model=mlp",
                  "tune.n_trials=3", f"tune.storage=sqlite:///{tmp_path}/tune.db",
                  "models.mlp.space.train.lr={type:float,low:-2.0,high:-1.0,log:false}",
                  "models.mlp.space.train.epochs={type:int,low:1,high:1}", cwd=tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: models.mlp.train.lr=-") and err[-1].endswith(": expected > 0")
    assert "Traceback" not in res.stdout + res.stderr
    assert "Trial 1" not in res.stdout + res.stderr  # stopped at the first
