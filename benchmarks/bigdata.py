"""Data larger than the RAM budget: the same decoded store read in chunks from disk vs held in memory.

    python benchmarks/bigdata.py --dir /var/tmp/medclf-bigdata            # 60,000 images, 224 px, 1 channel
    python benchmarks/bigdata.py --images 2000 --steps 2                  # a quick check of the script

Writes a synthetic decoded store (N×C×S×S uint8 .npy with its meta.json, as medclf's cache holds one;
random pixels, two classes stored one after the other as class folders decode), then runs each mode in a
fresh process so its peak RSS is its own:
  memory  $MEDCLF_DATA_RAM_GB above the store's size: the store is read into RAM (its load time is
          reported apart and not counted in the epoch)
  disk    $MEDCLF_DATA_RAM_GB=--budget-gb, below the store's size: the store stays in its file and is read
          in chunks (medclf/data/chunks.py)
Before each mode the file's pages are dropped from the page cache (fsync, then posix_fadvise DONTNEED) so
its reads come from the disk, not from RAM. Each mode measures, in this order:
  data_epoch_s  one full epoch of the data path: training.epoch_order (order_s), then Store.take for
                every batch of --batch images (take_s) and prepare_batch ("light" augmentation, the
                default) on them (prepare_s; with --prepare-images N only on the epoch's first N
                images, scaled to the epoch: its cost does not depend on where the batch came from)
  step_s        the mean of --steps real ResNet-18 training steps (take, prepare_batch, forward, backward,
                AdamW) on the first batches of a new epoch's order
  peak_rss_gb   the process's peak resident memory (VmHWM)
The store is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import machine  # noqa: E402 - the same CPU description as the other benchmarks

MODE_SNIPPET = """
import json, sys, time
import torch
from pathlib import Path
from medclf import models, training
from medclf.data.augment import prepare_batch, training_preset
from medclf.data.store import Store, _load_pixels

folder, batch, steps, limit = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
t0 = time.perf_counter()
images, reader = _load_pixels(folder)
load_s = time.perf_counter() - t0
n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
limit = limit or n
labels = (torch.arange(n) >= n // 2).long()
store = Store(images, labels, [str(i) for i in range(n)], reader)
mean, std, preset = [0.5] * channels, [0.5] * channels, training_preset("light", 0.0)
gen = torch.Generator().manual_seed(0)

take_s = prepare_s = 0.0
prepared = 0
t0 = time.perf_counter()
order = training.epoch_order(n, labels, "none", 2, gen, store.chunk)
order_s = time.perf_counter() - t0
for idx in order.split(batch):
    t0 = time.perf_counter()
    x = store.take(idx)
    t1 = time.perf_counter()
    take_s += t1 - t0
    if prepared < limit:
        prepare_batch(x, size, mean, std, channels, preset, gen)
        prepare_s += time.perf_counter() - t1
        prepared += len(idx)

model = models.build_model("resnet18", 2, channels, "imagenet")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = torch.nn.CrossEntropyLoss()
order = training.epoch_order(n, labels, "none", 2, gen, store.chunk)
times = []
for idx in order.split(batch)[:steps + 1]:  # the first step warms up the kernels: not counted
    t0 = time.perf_counter()
    x = prepare_batch(store.take(idx), size, mean, std, channels, preset, gen)
    loss = loss_fn(model(x), labels[idx])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - t0)
peak_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"in_memory": reader is None, "chunk_images": store.chunk, "load_s": load_s,
                  "order_s": order_s, "take_s": take_s, "prepared_images": prepared, "prepare_s": prepare_s,
                  "data_epoch_s": order_s + take_s + prepare_s * n / prepared,
                  "step_s": sum(times[1:]) / max(1, len(times) - 1), "steps": len(times) - 1,
                  "chunks_read": reader.loads if reader is not None else None, "peak_rss_gb": peak_kb / 2**20}))
"""


def write_store(folder: Path, n: int, channels: int, size: int) -> Path:
    """A cache-like store folder: images.npy written block by block (never whole in memory) and meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "images.npy"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (n, channels, size, size)})
        for start in range(0, n, 1000):
            f.write(rng.integers(0, 256, (min(1000, n - start), channels, size, size), dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
    (folder / "meta.json").write_text(json.dumps({"shape": [n, channels, size, size], "synthetic": True}))
    return path


def drop_page_cache(path: Path) -> None:
    """Evict the file's (clean) pages from the page cache, so the next reads go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> str:
    """fincore's report of how much of the file is in the page cache (util-linux), when it is installed."""
    done = subprocess.run(["fincore", "--noheadings", "--output", "RES,SIZE", str(path)], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "fincore unavailable"


def run_mode(folder: Path, budget_gb: float, args) -> dict:
    drop_page_cache(folder / "images.npy")
    before = cached_fraction(folder / "images.npy")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "MEDCLF_DATA_RAM_GB": repr(budget_gb)}
    done = subprocess.run([sys.executable, "-c", MODE_SNIPPET, str(folder), str(args.batch), str(args.steps),
                           str(args.prepare_images)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update({"budget_gb": budget_gb, "page_cache_before": before, "load_avg_after": os.getloadavg()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/medclf-bigdata", help="where the synthetic store is written")
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--budget-gb", type=float, default=1.0, help="the disk mode's RAM budget for data (GiB)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="training steps timed per mode")
    parser.add_argument("--prepare-images", type=int, default=0,
                        help="time prepare_batch on the epoch's first N images only and scale it to the epoch "
                             "(default 0: the whole epoch)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic store afterwards")
    args = parser.parse_args()
    folder = Path(args.dir) / "store"
    print(json.dumps({"machine": machine(), "mem_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
                      "load_avg_before": os.getloadavg()}), flush=True)
    try:
        t0 = time.perf_counter()
        path = write_store(folder, args.images, args.channels, args.size)
        store_gb = path.stat().st_size / 2**30
        print(json.dumps({"store_gb": store_gb, "images": args.images, "size": args.size, "channels": args.channels,
                          "write_s": time.perf_counter() - t0}), flush=True)
        if args.budget_gb >= store_gb:
            sys.exit(f"--budget-gb {args.budget_gb} holds the whole {store_gb:.2f} GiB store: choose less")
        results = {}
        for mode, budget in (("memory", 2 * store_gb + 1), ("disk", args.budget_gb)):
            results[mode] = run_mode(folder, budget, args)
            print(json.dumps({"mode": mode, **results[mode]}), flush=True)
        print(json.dumps({"summary": {
            "take_ratio_disk_vs_memory": results["disk"]["take_s"] / results["memory"]["take_s"],
            "data_epoch_ratio_disk_vs_memory": results["disk"]["data_epoch_s"] / results["memory"]["data_epoch_s"],
            "step_ratio_disk_vs_memory": results["disk"]["step_s"] / results["memory"]["step_s"],
            "peak_rss_gb": {m: r["peak_rss_gb"] for m, r in results.items()}}}), flush=True)
    finally:
        if not args.keep:
            for name in ("images.npy", "meta.json"):
                (folder / name).unlink(missing_ok=True)
            for empty in (folder, folder.parent):
                if empty.is_dir() and not any(empty.iterdir()):
                    empty.rmdir()


if __name__ == "__main__":
    main()
