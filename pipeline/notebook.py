"""What an export carries to submit offline: ``submit.py`` and ``submit.ipynb`` (the same code).

:mod:`pipeline.export` writes them into the export. On Kaggle, with the internet off, they find the
export and the competition under ``/kaggle/input``, install kfold-stack from the export's wheels
(``pip install --no-index``) and run ``python -m pipeline stage=submit`` (:mod:`pipeline.submit`).
Text only, and nothing imported: the code in it runs before kfold-stack is installed.
"""

from __future__ import annotations

_SCRIPT_DOC = '''"""Submit a kfold-stack export to a Kaggle code competition, offline.

Written by kfold-stack's `python run.py stage=export`; submit.ipynb holds the same code. On Kaggle:
add this dataset and the competition to a notebook, turn the internet off, run submit.ipynb (or
`!python /kaggle/input/<this dataset>/submit.py`). Elsewhere:

    python submit.py --competition /path/to/competition [--output submission.csv] [--budget 8h30m]

It installs kfold-stack from this export's wheels (pip --no-index: nothing is downloaded; the
heavy packages, torch, timm, numpy, pandas, scikit-learn, pillow, safetensors ..., must be there
already, as in Kaggle's image), then runs `python -m pipeline stage=submit`, which writes
submission.csv in sample_submission.csv's columns and row order.
"""
'''

_BODY = '''import glob
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KAGGLE_INPUT = Path("/kaggle/input")
RECORD = "kfold_export.json"


def _under_input(name):
    """Folders under /kaggle/input (up to 4 levels down) that hold a file called `name`."""
    hits = set()
    for depth in range(1, 5):
        hits |= {Path(p).parent for p in glob.glob(str(KAGGLE_INPUT / ("*/" * depth) / name))}
    return sorted(hits)


def find_export(export=None):
    """The export: `export`, else this file's folder when it holds the record, else the one folder
    under /kaggle/input that does."""
    if export:
        return Path(export).resolve()
    here = Path(globals().get("__file__", "")).resolve().parent
    if (here / RECORD).exists():
        return here
    found = _under_input(RECORD)
    if len(found) != 1:
        raise SystemExit(f"error: {len(found)} kfold-stack exports under {KAGGLE_INPUT} "
                         f"({', '.join(map(str, found)) or 'none'}); set EXPORT (--export)")
    return found[0]


def find_competition(competition=None, export=None):
    """The competition: `competition`, else the one folder under /kaggle/input with a
    sample_submission.csv (the export's own folder excluded)."""
    if competition:
        return Path(competition).resolve()
    found = [p for p in _under_input("sample_submission.csv") if export is None or Path(export) not in (p, *p.parents)]
    if len(found) != 1:
        raise SystemExit(f"error: {len(found)} competition folders under {KAGGLE_INPUT} "
                         f"({', '.join(map(str, found)) or 'none'}); set COMPETITION (--competition)")
    return found[0]


def install(export):
    """kfold-stack and the wheels Kaggle's image lacks, from the export alone (no network)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                    str(Path(export) / "wheels"), "kfold-stack"], check=True)


def _arg(key, value):
    value = str(value)
    return f"{key}={value}" if re.fullmatch(r"[\\w./:+-]*", value) else f"{key}='{value}'"


def submit(export=None, competition=None, output=None, budget=None, default_row=False, overrides=()):
    """Install offline, then write submission.csv; returns its path. Exits with the submission's
    exit code (2: a one-line error above) when it fails."""
    export = find_export(export)
    competition = find_competition(competition, export)
    if output is None:
        output = "/kaggle/working/submission.csv" if Path("/kaggle/working").is_dir() else "submission.csv"
    output = Path(output).resolve()
    install(export)
    work = tempfile.mkdtemp(prefix="kfold-stack-")  # Hydra's log and any cache: not in the output folder
    cmd = [sys.executable, "-m", "pipeline", "stage=submit", _arg("export.dir", export),
           _arg("data.dir", competition), _arg("submit.output", output), _arg("paths.root", work)]
    if budget:
        cmd.append(_arg("budget", budget))
    if default_row:
        cmd.append("submit.default_row=true")
    cmd += list(overrides)
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=work).returncode
    if code != 0:
        raise SystemExit(code)
    return output
'''

_MAIN = '''

def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Submit a kfold-stack export, offline.")
    p.add_argument("--export", help="the export folder (default: this file's folder, or found under /kaggle/input)")
    p.add_argument("--competition", help="the competition folder (default: found under /kaggle/input)")
    p.add_argument("--output", help="submission.csv (default: /kaggle/working/submission.csv on Kaggle, else ./)")
    p.add_argument("--budget", help="the run-time limit, e.g. 8h30m: members of least value are left out to fit")
    p.add_argument("--default-row", action="store_true", help="an undecodable test image gets the sample's row")
    p.add_argument("overrides", nargs="*", help="further key=value settings for stage=submit")
    a = p.parse_args(argv)
    print(submit(a.export, a.competition, a.output, a.budget, a.default_row, a.overrides))


if __name__ == "__main__":
    main()
'''

_PARAMETERS = '''EXPORT = None        # the export folder; None: the folder under /kaggle/input holding kfold_export.json
COMPETITION = None   # the competition folder; None: the folder under /kaggle/input holding sample_submission.csv
OUTPUT = None        # None: /kaggle/working/submission.csv
BUDGET = None        # the run-time limit, e.g. "8h30m": members of least value are left out when all would not fit
DEFAULT_ROW = False  # True: a test image that does not decode gets sample_submission.csv's row (counted in the log)
'''


def script_text() -> str:
    """``submit.py`` of an export: find the export and the competition, install offline, run
    ``python -m pipeline stage=submit``; a command line for use outside Kaggle."""
    return _SCRIPT_DOC + "\n" + _BODY + _MAIN


def notebook_json() -> dict:
    """``submit.ipynb`` of an export (nbformat 4): its parameters cell (tagged ``parameters``),
    then ``submit.py``'s code, then the call."""
    def code(src: str, tags: list[str] | None = None) -> dict:
        return {"cell_type": "code", "execution_count": None, "metadata": {"tags": tags or []}, "outputs": [],
                "source": src.splitlines(keepends=True)}

    intro = ("# Submit with kfold-stack\n\nWritten by `python run.py stage=export`. Add the export (this dataset) and "
             "the competition as inputs, turn the internet off, and run all: it installs kfold-stack from the "
             "export's wheels (`pip install --no-index`), then writes `/kaggle/working/submission.csv` from the "
             "competition's test set with the exported ensemble. The inputs are found by themselves; set them "
             "below when there are several.\n")
    return {"cells": [{"cell_type": "markdown", "metadata": {}, "source": intro.splitlines(keepends=True)},
                      code(_PARAMETERS, ["parameters"]), code(_BODY),
                      code("submit(EXPORT, COMPETITION, OUTPUT, BUDGET, DEFAULT_ROW)\n")],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 4}
