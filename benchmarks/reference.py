"""BASELINE: the plain PyTorch training/inference loop that people copy.

This is the reference that medclf's speed is compared against. It is meant to
be a faithful, reasonable version of the usual script (per-image PIL
transforms, DataLoader with worker processes, fp32 NCHW, Adam, no autocast, no
torch.compile) -- NOT a deliberately slowed one. Do not "optimise" it: its job
is to stay representative of common practice.

    python benchmarks/reference.py DATA --size 28 --stem small --epochs 1 \
        --batch-size 128 --mode train|infer [--num-workers 2] [--seed 0]

DATA: MedMNIST-style .npz (train_images N×H×W uint8, train_labels N×1, val_*)
or an ImageFolder root (DATA/{train,val}/<class>/*). Progress -> stderr; stdout
gets exactly one JSON line.
"""
import time

_T0 = time.perf_counter()  # in-script wall clock starts here, before heavy imports

import argparse
import json
import os
import random
import resource
import sys

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision import transforms


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


class NpzDataset(torch.utils.data.Dataset):
    """MedMNIST .npz split: each uint8 H×W array -> PIL image -> transforms."""

    def __init__(self, path, split, transform):
        data = np.load(path)
        self.images = data[f"{split}_images"]
        self.labels = data[f"{split}_labels"].reshape(-1).astype(np.int64)
        self.transform = transform

    def __len__(self): return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])  # N×H×W uint8 -> mode 'L'
        return self.transform(img), int(self.labels[i])


def load_gray(path):
    # Module-level (picklable) loader: every image becomes 1-channel 'L'.
    with open(path, "rb") as f:
        return Image.open(f).convert("L")


def build_datasets(data, size):
    train_tf = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5], std=[0.5]),
    ])
    eval_tf = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5], std=[0.5]),
    ])
    if data.endswith(".npz"):
        train_ds = NpzDataset(data, "train", train_tf)
        val_ds = NpzDataset(data, "val", eval_tf)
        num_classes = int(max(train_ds.labels.max(), val_ds.labels.max())) + 1
    else:
        ImageFolder = torchvision.datasets.ImageFolder
        train_ds = ImageFolder(os.path.join(data, "train"), train_tf, loader=load_gray)
        val_ds = ImageFolder(os.path.join(data, "val"), eval_tf, loader=load_gray)
        num_classes = len(train_ds.classes)
    return train_ds, val_ds, num_classes


def build_model(num_classes, stem):
    model = torchvision.models.resnet18(num_classes=num_classes)
    if stem == "small":  # MedMNIST stem for 28 px inputs
        model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:  # "imagenet": standard 7x7/2 stem, but 1 input channel
        model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def train_one_epoch(model, loader, optimizer, criterion, device, max_batches=None):
    model.train()
    n_images, t0 = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if max_batches is not None and step >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        n_images += x.size(0)
        if step % 50 == 0:
            log(f"  step {step:5d}  loss {loss.item():.4f}  "
                f"{n_images / (time.perf_counter() - t0):.1f} img/s")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_images, time.perf_counter() - t0


def evaluate(model, loader, device, max_batches=None):
    """Returns (auc, accuracy, n_images, loop_seconds)."""
    model.eval()
    probs, labels = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for step, (x, y) in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            p = torch.softmax(model(x.to(device)), dim=1)
            probs.append(p.cpu())
            labels.append(y)
    seconds = time.perf_counter() - t0
    probs = torch.cat(probs).numpy()
    labels = torch.cat(labels).numpy()
    acc = float((probs.argmax(1) == labels).mean())
    try:
        if probs.shape[1] == 2:
            auc = roc_auc_score(labels, probs[:, 1])
        else:
            auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                                labels=list(range(probs.shape[1])))
        auc = float(auc)
    except ValueError as e:  # e.g. only one class present in a capped run
        log(f"  AUC undefined: {e}")
        auc = None
    return auc, acc, len(labels), seconds


def process_wall_seconds():
    # Whole-process wall time incl. interpreter start-up (Linux /proc); None elsewhere.
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def main():
    ap = argparse.ArgumentParser(description="Plain PyTorch baseline (reference).")
    ap.add_argument("data")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--stem", choices=["small", "imagenet"], default="small")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batches", type=int, default=None,
                    help="cap batches per epoch/pass (quick checks only)")
    args = ap.parse_args()

    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_ds, val_ds, num_classes = build_datasets(args.data, args.size)
    log(f"reference: {len(train_ds)} train / {len(val_ds)} val, {num_classes} classes, "
        f"device {device}")

    loader_kw = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                     persistent_workers=False, pin_memory=device.type == "cuda")
    # shuffle=True for both loaders (as in the copied script); AUC/accuracy do not
    # depend on order, and a --max-batches cap then evaluates a random subset.
    g_train = torch.Generator().manual_seed(args.seed)
    g_val = torch.Generator().manual_seed(args.seed + 1)
    train_loader = torch.utils.data.DataLoader(train_ds, shuffle=True, generator=g_train, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=True, generator=g_val, **loader_kw)

    model = build_model(num_classes, args.stem).to(device)  # fp32, NCHW
    result = {"impl": "reference", "mode": args.mode, "data": args.data,
              "size": args.size, "stem": args.stem, "epochs": args.epochs,
              "batch_size": args.batch_size, "num_workers": args.num_workers,
              "device": str(device)}
    auc = acc = None

    if args.mode == "train":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        criterion = nn.CrossEntropyLoss()
        n_total, t_total = 0, 0.0
        for epoch in range(args.epochs):
            n, t = train_one_epoch(model, train_loader, optimizer, criterion,
                                   device, args.max_batches)
            n_total, t_total = n_total + n, t_total + t
            auc, acc, _, _ = evaluate(model, val_loader, device, args.max_batches)
            log(f"epoch {epoch}: {n / t:.1f} img/s train, val_auc {auc}, val_acc {acc:.4f}")
        result.update(train_images=n_total, train_seconds=round(t_total, 3),
                      images_per_s=round(n_total / t_total, 1))
    else:
        n_total, t_total = 0, 0.0
        for epoch in range(args.epochs):
            auc, acc, n, t = evaluate(model, val_loader, device, args.max_batches)
            n_total, t_total = n_total + n, t_total + t
            log(f"pass {epoch}: {n / t:.1f} img/s inference")
        result.update(infer_images=n_total, infer_seconds=round(t_total, 3),
                      images_per_s=round(n_total / t_total, 1))

    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result.update(val_auc=auc, val_accuracy=acc,
                  wall_s=round(time.perf_counter() - _T0, 3),
                  process_wall_s=process_wall_seconds(),
                  peak_rss_self_mb=round(rss_self, 1),
                  peak_rss_children_mb=round(rss_children, 1),
                  peak_rss_mb=round(max(rss_self, rss_children), 1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
