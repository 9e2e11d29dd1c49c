"""The run directory: a unique default name, what `--force` may replace, and the check that resumed data matches.

A folder is a medclf run when it holds config.yaml and nothing but the files medclf writes into a run.
Only such a folder is ever replaced, and only file by file; a run whose first epoch never finished
(no last.pt) holds nothing to protect and is replaced without `--force`.
"""
from __future__ import annotations

import csv
import re
import secrets
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

from .data import splits
from .errors import MedclfError

MARKER = "config.yaml"
RUN_FILES = frozenset({
    MARKER, "plan.yaml", "fingerprint.json", "splits.csv", "skipped.txt", "history.csv", "model.pt", "last.pt",
    "last.pt.tmp", "metrics.json", "curves.png", "confusion_matrix.png", "roc.png", "report.html", "oof.csv",
    "doctor.json", "model_card.md",
    "trial.json"})  # a `medclf tune` trial's state (medclf/tuning.py)
RUN_FOLDERS = re.compile(r"fold-\d+|refit")  # cross-validation's sub-runs (medclf/crossval.py): run files only


def is_temporary(name: str) -> bool:
    """A temporary file an interrupted atomic write may leave (medclf/atomic.py names them .NAME.XXXX.tmp)."""
    return name.endswith(".tmp") and (name.startswith(".") or name == "last.pt.tmp")


def default_run_dir(data_name: str) -> Path:
    """runs/<timestamp>-<data>-<random>: two runs started in the same second get different folders."""
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{data_name}-{secrets.token_hex(3)}"


def prepare_run_dir(out: str | Path | None, data_name: str, data_root: str | Path, force: bool) -> Path:
    """Create the run directory, or replace an earlier medclf run there when that is safe."""
    if out is None:
        path = default_run_dir(data_name)
        path.mkdir(parents=True, exist_ok=False)
        return path
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise MedclfError(f"--out {path} is a file; give a folder for the run")
    if not path.exists() or not any(path.iterdir()):
        path.mkdir(parents=True, exist_ok=True)
        return path
    _refuse_protected(path, Path(data_root))
    foreign = sorted(p.name for p in path.iterdir() if not _is_run_file(p))
    if foreign or not (path / MARKER).is_file():
        example = foreign[0] if foreign else f"no {MARKER}"
        raise MedclfError(f"--out {path} exists and is not a medclf run ({example}); --force only replaces "
                          f"run directories: choose another --out")
    if not any((path / name).is_file() for name in FINISHED_EPOCH_FILES):
        print(f"medclf: {path} holds no finished epoch; replacing it")
    elif not force:
        raise MedclfError(f"run directory {path} exists; pass --force to overwrite it or --resume {path} to continue")
    clear_run_files(path)
    return path


# any of these means an epoch finished (a finished run may have had its last.pt deleted to save space)
FINISHED_EPOCH_FILES = ("last.pt", "model.pt", "metrics.json", "history.csv", "fold-1/last.pt")


def resumable(run: Path) -> bool:
    """A finished epoch to continue from: the run's last.pt, or a cross-validation fold's."""
    return (run / "last.pt").is_file() or any(run.glob("fold-*/last.pt")) or (run / "refit" / "last.pt").is_file()


def _is_run_file(path: Path) -> bool:
    """A file medclf writes into a run, or a cross-validation sub-run folder that holds nothing else."""
    if path.is_dir() and not path.is_symlink():
        return bool(RUN_FOLDERS.fullmatch(path.name)) and all(
            (p.name in RUN_FILES or is_temporary(p.name)) and p.is_file() for p in path.iterdir())
    return (path.name in RUN_FILES or is_temporary(path.name)) and path.is_file()


def _refuse_protected(path: Path, data_root: Path) -> None:
    target = path.resolve()
    for what, protected in (("DATA", data_root), ("the current folder", Path.cwd()), ("your home folder", Path.home())):
        protected = protected.resolve()
        if target == protected or target in protected.parents:
            raise MedclfError(f"--out {path} holds {what}; medclf never replaces it: choose another --out")


def clear_run_files(path: Path) -> None:
    """Delete the files medclf writes into a run (and leftover temporaries), nothing else."""
    for p in path.iterdir():
        if _is_run_file(p):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def remove_temporaries(path: Path) -> None:
    """Temporary files a killed write left behind; the finished artifacts beside them are intact."""
    for p in [*path.iterdir(), *(q for d in path.iterdir() if d.is_dir() and RUN_FOLDERS.fullmatch(d.name)
                                 for q in d.iterdir())]:
        if is_temporary(p.name) and p.is_file():
            p.unlink()


def check_same_splits(run: Path, split_ids: dict[str, list[str]], split_labels: dict[str, np.ndarray],
                      classes: list[str], split_groups: dict[str, list[str] | None] | None = None) -> None:
    """Resuming on other images than the run started with would silently mix two data sets."""
    path = run / "splits.csv"
    if not path.is_file():
        raise MedclfError(f"cannot resume {run}: no splits.csv there to check the data against")
    with tempfile.TemporaryDirectory() as tmp:
        splits.write_split_file(Path(tmp) / "splits.csv", split_ids, split_labels, classes, split_groups)
        now = _read_rows(Path(tmp) / "splits.csv")
    saved = _read_rows(path)
    width = len(saved[0]) if saved else 0  # a run from before splits.csv had a group column: compare what it has
    now = [row[:width] for row in now]
    if saved != now:
        differ = sorted(set(saved) ^ set(now))
        example = f", e.g. {differ[0][0]} {differ[0][1]}" if differ else " (same images, other order)"
        raise MedclfError(f"cannot resume {run}: the data no longer matches its splits.csv "
                          f"({len(differ)} row(s) differ{example}); restore the data or start a new run")


def _read_rows(path: Path) -> list[tuple[str, ...]]:
    with open(path, newline="") as f:
        return [tuple(row) for row in csv.reader(f)]
