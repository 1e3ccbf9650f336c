"""Stage ``export``: the submitted ensemble as one folder, for a Kaggle code competition.

    python run.py stage=export                                  # -> export/ and export.zip
    python run.py stage=export export.dataset_id=me/digits-ensemble export.dir=/tmp/export

Code competitions rerun a notebook offline on a hidden test set. The export holds what that
rerun needs and nothing more, so that ``submit.ipynb`` installs and submits with the internet off
(:mod:`pipeline.submit`)::

    export/
      kfold_export.json             this record: preprocessing facts, members, networks, the
                                    environment, and the sha256 and size of every other file
      artifacts/blend/blend.json    the saved blend's record, verbatim (members, their manifests' sha256)
      artifacts/blend/<method>_state.npz   the submitted blender's fitted arrays (no pickle)
      artifacts/<model>/[seed<s>/]fold<k>/{model.safetensors, config.yaml, manifest.json}
                                    each network of the submitted members: weights, cache key
                                    (precision, TTA views), and the manifest the blend recorded
      oof.npz                       probs (N, M, C) float32 OOF of the M blend members, y (N,)
                                    int64, folds (N,) int64: refitting the blend without a member
                                    (``budget=`` at submit time) needs them
      wheels/*.whl                  kfold-stack's wheel and those of every requirement not in ``export.image``
      submit.ipynb, submit.py       install offline, then ``python -m pipeline.submit``
      dataset-metadata.json         for ``kaggle datasets create -p export/ --dir-mode zip``

The ``artifacts/`` part mirrors a run's own ``artifacts/`` (a subset of it), so the saved blend
is read by :mod:`pipeline.blend.store` and the members by :mod:`pipeline.predict` as in a run.
The folder is written beside the old one and swapped in; the zip is written atomically. Nothing is
pickled: safetensors, JSON, YAML and ``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import members
from pipeline.blend import store
from pipeline.choices import Layout, Metric, Resize, SubmissionKind
from pipeline.errors import ArtifactError, ConfigError
from pipeline.io import atomic_folder, save_json, save_npz, save_text, sha256_file, write_with
from pipeline.metrics import SCORE_FIELDS, score
from pipeline.notebook import notebook_json, script_text
from pipeline.paths import CHECKPOINT, CONFIG, DATA_FILES, MANIFEST, Paths
from pipeline.settings import ExportSettings

if TYPE_CHECKING:
    from pipeline.workspace import Workspace

log = logging.getLogger(__name__)

RECORD = "kfold_export.json"
FORMAT = 1  # the layout version of an export; stage=submit refuses another
ARTIFACTS = "artifacts"
OOF_FILE = "oof.npz"
WHEELS = "wheels"
NOTEBOOK, SCRIPT, METADATA = "submit.ipynb", "submit.py", "dataset-metadata.json"
NETWORK_FILES = (CHECKPOINT, CONFIG, MANIFEST)  # what an export holds of each network
PROJECT = "kfold-stack"


@dataclass(frozen=True)
class Preprocessing:
    """What the members' input and the submission file need, as the training run had them.

    Attributes:
        layout: the competition's :class:`Layout` (which test files to read).
        img_size, channels: side S (pixels) and channels C of the members' ``(N, C, S, S)`` uint8 input.
        resize: how an image of another size became S x S (:class:`Resize`).
        class_names: the C classes in index order, as the competition names them.
        submission: :class:`SubmissionKind`; submission_columns: the training sample's header.
        metric: the competition metric (:class:`Metric`) that picked the blend.
    """

    layout: Layout
    img_size: int
    channels: int
    resize: Resize
    class_names: tuple[str, ...]
    submission: SubmissionKind
    submission_columns: tuple[str, ...]
    metric: Metric

    def to_json(self) -> dict:
        return {"layout": self.layout.value, "img_size": self.img_size, "channels": self.channels,
                "resize": self.resize.value, "class_names": list(self.class_names),
                "submission": self.submission.value, "submission_columns": list(self.submission_columns),
                "metric": self.metric.value}

    @classmethod
    def from_json(cls, d: dict) -> "Preprocessing":
        """Raises KeyError / ValueError / TypeError for a malformed entry (the reader reports it)."""
        return cls(Layout(d["layout"]), int(d["img_size"]), int(d["channels"]), Resize(d["resize"]),
                   tuple(map(str, d["class_names"])), SubmissionKind(d["submission"]),
                   tuple(map(str, d["submission_columns"])), Metric(d["metric"]))


@dataclass(frozen=True)
class ExportedEnsemble:
    """An export folder, verified (:func:`read`).

    Attributes:
        folder: the export; record: its ``kfold_export.json``; prep: the preprocessing facts.
        paths: a run's :class:`Paths` whose ``artifacts_dir`` is the export's ``artifacts/``
            (where :mod:`pipeline.blend.store` and :mod:`pipeline.predict` find the blend and members).
        saved: the submitted blend.
    """

    folder: Path
    record: dict
    prep: Preprocessing
    paths: Paths
    saved: store.SavedBlend

    def oof(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(probs (N, M, C) float32, y (N,) int64, folds (N,) int64)``: the blend members' OOF
        probabilities (members in the blend's order), labels and folds. Raises ArtifactError
        when the file is unreadable or its shapes disagree with the blend."""
        path = self.folder / OOF_FILE
        try:
            with np.load(path, allow_pickle=False) as z:
                X, y, folds = z["probs"], z["y"], z["folds"]
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{path}: unreadable ({type(e).__name__}: {e}); run: python run.py stage=export") from None
        r = self.saved.typed
        if X.ndim != 3 or X.shape[1:] != (len(r.members), r.num_classes) or y.shape != (len(X),) or \
                folds.shape != (len(X),):
            raise ArtifactError(f"{path}: shapes {X.shape}, {y.shape}, {folds.shape} do not fit the blend's "
                                f"{len(r.members)} members x {r.num_classes} classes; run: python run.py stage=export")
        return X, y, folds


