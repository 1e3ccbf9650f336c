"""The layers (pyproject.toml's import-linter contract): settings at the bottom, features above
them, stages on top. The contract holds on the tree, and a back edge breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def _lint(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": ""}, timeout=300)


def test_the_tree_keeps_its_layers_and_a_back_edge_breaks_them(tmp_path):
    ok = _lint(REPO)
    assert ok.returncode == 0 and "1 kept, 0 broken" in ok.stdout, ok.stdout + ok.stderr
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    settings = tmp_path / "pipeline" / "settings.py"
    settings.write_text(settings.read_text() + "\n\ndef _workspace():\n    from pipeline.workspace import Workspace\n"
                        "    return Workspace\n")
    broken = _lint(tmp_path)
    assert broken.returncode == 1 and "0 kept, 1 broken" in broken.stdout
    assert "pipeline.settings -> pipeline.workspace" in broken.stdout


def test_the_settings_import_neither_torch_nor_a_feature():
    code = "import sys, pipeline.settings; print(sorted(m for m in sys.modules if m.startswith(('pipeline', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['pipeline', 'pipeline.choices', 'pipeline.errors', 'pipeline.settings']"
