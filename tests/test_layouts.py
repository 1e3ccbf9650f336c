"""Any Kaggle image competition: the files and folders layouts on real images (the fixture's MNIST
rows as PNG files with class names, scikit-image's colour photographs), string labels, the
probabilities submission, the ROC AUC metric, zips, pretrained weights from a file, bad layouts."""

from __future__ import annotations

import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import DIGITS, REPO, TINY, compose_cfg
from pipeline import blend, data, train
from pipeline.data import Layout, SubmissionKind
from pipeline.errors import ConfigError, DataError
from pipeline.workspace import Workspace

sys.path.insert(0, str(REPO / "benchmarks"))
from make_image_competition import DIGIT_NAMES, write_image_competition  # noqa: E402
from pipeline.runsettings import run_settings


@pytest.fixture(scope="module")
def digits():
    return data.load_competition(DIGITS)


def _write(tmp_path, digits, layout, **kw):
    return write_image_competition(tmp_path / layout, digits.x_train, digits.y_train, digits.x_test,
                                   layout, **kw)


@pytest.mark.parametrize("layout", ["files", "folders"])
def test_image_layouts_load_the_real_digits_with_their_names(tmp_path, digits, layout):
    d = _write(tmp_path, digits, layout)
    comp = data.load_competition(d, tmp_path / "cache")
    assert comp.layout is Layout(layout) and comp.submission is SubmissionKind.label
    assert comp.class_names == sorted(DIGIT_NAMES) and comp.channels == 1 and comp.side == 28
    names = np.array(comp.class_names)[comp.y_train]
    if layout == "files":  # the CSV's row order is kept: the very same images and labels
        np.testing.assert_array_equal(comp.x_train, digits.x_train)
        np.testing.assert_array_equal(names, np.array(DIGIT_NAMES)[digits.y_train])
    else:  # class folders: every image is there, each under its own class
        assert sorted(map(bytes, comp.x_train.reshape(400, -1))) == sorted(map(bytes, digits.x_train.reshape(400, -1)))
        for img, name in zip(comp.x_train[:50], names[:50]):
            i = next(j for j in range(400) if np.array_equal(digits.x_train[j], img))
            assert DIGIT_NAMES[digits.y_train[i]] == name
    np.testing.assert_array_equal(comp.x_test, digits.x_test)  # sample_submission.csv's order
    again = data.load_competition(d, tmp_path / "cache")  # the cache: memory-mapped, same data
    assert isinstance(again.x_train, np.memmap) and again.fingerprint == comp.fingerprint
    assert again.class_names == comp.class_names and list(again.test_ids) == list(comp.test_ids)
    # the screening's subsample at another side: those rows alone, as the whole competition decodes them
    rows = np.array([5, 0, 399, 17])
    whole = data.load_competition(d, tmp_path / "cache14", img_size=14)
    np.testing.assert_array_equal(data.decode_train_rows(d, rows, 14, 1), whole.x_train[rows])


def test_files_layout_end_to_end_writes_the_class_names(tmp_path, digits):
    d = _write(tmp_path, digits, "files")
    cfg = compose_cfg(tmp_path, TINY + ["ensemble=[mlp]", "train.epochs=6", "aug=none",
                                        "blend.method=mean"], data_dir=d)
    train.run(Workspace.load(cfg))
    out = blend.run(Workspace.load(cfg))
    assert out.blends[out.best].score.accuracy > 0.5
    sub = pd.read_csv(tmp_path / "submissions" / "submission.csv")
    assert list(sub.columns) == ["id", "label"] and len(sub) == 119
    assert set(sub["label"]) <= set(DIGIT_NAMES) and list(sub["id"]) == [f"te{i:05d}" for i in range(119)]
    # stage=predict on the competition's own test files: converted as the data layer converts
    # them, so it gives exactly the submitted labels, by name
    from pipeline import predict

    results = predict.run(Workspace(run_settings(compose_cfg(tmp_path, TINY + ["ensemble=[mlp]", "train.epochs=6", "aug=none",
                                                        "blend.method=mean", f"input={d / 'test'}"], data_dir=d))))
    assert [r["label"] for r in results] == list(sub["label"])