def export_paths(folder: Path, base: Paths) -> Paths:
    """``base`` (a run's paths: cache and the rest) with its ``artifacts_dir`` in the export."""
    return dataclasses.replace(base, artifacts_dir=Path(folder) / ARTIFACTS)


# --------------------------------------------------------------------------- reading


def read(folder: str | Path, base: Paths) -> ExportedEnsemble:
    """Open and verify an export: its record, then every file the submission reads (the blend,
    each network's files, the OOF arrays) against the sha256 and size the record lists.

    Raises:
        ArtifactError: one line: no export in ``folder``, an unreadable record or one of another
            format, a missing file, or a file that does not match its sha256 (modified after the
            export), naming it.
    """
    folder = Path(folder)
    path = folder / RECORD
    again = "run: python run.py stage=export, and upload the whole folder"
    if not path.exists():
        what = "no such folder" if not folder.exists() else f"no {RECORD} here"
        raise ArtifactError(f"export.dir={folder}: {what} (expected the folder stage=export wrote; {again})")
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, this kfold-stack reads format {FORMAT}")
        prep = Preprocessing.from_json(record["preprocessing"])
        files = record["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            f"{again}") from None
    needed = [rel for rel in files if rel == OOF_FILE or rel.startswith(ARTIFACTS + "/")]
    for rel in sorted(needed):
        entry, p = files[rel], folder / rel
        if not p.is_file():
            raise ArtifactError(f"{p}: missing from the export ({again})")
        if p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
            raise ArtifactError(f"{p}: does not match its sha256 in {RECORD} (modified after the export?); {again}")
    paths = export_paths(folder, base)
    saved = store.load(paths)
    listed = set(needed)
    for label in saved.members:  # every network the blend names is in the export and listed
        model = members.BlendMember.parse(label).model
        for e in saved.typed.manifests[label]:
            d = paths.member_dir(model, e.fold, e.seed_index).relative_to(folder).as_posix()
            for name in NETWORK_FILES:
                if f"{d}/{name}" not in listed:
                    raise ArtifactError(f"{folder / d / name}: missing from the export ({again})")
    return ExportedEnsemble(folder, record, prep, paths, saved)


# --------------------------------------------------------------------------- writing


def _member_oof(ws, saved: store.SavedBlend) -> np.ndarray:
    """``(N, M, C)`` float32: each blend member's OOF probabilities, read from the networks the
    blend recorded (seeds averaged as the blend averaged them), checked against the blend's own
    member scores. Raises ArtifactError when they do not reproduce them."""
    out = []
    for label in saved.members:
        model = members.BlendMember.parse(label).model
        by_seed: dict[int, list] = {}
        for e in saved.typed.manifests[label]:
            key = members.MemberKey(model, e.fold, e.seed_index)
            by_seed.setdefault(e.seed_index, []).append((key, ws.paths.member_dir(model, e.fold, e.seed_index)))
        oofs = [members.read_seed_predictions(dirs, ws.folds, len(ws.comp.x_test), ws.comp.num_classes)[0]
                for dirs in by_seed.values()]
        oof = members.average_probs(oofs)
        recorded = (saved.record.get("model_scores") or {}).get(label, {}).get("log_loss")
        if recorded is not None and not np.isclose(score(ws.comp.y_train, oof).log_loss, recorded, rtol=0, atol=1e-9):
            raise ArtifactError(f"{label}: its members' OOF predictions do not reproduce the blend's score; "
                                f"run: python run.py stage=blend")
        out.append(oof)
    return np.stack(out, 1).astype(np.float32)


def _source_root() -> Path:
    """The kfold-stack source tree this code runs from (``pyproject.toml`` beside ``pipeline/``).
    Raises ArtifactError when it runs from an installed wheel (no source to build one from)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise ArtifactError(f"{root}: no pyproject.toml, so no kfold-stack wheel can be built here; run stage=export "
                            f"from a clone (pip install -e .), or set export.wheels=false")
    return root


def _pip(args: list[str], what: str) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        raise ArtifactError(f"{what}: pip failed ({lines[-1].strip() if lines else res.returncode})")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def project_wheel(out: Path) -> Path:
    """Build kfold-stack's wheel from this source tree into ``out`` (``pip wheel --no-deps
    --no-build-isolation --no-index`` on a copy of ``pyproject.toml``, ``README.md`` and
    ``pipeline/``, so nothing is written into the tree). Returns the wheel's path.
    Raises ArtifactError: no source tree, or the build failed."""
    import tempfile

    root = _source_root()
    with tempfile.TemporaryDirectory(prefix="kfold-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        shutil.copytree(root / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        built = Path(tmp) / "built"
        _pip(["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(built), str(src)],
             f"building the {PROJECT} wheel from {root}")
        wheel = next(built.glob("kfold_stack-*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, out / wheel.name))


def shipped(image: list[str], extra: list[str] = ()) -> list[str]:
    """The requirements an export ships as wheels: the transitive closure of kfold-stack's
    requirements (its installed metadata, markers evaluated here, extras left out), walking no
    further than a package the target ``image`` provides (``name>=min`` strings: such a package
    and what it requires are the image's), plus ``extra``; sorted names. Raises ConfigError when
    a requirement on the way is not installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    provided = {_normalise(Requirement(r).name) for r in image}
    seen: dict[str, str] = {}
    todo = [PROJECT, *extra]
    for n in extra:
        seen[_normalise(n)] = n
    while todo:
        name = todo.pop()
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            raise ConfigError(f"export: '{name}' is not installed here, so its wheel cannot be shipped (expected "
                              f"kfold-stack's requirements installed: pip install -e .)") from None
        for r in map(Requirement, reqs):
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue  # an extra's, or another platform's
            n = _normalise(r.name)
            if n in provided or n in seen or n == _normalise(PROJECT):
                continue
            seen[n] = r.name
            todo.append(r.name)
    return sorted(seen.values(), key=str.lower)


def dependency_wheels(names: list[str], out: Path, cache: Path) -> list[Path]:
    """Wheels of ``names`` at the versions installed here, into ``out``: taken from ``cache``
    (``data/cache/wheels/``) when there, else built with ``pip wheel --no-deps`` from the
    configured index into ``cache`` (once). Returns their paths in ``out``.

    Raises:
        ConfigError: a name that is not installed here.
        ArtifactError: pip could not fetch or build one (offline? put the wheel in ``cache``).
    """
    from importlib import metadata

    wanted = {}
    for n in names:
        try:
            wanted[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            raise ConfigError(f"export.dependencies: '{n}' is not installed here (expected kfold-stack's "
                              f"requirements that the image lacks, export.image)") from None

    def cached(n: str, v: str) -> Path | None:
        hits = [p for p in cache.glob("*.whl") if p.name.lower().startswith(f"{_normalise(n)}-{v}-".lower())]
        return sorted(hits)[0] if hits else None

    missing = [f"{n}=={v}" for n, v in wanted.items() if cached(n, v) is None]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        log.info("export: pip wheel --no-deps %s (into %s)", " ".join(missing), cache)
        _pip(["wheel", "--no-deps", "-q", "-w", str(cache), *missing],
             f"export: wheels of {', '.join(missing)} (offline? put them in {cache})")
    out.mkdir(parents=True, exist_ok=True)
    found = []
    for n, v in wanted.items():
        w = cached(n, v)
        if w is None:
            raise ArtifactError(f"export: no wheel of {n}=={v} in {cache} after pip wheel")
        found.append(Path(shutil.copy2(w, out / w.name)))
    return found


def environment(dependencies: list[str]) -> dict:
    """The Python version and the installed versions of kfold-stack's requirements: ``shipped``
    (wheels in the export) and ``assumed`` (expected in the competition's image)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in metadata.requires(PROJECT) or []]
    except metadata.PackageNotFoundError:
        reqs = []
    shipped = {_normalise(n) for n in dependencies}
    out: dict = {"python": platform.python_version(), "shipped": {}, "assumed": {}}
    for r in reqs:
        if r.marker is not None and "extra" in str(r.marker):
            continue
        try:
            v = metadata.version(r.name)
        except metadata.PackageNotFoundError:
            v = None
        out["shipped" if _normalise(r.name) in shipped else "assumed"][r.name] = v
    for n in dependencies:
        out["shipped"].setdefault(n, metadata.version(n))
    return out


def _zip(folder: Path, target: Path) -> Path:
    """``folder``'s files into ``target`` (relative paths, sorted, fixed times: the same export
    gives the same zip), atomically."""
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(q for q in folder.rglob("*") if q.is_file()):
                info = zipfile.ZipInfo(p.relative_to(folder).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                with open(p, "rb") as f:
                    zf.writestr(info, f.read())

    return write_with(target, write)


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def dataset_metadata(s: ExportSettings, saved: store.SavedBlend, fingerprint: str) -> dict:
    """``dataset-metadata.json`` for ``kaggle datasets create``: ``export.dataset_id`` (or a
    placeholder owner, as ``kaggle datasets init`` writes), a title of 6-50 characters, CC0."""
    title = s.title or f"kfold-stack {'+'.join(saved.members)}"
    title = (title if len(title) >= 6 else f"{title} export")[:50]
    ident = s.dataset_id or f"INSERT_USERNAME/kfold-stack-{_slug(fingerprint)[:8]}"
    return {"title": title, "id": ident, "licenses": [{"name": "CC0-1.0"}],
            "subtitle": f"{len(saved.members)}-member k-fold ensemble, offline submission"[:80],
            "description": "Exported by kfold-stack's `python run.py stage=export`: the submitted ensemble "
                           f"({', '.join(saved.members)}; blend '{saved.best.value}'), its weights and fitted "
                           "blender, the wheels to install it offline, and submit.ipynb, which writes "
                           "submission.csv from the competition's test set."}


def run(ws: "Workspace") -> Path:
    """Stage ``export``: write ``export.dir`` (and ``<export.dir>.zip``) from the saved blend.

    Returns the export folder.

    Raises:
        ArtifactError: no blend yet, a blend of other data or folds, a member missing or changed
            since the blend (any of its files not matching its manifest), OOF files that do not
            reproduce the blend, or a wheel that cannot be built; one line each, nothing written.
        ConfigError: a dependency that is not installed here.
    """
    s = ws.settings.export
    saved, nets = _checked_blend(ws)
    oof = _member_oof(ws, saved)
    comp = ws.comp
    prep = Preprocessing(comp.layout, comp.side, comp.channels, Resize(ws.settings.data.resize),
                         tuple(comp.class_names), comp.submission, tuple(comp.submission_columns),
                         Metric(saved.record.get("metric", Metric.accuracy.value)))
    final = Path(s.dir)
    with atomic_folder(final) as tmp:
        wheels = _write_files(tmp, s, ws, saved, nets, oof)
        save_json(tmp / RECORD, _record(tmp, s, ws, saved, nets, prep, wheels))
    zipped = _zip_beside(final, s.zip)
    _log_written(final, zipped, saved, nets, prep, wheels)
    return final


def _checked_blend(ws) -> tuple[store.SavedBlend, list]:
    """The saved blend, checked against the run's data and folds, and its members' networks
    (:func:`pipeline.predict.networks`), every file of each as its manifest lists it."""
    from pipeline.predict import networks

    saved = store.load(ws.paths)
    store.check_matches(saved, ws.comp.fingerprint, ws.folds_digest)
    nets = [n for label in saved.members for n in networks(saved, ws.paths, label)]
    for n in nets:  # every file of every member as its manifest lists it
        members.check_recorded(n.folder, n.manifest_sha256, str(n.key), DATA_FILES)
    return saved, nets


def _write_files(tmp: Path, s: ExportSettings, ws, saved: store.SavedBlend, nets: list, oof: np.ndarray) -> list[Path]:
    """Every file of the export but its record, into ``tmp``: the blend's record and state, each
    network's files, ``oof.npz``, the wheels (``export.wheels``), ``submit.py``, ``submit.ipynb``
    and ``dataset-metadata.json``. Returns the wheels' paths."""
    paths = export_paths(tmp, ws.paths)
    blend_out = paths.blend_dir
    blend_out.mkdir(parents=True)
    shutil.copy2(ws.paths.blend_dir / store.RECORD, blend_out / store.RECORD)
    state = f"{saved.best.value}_state.npz"
    shutil.copy2(ws.paths.blend_dir / state, blend_out / state)
    for n in nets:
        d = paths.member_dir(n.key.model, n.key.fold, n.key.seed_index)
        d.mkdir(parents=True)
        for name in NETWORK_FILES:
            shutil.copy2(n.folder / name, d / name)
    save_npz(tmp / OOF_FILE, probs=oof, y=ws.comp.y_train.astype(np.int64), folds=ws.folds.astype(np.int64))
    wheels = []
    if s.wheels:
        wheels = [project_wheel(tmp / WHEELS)] + dependency_wheels(shipped(list(s.image), list(s.dependencies)),
                                                                    tmp / WHEELS, ws.paths.wheel_dir)
    save_text(tmp / SCRIPT, script_text())
    save_text(tmp / NOTEBOOK, json.dumps(notebook_json(), indent=1) + "\n")
    save_json(tmp / METADATA, dataset_metadata(s, saved, ws.comp.fingerprint))
    return wheels


def _record(tmp: Path, s: ExportSettings, ws, saved: store.SavedBlend, nets: list, prep: Preprocessing,
            wheels: list[Path]) -> dict:
    """``kfold_export.json``: the preprocessing facts, members, networks, environment, and the
    sha256 and size of every file already written into ``tmp``."""
    comp = ws.comp
    files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    runtime = ws.settings.runtime
    return {
        "format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kfold_stack": _version(), "preprocessing": prep.to_json(),
        "members": saved.members, "best": saved.best.value,
        "oof_score": {k: v for k, v in saved.typed.methods[saved.best].items() if k in SCORE_FIELDS},
        "marginal_values": store.marginal_values(saved.typed, prep.metric),
        "networks": [{"member": n.member, "model": n.key.model, "fold": n.key.fold, "seed_index": n.key.seed_index,
                      "dir": export_paths(Path("."), ws.paths).member_dir(n.key.model, n.key.fold, n.key.seed_index).as_posix(),
                      "manifest_sha256": n.manifest_sha256} for n in nets],
        "data_fingerprint": comp.fingerprint, "folds_digest": ws.folds_digest, "n_train": int(len(comp.y_train)),
        "training_submission_sha256": saved.record.get("submission_sha256"),
        "runtime": {"eval_batch_size": runtime.eval_batch_size, "channels_last": runtime.channels_last},
        "wheels": [w.name for w in wheels],
        "environment": environment(shipped(list(s.image), list(s.dependencies)) if s.wheels else []),
        "files": files,
    }


def _zip_beside(final: Path, wanted: bool) -> Path | None:
    """``<final>.zip`` of the export when ``wanted`` (``export.zip``), else None, with an earlier
    export's zip removed (one log line)."""
    target = final.with_name(final.name + ".zip")
    zipped = _zip(final, target) if wanted else None
    if zipped is None and target.exists():  # never leave an earlier export's zip beside this one
        target.unlink()
        log.info("export: removed the earlier %s (export.zip=false)", target)
    return zipped


def _log_written(final: Path, zipped: Path | None, saved: store.SavedBlend, nets: list, prep: Preprocessing,
                 wheels: list[Path]) -> None:
    """The export's two log lines: what it holds, and how to upload and submit it."""
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    log.info("export: %s (%.1f MB%s): %d member(s) %s, %d network(s), blend '%s' (OOF %s %.5f), %s",
             final, size / 1e6, f"; {zipped.name} {zipped.stat().st_size / 1e6:.1f} MB" if zipped else "",
             len(saved.members), "+".join(saved.members), len(nets), saved.best.value, prep.metric.value,
             float(saved.typed.methods[saved.best].get(prep.metric.value) or 0.0),
             f"wheels: {', '.join(w.name for w in wheels)}" if wheels else "no wheels (export.wheels=false)")
    log.info("export: upload it as a Kaggle dataset (kaggle datasets create -p %s --dir-mode zip, or %s on the "
             "website), then run its submit.ipynb in the competition with the internet off", final,
             f"{final.name}.zip" if zipped else "the folder")


def _version() -> str:
    from pipeline import __version__

    return __version__
