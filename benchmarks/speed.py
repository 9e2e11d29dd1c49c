"""medclf vs the plain PyTorch loop (benchmarks/reference.py), back to back on one machine.

Same model (ResNet-18, same stem), data, resolution, batch size and epochs. Prints one JSON line
per case and mode, then a summary line with median ratios over the repeats.

    python benchmarks/speed.py                       # all cases, 3 repeats
    python benchmarks/speed.py --cases 224 --repeats 1
    python benchmarks/speed.py --modes engines       # inference engines at 224 px vs the plain loop (engines.py)
    python benchmarks/speed.py --device cuda         # both on the GPU, GPU-sized cases (GPU_CASES)

On a GPU, whole-process wall time is mostly start-up, so each row also has the loops' own throughput:
the reference's training loop (its JSON `images_per_s`) against medclf's epochs (history.csv seconds,
validation pass included), and each inference loop without the one-time model load and decode.

Training is timed as whole-process wall time (imports, data loading, every epoch with its
validation pass, final evaluation and output files). Inference is the loop over the validation
split repeated `--passes` times, timed inside each process: the reference decodes and transforms
every image through a DataLoader on each pass; medclf builds its decoded store once (that time
included) and then runs batched, gradient-free, channels_last inference.
Peak RSS is the child process tree's maximum (resource.getrusage of a fresh intermediary).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
REFERENCE = ROOT / "benchmarks" / "reference.py"

CASES = {
    # name: data, size, stem, batch size, epochs
    "28": dict(data="pneumoniamnist", size=28, stem="small", batch=128, epochs=1),
    "64": dict(data="mednist", size=64, stem="imagenet", batch=128, epochs=1),
    "224": dict(data="chest_xray_400", size=224, stem="imagenet", batch=32, epochs=2),
}

# on a GPU the CPU cases finish in about a second: larger sets and more epochs, MedNIST upsampled for 224 px
GPU_CASES = {
    "28": dict(data="pneumoniamnist", size=28, stem="small", batch=128, epochs=10),
    "64": dict(data="mednist", size=64, stem="imagenet", batch=128, epochs=5),
    "224": dict(data="mednist", size=224, stem="imagenet", batch=128, epochs=3),
}

INFER_SNIPPET = """
import sys, time, json
t0 = time.perf_counter()
import torch
from medclf.inference import load_for_inference, split_store
run, data, passes, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
loaded = load_for_inference(run, device, "auto")
t1 = time.perf_counter()
store, _ = split_store(loaded.ckpt, data, "val", False, False)   # decode once, no cache: counted here
t_decoded = time.perf_counter()
for _ in range(passes):
    loaded.predict(store)  # returns numpy: the GPU has finished when it returns
t2 = time.perf_counter()
print(json.dumps({"images": passes * len(store), "infer_seconds": t2 - t1,
                  "images_per_s": passes * len(store) / (t2 - t1),
                  "loop_images_per_s": passes * len(store) / (t2 - t_decoded)}))
"""


def data_path(name: str, workdir: Path, mednist_per_class: int) -> Path:
    if name == "pneumoniamnist":
        return SHARED / "pneumoniamnist_28_trainval.npz"
    if name == "chest_xray_400":
        return SHARED / "chest_xray_400"
    target = workdir / f"mednist_{mednist_per_class}"
    if not target.is_dir():  # a class-balanced subset keeps one epoch to minutes on 2 cores
        with tarfile.open(SHARED / "mednist_trainval.tar.gz") as tar:
            tar.extractall(workdir / "mednist_full", filter="data")
        for split, n in (("train", mednist_per_class), ("val", max(1, mednist_per_class // 8))):
            for cls in sorted((workdir / "mednist_full" / "mednist" / split).iterdir()):
                dest = target / split / cls.name
                dest.mkdir(parents=True)
                for f in sorted(cls.iterdir())[:n]:
                    os.link(f, dest / f.name)
    return target


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd in a fresh intermediary so RUSAGE_CHILDREN covers just this tree; wall time and peak RSS."""
    probe = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "w = time.perf_counter() - t; r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024; "
             "print(json.dumps({'rc': p.returncode, 'wall_s': w, 'peak_rss_mb': r, 'stdout': p.stdout, 'stderr': p.stderr[-2000:]}))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['stderr']}")
    return result


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def epoch_seconds(run_dir: Path) -> float:
    """medclf's training time: its epochs' seconds (each with its validation pass) from history.csv."""
    with open(run_dir / "history.csv", newline="") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f))


