"""Never lose a fold: kill -9 and resume, manifests with checksums, stale and corrupt artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, fit, trained
from pipeline import blend, train
from pipeline.errors import ArtifactError
from pipeline.paths import MEMBER_FILES, MANIFEST, OOF, RESUME, TEST, Paths
from pipeline.members import MemberKey, MemberStatus
from pipeline.train.scheduler import Outcome
from pipeline.workspace import Workspace
from pipeline.runsettings import run_settings

# cnn_deotte (BN, dropout, batched elastic + affine augmentation) on the fixture, CPU, exact mode
RESUME_RUN = TINY + ["ensemble=[cnn_deotte]", "runtime.deterministic=true", "train.epochs=12",
                     "models.cnn_deotte.train.epochs=12", "blend.method=mean"]


@pytest.mark.slow
def test_kill_9_mid_fold_then_resume_matches_uninterrupted(tmp_path, digits_dir, tiny_cfg):
    """A real training subprocess is killed (SIGKILL) right after an end-of-epoch checkpoint of
    fold 0; re-running the same command continues from it and ends with the OOF and test
    probabilities (to 1e-6) and the submission of an uninterrupted run."""
    from conftest import compose_cfg

    # the uninterrupted reference, in its own root
    ref_root = tmp_path / "ref"
    ref_cfg = compose_cfg(ref_root, RESUME_RUN, data_dir=digits_dir)
    train.run(Workspace.load(ref_cfg))
    blend.run(Workspace.load(ref_cfg))

    root = tmp_path / "run"
    args = [sys.executable, str(REPO / "run.py"), "stage=train", f"paths.root={root}",
            f"data.dir={digits_dir}", *RESUME_RUN]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    resume = root / "artifacts" / "cnn_deotte" / "fold0" / RESUME
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if resume.exists():
            try:
                epoch = torch.load(resume, weights_only=True)["epoch"]
            except Exception:  # caught mid-rename
                continue
            if epoch >= 2:
                break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert resume.exists(), "the subprocess finished fold 0 before it could be killed"
    killed_after = torch.load(resume, weights_only=True)["epoch"]
    assert 2 <= killed_after < 12

    cfg = compose_cfg(root, RESUME_RUN, data_dir=digits_dir)
    done = trained(train.run(Workspace.load(cfg)))  # the same command again, no flag
    assert done[("cnn_deotte", 0)]["resumed_after_epoch"] == killed_after
    assert not resume.exists()  # removed once the fold completed
    blend.run(Workspace.load(cfg))

    ref_paths, paths = Paths.from_cfg(ref_cfg), Paths.from_cfg(cfg)
    for f in (0, 1):
        with np.load(ref_paths.member_dir("cnn_deotte", f) / OOF) as a, \
                np.load(paths.member_dir("cnn_deotte", f) / OOF) as b:
            assert np.array_equal(a["row_ids"], b["row_ids"])
            np.testing.assert_allclose(b["probs"], a["probs"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.load(paths.member_dir("cnn_deotte", f) / TEST),
                                   np.load(ref_paths.member_dir("cnn_deotte", f) / TEST), atol=1e-6, rtol=0)
    assert (paths.submissions_dir / "submission.csv").read_bytes() == \
        (ref_paths.submissions_dir / "submission.csv").read_bytes()


def _train_mlp(tiny_cfg, *extra):
    cfg = tiny_cfg("ensemble=[mlp]", "blend.method=mean", *extra)
    train.run(Workspace.load(cfg))
    return cfg, Paths.from_cfg(cfg)


def test_manifest_lists_every_file_with_its_checksum(tiny_cfg):
    cfg, paths = _train_mlp(tiny_cfg)
    d = paths.member_dir("mlp", 0)
    manifest = json.loads((d / MANIFEST).read_text())["files"]
    assert set(manifest) == set(MEMBER_FILES) - {MANIFEST}
    assert manifest[OOF]["bytes"] == (d / OOF).stat().st_size and len(manifest[OOF]["sha256"]) == 64
    assert not (d / RESUME).exists()


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / OOF).write_bytes((d / OOF).read_bytes()[:100]), "oof.npz does not match its checksum"),
    (lambda d: np.save(d / TEST, np.zeros((3, 10), np.float32)), "test.npy does not match its checksum"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is unreadable"),
    (lambda d: (d / MANIFEST).unlink(), "missing manifest.json"),
])
def test_corrupted_member_is_refused_by_blend_and_retrained(tiny_cfg, damage, reason):
    cfg, paths = _train_mlp(tiny_cfg)
    d = paths.member_dir("mlp", 1)
    damage(d)
    with pytest.raises(ArtifactError, match=f"mlp fold 1: .*{reason}"):
        blend.run(Workspace.load(cfg))
    outcomes = {o.key.fold: o for o in train.run(Workspace.load(cfg))}
    assert outcomes[0].outcome is Outcome.CACHED  # only the damaged member is trained again
    assert outcomes[1].outcome in (Outcome.RETRAINED, Outcome.TRAINED) and reason in outcomes[1].reason
    assert Workspace.load(cfg).verify(MemberKey("mlp", 1)).status is MemberStatus.OK
    blend.run(Workspace.load(cfg))


def test_edited_folds_file_makes_every_fold_stale(tiny_cfg):
    """Hand-editing the folds file (a different but valid assignment) changes the cache key."""
    cfg, paths = _train_mlp(tiny_cfg)
    folds_file = paths.folds_file(2, 42, Workspace(run_settings(cfg)).comp.fingerprint)
    lines = folds_file.read_text().splitlines()
    rows = [ln.split(",") for ln in lines[1:]]
    # swap the folds of two rows with the same label: still stratified, still k=2
    a = next(i for i, r in enumerate(rows) if r[2] == "0")
    b = next(i for i, r in enumerate(rows) if r[2] == "1" and r[1] == rows[a][1])
    rows[a][2], rows[b][2] = rows[b][2], rows[a][2]
    folds_file.write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    with pytest.raises(ArtifactError, match=r"mlp fold 0: stale: config changed \(folds\)"):
        blend.run(Workspace.load(cfg))
    outcomes = train.run(Workspace.load(cfg))
    assert [o.outcome for o in outcomes] == [Outcome.RETRAINED] * 2
    assert {o.reason for o in outcomes} == {"config changed (folds)"}


def test_resume_checkpoint_of_other_settings_is_ignored(tiny_cfg, caplog):
    cfg = tiny_cfg("model=mlp", "fold=0")
    resume = Paths.from_cfg(cfg).member_dir("mlp", 0) / RESUME
    fit(cfg, "mlp", 0, resume_path=resume, predict_test=False)
    state = torch.load(resume, weights_only=True)  # tensors and plain data only
    assert state["epoch"] == 2 and state["seconds"] > 0
    other = tiny_cfg("model=mlp", "fold=0", "train.lr=0.01")
    res = fit(other, "mlp", 0, resume_path=resume, predict_test=False)
    assert "written for other settings; starting over" in caplog.text
    assert res.metrics["resumed_after_epoch"] is None
    # the same settings: resumes after the last epoch, trains nothing more, predicts again, and
    # the seconds include the training before the resume
    before = torch.load(resume, weights_only=True)["seconds"]
    res = fit(other, "mlp", 0, resume_path=resume, predict_test=False)
    assert res.metrics["resumed_after_epoch"] == 2 and len(res.metrics["history"]) == 2
    assert res.metrics["seconds"] >= before
    resume.write_bytes(b"garbage")
    caplog.clear()
    res = fit(other, "mlp", 0, resume_path=resume, predict_test=False)
    assert "ignoring unreadable" in caplog.text and res.metrics["resumed_after_epoch"] is None


class _Payload:
    """A pickle that creates a file when it is unpickled: what a hostile artifact would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickles_in_artifacts_never_run(tiny_cfg, tmp_path, caplog):
    """A pickle planted as a resume checkpoint, a checkpoint or a blender state is refused
    with a message; the code in it never runs (its marker file is never created)."""
    import pickle

    from pipeline import predict

    cfg, paths = _train_mlp(tiny_cfg)
    blend.run(Workspace.load(cfg))
    marker = tmp_path / "pwned"
    resume = paths.member_dir("mlp", 0) / RESUME
    torch.save({"cache_key": "x", "payload": _Payload(marker)}, resume)
    res = fit(cfg, "mlp", 0, resume_path=resume, predict_test=False)
    assert res.metrics["resumed_after_epoch"] is None and "ignoring unreadable" in caplog.text
    ckpt = paths.member_dir("mlp", 1) / "model.safetensors"
    ckpt.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ArtifactError, match=r"mlp fold 1: .*model.safetensors does not match its checksum"):
        predict.ensemble_probabilities(run_settings(cfg), Workspace.load(cfg).comp.x_test)
    from pipeline.members import load_model
    with pytest.raises(ArtifactError, match="cannot load the checkpoint"):
        load_model(ckpt.parent)
    state = paths.blend_dir / "mean_state.npz"
    np.savez(state, n_members=np.array([_Payload(marker)], dtype=object))
    from pipeline.blend import store
    with pytest.raises(ArtifactError, match="unreadable blender state"):
        store.load(paths).blender()
    assert not marker.exists()
