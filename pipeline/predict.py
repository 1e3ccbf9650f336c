"""Stage ``predict``: the submitted ensemble on your own images.

    python run.py stage=predict input=my_digit.png
    python run.py stage=predict input=my_digits/ predict.output=my_predictions.csv

Runs exactly what produced ``submission.csv``: the saved blend (:mod:`pipeline.blend.store`)
names its members, its folds and the manifest of every member it was built from; each member's
checkpoint is verified against that record (a model retrained since the blend is refused), its
probabilities computed as for the test set and fold-averaged, then the submitted blender object
itself (mean, weights, or the fitted meta-learner) is applied. Labels are the competition's class
names. For a digit competition (``pixels`` layout, 1 channel; ``predict.preprocess=auto`` or
``mnist``) each image is first brought to the MNIST convention (LeCun et al., "Gradient-based
learning applied to document recognition", 1998; the MNIST page): grayscale, white ink on black
(inverted when the background is light), cropped to the ink, scaled to fit a 20 x 20 box
(aspect kept, anti-aliased), placed in 28 x 28 with its centre of mass at the centre. Otherwise
(``resize``) it is converted and resized exactly as the competition's own images were
(:func:`pipeline.data.to_array`, with the blend's side, channels and ``data.resize``).

The members' part (:func:`networks`, :func:`load_network`, :func:`member_probabilities`,
:func:`seconds_per_image`) is the one way a saved blend's networks are loaded, checked, timed and
run; ``stage=submit`` (:mod:`pipeline.submit`) runs it on an export's copy of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.blend import store
from pipeline.data import IMAGE_EXTENSIONS, open_image, to_array
from pipeline.errors import ConfigError, DataError
from pipeline.io import write_with
from pipeline.paths import CHECKPOINT, Paths
from pipeline.runsettings import RunSettings
from pipeline.settings import RuntimeSettings, TTASettings, checked
from pipeline import members
from pipeline.workspace import Workspace

log = logging.getLogger(__name__)


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself, or the image files of a folder (sorted by name).

    Raises DataError for a path that does not exist or a folder without images.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{p}: no images in this folder (expected {', '.join(IMAGE_EXTENSIONS)})")
    return files


def to_mnist(img: Image.Image, side: int = 28, box: int = 20, source: str = "image") -> np.ndarray:
    """Bring a digit image to the MNIST convention.

    Args:
        img: any PIL image (colour, alpha, any size), dark-on-light or light-on-dark.
        side: output side (28); box: the side of the box the ink is scaled into (20).
    Returns:
        ``(side, side)`` uint8, white ink (up to 255) on black (0), centre of mass at the centre.
    Raises:
        DataError: the image holds no ink (a blank page).
    """
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # transparent background -> white paper
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    a = np.asarray(img.convert("L"), dtype=np.float64)
    def border(x):
        return np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])

    if np.median(border(a)) > 127:  # light background: dark ink -> invert
        a = 255.0 - a
    a = np.clip(a - np.median(border(a)), 0, None)  # the background becomes 0
    if a.max() <= 0:
        raise DataError(f"{source}: no ink found (a blank image)")
    mask = a > 0.2 * a.max()
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    a = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = a.shape
    scale = box / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray((a / a.max() * 255).astype(np.uint8)).resize(
        (nw, nh), Image.Resampling.LANCZOS), dtype=np.float64)
    out = np.zeros((side, side))
    top, left = (side - nh) // 2, (side - nw) // 2
    out[top:top + nh, left:left + nw] = small
    cy, cx = ndimage.center_of_mass(out)
    # MNIST digits have their centre of mass at pixel (14, 14) (measured on the fixture: mean 14.0, sd 0.3)
    out = ndimage.shift(out, (side / 2 - cy, side / 2 - cx), order=1, mode="constant")
    out = np.clip(out, 0, None)
    return (out / out.max() * 255).round().astype(np.uint8)


def prepare(files: list[Path], record: dict, preprocess: str) -> np.ndarray:
    """``files`` as the members' input, ``(N, C, S, S)`` uint8: the MNIST convention
    (:func:`to_mnist`) for digit competitions, else the data layer's own conversion.
    Raises DataError: an unreadable or (MNIST convention) blank image."""
    side, chans = int(record["img_size"]), int(record["in_chans"])
    mnist = preprocess == "mnist" or (preprocess == "auto" and record.get("layout", "pixels") == "pixels"
                                      and chans == 1)
    if mnist:
        return np.stack([to_mnist(open_image(f), side, source=str(f)) for f in files])[:, None]
    return np.stack([to_array(open_image(f), side, chans, record.get("resize", "stretch")) for f in files])


@dataclass(frozen=True)
class Network:
    """One trained network of a blend member, as the saved blend recorded it.

    Attributes:
        member: the blend member's label (``model`` or ``model@seed``); key: its (model, fold,
            seed index); folder: its member directory; manifest_sha256: the recorded sha256 of
            its ``manifest.json``.
    """

    member: str
    key: members.MemberKey
    folder: Path
    manifest_sha256: str


def networks(saved: store.SavedBlend, paths: Paths, label: str) -> list[Network]:
    """The networks of blend member ``label``, seed by seed and fold by fold as the blend read
    them; their folders under ``paths`` (a run's ``artifacts/`` or an export's)."""
    model = members.BlendMember.parse(label).model
    return [Network(label, members.MemberKey(model, e.fold, e.seed_index),
                    paths.member_dir(model, e.fold, e.seed_index), e.sha256)
            for e in saved.typed.manifests[label]]


def load_network(net: Network, device, runtime: RuntimeSettings, files: tuple[str, ...] = (CHECKPOINT,)):
    """A network ready to predict: checked against the blend's record (:func:`pipeline.members.
    check_recorded` on ``files``), rebuilt from its safetensors, placed on ``device`` as training
    placed it, with the numerics it was trained with set on the process.

    Returns ``(model in eval mode, its resolved precision, its tta settings or None)``. Raises
    ArtifactError: a missing, changed or unloadable member.
    """
    from pipeline.train.inference import place_model
    from pipeline.device import configure_numerics, resolve_precision

    members.check_recorded(net.folder, net.manifest_sha256, str(net.key), files)
    model, _ = members.load_model(net.folder)
    model = place_model(model, device, runtime.channels_last)
    trained = members.read_config(net.folder)  # the member's own precision and test-time views
    precision = resolve_precision(trained["train"]["precision"], device)  # 'auto' in older keys
    configure_numerics(device, precision, runtime.deterministic)  # as when it was trained
    tta = trained.get("tta")
    return model, precision, None if tta is None else checked(TTASettings, tta, f"{net.folder}/config.yaml: tta")


def member_probabilities(saved: store.SavedBlend, paths: Paths, images: np.ndarray, device,
                         runtime: RuntimeSettings, labels: list[str] | None = None,
                         files: tuple[str, ...] = (CHECKPOINT,)) -> dict[str, np.ndarray]:
    """Each blend member's probabilities for ``(N, C, S, S)`` uint8 images, computed as the blend
    computed its test probabilities: every network's TTA-averaged probabilities
    (:func:`pipeline.train.inference.predict_probs`, in its own precision), each seed's folds
    averaged, then the seeds (:func:`pipeline.members.fold_then_seed_average`).

    Args:
        labels: the members to compute (default: every member of the blend, in its order).
        files: what :func:`load_network` checks of each network.
    Returns:
        ``{label: (N, C) float32}`` in ``labels`` order.
    Raises:
        ArtifactError: a member missing, changed since the blend, or unloadable; images of another
            shape than the members take.
    """
    from pipeline.train.inference import predict_probs

    r = saved.typed
    members.check_shape(images, r.in_chans, r.img_size)
    out = {}
    for label in labels or saved.members:
        seed_probs: dict[int, list[np.ndarray]] = {}
        for net in networks(saved, paths, label):
            model, precision, tta = load_network(net, device, runtime, files)
            seed_probs.setdefault(net.key.seed_index, []).append(
                predict_probs(model, images, device, runtime, precision, tta))
        out[label] = members.fold_then_seed_average(seed_probs)
    return out


def seconds_per_image(net: Network, images: np.ndarray, device, runtime: RuntimeSettings,
                      files: tuple[str, ...] = (CHECKPOINT,)) -> float:
    """Seconds one network of a member takes per image here, TTA views included: measured on one
    prediction batch of ``images`` (at most ``runtime.eval_batch_size`` rows) after a warm-up on
    a few rows, with the device synchronised. Raises ArtifactError as :func:`load_network`."""
    import time

    import torch

    from pipeline.train.inference import predict_probs

    model, precision, tta = load_network(net, device, runtime, files)
    batch = images[:max(1, min(len(images), runtime.eval_batch_size))]
    predict_probs(model, batch[:8], device, runtime, precision, tta)  # warm-up: kernels, allocations
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    predict_probs(model, batch, device, runtime, precision, tta)  # returns on the host: synchronised
    return (time.perf_counter() - t0) / len(batch)


def ensemble_probabilities(settings: RunSettings, images: np.ndarray) -> tuple[np.ndarray, store.SavedBlend]:
    """Probabilities of the submitted ensemble (the blend saved under ``settings.paths``) for
    ``(N, C, S, S)`` uint8 images, run with ``settings.runtime``.

    Returns ``((N, classes) float32 probabilities, the saved blend)``; given the test rows' own
    arrays it reproduces the blend's test probabilities exactly. Raises ArtifactError when there
    is no blend, a member's checkpoint is missing, unreadable or changed since the blend, or the
    images' shape is not the one the members were trained on.
    """
    from pipeline.device import select_device, use_device

    paths, runtime = settings.paths, settings.runtime
    saved = store.load(paths)
    members.check_shape(images, saved.typed.in_chans, saved.typed.img_size)
    device = select_device(runtime.device)
    use_device(device)
    per_member = member_probabilities(saved, paths, images, device, runtime)
    probs = saved.blender().predict_proba(np.stack(list(per_member.values()), 1))
    return probs.astype(np.float32), saved


def run(ws: Workspace) -> list[dict]:
    """Stage ``predict``: print, per image, the predicted label (the submission's decision: the
    argmax, or with a balanced-accuracy / macro-F1 blend the argmax of the probabilities times its
    per-class weights) and the top-``predict.top_k`` probabilities; with
    ``predict.output=FILE.csv`` also write them. Returns one dict per image
    (``file``, ``label``, ``top``: ``[(class name, probability), ...]``).

    Raises:
        ConfigError: no ``input=``. DataError: a missing path, an empty folder, an unreadable or
            blank image. ArtifactError: no blend / checkpoints yet.
    """
    s, where = ws.settings.predict, ws.settings.selection.input
    if not where:
        raise ConfigError("stage=predict needs input=<image file or folder>")
    files = list_images(where)
    images = prepare(files, store.load(ws.paths).record, s.preprocess)
    probs, saved = ensemble_probabilities(ws.settings, images)
    names = saved.record.get("class_names") or [str(c) for c in range(probs.shape[1])]
    top_k = min(s.top_k, probs.shape[1])
    results = []
    log.info("predict: %d image(s), ensemble %s, blend '%s'", len(files), "+".join(saved.members),
             saved.best.value)
    weights = saved.decision_weights()  # balanced accuracy / macro-F1: the submission's per-class weights
    decided = (probs * weights if weights is not None else probs).argmax(1)
    for f, p, label in zip(files, probs, decided):
        order = np.argsort(-p)[:top_k]
        top = [(names[c], float(p[c])) for c in order]
        results.append({"file": str(f), "label": names[label], "top": top})
        log.info("%s: %s  (%s)", f, names[label], ", ".join(f"{c}: {q:.3f}" for c, q in top))
    if s.output:
        import pandas as pd

        df = pd.DataFrame({"file": [r["file"] for r in results], "label": [r["label"] for r in results],
                           **{f"p_{n}": probs[:, c] for c, n in enumerate(names)}})
        path = write_with(Path(s.output), lambda q: df.to_csv(q, index=False))
        log.info("predict: wrote %s", path)
    return results