def time_to_training(cmd: list[str]) -> float:
    """Seconds from process start until medclf announces the first epoch (cache warm)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("medclf:"):
            seconds = time.perf_counter() - start
            proc.kill()
            proc.wait()
            return seconds
    proc.wait()
    raise RuntimeError("medclf never started training")


def run_case(name: str, args, workdir: Path) -> list[dict]:
    case = (GPU_CASES if args.device == "cuda" else CASES)[name]
    data = data_path(case["data"], workdir, args.mednist_per_class)
    env = {**os.environ, "MEDCLF_DATA": str(workdir / "medclf_data")}
    # the reference takes the GPU whenever one is visible: hide it for a CPU comparison
    ref_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    common = ["--size", str(case["size"]), "--stem", case["stem"], "--epochs", str(args.epochs or case["epochs"]),
              "--batch-size", str(case["batch"])]
    ref_flags = ["--num-workers", str(args.reference_workers)]
    # one model against the reference's one: the plan would cross-validate sets under 2,000 images (K models)
    med_flags = ["--device", args.device, "--folds", "0"]
    rows = []
    for r in range(args.repeats):
        run_dir = workdir / f"run-{name}-{r}"
        if "train" in args.modes:
            ref = measured([sys.executable, str(REFERENCE), str(data), *common, *ref_flags, "--mode", "train"], ref_env)
            med = measured([sys.executable, "-m", "medclf", "train", str(data), *common, "--model", "resnet18", "--augment", "light",
                            "--patience", "0", *med_flags, "--out", str(run_dir), "--force"], env)
            ref_json = last_json(ref["stdout"])
            val_auc = json.loads((run_dir / "metrics.json").read_text())["val"]["auc"]
            rows.append({"case": name, "mode": "train", "repeat": r, "reference_wall_s": ref["wall_s"],
                         "medclf_wall_s": med["wall_s"], "ratio": ref["wall_s"] / med["wall_s"],
                         "reference_images_per_s": ref_json["train_images"] / ref["wall_s"],
                         "medclf_images_per_s": ref_json["train_images"] / med["wall_s"],
                         "reference_val_auc": ref_json["val_auc"], "medclf_val_auc": val_auc,
                         "reference_peak_rss_mb": ref["peak_rss_mb"], "medclf_peak_rss_mb": med["peak_rss_mb"],
                         "reference_loop_images_per_s": ref_json["images_per_s"],
                         "medclf_epoch_images_per_s": ref_json["train_images"] / epoch_seconds(run_dir)})
            if r == 0:
                cmd = [sys.executable, "-m", "medclf", "train", str(data), *common, *med_flags, "--out",
                       str(workdir / "tts"), "--force"]
                rows[-1]["medclf_seconds_to_training_warm_cache"] = time_to_training(cmd)
            print(json.dumps(rows[-1]), flush=True)
        if "infer" in args.modes and (run_dir / "model.pt").is_file():
            ref = last_json(measured([sys.executable, str(REFERENCE), str(data), *common[:4], "--epochs",
                                      str(args.passes), "--batch-size", "256", *ref_flags, "--mode", "infer"],
                                     ref_env)["stdout"])
            med = last_json(measured([sys.executable, "-c", INFER_SNIPPET, str(run_dir), str(data), str(args.passes),
                                      args.device], env)["stdout"])
            rows.append({"case": name, "mode": "infer", "repeat": r, "passes": args.passes,
                         "reference_images_per_s": ref["images_per_s"], "medclf_images_per_s": med["images_per_s"],
                         "ratio": med["images_per_s"] / ref["images_per_s"],
                         "medclf_loop_images_per_s": med["loop_images_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="28,64,224")
    ap.add_argument("--modes", default="train,infer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=3, help="inference passes over the validation split")
    ap.add_argument("--mednist-per-class", type=int, default=1000, help="MedNIST train images per class (val: 1/8)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cuda: medclf and the plain loop both on the GPU, GPU_CASES; cpu: the GPU hidden from both")
    ap.add_argument("--epochs", type=int, help="training epochs (default: the case's)")
    ap.add_argument("--reference-workers", type=int, default=2, help="the plain loop's DataLoader workers")
    ap.add_argument("--images", type=int, default=300, help="engines mode: images timed per arm and round")
    ap.add_argument("--rounds", type=int, default=3, help="engines mode: rounds, arms alternating within each")
    ap.add_argument("--run", help="engines mode: a trained 224 px run to time (default: random weights)")
    ap.add_argument("--data", default=str(SHARED / "chest_xray_400"), help="engines mode: images (DATA/train/CLASS/)")
    args = ap.parse_args()
    args.modes = args.modes.split(",")
    if args.device == "cuda" and not cuda_available():
        sys.exit("speed.py: --device cuda: PyTorch sees no CUDA GPU here")
    if args.modes == ["engines"]:  # inference engines side by side in one process (benchmarks/engines.py)
        from engines import run_engines

        run_engines(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="medclf-speed-") as tmp:
        for name in args.cases.split(","):
            rows += run_case(name, args, Path(tmp))
    summary = {}
    for (case, mode) in sorted({(r["case"], r["mode"]) for r in rows}):
        ratios = [r["ratio"] for r in rows if r["case"] == case and r["mode"] == mode]
        summary[f"{case}px_{mode}"] = {"median_ratio": statistics.median(ratios), "n": len(ratios),
                                       "min": min(ratios), "max": max(ratios)}
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
