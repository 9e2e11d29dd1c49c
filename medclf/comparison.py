"""`medclf compare`: train several arms × seeds on the same data, test them on the same images.

Writes OUT/<arm>-seed<k>/ (ordinary runs, each with its report.html), OUT/comparison.json and
OUT/comparison.html. Per-arm numbers are mean ± std over seeds; pairwise tests pool each arm's
seeds by averaging its per-image probabilities, then compare the two arms on the same images:
the runs' out-of-fold predictions when all ran with --folds, else their predictions on one split.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic, metrics, rundir
from .config import RANGES, TrainConfig, load_yaml
from .data import sources, table
from .errors import MedclfError
from .inference import load_for_inference, split_store
from .metrics import evaluate_predictions
from .oof import OOF_FILE, read_oof
from .serialize import json_safe
from .reporting.comparison import summary_text, write_comparison_html
from .stats import delong_auc_test, mcnemar_test, mean_std, paired_bootstrap_diff
from .training import train

NOT_COMPARED = {"device", "precision", "channels_last", "compile", "cache", "cache_dir", "out", "skip_bad"}
NOT_PER_ARM = {"data", "out", "seed"}
OUT_OF_FOLD = "out-of-fold"


def compare(data: str, weights: str | list[str] | None = None, arms: str | Path | dict | None = None,
            seeds: int = 3, out: str | Path | None = None, force: bool = False, progress: bool = True,
            n_boot: int = 1000, **train_flags: Any) -> dict:
    """Train every arm with `seeds` seeds and compare them; same as `medclf compare`.

    Arms are `weights` (comma-separated or a list: none, imagenet, PATH/model.pt) or `arms`
    (a YAML file or dict of named flag sets); other keyword arguments are train flags shared by
    all arms. Returns {"out", "json", "html", "comparison"} (comparison: comparison.json's content).
    """
    if seeds < 1:
        raise MedclfError("--seeds must be >= 1")
    common = {k: v for k, v in train_flags.items() if v is not None}
    if "out" in common:
        raise MedclfError("give the comparison folder as out=, not as a train flag")
    arm_flags = resolve_arms(weights, arms, common)
    base_seed = int(common.pop("seed", 0))
    if base_seed + seeds - 1 > RANGES["seed"].high:  # refused before the first arm trains, not at the last
        raise MedclfError(f"--seed {base_seed} with --seeds {seeds} would reach seed {base_seed + seeds - 1}; "
                          f"seeds go up to {RANGES['seed'].high}")
    defaults = TrainConfig()
    out = Path(out) if out else rundir.default_run_dir(f"compare-{Path(str(data)).stem}")
    out.mkdir(parents=True, exist_ok=True)
    data_used, split_note = fixed_splits(data, out, base_seed, common.get("val_fraction", defaults.val_fraction),
                                         common.get("test_fraction", defaults.test_fraction), force=force,
                                         **sources.data_options(common))
    if Path(data_used).suffix == ".csv" and data_used != str(data):  # the split label file names its own columns
        common = {k: v for k, v in common.items() if k not in sources.DATA_OPTIONS}
    seed_list = [base_seed + k for k in range(seeds)]
    run_dirs = {arm: [out / f"{arm}-seed{s}" for s in seed_list] for arm in arm_flags}
    total, done = len(arm_flags) * seeds, 0
    for arm, flags in arm_flags.items():
        for seed, run_dir in zip(seed_list, run_dirs[arm]):
            done += 1
            print(f"compare: run {done}/{total}: {arm}, seed {seed} → {run_dir}")
            _train_or_reuse(data_used, run_dir, {**common, **flags, "seed": seed}, force, progress)
    result, probs, labels, classes = evaluate_arms(data_used, run_dirs, arm_flags, seed_list, common, n_boot)
    result["data"] = str(data)
    if split_note:
        result["split_note"] = split_note
    result = json_safe(result)
    json_path = atomic.write_text(out / "comparison.json", json.dumps(result, indent=2))
    html_path = write_comparison_html(out, result, run_dirs, labels, probs, classes)
    print(summary_text(result))
    print(f"comparison → {json_path}, {html_path}")
    return {"out": str(out), "json": str(json_path), "html": str(html_path), "comparison": result}


def resolve_arms(weights, arms, common: dict) -> dict[str, dict]:
    """{arm name: its own train flags}, from --weights or an arms YAML file/dict; validated before any training."""
    if arms is not None:
        if isinstance(arms, (str, Path)):
            table = load_yaml(arms)
            where = str(arms)
        else:
            table, where = dict(arms), "arms"
        if weights is not None:
            common = {**common, "weights": weights if isinstance(weights, str) else ",".join(weights)}
            if "," in common["weights"]:
                raise MedclfError("with --arms, --weights is one setting shared by all arms (no commas)")
        result = {}
        for name, flags in table.items():
            if not isinstance(flags or {}, dict):
                raise MedclfError(f"{where}: arm {name!r} must map to a set of flags, e.g. {{finetune: head}}")
            flags = {str(k).replace("-", "_"): v for k, v in (flags or {}).items()}
            bad = sorted(NOT_PER_ARM & set(flags))
            if bad:
                raise MedclfError(f"{where}: arm {name!r} sets {', '.join(bad)}; these are the same for every arm")
            result[_safe_name(str(name))] = flags
        if weights is not None:
            result = {name: {"weights": common["weights"], **flags} for name, flags in result.items()}
    elif weights is not None:
        items = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else [str(w) for w in weights]
        items = [w for w in items if w]
        result = {}
        for w in items:
            name = _weights_name(w)
            k = 2
            while name in result:
                name, k = f"{_weights_name(w)}-{k}", k + 1
            result[name] = {"weights": w}
    else:
        raise MedclfError("give the arms: --weights none,imagenet,PATH/model.pt or --arms arms.yaml")
    if len(result) < 2:
        raise MedclfError(f"compare needs at least two arms (got {len(result)}: {', '.join(result) or 'none'})")
    for name, flags in result.items():
        try:
            TrainConfig.from_dict({**common, **flags}).validate()
        except MedclfError as exc:
            raise MedclfError(f"arm {name!r}: {exc}") from None
        w = flags.get("weights", common.get("weights", "none"))
        if w not in ("none", "imagenet") and not Path(w).expanduser().exists():
            raise MedclfError(f"arm {name!r}: weights not found: {w} (none, imagenet or PATH to a medclf model.pt)")
    return result


def _weights_name(weights: str) -> str:
    if weights in ("none", "imagenet"):
        return weights
    path = Path(weights)
    return _safe_name(path.parent.name if path.name == "model.pt" and path.parent.name else path.stem)


def _safe_name(name: str) -> str:
    """An arm name usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("._") or "arm"


SPLIT_RECORD = ".complete"  # inside OUT/data; beside OUT/data.npz as data.npz.complete


def fixed_splits(data: str, out: Path, seed: int, val_fraction: float, test_fraction: float,
                 force: bool = False, **options: str) -> tuple[str, str | None]:
    """DATA whose val/test splits would depend on each run's seed, made once and shared by all runs.

    Class folders (no train/val/test) and data without val are split with the base seed into
    OUT/data/<split>/<class>/ (symlinks) or OUT/data.npz, so every arm and seed trains on the same
    images and is tested on the same held-out images. The split records the DATA, seed and fractions it
    was made from: a later compare into the same OUT reuses it only when they match, and rebuilds it
    on a mismatch only with `force`. A label file's split is OUT/data.csv (path, label, split, group), so its
    patients stay grouped. Returns (DATA to use, a note or None).
    """
    source = sources.open_source(data, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, **options)
    sources.ensure_val_split(source, val_fraction, seed)
    if not source.generated_splits:
        return str(data), None
    how = "; ".join(f"{s}: {h}" for s, h in source.generated_splits.items())
    record = {"data": str(Path(source.root).resolve()), "seed": seed, "val_fraction": val_fraction,
              "test_fraction": test_fraction, "how": how}
    if source.kind == "folder" and source.root.is_file():
        path, marker, build = out / "data.csv", out / f"data.csv{SPLIT_RECORD}", _write_split_table
    elif source.kind == "folder":
        path, marker, build = out / "data", out / "data" / SPLIT_RECORD, _link_split_folders
    else:
        path, marker, build = out / "data.npz", out / f"data.npz{SPLIT_RECORD}", _write_split_npz
    if not _reusable_split(path, marker, record, force):
        out.mkdir(parents=True, exist_ok=True)
        build(source, path, marker, json.dumps(record, indent=2))
    return str(path), f"splits made once with seed {seed} and shared by all runs ({how}): {path}"


def _reusable_split(path: Path, marker: Path, record: dict, force: bool) -> bool:
    """True when `path` is a finished split made from the same DATA and seed; clears a stale one `force` allows."""
    if not path.exists():
        return False
    if not marker.is_file():
        raise MedclfError(f"{path} exists but is not a split made by medclf compare; choose another --out")
    try:
        saved = json.loads(marker.read_text())
    except ValueError:
        saved = {}  # the plain-text marker of an earlier medclf: what it was made from is unknown
    if all(saved.get(k) == v for k, v in record.items() if k != "how"):
        return True
    if not force:
        was = f"{saved.get('data', 'unknown data')}, seed {saved.get('seed', '?')}"
        raise MedclfError(f"{path} holds the split of other data ({was}), not {record['data']}, seed {record['seed']}; "
                          f"pass --force to rebuild it (and retrain the runs) or choose another --out")
    marker.unlink()
    if path.is_dir():
        shutil.rmtree(path)  # symlinks and copies made by compare; the links' targets are untouched
    else:
        path.unlink()
    return False


def _link_split_folders(source: sources.Source, root: Path, marker: Path, record: str) -> None:
    """OUT/data/<split>/<class>/ as symlinks (copies where links fail), built beside and moved in whole,
    its record inside, so OUT/data is either complete or absent."""
    building = Path(tempfile.mkdtemp(dir=root.parent, prefix=".data-"))
    try:
        for name, split in source.splits.items():
            taken: set[Path] = set()
            for path, label in zip(split.paths, split.labels):
                dest = building / name / source.classes[label] / Path(path).name
                if dest in taken:
                    dest = dest.with_name(f"{len(taken):06d}_{dest.name}")
                taken.add(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.symlink(Path(path).resolve(), dest)
                except OSError:
                    shutil.copy2(path, dest)
        (building / marker.relative_to(root)).write_text(record)
        os.replace(building, root)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _write_split_table(source: sources.Source, path: Path, marker: Path, record: str) -> None:
    """OUT/data.csv: every image's absolute path, label, split and group; its record is written first, as for npz."""
    atomic.write_text(marker, record)

    def save(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split", "group"])
            for name, split in source.splits.items():
                groups = split.groups or [""] * len(split)
                for p, label, group in zip(split.paths, split.labels, groups):
                    writer.writerow([str(Path(p).resolve()), table.label_cell(label, source.classes), name, group])

    atomic.write_with(path, save)


def _write_split_npz(source: sources.Source, path: Path, marker: Path, record: str) -> None:
    """OUT/data.npz; its record is written first, so a record without the file just means: build it."""
    atomic.write_text(marker, record)
    archive = source.load_npz()
    arrays = {}
    for name, split in source.splits.items():
        arrays[f"{name}_images"] = np.asarray(archive[f"{split.npz_key}_images"][split.rows])
        arrays[f"{name}_labels"] = split.labels if split.labels.ndim == 2 else split.labels.reshape(-1, 1)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a path
            np.savez(f, **arrays)

    atomic.write_with(path, save)


def _train_or_reuse(data: str, run_dir: Path, settings: dict, force: bool, progress: bool) -> None:
    """Train the run, resume it if interrupted, or keep it if finished with the same settings."""
    if not force and (run_dir / "config.yaml").is_file():
        config = load_yaml(run_dir / "config.yaml")
        wanted = {**settings, "data": data}
        differ = [k for k, v in wanted.items() if k not in NOT_COMPARED and v is not None and config.get(k) != v]
        if differ:
            k = differ[0]
            raise MedclfError(f"{run_dir} was trained with other settings ({k}: {config.get(k)!r}, now {wanted[k]!r}); "
                              f"pass --force to retrain it or choose another --out")
        if (run_dir / "metrics.json").is_file() and (run_dir / "model.pt").is_file():
            print(f"compare: {run_dir} is finished with these settings; reusing it")
            return
        if rundir.resumable(run_dir):
            train(resume=str(run_dir), progress=progress)
            return
    train(data=data, out=str(run_dir), force=force, progress=progress, **settings)


def evaluate_arms(data: str, run_dirs: dict[str, list[Path]], arm_flags: dict, seed_list: list[int], common: dict,
                  n_boot: int) -> tuple[dict, dict[str, np.ndarray], np.ndarray, list[str]]:
    """Every run's predictions on the same images; per-arm mean ± std and pairwise tests."""
    split, compared_on = compared_predictions(data, run_dirs, sources.data_options(common))
    ids = labels = classes = None
    arms: dict[str, dict] = {}
    pooled: dict[str, np.ndarray] = {}
    for arm, dirs in run_dirs.items():
        runs, per_metric, arm_probs = [], {}, []
        for seed, run_dir in zip(seed_list, dirs):
            if split == OUT_OF_FOLD:
                oof = read_oof(run_dir)
                run_ids, run_labels, probs, run_classes = oof.ids, oof.labels, oof.probs, oof.classes
            else:
                run_ids, run_labels, probs, run_classes = _split_predictions(run_dir, data, split, common,
                                                                             f"{arm} seed {seed}")
            if ids is None:
                ids, labels, classes = run_ids, run_labels, run_classes
            elif run_classes != classes:
                raise MedclfError(f"{run_dir} has other classes than the other runs ({', '.join(run_classes)})")
            else:
                probs = _aligned(ids, labels, run_ids, run_labels, probs, run_dir, split)
            run_metrics = evaluate_predictions(labels, probs, classes)
            for name, value in metrics.metric_values(run_metrics, classes).items():
                per_metric.setdefault(name, []).append(np.nan if value is None else value)
            runs.append({"seed": seed, "dir": str(run_dir)})
            arm_probs.append(probs)
        pooled[arm] = np.mean(arm_probs, axis=0)
        funcs = metrics.metric_functions(classes, multilabel=labels.ndim == 2)
        arms[arm] = {"runs": runs, "metrics": {m: mean_std(v) for m, v in per_metric.items()},
                     "flags": arm_flags[arm],
                     "pooled": {m: f(labels, pooled[arm]) for m, f in funcs.items()}}
    pairwise = []
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairwise += pair_tests(labels, pooled[a], pooled[b], classes, a, b, n_boot, len(seed_list))
    result = {"arms": arms, "pairwise": pairwise, "split": split, "compared_on": compared_on,
              "n_images": int(len(labels)), "classes": classes, "seeds": seed_list}
    return result, pooled, labels, classes


def compared_predictions(data: str, run_dirs: dict[str, list[Path]], options: dict | None = None) -> tuple[str, str]:
    """(split, in words) of the predictions the arms are compared on: out-of-fold when every run has them,
    else a split of DATA none of the runs trained on."""
    with_folds = [(d / OOF_FILE).is_file() for dirs in run_dirs.values() for d in dirs]
    if all(with_folds):
        return OUT_OF_FOLD, ("the runs' out-of-fold predictions: every train and val image predicted by the fold "
                             "model that left it out of training")
    splits = sources.open_source(data, **(options or {})).splits
    if not any(with_folds):
        split = "test" if "test" in splits else "val"
        return split, f"each run's model predicting the {split} split"
    if "test" not in splits:
        raise MedclfError("arms ran with and without --folds and DATA has no test split: "
                          "no images are held out from all of them")
    return "test", ("each run's model predicting the test split: some runs used --folds and trained on the val "
                    "images, so test is the only split held out from all of them")


def _split_predictions(run_dir: Path, data: str, split: str, common: dict, desc: str
                       ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(image ids, labels, probabilities, classes) of the run's model on one split of DATA."""
    loaded = load_for_inference(run_dir, common.get("device", "auto"), common.get("precision", "auto"))
    store, _ = split_store(loaded.ckpt, data, split, bool(common.get("skip_bad")), bool(common.get("cache", True)))
    tta = bool(load_yaml(run_dir / "config.yaml").get("tta"))
    probs = loaded.predict(store, tta=tta, desc=desc)
    return list(store.ids), store.labels.numpy(), probs, list(loaded.ckpt["classes"])


def _aligned(ids: list, labels: np.ndarray, run_ids: list, run_labels: np.ndarray, probs: np.ndarray,
             run_dir: Path, split: str) -> np.ndarray:
    """`probs` reordered to the first run's images; refused when the run predicted other images or labels."""
    if run_ids != ids:
        where = {ident: i for i, ident in enumerate(run_ids)}
        if len(run_ids) != len(ids) or any(ident not in where for ident in ids):
            what = f"{OOF_FILE} does not cover" if split == OUT_OF_FOLD else "was not evaluated on"
            raise MedclfError(f"{run_dir} {what} the same images as the other runs")
        order = np.array([where[ident] for ident in ids])
        run_labels, probs = run_labels[order], probs[order]
    if not np.array_equal(run_labels, labels):
        raise MedclfError(f"{run_dir} has other labels for the same images than the other runs")
    return probs


def pair_tests(y: np.ndarray, pa: np.ndarray, pb: np.ndarray, classes: list[str], a: str, b: str,
               n_boot: int = 1000, n_seeds: int = 1) -> list[dict]:
    """One row per metric: difference a − b, its 95% CI and a two-sided p, on the same images."""
    pooled = (f"; each arm's per-image probabilities averaged over its {n_seeds} seeds" if n_seeds > 1 else "")
    boot = f"paired bootstrap over images ({n_boot} resamples)"
    rows = []
    for metric, f in metrics.metric_functions(classes, multilabel=y.ndim == 2).items():
        row = {"a": a, "b": b, "metric": metric}
        if metric == "auc" and len(classes) == 2 and y.ndim == 1 and len(np.unique(y)) == 2:
            diff, p, ci = delong_auc_test(y, pa[:, 1], pb[:, 1])
            method = "DeLong test for two correlated AUCs (difference, 95% CI, p)"
        else:
            diff, ci, p = paired_bootstrap_diff(f, y, pa, pb, n_boot=n_boot)
            method = f"{boot}: difference, 95% percentile CI, p"
            if metric == "accuracy":
                p = mcnemar_test(pa.argmax(1) == y, pb.argmax(1) == y)
                method = f"McNemar test (p); {boot} (95% CI)"
        row.update({"difference": float(diff), "ci95": [float(ci[0]), float(ci[1])], "p_value": float(p),
                    "a_value": f(y, pa), "b_value": f(y, pb), "method": method + pooled})
        rows.append(row)
    return rows
