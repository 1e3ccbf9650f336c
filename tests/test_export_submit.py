"""Code competitions: stage=export packs the submitted ensemble (weights, blender, OOF arrays,
wheels, notebook) into one folder; stage=submit runs it on a competition's test side alone.

The end-to-end test installs the export offline in a fresh virtual environment that sees the test
environment's packages (a stand-in for Kaggle's image) minus kfold-stack and the packages the
export ships wheels of, so pip must take those from ``export/wheels`` with ``--no-index``; then
``submit.py`` writes the training run's own ``submission.csv`` byte for byte. The other tests run
the stages in-process on the shared training run (pixels) and on small runs of the image layouts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import DIGITS, REPO, TINY, TRAINED, compose_cfg
from pipeline import blend, data, export, submit, train
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.paths import Paths
from pipeline.stages import run_stage
from pipeline.workspace import Workspace

sys.path.insert(0, str(REPO / "benchmarks"))
from make_image_competition import DIGIT_NAMES, write_image_competition  # noqa: E402


def _test_side(src: Path, dst: Path) -> Path:
    """A rerun's competition folder: the test side of ``src`` only (no train.csv, no train/)."""
    dst.mkdir(parents=True)
    for name in ("test.csv", "sample_submission.csv"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if (src / "test").is_dir():
        shutil.copytree(src / "test", dst / "test")
    return dst


@pytest.fixture(scope="module")
def pixels(trained_root, tmp_path_factory):
    """A private copy of the shared training run (cnn_deotte + mlp, 2 folds, pixels layout),
    blended (every method), exported with its wheels; and a rerun folder of its test side."""
    src, _ = trained_root
    root = tmp_path_factory.mktemp("export_pixels")
    for name in ("artifacts", "folds", "digits"):
        shutil.copytree(src / name, root / name)
    overrides = TRAINED + [f"export.dir={root / 'export'}"]
    cfg = compose_cfg(root, overrides, data_dir=root / "digits")
    blend.run(Workspace.load(cfg))
    wheels = None
    try:
        run_stage(compose_cfg(root, overrides + ["stage=export"], data_dir=root / "digits"))
    except ArtifactError as e:  # pip could not fetch the dependency wheels (no registry): the rest still runs
        if "pip failed" not in str(e):
            raise
        wheels = str(e)
        run_stage(compose_cfg(root, overrides + ["stage=export", "export.wheels=false"], data_dir=root / "digits"))
    return {"root": root, "export": root / "export", "overrides": overrides, "wheels_error": wheels,
            "training": root / "submissions" / "submission.csv",
            "rerun": _test_side(root / "digits", root / "rerun")}


def _submit_cfg(case: dict, out: Path, *extra: str, data_dir: Path | None = None, export_dir: Path | None = None):
    return compose_cfg(case["root"], case["overrides"] + [
        "stage=submit", f"export.dir={export_dir or case['export']}", f"submit.output={out}", *extra],
        data_dir=data_dir or case["rerun"])


def test_export_holds_the_submitted_ensemble_and_nothing_more(pixels):
    folder = pixels["export"]
    record = json.loads((folder / export.RECORD).read_text())
    blend_json = json.loads((folder / "artifacts" / "blend" / "blend.json").read_text())
    assert (folder / "artifacts" / "blend" / "blend.json").read_bytes() == \
        (pixels["root"] / "artifacts" / "blend" / "blend.json").read_bytes()
    best = blend_json["best"]
    assert sorted(p.name for p in (folder / "artifacts" / "blend").iterdir()) == sorted(["blend.json", f"{best}_state.npz"])
    assert record["preprocessing"] == {"layout": "pixels", "img_size": 28, "channels": 1, "resize": "stretch",
                                       "class_names": [str(i) for i in range(10)], "submission": "label",
                                       "submission_columns": ["ImageId", "Label"], "metric": "accuracy"}
    assert record["members"] == blend_json["members"] == ["cnn_deotte", "mlp"] and record["best"] == best
    # each network: its weights, its settings (config.yaml), the manifest whose sha256 the blend recorded
    nets = sorted(p.parent.relative_to(folder).as_posix() for p in folder.rglob("manifest.json"))
    assert nets == ["artifacts/cnn_deotte/fold0", "artifacts/cnn_deotte/fold1", "artifacts/mlp/fold0", "artifacts/mlp/fold1"]
    for n in record["networks"]:
        d = folder / n["dir"]
        assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "manifest.json", "model.safetensors"]
        assert n["manifest_sha256"] in {e["sha256"] for e in blend_json["manifests"][n["member"]]}
    with np.load(folder / "oof.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["probs"].shape == (400, 2, 10) and z["probs"].dtype == np.float32
        assert z["y"].shape == z["folds"].shape == (400,) and set(np.unique(z["folds"])) == {0, 1}
    # every file is listed with its sha256; the zip holds the same files
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {export.RECORD}
    assert files == set(record["files"])
    with zipfile.ZipFile(folder.with_name("export.zip")) as zf:
        assert set(zf.namelist()) == files | {export.RECORD}
    meta = json.loads((folder / "dataset-metadata.json").read_text())
    assert meta["id"].startswith("INSERT_USERNAME/kfold-stack-") and 6 <= len(meta["title"]) <= 50
    nb = json.loads((folder / "submit.ipynb").read_text())
    assert nb["nbformat"] == 4 and nb["cells"][1]["metadata"]["tags"] == ["parameters"]
    code = "".join(nb["cells"][2]["source"])
    assert "--no-index" in code and code in (folder / "submit.py").read_text()
    compile((folder / "submit.py").read_text(), "submit.py", "exec")
    if pixels["wheels_error"] is None:
        wheels = sorted(p.name.split("-")[0].lower() for p in (folder / "wheels").glob("*.whl"))
        assert wheels == sorted(["kfold_stack", "hydra_core", "omegaconf", "antlr4_python3_runtime",
                                 "hydra_joblib_launcher", "skops", "prettytable", "wcwidth"])
        assert set(record["environment"]["assumed"]) >= {"torch", "timm", "numpy", "pandas", "scikit-learn",
                                                         "pillow", "safetensors"}


def _kaggle_like_python(root: Path, shipped: list[str]) -> tuple[Path, dict]:
    """A fresh venv whose only other packages are this test environment's, minus kfold-stack and
    ``shipped`` (and the Hydra plugins that share their namespace): a stand-in for Kaggle's image.
    The packages are linked into a folder the venv finds through a ``.pth`` line (a venv made
    with ``--system-site-packages`` from a venv would see the system's, not this one's)."""
    import site
    from importlib import metadata

    packages = Path(site.getsitepackages()[0])
    names = {export._normalise(n) for n in ["kfold-stack", "hydra-submitit-launcher", *shipped]}
    hidden = {"hydra_plugins", "__pycache__"}
    for dist in metadata.distributions(path=[str(packages)]):  # this venv's, not the source tree's egg-info
        if export._normalise(dist.metadata["Name"]) in names:
            hidden |= {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}
    assert any(h.startswith("kfold_stack") for h in hidden)
    image = root / "kaggle-image"
    image.mkdir()
    for p in packages.iterdir():
        if p.name not in hidden and not p.name.endswith(".pth"):
            (image / p.name).symlink_to(p)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                              text=True, check=True).stdout.strip()
    Path(site_dir, "kaggle-image.pth").write_text(f"{image}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", TMPDIR=str(root))  # no index, no config
    return py, env