def test_probabilities_submission_follows_the_sample_header(tmp_path, digits):
    d = _write(tmp_path, digits, "files", probabilities=True)
    cfg = compose_cfg(tmp_path, TINY + ["ensemble=[mlp]", "train.epochs=2", "blend.method=mean"], data_dir=d)
    train.run(Workspace.load(cfg))
    blend.run(Workspace.load(cfg))
    sub = pd.read_csv(tmp_path / "submissions" / "submission.csv")
    assert list(sub.columns) == ["id", *DIGIT_NAMES]  # the sample's order, not the sorted one
    probs = sub[DIGIT_NAMES].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    saved = np.load(tmp_path / "artifacts" / "blend" / "mean_test.npy")  # columns: sorted names
    order = [sorted(DIGIT_NAMES).index(n) for n in DIGIT_NAMES]
    np.testing.assert_allclose(probs, saved[:, order], atol=1e-6)


def test_roc_auc_metric_on_a_binary_competition(tmp_path, digits):
    """Real digits labelled by parity ("even"/"odd"): ROC AUC scores the members and blends and
    picks the submission; on the 10-class digits it is a one-line config error."""
    parity = ["even", "odd"]
    d = write_image_competition(tmp_path / "parity", digits.x_train, digits.y_train % 2, digits.x_test,
                                "files", names=parity)
    cfg = compose_cfg(tmp_path, TINY + ["ensemble=[mlp]", "train.epochs=6", "aug=none",
                                        "data.metric=roc_auc"], data_dir=d)
    train.run(Workspace.load(cfg))
    out = blend.run(Workspace.load(cfg))
    auc = {m: r.score.roc_auc for m, r in out.blends.items()}
    assert all(0.7 < a <= 1 for a in auc.values())  # parity of real digits is learnable
    assert out.best == max(auc, key=auc.get)
    with pytest.raises(ConfigError, match="data.metric=roc_auc: needs a binary competition; this one has 10"):
        Workspace.load(compose_cfg(tmp_path / "x", TINY + ["data.metric=roc_auc"], data_dir=DIGITS))


def test_zip_download_is_unpacked_once(tmp_path, digits):
    d = _write(tmp_path, digits, "folders")
    zpath = tmp_path / "digit-folders.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(d))
    cfg = compose_cfg(tmp_path / "run", TINY, data_dir=zpath)
    comp = Workspace(run_settings(cfg)).comp
    assert comp.layout is Layout.folders and len(comp.x_train) == 400
    unpacked = list((tmp_path / "run" / "data" / "cache").glob("unzipped-digit-folders-*"))
    assert len(unpacked) == 1 and (unpacked[0] / ".unpacked").exists()
    stamp = (unpacked[0] / ".unpacked").stat().st_mtime_ns
    Workspace(run_settings(cfg)).comp
    assert (unpacked[0] / ".unpacked").stat().st_mtime_ns == stamp  # not unpacked again


