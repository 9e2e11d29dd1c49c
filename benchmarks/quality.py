"""Accuracy of the defaults: `medclf train DATA` with no flags but the seed and the time budget.

    python benchmarks/quality.py [--datasets pneumoniamnist,mednist,chest] [--seeds 0,1,2]
                                 [--budget pneumoniamnist=10,mednist=5,chest=5] [--shared ../shared/datasets]
                                 [--out runs/quality]

- pneumoniamnist: ../shared/datasets/pneumoniamnist_28_trainval.npz (train 4708 / val 524)
- mednist: ../shared/datasets/mednist_trainval.tar.gz extracted into a temporary folder as
  mednist/{train,val}/<Class>/ (train 47164 / val 5895)
- chest: ../shared/datasets/chest_xray_400 (train 200 / val 100) fine-tuned (`--weights`) from the
  pneumoniamnist run of the same seed; `--chest-scratch` also trains it from scratch for comparison.

The test splits are held out: every number is on the validation split, which the run also uses to
keep its best checkpoint (so validation figures are mildly optimistic). stdout gets one JSON line per
run and one summary line per dataset (mean and sample standard deviation over the seeds); progress
goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = HERE.parent.parent / "shared" / "datasets"
METRICS = ("accuracy", "balanced_accuracy", "auc", "f1_macro")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def extract_mednist(archive: Path, into: Path) -> Path:
    root = into / "mednist"
    if not (root / "train").is_dir():
        log(f"extracting {archive} → {into}")
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    return root


def run_one(name: str, data: Path, seed: int, budget: float, out: Path, **extra) -> dict:
    import medclf

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = medclf.train(data=str(data), seed=seed, time_budget=budget, out=str(out), force=True,
                              progress=False, **extra)
    minutes = (time.perf_counter() - t0) / 60
    val = result["metrics"]["val"]
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    row = {"dataset": name, "seed": seed, "budget_min": budget, **{f"val_{m}": val[m] for m in METRICS}}
    if val.get("threshold"):
        row["val_accuracy_at_threshold"] = val["threshold"]["accuracy"]
        row["val_f1_macro_at_threshold"] = val["threshold"]["f1_macro"]
    row.update({"epochs_run": len(result["history"]), "epochs_planned": config["epochs"],
                "train_minutes": round(sum(h["seconds"] for h in result["history"]) / 60, 2),
                "total_minutes": round(minutes, 2), "size": config["size"], "stem": config["stem"],
                "augment": config["augment"], "batch_size": config["batch_size"], "ema": config["ema"],
                "weights": config["weights"], "run": str(out),
                # the benchmark process's peak so far (Linux reports KiB), MedNIST's store included once it ran
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    print(json.dumps(row), flush=True)
    return row


def summarise(name: str, rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k.startswith("val_")] + ["train_minutes", "total_minutes"]
    summary = {"dataset": name, "n_seeds": len(rows), "seeds": [r["seed"] for r in rows]}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            summary[f"{k}_mean"] = round(statistics.fmean(values), 4)
            summary[f"{k}_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
    print(json.dumps({"summary": summary}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="pneumoniamnist,mednist,chest")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--budget", default="pneumoniamnist=10,mednist=5,chest=5",
                        help="minutes of training per dataset")
    parser.add_argument("--shared", default=str(DEFAULT_SHARED))
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--base", help="pneumoniamnist model.pt for the chest fine-tuning (default: this script's run)")
    parser.add_argument("--chest-scratch", action="store_true", help="also train chest_xray_400 from scratch")
    args = parser.parse_args(argv)
    shared, out = Path(args.shared), Path(args.out)
    datasets = args.datasets.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = {k: float(v) for k, v in (item.split("=") for item in args.budget.split(","))}
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="medclf-quality-") as tmp:
        for seed in seeds:
            if "pneumoniamnist" in datasets:
                rows.setdefault("pneumoniamnist", []).append(
                    run_one("pneumoniamnist", shared / "pneumoniamnist_28_trainval.npz", seed, budget["pneumoniamnist"],
                            out / f"pneumoniamnist-s{seed}"))
            if "mednist" in datasets:
                data = extract_mednist(shared / "mednist_trainval.tar.gz", Path(tmp))
                rows.setdefault("mednist", []).append(
                    run_one("mednist", data, seed, budget["mednist"], out / f"mednist-s{seed}"))
            if "chest" in datasets:
                base = Path(args.base) if args.base else out / f"pneumoniamnist-s{seed}" / "model.pt"
                if not base.is_file():
                    log(f"no pneumoniamnist model at {base}: run the pneumoniamnist benchmark first or pass --base")
                    return 2
                rows.setdefault("chest_xray_400 (fine-tuned)", []).append(
                    run_one("chest_xray_400 (fine-tuned)", shared / "chest_xray_400", seed, budget["chest"],
                            out / f"chest-ft-s{seed}", weights=str(base)))
                if args.chest_scratch:
                    rows.setdefault("chest_xray_400 (scratch)", []).append(
                        run_one("chest_xray_400 (scratch)", shared / "chest_xray_400", seed, budget["chest"],
                                out / f"chest-scratch-s{seed}"))
    for name, found in rows.items():
        summarise(name, found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