@pytest.mark.slow
def test_offline_install_in_a_fresh_venv_then_submit_writes_the_training_runs_file(pixels, tmp_path):
    """export -> a fresh venv (the test environment's packages stand in for Kaggle's image, without
    kfold-stack and every package the export ships: Hydra, OmegaConf, antlr4, skops, prettytable and
    its wcwidth ...) -> submit.py: pip --no-index from export/wheels, then stage=submit on a folder
    holding only test.csv and sample_submission.csv."""
    if pixels["wheels_error"]:
        pytest.skip(f"the export could not build its dependency wheels here: {pixels['wheels_error']}")
    from pipeline.settings import ExportSettings

    py, env = _kaggle_like_python(tmp_path, export.shipped(list(ExportSettings().image)))
    hidden = subprocess.run([py, "-c", "import hydra"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert hidden.returncode == 1 and "No module named 'hydra'" in hidden.stderr  # pip must install it
    out = tmp_path / "working" / "submission.csv"
    out.parent.mkdir()
    res = subprocess.run([py, str(pixels["export"] / "submit.py"), "--competition", str(pixels["rerun"]),
                          "--output", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    installed = next(ln for ln in res.stdout.splitlines() if ln.startswith("Successfully installed"))
    for name in ("kfold-stack-0.1.0", "hydra-core", "omegaconf", "antlr4-python3-runtime", "skops", "wcwidth"):
        assert name in installed
    where = subprocess.run([py, "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(tmp_path / "venv"))  # the wheel's copy, not the source tree
    assert "identical to the training run's submission.csv" in res.stdout + res.stderr
    assert out.read_bytes() == pixels["training"].read_bytes()


def test_submit_in_process_matches_the_training_run_and_removes_a_stale_file(pixels, tmp_path, caplog):
    out = tmp_path / "submission.csv"
    out.write_text("stale\n")
    with caplog.at_level(logging.INFO):
        outcome = run_stage(_submit_cfg(pixels, out))
    assert outcome.same_as_training and outcome.members == ("cnn_deotte", "mlp") and outcome.plan is None
    assert out.read_bytes() == pixels["training"].read_bytes()
    assert "removed the earlier" in caplog.text


# --------------------------------------------------------------------------- the image layouts


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    """Factory (memoised): a tiny run (mlp, 1 epoch) on the fixture's digits written as an image
    competition with class names, blended and exported without wheels, and its rerun folder."""
    runs: dict = {}

    def make(layout: str, probabilities: bool) -> dict:
        key = (layout, probabilities)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"{layout}{'_probs' if probabilities else ''}")
            digits = data.load_competition(DIGITS)
            comp = write_image_competition(root / "comp", digits.x_train, digits.y_train, digits.x_test, layout,
                                           probabilities=probabilities)
            overrides = TINY + ["ensemble=[mlp]", "train.epochs=1", "aug=none", "data.decode_jobs=1",
                                f"export.dir={root / 'export'}", "export.wheels=false", "export.zip=false"]
            cfg = compose_cfg(root, overrides, data_dir=comp)
            train.run(Workspace.load(cfg))
            blend.run(Workspace.load(cfg))
            run_stage(compose_cfg(root, overrides + ["stage=export"], data_dir=comp))
            runs[key] = {"root": root, "export": root / "export", "overrides": overrides, "comp": comp,
                         "training": root / "submissions" / "submission.csv", "rerun": _test_side(comp, root / "rerun")}
        return runs[key]

    return make


@pytest.mark.parametrize("layout, probabilities", [("files", False), ("folders", False), ("files", True)])
def test_submit_on_each_image_layout_writes_the_training_runs_file(image_runs, layout, probabilities, tmp_path):
    case = image_runs(layout, probabilities)
    assert not (case["rerun"] / "train").exists() and not (case["rerun"] / "train.csv").exists()
    out = tmp_path / "submission.csv"
    outcome = run_stage(_submit_cfg(case, out))
    assert outcome.same_as_training
    assert out.read_bytes() == case["training"].read_bytes()
    sub = pd.read_csv(out, dtype=str)
    sample = pd.read_csv(case["rerun"] / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns) and list(sub.iloc[:, 0]) == list(sample.iloc[:, 0])
    if probabilities:
        np.testing.assert_allclose(sub[DIGIT_NAMES].astype(float).sum(axis=1), 1, atol=1e-6)
    else:
        assert set(sub["label"]) <= set(DIGIT_NAMES)


def test_an_undecodable_test_image_is_one_line_or_with_default_row_the_samples_row(image_runs, tmp_path, caplog):
    case = image_runs("files", False)
    rerun = _test_side(case["comp"], tmp_path / "rerun")
    broken = rerun / "test" / "te00007.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "submission.csv"
    with pytest.raises(DataError, match=rf"^{broken}: cannot read it as an image \(UnidentifiedImageError\)$"):
        run_stage(_submit_cfg(case, out, data_dir=rerun))
    assert not out.exists()
    with caplog.at_level(logging.INFO):
        outcome = run_stage(_submit_cfg(case, out, "submit.default_row=true", data_dir=rerun))
    assert outcome.default_rows == 1 and "1 test image(s) did not decode" in caplog.text and str(broken) in caplog.text
    sub, training = pd.read_csv(out, dtype=str), pd.read_csv(case["training"], dtype=str)
    sample = pd.read_csv(rerun / "sample_submission.csv", dtype=str)
    assert list(sub.iloc[7]) == list(sample.iloc[7])  # the sample's own row
    others = np.arange(len(sub)) != 7
    assert (sub[others].to_numpy() == training[others].to_numpy()).all()


# --------------------------------------------------------------------------- budget


def test_choose_members_leaves_out_the_least_valuable_first():
    secs = {"a": 10.0, "b": 10.0, "c": 10.0}
    assert submit.choose_members(secs, {"a": 0.3, "b": 0.1, "c": 0.2}, 30) == (["a", "b", "c"], [])
    assert submit.choose_members(secs, {"a": 0.3, "b": 0.1, "c": 0.2}, 25) == (["a", "c"], ["b"])
    assert submit.choose_members(secs, {"a": 0.3, "b": 0.1, "c": 0.2}, 12) == (["a"], ["b", "c"])
    assert submit.choose_members(secs, {"a": 0.3, "b": 0.1, "c": 0.2}, 1) == (["a"], ["b", "c"])  # never none
    # equal value: the slower goes first
    assert submit.choose_members({"a": 5.0, "b": 20.0}, {}, 10) == (["a"], ["b"])


def test_a_budget_too_small_for_every_member_leaves_out_the_least_valuable(pixels, tmp_path, monkeypatch, caplog):
    """Each member is 'timed' at 500 s (here, so that the test does not depend on this machine's
    speed): with budget=1000 s (60 s reserve) one fits; the member of least marginal value in the
    blend is left out, the blend refitted on the other's OOF, and the log says what was given up."""
    from pipeline.blend import store
    from pipeline.workspace import Workspace

    calls = []

    def fake(ens, label, images, device, runtime):
        calls.append(label)
        return submit.MemberCost(label, 2, 500.0 / 2 / len(images), len(images))

    monkeypatch.setattr(submit, "estimate_seconds", fake)
    saved = export.read(pixels["export"], Paths.from_cfg(compose_cfg(pixels["root"], pixels["overrides"]))).saved
    values = store.marginal_values(saved.typed, "accuracy")
    least = min(values, key=values.get)
    kept = [m for m in saved.members if m != least]
    out = tmp_path / "submission.csv"
    with caplog.at_level(logging.INFO):
        outcome = run_stage(_submit_cfg(pixels, out, "budget=1000"))
    assert calls == saved.members and outcome.members == tuple(kept) and outcome.plan.dropped == (least,)
    assert f"left out {least} (marginal value {values[least]:+.5f})" in caplog.text and "given up" in caplog.text
    # the refitted blend of the remaining member: its own (fold-averaged) test probabilities decide
    ws = Workspace.load(compose_cfg(pixels["root"], TRAINED, data_dir=pixels["root"] / "digits"))
    labels = pd.read_csv(out)["Label"].to_numpy()
    np.testing.assert_array_equal(labels, ws.predictions(kept[0]).test.argmax(1))
    # a budget that no member fits: one line naming the budget that would
    with pytest.raises(ConfigError, match=r"^budget=1.7 min: too small; \w+ alone needs about .* expected budget >= \d+m$"):
        run_stage(_submit_cfg(pixels, out, "budget=100"))
    assert not out.exists()


# --------------------------------------------------------------------------- bad input


def test_export_refuses_without_a_blend_or_with_a_member_file_that_does_not_match(pixels, tmp_path, capsys):
    from conftest import command_error

    root = tmp_path / "run"
    for name in ("artifacts", "folds", "digits"):
        shutil.copytree(pixels["root"] / name, root / name)
    args = [*TRAINED, "stage=export", f"paths.root={root}", f"data.dir={root / 'digits'}", "export.wheels=false"]
    ckpt = root / "artifacts" / "mlp" / "fold1" / "model.safetensors"
    ckpt.unlink()
    assert command_error(capsys, *args) == (2, [f"error: mlp fold 1: missing {ckpt}"])
    assert not (root / "export").exists() and not (root / "export.zip").exists()
    shutil.copy2(pixels["root"] / "artifacts" / "mlp" / "fold1" / "model.safetensors", ckpt)
    config = root / "artifacts" / "cnn_deotte" / "fold0" / "config.yaml"
    config.write_text(config.read_text() + "# edited\n")
    with pytest.raises(ArtifactError, match=rf"^cnn_deotte fold 0: {config} does not match its checksum"):
        run_stage(compose_cfg(root, TRAINED + ["stage=export", "export.wheels=false"], data_dir=root / "digits"))
    shutil.rmtree(root / "artifacts" / "blend")
    with pytest.raises(ArtifactError, match=r"blend.json: no blend yet \(run: python run.py stage=blend\)$"):
        run_stage(compose_cfg(root, TRAINED + ["stage=export", "export.wheels=false"], data_dir=root / "digits"))
    assert not (root / "export").exists()


def _export_copy(pixels: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(pixels["export"], dst, ignore=shutil.ignore_patterns("wheels"))
    return dst


def test_submit_refuses_a_tampered_blend_json_in_one_line(pixels, tmp_path, capsys):
    from conftest import command_error

    copy = _export_copy(pixels, tmp_path)
    path = copy / "artifacts" / "blend" / "blend.json"
    record = json.loads(path.read_text())
    record["methods"][record["best"]]["member_weights"] = [0.5, 0.5]
    path.write_text(json.dumps(record))
    out = tmp_path / "submission.csv"
    out.write_text("stale\n")
    assert command_error(capsys, *TRAINED, "stage=submit", f"export.dir={copy}", f"data.dir={pixels['rerun']}",
                         f"submit.output={out}", f"paths.root={tmp_path}") == (2, [
        f"error: {path}: does not match its sha256 in kfold_export.json (modified after the export?); run: python "
        f"run.py stage=export, and upload the whole folder"])
    assert not out.exists()


def test_submit_refuses_a_missing_member_file(pixels, tmp_path):
    copy = _export_copy(pixels, tmp_path)
    ckpt = copy / "artifacts" / "cnn_deotte" / "fold1" / "model.safetensors"
    ckpt.unlink()
    out = tmp_path / "submission.csv"
    with pytest.raises(ArtifactError, match=rf"^{ckpt}: missing from the export \(run: python run.py stage=export"):
        run_stage(_submit_cfg(pixels, out, export_dir=copy))
    assert not out.exists()
    with pytest.raises(ArtifactError, match=r"no kfold_export.json here"):
        run_stage(_submit_cfg(pixels, out, export_dir=tmp_path))


def test_submit_refuses_sample_ids_that_do_not_match_the_test_files(pixels, image_runs, tmp_path):
    out = tmp_path / "submission.csv"
    # pixels: a sample_submission.csv one row short of test.csv
    rerun = _test_side(pixels["rerun"], tmp_path / "pixels")
    sample = rerun / "sample_submission.csv"
    sample.write_text("\n".join(sample.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match=rf"^{sample}: 118 rows, expected 119 \(one per test.csv row\)$"):
        run_stage(_submit_cfg(pixels, out, data_dir=rerun))
    # files: an id with no image, and an image with no row
    case = image_runs("files", False)
    rerun = _test_side(case["comp"], tmp_path / "files")
    sample = rerun / "sample_submission.csv"
    sample.write_text(sample.read_text().replace("te00003,", "te99999,"))
    with pytest.raises(DataError, match=r"sample_submission.csv line 5, column id: id 'te99999' has no image in .*test"):
        run_stage(_submit_cfg(case, out, data_dir=rerun))
    assert not out.exists()


def test_submit_refuses_test_images_of_another_size(pixels, tmp_path):
    rerun = tmp_path / "big"
    rerun.mkdir()
    shutil.copy2(pixels["rerun"] / "sample_submission.csv", rerun)
    pd.DataFrame(np.zeros((119, 32 * 32), np.int64), columns=[f"pixel{i}" for i in range(32 * 32)]).to_csv(
        rerun / "test.csv", index=False)
    out = tmp_path / "submission.csv"
    with pytest.raises(DataError, match=rf"^{rerun / 'test.csv'}: images are 32x32x1, expected 28x28x1 like the "
                                        r"training run's$"):
        run_stage(_submit_cfg(pixels, out, data_dir=rerun))
    with pytest.raises(ConfigError, match=r"^data.dir=.*nowhere does not exist"):
        run_stage(_submit_cfg(pixels, out, data_dir=tmp_path / "nowhere"))
    assert not out.exists()


def test_dependency_wheels_not_installed_or_not_fetchable_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^export.dependencies: 'no-such-package' is not installed here"):
        export.dependency_wheels(["no-such-package"], tmp_path / "out", tmp_path / "cache")
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for hydra-core==1.3.8\n")
    monkeypatch.setattr(export.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ArtifactError, match=r"^export: wheels of hydra-core==[\d.]+ \(offline\? put them in .*cache\): "
                                            r"pip failed \(ERROR: No matching distribution found"):
        export.dependency_wheels(["hydra-core"], tmp_path / "out", tmp_path / "cache")


def test_the_export_ships_the_closure_of_what_the_image_lacks():
    """The wheels shipped are kfold-stack's requirements walked transitively up to what the
    declared image provides: prettytable's wcwidth is among them (an image may lack it), no
    package of the image is, nor anything only an image package requires (timm's torchvision)."""
    from packaging.requirements import Requirement

    from pipeline.settings import ExportSettings

    image = list(ExportSettings().image)
    names = {export._normalise(n) for n in export.shipped(image)}
    assert {"hydra_core", "omegaconf", "antlr4_python3_runtime", "skops", "prettytable", "wcwidth"} <= names
    assert not names & {export._normalise(Requirement(r).name) for r in image}
    assert "torchvision" not in names and "kfold_stack" not in names
    assert "wcwidth" not in {export._normalise(n) for n in export.shipped(image + ["wcwidth>=0.2"])}