def _photos(n_crops: int = 4) -> tuple[list[np.ndarray], list[str]]:
    """Real colour photographs shipped with scikit-image, cut into crops of varied size."""
    skdata = pytest.importorskip("skimage.data")
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, photo in (("animal", skdata.chelsea()), ("object", skdata.coffee()),
                         ("person", skdata.astronaut()), ("object", skdata.rocket())):
        h, w = photo.shape[:2]
        for _ in range(n_crops):
            ch, cw = int(rng.integers(h // 3, h // 2)), int(rng.integers(w // 3, w // 2))
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            images.append(photo[y:y + ch, x:x + cw])
            labels.append(label)
    return images, labels


def test_rgb_photographs_of_varied_size_in_class_folders(tmp_path):
    images, labels = _photos()
    for i, (img, lab) in enumerate(zip(images, labels)):
        (tmp_path / "c" / "train" / lab).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "c" / "train" / lab / f"{i}.jpg", quality=95)
    (tmp_path / "c" / "test").mkdir()
    for i in range(3):
        Image.fromarray(images[i * 5]).save(tmp_path / "c" / "test" / f"t{i}.png")
    pd.DataFrame({"file": [f"t{i}.png" for i in range(3)], "label": "animal"}).to_csv(
        tmp_path / "c" / "sample_submission.csv", index=False)
    comp = data.load_competition(tmp_path / "c", None, max_img_size=48, resize="pad")
    assert comp.channels == 3 and comp.side == 48 and comp.x_train.shape == (16, 3, 48, 48)
    assert comp.class_names == ["animal", "object", "person"] and np.bincount(comp.y_train).tolist() == [4, 8, 4]
    assert comp.x_train.std() > 20  # real photographs, not blank
    cfg = compose_cfg(tmp_path, TINY + ["ensemble=[resnet_timm]", "train.epochs=1", "train.batch_size=4",
                                        "aug.hflip=0.5", "aug.brightness=0.2", "aug.saturation=0.2",
                                        "data.max_img_size=48", "data.resize=pad"], data_dir=tmp_path / "c")
    [o0, o1] = train.run(Workspace.load(cfg))
    assert o0.metrics["n_train"] + o0.metrics["n_val"] == 16


def _broken(tmp_path, digits, layout, edit):
    d = _write(tmp_path, digits, layout)
    edit(d)
    return d


@pytest.mark.parametrize("layout, edit, message", [
    ("files", lambda d: (d / "train" / "tr00003.png").unlink(),
     r"train.csv line 5, column id: id 'tr00003' has no image in .*train"),
    ("files", lambda d: Image.new("L", (28, 28)).save(d / "train" / "stray.png"),
     r"train/stray.png: no row in train.csv"),
    ("files", lambda d: (d / "train.csv").write_text((d / "train.csv").read_text().replace("tr00002", "tr00001")),
     r"train.csv line 4, column id: duplicated id 'tr00001'"),
    ("files", lambda d: (d / "train" / "tr00007.png").write_bytes(b"not an image"),
     r"train/tr00007.png: cannot read it as an image"),
    ("files", lambda d: pd.read_csv(d / "train.csv").assign(extra=1).to_csv(d / "train.csv", index=False),
     r"train.csv line 1: cannot tell the label column among label, extra; set data.label_column"),
    ("folders", lambda d: (d / "train" / "ten").mkdir(), r"train/ten: empty class folder"),
    ("folders", lambda d: (d / "test" / "00004.png").unlink(),
     r"sample_submission.csv line 6, column file: id '00004.png' has no image"),
])
def test_bad_layouts_are_one_line_naming_the_file(tmp_path, digits, layout, edit, message):
    d = _broken(tmp_path, digits, layout, edit)
    with pytest.raises(DataError, match=message):
        data.load_competition(d, tmp_path / "cache")


def test_a_decompression_bomb_header_is_one_line_and_exit_2(tmp_path, digits, capsys):
    """An image whose header claims more pixels than Pillow's decompression-bomb limit stops the
    header scan (which sizes the images) with one line naming the file, exit 2, nothing cached."""
    from conftest import command_error

    def bomb(d):  # 16384 x 11000 1-bit pixels: 180 M, over twice Pillow's 89 M limit, 24 kB as PNG
        Image.new("1", (16384, 11000)).save(d / "train" / "tr00005.png")

    d = _broken(tmp_path, digits, "files", bomb)
    with pytest.raises(DataError, match=r"train/tr00005.png: its header claims 180,224,000 pixels, more than "
                                        r"Pillow's decompression-bomb limit \(178,956,970\): expected a real image"):
        data.load_competition(d, tmp_path / "cache")
    code, err = command_error(capsys, "stage=data", f"paths.root={tmp_path}", f"data.dir={d}")
    assert code == 2 and len(err) == 1 and "tr00005.png: its header claims 180,224,000 pixels" in err[0], err
    assert not any((tmp_path / "data" / "cache").glob("**/*.npy"))


def test_bad_layout_exits_2_with_one_line(tmp_path, digits, capsys):
    from conftest import command_error

    d = _broken(tmp_path, digits, "folders", lambda d: (d / "train" / "ten").mkdir())
    code, err = command_error(capsys, "stage=data", f"paths.root={tmp_path}", f"data.dir={d}")
    assert code == 2 and err == [f"error: {d / 'train' / 'ten'}: empty class folder (no .png, .jpg, .jpeg, .tif images)"]


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    """``kwargs.pretrained_file``: timm loads those weights (no hub), adapts the stem to the
    channels, drops the 1000-class head, and the model normalises its input with ImageNet's
    statistics; a missing file is a one-line config error."""
    import timm
    from safetensors.torch import save_file

    from pipeline.models import Normalize, create_model

    kw = dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    src = timm.create_model("resnet18", num_classes=1000, **kw)
    path = tmp_path / "resnet18_imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    for arch, size, chans in (("timm_backbone", 64, 3), ("resnet_timm", 96, 1)):
        model = create_model(arch, 5, chans, size, timm_name="resnet18", pretrained_file=str(path), **kw)
        norm, net = model.norm, model.net
        assert isinstance(norm, Normalize) and norm.mean.shape == (1, chans, 1, 1)
        assert torch.equal(net.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
        expect = src.conv1.weight if chans == 3 else src.conv1.weight.sum(1, keepdim=True)
        assert torch.allclose(net.conv1.weight, expect)
        assert model(torch.rand(2, chans, size, size)).shape == (2, 5)
    with pytest.raises(ConfigError, match="pretrained_file=.*nowhere.safetensors: file not found"):
        create_model("timm_backbone", 5, 3, 64, pretrained_file=str(tmp_path / "nowhere.safetensors"))
    small = create_model("resnet_timm", 5, 3, 32, **kw)  # below 64 px: the small-input stem
    assert small.conv1.stride == (1, 1) and small(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_a_fold_of_a_memory_mapped_set_is_read_row_by_row(tmp_path, digits):
    """aug.backend=albumentations serves a fold's rows from the memory-mapped cache itself (no
    copy of the set), so a competition larger than RAM trains; the batches are the real rows."""
    from pipeline.settings import AugSettings
    from pipeline.train.batches import TrainingSet, make_batches

    d = _write(tmp_path, digits, "files")
    data.load_competition(d, tmp_path / "cache")
    comp = data.load_competition(d, tmp_path / "cache")  # from the cache: memory maps
    assert isinstance(comp.x_train, np.memmap)
    rows = np.arange(0, 400, 2)
    batches = make_batches(TrainingSet(comp.x_train, comp.y_train, rows), 50, torch.device("cpu"),
                           AugSettings(backend="albumentations"), seed=0)
    assert batches.dataset.images is comp.x_train and len(batches.dataset) == 200
    xb, yb = next(iter(batches))
    assert xb.shape == (50, 1, 28, 28) and set(yb.tolist()) <= set(comp.y_train[rows].tolist())
    x0, y0 = batches.dataset[3]
    np.testing.assert_array_equal(x0.numpy(), comp.x_train[6] / np.float32(255))
    assert int(y0) == comp.y_train[6]


def test_a_killed_decode_resumes_where_it_stopped(tmp_path, digits, monkeypatch, caplog):
    """The decode into the cache is recorded chunk by chunk: killed after its first chunk (here a
    chunk of 40 of the fixture's 120 real digit PNGs), the next decode continues at image 40 and
    gives the same array as one uninterrupted decode; the images/s bar counts images."""
    import logging

    from pipeline.data import images

    folder = tmp_path / "pngs"
    folder.mkdir()
    files = []
    for i in range(120):
        files.append(folder / f"{i:03d}.png")
        Image.fromarray(digits.x_train[i, 0]).save(files[-1])
    monkeypatch.setattr(images, "CHUNK", 40)
    decoded, real = [], images._decode

    def killed_after_one_chunk(paths, *args):
        if decoded:
            raise KeyboardInterrupt("killed")
        decoded.append(len(paths))
        return real(paths, *args)

    out = tmp_path / "cache" / "x_train.npy"
    monkeypatch.setattr(images, "_decode", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        images.decode_to(out, files, 28, 1, "stretch", 1, "decode")
    assert not out.exists() and (out.parent / ".x_train.npy.partial").exists()

    def counted(paths, *args):
        decoded.append(len(paths))
        return real(paths, *args)

    monkeypatch.setattr(images, "_decode", counted)
    with caplog.at_level(logging.INFO, logger="pipeline.data.images"):
        x = images.decode_to(out, files, 28, 1, "stretch", 1, "decode")
    assert "resuming the decode of x_train.npy at image 40 of 120" in caplog.text
    assert decoded == [40, 40, 40]  # the first chunk once, then the two left
    np.testing.assert_array_equal(x, images.decode_to(None, files, 28, 1, "stretch", 1, "decode"))
    np.testing.assert_array_equal(x, digits.x_train[:120])
    assert sorted(p.name for p in out.parent.iterdir()) == [".x_train.npy.lock", "x_train.npy"]
